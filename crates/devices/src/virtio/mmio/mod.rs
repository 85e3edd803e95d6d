//! The virtio-mmio transport (virtio 1.1, 4.2): the register file a driver
//! programs, feature negotiation, queue set-up, the device status state machine,
//! and the event-loop subscriber that processes notified queues. Its saved state
//! and restore are in `persist.rs`.

mod page;
mod persist;

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::GuestMemoryMmap;
use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::{
    DeviceBroken, Interrupt, QueueOutcome, VirtioDevice, INT_CONFIG, INT_USED_RING,
    VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1,
};
use crate::bus::BusDevice;

pub use page::RegisterPage;
pub use persist::MmioTransportState;

/// Size of one device's register window.
pub const MMIO_WINDOW: u64 = 0x1000;
/// Offset of the queue notification register (where ioeventfds are matched).
pub const QUEUE_NOTIFY: u64 = 0x50;
/// The interrupt status register (read) and its acknowledgement (write).
pub(crate) const INTERRUPT_STATUS: u64 = 0x60;
const INTERRUPT_ACK: u64 = 0x64;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = u32::from_le_bytes(*b"VGIL");
/// Offset of the device configuration space.
pub(crate) const CONFIG_SPACE: u64 = 0x100;

/// Device status bits (virtio 1.1, 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    pub const FAILED: u32 = 0x80;
}

/// The status bits virtio 1.1 (2.1) defines.
const KNOWN_STATUS: u32 = status::ACKNOWLEDGE
    | status::DRIVER
    | status::DRIVER_OK
    | status::FEATURES_OK
    | status::DEVICE_NEEDS_RESET
    | status::FAILED;

/// A device the transport cannot wrap.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("queue of {max} entries: {source}")]
    Queue {
        max: u16,
        source: virtio_queue::Error,
    },
    #[error("{queues} queues but {eventfds} eventfds")]
    EventFds { queues: usize, eventfds: usize },
}

/// `vring_need_event`: whether moving the used index from `old` to `new`
/// passes `event` (the driver's `used_event`).
fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// One virtio device behind its MMIO registers.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    /// Each queue's used index when the transport last decided whether the
    /// driver wants an interrupt: with event indices, what was used since
    /// then is checked against `used_event` as one batch.
    used_checked: Vec<u16>,
    /// Per queue: whether the device loop's poll turned its notifications
    /// off, and the available index it last saw.
    polled: Vec<(bool, u16)>,
    /// Per queue: its last processing was throttled (or its budget spent) and
    /// the retry timer will process it again; the poll leaves it alone.
    waiting: Vec<bool>,
    /// The host fds [`Self::watched_fds`] last returned.
    watched: Vec<(RawFd, EventSet)>,
    queue_evts: Vec<EventFd>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    config_generation: u32,
    /// The copy of the registers the guest reads, when KVM maps one
    /// ([`RegisterPage`]; the interrupt's status lives in it).
    page: Option<Arc<RegisterPage>>,
}

