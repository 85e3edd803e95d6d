//! Server-sent events framing (the HTML standard's `text/event-stream`).

use crate::event::Event;
use crate::output::json::falco_json;

/// The `Content-Type` of an event stream.
pub const SSE_CONTENT_TYPE: &str = "text/event-stream";

/// The `event:` name of every frame; a browser listens with
/// `source.addEventListener("vigil", ...)`.
pub const SSE_EVENT_NAME: &str = "vigil";

/// A comment line that keeps idle connections (and proxies) open.
pub const SSE_KEEPALIVE: &str = ": keepalive\n\n";

/// One frame: `id: <id>\nevent: vigil\ndata: <Falco-like JSON>\n\n`.
///
/// The JSON is a single line (JSON escapes CR and LF), so one `data:` field
/// carries it. A client that reconnects sends the last `id` it saw as
/// `Last-Event-ID`, and the hub resumes after it ([`crate::output::Resume`]).
pub fn sse_frame(id: u64, event: &Event, hostname: &str) -> String {
    let json = falco_json(event, hostname).to_string();
    let mut frame = String::with_capacity(json.len() + 48);
    frame.push_str("id: ");
    frame.push_str(&id.to_string());
    frame.push_str("\nevent: ");
    frame.push_str(SSE_EVENT_NAME);
    frame.push_str("\ndata: ");
    // serde_json never writes a raw CR or LF; this is a belt for the braces.
    frame.extend(json.chars().filter(|c| *c != '\n' && *c != '\r'));
    frame.push_str("\n\n");
    frame
}

/// The id in a `Last-Event-ID` header (surrounding blanks allowed); `None` for
/// anything that is not a decimal `u64`.
pub fn parse_last_event_id(header: &str) -> Option<u64> {
    let s = header.trim();
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::testing::{sample, HOSTILE};

    /// Parses a stream the way the HTML standard's event-stream interpretation
    /// does (lines end at CRLF, LF or CR; a blank line dispatches).
    fn parse(stream: &str) -> Vec<(Option<String>, Option<String>, String)> {
        let mut out = Vec::new();
        let (mut id, mut name, mut data) = (None, None, Vec::<String>::new());
        let normalized = stream.replace("\r\n", "\n").replace('\r', "\n");
        for line in normalized.split('\n') {
            if line.is_empty() {
                if !data.is_empty() {
                    out.push((id.clone(), name.take(), data.join("\n")));
                    data.clear();
                }
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = line.split_once(':').unwrap_or((line, ""));
            let value = value.strip_prefix(' ').unwrap_or(value).to_owned();
            match field {
                "id" => id = Some(value),
                "event" => name = Some(value),
                "data" => data.push(value),
                _ => {}
            }
        }
        out
    }

    #[test]
    fn framing() {
        let f = sse_frame(42, &sample(), "h");
        assert!(f.starts_with("id: 42\nevent: vigil\ndata: {"));
        assert!(f.ends_with("}\n\n"));
        assert_eq!(f.matches('\n').count(), 4);
        let parsed = parse(&(f + SSE_KEEPALIVE));
        assert_eq!(parsed.len(), 1);
        let (id, name, data) = &parsed[0];
        assert_eq!(id.as_deref(), Some("42"));
        assert_eq!(name.as_deref(), Some("vigil"));
        let v: serde_json::Value = serde_json::from_str(data).unwrap();
        assert_eq!(v["rule"], "vm_io_flood");
    }

    #[test]
    fn hostile_strings_cannot_forge_frames() {
        let mut stream = String::new();
        for (i, s) in HOSTILE.iter().enumerate() {
            let mut e = sample().with_field("x", *s);
            e.message = format!("{s}\n\nid: 999\nevent: forged\ndata: x\n\n");
            e.vm_id = Some((*s).to_owned());
            stream.push_str(&sse_frame(i as u64, &e, s));
        }
        let parsed = parse(&stream);
        assert_eq!(parsed.len(), HOSTILE.len());
        for (i, (id, name, data)) in parsed.iter().enumerate() {
            assert_eq!(id.as_deref(), Some(i.to_string().as_str()));
            assert_eq!(name.as_deref(), Some("vigil"));
            let v: serde_json::Value = serde_json::from_str(data).unwrap();
            assert_eq!(v["output_fields"]["x"], HOSTILE[i]);
        }
    }

    #[test]
    fn last_event_id() {
        assert_eq!(parse_last_event_id("17"), Some(17));
        assert_eq!(parse_last_event_id(" 17 "), Some(17));
        for bad in ["", "-1", "+1", "1e3", "x", "18446744073709551616", "1 2"] {
            assert_eq!(parse_last_event_id(bad), None, "{bad}");
        }
    }
}
