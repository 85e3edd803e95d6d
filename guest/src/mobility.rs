//! `counter`, for snapshot, restore and migration tests: at CPL3, a count of
//! 100 ms ticks (TSC time), printed each tick, and 64 pages of memory whose
//! every word depends on the count. Each tick first checks the previous tick's
//! words, so a guest brought back with memory lost or stale, or with its count
//! gone back, says so.

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
    .global COUNTER_STACK_TOP
COUNTER_STACK_TOP:
    "#,
    options(att_syntax)
);

extern "C" {
    static mut COUNTER_PAGES: [u64; WORDS];
    static COUNTER_STACK_TOP: u8;
}

/// The word `i` holds after tick `tick`.
fn word(tick: u64, i: usize) -> u64 {
    (tick << 32) ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// `counter_ticks=N` (1 to [`MAX_TICKS`]): stop after N ticks; without it, count
/// until the VM is stopped.
fn ticks(machine: &Machine) -> Result<Option<u64>, &[u8]> {
    let Some(value) = machine.info.param(b"counter_ticks") else {
        return Ok(None);
    };
    let mut n = 0u64;
    for &c in value {
        if !c.is_ascii_digit() {
            return Err(value);
        }
        n = n.saturating_mul(10).saturating_add(u64::from(c - b'0'));
    }
    if value.is_empty() || n == 0 || n > MAX_TICKS {
        return Err(value);
    }
    Ok(Some(n))
}

/// Prints `counter: <tick>` each tick; fails at the first word that does not
/// hold what the previous tick wrote (`lost: tick=<t> word=<i> found=0x..`).
pub fn counter(machine: &Machine, detail: &mut Line) -> bool {
    let limit = match ticks(machine) {
        Ok(limit) => limit,
        Err(value) => {
            detail
                .str("counter_ticks=")
                .bytes(value)
                .str(": expected 1 to ")
                .dec(MAX_TICKS);
            return false;
        }
    };
    let tick_tsc = machine.delay_tsc_khz() * TICK_MS;
    let mut pass = true;
    // COUNTER_PAGES is this scenario's alone; all of the kernel image is
    // user-accessible, so the CPL3 loop may read and write it.
    let pages = addr_of_mut!(COUNTER_PAGES) as *mut u64;
    let mut run = || {
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
    cpu::run_user(addr_of!(COUNTER_STACK_TOP) as u64, &mut run);
    pass
}
