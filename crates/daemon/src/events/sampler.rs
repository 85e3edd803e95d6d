//! The sampler: every `--sample-interval`, each running VM's metrics snapshot and
//! the host's pressure readings to the detectors, and each VM's new
//! introspection findings as events (fetched from its API socket, or read from
//! its findings file once it has ended).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use vigil_events::{HostSample, Timestamp};

use super::{Events, Input};
use crate::balance::{Candidate, Decision, Policy, PolicySettings};
use crate::squeeze::{Action, Change, PagerVm, Squeezer};

/// A VM's memory and its pager's policy (`GET`), and where the policy
/// changes (`PATCH`).
const MEMORY_PATH: &str = "/vigil/memory";
use crate::findings::{
    finding_event, parse_findings_file, parse_records, FindingCursors, FindingRecord,
    FINDINGS_FILE, VM_FINDINGS_PATH,
};
use crate::supervisor::{MigrateRequest, Supervisor, VmState};

/// The sampler: every `interval`, each running VM's metrics snapshot (as `GET
/// /metrics` takes them) and the host's readings, to the detectors. Ends when
/// `stop` turns true.
pub async fn sample(
    supervisor: Arc<Supervisor>,
    events: Events,
    interval: Duration,
    scrape_timeout: Duration,
    mut policy: Option<Policy>,
    mut squeezer: Option<Squeezer>,
    mut stop: watch::Receiver<bool>,
) {
    let mut cursors = FindingCursors::default();
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let timeout = scrape_timeout.min(interval);
        let samples = crate::metrics::collect(&supervisor, timeout).await;
        emit_findings(&events, &mut cursors, &samples, timeout).await;
        let vms = samples
            .iter()
            .filter_map(|s| Some(vm_sample(&s.info.id, s.snapshot.as_ref()?)))
            .collect();
        let host = host_sample(&vigil_metrics::HostSnapshot::read());
        if let Some(policy) = policy.as_mut() {
            let candidates: Vec<Candidate> = samples
                .iter()
                .filter(|s| s.info.state == VmState::Running)
                .map(|s| Candidate {
                    id: s.info.id.clone(),
                    memory_bytes: s.info.memory_mib.unwrap_or(0) << 20,
                    dirty_bytes_per_s: s
                        .snapshot
                        .as_ref()
                        .and_then(|m| m.memory.dirty_bytes_per_s)
                        .unwrap_or(0) as f64,
                })
                .collect();
            if let Some(decision) = policy.observe(Instant::now(), &host, &candidates) {
                decide(&supervisor, &events, decision, policy.settings());
            }
        }
        if let Some(squeezer) = squeezer.as_mut() {
            squeeze(squeezer, &events, &samples, &host, timeout).await;
        }
        let _ = events.tx.send(Input::Tick { host, vms });
        events.flush_api_summaries();
    }
}

