//! A VM's process: its folder prepared and the process spawned (with its
//! parent-death signal), the wait until its API socket reports it running, and
//! the task that owns the process: it alone signals and reaps it, then records
//! how it ended.

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, watch};

use super::exit::{classify, crash_reason};
use super::jail::{self, Jail, JailSettings};
use super::logs::{self, RotatingLog};
use super::stop::StopMethod;
use super::vm::{unix_s, ExitInfo, Vm, VmInfo, VmState};
use super::{Supervisor, SupervisorError};
use crate::client;
use crate::events::{Event, Events, Priority};

/// How many bytes of a VM's stderr and console logs its record keeps when it ends.
pub const TAIL_BYTES: u64 = 4096;

/// The VM's serial console (the VMM's stdout), in its folder.
pub const CONSOLE_LOG: &str = "console.log";
/// The VMM's own log (its stderr), in the VM's folder.
pub const VMM_LOG: &str = "vmm.log";

impl Supervisor {
    /// Prepares the folder and spawns the process with its reaper.
    pub(super) async fn launch(
        &self,
        vm: &Arc<Vm>,
        signals: mpsc::UnboundedReceiver<i32>,
        ended: watch::Sender<bool>,
    ) -> Result<(), SupervisorError> {
        let dir = &vm.dir;
        let folder = |what, path: &Path| {
            let path = path.to_path_buf();
            move |source| SupervisorError::Folder { what, path, source }
        };
        // Left by an earlier daemon. Its VM would have been stopped with it (the
        // parent-death signal), but check before taking the folder over.
        if vm.api_socket.exists()
            && client::request(&vm.api_socket, "GET", "/", None, Duration::from_millis(200))
                .await
                .is_ok()
        {
            return Err(SupervisorError::FolderInUse { dir: dir.clone() });
        }
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(folder("cannot remove stale", dir))?;
        }
        if let Some(jail) = &vm.jail {
            jail.clear()
                .map_err(folder("cannot remove stale", &jail.dir))?;
        }
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(folder("cannot create", dir))?;
        let config_path = dir.join("config.json");
        let open = |name: &str| {
            let path = dir.join(name);
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&path)
                .map_err(folder("cannot create", &path))
        };
        let config_bytes =
            serde_json::to_vec_pretty(&vm.config).map_err(SupervisorError::EncodeConfig)?;
        std::io::Write::write_all(&mut open("config.json")?, &config_bytes)
            .map_err(folder("cannot write", &config_path))?;
        let log = |name: &str| {
            let path = dir.join(name);
            RotatingLog::create(path.clone(), self.config.vm_logs)
                .map_err(folder("cannot create", &path))
        };
        let console = log(CONSOLE_LOG)?;
        let stderr = log(VMM_LOG)?;

        let mut command = match (&vm.jail, &self.config.jail) {
            (Some(jail), Some(settings)) => self.jailed_command(vm, jail, settings)?,
            _ => {
                let mut command = tokio::process::Command::new(&self.config.vmm_binary);
                command.arg("run").arg("--api-sock").arg(&vm.api_socket);
                // A VM that comes by migration is described by its source, not a file.
                if vm.options.incoming.is_none() {
                    command.arg("--config-file").arg(&config_path);
                }
                command.args(vm.options.args(dir));
                command
            }
        };
        command
            .stdin(Stdio::null())
            // The daemon writes both logs (bounded, rotated), not the VMM.
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
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
        let mut child = command.spawn().map_err(|source| SupervisorError::Spawn {
            vmm: PathBuf::from(command.as_std().get_program()),
            source,
        })?;
        vm.status().pid = child.id();
        tracing::info!(id = %vm.id, pid = ?child.id(), "VM process started");
        let logs = Logs {
            console: child
                .stdout
                .take()
                .map(|pipe| tokio::spawn(logs::copy(pipe, console))),
            stderr: child
                .stderr
                .take()
                .map(|pipe| tokio::spawn(logs::copy(pipe, stderr))),
        };
        tokio::spawn(reap(
            vm.clone(),
            child,
            logs,
            signals,
            ended,
            self.events.clone(),
        ));
        Ok(())
    }

    /// `vigil-jailer ... -- run ...` for `vm`, its jail prepared: the files its
    /// configuration names put in, and the paths the VMM gets made the jail's.
    fn jailed_command(
        &self,
        vm: &Vm,
        jail: &Jail,
        settings: &JailSettings,
    ) -> Result<tokio::process::Command, SupervisorError> {
        let mut options = vm.options.clone();
        let mut copied = Vec::new();
        if let Some((cert, key)) = options.incoming_tls.take() {
            copied.push((cert, jail::MIGRATION_CERT));
            copied.push((key, jail::MIGRATION_KEY));
            options.incoming_tls = Some((jail::MIGRATION_CERT.into(), jail::MIGRATION_KEY.into()));
        }
        if let Some(ca) = &self.config.migration_tls.ca {
            copied.push((ca.clone(), jail::MIGRATION_CA));
        }
        let mut linked = vec![crate::findings::FINDINGS_FILE];
        if options.trace_syscalls.is_some() {
            linked.push(super::SYSCALLS_FILE);
        }
        jail.prepare(settings, &vm.config, &vm.dir, &linked, &copied)?;
        let base = jail
            .dir
            .parent()
            .and_then(Path::parent)
            .unwrap_or(&jail.dir);
        let mut command = tokio::process::Command::new(&settings.jailer);
        command
            .arg("--id")
            .arg(&vm.id)
            .arg("--exec-file")
            .arg(&self.config.vmm_binary)
            .args(["--uid", &settings.uid.to_string()])
            .args(["--gid", &settings.gid.to_string()])
            .arg("--chroot-base-dir")
            .arg(base)
            // The jailer stays as the VMM's parent: one pid for the daemon to
            // signal and reap, with the VMM's exit status.
            .arg("--new-pid-ns");
        for setting in &settings.cgroups {
            command.arg("--cgroup").arg(setting);
        }
        command.args(["--", "run", "--api-sock", jail::API_SOCKET]);
        if options.incoming.is_none() {
            command.args(["--config-file", jail::CONFIG]);
        }
        command.args(options.args(Path::new("/")));
        Ok(command)
    }

    pub(super) async fn wait_started(&self, vm: &Arc<Vm>) -> Result<VmInfo, SupervisorError> {
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
                return Err(SupervisorError::StartTimeout {
                    id: vm.id.clone(),
                    socket: vm.api_socket.clone(),
                    timeout: self.config.start_timeout,
                    log: info
                        .stderr_tail
                        .as_deref()
                        .map(last_lines)
                        .unwrap_or_default(),
                });
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(10));
        }
        // A VMM that refused its configuration is not a VM: report why and forget it.
        if vm.state() == VmState::Failed {
            let info = vm.info(false);
            self.remove(vm).await;
            return Err(SupervisorError::StartFailed {
                id: vm.id.clone(),
                reason: info.exit.map(|e| e.reason).unwrap_or_default(),
                log: info
                    .stderr_tail
                    .as_deref()
                    .map(last_lines)
                    .unwrap_or_default(),
            });
        }
        Ok(vm.info(false))
    }
}

