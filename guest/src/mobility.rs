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
use crate::virtio::{self, Records};
use crate::vsock::{Stream, STREAM_RECORDS_PER_PACKET};
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
    /// The CPL3 stack of `counter`, `dirty` and `compress` (never two at once).
    pub(crate) static MOBILITY_STACK_TOP: u8;
}

/// The word `i` holds after tick `tick`.
fn word(tick: u64, i: usize) -> u64 {
    (tick << 32) ^ (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// The most `counter_ms=`.
const MAX_TICK_MS: u64 = 1000;

/// The end of `mib` MiB from [`DIRTY_BASE`] up, when all of it is RAM above the
/// guest's image; else says so in `detail` under `key`.
pub(crate) fn free_region(
    machine: &Machine,
    key: &str,
    mib: u64,
    detail: &mut Line,
) -> Option<u64> {
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

/// The `counter` pages and their count: each tick checks every word the
/// previous tick wrote, then writes the next tick's.
struct Counter {
    pages: *mut u64,
    tick: u64,
    next: u64,
    tick_tsc: u64,
}

impl Counter {
    /// Fills the pages for tick 0; the first tick is due `tick_ms` from now.
    fn start(machine: &Machine, tick_ms: u64) -> Counter {
        // COUNTER_PAGES is this scenario's alone; all of the kernel image is
        // user-accessible, so the CPL3 loop may read and write it.
        let pages = addr_of_mut!(COUNTER_PAGES) as *mut u64;
        for i in 0..WORDS {
            // SAFETY: i < WORDS, inside COUNTER_PAGES.
            unsafe { write_volatile(pages.add(i), word(0, i)) };
        }
        let tick_tsc = machine.delay_tsc_khz() * tick_ms;
        Counter {
            pages,
            tick: 0,
            next: rdtsc() + tick_tsc,
            tick_tsc,
        }
    }

    /// Ticks when a tick is due (checks and rewrites the pages, prints
    /// `counter: <tick>`): whether it ticked. Err, with `lost: tick=<t> word=<i>
    /// found=0x..` in the detail, at the first word that does not hold what the
    /// previous tick wrote.
    fn poll(&mut self, detail: &mut Line) -> Result<bool, ()> {
        if rdtsc() < self.next {
            return Ok(false);
        }
        self.next += self.tick_tsc;
        for i in 0..WORDS {
            // SAFETY: as in start.
            let found = unsafe { read_volatile(self.pages.add(i)) };
            if found != word(self.tick, i) {
                detail
                    .str("lost: tick=")
                    .dec(self.tick)
                    .str(" word=")
                    .dec(i as u64)
                    .str(" found=")
                    .hex(found);
                return Err(());
            }
            // SAFETY: as above.
            unsafe { write_volatile(self.pages.add(i), word(self.tick + 1, i)) };
        }
        self.tick += 1;
        Serial.str("counter: ").dec(self.tick).str("\n");
        Ok(true)
    }
}

/// Prints `counter: <tick>` each tick (`counter_ms=`, default 100); fails at
/// the first word that does not hold what the previous tick wrote (`lost:
/// tick=<t> word=<i> found=0x..`). With `counter_fill_mib=N` it first writes a
/// word into each page of N MiB from 16 MiB up, so that a snapshot of it holds
/// that much touched memory.
pub fn counter(machine: &Machine, detail: &mut Line) -> bool {
    let (Ok(limit), Ok(Some(tick_ms)), Ok(fill)) = (
        machine.number("counter_ticks", 1, MAX_TICKS, None, detail),
        machine.number("counter_ms", 1, MAX_TICK_MS, Some(TICK_MS), detail),
        machine.number("counter_fill_mib", 1, DIRTY_MAX_MIB, None, detail),
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
    let mut pass = true;
    let mut run = || {
        for page in (DIRTY_BASE..fill_end).step_by(PAGE as usize) {
            // SAFETY: the page is RAM above the guest's image (checked above),
            // identity-mapped and this scenario's alone.
            unsafe { write_volatile(page as *mut u64, page | 1) };
        }
        let mut counter = Counter::start(machine, tick_ms);
        while limit.is_none_or(|n| counter.tick < n) {
            if counter.poll(detail).is_err() {
                pass = false;
                return;
            }
        }
        detail.str("ticks=").dec(counter.tick);
    };
    cpu::run_user(addr_of!(MOBILITY_STACK_TOP) as u64, &mut run);
    pass
}

/// Where the `dirty` region (and `blk-bench`'s buffers) begins: above the guest's image.
pub(crate) const DIRTY_BASE: u64 = 16 << 20;
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

/// The `dirty` writer: one word per 4 KiB page across its region, page after
/// page and round again, paced by the TSC; from the second sweep on, each page's
/// word must still hold what the last sweep wrote.
struct Dirtier {
    pages: u64,
    pages_per_s: u64,
    /// TSC ticks per second.
    second: u64,
    page: u64,
    sweep: u64,
    /// This second's start and the pages written in it.
    start: u64,
    done: u64,
    /// Seconds ended, and the pages written in them.
    seconds: u64,
    total: u64,
}

impl Dirtier {
    /// From `dirty_mib=` and `dirty_mib_s=` (defaults without them); the error
    /// goes to the detail.
    fn from_params(machine: &Machine, detail: &mut Line) -> Result<Dirtier, ()> {
        let (Ok(Some(mib)), Ok(Some(mib_s))) = (
            machine.number(
                "dirty_mib",
                1,
                DIRTY_MAX_MIB,
                Some(DIRTY_DEFAULT_MIB),
                detail,
            ),
            machine.number(
                "dirty_mib_s",
                1,
                DIRTY_MAX_MIB_S,
                Some(DIRTY_DEFAULT_MIB_S),
                detail,
            ),
        ) else {
            return Err(());
        };
        free_region(machine, "dirty_mib", mib, detail).ok_or(())?;
        Ok(Dirtier {
            pages: mib << 8,
            pages_per_s: mib_s << 8,
            second: machine.delay_tsc_khz() * 1000,
            page: 0,
            sweep: 0,
            start: rdtsc(),
            done: 0,
            seconds: 0,
            total: 0,
        })
    }

    /// Writes the pages due by now in this second; at its end prints `dirty:
    /// <pages> pages in second <k>` and starts the next: whether a second ended.
    /// Err, with `lost: page=<i> sweep=<s> found=0x..` in the detail, at a page
    /// that lost its word.
    fn step(&mut self, detail: &mut Line) -> Result<bool, ()> {
        // Wrapping: a TSC that went back (a restore elsewhere) ends the second.
        let elapsed = rdtsc().wrapping_sub(self.start).min(self.second);
        // Saturating: a rate beyond what the loop can write just writes flat out.
        let due = elapsed.saturating_mul(self.pages_per_s) / self.second;
        while self.done < due {
            let word = (DIRTY_BASE + self.page * PAGE) as *mut u64;
            // SAFETY: the page is RAM above the guest's image (checked in
            // from_params), identity-mapped and this scenario's alone.
            let found = unsafe { read_volatile(word) };
            if self.sweep > 0 && found != dirty_word(self.sweep - 1, self.page) {
                detail
                    .str("lost: page=")
                    .dec(self.page)
                    .str(" sweep=")
                    .dec(self.sweep)
                    .str(" found=")
                    .hex(found);
                return Err(());
            }
            // SAFETY: as above.
            unsafe { write_volatile(word, dirty_word(self.sweep, self.page)) };
            self.page += 1;
            if self.page == self.pages {
                self.page = 0;
                self.sweep += 1;
            }
            self.done += 1;
        }
        if elapsed < self.second {
            return Ok(false);
        }
        self.seconds += 1;
        self.total += self.done;
        Serial
            .str("dirty: ")
            .dec(self.done)
            .str(" pages in second ")
            .dec(self.seconds)
            .str("\n");
        self.start = rdtsc();
        self.done = 0;
        Ok(true)
    }
}

/// `dirty`: at CPL3, writes one word per 4 KiB page across `dirty_mib=` MiB
/// from 16 MiB up, page after page and round again, paced by the TSC to
/// `dirty_mib_s=` MiB per second; prints `dirty: <pages> pages in second <k>`
/// each second; runs until the VM is stopped, or for `dirty_s=` seconds. From
/// the second sweep on, each page's word must still hold what the last sweep
/// wrote (`lost: page=<i> sweep=<s> found=0x..` otherwise).
pub fn dirty(machine: &Machine, detail: &mut Line) -> bool {
    let Ok(seconds) = machine.number("dirty_s", 1, DIRTY_MAX_S, None, detail) else {
        return false;
    };
    let Ok(mut dirtier) = Dirtier::from_params(machine, detail) else {
        return false;
    };
    let mut pass = true;
    let mut run = || {
        while seconds.is_none_or(|n| dirtier.seconds < n) {
            if dirtier.step(detail).is_err() {
                pass = false;
                return;
            }
        }
        detail
            .str("mib=")
            .dec(dirtier.pages >> 8)
            .str(" mib_s=")
            .dec(dirtier.pages_per_s >> 8)
            .str(" seconds=")
            .dec(dirtier.seconds)
            .str(" pages=")
            .dec(dirtier.total);
    };
    cpu::run_user(addr_of!(MOBILITY_STACK_TOP) as u64, &mut run);
    pass
}

/// `mobility_s=` at most; `blk_rec_s=` and `vsock_rec_s=` without the word, and
/// their most.
const MOBILITY_MAX_S: u64 = 1_000_000;
const BLK_DEFAULT_REC_S: u64 = 100;
const BLK_MAX_REC_S: u64 = 100_000;
const VSOCK_DEFAULT_REC_S: u64 = 2048;
const VSOCK_MAX_REC_S: u64 = 10_000_000;
/// How long the end waits for the host to take the stream's last bytes.
const STREAM_CLOSE_MS: u64 = 5000;

/// `seconds=<k> ticks=<t> blk=<records> vsock=<next record> connections=<n>`.
fn progress<'a, O: Out>(
    out: &'a mut O,
    dirtier: &Dirtier,
    counter: &Counter,
    records: &Records,
    stream: &Stream,
) -> &'a mut O {
    out.str("seconds=")
        .dec(dirtier.seconds)
        .str(" ticks=")
        .dec(counter.tick)
        .str(" blk=")
        .dec(records.written)
        .str(" vsock=")
        .dec(stream.next)
        .str(" connections=")
        .dec(stream.connections)
}

/// Lets `per_s` events happen each second of TSC time, a second at a time (a
/// TSC that jumped, as across a restore, starts a new second).
struct Pace {
    per_s: u64,
    second: u64,
    start: u64,
    done: u64,
}

impl Pace {
    fn new(per_s: u64, machine: &Machine) -> Pace {
        Pace {
            per_s,
            second: machine.delay_tsc_khz() * 1000,
            start: rdtsc(),
            done: 0,
        }
    }

    /// Whether the next event is due now (it then counts as done).
    fn take(&mut self) -> bool {
        let now = rdtsc();
        if now.wrapping_sub(self.start) >= self.second {
            (self.start, self.done) = (now, 0);
        }
        let due = now.wrapping_sub(self.start).saturating_mul(self.per_s) / self.second + 1;
        let take = self.done < due.min(self.per_s);
        self.done += u64::from(take);
        take
    }
}

/// `mobility`: everything a move must carry, at once, at CPL3: the `counter`
/// tick and pages, the `dirty` writer (`dirty_mib=`, `dirty_mib_s=`), numbered
/// records written to the first writable virtio-blk disk (`blk_rec_s=` a
/// second; read back and checked 8 at a time), and a stream of numbered
/// records to the host over the first virtio-vsock device (`vsock_rec_s=` a
/// second, to CID 2 port 1235; after a transport reset it connects again and
/// goes on from the next record). Prints `mobility: seconds=<k> ticks=<t>
/// blk=<records> vsock=<next record> connections=<n>` each second. Runs until the VM
/// is stopped, or for `mobility_s=` seconds; then reads every disk record back,
/// waits until the host has taken the whole stream and shuts it down.
pub fn mobility(machine: &Machine, detail: &mut Line) -> bool {
    let params = (
        machine.number("mobility_s", 1, MOBILITY_MAX_S, None, detail),
        machine.number("blk_rec_s", 1, BLK_MAX_REC_S, None, detail),
        machine.number("vsock_rec_s", 1, VSOCK_MAX_REC_S, None, detail),
    );
    let (Ok(seconds), Ok(blk_rec_s), Ok(vsock_rec_s)) = params else {
        return false;
    };
    let blk_rec_s = blk_rec_s.unwrap_or(BLK_DEFAULT_REC_S);
    let packets_s = vsock_rec_s
        .unwrap_or(VSOCK_DEFAULT_REC_S)
        .div_ceil(STREAM_RECORDS_PER_PACKET);
    let rates = (seconds, blk_rec_s, packets_s);
    virtio::run_at_cpl3(machine, detail, |devices, clock, detail| {
        let mut records = Records::open(devices, clock).map_err(|e| {
            detail.str(e);
        })?;
        let result = Stream::open(devices, clock, detail).and_then(|mut stream| {
            let result = run_all(machine, rates, &mut records, &mut stream, detail);
            stream.reset();
            result
        });
        records.reset();
        result
    })
}

/// `mobility`'s loop, with its devices set up.
fn run_all(
    machine: &Machine,
    (seconds, blk_rec_s, packets_s): (Option<u64>, u64, u64),
    records: &mut Records,
    stream: &mut Stream,
    detail: &mut Line,
) -> Result<(), ()> {
    let mut dirtier = Dirtier::from_params(machine, detail)?;
    let mut counter = Counter::start(machine, TICK_MS);
    let (mut blk_pace, mut vsock_pace) =
        (Pace::new(blk_rec_s, machine), Pace::new(packets_s, machine));
    let vsock_error = |detail: &mut Line, e: &str| {
        detail.str("vsock: ").str(e);
    };
    while seconds.is_none_or(|n| dirtier.seconds < n) {
        counter.poll(detail)?;
        if dirtier.step(detail)? {
            progress(
                Serial.str("mobility: "),
                &dirtier,
                &counter,
                records,
                stream,
            )
            .str("\n");
        }
        stream.poll().map_err(|e| vsock_error(detail, e))?;
        if stream.ready() && vsock_pace.take() {
            stream.send_records().map_err(|e| vsock_error(detail, e))?;
        }
        if !records.full() && blk_pace.take() {
            records.write_next(detail)?;
        }
    }
    records.check_all(detail)?;
    stream
        .close(STREAM_CLOSE_MS)
        .map_err(|e| vsock_error(detail, e))?;
    progress(detail, &dirtier, &counter, records, stream)
        .str(" dirty_pages=")
        .dec(dirtier.total)
        .str(" resets=")
        .dec(stream.resets);
    Ok(())
}
