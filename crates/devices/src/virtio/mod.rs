//! Virtio devices over the MMIO or the PCI transport (virtio 1.x).
//!
//! A device implements [`VirtioDevice`]: its type, features, config space and
//! what to do with a queue's available descriptors. [`mmio::MmioTransport`] owns
//! the device, the queues and the register file the guest programs;
//! [`pci::VirtioPci`] is a PCI function whose BAR maps the virtio-pci structures
//! onto that same register file, with MSI-X vectors for its interrupts;
//! [`mmio::QueueEvents`] runs on the device event loop and is woken by the
//! ioeventfds KVM signals when the guest notifies a queue, and while the
//! device loop polls ([`poll`]) by the rings themselves.
//!
//! Each device has its folder (`block/`, `net/`, `vsock/`, `balloon/`, `rng/`):
//! the device model in `device.rs`, its wire formats beside it, and in
//! `persist.rs` its saved state and its restore
//! ([`Persist`](crate::persist::Persist),
//! [`VirtioDeviceState`](persist::VirtioDeviceState)). The transport knows
//! devices only through those traits; [`persist::DeviceState`] is the one place
//! that lists the kinds.

pub mod balloon;
pub mod block;
pub(crate) mod iov;
pub mod mmio;
pub mod net;
pub mod pci;
pub mod persist;
pub mod poll;
pub mod rng;
pub mod vsock;

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use crate::GuestMemoryMmap;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::bitmap::{AtomicBitmap, BS};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

/// virtio-queue's reader of a chain's device-readable buffers over [`GuestMemoryMmap`].
pub(crate) type Reader<'a> = virtio_queue::Reader<'a, BS<'a, AtomicBitmap>>;
/// virtio-queue's writer into a chain's device-writable buffers over
/// [`GuestMemoryMmap`]: what it writes is marked in the memory's dirty bitmap.
pub(crate) type Writer<'a> = virtio_queue::Writer<'a, BS<'a, AtomicBitmap>>;

/// `VIRTIO_F_VERSION_1`: the device is a virtio 1.x device.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
/// `VIRTIO_F_RING_INDIRECT_DESC` (virtio 1.1, 2.6.5.3): a descriptor may point
/// at a table of descriptors (virtio-queue's chains follow it, checking it).
pub const VIRTIO_F_RING_INDIRECT_DESC: u64 = 1 << 28;
/// `VIRTIO_F_RING_EVENT_IDX` (virtio 1.1, 2.6.7, 2.6.10): each side writes the
/// ring index at which it next wants to hear from the other (`used_event`,
/// `avail_event`), so that notifications and interrupts come once per batch.
pub const VIRTIO_F_RING_EVENT_IDX: u64 = 1 << 29;

/// Device types (virtio 1.1, 5).
pub const TYPE_NET: u32 = 1;
/// Block device.
pub const TYPE_BLOCK: u32 = 2;
/// Entropy source.
pub const TYPE_RNG: u32 = 4;
/// Socket device (vsock).
pub const TYPE_VSOCK: u32 = 19;

/// Interrupt status bit: the device used buffers.
pub const INT_USED_RING: u32 = 1;
/// Interrupt status bit: the configuration changed (or the device needs a reset).
pub const INT_CONFIG: u32 = 2;

/// How a virtio device interrupts the guest: an I/O APIC line (virtio-mmio) or
/// MSI-X vectors (virtio-pci), and its interrupt status register (ISR).
pub struct Interrupt {
    status: Status,
    line: Line,
}

/// Where the interrupt status register is kept.
enum Status {
    Own(AtomicU32),
    /// In the transport's register page, where the guest reads it without an exit.
    Page(Arc<mmio::RegisterPage>),
}

enum Line {
    /// One irqfd for every cause.
    Pin(EventFd),
    /// A vector for the configuration and one per queue, as the driver chose.
    Msix(Arc<Mutex<pci::Msix>>),
}

impl std::fmt::Debug for Interrupt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Interrupt")
            .field("status", &self.status())
            .finish_non_exhaustive()
    }
}

impl Interrupt {
    /// An interrupt raised by writing `irq` (an irqfd).
    pub fn new(irq: EventFd) -> Self {
        Self {
            status: Status::Own(AtomicU32::new(0)),
            line: Line::Pin(irq),
        }
    }

    /// As [`Self::new`], the status kept in `page` (a virtio-mmio transport's
    /// register page, which the transport then keeps current too).
    pub fn in_page(irq: EventFd, page: Arc<mmio::RegisterPage>) -> Self {
        page.word(mmio::INTERRUPT_STATUS).store(0, Ordering::SeqCst);
        Self {
            status: Status::Page(page),
            line: Line::Pin(irq),
        }
    }

