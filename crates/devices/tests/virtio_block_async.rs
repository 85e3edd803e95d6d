//! virtio-blk on the asynchronous engine (`io_engine` Async, io_uring), driven
//! from the driver's side of a split queue: requests stay in flight and come
//! back through the completion eventfd, in any order; a flush only after every
//! write before it; the rate limiter charges at submission; a snapshot's
//! quiesce completes everything in flight.

mod common;

use std::os::fd::{AsRawFd, RawFd};

use common::{memory, wait_used, Driver, TempImage, F_WRITE};
use vigil_devices::virtio::block::{Block, S_OK};
use vigil_devices::virtio::{QueueOutcome, VirtioDevice};
use vigil_devices::GuestMemoryMmap;
use vigil_model::config::{DriveConfig, IoEngine, RateLimit};
use virtio_queue::Queue;
use vmm_sys_util::epoll::EventSet;

const QSIZE: u16 = 64;
/// Per request: a 16-byte header at `HDRS + 16 * i`, a status byte at
/// `STATUS + i`, data at `DATA + 4096 * i`.
const HDRS: u64 = 0x1_0000;
const STATUS: u64 = 0x1_1000;
const DATA: u64 = 0x2_0000;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;

fn block(image: &TempImage, limit: RateLimit) -> Block {
    Block::new(&DriveConfig {
        path: image.0.clone(),
        id: "async".into(),
        io_engine: IoEngine::Async,
        rate_limit: limit,
        ..Default::default()
    })
    .expect("io_uring on this host")
}

/// Makes request `i` available: `kind` at `sector`, 4 KiB of data (none for a
/// flush). Returns its head.
fn add(d: &mut Driver, i: u64, kind: u32, sector: u64) -> u16 {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&kind.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    d.write(HDRS + 16 * i, &h);
    d.write(STATUS + i, &[0xee]);
    let mut descs = vec![(HDRS + 16 * i, 16, 0)];
    match kind {
        T_IN => descs.push((DATA + 4096 * i, 4096, F_WRITE)),
        T_OUT => descs.push((DATA + 4096 * i, 4096, 0)),
        _ => {}
    }
    descs.push((STATUS + i, 1, F_WRITE));
    d.add(&descs)
}

fn completion_fd(dev: &mut Block) -> RawFd {
    let fds = dev.watched_fds();
    assert_eq!(fds.len(), 1, "the completion eventfd is watched");
    fds[0].0
}

/// Waits on the completion eventfd and lets the device complete what is done,
/// until `n` chains are used; returns the used heads in order.
fn used_heads(
    dev: &mut Block,
    d: &Driver,
    q: &mut Queue,
    mem: &GuestMemoryMmap,
    n: u16,
) -> Vec<u32> {
    let fd = completion_fd(dev);
    wait_used(dev, fd, d, q, mem, n);
    (0..n).map(|i| d.used(i).0).collect()
}

#[test]
fn writes_then_a_flush_complete_through_the_eventfd_the_flush_last() {
    let image = TempImage::new(&vec![0; 64 * 4096]);
    let mem = memory(4 << 20);
    let mut dev = block(&image, RateLimit::default());
    let mut d = Driver::new(&mem, QSIZE);
    let mut q = d.queue();
    let mut heads = Vec::new();
    for i in 0..16 {
        d.write(DATA + 4096 * i, &[i as u8 + 1; 4096]);
        heads.push(add(&mut d, i, T_OUT, 8 * i));
    }
    let flush = add(&mut d, 16, T_FLUSH, 0);
    dev.process_queue(0, &mut q, &mem).expect("device broken");
    let used = used_heads(&mut dev, &d, &mut q, &mem, 17);
    assert_eq!(
        used[16],
        u32::from(flush),
        "the flush completes after every write before it: {used:?}"
    );
    for i in 0..17 {
        assert_eq!(d.read(STATUS + i, 1), [S_OK], "request {i}");
    }
    let bytes = image.bytes();
    for i in 0..16usize {
        assert!(
            bytes[i * 4096..(i + 1) * 4096]
                .iter()
                .all(|&b| b == i as u8 + 1),
            "write {i} reached the image"
        );
    }
    // Reads come back with the data, their used length counting it and the status.
    let first = add(&mut d, 17, T_IN, 8 * 3);
    dev.process_queue(0, &mut q, &mem).expect("device broken");
    used_heads(&mut dev, &d, &mut q, &mem, 18);
    assert_eq!(d.used(17), (u32::from(first), 4097));
    assert_eq!(d.read(DATA + 4096 * 17, 4096), vec![4; 4096]);
    assert_eq!(dev.counters(), (18, 0));
}

/// Whether the first page of `file` is in the page cache.
fn resident(file: &std::fs::File) -> bool {
    // SAFETY: a private read-only mapping of one page of an open file, unmapped
    // before returning; mincore writes one byte into `vec`.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        );
        assert_ne!(p, libc::MAP_FAILED);
        let mut vec = 0u8;
        libc::mincore(p, 4096, &mut vec);
        libc::munmap(p, 4096);
        vec & 1 != 0
    }
}

