//! Snapshots through Firecracker's API (`PATCH /vm`, `PUT /snapshot/create`,
//! `PUT /snapshot/load`): the test guest's `counter` scenario, paused, saved and
//! loaded into another Vigil process, counts on from where it was with every
//! word of its memory intact; bad requests and bad snapshot files are refused,
//! naming what is wrong, leaving the running VM and the loading process unharmed.
//! A diff snapshot holds only the pages written since the previous snapshot and,
//! merged onto that snapshot's memory (`vigil snapshot merge`), loads like a
//! full one. The integrity monitor travels in the snapshot: the restored VM's
//! goes on from the baseline taken at boot.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::http::request;
use common::mobility::{
    api_vigil, assert_monitor_carried, counting_guest, counts, monitored_counting_guest, ok,
    tamper_before_capture, wait_monitoring, TIMEOUT,
};
use common::{run, scratch, Console};
use serde_json::{json, Value};

fn call(sock: &Path, method: &str, path: &str, body: &Value) -> (u16, String) {
    let a = request(sock, method, path, &body.to_string());
    (a.status, a.body)
}

/// A 400 whose message contains every one of `words`.
fn refused(sock: &Path, method: &str, path: &str, body: Value, words: &[&str]) {
    let (status, answer) = call(sock, method, path, &body);
    assert_eq!(status, 400, "{method} {path} {body}: {answer}");
    for w in words {
        assert!(
            answer.contains(w),
            "{method} {path}: {answer:?} lacks {w:?}"
        );
    }
}

fn snapshot_paths(dir: &Path) -> (PathBuf, PathBuf) {
    (dir.join("vm.snap"), dir.join("vm.mem"))
}

fn create(sock: &Path, state: &Path, mem: &Path) {
    create_as(sock, "Full", state, mem);
}

/// Takes a snapshot of `snapshot_type`; returns how long the request took.
fn create_as(sock: &Path, snapshot_type: &str, state: &Path, mem: &Path) -> Duration {
    let start = Instant::now();
    ok(
        sock,
        "PUT",
        "/snapshot/create",
        json!({"snapshot_path": state, "mem_file_path": mem, "snapshot_type": snapshot_type}),
    );
    start.elapsed()
}

/// Bytes the file system holds for a file (its data, and the blocks of its
/// extent tree when the file system is fragmented; holes take none).
fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// `vigil snapshot ARGS`.
fn snapshot_cli(args: &[&str]) -> common::Run {
    let mut argv = vec!["snapshot"];
    argv.extend_from_slice(args);
    run(&argv, TIMEOUT)
}

