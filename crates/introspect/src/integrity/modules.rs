//! Kernel modules: the executable pages of the module area, grouped into runs
//! of contiguous pages (one module's text each, or a BPF JIT image or
//! trampoline, which the kernel allocates there too), hashed when first seen and
//! compared at each check as kernel text is; a run that appears is a module
//! loaded, a run that is gone one unloaded. Runs are named from the guest's
//! `modules` list when the symbol table has it.
//!
//! Naming reads Linux's `struct module` as far as it has been stable since
//! 2.6: `state` (4 bytes and padding), `list` (a `list_head` at offset 8) and
//! `name` (56 bytes at offset 24). Where the module's text starts is a field
//! whose offset depends on the kernel's configuration and version
//! (`core_layout.base`, then `mem[MOD_TEXT].base`), so it is not read at a
//! fixed offset: a run is named after the module whose structure holds a
//! pointer to the run's first page. Every read is bounded: at most
//! [`MAX_LISTED`] modules, [`MODULE_SCAN_BYTES`] of each.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};
use vigil_events::Rule;

use crate::cpu::CpuState;
use crate::hex;
use crate::layout::{ModuleArea, VirtRange};
use crate::mem::GuestPhysMemory;
use crate::paging::{mapped_pages, read_virt, Translation};

use super::baseline::BaselineError;
use super::finding::{finding, Round};
use super::pages::{compare_hash, describe_mapping, sha256, Digest32, PAGE_SIZE};

/// The most module text pages watched (128 MiB; a distribution kernel with
/// a hundred modules loaded has 10 to 20 MiB): a guest mapping more cannot make
/// the VMM hash without end. Pages past it are not watched, and a note says so.
pub const MAX_MODULE_PAGES: usize = 32 * 1024;
/// The most entries of the module list read.
pub const MAX_LISTED: usize = 4096;
/// How much of each `struct module` is searched for its text's address.
pub const MODULE_SCAN_BYTES: usize = 2048;
/// `offsetof(struct module, list)` and `offsetof(struct module, name)`.
const LIST_OFFSET: u64 = 8;
const NAME_OFFSET: u64 = 24;
/// `MODULE_NAME_LEN` on 64-bit.
const NAME_LEN: usize = 56;

/// A page of module text, as first seen.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModulePage {
    #[serde(with = "hex::u64")]
    pub vaddr: u64,
    /// The guest-physical page it was mapped to: what is re-hashed.
    #[serde(with = "hex::u64")]
    pub paddr: u64,
    pub writable: bool,
    #[serde(with = "hex::digest")]
    pub hash: Digest32,
}

/// A run of executable pages in the module area, as first seen.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModuleText {
    /// The module's name from the guest's module list; `None` when no listed
    /// module points at it (no list, a BPF image or trampoline, or a module
    /// unlinked from the list to hide it).
    pub name: Option<String>,
    /// Contiguous pages, in address order.
    pub pages: Vec<ModulePage>,
}

impl ModuleText {
    fn start(&self) -> u64 {
        self.pages.first().map_or(0, |p| p.vaddr)
    }

    fn len(&self) -> u64 {
        self.pages.len() as u64 * PAGE_SIZE
    }

    /// `module text 0xffffffffc0000000 (vigil_mod)`.
    fn describe(&self) -> String {
        match &self.name {
            Some(n) => format!("module text {:#x} ({n})", self.start()),
            None => format!("module text {:#x}", self.start()),
        }
    }

    /// `vigil_mod+0x1000`, the name of the byte at `vaddr`.
    fn symbol(&self, vaddr: u64) -> Option<String> {
        let n = self.name.as_ref()?;
        Some(format!("{n}+{:#x}", vaddr - self.start()))
    }
}

/// The executable pages of the module area now, as runs of contiguous pages.
struct Scan {
    runs: Vec<Vec<(u64, Translation)>>,
    truncated: bool,
}

