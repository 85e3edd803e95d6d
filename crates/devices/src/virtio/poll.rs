//! Polling the rings: after work, the device event loop keeps looking at every
//! queue's available index for a while instead of sleeping, with the drivers
//! asked not to notify. A notification costs the guest an exit and the device
//! thread a wake-up; a driver that keeps requests coming (a queue kept deep, or
//! one request after another) pays neither while the loop polls.
//!
//! How long the loop polls adapts to the gaps between events, as QEMU's event
//! loop does its poll time ([`PollWindow`]): a VM whose devices are idle or
//! seldom used is not polled for, and one whose requests come closer than the
//! most it may poll (`io_poll_us`) is polled for as long as they keep coming,
//! unless other threads want the CPU the loop polls on.

use std::cell::Cell;
use std::time::Duration;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::DeviceBroken;
use crate::GuestMemoryMmap;

thread_local! {
    /// Set while this thread (the device event loop) polls the rings.
    static POLLING: Cell<bool> = const { Cell::new(false) };
}

/// Marks this thread as polling the rings until the guard is dropped: a pass
/// that empties a queue leaves the driver's notifications off.
pub fn polling() -> PollingGuard {
    POLLING.set(true);
    PollingGuard(())
}

/// While it lives, this thread polls the rings (see [`polling`]).
pub struct PollingGuard(());

impl Drop for PollingGuard {
    fn drop(&mut self) {
        POLLING.set(false);
    }
}

/// Whether this thread polls the rings.
pub(crate) fn active() -> bool {
    POLLING.get()
}

/// Asks the driver of `queue` not to notify: with event indices `avail_event`
/// one entry behind the device, which no batch the driver adds passes; without
/// them, the used ring's `VRING_USED_F_NO_NOTIFY`.
pub(crate) fn quiet(queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<(), DeviceBroken> {
    if queue.event_idx_enabled() {
        let at = queue.used_ring() + 4 + 8 * u64::from(queue.size());
        mem.write_obj(queue.next_avail().wrapping_sub(1).to_le(), GuestAddress(at))
            .map_err(|e| DeviceBroken(format!("cannot write avail_event: {e}")))
    } else {
        queue
            .disable_notification(mem)
            .map_err(|e| DeviceBroken(format!("cannot write the used ring's flags: {e:?}")))
    }
}

/// Where a window grown from nothing starts.
const FIRST_WINDOW: Duration = Duration::from_micros(8);

/// Wakes the loop sleeps through without polling after its first poll that
/// had to share the CPU; doubled at each such poll in a row.
const FIRST_HOLD: u32 = 64;
/// The most wakes it holds off for.
const MOST_HOLD: u32 = 4096;

/// How long the device event loop polls after its last work: from nothing up
/// to `max`. Doubled when the loop, after polling its whole window in vain,
/// was woken within `max` (a longer window would have caught that event);
/// halved, down to nothing, when it slept longer. A poll that had to share its
/// CPU with other threads (it got less than half the time it ran for) stops
/// polling for a number of wakes: polling is worth it only on a CPU nothing
/// else wants, and a host whose CPUs are all busy runs its vCPUs better
/// without it.
#[derive(Clone, Copy, Debug)]
pub struct PollWindow {
    max: Duration,
    now: Duration,
    /// Wakes left without polling.
    hold: u32,
    /// The hold the next shared poll sets.
    backoff: u32,
}

impl PollWindow {
    /// A window of at most `max` (zero: the loop never polls), nothing to begin with.
    pub fn new(max: Duration) -> Self {
        Self {
            max,
            now: Duration::ZERO,
            hold: 0,
            backoff: FIRST_HOLD,
        }
    }

    /// How long to poll now.
    pub fn get(&self) -> Duration {
        self.now
    }

    /// The loop polled its whole window without finding work, then slept
    /// `slept` until the next event.
    pub fn woke_after(&mut self, slept: Duration) {
        if self.hold > 0 {
            self.hold -= 1;
        } else if self.now + slept <= self.max {
            self.now = (self.now * 2).clamp(FIRST_WINDOW.min(self.max), self.max);
        } else {
            self.now /= 2;
            if self.now < FIRST_WINDOW {
                self.now = Duration::ZERO;
            }
        }
    }

    /// The last poll ran `wall` and got `cpu` of CPU time.
    pub fn polled(&mut self, wall: Duration, cpu: Duration) {
        if cpu * 2 < wall {
            self.now = Duration::ZERO;
            self.hold = self.backoff;
            self.backoff = (self.backoff * 2).min(MOST_HOLD);
        } else {
            self.backoff = FIRST_HOLD;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    #[test]
    fn events_closer_than_the_most_grow_the_window_to_it() {
        let mut w = PollWindow::new(200 * US);
        assert_eq!(w.get(), Duration::ZERO);
        let mut seen = Vec::new();
        for _ in 0..6 {
            w.woke_after(30 * US);
            seen.push(w.get().as_micros());
        }
        // Each miss by less than the most doubles it, up to the most.
        assert_eq!(seen, [8, 16, 32, 64, 128, 200]);
    }

    #[test]
    fn sparse_events_shrink_the_window_to_nothing() {
        let mut w = PollWindow::new(200 * US);
        for _ in 0..6 {
            w.woke_after(US);
        }
        assert_eq!(w.get(), 200 * US);
        let mut seen = Vec::new();
        for _ in 0..6 {
            w.woke_after(10 * 1000 * US);
            seen.push(w.get().as_micros());
        }
        assert_eq!(seen, [100, 50, 25, 12, 0, 0]);
        // An idle VM is not polled for: a long sleep never grows it.
        w.woke_after(300 * US);
        assert_eq!(w.get(), Duration::ZERO);
    }

    #[test]
    fn a_poll_that_shares_its_cpu_stops_polling_for_a_while() {
        let mut w = PollWindow::new(200 * US);
        for _ in 0..6 {
            w.woke_after(US);
        }
        w.polled(200 * US, 190 * US);
        assert_eq!(w.get(), 200 * US, "had the CPU: goes on");
        w.polled(200 * US, 60 * US);
        assert_eq!(w.get(), Duration::ZERO, "shared it: stops");
        for _ in 0..FIRST_HOLD {
            w.woke_after(US);
            assert_eq!(w.get(), Duration::ZERO, "held off");
        }
        w.woke_after(US);
        assert_eq!(w.get(), FIRST_WINDOW, "then grows again");
        // Shared again at once: held off twice as long.
        w.polled(8 * US, US);
        for _ in 0..2 * FIRST_HOLD {
            w.woke_after(US);
        }
        assert_eq!(w.get(), Duration::ZERO);
        w.woke_after(US);
        assert_eq!(w.get(), FIRST_WINDOW);
        // A poll with the CPU to itself resets the backoff.
        w.polled(8 * US, 8 * US);
        w.polled(8 * US, US);
        for _ in 0..FIRST_HOLD {
            w.woke_after(US);
        }
        w.woke_after(US);
        assert_eq!(w.get(), FIRST_WINDOW);
    }

    #[test]
    fn a_zero_most_never_polls() {
        let mut w = PollWindow::new(Duration::ZERO);
        for slept in [Duration::ZERO, US, 1000 * US] {
            w.woke_after(slept);
            assert_eq!(w.get(), Duration::ZERO);
        }
    }
}
