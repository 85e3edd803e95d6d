//! A built VM, and the same VM running: its vCPU threads, its device event loop,
//! and the wait for whatever ends it.

use std::collections::BTreeMap;
use std::os::unix::thread::JoinHandleExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::{thread_cpu_ns, GuestMemoryMmap};
use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::VmFd;
use vigil_devices::bus::Bus;
use vigil_devices::legacy::{Serial, I8042};
use vigil_devices::virtio::mmio::MmioTransport;
use vigil_devices::virtio::pci::VirtioPci;
use vigil_devices::virtio::poll::PollWindow;
use vigil_devices::PowerEvent;
use vigil_metrics::{MetricsHandle, VmMetrics};
use vigil_seccomp::ThreadKind;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, Killable};

use crate::control::{ControlError, StopHandle, VmControl};
use crate::device_manager::DeviceHandles;
use crate::dirty_log::{DirtyTracker, KvmGuestLog, PAGE_SIZE};
use crate::inspect::VmInspect;
use crate::lazy_memory::LazyMemory;
use crate::pager::{MemoryReader, Pager};
use crate::rt::{RtTimer, VcpuScheduler};
use crate::snapshot::{SavedMachine, SnapshotSources, WrittenSince};
use crate::symbols::KernelSymbols;
use crate::vstate::inspect::{Mailbox, MsrGuard, MsrGuardSlot};
use crate::vstate::pause::PauseGate;
use crate::vstate::threads::{kick_signal, VcpuThreads};
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
    /// The console, to save its state.
    pub(crate) serial: Arc<Mutex<Serial>>,
    /// The keyboard controller, to type Ctrl-Alt-Del.
    pub(crate) i8042: Arc<Mutex<I8042>>,
    /// The host's handles on the drives, network interfaces and balloon.
    pub(crate) devices: DeviceHandles,
    /// The virtio transports in attach order, to save their state.
    pub(crate) transports: Vec<Arc<Mutex<MmioTransport>>>,
    /// With PCI, the virtio-pci functions in attach order (one per transport).
    pub(crate) pci_functions: Vec<Arc<Mutex<VirtioPci>>>,
    /// What a snapshot keeps of the configuration.
    pub(crate) machine: SavedMachine,
    /// Where guest memory came from.
    pub(crate) memory: MemoryOrigin,
    /// The MSR write guard, installed before start or through `VmInspect`.
    pub(crate) msr_guard: Arc<MsrGuardSlot>,
    /// What a vCPU crash does.
    pub(crate) on_crash: OnCrash,
    /// The snapshot's (or migrated state's) [`crate::snapshot::VmState::extensions`]
    /// a restored VM was built from; none for a booted one.
    pub(crate) extensions: BTreeMap<String, serde_json::Value>,
    /// How the host schedules the vCPU threads.
    pub(crate) sched: Arc<VcpuScheduler>,
    /// The RT timer device, when the VM has one.
    pub(crate) rt_timer: Option<Arc<RtTimer>>,
    /// The memory-compression pager, when it is on (anonymous memory only),
    /// answering faults already; it starts scanning with the VM.
    pub(crate) pager: Option<Pager>,
    /// The most the device event loop polls the rings after its last work.
    pub(crate) io_poll: Duration,
}

/// Where a VM's guest memory came from: what a snapshot or a migration of it
/// may assume of the pages the host has not backed.
#[derive(Debug, Default)]
pub enum MemoryOrigin {
    /// Anonymous memory, zeroed at the start (a VM built here, or received
    /// whole by migration): a page the host never backed holds zeros.
    #[default]
    Anonymous,
    /// A snapshot's memory file, mapped privately.
    File(PathBuf),
    /// Anonymous memory filled from a snapshot's memory file at the load
    /// (with the pager, which holds some of its pages): the file is not
    /// mapped.
    Loaded,
    /// Filled on demand through a userfaultfd (a snapshot's `Uffd` backend,
    /// post-copy migration); kept open as long as the VM runs.
    Lazy(Arc<LazyMemory>),
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
    /// The VM migrated and runs at this destination now.
    Migrated(String),
}

/// A running VM. It hands out two handles: [`VmControl`] (lifecycle) to the API
/// and the binary, [`VmInspect`] (memory, vCPUs, dirty log) to capabilities that
/// look into the guest; whoever holds the `RunningVm` decides who gets which.
pub struct RunningVm {
    control: VmControl,
    inspect: VmInspect,
    vcpus: Arc<VcpuThreads>,
    vcpu_threads: Vec<JoinHandle<()>>,
    device_thread: Option<JoinHandle<()>>,
    device_waker: EventFd,
    rt_timer: Option<(Arc<RtTimer>, JoinHandle<()>)>,
    stop: Arc<AtomicBool>,
    events_tx: Sender<VmEvent>,
    events_rx: Receiver<VmEvent>,
    metrics: Arc<VmMetrics>,
    extensions: BTreeMap<String, serde_json::Value>,
    // Kept alive until the threads that use them have been joined (the
    // inspection handle and the dirty log hold the fd weakly).
    _vm_fd: Arc<VmFd>,
    _mem: GuestMemoryMmap,
    _lazy: Option<Arc<LazyMemory>>,
    /// Stopped last: a device or vCPU thread still running may wait on it.
    pager: Option<Pager>,
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing to do: the signal's only job is to make KVM_RUN return EINTR.
}

