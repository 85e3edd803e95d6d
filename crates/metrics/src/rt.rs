//! What the RT timer device did for one VM: expiries delivered and skipped,
//! boosts of vCPU threads, budgets the guest overran, and how late each
//! expiry reached the guest's vCPU. All zero without the device.

use serde::{Deserialize, Serialize};

use crate::primitives::{Counter, Gauge, Histogram, HistogramSnapshot};

/// The counters (atomics: the timer thread records on its hot path).
#[derive(Debug, Default)]
pub struct RtCounters {
    /// Timers armed now, every vCPU together.
    pub armed: Gauge,
    /// Expiries injected into the guest.
    pub expiries: Counter,
    /// Expiries the timer thread reached after the next one was due: skipped.
    pub skipped: Counter,
    /// Expiries that raised a vCPU thread to SCHED_FIFO.
    pub boosts: Counter,
    /// Boosts the guest did not end (DONE) within its budget: withdrawn.
    pub overruns: Counter,
    /// From an expiry's deadline to its interrupt's injection.
    pub injection_late: Histogram,
}

impl RtCounters {
    /// Everything now.
    pub fn snapshot(&self) -> RtSnapshot {
        RtSnapshot {
            armed: self.armed.get(),
            expiries: self.expiries.get(),
            skipped: self.skipped.get(),
            boosts: self.boosts.get(),
            overruns: self.overruns.get(),
            injection_late: self.injection_late.snapshot(),
        }
    }
}

/// [`RtCounters`] at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RtSnapshot {
    pub armed: u64,
    pub expiries: u64,
    pub skipped: u64,
    pub boosts: u64,
    pub overruns: u64,
    pub injection_late: HistogramSnapshot,
}
