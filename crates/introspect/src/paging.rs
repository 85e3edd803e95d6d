//! x86-64 long-mode page-table walks: guest-virtual to guest-physical, the way
//! the guest's MMU would do it with a given CR3.
//!
//! 4-level and 5-level (CR4.LA57) paging, 1 GiB and 2 MiB pages, effective
//! permissions. A walk reads at most one entry per level, so it ends on any
//! table contents, garbage included.

use crate::mem::GuestPhysMemory;

/// Present.
const P: u64 = 1 << 0;
/// Writable.
const RW: u64 = 1 << 1;
/// User-accessible.
const US: u64 = 1 << 2;
/// Page size: this entry maps a large page (in a PDPTE or PDE).
const PS: u64 = 1 << 7;
/// No-execute.
const NX: u64 = 1 << 63;
/// The physical-address bits of an entry and of CR3: 12..51. Bits 52..62
/// (software, protection key) and 63 (NX) are not address; nor are the PCID bits
/// of CR3.
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// The levels from the top, with the lowest virtual-address bit each one indexes.
const LEVELS: [(&str, u32); 5] = [
    ("PML5E", 48),
    ("PML4E", 39),
    ("PDPTE", 30),
    ("PDE", 21),
    ("PTE", 12),
];

/// Why a guest-virtual address has no translation (or its bytes cannot be read).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WalkError {
    /// The address is not sign-extended from bit 47 (bit 56 under LA57).
    #[error("guest-virtual {vaddr:#x} is not canonical for {bits}-bit addressing")]
    NonCanonical { vaddr: u64, bits: u32 },
    /// The walk found an entry without its present bit.
    #[error("guest-virtual {vaddr:#x} is not mapped: its {level} ({entry:#x}) is not present")]
    NotPresent {
        vaddr: u64,
        level: &'static str,
        entry: u64,
    },
    /// An entry with a bit set that must be clear (the page-size bit above the
    /// PDPTE).
    #[error("guest-virtual {vaddr:#x}: its {level} ({entry:#x}) has a reserved bit set")]
    Reserved {
        vaddr: u64,
        level: &'static str,
        entry: u64,
    },
    /// A table (`level` names the entry read from it) or the page itself
    /// (`level` is `"page"`) lies outside guest RAM.
    #[error(
        "guest-virtual {vaddr:#x}: its {level} at guest-physical {paddr:#x} is outside guest RAM"
    )]
    OutsideRam {
        vaddr: u64,
        level: &'static str,
        paddr: u64,
    },
}

/// Where a guest-virtual address leads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// The guest-physical address of the byte.
    pub paddr: u64,
    /// The size of the page that maps it: 4 KiB, 2 MiB or 1 GiB.
    pub page_size: u64,
    /// The level of the entry that mapped the page (`"PTE"`, `"PDE"`, `"PDPTE"`).
    pub level: &'static str,
    /// Writable: the RW bits of all levels ANDed.
    pub writable: bool,
    /// User-accessible: the US bits of all levels ANDed.
    pub user: bool,
    /// No-execute: the NX bits of all levels ORed.
    pub nx: bool,
}

impl Translation {
    /// The guest-physical address where the page starts.
    pub fn page_base(&self) -> u64 {
        self.paddr & !(self.page_size - 1)
    }
}

/// Whether `vaddr` is canonical for `bits`-bit virtual addresses.
fn canonical(vaddr: u64, bits: u32) -> bool {
    let shift = 64 - bits;
    (((vaddr << shift) as i64) >> shift) as u64 == vaddr
}

