//! The log of every Vigil binary: a `tracing` subscriber on stderr whose level and
//! destination can change while it runs (the VMM's `PUT /logger`, Firecracker's
//! `--level` and `--log-path`).

use std::sync::{Arc, Mutex};

use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::layer::{Layered, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, reload, Layer, Registry};

type Base = Layered<reload::Layer<LevelFilter, Registry>, Registry>;
type Output = Box<dyn Layer<Base> + Send + Sync>;

/// Changes the log's level and destination.
#[derive(Clone)]
pub struct Logging {
    level: reload::Handle<LevelFilter, Registry>,
    output: reload::Handle<Output, Base>,
}

/// Parses a level in Vigil's spelling (error, warn, ...) or Firecracker's (Error,
/// Warning, Info, Debug, Trace, Off), any case.
pub fn parse_level(s: &str) -> Result<LevelFilter, String> {
    match s.to_ascii_lowercase().as_str() {
        "off" => Ok(LevelFilter::OFF),
        "error" => Ok(LevelFilter::ERROR),
        "warn" | "warning" => Ok(LevelFilter::WARN),
        "info" => Ok(LevelFilter::INFO),
        "debug" => Ok(LevelFilter::DEBUG),
        "trace" => Ok(LevelFilter::TRACE),
        _ => Err(format!(
            "log level {s:?} is not one of error, warn(ing), info, debug, trace, off"
        )),
    }
}

/// Installs the log of `program` at its level: `VIGIL_LOG`, else `--log-level`
/// (`cli_level`), else `default`. A bad level is a usage error, reported here.
pub fn start(
    program: &str,
    cli_level: Option<&str>,
    default: &str,
) -> Result<Logging, std::process::ExitCode> {
    let level = std::env::var("VIGIL_LOG")
        .ok()
        .or(cli_level.map(str::to_owned))
        .unwrap_or_else(|| default.into());
    match parse_level(&level) {
        Ok(level) => Ok(Logging::init(level)),
        Err(e) => {
            eprintln!("{program}: error: {e}");
            Err(std::process::ExitCode::from(crate::exit::EXIT_USAGE))
        }
    }
}

fn output(path: Option<&str>, show_level: bool, show_origin: bool) -> Result<Output, String> {
    let layer = fmt::layer()
        .with_level(show_level)
        .with_file(show_origin)
        .with_line_number(show_origin)
        .with_ansi(false);
    Ok(match path {
        None => Box::new(layer.with_writer(std::io::stderr)),
        Some(path) => {
            let file =
                vigil_api::metrics::open_output("log_path", path).map_err(|e| e.to_string())?;
            Box::new(layer.with_writer(Mutex::new(file)))
        }
    })
}

impl Logging {
    /// Installs the subscriber: `level` to stderr, with levels shown.
    pub fn init(level: LevelFilter) -> Self {
        let (level_layer, level) = reload::Layer::new(level);
        // No colour codes when stderr is the journal or a file.
        let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
        let first: Output = Box::new(fmt::layer().with_writer(std::io::stderr).with_ansi(ansi));
        let (output_layer, output) = reload::Layer::new(first);
        let _ = tracing_subscriber::registry()
            .with(level_layer)
            .with(output_layer)
            .try_init();
        Self { level, output }
    }

    /// Applies a `PUT /logger` body (or the equivalent command-line flags).
    pub fn configure(&self, l: &vigil_model::firecracker::Logger) -> Result<(), String> {
        let level = l
            .level
            .as_deref()
            .map(parse_level)
            .transpose()
            .map_err(|e| format!("level: {e}"))?;
        if let Some(module) = &l.module {
            tracing::warn!(
                module,
                "logger: Vigil does not filter logs by module; \"module\" is ignored"
            );
        }
        let out = output(l.log_path.as_deref(), l.show_level, l.show_log_origin)?;
        self.output
            .reload(out)
            .map_err(|e| format!("cannot switch the log: {e}"))?;
        if let Some(level) = level {
            self.level
                .reload(level)
                .map_err(|e| format!("cannot change the log level: {e}"))?;
        }
        Ok(())
    }

    /// The hook the API calls on `PUT /logger`.
    pub fn hook(&self) -> vigil_api::LoggerHook {
        let me = self.clone();
        Arc::new(move |l| me.configure(l).map_err(vigil_api::LoggerHookError::from))
    }
}
