//! Where the virtio devices sit: each device attached takes the next virtio-mmio
//! window and the next interrupt line (GSI), in the order the builder attaches
//! them; the manager wires it to KVM (irqfd, one ioeventfd per queue), puts its
//! transport on the MMIO bus and its queues on the device event loop, and keeps
//! what the rest of the VM needs of it: the kernel command-line and DSDT entries
//! that declare it, its metrics counters, and the host's handle on it.
//!
//! With PCI (`--enable-pci`) a device instead takes the next slot of PCI bus 0,
//! its BAR the next [`BAR_SIZE`] of the PCI window, and one MSI-X vector (an
//! irqfd on its own GSI from 24 on) for its configuration and each queue, and
//! INTA on the I/O APIC line a virtio-mmio device would have taken; the
//! ECAM and BAR windows go on the MMIO bus, and nothing is declared on the
//! command line (the guest enumerates the bus, found through the MCFG).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::GuestMemoryMmap;
use event_manager::MutEventSubscriber;
use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_READONLY};
use kvm_ioctls::{IoEventAddress, VmFd};
use vigil_devices::bus::Bus;
use vigil_devices::pci::{BarWindow, EcamWindow, PciBus, ECAM_BUS_SIZE};
use vigil_devices::persist::{Persist, RestoreError};
use vigil_devices::virtio::balloon::Balloon;
use vigil_devices::virtio::block::Block;
use vigil_devices::virtio::mmio::{
    MmioBusDevice, MmioTransport, MmioTransportState, QueueEvents, RegisterPage, MMIO_WINDOW,
    QUEUE_NOTIFY,
};
use vigil_devices::virtio::net::Net;
use vigil_devices::virtio::pci::{Msix, VirtioPci, VirtioPciState, BAR_SIZE};
use vigil_devices::virtio::persist::DeviceState;
use vigil_devices::virtio::rng::Rng;
use vigil_devices::virtio::vsock::Vsock;
use vigil_devices::virtio::{Interrupt, VirtioDevice};
use vigil_metrics::{DeviceCounters, DeviceKind};
use vigil_model::config::BalloonConfig;
use vm_memory::GuestMemoryBackend;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::acpi::{MmioDevice, PciIntx};
use crate::arch::x86_64::layout::{PCI_ECAM_START, PCI_MMIO_SIZE, PCI_MMIO_START};
use crate::builder::{kvm_err, BuildError};
use crate::control::{BalloonHandle, DriveHandle, NetHandle, QueueWaker};
use crate::pci::{KvmPci, IOAPIC_PINS};

/// First virtio-mmio register window; each device takes the next 4 KiB.
const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Interrupt of the first virtio device; each device takes the next line.
const VIRTIO_FIRST_GSI: u32 = 5;

/// The host's handles on the devices it can change while the VM runs, by what
/// users name them by.
#[derive(Default)]
pub(crate) struct DeviceHandles {
    /// By drive id (`DriveConfig::id`, unique once the config is validated).
    pub(crate) drives: HashMap<String, DriveHandle>,
    /// By place in `VmConfig::nets`.
    pub(crate) nets: Vec<NetHandle>,
    pub(crate) balloon: Option<BalloonHandle>,
}

/// What the builder takes back from the device manager.
pub(crate) struct VirtioDevices {
    /// The transports' register windows.
    pub(crate) mmio: Bus,
    /// One per device: its queues, timer and host fds on the device event loop.
    pub(crate) subscribers: Vec<Box<dyn MutEventSubscriber + Send>>,
    /// Every device's counters, in attach order.
    pub(crate) counters: Vec<Arc<DeviceCounters>>,
    pub(crate) handles: DeviceHandles,
    /// The transports in attach order, to save their state.
    pub(crate) transports: Vec<Arc<Mutex<MmioTransport>>>,
    /// With PCI, the virtio-pci functions in attach order, to save their state.
    pub(crate) pci_functions: Vec<Arc<Mutex<VirtioPci>>>,
}

/// The PCI bus being filled.
struct Pci {
    bus: PciBus,
    /// Each device's slot and the I/O APIC line of its INTA, for the DSDT's `_PRT`.
    intx: Vec<PciIntx>,
    vm: Arc<KvmPci>,
    /// The GSI the next MSI-X vector takes.
    next_gsi: u32,
}