/// Translates `vaddr` through the page tables at `cr3` (4-level, or 5-level
/// when `cr4_la57`).
pub fn translate<M: GuestPhysMemory + ?Sized>(
    mem: &M,
    cr3: u64,
    cr4_la57: bool,
    vaddr: u64,
) -> Result<Translation, WalkError> {
    let (levels, bits) = if cr4_la57 {
        (&LEVELS[..], 57)
    } else {
        (&LEVELS[1..], 48)
    };
    if !canonical(vaddr, bits) {
        return Err(WalkError::NonCanonical { vaddr, bits });
    }
    let (mut writable, mut user, mut nx) = (true, true, false);
    let mut table = cr3 & ADDR_MASK;
    for &(level, shift) in levels {
        let paddr = table + ((vaddr >> shift) & 0x1ff) * 8;
        let entry = mem.read_u64(paddr).map_err(|_| WalkError::OutsideRam {
            vaddr,
            level,
            paddr,
        })?;
        if entry & P == 0 {
            return Err(WalkError::NotPresent {
                vaddr,
                level,
                entry,
            });
        }
        writable &= entry & RW != 0;
        user &= entry & US != 0;
        nx |= entry & NX != 0;
        let leaf = shift == 12 || entry & PS != 0;
        if !leaf {
            table = entry & ADDR_MASK;
            continue;
        }
        if shift > 30 {
            return Err(WalkError::Reserved {
                vaddr,
                level,
                entry,
            });
        }
        let page_size = 1u64 << shift;
        // For large pages the low address bits hold PAT, not address.
        let base = entry & ADDR_MASK & !(page_size - 1);
        return Ok(Translation {
            paddr: base | (vaddr & (page_size - 1)),
            page_size,
            level,
            writable,
            user,
            nx,
        });
    }
    unreachable!("the PTE level always ends a walk")
}

/// Reads `buf.len()` bytes at guest-virtual `vaddr`, translating each page on
/// its own; an error names the first address that could not be read.
pub fn read_virt<M: GuestPhysMemory + ?Sized>(
    mem: &M,
    cr3: u64,
    cr4_la57: bool,
    vaddr: u64,
    buf: &mut [u8],
) -> Result<(), WalkError> {
    let mut done = 0;
    while done < buf.len() {
        // Linear addresses wrap, as the CPU's do.
        let va = vaddr.wrapping_add(done as u64);
        let t = translate(mem, cr3, cr4_la57, va)?;
        let in_page = t.page_size - (va & (t.page_size - 1));
        let n = (buf.len() - done).min(usize::try_from(in_page).unwrap_or(usize::MAX));
        mem.read_phys(t.paddr, &mut buf[done..done + n])
            .map_err(|_| WalkError::OutsideRam {
                vaddr: va,
                level: "page",
                paddr: t.paddr,
            })?;
        done += n;
    }
    Ok(())
}

/// The 4 KiB pages mapped in a guest-virtual range, as [`mapped_pages`] found them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MappedPages {
    /// Each mapped 4 KiB page (a large page counts as its 4 KiB pages), in
    /// address order: its guest-virtual address and translation (`paddr` the
    /// 4 KiB page's, `page_size` the mapping's).
    pub pages: Vec<(u64, Translation)>,
    /// Whether the walk stopped at the limit with more mapped.
    pub truncated: bool,
    /// Tables the walk could not read (outside RAM): their parts of the range
    /// are left out.
    pub unreadable_tables: usize,
}

/// Every 4 KiB page mapped in `[start, end)` through the tables at `cr3`, at most
/// `max` of them. Tables are read whole (one read of 4 KiB each) and only where
/// they are present, so a sparse range costs little however large it is. The
/// range must lie in one half of the canonical address space.
pub fn mapped_pages<M: GuestPhysMemory + ?Sized>(
    mem: &M,
    cr3: u64,
    cr4_la57: bool,
    start: u64,
    end: u64,
    max: usize,
) -> MappedPages {
    let (levels, bits) = if cr4_la57 {
        (&LEVELS[..], 57)
    } else {
        (&LEVELS[1..], 48)
    };
    let mut out = MappedPages::default();
    if start >= end || !canonical(start, bits) || !canonical(end - 1, bits) {
        return out;
    }
    let mask = (1u64 << bits) - 1;
    let walk = Walk {
        mem,
        levels,
        bits,
        start: start & mask,
        end: ((end - 1) & mask) + 1,
        max,
    };
    walk.table(&mut out, cr3 & ADDR_MASK, 0, 0, (true, true, false));
    out
}

