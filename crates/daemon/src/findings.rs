//! Introspection findings into the security event stream.
//!
//! Each VM's `vigil run` keeps its integrity findings in order (`GET
//! /vigil/introspect/findings?since=N` on its API socket, sequence numbers 1, 2,
//! 3, ...) and counts them in its metrics snapshot (`introspection.findings`). The
//! sampler compares that count with the last sequence number it turned into events
//! for the VM; when it grew, it fetches the findings after that number and emits
//! one event each ([`finding_event`]). A fetch that fails leaves the number where it
//! was, so the next tick asks again: nothing is lost, nothing is sent twice.
//!
//! The daemon also starts every VM with `--findings-path` in its folder
//! ([`FINDINGS_FILE`]): once a VM has ended (its socket is gone), the findings it
//! made after the last fetch are read from there, once ([`FindingCursors::drain`]).

use std::collections::HashMap;

use serde::Deserialize;
use vigil_events::{Event, Rule, Timestamp};
pub use vigil_model::finding::FindingRecord;

/// Where a VM's process appends its findings as JSON lines, in its folder.
pub const FINDINGS_FILE: &str = "findings.jsonl";

/// The path of a VM's findings on its API socket (`?since=N` appended).
pub const VM_FINDINGS_PATH: &str = "/vigil/introspect/findings";

/// The security event of one finding of VM `vm_id`: the finding's rule (source
/// `vm`, the rule's tags and ATT&CK technique), its priority, its time and
/// message, and the record's details as `introspect.*` fields.
pub fn finding_event(vm_id: &str, r: &FindingRecord) -> Event {
    let f = &r.finding;
    let time = if r.time_unix_ns > 0 {
        Timestamp::from_unix_ns(r.time_unix_ns)
    } else {
        Timestamp::now()
    };
    let message = if f.message.is_empty() {
        format!("vm {vm_id}: {} at {}", f.rule, f.location)
    } else {
        format!("vm {vm_id}: {}", f.message)
    };
    let mut e = Event::new(f.rule, time, message)
        .with_vm(vm_id)
        .with_priority(f.priority)
        .with_field("introspect.seq", r.seq)
        .with_field("introspect.location", f.location.as_str())
        .with_field("introspect.from", f.from.as_str())
        .with_field("introspect.to", f.to.as_str())
        .with_field("introspect.restored", f.restored);
    if let Some(v) = f.vcpu {
        e = e.with_field("introspect.vcpu", v);
    }
    if let Some(s) = &f.symbol {
        e = e.with_field("introspect.symbol", s.as_str());
    }
    if let Some(s) = &f.from_symbol {
        e = e.with_field("introspect.from_symbol", s.as_str());
    }
    // The MSR guard's verdict is the end of its message: `...: refused` under
    // policy=protect, `...: let through` under report.
    if f.rule == Rule::SyscallMsrWrite {
        e = e.with_field("introspect.refused", f.message.ends_with(": refused"));
    }
    e
}

/// The records among `values` (a VM's answer, or the lines of its file); one
/// this daemon cannot read (a rule from a newer VMM) is skipped and said.
pub fn parse_records(values: impl IntoIterator<Item = serde_json::Value>) -> Vec<FindingRecord> {
    values
        .into_iter()
        .filter_map(|v| match FindingRecord::deserialize(&v) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(seq = %v["seq"], "an introspection finding this daemon cannot read, not reported: {e}");
                None
            }
        })
        .collect()
}

/// Per VM, the last finding turned into an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cursor {
    /// The VMM process the numbers belong to (a VM of the same id started later
    /// numbers its findings from 1 again).
    pid: Option<u32>,
    last_seq: u64,
    /// The VM has ended and its findings file was read.
    drained: bool,
}

/// The sampler's bookkeeping: which findings of which VM were already emitted.
#[derive(Debug, Default)]
pub struct FindingCursors {
    vms: HashMap<String, Cursor>,
}

impl FindingCursors {
    /// Whether VM `id` (process `pid`) has findings not yet emitted, given the
    /// total its metrics snapshot counts: `Some(since)` to fetch those after
    /// `since`.
    pub fn due(&mut self, id: &str, pid: Option<u32>, total: u64) -> Option<u64> {
        let cursor = self.vms.entry(id.to_owned()).or_insert(Cursor {
            pid,
            last_seq: 0,
            drained: false,
        });
        if cursor.pid != pid {
            *cursor = Cursor {
                pid,
                last_seq: 0,
                drained: false,
            };
        }
        (total > cursor.last_seq).then_some(cursor.last_seq)
    }

