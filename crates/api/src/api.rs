//! The API's resources: what each method on each path does, before and after the
//! VM starts. [`Api::handle`] takes a request (method, path, body) and returns the
//! answer; the HTTP server ([`crate::http`]) only carries bytes to and from it.

use std::fmt::Display;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Value};
use vigil_mmds::{Mmds, MmdsConfig};
use vigil_model::config::rt::VcpuSchedBody;
use vigil_model::config::{MemoryPolicyUpdate, NetConfig, VcpuSched, VmConfig};
use vigil_vmm::builder::BuildError;
use vigil_vmm::snapshot::MemoryKind;
use vigil_vmm::{BalloonHandle, ControlError, RunState, VmControl};

use crate::metrics::{metrics_line, MetricsError, MetricsSink, RequestCounts};
use crate::model::{
    ActionType, BalloonStartCmd, BalloonStatsUpdate, BalloonUpdate, InstanceActionInfo,
    InstanceInfo, MachineConfigUpdate, MemoryBackendType, MigrationParams, PartialDrive,
    PartialNetworkInterface, SnapshotCreateParams, SnapshotLoadParams, SnapshotType, VmState,
    VmStateValue,
};
use crate::preboot::{PreBoot, PreBootError};
use vigil_introspect::live::Introspector;
use vigil_migration::{
    ClientTls, MigrationRequest, Migrator, Phase, Target, TlsError, DEFAULT_DOWNTIME,
    DEFAULT_MAX_ROUNDS,
};
use vigil_model::firecracker::{
    self, limit_update, merge_rate_limiter, Balloon, BootSource, CpuConfig, Drive, Entropy, Logger,
    MachineConfig, Metrics, NetworkInterface, SerialDevice, Vsock,
};

/// The Firecracker API version whose requests Vigil answers.
pub const FIRECRACKER_API_VERSION: &str = "1.17.0";
/// Vigil's own OpenAPI document, served at [`OPENAPI_PATH`].
pub const OPENAPI_YAML: &str = include_str!("../openapi.yaml");
/// Where the OpenAPI document is served.
pub const OPENAPI_PATH: &str = "/vigil/openapi.yaml";

/// The VM's counters as JSON (a `vigil_metrics::VmMetricsSnapshot`), for the
/// daemon and dashboards.
pub const METRICS_SNAPSHOT_PATH: &str = "/vigil/metrics";

/// The VM's memory and what the memory-compression pager holds of it
/// (`--memory-compression`).
pub const MEMORY_PATH: &str = "/vigil/memory";

/// Why the binary could not apply a `PUT /logger` body: its log subscriber's own
/// error (the API only shows it).
pub type LoggerHookError = Box<dyn std::error::Error + Send + Sync>;

/// Reconfigures logging (`PUT /logger`); the binary owns the log subscriber.
pub type LoggerHook = Arc<dyn Fn(&Logger) -> Result<(), LoggerHookError> + Send + Sync>;

/// Why the thread that owns the VM could not start it.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error("cannot start the VM's threads: {0}")]
    Threads(std::io::Error),
}

/// A request from the API to the thread that owns the VM.
pub enum ToVmm {
    /// Build and start this VM; answer with its control handle, or why not.
    Start {
        config: Box<VmConfig>,
        reply: Sender<Result<VmControl, StartError>>,
    },
    /// Build the VM a snapshot holds and start it, paused unless `resume`;
    /// answer as for `Start`.
    Restore {
        load: SnapshotLoad,
        reply: Sender<Result<VmControl, StartError>>,
    },
    /// The process was asked to stop (by this signal) before the VM started.
    Stop(i32),
}

/// A snapshot to load (`PUT /snapshot/load`), checked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotLoad {
    pub state_path: std::path::PathBuf,
    pub memory: SnapshotMemory,
    /// Run the VM once loaded; otherwise it stays paused until `PATCH /vm`.
    pub resume: bool,
    /// Other taps and vsock socket than the saved ones.
    pub overrides: vigil_vmm::builder::RestoreOptions,
}

/// Where a loaded snapshot's guest memory comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SnapshotMemory {
    /// The memory file, mapped privately.
    File(std::path::PathBuf),
    /// The page-fault handler listening on this Unix socket (Firecracker's
    /// protocol), page by page as the guest touches them.
    Uffd(std::path::PathBuf),
}

/// An answer: status and an optional JSON body.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Option<String>,
}

impl Response {
    pub(crate) fn no_content() -> Self {
        Self {
            status: 204,
            body: None,
        }
    }

    pub(crate) fn json(value: &impl Serialize) -> Self {
        match serde_json::to_string(value) {
            Ok(body) => Self {
                status: 200,
                body: Some(body),
            },
            Err(e) => Self::error(500, format!("cannot encode the answer: {e}")),
        }
    }

    /// An error in Firecracker's shape: `{"fault_message": "..."}`.
    pub fn error(status: u16, message: impl Into<String>) -> Self {
        Self {
            status,
            body: Some(json!({ "fault_message": message.into() }).to_string()),
        }
    }

    pub(crate) fn bad(message: impl Into<String>) -> Self {
        Self::error(400, message)
    }
}

struct Inner {
    pre: PreBoot,
    vm: Option<VmControl>,
    logger: Option<Logger>,
    metrics: Option<MetricsSink>,
    counts: RequestCounts,
}

