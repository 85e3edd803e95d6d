//! `compress`, for the memory-compression pager (`--memory-compression`): at
//! CPL3, fills `compress_mib=` MiB (from 16 MiB up) with a known mix, a
//! quarter each: pages of zeros, copies of four distinct pages, text that
//! compresses well, and random data that does not. Prints `compress: filled
//! pages=<n>`, touches none of it for `compress_idle_s=` seconds (TSC time),
//! prints `compress: idle over`; with `compress_blk=1`, reads sector 0 of the
//! first virtio-blk disk into the first text page (the device writes into a
//! page the host may hold compressed: its first 512 bytes must then be
//! [`disk_byte`], the rest as filled); then checks every byte of the region
//! and prints `compress: verified pages=<n> mismatches=<m>`. With
//! `compress_step_mib=<N>`, it fills and checks N MiB at a time, spinning
//! `compress_step_ms=` between steps, so that a pager can take cold pages
//! while the region grows (the density test).

use core::ptr::{addr_of, read_volatile, write_volatile};

use crate::cpu::{self, rdtsc};
use crate::mobility::{free_region, DIRTY_BASE, MOBILITY_STACK_TOP};
use crate::serial::{Line, Out, Serial};
use crate::{virtio, Machine};

const PAGE: u64 = 4096;
const WORDS: u64 = PAGE / 8;
const DEFAULT_MIB: u64 = 16;
const MAX_MIB: u64 = 1024;
const DEFAULT_IDLE_S: u64 = 5;
const MAX_IDLE_S: u64 = 3600;
const DEFAULT_STEP_MS: u64 = 1000;
const MAX_STEP_MS: u64 = 60_000;
/// The page the disk's sector 0 is read into: the first text page.
const BLK_PAGE: u64 = 2;
const SECTOR: u64 = 512;

/// `byte[i]` of the disk's sector 0 the host writes for `compress_blk=1`.
pub fn disk_byte(i: u64) -> u8 {
    (i * 13 + 7) as u8
}

/// Word `w` of page `i` of the mix (the host's copy:
/// `vigil_test_guest::compress_mix_word`).
fn word(i: u64, w: u64) -> u64 {
    const TEXT: [&[u8; 8]; 4] = [b"the cold", b" pages o", b"f a gues", b"t idle.\n"];
    match i % 4 {
        0 => 0,
        // Four distinct pages, each repeated.
        1 => ((i / 4) % 4 + 1).wrapping_mul(0x0101_0101_0101_0101) ^ w,
        // Text, one word per page telling it apart.
        2 if w == 0 => i,
        2 => u64::from_le_bytes(*TEXT[(w % 4) as usize]),
        // splitmix64: no two words alike.
        _ => {
            let mut z = (i << 20 | w).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
    }
}

/// What word `w` of page `i` must hold at the check.
fn expected(i: u64, w: u64, blk: bool) -> u64 {
    if blk && i == BLK_PAGE && w < SECTOR / 8 {
        let b = |k: u64| u64::from(disk_byte(w * 8 + k)) << (8 * k);
        (0..8).map(b).fold(0, |a, x| a | x)
    } else {
        word(i, w)
    }
}

pub fn compress(machine: &Machine, detail: &mut Line) -> bool {
    let params = (
        machine.number("compress_mib", 1, MAX_MIB, Some(DEFAULT_MIB), detail),
        machine.number(
            "compress_idle_s",
            1,
            MAX_IDLE_S,
            Some(DEFAULT_IDLE_S),
            detail,
        ),
        machine.number("compress_blk", 0, 1, Some(0), detail),
        machine.number("compress_hold_s", 0, MAX_IDLE_S, Some(0), detail),
    );
    let steps = (
        machine.number("compress_step_mib", 0, MAX_MIB, Some(0), detail),
        machine.number(
            "compress_step_ms",
            0,
            MAX_STEP_MS,
            Some(DEFAULT_STEP_MS),
            detail,
        ),
    );
    let (Ok(Some(mib)), Ok(Some(idle_s)), Ok(Some(blk)), Ok(Some(hold_s))) = params else {
        return false;
    };
    let (Ok(Some(step_mib)), Ok(Some(step_ms))) = steps else {
        return false;
    };
    let blk = blk == 1;
    if free_region(machine, "compress_mib", mib, detail).is_none() {
        return false;
    }
    let pages = (mib << 20) / PAGE;
    // Pages per step (all at once without steps) and the pause after each.
    let step = if step_mib == 0 {
        pages
    } else {
        (step_mib << 20) / PAGE
    };
    let pause = step_ms * machine.delay_tsc_khz();
    let spin = |tsc: u64| {
        let start = rdtsc();
        while rdtsc().wrapping_sub(start) < tsc {
            core::hint::spin_loop();
        }
    };
    let at = |i: u64, w: u64| (DIRTY_BASE + i * PAGE + w * 8) as *mut u64;
    let mut fill = || {
        for i in 0..pages {
            for w in 0..WORDS {
                // SAFETY: RAM above the guest's image (checked above),
                // identity-mapped and this scenario's alone.
                unsafe { write_volatile(at(i, w), word(i, w)) };
            }
            if (i + 1) % step == 0 && i + 1 < pages {
                spin(pause);
            }
        }
    };
    cpu::run_user(addr_of!(MOBILITY_STACK_TOP) as u64, &mut fill);
    Serial.str("compress: filled pages=").dec(pages).str("\n");
    let wait = idle_s * machine.delay_tsc_khz() * 1000;
    let mut idle = || spin(wait);
    cpu::run_user(addr_of!(MOBILITY_STACK_TOP) as u64, &mut idle);
    Serial.str("compress: idle over\n");
    if blk && !virtio::blk_read_into(machine, detail, DIRTY_BASE + BLK_PAGE * PAGE, SECTOR as u32) {
        return false;
    }
    let (mut mismatches, mut first) = (0u64, None);
    let mut check = || {
        for i in 0..pages {
            for w in 0..WORDS {
                // SAFETY: as in `fill`.
                let got = unsafe { read_volatile(at(i, w)) };
                if got != expected(i, w, blk) {
                    mismatches += 1;
                    first.get_or_insert((i, w, got));
                }
            }
            if (i + 1) % step == 0 && i + 1 < pages {
                spin(pause);
            }
        }
    };
    cpu::run_user(addr_of!(MOBILITY_STACK_TOP) as u64, &mut check);
    Serial
        .str("compress: verified pages=")
        .dec(pages)
        .str(" mismatches=")
        .dec(mismatches)
        .str("\n");
    // The VM stays up a while for the host to read what the check did.
    let hold = hold_s * machine.delay_tsc_khz() * 1000;
    let mut held = || spin(hold);
    cpu::run_user(addr_of!(MOBILITY_STACK_TOP) as u64, &mut held);
    detail
        .str("pages=")
        .dec(pages)
        .str(" mismatches=")
        .dec(mismatches)
        .str(" blk=")
        .dec(u64::from(blk));
    if let Some((i, w, got)) = first {
        detail
            .str(" first: page=")
            .dec(i)
            .str(" word=")
            .dec(w)
            .str(" found=")
            .hex(got);
    }
    mismatches == 0
}
