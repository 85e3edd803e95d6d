//! virtio-vsock (stream sockets only) bridged to Unix sockets with Firecracker's
//! convention:
//!
//! - the guest connects to CID 2 port P: the device connects to the host Unix
//!   socket `<uds>_P`;
//! - a host client connects to `<uds>` (the device listens there), writes
//!   `CONNECT <port>\n`; the device opens a stream to the guest's port and answers
//!   `OK <host port>\n` once the guest accepted.
//!
//! Queues: rx (0, device to guest), tx (1, guest to device), event (2: a device
//! restored from a saved state sends `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` there,
//! since its connections were not carried over). Flow control is credit based
//! (virtio 1.2, 5.10.6.3): every packet carries the sender's `buf_alloc` and `fwd_cnt`, and the
//! device sends no more stream data than the guest's credit allows. Packets a
//! guest gets wrong (bad lengths, wrong CIDs, unknown ops or types, no such
//! connection) are answered with RST or dropped; nothing panics.
//!
//! The packet header is parsed by hand (44 bytes, little-endian), from a chain of
//! any layout: rust-vmm's `virtio-vsock` packet parser refuses headers and
//! payloads spread over several descriptors (see the crate's README).

mod connection;
mod device;
mod packet;
mod persist;

pub use device::{Vsock, VsockCounters, VsockError};
pub use packet::{HDR_LEN, HOST_CID};
pub use persist::VsockState;
