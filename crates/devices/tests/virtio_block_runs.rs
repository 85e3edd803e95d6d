//! virtio-blk moves contiguous reads or writes taken in one pass together (a
//! run: one system call, or one io_uring entry on the asynchronous engine):
//! each still completes with its own status and used length, on the
//! synchronous engine in effect in the order the driver made them available,
//! and a run cut short gives each request what it alone got.

mod common;

use std::sync::Arc;

use common::{memory, wait_used, Driver, TempImage, F_WRITE};
use vigil_devices::virtio::block::{Block, S_IOERR, S_OK};
use vigil_devices::virtio::VirtioDevice;
use vigil_devices::GuestMemoryMmap;
use vigil_metrics::{DeviceCounters, DeviceKind};
use vigil_model::config::{DriveConfig, IoEngine};
use virtio_queue::Queue;
use vm_memory::bitmap::Bitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

const QSIZE: u16 = 128;
/// Per request `i`: a 16-byte header at `HDRS + 16 * i`, its status byte at
/// `STATUS + i`, its data at `DATA + 64 KiB * i`.
const HDRS: u64 = 0x1_0000;
const STATUS: u64 = 0x1_1000;
const DATA: u64 = 0x10_0000;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;

fn block(image: &TempImage, io_engine: IoEngine) -> (Block, Arc<DeviceCounters>) {
    let counters = Arc::new(DeviceCounters::new(DeviceKind::Block, "runs"));
    let dev = Block::new(&DriveConfig {
        path: image.0.clone(),
        id: "runs".into(),
        io_engine,
        ..Default::default()
    })
    .unwrap()
    .with_counters(counters.clone());
    (dev, counters)
}

/// Makes request `i` available: `kind` at `sector` over `len` bytes of data
/// (none for a flush).
fn add(d: &mut Driver, i: u64, kind: u32, sector: u64, len: u32) {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&kind.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    d.write(HDRS + 16 * i, &h);
    d.write(STATUS + i, &[0xee]);
    let data = DATA + 0x1_0000 * i;
    let mut descs = vec![(HDRS + 16 * i, 16, 0)];
    match kind {
        T_IN => descs.push((data, len, F_WRITE)),
        T_OUT => descs.push((data, len, 0)),
        _ => {}
    }
    descs.push((STATUS + i, 1, F_WRITE));
    d.add(&descs);
}

/// Serves what is available until `n` chains are used: one pass on the
/// synchronous engine (which gives every request back in it); on the
/// asynchronous one, then its completions as the eventfd signals them.
fn serve(dev: &mut Block, d: &Driver, q: &mut Queue, mem: &GuestMemoryMmap, n: u16) {
    dev.process_queue(0, q, mem).expect("device broken");
    let Some(&(fd, _)) = dev.watched_fds().first() else {
        assert_eq!(d.used_idx(), n, "every request went back in the pass");
        return;
    };
    wait_used(dev, fd, d, q, mem, n);
}

/// The status byte of request `i`.
fn status(d: &Driver, i: u64) -> u8 {
    d.read(STATUS + i, 1)[0]
}

#[test]
fn contiguous_requests_go_together_and_take_effect_in_order() {
    let image = TempImage::new(&vec![0; 256 * 1024]);
    let mem = memory(8 << 20);
    let (mut dev, counters) = block(&image, IoEngine::Sync);
    let mut d = Driver::new(&mem, QSIZE);
    let mut q = d.queue();
    // Four contiguous writes (one run), a read of all four (a run of its own,
    // after them), a write elsewhere, a flush, and a read of that write.
    for i in 0..4 {
        d.write(DATA + 0x1_0000 * i, &[i as u8 + 1; 4096]);
        add(&mut d, i, T_OUT, 8 * i, 4096);
    }
    add(&mut d, 4, T_IN, 0, 4 * 4096);
    d.write(DATA + 0x1_0000 * 5, &[5; 4096]);
    add(&mut d, 5, T_OUT, 64, 4096);
    add(&mut d, 6, T_FLUSH, 0, 0);
    add(&mut d, 7, T_IN, 64, 4096);

    dev.process_queue(0, &mut q, &mem).expect("device broken");

    assert_eq!(d.used_idx(), 8, "every request went back in the pass");
    let mut used: Vec<(u32, u32)> = (0..8).map(|i| d.used(i)).collect();
    let flush = used.iter().position(|&(head, _)| head == 18).unwrap();
    assert!(
        used[..flush].iter().filter(|&&(_, len)| len == 1).count() == 5,
        "the flush went back after the five writes before it: {used:?}"
    );
    used.sort();
    assert_eq!(
        used,
        [
            (0, 1),
            (3, 1),
            (6, 1),
            (9, 1),
            (12, 4 * 4096 + 1),
            (15, 1),
            (18, 1),
            (20, 4097)
        ],
        "heads and used lengths"
    );
    assert!((0..8).all(|i| status(&d, i) == S_OK));
    let read: Vec<u8> = (1..=4).flat_map(|b| [b; 4096]).collect();
    assert_eq!(
        d.read(DATA + 0x1_0000 * 4, 4 * 4096),
        read,
        "the read after the writes saw them"
    );
    assert_eq!(d.read(DATA + 0x1_0000 * 7, 4096), [5; 4096]);
    let bytes = image.bytes();
    assert_eq!(bytes[..4 * 4096], read[..]);
    assert_eq!(bytes[64 * 512..64 * 512 + 4096], [5; 4096]);
    let snapshot = counters.snapshot();
    assert_eq!(snapshot.merged, 3, "the three writes after the first");
    assert_eq!(
        (snapshot.ops_in, snapshot.ops_out, snapshot.errors),
        (2, 5, 0)
    );
}

