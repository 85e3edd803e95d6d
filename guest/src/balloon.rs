//! The `balloon` scenario: a virtio-balloon driver that gives the host the pages it
//! asks for (inflate), holds them long enough for the host to see its resident
//! memory drop, takes them back (deflate) and checks they come back zeroed, i.e.
//! that the host really discarded them. Uses the polled driver of `virtio.rs` at
//! CPL3, queues inflate (0) and deflate (1), `VIRTIO_F_VERSION_1` only.

use crate::cpu::rdtsc;
use crate::serial::{Line, Out, Serial};
use crate::virtio::{self, dma, rd, wr, Clock, Dev, Queue, CONFIG, MQ_BUF, MQ_BUF_LEN};
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
    let ram_top = machine.info.ram_top();
    virtio::run_at_cpl3(machine, detail, |devices, clock, detail| {
        let Some(dev) = virtio::find(devices, clock, ID_BALLOON, |_| true) else {
            detail.str("no virtio-balloon device");
            virtio::list_devices(devices, detail);
            return Err(());
        };
        let result = run(dev, clock, ram_top, detail);
        let _ = dev.reset(clock);
        result
    })
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
