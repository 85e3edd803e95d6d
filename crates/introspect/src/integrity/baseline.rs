//! The baseline: the kernel's protection state at a moment policy chose (each
//! vCPU's registers and descriptor tables, the syscall table, kernel text and
//! read-only data page by page), and how it is taken.

use serde::{Deserialize, Serialize};

use crate::cpu::CpuState;
use crate::hex;
use crate::layout::{KernelLayout, LayoutError, VirtRange};
use crate::mem::GuestPhysMemory;
use crate::paging::{read_virt, WalkError};

use super::modules::{self, ModuleText};
use super::pages::{hash_region, table_hole, Digest32, PAGE_SIZE};
use super::registers::expected_registers;
use super::tables::{expected_gdt, read_table, MAX_GDT_BYTES, MAX_IDT_BYTES};
use super::{ap_up, kernel_cr3, reference_cpu};

// Serialized for the API (`GET /vigil/introspect/baseline`) and, read back, in
// snapshots and migrations (`live::MonitorState`): checked by
// `Baseline::validate` before use.

/// One vCPU at baseline: its registers and a copy of its descriptor tables, or,
/// for an application processor, what it is expected to hold.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VcpuBaseline {
    pub cpu: CpuState,
    /// For an application processor: the vCPU whose baseline its values are
    /// expected to equal (the baseline's `reference_vcpu`, the boot vCPU), its
    /// own values kept only where a kernel's CPUs differ ([`VcpuBaseline::expected`]).
    /// Absent for the boot vCPU.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected_from: Option<u32>,
    /// The IDT's `limit + 1` bytes (at most [`MAX_IDT_BYTES`]), hex; `None` until
    /// it could be read.
    #[serde(with = "hex::opt_bytes")]
    pub idt: Option<Vec<u8>>,
    /// The GDT's `limit + 1` bytes (at most [`MAX_GDT_BYTES`]), hex.
    #[serde(with = "hex::opt_bytes")]
    pub gdt: Option<Vec<u8>>,
}

/// One page of a protected region at baseline.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
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
    #[serde(with = "hex::digest")]
    pub hash: Digest32,
}

/// The names of the two regions.
const TEXT_NAME: &str = "kernel text";
const RODATA_NAME: &str = "kernel read-only data";

/// A protected region at baseline.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegionBaseline {
    /// `kernel text` or `kernel read-only data`.
    pub name: String,
    pub range: VirtRange,
    /// SHA-256 of the whole region (its pages' protected bytes in order), for
    /// display.
    #[serde(with = "hex::digest")]
    pub hash: Digest32,
    pub pages: Vec<PageRecord>,
}

/// The system call table at baseline.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyscallTableBaseline {
    #[serde(with = "hex::u64")]
    pub addr: u64,
    /// The entries (handler addresses), as `"0x..."`.
    #[serde(with = "hex::u64_vec")]
    pub entries: Vec<u64>,
}

/// The kernel's protection state at a moment policy chose.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Baseline {
    pub layout: KernelLayout,
    /// The vCPU whose CR3 translated the regions (the lowest-numbered one in long
    /// mode, normally the boot CPU 0).
    pub reference_vcpu: u32,
    /// The boot vCPU and the application processors that were up, by vCPU
    /// number; others join when a check sees them up.
    pub vcpus: Vec<VcpuBaseline>,
    pub syscall_table: Option<SyscallTableBaseline>,
    pub text: RegionBaseline,
    pub rodata: Option<RegionBaseline>,
    /// The module text watched: what was mapped at baseline, and what was
    /// loaded since (reported, and watched from then on).
    #[serde(default)]
    pub modules: Vec<ModuleText>,
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
    #[error("integrity baseline: {field}: {why}")]
    Invalid { field: String, why: String },
}

fn invalid(field: impl Into<String>, why: impl Into<String>) -> BaselineError {
    BaselineError::Invalid {
        field: field.into(),
        why: why.into(),
    }
}

