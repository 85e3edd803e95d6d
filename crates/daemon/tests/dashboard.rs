//! The dashboard as `vigil daemon` serves it, against the stand-in VMM
//! (`examples/fake_vmm.rs`): the page and its assets load without a token on TCP,
//! every data and control endpoint needs it; `GET /vms/{id}/metrics` passes the VM's
//! snapshot through; `GET /events` streams lifecycle events; and the page, in
//! headless Chromium, drives a VM through pause, resume and stop, over plain
//! HTTP on loopback and over TLS (the API over https: crates/daemon/tests/tls.rs).
//! With a real guest: crates/vigil/tests/dashboard.rs.

#[path = "../../dashboard/tests/cdp/mod.rs"]
mod cdp;
mod pki;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vigil_daemon::DaemonConfig;

const TOKEN: &str = "dashboard-test-token-0123456789";

fn fake_vmm() -> PathBuf {
    // target/<triple>/debug/deps/dashboard-HASH -> target/<triple>/debug/examples/fake_vmm
    let exe = std::env::current_exe().expect("current exe");
    exe.parent()
        .and_then(|p| p.parent())
        .map(|p| p.join("examples/fake_vmm"))
        .expect("examples dir")
}

/// A daemon on a Unix socket and 127.0.0.1 (with a token), on its own runtime.
struct Daemon {
    dir: PathBuf,
    socket: PathBuf,
    tcp: SocketAddr,
    rt: tokio::runtime::Runtime,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), vigil_daemon::DaemonError>>>,
}

impl Daemon {
    fn start(name: &str) -> Daemon {
        Self::start_with(name, |_, _| {})
    }

    /// A daemon that `adjust` configures further (given its folder).
    fn start_with(name: &str, adjust: impl FnOnce(&Path, &mut DaemonConfig)) -> Daemon {
        let dir = std::env::temp_dir().join(format!("vigil-dash-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("test dir");
        let token_file = dir.join("token");
        std::fs::write(&token_file, format!("{TOKEN}\n")).expect("token file");
        std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600))
            .expect("chmod token");
        // A free loopback port (released just before the daemon takes it).
        let tcp = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port");
        let socket = dir.join("daemon.sock");
        let mut config = DaemonConfig::new(dir.join("state"), socket.clone(), fake_vmm());
        config.listen_tcp = Some(tcp);
        config.token_file = Some(token_file);
        // The configs name the fake VMM as their kernel: its folder is allowed.
        config.allowed_vm_paths = vec![fake_vmm().parent().expect("examples dir").to_owned()];
        config.start_timeout = Duration::from_secs(10);
        config.stop_timeout = Duration::from_secs(2);
        adjust(&dir, &mut config);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = rt.spawn(vigil_daemon::serve(config, async {
            let _ = rx.await;
        }));
        let deadline = Instant::now() + Duration::from_secs(5);
        while TcpStream::connect(tcp).is_err() {
            assert!(
                Instant::now() < deadline,
                "the daemon did not listen on {tcp}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Daemon {
            dir,
            socket,
            tcp,
            rt,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// One request on the TCP listener: (status, content type, body).
    fn call(
        &self,
        method: &str,
        path: &str,
        token: bool,
        body: Option<Value>,
    ) -> (u16, String, String) {
        let mut s = TcpStream::connect(self.tcp).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(30))).ok();
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let auth = if token {
            format!("Authorization: Bearer {TOKEN}\r\n")
        } else {
            String::new()
        };
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: {}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.tcp,
            body.len()
        )
        .expect("send");
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).expect("read");
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let ctype = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-type:")
                    .map(|v| v.trim().to_string())
            })
            .unwrap_or_default();
        (status, ctype, body.to_string())
    }

    /// One request on the Unix socket (whatever the TCP listener speaks).
    fn unix(&self, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
        let r = self
            .rt
            .block_on(vigil_daemon::client::request(
                &self.socket,
                method,
                path,
                body.map(|b| b.to_string().into_bytes()),
                Duration::from_secs(30),
            ))
            .expect("the daemon's socket");
        (r.status, r.json().unwrap_or_default())
    }

    fn create(&self, id: &str) {
        let (status, body) = self.unix(
            "POST",
            "/vms",
            Some(json!({"id": id, "config": {
                "boot-source": {"kernel_image_path": fake_vmm()},
                "machine-config": {"vcpu_count": 2, "mem_size_mib": 64},
            }})),
        );
        assert_eq!(status, 201, "create {id}: {body}");
    }

    fn state(&self, id: &str) -> String {
        let (_, vm) = self.unix("GET", &format!("/vms/{id}"), None);
        vm["state"].as_str().unwrap_or_default().to_owned()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = self
                .rt
                .block_on(async { tokio::time::timeout(Duration::from_secs(20), task).await });
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// What a lifecycle event says happened ("created", "paused", ...).
fn lifecycle(e: &Value) -> &str {
    if e["rule"] != "vm_lifecycle" {
        return "";
    }
    e["output_fields"]["vm.lifecycle"].as_str().unwrap_or("")
}

/// Reads server-sent events from `GET /events` until lifecycle events for each of
/// `want` have all been seen.
fn read_events(tcp: SocketAddr, want: &[&str], timeout: Duration) -> Vec<Value> {
    let mut s = TcpStream::connect(tcp).expect("connect");
    s.set_read_timeout(Some(Duration::from_millis(500))).ok();
    write!(
        s,
        "GET /events HTTP/1.1\r\nHost: {tcp}\r\nAuthorization: Bearer {TOKEN}\r\nAccept: text/event-stream\r\n\r\n"
    )
    .expect("send");
    let mut r = BufReader::new(s);
    let mut events = Vec::new();
    let deadline = Instant::now() + timeout;
    let mut line = String::new();
    let mut head = true;
    while Instant::now() < deadline {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) => break,
            Ok(_) => {}
            Err(_) => continue, // read timeout: look at the deadline again
        }
        if head {
            if line.starts_with("HTTP/1.1") {
                assert!(line.contains(" 200 "), "GET /events: {line}");
            }
            if line.to_ascii_lowercase().starts_with("content-type:") {
                assert!(line.contains("text/event-stream"), "{line}");
            }
            head = line != "\r\n";
            continue;
        }
        // Chunked encoding: chunk-size lines are hex; SSE lines start with a field.
        if let Some(data) = line.trim_end().strip_prefix("data:") {
            if let Ok(v) = serde_json::from_str::<Value>(data.trim()) {
                events.push(v);
            }
        }
        if want
            .iter()
            .all(|w| events.iter().any(|e| lifecycle(e) == *w))
        {
            return events;
        }
    }
    panic!("events {want:?} not all seen in {timeout:?}; got {events:#?}");
}

