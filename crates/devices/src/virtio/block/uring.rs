//! The asynchronous engine (`io_engine` Async): reads, writes and flushes are
//! submitted to an io_uring, many in flight, and complete in any order; the
//! kernel signals completions on an eventfd that the device event loop watches.
//! Contiguous reads (or writes) go as one entry, a run ([`Run`]); a run cut
//! short is moved again request by request when it completes, so that each
//! gets its own status.
//!
//! Data moves between the image and guest memory directly (`readv`/`writev`
//! on the request's buffers, mapped through vm-memory): no copy and no host
//! buffer per request. A read's buffers are marked in the memory's dirty bitmap
//! when it completes, after the kernel wrote them. A flush is submitted with
//! `IOSQE_IO_DRAIN`: it starts only once every request submitted before it has
//! completed, so it covers every write acknowledged or in flight when the driver
//! asked for it. Each slot keeps its lists between requests, so a request
//! allocates nothing.

use std::fs::File;
use std::os::fd::AsRawFd;

use io_uring::{opcode, squeue, types, IoUring};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::request::{T_FLUSH, T_IN, T_OUT};
use super::run::{Held, Requests, Run};
use crate::virtio::iov::{guest_iovecs, mark_written, Iovecs};
use crate::GuestMemoryMmap;

/// A read, a write or a flush in flight, in its slot (the entry's
/// `user_data`): one request, or a run of contiguous ones ([`Run`]) that one
/// entry moves.
#[derive(Default)]
struct Slot {
    busy: bool,
    /// The device was reset while it was in flight: its completion is nobody's.
    orphan: bool,
    /// Its requests, given back when it completes.
    requests: Requests,
    /// Their buffers as the kernel sees them.
    iovecs: Iovecs,
}

/// A completed request.
pub(super) struct Done {
    pub(super) head: u16,
    pub(super) kind: u32,
    pub(super) status: GuestAddress,
    /// Bytes it moved, when all of them were; `None` when it failed.
    pub(super) moved: Option<usize>,
    /// The kernel's result (bytes, or a negative errno), for the log.
    pub(super) result: i32,
    /// It moved with the request before it, in one system call or entry.
    pub(super) merged: bool,
}

/// An io_uring with its completion eventfd and the requests in flight.
pub(super) struct Uring {
    ring: IoUring,
    eventfd: EventFd,
    /// The image (its own descriptor), for the entries and for a run cut
    /// short, moved again request by request.
    file: File,
    slots: Vec<Slot>,
    free: Vec<usize>,
    /// Entries pushed but not yet submitted.
    unsubmitted: bool,
    /// The guest memory the requests in flight point into, kept mapped until
    /// they complete.
    mem: Option<GuestMemoryMmap>,
    /// Iovecs of a request moved again on its own.
    scratch: Iovecs,
}

impl Uring {
    /// A ring on `file` for up to `depth` requests in flight (the queue's size).
    pub(super) fn new(depth: u16, file: &File) -> std::io::Result<Self> {
        let ring = IoUring::new(u32::from(depth))?;
        let eventfd = EventFd::new(libc::EFD_NONBLOCK)?;
        // Every completion signals it, those made during submission too: the
        // "async" registration signals only io-wq workers' completions, and a
        // read completed by task work would then wait for the next submission
        // (seen: a guest's requests timed out).
        ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
        Ok(Self {
            ring,
            eventfd,
            file: file.try_clone()?,
            slots: (0..depth).map(|_| Slot::default()).collect(),
            free: (0..usize::from(depth)).rev().collect(),
            unsubmitted: false,
            mem: None,
            scratch: Iovecs::default(),
        })
    }

    /// The eventfd the kernel signals when requests complete.
    pub(super) fn eventfd(&self) -> &EventFd {
        &self.eventfd
    }

    /// Requests in flight.
    pub(super) fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Queues `run`'s reads or writes as one entry; it goes to the kernel at
    /// the next [`Self::submit`]. False when every slot is taken.
    pub(super) fn push_run(&mut self, mem: &GuestMemoryMmap, run: &Run) -> bool {
        let Some(&index) = self.free.last() else {
            return false;
        };
        let slot = &mut self.slots[index];
        slot.requests.kind = run.requests.kind;
        slot.requests.offset = run.requests.offset;
        slot.requests.len = run.requests.len;
        slot.requests.held.clone_from(&run.requests.held);
        slot.requests.segments.clone_from(&run.requests.segments);
        slot.iovecs.0.clone_from(&run.iovecs.0);
        self.push(mem, index)
    }

    /// Queues a flush of the request at `head` (status byte at `status`),
    /// started only once every entry before it completed. False when every
    /// slot is taken.
    pub(super) fn push_flush(
        &mut self,
        mem: &GuestMemoryMmap,
        head: u16,
        status: GuestAddress,
    ) -> bool {
        let Some(&index) = self.free.last() else {
            return false;
        };
        let slot = &mut self.slots[index];
        slot.requests.kind = T_FLUSH;
        slot.requests.offset = 0;
        slot.requests.len = 0;
        slot.requests.held.clear();
        slot.requests.held.push(Held {
            head,
            status,
            len: 0,
            first: 0,
        });
        slot.requests.segments.clear();
        slot.iovecs.0.clear();
        self.push(mem, index)
    }

