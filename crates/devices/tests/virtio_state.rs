//! Saving and restoring virtio devices: each device is driven into a live state
//! (features negotiated, queues set up, requests served), saved, sent through
//! JSON, restored into a fresh transport and served again; corrupted states are
//! refused with the field at fault, and none makes restoring panic.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{memory, read32, write32, Driver, TempImage, F_WRITE};
use vigil_devices::bus::BusDevice;
use vigil_devices::persist::RestoreError;
use vigil_devices::rate_limiter::{RateLimit, RateLimitState, TokenBucketState};
use vigil_devices::virtio::balloon::{Balloon, BalloonStat};
use vigil_devices::virtio::block::{Block, BlockState, S_OK};
use vigil_devices::virtio::mmio::status::{
    ACKNOWLEDGE, DEVICE_NEEDS_RESET, DRIVER, DRIVER_OK, FAILED, FEATURES_OK,
};
use vigil_devices::virtio::mmio::{MmioTransport, MmioTransportState};
use vigil_devices::virtio::net::Net;
use vigil_devices::virtio::persist::{DeviceState, QueueState};
use vigil_devices::virtio::rng::{Rng, RngState};
use vigil_devices::virtio::vsock::{Vsock, VsockState};
use vigil_devices::virtio::{Interrupt, VirtioDevice, INT_USED_RING, VIRTIO_F_VERSION_1};
use vigil_devices::GuestMemoryMmap;
use vigil_model::config::{BalloonConfig, DriveConfig, NetConfig, VsockConfig};
use vmm_sys_util::eventfd::EventFd;

const QSIZE: u16 = 16;
const RUNNING: u32 = ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK;

/// A transport around `device` (as the builder makes one), its interrupt and
/// clones of its queue eventfds.
fn attach(
    device: Box<dyn VirtioDevice>,
    mem: &GuestMemoryMmap,
) -> (MmioTransport, Arc<Interrupt>, Vec<EventFd>) {
    common::transport(device, mem)
}

/// Fresh runtime resources for a device with `n` queues: the interrupt, a clone
/// of its eventfd, the queue eventfds and clones of them.
fn resources(n: usize) -> (Arc<Interrupt>, EventFd, Vec<EventFd>, Vec<EventFd>) {
    let line = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let line_clone = line.try_clone().unwrap();
    let evts: Vec<EventFd> = (0..n)
        .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
        .collect();
    let clones = evts.iter().map(|e| e.try_clone().unwrap()).collect();
    (Arc::new(Interrupt::new(line)), line_clone, evts, clones)
}

/// A restored transport and what the test watches of it.
struct Restored {
    t: MmioTransport,
    irq: Arc<Interrupt>,
    /// The interrupt line (raised: readable).
    line: EventFd,
    /// The queue notification eventfds.
    evts: Vec<EventFd>,
}

/// Restores from `state` as a VMM would: the device first (it says how many
/// queues to make eventfds for), then the transport.
fn restore(state: &MmioTransportState, mem: &GuestMemoryMmap) -> Result<Restored, RestoreError> {
    let device = state.restore_device()?;
    let (irq, line, evts, clones) = resources(device.queue_max_sizes().len());
    let t = MmioTransport::restore(state, device, mem.clone(), irq.clone(), evts)?;
    Ok(Restored {
        t,
        irq,
        line,
        evts: clones,
    })
}

/// The state of `t`, through JSON and back.
fn save(t: &MmioTransport) -> MmioTransportState {
    let state = t.state();
    let json = serde_json::to_string_pretty(&state).unwrap();
    let back: MmioTransportState = serde_json::from_str(&json).unwrap();
    assert_eq!(back, state, "{json}");
    back
}

/// The driver's initialisation with `features` acknowledged and one queue per
/// driver in `queues`.
fn bring_up(t: &mut MmioTransport, features: u64, queues: &[&Driver]) {
    common::bring_up_queues(t, features, queues, QSIZE);
}

/// Every eventfd in `evts` was signalled (and is drained).
fn all_signalled(evts: &[EventFd]) -> bool {
    evts.iter().all(|e| e.read().is_ok())
}

// ---------------------------------------------------------------- virtio-blk

const HDR: u64 = 0x10000;
const DATA: u64 = 0x11000;
const STATUS: u64 = 0x12000;
const SECTORS: usize = 16;

fn pattern() -> Vec<u8> {
    (0..SECTORS * 512)
        .map(|i| (i * 7 + i / 512) as u8)
        .collect()
}

fn block_config(image: &TempImage) -> DriveConfig {
    DriveConfig {
        path: image.0.clone(),
        read_only: false,
        id: "vigil-state-0".into(),
        rate_limit: RateLimit {
            bandwidth: Some((100 << 20, None)),
            ops: None,
            ..Default::default()
        },
        ..Default::default()
    }
}

/// One virtio-blk request on queue 0 of `t`; returns (status, used length).
fn blk_request(
    t: &mut MmioTransport,
    d: &mut Driver,
    kind: u32,
    sector: u64,
    len: u32,
    writable: bool,
) -> (u8, u32) {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&kind.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    d.write(HDR, &h);
    d.write(STATUS, &[0xee]);
    let head = d.add(&[
        (HDR, 16, 0),
        (DATA, len, if writable { F_WRITE } else { 0 }),
        (STATUS, 1, F_WRITE),
    ]);
    let before = d.used_idx();
    assert_eq!(t.process_queue(0), None);
    assert_eq!(d.used_idx(), before.wrapping_add(1));
    let (id, used) = d.used(before);
    assert_eq!(id, u32::from(head));
    (d.read(STATUS, 1)[0], used)
}

