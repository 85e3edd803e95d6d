//! For the snapshot and migration tests: a Vigil serving its API, the test
//! guest's `counter` scenario booted through it, and the counts it printed.

use std::path::{Path, PathBuf};
use std::time::Duration;

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
