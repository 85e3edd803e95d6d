//! Runs: reads (or writes) that follow each other in the image, taken in one
//! pass over a queue, are held back and moved by one `preadv` (`pwritev`) over
//! all their buffers, or one io_uring entry on the asynchronous engine, as QEMU
//! merges a queue's requests. Each call into the image has a cost of its own (into a page
//! cache of large folios, a 4 KiB write walks the whole folio: BENCHMARKS.md,
//! "Runs"); a driver that keeps many small sequential requests in flight pays
//! it once per run instead of once per request.
//!
//! A run ends at the first request that does not continue it, before anything
//! else the device does, and at the end of the pass: requests take effect in
//! the order the driver made them available, and none is held between passes
//! (a snapshot, a reset or a quiesce never finds one).

use std::fs::File;
use std::os::fd::AsRawFd;

use vm_memory::{Address, Bytes, GuestAddress};

use super::request::{T_IN, T_OUT};
use super::uring::{transfer, Done};
use crate::virtio::iov::{guest_iovecs, mark_written, Iovecs};
use crate::GuestMemoryMmap;

/// The most bytes a run moves: past it the copy outgrows the CPU's caches
/// (2 MiB writes of 64 KiB requests were slower than 512 KiB ones).
const MAX_BYTES: usize = 256 << 10;
/// The most requests a run holds.
const MAX_REQUESTS: usize = 16;
/// The most buffers a run hands the kernel (what one call takes).
const MAX_BUFFERS: usize = libc::UIO_MAXIOV as usize;

/// A request held in a run.
#[derive(Clone, Copy)]
pub(super) struct Held {
    pub(super) head: u16,
    pub(super) status: GuestAddress,
    /// Its bytes.
    pub(super) len: usize,
    /// Where its buffers start in the run's `segments`.
    pub(super) first: usize,
}

/// Requests moved by one call or io_uring entry: one, or a run of contiguous
/// ones.
#[derive(Default)]
pub(super) struct Requests {
    /// `T_IN`, `T_OUT` (or, alone, `T_FLUSH`), for every one of them.
    pub(super) kind: u32,
    /// The image's byte offset of the first.
    pub(super) offset: u64,
    /// Bytes of all of them.
    pub(super) len: usize,
    pub(super) held: Vec<Held>,
    /// Their data buffers in guest memory, in order.
    pub(super) segments: Vec<(GuestAddress, usize)>,
}

impl Requests {
    /// Appends each request's outcome to `done`, once the call that moved
    /// them together returned `result` (bytes, or a negative errno): when it
    /// moved every byte (a flush: succeeded), each moved its own; otherwise
    /// each is moved again on its own through `redo` where given, so that each
    /// gets its own status (moving the same bytes twice changes nothing), or
    /// fails with `result`.
    pub(super) fn outcomes(
        &self,
        result: i32,
        mut redo: Option<(&File, &GuestMemoryMmap, &mut Iovecs)>,
        done: &mut Vec<Done>,
    ) {
        let whole = match self.kind {
            T_IN | T_OUT => usize::try_from(result).ok() == Some(self.len),
            _ => result >= 0,
        };
        let mut offset = self.offset;
        for (i, held) in self.held.iter().enumerate() {
            let (moved, result) = match &mut redo {
                _ if whole => (Some(held.len), bytes(held.len)),
                Some((file, mem, scratch)) => {
                    let end = self
                        .held
                        .get(i + 1)
                        .map_or(self.segments.len(), |h| h.first);
                    let segments = &self.segments[held.first..end];
                    let again = transfer(file, mem, self.kind, offset, segments, scratch);
                    moved(again, held.len)
                }
                None => (None, result),
            };
            done.push(Done {
                head: held.head,
                kind: self.kind,
                status: held.status,
                moved,
                result,
                merged: whole && i > 0,
            });
            offset += held.len as u64;
        }
    }
}

/// Reads or writes held back to be moved together (see the module's text).
#[derive(Default)]
pub(super) struct Run {
    pub(super) requests: Requests,
    /// The requests' buffers as the kernel sees them.
    pub(super) iovecs: Iovecs,
    /// One request's iovecs, before they join the run's; a request's, moved
    /// again on its own.
    scratch: Iovecs,
}

impl Run {
    /// Whether a `kind` request at byte `offset` over `segments` may join the
    /// run: any may join an empty one; else one of the same kind that starts
    /// where the run ends, within its limits.
    pub(super) fn continues(
        &self,
        kind: u32,
        offset: u64,
        segments: &[(GuestAddress, usize)],
    ) -> bool {
        let r = &self.requests;
        let len = segments.iter().map(|&(_, n)| n).sum::<usize>();
        r.held.is_empty()
            || (kind == r.kind
                && Some(offset) == r.offset.checked_add(r.len as u64)
                && r.len + len <= MAX_BYTES
                && r.segments.len() + segments.len() <= MAX_BUFFERS)
    }