pub(super) fn reported_state(response: &client::Response) -> Option<VmState> {
    if !response.is_success() {
        return None;
    }
    match response.json()?.get("state")?.as_str()? {
        "Running" => Some(VmState::Running),
        "Paused" => Some(VmState::Paused),
        _ => None,
    }
}

/// The last few non-empty lines of a log, on one line.
fn last_lines(text: &str) -> String {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    lines[lines.len().saturating_sub(3)..].join(" | ")
}

/// The tasks copying a VM's output into its logs; each ends with the log's tail.
struct Logs {
    console: Option<tokio::task::JoinHandle<String>>,
    stderr: Option<tokio::task::JoinHandle<String>>,
}

/// How long, after the VMM exited, its logs may take to drain (a process it
/// left behind could hold the pipes open).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

impl Logs {
    /// Waits for both logs to end; their tails.
    async fn tails(self) -> (Option<String>, Option<String>) {
        let tail = |task: Option<tokio::task::JoinHandle<String>>| async move {
            let mut task = task?;
            match tokio::time::timeout(DRAIN_TIMEOUT, &mut task).await {
                Ok(tail) => tail.ok(),
                Err(_) => {
                    task.abort();
                    None
                }
            }
        };
        tokio::join!(tail(self.stderr), tail(self.console))
    }
}

/// Owns the process: forwards signals to it until it exits, then records how it ended.
async fn reap(
    vm: Arc<Vm>,
    mut child: tokio::process::Child,
    logs: Logs,
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
    // The logs end with the process (its pipes close): their last lines.
    let (stderr_tail, console_tail) = logs.tails().await;
    {
        let mut s = vm.status();
        match status {
            Ok(status) => {
                let (state, exit) = classify(
                    status,
                    s.stop_requested,
                    s.migrating_to.as_deref(),
                    vm.jail.is_some(),
                );
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
