//! The saved state of a virtio-rng device: only its rate limit.

use serde::{Deserialize, Serialize};

use super::device::Rng;
use crate::persist::{Persist, RestoreError};
use crate::rate_limiter::RateLimitState;
use crate::virtio::persist::VirtioDeviceState;
use crate::virtio::{VirtioDevice, TYPE_RNG};

/// virtio-rng: only its rate limit.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RngState {
    pub rate_limit: RateLimitState,
}

impl Persist for Rng {
    type State = RngState;
    /// Nothing: the host's `getrandom` needs no opening.
    type Resources = ();

    fn save(&self) -> RngState {
        RngState {
            rate_limit: self.limiter.limit().into(),
        }
    }

    fn restore((): (), s: &RngState) -> Result<Self, RestoreError> {
        Ok(Rng::new(s.rate_limit.to_limit("rate_limit")?))
    }
}

impl VirtioDeviceState for RngState {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }

    fn restore(&self) -> Result<Box<dyn VirtioDevice>, RestoreError> {
        Ok(Box::new(Rng::restore((), self)?))
    }
}
