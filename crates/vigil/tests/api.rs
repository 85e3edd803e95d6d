//! The per-VM API over its Unix socket, end to end: Firecracker's request sequence
//! boots the test guest; pause and resume; refusals that leave the VM unharmed;
//! `--config-file`; Vigil run as `firecracker`; the socket's life.

mod common;

use common::scratch;
use std::io::Read;
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::http::{request, wait_for, Answer};
use serde_json::json;

const TIMEOUT: Duration = Duration::from_secs(60);

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

    /// Waits until the guest console has printed `text`.
    fn wait_for(&self, text: &str) {
        let deadline = std::time::Instant::now() + TIMEOUT;
        while !self.output().contains(text) {
            assert!(
                std::time::Instant::now() < deadline,
                "no {text:?} in {}",
                self.output()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
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

/// `io_engine: "Async"` in `PUT /drives` is honoured: the disk is served
/// through io_uring (as the log says), 32 requests in flight, and what the guest
/// writes and flushes reaches the image; an unknown engine is refused by name.
#[test]
fn firecracker_async_io_engine_serves_the_disk_through_io_uring() {
    let dir = scratch("io-engine");
    let sock = dir.join("api.sock");
    let disk = dir.join("data.img");
    std::fs::write(&disk, vec![0u8; 64 << 20]).unwrap();
    let vigil = Vigil::spawn(&[
        "run",
        "--log-level",
        "info",
        "--api-sock",
        sock.to_str().unwrap(),
    ]);
    wait_for(&sock, TIMEOUT);
    refused(
        &sock,
        "PUT",
        "/drives/data",
        &json!({"drive_id": "data", "path_on_host": disk, "is_root_device": false,
                "is_read_only": false, "io_engine": "Turbo"})
        .to_string(),
        "io_engine \"Turbo\": expected \"Sync\" or \"Async\"",
    );
    ok(
        &sock,
        "PUT",
        "/boot-source",
        json!({"kernel_image_path": guest(), "boot_args": "test=blk-bench,blk blk_qd=32"}),
    );
    ok(
        &sock,
        "PUT",
        "/machine-config",
        json!({"vcpu_count": 1, "mem_size_mib": 128}),
    );
    ok(
        &sock,
        "PUT",
        "/drives/data",
        json!({"drive_id": "data", "path_on_host": disk, "is_root_device": false,
               "is_read_only": false, "io_engine": "Async"}),
    );
    ok(
        &sock,
        "PUT",
        "/actions",
        json!({"action_type": "InstanceStart"}),
    );
    let (code, out, err) = vigil.finish();
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(
        err.contains("io_engine Async: requests go to an io_uring"),
        "{err}"
    );
    assert!(out.contains("TEST blk PASS"), "{out}");
    let bench = out
        .lines()
        .find(|l| l.starts_with("TEST blk-bench PASS"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(bench.contains(" max_in_flight=32 "), "{bench}");
    let bytes = std::fs::read(&disk).unwrap();
    for (i, &byte) in bytes[..512].iter().enumerate() {
        assert_eq!(
            byte,
            ((i * 7 + 0x5a) & 0xff) as u8,
            "byte {i} of the blk pattern"
        );
    }
}

/// `PUT /cpu-config`: a custom CPU template's CPUID and MSR modifiers are what
/// the guest reads; a malformed one is refused naming the field, and a KVM
/// capability the host lacks stops InstanceStart naming its number.
#[test]
fn a_custom_cpu_template_is_what_the_guest_reads() {
    const X2APIC: u64 = 1 << 21;
    // Bits 11 and 12 (BTS and PEBS unavailable) over what Vigil sets: fast strings.
    const MISC_ENABLE: u64 = 0x1801;
    let dir = scratch("cpu-config");
    let sock = dir.join("api.sock");
    let vigil = Vigil::spawn(&["run", "--api-sock", sock.to_str().unwrap()]);
    wait_for(&sock, TIMEOUT);
    refused(
        &sock,
        "PUT",
        "/cpu-config",
        r#"{"cpuid_modifiers": [{"leaf": "0x1", "subleaf": "0", "flags": 0,
            "modifiers": [{"register": "ecx", "bitmap": "0b1"}]}]}"#,
        "cpuid_modifiers.modifiers.bitmap \"0b1\": 1 bits, expected 32",
    );
    let x = |n: usize| "x".repeat(n);
    let template = json!({
        "kvm_capabilities": ["!121"],
        "cpuid_modifiers": [{"leaf": "0x1", "subleaf": "0x0", "flags": 0,
            "modifiers": [{"register": "ecx", "bitmap": format!("0b{}0{}", x(10), x(21))}]}],
        "msr_modifiers": [{"addr": "0x1a0", "bitmap": format!("0b{}11{}", x(51), x(11))}],
    });
    ok(&sock, "PUT", "/cpu-config", template.clone());
    assert_eq!(
        request(&sock, "GET", "/vm/config", "").json()["cpu-config"],
        template
    );
    ok(
        &sock,
        "PUT",
        "/boot-source",
        json!({"kernel_image_path": guest(), "boot_args": "test=cpuid"}),
    );
    ok(
        &sock,
        "PUT",
        "/cpu-config",
        json!({"kvm_capabilities": ["99999"]}),
    );
    refused(
        &sock,
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
        "kvm_capabilities \"99999\": this host's KVM does not have capability 99999",
    );
    ok(&sock, "PUT", "/cpu-config", template);
    ok(
        &sock,
        "PUT",
        "/actions",
        json!({"action_type": "InstanceStart"}),
    );
    let (code, out, err) = vigil.finish();
    assert_eq!(code, Some(0), "{out}\n{err}");
    let line = out
        .lines()
        .find(|l| l.starts_with("TEST cpuid PASS"))
        .unwrap_or_else(|| panic!("{out}"));
    let word = |name: &str| {
        let hex = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{name}=0x")))
            .unwrap_or_else(|| panic!("no {name} in {line}"));
        u64::from_str_radix(hex, 16).unwrap()
    };
    assert_eq!(word("leaf1_ecx") & X2APIC, 0, "{line}");
    assert_ne!(word("leaf1_ecx") & (1 << 31), 0, "other bits kept: {line}");
    assert_eq!(word("misc_enable"), MISC_ENABLE, "{line}");
}

/// Free page hinting as Firecracker drives it: the guest waits for a run, the
/// API starts one, the guest hints pages that the host discards (they read back
/// zero), stops, and the run is acknowledged (done); the status shows each
/// side's last command. Without `free_page_hinting` the commands are refused.
#[test]
fn a_free_page_hinting_run_discards_the_hinted_pages() {
    let dir = scratch("hinting");
    let sock = dir.join("api.sock");
    let vigil = Vigil::spawn(&[
        "run",
        "--api-sock",
        sock.to_str().unwrap(),
        "--kernel",
        &guest(),
        "--cmdline",
        "test=balloon-hint",
        "--memory",
        "64",
        "--balloon",
        "free_page_hinting=on",
    ]);
    wait_for(&sock, TIMEOUT);
    vigil.wait_for("balloon-hint: waiting for a run");
    let status = || request(&sock, "GET", "/balloon/hinting/status", "").json();
    assert_eq!(status(), json!({"host_cmd": 0}), "no run yet");
    refused(
        &sock,
        "PATCH",
        "/balloon/hinting/start",
        r#"{"acknowledge_on_stop": "yes"}"#,
        "acknowledge_on_stop",
    );
    // No body: Firecracker's default, acknowledged on stop.
    let a = request(&sock, "PATCH", "/balloon/hinting/start", "");
    assert_eq!(a.status, 204, "{a:?}");
    let (code, out, err) = vigil.finish();
    assert_eq!(code, Some(0), "{out}\n{err}");
    let line = out
        .lines()
        .find(|l| l.starts_with("TEST balloon-hint"))
        .unwrap_or_else(|| panic!("{out}"));
    assert_eq!(line, "TEST balloon-hint PASS run=2 pages=256 zeroed=256");

    // A balloon without hinting refuses the commands.
    let sock = dir.join("plain.sock");
    let vigil = Vigil::spawn(&[
        "run",
        "--api-sock",
        sock.to_str().unwrap(),
        "--kernel",
        &guest(),
        "--cmdline",
        "test=counter",
        "--balloon",
    ]);
    vigil.wait_for("counter: 1");
    for (method, path) in [
        ("PATCH", "/balloon/hinting/start"),
        ("GET", "/balloon/hinting/status"),
        ("PATCH", "/balloon/hinting/stop"),
    ] {
        refused(&sock, method, path, "", "free page hinting was not enabled");
    }
    // SAFETY: the pid is our own child's, still running.
    unsafe { libc::kill(vigil.child.id() as i32, libc::SIGTERM) };
    vigil.finish();
    std::fs::remove_dir_all(&dir).ok();
}

/// `PUT /serial` sends the console to a file instead of the VMM's standard
/// output; a rate limiter or an empty path is refused naming the field.
#[test]
fn serial_output_goes_to_the_file_put_serial_names() {
    let dir = scratch("serial");
    let sock = dir.join("api.sock");
    let console = dir.join("console.log");
    let vigil = Vigil::spawn(&["run", "--api-sock", sock.to_str().unwrap()]);
    wait_for(&sock, TIMEOUT);
    refused(
        &sock,
        "PUT",
        "/serial",
        r#"{"serial_out_path": "/tmp/x", "rate_limiter": {"size": 100, "refill_time": 100}}"#,
        "rate_limiter: Vigil does not limit",
    );
    refused(
        &sock,
        "PUT",
        "/serial",
        r#"{"serial_out_path": ""}"#,
        "serial_out_path",
    );
    ok(
        &sock,
        "PUT",
        "/serial",
        json!({ "serial_out_path": console }),
    );
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
    let written = std::fs::read_to_string(&console).unwrap();
    assert!(written.contains("TEST serial PASS"), "{written}");
    assert!(
        !out.contains("TEST serial"),
        "the console went to stdout too: {out}"
    );
    std::fs::remove_dir_all(&dir).ok();
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
    refused(&sock, "PUT", "/mmds", "[]", "a JSON object, not an array");
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
        r#"{"boot-source": {"kernel_image_path": "x"}, "mmds-config": {"network_interfaces": ["eth0"], "ipv4_address": "10.0.0.1"}}"#,
    )
    .unwrap();
    let run = common::run(&["run", "--config-file", file.to_str().unwrap()], TIMEOUT);
    assert_eq!(run.code, Some(1), "{run}");
    assert!(
        run.stderr
            .contains("mmds-config: network_interfaces \"eth0\""),
        "{run}"
    );
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

/// Clients written against Firecracker send HTTP/1.0 request lines and reuse
/// the connection: it stays open after each answer, as Firecracker's does.
#[test]
fn an_http_1_0_connection_stays_open_for_the_next_request() {
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    let dir = scratch("http10");
    let sock = dir.join("api.sock");
    let vigil = Vigil::spawn(&["run", "--api-sock", sock.to_str().unwrap()]);
    wait_for(&sock, TIMEOUT);
    let mut conn = UnixStream::connect(&sock).unwrap();
    conn.set_read_timeout(Some(TIMEOUT)).unwrap();
    for _ in 0..3 {
        conn.write_all(b"GET /version HTTP/1.0\r\n\r\n").unwrap();
        let mut answer = Vec::new();
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&answer).ends_with("\"1.17.0\"}") {
            let n = conn.read(&mut buf).unwrap();
            assert_ne!(n, 0, "closed after {:?}", String::from_utf8_lossy(&answer));
            answer.extend_from_slice(&buf[..n]);
        }
        assert!(answer.starts_with(b"HTTP/1.1 200 OK"));
    }
    // SAFETY: the pid is our own child's, still running.
    unsafe { libc::kill(vigil.child.id() as i32, libc::SIGTERM) };
    vigil.finish();
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

/// A request whose Content-Length is over the body limit is refused when its
/// headers arrive (its body never sent), the connection closed, and the VMM
/// goes on serving.
#[test]
fn an_oversized_body_is_refused_from_its_headers() {
    use std::io::Write;
    let dir = scratch("oversized");
    let sock = dir.join("api.sock");
    let vigil = Vigil::spawn(&["run", "--api-sock", sock.to_str().unwrap()]);
    wait_for(&sock, TIMEOUT);
    let mut stream = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
        .write_all(
            b"PUT /machine-config HTTP/1.1\r\nHost: localhost\r\n\
              Content-Type: application/json\r\nContent-Length: 100000000\r\n\r\n",
        )
        .unwrap();
    let mut answer = String::new();
    // Read to the end: the server closes the connection after answering.
    stream.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(
        answer.contains("the request body is 100000000 bytes, more than the 65536"),
        "{answer}"
    );
    assert_eq!(state(&sock), "Not started");
    // SAFETY: the pid is our own child's, still running.
    unsafe { libc::kill(vigil.child.id() as i32, libc::SIGTERM) };
    assert_eq!(vigil.finish().0, Some(143));
    std::fs::remove_dir_all(&dir).ok();
}

/// `(second, ops)` of each `flood: <ops> ops in second <k>` line so far.
fn flood_seconds(out: &str) -> Vec<(u64, u64)> {
    out.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix("flood: ")?;
            let (ops, k) = rest.split_once(" ops in second ")?;
            Some((k.trim().parse().ok()?, ops.parse().ok()?))
        })
        .collect()
}

