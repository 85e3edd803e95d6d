//! `GET /events`: the daemon's event stream as server-sent events.
//!
//! Each event is one JSON object with Falco's output keys (`time`, `rule`,
//! `priority`, `output`, `output_fields`, `source`, `tags`), so the tools that read
//! Falco's JSON read Vigil's. Today the daemon publishes VM lifecycle events
//! (created, paused, resumed, stopping, stopped, exited, crashed, failed, destroyed);
//! security events and incidents can be published to the same hub later.
//!
//! A new subscriber first gets the last [`RECENT`] events, then live ones. A
//! subscriber too slow for the hub's buffer misses events (and is told so in an SSE
//! comment) rather than slowing anyone down. Streams end when the daemon shuts down.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use tokio::sync::{broadcast, watch};

/// How many past events a new subscriber is sent first.
pub const RECENT: usize = 100;
/// How many events a subscriber may fall behind before it misses some.
const BUFFER: usize = 256;

/// Falco's priorities, most severe first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Priority {
    Emergency,
    Alert,
    Critical,
    Error,
    Warning,
    Notice,
    Informational,
    Debug,
}

impl Priority {
    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Emergency => "Emergency",
            Priority::Alert => "Alert",
            Priority::Critical => "Critical",
            Priority::Error => "Error",
            Priority::Warning => "Warning",
            Priority::Notice => "Notice",
            Priority::Informational => "Informational",
            Priority::Debug => "Debug",
        }
    }
}

/// Fans events out to every `GET /events` stream.
pub struct EventHub {
    tx: broadcast::Sender<Arc<str>>,
    recent: Mutex<VecDeque<Arc<str>>>,
    closed: watch::Sender<bool>,
}

impl Default for EventHub {
    fn default() -> Self {
        Self::new()
    }
}

impl EventHub {
    pub fn new() -> Self {
        EventHub {
            tx: broadcast::channel(BUFFER).0,
            recent: Mutex::new(VecDeque::with_capacity(RECENT)),
            closed: watch::channel(false).0,
        }
    }

    /// Publishes one event (a JSON object with Falco's keys).
    pub fn publish(&self, event: &Value) {
        let text: Arc<str> = event.to_string().into();
        // Under the lock, so that a subscriber's history and live feed neither
        // overlap nor leave a gap.
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if recent.len() == RECENT {
            recent.pop_front();
        }
        recent.push_back(text.clone());
        let _ = self.tx.send(text);
    }

    /// Publishes a VM lifecycle event: rule "VM <what>", fields `vm.id` and
    /// `vm.state` plus `extra`.
    pub fn vm(&self, id: &str, what: &str, state: &str, priority: Priority, extra: Value) {
        let mut fields = json!({ "vm.id": id, "vm.state": state });
        if let (Some(f), Value::Object(extra)) = (fields.as_object_mut(), extra) {
            f.extend(extra);
        }
        let detail = fields
            .get("reason")
            .and_then(Value::as_str)
            .map(|r| format!(": {r}"))
            .unwrap_or_default();
        self.publish(&json!({
            "time": rfc3339_now(),
            "rule": format!("VM {what}"),
            "priority": priority.as_str(),
            "output": format!("VM {id} {what}{detail} (vm.id={id} vm.state={state})"),
            "output_fields": fields,
            "source": "vigil",
            "tags": ["vm", "lifecycle"],
        }));
    }

    /// Ends every stream (the daemon is shutting down).
    pub fn close(&self) {
        let _ = self.closed.send(true);
    }

    /// The recent events and a receiver for the ones after them.
    fn subscribe(&self) -> (Vec<Arc<str>>, broadcast::Receiver<Arc<str>>) {
        let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        (recent.iter().cloned().collect(), self.tx.subscribe())
    }

    /// The `GET /events` response: `text/event-stream`, one `data:` line per event,
    /// a keep-alive comment every 15 s.
    pub fn sse(&self) -> Response {
        let (history, rx) = self.subscribe();
        let closed = self.closed.subscribe();
        enum Step {
            History(std::vec::IntoIter<Arc<str>>),
            Live,
        }
        let state = (Step::History(history.into_iter()), rx, closed);
        let stream = futures_util::stream::unfold(state, |(step, mut rx, mut closed)| async move {
            if let Step::History(mut past) = step {
                if let Some(text) = past.next() {
                    let event = Event::default().data(&*text);
                    return Some((
                        Ok::<_, Infallible>(event),
                        (Step::History(past), rx, closed),
                    ));
                }
            }
            loop {
                if *closed.borrow() {
                    return None;
                }
                tokio::select! {
                    received = rx.recv() => match received {
                        Ok(text) => {
                            let event = Event::default().data(&*text);
                            return Some((Ok(event), (Step::Live, rx, closed)));
                        }
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            let event = Event::default().comment(format!("missed {n} events"));
                            return Some((Ok(event), (Step::Live, rx, closed)));
                        }
                        Err(broadcast::error::RecvError::Closed) => return None,
                    },
                    _ = closed.changed() => {}
                }
            }
        });
        Sse::new(stream)
            .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
            .into_response()
    }
}

/// Now as RFC 3339 UTC with nanoseconds, the way Falco writes `time`.
pub fn rfc3339_now() -> String {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339(d)
}

fn rfc3339(since_epoch: Duration) -> String {
    let secs = since_epoch.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since_epoch.subsec_nanos()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339() {
        assert_eq!(rfc3339(Duration::ZERO), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(
            rfc3339(Duration::new(951_782_400 + 86_399, 5)),
            "2000-02-29T23:59:59.000000005Z"
        );
        assert_eq!(
            rfc3339(Duration::from_secs(1_798_761_600)),
            "2027-01-01T00:00:00.000000000Z"
        );
    }

    #[test]
    fn lifecycle_events_have_falcos_keys_and_history_is_bounded() {
        let hub = EventHub::new();
        for i in 0..RECENT + 5 {
            hub.vm(
                &format!("vm{i}"),
                "paused",
                "paused",
                Priority::Informational,
                json!({}),
            );
        }
        hub.vm(
            "web",
            "crashed",
            "crashed",
            Priority::Critical,
            json!({"reason": "triple fault"}),
        );
        let (recent, _) = hub.subscribe();
        assert_eq!(recent.len(), RECENT);
        let last: Value = serde_json::from_str(recent.last().unwrap()).unwrap();
        for key in [
            "time",
            "rule",
            "priority",
            "output",
            "output_fields",
            "source",
        ] {
            assert!(last.get(key).is_some(), "no {key} in {last}");
        }
        assert_eq!(last["rule"], "VM crashed");
        assert_eq!(last["priority"], "Critical");
        assert_eq!(last["output_fields"]["vm.id"], "web");
        assert_eq!(last["output_fields"]["reason"], "triple fault");
        assert!(last["output"].as_str().unwrap().contains("triple fault"));
    }
}