fn scan(mem: &dyn GuestPhysMemory, cpu: &CpuState, cr3: u64, range: VirtRange) -> Scan {
    let m = mapped_pages(
        mem,
        cr3,
        cpu.la57(),
        range.start,
        range.end,
        MAX_MODULE_PAGES,
    );
    let mut runs: Vec<Vec<(u64, Translation)>> = Vec::new();
    for (va, t) in m.pages.into_iter().filter(|(_, t)| !t.nx) {
        match runs.last_mut() {
            Some(run) if run.last().is_some_and(|(v, _)| v + PAGE_SIZE == va) => run.push((va, t)),
            _ => runs.push(vec![(va, t)]),
        }
    }
    Scan {
        runs,
        truncated: m.truncated,
    }
}

/// The modules of the guest's list: each name, with the page-aligned addresses
/// inside the module area its structure holds.
fn listed(
    mem: &dyn GuestPhysMemory,
    cpu: &CpuState,
    cr3: u64,
    area: &ModuleArea,
) -> Vec<(String, Vec<u64>)> {
    let Some(head) = area.list else {
        return Vec::new();
    };
    let read_u64 = |va: u64| {
        let mut b = [0u8; 8];
        read_virt(mem, cr3, cpu.la57(), va, &mut b).ok()?;
        Some(u64::from_le_bytes(b))
    };
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let mut next = read_u64(head);
    while let Some(entry) = next {
        if entry == head || out.len() == MAX_LISTED || !seen.insert(entry) {
            break;
        }
        next = read_u64(entry);
        let module = entry.wrapping_sub(LIST_OFFSET);
        let mut name = [0u8; NAME_LEN];
        if read_virt(mem, cr3, cpu.la57(), module + NAME_OFFSET, &mut name).is_err() {
            continue;
        }
        // The kernel always ends it with a NUL.
        let Some(len) = name.iter().position(|&b| b == 0) else {
            continue;
        };
        let name = &name[..len];
        let printable = |b: &u8| b.is_ascii_alphanumeric() || *b == b'_' || *b == b'-';
        if name.is_empty() || !name.iter().all(printable) {
            continue;
        }
        let mut bases = Vec::new();
        // Page by page: the structure may end before a page that is not mapped.
        let mut raw = vec![0u8; MODULE_SCAN_BYTES];
        let mut got = 0;
        while got < raw.len() {
            let va = module + got as u64;
            let n = ((PAGE_SIZE - (va & (PAGE_SIZE - 1))) as usize).min(raw.len() - got);
            if read_virt(mem, cr3, cpu.la57(), va, &mut raw[got..got + n]).is_err() {
                break;
            }
            got += n;
        }
        for w in raw[..got - got % 8].chunks_exact(8) {
            let v = u64::from_le_bytes(w.try_into().expect("8 bytes"));
            let r = area.range;
            if v % PAGE_SIZE == 0 && v >= r.start && v < r.end {
                bases.push(v);
            }
        }
        out.push((String::from_utf8_lossy(name).into_owned(), bases));
    }
    out
}

/// Hashes a run of pages; `None` for a page outside RAM (the run is skipped).
fn hash_run(mem: &dyn GuestPhysMemory, run: &[(u64, Translation)]) -> Option<Vec<ModulePage>> {
    let mut buf = vec![0u8; PAGE_SIZE as usize];
    run.iter()
        .map(|(va, t)| {
            mem.read_phys(t.paddr, &mut buf).ok()?;
            Some(ModulePage {
                vaddr: *va,
                paddr: t.paddr,
                writable: t.writable,
                hash: sha256(&buf),
            })
        })
        .collect()
}

fn name_of(names: &[(String, Vec<u64>)], start: u64) -> Option<String> {
    names
        .iter()
        .find(|(_, bases)| bases.contains(&start))
        .map(|(n, _)| n.clone())
}

/// The module text mapped now (for the baseline), with a note when there was
/// more than [`MAX_MODULE_PAGES`] of it.
pub(super) fn take(
    mem: &dyn GuestPhysMemory,
    cpu: &CpuState,
    cr3: u64,
    area: &ModuleArea,
) -> (Vec<ModuleText>, Vec<String>) {
    let s = scan(mem, cpu, cr3, area.range);
    let names = if s.runs.is_empty() {
        Vec::new()
    } else {
        listed(mem, cpu, cr3, area)
    };
    let texts = s
        .runs
        .iter()
        .filter_map(|run| {
            Some(ModuleText {
                name: name_of(&names, run[0].0),
                pages: hash_run(mem, run)?,
            })
        })
        .collect();
    let notes = s
        .truncated
        .then(|| format!("module area: over {MAX_MODULE_PAGES} mapped pages, the rest not watched"))
        .into_iter()
        .collect();
    (texts, notes)
}

