//! The VMMs the benchmarks compare and how they run them: Vigil (the `vigil`
//! binary beside this one), QEMU microvm and Firecracker booting the same kernel
//! file with the same command line; a run's output lines, CPU time and resident
//! memory; what a failing peer said; progress lines.

use std::io::{BufRead, BufReader, IsTerminal, Read};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use vigil_shared::{qemu, siblings};

/// Which VMM, and what it needs besides its binary.
#[derive(Debug)]
pub enum Kind {
    /// `vigil run`, with these extra options.
    Vigil(Vec<String>),
    /// `vigil run` through `vigil-jailer`.
    JailedVigil(Jailed),
    /// `qemu-system-x86_64 -M microvm`.
    Qemu,
    /// `firecracker --no-api --config-file`, the file written into this folder.
    Firecracker(PathBuf),
}

/// Where a jailed Vigil's jails are made, and the VMM the jailer runs.
#[derive(Debug)]
pub struct Jailed {
    vmm: PathBuf,
    /// --chroot-base-dir.
    jails: PathBuf,
}

/// The jail id of every jailed boot: each boot's jail replaces the last one's.
const JAIL_ID: &str = "bench";

/// The user and group a jailed Vigil runs as (nobody's).
const JAILED_ID: &str = "65534";

/// A VMM under test.
#[derive(Debug)]
pub struct Vmm {
    /// Its name in tables.
    pub name: String,
    pub kind: Kind,
    program: PathBuf,
}

impl Vmm {
    /// The `vigil` beside this binary, with `extra` options for `vigil run`.
    pub fn vigil(name: &str, extra: &[&str]) -> anyhow::Result<Vmm> {
        let program = siblings::beside_me(siblings::VMM)?;
        siblings::check_executable(&program, "the VMM to measure (vigil, beside vigil-bench)")?;
        Ok(Vmm {
            name: name.into(),
            kind: Kind::Vigil(extra.iter().map(|s| s.to_string()).collect()),
            program,
        })
    }

    /// The `vigil` beside this binary run through the `vigil-jailer` beside it, as
    /// user and group 65534, its jails in `scratch` (needs root).
    pub fn jailed_vigil(scratch: &Path) -> anyhow::Result<Vmm> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            bail!("--jailer: the jailer needs root");
        }
        let program = siblings::beside_me(siblings::JAILER)?;
        siblings::check_executable(&program, "--jailer (vigil-jailer, beside vigil-bench)")?;
        let vmm = siblings::beside_me(siblings::VMM)?;
        siblings::check_executable(&vmm, "the VMM to measure (vigil, beside vigil-bench)")?;
        Ok(Vmm {
            name: "vigil (jailed)".into(),
            kind: Kind::JailedVigil(Jailed {
                vmm,
                jails: scratch.join("jails"),
            }),
            program,
        })
    }

    /// QEMU microvm from `program` (a path, or a name looked up in PATH).
    pub fn qemu(program: &str) -> Vmm {
        Vmm {
            name: "qemu-microvm".into(),
            kind: Kind::Qemu,
            program: program.into(),
        }
    }

    /// Firecracker from `program`, its configuration files in `scratch`.
    pub fn firecracker(program: &Path, scratch: &Path) -> anyhow::Result<Vmm> {
        siblings::check_executable(program, "--firecracker")?;
        Ok(Vmm {
            name: "firecracker".into(),
            kind: Kind::Firecracker(scratch.to_owned()),
            program: program.to_owned(),
        })
    }

    /// Its binary.
    pub fn program(&self) -> &Path {
        &self.program
    }

    /// Boots `kernel` (an ELF) with `cmdline` on 1 vCPU and `memory_mib` of RAM,
    /// the guest's COM1 on the command's stdout. The caller adds devices.
    pub fn command(
        &self,
        kernel: &Path,
        cmdline: &str,
        memory_mib: u64,
    ) -> anyhow::Result<Command> {
        let mut cmd = Command::new(&self.program);
        match &self.kind {
            Kind::Vigil(extra) => {
                cmd.args(["run", "--console", "stdio", "--memory"])
                    .arg(memory_mib.to_string())
                    .arg("--kernel")
                    .arg(kernel)
                    .args(["--cmdline", cmdline])
                    .args(extra);
            }
            Kind::JailedVigil(Jailed { vmm, jails }) => {
                // A fresh jail (the last boot's VMM has ended), the kernel linked in
                // beforehand as Firecracker's tools do; the jailer copies the VMM.
                let jail = jails.join(siblings::VMM).join(JAIL_ID);
                let _ = std::fs::remove_dir_all(&jail);
                let root = jail.join("root");
                std::fs::create_dir_all(&root)
                    .with_context(|| format!("cannot create {}", root.display()))?;
                let inside = root.join("kernel");
                if std::fs::hard_link(kernel, &inside).is_err() {
                    std::fs::copy(kernel, &inside).with_context(|| {
                        format!("cannot copy {} into {}", kernel.display(), root.display())
                    })?;
                }
                cmd.args(["--id", JAIL_ID, "--exec-file"])
                    .arg(vmm)
                    .args(["--uid", JAILED_ID, "--gid", JAILED_ID, "--chroot-base-dir"])
                    .arg(jails)
                    .args(["--", "run", "--console", "stdio", "--memory"])
                    .arg(memory_mib.to_string())
                    .args(["--kernel", "/kernel", "--cmdline", cmdline]);
            }
            Kind::Qemu => {
                cmd.args(qemu::microvm_args(kernel, memory_mib, 1, false))
                    .args(["-append", cmdline]);
            }
            Kind::Firecracker(dir) => {
                let config = dir.join("firecracker.json");
                let body = serde_json::json!({
                    "boot-source": {"kernel_image_path": kernel, "boot_args": cmdline},
                    "machine-config": {"vcpu_count": 1, "mem_size_mib": memory_mib},
                    "drives": [],
                });
                std::fs::write(&config, body.to_string())
                    .with_context(|| format!("cannot write {}", config.display()))?;
                cmd.args(["--no-api", "--log-path", "/dev/null", "--config-file"])
                    .arg(config);
            }
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        Ok(cmd)
    }
}

