//! `vigil`: run a VM on KVM, export the test guest, measure boot; or, run through a
//! link named `firecracker` (or as `vigil firecracker`), stand in for Firecracker.

mod bench;
mod bench_api;
mod bench_introspect;
mod cli;
mod ctl;
mod devices_cli;
mod firecracker;
mod launch;
mod logging;
mod terminal;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    let invoked_as = argv
        .first()
        .map(std::path::Path::new)
        .and_then(|p| p.file_name())
        .and_then(|n| n.to_str())
        .unwrap_or("vigil")
        .to_string();
    if invoked_as == "firecracker" {
        let logging = logging::Logging::init(tracing_subscriber::filter::LevelFilter::WARN);
        return report(firecracker::main(argv, &logging));
    }
    let cli = cli::Cli::parse();
    let default_level = match cli.command {
        cli::Command::Daemon(_) => "info",
        _ => "warn",
    };
    let level = std::env::var("VIGIL_LOG")
        .ok()
        .or(cli.log_level.clone())
        .unwrap_or_else(|| default_level.into());
    let level = match logging::parse_level(&level) {
        Ok(level) => level,
        Err(e) => {
            eprintln!("vigil: error: {e}");
            return ExitCode::from(2);
        }
    };
    let logging = logging::Logging::init(level);
    report(cli.command.run(&logging))
}

fn report(result: anyhow::Result<ExitCode>) -> ExitCode {
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vigil: error: {e:#}");
            ExitCode::from(cli::EXIT_VMM_ERROR)
        }
    }
}
