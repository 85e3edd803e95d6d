//! The lifecycle handle of a running VM, [`VmControl`], for the API and the
//! binary: pause, resume, state, stop, Ctrl-Alt-Del, metrics, the balloon, the
//! drives' and network interfaces' rate limits, and whether it crashed. What
//! introspection needs (guest memory, vCPU state, the dirty log) is the other
//! handle, [`crate::VmInspect`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vigil_devices::legacy::I8042;
use vigil_devices::rate_limiter::{LimitUpdate, RateLimitControl};
use vigil_devices::virtio::balloon::{BalloonControl, HintingStatus, Stats};
use vigil_devices::virtio::{Interrupt, INT_CONFIG};
use vigil_metrics::MetricsHandle;
use vigil_model::config::BalloonConfig;
use vmm_sys_util::eventfd::EventFd;

use crate::device_manager::DeviceHandles;
use crate::snapshot::{
    MemoryKind, SnapshotError, SnapshotInfo, SnapshotSources, StateExtension, VmState,
};
use crate::vstate::inspect::{self, MAX_BREAKPOINTS};
use crate::vstate::threads::VcpuThreads;
use crate::VmEvent;

/// Lets another thread (a signal handler thread, an API server) stop the VM.
#[derive(Clone)]
pub struct StopHandle(pub(crate) Sender<VmEvent>);

impl StopHandle {
    /// Asks the VM to stop, recording `signal` as the reason.
    pub fn stop(&self, signal: i32) {
        let _ = self.0.send(VmEvent::Stop(signal));
    }
}

/// Whether a started VM's vCPUs run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    /// The vCPUs run the guest.
    Running,
    /// Every vCPU is parked outside `KVM_RUN`.
    Paused,
}

