//! The per-VM API over its Unix socket, end to end: Firecracker's request sequence
//! boots the test guest; pause and resume; refusals that leave the VM unharmed;
//! `--config-file`; Vigil run as `firecracker`; the socket's life.

mod common;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::http::{request, wait_for, Answer};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(60);

/// A scratch folder for one test.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("vigil-api-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn guest() -> String {
    vigil_test_guest::ELF_PATH.to_string()
}

/// `vigil ARGS` with its stdout collected as it comes.
struct Vigil {
    child: Child,
    out: Arc<Mutex<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Vigil {
    fn spawn(args: &[&str]) -> Self {
        Self::spawn_cmd(common::vigil(), args)
    }

    fn spawn_cmd(mut cmd: std::process::Command, args: &[&str]) -> Self {
        let mut child = cmd.args(args).spawn().expect("spawn vigil");
        let mut stdout = child.stdout.take().unwrap();
        let out = Arc::new(Mutex::new(String::new()));
        let sink = out.clone();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Self {
            child,
            out,
            reader: Some(reader),
        }
    }

    fn output(&self) -> String {
        self.out.lock().unwrap().clone()
    }

    /// Waits for the process to end: (exit code, stdout, stderr).
    fn finish(mut self) -> (Option<i32>, String, String) {
        let mut run = common::finish(
            std::mem::replace(
                &mut self.child,
                std::process::Command::new("true").spawn().unwrap(),
            ),
            TIMEOUT,
        );
        if let Some(r) = self.reader.take() {
            r.join().unwrap();
        }
        run.stdout = self.output();
        (run.code, run.stdout, run.stderr)
    }
}

fn ok(sock: &Path, method: &str, path: &str, body: serde_json::Value) {
    let a = request(sock, method, path, &body.to_string());
    assert_eq!(a.status, 204, "{method} {path} {body}: {a:?}");
}

fn refused(sock: &Path, method: &str, path: &str, body: &str, needle: &str) -> Answer {
    let a = request(sock, method, path, body);
    assert_eq!(a.status, 400, "{method} {path} {body}: {a:?}");
    let m = a.fault();
    assert!(
        m.contains(needle),
        "{method} {path}: {m:?} lacks {needle:?}"
    );
    a
}

fn state(sock: &Path) -> String {
    let a = request(sock, "GET", "/", "");
    assert_eq!(a.status, 200, "{a:?}");
    a.json()["state"].as_str().unwrap().to_string()
}

#[test]
fn firecracker_request_sequence_boots_the_test_guest() {
    let dir = scratch("boot");
    let sock = dir.join("api.sock");
    let disk = dir.join("rootfs.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let vigil = Vigil::spawn(&["run", "--api-sock", sock.to_str().unwrap(), "--id", "vm-7"]);
    wait_for(&sock, TIMEOUT);
    let info = request(&sock, "GET", "/", "").json();
    assert_eq!(info["state"], "Not started");
    assert_eq!(info["id"], "vm-7");
    assert_eq!(
        request(&sock, "GET", "/version", "").json()["firecracker_version"],
        "1.17.0"
    );
    ok(
        &sock,
        "PUT",
        "/boot-source",
        json!({"kernel_image_path": guest(), "boot_args": "test=serial,smp,blk"}),
    );
    ok(
        &sock,
        "PUT",
        "/machine-config",
        json!({"vcpu_count": 2, "mem_size_mib": 128}),
    );
    ok(
        &sock,
        "PUT",
        "/drives/rootfs",
        json!({"drive_id": "rootfs", "path_on_host": disk, "is_root_device": true, "is_read_only": false}),
    );
    ok(
        &sock,
        "PUT",
        "/actions",
        json!({"action_type": "InstanceStart"}),
    );
    let (code, out, err) = vigil.finish();
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.contains("TEST serial PASS"), "{out}");
    assert!(out.contains("TEST smp PASS"), "{out}");
    assert!(out.contains("TEST blk PASS"), "{out}");
    assert!(out.contains("cpus: 2"), "{out}");
    assert!(!sock.exists(), "the socket is removed on exit");
}

#[test]
fn pause_and_resume_a_running_guest() {
    let dir = scratch("pause");
    let sock = dir.join("api.sock");
    let metrics = dir.join("metrics.json");
    let log = dir.join("vigil.log");
    let vigil = Vigil::spawn(&["run", "--api-sock", sock.to_str().unwrap()]);
    wait_for(&sock, TIMEOUT);
    ok(
        &sock,
        "PUT",
        "/logger",
        json!({"log_path": log, "level": "Info", "show_level": true}),
    );
    ok(&sock, "PUT", "/metrics", json!({"metrics_path": metrics}));
    ok(
        &sock,
        "PUT",
        "/boot-source",
        json!({"kernel_image_path": guest(), "boot_args": "test=serial,timer,smp,memory,user"}),
    );
    ok(
        &sock,
        "PUT",
        "/machine-config",
        json!({"vcpu_count": 2, "mem_size_mib": 64}),
    );
    ok(
        &sock,
        "PUT",
        "/balloon",
        json!({"amount_mib": 0, "deflate_on_oom": false, "stats_polling_interval_s": 1}),
    );
    ok(
        &sock,
        "PUT",
        "/actions",
        json!({"action_type": "InstanceStart"}),
    );
    ok(&sock, "PATCH", "/vm", json!({"state": "Paused"}));
    assert_eq!(state(&sock), "Paused");
    // The counters the daemon scrapes (their values are checked in the metrics
    // line the VM writes at its end, below).
    let snapshot = request(&sock, "GET", "/vigil/metrics", "");
    assert_eq!(snapshot.status, 200, "{snapshot:?}");
    let snapshot = snapshot.json();
    assert_eq!(snapshot["vcpus"].as_array().unwrap().len(), 2, "{snapshot}");
    assert_eq!(snapshot["memory"]["guest_bytes"], 64 << 20, "{snapshot}");
    assert!(snapshot["uptime_ns"].as_u64().unwrap() > 0, "{snapshot}");
    let at_pause = vigil.output();
    assert!(
        !at_pause.contains("DONE"),
        "the guest ended before the pause:\n{at_pause}"
    );
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(vigil.output(), at_pause, "the guest ran while paused");

    // While paused: what only works before start is refused, the rest answers.
    refused(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
        "already started",
    );
    refused(
        &sock,
        "PUT",
        "/boot-source",
        &json!({"kernel_image_path": guest()}).to_string(),
        "before the VM starts",
    );
    refused(
        &sock,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 64}"#,
        "before the VM starts",
    );
    ok(&sock, "PATCH", "/balloon", json!({"amount_mib": 8}));
    assert_eq!(
        request(&sock, "GET", "/balloon", "").json()["amount_mib"],
        8
    );
    let stats = request(&sock, "GET", "/balloon/statistics", "");
    assert_eq!(stats.status, 200, "{stats:?}");
    assert_eq!(stats.json()["target_mib"], 8);
    ok(
        &sock,
        "PATCH",
        "/balloon/statistics",
        json!({"stats_polling_interval_s": 2}),
    );
    refused(
        &sock,
        "PATCH",
        "/balloon",
        r#"{"amount_mib": 100}"#,
        "amount_mib 100",
    );
    ok(
        &sock,
        "PUT",
        "/actions",
        json!({"action_type": "SendCtrlAltDel"}),
    );
    ok(
        &sock,
        "PUT",
        "/actions",
        json!({"action_type": "FlushMetrics"}),
    );
    ok(&sock, "PATCH", "/vm", json!({"state": "Paused"}));

