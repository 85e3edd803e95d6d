//! All the counters of one VM, and the snapshot of them that writers render.

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::device::{DeviceCounters, DeviceSnapshot};
use crate::host;
use crate::introspect::{IntrospectCounters, IntrospectSnapshot};
use crate::vcpu::{VcpuCounters, VcpuSnapshot};

/// The unit of `/proc/self/statm` on x86_64 Linux.
const PAGE_SIZE: u64 = 4096;
/// The balloon counts in 4 KiB pages whatever the guest's page size.
const BALLOON_PAGE: u64 = 4096;

/// The counters of one VM: its vCPUs' and devices', fixed when the VM is built.
#[derive(Debug)]
pub struct VmMetrics {
    guest_memory_bytes: u64,
    vcpus: Vec<Arc<VcpuCounters>>,
    devices: Vec<Arc<DeviceCounters>>,
    introspect: Arc<IntrospectCounters>,
    rt: Arc<crate::RtCounters>,
    pager: Arc<crate::PagerCounters>,
    started: OnceLock<Instant>,
    dirty: Mutex<DirtyRate>,
}

/// Bytes of guest memory written since the previous call (the VM's dirty log).
pub type DirtySource = Box<dyn FnMut() -> Option<u64> + Send>;

/// The guest's write rate, measured between two snapshots at least
/// [`DIRTY_INTERVAL`] apart: no thread and no cost while nobody asks.
#[derive(Default)]
struct DirtyRate {
    source: Option<DirtySource>,
    since: Option<Instant>,
    rate: Option<u64>,
}

impl std::fmt::Debug for DirtyRate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyRate")
            .field("rate", &self.rate)
            .finish()
    }
}

/// The shortest interval a dirty rate is measured over.
pub const DIRTY_INTERVAL: Duration = Duration::from_millis(500);

impl DirtyRate {
    fn read(&mut self) -> Option<u64> {
        let source = self.source.as_mut()?;
        let now = Instant::now();
        match self.since {
            Some(t) if now.duration_since(t) < DIRTY_INTERVAL => {}
            since => {
                let bytes = source();
                if let (Some(t), Some(bytes)) = (since, bytes) {
                    self.rate = Some((bytes as f64 / now.duration_since(t).as_secs_f64()) as u64);
                }
                self.since = Some(now);
            }
        }
        self.rate
    }
}

impl VmMetrics {
    /// Metrics of a VM with `guest_memory_bytes` of RAM, these vCPUs and devices.
    pub fn new(
        guest_memory_bytes: u64,
        vcpus: Vec<Arc<VcpuCounters>>,
        devices: Vec<Arc<DeviceCounters>>,
    ) -> Self {
        Self {
            guest_memory_bytes,
            vcpus,
            devices,
            introspect: Arc::default(),
            rt: Arc::default(),
            pager: Arc::default(),
            started: OnceLock::new(),
            dirty: Mutex::default(),
        }
    }

    /// Where the guest's write rate comes from (the VMM's dirty log); its
    /// first call starts the first interval.
    pub fn set_dirty_source(&self, source: DirtySource) {
        *self.dirty.lock().unwrap_or_else(|e| e.into_inner()) = DirtyRate {
            source: Some(source),
            ..DirtyRate::default()
        };
    }

    /// The VM started running now (uptime counts from here; later calls are ignored).
    pub fn mark_started(&self) {
        let _ = self.started.set(Instant::now());
    }

    /// vCPU `id`'s counters.
    pub fn vcpu(&self, id: u32) -> Option<&Arc<VcpuCounters>> {
        self.vcpus.iter().find(|v| v.id() == id)
    }

    /// Every vCPU's counters.
    pub fn vcpus(&self) -> &[Arc<VcpuCounters>] {
        &self.vcpus
    }

    /// Every device's counters.
    pub fn devices(&self) -> &[Arc<DeviceCounters>] {
        &self.devices
    }

    /// What introspection did (all zero while it is off).
    pub fn introspect(&self) -> &Arc<IntrospectCounters> {
        &self.introspect
    }

    /// What the RT timer device did (all zero without it).
    pub fn rt(&self) -> &Arc<crate::RtCounters> {
        &self.rt
    }

    /// These counters with the pager's, which counts from before the VM's
    /// build ends (a restore loads memory through it).
    pub fn with_pager(self, pager: Arc<crate::PagerCounters>) -> Self {
        Self { pager, ..self }
    }

    /// What the memory-compression pager did (all zero while it is off).
    pub fn pager(&self) -> &Arc<crate::PagerCounters> {
        &self.pager
    }

