//! The serializable state of a virtio-mmio transport and of the device behind it,
//! kept apart from the live models (Firecracker's `persist.rs` style): plain data
//! that snapshot and migration write out and read back.
//!
//! Saving is [`MmioTransport::state`](super::mmio::MmioTransport::state) (the
//! devices answer [`VirtioDevice::state`]). Restoring is two steps, in the shape
//! of the builder: [`MmioTransportState::restore_device`] checks what it can and
//! re-opens what the device needs on the host (the image, the tap, the listening
//! socket) and returns the device, whose queue count says how many notification
//! eventfds to make; then
//! [`MmioTransport::restore`](super::mmio::MmioTransport::restore) puts it behind
//! its registers with its queues, given guest memory, the interrupt and those
//! eventfds.
//!
//! A state is untrusted input (a file from disk, a stream from another host).
//! Everything in it is checked (what needs no device before the device is
//! built, the rest before the transport is) against the rules the live
//! transport itself keeps (a queue size is a power of two no larger than the
//! device's maximum, a negotiated feature set is one the device offered, a running
//! queue's rings lie in guest memory, ...); a value that breaks one is refused with
//! a [`RestoreError`] naming the field and the value. Nothing here panics.
//!
//! What is not carried: guest memory (saved on its own), bytes in flight on the
//! host side (a frame read from a tap and not yet delivered is lost, as on a real
//! link), open vsock connections (the guest is told to drop them: see
//! [`VsockState`]), rate-limiter tokens (only the configuration: the buckets start
//! full), and statistics counters.

use std::fmt::Display;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use virtio_queue::Queue;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::balloon::{Balloon, BalloonConfig, TYPE_BALLOON};
use super::block::{Block, BlockConfig, BlockError};
use super::mmio::status;
use super::net::{Net, NetConfig, NetError};
use super::rng::Rng;
use super::vsock::{Vsock, VsockConfig, VsockError};
use super::{
    VirtioDevice, INT_CONFIG, INT_USED_RING, TYPE_BLOCK, TYPE_NET, TYPE_RNG, TYPE_VSOCK,
    VIRTIO_F_VERSION_1,
};
use crate::rate_limiter::RateLimit;

/// `VIRTIO_F_RING_EVENT_IDX` (virtio 1.1, 6): no device offers it today, so a
/// queue with event indices on is refused unless the feature was negotiated.
const VIRTIO_F_RING_EVENT_IDX: u64 = 1 << 29;

/// Why a state cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// A field has a value the device cannot take.
    #[error("{field} = {value}: {why}")]
    Invalid {
        /// Where in the state, as in `queues[0].size` or `device.block.capacity`.
        field: String,
        /// The value found there.
        value: String,
        /// What is wrong with it.
        why: String,
    },
    /// A host resource the state names (an image, a tap, a socket) cannot be
    /// opened.
    #[error("{field} = {value}: {why}: {source}")]
    Resource {
        field: String,
        value: String,
        why: String,
        source: std::io::Error,
    },
}

impl RestoreError {
    /// The field at fault.
    pub fn field(&self) -> &str {
        match self {
            RestoreError::Invalid { field, .. } | RestoreError::Resource { field, .. } => field,
        }
    }

    fn invalid(field: impl Into<String>, value: impl Display, why: impl Into<String>) -> Self {
        RestoreError::Invalid {
            field: field.into(),
            value: value.to_string(),
            why: why.into(),
        }
    }
}

/// The state of one split virtqueue: a serializable mirror of
/// [`virtio_queue::QueueState`], which has no serde support.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct QueueState {
    /// The largest size the device offers.
    pub max_size: u16,
    /// Where the device reads the available ring next.
    pub next_avail: u16,
    /// Where the device writes the used ring next.
    pub next_used: u16,
    /// `VIRTIO_F_RING_EVENT_IDX` in use.
    pub event_idx_enabled: bool,
    /// The size the driver chose.
    pub size: u16,
    /// The driver set the queue up (`QueueReady`).
    pub ready: bool,
    /// Guest address of the descriptor table.
    pub desc_table: u64,
    /// Guest address of the available ring.
    pub avail_ring: u64,
    /// Guest address of the used ring.
    pub used_ring: u64,
}

