//! Live migration between two Vigil processes (`vigil run --migrate-from`, `PUT
//! /vigil/migration`): the test guest's `counter` scenario moves while it
//! counts and goes on at the destination with every word of its memory intact;
//! a wrong token, a corrupted stream, a destination killed midway and a cancel
//! each leave the source running, and exactly one of the two VMs runs at the end.
//! The integrity monitor moves with the VM and goes on from its baseline at the
//! destination, without `--introspect` there.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::http::request;
use common::mobility::{
    assert_monitor_carried, counting_guest, counts, monitored_counting_guest, ok,
    tamper_before_capture, wait_monitoring, TIMEOUT,
};
use common::{scratch, Console};
use serde_json::{json, Value};

const TOKEN: &str = "4f1c9a7e-one-time";

/// A Vigil waiting for a VM on `dir/NAME.mig`, its API on `dir/NAME.sock`,
/// with the `extra` arguments.
fn destination(dir: &Path, name: &str, extra: &[&str]) -> (Console, PathBuf, String) {
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

/// Polls `GET /vigil/migration` until it leaves the running phases.
fn wait_migration_end(sock: &Path) -> Value {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let status = request(sock, "GET", "/vigil/migration", "").json();
        let state = status["state"].as_str().unwrap_or_default().to_string();
        if !["connecting", "precopy", "stopped"].contains(&state.as_str()) {
            return status;
        }
        assert!(Instant::now() < deadline, "migration still {state}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The counts of `before` then `after` go on one at a time (a line a move cut
/// in two is the one that may be missing).
fn assert_counts_on(before: &str, after: &str) {
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

#[test]
fn a_counting_guest_migrates_and_counts_on_with_its_memory_intact() {
    let dir = scratch("migrate");
    let (mut dest, dest_sock, target) = destination(&dir, "dest", &[]);
    let (src, src_sock) = counting_guest(&dir);
    ok(
        &src_sock,
        "PUT",
        "/vigil/migration",
        json!({"destination": target, "token": TOKEN, "downtime_ms": 50}),
    );
    let line = dest.wait_for(&["counter: "], TIMEOUT);
    let arrived: u64 = line["counter: ".len()..].trim().parse().unwrap();
    dest.wait_for(&[&format!("counter: {}", arrived + 5)], TIMEOUT);
    let run = src.finish(TIMEOUT);
    assert_eq!(run.code, Some(0), "{run}");
    assert!(
        run.stderr.contains(&format!("the VM migrated to {target}")),
        "{run}"
    );
    assert_counts_on(&run.stdout, dest.poll());
    assert_eq!(
        request(&dest_sock, "GET", "/", "").json()["state"],
        "Running"
    );
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn the_integrity_monitor_migrates_and_goes_on_from_its_baseline() {
    let dir = scratch("migrate-introspect");
    let (mut dest, dest_sock, target) = destination(&dir, "dest", &["--debug-api"]);
    let (src, src_sock) = monitored_counting_guest(&dir);
    let pages = tamper_before_capture(&src_sock);
    ok(
        &src_sock,
        "PUT",
        "/vigil/migration",
        json!({"destination": target, "token": TOKEN, "downtime_ms": 50}),
    );
    dest.wait_for(&["counter: "], TIMEOUT);
    let run = src.finish(TIMEOUT);
    assert_eq!(run.code, Some(0), "{run}");
    // No --introspect here: the carried monitor, with its settings.
    let status = wait_monitoring(&dest_sock);
    assert_eq!(status["settings"]["period"], 600_000, "{status}");
    assert_monitor_carried(&dest_sock, pages);
    std::fs::remove_dir_all(&dir).ok();
}

/// Forwards one connection from `front` to `back`, flipping the byte at
/// `flip` of what goes forward.
fn corrupting_proxy(front: PathBuf, back: PathBuf, flip: usize) -> std::thread::JoinHandle<()> {
    let listener = UnixListener::bind(&front).unwrap();
    std::thread::spawn(move || {
        let (mut from_source, _) = listener.accept().unwrap();
        let mut to_dest = UnixStream::connect(&back).unwrap();
        let (mut back_from, mut back_to) = (
            to_dest.try_clone().unwrap(),
            from_source.try_clone().unwrap(),
        );
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut back_from, &mut back_to);
        });
        let mut buf = [0u8; 65536];
        let mut at = 0usize;
        while let Ok(n) = from_source.read(&mut buf) {
            if n == 0 {
                break;
            }
            if (at..at + n).contains(&flip) {
                buf[flip - at] ^= 0x40;
            }
            at += n;
            if to_dest.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    })
}

#[test]
fn failed_migrations_leave_the_source_running_and_one_vm_at_the_end() {
    let dir = scratch("migrate-faults");
    let (mut dest, _dest_sock, target) = destination(&dir, "dest", &[]);
    let (mut src, src_sock) = counting_guest(&dir);
    let still_counts = |src: &mut Console| {
        let now = *counts(src.poll()).last().unwrap();
        src.wait_for(&[&format!("counter: {}", now + 2)], TIMEOUT);
    };

    // A wrong token.
    ok(
        &src_sock,
        "PUT",
        "/vigil/migration",
        json!({"destination": target, "token": "guessed"}),
    );
    let status = wait_migration_end(&src_sock);
    assert_eq!(status["state"], "failed", "{status}");
    assert!(
        status["error"].as_str().unwrap().contains("token is wrong"),
        "{status}"
    );
    still_counts(&mut src);

    // One byte of the stream flipped on the way: the destination's CRC check
    // refuses the frame.
    let proxy = dir.join("proxy.mig");
    let forward = corrupting_proxy(proxy.clone(), dir.join("dest.mig"), 200_000);
    ok(
        &src_sock,
        "PUT",
        "/vigil/migration",
        json!({"destination": format!("unix:{}", proxy.display()), "token": TOKEN}),
    );
    let status = wait_migration_end(&src_sock);
    assert_eq!(status["state"], "failed", "{status}");
    forward.join().unwrap();
    still_counts(&mut src);

    // A slow migration cancelled midway.
    ok(
        &src_sock,
        "PUT",
        "/vigil/migration",
        json!({"destination": target, "token": TOKEN, "bandwidth_mib_s": 1}),
    );
    std::thread::sleep(Duration::from_millis(300));
    let a = request(&src_sock, "DELETE", "/vigil/migration", "");
    assert_eq!(a.status, 204, "{}", a.body);
    let status = wait_migration_end(&src_sock);
    assert_eq!(status["state"], "cancelled", "{status}");
    still_counts(&mut src);
    assert!(
        dest.poll().lines().all(|l| !l.starts_with("counter")),
        "nothing ran at the destination:\n{}",
        dest.seen
    );

    // The destination killed midway.
    ok(
        &src_sock,
        "PUT",
        "/vigil/migration",
        json!({"destination": target, "token": TOKEN, "bandwidth_mib_s": 1}),
    );
    std::thread::sleep(Duration::from_millis(300));
    drop(dest);
    let status = wait_migration_end(&src_sock);
    assert_eq!(status["state"], "failed", "{status}");
    still_counts(&mut src);

    // And then a good one, to a new destination: one VM runs, there.
    let (mut dest, _, target) = destination(&dir, "dest2", &[]);
    ok(
        &src_sock,
        "PUT",
        "/vigil/migration",
        json!({"destination": target, "token": TOKEN}),
    );
    dest.wait_for(&["counter: "], TIMEOUT);
    let run = src.finish(TIMEOUT);
    assert_eq!(run.code, Some(0), "{run}");
    assert_counts_on(&run.stdout, dest.poll());
    std::fs::remove_dir_all(&dir).ok();
}

/// The `dirty` guest writes its region page after page and checks, each sweep,
/// every page's word from the sweep before: moved while it writes, it goes on
/// writing at the destination at its rate and finds nothing lost.
#[test]
fn a_dirtying_guest_migrates_with_every_page_it_wrote() {
    let dir = scratch("migrate-dirty");
    let (mut dest, _, target) = destination(&dir, "dest", &[]);
    let sock = dir.join("source.sock");
    let mut src = Console::spawn(&[
        "run",
        "--memory",
        "64",
        "--kernel",
        vigil_test_guest::ELF_PATH,
        "--cmdline",
        "test=dirty dirty_mib=8 dirty_mib_s=32",
        "--api-sock",
        sock.to_str().unwrap(),
    ]);
    // 32 MiB/s is 8192 pages a second: four sweeps of the region, each checked.
    src.wait_for(&["dirty: 8192 pages in second 2"], TIMEOUT);
    ok(
        &sock,
        "PUT",
        "/vigil/migration",
        json!({"destination": target, "token": TOKEN}),
    );
    // The second line there is a whole second at the destination: four more
    // sweeps checked.
    dest.wait_for(&["dirty: "], TIMEOUT);
    dest.wait_for(&["dirty: 8192 pages in second"], TIMEOUT);
    let run = src.finish(TIMEOUT);
    assert_eq!(run.code, Some(0), "{run}");
    let after = dest.poll();
    assert!(
        !after.contains("FAIL") && !run.stdout.contains("FAIL"),
        "{}\n{after}",
        run.stdout
    );
    std::fs::remove_dir_all(&dir).ok();
}