/// The state behind one VM's API.
pub struct Api {
    id: String,
    started: Instant,
    inner: Mutex<Inner>,
    to_vmm: Mutex<Sender<ToVmm>>,
    logger_hook: Option<LoggerHook>,
    /// Introspection of the running VM, and whether `/vigil/debug/...` (writes
    /// into the guest) is served. Not under `inner`: it is attached while a
    /// request that started the VM may hold that lock.
    introspection: Mutex<Option<(Arc<Introspector>, bool)>>,
    /// Migrates the running VM; set once it runs.
    migrator: Mutex<Option<Arc<Migrator>>>,
    /// A `GET /vigil/migration` has shown a completed migration.
    migration_summary_read: AtomicBool,
    /// The MMDS data store, before and after the VM starts; shared with the
    /// net devices that reach it.
    mmds: Mmds,
}

/// Live migration of the running VM ([`Api::set_migrator`]).
pub const MIGRATION_PATH: &str = "/vigil/migration";

/// How the host schedules the running VM's vCPU threads.
pub const VCPU_SCHED_PATH: &str = "/vigil/vcpus/sched";

/// The resources Vigil answers, with the methods each accepts (for messages).
pub const ROUTES: &[(&str, &str)] = &[
    ("/", "GET"),
    ("/version", "GET"),
    ("/vm/config", "GET"),
    ("/machine-config", "GET, PUT, PATCH"),
    ("/boot-source", "PUT"),
    ("/drives/{drive_id}", "PUT, PATCH"),
    ("/network-interfaces/{iface_id}", "PUT, PATCH"),
    ("/vsock", "PUT"),
    ("/balloon", "GET, PUT, PATCH"),
    ("/balloon/statistics", "GET, PATCH"),
    ("/balloon/hinting/start", "PATCH"),
    ("/balloon/hinting/status", "GET"),
    ("/balloon/hinting/stop", "PATCH"),
    ("/entropy", "PUT"),
    ("/serial", "PUT"),
    ("/cpu-config", "PUT"),
    ("/actions", "PUT"),
    ("/vm", "PATCH"),
    ("/snapshot/create", "PUT"),
    ("/snapshot/load", "PUT"),
    ("/metrics", "PUT"),
    ("/logger", "PUT"),
    ("/mmds", "GET, PUT, PATCH"),
    ("/mmds/config", "PUT"),
    (OPENAPI_PATH, "GET"),
    (METRICS_SNAPSHOT_PATH, "GET"),
    (MEMORY_PATH, "GET, PATCH"),
    (MIGRATION_PATH, "GET, PUT, DELETE"),
    (VCPU_SCHED_PATH, "GET, PUT"),
];

/// Firecracker resources Vigil does not have.
const NOT_IMPLEMENTED: &[&str] = &["/pmem", "/hotplug/memory"];

fn pattern_of(path: &str) -> Option<&'static str> {
    let (first, rest) = match path.trim_start_matches('/').split_once('/') {
        Some((f, r)) => (f, Some(r)),
        None => (path.trim_start_matches('/'), None),
    };
    match (first, rest) {
        ("drives", Some(id)) if !id.is_empty() && !id.contains('/') => Some("/drives/{drive_id}"),
        ("network-interfaces", Some(id)) if !id.is_empty() && !id.contains('/') => {
            Some("/network-interfaces/{iface_id}")
        }
        _ => ROUTES.iter().find(|(p, _)| *p == path).map(|(p, _)| *p),
    }
}

/// The introspection resources (answered by [`crate::introspect`]).
pub(crate) fn is_introspection(path: &str) -> bool {
    ["/vigil/introspect", "/vigil/trace", "/vigil/debug/"]
        .iter()
        .any(|p| path.starts_with(p))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub(crate) fn body<T: serde::de::DeserializeOwned>(
    method: &str,
    path: &str,
    bytes: &[u8],
) -> Result<T, Response> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(Response::bad(format!(
            "{method} {path}: the request needs a JSON body"
        )));
    }
    firecracker::parse(bytes).map_err(|e| Response::bad(format!("{method} {path}: {e}")))
}

fn after_start(method: &str, path: &str) -> Response {
    Response::bad(format!(
        "{method} {path}: this can only be done before the VM starts, and it has started"
    ))
}

fn before_start(method: &str, path: &str) -> Response {
    Response::bad(format!(
        "{method} {path}: this needs a running VM; InstanceStart has not been done"
    ))
}

/// 204, or 400 saying why the request failed.
pub(crate) fn done<E: Display>(method: &str, path: &str, r: Result<(), E>) -> Response {
    match r {
        Ok(()) => Response::no_content(),
        Err(e) => Response::bad(format!("{method} {path}: {e}")),
    }
}

/// [`done`], the error prefixed with what was asked (`SendCtrlAltDel: ...`).
fn done_as<E: Display>(method: &str, path: &str, what: impl Display, r: Result<(), E>) -> Response {
    match r {
        Ok(()) => Response::no_content(),
        Err(e) => Response::bad(format!("{method} {path}: {what}: {e}")),
    }
}

/// 4 KiB balloon pages in MiB.
fn pages_to_mib(pages: u32) -> u64 {
    (u64::from(pages) * 4096) >> 20
}

const STAT_NAMES: [&str; 16] = [
    "swap_in",
    "swap_out",
    "major_faults",
    "minor_faults",
    "free_memory",
    "total_memory",
    "available_memory",
    "disk_caches",
    "hugetlb_allocations",
    "hugetlb_failures",
    "oom_kill",
    "alloc_stall",
    "async_scan",
    "direct_scan",
    "async_reclaim",
    "direct_reclaim",
];

