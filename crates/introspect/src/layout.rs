//! The guest kernel's memory that the integrity monitor protects: kernel text,
//! read-only data and the system call table, as guest-virtual ranges.

use serde::{Deserialize, Serialize};
use vigil_vmm::symbols::SymbolTable;

use crate::hex;

/// The most entries a system call table may have here (Linux x86-64 has 451 in
/// 6.1); also the cap on a count taken from the distance to the next symbol.
pub const MAX_SYSCALLS: usize = 1024;

/// The largest region (text or read-only data) accepted: 1 GiB.
pub const MAX_REGION: u64 = 1 << 30;

/// Linux x86-64's GDT selectors that change at run time (`asm/segment.h`):
/// `GDT_ENTRY_LDT` 10 (two slots: a 16-byte system descriptor) and
/// `GDT_ENTRY_TLS_MIN..=GDT_ENTRY_TLS_MAX`, 12 to 14.
pub const LINUX_GDT_VOLATILE: [u16; 5] = [0x50, 0x58, 0x60, 0x68, 0x70];

/// Linux x86-64's module area (`MODULES_VADDR..MODULES_END`,
/// `arch/x86/include/asm/pgtable_64_types.h`): from the end of the 512 MiB
/// kernel image mapping (1 GiB with KASLR, so the first 512 MiB are empty there)
/// to the fixmap. Not moved by the KASLR slide. Besides modules it holds BPF JIT
/// images and kprobe and ftrace trampolines, which `module_alloc` also serves.
pub const LINUX_MODULE_AREA: VirtRange = VirtRange {
    start: 0xffff_ffff_a000_0000,
    end: 0xffff_ffff_ff00_0000,
};

/// The largest module area accepted: 2 GiB.
pub const MAX_MODULE_AREA: u64 = 2 << 30;

/// Where the guest kernel loads its modules, watched for new and changed
/// executable pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModuleArea {
    /// The guest-virtual range modules are mapped in.
    pub range: VirtRange,
    /// The guest-virtual address of Linux's `modules` list head (slide
    /// applied), which names the modules; `None` without the symbol.
    #[serde(with = "hex::opt_u64")]
    pub list: Option<u64>,
}

/// A guest-virtual range `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VirtRange {
    #[serde(with = "hex::u64")]
    pub start: u64,
    #[serde(with = "hex::u64")]
    pub end: u64,
}

impl VirtRange {
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }
}

/// Where the system call table is and how many entries it has.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyscallTableLoc {
    /// Guest-virtual address of entry 0.
    #[serde(with = "hex::u64")]
    pub addr: u64,
    /// The number of 8-byte entries.
    pub count: usize,
    /// Whether `count` is an upper bound (from the distance to the next symbol,
    /// which may include alignment padding): the baseline then drops trailing
    /// zero entries, which no kernel puts in its table (Linux fills unused
    /// numbers with `__x64_sys_ni_syscall`).
    pub count_is_bound: bool,
}

/// A layout that cannot be built.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("kernel layout: the symbol table has no {0} (needed to find {1})")]
    MissingSymbol(&'static str, &'static str),
    #[error("kernel layout: {what} [{start:#x}, {end:#x}) is empty or reversed")]
    BadRange {
        what: &'static str,
        start: u64,
        end: u64,
    },
    #[error("kernel layout: {what} is {len:#x} bytes, more than the {max:#x} accepted")]
    TooLarge {
        what: &'static str,
        len: u64,
        max: u64,
    },
    #[error("kernel layout: sys_call_table with {0} entries (expected 1 to {MAX_SYSCALLS})")]
    BadSyscallCount(usize),
    #[error("kernel layout: the KASLR slide {slide:#x} moves {what} out of the address space")]
    SlideOverflow { what: &'static str, slide: i64 },
}