/// What a snapshot saved of a device's transport, and of its PCI function
/// when the devices are on PCI.
#[derive(Clone, Copy)]
struct Saved<'s> {
    transport: &'s MmioTransportState,
    pci: Option<&'s VirtioPciState>,
}

/// A device just attached: its interrupt, and a waker of its queues.
struct Attached {
    interrupt: Arc<Interrupt>,
    waker: QueueWaker,
}

/// Places virtio devices, one after the other, on a VM.
pub(crate) struct DeviceManager<'a> {
    vm_fd: &'a VmFd,
    mem: &'a GuestMemoryMmap,
    slots: Vec<MmioDevice>,
    pci: Option<Pci>,
    devices: VirtioDevices,
}

impl<'a> DeviceManager<'a> {
    /// Devices on virtio-mmio.
    pub(crate) fn new(vm_fd: &'a VmFd, mem: &'a GuestMemoryMmap) -> Self {
        Self {
            vm_fd,
            mem,
            slots: Vec::new(),
            pci: None,
            devices: VirtioDevices {
                mmio: Bus::new(),
                subscribers: Vec::new(),
                counters: Vec::new(),
                handles: DeviceHandles::default(),
                transports: Vec::new(),
                pci_functions: Vec::new(),
            },
        }
    }

    /// Devices on PCI bus 0.
    pub(crate) fn with_pci(vm_fd: &'a VmFd, mem: &'a GuestMemoryMmap) -> Result<Self, BuildError> {
        let vm = KvmPci::new(vm_fd)
            .map_err(|e| BuildError::Pci(format!("cannot duplicate the VM fd: {e}")))?;
        let mut manager = Self::new(vm_fd, mem);
        manager.pci = Some(Pci {
            bus: PciBus::new(),
            intx: Vec::new(),
            vm: Arc::new(vm),
            next_gsi: IOAPIC_PINS,
        });
        Ok(manager)
    }

    /// Counters for a device about to be attached, reported with the VM's metrics.
    pub(crate) fn counters(&mut self, kind: DeviceKind, name: String) -> Arc<DeviceCounters> {
        let counters = Arc::new(DeviceCounters::new(kind, name));
        self.devices.counters.push(counters.clone());
        counters
    }

    /// Attaches a drive; its handle is found by `id`.
    pub(crate) fn add_drive(&mut self, id: &str, block: Block) -> Result<(), BuildError> {
        self.attach_drive(id, block, None)
    }

    fn attach_drive(
        &mut self,
        id: &str,
        mut block: Block,
        saved: Option<Saved<'_>>,
    ) -> Result<(), BuildError> {
        let limit = block.rate_limit_control();
        let attached = self.attach(Box::new(block), saved)?;
        let handle = DriveHandle::new(id.to_owned(), limit, attached.waker);
        self.devices.handles.drives.insert(id.to_owned(), handle);
        Ok(())
    }

    /// Attaches a network interface; its handle is the next net index.
    pub(crate) fn add_net(&mut self, net: Net) -> Result<(), BuildError> {
        self.attach_net(net, None)
    }

    fn attach_net(&mut self, mut net: Net, saved: Option<Saved<'_>>) -> Result<(), BuildError> {
        let limits = net.rate_limit_controls();
        let attached = self.attach(Box::new(net), saved)?;
        let handle = NetHandle::new(limits, attached.waker);
        self.devices.handles.nets.push(handle);
        Ok(())
    }

    /// Attaches the balloon, built from `config`.
    pub(crate) fn add_balloon(
        &mut self,
        balloon: Balloon,
        config: BalloonConfig,
    ) -> Result<(), BuildError> {
        self.attach_balloon(balloon, config, None)
    }

    fn attach_balloon(
        &mut self,
        balloon: Balloon,
        config: BalloonConfig,
        saved: Option<Saved<'_>>,
    ) -> Result<(), BuildError> {
        let control = balloon.control();
        let attached = self.attach(Box::new(balloon), saved)?;
        control.set_config_interrupt(attached.interrupt.clone());
        let handle = BalloonHandle::new(control, attached.interrupt, config);
        self.devices.handles.balloon = Some(handle);
        Ok(())
    }

    /// Attaches a device the host holds no handle on.
    pub(crate) fn add(&mut self, device: Box<dyn VirtioDevice>) -> Result<(), BuildError> {
        self.attach(device, None).map(drop)
    }

