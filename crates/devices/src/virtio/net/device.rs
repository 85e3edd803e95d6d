//! The virtio-net device: its queues, its tap and its rate limiters.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use vigil_metrics::{DeviceCounters, DeviceKind};

use crate::GuestMemoryMmap;
use virtio_queue::{Queue, QueueOwnedT, QueueT, Writer};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::EventSet;

use super::mmds::MmdsStack;
use super::tap::{Tap, VNET_HDR_LEN};
use crate::persist::Persist;
use crate::rate_limiter::{RateLimitControl, RateLimiter};
use crate::virtio::iov::{guest_iovecs, mark_written, Iovecs};
use crate::virtio::persist::DeviceState;
use crate::virtio::{
    add_used_together, copy_config, pop_chain, pop_single, rearm, serve_chains, whole_chain_reader,
    whole_chain_writer, with_used_batch, Budget, DeviceBroken, Next, Publish, QueueOutcome, Served,
    UsedBatch, VirtioDevice, TYPE_NET, VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1,
};
use vigil_model::config::{FieldError, NetConfig};

const QUEUE_SIZE: u16 = 256;
/// Receive queue index.
pub const RX: usize = 0;
/// Transmit queue index.
pub const TX: usize = 1;
/// Largest buffer (header and frame) either way: a 64 KiB IP packet, its
/// Ethernet header (with a VLAN tag) and the virtio-net header, as Firecracker.
pub const MAX_BUFFER: usize = 65562;
/// Shortest buffer worth passing on: the header and an Ethernet header.
const MIN_BUFFER: usize = VNET_HDR_LEN + 14;

/// Checksum and segmentation offloads (virtio 1.1, 5.1.3): the driver may send
/// frames with a partial checksum (`CSUM`) and TCP segments larger than the MTU
/// (`HOST_TSO*`), and take them (`GUEST_CSUM`, `GUEST_TSO*`), which the tap is
/// told (`TUNSETOFFLOAD`).
const F_CSUM: u64 = 1 << 0;
const F_GUEST_CSUM: u64 = 1 << 1;
const F_GUEST_TSO4: u64 = 1 << 7;
const F_GUEST_TSO6: u64 = 1 << 8;
const F_HOST_TSO4: u64 = 1 << 11;
const F_HOST_TSO6: u64 = 1 << 12;
const OFFLOADS: u64 =
    F_CSUM | F_GUEST_CSUM | F_GUEST_TSO4 | F_GUEST_TSO6 | F_HOST_TSO4 | F_HOST_TSO6;
/// `virtio_net_hdr` flags and GSO types.
const HDR_F_NEEDS_CSUM: u8 = 1;
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;
const F_MAC: u64 = 1 << 5;
/// `VIRTIO_NET_F_MRG_RXBUF`: a received frame may span several buffers, their
/// number in the header's `num_buffers`.
const F_MRG_RXBUF: u64 = 1 << 15;
const F_STATUS: u64 = 1 << 16;
/// `VIRTIO_NET_F_CTRL_VQ` and `VIRTIO_NET_F_MQ`: a control queue, through which
/// the driver chooses how many of the queue pairs it uses.
const F_CTRL_VQ: u64 = 1 << 17;
const F_MQ: u64 = 1 << 22;
const CTRL_QUEUE_SIZE: u16 = 64;
/// Control commands (virtio 1.1, 5.1.6.5): `VIRTIO_NET_CTRL_MQ`'s
/// `VQ_PAIRS_SET`, and the status written back.
const CTRL_MQ: u8 = 4;
const CTRL_MQ_VQ_PAIRS_SET: u8 = 0;
const CTRL_OK: u8 = 0;
const CTRL_ERR: u8 = 1;
const LINK_UP: u16 = 1;

/// Errors attaching a network interface.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("host_dev_name {tap:?}: cannot open or create the tap: {source} ({hint})")]
    Open {
        tap: String,
        source: std::io::Error,
        hint: &'static str,
    },
}

impl FieldError for NetError {
    fn field(&self) -> &'static str {
        "host_dev_name"
    }
}

/// Counters of one interface.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetCounters {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    /// Frames dropped: malformed chains, oversized or runt frames, a full tap,
    /// MMDS frames that did not fit its queues.
    pub errors: u64,
}

/// A receive queue and a transmit queue on one queue of the tap.
pub(super) struct Pair {
    pub(super) tap: Tap,
    /// A frame read from the tap and not yet delivered (`rx_len` bytes of `rx_buf`).
    rx_buf: Vec<u8>,
    rx_len: usize,
    /// The guest has no receive buffer, the limiter said wait, or the backend
    /// closed: the tap is not watched until the guest adds buffers or the timer
    /// fires.
    rx_blocked: bool,
}

impl Pair {
    fn new(tap: Tap) -> Self {
        Self {
            tap,
            rx_buf: vec![0; MAX_BUFFER],
            rx_len: 0,
            rx_blocked: false,
        }
    }
}

