//! A built VM, and the same VM running: its vCPU threads, its device event loop,
//! and the wait for whatever ends it.

use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::{VcpuFd, VmFd};
use vigil_devices::bus::Bus;
use vigil_devices::legacy::I8042;
use vigil_devices::rate_limiter::{LimitUpdate, RateLimitControl};
use vigil_devices::virtio::balloon::{BalloonControl, Stats};
use vigil_devices::virtio::{Interrupt, INT_CONFIG};
use vigil_devices::PowerEvent;
use vigil_metrics::{MetricsHandle, VmMetrics};
use vigil_model::config::BalloonConfig;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::device_manager::DeviceHandles;
use crate::dirty_log::{self, DirtyLog, DirtyLogError};
use crate::symbols::KernelSymbols;
use crate::vstate::inspect::{
    self, BreakpointHandler, Mailbox, MsrGuard, MsrGuardSlot, VcpuAccess, VcpuState,
    MAX_BREAKPOINTS,
};
use crate::vstate::pause::PauseGate;
use crate::vstate::vcpu::{CrashReport, Vcpu, VcpuContext};
use crate::VmEvent;
use vigil_model::config::OnCrash;

/// A VM ready to start. Field order matters: the KVM fd and vCPUs are dropped
/// before the guest memory they map.
pub struct Vm {
    pub(crate) vcpus: Vec<Vcpu>,
    pub(crate) vm_fd: VmFd,
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) pio: Bus,
    pub(crate) mmio: Bus,
    /// What the device event loop watches: console input, virtio queues.
    pub(crate) subscribers: Vec<Box<dyn MutEventSubscriber + Send>>,
    /// The kernel's symbols, read when first needed.
    pub(crate) symbols: KernelSymbols,
    /// Set when the VM is ending; vCPU threads and the device loop leave then.
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) events_tx: Sender<VmEvent>,
    pub(crate) events_rx: Receiver<VmEvent>,
    /// Counters of the vCPUs and devices.
    pub(crate) metrics: Arc<VmMetrics>,
    /// Where vCPUs park while the VM is paused.
    pub(crate) pause: Arc<PauseGate>,
    /// The keyboard controller, to type Ctrl-Alt-Del.
    pub(crate) i8042: Arc<Mutex<I8042>>,
    /// The host's handles on the drives, network interfaces and balloon.
    pub(crate) devices: DeviceHandles,
    /// The MSR write guard, installed before start or through `VmControl`.
    pub(crate) msr_guard: Arc<MsrGuardSlot>,
    /// What a vCPU crash does.
    pub(crate) on_crash: OnCrash,
}

/// How a VM ended.
#[derive(Debug)]
pub enum VmOutcome {
    /// The guest powered off (ACPI S5).
    PoweredOff,
    /// The guest reset the machine; Vigil stops the VM rather than reboot it.
    Reset,
    /// The guest wrote this status to the debug-exit port.
    DebugExit(u32),
    /// A vCPU crashed.
    Crashed(Box<CrashReport>),
    /// The VMM was asked to stop by this signal.
    Stopped(i32),
    /// The VMM failed while running the VM.
    Failed(String),
}

/// Lets another thread (a signal handler thread, an API server) stop the VM.
#[derive(Clone)]
pub struct StopHandle(Sender<VmEvent>);

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

/// Why a control request failed.
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
    #[error("no vCPU {0} (the VM has {1})")]
    NoVcpu(u32, usize),
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
    #[error(transparent)]
    DirtyLog(#[from] DirtyLogError),
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
}

/// Wakes a device's queues on the device event loop, so that a device waiting on
/// its rate-limiter timer decides again at once under a new limit.
#[derive(Clone)]
pub(crate) struct QueueWaker(Arc<Vec<EventFd>>);

impl QueueWaker {
    pub(crate) fn new(queue_evts: Vec<EventFd>) -> Self {
        Self(Arc::new(queue_evts))
    }

