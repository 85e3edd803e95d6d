//! virtio-balloon driven from the driver's side: what the fuzzer (virtio_balloon)
//! found, kept as regression tests.

mod common;

use std::time::Duration;

use common::{memory, Driver, F_WRITE};
use vigil_devices::virtio::balloon::Balloon;
use vigil_devices::virtio::{QueueOutcome, VirtioDevice};
use vigil_model::config::BalloonConfig;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const PAGE: u64 = 4096;
const QSIZE: u16 = 16;
/// Queue indices with statistics and free page reporting both on.
const STATS: usize = 2;
const REPORTING: usize = 3;

fn balloon() -> Balloon {
    Balloon::new(BalloonConfig {
        stats_interval: Some(Duration::from_secs(3600)),
        free_page_reporting: true,
        ..Default::default()
    })
}

fn fill(mem: &GuestMemoryMmap, page: u64) {
    mem.write_slice(&[0xa5; PAGE as usize], GuestAddress(page * PAGE))
        .unwrap();
}

/// How many bytes of `page` still hold the fill pattern.
fn kept(mem: &GuestMemoryMmap, page: u64) -> usize {
    let mut b = vec![0u8; PAGE as usize];
    mem.read_slice(&mut b, GuestAddress(page * PAGE)).unwrap();
    b.iter().filter(|&&x| x == 0xa5).count()
}

/// Found by fuzzing: a report that did not start on a page boundary was refused
/// whole (madvise wants an aligned start), and one that did but ended inside a page
/// gave back all of that page (madvise rounds the length up), data the guest never
/// reported free included. Now exactly the whole pages inside a range go.
#[test]
fn reports_give_back_exactly_the_whole_pages_they_cover() {
    let mem = memory(1 << 20);
    for page in 0x40..0x48 {
        fill(&mem, page);
    }
    let mut d = Driver::new(&mem, QSIZE);
    let mut q = d.queue();
    // 0x40800..0x42800 covers page 0x41 whole and halves of 0x40 and 0x42;
    // 0x44000..0x44001 covers no page whole; 0x46000..0x47000 is page 0x46.
    d.add(&[
        (0x40800, 0x2000, F_WRITE),
        (0x44000, 1, F_WRITE),
        (0x46000, 0x1000, F_WRITE),
    ]);
    let mut dev = balloon();
    assert_eq!(
        dev.process_queue(REPORTING, &mut q, &mem),
        Ok(QueueOutcome::Done(true))
    );
    let full = PAGE as usize;
    let kept: Vec<usize> = (0x40..0x48).map(|p| kept(&mem, p)).collect();
    assert_eq!(kept, [full, 0, full, full, full, full, 0, full]);
    // All three ranges are RAM: none is counted as bad.
    assert_eq!(dev.counters(), (0, 0, 0x2000 + 1 + 0x1000, 0));
}

/// Found by fuzzing: the statistics buffer the device held survived a device
/// reset, and was "returned" on the new queue, where the driver never posted it.
#[test]
fn a_reset_forgets_the_held_statistics_buffer() {
    let mem = memory(1 << 20);
    let mut dev = balloon();
    let mut d = Driver::new(&mem, QSIZE);
    let mut q = d.queue();
    // Two buffers: the device gives the first back and holds the second (head 1).
    d.add(&[(0x20000, 10, 0)]);
    d.add(&[(0x20000, 10, 0)]);
    let _ = dev.process_queue(STATS, &mut q, &mem);
    assert_eq!(d.used_idx(), 1);
    assert_eq!(d.used(0).0, 0);

    dev.reset();
    dev.write_config(4, &5u32.to_le_bytes());
    dev.reset();
    let mut cfg = [0u8; 8];
    dev.read_config(0, &mut cfg);
    assert_eq!(cfg[4..], [0; 4], "an empty balloon after a reset");

    // The driver starts over on a fresh queue: its first buffer is head 0.
    let mut d = Driver::new(&mem, QSIZE);
    let mut q = d.queue();
    d.add(&[(0x20000, 10, 0)]);
    let _ = dev.process_queue(STATS, &mut q, &mem);
    assert_eq!(
        d.used_idx(),
        0,
        "nothing given back: the new buffer is held"
    );
}

/// Found by fuzzing: an inflate chain whose descriptor loops back on itself (or is
/// simply huge) was read 4 bytes at a time, every page number given back on its own:
/// half a million of them held the device for seconds. A chain now carries at most
/// 4096 page numbers (Linux sends at most 256); the rest are counted as bad.
#[test]
fn an_inflate_chain_carries_at_most_4096_page_numbers() {
    let mem = memory(1 << 20);
    // 8 KiB of page numbers (all 0x40, a RAM page), read 16 times by the loop.
    let pfns: Vec<u8> = std::iter::repeat_n(0x40u32.to_le_bytes(), 2048)
        .flatten()
        .collect();
    mem.write_slice(&pfns, GuestAddress(0x20000)).unwrap();
    let mut d = Driver::new(&mem, QSIZE);
    let mut q = d.queue();
    d.write_desc(0, 0x20000, 0x2000, 1, 0);
    d.publish(0);
    let mut dev = balloon();
    let start = std::time::Instant::now();
    assert_eq!(
        dev.process_queue(0, &mut q, &mem),
        Ok(QueueOutcome::Done(true))
    );
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    let (inflated, _, _, bad) = dev.counters();
    assert_eq!((inflated, bad), (4096, 16 * 2048 - 4096));
}
