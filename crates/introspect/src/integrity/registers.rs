//! Each vCPU's registers against its baseline: the protection bits (CR0.WP,
//! CR4.SMEP/SMAP/UMIP, EFER.NXE) cleared, EFER.SCE, IDTR and GDTR, and the seven
//! system call MSRs changed.

use vigil_events::Rule;

use crate::cpu::{CpuState, CR0_WP, CR4_SMAP, CR4_SMEP, CR4_UMIP, EFER_NXE, EFER_SCE};

use super::baseline::VcpuBaseline;
use super::finding::{finding, with_sym, Round, Symbolizer};

/// `cpu`'s control registers, descriptor-table registers and syscall MSRs
/// against `vb`'s.
pub(super) fn check_registers(
    round: &mut Round,
    sym: &Symbolizer,
    vb: &VcpuBaseline,
    cpu: &CpuState,
) {
    let old = vb.cpu;
    let v = Some(cpu.vcpu);
    let who = vb.who();
    // Protection bits set at baseline that are clear now.
    for (rule, reg, bit_name, bit, was, now) in [
        (Rule::Cr0WpCleared, "CR0", "WP", CR0_WP, old.cr0, cpu.cr0),
        (
            Rule::Cr4SmepCleared,
            "CR4",
            "SMEP",
            CR4_SMEP,
            old.cr4,
            cpu.cr4,
        ),
        (
            Rule::Cr4SmapCleared,
            "CR4",
            "SMAP",
            CR4_SMAP,
            old.cr4,
            cpu.cr4,
        ),
        (
            Rule::Cr4UmipCleared,
            "CR4",
            "UMIP",
            CR4_UMIP,
            old.cr4,
            cpu.cr4,
        ),
        (
            Rule::EferNxeCleared,
            "EFER",
            "NXE",
            EFER_NXE,
            old.efer,
            cpu.efer,
        ),
    ] {
        let location = || format!("{reg}.{bit_name}");
        if was & bit != 0 && now & bit == 0 {
            round.differs(finding(
                rule,
                v,
                location(),
                "set".into(),
                "clear".into(),
                None,
                None,
                format!("{who}: {reg}.{bit_name} was set at baseline and is clear ({reg} {was:#x} -> {now:#x})"),
            ));
        } else {
            round.same(rule, v, location, || "set".into());
        }
    }
    let (was, now) = (old.efer, cpu.efer);
    if (was ^ now) & EFER_SCE != 0 {
        round.differs(finding(
            Rule::EferSceChanged,
            v,
            "EFER.SCE".into(),
            set_or_clear(was, EFER_SCE).into(),
            set_or_clear(now, EFER_SCE).into(),
            None,
            None,
            format!(
                "{who}: EFER.SCE changed from {} to {} (EFER {was:#x} -> {now:#x})",
                set_or_clear(was, EFER_SCE),
                set_or_clear(now, EFER_SCE)
            ),
        ));
    } else {
        round.same(
            Rule::EferSceChanged,
            v,
            || "EFER.SCE".into(),
            || set_or_clear(was, EFER_SCE).into(),
        );
    }
    // Descriptor-table registers.
    for (rule, name, was, now) in [
        (Rule::IdtrChanged, "IDTR", old.idt, cpu.idt),
        (Rule::GdtrChanged, "GDTR", old.gdt, cpu.gdt),
    ] {
        if was != now {
            let (from_symbol, symbol) = (sym.name(was.base), sym.name(now.base));
            round.differs(finding(
                rule,
                v,
                name.into(),
                was.to_string(),
                now.to_string(),
                from_symbol.clone(),
                symbol.clone(),
                format!(
                    "{who}: {name} changed from {} limit {:#x} to {} limit {:#x}",
                    with_sym(was.base, &from_symbol),
                    was.limit,
                    with_sym(now.base, &symbol),
                    now.limit
                ),
            ));
        } else {
            round.same(rule, v, || name.into(), || was.to_string());
        }
    }
    // Syscall MSRs; the entry points are named with symbols.
    for (name, was, now, is_addr) in [
        ("LSTAR", old.lstar, cpu.lstar, true),
        ("STAR", old.star, cpu.star, false),
        ("CSTAR", old.cstar, cpu.cstar, true),
        ("SFMASK", old.sfmask, cpu.sfmask, false),
        ("SYSENTER_CS", old.sysenter_cs, cpu.sysenter_cs, false),
        ("SYSENTER_ESP", old.sysenter_esp, cpu.sysenter_esp, false),
        ("SYSENTER_EIP", old.sysenter_eip, cpu.sysenter_eip, true),
    ] {
        let rule = Rule::SyscallMsrChanged;
        if was != now {
            let (from_symbol, symbol) = if is_addr {
                (sym.name(was), sym.name(now))
            } else {
                (None, None)
            };
            round.differs(finding(
                rule,
                v,
                name.into(),
                format!("{was:#x}"),
                format!("{now:#x}"),
                from_symbol.clone(),
                symbol.clone(),
                format!(
                    "{who}: {name} changed from {} to {}",
                    with_sym(was, &from_symbol),
                    with_sym(now, &symbol)
                ),
            ));
        } else {
            round.same(rule, v, || name.into(), || format!("{was:#x}"));
        }
    }
}