    fn wake(&self) {
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

/// A cloneable handle to control a running VM from another thread (an API server):
/// pause, resume, state, stop, Ctrl-Alt-Del, the balloon, device rate limits, and
/// introspection (vCPU state, guarded MSR writes, breakpoints; see `vstate::inspect`).
#[derive(Clone)]
pub struct VmControl {
    gate: Arc<PauseGate>,
    /// The vCPU threads, to kick; emptied before they are joined.
    threads: Arc<Mutex<Vec<libc::pthread_t>>>,
    vcpu_count: usize,
    stop: Arc<AtomicBool>,
    stop_handle: StopHandle,
    /// One pause or resume at a time.
    op: Arc<Mutex<()>>,
    i8042: Arc<Mutex<I8042>>,
    devices: Arc<DeviceHandles>,
    metrics: MetricsHandle,
    /// Per-vCPU requests, by vCPU index.
    mailboxes: Arc<Vec<Arc<Mailbox>>>,
    msr_guard: Arc<MsrGuardSlot>,
    /// For the MSR filter; gone once the VM has ended.
    vm_fd: Weak<VmFd>,
    mem: GuestMemoryMmap,
    /// Whether dirty logging is on; held across each dirty-log call.
    dirty: Arc<Mutex<bool>>,
    /// The kernel's symbols, read when first needed.
    symbols: KernelSymbols,
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
        self.gate.request();
        let start = Instant::now();
        loop {
            if self.stop.load(Ordering::Acquire) {
                self.gate.release();
                return Err(ControlError::Stopping);
            }
            // A kick can land just before a thread enters KVM_RUN and be lost, so
            // kick until every thread has parked.
            for &thread in lock(&self.threads).iter() {
                // SAFETY: `thread` is a vCPU thread that has not been joined (the
                // list is emptied, under this lock, before any join), and the kick
                // signal has a handler that does nothing.
                unsafe { libc::pthread_kill(thread, kick_signal()) };
            }
            let parked = self.gate.parked_after(Duration::from_millis(1));
            if parked >= self.vcpu_count {
                return Ok(());
            }
            if start.elapsed() > PAUSE_TIMEOUT {
                self.gate.release();
                return Err(ControlError::PauseTimeout {
                    parked,
                    total: self.vcpu_count,
                    waited_ms: start.elapsed().as_millis(),
                });
            }
        }
    }

    /// Lets the vCPUs run again. Resuming a running VM does nothing. A crashed VM
    /// kept for inspection ([`OnCrash::Pause`]) cannot resume.
    pub fn resume(&self) -> Result<(), ControlError> {
        let _op = lock(&self.op);
        if self.stop.load(Ordering::Acquire) {
            return Err(ControlError::Stopping);
        }
        if let Some(why) = self.gate.held() {
            return Err(ControlError::Crashed(why));
        }
        self.gate.release();
        Ok(())
    }

    /// A handle on the VM's counters, to take snapshots.
    pub fn metrics(&self) -> &MetricsHandle {
        &self.metrics
    }

    /// Why the VM crashed (`vCPU N: reason`), when it crashed and is kept, paused,
    /// for inspection ([`OnCrash::Pause`]).
    pub fn crashed(&self) -> Option<String> {
        self.gate.held()
    }

    /// The guest's RAM (a clone of the reference-counted mapping), to read it.
    pub fn guest_memory(&self) -> GuestMemoryMmap {
        self.mem.clone()
    }

    /// The kernel's symbols (read when first asked for).
    pub fn symbols(&self) -> &KernelSymbols {
        &self.symbols
    }

    /// The KVM VM, while it exists (a control handle may outlive it).
    fn live_vm_fd(&self) -> Result<Arc<VmFd>, ControlError> {
        self.vm_fd.upgrade().ok_or(ControlError::Stopping)
    }

    /// The guest pages written since the previous call. The first call (and the
    /// first after [`VmControl::stop_dirty_log`]) turns KVM's dirty logging on for
    /// every RAM slot and returns a log in which every page counts as dirty, since
    /// nothing is known yet. Calls are serialized; each one resets what the next
    /// one sees, so the log has one owner at a time (an integrity monitor now; live
    /// migration, later, must share it through that owner).
    pub fn dirty_log(&self) -> Result<DirtyLog, ControlError> {
        let mut on = lock(&self.dirty);
        if !*on {
            dirty_log::set_logging(&*self.live_vm_fd()?, &self.mem, true)?;
            *on = true;
            return Ok(DirtyLog::all(&self.mem));
        }
        Ok(dirty_log::fetch(&*self.live_vm_fd()?, &self.mem)?)
    }

    /// Turns dirty logging off (it costs the guest a fault on the first write to
    /// each page after every call). Does nothing when it is off.
    pub fn stop_dirty_log(&self) -> Result<(), ControlError> {
        let mut on = lock(&self.dirty);
        if *on {
            dirty_log::set_logging(&*self.live_vm_fd()?, &self.mem, false)?;
            *on = false;
        }
        Ok(())
    }

    /// Whether the vCPUs run or are paused (a crashed VM kept for inspection
    /// counts as paused).
    pub fn state(&self) -> RunState {
        if self.gate.requested() {
            RunState::Paused
        } else {
            RunState::Running
        }
    }

    /// Whether the VM is ending (a power-off, a crash, a stop).
    pub fn is_stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
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

    /// How many vCPUs the VM has.
    pub fn vcpu_count(&self) -> usize {
        self.vcpu_count
    }

    /// Runs `f` with vCPU `vcpu`'s fd on that vCPU's thread, between two `KVM_RUN`s
    /// (running or paused), and returns what it returns. Waits at most 1 s. `f` must
    /// not change the vCPU's guest debug state, which the breakpoints own.
    pub fn with_vcpu<T, F>(&self, vcpu: u32, f: F) -> Result<T, ControlError>
    where
        T: Send + 'static,
        F: FnOnce(&VcpuFd) -> T + Send + 'static,
    {
        self.call(vcpu, move |access| f(access.fd))
    }

    /// Every vCPU's registers and [`inspect::INSPECTED_MSRS`], each read on its own
    /// thread (running or paused).
    pub fn vcpu_states(&self) -> Result<Vec<VcpuState>, ControlError> {
        self.call_each(|access| inspect::read_state(access.id, access.fd))?
            .into_iter()
            .collect()
    }

    /// Writes MSR `index` of vCPU `vcpu` as the host (the MSR guard does not see it).
    pub fn write_msr(&self, vcpu: u32, index: u32, value: u64) -> Result<(), ControlError> {
        if self.call(vcpu, move |access| {
            inspect::set_msr(access.fd, index, value)
        })? {
            Ok(())
        } else {
            Err(ControlError::MsrRefused { vcpu, index, value })
        }
    }

    /// Sends the guest's writes (not reads) of `msrs` (1 to 16) to `guard`, on
    /// every vCPU, replacing any guard before.
    pub fn guard_msrs(&self, msrs: &[u32], guard: Arc<dyn MsrGuard>) -> Result<(), ControlError> {
        let vm_fd = self.vm_fd.upgrade().ok_or(ControlError::Stopping)?;
        self.msr_guard.install(&vm_fd, msrs, guard)
    }

    /// Lets the guest write every MSR without asking a guard.
    pub fn unguard_msrs(&self) -> Result<(), ControlError> {
        let vm_fd = self.vm_fd.upgrade().ok_or(ControlError::Stopping)?;
        self.msr_guard.remove(&vm_fd)
    }

    /// Arms hardware execution breakpoints at the guest-virtual `addrs` (1 to 4,
    /// canonical) on every vCPU, replacing those before; `handler` hears of every
    /// hit. On an error some vCPUs may be armed: `clear_breakpoints` disarms them.
    pub fn set_breakpoints(
        &self,
        addrs: &[u64],
        handler: Arc<dyn BreakpointHandler>,
    ) -> Result<(), ControlError> {
        if addrs.is_empty() || addrs.len() > MAX_BREAKPOINTS {
            return Err(ControlError::BreakpointCount(addrs.len()));
        }
        // The host loads them into its own debug registers, where a non-canonical
        // address faults.
        if let Some(&bad) = addrs
            .iter()
            .find(|&&a| ((a << 16) as i64 >> 16) as u64 != a)
        {
            return Err(ControlError::BreakpointAddress(bad));
        }
        let addrs = addrs.to_vec();
        self.call_each(move |access| access.breakpoints.arm(access.fd, &addrs, handler.clone()))?
            .into_iter()
            .collect()
    }

    /// Disarms the breakpoints on every vCPU: the guest runs at full speed again.
    pub fn clear_breakpoints(&self) -> Result<(), ControlError> {
        self.call_each(|access| access.breakpoints.clear(access.fd))?
            .into_iter()
            .collect()
    }

    /// Queues `f` for vCPU `vcpu`; its result comes on the receiver.
    fn post<T: Send + 'static>(
        &self,
        vcpu: u32,
        f: impl FnOnce(&mut VcpuAccess<'_>) -> T + Send + 'static,
    ) -> Result<Receiver<T>, ControlError> {
        let mailbox = self
            .mailboxes
            .get(vcpu as usize)
            .ok_or(ControlError::NoVcpu(vcpu, self.vcpu_count))?;
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        if lock(&self.threads).get(vcpu as usize) == Some(&me) {
            return Err(ControlError::OwnThread(vcpu));
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let request = Box::new(move |access: &mut VcpuAccess<'_>| {
            let _ = tx.send(f(access));
        });
        if mailbox.post(request) {
            Ok(rx)
        } else {
            Err(ControlError::VcpuGone(vcpu))
        }
    }

    /// Waits for the result of a request posted to `vcpu`.
    fn wait<T>(&self, vcpu: u32, reply: Receiver<T>) -> Result<T, ControlError> {
        inspect::wait_reply(vcpu, &reply, || {
            if let Some(&thread) = lock(&self.threads).get(vcpu as usize) {
                // SAFETY: as in `pause`: a vCPU thread not yet joined, and a kick
                // signal whose handler does nothing.
                unsafe { libc::pthread_kill(thread, kick_signal()) };
            }
            // A parked vCPU waits on the pause gate, not in KVM_RUN.
            self.gate.wake_all();
        })
    }

    fn call<T: Send + 'static>(
        &self,
        vcpu: u32,
        f: impl FnOnce(&mut VcpuAccess<'_>) -> T + Send + 'static,
    ) -> Result<T, ControlError> {
        let reply = self.post(vcpu, f)?;
        self.wait(vcpu, reply)
    }

    /// Runs `f` on every vCPU, all at once; results by vCPU index.
    fn call_each<T: Send + 'static>(
        &self,
        f: impl Fn(&mut VcpuAccess<'_>) -> T + Clone + Send + 'static,
    ) -> Result<Vec<T>, ControlError> {
        let replies = (0..self.vcpu_count as u32)
            .map(|vcpu| self.post(vcpu, f.clone()))
            .collect::<Result<Vec<_>, _>>()?;
        (0..self.vcpu_count as u32)
            .zip(replies)
            .map(|(vcpu, reply)| self.wait(vcpu, reply))
            .collect()
    }
}

/// A running VM.
pub struct RunningVm {
    control: VmControl,
    vcpu_threads: Vec<JoinHandle<()>>,
    device_thread: Option<JoinHandle<()>>,
    device_waker: EventFd,
    stop: Arc<AtomicBool>,
    events_tx: Sender<VmEvent>,
    events_rx: Receiver<VmEvent>,
    metrics: Arc<VmMetrics>,
    // Kept alive until the threads that use them have been joined (control
    // handles hold the fd weakly).
    _vm_fd: Arc<VmFd>,
    _mem: GuestMemoryMmap,
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing to do: the signal's only job is to make KVM_RUN return EINTR.
}

/// The signal that kicks vCPU threads out of `KVM_RUN`.
fn kick_signal() -> i32 {
    SIGRTMIN()
}

impl Vm {
    /// Sends the guest's writes of `msrs` (1 to 16) to `guard` from its first
    /// instruction on; [`VmControl::guard_msrs`] does the same once it runs.
    pub fn guard_msrs(&self, msrs: &[u32], guard: Arc<dyn MsrGuard>) -> Result<(), ControlError> {
        self.msr_guard.install(&self.vm_fd, msrs, guard)
    }

