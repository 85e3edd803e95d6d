//! The kernel integrity monitor: a baseline of the guest kernel's protection
//! state taken at a moment policy chooses, and checks against it that report
//! each difference once.
//!
//! Plain library code: the integration layer pauses the vCPUs (or not), reads
//! their registers into [`CpuState`]s, lends guest memory and, when it has one,
//! the dirty log; it turns each [`Finding`] into a security event.
//!
//! ```no_run
//! use std::sync::Arc;
//! use vigil_introspect::*;
//! # fn demo(
//! #     mem: &vigil_vmm::GuestMemoryMmap,
//! #     cpus: &[CpuState],
//! #     map: SymbolTable,
//! # ) -> Result<(), Box<dyn std::error::Error>> {
//! let slide = kaslr_slide(&map, cpus[0].lstar).ok_or("LSTAR is not entry_SYSCALL_64")?;
//! let layout = KernelLayout::from_symbols(&map, slide, None)?;
//! let mut checker = Checker::new(Baseline::take(mem, cpus, &layout)?, Some(Arc::new(map)));
//! // Each period: the registers again, and the pages written since the last check.
//! let dirty = |_paddr: u64| true;
//! for finding in checker.check(mem, cpus, Some(&dirty)) {
//!     println!("{}", serde_json::to_string(&finding)?);
//! }
//! # Ok(())
//! # }
//! ```
//!
//! The parts: `baseline` (the record, and how it is taken), `registers`
//! (control registers and syscall MSRs, per vCPU), `tables` (IDT, GDT, the
//! syscall table), `pages` (kernel text and read-only data: hashes and
//! mappings) and `finding` (the finding record, and reporting each difference
//! once). This module holds the [`Checker`] that runs them, and which vCPU and
//! CR3 kernel addresses are walked with.

use std::collections::HashMap;
use std::sync::Arc;

use vigil_events::Rule;
use vigil_vmm::symbols::SymbolTable;

use crate::cpu::CpuState;
use crate::mem::GuestPhysMemory;
use crate::paging::translate;

mod baseline;
mod finding;
#[cfg(test)]
mod fixture;
mod modules;
mod pages;
mod registers;
mod tables;

pub use baseline::{
    Baseline, BaselineError, PageRecord, RegionBaseline, SyscallTableBaseline, VcpuBaseline,
};
pub use finding::{Finding, ReportedLocation, MAX_SYMBOL_OFFSET};
pub use modules::{ModulePage, ModuleText, MAX_MODULE_PAGES};
pub use pages::{Digest32, PAGE_SIZE};
pub use tables::{MAX_GDT_BYTES, MAX_IDT_BYTES};

use finding::{Key, Reported, Round, Symbolizer, REMEMBERED_VALUES};
use pages::{check_region, table_hole};
use registers::check_registers;
use tables::{check_syscall_table, check_tables};

/// Linux's page-table isolation (PTI) gives each process two top-level tables:
/// the kernel's, and 4 KiB above it the user one, which maps little of the
/// kernel. A vCPU stopped in user mode has the user one in CR3.
const PTI_USER_PGD: u64 = 1 << 12;

/// The CR3 to walk kernel addresses with for `cpu`: its own, or, when kernel
/// address `probe` does not translate through it and clearing the PTI bit makes
/// it translate, the kernel's table of the same process.
fn kernel_cr3(mem: &dyn GuestPhysMemory, cpu: &CpuState, probe: u64) -> u64 {
    let cr3 = cpu.cr3;
    if cr3 & PTI_USER_PGD != 0
        && translate(mem, cr3, cpu.la57(), probe).is_err()
        && translate(mem, cr3 & !PTI_USER_PGD, cpu.la57(), probe).is_ok()
    {
        cr3 & !PTI_USER_PGD
    } else {
        cr3
    }
}

/// The lowest-numbered vCPU in long mode.
fn reference_cpu(cpus: &[CpuState]) -> Option<&CpuState> {
    cpus.iter().filter(|c| c.long_mode()).min_by_key(|c| c.vcpu)
}

/// Checks a running guest against a [`Baseline`], reporting each difference once.
pub struct Checker {
    baseline: Baseline,
    symbols: Option<Arc<SymbolTable>>,
    reported: HashMap<Key, Reported>,
}

impl Checker {
    /// Checks against `baseline`, naming addresses with `symbols` (the kernel's
    /// `System.map`; the layout's KASLR slide is applied).
    pub fn new(baseline: Baseline, symbols: Option<Arc<SymbolTable>>) -> Self {
        Self {
            baseline,
            symbols,
            reported: HashMap::new(),
        }
    }

