//! Network interfaces: virtio-net devices on Linux taps.

use crate::config::rate_limit::RateLimit;
use crate::config::FieldError;
use crate::mac::MacAddr;

/// Longest Linux interface name, without its NUL.
pub const IFNAME_MAX: usize = 15;
/// The most receive/transmit queue pairs an interface may have
/// (`queue_pairs`): one per vCPU is what a guest uses, each on a queue of its
/// own of a multi-queue tap.
pub const MAX_NET_QUEUE_PAIRS: u16 = 16;

/// How a network interface is attached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// The interface's `iface_id` in Firecracker's API (kept in snapshots, for
    /// `network_overrides` on load); none from the command line.
    pub id: Option<String>,
    /// Name of the tap (created when absent).
    pub tap: String,
    /// MAC address the guest reads from the config space.
    pub mac: MacAddr,
    /// Limits on frames delivered to the guest.
    pub rx_rate_limit: RateLimit,
    /// Limits on frames the guest sends.
    pub tx_rate_limit: RateLimit,
    /// The VM's MMDS, when this interface is one of `mmds-config`'s
    /// `network_interfaces`: its frames to the MMDS address are answered by the VMM.
    pub mmds: Option<vigil_mmds::Mmds>,
    /// Receive/transmit queue pairs (`VIRTIO_NET_F_MQ`), each on a queue of a
    /// multi-queue tap; 1 (the default) is a plain tap and one pair.
    pub queue_pairs: u16,
}

/// An interface that cannot be attached as given.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum NetConfigError {
    #[error("host_dev_name {tap:?}: {why}")]
    TapName { tap: String, why: &'static str },
    #[error("host_dev_name {0:?}: used by two interfaces")]
    DuplicateTap(String),
    #[error("guest_mac \"{mac}\": {why}")]
    Mac { mac: MacAddr, why: &'static str },
    #[error("queue_pairs {0}: expected 1 to {MAX_NET_QUEUE_PAIRS}")]
    QueuePairs(u16),
}

impl FieldError for NetConfigError {
    fn field(&self) -> &'static str {
        match self {
            Self::TapName { .. } | Self::DuplicateTap(_) => "host_dev_name",
            Self::Mac { .. } => "guest_mac",
            Self::QueuePairs(_) => "queue_pairs",
        }
    }
}

/// Checks the interfaces of one VM: each on its own, and no tap or MAC twice.
pub fn validate_all(nets: &[NetConfig]) -> Result<(), NetConfigError> {
    for (i, net) in nets.iter().enumerate() {
        net.validate()?;
        if nets[..i].iter().any(|n| n.tap == net.tap) {
            return Err(NetConfigError::DuplicateTap(net.tap.clone()));
        }
        if nets[..i].iter().any(|n| n.mac == net.mac) {
            return Err(NetConfigError::Mac {
                mac: net.mac,
                why: "used by two interfaces",
            });
        }
    }
    Ok(())
}

impl NetConfig {
    /// An interface on `tap` with the default MAC of interface `index` and no limits.
    pub fn new(tap: impl Into<String>, index: usize) -> Self {
        Self {
            id: None,
            tap: tap.into(),
            mac: MacAddr::for_interface(index),
            rx_rate_limit: RateLimit::default(),
            tx_rate_limit: RateLimit::default(),
            mmds: None,
            queue_pairs: 1,
        }
    }

    /// Checks one interface on its own.
    pub fn validate(&self) -> Result<(), NetConfigError> {
        let bad = |why| NetConfigError::TapName {
            tap: self.tap.clone(),
            why,
        };
        if self.tap.is_empty() {
            return Err(bad("an interface needs a name"));
        }
        if self.tap.len() > IFNAME_MAX {
            return Err(bad("longer than the 15 bytes of a Linux interface name"));
        }
        if self.tap == "." || self.tap == ".." {
            return Err(bad("not an interface name"));
        }
        if self
            .tap
            .bytes()
            .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b.is_ascii_control())
        {
            return Err(bad(
                "an interface name has no '/', ':', spaces or control characters",
            ));
        }
        if !(1..=MAX_NET_QUEUE_PAIRS).contains(&self.queue_pairs) {
            return Err(NetConfigError::QueuePairs(self.queue_pairs));
        }
        if self.mac.is_multicast() {
            return Err(NetConfigError::Mac {
                mac: self.mac,
                why: "a multicast address (the low bit of the first byte is set)",
            });
        }
        if self.mac.is_zero() {
            return Err(NetConfigError::Mac {
                mac: self.mac,
                why: "the all-zero address",
            });
        }
        Ok(())
    }
}