/// The guest-virtual ranges the monitor protects, at their run-time addresses
/// (KASLR slide applied).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelLayout {
    /// Kernel text: `[_stext, _etext)`.
    pub text: VirtRange,
    /// Read-only data: `[__start_rodata, __end_rodata)`; `None` when the symbols
    /// are missing (a note says so).
    pub rodata: Option<VirtRange>,
    /// `sys_call_table`; `None` for a guest without one (explicit layouts only).
    pub syscall_table: Option<SyscallTableLoc>,
    /// The KASLR slide applied to the symbols (0 for explicit layouts).
    pub slide: i64,
    /// GDT selectors the kernel itself rewrites while it runs, left out of the
    /// GDT comparison. For Linux x86-64 ([`LINUX_GDT_VOLATILE`]): the LDT
    /// descriptor (loaded per process that has an LDT) and the three TLS
    /// descriptors (`set_thread_area`, loaded on every context switch).
    pub gdt_volatile: Vec<u16>,
    /// The module area; `None` for a guest without modules (explicit layouts,
    /// and baselines taken before Vigil watched modules).
    #[serde(default)]
    pub modules: Option<ModuleArea>,
    /// What the layout had to do without.
    pub notes: Vec<String>,
}

fn slid(
    map: &SymbolTable,
    name: &'static str,
    what: &'static str,
    slide: i64,
) -> Result<u64, LayoutError> {
    let a = map
        .address_of(name)
        .ok_or(LayoutError::MissingSymbol(name, what))?;
    a.checked_add_signed(slide)
        .ok_or(LayoutError::SlideOverflow { what, slide })
}

fn check_range(what: &'static str, start: u64, end: u64) -> Result<VirtRange, LayoutError> {
    if start >= end {
        return Err(LayoutError::BadRange { what, start, end });
    }
    if end - start > MAX_REGION {
        return Err(LayoutError::TooLarge {
            what,
            len: end - start,
            max: MAX_REGION,
        });
    }
    Ok(VirtRange { start, end })
}

impl KernelLayout {
    /// The layout of a Linux x86-64 kernel from its `System.map`, moved by the
    /// KASLR `slide` (see [`crate::kaslr_slide`]): text `[_stext, _etext)`,
    /// read-only data `[__start_rodata, __end_rodata)` (optional: without those
    /// symbols there is no rodata region and a note says so) and `sys_call_table`.
    ///
    /// The table's entry count is `syscall_count` when given; otherwise the
    /// distance from `sys_call_table` to the next symbol above it, divided by 8 and
    /// capped at [`MAX_SYSCALLS`]. That distance may include alignment padding
    /// (Linux 6.1's tiny kernel: 452 slots for its 451 system calls, the last one
    /// zero), so such a count is marked an upper bound and the baseline trims
    /// trailing zero entries.
    pub fn from_symbols(
        map: &SymbolTable,
        slide: i64,
        syscall_count: Option<usize>,
    ) -> Result<Self, LayoutError> {
        let mut notes = Vec::new();
        let text = check_range(
            "kernel text",
            slid(map, "_stext", "kernel text", slide)?,
            slid(map, "_etext", "kernel text", slide)?,
        )?;
        let rodata = match (
            map.address_of("__start_rodata"),
            map.address_of("__end_rodata"),
        ) {
            (Some(_), Some(_)) => Some(check_range(
                "kernel read-only data",
                slid(map, "__start_rodata", "kernel read-only data", slide)?,
                slid(map, "__end_rodata", "kernel read-only data", slide)?,
            )?),
            (s, _) => {
                let missing = if s.is_none() {
                    "__start_rodata"
                } else {
                    "__end_rodata"
                };
                notes.push(format!(
                    "no {missing} in the symbol table: kernel read-only data is not protected"
                ));
                None
            }
        };
        let linked = map
            .address_of("sys_call_table")
            .ok_or(LayoutError::MissingSymbol(
                "sys_call_table",
                "the system call table",
            ))?;
        let addr = slid(map, "sys_call_table", "the system call table", slide)?;
        let (count, count_is_bound) = match syscall_count {
            Some(n) => (n, false),
            None => {
                // The search looks no further than one slot past the cap.
                let n = match next_symbol_after(map, linked) {
                    Some(next) => usize::try_from((next - linked) / 8).unwrap_or(usize::MAX),
                    None => MAX_SYSCALLS + 1,
                };
                if n > MAX_SYSCALLS {
                    notes.push(format!(
                        "sys_call_table: no symbol within {MAX_SYSCALLS} slots after it, \
                         so {MAX_SYSCALLS} entries at most"
                    ));
                }
                (n.min(MAX_SYSCALLS), true)
            }
        };
        if count == 0 || count > MAX_SYSCALLS {
            return Err(LayoutError::BadSyscallCount(count));
        }
        let list = match map.address_of("modules") {
            Some(_) => Some(slid(map, "modules", "the module list", slide)?),
            None => {
                notes.push(
                    "no modules in the symbol table: module text is watched, not named".into(),
                );
                None
            }
        };
        Ok(Self {
            text,
            rodata,
            syscall_table: Some(SyscallTableLoc {
                addr,
                count,
                count_is_bound,
            }),
            slide,
            gdt_volatile: LINUX_GDT_VOLATILE.to_vec(),
            modules: Some(ModuleArea {
                range: LINUX_MODULE_AREA,
                list,
            }),
            notes,
        })
    }

