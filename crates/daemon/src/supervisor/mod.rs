//! VM processes: spawning, reaping, forwarding to their API sockets, stopping.
//!
//! Each VM is one `vigil run --api-sock DIR/api.sock --config-file DIR/config.json`
//! (with `--introspect`, `--trace-syscalls`, `--debug-api` when the create request asks)
//! process, DIR being `<state-dir>/vms/<id>`. Its serial console (stdout) goes to
//! `DIR/console.log` and its own log (stderr) to `DIR/vmm.log`, through pipes the
//! daemon copies and rotates (`logs`). The files its configuration names must
//! lead into DIR or an allowed folder (`paths`). One task per VM owns
//! the process handle: it alone reaps the process, and it alone signals it, so a
//! signal can never reach a recycled pid. A VM that ends is never restarted: its
//! record keeps how it ended (and the tails of its logs) until it is destroyed.
//!
//! The parts: `vm` (the VM record and its states), `request` (the create request,
//! its introspection options and the `vigil run` flags they become), `paths` (the
//! host files a configuration may name), `logs` (the VM's rotated logs), `process`
//! (launching the process, waiting for it to come up, reaping it), `exit` (how a
//! process ended: its state and reason, crash reasons), `control` (pause, resume
//! and throttle through the VM's API socket) and `stop` (stop, destroy, stop
//! all). This module holds the [`Supervisor`] (the table of VMs) and creation.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::{mpsc, watch};
use vigil_model::config::machine::MAX_VCPUS;
use vigil_model::config::HostLimits;
use vigil_model::firecracker::{self, FullVmConfig};

use crate::events::{Events, Priority};
use crate::id::validate_id;

mod control;
mod error;
mod exit;
mod jail;
mod logs;
mod migrate;
mod paths;
mod process;
mod request;
mod stop;
mod vm;

pub use error::SupervisorError;
pub use exit::classify;
pub use jail::{JailSettings, DEFAULT_JAIL_ID};
pub use logs::{rotated, LogLimits, MAX_KEEP, MIN_LOG_BYTES};
pub use migrate::{Incoming, MigrateRequest, ReceiveRequest};
pub use paths::{config_paths, PathPolicy, PathRefused};
pub use process::{CONSOLE_LOG, TAIL_BYTES, VMM_LOG};
pub use request::{CreateRequest, TraceSpec, TraceSpecError, SYSCALLS_FILE};
pub use stop::StopMethod;
pub use vm::{ExitInfo, Vm, VmInfo, VmState};

use request::LaunchOptions;
use vm::Status;

/// The daemon's settings for supervising VMs.
#[derive(Debug, Clone)]
pub struct SupervisorConfig {
    /// Where VM folders live (`<state_dir>/vms/<id>`).
    pub state_dir: PathBuf,
    /// The `vigil` binary to run each VM with.
    pub vmm_binary: PathBuf,
    /// Run each VM in the jailer (`<state_dir>/jails/<vmm name>/<id>/root`);
    /// none: as the daemon's own child (`--no-jailer`).
    pub jail: Option<JailSettings>,
    /// How long a VM may take to report itself running on its API socket.
    pub start_timeout: Duration,
    /// How long a stop waits after SIGTERM before SIGKILL.
    pub stop_timeout: Duration,
    /// How long one request to a VM's API socket may take.
    pub vm_request_timeout: Duration,
    /// The most VMs (in any state) the daemon keeps.
    pub max_vms: usize,
    /// TLS for the migrations it sends and receives (none: plain TCP).
    pub migration_tls: MigrationTls,
    /// How it checks (and, for mutual TLS, what it presents to) the other
    /// daemons' https APIs it sends VMs to (`--peer-tls-*`).
    pub peer_tls: Option<crate::client::ClientTls>,
    /// Where the files a VM's configuration names may be (`--allow-vm-path`).
    pub paths: PathPolicy,
    /// How large each VM's `console.log` and `vmm.log` grow (`--vm-log-*`).
    pub vm_logs: LogLimits,
}

/// The daemon's migration certificates: its own (VMs arriving here wait behind
/// them) and the CA the peers' must come from (VMs leaving check it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MigrationTls {
    /// Certificate and key, PEM.
    pub identity: Option<(PathBuf, PathBuf)>,
    /// CA, PEM.
    pub ca: Option<PathBuf>,
}

