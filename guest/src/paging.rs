//! On-demand identity mapping above 4 GiB (the boot tables cover the first 4 GiB).

use core::arch::asm;
use core::ptr::addr_of_mut;

/// Spare page directories for addresses above 4 GiB (1 GiB each).
pub const PD_POOL_PAGES: usize = 8;
const FOUR_GIB: u64 = 1 << 32;
const PDPT_SPAN: u64 = 1 << 39;
const PRESENT_RW_USER: u64 = 0x7;
const HUGE: u64 = 0x80;
/// PWT | PCD: with the power-on PAT, uncacheable (UC).
const UNCACHED: u64 = 0x18;

extern "C" {
    static mut PDPT: [u64; 512];
    static mut PD_POOL: [[u64; 512]; PD_POOL_PAGES];
}

static mut PD_POOL_USED: usize = 0;

/// Identity-maps the 2 MiB page holding `addr`. False when it cannot (above 512 GiB,
/// or the pool of page directories is spent).
pub fn map(addr: u64) -> bool {
    if addr < FOUR_GIB {
        return true;
    }
    if addr >= PDPT_SPAN {
        return false;
    }
    // SAFETY: only the BSP changes page tables, one scenario at a time; the pool pages
    // are this module's alone.
    unsafe {
        let pdpt = addr_of_mut!(PDPT) as *mut u64;
        let pdpt_entry = pdpt.add((addr >> 30) as usize);
        if *pdpt_entry & 1 == 0 {
            let used = *addr_of_mut!(PD_POOL_USED);
            if used == PD_POOL_PAGES {
                return false;
            }
            *addr_of_mut!(PD_POOL_USED) = used + 1;
            let pd = (addr_of_mut!(PD_POOL) as *mut [u64; 512]).add(used);
            pd.write_bytes(0, 1);
            *pdpt_entry = pd as u64 | PRESENT_RW_USER;
        }
        let pd = (*pdpt_entry & !0xfff) as *mut u64;
        let page = addr & !((1 << 21) - 1);
        *pd.add(((addr >> 21) & 511) as usize) = page | HUGE | PRESENT_RW_USER;
        asm!("invlpg [{}]", in(reg) page, options(nostack, preserves_flags));
    }
    true
}

/// Identity-maps the 2 MiB page holding `addr` uncacheable (device MMIO). False when
/// `map` cannot map it.
pub fn map_uncached(addr: u64) -> bool {
    if !map(addr) {
        return false;
    }
    // SAFETY: as in `map`; the entry exists now (boot tables or `map`).
    unsafe {
        let pdpt = addr_of_mut!(PDPT) as *mut u64;
        let pd = (*pdpt.add((addr >> 30) as usize) & !0xfff) as *mut u64;
        let entry = pd.add(((addr >> 21) & 511) as usize);
        if *entry & UNCACHED != UNCACHED {
            *entry |= UNCACHED;
            let page = addr & !((1 << 21) - 1);
            asm!("invlpg [{}]", in(reg) page, options(nostack, preserves_flags));
        }
    }
    true
}
