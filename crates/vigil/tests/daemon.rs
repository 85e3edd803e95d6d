//! `vigil daemon` and `vigil ctl` end to end, with real VMs (the embedded test guest):
//! the life of a VM through the CLI and through raw HTTP, a crashing guest, 20 VMs at
//! once, 100 create/destroy cycles that leak nothing, the TCP listener's token, its
//! TLS (`vigil ctl --url https://...`, mutual TLS, plain HTTP refused off loopback),
//! and a clean SIGTERM.

mod common;
#[path = "../../daemon/tests/pki/mod.rs"]
mod pki;

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::daemon::{
    free_loopback_addr, http_exchange, http_unix, is_root, tcp_args, wait_for_state, Daemon,
    CTL_TIMEOUT,
};
use common::run;
use serde_json::{json, Value};

fn process_gone(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| s.contains(") Z "))
}

#[test]
fn ctl_lifecycle() {
    let d = Daemon::start("ctl", &[]);
    let hang = d.config_file("hang");
    let r = d.ctl_ok(&["create", "web-1", "--config", hang.to_str().unwrap()]);
    let header = r.stdout.lines().next().unwrap();
    for column in ["ID", "STATE", "PID", "VCPUS", "MEMORY", "UPTIME"] {
        assert!(header.contains(column), "{r}");
    }
    assert!(
        r.stdout.contains("web-1") && r.stdout.contains("running") && r.stdout.contains("32 MiB"),
        "{r}"
    );

    let r = d.ctl_ok(&["list"]);
    let row = r.stdout.lines().nth(1).unwrap();
    assert_eq!(
        row.find("running"),
        header.find("STATE"),
        "columns align:\n{}",
        r.stdout
    );

    let r = d.ctl_ok(&["--json", "inspect", "web-1"]);
    let vm: Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(vm["state"], "running");
    assert_eq!(vm["config"]["machine-config"]["mem_size_mib"], 32);
    let pid = vm["pid"].as_u64().unwrap();
    let vm_socket = PathBuf::from(vm["api_socket"].as_str().unwrap());

    assert!(d.ctl_ok(&["pause", "web-1"]).stdout.contains("paused"));
    // The VM's own API agrees.
    let (_, info) = http_unix(&vm_socket, "GET", "/", None, None);
    assert!(info.contains("\"Paused\""), "{info}");
    assert!(d.ctl_ok(&["resume", "web-1"]).stdout.contains("running"));
    let (_, info) = http_unix(&vm_socket, "GET", "/", None, None);
    assert!(info.contains("\"Running\""), "{info}");

    let r = d.ctl_ok(&["stop", "web-1", "--timeout", "5"]);
    assert!(
        r.stdout.contains("stopped") && r.stdout.contains("status 143"),
        "{r}"
    );
    assert!(process_gone(pid));
    let r = d.ctl(&["pause", "web-1"]);
    assert_eq!(r.code, Some(1));
    assert!(r.stderr.contains("is stopped"), "{r}");
    assert!(d
        .ctl_ok(&["destroy", "web-1"])
        .stdout
        .contains("destroyed web-1"));
    let r = d.ctl_ok(&["--json", "list"]);
    assert_eq!(serde_json::from_str::<Value>(&r.stdout).unwrap(), json!([]));

    // Errors name what is at fault.
    let r = d.ctl(&["inspect", "nope"]);
    assert_eq!(r.code, Some(1));
    assert!(r.stderr.contains("no VM with id \"nope\""), "{r}");
    let r = d.ctl(&["create", "a/b", "--config", hang.to_str().unwrap()]);
    assert!(r.stderr.contains("id \"a/b\" contains '/'"), "{r}");
    let r = d.ctl(&["create", "x", "--config", "/nonexistent.json"]);
    assert!(r.stderr.contains("--config /nonexistent.json"), "{r}");
    let missing = d.dir.join("missing.json");
    std::fs::write(
        &missing,
        json!({"machine-config": {"vcpu_count": 1, "mem_size_mib": 32}}).to_string(),
    )
    .unwrap();
    // Checked as `vigil run` checks it, before anything is spawned.
    let r = d.ctl(&["create", "x", "--config", missing.to_str().unwrap()]);
    assert_eq!(r.code, Some(1));
    assert!(
        r.stderr
            .contains("HTTP 400): config: boot-source: missing (a VM needs a kernel_image_path)"),
        "{r}"
    );
    let r = run(
        &["ctl", "--socket", "/nonexistent/d.sock", "list"],
        CTL_TIMEOUT,
    );
    assert_eq!(r.code, Some(1));
    assert!(
        r.stderr
            .contains("no daemon at /nonexistent/d.sock: start one with `vigil daemon`"),
        "{r}"
    );
}