    ok(&sock, "PATCH", "/vm", json!({"state": "Resumed"}));
    let (code, out, err) = vigil.finish();
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.contains("DONE passed=5 failed=0"), "{out}");

    let lines = std::fs::read_to_string(&metrics).unwrap();
    let first: serde_json::Value = serde_json::from_str(lines.lines().next().unwrap()).unwrap();
    assert!(first["utc_timestamp_ms"].as_u64().unwrap() > 0, "{first}");
    assert_eq!(first["vmm"]["state"], "Paused", "{first}");
    assert!(
        first["api_server"]["requests_2xx"].as_u64().unwrap() >= 8,
        "{first}"
    );
    assert_eq!(
        lines.lines().count(),
        2,
        "one line per FlushMetrics and one at exit"
    );
    // The last line carries the VM's counters: the guest's serial output alone
    // is port I/O on vCPU 0.
    let last: serde_json::Value = serde_json::from_str(lines.lines().last().unwrap()).unwrap();
    assert!(last["vcpu0"]["exits_io"].as_u64().unwrap() > 0, "{last}");
    assert_eq!(last["vm"]["guest_memory_bytes"], 64 << 20, "{last}");
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("INFO") && log.contains("VM built"), "{log}");
}

#[test]
fn bad_requests_are_refused_and_the_vm_unharmed() {
    let dir = scratch("errors");
    let sock = dir.join("api.sock");
    let vigil = Vigil::spawn(&[
        "run",
        "--api-sock",
        sock.to_str().unwrap(),
        "--console",
        "none",
    ]);
    wait_for(&sock, TIMEOUT);
    refused(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
        "PUT /boot-source",
    );
    refused(
        &sock,
        "PUT",
        "/boot-source",
        "{\"kernel_image_path\": ",
        "EOF",
    );
    refused(&sock, "PUT", "/boot-source", "", "needs a JSON body");
    refused(
        &sock,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 2, "mem_size_mib": 64, "vcpus": 2}"#,
        "unknown field `vcpus`",
    );
    refused(
        &sock,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": "two", "mem_size_mib": 64}"#,
        "vcpu_count: invalid type",
    );
    refused(
        &sock,
        "PUT",
        "/machine-config",
        r#"{"mem_size_mib": 64}"#,
        "missing field `vcpu_count`",
    );
    refused(
        &sock,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 2, "mem_size_mib": 64, "cpu_template": "T2"}"#,
        "cpu_template \"T2\"",
    );
    refused(&sock, "GET", "/boot-source", "", "accepts PUT");
    refused(&sock, "DELETE", "/drives/rootfs", "", "accepts PUT, PATCH");
    refused(&sock, "GET", "/no/such/thing", "", "no such resource");
    refused(&sock, "PUT", "/mmds", "{}", "does not implement");
    refused(
        &sock,
        "PATCH",
        "/vm",
        r#"{"state": "Paused"}"#,
        "needs a running VM",
    );
    refused(
        &sock,
        "PATCH",
        "/drives/rootfs",
        r#"{"drive_id": "rootfs"}"#,
        "needs a running VM",
    );
    refused(
        &sock,
        "PUT",
        "/boot-source",
        r#"{"kernel_image_path": "/nonexistent/vmlinux"}"#,
        "kernel_image_path \"/nonexistent/vmlinux\"",
    );
    // A kernel that is no kernel: the start fails, the VM can still be configured.
    ok(
        &sock,
        "PUT",
        "/boot-source",
        json!({"kernel_image_path": "/etc/hostname"}),
    );
    refused(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
        "cannot start the VM",
    );
    assert_eq!(state(&sock), "Not started");
    let machine = request(&sock, "GET", "/machine-config", "").json();
    assert_eq!(machine["vcpu_count"], 1);
    assert_eq!(machine["mem_size_mib"], 128);
    ok(
        &sock,
        "PUT",
        "/boot-source",
        json!({"kernel_image_path": guest(), "boot_args": "test=serial"}),
    );
    ok(
        &sock,
        "PUT",
        "/actions",
        json!({"action_type": "InstanceStart"}),
    );
    let (code, out, err) = vigil.finish();
    assert_eq!(code, Some(0), "{out}\n{err}");
}

