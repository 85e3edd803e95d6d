//! The virtio-blk device: an image file, its rate limiters and its config space.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use crate::GuestMemoryMmap;
use vigil_metrics::{DeviceCounters, DeviceKind};
use virtio_queue::{DescriptorChain, Queue};
use vm_memory::{Address, Bytes, GuestAddress};
use vmm_sys_util::epoll::EventSet;

use super::holes::Holes;
use super::request::{
    Range, Request, RequestHeader, Segments, MAX_RANGE_SECTORS, MAX_RANGE_SEGMENTS, RANGE_UNMAP,
    SECTOR_SIZE, S_IOERR, S_OK, S_UNSUPP, T_DISCARD, T_FLUSH, T_GET_ID, T_IN, T_OUT,
    T_WRITE_ZEROES,
};
use super::run::Run;
use super::uring::{Done, Uring};
use crate::persist::Persist;
use crate::rate_limiter::{consume_all, RateLimitControl, RateLimiter};
use crate::virtio::persist::DeviceState;
use crate::virtio::{
    add_used_together, copy_config, serve_chains_with, DeviceBroken, Publish, QueueOutcome, Served,
    Server, UsedBatch, VirtioDevice, TYPE_BLOCK, VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_RING_INDIRECT_DESC, VIRTIO_F_VERSION_1,
};
use vigil_model::config::drive::MAX_DRIVE_QUEUES;
use vigil_model::config::{DriveConfig, FieldError, IoEngine};

const QUEUE_SIZE: u16 = 256;
pub(super) const ID_LEN: usize = 20;
/// Bytes moved between the image and guest memory per copy.
const CHUNK: usize = 64 * 1024;

// Feature bits (virtio 1.1, 5.2.3).
const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_BLK_SIZE: u64 = 1 << 6;
const F_FLUSH: u64 = 1 << 9;
/// `num_queues` request queues instead of one.
const F_MQ: u64 = 1 << 12;
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
    /// Each request queue's maximum size; their number is `num_queues`.
    queue_sizes: Vec<u16>,
    /// The driver accepted `VIRTIO_BLK_F_MQ`: queues past the first are served.
    mq: bool,
    /// A queue past the first was notified without F_MQ and logged: a guest
    /// that keeps doing it is not logged again until a reset.
    ignored_logged: bool,
    /// The asynchronous engine's rings (`io_engine` Async), one per queue, so
    /// that a completion goes back on its own queue; empty for Sync.
    urings: Vec<Uring>,
    /// Lists kept between requests (no allocation per request): the chain's
    /// buffers, a request's data buffers, reads and writes completed (by
    /// either engine) and not yet given back.
    readable: Vec<(GuestAddress, usize)>,
    writable: Vec<(GuestAddress, usize)>,
    segments: Vec<(GuestAddress, usize)>,
    done: Vec<Done>,
    /// Reads or writes held to be moved together (either engine).
    run: Run,
    /// Where the image holds data: a read run in a hole reads no file.
    holes: Holes,
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
    #[error("io_engine \"Async\": this host cannot set up an io_uring ({source}); use \"Sync\"")]
    IoUring { source: std::io::Error },
}

impl FieldError for BlockError {
    fn field(&self) -> &'static str {
        match self {
            BlockError::IdTooLong { .. } => "drive_id",
            BlockError::IoUring { .. } => "io_engine",
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
        // Checked where configurations and states come in; kept in range here
        // too, so that no caller makes a disk without a queue or with more
        // queues than a PCI function has vectors for.
        let queues = usize::from(config.num_queues.clamp(1, MAX_DRIVE_QUEUES));
        let urings = match config.io_engine {
            IoEngine::Sync => Vec::new(),
            IoEngine::Async => {
                let urings = (0..queues)
                    .map(|_| Uring::new(QUEUE_SIZE, &file))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|source| BlockError::IoUring { source })?;
                tracing::info!(
                    drive = config.id,
                    "io_engine Async: requests go to an io_uring of {QUEUE_SIZE} entries per queue ({queues} queues)"
                );
                urings
            }
        };
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
            queue_sizes: vec![QUEUE_SIZE; queues],
            mq: false,
            ignored_logged: false,
            urings,
            readable: Vec::new(),
            writable: Vec::new(),
            segments: Vec::new(),
            done: Vec::new(),
            run: Run::default(),
            holes: Holes::new(bytes, meta.is_file()),
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

