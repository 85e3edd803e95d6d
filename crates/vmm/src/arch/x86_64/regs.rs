//! Initial vCPU state for each entry point: segments and GDT, page tables for the
//! 64-bit entry, general registers, FPU, MSRs and the local APIC's LINT pins.

use crate::GuestMemoryMmap;
use kvm_bindings::{
    kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs,
};
use vigil_model::cpu::MsrModifier;
use vm_memory::{Address, Bytes, GuestAddress};

use super::boot::EntryPoint;
use super::cpuid::CustomTemplateError;
use super::layout::{
    BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PML4_START, PVH_INFO_START, ZERO_PAGE_START,
};

const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

// GDT entry flags: present, ring 0, code (exec/read, accessed) or data (read/write,
// accessed), 4 KiB granularity; L=1 for 64-bit code, D/B=1 for 32-bit segments.
const CODE64: u16 = 0xa09b;
const CODE32: u16 = 0xc09b;
const DATA: u16 = 0xc093;
const TSS: u16 = 0x808b;

// Linux's boot protocol wants __BOOT_CS = 0x10 and __BOOT_DS = 0x18.
const CODE_INDEX: u16 = 2;
const DATA_INDEX: u16 = 3;
const TSS_INDEX: u16 = 4;

/// Errors while setting up a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("cannot write boot tables to guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
    #[error("KVM refused vCPU state ({what}): {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RegsError {
    move |source| RegsError::Kvm { what, source }
}

/// A GDT descriptor from its flags, base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

/// The KVM segment register that a selector of `index` into a GDT holding `entry` loads.
pub fn segment_from_gdt(entry: u64, index: u16) -> kvm_segment {
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    let g = bit(55);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: bit(47),
        dpl: ((entry >> 45) & 3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g,
        avl: bit(52),
        unusable: u8::from(bit(47) == 0),
        padding: 0,
    }
}

/// Writes the boot GDT and an empty IDT, and loads them into `sregs` with flat
/// segments for `entry`.
fn setup_segments(
    mem: &GuestMemoryMmap,
    sregs: &mut kvm_sregs,
    entry: EntryPoint,
) -> Result<(), RegsError> {
    let code = match entry {
        EntryPoint::Pvh(_) => CODE32,
        EntryPoint::Linux64(_) => CODE64,
    };
    let gdt = [
        0,
        0,
        gdt_entry(code, 0, 0xfffff),
        gdt_entry(DATA, 0, 0xfffff),
        gdt_entry(TSS, 0, 0xfffff),
    ];
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, BOOT_GDT_START.unchecked_add(i as u64 * 8))?;
    }
    mem.write_obj(0u64, BOOT_IDT_START)?;
    sregs.gdt.base = BOOT_GDT_START.0;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT_START.0;
    sregs.idt.limit = 7;
    sregs.cs = segment_from_gdt(gdt[CODE_INDEX as usize], CODE_INDEX);
    let data = segment_from_gdt(gdt[DATA_INDEX as usize], DATA_INDEX);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(gdt[TSS_INDEX as usize], TSS_INDEX);
    Ok(())
}

/// Identity-maps the first 4 GiB with 2 MiB pages for the 64-bit entry.
fn setup_page_tables(mem: &GuestMemoryMmap, sregs: &mut kvm_sregs) -> Result<(), RegsError> {
    const PRESENT_RW: u64 = 0x3;
    const HUGE: u64 = 0x80;
    let pdpt = PML4_START.0 + 0x1000;
    let pd = pdpt + 0x1000;
    mem.write_obj(pdpt | PRESENT_RW, PML4_START)?;
    for gib in 0..4u64 {
        mem.write_obj(
            (pd + gib * 0x1000) | PRESENT_RW,
            GuestAddress(pdpt + gib * 8),
        )?;
    }
    let entries: Vec<u8> = (0..4 * 512u64)
        .flat_map(|i| ((i << 21) | PRESENT_RW | HUGE).to_le_bytes())
        .collect();
    mem.write_slice(&entries, GuestAddress(pd))?;
    sregs.cr3 = PML4_START.0;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 |= X86_CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
    Ok(())
}

/// Sets the boot vCPU's registers for `entry`.
pub fn setup_boot_vcpu(
    vcpu: &kvm_ioctls::VcpuFd,
    mem: &GuestMemoryMmap,
    entry: EntryPoint,
) -> Result<(), RegsError> {
    let mut sregs = vcpu.get_sregs().map_err(kvm("get sregs"))?;
    setup_segments(mem, &mut sregs, entry)?;
    sregs.cr0 = (sregs.cr0 & !X86_CR0_PG) | X86_CR0_PE | X86_CR0_ET;
    sregs.cr4 = 0;
    sregs.efer = 0;
    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    match entry {
        EntryPoint::Pvh(addr) => {
            regs.rip = addr.0;
            regs.rbx = PVH_INFO_START.0;
        }
        EntryPoint::Linux64(addr) => {
            setup_page_tables(mem, &mut sregs)?;
            regs.rip = addr.0;
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = ZERO_PAGE_START.0;
        }
    }
    vcpu.set_sregs(&sregs).map_err(kvm("set sregs"))?;
    vcpu.set_regs(&regs).map_err(kvm("set regs"))
}

// MSR numbers.
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_MEM_TYPE_WB: u64 = 6;

