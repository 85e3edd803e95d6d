//! A stand-in for `vigil run --api-sock S --config-file C` in the daemon's tests: it
//! serves a tiny part of the per-VM API and behaves as the JSON object in its
//! config's boot arguments (`"boot-source": {"boot_args": "{...}"}`, so that the
//! daemon takes the config as a valid VM's) says: {"exit": N} exits at once with status N (after writing "fake: exiting N" to
//! stderr), {"no_socket": true} never listens, {"metrics_delay_ms": N} answers
//! GET /vigil/metrics late, {"ignore_sigterm": true} survives SIGTERM,
//! {"console_flood": true} writes numbered lines to its console (stdout) as fast
//! as they are taken, until it ends.

use std::time::Duration;

use axum::routing::{get, patch, put};
use axum::{Json, Router};
use serde_json::{json, Value};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
            .unwrap_or_else(|| {
                eprintln!("fake_vmm: missing {name}");
                std::process::exit(2)
            })
    };
    let socket = arg("--api-sock");
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(arg("--config-file")).unwrap()).unwrap();
    let fake = config["boot-source"]["boot_args"]
        .as_str()
        .and_then(|args| serde_json::from_str(args).ok())
        .unwrap_or(json!({}));
    println!("fake console line");
    if fake.get("console_flood").is_some() {
        std::thread::spawn(|| {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            for i in 0u64.. {
                if writeln!(out, "fake flood line {i}").is_err() {
                    break;
                }
            }
        });
    }
    if let Some(code) = fake.get("exit").and_then(Value::as_i64) {
        eprintln!("fake: exiting {code}");
        std::process::exit(code as i32);
    }
    if fake.get("ignore_sigterm").is_some() {
        // SAFETY: ignoring a signal touches no memory of ours.
        unsafe { libc::signal(libc::SIGTERM, libc::SIG_IGN) };
    }
    let delay = Duration::from_millis(
        fake.get("metrics_delay_ms")
            .and_then(Value::as_u64)
            .unwrap_or(0),
    );
    let no_socket = fake.get("no_socket").is_some();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap();
        if no_socket {
            if fake.get("ignore_sigterm").is_none() {
                term.recv().await;
                std::process::exit(143);
            }
            std::future::pending::<()>().await;
        }
        let paused = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let p1 = paused.clone();
        let p2 = paused.clone();
        let app = Router::new()
            .route("/", get(move || async move {
                let state = if p1.load(std::sync::atomic::Ordering::Relaxed) { "Paused" } else { "Running" };
                Json(json!({"id": "fake", "state": state, "vmm_version": "0", "app_name": "fake"}))
            }))
            .route("/vm", patch(move |Json(body): Json<Value>| async move {
                let paused = body["state"] == "Paused";
                p2.store(paused, std::sync::atomic::Ordering::Relaxed);
                axum::http::StatusCode::NO_CONTENT
            }))
            .route("/actions", put(|| async { axum::http::StatusCode::NO_CONTENT }))
            .route("/vigil/metrics", get(move || async move {
                tokio::time::sleep(delay).await;
                let snapshot = vigil_metrics::VmMetricsSnapshot {
                    uptime_ns: 1_000_000_000,
                    memory: vigil_metrics::MemorySnapshot {
                        guest_bytes: 32 << 20,
                        ..Default::default()
                    },
                    ..Default::default()
                };
                Json(serde_json::to_value(snapshot).unwrap())
            }));
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        tokio::select! {
            _ = axum::serve(listener, app) => {}
            _ = async { loop { term.recv().await; if fake.get("ignore_sigterm").is_none() { break; } } } => {
                std::process::exit(143);
            }
        }
    });
}