/// A virtio-blk transport with three requests served: a read of sector 2, a
/// write of 0xab to sector 5, and a read of sector 0.
fn live_block<'a>(mem: &'a GuestMemoryMmap, image: &TempImage) -> (MmioTransport, Driver<'a>) {
    let mut d = Driver::new(mem, QSIZE);
    let (mut t, _, _) = attach(Box::new(Block::new(&block_config(image)).unwrap()), mem);
    bring_up(&mut t, VIRTIO_F_VERSION_1, &[&d]);
    assert_eq!(blk_request(&mut t, &mut d, 0, 2, 512, true), (S_OK, 513));
    assert_eq!(d.read(DATA, 512), pattern()[1024..1536]);
    d.write(DATA, &[0xab; 512]);
    assert_eq!(blk_request(&mut t, &mut d, 1, 5, 512, false), (S_OK, 1));
    assert_eq!(blk_request(&mut t, &mut d, 0, 0, 512, true), (S_OK, 513));
    (t, d)
}

#[test]
fn block_serves_requests_after_restore() {
    let mem = memory(1 << 20);
    let image = TempImage::new(&pattern());
    let (mut t, mut d) = live_block(&mem, &image);
    write32(&mut t, 0x30, 0);
    let state = save(&t);
    assert_eq!(state.device_status, RUNNING);
    assert_eq!(state.acked_features, VIRTIO_F_VERSION_1);
    assert_eq!(state.queues.len(), 1);
    assert_eq!(
        (state.queues[0].next_avail, state.queues[0].next_used),
        (3, 3)
    );
    assert_eq!(state.queues[0].size, QSIZE);
    assert!(state.queues[0].ready);
    match &state.device {
        DeviceState::Block(b) => {
            assert_eq!(b.path, image.0);
            assert_eq!(b.capacity, SECTORS as u64);
            assert_eq!(b.id, "vigil-state-0");
            assert!(!b.read_only);
            assert_eq!(
                b.rate_limit.bandwidth,
                Some(TokenBucketState {
                    rate: 100 << 20,
                    burst: Some(100 << 20)
                })
            );
        }
        other => panic!("{other:?}"),
    }
    drop(t);

    let Restored {
        mut t,
        irq,
        line,
        evts,
    } = restore(&state, &mem).unwrap();
    assert!(all_signalled(&evts), "the restored queues are looked at");
    assert_eq!(t.state(), state, "restored exactly");
    assert_eq!(irq.status(), INT_USED_RING, "never acknowledged");
    assert!(line.read().is_err(), "restoring raises no interrupt");
    assert_eq!(read32(&mut t, 0x70), RUNNING);
    assert_eq!(read32(&mut t, 0x44), 1, "queue 0 ready");
    assert_eq!(read32(&mut t, 0x08), 2, "a block device");
    let mut capacity = [0u8; 8];
    t.read(0x100, &mut capacity);
    assert_eq!(u64::from_le_bytes(capacity), SECTORS as u64);
    // Nothing new was available: the kick serves nothing.
    write32(&mut t, 0x64, INT_USED_RING);
    assert_eq!(t.process_queue(0), None);
    assert_eq!(d.used_idx(), 3);
    assert_eq!(irq.status(), 0);
    assert!(line.read().is_err());

    // The used ring goes on where it was; the write before the snapshot is there.
    assert_eq!(blk_request(&mut t, &mut d, 0, 5, 512, true), (S_OK, 513));
    assert_eq!(d.used_idx(), 4);
    assert_eq!(d.read(DATA, 512), [0xab; 512]);
    assert_eq!(irq.status(), INT_USED_RING);
    assert!(line.read().is_ok());
    let after = t.state();
    assert_eq!(
        (after.queues[0].next_avail, after.queues[0].next_used),
        (4, 4)
    );
}

#[test]
fn block_requests_made_available_before_the_snapshot_are_served_after() {
    let mem = memory(1 << 20);
    let image = TempImage::new(&pattern());
    let (t, mut d) = live_block(&mem, &image);
    // The guest posts a read and notifies; the snapshot is taken before the
    // device loop gets to it.
    let mut h = [0u8; 16];
    h[8..].copy_from_slice(&7u64.to_le_bytes());
    d.write(HDR, &h);
    d.add(&[(HDR, 16, 0), (DATA, 512, F_WRITE), (STATUS, 1, F_WRITE)]);
    let state = save(&t);
    drop(t);
    let Restored { mut t, evts, .. } = restore(&state, &mem).unwrap();
    assert!(all_signalled(&evts));
    // What the event loop does with the signalled eventfd.
    assert_eq!(t.process_queue(0), None);
    assert_eq!(d.used_idx(), 4);
    assert_eq!(d.read(DATA, 512), pattern()[7 * 512..8 * 512]);
}

#[test]
fn block_restore_refuses_an_image_of_another_size() {
    let mem = memory(1 << 20);
    let image = TempImage::new(&pattern());
    let (t, _d) = live_block(&mem, &image);
    let state = save(&t);
    drop(t);
    std::fs::write(&image.0, vec![0u8; (SECTORS + 1) * 512]).unwrap();
    let e = restore(&state, &mem).err().expect("refused");
    assert_eq!(e.field(), "device.block.capacity", "{e}");
    assert!(e.to_string().contains("now has 17 sectors"), "{e}");
}

// ---------------------------------------------------------------- virtio-rng