fn text(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Checks that a loaded guest counts on from `last`, one tick at a time, with
/// its memory intact.
fn counts_on_from(restored: &mut Console, last: u64) {
    restored.wait_for(&[&format!("counter: {}", last + 10)], TIMEOUT);
    let after = counts(restored.poll());
    // The first tick after the restore is the next one; a line the pause cut in
    // two (its start printed by the source) is the only one allowed missing.
    let first = after[0];
    assert!(
        first == last + 1 || (first == last + 2 && !restored.seen.starts_with("counter: ")),
        "the count went from {last} to {first}:\n{}",
        restored.seen
    );
    assert_eq!(
        after,
        (first..first + after.len() as u64).collect::<Vec<_>>(),
        "one tick at a time, each after checking the last tick's 32768 words"
    );
    assert!(!restored.seen.contains("FAIL"), "{}", restored.seen);
}

fn load_body(state: &Path, mem: &Path) -> Value {
    json!({
        "snapshot_path": state,
        "mem_backend": {"backend_type": "File", "backend_path": mem},
        "resume_vm": true
    })
}

#[test]
fn a_restored_guest_counts_on_with_its_memory_intact() {
    let dir = scratch("snapshot-restore");
    let (state, mem) = snapshot_paths(&dir);
    let (mut source, sock) = counting_guest(&dir);
    ok(&sock, "PATCH", "/vm", json!({"state": "Paused"}));
    std::thread::sleep(Duration::from_millis(400));
    let before = counts(source.poll());
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(
        counts(source.poll()),
        before,
        "a paused guest does not count"
    );
    create(&sock, &state, &mem);
    // Firecracker's `--describe-snapshot` checks the file and prints its version.
    let described = run(
        &["firecracker", "--describe-snapshot", text(&state)],
        TIMEOUT,
    );
    assert_eq!(described.code, Some(0), "{described}");
    assert_eq!(described.stdout.trim(), "v1.0.0", "{described}");
    let not_one = run(&["firecracker", "--describe-snapshot", text(&mem)], TIMEOUT);
    assert_ne!(not_one.code, Some(0), "{not_one}");
    assert!(not_one.stderr.contains("not a Vigil snapshot"), "{not_one}");
    let saved_memory = std::fs::read(&mem).unwrap();
    assert_eq!(
        saved_memory.len(),
        128 << 20,
        "the memory file is guest RAM"
    );
    drop(source);

    let (mut restored, sock) = api_vigil(&dir, "restored");
    ok(&sock, "PUT", "/snapshot/load", load_body(&state, &mem));
    assert_eq!(
        request(&sock, "GET", "/", "").json()["state"],
        "Running",
        "resume_vm: true runs it"
    );
    let last = *before.last().expect("the guest counted before the pause");
    counts_on_from(&mut restored, last);

    // Guest memory is a private mapping of the file: the guest's writes since
    // are its own, and the snapshot stays as it was taken.
    assert!(std::fs::read(&mem).unwrap() == saved_memory);
    let (paused, answer) = call(&sock, "PATCH", "/vm", &json!({"state": "Paused"}));
    assert_eq!(paused, 204, "{answer}");
    refused(
        &sock,
        "PUT",
        "/snapshot/create",
        json!({"snapshot_path": dir.join("again.snap"), "mem_file_path": mem}),
        &["vm.mem", "guest memory is mapped from this file"],
    );
    std::fs::remove_dir_all(&dir).ok();
}

/// Firecracker's `Uffd` backend: the loaded guest's memory comes from a
/// page-fault handler (one written to Firecracker's protocol), page by page as
/// the guest touches it; the guest counts on with its memory intact, and the
/// handler served only the pages it touched.
#[test]
fn a_snapshot_loads_lazily_from_a_page_fault_handler() {
    let dir = scratch("snapshot-uffd");
    let (state, mem) = snapshot_paths(&dir);
    let (mut source, sock) = counting_guest(&dir);
    ok(&sock, "PATCH", "/vm", json!({"state": "Paused"}));
    std::thread::sleep(Duration::from_millis(400));
    let before = counts(source.poll());
    create(&sock, &state, &mem);
    drop(source);

    let handler_sock = dir.join("uffd.sock");
    let handler = vigil_shared::page_server::PageServer::listen(&handler_sock, &mem).unwrap();
    let (mut restored, sock) = api_vigil(&dir, "restored");
    ok(
        &sock,
        "PUT",
        "/snapshot/load",
        json!({
            "snapshot_path": state,
            "mem_backend": {"backend_type": "Uffd", "backend_path": handler_sock},
            "resume_vm": true
        }),
    );
    let last = *before.last().expect("the guest counted before the pause");
    counts_on_from(&mut restored, last);
    let served = handler.served();
    let pages = (128u64 << 20) / 4096;
    assert!(
        served > 32 && served < pages / 2,
        "the handler served {served} of {pages} pages: those the guest touched"
    );

    drop(restored);
    handler.finish().unwrap();
    std::fs::remove_dir_all(&dir).ok();
}

/// A snapshot onto a full file system (a 64 KiB tmpfs) is refused, and leaves
/// neither a partial file nor the one that was there before changed.
fn full_disk_is_refused(sock: &Path, dir: &Path) {
    let small = dir.join("small");
    std::fs::create_dir_all(&small).unwrap();
    let mounted = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
        .arg(&small)
        .status()
        .is_ok_and(|s| s.success());
    if !mounted {
        eprintln!("SKIPPED: the full-disk case needs to mount a tmpfs (root)");
        return;
    }
    let before = small.join("vm.mem");
    std::fs::write(&before, b"an older snapshot's memory").unwrap();
    refused(
        sock,
        "PUT",
        "/snapshot/create",
        json!({"snapshot_path": small.join("vm.snap"), "mem_file_path": before}),
        &[
            "vm.mem.partial",
            "cannot write guest memory",
            "No space left",
        ],
    );
    let left: Vec<_> = std::fs::read_dir(&small)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, ["vm.mem"], "nothing partial left behind");
    assert_eq!(
        std::fs::read(&before).unwrap(),
        b"an older snapshot's memory"
    );
    let _ = std::process::Command::new("umount").arg(&small).status();
}

