//! The saved configuration of a rate limiter. Tokens are not saved: a restored
//! bucket starts full.

use serde::{Deserialize, Serialize};

use super::RateLimit;
use crate::persist::RestoreError;

/// One token bucket of a rate limit: `rate` per second, holding at most `burst`
/// (one second's worth when absent).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TokenBucketState {
    pub rate: u64,
    pub burst: Option<u64>,
}

/// The configuration of a rate limiter (bytes, operations).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RateLimitState {
    pub bandwidth: Option<TokenBucketState>,
    pub ops: Option<TokenBucketState>,
}

impl From<RateLimit> for RateLimitState {
    fn from(l: RateLimit) -> Self {
        let bucket = |(rate, burst)| TokenBucketState { rate, burst };
        Self {
            bandwidth: l.bandwidth.map(bucket),
            ops: l.ops.map(bucket),
        }
    }
}

impl RateLimitState {
    /// The limit, once its rates are checked (the CLI's rule: above zero);
    /// `field` names the limit in errors (`rate_limit`).
    pub fn to_limit(self, field: &str) -> Result<RateLimit, RestoreError> {
        for (name, bucket) in [("bandwidth", self.bandwidth), ("ops", self.ops)] {
            if let Some(TokenBucketState { rate: 0, .. }) = bucket {
                return Err(RestoreError::invalid(
                    format!("{field}.{name}.rate"),
                    0,
                    "a rate must be above zero (no bucket for no limit)",
                ));
            }
        }
        let pair = |b: TokenBucketState| (b.rate, b.burst);
        Ok(RateLimit {
            bandwidth: self.bandwidth.map(pair),
            ops: self.ops.map(pair),
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_of_zero_are_refused() {
        let s = RateLimitState {
            bandwidth: None,
            ops: Some(TokenBucketState {
                rate: 0,
                burst: Some(4),
            }),
        };
        let e = s.to_limit("device.rng.rate_limit").unwrap_err();
        assert_eq!(e.field(), "device.rng.rate_limit.ops.rate");
        let l = RateLimit {
            bandwidth: Some((10, None)),
            ops: Some((5, Some(1))),
            ..Default::default()
        };
        assert_eq!(RateLimitState::from(l).to_limit("x").unwrap(), l);
    }
}
