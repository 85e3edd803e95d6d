//! Live migration between two Vigil processes (`vigil run --migrate-from`, `PUT
//! /vigil/migration`): the test guest's `counter` scenario moves while it
//! counts and goes on at the destination with every word of its memory intact;
//! a wrong token, a corrupted or cut stream, a destination killed midway and a cancel
//! each leave the source running, and exactly one of the two VMs runs at the end.
//! The integrity monitor moves with the VM and goes on from its baseline at the
//! destination, without `--introspect` there.
//! Post-copy moves a writing guest at once, its pages pulled as it touches
//! them, and takes over when pre-copy cannot keep up with the guest.
//! Over TLS, a source without the CA of the destination's certificate is
//! refused and keeps running.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::daemon::free_loopback_addr;
use common::http::request;
use common::mobility::{
    assert_counts_on, assert_monitor_carried, certificate, counting_guest, counts, destination,
    monitored_counting_guest, ok, tamper_before_capture, wait_monitoring, TIMEOUT, TOKEN,
};
use common::{scratch, Console};
use serde_json::{json, Value};

/// Polls `GET /vigil/migration` until it leaves the running phases.
fn wait_migration_end(sock: &Path) -> Value {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let status = request(sock, "GET", "/vigil/migration", "").json();
        let state = status["state"].as_str().unwrap_or_default().to_string();
        if !["connecting", "precopy", "stopped", "postcopy"].contains(&state.as_str()) {
            return status;
        }
        assert!(Instant::now() < deadline, "migration still {state}");
        std::thread::sleep(Duration::from_millis(20));
    }
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

