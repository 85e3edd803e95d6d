//! Introspection through the daemon, end to end: a VM created with `introspect`
//! (and, for the test, `debug_api`) has its syscall table hooked through its own
//! debug API; the finding reaches the daemon's security event stream once (JSON
//! output, `GET /events`, `vigil ctl events`) and its Prometheus `GET /metrics`.

mod common;

use common::{guest_symbol, hex_u64, json_lines, scratch};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::daemon::Daemon;
use common::http;
use serde_json::{json, Value};

fn wait_until<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Points the test guest's `sys_call_table[nr]` at `rootkit_sys_hook` through the
/// VM's debug API; returns the hook's address.
fn hook_syscall_entry(sock: &Path, nr: u64) -> u64 {
    let hook = guest_symbol("rootkit_sys_hook");
    let entry = guest_symbol("sys_call_table") + nr * 8;
    let body = json!({"address": format!("{entry:#x}"), "bytes": vigil_introspect::hex::bytes(&hook.to_le_bytes())});
    let w = http::request(sock, "PUT", "/vigil/debug/memory", &body.to_string());
    assert_eq!(w.status, 204, "{}", w.body);
    hook
}

#[test]
fn the_daemon_refuses_bad_introspection_settings() {
    let d = Daemon::start("dintro-bad", &[]);
    for (introspect, want) in [
        (json!({"period_ms": 0}), "introspect.period_ms 0"),
        (json!({"policy": "block"}), "introspect.policy \"block\""),
        (
            json!({"baseline_after_ms": 3_600_001}),
            "introspect.baseline_after_ms 3600001",
        ),
        (json!({"period": 5}), "unknown field `period`"),
    ] {
        let (status, body) = d.http(
            "POST",
            "/vms",
            Some(json!({"id": "bad", "config": d.config("hang"), "introspect": introspect})),
        );
        assert_eq!(status, 400, "{introspect}: {body}");
        let message = body["fault_message"].as_str().unwrap_or_default();
        assert!(message.contains(want), "{introspect}: {body}");
    }
    let (status, body) = d.http(
        "POST",
        "/vms",
        Some(json!({"id": "bad", "config": d.config("hang"),
                    "trace_syscalls": {"syscalls": "read;reboot"}})),
    );
    assert_eq!(status, 400, "{body}");
    assert!(
        body.to_string().contains("trace_syscalls.syscalls"),
        "{body}"
    );
    // `vigil ctl create --introspect` passes the settings on, and the refusal back.
    let config = d.config_file("hang");
    let r = d.ctl(&[
        "create",
        "bad",
        "--config",
        config.to_str().unwrap(),
        "--introspect",
        "period_ms=0",
    ]);
    assert_eq!(r.code, Some(1), "{r}");
    assert!(r.stderr.contains("introspect.period_ms 0"), "{r}");
    // Nothing was created.
    let (_, list) = d.http("GET", "/vms", None);
    assert_eq!(list, json!([]), "{list}");

    // `{}`: the VMM's defaults (`--introspect=`, `--trace-syscalls` of every call).
    let (status, vm) = d.http(
        "POST",
        "/vms",
        Some(json!({"id": "defaults", "config": d.config("hang"),
                    "introspect": {}, "trace_syscalls": {}})),
    );
    assert_eq!(status, 201, "{vm}\n--- daemon\n{}", d.log());
    assert_eq!(vm["introspect"], json!({}), "{vm}");
    assert_eq!(vm["trace_syscalls"], json!({}), "{vm}");
    assert!(vm.get("debug_api").is_none(), "{vm}");
    let sock = PathBuf::from(vm["api_socket"].as_str().unwrap());
    // The VMM starts the monitor just after it reports itself running.
    let s = wait_until("the monitor", Duration::from_secs(20), || {
        let r = http::request(&sock, "GET", "/vigil/introspect", "");
        (r.status == 200 && r.json()["monitoring"] == true).then(|| r.json())
    });
    assert_eq!(s["settings"]["period"], 1000, "{s}");
    // Without debug_api the debug writes are refused.
    let w = http::request(
        &sock,
        "PUT",
        "/vigil/debug/memory",
        r#"{"address": "0x1000", "bytes": "00"}"#,
    );
    assert_eq!(w.status, 403, "{}", w.body);
    d.ctl_ok(&["destroy", "defaults"]);
}

