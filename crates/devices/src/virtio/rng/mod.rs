//! virtio-rng: fills the guest's buffers from the host's `getrandom`.

mod device;
mod persist;

pub use device::Rng;
pub use persist::RngState;
