//! VM processes: spawning, reaping, forwarding to their API sockets, stopping.
//!
//! Each VM is one `vigil run --api-sock DIR/api.sock --config-file DIR/config.json`
//! (with `--introspect`, `--trace-syscalls`, `--debug-api` when the create request asks)
//! process, DIR being `<state-dir>/vms/<id>`. Its serial console (stdout) goes to
//! `DIR/console.log` and its own log (stderr) to `DIR/vmm.log`. One task per VM owns
//! the process handle: it alone reaps the process, and it alone signals it, so a
//! signal can never reach a recycled pid. A VM that ends is never restarted: its
//! record keeps how it ended (and the tails of its logs) until it is destroyed.

use std::collections::BTreeMap;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use crate::client;
use crate::error::ApiError;
use crate::events::{Event, Events, Priority, ThrottleLimits};
use crate::id::validate_id;

/// How many bytes of a VM's stderr and console logs its record keeps when it ends.
pub const TAIL_BYTES: u64 = 4096;

/// Where a VM is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    /// Its process is starting; its API socket has not reported it running yet.
    Starting,
    Running,
    Paused,
    /// A stop was asked for; the process has not exited yet.
    Stopping,
    /// It exited after a stop (from the daemon, or a SIGTERM/SIGINT from elsewhere).
    Stopped,
    /// It exited on its own: the guest powered off, reset, or wrote a debug-exit status.
    Exited,
    /// The guest crashed (exit status 3) or the VMM was killed by a signal.
    Crashed,
    /// The VMM itself failed (exit status 1 or 2: bad configuration, KVM error).
    Failed,
}

impl VmState {
    /// Whether its process may still be alive.
    pub fn is_live(self) -> bool {
        matches!(
            self,
            VmState::Starting | VmState::Running | VmState::Paused | VmState::Stopping
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Stopping => "stopping",
            VmState::Stopped => "stopped",
            VmState::Exited => "exited",
            VmState::Crashed => "crashed",
            VmState::Failed => "failed",
        }
    }

    pub const ALL: [VmState; 8] = [
        VmState::Starting,
        VmState::Running,
        VmState::Paused,
        VmState::Stopping,
        VmState::Stopped,
        VmState::Exited,
        VmState::Crashed,
        VmState::Failed,
    ];
}

/// How a VM process ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitInfo {
    /// Its exit status, when it exited.
    pub code: Option<i32>,
    /// The signal that killed it, when one did.
    pub signal: Option<i32>,
    /// What that means, in words.
    pub reason: String,
    /// When it ended (seconds since the Unix epoch).
    pub at_unix_s: u64,
}

/// What the API reports about a VM.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmInfo {
    pub id: String,
    pub state: VmState,
    /// The VMM process's pid while it runs.
    pub pid: Option<u32>,
    pub vcpus: Option<u64>,
    pub memory_mib: Option<u64>,
    /// When the daemon created it (seconds since the Unix epoch).
    pub created_at_unix_s: u64,
    /// Seconds from its start to now, or to its end.
    pub uptime_s: f64,
    /// Its folder: config.json, api.sock, console.log, vmm.log, exit.json.
    pub dir: PathBuf,
    pub api_socket: PathBuf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exit: Option<ExitInfo>,
    /// The end of its VMM log (stderr), once it has ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stderr_tail: Option<String>,
    /// The end of its serial console, once it has ended.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub console_tail: Option<String>,
    /// The configuration it was created from (only when one VM is inspected).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config: Option<serde_json::Value>,
    /// Introspection from the start, as created (`introspect` of `POST /vms`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub introspect: Option<IntrospectSpec>,
    /// System call tracing from the start, into `dir/syscalls.jsonl`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_syscalls: Option<TraceSpec>,
    /// Whether the VM's API serves the debug writes (tests only).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub debug_api: bool,
}

/// How to stop a VM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StopMethod {
    /// SIGTERM to the VMM, which stops the VM cleanly and exits.
    #[default]
    Sigterm,
    /// Ctrl+Alt+Del to the guest through the VM's API (a Linux guest with
    /// `reboot=k` shuts down), then SIGTERM if it has not exited within the timeout.
    CtrlAltDel,
}

/// The daemon's settings for supervising VMs.
#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    /// Where VM folders live (`<state_dir>/vms/<id>`).
    pub state_dir: PathBuf,
    /// The `vigil` binary to run each VM with.
    pub vmm_binary: PathBuf,
    /// How long a VM may take to report itself running on its API socket.
    pub start_timeout: Duration,
    /// How long a stop waits after SIGTERM before SIGKILL.
    pub stop_timeout: Duration,
    /// How long one request to a VM's API socket may take.
    pub vm_request_timeout: Duration,
    /// The most VMs (in any state) the daemon keeps.
    pub max_vms: usize,
}

struct Status {
    state: VmState,
    pid: Option<u32>,
    ended: Option<Instant>,
    exit: Option<ExitInfo>,
    stderr_tail: Option<String>,
    console_tail: Option<String>,
    stop_requested: bool,
}

