//! The event record: one security event about a host or a VM. Its vocabulary
//! (rules, priorities, sources, ATT&CK techniques) is `vigil_model`'s.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize, Serializer};
use serde_json::Value;

use vigil_model::rule::T1190;
pub use vigil_model::rule::{Mitre, Priority, Rule, Source, UnknownName};
pub use vigil_model::time::Timestamp;

/// How the API that refused a request is reached: it picks the ATT&CK technique of
/// `api_malformed_request` and `api_unauthorized` (README: "Choosing the ATT&CK
/// tags").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApiTransport {
    /// A Unix socket on the host (Firecracker's convention): the peer is a local
    /// process reaching for a VMM that holds more privilege than it: T1068.
    UnixSocket,
    /// A TCP listener others can reach: T1190, Exploit Public-Facing Application.
    Network,
}

impl ApiTransport {
    pub const fn as_str(self) -> &'static str {
        match self {
            ApiTransport::UnixSocket => "unix_socket",
            ApiTransport::Network => "network",
        }
    }
}

/// One security event.
///
/// Serialized (our own schema, for storage and the API) with both `time` (RFC 3339
/// UTC, nanoseconds) and `time_unix_ns`; deserialization takes `time_unix_ns` when
/// present, else parses `time`. The Falco-like JSON of the outputs is
/// [`crate::output::falco_json`].
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(try_from = "EventRepr")]
pub struct Event {
    pub time: Timestamp,
    /// The VM it is about; `None` for the host as a whole.
    pub vm_id: Option<String>,
    pub rule: Rule,
    pub priority: Priority,
    pub source: Source,
    /// One human-readable line.
    pub message: String,
    /// Machine-readable details, dotted keys (`flood.rate_per_s`).
    pub fields: BTreeMap<String, Value>,
    /// Category words, then the ATT&CK tactic and technique where one applies.
    pub tags: Vec<String>,
    /// The incident the correlator filed it under.
    pub incident_id: Option<u64>,
}

impl Event {
    /// An event of `rule` with its default priority, source and tags, at `time`.
    pub fn new(rule: Rule, time: Timestamp, message: impl Into<String>) -> Self {
        Event {
            time,
            vm_id: None,
            rule,
            priority: rule.default_priority(),
            source: rule.source(),
            message: message.into(),
            fields: BTreeMap::new(),
            tags: rule.default_tags(),
            incident_id: None,
        }
    }

    /// About this VM.
    pub fn with_vm(mut self, vm_id: impl Into<String>) -> Self {
        self.vm_id = Some(vm_id.into());
        self
    }

    /// At this priority instead of the rule's default.
    pub fn with_priority(mut self, priority: Priority) -> Self {
        self.priority = priority;
        self
    }

    /// With one more field (replacing one of the same key).
    pub fn with_field(mut self, key: impl Into<String>, value: impl Into<Value>) -> Self {
        self.fields.insert(key.into(), value.into());
        self
    }

    /// The guest of `vm_id` crashed; `reason` as the VMM reported it ("triple
    /// fault", "KVM internal error", "emulation failure").
    pub fn vm_crashed(vm_id: impl Into<String>, time: Timestamp, reason: &str) -> Self {
        let vm_id = vm_id.into();
        Event::new(
            Rule::VmCrashed,
            time,
            format!("vm {vm_id} crashed: {reason}"),
        )
        .with_vm(vm_id)
        .with_field("crash.reason", reason)
    }

    /// The API refused a request: `rule` is [`Rule::ApiMalformedRequest`] or
    /// [`Rule::ApiUnauthorized`] (any other rule is taken as malformed). `peer`
    /// names the client as the API knows it (a uid, an address); `detail` says what
    /// was wrong. The ATT&CK tag follows `transport`.
    pub fn api_rejected(
        rule: Rule,
        time: Timestamp,
        vm_id: Option<&str>,
        transport: ApiTransport,
        peer: &str,
        detail: &str,
    ) -> Self {
        let rule = match rule {
            Rule::ApiUnauthorized => Rule::ApiUnauthorized,
            _ => Rule::ApiMalformedRequest,
        };
        let what = match rule {
            Rule::ApiUnauthorized => "unauthorized",
            _ => "malformed",
        };
        let mut e = Event::new(
            rule,
            time,
            format!("api: {what} request from {peer}: {detail}"),
        )
        .with_field("api.transport", transport.as_str())
        .with_field("api.peer", peer)
        .with_field("api.detail", detail);
        if let Some(vm) = vm_id {
            e = e.with_vm(vm);
        }
        if transport == ApiTransport::Network {
            e.tags = vec![
                "api".to_owned(),
                T1190.tactic_tag.to_owned(),
                T1190.technique.to_owned(),
            ];
        }
        e
    }
}

/// The serialized shape of [`Event`].
#[derive(Serialize, Deserialize)]
struct EventRepr {
    #[serde(default)]
    time: Option<String>,
    #[serde(default)]
    time_unix_ns: Option<u64>,
    vm_id: Option<String>,
    rule: Rule,
    priority: Priority,
    source: Source,
    message: String,
    #[serde(default)]
    fields: BTreeMap<String, Value>,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    incident_id: Option<u64>,
}

