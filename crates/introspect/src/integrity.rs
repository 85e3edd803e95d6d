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
//! #     mem: &vm_memory::GuestMemoryMmap,
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

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use serde::Serialize;
use sha2::{Digest, Sha256};
use vigil_events::{Mitre, Priority, Rule};
use vigil_vmm::symbols::SymbolTable;

use crate::cpu::{CpuState, CR0_WP, CR4_SMAP, CR4_SMEP, CR4_UMIP, EFER_NXE, EFER_SCE};
use crate::hex;
use crate::kaslr::decode_idt_gate;
use crate::layout::{KernelLayout, VirtRange};
use crate::mem::GuestPhysMemory;
use crate::paging::{read_virt, translate, Translation, WalkError};
use crate::syscall::syscall_name;

/// The page size the baseline hashes by, and the dirty log's granularity.
pub const PAGE_SIZE: u64 = 0x1000;
/// The most IDT bytes read: 256 gates of 16 bytes.
pub const MAX_IDT_BYTES: usize = 4096;
/// The most GDT bytes read: the largest limit, 0xffff, plus one.
pub const MAX_GDT_BYTES: usize = 0x1_0000;
/// A symbol names an address only up to this far past its start; further than
/// that (module space, with only the kernel's map) the address has no symbol.
pub const MAX_SYMBOL_OFFSET: u64 = 1 << 20;
/// How many distinct new values of one location are remembered as reported.
const REMEMBERED_VALUES: usize = 16;

/// A cryptographic digest (SHA-256): the guest chooses the bytes it hashes, so a
/// non-cryptographic hash would let it craft a collision.
pub type Digest32 = [u8; 32];

fn sha256(parts: &[u8]) -> Digest32 {
    Sha256::digest(parts).into()
}

/// One difference from the baseline (or its end: `restored`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub rule: Rule,
    /// [`Rule::default_priority`], or Notice when `restored`.
    pub priority: Priority,
    /// [`Rule::mitre`].
    pub mitre: Option<Mitre>,
    /// The vCPU whose register or descriptor table it is; `None` for memory all
    /// vCPUs share (syscall table, kernel text and read-only data).
    pub vcpu: Option<u32>,
    /// Where: `IDT vector 14`, `LSTAR`, `sys_call_table[1] (write)`,
    /// `kernel text page 0x1234000 (_stext+0x3000)`.
    pub location: String,
    /// The baseline value (hex address or register, a hash, `set`).
    pub from: String,
    /// The value now.
    pub to: String,
    /// The symbol the baseline value points at, when it is an address.
    pub from_symbol: Option<String>,
    /// The symbol the new value points at (or the page's first protected byte is
    /// in), when known.
    pub symbol: Option<String>,
    /// True: the location is back at its baseline value (`to`), after it was
    /// reported at `from`.
    pub restored: bool,
    /// One line for a human.
    pub message: String,
}

/// One vCPU at baseline: its registers and a copy of its descriptor tables.
#[derive(Clone, Debug, Serialize)]
pub struct VcpuBaseline {
    pub cpu: CpuState,
    /// The IDT's `limit + 1` bytes (at most [`MAX_IDT_BYTES`]), hex; `None` until
    /// it could be read.
    #[serde(serialize_with = "hex::opt_bytes::serialize")]
    pub idt: Option<Vec<u8>>,
    /// The GDT's `limit + 1` bytes (at most [`MAX_GDT_BYTES`]), hex.
    #[serde(serialize_with = "hex::opt_bytes::serialize")]
    pub gdt: Option<Vec<u8>>,
}

/// One page of a protected region at baseline.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PageRecord {
    /// The guest-virtual page.
    #[serde(with = "hex::u64")]
    pub vaddr: u64,
    /// The guest-physical 4 KiB page it translated to: what is re-hashed, and
    /// what the dirty log is asked about.
    #[serde(with = "hex::u64")]
    pub paddr: u64,
    /// The protected bytes: `offset..offset + len` of the page.
    pub offset: u32,
    pub len: u32,
    /// Whether the mapping was writable.
    pub writable: bool,
    /// SHA-256 of the protected bytes (the syscall table's zeroed), hex.
    #[serde(serialize_with = "hex::digest::serialize")]
    pub hash: Digest32,
}

/// A protected region at baseline.
#[derive(Clone, Debug, Serialize)]
pub struct RegionBaseline {
    /// `kernel text` or `kernel read-only data`.
    pub name: &'static str,
    pub range: VirtRange,
    /// SHA-256 of the whole region (its pages' protected bytes in order), for
    /// display.
    #[serde(serialize_with = "hex::digest::serialize")]
    pub hash: Digest32,
    pub pages: Vec<PageRecord>,
}