/// One VM the daemon supervises.
pub struct Vm {
    id: String,
    dir: PathBuf,
    api_socket: PathBuf,
    config: serde_json::Value,
    /// Introspection and the debug API, as the create request asked.
    options: LaunchOptions,
    vcpus: Option<u64>,
    memory_mib: Option<u64>,
    created_at: SystemTime,
    started: Instant,
    status: Mutex<Status>,
    /// Signals for the task that owns the process.
    signals: mpsc::UnboundedSender<i32>,
    /// Turns true once the process has been reaped and its record updated.
    ended: watch::Receiver<bool>,
}

fn unix_s(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Vm {
    fn status(&self) -> MutexGuard<'_, Status> {
        // A panic while holding the lock cannot leave the status half-written in a way
        // that matters more than losing the VM; keep serving.
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn api_socket(&self) -> &Path {
        &self.api_socket
    }

    pub fn state(&self) -> VmState {
        self.status().state
    }

    /// The record the API reports; `full` adds the configuration.
    pub fn info(&self, full: bool) -> VmInfo {
        let status = self.status();
        let end = status.ended.unwrap_or_else(Instant::now);
        VmInfo {
            id: self.id.clone(),
            state: status.state,
            pid: status.pid,
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            created_at_unix_s: unix_s(self.created_at),
            uptime_s: end.saturating_duration_since(self.started).as_secs_f64(),
            dir: self.dir.clone(),
            api_socket: self.api_socket.clone(),
            exit: status.exit.clone(),
            stderr_tail: status.stderr_tail.clone(),
            console_tail: status.console_tail.clone(),
            config: full.then(|| self.config.clone()),
            introspect: self.options.introspect.clone(),
            trace_syscalls: self.options.trace_syscalls.clone(),
            debug_api: self.options.debug_api,
        }
    }

    fn signal(&self, signal: i32) {
        // The owning task is gone only once the process has been reaped.
        let _ = self.signals.send(signal);
    }

    /// Waits until the process has been reaped, at most `timeout`; whether it was.
    async fn wait_ended(&self, timeout: Duration) -> bool {
        let mut ended = self.ended.clone();
        let done = matches!(
            tokio::time::timeout(timeout, ended.wait_for(|e| *e)).await,
            Ok(Ok(_))
        );
        done
    }
}

/// Describes how a VMM process ended: the state it leaves the VM in, and why.
pub fn classify(status: ExitStatus, stop_requested: bool) -> (VmState, ExitInfo) {
    let code = status.code();
    let signal = status.signal();
    let (state, reason) = match (code, signal) {
        (Some(c), _) if stop_requested => (VmState::Stopped, format!("stopped by the daemon (exit status {c})")),
        (None, Some(s)) if stop_requested => (
            VmState::Stopped,
            format!("stopped by the daemon (killed by signal {s})"),
        ),
        (Some(0), _) => (
            VmState::Exited,
            "the guest powered off or reset (exit status 0)".into(),
        ),
        (Some(3), _) => (
            VmState::Crashed,
            "the guest crashed: triple fault, KVM internal or emulation error (exit status 3; the report is in stderr_tail)".into(),
        ),
        (Some(c @ (1 | 2)), _) => (
            VmState::Failed,
            format!("the VMM failed (exit status {c}; the message is in stderr_tail)"),
        ),
        (Some(c @ (130 | 143)), _) => (
            VmState::Stopped,
            format!(
                "stopped by {} from outside the daemon (exit status {c})",
                if c == 130 { "SIGINT" } else { "SIGTERM" }
            ),
        ),
        (Some(c @ 32..=255), _) => (
            VmState::Exited,
            format!(
                "the guest wrote status {} to the debug-exit port (exit status {c})",
                c - 32
            ),
        ),
        (Some(c), _) => (VmState::Failed, format!("the VMM exited with status {c}")),
        (None, Some(s)) => (
            VmState::Crashed,
            format!("the VMM was killed by signal {s} ({})", signal_name(s)),
        ),
        (None, None) => (VmState::Crashed, "the VMM ended for an unknown reason".into()),
    };
    let info = ExitInfo {
        code,
        signal,
        reason,
        at_unix_s: unix_s(SystemTime::now()),
    };
    (state, info)
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGILL => "SIGILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        _ => "see kill -l",
    }
}

/// The last `max` bytes of the file at `path` (from a line start when it was cut).
pub fn tail(path: &Path, max: u64) -> Option<String> {
    let mut file = std::fs::File::open(path).ok()?;
    let len = file.metadata().ok()?.len();
    let start = len.saturating_sub(max);
    file.seek(SeekFrom::Start(start)).ok()?;
    let mut bytes = Vec::new();
    file.take(max).read_to_end(&mut bytes).ok()?;
    let mut text = String::from_utf8_lossy(&bytes).into_owned();
    if start > 0 {
        if let Some(nl) = text.find('\n') {
            text.drain(..=nl);
        }
    }
    Some(text)
}

/// The VMs, by id.
pub struct Supervisor {
    config: SupervisorConfig,
    vms: Mutex<BTreeMap<String, Arc<Vm>>>,
    /// The security event stream (lifecycle events, crashes, ...).
    events: Events,
}

