//! The daemon against a stand-in VMM (`examples/fake_vmm.rs`): creation, crashes,
//! failed starts, timeouts, pause/resume, stop, destroy, metrics with a slow VM,
//! shutdown. The end-to-end tests with real VMs are in crates/vigil/tests/daemon.rs.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vigil_daemon::client::{request, Response};
use vigil_daemon::DaemonConfig;

/// A VM configuration the daemon accepts, whose boot arguments tell the fake VMM
/// how to behave (its kernel: the fake itself, any readable file does).
fn fake_config(vcpus: u32, memory_mib: u64, fake: &Value) -> Value {
    json!({
        "boot-source": {"kernel_image_path": fake_vmm(), "boot_args": fake.to_string()},
        "machine-config": {"vcpu_count": vcpus, "mem_size_mib": memory_mib},
    })
}

fn fake_vmm() -> PathBuf {
    // target/<triple>/debug/deps/supervise-HASH -> target/<triple>/debug/examples/fake_vmm
    let exe = std::env::current_exe().unwrap();
    let fake = exe
        .parent()
        .unwrap()
        .parent()
        .unwrap()
        .join("examples/fake_vmm");
    assert!(
        fake.is_file(),
        "{} is missing: run `cargo test -p vigil-daemon` (which builds the examples), or `cargo build -p vigil-daemon --example fake_vmm` first",
        fake.display()
    );
    fake
}

struct Daemon {
    dir: PathBuf,
    socket: PathBuf,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), vigil_daemon::DaemonError>>>,
}