    /// Goes on checking against `baseline` where another checker left off,
    /// not reporting again what it had `reported` (see [`Checker::reported`]):
    /// a monitor carried by a snapshot or a migration. `baseline` must be
    /// valid ([`Baseline::validate`]); only the last values of a location are
    /// kept, as a checker keeps them.
    pub fn resume(
        baseline: Baseline,
        symbols: Option<Arc<SymbolTable>>,
        reported: Vec<ReportedLocation>,
    ) -> Self {
        let reported = reported
            .into_iter()
            .map(|r| {
                let skip = r.values.len().saturating_sub(REMEMBERED_VALUES);
                let values = r.values.into_iter().skip(skip).collect();
                ((r.rule, r.vcpu, r.location), Reported { values })
            })
            .collect();
        Self {
            baseline,
            symbols,
            reported,
        }
    }

    /// The baseline (with the vCPUs that joined since).
    pub fn baseline(&self) -> &Baseline {
        &self.baseline
    }

    /// The locations reported and not restored since, in a stable order.
    pub fn reported(&self) -> Vec<ReportedLocation> {
        let mut out: Vec<_> = self
            .reported
            .iter()
            .map(|((rule, vcpu, location), r)| ReportedLocation {
                rule: *rule,
                vcpu: *vcpu,
                location: location.clone(),
                values: r.values.iter().cloned().collect(),
            })
            .collect();
        out.sort_by(|a, b| {
            (a.rule.as_str(), a.vcpu, &a.location).cmp(&(b.rule.as_str(), b.vcpu, &b.location))
        });
        out
    }

