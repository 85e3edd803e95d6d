//! Introspection of a running VM: the integrity monitor's thread, the MSR guard
//! and the system call tracer, on top of the inspection handle the VMM lends
//! ([`VmInspect`]). This is the only part of the crate with threads; what it
//! runs (baseline, checks, decoding) is the plain library code beside it.
//!
//! The parts: `monitor` (the integrity monitor's thread: baseline, periodic
//! checks), `guard` (the MSR guard and its policy), `findings` (the findings
//! log: numbered, rate-limited in the log, kept, written out), `tracer` (the
//! system call tracer and its JSON lines), `debug` (the debug API's writes
//! into the guest), `saved` (the monitor carried by a snapshot or a
//! migration) and `error` (why a request failed). [`Introspector`] here is the one place that holds the VM's
//! handle; each part adds its methods to it.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::Serialize;
use vigil_metrics::IntrospectCounters;
use vigil_vmm::vstate::inspect::{
    VcpuState, MSR_CSTAR, MSR_LSTAR, MSR_SFMASK, MSR_STAR, MSR_SYSENTER_CS, MSR_SYSENTER_EIP,
    MSR_SYSENTER_ESP,
};
use vigil_vmm::{GuestMemoryMmap, VmInspect};

use crate::view::GuestView;
use crate::{Baseline, CpuState, SymbolTable, TableRegister};

mod debug;
mod error;
mod findings;
mod guard;
mod monitor;
mod saved;
mod tracer;

pub use error::{FileError, IntrospectError};
pub use findings::FINDINGS_KEEP;
pub use monitor::{Located, MonitorSettings};
pub use saved::{CarriedBaseline, MonitorState, STATE_EXTENSION};
pub use tracer::{TraceRecord, TRACE_KEEP};
use vigil_model::config::Policy;
pub use vigil_model::finding::FindingRecord;

use findings::FindingLog;
use monitor::{Command, MonitorThread};
use tracer::Tracer;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Past this size a JSON-lines file is moved to `PATH.1` (replacing the one
/// there) and started afresh: a guest making system calls or findings without end
/// cannot fill the host's disk; at most twice this is kept.
pub const MAX_JSON_LINES_BYTES: u64 = 64 << 20;

/// A file that records are appended to as JSON lines, each written (not buffered)
/// as it comes: the findings and traced calls a user tails (`tail -F` follows the
/// rotation).
struct JsonLines {
    path: PathBuf,
    file: std::fs::File,
    written: u64,
    limit: u64,
}

impl JsonLines {
    fn open(path: &Path) -> Result<Self, FileError> {
        Self::open_with_limit(path, MAX_JSON_LINES_BYTES)
    }

    fn open_with_limit(path: &Path, limit: u64) -> Result<Self, FileError> {
        let file = Self::open_file(path)?;
        let written = file.metadata().map(|m| m.len()).unwrap_or(0);
        Ok(Self {
            path: path.to_owned(),
            file,
            written,
            limit,
        })
    }

    fn open_file(path: &Path) -> Result<std::fs::File, FileError> {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| FileError {
                path: path.to_owned(),
                source,
            })
    }

    fn append(&mut self, record: &impl Serialize) {
        let mut line = serde_json::to_vec(record).unwrap_or_default();
        line.push(b'\n');
        if self.written > 0 && self.written + line.len() as u64 > self.limit {
            self.rotate();
        }
        match self.file.write_all(&line) {
            Ok(()) => self.written += line.len() as u64,
            Err(e) => tracing::warn!("{}: {e}", self.path.display()),
        }
    }

    /// `PATH` becomes `PATH.1`, and a new `PATH` is started; on failure the
    /// records go on into the file as it is.
    fn rotate(&mut self) {
        let mut old = self.path.clone().into_os_string();
        old.push(".1");
        let moved = std::fs::rename(&self.path, &old)
            .map_err(|e| e.to_string())
            .and_then(|()| Self::open_file(&self.path).map_err(|e| e.to_string()));
        match moved {
            Ok(file) => {
                tracing::info!(
                    "{}: {} bytes, moved to {}",
                    self.path.display(),
                    self.written,
                    Path::new(&old).display()
                );
                self.file = file;
                self.written = 0;
            }
            Err(e) => tracing::warn!("{}: cannot rotate: {e}", self.path.display()),
        }
    }
}

