//! virtio-blk over a raw image file: read, write, flush (acknowledged once the data
//! is durable), discard, write-zeroes and device id, with sector bounds checked
//! against the capacity and I/O errors reported to the guest, never raised.

mod device;
mod holes;
mod persist;
mod request;
mod run;
mod uring;

pub use device::{Block, BlockError};
pub use persist::BlockState;
pub use request::{SECTOR_SIZE, S_IOERR, S_OK, S_UNSUPP};
