//! The `balloon` scenario: a virtio-balloon driver that gives the host the pages it
//! asks for (inflate), holds them long enough for the host to see its resident
//! memory drop, takes them back (deflate) and checks they come back zeroed, i.e.
//! that the host really discarded them. Uses the polled driver of `virtio.rs` at
//! CPL3, queues inflate (0) and deflate (1), `VIRTIO_F_VERSION_1` only.

use crate::cpu::rdtsc;
use crate::serial::{Line, Out, Serial};
use crate::virtio::{self, dma, rd, wr, Clock, Dev, Queue, CONFIG, MQ_BUF, MQ_BUF_LEN, WRITE};
use crate::Machine;

const ID_BALLOON: u32 = 5;
const INFLATE: u16 = 0;
const DEFLATE: u16 = 1;
/// Page numbers per request: one buffer of little-endian u32s.
const PFNS_PER_REQUEST: u64 = MQ_BUF_LEN / 4;
/// Where the pages the balloon gives back live: RAM above the guest's own image.
const POOL_START: u64 = 16 << 20;
const PAGE: u64 = 4096;
/// How long each phase holds so the host can read its resident memory.
const HOLD_MS: u64 = 1500;

pub fn balloon(machine: &Machine, detail: &mut Line) -> bool {
    with_balloon(machine, detail, run)
}

/// Runs `body` at CPL3 on the first virtio-balloon device, with the top of RAM.
fn with_balloon(
    machine: &Machine,
    detail: &mut Line,
    body: fn(Dev, Clock, u64, &mut Line) -> Result<(), ()>,
) -> bool {
    let ram_top = machine.info.ram_top();
    let missing = "no virtio-balloon device";
    virtio::with_device(
        machine,
        detail,
        ID_BALLOON,
        missing,
        |dev, clock, detail| body(dev, clock, ram_top, detail),
    )
}

/// Sends the pool's page numbers, `PFNS_PER_REQUEST` at a time, on `queue`.
fn send_pool(queue: &mut Queue, pages: u64) -> Result<(), &'static str> {
    let mut done = 0;
    while done < pages {
        let n = (pages - done).min(PFNS_PER_REQUEST);
        for i in 0..n {
            wr(dma(MQ_BUF) + 4 * i, (POOL_START / PAGE + done + i) as u32);
        }
        queue.desc(0, dma(MQ_BUF), (n * 4) as u32, 0, 0);
        queue.push_avail(0);
        queue.notify();
        queue.wait_used(2000)?;
        done += n;
    }
    Ok(())
}

fn hold(clock: Clock) {
    let start = rdtsc();
    while rdtsc() - start < clock.ms(HOLD_MS) {}
}

fn run(dev: Dev, clock: Clock, ram_top: u64, detail: &mut Line) -> Result<(), ()> {
    let fail = |detail: &mut Line, what: &str| {
        detail.str(what);
        Err(())
    };
    let set_up = || -> Result<(Queue, Queue), &'static str> {
        let features = virtio::negotiate(dev, clock, 0)?;
        let inflate = virtio::setup_queue(dev, clock, INFLATE, features)?;
        let deflate = virtio::setup_queue(dev, clock, DEFLATE, features)?;
        virtio::driver_ok(dev)?;
        Ok((inflate, deflate))
    };
    let (mut inflate, mut deflate) = match set_up() {
        Ok(queues) => queues,
        Err(error) => return fail(detail, error),
    };
    let pages = u64::from(dev.read(CONFIG));
    if pages == 0 {
        return fail(detail, "the host asks for no pages (num_pages=0)");
    }
    if POOL_START + pages * PAGE > ram_top.min(1 << 32) {
        return fail(detail, "the host asks for more pages than the pool has");
    }
    for p in 0..pages {
        wr(POOL_START + p * PAGE, 0x5a5a_0000_0000_0000u64 | p);
    }
    Serial.str("balloon: touched ").dec(pages).str(" pages\n");
    hold(clock);
    if let Err(e) = send_pool(&mut inflate, pages) {
        detail.str("inflate: ");
        return fail(detail, e);
    }
    dev.write(CONFIG + 4, pages as u32);
    Serial.str("balloon: inflated ").dec(pages).str(" pages\n");
    hold(clock);
    if let Err(e) = send_pool(&mut deflate, pages) {
        detail.str("deflate: ");
        return fail(detail, e);
    }
    dev.write(CONFIG + 4, 0);
    // Pages the host discarded come back as zeroes.
    let zeroed = (0..pages)
        .filter(|p| rd::<u64>(POOL_START + p * PAGE) == 0)
        .count() as u64;
    detail.str("pages=").dec(pages).str(" zeroed=").dec(zeroed);
    if zeroed != pages {
        return Err(());
    }
    Ok(())
}

