//! Running a VM whose configuration comes from the API or a Firecracker
//! configuration file: serve the API (when asked), wait for `InstanceStart` (or
//! start at once), then run the VM to its end as `vigil run` does.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;
use vigil_seccomp::ThreadKind;

use anyhow::{anyhow, Context};
use vigil_api::preboot::PreBoot;
use vigil_api::{Api, SnapshotLoad, SnapshotMemory, StartError, ToVmm};
use vigil_introspect::live::{Introspector, MonitorSettings, MonitorState, STATE_EXTENSION};
use vigil_introspect::SyscallFilter;
use vigil_migration::{Migrator, ServerTls, Target};
use vigil_model::config::introspect::BOOT_BASELINE_AFTER;
use vigil_model::config::{
    BootProtocol, ConsoleConfig, CpuTemplate, HugePages, IntrospectConfig, MemoryCompression,
    OnCrash, RtTimerConfig, VcpuSched, VmConfig, DEFAULT_IO_POLL_US,
};
use vigil_model::cpu::{CpuFeature, CpuModifiers};
use vigil_model::firecracker::{self, FullVmConfig, Logger, Metrics};
use vigil_vmm::builder::BuildError;
use vigil_vmm::{RunningVm, StopHandle};

use crate::terminal::TerminalGuard;
use vigil_shared::logging::Logging;

/// VMM-side settings that Firecracker's API has no place for; they apply to a VM
/// configured through the API or a file.
#[derive(Clone, Debug)]
pub struct Overrides {
    pub console: ConsoleConfig,
    pub symbols: Option<PathBuf>,
    pub boot_protocol: BootProtocol,
    pub cpu_template: CpuTemplate,
    pub cpuid_hide: Vec<CpuFeature>,
    /// `--cpu-config`, over a configuration's `PUT /cpu-config`.
    pub cpu_modifiers: Option<CpuModifiers>,
    pub on_crash: OnCrash,
    pub huge_pages: HugePages,
    /// `--vcpu-sched` entries.
    pub vcpu_sched: Vec<VcpuSched>,
    /// `--rt-timer`.
    pub rt_timer: Option<RtTimerConfig>,
    /// `--memory-compression`.
    pub memory_compression: Option<MemoryCompression>,
    /// `--enable-pci`: the devices go on PCI.
    pub pci: bool,
    /// `--io-poll-us`.
    pub io_poll_us: u32,
    pub introspect: IntrospectLaunch,
}

/// Introspection from the VM's start (`--introspect`, `--trace-syscalls`,
/// `--debug-api`); the API starts and stops the same things later.
#[derive(Clone, Debug, Default)]
pub struct IntrospectLaunch {
    /// The integrity monitor, with these settings.
    pub monitor: Option<IntrospectConfig>,
    /// System call tracing into this file (JSON lines), keeping what the filter keeps.
    pub trace: Option<(PathBuf, SyscallFilter)>,
    /// Serve `/vigil/debug/...`: writes into the guest, for tests.
    pub debug_api: bool,
    /// Append every finding here as a JSON line.
    pub findings_path: Option<PathBuf>,
}

impl IntrospectLaunch {
    /// Starts what was asked for on the running VM. A monitor `carried` by the
    /// snapshot or migration the VM came from goes on from its baseline, with
    /// or without `--introspect` (whose settings, where given, replace the
    /// carried ones); a new baseline would trust whatever the guest changed
    /// before the capture.
    fn start(
        &self,
        intro: &Arc<Introspector>,
        carried: Option<MonitorState>,
    ) -> anyhow::Result<()> {
        if let Some(path) = &self.findings_path {
            intro
                .write_findings_to(path)
                .map_err(|e| anyhow!("--findings-path {e}"))?;
        }
        match (carried, &self.monitor) {
            (Some(state), config) => intro
                .resume_monitor(state, config.as_ref())
                .map_err(|e| anyhow!("the carried introspection monitor: {e}"))?,
            (None, Some(config)) => intro
                .start_monitor(MonitorSettings::resolve(config, BOOT_BASELINE_AFTER))
                .map_err(|e| anyhow!("--introspect: {e}"))?,
            (None, None) => {}
        }
        if let Some((path, filter)) = &self.trace {
            intro.trace_once_ready(filter.clone(), path.clone());
        }
        Ok(())
    }
}