    /// Attaches the device of a saved transport behind the next window, with
    /// the transport's registers and queues as saved: a snapshot's devices, in
    /// their saved order, land where the guest had them. `index` places errors
    /// (`virtio[2].device.block.path`).
    pub(crate) fn restore(
        &mut self,
        index: usize,
        saved: &MmioTransportState,
        pci: Option<&VirtioPciState>,
    ) -> Result<(), BuildError> {
        if pci.is_some() != self.pci.is_some() {
            return Err(BuildError::SnapshotMismatch {
                field: format!("pci[{index}]"),
                why: "every virtio transport has its PCI function, or none has".into(),
            });
        }
        let saved = Saved {
            transport: saved,
            pci,
        };
        let placed = |e: RestoreError| BuildError::Restore(e.within(&format!("virtio[{index}]")));
        let in_device = |e: RestoreError| placed(e.within("device"));
        saved.transport.check_registers_only().map_err(placed)?;
        let n = |kind| {
            self.devices
                .counters
                .iter()
                .filter(|c| c.kind() == kind)
                .count()
        };
        match &saved.transport.device {
            DeviceState::Block(s) => {
                let name = format!("blk{}", n(DeviceKind::Block));
                let block = Block::restore((), s).map_err(|e| in_device(e.within("block")))?;
                let counters = self.counters(DeviceKind::Block, name);
                self.attach_drive(&s.id, block.with_counters(counters), Some(saved))
            }
            DeviceState::Net(s) => {
                let name = format!("net{}", n(DeviceKind::Net));
                let net = Net::restore((), s).map_err(|e| in_device(e.within("net")))?;
                let counters = self.counters(DeviceKind::Net, name);
                self.attach_net(net.with_counters(counters), Some(saved))
            }
            DeviceState::Balloon(s) => {
                let balloon =
                    Balloon::restore((), s).map_err(|e| in_device(e.within("balloon")))?;
                let config = balloon.config();
                let counters = self.counters(DeviceKind::Balloon, "balloon0".into());
                self.attach_balloon(balloon.with_counters(counters), config, Some(saved))
            }
            DeviceState::Rng(s) => {
                let rng = Rng::restore((), s).map_err(|e| in_device(e.within("rng")))?;
                let counters = self.counters(DeviceKind::Entropy, "rng0".into());
                self.attach(Box::new(rng.with_counters(counters)), Some(saved))
                    .map(drop)
            }
            DeviceState::Vsock(s) => {
                let vsock = Vsock::restore((), s).map_err(|e| in_device(e.within("vsock")))?;
                let counters = self.counters(DeviceKind::Vsock, "vsock0".into());
                self.attach(Box::new(vsock.with_counters(counters)), Some(saved))
                    .map(drop)
            }
        }
    }

    /// The `virtio_mmio.device=` entries that declare every device to kernels
    /// with `VIRTIO_MMIO_CMDLINE_DEVICES`, each with a space before it.
    pub(crate) fn cmdline_entries(&self) -> String {
        self.slots
            .iter()
            .map(|slot| format!(" virtio_mmio.device=4K@{:#x}:{}", slot.base, slot.gsi))
            .collect()
    }

    /// With PCI, each device's slot and INTA line (the DSDT's `_PRT`).
    pub(crate) fn pci_interrupts(&self) -> Option<&[PciIntx]> {
        self.pci.as_ref().map(|p| p.intx.as_slice())
    }

    /// The devices as the DSDT declares them (`LNRO0005`), for the other kernels.
    pub(crate) fn acpi_devices(&self) -> &[MmioDevice] {
        &self.slots
    }

    /// The devices, with the PCI windows on the MMIO bus when they are on PCI.
    pub(crate) fn finish(mut self) -> Result<VirtioDevices, BuildError> {
        if let Some(pci) = self.pci.take() {
            let bus = Arc::new(pci.bus);
            self.devices.mmio.insert(
                Arc::new(Mutex::new(EcamWindow(bus.clone()))),
                PCI_ECAM_START,
                ECAM_BUS_SIZE,
            )?;
            self.devices.mmio.insert(
                Arc::new(Mutex::new(BarWindow {
                    bus,
                    base: PCI_MMIO_START,
                })),
                PCI_MMIO_START,
                PCI_MMIO_SIZE,
            )?;
        }
        Ok(self.devices)
    }

