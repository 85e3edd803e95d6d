//! The RT timer device (`docs/rt-timer.md` is the guest's ABI): each vCPU arms
//! deadlines through I/O ports; at each expiry the timer thread raises the
//! vCPU's thread to SCHED_FIFO for the guest's budget and injects the
//! interrupt as an MSI to that vCPU. The guest ends the boost (DONE) when its
//! handler is done; a boost it overruns is withdrawn and counted.
//!
//! The guest is hostile: at most `max_timers` per vCPU, no period below the
//! floor, budgets capped, and over any stretch of time a vCPU is boosted at most
//! half of it (a credit that refills at half the wall-clock rate), whatever it arms.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_msi;
use kvm_ioctls::{VcpuFd, VmFd};
use vigil_metrics::RtCounters;
use vigil_model::config::{RtTimerConfig, SchedPolicy};

use super::sched::{set_policy, VcpuScheduler};
use crate::vstate::pause::PauseGate;

/// The device's first I/O port.
pub const RT_TIMER_PORT: u16 = 0x620;
/// How many ports it decodes.
pub const RT_TIMER_PORTS: u16 = 32;
/// The CPUID leaf that describes it.
pub const RT_TIMER_LEAF: u32 = 0x4000_0020;
/// What the first register reads: "VRT1".
pub const MAGIC: u32 = 0x3154_5256;

const REG_COMMAND: u16 = 0x00;
const REG_STATUS: u16 = 0x04;
const REG_DEADLINE_LO: u16 = 0x08;
const REG_DEADLINE_HI: u16 = 0x0c;
const REG_PERIOD_NS: u16 = 0x10;
const REG_BUDGET_US: u16 = 0x14;
const REG_FLAGS: u16 = 0x18;
const REG_OVERRUNS: u16 = 0x1c;

const CMD_ARM: u32 = 1;
const CMD_CANCEL: u32 = 2;
const CMD_DONE: u32 = 3;

const FLAG_RELATIVE: u32 = 1 << 8;

/// Farthest deadline a guest may arm.
const MAX_AHEAD: Duration = Duration::from_secs(10);
/// How long before an expiry the timer thread stops sleeping and spins.
const SPIN_AHEAD: Duration = Duration::from_micros(50);
/// The share of time a vCPU may spend boosted, over any stretch.
const BOOST_SHARE: f64 = 0.5;
const IA32_TSC: u32 = 0x10;

/// A command's outcome, as the status register reads it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
enum Status {
    Ok = 0,
    BadTimer = 1,
    PeriodTooShort = 2,
    BudgetTooLarge = 3,
    BadVector = 4,
    BadCommand = 5,
    TooFar = 6,
}

/// What a vCPU writes before ARM.
#[derive(Clone, Copy, Debug, Default)]
struct Staging {
    index: u32,
    deadline: u64,
    period_ns: u32,
    budget_us: u32,
    flags: u32,
}

/// How the guest's TSC reads against the host's: `guest = host + offset`, at
/// `khz` (KVM does not scale the TSC of a VM built here).
#[derive(Clone, Copy, Debug)]
struct GuestClock {
    offset: i64,
    khz: u32,
}

impl GuestClock {
    fn now(&self) -> u64 {
        host_tsc().wrapping_add_signed(self.offset)
    }

    fn ticks(&self, ns: u64) -> u64 {
        u64::try_from(u128::from(ns) * u128::from(self.khz) / 1_000_000).unwrap_or(u64::MAX)
    }

    fn ns(&self, ticks: u64) -> u64 {
        u64::try_from(u128::from(ticks) * 1_000_000 / u128::from(self.khz.max(1)))
            .unwrap_or(u64::MAX)
    }
}