    /// Starts the vCPUs and the device event loop.
    pub fn start(self) -> std::io::Result<RunningVm> {
        register_signal_handler(kick_signal(), kick_handler)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        let stop = self.stop;
        self.metrics.mark_started();
        let mut vcpu_threads = Vec::with_capacity(self.vcpus.len());
        let mailboxes: Vec<Arc<Mailbox>> = self.vcpus.iter().map(|_| Arc::default()).collect();
        for (vcpu, mailbox) in self.vcpus.into_iter().zip(&mailboxes) {
            let ctx = VcpuContext {
                pio: self.pio.clone(),
                mmio: self.mmio.clone(),
                mem: self.mem.clone(),
                events: self.events_tx.clone(),
                stop: stop.clone(),
                metrics: self
                    .metrics
                    .vcpu(vcpu.id)
                    .cloned()
                    .unwrap_or_else(|| Arc::new(vigil_metrics::VcpuCounters::new(vcpu.id))),
                pause: self.pause.clone(),
                mailbox: mailbox.clone(),
                msr_guard: self.msr_guard.clone(),
                on_crash: self.on_crash,
            };
            let handle = std::thread::Builder::new()
                .name(format!("vcpu{}", vcpu.id))
                .spawn(move || vcpu.run(ctx))?;
            vcpu_threads.push(handle);
        }
        let device_waker = EventFd::new(libc::EFD_NONBLOCK)?;
        let device_thread = if self.subscribers.is_empty() {
            None
        } else {
            Some(spawn_device_loop(
                self.subscribers,
                stop.clone(),
                device_waker.try_clone()?,
            )?)
        };
        let vm_fd = Arc::new(self.vm_fd);
        let control = VmControl {
            gate: self.pause,
            threads: Arc::new(Mutex::new(
                vcpu_threads.iter().map(|t| t.as_pthread_t()).collect(),
            )),
            vcpu_count: vcpu_threads.len(),
            stop: stop.clone(),
            stop_handle: StopHandle(self.events_tx.clone()),
            op: Arc::new(Mutex::new(())),
            i8042: self.i8042,
            devices: Arc::new(self.devices),
            metrics: MetricsHandle::new(self.metrics.clone()),
            mailboxes: Arc::new(mailboxes),
            msr_guard: self.msr_guard,
            vm_fd: Arc::downgrade(&vm_fd),
            mem: self.mem.clone(),
            dirty: Arc::new(Mutex::new(false)),
            symbols: self.symbols,
        };
        Ok(RunningVm {
            control,
            vcpu_threads,
            device_thread,
            device_waker,
            stop,
            events_tx: self.events_tx,
            events_rx: self.events_rx,
            metrics: self.metrics,
            _vm_fd: vm_fd,
            _mem: self.mem,
        })
    }
}

/// Wakes the device event loop when the VM stops, so it exits at once.
struct StopWaker(EventFd);

impl MutEventSubscriber for StopWaker {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.read();
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.0, EventSet::IN)) {
            tracing::error!("device event loop cannot watch for stop: {e:?}");
        }
    }
}