    /// The register page the status lives in, if it does.
    pub(crate) fn page(&self) -> Option<&Arc<mmio::RegisterPage>> {
        match &self.status {
            Status::Own(_) => None,
            Status::Page(page) => Some(page),
        }
    }

    fn word(&self) -> &AtomicU32 {
        match &self.status {
            Status::Own(word) => word,
            Status::Page(page) => page.word(mmio::INTERRUPT_STATUS),
        }
    }

    /// An interrupt raised through the MSI-X vectors of a virtio-pci function.
    pub fn msix(msix: Arc<Mutex<pci::Msix>>) -> Self {
        Self {
            status: Status::Own(AtomicU32::new(0)),
            line: Line::Msix(msix),
        }
    }

    /// Sets `bits` in the interrupt status and raises the line (with MSI-X: the
    /// configuration vector for [`INT_CONFIG`], every queue's for [`INT_USED_RING`]).
    pub fn signal(&self, bits: u32) {
        self.raise(bits, None);
    }

    /// Queue `index` used buffers: with MSI-X only its vector fires.
    pub fn signal_queue(&self, index: usize) {
        self.raise(INT_USED_RING, Some(index));
    }

    fn raise(&self, bits: u32, queue: Option<usize>) {
        self.word().fetch_or(bits, Ordering::SeqCst);
        match &self.line {
            Line::Pin(irq) => {
                if let Err(e) = irq.write(1) {
                    tracing::warn!("cannot raise a virtio interrupt: {e}");
                }
            }
            Line::Msix(msix) => msix
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .signal(bits, queue),
        }
    }

    /// The interrupt status register.
    pub fn status(&self) -> u32 {
        self.word().load(Ordering::SeqCst)
    }

    /// The status a snapshot saved.
    pub(crate) fn restore_status(&self, bits: u32) {
        self.word().store(bits, Ordering::SeqCst);
    }

    /// The guest acknowledges `bits`.
    pub fn ack(&self, bits: u32) {
        self.word().fetch_and(!bits, Ordering::SeqCst);
    }
}

/// What processing a queue did.
#[derive(Debug, PartialEq, Eq)]
pub enum QueueOutcome {
    /// Nothing to report, or buffers used (`true`: raise the used-ring interrupt).
    Done(bool),
    /// Processing stopped (the rate limiter) or the device wants to be called
    /// again (to ask for fresh statistics, say) after this long; the flag is as
    /// for `Done`.
    RetryAfter(std::time::Duration, bool),
}

/// A driver broke the virtio contract so that the device cannot go on (for
/// example a corrupt ring): the transport sets `DEVICE_NEEDS_RESET`.
#[derive(Debug, PartialEq, Eq)]
pub struct DeviceBroken(pub String);

/// A virtio device model.
pub trait VirtioDevice: Send {
    /// Virtio device type.
    fn device_type(&self) -> u32;
    /// Maximum size of each queue (their number is the length).
    fn queue_max_sizes(&self) -> &[u16];
    /// Features the device offers, `VIRTIO_F_VERSION_1` included.
    fn features(&self) -> u64;
    /// Reads the device configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Whether the host changes the configuration space while the VM runs (a
    /// balloon's target): the transport then keeps no register page for the
    /// guest to read (see [`mmio::RegisterPage`]), so that every configuration
    /// read reaches [`Self::read_config`].
    fn host_changes_config(&self) -> bool {
        false
    }
    /// Writes the device configuration space (most devices ignore it).
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        tracing::debug!(offset, len = data.len(), "ignored virtio config write");
    }
    /// Processes what the driver made available on `queue` (index `index`).
    fn process_queue(
        &mut self,
        index: usize,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<QueueOutcome, DeviceBroken>;
    /// Processes queue `index` after a notification, with every queue at hand:
    /// devices whose queues depend on one another (a request on one queue answered
    /// on another) override this; the others implement [`Self::process_queue`].
    /// `queues[index]` is ready; the device checks any other queue it touches.
    fn process_queues(
        &mut self,
        index: usize,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
    ) -> Result<QueueOutcome, DeviceBroken> {
        match queues.get_mut(index) {
            Some(queue) => self.process_queue(index, queue, mem),
            None => Ok(QueueOutcome::Done(false)),
        }
    }
    /// Host file descriptors (a tap, sockets) the device wants watched on the
    /// device event loop now, with the events of interest. Called after each
    /// event the device handled; the event loop adds, changes and removes its
    /// registrations to match. An fd the device closes must first be left out of
    /// one answer (keep it open until the next call), so that its registration is
    /// removed while it is still open.
    fn watched_fds(&mut self) -> Vec<(RawFd, EventSet)> {
        Vec::new()
    }
    /// The queue whose buffers the events on watched `fd` give back, when they
    /// are one queue's only (an asynchronous disk's ring per queue): with MSI-X
    /// only that queue's vector fires. `None`: any queue's.
    fn fd_queue(&self, fd: RawFd) -> Option<usize> {
        let _ = fd;
        None
    }
    /// One of [`Self::watched_fds`] is ready (only called once the driver set
    /// DRIVER_OK).
    fn process_fd(
        &mut self,
        fd: RawFd,
        events: EventSet,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
    ) -> Result<QueueOutcome, DeviceBroken> {
        let _ = (fd, events, queues, mem);
        Ok(QueueOutcome::Done(false))
    }
    /// The device is reset: forget any in-flight state.
    fn reset(&mut self) {}
    /// Completes everything in flight on the host (an asynchronous disk's
    /// requests), its chains given back: before a snapshot captures the queues.
    fn quiesce(
        &mut self,
        queues: &mut [Queue],
        mem: &GuestMemoryMmap,
    ) -> Result<QueueOutcome, DeviceBroken> {
        let _ = (queues, mem);
        Ok(QueueOutcome::Done(false))
    }
    /// The transport raised the used-buffer interrupt after this device's
    /// processing (for its metrics; with event indices not every batch does).
    fn interrupted(&self) {}
    /// The device event loop took `count` notifications of its queues (for its
    /// metrics).
    fn notified(&self, count: u64) {
        let _ = count;
    }

    /// The features the driver accepted: told when the transport takes them
    /// (FEATURES_OK) and when a device is restored. A device whose queues depend
    /// on them (the balloon's) numbers its queues here.
    fn ack_features(&mut self, _acked: u64) {}
    /// The device's state, for snapshot and migration: its
    /// [`Persist::save`](crate::persist::Persist::save), by kind.
    fn state(&self) -> persist::DeviceState;
}