/// 40 contiguous writes available at once: a run holds 16 at most; on the
/// synchronous engine it also ends once it holds as many as still wait after
/// it (runs of 16, 12, 6, 3, 2 and 1), on the asynchronous one it does not
/// (16, 16 and 8).
fn forty_writes_go_in_runs(engine: IoEngine, merged: u64) {
    let image = TempImage::new(&vec![0; 256 * 1024]);
    let mem = memory(8 << 20);
    let (mut dev, counters) = block(&image, engine);
    let mut d = Driver::new(&mem, QSIZE);
    let mut q = d.queue();
    for i in 0..40 {
        d.write(DATA + 0x1_0000 * i, &[i as u8; 4096]);
        add(&mut d, i, T_OUT, 8 * i, 4096);
    }
    serve(&mut dev, &d, &mut q, &mem, 40);
    assert!((0..40).all(|i| status(&d, i) == S_OK));
    let bytes = image.bytes();
    for i in 0..40 {
        assert_eq!(
            bytes[i * 4096..(i + 1) * 4096],
            [i as u8; 4096],
            "block {i}"
        );
    }
    assert_eq!(counters.snapshot().merged, merged);
}

#[test]
fn forty_writes_go_in_runs_sync() {
    forty_writes_go_in_runs(IoEngine::Sync, 40 - 6);
}

#[test]
fn forty_writes_go_in_runs_async() {
    forty_writes_go_in_runs(IoEngine::Async, 40 - 3);
}

fn a_run_cut_short_gives_each_request_its_own_status(engine: IoEngine) {
    let pattern: Vec<u8> = (0..64 * 1024).map(|i| (i * 7 + i / 4096) as u8).collect();
    let image = TempImage::new(&pattern);
    let mem = memory(8 << 20);
    let (mut dev, counters) = block(&image, engine);
    // The image shrinks under the device (its capacity stays 64 KiB): the
    // first run of reads gets 4 KiB, any after it nothing.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&image.0)
        .unwrap()
        .set_len(4096)
        .unwrap();
    let mut d = Driver::new(&mem, QSIZE);
    let mut q = d.queue();
    for i in 0..4 {
        add(&mut d, i, T_IN, 8 * i, 4096);
    }
    serve(&mut dev, &d, &mut q, &mem, 4);
    assert_eq!(
        (0..4).map(|i| status(&d, i)).collect::<Vec<_>>(),
        [S_OK, S_IOERR, S_IOERR, S_IOERR]
    );
    assert_eq!(d.read(DATA, 4096), pattern[..4096]);
    let snapshot = counters.snapshot();
    assert_eq!((snapshot.merged, snapshot.errors), (0, 3));
}

#[test]
fn a_run_cut_short_gives_each_request_its_own_status_sync() {
    a_run_cut_short_gives_each_request_its_own_status(IoEngine::Sync);
}

#[test]
fn a_run_cut_short_gives_each_request_its_own_status_async() {
    a_run_cut_short_gives_each_request_its_own_status(IoEngine::Async);
}

/// On the asynchronous engine: a run of writes and one of reads each go as
/// one entry; the flush between them still completes after the writes.
#[test]
fn runs_go_as_one_entry_each_on_the_async_engine() {
    let image = TempImage::new(&vec![9; 256 * 1024]);
    let mem = memory(8 << 20);
    let (mut dev, counters) = block(&image, IoEngine::Async);
    let mut d = Driver::new(&mem, QSIZE);
    let mut q = d.queue();
    for i in 0..4 {
        d.write(DATA + 0x1_0000 * i, &[i as u8 + 1; 4096]);
        add(&mut d, i, T_OUT, 8 * i, 4096);
    }
    add(&mut d, 4, T_FLUSH, 0, 0);
    // Reads of what the writes do not touch (requests in flight together
    // have no order on this engine).
    for i in 5..9 {
        add(&mut d, i, T_IN, 256 + 8 * i, 4096);
    }
    serve(&mut dev, &d, &mut q, &mem, 9);
    assert!((0..9).all(|i| status(&d, i) == S_OK));
    let flush = (0..9).position(|i| d.used(i).0 == 12).unwrap();
    let writes_before = (0..flush as u16).filter(|&i| d.used(i).0 < 12).count();
    assert_eq!(writes_before, 4, "the flush completed after the writes");
    for i in 5..9 {
        assert_eq!(d.read(DATA + 0x1_0000 * i, 4096), [9; 4096]);
    }
    let bytes = image.bytes();
    for i in 0..4 {
        assert_eq!(bytes[i * 4096..(i + 1) * 4096], [i as u8 + 1; 4096]);
    }
    assert_eq!(
        counters.snapshot().merged,
        6,
        "3 writes and 3 reads after the first"
    );
}