    /// The findings fetched for VM `id` were emitted: the next fetch starts after
    /// the highest sequence number among them.
    pub fn advance(&mut self, id: &str, pid: Option<u32>, records: &[FindingRecord]) {
        let Some(max) = records.iter().map(|r| r.seq).max() else {
            return;
        };
        let cursor = self.vms.entry(id.to_owned()).or_insert(Cursor {
            pid,
            last_seq: 0,
            drained: false,
        });
        if cursor.pid == pid {
            cursor.last_seq = cursor.last_seq.max(max);
        }
    }

    /// VM `id` has ended: the first time, `Some(since)`, to read the findings its
    /// process wrote to its findings file after those already emitted; `None`
    /// after that.
    pub fn drain(&mut self, id: &str) -> Option<u64> {
        let cursor = self.vms.entry(id.to_owned()).or_insert(Cursor {
            pid: None,
            last_seq: 0,
            drained: false,
        });
        if cursor.drained {
            return None;
        }
        cursor.drained = true;
        Some(cursor.last_seq)
    }

    /// The last sequence number emitted for VM `id`.
    pub fn last_seq(&self, id: &str) -> Option<u64> {
        self.vms.get(id).map(|c| c.last_seq)
    }

    /// Forgets the VMs not in `ids` (destroyed).
    pub fn retain<'a>(&mut self, ids: impl IntoIterator<Item = &'a str>) {
        let keep: std::collections::HashSet<&str> = ids.into_iter().collect();
        self.vms.retain(|id, _| keep.contains(id.as_str()));
    }

    /// How many VMs it tracks.
    pub fn len(&self) -> usize {
        self.vms.len()
    }

    pub fn is_empty(&self) -> bool {
        self.vms.is_empty()
    }
}

/// The records of a findings file (JSON lines); lines that are not one are
/// skipped with a warning.
pub fn parse_findings_file(text: &str) -> Vec<FindingRecord> {
    parse_records(
        text.lines()
            .filter(|l| !l.trim().is_empty())
            .filter_map(|l| match serde_json::from_str(l) {
                Ok(v) => Some(v),
                Err(e) => {
                    tracing::warn!("a findings file line that is not JSON: {e}");
                    None
                }
            }),
    )
}

