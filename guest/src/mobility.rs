//! Guests that move. `counter`, for snapshot, restore and migration tests: at
//! CPL3, a count of 100 ms ticks (TSC time), printed each tick, and 64 pages of
//! memory whose every word depends on the count. Each tick first checks the
//! previous tick's words, so a guest brought back with memory lost or stale, or
//! with its count gone back, says so. `dirty`, for `vigil bench migrate`: at
//! CPL3, one word written per 4 KiB page across a region, at a set rate.

use core::arch::global_asm;
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};

use crate::cpu::{self, rdtsc};
use crate::serial::{Line, Out, Serial};
use crate::Machine;

/// Pages the count is written into.
const PAGES: usize = 64;
const WORDS: usize = PAGES * 512;
const TICK_MS: u64 = 100;
/// The most `counter_ticks=`.
const MAX_TICKS: u64 = 1_000_000;

global_asm!(
    r#"
    .section .bss.counter, "aw", @nobits
    .balign 4096
    .global COUNTER_PAGES
COUNTER_PAGES:
    .skip 4096 * 64
    .skip 16384
    .global MOBILITY_STACK_TOP
MOBILITY_STACK_TOP:
    "#,
    options(att_syntax)
);

extern "C" {
    static mut COUNTER_PAGES: [u64; WORDS];
    /// The CPL3 stack of `counter` and `dirty` (never both at once).
    static MOBILITY_STACK_TOP: u8;
}

