//! The descriptor tables and the system call table: each vCPU's IDT gate by gate
//! and GDT descriptor by descriptor, and the syscall table entry by entry, read
//! in full at every check and compared with the baseline's copies.

use vigil_events::Rule;

use crate::cpu::CpuState;
use crate::kaslr::decode_idt_gate;
use crate::mem::GuestPhysMemory;
use crate::paging::{read_virt, WalkError};
use crate::syscall::syscall_name;

use super::baseline::{SyscallTableBaseline, VcpuBaseline};
use super::finding::{finding, with_sym, Round, Symbolizer};

/// The most IDT bytes read: 256 gates of 16 bytes.
pub const MAX_IDT_BYTES: usize = 4096;
/// The most GDT bytes read: the largest limit, 0xffff, plus one.
pub const MAX_GDT_BYTES: usize = 0x1_0000;

/// The `limit + 1` bytes (at most `max`) of the table at `base`.
pub(super) fn read_table(
    mem: &dyn GuestPhysMemory,
    cr3: u64,
    cpu: &CpuState,
    base: u64,
    limit: u16,
    max: usize,
) -> Result<Vec<u8>, WalkError> {
    let mut buf = vec![0u8; (usize::from(limit) + 1).min(max)];
    read_virt(mem, cr3, cpu.la57(), base, &mut buf)?;
    Ok(buf)
}

/// The tables `cpu`'s IDTR and GDTR point at now (through `cr3`), against the
/// baseline's copies. A table not read at baseline becomes its baseline now:
/// for an application processor, what it is expected to hold from `boot`'s
/// (the boot vCPU's baseline; only asked for then).
#[allow(clippy::too_many_arguments)]
pub(super) fn check_tables(
    round: &mut Round,
    sym: &Symbolizer,
    mem: &dyn GuestPhysMemory,
    vb: &mut VcpuBaseline,
    boot: Option<&VcpuBaseline>,
    cpu: &CpuState,
    cr3: u64,
    gdt_volatile: &[u16],
) {
    let v = Some(cpu.vcpu);
    let who = vb.who();
    match read_table(mem, cr3, cpu, cpu.idt.base, cpu.idt.limit, MAX_IDT_BYTES) {
        Err(e) => round.read_failed(v, "IDT".into(), &e),
        Ok(now) => {
            round.same(Rule::IntegrityReadFailed, v, || "IDT".into(), String::new);
            let base = vb.idt.get_or_insert_with(|| {
                boot.and_then(|b| b.idt.clone())
                    .unwrap_or_else(|| now.clone())
            });
            compare_idt(round, sym, &who, v, base, &now);
        }
    }
    match read_table(mem, cr3, cpu, cpu.gdt.base, cpu.gdt.limit, MAX_GDT_BYTES) {
        Err(e) => round.read_failed(v, "GDT".into(), &e),
        Ok(now) => {
            round.same(Rule::IntegrityReadFailed, v, || "GDT".into(), String::new);
            let base = vb
                .gdt
                .get_or_insert_with(|| match boot.and_then(|b| b.gdt.as_deref()) {
                    Some(b) => expected_gdt(b, &now),
                    None => now.clone(),
                });
            compare_gdt(round, &who, v, base, &now, gdt_volatile);
        }
    }
}

/// Descriptor bits: S (code or data), the base's fields, the limit's fields.
const DESC_S: u64 = 1 << 44;
const DESC_BASE: u64 = 0xff00_00ff_ffff_0000;
const DESC_LIMIT: u64 = 0x000f_0000_0000_ffff;