/// A read of a page the host must fetch from the disk completes after a read
/// submitted after it whose page is cached: the device gives chains back in the
/// order they complete.
#[test]
fn a_cold_read_completes_after_a_later_cached_one() {
    let image = TempImage::new(&vec![7; 64 * 4096]);
    let file = std::fs::File::open(&image.0).unwrap();
    file.sync_all().unwrap();
    // SAFETY: advice on our own open file.
    unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if resident(&file) {
        eprintln!("skipped: this filesystem keeps the image's pages cached (tmpfs?)");
        return;
    }
    // Sector 256 (page 32) cached; page 0 not.
    let mut page = [0u8; 4096];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut page, 32 * 4096).unwrap();
    let mem = memory(4 << 20);
    let mut dev = block(&image, RateLimit::default());
    let mut d = Driver::new(&mem, QSIZE);
    let mut q = d.queue();
    let cold = add(&mut d, 0, T_IN, 0);
    let cached = add(&mut d, 1, T_IN, 256);
    dev.process_queue(0, &mut q, &mem).expect("device broken");
    let used = used_heads(&mut dev, &d, &mut q, &mem, 2);
    assert_eq!(used, [u32::from(cached), u32::from(cold)]);
    assert_eq!(d.read(DATA, 4096), vec![7; 4096]);
    assert_eq!(d.read(DATA + 4096, 4096), vec![7; 4096]);
}

/// The rate limiter charges each request as it is submitted: with one
/// operation in the bucket, the second request waits, in flight or not.
#[test]
fn the_rate_limiter_charges_at_submission() {
    let image = TempImage::new(&vec![0; 16 * 4096]);
    let mem = memory(4 << 20);
    let one = RateLimit {
        ops: Some((1, Some(1))),
        ..Default::default()
    };
    let mut dev = block(&image, one);
    let mut d = Driver::new(&mem, QSIZE);
    let mut q = d.queue();
    add(&mut d, 0, T_IN, 0);
    add(&mut d, 1, T_IN, 8);
    match dev.process_queue(0, &mut q, &mem).expect("device broken") {
        QueueOutcome::RetryAfter(wait, _) => assert!(wait > std::time::Duration::ZERO),
        other => panic!("{other:?}: the second request should wait"),
    }
    used_heads(&mut dev, &d, &mut q, &mem, 1);
    assert_eq!(d.used_idx(), 1, "one request passed the limiter");
}

/// Before a snapshot captures the queue, quiesce completes what is in flight.
#[test]
fn quiesce_completes_everything_in_flight() {
    let image = TempImage::new(&vec![3; 64 * 4096]);
    let mem = memory(4 << 20);
    let mut dev = block(&image, RateLimit::default());
    let mut d = Driver::new(&mem, QSIZE);
    let mut q = d.queue();
    // 12 reads and 12 flushes: 60 descriptors of the 64.
    for i in 0..24 {
        add(&mut d, i, if i % 2 == 0 { T_IN } else { T_FLUSH }, 8 * i);
    }
    dev.process_queue(0, &mut q, &mem).expect("device broken");
    dev.quiesce(std::slice::from_mut(&mut q), &mem)
        .expect("device broken");
    assert_eq!(d.used_idx(), 24, "every request completed");
    assert_eq!(dev.counters(), (24, 0));
}

/// A device reset with requests in flight waits for nothing (the driver's status
/// write arrives on a vCPU thread, whose seccomp filter has no io_uring calls):
/// what was in flight completes unreported, and the reset device serves anew.
#[test]
fn a_reset_with_requests_in_flight_forgets_them() {
    let image = TempImage::new(&vec![5; 64 * 4096]);
    let mem = memory(4 << 20);
    let mut dev = block(&image, RateLimit::default());
    let mut d = Driver::new(&mem, QSIZE);
    let mut q = d.queue();
    for i in 0..8 {
        add(&mut d, i, T_FLUSH, 0);
    }
    dev.process_queue(0, &mut q, &mem).expect("device broken");
    let before = d.used_idx();
    dev.reset();
    // Whatever completes now is not given back to the old queue.
    std::thread::sleep(std::time::Duration::from_millis(200));
    let fd = completion_fd(&mut dev);
    dev.process_fd(fd, EventSet::IN, std::slice::from_mut(&mut q), &mem)
        .expect("device broken");
    assert_eq!(d.used_idx(), before, "nothing used after the reset");

    let mut d = Driver::new(&mem, QSIZE);
    let mut q = d.queue();
    let head = add(&mut d, 0, T_IN, 0);
    dev.process_queue(0, &mut q, &mem).expect("device broken");
    assert_eq!(used_heads(&mut dev, &d, &mut q, &mem, 1), [u32::from(head)]);
    assert_eq!(d.read(DATA, 4096), vec![5; 4096]);
}
