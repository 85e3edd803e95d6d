//! The integrity monitor's thread: after the boot settles and the kernel has set
//! up its system call entry, a baseline (with the KASLR slide and layout from the
//! symbols), then a check every period and on demand, over the dirty log (the
//! monitor is one of its readers: KVM's log of the guest's writes merged with the
//! VMM's own writes into guest memory).

use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;
use vigil_model::config::{IntrospectConfig, Policy};
use vigil_vmm::vstate::inspect::INSPECTED_MSRS;
use vigil_vmm::{DirtyReader, GuestMemoryMmap};

use super::guard::Guard;
use super::{lock, FindingRecord, IntrospectError, Introspector, MonitorState};
use crate::{
    kaslr_slide, kaslr_slide_from_idt, read_idt_gate, Baseline, Checker, CpuState, KernelLayout,
    SymbolTable,
};

/// How the integrity monitor runs: an [`IntrospectConfig`] (checked by its
/// `validate`) with its defaults resolved.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct MonitorSettings {
    /// Time between two checks.
    #[serde(serialize_with = "millis")]
    pub period: Duration,
    pub policy: Policy,
    /// How long after the monitor starts the baseline is taken (boot settling).
    #[serde(serialize_with = "millis")]
    pub baseline_after: Duration,
}

fn millis<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl MonitorSettings {
    /// `config`'s settings, with `baseline_after` when it gives none (time for the
    /// kernel to set itself up when the monitor starts with the VM; none on a
    /// running VM).
    pub fn resolve(config: &IntrospectConfig, baseline_after: Duration) -> Self {
        Self {
            period: config.period(),
            policy: config.policy(),
            baseline_after: config.baseline_after_or(baseline_after),
        }
    }
}

impl Default for MonitorSettings {
    fn default() -> Self {
        Self::resolve(&IntrospectConfig::default(), Duration::ZERO)
    }
}

/// How often a baseline that could not be taken (the kernel not up yet) is tried
/// again.
const BASELINE_RETRY: Duration = Duration::from_millis(20);

/// How long the baseline waits for the kernel to set up its system call entry
/// ([`CpuState::syscall_ready`]) before it is taken anyway (a guest that never
/// uses `syscall`): a baseline taken earlier would report the kernel's own
/// set-up as tampering (and the MSR guard would refuse it under `protect`).
const SYSCALL_SETUP_WAIT: Duration = Duration::from_secs(10);

/// The integrity monitor's thread and how to talk to it.
pub(super) struct MonitorThread {
    pub(super) commands: Sender<Command>,
    thread: JoinHandle<()>,
    pub(super) settings: MonitorSettings,
}

pub(super) enum Command {
    /// Check now; answer with what was found, when asked (the API), or not (an
    /// event: the MSR guard saw a write).
    Check(Option<Sender<Result<Vec<FindingRecord>, IntrospectError>>>),
    /// Answer with the monitor's state, to carry in a snapshot or migration.
    Save(Sender<MonitorState>),
    Stop,
}

/// Where the monitor's thread starts from.
pub(super) enum Start {
    /// Take a baseline (after `baseline_after`).
    Take,
    /// Go on from a carried baseline, with a new reader of the dirty log.
    Resume(Box<(Checker, DirtyReader)>),
}

/// Waits `wait` before a baseline, answering requests for a check with an error
/// and those for its state with `no_baseline` meanwhile; false when the
/// monitor is to stop.
fn idle_before_baseline(
    rx: &mpsc::Receiver<Command>,
    wait: Duration,
    no_baseline: &MonitorState,
) -> bool {
    let until = Instant::now() + wait;
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return true;
        }
        match rx.recv_timeout(left) {
            Ok(Command::Check(Some(reply))) => {
                let _ = reply.send(Err(IntrospectError::NoBaselineYet));
            }
            Ok(Command::Check(None)) => {}
            Ok(Command::Save(reply)) => {
                let _ = reply.send(no_baseline.clone());
            }
            Ok(Command::Stop) | Err(RecvTimeoutError::Disconnected) => return false,
            Err(RecvTimeoutError::Timeout) => return true,
        }
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
) -> Result<Located, IntrospectError> {
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
    let layout = KernelLayout::from_symbols(symbols, slide, None)?;
    Ok(Located {
        slide,
        slide_from: from,
        layout,
    })
}