/// `cmd` as a shell line, to show how a failing peer was run.
pub fn shell_line(cmd: &Command) -> String {
    let quote = |s: &std::ffi::OsStr| {
        let s = s.to_string_lossy();
        if !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_=.,/:+".contains(c))
        {
            s.into_owned()
        } else {
            format!("'{}'", s.replace('\'', r"'\''"))
        }
    };
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(quote)
        .collect::<Vec<_>>()
        .join(" ")
}

/// A VMM process being measured: its console lines as they come (each with the
/// moment it was read), its stderr kept for when it fails.
pub struct Running {
    name: String,
    command: String,
    child: Child,
    started: Instant,
    lines: Receiver<(Instant, String)>,
    console: String,
    stderr: Option<JoinHandle<String>>,
}

impl Running {
    pub fn spawn(name: &str, mut cmd: Command) -> anyhow::Result<Running> {
        let command = shell_line(&cmd);
        let started = Instant::now();
        let mut child = cmd
            .spawn()
            .with_context(|| format!("{name}: cannot start `{command}`"))?;
        let stdout = child.stdout.take().context("stdout is not piped")?;
        let mut stderr = child.stderr.take().context("stderr is not piped")?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send((Instant::now(), line)).is_err() {
                    break;
                }
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            text
        });
        Ok(Running {
            name: name.into(),
            command,
            child,
            started,
            lines,
            console: String::new(),
            stderr: Some(stderr),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// When it was spawned, the moment [`Running::wait_for_line`] counts from.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// Waits for a console line that contains `marker` ("" for the first line) and
    /// returns how long after the spawn it was read.
    pub fn wait_for_line(&mut self, marker: &str, timeout: Duration) -> anyhow::Result<Duration> {
        let deadline = self.started + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((at, line)) => {
                    self.console.push_str(&line);
                    self.console.push('\n');
                    if line.contains(marker) {
                        return Ok(at - self.started);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    return Err(self.failure(&format!(
                        "printed no line with {marker:?} within {timeout:?}"
                    )))
                }
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(self.failure(&format!("ended before a line with {marker:?}")))
                }
            }
        }
    }

    /// Stops the process (SIGKILL) and returns its CPU time, user + system.
    pub fn kill(mut self) -> anyhow::Result<Duration> {
        let _ = self.child.kill();
        let (_, cpu) = wait_with_usage(&mut self.child)?;
        Ok(cpu)
    }

    /// Waits up to `timeout` for the process to end on its own; returns its exit
    /// status, its CPU time (user + system) and what it wrote on stderr.
    pub fn wait_exit(
        mut self,
        timeout: Duration,
    ) -> anyhow::Result<(std::process::ExitStatus, Duration, String)> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some((status, cpu)) = wait_with_usage_flags(&mut self.child, libc::WNOHANG)? {
                return Ok((status, cpu, self.take_stderr()));
            }
            if Instant::now() > deadline {
                return Err(self.failure(&format!("did not end within {timeout:?}")));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn take_stderr(&mut self) -> String {
        self.stderr
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default()
    }

    /// Stops the process and says what went wrong: how it was run, what it
    /// printed on its console and on stderr.
    pub fn failure(&mut self, what: &str) -> anyhow::Error {
        let _ = self.child.kill();
        let status = self.child.wait().map(|s| s.to_string()).unwrap_or_default();
        let stderr = self.take_stderr();
        anyhow!(
            "{} {what} ({status})\ncommand: {}\nconsole:\n{}stderr:\n{}",
            self.name,
            self.command,
            self.console,
            stderr
        )
    }
}

