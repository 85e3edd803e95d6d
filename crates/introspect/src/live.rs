//! Introspection of a running VM: the integrity monitor's thread, the MSR guard
//! and the system call tracer, on top of the handle the VMM lends
//! ([`VmControl`]). This is the only part of the crate with threads; what it
//! runs (baseline, checks, decoding) is the plain library code beside it.

use std::collections::{HashSet, VecDeque};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vigil_events::{Rule, Timestamp};
use vigil_metrics::IntrospectCounters;
use vigil_vmm::vstate::inspect::{
    BreakpointHandler, MsrGuard, MsrVerdict, VcpuState, INSPECTED_MSRS, MSR_CSTAR, MSR_LSTAR,
    MSR_SFMASK, MSR_STAR, MSR_SYSENTER_CS, MSR_SYSENTER_EIP, MSR_SYSENTER_ESP,
};
use vigil_vmm::VmControl;
use vm_memory::GuestMemoryMmap;

use crate::view::GuestView;
use crate::{
    kaslr_slide, kaslr_slide_from_idt, read_idt_gate, translate, Baseline, Checker, CpuState,
    Finding, KernelLayout, SymbolTable, SyscallFilter, SyscallRecord, SyscallRegs, TableRegister,
};

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A file that records are appended to as JSON lines, each written (not buffered)
/// as it comes: the findings and traced calls a user tails.
struct JsonLines {
    path: PathBuf,
    file: std::fs::File,
}

impl JsonLines {
    fn open(path: &Path) -> Result<Self, String> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        Ok(Self {
            path: path.to_owned(),
            file,
        })
    }

    fn append(&mut self, record: &impl Serialize) {
        let mut line = serde_json::to_vec(record).unwrap_or_default();
        line.push(b'\n');
        if let Err(e) = self.file.write_all(&line) {
            tracing::warn!("{}: {e}", self.path.display());
        }
    }
}

/// What the monitor does about a guest write to a syscall MSR after the baseline.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Report it and let it happen.
    #[default]
    Report,
    /// Report it and refuse it: the guest's `wrmsr` raises #GP.
    Protect,
}

impl std::str::FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "report" => Ok(Policy::Report),
            "protect" => Ok(Policy::Protect),
            other => Err(format!(
                "policy {other:?}: expected report (tell) or protect (tell and refuse MSR writes)"
            )),
        }
    }
}

/// How the integrity monitor runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MonitorSettings {
    /// Time between two checks.
    #[serde(with = "millis")]
    pub period: Duration,
    pub policy: Policy,
    /// How long after the monitor starts the baseline is taken (boot settling).
    #[serde(with = "millis")]
    pub baseline_after: Duration,
}