/// Checks module texts read back from elsewhere: inside the area, 4 KiB pages,
/// contiguous, within the page limit.
pub(super) fn validate(
    texts: &[ModuleText],
    area: Option<&ModuleArea>,
) -> Result<(), BaselineError> {
    let invalid = |field: String, why: String| BaselineError::Invalid { field, why };
    let Some(area) = area else {
        return match texts.is_empty() {
            true => Ok(()),
            false => Err(invalid(
                "modules".into(),
                "module text without a module area in the layout".into(),
            )),
        };
    };
    let total: usize = texts.iter().map(|t| t.pages.len()).sum();
    if total > MAX_MODULE_PAGES {
        return Err(invalid(
            "modules".into(),
            format!("{total} pages, more than {MAX_MODULE_PAGES}"),
        ));
    }
    for (i, t) in texts.iter().enumerate() {
        if t.pages.is_empty() {
            return Err(invalid(format!("modules[{i}].pages"), "empty".into()));
        }
        for (j, p) in t.pages.iter().enumerate() {
            let r = area.range;
            let ok = p.vaddr % PAGE_SIZE == 0
                && p.paddr % PAGE_SIZE == 0
                && p.vaddr >= r.start
                && p.vaddr < r.end
                && p.vaddr == t.start() + j as u64 * PAGE_SIZE;
            if !ok {
                return Err(invalid(
                    format!("modules[{i}].pages[{j}]"),
                    format!(
                        "vaddr {:#x} paddr {:#x}: not the next 4 KiB page of the run within [{:#x}, {:#x})",
                        p.vaddr, p.paddr, r.start, r.end
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// One check of the module area: the watched texts' pages (mapping every
/// check, bytes when `dirty` says so), texts gone (unloaded), new runs
/// (loaded: hashed and watched from now on).
pub(super) fn check(
    round: &mut Round,
    mem: &dyn GuestPhysMemory,
    texts: &mut Vec<ModuleText>,
    notes: &mut Vec<String>,
    area: &ModuleArea,
    (cpu, cr3): (&CpuState, u64),
    dirty: Option<&dyn Fn(u64) -> bool>,
) {
    let s = scan(mem, cpu, cr3, area.range);
    let now: BTreeMap<u64, Translation> = s.runs.iter().flatten().copied().collect();
    let mut buf = vec![0u8; PAGE_SIZE as usize];
    texts.retain(|text| {
        if !text.pages.iter().any(|p| now.contains_key(&p.vaddr)) {
            round.out.push(finding(
                Rule::KernelModuleUnloaded,
                None,
                text.describe(),
                format!("{:#x} bytes", text.len()),
                "not mapped".into(),
                None,
                text.symbol(text.start()),
                format!(
                    "{} ({:#x} bytes) is no longer mapped: a module unloaded",
                    text.describe(),
                    text.len()
                ),
            ));
            return false;
        }
        for p in &text.pages {
            check_page(round, mem, text, p, now.get(&p.vaddr), dirty, &mut buf);
        }
        true
    });
    let watched: HashSet<u64> = texts
        .iter()
        .flat_map(|t| t.pages.iter().map(|p| p.vaddr))
        .collect();
    let mut total = watched.len();
    let mut names = None;
    for run in &s.runs {
        // The pages of the run no text watches yet, as runs of their own.
        let fresh: Vec<_> = run
            .iter()
            .filter(|(va, _)| !watched.contains(va))
            .copied()
            .collect();
        for part in fresh.chunk_by(|a, b| a.0 + PAGE_SIZE == b.0) {
            if total + part.len() > MAX_MODULE_PAGES {
                let note = format!(
                    "module area: over {MAX_MODULE_PAGES} pages of text, the rest not watched"
                );
                if !notes.contains(&note) {
                    notes.push(note);
                }
                return;
            }
            let Some(pages) = hash_run(mem, part) else {
                continue;
            };
            let names = names.get_or_insert_with(|| listed(mem, cpu, cr3, area));
            let text = ModuleText {
                name: name_of(names, part[0].0),
                pages,
            };
            let named = match &text.name {
                Some(_) => String::new(),
                None if area.list.is_some() => ": no module in the guest's module list points at it (a BPF program or trampoline, or a module hidden from the list)".into(),
                None => String::new(),
            };
            round.out.push(finding(
                Rule::KernelModuleLoaded,
                None,
                text.describe(),
                "not mapped".into(),
                format!("{:#x} bytes", text.len()),
                None,
                text.symbol(text.start()),
                format!(
                    "{} ({:#x} bytes of executable memory) appeared in the module area{named}",
                    text.describe(),
                    text.len()
                ),
            ));
            total += text.pages.len();
            texts.push(text);
        }
    }
    texts.sort_by_key(ModuleText::start);
}

fn check_page(
    round: &mut Round,
    mem: &dyn GuestPhysMemory,
    text: &ModuleText,
    page: &ModulePage,
    now: Option<&Translation>,
    dirty: Option<&dyn Fn(u64) -> bool>,
    buf: &mut [u8],
) {
    let rule = Rule::KernelModuleTextModified;
    let symbol = text.symbol(page.vaddr);
    let location = || match &symbol {
        Some(s) => format!("module text page {:#x} ({s})", page.paddr),
        None => format!("module text page {:#x}", page.paddr),
    };
    let mapped = describe_mapping(page.paddr, page.writable);
    let to = match now {
        Some(t) if t.paddr == page.paddr && t.writable == page.writable => None,
        Some(t) => Some(describe_mapping(t.paddr, t.writable)),
        None => Some("not mapped".to_string()),
    };
    let map_location = || format!("{} mapping", location());
    match to {
        None => round.same(rule, None, map_location, || mapped.clone()),
        Some(to) => {
            let location = map_location();
            round.differs(finding(
                rule,
                None,
                location.clone(),
                mapped.clone(),
                to.clone(),
                None,
                symbol.clone(),
                format!(
                    "{location} (virtual {:#x}) was {mapped}, now {to}",
                    page.vaddr
                ),
            ));
        }
    }
    if dirty.is_some_and(|d| !d(page.paddr)) || mem.read_phys(page.paddr, buf).is_err() {
        return;
    }
    let since = "it was first seen";
    let name = symbol.clone();
    compare_hash(
        round, rule, buf, &page.hash, location, name, page.vaddr, since,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::integrity::fixture::*;
    use crate::integrity::Checker;
    use crate::layout::LINUX_MODULE_AREA;
    use std::sync::Arc;
    use vm_memory::{Bytes, GuestAddress};

    const MOD_TEXT: u64 = 0xffff_ffff_c000_0000;
    const MOD_PA: u64 = 0xc0_0000;
    /// `struct module`s, in the direct map.
    const STRUCTS: u64 = 0xffff_8880_00d0_0000;
    const STRUCTS_PA: u64 = 0xd0_0000;
    const HEAD_PA: u64 = 0xd1_0000;

    /// The fixture guest with its `modules` list head mapped (empty).
    fn guest() -> Guest {
        let mut g = Guest::new();
        g.t.map(MODULES, HEAD_PA, KIB4, RW | NX);
        g.t.map(STRUCTS, STRUCTS_PA, KIB4, RW | NX);
        g.t.write(HEAD_PA, MODULES);
        g.t.write(HEAD_PA + 8, MODULES);
        g
    }

    /// Maps `pages` of text at `va` (guest-physical `pa`), filled with `fill`.
    fn map_text(g: &mut Guest, va: u64, pa: u64, pages: u64, fill: u8) {
        for i in 0..pages {
            g.t.map(va + i * KIB4, pa + i * KIB4, KIB4, 0);
            g.t.mem
                .write_slice(&[fill; KIB4 as usize], GuestAddress(pa + i * KIB4))
                .unwrap();
        }
    }

    /// Links `struct module` number `slot` named `name`, its text at `base` at
    /// offset 0x158 (where Linux 6.1 has had `core_layout.base` in one
    /// configuration; any offset is found), into the list after the head.
    fn link(g: &Guest, slot: u64, name: &str, base: u64) {
        let module = STRUCTS + slot * 0x400;
        let pa = STRUCTS_PA + slot * 0x400;
        let first = g.t.read(HEAD_PA);
        g.t.write(pa + LIST_OFFSET, first); // next
        g.t.write(pa + LIST_OFFSET + 8, MODULES); // prev
        g.t.write(HEAD_PA, module + LIST_OFFSET);
        let mut n = [0u8; NAME_LEN];
        n[..name.len()].copy_from_slice(name.as_bytes());
        g.t.mem
            .write_slice(&n, GuestAddress(pa + NAME_OFFSET))
            .unwrap();
        g.t.write(pa + 0x158, base);
    }

    fn checker(g: &Guest) -> Checker {
        let b = crate::Baseline::take(&g.t.mem, &[g.cpu], &Guest::layout()).unwrap();
        Checker::new(b, Some(Arc::new(symbols())))
    }

    #[test]
    fn the_linux_layout_watches_the_module_area_and_names_from_the_list() {
        let m = Guest::layout().modules.unwrap();
        assert_eq!(m.range, LINUX_MODULE_AREA);
        assert_eq!(m.list, Some(MODULES));
    }

    #[test]
    fn a_module_loaded_patched_and_unloaded() {
        let mut g = guest();
        let mut c = checker(&g);
        assert!(c.baseline().modules.is_empty());
        assert!(g.check(&mut c).is_empty());

        map_text(&mut g, MOD_TEXT, MOD_PA, 3, 0x90);
        // Its data, not executable: not text.
        g.t.map(MOD_TEXT + 3 * KIB4, MOD_PA + 3 * KIB4, KIB4, RW | NX);
        link(&g, 0, "vigil_mod", MOD_TEXT);
        let f = one(&g, &mut c);
        assert_eq!(f.rule, Rule::KernelModuleLoaded);
        assert_eq!(f.location, "module text 0xffffffffc0000000 (vigil_mod)");
        assert_eq!(
            (f.from.as_str(), f.to.as_str()),
            ("not mapped", "0x3000 bytes")
        );
        assert_eq!(f.mitre.unwrap().technique, "T1547.006");
        assert_eq!(c.baseline().modules[0].pages.len(), 3);

        // Its text patched: found through the dirty log, named by module offset.
        g.t.mem
            .write_obj(0xccu8, GuestAddress(MOD_PA + KIB4 + 7))
            .unwrap();
        let other: &dyn Fn(u64) -> bool = &|p| p == MOD_PA;
        assert!(c.check(&g.t.mem, &[g.cpu], Some(other)).is_empty());
        let this: &dyn Fn(u64) -> bool = &|p| p == MOD_PA + KIB4;
        let f = c.check(&g.t.mem, &[g.cpu], Some(this));
        assert_eq!(f.len(), 1, "{f:#?}");
        assert_eq!(f[0].rule, Rule::KernelModuleTextModified);
        assert_eq!(
            f[0].location,
            "module text page 0xc01000 (vigil_mod+0x1000)"
        );
        assert_eq!(f[0].priority, crate::Priority::Critical);
        assert!(g.check(&mut c).is_empty(), "reported once");
        // Back as it was: restored.
        g.t.mem
            .write_obj(0x90u8, GuestAddress(MOD_PA + KIB4 + 7))
            .unwrap();
        assert!(one(&g, &mut c).restored);

        // Made writable.
        g.t.map(MOD_TEXT + 2 * KIB4, MOD_PA + 2 * KIB4, KIB4, RW);
        let f = one(&g, &mut c);
        assert_eq!(
            f.location,
            "module text page 0xc02000 (vigil_mod+0x2000) mapping"
        );
        assert_eq!(
            (f.from.as_str(), f.to.as_str()),
            ("0xc02000 ro", "0xc02000 rw")
        );

        // Unloaded: every page unmapped.
        for i in 0..4 {
            g.t.write(g.t.entry(MOD_TEXT + i * KIB4, "PTE"), 0);
        }
        let f = one(&g, &mut c);
        assert_eq!(f.rule, Rule::KernelModuleUnloaded);
        assert_eq!(f.priority, crate::Priority::Notice);
        assert_eq!(f.location, "module text 0xffffffffc0000000 (vigil_mod)");
        assert!(c.baseline().modules.is_empty());
    }

    #[test]
    fn modules_at_baseline_are_watched_and_a_hidden_one_is_said_to_be_unlisted() {
        let mut g = guest();
        map_text(&mut g, MOD_TEXT, MOD_PA, 2, 0x90);
        link(&g, 0, "first", MOD_TEXT);
        let mut c = checker(&g);
        let b = c.baseline();
        assert_eq!(b.modules.len(), 1);
        assert_eq!(b.modules[0].name.as_deref(), Some("first"));
        assert!(g.check(&mut c).is_empty());
        // Through JSON, as snapshots carry it.
        let back: crate::Baseline = serde_json::from_str(&c.baseline().to_json()).unwrap();
        back.validate().unwrap();
        assert_eq!(back.modules, c.baseline().modules);

        // A second run, mapped but in no module's structure.
        map_text(&mut g, MOD_TEXT + 0x10_0000, MOD_PA + 0x1_0000, 1, 0x55);
        let f = one(&g, &mut c);
        assert_eq!(f.location, "module text 0xffffffffc0100000");
        assert!(
            f.message.contains("no module in the guest's module list"),
            "{}",
            f.message
        );
        // A page added to the end of a watched run is a new run of its own.
        map_text(&mut g, MOD_TEXT + 2 * KIB4, MOD_PA + 0x2_0000, 1, 0x66);
        let f = one(&g, &mut c);
        assert_eq!(f.location, "module text 0xffffffffc0002000");
    }

    #[test]
    fn a_hostile_module_list_ends() {
        let mut g = guest();
        map_text(&mut g, MOD_TEXT, MOD_PA, 1, 0x90);
        // A cycle that never comes back to the head, a name without a NUL (the
        // first listed: skipped, so the run is named after the second), and a
        // head pointing outside RAM.
        link(&g, 0, "a", MOD_TEXT);
        link(&g, 1, "b", MOD_TEXT);
        g.t.write(STRUCTS_PA + LIST_OFFSET, STRUCTS + 0x400 + LIST_OFFSET);
        g.t.mem
            .write_slice(
                &[b'x'; NAME_LEN],
                GuestAddress(STRUCTS_PA + 0x400 + NAME_OFFSET),
            )
            .unwrap();
        let c = checker(&g);
        assert_eq!(c.baseline().modules[0].name.as_deref(), Some("a"));
        g.t.write(HEAD_PA, 0xdead_0000_0000);
        let c = checker(&g);
        assert_eq!(c.baseline().modules.len(), 1);
        // A run of text whose pages lie outside RAM is not watched.
        g.t.map(MOD_TEXT + 0x20_0000, 0x7fff_0000_0000, KIB4, 0);
        let mut c = checker(&g);
        assert_eq!(c.baseline().modules.len(), 1);
        assert!(g.check(&mut c).is_empty());
    }

    #[test]
    fn carried_module_text_is_checked() {
        let mut g = guest();
        map_text(&mut g, MOD_TEXT, MOD_PA, 2, 0x90);
        let c = checker(&g);
        let json: serde_json::Value = serde_json::from_str(&c.baseline().to_json()).unwrap();
        let refused = |edit: &dyn Fn(&mut serde_json::Value), needle: &str| {
            let mut v = json.clone();
            edit(&mut v);
            let b: crate::Baseline = serde_json::from_value(v).unwrap();
            let e = b.validate().unwrap_err().to_string();
            assert!(e.contains(needle), "{e} lacks {needle:?}");
        };
        refused(
            &|v| v["modules"][0]["pages"][1]["vaddr"] = "0xffffffffc0005000".into(),
            "modules[0].pages[1]",
        );
        refused(
            &|v| v["modules"][0]["pages"][0]["vaddr"] = "0x1000".into(),
            "modules[0].pages[0]",
        );
        refused(
            &|v| v["modules"][0]["pages"] = serde_json::json!([]),
            "modules[0].pages",
        );
        refused(
            &|v| v["layout"]["modules"] = serde_json::Value::Null,
            "without a module area",
        );
        // A baseline from before modules were watched reads back without them.
        let mut old = json.clone();
        old.as_object_mut().unwrap().remove("modules");
        old["layout"].as_object_mut().unwrap().remove("modules");
        let b: crate::Baseline = serde_json::from_value(old).unwrap();
        b.validate().unwrap();
        assert!(b.layout.modules.is_none() && b.modules.is_empty());
    }
}
