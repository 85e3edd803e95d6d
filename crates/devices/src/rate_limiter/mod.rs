//! Token-bucket rate limiting for device I/O: one bucket for bytes, one for
//! operations, each with a refill rate, a burst size and, as Firecracker has it,
//! a one-time burst spent before the bucket's own tokens and never refilled.
//!
//! A running device's limits change through a [`RateLimitControl`]: another thread
//! (the API) posts a [`LimitUpdate`]; the limiter picks it up, with one atomic load
//! when nothing changed, before it next decides on a request. No lock is held
//! while a device serves I/O.

mod persist;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use persist::{RateLimitState, TokenBucketState};
pub use vigil_model::config::rate_limit::{BucketUpdate, LimitUpdate, RateLimit};

/// One token bucket: `rate` tokens per second, holding at most `burst`.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenBucket {
    rate: u64,
    burst: u64,
    /// May go negative: a request larger than the burst is let through when the
    /// bucket is full, and later requests wait until the debt is repaid.
    tokens: f64,
    /// Firecracker's `one_time_burst`: spent first, never refilled.
    one_time: u64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket refilled at `rate` per second, holding up to `burst` (at least 1).
    pub fn new(rate: u64, burst: u64) -> Self {
        let burst = burst.max(1);
        Self {
            rate,
            burst,
            tokens: burst as f64,
            one_time: 0,
            last: Instant::now(),
        }
    }

    /// The same bucket with `tokens` more to spend once, before its own.
    pub fn with_one_time_burst(mut self, tokens: u64) -> Self {
        self.one_time = tokens;
        self
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate as f64).min(self.burst as f64);
        self.last = now;
    }

    /// How long until `n` tokens may be taken (zero when they may be now).
    fn wait_for(&mut self, n: u64, now: Instant) -> Duration {
        self.refill(now);
        if self.one_time >= n {
            return Duration::ZERO;
        }
        let needed = (n - self.one_time).min(self.burst) as f64;
        if self.tokens >= needed {
            Duration::ZERO
        } else if self.rate == 0 {
            Duration::MAX
        } else {
            Duration::from_secs_f64((needed - self.tokens) / self.rate as f64)
        }
    }

    fn take(&mut self, n: u64) {
        let from_one_time = n.min(self.one_time);
        self.one_time -= from_one_time;
        self.tokens -= (n - from_one_time) as f64;
    }
}

/// Limits of one device (or one direction of a device).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RateLimiter {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    throttled: u64,
    control: Control,
}

/// The control a limiter polls, if one was handed out. Limiters compare equal
/// whatever their controls.
#[derive(Clone, Debug, Default)]
struct Control(Option<Arc<RateLimitControl>>);

impl PartialEq for Control {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

/// Applies one bucket's change to a limiter's bucket.
fn apply(update: BucketUpdate, bucket: &mut Option<TokenBucket>) {
    match update {
        BucketUpdate::Keep => {}
        BucketUpdate::Remove => *bucket = None,
        BucketUpdate::Set {
            rate,
            burst,
            one_time_burst,
        } => *bucket = Some(TokenBucket::new(rate, burst).with_one_time_burst(one_time_burst)),
    }
}

/// Where another thread posts limit changes for one limiter (see
/// [`RateLimiter::control`]). Posting never waits for the device; the limiter
/// applies what was posted before it decides on its next request.
#[derive(Debug, Default)]
pub struct RateLimitControl {
    changed: AtomicBool,
    pending: Mutex<LimitUpdate>,
}

impl RateLimitControl {
    /// Posts `update`; it joins any update not yet applied (a bucket it keeps
    /// stays as the earlier update left it).
    pub fn post(&self, update: LimitUpdate) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.bandwidth = pending.bandwidth.then(update.bandwidth);
        pending.ops = pending.ops.then(update.ops);
        self.changed.store(true, Ordering::Release);
    }

    /// The update posted since the last call, if any.
    fn take(&self) -> Option<LimitUpdate> {
        // Read before the swap: this runs per request, and a plain load of a
        // flag nobody changed costs no locked instruction.
        if !self.changed.load(Ordering::Relaxed) || !self.changed.swap(false, Ordering::Acquire) {
            return None;
        }
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        Some(std::mem::take(&mut *pending))
    }
}

