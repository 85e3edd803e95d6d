//! Which guest pages were written: KVM's dirty page log, per RAM slot.
//!
//! [`crate::VmControl::dirty_log`] turns logging on for every RAM slot at its first
//! call (KVM lets the flags of an existing slot change, not its place or size) and
//! reports every page as dirty, since nothing is known yet; each later call reports
//! the pages written since the call before (`KVM_GET_DIRTY_LOG`, which also clears
//! KVM's log). [`crate::VmControl::stop_dirty_log`] turns it off.
//!
//! One owner at a time: each call resets what the next one sees, so two users (an
//! integrity monitor and, later, live migration) must share one reader that hands
//! the pages to both.

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// The size of a page in the dirty log (KVM logs 4 KiB guest pages on x86_64).
pub const PAGE_SIZE: u64 = 4096;

/// One RAM slot's part of a [`DirtyLog`].
#[derive(Clone, Debug)]
struct SlotLog {
    /// Guest-physical address of the slot's first byte.
    start: u64,
    /// Pages in the slot.
    pages: u64,
    /// One bit per page, bit `i % 64` of word `i / 64` for page `i`.
    bitmap: Vec<u64>,
}

impl SlotLog {
    fn full(start: u64, len: u64) -> Self {
        let pages = len.div_ceil(PAGE_SIZE);
        let mut bitmap = vec![u64::MAX; pages.div_ceil(64) as usize];
        if !pages.is_multiple_of(64) {
            if let Some(last) = bitmap.last_mut() {
                *last = (1u64 << (pages % 64)) - 1;
            }
        }
        Self {
            start,
            pages,
            bitmap,
        }
    }

    fn bit(&self, page: u64) -> bool {
        page < self.pages
            && self
                .bitmap
                .get((page / 64) as usize)
                .is_some_and(|w| w & (1 << (page % 64)) != 0)
    }
}

/// The guest pages written during some interval, by guest-physical address.
#[derive(Clone, Debug, Default)]
pub struct DirtyLog {
    slots: Vec<SlotLog>,
    all: bool,
}

impl DirtyLog {
    /// A log in which every page of `mem` counts as dirty: what the first call
    /// reports, when nothing is known yet.
    pub fn all(mem: &GuestMemoryMmap) -> Self {
        Self {
            slots: mem
                .iter()
                .map(|r| SlotLog::full(r.start_addr().raw_value(), r.len()))
                .collect(),
            all: true,
        }
    }

    /// Whether this log counts every page as dirty (made by [`DirtyLog::all`]).
    pub fn is_all(&self) -> bool {
        self.all
    }

    /// Whether the page holding guest-physical address `gpa` was written; false
    /// outside RAM.
    pub fn is_dirty(&self, gpa: u64) -> bool {
        self.slots.iter().any(|s| {
            gpa.checked_sub(s.start)
                .is_some_and(|off| s.bit(off / PAGE_SIZE))
        })
    }

    /// The guest-physical addresses of the dirty pages, in ascending order.
    pub fn dirty_pages(&self) -> impl Iterator<Item = u64> + '_ {
        self.slots.iter().flat_map(|s| {
            s.bitmap.iter().enumerate().flat_map(move |(w, &word)| {
                let mut bits = word;
                std::iter::from_fn(move || {
                    if bits == 0 {
                        return None;
                    }
                    let b = u64::from(bits.trailing_zeros());
                    bits &= bits - 1;
                    Some(s.start + (w as u64 * 64 + b) * PAGE_SIZE)
                })
            })
        })
    }

    /// How many pages are dirty.
    pub fn count(&self) -> usize {
        self.slots
            .iter()
            .flat_map(|s| s.bitmap.iter())
            .map(|w| w.count_ones() as usize)
            .sum()
    }
}

/// Why the dirty log could not be turned on, read or turned off.
#[derive(Debug, thiserror::Error)]
#[error("KVM refused to {what} for memory slot {slot} (guest {start:#x}, {mib} MiB): {source}")]
pub struct DirtyLogError {
    what: &'static str,
    slot: u32,
    start: u64,
    mib: u64,
    source: kvm_ioctls::Error,
}

fn slot_error(
    what: &'static str,
    slot: u32,
    start: u64,
    len: u64,
) -> impl FnOnce(kvm_ioctls::Error) -> DirtyLogError {
    move |source| DirtyLogError {
        what,
        slot,
        start,
        mib: len >> 20,
        source,
    }
}

/// Registers every RAM region of `mem` (slot i = region i, as `create_vm` did)
/// again with dirty logging on or off.
pub(crate) fn set_logging(vm: &VmFd, mem: &GuestMemoryMmap, on: bool) -> Result<(), DirtyLogError> {
    let what = if on {
        "turn dirty logging on"
    } else {
        "turn dirty logging off"
    };
    for (slot, region) in mem.iter().enumerate() {
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
        // SAFETY: the same slot, address, size and mapping `create_vm` registered;
        // only the flags change. The mapping is owned by `mem`, which the caller
        // keeps alive for as long as the VM fd exists.
        unsafe { vm.set_user_memory_region(desc) }.map_err(err())?;
    }
    Ok(())
}

/// Reads (and clears) KVM's dirty log of every RAM slot.
pub(crate) fn fetch(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<DirtyLog, DirtyLogError> {
    let mut slots = Vec::with_capacity(mem.num_regions());
    for (slot, region) in mem.iter().enumerate() {
        let (start, len) = (region.start_addr().raw_value(), region.len());
        let bitmap = vm
            .get_dirty_log(slot as u32, len as usize)
            .map_err(slot_error("read the dirty log", slot as u32, start, len))?;
        slots.push(SlotLog {
            start,
            pages: len.div_ceil(PAGE_SIZE),
            bitmap,
        });
    }
    Ok(DirtyLog { slots, all: false })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    #[test]
    fn all_covers_ram_only() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x9000),
            (GuestAddress(0x1_0000_0000), 0x40_0000),
        ])
        .unwrap();
        let log = DirtyLog::all(&mem);
        assert!(log.is_all());
        assert_eq!(log.count(), 9 + 1024);
        assert!(log.is_dirty(0));
        assert!(log.is_dirty(0x8fff));
        assert!(!log.is_dirty(0x9000), "above the first region");
        assert!(log.is_dirty(0x1_0000_0000 + 0x3f_ffff));
        assert!(!log.is_dirty(0x1_0040_0000));
        let pages: Vec<u64> = log.dirty_pages().collect();
        assert_eq!(pages.len(), log.count());
        assert_eq!(pages[..2], [0, 0x1000]);
        assert_eq!(pages[8], 0x8000);
        assert_eq!(pages[9], 0x1_0000_0000);
        assert_eq!(*pages.last().unwrap(), 0x1_0000_0000 + 0x3f_f000);
    }

    #[test]
    fn bitmap_pages() {
        let log = DirtyLog {
            slots: vec![SlotLog {
                start: 0x10_0000,
                pages: 130,
                bitmap: vec![0b101, 0, 1 << 1],
            }],
            all: false,
        };
        assert_eq!(log.count(), 3);
        assert_eq!(
            log.dirty_pages().collect::<Vec<_>>(),
            [0x10_0000, 0x10_2000, 0x10_0000 + 129 * 0x1000]
        );
        assert!(log.is_dirty(0x10_2fff));
        assert!(!log.is_dirty(0x10_1000));
        assert!(!log.is_dirty(0xf_f000));
    }
}
