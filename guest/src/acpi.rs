//! CPU discovery from the ACPI MADT (RSDP -> XSDT or RSDT -> "APIC"), and the
//! FADT's sleep control register for ACPI power-off, the MCFG's PCI ECAM window.

use crate::{apic, paging};

pub const MAX_CPUS: usize = 64;

/// The enabled CPUs by local APIC id, in MADT order.
pub struct Cpus {
    ids: [u32; MAX_CPUS],
    count: usize,
}

impl Cpus {
    pub fn ids(&self) -> &[u32] {
        &self.ids[..self.count]
    }

    fn push(&mut self, id: u32) {
        if self.count < MAX_CPUS {
            self.ids[self.count] = id;
            self.count += 1;
        }
    }
}

fn read<T: Copy>(addr: u64) -> T {
    // SAFETY: ACPI tables are readable memory; callers map the address first.
    unsafe { core::ptr::read_unaligned(addr as *const T) }
}

fn checksum_ok(addr: u64, len: u64) -> bool {
    (0..len).fold(0u8, |sum, i| sum.wrapping_add(read(addr + i))) == 0
}

/// Legacy search: the RSDP sits on a 16-byte boundary in 0xe0000..0x100000.
fn scan_rsdp() -> u64 {
    (0xe_0000..0x10_0000u64)
        .step_by(16)
        .find(|&addr| read::<[u8; 8]>(addr) == *b"RSD PTR " && checksum_ok(addr, 20))
        .unwrap_or(0)
}

/// The MADT's enabled CPUs; just the BSP when there is no ACPI or no MADT.
pub fn discover(rsdp: u64) -> Cpus {
    let mut cpus = Cpus {
        ids: [0; MAX_CPUS],
        count: 0,
    };
    if let Some(madt) = find_madt(rsdp) {
        let len: u32 = read(madt + 4);
        let end = madt + u64::from(len);
        let mut entry = madt + 44;
        while entry + 2 <= end {
            let kind: u8 = read(entry);
            let entry_len: u8 = read(entry + 1);
            if entry_len < 2 {
                break;
            }
            match kind {
                0 if read::<u32>(entry + 4) & 1 != 0 => cpus.push(u32::from(read::<u8>(entry + 3))),
                9 if read::<u32>(entry + 8) & 1 != 0 => cpus.push(read(entry + 4)),
                _ => {}
            }
            entry += u64::from(entry_len);
        }
    }
    if cpus.count == 0 {
        cpus.push(apic::id());
    }
    cpus
}

/// The I/O port of the FADT's sleep control register (hardware-reduced ACPI), if
/// the FADT has one in I/O space.
pub fn sleep_control_port(rsdp: u64) -> Option<u16> {
    let fadt = find_table(rsdp, *b"FACP")?;
    let len: u32 = read(fadt + 4);
    // SLEEP_CONTROL_REG is a generic address structure at offset 244 (FADT 5.0+).
    if len < 256 || read::<u8>(fadt + 244) != 1 {
        return None;
    }
    u16::try_from(read::<u64>(fadt + 248)).ok()
}

/// The ECAM window of PCI segment 0, bus 0, from the MCFG.
pub fn ecam_base(rsdp: u64) -> Option<u64> {
    let mcfg = find_table(rsdp, *b"MCFG")?;
    let len: u32 = read(mcfg + 4);
    // Entries of 16 bytes from offset 44: base, segment, first and last bus.
    (0..(u64::from(len).saturating_sub(44)) / 16)
        .map(|i| mcfg + 44 + 16 * i)
        .find(|&e| read::<u16>(e + 8) == 0 && read::<u8>(e + 10) == 0)
        .map(|e| read::<u64>(e))
}

fn find_madt(rsdp: u64) -> Option<u64> {
    find_table(rsdp, *b"APIC")
}

fn find_table(rsdp: u64, signature: [u8; 4]) -> Option<u64> {
    let rsdp = if rsdp != 0 { rsdp } else { scan_rsdp() };
    if rsdp == 0 || !paging::map(rsdp) || read::<[u8; 8]>(rsdp) != *b"RSD PTR " {
        return None;
    }
    let revision: u8 = read(rsdp + 15);
    let (root, entry_size) = if revision >= 2 {
        (read::<u64>(rsdp + 24), 8)
    } else {
        (u64::from(read::<u32>(rsdp + 16)), 4)
    };
    if root == 0 || !paging::map(root) {
        return None;
    }
    let len: u32 = read(root + 4);
    let entries = (u64::from(len).saturating_sub(36)) / entry_size;
    (0..entries)
        .map(|i| {
            let at = root + 36 + i * entry_size;
            if entry_size == 8 {
                read::<u64>(at)
            } else {
                u64::from(read::<u32>(at))
            }
        })
        .find(|&table| table != 0 && paging::map(table) && read::<[u8; 4]>(table) == signature)
}
