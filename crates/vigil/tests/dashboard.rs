//! The web dashboard end to end: `vigil daemon` on 127.0.0.1 with a token, a VM
//! running the embedded test guest (`test=hang`) created through the daemon's API,
//! and the page in headless Chromium (Debian's `chromium`, driven over the DevTools
//! protocol by crates/dashboard/tests/cdp): token prompt, the VM's row Running,
//! chart points arriving, Pause / Resume / Stop clicked in the page and the daemon
//! agreeing. Skipped, with a SKIP line, without a `chromium` binary.

#[path = "../../dashboard/tests/cdp/mod.rs"]
mod cdp;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const TOKEN: &str = "vigil-dashboard-e2e-token-42";

struct Daemon {
    child: Child,
    dir: PathBuf,
    tcp: SocketAddr,
}

impl Daemon {
    fn start() -> Daemon {
        let dir = std::env::temp_dir().join(format!("vigil-dashboard-e2e-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("test dir");
        let token_file = dir.join("token");
        std::fs::write(&token_file, TOKEN).expect("token");
        std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600))
            .expect("chmod");
        let tcp = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port");
        let log = std::fs::File::create(dir.join("daemon.log")).expect("log");
        let child = Command::new(env!("CARGO_BIN_EXE_vigil"))
            .arg("daemon")
            .arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--socket")
            .arg(dir.join("daemon.sock"))
            .arg("--listen-tcp")
            .arg(tcp.to_string())
            .arg("--token-file")
            .arg(&token_file)
            // The test guest's kernel, where the build put it.
            .arg("--allow-vm-path")
            .arg(
                std::path::Path::new(vigil_test_guest::ELF_PATH)
                    .parent()
                    .expect("the guest's folder"),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn vigil daemon");
        let d = Daemon { child, dir, tcp };
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(tcp).is_err() {
            assert!(
                Instant::now() < deadline,
                "vigil daemon did not listen on {tcp}:\n{}",
                d.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    /// One request with the token: (status, body).
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> (u16, String) {
        let Ok(mut s) = TcpStream::connect(self.tcp) else {
            return (0, String::new());
        };
        s.set_read_timeout(Some(Duration::from_secs(60))).ok();
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let sent = write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.tcp,
            body.len()
        );
        let mut raw = Vec::new();
        if sent.is_err() || s.read_to_end(&mut raw).is_err() {
            return (0, String::new());
        }
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        (status, body.to_string())
    }

    fn state(&self, id: &str) -> String {
        let (_, body) = self.call("GET", &format!("/vms/{id}"), None);
        serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v["state"].as_str().map(str::to_string))
            .unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SIGTERM: the daemon stops its VMs, then exits.
        // SAFETY: kill has no memory effects; the pid is our unreaped child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                let _ = std::fs::remove_dir_all(&self.dir);
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn dashboard_shows_and_controls_a_booted_vm() {
    let Some(chromium) = cdp::find_chromium() else {
        eprintln!("SKIP: no chromium binary (apt-get install chromium, or set VIGIL_CHROMIUM)");
        return;
    };
    let d = Daemon::start();
    let config = json!({
        "boot-source": { "kernel_image_path": vigil_test_guest::ELF_PATH, "boot_args": "test=hang" },
        "machine-config": { "vcpu_count": 1, "mem_size_mib": 64 },
        // The idle guest's pages leave RAM: the Saved column shows it.
        "memory-compression": { "idle_ms": 1000 },
    });
    let (status, body) = d.call(
        "POST",
        "/vms",
        Some(json!({ "id": "guest-1", "config": config })),
    );
    assert_eq!(status, 201, "create: {body}\n{}", d.log());

    let mut b = cdp::Browser::launch(&chromium, 1280, 800).expect("launch chromium");
    let secs = Duration::from_secs;
    let ctx = |b: &cdp::Browser, d: &Daemon| {
        format!("page log:\n{}\ndaemon log:\n{}", b.log_text(), d.log())
    };
    b.navigate(&format!("http://{}/", d.tcp))
        .expect("load the page");
    b.wait_for("!document.getElementById('login').hidden", secs(10))
        .expect("token prompt");
    b.type_into("#token", TOKEN).expect("type the token");
    b.press_enter().expect("submit");
    let row = "document.querySelector('tr[data-vm-id=\"guest-1\"]')";
    if let Err(e) = b.wait_for(&format!("{row}?.dataset.state === 'Running'"), secs(15)) {
        panic!("the VM's row, Running: {e}\n{}", ctx(&b, &d));
    }

    // The charts are fed by GET /vms/{id}/metrics, which passes on the VM's own
    // snapshot (`GET /vigil/metrics` on its API socket).
    let (mstatus, mbody) = d.call("GET", "/vms/guest-1/metrics", None);
    assert_eq!(mstatus, 200, "GET /vms/guest-1/metrics: {mbody}");
    if let Err(e) = b.wait_for(
        "window.vigilDashboard.series('guest-1').length >= 3",
        secs(15),
    ) {
        panic!("chart points: {e}\n{}", ctx(&b, &d));
    }
    b.wait_for(
        "Number(document.getElementById('chart-exits').dataset.points) >= 2",
        secs(5),
    )
    .expect("the exits chart drew its points");
    if let Err(e) = b.wait_for(
        &format!("{row}.cells[8].textContent.endsWith('\u{d7})')"),
        secs(15),
    ) {
        panic!(
            "the pager's saving in the Saved column: {e}\n{}",
            ctx(&b, &d)
        );
    }
    if let Ok(png) = b.screenshot() {
        let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-e2e.png");
        std::fs::create_dir_all(env!("CARGO_TARGET_TMPDIR")).ok();
        std::fs::write(&shot, png).ok();
        eprintln!("screenshot: {}", shot.display());
    }

    b.click("#btn-pause").expect("click Pause");
    if let Err(e) = b.wait_for(&format!("{row}.dataset.state === 'Paused'"), secs(10)) {
        panic!("row becomes Paused: {e}\n{}", ctx(&b, &d));
    }
    assert_eq!(d.state("guest-1"), "paused");
    b.wait_for(
        "[...document.querySelectorAll('#events li')].some(li => li.dataset.rule === 'vm_lifecycle' && li.textContent.includes('guest-1 paused'))",
        secs(5),
    )
    .expect("the paused event in the events panel");

    b.click("#btn-resume").expect("click Resume");
    b.wait_for(&format!("{row}.dataset.state === 'Running'"), secs(10))
        .expect("row becomes Running");
    assert_eq!(d.state("guest-1"), "running");

    b.click("#btn-stop").expect("click Stop");
    b.wait_for("document.getElementById('confirm-stop').open", secs(5))
        .expect("confirmation dialog");
    b.click("#confirm-stop-yes").expect("confirm");
    if let Err(e) = b.wait_for(&format!("{row}.dataset.state === 'Stopped'"), secs(20)) {
        panic!("row becomes Stopped: {e}\n{}", ctx(&b, &d));
    }
    assert_eq!(d.state("guest-1"), "stopped");
    let log = b.log_text();
    assert!(
        !log.contains("exception:") && !log.contains("Content Security Policy"),
        "page log:\n{log}"
    );
}
