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
use std::time::{Duration, Instant};

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

/// How long an application processor may stay in long mode without its system
/// call entry before it is checked anyway: one that never sets it up must not
/// escape the checks (Linux takes a few milliseconds from long mode to
/// `syscall_init`; here, emulated, tens).
pub const AP_SETUP_WAIT: Duration = Duration::from_secs(10);

/// Whether application processor `ap` is up, so that it can be held to the
/// values of `boot` (the boot vCPU's baseline): in long mode with its system
/// call entry set up ([`CpuState::syscall_ready`]), or just in long mode when
/// the boot vCPU had none at baseline (a guest that does not use `syscall`).
/// Before that a kernel is still bringing it up: Linux's APs reach long mode on
/// a bring-up IDT, with no syscall MSRs yet.
fn ap_up(boot: &VcpuBaseline, ap: &CpuState) -> bool {
    ap.long_mode() && (ap.syscall_ready() || !boot.cpu.syscall_ready())
}

/// Application processor `cpu`, not in `baseline`, once it is up ([`ap_up`], or
/// in long mode for `wait` without its system call entry: `starting` has since
/// when): what it is expected to hold from the boot vCPU's baseline, to be
/// compared now; `None` while it is not up yet.
fn join(
    baseline: &mut Baseline,
    starting: &mut HashMap<u32, Instant>,
    wait: Duration,
    round: &mut Round,
    mem: &dyn GuestPhysMemory,
    cpu: &CpuState,
) -> Option<VcpuBaseline> {
    let boot = baseline.boot()?;
    if !cpu.long_mode() {
        // Not started, or back in reset: its wait starts again.
        starting.remove(&cpu.vcpu);
        return None;
    }
    let since = *starting.entry(cpu.vcpu).or_insert_with(Instant::now);
    let up = ap_up(boot, cpu);
    if !up && since.elapsed() < wait {
        return None;
    }
    starting.remove(&cpu.vcpu);
    let cr3 = kernel_cr3(mem, cpu, baseline.layout.text.start);
    let (vb, errors) = VcpuBaseline::expected(mem, boot, cpu, cr3);
    for (what, e) in errors {
        round.read_failed(Some(cpu.vcpu), what, &e);
    }
    let when = if up {
        "when first seen up".to_string()
    } else {
        format!("in long mode without its system call entry for {wait:?}")
    };
    let note = format!(
        "vCPU {} joined at a later check, {when}, held to vCPU {}'s baseline",
        cpu.vcpu, boot.cpu.vcpu
    );
    baseline.notes.push(note);
    Some(vb)
}

/// Checks a running guest against a [`Baseline`], reporting each difference once.
pub struct Checker {
    baseline: Baseline,
    symbols: Option<Arc<SymbolTable>>,
    reported: HashMap<Key, Reported>,
    /// Application processors in long mode but not up yet, since when.
    starting: HashMap<u32, Instant>,
    /// [`AP_SETUP_WAIT`] (shorter in tests).
    ap_setup_wait: Duration,
}