impl From<virtio_queue::QueueState> for QueueState {
    fn from(s: virtio_queue::QueueState) -> Self {
        Self {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

impl From<QueueState> for virtio_queue::QueueState {
    fn from(s: QueueState) -> Self {
        Self {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

impl From<&Queue> for QueueState {
    fn from(q: &Queue) -> Self {
        q.state().into()
    }
}

impl QueueState {
    /// Rebuilds the queue through `Queue::try_from`, which checks the sizes and
    /// the ring alignments; `field` names the queue in errors (`queues[1]`).
    /// Guest memory is not consulted here (see [`MmioTransportState`]).
    pub fn to_queue(&self, field: &str) -> Result<Queue, RestoreError> {
        let max = self.max_size;
        if max == 0 || !max.is_power_of_two() || max > 32768 {
            return Err(RestoreError::invalid(
                format!("{field}.max_size"),
                max,
                "a queue's maximum size is a power of two from 1 to 32768",
            ));
        }
        if self.size == 0 || !self.size.is_power_of_two() || self.size > max {
            return Err(RestoreError::invalid(
                format!("{field}.size"),
                self.size,
                format!("a queue size is a power of two from 1 to max_size ({max})"),
            ));
        }
        for (name, addr, align) in [
            ("desc_table", self.desc_table, 16),
            ("avail_ring", self.avail_ring, 2),
            ("used_ring", self.used_ring, 4),
        ] {
            if addr % align != 0 {
                return Err(RestoreError::invalid(
                    format!("{field}.{name}"),
                    format_args!("{addr:#x}"),
                    format!("not aligned to {align} bytes"),
                ));
            }
        }
        // The checks above are the ones `try_from` makes; its error, should it
        // find another, is still named.
        Queue::try_from(virtio_queue::QueueState::from(*self))
            .map_err(|e| RestoreError::invalid(field, format_args!("{self:?}"), format!("{e:?}")))
    }

    /// Checks that the rings of a queue of `self.size` entries lie in `mem`.
    fn check_rings(&self, field: &str, mem: &GuestMemoryMmap) -> Result<(), RestoreError> {
        let n = u64::from(self.size);
        for (name, addr, len) in [
            ("desc_table", self.desc_table, 16 * n),
            ("avail_ring", self.avail_ring, 6 + 2 * n),
            ("used_ring", self.used_ring, 6 + 8 * n),
        ] {
            if !mem.check_range(GuestAddress(addr), len as usize) {
                return Err(RestoreError::invalid(
                    format!("{field}.{name}"),
                    format_args!("{addr:#x}"),
                    format!("its {len} bytes are not all in guest memory"),
                ));
            }
        }
        Ok(())
    }
}

/// One token bucket of a rate limit: `rate` per second, holding at most `burst`
/// (one second's worth when absent). Tokens are not saved: a restored bucket
/// starts full.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TokenBucketState {
    pub rate: u64,
    pub burst: Option<u64>,
}

/// The configuration of a rate limiter (bytes, operations).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RateLimitState {
    pub bandwidth: Option<TokenBucketState>,
    pub ops: Option<TokenBucketState>,
}

impl From<RateLimit> for RateLimitState {
    fn from(l: RateLimit) -> Self {
        let bucket = |(rate, burst)| TokenBucketState { rate, burst };
        Self {
            bandwidth: l.bandwidth.map(bucket),
            ops: l.ops.map(bucket),
        }
    }
}

impl RateLimitState {
    /// The limit, once its rates are checked (the CLI's rule: above zero).
    fn to_limit(self, field: &str) -> Result<RateLimit, RestoreError> {
        for (name, bucket) in [("bandwidth", self.bandwidth), ("ops", self.ops)] {
            if let Some(TokenBucketState { rate: 0, .. }) = bucket {
                return Err(RestoreError::invalid(
                    format!("{field}.{name}.rate"),
                    0,
                    "a rate must be above zero (no bucket for no limit)",
                ));
            }
        }
        let pair = |b: TokenBucketState| (b.rate, b.burst);
        Ok(RateLimit {
            bandwidth: self.bandwidth.map(pair),
            ops: self.ops.map(pair),
            ..Default::default()
        })
    }
}

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
}

/// virtio-rng: only its rate limit.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RngState {
    pub rate_limit: RateLimitState,
}

/// virtio-net: the tap is opened (or created) by name on restore.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NetState {
    pub tap: String,
    pub mac: [u8; 6],
    pub rx_rate_limit: RateLimitState,
    pub tx_rate_limit: RateLimitState,
}

/// virtio-vsock: the device listens on `uds` again. Open connections are not
/// carried: the restored device sends `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` on the
/// event queue (virtio 1.2, 5.10.6.7) as soon as the driver has an event buffer
/// there, and the guest drops its connections.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VsockState {
    pub cid: u64,
    pub uds: PathBuf,
}