mod millis {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

/// How often a baseline that could not be taken (the kernel not up yet) is tried
/// again.
const BASELINE_RETRY: Duration = Duration::from_millis(20);

/// How long the baseline waits for the kernel to set up its system call entry
/// (EFER.SCE, LSTAR and SFMASK) before it is taken anyway (a guest that never
/// uses `syscall`).
const SYSCALL_SETUP_WAIT: Duration = Duration::from_secs(10);

/// Whether a vCPU has its system call entry set up: a kernel that boots straight
/// into long mode (an ELF or bzImage kernel on Vigil) is in long mode long before
/// it has set its IDT, syscall MSRs and EFER.SCE, and a baseline taken then would
/// report the kernel's own set-up as tampering (and the MSR guard would refuse it
/// under `protect`). SFMASK too: Linux writes it last (after LSTAR, CSTAR and
/// SYSENTER_*), the test guest sets EFER.SCE last, and every kernel that uses
/// `syscall` masks at least IF with it.
fn syscall_ready(c: &CpuState) -> bool {
    c.long_mode() && c.efer & crate::cpu::EFER_SCE != 0 && c.lstar != 0 && c.sfmask != 0
}

/// Bounds on settings, so that a typo cannot make the monitor spin or sleep for
/// ever.
pub const MIN_PERIOD: Duration = Duration::from_millis(1);
pub const MAX_PERIOD: Duration = Duration::from_secs(3600);

impl Default for MonitorSettings {
    fn default() -> Self {
        Self {
            period: Duration::from_secs(1),
            policy: Policy::Report,
            baseline_after: Duration::ZERO,
        }
    }
}

impl MonitorSettings {
    /// Refuses settings outside the bounds, naming the field and value.
    pub fn validate(&self) -> Result<(), String> {
        if self.period < MIN_PERIOD || self.period > MAX_PERIOD {
            return Err(format!(
                "period {:?}: expected {MIN_PERIOD:?} to {MAX_PERIOD:?}",
                self.period
            ));
        }
        if self.baseline_after > MAX_PERIOD {
            return Err(format!(
                "baseline_after {:?}: expected at most {MAX_PERIOD:?}",
                self.baseline_after
            ));
        }
        Ok(())
    }
}

/// A finding with its place in this VM's log.
#[derive(Clone, Debug, Serialize)]
pub struct FindingRecord {
    /// 1, 2, 3, ... in the order found.
    pub seq: u64,
    pub time_unix_ns: u64,
    #[serde(flatten)]
    pub finding: Finding,
}

/// How many findings are kept for `GET /vigil/introspect/findings` (the oldest go
/// first): a guest that keeps changing what is watched must not grow the VMM.
pub const FINDINGS_KEEP: usize = 10_000;
/// How many findings a second go to the log; the rest are counted, and said.
const FINDINGS_LOGGED_PER_S: u32 = 100;
/// How many (vCPU, MSR, value) the MSR guard remembers having reported; past
/// that, new values are still decided but not reported again.
const MSR_REPORTS_KEEP: usize = 4096;

/// This VM's latest findings, in order, and the log's rate limit.
#[derive(Default)]
struct FindingLog {
    records: VecDeque<FindingRecord>,
    last_seq: u64,
    /// The current second of logging: when it began, findings logged in it, and
    /// findings not logged.
    window: Option<Instant>,
    logged: u32,
    unlogged: u64,
}

impl FindingLog {
    fn log(&mut self, finding: &Finding) {
        let now = Instant::now();
        if self
            .window
            .is_none_or(|w| now.duration_since(w) >= Duration::from_secs(1))
        {
            if self.unlogged > 0 {
                tracing::warn!(
                    "introspection: {} more findings not logged (over {FINDINGS_LOGGED_PER_S} a second); GET /vigil/introspect/findings has them",
                    self.unlogged
                );
            }
            (self.window, self.logged, self.unlogged) = (Some(now), 0, 0);
        }
        if self.logged < FINDINGS_LOGGED_PER_S {
            self.logged += 1;
            tracing::warn!(
                rule = finding.rule.as_str(),
                "introspection: {}",
                finding.message
            );
        } else {
            self.unlogged += 1;
        }
    }
}

/// What the monitor thread, the MSR guard and the API share.
struct Shared {
    counters: Arc<IntrospectCounters>,
    findings: Mutex<FindingLog>,
    baseline: Mutex<Option<Arc<Baseline>>>,
    /// Per vCPU, the syscall MSRs of the baseline (what the MSR guard compares to).
    baseline_msrs: Mutex<Option<Vec<CpuState>>>,
    policy: Mutex<Policy>,
    symbols: Mutex<Option<Arc<SymbolTable>>>,
    /// (vCPU, MSR, value) the guard already reported.
    msr_reported: Mutex<HashSet<(u32, u32, u64)>>,
    /// The monitor thread, to check at once on an event.
    monitor_tx: Mutex<Option<Sender<Command>>>,
    /// Where each finding is also appended as a JSON line, as it is found: a
    /// record that outlives the VMM (`vigil run --findings-path`).
    findings_out: Mutex<Option<JsonLines>>,
    /// Guest-physical pages (4 KiB aligned) the host wrote through
    /// [`Introspector::debug_write_memory`] since the last check. KVM's dirty log
    /// records only the guest's own writes, not the VMM's writes into the memory
    /// mapping, so the next check re-hashes these too (and empties the set).
    host_dirty: Mutex<HashSet<u64>>,
}

impl Shared {
    fn record(&self, findings: Vec<Finding>) -> Vec<FindingRecord> {
        let mut log = lock(&self.findings);
        let mut out = Vec::with_capacity(findings.len());
        for finding in findings {
            self.counters.count_finding(finding.rule.as_str());
            log.log(&finding);
            log.last_seq += 1;
            let record = FindingRecord {
                seq: log.last_seq,
                time_unix_ns: Timestamp::now().unix_ns(),
                finding,
            };
            if let Some(out) = lock(&self.findings_out).as_mut() {
                out.append(&record);
            }
            if log.records.len() == FINDINGS_KEEP {
                log.records.pop_front();
            }
            log.records.push_back(record.clone());
            out.push(record);
        }
        out
    }

