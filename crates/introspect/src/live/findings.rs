//! The findings log of one VM: every finding numbered, timestamped, counted in
//! the VM's metrics, logged (at most 100 a second), kept (the last 10000, for
//! `GET /vigil/introspect/findings`) and, when asked, appended to a file.

use std::collections::VecDeque;
use std::path::Path;
use std::time::{Duration, Instant};

use vigil_model::finding::FindingRecord;
use vigil_model::Timestamp;

use super::{lock, IntrospectError, Introspector, JsonLines, Shared};
use crate::Finding;

/// How many findings are kept for `GET /vigil/introspect/findings` (the oldest go
/// first): a guest that keeps changing what is watched must not grow the VMM.
pub const FINDINGS_KEEP: usize = 10_000;
/// How many findings a second go to the log; the rest are counted, and said.
const FINDINGS_LOGGED_PER_S: u32 = 100;

/// This VM's latest findings, in order, and the log's rate limit.
#[derive(Default)]
pub(super) struct FindingLog {
    pub(super) records: VecDeque<FindingRecord>,
    pub(super) last_seq: u64,
    /// The current second of logging: when it began, findings logged in it, and
    /// findings not logged.
    window: Option<Instant>,
    logged: u32,
    unlogged: u64,
}

impl FindingLog {
    fn log(&mut self, finding: &Finding) {
        let now = Instant::now();
        if self
            .window
            .is_none_or(|w| now.duration_since(w) >= Duration::from_secs(1))
        {
            if self.unlogged > 0 {
                tracing::warn!(
                    "introspection: {} more findings not logged (over {FINDINGS_LOGGED_PER_S} a second); GET /vigil/introspect/findings has them",
                    self.unlogged
                );
            }
            (self.window, self.logged, self.unlogged) = (Some(now), 0, 0);
        }
        if self.logged < FINDINGS_LOGGED_PER_S {
            self.logged += 1;
            tracing::warn!(
                rule = finding.rule.as_str(),
                "introspection: {}",
                finding.message
            );
        } else {
            self.unlogged += 1;
        }
    }
}

impl Shared {
    pub(super) fn record(&self, findings: Vec<Finding>) -> Vec<FindingRecord> {
        let mut log = lock(&self.findings);
        let mut out = Vec::with_capacity(findings.len());
        for finding in findings {
            self.counters.count_finding(finding.rule.as_str());
            log.log(&finding);
            log.last_seq += 1;
            let record = FindingRecord {
                seq: log.last_seq,
                time_unix_ns: Timestamp::now().unix_ns(),
                finding,
            };
            if let Some(out) = lock(&self.findings_out).as_mut() {
                out.append(&record);
            }
            if log.records.len() == FINDINGS_KEEP {
                log.records.pop_front();
            }
            log.records.push_back(record.clone());
            out.push(record);
        }
        out
    }
}

impl Introspector {
    /// Appends every finding from now on to `path` as a JSON line (the records of
    /// [`Introspector::findings`]), as it is found.
    pub fn write_findings_to(&self, path: &Path) -> Result<(), IntrospectError> {
        let out = JsonLines::open(path).map_err(IntrospectError::FindingsOutput)?;
        *lock(&self.shared.findings_out) = Some(out);
        Ok(())
    }

    /// Findings with a sequence number above `since` (of the last
    /// [`FINDINGS_KEEP`]).
    pub fn findings(&self, since: u64) -> Vec<FindingRecord> {
        let log = lock(&self.shared.findings);
        log.records
            .iter()
            .filter(|r| r.seq > since)
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::live::tests::shared;
    use vigil_events::Rule;

    fn finding(n: u64) -> Finding {
        let rule = Rule::SyscallMsrWrite;
        Finding {
            rule,
            priority: rule.default_priority(),
            mitre: rule.mitre(),
            vcpu: Some(0),
            location: "LSTAR".into(),
            from: "0x1".into(),
            to: format!("{n:#x}"),
            from_symbol: None,
            symbol: None,
            restored: false,
            message: format!("wrmsr LSTAR {n:#x}"),
        }
    }

    #[test]
    fn the_findings_log_keeps_the_latest_and_counts_them_all() {
        let s = shared();
        let total = FINDINGS_KEEP as u64 + 5;
        for n in 0..total {
            s.record(vec![finding(n)]);
        }
        let log = lock(&s.findings);
        assert_eq!(log.records.len(), FINDINGS_KEEP);
        assert_eq!(log.records.front().unwrap().seq, 6);
        assert_eq!(log.records.back().unwrap().seq, total);
        // Logged at most the per-second budget; the rest counted for the next line.
        assert_eq!(log.logged, FINDINGS_LOGGED_PER_S);
        assert_eq!(log.unlogged, total - u64::from(FINDINGS_LOGGED_PER_S));
        drop(log);
        assert_eq!(s.counters.snapshot().findings["syscall_msr_write"], total);
    }
}
