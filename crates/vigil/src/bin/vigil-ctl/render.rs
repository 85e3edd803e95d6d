//! How `vigil-ctl` shows the daemon's answers to people: tables, one VM's
//! details, security events one line each (split out of a server-sent stream).

use serde_json::Value;

/// Splits server-sent events out of a byte stream: the `data:` of each complete
/// frame (comments and keep-alives skipped).
#[derive(Default)]
pub struct SseFrames {
    buf: String,
}

impl SseFrames {
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.buf.push_str(&String::from_utf8_lossy(bytes));
        let mut out = Vec::new();
        while let Some(end) = self.buf.find("\n\n") {
            let frame: String = self.buf.drain(..end + 2).collect();
            let data: Vec<&str> = frame
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect();
            if !data.is_empty() {
                out.push(data.join("\n"));
            }
        }
        out
    }
}

/// One event (Falco-style JSON) as one line for people.
pub fn event_line(text: &str) -> String {
    let Ok(v) = serde_json::from_str::<Value>(text) else {
        return text.to_owned();
    };
    let f = &v["output_fields"];
    let s = |x: &Value| x.as_str().map_or_else(|| "-".to_owned(), str::to_owned);
    let incident = f["incident.id"]
        .as_u64()
        .map_or_else(String::new, |i| format!(" incident={i}"));
    let what = finding_text(f).unwrap_or_else(|| s(&v["output"]));
    let line = format!(
        "{} {:<13} {:<24} vm={}{incident}  {what}",
        s(&v["time"]),
        s(&v["priority"]),
        s(&v["rule"]),
        s(&f["vm.id"]),
    );
    // The message comes from guests and peers: no control characters on a terminal.
    line.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// An introspection finding's fields, for people: `vCPU 0 LSTAR: 0x1000
/// <syscall_entry> -> 0x2000 <rootkit_syscall_entry> (refused)`; `None` for other
/// events (and for findings without a `from`, whose message says it better).
fn finding_text(f: &Value) -> Option<String> {
    let get = |k: &str| f[k].as_str().filter(|s| !s.is_empty());
    let location = get("introspect.location")?;
    let from = get("introspect.from")?;
    let to = get("introspect.to").unwrap_or("-");
    let sym = |k: &str| get(k).map(|s| format!(" <{s}>")).unwrap_or_default();
    let vcpu = f["introspect.vcpu"]
        .as_u64()
        .map(|v| format!("vCPU {v} "))
        .unwrap_or_default();
    let mut text = format!(
        "{vcpu}{location}: {from}{} -> {to}{}",
        sym("introspect.from_symbol"),
        sym("introspect.symbol")
    );
    if f["introspect.restored"] == Value::Bool(true) {
        text.push_str(" (restored)");
    }
    match f["introspect.refused"].as_bool() {
        Some(true) => text.push_str(" (refused)"),
        Some(false) => text.push_str(" (let through)"),
        None => {}
    }
    Some(text)
}

/// 42s, 3m05s, 2h07m, 3d04h.
pub fn uptime(seconds: Option<f64>) -> String {
    let Some(s) = seconds.filter(|s| s.is_finite() && *s >= 0.0) else {
        return "-".into();
    };
    let s = s as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        3600..86400 => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d{:02}h", s / 86400, s % 86400 / 3600),
    }
}