impl Api {
    /// The API of VM `id`; VM starts go to `to_vmm`; `PUT /logger` calls
    /// `logger_hook`.
    pub fn new(id: String, to_vmm: Sender<ToVmm>, logger_hook: Option<LoggerHook>) -> Arc<Self> {
        Arc::new(Self {
            id,
            started: Instant::now(),
            inner: Mutex::new(Inner {
                pre: PreBoot::default(),
                vm: None,
                logger: None,
                metrics: None,
                counts: RequestCounts::default(),
            }),
            introspection: Mutex::new(None),
            migrator: Mutex::new(None),
            migration_summary_read: AtomicBool::new(false),
            mmds: Mmds::new(crate::http::MAX_BODY),
            to_vmm: Mutex::new(to_vmm),
            logger_hook,
        })
    }

    /// The VM's MMDS: its data store (size limit: `--mmds-size-limit`), shared
    /// with the VM through [`VmConfig::share_mmds`].
    pub fn mmds(&self) -> &Mmds {
        &self.mmds
    }

    /// The configuration accumulated so far.
    pub fn preboot(&self) -> PreBoot {
        lock(&self.inner).pre.clone()
    }

    /// Replaces the accumulated configuration (a configuration file's).
    pub fn set_preboot(&self, pre: PreBoot) {
        lock(&self.inner).pre = pre;
    }

    /// Records that the VM was started outside the API (`--config-file`).
    pub fn set_running(&self, vm: VmControl) {
        lock(&self.inner).vm = Some(vm);
    }

    /// Serves introspection of the running VM (`/vigil/introspect...`,
    /// `/vigil/trace`), and with `debug_api` the writes into the guest
    /// (`/vigil/debug/...`) that tests of the monitor use.
    pub fn set_introspector(&self, introspector: Arc<Introspector>, debug_api: bool) {
        *lock(&self.introspection) = Some((introspector, debug_api));
    }

    /// Serves `/vigil/migration` for the running VM.
    pub fn set_migrator(&self, migrator: Arc<Migrator>) {
        *lock(&self.migrator) = Some(migrator);
    }

