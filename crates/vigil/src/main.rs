//! `vigil`: run a VM on KVM, export the test guest, measure boot.

mod bench;
mod cli;
mod devices_cli;
mod metrics_file;
mod terminal;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let level = std::env::var("VIGIL_LOG").unwrap_or(cli.log_level.clone());
    let level: tracing::Level = match level.parse() {
        Ok(level) => level,
        Err(_) => {
            eprintln!(
                "vigil: error: log level {level:?} is not one of error, warn, info, debug, trace"
            );
            return ExitCode::from(2);
        }
    };
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .init();
    match cli.command.run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vigil: error: {e:#}");
            ExitCode::from(cli::EXIT_VMM_ERROR)
        }
    }
}
