//! The KVM VM: guest memory slots, the in-kernel irqchip (PIC, I/O APIC, LAPICs)
//! and PIT.

use crate::GuestMemoryMmap;
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

use crate::arch::x86_64::layout::{KVM_IDENTITY_MAP_ADDRESS, KVM_TSS_ADDRESS};
use vigil_model::config::HugePages;

/// Errors from creating the KVM VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("KVM refused to {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Kvm { what, source }
}

/// Creates a VM with the x86 platform pieces KVM emulates in the kernel and maps
/// `mem` into it, backed by huge pages or not as `huge_pages` says.
pub fn create_vm(
    kvm_sys: &Kvm,
    mem: &GuestMemoryMmap,
    huge_pages: HugePages,
) -> Result<VmFd, VmError> {
    let vm = kvm_sys.create_vm().map_err(kvm("create a VM"))?;
    // Memory slots go in before the irqchip: on kvm_pvm hosts each slot added after
    // it costs ~10 ms (measured), before it ~0.1 ms.
    for (slot, region) in mem.iter().enumerate() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|_| VmError::Kvm {
                what: "map guest memory (region has no host mapping)",
                source: kvm_ioctls::Error::new(libc::EINVAL),
            })?;
        // Huge pages: fewer page-table levels for KVM's shadow or nested paging to
        // walk and fill, but a touched byte makes 2 MiB resident. Said either way,
        // so that a host whose THP policy is "always" does not decide for the VM.
        let advice = match huge_pages {
            HugePages::None => libc::MADV_NOHUGEPAGE,
            HugePages::Transparent => libc::MADV_HUGEPAGE,
        };
        // SAFETY: advisory only, on a mapping `mem` owns; failure changes nothing.
        // No byte of guest memory changes, so its dirty bitmap has nothing to mark.
        unsafe { libc::madvise(host.cast(), region.len() as usize, advice) };
        let region_desc = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: host as u64,
            // Logging from the start: every VM logs its writes once it runs (for
            // diff snapshots and migration), and turning it on later registers
            // the slot again, ~10 ms on kvm_pvm after the irqchip.
            flags: KVM_MEM_LOG_DIRTY_PAGES,
        };
        // SAFETY: the region is a live mapping owned by `mem`, which the VM keeps
        // for as long as the VM fd exists (the `Vm` drops its fd first).
        unsafe { vm.set_user_memory_region(region_desc) }.map_err(kvm("map guest memory"))?;
    }
    vm.set_tss_address(KVM_TSS_ADDRESS)
        .map_err(kvm("set the TSS address"))?;
    vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
        .map_err(kvm("set the identity map address"))?;
    vm.create_irq_chip()
        .map_err(kvm("create the in-kernel irqchip"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit)
        .map_err(kvm("create the in-kernel PIT"))?;
    Ok(vm)
}