const F_STATS_VQ: u64 = 1 << 1;
const F_REPORTING: u64 = 1 << 5;
/// Page numbers no RAM has: the largest, the first past the top of RAM is added at
/// run time, and the local APIC's page (MMIO).
const NOT_RAM: [u32; 2] = [u32::MAX, 0xfee00];

/// `balloon-evil`: a hostile balloon driver. Page numbers outside RAM and a page of
/// the guest's own image (given back: the guest's business, it reads zero after);
/// inflate chains outside RAM, looping, or of 0x7fff_ffff bytes; when the device
/// offers free page reporting, a report that starts and ends inside pages (only the
/// whole page between goes) and one outside RAM. Then a good inflate and deflate.
pub fn balloon_evil(machine: &Machine, detail: &mut Line) -> bool {
    with_balloon(machine, detail, evil)
}

/// Fills `page` with a pattern of its addresses.
fn mark(page: u64) {
    for i in (0..PAGE).step_by(8) {
        wr(page + i, 0x5a5a_0000_0000_0000u64 | page | i);
    }
}

/// Whether bytes `from..to` of `page` read as zero (the host discarded them).
fn zeroed(page: u64, from: u64, to: u64) -> bool {
    (from..to).step_by(8).all(|i| rd::<u64>(page + i) == 0)
}

/// Whether bytes `from..to` of `page` still hold the pattern of [`mark`].
fn marked(page: u64, from: u64, to: u64) -> bool {
    (from..to)
        .step_by(8)
        .all(|i| rd::<u64>(page + i) == 0x5a5a_0000_0000_0000u64 | page | i)
}

/// Makes the chain in descriptors 0.. available on `queue`; what the device made
/// of it.
fn submit(queue: &mut Queue) -> &'static str {
    queue.push_avail(0);
    queue.notify();
    virtio::evil_outcome(queue.wait_used(2000))
}

/// One inflate request of `pfns` (from MQ_BUF).
fn inflate_pages(queue: &mut Queue, pfns: &[u32]) -> &'static str {
    for (i, &pfn) in pfns.iter().enumerate() {
        wr(dma(MQ_BUF) + 4 * i as u64, pfn);
    }
    queue.desc(0, dma(MQ_BUF), 4 * pfns.len() as u32, 0, 0);
    submit(queue)
}

