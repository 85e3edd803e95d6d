//! The counters a virtio device shares with the VMM: what blk and rng count for
//! the requests a driver makes.

mod common;

use std::sync::Arc;

use common::{memory, Driver, TempImage, F_WRITE};
use vigil_devices::virtio::block::Block;
use vigil_devices::virtio::rng::Rng;
use vigil_devices::virtio::{QueueOutcome, VirtioDevice};
use vigil_metrics::{DeviceCounters, DeviceKind};
use vigil_model::config::DriveConfig;
use vigil_model::config::RateLimit;

const HDR: u64 = 0x1000;
const DATA: u64 = 0x2000;
const STATUS: u64 = 0xf000;

fn blk_request(
    dev: &mut Block,
    d: &mut Driver,
    q: &mut virtio_queue::Queue,
    kind: u32,
    sector: u64,
    data: Option<(u32, bool)>,
) {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&kind.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    d.write(HDR, &h);
    let mut descs = vec![(HDR, 16, 0)];
    if let Some((len, writable)) = data {
        descs.push((DATA, len, if writable { F_WRITE } else { 0 }));
    }
    descs.push((STATUS, 1, F_WRITE));
    d.add(&descs);
    let _ = dev.process_queue(0, q, d.mem).unwrap();
}

#[test]
fn block_counts_bytes_ops_errors_and_throttles() {
    let mem = memory(1 << 20);
    let image = TempImage::new(&[0u8; 8 * 512]);
    let counters = Arc::new(DeviceCounters::new(DeviceKind::Block, "blk0"));
    let mut dev = Block::new(&DriveConfig {
        path: image.0.clone(),
        id: "m".into(),
        write_limit: RateLimit {
            ops: Some((1, Some(1))),
            ..Default::default()
        },
        ..Default::default()
    })
    .unwrap()
    .with_counters(counters.clone());
    let mut d = Driver::new(&mem, 16);
    let mut q = d.queue();
    blk_request(&mut dev, &mut d, &mut q, 0, 0, Some((1024, true))); // read 2 sectors
    blk_request(&mut dev, &mut d, &mut q, 0, 7, Some((1024, true))); // past the end: IOERR
    blk_request(&mut dev, &mut d, &mut q, 1, 1, Some((512, false))); // write 1 sector
    blk_request(&mut dev, &mut d, &mut q, 4, 0, None); // flush
    blk_request(&mut dev, &mut d, &mut q, 1, 2, Some((512, false))); // throttled
    let s = counters.snapshot();
    assert_eq!((s.bytes_in, s.ops_in), (1024, 2));
    assert_eq!((s.bytes_out, s.ops_out), (512, 1));
    assert_eq!(s.ops_other, 1);
    assert_eq!(s.errors, 1);
    assert_eq!(s.throttled, 1);
}

#[test]
fn rng_counts_bytes_handed_out() {
    let mem = memory(1 << 20);
    let counters = Arc::new(DeviceCounters::new(DeviceKind::Entropy, "rng0"));
    let mut dev = Rng::new(RateLimit::default()).with_counters(counters.clone());
    let mut d = Driver::new(&mem, 16);
    let mut q = d.queue();
    d.add(&[(DATA, 64, F_WRITE)]);
    d.add(&[(DATA, 32, F_WRITE), (DATA + 0x100, 32, F_WRITE)]);
    assert_eq!(
        dev.process_queue(0, &mut q, &mem).unwrap(),
        QueueOutcome::Done(true)
    );
    let s = counters.snapshot();
    assert_eq!((s.bytes_in, s.ops_in, s.errors), (128, 2, 0));
}