impl Checker {
    /// Checks against `baseline`, naming addresses with `symbols` (the kernel's
    /// `System.map`; the layout's KASLR slide is applied).
    pub fn new(baseline: Baseline, symbols: Option<Arc<SymbolTable>>) -> Self {
        Self {
            baseline,
            symbols,
            reported: HashMap::new(),
            starting: HashMap::new(),
            ap_setup_wait: AP_SETUP_WAIT,
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
            starting: HashMap::new(),
            ap_setup_wait: AP_SETUP_WAIT,
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
    /// - Registers of each vCPU of `cpus` that has a baseline. An application
    ///   processor without one joins once it is up (in long mode with its
    ///   system call entry set up, or [`AP_SETUP_WAIT`] after it reached long
    ///   mode), held to the boot vCPU's values, not its own
    ///   ([`VcpuBaseline::expected`]), and is compared at once.
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
            starting,
            ap_setup_wait,
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
            let vb = match baseline.vcpus.iter().position(|v| v.cpu.vcpu == cpu.vcpu) {
                Some(i) => i,
                None => {
                    let Some(vb) = join(baseline, starting, *ap_setup_wait, &mut round, mem, cpu)
                    else {
                        continue;
                    };
                    baseline.vcpus.push(vb);
                    baseline.vcpus.sort_by_key(|v| v.cpu.vcpu);
                    baseline
                        .vcpus
                        .iter()
                        .position(|v| v.cpu.vcpu == cpu.vcpu)
                        .expect("just pushed")
                }
            };
            // A table an AP's join could not read is filled from the boot
            // vCPU's when first read (cloned only then).
            let fill = {
                let vb = &baseline.vcpus[vb];
                (vb.expected_from.is_some() && (vb.idt.is_none() || vb.gdt.is_none()))
                    .then(|| baseline.boot().cloned())
                    .flatten()
            };
            let vb = &mut baseline.vcpus[vb];
            check_registers(&mut round, &sym, vb, cpu);
            // Out of long mode its CR3 and table bases are not 64-bit virtual
            // addresses.
            if cpu.long_mode() {
                let cr3 = kernel_cr3(mem, cpu, probe);
                let volatile = &baseline.layout.gdt_volatile;
                check_tables(&mut round, &sym, mem, vb, fill.as_ref(), cpu, cr3, volatile);
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

    /// Where the fixture's application processor keeps its own GDT.
    const AP_GDT_OFF: u64 = 0x800;

    /// An application processor of the fixture as a kernel brings one up: the
    /// boot vCPU's IDT and syscall MSRs; its own GDT (a copy at another base,
    /// its TSS descriptor with its own base, a data descriptor with its own
    /// limit, as Linux's CPUNODE one), its own SYSENTER_ESP.
    fn ap(g: &Guest) -> CpuState {
        for (i, d) in GDT_ENTRIES.iter().enumerate() {
            g.t.write(GDT_PA + AP_GDT_OFF + i as u64 * 8, *d);
        }
        g.t.write(GDT_PA + AP_GDT_OFF + 0x28, GDT_ENTRIES[5] | 0x3000 << 16);
        g.t.write(GDT_PA + AP_GDT_OFF + 0x30, 0xffff_fe01);
        g.t.write(GDT_PA + AP_GDT_OFF + 0x18, GDT_ENTRIES[3] & !0xffff | 0x1);
        CpuState {
            vcpu: 1,
            gdt: crate::TableRegister {
                base: GDT + AP_GDT_OFF,
                limit: g.cpu.gdt.limit,
            },
            sysenter_esp: 0xffff_fe00_0000_9000,
            ..g.cpu
        }
    }

    #[test]
    fn an_ap_joins_when_up_held_to_the_boot_vcpus_values() {
        let g = Guest::new();
        let mut starting = ap(&g);
        starting.cr0 = 0x10;
        starting.efer = 0;
        let b = Baseline::take(&g.t.mem, &[g.cpu, starting], &Guest::layout()).unwrap();
        assert_eq!(b.vcpus.len(), 1);
        let mut c = Checker::new(b, Some(Arc::new(symbols())));
        assert!(c.check(&g.t.mem, &[g.cpu, starting], None).is_empty());
        // In long mode on a bring-up IDT, no syscall MSRs yet (as Linux's APs
        // reach long mode): not compared yet.
        starting.cr0 = g.cpu.cr0;
        starting.efer = g.cpu.efer;
        starting.idt.base = IDT_COPY;
        starting.lstar = 0;
        assert!(c.check(&g.t.mem, &[g.cpu, starting], None).is_empty());
        assert_eq!(c.baseline().vcpus.len(), 1);
        // Up, with the boot vCPU's values and its own per-CPU ones: nothing.
        let mut up = ap(&g);
        assert!(c.check(&g.t.mem, &[g.cpu, up], None).is_empty());
        let b = c.baseline();
        assert_eq!(b.vcpus.len(), 2);
        assert_eq!(b.vcpus[1].expected_from, Some(0));
        assert!(
            b.notes.iter().any(|n| n.contains("vCPU 1 joined")
                && n.contains("first seen up")
                && n.contains("vCPU 0's baseline")),
            "{:?}",
            b.notes
        );
        // Carried as it is.
        let back: Baseline = serde_json::from_str(&b.to_json()).unwrap();
        back.validate().unwrap();
        assert_eq!(back.vcpus[1].expected_from, Some(0));
        // From then on compared as any vCPU: its own TSS base stays its own.
        g.t.write(GDT_PA + AP_GDT_OFF + 0x28, GDT_ENTRIES[5] | 0x4000 << 16);
        let f = one_of(&g, &mut c, &[g.cpu, up]);
        assert_eq!(
            (f.rule, f.vcpu, f.location.as_str()),
            (Rule::GdtEntryModified, Some(1), "GDT selector 0x28")
        );
        up.cr0 &= !CR0_WP;
        let f = c.check(&g.t.mem, &[g.cpu, up], None);
        assert_eq!(f.len(), 1, "{f:#?}");
        assert_eq!((f[0].rule, f[0].vcpu), (Rule::Cr0WpCleared, Some(1)));
        assert!(
            f[0].message
                .starts_with("vCPU 1 (against vCPU 0's baseline): CR0.WP"),
            "{}",
            f[0].message
        );
    }

    #[test]
    fn an_ap_that_differs_from_the_boot_vcpu_is_found() {
        type Tamper = dyn Fn(&Guest, &mut CpuState);
        let hostile: [(&str, Rule, &str, &Tamper); 6] = [
            ("LSTAR", Rule::SyscallMsrChanged, "LSTAR", &|_, c| {
                c.lstar = ROOTKIT
            }),
            ("IDTR", Rule::IdtrChanged, "IDTR", &|g, c| {
                let mut idt = vec![0u8; 4096];
                g.t.mem.read_slice(&mut idt, GuestAddress(IDT_PA)).unwrap();
                g.t.mem
                    .write_slice(&idt, GuestAddress(IDT_COPY_PA))
                    .unwrap();
                c.idt.base = IDT_COPY;
            }),
            (
                "GDT type",
                Rule::GdtEntryModified,
                "GDT selector 0x8",
                &|g, _| {
                    // Its kernel code segment made DPL 3.
                    g.t.write(GDT_PA + AP_GDT_OFF + 0x08, GDT_ENTRIES[1] | 3 << 45)
                },
            ),
            ("GDT limit", Rule::GdtrChanged, "GDTR", &|_, c| {
                c.gdt.limit = 0x3f
            }),
            ("WP", Rule::Cr0WpCleared, "CR0.WP", &|_, c| c.cr0 &= !CR0_WP),
            (
                "SYSENTER_EIP",
                Rule::SyscallMsrChanged,
                "SYSENTER_EIP",
                &|_, c| c.sysenter_eip = ROOTKIT,
            ),
        ];
        for (what, rule, location, tamper) in hostile {
            let g = Guest::new();
            let mut c = g.checker();
            let mut up = ap(&g);
            tamper(&g, &mut up);
            let f = one_of(&g, &mut c, &[g.cpu, up]);
            assert_eq!(
                (f.rule, f.vcpu, f.location.as_str()),
                (rule, Some(1), location),
                "{what}: {f:#?}"
            );
            assert!(
                f.message
                    .starts_with("vCPU 1 (against vCPU 0's baseline): "),
                "{what}: {}",
                f.message
            );
            if rule == Rule::SyscallMsrChanged && location == "LSTAR" {
                assert_eq!(f.from_symbol.as_deref(), Some("entry_SYSCALL_64+0x0"));
                assert_eq!(f.symbol.as_deref(), Some("rootkit_read+0x0"));
                // Agreeing with the boot vCPU again: restored.
                up.lstar = ENTRY_SYSCALL;
                let r = one_of(&g, &mut c, &[g.cpu, up]);
                assert!(r.restored && r.location == "LSTAR", "{r:#?}");
            }
        }
    }

    #[test]
    fn an_aps_gdt_unreadable_at_its_join_gets_the_boot_layout_when_read() {
        let g = Guest::new();
        let mut c = g.checker();
        let mut up = ap(&g);
        let own = up.gdt.base;
        up.gdt.base = GDT + 0x10_0000;
        let f = one_of(&g, &mut c, &[g.cpu, up]);
        assert_eq!(
            (f.rule, f.location.as_str()),
            (Rule::IntegrityReadFailed, "GDT")
        );
        assert!(c.baseline().vcpus[1].gdt.is_none());
        // Readable now (moved: reported as for any vCPU); its own TSS base and
        // descriptor limit are its own, the rest the boot vCPU's layout.
        up.gdt.base = own;
        let f = one_of(&g, &mut c, &[g.cpu, up]);
        assert_eq!(
            (f.rule, f.location.as_str()),
            (Rule::GdtrChanged, "GDTR"),
            "{f:#?}"
        );
        g.t.write(GDT_PA + AP_GDT_OFF + 0x10, GDT_ENTRIES[2] | 3 << 45);
        let f = one_of(&g, &mut c, &[g.cpu, up]);
        assert_eq!(
            (f.rule, f.location.as_str(), f.from.as_str()),
            (
                Rule::GdtEntryModified,
                "GDT selector 0x10",
                "0x00cf93000000ffff"
            )
        );
    }

    #[test]
    fn an_ap_up_at_the_baseline_is_not_trusted_either() {
        let g = Guest::new();
        let mut up = ap(&g);
        up.lstar = ROOTKIT;
        let b = Baseline::take(&g.t.mem, &[g.cpu, up], &Guest::layout()).unwrap();
        assert_eq!(b.vcpus[1].expected_from, Some(0));
        assert_eq!(b.vcpus[1].cpu.lstar, ENTRY_SYSCALL);
        let mut c = Checker::new(b, None);
        let f = one_of(&g, &mut c, &[g.cpu, up]);
        assert_eq!((f.rule, f.vcpu), (Rule::SyscallMsrChanged, Some(1)));
        // A carried baseline whose AP is held to another vCPU is refused.
        let mut v: serde_json::Value = serde_json::from_str(&c.baseline().to_json()).unwrap();
        v["vcpus"][1]["expected_from"] = 1.into();
        let b: Baseline = serde_json::from_value(v).unwrap();
        let e = b.validate().unwrap_err().to_string();
        assert!(e.contains("vcpus[1].expected_from"), "{e}");
    }

    #[test]
    fn an_ap_that_never_sets_up_its_syscall_entry_is_checked_after_the_wait() {
        let g = Guest::new();
        let mut c = g.checker();
        c.ap_setup_wait = Duration::ZERO;
        let mut rogue = ap(&g);
        rogue.lstar = 0;
        rogue.idt.base = IDT_COPY;
        let mut f = c.check(&g.t.mem, &[g.cpu, rogue], None);
        f.sort_by_key(|f| f.location.clone());
        let found: Vec<_> = f.iter().map(|f| (f.rule, f.location.as_str())).collect();
        // IDTR moved, and the (empty) copy's gates differ from the boot IDT's.
        assert!(found.contains(&(Rule::IdtrChanged, "IDTR")), "{found:?}");
        assert!(
            found.contains(&(Rule::SyscallMsrChanged, "LSTAR")),
            "{found:?}"
        );
        assert!(
            c.baseline()
                .notes
                .iter()
                .any(|n| n.contains("without its system call entry")),
            "{:?}",
            c.baseline().notes
        );
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