    /// Compares the guest now with the baseline; returns the differences not
    /// reported before, and one "restored" finding for each reported location
    /// back at its baseline value.
    ///
    /// - Registers of each vCPU of `cpus` that has a baseline (a vCPU without
    ///   one is baselined now if it is in long mode, and compared from the next
    ///   check on).
    /// - Each vCPU's IDT and GDT (through its own CR3, at the base its IDTR and
    ///   GDTR hold now) and the syscall table: re-read in full every check (at
    ///   most 4 KiB, 64 KiB and 8 KiB).
    /// - Kernel text and read-only data: each page's mapping is re-walked every
    ///   check (through the lowest-numbered vCPU in long mode; with none in long
    ///   mode, the mappings and the syscall table wait for the next check); its bytes are
    ///   re-hashed, by the guest-physical page recorded at baseline, only when
    ///   `dirty` is `None` or says the page was written. `dirty` gets the page's
    ///   guest-physical address (4 KiB aligned) and must answer for every write
    ///   since the previous check (since the baseline for the first): a page it
    ///   calls clean is not read, so a change to it is not seen.
    ///
    /// Never panics on guest memory or register contents: what cannot be read is
    /// an `integrity_read_failed` finding.
    pub fn check(
        &mut self,
        mem: &dyn GuestPhysMemory,
        cpus: &[CpuState],
        dirty: Option<&dyn Fn(u64) -> bool>,
    ) -> Vec<Finding> {
        let Checker {
            baseline,
            symbols,
            reported,
        } = self;
        let sym = Symbolizer {
            map: symbols.as_deref(),
            slide: baseline.layout.slide,
        };
        let mut round = Round {
            out: Vec::new(),
            reported,
        };
        let probe = baseline.layout.text.start;
        for cpu in cpus {
            match baseline.vcpus.iter_mut().find(|v| v.cpu.vcpu == cpu.vcpu) {
                Some(vb) => {
                    let cr3 = kernel_cr3(mem, cpu, probe);
                    let volatile = &baseline.layout.gdt_volatile;
                    check_registers(&mut round, &sym, vb, cpu);
                    // Out of long mode its CR3 and table bases are not 64-bit
                    // virtual addresses.
                    if cpu.long_mode() {
                        check_tables(&mut round, &sym, mem, vb, cpu, cr3, volatile);
                    }
                }
                None if cpu.long_mode() => {
                    let (vb, errors) = VcpuBaseline::take(mem, cpu, kernel_cr3(mem, cpu, probe));
                    for (what, e) in errors {
                        round.read_failed(Some(cpu.vcpu), what, &e);
                    }
                    baseline.notes.push(format!(
                        "vCPU {} baselined at a later check, when first seen in long mode",
                        cpu.vcpu
                    ));
                    baseline.vcpus.push(vb);
                    baseline.vcpus.sort_by_key(|v| v.cpu.vcpu);
                }
                None => {}
            }
        }
        let reference = reference_cpu(cpus).map(|c| (c, kernel_cr3(mem, c, probe)));
        if let (Some(table), Some((cpu, cr3))) = (&baseline.syscall_table, reference) {
            check_syscall_table(&mut round, &sym, mem, table, cpu, cr3);
        }
        let regions = [
            Some((&baseline.text, Rule::KernelTextModified)),
            baseline
                .rodata
                .as_ref()
                .map(|r| (r, Rule::KernelRodataModified)),
        ];
        let hole = table_hole(
            &baseline.layout,
            baseline.syscall_table.as_ref().map(|t| t.entries.len()),
        );
        for (region, rule) in regions.into_iter().flatten() {
            check_region(&mut round, &sym, mem, region, rule, reference, dirty, hole);
        }
        if let (Some(area), Some(reference)) = (&baseline.layout.modules, reference) {
            let texts = &mut baseline.modules;
            let notes = &mut baseline.notes;
            modules::check(&mut round, mem, texts, notes, area, reference, dirty);
        }
        round.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::{CR0_PG, CR0_WP, EFER_LMA};
    use crate::integrity::fixture::*;
    use finding::REMEMBERED_VALUES;

    /// A checker carried elsewhere (its baseline and what it reported, through
    /// JSON, as a snapshot keeps them) goes on as if nothing happened.
    #[test]
    fn a_resumed_checker_goes_on_where_the_other_left_off() {
        let g = Guest::new();
        let mut c = g.checker();
        let text_page = |i: u64| TEXT_PA + i * KIB4;
        let original: u8 = g.t.mem.read_obj(GuestAddress(text_page(1) + 5)).unwrap();
        g.t.mem
            .write_obj(0xccu8, GuestAddress(text_page(1) + 5))
            .unwrap();
        assert_eq!(one(&g, &mut c).rule, Rule::KernelTextModified);
        // Changed after the last check, before the capture.
        g.t.mem
            .write_obj(0xccu8, GuestAddress(text_page(2) + 5))
            .unwrap();

        let json = c.baseline().to_json();
        let reported = serde_json::to_string(&c.reported()).unwrap();
        let baseline: Baseline = serde_json::from_str(&json).unwrap();
        baseline.validate().unwrap();
        assert_eq!(
            baseline.to_json(),
            json,
            "the baseline reads back as it was"
        );
        let reported: Vec<ReportedLocation> = serde_json::from_str(&reported).unwrap();
        assert_eq!(reported.len(), 1, "{reported:?}");
        let mut resumed = Checker::resume(baseline, Some(Arc::new(symbols())), reported);

        // Page 2 is found, page 1 is not reported again.
        let f = one(&g, &mut resumed);
        assert!(f.location.starts_with("kernel text page 0x802000"), "{f:?}");
        // Page 1 back as it was at the carried baseline: restored.
        g.t.mem
            .write_obj(original, GuestAddress(text_page(1) + 5))
            .unwrap();
        let f = one(&g, &mut resumed);
        assert!(
            f.restored && f.location.starts_with("kernel text page 0x801000"),
            "{f:?}"
        );
    }

    #[test]
    fn a_carried_baseline_that_the_checks_cannot_use_is_refused() {
        let g = Guest::new();
        let json: serde_json::Value =
            serde_json::from_str(&g.checker().baseline().to_json()).unwrap();
        let refused = |edit: &dyn Fn(&mut serde_json::Value), needle: &str| {
            let mut v = json.clone();
            edit(&mut v);
            let e = match serde_json::from_value::<Baseline>(v) {
                Ok(b) => b.validate().unwrap_err().to_string(),
                Err(e) => e.to_string(),
            };
            assert!(e.contains(needle), "{e} lacks {needle:?}");
        };
        refused(
            &|v| v["text"]["pages"][0]["len"] = 5000.into(),
            "text.pages[0]",
        );
        refused(
            &|v| v["text"]["pages"][1]["paddr"] = "0x801001".into(),
            "text.pages[1]",
        );
        refused(
            &|v| v["rodata"]["name"] = "kernel text".into(),
            "rodata.name",
        );
        refused(&|v| v["text"]["range"]["end"] = "0x0".into(), "text.range");
        refused(
            &|v| v["layout"]["text"]["end"] = "0x0".into(),
            "layout: kernel layout",
        );
        refused(
            &|v| v["layout"]["syscall_table"]["count"] = 100_000.into(),
            "layout",
        );
        refused(
            &|v| v["vcpus"][0]["idt"] = "00".repeat(4097).into(),
            "vcpus[0]",
        );
        refused(&|v| v["text"]["hash"] = "abcd".into(), "32-byte");
        refused(
            &|v| v["syscall_table"]["addr"] = "0x1".into(),
            "syscall_table",
        );
    }
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn vcpus_join_when_in_long_mode() {
        let g = Guest::new();
        let mut ap = g.cpu;
        ap.vcpu = 1;
        ap.cr0 = 0x10;
        ap.efer = 0;
        ap.cr3 = 0;
        let b = Baseline::take(&g.t.mem, &[g.cpu, ap], &Guest::layout()).unwrap();
        assert_eq!(b.vcpus.len(), 1);
        let mut c = Checker::new(b, None);
        assert!(c.check(&g.t.mem, &[g.cpu, ap], None).is_empty());
        // Started: baselined now, not compared.
        let mut ap = g.cpu;
        ap.vcpu = 1;
        ap.lstar = ROOTKIT;
        assert!(c.check(&g.t.mem, &[g.cpu, ap], None).is_empty());
        assert_eq!(c.baseline().vcpus.len(), 2);
        assert!(c.baseline().notes.iter().any(|n| n.contains("vCPU 1")));
        ap.cr0 &= !CR0_WP;
        let f = c.check(&g.t.mem, &[g.cpu, ap], None);
        assert_eq!(f.len(), 1, "{f:#?}");
        assert_eq!((f[0].rule, f[0].vcpu), (Rule::Cr0WpCleared, Some(1)));
        // Without symbols: no symbol names.
        ap.lstar = ENTRY_SYSCALL;
        let f = c.check(&g.t.mem, &[g.cpu, ap], None);
        assert_eq!((f.len(), f[0].symbol.as_deref()), (1, None));
    }

    #[test]
    fn pti_user_page_tables() {
        let mut g = Guest::new();
        // The kernel's top-level table copied to an 8 KiB-aligned page, and next
        // to it a user one that maps only the IDT/GDT area, as Linux's PTI has it.
        let (kernel, user) = (0x3e_0000, 0x3e_1000);
        let mut top = vec![0u8; 4096];
        g.t.mem
            .read_slice(&mut top, GuestAddress(g.t.root))
            .unwrap();
        g.t.mem.write_slice(&top, GuestAddress(kernel)).unwrap();
        let idt_slot = ((IDT >> 39) & 0x1ff) * 8;
        g.t.write(user + idt_slot, g.t.read(g.t.root + idt_slot));
        g.cpu.cr3 = user | 0x5; // and a PCID
        let mut c = g.checker();
        assert_eq!(c.baseline().text.pages[0].paddr, TEXT_PA);
        assert!(g.check(&mut c).is_empty());
        g.cpu.cr3 = kernel;
        assert!(g.check(&mut c).is_empty());
        g.cpu.cr3 = user;
        g.t.write(SCT_PA, ROOTKIT);
        assert_eq!(one(&g, &mut c).location, "sys_call_table[0] (read)");
    }

    #[test]
    fn checker_can_move_to_another_thread() {
        fn send<T: Send + Sync>() {}
        send::<Checker>();
        send::<Baseline>();
    }

    fn xorshift(mut x: u64) -> impl FnMut() -> u64 {
        move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        }
    }