impl Default for Overrides {
    fn default() -> Self {
        Self {
            console: ConsoleConfig::Stdio,
            symbols: None,
            boot_protocol: BootProtocol::Auto,
            cpu_template: CpuTemplate::Auto,
            cpuid_hide: Vec::new(),
            cpu_modifiers: None,
            on_crash: OnCrash::Exit,
            huge_pages: HugePages::None,
            vcpu_sched: Vec::new(),
            rt_timer: None,
            memory_compression: None,
            pci: false,
            io_poll_us: DEFAULT_IO_POLL_US,
            introspect: IntrospectLaunch::default(),
        }
    }
}

impl Overrides {
    fn apply(&self, config: &mut VmConfig) {
        // `PUT /serial` names a file the console goes to; otherwise `--console`.
        if !matches!(config.console, ConsoleConfig::File(_)) {
            config.console = self.console.clone();
        }
        config.boot.symbols = self.symbols.clone();
        config.boot.protocol = self.boot_protocol;
        config.machine.cpu_template = self.cpu_template.clone();
        config.machine.cpuid_hide = self.cpuid_hide.clone();
        if let Some(m) = &self.cpu_modifiers {
            config.machine.cpu_modifiers = m.clone();
        }
        // The flags take the place of a file's `vcpu-scheduling` and `rt-timer`.
        if !self.vcpu_sched.is_empty() {
            config.vcpu_sched = self.vcpu_sched.clone();
        }
        if self.rt_timer.is_some() {
            config.rt_timer = self.rt_timer;
        }
        if self.memory_compression.is_some() {
            config.memory_compression = self.memory_compression;
        }
        // A configuration's `huge_pages` stands unless the flag asks for more.
        if self.huge_pages != HugePages::None {
            config.machine.huge_pages = self.huge_pages;
        }
        config.on_crash = self.on_crash;
        if self.pci {
            config.pci = true;
        }
        config.io_poll_us = self.io_poll_us;
    }
}

/// How to launch.
pub struct Launch {
    /// Serve the API here.
    pub api_sock: Option<PathBuf>,
    /// The instance id (`GET /`, metrics).
    pub id: String,
    /// Start this VM at once instead of waiting for `InstanceStart`.
    pub boot_now: Option<VmConfig>,
    /// What `GET /vm/config` starts from (a configuration file's content).
    pub pre: PreBoot,
    pub logger: Option<Logger>,
    pub metrics: Option<Metrics>,
    pub overrides: Overrides,
    /// Receive the VM by migration (`--migrate-from`).
    pub incoming: Option<Incoming>,
    /// Confine every thread with its seccomp filter (off only with `--no-seccomp`).
    pub seccomp: bool,
    /// What the MMDS data store starts with.
    pub mmds: MmdsStart,
}

/// The MMDS data store at start (Firecracker's flags).
#[derive(Default)]
pub struct MmdsStart {
    /// Its limit in bytes (`--mmds-size-limit`); by default the API's body
    /// limit.
    pub size_limit: Option<usize>,
    /// A JSON file it starts with (`--metadata`), as a `PUT /mmds` would.
    pub metadata: Option<PathBuf>,
}

/// Where a migrating VM comes in, and what its source must hold.
pub struct Incoming {
    pub from: Target,
    /// The one-time token (`--migration-token`).
    pub token: String,
    /// Sources come over TLS, with this certificate (`--migration-tls-cert`).
    pub tls: Option<ServerTls>,
}

/// Reads a Firecracker configuration file into what [`Launch`] needs: the
/// accumulated configuration, the VM to boot, and the logger and metrics keys.
pub fn from_config_file(
    path: &std::path::Path,
) -> anyhow::Result<(PreBoot, VmConfig, Option<Logger>, Option<Metrics>)> {
    let text = std::fs::read(path)
        .with_context(|| format!("--config-file {}: cannot read it", path.display()))?;
    let file: FullVmConfig =
        firecracker::parse(&text).map_err(|e| anyhow!("--config-file {}: {e}", path.display()))?;
    let (pre, config) =
        PreBoot::from_file(&file).map_err(|e| anyhow!("--config-file {}: {e}", path.display()))?;
    Ok((pre, config, file.logger, file.metrics))
}

