//! The virtio-balloon device: its queues by role, the pages it gives back, the
//! statistics it holds, and the control it shares with the host.

use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::virtio::{Interrupt, Publish, Reader, INT_CONFIG};
use crate::GuestMemoryMmap;
use vigil_metrics::{DeviceCounters, DeviceKind};
use virtio_queue::Queue;
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::persist::Persist;
use crate::virtio::persist::DeviceState;
use crate::virtio::{
    add_used, copy_config, serve_chains, DeviceBroken, QueueOutcome, Served, VirtioDevice,
    VIRTIO_F_VERSION_1,
};
use vigil_model::config::BalloonConfig;

/// Device type (virtio 1.1, 5.5).
pub const TYPE_BALLOON: u32 = 5;
/// The balloon counts in 4 KiB pages whatever the guest's page size.
pub const PAGE_SIZE: u64 = 4096;
const QUEUE_SIZE: u16 = 256;
/// Most page numbers one inflate or deflate chain may carry (Linux sends at most
/// 256, the test guest 4096): a chain of a looping or huge descriptor would
/// otherwise hold the device event loop for seconds.
const MAX_PFNS_PER_CHAIN: usize = 4096;
/// Most statistics kept from one buffer.
pub(super) const MAX_STATS: usize = 64;

const F_STATS_VQ: u64 = 1 << 1;
const F_DEFLATE_ON_OOM: u64 = 1 << 2;
const F_FREE_PAGE_HINT: u64 = 1 << 3;
const F_REPORTING: u64 = 1 << 5;

/// Free page hinting's command ids (virtio 1.2, 5.5.6.7; Linux's
/// `VIRTIO_BALLOON_CMD_ID_*`): the host asks the guest to stop hinting, or to
/// take the hinted pages back (done); every other id names a hinting run.
const HINT_CMD_STOP: u32 = 0;
const HINT_CMD_DONE: u32 = 1;
const FIRST_HINT_RUN: u32 = 2;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Inflate,
    Deflate,
    Stats,
    Hinting,
    Reporting,
}

/// The statistics the guest last sent: `(tag, value)` (virtio 1.1, 5.5.6.3).
pub type Stats = Vec<(u16, u64)>;

/// What the host reads and changes while the VM runs (an API, a memory policy):
/// shared between the device and [`Balloon::control`]'s clones.
#[derive(Debug, Default)]
pub struct BalloonControl {
    target_pages: AtomicU32,
    actual_pages: AtomicU32,
    /// The statistics interval in milliseconds (0: none), when statistics are on.
    stats_interval_ms: AtomicU64,
    stats: Mutex<Stats>,
    /// Free page hinting: the command id the host shows the guest, the last one
    /// the guest sent (`u32::MAX`: none yet), and whether a guest's stop is
    /// answered with done at once.
    hint_host_cmd: AtomicU32,
    hint_guest_cmd: AtomicU32,
    /// The last run's id: each run gets a new one.
    hint_last_run: AtomicU32,
    hint_ack_on_stop: AtomicBool,
    /// The device's interrupt, for configuration changes the device itself makes
    /// (a hinting run acknowledged on stop).
    config_interrupt: OnceLock<Arc<Interrupt>>,
}

/// Where a free page hinting run stands: the last command of each side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HintingStatus {
    pub host_cmd: u32,
    pub guest_cmd: Option<u32>,
}

impl BalloonControl {
    /// Sets how much memory the guest should give back; the caller then raises
    /// the device's configuration-change interrupt.
    pub fn set_target_mib(&self, mib: u64) {
        let pages = (mib.saturating_mul(1 << 20) / PAGE_SIZE).min(u64::from(u32::MAX));
        self.target_pages.store(pages as u32, Ordering::Release);
    }

    /// `(target, actual)` in 4 KiB pages: asked for, and given back per the driver.
    pub fn pages(&self) -> (u32, u32) {
        (
            self.target_pages.load(Ordering::Acquire),
            self.actual_pages.load(Ordering::Acquire),
        )
    }

    /// The statistics interval in seconds (0: statistics off).
    pub fn stats_interval_s(&self) -> u64 {
        self.stats_interval_ms.load(Ordering::Acquire) / 1000
    }