    /// Everything now. Reads `/proc` (this process's RSS, each vCPU thread's
    /// schedstat): a few system calls per vCPU; never blocks on the VM.
    pub fn snapshot(&self) -> VmMetricsSnapshot {
        let devices: Vec<DeviceSnapshot> = self.devices.iter().map(|d| d.snapshot()).collect();
        let balloon = devices.iter().find_map(|d| d.balloon);
        VmMetricsSnapshot {
            utc_timestamp_ms: utc_now_ms(),
            uptime_ns: self
                .started
                .get()
                .map_or(0, |t| crate::primitives::duration_ns(t.elapsed())),
            memory: MemorySnapshot {
                guest_bytes: self.guest_memory_bytes,
                rss_bytes: host::process_rss_bytes(PAGE_SIZE),
                balloon_actual_bytes: balloon.map(|b| b.actual_pages * BALLOON_PAGE),
                balloon_target_bytes: balloon.map(|b| b.target_pages * BALLOON_PAGE),
                dirty_bytes_per_s: self.dirty.lock().unwrap_or_else(|e| e.into_inner()).read(),
            },
            vcpus: self.vcpus.iter().map(|v| v.snapshot()).collect(),
            devices,
            introspection: self.introspect.snapshot(),
            rt: self.rt.snapshot(),
            memory_compression: self.pager.snapshot(),
        }
    }
}

/// A cheap, cloneable handle on a VM's metrics, for other threads (an API
/// server, a metrics file writer). It stays valid after the VM ended.
#[derive(Clone, Debug)]
pub struct MetricsHandle(Arc<VmMetrics>);

impl MetricsHandle {
    /// A handle on `metrics`.
    pub fn new(metrics: Arc<VmMetrics>) -> Self {
        Self(metrics)
    }

    /// Everything now (see [`VmMetrics::snapshot`]).
    pub fn snapshot(&self) -> VmMetricsSnapshot {
        self.0.snapshot()
    }

    /// The counters themselves.
    pub fn metrics(&self) -> &Arc<VmMetrics> {
        &self.0
    }
}

/// Milliseconds since the Unix epoch.
pub fn utc_now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A VM's memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemorySnapshot {
    /// Guest RAM as configured.
    pub guest_bytes: u64,
    /// Resident memory of the VMM process (guest pages it touched included).
    pub rss_bytes: Option<u64>,
    /// Memory the guest holds in its balloon, when it has one.
    pub balloon_actual_bytes: Option<u64>,
    /// Memory the balloon asks for, when there is one.
    pub balloon_target_bytes: Option<u64>,
    /// Guest memory written per second, between this snapshot and an earlier
    /// one at least half a second before (absent until there is one).
    #[serde(default)]
    pub dirty_bytes_per_s: Option<u64>,
}

/// Everything about one VM at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmMetricsSnapshot {
    /// When it was taken, ms since the Unix epoch.
    pub utc_timestamp_ms: u64,
    /// Time since the VM started, ns (0 before).
    pub uptime_ns: u64,
    pub memory: MemorySnapshot,
    pub vcpus: Vec<VcpuSnapshot>,
    pub devices: Vec<DeviceSnapshot>,
    /// What introspection did (absent in snapshots from before it existed).
    #[serde(default)]
    pub introspection: IntrospectSnapshot,
    /// What the RT timer device did (absent in snapshots from before it existed).
    #[serde(default)]
    pub rt: crate::RtSnapshot,
    /// What the memory-compression pager did (absent in snapshots from before it
    /// existed).
    #[serde(default)]
    pub memory_compression: crate::PagerSnapshot,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::DeviceKind;

    #[test]
    fn snapshot_of_a_vm() {
        let v0 = Arc::new(VcpuCounters::new(0));
        let blk = Arc::new(DeviceCounters::new(DeviceKind::Block, "blk0"));
        let balloon = Arc::new(DeviceCounters::new(DeviceKind::Balloon, "balloon0"));
        balloon.balloon_actual_pages.set(10);
        balloon.balloon_target_pages.set(20);
        let m = Arc::new(VmMetrics::new(
            64 << 20,
            vec![v0.clone()],
            vec![blk.clone(), balloon],
        ));
        let h = MetricsHandle::new(m.clone());
        assert_eq!(h.snapshot().uptime_ns, 0);
        m.mark_started();
        blk.transfer_in(512);
        v0.count_exit(crate::ExitReason::Io);
        std::thread::sleep(std::time::Duration::from_millis(2));
        let s = h.clone().snapshot();
        assert!(s.uptime_ns >= 2_000_000);
        assert!(s.utc_timestamp_ms > 1_600_000_000_000);
        assert_eq!(s.memory.guest_bytes, 64 << 20);
        assert!(s.memory.rss_bytes.unwrap() > 0);
        assert_eq!(s.memory.balloon_actual_bytes, Some(40960));
        assert_eq!(s.memory.balloon_target_bytes, Some(81920));
        assert_eq!(s.vcpus[0].exits.io, 1);
        assert_eq!(s.devices[0].bytes_in, 512);
        assert!(m.vcpu(0).is_some() && m.vcpu(1).is_none());
    }
}
