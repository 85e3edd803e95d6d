//! Descriptors of 2^31 bytes: the devices bound what they allocate (they copy in
//! 64 KiB chunks and cap entropy requests), whatever length a guest claims.
//!
//! A counting global allocator records the largest single allocation made by a
//! thread while it runs a device (see [`measured`]); guest
//! memory is a 2 GiB + 1 MiB anonymous mapping, which stays untouched (and so
//! costs no memory) except where the devices write.

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use common::{memory, Driver, TempImage, F_WRITE};
use vigil_devices::virtio::block::{Block, S_IOERR, S_OK};
use vigil_devices::virtio::rng::Rng;
use vigil_devices::virtio::VirtioDevice;
use vigil_model::config::DriveConfig;
use vigil_model::config::RateLimit;

struct Counting;

thread_local! {
    /// Largest allocation of this thread while measuring, or `None` when not.
    static LARGEST: Cell<Option<usize>> = const { Cell::new(None) };
}

fn record(size: usize) {
    let _ = LARGEST.try_with(|l| {
        if let Some(max) = l.get() {
            l.set(Some(max.max(size)));
        }
    });
}

/// Runs `f` and returns the largest single allocation it made.
fn measured(f: impl FnOnce()) -> usize {
    LARGEST.with(|l| l.set(Some(0)));
    f();
    LARGEST.with(|l| l.replace(None)).unwrap()
}

// SAFETY: forwards to the system allocator; only records sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        record(layout.size());
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new: usize) -> *mut u8 {
        record(new);
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const BIG: u32 = 1 << 31;
const HDR: u64 = 0x1000;
const STATUS: u64 = 0x2000;
const DATA: u64 = 0x10_0000;
/// Generous: the devices' own buffers are 64 KiB and allocated up front.
const LIMIT: usize = 1 << 20;

#[test]
fn two_gib_descriptors_do_not_allocate_two_gib() {
    let mem = memory((1 << 31) + (1 << 20));
    let image = TempImage::new(&[0x77; 8 * 512]);
    let mut blk = Block::new(&DriveConfig {
        path: image.0.clone(),
        read_only: false,
        id: "big".into(),
        rate_limit: RateLimit::default(),
        ..Default::default()
    })
    .unwrap();
    let mut rng = Rng::new(RateLimit::default());
    let mut largest = 0;

    let mut d = Driver::new(&mem, 16);
    let mut q = d.queue();
    let mut request = |d: &mut Driver, kind: u32, data_flags: u16| {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&kind.to_le_bytes());
        d.write(HDR, &h);
        d.write(STATUS, &[0xee]);
        let n = d.used_idx();
        d.add(&[(HDR, 16, 0), (DATA, BIG, data_flags), (STATUS, 1, F_WRITE)]);
        largest = largest.max(measured(|| {
            blk.process_queue(0, &mut q, &mem).unwrap();
        }));
        assert_eq!(d.used_idx(), n + 1);
        (d.read(STATUS, 1)[0], d.used(n).1)
    };
    // 2 GiB read or write on an 8-sector disk: refused before any copy.
    assert_eq!(request(&mut d, 0, F_WRITE), (S_IOERR, 1));
    assert_eq!(request(&mut d, 1, 0), (S_IOERR, 1));
    // GET_ID into a 2 GiB buffer writes 20 bytes.
    assert_eq!(request(&mut d, 8, F_WRITE), (S_OK, 21));
    // Two 2 GiB descriptors make a chain longer than 2^32: cut short, not summed.
    d.add(&[(HDR, 16, 0), (DATA, BIG, F_WRITE), (DATA, BIG, F_WRITE)]);
    largest = largest.max(measured(|| {
        blk.process_queue(0, &mut q, &mem).unwrap();
    }));
    assert_eq!(image.bytes(), [0x77; 8 * 512]);

    let mut d = Driver::new(&mem, 16);
    let mut q = d.queue();
    d.add(&[(DATA, BIG, F_WRITE)]);
    largest = largest.max(measured(|| {
        rng.process_queue(0, &mut q, &mem).unwrap();
    }));
    assert_eq!(d.used(0).1, 64 * 1024);
    assert!(largest < LIMIT, "largest allocation {largest} bytes");
}

#[test]
fn large_transfers_are_copied_in_chunks() {
    // 8 MiB each way through the image: allocations stay at the chunk size.
    const LEN: u32 = 8 << 20;
    let mem = memory(32 << 20);
    let image = TempImage::new(&[]);
    std::fs::File::options()
        .write(true)
        .open(&image.0)
        .unwrap()
        .set_len(u64::from(LEN))
        .unwrap();
    let mut blk = Block::new(&DriveConfig {
        path: image.0.clone(),
        read_only: false,
        id: String::new(),
        rate_limit: RateLimit::default(),
        ..Default::default()
    })
    .unwrap();
    let mut d = Driver::new(&mem, 16);
    let mut q = d.queue();
    let pattern: Vec<u8> = (0..LEN).map(|i| (i % 251) as u8).collect();
    d.write(DATA, &pattern);
    let mut h = [0u8; 16];
    h[0] = 1; // OUT
    d.write(HDR, &h);
    d.add(&[(HDR, 16, 0), (DATA, LEN, 0), (STATUS, 1, F_WRITE)]);
    h[0] = 0; // IN, to the next 8 MiB
    d.write(HDR + 16, &h);
    d.add(&[
        (HDR + 16, 16, 0),
        (DATA + u64::from(LEN), LEN, F_WRITE),
        (STATUS + 1, 1, F_WRITE),
    ]);
    let largest = measured(|| {
        blk.process_queue(0, &mut q, &mem).unwrap();
    });
    assert_eq!(d.used(0).1, 1);
    assert_eq!(d.used(1).1, LEN + 1);
    assert_eq!(d.read(STATUS, 2), [S_OK, S_OK]);
    assert!(d.read(DATA + u64::from(LEN), LEN as usize) == pattern);
    assert!(largest < LIMIT, "largest allocation {largest} bytes");
}