    /// Changes the statistics interval (only meaningful when statistics are on;
    /// 0 is refused by callers, as the queue cannot come and go after boot).
    pub fn set_stats_interval_s(&self, seconds: u64) {
        self.set_stats_interval(Duration::from_secs(seconds));
    }

    fn set_stats_interval(&self, interval: Duration) {
        let ms = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX);
        self.stats_interval_ms.store(ms, Ordering::Release);
    }

    fn stats_interval(&self) -> Duration {
        Duration::from_millis(self.stats_interval_ms.load(Ordering::Acquire).max(1))
    }

    /// The latest memory statistics the guest sent: `(tag, value)`.
    pub fn stats(&self) -> Stats {
        self.stats.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// The interrupt the device raises its configuration changes on.
    pub fn set_config_interrupt(&self, interrupt: Arc<Interrupt>) {
        let _ = self.config_interrupt.set(interrupt);
    }

    fn config_changed(&self) {
        if let Some(i) = self.config_interrupt.get() {
            i.signal(INT_CONFIG);
        }
    }

    /// Starts a free page hinting run (a new command id, shown to the guest):
    /// the pages it hints are discarded until it stops. With `ack_on_stop`, the
    /// guest's stop is answered with done, so that it takes its pages back.
    pub fn start_hinting(&self, ack_on_stop: bool) {
        let last = self.hint_last_run.load(Ordering::Acquire);
        let next = last.wrapping_add(1).max(FIRST_HINT_RUN);
        self.hint_last_run.store(next, Ordering::Release);
        self.hint_ack_on_stop.store(ack_on_stop, Ordering::Release);
        self.hint_host_cmd.store(next, Ordering::Release);
        self.config_changed();
    }

    /// Ends the run: the guest takes the hinted pages back.
    pub fn stop_hinting(&self) {
        self.hint_host_cmd.store(HINT_CMD_DONE, Ordering::Release);
        self.config_changed();
    }

    /// The last command of each side.
    pub fn hinting_status(&self) -> HintingStatus {
        let guest = self.hint_guest_cmd.load(Ordering::Acquire);
        HintingStatus {
            host_cmd: self.hint_host_cmd.load(Ordering::Acquire),
            guest_cmd: (guest != u32::MAX).then_some(guest),
        }
    }

    pub(super) fn restore_hinting(&self, host_cmd: u32, guest_cmd: u32, ack_on_stop: bool) {
        self.hint_ack_on_stop.store(ack_on_stop, Ordering::Release);
        self.hint_host_cmd.store(host_cmd, Ordering::Release);
        self.hint_last_run.store(host_cmd, Ordering::Release);
        self.hint_guest_cmd.store(guest_cmd, Ordering::Release);
    }

    /// Whether the run under way acknowledges the guest's stop.
    pub(super) fn hint_ack_on_stop(&self) -> bool {
        self.hint_ack_on_stop.load(Ordering::Acquire)
    }

    /// The guest sent command `cmd` on the hinting queue.
    fn guest_hint_cmd(&self, cmd: u32) {
        self.hint_guest_cmd.store(cmd, Ordering::Release);
        let host = self.hint_host_cmd.load(Ordering::Acquire);
        if cmd == HINT_CMD_STOP
            && host >= FIRST_HINT_RUN
            && self.hint_ack_on_stop.load(Ordering::Acquire)
        {
            self.stop_hinting();
        }
    }

    /// Whether the guest's hints belong to the host's current run.
    fn hinting_now(&self) -> bool {
        let host = self.hint_host_cmd.load(Ordering::Acquire);
        host >= FIRST_HINT_RUN && self.hint_guest_cmd.load(Ordering::Acquire) == host
    }
}

/// A virtio-balloon device.
pub struct Balloon {
    pub(super) control: Arc<BalloonControl>,
    pub(super) config: BalloonConfig,
    roles: Vec<Role>,
    queue_sizes: Vec<u16>,
    pub(super) actual_pages: u32,
    /// The stats buffer the guest handed over, held until fresh stats are wanted.
    pub(super) stats_held: Option<u16>,
    stats_last: Instant,
    pub(super) stats: Stats,
    inflated: u64,
    deflated: u64,
    reported_bytes: u64,
    bad_pages: u64,
    metrics: Arc<DeviceCounters>,
}