/// A virtio-net device.
pub struct Net {
    /// The `iface_id` it was configured with, for its saved state.
    pub(super) id: Option<String>,
    /// One queue pair per queue of the tap (one, unless `queue_pairs`).
    pub(super) pairs: Vec<Pair>,
    /// The pairs the driver uses (`VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET`; 1 until it
    /// says): the taps' other queues are detached.
    pub(super) active: u16,
    /// Receive and transmit of each pair, then the control queue when there are
    /// several pairs.
    queue_sizes: Vec<u16>,
    pub(super) mac: [u8; 6],
    pub(super) rx_limiter: RateLimiter,
    pub(super) tx_limiter: RateLimiter,
    /// The writable buffers of the chain a frame is read into, and their iovecs.
    rx_segments: Vec<(GuestAddress, usize)>,
    rx_iovecs: Iovecs,
    /// The features the driver accepted.
    acked: u64,
    /// The tap hands over frames with the offloads the driver accepted, their
    /// headers passed on as they are.
    rx_offloads: bool,
    tx_buf: Vec<u8>,
    counters: NetCounters,
    metrics: Arc<DeviceCounters>,
    /// MMDS, when this interface reaches it: its frames never touch the tap.
    pub(super) mmds: Option<MmdsStack>,
}

impl Net {
    /// Opens (or creates) the tap of `config`.
    pub fn new(config: &NetConfig) -> Result<Self, NetError> {
        let taps = Tap::open_queues(&config.tap, config.queue_pairs).map_err(|source| {
            // A tap made without IFF_MULTI_QUEUE refuses a queue opened with it.
            let hint = if config.queue_pairs > 1 && source.raw_os_error() == Some(libc::EINVAL) {
                "queue_pairs above 1 needs a multi-queue tap: one made with `ip tuntap add NAME \
                 mode tap multi_queue`, or none of that name, for Vigil to create"
            } else {
                "this needs /dev/net/tun and root or CAP_NET_ADMIN, unless the tap was created \
                 for this user"
            };
            NetError::Open {
                tap: config.tap.clone(),
                source,
                hint,
            }
        })?;
        Ok(Self::with_taps(taps, config))
    }

    /// A device on `tap`, already open (`config.tap` is not used).
    pub fn with_tap(tap: Tap, config: &NetConfig) -> Self {
        Self::with_taps(vec![tap], config)
    }

    /// A device of one queue pair per tap queue in `taps`, already open (at
    /// least one; `config.tap` and `config.queue_pairs` are not used). With
    /// several, the driver uses the first until it asks for more.
    pub fn with_taps(taps: Vec<Tap>, config: &NetConfig) -> Self {
        let pairs: Vec<Pair> = taps.into_iter().map(Pair::new).collect();
        tracing::info!(
            tap = pairs.first().map_or("", |p| p.tap.name()),
            queue_pairs = pairs.len(),
            "virtio-net attached"
        );
        let mut queue_sizes = vec![QUEUE_SIZE; 2 * pairs.len()];
        if pairs.len() > 1 {
            queue_sizes.push(CTRL_QUEUE_SIZE);
        }
        let mut net = Self {
            id: config.id.clone(),
            pairs,
            active: 1,
            queue_sizes,
            mac: config.mac.0,
            rx_limiter: RateLimiter::new(config.rx_rate_limit),
            tx_limiter: RateLimiter::new(config.tx_rate_limit),
            rx_segments: Vec::new(),
            rx_iovecs: Iovecs::default(),
            acked: 0,
            rx_offloads: false,
            tx_buf: vec![0; MAX_BUFFER],
            counters: NetCounters::default(),
            metrics: Arc::new(DeviceCounters::new(DeviceKind::Net, config.tap.clone())),
            mmds: config.mmds.clone().and_then(MmdsStack::new),
        };
        net.use_pairs(1);
        net
    }

    /// The pair whose tap queue is `fd`.
    fn pair_of(&self, fd: RawFd) -> Option<usize> {
        self.pairs
            .iter()
            .position(|pair| pair.tap.as_raw_fd() == fd)
    }

    /// The interface's name (its tap's).
    pub(super) fn tap_name(&self) -> &str {
        self.pairs.first().map_or("", |p| p.tap.name())
    }

    /// Serves the first `n` pairs (1 to their number): the tap's queues of the
    /// others are detached, so the kernel hands them no frames, and a frame one
    /// of them held for the guest is dropped.
    pub(super) fn use_pairs(&mut self, n: u16) {
        self.active = n;
        if self.pairs.len() == 1 {
            return;
        }
        for (i, pair) in self.pairs.iter_mut().enumerate() {
            let attached = i < usize::from(n);
            if !attached {
                pair.rx_len = 0;
            }
            if let Err(e) = pair.tap.set_queue_attached(attached) {
                // A backend that is not a multi-queue tap (a socket pair).
                tracing::debug!(tap = pair.tap.name(), queue = i, attached, "{e}");
            }
        }
    }

