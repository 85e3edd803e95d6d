//! A small long-mode guest for the integrity monitor's tests: 4 pages of text, 2
//! of read-only data holding an 8-entry syscall table, an IDT and a GDT, and one
//! vCPU pointing at them.

use std::sync::Arc;

use vigil_vmm::symbols::SymbolTable;
use vm_memory::{Bytes, GuestAddress};

use super::{Baseline, Checker, Finding};
use crate::cpu::{CpuState, CR4_SMAP, CR4_SMEP, CR4_UMIP};
use crate::kaslr::tests::gate;
use crate::layout::KernelLayout;
use crate::paging::tests::Tables;

pub(super) const KIB4: u64 = 0x1000;
/// Page-table entry bits for `Tables::map`.
pub(super) const RW: u64 = 1 << 1;
pub(super) const NX: u64 = 1 << 63;

pub(super) const TEXT: u64 = 0xffff_ffff_8100_0000;
pub(super) const TEXT_PA: u64 = 0x80_0000;
pub(super) const TEXT_PAGES: u64 = 4;
pub(super) const RO: u64 = 0xffff_ffff_8180_0000;
pub(super) const RO_PA: u64 = 0x90_0000;
pub(super) const SCT_PA: u64 = RO_PA + 0x40;
pub(super) const IDT: u64 = 0xffff_fe00_0000_0000;
pub(super) const IDT_PA: u64 = 0xa0_0000;
pub(super) const GDT: u64 = IDT + 0x1000;
pub(super) const GDT_PA: u64 = IDT_PA + 0x1000;
pub(super) const IDT_COPY: u64 = IDT + 0x2000;
pub(super) const IDT_COPY_PA: u64 = IDT_PA + 0x2000;
pub(super) const SPARE_PA: u64 = 0xb0_0000;
/// Linux's `modules` list head (mapped by the module tests).
pub(super) const MODULES: u64 = 0xffff_ffff_8200_0000;

pub(super) const PF: u64 = TEXT + 0x100;
pub(super) const SYS_READ: u64 = TEXT + 0x1000;
pub(super) const SYS_WRITE: u64 = TEXT + 0x1100;
pub(super) const SYS_NI: u64 = TEXT + 0x1200;
pub(super) const ENTRY_SYSCALL: u64 = TEXT + 0x2000;
pub(super) const ROOTKIT: u64 = 0xffff_ffff_c000_0000;

pub(super) const MAP: &str = "\
ffffffff81000000 T _stext
ffffffff81000100 T asm_exc_page_fault
ffffffff81001000 T __x64_sys_read
ffffffff81001100 T __x64_sys_write
ffffffff81001200 T __x64_sys_ni_syscall
ffffffff81002000 T entry_SYSCALL_64
ffffffff81004000 T _etext
ffffffff81800000 D __start_rodata
ffffffff81800040 D sys_call_table
ffffffff81800080 d other_rodata
ffffffff81802000 D __end_rodata
ffffffff82000000 D modules
ffffffffc0000000 t rootkit_read
";

pub(super) const GDT_ENTRIES: [u64; 8] = [
    0,
    0x00af_9b00_0000_ffff, // 0x08 kernel code (accessed)
    0x00cf_9300_0000_ffff, // 0x10 kernel data
    0x00cf_f300_0000_ffff, // 0x18 user data
    0x00af_fb00_0000_ffff, // 0x20 user code
    0x0000_8b00_0000_0067, // 0x28 TSS (busy), low half
    0x0000_0000_ffff_fe00, // 0x28 TSS, high half
    0x00cf_9a00_0000_ffff, // 0x38 32-bit code
];

/// A small long-mode guest: 4 pages of text, 2 of read-only data holding an
/// 8-entry syscall table, an IDT and a GDT, and one vCPU pointing at them.
pub(super) struct Guest {
    pub(super) t: Tables,
    pub(super) cpu: CpuState,
}