#[test]
fn rng_continues_after_restore() {
    let mem = memory(1 << 20);
    let mut d = Driver::new(&mem, QSIZE);
    let limit = RateLimit {
        bandwidth: None,
        ops: Some((1000, Some(100))),
        ..Default::default()
    };
    let (mut t, _, _) = attach(Box::new(Rng::new(limit)), &mem);
    bring_up(&mut t, VIRTIO_F_VERSION_1, &[&d]);
    for i in 0..2u64 {
        d.add(&[(0x20000 + i * 0x100, 64, F_WRITE)]);
        t.process_queue(0);
    }
    assert_eq!(d.used_idx(), 2);
    let state = save(&t);
    assert_eq!(
        state.device,
        DeviceState::Rng(RngState {
            rate_limit: RateLimitState {
                bandwidth: None,
                ops: Some(TokenBucketState {
                    rate: 1000,
                    burst: Some(100)
                }),
            }
        })
    );
    drop(t);
    let mut t = restore(&state, &mem).unwrap().t;
    d.write(0x30000, &[0x5c; 256]);
    let head = d.add(&[(0x30000, 256, F_WRITE)]);
    assert_eq!(t.process_queue(0), None);
    assert_eq!(d.used_idx(), 3);
    assert_eq!(d.used(2), (u32::from(head), 256));
    assert!(d.read(0x30000, 256).iter().any(|&b| b != 0x5c));
}

// ---------------------------------------------------------------- virtio-net