/// The tests of this file run one at a time: with a daemon test running beside it,
/// Chromium was seen to die at start (about one run in five on a 2-core machine).
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

#[test]
fn tcp_serves_the_page_freely_and_everything_else_behind_the_token() {
    let _serial = one_at_a_time();
    let d = Daemon::start("auth");
    let (status, ctype, body) = d.call("GET", "/", false, None);
    assert_eq!(status, 200);
    assert!(ctype.starts_with("text/html"), "{ctype}");
    assert!(body.contains("Vigil"));
    for asset in vigil_dashboard::asset_names() {
        assert_eq!(
            d.call("GET", &format!("/assets/{asset}"), false, None).0,
            200,
            "{asset}"
        );
    }
    d.create("vm-a");
    let paused = Some(json!({"state": "Paused"}));
    for (method, path, body) in [
        ("GET", "/vms", None),
        ("GET", "/vms/vm-a", None),
        ("GET", "/vms/vm-a/metrics", None),
        ("GET", "/events", None),
        ("GET", "/metrics", None),
        ("PATCH", "/vms/vm-a", paused.clone()),
        ("POST", "/vms/vm-a/stop", None),
        ("DELETE", "/vms/vm-a", None),
    ] {
        let (status, _, text) = d.call(method, path, false, body);
        assert_eq!(status, 401, "{method} {path} without the token: {text}");
    }
    // Nothing happened to the VM.
    assert_eq!(d.state("vm-a"), "running");

    // With the token: the snapshot comes through from the VM's socket.
    let (status, ctype, body) = d.call("GET", "/vms/vm-a/metrics", true, None);
    assert_eq!(status, 200, "{body}");
    assert!(ctype.starts_with("application/json"));
    let snapshot: Value = serde_json::from_str(&body).expect("json");
    assert!(snapshot["vcpus"].is_array(), "{snapshot}");
    assert_eq!(d.call("GET", "/vms/nope/metrics", true, None).0, 404);

    let (status, _, body) = d.call("PATCH", "/vms/vm-a", true, paused);
    assert_eq!(status, 200, "{body}");
    assert_eq!(d.state("vm-a"), "paused");
    let (status, _, body) = d.call("POST", "/vms/vm-a/stop", true, None);
    assert_eq!(status, 200, "{body}");
    let (status, _, body) = d.call("GET", "/vms/vm-a/metrics", true, None);
    assert_eq!(status, 409, "metrics of a stopped VM: {body}");
    assert!(body.contains("stopped"), "{body}");
}

