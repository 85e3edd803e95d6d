//! KVM's dirty page log: the guest's own writes, per RAM slot (slot i = region i
//! of the guest memory, as `create_vm` registered them). Logging is a flag of each
//! slot, which KVM lets change on an existing slot (not its place or size);
//! `KVM_GET_DIRTY_LOG` returns a slot's bitmap and clears it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

use super::tracker::GuestWriteLog;
use super::DirtyLogError;
use crate::GuestMemoryMmap;

fn slot_error(
    what: &'static str,
    slot: u32,
    start: u64,
    len: u64,
) -> impl FnOnce(kvm_ioctls::Error) -> DirtyLogError {
    move |source| DirtyLogError::Kvm {
        what,
        slot,
        start,
        mib: len >> 20,
        source,
    }
}

/// The dirty log of a VM's RAM slots; held weakly, as the VM may end first.
pub(crate) struct KvmGuestLog {
    vm: Weak<VmFd>,
    mem: GuestMemoryMmap,
    /// Whether the slots log now (`create_vm` registers them logging).
    logging: AtomicBool,
}

impl KvmGuestLog {
    /// The log of `vm`'s slots over `mem`, which `create_vm` registered
    /// logging.
    pub(crate) fn new(vm: Weak<VmFd>, mem: GuestMemoryMmap) -> Self {
        Self {
            vm,
            mem,
            logging: AtomicBool::new(true),
        }
    }

    fn vm(&self) -> Result<Arc<VmFd>, DirtyLogError> {
        self.vm.upgrade().ok_or(DirtyLogError::VmEnded)
    }
}

impl GuestWriteLog for KvmGuestLog {
    /// Registers every RAM region again with dirty logging on or off.
    fn set_logging(&self, on: bool) -> Result<(), DirtyLogError> {
        // Registering a slot again costs ~10 ms on kvm_pvm once the irqchip
        // exists: not when nothing changes.
        if self.logging.load(Ordering::Acquire) == on {
            return Ok(());
        }
        let vm = self.vm()?;
        let what = if on {
            "turn dirty logging on"
        } else {
            "turn dirty logging off"
        };
        for (slot, region) in self.mem.iter().enumerate() {
            let (start, len) = (region.start_addr().raw_value(), region.len());
            let err = || slot_error(what, slot as u32, start, len);
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|_| err()(kvm_ioctls::Error::new(libc::EINVAL)))?;
            let desc = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: start,
                memory_size: len,
                userspace_addr: host as u64,
                flags: if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
            };
            // SAFETY: the same slot, address, size and mapping `create_vm`
            // registered; only the flags change. The mapping is owned by `mem`,
            // which outlives the VM fd (the running VM drops the fd first).
            unsafe { vm.set_user_memory_region(desc) }.map_err(err())?;
        }
        self.logging.store(on, Ordering::Release);
        Ok(())
    }

    /// Reads (and clears) slot `slot`'s log.
    fn fetch(&self, slot: usize) -> Result<Vec<u64>, DirtyLogError> {
        let vm = self.vm()?;
        let Some(region) = self.mem.iter().nth(slot) else {
            return Ok(Vec::new());
        };
        let (start, len) = (region.start_addr().raw_value(), region.len());
        vm.get_dirty_log(slot as u32, len as usize)
            .map_err(slot_error("read the dirty log", slot as u32, start, len))
    }
}