/// The system call table at baseline.
#[derive(Clone, Debug, Serialize)]
pub struct SyscallTableBaseline {
    #[serde(with = "hex::u64")]
    pub addr: u64,
    /// The entries (handler addresses), as `"0x..."`.
    #[serde(serialize_with = "hex::u64_vec::serialize")]
    pub entries: Vec<u64>,
}

/// The kernel's protection state at a moment policy chose.
#[derive(Clone, Debug, Serialize)]
pub struct Baseline {
    pub layout: KernelLayout,
    /// The vCPU whose CR3 translated the regions (the lowest-numbered one in long
    /// mode, normally the boot CPU 0).
    pub reference_vcpu: u32,
    /// vCPUs in long mode, by vCPU number; others join when a check first sees
    /// them in long mode.
    pub vcpus: Vec<VcpuBaseline>,
    pub syscall_table: Option<SyscallTableBaseline>,
    pub text: RegionBaseline,
    pub rodata: Option<RegionBaseline>,
    /// What the baseline had to do without, and vCPUs that joined later.
    pub notes: Vec<String>,
}

/// A baseline that cannot be taken.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BaselineError {
    #[error("integrity baseline: no vCPU is in long mode with paging (CR0.PG and EFER.LMA)")]
    NoLongModeVcpu,
    #[error("integrity baseline: {what} cannot be read: {source}")]
    Unreadable {
        what: String,
        #[source]
        source: WalkError,
    },
}

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

