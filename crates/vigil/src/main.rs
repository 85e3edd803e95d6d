//! `vigil`: run a VM on KVM, export the test guest, measure boot.

mod bench;
mod cli;
mod ctl;
mod devices_cli;
mod terminal;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    let default_level = match cli.command {
        cli::Command::Daemon(_) => "info",
        _ => "warn",
    };
    let level = std::env::var("VIGIL_LOG")
        .ok()
        .or(cli.log_level.clone())
        .unwrap_or_else(|| default_level.into());
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
        // No colour codes in the journal or in log files.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command.run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vigil: error: {e:#}");
            ExitCode::from(cli::EXIT_VMM_ERROR)
        }
    }
}