/// One memory statistic the guest sent (virtio 1.1, 5.5.6.3).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BalloonStat {
    pub tag: u16,
    pub value: u64,
}

/// Most statistics the balloon keeps from one buffer.
pub const MAX_BALLOON_STATS: usize = 64;

/// virtio-balloon: its config space, its configuration, and the statistics
/// buffer it holds (the guest gave it and waits for it back).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BalloonState {
    /// The target, in 4 KiB pages (config space `num_pages`).
    pub num_pages: u32,
    /// What the driver says it gave back (config space `actual`).
    pub actual: u32,
    /// How often statistics are asked for; `None`: no statistics queue.
    pub stats_interval: Option<Duration>,
    pub free_page_reporting: bool,
    pub deflate_on_oom: bool,
    /// Head of the statistics buffer the device holds, if any.
    pub stats_held: Option<u16>,
    /// The statistics last received.
    pub stats: Vec<BalloonStat>,
}

/// The device behind a transport, by kind.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DeviceState {
    Block(BlockState),
    Rng(RngState),
    Net(NetState),
    Vsock(VsockState),
    Balloon(BalloonState),
}

impl DeviceState {
    /// The virtio device type of this kind.
    pub fn device_type(&self) -> u32 {
        match self {
            DeviceState::Block(_) => TYPE_BLOCK,
            DeviceState::Rng(_) => TYPE_RNG,
            DeviceState::Net(_) => TYPE_NET,
            DeviceState::Vsock(_) => TYPE_VSOCK,
            DeviceState::Balloon(_) => TYPE_BALLOON,
        }
    }

    /// Checks the state and builds the device, opening what it needs on the host.
    pub fn restore(&self) -> Result<Box<dyn VirtioDevice>, RestoreError> {
        Ok(match self {
            DeviceState::Block(s) => Box::new(restore_block(s)?),
            DeviceState::Rng(s) => {
                Box::new(Rng::new(s.rate_limit.to_limit("device.rng.rate_limit")?))
            }
            DeviceState::Net(s) => Box::new(restore_net(s)?),
            DeviceState::Vsock(s) => Box::new(restore_vsock(s)?),
            DeviceState::Balloon(s) => Box::new(restore_balloon(s)?),
        })
    }
}

fn restore_block(s: &BlockState) -> Result<Block, RestoreError> {
    const F: &str = "device.block";
    let path = s.path.display().to_string();
    if s.id.len() > 20 {
        return Err(RestoreError::invalid(
            format!("{F}.id"),
            format_args!("{:?}", s.id),
            "longer than the 20 bytes virtio-blk allows",
        ));
    }
    let config = BlockConfig {
        path: s.path.clone(),
        read_only: s.read_only,
        id: s.id.clone(),
        rate_limit: s.rate_limit.to_limit(&format!("{F}.rate_limit"))?,
        read_limit: s.read_limit.to_limit(&format!("{F}.read_limit"))?,
        write_limit: s.write_limit.to_limit(&format!("{F}.write_limit"))?,
    };
    let block = Block::new(&config).map_err(|e| match e {
        BlockError::Open { mode, source, .. } => RestoreError::Resource {
            field: format!("{F}.path"),
            value: path.clone(),
            why: format!("cannot open it{mode}"),
            source,
        },
        BlockError::NotAFile { .. } => RestoreError::invalid(
            format!("{F}.path"),
            &path,
            "not a regular file or block device",
        ),
        BlockError::IdTooLong { id } => RestoreError::invalid(
            format!("{F}.id"),
            format_args!("{id:?}"),
            "longer than the 20 bytes virtio-blk allows",
        ),
    })?;
    if block.capacity() != s.capacity {
        return Err(RestoreError::invalid(
            format!("{F}.capacity"),
            s.capacity,
            format!(
                "the image at {path} now has {} sectors; a disk cannot change size under its guest",
                block.capacity()
            ),
        ));
    }
    Ok(block)
}

