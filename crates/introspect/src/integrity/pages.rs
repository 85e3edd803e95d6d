//! Kernel text and read-only data: each page hashed at baseline (SHA-256, by the
//! guest-physical page it translated to), and at each check its mapping walked
//! again and its bytes hashed again when the dirty log says they were written.

use sha2::{Digest, Sha256};
use vigil_events::Rule;

use crate::cpu::CpuState;
use crate::hex;
use crate::layout::{KernelLayout, VirtRange};
use crate::mem::GuestPhysMemory;
use crate::paging::{translate, Translation, WalkError};

use super::baseline::{BaselineError, PageRecord, RegionBaseline};
use super::finding::{finding, Round, Symbolizer};

/// The page size the baseline hashes by, and the dirty log's granularity.
pub const PAGE_SIZE: u64 = 0x1000;

/// A cryptographic digest (SHA-256): the guest chooses the bytes it hashes, so a
/// non-cryptographic hash would let it craft a collision.
pub type Digest32 = [u8; 32];

pub(super) fn sha256(parts: &[u8]) -> Digest32 {
    Sha256::digest(parts).into()
}

/// Zeroes the bytes of `buf` (guest-virtual `va..`) that lie in `hole`.
pub(super) fn zero_hole(buf: &mut [u8], va: u64, hole: Option<(u64, u64)>) {
    let Some((hs, he)) = hole else { return };
    let end = va.saturating_add(buf.len() as u64);
    let (s, e) = (hs.max(va), he.min(end));
    if s < e {
        buf[(s - va) as usize..(e - va) as usize].fill(0);
    }
}

/// The guest-virtual range of the syscall table's bytes, left out of the region
/// hashes.
pub(super) fn table_hole(layout: &KernelLayout, entries: Option<usize>) -> Option<(u64, u64)> {
    let t = layout.syscall_table?;
    let n = entries.unwrap_or(t.count) as u64;
    Some((t.addr, t.addr.saturating_add(n * 8)))
}

pub(super) fn hash_region(
    mem: &dyn GuestPhysMemory,
    cpu: &CpuState,
    cr3: u64,
    name: &str,
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
        name: name.to_owned(),
        range,
        hash: whole.finalize().into(),
        pages,
    })
}

pub(super) fn describe_mapping(paddr: u64, writable: bool) -> String {
    format!("{paddr:#x} {}", if writable { "rw" } else { "ro" })
}

#[allow(clippy::too_many_arguments)]
pub(super) fn check_region(
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
        compare_hash(
            round,
            rule,
            b,
            &page.hash,
            location,
            sym.name(va),
            page.vaddr,
            "the baseline",
        );
    }
}

/// The bytes of a watched page against their hash `expected`: reported once when
/// they differ ("changed since `since`"), restored when back.
#[allow(clippy::too_many_arguments)]
pub(super) fn compare_hash(
    round: &mut Round,
    rule: Rule,
    bytes: &[u8],
    expected: &Digest32,
    location: impl FnOnce() -> String,
    symbol: Option<String>,
    vaddr: u64,
    since: &str,
) {
    let h = sha256(bytes);
    let from = hex::bytes(expected);
    if h == *expected {
        round.same(rule, None, location, || from);
        return;
    }
    let location = location();
    round.differs(finding(
        rule,
        None,
        location.clone(),
        from,
        hex::bytes(&h),
        None,
        symbol,
        format!("{location} (virtual {vaddr:#x}) changed since {since}"),
    ));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::integrity::fixture::*;
    use vm_memory::{Bytes, GuestAddress};

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
}