fn evil(dev: Dev, clock: Clock, ram_top: u64, detail: &mut Line) -> Result<(), ()> {
    let set_up = || -> Result<(Queue, Queue, Option<Queue>), &'static str> {
        // The statistics queue is accepted when offered, as Linux does (its queue
        // then comes before the reporting queue), and left unused.
        let features = virtio::negotiate(dev, clock, F_STATS_VQ | F_REPORTING)?;
        let inflate = virtio::setup_queue(dev, clock, INFLATE, features)?;
        let deflate = virtio::setup_queue(dev, clock, DEFLATE, features)?;
        let reporting = if features & F_REPORTING != 0 {
            let index = if features & F_STATS_VQ != 0 { 3 } else { 2 };
            Some(virtio::setup_queue(dev, clock, index, features)?)
        } else {
            None
        };
        virtio::driver_ok(dev)?;
        Ok((inflate, deflate, reporting))
    };
    let (mut inflate, mut deflate, reporting) = match set_up() {
        Ok(queues) => queues,
        Err(error) => {
            detail.str(error);
            return Err(());
        }
    };
    let mut good = true;
    let mut first = true;
    let mut report = |detail: &mut Line, name: &str, outcome: &str, expected: &str| {
        if !first {
            detail.str(" ");
        }
        first = false;
        detail.str(name).str("=").str(outcome);
        good &= outcome == expected;
    };

    let past_top = (ram_top / PAGE) as u32;
    let outcome = inflate_pages(&mut inflate, &[NOT_RAM[0], past_top, NOT_RAM[1]]);
    report(detail, "beyond", outcome, "used");

    // A page of the guest's own image (its DMA area, unused by this scenario).
    let own = dma(MQ_BUF + PAGE);
    mark(own);
    let outcome = match inflate_pages(&mut inflate, &[(own / PAGE) as u32]) {
        "used" if zeroed(own, 0, PAGE) => "zeroed",
        "used" => "kept",
        other => other,
    };
    report(detail, "image", outcome, "zeroed");

    inflate.desc(0, virtio::FAR_OUTSIDE_RAM, 64, 0, 0);
    report(detail, "oob", submit(&mut inflate), "used");
    wr(dma(MQ_BUF), NOT_RAM[0]);
    inflate.desc(0, dma(MQ_BUF), 4, virtio::NEXT, 1);
    inflate.desc(1, dma(MQ_BUF), 4, virtio::NEXT, 0);
    report(detail, "loop", submit(&mut inflate), "used");
    inflate.desc(0, dma(MQ_BUF), 0x7fff_ffff, 0, 0);
    report(detail, "huge", submit(&mut inflate), "used");

    if let Some(mut reporting) = reporting {
        // Half of the first page, all of the second, half of the third; then
        // nowhere.
        for p in 0..3 {
            mark(POOL_START + p * PAGE);
        }
        let half = PAGE / 2;
        reporting.desc(
            0,
            POOL_START + half,
            2 * PAGE as u32,
            WRITE | virtio::NEXT,
            1,
        );
        reporting.desc(1, virtio::FAR_OUTSIDE_RAM, PAGE as u32, WRITE, 0);
        let outcome = match submit(&mut reporting) {
            "used"
                if marked(POOL_START, 0, PAGE)
                    && zeroed(POOL_START + PAGE, 0, PAGE)
                    && marked(POOL_START + 2 * PAGE, 0, PAGE) =>
            {
                "exact"
            }
            "used" => "inexact",
            other => other,
        };
        report(detail, "report", outcome, "exact");
    }

    // The device still does its job.
    let page = POOL_START + 4 * PAGE;
    mark(page);
    let pfn = (page / PAGE) as u32;
    let outcome = match (inflate_pages(&mut inflate, &[pfn]), zeroed(page, 0, PAGE)) {
        ("used", true) => inflate_pages(&mut deflate, &[pfn]),
        ("used", false) => "kept",
        (other, _) => other,
    };
    report(detail, "good", outcome, "used");
    if !good {
        return Err(());
    }
    Ok(())
}

const F_FREE_PAGE_HINT: u64 = 1 << 3;
/// Free page hinting's command ids (virtio 1.2, 5.5.6.7).
const HINT_STOP: u32 = 0;
const HINT_DONE: u32 = 1;
/// The hinting command id in the config space, after num_pages and actual.
const HINT_CMD_ID: u64 = CONFIG + 8;
/// Pages hinted in the run.
const HINT_PAGES: u64 = 256;
/// How long the host may take to start the run, then to answer the stop.
const HINT_WAIT_MS: u64 = 30_000;