#[test]
fn raw_http_lifecycle() {
    let d = Daemon::start("http", &[]);
    let vm = d.create("vm-a", "hang");
    assert_eq!(vm["state"], "running");
    assert_eq!(vm["vcpus"], 1);
    let (status, list) = d.http("GET", "/vms", None);
    assert_eq!(status, 200);
    assert_eq!(list.as_array().unwrap().len(), 1);
    let (status, body) = d.http(
        "POST",
        "/vms",
        Some(json!({"id": "vm-a", "config": d.config("hang")})),
    );
    assert_eq!(status, 409, "{body}");
    let (status, vm) = d.http("PATCH", "/vms/vm-a", Some(json!({"state": "Paused"})));
    assert_eq!((status, vm["state"].as_str()), (200, Some("paused")));
    let (status, vm) = d.http("PATCH", "/vms/vm-a", Some(json!({"state": "Resumed"})));
    assert_eq!((status, vm["state"].as_str()), (200, Some("running")));
    let (status, text) = http_unix(&d.socket, "GET", "/metrics", None, None);
    assert_eq!(status, 200);
    assert!(
        text.contains("vigil_vm_info{vm=\"vm-a\",state=\"running\"} 1"),
        "{text}"
    );
    // The VM's own counters, from its API socket.
    assert!(text.contains("vigil_vm_scrape_ok{vm=\"vm-a\"} 1"), "{text}");
    assert!(
        text.contains("vigil_vcpu_exits_total{vm=\"vm-a\""),
        "{text}"
    );
    assert!(
        text.contains("vigil_vm_memory_guest_bytes{vm=\"vm-a\"} 33554432"),
        "{text}"
    );
    let (status, health) = d.http("GET", "/health", None);
    assert_eq!((status, health["status"].as_str()), (200, Some("ok")));
    let (status, vm) = d.http("POST", "/vms/vm-a/stop", Some(json!({"timeout_s": 5})));
    assert_eq!(
        (status, vm["state"].as_str()),
        (200, Some("stopped")),
        "{vm}"
    );
    let (status, _) = d.http("DELETE", "/vms/vm-a", None);
    assert_eq!(status, 204);
    let (status, body) = d.http("GET", "/vms/vm-a", None);
    assert_eq!(status, 404, "{body}");
    let (status, body) = d.http(
        "PATCH",
        "/vms/vm-a",
        Some(json!({"state": "Paused", "x": 1})),
    );
    assert!(
        status == 400
            && body["fault_message"]
                .as_str()
                .unwrap()
                .contains("unknown field `x`"),
        "{body}"
    );
}

#[test]
fn a_crashed_guest_is_reported_and_not_restarted() {
    let d = Daemon::start("crash", &[]);
    d.create("boom", "triple-fault");
    let vm = wait_for_state(&d, "boom", "crashed");
    assert_eq!(vm["exit"]["code"], 3, "{vm}");
    assert!(vm["pid"].is_null());
    let stderr = vm["stderr_tail"].as_str().unwrap();
    assert!(stderr.contains("triple fault"), "{stderr}");
    assert!(d.dir.join("state/vms/boom/exit.json").is_file());
    // Not restarted: still crashed a while later, with no process of its own.
    std::thread::sleep(Duration::from_millis(500));
    let (_, vm) = d.http("GET", "/vms/boom", None);
    assert_eq!(vm["state"], "crashed");
    assert!(
        children(d.pid()).is_empty(),
        "the daemon has children: {:?}",
        children(d.pid())
    );
    let r = d.ctl_ok(&["list"]);
    assert!(
        r.stdout.contains("crashed") && r.stdout.contains("status 3"),
        "{r}"
    );
    assert!(d.log().contains("not restarted"), "{}", d.log());
    // The daemon keeps serving.
    assert_eq!(d.create("after", "hang")["state"], "running");
}

/// `vigil ctl create --enable-pci`: the VM's disk is found on PCI (the test
/// guest's `pci` scenario passes: ECAM from the MCFG, BAR, an MSI-X vector
/// after a request), and the record says so.
#[test]
fn a_vm_created_with_enable_pci_has_its_devices_on_pci() {
    let d = Daemon::start("pci", &[]);
    let disk = d.dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let mut config = d.config("pci");
    config["drives"] = json!([{"drive_id": "disk", "path_on_host": disk, "is_root_device": false, "is_read_only": false}]);
    let file = d.dir.join("pci.json");
    std::fs::write(&file, config.to_string()).unwrap();
    d.ctl_ok(&[
        "create",
        "pci-1",
        "--config",
        file.to_str().unwrap(),
        "--enable-pci",
    ]);
    let vm = wait_for_state(&d, "pci-1", "exited");
    assert_eq!(vm["enable_pci"], true, "{vm}");
    let console = std::fs::read_to_string(d.dir.join("state/vms/pci-1/console.log")).unwrap();
    assert!(console.contains("TEST pci PASS devices=1:"), "{console}");
}

