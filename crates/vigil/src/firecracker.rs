//! Vigil standing in for Firecracker: Firecracker's command-line flags with their
//! meaning, for tools that spawn `firecracker` themselves. Flags Vigil cannot
//! honour are refused when ignoring them would change what the VM is or how safe it
//! is (--seccomp-filter), and accepted with a
//! warning when they only tune something (--boot-timer, --mmds-size-limit, ...).

use std::ffi::OsString;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::anyhow;
use clap::Parser;
use vigil_model::firecracker::{Logger, Metrics};

use crate::launch::{Launch, MmdsStart, Overrides};
use vigil_shared::logging::Logging;

const ABOUT: &str = "\
Vigil, run as Firecracker: serves Firecracker's API on --api-sock, or boots the VM of
--config-file (with --no-api, without any API). The guest console is this process's
standard input and output. Exit status as `vigil run --help` describes.";

/// Firecracker's flags.
#[derive(Parser, Debug)]
#[command(name = "firecracker", about = ABOUT, disable_version_flag = true)]
struct FirecrackerArgs {
    /// Path to the Unix socket the API is served on.
    #[arg(long, default_value = "/run/firecracker.socket", value_name = "PATH")]
    api_sock: PathBuf,
    /// MicroVM unique identifier (GET /, metrics).
    #[arg(long, default_value = "anonymous-instance", value_name = "ID")]
    id: String,
    /// Boot the VM from this Firecracker configuration file at once.
    #[arg(long, value_name = "PATH")]
    config_file: Option<PathBuf>,
    /// Serve no API (needs --config-file).
    #[arg(long)]
    no_api: bool,
    /// Where the log goes (a file or named pipe) instead of standard error.
    #[arg(long, value_name = "PATH")]
    log_path: Option<String>,
    /// Log level: Error, Warning, Info, Debug, Trace or Off (any case).
    #[arg(long, value_name = "LEVEL")]
    level: Option<String>,
    /// Only log messages of this module (not supported: ignored with a warning).
    #[arg(long, value_name = "MODULE")]
    module: Option<String>,
    /// Show the level of each log line.
    #[arg(long)]
    show_level: bool,
    /// Show the file and line each log line comes from.
    #[arg(long)]
    show_log_origin: bool,
    /// Where FlushMetrics writes its JSON lines (a file or named pipe).
    #[arg(long, value_name = "PATH")]
    metrics_path: Option<String>,
    /// Log the guest's boot time (not supported: ignored with a warning).
    #[arg(long)]
    boot_timer: bool,
    /// Do not install seccomp filters (for debugging only: a warning says so).
    #[arg(long)]
    no_seccomp: bool,
    /// A custom seccomp filter (not supported: refused, as running without the
    /// filter asked for would be less safe than asked).
    #[arg(long, value_name = "PATH")]
    seccomp_filter: Option<PathBuf>,
    /// Largest API request body (Vigil's is fixed at 64 KiB: ignored with a warning).
    #[arg(long, value_name = "BYTES")]
    http_api_max_payload_size: Option<u64>,
    /// Largest MMDS data store, in bytes of JSON: a PUT or PATCH /mmds that
    /// would make it larger is refused (400, naming the limit). Default: the
    /// API's body limit, 65536.
    #[arg(long, value_name = "BYTES", value_parser = clap::value_parser!(u64).range(1..))]
    mmds_size_limit: Option<u64>,
    /// A JSON file the MMDS data store starts with (a JSON object, within
    /// --mmds-size-limit), as if given by `PUT /mmds` before anything else.
    #[arg(long, value_name = "PATH")]
    metadata: Option<PathBuf>,
    /// Print the format version of a snapshot's state file (after checking it).
    #[arg(long, value_name = "PATH")]
    describe_snapshot: Option<PathBuf>,
    /// Put the virtio devices on a PCI bus (virtio-pci, MSI-X) instead of
    /// virtio-mmio, as with `vigil run --enable-pci`.
    #[arg(long)]
    enable_pci: bool,
    /// Set by the jailer: process start time (accepted, unused).
    #[arg(long, value_name = "US")]
    start_time_us: Option<u64>,
    /// Set by the jailer: process start CPU time (accepted, unused).
    #[arg(long, value_name = "US")]
    start_time_cpu_us: Option<u64>,
    /// Set by the jailer: the parent's CPU time (accepted, unused).
    #[arg(long, value_name = "US")]
    parent_cpu_time_us: Option<u64>,
    /// Print the Firecracker version whose API Vigil speaks, and Vigil's.
    #[arg(long)]
    version: bool,
}

