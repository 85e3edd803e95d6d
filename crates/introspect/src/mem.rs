//! Guest-physical memory as introspection sees it.

use vigil_vmm::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};

/// A guest-physical range that is not (wholly) guest RAM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("guest-physical {paddr:#x} (+{len} bytes) is outside guest RAM")]
pub struct PhysReadError {
    /// The first guest-physical address asked for.
    pub paddr: u64,
    /// How many bytes were asked for.
    pub len: usize,
}

/// Reads guest RAM by guest-physical address. This is how the VMM lends the
/// guest's memory to introspection (its [`GuestMemoryMmap`], from
/// `VmInspect::guest_memory`).
pub trait GuestPhysMemory {
    /// Fills `buf` from guest-physical `paddr`; the whole range must be RAM.
    fn read_phys(&self, paddr: u64, buf: &mut [u8]) -> Result<(), PhysReadError>;

    /// Reads a little-endian `u64` at `paddr`.
    fn read_u64(&self, paddr: u64) -> Result<u64, PhysReadError> {
        let mut b = [0u8; 8];
        self.read_phys(paddr, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }
}

impl GuestPhysMemory for GuestMemoryMmap {
    fn read_phys(&self, paddr: u64, buf: &mut [u8]) -> Result<(), PhysReadError> {
        let err = PhysReadError {
            paddr,
            len: buf.len(),
        };
        if buf.is_empty() {
            return Ok(());
        }
        // A range that wraps the address space is never RAM.
        paddr.checked_add(buf.len() as u64 - 1).ok_or(err)?;
        self.read_slice(buf, GuestAddress(paddr)).map_err(|_| err)
    }
}

impl<T: GuestPhysMemory + ?Sized> GuestPhysMemory for &T {
    fn read_phys(&self, paddr: u64, buf: &mut [u8]) -> Result<(), PhysReadError> {
        (**self).read_phys(paddr, buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_inside_and_refuses_outside_ram() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        mem.write_slice(&[1, 2, 3, 4], GuestAddress(0x100)).unwrap();
        let mut buf = [0u8; 4];
        mem.read_phys(0x100, &mut buf).unwrap();
        assert_eq!(buf, [1, 2, 3, 4]);
        let e = mem.read_phys(0x10000, &mut buf).unwrap_err();
        assert_eq!(
            e,
            PhysReadError {
                paddr: 0x10000,
                len: 4
            }
        );
        assert!(e.to_string().contains("0x10000"), "{e}");
        // Straddling the end of RAM is outside too.
        assert!(mem.read_phys(0xfffe, &mut buf).is_err());
        assert!(mem.read_phys(u64::MAX - 1, &mut buf).is_err());
        assert!(mem.read_phys(u64::MAX, &mut []).is_ok());
    }
}
