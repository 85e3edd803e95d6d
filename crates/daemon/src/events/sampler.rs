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
        let _ = events.tx.send(Input::Tick { host, vms });
        events.flush_api_summaries();
    }
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
}