/// `balloon-hint`: free page hinting as Linux's driver does it. Waits for the
/// host to start a run (a command id of 2 or more in the config space), sends
/// that id, hints 256 pages holding a pattern (one device-writable buffer
/// each), sends stop, waits for done, then counts the hinted pages that read
/// back as zero (discarded by the host).
pub fn balloon_hint(machine: &Machine, detail: &mut Line) -> bool {
    with_balloon(machine, detail, hint)
}

/// Polls the hinting command id until `wanted` accepts it, for `ms` at most.
fn wait_cmd(dev: Dev, clock: Clock, ms: u64, wanted: impl Fn(u32) -> bool) -> Option<u32> {
    let start = rdtsc();
    while rdtsc() - start < clock.ms(ms) {
        let cmd = dev.read(HINT_CMD_ID);
        if wanted(cmd) {
            return Some(cmd);
        }
    }
    None
}

/// Sends command id `cmd` (a device-readable buffer) on `queue`.
fn send_cmd(queue: &mut Queue, cmd: u32) -> Result<(), &'static str> {
    wr(dma(MQ_BUF), cmd);
    queue.desc(0, dma(MQ_BUF), 4, 0, 0);
    queue.push_avail(0);
    queue.notify();
    queue.wait_used(2000).map(drop)
}

fn hint(dev: Dev, clock: Clock, ram_top: u64, detail: &mut Line) -> Result<(), ()> {
    let fail = |detail: &mut Line, what: &str| {
        detail.str(what);
        Err(())
    };
    if POOL_START + HINT_PAGES * PAGE > ram_top.min(1 << 32) {
        return fail(detail, "too little RAM for the hinted pages");
    }
    let set_up = || -> Result<Queue, &'static str> {
        let features = virtio::negotiate(dev, clock, F_FREE_PAGE_HINT)?;
        if features & F_FREE_PAGE_HINT == 0 {
            return Err("the device does not offer free page hinting");
        }
        // Inflate and deflate first; the hinting queue is the third without
        // statistics.
        virtio::setup_queue(dev, clock, INFLATE, features)?;
        virtio::setup_queue(dev, clock, DEFLATE, features)?;
        let hinting = virtio::setup_queue(dev, clock, 2, features)?;
        virtio::driver_ok(dev)?;
        Ok(hinting)
    };
    let mut queue = match set_up() {
        Ok(q) => q,
        Err(e) => return fail(detail, e),
    };
    Serial.str("balloon-hint: waiting for a run\n");
    let Some(run) = wait_cmd(dev, clock, HINT_WAIT_MS, |c| c > HINT_DONE) else {
        return fail(detail, "the host started no hinting run");
    };
    for p in 0..HINT_PAGES {
        mark(POOL_START + p * PAGE);
    }
    let mut hinted = || -> Result<(), &'static str> {
        send_cmd(&mut queue, run)?;
        for p in 0..HINT_PAGES {
            queue.desc(0, POOL_START + p * PAGE, PAGE as u32, WRITE, 0);
            queue.push_avail(0);
            queue.notify();
            queue.wait_used(2000)?;
        }
        send_cmd(&mut queue, HINT_STOP)
    };
    if let Err(e) = hinted() {
        detail.str("hinting: ");
        return fail(detail, e);
    }
    if wait_cmd(dev, clock, HINT_WAIT_MS, |c| c == HINT_DONE).is_none() {
        return fail(detail, "no done after the stop");
    }
    let zeroed = (0..HINT_PAGES)
        .filter(|p| zeroed(POOL_START + p * PAGE, 0, PAGE))
        .count() as u64;
    detail
        .str("run=")
        .dec(u64::from(run))
        .str(" pages=")
        .dec(HINT_PAGES)
        .str(" zeroed=")
        .dec(zeroed);
    if zeroed != HINT_PAGES {
        return Err(());
    }
    Ok(())
}
