//! What a guest kernel looks like now, as a person checks it: each vCPU's
//! protections and syscall entry, the exception gates of the IDT and the system
//! call table, each target named from the symbols and compared with what Linux
//! puts there (`entry_SYSCALL_64`, `asm_exc_*`, `__x64_sys_*`).

use serde::Serialize;

use crate::cpu::{CpuState, CR0_WP, CR4_SMAP, CR4_SMEP, CR4_UMIP, EFER_NXE, EFER_SCE};
use crate::hex;
use crate::{
    exception_handler_symbol, kaslr_slide, read_idt_gate, read_virt, syscall_name, GuestPhysMemory,
    KernelLayout, SymbolTable,
};

/// The whole view.
#[derive(Clone, Debug, Serialize)]
pub struct GuestView {
    pub cpus: Vec<CpuView>,
    /// The KASLR slide from the boot CPU's LSTAR against `entry_SYSCALL_64`, when
    /// the symbols have it and it is a whole number of 2 MiB.
    pub kaslr_slide: Option<i64>,
    /// The architectural exception gates (vectors 0 to 31) of the boot CPU's IDT.
    pub idt: Vec<GateView>,
    /// The system call table, when the symbols locate one.
    pub syscall_table: Vec<EntryView>,
    /// What could not be read, and why.
    pub notes: Vec<String>,
}

/// One vCPU.
#[derive(Clone, Debug, Serialize)]
pub struct CpuView {
    #[serde(flatten)]
    pub state: CpuState,
    /// What LSTAR points at.
    pub lstar_symbol: Option<String>,
    /// The protections that are on: `wp`, `smep`, `smap`, `umip`, `nxe`, `sce`.
    pub protections: Vec<&'static str>,
}

/// One IDT gate.
#[derive(Clone, Debug, Serialize)]
pub struct GateView {
    pub vector: u8,
    #[serde(with = "hex::u64")]
    pub handler: u64,
    pub present: bool,
    pub symbol: Option<String>,
    /// What Linux installs there (`asm_exc_page_fault`).
    pub linux_handler: Option<&'static str>,
}

/// One system call table entry.
#[derive(Clone, Debug, Serialize)]
pub struct EntryView {
    pub nr: usize,
    pub name: Option<&'static str>,
    #[serde(with = "hex::u64")]
    pub target: u64,
    pub symbol: Option<String>,
}

fn protections(c: &CpuState) -> Vec<&'static str> {
    [
        (c.cr0 & CR0_WP, "wp"),
        (c.cr4 & CR4_SMEP, "smep"),
        (c.cr4 & CR4_SMAP, "smap"),
        (c.cr4 & CR4_UMIP, "umip"),
        (c.efer & EFER_NXE, "nxe"),
        (c.efer & EFER_SCE, "sce"),
    ]
    .into_iter()
    .filter(|(bit, _)| *bit != 0)
    .map(|(_, name)| name)
    .collect()
}

impl GuestView {
    /// Reads the view from guest memory and the vCPUs' registers. Never fails on
    /// what the guest holds: what cannot be read becomes a note.
    pub fn read<M: GuestPhysMemory + ?Sized>(
        mem: &M,
        cpus: &[CpuState],
        symbols: Option<&SymbolTable>,
    ) -> Self {
        let describe = |a: u64| symbols.and_then(|s| s.describe(a));
        let mut notes = Vec::new();
        let boot = cpus.iter().find(|c| c.long_mode());
        let kaslr = match (symbols, boot) {
            (Some(s), Some(b)) => kaslr_slide(s, b.lstar),
            _ => None,
        };
        let mut idt = Vec::new();
        let mut syscall_table = Vec::new();
        match boot {
            None => notes.push("no vCPU is in long mode: no IDT or page tables to read".into()),
            Some(b) => {
                let gates = (u64::from(b.idt.limit) + 1) / 16;
                for vector in 0..gates.min(32) as u8 {
                    match read_idt_gate(mem, b.cr3, b.la57(), b.idt.base, vector) {
                        Ok(g) => idt.push(GateView {
                            vector,
                            handler: g.handler,
                            present: g.present,
                            symbol: describe(g.handler),
                            linux_handler: exception_handler_symbol(vector),
                        }),
                        Err(e) => {
                            notes.push(format!("IDT gate {vector}: {e}"));
                            break;
                        }
                    }
                }
                if let Some(s) = symbols {
                    match KernelLayout::from_symbols(s, kaslr.unwrap_or(0), None) {
                        Ok(layout) => {
                            if let Some(t) = layout.syscall_table {
                                let mut raw = vec![0u8; t.count * 8];
                                match read_virt(mem, b.cr3, b.la57(), t.addr, &mut raw) {
                                    Ok(()) => {
                                        for (nr, chunk) in raw.chunks_exact(8).enumerate() {
                                            let target = u64::from_le_bytes(
                                                chunk.try_into().expect("8-byte chunk"),
                                            );
                                            if target == 0 && t.count_is_bound {
                                                break;
                                            }
                                            syscall_table.push(EntryView {
                                                nr,
                                                name: syscall_name(nr as u64),
                                                target,
                                                symbol: describe(target),
                                            });
                                        }
                                    }
                                    Err(e) => notes.push(format!("sys_call_table: {e}")),
                                }
                            }
                        }
                        Err(e) => notes.push(e.to_string()),
                    }
                }
            }
        }
        GuestView {
            cpus: cpus
                .iter()
                .map(|c| CpuView {
                    state: *c,
                    lstar_symbol: describe(c.lstar),
                    protections: protections(c),
                })
                .collect(),
            kaslr_slide: kaslr,
            idt,
            syscall_table,
            notes,
        }
    }
}