/// The pids whose parent is `pid` (zombies included).
fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) {
            // pid (comm) state ppid ...
            let after = stat.rsplit_once(')').map(|(_, a)| a).unwrap_or("");
            if after.split_whitespace().nth(1) == Some(&pid.to_string()) {
                out.push(child);
            }
        }
    }
    out
}

#[test]
fn host_files_outside_the_allowed_folders_are_refused() {
    let d = Daemon::start("paths", &[]);
    // /etc/shadow as a disk: refused before anything runs.
    let mut vm = d.config("hang");
    vm["drives"] =
        json!([{"drive_id": "loot", "path_on_host": "/etc/shadow", "is_root_device": false}]);
    let (status, body) = d.http("POST", "/vms", Some(json!({"id": "thief", "config": vm})));
    assert_eq!(status, 400, "{body}");
    let message = body["fault_message"].as_str().unwrap();
    assert!(
        message.starts_with(
            "config: drives[\"loot\"].path_on_host \"/etc/shadow\": outside the VM's folder"
        ),
        "{message}"
    );
    assert!(children(d.pid()).is_empty(), "a VMM was started");
    assert!(!d.dir.join("state/vms/thief").exists());
    // A link in the allowed folder that leads out of it.
    std::os::unix::fs::symlink("/etc/shadow", d.dir.join("innocent.img")).unwrap();
    let mut vm = d.config("hang");
    vm["drives"] = json!([{"drive_id": "loot", "path_on_host": d.dir.join("innocent.img"), "is_root_device": false}]);
    let (status, body) = d.http("POST", "/vms", Some(json!({"id": "thief", "config": vm})));
    assert_eq!(status, 400, "{body}");
    assert!(
        body.to_string().contains("(it leads to /etc/shadow)"),
        "{body}"
    );
    assert!(children(d.pid()).is_empty(), "a VMM was started");
    // A disk in the allowed folder: the guest reads and writes it.
    let disk = d.dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let mut vm = d.config("blk");
    vm["drives"] = json!([{"drive_id": "data", "path_on_host": disk, "is_root_device": false}]);
    let (status, body) = d.http("POST", "/vms", Some(json!({"id": "honest", "config": vm})));
    assert_eq!(status, 201, "{body}\n{}", d.log());
    let vm = wait_for_state(&d, "honest", "exited");
    let console = std::fs::read_to_string(d.dir.join("state/vms/honest/console.log")).unwrap();
    assert!(console.contains("TEST blk PASS"), "{console}\n{vm}");
}

/// The resident memory of process `pid`, KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap()
}