impl RateLimiter {
    /// A limiter for `limit`; an empty limit never throttles.
    pub fn new(limit: RateLimit) -> Self {
        let bucket = |(rate, burst): (u64, Option<u64>), one_time| {
            TokenBucket::new(rate, burst.unwrap_or(rate)).with_one_time_burst(one_time)
        };
        Self {
            bandwidth: limit.bandwidth.map(|b| bucket(b, limit.one_time_burst.0)),
            ops: limit.ops.map(|b| bucket(b, limit.one_time_burst.1)),
            throttled: 0,
            control: Control::default(),
        }
    }

    /// The limit this limiter enforces, each burst as it took effect (without
    /// what is left of a one-time burst).
    pub fn limit(&self) -> RateLimit {
        let pair = |b: &TokenBucket| (b.rate, Some(b.burst));
        RateLimit {
            bandwidth: self.bandwidth.as_ref().map(pair),
            ops: self.ops.as_ref().map(pair),
            one_time_burst: (0, 0),
        }
    }

    /// Changes the limits now (what a posted update does).
    pub fn update(&mut self, update: LimitUpdate) {
        apply(update.bandwidth, &mut self.bandwidth);
        apply(update.ops, &mut self.ops);
    }

    /// The control through which another thread changes this limiter's limits
    /// (the same one on every call).
    pub fn control(&mut self) -> Arc<RateLimitControl> {
        self.control.0.get_or_insert_with(Default::default).clone()
    }

    /// Applies an update posted on the control, if any.
    fn poll(&mut self) {
        if let Some(update) = self.control.0.as_ref().and_then(|c| c.take()) {
            self.update(update);
        }
    }

    /// Takes one operation of `bytes` if both buckets allow it now; otherwise
    /// returns how long to wait and takes nothing.
    pub fn consume(&mut self, bytes: u64) -> Result<(), Duration> {
        consume_all(&mut [self], bytes)
    }

    /// How long until one operation of `bytes` may pass (zero: now).
    fn wait(&mut self, bytes: u64, now: Instant) -> Duration {
        [
            self.bandwidth.as_mut().map(|b| b.wait_for(bytes, now)),
            self.ops.as_mut().map(|b| b.wait_for(1, now)),
        ]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or(Duration::ZERO)
    }

    fn take(&mut self, bytes: u64) {
        if let Some(b) = self.bandwidth.as_mut() {
            b.take(bytes);
        }
        if let Some(b) = self.ops.as_mut() {
            b.take(1);
        }
    }

    /// How many times a request had to wait.
    pub fn throttled_count(&self) -> u64 {
        self.throttled
    }
}

