//! Guest memory filled on first touch (userfaultfd): a VM that runs before its
//! memory has arrived (post-copy migration) or that loads a snapshot's memory
//! as it is used (the `Uffd` snapshot backend). A page missing when it is
//! touched, by a vCPU through KVM or by one of the VMM's threads, waits until
//! whoever holds the userfaultfd copies it in (or zeroes it).
//!
//! For an outside handler, [`LazyMemory::send_to_handler`] speaks Firecracker's
//! protocol: one message on a Unix socket with the regions as JSON and the
//! userfaultfd as `SCM_RIGHTS`, so handlers written for Firecracker serve Vigil.

use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::Serialize;
use userfaultfd::{Event, FaultKind, FeatureFlags, ReadWrite, RegisterMode, Uffd, UffdBuilder};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::dirty_log::PAGE_SIZE as PAGE;
use crate::GuestMemoryMmap;

/// Why guest memory cannot be filled on demand.
#[derive(Debug, thiserror::Error)]
pub enum LazyMemoryError {
    #[error("cannot create a userfaultfd (needs root or /dev/userfaultfd): {0}")]
    Create(userfaultfd::Error),
    #[error(
        "cannot register guest memory at {gpa:#x} ({bytes} bytes) with the userfaultfd: {source}"
    )]
    Register {
        gpa: u64,
        bytes: u64,
        source: userfaultfd::Error,
    },
    #[error("page {gpa:#x}: {why}")]
    Page { gpa: u64, why: String },
    #[error("the page-fault handler at {path}: {source}")]
    Handler {
        path: String,
        source: std::io::Error,
    },
    #[error("reading the userfaultfd: {0}")]
    Read(userfaultfd::Error),
}

/// One region as Firecracker's page-fault handlers expect it
/// (`GuestRegionUffdMapping`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
struct HandlerRegion {
    /// Where the region is in this process.
    base_host_virt_addr: u64,
    size: u64,
    /// Where its bytes start in the snapshot's memory file.
    offset: u64,
    page_size: u64,
    /// The same in KiB, for handlers from before Firecracker 1.10.
    page_size_kib: u64,
}

#[derive(Clone, Copy, Debug)]
struct Region {
    gpa: u64,
    host: u64,
    len: u64,
}

/// One fault on registered guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// The guest-physical page.
    pub gpa: u64,
    /// A write to a write-protected page (else a touch of a missing one).
    pub write_protected: bool,
    /// A write (else a read).
    pub write: bool,
}

/// Guest memory registered with a userfaultfd for missing pages.
#[derive(Debug)]
pub struct LazyMemory {
    uffd: Uffd,
    regions: Vec<Region>,
}

impl LazyMemory {
    /// Registers every region of `mem`, anonymous private memory: from here on
    /// a page it does not hold yet waits for [`LazyMemory::copy`] or
    /// [`LazyMemory::zero`] when touched. `removals`: madvise(DONTNEED) is
    /// reported to the handler (Firecracker's handlers expect it, for the
    /// balloon).
    pub fn register(mem: &GuestMemoryMmap, removals: bool) -> Result<Self, LazyMemoryError> {
        let features = if removals {
            FeatureFlags::EVENT_REMOVE
        } else {
            FeatureFlags::empty()
        };
        Self::register_modes(mem, features, RegisterMode::MISSING)
    }

    /// Registers every region of `mem` for missing pages and for writes to
    /// pages made read-only with [`LazyMemory::write_protect`] (the pager's
    /// mode; needs Linux 5.7 for anonymous memory). A write to such a page
    /// waits until [`LazyMemory::unprotect`].
    pub fn register_write_protect(mem: &GuestMemoryMmap) -> Result<Self, LazyMemoryError> {
        Self::register_modes(
            mem,
            FeatureFlags::PAGEFAULT_FLAG_WP,
            RegisterMode::MISSING | RegisterMode::WRITE_PROTECT,
        )
    }

    fn register_modes(
        mem: &GuestMemoryMmap,
        features: FeatureFlags,
        modes: RegisterMode,
    ) -> Result<Self, LazyMemoryError> {
        let mut builder = UffdBuilder::new();
        builder
            .close_on_exec(true)
            .non_blocking(true)
            // KVM's accesses on behalf of a vCPU are kernel-mode faults.
            .user_mode_only(false);
        if !features.is_empty() {
            builder.require_features(features);
        }
        let uffd = builder.create().map_err(LazyMemoryError::Create)?;
        let mut regions = Vec::new();
        for r in mem.iter() {
            let region = Region {
                gpa: r.start_addr().0,
                host: r.as_ptr() as u64,
                len: r.len(),
            };
            uffd.register_with_mode(region.host as *mut _, region.len as usize, modes)
                .map_err(|source| LazyMemoryError::Register {
                    gpa: region.gpa,
                    bytes: region.len,
                    source,
                })?;
            regions.push(region);
        }
        Ok(Self { uffd, regions })
    }

