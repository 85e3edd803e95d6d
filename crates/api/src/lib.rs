//! Vigil's per-VM REST API, compatible with Firecracker's for the resources both
//! have, on a Unix socket; its OpenAPI document (`openapi.yaml`); and Firecracker's
//! configuration file format (`--config-file`).
//!
//! Data flows one way: request bodies ([`model`]) are checked and accumulated in
//! [`preboot::PreBoot`], which becomes a `VmConfig` at `InstanceStart`; the thread
//! that owns the VM builds and starts it ([`api::ToVmm`]) and hands back a
//! `VmControl` for pause, resume, Ctrl-Alt-Del and the balloon.

pub mod api;
pub mod http;
pub mod introspect;
pub mod metrics;
pub mod model;
pub mod preboot;

pub use api::{
    Api, LoggerHook, Response, ToVmm, FIRECRACKER_API_VERSION, OPENAPI_PATH, OPENAPI_YAML,
};
pub use http::{serve, ApiServer};

/// Reads a Firecracker configuration file: the error names the file, and the key
/// and field at fault.
pub fn read_config_file(path: &std::path::Path) -> Result<model::FullVmConfig, String> {
    let text = std::fs::read(path)
        .map_err(|e| format!("--config-file {}: cannot read it: {e}", path.display()))?;
    model::parse(&text).map_err(|e| format!("--config-file {}: {e}", path.display()))
}
