//! `vigil run --metrics-path`: Firecracker-style JSON lines appended to a file,
//! one every minute and one when the VM ends.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context;
use vigil_metrics::json::json_line;
use vigil_metrics::{HostSnapshot, MetricsHandle};

/// How often a line is written while the VM runs.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(60);

/// The file metrics go to.
pub struct MetricsFile {
    path: PathBuf,
    file: File,
}

/// Writes the metrics of one VM to a file.
struct Writer {
    out: MetricsFile,
    metrics: MetricsHandle,
}

impl MetricsFile {
    /// Opens `path` for appending (creating it), before the VM starts, so that a bad
    /// path fails early.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let file = File::options()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("--metrics-path {}: cannot open it", path.display()))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Writes `metrics` every `interval` on a thread of its own until the returned
    /// [`Periodic`] is finished, which writes the last line.
    pub fn spawn(self, metrics: MetricsHandle, interval: Duration) -> anyhow::Result<Periodic> {
        let (tx, rx) = mpsc::channel::<()>();
        let mut writer = Writer { out: self, metrics };
        let thread = std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                while let Err(RecvTimeoutError::Timeout) = rx.recv_timeout(interval) {
                    writer.flush();
                }
                writer
            })
            .context("cannot start the metrics thread")?;
        Ok(Periodic { stop: tx, thread })
    }
}

impl Writer {
    /// Appends one line now. A failed write is logged, not fatal: metrics must not
    /// stop a VM.
    fn flush(&mut self) {
        let line = json_line(&self.metrics.snapshot(), Some(&HostSnapshot::read()));
        if let Err(e) = self.out.file.write_all(line.as_bytes()) {
            tracing::warn!(path = %self.out.path.display(), "cannot write metrics: {e}");
        }
    }
}

/// The periodic writer's thread.
pub struct Periodic {
    stop: Sender<()>,
    thread: JoinHandle<Writer>,
}

impl Periodic {
    /// Stops the thread and writes the final line (the VM has ended).
    pub fn finish(self) {
        drop(self.stop);
        match self.thread.join() {
            Ok(mut writer) => writer.flush(),
            Err(_) => tracing::warn!("the metrics thread panicked; no final metrics line"),
        }
    }
}