#[test]
fn a_chatty_guest_console_is_rotated_within_its_limit() {
    let d = Daemon::start("logs", &["--vm-log-max-size", "4K", "--vm-log-keep", "2"]);
    // A tick every millisecond, each printed: about 14 KB of console a second.
    d.create("chatty", "counter counter_ms=1");
    let console = d.dir.join("state/vms/chatty/console.log");
    let rotated = |k: u32| {
        let mut name = console.as_os_str().to_owned();
        name.push(format!(".{k}"));
        PathBuf::from(name)
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::metadata(rotated(2)).map_or(true, |m| m.len() == 0) {
        assert!(
            Instant::now() < deadline,
            "console.log.2 never appeared\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let before = rss_kib(d.pid());
    std::thread::sleep(Duration::from_secs(3));
    let after = rss_kib(d.pid());
    let (_, vm) = d.http("POST", "/vms/chatty/stop", Some(json!({"timeout_s": 5})));
    assert_eq!(vm["state"], "stopped", "{vm}");

    let files = [rotated(2), rotated(1), console.clone()];
    for f in &files {
        let len = std::fs::metadata(f).unwrap().len();
        assert!(len <= 4096, "{}: {len} bytes", f.display());
    }
    assert!(!rotated(3).exists());
    // The files hold the end of the console in order, ticks without a gap.
    let kept: String = files
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap())
        .collect();
    // (The stop may have cut the last line short.)
    let whole = &kept[..kept.rfind('\n').unwrap() + 1];
    let ticks: Vec<u64> = whole
        .lines()
        .filter_map(|l| l.strip_prefix("counter: ")?.trim().parse().ok())
        .collect();
    assert!(
        ticks.windows(2).all(|w| w[1] == w[0] + 1),
        "a gap: {ticks:?}"
    );
    let last = *ticks.last().unwrap();
    // The oldest ticks went with the oldest file.
    assert!(ticks[0] > 1, "nothing was dropped: {ticks:?}");
    // The record reports the console's last line, as exit.json does.
    let tail = vm["console_tail"].as_str().unwrap();
    assert!(
        kept.ends_with(tail) && tail.contains(&format!("counter: {last}\n")),
        "{tail}"
    );
    let exit: Value = serde_json::from_str(
        &std::fs::read_to_string(d.dir.join("state/vms/chatty/exit.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(exit["console_tail"], vm["console_tail"]);
    eprintln!(
        "{last} ticks printed, {} kept in 3 files; daemon RSS {before} -> {after} KiB over 3 s of flooding",
        ticks.len()
    );
    assert!(
        after < before + 1024,
        "the daemon grew from {before} to {after} KiB"
    );
}

#[test]
fn twenty_vms_at_once() {
    let d = Daemon::start("twenty", &[]);
    std::thread::scope(|s| {
        for i in 0..20 {
            let d = &d;
            s.spawn(move || d.create(&format!("vm{i:02}"), "hang"));
        }
    });
    let (_, list) = d.http("GET", "/vms", None);
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 20);
    assert!(list.iter().all(|vm| vm["state"] == "running"), "{list:?}");
    assert_eq!(children(d.pid()).len(), 20);
    let (_, text) = http_unix(&d.socket, "GET", "/metrics", None, None);
    assert_eq!(text.matches("vigil_vm_up{vm=").count(), 20);
    assert!(
        text.contains("vigil_daemon_vms{state=\"running\"} 20"),
        "{text}"
    );
    let r = d.ctl_ok(&["list"]);
    assert_eq!(r.stdout.lines().count(), 21);
    std::thread::scope(|s| {
        for i in 0..20 {
            let d = &d;
            s.spawn(move || assert_eq!(d.http("DELETE", &format!("/vms/vm{i:02}"), None).0, 204));
        }
    });
    assert!(children(d.pid()).is_empty());
}

struct Usage {
    fds: usize,
    sockets: usize,
    threads: usize,
    rss_kib: u64,
}

fn usage(pid: u32) -> Usage {
    let fds: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    Usage {
        sockets: fds.iter().filter(|f| f.starts_with("socket:")).count(),
        fds: fds.len(),
        threads: std::fs::read_dir(format!("/proc/{pid}/task"))
            .unwrap()
            .count(),
        rss_kib,
    }
}

#[test]
fn create_destroy_cycles_leak_nothing() {
    let d = Daemon::start("cycles", &[]);
    let cycle = |i: usize| {
        d.create("cycle", "hang");
        if i.is_multiple_of(10) {
            // Exercise the other requests too.
            assert_eq!(
                d.http("PATCH", "/vms/cycle", Some(json!({"state": "Paused"})))
                    .0,
                200
            );
            assert_eq!(http_unix(&d.socket, "GET", "/metrics", None, None).0, 200);
        }
        let (status, body) = d.http("DELETE", "/vms/cycle", None);
        assert_eq!(status, 204, "{body}");
    };
    for i in 0..5 {
        cycle(i);
    }
    // Let the server side of the last connection close.
    std::thread::sleep(Duration::from_millis(200));
    let before = usage(d.pid());
    let start = Instant::now();
    for i in 0..100 {
        cycle(i);
    }
    let took = start.elapsed();
    // Let the runtime's idle blocking threads (if any) wind down.
    std::thread::sleep(Duration::from_millis(200));
    let after = usage(d.pid());
    eprintln!(
        "100 cycles in {took:?}: fds {} -> {}, sockets {} -> {}, threads {} -> {}, RSS {} -> {} KiB",
        before.fds, after.fds, before.sockets, after.sockets, before.threads, after.threads, before.rss_kib, after.rss_kib
    );
    assert_eq!(after.fds, before.fds, "file descriptors leaked");
    assert_eq!(after.sockets, before.sockets, "sockets leaked");
    // The runtime's blocking pool may grow up to its cap (8); anything beyond is a leak.
    assert!(
        after.threads <= before.threads + 8,
        "threads: {} -> {}",
        before.threads,
        after.threads
    );
    assert!(
        after.rss_kib < before.rss_kib + 16 * 1024,
        "RSS grew from {} to {} KiB",
        before.rss_kib,
        after.rss_kib
    );
    assert!(
        children(d.pid()).is_empty(),
        "children left: {:?}",
        children(d.pid())
    );
    let left: Vec<_> = std::fs::read_dir(d.dir.join("state/vms"))
        .unwrap()
        .collect();
    assert!(left.is_empty(), "VM folders left: {left:?}");
}

#[test]
fn tcp_needs_a_token() {
    let dir = std::env::temp_dir().join(format!("vigil-d-tcp-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let state = dir.join("state");
    let sock = dir.join("x.sock");
    let base = [
        "daemon",
        "--state-dir",
        state.to_str().unwrap(),
        "--socket",
        sock.to_str().unwrap(),
    ];
    for addr in ["127.0.0.1:1", "0.0.0.0:1"] {
        let r = run(&[&base[..], &["--listen-tcp", addr]].concat(), CTL_TIMEOUT);
        assert_eq!(r.code, Some(1), "{r}");
        assert!(
            r.stderr
                .contains(&format!("--listen-tcp {addr} needs --token-file")),
            "{r}"
        );
        assert!(!sock.exists());
    }
    let r = run(
        &[&base[..], &["--listen-tcp", "0.0.0.0:1"]].concat(),
        CTL_TIMEOUT,
    );
    assert!(r.stderr.contains("not a loopback address"), "{r}");
    let token_file = dir.join("token");
    std::fs::write(&token_file, "s3cret-s3cret-s3cret\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let r = run(
        &[
            &base[..],
            &[
                "--listen-tcp",
                "127.0.0.1:1",
                "--token-file",
                token_file.to_str().unwrap(),
            ],
        ]
        .concat(),
        CTL_TIMEOUT,
    );
    assert!(r.code == Some(1) && r.stderr.contains("chmod 600"), "{r}");
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();

    let addr = free_loopback_addr();
    let d = Daemon::start("tcp", &tcp_args(&addr, &token_file));
    let tcp = |token: Option<&str>| {
        let deadline = Instant::now() + Duration::from_secs(10);
        let stream = loop {
            match std::net::TcpStream::connect(&addr) {
                Ok(s) => break s,
                Err(e) => assert!(Instant::now() < deadline, "{e}"),
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        http_exchange(stream, "GET", "/vms", None, token)
    };
    let (status, body) = tcp(None);
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("Authorization: Bearer"), "{body}");
    assert_eq!(tcp(Some("s3cret-s3cret-s3creX")).0, 401);
    assert_eq!(tcp(Some("s3cret")).0, 401);
    assert_eq!(tcp(Some("s3cret-s3cret-s3cret")), (200, "[]".into()));
    // The Unix socket needs no token (its file mode guards it).
    assert_eq!(d.http("GET", "/vms", None).0, 200);
    let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    drop(d);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Waits until the daemon's log says `text` (it answers on its socket a moment
/// before it logs that it listens).
fn wait_for_log(d: &Daemon, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !d.log().contains(text) {
        assert!(Instant::now() < deadline, "no {text:?} in:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A token file (mode 0600) in `dir`.
fn token_file(dir: &std::path::Path, token: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("token");
    std::fs::write(&path, format!("{token}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

#[test]
fn ctl_over_https_with_mutual_tls() {
    let scratch = std::env::temp_dir().join(format!("vigil-d-https-pki-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    let ca = pki::Ca::new(&scratch, "ca");
    let server = ca.server("server");
    let client = ca.client("client");
    let token = token_file(&scratch, "https-token-0123456789abcdef");
    let addr = free_loopback_addr();
    let p = |p: &PathBuf| p.to_str().unwrap().to_owned();
    let (cert, key, ca_pem) = (p(&server.cert), p(&server.key), p(&ca.pem));
    let d = Daemon::start(
        "https",
        &[
            &tcp_args(&addr, &token)[..],
            &[
                "--tls-cert",
                &cert,
                "--tls-key",
                &key,
                "--tls-client-ca",
                &ca_pem,
            ],
        ]
        .concat(),
    );
    wait_for_log(
        &d,
        &format!("tcp {addr} (TLS, client certificates, bearer token)"),
    );
    let url = format!("https://{addr}");
    let (client_cert, client_key) = (p(&client.cert), p(&client.key));
    let https = |args: &[&str]| {
        let flags = [
            "ctl",
            "--url",
            &url,
            "--token-file",
            token.to_str().unwrap(),
            "--ca-cert",
            &ca_pem,
            "--client-cert",
            &client_cert,
            "--client-key",
            &client_key,
        ];
        run(&[&flags[..], args].concat(), CTL_TIMEOUT)
    };
    // The same commands as over the socket: a real VM created, listed, inspected,
    // paused, destroyed, all over https.
    let hang = d.config_file("hang");
    let r = https(&["create", "web-1", "--config", hang.to_str().unwrap()]);
    assert_eq!(r.code, Some(0), "{r}\n--- daemon\n{}", d.log());
    let r = https(&["list"]);
    assert!(
        r.code == Some(0) && r.stdout.contains("web-1") && r.stdout.contains("running"),
        "{r}"
    );
    let r = https(&["--json", "inspect", "web-1"]);
    let vm: Value = serde_json::from_str(&r.stdout).unwrap_or_default();
    assert_eq!(vm["config"]["machine-config"]["mem_size_mib"], 32, "{r}");
    assert!(https(&["pause", "web-1"]).stdout.contains("paused"));
    let r = https(&["events"]);
    assert!(r.stdout.contains("vm web-1 paused"), "{r}");
    let r = https(&["destroy", "web-1"]);
    assert!(r.stdout.contains("destroyed web-1"), "{r}");
    assert_eq!(d.http("GET", "/vms", None).1, json!([]));

    // Without the client certificate: refused in the handshake, and told why.
    let r = run(
        &[
            "ctl",
            "--url",
            &url,
            "--token-file",
            token.to_str().unwrap(),
            "--ca-cert",
            &ca_pem,
            "list",
        ],
        CTL_TIMEOUT,
    );
    assert_eq!(r.code, Some(1), "{r}");
    assert!(r.stderr.contains("wants a client certificate"), "{r}");
    // A wrong token: 401 (TLS does not replace it).
    let wrong = scratch.join("wrong");
    std::fs::create_dir_all(&wrong).unwrap();
    let wrong = token_file(&wrong, "not-the-token-0123456789");
    let r = run(
        &[
            "ctl",
            "--url",
            &url,
            "--token-file",
            wrong.to_str().unwrap(),
            "--ca-cert",
            &ca_pem,
            "--client-cert",
            &client_cert,
            "--client-key",
            &client_key,
            "list",
        ],
        CTL_TIMEOUT,
    );
    assert!(r.code == Some(1) && r.stderr.contains("(HTTP 401)"), "{r}");
    // Plain HTTP to the TLS port.
    let r = run(
        &[
            "ctl",
            "--url",
            &format!("http://{addr}"),
            "--token-file",
            token.to_str().unwrap(),
            "list",
        ],
        CTL_TIMEOUT,
    );
    assert!(
        r.code == Some(1) && r.stderr.contains("TLS only: use https://"),
        "{r}"
    );
    // https without a CA to check the daemon with.
    let r = run(
        &[
            "ctl",
            "--url",
            &url,
            "--token-file",
            token.to_str().unwrap(),
            "list",
        ],
        CTL_TIMEOUT,
    );
    assert!(
        r.code == Some(1) && r.stderr.contains("needs --ca-cert"),
        "{r}"
    );
    drop(d);
    std::fs::remove_dir_all(&scratch).unwrap();
}

#[test]
fn tcp_off_loopback_needs_tls_unless_insisted() {
    let scratch =
        std::env::temp_dir().join(format!("vigil-d-insecure-scratch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    std::fs::create_dir_all(&scratch).unwrap();
    let token = token_file(&scratch, "plain-token-0123456789abcdef");
    let port = free_loopback_addr().rsplit_once(':').unwrap().1.to_owned();
    let any = format!("0.0.0.0:{port}");
    let state = scratch.join("state");
    let socket = scratch.join("d.sock");
    let base = [
        "daemon",
        "--state-dir",
        state.to_str().unwrap(),
        "--socket",
        socket.to_str().unwrap(),
    ];
    let r = run(
        &[&base[..], &tcp_args(&any, &token)[..]].concat(),
        CTL_TIMEOUT,
    );
    assert_eq!(r.code, Some(1), "{r}");
    assert!(
        r.stderr
            .contains(&format!("--listen-tcp {any} is not a loopback address"))
            && r.stderr.contains("--tls-cert")
            && r.stderr.contains("--insecure-plain-tcp"),
        "{r}"
    );
    assert!(!socket.exists());
    // Bad certificate files name their flag and path.
    let missing = scratch.join("missing.pem");
    let r = run(
        &[
            &base[..],
            &tcp_args(&any, &token)[..],
            &[
                "--tls-cert",
                missing.to_str().unwrap(),
                "--tls-key",
                token.to_str().unwrap(),
            ],
        ]
        .concat(),
        CTL_TIMEOUT,
    );
    assert!(
        r.code == Some(1)
            && r.stderr
                .contains(&format!("--tls-cert {}: cannot read", missing.display())),
        "{r}"
    );
    let r = run(
        &[&base[..], &["--tls-cert", "x.pem", "--tls-key", "x.key"]].concat(),
        CTL_TIMEOUT,
    );
    assert!(
        r.code == Some(2) && r.stderr.contains("--listen-tcp"),
        "{r}"
    );

    // The operator insists: plain HTTP, with a warning at start.
    let d = Daemon::start(
        "plain",
        &[&tcp_args(&any, &token)[..], &["--insecure-plain-tcp"]].concat(),
    );
    wait_for_log(&d, "serves plain HTTP off loopback (--insecure-plain-tcp)");
    let r = run(
        &[
            "ctl",
            "--url",
            &format!("http://127.0.0.1:{port}"),
            "--token-file",
            token.to_str().unwrap(),
            "list",
        ],
        CTL_TIMEOUT,
    );
    assert_eq!(r.code, Some(0), "{r}");
    drop(d);
    std::fs::remove_dir_all(&scratch).unwrap();
}

#[test]
fn socket_group_opens_the_socket_to_a_group() {
    use std::os::unix::fs::MetadataExt;
    let r = run(
        &[
            "daemon",
            "--socket-group",
            "no-such-group-here",
            "--socket",
            "/nonexistent/x.sock",
        ],
        CTL_TIMEOUT,
    );
    assert!(
        r.code == Some(2)
            && r.stderr
                .contains("\"no-such-group-here\": no such group in /etc/group"),
        "{r}"
    );
    // A gid this test may hand the socket to: any for root, else its own.
    // SAFETY: geteuid and getegid cannot fail and touch no memory.
    let gid = if unsafe { libc::geteuid() } == 0 {
        4242
    } else {
        // SAFETY: as above.
        unsafe { libc::getegid() }
    };
    let d = Daemon::start("group", &["--socket-group", &gid.to_string()]);
    // Once it answers, the socket is set up.
    assert_eq!(d.ctl_ok(&["list"]).code, Some(0));
    let meta = std::fs::metadata(&d.socket).unwrap();
    assert_eq!((meta.mode() & 0o777, meta.gid()), (0o660, gid));
}

#[test]
fn sigterm_stops_the_vms_and_exits_0() {
    let mut d = Daemon::start("term", &[]);
    let a = d.create("a", "hang")["pid"].as_u64().unwrap();
    let b = d.create("b", "hang")["pid"].as_u64().unwrap();
    // A second daemon on the same socket is refused.
    let r = run(
        &[
            "daemon",
            "--state-dir",
            d.dir.join("state2").to_str().unwrap(),
            "--socket",
            d.socket.to_str().unwrap(),
        ],
        CTL_TIMEOUT,
    );
    assert_eq!(r.code, Some(1), "{r}");
    assert!(r.stderr.contains("another daemon is listening"), "{r}");
    let t = Instant::now();
    let status = d.sigterm();
    assert_eq!(status.code(), Some(0), "{}", d.log());
    assert!(t.elapsed() < Duration::from_secs(10));
    assert!(process_gone(a) && process_gone(b));
    assert!(!d.socket.exists());
    let log = d.log();
    assert!(
        log.contains("SIGTERM received") && log.contains("stopping 2 VM(s)"),
        "{log}"
    );
    assert!(
        !log.contains('\u{1b}'),
        "colour codes in a non-terminal log"
    );
}

#[test]
fn vms_do_not_outlive_a_killed_daemon() {
    let mut d = Daemon::start("kill", &[]);
    let pid = d.create("orphan", "hang")["pid"].as_u64().unwrap();
    let mut child = d.child.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    // The parent-death signal (SIGTERM) stops the VM; nothing is left running.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !process_gone(pid) {
        assert!(Instant::now() < deadline, "VM {pid} outlived its daemon");
        std::thread::sleep(Duration::from_millis(20));
    }
    // A new daemon takes the stale socket and the VM's folder over.
    d.spawn(&[]);
    assert_eq!(d.create("orphan", "hang")["state"], "running");
}

/// `Name:` of /proc/PID/status, its values.
fn proc_status(pid: u32, name: &str) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix(name)?
                .strip_prefix(':')
                .map(|v| v.trim().to_owned())
        })
        .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
}

/// (device, inode) of a folder, for comparing roots.
fn dev_ino(path: &std::path::Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).unwrap();
    (m.dev(), m.ino())
}

#[test]
fn vms_run_jailed_as_nobody_in_their_own_root_and_pid_namespace() {
    if !is_root() {
        eprintln!("SKIP: the jailer needs root");
        return;
    }
    use std::os::unix::fs::MetadataExt;
    let d = Daemon::start("jail", &[]);
    let vm = d.create("jailed", "hang");
    let jailer = vm["pid"].as_u64().unwrap() as u32;
    let root = PathBuf::from(vm["jail"].as_str().unwrap());
    assert_eq!(root, d.dir.join("state/jails/vigil/jailed/root"), "{vm}");
    assert_eq!(
        PathBuf::from(vm["api_socket"].as_str().unwrap()),
        root.join("run/api.sock")
    );
    // The pid is the jailer's (unprivileged too); the VMM is its one child.
    assert_eq!(proc_status(jailer, "Uid"), "65534\t65534\t65534\t65534");
    let vmm = children(jailer);
    assert_eq!(vmm.len(), 1, "{vmm:?}");
    let vmm = vmm[0];
    assert_eq!(proc_status(vmm, "Uid"), "65534\t65534\t65534\t65534");
    assert_eq!(proc_status(vmm, "Gid"), "65534\t65534\t65534\t65534");
    // Process 1 of a PID namespace of its own...
    assert_eq!(proc_status(vmm, "NSpid"), format!("{vmm}\t1"));
    assert_ne!(
        std::fs::read_link(format!("/proc/{vmm}/ns/pid")).unwrap(),
        std::fs::read_link("/proc/self/ns/pid").unwrap()
    );
    // ...whose `/` is the jail, holding what its configuration names.
    assert_eq!(
        dev_ino(&PathBuf::from(format!("/proc/{vmm}/root"))),
        dev_ino(&root)
    );
    let inside: Value =
        serde_json::from_slice(&std::fs::read(root.join("config.json")).unwrap()).unwrap();
    assert_eq!(inside["boot-source"]["kernel_image_path"], "/kernel");
    assert_eq!(
        dev_ino(&root.join("kernel")),
        dev_ino(&d.dir.join("guest.elf")),
        "the kernel is hard-linked in"
    );
    // The daemon still talks to it, and stops it through the jailer.
    let (_, info) = http_unix(&root.join("run/api.sock"), "GET", "/", None, None);
    assert!(info.contains("\"Running\""), "{info}");
    let (_, stopped) = d.http("POST", "/vms/jailed/stop", Some(json!({"timeout_s": 5})));
    assert_eq!(stopped["state"], "stopped", "{stopped}");
    assert!(process_gone(vmm.into()) && process_gone(jailer.into()));
    // Destroying it removes the jail (and the VM's folder).
    d.ctl_ok(&["destroy", "jailed"]);
    assert!(!d.dir.join("state/jails/vigil/jailed").exists());
    assert!(!d.dir.join("state/vms/jailed").exists());

    // A writable disk is linked in and handed to the jail's user; the guest
    // writes it.
    let disk = d.dir.join("rw.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let mut config = d.config("blk");
    config["drives"] = json!([{"drive_id": "data", "path_on_host": disk, "is_root_device": false}]);
    let (status, body) = d.http(
        "POST",
        "/vms",
        Some(json!({"id": "disk", "config": config})),
    );
    assert_eq!(status, 201, "{body}\n{}", d.log());
    let vm = wait_for_state(&d, "disk", "exited");
    let console = std::fs::read_to_string(d.dir.join("state/vms/disk/console.log")).unwrap();
    assert!(console.contains("TEST blk PASS"), "{console}\n{vm}");
    assert_eq!(std::fs::metadata(&disk).unwrap().uid(), 65534);
    // An id the jailer cannot take is refused, naming the way out.
    let (status, body) = d.http(
        "POST",
        "/vms",
        Some(json!({"id": "a_b", "config": d.config("hang")})),
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains("--no-jailer"), "{body}");
}

#[test]
fn no_jailer_runs_vms_as_the_daemons_children() {
    let d = Daemon::start("nojail", &["--no-jailer"]);
    let vm = d.create("free", "hang");
    let pid = vm["pid"].as_u64().unwrap() as u32;
    assert!(vm["jail"].is_null(), "{vm}");
    assert_eq!(
        PathBuf::from(vm["api_socket"].as_str().unwrap()),
        d.dir.join("state/vms/free/api.sock")
    );
    assert_eq!(children(d.pid()), [pid], "the VMM is the daemon's child");
    // SAFETY: getuid cannot fail and touches no memory.
    let uid = unsafe { libc::getuid() };
    assert!(proc_status(pid, "Uid").starts_with(&format!("{uid}\t")));
    assert_eq!(
        dev_ino(&PathBuf::from(format!("/proc/{pid}/root"))),
        dev_ino("/".as_ref())
    );
    assert!(!d.dir.join("state/jails").exists());
    assert!(
        d.log().contains("--no-jailer: VMs run unjailed"),
        "{}",
        d.log()
    );
}

#[test]
fn a_daemon_that_is_not_root_refuses_to_jail() {
    if !is_root() {
        eprintln!("SKIP: needs root to start the daemon as another user");
        return;
    }
    let dir = std::env::temp_dir().join(format!("vigil-d-notroot-{}", std::process::id()));
    let out = std::process::Command::new(common::daemon::VIGIL)
        .args(["daemon", "--state-dir"])
        .arg(dir.join("state"))
        .arg("--socket")
        .arg(dir.join("d.sock"))
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("needs root") && stderr.contains("pass --no-jailer"),
        "{stderr}"
    );
    assert!(!dir.exists(), "it must not have started");
}