    /// How requests reach the image.
    pub fn io_engine(&self) -> IoEngine {
        if !self.urings.is_empty() {
            IoEngine::Async
        } else {
            IoEngine::Sync
        }
    }

    /// Request queues.
    pub fn num_queues(&self) -> u16 {
        self.queue_sizes.len() as u16
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

    /// Takes what a `kind` request of `bytes` ([`Request::bytes`]) costs from
    /// the rate limiters: the bytes from the overall bucket and its
    /// direction's, one operation from each. A wait is counted as `throttled`.
    fn charge(&mut self, kind: u32, bytes: u64) -> Result<(), std::time::Duration> {
        let charged = match kind {
            T_IN => consume_all(&mut [&mut self.limiter, &mut self.read_limiter], bytes),
            T_OUT | T_DISCARD | T_WRITE_ZEROES => {
                consume_all(&mut [&mut self.limiter, &mut self.write_limiter], bytes)
            }
            _ => self.limiter.consume(bytes),
        };
        if charged.is_err() {
            self.metrics.throttled.inc();
        }
        charged
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
        self.count(header.kind, status);
        Some(written as u32 + 1)
    }

    /// Counts a request of `kind` that completed with `status`.
    fn count(&mut self, kind: u32, status: u8) {
        self.requests += 1;
        match kind {
            T_IN => self.metrics.ops_in.inc(),
            T_OUT => self.metrics.ops_out.inc(),
            _ => self.metrics.ops_other.inc(),
        }
        if status != S_OK {
            self.errors += 1;
            self.metrics.errors.inc();
        }
    }

    /// A read, write or flush the synchronous path would not refuse at once,
    /// for the direct paths (reads and writes in a [`Run`], the asynchronous
    /// engine's flushes), taken from the chain's buffers as `note_buffers`
    /// listed them, without walking the chain again: its header (in the first
    /// device-readable buffer), its data buffers into `self.segments` (a
    /// read's: the device-writable bytes but the last; a write's: the
    /// device-readable bytes after the header), its byte offset, the bytes the
    /// rate limiters charge ([`Request::bytes`]) and its status byte (the last
    /// device-writable byte, as `Request::parse` splits them). `None` for what
    /// the synchronous path serves (the rest, refusals, a header split
    /// across buffers).
    fn direct_request(&mut self, mem: &GuestMemoryMmap) -> Option<Direct> {
        let header_len = std::mem::size_of::<RequestHeader>();
        let &(first, first_len) = self.readable.first()?;
        if first_len < header_len {
            return None;
        }
        let header: RequestHeader = mem.read_obj(first).ok()?;
        let total = |buffers: &[(GuestAddress, usize)]| buffers.iter().map(|&(_, n)| n).sum();
        let readable_len: usize = total(&self.readable);
        let writable_len: usize = total(&self.writable);
        let data_len = writable_len.checked_sub(1)?;
        let written_len = readable_len - header_len;
        self.segments.clear();
        let bytes = match header.kind {
            T_IN if self.in_bounds(header.sector, data_len as u64) => {
                if !cut(&self.writable, 0, data_len, &mut self.segments) {
                    return None;
                }
                data_len
            }
            T_OUT if !self.read_only && self.in_bounds(header.sector, written_len as u64) => {
                if !cut(&self.readable, header_len, written_len, &mut self.segments) {
                    return None;
                }
                written_len
            }
            T_FLUSH => written_len + data_len,
            _ => return None,
        };
        Some(Direct {
            kind: header.kind,
            offset: header.sector.saturating_mul(SECTOR_SIZE),
            bytes: bytes as u64,
            status: byte_at(&self.writable, data_len)?,
        })
    }

    /// Gives completed reads, writes and flushes (in `self.done`) back to the
    /// driver: status written, chain used. Whether any was.
    fn complete(&mut self, queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool, DeviceBroken> {
        // Published together: a driver polling the ring takes the batch in one look.
        let used = self.take_done(mem);
        add_used_together(queue, mem, &used)?;
        Ok(!used.is_empty())
    }

    /// Ends every request in `self.done` ([`Self::finish`]): the used entries
    /// they go back with.
    fn take_done(&mut self, mem: &GuestMemoryMmap) -> Vec<(u16, u32)> {
        let mut used = Vec::with_capacity(self.done.len());
        for i in 0..self.done.len() {
            let Done {
                head,
                kind,
                status,
                moved,
                result,
                merged,
            } = self.done[i];
            if moved.is_none() {
                tracing::warn!(kind, result, "virtio-blk request failed");
            }
            if merged {
                self.metrics.merged.inc();
            }
            used.push((head, self.finish(mem, head, kind, status, moved)));
        }
        self.done.clear();
        used
    }

    /// Ends a read, a write or a flush that moved `moved` bytes (`None`: it
    /// failed): its status written and counted; the bytes the chain goes back
    /// with.
    fn finish(
        &mut self,
        mem: &GuestMemoryMmap,
        head: u16,
        kind: u32,
        status: GuestAddress,
        moved: Option<usize>,
    ) -> u32 {
        let written = match (kind, moved) {
            (T_IN, Some(n)) => {
                self.metrics.bytes_in.add(n as u64);
                n as u32
            }
            (T_OUT, Some(n)) => {
                self.metrics.bytes_out.add(n as u64);
                0
            }
            _ => 0,
        };
        let code = if moved.is_some() { S_OK } else { S_IOERR };
        if mem.write_obj(code, status).is_ok() {
            self.count(kind, code);
            written + 1
        } else {
            tracing::warn!(head, "virtio-blk status not writable");
            self.errors += 1;
            self.metrics.errors.inc();
            0
        }
    }

    /// Hands the requests queued for queue `index` on the asynchronous engine
    /// to the kernel, and gives back any that completed already (reads from the
    /// page cache often complete during submission).
    fn submit(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<bool, DeviceBroken> {
        if self.urings.is_empty() {
            return Ok(false);
        }
        self.submit_entries(index);
        self.complete(queue, mem)
    }

    /// Hands queue `index`'s queued entries to its ring, if any, and takes
    /// what completed into `self.done`.
    fn submit_entries(&mut self, index: usize) {
        let Some(uring) = self.urings.get_mut(index) else {
            return;
        };
        match uring.submit() {
            Ok(false) => return,
            Ok(true) => {}
            // Retried at the next call; a completion or a notification makes one.
            Err(e) => tracing::warn!("virtio-blk: io_uring submission failed: {e}"),
        }
        uring.completed(&mut self.done);
    }

    /// Ends the run: on the synchronous engine, or for reads that lie in a
    /// hole of the image (zeroes, no read), its requests' outcomes go into
    /// `self.done`; else, on the asynchronous engine, it goes to queue
    /// `index`'s ring.
    fn end_run(&mut self, index: usize, mem: &GuestMemoryMmap) -> Result<(), DeviceBroken> {
        if self.run.is_empty() {
            return Ok(());
        }
        let r = &self.run.requests;
        if r.kind == T_IN && self.holes.within_hole(&self.file, r.offset, r.len as u64) {
            self.metrics.hole_reads.add(r.held.len() as u64);
            self.run.zero(mem, &mut self.done);
            return Ok(());
        }
        match self.urings.get_mut(index) {
            None => self.run.end(&self.file, mem, &mut self.done),
            Some(uring) => {
                if !uring.push_run(mem, &self.run) {
                    return Err(too_many_in_flight());
                }
                self.run.clear();
            }
        }
        Ok(())
    }

    /// Serves one request of queue `index`, or holds it in the run (`waiting`:
    /// requests available after it).
    fn serve_request(
        &mut self,
        index: usize,
        chain: DescriptorChain<&GuestMemoryMmap>,
        mem: &GuestMemoryMmap,
        waiting: u16,
    ) -> Result<Served, DeviceBroken> {
        let head = chain.head_index();
        self.note_buffers(&chain);
        let direct = self.direct_request(mem);
        if let Some(d) = &direct {
            if let Err(wait) = self.charge(d.kind, d.bytes) {
                return Ok(Served::Wait(wait));
            }
            if let T_IN | T_OUT = d.kind {
                // Straight between the image and the request's buffers, with
                // those before it when it continues them.
                if !self.run.continues(d.kind, d.offset, &self.segments) {
                    self.end_run(index, mem)?;
                }
                if self
                    .run
                    .hold(mem, head, d.kind, d.offset, d.status, &self.segments)
                {
                    // The asynchronous engine's runs all go to the kernel when
                    // the pass ends: a shorter one would only merge less.
                    let waiting = if self.urings.is_empty() {
                        waiting
                    } else {
                        u16::MAX
                    };
                    if self.run.full(waiting) {
                        self.end_run(index, mem)?;
                    }
                    return Ok(Served::Kept { release: None });
                }
                // Buffers across a memory region boundary: through `serve`.
            }
        }
        self.end_run(index, mem)?;
        if let Some(Direct {
            kind: T_FLUSH,
            status,
            ..
        }) = direct
        {
            if let Some(uring) = self.urings.get_mut(index) {
                if !uring.push_flush(mem, head, status) {
                    return Err(too_many_in_flight());
                }
                return Ok(Served::Kept { release: None });
            }
        }
        // The rest: the chain read through virtio-queue's reader and writer.
        let Some(request) = Request::parse(chain, mem) else {
            // Still an operation (charged above if its header made sense): a
            // guest cannot flood the device with garbage.
            if direct.is_none() {
                if let Err(wait) = self.limiter.consume(0) {
                    self.metrics.throttled.inc();
                    return Ok(Served::Wait(wait));
                }
            }
            tracing::warn!(
                head,
                "malformed virtio-blk request; completed without a status"
            );
            self.errors += 1;
            self.metrics.errors.inc();
            return Ok(Served::Used(0));
        };
        if direct.is_none() {
            if let Err(wait) = self.charge(request.header.kind, request.bytes()) {
                return Ok(Served::Wait(wait));
            }
        }
        Ok(Served::Used(self.serve(request).unwrap_or_else(|| {
            tracing::warn!(head, "virtio-blk status not writable");
            self.errors += 1;
            self.metrics.errors.inc();
            0
        })))
    }

    /// Notes the device-readable and device-writable buffers of `chain`, in order.
    fn note_buffers(&mut self, chain: &DescriptorChain<&GuestMemoryMmap>) {
        self.readable.clear();
        self.writable.clear();
        for d in chain.clone() {
            let buffer = (d.addr(), d.len() as usize);
            if d.is_write_only() {
                self.writable.push(buffer);
            } else {
                self.readable.push(buffer);
            }
        }
    }
}

/// A read, write or flush taken from the chain's buffers alone
/// ([`Block::direct_request`]).
struct Direct {
    kind: u32,
    /// The image's byte offset.
    offset: u64,
    /// What the rate limiters charge.
    bytes: u64,
    status: GuestAddress,
}

/// One pass over queue `index`: each request served, or held in a run that
/// goes to the image as soon as it ends (it is full, the next request does not
/// continue it, the queue ran empty or the pass ends): on the synchronous
/// engine its requests are given back then and published at once (the run
/// already made them wait for each other, and a driver keeping the queue deep
/// adds more meanwhile); on the asynchronous one it goes to the ring.
struct Pass<'d, 'a> {
    block: &'d mut Block,
    index: usize,
    mem: &'a GuestMemoryMmap,
}

impl<'a> Server<'a> for Pass<'_, 'a> {
    fn serve(
        &mut self,
        chain: DescriptorChain<&'a GuestMemoryMmap>,
        waiting: u16,
    ) -> Result<Served, DeviceBroken> {
        self.block
            .serve_request(self.index, chain, self.mem, waiting)
    }

    fn release(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        batch: &mut UsedBatch,
        idle: bool,
    ) -> Result<(), DeviceBroken> {
        let block = &mut *self.block;
        if idle {
            block.end_run(self.index, mem)?;
            // The asynchronous engine's entries go to the kernel now: reads
            // from the page cache complete during submission and go back in
            // this pass, where a polling driver's next request is taken too.
            block.submit_entries(self.index);
        }
        if block.done.is_empty() {
            return Ok(());
        }
        for (head, len) in block.take_done(mem) {
            batch.push(queue, mem, head, len)?;
        }
        batch.publish(queue, mem)
    }
}

/// A device that has more requests in flight than its queue has entries is broken
/// (there are as many slots as entries).
fn too_many_in_flight() -> DeviceBroken {
    DeviceBroken("more virtio-blk requests in flight than queue entries".into())
}

/// Where byte `offset` of `buffers` (in order) is.
fn byte_at(buffers: &[(GuestAddress, usize)], mut offset: usize) -> Option<GuestAddress> {
    for &(addr, n) in buffers {
        if offset < n {
            return addr.checked_add(offset as u64);
        }
        offset -= n;
    }
    None
}

/// Appends to `out` the `len` bytes of `buffers` (in order) that start `skip`
/// bytes in, as buffers; false when one would start past the end of the
/// address space (the guest's descriptors are not checked yet).
#[must_use]
fn cut(
    buffers: &[(GuestAddress, usize)],
    mut skip: usize,
    mut len: usize,
    out: &mut Vec<(GuestAddress, usize)>,
) -> bool {
    for &(addr, n) in buffers {
        if len == 0 {
            break;
        }
        if skip >= n {
            skip -= n;
            continue;
        }
        let take = (n - skip).min(len);
        let Some(start) = addr.checked_add(skip as u64) else {
            return false;
        };
        out.push((start, take));
        len -= take;
        skip = 0;
    }
    true
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
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        let base = VIRTIO_F_VERSION_1
            | VIRTIO_F_RING_EVENT_IDX
            | VIRTIO_F_RING_INDIRECT_DESC
            | F_SEG_MAX
            | F_BLK_SIZE
            | F_FLUSH
            | if self.queue_sizes.len() > 1 { F_MQ } else { 0 };
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
        config[34..36].copy_from_slice(&self.num_queues().to_le_bytes());
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

    fn notified(&self, count: u64) {
        self.metrics.notifications.add(count);
    }

    fn ack_features(&mut self, acked: u64) {
        self.mq = acked & F_MQ != 0;
    }

    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<QueueOutcome, DeviceBroken> {
        if index > 0 && !self.mq {
            // Without VIRTIO_BLK_F_MQ only queue 0 exists for the driver.
            if !std::mem::replace(&mut self.ignored_logged, true) {
                tracing::warn!(
                    index,
                    "virtio-blk queue notified without VIRTIO_BLK_F_MQ; ignored"
                );
            }
            return Ok(QueueOutcome::Done(false));
        }
        let outcome = serve_chains_with(
            queue,
            mem,
            Publish::ByAge,
            Pass {
                block: self,
                index,
                mem,
            },
        )?;
        let completed = self.submit(index, queue, mem)?;
        Ok(match outcome {
            QueueOutcome::Done(used) => QueueOutcome::Done(used || completed),
            QueueOutcome::RetryAfter(wait, used) => {
                QueueOutcome::RetryAfter(wait, used || completed)
            }
        })
    }

    fn watched_fds(&mut self) -> Vec<(std::os::fd::RawFd, EventSet)> {
        self.urings
            .iter()
            .map(|u| (u.eventfd().as_raw_fd(), EventSet::IN))
            .collect()
    }

    fn fd_queue(&self, fd: std::os::fd::RawFd) -> Option<usize> {
        self.urings
            .iter()
            .position(|u| u.eventfd().as_raw_fd() == fd)
    }

    fn process_fd(
        &mut self,
        fd: std::os::fd::RawFd,
        _events: EventSet,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
    ) -> Result<QueueOutcome, DeviceBroken> {
        let Some(index) = self.fd_queue(fd) else {
            return Ok(QueueOutcome::Done(false));
        };
        let Some(queue) = queues.get_mut(index) else {
            return Ok(QueueOutcome::Done(false));
        };
        self.urings[index].completed(&mut self.done);
        Ok(QueueOutcome::Done(self.complete(queue, mem)?))
    }

    fn quiesce(
        &mut self,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
    ) -> Result<QueueOutcome, DeviceBroken> {
        let mut used = false;
        for (index, queue) in queues.iter_mut().enumerate() {
            let Some(uring) = self.urings.get_mut(index) else {
                break;
            };
            uring.wait_all(&mut self.done);
            used |= self.complete(queue, mem)?;
        }
        Ok(QueueOutcome::Done(used))
    }

    fn reset(&mut self) {
        // The driver forgot its queues: what is in flight completes unreported.
        // No waiting: the status write that resets comes on a vCPU thread.
        for uring in &mut self.urings {
            uring.forget_all();
        }
        self.done.clear();
        self.mq = false;
        self.ignored_logged = false;
    }
}