/// What the monitor thread, the MSR guard and the API share.
struct Shared {
    counters: Arc<IntrospectCounters>,
    findings: Mutex<FindingLog>,
    baseline: Mutex<Option<Arc<Baseline>>>,
    /// The boot vCPU's syscall MSRs at baseline, when it had set them up: what
    /// the MSR guard holds every vCPU's writes to (none: writes are free).
    boot_msrs: Mutex<Option<CpuState>>,
    policy: Mutex<Policy>,
    symbols: Mutex<Option<Arc<SymbolTable>>>,
    /// (vCPU, MSR, value) the guard already reported.
    msr_reported: Mutex<HashSet<(u32, u32, u64)>>,
    /// The monitor thread, to check at once on an event.
    monitor_tx: Mutex<Option<Sender<Command>>>,
    /// Where each finding is also appended as a JSON line, as it is found: a
    /// record that outlives the VMM (`vigil run --findings-path`).
    findings_out: Mutex<Option<JsonLines>>,
}

impl Shared {
    fn describe(&self, addr: u64) -> Option<String> {
        lock(&self.symbols).as_ref()?.describe(addr)
    }
}

/// The registers introspection looks at, from what the VMM read.
pub fn cpu_state(s: &VcpuState) -> CpuState {
    let msr = |i| s.msr(i).unwrap_or(0);
    CpuState {
        vcpu: s.id,
        cr0: s.sregs.cr0,
        cr3: s.sregs.cr3,
        cr4: s.sregs.cr4,
        efer: s.sregs.efer,
        idt: TableRegister {
            base: s.sregs.idt.base,
            limit: s.sregs.idt.limit,
        },
        gdt: TableRegister {
            base: s.sregs.gdt.base,
            limit: s.sregs.gdt.limit,
        },
        lstar: msr(MSR_LSTAR),
        star: msr(MSR_STAR),
        cstar: msr(MSR_CSTAR),
        sfmask: msr(MSR_SFMASK),
        sysenter_cs: msr(MSR_SYSENTER_CS),
        sysenter_esp: msr(MSR_SYSENTER_ESP),
        sysenter_eip: msr(MSR_SYSENTER_EIP),
    }
}

/// Introspection of one VM. Cheap to share (`Arc`); the API and the launch code
/// hold it.
pub struct Introspector {
    vm: VmInspect,
    mem: GuestMemoryMmap,
    shared: Arc<Shared>,
    monitor: Mutex<Option<MonitorThread>>,
    tracer: Mutex<Option<Arc<Tracer>>>,
    located: Mutex<Option<Located>>,
}

/// What `GET /vigil/introspect` says.
#[derive(Clone, Debug, Serialize)]
pub struct Status {
    pub monitoring: bool,
    pub settings: Option<MonitorSettings>,
    pub baseline_taken: bool,
    pub symbols: usize,
    pub kaslr_slide: Option<i64>,
    pub kaslr_slide_from: Option<String>,
    pub checks: u64,
    pub findings: u64,
    pub tracing: bool,
}

impl Introspector {
    /// Introspection of the VM behind `vm`, naming addresses with the kernel's
    /// symbols (the VM's, read when introspection first needs them, or those of
    /// [`Introspector::set_symbols`]); what it does is counted in `counters` (the
    /// VM's metrics).
    pub fn new(vm: VmInspect, counters: Arc<IntrospectCounters>) -> Arc<Self> {
        let mem = vm.guest_memory();
        Arc::new(Self {
            vm,
            mem,
            shared: Arc::new(Shared {
                counters,
                findings: Mutex::default(),
                baseline: Mutex::default(),
                boot_msrs: Mutex::default(),
                policy: Mutex::default(),
                symbols: Mutex::default(),
                msr_reported: Mutex::default(),
                monitor_tx: Mutex::default(),
                findings_out: Mutex::default(),
            }),
            monitor: Mutex::default(),
            tracer: Mutex::default(),
            located: Mutex::default(),
        })
    }

