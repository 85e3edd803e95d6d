//! The dashboard in headless Chromium against a fake daemon: the same API shapes as
//! `vigil daemon` (bearer token, `GET /vms`, `GET /vms/{id}/metrics`, `PATCH /vms/{id}`,
//! `POST /vms/{id}/stop`, `GET /events` as server-sent events), with counters that
//! advance by themselves, so the page's logic is tested without KVM. The test with a
//! real daemon and a booted guest is `crates/vigil/tests/dashboard.rs`.
//!
//! Skipped, with a SKIP line, where no `chromium` binary is found.

mod cdp;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::broadcast;

const TOKEN: &str = "test-token-3f9a";

struct FakeVm {
    state: String,
    started: Instant,
    /// Guest time accumulated while running, ns.
    run_ns: u64,
    last: Instant,
}

impl FakeVm {
    fn tick(&mut self) {
        let now = Instant::now();
        if self.state == "running" {
            self.run_ns += now.duration_since(self.last).as_nanos() as u64;
        }
        self.last = now;
    }
}

#[derive(Clone)]
struct Fake {
    vms: Arc<Mutex<BTreeMap<String, FakeVm>>>,
    events: broadcast::Sender<String>,
    /// The next PATCH fails with a 500, as a daemon in trouble would.
    fail_next: Arc<Mutex<bool>>,
}

impl Fake {
    fn event(&self, rule: &str, priority: &str, id: &str, output: String) {
        let ev = json!({
            "time": "2026-01-01T00:00:00.000000000Z",
            "rule": rule,
            "priority": priority,
            "output": output,
            "output_fields": { "vm.id": id },
            "source": "vigil",
        });
        let _ = self.events.send(ev.to_string());
    }
}

async fn auth(req: Request, next: Next) -> Response {
    let ok = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == format!("Bearer {TOKEN}"));
    if ok {
        next.run(req).await
    } else {
        (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": "unauthorized"})),
        )
            .into_response()
    }
}

async fn list(State(f): State<Fake>) -> Json<Value> {
    let mut vms = f.vms.lock().unwrap_or_else(|e| e.into_inner());
    let list: Vec<Value> = vms
        .iter_mut()
        .map(|(id, vm)| {
            vm.tick();
            json!({ "id": id, "state": vm.state, "vcpus": 2, "memory_mib": 128,
                    "uptime_s": vm.started.elapsed().as_secs_f64() })
        })
        .collect();
    Json(json!(list))
}

async fn metrics(State(f): State<Fake>, Path(id): Path<String>) -> Response {
    let mut vms = f.vms.lock().unwrap_or_else(|e| e.into_inner());
    let Some(vm) = vms.get_mut(&id) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    vm.tick();
    // 5000 I/O exits a second of running time, half a CPU, 1 MB/s of disk.
    let run_s = vm.run_ns as f64 / 1e9;
    Json(json!({
        "uptime_ns": vm.started.elapsed().as_nanos() as u64,
        "vcpus": [
            { "id": 0, "exits": { "io": (run_s * 4000.0) as u64, "mmio": (run_s * 1000.0) as u64, "hlt": 0 },
              "guest_ns": vm.run_ns / 2, "cpu_ns": vm.run_ns / 2 },
        ],
        "memory": { "rss_bytes": 40_000_000u64 + (run_s * 100_000.0) as u64 },
        "memory_compression": { "enabled": true, "bytes_saved": 12u64 << 20, "ratio_percent": 394 },
        "devices": [
            { "name": "rootfs", "kind": "block", "bytes_in": (run_s * 1e6) as u64, "bytes_out": 0 },
        ],
    }))
    .into_response()
}

async fn patch(State(f): State<Fake>, Path(id): Path<String>, Json(body): Json<Value>) -> Response {
    let want = body["state"].as_str().unwrap_or("");
    if std::mem::take(&mut *f.fail_next.lock().unwrap_or_else(|e| e.into_inner())) {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"error": "injected failure"})),
        )
            .into_response();
    }
    let mut vms = f.vms.lock().unwrap_or_else(|e| e.into_inner());
    let Some(vm) = vms.get_mut(&id) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    vm.tick();
    let (from, to, rule) = match want {
        "Paused" => ("running", "paused", "VM paused"),
        "Resumed" => ("paused", "running", "VM resumed"),
        _ => return (StatusCode::BAD_REQUEST, Json(json!({"error": "bad state"}))).into_response(),
    };
    if vm.state != from {
        return (
            StatusCode::CONFLICT,
            Json(json!({"error": format!("VM {id} is {}", vm.state)})),
        )
            .into_response();
    }
    vm.state = to.to_string();
    drop(vms);
    f.event(rule, "Informational", &id, format!("{rule} (vm.id={id})"));
    StatusCode::NO_CONTENT.into_response()
}