impl Vm {
    /// Sends the guest's writes of `msrs` (1 to 16) to `guard` from its first
    /// instruction on; [`VmInspect::guard_msrs`] does the same once it runs.
    pub fn guard_msrs(&self, msrs: &[u32], guard: Arc<dyn MsrGuard>) -> Result<(), ControlError> {
        self.msr_guard.install(&self.vm_fd, msrs, guard)
    }

    /// The entry `name` of the state this VM was restored from
    /// ([`crate::snapshot::VmState::extensions`]), for the layer that owns it.
    pub fn extension(&self, name: &str) -> Option<&serde_json::Value> {
        self.extensions.get(name)
    }

    /// The most the device event loop polls the virtio rings after its last
    /// work instead of sleeping (zero: never); a booted VM has its
    /// configuration's `io_poll_us`, a restored one
    /// [`DEFAULT_IO_POLL_US`](vigil_model::config::DEFAULT_IO_POLL_US).
    pub fn poll_rings_for(&mut self, most: Duration) {
        self.io_poll = most;
    }

    /// Keeps the vCPUs parked from their first instruction on: once started,
    /// the VM is paused until [`VmControl::resume`].
    pub fn start_paused(&self) {
        self.pause.request();
    }

    /// Starts the vCPUs and the device event loop.
    pub fn start(self) -> std::io::Result<RunningVm> {
        register_signal_handler(kick_signal(), kick_handler)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        let stop = self.stop;
        let vm_fd = Arc::new(self.vm_fd);
        let guest_log = KvmGuestLog::new(Arc::downgrade(&vm_fd), self.mem.clone());
        let dirty = DirtyTracker::new(self.mem.clone(), Box::new(guest_log));
        // Before any vCPU runs: a restored VM's first diff differs from its file.
        // Memory not built here holds data in pages the host has not backed.
        let restored = !matches!(self.memory, MemoryOrigin::Anonymous);
        let (memory_file, lazy) = match self.memory {
            MemoryOrigin::Anonymous | MemoryOrigin::Loaded => (None, None),
            MemoryOrigin::File(path) => (Some(path), None),
            MemoryOrigin::Lazy(lazy) => (None, Some(lazy)),
        };
        let mut pager = self.pager;
        if let Some(pager) = &mut pager {
            pager
                .start_scanning(&dirty)
                .map_err(std::io::Error::other)?;
        }
        let written = WrittenSince::new(dirty.subscribe().map_err(|e| e.to_string()), restored);
        // The guest's write rate, measured when metrics are read.
        if let Ok(reader) = dirty.subscribe() {
            let _ = reader.take(); // every page, at first
            self.metrics.set_dirty_source(Box::new(move || {
                reader.take().ok().map(|log| log.count() as u64 * PAGE_SIZE)
            }));
        }
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
                sched: self.sched.clone(),
                rt_timer: self.rt_timer.clone(),
            };
            let handle = std::thread::Builder::new()
                .name(format!("vcpu{}", vcpu.id))
                .spawn(move || {
                    vigil_seccomp::confine(ThreadKind::Vcpu);
                    vcpu.run(ctx)
                })?;
            vcpu_threads.push(handle);
        }
        let device_waker = EventFd::new(libc::EFD_NONBLOCK)?;
        let device_thread = if self.subscribers.is_empty() {
            None
        } else {
            Some(spawn_device_loop(
                self.subscribers,
                self.transports.clone(),
                PollWindow::new(self.io_poll),
                stop.clone(),
                device_waker.try_clone()?,
            )?)
        };
        let rt_timer = match self.rt_timer {
            Some(timer) => {
                let thread = timer.start(Arc::downgrade(&vm_fd), self.pause.clone())?;
                Some((timer, thread))
            }
            None => None,
        };
        let vcpus = Arc::new(VcpuThreads::new(
            self.pause,
            vcpu_threads.iter().map(|t| t.as_pthread_t()).collect(),
            mailboxes,
        ));
        // Snapshots and migrations read held pages from the pool.
        let reader = pager
            .as_ref()
            .map_or_else(|| MemoryReader::plain(self.mem.clone()), Pager::reader);
        let snapshot = SnapshotSources {
            machine: self.machine,
            vm_fd: Arc::downgrade(&vm_fd),
            reader: reader.clone(),
            serial: self.serial,
            i8042: self.i8042.clone(),
            transports: self.transports,
            pci_functions: self.pci_functions,
            memory_file,
            written,
            extensions: Mutex::default(),
        };
        let control = VmControl {
            vcpus: vcpus.clone(),
            stop: stop.clone(),
            stop_handle: StopHandle(self.events_tx.clone()),
            op: Arc::new(Mutex::new(())),
            i8042: self.i8042,
            devices: Arc::new(self.devices),
            metrics: MetricsHandle::new(self.metrics.clone()),
            snapshot: Arc::new(snapshot),
            sched: self.sched,
            pager: pager.as_ref().map(Pager::policy),
        };
        let inspect = VmInspect {
            vcpus: vcpus.clone(),
            stop: stop.clone(),
            msr_guard: self.msr_guard,
            vm_fd: Arc::downgrade(&vm_fd),
            reader,
            // Pages the pager holds are not backed, yet not zeros.
            anonymous_memory: !restored && pager.is_none(),
            dirty,
            symbols: self.symbols,
        };
        Ok(RunningVm {
            control,
            inspect,
            vcpus,
            vcpu_threads,
            device_thread,
            device_waker,
            rt_timer,
            stop,
            events_tx: self.events_tx,
            events_rx: self.events_rx,
            metrics: self.metrics,
            extensions: self.extensions,
            _vm_fd: vm_fd,
            _mem: self.mem,
            _lazy: lazy,
            pager,
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

/// The device event loop: waits for events (queue notifications, host fds,
/// timers) and hands them to their subscribers; after each, polls the rings of
/// every transport for as long as `window` says ([`poll_rings`]).
fn spawn_device_loop(
    subscribers: Vec<Box<dyn MutEventSubscriber + Send>>,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
    mut window: PollWindow,
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
            vigil_seccomp::confine(ThreadKind::Devices);
            while !stop.load(Ordering::Acquire) {
                let asleep = Instant::now();
                let mut result = manager.run().map(drop);
                window.woke_after(asleep.elapsed());
                if result.is_ok() && !window.get().is_zero() {
                    let (started, cpu) = (Instant::now(), thread_cpu_ns());
                    result = poll_rings(&mut manager, &transports, window.get(), &stop);
                    let cpu = Duration::from_nanos(thread_cpu_ns().saturating_sub(cpu));
                    window.polled(started.elapsed(), cpu);
                }
                if let Err(e) = result {
                    tracing::error!("device event loop failed: {e:?}");
                    return;
                }
            }
        })
}

