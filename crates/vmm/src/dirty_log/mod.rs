//! Which guest pages were written, by the guest or by the VMM.
//!
//! Two sources, merged: KVM's dirty page log (per RAM slot; the guest's own writes,
//! `kvm.rs`), and the dirty bitmap of [`GuestMemoryMmap`], which the VMM's own
//! writes into guest memory mark (a device's DMA: a virtio-blk read, a received
//! frame, a vsock packet; the balloon's discarded pages; the debug API's writes),
//! since KVM does not see those.
//!
//! One owner, many readers ([`DirtyTracker`], `tracker.rs`): the owner fetches both
//! (each fetch resets them) and hands the pages to every [`DirtyReader`]; each
//! reader's [`DirtyReader::take`] returns the pages written since its own previous
//! `take` (the first one: every page, since nothing is known yet), whatever the
//! other readers took meanwhile. KVM's logging turns on with the first reader and
//! off when the last one is dropped (logging costs the guest a fault on the first
//! write to each page after every fetch).

mod kvm;
mod tracker;

pub(crate) use kvm::KvmGuestLog;
pub use tracker::{DirtyReader, DirtyTracker};

use crate::GuestMemoryMmap;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

/// The size of a page in the dirty log (KVM logs 4 KiB guest pages on x86_64, and
/// the memory's dirty bitmap has one bit per 4 KiB host page).
pub const PAGE_SIZE: u64 = 4096;

/// `/proc/self/pagemap` entry bits: in RAM, swapped out, mapped by this
/// process alone.
const PRESENT: u64 = 1 << 63;
const SWAPPED: u64 = 1 << 62;
const EXCLUSIVE: u64 = 1 << 56;

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
    fn empty(start: u64, len: u64) -> Self {
        let pages = len.div_ceil(PAGE_SIZE);
        Self {
            start,
            pages,
            bitmap: vec![0; pages.div_ceil(64) as usize],
        }
    }

    fn full(start: u64, len: u64) -> Self {
        let mut slot = Self::empty(start, len);
        slot.bitmap.fill(u64::MAX);
        if !slot.pages.is_multiple_of(64) {
            if let Some(last) = slot.bitmap.last_mut() {
                *last = (1u64 << (slot.pages % 64)) - 1;
            }
        }
        slot
    }

    fn bit(&self, page: u64) -> bool {
        page < self.pages
            && self
                .bitmap
                .get((page / 64) as usize)
                .is_some_and(|w| w & (1 << (page % 64)) != 0)
    }

    /// Adds the pages of `bits` (the same layout; bits past the slot's end, which
    /// neither source sets, are dropped).
    fn add(&mut self, bits: &[u64]) {
        for (word, &more) in self.bitmap.iter_mut().zip(bits) {
            *word |= more;
        }
        if !self.pages.is_multiple_of(64) {
            if let Some(last) = self.bitmap.last_mut() {
                *last &= (1u64 << (self.pages % 64)) - 1;
            }
        }
    }
}

/// The guest pages written during some interval, by guest-physical address.
#[derive(Clone, Debug, Default)]
pub struct DirtyLog {
    slots: Vec<SlotLog>,
    all: bool,
}

impl DirtyLog {
    /// A log in which every page of `mem` counts as dirty: what a reader's first
    /// `take` reports, when nothing is known yet.
    pub fn all(mem: &GuestMemoryMmap) -> Self {
        Self {
            slots: mem
                .iter()
                .map(|r| SlotLog::full(r.start_addr().raw_value(), r.len()))
                .collect(),
            all: true,
        }
    }

    /// The pages of `mem` the host has backed (present in memory or swapped
    /// out, from `/proc/self/pagemap`): for anonymous guest memory, every other
    /// page was never touched and reads as zeros. Not for memory mapped from a
    /// file, whose pages not yet read hold the file's content.
    pub fn backed(mem: &GuestMemoryMmap) -> std::io::Result<Self> {
        Self::from_pagemap(mem, |e| e & (PRESENT | SWAPPED) != 0)
    }

    /// The pages of `mem` in RAM and mapped by this process alone (from
    /// `/proc/self/pagemap`): not the shared zero page a read of an untouched
    /// page maps, nor a page swapped out.
    pub fn resident_own(mem: &GuestMemoryMmap) -> std::io::Result<Self> {
        Self::from_pagemap(mem, |e| e & (PRESENT | EXCLUSIVE) == PRESENT | EXCLUSIVE)
    }

