//! What the supervisor refuses or fails at, each with the HTTP status the API
//! answers it with ([`SupervisorError::status`]).

use std::path::PathBuf;
use std::time::Duration;

use axum::http::StatusCode;
use vigil_model::config::IntrospectConfigError;
use vigil_model::firecracker::{DocumentError, JsonError};

use super::request::TraceSpecError;
use crate::client::ClientError;
use crate::error::ApiError;
use crate::events::ThrottleLimits;
use crate::id::IdError;

/// Why a supervisor operation failed; its text is the API's `fault_message`.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error(transparent)]
    Id(#[from] IdError),
    /// `config` of a create request is not an object (`kind` says what it is).
    #[error("config must be a JSON object (a Firecracker-style VM configuration with \"boot-source\", \"machine-config\", ...), not {kind}")]
    ConfigNotObject { kind: &'static str },
    #[error("config: {0}")]
    ConfigJson(#[from] JsonError),
    #[error("config: {0}")]
    Config(#[from] DocumentError),
    /// A file the configuration may not name (`--allow-vm-path`).
    #[error(transparent)]
    Path(#[from] super::PathRefused),
    #[error("introspect.{0}")]
    Introspect(#[from] IntrospectConfigError),
    #[error(transparent)]
    TraceSyscalls(#[from] TraceSpecError),
    #[error("no VM with id {0:?}")]
    NoSuchVm(String),
    #[error("a VM with id {0:?} already exists: destroy it first or pick another id")]
    IdTaken(String),
    #[error("the daemon already holds {held} VMs (--max-vms {max}): destroy some first")]
    TooManyVms { held: usize, max: usize },
    #[error("{} belongs to a VM that still answers on its API socket (not started by this daemon): stop it, or pick another id", dir.display())]
    FolderInUse { dir: PathBuf },
    /// A file or folder of the VM's could not be made ready; `what` says which
    /// step (`cannot create`, `cannot remove stale`, `cannot write`).
    #[error("{what} {}: {source}", path.display())]
    Folder {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// The jailer takes Firecracker's ids, without `_`.
    #[error("id {0:?}: VMs run in the jailer, whose ids are letters, digits and '-' only (Firecracker's): pick an id without '_', or run the daemon with --no-jailer")]
    JailId(String),
    /// A file the configuration names cannot be put into the VM's jail.
    #[error("config: {field} {path:?}: {why}")]
    JailFile {
        field: String,
        path: String,
        why: String,
    },
    #[error("cannot encode the config: {0}")]
    EncodeConfig(serde_json::Error),
    #[error("cannot start {}: {source}", vmm.display())]
    Spawn {
        vmm: PathBuf,
        source: std::io::Error,
    },
    #[error("VM {id:?} did not report itself running on {} within {timeout:?}; it was stopped and removed. Its log ended with: {log}", socket.display())]
    StartTimeout {
        id: String,
        socket: PathBuf,
        timeout: Duration,
        log: String,
    },
    /// The VMM refused its configuration (or died before it ran): `reason` is how
    /// it ended, `log` the end of its log.
    #[error("VM {id:?} failed to start: {reason}: {log}")]
    StartFailed {
        id: String,
        reason: String,
        log: String,
    },
    /// A pause or resume of a VM not in the state it needs (`from`); `word` is
    /// "paused" or "resumed".
    #[error("VM {id:?} is {state}: only a {from} VM can be {word}")]
    CannotPauseOrResume {
        id: String,
        state: &'static str,
        from: &'static str,
        word: &'static str,
    },
    #[error("VM {id:?} is {state}: only a running or paused VM can be throttled")]
    CannotThrottle { id: String, state: &'static str },
    #[error("VM {id:?} has no drive or network interface that the limits {limits:?} apply to")]
    NothingToThrottle { id: String, limits: ThrottleLimits },
    /// The VM's API socket did not answer `what`.
    #[error("VM {id:?}: {what}: {source}")]
    VmUnreachable {
        id: String,
        what: String,
        source: Box<ClientError>,
    },
    #[error("VM {id:?} is {state}: only a running or paused VM can migrate")]
    CannotMigrate { id: String, state: &'static str },
    #[error("to {to:?}: expected the other daemon's TCP API, https://HOST:PORT (or HOST:PORT for plain HTTP)")]
    BadPeer { to: String },
    #[error("to {to}: this daemon has no CA to check the other daemon's certificate with (start it with --peer-tls-ca)")]
    PeerTlsCa { to: String },
    /// The other daemon did not take the VM.
    #[error("the daemon at {to} {why}")]
    Peer { to: String, why: String },
    /// The migration started and did not complete; the VM runs here still.
    #[error("VM {id:?} did not migrate to {to}: {why}")]
    MigrationFailed { id: String, to: String, why: String },
    /// The VM's API refused `what` with `status` and `message`.
    #[error("VM {id:?} refused {what} (HTTP {status}): {message}")]
    VmRefused {
        id: String,
        what: String,
        status: u16,
        message: String,
    },
}

impl SupervisorError {
    /// The HTTP status the daemon's API answers this error with.
    pub fn status(&self) -> StatusCode {
        use SupervisorError::*;
        match self {
            Id(_)
            | ConfigNotObject { .. }
            | ConfigJson(_)
            | Config(_)
            | Path(_)
            | Introspect(_)
            | TraceSyscalls(_)
            | JailId(_)
            | JailFile { .. }
            | StartFailed { .. } => StatusCode::BAD_REQUEST,
            NoSuchVm(_) => StatusCode::NOT_FOUND,
            IdTaken(_)
            | FolderInUse { .. }
            | CannotPauseOrResume { .. }
            | CannotThrottle { .. }
            | NothingToThrottle { .. }
            | CannotMigrate { .. } => StatusCode::CONFLICT,
            BadPeer { .. } | PeerTlsCa { .. } => StatusCode::BAD_REQUEST,
            Peer { .. } | MigrationFailed { .. } => StatusCode::BAD_GATEWAY,
            TooManyVms { .. } => StatusCode::TOO_MANY_REQUESTS,
            Folder { .. } | EncodeConfig(_) | Spawn { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            VmUnreachable { .. } | VmRefused { .. } => StatusCode::BAD_GATEWAY,
            StartTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
        }
    }
}

impl From<SupervisorError> for ApiError {
    fn from(e: SupervisorError) -> Self {
        ApiError::new(e.status(), e.to_string())
    }
}
