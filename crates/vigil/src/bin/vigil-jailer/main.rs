//! `vigil-jailer` (also run as `vigil jailer`): Firecracker's jailer for Vigil
//! (crates/jailer), with the log and the error report of Vigil's other binaries.
//! It links nothing of the VMM.

use std::process::ExitCode;

use clap::Parser;
use vigil_shared::{exit, logging};

fn main() -> ExitCode {
    let args = vigil_jailer::Args::parse();
    if let Err(code) = logging::start("vigil-jailer", args.log_level.as_deref(), "warn") {
        return code;
    }
    exit::report("vigil-jailer", vigil_jailer::run(args))
}
