//! What the memory-compression pager did for one VM (`--memory-compression`):
//! pages compressed, stored as zero, deduplicated, restored on a fault, the
//! pool they take, how long a fault-in took and the CPU the pager spent. All
//! zero while it is off.

use serde::{Deserialize, Serialize};

use crate::primitives::{Counter, Gauge, Histogram, HistogramSnapshot};

/// The counters (atomics: the pager's threads record, readers snapshot).
#[derive(Debug, Default)]
pub struct PagerCounters {
    /// The pager runs for this VM.
    pub enabled: Gauge,
    /// Pages held out of guest RAM now, every kind together.
    pub pages_held: Gauge,
    /// Of those, pages of zeros (a marker, no bytes).
    pub zero_pages_held: Gauge,
    /// Of those, pages whose bytes another held page already stores.
    pub duplicate_pages_held: Gauge,
    /// Bytes of compressed data in the pool now.
    pub pool_bytes: Gauge,
    /// Guest memory in RAM (this process's own pages, not the shared zero
    /// page) as the scanner last counted it, bytes.
    pub resident_bytes: Gauge,
    /// Pages taken out of guest RAM (compressed, zero or duplicate), ever.
    pub pages_compressed: Counter,
    /// Of those, pages of zeros.
    pub pages_zero: Counter,
    /// Of those, pages identical to one the pool already held.
    pub pages_deduplicated: Counter,
    /// Cold pages left in RAM because they did not compress (random data).
    pub pages_incompressible: Counter,
    /// Pages written while being compressed: left in RAM, the write kept.
    pub pages_raced: Counter,
    /// Pages put back on a fault (by a vCPU or a VMM thread).
    pub pages_restored: Counter,
    /// From reading a fault to the page being back, per fault.
    pub fault_in: Histogram,
    /// CPU time of the pager's threads, ns.
    pub cpu_ns: Counter,
}

impl PagerCounters {
    /// Everything now.
    pub fn snapshot(&self) -> PagerSnapshot {
        let held = self.pages_held.get();
        let pool = self.pool_bytes.get();
        let fault_in = self.fault_in.snapshot();
        PagerSnapshot {
            enabled: self.enabled.get() != 0,
            pages_held: held,
            zero_pages_held: self.zero_pages_held.get(),
            duplicate_pages_held: self.duplicate_pages_held.get(),
            pool_bytes: pool,
            resident_bytes: self.resident_bytes.get(),
            footprint_bytes: self.resident_bytes.get() + pool,
            bytes_saved: (held * PAGE).saturating_sub(pool),
            ratio_percent: (held * PAGE * 100).checked_div(pool),
            pages_compressed: self.pages_compressed.get(),
            pages_zero: self.pages_zero.get(),
            pages_deduplicated: self.pages_deduplicated.get(),
            pages_incompressible: self.pages_incompressible.get(),
            pages_raced: self.pages_raced.get(),
            pages_restored: self.pages_restored.get(),
            fault_in_p50_ns: fault_in.quantile_bound_ns(0.5),
            fault_in_p99_ns: fault_in.quantile_bound_ns(0.99),
            fault_in,
            cpu_ns: self.cpu_ns.get(),
        }
    }
}

const PAGE: u64 = 4096;

/// [`PagerCounters`] at one moment, with what follows from them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PagerSnapshot {
    pub enabled: bool,
    pub pages_held: u64,
    pub zero_pages_held: u64,
    pub duplicate_pages_held: u64,
    pub pool_bytes: u64,
    /// Guest memory in RAM at the scanner's last count.
    #[serde(default)]
    pub resident_bytes: u64,
    /// `resident_bytes` and the pool: what an RSS target bounds.
    #[serde(default)]
    pub footprint_bytes: u64,
    /// Guest bytes held out of RAM less the pool they take.
    pub bytes_saved: u64,
    /// Guest bytes held per pool byte, in percent (absent with an empty pool:
    /// zero pages alone take no pool).
    pub ratio_percent: Option<u64>,
    pub pages_compressed: u64,
    pub pages_zero: u64,
    pub pages_deduplicated: u64,
    pub pages_incompressible: u64,
    pub pages_raced: u64,
    pub pages_restored: u64,
    /// Upper bounds of the fault-in latency's median and 99th percentile.
    pub fault_in_p50_ns: Option<u64>,
    pub fault_in_p99_ns: Option<u64>,
    pub fault_in: HistogramSnapshot,
    pub cpu_ns: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_bytes_and_ratio_follow_from_the_pool() {
        let c = PagerCounters::default();
        assert_eq!(c.snapshot().ratio_percent, None);
        c.pages_held.set(10);
        c.zero_pages_held.set(6);
        c.pool_bytes.set(2048);
        c.resident_bytes.set(8192);
        c.fault_in.record_ns(10_000);
        let s = c.snapshot();
        assert_eq!(s.footprint_bytes, 8192 + 2048);
        assert_eq!(s.bytes_saved, 10 * 4096 - 2048);
        assert_eq!(s.ratio_percent, Some(2000));
        assert_eq!(s.fault_in_p50_ns, Some(16384));
    }
}
