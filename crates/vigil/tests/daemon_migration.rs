//! `vigil ctl migrate`: a VM moves between two daemons on this host (the other
//! daemon reached over its TCP API with its token, over https), keeps counting there, and the
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
    let events = std::env::temp_dir().join(format!("vigil-migrate-a-{}.jsonl", std::process::id()));
    // The daemons talk and migrate over TLS: b serves its API and the VMs
    // arriving with its certificate, a trusts it for both.
    let certs = std::env::temp_dir().join(format!("vigil-migrate-certs-{}", std::process::id()));
    let (cert, key) = common::mobility::certificate(&certs, "127.0.0.1");
    let a = Daemon::start(
        "migrate-a",
        &[
            "--events-output",
            &format!("json:{}", events.display()),
            "--migration-tls-ca",
            cert.to_str().unwrap(),
            "--peer-tls-ca",
            cert.to_str().unwrap(),
        ],
    );
    let addr = free_loopback_addr();
    let url = format!("https://{addr}");
    let token = token_file(&a.dir, "b-daemon-token-0123456789");
    let mut b_args = tcp_args(&addr, &token).to_vec();
    b_args.extend([
        // The VMs arriving name their files in a's folder.
        "--allow-vm-path",
        a.dir.to_str().unwrap(),
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
        "--migration-tls-cert",
        cert.to_str().unwrap(),
        "--migration-tls-key",
        key.to_str().unwrap(),
    ]);
    let b = Daemon::start("migrate-b", &b_args);
    a.create("m1", "counter");
    // 8 MiB of written pages: at the 1 MiB/s below, its migration lasts seconds,
    // not one burst of the limiter.
    a.create("m2", "counter counter_fill_mib=8");
    console_has(&a, "m1", "counter: 3");

    // A peer token the other daemon does not accept: refused, nothing moves.
    let wrong = a.dir.join("wrong.token");
    std::fs::write(&wrong, "not-the-token-of-b-at-all\n").unwrap();
    let r = a.ctl(&[
        "migrate",
        "m2",
        "--to",
        &url,
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
        &url,
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
    let pid = inspected["pid"].as_u64().expect("the VM's process");
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap();
    assert!(
        String::from_utf8_lossy(&cmdline).contains("--migration-tls-cert"),
        "the VM arrived behind b's certificate"
    );

    // How it went, after: the status, the metrics and the events here.
    let (code, status) = a.http("GET", "/vms/m1/migration", None);
    assert_eq!(code, 200, "{status}");
    assert_eq!(status["state"], "completed", "{status}");
    for field in ["total_ms", "downtime_ms", "bytes_sent", "round"] {
        assert!(status[field].as_u64().is_some(), "{field}: {status}");
    }
    assert!(status["bytes_sent"].as_u64().unwrap() > 0, "{status}");
    let r = a.ctl_ok(&["metrics"]);
    for line in [
        "vigil_migration_state{vm=\"m1\",state=\"completed\"} 1",
        "vigil_migration_downtime_seconds{vm=\"m1\"} ",
        "vigil_migration_sent_bytes{vm=\"m1\"} ",
        "vigil_migration_duration_seconds{vm=\"m1\"} ",
    ] {
        assert!(r.stdout.contains(line), "{line}:\n{}", r.stdout);
    }
    let lifecycle: Vec<String> = common::json_lines(&events)
        .iter()
        .filter(|e| {
            e["output_fields"]["vm.id"] == "m1"
                || e["output"]
                    .as_str()
                    .is_some_and(|o| o.starts_with("vm m1 "))
        })
        .filter_map(|e| {
            e["output_fields"]["vm.lifecycle"]
                .as_str()
                .map(str::to_owned)
        })
        .collect();
    for what in ["migrating", "migration completed"] {
        assert!(lifecycle.iter().any(|l| l == what), "{what}: {lifecycle:?}");
    }
    let completed = common::json_lines(&events)
        .into_iter()
        .find(|e| e["output_fields"]["vm.lifecycle"] == "migration completed")
        .unwrap();
    assert!(
        completed["output_fields"]["migration.downtime_ms"].is_u64(),
        "{completed}"
    );

    // While one goes (slowly: 1 MiB/s), the daemon shows its progress.
    std::thread::scope(|scope| {
        let ctl = scope.spawn(|| {
            a.ctl_ok(&[
                "migrate",
                "m2",
                "--to",
                &url,
                "--peer-token-file",
                token.to_str().unwrap(),
                "--bandwidth-mib-s",
                "1",
            ])
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (code, status) = a.http("GET", "/vms/m2/migration", None);
            if code == 200
                && status["state"] == "precopy"
                && status["bytes_sent"].as_u64() > Some(0)
            {
                for field in [
                    "round",
                    "remaining_bytes",
                    "dirty_rate_bytes_per_s",
                    "bandwidth_bytes_per_s",
                    "predicted_downtime_ms",
                    "throttle_percent",
                ] {
                    assert!(status[field].as_u64().is_some(), "{field}: {status}");
                }
                break;
            }
            assert!(Instant::now() < deadline, "never seen under way: {status}");
            std::thread::sleep(Duration::from_millis(20));
        }
        let r = ctl.join().unwrap();
        // Not a terminal: no progress line, the summary.
        assert!(r.stderr.contains("completed: "), "{r}");
        assert!(r.stderr.contains(" ms in all, paused "), "{r}");
        assert!(!r.stderr.contains('\r'), "{r}");
    });
    wait_for_state(&a, "m2", "migrated");
    let _ = std::fs::remove_file(&events);
    let _ = std::fs::remove_dir_all(&certs);
}

/// Spins `n` threads until the returned flag is set: CPU pressure on the host.
fn hog(n: usize) -> std::sync::Arc<std::sync::atomic::AtomicBool> {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for _ in 0..n {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut x = 1u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                std::hint::black_box(x);
            }
        });
    }
    stop
}