impl Balloon {
    /// A balloon for `config`.
    pub fn new(config: BalloonConfig) -> Self {
        let roles = roles(offered(&config));
        let metrics = Arc::new(DeviceCounters::new(DeviceKind::Balloon, "balloon0"));
        let control = Arc::new(BalloonControl {
            hint_guest_cmd: AtomicU32::new(u32::MAX),
            ..Default::default()
        });
        control.set_target_mib(config.target_mib);
        control.set_stats_interval(config.stats_interval.unwrap_or_default());
        metrics
            .balloon_target_pages
            .set(u64::from(control.pages().0));
        Self {
            control,
            queue_sizes: vec![QUEUE_SIZE; roles.len()],
            roles,
            config,
            actual_pages: 0,
            stats_held: None,
            stats_last: Instant::now(),
            stats: Vec::new(),
            inflated: 0,
            deflated: 0,
            reported_bytes: 0,
            bad_pages: 0,
            metrics,
        }
    }

    /// A balloon rebuilt from its saved state (checked by the caller): its target
    /// and `actual` in pages, the statistics buffer it holds and the last statistics.
    pub(super) fn restored(
        config: BalloonConfig,
        target_pages: u32,
        actual_pages: u32,
        stats_held: Option<u16>,
        stats: Stats,
    ) -> Self {
        let balloon = Self {
            actual_pages,
            stats_held,
            ..Self::new(config)
        };
        let control = &balloon.control;
        control.target_pages.store(target_pages, Ordering::Release);
        control.actual_pages.store(actual_pages, Ordering::Release);
        if let Ok(mut shared) = control.stats.lock() {
            shared.clone_from(&stats);
        }
        Self { stats, ..balloon }
    }

    /// Counts into `metrics` (shared with whoever reads them) from now on.
    pub fn with_counters(mut self, metrics: Arc<DeviceCounters>) -> Self {
        metrics
            .balloon_target_pages
            .set(u64::from(self.control.pages().0));
        metrics
            .balloon_actual_pages
            .set(u64::from(self.actual_pages));
        self.metrics = metrics;
        self
    }

    /// Pages the guest has given back (inflated) and taken again (deflated), bytes
    /// of free memory it reported, and page numbers it sent that were not RAM.
    pub fn counters(&self) -> (u64, u64, u64, u64) {
        (
            self.inflated,
            self.deflated,
            self.reported_bytes,
            self.bad_pages,
        )
    }

    /// The configuration it offers (its initial target, for a restored one, the
    /// saved target).
    pub fn config(&self) -> BalloonConfig {
        self.config
    }

    /// A handle on the target, the driver's count and the statistics, for the host.
    pub fn control(&self) -> Arc<BalloonControl> {
        self.control.clone()
    }

    /// The latest memory statistics.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Returns the whole pages of the `len` bytes at `addr` to the host, if those
    /// bytes are guest RAM. Partial pages at either end are kept: the guest gave
    /// only part of them (and `madvise` would take all of a page, or refuse an
    /// unaligned start).
    fn discard(&mut self, mem: &GuestMemoryMmap, addr: u64, len: u64) -> bool {
        let Ok(host) = mem.get_slice(GuestAddress(addr), len as usize) else {
            return false;
        };
        let start = host.ptr_guard_mut().as_ptr() as usize;
        let first = start.next_multiple_of(PAGE_SIZE as usize);
        let end = (start + host.len()) / PAGE_SIZE as usize * PAGE_SIZE as usize;
        if end <= first {
            return true;
        }
        // SAFETY: `first..end` lies within guest RAM that `mem` maps (inside the
        // slice just checked) and is page-aligned; dropping its pages only makes the
        // next guest access read zeroes, which is what the guest agreed to.
        let dropped =
            unsafe { libc::madvise(first as *mut libc::c_void, end - first, libc::MADV_DONTNEED) }
                == 0;
        if dropped {
            // The pages now read as zeroes: a write the dirty log must see (a guest
            // may give back a page of its own kernel text), marked after the fact
            // so that a reader never hashes the old bytes as the new.
            host.bitmap().mark_dirty(first - start, end - first);
        }
        dropped
    }

