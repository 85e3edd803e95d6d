//! Helpers for end-to-end tests that run the `vigil` binary.
#![allow(dead_code)] // each test file uses a different subset

pub mod blk_bench;
pub mod daemon;
pub mod http;
pub mod mobility;
pub mod tap;

use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// What a finished `vigil` process left behind.
pub struct Run {
    pub code: Option<i32>,
    /// The signal that ended it, if one did.
    pub signal: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// Lines of the guest console that start with `prefix`.
    pub fn lines_starting(&self, prefix: &str) -> Vec<&str> {
        self.stdout
            .lines()
            .filter(|l| l.starts_with(prefix))
            .collect()
    }

    /// The console line starting with `prefix`; panics with the whole output if absent.
    pub fn line(&self, prefix: &str) -> &str {
        self.lines_starting(prefix)
            .first()
            .copied()
            .unwrap_or_else(|| panic!("no line starting with {prefix:?}\n{self}"))
    }

    /// The `RIP ...` line of a crash report on stderr.
    pub fn rip_line(&self) -> &str {
        self.stderr
            .lines()
            .find(|l| l.trim_start().starts_with("RIP "))
            .unwrap_or_else(|| panic!("no RIP line in a crash report\n{self}"))
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

pub fn vigil() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_vigil"));
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// Runs `vigil ARGS`, killing it after `timeout`.
pub fn run(args: &[&str], timeout: Duration) -> Run {
    let child = vigil().args(args).spawn().expect("spawn vigil");
    finish(child, timeout)
}

/// Waits for `child` (killing it after `timeout`) and collects its output (the
/// rest of it, when the caller already took stdout).
pub fn finish(mut child: Child, timeout: Duration) -> Run {
    let out = child.stdout.take();
    let mut err = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut out) = out {
            out.read_to_string(&mut s).ok();
        }
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        err.read_to_string(&mut s).ok();
        s
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Some(status);
        }
        if Instant::now() > deadline {
            child.kill().ok();
            child.wait().ok();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let run = Run {
        code: status.and_then(|s| s.code()),
        signal: status.and_then(|s| s.signal()),
        stdout: out_reader.join().unwrap(),
        stderr: err_reader.join().unwrap(),
    };
    assert!(
        status.is_some(),
        "vigil did not finish within {timeout:?}\n{run}"
    );
    run
}

/// A fresh scratch folder for one test (the process id keeps test binaries that
/// run at once apart).
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vigil-test-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The JSON objects of a JSON-lines file so far (none when it does not exist yet).
pub fn json_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// `vigil run` of the small Linux kernel as this machine's KVM stops it and Vigil
/// keeps it: 2 vCPUs, 256 MiB in huge pages, the host CPU template (XSAVE offered, so the kernel
/// stops on `xrstor` in its FPU set-up, after `trap_init` and `syscall_init`),
/// `--on-crash pause`, and an API socket at `sock`. Callers add their options.
pub fn linux_kept_at_its_crash(vmlinux: &Path, sock: &Path) -> Command {
    let mut cmd = vigil();
    cmd.args(["run", "--kernel"])
        .arg(vmlinux)
        .args(["--cpus", "2", "--memory", "256", "--huge-pages", "thp"])
        .args(["--cmdline", "console=ttyS0 earlyprintk=serial"])
        .args([
            "--cpu-template",
            "host",
            "--on-crash",
            "pause",
            "--api-sock",
        ])
        .arg(sock);
    cmd
}

/// The address of `name` in the test guest's ELF symbol table.
pub fn guest_symbol(name: &str) -> u64 {
    static SYMBOLS: std::sync::OnceLock<vigil_vmm::symbols::SymbolTable> =
        std::sync::OnceLock::new();
    SYMBOLS
        .get_or_init(|| {
            vigil_vmm::symbols::SymbolTable::from_elf(vigil_test_guest::ELF)
                .expect("the test guest's symbols")
        })
        .address_of(name)
        .unwrap_or_else(|| panic!("no {name} in the test guest"))
}

/// A `"0x..."` value of an API answer or a guest's report line.
pub fn hex_u64(s: &str) -> u64 {
    vigil_introspect::hex::parse_u64(s).unwrap_or_else(|e| panic!("{e}"))
}

/// The shared folder beside the repository (or `VIGIL_SHARED_DIR`), if there is one.
pub fn shared_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("VIGIL_SHARED_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared"));
    dir.is_dir().then_some(dir)
}

/// The small Linux kernel in `../shared/guest-kernels`, or `None` with a message.
pub fn tiny_linux() -> Option<(PathBuf, PathBuf)> {
    let dir = shared_dir()?.join("guest-kernels/linux-6.1-tiny");
    let (vmlinux, map) = (dir.join("vmlinux"), dir.join("System.map"));
    if vmlinux.is_file() && map.is_file() {
        Some((vmlinux, map))
    } else {
        eprintln!("SKIP: {} not found", vmlinux.display());
        None
    }
}

/// Whether /dev/kvm is backed by hardware virtualization (not the emulating
/// `kvm_pvm` module of the build machines).
pub fn hardware_kvm() -> bool {
    !std::path::Path::new("/sys/module/kvm_pvm").exists()
}

