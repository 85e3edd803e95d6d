//! A built VM, and the same VM running: its vCPU threads, its device event loop,
//! and the wait for whatever ends it.

use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::VmFd;
use vigil_devices::bus::Bus;
use vigil_devices::legacy::I8042;
use vigil_devices::virtio::balloon::{BalloonConfig, BalloonControl, Stats};
use vigil_devices::virtio::{Interrupt, INT_CONFIG};
use vigil_devices::PowerEvent;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::symbols::SymbolTable;
use crate::vstate::pause::PauseGate;
use crate::vstate::vcpu::{CrashReport, Vcpu, VcpuContext};
use crate::VmEvent;

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
    pub(crate) symbols: Option<SymbolTable>,
    /// Set when the VM is ending; vCPU threads and the device loop leave then.
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) events_tx: Sender<VmEvent>,
    pub(crate) events_rx: Receiver<VmEvent>,
    /// Where vCPUs park while the VM is paused.
    pub(crate) pause: Arc<PauseGate>,
    /// The keyboard controller, to type Ctrl-Alt-Del.
    pub(crate) i8042: Arc<Mutex<I8042>>,
    /// The balloon, when the VM has one.
    pub(crate) balloon: Option<BalloonHandle>,
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
    #[error("the balloon was configured without statistics (stats_polling_interval_s 0); they cannot be turned on or off after boot")]
    BalloonStatsOff,
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

/// A cloneable handle to control a running VM from another thread (an API server):
/// pause, resume, state, stop, Ctrl-Alt-Del, the balloon.
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
    balloon: Option<BalloonHandle>,
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

    /// Lets the vCPUs run again. Resuming a running VM does nothing.
    pub fn resume(&self) -> Result<(), ControlError> {
        let _op = lock(&self.op);
        if self.stop.load(Ordering::Acquire) {
            return Err(ControlError::Stopping);
        }
        self.gate.release();
        Ok(())
    }

    /// Whether the vCPUs run or are paused.
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
        self.balloon.as_ref().ok_or(ControlError::NoBalloon)
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
    symbols: Option<SymbolTable>,
    // Kept alive until the threads that use them have been joined.
    _vm_fd: VmFd,
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
    /// Starts the vCPUs and the device event loop.
    pub fn start(self) -> std::io::Result<RunningVm> {
        register_signal_handler(kick_signal(), kick_handler)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        let stop = self.stop;
        let mut vcpu_threads = Vec::with_capacity(self.vcpus.len());
        for vcpu in self.vcpus {
            let ctx = VcpuContext {
                pio: self.pio.clone(),
                mmio: self.mmio.clone(),
                mem: self.mem.clone(),
                events: self.events_tx.clone(),
                stop: stop.clone(),
                pause: self.pause.clone(),
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
            balloon: self.balloon,
        };
        Ok(RunningVm {
            control,
            vcpu_threads,
            device_thread,
            device_waker,
            stop,
            events_tx: self.events_tx,
            events_rx: self.events_rx,
            symbols: self.symbols,
            _vm_fd: self.vm_fd,
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

    /// A handle to pause, resume and query this VM from another thread.
    pub fn control(&self) -> VmControl {
        self.control.clone()
    }

    /// The symbols given at launch, to describe guest addresses.
    pub fn symbols(&self) -> Option<&SymbolTable> {
        self.symbols.as_ref()
    }

    /// Waits for the VM to end, then stops and joins every thread.
    pub fn wait(mut self) -> VmOutcome {
        let outcome = match self.events_rx.recv() {
            Ok(VmEvent::Power(PowerEvent::PowerOff)) => VmOutcome::PoweredOff,
            Ok(VmEvent::Power(PowerEvent::Reset)) => VmOutcome::Reset,
            Ok(VmEvent::Power(PowerEvent::DebugExit(code))) => VmOutcome::DebugExit(code),
            Ok(VmEvent::Crash(report)) => VmOutcome::Crashed(report),
            Ok(VmEvent::VcpuFailed { vcpu, error }) => {
                VmOutcome::Failed(format!("vCPU {vcpu}: {error}"))
            }
            Ok(VmEvent::Stop(signal)) => VmOutcome::Stopped(signal),
            Err(_) => VmOutcome::Failed("every vCPU thread ended without a reason".into()),
        };
        self.shutdown();
        outcome
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