/// Copies the part of a device's config space `config` that a read of
/// `data.len()` bytes at `offset` covers; bytes past its end stay as they are.
pub(crate) fn copy_config(config: &[u8], offset: u64, data: &mut [u8]) {
    let start = usize::try_from(offset)
        .unwrap_or(usize::MAX)
        .min(config.len());
    let end = start.saturating_add(data.len()).min(config.len());
    data[..end - start].copy_from_slice(&config[start..end]);
}

/// How many more chains a device may take from one queue in this call. A device
/// stops there and asks to be called again, so a guest that keeps refilling a queue
/// cannot hold the device event loop, which every device of the VM shares.
pub(crate) struct Budget<'m> {
    left: u16,
    /// The available index as [`pop_chain`] last read it: until the chains up
    /// to it are taken, it is not read and checked again for each one
    /// (virtio-queue's pop reads it once more itself, right after, from the
    /// same line).
    avail: Option<std::num::Wrapping<u16>>,
    /// The available ring and the descriptor table as host memory, looked up
    /// once per pass by [`pop_single`] (`None` inside: one of them is not one
    /// piece of it).
    rings: Option<Option<(RingSlice<'m>, RingSlice<'m>)>>,
}

/// A ring of a queue as host memory.
type RingSlice<'m> = vm_memory::VolatileSlice<'m, BS<'m, AtomicBitmap>>;

impl<'m> Budget<'m> {
    /// One queue's worth.
    pub(crate) fn of(queue: &Queue) -> Self {
        Self {
            left: queue.size().max(1),
            avail: None,
            rings: None,
        }
    }

    /// Chains the driver made available that the pass has not taken, as far as
    /// the available index was last read.
    pub(crate) fn waiting(&self, queue: &Queue) -> u16 {
        self.avail
            .map_or(0, |avail| avail.0.wrapping_sub(queue.next_avail()))
            .min(queue.size())
    }

    /// Puts the chain [`pop_single`] took last back on `queue` for
    /// [`pop_chain`] to take at once, with its share: one buffer is one
    /// buffer's worth of the pass, whichever path takes it.
    pub(crate) fn put_back_single(&mut self, queue: &mut Queue) {
        queue.go_to_previous_position();
        self.left += 1;
    }

    /// The available ring and the descriptor table of `queue`, when each lies
    /// in one memory region.
    fn rings(
        &mut self,
        queue: &Queue,
        mem: &'m GuestMemoryMmap,
    ) -> Option<(RingSlice<'m>, RingSlice<'m>)> {
        *self.rings.get_or_insert_with(|| {
            use vm_memory::GuestMemoryBackend;
            let size = usize::from(queue.size());
            let avail = mem.get_slice(GuestAddress(queue.avail_ring()), 4 + 2 * size);
            let table = mem.get_slice(GuestAddress(queue.desc_table()), 16 * size);
            avail.ok().zip(table.ok())
        })
    }
}

