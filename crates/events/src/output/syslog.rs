//! Syslog lines, RFC 5424.
//!
//! `<PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID [SD] MSG`, with
//! `PRI = facility * 8 + severity` (the priority's syslog severity), the
//! timestamp in microseconds (RFC 5424 allows at most six fraction digits), the
//! rule as MSGID, the event's metadata and fields as structured data, and the
//! message as MSG.

use std::fmt::Write as _;

use crate::event::Event;

/// The structured-data id. 32473 is the private enterprise number RFC 5612
/// reserves for documentation; a deployment with its own number can change it.
const SD_ID: &str = "vigil@32473";

/// How syslog lines are written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyslogFormat {
    /// 0 to 23; larger values are taken as 23. Default 16 (local0).
    pub facility: u8,
    pub hostname: String,
    /// Default "vigil".
    pub app_name: String,
    /// The daemon's pid, if it wants one in the line.
    pub procid: Option<u32>,
}

impl SyslogFormat {
    pub fn new(hostname: impl Into<String>) -> Self {
        SyslogFormat {
            facility: 16,
            hostname: hostname.into(),
            app_name: "vigil".to_owned(),
            procid: None,
        }
    }

    /// One line, without a trailing newline (the transport frames it). It holds
    /// no CR or LF and no control character, whatever the event contains.
    pub fn format(&self, e: &Event) -> String {
        let pri = u16::from(self.facility.min(23)) * 8 + u16::from(e.priority.syslog_severity());
        let procid = self
            .procid
            .map_or_else(|| "-".to_owned(), |p| p.to_string());
        let mut line = format!(
            "<{pri}>1 {} {} {} {} {} [{SD_ID}",
            e.time.rfc3339_micros(),
            header_field(&self.hostname, 255),
            header_field(&self.app_name, 48),
            header_field(&procid, 128),
            header_field(e.rule.as_str(), 32),
        );
        let mut param = |name: &str, value: &str| {
            let _ = write!(
                line,
                " {}=\"{}\"",
                sd_name(name),
                syslog_escape_param(value)
            );
        };
        param("rule", e.rule.as_str());
        param("priority", e.priority.as_str());
        param("source", e.source.as_str());
        if let Some(vm) = &e.vm_id {
            param("vm_id", vm);
        }
        if let Some(id) = e.incident_id {
            param("incident_id", &id.to_string());
        }
        if !e.tags.is_empty() {
            param("tags", &e.tags.join(","));
        }
        const RESERVED: [&str; 6] = ["rule", "priority", "source", "vm_id", "incident_id", "tags"];
        for (k, v) in &e.fields {
            let name = sd_name(k);
            if name.is_empty() || RESERVED.contains(&name.as_str()) {
                continue;
            }
            let value = match v {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            param(&name, &value);
        }
        line.push_str("] ");
        line.push_str(&syslog_escape_msg(&e.message));
        line
    }
}

/// A header field: printable US-ASCII without spaces, at most `max` characters,
/// `-` when empty (RFC 5424 NILVALUE). Anything else becomes `_`.
fn header_field(s: &str, max: usize) -> String {
    let out: String = s
        .chars()
        .take(max)
        .map(|c| if c.is_ascii_graphic() { c } else { '_' })
        .collect();
    if out.is_empty() {
        "-".to_owned()
    } else {
        out
    }
}

/// An SD-NAME: printable US-ASCII except `=`, space, `]` and `"`, at most 32
/// characters.
fn sd_name(s: &str) -> String {
    s.chars()
        .take(32)
        .map(|c| {
            if c.is_ascii_graphic() && !matches!(c, '=' | ']' | '"') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// A PARAM-VALUE: `"`, `\` and `]` escaped with a backslash (RFC 5424 6.3.3),
/// and, so that the line stays one line, CR, LF, tab and other control
/// characters written as `\n`, `\r`, `\t`, `\xNN` / `\u{NNNN}`. Other UTF-8
/// passes through.
pub fn syslog_escape_param(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' | '\\' | ']' => {
                out.push('\\');
                out.push(c);
            }
            _ => push_control_escaped(&mut out, c),
        }
    }
    out
}

/// The MSG part: `\` doubled and control characters escaped as in
/// [`syslog_escape_param`], so the line can be split on newlines and read back.
pub fn syslog_escape_msg(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c == '\\' {
            out.push_str("\\\\");
        } else {
            push_control_escaped(&mut out, c);
        }
    }
    out
}

