//! Turns a validated [`VmConfig`] into a [`Vm`] ready to start: guest memory, the
//! KVM VM, devices on their buses, the kernel and boot information, and vCPUs.

use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};

use event_manager::MutEventSubscriber;
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
use vigil_devices::bus::{Bus, BusError};
use vigil_devices::legacy::{
    AcpiPowerPort, ConsoleOutput, DebugExitPort, Serial, SerialInput, I8042,
};
use vigil_devices::virtio::balloon::Balloon;
use vigil_devices::virtio::block::{Block, BlockError};
use vigil_devices::virtio::mmio::{MmioTransport, QueueEvents, MMIO_WINDOW, QUEUE_NOTIFY};
use vigil_devices::virtio::net::{Net, NetError};
use vigil_devices::virtio::rng::Rng;
use vigil_devices::virtio::vsock::{Vsock, VsockError};
use vigil_devices::virtio::Interrupt as VirtioInterrupt;
use vigil_devices::virtio::VirtioDevice;
use vigil_devices::PowerHandler;
use vigil_metrics::{DeviceCounters, DeviceKind, VcpuCounters, VmMetrics};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::acpi::{
    self, AcpiError, MmioDevice, ACPI_POWER_PORT, COM1_IRQ, COM1_PORT,
};
use crate::arch::x86_64::boot::{self, BootError, EntryPoint};
use crate::arch::x86_64::cpuid::{self, CpuFeature, Topology};
use crate::arch::x86_64::layout;
use crate::arch::x86_64::regs::{self, RegsError};
use crate::config::{ConfigError, ConsoleConfig, CpuTemplate, HostLimits, VmConfig};
use crate::symbols::KernelSymbols;
use crate::vm::{BalloonHandle, DriveHandle, NetHandle, QueueWaker, Vm};
use crate::vstate::pause::PauseGate;
use crate::vstate::vcpu::Vcpu;
use crate::vstate::vm::{create_vm, VmError};
use crate::VmEvent;