/// The GDT an application processor is expected to hold: `boot`'s (the boot
/// vCPU's baseline copy, its length the GDTR limit expected), with `own`'s
/// bytes where Linux's per-CPU GDTs differ: the base of TSS and LDT
/// descriptors, and their upper halves (bits 63:32 of the base, the rest
/// reserved), each CPU having its own TSS; and the limit of code and data
/// descriptors, which a 64-bit CPU does not check and where Linux keeps the
/// CPU's number (its CPUNODE descriptor, 0x78). The rest, the layout, is the
/// boot vCPU's: every descriptor's type, S, DPL, P, L, D/B, G and AVL, the base
/// of code and data descriptors, and call gates whole.
pub(super) fn expected_gdt(boot: &[u8], own: &[u8]) -> Vec<u8> {
    let mut out = boot.to_vec();
    let word = |t: &[u8], i: usize| -> Option<u64> {
        Some(u64::from_le_bytes(
            t.get(i * 8..i * 8 + 8)?.try_into().ok()?,
        ))
    };
    let slots = boot.len() / 8;
    let mut i = 0;
    while i < slots {
        let b = word(boot, i).unwrap_or(0);
        let ty = (b >> 40) & 0xf;
        let (own_bits, upper_half) = if b & DESC_S != 0 {
            (DESC_LIMIT, false)
        } else if matches!(ty, 0x2 | 0x9 | 0xb) {
            (DESC_BASE, true)
        } else {
            (0, false)
        };
        if let Some(o) = word(own, i) {
            let merged = (b & !own_bits) | (o & own_bits);
            out[i * 8..i * 8 + 8].copy_from_slice(&merged.to_le_bytes());
        }
        if upper_half && i + 1 < slots {
            if let Some(o) = word(own, i + 1) {
                out[(i + 1) * 8..(i + 2) * 8].copy_from_slice(&o.to_le_bytes());
            }
            i += 1;
        }
        i += 1;
    }
    out
}

fn describe_gate(raw: &[u8; 16]) -> String {
    let g = decode_idt_gate(raw);
    format!(
        "{:#x} (selector {:#x}, ist {}, type {:#x}, dpl {}, {})",
        g.handler,
        g.selector,
        g.ist,
        g.gate_type,
        g.dpl,
        if g.present { "present" } else { "not present" }
    )
}

fn compare_idt(
    round: &mut Round,
    sym: &Symbolizer,
    who: &str,
    v: Option<u32>,
    base: &[u8],
    now: &[u8],
) {
    let rule = Rule::IdtEntryModified;
    for (vector, (b, n)) in base.chunks_exact(16).zip(now.chunks_exact(16)).enumerate() {
        let location = || format!("IDT vector {vector}");
        let b: &[u8; 16] = b.try_into().expect("16 bytes");
        let n: &[u8; 16] = n.try_into().expect("16 bytes");
        if b == n {
            round.same(rule, v, location, || describe_gate(b));
            continue;
        }
        let (old, new) = (decode_idt_gate(b), decode_idt_gate(n));
        let (from_symbol, symbol) = (sym.name(old.handler), sym.name(new.handler));
        let (from, to, message) = if old.handler != new.handler {
            (
                format!("{:#x}", old.handler),
                format!("{:#x}", new.handler),
                format!(
                    "{who}: IDT vector {vector} handler changed from {} to {}",
                    with_sym(old.handler, &from_symbol),
                    with_sym(new.handler, &symbol)
                ),
            )
        } else {
            let (from, to) = (describe_gate(b), describe_gate(n));
            let message = format!("{who}: IDT vector {vector} gate changed from {from} to {to}");
            (from, to, message)
        };
        round.differs(finding(
            rule,
            v,
            location(),
            from,
            to,
            from_symbol,
            symbol,
            message,
        ));
    }
}

/// A GDT slot with the bits the CPU itself writes cleared: the accessed bit of
/// code and data descriptors (set when a selector is loaded) and the busy bit of
/// TSS descriptors (set by `ltr`, cleared when Linux reloads TR).
fn normalize_descriptor(d: u64) -> u64 {
    let s = d & (1 << 44) != 0;
    let ty = (d >> 40) & 0xf;
    if s {
        d & !(1 << 40)
    } else if ty == 0x9 || ty == 0xb {
        d & !(1 << 41)
    } else {
        d
    }
}

fn compare_gdt(
    round: &mut Round,
    who: &str,
    v: Option<u32>,
    base: &[u8],
    now: &[u8],
    volatile: &[u16],
) {
    let rule = Rule::GdtEntryModified;
    for (i, (b, n)) in base.chunks_exact(8).zip(now.chunks_exact(8)).enumerate() {
        if volatile.iter().any(|&s| usize::from(s) == i * 8) {
            continue;
        }
        let location = || format!("GDT selector {:#x}", i * 8);
        let b = u64::from_le_bytes(b.try_into().expect("8 bytes"));
        let n = u64::from_le_bytes(n.try_into().expect("8 bytes"));
        if normalize_descriptor(b) == normalize_descriptor(n) {
            round.same(rule, v, location, || format!("{b:#018x}"));
            continue;
        }
        round.differs(finding(
            rule,
            v,
            location(),
            format!("{b:#018x}"),
            format!("{n:#018x}"),
            None,
            None,
            format!(
                "{who}: GDT descriptor at selector {:#x} changed from {b:#018x} to {n:#018x}",
                i * 8
            ),
        ));
    }
}