fn field(v: &Value, key: &str) -> String {
    match &v[key] {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The VMs as an aligned table.
pub fn vm_table(vms: &[Value]) -> String {
    let header = ["ID", "STATE", "PID", "VCPUS", "MEMORY", "UPTIME", "EXIT"];
    let rows: Vec<[String; 7]> = vms
        .iter()
        .map(|v| {
            let exit = match (&v["exit"]["code"], &v["exit"]["signal"]) {
                (Value::Number(c), _) => format!("status {c}"),
                (_, Value::Number(s)) => format!("signal {s}"),
                _ => "-".into(),
            };
            [
                field(v, "id"),
                field(v, "state"),
                field(v, "pid"),
                field(v, "vcpus"),
                v["memory_mib"]
                    .as_u64()
                    .map_or("-".into(), |m| format!("{m} MiB")),
                uptime(v["uptime_s"].as_f64()),
                exit,
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &[String]| {
        let mut text = String::new();
        for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<w$}  "));
            }
        }
        out.push_str(text.trim_end());
        out.push('\n');
    };
    line(&header.map(String::from));
    for row in &rows {
        line(row);
    }
    out
}

/// One VM, as "key: value" lines and its logs' tails.
pub fn describe(v: &Value) -> String {
    let mut out = vm_table(std::slice::from_ref(v));
    out.push('\n');
    for (label, key) in [
        ("dir", "dir"),
        ("api socket", "api_socket"),
        ("created (unix s)", "created_at_unix_s"),
    ] {
        out.push_str(&format!("{label:<17} {}\n", field(v, key)));
    }
    if let Some(reason) = v["exit"]["reason"].as_str() {
        out.push_str(&format!("{:<17} {reason}\n", "how it ended"));
    }
    for (label, key) in [
        ("VMM log (end)", "stderr_tail"),
        ("console (end)", "console_tail"),
    ] {
        if let Some(text) = v[key].as_str().filter(|t| !t.trim().is_empty()) {
            out.push_str(&format!("\n--- {label}\n{}", text));
            if !text.ends_with('\n') {
                out.push('\n');
            }
        }
    }
    out
}

/// Bytes as MiB with one decimal.
fn mib(v: &Value) -> String {
    format!("{:.1} MiB", v.as_f64().unwrap_or(0.0) / f64::from(1 << 20))
}

/// One line of a migration under way (`GET /vms/{id}/migration`).
pub fn migration_progress(v: &Value) -> String {
    format!(
        "{} round {}: {} sent, {} remaining, dirtied at {}/s, link {}/s, pause {} ms predicted, throttle {}%",
        field(v, "state"),
        field(v, "round"),
        mib(&v["bytes_sent"]),
        mib(&v["remaining_bytes"]),
        mib(&v["dirty_rate_bytes_per_s"]),
        mib(&v["bandwidth_bytes_per_s"]),
        field(v, "predicted_downtime_ms"),
        field(v, "throttle_percent"),
    )
}

/// How a migration ended: total time, pause, bytes and rounds.
pub fn migration_summary(v: &Value) -> String {
    format!(
        "{}: {} ms in all, paused {} ms, {} sent in {} rounds",
        field(v, "state"),
        field(v, "total_ms"),
        field(v, "downtime_ms"),
        mib(&v["bytes_sent"]),
        field(v, "round"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align() {
        let vms = [
            serde_json::json!({"id": "a", "state": "running", "pid": 12, "vcpus": 1, "memory_mib": 32, "uptime_s": 5.2}),
            serde_json::json!({"id": "long-name", "state": "crashed", "pid": null, "vcpus": 2, "memory_mib": 1024, "uptime_s": 3700.0, "exit": {"code": 3}}),
        ];
        let t = vm_table(&vms);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        let col = lines[0].find("STATE").unwrap();
        assert_eq!(lines[1].find("running"), Some(col));
        assert_eq!(lines[2].find("crashed"), Some(col));
        assert!(
            lines[2].contains("1024 MiB")
                && lines[2].contains("1h01m")
                && lines[2].ends_with("status 3")
        );
        assert!(lines[1].ends_with('-'));
    }

    #[test]
    fn sse_frames_and_event_lines() {
        let mut f = SseFrames::default();
        assert!(f.push(b"id: 1\nevent: vigil\ndata: {\"rule\":").is_empty());
        let got = f.push(b"\"x\"}\n\n: keepalive\n\nid: 2\ndata: 7\n\n");
        assert_eq!(got, ["{\"rule\":\"x\"}", "7"]);
        let line = event_line(
            r#"{"time":"2026-01-01T00:00:00.000000000Z","priority":"Warning","rule":"vm_io_flood",
                "output":"vm a: flood\nforged","output_fields":{"vm.id":"a","incident.id":3}}"#,
        );
        assert!(
            line.starts_with("2026-01-01T00:00:00.000000000Z Warning"),
            "{line}"
        );
        assert!(
            line.contains("vm_io_flood") && line.contains("vm=a incident=3"),
            "{line}"
        );
        assert!(!line.contains('\n'), "{line}");
        assert_eq!(event_line("not json"), "not json");
    }

    #[test]
    fn findings_as_lines() {
        let line = event_line(
            r#"{"time":"t","priority":"Critical","rule":"syscall_table_modified","output":"vm a: long message",
                "output_fields":{"vm.id":"a","introspect.location":"sys_call_table[1]",
                "introspect.from":"0x1000","introspect.to":"0x2000","introspect.from_symbol":"sys_vigil_1",
                "introspect.symbol":"rootkit_sys_hook","introspect.restored":false,"introspect.seq":1}}"#,
        );
        assert!(
            line.ends_with(
                "vm=a  sys_call_table[1]: 0x1000 <sys_vigil_1> -> 0x2000 <rootkit_sys_hook>"
            ),
            "{line}"
        );
        let line = event_line(
            r#"{"time":"t","priority":"Critical","rule":"syscall_msr_write","output":"m",
                "output_fields":{"vm.id":"a","introspect.location":"LSTAR","introspect.vcpu":0,
                "introspect.from":"0x1000","introspect.to":"0x2000","introspect.refused":true}}"#,
        );
        assert!(
            line.ends_with("vCPU 0 LSTAR: 0x1000 -> 0x2000 (refused)"),
            "{line}"
        );
        // Without a baseline value: the message.
        let line = event_line(
            r#"{"time":"t","priority":"Warning","rule":"integrity_read_failed","output":"vm a: cannot read",
                "output_fields":{"vm.id":"a","introspect.location":"IDT","introspect.from":""}}"#,
        );
        assert!(line.ends_with("vm a: cannot read"), "{line}");
    }

    #[test]
    fn uptimes() {
        assert_eq!(uptime(Some(0.4)), "0s");
        assert_eq!(uptime(Some(185.0)), "3m05s");
        assert_eq!(uptime(Some(90000.0)), "1d01h");
        assert_eq!(uptime(None), "-");
        assert_eq!(uptime(Some(f64::NAN)), "-");
    }
}