fn restore_net(s: &NetState) -> Result<Net, RestoreError> {
    const F: &str = "device.net";
    let tap = &s.tap;
    let bad_tap =
        |why: &str| RestoreError::invalid(format!("{F}.tap"), format_args!("{tap:?}"), why);
    if tap.is_empty() || tap.len() > super::net::tap::IFNAME_MAX {
        return Err(bad_tap("an interface name has 1 to 15 bytes"));
    }
    if tap == "." || tap == ".." {
        return Err(bad_tap("not an interface name"));
    }
    if tap
        .bytes()
        .any(|b| b == b'/' || b == b':' || b.is_ascii_whitespace() || b.is_ascii_control())
    {
        return Err(bad_tap(
            "an interface name has no '/', ':', spaces or control characters",
        ));
    }
    let mac = format_args!("{:02x?}", s.mac).to_string();
    if s.mac[0] & 1 != 0 {
        return Err(RestoreError::invalid(
            format!("{F}.mac"),
            mac,
            "a multicast address",
        ));
    }
    if s.mac == [0; 6] {
        return Err(RestoreError::invalid(
            format!("{F}.mac"),
            mac,
            "the all-zero address",
        ));
    }
    let config = NetConfig {
        tap: tap.clone(),
        mac: s.mac,
        rx_rate_limit: s.rx_rate_limit.to_limit(&format!("{F}.rx_rate_limit"))?,
        tx_rate_limit: s.tx_rate_limit.to_limit(&format!("{F}.tx_rate_limit"))?,
    };
    Net::new(&config).map_err(|e| match e {
        NetError::Open { source, .. } => RestoreError::Resource {
            field: format!("{F}.tap"),
            value: tap.clone(),
            why: "cannot open or create the tap".into(),
            source,
        },
    })
}

fn restore_vsock(s: &VsockState) -> Result<Vsock, RestoreError> {
    const F: &str = "device.vsock";
    if s.cid < 3 || s.cid >= u64::from(u32::MAX) {
        return Err(RestoreError::invalid(
            format!("{F}.cid"),
            s.cid,
            "a guest CID is from 3 to 2^32 - 2",
        ));
    }
    let len = s.uds.as_os_str().len();
    // `_<port>` (up to 11 bytes) is appended for guest connections; sun_path
    // holds 107 bytes and a NUL.
    if len == 0 || len + 11 > 107 {
        return Err(RestoreError::invalid(
            format!("{F}.uds"),
            s.uds.display(),
            "a socket path has 1 to 96 bytes",
        ));
    }
    let mut vsock = Vsock::new(&VsockConfig {
        cid: s.cid,
        uds: s.uds.clone(),
    })
    .map_err(|e| match e {
        VsockError::Listen { source, .. } => RestoreError::Resource {
            field: format!("{F}.uds"),
            value: s.uds.display().to_string(),
            why: "cannot listen there".into(),
            source,
        },
    })?;
    vsock.queue_transport_reset();
    Ok(vsock)
}

fn restore_balloon(s: &BalloonState) -> Result<Balloon, RestoreError> {
    const F: &str = "device.balloon";
    if s.stats_interval == Some(Duration::ZERO) {
        return Err(RestoreError::invalid(
            format!("{F}.stats_interval"),
            "0s",
            "statistics every 0 s (no statistics queue is null)",
        ));
    }
    if s.stats.len() > MAX_BALLOON_STATS {
        return Err(RestoreError::invalid(
            format!("{F}.stats"),
            format_args!("{} entries", s.stats.len()),
            format!("the device keeps at most {MAX_BALLOON_STATS}"),
        ));
    }
    if s.stats_held.is_some() && s.stats_interval.is_none() {
        return Err(RestoreError::invalid(
            format!("{F}.stats_held"),
            format_args!("{:?}", s.stats_held),
            "a held statistics buffer without a statistics queue",
        ));
    }
    let config = BalloonConfig {
        target_mib: (u64::from(s.num_pages) * super::balloon::PAGE_SIZE) >> 20,
        stats_interval: s.stats_interval,
        free_page_reporting: s.free_page_reporting,
        deflate_on_oom: s.deflate_on_oom,
    };
    let stats = s.stats.iter().map(|s| (s.tag, s.value)).collect();
    Ok(Balloon::restored(
        config,
        s.num_pages,
        s.actual,
        s.stats_held,
        stats,
    ))
}

