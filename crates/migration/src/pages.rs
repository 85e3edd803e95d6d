//! A set of guest pages, one bit each over the VM's RAM ranges, that several
//! threads update at once (post-copy: the pages still to come, those asked for).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use vigil_vmm::snapshot::MemoryRange;

use crate::wire::PAGE;

const PAGE_BYTES: u64 = PAGE as u64;

pub struct PageSet {
    /// Each range: its first address, its bytes, the index of its first page.
    ranges: Vec<(u64, u64, u64)>,
    bits: Vec<AtomicU64>,
    len: AtomicUsize,
}

impl PageSet {
    /// An empty set over `ranges`.
    pub fn new(ranges: &[MemoryRange]) -> Self {
        let mut first = 0u64;
        let ranges: Vec<_> = ranges
            .iter()
            .map(|r| {
                let range = (r.guest_address, r.bytes, first);
                first += r.bytes / PAGE_BYTES;
                range
            })
            .collect();
        Self {
            ranges,
            bits: (0..first.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            len: AtomicUsize::new(0),
        }
    }

    /// The bit of the page at `gpa`; `None` outside RAM or off a page boundary.
    fn index(&self, gpa: u64) -> Option<(usize, u64)> {
        if !gpa.is_multiple_of(PAGE_BYTES) {
            return None;
        }
        self.ranges
            .iter()
            .find(|(start, bytes, _)| gpa >= *start && gpa - start < *bytes)
            .map(|(start, _, first)| {
                let page = first + (gpa - start) / PAGE_BYTES;
                ((page / 64) as usize, 1u64 << (page % 64))
            })
    }

    /// Adds the page at `gpa`; whether it is new (false too when it is not a
    /// page of RAM: see [`PageSet::covers`]).
    pub fn insert(&self, gpa: u64) -> bool {
        let Some((word, bit)) = self.index(gpa) else {
            return false;
        };
        let new = self.bits[word].fetch_or(bit, Ordering::AcqRel) & bit == 0;
        if new {
            self.len.fetch_add(1, Ordering::AcqRel);
        }
        new
    }

    /// Takes the page at `gpa` out; whether it was in.
    pub fn remove(&self, gpa: u64) -> bool {
        let Some((word, bit)) = self.index(gpa) else {
            return false;
        };
        let was = self.bits[word].fetch_and(!bit, Ordering::AcqRel) & bit != 0;
        if was {
            self.len.fetch_sub(1, Ordering::AcqRel);
        }
        was
    }

    pub fn contains(&self, gpa: u64) -> bool {
        self.index(gpa)
            .is_some_and(|(word, bit)| self.bits[word].load(Ordering::Acquire) & bit != 0)
    }

    /// Whether `gpa` is a page of RAM.
    pub fn covers(&self, gpa: u64) -> bool {
        self.index(gpa).is_some()
    }

    pub fn len(&self) -> usize {
        self.len.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The pages in the set as runs of contiguous pages: (first address, pages).
    pub fn runs(&self) -> Vec<(u64, u64)> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for &(start, bytes, first) in &self.ranges {
            for i in 0..bytes / PAGE_BYTES {
                let page = first + i;
                let word = self.bits[(page / 64) as usize].load(Ordering::Acquire);
                if word & (1 << (page % 64)) == 0 {
                    continue;
                }
                let gpa = start + i * PAGE_BYTES;
                match runs.last_mut() {
                    Some((at, n)) if *at + *n * PAGE_BYTES == gpa => *n += 1,
                    _ => runs.push((gpa, 1)),
                }
            }
        }
        runs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_go_in_and_out_once_and_only_inside_ram() {
        let set = PageSet::new(&[
            MemoryRange {
                guest_address: 0,
                bytes: 16 * PAGE_BYTES,
            },
            MemoryRange {
                guest_address: 1 << 32,
                bytes: 70 * PAGE_BYTES,
            },
        ]);
        assert!(set.insert(0) && set.insert(PAGE_BYTES) && set.insert(1 << 32));
        assert!(set.insert((1 << 32) + 69 * PAGE_BYTES));
        assert!(!set.insert(PAGE_BYTES), "twice is once");
        assert!(!set.insert(16 * PAGE_BYTES), "between the ranges");
        assert!(!set.insert(100), "not a page boundary");
        assert_eq!(set.len(), 4);
        assert_eq!(
            set.runs(),
            vec![(0, 2), (1 << 32, 1), ((1 << 32) + 69 * PAGE_BYTES, 1)]
        );
        assert!(set.remove(0) && !set.remove(0));
        assert!(!set.contains(0) && set.contains(PAGE_BYTES));
        assert_eq!(set.len(), 3);
    }
}