/// Reads the running VMs with the pager when the memory-pressure policy may
/// act, and sends and reports (`policy_action`) the changes it decides.
async fn squeeze(
    squeezer: &mut Squeezer,
    events: &Events,
    samples: &[crate::metrics::VmSample],
    host: &HostSample,
    timeout: Duration,
) {
    let psi = host.psi_memory_some_avg10;
    if !squeezer.wants_vms(psi) {
        return;
    }
    let mut reads = tokio::task::JoinSet::new();
    for s in samples {
        let enabled = s
            .snapshot
            .as_ref()
            .is_some_and(|m| m.memory_compression.enabled);
        if s.info.state != VmState::Running || !enabled {
            continue;
        }
        let (id, socket) = (s.info.id.clone(), s.info.api_socket.clone());
        let memory_mib = s.info.memory_mib.unwrap_or(0);
        reads.spawn(async move {
            let get = |path: &'static str| {
                let socket = socket.clone();
                async move {
                    match crate::client::request(&socket, "GET", path, None, timeout).await {
                        Ok(r) if r.is_success() => r.json(),
                        _ => None,
                    }
                }
            };
            let memory = get(MEMORY_PATH).await?;
            // A VM without a balloon answers 400.
            let balloon = get("/balloon").await;
            pager_vm(id, memory_mib, &memory, balloon.as_ref())
        });
    }
    let mut vms = Vec::new();
    while let Some(joined) = reads.join_next().await {
        if let Ok(Some(vm)) = joined {
            vms.push(vm);
        }
    }
    vms.sort_by(|a, b| a.id.cmp(&b.id));
    let actions = squeezer.observe(Instant::now(), psi, &vms);
    for action in actions {
        let Some(socket) = samples
            .iter()
            .find(|s| s.info.id == action.vm)
            .map(|s| s.info.api_socket.clone())
        else {
            continue;
        };
        let (path, body) = match action.change {
            Change::Balloon(mib) => ("/balloon", serde_json::json!({ "amount_mib": mib })),
            Change::Target(mib) => (MEMORY_PATH, serde_json::json!({ "rss_mib": mib })),
        };
        let body = body.to_string().into_bytes();
        let result = match crate::client::request(&socket, "PATCH", path, Some(body), timeout).await
        {
            Ok(r) if r.is_success() => Ok(()),
            Ok(r) => Err(r.fault_message()),
            Err(e) => Err(e.to_string()),
        };
        events.emit(squeeze_event(&action, result.err().as_deref()));
    }
}

/// A VM with the pager from its `GET /vigil/memory` and, when it has a
/// balloon, `GET /balloon`.
fn pager_vm(
    id: String,
    memory_mib: u64,
    memory: &serde_json::Value,
    balloon: Option<&serde_json::Value>,
) -> Option<PagerVm> {
    let compression = &memory["compression"];
    // Before the scanner's first count, the VMM's resident memory (more).
    let footprint = compression["footprint_bytes"]
        .as_u64()
        .filter(|&b| b > 0)
        .or_else(|| memory["rss_bytes"].as_u64())?;
    Some(PagerVm {
        id,
        memory_mib,
        footprint_mib: footprint >> 20,
        target_mib: memory["policy"]["rss_mib"].as_u64(),
        balloon_mib: balloon.and_then(|b| b["amount_mib"].as_u64()),
    })
}

/// The `policy_action` event of a memory-pressure change.
fn squeeze_event(a: &Action, error: Option<&str>) -> vigil_events::Event {
    let (what, params) = match a.change {
        Change::Balloon(mib) => (
            format!("balloon to {mib} MiB"),
            serde_json::json!({ "balloon_mib": mib }),
        ),
        Change::Target(Some(mib)) => (
            format!("RSS target to {mib} MiB"),
            serde_json::json!({ "rss_mib": mib }),
        ),
        Change::Target(None) => (
            "no RSS target".to_owned(),
            serde_json::json!({ "rss_mib": null }),
        ),
    };
    let outcome = error.map(|e| format!(": failed: {e}")).unwrap_or_default();
    let mut e = vigil_events::Event::new(
        vigil_events::Rule::PolicyAction,
        Timestamp::now(),
        format!(
            "policy: {} vm {}: {what} ({}){outcome}",
            a.kind, a.vm, a.reason
        ),
    )
    .with_vm(a.vm.clone())
    .with_priority(if error.is_some() {
        vigil_events::Priority::Error
    } else {
        vigil_events::Priority::Notice
    })
    .with_field("policy.action", a.kind)
    .with_field("policy.rule", "memory_pressure")
    .with_field(
        "policy.result",
        if error.is_some() { "failed" } else { "ok" },
    )
    .with_field("policy.params", params);
    if let Some(err) = error {
        e = e.with_field("policy.error", err);
    }
    e
}

