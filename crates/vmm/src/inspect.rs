//! The inspection handle of a running VM, [`VmInspect`], for capabilities that
//! look into the guest (introspection now; snapshots, migration, memory
//! compression next): guest memory, vCPU states and requests on vCPU threads, host
//! MSR writes, the MSR guard, hardware breakpoints, the dirty log, the kernel's
//! symbols. It neither pauses nor stops the VM: that is the lifecycle handle's,
//! [`crate::VmControl`]. The per-vCPU mechanics are in [`crate::vstate::inspect`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};

use kvm_ioctls::{VcpuFd, VmFd};

use crate::dirty_log::DirtyTracker;
use crate::pager::MemoryReader;
use crate::symbols::KernelSymbols;
use crate::vstate::inspect::{
    self, BreakpointHandler, MsrGuard, MsrGuardSlot, VcpuState, MAX_BREAKPOINTS,
};
use crate::vstate::threads::VcpuThreads;
use crate::{ControlError, GuestMemoryMmap};

/// The inspection handle of a running VM: cloneable, for other threads. Requests
/// to vCPUs are served on each vCPU's own thread, running or paused.
#[derive(Clone)]
pub struct VmInspect {
    pub(crate) vcpus: Arc<VcpuThreads>,
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) msr_guard: Arc<MsrGuardSlot>,
    /// For the MSR filter; gone once the VM has ended.
    pub(crate) vm_fd: Weak<VmFd>,
    /// Guest memory, with a view of the pages the pager holds.
    pub(crate) reader: MemoryReader,
    /// Guest memory is anonymous (not mapped from a snapshot's file): a page the
    /// host never backed reads as zeros.
    pub(crate) anonymous_memory: bool,
    pub(crate) dirty: DirtyTracker,
    /// The kernel's symbols, read when first needed.
    pub(crate) symbols: KernelSymbols,
}

impl VmInspect {
    /// The guest's RAM (a clone of the reference-counted mapping), to read it.
    /// Writes through it mark its dirty bitmap, so dirty-log readers see them.
    pub fn guest_memory(&self) -> GuestMemoryMmap {
        self.reader.memory().clone()
    }

    /// Guest memory to read whole (a migration's pages): pages the pager
    /// holds are read from its pool, not brought back into RAM.
    pub fn memory_reader(&self) -> MemoryReader {
        self.reader.clone()
    }

    /// Whether guest memory is anonymous (see [`crate::DirtyLog::backed`]); false
    /// for a VM loaded from a snapshot, whose memory is its file's.
    pub fn memory_is_anonymous(&self) -> bool {
        self.anonymous_memory
    }

    /// The owner of the VM's dirty log: [`DirtyTracker::subscribe`] makes a reader.
    pub fn dirty_log(&self) -> &DirtyTracker {
        &self.dirty
    }

    /// The kernel's symbols (read when first asked for).
    pub fn symbols(&self) -> &KernelSymbols {
        &self.symbols
    }

    /// Whether the VM is ending (a power-off, a crash, a stop).
    pub fn is_stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// How many vCPUs the VM has.
    pub fn vcpu_count(&self) -> usize {
        self.vcpus.count()
    }

    /// The KVM VM, while it exists (a handle may outlive it).
    fn live_vm_fd(&self) -> Result<Arc<VmFd>, ControlError> {
        self.vm_fd.upgrade().ok_or(ControlError::Stopping)
    }

    /// Runs `f` with vCPU `vcpu`'s fd on that vCPU's thread, between two `KVM_RUN`s
    /// (running or paused), and returns what it returns. Waits at most 1 s. `f` must
    /// not change the vCPU's guest debug state, which the breakpoints own.
    pub fn with_vcpu<T, F>(&self, vcpu: u32, f: F) -> Result<T, ControlError>
    where
        T: Send + 'static,
        F: FnOnce(&VcpuFd) -> T + Send + 'static,
    {
        self.vcpus.call(vcpu, move |access| f(access.fd))
    }

    /// Every vCPU's registers and [`inspect::INSPECTED_MSRS`], each read on its own
    /// thread (running or paused).
    pub fn vcpu_states(&self) -> Result<Vec<VcpuState>, ControlError> {
        self.vcpus
            .call_each(|access| inspect::read_state(access.id, access.fd))?
            .into_iter()
            .collect()
    }

    /// Writes MSR `index` of vCPU `vcpu` as the host (the MSR guard does not see it).
    pub fn write_msr(&self, vcpu: u32, index: u32, value: u64) -> Result<(), ControlError> {
        if self.vcpus.call(vcpu, move |access| {
            inspect::set_msr(access.fd, index, value)
        })? {
            Ok(())
        } else {
            Err(ControlError::MsrRefused { vcpu, index, value })
        }
    }

    /// Sends the guest's writes (not reads) of `msrs` (1 to 16) to `guard`, on
    /// every vCPU, replacing any guard before.
    pub fn guard_msrs(&self, msrs: &[u32], guard: Arc<dyn MsrGuard>) -> Result<(), ControlError> {
        self.msr_guard.install(&*self.live_vm_fd()?, msrs, guard)
    }

    /// Lets the guest write every MSR without asking a guard.
    pub fn unguard_msrs(&self) -> Result<(), ControlError> {
        self.msr_guard.remove(&*self.live_vm_fd()?)
    }

    /// Arms hardware execution breakpoints at the guest-virtual `addrs` (1 to 4,
    /// canonical) on every vCPU, replacing those before; `handler` hears of every
    /// hit. On an error some vCPUs may be armed: `clear_breakpoints` disarms them.
    pub fn set_breakpoints(
        &self,
        addrs: &[u64],
        handler: Arc<dyn BreakpointHandler>,
    ) -> Result<(), ControlError> {
        if addrs.is_empty() || addrs.len() > MAX_BREAKPOINTS {
            return Err(ControlError::BreakpointCount(addrs.len()));
        }
        // The host loads them into its own debug registers, where a non-canonical
        // address faults.
        if let Some(&bad) = addrs.iter().find(|&&a| !inspect::is_canonical(a)) {
            return Err(ControlError::BreakpointAddress(bad));
        }
        let addrs = addrs.to_vec();
        self.vcpus
            .call_each(move |access| access.breakpoints.arm(access.fd, &addrs, handler.clone()))?
            .into_iter()
            .collect()
    }

    /// Disarms the breakpoints on every vCPU: the guest runs at full speed again.
    pub fn clear_breakpoints(&self) -> Result<(), ControlError> {
        self.vcpus
            .call_each(|access| access.breakpoints.clear(access.fd))?
            .into_iter()
            .collect()
    }
}