impl Guest {
    pub(super) fn new() -> Self {
        let mut t = Tables::new(false);
        for i in 0..TEXT_PAGES {
            t.map(TEXT + i * KIB4, TEXT_PA + i * KIB4, KIB4, 0);
        }
        for i in 0..2 {
            t.map(RO + i * KIB4, RO_PA + i * KIB4, KIB4, NX);
        }
        t.map(IDT, IDT_PA, KIB4, NX);
        t.map(GDT, GDT_PA, KIB4, NX);
        t.map(IDT_COPY, IDT_COPY_PA, KIB4, NX);
        let text: Vec<u8> = (0..TEXT_PAGES * KIB4).map(|i| (i * 7 + 3) as u8).collect();
        t.mem.write_slice(&text, GuestAddress(TEXT_PA)).unwrap();
        let ro: Vec<u8> = (0..2 * KIB4).map(|i| (i * 13 + 1) as u8).collect();
        t.mem.write_slice(&ro, GuestAddress(RO_PA)).unwrap();
        let mut g = Self {
            t,
            cpu: CpuState {
                vcpu: 0,
                cr0: 0x8005_0033,
                cr3: 0,
                cr4: CR4_SMEP | CR4_SMAP | CR4_UMIP | 0x6f0,
                efer: 0xd01,
                idt: crate::TableRegister {
                    base: IDT,
                    limit: 0xfff,
                },
                gdt: crate::TableRegister {
                    base: GDT,
                    limit: 0x7f,
                },
                lstar: ENTRY_SYSCALL,
                star: 0x0023_0010_0000_0000,
                cstar: TEXT + 0x2100,
                sfmask: 0x47700,
                sysenter_cs: 0x10,
                sysenter_esp: 0,
                sysenter_eip: TEXT + 0x2200,
            },
        };
        g.cpu.cr3 = g.t.root;
        for v in 0..256u64 {
            let h = if v == 14 { PF } else { TEXT + 0x300 + v * 0x10 };
            g.set_gate(v, h);
        }
        for (i, d) in GDT_ENTRIES.iter().enumerate() {
            g.t.write(GDT_PA + i as u64 * 8, *d);
        }
        for nr in 0..8 {
            let h = match nr {
                0 => SYS_READ,
                1 => SYS_WRITE,
                _ => SYS_NI,
            };
            g.t.write(SCT_PA + nr * 8, h);
        }
        g
    }

    pub(super) fn set_gate(&self, vector: u64, handler: u64) {
        self.t
            .mem
            .write_slice(
                &gate(handler, 0x10, 0, 0x8e),
                GuestAddress(IDT_PA + vector * 16),
            )
            .unwrap();
    }

    pub(super) fn layout() -> KernelLayout {
        KernelLayout::from_symbols(&symbols(), 0, Some(8)).unwrap()
    }

    pub(super) fn checker(&self) -> Checker {
        let b = Baseline::take(&self.t.mem, &[self.cpu], &Self::layout()).unwrap();
        Checker::new(b, Some(Arc::new(symbols())))
    }

    pub(super) fn check(&self, c: &mut Checker) -> Vec<Finding> {
        c.check(&self.t.mem, &[self.cpu], None)
    }
}

pub(super) fn symbols() -> SymbolTable {
    SymbolTable::parse(MAP).unwrap()
}

/// One finding, and a second check that finds nothing.
pub(super) fn one(g: &Guest, c: &mut Checker) -> Finding {
    one_of(g, c, &[g.cpu])
}

/// One finding with these vCPUs, and a second check that finds nothing.
pub(super) fn one_of(g: &Guest, c: &mut Checker, cpus: &[CpuState]) -> Finding {
    let f = c.check(&g.t.mem, cpus, None);
    assert_eq!(f.len(), 1, "{f:#?}");
    assert!(c.check(&g.t.mem, cpus, None).is_empty(), "reported twice");
    f.into_iter().next().unwrap()
}