    /// After the VM migrated away: waits, at most `at_most`, until whoever
    /// follows the migration (a daemon) has read its summary (downtime, total
    /// time, bytes), which goes with the process.
    pub fn await_migration_summary_read(&self, at_most: Duration) {
        let deadline = Instant::now() + at_most;
        while !self.migration_summary_read.load(Ordering::Acquire) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Configures logging as `PUT /logger` does.
    pub fn configure_logger(&self, l: Logger) -> Result<(), LoggerHookError> {
        if let Some(hook) = &self.logger_hook {
            hook(&l)?;
        }
        lock(&self.inner).logger = Some(l);
        Ok(())
    }

    /// Configures metrics as `PUT /metrics` does.
    pub fn configure_metrics(&self, m: Metrics) -> Result<(), MetricsError> {
        let mut inner = lock(&self.inner);
        if let Some(sink) = &inner.metrics {
            return Err(MetricsError::AlreadyConfigured {
                path: m.metrics_path,
                current: sink.path.clone(),
            });
        }
        inner.metrics = Some(MetricsSink::open(&m.metrics_path, m.emit_id, m.properties)?);
        Ok(())
    }

    /// Whether metrics have somewhere to go.
    pub fn metrics_configured(&self) -> bool {
        lock(&self.inner).metrics.is_some()
    }

    /// Writes one metrics line, as `FlushMetrics` does.
    pub fn flush_metrics(&self) -> Result<(), MetricsError> {
        let mut inner = lock(&self.inner);
        let line = metrics_line(self.started, &inner.counts, inner.vm.as_ref());
        let id = self.id.clone();
        match inner.metrics.as_mut() {
            Some(sink) => Ok(sink.flush(line, &id)?),
            None => Err(MetricsError::NotConfigured),
        }
    }

    /// Answers one request. `path` may carry a query string, which is ignored.
    pub fn handle(&self, method: &str, path: &str, bytes: &[u8]) -> Response {
        let path = path.split('#').next().unwrap_or("/");
        let (path, query) = path.split_once('?').unwrap_or((path, ""));
        let path = if path.len() > 1 {
            path.trim_end_matches('/')
        } else {
            path
        };
        let response = if is_introspection(path) {
            self.introspect(method, path, query, bytes)
        } else {
            self.route(method, path, bytes)
        };
        let mut inner = lock(&self.inner);
        inner.counts.count(response.status);
        drop(inner);
        if response.status >= 400 {
            tracing::info!(method, path, status = response.status, body = ?response.body, "API request refused");
        } else {
            tracing::debug!(method, path, status = response.status, "API request");
        }
        response
    }

    fn route(&self, method: &str, path: &str, bytes: &[u8]) -> Response {
        let Some(pattern) = pattern_of(path) else {
            if NOT_IMPLEMENTED.contains(&path) || path.starts_with("/pmem/") {
                return Response::bad(format!(
                    "{method} {path}: Vigil does not implement this Firecracker resource"
                ));
            }
            return Response::bad(format!(
                "{method} {path}: no such resource (GET {OPENAPI_PATH} lists them)"
            ));
        };
        let id = path.rsplit('/').next().unwrap_or_default();
        match (method, pattern) {
            ("GET", "/") => self.instance_info(),
            ("GET", "/version") => {
                Response::json(&json!({ "firecracker_version": FIRECRACKER_API_VERSION }))
            }
            ("GET", "/vm/config") => {
                let inner = lock(&self.inner);
                let mut full = inner.pre.to_full();
                full.logger = inner.logger.clone();
                Response::json(&full)
            }
            ("GET", METRICS_SNAPSHOT_PATH) => match lock(&self.inner).vm.as_ref() {
                Some(vm) => Response::json(&vm.metrics().snapshot()),
                None => Response::bad(format!(
                    "GET {METRICS_SNAPSHOT_PATH}: the VM has not started; it has no counters yet"
                )),
            },
            ("GET", MEMORY_PATH) => match lock(&self.inner).vm.as_ref() {
                Some(vm) => {
                    let s = vm.metrics().snapshot();
                    Response::json(&json!({
                        "guest_bytes": s.memory.guest_bytes,
                        "rss_bytes": s.memory.rss_bytes,
                        "compression": s.memory_compression,
                        "policy": vm.memory_policy(),
                    }))
                }
                None => Response::bad(format!(
                    "GET {MEMORY_PATH}: the VM has not started; it has no memory yet"
                )),
            },
            ("PATCH", MEMORY_PATH) => match body::<MemoryPolicyUpdate>(method, path, bytes) {
                Ok(update) => match lock(&self.inner).vm.clone() {
                    Some(vm) => match vm.set_memory_policy(&update) {
                        Ok(policy) => Response::json(&json!({ "policy": policy })),
                        Err(e) => Response::bad(format!("{method} {path}: {e}")),
                    },
                    None => before_start(method, path),
                },
                Err(r) => r,
            },
            ("PUT", MIGRATION_PATH) => match body::<MigrationParams>(method, path, bytes) {
                Ok(p) => self.migrate(method, path, p),
                Err(r) => r,
            },
            ("GET", MIGRATION_PATH) => match lock(&self.migrator).as_ref() {
                Some(m) => {
                    let status = m.status();
                    if status.state == Phase::Completed {
                        self.migration_summary_read.store(true, Ordering::Release);
                    }
                    Response::json(&status)
                }
                None => before_start(method, path),
            },
            ("DELETE", MIGRATION_PATH) => match lock(&self.migrator).as_ref() {
                Some(m) if m.cancel() => Response::no_content(),
                Some(_) => Response::bad(format!("{method} {path}: no migration is under way")),
                None => before_start(method, path),
            },
            ("GET", VCPU_SCHED_PATH) => match lock(&self.inner).vm.as_ref() {
                Some(vm) => Response::json(&vm.vcpu_sched()),
                None => before_start(method, path),
            },
            // One entry (as `--vcpu-sched` takes it) or a list of them.
            ("PUT", VCPU_SCHED_PATH) => {
                let parsed = if bytes.trim_ascii_start().starts_with(b"[") {
                    body::<Vec<VcpuSchedBody>>(method, path, bytes)
                } else {
                    body::<VcpuSchedBody>(method, path, bytes).map(|b| vec![b])
                };
                match parsed {
                    Ok(b) => self.set_vcpu_sched(method, path, b),
                    Err(r) => r,
                }
            }
            ("GET", OPENAPI_PATH) => Response {
                status: 200,
                body: Some(OPENAPI_YAML.into()),
            },
            ("GET", "/machine-config") => Response::json(&lock(&self.inner).pre.machine),
            ("PUT", "/machine-config") => {
                self.pre_boot(method, path, bytes, |pre, m: MachineConfig| {
                    pre.set_machine(m)
                })
            }
            ("PATCH", "/machine-config") => {
                self.pre_boot(method, path, bytes, |pre, m: MachineConfigUpdate| {
                    pre.patch_machine(m)
                })
            }
            ("PUT", "/boot-source") => self.pre_boot(method, path, bytes, |pre, b: BootSource| {
                pre.set_boot_source(b)
            }),
            ("PUT", "/drives/{drive_id}") => {
                self.pre_boot(method, path, bytes, |pre, d: Drive| pre.put_drive(id, d))
            }
            ("PATCH", "/drives/{drive_id}") => self.patch_drive(method, path, id, bytes),
            ("PUT", "/network-interfaces/{iface_id}") => {
                self.pre_boot(method, path, bytes, |pre, n: NetworkInterface| {
                    pre.put_net(id, n)
                })
            }
            ("PATCH", "/network-interfaces/{iface_id}") => self.patch_net(method, path, id, bytes),
            ("PUT", "/vsock") => {
                self.pre_boot(method, path, bytes, |pre, v: Vsock| pre.set_vsock(v))
            }
            ("PUT", "/balloon") => {
                self.pre_boot(method, path, bytes, |pre, b: Balloon| pre.set_balloon(b))
            }
            ("PUT", "/serial") => self.pre_boot(method, path, bytes, |pre, s: SerialDevice| {
                pre.set_serial(s)
            }),
            ("PUT", "/cpu-config") => self.pre_boot(method, path, bytes, |pre, c: CpuConfig| {
                pre.set_cpu_config(c)
            }),
            ("PUT", "/entropy") => {
                self.pre_boot(method, path, bytes, |pre, e: Entropy| pre.set_entropy(e))
            }
            ("GET", "/balloon") => self.get_balloon(),
            ("PATCH", "/balloon") => self.patch_balloon(method, path, bytes),
            ("GET", "/balloon/statistics") => self.balloon_stats(),
            ("PATCH", "/balloon/statistics") => self.patch_balloon_stats(method, path, bytes),
            ("PATCH", "/balloon/hinting/start") => {
                // The body may be left out: Firecracker's default then.
                let start = if bytes.iter().all(u8::is_ascii_whitespace) {
                    BalloonStartCmd::default()
                } else {
                    match body::<BalloonStartCmd>(method, path, bytes) {
                        Ok(s) => s,
                        Err(r) => return r,
                    }
                };
                self.hinting(method, path, |b| b.start_hinting(start.acknowledge_on_stop))
            }
            ("PATCH", "/balloon/hinting/stop") => self.hinting(method, path, |b| b.stop_hinting()),
            ("GET", "/balloon/hinting/status") => {
                let inner = lock(&self.inner);
                let Some(vm) = inner.vm.as_ref() else {
                    return before_start(method, path);
                };
                match vm.balloon().and_then(|b| b.hinting_status()) {
                    Ok(s) => {
                        let mut out = json!({ "host_cmd": s.host_cmd });
                        if let Some(guest) = s.guest_cmd {
                            out["guest_cmd"] = json!(guest);
                        }
                        Response::json(&out)
                    }
                    Err(e) => Response::bad(format!("{method} {path}: {e}")),
                }
            }
            ("PUT", "/actions") => match body::<InstanceActionInfo>(method, path, bytes) {
                Ok(a) => self.action(method, path, a.action_type),
                Err(r) => r,
            },
            ("PATCH", "/vm") => match body::<VmState>(method, path, bytes) {
                Ok(s) => self.set_vm_state(method, path, s.state),
                Err(r) => r,
            },
            ("PUT", "/snapshot/create") => {
                match body::<SnapshotCreateParams>(method, path, bytes) {
                    Ok(p) => self.snapshot_create(method, path, p),
                    Err(r) => r,
                }
            }
            ("PUT", "/snapshot/load") => match body::<SnapshotLoadParams>(method, path, bytes) {
                Ok(p) => self.snapshot_load(method, path, p),
                Err(r) => r,
            },
            ("PUT", "/metrics") => match body::<Metrics>(method, path, bytes) {
                Ok(m) => done(method, path, self.configure_metrics(m)),
                Err(r) => r,
            },
            ("GET", "/mmds") => Response::json(&self.mmds.get()),
            ("PUT", "/mmds") => match body::<Value>(method, path, bytes) {
                Ok(v) => done(method, path, self.mmds.put(v)),
                Err(r) => r,
            },
            ("PATCH", "/mmds") => match body::<Value>(method, path, bytes) {
                Ok(v) => done(method, path, self.mmds.patch(&v)),
                Err(r) => r,
            },
            ("PUT", "/mmds/config") => {
                self.pre_boot(method, path, bytes, |pre, m: MmdsConfig| pre.set_mmds(m))
            }
            ("PUT", "/logger") => match body::<Logger>(method, path, bytes) {
                Ok(l) => done(method, path, self.configure_logger(l)),
                Err(r) => r,
            },
            (_, pattern) => {
                let allowed = ROUTES
                    .iter()
                    .find(|(p, _)| *p == pattern)
                    .map_or("", |(_, m)| *m);
                Response::bad(format!(
                    "{method} {path}: not a method this resource accepts (it accepts {allowed})"
                ))
            }
        }
    }

    fn introspect(&self, method: &str, path: &str, query: &str, bytes: &[u8]) -> Response {
        let attached = lock(&self.introspection).clone();
        match attached {
            Some((i, debug_api)) => {
                crate::introspect::route(&i, debug_api, method, path, query, bytes)
            }
            None => before_start(method, path),
        }
    }

    fn instance_info(&self) -> Response {
        let state = match lock(&self.inner).vm.as_ref().map(VmControl::state) {
            None => "Not started",
            Some(RunState::Running) => "Running",
            Some(RunState::Paused) => "Paused",
        };
        Response::json(&InstanceInfo {
            app_name: "Vigil".into(),
            id: self.id.clone(),
            state: state.into(),
            vmm_version: env!("CARGO_PKG_VERSION").into(),
        })
    }

    /// A pre-boot-only request: parse, refuse after start, apply.
    fn pre_boot<T: serde::de::DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        bytes: &[u8],
        apply: impl FnOnce(&mut PreBoot, T) -> Result<(), PreBootError>,
    ) -> Response {
        let value = match body::<T>(method, path, bytes) {
            Ok(v) => v,
            Err(r) => return r,
        };
        let mut inner = lock(&self.inner);
        if inner.vm.is_some() {
            return after_start(method, path);
        }
        // Apply to a copy: a failed check leaves the stored configuration as it was.
        let mut pre = inner.pre.clone();
        match apply(&mut pre, value) {
            Ok(()) => {
                inner.pre = pre;
                Response::no_content()
            }
            Err(e) => Response::bad(format!("{method} {path}: {e}")),
        }
    }

