//! How a VM process ended: the state it leaves the VM in and the reason in words
//! (exit status, signal), and a crash's cause from the VMM's report.

use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::SystemTime;

use super::vm::{unix_s, ExitInfo, VmState};

/// Describes how a VMM process ended: the state it leaves the VM in, and why.
/// `migrating_to`: a migration was under way to there (a VMM that exits 0 then
/// handed its VM over). `jailed`: the process is the jailer, which exits
/// 128+N when signal N killed the VMM (SIGSYS from its seccomp filter: 159),
/// so 129 to 191 name signals there, not a guest's debug-exit status (which a
/// jailed VM can then report from 0 to 96 only).
pub fn classify(
    status: ExitStatus,
    stop_requested: bool,
    migrating_to: Option<&str>,
    jailed: bool,
) -> (VmState, ExitInfo) {
    let code = status.code();
    let signal = match code {
        Some(c @ 129..=191) if jailed && c != 130 && c != 143 => Some(c - 128),
        _ => status.signal(),
    };
    let (state, reason) = match (code, signal) {
        (Some(c), Some(s)) if !stop_requested => (
            VmState::Crashed,
            format!(
                "the VMM was killed by signal {s} ({}; the jailer exited {c})",
                signal_name(s)
            ),
        ),
        (Some(0), _) if migrating_to.is_some() => (
            VmState::Migrated,
            format!(
                "migrated to {} (exit status 0)",
                migrating_to.unwrap_or_default()
            ),
        ),
        (Some(c), _) if stop_requested => (VmState::Stopped, format!("stopped by the daemon (exit status {c})")),
        (None, Some(s)) if stop_requested => (
            VmState::Stopped,
            format!("stopped by the daemon (killed by signal {s})"),
        ),
        (Some(0), _) => (
            VmState::Exited,
            "the guest powered off or reset (exit status 0)".into(),
        ),
        (Some(3), _) => (
            VmState::Crashed,
            "the guest crashed: triple fault, KVM internal or emulation error (exit status 3; the report is in stderr_tail)".into(),
        ),
        (Some(c @ (1 | 2)), _) => (
            VmState::Failed,
            format!("the VMM failed (exit status {c}; the message is in stderr_tail)"),
        ),
        (Some(c @ (130 | 143)), _) => (
            VmState::Stopped,
            format!(
                "stopped by {} from outside the daemon (exit status {c})",
                if c == 130 { "SIGINT" } else { "SIGTERM" }
            ),
        ),
        (Some(c @ 32..=255), _) => (
            VmState::Exited,
            format!(
                "the guest wrote status {} to the debug-exit port (exit status {c})",
                c - 32
            ),
        ),
        (Some(c), _) => (VmState::Failed, format!("the VMM exited with status {c}")),
        (None, Some(s)) => (
            VmState::Crashed,
            format!("the VMM was killed by signal {s} ({})", signal_name(s)),
        ),
        (None, None) => (VmState::Crashed, "the VMM ended for an unknown reason".into()),
    };
    let info = ExitInfo {
        code,
        signal,
        reason,
        at_unix_s: unix_s(SystemTime::now()),
    };
    (state, info)
}

fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGILL => "SIGILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGSYS => "SIGSYS: a system call its seccomp filter forbids",
        _ => "see kill -l",
    }
}

/// A crash in a few words: what the VMM's report names (triple fault, KVM
/// internal error, emulation failure), or the signal that killed it.
pub(super) fn crash_reason(exit: Option<&ExitInfo>, stderr_tail: Option<&str>) -> String {
    if let Some(signal) = exit.and_then(|e| e.signal) {
        return format!(
            "the VMM was killed by signal {signal} ({})",
            signal_name(signal)
        );
    }
    let log = stderr_tail.unwrap_or_default().to_ascii_lowercase();
    for (needle, reason) in [
        ("triple fault", "triple fault"),
        ("internal error", "KVM internal error"),
        ("emulation", "emulation failure"),
    ] {
        if log.contains(needle) {
            return reason.to_owned();
        }
    }
    exit.map_or_else(|| "unknown".to_owned(), |e| e.reason.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status_of(code: i32) -> ExitStatus {
        ExitStatus::from_raw(code << 8)
    }

    #[test]
    fn exits_are_classified() {
        let classify = |status, stop, to| classify(status, stop, to, false);
        assert_eq!(classify(status_of(0), false, None).0, VmState::Exited);
        let (state, exit) = classify(status_of(0), false, Some("tcp:10.0.0.2:4000"));
        assert_eq!(state, VmState::Migrated);
        assert!(exit.reason.contains("tcp:10.0.0.2:4000"), "{}", exit.reason);
        assert_eq!(classify(status_of(1), false, Some("x")).0, VmState::Failed);
        assert_eq!(classify(status_of(3), false, None).0, VmState::Crashed);
        assert_eq!(classify(status_of(1), false, None).0, VmState::Failed);
        assert_eq!(classify(status_of(143), false, None).0, VmState::Stopped);
        assert_eq!(classify(status_of(3), true, None).0, VmState::Stopped);
        let (state, exit) = classify(status_of(35), false, None);
        assert_eq!(state, VmState::Exited);
        assert!(exit.reason.contains("status 3 "), "{}", exit.reason);
        let (state, exit) = classify(ExitStatus::from_raw(libc::SIGSEGV), false, None);
        assert_eq!(state, VmState::Crashed);
        assert_eq!(exit.signal, Some(libc::SIGSEGV));
        assert!(exit.reason.contains("SIGSEGV"));
        assert_eq!(
            classify(ExitStatus::from_raw(libc::SIGKILL), true, None).0,
            VmState::Stopped
        );
        // Through the jailer, the VMM's signals are exit statuses 128+N.
        let (state, exit) = classify(status_of(159), false, None);
        assert_eq!(
            state,
            VmState::Exited,
            "without the jailer: guest status 127"
        );
        assert!(exit.reason.contains("status 127 "), "{}", exit.reason);
    }

    #[test]
    fn a_jailed_vmm_killed_by_a_signal_crashed() {
        let (state, exit) = classify(status_of(128 + libc::SIGSYS), false, None, true);
        assert_eq!(state, VmState::Crashed, "{}", exit.reason);
        assert_eq!((exit.code, exit.signal), (Some(159), Some(libc::SIGSYS)));
        assert!(exit.reason.contains("SIGSYS"), "{}", exit.reason);
        assert_eq!(
            crash_reason(Some(&exit), None),
            "the VMM was killed by signal 31 (SIGSYS: a system call its seccomp filter forbids)"
        );
        assert_eq!(
            classify(status_of(137), false, None, true).0,
            VmState::Crashed
        );
        // The rest is read as without the jailer.
        for (code, stop, want) in [
            (0, false, VmState::Exited),
            (3, false, VmState::Crashed),
            (1, false, VmState::Failed),
            (143, false, VmState::Stopped),
            (130, false, VmState::Stopped),
            (137, true, VmState::Stopped),
            (35, false, VmState::Exited),
            (128, false, VmState::Exited),
            (192, false, VmState::Exited),
        ] {
            assert_eq!(
                classify(status_of(code), stop, None, true).0,
                want,
                "{code}"
            );
        }
        // The jailer itself killed (SIGKILL after the stop timeout).
        assert_eq!(
            classify(ExitStatus::from_raw(libc::SIGKILL), true, None, true).0,
            VmState::Stopped
        );
    }
}