impl RegionBaseline {
    /// Its pages within `range` and the page each names: what the checks
    /// index and add without further checks.
    fn validate(&self, field: &str, name: &str, range: VirtRange) -> Result<(), BaselineError> {
        if self.name != name {
            return Err(invalid(
                format!("{field}.name"),
                format!("{:?}, expected {name:?}", self.name),
            ));
        }
        if self.range != range {
            return Err(invalid(format!("{field}.range"), "not the layout's"));
        }
        let most = range.len().div_ceil(PAGE_SIZE) + 1;
        if self.pages.len() as u64 > most {
            return Err(invalid(
                format!("{field}.pages"),
                format!(
                    "{} pages, more than the {most} of its range",
                    self.pages.len()
                ),
            ));
        }
        for (i, p) in self.pages.iter().enumerate() {
            let aligned = p.vaddr % PAGE_SIZE == 0 && p.paddr % PAGE_SIZE == 0;
            let inside = p.len > 0 && u64::from(p.offset) + u64::from(p.len) <= PAGE_SIZE;
            let va = p.vaddr + u64::from(p.offset);
            if !aligned || !inside || va < range.start || va + u64::from(p.len) > range.end {
                return Err(invalid(
                    format!("{field}.pages[{i}]"),
                    format!(
                        "vaddr {:#x} paddr {:#x} offset {} len {}: not a part of one 4 KiB page within [{:#x}, {:#x})",
                        p.vaddr, p.paddr, p.offset, p.len, range.start, range.end
                    ),
                ));
            }
        }
        Ok(())
    }
}

impl VcpuBaseline {
    /// Registers and descriptor tables of `cpu` (in long mode; tables read
    /// through `cr3`); a table that cannot be read is `None`, with its error.
    pub(super) fn take(
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
                expected_from: None,
                idt,
                gdt,
            },
            errors,
        )
    }

    /// How findings name the vCPU: `vCPU 1`, or for an application processor
    /// checked against the boot vCPU, `vCPU 1 (against vCPU 0's baseline)`.
    pub(super) fn who(&self) -> String {
        match self.expected_from {
            Some(boot) => format!("vCPU {} (against vCPU {boot}'s baseline)", self.cpu.vcpu),
            None => format!("vCPU {}", self.cpu.vcpu),
        }
    }

    /// What application processor `cpu` is expected to hold: the values of
    /// `boot`'s baseline, not its own, which nothing vouches for. A kernel
    /// shares one IDT among its CPUs and gives each the same syscall MSRs and
    /// protection bits; Linux's GDT is per CPU, with the same layout. So its
    /// own are kept only where CPUs differ: CR3, the GDTR's base, SYSENTER_ESP
    /// (Linux's per-CPU entry stack), the GDT's per-CPU parts
    /// ([`expected_gdt`]), and the register bits the checks do not watch. Its
    /// GDT is read through `cr3`; when it cannot be, it is `None` with its
    /// error, and the boot vCPU's layout is applied when it is first read.
    pub(super) fn expected(
        mem: &dyn GuestPhysMemory,
        boot: &VcpuBaseline,
        cpu: &CpuState,
        cr3: u64,
    ) -> (Self, Vec<(String, WalkError)>) {
        let mut errors = Vec::new();
        let gdt = read_table(mem, cr3, cpu, cpu.gdt.base, cpu.gdt.limit, MAX_GDT_BYTES)
            .map_err(|e| errors.push(("GDT".to_string(), e)))
            .ok()
            .and_then(|own| boot.gdt.as_deref().map(|b| expected_gdt(b, &own)));
        (
            Self {
                cpu: expected_registers(&boot.cpu, cpu),
                expected_from: Some(boot.cpu.vcpu),
                idt: boot.idt.clone(),
                gdt,
            },
            errors,
        )
    }
}