    /// Puts `device` behind the next virtio-mmio window: its interrupt on an irqfd
    /// at the next GSI, one ioeventfd per queue on the notify register, the
    /// registers on the MMIO bus, its queues on the device event loop. With
    /// `saved`, the transport takes the saved registers and queues.
    fn attach(
        &mut self,
        device: Box<dyn VirtioDevice>,
        saved: Option<Saved<'_>>,
    ) -> Result<Attached, BuildError> {
        if self.pci.is_some() {
            return self.attach_pci(device, saved);
        }
        let index = self.slots.len();
        let slot = MmioDevice {
            base: VIRTIO_MMIO_BASE + index as u64 * MMIO_WINDOW,
            len: MMIO_WINDOW,
            gsi: VIRTIO_FIRST_GSI + index as u32,
        };
        let dev_err = |source| BuildError::VirtioDevice {
            base: slot.base,
            source,
        };
        let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(dev_err)?;
        self.vm_fd
            .register_irqfd(&irq, slot.gsi)
            .map_err(kvm_err("connect a virtio interrupt"))?;
        let mut queue_evts = Vec::new();
        for queue in 0..device.queue_max_sizes().len() as u32 {
            let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(dev_err)?;
            self.vm_fd
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
        let waker = QueueWaker::new(clone_evts()?);
        let interrupt = Arc::new(match self.register_page(&slot, index, device.as_ref()) {
            Some(page) => Interrupt::in_page(irq, page),
            None => Interrupt::new(irq),
        });
        let mem = self.mem.clone();
        let transport = match saved {
            None => MmioTransport::new(device, mem, interrupt.clone(), transport_evts)?,
            Some(saved) => MmioTransport::restore(
                saved.transport,
                device,
                mem,
                interrupt.clone(),
                transport_evts,
            )
            .map_err(|e| BuildError::Restore(e.within(&format!("virtio[{index}]"))))?,
        };
        let transport = Arc::new(Mutex::new(transport));
        self.devices.transports.push(transport.clone());
        self.devices.mmio.insert(
            Arc::new(Mutex::new(MmioBusDevice::new(transport.clone()))),
            slot.base,
            slot.len,
        )?;
        let subscriber = QueueEvents::new(transport, queue_evts).map_err(dev_err)?;
        self.devices.subscribers.push(Box::new(subscriber));
        self.slots.push(slot);
        Ok(Attached { interrupt, waker })
    }
}

impl DeviceManager<'_> {
    /// A page KVM maps read-only over `slot`'s register window, for the
    /// transport to keep its registers in ([`RegisterPage`]): the driver's
    /// register reads then exit no more. None for a device whose configuration
    /// the host changes at run time, or where KVM refuses the mapping (the
    /// registers then trap, as without a page).
    fn register_page(
        &self,
        slot: &MmioDevice,
        index: usize,
        device: &dyn VirtioDevice,
    ) -> Option<Arc<RegisterPage>> {
        if device.host_changes_config() {
            return None;
        }
        let page = match RegisterPage::new() {
            Ok(page) => Arc::new(page),
            Err(e) => {
                tracing::warn!(
                    base = slot.base,
                    "no register page for a virtio device: {e}"
                );
                return None;
            }
        };
        let region = kvm_userspace_memory_region {
            // After guest memory's slots (one per region, `create_vm`).
            slot: (self.mem.num_regions() + index) as u32,
            flags: KVM_MEM_READONLY,
            guest_phys_addr: slot.base,
            memory_size: MMIO_WINDOW,
            userspace_addr: page.host_address(),
        };
        // SAFETY: the page is a live mapping of MMIO_WINDOW bytes that the device's
        // interrupt and transport keep; the VM keeps those (its transports, and the
        // MMIO bus every vCPU thread runs with) until after its fd is closed. The
        // slot is read-only: the guest cannot write the VMM's memory through it.
        match unsafe { self.vm_fd.set_user_memory_region(region) } {
            Ok(()) => Some(page),
            Err(e) => {
                tracing::warn!(
                    base = slot.base,
                    "KVM cannot map a virtio register page: {e}"
                );
                None
            }
        }
    }