    /// Counts into `metrics` (shared with whoever reads them) from now on.
    pub fn with_counters(mut self, metrics: Arc<DeviceCounters>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Where another thread changes the receive and transmit limits while the
    /// device runs: `(rx, tx)`.
    pub fn rate_limit_controls(&mut self) -> (Arc<RateLimitControl>, Arc<RateLimitControl>) {
        (self.rx_limiter.control(), self.tx_limiter.control())
    }

    /// Frames and bytes each way, and drops.
    pub fn counters(&self) -> NetCounters {
        self.counters
    }

    /// The header of the frame in `rx_buf`: the tap's as it is with offloads,
    /// else none; then the number of buffers the frame takes.
    fn set_rx_header(&mut self, p: usize, buffers: u16) {
        let rx_buf = &mut self.pairs[p].rx_buf;
        if !self.rx_offloads {
            rx_buf[..VNET_HDR_LEN].fill(0);
        }
        rx_buf[10..12].copy_from_slice(&buffers.to_le_bytes());
    }

    /// Tells the tap which offloads (`TUN_F_*`) its frames may carry. A backend
    /// that cannot (a socket pair) hands over complete frames, which a driver
    /// that accepted offloads takes as well.
    fn set_rx_offloads(&mut self, flags: u32) {
        // The tap's setting, through any of its queues.
        match self.pairs[0].tap.set_offload(flags) {
            Ok(()) => self.rx_offloads = flags != 0,
            Err(e) => {
                tracing::debug!(tap = self.tap_name(), flags, "offloads not set: {e}");
                self.rx_offloads = false;
            }
        }
    }

    /// Counts a frame of `len` bytes (with its header) delivered to the guest.
    fn count_received(&mut self, len: usize) {
        let bytes = (len - VNET_HDR_LEN) as u64;
        self.counters.rx_frames += 1;
        self.counters.rx_bytes += bytes;
        self.metrics.transfer_in(bytes);
    }

    /// Counts a frame or chain dropped.
    fn count_error(&mut self) {
        self.counters.errors += 1;
        self.metrics.errors.inc();
    }

    /// Reads the next frame from the tap into the buffers of `rx_segments`
    /// (a chain's writable ones), its header set in place, when it fits there
    /// and the limiter lets it pass now (no copy); otherwise into `rx_buf`
    /// (`rx_len`), where `receive` takes it as it takes any frame. The tap
    /// reads into guest memory first and `rx_buf` after it, so a frame longer
    /// than the chain is never cut short.
    fn read_direct(&mut self, p: usize, mem: &GuestMemoryMmap) -> Direct {
        let room = self.rx_segments.iter().map(|&(_, len)| len).sum::<usize>();
        let direct = room >= MIN_BUFFER
            && self.rx_segments.len() <= MAX_RX_SEGMENTS
            && self.rx_segments[0].1 >= VNET_HDR_LEN
            && guest_iovecs(mem, &self.rx_segments, 0, &mut self.rx_iovecs.0).is_some();
        let pair = &mut self.pairs[p];
        if !direct {
            return match pair.tap.read_frame(&mut pair.rx_buf) {
                Ok(0) => Direct::Failed(None),
                Ok(n) => {
                    pair.rx_len = n;
                    Direct::Buffered
                }
                Err(e) => Direct::Failed(Some(e)),
            };
        }
        if room < MAX_BUFFER {
            self.rx_iovecs.0.push(libc::iovec {
                iov_base: pair.rx_buf[room..].as_mut_ptr().cast(),
                iov_len: MAX_BUFFER - room,
            });
        }
        let iovecs = &self.rx_iovecs.0;
        // SAFETY: each iovec is inside guest memory (mapped while `mem` is
        // borrowed) or `rx_buf`, as long as it says; the kernel writes at most
        // that. The system call itself, not libc's readv: that is a thread
        // cancellation point, two locked instructions around every frame.
        let n = unsafe {
            libc::syscall(
                libc::SYS_readv,
                pair.tap.as_raw_fd(),
                iovecs.as_ptr(),
                iovecs.len() as libc::c_int,
            )
        };
        let n = match n {
            0 => return Direct::Failed(None),
            n if n < 0 => return Direct::Failed(Some(std::io::Error::last_os_error())),
            n => n as usize,
        };
        let throttled = if (MIN_BUFFER..=room).contains(&n) {
            self.rx_limiter.consume(n as u64).err()
        } else {
            None
        };
        if n > room || n < MIN_BUFFER || throttled.is_some() {
            // The frame's first bytes are in the chain, the rest (if any) in
            // `rx_buf` where it goes.
            let pair = &mut self.pairs[p];
            pair.rx_len = n;
            let mut at = 0;
            for &(addr, len) in &self.rx_segments {
                let len = len.min(n.min(room) - at);
                if let Err(e) = mem.read_slice(&mut pair.rx_buf[at..at + len], addr) {
                    tracing::debug!("cannot read a frame back from guest memory: {e}");
                    pair.rx_len = 0;
                    break;
                }
                at += len;
            }
            return throttled.map_or(Direct::Buffered, Direct::Throttled);
        }
        let mut fixed = [0u8; VNET_HDR_LEN];
        fixed[10..12].copy_from_slice(&1u16.to_le_bytes());
        // With offloads the tap's own header stays; num_buffers is always set.
        let from = if self.rx_offloads { 10 } else { 0 };
        // Written where the tap just wrote, through the first iovec.
        let header = self.rx_iovecs.0[0].iov_base.cast::<u8>();
        for (i, &byte) in fixed.iter().enumerate().skip(from) {
            // SAFETY: the first iovec is the chain's first segment, whole (no
            // bytes skipped), at least VNET_HDR_LEN bytes (`direct`), inside guest
            // memory mapped while `mem` is borrowed; the driver may read or write
            // it meanwhile, hence the volatile bytes.
            unsafe { header.add(i).write_volatile(byte) };
        }
        mark_written(mem, &self.rx_segments, n);
        self.count_received(n);
        Direct::InPlace(n as u32)
    }

    /// Moves frames from the tap into the guest's receive buffers until either
    /// runs out (or the limiter says wait). Frames in one buffer each are
    /// published 8 at a time and when the queue or the tap runs dry (the used
    /// index is a line the driver keeps reading: one store per frame moved it
    /// between CPUs per frame); whatever ends the pass, they are published.
    fn receive(
        &mut self,
        p: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<QueueOutcome, DeviceBroken> {
        with_used_batch(queue, mem, Publish::Every8, |queue, batch| {
            self.receive_into(p, queue, mem, batch)
        })
    }

    /// [`Self::receive`]'s pass; the flag of its outcome counts only frames
    /// published outside `batch` (over several buffers).
    fn receive_into(
        &mut self,
        p: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        batch: &mut UsedBatch,
    ) -> Result<QueueOutcome, DeviceBroken> {
        self.pairs[p].rx_blocked = false;
        let mut used = false;
        let mut budget = Budget::of(queue);
        loop {
            // MMDS answers on the first pair.
            if self.pairs[p].rx_len == 0 && p == 0 {
                if let Some(frame) = self.mmds.as_mut().and_then(MmdsStack::to_guest) {
                    // At most FRAME_MAX bytes: it fits after the header.
                    let len = VNET_HDR_LEN + frame.len();
                    let pair = &mut self.pairs[p];
                    pair.rx_buf[..VNET_HDR_LEN].fill(0);
                    pair.rx_buf[VNET_HDR_LEN..len].copy_from_slice(&frame);
                    pair.rx_len = len;
                }
            }
            // A buffer of one descriptor (what drivers post) is read into
            // without building a chain; a frame that goes to `rx_buf` instead
            // is delivered by the chain path below, which takes it again.
            if self.pairs[p].rx_len == 0 {
                if let Some(single) = pop_single(queue, mem, &mut budget) {
                    if single.write_only {
                        self.rx_segments.clear();
                        self.rx_segments.push((single.addr, single.len as usize));
                        match self.receive_direct(p, queue, mem, batch, single.head, used)? {
                            Step::Next => continue,
                            Step::Return(outcome) => return Ok(outcome),
                            Step::Deliver => {}
                        }
                    }
                    budget.put_back_single(queue);
                }
            }
            let chain = match pop_chain(queue, mem, &mut budget)? {
                Next::Chain(chain) => chain,
                // What was received reaches the driver before the device looks
                // again, so that it posts those buffers again.
                Next::Empty if batch.holds() => {
                    batch.publish(queue, mem)?;
                    continue;
                }
                // With event indices: where the driver notifies next; a buffer
                // it added meanwhile is taken now.
                Next::Empty if queue.event_idx_enabled() && rearm(queue, mem)? => continue,
                Next::Empty => {
                    self.pairs[p].rx_blocked = true;
                    return Ok(QueueOutcome::Done(used));
                }
                // The tap is still readable: the event loop comes back to it.
                Next::Later => return Ok(QueueOutcome::Done(used)),
            };
            if self.pairs[p].rx_len == 0 {
                self.rx_segments.clear();
                self.rx_segments.extend(
                    chain
                        .clone()
                        .filter(|d| d.is_write_only())
                        .map(|d| (d.addr(), d.len() as usize)),
                );
                match self.receive_direct(p, queue, mem, batch, chain.head_index(), used)? {
                    Step::Next => continue,
                    Step::Return(outcome) => return Ok(outcome),
                    // Delivered from `rx_buf` below, into this chain or more.
                    Step::Deliver => {}
                }
            }
            let head = chain.head_index();
            let mut writer = match chain.writer(mem) {
                Ok(w) if w.available_bytes() >= MIN_BUFFER => w,
                result => {
                    // A chain nothing can be received into: give it back empty and
                    // keep the frame for the next one.
                    tracing::debug!(head, ok = result.is_ok(), "unusable receive buffer");
                    self.count_error();
                    batch.push(queue, mem, head, 0)?;
                    continue;
                }
            };
            let len = self.pairs[p].rx_len;
            if writer.available_bytes() < len && self.acked & F_MRG_RXBUF != 0 {
                // Its buffers go back together, after those received before.
                batch.publish(queue, mem)?;
                match self.receive_merged(p, queue, mem, (head, writer), &mut budget)? {
                    Merged::Delivered => {
                        used = true;
                        continue;
                    }
                    Merged::Later => return Ok(QueueOutcome::Done(used)),
                    Merged::NoRoom if wait_for_buffers(queue, mem)? => continue,
                    Merged::NoRoom => {
                        self.pairs[p].rx_blocked = true;
                        return Ok(QueueOutcome::Done(used));
                    }
                    Merged::Throttled(wait) => {
                        self.pairs[p].rx_blocked = true;
                        return Ok(QueueOutcome::RetryAfter(wait, used));
                    }
                }
            }
            if writer.available_bytes() < len {
                tracing::debug!(
                    len,
                    room = writer.available_bytes(),
                    "frame larger than the receive buffer; dropped"
                );
                self.count_error();
                self.pairs[p].rx_len = 0;
                queue.go_to_previous_position();
                continue;
            }
            if let Err(wait) = self.rx_limiter.consume(len as u64) {
                self.metrics.throttled.inc();
                queue.go_to_previous_position();
                self.pairs[p].rx_blocked = true;
                return Ok(QueueOutcome::RetryAfter(wait, used));
            }
            self.set_rx_header(p, 1);
            let written = match writer.write_all(&self.pairs[p].rx_buf[..len]) {
                Ok(()) => {
                    self.count_received(len);
                    len as u32
                }
                Err(e) => {
                    tracing::debug!(head, "cannot write a frame into guest memory: {e}");
                    self.count_error();
                    0
                }
            };
            self.pairs[p].rx_len = 0;
            batch.push(queue, mem, head, written)?;
        }
    }

    /// Reads the next frame into the buffer at `head` (its writable segments in
    /// `rx_segments`, taken from the queue) with [`Self::read_direct`], and
    /// says what the pass does next; the buffer goes back to the queue unless
    /// the frame is in it.
    fn receive_direct(
        &mut self,
        p: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        batch: &mut UsedBatch,
        head: u16,
        used: bool,
    ) -> Result<Step, DeviceBroken> {
        let step = match self.read_direct(p, mem) {
            Direct::InPlace(len) => {
                batch.push(queue, mem, head, len)?;
                return Ok(Step::Next);
            }
            Direct::Buffered if self.pairs[p].rx_len < MIN_BUFFER => {
                tracing::debug!(n = self.pairs[p].rx_len, "runt frame from the tap; dropped");
                self.count_error();
                self.pairs[p].rx_len = 0;
                Step::Next
            }
            Direct::Buffered => return Ok(Step::Deliver),
            Direct::Throttled(wait) => {
                self.metrics.throttled.inc();
                self.pairs[p].rx_blocked = true;
                Step::Return(QueueOutcome::RetryAfter(wait, used))
            }
            Direct::Failed(e) => match e {
                Some(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    Step::Return(QueueOutcome::Done(used))
                }
                Some(e) if e.kind() == std::io::ErrorKind::Interrupted => Step::Next,
                // End of file: the backend is gone (a tap never says so; a
                // socket or a handed-over fd can). Stop watching it, or it
                // would wake the event loop for ever; the guest adding buffers
                // tries again. An fd in error stays "readable" as well.
                e => {
                    match e {
                        None => {
                            tracing::warn!(tap = self.tap_name(), "the network backend closed")
                        }
                        Some(e) => tracing::warn!("cannot read from the tap: {e}"),
                    }
                    self.pairs[p].rx_blocked = true;
                    Step::Return(QueueOutcome::Done(used))
                }
            },
        };
        queue.go_to_previous_position();
        Ok(step)
    }

    /// Delivers the frame in `rx_buf` over `first` and as many more buffers as
    /// it takes (`VIRTIO_NET_F_MRG_RXBUF`), published to the driver at once.
    fn receive_merged<'m>(
        &mut self,
        p: usize,
        queue: &mut Queue,
        mem: &'m GuestMemoryMmap,
        first: (u16, GuestWriter<'m>),
        budget: &mut Budget<'m>,
    ) -> Result<Merged, DeviceBroken> {
        let len = self.pairs[p].rx_len;
        let mut room = first.1.available_bytes();
        let mut chains = vec![first];
        while room < len {
            let chain = match pop_chain(queue, mem, budget)? {
                Next::Chain(chain) => chain,
                next => {
                    // Not enough buffers yet: every one goes back to the queue.
                    for _ in 0..chains.len() {
                        queue.go_to_previous_position();
                    }
                    return Ok(match next {
                        Next::Later => Merged::Later,
                        _ => Merged::NoRoom,
                    });
                }
            };
            let head = chain.head_index();
            match chain.writer(mem) {
                Ok(w) if w.available_bytes() > 0 => {
                    room += w.available_bytes();
                    chains.push((head, w));
                }
                result => {
                    // The frame is dropped and every buffer taken for it given
                    // back empty (none goes back to the queue: this one is used).
                    tracing::debug!(head, ok = result.is_ok(), "unusable receive buffer");
                    self.count_error();
                    self.pairs[p].rx_len = 0;
                    let mut empty: Vec<(u16, u32)> = chains.iter().map(|&(h, _)| (h, 0)).collect();
                    empty.push((head, 0));
                    add_used_together(queue, mem, &empty)?;
                    return Ok(Merged::Delivered);
                }
            }
        }
        if let Err(wait) = self.rx_limiter.consume(len as u64) {
            self.metrics.throttled.inc();
            for _ in 0..chains.len() {
                queue.go_to_previous_position();
            }
            return Ok(Merged::Throttled(wait));
        }
        self.set_rx_header(p, chains.len() as u16);
        let mut used = Vec::with_capacity(chains.len());
        let mut at = 0;
        let mut failed = false;
        for (head, mut writer) in chains {
            let n = writer.available_bytes().min(len - at);
            failed |= writer.write_all(&self.pairs[p].rx_buf[at..at + n]).is_err();
            used.push((head, n as u32));
            at += n;
        }
        self.pairs[p].rx_len = 0;
        if failed {
            tracing::debug!("cannot write a frame into guest memory");
            self.count_error();
        } else {
            self.count_received(len);
        }
        add_used_together(queue, mem, &used)?;
        Ok(Merged::Delivered)
    }

    /// Sends what the guest made available on the transmit queue to the tap.
    fn transmit(
        &mut self,
        p: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<QueueOutcome, DeviceBroken> {
        serve_chains(queue, mem, Publish::Every8, |chain| {
            let head = chain.head_index();
            match whole_chain_reader(chain, mem) {
                Ok(mut reader) => {
                    let len = reader.available_bytes();
                    if !(MIN_BUFFER..=MAX_BUFFER).contains(&len) {
                        tracing::debug!(head, len, "transmit buffer of a bad size; dropped");
                        self.count_error();
                    } else if let Err(wait) = self.tx_limiter.consume(len as u64) {
                        self.metrics.throttled.inc();
                        return Ok(Served::Wait(wait));
                    } else if let Err(e) = reader.read_exact(&mut self.tx_buf[..len]) {
                        tracing::debug!(head, "cannot read a frame from guest memory: {e}");
                        self.count_error();
                    } else if !tx_header(&mut self.tx_buf[..len], self.acked) {
                        tracing::debug!(head, "transmit header asks for an offload not accepted");
                        self.count_error();
                    } else {
                        let frame = &self.tx_buf[VNET_HDR_LEN..len];
                        if let Some(mmds) = self.mmds.as_mut().filter(|m| m.is_for_mmds(frame)) {
                            if self.tx_buf[0] & HDR_F_NEEDS_CSUM != 0 {
                                // MMDS's stack checks checksums: finish it here.
                                complete_checksum(&mut self.tx_buf[..len]);
                            }
                            let dropped = mmds.from_guest(&self.tx_buf[VNET_HDR_LEN..len]);
                            self.metrics.ops_other.inc();
                            self.counters.errors += dropped;
                            self.metrics.errors.add(dropped);
                            return Ok(Served::Used(0));
                        }
                        match self.pairs[p].tap.write_frame(&self.tx_buf[..len]) {
                            Ok(_) => {
                                self.counters.tx_frames += 1;
                                self.counters.tx_bytes += (len - VNET_HDR_LEN) as u64;
                                self.metrics.transfer_out((len - VNET_HDR_LEN) as u64);
                            }
                            Err(e) => {
                                // Full (WouldBlock) or down: the frame is lost, as
                                // on a real link.
                                tracing::debug!("cannot write a frame to the tap: {e}");
                                self.count_error();
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!(head, "malformed transmit chain: {e:?}");
                    self.count_error();
                }
            }
            Ok(Served::Used(0))
        })
    }
}

impl Net {
    /// The control queue (`VIRTIO_NET_F_CTRL_VQ`, offered with several pairs):
    /// each chain a command (class, command, its data) and a status byte the
    /// device writes. `VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET` chooses the pairs in
    /// use; any other command, or a count out of range, is answered
    /// `VIRTIO_NET_ERR` and changes nothing.
    fn control(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<QueueOutcome, DeviceBroken> {
        serve_chains(queue, mem, Publish::Every8, |chain| {
            let head = chain.head_index();
            let status = match whole_chain_reader(chain.clone(), mem) {
                Ok(mut reader) => match reader.read_obj::<[u8; 2]>() {
                    Ok([CTRL_MQ, CTRL_MQ_VQ_PAIRS_SET]) => match reader.read_obj::<u16>() {
                        Ok(n) if (1..=self.pairs.len()).contains(&usize::from(u16::from_le(n))) => {
                            self.use_pairs(u16::from_le(n));
                            tracing::debug!(
                                tap = self.tap_name(),
                                pairs = self.active,
                                "queue pairs in use"
                            );
                            CTRL_OK
                        }
                        _ => CTRL_ERR,
                    },
                    _ => CTRL_ERR,
                },
                Err(_) => CTRL_ERR,
            };
            // The status is the last byte the driver made writable.
            let written = match whole_chain_writer(chain, mem) {
                Ok(mut writer) if writer.available_bytes() > 0 => {
                    let at = writer.available_bytes() - 1;
                    match writer.split_at(at).map(|mut last| last.write_obj(status)) {
                        Ok(Ok(())) => 1,
                        _ => 0,
                    }
                }
                _ => 0,
            };
            if written == 0 {
                tracing::debug!(head, "control command without a status byte");
                self.count_error();
            }
            Ok(Served::Used(written))
        })
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        let mq = if self.pairs.len() > 1 {
            F_CTRL_VQ | F_MQ
        } else {
            0
        };
        VIRTIO_F_VERSION_1
            | VIRTIO_F_RING_EVENT_IDX
            | F_MAC
            | F_MRG_RXBUF
            | F_STATUS
            | OFFLOADS
            | mq
    }

    fn ack_features(&mut self, acked: u64) {
        self.acked = acked;
        self.set_rx_offloads(tun_offloads(acked));
    }

    fn state(&self) -> DeviceState {
        DeviceState::Net(self.save())
    }

    fn interrupted(&self) {
        self.metrics.interrupts.inc();
    }

    fn notified(&self, count: u64) {
        self.metrics.notifications.add(count);
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; 10];
        config[..6].copy_from_slice(&self.mac);
        config[6..8].copy_from_slice(&LINK_UP.to_le_bytes());
        // max_virtqueue_pairs (read with VIRTIO_NET_F_MQ).
        config[8..10].copy_from_slice(&(self.pairs.len() as u16).to_le_bytes());
        copy_config(&config, offset, data);
    }

    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<QueueOutcome, DeviceBroken> {
        let pairs = self.pairs.len();
        match index {
            _ if index == 2 * pairs && pairs > 1 => self.control(queue, mem),
            _ if index >= 2 * pairs => Ok(QueueOutcome::Done(false)),
            _ if index % 2 == RX => self.receive(index / 2, queue, mem),
            _ => self.transmit(index / 2, queue, mem),
        }
    }

    /// As [`Self::process_queue`]; a transmission MMDS answered is delivered
    /// on the receive queue at once.
    fn process_queues(
        &mut self,
        index: usize,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
    ) -> Result<QueueOutcome, DeviceBroken> {
        let Some(queue) = queues.get_mut(index) else {
            return Ok(QueueOutcome::Done(false));
        };
        let sent = self.process_queue(index, queue, mem)?;
        let transmit = index % 2 == TX && index < 2 * self.pairs.len();
        if !transmit || !self.mmds.as_ref().is_some_and(MmdsStack::has_frames) {
            return Ok(sent);
        }
        let Some(rx) = queues.get_mut(RX).filter(|q| q.ready()) else {
            return Ok(sent);
        };
        let received = self.receive(0, rx, mem)?;
        Ok(match (sent, received) {
            (QueueOutcome::Done(a), QueueOutcome::Done(b)) => QueueOutcome::Done(a || b),
            (QueueOutcome::RetryAfter(wait, a), QueueOutcome::Done(b))
            | (QueueOutcome::Done(a), QueueOutcome::RetryAfter(wait, b)) => {
                QueueOutcome::RetryAfter(wait, a || b)
            }
            (QueueOutcome::RetryAfter(w1, a), QueueOutcome::RetryAfter(w2, b)) => {
                QueueOutcome::RetryAfter(w1.min(w2), a || b)
            }
        })
    }

    fn watched_fds(&mut self) -> Vec<(RawFd, EventSet)> {
        self.pairs[..usize::from(self.active)]
            .iter()
            .filter(|pair| !pair.rx_blocked)
            .map(|pair| (pair.tap.as_raw_fd(), EventSet::IN))
            .collect()
    }

    /// A tap queue's frames go to its pair's receive queue only (with MSI-X,
    /// that queue's vector alone fires).
    fn fd_queue(&self, fd: RawFd) -> Option<usize> {
        self.pair_of(fd).map(|p| 2 * p + RX)
    }

    fn process_fd(
        &mut self,
        fd: RawFd,
        _events: EventSet,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
    ) -> Result<QueueOutcome, DeviceBroken> {
        let Some(p) = self.pair_of(fd) else {
            return Ok(QueueOutcome::Done(false));
        };
        match queues.get_mut(2 * p + RX).filter(|q| q.ready()) {
            Some(queue) => self.receive(p, queue, mem),
            None => {
                self.pairs[p].rx_blocked = true;
                Ok(QueueOutcome::Done(false))
            }
        }
    }

    fn reset(&mut self) {
        for pair in &mut self.pairs {
            pair.rx_len = 0;
            pair.rx_blocked = false;
        }
        self.use_pairs(1);
        self.acked = 0;
        if self.rx_offloads {
            self.set_rx_offloads(0);
        }
    }
}

/// A writer into a chain of guest memory, dirty pages marked.
type GuestWriter<'m> = Writer<'m, vm_memory::bitmap::BS<'m, vm_memory::bitmap::AtomicBitmap>>;

/// Most buffers in a receive chain [`Net::read_direct`] reads into; a chain
/// of more goes through `rx_buf`.
const MAX_RX_SEGMENTS: usize = 64;

/// What [`Net::read_direct`] did.
enum Direct {
    /// The frame is in the chain: give it back, this many bytes written.
    InPlace(u32),
    /// The frame is in `rx_buf` (`rx_len`; 0: dropped); the chain was not used.
    Buffered,
    /// As `Buffered`, and the limiter says wait this long.
    Throttled(std::time::Duration),
    /// Nothing read: end of file (`None`) or the error.
    Failed(Option<std::io::Error>),
}

/// What the receive pass does after [`Net::receive_direct`].
enum Step {
    /// Take the next buffer.
    Next,
    /// End the pass so.
    Return(QueueOutcome),
    /// Deliver the frame in `rx_buf` through the chain path.
    Deliver,
}

/// What [`Net::receive_merged`] did with the frame.
enum Merged {
    /// Delivered, or dropped with its buffers given back empty.
    Delivered,
    /// The budget ran out while gathering buffers: the event loop comes back.
    Later,
    /// The driver has not made enough buffers available yet.
    NoRoom,
    /// The rate limiter says wait this long.
    Throttled(std::time::Duration),
}

/// A frame waits for more buffers than the driver has made available: asks to
/// be notified at the next one it adds (the available index as it is now,
/// since the device went back over the buffers it had taken). True when some
/// arrived meanwhile.
fn wait_for_buffers(queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool, DeviceBroken> {
    let broken =
        |e: virtio_queue::Error| DeviceBroken(format!("cannot re-arm notifications: {e:?}"));
    let avail = queue.avail_idx(mem, Ordering::Acquire).map_err(broken)?;
    if queue.event_idx_enabled() {
        let at = queue.used_ring() + 4 + 8 * u64::from(queue.size());
        mem.store(avail.0.to_le(), GuestAddress(at), Ordering::Release)
            .map_err(|e| DeviceBroken(format!("cannot write avail_event: {e}")))?;
    } else {
        queue.enable_notification(mem).map_err(broken)?;
    }
    std::sync::atomic::fence(Ordering::SeqCst);
    Ok(queue.avail_idx(mem, Ordering::Acquire).map_err(broken)? != avail)
}

/// The tap's offloads (`TUN_F_*`) for the features the driver accepted.
fn tun_offloads(acked: u64) -> u32 {
    if acked & F_GUEST_CSUM == 0 {
        return 0;
    }
    let mut flags = libc::TUN_F_CSUM;
    if acked & F_GUEST_TSO4 != 0 {
        flags |= libc::TUN_F_TSO4;
    }
    if acked & F_GUEST_TSO6 != 0 {
        flags |= libc::TUN_F_TSO6;
    }
    flags
}

/// Checks and tidies the virtio-net header at the start of `frame`, a frame
/// the driver sends, for the tap. A driver that accepted no transmit offload
/// gets its header cleared, whatever it holds: the frame is complete. Else a
/// partial checksum and segmentation pass on as the driver asked where it
/// accepted them (the tap finishes them), anything else is cleared;
/// `num_buffers` is zeroed. False when the frame asks for segmentation the
/// driver did not accept, or without a partial checksum (virtio 1.1,
/// 5.1.6.2.1), or of a kind not offered: it is dropped.
fn tx_header(frame: &mut [u8], acked: u64) -> bool {
    let Some(hdr) = frame.get_mut(..VNET_HDR_LEN) else {
        return false;
    };
    if acked & (F_CSUM | F_HOST_TSO4 | F_HOST_TSO6) == 0 {
        hdr.fill(0);
        return true;
    }
    let csum = acked & F_CSUM != 0 && hdr[0] & HDR_F_NEEDS_CSUM != 0;
    let gso = match hdr[1] {
        GSO_NONE => true,
        GSO_TCPV4 => acked & F_HOST_TSO4 != 0,
        GSO_TCPV6 => acked & F_HOST_TSO6 != 0,
        _ => false,
    };
    if !gso || (hdr[1] != GSO_NONE && !csum) {
        return false;
    }
    if csum {
        hdr[0] = HDR_F_NEEDS_CSUM;
        hdr[10..12].fill(0);
    } else {
        hdr.fill(0);
    }
    true
}

/// Finishes a partial checksum the header asks for (`csum_start`,
/// `csum_offset`): the Internet checksum of the bytes from `csum_start`, whose
/// field holds the pseudo-header's sum, stored in that field. A header pointing
/// outside the frame leaves it as it is.
fn complete_checksum(frame: &mut [u8]) {
    let (Some(hdr), Some(body)) = (frame.get(..VNET_HDR_LEN), frame.get(VNET_HDR_LEN..)) else {
        return;
    };
    let start = usize::from(u16::from_le_bytes([hdr[6], hdr[7]]));
    let field = start + usize::from(u16::from_le_bytes([hdr[8], hdr[9]]));
    if field + 2 > body.len() {
        return;
    }
    let mut sum: u64 = 0;
    for pair in body[start..].chunks(2) {
        sum += u64::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let checksum = !(sum as u16);
    let at = VNET_HDR_LEN + field;
    frame[at..at + 2].copy_from_slice(&checksum.to_be_bytes());
    frame[0] &= !HDR_F_NEEDS_CSUM;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Internet checksum of `bytes` after `sum`.
    fn checksum(bytes: &[u8], mut sum: u32) -> u16 {
        for pair in bytes.chunks(2) {
            sum += u32::from(u16::from_be_bytes([pair[0], *pair.get(1).unwrap_or(&0)]));
        }
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        !(sum as u16)
    }

    /// A partial UDP checksum (the pseudo-header's sum in the field) is finished
    /// as a device finishes it: the datagram then checks out, odd length and all.
    #[test]
    fn a_partial_checksum_is_finished() {
        let payload = b"odd-length payload";
        let udp_len = 8 + payload.len();
        let mut frame = vec![0u8; VNET_HDR_LEN + 14 + 20];
        frame[0] = HDR_F_NEEDS_CSUM;
        frame[6..8].copy_from_slice(&34u16.to_le_bytes());
        frame[8..10].copy_from_slice(&6u16.to_le_bytes());
        let ip = VNET_HDR_LEN + 14;
        frame[ip + 12..ip + 16].copy_from_slice(&[10, 0, 0, 2]);
        frame[ip + 16..ip + 20].copy_from_slice(&[10, 0, 0, 1]);
        let pseudo = 0x0a00 + 0x0002 + 0x0a00 + 0x0001 + 17 + udp_len as u32;
        let mut udp = vec![0x13, 0x88, 0x15, 0xb3, 0, udp_len as u8];
        udp.extend_from_slice(&(!checksum(&[], pseudo)).to_be_bytes());
        udp.extend_from_slice(payload);
        frame.extend_from_slice(&udp);

        complete_checksum(&mut frame);
        assert_eq!(frame[0] & HDR_F_NEEDS_CSUM, 0);
        assert_eq!(
            checksum(&frame[ip + 20..], pseudo),
            0,
            "the datagram checks out"
        );

        // A header pointing past the frame leaves it alone.
        let mut short = frame.clone();
        short[0] = HDR_F_NEEDS_CSUM;
        short[8..10].copy_from_slice(&0xfff0u16.to_le_bytes());
        let before = short.clone();
        complete_checksum(&mut short);
        assert_eq!(short, before);
    }
}
