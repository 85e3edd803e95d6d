//! virtio-net over a tap: a receive and a transmit queue per queue pair (one,
//! or `queue_pairs` on a multi-queue tap with a control queue after them), a
//! MAC in the config space, link status, checksum and segmentation offloads
//! as the driver accepts them, and a rate limiter per direction.
//!
//! Each buffer the guest posts or sends begins with a 12-byte `virtio_net_hdr_v1`
//! (`VIRTIO_F_VERSION_1`); the tap is opened with `IFF_VNET_HDR` and the same
//! header size, so frames travel with their header both ways: the tap's offload
//! fields pass to the guest, and a transmitted header reaches the tap only as
//! far as it asks for offloads the driver accepted.

mod device;
mod mmds;
mod persist;
pub mod tap;

pub use device::{Net, NetCounters, NetError, MAX_BUFFER, RX, TX};
pub use mmds::{MmdsStack, MMDS_MAC};
pub use persist::NetState;