    /// Puts `device` in the next PCI slot: its BAR the slot's share of the PCI
    /// window, a vector per queue and one for its configuration, each an irqfd
    /// on the next GSI; notifications are caught where its BAR is
    /// ([`VirtioPci`] moves them with it).
    fn attach_pci(
        &mut self,
        device: Box<dyn VirtioDevice>,
        saved: Option<Saved<'_>>,
    ) -> Result<Attached, BuildError> {
        let index = self.devices.transports.len();
        let placed = |e: RestoreError| BuildError::Restore(e.within(&format!("virtio[{index}]")));
        let Some(pci) = self.pci.as_mut() else {
            return Err(BuildError::Pci("no PCI bus".into()));
        };
        let slot = pci
            .bus
            .next_slot()
            .ok_or_else(|| BuildError::Pci("bus 0 is full".into()))?;
        let bar = PCI_MMIO_START + slot as u64 * BAR_SIZE;
        let dev_err = |source| BuildError::VirtioDevice { base: bar, source };
        let queues = device.queue_max_sizes().len();
        let mut vectors = Vec::with_capacity(queues + 1);
        for _ in 0..=queues {
            let irqfd = EventFd::new(libc::EFD_NONBLOCK).map_err(dev_err)?;
            self.vm_fd
                .register_irqfd(&irqfd, pci.next_gsi)
                .map_err(kvm_err("connect an MSI-X vector"))?;
            vectors.push((irqfd, pci.next_gsi));
            pci.next_gsi += 1;
        }
        // INTA, for drivers without MSI-X: the I/O APIC line a virtio-mmio device
        // in the same place would have.
        let intx_gsi = VIRTIO_FIRST_GSI + pci.intx.len() as u32;
        let intx = EventFd::new(libc::EFD_NONBLOCK).map_err(dev_err)?;
        self.vm_fd
            .register_irqfd(&intx, intx_gsi)
            .map_err(kvm_err("connect a PCI INTx line"))?;
        let queue_evts = (0..queues)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(dev_err)?;
        let clone_evts = || {
            queue_evts
                .iter()
                .map(EventFd::try_clone)
                .collect::<Result<Vec<_>, _>>()
                .map_err(dev_err)
        };
        let (transport_evts, notify_evts) = (clone_evts()?, clone_evts()?);
        let waker = QueueWaker::new(clone_evts()?);
        let msix = Arc::new(Mutex::new(Msix::new(
            vectors,
            (intx, intx_gsi),
            queues,
            pci.vm.clone(),
        )));
        let interrupt = Arc::new(Interrupt::msix(msix.clone()));
        let mem = self.mem.clone();
        let transport = match saved {
            None => MmioTransport::new(device, mem, interrupt.clone(), transport_evts)?,
            Some(saved) => MmioTransport::restore(
                saved.transport,
                device,
                mem,
                interrupt.clone(),
                transport_evts,
            )
            .map_err(placed)?,
        };
        let transport = Arc::new(Mutex::new(transport));
        self.devices.transports.push(transport.clone());
        let mut function = VirtioPci::new(
            transport.clone(),
            interrupt.clone(),
            msix,
            notify_evts,
            bar,
            (PCI_MMIO_START, PCI_MMIO_START + PCI_MMIO_SIZE),
            pci.vm.clone(),
        );
        if let Some(state) = saved.and_then(|s| s.pci) {
            function
                .restore_state(state)
                .map_err(|e| placed(e.within("pci")))?;
        }
        let function = Arc::new(Mutex::new(function));
        self.devices.pci_functions.push(function.clone());
        pci.bus.add(function);
        pci.intx.push(PciIntx {
            slot: slot as u8,
            gsi: intx_gsi,
        });
        let subscriber = QueueEvents::new(transport, queue_evts).map_err(dev_err)?;
        self.devices.subscribers.push(Box::new(subscriber));
        Ok(Attached { interrupt, waker })
    }
}

#[cfg(test)]
mod tests {
    use kvm_ioctls::Kvm;
    use vigil_devices::rate_limiter::RateLimit;
    use vigil_devices::virtio::rng::Rng;
    use vigil_model::config::DriveConfig;
    use vm_memory::GuestAddress;

    use super::*;
    use crate::vstate::vm::create_vm;

