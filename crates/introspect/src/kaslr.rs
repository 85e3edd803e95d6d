//! The KASLR slide of a running Linux kernel: where it is against where its
//! `System.map` says it was linked, from LSTAR or from the IDT.

use vigil_vmm::symbols::SymbolTable;

use crate::mem::GuestPhysMemory;
use crate::paging::{read_virt, WalkError};

/// The x86-64 kernel is placed at a multiple of this (`CONFIG_PHYSICAL_ALIGN`'s
/// usual value, and the granularity of the virtual slide).
pub const KASLR_ALIGN: u64 = 2 << 20;

/// The slide from the syscall entry point: `observed_lstar` (the guest's
/// `MSR_LSTAR`) minus `entry_SYSCALL_64` in `map`. `None` when the map lacks
/// the symbol or the difference is not a multiple of [`KASLR_ALIGN`] (so LSTAR
/// does not point at that entry, or the map is of another kernel).
pub fn kaslr_slide(map: &SymbolTable, observed_lstar: u64) -> Option<i64> {
    slide_against(map, "entry_SYSCALL_64", observed_lstar)
}

/// The slide from IDT gate `vector` whose handler is at `handler`, against the
/// `asm_exc_*` symbol Linux installs for it (see [`exception_handler_symbol`]).
/// `None` for vectors without one, a symbol missing from `map`, or a slide that
/// is not a multiple of [`KASLR_ALIGN`].
pub fn kaslr_slide_from_idt(map: &SymbolTable, vector: u8, handler: u64) -> Option<i64> {
    slide_against(map, exception_handler_symbol(vector)?, handler)
}

fn slide_against(map: &SymbolTable, name: &str, observed: u64) -> Option<i64> {
    let linked = map.address_of(name)?;
    let slide = observed.wrapping_sub(linked) as i64;
    (slide.rem_euclid(KASLR_ALIGN as i64) == 0).then_some(slide)
}

/// The entry point Linux (x86-64, 5.8 and later) puts in IDT gate `vector`
/// for the architectural exceptions.
pub fn exception_handler_symbol(vector: u8) -> Option<&'static str> {
    Some(match vector {
        0 => "asm_exc_divide_error",
        1 => "asm_exc_debug",
        2 => "asm_exc_nmi",
        3 => "asm_exc_int3",
        4 => "asm_exc_overflow",
        5 => "asm_exc_bounds",
        6 => "asm_exc_invalid_op",
        7 => "asm_exc_device_not_available",
        8 => "asm_exc_double_fault",
        9 => "asm_exc_coproc_segment_overrun",
        10 => "asm_exc_invalid_tss",
        11 => "asm_exc_segment_not_present",
        12 => "asm_exc_stack_segment",
        13 => "asm_exc_general_protection",
        14 => "asm_exc_page_fault",
        15 => "asm_exc_spurious_interrupt_bug",
        16 => "asm_exc_coprocessor_error",
        17 => "asm_exc_alignment_check",
        18 => "asm_exc_machine_check",
        19 => "asm_exc_simd_coprocessor_error",
        21 => "asm_exc_control_protection",
        _ => return None,
    })
}

/// A 64-bit IDT gate descriptor, decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdtGate {
    /// The handler's address (offset bits 0..15, 16..31 and 32..63 joined).
    pub handler: u64,
    /// The code segment selector.
    pub selector: u16,
    /// The interrupt stack table index (0: none).
    pub ist: u8,
    /// The gate type: 0xe interrupt gate, 0xf trap gate.
    pub gate_type: u8,
    /// The privilege level needed to reach it with `int n`.
    pub dpl: u8,
    /// The present bit.
    pub present: bool,
}