#[test]
fn config_file_boots_the_test_guest() {
    let dir = scratch("config");
    let file = dir.join("vm.json");
    std::fs::write(
        &file,
        json!({
            "boot-source": {"kernel_image_path": guest(), "boot_args": "test=serial,rng"},
            "machine-config": {"vcpu_count": 1, "mem_size_mib": 64, "smt": false},
            "drives": [],
            "entropy": {"rate_limiter": {"bandwidth": {"size": 65536, "refill_time": 100}}},
        })
        .to_string(),
    )
    .unwrap();
    let run = common::run(&["run", "--config-file", file.to_str().unwrap()], TIMEOUT);
    assert_eq!(run.code, Some(0), "{run}");
    run.line("TEST serial PASS");
    run.line("TEST rng PASS");

    std::fs::write(
        &file,
        r#"{"boot-source": {"kernel_image_path": "x"}, "mmds-config": {}}"#,
    )
    .unwrap();
    let run = common::run(&["run", "--config-file", file.to_str().unwrap()], TIMEOUT);
    assert_eq!(run.code, Some(1), "{run}");
    assert!(run.stderr.contains("unknown field `mmds-config`"), "{run}");
    std::fs::write(&file, json!({"boot-source": {"kernel_image_path": guest()}, "machine-config": {"vcpu_count": 0, "mem_size_mib": 64}}).to_string()).unwrap();
    let run = common::run(&["run", "--config-file", file.to_str().unwrap()], TIMEOUT);
    assert_eq!(run.code, Some(1), "{run}");
    assert!(run.stderr.contains("machine-config: vcpu_count 0"), "{run}");
    let run = common::run(
        &[
            "run",
            "--config-file",
            file.to_str().unwrap(),
            "--cpus",
            "2",
        ],
        TIMEOUT,
    );
    assert!(run.stderr.contains("--cpus with --config-file"), "{run}");
}

