//! The bodies of the API's own requests and answers, shaped like Firecracker's
//! (same field names, same optional and required fields): `PATCH` bodies,
//! actions, states. The configuration bodies (`PUT /boot-source`,
//! `/machine-config`, `/drives`, ...) are the configuration document's,
//! `vigil_model::firecracker`. Unknown fields are refused, as Firecracker
//! refuses them.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use vigil_model::firecracker::RateLimiter;

/// `PATCH /machine-config`: the fields given replace the current ones.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigUpdate {
    pub vcpu_count: Option<u32>,
    pub mem_size_mib: Option<u64>,
    pub smt: Option<bool>,
    pub cpu_template: Option<String>,
    pub track_dirty_pages: Option<bool>,
    pub huge_pages: Option<String>,
}

/// `PATCH /drives/{drive_id}`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialDrive {
    pub drive_id: String,
    pub path_on_host: Option<String>,
    pub rate_limiter: Option<RateLimiter>,
}

/// `PATCH /network-interfaces/{iface_id}`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialNetworkInterface {
    pub iface_id: String,
    pub rx_rate_limiter: Option<RateLimiter>,
    pub tx_rate_limiter: Option<RateLimiter>,
}

/// `PATCH /balloon`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonUpdate {
    pub amount_mib: u64,
}

/// `PATCH /balloon/statistics`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonStatsUpdate {
    pub stats_polling_interval_s: u64,
}

/// `PATCH /balloon/hinting/start` (the body may be left out).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonStartCmd {
    /// Answer the guest's stop with done at once, so that it takes its hinted
    /// pages back (Firecracker's default).
    #[serde(default = "yes")]
    pub acknowledge_on_stop: bool,
}

fn yes() -> bool {
    true
}

impl Default for BalloonStartCmd {
    fn default() -> Self {
        Self {
            acknowledge_on_stop: true,
        }
    }
}

/// `PUT /actions`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceActionInfo {
    pub action_type: ActionType,
}

/// What `PUT /actions` can do.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
pub enum ActionType {
    InstanceStart,
    SendCtrlAltDel,
    FlushMetrics,
}

/// `PATCH /vm`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmState {
    pub state: VmStateValue,
}

/// The states `PATCH /vm` asks for.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
pub enum VmStateValue {
    Paused,
    Resumed,
}

/// `PUT /snapshot/create`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreateParams {
    pub snapshot_path: PathBuf,
    pub mem_file_path: PathBuf,
    #[serde(default)]
    pub snapshot_type: SnapshotType,
}

/// `snapshot_type`.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
pub enum SnapshotType {
    #[default]
    Full,
    Diff,
}

/// `PUT /snapshot/load`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoadParams {
    pub snapshot_path: PathBuf,
    /// Deprecated by Firecracker in favour of `mem_backend`; one of the two.
    pub mem_file_path: Option<PathBuf>,
    pub mem_backend: Option<MemoryBackend>,
    /// Deprecated name of `track_dirty_pages`.
    #[serde(default)]
    pub enable_diff_snapshots: bool,
    #[serde(default)]
    pub track_dirty_pages: bool,
    #[serde(default)]
    pub resume_vm: bool,
    #[serde(default)]
    pub network_overrides: Vec<NetworkOverride>,
    pub vsock_override: Option<VsockOverride>,
    #[serde(default)]
    pub clock_realtime: bool,
    pub huge_pages: Option<String>,
}

/// `network_overrides[]`: another tap for an interface of a loaded snapshot.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    pub iface_id: String,
    pub host_dev_name: String,
}

/// `vsock_override`: another Unix socket for a loaded snapshot's vsock.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockOverride {
    pub uds_path: PathBuf,
}

/// Where a loaded snapshot's memory comes from.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryBackend {
    pub backend_type: MemoryBackendType,
    pub backend_path: PathBuf,
}

/// `mem_backend.backend_type`.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
pub enum MemoryBackendType {
    File,
    Uffd,
}

/// `PUT /vigil/migration`: move the running VM to a waiting Vigil.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationParams {
    /// `tcp:HOST:PORT` or `unix:PATH`, where `vigil run --migrate-from` waits.
    pub destination: String,
    /// The destination's `--migration-token`.
    pub token: String,
    /// The longest pause at the end, predicted (default 100).
    pub downtime_ms: Option<u64>,
    /// At most this many MiB per second (default: no limit).
    pub bandwidth_mib_s: Option<u64>,
    /// Pre-copy rounds at most (default 30).
    pub max_rounds: Option<u32>,
    /// Slow the vCPUs when the guest dirties memory faster than it is sent
    /// (default true).
    pub auto_converge: Option<bool>,
    /// `auto` (default: pre-copy, post-copy when it does not converge),
    /// `precopy` or `postcopy`.
    pub method: Option<vigil_model::migration::MigrationMethod>,
    /// Over TLS: a PEM file of the CA (or the self-signed certificate) that
    /// the destination's `--migration-tls-cert` must come from.
    pub tls_ca: Option<std::path::PathBuf>,
    /// The name the destination's certificate must carry (default: the host
    /// of a `tcp:` destination).
    pub tls_server_name: Option<String>,
}

/// `GET /`.
#[derive(Clone, Debug, Serialize)]
pub struct InstanceInfo {
    pub app_name: String,
    pub id: String,
    pub state: String,
    pub vmm_version: String,
}