/// Why a request to a running VM's lifecycle or inspection handle failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("the VM is shutting down")]
    Stopping,
    #[error("{parked} of {total} vCPUs paused within {waited_ms} ms; the VM was resumed")]
    PauseTimeout {
        parked: usize,
        total: usize,
        waited_ms: u128,
    },
    #[error("the keyboard controller's buffer is full: the guest has not read the last keys")]
    KeyboardBusy,
    #[error("the VM has no balloon device")]
    NoBalloon,
    #[error("no drive with id {0:?}")]
    NoDrive(String),
    #[error("no network interface number {0} (the VM has {1})")]
    NoNet(usize, usize),
    #[error("the balloon was configured without statistics (stats_polling_interval_s 0); they cannot be turned on or off after boot")]
    BalloonStatsOff,
    #[error(
        "free page hinting was not enabled (free_page_hinting true in PUT /balloon, before boot)"
    )]
    HintingOff,
    #[error("no vCPU {0} (the VM has {1})")]
    NoVcpu(u32, usize),
    #[error(transparent)]
    Sched(Box<crate::rt::SchedError>),
    #[error(transparent)]
    SchedConfig(#[from] vigil_model::config::SchedConfigError),
    #[error("vCPU {0} has ended: it serves no requests")]
    VcpuGone(u32),
    #[error("vCPU {vcpu} did not serve the request within {waited_ms} ms")]
    VcpuTimeout { vcpu: u32, waited_ms: u128 },
    #[error("a request to vCPU {0} from its own thread (a breakpoint handler or MSR guard) would wait for itself")]
    OwnThread(u32),
    #[error("KVM refused to {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("{0} breakpoints: give 1 to {max} (the debug address registers)", max = MAX_BREAKPOINTS)]
    BreakpointCount(usize),
    #[error("breakpoint address {0:#x} is not canonical (a debug register cannot hold it)")]
    BreakpointAddress(u64),
    #[error("{0} MSRs to guard: give 1 to {max} (the ranges of KVM's MSR filter)", max = inspect::MAX_GUARDED_MSRS)]
    GuardedMsrCount(usize),
    #[error("vCPU {vcpu}: KVM refused to write {value:#x} to MSR {index:#x}")]
    MsrRefused { vcpu: u32, index: u32, value: u64 },
    #[error("the VM crashed ({0}); it is kept for inspection and cannot resume")]
    Crashed(String),
    #[error("the VM runs without the memory-compression pager (--memory-compression)")]
    NoPager,
    #[error(transparent)]
    MemoryPolicy(#[from] vigil_model::config::MemoryCompressionError),
}

/// The balloon device of a running VM, as the host sees it: a target to set, and
/// what the guest reports.
#[derive(Clone)]
pub struct BalloonHandle {
    control: Arc<BalloonControl>,
    interrupt: Arc<Interrupt>,
    config: BalloonConfig,
}

impl BalloonHandle {
    pub(crate) fn new(
        control: Arc<BalloonControl>,
        interrupt: Arc<Interrupt>,
        config: BalloonConfig,
    ) -> Self {
        Self {
            control,
            interrupt,
            config,
        }
    }

    /// The configuration it was built with.
    pub fn config(&self) -> BalloonConfig {
        self.config
    }

    /// Asks the guest to give back `mib` MiB in all, and tells it so (the
    /// configuration-change interrupt).
    pub fn set_target_mib(&self, mib: u64) {
        self.control.set_target_mib(mib);
        self.interrupt.signal(INT_CONFIG);
    }

    /// `(target, actual)` in 4 KiB pages.
    pub fn pages(&self) -> (u32, u32) {
        self.control.pages()
    }

    /// The statistics interval in seconds (0: statistics off).
    pub fn stats_interval_s(&self) -> u64 {
        if self.config.stats_interval.is_some() {
            self.control.stats_interval_s()
        } else {
            0
        }
    }

    /// Changes how often statistics are asked for (not whether).
    pub fn set_stats_interval_s(&self, seconds: u64) -> Result<(), ControlError> {
        if self.config.stats_interval.is_none() || seconds == 0 {
            return Err(ControlError::BalloonStatsOff);
        }
        self.control.set_stats_interval_s(seconds);
        Ok(())
    }

    /// The latest statistics the guest sent: `(tag, value)`.
    pub fn stats(&self) -> Stats {
        self.control.stats()
    }

    fn hinting(&self) -> Result<&BalloonControl, ControlError> {
        if !self.config.free_page_hinting {
            return Err(ControlError::HintingOff);
        }
        Ok(&self.control)
    }

    /// Starts a free page hinting run; with `ack_on_stop` the guest's stop is
    /// answered at once, so that it takes its hinted pages back.
    pub fn start_hinting(&self, ack_on_stop: bool) -> Result<(), ControlError> {
        self.hinting()?.start_hinting(ack_on_stop);
        Ok(())
    }

    /// Ends the run: the guest takes its hinted pages back.
    pub fn stop_hinting(&self) -> Result<(), ControlError> {
        self.hinting()?.stop_hinting();
        Ok(())
    }

    /// The last hinting command of the host and of the guest.
    pub fn hinting_status(&self) -> Result<HintingStatus, ControlError> {
        Ok(self.hinting()?.hinting_status())
    }
}

/// Wakes a device's queues on the device event loop, so that a device waiting on
/// its rate-limiter timer decides again at once under a new limit.
#[derive(Clone)]
pub(crate) struct QueueWaker(Arc<Vec<EventFd>>);

impl QueueWaker {
    pub(crate) fn new(queue_evts: Vec<EventFd>) -> Self {
        Self(Arc::new(queue_evts))
    }

    pub(crate) fn wake(&self) {
        for evt in self.0.iter() {
            if let Err(e) = evt.write(1) {
                tracing::warn!("cannot wake a virtio queue after a rate-limit change: {e}");
            }
        }
    }
}

/// A virtio-blk drive of a running VM, as the host sees it: its rate limit.
#[derive(Clone)]
pub struct DriveHandle {
    id: String,
    limit: Arc<RateLimitControl>,
    waker: QueueWaker,
}

impl DriveHandle {
    pub(crate) fn new(id: String, limit: Arc<RateLimitControl>, waker: QueueWaker) -> Self {
        Self { id, limit, waker }
    }

    /// The drive's id (`DriveConfig::id`).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Changes the limit on all the drive's requests together; the next request
    /// is decided under it, including one waiting for tokens now.
    pub fn set_rate_limit(&self, update: LimitUpdate) {
        if update.is_keep() {
            return;
        }
        self.limit.post(update);
        self.waker.wake();
    }
}

/// A virtio-net interface of a running VM, as the host sees it: its rate limits.
#[derive(Clone)]
pub struct NetHandle {
    rx: Arc<RateLimitControl>,
    tx: Arc<RateLimitControl>,
    waker: QueueWaker,
}

impl NetHandle {
    pub(crate) fn new(
        (rx, tx): (Arc<RateLimitControl>, Arc<RateLimitControl>),
        waker: QueueWaker,
    ) -> Self {
        Self { rx, tx, waker }
    }

    /// Changes the receive and transmit limits; the next frame each way is
    /// decided under them, including one waiting for tokens now.
    pub fn set_rate_limits(&self, rx: LimitUpdate, tx: LimitUpdate) {
        if rx.is_keep() && tx.is_keep() {
            return;
        }
        self.rx.post(rx);
        self.tx.post(tx);
        self.waker.wake();
    }
}

/// The lifecycle handle of a running VM: cloneable, for other threads (an API
/// server, a signal thread). It never outlives its use: after the VM ended, pause
/// and resume answer [`ControlError::Stopping`].
#[derive(Clone)]
pub struct VmControl {
    pub(crate) vcpus: Arc<VcpuThreads>,
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) stop_handle: StopHandle,
    /// One pause or resume at a time.
    pub(crate) op: Arc<Mutex<()>>,
    pub(crate) i8042: Arc<Mutex<I8042>>,
    pub(crate) devices: Arc<DeviceHandles>,
    pub(crate) metrics: MetricsHandle,
    pub(crate) snapshot: Arc<SnapshotSources>,
    pub(crate) sched: Arc<crate::rt::VcpuScheduler>,
    /// The memory-compression pager's policy, when it is on.
    pub(crate) pager: Option<crate::pager::PagerPolicy>,
}

