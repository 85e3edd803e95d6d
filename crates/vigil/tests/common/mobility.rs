//! For the snapshot and migration tests: a Vigil serving its API, the test
//! guest's `counter` scenario booted through it, and the counts it printed;
//! the same guest under the integrity monitor, tampered with before it moves,
//! and what the monitor says after.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::http::{request, wait_for};
use super::Console;

pub const TIMEOUT: Duration = Duration::from_secs(60);

/// A request that must answer 204.
pub fn ok(sock: &Path, method: &str, path: &str, body: Value) {
    let a = request(sock, method, path, &body.to_string());
    assert_eq!(a.status, 204, "{method} {path} {body}: {}", a.body);
}

/// The numbers of the `counter: N` lines.
pub fn counts(out: &str) -> Vec<u64> {
    out.lines()
        .filter_map(|l| l.strip_prefix("counter: "))
        .filter_map(|n| n.trim().parse().ok())
        .collect()
}

/// The counts of `before` then `after` go on one at a time (a line a move cut
/// in two is the one that may be missing).
pub fn assert_counts_on(before: &str, after: &str) {
    let (a, b) = (counts(before), counts(after));
    let last = *a.last().expect("the source counted");
    let first = *b.first().expect("the destination counted");
    assert!(
        first == last + 1 || first == last + 2,
        "the count went from {last} to {first}\n--- source\n{before}\n--- destination\n{after}"
    );
    assert_eq!(
        b,
        (first..first + b.len() as u64).collect::<Vec<_>>(),
        "{after}"
    );
    assert!(
        !before.contains("FAIL") && !after.contains("FAIL"),
        "{before}\n{after}"
    );
}

/// A Vigil serving its API on `dir/NAME.sock`, not started.
pub fn api_vigil(dir: &Path, name: &str) -> (Console, PathBuf) {
    let sock = dir.join(format!("{name}.sock"));
    let console = Console::spawn(&["run", "--api-sock", sock.to_str().unwrap()]);
    wait_for(&sock, TIMEOUT);
    (console, sock)
}

/// The `counter` guest with a disk (so that a virtio transport travels too),
/// booted through the API of a Vigil on `dir/source.sock`, counting.
pub fn counting_guest(dir: &Path) -> (Console, PathBuf) {
    let (mut console, sock) = api_vigil(dir, "source");
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![7u8; 1 << 20]).unwrap();
    ok(
        &sock,
        "PUT",
        "/boot-source",
        json!({"kernel_image_path": vigil_test_guest::ELF_PATH, "boot_args": "test=counter"}),
    );
    ok(
        &sock,
        "PUT",
        "/drives/disk",
        json!({"drive_id": "disk", "path_on_host": disk, "is_root_device": false, "is_read_only": false}),
    );
    ok(
        &sock,
        "PUT",
        "/actions",
        json!({"action_type": "InstanceStart"}),
    );
    console.wait_for(&["counter: 3"], TIMEOUT);
    (console, sock)
}

/// The `counter` guest booted at once with the integrity monitor on (checking
/// only when asked, `period=600s`) and the debug API, its API on
/// `dir/source.sock`, the baseline taken.
pub fn monitored_counting_guest(dir: &Path) -> (Console, PathBuf) {
    let sock = dir.join("source.sock");
    let mut console = Console::spawn(&[
        "run",
        "--kernel",
        vigil_test_guest::ELF_PATH,
        "--cmdline",
        "test=counter",
        "--api-sock",
        sock.to_str().unwrap(),
        "--debug-api",
        "--introspect",
        "period=600s,baseline_after=0s",
    ]);
    wait_for(&sock, TIMEOUT);
    console.wait_for(&["counter: 3"], TIMEOUT);
    wait_monitoring(&sock);
    (console, sock)
}