/// What [`pop_chain`] found.
pub(crate) enum Next<'a> {
    /// A chain to serve.
    Chain(DescriptorChain<&'a GuestMemoryMmap>),
    /// Nothing is available.
    Empty,
    /// More is available but the budget is spent: return [`YIELD`].
    Later,
}

/// What a device returns when its budget ran out: call again at once (after the
/// event loop has served everything else).
pub(crate) const YIELD: std::time::Duration = std::time::Duration::ZERO;

/// The next chain the driver made available, after checking that the ring is sane.
pub(crate) fn pop_chain<'a>(
    queue: &mut Queue,
    mem: &'a GuestMemoryMmap,
    budget: &mut Budget<'a>,
) -> Result<Next<'a>, DeviceBroken> {
    let next = std::num::Wrapping(queue.next_avail());
    let known = budget.avail.map_or(0, |avail| (avail - next).0);
    if known == 0 || known > queue.size() {
        let pending = pending(queue, mem)?;
        budget.avail = Some(next + std::num::Wrapping(pending));
        if pending == 0 {
            return Ok(Next::Empty);
        }
    }
    if budget.left == 0 {
        return Ok(Next::Later);
    }
    budget.left -= 1;
    Ok(queue
        .pop_descriptor_chain(mem)
        .map_or(Next::Empty, Next::Chain))
}

/// A chain of one descriptor ([`pop_single`]).
pub(crate) struct Single {
    pub(crate) head: u16,
    pub(crate) addr: GuestAddress,
    pub(crate) len: u32,
    pub(crate) write_only: bool,
}

/// The next chain the driver made available when it is one descriptor (no
/// next, not indirect), taken from the queue and read through host views of
/// the available ring and the descriptor table that [`Budget`] keeps for the
/// pass: vm-memory's access per field cost as much as the tap's read on the
/// receive path (BENCHMARKS.md, "One descriptor read once"). `None` leaves the
/// queue as it was, the chain (if any) for [`pop_chain`]; so does an index
/// not yet read or a budget spent.
pub(crate) fn pop_single<'a>(
    queue: &mut Queue,
    mem: &'a GuestMemoryMmap,
    budget: &mut Budget<'a>,
) -> Option<Single> {
    let next = queue.next_avail();
    let known = budget.avail.map_or(0, |avail| avail.0.wrapping_sub(next));
    if known == 0 || known > queue.size() || budget.left == 0 {
        return None;
    }
    let (avail, table) = budget.rings(queue, mem)?;
    let slot = usize::from(next % queue.size());
    let head = u16::from_le(avail.load::<u16>(4 + 2 * slot, Ordering::Acquire).ok()?);
    if head >= queue.size() {
        return None;
    }
    let desc: virtio_queue::desc::split::Descriptor =
        table.read_obj(16 * usize::from(head)).ok()?;
    if desc.has_next() || desc.refers_to_indirect_table() {
        return None;
    }
    queue.set_next_avail(next.wrapping_add(1));
    budget.left -= 1;
    Some(Single {
        head,
        addr: desc.addr(),
        len: desc.len(),
        write_only: desc.is_write_only(),
    })
}

/// What a device did with one chain handed to it by [`serve_chains`].
pub(crate) enum Served {
    /// Give the chain back to the driver, this many bytes written into it.
    Used(u32),
    /// The device keeps the chain for now and gives it back itself later;
    /// `release` is a chain it held until now, given back empty.
    Kept { release: Option<u16> },
    /// The rate limiter says wait this long: the chain goes back to the queue and
    /// processing stops until then.
    Wait(std::time::Duration),
}

/// The most used entries [`serve_chains`] writes before it publishes them (it
/// also publishes whenever the queue runs empty, and as [`Publish`] says). A
/// driver polling the ring then takes several per look, and the exits and
/// interrupts that cost it go down.
const USED_BATCH: usize = 32;
/// How long a used entry waits at most for others to be published with
/// ([`Publish::ByAge`]).
const USED_AGE: std::time::Duration = std::time::Duration::from_micros(30);

/// When [`serve_chains`] publishes the entries it used, besides when the
/// queue runs empty (BENCHMARKS.md, "Used entries published by age").
#[derive(Clone, Copy, Default)]
pub(crate) enum Publish {
    /// Every 8: requests served at once (a frame sent, random bytes), which
    /// a driver waits for idle when more are held.
    #[default]
    Every8,
    /// Once the oldest has waited [`USED_AGE`], or [`USED_BATCH`] wait:
    /// requests whose time varies with their size (a disk's), fast ones going
    /// back in bigger batches and slow ones sooner.
    ByAge,
}

