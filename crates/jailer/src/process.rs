//! The jailer's own process: its inherited file descriptors, its network
//! namespace, detaching, a new PID namespace, dropping privileges, the exec.

use std::fs::File;
use std::os::fd::{AsRawFd, IntoRawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, ExitCode};

use anyhow::Context;

use crate::plan::Plan;

/// Signals a `--new-pid-ns` jailer passes on to the VMM.
const FORWARDED: [libc::c_int; 6] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

/// An `io::Result` of a libc call that returns -1 and sets errno on failure.
pub fn sys(ret: libc::c_int) -> std::io::Result<libc::c_int> {
    if ret == -1 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Closes every file descriptor but standard input and outputs, so that none the
/// jailer's caller left open reaches the VMM. (Those the jailer opens itself are
/// close-on-exec, as Rust opens every file.)
pub fn close_inherited_fds() -> anyhow::Result<()> {
    // SAFETY: closes descriptors only; nothing in this process holds any above 2 yet.
    sys(unsafe { libc::close_range(3, libc::c_uint::MAX, 0) })
        .context("cannot close the inherited file descriptors (close_range needs Linux 5.9)")?;
    Ok(())
}

/// Joins the network namespace of `--netns`.
pub fn join_netns((path, file): &(PathBuf, File)) -> anyhow::Result<()> {
    // SAFETY: setns takes a descriptor this process holds open and a flag.
    sys(unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) }).with_context(|| {
        format!(
            "--netns {}: cannot join it (is it a network namespace?)",
            path.display()
        )
    })?;
    tracing::info!("joined the network namespace {}", path.display());
    Ok(())
}

pub fn open_dev_null() -> anyhow::Result<File> {
    File::options()
        .read(true)
        .write(true)
        .open("/dev/null")
        .context("--daemonize: cannot open /dev/null")
}

/// Which side of a fork this process is.
pub enum Forked {
    Parent(libc::pid_t),
    Child,
}

fn fork() -> anyhow::Result<Forked> {
    // SAFETY: the jailer has a single thread, so the child's copy of its memory is
    // consistent (no lock held by another thread).
    match sys(unsafe { libc::fork() }).context("cannot fork")? {
        0 => Ok(Forked::Child),
        pid => Ok(Forked::Parent(pid)),
    }
}

/// Detaches as a daemon does: fork (the parent returns, to exit 0), setsid, fork
/// again (so that the VMM is no session leader and cannot acquire a terminal),
/// standard input and outputs on /dev/null. `Child` in the process that goes on.
pub fn daemonize(dev_null: File) -> anyhow::Result<Forked> {
    if let Forked::Parent(pid) = fork()? {
        return Ok(Forked::Parent(pid));
    }
    // SAFETY: setsid takes no arguments.
    sys(unsafe { libc::setsid() }).context("--daemonize: cannot start a new session")?;
    if let Forked::Parent(pid) = fork()? {
        return Ok(Forked::Parent(pid));
    }
    let null = dev_null.into_raw_fd();
    for fd in 0..3 {
        // SAFETY: dup2 of a descriptor this process owns onto a standard one.
        sys(unsafe { libc::dup2(null, fd) })
            .context("--daemonize: cannot redirect to /dev/null")?;
    }
    // SAFETY: `null` is owned here (into_raw_fd) and not used after.
    unsafe { libc::close(null) };
    Ok(Forked::Child)
}

/// Becomes `uid`:`gid` with no supplementary groups, for good: root's capabilities
/// go with the user id, and no exec may give privileges back (no_new_privs).
pub fn drop_privileges(uid: u32, gid: u32) -> anyhow::Result<()> {
    let ids = || format!("--uid {uid} --gid {gid}");
    // The user change clears a parent-death signal the caller set (a supervisor
    // such as vigild, which must not leave VMs behind when it dies): kept.
    let mut death_signal: libc::c_int = 0;
    // SAFETY: PR_GET_PDEATHSIG writes one int to the pointer, which lives across the call.
    sys(unsafe {
        libc::prctl(
            libc::PR_GET_PDEATHSIG,
            &mut death_signal as *mut libc::c_int,
        )
    })
    .context("cannot read the parent-death signal")?;
    // SAFETY: getppid cannot fail and touches no memory.
    let parent = unsafe { libc::getppid() };
    // SAFETY: an empty list: the pointer is not read.
    sys(unsafe { libc::setgroups(0, std::ptr::null()) })
        .with_context(|| format!("{}: cannot drop the supplementary groups", ids()))?;
    // SAFETY: takes ids only.
    sys(unsafe { libc::setresgid(gid, gid, gid) })
        .with_context(|| format!("{}: cannot become group {gid}", ids()))?;
    // SAFETY: takes ids only.
    sys(unsafe { libc::setresuid(uid, uid, uid) })
        .with_context(|| format!("{}: cannot become user {uid}", ids()))?;
    // SAFETY: takes integers only.
    sys(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })
        .context("cannot set no_new_privs")?;
    if death_signal != 0 {
        // SAFETY: takes integers only.
        sys(unsafe {
            libc::prctl(
                libc::PR_SET_PDEATHSIG,
                death_signal as libc::c_ulong,
                0,
                0,
                0,
            )
        })
        .context("cannot keep the parent-death signal")?;
        // The parent died while it was cleared: act on it now.
        // SAFETY: getppid takes nothing and touches no memory.
        if unsafe { libc::getppid() } != parent {
            // SAFETY: sends a signal number the kernel gave us to this process.
            unsafe { libc::raise(death_signal) };
        }
    }
    Ok(())
}