    /// `PATCH /drives/{id}`: a running drive's rate limit, as Firecracker changes
    /// it (a bucket left out stays, a zero one goes, another replaces it). A new
    /// backing file (`path_on_host`) is refused.
    fn patch_drive(&self, method: &str, path: &str, id: &str, bytes: &[u8]) -> Response {
        let p = match body::<PartialDrive>(method, path, bytes) {
            Ok(p) => p,
            Err(r) => return r,
        };
        let bad = |e: String| Response::bad(format!("{method} {path}: {e}"));
        if p.drive_id != id {
            return bad(format!(
                "drive_id {:?}: differs from the id in the path, {id:?}",
                p.drive_id
            ));
        }
        let mut inner = lock(&self.inner);
        let Some(vm) = inner.vm.clone() else {
            return before_start(method, path);
        };
        if let Some(host) = &p.path_on_host {
            return bad(format!(
                "path_on_host {host:?}: Vigil cannot change the backing file of a running drive (leave path_on_host out; rate_limiter can change)"
            ));
        }
        let update = match limit_update("rate_limiter", p.rate_limiter.as_ref()) {
            Ok(u) => u,
            Err(e) => return bad(e.to_string()),
        };
        match vm.drive(id) {
            Ok(drive) => drive.set_rate_limit(update),
            Err(_) => return bad(format!("drive_id {id:?}: the VM has no such drive")),
        }
        if let Some(d) = inner.pre.drives.iter_mut().find(|d| d.drive_id == id) {
            d.rate_limiter = merge_rate_limiter(d.rate_limiter, p.rate_limiter.as_ref());
        }
        Response::no_content()
    }

