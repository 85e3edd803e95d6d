//! `GET /metrics`: Prometheus text for the host, the daemon and every VM, labelled
//! by VM id. Each running VM's own counters come from its API socket
//! (`GET /vigil/metrics`), all VMs at once, each with a short timeout: a slow or
//! wedged VM costs its own series (`vigil_vm_scrape_ok 0`), never the others'.

use std::fmt::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vigil_metrics::{HostSnapshot, VmMetricsSnapshot};

use crate::client;
use crate::supervisor::{Supervisor, VmInfo, VmState};

/// The path of a VM's metrics snapshot on its API socket.
pub const VM_METRICS_PATH: &str = "/vigil/metrics";

/// One VM's record and, when its socket answered in time, its metrics snapshot.
pub struct VmSample {
    pub info: VmInfo,
    pub snapshot: Option<VmMetricsSnapshot>,
}

/// Fetches every live VM's snapshot concurrently, each within `timeout`.
pub async fn collect(supervisor: &Arc<Supervisor>, timeout: Duration) -> Vec<VmSample> {
    let mut tasks = tokio::task::JoinSet::new();
    let vms = supervisor.list();
    for (index, vm) in vms.iter().enumerate() {
        let info = vm.info(false);
        if !matches!(info.state, VmState::Running | VmState::Paused) {
            continue;
        }
        let socket = vm.api_socket().to_owned();
        tasks.spawn(async move {
            let response = client::request(&socket, "GET", VM_METRICS_PATH, None, timeout).await;
            let snapshot = match response {
                Ok(r) if r.is_success() => {
                    serde_json::from_slice::<VmMetricsSnapshot>(&r.body).ok()
                }
                _ => None,
            };
            (index, snapshot)
        });
    }
    let mut samples: Vec<VmSample> = vms
        .iter()
        .map(|vm| VmSample {
            info: vm.info(false),
            snapshot: None,
        })
        .collect();
    while let Some(joined) = tasks.join_next().await {
        if let Ok((index, snapshot)) = joined {
            if let Some(sample) = samples.get_mut(index) {
                sample.snapshot = snapshot;
            }
        }
    }
    samples
}

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Renders the host's, the daemon's and the VMs' metrics: the daemon's own
/// families (`vigil_daemon_*`, and per VM `vigil_vm_info`, `vigil_vm_up`, ...: every
/// VM it holds, running or not), then vigil-metrics' rendering of the running VMs'
/// snapshots (vCPU exits, devices, memory) and of the host (PSI, load, memory, CPU).
pub fn render(samples: &[VmSample], daemon_started: Instant) -> String {
    let mut out = String::new();
    family(
        &mut out,
        "vigil_daemon_uptime_seconds",
        "gauge",
        "Seconds since the daemon started.",
    );
    let _ = writeln!(
        out,
        "vigil_daemon_uptime_seconds {:.3}",
        daemon_started.elapsed().as_secs_f64()
    );
    family(
        &mut out,
        "vigil_daemon_vms",
        "gauge",
        "VMs the daemon holds, by state.",
    );
    for state in VmState::ALL {
        let n = samples.iter().filter(|s| s.info.state == state).count();
        let _ = writeln!(out, "vigil_daemon_vms{{state=\"{}\"}} {n}", state.as_str());
    }
    family(
        &mut out,
        "vigil_vm_info",
        "gauge",
        "One series per VM, labelled with its state (value 1).",
    );
    for s in samples {
        let _ = writeln!(
            out,
            "vigil_vm_info{{vm=\"{}\",state=\"{}\"}} 1",
            s.info.id,
            s.info.state.as_str()
        );
    }
    family(
        &mut out,
        "vigil_vm_up",
        "gauge",
        "1 while the VM's process runs (running, paused, starting, stopping), else 0.",
    );
    for s in samples {
        let _ = writeln!(
            out,
            "vigil_vm_up{{vm=\"{}\"}} {}",
            s.info.id,
            u8::from(s.info.state.is_live())
        );
    }
    family(
        &mut out,
        "vigil_daemon_vm_uptime_seconds",
        "gauge",
        "Seconds from the VM process's start to now, or to its end (every VM the daemon holds).",
    );
    for s in samples {
        let _ = writeln!(
            out,
            "vigil_daemon_vm_uptime_seconds{{vm=\"{}\"}} {:.3}",
            s.info.id, s.info.uptime_s
        );
    }
    family(
        &mut out,
        "vigil_vm_configured_vcpus",
        "gauge",
        "vCPUs in the VM's configuration.",
    );
    for s in samples {
        if let Some(v) = s.info.vcpus {
            let _ = writeln!(out, "vigil_vm_configured_vcpus{{vm=\"{}\"}} {v}", s.info.id);
        }
    }
    family(
        &mut out,
        "vigil_vm_configured_memory_bytes",
        "gauge",
        "Guest memory in the VM's configuration, in bytes.",
    );
    for s in samples {
        if let Some(m) = s.info.memory_mib {
            let _ = writeln!(
                out,
                "vigil_vm_configured_memory_bytes{{vm=\"{}\"}} {}",
                s.info.id,
                m.saturating_mul(1 << 20)
            );
        }
    }
    family(
        &mut out,
        "vigil_vm_exit_code",
        "gauge",
        "The exit status of a VM process that ended (absent while it runs).",
    );
    for s in samples {
        if let Some(code) = s.info.exit.as_ref().and_then(|e| e.code) {
            let _ = writeln!(out, "vigil_vm_exit_code{{vm=\"{}\"}} {code}", s.info.id);
        }
    }
    render_migrations(&mut out, samples);
    family(
        &mut out,
        "vigil_vm_scrape_ok",
        "gauge",
        "1 when the running VM's API socket answered GET /vigil/metrics in time with a snapshot.",
    );
    for s in samples {
        if matches!(s.info.state, VmState::Running | VmState::Paused) {
            let _ = writeln!(
                out,
                "vigil_vm_scrape_ok{{vm=\"{}\"}} {}",
                s.info.id,
                u8::from(s.snapshot.is_some())
            );
        }
    }
    let vms: Vec<(&str, &VmMetricsSnapshot)> = samples
        .iter()
        .filter_map(|s| Some((s.info.id.as_str(), s.snapshot.as_ref()?)))
        .collect();
    out.push_str(&vigil_metrics::prometheus::render(
        &vms,
        Some(&HostSnapshot::read()),
    ));
    out
}

