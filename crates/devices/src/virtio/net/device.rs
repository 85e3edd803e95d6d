//! The virtio-net device: its queues, its tap and its rate limiters.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use vigil_metrics::{DeviceCounters, DeviceKind};

use crate::GuestMemoryMmap;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vmm_sys_util::epoll::EventSet;

use super::mmds::MmdsStack;
use super::tap::{Tap, VNET_HDR_LEN};
use crate::persist::Persist;
use crate::rate_limiter::{RateLimitControl, RateLimiter};
use crate::virtio::persist::DeviceState;
use crate::virtio::{
    add_used, copy_config, pop_chain, rearm, serve_chains, whole_chain_reader, Budget,
    DeviceBroken, Next, QueueOutcome, Served, VirtioDevice, TYPE_NET, VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_VERSION_1,
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

const F_MAC: u64 = 1 << 5;
const F_STATUS: u64 = 1 << 16;
const LINK_UP: u16 = 1;

/// Errors attaching a network interface.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("host_dev_name {tap:?}: cannot open or create the tap: {source} (this needs /dev/net/tun and root or CAP_NET_ADMIN, unless the tap was created for this user)")]
    Open { tap: String, source: std::io::Error },
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

/// A virtio-net device.
pub struct Net {
    /// The `iface_id` it was configured with, for its saved state.
    pub(super) id: Option<String>,
    pub(super) tap: Tap,
    pub(super) mac: [u8; 6],
    pub(super) rx_limiter: RateLimiter,
    pub(super) tx_limiter: RateLimiter,
    /// A frame read from the tap and not yet delivered (`rx_len` bytes of `rx_buf`).
    rx_buf: Vec<u8>,
    rx_len: usize,
    /// The guest has no receive buffer, the limiter said wait, or the backend
    /// closed: the tap is not watched until the guest adds buffers or the timer
    /// fires.
    rx_blocked: bool,
    tx_buf: Vec<u8>,
    counters: NetCounters,
    metrics: Arc<DeviceCounters>,
    /// MMDS, when this interface reaches it: its frames never touch the tap.
    pub(super) mmds: Option<MmdsStack>,
}

impl Net {
    /// Opens (or creates) the tap of `config`.
    pub fn new(config: &NetConfig) -> Result<Self, NetError> {
        let tap = Tap::open(&config.tap).map_err(|source| NetError::Open {
            tap: config.tap.clone(),
            source,
        })?;
        Ok(Self::with_tap(tap, config))
    }

    /// A device on `tap`, already open (`config.tap` is not used).
    pub fn with_tap(tap: Tap, config: &NetConfig) -> Self {
        tracing::info!(tap = tap.name(), "virtio-net attached");
        Self {
            id: config.id.clone(),
            tap,
            mac: config.mac.0,
            rx_limiter: RateLimiter::new(config.rx_rate_limit),
            tx_limiter: RateLimiter::new(config.tx_rate_limit),
            rx_buf: vec![0; MAX_BUFFER],
            rx_len: 0,
            rx_blocked: false,
            tx_buf: vec![0; MAX_BUFFER],
            counters: NetCounters::default(),
            metrics: Arc::new(DeviceCounters::new(DeviceKind::Net, config.tap.clone())),
            mmds: config.mmds.clone().and_then(MmdsStack::new),
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

    /// Moves frames from the tap into the guest's receive buffers until either
    /// runs out (or the limiter says wait).
    fn receive(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<QueueOutcome, DeviceBroken> {
        self.rx_blocked = false;
        let mut used = false;
        let mut budget = Budget::of(queue);
        loop {
            if self.rx_len == 0 {
                if let Some(frame) = self.mmds.as_mut().and_then(MmdsStack::to_guest) {
                    // At most FRAME_MAX bytes: it fits after the header.
                    let len = VNET_HDR_LEN + frame.len();
                    self.rx_buf[VNET_HDR_LEN..len].copy_from_slice(&frame);
                    self.rx_len = len;
                }
            }
            if self.rx_len == 0 {
                match self.tap.read_frame(&mut self.rx_buf) {
                    Ok(0) => {
                        // End of file: the backend is gone (a tap never says so; a
                        // socket or a handed-over fd can). Stop watching it, or it
                        // would wake the event loop for ever; the guest adding
                        // buffers tries again.
                        tracing::warn!(tap = self.tap.name(), "the network backend closed");
                        self.rx_blocked = true;
                        return Ok(QueueOutcome::Done(used));
                    }
                    Ok(n) if n < MIN_BUFFER => {
                        tracing::debug!(n, "runt frame from the tap; dropped");
                        self.counters.errors += 1;
                        self.metrics.errors.inc();
                        continue;
                    }
                    Ok(n) => self.rx_len = n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        return Ok(QueueOutcome::Done(used))
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        // As for end of file: an fd in error stays "readable".
                        tracing::warn!("cannot read from the tap: {e}");
                        self.rx_blocked = true;
                        return Ok(QueueOutcome::Done(used));
                    }
                }
            }
            let chain = match pop_chain(queue, mem, &mut budget)? {
                Next::Chain(chain) => chain,
                // With event indices: where the driver notifies next; a buffer
                // it added meanwhile is taken now.
                Next::Empty if queue.event_idx_enabled() && rearm(queue, mem)? => continue,
                Next::Empty => {
                    self.rx_blocked = true;
                    return Ok(QueueOutcome::Done(used));
                }
                // The tap is still readable: the event loop comes back to it.
                Next::Later => return Ok(QueueOutcome::Done(used)),
            };
            let head = chain.head_index();
            let mut writer = match chain.writer(mem) {
                Ok(w) if w.available_bytes() >= MIN_BUFFER => w,
                result => {
                    // A chain nothing can be received into: give it back empty and
                    // keep the frame for the next one.
                    tracing::debug!(head, ok = result.is_ok(), "unusable receive buffer");
                    self.counters.errors += 1;
                    self.metrics.errors.inc();
                    add_used(queue, mem, head, 0)?;
                    used = true;
                    continue;
                }
            };
            let len = self.rx_len;
            if writer.available_bytes() < len {
                tracing::debug!(
                    len,
                    room = writer.available_bytes(),
                    "frame larger than the receive buffer; dropped"
                );
                self.counters.errors += 1;
                self.metrics.errors.inc();
                self.rx_len = 0;
                queue.go_to_previous_position();
                continue;
            }
            if let Err(wait) = self.rx_limiter.consume(len as u64) {
                self.metrics.throttled.inc();
                queue.go_to_previous_position();
                self.rx_blocked = true;
                return Ok(QueueOutcome::RetryAfter(wait, used));
            }
            // No offloads: flags and GSO type 0; num_buffers (bytes 10..12) is 1.
            self.rx_buf[..VNET_HDR_LEN].fill(0);
            self.rx_buf[10..12].copy_from_slice(&1u16.to_le_bytes());
            let written = match writer.write_all(&self.rx_buf[..len]) {
                Ok(()) => {
                    self.counters.rx_frames += 1;
                    self.counters.rx_bytes += (len - VNET_HDR_LEN) as u64;
                    self.metrics.transfer_in((len - VNET_HDR_LEN) as u64);
                    len as u32
                }
                Err(e) => {
                    tracing::debug!(head, "cannot write a frame into guest memory: {e}");
                    self.counters.errors += 1;
                    self.metrics.errors.inc();
                    0
                }
            };
            self.rx_len = 0;
            add_used(queue, mem, head, written)?;
            used = true;
        }
    }

    /// Sends what the guest made available on the transmit queue to the tap.
    fn transmit(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<QueueOutcome, DeviceBroken> {
        serve_chains(queue, mem, |chain| {
            let head = chain.head_index();
            match whole_chain_reader(chain, mem) {
                Ok(mut reader) => {
                    let len = reader.available_bytes();
                    if !(MIN_BUFFER..=MAX_BUFFER).contains(&len) {
                        tracing::debug!(head, len, "transmit buffer of a bad size; dropped");
                        self.counters.errors += 1;
                        self.metrics.errors.inc();
                    } else if let Err(wait) = self.tx_limiter.consume(len as u64) {
                        self.metrics.throttled.inc();
                        return Ok(Served::Wait(wait));
                    } else if let Err(e) = reader.read_exact(&mut self.tx_buf[..len]) {
                        tracing::debug!(head, "cannot read a frame from guest memory: {e}");
                        self.counters.errors += 1;
                        self.metrics.errors.inc();
                    } else {
                        // Offloads were not offered: whatever the guest put in the
                        // header, the frame is complete as it is.
                        self.tx_buf[..VNET_HDR_LEN].fill(0);
                        let frame = &self.tx_buf[VNET_HDR_LEN..len];
                        if let Some(mmds) = self.mmds.as_mut().filter(|m| m.is_for_mmds(frame)) {
                            let dropped = mmds.from_guest(frame);
                            self.metrics.ops_other.inc();
                            self.counters.errors += dropped;
                            self.metrics.errors.add(dropped);
                            return Ok(Served::Used(0));
                        }
                        match self.tap.write_frame(&self.tx_buf[..len]) {
                            Ok(_) => {
                                self.counters.tx_frames += 1;
                                self.counters.tx_bytes += (len - VNET_HDR_LEN) as u64;
                                self.metrics.transfer_out((len - VNET_HDR_LEN) as u64);
                            }
                            Err(e) => {
                                // Full (WouldBlock) or down: the frame is lost, as
                                // on a real link.
                                tracing::debug!("cannot write a frame to the tap: {e}");
                                self.counters.errors += 1;
                                self.metrics.errors.inc();
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!(head, "malformed transmit chain: {e:?}");
                    self.counters.errors += 1;
                    self.metrics.errors.inc();
                }
            }
            Ok(Served::Used(0))
        })
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX | F_MAC | F_STATUS
    }

    fn state(&self) -> DeviceState {
        DeviceState::Net(self.save())
    }

    fn interrupted(&self) {
        self.metrics.interrupts.inc();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; 8];
        config[..6].copy_from_slice(&self.mac);
        config[6..8].copy_from_slice(&LINK_UP.to_le_bytes());
        copy_config(&config, offset, data);
    }

    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<QueueOutcome, DeviceBroken> {
        match index {
            RX => self.receive(queue, mem),
            TX => self.transmit(queue, mem),
            _ => Ok(QueueOutcome::Done(false)),
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
        if index != TX || !self.mmds.as_ref().is_some_and(MmdsStack::has_frames) {
            return Ok(sent);
        }
        let Some(rx) = queues.get_mut(RX).filter(|q| q.ready()) else {
            return Ok(sent);
        };
        let received = self.receive(rx, mem)?;
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
        if self.rx_blocked {
            Vec::new()
        } else {
            vec![(self.tap.as_raw_fd(), EventSet::IN)]
        }
    }

    fn process_fd(
        &mut self,
        _fd: RawFd,
        _events: EventSet,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
    ) -> Result<QueueOutcome, DeviceBroken> {
        match queues.get_mut(RX).filter(|q| q.ready()) {
            Some(queue) => self.receive(queue, mem),
            None => {
                self.rx_blocked = true;
                Ok(QueueOutcome::Done(false))
            }
        }
    }

    fn reset(&mut self) {
        self.rx_len = 0;
        self.rx_blocked = false;
    }
}
