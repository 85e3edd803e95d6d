//! The one owner of a VM's dirty log, and its readers.

use std::sync::{Arc, Mutex, MutexGuard};

use vm_memory::{GuestMemoryBackend, MmapRegion};

use super::{DirtyLog, DirtyLogError};
use crate::GuestMemoryMmap;

/// Where the guest's own writes are logged, per RAM slot (KVM's dirty log; a fake
/// in the tests below).
pub(crate) trait GuestWriteLog: Send + Sync {
    /// Turns logging on or off for every RAM slot.
    fn set_logging(&self, on: bool) -> Result<(), DirtyLogError>;
    /// Slot `slot`'s pages written since the previous fetch (one bit per page, in
    /// [`DirtyLog`]'s layout), clearing them.
    fn fetch(&self, slot: usize) -> Result<Vec<u64>, DirtyLogError>;
}

/// The owner of a VM's dirty log: it alone fetches (and so resets) KVM's log and
/// the memory's dirty bitmap, and hands the pages to every [`DirtyReader`]. Cheap
/// to clone; every clone is the same owner.
#[derive(Clone)]
pub struct DirtyTracker(Arc<Owner>);

struct Owner {
    mem: GuestMemoryMmap,
    guest: Box<dyn GuestWriteLog>,
    readers: Mutex<Readers>,
}