    fn describe(&self, addr: u64) -> Option<String> {
        lock(&self.symbols).as_ref()?.describe(addr)
    }
}

/// A guest write to a syscall MSR, decided the moment it happens.
struct Guard(Arc<Shared>);

/// The baseline's value of syscall MSR `index`.
fn syscall_msr(c: &CpuState, index: u32) -> Option<u64> {
    Some(match index {
        MSR_LSTAR => c.lstar,
        MSR_STAR => c.star,
        MSR_CSTAR => c.cstar,
        MSR_SFMASK => c.sfmask,
        MSR_SYSENTER_CS => c.sysenter_cs,
        MSR_SYSENTER_ESP => c.sysenter_esp,
        MSR_SYSENTER_EIP => c.sysenter_eip,
        _ => return None,
    })
}

fn msr_name(index: u32) -> &'static str {
    match index {
        MSR_LSTAR => "LSTAR",
        MSR_STAR => "STAR",
        MSR_CSTAR => "CSTAR",
        MSR_SFMASK => "SFMASK",
        MSR_SYSENTER_CS => "SYSENTER_CS",
        MSR_SYSENTER_ESP => "SYSENTER_ESP",
        MSR_SYSENTER_EIP => "SYSENTER_EIP",
        _ => "MSR",
    }
}

impl MsrGuard for Guard {
    fn msr_write(&self, vcpu: u32, index: u32, value: u64) -> MsrVerdict {
        let shared = &self.0;
        let baseline = lock(&shared.baseline_msrs)
            .as_ref()
            .and_then(|cpus| cpus.iter().find(|c| c.vcpu == vcpu).copied())
            .and_then(|c| syscall_msr(&c, index));
        // Before the baseline (boot), for a vCPU the baseline did not see, or a
        // write of the value it already has: nothing to say.
        let Some(old) = baseline.filter(|&old| old != value) else {
            shared.counters.msr_writes_allowed.inc();
            return MsrVerdict::Allow;
        };
        let policy = *lock(&shared.policy);
        let report = {
            let mut reported = lock(&shared.msr_reported);
            reported.len() < MSR_REPORTS_KEEP && reported.insert((vcpu, index, value))
        };
        if report {
            let name = msr_name(index);
            let (from_symbol, symbol) = (shared.describe(old), shared.describe(value));
            let verdict = match policy {
                Policy::Protect => "refused",
                Policy::Report => "let through",
            };
            let rule = Rule::SyscallMsrWrite;
            let _ = shared.record(vec![Finding {
                rule,
                priority: rule.default_priority(),
                mitre: rule.mitre(),
                vcpu: Some(vcpu),
                message: format!(
                    "vCPU {vcpu}: wrmsr {name} {value:#x}{} (baseline {old:#x}{}): {verdict}",
                    symbol
                        .as_ref()
                        .map(|s| format!(" <{s}>"))
                        .unwrap_or_default(),
                    from_symbol
                        .as_ref()
                        .map(|s| format!(" <{s}>"))
                        .unwrap_or_default(),
                ),
                location: name.to_string(),
                from: format!("{old:#x}"),
                to: format!("{value:#x}"),
                from_symbol,
                symbol,
                restored: false,
            }]);
            // An event: check the rest of the kernel now rather than at the period.
            if let Some(tx) = lock(&shared.monitor_tx).as_ref() {
                let _ = tx.send(Command::Check(None));
            }
        }
        match policy {
            Policy::Protect => {
                shared.counters.msr_writes_refused.inc();
                MsrVerdict::Refuse
            }
            Policy::Report => {
                shared.counters.msr_writes_allowed.inc();
                MsrVerdict::Allow
            }
        }
    }
}