/// The VMs, by id.
pub struct Supervisor {
    config: SupervisorConfig,
    vms: Mutex<BTreeMap<String, Arc<Vm>>>,
    /// The security event stream (lifecycle events, crashes, ...).
    events: Events,
}

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

    pub fn get(&self, id: &str) -> Result<Arc<Vm>, SupervisorError> {
        self.table()
            .get(id)
            .cloned()
            .ok_or_else(|| SupervisorError::NoSuchVm(id.into()))
    }

    fn vm_dir(&self, id: &str) -> PathBuf {
        self.config.state_dir.join("vms").join(id)
    }

    /// Creates a VM: writes its folder, starts its process and waits until its API
    /// socket reports it running (or it ends, or `start_timeout` passes).
    pub async fn create(&self, request: CreateRequest) -> Result<VmInfo, SupervisorError> {
        validate_id(&request.id)?;
        if !request.config.is_object() {
            return Err(SupervisorError::ConfigNotObject {
                kind: json_kind(&request.config),
            });
        }
        // The configuration is checked as `vigil run` checks it, before anything
        // is spawned; the files it names first (checking them opens them).
        let document: FullVmConfig = firecracker::parse(request.config.to_string().as_bytes())?;
        self.config.paths.check(&request.id, &document)?;
        document.to_vm_config(&HostLimits::read(MAX_VCPUS))?;
        if let Some(i) = &request.introspect {
            i.validate()?;
        }
        if let Some(t) = &request.trace_syscalls {
            t.validate()?;
        }
        let options = LaunchOptions {
            introspect: request.introspect,
            trace_syscalls: request.trace_syscalls,
            debug_api: request.debug_api,
            enable_pci: request.enable_pci,
            ..Default::default()
        };
        let vm = self.launch_new(request.id, request.config, options).await?;
        let info = self.wait_started(&vm).await?;
        self.events.lifecycle(
            &vm.id,
            "created",
            info.state,
            Priority::Informational,
            serde_json::json!({ "vm.vcpus": info.vcpus, "vm.memory_mib": info.memory_mib, "proc.pid": info.pid }),
        );
        Ok(info)
    }

    /// Reserves `id`, writes the VM's folder and starts its process (which owns
    /// the reaper); the caller waits for it as it needs.
    async fn launch_new(
        &self,
        id: String,
        config: serde_json::Value,
        options: LaunchOptions,
    ) -> Result<Arc<Vm>, SupervisorError> {
        let dir = self.vm_dir(&id);
        let jail = match &self.config.jail {
            Some(settings) => Some(jail::Jail::new(
                &self.config.state_dir.join("jails"),
                &self.config.vmm_binary,
                &id,
                settings,
            )?),
            None => None,
        };
        let api_socket = match &jail {
            Some(jail) => jail.host_path(jail::API_SOCKET),
            None => dir.join("api.sock"),
        };
        // Reserve the id first, so that two creates of one id cannot both proceed.
        let (signal_tx, signal_rx) = mpsc::unbounded_channel();
        let (ended_tx, ended_rx) = watch::channel(false);
        let vm = Arc::new(Vm {
            id: id.clone(),
            dir: dir.clone(),
            api_socket: api_socket.clone(),
            jail,
            vcpus: machine_field(&config, "vcpu_count"),
            memory_mib: machine_field(&config, "mem_size_mib"),
            config,
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
                migrating_to: None,
                migration: None,
            }),
            signals: signal_tx,
            ended: ended_rx,
        });
        {
            let mut table = self.table();
            if table.contains_key(&id) {
                return Err(SupervisorError::IdTaken(id));
            }
            if table.len() >= self.config.max_vms {
                return Err(SupervisorError::TooManyVms {
                    held: table.len(),
                    max: self.config.max_vms,
                });
            }
            table.insert(id.clone(), vm.clone());
        }
        match self.launch(&vm, signal_rx, ended_tx).await {
            Ok(()) => Ok(vm),
            Err(e) => {
                self.table().remove(&id);
                let _ = std::fs::remove_dir_all(&dir);
                if let Some(jail) = &vm.jail {
                    jail.remove(&vm.config).await;
                }
                Err(e)
            }
        }
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
