//! `vigil ctl migrate`: a VM moves between two daemons on this host (the other
//! daemon reached over its TCP API with its token), keeps counting there, and the
//! first daemon's record says where it went; a migration the other daemon refuses
//! leaves the VM running where it was.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::daemon::{free_loopback_addr, tcp_args, wait_for_state, Daemon};

/// Waits until the VM's console in `d`'s state folder has a line starting with
/// `prefix`; returns the console.
fn console_has(d: &Daemon, id: &str, prefix: &str) -> String {
    let path = d.dir.join("state").join("vms").join(id).join("console.log");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        if text.lines().any(|l| l.starts_with(prefix)) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{id}: no {prefix:?} in\n{text}\n--- daemon\n{}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn last_count(console: &str) -> u64 {
    console
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("counter: ")?.trim().parse().ok())
        .unwrap_or(0)
}

fn token_file(dir: &Path, token: &str) -> std::path::PathBuf {
    let path = dir.join("peer.token");
    std::fs::write(&path, format!("{token}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

#[test]
fn ctl_migrate_moves_a_running_vm_to_another_daemon() {
    let a = Daemon::start("migrate-a", &[]);
    let addr = free_loopback_addr();
    let token = token_file(&a.dir, "b-daemon-token-0123456789");
    let b = Daemon::start("migrate-b", &tcp_args(&addr, &token));
    a.create("m1", "counter");
    a.create("m2", "counter");
    console_has(&a, "m1", "counter: 3");

    // A peer token the other daemon does not accept: refused, nothing moves.
    let wrong = a.dir.join("wrong.token");
    std::fs::write(&wrong, "not-the-token-of-b-at-all\n").unwrap();
    let r = a.ctl(&[
        "migrate",
        "m2",
        "--to",
        &addr,
        "--peer-token-file",
        wrong.to_str().unwrap(),
    ]);
    assert_eq!(r.code, Some(1), "{r}");
    assert!(r.stderr.contains("refused to receive the VM"), "{r}");
    wait_for_state(&a, "m2", "running");

    let r = a.ctl_ok(&[
        "--json",
        "migrate",
        "m1",
        "--to",
        &addr,
        "--peer-token-file",
        token.to_str().unwrap(),
        "--downtime-ms",
        "50",
    ]);
    let record: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(record["state"], "migrated", "{r}");
    let reason = record["exit"]["reason"].as_str().unwrap_or_default();
    assert!(reason.starts_with("migrated to tcp:127.0.0.1:"), "{record}");

    // It runs there, counting on from where it was.
    wait_for_state(&b, "m1", "running");
    let before =
        last_count(&std::fs::read_to_string(a.dir.join("state/vms/m1/console.log")).unwrap());
    let there = console_has(&b, "m1", &format!("counter: {}", before + 3));
    let first = there
        .lines()
        .filter_map(|l| l.strip_prefix("counter: ")?.trim().parse::<u64>().ok())
        .next()
        .unwrap();
    assert!(
        first == before + 1 || first == before + 2,
        "{before} then {first}"
    );
    assert!(!there.contains("FAIL"), "{there}");
    wait_for_state(&a, "m2", "running");
    let (_, inspected) = b.http("GET", "/vms/m1", None);
    assert_eq!(
        inspected["config"]["machine-config"]["mem_size_mib"], 32,
        "the record there keeps the configuration: {inspected}"
    );
}
