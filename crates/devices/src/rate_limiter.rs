//! Token-bucket rate limiting for device I/O: one bucket for bytes, one for
//! operations, each with a refill rate and a burst size.

use std::time::{Duration, Instant};

/// One token bucket: `rate` tokens per second, holding at most `burst`.
#[derive(Clone, Debug, PartialEq)]
pub struct TokenBucket {
    rate: u64,
    burst: u64,
    /// May go negative: a request larger than the burst is let through when the
    /// bucket is full, and later requests wait until the debt is repaid.
    tokens: f64,
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
            last: Instant::now(),
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate as f64).min(self.burst as f64);
        self.last = now;
    }

    /// How long until `n` tokens may be taken (zero when they may be now).
    fn wait_for(&mut self, n: u64, now: Instant) -> Duration {
        self.refill(now);
        let needed = (n.min(self.burst)) as f64;
        if self.tokens >= needed {
            Duration::ZERO
        } else if self.rate == 0 {
            Duration::MAX
        } else {
            Duration::from_secs_f64((needed - self.tokens) / self.rate as f64)
        }
    }

    fn take(&mut self, n: u64) {
        self.tokens -= n as f64;
    }
}

/// Limits of one device (or one direction of a device).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RateLimiter {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    throttled: u64,
}

/// How a rate limiter is configured.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateLimit {
    /// Bytes per second, and burst in bytes (defaults to one second's worth).
    pub bandwidth: Option<(u64, Option<u64>)>,
    /// Operations per second, and burst in operations (defaults to one second's worth).
    pub ops: Option<(u64, Option<u64>)>,
}

impl RateLimiter {
    /// A limiter for `limit`; an empty limit never throttles.
    pub fn new(limit: RateLimit) -> Self {
        let bucket =
            |(rate, burst): (u64, Option<u64>)| TokenBucket::new(rate, burst.unwrap_or(rate));
        Self {
            bandwidth: limit.bandwidth.map(bucket),
            ops: limit.ops.map(bucket),
            throttled: 0,
        }
    }

    /// The limit this limiter enforces, each burst as it took effect.
    pub fn limit(&self) -> RateLimit {
        let pair = |b: &TokenBucket| (b.rate, Some(b.burst));
        RateLimit {
            bandwidth: self.bandwidth.as_ref().map(pair),
            ops: self.ops.as_ref().map(pair),
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
}