/// What [`serve_chains_with`] hands a queue's chains to: a closure taking one
/// chain, or a device that holds chains during the pass and gives them back
/// together ([`Server::release`]).
pub(crate) trait Server<'a> {
    /// Serves one chain; at least `waiting` more are available after it.
    fn serve(
        &mut self,
        chain: DescriptorChain<&'a GuestMemoryMmap>,
        waiting: u16,
    ) -> Result<Served, DeviceBroken>;

    /// Gives back into `batch` the chains held (`Served::Kept`) that are done
    /// by now: called after each chain served (before what was said of that
    /// chain takes effect), and with `idle` when the queue ran empty or the
    /// pass ends, when nothing may stay held.
    fn release(
        &mut self,
        _queue: &mut Queue,
        _mem: &GuestMemoryMmap,
        _batch: &mut UsedBatch,
        _idle: bool,
    ) -> Result<(), DeviceBroken> {
        Ok(())
    }
}

impl<'a, F> Server<'a> for F
where
    F: FnMut(DescriptorChain<&'a GuestMemoryMmap>) -> Result<Served, DeviceBroken>,
{
    fn serve(
        &mut self,
        chain: DescriptorChain<&'a GuestMemoryMmap>,
        _waiting: u16,
    ) -> Result<Served, DeviceBroken> {
        self(chain)
    }
}

/// [`serve_chains_with`] a closure that serves one chain at a time.
pub(crate) fn serve_chains<'a>(
    queue: &mut Queue,
    mem: &'a GuestMemoryMmap,
    publish: Publish,
    serve: impl FnMut(DescriptorChain<&'a GuestMemoryMmap>) -> Result<Served, DeviceBroken>,
) -> Result<QueueOutcome, DeviceBroken> {
    serve_chains_with(queue, mem, publish, serve)
}

/// Hands the chains the driver made available on `queue` to `server`, one at a
/// time and at most one queue's worth ([`Budget`]), and gives each back as it
/// says, published as `publish` says. Returns `Done` once the queue is empty,
/// `RetryAfter(YIELD)` when the budget ran out with more available, and
/// `RetryAfter(wait)` when `server` said wait; the flag says whether any chain went
/// back to the driver. Whatever ends the pass, an error included, every chain
/// served (and released) goes back first: a device that breaks loses at most
/// the chain it broke on.
pub(crate) fn serve_chains_with<'a>(
    queue: &mut Queue,
    mem: &'a GuestMemoryMmap,
    publish: Publish,
    mut server: impl Server<'a>,
) -> Result<QueueOutcome, DeviceBroken> {
    with_used_batch(queue, mem, publish, |queue, batch| {
        let outcome = serve_pass(queue, mem, &mut server, batch);
        let released = server.release(queue, mem, batch, true);
        let outcome = outcome?;
        released?;
        Ok(outcome)
    })
}

/// Runs `pass` over `queue` with a batch of used entries published as `rule`
/// says, and publishes what the batch still holds whatever ended the pass, an
/// error included. The outcome's flag is `pass`'s or'ed with whether the batch
/// gave any chain back.
pub(crate) fn with_used_batch(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    rule: Publish,
    pass: impl FnOnce(&mut Queue, &mut UsedBatch) -> Result<QueueOutcome, DeviceBroken>,
) -> Result<QueueOutcome, DeviceBroken> {
    let mut batch = UsedBatch::new(rule);
    let outcome = pass(queue, &mut batch);
    let published = batch.publish(queue, mem);
    let outcome = outcome?;
    published?;
    Ok(match outcome {
        QueueOutcome::Done(used) => QueueOutcome::Done(used || batch.any),
        QueueOutcome::RetryAfter(wait, used) => QueueOutcome::RetryAfter(wait, used || batch.any),
    })
}

/// Used entries written by a pass and not yet published.
#[derive(Default)]
pub(crate) struct UsedBatch {
    entries: [(u16, u32); USED_BATCH],
    len: usize,
    /// When the oldest entry was written.
    since: Option<std::time::Instant>,
    rule: Publish,
    /// Whether the pass gave any chain back.
    any: bool,
}

impl UsedBatch {
    /// An empty batch published as `rule` says.
    fn new(rule: Publish) -> Self {
        Self {
            rule,
            ..Self::default()
        }
    }

    /// Whether entries wait to be published.
    pub(crate) fn holds(&self) -> bool {
        self.len > 0
    }

    pub(crate) fn push(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        head: u16,
        len: u32,
    ) -> Result<(), DeviceBroken> {
        self.entries[self.len] = (head, len);
        self.len += 1;
        self.any = true;
        let due = match self.rule {
            Publish::Every8 => self.len == 8,
            Publish::ByAge => {
                let now = std::time::Instant::now();
                let since = *self.since.get_or_insert(now);
                self.len == USED_BATCH || now.duration_since(since) >= USED_AGE
            }
        };
        if due {
            self.publish(queue, mem)?;
        }
        Ok(())
    }