#[test]
fn bad_snapshots_and_requests_are_refused_leaving_vms_unharmed() {
    let dir = scratch("snapshot-refusals");
    let (state, mem) = snapshot_paths(&dir);
    let (mut source, sock) = counting_guest(&dir);

    // The source: a running VM cannot be saved; what cannot be done leaves it
    // running or paused as it was, and nothing half-written behind.
    refused(
        &sock,
        "PUT",
        "/snapshot/create",
        json!({"snapshot_path": state, "mem_file_path": mem}),
        &["pause it first"],
    );
    ok(&sock, "PATCH", "/vm", json!({"state": "Paused"}));
    refused(
        &sock,
        "PUT",
        "/snapshot/create",
        json!({"snapshot_path": state, "mem_file_path": mem, "snapshot_type": "Delta"}),
        &["snapshot_type", "Delta"],
    );
    refused(
        &sock,
        "PUT",
        "/snapshot/create",
        json!({"snapshot_path": state, "mem_file_path": dir.join("no/such/dir/vm.mem")}),
        &["no/such/dir/vm.mem.partial", "cannot create it"],
    );
    refused(
        &sock,
        "PUT",
        "/snapshot/create",
        json!({"snapshot_path": state, "mem_file_path": mem, "compress": true}),
        &["compress"],
    );
    assert!(!state.exists() && !mem.exists());
    full_disk_is_refused(&sock, &dir);
    create(&sock, &state, &mem);
    let last = *counts(source.poll()).last().unwrap();
    ok(&sock, "PATCH", "/vm", json!({"state": "Resumed"}));
    source.wait_for(&[&format!("counter: {}", last + 3)], TIMEOUT);

    // Bad files, each refused before anything is built, by one process that
    // then loads the good snapshot.
    let (mut target, tsock) = api_vigil(&dir, "target");
    let bytes = std::fs::read(&state).unwrap();
    let variant = |name: &str, edit: &dyn Fn(&mut Vec<u8>)| {
        let mut b = bytes.clone();
        edit(&mut b);
        let path = dir.join(name);
        std::fs::write(&path, b).unwrap();
        path
    };
    let corrupt = variant("corrupt.snap", &|b| {
        let i = b.len() / 2;
        b[i] ^= 0x20;
    });
    let bumped = variant("bumped.snap", &|b| {
        b[8..12].copy_from_slice(&2u32.to_le_bytes())
    });
    let cut = variant("cut.snap", &|b| b.truncate(b.len() - 100));
    let alien = variant("alien.snap", &|b| b[..8].copy_from_slice(b"NOTVIGIL"));
    let short_mem = dir.join("short.mem");
    std::fs::copy(&mem, &short_mem).unwrap();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&short_mem)
        .unwrap();
    f.set_len((128 << 20) - 4096).unwrap();
    for (file, memory, words) in [
        (&corrupt, &mem, vec!["corrupt.snap", "checksum", "corrupt"]),
        (
            &bumped,
            &mem,
            vec!["bumped.snap", "format version 2", "version 1 only"],
        ),
        (&cut, &mem, vec!["cut.snap", "bytes of state"]),
        (&alien, &mem, vec!["alien.snap", "not a Vigil snapshot"]),
        (
            &state,
            &short_mem,
            vec!["short.mem", "134213632 bytes", "truncated"],
        ),
        (
            &dir.join("missing.snap"),
            &mem,
            vec!["missing.snap", "cannot open it"],
        ),
    ] {
        refused(
            &tsock,
            "PUT",
            "/snapshot/load",
            load_body(file, memory),
            &words,
        );
        assert_eq!(
            request(&tsock, "GET", "/", "").json()["state"],
            "Not started"
        );
    }
    refused(
        &tsock,
        "PUT",
        "/snapshot/load",
        json!({"snapshot_path": state, "mem_backend": {"backend_type": "Uffd", "backend_path": "/x"}}),
        &["the page-fault handler at /x"],
    );
    refused(
        &tsock,
        "PUT",
        "/snapshot/load",
        json!({"snapshot_path": state}),
        &["mem_backend: missing"],
    );
    ok(&tsock, "PUT", "/snapshot/load", load_body(&state, &mem));
    target.wait_for(&[&format!("counter: {}", last + 3)], TIMEOUT);
    refused(
        &tsock,
        "PUT",
        "/snapshot/load",
        load_body(&state, &mem),
        &["only be done before the VM starts"],
    );

    // The source counted on all along.
    let now = *counts(source.poll()).last().unwrap();
    source.wait_for(&[&format!("counter: {}", now + 2)], TIMEOUT);
    assert!(!source.seen.contains("FAIL") && !target.seen.contains("FAIL"));
    std::fs::remove_dir_all(&dir).ok();
}