/// Sets the FPU, the MSRs firmware leaves behind, and the LAPIC's LINT pins
/// (LINT0 ExtINT for the PIC, LINT1 NMI), on every vCPU.
pub fn setup_common(vcpu: &kvm_ioctls::VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("set fpu"))?;

    let msr = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    let entries = [
        msr(MSR_IA32_SYSENTER_CS, 0),
        msr(MSR_IA32_SYSENTER_ESP, 0),
        msr(MSR_IA32_SYSENTER_EIP, 0),
        msr(MSR_STAR, 0),
        msr(MSR_CSTAR, 0),
        msr(MSR_KERNEL_GS_BASE, 0),
        msr(MSR_SYSCALL_MASK, 0),
        msr(MSR_LSTAR, 0),
        msr(MSR_IA32_TSC, 0),
        msr(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        msr(MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_MEM_TYPE_WB),
    ];
    let msrs = Msrs::from_entries(&entries).expect("a handful of MSRs fits");
    let written = vcpu.set_msrs(&msrs).map_err(kvm("set msrs"))?;
    if written != entries.len() {
        return Err(RegsError::Kvm {
            what: "set msrs",
            source: kvm_ioctls::Error::new(libc::EINVAL),
        });
    }

    let mut lapic = vcpu.get_lapic().map_err(kvm("get lapic"))?;
    set_lint_delivery(&mut lapic, APIC_LVT0, APIC_MODE_EXTINT);
    set_lint_delivery(&mut lapic, APIC_LVT1, APIC_MODE_NMI);
    vcpu.set_lapic(&lapic).map_err(kvm("set lapic"))
}

/// Applies a custom template's MSR modifiers to the values the vCPU boots with.
pub fn modify_msrs(
    vcpu: &kvm_ioctls::VcpuFd,
    modifiers: &[MsrModifier],
) -> Result<(), CustomTemplateError> {
    for m in modifiers {
        let refused = |what| CustomTemplateError::Msr { addr: m.addr, what };
        let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
            index: m.addr,
            ..Default::default()
        }])
        .expect("one MSR fits");
        if vcpu.get_msrs(&mut msrs).map_err(|_| refused("to read"))? != 1 {
            return Err(refused("to read"));
        }
        let entry = &mut msrs.as_mut_slice()[0];
        entry.data = m.bits.apply(entry.data);
        if vcpu.set_msrs(&msrs).map_err(|_| refused("to write"))? != 1 {
            return Err(refused("to write"));
        }
    }
    Ok(())
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn set_lint_delivery(lapic: &mut kvm_lapic_state, reg: usize, mode: u32) {
    let bytes: Vec<u8> = lapic.regs[reg..reg + 4].iter().map(|b| *b as u8).collect();
    let value = u32::from_le_bytes(bytes.try_into().expect("4 bytes"));
    let value = (value & !0x700) | (mode << 8);
    for (dst, src) in lapic.regs[reg..reg + 4].iter_mut().zip(value.to_le_bytes()) {
        *dst = src as _;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_decode_to_flat_segments() {
        let code64 = segment_from_gdt(gdt_entry(CODE64, 0, 0xfffff), 2);
        assert_eq!(
            (code64.base, code64.limit, code64.selector),
            (0, 0xffff_ffff, 0x10)
        );
        assert_eq!(
            (
                code64.type_,
                code64.present,
                code64.l,
                code64.db,
                code64.g,
                code64.s
            ),
            (0xb, 1, 1, 0, 1, 1)
        );
        let code32 = segment_from_gdt(gdt_entry(CODE32, 0, 0xfffff), 2);
        assert_eq!((code32.l, code32.db), (0, 1));
        let data = segment_from_gdt(gdt_entry(DATA, 0, 0xfffff), 3);
        assert_eq!(
            (data.type_, data.selector, data.db, data.unusable),
            (3, 0x18, 1, 0)
        );
        let odd = segment_from_gdt(gdt_entry(0x4093, 0x1234_5678, 0xabcde), 1);
        assert_eq!((odd.base, odd.limit, odd.g), (0x1234_5678, 0xabcde, 0));
        let tss = segment_from_gdt(gdt_entry(TSS, 0, 0xfffff), 4);
        assert_eq!((tss.type_, tss.s), (0xb, 0));
    }

    #[test]
    fn page_tables_identity_map_4_gib() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut sregs = kvm_sregs::default();
        setup_page_tables(&mem, &mut sregs).unwrap();
        assert_eq!(sregs.cr3, PML4_START.0);
        assert_ne!(sregs.efer & EFER_LMA, 0);
        let pml4: u64 = mem.read_obj(PML4_START).unwrap();
        let pdpt = pml4 & !0xfff;
        for gib in 0..4 {
            let pdpte: u64 = mem.read_obj(GuestAddress(pdpt + gib * 8)).unwrap();
            let pd = pdpte & !0xfff;
            for i in [0u64, 1, 511] {
                let pde: u64 = mem.read_obj(GuestAddress(pd + i * 8)).unwrap();
                assert_eq!(pde & !0xfff, (gib << 30) + (i << 21));
                assert_eq!(pde & 0x83, 0x83);
            }
        }
    }

    #[test]
    fn lint_pins_get_their_delivery_modes() {
        let mut lapic = kvm_lapic_state::default();
        lapic.regs[APIC_LVT0] = 0x20;
        lapic.regs[APIC_LVT0 + 1] = 0x01; // some other mode already set
        set_lint_delivery(&mut lapic, APIC_LVT0, APIC_MODE_EXTINT);
        assert_eq!(lapic.regs[APIC_LVT0] as u8, 0x20);
        assert_eq!(lapic.regs[APIC_LVT0 + 1] as u8, 0x07);
    }
}