impl Baseline {
    /// Takes the baseline: the boot vCPU (the lowest-numbered one in long mode:
    /// its registers, IDT and GDT through its own CR3), the syscall table, and
    /// kernel text and read-only data page by page, translated through the boot
    /// vCPU's CR3. Every other vCPU that is up (see [`Checker::check`](super::Checker::check)) is
    /// expected to hold the boot vCPU's values ([`VcpuBaseline::expected`]), its
    /// own kept only where CPUs differ; the others (application processors not
    /// started yet, or still starting) are left out, and a check adds each when
    /// it is up. A page of a region that does not translate, or a table that
    /// cannot be read, is an error naming it: a baseline with holes would
    /// protect less than it says.
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
        let unreadable =
            |cpu: &CpuState, errors: Vec<(String, WalkError)>| match errors.into_iter().next() {
                Some((what, source)) => Err(BaselineError::Unreadable {
                    what: format!("vCPU {}'s {what}", cpu.vcpu),
                    source,
                }),
                None => Ok(()),
            };
        let (boot, errors) = VcpuBaseline::take(mem, reference, ref_cr3);
        unreadable(reference, errors)?;
        let mut aps: Vec<&CpuState> = cpus
            .iter()
            .filter(|c| c.vcpu != reference.vcpu && ap_up(&boot, c))
            .collect();
        aps.sort_by_key(|c| c.vcpu);
        aps.dedup_by_key(|c| c.vcpu);
        let mut vcpus = Vec::with_capacity(aps.len() + 1);
        for cpu in aps {
            let (vb, errors) = VcpuBaseline::expected(mem, &boot, cpu, kernel_cr3(mem, cpu, probe));
            unreadable(cpu, errors)?;
            vcpus.push(vb);
        }
        vcpus.push(boot);
        vcpus.sort_by_key(|v| v.cpu.vcpu);
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
        let text = hash_region(mem, reference, ref_cr3, TEXT_NAME, layout.text, hole)?;
        let rodata = layout
            .rodata
            .map(|r| hash_region(mem, reference, ref_cr3, RODATA_NAME, r, hole))
            .transpose()?;
        let mut notes = layout.notes.clone();
        let modules = match &layout.modules {
            Some(area) => {
                let (texts, more) = modules::take(mem, reference, ref_cr3, area);
                notes.extend(more);
                texts
            }
            None => Vec::new(),
        };
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
            modules,
            notes,
        })
    }

    /// Checks a baseline read back from elsewhere (a snapshot, a migration):
    /// what the checks rely on holds (sizes within their maxima, pages within
    /// their regions, the regions and the syscall table those of the layout),
    /// so that checking against it cannot fail on it. Says nothing of whether
    /// the values are this guest's.
    pub fn validate(&self) -> Result<(), BaselineError> {
        let layout = &self.layout;
        layout
            .validate()
            .map_err(|e: LayoutError| invalid("layout", e.to_string()))?;
        let reference = self.reference_vcpu;
        if self.boot().is_none() {
            return Err(invalid(
                "reference_vcpu",
                format!("vCPU {reference} has no baseline of its own in vcpus"),
            ));
        }
        for (i, v) in self.vcpus.iter().enumerate() {
            if let Some(from) = v.expected_from.filter(|&f| f != reference) {
                return Err(invalid(
                    format!("vcpus[{i}].expected_from"),
                    format!("vCPU {from}, not the reference_vcpu {reference}"),
                ));
            }
            let too_long = |t: &Option<Vec<u8>>, max| t.as_ref().is_some_and(|b| b.len() > max);
            if too_long(&v.idt, MAX_IDT_BYTES) || too_long(&v.gdt, MAX_GDT_BYTES) {
                return Err(invalid(
                    format!("vcpus[{i}]"),
                    format!("an IDT over {MAX_IDT_BYTES} or a GDT over {MAX_GDT_BYTES} bytes"),
                ));
            }
        }
        match (&self.syscall_table, layout.syscall_table) {
            (None, None) => {}
            (Some(t), Some(loc)) if t.addr == loc.addr && t.entries.len() <= loc.count => {}
            _ => {
                return Err(invalid(
                    "syscall_table",
                    "not the layout's table (its address, at most its entries)",
                ))
            }
        }
        self.text.validate("text", TEXT_NAME, layout.text)?;
        modules::validate(&self.modules, layout.modules.as_ref())?;
        match (&self.rodata, layout.rodata) {
            (None, None) => Ok(()),
            (Some(r), Some(range)) => r.validate("rodata", RODATA_NAME, range),
            _ => Err(invalid(
                "rodata",
                "present in only one of the baseline and its layout",
            )),
        }
    }

    /// The boot vCPU's baseline (the reference vCPU's own; [`Baseline::validate`]
    /// checks there is one).
    pub(super) fn boot(&self) -> Option<&VcpuBaseline> {
        self.vcpus
            .iter()
            .find(|v| v.cpu.vcpu == self.reference_vcpu && v.expected_from.is_none())
    }

    /// The baseline as JSON (for the API).
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a Baseline always serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::CR0_PG;
    use crate::integrity::fixture::*;
    use crate::integrity::Checker;
    use crate::kaslr::tests::tiny_linux_map;
    use crate::paging::tests::Tables;
    use std::sync::Arc;
    use vigil_vmm::symbols::SymbolTable;
    use vm_memory::{Bytes, GuestAddress};

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