/// Waits until the VM behind `sock` is monitored from a baseline.
pub fn wait_monitoring(sock: &Path) -> Value {
    let deadline = std::time::Instant::now() + TIMEOUT;
    loop {
        let a = request(sock, "GET", "/vigil/introspect", "");
        if a.status == 200 && a.json()["baseline_taken"] == true {
            return a.json();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no baseline within {TIMEOUT:?}: {a:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Two pages of the test guest's kernel text that the `counter` scenario
/// never runs: `blk_target` (a page of its own, all `ret`) and the page of
/// `patch_target`.
pub fn untouched_text_pages() -> (u64, u64) {
    let a = super::guest_symbol("blk_target");
    let b = super::guest_symbol("patch_target") & !0xfff;
    assert_ne!(a & !0xfff, b, "two different pages");
    (a, b)
}

/// Writes `byte` 16 times at `addr` through the debug API.
pub fn write_guest(sock: &Path, addr: u64, byte: u8) {
    ok(
        sock,
        "PUT",
        "/vigil/debug/memory",
        json!({"address": format!("{addr:#x}"), "bytes": vigil_introspect::hex::bytes(&[byte; 16])}),
    );
}

/// A check now (`PUT /vigil/introspect/check`): what it found new.
pub fn check_now(sock: &Path) -> Vec<Value> {
    let a = request(sock, "PUT", "/vigil/introspect/check", "");
    assert_eq!(a.status, 200, "{a:?}");
    a.json().as_array().unwrap().clone()
}

/// Every finding the VM behind `sock` has reported, as `(rule, page, restored)`
/// for kernel text pages.
pub fn text_findings(sock: &Path) -> Vec<(String, u64, bool)> {
    let all = request(sock, "GET", "/vigil/introspect/findings", "").json();
    all.as_array()
        .unwrap()
        .iter()
        .map(|f| {
            let location = f["location"].as_str().unwrap_or_default();
            let page = location
                .strip_prefix("kernel text page ")
                .and_then(|l| l.split(' ').next())
                .map_or(0, super::hex_u64);
            (
                f["rule"].as_str().unwrap_or_default().to_string(),
                page,
                f["restored"] == true,
            )
        })
        .collect()
}

/// Before a snapshot or migration of [`monitored_counting_guest`]: page A
/// tampered with and found, then page B tampered with and not checked yet.
pub fn tamper_before_capture(sock: &Path) -> (u64, u64) {
    let (a, b) = untouched_text_pages();
    assert_eq!(check_now(sock), Vec::<Value>::new(), "a clean guest");
    write_guest(sock, a, 0xcc);
    let found = check_now(sock);
    assert_eq!(found.len(), 1, "{found:#?}");
    write_guest(sock, b, 0xcc);
    (a, b)
}

/// After it: the monitor goes on from the carried baseline. B, changed after
/// the baseline and never checked at the source, is found (a monitor with a
/// new baseline would take it as it is); A, reported at the source, is not
/// reported again; nothing else is found over more checks; and A written back
/// as it was at the baseline is "restored" (a new baseline would call that a
/// change).
pub fn assert_monitor_carried(sock: &Path, (a, b): (u64, u64)) {
    let modified = |page: u64| ("kernel_text_modified".to_string(), page, false);
    check_now(sock);
    assert_eq!(text_findings(sock), [modified(b)]);
    for _ in 0..3 {
        check_now(sock);
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(text_findings(sock), [modified(b)], "nothing new");
    write_guest(sock, a, 0xc3);
    check_now(sock);
    assert_eq!(
        text_findings(sock),
        [modified(b), ("kernel_text_modified".to_string(), a, true)]
    );
}

/// A self-signed certificate for `name` and its key, as `cert.pem` and
/// `key.pem` in `dir` (the certificate is its own CA).
pub fn certificate(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let made = rcgen::generate_simple_self_signed(vec![name.to_owned()]).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert, made.cert.pem()).unwrap();
    std::fs::write(&key, made.key_pair.serialize_pem()).unwrap();
    (cert, key)
}

/// The one-time token the migration tests' destinations take.
pub const TOKEN: &str = "4f1c9a7e-one-time";

/// A Vigil waiting for a VM on `dir/NAME.mig`, its API on `dir/NAME.sock`,
/// with the `extra` arguments.
pub fn destination(dir: &Path, name: &str, extra: &[&str]) -> (Console, PathBuf, String) {
    let listen = format!("unix:{}", dir.join(format!("{name}.mig")).display());
    let sock = dir.join(format!("{name}.sock"));
    let mut args = vec![
        "run",
        "--migrate-from",
        &listen,
        "--migration-token",
        TOKEN,
        "--api-sock",
        sock.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let console = Console::spawn(&args);
    let mig = dir.join(format!("{name}.mig"));
    let deadline = Instant::now() + TIMEOUT;
    while !mig.exists() {
        assert!(Instant::now() < deadline, "the destination never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    (console, sock, listen)
}