impl MmioTransport {
    /// Wraps `device`; `queue_evts` are the eventfds KVM signals on notification.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        queue_evts: Vec<EventFd>,
    ) -> Result<Self, TransportError> {
        let queues = device
            .queue_max_sizes()
            .iter()
            .map(|&max| Queue::new(max).map_err(|source| TransportError::Queue { max, source }))
            .collect::<Result<Vec<_>, _>>()?;
        if queues.len() != queue_evts.len() {
            return Err(TransportError::EventFds {
                queues: queues.len(),
                eventfds: queue_evts.len(),
            });
        }
        let page = interrupt.page().cloned();
        let mut transport = Self {
            device,
            mem,
            interrupt,
            used_checked: vec![0; queues.len()],
            polled: vec![(false, 0); queues.len()],
            waiting: vec![false; queues.len()],
            watched: Vec::new(),
            queues,
            queue_evts,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            config_generation: 0,
            page,
        };
        transport.refresh_page();
        Ok(transport)
    }

    /// Brings the register page, when there is one, up to date with every
    /// register but the interrupt status (which [`Interrupt`] keeps there) and
    /// with the configuration space. Called after anything that may change
    /// what a read returns: a driver's write, the transport's own status
    /// changes, a restore. (A device whose configuration the host changes
    /// while the VM runs gets no page: see `VirtioDevice::host_changes_config`.)
    fn refresh_page(&mut self) {
        let Some(page) = self.page.clone() else {
            return;
        };
        for offset in (0..CONFIG_SPACE).step_by(4) {
            if offset != INTERRUPT_STATUS {
                let value = self.read_register(offset);
                page.word(offset).store(value, Ordering::Release);
            }
        }
        let mut config = [0u8; (MMIO_WINDOW - CONFIG_SPACE) as usize];
        self.device.read_config(0, &mut config);
        page.write(CONFIG_SPACE, &config);
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// The device model.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// Queue `index`, as the driver set it up.
    pub(crate) fn queue(&self, index: usize) -> Option<&Queue> {
        self.queues.get(index)
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        self.device.reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.used_checked.fill(0);
        self.polled.fill((false, 0));
        self.waiting.fill(false);
        self.status = 0;
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt.ack(u32::MAX);
    }

    fn needs_reset(&mut self, why: &str) {
        tracing::warn!(
            device_type = self.device.device_type(),
            "virtio device needs reset: {why}"
        );
        self.status |= status::DEVICE_NEEDS_RESET;
        self.refresh_page();
        self.interrupt.signal(INT_CONFIG);
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        if value & !KNOWN_STATUS != 0 {
            tracing::debug!(value, "undefined virtio status bits; dropped");
        }
        let value = value & KNOWN_STATUS;
        // The driver only adds bits (virtio 1.1, 3.1.1); anything else is refused.
        if value & self.status != self.status {
            tracing::debug!(
                old = self.status,
                new = value,
                "virtio status write clears bits; ignored"
            );
            return;
        }
        let mut value = value;
        let added = value & !self.status;
        if added & status::FEATURES_OK != 0 {
            let offered = self.device.features();
            if self.driver_features & !offered != 0
                || self.driver_features & VIRTIO_F_VERSION_1 == 0
            {
                // Leaving FEATURES_OK clear tells the driver the set is refused.
                // Not returning here: a DRIVER_OK in the same write must fail the
                // device, not start it on a refused feature set.
                tracing::debug!(acked = self.driver_features, offered, "feature set refused");
                value &= !status::FEATURES_OK;
            } else {
                self.device.ack_features(self.driver_features);
                let event_idx = self.driver_features & VIRTIO_F_RING_EVENT_IDX != 0;
                for q in &mut self.queues {
                    q.set_event_idx(event_idx);
                }
            }
        }
        if added & status::DRIVER_OK != 0 {
            if self.status & status::FEATURES_OK == 0 {
                self.status = value | status::FAILED;
                return;
            }
            self.status = value;
            if let Some(i) = self
                .queues
                .iter()
                .position(|q| q.ready() && !q.is_valid(&self.mem))
            {
                self.needs_reset(&format!(
                    "queue {i} has addresses outside guest memory or a bad size"
                ));
            }
            return;
        }
        self.status = value;
    }

    fn driver_ok(&self) -> bool {
        self.status & (status::DRIVER_OK | status::DEVICE_NEEDS_RESET | status::FAILED)
            == status::DRIVER_OK
    }

    /// Processes queue `index` after a notification. Returns how long to wait
    /// before trying again when the device's rate limiter throttled it.
    pub fn process_queue(&mut self, index: usize) -> Option<Duration> {
        if !self.driver_ok() || !self.queues.get(index).is_some_and(|q| q.ready()) {
            return None;
        }
        let result = self
            .device
            .process_queues(index, &mut self.queues, &self.mem);
        let wait = self.outcome(Some(index), result);
        self.waiting[index] = wait.is_some();
        wait
    }

    /// One look of the device event loop's poll ([`super::poll`]): every ready
    /// queue the driver added entries to since the last look is processed, as
    /// if notified; the first look asks the driver not to notify. A queue
    /// waiting for its retry timer (throttled) is left to it. Whether any
    /// queue had new entries.
    pub fn poll(&mut self) -> bool {
        if !self.driver_ok() {
            return false;
        }
        let mut found = false;
        for i in 0..self.queues.len() {
            let queue = &mut self.queues[i];
            if !queue.ready() || self.waiting[i] {
                continue;
            }
            if !self.polled[i].0 {
                if let Err(DeviceBroken(why)) = super::poll::quiet(queue, &self.mem) {
                    self.needs_reset(&why);
                    return found;
                }
                self.polled[i] = (true, queue.next_avail());
            }
            let Ok(avail) = queue.avail_idx(&self.mem, Ordering::Acquire) else {
                continue;
            };
            if avail.0 != self.polled[i].1 {
                self.polled[i].1 = avail.0;
                found = true;
                self.process_polled(i);
            }
        }
        found
    }

    /// The poll ends: notifications back on for every queue it turned off, and
    /// a queue the driver added to meanwhile processed (unless it waits for
    /// its retry timer, which processes it).
    pub fn end_poll(&mut self) {
        for i in 0..self.queues.len() {
            if !std::mem::take(&mut self.polled[i].0) || !self.driver_ok() {
                continue;
            }
            match self.queues[i].enable_notification(&self.mem) {
                Ok(false) => {}
                Ok(true) if self.waiting[i] => {}
                Ok(true) => self.process_polled(i),
                Err(e) => self.needs_reset(&format!("cannot write avail_event: {e:?}")),
            }
        }
    }

    /// Processes queue `i` for the poll. What only the event loop's subscriber
    /// can do (arm the retry timer of a throttled device, watch a host fd the
    /// device now wants) is left to it: the queue's eventfd is signalled, so
    /// that the subscriber processes the queue once more and does it.
    fn process_polled(&mut self, i: usize) {
        let wait = self.process_queue(i);
        if wait.is_some() || self.watched_fds_changed() {
            if let Err(e) = self.queue_evts[i].write(1) {
                tracing::warn!("cannot hand a polled virtio queue to the event loop: {e}");
            }
        }
    }

    /// Processes a ready host fd of the device (see [`VirtioDevice::watched_fds`]).
    pub fn process_fd(&mut self, fd: RawFd, events: EventSet) -> Option<Duration> {
        if !self.driver_ok() {
            return None;
        }
        let result = self
            .device
            .process_fd(fd, events, &mut self.queues, &self.mem);
        let index = self.device.fd_queue(fd);
        self.outcome(index, result)
    }

    /// Completes what the device has in flight on the host (see
    /// [`VirtioDevice::quiesce`]), interrupting the driver as for any completion:
    /// call it before [`Self::state`] when taking a snapshot.
    pub fn quiesce(&mut self) {
        if !self.driver_ok() {
            return;
        }
        let result = self.device.quiesce(&mut self.queues, &self.mem);
        self.outcome(None, result);
    }

    /// The host fds the device wants watched: none until the driver is ready.
    /// The event loop's subscriber watches what this returned last.
    pub fn watched_fds(&mut self) -> Vec<(RawFd, EventSet)> {
        let fds = self.wanted_fds();
        self.watched.clone_from(&fds);
        fds
    }

    fn wanted_fds(&mut self) -> Vec<(RawFd, EventSet)> {
        let fds = self.device.watched_fds();
        if self.driver_ok() {
            fds
        } else {
            Vec::new()
        }
    }

    /// Whether the device wants other host fds watched than the subscriber watches.
    fn watched_fds_changed(&mut self) -> bool {
        self.wanted_fds() != self.watched
    }

    /// What processing queue `index` (`None`: a host fd, any queue) came to.
    fn outcome(
        &mut self,
        index: Option<usize>,
        result: Result<QueueOutcome, DeviceBroken>,
    ) -> Option<Duration> {
        let (used_any, wait) = match result {
            Ok(QueueOutcome::Done(used_any)) => (used_any, None),
            Ok(QueueOutcome::RetryAfter(wait, used_any)) => (used_any, Some(wait)),
            Err(DeviceBroken(why)) => {
                self.needs_reset(&why);
                return None;
            }
        };
        if used_any {
            match index {
                // With event indices every queue is asked (one without new
                // entries needs none): a host fd's completions may be on any,
                // and a queue's processing may use another's buffers (a net
                // device's MMDS answers its transmissions on receive).
                _ if self.queues.iter().any(|q| q.event_idx_enabled()) => {
                    for i in 0..self.queues.len() {
                        if self.queue_needs_interrupt(i) {
                            self.interrupt.signal_queue(i);
                            self.device.interrupted();
                        }
                    }
                }
                Some(i) => {
                    self.interrupt.signal_queue(i);
                    self.device.interrupted();
                }
                None => {
                    self.interrupt.signal(INT_USED_RING);
                    self.device.interrupted();
                }
            }
        }
        wait
    }

    /// Whether the driver wants an interrupt for what queue `index` just used:
    /// with event indices, only when the used index passed its `used_event`
    /// (once per batch); always without them.
    fn queue_needs_interrupt(&mut self, index: usize) -> bool {
        let Some(queue) = self.queues.get_mut(index) else {
            return false;
        };
        if !queue.event_idx_enabled() {
            return true;
        }
        // Not `Queue::needs_notification`, which counts `add_used` calls: a
        // device publishes several entries with one (`add_used_together`).
        let used = queue.next_used();
        let old = std::mem::replace(&mut self.used_checked[index], used);
        // The used entries written before `used_event` is read.
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let at = queue.avail_ring() + 4 + 2 * u64::from(queue.size());
        // An unreadable used_event: interrupt, as without event indices.
        self.mem
            .load::<u16>(GuestAddress(at), std::sync::atomic::Ordering::Acquire)
            .map_or(true, |event| need_event(u16::from_le(event), used, old))
    }

    /// Writes register `offset` (also the virtio-pci common configuration's way in).
    pub(crate) fn write_register(&mut self, offset: u64, v: u32) {
        let queue_configurable = self.status & status::DRIVER_OK == 0;
        match offset {
            0x14 => self.device_features_sel = v,
            // The negotiated set is fixed once the device accepted it.
            0x20 if self.status & status::FEATURES_OK != 0 => {
                tracing::debug!(
                    value = v,
                    "driver features written after FEATURES_OK; ignored"
                );
            }
            0x20 => match self.driver_features_sel {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
                1 => {
                    self.driver_features =
                        (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                }
                _ => {}
            },
            0x24 => self.driver_features_sel = v,
            0x30 => self.queue_sel = v,
            0x38 | 0x44 | 0x80 | 0x84 | 0x90 | 0x94 | 0xa0 | 0xa4 if !queue_configurable => {
                tracing::debug!(offset, "queue register written after DRIVER_OK; ignored");
            }
            0x38 => {
                if let Some(q) = self.selected_queue() {
                    q.set_size(v as u16);
                }
            }
            0x44 => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(v == 1);
                }
            }
            0x80 => self
                .selected_queue()
                .into_iter()
                .for_each(|q| q.set_desc_table_address(Some(v), None)),
            0x84 => self
                .selected_queue()
                .into_iter()
                .for_each(|q| q.set_desc_table_address(None, Some(v))),
            0x90 => self
                .selected_queue()
                .into_iter()
                .for_each(|q| q.set_avail_ring_address(Some(v), None)),
            0x94 => self
                .selected_queue()
                .into_iter()
                .for_each(|q| q.set_avail_ring_address(None, Some(v))),
            0xa0 => self
                .selected_queue()
                .into_iter()
                .for_each(|q| q.set_used_ring_address(Some(v), None)),
            0xa4 => self
                .selected_queue()
                .into_iter()
                .for_each(|q| q.set_used_ring_address(None, Some(v))),
            QUEUE_NOTIFY => {
                // Normally caught by an ioeventfd in KVM; pass it on the same way.
                if let Some(evt) = self.queue_evts.get(v as usize) {
                    let _ = evt.write(1);
                }
            }
            INTERRUPT_ACK => self.interrupt.ack(v),
            0x70 => self.set_status(v),
            _ => tracing::debug!(
                offset,
                value = v,
                "write to read-only or unknown virtio-mmio register"
            ),
        }
    }

    /// Reads register `offset` (also the virtio-pci common configuration's way in).
    pub(crate) fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            0x00 => MAGIC,
            0x04 => VERSION,
            0x08 => self.device.device_type(),
            0x0c => VENDOR_ID,
            0x10 => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            0x34 => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            0x44 => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            INTERRUPT_STATUS => self.interrupt.status(),
            0x70 => self.status,
            0xfc => self.config_generation,
            _ => 0,
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            data.fill(0);
            self.device.read_config(offset - CONFIG_SPACE, data);
        } else if let Ok(bytes) = <&mut [u8; 4]>::try_from(&mut *data) {
            *bytes = self.read_register(offset).to_le_bytes();
        } else {
            tracing::debug!(
                offset,
                len = data.len(),
                "virtio-mmio register read not 32 bits wide"
            );
            data.fill(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            self.device.write_config(offset - CONFIG_SPACE, data);
            self.config_generation = self.config_generation.wrapping_add(1);
        } else if let Ok(bytes) = <[u8; 4]>::try_from(data) {
            self.write_register(offset, u32::from_le_bytes(bytes));
        } else {
            tracing::debug!(
                offset,
                len = data.len(),
                "virtio-mmio register write not 32 bits wide; ignored"
            );
        }
        self.refresh_page();
    }
}