/// Reports a migration decision as a `policy_action` event and, unless the
/// policy only reports (`dry_run`), starts the migration and reports how it ended.
fn decide(supervisor: &Arc<Supervisor>, events: &Events, d: Decision, settings: &PolicySettings) {
    if settings.dry_run {
        events.emit(decision_event(&d, "dry_run", None));
        return;
    }
    events.emit(decision_event(&d, "started", None));
    let (supervisor, events) = (supervisor.clone(), events.clone());
    let request = MigrateRequest {
        to: d.to.addr.clone(),
        peer_token: d.to.token.clone(),
        downtime_ms: Some(settings.downtime.as_millis() as u64),
        bandwidth_mib_s: None,
        method: Some(d.plan.method.migration_method()),
    };
    tokio::spawn(async move {
        match supervisor.migrate(&d.vm, request).await {
            Ok(_) => events.emit(decision_event(&d, "ok", None)),
            Err(e) => events.emit(decision_event(&d, "failed", Some(&e.to_string()))),
        }
    });
}

/// The `policy_action` event of a migration decision: `result` is `dry_run`,
/// `started`, `ok` or `failed` (with `error`).
fn decision_event(d: &Decision, result: &str, error: Option<&str>) -> vigil_events::Event {
    let outcome = match (result, error) {
        ("dry_run", _) => " [dry run: nothing moved]".to_owned(),
        (_, Some(e)) => format!(": failed: {e}"),
        _ => String::new(),
    };
    let mut e = vigil_events::Event::new(
        vigil_events::Rule::PolicyAction,
        Timestamp::now(),
        format!(
            "policy: migrate vm {} to {} ({}; {}){outcome}",
            d.vm,
            d.to.addr,
            d.plan.method.as_str(),
            d.reasons.join("; ")
        ),
    )
    .with_vm(d.vm.clone())
    .with_priority(if error.is_some() {
        vigil_events::Priority::Error
    } else {
        vigil_events::Priority::Notice
    })
    .with_field("policy.action", "migrate")
    .with_field("policy.rule", "adaptive_migration")
    .with_field("policy.trigger_rule", d.trigger.as_str())
    .with_field("policy.result", result)
    .with_field(
        "policy.params",
        serde_json::json!({
            "to": d.to.addr,
            "method": d.plan.method.as_str(),
            "rounds": d.plan.rounds,
            "predicted_bytes": d.plan.bytes as u64,
            "predicted_total_ms": d.plan.total.as_millis() as u64,
            "predicted_downtime_ms": d.plan.downtime.as_millis() as u64,
            "reasons": d.reasons,
        }),
    );
    if let Some(err) = error {
        e = e.with_field("policy.error", err);
    }
    e
}

/// Emits the introspection findings of each VM whose snapshot counts more of them
/// than were emitted (see [`crate::findings`]); forgets the VMs that are gone.
async fn emit_findings(
    events: &Events,
    cursors: &mut FindingCursors,
    samples: &[crate::metrics::VmSample],
    timeout: Duration,
) {
    cursors.retain(samples.iter().map(|s| s.info.id.as_str()));
    let emit = |id: &str, records: &[FindingRecord]| {
        for r in records {
            events.emit(finding_event(id, r));
        }
    };
    // VMs that ended: what they found after the last fetch, from their file.
    for s in samples.iter().filter(|s| !s.info.state.is_live()) {
        let Some(since) = cursors.drain(&s.info.id) else {
            continue;
        };
        let path = s.info.dir.join(FINDINGS_FILE);
        // A small local file, read once per ended VM.
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                tracing::warn!(id = s.info.id, "cannot read {}: {e}", path.display());
                continue;
            }
        };
        let records = crate::findings::after(since, parse_findings_file(&text));
        emit(&s.info.id, &records);
    }
    let mut fetches = tokio::task::JoinSet::new();
    for s in samples {
        let Some(snapshot) = &s.snapshot else {
            continue;
        };
        let total = snapshot.introspection.findings_total();
        let Some(since) = cursors.due(&s.info.id, s.info.pid, total) else {
            continue;
        };
        let (id, pid, socket) = (s.info.id.clone(), s.info.pid, s.info.api_socket.clone());
        fetches.spawn(async move {
            let path = format!("{VM_FINDINGS_PATH}?since={since}");
            let records = match crate::client::request(&socket, "GET", &path, None, timeout).await {
                Ok(r) if r.is_success() => {
                    serde_json::from_slice::<Vec<serde_json::Value>>(&r.body)
                        .map(parse_records)
                        .map_err(FindingsFetchError::NotAList)
                }
                Ok(r) => Err(FindingsFetchError::Refused {
                    status: r.status,
                    message: r.fault_message(),
                }),
                Err(e) => Err(FindingsFetchError::Client(e)),
            };
            (id, pid, since, records)
        });
    }
    while let Some(joined) = fetches.join_next().await {
        let Ok((id, pid, since, records)) = joined else {
            continue;
        };
        match records {
            Ok(records) => {
                let records = crate::findings::after(since, records);
                emit(&id, &records);
                cursors.advance(&id, pid, &records);
            }
            // Asked again next tick.
            Err(e) => tracing::debug!(id, "cannot fetch introspection findings: {e}"),
        }
    }
}