/// Takes one operation of `bytes` from every limiter in `limiters` (a device's
/// overall limit and its direction's, say) if all allow it now; otherwise returns
/// the longest wait and takes nothing from any.
pub fn consume_all(limiters: &mut [&mut RateLimiter], bytes: u64) -> Result<(), Duration> {
    for l in limiters.iter_mut() {
        l.poll();
    }
    // Unlimited (the default): no clock read per request.
    if limiters
        .iter()
        .all(|l| l.bandwidth.is_none() && l.ops.is_none())
    {
        return Ok(());
    }
    let now = Instant::now();
    let wait = limiters
        .iter_mut()
        .map(|l| l.wait(bytes, now))
        .max()
        .unwrap_or(Duration::ZERO);
    if wait > Duration::ZERO {
        for l in limiters.iter_mut() {
            l.throttled += 1;
        }
        return Err(wait);
    }
    for l in limiters.iter_mut() {
        l.take(bytes);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unlimited_never_waits() {
        let mut r = RateLimiter::new(RateLimit::default());
        for _ in 0..1000 {
            assert_eq!(r.consume(1 << 20), Ok(()));
        }
        assert_eq!(r.throttled_count(), 0);
    }

    #[test]
    fn ops_burst_then_wait_proportional_to_rate() {
        let mut r = RateLimiter::new(RateLimit {
            ops: Some((100, Some(10))),
            ..Default::default()
        });
        for _ in 0..10 {
            assert_eq!(r.consume(0), Ok(()));
        }
        let wait = r.consume(0).unwrap_err();
        assert!(
            wait > Duration::from_millis(5) && wait <= Duration::from_millis(11),
            "{wait:?}"
        );
        assert_eq!(r.throttled_count(), 1);
        std::thread::sleep(wait + Duration::from_millis(2));
        assert_eq!(r.consume(0), Ok(()));
    }

    #[test]
    fn consume_all_takes_from_every_limiter_or_none() {
        let mut total = RateLimiter::new(RateLimit {
            ops: Some((1000, Some(100))),
            ..Default::default()
        });
        let mut reads = RateLimiter::new(RateLimit {
            ops: Some((10, Some(1))),
            ..Default::default()
        });
        assert_eq!(consume_all(&mut [&mut total, &mut reads], 0), Ok(()));
        // The read bucket is empty now: nothing is taken from the total either.
        assert!(consume_all(&mut [&mut total, &mut reads], 0).is_err());
        for _ in 0..99 {
            assert_eq!(total.consume(0), Ok(()));
        }
        assert!(
            total.consume(0).is_err(),
            "the total had 100 and lost 1 + 99"
        );
    }

    #[test]
    fn bandwidth_lets_an_oversized_request_through_then_repays() {
        let mut r = RateLimiter::new(RateLimit {
            bandwidth: Some((1000, Some(100))),
            ..Default::default()
        });
        // 500 bytes is above the 100-byte burst: allowed once the bucket is full.
        assert_eq!(r.consume(500), Ok(()));
        // Now 400 bytes in debt: the next 1-byte request waits ~0.4 s.
        let wait = r.consume(1).unwrap_err();
        assert!(wait >= Duration::from_millis(390), "{wait:?}");
    }

    #[test]
    fn one_time_burst_is_spent_first_and_not_refilled() {
        let mut r = RateLimiter::new(RateLimit {
            ops: Some((1, Some(2))),
            one_time_burst: (0, 3),
            ..Default::default()
        });
        // 3 one-time operations, then the bucket's own 2.
        for _ in 0..5 {
            assert_eq!(r.consume(0), Ok(()));
        }
        assert!(r.consume(0).is_err());
        assert_eq!(r.limit().one_time_burst, (0, 0));
    }

    #[test]
    fn a_blocked_bucket_is_re_evaluated_after_an_update() {
        let mut r = RateLimiter::new(RateLimit {
            bandwidth: Some((1, Some(1))),
            ..Default::default()
        });
        let control = r.control();
        // A full 1-byte bucket lets 4 KiB through, then owes an hour's worth.
        assert_eq!(r.consume(4096), Ok(()));
        let wait = r.consume(4096).unwrap_err();
        assert!(wait > Duration::from_secs(4000), "{wait:?}");
        // Lifting the limit takes effect on the very next request.
        control.post(LimitUpdate {
            bandwidth: BucketUpdate::Remove,
            ..Default::default()
        });
        assert_eq!(r.consume(4096), Ok(()));
        assert_eq!(r.limit(), RateLimit::default());
        // A new limit is a full bucket of its own size.
        control.post(LimitUpdate {
            ops: BucketUpdate::Set {
                rate: 10,
                burst: 2,
                one_time_burst: 1,
            },
            ..Default::default()
        });
        for _ in 0..3 {
            assert_eq!(r.consume(1 << 20), Ok(()));
        }
        let wait = r.consume(0).unwrap_err();
        assert!(wait <= Duration::from_millis(100), "{wait:?}");
        assert_eq!(r.throttled_count(), 2);
    }

    #[test]
    fn posted_updates_merge_bucket_by_bucket() {
        let mut r = RateLimiter::new(RateLimit {
            bandwidth: Some((1000, None)),
            ops: Some((10, None)),
            ..Default::default()
        });
        let control = r.control();
        let set = |rate| BucketUpdate::Set {
            rate,
            burst: rate,
            one_time_burst: 0,
        };
        control.post(LimitUpdate {
            ops: set(20),
            bandwidth: set(2000),
        });
        // Keeps the bandwidth the first update set, removes the ops.
        control.post(LimitUpdate {
            ops: BucketUpdate::Remove,
            ..Default::default()
        });
        assert!(Arc::ptr_eq(&control, &r.control()));
        assert_eq!(r.consume(0), Ok(()));
        assert_eq!(
            r.limit(),
            RateLimit {
                bandwidth: Some((2000, Some(2000))),
                ..Default::default()
            }
        );
        // Nothing posted since: nothing changes.
        r.update(LimitUpdate::default());
        assert!(LimitUpdate::default().is_keep());
        assert_eq!(r.limit().bandwidth, Some((2000, Some(2000))));
    }
}
