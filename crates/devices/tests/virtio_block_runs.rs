//! virtio-blk's synchronous engine moves contiguous reads or writes taken in one
//! pass by one system call (a run): each still completes with its own status and
//! used length, in effect in the order the driver made them available, and a
//! run cut short gives each request what it alone got.

mod common;

use std::sync::Arc;

use common::{memory, Driver, TempImage, F_WRITE};
use vigil_devices::virtio::block::{Block, S_IOERR, S_OK};
use vigil_devices::virtio::VirtioDevice;
use vigil_metrics::{DeviceCounters, DeviceKind};
use vigil_model::config::DriveConfig;

const QSIZE: u16 = 128;
/// Per request `i`: a 16-byte header at `HDRS + 16 * i`, its status byte at
/// `STATUS + i`, its data at `DATA + 64 KiB * i`.
const HDRS: u64 = 0x1_0000;
const STATUS: u64 = 0x1_1000;
const DATA: u64 = 0x10_0000;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;

fn block(image: &TempImage) -> (Block, Arc<DeviceCounters>) {
    let counters = Arc::new(DeviceCounters::new(DeviceKind::Block, "runs"));
    let dev = Block::new(&DriveConfig {
        path: image.0.clone(),
        id: "runs".into(),
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

/// The status byte of request `i`.
fn status(d: &Driver, i: u64) -> u8 {
    d.read(STATUS + i, 1)[0]
}

#[test]
fn contiguous_requests_go_together_and_take_effect_in_order() {
    let image = TempImage::new(&vec![0; 256 * 1024]);
    let mem = memory(8 << 20);
    let (mut dev, counters) = block(&image);
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

#[test]
fn a_run_holds_sixteen_requests_at_most() {
    let image = TempImage::new(&vec![0; 256 * 1024]);
    let mem = memory(8 << 20);
    let (mut dev, counters) = block(&image);
    let mut d = Driver::new(&mem, QSIZE);
    let mut q = d.queue();
    for i in 0..40 {
        d.write(DATA + 0x1_0000 * i, &[i as u8; 4096]);
        add(&mut d, i, T_OUT, 8 * i, 4096);
    }
    dev.process_queue(0, &mut q, &mem).expect("device broken");
    assert_eq!(d.used_idx(), 40);
    assert!((0..40).all(|i| status(&d, i) == S_OK));
    let bytes = image.bytes();
    for i in 0..40 {
        assert_eq!(
            bytes[i * 4096..(i + 1) * 4096],
            [i as u8; 4096],
            "block {i}"
        );
    }
    // Runs of 16, 16 and 8.
    assert_eq!(counters.snapshot().merged, 37);
}

#[test]
fn a_run_cut_short_gives_each_request_its_own_status() {
    let pattern: Vec<u8> = (0..64 * 1024).map(|i| (i * 7 + i / 4096) as u8).collect();
    let image = TempImage::new(&pattern);
    let mem = memory(8 << 20);
    let (mut dev, counters) = block(&image);
    // The image shrinks under the device (its capacity stays 64 KiB): the
    // run of four reads gets 8 KiB.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&image.0)
        .unwrap()
        .set_len(8 * 1024)
        .unwrap();
    let mut d = Driver::new(&mem, QSIZE);
    let mut q = d.queue();
    for i in 0..4 {
        add(&mut d, i, T_IN, 8 * i, 4096);
    }
    dev.process_queue(0, &mut q, &mem).expect("device broken");
    assert_eq!(d.used_idx(), 4);
    assert_eq!(
        (0..4).map(|i| status(&d, i)).collect::<Vec<_>>(),
        [S_OK, S_OK, S_IOERR, S_IOERR]
    );
    for i in 0..2u64 {
        let at = i as usize * 4096;
        assert_eq!(d.read(DATA + 0x1_0000 * i, 4096), pattern[at..at + 4096]);
    }
    let snapshot = counters.snapshot();
    assert_eq!((snapshot.merged, snapshot.errors), (0, 2));
}