/// A transport as the guest's MMIO bus sees it. The interrupt status is read and
/// acknowledged without the transport's lock, which the device thread holds
/// while it processes a queue: a driver's interrupt handler would otherwise wait
/// for a whole batch of frames or requests, during which it adds no buffers
/// (virtio-pci's ISR is read the same way). Every other register goes through
/// the lock.
pub struct MmioBusDevice {
    transport: Arc<Mutex<MmioTransport>>,
    interrupt: Arc<Interrupt>,
}

impl MmioBusDevice {
    pub fn new(transport: Arc<Mutex<MmioTransport>>) -> Self {
        let interrupt = transport
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .interrupt
            .clone();
        Self {
            transport,
            interrupt,
        }
    }

    fn transport(&self) -> std::sync::MutexGuard<'_, MmioTransport> {
        self.transport.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl BusDevice for MmioBusDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match <&mut [u8; 4]>::try_from(&mut *data) {
            Ok(bytes) if offset == INTERRUPT_STATUS => {
                *bytes = self.interrupt.status().to_le_bytes();
            }
            _ => self.transport().read(offset, data),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match <[u8; 4]>::try_from(data) {
            Ok(bytes) if offset == INTERRUPT_ACK => self.interrupt.ack(u32::from_le_bytes(bytes)),
            _ => self.transport().write(offset, data),
        }
    }
}

