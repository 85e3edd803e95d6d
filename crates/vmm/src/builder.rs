//! Turns a validated [`VmConfig`] into a [`Vm`] ready to start, one step after the
//! other: guest memory, the KVM VM (with its irqchip), the legacy devices on the
//! port bus, each kind of virtio device (placed by the device manager), the
//! kernel and boot information, and the vCPUs. The order of the virtio steps is
//! the guest-visible layout: disks, entropy, balloon, network, vsock take the
//! MMIO windows and interrupt lines one after the other.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::GuestMemoryMmap;
use event_manager::MutEventSubscriber;
use kvm_bindings::{KVM_CLOCK_REALTIME, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VmFd};
use vigil_devices::bus::{Bus, BusError};
use vigil_devices::legacy::{
    AcpiPowerPort, ConsoleOutput, DebugExitPort, I8042State, Serial, SerialInput, SerialState,
    I8042,
};
use vigil_devices::persist::{Persist, RestoreError};
use vigil_devices::virtio::balloon::Balloon;
use vigil_devices::virtio::block::{Block, BlockError};
use vigil_devices::virtio::mmio::TransportError;
use vigil_devices::virtio::net::{Net, NetError};
use vigil_devices::virtio::persist::DeviceState;
use vigil_devices::virtio::rng::Rng;
use vigil_devices::virtio::vsock::{Vsock, VsockError};
use vigil_devices::PowerHandler;
use vigil_metrics::{DeviceKind, VcpuCounters, VmMetrics};
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::acpi::{
    self, AcpiError, MmioDevice, PciIntx, ACPI_POWER_PORT, COM1_IRQ, COM1_PORT,
};
use crate::arch::x86_64::boot::{self, BootError, EntryPoint};
use crate::arch::x86_64::cpuid::{self, Topology};
use crate::arch::x86_64::layout;
use crate::arch::x86_64::regs::{self, RegsError};
use crate::device_manager::DeviceManager;
use crate::lazy_memory::{LazyMemory, LazyMemoryError};
use crate::pager::{Pager, PagerError};
use crate::rt::timer::{RT_TIMER_LEAF, RT_TIMER_PORT, RT_TIMER_PORTS};
use crate::rt::{RtTimer, VcpuScheduler};
use crate::snapshot::file::{self as snapshot_file, FileError};
use crate::snapshot::memory_ranges;
use crate::snapshot::state::{MemoryRange, SavedMachine, VmState};
use crate::symbols::KernelSymbols;
use crate::vm::{MemoryOrigin, Vm};
use crate::vstate::pause::PauseGate;
use crate::vstate::persist::{self, KvmStateError};
use crate::vstate::vcpu::Vcpu;
use crate::vstate::vm::{create_vm, VmError};
use crate::VmEvent;
use vigil_model::config::{
    ConfigError, ConsoleConfig, CpuTemplate, FieldError, HostLimits, HugePages, KernelImage,
    MemoryCompression, OnCrash, RtTimerConfig, VcpuSched, VmConfig, DEFAULT_IO_POLL_US,
};
use vigil_model::cpu::CpuFeature;

/// QEMU's `isa-debug-exit` port, as test guests expect it.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
const I8042_PORT: u16 = 0x60;
/// The keyboard's ISA interrupt.
const I8042_IRQ: u32 = 1;