    /// Whether the run ends now: it holds as many requests or bytes as it
    /// may, or as many requests as still wait after it (`waiting`): on the
    /// synchronous engine the driver then sees the first half of a deep queue
    /// come back while the device moves the rest, and adds requests meanwhile,
    /// rather than all at the end (4 KiB writes at depth 8 2.4x, BENCHMARKS.md
    /// "Runs").
    pub(super) fn full(&self, waiting: u16) -> bool {
        let r = &self.requests;
        r.held.len() >= MAX_REQUESTS.min(usize::from(waiting).max(1)) || r.len >= MAX_BYTES
    }

    /// Holds the request at `head` ([`Self::continues`] said it may join);
    /// false, and the run as it was, when its buffers are not guest memory
    /// the kernel can be handed (one across a region boundary).
    pub(super) fn hold(
        &mut self,
        mem: &GuestMemoryMmap,
        head: u16,
        kind: u32,
        offset: u64,
        status: GuestAddress,
        segments: &[(GuestAddress, usize)],
    ) -> bool {
        let Some(len) = guest_iovecs(mem, segments, 0, &mut self.scratch.0) else {
            return false;
        };
        let r = &mut self.requests;
        if r.held.is_empty() {
            r.kind = kind;
            r.offset = offset;
            r.len = 0;
        }
        r.held.push(Held {
            head,
            status,
            len,
            first: r.segments.len(),
        });
        r.segments.extend_from_slice(segments);
        r.len += len;
        self.iovecs.0.extend_from_slice(&self.scratch.0);
        true
    }

    /// Whether it holds nothing.
    pub(super) fn is_empty(&self) -> bool {
        self.requests.held.is_empty()
    }

    /// Empties it (its requests went elsewhere: an io_uring entry).
    pub(super) fn clear(&mut self) {
        self.requests.held.clear();
        self.requests.segments.clear();
        self.iovecs.0.clear();
    }

    /// Moves the run's bytes between `file` and guest memory (`mem`, the
    /// memory of the pass that held them) in one call and appends each
    /// request's outcome to `done` ([`Requests::outcomes`], each moved again on
    /// its own when the call fails or moves less). Empty after.
    pub(super) fn end(&mut self, file: &File, mem: &GuestMemoryMmap, done: &mut Vec<Done>) {
        if self.is_empty() {
            return;
        }
        let r = &self.requests;
        let count = self.iovecs.0.len() as libc::c_int;
        let at = r.offset as libc::off_t;
        // SAFETY: the iovecs point into guest memory (`hold` built them from
        // `mem`'s regions, mapped while it is borrowed: the same pass), each as
        // long as it says; the kernel writes (a read) or reads (a write) at most that.
        let n = unsafe {
            if r.kind == T_IN {
                libc::preadv(file.as_raw_fd(), self.iovecs.0.as_ptr(), count, at)
            } else {
                libc::pwritev(file.as_raw_fd(), self.iovecs.0.as_ptr(), count, at)
            }
        };
        let transferred = usize::try_from(n).ok();
        let result = match transferred {
            Some(n) => bytes(n),
            None => -std::io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO),
        };
        // What a read wrote is dirty, even a read cut short that each request
        // then reads again.
        if r.kind == T_IN {
            mark_written(mem, &r.segments, transferred.unwrap_or(0));
        }
        r.outcomes(result, Some((file, mem, &mut self.scratch)), done);
        self.clear();
    }

    /// Ends a run of reads that lie in a hole of the image: zeroes go into
    /// their buffers (marked dirty), and each request's outcome into `done`.
    /// Empty after.
    pub(super) fn zero(&mut self, mem: &GuestMemoryMmap, done: &mut Vec<Done>) {
        static ZEROES: [u8; 4096] = [0; 4096];
        let r = &self.requests;
        let mut result = bytes(r.len);
        'buffers: for &(addr, len) in &r.segments {
            let mut at = 0;
            while at < len {
                let n = (len - at).min(ZEROES.len());
                // `hold` found every buffer in guest memory.
                if mem
                    .write_slice(&ZEROES[..n], addr.unchecked_add(at as u64))
                    .is_err()
                {
                    result = -libc::EFAULT;
                    break 'buffers;
                }
                at += n;
            }
        }
        r.outcomes(result, None, done);
        self.clear();
    }
}

/// A request of `len` bytes moved on its own ([`transfer`]): the bytes when
/// all of them were (else `None`), and for the log the bytes moved or the
/// negative errno.
fn moved(transferred: Option<std::io::Result<usize>>, len: usize) -> (Option<usize>, i32) {
    match transferred {
        Some(Ok(n)) if n == len => (Some(n), bytes(n)),
        // Cut short: the bytes it moved, for the log.
        Some(Ok(n)) => (None, bytes(n)),
        Some(Err(e)) => (None, -e.raw_os_error().unwrap_or(libc::EIO)),
        None => (None, -libc::EFAULT),
    }
}

/// A byte count as a completion's result.
fn bytes(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}