pub(super) fn check_syscall_table(
    round: &mut Round,
    sym: &Symbolizer,
    mem: &dyn GuestPhysMemory,
    table: &SyscallTableBaseline,
    cpu: &CpuState,
    cr3: u64,
) {
    let mut raw = vec![0u8; table.entries.len() * 8];
    if let Err(e) = read_virt(mem, cr3, cpu.la57(), table.addr, &mut raw) {
        round.read_failed(None, "sys_call_table".into(), &e);
        return;
    }
    round.same(
        Rule::IntegrityReadFailed,
        None,
        || "sys_call_table".into(),
        String::new,
    );
    let rule = Rule::SyscallTableModified;
    for (nr, (&was, c)) in table.entries.iter().zip(raw.chunks_exact(8)).enumerate() {
        let now = u64::from_le_bytes(c.try_into().expect("8 bytes"));
        let location = || match syscall_name(nr as u64) {
            Some(name) => format!("sys_call_table[{nr}] ({name})"),
            None => format!("sys_call_table[{nr}]"),
        };
        if was == now {
            round.same(rule, None, location, || format!("{was:#x}"));
            continue;
        }
        let (from_symbol, symbol) = (sym.name(was), sym.name(now));
        let location = location();
        round.differs(finding(
            rule,
            None,
            location.clone(),
            format!("{was:#x}"),
            format!("{now:#x}"),
            from_symbol.clone(),
            symbol.clone(),
            format!(
                "{location} changed from {} to {}",
                with_sym(was, &from_symbol),
                with_sym(now, &symbol)
            ),
        ));
    }
}

#[cfg(test)]
mod tests {
    use crate::integrity::fixture::*;
    use crate::kaslr::tests::gate;
    use vigil_events::{Priority, Rule};
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn idt_gate_hook() {
        let g = Guest::new();
        let mut c = g.checker();
        g.set_gate(14, ROOTKIT);
        let f = one(&g, &mut c);
        assert_eq!(f.rule, Rule::IdtEntryModified);
        assert_eq!(
            (f.vcpu, f.location.as_str(), f.from.as_str(), f.to.as_str()),
            (
                Some(0),
                "IDT vector 14",
                "0xffffffff81000100",
                "0xffffffffc0000000"
            )
        );
        assert_eq!(f.from_symbol.as_deref(), Some("asm_exc_page_fault+0x0"));
        assert_eq!(f.symbol.as_deref(), Some("rootkit_read+0x0"));
        assert_eq!(f.priority, Priority::Critical);
        assert_eq!(f.mitre.unwrap().technique, "T1014");
        assert!(!f.restored);
        assert!(f.message.contains("rootkit_read+0x0"), "{}", f.message);
        let json: serde_json::Value = serde_json::to_value(&f).unwrap();
        assert_eq!(json["rule"], "idt_entry_modified");
        assert_eq!(json["priority"], "Critical");
        assert_eq!(json["mitre"]["name"], "Rootkit");
        // Another value: a new finding. Back to the baseline: one "restored".
        g.set_gate(14, ROOTKIT + 0x40);
        assert_eq!(one(&g, &mut c).to, "0xffffffffc0000040");
        g.set_gate(14, PF);
        let r = one(&g, &mut c);
        assert!(r.restored);
        assert_eq!(r.priority, Priority::Notice);
        assert_eq!(
            (r.from.as_str(), r.rule),
            ("0xffffffffc0000040", Rule::IdtEntryModified)
        );
        // Hooked again with a value reported before: reported again.
        g.set_gate(14, ROOTKIT);
        assert_eq!(one(&g, &mut c).to, "0xffffffffc0000000");
    }