/// Keeps the records after `since`, in order, dropping any seen twice (a VM that
/// answered with more than asked for).
pub fn after(since: u64, mut records: Vec<FindingRecord>) -> Vec<FindingRecord> {
    records.retain(|r| r.seq > since);
    records.sort_by_key(|r| r.seq);
    records.dedup_by_key(|r| r.seq);
    records
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use vigil_events::{Priority, Source};

    fn record(v: serde_json::Value) -> FindingRecord {
        serde_json::from_value(v).unwrap()
    }

    fn event(v: serde_json::Value) -> Event {
        finding_event("a", &record(v))
    }

    /// A record as `GET /vigil/introspect/findings` serves it.
    fn table_record(seq: u64) -> serde_json::Value {
        json!({
            "seq": seq,
            "time_unix_ns": 1_700_000_000_123_456_789u64,
            "rule": "syscall_table_modified",
            "priority": "Critical",
            "mitre": {"technique": "T1014", "name": "Rootkit", "tactic_tag": "mitre_defense_evasion"},
            "vcpu": null,
            "location": "sys_call_table[1]",
            "from": "0xffffffff81001000",
            "to": "0xffffffff81002000",
            "from_symbol": "sys_vigil_1",
            "symbol": "rootkit_sys_hook",
            "restored": false,
            "message": "sys_call_table[1]: 0xffffffff81001000 <sys_vigil_1> -> 0xffffffff81002000 <rootkit_sys_hook>"
        })
    }

    #[test]
    fn a_record_becomes_an_event() {
        let e = finding_event("web-1", &record(table_record(3)));
        assert_eq!(e.rule, Rule::SyscallTableModified);
        assert_eq!(e.source, Source::Vm);
        assert_eq!(e.priority, Priority::Critical);
        assert_eq!(e.vm_id.as_deref(), Some("web-1"));
        assert_eq!(e.time, Timestamp::from_unix_ns(1_700_000_000_123_456_789));
        assert!(
            e.message.starts_with("vm web-1: sys_call_table[1]: "),
            "{}",
            e.message
        );
        assert!(e.tags.contains(&"T1014".to_owned()), "{:?}", e.tags);
        assert!(e.tags.contains(&"mitre_defense_evasion".to_owned()));
        let f = &e.fields;
        assert_eq!(f["introspect.seq"], json!(3));
        assert_eq!(f["introspect.location"], json!("sys_call_table[1]"));
        assert_eq!(f["introspect.from"], json!("0xffffffff81001000"));
        assert_eq!(f["introspect.to"], json!("0xffffffff81002000"));
        assert_eq!(f["introspect.symbol"], json!("rootkit_sys_hook"));
        assert_eq!(f["introspect.from_symbol"], json!("sys_vigil_1"));
        assert_eq!(f["introspect.restored"], json!(false));
        // No vCPU for shared memory, no verdict but for MSR writes.
        assert!(!f.contains_key("introspect.vcpu"));
        assert!(!f.contains_key("introspect.refused"));
    }

    #[test]
    fn restored_msr_writes_and_unknown_rules() {
        // Restored: the record's priority (the VMM writes Notice).
        let mut v = table_record(4);
        v["restored"] = json!(true);
        assert_eq!(
            event(v.clone()).priority,
            Priority::Critical,
            "the record says Critical"
        );
        v["priority"] = json!("Notice");
        assert_eq!(event(v).priority, Priority::Notice);
        // An MSR write: the vCPU and the guard's verdict.
        let msr = |verdict: &str| {
            record(json!({
                "seq": 1, "time_unix_ns": 5, "rule": "syscall_msr_write", "priority": "Critical",
                "vcpu": 0, "location": "LSTAR", "from": "0x1000", "to": "0x2000",
                "from_symbol": null, "symbol": "rootkit_syscall_entry", "restored": false,
                "message": format!("vCPU 0: wrmsr LSTAR 0x2000 (baseline 0x1000): {verdict}")
            }))
        };
        let e = finding_event("a", &msr("refused"));
        assert_eq!(e.rule, Rule::SyscallMsrWrite);
        assert_eq!(e.fields["introspect.vcpu"], json!(0));
        assert_eq!(e.fields["introspect.refused"], json!(true));
        assert!(!e.fields.contains_key("introspect.from_symbol"));
        let e = finding_event("a", &msr("let through"));
        assert_eq!(e.fields["introspect.refused"], json!(false));
        // A rule this daemon does not know, or a record without its priority, is
        // skipped; the others are read.
        let mut future = table_record(1);
        future["rule"] = json!("from_the_future");
        let mut bare = table_record(2);
        bare.as_object_mut().unwrap().remove("priority");
        let read = parse_records([future, bare, table_record(3)]);
        assert_eq!(read.iter().map(|r| r.seq).collect::<Vec<_>>(), [3]);
    }

    #[test]
    fn sequence_bookkeeping() {
        let mut c = FindingCursors::default();
        // Nothing found yet: nothing to fetch.
        assert_eq!(c.due("a", Some(10), 0), None);
        // Two findings: fetch from the start.
        assert_eq!(c.due("a", Some(10), 2), Some(0));
        // The fetch failed: nothing advanced, the next tick asks again.
        assert_eq!(c.due("a", Some(10), 2), Some(0));
        let got = after(0, vec![record(table_record(2)), record(table_record(1))]);
        assert_eq!(got.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2]);
        c.advance("a", Some(10), &got);
        assert_eq!(c.last_seq("a"), Some(2));
        assert_eq!(c.due("a", Some(10), 2), None);
        // One more: from 2. A reply repeating 2 does not emit it twice.
        assert_eq!(c.due("a", Some(10), 3), Some(2));
        let got = after(2, vec![record(table_record(2)), record(table_record(3))]);
        assert_eq!(got.len(), 1);
        c.advance("a", Some(10), &got);
        assert_eq!(c.due("a", Some(10), 3), None);
        // An empty answer (the count ran ahead of the log) changes nothing.
        assert_eq!(c.due("a", Some(10), 4), Some(3));
        c.advance("a", Some(10), &[]);
        assert_eq!(c.last_seq("a"), Some(3));
        // A new process under the same id numbers from 1 again.
        assert_eq!(c.due("a", Some(11), 1), Some(0));
        // A late answer for the old process does not move the new one's cursor.
        c.advance("a", Some(10), &[record(table_record(9))]);
        assert_eq!(c.last_seq("a"), Some(0));
        // Another VM has its own numbers; a destroyed VM is forgotten.
        assert_eq!(c.due("b", Some(12), 1), Some(0));
        assert_eq!(c.len(), 2);
        c.retain(["b"]);
        assert_eq!(c.last_seq("a"), None);
        assert_eq!(c.last_seq("b"), Some(0));
        c.retain([]);
        assert!(c.is_empty());
    }

    #[test]
    fn an_ended_vm_is_drained_once_after_what_was_fetched() {
        let mut c = FindingCursors::default();
        assert_eq!(c.due("a", Some(7), 3), Some(0));
        c.advance(
            "a",
            Some(7),
            &[record(table_record(1)), record(table_record(2))],
        );
        // It ended (no pid any more): its file is read after seq 2, once.
        assert_eq!(c.drain("a"), Some(2));
        assert_eq!(c.drain("a"), None);
        // A VM that ended before any sample: its whole file.
        assert_eq!(c.drain("b"), Some(0));
        let text = format!("{}\nnot json\n\n{}\n", table_record(1), table_record(3));
        let records = parse_findings_file(&text);
        assert_eq!(
            after(2, records).iter().map(|r| r.seq).collect::<Vec<_>>(),
            [3]
        );
    }
}