/// The first `policy_action` migration event in a JSON-lines output, with `result`.
fn decision(path: &Path, result: &str) -> Option<serde_json::Value> {
    common::json_lines(path).into_iter().find(|e| {
        e["rule"] == "policy_action"
            && e["output_fields"]["policy.rule"] == "adaptive_migration"
            && e["output_fields"]["policy.result"] == result
    })
}

fn wait_decision(d: &Daemon, path: &Path, result: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        if let Some(e) = decision(path, result) {
            return e;
        }
        assert!(
            Instant::now() < deadline,
            "no {result} migration decision; events:\n{}\n--- daemon\n{}",
            std::fs::read_to_string(path).unwrap_or_default(),
            d.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_hot_host_makes_the_policy_move_a_vm_and_dry_run_only_reports() {
    if std::fs::read_to_string("/proc/pressure/cpu").is_err() {
        eprintln!("SKIPPED: the policy reads the host's pressure from /proc/pressure (PSI), which this kernel does not offer");
        return;
    }
    let addr = free_loopback_addr();
    let b_dir = std::env::temp_dir().join(format!("vigil-adaptive-{}", std::process::id()));
    std::fs::create_dir_all(&b_dir).unwrap();
    let token = token_file(&b_dir, "b-daemon-token-0123456789");
    // The policy reaches the peer over https, as an operator would.
    let (cert, key) = common::mobility::certificate(&b_dir.join("certs"), "127.0.0.1");
    // The VM arriving names its files in the acting daemon's folder: made now, so
    // that b can check it at its start (that daemon's start makes it anew).
    let act_dir = std::env::temp_dir().join(format!("vigil-d-adaptive-act-{}", std::process::id()));
    std::fs::create_dir_all(&act_dir).unwrap();
    let mut b_args = tcp_args(&addr, &token).to_vec();
    b_args.extend([
        "--allow-vm-path",
        act_dir.to_str().unwrap(),
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ]);
    let b = Daemon::start("adaptive-b", &b_args);
    let url = format!("https://{addr}");
    let peer = format!("{url}={}", token.display());
    let policy = |events: &Path, dry: bool| {
        let mut args = vec![
            "--migrate-peer".to_owned(),
            peer.clone(),
            "--peer-tls-ca".into(),
            cert.to_str().unwrap().into(),
            "--migrate-cpu-pressure".into(),
            "5".into(),
            "--migrate-window".into(),
            "3".into(),
            "--migrate-hits".into(),
            "2".into(),
            "--sample-interval".into(),
            "0.2".into(),
            "--events-output".into(),
            format!("json:{}", events.display()),
        ];
        if dry {
            args.push("--migrate-dry-run".into());
        }
        args
    };
    let stop = hog(6);

    // Dry run: the decision is reported with its reasons and costs; nothing moves.
    let dry_events = b_dir.join("dry.jsonl");
    let args = policy(&dry_events, true);
    let dry = Daemon::start(
        "adaptive-dry",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    dry.create("d1", "counter");
    let e = wait_decision(&dry, &dry_events, "dry_run");
    assert_eq!(e["output_fields"]["vm.id"], "d1", "{e}");
    assert_eq!(
        e["output_fields"]["policy.trigger_rule"], "host_cpu_pressure",
        "{e}"
    );
    let params = &e["output_fields"]["policy.params"];
    assert_eq!(params["to"], url.as_str(), "{e}");
    assert_eq!(params["method"], "pre-copy", "{e}");
    assert!(params["predicted_total_ms"].is_u64(), "{e}");
    assert!(
        params["reasons"][0]
            .as_str()
            .unwrap()
            .contains("host CPU pressure"),
        "{e}"
    );
    assert!(e["output"].as_str().unwrap().contains("dry run"), "{e}");
    std::thread::sleep(Duration::from_millis(600));
    wait_for_state(&dry, "d1", "running");
    assert!(decision(&dry_events, "started").is_none());
    drop(dry);

    // Acting: the VM moves to the peer.
    let events = b_dir.join("act.jsonl");
    let args = policy(&events, false);
    let a = Daemon::start(
        "adaptive-act",
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    a.create("m1", "counter");
    wait_decision(&a, &events, "started");
    let done = wait_decision(&a, &events, "ok");
    assert_eq!(done["output_fields"]["vm.id"], "m1", "{done}");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    wait_for_state(&a, "m1", "migrated");
    wait_for_state(&b, "m1", "running");
    console_has(&b, "m1", "counter: ");
    std::fs::remove_dir_all(&b_dir).ok();
}