/// QEMU's `isa-debug-exit` port, as test guests expect it.
pub const DEBUG_EXIT_PORT: u16 = 0xf4;
/// First virtio-mmio register window; each device takes the next 4 KiB.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Interrupt of the first virtio device; each device takes the next line.
pub const VIRTIO_FIRST_GSI: u32 = 5;
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
    #[error("cannot allocate {mib} MiB of guest memory: {detail}")]
    Memory { mib: u64, detail: String },
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("--console file:{path}: cannot create it: {source}")]
    ConsoleFile {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot set up devices: {0}")]
    Devices(String),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Acpi(#[from] AcpiError),
    #[error("vCPU {vcpu}: {source}")]
    Vcpu { vcpu: u32, source: RegsError },
    #[error(transparent)]
    Disk(#[from] BlockError),
    #[error(transparent)]
    Net(#[from] NetError),
    #[error(transparent)]
    Vsock(#[from] VsockError),
    #[error("--cmdline: {len} bytes once the virtio devices are declared on it, more than the {max} a kernel accepts")]
    CmdlineTooLong { len: usize, max: usize },
}

impl From<BusError> for BuildError {
    fn from(e: BusError) -> Self {
        BuildError::Devices(e.to_string())
    }
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> BuildError {
    move |source| BuildError::Vm(VmError::Kvm { what, source })
}

/// The features hidden from the guest: the template's plus the user's.
fn hidden_features(config: &VmConfig) -> Vec<CpuFeature> {
    let mut hide = config.cpuid_hide.clone();
    if config.cpu_template == CpuTemplate::Auto && cpuid::host_emulates_cpl0() {
        hide.extend(
            cpuid::EMULATED_CPL0_HIDDEN
                .iter()
                .filter_map(|n| CpuFeature::by_name(n)),
        );
    }
    hide
}

/// Builds the VM described by `config`.
pub fn build(config: &VmConfig) -> Result<Vm, BuildError> {
    let kvm_sys = Kvm::new().map_err(BuildError::Kvm)?;
    config.validate(&HostLimits::probe(&kvm_sys))?;
    // Read when a crash report or introspection needs them, not at boot.
    let symbols = KernelSymbols::new(config.symbols.clone(), config.kernel.clone());

    let memory_bytes = config.memory_bytes();
    let mem = GuestMemoryMmap::from_ranges(&layout::ram_ranges(memory_bytes)).map_err(|e| {
        BuildError::Memory {
            mib: config.memory_mib,
            detail: e.to_string(),
        }
    })?;
    let vm_fd = create_vm(&kvm_sys, &mem, config.huge_pages)?;

    let (events_tx, events_rx) = mpsc::channel();
    // A power event ends the VM at once: the vCPU that raised it must not go back
    // into the guest (which would run past its own power-off), so the stop flag is
    // set here, before the waiting thread even hears of it.
    let stop = Arc::new(AtomicBool::new(false));
    let (power_tx, power_stop) = (events_tx.clone(), stop.clone());
    let power: PowerHandler = Arc::new(move |e| {
        power_stop.store(true, Ordering::Release);
        let _ = power_tx.send(VmEvent::Power(e));
    });

    let console_out = match &config.console {
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
    let serial_irq =
        EventFd::new(libc::EFD_NONBLOCK).map_err(|e| BuildError::Devices(e.to_string()))?;
    vm_fd
        .register_irqfd(&serial_irq, COM1_IRQ)
        .map_err(kvm_err("connect the serial port's interrupt"))?;
    let serial = Arc::new(Mutex::new(Serial::new(serial_irq, console_out)));
    let mut pio = Bus::new();
    pio.insert(serial.clone(), u64::from(COM1_PORT), 8)?;
    let i8042_irq =
        EventFd::new(libc::EFD_NONBLOCK).map_err(|e| BuildError::Devices(e.to_string()))?;
    vm_fd
        .register_irqfd(&i8042_irq, I8042_IRQ)
        .map_err(kvm_err("connect the i8042's interrupt"))?;
    let i8042 = Arc::new(Mutex::new(I8042::with_irq(power.clone(), i8042_irq)));
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
    if config.console == ConsoleConfig::Stdio {
        subscribers.push(Box::new(SerialInput::new(serial.clone(), std::io::stdin())));
    }
    let mut devices: Vec<Box<dyn VirtioDevice>> = Vec::new();
    let mut device_metrics = Vec::new();
    let mut counters = |kind: DeviceKind, name: String| {
        let c = Arc::new(DeviceCounters::new(kind, name));
        device_metrics.push(c.clone());
        c
    };
    // Rate-limit controls by device index, with what the handle needs.
    let mut drive_limits = Vec::new();
    let mut net_limits = Vec::new();
    for (i, disk) in config.disks.iter().enumerate() {
        let c = counters(DeviceKind::Block, format!("blk{i}"));
        let mut block = Block::new(disk)?.with_counters(c);
        drive_limits.push((devices.len(), disk.id.clone(), block.rate_limit_control()));
        devices.push(Box::new(block));
    }
    if let Some(limit) = config.rng {
        let c = counters(DeviceKind::Entropy, "rng0".into());
        devices.push(Box::new(Rng::new(limit).with_counters(c)));
    }
    let mut balloon_slot = None;
    if let Some(balloon) = config.balloon {
        let c = counters(DeviceKind::Balloon, "balloon0".into());
        let device = Balloon::new(balloon).with_counters(c);
        balloon_slot = Some((devices.len(), device.control(), balloon));
        devices.push(Box::new(device));
    }
    for (i, net) in config.nets.iter().enumerate() {
        let c = counters(DeviceKind::Net, format!("net{i}"));
        let mut net = Net::new(net)?.with_counters(c);
        net_limits.push((devices.len(), net.rate_limit_controls()));
        devices.push(Box::new(net));
    }
    if let Some(vsock) = &config.vsock {
        let c = counters(DeviceKind::Vsock, "vsock0".into());
        devices.push(Box::new(Vsock::new(vsock)?.with_counters(c)));
    }
    let mut mmio = Bus::new();
    let mut cmdline = config.cmdline.clone();
    let mut virtio_acpi = Vec::new();
    let mut balloon = None;
    let mut drives = Vec::new();
    let mut nets = Vec::new();
    for (i, device) in devices.into_iter().enumerate() {
        let slot = MmioDevice {
            base: VIRTIO_MMIO_BASE + i as u64 * MMIO_WINDOW,
            len: MMIO_WINDOW,
            gsi: VIRTIO_FIRST_GSI + i as u32,
        };
        let (subscriber, interrupt, queue_evts) =
            attach_virtio(&vm_fd, &mem, &mut mmio, device, slot)?;
        subscribers.push(subscriber);
        let waker = || QueueWaker::new(queue_evts);
        if let Some((_, id, control)) = drive_limits.iter().find(|(n, ..)| *n == i) {
            drives.push(DriveHandle::new(id.clone(), control.clone(), waker()));
        } else if let Some((_, controls)) = net_limits.iter().find(|(n, _)| *n == i) {
            nets.push(NetHandle::new(controls.clone(), waker()));
        }
        if let Some((_, control, config)) = balloon_slot.as_ref().filter(|(n, ..)| *n == i) {
            balloon = Some(BalloonHandle::new(control.clone(), interrupt, *config));
        }
        // Kernels with VIRTIO_MMIO_CMDLINE_DEVICES find devices here; the others
        // through the DSDT.
        cmdline.push_str(&format!(
            " virtio_mmio.device=4K@{:#x}:{}",
            slot.base, slot.gsi
        ));
        virtio_acpi.push(slot);
    }
    let cmdline = cmdline.trim_start().to_string();
    if cmdline.len() >= layout::CMDLINE_MAX_SIZE {
        return Err(BuildError::CmdlineTooLong {
            len: cmdline.len(),
            max: layout::CMDLINE_MAX_SIZE - 1,
        });
    }

    let kernel = boot::load_kernel(&mem, &config.kernel, config.boot_protocol, memory_bytes)?;
    let initrd = config
        .initrd
        .as_deref()
        .map(|p| boot::load_initrd(&mem, p, &kernel, memory_bytes))
        .transpose()?;
    let e820 = layout::e820_map(memory_bytes);
    let apic_ids: Vec<u8> = (0..config.vcpus).map(|i| i as u8).collect();
    let acpi = acpi::write_tables(&mem, &apic_ids, &virtio_acpi)?;
    boot::write_cmdline(&mem, &cmdline)?;
    match kernel.entry {
        EntryPoint::Pvh(_) => boot::write_pvh_info(&mem, &e820, initrd, acpi.rsdp)?,
        EntryPoint::Linux64(_) => {
            let params = boot::zero_page(&kernel, cmdline.len(), &e820, initrd, acpi.rsdp);
            boot::write_zero_page(&mem, &params)?;
        }
    }

    let base_cpuid = kvm_sys
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("report supported CPUID"))?;
    let hide = hidden_features(config);
    let mut vcpus = Vec::with_capacity(config.vcpus as usize);
    for id in 0..config.vcpus {
        let fd = vm_fd
            .create_vcpu(u64::from(id))
            .map_err(kvm_err("create a vCPU"))?;
        let topo = Topology {
            apic_id: apic_ids[id as usize],
            vcpus: config.vcpus,
        };
        let vcpu_cpuid = cpuid::build(&base_cpuid, topo, fd.get_tsc_khz().ok(), &hide);
        let vcpu_err = |source| BuildError::Vcpu { vcpu: id, source };
        fd.set_cpuid2(&vcpu_cpuid).map_err(|source| {
            vcpu_err(RegsError::Kvm {
                what: "set cpuid",
                source,
            })
        })?;
        regs::setup_common(&fd).map_err(vcpu_err)?;
        if id == 0 {
            regs::setup_boot_vcpu(&fd, &mem, kernel.entry).map_err(vcpu_err)?;
        }
        vcpus.push(Vcpu { id, fd });
    }
    tracing::info!(
        kernel = %config.kernel,
        entry = ?kernel.entry,
        vcpus = config.vcpus,
        memory_mib = config.memory_mib,
        hidden_cpuid = ?hide.iter().map(|f| f.name).collect::<Vec<_>>(),
        "VM built"
    );

    let vcpu_metrics = (0..config.vcpus)
        .map(|id| Arc::new(VcpuCounters::new(id)))
        .collect();
    let metrics = Arc::new(VmMetrics::new(memory_bytes, vcpu_metrics, device_metrics));

    Ok(Vm {
        vcpus,
        vm_fd,
        mem,
        pio,
        mmio,
        subscribers,
        symbols,
        stop,
        events_tx,
        events_rx,
        metrics,
        pause: Arc::new(PauseGate::default()),
        i8042,
        balloon,
        drives,
        nets,
        msr_guard: Default::default(),
        on_crash: config.on_crash,
    })
}

/// Puts `device` behind a virtio-mmio window at `slot`: its interrupt on an irqfd,
/// one ioeventfd per queue on the notify register, the registers on the MMIO bus.
/// Returns the event-loop subscriber that processes its queues, the interrupt, and
/// clones of the queue eventfds (to wake the queues from another thread).
#[allow(clippy::type_complexity)]
fn attach_virtio(
    vm_fd: &VmFd,
    mem: &GuestMemoryMmap,
    mmio: &mut Bus,
    device: Box<dyn VirtioDevice>,
    slot: MmioDevice,
) -> Result<
    (
        Box<dyn MutEventSubscriber + Send>,
        Arc<VirtioInterrupt>,
        Vec<EventFd>,
    ),
    BuildError,
> {
    let dev_err =
        |e: std::io::Error| BuildError::Devices(format!("virtio device at {:#x}: {e}", slot.base));
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(dev_err)?;
    vm_fd
        .register_irqfd(&irq, slot.gsi)
        .map_err(kvm_err("connect a virtio interrupt"))?;
    let mut queue_evts = Vec::new();
    for queue in 0..device.queue_max_sizes().len() as u32 {
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(dev_err)?;
        vm_fd
            .register_ioevent(&evt, &IoEventAddress::Mmio(slot.base + QUEUE_NOTIFY), queue)
            .map_err(kvm_err("watch a virtio queue notification"))?;
        queue_evts.push(evt);
    }
    let clone_evts = || {
        queue_evts
            .iter()
            .map(EventFd::try_clone)
            .collect::<Result<Vec<_>, _>>()
            .map_err(dev_err)
    };
    let transport_evts = clone_evts()?;
    let waker_evts = clone_evts()?;
    let interrupt = Arc::new(VirtioInterrupt::new(irq));
    let transport = MmioTransport::new(device, mem.clone(), interrupt.clone(), transport_evts)
        .map_err(BuildError::Devices)?;
    let transport = Arc::new(Mutex::new(transport));
    mmio.insert(transport.clone(), slot.base, slot.len)?;
    let subscriber = Box::new(QueueEvents::new(transport, queue_evts).map_err(dev_err)?);
    Ok((subscriber, interrupt, waker_evts))
}