fn host_tsc() -> u64 {
    // SAFETY: rdtsc reads the time-stamp counter; it has no memory effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// An armed timer. Deadlines are kept in the guest's TSC, the clock the guest
/// set them in: each wait is converted to host time afresh, so no error between
/// the two clocks' rates accumulates over periods.
#[derive(Clone, Copy, Debug)]
struct Timer {
    /// The first deadline (guest TSC).
    first: u64,
    /// Expiries so far: the next deadline is `first + k` periods.
    k: u64,
    period_ns: Option<u64>,
    budget: Duration,
    vector: u8,
}

impl Timer {
    fn next(&self, clock: &GuestClock) -> u64 {
        let period = self.period_ns.unwrap_or(0);
        let ahead = u128::from(self.k) * u128::from(period) * u128::from(clock.khz) / 1_000_000;
        self.first
            .saturating_add(u64::try_from(ahead).unwrap_or(u64::MAX))
    }
}

#[derive(Debug)]
struct VcpuTimers {
    staging: Staging,
    status: Status,
    /// Measured at this vCPU's last ARM.
    clock: Option<GuestClock>,
    timers: Vec<Option<Timer>>,
    /// Boosted until then (none: not boosted).
    boost_until: Option<Instant>,
    /// The guest wrote DONE: the timer thread ends the boost.
    done: bool,
    /// Boost time left to grant, refilled at [`BOOST_SHARE`] of wall time.
    credit: Duration,
    credit_at: Instant,
    overruns: u32,
}

#[derive(Debug)]
struct State {
    vcpus: Vec<VcpuTimers>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The device, shared by the vCPU threads (registers) and its timer thread.
#[derive(Debug)]
pub struct RtTimer {
    config: RtTimerConfig,
    state: Mutex<State>,
    wake: Condvar,
    sched: Arc<VcpuScheduler>,
    counters: Arc<RtCounters>,
    stop: AtomicBool,
}

impl RtTimer {
    /// The device for `vcpus` vCPUs, boosting through `sched`.
    pub fn new(
        config: RtTimerConfig,
        vcpus: u32,
        sched: Arc<VcpuScheduler>,
        counters: Arc<RtCounters>,
    ) -> Self {
        let now = Instant::now();
        let max_credit = Self::max_credit(&config);
        Self {
            state: Mutex::new(State {
                vcpus: (0..vcpus)
                    .map(|_| VcpuTimers {
                        staging: Staging::default(),
                        status: Status::Ok,
                        clock: None,
                        timers: vec![None; config.max_timers as usize],
                        boost_until: None,
                        done: false,
                        credit: max_credit,
                        credit_at: now,
                        overruns: 0,
                    })
                    .collect(),
            }),
            config,
            wake: Condvar::new(),
            sched,
            counters,
            stop: AtomicBool::new(false),
        }
    }

    fn max_credit(config: &RtTimerConfig) -> Duration {
        Duration::from_micros(2 * u64::from(config.max_budget_us))
    }

    /// The CPUID leaf's registers: port base, timers per vCPU, shortest period
    /// (µs), longest budget (µs).
    pub fn cpuid(config: &RtTimerConfig) -> [u32; 4] {
        [
            u32::from(RT_TIMER_PORT),
            config.max_timers,
            config.min_period_us,
            config.max_budget_us,
        ]
    }

    /// Whether `port` is one of the device's.
    pub fn claims(port: u16) -> bool {
        (RT_TIMER_PORT..RT_TIMER_PORT + RT_TIMER_PORTS).contains(&port)
    }

    /// A guest `in` on vCPU `vcpu`.
    pub fn read(&self, vcpu: u32, port: u16, data: &mut [u8]) {
        let value = if data.len() != 4 {
            u32::MAX
        } else {
            let state = lock(&self.state);
            match (port - RT_TIMER_PORT, state.vcpus.get(vcpu as usize)) {
                (REG_COMMAND, _) => MAGIC,
                (REG_STATUS, Some(v)) => v.status as u32,
                (REG_OVERRUNS, Some(v)) => v.overruns,
                _ => u32::MAX,
            }
        };
        let bytes = value.to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&bytes[..n]);
    }

    /// A guest `out` on vCPU `vcpu`, whose fd reads the guest's TSC for ARM.
    pub fn write(&self, vcpu: u32, fd: &VcpuFd, port: u16, data: &[u8]) {
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return; // dword accesses only
        };
        let value = u32::from_le_bytes(bytes);
        let offset = port - RT_TIMER_PORT;
        if offset == REG_COMMAND && value == CMD_DONE {
            self.done(vcpu);
            return;
        }
        // The guest's TSC is read before the lock: an ioctl on this vCPU.
        let guest_now = (offset == REG_COMMAND && value == CMD_ARM).then(|| guest_clock(fd));
        let mut state = lock(&self.state);
        let Some(v) = state.vcpus.get_mut(vcpu as usize) else {
            return;
        };
        match offset {
            REG_STATUS => v.staging.index = value,
            REG_DEADLINE_LO => {
                v.staging.deadline = (v.staging.deadline & !0xffff_ffff) | u64::from(value)
            }
            REG_DEADLINE_HI => {
                v.staging.deadline = (v.staging.deadline & 0xffff_ffff) | (u64::from(value) << 32)
            }
            REG_PERIOD_NS => v.staging.period_ns = value,
            REG_BUDGET_US => v.staging.budget_us = value,
            REG_FLAGS => v.staging.flags = value,
            REG_COMMAND => {
                v.status = match value {
                    CMD_ARM => self.arm(v, guest_now.flatten()),
                    CMD_CANCEL => match v.timers.get_mut(v.staging.index as usize) {
                        Some(t) => {
                            *t = None;
                            Status::Ok
                        }
                        None => Status::BadTimer,
                    },
                    _ => Status::BadCommand,
                };
                self.count_armed(&state);
                drop(state);
                self.wake.notify_one();
            }
            _ => {}
        }
    }

    /// Checks the staging registers and arms the timer they name.
    fn arm(&self, v: &mut VcpuTimers, clock: Option<GuestClock>) -> Status {
        let s = v.staging;
        if s.index as usize >= v.timers.len() {
            return Status::BadTimer;
        }
        let vector = s.flags & 0xff;
        if vector < 32 {
            return Status::BadVector;
        }
        let min_period = u64::from(self.config.min_period_us) * 1000;
        if s.period_ns != 0 && u64::from(s.period_ns) < min_period {
            return Status::PeriodTooShort;
        }
        let budget = Duration::from_micros(u64::from(s.budget_us));
        // A one-shot timer counts as one at the shortest period.
        let period_ns = if s.period_ns == 0 {
            min_period
        } else {
            u64::from(s.period_ns)
        };
        let share = |budget: Duration, period_ns: u64| budget.as_nanos() as f64 / period_ns as f64;
        let others: f64 = v
            .timers
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != s.index as usize)
            .filter_map(|(_, t)| t.as_ref())
            .map(|t| share(t.budget, t.period_ns.unwrap_or(min_period)))
            .sum();
        if s.budget_us > self.config.max_budget_us
            || others + share(budget, period_ns) > BOOST_SHARE
        {
            return Status::BudgetTooLarge;
        }
        let Some(clock) = clock.or(v.clock) else {
            return Status::TooFar; // no clock to convert with
        };
        let now = clock.now();
        let first = if s.flags & FLAG_RELATIVE != 0 {
            now.saturating_add(clock.ticks(s.deadline))
        } else {
            s.deadline
        };
        if clock.ns(first.saturating_sub(now)) > MAX_AHEAD.as_nanos() as u64 {
            return Status::TooFar;
        }
        v.clock = Some(clock);
        v.timers[s.index as usize] = Some(Timer {
            first,
            k: 0,
            period_ns: (s.period_ns != 0).then_some(u64::from(s.period_ns)),
            budget,
            vector: vector as u8,
        });
        Status::Ok
    }

    fn count_armed(&self, state: &State) {
        let armed = state.vcpus.iter().flat_map(|v| &v.timers).flatten().count();
        self.counters.armed.set(armed as u64);
    }

    /// The guest's handler on vCPU `vcpu` is done: its boost ends, the time left
    /// of it goes back to its credit.
    fn done(&self, vcpu: u32) {
        let mut state = lock(&self.state);
        let Some(v) = state.vcpus.get_mut(vcpu as usize) else {
            return;
        };
        let Some(until) = v.boost_until.take() else {
            return;
        };
        v.credit += until.saturating_duration_since(Instant::now());
        // The timer thread lowers the vCPU thread: done here, the thread would lose
        // the CPU before it reaches `hlt`, perhaps while holding the state lock.
        v.done = true;
        drop(state);
        self.wake.notify_one();
    }

    /// Starts the timer thread; it ends when [`RtTimer::stop`] is called.
    pub fn start(
        self: &Arc<Self>,
        vm_fd: Weak<VmFd>,
        pause: Arc<PauseGate>,
    ) -> std::io::Result<JoinHandle<()>> {
        let me = self.clone();
        std::thread::Builder::new()
            .name("rt-timer".into())
            .spawn(move || {
                vigil_seccomp::confine(vigil_seccomp::ThreadKind::RtTimer);
                me.run(&vm_fd, &pause)
            })
    }

    /// Ends the timer thread.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        let _guard = lock(&self.state);
        self.wake.notify_all();
    }

    fn run(&self, vm_fd: &Weak<VmFd>, pause: &PauseGate) {
        // Above the boosted vCPUs, so that expiries are served on time.
        let priority = self.config.priority.saturating_add(1);
        if let Err(e) = set_policy(0, &SchedPolicy::Fifo { priority }) {
            tracing::warn!("rt timer: its thread stays time-shared (SCHED_FIFO {priority}: {e}); expiries may be late under load");
        }
        // Away from the pinned vCPUs: its spinning must not take their CPU.
        if let Err(e) = super::sched::set_affinity(0, &self.sched.free_cpus()) {
            tracing::warn!("rt timer: cannot keep its thread off the vCPUs' CPUs: {e}");
        }
        let mut state = lock(&self.state);
        while !self.stop.load(Ordering::Acquire) {
            let now = Instant::now();
            let mut next: Option<Instant> = None;
            let paused = pause.requested();
            for (id, v) in state.vcpus.iter_mut().enumerate() {
                let id = id as u32;
                if std::mem::take(&mut v.done) && v.boost_until.is_none() {
                    self.sched.unboost(id);
                }
                if v.boost_until.is_some_and(|u| u <= now) {
                    v.boost_until = None;
                    if self.sched.unboost(id) {
                        v.overruns = v.overruns.saturating_add(1);
                        self.counters.overruns.inc();
                        if v.overruns == 1 || v.overruns % 1000 == 0 {
                            tracing::warn!(
                                vcpu = id,
                                overruns = v.overruns,
                                "rt timer: the guest overran its budget; the boost was withdrawn"
                            );
                        }
                    }
                }
                let refill = now
                    .saturating_duration_since(v.credit_at)
                    .mul_f64(BOOST_SHARE);
                v.credit = (v.credit + refill).min(Self::max_credit(&self.config));
                v.credit_at = now;
                let Some(clock) = v.clock else { continue };
                let guest_now = clock.now();
                for i in 0..v.timers.len() {
                    let Some(mut t) = v.timers[i] else { continue };
                    let due = t.next(&clock);
                    if due <= guest_now {
                        let late = Duration::from_nanos(clock.ns(guest_now - due));
                        if !paused {
                            self.expire(vm_fd, id, v, &t, now, late);
                        }
                        match t.period_ns {
                            None => {
                                v.timers[i] = None;
                                continue;
                            }
                            Some(period_ns) => {
                                // The next grid point after now; those between were missed.
                                let behind = late.as_nanos() as u64 / period_ns.max(1);
                                if behind > 0 || paused {
                                    self.counters.skipped.add(behind + u64::from(paused));
                                }
                                t.k = t.k.saturating_add(behind + 1);
                                v.timers[i] = Some(t);
                            }
                        }
                    }
                    let wait =
                        Duration::from_nanos(clock.ns(t.next(&clock).saturating_sub(guest_now)));
                    let at = now + wait;
                    next = Some(next.map_or(at, |n| n.min(at)));
                }
                if let Some(until) = v.boost_until {
                    next = Some(next.map_or(until, |n| n.min(until)));
                }
            }
            self.count_armed(&state);
            state = match next {
                None => self.wake.wait(state).unwrap_or_else(|e| e.into_inner()),
                Some(at) => {
                    let wait = at.saturating_duration_since(Instant::now());
                    if wait.is_zero() {
                        continue;
                    }
                    if wait <= SPIN_AHEAD {
                        // The last stretch spun, without the lock: a sleeping thread's
                        // wake-up is late by tens of µs here (a nested host), and more.
                        drop(state);
                        while Instant::now() < at && !self.stop.load(Ordering::Relaxed) {
                            std::hint::spin_loop();
                        }
                        lock(&self.state)
                    } else {
                        self.wake
                            .wait_timeout(state, wait - SPIN_AHEAD)
                            .unwrap_or_else(|e| e.into_inner())
                            .0
                    }
                }
            };
        }
        let vcpus = state.vcpus.len() as u32;
        drop(state);
        for id in 0..vcpus {
            self.sched.unboost(id);
        }
    }

    /// One expiry of `t` on vCPU `id`: boost (within the vCPU's credit), then
    /// the interrupt.
    fn expire(
        &self,
        vm_fd: &Weak<VmFd>,
        id: u32,
        v: &mut VcpuTimers,
        t: &Timer,
        now: Instant,
        late: Duration,
    ) {
        let grant = t.budget.min(v.credit);
        if v.boost_until.is_none() && !grant.is_zero() && self.sched.boost(id, self.config.priority)
        {
            v.credit -= grant;
            v.boost_until = Some(now + grant);
            self.counters.boosts.inc();
        }
        let Some(vm) = vm_fd.upgrade() else { return };
        let msi = kvm_msi {
            // Fixed delivery, physical destination: the vCPU's APIC id (its index).
            address_lo: 0xfee0_0000 | (id << 12),
            address_hi: 0,
            data: u32::from(t.vector),
            ..Default::default()
        };
        match vm.signal_msi(msi) {
            Ok(_) => {
                self.counters.expiries.inc();
                self.counters.injection_late.record(late + now.elapsed());
            }
            Err(e) => tracing::warn!(
                vcpu = id,
                "rt timer: cannot inject vector {}: {e}",
                t.vector
            ),
        }
    }
}