fn spawn_device_loop(
    subscribers: Vec<Box<dyn MutEventSubscriber + Send>>,
    stop: Arc<AtomicBool>,
    waker: EventFd,
) -> std::io::Result<JoinHandle<()>> {
    let mut manager = EventManager::<Box<dyn MutEventSubscriber + Send>>::new()
        .map_err(|e| std::io::Error::other(format!("device event loop: {e:?}")))?;
    for subscriber in subscribers {
        manager.add_subscriber(subscriber);
    }
    manager.add_subscriber(Box::new(StopWaker(waker)));
    std::thread::Builder::new()
        .name("devices".into())
        .spawn(move || {
            while !stop.load(Ordering::Acquire) {
                if let Err(e) = manager.run() {
                    tracing::error!("device event loop failed: {e:?}");
                    return;
                }
            }
        })
}

impl RunningVm {
    /// A handle to stop this VM from another thread.
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle(self.events_tx.clone())
    }

    /// A handle on this VM's metrics, to take snapshots from another thread; it
    /// stays valid after the VM ended.
    pub fn metrics(&self) -> MetricsHandle {
        MetricsHandle::new(self.metrics.clone())
    }

    /// A handle to pause, resume and query this VM from another thread.
    pub fn control(&self) -> VmControl {
        self.control.clone()
    }

    /// The kernel's symbols, to describe guest addresses (read when first asked for).
    pub fn symbols(&self) -> &KernelSymbols {
        &self.control.symbols
    }

    /// Waits for the VM to end, then stops and joins every thread.
    pub fn wait(self) -> VmOutcome {
        self.wait_reporting(&mut |report| {
            tracing::error!(
                vcpu = report.vcpu,
                reason = %report.reason,
                "the guest crashed; the VM is kept, paused, for inspection until it is stopped"
            )
        })
    }

    /// [`RunningVm::wait`], calling `on_kept_crash` at the moment a vCPU crashes
    /// when the VM is kept for inspection ([`OnCrash::Pause`]). Such a VM ends
    /// when it is stopped, with [`VmOutcome::Crashed`] and the first crash's report.
    pub fn wait_reporting(mut self, on_kept_crash: &mut dyn FnMut(&CrashReport)) -> VmOutcome {
        let mut kept: Option<Box<CrashReport>> = None;
        let outcome = loop {
            let outcome = match self.events_rx.recv() {
                Ok(VmEvent::Power(PowerEvent::PowerOff)) => VmOutcome::PoweredOff,
                Ok(VmEvent::Power(PowerEvent::Reset)) => VmOutcome::Reset,
                Ok(VmEvent::Power(PowerEvent::DebugExit(code))) => VmOutcome::DebugExit(code),
                Ok(VmEvent::Crash(report)) => VmOutcome::Crashed(report),
                Ok(VmEvent::CrashKept(report)) => {
                    on_kept_crash(&report);
                    if kept.is_none() {
                        kept = Some(report);
                        // Park the other vCPUs now (the gate is held shut already;
                        // this kicks them out of KVM_RUN).
                        if let Err(e) = self.control.pause() {
                            tracing::warn!("after the crash, pausing the other vCPUs: {e}");
                        }
                    }
                    continue;
                }
                Ok(VmEvent::VcpuFailed { vcpu, error }) => {
                    VmOutcome::Failed(format!("vCPU {vcpu}: {error}"))
                }
                Ok(VmEvent::Stop(signal)) => VmOutcome::Stopped(signal),
                Err(_) => VmOutcome::Failed("every vCPU thread ended without a reason".into()),
            };
            break outcome;
        };
        self.shutdown();
        match kept {
            Some(report) => VmOutcome::Crashed(report),
            None => outcome,
        }
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.control.gate.wake_all();
        // A kick can land just before a thread enters KVM_RUN and be lost, so kick
        // until every thread has left.
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.vcpu_threads.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
            for t in self.vcpu_threads.iter().filter(|t| !t.is_finished()) {
                let _ = t.kill(kick_signal());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        // No kick from a control handle may reach a thread id once it is joined.
        lock(&self.control.threads).clear();
        for t in self.vcpu_threads.drain(..) {
            if t.is_finished() {
                let _ = t.join();
            } else {
                tracing::warn!("a vCPU thread did not stop within 5 s; leaving it behind");
            }
        }
        if let Some(t) = self.device_thread.take() {
            let _ = self.device_waker.write(1);
            let _ = t.join();
        }
    }
}
