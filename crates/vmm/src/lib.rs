//! The life of one Vigil VM.
//!
//! Data flows one way: a [`vigil_model::config::VmConfig`] (validated once) goes to
//! [`builder::build`], which returns a [`Vm`]; [`Vm::start`] spawns one thread per
//! vCPU and a device event loop and returns a [`RunningVm`], whose
//! [`RunningVm::wait`] returns how the VM ended.
//!
//! A [`RunningVm`] hands out two cloneable handles for other threads:
//! [`VmControl`], the lifecycle (pause, resume, stop, devices, metrics), for the API
//! and the binary; and [`VmInspect`], for capabilities that look into the guest:
//! guest memory, register and MSR snapshots ([`VcpuState`]) and requests served on
//! each vCPU's own thread, guarded MSR writes ([`MsrGuard`]), hardware breakpoints
//! ([`BreakpointHandler`]), and the dirty log ([`DirtyTracker`]: one owner, a
//! [`DirtyReader`] per user, the guest's writes and the VMM's own).

pub mod arch;
pub mod builder;
mod control;
mod device_manager;
pub mod dirty_log;
mod inspect;
pub mod lazy_memory;
pub mod pager;
mod pci;
pub mod rt;
pub mod snapshot;
pub mod symbols;
mod vm;
pub mod vstate;

pub use control::{
    BalloonHandle, ControlError, DriveHandle, NetHandle, RunState, StopHandle, VmControl,
};
pub use dirty_log::{DirtyLog, DirtyLogError, DirtyReader, DirtyTracker};
pub use inspect::VmInspect;
pub use vigil_devices::rate_limiter::{BucketUpdate, LimitUpdate};
pub use vigil_devices::GuestMemoryMmap;
pub use vigil_metrics::{MetricsHandle, VmMetricsSnapshot};
pub use vm::{MemoryOrigin, RunningVm, Vm, VmOutcome};
pub use vstate::inspect::{
    BreakpointHandler, MsrGuard, MsrVerdict, VcpuState, INSPECTED_MSRS, MAX_BREAKPOINTS,
    MAX_GUARDED_MSRS, MSR_CSTAR, MSR_LSTAR, MSR_SFMASK, MSR_STAR, MSR_SYSENTER_CS,
    MSR_SYSENTER_EIP, MSR_SYSENTER_ESP,
};

use vigil_devices::PowerEvent;
use vstate::vcpu::CrashReport;

/// CPU time of the calling thread, ns (the pager's accounting, the device
/// loop's check that it had its CPU while it polled).
pub(crate) fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Something that ends a VM, sent to the thread waiting on it.
#[derive(Debug)]
pub enum VmEvent {
    /// A device asked to power off, reset or exit.
    Power(PowerEvent),
    /// A vCPU crashed.
    Crash(Box<CrashReport>),
    /// A vCPU crashed and the VM is kept, paused, for inspection
    /// ([`config::OnCrash::Pause`]); it ends when stopped.
    CrashKept(Box<CrashReport>),
    /// A vCPU could not go on for a reason that is the VMM's, not the guest's.
    VcpuFailed {
        /// The vCPU's index.
        vcpu: u32,
        /// What went wrong.
        error: String,
    },
    /// The VMM was asked to stop (by a signal, or by an API later).
    Stop(i32),
    /// The VM cannot go on, for a reason outside it (its memory is lost).
    Failed(String),
    /// The VM migrated: it runs at this destination now.
    Migrated(String),
}
