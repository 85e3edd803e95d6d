//! A broadcast hub: every published event goes to every subscriber, and a bounded
//! backlog lets late subscribers (and reconnecting SSE clients) catch up.
//!
//! Std only: a mutex and one bounded `mpsc` channel per subscriber. Publishing
//! never blocks: a subscriber whose queue is full is dropped (its stream ends; an
//! SSE client reconnects with `Last-Event-ID` and resumes from the backlog).

use std::collections::VecDeque;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::event::Event;

/// Sizes of the hub.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HubConfig {
    /// Events kept for late subscribers (1024).
    pub backlog: usize,
    /// Events queued per subscriber before it counts as too slow and is
    /// dropped (256).
    pub subscriber_queue: usize,
    /// The id of the first event (1). Seed it from the clock (say, Unix
    /// milliseconds) so that ids grow across restarts of the daemon.
    pub first_id: u64,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            backlog: 1024,
            subscriber_queue: 256,
            first_id: 1,
        }
    }
}

/// An event as published: its stream id and the event.
#[derive(Clone, Debug, PartialEq)]
pub struct Published {
    pub id: u64,
    pub event: Arc<Event>,
}

/// Where a new subscriber starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resume {
    /// Only events published from now on.
    Live,
    /// Everything still in the backlog, then live events.
    Backlog,
    /// The events after this id (an SSE `Last-Event-ID`), then live events.
    After(u64),
}

#[derive(Debug)]
struct Inner {
    next_id: u64,
    backlog: VecDeque<Published>,
    subscribers: Vec<SyncSender<Published>>,
}

/// The hub; clones share it.
#[derive(Clone, Debug)]
pub struct EventHub {
    inner: Arc<Mutex<Inner>>,
    config: HubConfig,
}

