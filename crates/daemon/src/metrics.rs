//! `GET /metrics`: Prometheus text for the host, the daemon and every VM, labelled
//! by VM id. Each running VM's own counters come from its API socket
//! (`GET /vigil/metrics`), all VMs at once, each with a short timeout: a slow or
//! wedged VM costs its own series (`vigil_vm_scrape_ok 0`), never the others'.

use std::fmt::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::client;
use crate::supervisor::{Supervisor, VmInfo, VmState};

/// The path of a VM's metrics snapshot on its API socket.
pub const VM_METRICS_PATH: &str = "/vigil/metrics";

/// One VM's record and, when its socket answered in time, its metrics snapshot.
pub struct VmSample {
    pub info: VmInfo,
    pub snapshot: Option<serde_json::Value>,
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
                Ok(r) if r.is_success() => r.json(),
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

/// Reads /proc/loadavg: the 1, 5 and 15 minute load averages.
fn load_average() -> Option<[f64; 3]> {
    let text = std::fs::read_to_string("/proc/loadavg").ok()?;
    let mut it = text.split_whitespace().map(|s| s.parse::<f64>().ok());
    Some([it.next()??, it.next()??, it.next()??])
}

/// Renders the host's, the daemon's and the VMs' metrics.
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
    if let Some(load) = load_average() {
        family(
            &mut out,
            "vigil_host_load_average",
            "gauge",
            "The host's load average over 1, 5 and 15 minutes.",
        );
        for (window, value) in ["1m", "5m", "15m"].iter().zip(load) {
            let _ = writeln!(
                out,
                "vigil_host_load_average{{window=\"{window}\"}} {value}"
            );
        }
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
            "vigil_vm_info{{vm_id=\"{}\",state=\"{}\"}} 1",
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
            "vigil_vm_up{{vm_id=\"{}\"}} {}",
            s.info.id,
            u8::from(s.info.state.is_live())
        );
    }
    family(
        &mut out,
        "vigil_vm_uptime_seconds",
        "gauge",
        "Seconds from the VM's start to now, or to its end.",
    );
    for s in samples {
        let _ = writeln!(
            out,
            "vigil_vm_uptime_seconds{{vm_id=\"{}\"}} {:.3}",
            s.info.id, s.info.uptime_s
        );
    }
    family(
        &mut out,
        "vigil_vm_vcpus",
        "gauge",
        "vCPUs in the VM's configuration.",
    );
    for s in samples {
        if let Some(v) = s.info.vcpus {
            let _ = writeln!(out, "vigil_vm_vcpus{{vm_id=\"{}\"}} {v}", s.info.id);
        }
    }
    family(
        &mut out,
        "vigil_vm_memory_bytes",
        "gauge",
        "Guest memory in the VM's configuration, in bytes.",
    );
    for s in samples {
        if let Some(m) = s.info.memory_mib {
            let _ = writeln!(
                out,
                "vigil_vm_memory_bytes{{vm_id=\"{}\"}} {}",
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
            let _ = writeln!(out, "vigil_vm_exit_code{{vm_id=\"{}\"}} {code}", s.info.id);
        }
    }
    family(
        &mut out,
        "vigil_vm_scrape_ok",
        "gauge",
        "1 when the running VM's API socket answered the metrics request in time.",
    );
    for s in samples {
        if matches!(s.info.state, VmState::Running | VmState::Paused) {
            let _ = writeln!(
                out,
                "vigil_vm_scrape_ok{{vm_id=\"{}\"}} {}",
                s.info.id,
                u8::from(s.snapshot.is_some())
            );
        }
    }
    out
}
