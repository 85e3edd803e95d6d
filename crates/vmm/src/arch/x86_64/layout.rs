//! Where things live in an x86_64 guest's physical address space.
//!
//! ```text
//! 0x0000_0500  GDT for the boot entry (then an empty IDT)
//! 0x0000_6000  PVH hvm_start_info, module list; 0x7000 memory map / zero page
//! 0x0000_8ff0  boot stack top (64-bit Linux entry)
//! 0x0000_9000  identity page tables (PML4, PDPT, 4 PDs) for the 64-bit entry
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  EBDA: RAM below it, reserved above up to 1 MiB
//! 0x000e_0000  ACPI tables (RSDP first, where legacy scans find it)
//! 0x0010_0000  kernel (ELF physical addresses or bzImage protected-mode code)
//! ...          RAM, initrd at the top of low RAM
//! 0xc000_0000  32-bit MMIO hole: PCI BARs (with --enable-pci) to 0xd000_0000,
//!              virtio-mmio from 0xd000_0000, PCI ECAM at 0xe000_0000 (1 MiB),
//!              IOAPIC 0xfec0_0000, LAPIC 0xfee0_0000
//! 0x1_0000_0000 RAM above 4 GiB
//! ```

use vm_memory::GuestAddress;

/// GDT used by the boot entry.
pub const BOOT_GDT_START: GuestAddress = GuestAddress(0x500);
/// Empty IDT the boot entry runs with.
pub const BOOT_IDT_START: GuestAddress = GuestAddress(0x520);
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: GuestAddress = GuestAddress(0x6000);
/// PVH module list (the initrd).
pub const MODLIST_START: GuestAddress = GuestAddress(0x6040);
/// PVH memory map.
pub const MEMMAP_START: GuestAddress = GuestAddress(0x7000);
/// Linux zero page (`boot_params`).
pub const ZERO_PAGE_START: GuestAddress = GuestAddress(0x7000);
/// Initial stack pointer for the 64-bit Linux entry.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapping page tables for the 64-bit Linux entry.
pub const PML4_START: GuestAddress = GuestAddress(0x9000);
/// Kernel command line.
pub const CMDLINE_START: GuestAddress = GuestAddress(0x20000);
/// Longest command line Vigil writes (Linux's x86 `COMMAND_LINE_SIZE`).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the Extended BIOS Data Area: RAM ends here below 1 MiB.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables.
pub const ACPI_START: GuestAddress = GuestAddress(0xe0000);
/// End of the ACPI table area.
pub const ACPI_END: u64 = 0x100000;
/// Start of high memory: kernels load here.
pub const HIMEM_START: GuestAddress = GuestAddress(0x100000);
/// Start of the 32-bit MMIO hole.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End of the 32-bit MMIO hole (4 GiB).
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// Where PCI functions' BARs are placed (with `--enable-pci`), declared as the
/// root bridge's memory window in the DSDT.
pub const PCI_MMIO_START: u64 = MMIO_HOLE_START;
/// Length of the PCI BAR window (up to the virtio-mmio windows).
pub const PCI_MMIO_SIZE: u64 = 0x1000_0000;
/// PCI ECAM (enhanced configuration access) window of bus 0, in the MCFG.
pub const PCI_ECAM_START: u64 = 0xe000_0000;
/// I/O APIC base address.
pub const IOAPIC_START: u32 = 0xfec0_0000;
/// Local APIC base address.
pub const APIC_START: u32 = 0xfee0_0000;
/// KVM's TSS region (three pages) for Intel VMX.
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
/// KVM's identity-map page for real mode on Intel VMX (the page before the TSS).
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

/// Guest RAM ranges for `size` bytes of memory, split around the MMIO hole.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, usize)> {
    if size <= MMIO_HOLE_START {
        vec![(GuestAddress(0), size as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO_HOLE_START as usize),
            (
                GuestAddress(MMIO_HOLE_END),
                (size - MMIO_HOLE_START) as usize,
            ),
        ]
    }
}

/// The type of an e820 / PVH memory map entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum E820Type {
    /// Usable RAM.
    Ram = 1,
    /// Reserved.
    Reserved = 2,
}

/// One entry of the guest's physical memory map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// First address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// What the range holds.
    pub kind: E820Type,
}

/// The memory map the guest sees for `size` bytes of RAM: usable RAM below the
/// EBDA, the BIOS area reserved (it holds the ACPI tables), RAM from 1 MiB, and
/// RAM above 4 GiB when memory does not fit below the MMIO hole.
pub fn e820_map(size: u64) -> Vec<E820Entry> {
    let low_end = size.min(MMIO_HOLE_START);
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820Type::Ram,
        },
        E820Entry {
            addr: EBDA_START,
            size: HIMEM_START.0 - EBDA_START,
            kind: E820Type::Reserved,
        },
    ];
    if low_end > HIMEM_START.0 {
        map.push(E820Entry {
            addr: HIMEM_START.0,
            size: low_end - HIMEM_START.0,
            kind: E820Type::Ram,
        });
    }
    if size > MMIO_HOLE_START {
        map.push(E820Entry {
            addr: MMIO_HOLE_END,
            size: size - MMIO_HOLE_START,
            kind: E820Type::Ram,
        });
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn small_memory_is_one_range_below_the_hole() {
        assert_eq!(
            ram_ranges(128 * MIB),
            vec![(GuestAddress(0), (128 * MIB) as usize)]
        );
        let map = e820_map(128 * MIB);
        assert_eq!(map.len(), 3);
        assert_eq!(
            map[0],
            E820Entry {
                addr: 0,
                size: 0x9fc00,
                kind: E820Type::Ram
            }
        );
        assert_eq!(map[1].kind, E820Type::Reserved);
        assert_eq!(
            map[2],
            E820Entry {
                addr: MIB,
                size: 127 * MIB,
                kind: E820Type::Ram
            }
        );
    }

    #[test]
    fn large_memory_skips_the_mmio_hole() {
        let size = 4096 * MIB;
        let ranges = ram_ranges(size);
        assert_eq!(ranges[0], (GuestAddress(0), MMIO_HOLE_START as usize));
        assert_eq!(ranges[1], (GuestAddress(1 << 32), (1024 * MIB) as usize));
        let map = e820_map(size);
        let ram: u64 = map
            .iter()
            .filter(|e| e.kind == E820Type::Ram)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, size - (MIB - 0x9fc00));
        assert_eq!(map.last().unwrap().addr, 1 << 32);
        // No RAM entry overlaps the hole.
        assert!(map
            .iter()
            .all(|e| e.addr + e.size <= MMIO_HOLE_START || e.addr >= MMIO_HOLE_END));
    }
}
