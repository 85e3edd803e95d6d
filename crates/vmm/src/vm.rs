//! A built VM, and the same VM running: its vCPU threads, its device event loop,
//! and the wait for whatever ends it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::VmFd;
use vigil_devices::bus::Bus;
use vigil_devices::PowerEvent;
use vigil_metrics::{MetricsHandle, VmMetrics};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::symbols::SymbolTable;
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
    /// Counters of the vCPUs and devices.
    pub(crate) metrics: Arc<VmMetrics>,
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

/// A running VM.
pub struct RunningVm {
    vcpu_threads: Vec<JoinHandle<()>>,
    device_thread: Option<JoinHandle<()>>,
    device_waker: EventFd,
    stop: Arc<AtomicBool>,
    events_tx: Sender<VmEvent>,
    events_rx: Receiver<VmEvent>,
    symbols: Option<SymbolTable>,
    metrics: Arc<VmMetrics>,
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
        self.metrics.mark_started();
        let mut vcpu_threads = Vec::with_capacity(self.vcpus.len());
        for vcpu in self.vcpus {
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
        Ok(RunningVm {
            vcpu_threads,
            device_thread,
            device_waker,
            stop,
            events_tx: self.events_tx,
            events_rx: self.events_rx,
            symbols: self.symbols,
            metrics: self.metrics,
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

    /// A handle on this VM's metrics, to take snapshots from another thread; it
    /// stays valid after the VM ended.
    pub fn metrics(&self) -> MetricsHandle {
        MetricsHandle::new(self.metrics.clone())
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
        // A kick can land just before a thread enters KVM_RUN and be lost, so kick
        // until every thread has left.
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.vcpu_threads.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
            for t in self.vcpu_threads.iter().filter(|t| !t.is_finished()) {
                let _ = t.kill(kick_signal());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
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
