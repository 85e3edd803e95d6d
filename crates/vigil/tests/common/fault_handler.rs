//! A page-fault handler for snapshots loaded with the `Uffd` backend, written
//! to Firecracker's protocol as a handler made for Firecracker is: it listens
//! on a Unix socket, receives the regions as JSON with the userfaultfd beside
//! them, and copies in each page from the memory file when first touched. It
//! counts the pages it served.

use std::fs::File;
use std::os::fd::{FromRawFd, IntoRawFd};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use serde::Deserialize;
use userfaultfd::{Event, Uffd};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

const PAGE: usize = 4096;

/// Firecracker's `GuestRegionUffdMapping`, the fields a handler reads.
#[derive(Deserialize)]
struct Region {
    base_host_virt_addr: u64,
    size: u64,
    offset: u64,
    page_size: u64,
}

pub struct FaultHandler {
    served: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FaultHandler {
    /// Listens on `socket`, serving pages from `memory` (a snapshot's memory
    /// file) to the one VMM that connects.
    pub fn serve(socket: &Path, memory: &Path) -> Self {
        let listener = UnixListener::bind(socket).unwrap();
        let memory = std::fs::read(memory).unwrap();
        let served = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (count, halt) = (served.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut message = vec![0u8; 4096];
            let (len, file) = stream.recv_with_fd(&mut message).unwrap();
            let file: File = file.expect("the userfaultfd beside the regions");
            let regions: Vec<Region> = serde_json::from_slice(&message[..len]).unwrap();
            assert!(regions.iter().all(|r| r.page_size == PAGE as u64));
            // SAFETY: the descriptor was just received and is owned by nobody else.
            let uffd = unsafe { Uffd::from_raw_fd(file.into_raw_fd()) };
            while !halt.load(Ordering::Acquire) {
                let mut fds = [libc::pollfd {
                    fd: std::os::fd::AsRawFd::as_raw_fd(&uffd),
                    events: libc::POLLIN,
                    revents: 0,
                }];
                // SAFETY: one valid pollfd for the call's duration.
                if unsafe { libc::poll(fds.as_mut_ptr(), 1, 50) } <= 0 {
                    continue;
                }
                let Ok(Some(event)) = uffd.read_event() else {
                    continue;
                };
                let Event::Pagefault { addr, .. } = event else {
                    continue;
                };
                let page = addr as u64 & !(PAGE as u64 - 1);
                let r = regions
                    .iter()
                    .find(|r| {
                        page >= r.base_host_virt_addr && page < r.base_host_virt_addr + r.size
                    })
                    .expect("a fault inside the regions");
                let at = (r.offset + page - r.base_host_virt_addr) as usize;
                // SAFETY: the source is PAGE bytes of `memory`; the destination
                // is a page of the registered regions.
                let copied = unsafe {
                    uffd.copy(
                        memory[at..at + PAGE].as_ptr().cast(),
                        page as *mut _,
                        PAGE,
                        true,
                    )
                };
                if copied.is_ok() {
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        Self {
            served,
            stop,
            thread: Some(thread),
        }
    }

    /// Pages copied in so far.
    pub fn served(&self) -> u64 {
        self.served.load(Ordering::Relaxed)
    }
}

impl Drop for FaultHandler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