impl From<crate::rt::SchedError> for ControlError {
    fn from(e: crate::rt::SchedError) -> Self {
        Self::Sched(Box::new(e))
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How long a pause waits for every vCPU to park.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);

impl VmControl {
    /// Pauses the vCPUs; returns once every one of them is parked outside `KVM_RUN`.
    /// Pausing a paused VM does nothing.
    pub fn pause(&self) -> Result<(), ControlError> {
        let _op = lock(&self.op);
        let gate = &self.vcpus.gate;
        let total = self.vcpus.count();
        gate.request();
        let start = Instant::now();
        loop {
            if self.stop.load(Ordering::Acquire) {
                gate.release();
                return Err(ControlError::Stopping);
            }
            // A kick can land just before a thread enters KVM_RUN and be lost, so
            // kick until every thread has parked.
            self.vcpus.kick_all();
            let parked = gate.parked_after(Duration::from_millis(1));
            if parked >= total {
                return Ok(());
            }
            if start.elapsed() > PAUSE_TIMEOUT {
                gate.release();
                return Err(ControlError::PauseTimeout {
                    parked,
                    total,
                    waited_ms: start.elapsed().as_millis(),
                });
            }
        }
    }

    /// Lets the vCPUs run again. Resuming a running VM does nothing. A crashed VM
    /// kept for inspection ([`vigil_model::config::OnCrash::Pause`]) cannot resume.
    pub fn resume(&self) -> Result<(), ControlError> {
        let _op = lock(&self.op);
        if self.stop.load(Ordering::Acquire) {
            return Err(ControlError::Stopping);
        }
        if let Some(why) = self.vcpus.gate.held() {
            return Err(ControlError::Crashed(why));
        }
        self.vcpus.gate.release();
        Ok(())
    }

    /// Saves the paused VM: its state to `state_path`, its memory to `mem_path`
    /// (each written under a temporary name and renamed when complete, so a
    /// failure leaves what was there), whole or only the pages written since the
    /// previous snapshot (`kind`, see [`crate::snapshot`]). The VM stays paused.
    pub fn snapshot(
        &self,
        state_path: &std::path::Path,
        mem_path: &std::path::Path,
        kind: MemoryKind,
    ) -> Result<SnapshotInfo, SnapshotError> {
        let _op = lock(&self.op);
        if self.stop.load(Ordering::Acquire) {
            return Err(ControlError::Stopping.into());
        }
        if !self.vcpus.gate.requested() {
            return Err(SnapshotError::NotPaused);
        }
        self.snapshot.save(&self.vcpus, state_path, mem_path, kind)
    }

    /// The paused VM's state, and `with_memory` run on its guest memory while
    /// its devices are held, so that no device writes guest memory meanwhile:
    /// what migration's last round sends. The VM stays paused.
    pub fn capture<T>(
        &self,
        with_memory: impl FnOnce(&crate::pager::MemoryReader, &mut VmState) -> Result<T, SnapshotError>,
    ) -> Result<(VmState, T), SnapshotError> {
        let _op = lock(&self.op);
        if self.stop.load(Ordering::Acquire) {
            return Err(ControlError::Stopping.into());
        }
        if !self.vcpus.gate.requested() {
            return Err(SnapshotError::NotPaused);
        }
        self.snapshot.capture(&self.vcpus, with_memory)
    }

    /// How the host schedules each vCPU thread now (one entry per vCPU; an RT
    /// timer boost in progress not shown).
    pub fn vcpu_sched(&self) -> Vec<vigil_model::config::VcpuSched> {
        self.sched.current()
    }

