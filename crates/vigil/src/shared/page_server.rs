//! A page-fault handler for snapshots loaded with the `Uffd` backend, written
//! to Firecracker's protocol as a handler made for Firecracker is (so one
//! handler serves both VMMs in `vigil bench snapshot`, and the tests check
//! Vigil against the protocol, not against itself): it listens on a Unix
//! socket, receives the regions as JSON with the userfaultfd beside them
//! (SCM_RIGHTS), and copies each page in from the memory file when first
//! touched.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use anyhow::{bail, Context};
use serde::Deserialize;
use userfaultfd::{Event, Uffd};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Firecracker's `GuestRegionUffdMapping`, the fields a handler reads.
#[derive(Deserialize)]
struct Region {
    base_host_virt_addr: u64,
    size: u64,
    offset: u64,
    page_size: u64,
}

const PAGE: u64 = 4096;

/// A page-fault handler for the `Uffd` backend, to Firecracker's protocol: it
/// listens on a Unix socket, receives the regions as JSON with the userfaultfd
/// beside them (SCM_RIGHTS), and copies each page in from the memory file
/// (read into memory beforehand) when first touched.
pub struct PageServer {
    served: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: JoinHandle<anyhow::Result<()>>,
}

impl PageServer {
    /// Listens on `socket`, serving pages from `memory` (a snapshot's memory
    /// file, read now) to the one VMM that connects.
    pub fn listen(socket: &Path, memory: &Path) -> anyhow::Result<PageServer> {
        let listener = UnixListener::bind(socket)
            .with_context(|| format!("cannot listen on {}", socket.display()))?;
        let memory =
            std::fs::read(memory).with_context(|| format!("cannot read {}", memory.display()))?;
        let served = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (count, halt) = (served.clone(), stop.clone());
        let thread = std::thread::spawn(move || serve(&listener, &memory, &count, &halt));
        Ok(PageServer {
            served,
            stop,
            thread,
        })
    }

    /// Pages copied in so far.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }

    /// Stops serving; says what went wrong, if anything did.
    pub fn finish(self) -> anyhow::Result<()> {
        self.stop.store(true, Ordering::Release);
        match self.thread.join() {
            Ok(result) => result.context("the page-fault handler"),
            Err(_) => bail!("the page-fault handler panicked"),
        }
    }
}

/// Waits up to 50 ms for `fd` to be readable.
fn readable(fd: i32) -> bool {
    let mut fds = [libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }];
    // SAFETY: one valid pollfd for the call's duration.
    unsafe { libc::poll(fds.as_mut_ptr(), 1, 50) > 0 }
}

fn serve(
    listener: &UnixListener,
    memory: &[u8],
    served: &AtomicU64,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    while !readable(listener.as_raw_fd()) {
        if stop.load(Ordering::Acquire) {
            return Ok(());
        }
    }
    let (stream, _) = listener.accept()?;
    let mut message = vec![0u8; 64 << 10];
    let (len, file) = stream.recv_with_fd(&mut message)?;
    let file: File = file.context("no userfaultfd beside the regions")?;
    let regions: Vec<Region> = serde_json::from_slice(&message[..len])
        .with_context(|| format!("regions: {}", String::from_utf8_lossy(&message[..len])))?;
    for r in &regions {
        if r.page_size != PAGE || r.offset + r.size > memory.len() as u64 {
            bail!(
                "region at {:#x}: page size {} or {} bytes from offset {} do not fit a {}-byte memory file",
                r.base_host_virt_addr,
                r.page_size,
                r.size,
                r.offset,
                memory.len()
            );
        }
    }
    // SAFETY: the descriptor was just received and is owned by nobody else.
    let uffd = unsafe { Uffd::from_raw_fd(file.into_raw_fd()) };
    while !stop.load(Ordering::Acquire) {
        if !readable(uffd.as_raw_fd()) {
            continue;
        }
        // Other events (a balloon's removals) need nothing here.
        let Some(Event::Pagefault { addr, .. }) = uffd.read_event()? else {
            continue;
        };
        let page = addr as u64 & !(PAGE - 1);
        let region = regions
            .iter()
            .find(|r| page >= r.base_host_virt_addr && page < r.base_host_virt_addr + r.size)
            .with_context(|| format!("a fault at {page:#x}, outside the regions"))?;
        let at = (region.offset + page - region.base_host_virt_addr) as usize;
        // SAFETY: the source is PAGE bytes of `memory` (the regions fit it,
        // checked above); the destination is a page of a registered region.
        let copied = unsafe {
            uffd.copy(
                memory[at..at + PAGE as usize].as_ptr().cast(),
                page as *mut _,
                PAGE as usize,
                true,
            )
        };
        match copied {
            Ok(_) => {
                served.fetch_add(1, Ordering::Relaxed);
            }
            // Already there: another thread's fault on the same page won.
            Err(userfaultfd::Error::CopyFailed(errno)) if errno as i32 == libc::EEXIST => {}
            Err(e) => bail!("copying page {page:#x}: {e}"),
        }
    }
    Ok(())
}