    /// Gives back (inflate) or takes again (deflate) the pages whose numbers
    /// `reader` holds, at most [`MAX_PFNS_PER_CHAIN`]: the rest are counted as bad
    /// and not read. Returns how many were RAM.
    fn page_numbers(&mut self, reader: &mut Reader, mem: &GuestMemoryMmap, give_back: bool) -> u64 {
        let total = reader.available_bytes() / 4;
        let mut left = total.min(MAX_PFNS_PER_CHAIN);
        self.bad_pages += (total - left) as u64;
        let mut pages = 0;
        let mut buf = [0u8; 4 * 256];
        while left > 0 {
            let n = left.min(256);
            if reader.read_exact(&mut buf[..4 * n]).is_err() {
                break;
            }
            left -= n;
            for pfn in buf[..4 * n].chunks_exact(4) {
                let pfn = u32::from_le_bytes(pfn.try_into().expect("4 bytes"));
                let addr = u64::from(pfn) * PAGE_SIZE;
                let ok = if give_back {
                    self.discard(mem, addr, PAGE_SIZE)
                } else {
                    mem.get_host_address(GuestAddress(addr)).is_ok()
                };
                if ok {
                    pages += 1;
                } else {
                    self.bad_pages += 1;
                    self.metrics.errors.inc();
                }
            }
        }
        pages
    }

    fn stats_due(&self) -> Option<Duration> {
        self.config.stats_interval?;
        let interval = self.control.stats_interval();
        Some(interval.saturating_sub(self.stats_last.elapsed()))
    }
}

/// The features a balloon with `config` offers.
fn offered(config: &BalloonConfig) -> u64 {
    let mut f = VIRTIO_F_VERSION_1;
    if config.stats_interval.is_some() {
        f |= F_STATS_VQ;
    }
    if config.deflate_on_oom {
        f |= F_DEFLATE_ON_OOM;
    }
    if config.free_page_reporting {
        f |= F_REPORTING;
    }
    if config.free_page_hinting {
        f |= F_FREE_PAGE_HINT;
    }
    f
}