fn push_control_escaped(out: &mut String, c: char) {
    match c {
        '\n' => out.push_str("\\n"),
        '\r' => out.push_str("\\r"),
        '\t' => out.push_str("\\t"),
        c if (c as u32) < 0x20 || c as u32 == 0x7f => {
            let _ = write!(out, "\\x{:02x}", c as u32);
        }
        // C1 controls and the Unicode line and paragraph separators.
        c if c.is_control() || c == '\u{2028}' || c == '\u{2029}' => {
            let _ = write!(out, "\\u{{{:04x}}}", c as u32);
        }
        c => out.push(c),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Event, Priority, Rule};
    use crate::output::testing::{sample, HOSTILE};
    use crate::time::Timestamp;

    #[test]
    fn rfc5424_line() {
        let mut e = sample();
        e.incident_id = Some(3);
        let mut f = SyslogFormat::new("host-a");
        f.procid = Some(42);
        let line = f.format(&e);
        assert_eq!(
            line,
            "<132>1 2023-11-14T22:13:20.123456Z host-a vigil 42 vm_io_flood [vigil@32473 \
             rule=\"vm_io_flood\" priority=\"Warning\" source=\"host\" vm_id=\"vm-1\" \
             incident_id=\"3\" tags=\"vm,resource_exhaustion,mitre_impact,T1499.001\" \
             flood.kind=\"disk_ops\" flood.rate_per_s=\"25000.5\"] vm vm-1: disk I/O flood"
        );
    }

    #[test]
    fn pri_is_facility_times_8_plus_severity() {
        let mut f = SyslogFormat::new("h");
        for (p, f_, pri) in [
            (Priority::Emergency, 0, "<0>"),
            (Priority::Debug, 23, "<191>"),
            (Priority::Critical, 4, "<34>"),
            (Priority::Informational, 200, "<190>"), // facility clamped to 23
        ] {
            f.facility = f_;
            let e = Event::new(Rule::HostIoPressure, Timestamp::EPOCH, "m").with_priority(p);
            assert!(f.format(&e).starts_with(pri), "{p}");
        }
    }

    #[test]
    fn escaping_of_hostile_strings() {
        assert_eq!(syslog_escape_param(r#"a"b\c]d"#), r#"a\"b\\c\]d"#);
        assert_eq!(
            syslog_escape_param("x\ny\rz\t\0\x7f"),
            "x\\ny\\rz\\t\\x00\\x7f"
        );
        assert_eq!(syslog_escape_param("ü=|✓"), "ü=|✓");
        assert_eq!(syslog_escape_msg("a\\n\nb"), "a\\\\n\\nb");
        assert_eq!(syslog_escape_msg("\u{85}\u{2028}"), "\\u{0085}\\u{2028}");
        assert_eq!(header_field("", 10), "-");
        assert_eq!(header_field("my host\n", 10), "my_host_");
        assert_eq!(header_field("ünï", 10), "_n_");
        assert_eq!(header_field(&"x".repeat(300), 255).len(), 255);
        assert_eq!(sd_name("a=b]c\"d e"), "a_b_c_d_e");

        let f = SyslogFormat {
            facility: 16,
            hostname: "evil\nhost name".into(),
            app_name: String::new(),
            procid: None,
        };
        for s in HOSTILE {
            let mut e = sample().with_field(*s, *s);
            e.message = (*s).to_owned();
            e.vm_id = Some((*s).to_owned());
            let line = f.format(&e);
            assert!(
                !line.chars().any(|c| c.is_control() || c == '\u{2028}'),
                "{line:?}"
            );
            // The header has exactly its six space-separated fields before SD.
            let head: Vec<&str> = line.splitn(7, ' ').collect();
            assert_eq!(head[2], "evil_host_name");
            assert_eq!(head[3], "-");
            assert_eq!(head[4], "-");
            assert!(head[6].starts_with("[vigil@32473 "));
            // The SD element closes at its one unescaped `]`.
            let sd_end = unescaped_close(head[6]).expect("SD closes");
            assert!(head[6][sd_end..].starts_with("] "));
        }
    }

    /// The index of the first `]` that is not escaped (the SD element's end),
    /// scanning RFC 5424 PARAM-VALUE escapes inside quotes.
    fn unescaped_close(sd: &str) -> Option<usize> {
        let mut in_quotes = false;
        let mut escaped = false;
        for (i, c) in sd.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' if in_quotes => escaped = true,
                '"' => in_quotes = !in_quotes,
                ']' if !in_quotes => return Some(i),
                _ => {}
            }
        }
        None
    }
}