/// Microseconds on `clock`.
fn clock_us(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given, which lives across the call.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000 + ts.tv_nsec as u64 / 1_000
}

/// When the jailer started, for Firecracker's `--start-time-us`.
#[derive(Clone, Copy)]
pub struct Clocks {
    monotonic_us: u64,
}

impl Clocks {
    pub fn now() -> Clocks {
        Clocks {
            monotonic_us: clock_us(libc::CLOCK_MONOTONIC),
        }
    }
}

/// The VMM's command line.
pub struct Vmm {
    command: Command,
}

impl Vmm {
    /// `/<exec file name> ARGS` with argv[0] the exec file's name and an empty
    /// environment (nothing of the caller's leaks in). Vigil as Firecracker (an
    /// exec file named `firecracker`) first gets the flags Firecracker's jailer
    /// gives Firecracker.
    pub fn new(plan: &Plan, start: Clocks) -> Vmm {
        let mut command = Command::new(PathBuf::from("/").join(&plan.exec_name));
        command.arg0(&plan.exec_name).env_clear();
        if plan.exec_name == "firecracker" {
            command
                .args(["--id", &plan.id])
                .args(["--start-time-us", &start.monotonic_us.to_string()])
                .args([
                    "--start-time-cpu-us",
                    &clock_us(libc::CLOCK_PROCESS_CPUTIME_ID).to_string(),
                ]);
        }
        command.args(&plan.exec_args);
        Vmm { command }
    }

    /// Replaces this process with the VMM; returns only on failure.
    pub fn exec(mut self) -> anyhow::Error {
        let e = self.command.exec();
        anyhow::anyhow!(
            "cannot run {:?} in the jail: {e}",
            self.command.get_program()
        )
    }
}

/// `--new-pid-ns`: the VMM runs as process 1 of a new PID namespace; this process
/// stays (as --uid/--gid), passes the signals of [`FORWARDED`] on and returns the
/// VMM's exit status. Returns an error in the child if its exec fails.
pub fn run_in_new_pid_ns(plan: &Plan, vmm: Vmm) -> anyhow::Result<ExitCode> {
    // Blocked before the fork, so that none is lost: they wait for sigwaitinfo.
    let mut waited = empty_sigset();
    for sig in FORWARDED.into_iter().chain([libc::SIGCHLD]) {
        // SAFETY: adds a valid signal number to a sigset this function owns.
        unsafe { libc::sigaddset(&mut waited, sig) };
    }
    let mut old = empty_sigset();
    // SAFETY: both sigsets live across the call.
    sys(unsafe { libc::sigprocmask(libc::SIG_BLOCK, &waited, &mut old) })
        .context("cannot block signals")?;
    // SAFETY: takes flags only; the next child of this process is the namespace's init.
    sys(unsafe { libc::unshare(libc::CLONE_NEWPID) })
        .context("--new-pid-ns: cannot create a PID namespace")?;
    let child = match fork()? {
        Forked::Child => {
            // SAFETY: `old` lives across the call.
            sys(unsafe { libc::sigprocmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) })
                .context("cannot unblock signals")?;
            drop_privileges(plan.uid, plan.gid)?;
            // Set after the user changes (which clears it): the VMM dies with the
            // jailer, even when SIGKILL ends the jailer.
            // SAFETY: takes integers only.
            sys(unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) })
                .context("cannot set the parent-death signal")?;
            return Err(vmm.exec());
        }
        Forked::Parent(pid) => pid,
    };
    crate::jail::write_pid_file(&plan.exec_name, child as u32)?;
    drop_privileges(plan.uid, plan.gid)?;
    tracing::info!("the VMM is process {child} (1 in its PID namespace)");
    loop {
        // SAFETY: an all-zero siginfo_t is valid; sigwaitinfo fills it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: both pointers are to live locals.
        let sig = match sys(unsafe { libc::sigwaitinfo(&waited, &mut info) }) {
            Ok(sig) => sig,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e).context("cannot wait for signals"),
        };
        if sig == libc::SIGCHLD {
            let mut status = 0;
            // SAFETY: waits for this process's own child; `status` lives across the call.
            match sys(unsafe { libc::waitpid(child, &mut status, libc::WNOHANG) })
                .context("cannot wait for the VMM")?
            {
                0 => continue,
                _ if libc::WIFEXITED(status) => {
                    return Ok(ExitCode::from(libc::WEXITSTATUS(status) as u8))
                }
                _ if libc::WIFSIGNALED(status) => {
                    return Ok(ExitCode::from(128 + libc::WTERMSIG(status) as u8))
                }
                _ => continue,
            }
        }
        // A signal from the terminal (si_code > 0: the kernel's) also reached the
        // VMM, in the same process group: only those sent by a process are passed on.
        if info.si_code <= 0 {
            // SAFETY: signals this process's own child.
            unsafe { libc::kill(child, sig) };
        }
    }
}

fn empty_sigset() -> libc::sigset_t {
    // SAFETY: an all-zero sigset_t is a valid value for sigemptyset to initialise.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` lives across the call.
    unsafe { libc::sigemptyset(&mut set) };
    set
}
