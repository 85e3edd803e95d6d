//! Exit statuses and how a command's error reaches the user.

use std::process::ExitCode;

/// The command failed: bad input, a KVM error, a daemon that refused; the message
/// names the value at fault.
pub const EXIT_ERROR: u8 = 1;
/// The command line could not be parsed (clap uses the same status).
pub const EXIT_USAGE: u8 = 2;
/// The guest crashed (triple fault, KVM internal error).
pub const EXIT_GUEST_CRASH: u8 = 3;
/// Base of the exit status for a non-zero guest debug-exit status N: 32 + N.
pub const EXIT_GUEST_STATUS_BASE: u8 = 32;

/// The status of a finished command; an error goes to stderr as
/// `PROGRAM: error: ...` (with its causes) and gives [`EXIT_ERROR`].
pub fn report(program: &str, result: anyhow::Result<ExitCode>) -> ExitCode {
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("{program}: error: {e:#}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}