/// The migration gauges: (name, help, field of the VM's migration status, scale).
const MIGRATION_GAUGES: [(&str, &str, &str, f64); 9] = [
    (
        "vigil_migration_round",
        "Pre-copy rounds done.",
        "round",
        1.0,
    ),
    (
        "vigil_migration_sent_bytes",
        "Bytes sent to the destination.",
        "bytes_sent",
        1.0,
    ),
    (
        "vigil_migration_remaining_bytes",
        "Dirty bytes at the start of the last round.",
        "remaining_bytes",
        1.0,
    ),
    (
        "vigil_migration_dirty_rate_bytes_per_second",
        "How fast the guest dirtied memory in the last round.",
        "dirty_rate_bytes_per_s",
        1.0,
    ),
    (
        "vigil_migration_bandwidth_bytes_per_second",
        "The bandwidth measured in the last round.",
        "bandwidth_bytes_per_s",
        1.0,
    ),
    (
        "vigil_migration_predicted_downtime_seconds",
        "The pause the remaining bytes would take at that bandwidth.",
        "predicted_downtime_ms",
        1e-3,
    ),
    (
        "vigil_migration_throttle_ratio",
        "Share of time auto-converge holds the vCPUs paused.",
        "throttle_percent",
        1e-2,
    ),
    (
        "vigil_migration_downtime_seconds",
        "The pause at the end of a completed migration (source's clock).",
        "downtime_ms",
        1e-3,
    ),
    (
        "vigil_migration_duration_seconds",
        "How long the migration took, once ended.",
        "total_ms",
        1e-3,
    ),
];

/// The migration each VM made (or makes) through this daemon, from its last
/// status: `vigil_migration_state` and the gauges of [`MIGRATION_GAUGES`].
fn render_migrations(out: &mut String, samples: &[VmSample]) {
    let migrations: Vec<(&str, &serde_json::Value)> = samples
        .iter()
        .filter_map(|s| Some((s.info.id.as_str(), s.info.migration.as_ref()?)))
        .collect();
    family(
        out,
        "vigil_migration_state",
        "gauge",
        "1 for the state of the VM's migration through this daemon (connecting, precopy, stopped, completed, failed, cancelled).",
    );
    for (vm, status) in &migrations {
        if let Some(state) = status["state"].as_str() {
            let _ = writeln!(
                out,
                "vigil_migration_state{{vm=\"{vm}\",state=\"{state}\"}} 1"
            );
        }
    }
    for (name, help, field, scale) in MIGRATION_GAUGES {
        family(out, name, "gauge", help);
        for (vm, status) in &migrations {
            if let Some(v) = status[field].as_f64() {
                let _ = writeln!(out, "{name}{{vm=\"{vm}\"}} {}", v * scale);
            }
        }
    }
}
