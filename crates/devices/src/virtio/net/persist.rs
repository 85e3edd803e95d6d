//! The saved state of a virtio-net device and its restore: the tap is opened (or
//! created) again by name.

use serde::{Deserialize, Serialize};

use super::device::{Net, NetError};
use crate::persist::{Persist, RestoreError};
use crate::rate_limiter::RateLimitState;
use crate::virtio::persist::VirtioDeviceState;
use crate::virtio::{VirtioDevice, TYPE_NET};
use vigil_mmds::{Mmds, MmdsConfig};
use vigil_model::config::net::MAX_NET_QUEUE_PAIRS;
use vigil_model::config::{NetConfig, NetConfigError};
use vigil_model::MacAddr;

/// A fresh store's limit when a restore is given none (the API's default).
const DEFAULT_STORE_LIMIT: usize = 64 << 10;

/// virtio-net: the tap is opened (or created) by name on restore.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NetState {
    /// The interface's `iface_id` (none for one from the command line, and in
    /// states from before it was kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iface_id: Option<String>,
    pub tap: String,
    pub mac: [u8; 6],
    pub rx_rate_limit: RateLimitState,
    pub tx_rate_limit: RateLimitState,
    /// MMDS's configuration when the interface reached it; the data store is
    /// not kept (as in Firecracker: the host puts it again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mmds: Option<MmdsConfig>,
    /// The store a restored interface reaches MMDS through (the loading
    /// process's, which its API fills); a fresh one when none is given.
    #[serde(skip)]
    pub mmds_store: Option<Mmds>,
    /// Queue pairs, each on a queue of the (multi-queue) tap, and how many of
    /// them the driver uses (1 and 1 in states from before they were kept).
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub queue_pairs: u16,
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub active_pairs: u16,
}

fn one() -> u16 {
    1
}

fn is_one(n: &u16) -> bool {
    *n == 1
}

impl Persist for Net {
    type State = NetState;
    /// Nothing: the tap is named by the state.
    type Resources = ();

    fn save(&self) -> NetState {
        NetState {
            iface_id: self.id.clone(),
            tap: self.tap_name().to_owned(),
            mac: self.mac,
            rx_rate_limit: self.rx_limiter.limit().into(),
            tx_rate_limit: self.tx_limiter.limit().into(),
            mmds: self.mmds.as_ref().and_then(|m| m.store().config()),
            mmds_store: None,
            queue_pairs: self.pairs.len() as u16,
            active_pairs: self.active,
        }
    }

    fn restore((): (), s: &NetState) -> Result<Self, RestoreError> {
        let tap = &s.tap;
        let config = NetConfig {
            id: s.iface_id.clone(),
            tap: tap.clone(),
            mac: MacAddr(s.mac),
            rx_rate_limit: s.rx_rate_limit.to_limit("rx_rate_limit")?,
            tx_rate_limit: s.tx_rate_limit.to_limit("tx_rate_limit")?,
            mmds: s.mmds.clone().map(|config| {
                let store = s
                    .mmds_store
                    .clone()
                    .unwrap_or_else(|| Mmds::new(DEFAULT_STORE_LIMIT));
                store.set_config(config);
                store
            }),
            queue_pairs: s.queue_pairs,
        };
        // The same checks as a configured interface's, with the state's names.
        config.validate().map_err(|e| match e {
            NetConfigError::Mac { mac, why } => RestoreError::invalid("mac", mac, why),
            NetConfigError::QueuePairs(n) => RestoreError::invalid(
                "queue_pairs",
                n,
                format!("expected 1 to {MAX_NET_QUEUE_PAIRS}"),
            ),
            other => RestoreError::invalid("tap", format_args!("{tap:?}"), other.to_string()),
        })?;
        if !(1..=s.queue_pairs).contains(&s.active_pairs) {
            return Err(RestoreError::invalid(
                "active_pairs",
                s.active_pairs,
                format!("expected 1 to queue_pairs ({})", s.queue_pairs),
            ));
        }
        let mut net = Net::new(&config).map_err(|e| match e {
            NetError::Open { source, .. } => RestoreError::Resource {
                field: "tap".into(),
                value: tap.clone(),
                why: "cannot open or create the tap".into(),
                source,
            },
        })?;
        net.use_pairs(s.active_pairs);
        Ok(net)
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