impl EventHub {
    pub fn new(config: HubConfig) -> Self {
        EventHub {
            inner: Arc::new(Mutex::new(Inner {
                next_id: config.first_id,
                backlog: VecDeque::new(),
                subscribers: Vec::new(),
            })),
            config,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Nothing here can leave the state half-updated: take it even if a
        // holder panicked.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends `event` to every subscriber and keeps it in the backlog; returns its
    /// id. Never blocks on a subscriber.
    pub fn publish(&self, event: Event) -> u64 {
        let mut inner = self.lock();
        let id = inner.next_id;
        inner.next_id = inner.next_id.saturating_add(1);
        let p = Published {
            id,
            event: Arc::new(event),
        };
        inner.subscribers.retain(|tx| match tx.try_send(p.clone()) {
            Ok(()) => true,
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
        });
        if self.config.backlog > 0 {
            while inner.backlog.len() >= self.config.backlog {
                inner.backlog.pop_front();
            }
            inner.backlog.push_back(p);
        }
        id
    }

    /// A new subscriber, starting where `from` says. Backlog and live events
    /// reach it in id order, with no gap between them and no duplicate.
    pub fn subscribe(&self, from: Resume) -> Subscription {
        let mut inner = self.lock();
        let next_id = inner.next_id;
        let oldest = inner.backlog.front().map(|p| p.id);
        let (pending, gap): (VecDeque<Published>, bool) = match from {
            Resume::Live => (VecDeque::new(), false),
            Resume::Backlog => (inner.backlog.clone(), false),
            // An id this hub has not given out yet: one from before a restart.
            // Everything kept is new to this client, and some may be missing.
            Resume::After(seen) if seen >= next_id => (inner.backlog.clone(), true),
            Resume::After(seen) => {
                let pending: VecDeque<Published> = inner
                    .backlog
                    .iter()
                    .filter(|p| p.id > seen)
                    .cloned()
                    .collect();
                // Events from the first wanted to the oldest kept are lost.
                let first_wanted = seen.saturating_add(1).max(self.config.first_id);
                let gap = match oldest {
                    Some(o) => o > first_wanted,
                    None => first_wanted < next_id,
                };
                (pending, gap)
            }
        };
        let (tx, rx) = mpsc::sync_channel(self.config.subscriber_queue.max(1));
        inner.subscribers.push(tx);
        Subscription { pending, rx, gap }
    }

    /// Subscribers still attached (counting ones whose receiver was dropped
    /// since the last publish).
    pub fn subscriber_count(&self) -> usize {
        self.lock().subscribers.len()
    }

    /// The id of the latest event published, if any.
    pub fn last_id(&self) -> Option<u64> {
        let inner = self.lock();
        inner
            .next_id
            .checked_sub(1)
            .filter(|id| *id >= self.config.first_id)
    }
}

/// One subscriber's stream.
#[derive(Debug)]
pub struct Subscription {
    pending: VecDeque<Published>,
    rx: Receiver<Published>,
    gap: bool,
}

/// The hub dropped this subscriber (too slow) or is gone.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the event stream ended")]
pub struct Ended;

impl Subscription {
    /// Whether events between the resume point and the first one delivered were
    /// lost (they left the backlog, or the hub restarted).
    pub fn gap(&self) -> bool {
        self.gap
    }

    /// The next event if one is ready.
    pub fn try_next(&mut self) -> Result<Option<Published>, Ended> {
        if let Some(p) = self.pending.pop_front() {
            return Ok(Some(p));
        }
        match self.rx.try_recv() {
            Ok(p) => Ok(Some(p)),
            Err(TryRecvError::Empty) => Ok(None),
            Err(TryRecvError::Disconnected) => Err(Ended),
        }
    }

    /// The next event, waiting up to `timeout` (`Ok(None)`: none came; send a
    /// keepalive).
    pub fn next_timeout(&mut self, timeout: Duration) -> Result<Option<Published>, Ended> {
        if let Some(p) = self.pending.pop_front() {
            return Ok(Some(p));
        }
        match self.rx.recv_timeout(timeout) {
            Ok(p) => Ok(Some(p)),
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => Err(Ended),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::testing::sample;

    fn ids(s: &mut Subscription) -> Vec<u64> {
        let mut v = Vec::new();
        while let Ok(Some(p)) = s.try_next() {
            v.push(p.id);
        }
        v
    }

    fn hub(backlog: usize, queue: usize) -> EventHub {
        EventHub::new(HubConfig {
            backlog,
            subscriber_queue: queue,
            first_id: 1,
        })
    }

    #[test]
    fn fan_out_and_late_subscribers() {
        let h = hub(3, 16);
        assert_eq!(h.last_id(), None);
        let mut early = h.subscribe(Resume::Live);
        for _ in 0..5 {
            h.publish(sample());
        }
        assert_eq!(h.last_id(), Some(5));
        let mut live = h.subscribe(Resume::Live);
        let mut late = h.subscribe(Resume::Backlog);
        let mut resumed = h.subscribe(Resume::After(3));
        let mut lost = h.subscribe(Resume::After(1)); // 2 left the backlog
        let mut current = h.subscribe(Resume::After(5));
        h.publish(sample());
        assert_eq!(ids(&mut early), [1, 2, 3, 4, 5, 6]);
        assert_eq!(ids(&mut live), [6]);
        assert_eq!(ids(&mut late), [3, 4, 5, 6]);
        assert_eq!(ids(&mut resumed), [4, 5, 6]);
        assert!(!resumed.gap());
        assert_eq!(ids(&mut lost), [3, 4, 5, 6]);
        assert!(lost.gap());
        assert_eq!(ids(&mut current), [6]);
        assert!(!current.gap());
    }

    #[test]
    fn resume_after_a_restart_gets_the_backlog_and_a_gap() {
        let h = hub(10, 16);
        h.publish(sample());
        let mut s = h.subscribe(Resume::After(5000));
        assert!(s.gap());
        assert_eq!(ids(&mut s), [1]);
        // Nothing published yet: 0 means "seen nothing", 7 is from before.
        let empty = hub(10, 16);
        assert!(!empty.subscribe(Resume::After(0)).gap());
        assert!(empty.subscribe(Resume::After(7)).gap());
        // Seeded ids.
        let seeded = EventHub::new(HubConfig {
            first_id: 1000,
            ..HubConfig::default()
        });
        assert_eq!(seeded.publish(sample()), 1000);
        let mut s = seeded.subscribe(Resume::After(999));
        assert!(!s.gap());
        assert_eq!(ids(&mut s), [1000]);
    }

    #[test]
    fn slow_subscriber_is_dropped_not_waited_for() {
        let h = hub(100, 2);
        let mut slow = h.subscribe(Resume::Live);
        let mut fast = h.subscribe(Resume::Live);
        for i in 0..5 {
            h.publish(sample());
            if i < 4 {
                assert_eq!(fast.try_next().unwrap().unwrap().id, i + 1);
            }
        }
        // The slow one got its two, then was cut off; it can resume from the backlog.
        assert_eq!(slow.try_next().unwrap().unwrap().id, 1);
        assert_eq!(slow.try_next().unwrap().unwrap().id, 2);
        assert_eq!(slow.try_next(), Err(Ended));
        assert_eq!(h.subscriber_count(), 1);
        let mut again = h.subscribe(Resume::After(2));
        assert_eq!(ids(&mut again), [3, 4, 5]);
        assert!(!again.gap());
        assert_eq!(fast.try_next().unwrap().unwrap().id, 5);
    }

    #[test]
    fn dropped_receivers_are_pruned_and_threads_receive() {
        let h = hub(0, 8);
        drop(h.subscribe(Resume::Live));
        let mut s = h.subscribe(Resume::Backlog);
        assert_eq!(h.subscriber_count(), 2);
        let publisher = {
            let h = h.clone();
            std::thread::spawn(move || {
                for _ in 0..3 {
                    h.publish(sample());
                }
            })
        };
        let mut got = Vec::new();
        while got.len() < 3 {
            if let Some(p) = s.next_timeout(Duration::from_secs(10)).unwrap() {
                got.push(p.id);
            }
        }
        publisher.join().unwrap();
        assert_eq!(got, [1, 2, 3]);
        assert_eq!(h.subscriber_count(), 1);
        assert_eq!(s.next_timeout(Duration::from_millis(1)), Ok(None));
        drop(h);
        assert_eq!(s.next_timeout(Duration::from_millis(1)), Err(Ended));
    }
}
