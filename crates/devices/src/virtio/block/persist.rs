//! The saved state of a virtio-blk device and its restore: the image is re-opened
//! from its path and must still have the capacity the guest saw.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::device::{Block, BlockError, ID_LEN};
use crate::persist::{Persist, RestoreError};
use crate::rate_limiter::RateLimitState;
use crate::virtio::persist::VirtioDeviceState;
use crate::virtio::{VirtioDevice, TYPE_BLOCK};
use vigil_model::config::drive::MAX_DRIVE_QUEUES;
use vigil_model::config::{DriveConfig, IoEngine};

/// virtio-blk: the image is re-opened from `path` on restore; it must still have
/// `capacity` sectors.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BlockState {
    pub path: PathBuf,
    pub read_only: bool,
    /// The device id (serial) the guest reads with GET_ID, at most 20 bytes.
    pub id: String,
    /// Size in 512-byte sectors, as the guest saw it.
    pub capacity: u64,
    pub rate_limit: RateLimitState,
    pub read_limit: RateLimitState,
    pub write_limit: RateLimitState,
    /// How requests reach the image (absent in snapshots from before the
    /// asynchronous engine: `Sync`).
    #[serde(default)]
    pub io_engine: IoEngine,
    /// Request queues (absent in snapshots from before multi-queue: 1).
    #[serde(default = "one_queue")]
    pub num_queues: u16,
}

fn one_queue() -> u16 {
    1
}

impl Persist for Block {
    type State = BlockState;
    /// Nothing: the image is named by the state.
    type Resources = ();

    fn save(&self) -> BlockState {
        let id_len = self.id.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
        BlockState {
            path: self.path.clone(),
            read_only: self.read_only,
            id: String::from_utf8_lossy(&self.id[..id_len]).into_owned(),
            capacity: self.capacity,
            rate_limit: self.limiter.limit().into(),
            read_limit: self.read_limiter.limit().into(),
            write_limit: self.write_limiter.limit().into(),
            io_engine: self.io_engine(),
            num_queues: self.num_queues(),
        }
    }

    fn restore((): (), s: &BlockState) -> Result<Self, RestoreError> {
        let path = s.path.display().to_string();
        let id_too_long = || {
            RestoreError::invalid(
                "id",
                format_args!("{:?}", s.id),
                format!("longer than the {ID_LEN} bytes virtio-blk allows"),
            )
        };
        if s.id.len() > ID_LEN {
            return Err(id_too_long());
        }
        if !(1..=MAX_DRIVE_QUEUES).contains(&s.num_queues) {
            return Err(RestoreError::invalid(
                "num_queues",
                s.num_queues,
                format!("expected 1 to {MAX_DRIVE_QUEUES}"),
            ));
        }
        let config = DriveConfig {
            path: s.path.clone(),
            read_only: s.read_only,
            id: s.id.clone(),
            rate_limit: s.rate_limit.to_limit("rate_limit")?,
            read_limit: s.read_limit.to_limit("read_limit")?,
            write_limit: s.write_limit.to_limit("write_limit")?,
            io_engine: s.io_engine,
            num_queues: s.num_queues,
        };
        let block = Block::new(&config).map_err(|e| match e {
            BlockError::Open { mode, source, .. } => RestoreError::Resource {
                field: "path".into(),
                value: path.clone(),
                why: format!("cannot open it{mode}"),
                source,
            },
            BlockError::NotAFile { .. } => {
                RestoreError::invalid("path", &path, "not a regular file or block device")
            }
            BlockError::IdTooLong { .. } => id_too_long(),
            BlockError::IoUring { source } => RestoreError::Resource {
                field: "io_engine".into(),
                value: s.io_engine.name().into(),
                why: "cannot set up an io_uring on this host".into(),
                source,
            },
        })?;
        if block.capacity() != s.capacity {
            return Err(RestoreError::invalid(
                "capacity",
                s.capacity,
                format!(
                    "the image at {path} now has {} sectors; a disk cannot change size under its guest",
                    block.capacity()
                ),
            ));
        }
        Ok(block)
    }
}

impl VirtioDeviceState for BlockState {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn restore(&self) -> Result<Box<dyn VirtioDevice>, RestoreError> {
        Ok(Box::new(Block::restore((), self)?))
    }
}