/// The word `i` holds after tick `tick`.
fn word(tick: u64, i: usize) -> u64 {
    (tick << 32) ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// The most `counter_ms=`.
const MAX_TICK_MS: u64 = 1000;

/// The number `key=` holds (1 to `max`), else `default`; a bad value is said in
/// `detail`.
fn number(
    machine: &Machine,
    key: &str,
    max: u64,
    default: Option<u64>,
    detail: &mut Line,
) -> Result<Option<u64>, ()> {
    match machine.info.param_number(key.as_bytes(), 1, max) {
        Ok(v) => Ok(v.or(default)),
        Err(value) => {
            detail
                .str(key)
                .str("=")
                .bytes(value)
                .str(": expected 1 to ")
                .dec(max);
            Err(())
        }
    }
}

/// The end of `mib` MiB from [`DIRTY_BASE`] up, when all of it is RAM above the
/// guest's image; else says so in `detail` under `key`.
fn free_region(machine: &Machine, key: &str, mib: u64, detail: &mut Line) -> Option<u64> {
    let end = DIRTY_BASE + (mib << 20);
    let image_end = addr_of!(__image_end) as u64;
    let in_ram = machine
        .info
        .ram()
        .iter()
        .any(|r| r.base <= DIRTY_BASE && end <= r.end());
    if !in_ram || image_end > DIRTY_BASE {
        detail
            .str(key)
            .str("=")
            .dec(mib)
            .str(": ")
            .hex(DIRTY_BASE)
            .str("..")
            .hex(end)
            .str(" is not free RAM");
        return None;
    }
    Some(end)
}

/// Prints `counter: <tick>` each tick (`counter_ms=`, default 100); fails at
/// the first word that does not hold what the previous tick wrote (`lost:
/// tick=<t> word=<i> found=0x..`). With `counter_fill_mib=N` it first writes a
/// word into each page of N MiB from 16 MiB up, so that a snapshot of it holds
/// that much touched memory.
pub fn counter(machine: &Machine, detail: &mut Line) -> bool {
    let (Ok(limit), Ok(Some(tick_ms)), Ok(fill)) = (
        number(machine, "counter_ticks", MAX_TICKS, None, detail),
        number(machine, "counter_ms", MAX_TICK_MS, Some(TICK_MS), detail),
        number(machine, "counter_fill_mib", DIRTY_MAX_MIB, None, detail),
    ) else {
        return false;
    };
    let fill_end = match fill {
        Some(mib) => match free_region(machine, "counter_fill_mib", mib, detail) {
            Some(end) => end,
            None => return false,
        },
        None => DIRTY_BASE,
    };
    let tick_tsc = machine.delay_tsc_khz() * tick_ms;
    let mut pass = true;
    // COUNTER_PAGES is this scenario's alone; all of the kernel image is
    // user-accessible, so the CPL3 loop may read and write it.
    let pages = addr_of_mut!(COUNTER_PAGES) as *mut u64;
    let mut run = || {
        for page in (DIRTY_BASE..fill_end).step_by(PAGE as usize) {
            // SAFETY: the page is RAM above the guest's image (checked above),
            // identity-mapped and this scenario's alone.
            unsafe { write_volatile(page as *mut u64, page | 1) };
        }
        for i in 0..WORDS {
            // SAFETY: i < WORDS, inside COUNTER_PAGES.
            unsafe { write_volatile(pages.add(i), word(0, i)) };
        }
        let mut tick = 0u64;
        let mut next = rdtsc() + tick_tsc;
        while limit.is_none_or(|n| tick < n) {
            while rdtsc() < next {}
            next += tick_tsc;
            for i in 0..WORDS {
                // SAFETY: as above.
                let found = unsafe { read_volatile(pages.add(i)) };
                if found != word(tick, i) {
                    detail
                        .str("lost: tick=")
                        .dec(tick)
                        .str(" word=")
                        .dec(i as u64)
                        .str(" found=")
                        .hex(found);
                    pass = false;
                    return;
                }
                // SAFETY: as above.
                unsafe { write_volatile(pages.add(i), word(tick + 1, i)) };
            }
            tick += 1;
            Serial.str("counter: ").dec(tick).str("\n");
        }
        detail.str("ticks=").dec(tick);
    };
    cpu::run_user(addr_of!(MOBILITY_STACK_TOP) as u64, &mut run);
    pass
}

/// Where the `dirty` region begins: above the guest's image.
const DIRTY_BASE: u64 = 16 << 20;
const PAGE: u64 = 4096;
/// `dirty_mib=` without the word, and its most (the region stays below 4 GiB,
/// which the boot page tables map).
const DIRTY_DEFAULT_MIB: u64 = 32;
const DIRTY_MAX_MIB: u64 = 4096 - 16;
/// `dirty_mib_s=` without the word, and its most.
const DIRTY_DEFAULT_MIB_S: u64 = 64;
const DIRTY_MAX_MIB_S: u64 = 1_000_000;
/// The most `dirty_s=`.
const DIRTY_MAX_S: u64 = 1_000_000;

/// What `dirty` writes into page `page` on sweep `sweep`: never zero, so that
/// a migration cannot send the page as zeros.
fn dirty_word(sweep: u64, page: u64) -> u64 {
    ((sweep + 1) << 32) | page
}

extern "C" {
    static __image_end: u8;
}

/// `dirty`: at CPL3, writes one word per 4 KiB page across `dirty_mib=` MiB
/// from 16 MiB up, page after page and round again, paced by the TSC to
/// `dirty_mib_s=` MiB per second; prints `dirty: <pages> pages in second <k>`
/// each second; runs until the VM is stopped, or for `dirty_s=` seconds. From
/// the second sweep on, each page's word must still hold what the last sweep
/// wrote (`lost: page=<i> sweep=<s> found=0x..` otherwise).
pub fn dirty(machine: &Machine, detail: &mut Line) -> bool {
    let (Ok(Some(mib)), Ok(Some(mib_s)), Ok(seconds)) = (
        number(machine, "dirty_mib", DIRTY_MAX_MIB, Some(DIRTY_DEFAULT_MIB), detail),
        number(machine, "dirty_mib_s", DIRTY_MAX_MIB_S, Some(DIRTY_DEFAULT_MIB_S), detail),
        number(machine, "dirty_s", DIRTY_MAX_S, None, detail),
    ) else {
        return false;
    };
    if free_region(machine, "dirty_mib", mib, detail).is_none() {
        return false;
    }
    let pages = mib << 8;
    let pages_per_s = mib_s << 8;
    let second = machine.delay_tsc_khz() * 1000;
    let mut pass = true;
    let mut run = || {
        let (mut page, mut sweep, mut total, mut k) = (0u64, 0u64, 0u64, 0u64);
        while seconds.is_none_or(|n| k < n) {
            let start = rdtsc();
            let mut done = 0u64;
            loop {
                // Wrapping: a TSC that went back (a restore elsewhere) ends the second.
                let elapsed = rdtsc().wrapping_sub(start).min(second);
                // Saturating: a rate beyond what the loop can write just writes flat out.
                let due = elapsed.saturating_mul(pages_per_s) / second;
                while done < due {
                    let word = (DIRTY_BASE + page * PAGE) as *mut u64;
                    // SAFETY: the page is RAM above the guest's image (checked
                    // above), identity-mapped and this scenario's alone.
                    let found = unsafe { read_volatile(word) };
                    if sweep > 0 && found != dirty_word(sweep - 1, page) {
                        detail
                            .str("lost: page=")
                            .dec(page)
                            .str(" sweep=")
                            .dec(sweep)
                            .str(" found=")
                            .hex(found);
                        pass = false;
                        return;
                    }
                    // SAFETY: as above.
                    unsafe { write_volatile(word, dirty_word(sweep, page)) };
                    page += 1;
                    if page == pages {
                        page = 0;
                        sweep += 1;
                    }
                    done += 1;
                }
                if elapsed == second {
                    break;
                }
            }
            k += 1;
            total += done;
            Serial
                .str("dirty: ")
                .dec(done)
                .str(" pages in second ")
                .dec(k)
                .str("\n");
        }
        detail
            .str("mib=")
            .dec(mib)
            .str(" mib_s=")
            .dec(mib_s)
            .str(" seconds=")
            .dec(k)
            .str(" pages=")
            .dec(total);
    };
    cpu::run_user(addr_of!(MOBILITY_STACK_TOP) as u64, &mut run);
    pass
}