impl Introspector {
    /// Starts the monitor: after `settings.baseline_after`, a baseline, then a check
    /// every `settings.period`. A monitor already running is stopped first (so this
    /// also takes a fresh baseline).
    pub fn start_monitor(
        self: &Arc<Self>,
        settings: MonitorSettings,
    ) -> Result<(), IntrospectError> {
        let symbols = self.symbols().ok_or(IntrospectError::NoSymbols)?;
        self.stop_monitor();
        self.spawn_monitor(Some(symbols), settings, Start::Take)
    }

    /// The monitor's thread from `start`, with the MSR guard on; the caller
    /// stopped any monitor before. `symbols` are needed to take a baseline,
    /// and name addresses.
    pub(super) fn spawn_monitor(
        self: &Arc<Self>,
        symbols: Option<Arc<SymbolTable>>,
        settings: MonitorSettings,
        start: Start,
    ) -> Result<(), IntrospectError> {
        *lock(&self.shared.policy) = settings.policy;
        // Guard the syscall MSRs from now: writes are decided against the baseline
        // once there is one.
        self.vm
            .guard_msrs(&INSPECTED_MSRS, Arc::new(Guard(self.shared.clone())))
            .map_err(IntrospectError::Guard)?;
        let (commands, rx) = mpsc::channel();
        let me = self.clone();
        let thread = std::thread::Builder::new()
            .name("introspect".into())
            .spawn(move || {
                vigil_seccomp::confine(vigil_seccomp::ThreadKind::Introspect);
                me.monitor_loop(symbols, settings, start, rx)
            })
            .map_err(IntrospectError::Thread)?;
        self.shared.counters.monitoring.set(1);
        *lock(&self.shared.monitor_tx) = Some(commands.clone());
        *lock(&self.monitor) = Some(MonitorThread {
            commands,
            thread,
            settings,
        });
        Ok(())
    }

    /// Stops the monitor and its MSR guard; the findings stay. The monitor's
    /// thread drops its dirty-log reader as it ends.
    pub fn stop_monitor(&self) -> bool {
        let Some(m) = lock(&self.monitor).take() else {
            return false;
        };
        *lock(&self.shared.monitor_tx) = None;
        let _ = m.commands.send(Command::Stop);
        let _ = m.thread.join();
        // A VM that is ending takes its guard with it.
        if !self.vm.is_stopping() {
            if let Err(e) = self.vm.unguard_msrs() {
                tracing::warn!("cannot lift the MSR guard: {e}");
            }
        }
        *lock(&self.shared.baseline) = None;
        *lock(&self.shared.boot_msrs) = None;
        self.shared.counters.monitoring.set(0);
        true
    }

    /// The baseline, with the checker that compares against it and the monitor's
    /// reader of the dirty log.
    fn take_baseline(
        &self,
        symbols: &Arc<SymbolTable>,
        wait_for_syscall: bool,
    ) -> Result<(Checker, DirtyReader), IntrospectError> {
        let cpus = self.cpus()?;
        let boot = cpus
            .iter()
            .find(|c| c.long_mode())
            .ok_or(IntrospectError::NoLongMode)?;
        if wait_for_syscall && !boot.syscall_ready() {
            return Err(IntrospectError::NoSyscallEntry(boot.vcpu));
        }
        let located = locate(&self.mem, symbols, boot)?;
        // Reading starts before the hashes are taken: a write between the two is
        // in the first check's take. (The first take counts every page dirty.)
        let dirty = self.vm.dirty_log().subscribe()?;
        dirty.take()?;
        let baseline = Baseline::take(&self.mem, &cpus, &located.layout)?;
        tracing::info!(
            slide = located.slide,
            from = located.slide_from.as_str(),
            "introspection: baseline taken"
        );
        *lock(&self.located) = Some(located);
        // The MSR guard holds every vCPU to the boot vCPU's syscall MSRs, once
        // it had set them up (a boot vCPU without them, the baseline taken
        // anyway, sets them for the first time later and must not be refused
        // that).
        *lock(&self.shared.boot_msrs) = cpus
            .iter()
            .find(|c| c.vcpu == baseline.reference_vcpu)
            .filter(|c| c.syscall_ready())
            .copied();
        let baseline = Arc::new(baseline);
        *lock(&self.shared.baseline) = Some(baseline.clone());
        Ok((
            Checker::new((*baseline).clone(), Some(symbols.clone())),
            dirty,
        ))
    }