    pub(crate) fn publish(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
    ) -> Result<(), DeviceBroken> {
        self.since = None;
        let entries = &self.entries[..std::mem::take(&mut self.len)];
        add_used_together(queue, mem, entries)
    }
}

/// [`serve_chains`]'s loop; the outcome's flag is left to the caller.
fn serve_pass<'a>(
    queue: &mut Queue,
    mem: &'a GuestMemoryMmap,
    server: &mut impl Server<'a>,
    batch: &mut UsedBatch,
) -> Result<QueueOutcome, DeviceBroken> {
    let mut budget = Budget::of(queue);
    loop {
        let next = pop_chain(queue, mem, &mut budget)?;
        if let Next::Empty = next {
            server.release(queue, mem, batch, true)?;
        }
        let chain = match next {
            Next::Chain(chain) => chain,
            // What was served reaches the driver before the device looks
            // again: a driver polling the ring adds its next requests at once,
            // and they are taken in this pass.
            Next::Empty if batch.holds() => {
                batch.publish(queue, mem)?;
                continue;
            }
            // With event indices, tell the driver where to notify next (the
            // entry after the last one taken); one made available meanwhile is
            // served now, since its notification may have been skipped.
            Next::Empty if queue.event_idx_enabled() && rearm(queue, mem)? => continue,
            Next::Empty => return Ok(QueueOutcome::Done(false)),
            Next::Later => return Ok(QueueOutcome::RetryAfter(YIELD, false)),
        };
        let head = chain.head_index();
        if head >= queue.size() {
            // `add_used` would refuse it after the chain was served.
            return Err(DeviceBroken(format!(
                "available ring names chain {head} in a {}-entry queue",
                queue.size()
            )));
        }
        let served = server.serve(chain, budget.waiting(queue))?;
        // Chains done before this one go back before it.
        server.release(queue, mem, batch, false)?;
        match served {
            Served::Used(len) => batch.push(queue, mem, head, len)?,
            Served::Kept { release: None } => {}
            Served::Kept {
                release: Some(held),
            } => batch.push(queue, mem, held, 0)?,
            Served::Wait(wait) => {
                queue.go_to_previous_position();
                return Ok(QueueOutcome::RetryAfter(wait, false));
            }
        }
    }
}

/// Whether `chain` ends where its driver ended it. Iterating a chain stops
/// without an error at a `next` that loops, past the queue size, past 4 GiB in
/// all, at a `next` outside the table or at a descriptor that cannot be read; a
/// device that passes a chain's bytes on (a frame, a packet) must not send what
/// it happened to gather, nor fill a looping chain as if it were longer.
fn whole(chain: &DescriptorChain<&GuestMemoryMmap>) -> Result<(), virtio_queue::Error> {
    match chain.clone().last() {
        Some(last) if !last.has_next() => Ok(()),
        _ => Err(virtio_queue::Error::InvalidChain),
    }
}

/// A reader of what the driver wrote into `chain`, refusing a chain that does
/// not end where its driver ended it ([`whole`]).
pub(crate) fn whole_chain_reader<'a>(
    chain: DescriptorChain<&'a GuestMemoryMmap>,
    mem: &'a GuestMemoryMmap,
) -> Result<Reader<'a>, virtio_queue::Error> {
    whole(&chain)?;
    chain.reader(mem)
}

/// A writer into `chain`'s device-writable buffers, refusing a chain that does
/// not end where its driver ended it ([`whole`]).
pub(crate) fn whole_chain_writer<'a>(
    chain: DescriptorChain<&'a GuestMemoryMmap>,
    mem: &'a GuestMemoryMmap,
) -> Result<Writer<'a>, virtio_queue::Error> {
    whole(&chain)?;
    chain.writer(mem)
}

/// Writes `avail_event` (the next entry the device will take); whether the
/// driver made more available meanwhile. While this thread polls the rings,
/// notifications stay off instead ([`poll::quiet`]) and nothing is reported:
/// the poll sees new entries.
pub(crate) fn rearm(queue: &mut Queue, mem: &GuestMemoryMmap) -> Result<bool, DeviceBroken> {
    if poll::active() {
        poll::quiet(queue, mem)?;
        return Ok(false);
    }
    queue
        .enable_notification(mem)
        .map_err(|e| DeviceBroken(format!("cannot write avail_event: {e:?}")))
}