/// The integrity monitor's thread and how to talk to it.
struct MonitorThread {
    commands: Sender<Command>,
    thread: JoinHandle<()>,
    settings: MonitorSettings,
}

enum Command {
    /// Check now; answer with what was found, when asked (the API), or not (an
    /// event: the MSR guard saw a write).
    Check(Option<Sender<Result<Vec<FindingRecord>, String>>>),
    Stop,
}

/// Waits `wait` before a baseline, answering requests for a check with an error
/// meanwhile; false when the monitor is to stop.
fn idle_before_baseline(rx: &mpsc::Receiver<Command>, wait: Duration) -> bool {
    let until = Instant::now() + wait;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return true;
        }
        match rx.recv_timeout(left) {
            Ok(Command::Check(Some(reply))) => {
                let _ = reply.send(Err("the baseline is not taken yet".into()));
            }
            Ok(Command::Check(None)) => {}
            Ok(Command::Stop) | Err(RecvTimeoutError::Disconnected) => return false,
            Err(RecvTimeoutError::Timeout) => return true,
        }
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

/// Where the kernel is: the KASLR slide found from LSTAR (or, failing that, the
/// page-fault gate of the IDT), and the layout from the symbols moved by it.
#[derive(Clone, Debug, Serialize)]
pub struct Located {
    /// The slide and how it was found (`"lstar"`, `"idt"`), or why none was.
    pub slide: i64,
    pub slide_from: String,
    pub layout: KernelLayout,
}

fn locate(
    mem: &GuestMemoryMmap,
    symbols: &SymbolTable,
    boot_cpu: &CpuState,
) -> Result<Located, String> {
    let (slide, from) = if let Some(s) = kaslr_slide(symbols, boot_cpu.lstar) {
        (s, "lstar".to_string())
    } else if let Some(s) = read_idt_gate(mem, boot_cpu.cr3, boot_cpu.la57(), boot_cpu.idt.base, 14)
        .ok()
        .and_then(|g| kaslr_slide_from_idt(symbols, 14, g.handler))
    {
        (s, "idt".to_string())
    } else {
        (
            0,
            "none: LSTAR and the page-fault gate match no entry_SYSCALL_64 / asm_exc_page_fault in the symbols; taken as 0".to_string(),
        )
    };
    let layout = KernelLayout::from_symbols(symbols, slide, None).map_err(|e| e.to_string())?;
    Ok(Located {
        slide,
        slide_from: from,
        layout,
    })
}

/// Introspection of one VM. Cheap to share (`Arc`); the API and the launch code
/// hold it.
pub struct Introspector {
    vm: VmControl,
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
    /// [`Introspector::set_symbols`]).
    pub fn new(vm: VmControl) -> Arc<Self> {
        let counters = vm.metrics().metrics().introspect().clone();
        let mem = vm.guest_memory();
        Arc::new(Self {
            vm,
            mem,
            shared: Arc::new(Shared {
                counters,
                findings: Mutex::default(),
                baseline: Mutex::default(),
                baseline_msrs: Mutex::default(),
                policy: Mutex::default(),
                symbols: Mutex::default(),
                msr_reported: Mutex::default(),
                monitor_tx: Mutex::default(),
                host_dirty: Mutex::default(),
                findings_out: Mutex::default(),
            }),
            monitor: Mutex::default(),
            tracer: Mutex::default(),
            located: Mutex::default(),
        })
    }

    /// Appends every finding from now on to `path` as a JSON line (the records of
    /// [`Introspector::findings`]), as it is found.
    pub fn write_findings_to(&self, path: &Path) -> Result<(), String> {
        *lock(&self.shared.findings_out) = Some(JsonLines::open(path)?);
        Ok(())
    }

    /// Replaces the symbols (`PUT /vigil/introspect/symbols`); refused while
    /// monitoring, whose baseline was laid out with the old ones.
    pub fn set_symbols(&self, symbols: SymbolTable) -> Result<(), String> {
        if lock(&self.monitor).is_some() {
            return Err("the monitor runs with the symbols it started with: stop it (DELETE /vigil/introspect) first".into());
        }
        *lock(&self.shared.symbols) = Some(Arc::new(symbols));
        Ok(())
    }

