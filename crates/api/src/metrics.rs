//! `PUT /metrics` and the `FlushMetrics` action: one JSON line per flush, appended
//! to a file or written to a named pipe.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};
use vigil_metrics::json::json_line;
use vigil_metrics::HostSnapshot;
use vigil_vmm::{RunState, VmControl};

/// Requests the API answered, by status class.
#[derive(Clone, Copy, Debug, Default)]
pub struct RequestCounts {
    pub ok: u64,
    pub client_errors: u64,
    pub server_errors: u64,
}

impl RequestCounts {
    /// Counts one answer with `status`.
    pub fn count(&mut self, status: u16) {
        match status {
            500.. => self.server_errors += 1,
            400..=499 => self.client_errors += 1,
            _ => self.ok += 1,
        }
    }
}

/// A file Firecracker's API sends logs or metrics to that cannot be used; `field`
/// names the body's field (`metrics_path`, `log_path`).
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("{field}: empty path")]
    EmptyPath { field: &'static str },
    #[error("{field} {path:?}: cannot open it: {source}")]
    Open {
        field: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("{field} {path:?}: cannot write: {source}")]
    Write {
        field: &'static str,
        path: String,
        source: std::io::Error,
    },
}

/// Why `PUT /metrics` or `FlushMetrics` failed.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    #[error("metrics_path {path:?}: metrics already go to {current:?}; they are configured once")]
    AlreadyConfigured { path: String, current: String },
    #[error("metrics are not configured: PUT /metrics with a metrics_path first")]
    NotConfigured,
    #[error(transparent)]
    Output(#[from] OutputError),
}

/// Where metrics go, opened once by `PUT /metrics`.
pub struct MetricsSink {
    pub path: String,
    file: File,
    emit_id: bool,
    properties: Option<BTreeMap<String, String>>,
}

impl MetricsSink {
    /// Opens `path` (see [`open_output`]).
    pub fn open(
        path: &str,
        emit_id: bool,
        properties: Option<BTreeMap<String, String>>,
    ) -> Result<Self, OutputError> {
        if path.is_empty() {
            return Err(OutputError::EmptyPath {
                field: "metrics_path",
            });
        }
        let file = open_output("metrics_path", path)?;
        Ok(Self {
            path: path.into(),
            file,
            emit_id,
            properties,
        })
    }

    /// Writes one line.
    pub fn flush(&mut self, line: Map<String, Value>, id: &str) -> Result<(), OutputError> {
        let mut line = line;
        if self.emit_id {
            line.insert("id".into(), json!(id));
        }
        if let Some(p) = &self.properties {
            line.insert("properties".into(), json!(p));
        }
        let mut text = Value::Object(line).to_string();
        text.push('\n');
        self.file
            .write_all(text.as_bytes())
            .map_err(|source| OutputError::Write {
                field: "metrics_path",
                path: self.path.clone(),
                source,
            })
    }
}

/// Opens where Firecracker's API sends logs or metrics (`field` names it in
/// errors): a named pipe is opened for writing without waiting for a reader;
/// anything else is created if needed and appended to.
pub fn open_output(field: &'static str, path: &str) -> Result<File, OutputError> {
    let is_fifo = std::fs::metadata(path).is_ok_and(|m| m.file_type().is_fifo());
    let mut options = OpenOptions::new();
    if is_fifo {
        // Read and write: the open does not block waiting for a reader.
        options
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK);
    } else {
        options.append(true).create(true);
    }
    options.open(path).map_err(|source| OutputError::Open {
        field,
        path: path.into(),
        source,
    })
}

/// One metrics line: the VM's counters and the host's readings (the groups of
/// `vigil_metrics::json`), what the API process knows (requests by status class)
/// and the VM's state.
pub fn metrics_line(
    started: Instant,
    counts: &RequestCounts,
    vm: Option<&VmControl>,
) -> Map<String, Value> {
    let utc_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let state = match vm.map(VmControl::state) {
        None => "Not started",
        Some(RunState::Running) => "Running",
        Some(RunState::Paused) => "Paused",
    };
    let mut line = vm
        .and_then(|vm| {
            let text = json_line(&vm.metrics().snapshot(), Some(&HostSnapshot::read()));
            serde_json::from_str::<Map<String, Value>>(&text).ok()
        })
        .unwrap_or_default();
    line.insert("utc_timestamp_ms".into(), json!(utc_ms));
    line.insert(
        "api_server".into(),
        json!({
            "requests_2xx": counts.ok,
            "requests_4xx": counts.client_errors,
            "requests_5xx": counts.server_errors,
        }),
    );
    line.insert(
        "vmm".into(),
        json!({
            "uptime_ms": started.elapsed().as_millis() as u64,
            "state": state,
        }),
    );
    line
}