    /// Queues the entry for free slot `index`, filled in by the caller.
    fn push(&mut self, mem: &GuestMemoryMmap, index: usize) -> bool {
        let slot = &self.slots[index];
        let fd = types::Fd(self.file.as_raw_fd());
        let (at, count) = (slot.iovecs.0.as_ptr(), slot.iovecs.0.len() as u32);
        let offset = slot.requests.offset;
        let entry = match slot.requests.kind {
            T_IN => opcode::Readv::new(fd, at, count).offset(offset).build(),
            T_OUT => opcode::Writev::new(fd, at, count).offset(offset).build(),
            _ => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build()
                .flags(squeue::Flags::IO_DRAIN),
        }
        .user_data(index as u64);
        // SAFETY: the iovec list stays in its slot, untouched, until the entry
        // completes; the guest memory it points into stays mapped as long as
        // `self.mem` holds it, and `Drop` waits for every entry first.
        let mut pushed = unsafe { self.ring.submission().push(&entry) }.is_ok();
        if !pushed {
            // The submission queue is as deep as the slots: flush it and retry.
            let _ = self.ring.submit();
            // SAFETY: as above.
            pushed = unsafe { self.ring.submission().push(&entry) }.is_ok();
        }
        if !pushed {
            return false;
        }
        self.free.pop();
        let slot = &mut self.slots[index];
        slot.busy = true;
        slot.orphan = false;
        self.mem.get_or_insert_with(|| mem.clone());
        self.unsubmitted = true;
        true
    }

    /// Hands the queued entries to the kernel (one system call per batch);
    /// whether there were any.
    pub(super) fn submit(&mut self) -> std::io::Result<bool> {
        if !self.unsubmitted {
            return Ok(false);
        }
        self.ring.submit()?;
        self.unsubmitted = false;
        Ok(true)
    }

    /// The requests that completed, appended to `done`, what a read wrote
    /// marked dirty; a run cut short is moved again request by request (in this
    /// thread), so that each gets its own status. Clears the eventfd first, so
    /// that a completion posted meanwhile signals it again.
    pub(super) fn completed(&mut self, done: &mut Vec<Done>) {
        let _ = self.eventfd.read();
        let mem = &self.mem;
        for c in self.ring.completion() {
            let Some(index) = usize::try_from(c.user_data())
                .ok()
                .filter(|&i| self.slots.get(i).is_some_and(|s| s.busy))
            else {
                continue;
            };
            let slot = &mut self.slots[index];
            slot.busy = false;
            self.free.push(index);
            let (requests, result) = (&slot.requests, c.result());
            // Guest memory a read wrote is dirty, whoever the request was for.
            if let (T_IN, Some(mem), Ok(n)) = (requests.kind, mem, usize::try_from(result)) {
                mark_written(mem, &requests.segments, n);
            }
            if slot.orphan {
                continue;
            }
            // A run cut short is moved again request by request.
            let redo = mem
                .as_ref()
                .filter(|_| requests.held.len() > 1)
                .map(|mem| (&self.file, mem, &mut self.scratch));
            requests.outcomes(result, redo, done);
        }
        if self.in_flight() == 0 {
            self.mem = None;
        }
    }

    /// The device was reset: what is in flight completes unreported (its guest
    /// memory stays mapped until then). Makes no system call, so that a reset
    /// on whatever thread the driver's status write arrives costs nothing.
    pub(super) fn forget_all(&mut self) {
        for slot in self.slots.iter_mut().filter(|s| s.busy) {
            slot.orphan = true;
        }
    }

    /// Waits until every request in flight has completed; appends them to `done`.
    pub(super) fn wait_all(&mut self, done: &mut Vec<Done>) {
        while self.in_flight() > 0 {
            if let Err(e) = self.ring.submit_and_wait(1) {
                if e.kind() != std::io::ErrorKind::Interrupted {
                    tracing::error!(
                        in_flight = self.in_flight(),
                        "virtio-blk: cannot wait for requests in flight: {e}"
                    );
                    return;
                }
            }
            self.unsubmitted = false;
            self.completed(done);
        }
    }
}

impl Drop for Uring {
    fn drop(&mut self) {
        // The kernel may still write into guest memory for requests in flight.
        self.wait_all(&mut Vec::new());
    }
}

/// Moves a read (`T_IN`) or a write of `segments` between `file` at `offset`
/// and guest memory at once, in the calling thread (`preadv`/`pwritev` on the
/// request's buffers, no copy through a buffer of the device's): a request
/// of a run cut short, on its own. `None` when the buffers are not guest memory the
/// kernel can be handed; else the bytes moved (fewer at the end of the file)
/// or the error. A read's buffers are marked written.
pub(super) fn transfer(
    file: &File,
    mem: &GuestMemoryMmap,
    kind: u32,
    offset: u64,
    segments: &[(GuestAddress, usize)],
    iovecs: &mut Iovecs,
) -> Option<std::io::Result<usize>> {
    let iovecs = &mut iovecs.0;
    let mut done = 0;
    loop {
        let left = guest_iovecs(mem, segments, done, iovecs)?;
        if left == 0 {
            break;
        }
        let count = iovecs.len().min(libc::UIO_MAXIOV as usize) as libc::c_int;
        let at = (offset + done as u64) as libc::off_t;
        // SAFETY: the iovecs point into guest memory, mapped while `mem` is
        // borrowed, each within one region and as long as it says; the kernel
        // writes (a read) or reads (a write) at most that.
        let n = unsafe {
            if kind == T_IN {
                libc::preadv(file.as_raw_fd(), iovecs.as_ptr(), count, at)
            } else {
                libc::pwritev(file.as_raw_fd(), iovecs.as_ptr(), count, at)
            }
        };
        match n {
            0 => break,
            n if n > 0 => done += n as usize,
            _ => match std::io::Error::last_os_error() {
                e if e.kind() == std::io::ErrorKind::Interrupted => {}
                e => return Some(Err(e)),
            },
        }
    }
    if kind == T_IN {
        mark_written(mem, segments, done);
    }
    Some(Ok(done))
}