    /// The symbols set through the API, else the VM's own (read now, the first
    /// time introspection needs them).
    fn symbols(&self) -> Option<Arc<SymbolTable>> {
        let mut symbols = lock(&self.shared.symbols);
        if symbols.is_none() {
            *symbols = self.vm.symbols().get();
        }
        symbols.clone()
    }

    fn cpus(&self) -> Result<Vec<CpuState>, String> {
        let states = self.vm.vcpu_states().map_err(|e| e.to_string())?;
        Ok(states.iter().map(cpu_state).collect())
    }

    /// Starts the monitor: after `settings.baseline_after`, a baseline, then a check
    /// every `settings.period`. A monitor already running is stopped first (so this
    /// also takes a fresh baseline).
    pub fn start_monitor(self: &Arc<Self>, settings: MonitorSettings) -> Result<(), String> {
        settings.validate()?;
        let symbols = self.symbols().ok_or(
            "no kernel symbols: give a System.map (vigil run --symbols, or PUT /vigil/introspect/symbols), or boot an ELF kernel that has a symbol table",
        )?;
        self.stop_monitor();
        *lock(&self.shared.policy) = settings.policy;
        // Guard the syscall MSRs from now: writes are decided against the baseline
        // once there is one.
        self.vm
            .guard_msrs(&INSPECTED_MSRS, Arc::new(Guard(self.shared.clone())))
            .map_err(|e| format!("cannot guard the syscall MSRs: {e}"))?;
        let (commands, rx) = mpsc::channel();
        let me = self.clone();
        let thread = std::thread::Builder::new()
            .name("introspect".into())
            .spawn(move || me.monitor_loop(&symbols, settings, rx))
            .map_err(|e| format!("cannot start the monitor thread: {e}"))?;
        self.shared.counters.monitoring.set(1);
        *lock(&self.shared.monitor_tx) = Some(commands.clone());
        *lock(&self.monitor) = Some(MonitorThread {
            commands,
            thread,
            settings,
        });
        Ok(())
    }

    /// Stops the monitor and its MSR guard; the findings stay.
    pub fn stop_monitor(&self) -> bool {
        let Some(m) = lock(&self.monitor).take() else {
            return false;
        };
        *lock(&self.shared.monitor_tx) = None;
        let _ = m.commands.send(Command::Stop);
        let _ = m.thread.join();
        // A VM that is ending takes its guard and dirty log with it.
        if !self.vm.is_stopping() {
            if let Err(e) = self.vm.unguard_msrs() {
                tracing::warn!("cannot lift the MSR guard: {e}");
            }
            if let Err(e) = self.vm.stop_dirty_log() {
                tracing::warn!("cannot stop the dirty log: {e}");
            }
        }
        *lock(&self.shared.baseline) = None;
        *lock(&self.shared.baseline_msrs) = None;
        self.shared.counters.monitoring.set(0);
        true
    }

    fn take_baseline(
        &self,
        symbols: &Arc<SymbolTable>,
        wait_for_syscall: bool,
    ) -> Result<Checker, String> {
        let cpus = self.cpus()?;
        let boot = cpus
            .iter()
            .find(|c| c.long_mode())
            .ok_or("no vCPU is in long mode yet: nothing to baseline")?;
        if wait_for_syscall && !syscall_ready(boot) {
            return Err(format!(
                "vCPU {} has not set up its system call entry yet (EFER.SCE, LSTAR, SFMASK)",
                boot.vcpu
            ));
        }
        let located = locate(&self.mem, symbols, boot)?;
        // Logging starts before the hashes are taken: a write between the two is
        // seen as dirty by the first check.
        self.vm.dirty_log().map_err(|e| e.to_string())?;
        let baseline =
            Baseline::take(&self.mem, &cpus, &located.layout).map_err(|e| e.to_string())?;
        tracing::info!(
            slide = located.slide,
            from = located.slide_from.as_str(),
            "introspection: baseline taken"
        );
        *lock(&self.located) = Some(located);
        // The MSR guard compares with vCPUs that were up: one still starting
        // (no long mode, or no syscall entry yet) sets its MSRs for the first
        // time later, and must not be refused that.
        *lock(&self.shared.baseline_msrs) = Some(cpus.into_iter().filter(syscall_ready).collect());
        let baseline = Arc::new(baseline);
        *lock(&self.shared.baseline) = Some(baseline.clone());
        Ok(Checker::new((*baseline).clone(), Some(symbols.clone())))
    }