/// Device event-loop subscriber for one transport: its queue eventfds, the
/// timer that resumes a throttled device, and the host fds the device asks for.
pub struct QueueEvents {
    transport: Arc<Mutex<MmioTransport>>,
    queue_evts: Vec<EventFd>,
    timer: TimerFd,
    /// Device fds registered with the event loop, and their events.
    watched: Vec<(RawFd, EventSet)>,
}

impl QueueEvents {
    /// Watches `queue_evts` (clones of the ones given to the transport).
    pub fn new(
        transport: Arc<Mutex<MmioTransport>>,
        queue_evts: Vec<EventFd>,
    ) -> std::io::Result<Self> {
        Ok(Self {
            transport,
            queue_evts,
            timer: TimerFd::new().map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?,
            watched: Vec::new(),
        })
    }

    fn run(&mut self, ops: &mut EventOps, work: Work) {
        let mut transport = self.transport.lock().unwrap_or_else(|e| e.into_inner());
        let wait = match work {
            Work::Queues(range) => range.filter_map(|i| transport.process_queue(i)).min(),
            Work::Notified(i, count) => {
                transport.device().notified(count);
                transport.process_queue(i)
            }
            Work::Fd(fd, events) => transport.process_fd(fd, events),
        };
        let wanted = transport.watched_fds();
        drop(transport);
        self.sync(ops, wanted);
        if let Some(wait) = wait {
            // A zero duration would disarm the timer.
            let wait = wait.max(Duration::from_micros(100));
            if let Err(e) = self.timer.reset(wait, None) {
                tracing::error!("cannot arm the rate-limiter timer: {e}");
            }
        }
    }

