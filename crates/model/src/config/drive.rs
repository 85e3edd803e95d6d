//! Disks: virtio-blk devices backed by raw images.

use std::path::PathBuf;

use crate::config::rate_limit::RateLimit;
use crate::config::FieldError;

/// Longest drive id: the virtio-blk serial the guest reads is 20 bytes.
pub const MAX_DRIVE_ID: usize = 20;
/// The most request queues a disk may have (`num_queues`): one per vCPU is
/// what a guest uses, and each takes an MSI-X vector and, on the asynchronous
/// engine, an io_uring.
pub const MAX_DRIVE_QUEUES: u16 = 16;

/// How a disk is attached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DriveConfig {
    /// Device id the guest reads with GET_ID (1 to [`MAX_DRIVE_ID`] bytes).
    pub id: String,
    /// Image file (or block device).
    pub path: PathBuf,
    /// Refuse writes.
    pub read_only: bool,
    /// Limits on all requests together. Each request is one operation and the
    /// bytes it moves; a write-zeroes counts the bytes it zeroes, a discard none
    /// (it only frees storage).
    pub rate_limit: RateLimit,
    /// Limits on reads alone.
    pub read_limit: RateLimit,
    /// Limits on writes, discards and write-zeroes alone.
    pub write_limit: RateLimit,
    /// How reads, writes and flushes reach the image.
    pub io_engine: IoEngine,
    /// Request queues (1 to [`MAX_DRIVE_QUEUES`]); above 1 the device offers
    /// `VIRTIO_BLK_F_MQ`, so that a guest can give each vCPU its own queue.
    pub num_queues: u16,
}

impl Default for DriveConfig {
    fn default() -> Self {
        Self {
            id: String::new(),
            path: PathBuf::new(),
            read_only: false,
            rate_limit: RateLimit::default(),
            read_limit: RateLimit::default(),
            write_limit: RateLimit::default(),
            io_engine: IoEngine::default(),
            num_queues: 1,
        }
    }
}

/// How a disk's reads, writes and flushes reach its image (Firecracker's
/// `io_engine`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum IoEngine {
    /// One request at a time on the device thread (`pread`/`pwrite`/`fdatasync`).
    #[default]
    Sync,
    /// Submitted to io_uring, many in flight, completed in any order (a flush
    /// after every write submitted before it).
    Async,
}

impl IoEngine {
    /// `Sync` or `Async`, as Firecracker's API spells it.
    pub fn name(self) -> &'static str {
        match self {
            IoEngine::Sync => "Sync",
            IoEngine::Async => "Async",
        }
    }
}

/// A disk that cannot be attached as given.
#[derive(Debug, thiserror::Error)]
pub enum DriveConfigError {
    #[error(
        "drive_id \"\": a disk needs an id (1 to {MAX_DRIVE_ID} bytes: the serial the guest reads)"
    )]
    EmptyId,
    #[error("drive_id {0:?}: longer than the {MAX_DRIVE_ID} bytes virtio-blk allows (the serial the guest reads)")]
    IdTooLong(String),
    #[error("drive_id {0:?}: used by two disks")]
    DuplicateId(String),
    #[error("num_queues {0}: expected 1 to {MAX_DRIVE_QUEUES} request queues")]
    NumQueues(u16),
    #[error("path_on_host: empty path")]
    EmptyPath,
    #[error("path_on_host {0:?}: a directory, not a disk image")]
    Directory(String),
    #[error("path_on_host {path:?}: cannot open it{mode}: {source}", mode = if *.read_only { "" } else { " for writing" })]
    Open {
        path: String,
        read_only: bool,
        source: std::io::Error,
    },
}

impl FieldError for DriveConfigError {
    fn field(&self) -> &'static str {
        match self {
            Self::EmptyId | Self::IdTooLong(_) | Self::DuplicateId(_) => "drive_id",
            Self::NumQueues(_) => "num_queues",
            Self::EmptyPath | Self::Directory(_) | Self::Open { .. } => "path_on_host",
        }
    }
}

impl DriveConfig {
    /// Checks one disk on its own: its id, its queue count, and that its image (a file or a block
    /// device) opens as the device will open it (a read-only disk needs no write
    /// permission).
    pub fn validate(&self) -> Result<(), DriveConfigError> {
        if self.id.is_empty() {
            return Err(DriveConfigError::EmptyId);
        }
        if self.id.len() > MAX_DRIVE_ID {
            return Err(DriveConfigError::IdTooLong(self.id.clone()));
        }
        if !(1..=MAX_DRIVE_QUEUES).contains(&self.num_queues) {
            return Err(DriveConfigError::NumQueues(self.num_queues));
        }
        if self.path.as_os_str().is_empty() {
            return Err(DriveConfigError::EmptyPath);
        }
        if self.path.is_dir() {
            return Err(DriveConfigError::Directory(self.path.display().to_string()));
        }
        std::fs::File::options()
            .read(true)
            .write(!self.read_only)
            .open(&self.path)
            .map_err(|source| DriveConfigError::Open {
                path: self.path.display().to_string(),
                read_only: self.read_only,
                source,
            })?;
        Ok(())
    }
}