/// One [`mapped_pages`] walk: addresses are kept without their sign extension.
struct Walk<'a, M: ?Sized> {
    mem: &'a M,
    levels: &'a [(&'static str, u32)],
    bits: u32,
    start: u64,
    end: u64,
    max: usize,
}

impl<M: GuestPhysMemory + ?Sized> Walk<'_, M> {
    /// Returns false once the limit is reached.
    fn table(
        &self,
        out: &mut MappedPages,
        table: u64,
        depth: usize,
        base: u64,
        (writable, user, nx): (bool, bool, bool),
    ) -> bool {
        let (level, shift) = self.levels[depth];
        let span = 1u64 << shift;
        let mut raw = [0u8; 4096];
        if self.mem.read_phys(table, &mut raw).is_err() {
            out.unreadable_tables += 1;
            return true;
        }
        let first = (self.start.max(base) - base) >> shift;
        let last = ((self.end - 1).min(base + 512 * span - 1) - base) >> shift;
        for i in first..=last.min(511) {
            let o = i as usize * 8;
            let entry = u64::from_le_bytes(raw[o..o + 8].try_into().expect("8 bytes"));
            if entry & P == 0 {
                continue;
            }
            let va = base + i * span;
            let flags = (
                writable && entry & RW != 0,
                user && entry & US != 0,
                nx || entry & NX != 0,
            );
            if shift != 12 && entry & PS == 0 {
                if !self.table(out, entry & ADDR_MASK, depth + 1, va, flags) {
                    return false;
                }
                continue;
            }
            if shift > 30 {
                continue; // a reserved bit: not a mapping
            }
            let page_base = entry & ADDR_MASK & !(span - 1);
            let (lo, hi) = (va.max(self.start), (va + span).min(self.end));
            let mut page = lo & !0xfff;
            while page < hi {
                if out.pages.len() == self.max {
                    out.truncated = true;
                    return false;
                }
                let shift_back = 64 - self.bits;
                let vaddr = (((page << shift_back) as i64) >> shift_back) as u64;
                out.pages.push((
                    vaddr,
                    Translation {
                        paddr: page_base + (page - va),
                        page_size: span,
                        level,
                        writable: flags.0,
                        user: flags.1,
                        nx: flags.2,
                    },
                ));
                page += 0x1000;
            }
        }
        true
    }
}

/// One address space of the guest: memory and the CR3 (and LA57) of a vCPU.
#[derive(Clone, Copy, Debug)]
pub struct PageWalker<M> {
    mem: M,
    cr3: u64,
    la57: bool,
}

impl<M: GuestPhysMemory> PageWalker<M> {
    /// Walks the tables at `cr3`, 5-level when `cr4_la57`.
    pub fn new(mem: M, cr3: u64, cr4_la57: bool) -> Self {
        Self {
            mem,
            cr3,
            la57: cr4_la57,
        }
    }

    /// The CR3 this walker uses.
    pub fn cr3(&self) -> u64 {
        self.cr3
    }

    /// Whether this walker uses 5-level paging.
    pub fn la57(&self) -> bool {
        self.la57
    }

    /// The memory this walker reads.
    pub fn memory(&self) -> &M {
        &self.mem
    }

    /// See [`translate`].
    pub fn translate(&self, vaddr: u64) -> Result<Translation, WalkError> {
        translate(&self.mem, self.cr3, self.la57, vaddr)
    }

    /// See [`read_virt`].
    pub fn read(&self, vaddr: u64, buf: &mut [u8]) -> Result<(), WalkError> {
        read_virt(&self.mem, self.cr3, self.la57, vaddr, buf)
    }