/// Why a VM's new findings could not be fetched (they are asked again next tick).
#[derive(Debug, thiserror::Error)]
enum FindingsFetchError {
    #[error("not a list of findings: {0}")]
    NotAList(serde_json::Error),
    #[error("status {status}: {message}")]
    Refused { status: u16, message: String },
    #[error(transparent)]
    Client(#[from] crate::client::ClientError),
}

/// A VM's metrics snapshot as the detectors' sample: disk ops (every block
/// device's requests), packets each way (every net device), and the throttle
/// counters of all devices. A kind of device the VM lacks gives `None`.
pub fn vm_sample(id: &str, s: &vigil_metrics::VmMetricsSnapshot) -> vigil_events::VmSample {
    use vigil_metrics::DeviceKind;
    let sum = |kind: DeviceKind, f: fn(&vigil_metrics::DeviceSnapshot) -> u64| {
        s.devices
            .iter()
            .filter(|d| d.kind == kind)
            .map(f)
            .reduce(u64::saturating_add)
    };
    vigil_events::VmSample {
        vm_id: id.to_owned(),
        at: Timestamp::from_unix_ns(s.utc_timestamp_ms.saturating_mul(1_000_000)),
        disk_ops_total: sum(DeviceKind::Block, |d| {
            d.ops_in
                .saturating_add(d.ops_out)
                .saturating_add(d.ops_other)
        }),
        net_rx_packets_total: sum(DeviceKind::Net, |d| d.ops_in),
        net_tx_packets_total: sum(DeviceKind::Net, |d| d.ops_out),
        throttled_total: s
            .devices
            .iter()
            .map(|d| d.throttled)
            .reduce(u64::saturating_add),
        rt_overruns_total: Some(s.rt.overruns),
    }
}

/// The host's pressure readings as the detectors' sample.
pub fn host_sample(h: &vigil_metrics::HostSnapshot) -> HostSample {
    HostSample {
        at: Timestamp::now(),
        psi_cpu_some_avg10: h.cpu_pressure.as_ref().map(|p| p.some.avg10),
        psi_memory_some_avg10: h.memory_pressure.as_ref().map(|p| p.some.avg10),
        psi_io_some_avg10: h.io_pressure.as_ref().map(|p| p.some.avg10),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_from_snapshots() {
        use vigil_metrics::{DeviceKind, DeviceSnapshot, VmMetricsSnapshot};
        let dev = |kind, ops_in, ops_out, throttled| DeviceSnapshot {
            name: "d".into(),
            kind,
            ops_in,
            ops_out,
            ops_other: 1,
            throttled,
            ..DeviceSnapshot::default()
        };
        let snap = VmMetricsSnapshot {
            utc_timestamp_ms: 1_700_000_000_000,
            devices: vec![
                dev(DeviceKind::Block, 10, 20, 3),
                dev(DeviceKind::Block, 1, 2, 0),
                dev(DeviceKind::Net, 7, 8, 4),
                dev(DeviceKind::Entropy, 100, 0, 5),
            ],
            ..VmMetricsSnapshot::default()
        };
        let s = vm_sample("vm-1", &snap);
        assert_eq!(s.vm_id, "vm-1");
        assert_eq!(s.at, Timestamp::from_unix_secs(1_700_000_000));
        assert_eq!(s.disk_ops_total, Some(35));
        assert_eq!(s.net_rx_packets_total, Some(7));
        assert_eq!(s.net_tx_packets_total, Some(8));
        assert_eq!(s.throttled_total, Some(12));
        let bare = vm_sample("vm-2", &VmMetricsSnapshot::default());
        assert_eq!(bare.disk_ops_total, None);
        assert_eq!(bare.throttled_total, None);
    }

    #[test]
    fn a_pager_vm_from_its_memory_and_balloon_answers() {
        // As a VM answers GET /vigil/memory and GET /balloon.
        let memory = serde_json::json!({
            "guest_bytes": 512u64 << 20,
            "rss_bytes": (330u64 << 20),
            "compression": {"enabled": true, "footprint_bytes": (300u64 << 20) + 4096},
            "policy": {"idle_ms": null, "rss_mib": 256, "algo": "lz4"},
        });
        let balloon = serde_json::json!({"amount_mib": 64, "deflate_on_oom": true});
        let vm = pager_vm("vm-1".into(), 512, &memory, Some(&balloon)).unwrap();
        assert_eq!(
            vm,
            PagerVm {
                id: "vm-1".into(),
                memory_mib: 512,
                footprint_mib: 300,
                target_mib: Some(256),
                balloon_mib: Some(64),
            }
        );
        let mut no_target = memory.clone();
        no_target["policy"]["rss_mib"] = serde_json::Value::Null;
        // Not counted yet: the VMM's resident memory stands for it.
        no_target["compression"]["footprint_bytes"] = 0.into();
        let vm = pager_vm("vm-1".into(), 512, &no_target, None).unwrap();
        assert_eq!((vm.target_mib, vm.balloon_mib), (None, None));
        assert_eq!(vm.footprint_mib, 330);
        assert!(pager_vm("vm-1".into(), 512, &serde_json::json!({}), None).is_none());
        // The events: what changed, why, and the rule.
        let e = squeeze_event(
            &Action {
                vm: "vm-1".into(),
                change: Change::Target(Some(192)),
                kind: "squeeze",
                reason: "host memory pressure 25.0% above 20.0%".into(),
            },
            None,
        );
        assert_eq!(
            e.message,
            "policy: squeeze vm vm-1: RSS target to 192 MiB (host memory pressure 25.0% above 20.0%)"
        );
        assert_eq!(e.rule, vigil_events::Rule::PolicyAction);
        assert_eq!(e.fields["policy.rule"], "memory_pressure");
        assert_eq!(e.fields["policy.params"]["rss_mib"], 192);
    }

    /// A VM's API as the squeeze sees it: its memory, policy and balloon,
    /// and every PATCH it was sent.
    #[derive(Default)]
    struct FakeVm {
        target_mib: Option<u64>,
        balloon_mib: u64,
        patches: Vec<String>,
    }

    async fn fake_vm(socket: &std::path::Path) -> Arc<std::sync::Mutex<FakeVm>> {
        use axum::extract::State;
        use axum::routing::get;
        use axum::Json;
        type Vm = Arc<std::sync::Mutex<FakeVm>>;
        let vm: Vm = Arc::default();
        let app = axum::Router::new()
            .route(
                MEMORY_PATH,
                get(|State(vm): State<Vm>| async move {
                    let vm = vm.lock().unwrap();
                    Json(serde_json::json!({
                        "rss_bytes": 330u64 << 20,
                        "compression": {"enabled": true, "footprint_bytes": 300u64 << 20},
                        "policy": {"idle_ms": 2000, "rss_mib": vm.target_mib, "algo": "lz4"},
                    }))
                })
                .patch(
                    |State(vm): State<Vm>, Json(b): Json<serde_json::Value>| async move {
                        let mut vm = vm.lock().unwrap();
                        vm.target_mib = b["rss_mib"].as_u64();
                        vm.patches.push(format!("memory {b}"));
                        Json(serde_json::json!({}))
                    },
                ),
            )
            .route(
                "/balloon",
                get(|State(vm): State<Vm>| async move {
                    Json(serde_json::json!({"amount_mib": vm.lock().unwrap().balloon_mib}))
                })
                .patch(
                    |State(vm): State<Vm>, Json(b): Json<serde_json::Value>| async move {
                        let mut vm = vm.lock().unwrap();
                        vm.balloon_mib = b["amount_mib"].as_u64().unwrap();
                        vm.patches.push(format!("balloon {b}"));
                        Json(serde_json::json!({}))
                    },
                ),
            )
            .with_state(vm.clone());
        let listener = tokio::net::UnixListener::bind(socket).unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        vm
    }

    #[tokio::test]
    async fn pressure_inflates_the_balloon_then_lowers_the_target_and_relief_undoes_both() {
        let dir = std::env::temp_dir().join(format!("vigild-squeeze-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("api.sock");
        let vm = fake_vm(&socket).await;
        let info: crate::supervisor::VmInfo = serde_json::from_value(serde_json::json!({
            "id": "vm-1", "state": "running", "pid": 1, "vcpus": 1, "memory_mib": 128,
            "created_at_unix_s": 0, "uptime_s": 1.0, "dir": dir, "api_socket": socket,
        }))
        .unwrap();
        let mut snapshot = vigil_metrics::VmMetricsSnapshot::default();
        snapshot.memory_compression.enabled = true;
        let samples = [crate::metrics::VmSample {
            info,
            snapshot: Some(snapshot),
        }];
        let (events, super::super::EngineInput(rx)) = Events::new(&Default::default());
        let mut squeezer = Squeezer::new(crate::squeeze::SqueezeSettings {
            step: Duration::ZERO,
            relax_samples: 1,
            ..Default::default()
        });
        let host = |psi| HostSample {
            psi_memory_some_avg10: Some(psi),
            ..HostSample::default()
        };
        let timeout = Duration::from_secs(5);
        // An eighth of 128 MiB at a time up to half, then the target.
        for _ in 0..5 {
            squeeze(&mut squeezer, &events, &samples, &host(50.0), timeout).await;
        }
        squeeze(&mut squeezer, &events, &samples, &host(1.0), timeout).await;
        let patches = std::mem::take(&mut vm.lock().unwrap().patches);
        assert_eq!(
            patches,
            [
                r#"balloon {"amount_mib":16}"#,
                r#"balloon {"amount_mib":32}"#,
                r#"balloon {"amount_mib":48}"#,
                r#"balloon {"amount_mib":64}"#,
                r#"memory {"rss_mib":225}"#,
                r#"balloon {"amount_mib":0}"#,
                r#"memory {"rss_mib":null}"#,
            ]
        );
        let messages: Vec<String> = rx
            .try_iter()
            .filter_map(|i| match i {
                super::super::Input::Event(e) => Some(e.message),
                _ => None,
            })
            .collect();
        assert_eq!(messages.len(), 7, "{messages:?}");
        assert_eq!(
            messages[4],
            "policy: squeeze vm vm-1: RSS target to 225 MiB (host memory pressure 50.0% above 20.0%)"
        );
        assert_eq!(
            messages[6],
            "policy: relax vm vm-1: no RSS target (host memory pressure 1.0% under 10.0% for 1 samples)"
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}