/// Decodes a 16-byte IDT gate descriptor (as it lies in guest memory).
pub fn decode_idt_gate(raw: &[u8; 16]) -> IdtGate {
    let u16_at = |i: usize| u16::from_le_bytes([raw[i], raw[i + 1]]);
    let high = u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]);
    let attr = raw[5];
    IdtGate {
        handler: u64::from(u16_at(0)) | u64::from(u16_at(6)) << 16 | u64::from(high) << 32,
        selector: u16_at(2),
        ist: raw[4] & 0x7,
        gate_type: attr & 0xf,
        dpl: (attr >> 5) & 0x3,
        present: attr & 0x80 != 0,
    }
}

/// Reads and decodes gate `vector` of the IDT at guest-virtual `idt_base` (the
/// IDTR base), through the page tables at `cr3`.
pub fn read_idt_gate<M: GuestPhysMemory + ?Sized>(
    mem: &M,
    cr3: u64,
    cr4_la57: bool,
    idt_base: u64,
    vector: u8,
) -> Result<IdtGate, WalkError> {
    let mut raw = [0u8; 16];
    let addr = idt_base.wrapping_add(u64::from(vector) * 16);
    read_virt(mem, cr3, cr4_la57, addr, &mut raw)?;
    Ok(decode_idt_gate(&raw))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::paging::tests::Tables;
    use std::path::PathBuf;
    use vm_memory::{Bytes, GuestAddress};

    const MAP: &str = "\
ffffffff81000000 T _text
ffffffff81400040 T entry_SYSCALL_64
ffffffff814008b0 T asm_exc_divide_error
ffffffff81400b00 T asm_exc_page_fault
ffffffff81801040 D sys_call_table
";

    /// Encodes a gate the way Linux's `idt_init_desc` does.
    pub(crate) fn gate(handler: u64, selector: u16, ist: u8, attr: u8) -> [u8; 16] {
        let mut g = [0u8; 16];
        g[0..2].copy_from_slice(&(handler as u16).to_le_bytes());
        g[2..4].copy_from_slice(&selector.to_le_bytes());
        g[4] = ist;
        g[5] = attr;
        g[6..8].copy_from_slice(&((handler >> 16) as u16).to_le_bytes());
        g[8..12].copy_from_slice(&((handler >> 32) as u32).to_le_bytes());
        g
    }

    #[test]
    fn decodes_idt_gates() {
        let g = decode_idt_gate(&gate(0xffff_ffff_9b40_0b00, 0x10, 0, 0x8e));
        assert_eq!(
            g,
            IdtGate {
                handler: 0xffff_ffff_9b40_0b00,
                selector: 0x10,
                ist: 0,
                gate_type: 0xe,
                dpl: 0,
                present: true,
            }
        );
        // A user-callable trap gate on IST stack 3 (reserved IST bits ignored).
        let g = decode_idt_gate(&gate(0x1234_5678_9abc_def0, 0x33, 0xf8 | 3, 0xef));
        assert_eq!((g.ist, g.gate_type, g.dpl, g.present), (3, 0xf, 3, true));
        assert_eq!(g.handler, 0x1234_5678_9abc_def0);
        assert!(!decode_idt_gate(&[0; 16]).present);
    }

    #[test]
    fn slide_from_lstar() {
        let map = SymbolTable::parse(MAP).unwrap();
        assert_eq!(kaslr_slide(&map, 0xffff_ffff_8140_0040), Some(0));
        assert_eq!(
            kaslr_slide(&map, 0xffff_ffff_8140_0040 + 0x1a00_0000),
            Some(0x1a00_0000)
        );
        // A negative slide (a map linked higher than the kernel runs).
        assert_eq!(kaslr_slide(&map, 0xffff_ffff_8100_0040), Some(-0x40_0000));
        // Not a multiple of 2 MiB: LSTAR is not at entry_SYSCALL_64.
        assert_eq!(kaslr_slide(&map, 0xffff_ffff_8140_0040 + 0x1000), None);
        assert_eq!(kaslr_slide(&map, 0xffff_ffff_8140_0041 + 0x20_0000), None);
        assert_eq!(
            kaslr_slide(&SymbolTable::default(), 0xffff_ffff_8140_0040),
            None
        );
    }

    #[test]
    fn slide_from_idt() {
        let map = SymbolTable::parse(MAP).unwrap();
        let slide = 0x3e00_0000;
        assert_eq!(
            kaslr_slide_from_idt(&map, 14, 0xffff_ffff_8140_0b00 + slide),
            Some(slide as i64)
        );
        assert_eq!(
            kaslr_slide_from_idt(&map, 0, 0xffff_ffff_8140_08b0 + slide),
            Some(slide as i64)
        );
        // Vector 0's handler in vector 14's place does not give a slide.
        assert_eq!(
            kaslr_slide_from_idt(&map, 14, 0xffff_ffff_8140_08b0 + slide),
            None
        );
        // No symbol in the map, or no exception at that vector.
        assert_eq!(kaslr_slide_from_idt(&map, 13, 0xffff_ffff_8140_0a40), None);
        assert_eq!(kaslr_slide_from_idt(&map, 32, 0xffff_ffff_8140_0a40), None);
    }

    #[test]
    fn reads_idt_gates_through_page_tables() {
        let mut t = Tables::new(false);
        // The IDT in a page of its own, as Linux maps it (read-only, at a fixed address).
        let idt = 0xffff_fe00_0000_0000;
        t.map(idt, 0x80_0000, 0x1000, 0);
        let slide = 0x2400_0000u64;
        let pf = 0xffff_ffff_8140_0b00 + slide;
        t.mem
            .write_slice(&gate(pf, 0x10, 0, 0x8e), GuestAddress(0x80_0000 + 14 * 16))
            .unwrap();
        let g = read_idt_gate(&t.mem, t.root, false, idt, 14).unwrap();
        assert_eq!(g.handler, pf);
        let map = SymbolTable::parse(MAP).unwrap();
        assert_eq!(
            kaslr_slide_from_idt(&map, 14, g.handler),
            Some(slide as i64)
        );
        // Vector 255 is in the same page; an IDT one page lower is not mapped.
        assert!(read_idt_gate(&t.mem, t.root, false, idt, 255).is_ok());
        assert!(matches!(
            read_idt_gate(&t.mem, t.root, false, idt - 0x1000, 0),
            Err(WalkError::NotPresent { .. })
        ));
    }

    /// `../shared` next to the repository (or `VIGIL_SHARED_DIR`).
    pub(crate) fn tiny_linux_map() -> Option<PathBuf> {
        let shared = std::env::var_os("VIGIL_SHARED_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared"));
        let map = shared.join("guest-kernels/linux-6.1-tiny/System.map");
        if map.is_file() {
            Some(map)
        } else {
            eprintln!("SKIP: {} not found", map.display());
            None
        }
    }

    #[test]
    fn real_system_map() {
        let Some(path) = tiny_linux_map() else {
            return;
        };
        let text = std::fs::read_to_string(&path).unwrap();
        let (map, skipped) = SymbolTable::parse_lenient(&text);
        assert_eq!(skipped, 0, "{}", path.display());
        let syscall = map
            .address_of("entry_SYSCALL_64")
            .expect("entry_SYSCALL_64");
        let pf = map
            .address_of("asm_exc_page_fault")
            .expect("asm_exc_page_fault");
        let table = map.address_of("sys_call_table").expect("sys_call_table");
        assert_eq!(map.lookup(syscall + 4), Some(("entry_SYSCALL_64", 4)));
        assert_eq!(map.lookup(table), Some(("sys_call_table", 0)));
        // Every exception vector whose handler this kernel has.
        let present = (0..32u8)
            .filter(|&v| exception_handler_symbol(v).is_some_and(|s| map.address_of(s).is_some()))
            .count();
        assert!(present >= 15, "{present} asm_exc_* handlers");
        let slide = 0x1e00_0000u64;
        assert_eq!(kaslr_slide(&map, syscall + slide), Some(slide as i64));
        assert_eq!(
            kaslr_slide_from_idt(&map, 14, pf + slide),
            Some(slide as i64)
        );
    }
}