/// `vigil snapshot merge` of `diff` onto a copy of `base` at `into`, which
/// must succeed.
fn merge_onto_copy(base: &Path, diff: &Path, into: &Path) -> common::Run {
    std::fs::copy(base, into).unwrap();
    let merge = snapshot_cli(&["merge", "--base", text(into), "--diff", text(diff)]);
    assert_eq!(merge.code, Some(0), "{merge}");
    merge
}

/// The pages the `counter` scenario rewrites at every tick.
const COUNTER_BYTES: u64 = 64 * 4096;
/// What else a counting guest writes between two snapshots, at most.
const SLACK: u64 = 16 * 4096;

#[test]
fn a_diff_snapshot_holds_the_pages_written_since_the_last_one_and_loads_merged() {
    let dir = scratch("snapshot-diff");
    let (mut source, sock) = counting_guest(&dir);
    let path = |name: &str| dir.join(name);
    ok(&sock, "PATCH", "/vm", json!({"state": "Paused"}));
    // A booted VM's first diff has no snapshot to differ from: every page is in
    // it, and its state file says it is whole.
    create_as(&sock, "Diff", &path("z.snap"), &path("z.mem"));
    let z = allocated(&path("z.mem"));
    assert!(
        (128 << 20..(128 << 20) + (64 << 10)).contains(&z),
        "every page, {z} bytes"
    );
    let inspect = snapshot_cli(&["inspect", text(&path("z.snap"))]);
    assert!(inspect.stdout.contains("memory file: Full\n"), "{inspect}");
    std::fs::remove_file(path("z.mem")).unwrap();
    let full_took = create_as(&sock, "Full", &path("a.snap"), &path("a.mem"));
    ok(&sock, "PATCH", "/vm", json!({"state": "Resumed"}));
    let at_full = *counts(source.poll()).last().unwrap();
    source.wait_for(&[&format!("counter: {}", at_full + 3)], TIMEOUT);
    ok(&sock, "PATCH", "/vm", json!({"state": "Paused"}));
    std::thread::sleep(Duration::from_millis(300));
    let before = counts(source.poll());
    let diff_took = create_as(&sock, "Diff", &path("b.snap"), &path("b.mem"));
    // Still paused: a full snapshot of the same moment, then a diff of nothing.
    create_as(&sock, "Full", &path("c.snap"), &path("c.mem"));
    create_as(&sock, "Diff", &path("d.snap"), &path("d.mem"));
    drop(source);

    let (full, diff) = (allocated(&path("a.mem")), allocated(&path("b.mem")));
    eprintln!(
        "128 MiB guest: Full {full} bytes of data in {full_took:?}, Diff {diff} bytes in {diff_took:?}"
    );
    assert_eq!(std::fs::metadata(path("b.mem")).unwrap().len(), 128 << 20);
    // The counter's 64 pages changed, and little else (its stack, page-table
    // accessed bits): the guest's other pages are not in the diff.
    assert!(
        (COUNTER_BYTES..=COUNTER_BYTES + SLACK).contains(&diff) && diff < full,
        "Full {full} bytes of data, Diff {diff}"
    );
    assert_eq!(
        allocated(&path("d.mem")),
        0,
        "nothing was written since the full snapshot just before"
    );
    let inspect = snapshot_cli(&[
        "inspect",
        text(&path("b.snap")),
        "--mem",
        text(&path("b.mem")),
    ]);
    assert_eq!(inspect.code, Some(0), "{inspect}");
    assert!(inspect.stdout.contains("memory file: Diff"), "{inspect}");
    assert!(
        inspect.stdout.contains(&format!("{diff} bytes of data")),
        "{inspect}"
    );
    let inspect = snapshot_cli(&["inspect", text(&path("a.snap"))]);
    assert!(inspect.stdout.contains("memory file: Full\n"), "{inspect}");

    // Merged onto the full snapshot before it, the diff is the memory of its
    // moment, byte for byte.
    let merge = merge_onto_copy(&path("a.mem"), &path("b.mem"), &path("merged.mem"));
    assert!(merge.stderr.contains(&format!("{diff} bytes")), "{merge}");
    assert!(std::fs::read(path("merged.mem")).unwrap() == std::fs::read(path("c.mem")).unwrap());
    let inspect = snapshot_cli(&[
        "inspect",
        text(&path("b.snap")),
        "--mem",
        text(&path("merged.mem")),
    ]);
    assert_eq!(inspect.code, Some(0), "{inspect}");

    // Loaded with the diff's state, it counts on from the diff's moment.
    let (mut restored, rsock) = api_vigil(&dir, "restored");
    ok(
        &rsock,
        "PUT",
        "/snapshot/load",
        load_body(&path("b.snap"), &path("merged.mem")),
    );
    counts_on_from(&mut restored, *before.last().unwrap());

    // The restored VM's first diff holds what it wrote since the load: merged
    // onto the memory it was loaded from, it is its memory again.
    ok(&rsock, "PATCH", "/vm", json!({"state": "Paused"}));
    create_as(&rsock, "Diff", &path("e.snap"), &path("e.mem"));
    create_as(&rsock, "Full", &path("f.snap"), &path("f.mem"));
    let e = allocated(&path("e.mem"));
    assert!(
        (COUNTER_BYTES..=COUNTER_BYTES + SLACK).contains(&e),
        "Diff after a load: {e} bytes"
    );
    // Not onto merged.mem itself: the restored VM's memory is a private mapping
    // of it.
    merge_onto_copy(&path("merged.mem"), &path("e.mem"), &path("merged2.mem"));
    assert!(std::fs::read(path("merged2.mem")).unwrap() == std::fs::read(path("f.mem")).unwrap());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn merge_refuses_files_that_do_not_fit() {
    let dir = scratch("snapshot-merge-refusals");
    let (base, diff, short) = (
        dir.join("base.mem"),
        dir.join("diff.mem"),
        dir.join("short.mem"),
    );
    std::fs::write(&base, vec![1u8; 8192]).unwrap();
    std::fs::write(&diff, vec![2u8; 8192]).unwrap();
    std::fs::write(&short, vec![2u8; 4096]).unwrap();
    for (b, d, words) in [
        (
            &base,
            &short,
            vec!["base.mem: 8192 bytes", "short.mem is 4096 bytes"],
        ),
        (
            &short,
            &base,
            vec!["short.mem: 4096 bytes", "base.mem is 8192 bytes"],
        ),
        (&base, &base, vec!["base.mem", "same file"]),
        (
            &base,
            &dir.join("none.mem"),
            vec!["none.mem", "cannot open it"],
        ),
        (
            &dir.join("none.mem"),
            &diff,
            vec!["none.mem", "cannot open it for writing"],
        ),
    ] {
        let merge = snapshot_cli(&["merge", "--base", text(b), "--diff", text(d)]);
        assert_eq!(merge.code, Some(1), "{merge}");
        for w in words {
            assert!(merge.stderr.contains(w), "{merge}\nlacks {w:?}");
        }
    }
    assert_eq!(
        std::fs::read(&base).unwrap(),
        vec![1u8; 8192],
        "left as it was"
    );
    let help = snapshot_cli(&["merge", "--help"]);
    assert!(help.stdout.contains("cp full.mem vm.mem"), "{help}");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn the_integrity_monitor_goes_on_from_its_baseline_in_the_restored_vm() {
    let dir = scratch("snapshot-introspect");
    let (state, mem) = snapshot_paths(&dir);
    let (source, sock) = monitored_counting_guest(&dir);
    let pages = tamper_before_capture(&sock);
    ok(&sock, "PATCH", "/vm", json!({"state": "Paused"}));
    create(&sock, &state, &mem);
    drop(source);

    let inspect = snapshot_cli(&["inspect", text(&state)]);
    assert_eq!(inspect.code, Some(0), "{inspect}");
    assert!(
        inspect.stdout.contains(
            "introspection: the integrity monitor, every 600000 ms, policy report; its baseline: 1 vCPUs, kernel text"
        ) && inspect.stdout.contains("1 locations reported"),
        "{inspect}"
    );

    // --introspect at the loading Vigil: its period replaces the carried one.
    let dest_sock = dir.join("dest.sock");
    let mut restored = Console::spawn(&[
        "run",
        "--api-sock",
        text(&dest_sock),
        "--debug-api",
        "--introspect",
        "period=50ms",
    ]);
    common::http::wait_for(&dest_sock, TIMEOUT);
    ok(&dest_sock, "PUT", "/snapshot/load", load_body(&state, &mem));
    let status = wait_monitoring(&dest_sock);
    assert_eq!(status["settings"]["period"], 50, "{status}");
    assert_eq!(status["kaslr_slide"], 0, "{status}");
    assert_monitor_carried(&dest_sock, pages);
    let line = restored.wait_for(&["counter: "], TIMEOUT);
    let next: u64 = line["counter: ".len()..].trim().parse().unwrap();
    restored.wait_for(&[&format!("counter: {}", next + 3)], TIMEOUT);
    assert!(!restored.poll().contains("FAIL"), "{}", restored.seen);
    std::fs::remove_dir_all(&dir).ok();
}

/// The KVM clock a state file holds, in ns (`vigil snapshot inspect`).
fn kvm_clock(state: &Path) -> u64 {
    let inspect = snapshot_cli(&["inspect", text(state)]);
    let line = inspect
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("kvm clock: "))
        .unwrap_or_else(|| panic!("no kvm clock line: {inspect}"));
    line.split(' ').next().unwrap().parse().unwrap()
}

/// `clock_realtime` on load: the loaded VM's clock has moved on by the time
/// the snapshot spent on disk; without it, by (about) nothing.
#[test]
fn clock_realtime_advances_the_clock_by_the_time_saved() {
    let dir = scratch("snapshot-clock");
    let (state, mem) = snapshot_paths(&dir);
    let (source, sock) = counting_guest(&dir);
    ok(&sock, "PATCH", "/vm", json!({"state": "Paused"}));
    create(&sock, &state, &mem);
    drop(source);
    if !snapshot_cli(&["inspect", text(&state)])
        .stdout
        .contains("clock_realtime can load it")
    {
        eprintln!("SKIP: this host's KVM reads its clock without the real time");
        return;
    }
    let saved = kvm_clock(&state);
    let asleep = Duration::from_millis(1500);
    std::thread::sleep(asleep);
    for (realtime, name) in [(false, "plain"), (true, "realtime")] {
        let (_restored, sock) = api_vigil(&dir, name);
        let mut body = load_body(&state, &mem);
        body["resume_vm"] = json!(false);
        body["clock_realtime"] = json!(realtime);
        ok(&sock, "PUT", "/snapshot/load", body);
        let again = dir.join(format!("{name}.snap"));
        create(&sock, &again, &dir.join(format!("{name}.mem")));
        let moved = Duration::from_nanos(kvm_clock(&again) - saved);
        if realtime {
            assert!(moved >= asleep, "moved {moved:?}, slept {asleep:?}");
        } else {
            assert!(
                moved < asleep,
                "moved {moved:?}: the time saved was skipped"
            );
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}