    fn check(
        &self,
        checker: &mut Checker,
        reader: &DirtyReader,
    ) -> Result<Vec<FindingRecord>, IntrospectError> {
        let start = Instant::now();
        let cpus = self.cpus()?;
        let dirty = reader.take()?;
        // The checker re-hashes exactly the pages this says were written: by the
        // guest (KVM's log) or by the VMM (a device's DMA, the debug API).
        let hashed = std::cell::Cell::new(0u64);
        let is_dirty = |gpa: u64| {
            let d = dirty.is_dirty(gpa);
            hashed.set(hashed.get() + u64::from(d));
            d
        };
        let findings = checker.check(&self.mem, &cpus, Some(&is_dirty));
        // A vCPU joined: the API's baseline shows it too.
        let joined = checker.baseline().vcpus.len();
        {
            let mut shown = lock(&self.shared.baseline);
            if shown.as_ref().is_some_and(|b| b.vcpus.len() != joined) {
                *shown = Some(Arc::new(checker.baseline().clone()));
            }
        }
        let c = &self.shared.counters;
        c.checks.inc();
        c.pages_hashed.add(hashed.get());
        c.check_time.record(start.elapsed());
        Ok(self.shared.record(findings))
    }

    /// A baseline, or none when the monitor is stopped first.
    fn wait_for_baseline(
        &self,
        symbols: Option<Arc<SymbolTable>>,
        settings: MonitorSettings,
        rx: &mpsc::Receiver<Command>,
    ) -> Option<(Checker, DirtyReader)> {
        let no_baseline = self.state_of(settings, None);
        // Boot settles, then the kernel may not be up yet (no vCPU in long mode,
        // its tables not mapped): try again until it is.
        if !idle_before_baseline(rx, settings.baseline_after, &no_baseline) {
            return None;
        }
        // start_monitor gives them.
        let symbols = symbols?;
        let mut logged = false;
        let waiting_since = Instant::now();
        loop {
            match self.take_baseline(&symbols, waiting_since.elapsed() < SYSCALL_SETUP_WAIT) {
                Ok(taken) => return Some(taken),
                Err(e) if !logged => {
                    tracing::info!("introspection: no baseline yet, retrying: {e}");
                    logged = true;
                }
                Err(_) => {}
            }
            if !idle_before_baseline(rx, BASELINE_RETRY, &no_baseline) {
                return None;
            }
        }
    }

    fn monitor_loop(
        &self,
        symbols: Option<Arc<SymbolTable>>,
        settings: MonitorSettings,
        start: Start,
        rx: mpsc::Receiver<Command>,
    ) {
        let (mut checker, reader) = match start {
            Start::Resume(resumed) => *resumed,
            Start::Take => match self.wait_for_baseline(symbols, settings, &rx) {
                Some(taken) => taken,
                None => return,
            },
        };
        let mut next = Instant::now() + settings.period;
        loop {
            let left = next.saturating_duration_since(Instant::now());
            let reply = match rx.recv_timeout(left) {
                Ok(Command::Check(reply)) => reply,
                Ok(Command::Save(reply)) => {
                    let _ = reply.send(self.state_of(settings, Some(&checker)));
                    continue;
                }
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
            let found = self.check(&mut checker, &reader);
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
    pub fn check_now(&self) -> Result<Vec<FindingRecord>, IntrospectError> {
        let (reply, answer) = mpsc::channel();
        {
            let monitor = lock(&self.monitor);
            let m = monitor.as_ref().ok_or(IntrospectError::NotMonitoring)?;
            m.commands
                .send(Command::Check(Some(reply)))
                .map_err(|_| IntrospectError::MonitorEnded)?;
        }
        answer
            .recv_timeout(Duration::from_secs(30))
            .map_err(|_| IntrospectError::MonitorTimeout)?
    }

    /// The baseline, once taken, with the vCPUs that joined since.
    pub fn baseline(&self) -> Option<Arc<Baseline>> {
        lock(&self.shared.baseline).clone()
    }
}