/// How the guest's TSC reads against the host's, from KVM (the guest's TSC MSR)
/// bracketed by two host TSC reads; tried again while the bracket is wide (the
/// thread may be preempted in between: it is not boosted when it arms). None
/// when KVM cannot say.
fn guest_clock(fd: &VcpuFd) -> Option<GuestClock> {
    const TIGHT_TICKS: u64 = 20_000;
    let khz = fd.get_tsc_khz().ok()?;
    let mut best: Option<(i64, u64)> = None;
    for _ in 0..16 {
        let mut msrs = kvm_bindings::Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
            index: IA32_TSC,
            ..Default::default()
        }])
        .ok()?;
        let before = host_tsc();
        let read = fd.get_msrs(&mut msrs).ok()?;
        let after = host_tsc();
        if read != 1 {
            return None;
        }
        let width = after.wrapping_sub(before);
        let host = before.wrapping_add(width / 2);
        let offset = msrs.as_slice()[0].data.wrapping_sub(host) as i64;
        if best.is_none_or(|(_, w)| width < w) {
            best = Some((offset, width));
        }
        if width <= TIGHT_TICKS {
            break;
        }
    }
    best.map(|(offset, _)| GuestClock { offset, khz })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vigil_model::config::VcpuSched;

    fn device(config: RtTimerConfig) -> RtTimer {
        let sched = VcpuScheduler::new(vec![VcpuSched::default()]).unwrap();
        RtTimer::new(config, 1, Arc::new(sched), Arc::default())
    }

    fn stage(t: &RtTimer, index: u32, period_ns: u32, budget_us: u32, flags: u32) -> Status {
        let mut state = lock(&t.state);
        let v = &mut state.vcpus[0];
        v.staging = Staging {
            index,
            deadline: 1_000_000,
            period_ns,
            budget_us,
            flags,
        };
        t.arm(
            v,
            Some(GuestClock {
                offset: 0,
                khz: 1_000_000,
            }),
        )
    }

    #[test]
    fn arm_checks_every_limit() {
        let t = device(RtTimerConfig::default());
        let rel = FLAG_RELATIVE | 0x40;
        assert_eq!(stage(&t, 9, 1_000_000, 100, rel), Status::BadTimer);
        assert_eq!(
            stage(&t, 0, 1_000_000, 100, FLAG_RELATIVE | 3),
            Status::BadVector
        );
        assert_eq!(stage(&t, 0, 50_000, 10, rel), Status::PeriodTooShort);
        assert_eq!(stage(&t, 0, 1_000_000, 501, rel), Status::BudgetTooLarge);
        // Half of each period at most, all timers of the vCPU together.
        assert_eq!(stage(&t, 0, 1_000_000, 400, rel), Status::Ok);
        assert_eq!(stage(&t, 1, 1_000_000, 200, rel), Status::BudgetTooLarge);
        assert_eq!(stage(&t, 1, 1_000_000, 100, rel), Status::Ok);
        // Re-arming a timer replaces its own share.
        assert_eq!(stage(&t, 0, 1_000_000, 400, rel), Status::Ok);
        assert_eq!(lock(&t.state).vcpus[0].timers.iter().flatten().count(), 2);
        // Deadlines more than 10 s ahead are refused (1 GHz: ticks are ns).
        let mut state = lock(&t.state);
        state.vcpus[0].staging.deadline = 11_000_000_000;
        state.vcpus[0].staging.flags = rel;
        state.vcpus[0].staging.budget_us = 0;
        assert_eq!(t.arm(&mut state.vcpus[0], None), Status::TooFar);
        // A clock is needed to convert with: none was measured on this device.
        let fresh = device(RtTimerConfig::default());
        let mut fresh_state = lock(&fresh.state);
        fresh_state.vcpus[0].staging.flags = rel;
        assert_eq!(fresh.arm(&mut fresh_state.vcpus[0], None), Status::TooFar);
    }

    #[test]
    fn registers_read_per_vcpu() {
        let t = device(RtTimerConfig::default());
        let mut data = [0u8; 4];
        t.read(0, RT_TIMER_PORT, &mut data);
        assert_eq!(u32::from_le_bytes(data), MAGIC);
        lock(&t.state).vcpus[0].status = Status::BudgetTooLarge;
        t.read(0, RT_TIMER_PORT + REG_STATUS, &mut data);
        assert_eq!(u32::from_le_bytes(data), 3);
        // Another vCPU, or a byte access, reads all ones.
        t.read(5, RT_TIMER_PORT + REG_STATUS, &mut data);
        assert_eq!(u32::from_le_bytes(data), u32::MAX);
        let mut byte = [0u8; 1];
        t.read(0, RT_TIMER_PORT, &mut byte);
        assert_eq!(byte[0], 0xff);
    }
}