/// The request to create a VM.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRequest {
    pub id: String,
    /// A Firecracker-style VM configuration (the JSON `--config-file` takes).
    pub config: serde_json::Value,
    /// Watch the guest kernel's integrity from its start (`vigil run --introspect`).
    #[serde(default)]
    pub introspect: Option<IntrospectSpec>,
    /// Trace the guest's system calls from its start into `DIR/syscalls.jsonl`
    /// (`vigil run --trace-syscalls`).
    #[serde(default)]
    pub trace_syscalls: Option<TraceSpec>,
    /// Serve `PUT /vigil/debug/memory` and `/vigil/debug/msr` on the VM's API
    /// socket (`vigil run --debug-api`): writes into the guest, for tests only.
    #[serde(default)]
    pub debug_api: bool,
}

/// The longest introspection period and baseline delay (`vigil run` refuses more).
pub const MAX_INTROSPECT_MS: u64 = 3_600_000;

/// `introspect` in a create request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntrospectSpec {
    /// Milliseconds between checks, 1 to 3600000 (the VMM's default: 1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period_ms: Option<u64>,
    /// `report` (the default) or `protect` (guest writes to the syscall MSRs fault).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// Milliseconds from the VM's start to the baseline, up to 3600000 (the VMM's
    /// default: 1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline_after_ms: Option<u64>,
}

impl IntrospectSpec {
    /// Refuses values the VMM would refuse, naming the field and the value.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(p) = self.period_ms {
            if !(1..=MAX_INTROSPECT_MS).contains(&p) {
                return Err(format!(
                    "introspect.period_ms {p}: expected 1 to {MAX_INTROSPECT_MS}"
                ));
            }
        }
        if let Some(b) = self.baseline_after_ms {
            if b > MAX_INTROSPECT_MS {
                return Err(format!(
                    "introspect.baseline_after_ms {b}: expected 0 to {MAX_INTROSPECT_MS}"
                ));
            }
        }
        if let Some(p) = &self.policy {
            if p != "report" && p != "protect" {
                return Err(format!(
                    "introspect.policy {p:?}: expected \"report\" or \"protect\""
                ));
            }
        }
        Ok(())
    }

    /// The value of `vigil run --introspect=`: `period=100ms,policy=protect,...`.
    pub fn arg(&self) -> String {
        let mut parts = Vec::new();
        if let Some(p) = self.period_ms {
            parts.push(format!("period={p}ms"));
        }
        if let Some(p) = &self.policy {
            parts.push(format!("policy={p}"));
        }
        if let Some(b) = self.baseline_after_ms {
            parts.push(format!("baseline_after={b}ms"));
        }
        parts.join(",")
    }
}

/// `trace_syscalls` in a create request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceSpec {
    /// Which calls: comma-separated names or numbers (`read,write,59`), optionally
    /// `cr3=0x...` for one process (`vigil run --trace-filter`). Default: all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub syscalls: Option<String>,
}

impl TraceSpec {
    /// Refuses what cannot be a filter, naming the field and the value (the VMM
    /// checks the names themselves).
    pub fn validate(&self) -> Result<(), String> {
        if let Some(s) = &self.syscalls {
            let fine = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | ',' | '=');
            if s.is_empty() || s.len() > 4096 || !s.chars().all(fine) {
                return Err(format!(
                    "trace_syscalls.syscalls {s:?}: expected comma-separated system call names or numbers (read,write,59), optionally cr3=0x..."
                ));
            }
        }
        Ok(())
    }
}

/// How the VMM process is started, besides its configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct LaunchOptions {
    introspect: Option<IntrospectSpec>,
    trace_syscalls: Option<TraceSpec>,
    debug_api: bool,
}

impl LaunchOptions {
    /// The `vigil run` arguments; `dir` is the VM's folder.
    fn args(&self, dir: &Path) -> Vec<std::ffi::OsString> {
        // Findings outlive the process there, for the sampler to read once it ended.
        let mut args: Vec<std::ffi::OsString> = vec![
            "--findings-path".into(),
            dir.join(crate::findings::FINDINGS_FILE).into(),
        ];
        if let Some(i) = &self.introspect {
            args.push(format!("--introspect={}", i.arg()).into());
        }
        if let Some(t) = &self.trace_syscalls {
            args.push("--trace-syscalls".into());
            args.push(dir.join(SYSCALLS_FILE).into());
            if let Some(f) = &t.syscalls {
                args.push(format!("--trace-filter={f}").into());
            }
        }
        if self.debug_api {
            args.push("--debug-api".into());
        }
        args
    }
}

/// Where a VM created with `trace_syscalls` writes its calls, in its folder.
pub const SYSCALLS_FILE: &str = "syscalls.jsonl";

fn machine_field(config: &serde_json::Value, field: &str) -> Option<u64> {
    config.get("machine-config")?.get(field)?.as_u64()
}

impl Supervisor {
    pub fn new(config: SupervisorConfig, events: Events) -> Self {
        Supervisor {
            config,
            vms: Mutex::new(BTreeMap::new()),
            events,
        }
    }

    /// Where VM lifecycle events (and every other security event) go.
    pub fn events(&self) -> &Events {
        &self.events
    }

    pub fn config(&self) -> &SupervisorConfig {
        &self.config
    }

    fn table(&self) -> MutexGuard<'_, BTreeMap<String, Arc<Vm>>> {
        self.vms.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// All VMs, in id order.
    pub fn list(&self) -> Vec<Arc<Vm>> {
        self.table().values().cloned().collect()
    }

    pub fn get(&self, id: &str) -> Result<Arc<Vm>, ApiError> {
        self.table()
            .get(id)
            .cloned()
            .ok_or_else(|| ApiError::not_found(format!("no VM with id {id:?}")))
    }

