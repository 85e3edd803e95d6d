//! virtio-blk with several request queues (`VIRTIO_BLK_F_MQ`), through the
//! virtio-mmio transport, on both engines: `num_queues` in the config space,
//! each queue's requests completed on its own used ring, a driver without
//! F_MQ served on queue 0 only, one rate limiter across the queues, and every
//! queue saved and restored.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{bring_up_queues, memory, read32, write32, Driver, TempImage, F_WRITE};
use vigil_devices::bus::BusDevice;
use vigil_devices::virtio::block::{Block, BlockState, S_OK};
use vigil_devices::virtio::mmio::{MmioTransport, MmioTransportState};
use vigil_devices::virtio::persist::{DeviceState, VirtioDeviceState};
use vigil_devices::virtio::{Interrupt, VirtioDevice, VIRTIO_F_VERSION_1};
use vigil_devices::GuestMemoryMmap;
use vigil_model::config::{DriveConfig, IoEngine, RateLimit};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

const F_MQ: u64 = 1 << 12;
const QSIZE: u16 = 16;
const QUEUES: u16 = 4;
/// Queue `q`'s rings at `RINGS * (q + 1)`; request `i` of queue `q`: header at
/// `HDRS + 0x100 * q + 16 * i`, status at `STATUS + 0x100 * q + i`, 4 KiB of
/// data at `DATA + 0x10000 * q + 0x1000 * i`.
const RINGS: u64 = 0x1_0000;
const HDRS: u64 = 0x8_0000;
const STATUS: u64 = 0x9_0000;
const DATA: u64 = 0x10_0000;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;

fn block(image: &TempImage, engine: IoEngine, limit: RateLimit) -> Block {
    Block::new(&DriveConfig {
        path: image.0.clone(),
        id: "mq".into(),
        io_engine: engine,
        rate_limit: limit,
        num_queues: QUEUES,
        ..Default::default()
    })
    .expect("the disk opens (and, for Async, io_uring on this host)")
}

fn drivers(mem: &GuestMemoryMmap) -> Vec<Driver<'_>> {
    (0..u64::from(QUEUES))
        .map(|q| Driver::at(mem, RINGS * (q + 1), QSIZE))
        .collect()
}

fn data(q: u64, i: u64) -> u64 {
    DATA + 0x10000 * q + 0x1000 * i
}

fn status(q: u64, i: u64) -> u64 {
    STATUS + 0x100 * q + i
}

/// Makes request `i` of queue `q` available: `kind` at `sector`, 4 KiB of data
/// (none for a flush).
fn add(d: &mut Driver, q: u64, i: u64, kind: u32, sector: u64) -> u16 {
    let hdr = HDRS + 0x100 * q + 16 * i;
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&kind.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    d.write(hdr, &h);
    d.write(status(q, i), &[0xee]);
    let mut descs = vec![(hdr, 16, 0)];
    match kind {
        T_IN => descs.push((data(q, i), 4096, F_WRITE)),
        T_OUT => descs.push((data(q, i), 4096, 0)),
        _ => {}
    }
    descs.push((status(q, i), 1, F_WRITE));
    d.add(&descs)
}

