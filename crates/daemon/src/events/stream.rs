//! `GET /events`: the hub (event ids, backlog, resume with `Last-Event-ID`) and
//! the server-sent event stream of each client.

use std::convert::Infallible;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use tokio::sync::watch;
use vigil_events::output::{SSE_CONTENT_TYPE, SSE_KEEPALIVE};
use vigil_events::{sse_frame, EventHub, HubConfig, Resume};

use super::Event;

/// How long an SSE stream stays silent before a keep-alive comment.
const KEEPALIVE: Duration = Duration::from_secs(15);
/// How many past events a new `GET /events` stream (without `Last-Event-ID`) gets.
pub const BACKLOG: usize = 1024;

/// `GET /events`: the hub (ids, backlog, resume) and what wakes async streams.
pub struct EventStream {
    hub: EventHub,
    published: watch::Sender<u64>,
    closed: watch::Sender<bool>,
    hostname: String,
}

impl EventStream {
    pub(super) fn new(first_id: u64, hostname: String) -> Self {
        EventStream {
            hub: EventHub::new(HubConfig {
                backlog: BACKLOG,
                subscriber_queue: 256,
                first_id,
            }),
            published: watch::channel(0).0,
            closed: watch::channel(false).0,
            hostname,
        }
    }

    pub(super) fn publish(&self, event: Event) {
        let id = self.hub.publish(event);
        self.published.send_replace(id);
    }

    /// Ends every stream (the daemon is shutting down).
    pub fn close(&self) {
        self.closed.send_replace(true);
    }

    /// The id of the last event published, if any.
    pub fn last_id(&self) -> Option<u64> {
        self.hub.last_id()
    }

    /// The `GET /events` response: `text/event-stream`, one frame per event
    /// (`id:`, `event: vigil`, `data:` Falco-style JSON), a keep-alive comment
    /// after 15 s of silence. Without `last_event_id`, the backlog first; with it,
    /// the events after it (a comment says when some were lost in between). With
    /// `follow` false the stream ends after what is there now.
    pub fn sse(&self, last_event_id: Option<u64>, follow: bool) -> Response {
        let mut published = self.published.subscribe();
        published.borrow_and_update();
        let resume = last_event_id.map_or(Resume::Backlog, Resume::After);
        let subscription = self.hub.subscribe(resume);
        let gap = subscription.gap().then(|| {
            ": some events were lost before these (they left the backlog, or the daemon restarted)\n\n".to_owned()
        });
        let hostname = self.hostname.clone();
        let closed = self.closed.subscribe();
        let state = (subscription, published, closed, gap);
        let stream = futures_util::stream::unfold(
            state,
            move |(mut sub, mut published, mut closed, gap)| {
                let hostname = hostname.clone();
                async move {
                    if let Some(text) = gap {
                        return Some((Ok::<_, Infallible>(text), (sub, published, closed, None)));
                    }
                    loop {
                        if *closed.borrow() {
                            return None;
                        }
                        match sub.try_next() {
                            Ok(Some(p)) => {
                                let frame = sse_frame(p.id, &p.event, &hostname);
                                return Some((Ok(frame), (sub, published, closed, None)));
                            }
                            Ok(None) if !follow => return None,
                            Ok(None) => {}
                            // Dropped for being too slow: the client resumes with
                            // Last-Event-ID.
                            Err(_) => return None,
                        }
                        tokio::select! {
                            changed = published.changed() => if changed.is_err() { return None },
                            _ = closed.changed() => {}
                            _ = tokio::time::sleep(KEEPALIVE) => {
                                return Some((Ok(SSE_KEEPALIVE.to_owned()), (sub, published, closed, None)));
                            }
                        }
                    }
                }
            },
        );
        (
            [
                (
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(SSE_CONTENT_TYPE),
                ),
                (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            ],
            Body::from_stream(stream),
        )
            .into_response()
    }
}