/// The `limit + 1` bytes (at most `max`) of the table at `base`.
fn read_table(
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

impl VcpuBaseline {
    /// Registers and descriptor tables of `cpu` (in long mode; tables read
    /// through `cr3`); a table that cannot be read is `None`, with its error.
    fn take(
        mem: &dyn GuestPhysMemory,
        cpu: &CpuState,
        cr3: u64,
    ) -> (Self, Vec<(String, WalkError)>) {
        let mut errors = Vec::new();
        let idt = read_table(mem, cr3, cpu, cpu.idt.base, cpu.idt.limit, MAX_IDT_BYTES)
            .map_err(|e| errors.push(("IDT".to_string(), e)))
            .ok();
        let gdt = read_table(mem, cr3, cpu, cpu.gdt.base, cpu.gdt.limit, MAX_GDT_BYTES)
            .map_err(|e| errors.push(("GDT".to_string(), e)))
            .ok();
        (
            Self {
                cpu: *cpu,
                idt,
                gdt,
            },
            errors,
        )
    }
}

/// The lowest-numbered vCPU in long mode.
fn reference_cpu(cpus: &[CpuState]) -> Option<&CpuState> {
    cpus.iter().filter(|c| c.long_mode()).min_by_key(|c| c.vcpu)
}

/// Zeroes the bytes of `buf` (guest-virtual `va..`) that lie in `hole`.
fn zero_hole(buf: &mut [u8], va: u64, hole: Option<(u64, u64)>) {
    let Some((hs, he)) = hole else { return };
    let end = va.saturating_add(buf.len() as u64);
    let (s, e) = (hs.max(va), he.min(end));
    if s < e {
        buf[(s - va) as usize..(e - va) as usize].fill(0);
    }
}

/// The guest-virtual range of the syscall table's bytes, left out of the region
/// hashes.
fn table_hole(layout: &KernelLayout, entries: Option<usize>) -> Option<(u64, u64)> {
    let t = layout.syscall_table?;
    let n = entries.unwrap_or(t.count) as u64;
    Some((t.addr, t.addr.saturating_add(n * 8)))
}

fn hash_region(
    mem: &dyn GuestPhysMemory,
    cpu: &CpuState,
    cr3: u64,
    name: &'static str,
    range: VirtRange,
    hole: Option<(u64, u64)>,
) -> Result<RegionBaseline, BaselineError> {
    let mut whole = Sha256::new();
    let mut pages = Vec::new();
    let mut buf = vec![0u8; PAGE_SIZE as usize];
    let mut va = range.start;
    while va < range.end {
        let page = va & !(PAGE_SIZE - 1);
        let next = page.saturating_add(PAGE_SIZE).min(range.end);
        let (offset, len) = (va - page, next - va);
        let err = |source| BaselineError::Unreadable {
            what: format!("{name} at {va:#x}"),
            source,
        };
        let t = translate(mem, cr3, cpu.la57(), va).map_err(err)?;
        let paddr = t.paddr & !(PAGE_SIZE - 1);
        let b = &mut buf[..len as usize];
        mem.read_phys(paddr + offset, b).map_err(|_| {
            err(WalkError::OutsideRam {
                vaddr: va,
                level: "page",
                paddr: paddr + offset,
            })
        })?;
        zero_hole(b, va, hole);
        whole.update(&*b);
        pages.push(PageRecord {
            vaddr: page,
            paddr,
            offset: offset as u32,
            len: len as u32,
            writable: t.writable,
            hash: sha256(b),
        });
        va = next;
    }
    Ok(RegionBaseline {
        name,
        range,
        hash: whole.finalize().into(),
        pages,
    })
}

impl Baseline {
    /// Takes the baseline: every vCPU of `cpus` in long mode (registers, IDT and
    /// GDT through its own CR3), the syscall table, and kernel text and read-only
    /// data page by page, translated through the CR3 of the lowest-numbered vCPU
    /// in long mode. A page of a region that does not translate, or a table that
    /// cannot be read, is an error naming it: a baseline with holes would protect
    /// less than it says. vCPUs not in long mode (application processors not
    /// started yet) are left out; a check baselines each when it first sees it in
    /// long mode.
    ///
    /// The syscall table's bytes are left out of (zeroed in) the region hashes, so
    /// a hooked entry is reported once, as `syscall_table_modified`. When its
    /// count is an upper bound (see [`crate::SyscallTableLoc`]), trailing zero
    /// entries are dropped.
    pub fn take(
        mem: &dyn GuestPhysMemory,
        cpus: &[CpuState],
        layout: &KernelLayout,
    ) -> Result<Self, BaselineError> {
        let reference = reference_cpu(cpus).ok_or(BaselineError::NoLongModeVcpu)?;
        let probe = layout.text.start;
        let ref_cr3 = kernel_cr3(mem, reference, probe);
        let mut vcpus: Vec<VcpuBaseline> = Vec::new();
        let mut sorted: Vec<&CpuState> = cpus.iter().filter(|c| c.long_mode()).collect();
        sorted.sort_by_key(|c| c.vcpu);
        sorted.dedup_by_key(|c| c.vcpu);
        for cpu in sorted {
            let (vb, errors) = VcpuBaseline::take(mem, cpu, kernel_cr3(mem, cpu, probe));
            if let Some((what, source)) = errors.into_iter().next() {
                return Err(BaselineError::Unreadable {
                    what: format!("vCPU {}'s {what}", cpu.vcpu),
                    source,
                });
            }
            vcpus.push(vb);
        }
        let syscall_table = match layout.syscall_table {
            Some(loc) => {
                let mut raw = vec![0u8; loc.count * 8];
                read_virt(mem, ref_cr3, reference.la57(), loc.addr, &mut raw).map_err(
                    |source| BaselineError::Unreadable {
                        what: "sys_call_table".into(),
                        source,
                    },
                )?;
                let mut entries: Vec<u64> = raw
                    .chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
                    .collect();
                if loc.count_is_bound {
                    while entries.last() == Some(&0) {
                        entries.pop();
                    }
                }
                Some(SyscallTableBaseline {
                    addr: loc.addr,
                    entries,
                })
            }
            None => None,
        };
        let hole = table_hole(layout, syscall_table.as_ref().map(|t| t.entries.len()));
        let text = hash_region(mem, reference, ref_cr3, "kernel text", layout.text, hole)?;
        let rodata = layout
            .rodata
            .map(|r| hash_region(mem, reference, ref_cr3, "kernel read-only data", r, hole))
            .transpose()?;
        let mut notes = layout.notes.clone();
        if let (Some(loc), Some(t)) = (layout.syscall_table, &syscall_table) {
            if t.entries.len() != loc.count {
                notes.push(format!(
                    "sys_call_table: {} entries ({} slots up to the next symbol, the rest zero padding)",
                    t.entries.len(),
                    loc.count
                ));
            }
        }
        Ok(Self {
            layout: layout.clone(),
            reference_vcpu: reference.vcpu,
            vcpus,
            syscall_table,
            text,
            rodata,
            notes,
        })
    }

    /// The baseline as JSON (for the API).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a Baseline always serializes")
    }
}

/// Names addresses with the kernel's symbols (link-time addresses, moved by the
/// slide).
struct Symbolizer<'a> {
    map: Option<&'a SymbolTable>,
    slide: i64,
}

impl Symbolizer<'_> {
    fn name(&self, addr: u64) -> Option<String> {
        let (name, off) = self.map?.lookup(addr.wrapping_sub(self.slide as u64))?;
        (off <= MAX_SYMBOL_OFFSET).then(|| format!("{name}+{off:#x}"))
    }
}

/// A location under watch: rule, vCPU, where.
type Key = (Rule, Option<u32>, String);

/// The values reported for one location, most recent last.
#[derive(Debug, Default)]
struct Reported {
    values: VecDeque<String>,
}

