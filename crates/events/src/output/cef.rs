//! ArcSight Common Event Format (CEF) lines.
//!
//! `CEF:0|Vigil|Vigil|<version>|<rule>|<message>|<severity 0-10>|<extension>`.
//! Header fields escape `\` and `|`; extension values escape `\` and `=` and
//! write newlines as `\n` and `\r`, as the CEF specification says. Neither may
//! contain a raw newline, so other control characters become spaces.
//!
//! Extension keys: `rt` (ms since the epoch), `dvchost`, `cat` (the source),
//! `msg`, `cs1`/`cs1Label=vmId`, `cs2`/`cs2Label=tags`, `cn1`/`cn1Label=incidentId`,
//! `cs3`/`cs3Label=priority`, then the event's fields as `vigil.<key>` (keys cut
//! down to ASCII letters, digits, `.` and `_`).

use std::fmt::Write as _;

use crate::event::Event;

/// How CEF lines are written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CefFormat {
    pub hostname: String,
}

impl CefFormat {
    pub fn new(hostname: impl Into<String>) -> Self {
        CefFormat {
            hostname: hostname.into(),
        }
    }

    /// One line, without a trailing newline.
    pub fn format(&self, e: &Event) -> String {
        let mut line = format!(
            "CEF:0|Vigil|Vigil|{}|{}|{}|{}|",
            cef_escape_header(env!("CARGO_PKG_VERSION")),
            cef_escape_header(e.rule.as_str()),
            cef_escape_header(&e.message),
            e.priority.cef_severity(),
        );
        let mut ext: Vec<(String, String)> = vec![
            ("rt".into(), e.time.unix_ms().to_string()),
            ("dvchost".into(), self.hostname.clone()),
            ("cat".into(), e.source.as_str().into()),
            ("msg".into(), e.message.clone()),
            ("cs3Label".into(), "priority".into()),
            ("cs3".into(), e.priority.as_str().into()),
        ];
        if let Some(vm) = &e.vm_id {
            ext.push(("cs1Label".into(), "vmId".into()));
            ext.push(("cs1".into(), vm.clone()));
        }
        if !e.tags.is_empty() {
            ext.push(("cs2Label".into(), "tags".into()));
            ext.push(("cs2".into(), e.tags.join(",")));
        }
        if let Some(id) = e.incident_id {
            ext.push(("cn1Label".into(), "incidentId".into()));
            ext.push(("cn1".into(), id.to_string()));
        }
        for (k, v) in &e.fields {
            let key = extension_key(k);
            if key.is_empty() {
                continue;
            }
            let value = match v {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            ext.push((format!("vigil.{key}"), value));
        }
        for (i, (k, v)) in ext.iter().enumerate() {
            if i > 0 {
                line.push(' ');
            }
            let _ = write!(line, "{k}={}", cef_escape_extension(v));
        }
        line
    }
}

/// A header field: `\` → `\\`, `|` → `\|`; CR, LF and other control characters
/// become spaces (a header cannot hold a newline).
pub fn cef_escape_header(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '|' => out.push_str("\\|"),
            c if is_breaking(c) => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// An extension value: `\` → `\\`, `=` → `\=`, LF → `\n`, CR → `\r`; other
/// control characters become spaces. `|` needs no escape here.
pub fn cef_escape_extension(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '=' => out.push_str("\\="),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c if is_breaking(c) => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// Control characters, and the Unicode line and paragraph separators.
fn is_breaking(c: char) -> bool {
    c.is_control() || c == '\u{2028}' || c == '\u{2029}'
}

/// An extension key: ASCII letters, digits, `.` and `_`; anything else dropped.
fn extension_key(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_'))
        .take(64)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::testing::{sample, HOSTILE};

    /// Splits a CEF line back into its 7 header fields and extension pairs,
    /// undoing the escapes, as a SIEM parser would.
    fn parse(line: &str) -> (Vec<String>, Vec<(String, String)>) {
        let rest = line.strip_prefix("CEF:").expect("CEF: prefix");
        let mut header = Vec::new();
        let mut cur = String::new();
        let mut chars = rest.chars();
        while header.len() < 7 {
            match chars.next().expect("7 header fields") {
                '\\' => cur.push(chars.next().expect("escape")),
                '|' => header.push(std::mem::take(&mut cur)),
                c => cur.push(c),
            }
        }
        let ext_text: String = chars.collect();
        // Keys start after a space and end at an unescaped '='.
        let mut pairs: Vec<(String, String)> = Vec::new();
        let mut key = String::new();
        let mut value = String::new();
        let mut in_key = true;
        let mut it = ext_text.chars().peekable();
        while let Some(c) = it.next() {
            if in_key {
                if c == '=' {
                    in_key = false;
                } else {
                    key.push(c);
                }
                continue;
            }
            match c {
                '\\' => match it.next().expect("escape") {
                    'n' => value.push('\n'),
                    'r' => value.push('\r'),
                    other => value.push(other),
                },
                ' ' => {
                    // A space followed by `key=` starts the next pair.
                    let ahead: String = it.clone().take_while(|c| *c != ' ' && *c != '=').collect();
                    let next_is_key = !ahead.is_empty()
                        && it.clone().nth(ahead.chars().count()) == Some('=')
                        && ahead
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_');
                    if next_is_key {
                        pairs.push((std::mem::take(&mut key), std::mem::take(&mut value)));
                        in_key = true;
                    } else {
                        value.push(' ');
                    }
                }
                c => value.push(c),
            }
        }
        pairs.push((key, value));
        (header, pairs)
    }

    #[test]
    fn cef_line() {
        let mut e = sample();
        e.incident_id = Some(5);
        let line = CefFormat::new("host-a").format(&e);
        assert_eq!(
            line,
            format!(
                "CEF:0|Vigil|Vigil|{}|vm_io_flood|vm vm-1: disk I/O flood|5|rt=1700000000123 \
                 dvchost=host-a cat=host msg=vm vm-1: disk I/O flood cs3Label=priority cs3=Warning \
                 cs1Label=vmId cs1=vm-1 cs2Label=tags cs2=vm,resource_exhaustion,mitre_impact,T1499.001 \
                 cn1Label=incidentId cn1=5 vigil.flood.kind=disk_ops vigil.flood.rate_per_s=25000.5",
                env!("CARGO_PKG_VERSION")
            )
        );
    }

    #[test]
    fn escaping() {
        assert_eq!(cef_escape_header(r"a|b\c=d"), r"a\|b\\c=d");
        assert_eq!(cef_escape_header("l1\nl2\r\tx"), "l1 l2  x");
        assert_eq!(cef_escape_extension(r"a|b\c=d"), r"a|b\\c\=d");
        assert_eq!(cef_escape_extension("l1\nl2\r\0"), "l1\\nl2\\r ");
        assert_eq!(cef_escape_extension("ünï ✓"), "ünï ✓");
        assert_eq!(cef_escape_header("trailing\\"), "trailing\\\\");
        assert_eq!(extension_key("a b=c|d.é_1"), "abcd._1");
    }

    #[test]
    fn hostile_strings_round_trip_through_a_parser() {
        let f = CefFormat::new("evil|host=x\n");
        for s in HOSTILE {
            let mut e = sample().with_field("hostile", *s);
            e.message = (*s).to_owned();
            e.vm_id = Some((*s).to_owned());
            let line = f.format(&e);
            assert!(!line.contains('\n') && !line.contains('\r'), "{line:?}");
            let (header, pairs) = parse(&line);
            // Header: control characters became spaces, the rest survived.
            let expected_header: String = s
                .chars()
                .map(|c| if is_breaking(c) { ' ' } else { c })
                .collect();
            assert_eq!(header[0], "0");
            assert_eq!(header[4], "vm_io_flood");
            assert_eq!(header[5], expected_header);
            let get = |k: &str| {
                pairs
                    .iter()
                    .find(|(key, _)| key == k)
                    .map(|(_, v)| v.clone())
            };
            let expected_ext: String = s
                .chars()
                .map(|c| {
                    if is_breaking(c) && c != '\n' && c != '\r' {
                        ' '
                    } else {
                        c
                    }
                })
                .collect();
            assert_eq!(
                get("vigil.hostile").as_deref(),
                Some(expected_ext.as_str()),
                "{s:?}"
            );
            assert_eq!(get("dvchost").as_deref(), Some("evil|host=x\n"));
            assert_eq!(get("cs3").as_deref(), Some("Warning"));
        }
    }
}
