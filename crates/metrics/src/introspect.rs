//! What introspection did for one VM: integrity checks, findings, MSR writes the
//! guard saw, system calls traced. Present on every VM; all zero until
//! monitoring or tracing is turned on.

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use crate::primitives::{Counter, Gauge, Histogram, HistogramSnapshot};

/// The counters. Findings are rare, so their per-rule counts sit behind a lock;
/// everything on a hot path (a traced system call) is an atomic.
#[derive(Debug, Default)]
pub struct IntrospectCounters {
    /// 1 while the integrity monitor runs.
    pub monitoring: Gauge,
    /// 1 while system calls are traced.
    pub tracing: Gauge,
    /// Integrity checks done (the baseline not counted).
    pub checks: Counter,
    /// How long each check took.
    pub check_time: Histogram,
    /// Guest pages re-hashed by checks (those the dirty log said were written).
    pub pages_hashed: Counter,
    /// Guest writes to guarded MSRs that were let through.
    pub msr_writes_allowed: Counter,
    /// Guest writes to guarded MSRs that were refused (the `protect` policy).
    pub msr_writes_refused: Counter,
    /// System calls seen by the tracer (before its filter).
    pub syscalls_seen: Counter,
    /// System calls that passed the filter and were recorded.
    pub syscalls_traced: Counter,
    /// Recorded calls whose return was not seen (their caller's stack did not
    /// read, or another call entered on that vCPU first).
    pub syscalls_unreturned: Counter,
    findings: Mutex<BTreeMap<String, u64>>,
}

impl IntrospectCounters {
    /// Counts one finding of `rule`.
    pub fn count_finding(&self, rule: &str) {
        let mut f = self.findings.lock().unwrap_or_else(|e| e.into_inner());
        *f.entry(rule.to_owned()).or_default() += 1;
    }

    /// Everything now.
    pub fn snapshot(&self) -> IntrospectSnapshot {
        IntrospectSnapshot {
            monitoring: self.monitoring.get() != 0,
            tracing: self.tracing.get() != 0,
            checks: self.checks.get(),
            check_time: self.check_time.snapshot(),
            pages_hashed: self.pages_hashed.get(),
            msr_writes_allowed: self.msr_writes_allowed.get(),
            msr_writes_refused: self.msr_writes_refused.get(),
            syscalls_seen: self.syscalls_seen.get(),
            syscalls_traced: self.syscalls_traced.get(),
            syscalls_unreturned: self.syscalls_unreturned.get(),
            findings: self
                .findings
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        }
    }
}

/// [`IntrospectCounters`] at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntrospectSnapshot {
    pub monitoring: bool,
    pub tracing: bool,
    pub checks: u64,
    pub check_time: HistogramSnapshot,
    pub pages_hashed: u64,
    pub msr_writes_allowed: u64,
    pub msr_writes_refused: u64,
    pub syscalls_seen: u64,
    pub syscalls_traced: u64,
    #[serde(default)]
    pub syscalls_unreturned: u64,
    /// Findings by rule id.
    pub findings: BTreeMap<String, u64>,
}

impl IntrospectSnapshot {
    /// Findings of every rule together.
    pub fn findings_total(&self) -> u64 {
        self.findings.values().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_findings_by_rule() {
        let c = IntrospectCounters::default();
        c.count_finding("idt_entry_modified");
        c.count_finding("idt_entry_modified");
        c.count_finding("syscall_msr_changed");
        c.checks.inc();
        c.check_time.record_ns(1500);
        let s = c.snapshot();
        assert_eq!(s.findings["idt_entry_modified"], 2);
        assert_eq!(s.findings_total(), 3);
        assert_eq!(s.checks, 1);
        assert_eq!(s.check_time.count, 1);
        assert!(!s.monitoring);
    }
}
