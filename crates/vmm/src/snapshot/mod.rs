//! Snapshots: a paused VM's state into one file and its memory into another,
//! and a VM built back from the two ([`crate::builder::restore`]).
//!
//! The state ([`VmState`]) is the KVM VM's (irqchip, PIT, clock) and every
//! vCPU's (registers, XSAVE, local APIC, MSRs, pending events, CPUID, TSC
//! frequency), the legacy devices' and every virtio transport's with its device
//! (through `vigil_devices::persist`). The file format is in [`file`].

pub mod file;
pub mod state;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use kvm_ioctls::{Kvm, VmFd};
use vigil_devices::legacy::{Serial, I8042};
use vigil_devices::persist::Persist;
use vigil_devices::virtio::mmio::MmioTransport;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

use crate::vstate::persist::{self, KvmStateError};
use crate::{ControlError, GuestMemoryMmap};
pub use file::{FileError, Header, FORMAT_VERSION};
pub use state::{MemoryRange, SavedMachine, VmState};

/// Why a snapshot could not be taken.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("the VM is running: pause it first (PATCH /vm {{\"state\": \"Paused\"}})")]
    NotPaused,
    #[error("{0}: guest memory is mapped from this file (the VM was restored from it); write the memory elsewhere")]
    MemoryIsSource(PathBuf),
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
    /// Bytes of it written (the rest were pages of zeros, left as holes).
    pub memory_written: u64,
    pub took: Duration,
}

/// What a running VM keeps so that it can be saved.
pub(crate) struct SnapshotSources {
    pub(crate) machine: SavedMachine,
    pub(crate) vm_fd: Weak<VmFd>,
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) serial: Arc<Mutex<Serial>>,
    pub(crate) i8042: Arc<Mutex<I8042>>,
    pub(crate) transports: Vec<Arc<Mutex<MmioTransport>>>,
    /// The file guest memory is privately mapped from, after a restore.
    pub(crate) memory_file: Option<PathBuf>,
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
    /// sends guest memory: state and memory are of the same instant.
    pub(crate) fn capture<T>(
        &self,
        vcpus: &crate::vstate::threads::VcpuThreads,
        with_memory: impl FnOnce(&GuestMemoryMmap) -> Result<T, SnapshotError>,
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
        // The device event loop may be in the middle of a request: holding every
        // transport keeps it out of the queues and guest memory until both taken.
        let transports: Vec<_> = self.transports.iter().map(|t| lock(t)).collect();
        let virtio = transports.iter().map(|t| t.state()).collect();
        let state = VmState {
            vigil_version: env!("CARGO_PKG_VERSION").into(),
            machine: self.machine.clone(),
            memory: memory_ranges(&self.mem),
            kvm: persist::save_vm(&vm_fd)?,
            vcpus,
            serial: lock(&self.serial).save(),
            i8042: lock(&self.i8042).save(),
            virtio,
        };
        let memory = with_memory(&self.mem)?;
        drop(transports);
        Ok((state, memory))
    }

    /// Saves the VM (paused by the caller, whose vCPU threads run `call_each`)
    /// to `state_path` and `mem_path`.
    pub(crate) fn save(
        &self,
        vcpus: &crate::vstate::threads::VcpuThreads,
        state_path: &Path,
        mem_path: &Path,
    ) -> Result<SnapshotInfo, SnapshotError> {
        let start = Instant::now();
        if let Some(source) = &self.memory_file {
            if same_file(source, mem_path) {
                return Err(SnapshotError::MemoryIsSource(mem_path.to_owned()));
            }
        }
        let (state, memory_written) =
            self.capture(vcpus, |mem| Ok(file::write_memory(mem_path, mem)?))?;
        file::write_state(state_path, &state)?;
        let state_bytes = std::fs::metadata(state_path).map_or(0, |m| m.len());
        Ok(SnapshotInfo {
            state_bytes,
            memory_bytes: state.memory.iter().map(|r| r.bytes).sum(),
            memory_written,
            took: start.elapsed(),
        })
    }
}