    /// Changes how the host schedules the vCPU threads: `entries` as
    /// `--vcpu-sched` takes them (vCPUs no entry names keep their scheduling),
    /// admitted against the host first; nothing changes when refused.
    pub fn set_vcpu_sched(
        &self,
        entries: &[vigil_model::config::VcpuSched],
    ) -> Result<Vec<vigil_model::config::VcpuSched>, ControlError> {
        let current = self.sched.current();
        let count = current.len() as u32;
        let changed = vigil_model::config::VcpuSched::resolve(entries, count)?;
        let has_all = entries.iter().any(|e| e.vcpu.is_none());
        let plan: Vec<_> = current
            .into_iter()
            .zip(changed)
            .map(|(old, new)| {
                let named = entries.iter().any(|e| e.vcpu == new.vcpu);
                if named || has_all {
                    new
                } else {
                    old
                }
            })
            .collect();
        self.sched.set(plan)?;
        Ok(self.sched.current())
    }

    /// The memory-compression pager's policy, when the VM has the pager.
    pub fn memory_policy(&self) -> Option<vigil_model::config::MemoryCompression> {
        self.pager.as_ref().map(|p| p.get())
    }

    /// Changes the pager's idle time or RSS target; the policy in force
    /// after, or why not (nothing changes then).
    pub fn set_memory_policy(
        &self,
        update: &vigil_model::config::MemoryPolicyUpdate,
    ) -> Result<vigil_model::config::MemoryCompression, ControlError> {
        let pager = self.pager.as_ref().ok_or(ControlError::NoPager)?;
        Ok(pager.update(|current| update.apply(current))?)
    }

    /// Ends this VM because it cannot go on (`why`): it ends as
    /// [`crate::VmOutcome::Failed`].
    pub fn fail(&self, why: String) {
        let _ = self.stop_handle.0.send(VmEvent::Failed(why));
    }

    /// Has every later snapshot and migration keep `provider`'s state under
    /// `name` in [`VmState::extensions`] (a provider already under `name` is
    /// replaced).
    pub fn set_state_extension(&self, name: &str, provider: StateExtension) {
        lock(&self.snapshot.extensions).insert(name.to_owned(), provider);
    }

    /// Ends this VM because it now runs at `destination` (a migration that the
    /// destination confirmed): the VM ends as [`crate::VmOutcome::Migrated`].
    pub fn end_migrated(&self, destination: String) {
        let _ = self.stop_handle.0.send(VmEvent::Migrated(destination));
    }

    /// A handle on the VM's counters, to take snapshots.
    pub fn metrics(&self) -> &MetricsHandle {
        &self.metrics
    }

    /// Why the VM crashed (`vCPU N: reason`), when it crashed and is kept, paused,
    /// for inspection ([`vigil_model::config::OnCrash::Pause`]).
    pub fn crashed(&self) -> Option<String> {
        self.vcpus.gate.held()
    }

    /// Whether the vCPUs run or are paused (a crashed VM kept for inspection
    /// counts as paused).
    pub fn state(&self) -> RunState {
        if self.vcpus.gate.requested() {
            RunState::Paused
        } else {
            RunState::Running
        }
    }

    /// Asks the VM to stop, recording `signal` as the reason.
    pub fn stop(&self, signal: i32) {
        self.stop_handle.stop(signal);
    }

    /// Presses Ctrl-Alt-Del on the guest's keyboard.
    pub fn send_ctrl_alt_del(&self) -> Result<(), ControlError> {
        if lock(&self.i8042).send_ctrl_alt_del() {
            Ok(())
        } else {
            Err(ControlError::KeyboardBusy)
        }
    }

    /// The balloon, when the VM has one.
    pub fn balloon(&self) -> Result<&BalloonHandle, ControlError> {
        self.devices.balloon.as_ref().ok_or(ControlError::NoBalloon)
    }

    /// The virtio-blk drive whose id (`DriveConfig::id`) is `id`.
    pub fn drive(&self, id: &str) -> Result<&DriveHandle, ControlError> {
        self.devices
            .drives
            .get(id)
            .ok_or_else(|| ControlError::NoDrive(id.to_string()))
    }

    /// The virtio-net interface `index` (its place in `VmConfig::nets`).
    pub fn net(&self, index: usize) -> Result<&NetHandle, ControlError> {
        let nets = &self.devices.nets;
        nets.get(index)
            .ok_or(ControlError::NoNet(index, nets.len()))
    }
}