    /// The regions, with their offsets in a memory file that holds them one
    /// after the other (a snapshot's).
    fn handler_regions(&self) -> Vec<HandlerRegion> {
        let mut offset = 0;
        self.regions
            .iter()
            .map(|r| {
                let mapping = HandlerRegion {
                    base_host_virt_addr: r.host,
                    size: r.len,
                    offset,
                    page_size: PAGE,
                    page_size_kib: PAGE / 1024,
                };
                offset += r.len;
                mapping
            })
            .collect()
    }

    /// Hands the userfaultfd and the regions to the handler listening at
    /// `socket` (Firecracker's protocol). This side keeps its copy of the
    /// userfaultfd: should the handler die, faults wait rather than read
    /// zeros.
    pub fn send_to_handler(&self, socket: &Path) -> Result<(), LazyMemoryError> {
        let fail = |source| LazyMemoryError::Handler {
            path: socket.display().to_string(),
            source,
        };
        let stream = UnixStream::connect(socket).map_err(fail)?;
        let body = serde_json::to_vec(&self.handler_regions()).unwrap_or_default();
        let sent = stream
            .send_with_fd(&body[..], self.uffd.as_raw_fd())
            .map_err(|e| fail(std::io::Error::from_raw_os_error(e.errno())))?;
        if sent != body.len() {
            return Err(fail(std::io::Error::new(
                std::io::ErrorKind::WriteZero,
                format!("sent {sent} of the {} bytes of the regions", body.len()),
            )));
        }
        Ok(())
    }

    fn host(&self, gpa: u64, len: u64) -> Result<*mut libc::c_void, LazyMemoryError> {
        self.regions
            .iter()
            .find(|r| gpa >= r.gpa && gpa.checked_add(len).is_some_and(|e| e <= r.gpa + r.len))
            .filter(|_| gpa.is_multiple_of(PAGE) && len.is_multiple_of(PAGE) && len > 0)
            .map(|r| (r.host + (gpa - r.gpa)) as *mut libc::c_void)
            .ok_or_else(|| LazyMemoryError::Page {
                gpa,
                why: format!("{len} bytes there are not whole pages of guest RAM"),
            })
    }

    /// The guest-physical page of a host address in guest memory.
    fn gpa(&self, host: u64) -> Option<u64> {
        self.regions
            .iter()
            .find(|r| host >= r.host && host < r.host + r.len)
            .map(|r| (r.gpa + (host - r.host)) & !(PAGE - 1))
    }

    /// Puts `data` (whole pages) at `gpa` and wakes whoever waits for it. A
    /// page already there is left as it is.
    pub fn copy(&self, gpa: u64, data: &[u8]) -> Result<(), LazyMemoryError> {
        let dst = self.host(gpa, data.len() as u64)?;
        let mut done = 0usize;
        let mut retries = 0;
        while done < data.len() {
            let left = data.len() - done;
            // SAFETY: `dst..dst+len` is inside a registered region of guest
            // memory (checked by `host`), and `data` is a live slice of that
            // length; the kernel copies without aliasing either.
            let r = unsafe {
                self.uffd
                    .copy(data[done..].as_ptr().cast(), dst.add(done), left, true)
            };
            match r {
                Ok(n) => done += n.max(PAGE as usize),
                // Copied up to a page that was there already.
                Err(userfaultfd::Error::PartiallyCopied(n)) if n > 0 && n < left => done += n,
                Err(userfaultfd::Error::CopyFailed(errno)) if errno as i32 == libc::EEXIST => {
                    // Filled meanwhile: make sure nothing still waits on it.
                    // SAFETY: inside the same registered range.
                    let _ = self.uffd.wake(unsafe { dst.add(done) }, PAGE as usize);
                    done += PAGE as usize
                }
                // The mappings are changing (EAGAIN): try again.
                Err(userfaultfd::Error::PartiallyCopied(_)) if retries < 1000 => {
                    retries += 1;
                    std::thread::yield_now();
                }
                Err(e) => {
                    return Err(LazyMemoryError::Page {
                        gpa: gpa + done as u64,
                        why: format!("cannot copy it in: {e}"),
                    })
                }
            }
        }
        Ok(())
    }

    /// Fills the page at `gpa` with zeros and wakes whoever waits for it; a
    /// page already there is left as it is.
    pub fn zero(&self, gpa: u64) -> Result<(), LazyMemoryError> {
        let dst = self.host(gpa, PAGE)?;
        // SAFETY: one page inside a registered region (checked by `host`).
        match unsafe { self.uffd.zeropage(dst, PAGE as usize, true) } {
            Ok(_) => Ok(()),
            Err(userfaultfd::Error::ZeropageFailed(errno)) if errno as i32 == libc::EEXIST => {
                // Arrived meanwhile: make sure nothing still waits on it.
                let _ = self.uffd.wake(dst, PAGE as usize);
                Ok(())
            }
            Err(e) => Err(LazyMemoryError::Page {
                gpa,
                why: format!("cannot zero it: {e}"),
            }),
        }
    }