pub const TIMEOUT: Duration = Duration::from_secs(60);

/// Byte `i` of block (4 KiB) `block` as the test guest's `blk-integrity` and
/// `blk-mq` write it (its `integrity_byte`).
pub fn integrity_byte(block: u64, i: u64) -> u8 {
    (block.wrapping_mul(131) ^ i.wrapping_mul(7) ^ (block >> 8)) as u8
}

/// Runs `vigil ARGS` until its console shows every one of `wanted` (or `timeout`
/// passes), then stops it with SIGTERM and collects what it printed.
pub fn run_until(args: &[&str], wanted: &[&str], timeout: Duration) -> Run {
    use std::io::BufRead;
    let mut child = vigil().args(args).spawn().expect("spawn vigil");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut all = String::new();
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            all.push_str(&line);
            all.push('\n');
            let _ = tx.send(all.clone());
        }
        all
    });
    let deadline = Instant::now() + timeout;
    while let Ok(seen) = rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        if wanted.iter().all(|w| seen.contains(w)) {
            break;
        }
    }
    // SAFETY: the pid is our child's; if it already exited, kill fails harmlessly.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).ok();
    let status = child.wait().unwrap();
    Run {
        code: status.code(),
        signal: status.signal(),
        stdout: reader.join().unwrap(),
        stderr: err,
    }
}

/// A running `vigil` whose console (stdout) is read line by line as it comes and
/// whose stdin is a pipe to the guest's serial port: for guests that wait for the
/// host (the test guest's `introspect: ready` scenarios).
pub struct Console {
    child: Child,
    stdin: Option<std::process::ChildStdin>,
    lines: std::sync::mpsc::Receiver<String>,
    stderr: Option<std::thread::JoinHandle<String>>,
    /// Every console line received so far, `\n`-terminated.
    pub seen: String,
}

impl Console {
    /// Starts `vigil ARGS` with stdin, stdout and stderr piped.
    pub fn spawn(args: &[&str]) -> Console {
        let mut cmd = vigil();
        cmd.args(args);
        Console::spawn_command(cmd)
    }

    /// Starts `cmd` (a vigil, or a command that becomes one) with stdin, stdout
    /// and stderr piped.
    pub fn spawn_command(mut cmd: Command) -> Console {
        use std::io::BufRead;
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn vigil");
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().unwrap();
        let mut err = child.stderr.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            err.read_to_string(&mut s).ok();
            s
        });
        Console {
            child,
            stdin,
            lines,
            stderr: Some(stderr),
            seen: String::new(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for the next console line that starts with one of `prefixes` and returns
    /// it; panics (with everything seen, and the VMM's stderr) when the console ends or
    /// `timeout` passes first.
    pub fn wait_for(&mut self, prefixes: &[&str], timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push_str(&line);
                    self.seen.push('\n');
                    if prefixes.iter().any(|p| line.starts_with(p)) {
                        return line;
                    }
                }
                Err(e) => {
                    let why = match e {
                        std::sync::mpsc::RecvTimeoutError::Timeout => "timed out",
                        std::sync::mpsc::RecvTimeoutError::Disconnected => "console ended",
                    };
                    self.child.kill().ok();
                    self.child.wait().ok();
                    let stderr = self.stderr.take().map(|h| h.join().unwrap());
                    panic!(
                        "{why} waiting for a line starting with {prefixes:?}\n--- stdout\n{}\n--- stderr\n{}",
                        self.seen,
                        stderr.unwrap_or_default()
                    );
                }
            }
        }
    }

    /// Takes the console lines that have arrived, without waiting, and returns
    /// everything seen so far.
    pub fn poll(&mut self) -> &str {
        while let Ok(line) = self.lines.try_recv() {
            self.seen.push_str(&line);
            self.seen.push('\n');
        }
        &self.seen
    }

    /// Writes `bytes` to vigil's stdin (the guest's serial input).
    pub fn send(&mut self, bytes: &[u8]) {
        use std::io::Write;
        let stdin = self.stdin.as_mut().expect("stdin still open");
        stdin.write_all(bytes).expect("write to vigil's stdin");
        stdin.flush().expect("flush vigil's stdin");
    }

    /// Waits for vigil to exit (killing it after `timeout`, which fails the test) and
    /// returns everything it printed.
    pub fn finish(mut self, timeout: Duration) -> Run {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break Some(status);
            }
            if Instant::now() > deadline {
                self.child.kill().ok();
                self.child.wait().ok();
                break None;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        drop(self.stdin.take());
        // The reader ends at EOF, once the process (and with it stdout) is gone.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.seen.push_str(&line);
            self.seen.push('\n');
        }
        let run = Run {
            code: status.and_then(|s| s.code()),
            signal: status.and_then(|s| s.signal()),
            stdout: std::mem::take(&mut self.seen),
            stderr: self
                .stderr
                .take()
                .map(|h| h.join().unwrap())
                .unwrap_or_default(),
        };
        assert!(
            status.is_some(),
            "vigil did not finish within {timeout:?}\n{run}"
        );
        run
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.child.kill().ok();
            self.child.wait().ok();
        }
    }
}