    #[test]
    fn idt_gate_attributes() {
        let g = Guest::new();
        let mut c = g.checker();
        // Same handler, now callable from user mode (DPL 3).
        g.t.mem
            .write_slice(&gate(PF, 0x10, 0, 0xee), GuestAddress(IDT_PA + 14 * 16))
            .unwrap();
        let f = one(&g, &mut c);
        assert_eq!(f.location, "IDT vector 14");
        assert!(f.from.contains("dpl 0") && f.to.contains("dpl 3"), "{f:?}");
    }

    #[test]
    fn gdt_entry() {
        let g = Guest::new();
        let mut c = g.checker();
        // What the CPU writes itself: the accessed bit, the TSS busy bit.
        g.t.write(GDT_PA + 0x10, GDT_ENTRIES[2] | 1 << 40);
        g.t.write(GDT_PA + 0x28, GDT_ENTRIES[5] & !(1 << 41));
        // What Linux writes itself: a TLS descriptor, the LDT descriptor.
        g.t.write(GDT_PA + 0x60, 0x00cf_f300_1000_ffff);
        g.t.write(GDT_PA + 0x50, 0x0000_e200_2000_0fff);
        assert!(g.check(&mut c).is_empty());
        // The slot after the TLS ones is watched.
        g.t.write(GDT_PA + 0x78, 0x00cf_f300_1000_ffff);
        assert_eq!(one(&g, &mut c).location, "GDT selector 0x78");
        // The kernel code segment made DPL 3.
        g.t.write(GDT_PA + 0x08, GDT_ENTRIES[1] | 3 << 45);
        let f = one(&g, &mut c);
        assert_eq!(f.rule, Rule::GdtEntryModified);
        assert_eq!(
            (f.location.as_str(), f.from.as_str(), f.to.as_str()),
            (
                "GDT selector 0x8",
                "0x00af9b000000ffff",
                "0x00affb000000ffff"
            )
        );
    }

    #[test]
    fn syscall_table_hook() {
        let g = Guest::new();
        let mut c = g.checker();
        g.t.write(SCT_PA + 8, ROOTKIT);
        // One finding: the table's bytes are not part of the rodata hash.
        let f = one(&g, &mut c);
        assert_eq!(f.rule, Rule::SyscallTableModified);
        assert_eq!(f.vcpu, None);
        assert_eq!(f.location, "sys_call_table[1] (write)");
        assert_eq!(f.from_symbol.as_deref(), Some("__x64_sys_write+0x0"));
        assert_eq!(f.symbol.as_deref(), Some("rootkit_read+0x0"));
        assert_eq!(f.to, "0xffffffffc0000000");
    }

    #[test]
    fn idtr_moved_to_a_copy() {
        let mut g = Guest::new();
        let mut c = g.checker();
        let mut idt = vec![0u8; 4096];
        g.t.mem.read_slice(&mut idt, GuestAddress(IDT_PA)).unwrap();
        g.t.mem
            .write_slice(&idt, GuestAddress(IDT_COPY_PA))
            .unwrap();
        g.cpu.idt.base = IDT_COPY;
        let f = one(&g, &mut c);
        assert_eq!(f.rule, Rule::IdtrChanged);
        assert_eq!(
            (f.from.as_str(), f.to.as_str()),
            (
                "base 0xfffffe0000000000 limit 0xfff",
                "base 0xfffffe0000002000 limit 0xfff"
            )
        );
        // The copy's gates are compared with the baseline's.
        g.t.mem
            .write_slice(
                &gate(ROOTKIT, 0x10, 0, 0x8e),
                GuestAddress(IDT_COPY_PA + 3 * 16),
            )
            .unwrap();
        assert_eq!(one(&g, &mut c).location, "IDT vector 3");
        // An IDTR that points nowhere: the change, and the table it cannot read.
        g.cpu.idt.base = IDT + 0x10_0000;
        let mut f = g.check(&mut c);
        f.sort_by_key(|f| f.rule.as_str());
        assert_eq!(
            f.iter().map(|f| f.rule).collect::<Vec<_>>(),
            [Rule::IdtrChanged, Rule::IntegrityReadFailed]
        );
        assert_eq!(f[1].location, "IDT");
        assert!(f[1].message.contains("not mapped"), "{}", f[1].message);
        assert!(g.check(&mut c).is_empty());
    }
}