/// Everything of a virtio-mmio transport a driver can observe, and its device.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MmioTransportState {
    /// The device status register.
    pub device_status: u32,
    /// `DeviceFeaturesSel`.
    pub device_features_sel: u32,
    /// `DriverFeaturesSel`.
    pub driver_features_sel: u32,
    /// The features the driver acknowledged (negotiated once `FEATURES_OK`).
    pub acked_features: u64,
    /// `QueueSel`.
    pub queue_sel: u32,
    /// The interrupt status register.
    pub interrupt_status: u32,
    /// `ConfigGeneration`.
    pub config_generation: u32,
    /// One per queue of the device, in order.
    pub queues: Vec<QueueState>,
    /// The device.
    pub device: DeviceState,
}

/// The status bits virtio 1.1 (2.1) defines.
pub(crate) const KNOWN_STATUS: u32 = status::ACKNOWLEDGE
    | status::DRIVER
    | status::DRIVER_OK
    | status::FEATURES_OK
    | status::DEVICE_NEEDS_RESET
    | status::FAILED;

impl MmioTransportState {
    /// The first step of restoring: checks everything that needs no device (the
    /// status, the interrupt status, each queue's own fields, ...), then builds
    /// the device with [`DeviceState::restore`], which opens what it needs on
    /// the host. The second step is
    /// [`MmioTransport::restore`](super::mmio::MmioTransport::restore).
    pub fn restore_device(&self) -> Result<Box<dyn VirtioDevice>, RestoreError> {
        self.check_registers()?;
        self.device.restore()
    }

    /// The checks that need no device; returns the queues.
    fn check_registers(&self) -> Result<Vec<Queue>, RestoreError> {
        let s = self.device_status;
        if s & !KNOWN_STATUS != 0 {
            return Err(RestoreError::invalid(
                "device_status",
                format_args!("{s:#x}"),
                format!("bits {:#x} are not device status bits", s & !KNOWN_STATUS),
            ));
        }
        if s & status::DRIVER_OK != 0 && s & (status::FEATURES_OK | status::FAILED) == 0 {
            return Err(RestoreError::invalid(
                "device_status",
                format_args!("{s:#x}"),
                "DRIVER_OK without FEATURES_OK (the device would have failed)",
            ));
        }
        let acked = self.acked_features;
        if s & status::FEATURES_OK != 0 && acked & VIRTIO_F_VERSION_1 == 0 {
            return Err(RestoreError::invalid(
                "acked_features",
                format_args!("{acked:#x}"),
                "FEATURES_OK without VIRTIO_F_VERSION_1",
            ));
        }
        if self.interrupt_status & !(INT_USED_RING | INT_CONFIG) != 0 {
            return Err(RestoreError::invalid(
                "interrupt_status",
                format_args!("{:#x}", self.interrupt_status),
                "only bits 0x1 (used ring) and 0x2 (configuration) exist",
            ));
        }
        let event_idx = s & status::FEATURES_OK != 0 && acked & VIRTIO_F_RING_EVENT_IDX != 0;
        let mut queues = Vec::with_capacity(self.queues.len().min(16));
        for (i, q) in self.queues.iter().enumerate() {
            let field = format!("queues[{i}]");
            if q.event_idx_enabled && !event_idx {
                return Err(RestoreError::invalid(
                    format!("{field}.event_idx_enabled"),
                    true,
                    "VIRTIO_F_RING_EVENT_IDX was not negotiated",
                ));
            }
            queues.push(q.to_queue(&field)?);
        }
        if let DeviceState::Balloon(b) = &self.device {
            // The statistics queue is the third one.
            if let (Some(head), Some(q)) = (b.stats_held, self.queues.get(2)) {
                if head >= q.size {
                    return Err(RestoreError::invalid(
                        "device.balloon.stats_held",
                        head,
                        format!("not a descriptor of the {}-entry statistics queue", q.size),
                    ));
                }
            }
        }
        Ok(queues)
    }