/// Runs Vigil with Firecracker's command line `argv` (argv[0] included).
pub fn main(argv: Vec<OsString>, logging: &Logging) -> anyhow::Result<ExitCode> {
    let args = match FirecrackerArgs::try_parse_from(argv) {
        Ok(a) => a,
        Err(e) => {
            let code = e.exit_code();
            let _ = e.print();
            return Ok(ExitCode::from(code as u8));
        }
    };
    if args.version {
        println!(
            "Firecracker v{} (Vigil {}, speaking Firecracker's API)",
            vigil_api::FIRECRACKER_API_VERSION,
            env!("CARGO_PKG_VERSION")
        );
        return Ok(ExitCode::SUCCESS);
    }
    if let Some(path) = &args.seccomp_filter {
        anyhow::bail!(
            "--seccomp-filter {}: Vigil confines its threads with its own filters (on by default), and a filter made for Firecracker's threads does not fit them; drop the flag to run with Vigil's",
            path.display()
        );
    }
    if let Some(path) = &args.describe_snapshot {
        // Checked as a load checks it; Firecracker prints its format version as
        // semver, and Vigil's is one number.
        let (header, _) = vigil_vmm::snapshot::file::read_state(path)?;
        println!("v{}.0.0", header.version);
        return Ok(ExitCode::SUCCESS);
    }
    if args.no_api && args.config_file.is_none() {
        anyhow::bail!("--no-api needs --config-file: without an API the VM must come from a file");
    }
    let warn = |flag: &str, why: &str| eprintln!("vigil: warning: {flag}: {why}; ignored");
    if args.boot_timer {
        warn("--boot-timer", "Vigil has no boot timer device");
    }
    if let Some(n) = args.http_api_max_payload_size {
        warn(
            &format!("--http-api-max-payload-size {n}"),
            "Vigil's limit is 64 KiB",
        );
    }
    let _ = (
        args.start_time_us,
        args.start_time_cpu_us,
        args.parent_cpu_time_us,
    );
    let wants_logger = args.log_path.is_some()
        || args.level.is_some()
        || args.module.is_some()
        || args.show_level
        || args.show_log_origin;
    if wants_logger {
        logging
            .configure(&Logger {
                log_path: args.log_path.clone(),
                level: args.level.clone(),
                show_level: args.show_level,
                show_log_origin: args.show_log_origin,
                module: args.module.clone(),
            })
            .map_err(|e| anyhow!("--log-path/--level: {e}"))?;
    }
    let mut launch = Launch {
        incoming: None,
        api_sock: (!args.no_api).then_some(args.api_sock),
        id: args.id,
        boot_now: None,
        pre: Default::default(),
        logger: None,
        metrics: args.metrics_path.map(|metrics_path| Metrics {
            metrics_path,
            ..Default::default()
        }),
        overrides: Overrides {
            pci: args.enable_pci,
            ..Overrides::default()
        },
        seccomp: !args.no_seccomp,
        mmds: MmdsStart {
            size_limit: args
                .mmds_size_limit
                .map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
            metadata: args.metadata,
        },
    };
    if let Some(file) = &args.config_file {
        let (pre, config, logger, metrics) = crate::launch::from_config_file(file)?;
        launch.pre = pre;
        launch.boot_now = Some(config);
        launch.logger = logger;
        if metrics.is_some() {
            launch.metrics = metrics;
        }
    }
    crate::launch::launch(launch, logging)
}