/// Errors from building a VM. Each names what it could not do and why.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("cannot open /dev/kvm: {0} (is KVM enabled, and may this user use it?)")]
    Kvm(kvm_ioctls::Error),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("vCPU scheduling: {0}")]
    Sched(#[from] crate::rt::SchedError),
    #[error("cannot allocate {mib} MiB of guest memory: {detail}")]
    Memory { mib: u64, detail: String },
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("console file:{path}: cannot create it: {source}")]
    ConsoleFile {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot set up devices: {0}")]
    Bus(#[from] BusError),
    #[error("cannot set up devices: {0}")]
    EventFd(std::io::Error),
    #[error("cannot set up devices: virtio device at {base:#x}: {source}")]
    VirtioDevice { base: u64, source: std::io::Error },
    #[error("cannot set up the PCI bus: {0}")]
    Pci(String),
    #[error("cannot set up devices: {0}")]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Acpi(#[from] AcpiError),
    #[error("vCPU {vcpu}: {source}")]
    Vcpu { vcpu: u32, source: RegsError },
    #[error(transparent)]
    CustomTemplate(#[from] cpuid::CustomTemplateError),
    #[error(transparent)]
    Disk(#[from] BlockError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Vsock(#[from] VsockError),
    #[error("snapshot: {0}")]
    Snapshot(#[from] FileError),
    #[error("memory on demand: {0}")]
    LazyMemory(#[from] LazyMemoryError),
    #[error("snapshot: {0}")]
    Restore(RestoreError),
    #[error("snapshot: {0}")]
    KvmState(#[from] KvmStateError),
    #[error("snapshot: {field}: {why}")]
    SnapshotMismatch { field: String, why: String },
    #[error("boot_args: {len} bytes once the virtio devices are declared on it, more than the {max} a kernel accepts")]
    CmdlineTooLong { len: usize, max: usize },
    #[error(transparent)]
    Pager(#[from] PagerError),
}

impl BuildError {
    /// The configured field the error is about, when it is about one: the front
    /// end names it ([`FieldError::named`]).
    pub fn field_error(&self) -> Option<&dyn FieldError> {
        match self {
            BuildError::Config(e) => Some(e),
            BuildError::Boot(e) if !e.field().is_empty() => Some(e),
            BuildError::Disk(e) => Some(e),
            BuildError::Net(e) => Some(e),
            BuildError::Vsock(e) => Some(e),
            BuildError::ConsoleFile { .. } | BuildError::CmdlineTooLong { .. } => Some(self),
            _ => None,
        }
    }
}

impl FieldError for BuildError {
    fn field(&self) -> &'static str {
        match self {
            BuildError::ConsoleFile { .. } => "console",
            BuildError::CmdlineTooLong { .. } => "boot_args",
            _ => self.field_error().map_or("", |e| e.field()),
        }
    }
}

pub(crate) fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> BuildError {
    move |source| BuildError::Vm(VmError::Kvm { what, source })
}

/// The features hidden from the guest: the template's plus the user's.
fn hidden_features(config: &VmConfig) -> Vec<CpuFeature> {
    let mut hide = config.machine.cpuid_hide.clone();
    if config.machine.cpu_template == CpuTemplate::Auto && cpuid::host_emulates_cpl0() {
        hide.extend(
            cpuid::EMULATED_CPL0_HIDDEN
                .iter()
                .filter_map(|n| CpuFeature::by_name(n)),
        );
    }
    hide
}

/// Guest RAM, laid out around the 32-bit hole.
fn guest_memory(config: &VmConfig) -> Result<GuestMemoryMmap, BuildError> {
    let ranges = layout::ram_ranges(config.machine.memory_bytes());
    GuestMemoryMmap::from_ranges(&ranges).map_err(|e| BuildError::Memory {
        mib: config.machine.mem_size_mib,
        detail: e.to_string(),
    })
}

/// Builds the VM described by `config`.
pub fn build(config: &VmConfig) -> Result<Vm, BuildError> {
    let kvm = Kvm::new().map_err(BuildError::Kvm)?;
    config.validate(&HostLimits::read(kvm.get_max_vcpus() as u32))?;
    for &cap in &config.machine.cpu_modifiers.required_kvm_caps {
        if kvm.check_extension_raw(cap.into()) <= 0 {
            return Err(cpuid::CustomTemplateError::MissingKvmCapability(cap).into());
        }
    }
    let plan = VcpuSched::resolve(&config.vcpu_sched, config.machine.vcpu_count)
        .map_err(ConfigError::from)?;
    let sched = VcpuScheduler::new(plan)?;
    // Read when a crash report or introspection needs them, not at boot.
    let symbols = KernelSymbols::new(config.boot.symbols.clone(), config.boot.kernel.clone());
    let mem = guest_memory(config)?;
    let vm_fd = create_vm(&kvm, &mem, config.machine.huge_pages)?;

    let (events_tx, events_rx) = mpsc::channel();
    let stop = Arc::new(AtomicBool::new(false));
    let power = power_handler(&events_tx, &stop);
    let legacy = legacy_devices(&config.console, &vm_fd, power, None)?;

    let mut devices = if config.pci {
        DeviceManager::with_pci(&vm_fd, &mem)?
    } else {
        DeviceManager::new(&vm_fd, &mem)
    };
    attach_disks(config, &mut devices)?;
    attach_rng(config, &mut devices)?;
    attach_balloon(config, &mut devices)?;
    attach_nets(config, &mut devices)?;
    attach_vsock(config, &mut devices)?;

    let cmdline = format!("{}{}", config.boot.cmdline, devices.cmdline_entries());
    let cmdline = cmdline.trim_start();
    let apic_ids: Vec<u8> = (0..config.machine.vcpu_count).map(|i| i as u8).collect();
    let entry = load_boot(
        config,
        &mem,
        cmdline,
        &apic_ids,
        devices.acpi_devices(),
        devices.pci_interrupts(),
    )?;
    let virtio = devices.finish()?;

    let hide = hidden_features(config);
    let vcpus = create_vcpus(config, &kvm, &vm_fd, &mem, &apic_ids, &hide, entry)?;
    // Once the boot files are in memory (writes to missing pages would each
    // go through the pager).
    let pager = config
        .memory_compression
        .map(|c| Pager::new(c, &mem, Arc::default()))
        .transpose()?;
    tracing::info!(
        kernel = %config.boot.kernel,
        entry = ?entry,
        vcpus = config.machine.vcpu_count,
        memory_mib = config.machine.mem_size_mib,
        hidden_cpuid = ?hide.iter().map(|f| f.name).collect::<Vec<_>>(),
        "VM built"
    );

    Ok(assemble(Parts {
        vcpus,
        vm_fd,
        mem,
        legacy,
        virtio,
        symbols,
        stop,
        events: (events_tx, events_rx),
        machine: saved_machine(config),
        memory: MemoryOrigin::Anonymous,
        on_crash: config.on_crash,
        extensions: Default::default(),
        sched,
        rt_timer: config.rt_timer,
        pager,
        io_poll: Duration::from_micros(config.io_poll_us.into()),
    }))
}

/// What building or restoring made, for [`assemble`].
struct Parts {
    vcpus: Vec<Vcpu>,
    vm_fd: VmFd,
    mem: GuestMemoryMmap,
    legacy: LegacyDevices,
    virtio: crate::device_manager::VirtioDevices,
    symbols: KernelSymbols,
    stop: Arc<AtomicBool>,
    events: (Sender<VmEvent>, mpsc::Receiver<VmEvent>),
    machine: SavedMachine,
    memory: MemoryOrigin,
    on_crash: OnCrash,
    /// The restored state's [`VmState::extensions`].
    extensions: std::collections::BTreeMap<String, serde_json::Value>,
    /// How the host schedules the vCPU threads, admitted.
    sched: VcpuScheduler,
    /// The RT timer device's limits, when the VM has one.
    rt_timer: Option<RtTimerConfig>,
    /// The memory-compression pager, when it is on.
    pager: Option<Pager>,
    /// The most the device event loop polls the rings.
    io_poll: Duration,
}

/// The last step of building or restoring: the VM from its parts, with the
/// counters of its vCPUs and devices and what the device event loop watches.
fn assemble(p: Parts) -> Vm {
    let vcpu_metrics = (0..p.machine.vcpu_count)
        .map(|id| Arc::new(VcpuCounters::new(id)))
        .collect();
    let mut metrics = VmMetrics::new(
        p.machine.mem_size_mib << 20,
        vcpu_metrics,
        p.virtio.counters,
    );
    if let Some(pager) = &p.pager {
        metrics = metrics.with_pager(pager.counters());
    }
    let metrics = Arc::new(metrics);
    let mut subscribers = p.legacy.subscribers;
    subscribers.extend(p.virtio.subscribers);
    let sched = Arc::new(p.sched);
    let rt_timer = p.rt_timer.map(|config| {
        Arc::new(RtTimer::new(
            config,
            p.machine.vcpu_count,
            sched.clone(),
            metrics.rt().clone(),
        ))
    });
    Vm {
        vcpus: p.vcpus,
        vm_fd: p.vm_fd,
        mem: p.mem,
        pio: p.legacy.pio,
        mmio: p.virtio.mmio,
        subscribers,
        symbols: p.symbols,
        stop: p.stop,
        events_tx: p.events.0,
        events_rx: p.events.1,
        metrics,
        pause: Arc::new(PauseGate::default()),
        serial: p.legacy.serial,
        i8042: p.legacy.i8042,
        devices: p.virtio.handles,
        transports: p.virtio.transports,
        pci_functions: p.virtio.pci_functions,
        machine: p.machine,
        memory: p.memory,
        msr_guard: Default::default(),
        on_crash: p.on_crash,
        extensions: p.extensions,
        sched,
        rt_timer,
        pager: p.pager,
        io_poll: p.io_poll,
    }
}

/// What a snapshot keeps of `config` to build the machine back.
fn saved_machine(config: &VmConfig) -> SavedMachine {
    SavedMachine {
        vcpu_count: config.machine.vcpu_count,
        mem_size_mib: config.machine.mem_size_mib,
        kernel: config.boot.kernel.to_string(),
        kernel_file: match &config.boot.kernel {
            KernelImage::File(path) => Some(path.clone()),
            KernelImage::Embedded { .. } => None,
        },
        symbols: config.boot.symbols.clone(),
    }
}

fn mismatch(field: impl Into<String>, why: impl Into<String>) -> BuildError {
    BuildError::SnapshotMismatch {
        field: field.into(),
        why: why.into(),
    }
}

/// Checks what a snapshot says of the machine against itself and this host,
/// before anything is built.
fn check_machine(state: &VmState, kvm: &Kvm) -> Result<(), BuildError> {
    let m = &state.machine;
    let max = kvm.get_max_vcpus() as u32;
    if m.vcpu_count == 0 || m.vcpu_count > max {
        return Err(mismatch(
            "machine.vcpu_count",
            format!("{}: this host runs 1 to {max} vCPUs", m.vcpu_count),
        ));
    }
    if state.vcpus.len() != m.vcpu_count as usize
        || state
            .vcpus
            .iter()
            .enumerate()
            .any(|(i, v)| v.id != i as u32)
    {
        return Err(mismatch(
            "vcpus",
            format!(
                "{} states, not one per vCPU 0..{} in order",
                state.vcpus.len(),
                m.vcpu_count
            ),
        ));
    }
    let expected: Vec<MemoryRange> = layout::ram_ranges(m.mem_size_mib << 20)
        .into_iter()
        .map(|(addr, len)| MemoryRange {
            guest_address: addr.0,
            bytes: len as u64,
        })
        .collect();
    if state.memory != expected {
        return Err(mismatch(
            "memory",
            format!(
                "{:?} is not the layout of {} MiB of RAM",
                state.memory, m.mem_size_mib
            ),
        ));
    }
    Ok(())
}

/// Fails when the snapshot's guest was shown a CPU feature this host has not
/// (leaves 1 and 7): one neither this CPU reports nor KVM offers to emulate.
/// Both count: KVM's supported list leaves out bits some hosts pass through.
fn check_cpu_features(state: &VmState, kvm: &Kvm) -> Result<(), BuildError> {
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("report supported CPUID"))?;
    let regs = |e: &kvm_bindings::kvm_cpuid_entry2| [e.ebx, e.ecx, e.edx];
    let find = |entries: &[kvm_bindings::kvm_cpuid_entry2], leaf: u32| {
        entries
            .iter()
            .find(|e| e.function == leaf && e.index == 0)
            .map(regs)
            .unwrap_or_default()
    };
    for leaf in [1, 7] {
        let native = std::arch::x86_64::__cpuid_count(leaf, 0);
        let offered = find(supported.as_slice(), leaf);
        let host = [
            native.ebx | offered[0],
            native.ecx | offered[1],
            native.edx | offered[2],
        ];
        for (v, vcpu) in state.vcpus.iter().enumerate() {
            let saved = find(&vcpu.cpuid, leaf);
            for (i, reg) in ["ebx", "ecx", "edx"].iter().enumerate() {
                let missing = saved[i] & !host[i] & !runtime_bits(leaf, reg);
                if missing != 0 {
                    return Err(mismatch(
                        format!("vcpus[{v}].cpuid"),
                        format!(
                            "the guest was shown CPUID leaf {leaf} {reg} bits {missing:#x}, which this host does not have"
                        ),
                    ));
                }
            }
        }
    }
    Ok(())
}

/// CPUID bits that are not features the host has or lacks: leaf 1 EBX (APIC id
/// and counts), and the bits KVM changes as the guest runs (OSXSAVE with
/// CR4.OSXSAVE, APIC with the APIC base MSR, OSPKE with CR4.PKE).
fn runtime_bits(leaf: u32, reg: &str) -> u32 {
    match (leaf, reg) {
        (1, "ebx") => u32::MAX,
        (1, "ecx") => 1 << 27,
        (1, "edx") => 1 << 9,
        (7, "ecx") => 1 << 4,
        _ => 0,
    }
}

/// Guest RAM mapped privately from a snapshot's memory file: pages are read
/// from it as the guest touches them, and the guest's writes stay in this
/// process (the file is never written).
fn memory_from_file(ranges: &[MemoryRange], file: File) -> Result<GuestMemoryMmap, BuildError> {
    use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
    use vm_memory::mmap::MmapRegionBuilder;
    use vm_memory::{FileOffset, GuestAddress, GuestRegionMmap};
    let total: u64 = ranges.iter().map(|r| r.bytes).sum();
    let fail = |detail: String| BuildError::Memory {
        mib: total >> 20,
        detail,
    };
    let mut regions = Vec::with_capacity(ranges.len());
    let mut offset = 0u64;
    for r in ranges {
        let len = r.bytes as usize;
        let file = file.try_clone().map_err(|e| fail(e.to_string()))?;
        let region = MmapRegionBuilder::new_with_bitmap(len, AtomicBitmap::with_len(len))
            .with_file_offset(FileOffset::new(file, offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_NORESERVE | libc::MAP_PRIVATE)
            .build()
            .map_err(|e| fail(e.to_string()))?;
        let region = GuestRegionMmap::new(region, GuestAddress(r.guest_address))
            .ok_or_else(|| fail(format!("range at {:#x} overflows", r.guest_address)))?;
        regions.push(region);
        offset += r.bytes;
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| fail(e.to_string()))
}

/// What a snapshot load (or an arriving migration) changes of the saved VM:
/// the host side of its devices (Firecracker's `network_overrides` and
/// `vsock_override`), never what the guest sees of them, and whether its
/// clock skips the time it spent saved (`clock_realtime`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RestoreOptions {
    /// `(iface_id, tap)`: the interface saved with that id uses this tap.
    pub taps: Vec<(String, String)>,
    /// The vsock device's Unix socket path.
    pub vsock_uds: Option<PathBuf>,
    /// The process's MMDS store (its API's): interfaces saved as reaching
    /// MMDS reach it, with the saved configuration.
    pub mmds: Option<vigil_mmds::Mmds>,
    /// Advance kvmclock by the wall-clock time since the capture.
    pub clock_realtime: bool,
    /// Run the VM with the memory-compression pager (this process's
    /// `--memory-compression`): its memory is read in, not mapped.
    pub memory_compression: Option<MemoryCompression>,
}

impl RestoreOptions {
    /// Rewrites `state` as asked; an override that names nothing in it is
    /// refused, naming the field. The devices' restores check the new values
    /// as they check saved ones.
    pub fn apply(&self, state: &mut VmState) -> Result<(), BuildError> {
        let clock = &mut state.kvm.clock;
        if !self.clock_realtime {
            clock.flags &= !KVM_CLOCK_REALTIME;
        } else if clock.flags & KVM_CLOCK_REALTIME == 0 {
            return Err(mismatch(
                "clock_realtime",
                "the snapshot's clock was read without the host's real time (KVM before Linux 5.16, or a snapshot from before Vigil kept it)",
            ));
        }
        for (i, (id, tap)) in self.taps.iter().enumerate() {
            let mut ids = Vec::new();
            let found = state.virtio.iter_mut().find_map(|t| match &mut t.device {
                DeviceState::Net(n) => {
                    ids.push(format!("{:?}", n.iface_id.as_deref().unwrap_or("")));
                    (n.iface_id.as_deref() == Some(id.as_str())).then_some(n)
                }
                _ => None,
            });
            let Some(net) = found else {
                let has = if ids.is_empty() {
                    "it has no network interface".to_owned()
                } else {
                    format!("its interfaces: {}", ids.join(", "))
                };
                return Err(mismatch(
                    format!("network_overrides[{i}].iface_id {id:?}"),
                    format!("no interface of the snapshot has this id ({has})"),
                ));
            };
            net.tap = tap.clone();
        }
        for t in &mut state.virtio {
            if let DeviceState::Net(n) = &mut t.device {
                n.mmds_store = self.mmds.clone();
            }
        }
        if let Some(uds) = &self.vsock_uds {
            let vsock = state.virtio.iter_mut().find_map(|t| match &mut t.device {
                DeviceState::Vsock(v) => Some(v),
                _ => None,
            });
            let Some(vsock) = vsock else {
                return Err(mismatch(
                    "vsock_override",
                    "the snapshot has no vsock device",
                ));
            };
            vsock.uds = uds.clone();
        }
        Ok(())
    }
}

/// Builds back the VM a snapshot holds, from its state file and memory file,
/// ready to start where it was paused. The console and what a crash does are
/// this process's choice, not the snapshot's. Every field of the state is
/// checked (by this function and the devices' restores) before a vCPU runs.
pub fn restore(
    state_path: &Path,
    memory_path: &Path,
    overrides: &RestoreOptions,
    console: &ConsoleConfig,
    on_crash: OnCrash,
) -> Result<Vm, BuildError> {
    let (_, mut state) = snapshot_file::read_state(state_path)?;
    overrides.apply(&mut state)?;
    check_machine(&state, &Kvm::new().map_err(BuildError::Kvm)?)?;
    let (file, packed) = snapshot_file::open_memory(memory_path, &state)?;
    let Some(compression) = overrides.memory_compression else {
        let mem = memory_from_file(&state.memory, file)?;
        // Pages kept packed are holes in the mapping: written in, privately.
        snapshot_file::unpack_into(&mem, &state.memory, &packed, memory_path)?;
        tracing::info!(
            snapshot = %state_path.display(),
            memory = %memory_path.display(),
            pages_unpacked = packed.len(),
            "restoring a snapshot"
        );
        let origin = MemoryOrigin::File(memory_path.to_owned());
        return restore_with_memory(state, mem, origin, None, console, on_crash);
    };
    // With the pager, guest memory is anonymous, read from the file now: the
    // pages the saved VM's pager held go straight into this one's pool.
    let mem = memory_for(&state.memory)?;
    let mut pager = Pager::new(compression, &mem, Arc::default())?;
    let data = snapshot_file::data_ranges(&file, memory_path)?;
    let start = std::time::Instant::now();
    let loaded = pager.load(&file, &data, &state.memory_held, &packed)?;
    tracing::info!(
        snapshot = %state_path.display(),
        memory = %memory_path.display(),
        pages_in_ram = loaded.copied,
        pages_held = loaded.held,
        took = ?start.elapsed(),
        "restoring a snapshot, its memory read in with the pager"
    );
    restore_with_memory(
        state,
        mem,
        MemoryOrigin::Loaded,
        Some(pager),
        console,
        on_crash,
    )
}

/// As [`restore`], with the memory file served by the page-fault handler
/// listening at `handler` (Firecracker's `Uffd` backend): guest memory starts
/// empty, and each page is the handler's to fill when first touched.
pub fn restore_lazily(
    state_path: &Path,
    handler: &Path,
    overrides: &RestoreOptions,
    console: &ConsoleConfig,
    on_crash: OnCrash,
) -> Result<Vm, BuildError> {
    let (_, mut state) = snapshot_file::read_state(state_path)?;
    overrides.apply(&mut state)?;
    check_machine(&state, &Kvm::new().map_err(BuildError::Kvm)?)?;
    if state.memory_packed > 0 {
        return Err(mismatch(
            "mem_backend.backend_type",
            format!(
                "the memory file keeps {} pages compressed after its RAM image (the saved VM's pager held them), which a page-fault handler does not serve: load it with the File backend",
                state.memory_packed
            ),
        ));
    }
    let mem = memory_for(&state.memory)?;
    let lazy = LazyMemory::register(&mem, true)?;
    // Before anything is restored: restoring touches guest memory (KVM maps
    // the clock's page), which waits for the handler from here on.
    lazy.send_to_handler(handler)?;
    tracing::info!(
        snapshot = %state_path.display(),
        handler = %handler.display(),
        "restoring a snapshot, memory on demand"
    );
    restore_with_memory(
        state,
        mem,
        MemoryOrigin::Lazy(Arc::new(lazy)),
        None,
        console,
        on_crash,
    )
}

/// Guest RAM for a VM that arrives by migration: the ranges `state` will say,
/// zeroed, written as pages come.
pub fn memory_for(ranges: &[MemoryRange]) -> Result<GuestMemoryMmap, BuildError> {
    let total: u64 = ranges.iter().map(|r| r.bytes).sum();
    let ranges: Vec<_> = ranges
        .iter()
        .map(|r| (vm_memory::GuestAddress(r.guest_address), r.bytes as usize))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).map_err(|e| BuildError::Memory {
        mib: total >> 20,
        detail: e.to_string(),
    })
}

/// Builds back the VM `state` describes around `mem`, which holds its memory
/// or will (`origin`: a snapshot's file mapped privately or read in, pages
/// received by migration, pages filled on demand), with `pager` (already
/// answering faults on `mem`) when memory compression is on. As [`restore`]
/// otherwise.
pub fn restore_with_memory(
    state: VmState,
    mem: GuestMemoryMmap,
    origin: MemoryOrigin,
    pager: Option<Pager>,
    console: &ConsoleConfig,
    on_crash: OnCrash,
) -> Result<Vm, BuildError> {
    let kvm = Kvm::new().map_err(BuildError::Kvm)?;
    check_machine(&state, &kvm)?;
    check_cpu_features(&state, &kvm)?;
    if memory_ranges(&mem) != state.memory {
        return Err(mismatch("memory", "not the guest memory given"));
    }
    // 4 KiB pages: a file mapping has no huge pages, and received memory is
    // written page by page.
    let vm_fd = create_vm(&kvm, &mem, HugePages::None)?;
    persist::check_xsave_size(&vm_fd)?;

    let (events_tx, events_rx) = mpsc::channel();
    let stop = Arc::new(AtomicBool::new(false));
    let power = power_handler(&events_tx, &stop);
    let legacy = legacy_devices(console, &vm_fd, power, Some((&state.serial, &state.i8042)))?;
    // On PCI, every transport has its function (ECAM, BAR window and ACPI
    // tables as at boot; the tables are in guest memory).
    let mut devices = if state.pci.is_empty() {
        DeviceManager::new(&vm_fd, &mem)
    } else if state.pci.len() != state.virtio.len() {
        return Err(mismatch(
            "pci",
            format!(
                "{} PCI functions for {} virtio transports",
                state.pci.len(),
                state.virtio.len()
            ),
        ));
    } else {
        DeviceManager::with_pci(&vm_fd, &mem)?
    };
    for (i, transport) in state.virtio.iter().enumerate() {
        devices.restore(i, transport, state.pci.get(i))?;
    }
    let virtio = devices.finish()?;

    let mut vcpus = Vec::with_capacity(state.vcpus.len());
    for saved in &state.vcpus {
        let fd = vm_fd
            .create_vcpu(u64::from(saved.id))
            .map_err(kvm_err("create a vCPU"))?;
        persist::restore_vcpu(&fd, saved)?;
        vcpus.push(Vcpu { id: saved.id, fd });
    }
    persist::restore_vm(&vm_fd, &state.kvm)?;

    let m = &state.machine;
    let kernel = match &m.kernel_file {
        Some(path) => KernelImage::File(path.clone()),
        None => KernelImage::Embedded {
            name: "a kernel built into the Vigil that saved the snapshot",
            bytes: &[],
        },
    };
    let symbols = KernelSymbols::new(m.symbols.clone(), kernel);
    tracing::info!(
        saved_by = %state.vigil_version,
        vcpus = m.vcpu_count,
        memory_mib = m.mem_size_mib,
        devices = state.virtio.len(),
        "VM restored"
    );
    let vcpu_count = m.vcpu_count;
    Ok(assemble(Parts {
        vcpus,
        vm_fd,
        mem,
        legacy,
        virtio,
        symbols,
        stop,
        events: (events_tx, events_rx),
        machine: state.machine,
        memory: origin,
        on_crash,
        extensions: state.extensions,
        // What a snapshot keeps of the machine has no scheduling: a restored VM's
        // vCPUs are time-shared, without the RT timer.
        sched: VcpuScheduler::new(vec![VcpuSched::default(); vcpu_count as usize])?,
        rt_timer: None,
        pager,
        io_poll: Duration::from_micros(DEFAULT_IO_POLL_US.into()),
    }))
}

/// Where devices send power events. A power event ends the VM at once: the vCPU
/// that raised it must not go back into the guest (which would run past its own
/// power-off), so `stop` is set here, before the waiting thread even hears of it.
fn power_handler(events_tx: &Sender<VmEvent>, stop: &Arc<AtomicBool>) -> PowerHandler {
    let (events_tx, stop) = (events_tx.clone(), stop.clone());
    Arc::new(move |e| {
        stop.store(true, Ordering::Release);
        let _ = events_tx.send(VmEvent::Power(e));
    })
}

/// The legacy devices on the port bus, and what the device event loop watches
/// for them.
struct LegacyDevices {
    pio: Bus,
    /// The console, to save its state.
    serial: Arc<Mutex<Serial>>,
    /// The keyboard controller, to type Ctrl-Alt-Del.
    i8042: Arc<Mutex<I8042>>,
    /// Console input, when the console is the terminal.
    subscribers: Vec<Box<dyn MutEventSubscriber + Send>>,
}

/// The 8250 console on COM1, the i8042, the ACPI power port and the debug-exit
/// port, their interrupts on the in-kernel irqchip; the first two from `saved`
/// states when given.
fn legacy_devices(
    console: &ConsoleConfig,
    vm_fd: &VmFd,
    power: PowerHandler,
    saved: Option<(&SerialState, &I8042State)>,
) -> Result<LegacyDevices, BuildError> {
    let console_out = match console {
        ConsoleConfig::Stdio => ConsoleOutput::Stdout,
        ConsoleConfig::File(path) => {
            ConsoleOutput::File(
                File::create(path).map_err(|source| BuildError::ConsoleFile {
                    path: path.display().to_string(),
                    source,
                })?,
            )
        }
        ConsoleConfig::None => ConsoleOutput::Sink,
    };
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::EventFd)?;
    vm_fd
        .register_irqfd(&serial_irq, COM1_IRQ)
        .map_err(kvm_err("connect the serial port's interrupt"))?;
    let serial = match saved {
        None => Serial::new(serial_irq, console_out),
        Some((state, _)) => Serial::restore((serial_irq, console_out), state)
            .map_err(|e| BuildError::Restore(e.within("serial")))?,
    };
    let serial = Arc::new(Mutex::new(serial));
    let mut pio = Bus::new();
    pio.insert(serial.clone(), u64::from(COM1_PORT), 8)?;
    let i8042_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::EventFd)?;
    vm_fd
        .register_irqfd(&i8042_irq, I8042_IRQ)
        .map_err(kvm_err("connect the i8042's interrupt"))?;
    let i8042 = match saved {
        None => I8042::with_irq(power.clone(), i8042_irq),
        Some((_, state)) => I8042::restore((power.clone(), i8042_irq), state)
            .map_err(|e| BuildError::Restore(e.within("i8042")))?,
    };
    let i8042 = Arc::new(Mutex::new(i8042));
    pio.insert(i8042.clone(), u64::from(I8042_PORT), 5)?;
    pio.insert(
        Arc::new(Mutex::new(AcpiPowerPort::new(power.clone()))),
        u64::from(ACPI_POWER_PORT),
        1,
    )?;
    pio.insert(
        Arc::new(Mutex::new(DebugExitPort::new(power))),
        u64::from(DEBUG_EXIT_PORT),
        4,
    )?;
    let mut subscribers: Vec<Box<dyn MutEventSubscriber + Send>> = Vec::new();
    if *console == ConsoleConfig::Stdio {
        subscribers.push(Box::new(SerialInput::new(serial.clone(), std::io::stdin())));
    }
    Ok(LegacyDevices {
        pio,
        serial,
        i8042,
        subscribers,
    })
}

/// virtio-blk: one device per `--disk`, in order.
fn attach_disks(config: &VmConfig, devices: &mut DeviceManager) -> Result<(), BuildError> {
    for (i, disk) in config.drives.iter().enumerate() {
        let counters = devices.counters(DeviceKind::Block, format!("blk{i}"));
        devices.add_drive(&disk.id, Block::new(disk)?.with_counters(counters))?;
    }
    Ok(())
}

/// virtio-rng, with `--rng`.
fn attach_rng(config: &VmConfig, devices: &mut DeviceManager) -> Result<(), BuildError> {
    if let Some(limit) = config.rng {
        let counters = devices.counters(DeviceKind::Entropy, "rng0".into());
        devices.add(Box::new(Rng::new(limit).with_counters(counters)))?;
    }
    Ok(())
}

/// virtio-balloon, with `--balloon`.
fn attach_balloon(config: &VmConfig, devices: &mut DeviceManager) -> Result<(), BuildError> {
    if let Some(balloon) = config.balloon {
        let counters = devices.counters(DeviceKind::Balloon, "balloon0".into());
        devices.add_balloon(Balloon::new(balloon).with_counters(counters), balloon)?;
    }
    Ok(())
}

/// virtio-net: one device per `--net`, in order.
fn attach_nets(config: &VmConfig, devices: &mut DeviceManager) -> Result<(), BuildError> {
    for (i, net) in config.nets.iter().enumerate() {
        let counters = devices.counters(DeviceKind::Net, format!("net{i}"));
        devices.add_net(Net::new(net)?.with_counters(counters))?;
    }
    Ok(())
}

/// virtio-vsock, with `--vsock`.
fn attach_vsock(config: &VmConfig, devices: &mut DeviceManager) -> Result<(), BuildError> {
    if let Some(vsock) = &config.vsock {
        let counters = devices.counters(DeviceKind::Vsock, "vsock0".into());
        devices.add(Box::new(Vsock::new(vsock)?.with_counters(counters)))?;
    }
    Ok(())
}

/// Loads the kernel and initrd and writes what the guest boots with: the command
/// line, the ACPI tables (with `virtio` in the DSDT) and the boot information of
/// the kernel's entry protocol. Returns the kernel's entry point.
fn load_boot(
    config: &VmConfig,
    mem: &GuestMemoryMmap,
    cmdline: &str,
    apic_ids: &[u8],
    virtio: &[MmioDevice],
    pci: Option<&[PciIntx]>,
) -> Result<EntryPoint, BuildError> {
    if cmdline.len() >= layout::CMDLINE_MAX_SIZE {
        return Err(BuildError::CmdlineTooLong {
            len: cmdline.len(),
            max: layout::CMDLINE_MAX_SIZE - 1,
        });
    }
    let memory_bytes = config.machine.memory_bytes();
    let kernel = boot::load_kernel(mem, &config.boot.kernel, config.boot.protocol, memory_bytes)?;
    let initrd = config
        .boot
        .initrd
        .as_deref()
        .map(|p| boot::load_initrd(mem, p, &kernel, memory_bytes))
        .transpose()?;
    let e820 = layout::e820_map(memory_bytes);
    let rt_timer = acpi::IoDevice {
        name: "VRTT",
        hid: "VGL0001",
        port: RT_TIMER_PORT,
        ports: RT_TIMER_PORTS as u8,
    };
    let io: &[acpi::IoDevice] = if config.rt_timer.is_some() {
        &[rt_timer]
    } else {
        &[]
    };
    let acpi = acpi::write_tables(mem, apic_ids, virtio, io, pci)?;
    boot::write_cmdline(mem, cmdline)?;
    match kernel.entry {
        EntryPoint::Pvh(_) => boot::write_pvh_info(mem, &e820, initrd, acpi.rsdp)?,
        EntryPoint::Linux64(_) => {
            let params = boot::zero_page(&kernel, cmdline.len(), &e820, initrd, acpi.rsdp);
            boot::write_zero_page(mem, &params)?;
        }
    }
    Ok(kernel.entry)
}

/// The vCPUs, each with its CPUID (its APIC id, `hide` hidden) and registers;
/// the first one starts at `entry`.
fn create_vcpus(
    config: &VmConfig,
    kvm: &Kvm,
    vm_fd: &VmFd,
    mem: &GuestMemoryMmap,
    apic_ids: &[u8],
    hide: &[CpuFeature],
    entry: EntryPoint,
) -> Result<Vec<Vcpu>, BuildError> {
    let base_cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("report supported CPUID"))?;
    let mut vcpus = Vec::with_capacity(config.machine.vcpu_count as usize);
    for id in 0..config.machine.vcpu_count {
        let fd = vm_fd
            .create_vcpu(u64::from(id))
            .map_err(kvm_err("create a vCPU"))?;
        let topo = Topology {
            apic_id: apic_ids[id as usize],
            vcpus: config.machine.vcpu_count,
        };
        let modifiers = &config.machine.cpu_modifiers;
        let mut vcpu_cpuid = cpuid::build(
            &base_cpuid,
            topo,
            fd.get_tsc_khz().ok(),
            hide,
            &modifiers.cpuid,
        )?;
        if let Some(rt) = &config.rt_timer {
            vcpu_cpuid = cpuid::add_hypervisor_leaf(&vcpu_cpuid, RT_TIMER_LEAF, RtTimer::cpuid(rt));
        }
        let vcpu_err = |source| BuildError::Vcpu { vcpu: id, source };
        fd.set_cpuid2(&vcpu_cpuid).map_err(|source| {
            vcpu_err(RegsError::Kvm {
                what: "set cpuid",
                source,
            })
        })?;
        regs::setup_common(&fd).map_err(vcpu_err)?;
        regs::modify_msrs(&fd, &modifiers.msrs)?;
        if id == 0 {
            regs::setup_boot_vcpu(&fd, mem, entry).map_err(vcpu_err)?;
        }
        vcpus.push(Vcpu { id, fd });
    }
    Ok(vcpus)
}