#[test]
fn vigil_answers_as_firecracker() {
    let dir = scratch("firecracker");
    let link = dir.join("firecracker");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_vigil"), &link).unwrap();
    let fc = |args: &[&str]| {
        let mut cmd = std::process::Command::new(&link);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        common::finish(cmd.spawn().unwrap(), TIMEOUT)
    };
    let run = fc(&["--version"]);
    assert_eq!(run.code, Some(0), "{run}");
    assert!(run.stdout.starts_with("Firecracker v1.17.0"), "{run}");
    let run = common::run(&["firecracker", "--version"], TIMEOUT);
    assert!(run.stdout.starts_with("Firecracker v1.17.0"), "{run}");
    let run = fc(&["--seccomp-filter", "/tmp/f.bpf"]);
    assert_eq!(run.code, Some(1), "{run}");
    assert!(run.stderr.contains("--seccomp-filter /tmp/f.bpf"), "{run}");
    let run = fc(&["--no-api"]);
    assert!(run.stderr.contains("--no-api needs --config-file"), "{run}");
    let run = fc(&["--bogus"]);
    assert_eq!(run.code, Some(2), "{run}");

    let file = dir.join("vm.json");
    std::fs::write(
        &file,
        json!({"boot-source": {"kernel_image_path": guest(), "boot_args": "test=serial"}})
            .to_string(),
    )
    .unwrap();
    let run = fc(&[
        "--no-api",
        "--config-file",
        file.to_str().unwrap(),
        "--boot-timer",
        "--no-seccomp",
    ]);
    assert_eq!(run.code, Some(0), "{run}");
    assert!(run.stdout.contains("TEST serial PASS"), "{run}");
    assert!(run.stderr.contains("--boot-timer"), "{run}");

    let sock = dir.join("fc.sock");
    let mut cmd = std::process::Command::new(&link);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let vigil = Vigil::spawn_cmd(
        cmd,
        &[
            "--api-sock",
            sock.to_str().unwrap(),
            "--id",
            "fc-1",
            "--level",
            "Debug",
        ],
    );
    wait_for(&sock, TIMEOUT);
    assert_eq!(request(&sock, "GET", "/", "").json()["id"], "fc-1");
    ok(
        &sock,
        "PUT",
        "/boot-source",
        json!({"kernel_image_path": guest(), "boot_args": "test=serial"}),
    );
    ok(
        &sock,
        "PUT",
        "/actions",
        json!({"action_type": "InstanceStart"}),
    );
    let (code, out, err) = vigil.finish();
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.contains("TEST serial PASS"), "{out}");
}

#[test]
fn the_socket_in_use_stale_and_removed() {
    let dir = scratch("socket");
    let sock = dir.join("api.sock");
    let s = sock.to_str().unwrap();
    let first = Vigil::spawn(&["run", "--api-sock", s]);
    wait_for(&sock, TIMEOUT);
    let run = common::run(&["run", "--api-sock", s], TIMEOUT);
    assert_eq!(run.code, Some(1), "{run}");
    assert!(
        run.stderr
            .contains("another process is serving this socket"),
        "{run}"
    );
    // SIGTERM while waiting for configuration: a clean exit, the socket removed.
    // SAFETY: the pid is our own child's, still running.
    unsafe { libc::kill(first.child.id() as i32, libc::SIGTERM) };
    let started = Instant::now();
    let (code, _, err) = first.finish();
    assert_eq!(code, Some(143), "{err}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(!sock.exists());

    // A stale socket (nobody listening) is replaced; a regular file is not.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let vigil = Vigil::spawn(&["run", "--api-sock", s]);
    wait_for(&sock, TIMEOUT);
    assert_eq!(state(&sock), "Not started");
    // SAFETY: as above.
    unsafe { libc::kill(vigil.child.id() as i32, libc::SIGINT) };
    let (code, _, _) = vigil.finish();
    assert_eq!(code, Some(130));
    std::fs::write(&sock, "not a socket").unwrap();
    let run = common::run(&["run", "--api-sock", s], TIMEOUT);
    assert_eq!(run.code, Some(1), "{run}");
    assert!(run.stderr.contains("not a socket"), "{run}");
    assert!(sock.exists());
}
