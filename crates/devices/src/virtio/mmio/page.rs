//! A transport's register window kept in host memory, for KVM to map read-only
//! at the window: the driver's reads then cost a memory access instead of an
//! exit to the VMM, while its writes still exit (a read-only slot turns them
//! into MMIO exits, and KVM's ioeventfds still catch the notifications).
//!
//! virtio-mmio reads have no side effects (virtio 1.1, 4.2.2; unlike
//! virtio-pci's ISR, InterruptStatus is cleared by InterruptACK, not by
//! reading it), so a copy is exact as long as it is current: the transport
//! writes it after every register write the driver makes and every change of
//! its own, and the interrupt status lives in it (see
//! [`Interrupt::in_page`](crate::virtio::Interrupt::in_page)).
//!
//! Measured on this project's nested KVM (`kvm_pvm`): an MMIO read that exits
//! costs ~59 µs from guest CPL3 and ~8.7 µs from CPL0; the same read of a
//! read-only slot costs nothing measurable at CPL3 and ~1.1 µs at CPL0.

use std::sync::atomic::{AtomicU32, Ordering};

use vm_memory::MmapRegion;

use super::MMIO_WINDOW;

/// One 4 KiB window of registers, as 32-bit words the guest reads.
pub struct RegisterPage {
    region: MmapRegion<()>,
}

impl std::fmt::Debug for RegisterPage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RegisterPage")
            .field("host_address", &self.host_address())
            .finish()
    }
}

impl RegisterPage {
    /// A zeroed page of anonymous memory.
    pub fn new() -> std::io::Result<Self> {
        let region = MmapRegion::new(MMIO_WINDOW as usize).map_err(|e| match e {
            vm_memory::mmap::MmapRegionError::Mmap(e) => e,
            other => std::io::Error::other(other.to_string()),
        })?;
        Ok(Self { region })
    }

    /// Where the page is in the VMM's address space (what KVM maps).
    pub fn host_address(&self) -> u64 {
        self.region.as_ptr() as u64
    }

    /// The word at `offset` (a multiple of 4 below the window's size).
    pub(crate) fn word(&self, offset: u64) -> &AtomicU32 {
        assert!(
            offset.is_multiple_of(4) && offset < MMIO_WINDOW,
            "register page offset {offset:#x}"
        );
        // SAFETY: the region is MMIO_WINDOW bytes, page-aligned, and lives as long as
        // `self`; the offset is inside it and 4-aligned. It is only ever accessed as
        // `AtomicU32`s (here, and by the guest through KVM), so no non-atomic access
        // races with these.
        unsafe { AtomicU32::from_ptr(self.region.as_ptr().add(offset as usize).cast()) }
    }

    /// What the guest reads at `offset` (4-aligned), as a 32-bit access.
    pub fn load(&self, offset: u64) -> u32 {
        self.word(offset).load(Ordering::Acquire)
    }

    /// Writes `bytes` at `offset` (4-aligned), little-endian words, zero-padded.
    pub(crate) fn write(&self, offset: u64, bytes: &[u8]) {
        for (i, chunk) in bytes.chunks(4).enumerate() {
            let mut word = [0u8; 4];
            word[..chunk.len()].copy_from_slice(chunk);
            self.word(offset + 4 * i as u64)
                .store(u32::from_le_bytes(word), Ordering::Release);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_little_endian_and_padded() {
        let page = RegisterPage::new().unwrap();
        page.write(0x100, &[1, 2, 3, 4, 5]);
        assert_eq!(page.load(0x100), 0x0403_0201);
        assert_eq!(page.load(0x104), 5);
        // SAFETY: reads one byte of the live mapping.
        let byte = unsafe { *(page.host_address() as *const u8).add(0x102) };
        assert_eq!(byte, 3);
    }

    #[test]
    #[should_panic(expected = "register page offset")]
    fn an_offset_outside_the_window_is_refused() {
        RegisterPage::new().unwrap().word(MMIO_WINDOW);
    }
}