fn start(config: &VmConfig) -> Result<(RunningVm, Option<TerminalGuard>), StartError> {
    let vm = vigil_vmm::builder::build(config)?;
    let terminal = (config.console == ConsoleConfig::Stdio)
        .then(TerminalGuard::enter)
        .flatten();
    let running = vm.start().map_err(StartError::Threads)?;
    Ok((running, terminal))
}

/// Builds back the VM a snapshot holds, with this process's console and crash
/// policy, and starts it (paused unless the load asked to resume).
fn restore(
    load: &SnapshotLoad,
    overrides: &Overrides,
) -> Result<(RunningVm, Option<TerminalGuard>), StartError> {
    let (console, on_crash) = (&overrides.console, overrides.on_crash);
    let mut vm = match &load.memory {
        SnapshotMemory::File(file) => {
            let o = vigil_vmm::builder::RestoreOptions {
                memory_compression: overrides.memory_compression,
                ..load.overrides.clone()
            };
            vigil_vmm::builder::restore(&load.state_path, file, &o, console, on_crash)?
        }
        SnapshotMemory::Uffd(_) if overrides.memory_compression.is_some() => {
            return Err(BuildError::SnapshotMismatch {
                field: "mem_backend.backend_type".into(),
                why: "Uffd: the page-fault handler fills guest memory, so this VMM's --memory-compression cannot page it; load with the File backend".into(),
            }
            .into());
        }
        SnapshotMemory::Uffd(handler) => {
            let o = &load.overrides;
            vigil_vmm::builder::restore_lazily(&load.state_path, handler, o, console, on_crash)?
        }
    };
    // Refused before the VM runs: a monitor that cannot go on from its baseline.
    if let Some(carried) = vm.extension(STATE_EXTENSION) {
        MonitorState::from_json(carried).map_err(|e| BuildError::SnapshotMismatch {
            field: format!("extensions.{STATE_EXTENSION}"),
            why: e.to_string(),
        })?;
    }
    vm.poll_rings_for(std::time::Duration::from_micros(
        overrides.io_poll_us.into(),
    ));
    if !load.resume {
        vm.start_paused();
    }
    let terminal = (overrides.console == ConsoleConfig::Stdio)
        .then(TerminalGuard::enter)
        .flatten();
    let running = vm.start().map_err(StartError::Threads)?;
    Ok((running, terminal))
}

