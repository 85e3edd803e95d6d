//! Where events go: Falco-like JSON lines (a file), server-sent events (a hub that
//! fans out to subscribers), syslog (RFC 5424) and CEF.

mod cef;
mod hub;
mod json;
mod sse;
mod syslog;

pub use cef::{cef_escape_extension, cef_escape_header, CefFormat};
pub use hub::{EventHub, HubConfig, Published, Resume, Subscription};
pub use json::{falco_json, falco_json_line, JsonLinesWriter};
pub use sse::{parse_last_event_id, sse_frame, SSE_CONTENT_TYPE, SSE_EVENT_NAME, SSE_KEEPALIVE};
pub use syslog::{syslog_escape_msg, syslog_escape_param, SyslogFormat};

/// This host's name, as the outputs' `hostname` (from
/// `/proc/sys/kernel/hostname`; `localhost` when it cannot be read).
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

#[cfg(test)]
pub(crate) mod testing {
    use crate::event::{Event, Rule};
    use crate::time::Timestamp;

    /// Strings meant to break a format.
    pub const HOSTILE: &[&str] = &[
        "line\nbreak",
        "carriage\rreturn",
        "pipe|pipe",
        "eq=eq",
        "back\\slash",
        "trailing\\",
        "quote\"close]bracket",
        "tab\tand\0nul\x1b[31mansi",
        "ünïcødé ✓ 日本",
        "\u{2028}line separator",
        "",
    ];

    pub fn sample() -> Event {
        Event::new(
            Rule::VmIoFlood,
            Timestamp::from_unix_ns(1_700_000_000_123_456_789),
            "vm vm-1: disk I/O flood",
        )
        .with_vm("vm-1")
        .with_field("flood.rate_per_s", 25_000.5)
        .with_field("flood.kind", "disk_ops")
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn hostname_is_never_empty() {
        assert!(!super::hostname().is_empty());
    }
}