    /// `PATCH /network-interfaces/{id}`: a running interface's rate limits, as
    /// for a drive.
    fn patch_net(&self, method: &str, path: &str, id: &str, bytes: &[u8]) -> Response {
        let p = match body::<PartialNetworkInterface>(method, path, bytes) {
            Ok(p) => p,
            Err(r) => return r,
        };
        let bad = |e: String| Response::bad(format!("{method} {path}: {e}"));
        if p.iface_id != id {
            return bad(format!(
                "iface_id {:?}: differs from the id in the path, {id:?}",
                p.iface_id
            ));
        }
        let mut inner = lock(&self.inner);
        let Some(vm) = inner.vm.clone() else {
            return before_start(method, path);
        };
        let rx = match limit_update("rx_rate_limiter", p.rx_rate_limiter.as_ref()) {
            Ok(u) => u,
            Err(e) => return bad(e.to_string()),
        };
        let tx = match limit_update("tx_rate_limiter", p.tx_rate_limiter.as_ref()) {
            Ok(u) => u,
            Err(e) => return bad(e.to_string()),
        };
        // The VM's interfaces are those configured, in order (PreBoot::to_vm_config).
        let Some(index) = inner.pre.nets.iter().position(|n| n.iface_id == id) else {
            return bad(format!(
                "iface_id {id:?}: the VM has no such network interface"
            ));
        };
        match vm.net(index) {
            Ok(net) => net.set_rate_limits(rx, tx),
            Err(e) => return bad(format!("iface_id {id:?}: {e}")),
        }
        let n = &mut inner.pre.nets[index];
        n.rx_rate_limiter = merge_rate_limiter(n.rx_rate_limiter, p.rx_rate_limiter.as_ref());
        n.tx_rate_limiter = merge_rate_limiter(n.tx_rate_limiter, p.tx_rate_limiter.as_ref());
        Response::no_content()
    }

    fn action(&self, method: &str, path: &str, action: ActionType) -> Response {
        match action {
            ActionType::InstanceStart => self.instance_start(method, path),
            ActionType::SendCtrlAltDel => {
                let vm = lock(&self.inner).vm.clone();
                match vm {
                    None => before_start(method, path),
                    Some(vm) => done_as(method, path, "SendCtrlAltDel", vm.send_ctrl_alt_del()),
                }
            }
            ActionType::FlushMetrics => done_as(method, path, "FlushMetrics", self.flush_metrics()),
        }
    }

    fn instance_start(&self, method: &str, path: &str) -> Response {
        let mut inner = lock(&self.inner);
        if inner.vm.is_some() {
            return Response::bad(format!(
                "{method} {path}: InstanceStart: the VM has already started"
            ));
        }
        let mut config = match inner.pre.to_vm_config() {
            Ok(c) => c,
            Err(e) => return Response::bad(format!("{method} {path}: InstanceStart: {e}")),
        };
        config.share_mmds(&self.mmds);
        let (reply, answer) = mpsc::channel();
        let sent = lock(&self.to_vmm).send(ToVmm::Start {
            config: Box::new(config),
            reply,
        });
        if sent.is_err() {
            return Response::error(500, "InstanceStart: the VMM thread is gone");
        }
        match answer.recv() {
            Ok(Ok(vm)) => {
                inner.vm = Some(vm);
                Response::no_content()
            }
            Ok(Err(e)) => Response::bad(format!(
                "{method} {path}: InstanceStart: cannot start the VM: {e}"
            )),
            Err(_) => Response::error(500, "InstanceStart: the VMM thread ended without an answer"),
        }
    }

    /// `PUT /vigil/migration`: starts moving the running VM; `GET` follows it.
    fn set_vcpu_sched(&self, method: &str, path: &str, bodies: Vec<VcpuSchedBody>) -> Response {
        let bad = |why: String| Response::bad(format!("{method} {path}: {why}"));
        if bodies.is_empty() {
            return bad("no entries: give one object or a list of them".into());
        }
        let mut entries = Vec::with_capacity(bodies.len());
        for (i, body) in bodies.into_iter().enumerate() {
            match VcpuSched::try_from(body) {
                Ok(e) => entries.push(e),
                Err(e) if i == 0 => return bad(e.to_string()),
                Err(e) => return bad(format!("entry {i}: {e}")),
            }
        }
        let Some(vm) = lock(&self.inner).vm.clone() else {
            return before_start(method, path);
        };
        match vm.set_vcpu_sched(&entries) {
            Ok(now) => Response::json(&now),
            Err(e) => bad(e.to_string()),
        }
    }