/// Serves the API (if asked), starts the VM (at once or on `InstanceStart`) and
/// waits for it to end.
pub fn launch(l: Launch, logging: &Logging) -> anyhow::Result<ExitCode> {
    if l.seccomp {
        vigil_seccomp::enable()?;
    } else {
        tracing::warn!(
            "--no-seccomp: the VMM's threads run without seccomp filters; use it only to debug"
        );
    }
    let (to_vmm, from_api) = mpsc::channel();
    let api = Api::new(l.id.clone(), to_vmm.clone(), Some(logging.hook()));
    api.set_preboot(l.pre);
    if let Some(limit) = l.mmds.size_limit {
        api.mmds().set_size_limit(limit);
    }
    if let Some(path) = &l.mmds.metadata {
        let shown = path.display();
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow!("--metadata {shown}: cannot read it: {e}"))?;
        let data = serde_json::from_str(&text)
            .map_err(|e| anyhow!("--metadata {shown}: not JSON: {e}"))?;
        api.mmds()
            .put(data)
            .map_err(|e| anyhow!("--metadata {shown}: {e}"))?;
    }
    if let Some(logger) = l.logger {
        api.configure_logger(logger)
            .map_err(|e| anyhow!("logger: {e}"))?;
    }
    if let Some(metrics) = l.metrics {
        api.configure_metrics(metrics)
            .map_err(|e| anyhow!("metrics: {e}"))?;
    }

    // SIGINT/SIGTERM: before the VM starts they end the process; after, the VM.
    let stop_slot: Arc<Mutex<Option<StopHandle>>> = Arc::new(Mutex::new(None));
    // Set by a signal before the VM starts: a wait for a migration ends.
    let stopped_waiting = Arc::new(AtomicI32::new(0));
    let stopped = stopped_waiting.clone();
    let mut signals = signal_hook::iterator::Signals::new([libc::SIGINT, libc::SIGTERM])
        .context("cannot install signal handlers")?;
    let signals_handle = signals.handle();
    let slot = stop_slot.clone();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            vigil_seccomp::confine(ThreadKind::Signals);
            for signal in signals.forever() {
                match slot.lock().ok().and_then(|s| s.clone()) {
                    Some(stop) => stop.stop(signal),
                    None => {
                        stopped.store(signal, Ordering::Release);
                        let _ = to_vmm.send(ToVmm::Stop(signal));
                    }
                }
            }
        })
        .context("cannot start the signal thread")?;

    // The migration port listens before the API answers: whoever waits for the
    // API (vigild) then tells the source to connect.
    let listener = match (&l.boot_now, &l.incoming) {
        (None, Some(Incoming { from, tls, .. })) => {
            let listener = from
                .listen()
                .with_context(|| format!("--migrate-from {from}: cannot listen there"))?;
            Some(match tls {
                Some(tls) => listener.with_tls(tls.clone()),
                None => listener,
            })
        }
        _ => None,
    };
    let server = match &l.api_sock {
        Some(path) => Some(vigil_api::serve(path, api.clone())?),
        None => None,
    };

    let (running, _terminal, introspector) = match (l.boot_now, &l.incoming, listener) {
        (None, Some(Incoming { from, token, tls }), Some(listener)) => {
            eprintln!(
                "vigil: waiting for a VM to migrate here, on {}{}",
                listener.local(),
                if tls.is_some() { " (TLS)" } else { "" }
            );
            // The arriving interfaces that reach MMDS reach this API's store.
            let overrides = vigil_vmm::builder::RestoreOptions {
                mmds: Some(api.mmds().clone()),
                memory_compression: l.overrides.memory_compression,
                ..Default::default()
            };
            let received = vigil_migration::receive(
                &listener,
                token,
                &overrides,
                &l.overrides.console,
                l.overrides.on_crash,
                &|e| eprintln!("vigil: a migration attempt failed: {e}; still waiting"),
                &|| stopped_waiting.load(Ordering::Acquire) != 0,
            );
            let running = match received {
                Ok(running) => running,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {
                    let signal = stopped_waiting.load(Ordering::Acquire);
                    signals_handle.close();
                    drop(server);
                    eprintln!("vigil: stopped by signal {signal} before a VM arrived");
                    return Ok(ExitCode::from(128 + signal as u8));
                }
                Err(e) => return Err(anyhow!("--migrate-from {from}: {e}")),
            };
            eprintln!("vigil: the VM arrived and runs here");
            if let Ok(mut s) = stop_slot.lock() {
                *s = Some(running.stop_handle());
            }
            let introspector = attach_introspection(&api, &running, &l.overrides.introspect);
            api.set_running(running.control());
            (running, None, introspector)
        }
        (boot_now, _, _) => match boot_now {
            Some(mut config) => {
                l.overrides.apply(&mut config);
                config.share_mmds(api.mmds());
                // A BuildError stays one: the CLI names its field after the flag
                // (`cli::named_as_flags`).
                let (running, terminal) = start(&config).map_err(|e| match e {
                    StartError::Build(e) => anyhow::Error::from(e),
                    e => e.into(),
                })?;
                if let Ok(mut s) = stop_slot.lock() {
                    *s = Some(running.stop_handle());
                }
                let introspector = attach_introspection(&api, &running, &l.overrides.introspect);
                api.set_running(running.control());
                (running, terminal, introspector)
            }
            None => loop {
                let (started, reply) = match from_api.recv() {
                    Ok(ToVmm::Start { config, reply }) => {
                        let mut config = *config;
                        l.overrides.apply(&mut config);
                        (start(&config), reply)
                    }
                    Ok(ToVmm::Restore { load, reply }) => (restore(&load, &l.overrides), reply),
                    Ok(ToVmm::Stop(signal)) => {
                        signals_handle.close();
                        drop(server);
                        eprintln!("vigil: stopped by signal {signal} before the VM started");
                        return Ok(ExitCode::from(128 + signal as u8));
                    }
                    Err(_) => return Err(anyhow!("the API thread ended")),
                };
                match started {
                    Ok((running, terminal)) => {
                        if let Ok(mut s) = stop_slot.lock() {
                            *s = Some(running.stop_handle());
                        }
                        let introspector =
                            attach_introspection(&api, &running, &l.overrides.introspect);
                        let _ = reply.send(Ok(running.control()));
                        break (running, terminal, introspector);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            },
        },
    };
    api.set_migrator(Migrator::new(running.control(), running.inspect()));
    // Only where metrics are configured, or may be through the API.
    let flusher = if api.metrics_configured() || server.is_some() {
        Some(spawn_metrics_flusher(api.clone())?)
    } else {
        None
    };
    // Crash reports name the function at RIP: the symbols are read then, if ever.
    let symbols = running.symbols().clone();
    let carried = match running
        .extension(STATE_EXTENSION)
        .map(MonitorState::from_json)
    {
        None => None,
        Some(Ok(state)) => Some(state),
        // A loaded snapshot's was checked before its VM ran: a VM that arrived
        // by migration, whose source has ended, runs on.
        Some(Err(e)) => {
            eprintln!("vigil: {e}: it does not go on here");
            None
        }
    };
    if let Err(e) = l.overrides.introspect.start(&introspector, carried) {
        running.stop_handle().stop(libc::SIGTERM);
        let _ = running.wait();
        return Err(e);
    }
    // Every thread of the VM is started: from here this one only waits and reports.
    vigil_seccomp::confine(ThreadKind::Main);
    let describe = |addr| symbols.get().and_then(|s| s.describe(addr));
    let outcome = running.wait_reporting(&mut |report| {
        eprint!(
            "vigil: the guest crashed.\n{}vigil: --on-crash pause: the VM is kept, paused, for inspection until it is stopped (SIGTERM, Ctrl-C, or the API)\n",
            report.render(&describe)
        );
    });
    introspector.shutdown();
    if matches!(outcome, vigil_vmm::VmOutcome::Migrated(_)) && server.is_some() {
        api.await_migration_summary_read(MIGRATION_SUMMARY_WAIT);
    }
    signals_handle.close();
    if let Some(flusher) = flusher {
        flusher.finish();
    }
    if let Err(e) = api.flush_metrics() {
        tracing::debug!("no metrics at exit: {e}");
    }
    drop(server);
    Ok(crate::cli::exit_code(outcome, &describe))
}

/// Lends the running VM's inspection handle to introspection, and introspection to
/// the API, before the API reports the VM as running (so that whoever sees it
/// running can introspect it at once). The API itself gets the lifecycle handle.
fn attach_introspection(
    api: &Api,
    running: &RunningVm,
    settings: &IntrospectLaunch,
) -> Arc<Introspector> {
    let counters = running.metrics().metrics().introspect().clone();
    let introspector = Introspector::new(running.inspect(), counters);
    // Snapshots and migrations carry the monitor.
    running
        .control()
        .set_state_extension(STATE_EXTENSION, introspector.state_extension());
    api.set_introspector(introspector.clone(), settings.debug_api);
    introspector
}

/// How long the API stays up after the VM migrated away, for whoever follows the
/// migration to read how it ended (a daemon polls every few milliseconds then).
const MIGRATION_SUMMARY_WAIT: Duration = Duration::from_millis(500);

/// How often a metrics line is written while the VM runs (as Firecracker does).
const METRICS_INTERVAL: Duration = Duration::from_secs(60);

/// The thread that writes a metrics line every [`METRICS_INTERVAL`] (once metrics
/// are configured, by `--metrics-path`, the config file or `PUT /metrics`).
struct MetricsFlusher {
    stop: mpsc::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

fn spawn_metrics_flusher(api: Arc<Api>) -> anyhow::Result<MetricsFlusher> {
    let (stop, stopped) = mpsc::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            vigil_seccomp::confine(ThreadKind::Metrics);
            while let Err(mpsc::RecvTimeoutError::Timeout) = stopped.recv_timeout(METRICS_INTERVAL)
            {
                if let Err(e) = api.flush_metrics() {
                    tracing::debug!("no periodic metrics line: {e}");
                }
            }
        })
        .context("cannot start the metrics thread")?;
    Ok(MetricsFlusher { stop, thread })
}

impl MetricsFlusher {
    fn finish(self) {
        drop(self.stop);
        let _ = self.thread.join();
    }
}
