//! Snapshots: a paused VM's state into one file and its memory into another,
//! and a VM built back from the two ([`crate::builder::restore`]).
//!
//! The state ([`VmState`]) is the KVM VM's (irqchip, PIT, clock) and every
//! vCPU's (registers, XSAVE, local APIC, MSRs, pending events, CPUID, TSC
//! frequency), the legacy devices' and every virtio transport's with its device
//! (through `vigil_devices::persist`). The file format is in [`file`].
//!
//! Guest memory is saved whole ([`MemoryKind::Full`]) or as a diff
//! ([`MemoryKind::Diff`]): the pages written since the VM's previous snapshot,
//! Full or Diff, or since it started or was restored. The snapshot code has its
//! own [`DirtyReader`], subscribed when the VM starts, and takes from it at every
//! snapshot; pages taken by a snapshot that then failed are kept for the next.
//! A booted VM's first diff has nothing to differ from: it holds every page and
//! is written as, and marked, a full one.
//!
//! Layers above the VMM keep their own state of the VM in the snapshot,
//! opaque here ([`VmState::extensions`]): each registers a [`StateExtension`]
//! on the running VM, asked at every capture (snapshot and migration) with the
//! vCPUs paused, and reads its entry back from the VM built from the state.

pub mod file;
pub mod packed;
pub mod state;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use kvm_ioctls::{Kvm, VmFd};
use vigil_devices::legacy::{Serial, I8042};
use vigil_devices::persist::Persist;
use vigil_devices::virtio::mmio::MmioTransport;
use vigil_devices::virtio::pci::VirtioPci;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

use crate::dirty_log::{DirtyLog, DirtyReader};
use crate::pager::MemoryReader;
use crate::vstate::persist::{self, KvmStateError};
use crate::{ControlError, GuestMemoryMmap};
pub use file::{FileError, Header, FORMAT_VERSION};
pub use state::{check_memory, MemoryKind, MemoryRange, PageBits, SavedMachine, VmState};

