//! The event outputs (`--events-output FORMAT:PATH`): Falco-style JSON lines,
//! RFC 5424 syslog or CEF, to a file (mode 0600) or stderr; a failed write is
//! logged and the other outputs still get the event.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::str::FromStr;

use vigil_events::{CefFormat, JsonLinesWriter, SyslogFormat};

use super::Event;

/// The format of one `--events-output`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    /// Falco-style JSON, one object per line.
    Json,
    /// RFC 5424 syslog lines.
    Syslog,
    /// ArcSight CEF lines.
    Cef,
}

/// Where one `--events-output` writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputTarget {
    Stderr,
    /// Appended to (created with mode 0600).
    File(PathBuf),
}

/// One `--events-output FORMAT:PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputSpec {
    pub format: OutputFormat,
    pub target: OutputTarget,
}

/// An `--events-output` that is not `FORMAT:PATH`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--events-output {spec:?}: {problem} (expected FORMAT:PATH, FORMAT one of json, syslog, cef; PATH `-` for stderr)")]
pub struct OutputSpecError {
    pub spec: String,
    pub problem: OutputSpecProblem,
}

/// What is wrong with an `--events-output`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OutputSpecProblem {
    #[error("no `:`")]
    NoColon,
    #[error("unknown format {0:?}")]
    UnknownFormat(String),
    #[error("empty PATH")]
    EmptyPath,
}

/// An `--events-output` file that cannot be opened.
#[derive(Debug, thiserror::Error)]
#[error("--events-output {}: cannot open it: {source}", path.display())]
pub struct OutputOpenError {
    pub path: PathBuf,
    pub source: std::io::Error,
}

impl FromStr for OutputSpec {
    type Err = OutputSpecError;
    fn from_str(s: &str) -> Result<Self, OutputSpecError> {
        let bad = |problem| OutputSpecError {
            spec: s.into(),
            problem,
        };
        let (format, path) = s
            .split_once(':')
            .ok_or_else(|| bad(OutputSpecProblem::NoColon))?;
        let format = match format {
            "json" => OutputFormat::Json,
            "syslog" => OutputFormat::Syslog,
            "cef" => OutputFormat::Cef,
            other => return Err(bad(OutputSpecProblem::UnknownFormat(other.into()))),
        };
        let target = match path {
            "" => return Err(bad(OutputSpecProblem::EmptyPath)),
            "-" => OutputTarget::Stderr,
            p => OutputTarget::File(p.into()),
        };
        Ok(OutputSpec { format, target })
    }
}

/// The outputs the engine writes each event to.
pub(super) struct Outputs {
    writers: Vec<(OutputSpec, Box<dyn Write + Send>)>,
    hostname: String,
    syslog: SyslogFormat,
    cef: CefFormat,
    failures: u64,
}

impl Outputs {
    pub(super) fn open(specs: &[OutputSpec]) -> Result<Outputs, OutputOpenError> {
        let hostname = vigil_events::output::hostname();
        let mut writers: Vec<(OutputSpec, Box<dyn Write + Send>)> = Vec::new();
        for spec in specs {
            let out: Box<dyn Write + Send> = match &spec.target {
                OutputTarget::Stderr => Box::new(std::io::stderr()),
                OutputTarget::File(path) => Box::new(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .mode(0o600)
                        .open(path)
                        .map_err(|source| OutputOpenError {
                            path: path.clone(),
                            source,
                        })?,
                ),
            };
            writers.push((spec.clone(), out));
        }
        let mut syslog = SyslogFormat::new(hostname.clone());
        syslog.procid = Some(std::process::id());
        Ok(Outputs {
            writers,
            cef: CefFormat::new(hostname.clone()),
            syslog,
            hostname,
            failures: 0,
        })
    }

    pub(super) fn write(&mut self, event: &Event) {
        for (spec, out) in &mut self.writers {
            let line = match spec.format {
                OutputFormat::Json => {
                    // One write_all per line, as JsonLinesWriter does.
                    let mut w = JsonLinesWriter::new(&mut *out, self.hostname.as_str());
                    w.write_event(event).err()
                }
                OutputFormat::Syslog => write_line(out, &self.syslog.format(event)).err(),
                OutputFormat::Cef => write_line(out, &self.cef.format(event)).err(),
            };
            if let Some(e) = line {
                self.failures += 1;
                // Say so, but not for every event of a full disk.
                if self.failures.is_power_of_two() {
                    tracing::warn!(
                        "--events-output {:?}: cannot write an event ({} failures so far): {e}",
                        spec.target,
                        self.failures
                    );
                }
            }
        }
    }
}

fn write_line(out: &mut Box<dyn Write + Send>, line: &str) -> std::io::Result<()> {
    let mut text = String::with_capacity(line.len() + 1);
    text.push_str(line);
    text.push('\n');
    out.write_all(text.as_bytes())?;
    out.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_specs() {
        assert_eq!(
            "json:/var/log/vigil.jsonl".parse::<OutputSpec>(),
            Ok(OutputSpec {
                format: OutputFormat::Json,
                target: OutputTarget::File("/var/log/vigil.jsonl".into())
            })
        );
        assert_eq!(
            "cef:-".parse::<OutputSpec>().unwrap().target,
            OutputTarget::Stderr
        );
        assert_eq!(
            "syslog:a:b".parse::<OutputSpec>().unwrap().target,
            OutputTarget::File("a:b".into())
        );
        for bad in ["json", "xml:/tmp/x", "json:", ":x"] {
            let e = bad.parse::<OutputSpec>().unwrap_err().to_string();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
    }
}