/// One check's findings and the memory of what was reported.
struct Round<'a> {
    out: Vec<Finding>,
    reported: &'a mut HashMap<Key, Reported>,
}

impl Round<'_> {
    /// A location that differs from its baseline: reported unless this value was.
    fn differs(&mut self, f: Finding) {
        let r = self
            .reported
            .entry((f.rule, f.vcpu, f.location.clone()))
            .or_default();
        if r.values.contains(&f.to) {
            // Reported already; keep it the most recent.
            r.values.retain(|v| v != &f.to);
            r.values.push_back(f.to);
            return;
        }
        if r.values.len() == REMEMBERED_VALUES {
            r.values.pop_front();
        }
        r.values.push_back(f.to.clone());
        self.out.push(f);
    }

    /// A location at its baseline value `baseline`: if a difference was reported,
    /// one "restored" finding. `location` is only built when something was
    /// reported.
    fn same(
        &mut self,
        rule: Rule,
        vcpu: Option<u32>,
        location: impl FnOnce() -> String,
        baseline: impl FnOnce() -> String,
    ) {
        if self.reported.is_empty() {
            return;
        }
        let key = (rule, vcpu, location());
        let Some(r) = self.reported.remove(&key) else {
            return;
        };
        if rule == Rule::IntegrityReadFailed {
            return;
        }
        let (rule, vcpu, location) = key;
        let from = r.values.back().cloned().unwrap_or_default();
        let to = baseline();
        let who = vcpu.map(|v| format!("vCPU {v}: ")).unwrap_or_default();
        self.out.push(Finding {
            rule,
            priority: Priority::Notice,
            mitre: rule.mitre(),
            vcpu,
            message: format!("{who}{location} is back at its baseline value {to} (was {from})"),
            location,
            from,
            to,
            from_symbol: None,
            symbol: None,
            restored: true,
        });
    }

    fn read_failed(&mut self, vcpu: Option<u32>, location: String, error: &WalkError) {
        let who = vcpu.map(|v| format!("vCPU {v}: ")).unwrap_or_default();
        self.differs(finding(
            Rule::IntegrityReadFailed,
            vcpu,
            location.clone(),
            "readable".into(),
            "unreadable".into(),
            None,
            None,
            format!("{who}{location} cannot be read for the integrity check: {error}"),
        ));
    }
}

#[allow(clippy::too_many_arguments)]
fn finding(
    rule: Rule,
    vcpu: Option<u32>,
    location: String,
    from: String,
    to: String,
    from_symbol: Option<String>,
    symbol: Option<String>,
    message: String,
) -> Finding {
    Finding {
        rule,
        priority: rule.default_priority(),
        mitre: rule.mitre(),
        vcpu,
        location,
        from,
        to,
        from_symbol,
        symbol,
        restored: false,
        message,
    }
}

fn with_sym(addr: u64, sym: &Option<String>) -> String {
    match sym {
        Some(s) => format!("{addr:#x} ({s})"),
        None => format!("{addr:#x}"),
    }
}

fn set_or_clear(v: u64, bit: u64) -> &'static str {
    if v & bit != 0 {
        "set"
    } else {
        "clear"
    }
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

    /// The baseline (with the vCPUs that joined since).
    pub fn baseline(&self) -> &Baseline {
        &self.baseline
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
                    check_vcpu(&mut round, &sym, mem, vb, cpu, cr3, volatile)
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
        round.out
    }
}