/// The monitored guest, tampered with, moves (by `method`, or the default);
/// the destination, without `--introspect`, goes on with the carried monitor.
fn monitor_migrates(name: &str, method: Option<&str>) {
    let dir = scratch(name);
    let (mut dest, dest_sock, target) = destination(&dir, "dest", &["--debug-api"]);
    let (src, src_sock) = monitored_counting_guest(&dir);
    let pages = tamper_before_capture(&src_sock);
    let mut request = json!({"destination": target, "token": TOKEN, "downtime_ms": 50});
    if let Some(method) = method {
        request["method"] = method.into();
    }
    ok(&src_sock, "PUT", "/vigil/migration", request);
    dest.wait_for(&["counter: "], TIMEOUT);
    let run = src.finish(TIMEOUT);
    assert_eq!(run.code, Some(0), "{run}");
    // No --introspect here: the carried monitor, with its settings.
    let status = wait_monitoring(&dest_sock);
    assert_eq!(status["settings"]["period"], 600_000, "{status}");
    assert_monitor_carried(&dest_sock, pages);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn the_integrity_monitor_migrates_and_goes_on_from_its_baseline() {
    monitor_migrates("migrate-introspect", None);
}

#[test]
fn the_integrity_monitor_goes_on_after_a_post_copy_migration() {
    monitor_migrates("migrate-introspect-postcopy", Some("postcopy"));
}

/// What a proxy does to the stream at a byte offset.
#[derive(Clone, Copy)]
enum Fault {
    /// Flips a bit of the byte there.
    Flip(usize),
    /// Cuts both ways there (a network cut).
    Cut(usize),
}

/// Forwards one connection from `front` to `back`, doing `fault` to what goes
/// forward.
fn faulty_proxy(front: PathBuf, back: PathBuf, fault: Fault) -> std::thread::JoinHandle<()> {
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
            match fault {
                Fault::Flip(flip) if (at..at + n).contains(&flip) => buf[flip - at] ^= 0x40,
                Fault::Cut(cut) if at + n > cut => {
                    let _ = to_dest.write_all(&buf[..cut - at]);
                    let _ = from_source.shutdown(std::net::Shutdown::Both);
                    let _ = to_dest.shutdown(std::net::Shutdown::Both);
                    return;
                }
                _ => {}
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
    // And the connection cut midway.
    for (name, fault) in [
        ("flip.mig", Fault::Flip(200_000)),
        ("cut.mig", Fault::Cut(300_000)),
    ] {
        let proxy = dir.join(name);
        let forward = faulty_proxy(proxy.clone(), dir.join("dest.mig"), fault);
        ok(
            &src_sock,
            "PUT",
            "/vigil/migration",
            json!({"destination": format!("unix:{}", proxy.display()), "token": TOKEN}),
        );
        let status = wait_migration_end(&src_sock);
        assert_eq!(status["state"], "failed", "{name}: {status}");
        forward.join().unwrap();
        still_counts(&mut src);
    }

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
    // 32 MiB/s is 8192 pages a second: four sweeps of the region, each checked.
    let (src, sock) = writing_guest(&dir);
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

/// The `dirty` guest (64 MiB, writing 8 MiB over and over at 32 MiB/s) on a
/// source Vigil serving its API on `dir/source.sock`, logging what it does,
/// two seconds into its writing.
fn writing_guest(dir: &Path) -> (Console, PathBuf) {
    writing_guest_at(dir, 8, 32)
}

/// The `dirty` guest writing `mib` MiB over and over at `mib_s` MiB/s.
fn writing_guest_at(dir: &Path, mib: u32, mib_s: u32) -> (Console, PathBuf) {
    let sock = dir.join("source.sock");
    let mut src = Console::spawn(&[
        "--log-level",
        "info",
        "run",
        "--memory",
        "64",
        "--kernel",
        vigil_test_guest::ELF_PATH,
        "--cmdline",
        &format!("test=dirty dirty_mib={mib} dirty_mib_s={mib_s}"),
        "--api-sock",
        sock.to_str().unwrap(),
    ]);
    src.wait_for(
        &[&format!("dirty: {} pages in second 2", mib_s * 256)],
        TIMEOUT,
    );
    (src, sock)
}

/// Polls the source's migration status until it is in post-copy: the VM runs
/// at the destination, pages still to come.
fn wait_postcopy(sock: &Path) {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let status = request(sock, "GET", "/vigil/migration", "").json();
        match status["state"].as_str() {
            Some("postcopy") => return,
            Some("connecting" | "precopy" | "stopped") => {}
            _ => panic!("not in post-copy: {status}"),
        }
        assert!(Instant::now() < deadline, "still {status}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The number after `key=` in a log line that says `what`.
fn logged(stderr: &str, what: &str, key: &str) -> Option<u64> {
    let line = stderr.lines().find(|l| l.contains(what))?;
    let at = line.find(&format!("{key}="))? + key.len() + 1;
    line[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// Post-copy as the method: the VM pauses only for its state and runs at the
/// destination at once; the pages it touches before the (slowed) push brings
/// them are asked for, and every one it checks holds what it wrote at the
/// source.
#[test]
fn a_writing_guest_moves_by_postcopy_pulling_the_pages_it_touches() {
    let dir = scratch("migrate-postcopy");
    let (mut dest, _, target) = destination(&dir, "dest", &[]);
    let (src, sock) = writing_guest(&dir);
    ok(
        &sock,
        "PUT",
        "/vigil/migration",
        json!({"destination": target, "token": TOKEN, "method": "postcopy", "bandwidth_mib_s": 16}),
    );
    dest.wait_for(&["dirty: "], TIMEOUT);
    dest.wait_for(&["dirty: 8192 pages in second"], TIMEOUT);
    let run = src.finish(TIMEOUT);
    assert_eq!(run.code, Some(0), "{run}");
    let after = dest.poll().to_string();
    assert!(
        !after.contains("FAIL") && !run.stdout.contains("FAIL"),
        "{}\n{after}",
        run.stdout
    );
    assert!(
        !run.stderr.contains("pre-copy round"),
        "post-copy sends nothing before the pause:\n{}",
        run.stderr
    );
    let requested = logged(&run.stderr, "migrated (post-copy)", "requested")
        .unwrap_or_else(|| panic!("no post-copy summary:\n{}", run.stderr));
    let pages = logged(&run.stderr, "migrated (post-copy)", "pages").unwrap();
    assert!(
        requested > 0 && requested < pages,
        "{requested} of {pages} pages asked for: the guest touched some before the push"
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// `auto` (the default): pre-copy over a link slower than the guest writes,
/// without auto-converge, does not converge; when its rounds run out,
/// post-copy takes over instead of a long pause.
#[test]
fn pre_copy_that_cannot_converge_switches_to_postcopy() {
    let dir = scratch("migrate-switch");
    let (mut dest, _, target) = destination(&dir, "dest", &[]);
    let (src, sock) = writing_guest(&dir);
    // The rate the policy prices a move by: the VM's metrics measure it between
    // two readings from its dirty log.
    let rate = || {
        request(&sock, "GET", "/vigil/metrics", "").json()["memory"]["dirty_bytes_per_s"].as_u64()
    };
    rate();
    std::thread::sleep(Duration::from_secs(1));
    let measured = rate().expect("a rate after two readings");
    // 32 MiB/s over an 8 MiB region: each page several times a second, so a
    // second's distinct pages are the region's 8 MiB.
    assert!(
        (4 << 20..16 << 20).contains(&measured),
        "the guest rewrites 8 MiB 4 times a second; measured {measured} B/s"
    );
    ok(
        &sock,
        "PUT",
        "/vigil/migration",
        json!({
            "destination": target, "token": TOKEN, "bandwidth_mib_s": 8,
            "auto_converge": false, "max_rounds": 3
        }),
    );
    dest.wait_for(&["dirty: "], TIMEOUT);
    dest.wait_for(&["dirty: 8192 pages in second"], TIMEOUT);
    let run = src.finish(TIMEOUT);
    assert_eq!(run.code, Some(0), "{run}");
    assert_eq!(
        run.stderr.matches("pre-copy round").count(),
        3,
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("migrated (post-copy)"),
        "{}",
        run.stderr
    );
    assert!(!dest.poll().contains("FAIL") && !run.stdout.contains("FAIL"));
    std::fs::remove_dir_all(&dir).ok();
}

/// A writing guest (32 MiB at 4 MiB/s) moving by post-copy pushed at 1 MiB/s,
/// once it runs at the destination: for seconds it lacks pages there. The
/// scratch folder, the destination, the source and its API socket.
fn in_slow_postcopy(name: &str) -> (PathBuf, Console, Console, PathBuf) {
    let dir = scratch(name);
    let (dest, _, target) = destination(&dir, "dest", &[]);
    let (src, sock) = writing_guest_at(&dir, 32, 4);
    ok(
        &sock,
        "PUT",
        "/vigil/migration",
        json!({"destination": target, "token": TOKEN, "method": "postcopy", "bandwidth_mib_s": 1}),
    );
    wait_postcopy(&sock);
    (dir, dest, src, sock)
}

/// Post-copy's price: once the VM runs at the destination, losing it loses
/// the VM. The source says so and keeps its stale copy paused (never both
/// running), its process alive for the operator.
#[test]
fn a_destination_lost_during_postcopy_leaves_the_source_paused_saying_why() {
    let (dir, dest, _src, sock) = in_slow_postcopy("migrate-postcopy-lost");
    drop(dest);
    let status = wait_migration_end(&sock);
    assert_eq!(status["state"], "failed", "{status}");
    assert!(
        status["error"]
            .as_str()
            .unwrap()
            .contains("post-copy failed"),
        "{status}"
    );
    assert_eq!(request(&sock, "GET", "/", "").json()["state"], "Paused");
    std::fs::remove_dir_all(&dir).ok();
}

/// Sends SIGTERM to a Vigil and returns how it ended.
fn terminate(console: Console) -> common::Run {
    // SAFETY: kill(2) on a child of this test, which it has not reaped.
    unsafe { libc::kill(console.pid() as i32, libc::SIGTERM) };
    console.finish(TIMEOUT)
}

#[test]
fn over_tls_only_a_source_trusting_the_destinations_certificate_migrates() {
    let dir = scratch("migrate-tls");
    let (cert, key) = certificate(&dir.join("dest"), "127.0.0.1");
    let (other, _) = certificate(&dir.join("other"), "127.0.0.1");
    let addr = free_loopback_addr();
    let target = format!("tcp:{addr}");
    let mut dest = Console::spawn(&[
        "run",
        "--migrate-from",
        &target,
        "--migration-token",
        TOKEN,
        "--migration-tls-cert",
        cert.to_str().unwrap(),
        "--migration-tls-key",
        key.to_str().unwrap(),
    ]);
    // Listening: a connection is taken (and, bringing no TLS, dropped).
    let deadline = Instant::now() + TIMEOUT;
    while std::net::TcpStream::connect(&addr).is_err() {
        assert!(Instant::now() < deadline, "the destination never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    let (mut src, src_sock) = counting_guest(&dir);
    let refused = |src: &mut Console, body: Value, why: &str| {
        ok(&src_sock, "PUT", "/vigil/migration", body.clone());
        let status = wait_migration_end(&src_sock);
        assert_eq!(status["state"], "failed", "{body}: {status}");
        let error = status["error"].as_str().unwrap();
        assert!(error.contains(why), "{body}: {status}");
        let now = *counts(src.poll()).last().unwrap();
        src.wait_for(&[&format!("counter: {}", now + 2)], TIMEOUT);
    };
    // Without TLS: the destination answers, in plain frames, why not.
    refused(
        &mut src,
        json!({"destination": target, "token": TOKEN}),
        "over TLS only",
    );
    // Trusting another certificate.
    refused(
        &mut src,
        json!({"destination": target, "token": TOKEN, "tls_ca": other}),
        "invalid peer certificate",
    );
    // The right CA, but the certificate is not for the name asked.
    refused(
        &mut src,
        json!({"destination": target, "token": TOKEN, "tls_ca": cert, "tls_server_name": "elsewhere"}),
        "not valid for name",
    );
    // The right CA and a wrong token: the token is still checked, inside TLS.
    refused(
        &mut src,
        json!({"destination": target, "token": "guessed", "tls_ca": cert}),
        "token is wrong",
    );
    assert!(
        dest.poll().lines().all(|l| !l.starts_with("counter")),
        "nothing ran at the destination:\n{}",
        dest.seen
    );
    // The certificate's name is the target's host unless told another.
    ok(
        &src_sock,
        "PUT",
        "/vigil/migration",
        json!({"destination": target, "token": TOKEN, "tls_ca": cert}),
    );
    dest.wait_for(&["counter: "], TIMEOUT);
    let run = src.finish(TIMEOUT);
    assert_eq!(run.code, Some(0), "{run}");
    assert_counts_on(&run.stdout, dest.poll());
    let dest = terminate(dest);
    for why in [
        "(TLS)",
        "TLS handshake with the source failed: the source does not speak TLS",
        "TLS handshake with the source failed: received fatal alert",
        "token is wrong",
        "the VM arrived and runs here",
    ] {
        assert!(dest.stderr.contains(why), "{why}: {dest}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn tls_files_that_do_not_load_name_the_option_and_the_path() {
    let dir = scratch("migrate-tls-files");
    let (cert, key) = certificate(&dir, "localhost");
    let missing = dir.join("missing.pem");
    let run_with = |cert: &Path, key: &Path| {
        common::run(
            &[
                "run",
                "--migrate-from",
                "tcp:127.0.0.1:0",
                "--migration-token",
                TOKEN,
                "--migration-tls-cert",
                cert.to_str().unwrap(),
                "--migration-tls-key",
                key.to_str().unwrap(),
            ],
            TIMEOUT,
        )
    };
    let run = run_with(&missing, &key);
    assert_ne!(run.code, Some(0), "{run}");
    assert!(
        run.stderr
            .contains(&format!("--migration-tls-cert {}", missing.display())),
        "{run}"
    );
    // A certificate is no key.
    let run = run_with(&cert, &cert);
    assert_ne!(run.code, Some(0), "{run}");
    assert!(
        run.stderr
            .contains(&format!("--migration-tls-key {}", cert.display())),
        "{run}"
    );
    // The source's CA.
    let (_src, sock) = counting_guest(&dir);
    let a = request(
        &sock,
        "PUT",
        "/vigil/migration",
        &json!({"destination": "tcp:127.0.0.1:9", "token": TOKEN, "tls_ca": missing}).to_string(),
    );
    assert_eq!(a.status, 400, "{}", a.body);
    assert!(
        a.body.contains(&format!("tls_ca {}", missing.display())),
        "{}",
        a.body
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// The other side of post-copy's price: the source lost while the VM runs at
/// the destination with pages still there. The destination cannot go on: it
/// stops its VM and says why, rather than run a guest whose memory is gone.
#[test]
fn a_source_lost_during_postcopy_stops_the_destination_saying_why() {
    let (dir, dest, src, _) = in_slow_postcopy("migrate-postcopy-source-lost");
    drop(src);
    let run = dest.finish(TIMEOUT);
    assert_eq!(run.code, Some(1), "a VMM failure: {run}");
    assert!(run.stderr.contains("the source is lost"), "{run}");
    std::fs::remove_dir_all(&dir).ok();
}
