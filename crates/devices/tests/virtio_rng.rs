//! virtio-rng driven from the driver's side of a split queue.

mod common;

use common::{memory, Driver, F_WRITE};
use vigil_devices::virtio::rng::Rng;
use vigil_devices::virtio::{QueueOutcome, VirtioDevice};
use vigil_model::config::RateLimit;

const QSIZE: u16 = 16;
const MARK: u8 = 0x5c;

/// True when `bytes` no longer hold only the marker (2^-8n chance of a false no).
fn filled(bytes: &[u8]) -> bool {
    bytes.len() < 8 || bytes.iter().any(|&b| b != MARK)
}

#[test]
fn fills_exactly_the_writable_bytes() {
    let mem = memory(1 << 20);
    let mut d = Driver::new(&mem, QSIZE);
    let mut q = d.queue();
    let mut dev = Rng::new(RateLimit::default());
    d.write(0x10000, &[MARK; 0x4000]);
    // Readable descriptors are skipped, writable ones filled in order.
    let head = d.add(&[
        (0x10000, 100, F_WRITE),
        (0x11000, 64, 0),
        (0x12000, 200, F_WRITE),
        (0x13000, 0, F_WRITE),
    ]);
    assert_eq!(
        dev.process_queue(0, &mut q, &mem),
        Ok(QueueOutcome::Done(true))
    );
    assert_eq!(d.used(0), (u32::from(head), 300));
    assert!(filled(&d.read(0x10000, 100)));
    assert!(filled(&d.read(0x12000, 200)));
    assert_eq!(d.read(0x10000 + 100, 16), [MARK; 16]);
    assert_eq!(d.read(0x11000, 64), [MARK; 64]);
    assert_eq!(d.read(0x12000 + 200, 16), [MARK; 16]);
    assert_eq!(dev.bytes_served(), 300);
}

#[test]
fn a_request_is_capped_at_64k() {
    let mem = memory(1 << 20);
    let mut d = Driver::new(&mem, QSIZE);
    let mut q = d.queue();
    let mut dev = Rng::new(RateLimit::default());
    d.write(0x10000, &[MARK; 0x20000]);
    d.add(&[(0x10000, 0x8000, F_WRITE), (0x18000, 0x18000, F_WRITE)]);
    dev.process_queue(0, &mut q, &mem).unwrap();
    assert_eq!(d.used(0), (0, 0x10000));
    assert!(filled(&d.read(0x10000, 0x10000)));
    assert!(filled(&d.read(0x1f000, 0x1000)));
    assert_eq!(d.read(0x20000, 0x10000), vec![MARK; 0x10000]);
    assert_eq!(dev.bytes_served(), 0x10000);
}

#[test]
fn unusable_chains_get_nothing() {
    let mem = memory(1 << 20);
    let mut d = Driver::new(&mem, QSIZE);
    let mut q = d.queue();
    let mut dev = Rng::new(RateLimit::default());
    d.write(0x10000, &[MARK; 0x100]);
    let chains: &[&[(u64, u32, u16)]] = &[
        &[(0x10000, 0x100, 0)],                                  // read-only
        &[(1 << 20, 16, F_WRITE)],                               // outside memory
        &[(0x10000, 16, F_WRITE), ((1 << 20) - 8, 16, F_WRITE)], // runs past its end
        &[(u64::MAX, u32::MAX, F_WRITE)],
    ];
    for (i, chain) in chains.iter().enumerate() {
        d.add(chain);
        dev.process_queue(0, &mut q, &mem).unwrap();
        assert_eq!(d.used(i as u16).1, 0, "{chain:x?}");
    }
    assert_eq!(d.read(0x10000, 0x100), [MARK; 0x100]);
    assert_eq!(dev.bytes_served(), 0);
    // Still serves a good request.
    d.add(&[(0x10000, 32, F_WRITE)]);
    dev.process_queue(0, &mut q, &mem).unwrap();
    assert_eq!(d.used(chains.len() as u16).1, 32);
}

#[test]
fn avail_index_beyond_the_queue_size_breaks_the_device() {
    let mem = memory(1 << 20);
    let mut d = Driver::new(&mem, QSIZE);
    let mut q = d.queue();
    let mut dev = Rng::new(RateLimit::default());
    d.set_avail_idx(u16::MAX);
    assert!(dev.process_queue(0, &mut q, &mem).is_err());
    assert_eq!(d.used_idx(), 0);
}

#[test]
fn requests_served_before_a_broken_one_go_back_to_the_driver() {
    let mem = memory(1 << 20);
    let mut d = Driver::new(&mem, QSIZE);
    let mut q = d.queue();
    let mut dev = Rng::new(RateLimit::default());
    let first = d.add(&[(0x10000, 32, F_WRITE)]);
    let second = d.add(&[(0x11000, 16, F_WRITE)]);
    // A head past the queue: the device breaks on it, after giving back what
    // it served in the same pass (used entries are published in batches).
    d.publish(QSIZE);
    let err = dev.process_queue(0, &mut q, &mem).unwrap_err();
    assert!(err.0.contains(&format!("chain {QSIZE}")), "{err:?}");
    assert_eq!(d.used_idx(), 2);
    assert_eq!(d.used(0), (u32::from(first), 32));
    assert_eq!(d.used(1), (u32::from(second), 16));
    assert_eq!(dev.bytes_served(), 48);
}
