//! What virtio-pci functions need of KVM ([`PciVm`]): the VM's GSI routing table
//! (the in-kernel irqchip's lines plus one MSI route per MSI-X vector, rewritten
//! whole by `KVM_SET_GSI_ROUTING` whenever the guest reprograms a vector) and
//! the queue-notification ioeventfds, moved with the BAR they sit in.

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::sync::Mutex;

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::{IoEventAddress, Kvm, NoDatamatch, VmFd};
use vigil_devices::virtio::pci::PciVm;
use vmm_sys_util::eventfd::EventFd;

/// GSIs of the I/O APIC's pins: MSI vectors take the ones after.
pub(crate) const IOAPIC_PINS: u32 = 24;

/// The VM's interrupt routes and notification catches, on its own handle of
/// the VM (a duplicate of its fd), so that device threads can change them.
pub(crate) struct KvmPci {
    vm: VmFd,
    msi: Mutex<BTreeMap<u32, (u64, u32)>>,
}

impl KvmPci {
    /// A handle on the VM of `vm_fd`.
    pub(crate) fn new(vm_fd: &VmFd) -> std::io::Result<Self> {
        let kvm = Kvm::new().map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        // SAFETY: dup() of an fd this process owns; the result is checked below.
        let fd = unsafe { libc::dup(vm_fd.as_raw_fd()) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` is a fresh duplicate of a KVM VM fd that nothing else owns;
        // the VmFd made from it closes it.
        let vm = unsafe { kvm.create_vmfd_from_rawfd(fd) }
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        Ok(Self {
            vm,
            msi: Mutex::new(BTreeMap::new()),
        })
    }

    /// The whole table: KVM's default irqchip routes (GSI n to I/O APIC pin n,
    /// and GSI 0-15 to the PICs) and the MSI routes.
    fn table(msi: &BTreeMap<u32, (u64, u32)>) -> Vec<kvm_irq_routing_entry> {
        let irqchip = |gsi: u32, chip: u32, pin: u32| {
            let mut e = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_IRQCHIP,
                ..Default::default()
            };
            e.u.irqchip.irqchip = chip;
            e.u.irqchip.pin = pin;
            e
        };
        let mut entries = Vec::new();
        for gsi in 0..IOAPIC_PINS {
            if gsi < 8 {
                entries.push(irqchip(gsi, KVM_IRQCHIP_PIC_MASTER, gsi));
            } else if gsi < 16 {
                entries.push(irqchip(gsi, KVM_IRQCHIP_PIC_SLAVE, gsi - 8));
            }
            entries.push(irqchip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        }
        for (&gsi, &(address, data)) in msi {
            let mut e = kvm_irq_routing_entry {
                gsi,
                type_: KVM_IRQ_ROUTING_MSI,
                ..Default::default()
            };
            e.u.msi.address_lo = address as u32;
            e.u.msi.address_hi = (address >> 32) as u32;
            e.u.msi.data = data;
            entries.push(e);
        }
        entries
    }
}

impl PciVm for KvmPci {
    fn set_msi_route(&self, gsi: u32, address: u64, data: u32) -> Result<(), String> {
        let mut msi = self.msi.lock().unwrap_or_else(|e| e.into_inner());
        msi.insert(gsi, (address, data));
        let routing = KvmIrqRouting::from_entries(&Self::table(&msi))
            .map_err(|e| format!("{} routes: {e:?}", msi.len()))?;
        self.vm
            .set_gsi_routing(&routing)
            .map_err(|e| format!("KVM_SET_GSI_ROUTING: {e}"))
    }

    fn register_notify(&self, evt: &EventFd, addr: u64) -> Result<(), String> {
        self.vm
            .register_ioevent(evt, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(|e| format!("KVM_IOEVENTFD at {addr:#x}: {e}"))
    }

    fn unregister_notify(&self, evt: &EventFd, addr: u64) -> Result<(), String> {
        self.vm
            .unregister_ioevent(evt, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(|e| format!("KVM_IOEVENTFD deassign at {addr:#x}: {e}"))
    }
}
