//! Parking vCPU threads between two `KVM_RUN`s: what pause and resume are made of.
//!
//! A pause sets [`PauseGate::requested`]; each vCPU thread checks it before every
//! `KVM_RUN` and, when set, parks on a condition variable and counts itself. The
//! pausing thread kicks the vCPUs out of `KVM_RUN` (the kick signal) until every one
//! of them has parked. Resume clears the request and wakes them.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// Shared by the vCPU threads and whoever pauses them.
#[derive(Debug, Default)]
pub struct PauseGate {
    requested: AtomicBool,
    /// Set for good when a crashed VM is kept for inspection: the gate stays shut
    /// whatever [`PauseGate::release`] is called.
    held: AtomicBool,
    /// Why it is held (`vCPU N: reason`).
    held_why: Mutex<Option<String>>,
    parked: Mutex<usize>,
    changed: Condvar,
}

impl PauseGate {
    fn lock(&self) -> MutexGuard<'_, usize> {
        self.parked.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a pause is asked for (or in force), or the gate is held.
    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::Acquire) || self.held.load(Ordering::Acquire)
    }

    /// Shuts the gate for good (a crashed VM kept for inspection): every vCPU parks
    /// at its next exit and none goes on until the VM stops. The first reason stays.
    pub fn hold(&self, why: String) {
        let mut held = self.held_why.lock().unwrap_or_else(|e| e.into_inner());
        if held.is_none() {
            *held = Some(why);
        }
        self.held.store(true, Ordering::Release);
    }

    /// Why the gate is held, when it is.
    pub fn held(&self) -> Option<String> {
        if !self.held.load(Ordering::Acquire) {
            return None;
        }
        self.held_why
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Called by a vCPU thread before `KVM_RUN`: parks while a pause is asked for
    /// and the VM is not stopping. Says whether it parked.
    ///
    /// A parked vCPU still serves requests (a paused VM can be inspected): whenever
    /// `work` is set it calls `serve`, without the gate's lock. Whoever sets `work`
    /// then calls [`Self::wake_all`].
    pub fn park_if_requested(
        &self,
        stop: &AtomicBool,
        work: &AtomicBool,
        mut serve: impl FnMut(),
    ) -> bool {
        if !self.requested() {
            return false;
        }
        let mut parked = self.lock();
        *parked += 1;
        self.changed.notify_all();
        while self.requested() && !stop.load(Ordering::Acquire) {
            // Checked under the lock, so a wake-up after `work` was set is not lost.
            if work.load(Ordering::Acquire) {
                drop(parked);
                serve();
                parked = self.lock();
                continue;
            }
            // The timeout only bounds how long a missed wake-up could last.
            parked = match self
                .changed
                .wait_timeout(parked, Duration::from_millis(100))
            {
                Ok((guard, _)) => guard,
                Err(e) => e.into_inner().0,
            };
        }
        *parked -= 1;
        self.changed.notify_all();
        true
    }

    /// Asks the vCPUs to park (they do so at their next exit).
    pub fn request(&self) {
        self.requested.store(true, Ordering::Release);
    }

    /// Lets parked vCPUs go on.
    pub fn release(&self) {
        self.requested.store(false, Ordering::Release);
        let _guard = self.lock();
        self.changed.notify_all();
    }

    /// Wakes parked vCPUs so they see that the VM is stopping, or that requests wait.
    pub fn wake_all(&self) {
        let _guard = self.lock();
        self.changed.notify_all();
    }

    /// How many vCPUs are parked now, waiting at most `wait` for a change first.
    pub fn parked_after(&self, wait: Duration) -> usize {
        let parked = self.lock();
        match self.changed.wait_timeout(parked, wait) {
            Ok((guard, _)) => *guard,
            Err(e) => *e.into_inner().0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn parks_until_released_and_counts() {
        let gate = Arc::new(PauseGate::default());
        let stop = Arc::new(AtomicBool::new(false));
        gate.request();
        let threads: Vec<_> = (0..3)
            .map(|_| {
                let (g, s) = (gate.clone(), stop.clone());
                std::thread::spawn(move || g.park_if_requested(&s, &AtomicBool::new(false), || {}))
            })
            .collect();
        let mut parked = 0;
        for _ in 0..500 {
            parked = gate.parked_after(Duration::from_millis(10));
            if parked == 3 {
                break;
            }
        }
        assert_eq!(parked, 3);
        assert!(threads.iter().all(|t| !t.is_finished()));
        gate.release();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(gate.parked_after(Duration::ZERO), 0);
    }

    #[test]
    fn parked_vcpu_serves_work_and_stays_parked() {
        let gate = Arc::new(PauseGate::default());
        let stop = Arc::new(AtomicBool::new(false));
        let work = Arc::new(AtomicBool::new(false));
        let served = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        gate.request();
        let (g, s, w, n) = (gate.clone(), stop.clone(), work.clone(), served.clone());
        let t = std::thread::spawn(move || {
            g.park_if_requested(&s, &w, || {
                w.store(false, Ordering::Release);
                n.fetch_add(1, Ordering::Release);
            })
        });
        while gate.parked_after(Duration::from_millis(10)) == 0 {}
        work.store(true, Ordering::Release);
        gate.wake_all();
        while served.load(Ordering::Acquire) == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(gate.parked_after(Duration::ZERO), 1, "still parked");
        assert!(!t.is_finished());
        gate.release();
        assert!(t.join().unwrap());
    }

    #[test]
    fn a_held_gate_stays_shut_after_release() {
        let gate = Arc::new(PauseGate::default());
        let stop = Arc::new(AtomicBool::new(false));
        gate.hold("vCPU 0: triple fault".into());
        gate.hold("vCPU 1: later".into());
        assert!(gate.requested());
        let (g, s) = (gate.clone(), stop.clone());
        let t = std::thread::spawn(move || g.park_if_requested(&s, &AtomicBool::new(false), || {}));
        while gate.parked_after(Duration::from_millis(10)) == 0 {}
        gate.release();
        assert_eq!(gate.parked_after(Duration::from_millis(50)), 1);
        assert!(!t.is_finished());
        assert_eq!(gate.held().as_deref(), Some("vCPU 0: triple fault"));
        stop.store(true, Ordering::Release);
        gate.wake_all();
        t.join().unwrap();
    }

    #[test]
    fn stop_unparks() {
        let gate = Arc::new(PauseGate::default());
        let stop = Arc::new(AtomicBool::new(false));
        gate.request();
        let (g, s) = (gate.clone(), stop.clone());
        let t = std::thread::spawn(move || g.park_if_requested(&s, &AtomicBool::new(false), || {}));
        while gate.parked_after(Duration::from_millis(10)) == 0 {}
        stop.store(true, Ordering::Release);
        gate.wake_all();
        t.join().unwrap();
    }
}