    fn migrate(&self, method: &str, path: &str, p: MigrationParams) -> Response {
        let bad = |why: String| Response::bad(format!("{method} {path}: {why}"));
        let Some(migrator) = lock(&self.migrator).clone() else {
            return before_start(method, path);
        };
        let destination = match p.destination.parse::<Target>() {
            Ok(t) => t,
            Err(e) => return bad(format!("destination {e}")),
        };
        if p.token.is_empty() {
            return bad("token \"\": give the destination's --migration-token".into());
        }
        if p.downtime_ms == Some(0) || p.max_rounds == Some(0) || p.bandwidth_mib_s == Some(0) {
            return bad("downtime_ms, bandwidth_mib_s and max_rounds are at least 1".into());
        }
        let tls = match (&p.tls_ca, &p.tls_server_name) {
            (None, None) => None,
            (None, Some(name)) => {
                return bad(format!(
                    "tls_server_name {name:?} without tls_ca: give both"
                ))
            }
            (Some(ca), name) => {
                let Some(name) = name.as_deref().or(destination.host()) else {
                    return bad(format!(
                        "tls_ca with destination {destination}: give tls_server_name, the name the destination's certificate carries"
                    ));
                };
                match ClientTls::load(ca, name) {
                    Ok(tls) => Some(tls),
                    Err(e @ TlsError::ServerName(_)) => return bad(format!("tls_server_name {e}")),
                    Err(e) => return bad(format!("tls_ca {e}")),
                }
            }
        };
        let request = MigrationRequest {
            destination,
            token: p.token,
            downtime: p
                .downtime_ms
                .map_or(DEFAULT_DOWNTIME, std::time::Duration::from_millis),
            bandwidth: p.bandwidth_mib_s.map(|m| m << 20),
            max_rounds: p.max_rounds.unwrap_or(DEFAULT_MAX_ROUNDS),
            auto_converge: p.auto_converge.unwrap_or(true),
            method: p.method.unwrap_or_default(),
            tls,
        };
        match migrator.start(request) {
            Ok(()) => Response::no_content(),
            Err(e) => bad(e.to_string()),
        }
    }

    /// `PUT /snapshot/create`: a full or diff snapshot of the paused VM.
    fn snapshot_create(&self, method: &str, path: &str, p: SnapshotCreateParams) -> Response {
        let vm = lock(&self.inner).vm.clone();
        let Some(vm) = vm else {
            return before_start(method, path);
        };
        let kind = match p.snapshot_type {
            SnapshotType::Full => MemoryKind::Full,
            SnapshotType::Diff => MemoryKind::Diff,
        };
        match vm.snapshot(&p.snapshot_path, &p.mem_file_path, kind) {
            Ok(info) => {
                tracing::info!(
                    snapshot = %p.snapshot_path.display(),
                    memory = %p.mem_file_path.display(),
                    memory_kind = ?info.memory_kind,
                    state_bytes = info.state_bytes,
                    memory_bytes = info.memory_bytes,
                    memory_written = info.memory_written,
                    memory_packed_pages = info.memory_packed_pages,
                    memory_packed_bytes = info.memory_packed_bytes,
                    ms = info.took.as_millis() as u64,
                    "snapshot created"
                );
                Response::no_content()
            }
            Err(e) => Response::bad(format!("{method} {path}: {e}")),
        }
    }

    /// `PUT /snapshot/load`: the VM a snapshot holds, instead of a configured one.
    fn snapshot_load(&self, method: &str, path: &str, p: SnapshotLoadParams) -> Response {
        let bad = |why: String| Response::bad(format!("{method} {path}: {why}"));
        let memory = match (p.mem_backend, p.mem_file_path) {
            (Some(_), Some(_)) => {
                return bad("mem_backend and mem_file_path: give one of them, not both".into())
            }
            (None, None) => {
                return bad("mem_backend: missing (or the deprecated mem_file_path)".into())
            }
            (Some(b), None) => match b.backend_type {
                MemoryBackendType::File => SnapshotMemory::File(b.backend_path),
                MemoryBackendType::Uffd => SnapshotMemory::Uffd(b.backend_path),
            },
            (None, Some(f)) => SnapshotMemory::File(f),
        };
        let mut overrides = vigil_vmm::builder::RestoreOptions {
            taps: Vec::new(),
            vsock_uds: p.vsock_override.map(|v| v.uds_path),
            mmds: Some(self.mmds().clone()),
            clock_realtime: p.clock_realtime,
            // This process's --memory-compression, which the launcher adds.
            memory_compression: None,
        };
        for (i, o) in p.network_overrides.into_iter().enumerate() {
            if let Err(e) = NetConfig::new(o.host_dev_name.clone(), 0).validate() {
                return bad(format!("network_overrides[{i}].{e}"));
            }
            if overrides.taps.iter().any(|(id, _)| *id == o.iface_id) {
                return bad(format!(
                    "network_overrides[{i}].iface_id {:?}: overridden twice",
                    o.iface_id
                ));
            }
            overrides.taps.push((o.iface_id, o.host_dev_name));
        }
        if let Some(h) = p
            .huge_pages
            .as_deref()
            .filter(|h| !["None", "Snapshot"].contains(h))
        {
            return bad(format!(
                "huge_pages {h:?}: a loaded snapshot's memory is its file's pages (None or Snapshot)"
            ));
        }
        let mut inner = lock(&self.inner);
        if inner.vm.is_some() {
            return after_start(method, path);
        }
        if inner.pre.boot_source.is_some()
            || !inner.pre.drives.is_empty()
            || !inner.pre.nets.is_empty()
        {
            return bad("a snapshot can only be loaded before anything is configured; this VM has a boot source or devices already".into());
        }
        let load = SnapshotLoad {
            state_path: p.snapshot_path,
            memory,
            resume: p.resume_vm,
            overrides,
        };
        let (reply, answer) = mpsc::channel();
        if lock(&self.to_vmm)
            .send(ToVmm::Restore { load, reply })
            .is_err()
        {
            return Response::error(500, "snapshot load: the VMM thread is gone");
        }
        match answer.recv() {
            Ok(Ok(vm)) => {
                inner.vm = Some(vm);
                Response::no_content()
            }
            Ok(Err(e)) => bad(format!("cannot load the snapshot: {e}")),
            Err(_) => Response::error(500, "snapshot load: the VMM thread ended without an answer"),
        }
    }