impl Daemon {
    async fn start(name: &str, adjust: impl FnOnce(&mut DaemonConfig)) -> Daemon {
        let dir = std::env::temp_dir().join(format!("vigil-daemon-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("daemon.sock");
        let mut config = DaemonConfig::new(dir.join("state"), socket.clone(), fake_vmm());
        // The configs name the fake VMM as their kernel: its folder is allowed.
        config.allowed_vm_paths = vec![fake_vmm().parent().unwrap().to_owned()];
        config.start_timeout = Duration::from_secs(10);
        config.stop_timeout = Duration::from_secs(2);
        adjust(&mut config);
        let (tx, rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(vigil_daemon::serve(config, async {
            let _ = rx.await;
        }));
        let deadline = Instant::now() + Duration::from_secs(5);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "the daemon did not listen");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Daemon {
            dir,
            socket,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Response {
        request(
            &self.socket,
            method,
            path,
            body.map(|b| b.to_string().into_bytes()),
            Duration::from_secs(30),
        )
        .await
        .unwrap()
    }

    async fn create(&self, id: &str, fake: Value) -> Response {
        self.call(
            "POST",
            "/vms",
            Some(json!({"id": id, "config": fake_config(1, 32, &fake)})),
        )
        .await
    }

    async fn stop(mut self) {
        self.shutdown.take().unwrap().send(()).unwrap();
        self.task.take().unwrap().await.unwrap().unwrap();
        assert!(!self.socket.exists(), "the socket was not removed");
        std::fs::remove_dir_all(&self.dir).unwrap();
    }
}

fn alive(pid: u64) -> bool {
    // A zombie still has a /proc entry: look at its state.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

fn pid_of(r: &Response) -> u64 {
    r.json().unwrap()["pid"].as_u64().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_with_a_running_vm() {
    let d = Daemon::start("life", |_| {}).await;
    let r = d.create("vm-1", json!({})).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let info = r.json().unwrap();
    assert_eq!(info["state"], "running");
    assert_eq!(info["vcpus"], 1);
    assert_eq!(info["memory_mib"], 32);
    let pid = pid_of(&r);
    assert!(alive(pid));
    assert!(Path::new(info["api_socket"].as_str().unwrap()).exists());

    // Duplicates are refused.
    let r = d.create("vm-1", json!({})).await;
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(r.fault_message().contains("\"vm-1\" already exists"));

    let r = d.call("GET", "/vms", None).await;
    assert_eq!(r.json().unwrap().as_array().unwrap().len(), 1);

    let r = d
        .call("PATCH", "/vms/vm-1", Some(json!({"state": "Paused"})))
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json().unwrap()["state"], "paused");
    let r = d.call("GET", "/vms/vm-1", None).await;
    assert_eq!(r.json().unwrap()["state"], "paused");
    assert!(r.json().unwrap()["config"]["boot-source"]["boot_args"].is_string());
    let r = d
        .call("PATCH", "/vms/vm-1", Some(json!({"state": "Frozen"})))
        .await;
    assert_eq!(r.status, 400);
    assert!(r.fault_message().contains("\"Frozen\""), "{}", r.text());
    let r = d
        .call("PATCH", "/vms/vm-1", Some(json!({"state": "Resumed"})))
        .await;
    assert_eq!(r.json().unwrap()["state"], "running");

    let r = d
        .call("POST", "/vms/vm-1/stop", Some(json!({"timeout_s": 0})))
        .await;
    assert_eq!(r.status, 400);
    assert!(r.fault_message().contains("timeout_s 0"), "{}", r.text());
    let r = d.call("POST", "/vms/vm-1/stop", None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let info = r.json().unwrap();
    assert_eq!(info["state"], "stopped");
    assert_eq!(info["exit"]["code"], 143);
    assert!(info["pid"].is_null());
    assert!(!alive(pid));
    // Stopping again is harmless; pausing a stopped VM is not possible.
    assert_eq!(d.call("POST", "/vms/vm-1/stop", None).await.status, 200);
    let r = d
        .call("PATCH", "/vms/vm-1", Some(json!({"state": "Paused"})))
        .await;
    assert_eq!(r.status, 409);
    assert!(r.fault_message().contains("is stopped"), "{}", r.text());

    let r = d.call("DELETE", "/vms/vm-1", None).await;
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(d.call("GET", "/vms/vm-1", None).await.status, 404);
    assert!(!d.dir.join("state/vms/vm-1").exists());
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_is_reported_not_restarted() {
    let d = Daemon::start("crash", |_| {}).await;
    let r = d.create("c", json!({"exit": 3})).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let info = r.json().unwrap();
    assert_eq!(info["state"], "crashed", "{info}");
    assert_eq!(info["exit"]["code"], 3);
    assert!(info["stderr_tail"]
        .as_str()
        .unwrap()
        .contains("fake: exiting 3"));
    assert!(info["console_tail"]
        .as_str()
        .unwrap()
        .contains("fake console line"));
    // It stays crashed, and the daemon keeps serving.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = d.call("GET", "/vms/c", None).await;
    assert_eq!(r.json().unwrap()["state"], "crashed");
    assert!(d.dir.join("state/vms/c/exit.json").exists());
    assert_eq!(d.call("GET", "/health", None).await.status, 200);
    // Its id stays taken until it is destroyed.
    assert_eq!(d.create("c", json!({})).await.status, 409);
    assert_eq!(d.call("DELETE", "/vms/c", None).await.status, 204);
    assert_eq!(d.create("c", json!({})).await.status, 201);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_config_is_an_error_and_leaves_nothing() {
    let d = Daemon::start("refused", |_| {}).await;
    let r = d.create("bad", json!({"exit": 1})).await;
    assert_eq!(r.status, 400, "{}", r.text());
    let m = r.fault_message();
    assert!(
        m.contains("failed to start") && m.contains("fake: exiting 1"),
        "{m}"
    );
    assert_eq!(d.call("GET", "/vms/bad", None).await.status, 404);
    assert!(!d.dir.join("state/vms/bad").exists());
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_config_is_refused_before_anything_is_spawned() {
    let d = Daemon::start("invalid", |_| {}).await;
    let mut config = fake_config(1, 32, &json!({}));
    // Files that are not there, in a folder VMs may name files in.
    let allowed = fake_vmm().parent().unwrap().to_owned();
    let vmlinux = allowed.join("nonexistent-vmlinux");
    let disk = allowed.join("nonexistent.img");
    for (edit, want) in [
        (
            json!({"machine-config": {"vcpu_count": 0, "mem_size_mib": 32}}),
            "config: machine-config: vcpu_count 0: a VM needs at least one vCPU".to_owned(),
        ),
        (
            json!({"boot-source": {"kernel_image_path": vmlinux}}),
            format!(
                "config: boot-source: kernel_image_path {:?}: cannot read it",
                vmlinux.display().to_string()
            ),
        ),
        (
            json!({"drives": [{"drive_id": "root", "is_root_device": true, "path_on_host": disk}]}),
            format!(
                "config: drives[\"root\"]: path_on_host {:?}: cannot open it for writing",
                disk.display().to_string()
            ),
        ),
        (
            json!({"mmds-config": {"network_interfaces": ["eth7"]}}),
            "config: mmds-config: network_interfaces \"eth7\": the VM has no network interface with this id".to_owned(),
        ),
    ] {
        let mut bad = config.clone();
        for (k, v) in edit.as_object().unwrap() {
            bad[k] = v.clone();
        }
        let r = d
            .call("POST", "/vms", Some(json!({"id": "bad", "config": bad})))
            .await;
        assert_eq!(r.status, 400, "{edit}: {}", r.text());
        let m = r.fault_message();
        assert!(m.starts_with(&want), "{edit}: {m}");
        assert!(!d.dir.join("state/vms/bad").exists(), "{edit}");
    }
    assert_eq!(d.call("GET", "/vms", None).await.json().unwrap(), json!([]));
    // The same config, valid, is created.
    config["machine-config"]["vcpu_count"] = json!(2);
    let r = d
        .call(
            "POST",
            "/vms",
            Some(json!({"id": "good", "config": config})),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vm_that_never_answers_times_out_and_is_killed() {
    let d = Daemon::start("timeout", |c| {
        c.start_timeout = Duration::from_millis(300);
        c.stop_timeout = Duration::from_millis(300);
    })
    .await;
    let r = d
        .create("mute", json!({"no_socket": true, "ignore_sigterm": true}))
        .await;
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(r.fault_message().contains("did not report itself running"));
    assert_eq!(d.call("GET", "/vms", None).await.json().unwrap(), json!([]));
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_name_the_field() {
    let d = Daemon::start("bad", |_| {}).await;
    let cases = [
        (json!({"id": "a/b", "config": {}}), "'/'"),
        (json!({"id": "", "config": {}}), "id is empty"),
        (json!({"config": {}}), "missing field `id`"),
        (json!({"id": "x"}), "missing field `config`"),
        (
            json!({"id": "x", "config": {}, "extra": 1}),
            "unknown field `extra`",
        ),
        (json!({"id": "x", "config": [1]}), "not an array"),
        (json!({"id": 5, "config": {}}), "invalid type: integer `5`"),
    ];
    for (body, expected) in cases {
        let r = d.call("POST", "/vms", Some(body.clone())).await;
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        let m = r.fault_message();
        if expected == "not an array" {
            assert!(
                m.contains("config must be a JSON object") && m.contains("an array"),
                "{m}"
            );
        } else {
            assert!(m.contains(expected), "{body}: {m}");
        }
    }
    let r = request(
        &d.socket,
        "POST",
        "/vms",
        Some(b"{not json".to_vec()),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    assert_eq!(r.status, 400);
    assert!(r.fault_message().contains("POST /vms"));
    let r = d.call("GET", "/nothing", None).await;
    assert_eq!(r.status, 404);
    assert!(r.fault_message().contains("GET /nothing"));
    let r = d.call("PUT", "/vms", None).await;
    assert_eq!(r.status, 405);
    assert_eq!(d.call("GET", "/vms/absent", None).await.status, 404);
    assert_eq!(d.call("DELETE", "/vms/absent", None).await.status, 404);
    assert_eq!(d.call("POST", "/vms/absent/stop", None).await.status, 404);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_vm_does_not_hold_up_metrics() {
    let d = Daemon::start("metrics", |c| c.scrape_timeout = Duration::from_millis(300)).await;
    assert_eq!(d.create("fast", json!({})).await.status, 201);
    assert_eq!(
        d.create("slow", json!({"metrics_delay_ms": 5000}))
            .await
            .status,
        201
    );
    assert_eq!(d.create("gone", json!({"exit": 0})).await.status, 201);
    let t = Instant::now();
    let r = d.call("GET", "/metrics", None).await;
    let took = t.elapsed();
    assert!(took < Duration::from_secs(2), "metrics took {took:?}");
    let text = r.text();
    assert!(text.contains("vigil_vm_scrape_ok{vm=\"fast\"} 1"), "{text}");
    assert!(text.contains("vigil_vm_scrape_ok{vm=\"slow\"} 0"), "{text}");
    assert!(
        text.contains("vigil_vm_info{vm=\"gone\",state=\"exited\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("vigil_daemon_vms{state=\"running\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("vigil_vm_configured_memory_bytes{vm=\"fast\"} 33554432"),
        "{text}"
    );
    // The VM's own snapshot, rendered by vigil-metrics, and the host.
    assert!(
        text.contains("vigil_vm_uptime_seconds{vm=\"fast\"} 1"),
        "{text}"
    );
    assert!(
        !text.contains("vigil_vm_uptime_seconds{vm=\"slow\"}"),
        "{text}"
    );
    assert!(
        text.contains("vigil_host_load_average{window=\"1m\"}"),
        "{text}"
    );
    // Each family once.
    let mut types: Vec<&str> = text.lines().filter(|l| l.starts_with("# TYPE ")).collect();
    let n = types.len();
    types.sort();
    types.dedup();
    assert_eq!(types.len(), n, "a family appears twice:\n{text}");
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_stops_every_vm_and_a_second_daemon_is_refused() {
    let d = Daemon::start("shutdown", |c| c.stop_timeout = Duration::from_millis(500)).await;
    let a = pid_of(&d.create("a", json!({})).await);
    let b = pid_of(&d.create("b", json!({"ignore_sigterm": true})).await);
    // Another daemon on the same socket, or the same state folder, is refused.
    let mut other = DaemonConfig::new(d.dir.join("state2"), d.socket.clone(), fake_vmm());
    other.stop_timeout = Duration::from_secs(1);
    let e = vigil_daemon::serve(other, async {}).await.unwrap_err();
    assert!(
        format!("{e:#}").contains("another daemon is listening"),
        "{e:#}"
    );
    let other = DaemonConfig::new(d.dir.join("state"), d.dir.join("other.sock"), fake_vmm());
    let e = vigil_daemon::serve(other, async {}).await.unwrap_err();
    assert!(
        format!("{e:#}").contains("another vigil daemon uses it"),
        "{e:#}"
    );
    let t = Instant::now();
    d.stop().await;
    assert!(t.elapsed() < Duration::from_secs(5));
    assert!(!alive(a) && !alive(b), "VMs survived the daemon");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_socket_is_replaced() {
    let dir = std::env::temp_dir().join(format!("vigil-daemon-stale-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("daemon.sock");
    drop(std::os::unix::net::UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());
    let config = DaemonConfig::new(dir.join("state"), socket.clone(), fake_vmm());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(vigil_daemon::serve(config, async {
        let _ = rx.await;
    }));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = request(&socket, "GET", "/health", None, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(r.status, 200);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777,
        0o600
    );
    tx.send(()).unwrap();
    task.await.unwrap().unwrap();
    // A path that is not a socket is never removed.
    std::fs::write(&socket, "x").unwrap();
    let config = DaemonConfig::new(dir.join("state"), socket.clone(), fake_vmm());
    let e = vigil_daemon::serve(config, async {}).await.unwrap_err();
    assert!(format!("{e:#}").contains("is not a socket"));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_socket_is_the_users_alone_or_its_groups() {
    use std::os::unix::fs::MetadataExt;
    let d = Daemon::start("mode", |_| {}).await;
    // Once it answers, the socket is set up.
    assert_eq!(d.call("GET", "/health", None).await.status, 200);
    let meta = std::fs::metadata(&d.socket).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o600);
    d.stop().await;

    // Root may hand it to any group; another user to one of its own.
    // SAFETY: geteuid and getegid cannot fail and touch no memory.
    let gid = if unsafe { libc::geteuid() } == 0 {
        4242
    } else {
        // SAFETY: as above.
        unsafe { libc::getegid() }
    };
    let d = Daemon::start("group", |c| c.socket_group = Some(gid)).await;
    assert_eq!(d.call("GET", "/health", None).await.status, 200);
    let meta = std::fs::metadata(&d.socket).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o660);
    assert_eq!(meta.gid(), gid);
    d.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_files_outside_the_allowed_folders_are_refused() {
    let images = std::env::temp_dir().join(format!("vigil-daemon-images-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&images);
    std::fs::create_dir_all(&images).unwrap();
    std::fs::write(images.join("disk.img"), vec![0u8; 1 << 20]).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", images.join("escape.img")).unwrap();
    let allowed = images.clone();
    let d = Daemon::start("paths", move |c| c.allowed_vm_paths.push(allowed)).await;
    let with_disk = |disk: &Path| {
        let mut config = fake_config(1, 32, &json!({}));
        config["drives"] =
            json!([{"drive_id": "data", "is_root_device": false, "path_on_host": disk}]);
        config
    };
    let shadow = Path::new("/etc/shadow").to_owned();
    let refused = [
        (
            shadow.clone(),
            "config: drives[\"data\"].path_on_host \"/etc/shadow\": outside the VM's folder"
                .to_owned(),
        ),
        (
            shadow,
            format!("{}): a VM may name only files there", images.display()),
        ),
        (
            images.join("escape.img"),
            "(it leads to /etc/passwd)".to_owned(),
        ),
        (
            images.join("../../etc/shadow"),
            "must not contain \"..\"".to_owned(),
        ),
    ];
    for (disk, want) in refused {
        let r = d
            .call(
                "POST",
                "/vms",
                Some(json!({"id": "bad", "config": with_disk(&disk)})),
            )
            .await;
        assert_eq!(r.status, 400, "{}: {}", disk.display(), r.text());
        assert!(r.fault_message().contains(&want), "{}", r.fault_message());
        // Nothing was spawned: no process, no folder, no record.
        assert!(!d.dir.join("state/vms/bad").exists());
        assert_eq!(d.call("GET", "/vms", None).await.json().unwrap(), json!([]));
    }
    // A VM arriving by migration names its files too.
    let r = d
        .call(
            "POST",
            "/vms/bad/receive",
            Some(json!({"config": with_disk(Path::new("/etc/shadow"))})),
        )
        .await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.fault_message().contains("/etc/shadow"), "{}", r.text());
    assert!(!d.dir.join("state/vms/bad").exists());

    // An allowed disk, and a socket the VMM makes in the VM's own folder.
    let mut config = with_disk(&images.join("disk.img"));
    config["vsock"] = json!({"guest_cid": 3, "uds_path": d.dir.join("state/vms/ok/vsock.sock")});
    let r = d
        .call("POST", "/vms", Some(json!({"id": "ok", "config": config})))
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json().unwrap()["state"], "running");
    // But not over the daemon's own files there.
    let mut config = fake_config(1, 32, &json!({}));
    config["vsock"] = json!({"guest_cid": 3, "uds_path": d.dir.join("state/vms/ok2/exit.json")});
    let r = d
        .call("POST", "/vms", Some(json!({"id": "ok2", "config": config})))
        .await;
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(
        r.fault_message().contains("the daemon's own file"),
        "{}",
        r.text()
    );
    d.stop().await;
    std::fs::remove_dir_all(&images).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooded_console_stays_within_its_limit() {
    let limits = vigil_daemon::supervisor::LogLimits {
        max_bytes: 8192,
        keep: 2,
    };
    let d = Daemon::start("flood", |c| c.vm_logs = limits).await;
    let r = d.create("chatty", json!({"console_flood": true})).await;
    assert_eq!(r.status, 201, "{}", r.text());
    let console = d.dir.join("state/vms/chatty/console.log");
    let rotated = |k| vigil_daemon::supervisor::rotated(&console, k);
    // Let it write a good many limits' worth.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !rotated(2).exists() || std::fs::metadata(rotated(2)).unwrap().len() == 0 {
        assert!(Instant::now() < deadline, "console.log.2 never appeared");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let r = d.call("POST", "/vms/chatty/stop", None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let vm = r.json().unwrap();

    let files = [rotated(2), rotated(1), console.clone()];
    for f in &files {
        let len = std::fs::metadata(f).unwrap().len();
        assert!(len <= 8192, "{}: {len} bytes", f.display());
    }
    assert!(!rotated(3).exists());
    // What is kept is the end of the console, whole lines in order: numbered
    // lines with nothing missing between the files.
    let kept: String = files
        .iter()
        .map(|f| std::fs::read_to_string(f).unwrap())
        .collect();
    let numbers: Vec<u64> = kept
        .lines()
        .map(|l| l.strip_prefix("fake flood line ").unwrap().parse().unwrap())
        .collect();
    assert!(
        numbers.windows(2).all(|w| w[1] == w[0] + 1),
        "a gap in the kept lines"
    );
    let last = *numbers.last().unwrap();
    // Far more went through than the files hold (about 1200 of these lines).
    assert!(last > 10_000, "only {last} lines written");
    // The record and exit.json end with the console's last line.
    let tail = vm["console_tail"].as_str().unwrap();
    assert!(
        tail.ends_with(&format!("fake flood line {last}\n")),
        "{tail}"
    );
    assert!(tail.len() <= 4096);
    let exit: Value = serde_json::from_str(
        &std::fs::read_to_string(d.dir.join("state/vms/chatty/exit.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(exit["console_tail"], vm["console_tail"]);
    d.stop().await;
}