fn check_vcpu(
    round: &mut Round,
    sym: &Symbolizer,
    mem: &dyn GuestPhysMemory,
    vb: &mut VcpuBaseline,
    cpu: &CpuState,
    cr3: u64,
    gdt_volatile: &[u16],
) {
    let old = vb.cpu;
    let v = Some(cpu.vcpu);
    let who = format!("vCPU {}", cpu.vcpu);
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
    if !cpu.long_mode() {
        // Its CR3 and table bases are not 64-bit virtual addresses now.
        return;
    }
    // The tables the registers point at now, against the baseline's copies.
    match read_table(mem, cr3, cpu, cpu.idt.base, cpu.idt.limit, MAX_IDT_BYTES) {
        Err(e) => round.read_failed(v, "IDT".into(), &e),
        Ok(now) => {
            round.same(Rule::IntegrityReadFailed, v, || "IDT".into(), String::new);
            match &vb.idt {
                None => vb.idt = Some(now),
                Some(base) => compare_idt(round, sym, &who, v, base, &now),
            }
        }
    }
    match read_table(mem, cr3, cpu, cpu.gdt.base, cpu.gdt.limit, MAX_GDT_BYTES) {
        Err(e) => round.read_failed(v, "GDT".into(), &e),
        Ok(now) => {
            round.same(Rule::IntegrityReadFailed, v, || "GDT".into(), String::new);
            match &vb.gdt {
                None => vb.gdt = Some(now),
                Some(base) => compare_gdt(round, &who, v, base, &now, gdt_volatile),
            }
        }
    }
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

fn check_syscall_table(
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

fn describe_mapping(paddr: u64, writable: bool) -> String {
    format!("{paddr:#x} {}", if writable { "rw" } else { "ro" })
}

#[allow(clippy::too_many_arguments)]
fn check_region(
    round: &mut Round,
    sym: &Symbolizer,
    mem: &dyn GuestPhysMemory,
    region: &RegionBaseline,
    rule: Rule,
    reference: Option<(&CpuState, u64)>,
    dirty: Option<&dyn Fn(u64) -> bool>,
    hole: Option<(u64, u64)>,
) {
    let mut buf = vec![0u8; PAGE_SIZE as usize];
    // The large page (2 MiB, 1 GiB) the last walk ended in: the 4 KiB pages
    // inside it translate without walking again (Linux maps its text and
    // read-only data with 2 MiB pages, so this saves most of the walks).
    let mut large: Option<(u64, Translation)> = None;
    for page in &region.pages {
        let va = page.vaddr + u64::from(page.offset);
        let location = || match sym.name(va) {
            Some(s) => format!("{} page {:#x} ({s})", region.name, page.paddr),
            None => format!("{} page {:#x}", region.name, page.paddr),
        };
        // The mapping: the same guest-physical page, not made writable.
        if let Some((cpu, cr3)) = reference {
            let mapped = || describe_mapping(page.paddr, page.writable);
            let now = match large {
                Some((base, t)) if va & !(t.page_size - 1) == base => Ok(Translation {
                    paddr: t.page_base() + (va & (t.page_size - 1)),
                    ..t
                }),
                _ => translate(mem, cr3, cpu.la57(), va),
            };
            large = match &now {
                Ok(t) if t.page_size > PAGE_SIZE => Some((va & !(t.page_size - 1), *t)),
                _ => None,
            };
            let now_desc = match &now {
                Ok(t) => {
                    let p = t.paddr & !(PAGE_SIZE - 1);
                    (p != page.paddr || t.writable != page.writable)
                        .then(|| describe_mapping(p, t.writable))
                }
                Err(_) => Some("not mapped".to_string()),
            };
            let mrule = Rule::KernelMappingChanged;
            match now_desc {
                None => round.same(mrule, None, location, mapped),
                Some(to) => {
                    let mapped = mapped();
                    let why = match &now {
                        Err(e) => format!(": {e}"),
                        Ok(_) => String::new(),
                    };
                    let location = location();
                    round.differs(finding(
                        mrule,
                        None,
                        location.clone(),
                        mapped.clone(),
                        to.clone(),
                        None,
                        sym.name(va),
                        format!(
                            "{location} (virtual {:#x}) was mapped to {mapped}, now {to}{why}",
                            page.vaddr
                        ),
                    ));
                }
            }
        }
        // The bytes, by the guest-physical page of the baseline.
        if dirty.is_some_and(|d| !d(page.paddr)) {
            continue;
        }
        let b = &mut buf[..page.len as usize];
        let pa = page.paddr + u64::from(page.offset);
        if mem.read_phys(pa, b).is_err() {
            let e = WalkError::OutsideRam {
                vaddr: va,
                level: "page",
                paddr: pa,
            };
            round.read_failed(None, location(), &e);
            continue;
        }
        round.same(Rule::IntegrityReadFailed, None, location, String::new);
        zero_hole(b, va, hole);
        let h = sha256(b);
        let from = hex::bytes(&page.hash);
        if h == page.hash {
            round.same(rule, None, location, || from);
            continue;
        }
        let to = hex::bytes(&h);
        let location = location();
        round.differs(finding(
            rule,
            None,
            location.clone(),
            from,
            to,
            None,
            sym.name(va),
            format!(
                "{location} (virtual {:#x}) changed since the baseline",
                page.vaddr
            ),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::{CR0_PG, EFER_LMA};
    use crate::kaslr::tests::{gate, tiny_linux_map};
    use crate::paging::tests::Tables;
    use vm_memory::{Bytes, GuestAddress};

    const KIB4: u64 = 0x1000;
    /// Page-table entry bits for `Tables::map`.
    const RW: u64 = 1 << 1;
    const NX: u64 = 1 << 63;

    const TEXT: u64 = 0xffff_ffff_8100_0000;
    const TEXT_PA: u64 = 0x80_0000;
    const TEXT_PAGES: u64 = 4;
    const RO: u64 = 0xffff_ffff_8180_0000;
    const RO_PA: u64 = 0x90_0000;
    const SCT_PA: u64 = RO_PA + 0x40;
    const IDT: u64 = 0xffff_fe00_0000_0000;
    const IDT_PA: u64 = 0xa0_0000;
    const GDT: u64 = IDT + 0x1000;
    const GDT_PA: u64 = IDT_PA + 0x1000;
    const IDT_COPY: u64 = IDT + 0x2000;
    const IDT_COPY_PA: u64 = IDT_PA + 0x2000;
    const SPARE_PA: u64 = 0xb0_0000;

    const PF: u64 = TEXT + 0x100;
    const SYS_READ: u64 = TEXT + 0x1000;
    const SYS_WRITE: u64 = TEXT + 0x1100;
    const SYS_NI: u64 = TEXT + 0x1200;
    const ENTRY_SYSCALL: u64 = TEXT + 0x2000;
    const ROOTKIT: u64 = 0xffff_ffff_c000_0000;

    const MAP: &str = "\
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
ffffffffc0000000 t rootkit_read
";

    const GDT_ENTRIES: [u64; 8] = [
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
    struct Guest {
        t: Tables,
        cpu: CpuState,
    }

    impl Guest {
        fn new() -> Self {
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

        fn set_gate(&self, vector: u64, handler: u64) {
            self.t
                .mem
                .write_slice(
                    &gate(handler, 0x10, 0, 0x8e),
                    GuestAddress(IDT_PA + vector * 16),
                )
                .unwrap();
        }

        fn layout() -> KernelLayout {
            KernelLayout::from_symbols(&symbols(), 0, Some(8)).unwrap()
        }

        fn checker(&self) -> Checker {
            let b = Baseline::take(&self.t.mem, &[self.cpu], &Self::layout()).unwrap();
            Checker::new(b, Some(Arc::new(symbols())))
        }

        fn check(&self, c: &mut Checker) -> Vec<Finding> {
            c.check(&self.t.mem, &[self.cpu], None)
        }
    }

    fn symbols() -> SymbolTable {
        SymbolTable::parse(MAP).unwrap()
    }

    /// One finding, and a second check that finds nothing.
    fn one(g: &Guest, c: &mut Checker) -> Finding {
        let f = g.check(c);
        assert_eq!(f.len(), 1, "{f:#?}");
        assert!(g.check(c).is_empty(), "reported twice");
        f.into_iter().next().unwrap()
    }

    #[test]
    fn baseline_of_a_clean_guest() {
        let g = Guest::new();
        let mut c = g.checker();
        let b = c.baseline();
        assert_eq!(b.vcpus.len(), 1);
        assert_eq!(b.vcpus[0].idt.as_ref().unwrap().len(), 4096);
        assert_eq!(b.vcpus[0].gdt.as_ref().unwrap().len(), 128);
        assert_eq!(
            b.syscall_table.as_ref().unwrap().entries[..3],
            [SYS_READ, SYS_WRITE, SYS_NI]
        );
        assert_eq!(b.text.pages.len(), 4);
        assert_eq!(b.text.pages[1].paddr, TEXT_PA + KIB4);
        assert!(!b.text.pages[1].writable);
        assert_eq!(b.rodata.as_ref().unwrap().pages.len(), 2);
        let json: serde_json::Value = serde_json::from_str(&b.to_json()).unwrap();
        assert_eq!(json["vcpus"][0]["cpu"]["lstar"], "0xffffffff81002000");
        assert_eq!(json["text"]["pages"][1]["paddr"], "0x801000");
        assert_eq!(json["text"]["hash"].as_str().unwrap().len(), 64);
        assert_eq!(json["syscall_table"]["entries"][0], "0xffffffff81001000");
        assert_eq!(json["vcpus"][0]["gdt"].as_str().unwrap().len(), 256);
        // A clean guest: nothing, with and without a dirty log.
        assert!(g.check(&mut c).is_empty());
        let all: &dyn Fn(u64) -> bool = &|_| true;
        assert!(c.check(&g.t.mem, &[g.cpu], Some(all)).is_empty());
        // Not in long mode: no baseline.
        let mut real = g.cpu;
        real.cr0 &= !CR0_PG;
        assert_eq!(
            Baseline::take(&g.t.mem, &[real], &Guest::layout()).unwrap_err(),
            BaselineError::NoLongModeVcpu
        );
    }

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
    fn kernel_text_patch_and_the_dirty_log() {
        let g = Guest::new();
        let mut c = g.checker();
        g.t.mem
            .write_obj(0xccu8, GuestAddress(TEXT_PA + KIB4 + 5))
            .unwrap();
        // The dirty log names another page: this one is not read, the change not seen.
        let other: &dyn Fn(u64) -> bool = &|p| p == TEXT_PA + 2 * KIB4;
        assert!(c.check(&g.t.mem, &[g.cpu], Some(other)).is_empty());
        let this: &dyn Fn(u64) -> bool = &|p| p == TEXT_PA + KIB4;
        let f = c.check(&g.t.mem, &[g.cpu], Some(this));
        assert_eq!(f.len(), 1, "{f:#?}");
        let f = &f[0];
        assert_eq!(f.rule, Rule::KernelTextModified);
        assert_eq!(f.location, "kernel text page 0x801000 (__x64_sys_read+0x0)");
        assert_eq!(f.symbol.as_deref(), Some("__x64_sys_read+0x0"));
        assert_eq!(f.from, hex::bytes(&c.baseline().text.pages[1].hash));
        assert_ne!(f.from, f.to);
        // A full check: reported already.
        assert!(g.check(&mut c).is_empty());
        // Without a dirty log, a fresh checker sees it at once.
        let g2 = Guest::new();
        let mut c2 = g2.checker();
        g2.t.mem
            .write_obj(0xccu8, GuestAddress(TEXT_PA + 3 * KIB4))
            .unwrap();
        assert_eq!(one(&g2, &mut c2).rule, Rule::KernelTextModified);
    }

    #[test]
    fn kernel_rodata_patch() {
        let g = Guest::new();
        let mut c = g.checker();
        g.t.mem.write_obj(0u8, GuestAddress(RO_PA + 0x90)).unwrap();
        let f = one(&g, &mut c);
        assert_eq!(f.rule, Rule::KernelRodataModified);
        assert_eq!(
            f.location,
            "kernel read-only data page 0x900000 (__start_rodata+0x0)"
        );
    }

    #[test]
    fn kernel_page_remapped() {
        let g = Guest::new();
        let mut c = g.checker();
        // A copy of text page 3, patched, mapped in its place; the original is intact.
        let mut t = g.t;
        let mut page = vec![0u8; KIB4 as usize];
        t.mem
            .read_slice(&mut page, GuestAddress(TEXT_PA + 3 * KIB4))
            .unwrap();
        page[0] ^= 0xff;
        t.mem.write_slice(&page, GuestAddress(SPARE_PA)).unwrap();
        t.map(TEXT + 3 * KIB4, SPARE_PA, KIB4, 0);
        let g = Guest { t, cpu: g.cpu };
        let f = one(&g, &mut c);
        assert_eq!(f.rule, Rule::KernelMappingChanged);
        assert_eq!(
            (f.from.as_str(), f.to.as_str()),
            ("0x803000 ro", "0xb00000 ro")
        );
        // Made writable.
        let mut t = g.t;
        t.map(TEXT, TEXT_PA, KIB4, RW);
        let g = Guest { t, cpu: g.cpu };
        let f = one(&g, &mut c);
        assert_eq!(
            (f.from.as_str(), f.to.as_str()),
            ("0x800000 ro", "0x800000 rw")
        );
    }

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
    fn unreadable_baseline_names_what() {
        let mut g = Guest::new();
        g.cpu.gdt.base = GDT + 0x10_0000;
        let e = Baseline::take(&g.t.mem, &[g.cpu], &Guest::layout()).unwrap_err();
        assert!(e.to_string().contains("vCPU 0's GDT"), "{e}");
        let g = Guest::new();
        let l = KernelLayout::new(TEXT..TEXT + 5 * KIB4, None, None).unwrap();
        let e = Baseline::take(&g.t.mem, &[g.cpu], &l).unwrap_err();
        assert!(
            e.to_string()
                .contains(&format!("kernel text at {:#x}", TEXT + 4 * KIB4)),
            "{e}"
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

    #[test]
    fn every_introspection_rule_has_a_readme_row() {
        let readme = include_str!("../README.md");
        for r in Rule::ALL.into_iter().filter(|r| r.is_introspection()) {
            assert!(
                readme.contains(&format!("`{}`", r.as_str())),
                "README lacks {}",
                r.as_str()
            );
            if let Some(m) = r.mitre() {
                assert!(readme.contains(m.technique));
            }
        }
    }

    /// The ELF segment data at guest-virtual `va`: `len` bytes, fewer where the
    /// segment's file data ends first (the rest is zero in the guest).
    fn elf_bytes(elf: &[u8], va: u64, len: usize) -> Option<&[u8]> {
        let u64_at = |o: usize| Some(u64::from_le_bytes(elf.get(o..o + 8)?.try_into().ok()?));
        let u16_at = |o: usize| Some(u16::from_le_bytes(elf.get(o..o + 2)?.try_into().ok()?));
        let (phoff, phnum) = (u64_at(0x20)? as usize, u16_at(0x38)? as usize);
        for i in 0..phnum {
            let ph = phoff + i * 56;
            let (off, vaddr, filesz) = (u64_at(ph + 8)?, u64_at(ph + 16)?, u64_at(ph + 32)?);
            if vaddr <= va && va < vaddr + filesz {
                let start = (off + va - vaddr) as usize;
                let n = len.min((vaddr + filesz - va) as usize);
                return elf.get(start..start + n);
            }
        }
        None
    }

    #[test]
    fn real_linux_kernel() {
        let Some(path) = tiny_linux_map() else {
            return;
        };
        let (map, _) = SymbolTable::parse_lenient(&std::fs::read_to_string(&path).unwrap());
        let l = KernelLayout::from_symbols(&map, 0, None).unwrap();
        let a = |n| map.address_of(n).unwrap();
        assert_eq!(l.text.start, a("_stext"));
        assert_eq!(l.text.end, a("_etext"));
        let ro = l.rodata.unwrap();
        assert_eq!((ro.start, ro.end), (a("__start_rodata"), a("__end_rodata")));
        let t = l.syscall_table.unwrap();
        assert_eq!(t.addr, a("sys_call_table"));
        // 451 system calls and 8 bytes of padding before the next symbol.
        assert_eq!((t.count, t.count_is_bound), (452, true));

        // With the kernel's own bytes (vmlinux next to the map): the baseline's
        // table has the 451 entries, the padding dropped.
        let vmlinux = path.with_file_name("vmlinux");
        let Ok(elf) = std::fs::read(&vmlinux) else {
            eprintln!("SKIP: {} not found", vmlinux.display());
            return;
        };
        let mut tables = Tables::new(false);
        // Text (up to 4 x 2 MiB) at 4 MiB, read-only data (2 MiB) at 12 MiB; the
        // page tables stay below 4 MiB.
        let text_len = (l.text.end - l.text.start) as usize;
        assert!(text_len <= 8 << 20 && ro.end - ro.start <= 2 << 20);
        for i in 0..(text_len as u64).div_ceil(2 << 20) {
            tables.map(
                l.text.start + i * (2 << 20),
                0x40_0000 + i * (2 << 20),
                2 << 20,
                0,
            );
        }
        tables.map(ro.start, 0xc0_0000, 2 << 20, NX);
        let text = elf_bytes(&elf, l.text.start, text_len).expect("text in vmlinux");
        tables
            .mem
            .write_slice(text, GuestAddress(0x40_0000))
            .unwrap();
        let rodata = elf_bytes(&elf, ro.start, (ro.end - ro.start) as usize).expect("rodata");
        tables
            .mem
            .write_slice(rodata, GuestAddress(0xc0_0000))
            .unwrap();
        let mut cpu = Guest::new().cpu;
        cpu.cr3 = tables.root;
        // No IDT or GDT of this kernel here: point them at its rodata.
        cpu.idt.base = ro.start;
        cpu.gdt.base = ro.start;
        cpu.lstar = a("entry_SYSCALL_64");
        let b = Baseline::take(&tables.mem, &[cpu], &l).unwrap();
        let entries = &b.syscall_table.as_ref().unwrap().entries;
        assert_eq!(entries.len(), crate::syscall::SYSCALL_COUNT);
        assert!(
            b.notes.iter().any(|n| n.contains("451 entries")),
            "{:?}",
            b.notes
        );
        let ni_addr = a("__x64_sys_ni_syscall");
        let map = Arc::new(map);
        assert_eq!(map.lookup(entries[0]), Some(("__x64_sys_read", 0)));
        assert_eq!(map.lookup(entries[59]), Some(("__x64_sys_execve", 0)));
        assert_eq!(b.text.pages.len(), text_len.div_ceil(4096));
        let ni = ni_addr;
        let mut c = Checker::new(b, Some(map));
        let dirty_none: &dyn Fn(u64) -> bool = &|_| false;
        assert!(c.check(&tables.mem, &[cpu], Some(dirty_none)).is_empty());
        // read -> ni_syscall, found by the table check, not as a rodata change.
        let slot = 0xc0_0000 + (t.addr - ro.start);
        tables.write(slot, ni);
        let f = c.check(&tables.mem, &[cpu], None);
        assert_eq!(f.len(), 1, "{f:#?}");
        assert_eq!(f[0].location, "sys_call_table[0] (read)");
        assert_eq!(f[0].symbol.as_deref(), Some("__x64_sys_ni_syscall+0x0"));
        assert_eq!(f[0].from_symbol.as_deref(), Some("__x64_sys_read+0x0"));
    }
}