    /// The symbols set through the API, else the VM's own (read now, the first
    /// time introspection needs them).
    pub(super) fn symbols(&self) -> Option<Arc<SymbolTable>> {
        let mut symbols = lock(&self.shared.symbols);
        if symbols.is_none() {
            *symbols = self.vm.symbols().get();
        }
        symbols.clone()
    }

    /// Replaces the symbols (`PUT /vigil/introspect/symbols`); refused while
    /// monitoring, whose baseline was laid out with the old ones.
    pub fn set_symbols(&self, symbols: SymbolTable) -> Result<(), IntrospectError> {
        if lock(&self.monitor).is_some() {
            return Err(IntrospectError::SymbolsInUse);
        }
        *lock(&self.shared.symbols) = Some(Arc::new(symbols));
        Ok(())
    }

    fn cpus(&self) -> Result<Vec<CpuState>, IntrospectError> {
        let states = self.vm.vcpu_states().map_err(IntrospectError::Vm)?;
        Ok(states.iter().map(cpu_state).collect())
    }

    /// Where things stand.
    pub fn status(&self) -> Status {
        let monitor = lock(&self.monitor);
        let located = lock(&self.located);
        let snap = self.shared.counters.snapshot();
        Status {
            monitoring: monitor.is_some(),
            settings: monitor.as_ref().map(|m| m.settings),
            // A carried baseline is set before its monitor starts: shown once
            // the monitor that checks against it runs.
            baseline_taken: monitor.is_some() && lock(&self.shared.baseline).is_some(),
            symbols: self.symbols().map_or(0, |s| s.len()),
            kaslr_slide: located.as_ref().map(|l| l.slide),
            kaslr_slide_from: located.as_ref().map(|l| l.slide_from.clone()),
            checks: snap.checks,
            findings: snap.findings_total(),
            tracing: lock(&self.tracer).is_some(),
        }
    }

    /// What the guest kernel looks like now: registers of every vCPU, where LSTAR,
    /// the IDT's exception gates and the syscall table point, and the KASLR slide.
    pub fn current_state(&self) -> Result<GuestView, IntrospectError> {
        let cpus = self.cpus()?;
        let symbols = self.symbols();
        Ok(GuestView::read(&self.mem, &cpus, symbols.as_deref()))
    }

    /// Stops whatever runs (the VM is ending).
    pub fn shutdown(&self) {
        self.stop_trace();
        self.stop_monitor();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn shared() -> Shared {
        Shared {
            counters: Arc::default(),
            findings: Mutex::default(),
            baseline: Mutex::default(),
            boot_msrs: Mutex::default(),
            policy: Mutex::default(),
            symbols: Mutex::default(),
            msr_reported: Mutex::default(),
            monitor_tx: Mutex::default(),
            findings_out: Mutex::default(),
        }
    }

    #[test]
    fn a_json_lines_file_past_its_limit_is_rotated_once_and_bounded() {
        let dir = std::env::temp_dir().join(format!("vigil-jsonl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("trace.jsonl");
        let mut out = JsonLines::open_with_limit(&path, 100).unwrap();
        for i in 0..40u32 {
            out.append(&serde_json::json!({ "n": i }));
        }
        let now = std::fs::read_to_string(&path).unwrap();
        let old = std::fs::read_to_string(dir.join("trace.jsonl.1")).unwrap();
        assert!(now.len() <= 100 && old.len() <= 100, "{now:?} {old:?}");
        // The newest records are in PATH, the ones before them in PATH.1, whole lines.
        assert!(now.ends_with("{\"n\":39}\n"), "{now:?}");
        let first_now: serde_json::Value =
            serde_json::from_str(now.lines().next().unwrap()).unwrap();
        let last_old: serde_json::Value =
            serde_json::from_str(old.lines().last().unwrap()).unwrap();
        assert_eq!(
            last_old["n"].as_u64().unwrap() + 1,
            first_now["n"].as_u64().unwrap()
        );
        // Reopened, it goes on from its size.
        let mut again = JsonLines::open_with_limit(&path, 100).unwrap();
        assert_eq!(again.written, now.len() as u64);
        again.append(&serde_json::json!({ "n": 40 }));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
