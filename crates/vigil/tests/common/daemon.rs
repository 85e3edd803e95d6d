//! A `vigil daemon` for end-to-end tests: its own scratch folder, the test guest
//! written out, raw HTTP on its sockets, `vigil ctl` against it.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{run, Run};

pub const VIGIL: &str = env!("CARGO_BIN_EXE_vigil");
pub const CTL_TIMEOUT: Duration = Duration::from_secs(60);

pub fn is_root() -> bool {
    // SAFETY: geteuid cannot fail and touches no memory.
    unsafe { libc::geteuid() == 0 }
}

/// A daemon in its own scratch folder, with the test guest written out and a config.
pub struct Daemon {
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub child: Option<Child>,
}

impl Daemon {
    pub fn start(name: &str, extra: &[&str]) -> Daemon {
        let dir = std::env::temp_dir().join(format!("vigil-d-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("guest.elf"), vigil_test_guest::ELF).unwrap();
        let socket = dir.join("daemon.sock");
        let mut d = Daemon {
            dir,
            socket,
            child: None,
        };
        d.spawn(extra);
        d
    }

    /// Starts `vigil daemon` on this folder and waits until it answers.
    pub fn spawn(&mut self, extra: &[&str]) {
        let log = std::fs::File::create(self.dir.join("daemon.log")).unwrap();
        let child = Command::new(VIGIL)
            .args(["daemon", "--state-dir"])
            .arg(self.dir.join("state"))
            .arg("--socket")
            .arg(&self.socket)
            // The test guest and the disks are in this folder.
            .arg("--allow-vm-path")
            .arg(&self.dir)
            .args(["--stop-timeout", "5"])
            // VMs run jailed by default, which needs root; as another user, as before.
            .args(if is_root() || extra.contains(&"--no-jailer") {
                &[][..]
            } else {
                &["--no-jailer"][..]
            })
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            assert!(
                Instant::now() < deadline,
                "the daemon does not answer:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// A Firecracker-style config for the test guest running `scenario`.
    pub fn config(&self, scenario: &str) -> Value {
        json!({
            "boot-source": {
                "kernel_image_path": self.dir.join("guest.elf"),
                "boot_args": format!("test={scenario}"),
            },
            "machine-config": {"vcpu_count": 1, "mem_size_mib": 32},
        })
    }

    pub fn config_file(&self, scenario: &str) -> PathBuf {
        let path = self.dir.join(format!("{scenario}.json"));
        std::fs::write(&path, self.config(scenario).to_string()).unwrap();
        path
    }

    pub fn ctl(&self, args: &[&str]) -> Run {
        let socket = self.socket.to_str().unwrap();
        run(&[&["ctl", "--socket", socket], args].concat(), CTL_TIMEOUT)
    }

    pub fn ctl_ok(&self, args: &[&str]) -> Run {
        let r = self.ctl(args);
        assert_eq!(
            r.code,
            Some(0),
            "vigil ctl {args:?}: {r}\n--- daemon\n{}",
            self.log()
        );
        r
    }

    pub fn http(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let (status, text) = http_unix(&self.socket, method, path, body, None);
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    pub fn create(&self, id: &str, scenario: &str) -> Value {
        let (status, body) = self.http(
            "POST",
            "/vms",
            Some(json!({"id": id, "config": self.config(scenario)})),
        );
        assert_eq!(
            status,
            201,
            "create {id}: {body}\n--- daemon\n{}",
            self.log()
        );
        body
    }

    pub fn sigterm(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().unwrap();
        // SAFETY: kill has no memory effects; the pid is our unreaped child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        wait_timeout(&mut child, Duration::from_secs(30))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: as in sigterm.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let _ = wait_timeout(&mut child, Duration::from_secs(30));
        }
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

pub fn wait_timeout(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            child.kill().ok();
            panic!("the daemon did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One hand-written HTTP/1.1 exchange (Connection: close) on any stream.
pub fn http_exchange(
    mut stream: impl Read + Write,
    method: &str,
    path: &str,
    body: Option<Value>,
    token: Option<&str>,
) -> (u16, String) {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP response: {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

pub fn http_unix(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<Value>,
    token: Option<&str>,
) -> (u16, String) {
    let stream = std::os::unix::net::UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    http_exchange(stream, method, path, body, token)
}

pub fn wait_for_state(d: &Daemon, id: &str, state: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, vm) = d.http("GET", &format!("/vms/{id}"), None);
        if vm["state"] == state {
            return vm;
        }
        assert!(Instant::now() < deadline, "{id} never became {state}: {vm}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A loopback address with a port that was free a moment ago.
pub fn free_loopback_addr() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    format!("127.0.0.1:{port}")
}

/// `vigil daemon` arguments for a TCP listener on `addr` with the token in
/// `token_file`.
pub fn tcp_args<'a>(addr: &'a str, token_file: &'a Path) -> [&'a str; 4] {
    [
        "--listen-tcp",
        addr,
        "--token-file",
        token_file.to_str().unwrap(),
    ]
}