#[test]
fn net_transmits_after_restore() {
    let tap = format!("vgst{}", std::process::id() % 100_000);
    let config = NetConfig {
        id: Some("eth0".into()),
        tap: tap.clone(),
        mac: vigil_model::MacAddr([0x02, 0x76, 0x69, 0x67, 0x00, 0x07]),
        rx_rate_limit: RateLimit::default(),
        tx_rate_limit: RateLimit {
            bandwidth: Some((1 << 20, Some(1 << 16))),
            ops: None,
            ..Default::default()
        },
        mmds: None,
        queue_pairs: 1,
    };
    let net = match Net::new(&config) {
        Ok(net) => net,
        Err(e) => {
            eprintln!("skipped: no tap here ({e})");
            return;
        }
    };
    let mem = memory(1 << 20);
    let rx = Driver::at(&mem, 0, QSIZE);
    let mut tx = Driver::at(&mem, 0x1000, QSIZE);
    let (mut t, _, _) = attach(Box::new(net), &mem);
    let features = VIRTIO_F_VERSION_1 | 1 << 5 | 1 << 16; // MAC, STATUS
    bring_up(&mut t, features, &[&rx, &tx]);
    // A broadcast frame behind a zeroed 12-byte header.
    let mut frame = vec![0u8; 12];
    frame.extend([0xff; 6]);
    frame.extend(config.mac.0);
    frame.extend([0x88, 0xb5]);
    frame.extend([0x42; 46]);
    tx.write(0x20000, &frame);
    for _ in 0..2 {
        tx.add(&[(0x20000, frame.len() as u32, 0)]);
        t.process_queue(1);
    }
    assert_eq!(tx.used_idx(), 2);
    let state = save(&t);
    match &state.device {
        DeviceState::Net(n) => {
            assert_eq!(n.tap, tap);
            assert_eq!(n.iface_id.as_deref(), Some("eth0"));
            assert_eq!(n.mac, config.mac.0);
            assert_eq!(n.tx_rate_limit.bandwidth.unwrap().burst, Some(1 << 16));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(state.acked_features, features);
    // The tap goes away with its last fd, and is made again on restore.
    drop(t);
    let mut t = restore(&state, &mem).unwrap().t;
    let mut mac = [0u8; 6];
    t.read(0x100, &mut mac);
    assert_eq!(mac, config.mac.0);
    tx.add(&[(0x20000, frame.len() as u32, 0)]);
    t.process_queue(1);
    assert_eq!(tx.used_idx(), 3);
    assert_eq!(t.state().queues[1].next_used, 3);
}

/// An interface of two queue pairs on a multi-queue tap keeps both, and how
/// many the driver uses, across a save and a restore; a saved count of pairs in
/// use past the pairs is refused, naming the field.
#[test]
fn net_restores_its_queue_pairs_and_the_pairs_in_use() {
    use vigil_devices::persist::Persist;
    let tap = format!("vgsq{}", std::process::id() % 100_000);
    let config = NetConfig {
        queue_pairs: 2,
        ..NetConfig::new(tap.clone(), 0)
    };
    let mut net = match Net::new(&config) {
        Ok(net) => net,
        Err(e) => {
            eprintln!("skipped: no tap here ({e})");
            return;
        }
    };
    assert_eq!(net.watched_fds().len(), 1, "one pair until the driver says");
    let mut state = net.save();
    assert_eq!((state.queue_pairs, state.active_pairs), (2, 1));
    drop(net);
    state.active_pairs = 2;
    let mut restored = Net::restore((), &state).unwrap();
    assert_eq!(restored.watched_fds().len(), 2);
    assert_eq!(restored.queue_max_sizes().len(), 5);
    assert_eq!(restored.save().active_pairs, 2);
    drop(restored);
    state.active_pairs = 3;
    match Net::restore((), &state) {
        Err(RestoreError::Invalid { field, .. }) => assert_eq!(field, "active_pairs"),
        Err(other) => panic!("{other}"),
        Ok(_) => panic!("three pairs in use of two restored"),
    }
}

// -------------------------------------------------------------- virtio-vsock

const VSOCK_HDR: usize = 44;
const GUEST_CID: u64 = 3;

fn vsock_packet(op: u16, src_port: u32, dst_port: u32) -> Vec<u8> {
    let mut b = vec![0u8; VSOCK_HDR];
    b[0..8].copy_from_slice(&GUEST_CID.to_le_bytes());
    b[8..16].copy_from_slice(&2u64.to_le_bytes());
    b[16..20].copy_from_slice(&src_port.to_le_bytes());
    b[20..24].copy_from_slice(&dst_port.to_le_bytes());
    b[28..30].copy_from_slice(&1u16.to_le_bytes()); // stream
    b[30..32].copy_from_slice(&op.to_le_bytes());
    b[36..40].copy_from_slice(&65536u32.to_le_bytes());
    b
}

/// The guest asks for a connection to a host port nobody listens on; the device
/// answers RST on rx.
fn vsock_refused_connection(t: &mut MmioTransport, rx: &mut Driver, tx: &mut Driver, at: u64) {
    let before = rx.used_idx();
    rx.add(&[(at, 0x100, F_WRITE)]);
    tx.write(at + 0x100, &vsock_packet(1, 5000, 4321)); // REQUEST
    tx.add(&[(at + 0x100, VSOCK_HDR as u32, 0)]);
    t.process_queue(1);
    assert_eq!(rx.used_idx(), before.wrapping_add(1));
    let answer = rx.read(at, VSOCK_HDR);
    assert_eq!(u16::from_le_bytes([answer[30], answer[31]]), 3, "RST");
}

#[test]
fn vsock_tells_the_guest_to_drop_its_connections_after_restore() {
    let dir = std::env::temp_dir().join(format!("vigil-state-vsock-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let uds = dir.join("v.sock");
    let mem = memory(1 << 20);
    let mut rx = Driver::at(&mem, 0, QSIZE);
    let mut tx = Driver::at(&mem, 0x1000, QSIZE);
    let mut ev = Driver::at(&mem, 0x2000, QSIZE);
    let vsock = Vsock::new(&VsockConfig {
        cid: GUEST_CID,
        uds: uds.clone(),
    })
    .unwrap();
    let (mut t, _, _) = attach(Box::new(vsock), &mem);
    bring_up(&mut t, VIRTIO_F_VERSION_1, &[&rx, &tx, &ev]);
    vsock_refused_connection(&mut t, &mut rx, &mut tx, 0x20000);
    // An event buffer the live device leaves alone: it has nothing to report.
    ev.write(0x30000, &[0xff; 8]);
    let ev_head = ev.add(&[(0x30000, 8, F_WRITE)]);
    t.process_queue(2);
    assert_eq!(ev.used_idx(), 0);

    let state = save(&t);
    match &state.device {
        DeviceState::Vsock(v) => assert_eq!((v.cid, &v.uds), (GUEST_CID, &uds)),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        (state.queues[0].next_used, state.queues[1].next_used),
        (1, 1)
    );
    drop(t);

    let Restored {
        mut t,
        irq,
        line,
        evts,
    } = restore(&state, &mem).unwrap();
    assert!(all_signalled(&evts));
    assert_eq!(irq.status(), INT_USED_RING, "the RST, never acknowledged");
    write32(&mut t, 0x64, INT_USED_RING);
    // The event loop serves the signalled queues: the event goes out.
    for q in 0..3 {
        t.process_queue(q);
    }
    assert_eq!(ev.used_idx(), 1);
    assert_eq!(ev.used(0), (u32::from(ev_head), 4));
    assert_eq!(ev.read(0x30000, 4), 0u32.to_le_bytes(), "TRANSPORT_RESET");
    assert_eq!(ev.read(0x30004, 4), [0xff; 4]);
    assert_eq!(irq.status(), INT_USED_RING);
    assert!(line.read().is_ok());
    // Sent once only.
    ev.add(&[(0x30010, 8, F_WRITE)]);
    t.process_queue(2);
    assert_eq!(ev.used_idx(), 1);
    // The device serves on, its rings going on where they were.
    vsock_refused_connection(&mut t, &mut rx, &mut tx, 0x21000);
    assert_eq!(rx.used_idx(), 2);
    drop(t);
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn vsock_reset_event_waits_for_an_event_buffer() {
    let dir = std::env::temp_dir().join(format!("vigil-state-vsock-ev-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let uds = dir.join("v.sock");
    let mem = memory(1 << 20);
    let rx = Driver::at(&mem, 0, QSIZE);
    let tx = Driver::at(&mem, 0x1000, QSIZE);
    let mut ev = Driver::at(&mem, 0x2000, QSIZE);
    let vsock = Vsock::new(&VsockConfig {
        cid: GUEST_CID,
        uds: uds.clone(),
    })
    .unwrap();
    let (mut t, _, _) = attach(Box::new(vsock), &mem);
    bring_up(&mut t, VIRTIO_F_VERSION_1, &[&rx, &tx, &ev]);
    let state = save(&t);
    drop(t);

    let mut t = restore(&state, &mem).unwrap().t;
    for q in 0..3 {
        t.process_queue(q);
    }
    assert_eq!(ev.used_idx(), 0, "no buffer yet");
    // A buffer too short for an event is handed back empty; the next one gets it.
    ev.add(&[(0x30000, 2, F_WRITE)]);
    ev.add(&[(0x30010, 4, F_WRITE)]);
    t.process_queue(2);
    assert_eq!(ev.used_idx(), 2);
    assert_eq!(ev.used(0).1, 0);
    assert_eq!(ev.used(1).1, 4);
    assert_eq!(ev.read(0x30010, 4), [0; 4]);
    drop(t);

    // A driver that resets the device starts without connections: no event.
    let mut t = restore(&state, &mem).unwrap().t;
    let mut ev = Driver::at(&mem, 0x3000, QSIZE);
    bring_up(&mut t, VIRTIO_F_VERSION_1, &[&rx, &tx, &ev]);
    ev.add(&[(0x30020, 4, F_WRITE)]);
    t.process_queue(2);
    assert_eq!(ev.used_idx(), 0);
    drop(t);
    std::fs::remove_dir_all(&dir).ok();
}

// ------------------------------------------------------------ virtio-balloon

#[test]
fn balloon_keeps_its_target_and_held_statistics_buffer() {
    let mem = memory(1 << 20);
    let mut inflate = Driver::at(&mem, 0, QSIZE);
    let deflate = Driver::at(&mem, 0x1000, QSIZE);
    let mut stats = Driver::at(&mem, 0x2000, QSIZE);
    let interval = Duration::from_millis(50);
    let balloon = Balloon::new(BalloonConfig {
        target_mib: 4,
        stats_interval: Some(interval),
        free_page_reporting: false,
        free_page_hinting: false,
        deflate_on_oom: true,
    });
    let (mut t, _, _) = attach(Box::new(balloon), &mem);
    let features = VIRTIO_F_VERSION_1 | 1 << 1 | 1 << 2; // STATS_VQ, DEFLATE_ON_OOM
    bring_up(&mut t, features, &[&inflate, &deflate, &stats]);
    t.write(0x104, &7u32.to_le_bytes()); // actual
    inflate.write(0x20000, &0x40u32.to_le_bytes());
    inflate.add(&[(0x20000, 4, 0)]);
    t.process_queue(0);
    assert_eq!(inflate.used_idx(), 1);
    let mut entry = 4u16.to_le_bytes().to_vec();
    entry.extend(0x1000u64.to_le_bytes());
    stats.write(0x21000, &entry);
    let stats_head = stats.add(&[(0x21000, 10, 0)]);
    t.process_queue(2);
    assert_eq!(stats.used_idx(), 0, "held");

    let state = save(&t);
    match &state.device {
        DeviceState::Balloon(b) => {
            assert_eq!((b.num_pages, b.actual), (1024, 7));
            assert_eq!(b.stats_interval, Some(interval));
            assert!(b.deflate_on_oom && !b.free_page_reporting);
            assert_eq!(b.stats_held, Some(stats_head));
            assert_eq!(
                b.stats,
                vec![BalloonStat {
                    tag: 4,
                    value: 0x1000
                }]
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(state.config_generation, 1, "the driver wrote the config");
    assert_eq!(state.queues[2].next_avail, 1);
    drop(t);

    let mut t = restore(&state, &mem).unwrap().t;
    let mut config = [0u8; 8];
    t.read(0x100, &mut config);
    assert_eq!(config, [0, 4, 0, 0, 7, 0, 0, 0]);
    assert_eq!(read32(&mut t, 0xfc), 1);
    // When fresh statistics are due, the buffer held before the snapshot is
    // handed back.
    std::thread::sleep(interval + Duration::from_millis(10));
    t.process_queue(2);
    assert_eq!(stats.used_idx(), 1);
    assert_eq!(stats.used(0), (u32::from(stats_head), 0));
    inflate.write(0x20010, &0x41u32.to_le_bytes());
    inflate.add(&[(0x20010, 4, 0)]);
    t.process_queue(0);
    assert_eq!(inflate.used_idx(), 2);
}

/// The held statistics buffer must be a descriptor of the statistics queue: the
/// balloon's own check, reached through the transport's state.
#[test]
fn balloon_refuses_a_held_buffer_outside_its_statistics_queue() {
    let mem = memory(1 << 20);
    let d = Driver::at(&mem, 0, QSIZE);
    let mut stats = Driver::at(&mem, 0x2000, QSIZE);
    let balloon = Balloon::new(BalloonConfig {
        target_mib: 1,
        stats_interval: Some(Duration::from_secs(60)),
        free_page_reporting: false,
        free_page_hinting: false,
        deflate_on_oom: false,
    });
    let (mut t, _, _) = attach(Box::new(balloon), &mem);
    bring_up(&mut t, VIRTIO_F_VERSION_1, &[&d, &d, &stats]);
    stats.add(&[(0x21000, 10, 0)]);
    t.process_queue(2);
    let state = save(&t);
    drop(t);
    let e = refused(&state, &mem, |s| match &mut s.device {
        DeviceState::Balloon(b) => b.stats_held = Some(QSIZE),
        other => panic!("{other:?}"),
    });
    assert_eq!(e.field(), "device.balloon.stats_held", "{e}");
    assert!(e.to_string().contains("16-entry statistics queue"), "{e}");
    assert!(restore(&state, &mem).is_ok());
}

// ------------------------------------- rules the live transport keeps, too

/// A state with FEATURES_OK and unoffered features is refused, so the live
/// transport must never hold one: the feature set is fixed once accepted.
#[test]
fn driver_features_are_fixed_once_accepted() {
    let mem = memory(1 << 20);
    let d = Driver::new(&mem, QSIZE);
    let (mut t, _, _) = attach(Box::new(Rng::new(RateLimit::default())), &mem);
    bring_up(&mut t, VIRTIO_F_VERSION_1, &[&d]);
    for sel in 0..2 {
        write32(&mut t, 0x24, sel);
        write32(&mut t, 0x20, u32::MAX);
    }
    assert_eq!(t.state().acked_features, VIRTIO_F_VERSION_1);
    // After a reset the driver negotiates again.
    write32(&mut t, 0x70, 0);
    write32(&mut t, 0x24, 0);
    write32(&mut t, 0x20, 5);
    assert_eq!(t.state().acked_features, 5);
}

/// Likewise status bits virtio does not define are dropped from a driver's write.
#[test]
fn undefined_status_bits_are_dropped() {
    let mem = memory(1 << 20);
    let (mut t, _, _) = attach(Box::new(Rng::new(RateLimit::default())), &mem);
    write32(&mut t, 0x70, ACKNOWLEDGE | 0x100 | 0x20);
    assert_eq!(read32(&mut t, 0x70), ACKNOWLEDGE);
    write32(&mut t, 0x70, 0x8000_0000);
    assert_eq!(
        read32(&mut t, 0x70),
        ACKNOWLEDGE,
        "clears ACKNOWLEDGE: ignored"
    );
    let state = save(&t);
    assert!(restore(&state, &mem).is_ok());
}

// ------------------------------------------------------- corrupted states

/// Restores `state` after `corrupt`; returns the error.
fn refused(
    state: &MmioTransportState,
    mem: &GuestMemoryMmap,
    corrupt: impl FnOnce(&mut MmioTransportState),
) -> RestoreError {
    let mut bad = state.clone();
    corrupt(&mut bad);
    match restore(&bad, mem) {
        Ok(_) => panic!("accepted: {bad:?}"),
        Err(e) => e,
    }
}

fn block_state(state: &mut MmioTransportState) -> &mut BlockState {
    match &mut state.device {
        DeviceState::Block(b) => b,
        other => panic!("{other:?}"),
    }
}

#[test]
fn corrupted_states_are_refused_naming_the_field() {
    let mem = memory(1 << 20);
    let image = TempImage::new(&pattern());
    let (t, _d) = live_block(&mem, &image);
    let state = save(&t);
    drop(t);
    type Corrupt = fn(&mut MmioTransportState);
    let cases: Vec<(Corrupt, &str, &str)> = vec![
        (|s| s.queues[0].size = 3, "queues[0].size", "= 3:"),
        (|s| s.queues[0].size = 512, "queues[0].size", "= 512:"),
        (
            |s| s.queues[0].max_size = 128,
            "queues[0].max_size",
            "= 128:",
        ),
        (
            |s| s.queues[0].desc_table = 1 << 30,
            "queues[0].desc_table",
            "0x40000000",
        ),
        (
            |s| s.queues[0].used_ring = (1 << 20) - 8,
            "queues[0].used_ring",
            "0xffff8",
        ),
        (
            |s| s.queues[0].avail_ring = 0x101,
            "queues[0].avail_ring",
            "aligned",
        ),
        (
            |s| s.queues[0].event_idx_enabled = true,
            "queues[0].event_idx_enabled",
            "not negotiated",
        ),
        (|s| s.queues.push(s.queues[0]), "queues", "the device has 1"),
        (|s| s.queues.clear(), "queues", "0 queues"),
        (
            |s| s.acked_features |= 1 << 40,
            "acked_features",
            "never offered",
        ),
        (
            |s| s.acked_features = 0,
            "acked_features",
            "VIRTIO_F_VERSION_1",
        ),
        // Offered by a writable disk, not by a read-only one.
        (
            |s| {
                s.acked_features |= 1 << 13;
                block_state(s).read_only = true;
            },
            "acked_features",
            "0x2000",
        ),
        (|s| s.device_status |= 0x100, "device_status", "0x10f"),
        (
            |s| s.device_status = ACKNOWLEDGE | DRIVER | DRIVER_OK,
            "device_status",
            "DRIVER_OK without FEATURES_OK",
        ),
        (|s| s.interrupt_status = 4, "interrupt_status", "0x4"),
        (
            |s| block_state(s).capacity = 1 << 40,
            "device.block.capacity",
            "now has 16 sectors",
        ),
        (
            |s| block_state(s).id = "x".repeat(21),
            "device.block.id",
            "20 bytes",
        ),
        (
            |s| block_state(s).path = "/nonexistent/vigil.img".into(),
            "device.block.path",
            "/nonexistent/vigil.img",
        ),
        (
            |s| {
                block_state(s).write_limit.ops = Some(TokenBucketState {
                    rate: 0,
                    burst: None,
                })
            },
            "device.block.write_limit.ops.rate",
            "above zero",
        ),
    ];
    for (corrupt, field, says) in cases {
        let e = refused(&state, &mem, corrupt);
        assert_eq!(e.field(), field, "{e}");
        assert!(e.to_string().contains(says), "{e} (wanted {says:?})");
    }
}

#[test]
fn states_a_stopped_device_may_hold_are_accepted() {
    let mem = memory(1 << 20);
    let image = TempImage::new(&pattern());
    let (t, _d) = live_block(&mem, &image);
    let state = save(&t);
    drop(t);
    // Rings outside memory are the driver's mistake only once it is running: a
    // device that failed, needs a reset, or is still being set up takes them.
    for status in [
        RUNNING | DEVICE_NEEDS_RESET,
        RUNNING | FAILED,
        ACKNOWLEDGE | DRIVER | FEATURES_OK,
    ] {
        let mut s = state.clone();
        s.device_status = status;
        s.queues[0].desc_table = 1 << 30;
        let Restored { mut t, evts, .. } = restore(&s, &mem).unwrap();
        assert_eq!(t.status(), status);
        assert!(evts.iter().all(|e| e.read().is_err()), "not kicked");
        assert_eq!(t.process_queue(0), None);
    }
    // Unacknowledged features are only the driver's proposal before FEATURES_OK.
    let mut s = state.clone();
    s.device_status = ACKNOWLEDGE | DRIVER;
    s.acked_features = u64::MAX;
    let mut t = restore(&s, &mem).unwrap().t;
    write32(&mut t, 0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_eq!(read32(&mut t, 0x70), ACKNOWLEDGE | DRIVER, "still refused");
}

#[test]
fn a_state_refused_before_the_device_is_built_opens_nothing() {
    let dir = std::env::temp_dir().join(format!("vigil-state-none-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let uds = dir.join("v.sock");
    let queue = QueueState {
        max_size: 256,
        next_avail: 0,
        next_used: 0,
        event_idx_enabled: false,
        size: 256,
        ready: false,
        desc_table: 0,
        avail_ring: 0,
        used_ring: 0,
    };
    let mut state = MmioTransportState {
        device_status: ACKNOWLEDGE | 0x200,
        device_features_sel: 0,
        driver_features_sel: 0,
        acked_features: 0,
        queue_sel: 0,
        interrupt_status: 0,
        config_generation: 0,
        queues: vec![queue; 3],
        device: DeviceState::Vsock(VsockState {
            cid: GUEST_CID,
            uds: uds.clone(),
        }),
    };
    let e = state.restore_device().err().expect("refused");
    assert_eq!(e.field(), "device_status", "{e}");
    state.device_status = ACKNOWLEDGE;
    state.queues[1].size = 3;
    let e = state.restore_device().err().expect("refused");
    assert_eq!(e.field(), "queues[1].size", "{e}");
    assert!(!uds.exists(), "nothing listens");
    state.queues[1].size = 256;
    let mem = memory(1 << 20);
    assert!(restore(&state, &mem).is_ok());
    assert!(uds.exists());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_device_of_another_kind_is_refused() {
    let mem = memory(1 << 20);
    let image = TempImage::new(&pattern());
    let (t, _d) = live_block(&mem, &image);
    let state = save(&t);
    drop(t);
    let (irq, _, evts, _) = resources(1);
    let rng = Box::new(Rng::new(RateLimit::default()));
    let e = MmioTransport::restore(&state, rng, mem.clone(), irq, evts)
        .err()
        .expect("refused");
    assert_eq!(e.field(), "device", "{e}");
    // And the wrong number of eventfds.
    let device = state.device.restore().unwrap();
    let (irq, _, evts, _) = resources(2);
    let e = MmioTransport::restore(&state, device, mem.clone(), irq, evts)
        .err()
        .expect("refused");
    assert_eq!(e.field(), "queues", "{e}");
}

#[test]
fn malformed_json_is_refused() {
    let mem = memory(1 << 20);
    let image = TempImage::new(&pattern());
    let (t, _d) = live_block(&mem, &image);
    let json = serde_json::to_value(t.state()).unwrap();
    drop(t);
    let parse = |v: &serde_json::Value| serde_json::from_value::<MmioTransportState>(v.clone());
    assert!(parse(&json).is_ok());

    let mut v = json.clone();
    let block = v["device"]["block"].take();
    v["device"] = serde_json::json!({ "floppy": block });
    let e = parse(&v).unwrap_err().to_string();
    assert!(e.contains("unknown variant `floppy`"), "{e}");

    let mut v = json.clone();
    v["queues"][0]["size"] = serde_json::json!(-1);
    assert!(parse(&v).is_err());
    let mut v = json.clone();
    v["queues"][0]["size"] = serde_json::json!(65536);
    assert!(parse(&v).is_err());
    let mut v = json.clone();
    v["queues"][0]["shadow"] = serde_json::json!(1);
    let e = parse(&v).unwrap_err().to_string();
    assert!(e.contains("unknown field `shadow`"), "{e}");
    let mut v = json.clone();
    v.as_object_mut().unwrap().remove("device_status");
    let e = parse(&v).unwrap_err().to_string();
    assert!(e.contains("missing field `device_status`"), "{e}");
}

// ----------------------------------------------- whatever a guest did, ...

/// xorshift64*: a deterministic stream of test inputs.
struct Rand(u64);

impl Rand {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// A register value: mostly small, sometimes anything.
    fn value(&mut self) -> u32 {
        match self.below(4) {
            0 => self.next() as u32,
            1 => 1 << self.below(32),
            _ => self.below(20) as u32,
        }
    }
}

const REGS: [u64; 16] = [
    0x14, 0x20, 0x24, 0x30, 0x38, 0x44, 0x50, 0x64, 0x70, 0x80, 0x84, 0x90, 0x94, 0xa0, 0xa4, 0x104,
];

/// Whatever a driver does to the registers and rings, the state the transport
/// saves restores, and restores to the same state.
#[test]
fn every_state_a_guest_can_reach_restores() {
    let mem = memory(1 << 20);
    let image = TempImage::new(&pattern());
    let mut r = Rand(0x5eed_1234_abcd_0001);
    // How many runs ended running, broken, failed, and with requests served.
    let (mut running, mut broken, mut failed, mut served) = (0, 0, 0, 0);
    for run in 0..300 {
        let device: Box<dyn VirtioDevice> = match run % 3 {
            0 => Box::new(Rng::new(RateLimit::default())),
            1 => Box::new(Block::new(&block_config(&image)).unwrap()),
            _ => Box::new(Balloon::new(BalloonConfig {
                target_mib: 1,
                stats_interval: Some(Duration::from_secs(5)),
                free_page_reporting: true,
                free_page_hinting: true,
                deflate_on_oom: false,
            })),
        };
        let queues = device.queue_max_sizes().len();
        let (mut t, _, _) = attach(device, &mem);
        let mut d = Driver::at(&mem, 0, QSIZE);
        for _ in 0..40 {
            match r.below(10) {
                0 => {
                    let drivers: Vec<&Driver> = (0..queues).map(|_| &d).collect();
                    let features = if r.below(2) == 0 {
                        VIRTIO_F_VERSION_1
                    } else {
                        u64::from(r.value()) << r.below(40)
                    };
                    write32(&mut t, 0x70, 0);
                    write32(&mut t, 0x70, ACKNOWLEDGE | DRIVER);
                    for sel in 0..2 {
                        write32(&mut t, 0x24, sel);
                        write32(&mut t, 0x20, (features >> (32 * sel)) as u32);
                    }
                    write32(&mut t, 0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK);
                    if read32(&mut t, 0x70) & FEATURES_OK != 0 && r.below(2) == 0 {
                        bring_up(&mut t, VIRTIO_F_VERSION_1, &drivers);
                    }
                }
                1 => {
                    let q = r.below(queues as u64 + 1) as usize;
                    t.process_queue(q);
                }
                2 | 3 => {
                    d.add(&[(0x10000 + r.below(16) * 0x100, 64, F_WRITE)]);
                    let q = r.below(queues as u64) as usize;
                    t.process_queue(q);
                }
                4 => {
                    let at = r.below(0x2000);
                    let bytes = r.next().to_le_bytes();
                    d.write(at, &bytes[..r.below(9) as usize]);
                }
                _ => {
                    let reg = REGS[r.below(REGS.len() as u64) as usize];
                    t.write(reg, &r.value().to_le_bytes());
                }
            }
        }
        let state = save(&t);
        let s = state.device_status;
        running += usize::from(s & (DRIVER_OK | DEVICE_NEEDS_RESET | FAILED) == DRIVER_OK);
        broken += usize::from(s & DEVICE_NEEDS_RESET != 0);
        failed += usize::from(s & FAILED != 0);
        served += usize::from(state.queues.iter().any(|q| q.next_used != 0));
        drop(t);
        let t = restore(&state, &mem)
            .unwrap_or_else(|e| panic!("run {run}: {e}: {state:?}"))
            .t;
        assert_eq!(t.state(), state, "run {run}");
    }
    eprintln!("running {running}, broken {broken}, failed {failed}, served {served}");
    assert!(
        running > 10 && broken > 0 && failed > 0 && served > 10,
        "running {running}, broken {broken}, failed {failed}, served {served}"
    );
}

/// Whatever a state file says, restoring answers (yes or no) without panicking,
/// and a restored device serves its queues without panicking.
#[test]
fn no_state_makes_restoring_panic() {
    let mem = memory(1 << 20);
    let image = TempImage::new(&pattern());
    let (t, _d) = live_block(&mem, &image);
    let mut states = vec![serde_json::to_value(t.state()).unwrap()];
    drop(t);
    let balloon = Balloon::new(BalloonConfig {
        target_mib: 1,
        stats_interval: Some(Duration::from_secs(1)),
        free_page_reporting: true,
        free_page_hinting: false,
        deflate_on_oom: true,
    });
    let (mut t, _, _) = attach(Box::new(balloon), &mem);
    let d = Driver::at(&mem, 0, QSIZE);
    bring_up(&mut t, VIRTIO_F_VERSION_1, &[&d, &d, &d, &d]);
    states.push(serde_json::to_value(t.state()).unwrap());
    drop(t);

    let mut r = Rand(0x0bad_5eed_0000_0042);
    let (mut accepted, mut refused) = (0, 0);
    for i in 0..600 {
        let mut v = states[i % states.len()].clone();
        for _ in 0..=r.below(3) {
            mutate(&mut v, &mut r);
        }
        let Ok(state) = serde_json::from_value::<MmioTransportState>(v) else {
            refused += 1;
            continue;
        };
        match restore(&state, &mem) {
            Ok(Restored { mut t, .. }) => {
                accepted += 1;
                for q in 0..state.queues.len() + 1 {
                    t.process_queue(q);
                }
                let mut b = [0u8; 4];
                for reg in REGS {
                    t.read(reg, &mut b);
                }
            }
            Err(e) => {
                assert!(!e.field().is_empty());
                refused += 1;
            }
        }
    }
    eprintln!("accepted {accepted}, refused {refused}");
    assert!(accepted > 20 && refused > 20, "{accepted} {refused}");
}

/// Replaces one number (or boolean) somewhere in `v` with another.
fn mutate(v: &mut serde_json::Value, r: &mut Rand) {
    let mut leaves = Vec::new();
    collect_leaves(v, &mut Vec::new(), &mut leaves);
    if leaves.is_empty() {
        return;
    }
    let path = &leaves[r.below(leaves.len() as u64) as usize];
    let mut at = &mut *v;
    for key in path {
        at = match key {
            Key::Field(f) => &mut at[f.as_str()],
            Key::Index(i) => &mut at[*i],
        };
    }
    let new = match &*at {
        serde_json::Value::Bool(b) => serde_json::Value::Bool(!b),
        _ => {
            let n = match r.below(5) {
                0 => r.next(),
                1 => 1 << r.below(64),
                2 => r.below(3),
                3 => u64::from(u16::MAX) + 1 - r.below(3),
                _ => at
                    .as_u64()
                    .unwrap_or(0)
                    .wrapping_add(r.below(5))
                    .wrapping_sub(2),
            };
            serde_json::json!(n)
        }
    };
    *at = new;
}

#[derive(Clone)]
enum Key {
    Field(String),
    Index(usize),
}

fn collect_leaves(v: &serde_json::Value, path: &mut Vec<Key>, out: &mut Vec<Vec<Key>>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, child) in m {
                // The image path stays: a test must not open arbitrary files.
                if k == "path" {
                    continue;
                }
                path.push(Key::Field(k.clone()));
                collect_leaves(child, path, out);
                path.pop();
            }
        }
        serde_json::Value::Array(a) => {
            for (i, child) in a.iter().enumerate() {
                path.push(Key::Index(i));
                collect_leaves(child, path, out);
                path.pop();
            }
        }
        serde_json::Value::Number(_) | serde_json::Value::Bool(_) => {
            out.push(path.clone());
        }
        _ => {}
    }
}