    #[test]
    fn garbage_never_panics() {
        let g = Guest::new();
        let mut c = g.checker();
        let mut next = xorshift(0x2545_f491_4f6c_dd1d);
        let ram = 16u64 << 20;
        let mut words = 0;
        for round in 0..40 {
            // Scribble over some of RAM (tables, text, IDT included) and the registers.
            for _ in 0..2000 {
                let pa = next() % (ram / 8) * 8;
                let v = next();
                let v = if v & 1 == 0 {
                    (v & (ram - 1) & !0xfff) | 0x7
                } else {
                    v
                };
                g.t.write(pa, v);
                words += 1;
            }
            let cpus: Vec<CpuState> = (0..3)
                .map(|i| {
                    let mut cpu = CpuState {
                        vcpu: (next() % 4) as u32,
                        cr0: next(),
                        cr3: if i == 0 { g.t.root } else { next() },
                        cr4: next(),
                        efer: next(),
                        idt: crate::TableRegister {
                            base: next(),
                            limit: next() as u16,
                        },
                        gdt: crate::TableRegister {
                            base: next(),
                            limit: next() as u16,
                        },
                        lstar: next(),
                        star: next(),
                        cstar: next(),
                        sfmask: next(),
                        sysenter_cs: next(),
                        sysenter_esp: next(),
                        sysenter_eip: next(),
                    };
                    if round % 2 == 0 {
                        cpu.cr0 |= CR0_PG;
                        cpu.efer |= EFER_LMA;
                    }
                    cpu
                })
                .collect();
            let bits = next();
            let dirty: &dyn Fn(u64) -> bool = &|p| (p >> 12) & bits & 1 == 0;
            let _ = c.check(
                &g.t.mem,
                &cpus,
                if round % 3 == 0 { None } else { Some(dirty) },
            );
            let _ = Baseline::take(&g.t.mem, &cpus, &Guest::layout());
        }
        assert!(words > 0);
        // Findings were recorded, and memory of them stays bounded per location.
        assert!(c
            .reported
            .values()
            .all(|r| r.values.len() <= REMEMBERED_VALUES));
    }
}