/// Waits for `child` and returns its exit status and its user+system CPU time.
pub fn wait_with_usage(child: &mut Child) -> anyhow::Result<(std::process::ExitStatus, Duration)> {
    wait_with_usage_flags(child, 0)?.context("wait4 returned without the child")
}

/// `wait4` on `child` with `flags`: `None` when `WNOHANG` found it still running.
fn wait_with_usage_flags(
    child: &mut Child,
    flags: libc::c_int,
) -> anyhow::Result<Option<(std::process::ExitStatus, Duration)>> {
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: rusage is plain data that wait4 fills in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: pid is our child, not yet reaped; status and usage are writable.
    let r = unsafe { libc::wait4(pid, &mut status, flags, &mut usage) };
    if r == 0 && flags & libc::WNOHANG != 0 {
        return Ok(None);
    }
    if r != pid {
        bail!("wait4: {}", std::io::Error::last_os_error());
    }
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    Ok(Some((
        std::process::ExitStatus::from_raw(status),
        tv(usage.ru_utime) + tv(usage.ru_stime),
    )))
}

/// Resident memory of a running process in KiB: all of it, and the part that is
/// guest RAM (the anonymous mappings at least as large as the guest's memory).
pub fn resident_kib(pid: u32, memory_mib: u64) -> anyhow::Result<(u64, u64)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .with_context(|| format!("cannot read /proc/{pid}/smaps"))?;
    let (mut total, mut guest) = (0, 0);
    let mut size = 0;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("Size:"), Some(kib)) => size = kib.parse().unwrap_or(0),
            (Some("Rss:"), Some(kib)) => {
                let rss: u64 = kib.parse().unwrap_or(0);
                total += rss;
                if size >= memory_mib * 1024 {
                    guest += rss;
                }
            }
            _ => {}
        }
    }
    Ok((total, guest))
}

/// A folder for one benchmark's files (guest images, configurations), removed
/// when dropped.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> anyhow::Result<Scratch> {
        let dir = std::env::temp_dir().join(format!("vigil-bench-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        Ok(Scratch(dir))
    }

    /// Writes `bytes` to `name` in the folder and returns its path.
    pub fn write(&self, name: &str, bytes: &[u8]) -> anyhow::Result<PathBuf> {
        let path = self.0.join(name);
        std::fs::write(&path, bytes).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(path)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Progress on stderr: rewritten in place on a terminal, one line each where
/// stderr is a file or a pipe (CI logs, `2>&1 | tee`).
pub struct Progress {
    terminal: bool,
}

impl Progress {
    pub fn new() -> Progress {
        Progress {
            terminal: std::io::stderr().is_terminal(),
        }
    }

    pub fn show(&self, message: &str) {
        if self.terminal {
            eprint!("\r{message}\x1b[K");
        } else {
            eprintln!("{message}");
        }
    }

    /// Ends the line rewritten in place.
    pub fn done(&self) {
        if self.terminal {
            eprintln!();
        }
    }
}

/// The median of `v` (the upper one of an even count).
pub fn median<T: Copy + Ord>(mut v: Vec<T>) -> T {
    v.sort();
    v[v.len() / 2]
}

/// The folder with Vigil's shared test files (`guest-kernels/...`):
/// `$VIGIL_SHARED_DIR`, else `../shared` from the working directory (the
/// repository's root).
pub fn shared_dir() -> PathBuf {
    std::env::var_os("VIGIL_SHARED_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("../shared"))
}

/// The small Linux kernel in the shared folder.
pub fn tiny_linux() -> PathBuf {
    shared_dir().join("guest-kernels/linux-6.1-tiny/vmlinux")
}