/// Publishes `used` (chain heads and bytes written) in one step, as one move
/// of the used index: a frame's buffers must reach the driver together (virtio
/// 1.1, 5.1.6.4), and a driver that polls the ring takes a batch of completed
/// requests per look. `Queue::add_used` makes each entry visible on its own,
/// so the entries go into the used ring through one host view of it, a write
/// per run up to the ring's end, and then the index.
pub(crate) fn add_used_together(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    used: &[(u16, u32)],
) -> Result<(), DeviceBroken> {
    use vm_memory::GuestMemoryBackend;
    if used.is_empty() {
        return Ok(());
    }
    let size = queue.size();
    let ring = mem
        .get_slice(GuestAddress(queue.used_ring()), 4 + 8 * usize::from(size))
        .ok();
    let Some(ring) = ring.filter(|_| used.iter().all(|&(head, _)| head < size)) else {
        // `add_used` refuses a head past the queue (a hostile driver's): the
        // entries before it go back one by one, so none of them is lost. A used
        // ring across memory regions goes that way too.
        for &(head, len) in used {
            add_used(queue, mem, head, len)?;
        }
        return Ok(());
    };
    let broken = |e: vm_memory::VolatileMemoryError| {
        DeviceBroken(format!("cannot write the used ring: {e}"))
    };
    let start = queue.next_used();
    let mut done = 0;
    while done < used.len() {
        // Consecutive elements up to the ring's end, USED_BATCH at most, in one write.
        let slot = start.wrapping_add(done as u16) % size;
        let n = (used.len() - done)
            .min(usize::from(size - slot))
            .min(USED_BATCH);
        let mut bytes = [0u8; 8 * USED_BATCH];
        for (element, &(head, len)) in bytes.chunks_exact_mut(8).zip(&used[done..done + n]) {
            element[..4].copy_from_slice(&u32::from(head).to_le_bytes());
            element[4..].copy_from_slice(&len.to_le_bytes());
        }
        ring.write_slice(&bytes[..8 * n], 4 + 8 * usize::from(slot))
            .map_err(broken)?;
        done += n;
    }
    let end = start.wrapping_add(used.len() as u16);
    // Release: the entries are visible before the index that publishes them.
    ring.store(end.to_le(), 2, Ordering::Release)
        .map_err(broken)?;
    queue.set_next_used(end);
    Ok(())
}

/// Returns the chain at `head` to the driver, `len` bytes written into it.
pub(crate) fn add_used(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    head: u16,
    len: u32,
) -> Result<(), DeviceBroken> {
    queue
        .add_used(mem, head, len)
        .map_err(|e| DeviceBroken(format!("cannot write the used ring: {e:?}")))
}

