//! Introspection findings: what the integrity monitor of a VM found, as the VMM
//! serves and writes them (`GET /vigil/introspect/findings`, `--findings-path`)
//! and as the daemon reads them into security events.

use serde::{Deserialize, Serialize};

use crate::rule::{Mitre, Priority, Rule};

/// One difference from the integrity baseline (or its end: `restored`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finding {
    pub rule: Rule,
    /// [`Rule::default_priority`], or Notice when `restored`.
    pub priority: Priority,
    /// [`Rule::mitre`].
    #[serde(default)]
    pub mitre: Option<Mitre>,
    /// The vCPU whose register or descriptor table it is; `None` for memory all
    /// vCPUs share (syscall table, kernel text and read-only data).
    #[serde(default)]
    pub vcpu: Option<u32>,
    /// Where: `IDT vector 14`, `LSTAR`, `sys_call_table[1] (write)`,
    /// `kernel text page 0x1234000 (_stext+0x3000)`.
    pub location: String,
    /// The baseline value (hex address or register, a hash, `set`).
    pub from: String,
    /// The value now.
    pub to: String,
    /// The symbol the baseline value points at, when it is an address.
    #[serde(default)]
    pub from_symbol: Option<String>,
    /// The symbol the new value points at (or the page's first protected byte is
    /// in), when known.
    #[serde(default)]
    pub symbol: Option<String>,
    /// True: the location is back at its baseline value (`to`), after it was
    /// reported at `from`.
    #[serde(default)]
    pub restored: bool,
    /// One line for a human.
    pub message: String,
}

/// A finding with its place in one VM's log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FindingRecord {
    /// 1, 2, 3, ... in the order found.
    pub seq: u64,
    #[serde(default)]
    pub time_unix_ns: u64,
    #[serde(flatten)]
    pub finding: Finding,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_flat() {
        let r = FindingRecord {
            seq: 3,
            time_unix_ns: 7,
            finding: Finding {
                rule: Rule::SyscallTableModified,
                priority: Priority::Critical,
                mitre: Rule::SyscallTableModified.mitre(),
                vcpu: None,
                location: "sys_call_table[1] (write)".into(),
                from: "0xffffffff81000000".into(),
                to: "0xffffffff82000000".into(),
                from_symbol: Some("__x64_sys_write+0x0".into()),
                symbol: Some("rootkit+0x0".into()),
                restored: false,
                message: "hooked".into(),
            },
        };
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["rule"], "syscall_table_modified");
        assert_eq!(json["mitre"]["technique"], "T1014");
        assert_eq!(json["seq"], 3);
        assert_eq!(serde_json::from_value::<FindingRecord>(json).unwrap(), r);
        let unknown = serde_json::json!({"seq": 1, "rule": "from_the_future", "priority": "Critical",
            "location": "", "from": "", "to": "", "message": ""});
        assert!(serde_json::from_value::<FindingRecord>(unknown).is_err());
    }
}