    fn check(&self, checker: &mut Checker) -> Result<Vec<FindingRecord>, String> {
        let start = Instant::now();
        let cpus = self.cpus()?;
        // Pages the host wrote: taken before the dirty log is read, so a host
        // write that lands after this stays for the next check.
        let host_dirty = std::mem::take(&mut *lock(&self.shared.host_dirty));
        let dirty = self.vm.dirty_log().map_err(|e| e.to_string())?;
        // The checker re-hashes exactly the pages this says were written (by the
        // guest, in KVM's dirty log, or by the host through the debug API).
        let hashed = std::cell::Cell::new(0u64);
        let is_dirty = |gpa: u64| {
            let d = dirty.is_dirty(gpa) || host_dirty.contains(&(gpa & !0xfff));
            hashed.set(hashed.get() + u64::from(d));
            d
        };
        let findings = checker.check(&self.mem, &cpus, Some(&is_dirty));
        let c = &self.shared.counters;
        c.checks.inc();
        c.pages_hashed.add(hashed.get());
        c.check_time.record(start.elapsed());
        Ok(self.shared.record(findings))
    }

    fn monitor_loop(
        &self,
        symbols: &Arc<SymbolTable>,
        settings: MonitorSettings,
        rx: mpsc::Receiver<Command>,
    ) {
        // Boot settles, then the kernel may not be up yet (no vCPU in long mode,
        // its tables not mapped): try again until it is.
        if !idle_before_baseline(&rx, settings.baseline_after) {
            return;
        }
        let mut logged = false;
        let waiting_since = Instant::now();
        let mut checker = loop {
            match self.take_baseline(symbols, waiting_since.elapsed() < SYSCALL_SETUP_WAIT) {
                Ok(c) => break c,
                Err(e) if !logged => {
                    tracing::info!("introspection: no baseline yet, retrying: {e}");
                    logged = true;
                }
                Err(_) => {}
            }
            if !idle_before_baseline(&rx, BASELINE_RETRY) {
                return;
            }
        };
        let mut next = Instant::now() + settings.period;
        loop {
            let left = next.saturating_duration_since(Instant::now());
            let reply = match rx.recv_timeout(left) {
                Ok(Command::Check(reply)) => reply,
                Ok(Command::Stop) | Err(RecvTimeoutError::Disconnected) => return,
                Err(RecvTimeoutError::Timeout) => {
                    next += settings.period;
                    // A check that overran does not make the next ones bunch up.
                    if next < Instant::now() {
                        next = Instant::now() + settings.period;
                    }
                    None
                }
            };
            let found = self.check(&mut checker);
            match (reply, found) {
                (Some(reply), found) => {
                    let _ = reply.send(found);
                }
                (None, Err(e)) => tracing::warn!("introspection: check failed: {e}"),
                (None, Ok(_)) => {}
            }
        }
    }

    /// Checks now (`PUT /vigil/introspect/check`), returning what is new.
    pub fn check_now(&self) -> Result<Vec<FindingRecord>, String> {
        let (reply, answer) = mpsc::channel();
        {
            let monitor = lock(&self.monitor);
            let m = monitor
                .as_ref()
                .ok_or("the monitor is not running (PUT /vigil/introspect starts it)")?;
            m.commands
                .send(Command::Check(Some(reply)))
                .map_err(|_| "the monitor thread ended")?;
        }
        answer
            .recv_timeout(Duration::from_secs(30))
            .map_err(|_| "the monitor did not answer within 30 s".to_string())?
    }

    /// The baseline, once taken.
    pub fn baseline(&self) -> Option<Arc<Baseline>> {
        lock(&self.shared.baseline).clone()
    }