/// Waits until the guest reported at least `n` seconds of flood; returns them.
fn flood_until(vigil: &Vigil, n: usize, within: Duration) -> Vec<(u64, u64)> {
    let deadline = Instant::now() + within;
    loop {
        let seen = flood_seconds(&vigil.output());
        if seen.len() >= n {
            return seen;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {n} flood seconds after {within:?}:\n{}",
            seen.len(),
            vigil.output()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_flooding_guest_is_throttled_and_released_at_run_time() {
    let dir = scratch("throttle");
    let sock = dir.join("api.sock");
    let disk = dir.join("data.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let vigil = Vigil::spawn(&["run", "--api-sock", sock.to_str().unwrap()]);
    wait_for(&sock, TIMEOUT);
    ok(
        &sock,
        "PUT",
        "/boot-source",
        json!({"kernel_image_path": guest(), "boot_args": "test=flood flood_s=12"}),
    );
    ok(
        &sock,
        "PUT",
        "/machine-config",
        json!({"vcpu_count": 1, "mem_size_mib": 64}),
    );
    ok(
        &sock,
        "PUT",
        "/drives/data",
        json!({"drive_id": "data", "path_on_host": disk, "is_root_device": false}),
    );
    let limit = |bucket: &str, size: u64, refill_time: u64| json!({"drive_id": "data", "rate_limiter": {bucket: {"size": size, "refill_time": refill_time}}});
    refused(
        &sock,
        "PATCH",
        "/drives/data",
        &limit("ops", 100, 1000).to_string(),
        "needs a running VM",
    );
    ok(
        &sock,
        "PUT",
        "/actions",
        json!({"action_type": "InstanceStart"}),
    );

    // Unthrottled, then 100 operations a second: a second wholly after the
    // PATCH (the one after the one it landed in) stays near the limit.
    let seen = flood_until(&vigil, 1, TIMEOUT);
    let baseline = seen[0].1;
    ok(&sock, "PATCH", "/drives/data", limit("ops", 100, 1000));
    let at = flood_seconds(&vigil.output()).len();
    let seen = flood_until(&vigil, at + 2, Duration::from_secs(5));
    let throttled = seen[at + 1].1;
    eprintln!("flood: {baseline} ops/s unthrottled, {throttled} ops/s at 100 ops/s");
    assert!(
        (30..=150).contains(&throttled),
        "{throttled} ops in second {}: {seen:?}",
        at + 2
    );
    assert!(
        baseline > 3 * throttled,
        "{baseline} then {throttled}: {seen:?}"
    );

    // What a PATCH refuses, and the VM flooding on regardless.
    refused(
        &sock,
        "PATCH",
        "/drives/nope",
        &json!({"drive_id": "nope", "rate_limiter": {}}).to_string(),
        "drive_id \"nope\": the VM has no such drive",
    );
    refused(
        &sock,
        "PATCH",
        "/drives/data",
        r#"{"drive_id": "data", "rate_limiter": {"ops": {"size": "many", "refill_time": 1}}}"#,
        "rate_limiter.ops.size: invalid type",
    );
    refused(
        &sock,
        "PATCH",
        "/drives/data",
        r#"{"drive_id": "data", "rate_limiter": {"ops": {"size": 1}}}"#,
        "rate_limiter.ops: missing field `refill_time`",
    );
    refused(
        &sock,
        "PATCH",
        "/drives/data",
        &limit("ops", 1, 5000).to_string(),
        "rate_limiter.ops: size 1 per refill_time 5000 ms",
    );
    refused(
        &sock,
        "PATCH",
        "/drives/data",
        &json!({"drive_id": "data", "path_on_host": "/tmp/other.img"}).to_string(),
        "path_on_host \"/tmp/other.img\"",
    );
    refused(
        &sock,
        "PATCH",
        "/drives/other",
        r#"{"drive_id": "data"}"#,
        "drive_id \"data\": differs from the id in the path",
    );
    refused(
        &sock,
        "PATCH",
        "/network-interfaces/eth0",
        r#"{"iface_id": "eth0", "rx_rate_limiter": {"ops": {"size": 10, "refill_time": 1000}}}"#,
        "iface_id \"eth0\": the VM has no such network interface",
    );
    assert_eq!(state(&sock), "Running");
    let metrics = request(&sock, "GET", "/vigil/metrics", "").json();
    let blk = metrics["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "blk0")
        .unwrap_or_else(|| panic!("no blk0: {metrics}"));
    assert!(blk["throttled"].as_u64().unwrap() > 0, "{blk}");
    let config = request(&sock, "GET", "/vm/config", "").json();
    assert_eq!(
        config["drives"][0]["rate_limiter"],
        json!({"ops": {"size": 100, "refill_time": 1000}}),
        "{config}"
    );

    // 256 bytes a second instead: one 4 KiB read passes on the full bucket and
    // leaves the next waiting ~15 s for tokens. Lifting the limit must wake it
    // at once, not when the refill is done.
    ok(
        &sock,
        "PATCH",
        "/drives/data",
        json!({"drive_id": "data", "rate_limiter": {
            "ops": {"size": 0, "refill_time": 0},
            "bandwidth": {"size": 256, "refill_time": 1000}}}),
    );
    std::thread::sleep(Duration::from_millis(300));
    let stalled = flood_seconds(&vigil.output()).len();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        flood_seconds(&vigil.output()).len(),
        stalled,
        "the guest went on at 256 bytes a second:\n{}",
        vigil.output()
    );
    ok(&sock, "PATCH", "/drives/data", limit("bandwidth", 0, 0));
    let lifted = Instant::now();
    flood_until(&vigil, stalled + 1, Duration::from_secs(3));
    assert!(lifted.elapsed() < Duration::from_secs(3));
    let at = flood_seconds(&vigil.output()).len();
    let seen = flood_until(&vigil, at + 2, Duration::from_secs(5));
    let released = seen[at + 1].1;
    eprintln!("flood: {released} ops/s once released");
    assert!(released > 3 * throttled, "{released}: {seen:?}");

    let (code, out, err) = vigil.finish();
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.contains("TEST flood PASS ops="), "{out}");
    assert!(out.contains("seconds=12"), "{out}");
}

#[test]
fn a_running_interface_gets_new_rate_limits() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 || !Path::new("/dev/net/tun").exists() {
        eprintln!("SKIP: virtio-net needs root and /dev/net/tun");
        return;
    }
    if let Err(e) = common::tap::in_new_netns(interface_rate_limits) {
        eprintln!("SKIP: cannot make a network namespace: {e}");
    }
}

fn interface_rate_limits() {
    let name = "vgthr0";
    let _tap = match common::tap::TestTap::create(name) {
        Ok(tap) => tap,
        Err(e) => {
            eprintln!("SKIP: cannot create tap {name}: {e}");
            return;
        }
    };
    let dir = scratch("net-throttle");
    let sock = dir.join("api.sock");
    let vigil = Vigil::spawn(&["run", "--api-sock", sock.to_str().unwrap()]);
    wait_for(&sock, TIMEOUT);
    ok(
        &sock,
        "PUT",
        "/boot-source",
        json!({"kernel_image_path": guest(), "boot_args": "test=net-bench"}),
    );
    ok(
        &sock,
        "PUT",
        "/network-interfaces/eth0",
        json!({"iface_id": "eth0", "host_dev_name": name}),
    );
    ok(
        &sock,
        "PUT",
        "/actions",
        json!({"action_type": "InstanceStart"}),
    );
    // 500 frames a second for a while, then no limit, so that net-bench ends.
    ok(
        &sock,
        "PATCH",
        "/network-interfaces/eth0",
        json!({"iface_id": "eth0",
            "tx_rate_limiter": {"ops": {"size": 500, "refill_time": 1000}},
            "rx_rate_limiter": {"bandwidth": {"size": 0, "refill_time": 0}}}),
    );
    refused(
        &sock,
        "PATCH",
        "/network-interfaces/eth0",
        r#"{"iface_id": "eth0", "tx_rate_limiter": {"ops": {"size": 1, "refill_time": 2000}}}"#,
        "tx_rate_limiter.ops: size 1 per refill_time 2000 ms",
    );
    let net0 = || {
        let metrics = request(&sock, "GET", "/vigil/metrics", "").json();
        metrics["devices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["name"] == "net0")
            .unwrap_or_else(|| panic!("no net0: {metrics}"))
            .clone()
    };
    // The bucket starts full: the first second may carry twice the rate.
    std::thread::sleep(Duration::from_millis(1000));
    let before = net0();
    std::thread::sleep(Duration::from_millis(1000));
    let after = net0();
    let sent = after["ops_out"].as_u64().unwrap() - before["ops_out"].as_u64().unwrap();
    eprintln!("net-bench: {sent} frames in a second at 500 frames/s");
    assert!(sent <= 700, "{before} {after}");
    assert!(after["throttled"].as_u64().unwrap() > 0, "{after}");
    let config = request(&sock, "GET", "/vm/config", "").json();
    assert_eq!(
        config["network-interfaces"][0]["tx_rate_limiter"],
        json!({"ops": {"size": 500, "refill_time": 1000}}),
        "{config}"
    );
    ok(
        &sock,
        "PATCH",
        "/network-interfaces/eth0",
        json!({"iface_id": "eth0", "tx_rate_limiter": {"ops": {"size": 0, "refill_time": 0}}}),
    );
    let config = request(&sock, "GET", "/vm/config", "").json();
    assert_eq!(
        config["network-interfaces"][0]["tx_rate_limiter"],
        json!({}),
        "{config}"
    );
    assert_eq!(
        config["network-interfaces"][0]["rx_rate_limiter"],
        json!({}),
        "{config}"
    );
    let (code, out, err) = vigil.finish();
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.contains("TEST net-bench PASS"), "{out}");
}
