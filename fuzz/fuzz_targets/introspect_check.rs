//! A hostile guest against the integrity monitor: a kernel laid out from fuzz
//! input (text, read-only data, a syscall table, IDT and GDT, mapped by page
//! tables the input may also scribble on), a baseline, then arbitrary writes to
//! memory (page tables included) and registers, and two checks. Nothing may
//! panic or hang, and the second check of an unchanged guest must find nothing
//! new: each difference is reported once.

#![no_main]

use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use vigil_introspect::{
    Baseline, Checker, CpuState, GuestPhysMemory, KernelLayout, PhysReadError, TableRegister,
};

/// Guest RAM: 1 MiB from 0; the page tables map the first 2 MiB, so the upper
/// half of the mapping leads outside RAM.
const RAM: usize = 1 << 20;
const PML4: usize = 0x1000;
const PDPT: usize = 0x2000;
const PD: usize = 0x3000;
const PT: usize = 0x4000;
/// Where the input's kernel image starts.
const KERNEL: u64 = 0x10_0000 - 0x8_0000;

struct Ram(Vec<u8>);

impl GuestPhysMemory for Ram {
    fn read_phys(&self, paddr: u64, buf: &mut [u8]) -> Result<(), PhysReadError> {
        let err = PhysReadError {
            paddr,
            len: buf.len(),
        };
        let start = usize::try_from(paddr).map_err(|_| err)?;
        let end = start.checked_add(buf.len()).ok_or(err)?;
        buf.copy_from_slice(self.0.get(start..end).ok_or(err)?);
        Ok(())
    }
}

impl Ram {
    fn put_u64(&mut self, at: usize, v: u64) {
        self.0[at..at + 8].copy_from_slice(&v.to_le_bytes());
    }
}

#[derive(Arbitrary, Debug)]
struct Input {
    /// The kernel image (text, rodata, tables), at `KERNEL`.
    image: Vec<u8>,
    /// Map the first 2 MiB with one large page instead of 4 KiB pages.
    large_page: bool,
    /// Offsets (in the image) and lengths of the regions and tables.
    text: (u16, u16),
    rodata: Option<(u16, u16)>,
    syscall_table: Option<(u16, u8)>,
    idt: (u16, u16),
    gdt: (u16, u16),
    msrs: [u64; 7],
    vcpus: u8,
    /// After the baseline: byte writes anywhere in RAM (page tables too).
    pokes: Vec<(u32, u8)>,
    /// After the baseline: XOR masks on CR0, CR4, EFER, IDTR base, GDTR limit,
    /// LSTAR, of one vCPU.
    flips: Vec<(u8, u8, u64)>,
    /// The dirty log: none (re-hash everything) or a page mask.
    dirty: Option<u64>,
}

fuzz_target!(|input: Input| {
    let mut ram = Ram(vec![0; RAM]);
    // Page tables: PML4[0] -> PDPT[0] -> PD[0] -> 2 MiB page or PT.
    ram.put_u64(PML4, PDPT as u64 | 3);
    ram.put_u64(PDPT, PD as u64 | 3);
    if input.large_page {
        ram.put_u64(PD, 0x83);
    } else {
        ram.put_u64(PD, PT as u64 | 3);
        for i in 0..512u64 {
            ram.put_u64(PT + i as usize * 8, (i << 12) | 3);
        }
    }
    let room = RAM - KERNEL as usize;
    let n = input.image.len().min(room);
    ram.0[KERNEL as usize..KERNEL as usize + n].copy_from_slice(&input.image[..n]);
    let at = |off: u16| KERNEL + u64::from(off);
    let range = |(off, len): (u16, u16)| at(off)..at(off) + u64::from(len).max(1);
    let Ok(layout) = KernelLayout::new(
        range(input.text),
        input.rodata.map(range),
        input
            .syscall_table
            .map(|(off, count)| (at(off), usize::from(count).max(1))),
    ) else {
        return;
    };
    let base = CpuState {
        vcpu: 0,
        cr0: (1 << 31) | (1 << 16) | 1,
        cr3: PML4 as u64,
        cr4: (1 << 5) | (1 << 11) | (1 << 20),
        efer: (1 << 10) | (1 << 11) | 1,
        idt: TableRegister {
            base: at(input.idt.0),
            limit: input.idt.1,
        },
        gdt: TableRegister {
            base: at(input.gdt.0),
            limit: input.gdt.1,
        },
        lstar: input.msrs[0],
        star: input.msrs[1],
        cstar: input.msrs[2],
        sfmask: input.msrs[3],
        sysenter_cs: input.msrs[4],
        sysenter_esp: input.msrs[5],
        sysenter_eip: input.msrs[6],
    };
    let mut cpus: Vec<CpuState> = (0..u32::from(input.vcpus % 4) + 1)
        .map(|vcpu| CpuState { vcpu, ..base })
        .collect();
    let Ok(baseline) = Baseline::take(&ram, &cpus, &layout) else {
        return;
    };
    let mut checker = Checker::new(baseline, None);
    for &(at, value) in input.pokes.iter().take(64) {
        let at = at as usize % RAM;
        ram.0[at] = value;
    }
    for &(vcpu, which, mask) in input.flips.iter().take(8) {
        let i = usize::from(vcpu) % cpus.len();
        let cpu = &mut cpus[i];
        match which % 6 {
            0 => cpu.cr0 ^= mask,
            1 => cpu.cr4 ^= mask,
            2 => cpu.efer ^= mask,
            3 => cpu.idt.base ^= mask,
            4 => cpu.gdt.limit ^= mask as u16,
            _ => cpu.lstar ^= mask,
        }
    }
    let dirty = input
        .dirty
        .map(|mask| move |paddr: u64| mask >> ((paddr >> 12) % 64) & 1 == 1);
    let dirty_fn = dirty.as_ref().map(|d| d as &dyn Fn(u64) -> bool);
    checker.check(&ram, &cpus, dirty_fn);
    let again = checker.check(&ram, &cpus, dirty_fn);
    assert!(
        again.is_empty(),
        "an unchanged guest gave new findings: {again:#?}"
    );
});
