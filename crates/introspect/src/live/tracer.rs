//! The system call tracer: a hardware breakpoint at LSTAR on every vCPU; each
//! call decoded from the registers, filtered, kept in memory and appended to its
//! JSON-lines output.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use vigil_events::Timestamp;
use vigil_metrics::IntrospectCounters;
use vigil_vmm::vstate::inspect::BreakpointHandler;

use super::{lock, IntrospectError, Introspector, JsonLines};
use crate::{SyscallFilter, SyscallRecord, SyscallRegs};

impl Introspector {
    /// Starts tracing system calls that pass `filter`; each is kept in memory (the
    /// last [`TRACE_KEEP`]) and, with `output`, written there as a JSON line.
    pub fn start_trace(
        &self,
        filter: SyscallFilter,
        output: Option<&Path>,
    ) -> Result<(), IntrospectError> {
        let cpus = self.cpus()?;
        let lstar = cpus
            .iter()
            .find(|c| c.long_mode())
            .map(|c| c.lstar)
            .filter(|&l| l != 0)
            .ok_or(IntrospectError::NoLstar)?;
        let out = output
            .map(JsonLines::open)
            .transpose()
            .map_err(IntrospectError::TraceOutput)?;
        self.stop_trace();
        let tracer = Arc::new(Tracer {
            filter,
            entry: lstar,
            out: Mutex::new(out),
            kept: Mutex::default(),
            seq: AtomicU64::new(0),
            counters: self.shared.counters.clone(),
        });
        self.vm
            .set_breakpoints(&[lstar], tracer.clone())
            .map_err(|source| IntrospectError::Breakpoint { lstar, source })?;
        self.shared.counters.tracing.set(1);
        *lock(&self.tracer) = Some(tracer);
        Ok(())
    }

    /// Starts tracing into `output` as soon as the guest has a syscall entry
    /// (LSTAR set, early in its boot): `--trace-syscalls`.
    pub fn trace_once_ready(self: &Arc<Self>, filter: SyscallFilter, output: PathBuf) {
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("trace-start".into())
            .spawn(move || {
                vigil_seccomp::confine(vigil_seccomp::ThreadKind::Introspect);
                while !me.vm.is_stopping() {
                    let ready = me
                        .cpus()
                        .map(|cpus| cpus.iter().any(|c| c.long_mode() && c.lstar != 0))
                        .unwrap_or(false);
                    if ready {
                        if let Err(e) = me.start_trace(filter, Some(&output)) {
                            tracing::error!("--trace-syscalls: {e}");
                        }
                        return;
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
            });
        if let Err(e) = spawned {
            tracing::error!("--trace-syscalls: cannot start its thread: {e}");
        }
    }

    /// Stops tracing: the guest runs at full speed again.
    pub fn stop_trace(&self) -> bool {
        if lock(&self.tracer).take().is_none() {
            return false;
        }
        if !self.vm.is_stopping() {
            if let Err(e) = self.vm.clear_breakpoints() {
                tracing::warn!("cannot clear the tracing breakpoint: {e}");
            }
        }
        self.shared.counters.tracing.set(0);
        true
    }

    /// Traced calls with a sequence number above `since`, and whether tracing runs.
    pub fn trace(&self, since: u64) -> (Vec<TraceRecord>, bool) {
        match lock(&self.tracer).as_ref() {
            Some(t) => (t.since(since), true),
            None => (Vec::new(), false),
        }
    }
}

/// How many traced calls are kept in memory for `GET /vigil/trace`.
pub const TRACE_KEEP: usize = 65536;

/// A traced system call with its place and time.
#[derive(Clone, Debug, Serialize)]
pub struct TraceRecord {
    pub seq: u64,
    pub time_unix_ns: u64,
    #[serde(flatten)]
    pub call: SyscallRecord,
}

pub(super) struct Tracer {
    filter: SyscallFilter,
    entry: u64,
    out: Mutex<Option<JsonLines>>,
    kept: Mutex<VecDeque<TraceRecord>>,
    seq: AtomicU64,
    counters: Arc<IntrospectCounters>,
}

impl Tracer {
    fn since(&self, since: u64) -> Vec<TraceRecord> {
        lock(&self.kept)
            .iter()
            .filter(|r| r.seq > since)
            .cloned()
            .collect()
    }
}

impl BreakpointHandler for Tracer {
    fn hit(&self, vcpu: u32, regs: &kvm_bindings::kvm_regs, sregs: &kvm_bindings::kvm_sregs) {
        if regs.rip != self.entry {
            return;
        }
        self.counters.syscalls_seen.inc();
        let r = SyscallRegs {
            rax: regs.rax,
            rdi: regs.rdi,
            rsi: regs.rsi,
            rdx: regs.rdx,
            r10: regs.r10,
            r8: regs.r8,
            r9: regs.r9,
            rcx: regs.rcx,
            cr3: sregs.cr3,
        };
        if !self.filter.matches(&r) {
            return;
        }
        self.counters.syscalls_traced.inc();
        let record = TraceRecord {
            seq: self.seq.fetch_add(1, Ordering::Relaxed) + 1,
            time_unix_ns: Timestamp::now().unix_ns(),
            call: SyscallRecord::decode(vcpu, &r),
        };
        if let Some(out) = lock(&self.out).as_mut() {
            out.append(&record);
        }
        let mut kept = lock(&self.kept);
        if kept.len() == TRACE_KEEP {
            kept.pop_front();
        }
        kept.push_back(record);
    }
}
