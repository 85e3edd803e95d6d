//! Why a request to the live introspection of a VM failed.

use std::path::PathBuf;

use vigil_vmm::{ControlError, DirtyLogError};

use crate::{BaselineError, LayoutError, WalkError};

/// A file that records are appended to could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct FileError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

/// Why the monitor, the tracer or a debug write could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum IntrospectError {
    /// Reading the vCPUs (or a host MSR write) failed.
    #[error(transparent)]
    Vm(ControlError),
    #[error("no kernel symbols: give a System.map (vigil run --symbols, or PUT /vigil/introspect/symbols), or boot an ELF kernel that has a symbol table")]
    NoSymbols,
    #[error("the monitor runs with the symbols it started with: stop it (DELETE /vigil/introspect) first")]
    SymbolsInUse,
    #[error("cannot guard the syscall MSRs: {0}")]
    Guard(ControlError),
    #[error("cannot start the monitor thread: {0}")]
    Thread(std::io::Error),
    #[error("the monitor is not running (PUT /vigil/introspect starts it)")]
    NotMonitoring,
    #[error("the monitor thread ended")]
    MonitorEnded,
    #[error("the monitor did not answer within 30 s")]
    MonitorTimeout,
    #[error("the introspection monitor carried by the snapshot or migration: {0}")]
    Carried(String),
    #[error("the baseline is not taken yet")]
    NoBaselineYet,
    #[error("no vCPU is in long mode yet: nothing to baseline")]
    NoLongMode,
    #[error("vCPU {0} has not set up its system call entry yet (EFER.SCE, LSTAR, SFMASK)")]
    NoSyscallEntry(u32),
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error(transparent)]
    Baseline(#[from] BaselineError),
    #[error(transparent)]
    DirtyLog(#[from] DirtyLogError),
    #[error("the guest has no syscall entry yet (LSTAR is 0)")]
    NoLstar,
    #[error("cannot set the tracing breakpoints ({entries}): {source}")]
    Breakpoint {
        entries: String,
        source: ControlError,
    },
    #[error("output {0}")]
    TraceOutput(FileError),
    #[error(transparent)]
    FindingsOutput(FileError),
    #[error("vcpu {vcpu}: the VM has {count} vCPUs")]
    NoVcpu { vcpu: u32, count: usize },
    #[error("address {address:#x}: {source}")]
    Unmapped { address: u64, source: WalkError },
    #[error("address {address:#x} (+{len} bytes): outside guest RAM")]
    OutsideRam { address: u64, len: usize },
}