    /// A little-endian `u64` at guest-virtual `vaddr`.
    pub fn read_u64(&self, vaddr: u64) -> Result<u64, WalkError> {
        let mut b = [0u8; 8];
        self.read(vaddr, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use vigil_vmm::GuestMemoryMmap;
    use vm_memory::{Bytes, GuestAddress};

    const KIB4: u64 = 0x1000;
    const MIB2: u64 = 0x20_0000;
    const GIB1: u64 = 0x4000_0000;
    const RAM: u64 = 16 << 20;

    /// Page tables built in 16 MiB of guest RAM: tables from 1 MiB up, data
    /// from 8 MiB.
    pub(crate) struct Tables {
        pub mem: GuestMemoryMmap,
        pub root: u64,
        pub la57: bool,
        next: u64,
    }

    impl Tables {
        pub fn new(la57: bool) -> Self {
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM as usize)]).unwrap();
            Self {
                mem,
                root: 0x10_0000,
                la57,
                next: 0x10_1000,
            }
        }

        fn shifts(&self) -> &'static [(&'static str, u32)] {
            if self.la57 {
                &LEVELS[..]
            } else {
                &LEVELS[1..]
            }
        }

        pub fn write(&self, paddr: u64, value: u64) {
            self.mem.write_obj(value, GuestAddress(paddr)).unwrap();
        }

        pub fn read(&self, paddr: u64) -> u64 {
            self.mem.read_obj(GuestAddress(paddr)).unwrap()
        }

        /// Maps the page of `size` at `vaddr` to `paddr` with leaf `flags`
        /// (present is added); missing tables are made present, writable, user.
        pub fn map(&mut self, vaddr: u64, paddr: u64, size: u64, flags: u64) {
            let mut table = self.root;
            for &(_, shift) in self.shifts() {
                let ea = table + ((vaddr >> shift) & 0x1ff) * 8;
                if 1u64 << shift == size {
                    let ps = if size == KIB4 { 0 } else { PS };
                    self.write(ea, paddr | flags | ps | P);
                    return;
                }
                let e = self.read(ea);
                if e & P == 0 {
                    let t = self.next;
                    self.next += KIB4;
                    self.write(ea, t | P | RW | US);
                    table = t;
                } else {
                    table = e & ADDR_MASK;
                }
            }
            panic!("bad size {size:#x}");
        }

        /// The guest-physical address of `vaddr`'s entry at the level called `name`.
        pub fn entry(&self, vaddr: u64, name: &str) -> u64 {
            let mut table = self.root;
            for &(level, shift) in self.shifts() {
                let ea = table + ((vaddr >> shift) & 0x1ff) * 8;
                if level == name {
                    return ea;
                }
                table = self.read(ea) & ADDR_MASK;
            }
            panic!("no level {name}");
        }

        pub fn translate(&self, vaddr: u64) -> Result<Translation, WalkError> {
            translate(&self.mem, self.root, self.la57, vaddr)
        }
    }

    #[test]
    fn mapped_pages_lists_what_is_mapped_in_a_range() {
        let mut t = Tables::new(false);
        let area = 0xffff_ffff_a000_0000u64;
        t.map(area + 3 * KIB4, 0x80_0000, KIB4, RW | NX);
        t.map(area + 4 * KIB4, 0x81_0000, KIB4, 0);
        t.map(area + MIB2, 0xa0_0000, MIB2, 0);
        t.map(area - KIB4, 0x82_0000, KIB4, 0); // below the range
        let m = mapped_pages(&t.mem, t.root, false, area, area + 4 * MIB2, 10_000);
        assert!(!m.truncated);
        assert_eq!(m.pages.len(), 2 + 512);
        assert_eq!(m.pages[0].0, area + 3 * KIB4);
        assert_eq!(m.pages[0].1.paddr, 0x80_0000);
        assert!(m.pages[0].1.writable && m.pages[0].1.nx);
        assert_eq!((m.pages[1].0, m.pages[1].1.nx), (area + 4 * KIB4, false));
        assert_eq!(m.pages[2].0, area + MIB2);
        assert_eq!(m.pages[3].1.paddr, 0xa0_1000);
        assert_eq!(m.pages[3].1.page_size, MIB2);
        for (va, tr) in &m.pages {
            assert_eq!(t.translate(*va).unwrap().paddr, tr.paddr, "{va:#x}");
        }
        // A range starting inside a large page, and the limit.
        let m = mapped_pages(
            &t.mem,
            t.root,
            false,
            area + MIB2 + 5 * KIB4,
            area + 4 * MIB2,
            3,
        );
        assert!(m.truncated);
        assert_eq!(m.pages[0].0, area + MIB2 + 5 * KIB4);
        assert_eq!(m.pages.len(), 3);
        // Garbage tables end the walk without a panic.
        t.write(t.entry(area, "PDE"), 0xffff_ffff_ffff_f001);
        let m = mapped_pages(&t.mem, t.root, false, area, area + 4 * MIB2, 10_000);
        assert_eq!(m.unreadable_tables, 1);
        assert!(mapped_pages(&t.mem, t.root, false, 5, 5, 10)
            .pages
            .is_empty());
    }

    const KVA: u64 = 0xffff_8880_0012_3000;

    #[test]
    fn four_level_4k_page() {
        let mut t = Tables::new(false);
        t.map(KVA, 0x80_0000, KIB4, RW | NX);
        let tr = t.translate(KVA + 0x45).unwrap();
        assert_eq!(
            tr,
            Translation {
                paddr: 0x80_0045,
                page_size: KIB4,
                level: "PTE",
                writable: true,
                user: false,
                nx: true,
            }
        );
        assert_eq!(tr.page_base(), 0x80_0000);
        t.mem
            .write_slice(b"vigil", GuestAddress(0x80_0045))
            .unwrap();
        let mut buf = [0u8; 5];
        read_virt(&t.mem, t.root, false, KVA + 0x45, &mut buf).unwrap();
        assert_eq!(&buf, b"vigil");
        // CR3's PCID bits and its no-flush bit 63 are not address.
        let cr3 = t.root | 0x5 | (1 << 63);
        assert_eq!(translate(&t.mem, cr3, false, KVA).unwrap().paddr, 0x80_0000);
    }

    #[test]
    fn entry_bits_outside_the_address_are_ignored() {
        let mut t = Tables::new(false);
        t.map(KVA, 0x80_0000, KIB4, RW);
        // Protection key (59..62) and software bits (52..58) in the PTE.
        let ea = t.entry(KVA, "PTE");
        t.write(ea, t.read(ea) | (0xf << 59) | (0x7f << 52));
        assert_eq!(t.translate(KVA + 1).unwrap().paddr, 0x80_0001);
    }

    #[test]
    fn two_mib_page_masks_pat_bit() {
        let mut t = Tables::new(false);
        let va = 0xffff_ffff_8120_0000;
        // Bit 12 of a large-page entry is PAT, not address.
        t.map(va, 0xa0_0000 | (1 << 12), MIB2, RW);
        let tr = t.translate(va + 0x1_2345).unwrap();
        assert_eq!(tr.paddr, 0xa1_2345);
        assert_eq!((tr.page_size, tr.level), (MIB2, "PDE"));
        t.mem
            .write_obj(0xdead_beefu32, GuestAddress(0xa1_2345))
            .unwrap();
        let w = PageWalker::new(&t.mem, t.root, false);
        let mut b = [0u8; 4];
        w.read(va + 0x1_2345, &mut b).unwrap();
        assert_eq!(u32::from_le_bytes(b), 0xdead_beef);
    }

    #[test]
    fn one_gib_page() {
        let mut t = Tables::new(false);
        let va = 0xffff_8880_4000_0000;
        t.map(va, 0, GIB1, RW | US);
        let tr = t.translate(va + 0x80_1234).unwrap();
        assert_eq!(
            (tr.paddr, tr.page_size, tr.level),
            (0x80_1234, GIB1, "PDPTE")
        );
        t.write(0x80_1230, 0x1122_3344_5566_7788);
        let w = PageWalker::new(&t.mem, t.root, false);
        assert_eq!(w.read_u64(va + 0x80_1230).unwrap(), 0x1122_3344_5566_7788);
        // The page maps 1 GiB, but RAM is 16 MiB: reading past it fails, naming the page.
        let e = w.read_u64(va + RAM).unwrap_err();
        assert_eq!(
            e,
            WalkError::OutsideRam {
                vaddr: va + RAM,
                level: "page",
                paddr: RAM
            }
        );
        assert!(e.to_string().contains("0x1000000"), "{e}");
    }

    #[test]
    fn five_level() {
        let mut t = Tables::new(true);
        let va = 0xff11_2233_4455_6000;
        t.map(va, 0x90_0000, KIB4, RW);
        assert_eq!(t.translate(va + 8).unwrap().paddr, 0x90_0008);
        // Bit 48 set, sign bit 56 clear: canonical only with 5-level paging.
        let low = 0x0001_0000_0000_0000;
        t.map(low, 0x90_1000, KIB4, RW);
        assert_eq!(t.translate(low).unwrap().paddr, 0x90_1000);
        assert!(matches!(
            translate(&t.mem, t.root, false, low),
            Err(WalkError::NonCanonical { bits: 48, .. })
        ));
        // Large pages under 5-level paging too.
        let big = 0xff00_0000_4000_0000;
        t.map(big, 0, GIB1, RW);
        assert_eq!(t.translate(big + 0x1234).unwrap().paddr, 0x1234);
    }

    #[test]
    fn not_present_at_each_level() {
        for la57 in [false, true] {
            let mut t = Tables::new(la57);
            let va = if la57 { 0xff11_2233_4455_6000 } else { KVA };
            t.map(va, 0x80_0000, KIB4, RW);
            let levels = if la57 { &LEVELS[..] } else { &LEVELS[1..] };
            for &(level, shift) in levels {
                // The same address with a different index at this level.
                let other = va ^ (1 << shift);
                let e = t.translate(other).unwrap_err();
                assert_eq!(
                    e,
                    WalkError::NotPresent {
                        vaddr: other,
                        level,
                        entry: 0
                    },
                    "la57={la57}"
                );
                let msg = e.to_string();
                assert!(
                    msg.contains(&format!("{other:#x}")) && msg.contains(level),
                    "{msg}"
                );
            }
        }
    }

    #[test]
    fn not_present_entry_is_reported_as_found() {
        let mut t = Tables::new(false);
        t.map(KVA, 0x80_0000, KIB4, RW);
        let ea = t.entry(KVA, "PDE");
        let swapped = t.read(ea) & !P;
        t.write(ea, swapped);
        assert_eq!(
            t.translate(KVA),
            Err(WalkError::NotPresent {
                vaddr: KVA,
                level: "PDE",
                entry: swapped
            })
        );
    }

    #[test]
    fn non_canonical_addresses() {
        let t = Tables::new(false);
        for va in [
            0x0000_8000_0000_0000,
            0x8000_0000_0000_0000,
            0xfff0_0000_0000_0000,
        ] {
            let e = t.translate(va).unwrap_err();
            assert_eq!(
                e,
                WalkError::NonCanonical {
                    vaddr: va,
                    bits: 48
                }
            );
            assert!(e.to_string().contains(&format!("{va:#x}")), "{e}");
        }
        let t5 = Tables::new(true);
        for va in [0x0100_0000_0000_0000, 0xfe00_0000_0000_0000] {
            assert_eq!(
                t5.translate(va),
                Err(WalkError::NonCanonical {
                    vaddr: va,
                    bits: 57
                })
            );
        }
    }

    #[test]
    fn table_outside_ram() {
        let mut t = Tables::new(false);
        t.map(KVA, 0x80_0000, KIB4, RW);
        // The PDPTE points to a page directory beyond RAM.
        let ea = t.entry(KVA, "PDPTE");
        t.write(ea, 0x4000_0000 | P | RW);
        let pde = 0x4000_0000 + ((KVA >> 21) & 0x1ff) * 8;
        let e = t.translate(KVA).unwrap_err();
        assert_eq!(
            e,
            WalkError::OutsideRam {
                vaddr: KVA,
                level: "PDE",
                paddr: pde
            }
        );
        assert!(e.to_string().contains(&format!("{pde:#x}")), "{e}");
        // A CR3 beyond RAM fails at the first level.
        assert!(matches!(
            translate(&t.mem, 1 << 40, false, KVA),
            Err(WalkError::OutsideRam { level: "PML4E", .. })
        ));
    }

    #[test]
    fn read_across_pages() {
        let mut t = Tables::new(false);
        // Two virtually adjacent pages on physically distant frames.
        t.map(KVA, 0x80_0000, KIB4, RW);
        t.map(KVA + KIB4, 0xc0_0000, KIB4, RW);
        t.mem.write_slice(b"abcd", GuestAddress(0x80_0ffc)).unwrap();
        t.mem.write_slice(b"efgh", GuestAddress(0xc0_0000)).unwrap();
        let mut buf = [0u8; 8];
        read_virt(&t.mem, t.root, false, KVA + 0xffc, &mut buf).unwrap();
        assert_eq!(&buf, b"abcdefgh");

        // The next page is not mapped: the error names it, not the first.
        let second = KVA + 2 * KIB4;
        let mut buf = [0u8; 32];
        let e = read_virt(&t.mem, t.root, false, second - 16, &mut buf).unwrap_err();
        assert!(
            matches!(e, WalkError::NotPresent { vaddr, level: "PTE", .. } if vaddr == second),
            "{e:?}"
        );
        assert!(e.to_string().contains(&format!("{second:#x}")), "{e}");
        // Nothing to read needs no mapping.
        read_virt(&t.mem, t.root, false, 0x1234, &mut []).unwrap();
    }

    #[test]
    fn permissions_combine_across_levels() {
        let mut t = Tables::new(false);
        t.map(KVA, 0x80_0000, KIB4, RW | US);
        let tr = t.translate(KVA).unwrap();
        assert!(tr.writable && tr.user && !tr.nx);

        let pde = t.entry(KVA, "PDE");
        t.write(pde, t.read(pde) & !RW);
        let tr = t.translate(KVA).unwrap();
        assert!(!tr.writable && tr.user && !tr.nx);

        let pdpte = t.entry(KVA, "PDPTE");
        t.write(pdpte, t.read(pdpte) & !US);
        let pml4e = t.entry(KVA, "PML4E");
        t.write(pml4e, t.read(pml4e) | NX);
        let tr = t.translate(KVA).unwrap();
        assert!(!tr.writable && !tr.user && tr.nx);
        assert_eq!(tr.paddr, 0x80_0000, "NX is not address");
    }

    #[test]
    fn page_size_bit_above_pdpte_is_reserved() {
        let mut t = Tables::new(false);
        t.map(KVA, 0x80_0000, KIB4, RW);
        let pml4e = t.entry(KVA, "PML4E");
        t.write(pml4e, t.read(pml4e) | PS);
        assert!(matches!(
            t.translate(KVA),
            Err(WalkError::Reserved { level: "PML4E", .. })
        ));
    }

    #[test]
    fn garbage_tables_end() {
        // Fill RAM with pseudo-random words, present bits mostly set, and walk
        // from everywhere: every walk ends, by translation or by error.
        let t = Tables::new(false);
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for paddr in (0..RAM).step_by(8) {
            // Half the entries point back into RAM.
            let v = next();
            let v = if v & 2 != 0 {
                (v & (RAM - 1) & !0xfff) | (v & 0xfff) | P
            } else {
                v
            };
            t.write(paddr, v);
        }
        let mut ok = 0;
        for _ in 0..20_000 {
            let (cr3, va, la57) = (next(), next(), next() & 1 == 0);
            let cr3 = cr3 & (RAM - 1);
            // Canonical addresses, so that the walks start.
            let bits = if la57 { 7 } else { 16 };
            let va = (((va << bits) as i64) >> bits) as u64;
            if translate(&t.mem, cr3, la57, va).is_ok() {
                ok += 1;
            }
            let mut buf = [0u8; 64];
            let _ = read_virt(&t.mem, cr3, la57, va | 0xfe0, &mut buf);
            let _ = read_virt(&t.mem, cr3, la57, u64::MAX - 8, &mut buf);
        }
        // Not a property, just a sign that the walks got somewhere.
        assert!(ok > 0);
    }
}
