//! API misuse events (`api_malformed_request`, `api_unauthorized`) limited per
//! peer and rule in a window, then one summary, so a scanner cannot flood the
//! stream.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use vigil_events::{ApiTransport, Timestamp};

use super::{Event, Rule};

/// Per-peer limits on API misuse events, so a scanner cannot flood the log.
pub(super) struct ApiLimiter {
    pub(super) per_window: u32,
    pub(super) window: Duration,
    /// (peer, rule) -> (window start, reported, suppressed, last transport, last detail)
    pub(super) peers: HashMap<(String, Rule), ApiWindow>,
}

pub(super) struct ApiWindow {
    start: Instant,
    reported: u32,
    suppressed: u64,
    transport: ApiTransport,
}

/// The most peers the limiter tracks; beyond that, new peers share one entry.
const MAX_PEERS: usize = 4096;

impl ApiLimiter {
    /// Whether this event may be reported now; also returns the summary of the
    /// peer's previous window when one ended with events suppressed.
    pub(super) fn admit(
        &mut self,
        peer: &str,
        rule: Rule,
        transport: ApiTransport,
        now: Instant,
    ) -> (bool, Option<Event>) {
        let mut summaries = self.expire(now, Some((peer, rule)));
        let mut key = (peer.to_owned(), rule);
        if !self.peers.contains_key(&key) && self.peers.len() >= MAX_PEERS {
            key = ("(other peers)".to_owned(), rule);
        }
        let w = self.peers.entry(key).or_insert(ApiWindow {
            start: now,
            reported: 0,
            suppressed: 0,
            transport,
        });
        w.transport = transport;
        let admit = if w.reported < self.per_window {
            w.reported += 1;
            true
        } else {
            w.suppressed += 1;
            false
        };
        (admit, summaries.pop())
    }

    /// Ends the windows older than the window length (`only`: just that one),
    /// returning a summary event for each that suppressed events.
    pub(super) fn expire(&mut self, now: Instant, only: Option<(&str, Rule)>) -> Vec<Event> {
        let window = self.window;
        let mut out = Vec::new();
        self.peers.retain(|(peer, rule), w| {
            if only.is_some_and(|(p, r)| p != peer || r != *rule)
                || now.saturating_duration_since(w.start) < window
            {
                return true;
            }
            if w.suppressed > 0 {
                let detail = format!(
                    "{} more such requests in {} s were not reported one by one",
                    w.suppressed,
                    window.as_secs()
                );
                out.push(
                    Event::api_rejected(*rule, Timestamp::now(), None, w.transport, peer, &detail)
                        .with_field("api.suppressed", w.suppressed),
                );
            }
            false
        });
        out
    }
}

/// Where an API request came from, as the API's middleware knows it.
#[derive(Debug, Clone)]
pub struct Peer {
    pub transport: ApiTransport,
    /// `uid=1000 pid=42` on the Unix socket, `192.0.2.1:5555` on TCP.
    pub name: String,
    /// What the limiter counts by: the uid, or the IP address (not the port).
    pub key: String,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn api_events_are_limited_per_peer() {
        let mut l = ApiLimiter {
            per_window: 3,
            window: Duration::from_secs(60),
            peers: HashMap::new(),
        };
        let t0 = Instant::now();
        let net = ApiTransport::Network;
        let admitted: Vec<bool> = (0..10)
            .map(|_| l.admit("192.0.2.1", Rule::ApiUnauthorized, net, t0).0)
            .collect();
        assert_eq!(admitted.iter().filter(|a| **a).count(), 3);
        // Another peer, and another rule, have their own share.
        assert!(l.admit("192.0.2.2", Rule::ApiUnauthorized, net, t0).0);
        assert!(l.admit("192.0.2.1", Rule::ApiMalformedRequest, net, t0).0);
        // The window ends: one summary, then events again.
        let later = t0 + Duration::from_secs(61);
        let (admit, summary) = l.admit("192.0.2.1", Rule::ApiUnauthorized, net, later);
        assert!(admit);
        let summary = summary.expect("a summary");
        assert_eq!(summary.rule, Rule::ApiUnauthorized);
        assert_eq!(summary.fields["api.suppressed"], json!(7));
        assert!(summary.message.contains("7 more"), "{}", summary.message);
        // Windows without suppressed events end silently.
        assert!(l.expire(later + Duration::from_secs(61), None).is_empty());
        assert!(l.peers.is_empty());
    }
}
