//! The saved state of a virtio-net device and its restore: the tap is opened (or
//! created) again by name.

use serde::{Deserialize, Serialize};

use super::device::{Net, NetConfig, NetError};
use super::tap::IFNAME_MAX;
use crate::persist::{Persist, RestoreError};
use crate::rate_limiter::RateLimitState;
use crate::virtio::persist::VirtioDeviceState;
use crate::virtio::{VirtioDevice, TYPE_NET};

/// virtio-net: the tap is opened (or created) by name on restore.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NetState {
    pub tap: String,
    pub mac: [u8; 6],
    pub rx_rate_limit: RateLimitState,
    pub tx_rate_limit: RateLimitState,
}

impl Persist for Net {
    type State = NetState;
    /// Nothing: the tap is named by the state.
    type Resources = ();

    fn save(&self) -> NetState {
        NetState {
            tap: self.tap.name().to_owned(),
            mac: self.mac,
            rx_rate_limit: self.rx_limiter.limit().into(),
            tx_rate_limit: self.tx_limiter.limit().into(),
        }
    }

    fn restore((): (), s: &NetState) -> Result<Self, RestoreError> {
        let tap = &s.tap;
        let bad_tap = |why: &str| RestoreError::invalid("tap", format_args!("{tap:?}"), why);
        if tap.is_empty() || tap.len() > IFNAME_MAX {
            return Err(bad_tap("an interface name has 1 to 15 bytes"));
        }
        if tap == "." || tap == ".." {
            return Err(bad_tap("not an interface name"));
        }
        if tap
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b.is_ascii_control())
        {
            return Err(bad_tap(
                "an interface name has no '/', ':', spaces or control characters",
            ));
        }
        let mac = format_args!("{:02x?}", s.mac).to_string();
        if s.mac[0] & 1 != 0 {
            return Err(RestoreError::invalid("mac", mac, "a multicast address"));
        }
        if s.mac == [0; 6] {
            return Err(RestoreError::invalid("mac", mac, "the all-zero address"));
        }
        let config = NetConfig {
            tap: tap.clone(),
            mac: s.mac,
            rx_rate_limit: s.rx_rate_limit.to_limit("rx_rate_limit")?,
            tx_rate_limit: s.tx_rate_limit.to_limit("tx_rate_limit")?,
        };
        Net::new(&config).map_err(|e| match e {
            NetError::Open { source, .. } => RestoreError::Resource {
                field: "tap".into(),
                value: tap.clone(),
                why: "cannot open or create the tap".into(),
                source,
            },
        })
    }
}

impl VirtioDeviceState for NetState {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn restore(&self) -> Result<Box<dyn VirtioDevice>, RestoreError> {
        Ok(Box::new(Net::restore((), self)?))
    }
}
