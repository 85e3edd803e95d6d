//! Seccomp confinement of the VMM process (`vigil run`), one filter per thread kind.
//!
//! The VMM turns it on once, early in `main` ([`enable`]); from then on every thread
//! confines itself as its first act ([`confine`]) with the list of system calls its
//! kind needs (`filters.rs`, reviewed by hand). A call outside the list raises
//! SIGSYS; the handler (`sigsys.rs`) writes one line naming the thread and the call
//! to stderr and the process dies by SIGSYS, so a denial is never a silent hang.
//!
//! A thread created by a confined thread inherits its filter on top of its own
//! (the kernel runs both), so a kind that starts others at run time holds their
//! calls too: see [`ThreadKind::starts`]. Before [`enable`], and in processes that
//! never call it (tests, benchmarks, the daemon), [`confine`] does nothing.

mod filters;
mod sigsys;

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::OnceLock;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

/// The kinds of thread in the VMM process, each with its own filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ThreadKind {
    /// The first thread: builds the VM, then waits for it to end.
    Main,
    /// The REST API (`--api-sock`); it starts migrations and introspection.
    Api,
    /// Turns SIGINT/SIGTERM into a stop of the VM.
    Signals,
    /// Writes the metrics file every interval.
    Metrics,
    /// One per vCPU: `KVM_RUN` and the exits it serves.
    Vcpu,
    /// The device event loop: virtio queues, the console, the balloon.
    Devices,
    /// The real-time timer's expiries (`--rt-timer`).
    RtTimer,
    /// The introspection monitor and the syscall tracer's start.
    Introspect,
    /// Live migration, on either side, with its readers and throttle.
    Migration,
    /// The memory-compression pager: its fault server and its scanner.
    Pager,
}

impl ThreadKind {
    /// Every kind, for checks over all filters.
    pub const ALL: [ThreadKind; 10] = [
        Self::Main,
        Self::Api,
        Self::Signals,
        Self::Metrics,
        Self::Vcpu,
        Self::Devices,
        Self::RtTimer,
        Self::Introspect,
        Self::Migration,
        Self::Pager,
    ];

    /// The kind's name, as `VIGIL_SECCOMP_PROBE` and the SIGSYS report spell it.
    pub fn name(self) -> &'static str {
        match self {
            Self::Main => "main",
            Self::Api => "api",
            Self::Signals => "signals",
            Self::Metrics => "metrics",
            Self::Vcpu => "vcpu",
            Self::Devices => "devices",
            Self::RtTimer => "rt-timer",
            Self::Introspect => "introspect",
            Self::Migration => "migration",
            Self::Pager => "pager",
        }
    }

    /// The kind named `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.name() == name)
    }

    /// The kinds whose threads this kind starts after it is confined: those
    /// threads run under this kind's filter as well as their own.
    pub fn starts(self) -> &'static [ThreadKind] {
        match self {
            // Migration and introspection are started by API requests; the main
            // thread confines itself after starting everything else.
            Self::Api => &[Self::Migration, Self::Introspect],
            _ => &[],
        }
    }
}

/// Why confinement could not be set up or applied.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("the {kind} thread's seccomp filter does not compile: {source}")]
    Compile {
        kind: &'static str,
        source: seccompiler::BackendError,
    },
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(std::io::Error),
    #[error("cannot confine the {kind} thread: {source}")]
    Apply {
        kind: &'static str,
        source: seccompiler::Error,
    },
    #[error("VIGIL_SECCOMP_PROBE={0:?} names no thread kind (one of: {names})", names = kind_names())]
    Probe(String),
}

fn kind_names() -> String {
    ThreadKind::ALL.map(ThreadKind::name).join(", ")
}

/// What [`enable`] prepared: each kind's compiled filters, and the kind that
/// must prove its filter works (`VIGIL_SECCOMP_PROBE`).
struct Confinement {
    programs: HashMap<ThreadKind, Vec<BpfProgram>>,
    probe: Option<ThreadKind>,
}

static CONFINEMENT: OnceLock<Confinement> = OnceLock::new();

thread_local! {
    /// This thread's kind once confined, for the SIGSYS report.
    static KIND: Cell<Option<ThreadKind>> = const { Cell::new(None) };
}

/// Turns confinement on for this process: compiles every kind's filters, installs
/// the SIGSYS handler, and reads `VIGIL_SECCOMP_PROBE` (a kind: that kind's
/// threads make a forbidden call right after confining themselves, to show on
/// this host that a denial is caught and named). Call once, before the threads.
pub fn enable() -> Result<(), SeccompError> {
    let probe = match std::env::var("VIGIL_SECCOMP_PROBE") {
        Ok(name) if !name.is_empty() => {
            Some(ThreadKind::from_name(&name).ok_or(SeccompError::Probe(name))?)
        }
        _ => None,
    };
    let mut programs = HashMap::new();
    for kind in ThreadKind::ALL {
        programs.insert(kind, compile(kind)?);
    }
    sigsys::install().map_err(SeccompError::Handler)?;
    let _ = CONFINEMENT.set(Confinement { programs, probe });
    Ok(())
}

/// Confines the calling thread to `kind`'s system calls, when confinement is on.
/// A thread the kernel refuses to confine does not run unconfined: the process
/// stops, exit status 1, saying why.
pub fn confine(kind: ThreadKind) {
    let Some(confinement) = CONFINEMENT.get() else {
        return;
    };
    for program in &confinement.programs[&kind] {
        if let Err(source) = seccompiler::apply_filter(program) {
            let error = SeccompError::Apply {
                kind: kind.name(),
                source,
            };
            eprintln!("vigil: {error}; the VMM stops rather than run it unconfined");
            // SAFETY: ends the process at once; nothing of this thread is used after.
            unsafe { libc::_exit(1) };
        }
    }
    KIND.with(|k| k.set(Some(kind)));
    if confinement.probe == Some(kind) {
        sigsys::probe();
    }
}