    fn set_vm_state(&self, method: &str, path: &str, state: VmStateValue) -> Response {
        let vm = lock(&self.inner).vm.clone();
        let Some(vm) = vm else {
            return before_start(method, path);
        };
        let r = match state {
            VmStateValue::Paused => vm.pause(),
            VmStateValue::Resumed => vm.resume(),
        };
        done_as(method, path, format_args!("state {state:?}"), r)
    }

    fn get_balloon(&self) -> Response {
        let inner = lock(&self.inner);
        let Some(configured) = inner.pre.balloon.clone() else {
            return Response::bad("GET /balloon: the VM has no balloon device (PUT /balloon)");
        };
        match inner.vm.as_ref().map(|vm| vm.balloon().cloned()) {
            Some(Ok(b)) => {
                let (target_pages, _) = b.pages();
                Response::json(&Balloon {
                    amount_mib: pages_to_mib(target_pages),
                    stats_polling_interval_s: b.stats_interval_s(),
                    ..configured
                })
            }
            _ => Response::json(&configured),
        }
    }

    fn patch_balloon(&self, method: &str, path: &str, bytes: &[u8]) -> Response {
        let update = match body::<BalloonUpdate>(method, path, bytes) {
            Ok(u) => u,
            Err(r) => return r,
        };
        let mut inner = lock(&self.inner);
        let Some(vm) = inner.vm.clone() else {
            let mut pre = inner.pre.clone();
            return match pre.patch_balloon_amount(update.amount_mib) {
                Ok(()) => {
                    inner.pre = pre;
                    Response::no_content()
                }
                Err(e) => Response::bad(format!("{method} {path}: {e}")),
            };
        };
        let memory = inner.pre.machine.mem_size_mib;
        if update.amount_mib > memory {
            return Response::bad(format!(
                "{method} {path}: amount_mib {}: more than the guest's {memory} MiB",
                update.amount_mib
            ));
        }
        match vm.balloon() {
            Ok(b) => {
                b.set_target_mib(update.amount_mib);
                if let Some(pre) = inner.pre.balloon.as_mut() {
                    pre.amount_mib = update.amount_mib;
                }
                Response::no_content()
            }
            Err(e) => Response::bad(format!("{method} {path}: {e}")),
        }
    }

    fn balloon_stats(&self) -> Response {
        let inner = lock(&self.inner);
        let Some(vm) = inner.vm.as_ref() else {
            return before_start("GET", "/balloon/statistics");
        };
        let b = match vm.balloon() {
            Ok(b) => b,
            Err(e) => return Response::bad(format!("GET /balloon/statistics: {e}")),
        };
        if b.stats_interval_s() == 0 {
            return Response::bad(
                "GET /balloon/statistics: statistics are off (stats_polling_interval_s 0 in PUT /balloon)",
            );
        }
        let (target, actual) = b.pages();
        let mut out = serde_json::Map::new();
        out.insert("target_pages".into(), json!(target));
        out.insert("actual_pages".into(), json!(actual));
        out.insert("target_mib".into(), json!(pages_to_mib(target)));
        out.insert("actual_mib".into(), json!(pages_to_mib(actual)));
        for (tag, value) in b.stats() {
            if let Some(name) = STAT_NAMES.get(usize::from(tag)) {
                out.insert((*name).into(), json!(value));
            }
        }
        Response::json(&Value::Object(out))
    }

    /// A free page hinting command to the running VM's balloon.
    fn hinting(
        &self,
        method: &str,
        path: &str,
        command: impl FnOnce(&BalloonHandle) -> Result<(), ControlError>,
    ) -> Response {
        let inner = lock(&self.inner);
        let Some(vm) = inner.vm.as_ref() else {
            return before_start(method, path);
        };
        done(method, path, vm.balloon().and_then(command))
    }

    fn patch_balloon_stats(&self, method: &str, path: &str, bytes: &[u8]) -> Response {
        let update = match body::<BalloonStatsUpdate>(method, path, bytes) {
            Ok(u) => u,
            Err(r) => return r,
        };
        let seconds = update.stats_polling_interval_s;
        let mut inner = lock(&self.inner);
        let Some(vm) = inner.vm.clone() else {
            let mut pre = inner.pre.clone();
            return match pre.patch_balloon_stats(seconds) {
                Ok(()) => {
                    inner.pre = pre;
                    Response::no_content()
                }
                Err(e) => Response::bad(format!("{method} {path}: {e}")),
            };
        };
        let r = vm.balloon().and_then(|b| b.set_stats_interval_s(seconds));
        if r.is_ok() {
            if let Some(pre) = inner.pre.balloon.as_mut() {
                pre.stats_polling_interval_s = seconds;
            }
        }
        done_as(
            method,
            path,
            format_args!("stats_polling_interval_s {seconds}"),
            r,
        )
    }
}