/// The queues, in order, that `features` make (virtio 1.2, 5.5.2): a queue
/// exists only with its feature, and those after it move up.
fn roles(features: u64) -> Vec<Role> {
    let mut roles = vec![Role::Inflate, Role::Deflate];
    if features & F_STATS_VQ != 0 {
        roles.push(Role::Stats);
    }
    if features & F_FREE_PAGE_HINT != 0 {
        roles.push(Role::Hinting);
    }
    if features & F_REPORTING != 0 {
        roles.push(Role::Reporting);
    }
    roles
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        TYPE_BALLOON
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        offered(&self.config)
    }

    fn ack_features(&mut self, acked: u64) {
        self.roles = roles(acked & self.features());
    }

    fn state(&self) -> DeviceState {
        DeviceState::Balloon(self.save())
    }

    fn host_changes_config(&self) -> bool {
        true
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // num_pages, actual, free_page_hint_cmd_id, poison_val (no poisoning).
        let mut config = [0u8; 16];
        let target_pages = self.control.pages().0;
        // The host may have changed the target since: keep the gauge in step.
        self.metrics
            .balloon_target_pages
            .set(u64::from(target_pages));
        config[..4].copy_from_slice(&target_pages.to_le_bytes());
        config[4..8].copy_from_slice(&self.actual_pages.to_le_bytes());
        let cmd = self.control.hint_host_cmd.load(Ordering::Acquire);
        config[8..12].copy_from_slice(&cmd.to_le_bytes());
        copy_config(&config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` (offset 4) is the driver's to write.
        if let (4, Ok(bytes)) = (offset, <[u8; 4]>::try_from(data)) {
            self.actual_pages = u32::from_le_bytes(bytes);
            self.metrics
                .balloon_actual_pages
                .set(u64::from(self.actual_pages));
            self.control
                .actual_pages
                .store(self.actual_pages, Ordering::Release);
        }
    }

    fn reset(&mut self) {
        // The statistics buffer belonged to the old queue: handing it back on the
        // new one would give the driver a buffer it never posted there. A driver
        // starts over with an empty balloon.
        self.stats_held = None;
        self.roles = roles(self.features());
        self.actual_pages = 0;
        self.control.actual_pages.store(0, Ordering::Release);
        self.metrics.balloon_actual_pages.set(0);
    }

    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<QueueOutcome, DeviceBroken> {
        let Some(&role) = self.roles.get(index) else {
            return Ok(QueueOutcome::Done(false));
        };
        let mut used = false;
        if role == Role::Stats {
            // Hand the held buffer back when fresh statistics are due: the guest
            // refills it and makes it available again.
            if let (Some(head), Some(Duration::ZERO)) = (self.stats_held, self.stats_due()) {
                add_used(queue, mem, head, 0)?;
                self.stats_held = None;
                used = true;
            }
        }
        let outcome = serve_chains(queue, mem, Publish::Every8, |chain| {
            let head = chain.head_index();
            match role {
                Role::Inflate | Role::Deflate => {
                    if let Ok(mut reader) = chain.reader(mem) {
                        let pages = self.page_numbers(&mut reader, mem, role == Role::Inflate);
                        if role == Role::Inflate {
                            self.inflated += pages;
                            self.metrics.transfer_out(pages * PAGE_SIZE);
                        } else {
                            self.deflated += pages;
                            self.metrics.transfer_in(pages * PAGE_SIZE);
                        }
                    }
                }
                Role::Stats => {
                    if let Ok(mut reader) = chain.reader(mem) {
                        let mut entry = [0u8; 10];
                        self.stats.clear();
                        while reader.read_exact(&mut entry).is_ok() && self.stats.len() < MAX_STATS
                        {
                            let tag = u16::from_le_bytes([entry[0], entry[1]]);
                            let value = u64::from_le_bytes(entry[2..].try_into().expect("8 bytes"));
                            self.stats.push((tag, value));
                        }
                    }
                    if let Ok(mut shared) = self.control.stats.lock() {
                        shared.clone_from(&self.stats);
                    }
                    self.stats_last = Instant::now();
                    self.metrics.ops_other.inc();
                    // A driver that sends a second buffer gets the first one back.
                    return Ok(Served::Kept {
                        release: self.stats_held.replace(head),
                    });
                }
                Role::Hinting => {
                    // A command id (device-readable, 4 bytes), or hints: free
                    // pages (device-writable) the guest holds until done.
                    for desc in chain.clone() {
                        let (addr, len) = (desc.addr().0, u64::from(desc.len()));
                        if !desc.is_write_only() {
                            let mut cmd = [0u8; 4];
                            if len >= 4 && mem.read_slice(&mut cmd, desc.addr()).is_ok() {
                                self.control.guest_hint_cmd(u32::from_le_bytes(cmd));
                            } else {
                                self.bad_pages += 1;
                                self.metrics.errors.inc();
                            }
                        } else if self.control.hinting_now() {
                            if self.discard(mem, addr, len) {
                                self.metrics.bytes_out.add(len);
                            } else {
                                self.bad_pages += 1;
                                self.metrics.errors.inc();
                            }
                        }
                    }
                }
                Role::Reporting => {
                    self.metrics.ops_out.inc();
                    for desc in chain.clone() {
                        if self.discard(mem, desc.addr().0, u64::from(desc.len())) {
                            self.reported_bytes += u64::from(desc.len());
                            self.metrics.bytes_out.add(u64::from(desc.len()));
                        } else {
                            self.bad_pages += 1;
                            self.metrics.errors.inc();
                        }
                    }
                }
            }
            Ok(Served::Used(0))
        })?;
        let used = match outcome {
            QueueOutcome::Done(more) => used | more,
            QueueOutcome::RetryAfter(wait, more) => {
                return Ok(QueueOutcome::RetryAfter(wait, used | more))
            }
        };
        match (role, self.stats_held.and(self.stats_due())) {
            (Role::Stats, Some(wait)) => Ok(QueueOutcome::RetryAfter(wait, used)),
            _ => Ok(QueueOutcome::Done(used)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::QueueT;
    use vm_memory::Bytes;

    const WRITE: u16 = 2;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    fn queue_with(mem: &GuestMemoryMmap, descs: &[(u64, u32, u16)]) -> Queue {
        let mock = MockSplitQueue::create(mem, GuestAddress(0x10000), 16);
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .map(|&(addr, len, flags)| {
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
            })
            .collect();
        mock.add_desc_chains(&raw, 0).unwrap();
        mock.create_queue().unwrap()
    }

    fn used_idx(q: &Queue, mem: &GuestMemoryMmap) -> u16 {
        q.used_idx(mem, std::sync::atomic::Ordering::Acquire)
            .unwrap()
            .0
    }

    #[test]
    fn inflate_discards_ram_pages_and_counts_bad_ones() {
        let mem = mem();
        mem.write_obj(0xdead_beefu64, GuestAddress(0x40000))
            .unwrap();
        // Two page numbers: 0x40 (RAM) and one far past the end of memory.
        mem.write_obj(0x40u32, GuestAddress(0x30000)).unwrap();
        mem.write_obj(0x00ff_ffffu32, GuestAddress(0x30004))
            .unwrap();
        let mut q = queue_with(&mem, &[(0x30000, 8, 0)]);
        let mut b = Balloon::new(BalloonConfig {
            target_mib: 1,
            ..Default::default()
        });
        let bitmap = mem.iter().next().unwrap().bitmap();
        bitmap.reset();
        assert_eq!(
            b.process_queue(0, &mut q, &mem),
            Ok(QueueOutcome::Done(true))
        );
        assert_eq!(used_idx(&q, &mem), 1);
        assert_eq!(b.counters(), (1, 0, 0, 1));
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(0x40000)).unwrap(),
            0,
            "page discarded"
        );
        // The discarded page changed (it reads as zeroes): the dirty bitmap says
        // so; the page numbers were only read.
        assert!(bitmap.dirty_at(0x40000));
        assert!(!bitmap.dirty_at(0x30000));
    }

    #[test]
    fn config_has_the_target_and_takes_actual() {
        let mut b = Balloon::new(BalloonConfig {
            target_mib: 2,
            ..Default::default()
        });
        let mut data = [0u8; 8];
        b.write_config(4, &7u32.to_le_bytes());
        b.write_config(0, &99u32.to_le_bytes()); // num_pages is the device's
        b.read_config(0, &mut data);
        assert_eq!(data, [0, 2, 0, 0, 7, 0, 0, 0]);
        let mut past = [0xffu8; 4];
        b.read_config(14, &mut past);
        assert_eq!(past, [0, 0, 0xff, 0xff]);
    }

    #[test]
    fn statistics_buffer_is_held_then_returned_when_due() {
        let mem = mem();
        // Two entries: swap_in = 5, free memory = 0x1000.
        let mut stats = Vec::new();
        stats.extend_from_slice(&0u16.to_le_bytes());
        stats.extend_from_slice(&5u64.to_le_bytes());
        stats.extend_from_slice(&4u16.to_le_bytes());
        stats.extend_from_slice(&0x1000u64.to_le_bytes());
        mem.write_slice(&stats, GuestAddress(0x20000)).unwrap();
        let mut q = queue_with(&mem, &[(0x20000, 20, 0)]);
        let interval = Duration::from_millis(30);
        let mut b = Balloon::new(BalloonConfig {
            stats_interval: Some(interval),
            ..Default::default()
        });
        assert_eq!(b.queue_max_sizes().len(), 3);
        assert_ne!(b.features() & F_STATS_VQ, 0);
        match b.process_queue(2, &mut q, &mem) {
            Ok(QueueOutcome::RetryAfter(wait, false)) => assert!(wait <= interval),
            other => panic!("{other:?}"),
        }
        assert_eq!(b.stats(), &vec![(0, 5), (4, 0x1000)]);
        assert_eq!(used_idx(&q, &mem), 0, "held until fresh statistics are due");
        std::thread::sleep(interval);
        assert_eq!(
            b.process_queue(2, &mut q, &mem),
            Ok(QueueOutcome::Done(true))
        );
        assert_eq!(used_idx(&q, &mem), 1);
    }

    #[test]
    fn a_reset_forgets_the_held_statistics_buffer() {
        let mem = mem();
        let mut q = queue_with(&mem, &[(0x20000, 10, 0)]);
        let mut b = Balloon::new(BalloonConfig {
            stats_interval: Some(Duration::from_secs(60)),
            ..Default::default()
        });
        b.process_queue(2, &mut q, &mem).unwrap();
        assert_eq!(b.stats_held, Some(0));
        b.reset();
        assert_eq!(b.stats_held, None);
        match b.state() {
            DeviceState::Balloon(s) => assert_eq!(s.stats_held, None),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn reported_free_pages_are_discarded() {
        let mem = mem();
        mem.write_obj(0x1234u64, GuestAddress(0x50000)).unwrap();
        let mut q = queue_with(&mem, &[(0x50000, 4096, WRITE), (0x4000_0000, 4096, WRITE)]);
        let mut b = Balloon::new(BalloonConfig {
            free_page_reporting: true,
            ..Default::default()
        });
        // Without statistics the reporting queue is the third.
        assert_eq!(
            b.process_queue(2, &mut q, &mem),
            Ok(QueueOutcome::Done(true))
        );
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x50000)).unwrap(), 0);
        assert_eq!(b.counters(), (0, 0, 4096, 1));
    }

    #[test]
    fn queues_are_numbered_by_the_features_the_driver_accepted() {
        let mem = mem();
        mem.write_obj(0x1234u64, GuestAddress(0x50000)).unwrap();
        let mut b = Balloon::new(BalloonConfig {
            stats_interval: Some(Duration::from_secs(1)),
            free_page_reporting: true,
            ..Default::default()
        });
        assert_eq!(
            b.roles,
            [Role::Inflate, Role::Deflate, Role::Stats, Role::Reporting]
        );
        // A driver without statistics: its reporting queue is the third.
        b.ack_features(VIRTIO_F_VERSION_1 | F_REPORTING);
        let mut q = queue_with(&mem, &[(0x50000, 4096, WRITE)]);
        assert_eq!(
            b.process_queue(2, &mut q, &mem),
            Ok(QueueOutcome::Done(true))
        );
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x50000)).unwrap(), 0);
        assert_eq!(b.stats_held, None, "the buffer was not taken as statistics");
        // A fourth queue the driver cannot have is ignored.
        let mut q = queue_with(&mem, &[(0x50000, 4096, WRITE)]);
        assert_eq!(
            b.process_queue(3, &mut q, &mem),
            Ok(QueueOutcome::Done(false))
        );
        // A reset offers every queue again.
        b.reset();
        assert_eq!(b.roles.len(), 4);
    }

    #[test]
    fn hints_are_discarded_only_within_the_hosts_run() {
        let mem = mem();
        let mut b = Balloon::new(BalloonConfig {
            free_page_hinting: true,
            ..Default::default()
        });
        // Inflate, deflate, then hinting: the third queue without statistics.
        assert_eq!(b.roles, [Role::Inflate, Role::Deflate, Role::Hinting]);
        let control = b.control();
        let hint = |b: &mut Balloon, cmd: Option<u32>| {
            mem.write_obj(0x77u64, GuestAddress(0x50000)).unwrap();
            let mut descs = Vec::new();
            if let Some(cmd) = cmd {
                mem.write_obj(cmd, GuestAddress(0x20000)).unwrap();
                descs.push((0x20000, 4, 0));
            } else {
                descs.push((0x50000, 4096, WRITE));
            }
            let mut q = queue_with(&mem, &descs);
            b.process_queue(2, &mut q, &mem).unwrap();
            mem.read_obj::<u64>(GuestAddress(0x50000)).unwrap()
        };
        assert_eq!(hint(&mut b, None), 0x77, "no run: the page is kept");
        control.start_hinting(true);
        let run = control.hinting_status().host_cmd;
        assert!(run >= FIRST_HINT_RUN);
        let mut config = [0u8; 4];
        b.read_config(8, &mut config);
        assert_eq!(
            u32::from_le_bytes(config),
            run,
            "the guest reads the run's id"
        );
        assert_eq!(
            hint(&mut b, Some(run - 1)),
            0x77,
            "a stale id: not this run"
        );
        assert_eq!(hint(&mut b, None), 0x77);
        hint(&mut b, Some(run));
        assert_eq!(hint(&mut b, None), 0, "within the run: discarded");
        hint(&mut b, Some(HINT_CMD_STOP));
        assert_eq!(
            control.hinting_status(),
            HintingStatus {
                host_cmd: HINT_CMD_DONE,
                guest_cmd: Some(HINT_CMD_STOP)
            },
            "acknowledged on stop"
        );
        assert_eq!(hint(&mut b, None), 0x77, "stopped: kept");
        control.start_hinting(false);
        assert_eq!(control.hinting_status().host_cmd, run + 1);
    }
}
