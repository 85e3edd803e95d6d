//! Falco-like JSON: one object per event, one line per object.

use std::io::{self, Write};

use serde_json::{json, Map, Value};

use crate::event::Event;

/// The event as Falco's `json_output` writes an alert:
///
/// ```json
/// {"hostname":"h","output":"vm vm-1: disk I/O flood ...","output_fields":{
///   "evt.time":1700000000123456789,"flood.kind":"disk_ops","incident.id":1,
///   "vm.id":"vm-1"},"priority":"Warning","rule":"vm_io_flood","source":"host",
///   "tags":["vm","resource_exhaustion","mitre_impact","T1499.001"],
///   "time":"2023-11-14T22:13:20.123456789Z"}
/// ```
///
/// `output_fields` holds the event's fields plus `evt.time` (Unix ns), `vm.id`
/// (absent for host events) and `incident.id` (absent when none); those three
/// win over an event field of the same name.
pub fn falco_json(event: &Event, hostname: &str) -> Value {
    let mut fields: Map<String, Value> = event
        .fields
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    fields.insert("evt.time".into(), event.time.unix_ns().into());
    match &event.vm_id {
        Some(vm) => fields.insert("vm.id".into(), vm.clone().into()),
        None => fields.remove("vm.id"),
    };
    match event.incident_id {
        Some(id) => fields.insert("incident.id".into(), id.into()),
        None => fields.remove("incident.id"),
    };
    json!({
        "time": event.time.rfc3339(),
        "rule": event.rule.as_str(),
        "priority": event.priority.as_str(),
        "output": event.message,
        "output_fields": fields,
        "source": event.source.as_str(),
        "tags": event.tags,
        "hostname": hostname,
    })
}

/// [`falco_json`] as one line, `\n`-terminated. JSON escapes every control
/// character, so a hostile message cannot split the line.
pub fn falco_json_line(event: &Event, hostname: &str) -> String {
    let mut line = falco_json(event, hostname).to_string();
    line.push('\n');
    line
}

/// Writes events as Falco-like JSON lines to a file (or any `Write`). Each line
/// goes out in a single `write_all`, then a flush, so lines from several writers
/// of one `O_APPEND` file do not interleave.
#[derive(Debug)]
pub struct JsonLinesWriter<W: Write> {
    out: W,
    hostname: String,
}

impl<W: Write> JsonLinesWriter<W> {
    pub fn new(out: W, hostname: impl Into<String>) -> Self {
        JsonLinesWriter {
            out,
            hostname: hostname.into(),
        }
    }

    pub fn write_event(&mut self, event: &Event) -> io::Result<()> {
        self.out
            .write_all(falco_json_line(event, &self.hostname).as_bytes())?;
        self.out.flush()
    }

    pub fn into_inner(self) -> W {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::testing::{sample, HOSTILE};

    #[test]
    fn falco_keys() {
        let mut e = sample();
        e.incident_id = Some(7);
        let v = falco_json(&e, "host-a");
        let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "hostname",
                "output",
                "output_fields",
                "priority",
                "rule",
                "source",
                "tags",
                "time"
            ]
        );
        assert_eq!(v["time"], "2023-11-14T22:13:20.123456789Z");
        assert_eq!(v["rule"], "vm_io_flood");
        assert_eq!(v["priority"], "Warning");
        assert_eq!(v["output"], "vm vm-1: disk I/O flood");
        assert_eq!(v["source"], "host");
        assert_eq!(v["hostname"], "host-a");
        assert_eq!(v["tags"][3], "T1499.001");
        let f = &v["output_fields"];
        assert_eq!(f["vm.id"], "vm-1");
        assert_eq!(f["incident.id"], 7);
        assert_eq!(f["evt.time"], 1_700_000_000_123_456_789u64);
        assert_eq!(f["flood.rate_per_s"], 25_000.5);
    }

    #[test]
    fn host_event_has_no_vm_id_and_reserved_fields_win() {
        let e = crate::event::Event::new(
            crate::event::Rule::HostIoPressure,
            crate::time::Timestamp::EPOCH,
            "io",
        )
        .with_field("vm.id", "spoofed")
        .with_field("incident.id", "spoofed")
        .with_field("evt.time", "spoofed");
        let v = falco_json(&e, "h");
        let f = v["output_fields"].as_object().unwrap();
        assert!(!f.contains_key("vm.id"));
        assert!(!f.contains_key("incident.id"));
        assert_eq!(f["evt.time"], 0);
    }

    #[test]
    fn hostile_strings_stay_on_one_line_and_round_trip() {
        let mut w = JsonLinesWriter::new(Vec::new(), "h\nost");
        for s in HOSTILE {
            let mut e = sample().with_field(*s, *s);
            e.message = (*s).to_owned();
            e.vm_id = Some((*s).to_owned());
            w.write_event(&e).unwrap();
        }
        let text = String::from_utf8(w.into_inner()).unwrap();
        let lines: Vec<&str> = text.split('\n').collect();
        assert_eq!(lines.len(), HOSTILE.len() + 1);
        assert_eq!(lines.last(), Some(&""));
        for (line, s) in lines.iter().zip(HOSTILE) {
            assert!(!line.contains('\r'));
            let v: Value = serde_json::from_str(line).unwrap();
            assert_eq!(v["output"], *s);
            assert_eq!(v["output_fields"]["vm.id"], *s);
            assert_eq!(v["hostname"], "h\nost");
        }
    }
}