/// The calling thread's kind, once confined.
fn current_kind() -> Option<ThreadKind> {
    KIND.with(Cell::get)
}

/// `kind`'s filters: `clone3` answered ENOSYS (its flags are out of a filter's
/// reach, so glibc falls back to `clone`, whose flags the list checks), then the
/// list itself, whose every other call traps.
fn compile(kind: ThreadKind) -> Result<Vec<BpfProgram>, SeccompError> {
    let error = |source| SeccompError::Compile {
        kind: kind.name(),
        source,
    };
    let arch = TargetArch::x86_64;
    let no_clone3 = SeccompFilter::new(
        [(libc::SYS_clone3, vec![])].into_iter().collect(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )
    .map_err(error)?;
    let list = SeccompFilter::new(
        filters::rules(kind).map_err(error)?,
        SeccompAction::Trap,
        SeccompAction::Allow,
        arch,
    )
    .map_err(error)?;
    [no_clone3, list]
        .into_iter()
        .map(|f| BpfProgram::try_from(f).map_err(error))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_compiles_and_names_itself() {
        for kind in ThreadKind::ALL {
            assert_eq!(compile(kind).unwrap().len(), 2, "{kind:?}");
            assert_eq!(ThreadKind::from_name(kind.name()), Some(kind));
        }
        assert_eq!(ThreadKind::from_name("vcpu0"), None);
    }

    /// In a child process under `kind`'s filters: the KVM request `request` (on
    /// a bad fd) passes, `clone3` is answered ENOSYS where the kind starts
    /// threads (glibc then uses `clone`; elsewhere the list's trap wins over the
    /// first filter's errno), anything else is SIGSYS (no handler here: the
    /// kernel's default action ends the child).
    fn passes_its_calls_and_stops_the_rest(kind: ThreadKind, request: libc::c_ulong) {
        let starts_threads = !kind.starts().is_empty();
        let programs = compile(kind).unwrap();
        // The child writes a byte down this pipe after each call that passed, so
        // that a SIGSYS at the first call cannot pass for the one at the last.
        let mut fds = [0; 2];
        // SAFETY: fds is writable for two ints.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: the child only makes system calls on prepared data, then _exit()s.
        let child = unsafe { libc::fork() };
        assert!(child >= 0, "fork: {}", std::io::Error::last_os_error());
        if child == 0 {
            // SAFETY: one byte from a static buffer to our own pipe.
            let passed = |b: &'static [u8; 1]| unsafe { libc::write(fds[1], b.as_ptr().cast(), 1) };
            let status = (|| {
                if programs
                    .iter()
                    .any(|p| seccompiler::apply_filter(p).is_err())
                {
                    return 10;
                }
                let errno = || std::io::Error::last_os_error().raw_os_error();
                // A KVM request on a bad fd: allowed, so the kernel says EBADF.
                // SAFETY: the fd is invalid; nothing is read or written.
                if unsafe { libc::ioctl(-1, request, 0) } != -1 || errno() != Some(libc::EBADF) {
                    return 11;
                }
                passed(b"i");
                if starts_threads {
                    // SAFETY: clone3 with no arguments; the filter answers first.
                    let r = unsafe { libc::syscall(libc::SYS_clone3, 0, 0) };
                    if r != -1 || errno() != Some(libc::ENOSYS) {
                        return 12;
                    }
                }
                passed(b"c");
                sigsys::probe();
                13
            })();
            // SAFETY: ends the child without running the parent's destructors.
            unsafe { libc::_exit(status) };
        }
        // SAFETY: our copy of the write end; the child holds its own.
        unsafe { libc::close(fds[1]) };
        let mut status = 0;
        // SAFETY: waits for our own child.
        assert_eq!(unsafe { libc::waitpid(child, &mut status, 0) }, child);
        let mut got = [0u8; 8];
        // SAFETY: reads at most 8 bytes into `got`; the write end is closed.
        let n = unsafe { libc::read(fds[0], got.as_mut_ptr().cast(), got.len()) };
        // SAFETY: our read end, not used after.
        unsafe { libc::close(fds[0]) };
        assert_eq!(
            &got[..n.max(0) as usize],
            b"ic",
            "{kind:?}: calls that passed"
        );
        assert!(
            libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS,
            "{kind:?}: the child ended with status {status:#x} (exit {} is the check that failed)",
            libc::WEXITSTATUS(status)
        );
    }

    #[test]
    fn the_vcpu_filter_passes_its_calls_and_stops_the_rest() {
        // KVM_RUN.
        passes_its_calls_and_stops_the_rest(ThreadKind::Vcpu, 0xae80);
    }

    /// The 60 s metrics line reads KVM's dirty log for the dirty rate; the
    /// integration tests end before a periodic line is written.
    /// The API thread starts migration and introspection threads.
    #[test]
    fn the_api_filter_answers_clone3_with_enosys() {
        // KVM_GET_DIRTY_LOG (snapshots).
        passes_its_calls_and_stops_the_rest(ThreadKind::Api, 0x4010_ae42);
    }

    #[test]
    fn the_metrics_filter_passes_the_dirty_log() {
        // KVM_GET_DIRTY_LOG: _IOW(KVMIO, 0x42, struct kvm_dirty_log).
        passes_its_calls_and_stops_the_rest(ThreadKind::Metrics, 0x4010_ae42);
    }
}