    /// A layout from explicit guest-virtual ranges (a guest without Linux
    /// symbols, or a test): `text` and `rodata` as `start..end`, the system call
    /// table as `(address, entries)`.
    pub fn new(
        text: std::ops::Range<u64>,
        rodata: Option<std::ops::Range<u64>>,
        syscall_table: Option<(u64, usize)>,
    ) -> Result<Self, LayoutError> {
        let text = check_range("kernel text", text.start, text.end)?;
        let rodata = rodata
            .map(|r| check_range("kernel read-only data", r.start, r.end))
            .transpose()?;
        let syscall_table = match syscall_table {
            Some((addr, count)) => {
                if count == 0 || count > MAX_SYSCALLS {
                    return Err(LayoutError::BadSyscallCount(count));
                }
                Some(SyscallTableLoc {
                    addr,
                    count,
                    count_is_bound: false,
                })
            }
            None => None,
        };
        Ok(Self {
            text,
            rodata,
            syscall_table,
            slide: 0,
            gdt_volatile: Vec::new(),
            modules: None,
            notes: Vec::new(),
        })
    }
}

impl KernelLayout {
    /// Checks a layout read back from elsewhere (a snapshot, a migration) as
    /// [`KernelLayout::new`] checks its ranges, and that the system call table
    /// fits the address space.
    pub fn validate(&self) -> Result<(), LayoutError> {
        check_range("kernel text", self.text.start, self.text.end)?;
        if let Some(r) = self.rodata {
            check_range("kernel read-only data", r.start, r.end)?;
        }
        if let Some(t) = self.syscall_table {
            if t.count == 0 || t.count > MAX_SYSCALLS {
                return Err(LayoutError::BadSyscallCount(t.count));
            }
            if t.addr.checked_add(t.count as u64 * 8).is_none() {
                return Err(LayoutError::BadRange {
                    what: "the system call table",
                    start: t.addr,
                    end: t.addr.wrapping_add(t.count as u64 * 8),
                });
            }
        }
        if let Some(m) = self.modules {
            let r = m.range;
            if r.start >= r.end || r.len() > MAX_MODULE_AREA {
                return Err(LayoutError::BadRange {
                    what: "the module area (at most 2 GiB)",
                    start: r.start,
                    end: r.end,
                });
            }
        }
        Ok(())
    }
}

