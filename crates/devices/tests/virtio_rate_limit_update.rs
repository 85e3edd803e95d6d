//! A running virtio-blk device's rate limit changed from another thread: a
//! request waiting for tokens is served as soon as the device looks again.

mod common;

use std::time::Duration;

use common::{memory, Driver, TempImage, F_WRITE};
use vigil_devices::rate_limiter::{BucketUpdate, LimitUpdate, RateLimit};
use vigil_devices::virtio::block::{Block, S_OK};
use vigil_devices::virtio::{QueueOutcome, VirtioDevice};
use vigil_model::config::DriveConfig;

const HDR: u64 = 0x1000;
const DATA: u64 = 0x2000;
const STATUS: u64 = 0xf000;

#[test]
fn a_throttled_request_is_served_once_the_limit_is_lifted() {
    let mem = memory(1 << 20);
    let image = TempImage::new(&[0u8; 8192]);
    // 1 byte a second: the first 4 KiB read passes on the full bucket, the
    // second owes more than an hour.
    let mut dev = Block::new(&DriveConfig {
        path: image.0.clone(),
        id: "limited".into(),
        rate_limit: RateLimit {
            bandwidth: Some((1, Some(1))),
            ..Default::default()
        },
        ..Default::default()
    })
    .unwrap();
    let control = dev.rate_limit_control();
    let mut d = Driver::new(&mem, 16);
    let mut q = d.queue();
    let read = |d: &mut Driver| {
        d.write(HDR, &[0u8; 16]);
        d.write(STATUS, &[0xee]);
        d.add(&[(HDR, 16, 0), (DATA, 4096, F_WRITE), (STATUS, 1, F_WRITE)]);
    };
    read(&mut d);
    assert_eq!(
        dev.process_queue(0, &mut q, &mem),
        Ok(QueueOutcome::Done(true))
    );
    read(&mut d);
    match dev.process_queue(0, &mut q, &mem) {
        Ok(QueueOutcome::RetryAfter(wait, false)) => {
            assert!(wait > Duration::from_secs(3600), "{wait:?}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(d.used_idx(), 1, "the throttled read stays available");

    // Another thread lifts the limit; the device's next look serves the read.
    std::thread::spawn(move || {
        control.post(LimitUpdate {
            bandwidth: BucketUpdate::Remove,
            ..Default::default()
        })
    })
    .join()
    .unwrap();
    assert_eq!(
        dev.process_queue(0, &mut q, &mem),
        Ok(QueueOutcome::Done(true))
    );
    assert_eq!(d.used_idx(), 2);
    assert_eq!(d.read(STATUS, 1)[0], S_OK);
    assert_eq!(dev.state(), {
        let mut fresh = Block::new(&DriveConfig {
            path: image.0.clone(),
            id: "limited".into(),
            ..Default::default()
        })
        .unwrap();
        fresh.rate_limit_control();
        fresh.state()
    });
}