#[derive(Default)]
struct Readers {
    next_id: u64,
    /// Per reader (by id), the pages written since its last take.
    pending: Vec<(u64, DirtyLog)>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl DirtyTracker {
    /// The owner of `mem`'s dirty log, the guest's writes logged by `guest`.
    pub(crate) fn new(mem: GuestMemoryMmap, guest: Box<dyn GuestWriteLog>) -> Self {
        Self(Arc::new(Owner {
            mem,
            guest,
            readers: Mutex::default(),
        }))
    }

    /// The owner of the dirty log of `mem` that no vCPU maps: only the VMM's own
    /// writes (through vm-memory) are logged. For the pager's tests and
    /// `vigil bench memory`.
    pub fn for_memory(mem: GuestMemoryMmap) -> Self {
        struct NoGuest;
        impl GuestWriteLog for NoGuest {
            fn set_logging(&self, _on: bool) -> Result<(), DirtyLogError> {
                Ok(())
            }
            fn fetch(&self, _slot: usize) -> Result<Vec<u64>, DirtyLogError> {
                Ok(Vec::new())
            }
        }
        Self::new(mem, Box::new(NoGuest))
    }

    /// A new reader, whose first [`DirtyReader::take`] counts every page as dirty
    /// (nothing is known of what was written before it came). The first reader
    /// turns KVM's logging on.
    pub fn subscribe(&self) -> Result<DirtyReader, DirtyLogError> {
        let mut readers = lock(&self.0.readers);
        if readers.pending.is_empty() {
            self.0.guest.set_logging(true)?;
        }
        let id = readers.next_id;
        readers.next_id += 1;
        readers.pending.push((id, DirtyLog::all(&self.0.mem)));
        Ok(DirtyReader {
            owner: self.0.clone(),
            id,
        })
    }

    /// How many readers there are: KVM logs the guest's writes while there is one.
    pub fn readers(&self) -> usize {
        lock(&self.0.readers).pending.len()
    }
}

impl Owner {
    /// Adds what was written since the previous fetch to every reader's pages:
    /// the memory's dirty bitmap (the VMM's writes) and KVM's log (the guest's),
    /// each reset as it is read. Slot by slot, the bitmap first: what is read
    /// before an error is kept for the readers, not lost.
    fn collect(&self, readers: &mut Readers) -> Result<(), DirtyLogError> {
        for (slot, region) in self.mem.iter().enumerate() {
            // The region's own bitmap (`MmapRegion::bitmap`), not a slice of it.
            let by_vmm = MmapRegion::bitmap(region).get_and_reset();
            add(readers, slot, &by_vmm);
            let by_guest = self.guest.fetch(slot)?;
            add(readers, slot, &by_guest);
        }
        Ok(())
    }
}

fn add(readers: &mut Readers, slot: usize, bits: &[u64]) {
    if bits.iter().any(|&w| w != 0) {
        for (_, log) in readers.pending.iter_mut() {
            log.add(slot, bits);
        }
    }
}

/// One user of the dirty log (the integrity monitor; snapshots and migration
/// later). Dropping it unsubscribes; the last reader dropped turns KVM's logging
/// off.
pub struct DirtyReader {
    owner: Arc<Owner>,
    id: u64,
}

impl DirtyReader {
    /// The pages written, by the guest or by the VMM, since this reader's previous
    /// `take` (every page at its first), whatever other readers took meanwhile.
    /// On an error the pages stay for the next `take`.
    pub fn take(&self) -> Result<DirtyLog, DirtyLogError> {
        let mut readers = lock(&self.owner.readers);
        self.owner.collect(&mut readers)?;
        let mut log = DirtyLog::empty(&self.owner.mem);
        if let Some((_, mine)) = readers.pending.iter_mut().find(|(id, _)| *id == self.id) {
            std::mem::swap(mine, &mut log);
        }
        Ok(log)
    }
}

impl Drop for DirtyReader {
    fn drop(&mut self) {
        let mut readers = lock(&self.owner.readers);
        readers.pending.retain(|(id, _)| *id != self.id);
        if readers.pending.is_empty() {
            match self.owner.guest.set_logging(false) {
                // A VM that ended took its log with it.
                Ok(()) | Err(DirtyLogError::VmEnded) => {}
                Err(e) => tracing::warn!("cannot turn the dirty log off: {e}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use vm_memory::{Bytes, GuestAddress};

    /// KVM's log as the tests write it: per slot, the pages the "guest" wrote.
    #[derive(Default)]
    struct FakeGuest {
        calls: Mutex<Vec<bool>>,
        written: Mutex<Vec<Vec<u64>>>,
        fail_next: AtomicBool,
    }

    impl FakeGuest {
        fn write(&self, slot: usize, page: u64) {
            let mut written = lock(&self.written);
            if written.len() <= slot {
                written.resize(slot + 1, Vec::new());
            }
            let bits = &mut written[slot];
            bits.resize(bits.len().max(1), 0);
            bits[0] |= 1 << page;
        }
    }

    impl GuestWriteLog for Arc<FakeGuest> {
        fn set_logging(&self, on: bool) -> Result<(), DirtyLogError> {
            lock(&self.calls).push(on);
            Ok(())
        }

        fn fetch(&self, slot: usize) -> Result<Vec<u64>, DirtyLogError> {
            if self.fail_next.swap(false, Ordering::SeqCst) {
                return Err(DirtyLogError::VmEnded);
            }
            Ok(lock(&self.written)
                .get_mut(slot)
                .map(std::mem::take)
                .unwrap_or_default())
        }
    }

    /// Two regions of 64 pages: 0..0x40000 (slot 0) and 0x100000.. (slot 1).
    fn tracker() -> (DirtyTracker, Arc<FakeGuest>, GuestMemoryMmap) {
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x40000),
            (GuestAddress(0x10_0000), 0x40000),
        ])
        .unwrap();
        let guest = Arc::new(FakeGuest::default());
        let tracker = DirtyTracker::new(mem.clone(), Box::new(guest.clone()));
        (tracker, guest, mem)
    }

    fn pages(log: &DirtyLog) -> Vec<u64> {
        log.dirty_pages().collect()
    }

    /// A write by the VMM: through vm-memory, which marks the bitmap.
    fn vmm_write(mem: &GuestMemoryMmap, gpa: u64) {
        mem.write_obj(0xa5u8, GuestAddress(gpa)).unwrap();
    }

    #[test]
    fn two_readers_each_get_every_write_since_their_own_take() {
        let (tracker, guest, mem) = tracker();
        assert_eq!(tracker.readers(), 0);
        let a = tracker.subscribe().unwrap();
        assert_eq!(
            *lock(&guest.calls),
            [true],
            "the first reader turns logging on"
        );
        assert!(a.take().unwrap().is_all());

        guest.write(0, 1);
        vmm_write(&mem, 0x3000);
        let b = tracker.subscribe().unwrap();
        assert_eq!(*lock(&guest.calls), [true], "already on");
        assert_eq!(tracker.readers(), 2);
        // b knows nothing of before: all. Its take does not take a's pages.
        assert!(b.take().unwrap().is_all());
        assert_eq!(pages(&a.take().unwrap()), [0x1000, 0x3000]);

        guest.write(1, 5);
        vmm_write(&mem, 0x10_7000);
        assert_eq!(pages(&b.take().unwrap()), [0x10_5000, 0x10_7000]);
        guest.write(0, 9);
        // a did not take since: it gets both rounds; b only what came after its take.
        assert_eq!(pages(&a.take().unwrap()), [0x9000, 0x10_5000, 0x10_7000]);
        assert_eq!(pages(&b.take().unwrap()), [0x9000]);
        assert_eq!(a.take().unwrap().count(), 0);
        assert_eq!(b.take().unwrap().count(), 0);

        drop(a);
        assert_eq!(*lock(&guest.calls), [true], "b still reads");
        vmm_write(&mem, 0x2000);
        assert_eq!(pages(&b.take().unwrap()), [0x2000]);
        drop(b);
        assert_eq!(
            *lock(&guest.calls),
            [true, false],
            "the last reader turns it off"
        );
        assert_eq!(tracker.readers(), 0);

        let c = tracker.subscribe().unwrap();
        assert_eq!(*lock(&guest.calls), [true, false, true]);
        assert!(c.take().unwrap().is_all());
        assert!(!c.take().unwrap().is_all());
    }

    #[test]
    fn pages_read_before_a_failed_fetch_are_kept() {
        let (tracker, guest, mem) = tracker();
        let a = tracker.subscribe().unwrap();
        a.take().unwrap();
        vmm_write(&mem, 0x4000);
        guest.write(0, 6);
        guest.fail_next.store(true, Ordering::SeqCst);
        assert!(matches!(a.take(), Err(DirtyLogError::VmEnded)));
        // The bitmap was reset by the failed take, but its pages were kept, and
        // KVM's log, not read, still holds the guest's.
        assert_eq!(pages(&a.take().unwrap()), [0x4000, 0x6000]);
    }
}
