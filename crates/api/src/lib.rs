//! Vigil's per-VM REST API, compatible with Firecracker's for the resources both
//! have, on a Unix socket, and its OpenAPI document (`openapi.yaml`).
//!
//! Data flows one way: request bodies (the configuration document's,
//! `vigil_model::firecracker`, and the API's own, [`model`]) are checked and
//! accumulated in [`preboot::PreBoot`], which becomes a `VmConfig` at `InstanceStart`; the thread
//! that owns the VM builds and starts it ([`api::ToVmm`]) and hands back a
//! `VmControl` for pause, resume, Ctrl-Alt-Del and the balloon.

pub mod api;
pub mod http;
pub mod introspect;
pub mod metrics;
pub mod model;
pub mod preboot;

pub use api::{
    Api, LoggerHook, LoggerHookError, Response, SnapshotLoad, SnapshotMemory, StartError, ToVmm,
    FIRECRACKER_API_VERSION, OPENAPI_PATH, OPENAPI_YAML,
};
pub use http::{serve, ApiServer, ServeError};
pub use metrics::{MetricsError, OutputError};