#[test]
fn events_stream_lifecycle_events_with_falcos_keys() {
    let _serial = one_at_a_time();
    let d = Daemon::start("events");
    d.create("vm-e");
    let tcp = d.tcp;
    let reader = std::thread::spawn(move || {
        read_events(
            tcp,
            &["created", "paused", "resumed", "stopping", "stopped"],
            Duration::from_secs(20),
        )
    });
    // "created" came before the stream opened: it arrives from the history.
    for state in ["Paused", "Resumed"] {
        let (status, _, body) = d.call("PATCH", "/vms/vm-e", true, Some(json!({ "state": state })));
        assert_eq!(status, 200, "{body}");
    }
    assert_eq!(d.call("POST", "/vms/vm-e/stop", true, None).0, 200);
    let events = reader.join().expect("reader");
    let rules: Vec<&str> = events.iter().map(lifecycle).collect();
    let pos = |r: &str| rules.iter().position(|x| *x == r).unwrap_or(usize::MAX);
    assert!(
        pos("created") < pos("paused")
            && pos("paused") < pos("resumed")
            && pos("resumed") < pos("stopped"),
        "order: {rules:?}"
    );
    for e in &events {
        for key in [
            "time",
            "rule",
            "priority",
            "output",
            "output_fields",
            "source",
        ] {
            assert!(e.get(key).is_some(), "no {key} in {e}");
        }
        if e["rule"] == "vm_lifecycle" {
            assert_eq!(e["output_fields"]["vm.id"], "vm-e");
            assert_eq!(e["source"], "host");
            assert_eq!(e["tags"], json!(["vm", "lifecycle"]));
        }
    }
    let stopped = events
        .iter()
        .find(|e| lifecycle(e) == "stopped")
        .expect("stopped");
    assert_eq!(stopped["priority"], "Notice");
    assert_eq!(stopped["output_fields"]["vm.state"], "stopped");
}

#[test]
fn dashboard_in_chromium_drives_a_vm_of_the_daemon() {
    let _serial = one_at_a_time();
    let Some(chromium) = cdp::find_chromium() else {
        eprintln!("SKIP: no chromium binary (apt-get install chromium, or set VIGIL_CHROMIUM)");
        return;
    };
    let d = Daemon::start("browser");
    let url = format!("http://{}/", d.tcp);
    drive_a_vm(&d, &chromium, &url, &[]);
}

/// The same over TLS: the daemon serves a certificate from a test CA, which the
/// browser cannot be told to trust without a certificate database, so (in this
/// test only) it ignores certificate errors.
#[test]
fn dashboard_in_chromium_over_https() {
    let _serial = one_at_a_time();
    let Some(chromium) = cdp::find_chromium() else {
        eprintln!("SKIP: no chromium binary (apt-get install chromium, or set VIGIL_CHROMIUM)");
        return;
    };
    let d = Daemon::start_with("browser-tls", |dir, config| {
        let server = pki::Ca::new(&dir.join("pki"), "ca").server("server");
        config.tls = Some(vigil_daemon::tls::ApiTls {
            cert: server.cert,
            key: server.key,
            client_ca: None,
        });
    });
    let url = format!("https://{}/", d.tcp);
    drive_a_vm(&d, &chromium, &url, &["--ignore-certificate-errors"]);
}

/// Loads the dashboard at `url`, logs in with the token, and pauses, resumes and
/// stops a VM of the daemon through the page.
fn drive_a_vm(d: &Daemon, chromium: &Path, url: &str, flags: &[&str]) {
    d.create("vm-b");
    let mut b = cdp::Browser::launch_with(chromium, 1280, 800, flags).expect("launch chromium");
    let secs = Duration::from_secs;
    b.navigate(url).expect("load the page");
    b.wait_for("!document.getElementById('login').hidden", secs(10))
        .expect("token prompt");
    b.type_into("#token", TOKEN).expect("type the token");
    b.press_enter().expect("submit");
    let row = "document.querySelector('tr[data-vm-id=\"vm-b\"]')";
    b.wait_for(&format!("{row}?.dataset.state === 'Running'"), secs(10))
        .expect("the VM's row, Running");
    b.wait_for("window.vigilDashboard.series('vm-b').length >= 3", secs(10))
        .expect("chart points from the daemon's metrics");
    b.wait_for(
        "[...document.querySelectorAll('#events li')].some(li => li.dataset.rule === 'vm_lifecycle' && li.textContent.includes('vm-b created'))",
        secs(5),
    )
    .expect("the created event");

    b.click("#btn-pause").expect("click Pause");
    b.wait_for(&format!("{row}.dataset.state === 'Paused'"), secs(5))
        .expect("row becomes Paused");
    assert_eq!(d.state("vm-b"), "paused");
    b.wait_for(
        "[...document.querySelectorAll('#events li')].some(li => li.dataset.rule === 'vm_lifecycle' && li.textContent.includes('vm-b paused'))",
        secs(5),
    )
    .expect("the paused event");
    b.click("#btn-resume").expect("click Resume");
    b.wait_for(&format!("{row}.dataset.state === 'Running'"), secs(5))
        .expect("row becomes Running");
    assert_eq!(d.state("vm-b"), "running");
    b.click("#btn-stop").expect("click Stop");
    b.wait_for("document.getElementById('confirm-stop').open", secs(5))
        .expect("confirmation dialog");
    b.click("#confirm-stop-yes").expect("confirm");
    b.wait_for(&format!("{row}.dataset.state === 'Stopped'"), secs(10))
        .expect("row becomes Stopped");
    assert_eq!(d.state("vm-b"), "stopped");
    let log = b.log_text();
    assert!(
        !log.contains("exception:") && !log.contains("Content Security Policy"),
        "page log:\n{log}"
    );
}
