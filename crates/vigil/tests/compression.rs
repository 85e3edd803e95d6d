//! The memory-compression pager (`--memory-compression`) end to end: the test
//! guest fills memory with a known mix and goes idle; the host sees it leave
//! RAM (GET /vigil/memory, the process's VmRSS), a virtio-blk read lands in a
//! page the VMM held compressed, and the guest then finds every byte intact
//! while the pages come back.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{http, scratch, Console, TIMEOUT};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
/// The mix: a quarter each zero, duplicate, text and random pages.
const MIX_MIB: u64 = 16;
const MIX_PAGES: u64 = MIX_MIB * MIB / 4096;

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no VmRSS in\n{status}"));
    kib * 1024
}

fn memory(sock: &Path) -> Value {
    let a = http::request(sock, "GET", "/vigil/memory", "");
    assert_eq!(a.status, 200, "{a:?}");
    a.json()
}

fn n(v: &Value, key: &str) -> u64 {
    v["compression"][key]
        .as_u64()
        .unwrap_or_else(|| panic!("no {key} in {v}"))
}

/// Waits until the pager holds the mix's zero, duplicate and text pages;
/// returns GET /vigil/memory then.
fn wait_mix_held(sock: &Path) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = memory(sock);
        if n(&m, "pages_zero") >= MIX_PAGES / 4
            && n(&m, "pages_deduplicated") >= MIX_PAGES / 4 - 4
            && n(&m, "pages_held") >= 3 * MIX_PAGES / 4
        {
            return m;
        }
        assert!(Instant::now() < deadline, "the mix is not taken out: {m}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits for the guest to check every byte of the mix.
fn wait_verified(vm: &mut Console) {
    let verified = vm.wait_for(&["compress: verified"], TIMEOUT);
    assert_eq!(
        verified,
        format!("compress: verified pages={MIX_PAGES} mismatches=0"),
        "{}",
        vm.seen
    );
}

/// The mix's zero, duplicate and text pages, less `slack`, are held.
fn assert_mix_held(m: &Value, slack: u64) {
    assert!(n(m, "pages_held") + slack >= 3 * MIX_PAGES / 4, "{m}");
}

#[test]
fn a_compressing_vm_saves_held_pages_without_faulting_them_in_and_loads_them_back_held() {
    let dir = scratch("compression-snapshot");
    let sock = dir.join("api.sock");
    // The guest idles long enough to be saved and loaded, then checks.
    let cmdline =
        format!("test=compress compress_mib={MIX_MIB} compress_idle_s=20 compress_hold_s=3");
    let mut vm = Console::spawn(&[
        "run",
        "--kernel",
        vigil_test_guest::ELF_PATH,
        "--api-sock",
        sock.to_str().unwrap(),
        "--memory-compression",
        "idle=1s",
        "--cmdline",
        &cmdline,
    ]);
    vm.wait_for(&["compress: filled"], TIMEOUT);
    let held = wait_mix_held(&sock);
    let ok = common::mobility::ok;
    ok(&sock, "PATCH", "/vm", json!({"state": "Paused"}));
    let (state, mem) = (dir.join("vm.snap"), dir.join("vm.mem"));
    ok(
        &sock,
        "PUT",
        "/snapshot/create",
        json!({"snapshot_path": state, "mem_file_path": mem, "snapshot_type": "Full"}),
    );
    let after = memory(&sock);
    // The snapshot writer read the held pages from the pool: none came back.
    assert_eq!(
        n(&after, "pages_restored"),
        n(&held, "pages_restored"),
        "{after}"
    );
    assert_mix_held(&after, 0);
    // Guest RAM starts at 0: the file's RAM image holds it at the same
    // offsets, but for the held pages, which are holes there: they follow
    // the image, compressed as the pool kept them.
    let file = std::fs::read(&mem).unwrap();
    let config = http::request(&sock, "GET", "/machine-config", "").json();
    let ram = (config["mem_size_mib"].as_u64().unwrap() * MIB) as usize;
    let base = 16 * MIB as usize;
    let mut holes = 0;
    for i in 0..MIX_PAGES {
        let page = &file[base + (i * 4096) as usize..][..4096];
        if i % 4 != 0 && page.iter().all(|&b| b == 0) {
            holes += 1;
            continue;
        }
        for w in 0..512 {
            let got = u64::from_le_bytes(page[w * 8..w * 8 + 8].try_into().unwrap());
            assert_eq!(
                got,
                vigil_test_guest::compress_mix_word(i, w as u64),
                "page {i} word {w} of the snapshot"
            );
        }
    }
    let held_data = n(&after, "pages_held") - n(&after, "zero_pages_held");
    assert!(holes >= MIX_PAGES / 2 - 8, "{holes} held pages left out");
    // A moment of running, then a diff: the pages written meanwhile, whole.
    ok(&sock, "PATCH", "/vm", json!({"state": "Resumed"}));
    std::thread::sleep(Duration::from_millis(300));
    ok(&sock, "PATCH", "/vm", json!({"state": "Paused"}));
    let (diff_state, diff) = (dir.join("diff.snap"), dir.join("diff.mem"));
    ok(
        &sock,
        "PUT",
        "/snapshot/create",
        json!({"snapshot_path": diff_state, "mem_file_path": diff, "snapshot_type": "Diff"}),
    );
    drop(vm);
    // The state lists the held pages; inspect checks the packed ones.
    let inspect = common::run(
        &[
            "snapshot",
            "inspect",
            state.to_str().unwrap(),
            "--mem",
            mem.to_str().unwrap(),
        ],
        TIMEOUT,
    );
    let line = inspect.line("memory held compressed at the capture: ");
    let pages: u64 = line.split_whitespace().nth(6).unwrap().parse().unwrap();
    assert_eq!(pages, n(&after, "pages_held"), "{line}");
    let line = inspect.line("packed pages: ");
    let packed: u64 = line.split_whitespace().nth(2).unwrap().parse().unwrap();
    assert_eq!(packed, held_data, "{line}");
    // The pool's bytes, the duplicates once, with an entry per page.
    let packed_bytes = (file.len() - ram) as u64;
    assert!(
        packed_bytes <= n(&after, "pool_bytes") + 20 * packed + 32,
        "{packed_bytes} bytes packed: {after}"
    );
    assert!(
        inspect.stdout.contains(&format!(
            "then {packed_bytes} bytes of packed pages (checked)"
        )),
        "{}",
        inspect.stdout
    );

    // Loaded by a Vigil with the pager: the held pages go to its pool at the
    // load, the guest goes on idling, then finds every byte.
    let sock = dir.join("restored.sock");
    let mut restored = Console::spawn(&[
        "run",
        "--api-sock",
        sock.to_str().unwrap(),
        "--memory-compression",
        "idle=1s",
    ]);
    common::http::wait_for(&sock, TIMEOUT);
    ok(
        &sock,
        "PUT",
        "/snapshot/load",
        json!({"snapshot_path": state, "mem_backend": {"backend_type": "File", "backend_path": mem}, "resume_vm": true}),
    );
    let loaded = memory(&sock);
    // Zero pages are holes in the file, left unbacked: the rest are held.
    assert!(n(&loaded, "pages_held") + 8 >= MIX_PAGES / 2, "{loaded}");
    wait_verified(&mut restored);
    let after = memory(&sock);
    assert!(
        n(&after, "pages_restored") >= MIX_PAGES / 2 - 8,
        "the guest's reads put the held pages back: {after}"
    );
    let line = restored.wait_for(&["TEST compress"], TIMEOUT);
    assert!(
        line.starts_with("TEST compress PASS"),
        "{line}\n{}",
        restored.seen
    );

    // Loaded by a Vigil without the pager: the packed pages are unpacked
    // into its memory at the load. And the diff merged onto a copy of the
    // full memory file: the packed pages it did not replace are unpacked into
    // the copy's RAM image, all the merged file keeps. Either way the guest
    // finds every byte.
    let merged = dir.join("merged.mem");
    std::fs::copy(&mem, &merged).unwrap();
    let r = common::run(
        &[
            "snapshot",
            "merge",
            "--base",
            merged.to_str().unwrap(),
            "--diff",
            diff.to_str().unwrap(),
        ],
        TIMEOUT,
    );
    // All but those the diff wrote again.
    let word = |after: &str| -> Option<u64> {
        let at = r.stderr.find(after)? + after.len();
        r.stderr[at..].split_whitespace().next()?.parse().ok()
    };
    let (copied, unpacked) = (word(".mem: "), word(" bytes); "));
    assert!(
        r.code == Some(0)
            && unpacked
                .zip(copied)
                .is_some_and(|(u, c)| u <= packed && u + c / 4096 >= packed),
        "{r}"
    );
    assert_eq!(
        std::fs::metadata(&merged).unwrap().len() as usize,
        ram,
        "the RAM image alone"
    );
    let mut plain = Vec::new();
    for (state, mem) in [(&state, &mem), (&diff_state, &merged)] {
        let sock = dir.join(format!("plain-{}.sock", plain.len()));
        let vm = Console::spawn(&["run", "--api-sock", sock.to_str().unwrap()]);
        common::http::wait_for(&sock, TIMEOUT);
        ok(
            &sock,
            "PUT",
            "/snapshot/load",
            json!({"snapshot_path": state, "mem_backend": {"backend_type": "File", "backend_path": mem}, "resume_vm": true}),
        );
        plain.push(vm);
    }
    for vm in &mut plain {
        wait_verified(vm);
        let line = vm.wait_for(&["TEST compress"], TIMEOUT);
        assert!(
            line.starts_with("TEST compress PASS"),
            "{line}\n{}",
            vm.seen
        );
    }

    // The Uffd backend fills memory from a handler: refused with the pager,
    // and without it for a memory file with packed pages, which a handler
    // does not serve.
    for pager in [true, false] {
        let sock = dir.join(format!("uffd-{pager}.sock"));
        let mut args = vec!["run", "--api-sock", sock.to_str().unwrap()];
        if pager {
            args.extend(["--memory-compression", "on"]);
        }
        let _uffd = Console::spawn(&args);
        common::http::wait_for(&sock, TIMEOUT);
        let body = json!({"snapshot_path": state, "mem_backend": {"backend_type": "Uffd", "backend_path": dir.join("handler.sock")}});
        let a = http::request(&sock, "PUT", "/snapshot/load", &body.to_string());
        assert_eq!(a.status, 400, "{a:?}");
        assert!(a.body.contains("mem_backend.backend_type"), "{a:?}");
        if !pager {
            assert!(
                a.body.contains(&format!("keeps {packed} pages compressed")),
                "{a:?}"
            );
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_compressing_vm_migrates_its_held_pages_packed_into_the_destinations_pool() {
    migrate_compressing(true);
}

#[test]
fn a_compressing_vm_migrates_to_a_destination_without_the_pager_with_every_byte() {
    migrate_compressing(false);
}

/// A VM whose pager (Zstandard here; LZ4 in the other tests) holds the mix
/// migrates to a destination with the same pager or none; the guest then
/// checks every byte there.
fn migrate_compressing(dest_pager: bool) {
    use common::mobility::{destination, ok, TOKEN};
    let dir = scratch(&format!("compression-migrate-{dest_pager}"));
    let extra: &[&str] = if dest_pager {
        &["--memory-compression", "idle=1s,algo=zstd"]
    } else {
        &[]
    };
    let (mut dest, dest_sock, target) = destination(&dir, "dest", extra);
    let sock = dir.join("source.sock");
    let cmdline = format!("test=compress compress_mib={MIX_MIB} compress_idle_s=12");
    let mut src = Console::spawn(&[
        "run",
        "--kernel",
        vigil_test_guest::ELF_PATH,
        "--api-sock",
        sock.to_str().unwrap(),
        "--memory-compression",
        "idle=1s,algo=zstd",
        "--cmdline",
        &cmdline,
    ]);
    src.wait_for(&["compress: filled"], TIMEOUT);
    wait_mix_held(&sock);
    ok(
        &sock,
        "PUT",
        "/vigil/migration",
        json!({"destination": target, "token": TOKEN}),
    );
    let deadline = Instant::now() + TIMEOUT;
    let arrived = loop {
        let a = http::request(&dest_sock, "GET", "/vigil/memory", "");
        if a.status == 200 {
            break a.json();
        }
        assert!(Instant::now() < deadline, "the VM never arrived: {a:?}");
        std::thread::sleep(Duration::from_millis(50));
    };
    if dest_pager {
        // Held as soon as the VM is there: the duplicate and text pages came
        // packed, as the source's pool kept them, and went into this pool,
        // none compressed here; the zero pages never came.
        assert_eq!(n(&arrived, "pages_compressed"), 0, "{arrived}");
        assert!(n(&arrived, "pages_held") >= MIX_PAGES / 2 - 8, "{arrived}");
    } else {
        assert!(
            !arrived["compression"]["enabled"].as_bool().unwrap(),
            "{arrived}"
        );
    }
    // The guest goes on idling at the destination, then checks every byte.
    wait_verified(&mut dest);
    let run = src.finish(TIMEOUT);
    assert_eq!(run.code, Some(0), "{run}");
    assert!(run.stderr.contains("the VM migrated to"), "{run}");
    drop(dest);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn cold_memory_leaves_ram_and_every_byte_comes_back() {
    let dir = scratch("compression");
    let sock = dir.join("api.sock");
    // Sector 0 as the guest expects it (density.rs `disk_byte`).
    let disk = dir.join("disk.img");
    let mut image = vec![0u8; MIB as usize];
    for (i, b) in image.iter_mut().take(512).enumerate() {
        *b = (i * 13 + 7) as u8;
    }
    std::fs::write(&disk, &image).unwrap();
    // Held 3 s after the check: the host reads its figures while the VM runs.
    let cmdline = format!(
        "test=compress compress_mib={MIX_MIB} compress_idle_s=12 compress_blk=1 compress_hold_s=3"
    );
    let mut vm = Console::spawn(&[
        "run",
        "--kernel",
        vigil_test_guest::ELF_PATH,
        "--memory",
        "128",
        "--api-sock",
        sock.to_str().unwrap(),
        "--disk",
        &format!("path={},id=disk", disk.display()),
        "--memory-compression",
        "idle=2s",
        "--cmdline",
        &cmdline,
    ]);
    vm.wait_for(&["compress: filled"], TIMEOUT);
    let pid = vm.pid();
    let filled = rss_bytes(pid);

    // Zeros and duplicates go first; text once compressed. Random data stays.
    let idle = wait_mix_held(&sock);
    let low = rss_bytes(pid);
    assert!(idle["compression"]["enabled"].as_bool().unwrap());
    // Three quarters of the mix (zero, duplicate, text) may leave RAM; the
    // text's pool is small.
    let saved = n(&idle, "bytes_saved");
    assert!(saved >= 11 * MIB, "saved {saved}: {idle}");
    assert!(n(&idle, "pool_bytes") < MIB, "{idle}");
    assert!(n(&idle, "pages_incompressible") >= MIX_PAGES / 4, "{idle}");
    assert!(
        filled.saturating_sub(low) >= 10 * MIB,
        "VmRSS {filled} -> {low}: {idle}"
    );

    // The disk read into a held page, then every byte checked by the guest.
    let verified = vm.wait_for(&["compress: verified"], TIMEOUT);
    let high = rss_bytes(pid);
    assert_eq!(
        verified,
        format!("compress: verified pages={MIX_PAGES} mismatches=0"),
        "{}",
        vm.seen
    );
    let after = memory(&sock);
    // Duplicate and text pages are private copies again; zero pages map the
    // shared zero page, which VmRSS does not count.
    assert!(
        high.saturating_sub(low) >= 6 * MIB,
        "VmRSS {low} -> {high}: {after}"
    );
    assert!(
        n(&after, "pages_restored") >= MIX_PAGES / 2 + n(&idle, "pages_restored"),
        "{after}"
    );
    assert!(
        after["compression"]["fault_in_p99_ns"].as_u64().is_some(),
        "{after}"
    );
    let line = vm.wait_for(&["TEST compress"], TIMEOUT);
    assert!(
        line.starts_with("TEST compress PASS"),
        "{line}\n{}",
        vm.seen
    );
    let r = vm.finish(TIMEOUT);
    assert_eq!(r.code, Some(0), "{r}");
    eprintln!(
        "filled {} MiB, idle {} MiB, verified {} MiB (VmRSS); {idle}",
        filled / MIB,
        low / MIB,
        high / MIB
    );
}

/// `PATCH /vigil/memory` changes a running pager's policy: an RSS target set
/// while the guest idles takes pages an idle time of an hour would not have;
/// bad values are refused naming the field, and a VM without the pager says
/// so.
#[test]
fn the_pager_policy_changes_while_the_vm_runs() {
    let dir = scratch("compression-policy");
    let sock = dir.join("api.sock");
    let cmdline = format!("test=compress compress_mib={MIX_MIB} compress_idle_s=60");
    let spawn = |sock: &Path, compression: &[&str]| {
        let mut args = vec![
            "run",
            "--kernel",
            vigil_test_guest::ELF_PATH,
            "--api-sock",
            sock.to_str().unwrap(),
            "--cmdline",
            &cmdline,
        ];
        args.extend_from_slice(compression);
        Console::spawn(&args)
    };
    let mut vm = spawn(&sock, &["--memory-compression", "idle=1h"]);
    vm.wait_for(&["compress: filled"], TIMEOUT);
    let m = memory(&sock);
    assert_eq!(
        m["policy"],
        json!({"idle_ms": 3_600_000, "rss_mib": null, "algo": "lz4"}),
        "{m}"
    );
    let patch = |body: &str| http::request(&sock, "PATCH", "/vigil/memory", body);
    for (body, why) in [
        (r#"{"rss_mib": 0}"#, "rss_mib=0: expected 1 to 16777216 MiB"),
        (
            r#"{"idle_ms": 10}"#,
            "idle_ms=10: expected 200 to 86400000 ms",
        ),
        (
            r#"{"idle_ms": null}"#,
            "idle_ms=null: the pager needs an idle time or an RSS target",
        ),
        (r#"{"rss": 8}"#, "unknown field `rss`"),
        (r#"{"rss_mib": "8"}"#, "rss_mib"),
    ] {
        let a = patch(body);
        assert_eq!(a.status, 400, "{body}: {a:?}");
        assert!(a.fault().contains(why), "{body}: {}", a.fault());
    }
    // Nothing leaves for an hour's idle time.
    assert_eq!(n(&memory(&sock), "pages_held"), 0);
    // A target of 4 MiB of guest memory (the guest's image and the mix's
    // random quarter are more): as much as can leave, leaves.
    let a = patch(r#"{"rss_mib": 4}"#);
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(
        a.json()["policy"],
        json!({"idle_ms": 3_600_000, "rss_mib": 4, "algo": "lz4"})
    );
    let m = wait_mix_held(&sock);
    assert_eq!(m["policy"]["rss_mib"], 4, "{m}");
    // Cleared again: the idle time alone.
    let a = patch(r#"{"rss_mib": null}"#);
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.json()["policy"]["rss_mib"], Value::Null);
    drop(vm);

    // Without the pager: nothing to change, and no policy to show.
    let plain_sock = dir.join("plain.sock");
    let mut plain = spawn(&plain_sock, &[]);
    plain.wait_for(&["compress: filled"], TIMEOUT);
    let a = http::request(&plain_sock, "PATCH", "/vigil/memory", r#"{"rss_mib": 64}"#);
    assert_eq!(a.status, 400, "{a:?}");
    assert!(
        a.fault()
            .contains("the VM runs without the memory-compression pager"),
        "{}",
        a.fault()
    );
    assert_eq!(memory(&plain_sock)["policy"], Value::Null);
    drop(plain);
    std::fs::remove_dir_all(&dir).ok();
}