async fn stop(State(f): State<Fake>, Path(id): Path<String>) -> Response {
    let mut vms = f.vms.lock().unwrap_or_else(|e| e.into_inner());
    let Some(vm) = vms.get_mut(&id) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    vm.state = "stopped".to_string();
    drop(vms);
    f.event(
        "VM stopped",
        "Notice",
        &id,
        format!("VM stopped (vm.id={id})"),
    );
    StatusCode::NO_CONTENT.into_response()
}

async fn events(State(f): State<Fake>) -> Response {
    let rx = f.events.subscribe();
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        loop {
            match rx.recv().await {
                Ok(ev) => return Some((Ok::<_, Infallible>(format!("data: {ev}\n\n")), rx)),
                Err(broadcast::error::RecvError::Lagged(_)) => continue,
                Err(broadcast::error::RecvError::Closed) => return None,
            }
        }
    });
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        axum::body::Body::from_stream(stream),
    )
        .into_response()
}

/// Serves the dashboard and the fake API on 127.0.0.1; returns its base URL.
fn start_fake(fake: Fake) -> Result<(String, tokio::runtime::Runtime), String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let api = Router::new()
        .route("/vms", get(list))
        .route("/vms/{id}", axum::routing::patch(patch))
        .route("/vms/{id}/metrics", get(metrics))
        .route("/vms/{id}/stop", post(stop))
        .route("/events", get(events))
        .layer(middleware::from_fn(auth));
    let app = api.merge(vigil_dashboard::router()).with_state(fake);
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    rt.spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((format!("http://{addr}/"), rt))
}

fn js_str(s: &str) -> String {
    serde_json::to_string(s).unwrap_or_default()
}