    fn vm_dir(&self, id: &str) -> PathBuf {
        self.config.state_dir.join("vms").join(id)
    }

    /// Creates a VM: writes its folder, starts its process and waits until its API
    /// socket reports it running (or it ends, or `start_timeout` passes).
    pub async fn create(&self, request: CreateRequest) -> Result<VmInfo, ApiError> {
        validate_id(&request.id).map_err(ApiError::bad_request)?;
        if !request.config.is_object() {
            return Err(ApiError::bad_request(format!(
                "config must be a JSON object (a Firecracker-style VM configuration with \"boot-source\", \"machine-config\", ...), not {}",
                json_kind(&request.config)
            )));
        }
        if let Some(i) = &request.introspect {
            i.validate().map_err(ApiError::bad_request)?;
        }
        if let Some(t) = &request.trace_syscalls {
            t.validate().map_err(ApiError::bad_request)?;
        }
        let options = LaunchOptions {
            introspect: request.introspect,
            trace_syscalls: request.trace_syscalls,
            debug_api: request.debug_api,
        };
        let id = request.id;
        let dir = self.vm_dir(&id);
        let api_socket = dir.join("api.sock");
        // Reserve the id first, so that two creates of one id cannot both proceed.
        let (signal_tx, signal_rx) = mpsc::unbounded_channel();
        let (ended_tx, ended_rx) = watch::channel(false);
        let vm = Arc::new(Vm {
            id: id.clone(),
            dir: dir.clone(),
            api_socket: api_socket.clone(),
            vcpus: machine_field(&request.config, "vcpu_count"),
            memory_mib: machine_field(&request.config, "mem_size_mib"),
            config: request.config,
            options,
            created_at: SystemTime::now(),
            started: Instant::now(),
            status: Mutex::new(Status {
                state: VmState::Starting,
                pid: None,
                ended: None,
                exit: None,
                stderr_tail: None,
                console_tail: None,
                stop_requested: false,
            }),
            signals: signal_tx,
            ended: ended_rx,
        });
        {
            let mut table = self.table();
            if table.contains_key(&id) {
                return Err(ApiError::conflict(format!(
                    "a VM with id {id:?} already exists: destroy it first or pick another id"
                )));
            }
            if table.len() >= self.config.max_vms {
                return Err(ApiError::new(
                    axum::http::StatusCode::TOO_MANY_REQUESTS,
                    format!(
                        "the daemon already holds {} VMs (--max-vms {}): destroy some first",
                        table.len(),
                        self.config.max_vms
                    ),
                ));
            }
            table.insert(id.clone(), vm.clone());
        }
        match self.launch(&vm, signal_rx, ended_tx).await {
            Ok(()) => {}
            Err(e) => {
                self.table().remove(&id);
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e);
            }
        }
        let info = self.wait_started(&vm).await?;
        self.events.lifecycle(
            &id,
            "created",
            info.state,
            Priority::Informational,
            serde_json::json!({ "vm.vcpus": info.vcpus, "vm.memory_mib": info.memory_mib, "proc.pid": info.pid }),
        );
        Ok(info)
    }

    /// Prepares the folder and spawns the process with its reaper.
    async fn launch(
        &self,
        vm: &Arc<Vm>,
        signals: mpsc::UnboundedReceiver<i32>,
        ended: watch::Sender<bool>,
    ) -> Result<(), ApiError> {
        let dir = &vm.dir;
        if dir.exists() {
            // Left by an earlier daemon. Its VM would have been stopped with it (the
            // parent-death signal), but check before taking the folder over.
            if client::request(&vm.api_socket, "GET", "/", None, Duration::from_millis(200))
                .await
                .is_ok()
            {
                return Err(ApiError::conflict(format!(
                    "{} belongs to a VM that still answers on its API socket (not started by this daemon): stop it, or pick another id",
                    dir.display()
                )));
            }
            std::fs::remove_dir_all(dir).map_err(|e| {
                ApiError::internal(format!("cannot remove stale {}: {e}", dir.display()))
            })?;
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| ApiError::internal(format!("cannot create {}: {e}", dir.display())))?;
        let config_path = dir.join("config.json");
        let open = |name: &str| {
            let path = dir.join(name);
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&path)
                .map_err(|e| ApiError::internal(format!("cannot create {}: {e}", path.display())))
        };
        let config_bytes = serde_json::to_vec_pretty(&vm.config)
            .map_err(|e| ApiError::internal(format!("cannot encode the config: {e}")))?;
        std::io::Write::write_all(&mut open("config.json")?, &config_bytes).map_err(|e| {
            ApiError::internal(format!("cannot write {}: {e}", config_path.display()))
        })?;
        let console = open("console.log")?;
        let stderr = open("vmm.log")?;

        let mut command = tokio::process::Command::new(&self.config.vmm_binary);
        command
            .arg("run")
            .arg("--api-sock")
            .arg(&vm.api_socket)
            .arg("--config-file")
            .arg(&config_path)
            .args(vm.options.args(dir))
            .stdin(Stdio::null())
            .stdout(console)
            .stderr(stderr)
            // Its own process group: a Ctrl-C on the daemon's terminal reaches the
            // daemon alone, which then stops its VMs in order.
            .process_group(0)
            .kill_on_drop(false);
        // SAFETY: the closure runs in the child between fork and exec and only makes
        // async-signal-safe calls (prctl, getppid, _exit). PR_SET_PDEATHSIG makes the VM
        // get SIGTERM when the daemon dies, even by SIGKILL, so no VM outlives its
        // supervisor unnoticed; the getppid check closes the race with a daemon that
        // died before the prctl. (The signal follows the spawning thread; the daemon
        // spawns from its runtime's worker threads, which live as long as it does.)
        unsafe {
            let parent = libc::getpid();
            command.pre_exec(move || {
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGTERM as libc::c_ulong,
                    0,
                    0,
                    0,
                ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::getppid() != parent {
                    libc::_exit(143);
                }
                Ok(())
            });
        }
        let child = command.spawn().map_err(|e| {
            ApiError::internal(format!(
                "cannot start {}: {e}",
                self.config.vmm_binary.display()
            ))
        })?;
        vm.status().pid = child.id();
        tracing::info!(id = %vm.id, pid = ?child.id(), "VM process started");
        tokio::spawn(reap(vm.clone(), child, signals, ended, self.events.clone()));
        Ok(())
    }

    async fn wait_started(&self, vm: &Arc<Vm>) -> Result<VmInfo, ApiError> {
        let deadline = Instant::now() + self.config.start_timeout;
        let mut pause = Duration::from_millis(2);
        loop {
            let state = vm.state();
            if state != VmState::Starting {
                break;
            }
            if vm.api_socket.exists() {
                if let Ok(response) =
                    client::request(&vm.api_socket, "GET", "/", None, Duration::from_millis(500))
                        .await
                {
                    if let Some(s @ (VmState::Running | VmState::Paused)) =
                        reported_state(&response)
                    {
                        let mut status = vm.status();
                        if status.state == VmState::Starting {
                            status.state = s;
                        }
                        break;
                    }
                }
            }
            if Instant::now() >= deadline {
                tracing::warn!(id = %vm.id, "VM did not report itself running in time; stopping it");
                self.stop_vm(vm, StopMethod::Sigterm, Duration::from_secs(2))
                    .await;
                let info = vm.info(false);
                self.remove(vm).await;
                return Err(ApiError::new(
                    axum::http::StatusCode::GATEWAY_TIMEOUT,
                    format!(
                        "VM {:?} did not report itself running on {} within {:?}; it was stopped and removed. Its log ended with: {}",
                        vm.id,
                        vm.api_socket.display(),
                        self.config.start_timeout,
                        info.stderr_tail.as_deref().map(last_lines).unwrap_or_default()
                    ),
                ));
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(10));
        }
        // A VMM that refused its configuration is not a VM: report why and forget it.
        if vm.state() == VmState::Failed {
            let info = vm.info(false);
            self.remove(vm).await;
            let exit = info.exit.map(|e| e.reason).unwrap_or_default();
            return Err(ApiError::bad_request(format!(
                "VM {:?} failed to start: {exit}: {}",
                vm.id,
                info.stderr_tail
                    .as_deref()
                    .map(last_lines)
                    .unwrap_or_default()
            )));
        }
        Ok(vm.info(false))
    }

    /// Pauses or resumes a VM through its API socket.
    pub async fn set_paused(&self, id: &str, paused: bool) -> Result<VmInfo, ApiError> {
        let vm = self.get(id)?;
        let (from, to, word) = if paused {
            (VmState::Running, VmState::Paused, "paused")
        } else {
            (VmState::Paused, VmState::Running, "resumed")
        };
        let state = vm.state();
        if state == to {
            return Ok(vm.info(false));
        }
        if state != from {
            return Err(ApiError::conflict(format!(
                "VM {id:?} is {}: only a {} VM can be {word}",
                state.as_str(),
                from.as_str()
            )));
        }
        let body = serde_json::json!({ "state": if paused { "Paused" } else { "Resumed" } });
        self.patch_vm(&vm, "/vm", &body, &format!("to be {word}"))
            .await?;
        {
            let mut status = vm.status();
            if status.state == from {
                status.state = to;
            }
        }
        tracing::info!(id, "VM {word}");
        self.events
            .lifecycle(id, word, to, Priority::Informational, serde_json::json!({}));
        Ok(vm.info(false))
    }

    /// Sets rate limits on a live VM's drives and network interfaces (those of its
    /// configuration) through its API socket (`PATCH /drives/{id}`, `PATCH
    /// /network-interfaces/{id}`); returns what it limited. Fails when the VM is
    /// not running or paused, has no device the limits apply to, or refuses one.
    pub async fn throttle(
        &self,
        id: &str,
        limits: ThrottleLimits,
    ) -> Result<Vec<String>, ApiError> {
        let vm = self.get(id)?;
        let state = vm.state();
        if !matches!(state, VmState::Running | VmState::Paused) {
            return Err(ApiError::conflict(format!(
                "VM {id:?} is {}: only a running or paused VM can be throttled",
                state.as_str()
            )));
        }
        let ids = |list: &str, key: &str| -> Vec<String> {
            vm.config
                .get(list)
                .and_then(serde_json::Value::as_array)
                .map(|items| {
                    items
                        .iter()
                        .filter_map(|d| d.get(key)?.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default()
        };
        let mut requests = Vec::new();
        if let Some(limiter) = ThrottleLimits::rate_limiter(limits.disk_ops, limits.disk_bytes) {
            for drive in ids("drives", "drive_id") {
                let body = serde_json::json!({"drive_id": drive, "rate_limiter": limiter});
                requests.push((format!("/drives/{drive}"), format!("drive {drive}"), body));
            }
        }
        if let Some(limiter) = ThrottleLimits::rate_limiter(limits.net_packets, limits.net_bytes) {
            for iface in ids("network-interfaces", "iface_id") {
                let body = serde_json::json!({
                    "iface_id": iface, "rx_rate_limiter": limiter, "tx_rate_limiter": limiter,
                });
                requests.push((
                    format!("/network-interfaces/{iface}"),
                    format!("interface {iface}"),
                    body,
                ));
            }
        }
        if requests.is_empty() {
            return Err(ApiError::conflict(format!(
                "VM {id:?} has no drive or network interface that the limits {limits:?} apply to"
            )));
        }
        let mut done = Vec::new();
        for (path, what, body) in requests {
            self.patch_vm(&vm, &path, &body, &format!("PATCH {path}"))
                .await?;
            done.push(what);
        }
        Ok(done)
    }

    /// Sends `PATCH path` with `body` to the VM's API socket; `what` names the
    /// request in errors ("VM \"a\" refused <what> (HTTP 400): ...").
    async fn patch_vm(
        &self,
        vm: &Vm,
        path: &str,
        body: &serde_json::Value,
        what: &str,
    ) -> Result<(), ApiError> {
        let id = &vm.id;
        let response = client::request(
            &vm.api_socket,
            "PATCH",
            path,
            Some(body.to_string().into_bytes()),
            self.config.vm_request_timeout,
        )
        .await
        .map_err(|e| ApiError::bad_gateway(format!("VM {id:?}: {what}: {e}")))?;
        if !response.is_success() {
            return Err(ApiError::bad_gateway(format!(
                "VM {id:?} refused {what} (HTTP {}): {}",
                response.status,
                response.fault_message()
            )));
        }
        Ok(())
    }

    /// Asks the VM's API socket for its state ("Running"/"Paused"), to refresh the
    /// record; a VM paused or resumed behind the daemon's back is noticed here.
    pub async fn refresh(&self, vm: &Vm) {
        if !matches!(vm.state(), VmState::Running | VmState::Paused) {
            return;
        }
        if let Ok(response) =
            client::request(&vm.api_socket, "GET", "/", None, Duration::from_millis(250)).await
        {
            if let Some(s @ (VmState::Running | VmState::Paused)) = reported_state(&response) {
                let mut status = vm.status();
                if matches!(status.state, VmState::Running | VmState::Paused) {
                    status.state = s;
                }
            }
        }
    }

    /// Stops a VM and waits until its process has been reaped.
    pub async fn stop(
        &self,
        id: &str,
        method: StopMethod,
        timeout: Duration,
    ) -> Result<VmInfo, ApiError> {
        let vm = self.get(id)?;
        self.stop_vm(&vm, method, timeout).await;
        Ok(vm.info(false))
    }

    async fn stop_vm(&self, vm: &Vm, method: StopMethod, timeout: Duration) {
        {
            let mut status = vm.status();
            if !status.state.is_live() {
                return;
            }
            status.stop_requested = true;
            status.state = VmState::Stopping;
        }
        tracing::info!(id = %vm.id, ?method, "stopping VM");
        self.events.lifecycle(
            &vm.id,
            "stopping",
            VmState::Stopping,
            Priority::Notice,
            serde_json::json!({ "method": method }),
        );
        if method == StopMethod::CtrlAltDel {
            let body = serde_json::json!({ "action_type": "SendCtrlAltDel" });
            let sent = client::request(
                &vm.api_socket,
                "PUT",
                "/actions",
                Some(body.to_string().into_bytes()),
                self.config.vm_request_timeout,
            )
            .await;
            match sent {
                Ok(r) if r.is_success() => {
                    if vm.wait_ended(timeout).await {
                        return;
                    }
                }
                Ok(r) => {
                    tracing::warn!(id = %vm.id, "SendCtrlAltDel refused: {}", r.fault_message())
                }
                Err(e) => tracing::warn!(id = %vm.id, "SendCtrlAltDel failed: {e}"),
            }
        }
        vm.signal(libc::SIGTERM);
        if vm.wait_ended(timeout).await {
            return;
        }
        tracing::warn!(id = %vm.id, "VM did not exit within {timeout:?} of SIGTERM; sending SIGKILL");
        vm.signal(libc::SIGKILL);
        if !vm.wait_ended(Duration::from_secs(10)).await {
            tracing::error!(id = %vm.id, "VM process survived SIGKILL for 10 s");
        }
    }

    async fn remove(&self, vm: &Vm) {
        {
            let mut table = self.table();
            if table
                .get(&vm.id)
                .is_some_and(|v| std::ptr::eq(Arc::as_ptr(v), vm))
            {
                table.remove(&vm.id);
            }
        }
        if let Err(e) = std::fs::remove_dir_all(&vm.dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(id = %vm.id, "cannot remove {}: {e}", vm.dir.display());
            }
        }
    }

    /// Stops a VM (when it runs) and removes it and its folder.
    pub async fn destroy(&self, id: &str, timeout: Duration) -> Result<(), ApiError> {
        let vm = self.get(id)?;
        self.stop_vm(&vm, StopMethod::Sigterm, timeout).await;
        self.remove(&vm).await;
        tracing::info!(id, "VM destroyed");
        self.events.lifecycle(
            id,
            "destroyed",
            vm.state(),
            Priority::Notice,
            serde_json::json!({}),
        );
        self.events.vm_destroyed(id);
        Ok(())
    }

    /// Stops every live VM, all at once (the daemon is shutting down).
    pub async fn stop_all(self: &Arc<Self>) {
        let mut tasks = tokio::task::JoinSet::new();
        for vm in self.list() {
            if vm.state().is_live() {
                let this = self.clone();
                let timeout = self.config.stop_timeout;
                tasks.spawn(async move { this.stop_vm(&vm, StopMethod::Sigterm, timeout).await });
            }
        }
        while tasks.join_next().await.is_some() {}
    }
}

fn reported_state(response: &client::Response) -> Option<VmState> {
    if !response.is_success() {
        return None;
    }
    match response.json()?.get("state")?.as_str()? {
        "Running" => Some(VmState::Running),
        "Paused" => Some(VmState::Paused),
        _ => None,
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// The last few non-empty lines of a log, on one line.
fn last_lines(text: &str) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(3)..].join(" | ")
}

/// A crash in a few words: what the VMM's report names (triple fault, KVM
/// internal error, emulation failure), or the signal that killed it.
fn crash_reason(exit: Option<&ExitInfo>, stderr_tail: Option<&str>) -> String {
    if let Some(signal) = exit.and_then(|e| e.signal) {
        return format!(
            "the VMM was killed by signal {signal} ({})",
            signal_name(signal)
        );
    }
    let log = stderr_tail.unwrap_or_default().to_ascii_lowercase();
    for (needle, reason) in [
        ("triple fault", "triple fault"),
        ("internal error", "KVM internal error"),
        ("emulation", "emulation failure"),
    ] {
        if log.contains(needle) {
            return reason.to_owned();
        }
    }
    exit.map_or_else(|| "unknown".to_owned(), |e| e.reason.clone())
}

/// Owns the process: forwards signals to it until it exits, then records how it ended.
async fn reap(
    vm: Arc<Vm>,
    mut child: tokio::process::Child,
    mut signals: mpsc::UnboundedReceiver<i32>,
    ended: watch::Sender<bool>,
    events: Events,
) {
    let status = loop {
        tokio::select! {
            status = child.wait() => break status,
            Some(signal) = signals.recv() => {
                if let Some(pid) = child.id() {
                    // SAFETY: kill has no memory effects; `pid` is our unreaped child
                    // (only this task reaps it), so it cannot name another process.
                    unsafe { libc::kill(pid as i32, signal) };
                }
            }
        }
    };
    let stderr_tail = tail(&vm.dir.join("vmm.log"), TAIL_BYTES);
    let console_tail = tail(&vm.dir.join("console.log"), TAIL_BYTES);
    {
        let mut s = vm.status();
        match status {
            Ok(status) => {
                let (state, exit) = classify(status, s.stop_requested);
                match state {
                    VmState::Crashed | VmState::Failed => tracing::warn!(
                        id = %vm.id,
                        "VM {}: {} (not restarted); last log lines: {}",
                        state.as_str(),
                        exit.reason,
                        stderr_tail.as_deref().map(last_lines).unwrap_or_default()
                    ),
                    _ => tracing::info!(id = %vm.id, "VM {}: {}", state.as_str(), exit.reason),
                }
                s.state = state;
                s.exit = Some(exit);
            }
            Err(e) => {
                tracing::error!(id = %vm.id, "cannot wait for the VM process: {e}");
                s.state = VmState::Crashed;
                s.exit = Some(ExitInfo {
                    code: None,
                    signal: None,
                    reason: format!("the daemon lost track of the process: {e}"),
                    at_unix_s: unix_s(SystemTime::now()),
                });
            }
        }
        s.pid = None;
        s.ended = Some(Instant::now());
        s.stderr_tail = stderr_tail;
        s.console_tail = console_tail;
        let record = serde_json::json!({
            "exit": s.exit,
            "state": s.state,
            "stderr_tail": s.stderr_tail,
            "console_tail": s.console_tail,
        });
        if vm.dir.is_dir() {
            let _ = std::fs::write(vm.dir.join("exit.json"), record.to_string());
        }
        let exit = s.exit.as_ref();
        let fields = serde_json::json!({
            "reason": exit.map(|e| e.reason.as_str()),
            "proc.exit_code": exit.and_then(|e| e.code),
            "proc.signal": exit.and_then(|e| e.signal),
        });
        if s.state == VmState::Crashed {
            // A security event of its own: the engine files it with the VM's
            // earlier events (a flood, then a crash, is an incident).
            let reason = crash_reason(exit, s.stderr_tail.as_deref());
            let mut event = Event::vm_crashed(&vm.id, vigil_events::Timestamp::now(), &reason)
                .with_field("vm.state", s.state.as_str())
                .with_field("vm.exit_reason", exit.map_or("", |e| e.reason.as_str()));
            if let serde_json::Value::Object(fields) = fields {
                for (k, v) in fields
                    .into_iter()
                    .filter(|(k, v)| k != "reason" && !v.is_null())
                {
                    event = event.with_field(k, v);
                }
            }
            events.emit(event);
        } else {
            let priority = match s.state {
                VmState::Failed => Priority::Error,
                _ => Priority::Notice,
            };
            events.lifecycle(&vm.id, s.state.as_str(), s.state, priority, fields);
        }
        events.vm_ended(&vm.id);
    }
    let _ = std::fs::remove_file(&vm.api_socket);
    let _ = ended.send(true);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn introspection_options_become_run_flags() {
        let req: CreateRequest = serde_json::from_value(serde_json::json!({
            "id": "a", "config": {},
            "introspect": {"period_ms": 100, "policy": "protect", "baseline_after_ms": 0},
            "trace_syscalls": {"syscalls": "read,write,59"},
            "debug_api": true
        }))
        .unwrap();
        let options = LaunchOptions {
            introspect: req.introspect,
            trace_syscalls: req.trace_syscalls,
            debug_api: req.debug_api,
        };
        let args: Vec<String> = options
            .args(Path::new("/s/vms/a"))
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        assert_eq!(
            args,
            [
                "--findings-path",
                "/s/vms/a/findings.jsonl",
                "--introspect=period=100ms,policy=protect,baseline_after=0ms",
                "--trace-syscalls",
                "/s/vms/a/syscalls.jsonl",
                "--trace-filter=read,write,59",
                "--debug-api"
            ]
        );
        // `{}`: introspection with the VMM's defaults, all calls traced.
        let options = LaunchOptions {
            introspect: Some(IntrospectSpec::default()),
            trace_syscalls: Some(TraceSpec::default()),
            debug_api: false,
        };
        assert_eq!(
            options.args(Path::new("d")),
            [
                "--findings-path",
                "d/findings.jsonl",
                "--introspect=",
                "--trace-syscalls",
                "d/syscalls.jsonl"
            ]
            .map(std::ffi::OsString::from)
        );
        // Every VM writes its findings down (monitoring may start through its API).
        assert_eq!(
            LaunchOptions::default().args(Path::new("d")),
            ["--findings-path", "d/findings.jsonl"].map(std::ffi::OsString::from)
        );
    }

    #[test]
    fn introspection_options_are_checked() {
        let spec = |v: serde_json::Value| serde_json::from_value::<IntrospectSpec>(v).unwrap();
        assert!(spec(serde_json::json!({})).validate().is_ok());
        let e = spec(serde_json::json!({"period_ms": 0}))
            .validate()
            .unwrap_err();
        assert!(e.contains("introspect.period_ms 0"), "{e}");
        let e = spec(serde_json::json!({"period_ms": 3_600_001}))
            .validate()
            .unwrap_err();
        assert!(e.contains("introspect.period_ms 3600001"), "{e}");
        let e = spec(serde_json::json!({"baseline_after_ms": 4_000_000}))
            .validate()
            .unwrap_err();
        assert!(e.contains("introspect.baseline_after_ms 4000000"), "{e}");
        let e = spec(serde_json::json!({"policy": "block"}))
            .validate()
            .unwrap_err();
        assert!(e.contains("introspect.policy \"block\""), "{e}");
        assert!(
            serde_json::from_value::<IntrospectSpec>(serde_json::json!({"period": 5})).is_err()
        );
        let t = TraceSpec {
            syscalls: Some("read; rm -rf".into()),
        };
        assert!(t
            .validate()
            .unwrap_err()
            .contains("trace_syscalls.syscalls"));
        let t = TraceSpec {
            syscalls: Some("read,write,cr3=0x1000".into()),
        };
        assert!(t.validate().is_ok());
    }

    fn status_of(code: i32) -> ExitStatus {
        ExitStatus::from_raw(code << 8)
    }

    #[test]
    fn exits_are_classified() {
        assert_eq!(classify(status_of(0), false).0, VmState::Exited);
        assert_eq!(classify(status_of(3), false).0, VmState::Crashed);
        assert_eq!(classify(status_of(1), false).0, VmState::Failed);
        assert_eq!(classify(status_of(143), false).0, VmState::Stopped);
        assert_eq!(classify(status_of(3), true).0, VmState::Stopped);
        let (state, exit) = classify(status_of(35), false);
        assert_eq!(state, VmState::Exited);
        assert!(exit.reason.contains("status 3 "), "{}", exit.reason);
        let (state, exit) = classify(ExitStatus::from_raw(libc::SIGSEGV), false);
        assert_eq!(state, VmState::Crashed);
        assert_eq!(exit.signal, Some(libc::SIGSEGV));
        assert!(exit.reason.contains("SIGSEGV"));
        assert_eq!(
            classify(ExitStatus::from_raw(libc::SIGKILL), true).0,
            VmState::Stopped
        );
    }

    #[test]
    fn tails_start_at_a_line() {
        let dir = std::env::temp_dir().join(format!("vigil-tail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("log");
        let text: String = (0..1000).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&path, &text).unwrap();
        let t = tail(&path, 100).unwrap();
        assert!(t.starts_with("line "), "{t}");
        assert!(t.ends_with("line 999\n"));
        assert!(t.len() <= 100);
        assert_eq!(tail(&path, 1 << 20).unwrap(), text);
        assert!(tail(&dir.join("absent"), 10).is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
