//! The VM record: where a VM is in its life, how it ended, what the API reports
//! about it, and the handle to the task that owns its process.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use super::request::{LaunchOptions, TraceSpec};
use vigil_model::config::IntrospectConfig;

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
    /// Its process waits for the VM to arrive from another daemon's host.
    Incoming,
    /// It moved to another host (its process exited once the VM ran there).
    Migrated,
}

impl VmState {
    /// Whether its process may still be alive.
    pub fn is_live(self) -> bool {
        matches!(
            self,
            VmState::Starting
                | VmState::Running
                | VmState::Paused
                | VmState::Stopping
                | VmState::Incoming
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
            VmState::Incoming => "incoming",
            VmState::Migrated => "migrated",
        }
    }

    pub const ALL: [VmState; 10] = [
        VmState::Starting,
        VmState::Running,
        VmState::Paused,
        VmState::Stopping,
        VmState::Stopped,
        VmState::Exited,
        VmState::Crashed,
        VmState::Failed,
        VmState::Incoming,
        VmState::Migrated,
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
    /// Its folder: config.json, api.sock (unjailed), console.log, vmm.log, exit.json.
    pub dir: PathBuf,
    /// Its own API socket (in its jail: `<jail>/run/api.sock`).
    pub api_socket: PathBuf,
    /// Its jail's root (`<state-dir>/jails/<vmm name>/<id>/root`), where its
    /// VMM runs chrooted; none when the daemon runs VMs unjailed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jail: Option<PathBuf>,
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
    pub introspect: Option<IntrospectConfig>,
    /// System call tracing from the start, into `dir/syscalls.jsonl`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_syscalls: Option<TraceSpec>,
    /// Whether the VM's API serves the debug writes (tests only).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub debug_api: bool,
    /// Its virtio devices are on PCI.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub enable_pci: bool,
    /// The last status of the migration this daemon moved it by (the VM's
    /// `GET /vigil/migration`), under way or ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<serde_json::Value>,
}

pub(super) struct Status {
    pub(super) state: VmState,
    pub(super) pid: Option<u32>,
    pub(super) ended: Option<Instant>,
    pub(super) exit: Option<ExitInfo>,
    pub(super) stderr_tail: Option<String>,
    pub(super) console_tail: Option<String>,
    pub(super) stop_requested: bool,
    /// Where a migration under way or done sends it (`tcp:HOST:PORT`).
    pub(super) migrating_to: Option<String>,
    /// The migration's last status seen (`VmInfo::migration`).
    pub(super) migration: Option<serde_json::Value>,
}

/// One VM the daemon supervises.
pub struct Vm {
    pub(super) id: String,
    pub(super) dir: PathBuf,
    pub(super) api_socket: PathBuf,
    /// Its jail, unless the daemon runs VMs unjailed.
    pub(super) jail: Option<super::jail::Jail>,
    pub(super) config: serde_json::Value,
    /// Introspection and the debug API, as the create request asked.
    pub(super) options: LaunchOptions,
    pub(super) vcpus: Option<u64>,
    pub(super) memory_mib: Option<u64>,
    pub(super) created_at: SystemTime,
    pub(super) started: Instant,
    pub(super) status: Mutex<Status>,
    /// Signals for the task that owns the process.
    pub(super) signals: mpsc::UnboundedSender<i32>,
    /// Turns true once the process has been reaped and its record updated.
    pub(super) ended: watch::Receiver<bool>,
}

pub(super) fn unix_s(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Vm {
    pub(super) fn status(&self) -> MutexGuard<'_, Status> {
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
            jail: self.jail.as_ref().map(|j| j.root()),
            exit: status.exit.clone(),
            stderr_tail: status.stderr_tail.clone(),
            console_tail: status.console_tail.clone(),
            config: full.then(|| self.config.clone()),
            introspect: self.options.introspect,
            trace_syscalls: self.options.trace_syscalls.clone(),
            debug_api: self.options.debug_api,
            enable_pci: self.options.enable_pci,
            migration: status.migration.clone(),
        }
    }

    pub(super) fn signal(&self, signal: i32) {
        // The owning task is gone only once the process has been reaped.
        let _ = self.signals.send(signal);
    }

    /// Waits until the process has been reaped, at most `timeout`; whether it was.
    pub(super) async fn wait_ended(&self, timeout: Duration) -> bool {
        let mut ended = self.ended.clone();
        let done = matches!(
            tokio::time::timeout(timeout, ended.wait_for(|e| *e)).await,
            Ok(Ok(_))
        );
        done
    }
}