    /// Makes the event loop watch exactly `wanted` among the device's fds.
    fn sync(&mut self, ops: &mut EventOps, wanted: Vec<(RawFd, EventSet)>) {
        for &(fd, set) in &self.watched {
            if !wanted.iter().any(|&(w, _)| w == fd) {
                if let Err(e) = ops.remove(Events::new_raw(fd, set)) {
                    tracing::warn!(fd, "cannot stop watching a device fd: {e:?}");
                }
            }
        }
        for &(fd, set) in &wanted {
            let result = match self.watched.iter().find(|&&(w, _)| w == fd) {
                Some(&(_, old)) if old == set => Ok(()),
                Some(_) => ops.modify(Events::new_raw(fd, set)),
                None => ops.add(Events::new_raw(fd, set)),
            };
            if let Err(e) = result {
                tracing::warn!(fd, "cannot watch a device fd: {e:?}");
            }
        }
        self.watched = wanted;
    }
}

enum Work {
    Queues(std::ops::Range<usize>),
    /// Queue `.0`'s eventfd, read: `.1` notifications.
    Notified(usize, u64),
    Fd(RawFd, EventSet),
}

impl MutEventSubscriber for QueueEvents {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.timer.as_raw_fd() {
            let _ = self.timer.wait();
            let n = self.queue_evts.len();
            self.run(ops, Work::Queues(0..n));
        } else if let Some(i) = self.queue_evts.iter().position(|e| e.as_raw_fd() == fd) {
            let count = self.queue_evts[i].read().unwrap_or(0);
            self.run(ops, Work::Notified(i, count));
        } else if self.watched.iter().any(|&(w, _)| w == fd) {
            self.run(ops, Work::Fd(fd, events.event_set()));
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        for evt in &self.queue_evts {
            if let Err(e) = ops.add(Events::new(evt, EventSet::IN)) {
                tracing::error!("cannot watch a virtio queue: {e:?}");
            }
        }
        if let Err(e) = ops.add(Events::new(&self.timer, EventSet::IN)) {
            tracing::error!("cannot watch the rate-limiter timer: {e:?}");
        }
    }
}