    /// Devices take the windows and lines in the order they are attached, from
    /// 0xd000_0000 and GSI 5, are declared there, and answer there; the host finds
    /// their handles by what users name them by.
    #[test]
    fn devices_take_windows_and_lines_in_attach_order() {
        let kvm = Kvm::new().unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let vm_fd = create_vm(&kvm, &mem, vigil_model::config::HugePages::None).unwrap();
        let image = std::env::temp_dir().join(format!("vigil-dm-{}.img", std::process::id()));
        std::fs::write(&image, [0u8; 4096]).unwrap();
        let block = Block::new(&DriveConfig {
            path: image.clone(),
            id: "root".into(),
            ..Default::default()
        })
        .unwrap();
        let balloon_config = BalloonConfig {
            target_mib: 1,
            ..Default::default()
        };

        let mut devices = DeviceManager::new(&vm_fd, &mem);
        devices.add_drive("root", block).unwrap();
        devices
            .add(Box::new(Rng::new(RateLimit::default())))
            .unwrap();
        devices
            .add_balloon(Balloon::new(balloon_config), balloon_config)
            .unwrap();
        std::fs::remove_file(&image).ok();
        assert_eq!(
            devices.cmdline_entries(),
            " virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=4K@0xd0001000:6 \
             virtio_mmio.device=4K@0xd0002000:7"
        );
        let slot = |base, gsi| MmioDevice {
            base,
            len: 0x1000,
            gsi,
        };
        assert_eq!(
            devices.acpi_devices(),
            [
                slot(0xd000_0000, 5),
                slot(0xd000_1000, 6),
                slot(0xd000_2000, 7)
            ]
        );

        let virtio = devices.finish().unwrap();
        for (base, device_type) in [(0xd000_0000, 2), (0xd000_1000, 4), (0xd000_2000, 5)] {
            let mut word = [0u8; 4];
            assert!(virtio.mmio.read(base + 8, &mut word));
            assert_eq!(u32::from_le_bytes(word), device_type, "at {base:#x}");
        }
        assert!(!virtio.mmio.read(0xd000_3000, &mut [0u8; 4]));
        assert_eq!(virtio.subscribers.len(), 3);
        assert_eq!(
            virtio.handles.drives.get("root").map(DriveHandle::id),
            Some("root")
        );
        assert_eq!(
            virtio.handles.balloon.as_ref().map(BalloonHandle::config),
            Some(balloon_config)
        );
        assert!(virtio.handles.nets.is_empty());
    }

    /// With PCI: devices take slots 1, 2, ... with their BARs in the PCI window
    /// and INTA on the lines from 5; nothing goes on the command line or in the
    /// DSDT's device list; ECAM and the BARs answer on the MMIO bus.
    #[test]
    fn pci_devices_take_slots_and_answer_on_ecam_and_their_bars() {
        let kvm = Kvm::new().unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        let vm_fd = create_vm(&kvm, &mem, vigil_model::config::HugePages::None).unwrap();
        let mut devices = DeviceManager::with_pci(&vm_fd, &mem).unwrap();
        devices
            .add(Box::new(Rng::new(RateLimit::default())))
            .unwrap();
        let config = BalloonConfig {
            target_mib: 1,
            ..Default::default()
        };
        devices.add_balloon(Balloon::new(config), config).unwrap();
        assert_eq!(devices.cmdline_entries(), "");
        assert!(devices.acpi_devices().is_empty());
        assert_eq!(
            devices.pci_interrupts(),
            Some(&[PciIntx { slot: 1, gsi: 5 }, PciIntx { slot: 2, gsi: 6 }][..])
        );
        let virtio = devices.finish().unwrap();
        let word = |addr| {
            let mut b = [0u8; 4];
            assert!(virtio.mmio.read(addr, &mut b), "{addr:#x}");
            u32::from_le_bytes(b)
        };
        assert_eq!(word(PCI_ECAM_START), 0x0008_1b36, "host bridge");
        assert_eq!(word(PCI_ECAM_START + (1 << 15)), 0x1044_1af4, "virtio-rng");
        assert_eq!(
            word(PCI_ECAM_START + (2 << 15)),
            0x1045_1af4,
            "virtio-balloon"
        );
        assert_eq!(word(PCI_ECAM_START + (3 << 15)), u32::MAX, "empty slot");
        assert_eq!(word(PCI_ECAM_START + (2 << 15) + 0x10), 0xc001_0004, "BAR0");
        // num_queues in the balloon's common configuration.
        let mut b = [0u8; 2];
        assert!(virtio.mmio.read(0xc001_0012, &mut b));
        assert_eq!(u16::from_le_bytes(b), 2);
        assert_eq!(virtio.pci_functions.len(), 2);
    }
}