#[test]
fn a_hooked_syscall_table_is_a_security_event_of_the_daemon() {
    let files = scratch("hook");
    let jsonl = files.join("events.jsonl");
    let d = Daemon::start(
        "dintro-hook",
        &[
            "--events-output",
            &format!("json:{}", jsonl.display()),
            "--sample-interval",
            "0.2",
        ],
    );
    let (status, vm) = d.http(
        "POST",
        "/vms",
        Some(json!({
            "id": "rk",
            "config": d.config("hang"),
            "introspect": {"period_ms": 50, "policy": "report", "baseline_after_ms": 300},
            "debug_api": true,
        })),
    );
    assert_eq!(status, 201, "{vm}\n--- daemon\n{}", d.log());
    assert_eq!(
        vm["introspect"],
        json!({"period_ms": 50, "policy": "report", "baseline_after_ms": 300})
    );
    assert_eq!(vm["debug_api"], true, "{vm}");
    let sock = PathBuf::from(vm["api_socket"].as_str().unwrap());

    // The VM's own API: the monitor runs and takes its baseline.
    wait_until("the baseline", Duration::from_secs(20), || {
        let r = http::request(&sock, "GET", "/vigil/introspect", "");
        let s = if r.status == 200 { r.json() } else { json!({}) };
        (s["monitoring"] == true && s["baseline_taken"] == true).then_some(())
    });

    // The rootkit's move, through the debug API: sys_call_table[1] = rootkit_sys_hook.
    let hook = hook_syscall_entry(&sock, 1);

    // The finding reaches the daemon's event stream.
    let is_hook =
        |e: &Value| e["rule"] == "syscall_table_modified" && e["output_fields"]["vm.id"] == "rk";
    let e = wait_until(
        "a syscall_table_modified event",
        Duration::from_secs(20),
        || json_lines(&jsonl).into_iter().find(is_hook),
    );
    assert_eq!(e["source"], "vm", "{e}");
    assert_eq!(e["priority"], "Critical", "{e}");
    let tags: Vec<&str> = e["tags"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        tags.contains(&"T1014") && tags.contains(&"introspection"),
        "{e}"
    );
    let f = &e["output_fields"];
    let field = |k: &str| f[k].as_str().unwrap_or_default().to_owned();
    assert!(
        field("introspect.location").starts_with("sys_call_table[1]"),
        "{e}"
    );
    assert!(
        field("introspect.symbol").starts_with("rootkit_sys_hook"),
        "{e}"
    );
    assert!(
        field("introspect.from_symbol").starts_with("sys_vigil_1"),
        "{e}"
    );
    let from = hex_u64(&field("introspect.from"));
    assert_eq!(from, guest_symbol("sys_vigil_1"), "{e}");
    assert_eq!(f["introspect.to"], format!("{hook:#x}"), "{e}");
    assert_eq!(f["introspect.restored"], false, "{e}");
    assert!(f["introspect.seq"].as_u64().unwrap() >= 1, "{e}");

    // GET /events carries it too.
    let (status, sse) = d.http("GET", "/events?follow=false", None);
    assert_eq!(status, 200);
    let sse = sse.as_str().unwrap_or_default().to_owned();
    assert!(
        sse.lines().any(|l| l.starts_with("data:")
            && l.contains("\"rule\":\"syscall_table_modified\"")
            && l.contains("\"vm.id\":\"rk\"")),
        "{sse}"
    );

    // Prometheus on the daemon counts it.
    let want = "vigil_introspect_findings_total{vm=\"rk\",rule=\"syscall_table_modified\"} 1";
    let (_, metrics) = d.http("GET", "/metrics", None);
    let metrics = metrics.as_str().unwrap_or_default().to_owned();
    assert!(
        metrics.lines().any(|l| l == want),
        "{want} not in:\n{}",
        metrics
            .lines()
            .filter(|l| l.contains("introspect"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // Several more samples later: every finding of the VM once, none twice.
    std::thread::sleep(Duration::from_millis(1500));
    let events = json_lines(&jsonl);
    assert_eq!(events.iter().filter(|e| is_hook(e)).count(), 1);
    let mut seqs: Vec<u64> = events
        .iter()
        .filter_map(|e| e["output_fields"]["introspect.seq"].as_u64())
        .collect();
    let n = seqs.len();
    seqs.dedup();
    assert_eq!(seqs.len(), n, "a finding was emitted twice: {seqs:?}");
    let status = http::request(&sock, "GET", "/vigil/introspect", "").json();
    assert_eq!(status["findings"].as_u64(), Some(n as u64), "{status}");

    // `vigil ctl events` prints it with the location and both values.
    let r = d.ctl_ok(&["events"]);
    let line = r
        .stdout
        .lines()
        .find(|l| l.contains("syscall_table_modified"))
        .unwrap_or_else(|| panic!("{}", r.stdout));
    assert!(
        line.contains("vm=rk")
            && line.contains("sys_call_table[1]")
            && line.contains(&format!("{from:#x} <sys_vigil_1"))
            && line.contains(&format!("-> {hook:#x} <rootkit_sys_hook")),
        "{line}"
    );

    d.ctl_ok(&["destroy", "rk"]);
    drop(d);
    std::fs::remove_dir_all(&files).ok();
}

#[test]
fn a_finding_made_just_before_the_vm_stops_still_reaches_the_stream() {
    let files = scratch("last");
    let jsonl = files.join("events.jsonl");
    // Samples far apart: the VM is stopped between two, so its last finding can
    // only come from the findings file its process wrote.
    let d = Daemon::start(
        "dintro-last",
        &[
            "--events-output",
            &format!("json:{}", jsonl.display()),
            "--sample-interval",
            "4",
        ],
    );
    let (status, vm) = d.http(
        "POST",
        "/vms",
        Some(json!({
            "id": "brief",
            "config": d.config("hang"),
            "introspect": {"period_ms": 60000, "baseline_after_ms": 0},
            "debug_api": true,
        })),
    );
    assert_eq!(status, 201, "{vm}\n--- daemon\n{}", d.log());
    let sock = PathBuf::from(vm["api_socket"].as_str().unwrap());
    let dir = PathBuf::from(vm["dir"].as_str().unwrap());
    wait_until("the baseline", Duration::from_secs(20), || {
        let r = http::request(&sock, "GET", "/vigil/introspect", "");
        (r.status == 200 && r.json()["baseline_taken"] == true).then_some(())
    });
    hook_syscall_entry(&sock, 2);
    // The check (the period is a minute) finds it now; the VM stops at once.
    let c = http::request(&sock, "PUT", "/vigil/introspect/check", "");
    assert_eq!(c.status, 200, "{}", c.body);
    assert_eq!(c.json()[0]["rule"], "syscall_table_modified", "{}", c.body);
    d.ctl_ok(&["stop", "brief"]);
    // The VM's process wrote it down as it was found...
    let written = json_lines(&dir.join("findings.jsonl"));
    assert_eq!(written.len(), 1, "{written:?}");
    assert_eq!(written[0]["location"], "sys_call_table[2] (open)");
    // ...and the daemon emits it, once, after the VM has ended.
    let is_hook =
        |e: &Value| e["rule"] == "syscall_table_modified" && e["output_fields"]["vm.id"] == "brief";
    wait_until("the last finding", Duration::from_secs(20), || {
        json_lines(&jsonl).into_iter().find(is_hook)
    });
    std::thread::sleep(Duration::from_secs(5));
    let n = json_lines(&jsonl).into_iter().filter(is_hook).count();
    assert_eq!(n, 1, "emitted once\n--- daemon\n{}", d.log());
    d.ctl_ok(&["destroy", "brief"]);
}