/// Which of the `len` bytes at `offset` of the file at `path` are in the host's
/// page cache, a flag per 4 KiB page (`mincore` on a mapping that touches none).
fn cached_pages(path: &std::path::Path, offset: usize, len: usize) -> Vec<bool> {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path).unwrap();
    let size = file.metadata().unwrap().len() as usize;
    // SAFETY: a fresh read-only mapping of the whole file, only passed to
    // mincore (never read) and unmapped here.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    assert_ne!(map, libc::MAP_FAILED);
    let mut flags = vec![0u8; len / 4096];
    // SAFETY: the range lies in the mapping; `flags` has a byte per page of it.
    let r = unsafe { libc::mincore(map.add(offset), len, flags.as_mut_ptr()) };
    // SAFETY: the mapping made above, used no more.
    unsafe { libc::munmap(map, size) };
    assert_eq!(r, 0, "mincore: {}", std::io::Error::last_os_error());
    flags.iter().map(|f| f & 1 != 0).collect()
}

/// A sparse image: reads that lie in a hole get zeroes in their buffers (what
/// was there before is gone, the pages are dirty) without the image being
/// read, so the host caches none of those pages; reads with data in them read it.
fn reads_in_a_hole_get_zeroes_without_the_page_cache(engine: IoEngine, merged: u64) {
    const MIB: u64 = 1 << 20;
    let image = TempImage::new(&[]);
    {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&image.0)
            .unwrap();
        file.set_len(8 * MIB).unwrap();
        file.write_all_at(&[0x11; 4096], 6 * MIB + 8192).unwrap();
    }
    let mem = memory(8 << 20);
    let (mut dev, counters) = block(&image, engine);
    let mut d = Driver::new(&mem, QSIZE);
    let mut q = d.queue();
    for i in 0..6 {
        d.write(DATA + 0x1_0000 * i, &[0xee; 0x1_0000]);
    }
    // One read alone at 0, a run of four from 2 MiB (each 64 KiB), one read
    // over the data at 6 MiB.
    add(&mut d, 0, T_IN, 0, 0x1_0000);
    for i in 1..5 {
        add(
            &mut d,
            i,
            T_IN,
            (2 * MIB + (i - 1) * 0x1_0000) / 512,
            0x1_0000,
        );
    }
    add(&mut d, 5, T_IN, 6 * MIB / 512, 0x1_0000);
    serve(&mut dev, &d, &mut q, &mem, 6);

    assert_eq!((0..6).map(|i| status(&d, i)).collect::<Vec<_>>(), [S_OK; 6]);
    let mut used: Vec<(u32, u32)> = (0..6).map(|i| d.used(i)).collect();
    used.sort();
    assert!(used.iter().all(|&(_, len)| len == 0x1_0000 + 1), "{used:?}");
    for i in 0..5 {
        assert!(
            d.read(DATA + 0x1_0000 * i, 0x1_0000)
                .iter()
                .all(|&b| b == 0),
            "request {i} read zeroes"
        );
    }
    let data = d.read(DATA + 0x1_0000 * 5, 0x1_0000);
    assert!(data[..8192].iter().all(|&b| b == 0));
    assert!(data[8192..12288].iter().all(|&b| b == 0x11));
    assert!(data[12288..].iter().all(|&b| b == 0));
    let region = mem.find_region(GuestAddress(DATA)).unwrap();
    let dirty = |i: u64| region.bitmap().dirty_at((DATA + 0x1_0000 * i) as usize);
    assert!((0..6).all(dirty), "every buffer read into is dirty");
    assert!(
        !cached_pages(&image.0, 0, 0x1_0000).contains(&true)
            && !cached_pages(&image.0, 2 * MIB as usize, 0x4_0000).contains(&true),
        "the holes were not read into the host's page cache"
    );
    let snapshot = counters.snapshot();
    assert_eq!(snapshot.merged, merged, "the run still went together");
    assert_eq!(snapshot.hole_reads, 5, "the reads but the one with data");
}

#[test]
fn reads_in_a_hole_get_zeroes_without_the_page_cache_sync() {
    reads_in_a_hole_get_zeroes_without_the_page_cache(IoEngine::Sync, 2);
}

#[test]
fn reads_in_a_hole_get_zeroes_without_the_page_cache_async() {
    reads_in_a_hole_get_zeroes_without_the_page_cache(IoEngine::Async, 3);
}