#[test]
fn dashboard_in_chromium_against_a_fake_daemon() {
    let Some(chromium) = cdp::find_chromium() else {
        eprintln!("SKIP: no chromium binary (apt-get install chromium, or set VIGIL_CHROMIUM)");
        return;
    };
    let (events_tx, _) = broadcast::channel(64);
    let fake = Fake {
        vms: Arc::default(),
        events: events_tx,
        fail_next: Arc::default(),
    };
    let now = Instant::now();
    fake.vms.lock().unwrap().insert(
        "web-1".into(),
        FakeVm {
            state: "running".into(),
            started: now,
            run_ns: 0,
            last: now,
        },
    );
    let (url, _rt) = start_fake(fake.clone()).expect("fake daemon");
    let mut b = cdp::Browser::launch(&chromium, 1280, 800).expect("launch chromium");
    let secs = Duration::from_secs;

    b.navigate(&url).expect("load the page");
    // Without the token the data is refused and the page asks for it.
    b.wait_for("!document.getElementById('login').hidden", secs(10))
        .expect("token prompt");
    b.type_into("#token", TOKEN).expect("type the token");
    b.press_enter().expect("submit");

    b.wait_for(
        "document.querySelector('tr[data-vm-id=\"web-1\"]')?.dataset.state === 'Running'",
        secs(10),
    )
    .expect("the VM's row, Running");
    // The compression pager's saving, in its column.
    let saved = b
        .wait_for(
            "document.querySelector('tr[data-vm-id=\"web-1\"]').cells[8].textContent.includes('MiB') && document.querySelector('tr[data-vm-id=\"web-1\"]').cells[8].textContent",
            secs(5),
        )
        .expect("the saved column");
    assert_eq!(saved, json!("12.0 MiB (3.9\u{d7})"));
    // The chart gains points as samples arrive, one a second.
    let n0 = b
        .wait_for("window.vigilDashboard.series('web-1').length", secs(10))
        .expect("first chart point")
        .as_u64()
        .unwrap_or(0);
    b.wait_for(
        &format!("window.vigilDashboard.series('web-1').length >= {}", n0 + 2),
        secs(10),
    )
    .expect("the chart gets new points");
    let exits = b
        .eval("window.vigilDashboard.series('web-1').at(-1).exits")
        .expect("last point");
    let rate = exits.as_f64().unwrap_or(0.0);
    assert!(
        (3000.0..7000.0).contains(&rate),
        "exits/s {rate}, want about 5000"
    );
    let cpu = b
        .eval("window.vigilDashboard.series('web-1').at(-1).cpu")
        .expect("cpu")
        .as_f64()
        .unwrap_or(0.0);
    assert!((30.0..70.0).contains(&cpu), "cpu {cpu} %, want about 50");
    b.wait_for(
        "Number(document.getElementById('chart-exits').dataset.points) >= 2",
        secs(5),
    )
    .expect("the exits chart drew its points");

    std::fs::create_dir_all(env!("CARGO_TARGET_TMPDIR")).ok();
    let shot = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-fake.png");
    if let Ok(png) = b.screenshot() {
        std::fs::write(&shot, png).ok();
        eprintln!("screenshot: {}", shot.display());
    }

    // Pause through the UI: the row says Paused, the fake daemon agrees, an event arrives.
    b.click("#btn-pause").expect("click Pause");
    b.wait_for(
        "document.querySelector('tr[data-vm-id=\"web-1\"]').dataset.state === 'Paused'",
        secs(5),
    )
    .expect("row becomes Paused");
    assert_eq!(fake.vms.lock().unwrap()["web-1"].state, "paused");
    b.wait_for(
        "[...document.querySelectorAll('#events li')].some(li => li.dataset.rule === 'VM paused')",
        secs(5),
    )
    .expect("the pause event in the events panel");
    assert_eq!(
        b.eval("document.getElementById('btn-pause').disabled")
            .unwrap(),
        json!(true)
    );

    // A failed call shows an error and leaves the VM as it was.
    *fake.fail_next.lock().unwrap() = true;
    b.click("#btn-resume").expect("click Resume");
    let err = b
        .wait_for(
            "!document.getElementById('error').hidden && document.getElementById('error-text').textContent",
            secs(5),
        )
        .expect("an error is shown");
    assert!(
        err.as_str().unwrap_or("").contains("500")
            && err.as_str().unwrap_or("").contains("injected failure"),
        "error text {err}"
    );
    assert_eq!(fake.vms.lock().unwrap()["web-1"].state, "paused");
    b.click("#error-dismiss").expect("dismiss");
    b.wait_for("document.getElementById('error').hidden", secs(5))
        .expect("error dismissed");

    b.click("#btn-resume").expect("click Resume");
    b.wait_for(
        "document.querySelector('tr[data-vm-id=\"web-1\"]').dataset.state === 'Running'",
        secs(5),
    )
    .expect("row becomes Running");

    // Stop asks first; Cancel keeps the VM running.
    b.click("#btn-stop").expect("click Stop");
    b.wait_for("document.getElementById('confirm-stop').open", secs(5))
        .expect("confirmation dialog");
    b.click("#confirm-stop button[value=cancel]")
        .expect("cancel");
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(fake.vms.lock().unwrap()["web-1"].state, "running");
    b.click("#btn-stop").expect("click Stop");
    b.wait_for("document.getElementById('confirm-stop').open", secs(5))
        .expect("confirmation dialog");
    b.click("#confirm-stop-yes").expect("confirm");
    b.wait_for(
        "document.querySelector('tr[data-vm-id=\"web-1\"]').dataset.state === 'Stopped'",
        secs(5),
    )
    .expect("row becomes Stopped");
    assert_eq!(fake.vms.lock().unwrap()["web-1"].state, "stopped");

    // Narrow screens: the charts stack and nothing overflows the page sideways.
    b.set_viewport(420, 800).expect("narrow viewport");
    b.eval(&format!(
        "window.vigilDashboard.select({})",
        js_str("web-1")
    ))
    .expect("select");
    let overflow = b
        .eval("document.documentElement.scrollWidth - window.innerWidth")
        .expect("scroll width");
    assert!(
        overflow.as_f64().unwrap_or(1.0) <= 0.0,
        "page overflows by {overflow}px"
    );
    if let Ok(png) = b.screenshot() {
        std::fs::write(shot.with_file_name("dashboard-fake-narrow.png"), png).ok();
    }
    let log = b.log_text();
    assert!(
        !log.contains("exception:") && !log.contains("Content Security Policy"),
        "page log:\n{log}"
    );
}