/// Why a serialized event has no usable time.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EventTimeError {
    #[error("not an RFC 3339 time: {0:?}")]
    NotRfc3339(String),
    #[error("missing field `time` or `time_unix_ns`")]
    Missing,
}

impl TryFrom<EventRepr> for Event {
    type Error = EventTimeError;
    fn try_from(r: EventRepr) -> Result<Self, EventTimeError> {
        let time = match (r.time_unix_ns, r.time) {
            (Some(ns), _) => Timestamp::from_unix_ns(ns),
            (None, Some(s)) => Timestamp::parse_rfc3339(&s).ok_or(EventTimeError::NotRfc3339(s))?,
            (None, None) => return Err(EventTimeError::Missing),
        };
        Ok(Event {
            time,
            vm_id: r.vm_id,
            rule: r.rule,
            priority: r.priority,
            source: r.source,
            message: r.message,
            fields: r.fields,
            tags: r.tags,
            incident_id: r.incident_id,
        })
    }
}

impl Serialize for Event {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut st = s.serialize_struct("Event", 10)?;
        st.serialize_field("time", &self.time.rfc3339())?;
        st.serialize_field("time_unix_ns", &self.time.unix_ns())?;
        st.serialize_field("vm_id", &self.vm_id)?;
        st.serialize_field("rule", &self.rule)?;
        st.serialize_field("priority", &self.priority)?;
        st.serialize_field("source", &self.source)?;
        st.serialize_field("message", &self.message)?;
        st.serialize_field("fields", &self.fields)?;
        st.serialize_field("tags", &self.tags)?;
        st.serialize_field("incident_id", &self.incident_id)?;
        st.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_carry_attack_techniques() {
        assert_eq!(
            Rule::VmIoFlood.default_tags(),
            ["vm", "resource_exhaustion", "mitre_impact", "T1499.001"]
        );
        assert!(Rule::VmPacketFlood
            .default_tags()
            .contains(&"T1498.001".to_owned()));
        assert!(Rule::IncidentDosCrash
            .default_tags()
            .contains(&"T1499".to_owned()));
        assert!(Rule::HostMemoryPressure.mitre().is_none());
        let local = Event::api_rejected(
            Rule::ApiUnauthorized,
            Timestamp::EPOCH,
            Some("vm1"),
            ApiTransport::UnixSocket,
            "uid=1001",
            "PUT /actions",
        );
        assert!(local.tags.contains(&"T1068".to_owned()));
        assert_eq!(local.priority, Priority::Warning);
        let remote = Event::api_rejected(
            Rule::VmCrashed, // not an API rule: taken as malformed
            Timestamp::EPOCH,
            None,
            ApiTransport::Network,
            "192.0.2.1:5555",
            "bad JSON",
        );
        assert_eq!(remote.rule, Rule::ApiMalformedRequest);
        assert_eq!(remote.tags, ["api", "mitre_initial_access", "T1190"]);
        assert_eq!(remote.vm_id, None);
    }

    #[test]
    fn event_serde_round_trip() {
        let e = Event::vm_crashed(
            "vm-7",
            Timestamp::from_unix_ns(1_700_000_000_000_000_001),
            "triple fault",
        )
        .with_field("vcpu", 2);
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(json["time"], "2023-11-14T22:13:20.000000001Z");
        assert_eq!(json["time_unix_ns"], 1_700_000_000_000_000_001u64);
        assert_eq!(json["rule"], "vm_crashed");
        assert_eq!(json["priority"], "Error");
        assert_eq!(json["source"], "host");
        assert_eq!(json["vm_id"], "vm-7");
        assert_eq!(json["fields"]["crash.reason"], "triple fault");
        assert_eq!(json["incident_id"], Value::Null);
        let back: Event = serde_json::from_value(json).unwrap();
        assert_eq!(back, e);
        // `time` alone is enough; garbage is an error, not a panic.
        let only_time = r#"{"time":"2023-11-14T22:13:20Z","vm_id":null,"rule":"vm_io_flood",
            "priority":"warning","source":"host","message":"m"}"#;
        let e: Event = serde_json::from_str(only_time).unwrap();
        assert_eq!(e.time, Timestamp::from_unix_secs(1_700_000_000));
        for bad in [
            r#"{"vm_id":null,"rule":"vm_io_flood","priority":"Warning","source":"host","message":"m"}"#,
            r#"{"time":"yesterday","vm_id":null,"rule":"vm_io_flood","priority":"Warning","source":"host","message":"m"}"#,
            r#"{"time_unix_ns":1,"vm_id":null,"rule":"nope","priority":"Warning","source":"host","message":"m"}"#,
            r#"[1,2,3]"#,
        ] {
            assert!(serde_json::from_str::<Event>(bad).is_err(), "{bad}");
        }
        // The time's error says which field and value.
        let no_time = r#"{"vm_id":null,"rule":"vm_io_flood","priority":"Warning","source":"host","message":"m"}"#;
        let e = serde_json::from_str::<Event>(no_time).unwrap_err();
        assert!(e.to_string().contains("`time` or `time_unix_ns`"), "{e}");
        let e = serde_json::from_str::<Event>(&no_time.replace("{", r#"{"time":"yesterday","#))
            .unwrap_err();
        assert!(e.to_string().contains("\"yesterday\""), "{e}");
    }
}