/// How many chains are available, refusing an available ring whose index runs
/// ahead of the queue size: a driver bug the device cannot recover from by itself.
fn pending(queue: &Queue, mem: &GuestMemoryMmap) -> Result<u16, DeviceBroken> {
    let avail = queue
        .avail_idx(mem, std::sync::atomic::Ordering::Acquire)
        .map_err(|e| DeviceBroken(format!("cannot read the available ring: {e:?}")))?;
    let pending = avail - std::num::Wrapping(queue.next_avail());
    if pending.0 > queue.size() {
        return Err(DeviceBroken(format!(
            "available index {} is {} entries ahead of a {}-entry queue",
            avail.0,
            pending.0,
            queue.size()
        )));
    }
    Ok(pending.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    #[test]
    fn a_spent_budget_asks_to_come_back_only_when_more_is_available() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mock = MockSplitQueue::create(&mem, GuestAddress(0x10000), 16);
        let desc = |addr| RawDescriptor::from(SplitDescriptor::new(addr, 16, 0, 0));
        mock.add_desc_chains(&[desc(0x20000), desc(0x20010), desc(0x20020)], 0)
            .unwrap();
        let mut queue: Queue = mock.create_queue().unwrap();
        let mut budget = Budget {
            left: 2,
            ..Budget::of(&queue)
        };
        assert!(matches!(
            pop_chain(&mut queue, &mem, &mut budget),
            Ok(Next::Chain(_))
        ));
        assert!(matches!(
            pop_chain(&mut queue, &mem, &mut budget),
            Ok(Next::Chain(_))
        ));
        assert!(matches!(
            pop_chain(&mut queue, &mem, &mut budget),
            Ok(Next::Later)
        ));
        let mut fresh = Budget::of(&queue);
        assert!(matches!(
            pop_chain(&mut queue, &mem, &mut fresh),
            Ok(Next::Chain(_))
        ));
        assert!(matches!(
            pop_chain(&mut queue, &mem, &mut budget),
            Ok(Next::Empty)
        ));
    }

    /// The available index is read when the chains known to be there run out,
    /// not for each chain: a driver's change meanwhile is checked then (here
    /// an index gone past the queue size, which breaks the device).
    #[test]
    fn the_available_index_is_checked_again_once_the_known_chains_are_taken() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mock = MockSplitQueue::create(&mem, GuestAddress(0x10000), 16);
        let desc = |addr| RawDescriptor::from(SplitDescriptor::new(addr, 16, 0, 0));
        mock.add_desc_chains(&[desc(0x20000)], 0).unwrap();
        let mut queue: Queue = mock.create_queue().unwrap();
        let mut budget = Budget::of(&queue);
        assert!(matches!(
            pop_chain(&mut queue, &mem, &mut budget),
            Ok(Next::Chain(_))
        ));
        mock.avail().idx().store(u16::to_le(40));
        assert!(pop_chain(&mut queue, &mem, &mut budget).is_err());
    }

    /// Entries published together wrap around the ring's end in place, and the
    /// used index moves once, past all of them.
    #[test]
    fn used_entries_published_together_wrap_around_the_ring() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mock = MockSplitQueue::create(&mem, GuestAddress(0x10000), 4);
        let mut queue: Queue = mock.create_queue().unwrap();
        queue.set_next_used(3);
        let used = queue.used_ring();
        use vm_memory::bitmap::Bitmap;
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        let region = mem.find_region(GuestAddress(used)).unwrap();
        vm_memory::MmapRegion::bitmap(region).reset();
        add_used_together(&mut queue, &mem, &[(1, 10), (2, 20), (3, 30)]).unwrap();
        // Marked written for a snapshot or a migration to copy.
        assert!(region.bitmap().dirty_at(used as usize));
        let element = |slot: u64| {
            let at = used + 4 + 8 * slot;
            (
                mem.read_obj::<u32>(GuestAddress(at)).unwrap(),
                mem.read_obj::<u32>(GuestAddress(at + 4)).unwrap(),
            )
        };
        assert_eq!(
            [element(3), element(0), element(1)],
            [(1, 10), (2, 20), (3, 30)]
        );
        assert_eq!(mem.read_obj::<u16>(GuestAddress(used + 2)).unwrap(), 6);
        assert_eq!(queue.next_used(), 6);
    }

    /// A chain of one descriptor is taken by `pop_single` as `pop_chain` takes
    /// it; a longer or an indirect chain, a head past the queue, or an index
    /// not read yet is left where it is, for `pop_chain`.
    #[test]
    fn pop_single_takes_one_descriptor_chains_and_leaves_the_rest() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mock = MockSplitQueue::create(&mem, GuestAddress(0x10000), 16);
        let (next, write, indirect) = (1, 2, 4);
        let desc = |i: u64, flags, next| {
            RawDescriptor::from(SplitDescriptor::new(
                0x20000 + 0x100 * i,
                0x100,
                flags,
                next,
            ))
        };
        // Chains {0}, {1, 2}, {3}, {4: indirect}, then a head past the queue.
        mock.add_desc_chains(
            &[
                desc(0, write, 0),
                desc(1, write | next, 2),
                desc(2, write, 0),
                desc(3, write, 0),
                desc(4, indirect, 0),
            ],
            0,
        )
        .unwrap();
        let avail = mock.avail_addr().0;
        mem.write_obj(99u16.to_le(), GuestAddress(avail + 4 + 2 * 4))
            .unwrap();
        mem.write_obj(5u16.to_le(), GuestAddress(avail + 2))
            .unwrap();
        let mut queue: Queue = mock.create_queue().unwrap();
        let mut budget = Budget::of(&queue);
        let chain_head = |next: Result<Next, DeviceBroken>| match next {
            Ok(Next::Chain(chain)) => chain.head_index(),
            _ => panic!("expected a chain"),
        };

        assert!(pop_single(&mut queue, &mem, &mut budget).is_none());
        assert_eq!(chain_head(pop_chain(&mut queue, &mem, &mut budget)), 0);
        assert!(pop_single(&mut queue, &mem, &mut budget).is_none());
        assert_eq!(queue.next_avail(), 1);
        assert_eq!(chain_head(pop_chain(&mut queue, &mem, &mut budget)), 1);
        let single = pop_single(&mut queue, &mem, &mut budget).unwrap();
        assert_eq!(
            (single.head, single.addr, single.len, single.write_only),
            (3, GuestAddress(0x20300), 0x100, true)
        );
        assert_eq!(queue.next_avail(), 3);
        assert!(pop_single(&mut queue, &mem, &mut budget).is_none());
        assert_eq!(chain_head(pop_chain(&mut queue, &mem, &mut budget)), 4);
        assert!(pop_single(&mut queue, &mem, &mut budget).is_none());
        assert_eq!(queue.next_avail(), 4);
    }
}
