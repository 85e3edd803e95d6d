//! Seccomp confinement of the VMM (crates/seccomp): every thread of a running VM
//! is under its filter; a forbidden call by any kind of thread stops the VMM by
//! SIGSYS with a line naming the thread and the call (`VIGIL_SECCOMP_PROBE=KIND`
//! makes that kind's threads make one right after confining themselves);
//! `--no-seccomp` runs without filters and says so. The rest of the suite runs
//! with the filters on, so every scenario it boots shows they allow what the VMM
//! needs.

mod common;

use std::path::Path;

use common::http::{try_request, wait_for};
use common::mobility::{counting_guest, ok};
use common::{finish, scratch, vigil, Console, Run, TIMEOUT};
use serde_json::json;

/// `vigil ARGS` with `VIGIL_SECCOMP_PROBE=kind`, run to its end.
fn probed(kind: &str, args: &[&str]) -> Run {
    let child = vigil()
        .env("VIGIL_SECCOMP_PROBE", kind)
        .args(args)
        .spawn()
        .expect("spawn vigil");
    finish(child, TIMEOUT)
}

/// The VMM died by SIGSYS (no exit status) after naming the thread and the call.
fn assert_stopped_and_named(run: &Run, kind: &str) {
    assert_eq!(run.code, None, "the VMM was not killed by a signal\n{run}");
    let line = run
        .stderr
        .lines()
        .find(|l| l.starts_with("vigil: seccomp: "))
        .unwrap_or_else(|| panic!("no seccomp line\n{run}"));
    assert!(
        line.contains(&format!("the {kind} thread '")) && line.contains("forbids: mount (165)"),
        "{line}"
    );
}

#[test]
fn a_forbidden_call_by_each_kind_of_thread_stops_the_vmm_and_is_named() {
    let dir = scratch("seccomp-probe");
    let sock = dir.join("api.sock");
    let metrics = dir.join("metrics.json");
    let (sock, metrics) = (sock.to_str().unwrap(), metrics.to_str().unwrap());
    let cases: [(&str, &[&str]); 9] = [
        ("main", &["run"]),
        ("vcpu", &["run", "--cpus", "2"]),
        ("signals", &["run"]),
        ("devices", &["run", "--rng"]),
        ("metrics", &["run", "--metrics-path", metrics]),
        ("api", &["run", "--api-sock", sock]),
        ("rt-timer", &["run", "--rt-timer", "on"]),
        ("introspect", &["run", "--introspect", "period=600s"]),
        ("pager", &["run", "--memory-compression", "on"]),
    ];
    for (kind, args) in cases {
        let _ = std::fs::remove_file(sock);
        assert_stopped_and_named(&probed(kind, args), kind);
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_forbidden_call_by_the_migration_thread_stops_the_source() {
    let dir = scratch("seccomp-probe-migration");
    let sock = dir.join("source.sock");
    let mut cmd = vigil();
    cmd.env("VIGIL_SECCOMP_PROBE", "migration")
        .args(["run", "--api-sock"])
        .arg(&sock);
    let mut console = Console::spawn_command(cmd);
    wait_for(&sock, TIMEOUT);
    boot_counter(&sock);
    console.wait_for(&["counter: 2"], TIMEOUT);
    // The thread confines itself before it connects: no destination is needed.
    let nowhere = format!("unix:{}", dir.join("nowhere.mig").display());
    // The thread may kill the process before the API answers.
    let answer = try_request(
        &sock,
        "PUT",
        "/vigil/migration",
        &json!({"destination": nowhere, "token": "t"}).to_string(),
    );
    if let Some(answer) = answer {
        assert_eq!(answer.status, 204, "{}", answer.body);
    }
    assert_stopped_and_named(&console.finish(TIMEOUT), "migration");
    std::fs::remove_dir_all(&dir).ok();
}

fn boot_counter(sock: &Path) {
    ok(
        sock,
        "PUT",
        "/boot-source",
        json!({"kernel_image_path": vigil_test_guest::ELF_PATH, "boot_args": "test=counter"}),
    );
    ok(
        sock,
        "PUT",
        "/actions",
        json!({"action_type": "InstanceStart"}),
    );
}

/// `(comm, Seccomp mode, Seccomp_filters)` of every thread of process `pid`.
fn thread_confinement(pid: u32) -> Vec<(String, String, u32)> {
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let Ok(status) = std::fs::read_to_string(task.join("status")) else {
            continue; // the thread ended meanwhile
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        threads.push((
            field("Name:"),
            field("Seccomp:"),
            field("Seccomp_filters:").parse().unwrap_or(0),
        ));
    }
    threads.sort();
    threads
}

#[test]
fn every_thread_of_a_running_vm_is_confined_unless_asked_not_to() {
    let dir = scratch("seccomp-threads");
    // The counter guest runs until stopped; its VM has every usual thread.
    let (mut console, sock) = counting_guest(&dir);
    console.wait_for(&["counter: 5"], TIMEOUT);
    let threads = thread_confinement(console.pid());
    let names: Vec<&str> = threads.iter().map(|(n, _, _)| n.as_str()).collect();
    for expected in ["vigil", "vcpu0", "devices", "api", "signals", "metrics"] {
        assert!(
            names.contains(&expected),
            "no {expected} thread: {threads:?}"
        );
    }
    for (name, mode, filters) in &threads {
        // Mode 2 is SECCOMP_MODE_FILTER; each thread runs its own two filters
        // (threads started by the API thread hold its two as well).
        assert!(mode == "2" && *filters >= 2, "{name}: {threads:?}");
    }
    drop((console, sock));

    let mut plain = Console::spawn(&["run", "--no-seccomp", "--cmdline", "test=counter"]);
    plain.wait_for(&["counter: 3"], TIMEOUT);
    let threads = thread_confinement(plain.pid());
    assert!(
        threads.iter().all(|(_, mode, _)| mode == "0"),
        "{threads:?}"
    );
    // SAFETY: the pid is our child's.
    unsafe { libc::kill(plain.pid() as i32, libc::SIGTERM) };
    let run = plain.finish(TIMEOUT);
    assert!(run.stderr.contains("--no-seccomp"), "{run}");
    std::fs::remove_dir_all(&dir).ok();
}
