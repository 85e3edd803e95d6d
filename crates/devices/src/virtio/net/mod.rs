//! virtio-net over a tap: two queues (receive 0, transmit 1), a MAC in the config
//! space, link status, no offloads, and a rate limiter per direction.
//!
//! Each buffer the guest posts or sends begins with a 12-byte `virtio_net_hdr_v1`
//! (`VIRTIO_F_VERSION_1`); the tap is opened with `IFF_VNET_HDR` and the same
//! header size, so frames travel with their header both ways. Offloads are not
//! offered: the header of a transmitted frame is zeroed before it reaches the tap,
//! and a received one says "no checksum, no GSO, one buffer".

mod device;
mod mmds;
mod persist;
pub mod tap;

pub use device::{Net, NetCounters, NetError, MAX_BUFFER, RX, TX};
pub use mmds::{MmdsStack, MMDS_MAC};
pub use persist::NetState;