/// The protection bits the checks watch (each reported when set at baseline
/// and clear now; EFER.SCE on any change).
const WATCHED_CR0: u64 = CR0_WP;
const WATCHED_CR4: u64 = CR4_SMEP | CR4_SMAP | CR4_UMIP;
const WATCHED_EFER: u64 = EFER_NXE | EFER_SCE;

/// The registers application processor `ap` is expected to hold: `boot`'s
/// IDTR, GDTR limit, syscall MSRs and watched protection bits; its own CR3,
/// GDTR base (Linux's GDT is per CPU), SYSENTER_ESP (Linux's per-CPU entry
/// stack) and unwatched bits.
pub(super) fn expected_registers(boot: &CpuState, ap: &CpuState) -> CpuState {
    let merge = |own: u64, theirs: u64, watched: u64| (own & !watched) | (theirs & watched);
    CpuState {
        vcpu: ap.vcpu,
        cr0: merge(ap.cr0, boot.cr0, WATCHED_CR0),
        cr3: ap.cr3,
        cr4: merge(ap.cr4, boot.cr4, WATCHED_CR4),
        efer: merge(ap.efer, boot.efer, WATCHED_EFER),
        idt: boot.idt,
        gdt: crate::TableRegister {
            base: ap.gdt.base,
            limit: boot.gdt.limit,
        },
        sysenter_esp: ap.sysenter_esp,
        ..*boot
    }
}

fn set_or_clear(v: u64, bit: u64) -> &'static str {
    if v & bit != 0 {
        "set"
    } else {
        "clear"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::integrity::fixture::*;
    use vigil_events::Priority;

    #[test]
    fn lstar_hook_restore_and_again() {
        let mut g = Guest::new();
        let mut c = g.checker();
        g.cpu.lstar = ROOTKIT;
        let f = one(&g, &mut c);
        assert_eq!(f.rule, Rule::SyscallMsrChanged);
        assert_eq!(
            (
                f.location.as_str(),
                f.from_symbol.as_deref(),
                f.symbol.as_deref()
            ),
            (
                "LSTAR",
                Some("entry_SYSCALL_64+0x0"),
                Some("rootkit_read+0x0")
            )
        );
        g.cpu.lstar = ENTRY_SYSCALL;
        let r = one(&g, &mut c);
        assert!(r.restored && r.location == "LSTAR" && r.to == "0xffffffff81002000");
        g.cpu.lstar = ROOTKIT;
        assert_eq!(one(&g, &mut c).to, "0xffffffffc0000000");
        // Another MSR without symbols.
        g.cpu.star = 0;
        let f = one(&g, &mut c);
        assert_eq!((f.location.as_str(), f.symbol.as_deref()), ("STAR", None));
    }

    #[test]
    fn protection_bits() {
        for (rule, reg, bit) in [
            (Rule::Cr0WpCleared, 0, CR0_WP),
            (Rule::Cr4SmepCleared, 4, CR4_SMEP),
            (Rule::Cr4SmapCleared, 4, CR4_SMAP),
            (Rule::Cr4UmipCleared, 4, CR4_UMIP),
            (Rule::EferNxeCleared, 8, EFER_NXE),
        ] {
            let mut g = Guest::new();
            let mut c = g.checker();
            match reg {
                0 => g.cpu.cr0 &= !bit,
                4 => g.cpu.cr4 &= !bit,
                _ => g.cpu.efer &= !bit,
            }
            let f = one(&g, &mut c);
            assert_eq!(f.rule, rule);
            assert_eq!(
                (f.from.as_str(), f.to.as_str(), f.vcpu),
                ("set", "clear", Some(0))
            );
        }
        // Bits that were clear at baseline, and other bits, are not watched.
        let mut g = Guest::new();
        g.cpu.cr4 &= !CR4_SMEP;
        let mut c = g.checker();
        g.cpu.cr0 |= 1 << 3; // TS
        g.cpu.cr4 |= CR4_SMEP;
        assert!(g.check(&mut c).is_empty());
        g.cpu.cr4 &= !CR4_SMEP;
        assert!(g.check(&mut c).is_empty());
        // SCE either way.
        g.cpu.efer &= !EFER_SCE;
        let f = one(&g, &mut c);
        assert_eq!(
            (f.rule, f.from.as_str(), f.to.as_str()),
            (Rule::EferSceChanged, "set", "clear")
        );
        assert_eq!(f.priority, Priority::Warning);
    }
}