/// Why a snapshot could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("the VM is running: pause it first (PATCH /vm {{\"state\": \"Paused\"}})")]
    NotPaused,
    #[error("{0}: guest memory is mapped from this file (the VM was restored from it); write the memory elsewhere")]
    MemoryIsSource(PathBuf),
    #[error(
        "a diff snapshot needs the dirty log, which is not available: {0}; take a Full snapshot"
    )]
    NoDirtyLog(String),
    #[error("the {name:?} state cannot be captured: {message}")]
    Extension { name: String, message: String },
    #[error(transparent)]
    Control(#[from] ControlError),
    #[error(transparent)]
    Kvm(#[from] KvmStateError),
    #[error(transparent)]
    File(#[from] FileError),
}

/// What a snapshot took.
#[derive(Clone, Copy, Debug)]
pub struct SnapshotInfo {
    pub state_bytes: u64,
    /// Guest RAM in bytes (the memory file's size).
    pub memory_bytes: u64,
    /// Bytes of it written (the rest are holes: pages of zeros in a full
    /// memory file, pages not written since the previous snapshot in a diff).
    pub memory_written: u64,
    /// Pages the pager held, kept compressed after the RAM image, and their
    /// bytes there.
    pub memory_packed_pages: u64,
    pub memory_packed_bytes: u64,
    /// What the memory file holds (a booted VM's first diff is a full one).
    pub memory_kind: MemoryKind,
    pub took: Duration,
}

/// A layer's own state of a running VM for [`VmState::extensions`], asked at
/// every capture with the vCPUs paused: `Ok(None)` when it has nothing to
/// keep now, `Err` (why) to make the snapshot or migration fail.
pub type StateExtension = Arc<dyn Fn() -> Result<Option<serde_json::Value>, String> + Send + Sync>;

/// What a running VM keeps so that it can be saved.
pub(crate) struct SnapshotSources {
    pub(crate) machine: SavedMachine,
    pub(crate) vm_fd: Weak<VmFd>,
    /// Guest memory, held pages read from the pager's pool.
    pub(crate) reader: MemoryReader,
    pub(crate) serial: Arc<Mutex<Serial>>,
    pub(crate) i8042: Arc<Mutex<I8042>>,
    pub(crate) transports: Vec<Arc<Mutex<MmioTransport>>>,
    /// With PCI, the virtio-pci functions, one per transport.
    pub(crate) pci_functions: Vec<Arc<Mutex<VirtioPci>>>,
    /// The file guest memory is privately mapped from, after a restore.
    pub(crate) memory_file: Option<PathBuf>,
    pub(crate) written: WrittenSince,
    /// The providers of [`VmState::extensions`], by name.
    pub(crate) extensions: Mutex<BTreeMap<String, StateExtension>>,
}

/// The guest pages written since the VM's previous snapshot.
pub(crate) struct WrittenSince {
    /// The snapshots' own reader, or why there is none.
    reader: Result<DirtyReader, String>,
    /// Pages taken from it by snapshots that failed, for the next one.
    unsaved: Mutex<Option<DirtyLog>>,
}

impl WrittenSince {
    /// Pages written from now on, through `reader` (subscribed by the caller,
    /// whose first take counts every page). A VM restored from a memory file
    /// starts from that file: nothing is written yet, so the first take is
    /// dropped.
    pub(crate) fn new(reader: Result<DirtyReader, String>, restored: bool) -> Self {
        if let (Ok(reader), true) = (&reader, restored) {
            if let Err(e) = reader.take() {
                tracing::warn!("the dirty log cannot be read; the first diff snapshot will hold every page: {e}");
            }
        }
        Self {
            reader,
            unsaved: Mutex::new(None),
        }
    }

    /// The pages written since the previous snapshot, to be saved now: on an
    /// error from the dirty log, `Err` with the pages taken so far still kept.
    fn take(&self) -> Result<DirtyLog, String> {
        let reader = self.reader.as_ref().map_err(Clone::clone)?;
        let mut unsaved = lock(&self.unsaved);
        let new = reader.take().map_err(|e| e.to_string())?;
        Ok(match unsaved.take() {
            Some(mut pages) => {
                pages.merge(&new);
                pages
            }
            None => new,
        })
    }

    /// Keeps `pages`, taken by a snapshot that failed, for the next one.
    fn keep(&self, pages: DirtyLog) {
        let mut unsaved = lock(&self.unsaved);
        match unsaved.as_mut() {
            Some(kept) => kept.merge(&pages),
            None => *unsaved = Some(pages),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The guest RAM ranges of `mem`, in order.
pub fn memory_ranges(mem: &GuestMemoryMmap) -> Vec<MemoryRange> {
    mem.iter()
        .map(|r| MemoryRange {
            guest_address: r.start_addr().raw_value(),
            bytes: r.len(),
        })
        .collect()
}

fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

impl SnapshotSources {
    /// Captures the paused VM's state, and with its devices still held (none
    /// can write guest memory meanwhile) runs `with_memory`, which saves or
    /// sends guest memory and may complete the state: state and memory are of
    /// the same instant.
    pub(crate) fn capture<T>(
        &self,
        vcpus: &crate::vstate::threads::VcpuThreads,
        with_memory: impl FnOnce(&MemoryReader, &mut VmState) -> Result<T, SnapshotError>,
    ) -> Result<(VmState, T), SnapshotError> {
        let vm_fd = self.vm_fd.upgrade().ok_or(ControlError::Stopping)?;
        persist::check_xsave_size(&vm_fd)?;
        let msr_list = Kvm::new()
            .and_then(|kvm| kvm.get_msr_index_list())
            .map_err(|source| KvmStateError::Kvm {
                what: "list the MSRs to save",
                source,
            })?;
        let msrs: Arc<[u32]> = msr_list.as_slice().into();
        let vcpus = vcpus
            .call_each(move |access| persist::save_vcpu(access.id, access.fd, &msrs))?
            .into_iter()
            .collect::<Result<Vec<_>, _>>()?;
        let extensions = self.capture_extensions()?;
        // The device event loop may be in the middle of a request: holding every
        // transport keeps it out of the queues and guest memory until both taken.
        // An asynchronous disk's requests in flight complete first, so that the
        // queues and guest memory hold their results.
        let mut transports: Vec<_> = self.transports.iter().map(|t| lock(t)).collect();
        transports.iter_mut().for_each(|t| t.quiesce());
        let virtio = transports.iter().map(|t| t.state()).collect();
        let pci = self.pci_functions.iter().map(|f| lock(f).save()).collect();
        let mut state = VmState {
            vigil_version: env!("CARGO_PKG_VERSION").into(),
            machine: self.machine.clone(),
            memory: memory_ranges(self.reader.memory()),
            memory_kind: MemoryKind::Full,
            memory_held: self.reader.held(),
            memory_packed: 0,
            kvm: persist::save_vm(&vm_fd)?,
            vcpus,
            serial: lock(&self.serial).save(),
            i8042: lock(&self.i8042).save(),
            virtio,
            pci,
            extensions,
        };
        let memory = with_memory(&self.reader, &mut state)?;
        drop(transports);
        Ok((state, memory))
    }

    /// Every provider's entry, asked outside the providers' lock (one may take
    /// a while: introspection asks its monitor's thread).
    fn capture_extensions(&self) -> Result<BTreeMap<String, serde_json::Value>, SnapshotError> {
        let providers: Vec<_> = lock(&self.extensions)
            .iter()
            .map(|(name, p)| (name.clone(), p.clone()))
            .collect();
        let mut out = BTreeMap::new();
        for (name, provider) in providers {
            match provider() {
                Ok(Some(value)) => {
                    out.insert(name, value);
                }
                Ok(None) => {}
                Err(message) => return Err(SnapshotError::Extension { name, message }),
            }
        }
        Ok(out)
    }

    /// Saves the VM (paused by the caller, whose vCPU threads run `call_each`)
    /// to `state_path` and `mem_path`, its memory whole or as a diff (`kind`).
    pub(crate) fn save(
        &self,
        vcpus: &crate::vstate::threads::VcpuThreads,
        state_path: &Path,
        mem_path: &Path,
        kind: MemoryKind,
    ) -> Result<SnapshotInfo, SnapshotError> {
        let start = Instant::now();
        if let Some(source) = &self.memory_file {
            if same_file(source, mem_path) {
                return Err(SnapshotError::MemoryIsSource(mem_path.to_owned()));
            }
        }
        let (state, (written, memory_written)) = self.capture(vcpus, |mem, state| {
            // Taken with the vCPUs paused and the devices held: nothing writes
            // guest memory until it is saved.
            let written = match (self.written.take(), kind) {
                (Ok(pages), _) => pages,
                (Err(why), MemoryKind::Diff) => return Err(SnapshotError::NoDirtyLog(why)),
                // A full snapshot does not need the log, but the next diff cannot
                // know what this one saved: it will hold every page.
                (Err(_), MemoryKind::Full) => DirtyLog::all(mem.memory()),
            };
            state.memory_kind = match kind {
                MemoryKind::Diff if !written.is_all() => MemoryKind::Diff,
                _ => MemoryKind::Full,
            };
            let pages = match kind {
                MemoryKind::Full => file::Pages::NonZero,
                MemoryKind::Diff => file::Pages::Dirty(&written),
            };
            match file::write_memory(mem_path, mem, pages) {
                Ok(n) => {
                    state.memory_packed = n.packed_pages;
                    Ok((written, n))
                }
                Err(e) => {
                    self.written.keep(written);
                    Err(e.into())
                }
            }
        })?;
        if let Err(e) = file::write_state(state_path, &state) {
            self.written.keep(written);
            return Err(e.into());
        }
        let state_bytes = std::fs::metadata(state_path).map_or(0, |m| m.len());
        Ok(SnapshotInfo {
            state_bytes,
            memory_bytes: state.memory.iter().map(|r| r.bytes).sum(),
            memory_written: memory_written.data,
            memory_packed_pages: memory_written.packed_pages,
            memory_packed_bytes: memory_written.packed_bytes,
            memory_kind: state.memory_kind,
            took: start.elapsed(),
        })
    }
}