/// The address of the first symbol above `addr` (the table offers only "nearest
/// at or below"): a binary search for the first address whose nearest symbol
/// does not start at `addr`.
fn next_symbol_after(map: &SymbolTable, addr: u64) -> Option<u64> {
    let starts_here = |a: u64| map.lookup(a).is_some_and(|(_, off)| a - off == addr);
    let limit = addr.checked_add((MAX_SYSCALLS as u64 + 1) * 8)?;
    if starts_here(limit) {
        return None;
    }
    // Invariant: starts_here(lo), !starts_here(hi).
    let (mut lo, mut hi) = (addr, limit);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if starts_here(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Some(hi)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAP: &str = "\
ffffffff81000000 T _stext
ffffffff81000000 T _text
ffffffff81001000 T __x64_sys_read
ffffffff81002000 T __x64_sys_write
ffffffff81003800 T _etext
ffffffff81800000 D __start_rodata
ffffffff81801040 D sys_call_table
ffffffff81801040 D sys_call_table_alias
ffffffff81801060 d vdso_mapping
ffffffff8192e000 D __end_rodata
";

    #[test]
    fn from_linux_symbols() {
        let map = SymbolTable::parse(MAP).unwrap();
        let slide = 0x2a00_0000;
        let l = KernelLayout::from_symbols(&map, slide, None).unwrap();
        assert_eq!(
            l.text,
            VirtRange {
                start: 0xffff_ffff_8100_0000 + slide as u64,
                end: 0xffff_ffff_8100_3800 + slide as u64
            }
        );
        assert_eq!(
            l.rodata.unwrap().start,
            0xffff_ffff_8180_0000 + slide as u64
        );
        assert_eq!(
            l.syscall_table,
            Some(SyscallTableLoc {
                addr: 0xffff_ffff_8180_1040 + slide as u64,
                count: 4,
                count_is_bound: true
            })
        );
        // Without a `modules` symbol the module area is watched, its texts unnamed.
        assert_eq!(
            l.modules,
            Some(ModuleArea {
                range: LINUX_MODULE_AREA,
                list: None
            })
        );
        assert_eq!(l.notes.len(), 1, "{:?}", l.notes);
        assert!(l.notes[0].contains("no modules"), "{:?}", l.notes);
        let l = KernelLayout::from_symbols(&map, -0x40_0000, Some(3)).unwrap();
        let t = l.syscall_table.unwrap();
        assert_eq!(
            (t.addr, t.count, t.count_is_bound),
            (0xffff_ffff_8140_1040, 3, false)
        );
    }

    #[test]
    fn missing_symbols() {
        let without = |name: &str| {
            let text: String = MAP
                .lines()
                .filter(|l| !l.ends_with(&format!(" {name}")))
                .map(|l| format!("{l}\n"))
                .collect();
            SymbolTable::parse(&text).unwrap()
        };
        for name in ["_stext", "_etext", "sys_call_table"] {
            let e = KernelLayout::from_symbols(&without(name), 0, None).unwrap_err();
            assert!(e.to_string().contains(name), "{e}");
        }
        let l = KernelLayout::from_symbols(&without("__end_rodata"), 0, None).unwrap();
        assert_eq!(l.rodata, None);
        assert!(l.notes[0].contains("__end_rodata"), "{:?}", l.notes);
        // The last symbol: no distance to measure, so the cap.
        let l = KernelLayout::from_symbols(
            &SymbolTable::parse(
                "ffffffff81000000 T _stext\nffffffff81001000 T _etext\nffffffff81800000 D sys_call_table\n",
            )
            .unwrap(),
            0,
            None,
        )
        .unwrap();
        assert_eq!(l.syscall_table.unwrap().count, MAX_SYSCALLS);
        assert!(
            l.notes[1].contains("no symbol within 1024 slots"),
            "{:?}",
            l.notes
        );
        assert!(matches!(
            KernelLayout::from_symbols(&SymbolTable::parse(MAP).unwrap(), 0, Some(0)),
            Err(LayoutError::BadSyscallCount(0))
        ));
        assert!(matches!(
            KernelLayout::from_symbols(&SymbolTable::parse(MAP).unwrap(), i64::MAX, None),
            Err(LayoutError::SlideOverflow { .. })
        ));
    }

    #[test]
    fn explicit_ranges() {
        let l =
            KernelLayout::new(0x1000..0x3000, Some(0x5000..0x5800), Some((0x6000, 16))).unwrap();
        assert_eq!(l.text.len(), 0x2000);
        assert_eq!(l.syscall_table.unwrap().count, 16);
        assert!(matches!(
            KernelLayout::new(
                std::ops::Range {
                    start: 0x3000,
                    end: 0x1000
                },
                None,
                None
            ),
            Err(LayoutError::BadRange { .. })
        ));
        assert!(matches!(
            KernelLayout::new(0..(2 << 30), None, None),
            Err(LayoutError::TooLarge { .. })
        ));
        assert!(matches!(
            KernelLayout::new(0..1, None, Some((0, 5000))),
            Err(LayoutError::BadSyscallCount(5000))
        ));
    }
}