/// Looks at every transport's rings, and at the event loop's fds without
/// waiting, until `window` passes without work; the drivers are asked not to
/// notify meanwhile, and to notify again at the end.
fn poll_rings(
    manager: &mut EventManager<Box<dyn MutEventSubscriber + Send>>,
    transports: &[Arc<Mutex<MmioTransport>>],
    window: Duration,
    stop: &AtomicBool,
) -> Result<(), event_manager::Error> {
    fn lock(t: &Mutex<MmioTransport>) -> std::sync::MutexGuard<'_, MmioTransport> {
        t.lock().unwrap_or_else(|e| e.into_inner())
    }
    let polling = vigil_devices::virtio::poll::polling();
    let mut result = Ok(());
    let mut last = Instant::now();
    while !stop.load(Ordering::Acquire) && last.elapsed() < window {
        let mut found = false;
        for transport in transports {
            found |= lock(transport).poll();
        }
        match manager.run_with_timeout(0) {
            Ok(events) => found |= events > 0,
            Err(e) => {
                result = Err(e);
                break;
            }
        }
        if found {
            last = Instant::now();
        } else {
            // Threads this loop waits on (io_uring's workers) may need this CPU.
            std::thread::yield_now();
        }
    }
    drop(polling);
    for transport in transports {
        lock(transport).end_poll();
    }
    result
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

    /// The lifecycle handle: pause, resume, stop, devices, metrics.
    pub fn control(&self) -> VmControl {
        self.control.clone()
    }

    /// The inspection handle: guest memory, vCPU states, the dirty log.
    pub fn inspect(&self) -> VmInspect {
        self.inspect.clone()
    }

    /// The entry `name` of the state this VM was restored from, as
    /// [`Vm::extension`].
    pub fn extension(&self, name: &str) -> Option<&serde_json::Value> {
        self.extensions.get(name)
    }

    /// The kernel's symbols, to describe guest addresses (read when first asked for).
    pub fn symbols(&self) -> &KernelSymbols {
        self.inspect.symbols()
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
                Ok(VmEvent::Failed(why)) => VmOutcome::Failed(why),
                Ok(VmEvent::Migrated(to)) => VmOutcome::Migrated(to),
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
        self.vcpus.gate.wake_all();
        // A kick can land just before a thread enters KVM_RUN and be lost, so kick
        // until every thread has left.
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.vcpu_threads.iter().any(|t| !t.is_finished()) && Instant::now() < deadline {
            for t in self.vcpu_threads.iter().filter(|t| !t.is_finished()) {
                let _ = t.kill(kick_signal());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        // No kick from a handle may reach a thread id once it is joined.
        self.vcpus.forget();
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
        if let Some((timer, thread)) = self.rt_timer.take() {
            timer.stop();
            let _ = thread.join();
        }
        self.pager.take();
    }
}