    /// The pages whose pagemap entry `wanted` takes.
    fn from_pagemap(mem: &GuestMemoryMmap, wanted: impl Fn(u64) -> bool) -> std::io::Result<Self> {
        use std::os::unix::fs::FileExt;
        let pagemap = std::fs::File::open("/proc/self/pagemap")?;
        let mut log = Self::empty(mem);
        let mut entries = vec![0u8; 8 * 4096];
        for (slot, region) in mem.iter().enumerate() {
            let host = region
                .get_host_address(vm_memory::MemoryRegionAddress(0))
                .map_err(|e| std::io::Error::other(e.to_string()))? as u64;
            let pages = region.len() / PAGE_SIZE;
            let mut bits = vec![0u64; pages.div_ceil(64) as usize];
            let mut page = 0u64;
            while page < pages {
                let n = (pages - page).min(4096);
                let buf = &mut entries[..(n * 8) as usize];
                pagemap.read_exact_at(buf, (host / PAGE_SIZE + page) * 8)?;
                for (i, entry) in buf.chunks_exact(8).enumerate() {
                    let e = u64::from_le_bytes(entry.try_into().unwrap_or_default());
                    if wanted(e) {
                        let p = page + i as u64;
                        bits[(p / 64) as usize] |= 1 << (p % 64);
                    }
                }
                page += n;
            }
            log.add(slot, &bits);
        }
        Ok(log)
    }

    /// A log of `mem` in which no page was written.
    pub(crate) fn empty(mem: &GuestMemoryMmap) -> Self {
        Self {
            slots: mem
                .iter()
                .map(|r| SlotLog::empty(r.start_addr().raw_value(), r.len()))
                .collect(),
            all: false,
        }
    }

    /// Adds the pages of `bits` to slot `slot` (a log that counts every page as
    /// dirty stays so).
    pub(crate) fn add(&mut self, slot: usize, bits: &[u64]) {
        if let Some(s) = self.slots.get_mut(slot) {
            s.add(bits);
        }
    }

    /// Adds the pages of `other`, a log of the same memory.
    pub fn merge(&mut self, other: &DirtyLog) {
        for (slot, s) in other.slots.iter().enumerate() {
            self.add(slot, &s.bitmap);
        }
        self.all |= other.all;
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
pub enum DirtyLogError {
    #[error(
        "KVM refused to {what} for memory slot {slot} (guest {start:#x}, {mib} MiB): {source}"
    )]
    Kvm {
        what: &'static str,
        slot: u32,
        start: u64,
        mib: u64,
        source: kvm_ioctls::Error,
    },
    #[error("the VM has ended: its dirty log is gone")]
    VmEnded,
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    #[test]
    fn backed_pages_are_those_written_and_no_others() {
        use vm_memory::Bytes;
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 64 * 4096),
            (GuestAddress(0x1_0000_0000), 64 * 4096),
        ])
        .unwrap();
        for gpa in [3 * 4096 + 17, 40 * 4096, 0x1_0000_0000 + 5 * 4096] {
            mem.write_obj(0xa5u8, GuestAddress(gpa)).unwrap();
        }
        let backed = DirtyLog::backed(&mem).unwrap();
        assert!(!backed.is_all());
        assert_eq!(
            backed.dirty_pages().collect::<Vec<_>>(),
            [3 * 4096, 40 * 4096, 0x1_0000_0000 + 5 * 4096]
        );
        // A read of an untouched page maps the shared zero page: backed, not own.
        let _: u8 = mem.read_obj(GuestAddress(7 * 4096)).unwrap();
        let backed = DirtyLog::backed(&mem).unwrap();
        assert!(backed.is_dirty(7 * 4096));
        let own = DirtyLog::resident_own(&mem).unwrap();
        assert_eq!(
            own.dirty_pages().collect::<Vec<_>>(),
            [3 * 4096, 40 * 4096, 0x1_0000_0000 + 5 * 4096]
        );
    }

    #[test]
    fn all_covers_ram_only() {
        let mem = GuestMemoryMmap::from_ranges(&[
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

    #[test]
    fn added_pages_stay_inside_the_slot() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x9000)]).unwrap();
        let mut log = DirtyLog::empty(&mem);
        assert_eq!(log.count(), 0);
        log.add(0, &[0b1_0000_0001 | 1 << 40]);
        log.add(0, &[0b10]);
        log.add(1, &[1]);
        assert_eq!(log.dirty_pages().collect::<Vec<_>>(), [0, 0x1000, 0x8000]);
        assert!(!log.is_all());
    }

    #[test]
    fn merged_logs_hold_the_pages_of_both() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x9000)]).unwrap();
        let (mut a, mut b) = (DirtyLog::empty(&mem), DirtyLog::empty(&mem));
        a.add(0, &[0b1]);
        b.add(0, &[0b100]);
        a.merge(&b);
        assert_eq!(a.dirty_pages().collect::<Vec<_>>(), [0, 0x2000]);
        assert!(!a.is_all());
        a.merge(&DirtyLog::all(&mem));
        assert!(a.is_all());
        assert_eq!(a.count(), 9);
    }
}