    /// Findings with a sequence number above `since` (of the last
    /// [`FINDINGS_KEEP`]).
    pub fn findings(&self, since: u64) -> Vec<FindingRecord> {
        let log = lock(&self.shared.findings);
        log.records
            .iter()
            .filter(|r| r.seq > since)
            .cloned()
            .collect()
    }

    /// Where things stand.
    pub fn status(&self) -> Status {
        let monitor = lock(&self.monitor);
        let located = lock(&self.located);
        let snap = self.shared.counters.snapshot();
        Status {
            monitoring: monitor.is_some(),
            settings: monitor.as_ref().map(|m| m.settings),
            baseline_taken: lock(&self.shared.baseline).is_some(),
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
    pub fn current_state(&self) -> Result<GuestView, String> {
        let cpus = self.cpus()?;
        let symbols = self.symbols();
        Ok(GuestView::read(&self.mem, &cpus, symbols.as_deref()))
    }

    /// Writes `bytes` into the guest at `address` (guest-physical with `physical`,
    /// else guest-virtual through vCPU `vcpu`'s page tables), for tests of the
    /// monitor (`PUT /vigil/debug/memory`).
    pub fn debug_write_memory(
        &self,
        vcpu: u32,
        address: u64,
        physical: bool,
        bytes: &[u8],
    ) -> Result<(), String> {
        use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};
        let cpu = if physical {
            None
        } else {
            let cpus = self.cpus()?;
            Some(
                *cpus
                    .iter()
                    .find(|c| c.vcpu == vcpu)
                    .ok_or_else(|| format!("vcpu {vcpu}: the VM has {} vCPUs", cpus.len()))?,
            )
        };
        // Translate every byte's page first: all of it is written, or none.
        let mut pieces = Vec::new();
        let mut done = 0usize;
        while done < bytes.len() {
            let va = address.wrapping_add(done as u64);
            let pa = match &cpu {
                None => va,
                Some(c) => {
                    translate(&self.mem, c.cr3, c.la57(), va)
                        .map_err(|e| format!("address {va:#x}: {e}"))?
                        .paddr
                }
            };
            let n = ((0x1000 - (va & 0xfff)) as usize).min(bytes.len() - done);
            pieces.push((pa, done, n));
            done += n;
        }
        if let Some(&(pa, _, n)) = pieces.iter().find(|(pa, _, n)| {
            !self
                .mem
                .check_range(GuestAddress(*pa), *n, Permissions::Write)
        }) {
            return Err(format!("address {pa:#x} (+{n} bytes): outside guest RAM"));
        }
        for &(pa, at, n) in &pieces {
            self.mem
                .write_slice(&bytes[at..at + n], GuestAddress(pa))
                .map_err(|_| format!("address {pa:#x} (+{n} bytes): outside guest RAM"))?;
        }
        // KVM's dirty log does not see this write (the host wrote the mapping, the
        // guest did not): record its pages, after the bytes are in, for the next
        // check to re-hash.
        lock(&self.shared.host_dirty).extend(pieces.iter().map(|&(pa, _, _)| pa & !0xfff));
        Ok(())
    }

    /// Writes an MSR of vCPU `vcpu` from the host (`PUT /vigil/debug/msr`): not
    /// subject to the MSR guard, so only the periodic check sees it.
    pub fn debug_write_msr(&self, vcpu: u32, index: u32, value: u64) -> Result<(), String> {
        self.vm
            .write_msr(vcpu, index, value)
            .map_err(|e| e.to_string())
    }

    /// Starts tracing system calls that pass `filter`; each is kept in memory (the
    /// last [`TRACE_KEEP`]) and, with `output`, written there as a JSON line.
    pub fn start_trace(&self, filter: SyscallFilter, output: Option<&Path>) -> Result<(), String> {
        let cpus = self.cpus()?;
        let lstar = cpus
            .iter()
            .find(|c| c.long_mode())
            .map(|c| c.lstar)
            .filter(|&l| l != 0)
            .ok_or("the guest has no syscall entry yet (LSTAR is 0)")?;
        let out = output
            .map(JsonLines::open)
            .transpose()
            .map_err(|e| format!("output {e}"))?;
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
            .map_err(|e| format!("cannot set the breakpoint at LSTAR {lstar:#x}: {e}"))?;
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

    /// Stops whatever runs (the VM is ending).
    pub fn shutdown(&self) {
        self.stop_trace();
        self.stop_monitor();
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

struct Tracer {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::{EFER_LMA, EFER_SCE};

    #[test]
    fn the_baseline_waits_for_the_syscall_entry() {
        let up = CpuState {
            cr0: 0x8000_0001,
            efer: EFER_SCE | EFER_LMA | (1 << 8),
            lstar: 0x10_13a3,
            sfmask: 0x4_7700,
            ..CpuState::default()
        };
        assert!(up.long_mode());
        assert!(syscall_ready(&up));
        // The test guest's order: STAR, LSTAR, SFMASK, then EFER.SCE.
        assert!(!syscall_ready(&CpuState { lstar: 0, ..up }));
        assert!(!syscall_ready(&CpuState { sfmask: 0, ..up }));
        assert!(!syscall_ready(&CpuState {
            efer: up.efer & !EFER_SCE,
            ..up
        }));
        assert!(!syscall_ready(&CpuState { cr0: 1, ..up }));
    }

    fn shared() -> Shared {
        Shared {
            counters: Arc::default(),
            findings: Mutex::default(),
            baseline: Mutex::default(),
            baseline_msrs: Mutex::default(),
            policy: Mutex::default(),
            symbols: Mutex::default(),
            msr_reported: Mutex::default(),
            monitor_tx: Mutex::default(),
            host_dirty: Mutex::default(),
            findings_out: Mutex::default(),
        }
    }

    fn finding(n: u64) -> Finding {
        let rule = Rule::SyscallMsrWrite;
        Finding {
            rule,
            priority: rule.default_priority(),
            mitre: rule.mitre(),
            vcpu: Some(0),
            location: "LSTAR".into(),
            from: "0x1".into(),
            to: format!("{n:#x}"),
            from_symbol: None,
            symbol: None,
            restored: false,
            message: format!("wrmsr LSTAR {n:#x}"),
        }
    }

    #[test]
    fn the_findings_log_keeps_the_latest_and_counts_them_all() {
        let s = shared();
        let total = FINDINGS_KEEP as u64 + 5;
        for n in 0..total {
            s.record(vec![finding(n)]);
        }
        let log = lock(&s.findings);
        assert_eq!(log.records.len(), FINDINGS_KEEP);
        assert_eq!(log.records.front().unwrap().seq, 6);
        assert_eq!(log.records.back().unwrap().seq, total);
        // Logged at most the per-second budget; the rest counted for the next line.
        assert_eq!(log.logged, FINDINGS_LOGGED_PER_S);
        assert_eq!(log.unlogged, total - u64::from(FINDINGS_LOGGED_PER_S));
        drop(log);
        assert_eq!(s.counters.snapshot().findings["syscall_msr_write"], total);
    }

    #[test]
    fn a_guest_cycling_msr_values_is_reported_a_bounded_number_of_times() {
        let s = Arc::new(shared());
        let base = CpuState {
            cr0: 0x8000_0001,
            efer: EFER_SCE | EFER_LMA,
            lstar: 0x1000,
            sfmask: 0x4_7700,
            ..CpuState::default()
        };
        *lock(&s.baseline_msrs) = Some(vec![base]);
        *lock(&s.policy) = Policy::Protect;
        let guard = Guard(s.clone());
        for v in 0..(MSR_REPORTS_KEEP as u64 + 100) {
            assert_eq!(
                guard.msr_write(0, MSR_LSTAR, 0x2000 + v),
                MsrVerdict::Refuse
            );
        }
        // The baseline value itself is let through, unreported.
        assert_eq!(guard.msr_write(0, MSR_LSTAR, 0x1000), MsrVerdict::Allow);
        assert_eq!(lock(&s.findings).last_seq, MSR_REPORTS_KEEP as u64);
        assert_eq!(
            s.counters.snapshot().msr_writes_refused,
            MSR_REPORTS_KEEP as u64 + 100
        );
    }
}