    /// Maps the shared zero page at every page of `gpa..gpa+len` still
    /// missing, and wakes whoever waits for one: reads of them then need no
    /// handler, and a write copies the zero page in the kernel, as for memory
    /// without a userfaultfd. Pages already there are left as they are.
    pub fn map_zeros(&self, gpa: u64, len: u64) -> Result<(), LazyMemoryError> {
        // 2 MiB at a time; a chunk that meets a page already there (the
        // kernel then stops without saying where) is done page by page.
        const CHUNK: u64 = 2 << 20;
        let mut at = gpa;
        while at < gpa + len {
            let n = CHUNK.min(gpa + len - at);
            let host = self.host(at, n)?;
            // SAFETY: inside a registered region (checked by `host`).
            let whole = unsafe { self.uffd.zeropage(host, n as usize, true) };
            if !matches!(whole, Ok(done) if done as u64 == n) {
                for page in (at..at + n).step_by(PAGE as usize) {
                    self.zero(page)?;
                }
            }
            at += n;
        }
        Ok(())
    }

    /// Makes the pages `gpa..gpa+len` missing again (their contents are
    /// stale): the next touch waits for them.
    pub fn drop_pages(&self, gpa: u64, len: u64) -> Result<(), LazyMemoryError> {
        let host = self.host(gpa, len)?;
        // SAFETY: the range is guest memory this process mapped (checked by
        // `host`), private and anonymous: dropping it loses nothing but the
        // stale contents the caller means to replace.
        let r = unsafe { libc::madvise(host, len as usize, libc::MADV_DONTNEED) };
        if r != 0 {
            return Err(LazyMemoryError::Page {
                gpa,
                why: format!("madvise: {}", std::io::Error::last_os_error()),
            });
        }
        Ok(())
    }

    /// Makes the pages `gpa..gpa+len` read-only to everyone (vCPUs through
    /// KVM, the VMM's threads, the kernel on their behalf): a write waits, as a
    /// [`Fault`] with `write_protected`, until [`LazyMemory::unprotect`]. Needs
    /// [`LazyMemory::register_write_protect`].
    pub fn write_protect(&self, gpa: u64, len: u64) -> Result<(), LazyMemoryError> {
        let host = self.host(gpa, len)?;
        self.uffd
            .write_protect(host, len as usize)
            .map_err(|e| LazyMemoryError::Page {
                gpa,
                why: format!("cannot write-protect it: {e}"),
            })
    }

    /// Makes the pages `gpa..gpa+len` writable again and wakes the writes
    /// waiting on them.
    pub fn unprotect(&self, gpa: u64, len: u64) -> Result<(), LazyMemoryError> {
        let host = self.host(gpa, len)?;
        self.uffd
            .remove_write_protection(host, len as usize, true)
            .map_err(|e| LazyMemoryError::Page {
                gpa,
                why: format!("cannot lift its write protection: {e}"),
            })
    }

    /// The guest-physical pages touched while missing, waiting at most
    /// `timeout` for the first; empty when none came.
    pub fn faults(&self, timeout: Duration) -> Result<Vec<u64>, LazyMemoryError> {
        Ok(self
            .fault_events(timeout, None)?
            .into_iter()
            .filter(|f| !f.write_protected)
            .map(|f| f.gpa)
            .collect())
    }

    /// The faults waiting, missing pages and writes to write-protected ones,
    /// waiting at most `timeout` for the first, or until `stop` is signalled;
    /// empty when none came.
    pub fn fault_events(
        &self,
        timeout: Duration,
        stop: Option<&EventFd>,
    ) -> Result<Vec<Fault>, LazyMemoryError> {
        let poll_in = |fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let mut fds = [
            poll_in(self.uffd.as_fd().as_raw_fd()),
            poll_in(stop.map_or(-1, |s| s.as_raw_fd())),
        ];
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: two valid pollfds (a negative fd is ignored), for the
        // duration of the call.
        if unsafe { libc::poll(fds.as_mut_ptr(), 2, ms) } <= 0 || fds[0].revents == 0 {
            return Ok(Vec::new());
        }
        let mut pages = Vec::new();
        while let Some(event) = self.uffd.read_event().map_err(LazyMemoryError::Read)? {
            if let Event::Pagefault { addr, kind, rw, .. } = event {
                if let Some(gpa) = self.gpa(addr as u64) {
                    pages.push(Fault {
                        gpa,
                        write_protected: kind == FaultKind::WriteProtected,
                        write: rw == ReadWrite::Write,
                    });
                }
            }
        }
        Ok(pages)
    }

    /// Ends filling on demand: a page still missing is from now on an
    /// ordinary page of zeros, and any fault waiting is woken.
    pub fn unregister(&self) -> Result<(), LazyMemoryError> {
        for r in &self.regions {
            self.uffd
                .unregister(r.host as *mut _, r.len as usize)
                .map_err(|source| LazyMemoryError::Register {
                    gpa: r.gpa,
                    bytes: r.len,
                    source,
                })?;
        }
        Ok(())
    }
}
