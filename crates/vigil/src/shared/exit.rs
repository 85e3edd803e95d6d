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
            eprintln!("{program}: error: {}", message(&e));
            ExitCode::from(EXIT_ERROR)
        }
    }
}

/// The error and its causes, `: ` between them; a cause the text already holds is
/// left out (the libraries' typed errors name their source in their own message).
fn message(e: &anyhow::Error) -> String {
    let mut text = e.to_string();
    for cause in e.chain().skip(1).map(ToString::to_string) {
        if !text.contains(&cause) {
            text.push_str(": ");
            text.push_str(&cause);
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("--socket s: cannot listen: {source}")]
    struct Listen {
        source: std::io::Error,
    }

    #[test]
    fn causes_are_shown_once() {
        let io = || std::io::Error::other("address in use");
        let typed = anyhow::Error::from(Listen { source: io() });
        assert_eq!(message(&typed), "--socket s: cannot listen: address in use");
        let context = anyhow::Error::from(io()).context("cannot start the runtime");
        assert_eq!(
            message(&context),
            "cannot start the runtime: address in use"
        );
    }
}
