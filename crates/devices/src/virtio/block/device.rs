//! The virtio-blk device: an image file, its rate limiters and its config space.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use crate::GuestMemoryMmap;
use vigil_metrics::{DeviceCounters, DeviceKind};
use virtio_queue::Queue;

use super::request::{
    Range, Request, Segments, MAX_RANGE_SECTORS, MAX_RANGE_SEGMENTS, RANGE_UNMAP, SECTOR_SIZE,
    S_IOERR, S_OK, S_UNSUPP, T_DISCARD, T_FLUSH, T_GET_ID, T_IN, T_OUT, T_WRITE_ZEROES,
};
use crate::persist::Persist;
use crate::rate_limiter::{consume_all, RateLimitControl, RateLimiter};
use crate::virtio::persist::DeviceState;
use crate::virtio::{
    copy_config, serve_chains, DeviceBroken, QueueOutcome, Served, VirtioDevice, TYPE_BLOCK,
    VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1,
};
use vigil_model::config::{DriveConfig, FieldError};

const QUEUE_SIZE: u16 = 256;
pub(super) const ID_LEN: usize = 20;
/// Bytes moved between the image and guest memory per copy.
const CHUNK: usize = 64 * 1024;

// Feature bits (virtio 1.1, 5.2.3).
const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_BLK_SIZE: u64 = 1 << 6;
const F_FLUSH: u64 = 1 << 9;
const F_DISCARD: u64 = 1 << 13;
const F_WRITE_ZEROES: u64 = 1 << 14;

/// A virtio-blk device.
pub struct Block {
    file: File,
    pub(super) path: std::path::PathBuf,
    pub(super) read_only: bool,
    pub(super) capacity: u64,
    pub(super) id: [u8; ID_LEN],
    pub(super) limiter: RateLimiter,
    pub(super) read_limiter: RateLimiter,
    pub(super) write_limiter: RateLimiter,
    buf: Vec<u8>,
    requests: u64,
    errors: u64,
    metrics: Arc<DeviceCounters>,
}

/// Errors opening a disk.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("path_on_host {path:?}: cannot open it{mode}: {source}")]
    Open {
        path: String,
        mode: &'static str,
        source: std::io::Error,
    },
    #[error("path_on_host {path:?}: not a regular file or block device")]
    NotAFile { path: String },
    #[error("drive_id {id:?}: longer than the 20 bytes virtio-blk allows")]
    IdTooLong { id: String },
}

impl FieldError for BlockError {
    fn field(&self) -> &'static str {
        match self {
            BlockError::IdTooLong { .. } => "drive_id",
            _ => "path_on_host",
        }
    }
}

impl Block {
    /// Opens the image at `config.path`.
    pub fn new(config: &DriveConfig) -> Result<Self, BlockError> {
        let path = config.path.display().to_string();
        let file = File::options()
            .read(true)
            .write(!config.read_only)
            .open(&config.path)
            .map_err(|source| BlockError::Open {
                path: path.clone(),
                mode: if config.read_only { "" } else { " for writing" },
                source,
            })?;
        let meta = file.metadata().map_err(|source| BlockError::Open {
            path: path.clone(),
            mode: "",
            source,
        })?;
        use std::os::unix::fs::FileTypeExt;
        if !meta.is_file() && !meta.file_type().is_block_device() {
            return Err(BlockError::NotAFile { path });
        }
        let bytes = image_size(&file, &config.path).map_err(|source| BlockError::Open {
            path: path.clone(),
            mode: "",
            source,
        })?;
        if config.id.len() > ID_LEN {
            return Err(BlockError::IdTooLong {
                id: config.id.clone(),
            });
        }
        let mut id = [0u8; ID_LEN];
        id[..config.id.len()].copy_from_slice(config.id.as_bytes());
        Ok(Self {
            file,
            path: config.path.clone(),
            read_only: config.read_only,
            capacity: bytes / SECTOR_SIZE,
            id,
            limiter: RateLimiter::new(config.rate_limit),
            read_limiter: RateLimiter::new(config.read_limit),
            write_limiter: RateLimiter::new(config.write_limit),
            buf: vec![0; CHUNK],
            requests: 0,
            errors: 0,
            metrics: Arc::new(DeviceCounters::new(DeviceKind::Block, config.id.clone())),
        })
    }

