//! Rate limits on a device's requests: token buckets of bytes and of operations,
//! as configured at boot and as changed while the VM runs.

/// How a rate limiter is configured.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateLimit {
    /// Bytes per second, and burst in bytes (defaults to one second's worth).
    pub bandwidth: Option<(u64, Option<u64>)>,
    /// Operations per second, and burst in operations (defaults to one second's worth).
    pub ops: Option<(u64, Option<u64>)>,
    /// Tokens each bucket (bytes, operations) may spend once, before its own
    /// (Firecracker's `one_time_burst`). Spent tokens, not configuration: a saved
    /// state does not carry them.
    pub one_time_burst: (u64, u64),
}

impl RateLimit {
    /// Whether it limits nothing.
    pub fn is_unlimited(&self) -> bool {
        self.bandwidth.is_none() && self.ops.is_none()
    }
}

/// A change to one bucket of a running limiter (Firecracker's `BucketUpdate`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BucketUpdate {
    /// Leave the bucket as it is.
    #[default]
    Keep,
    /// No limit on this bucket any more.
    Remove,
    /// A new, full bucket: `rate` tokens per second, holding `burst`, and
    /// `one_time_burst` tokens to spend once first.
    Set {
        rate: u64,
        burst: u64,
        one_time_burst: u64,
    },
}

impl BucketUpdate {
    /// `self`, then `later` on top of it.
    pub fn then(self, later: BucketUpdate) -> BucketUpdate {
        match later {
            BucketUpdate::Keep => self,
            other => other,
        }
    }
}

/// A change to a running limiter, bucket by bucket.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LimitUpdate {
    pub bandwidth: BucketUpdate,
    pub ops: BucketUpdate,
}

impl LimitUpdate {
    /// Whether it changes nothing.
    pub fn is_keep(&self) -> bool {
        *self == Self::default()
    }
}