    /// Checks the whole state against `device` (built from `self.device`) and
    /// guest memory, and rebuilds the queues.
    pub(crate) fn check(
        &self,
        device: &dyn VirtioDevice,
        mem: &GuestMemoryMmap,
    ) -> Result<Vec<Queue>, RestoreError> {
        if device.device_type() != self.device.device_type() {
            return Err(RestoreError::invalid(
                "device",
                format_args!("type {}", self.device.device_type()),
                format!("restored into a device of type {}", device.device_type()),
            ));
        }
        let queues = self.check_registers()?;
        let s = self.device_status;
        let offered = device.features();
        let acked = self.acked_features;
        if s & status::FEATURES_OK != 0 && acked & !offered != 0 {
            return Err(RestoreError::invalid(
                "acked_features",
                format_args!("{acked:#x}"),
                format!(
                    "bits {:#x} were never offered (the device offers {offered:#x})",
                    acked & !offered
                ),
            ));
        }
        let max_sizes = device.queue_max_sizes();
        if self.queues.len() != max_sizes.len() {
            return Err(RestoreError::invalid(
                "queues",
                format_args!("{} queues", self.queues.len()),
                format!("the device has {}", max_sizes.len()),
            ));
        }
        let running = s & (status::DRIVER_OK | status::DEVICE_NEEDS_RESET | status::FAILED)
            == status::DRIVER_OK;
        for (i, (q, &max)) in self.queues.iter().zip(max_sizes).enumerate() {
            let field = format!("queues[{i}]");
            if q.max_size != max {
                return Err(RestoreError::invalid(
                    format!("{field}.max_size"),
                    q.max_size,
                    format!("the device's queue {i} has {max} entries at most"),
                ));
            }
            // The live transport checks the rings of ready queues at DRIVER_OK
            // (and fails the device otherwise); after that they cannot move.
            if running && q.ready {
                q.check_rings(&field, mem)?;
            }
        }
        Ok(queues)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::QueueT;

    #[test]
    fn queue_state_mirrors_virtio_queue_both_ways() {
        let mut q = Queue::new(256).unwrap();
        q.set_size(64);
        q.set_ready(true);
        q.set_desc_table_address(Some(0x1000), Some(1));
        q.set_avail_ring_address(Some(0x2002), None);
        q.set_used_ring_address(Some(0x3004), None);
        q.set_next_avail(7);
        q.set_next_used(5);
        let s = QueueState::from(&q);
        assert_eq!(s.desc_table, 0x1_0000_1000);
        assert_eq!(virtio_queue::QueueState::from(s), q.state());
        let back = s.to_queue("queues[0]").unwrap();
        assert_eq!(back.state(), q.state());
    }

    #[test]
    fn bad_queue_fields_are_named() {
        let good = QueueState::from(&Queue::new(16).unwrap());
        type Corrupt = fn(&mut QueueState);
        let cases: [(Corrupt, &str); 6] = [
            (|s| s.size = 3, "queues[2].size"),
            (|s| s.size = 32, "queues[2].size"),
            (|s| s.size = 0, "queues[2].size"),
            (|s| s.max_size = 100, "queues[2].max_size"),
            (|s| s.desc_table = 8, "queues[2].desc_table"),
            (|s| s.used_ring = 2, "queues[2].used_ring"),
        ];
        for (break_it, field) in cases {
            let mut s = good;
            break_it(&mut s);
            let e = s.to_queue("queues[2]").unwrap_err();
            assert_eq!(e.field(), field, "{e}");
        }
    }

    #[test]
    fn rates_of_zero_are_refused() {
        let s = RateLimitState {
            bandwidth: None,
            ops: Some(TokenBucketState {
                rate: 0,
                burst: Some(4),
            }),
        };
        let e = s.to_limit("device.rng.rate_limit").unwrap_err();
        assert_eq!(e.field(), "device.rng.rate_limit.ops.rate");
        let l = RateLimit {
            bandwidth: Some((10, None)),
            ops: Some((5, Some(1))),
            ..Default::default()
        };
        assert_eq!(RateLimitState::from(l).to_limit("x").unwrap(), l);
    }
}