    /// Counts into `metrics` (shared with whoever reads them) from now on.
    pub fn with_counters(mut self, metrics: Arc<DeviceCounters>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Where another thread changes the limit on all requests together (the
    /// one Firecracker's `rate_limiter` sets) while the device runs.
    pub fn rate_limit_control(&mut self) -> Arc<RateLimitControl> {
        self.limiter.control()
    }

    /// Capacity in sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Requests completed, and how many of them failed.
    pub fn counters(&self) -> (u64, u64) {
        (self.requests, self.errors)
    }

    fn in_bounds(&self, sector: u64, bytes: u64) -> bool {
        bytes.is_multiple_of(SECTOR_SIZE)
            && sector
                .checked_add(bytes / SECTOR_SIZE)
                .is_some_and(|end| end <= self.capacity)
    }

    fn read_into(&mut self, offset: u64, len: usize, out: &mut impl Write) -> std::io::Result<()> {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK);
            self.file
                .read_exact_at(&mut self.buf[..n], offset + done as u64)?;
            out.write_all(&self.buf[..n])?;
            done += n;
        }
        Ok(())
    }

    fn write_from(
        &mut self,
        offset: u64,
        len: usize,
        input: &mut impl Read,
    ) -> std::io::Result<()> {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(CHUNK);
            input.read_exact(&mut self.buf[..n])?;
            self.file
                .write_all_at(&self.buf[..n], offset + done as u64)?;
            done += n;
        }
        Ok(())
    }

    /// Discards or zeroes `segments` (all checked before any is done).
    fn ranges(&mut self, segments: Option<&Segments>, zeroes: bool) -> u8 {
        let Some(segments) = segments.filter(|_| !self.read_only) else {
            return S_IOERR;
        };
        let valid = |r: &Range| {
            r.sectors <= MAX_RANGE_SECTORS
                && self.in_bounds(r.sector, u64::from(r.sectors) * SECTOR_SIZE)
        };
        if !segments.iter().all(valid) {
            return S_IOERR;
        }
        for range in segments.iter() {
            let offset = range.sector * SECTOR_SIZE;
            let bytes = u64::from(range.sectors) * SECTOR_SIZE;
            let mode = if zeroes && range.flags & RANGE_UNMAP == 0 {
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
            } else {
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
            };
            // SAFETY: fallocate on our own open file; offsets are in bounds.
            let r = unsafe {
                libc::fallocate(self.file.as_raw_fd(), mode, offset as i64, bytes as i64)
            };
            if r != 0 {
                // Filesystems without hole punching still get zeroes (discard may keep data).
                if zeroes && self.write_zeroes(offset, bytes).is_err() {
                    return S_IOERR;
                }
            }
        }
        S_OK
    }

    fn write_zeroes(&mut self, offset: u64, bytes: u64) -> std::io::Result<()> {
        self.buf.fill(0);
        let mut done = 0;
        while done < bytes {
            let n = (bytes - done).min(CHUNK as u64) as usize;
            self.file.write_all_at(&self.buf[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    /// Takes what `request` costs from the rate limiters: the bytes it moves
    /// (write-zeroes: the bytes it zeroes; discard: none, it only frees storage)
    /// from the overall bucket and its direction's, one operation from each.
    fn charge(&mut self, request: &Request) -> Result<(), std::time::Duration> {
        let bytes = request.bytes();
        match request.header.kind {
            T_IN => consume_all(&mut [&mut self.limiter, &mut self.read_limiter], bytes),
            T_OUT | T_DISCARD | T_WRITE_ZEROES => {
                consume_all(&mut [&mut self.limiter, &mut self.write_limiter], bytes)
            }
            _ => self.limiter.consume(bytes),
        }
    }

    /// Serves one request; returns the bytes written into the guest's buffers, or
    /// `None` when its status cannot be written.
    fn serve(&mut self, request: Request) -> Option<u32> {
        let Request {
            header,
            mut reader,
            mut data,
            mut status_writer,
            segments,
        } = request;
        let data_len = data.available_bytes();
        let mut written = 0;
        let status = match header.kind {
            T_IN if self.in_bounds(header.sector, data_len as u64) => {
                match self.read_into(header.sector * SECTOR_SIZE, data_len, &mut data) {
                    Ok(()) => {
                        written = data_len;
                        self.metrics.bytes_in.add(data_len as u64);
                        S_OK
                    }
                    Err(e) => {
                        tracing::warn!("virtio-blk read failed: {e}");
                        S_IOERR
                    }
                }
            }
            T_OUT if self.read_only => S_IOERR,
            T_OUT if self.in_bounds(header.sector, reader.available_bytes() as u64) => {
                let len = reader.available_bytes();
                match self.write_from(header.sector * SECTOR_SIZE, len, &mut reader) {
                    Ok(()) => {
                        self.metrics.bytes_out.add(len as u64);
                        S_OK
                    }
                    Err(e) => {
                        tracing::warn!("virtio-blk write failed: {e}");
                        S_IOERR
                    }
                }
            }
            T_IN | T_OUT => S_IOERR,
            T_FLUSH => match self.file.sync_data() {
                Ok(()) => S_OK,
                Err(e) => {
                    tracing::warn!("virtio-blk flush failed: {e}");
                    S_IOERR
                }
            },
            T_GET_ID => {
                let n = data_len.min(ID_LEN);
                match data.write_all(&self.id[..n]) {
                    Ok(()) => {
                        written = n;
                        S_OK
                    }
                    Err(_) => S_IOERR,
                }
            }
            T_DISCARD | T_WRITE_ZEROES => {
                self.ranges(segments.as_ref(), header.kind == T_WRITE_ZEROES)
            }
            _ => S_UNSUPP,
        };
        status_writer.write_all(&[status]).ok()?;
        self.requests += 1;
        match header.kind {
            T_IN => self.metrics.ops_in.inc(),
            T_OUT => self.metrics.ops_out.inc(),
            _ => self.metrics.ops_other.inc(),
        }
        if status != S_OK {
            self.errors += 1;
            self.metrics.errors.inc();
        }
        Some(written as u32 + 1)
    }
}

fn image_size(file: &File, path: &Path) -> std::io::Result<u64> {
    let meta = file.metadata()?;
    if meta.is_file() {
        return Ok(meta.len());
    }
    // A block device: its size is where seeking to the end lands.
    let mut f = File::open(path)?;
    std::io::Seek::seek(&mut f, std::io::SeekFrom::End(0))
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let base = VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX | F_SEG_MAX | F_BLK_SIZE | F_FLUSH;
        if self.read_only {
            base | F_RO
        } else {
            base | F_DISCARD | F_WRITE_ZEROES
        }
    }

    fn state(&self) -> DeviceState {
        DeviceState::Block(self.save())
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; 60];
        config[0..8].copy_from_slice(&self.capacity.to_le_bytes());
        config[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes()); // seg_max
        config[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes()); // blk_size
        config[36..40].copy_from_slice(&MAX_RANGE_SECTORS.to_le_bytes());
        config[40..44].copy_from_slice(&MAX_RANGE_SEGMENTS.to_le_bytes());
        config[44..48].copy_from_slice(&1u32.to_le_bytes()); // discard alignment, sectors
        config[48..52].copy_from_slice(&MAX_RANGE_SECTORS.to_le_bytes());
        config[52..56].copy_from_slice(&MAX_RANGE_SEGMENTS.to_le_bytes());
        config[56] = 1; // write_zeroes_may_unmap
        copy_config(&config, offset, data);
    }

    fn interrupted(&self) {
        self.metrics.interrupts.inc();
    }

    fn process_queue(
        &mut self,
        _index: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<QueueOutcome, DeviceBroken> {
        serve_chains(queue, mem, |chain| {
            let head = chain.head_index();
            let Some(request) = Request::parse(chain, mem) else {
                // Still an operation: a guest cannot flood the device with garbage.
                if let Err(wait) = self.limiter.consume(0) {
                    self.metrics.throttled.inc();
                    return Ok(Served::Wait(wait));
                }
                tracing::warn!(
                    head,
                    "malformed virtio-blk request; completed without a status"
                );
                self.errors += 1;
                self.metrics.errors.inc();
                return Ok(Served::Used(0));
            };
            if let Err(wait) = self.charge(&request) {
                self.metrics.throttled.inc();
                return Ok(Served::Wait(wait));
            }
            Ok(Served::Used(self.serve(request).unwrap_or_else(|| {
                tracing::warn!(head, "virtio-blk status not writable");
                self.errors += 1;
                self.metrics.errors.inc();
                0
            })))
        })
    }
}