/// Serves queue `q` after a notification and, on the asynchronous engine,
/// completions until `driver` has `n` used entries.
fn serve(t: &mut MmioTransport, driver: &Driver, q: usize, n: u16) {
    t.process_queue(q);
    let deadline = Instant::now() + Duration::from_secs(10);
    while driver.used_idx() < n {
        assert!(
            Instant::now() < deadline,
            "queue {q}: {} of {n} used",
            driver.used_idx()
        );
        for (fd, _) in t.watched_fds() {
            t.process_fd(fd, EventSet::IN);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A transport around a disk of [`QUEUES`] queues, each set up from `d`, with
/// `features` accepted.
fn running(
    mem: &GuestMemoryMmap,
    d: &[Driver],
    dev: Block,
    features: u64,
) -> (MmioTransport, Arc<Interrupt>) {
    let (mut t, irq, _) = common::transport(Box::new(dev), mem);
    bring_up_queues(&mut t, features, &d.iter().collect::<Vec<_>>(), QSIZE);
    (t, irq)
}

#[test]
fn num_queues_is_in_the_config_space_and_f_mq_offered_only_above_one() {
    let image = TempImage::new(&[0; 4096]);
    let dev = block(&image, IoEngine::Sync, RateLimit::default());
    assert_eq!(dev.queue_max_sizes(), [256; QUEUES as usize]);
    assert_ne!(dev.features() & F_MQ, 0);
    let mut num_queues = [0u8; 2];
    dev.read_config(34, &mut num_queues);
    assert_eq!(u16::from_le_bytes(num_queues), QUEUES);
    // A read across the field, and one past the config space, stay in bounds.
    let mut wide = [0xffu8; 8];
    dev.read_config(33, &mut wide);
    assert_eq!(wide[1..3], QUEUES.to_le_bytes());
    dev.read_config(u64::MAX, &mut wide);

    let single = Block::new(&DriveConfig {
        path: image.0.clone(),
        id: "one".into(),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(single.queue_max_sizes(), [256]);
    assert_eq!(single.features() & F_MQ, 0, "one queue: no F_MQ");

    // The transport shows the queues, and nothing past them.
    let mem = memory(4 << 20);
    let (mut t, _, _) = common::transport(Box::new(dev), &mem);
    write32(&mut t, 0x30, u32::from(QUEUES) - 1);
    assert_eq!(read32(&mut t, 0x34), 256);
    write32(&mut t, 0x30, u32::from(QUEUES));
    assert_eq!(read32(&mut t, 0x34), 0);
    let mut config = [0u8; 2];
    t.read(0x100 + 34, &mut config);
    assert_eq!(u16::from_le_bytes(config), QUEUES);
}

/// Writes on queues 1 and 2, a flush on 3, reads back on 0 and 1: each
/// completes on its own used ring, and the data is what was written.
fn each_queue_completes_on_its_own_ring(engine: IoEngine) {
    let image = TempImage::new(&vec![0; 64 * 4096]);
    let mem = memory(4 << 20);
    let mut d = drivers(&mem);
    let dev = block(&image, engine, RateLimit::default());
    let (mut t, irq) = running(&mem, &d, dev, VIRTIO_F_VERSION_1 | F_MQ);
    for q in [1u64, 2] {
        for i in 0..3 {
            d[q as usize].write(data(q, i), &[(q * 16 + i) as u8; 4096]);
            add(&mut d[q as usize], q, i, T_OUT, 8 * (q * 3 + i));
        }
    }
    serve(&mut t, &d[1], 1, 3);
    serve(&mut t, &d[2], 2, 3);
    add(&mut d[3], 3, 0, T_FLUSH, 0);
    serve(&mut t, &d[3], 3, 1);
    assert_eq!(irq.status() & 1, 1, "a used-buffer interrupt");
    let used: Vec<u16> = d.iter().map(|d| d.used_idx()).collect();
    assert_eq!(used, [0, 3, 3, 1], "each request on its own queue's ring");
    for (q, n) in [(1u64, 3), (2, 3), (3, 1)] {
        for i in 0..n {
            let s = d[q as usize].read(status(q, i), 1);
            assert_eq!(s, [S_OK], "queue {q} request {i}");
        }
    }
    // Read back: queue 0 the blocks queue 1 wrote, queue 1 those of queue 2.
    for (reader, writer) in [(0u64, 1u64), (1, 2)] {
        let r = reader as usize;
        let before = d[r].used_idx();
        for i in 0..3 {
            add(&mut d[r], reader, 4 + i, T_IN, 8 * (writer * 3 + i));
        }
        serve(&mut t, &d[r], r, before + 3);
        for i in 0..3 {
            let back = d[r].read(data(reader, 4 + i), 4096);
            let want = (writer * 16 + i) as u8;
            assert!(back.iter().all(|&b| b == want), "block {writer}/{i}");
        }
    }
    assert!(image.bytes()[8 * 3 * 512..8 * 4 * 512]
        .iter()
        .all(|&b| b == 16));
}

#[test]
fn each_queue_completes_on_its_own_ring_sync() {
    each_queue_completes_on_its_own_ring(IoEngine::Sync);
}

#[test]
fn each_queue_completes_on_its_own_ring_async() {
    each_queue_completes_on_its_own_ring(IoEngine::Async);
}

#[test]
fn each_io_uring_completes_on_its_own_queue() {
    let image = TempImage::new(&[0; 4096]);
    let mut dev = block(&image, IoEngine::Async, RateLimit::default());
    let fds = dev.watched_fds();
    assert_eq!(fds.len(), usize::from(QUEUES), "one io_uring per queue");
    for (q, &(fd, _)) in fds.iter().enumerate() {
        assert_eq!(dev.fd_queue(fd), Some(q), "interrupts queue {q} only");
    }
    assert_eq!(dev.fd_queue(-1), None);
}

#[test]
fn without_f_mq_only_queue_0_is_served() {
    let image = TempImage::new(&vec![0; 16 * 4096]);
    let mem = memory(4 << 20);
    let mut d = drivers(&mem);
    let (mut t, _, _) = common::transport(
        Box::new(block(&image, IoEngine::Sync, RateLimit::default())),
        &mem,
    );
    // A hostile driver: F_MQ not accepted, yet queue 1 set up and notified.
    bring_up_queues(&mut t, VIRTIO_F_VERSION_1, &[&d[0], &d[1]], QSIZE);
    d[1].write(data(1, 0), &[0x5a; 4096]);
    add(&mut d[1], 1, 0, T_OUT, 0);
    assert_eq!(t.process_queue(1), None);
    assert_eq!(d[1].used_idx(), 0, "queue 1 is not served");
    assert_eq!(read32(&mut t, 0x70) & 0x40, 0, "the device is not broken");
    assert!(image.bytes().iter().all(|&b| b == 0), "nothing was written");
    // Notifications of queues that do not exist change nothing either.
    write32(&mut t, 0x50, u32::from(QUEUES) + 7);
    assert_eq!(t.process_queue(usize::from(QUEUES) + 7), None);
    d[0].write(data(0, 0), &[0x77; 4096]);
    add(&mut d[0], 0, 0, T_OUT, 0);
    serve(&mut t, &d[0], 0, 1);
    assert_eq!(d[0].read(status(0, 0), 1), [S_OK]);
    assert!(image.bytes()[..4096].iter().all(|&b| b == 0x77));
}

#[test]
fn one_rate_limiter_throttles_every_queue() {
    let image = TempImage::new(&vec![0; 16 * 4096]);
    let mem = memory(4 << 20);
    let mut d = drivers(&mem);
    let three_ops = RateLimit {
        ops: Some((1, Some(3))),
        ..Default::default()
    };
    let dev = block(&image, IoEngine::Sync, three_ops);
    let (mut t, _) = running(&mem, &d, dev, VIRTIO_F_VERSION_1 | F_MQ);
    for q in 0..u64::from(QUEUES) {
        add(&mut d[q as usize], q, 0, T_IN, q);
        add(&mut d[q as usize], q, 1, T_IN, q);
    }
    let waits = (0..usize::from(QUEUES))
        .filter(|&q| t.process_queue(q).is_some())
        .count();
    let served: u16 = d.iter().map(|d| d.used_idx()).sum();
    assert_eq!(served, 3, "three operations in all, whichever queue asked");
    assert_eq!(waits, 3, "every queue with a request left waits");
}

#[test]
fn every_queue_is_saved_and_restored_and_an_old_state_has_one() {
    let image = TempImage::new(&vec![0; 16 * 4096]);
    let mem = memory(4 << 20);
    let mut d = drivers(&mem);
    let dev = block(&image, IoEngine::Sync, RateLimit::default());
    let (mut t, _) = running(&mem, &d, dev, VIRTIO_F_VERSION_1 | F_MQ);
    d[2].write(data(2, 0), &[0x42; 4096]);
    add(&mut d[2], 2, 0, T_OUT, 8);
    serve(&mut t, &d[2], 2, 1);
    // Made available before the snapshot, served after it.
    add(&mut d[3], 3, 0, T_IN, 8);
    let json = serde_json::to_string(&t.state()).unwrap();
    let state: MmioTransportState = serde_json::from_str(&json).unwrap();
    drop(t);
    assert_eq!(state.queues.len(), usize::from(QUEUES));
    let q2 = &state.queues[2];
    assert_eq!((q2.next_avail, q2.next_used), (1, 1));
    let DeviceState::Block(blk) = &state.device else {
        panic!("{:?}", state.device)
    };
    assert_eq!(blk.num_queues, QUEUES);

    let device = state.restore_device().unwrap();
    let evts = (0..device.queue_max_sizes().len())
        .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
        .collect();
    let irq = Arc::new(Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()));
    let mut t = MmioTransport::restore(&state, device, mem.clone(), irq, evts).unwrap();
    serve(&mut t, &d[3], 3, 1);
    assert!(d[3].read(data(3, 0), 4096).iter().all(|&b| b == 0x42));

    // A state from before multi-queue has no num_queues: one queue.
    let mut json = serde_json::to_value(blk).unwrap();
    json.as_object_mut().unwrap().remove("num_queues");
    let old: BlockState = serde_json::from_value(json.clone()).unwrap();
    assert_eq!(old.num_queues, 1);
    let restored = VirtioDeviceState::restore(&old).unwrap();
    assert_eq!(restored.queue_max_sizes(), [256]);
    json["num_queues"] = 0.into();
    let zero: BlockState = serde_json::from_value(json).unwrap();
    let e = VirtioDeviceState::restore(&zero).err().unwrap();
    assert_eq!(e.field(), "num_queues", "{e}");
}
