//! The virtio-mmio transport as a hostile driver sees it: identity registers,
//! feature negotiation, the status state machine, queue set-up, reset, and
//! accesses of the wrong width or past the end.

mod common;

use common::{
    bring_up, bring_up_queues, memory, program_queue, read32, transport, write32, Driver,
    TempImage, F_WRITE,
};
use std::sync::{Arc, Mutex};

use vigil_devices::bus::BusDevice;
use vigil_devices::virtio::block::Block;
use vigil_devices::virtio::mmio::status::{
    ACKNOWLEDGE, DEVICE_NEEDS_RESET, DRIVER, DRIVER_OK, FAILED, FEATURES_OK,
};
use vigil_devices::virtio::mmio::{MmioBusDevice, MmioTransport, RegisterPage, MMIO_WINDOW};
use vigil_devices::virtio::rng::Rng;
use vigil_devices::virtio::{Interrupt, INT_CONFIG, INT_USED_RING};
use vigil_model::config::DriveConfig;
use vigil_model::config::RateLimit;
use vmm_sys_util::eventfd::EventFd;

const QSIZE: u16 = 16;
const BUF: u64 = 0x8000;
const F_VERSION_1: u64 = 1 << 32;
const F_EVENT_IDX: u64 = 1 << 29;

fn rng() -> Box<Rng> {
    Box::new(Rng::new(RateLimit::default()))
}

fn blk(image: &TempImage) -> Box<Block> {
    Box::new(
        Block::new(&DriveConfig {
            path: image.0.clone(),
            read_only: false,
            id: "id".into(),
            rate_limit: RateLimit::default(),
            ..Default::default()
        })
        .unwrap(),
    )
}

#[test]
fn identity_registers() {
    let mem = memory(1 << 20);
    let (mut t, _, _) = transport(rng(), &mem);
    assert_eq!(read32(&mut t, 0x00), 0x7472_6976, "magic");
    assert_eq!(read32(&mut t, 0x04), 2, "version");
    assert_eq!(read32(&mut t, 0x08), 4, "rng device id");
    assert_eq!(read32(&mut t, 0x0c), u32::from_le_bytes(*b"VGIL"));
    write32(&mut t, 0x14, 0);
    assert_eq!(read32(&mut t, 0x10), 0);
    write32(&mut t, 0x14, 1);
    assert_eq!(read32(&mut t, 0x10), 1, "VERSION_1 in the high word");
    write32(&mut t, 0x14, u32::MAX);
    assert_eq!(read32(&mut t, 0x10), 0);
    assert_eq!(read32(&mut t, 0x34), u32::from(256u16), "queue 0 max size");
    write32(&mut t, 0x30, 1);
    assert_eq!(read32(&mut t, 0x34), 0, "no queue 1");
    assert_eq!(read32(&mut t, 0x44), 0);

    let image = TempImage::new(&[0; 4096]);
    let (mut t, _, _) = transport(blk(&image), &mem);
    assert_eq!(read32(&mut t, 0x08), 2, "block device id");
    // Registers that do not exist read as zero; writes to them are ignored.
    for offset in [0x18, 0x28, 0x3c, 0x48, 0x4c, 0x54, 0x68, 0x74, 0xb0, 0xf8] {
        write32(&mut t, offset, u32::MAX);
        assert_eq!(read32(&mut t, offset), 0, "{offset:#x}");
    }
}

#[test]
fn features_ok_needs_version_1_and_only_offered_bits() {
    let mem = memory(1 << 20);
    let (mut t, _, _) = transport(rng(), &mem);
    let negotiate = |t: &mut vigil_devices::virtio::mmio::MmioTransport, lo: u32, hi: u32| {
        write32(t, 0x70, 0);
        write32(t, 0x70, ACKNOWLEDGE | DRIVER);
        write32(t, 0x24, 0);
        write32(t, 0x20, lo);
        write32(t, 0x24, 1);
        write32(t, 0x20, hi);
        write32(t, 0x24, 7); // a bogus selector: ignored
        write32(t, 0x20, u32::MAX);
        write32(t, 0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        read32(t, 0x70)
    };
    let refused = ACKNOWLEDGE | DRIVER;
    assert_eq!(negotiate(&mut t, 0, 0), refused, "no VERSION_1");
    assert_eq!(negotiate(&mut t, 1, 1), refused, "bit 0 not offered");
    assert_eq!(
        negotiate(&mut t, 0, 1 | 1 << 31),
        refused,
        "bit 63 not offered"
    );
    assert_eq!(negotiate(&mut t, 0, 1), refused | FEATURES_OK);

    // DRIVER_OK without FEATURES_OK fails the device.
    write32(&mut t, 0x70, 0);
    write32(&mut t, 0x70, ACKNOWLEDGE | DRIVER);
    write32(&mut t, 0x70, ACKNOWLEDGE | DRIVER | DRIVER_OK);
    assert_eq!(read32(&mut t, 0x70) & FAILED, FAILED);
    assert_eq!(t.process_queue(0), None);
}

/// Found by fuzzing (virtio_mmio_registers): a refused FEATURES_OK written
/// together with DRIVER_OK used to skip the DRIVER_OK checks and start the
/// device on a feature set it had refused (and without checking its queues).
#[test]
fn driver_ok_with_a_refused_feature_set_fails_the_device() {
    let mem = memory(1 << 20);
    let mut d = Driver::new(&mem, QSIZE);
    for acked_high in [0, 1 | 2] {
        let (mut t, irq, _) = transport(rng(), &mem);
        write32(&mut t, 0x70, ACKNOWLEDGE | DRIVER);
        write32(&mut t, 0x24, 1);
        write32(&mut t, 0x20, acked_high); // no VERSION_1, or an unoffered bit
        program_queue(&mut t, &d, QSIZE);
        write32(&mut t, 0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        let s = read32(&mut t, 0x70);
        assert_eq!(s & FEATURES_OK, 0, "{s:#x}");
        assert_ne!(s & FAILED, 0, "{s:#x}");
        d.add(&[(BUF, 8, F_WRITE)]);
        assert_eq!(t.process_queue(0), None);
        assert_eq!(d.used_idx(), 0);
        assert_eq!(irq.status(), 0);
    }
}

#[test]
fn status_writes_that_clear_bits_are_ignored() {
    let mem = memory(1 << 20);
    let d = Driver::new(&mem, QSIZE);
    let (mut t, _, _) = transport(rng(), &mem);
    let ok = ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK;
    assert_eq!(bring_up(&mut t, &d, QSIZE), ok);
    for v in [ACKNOWLEDGE, DRIVER_OK, ok & !FEATURES_OK, 0x100, FAILED] {
        write32(&mut t, 0x70, v);
        assert_eq!(read32(&mut t, 0x70), ok, "{v:#x}");
    }
    // Setting a bit the device already has is a no-op.
    write32(&mut t, 0x70, ok);
    assert_eq!(read32(&mut t, 0x70), ok);
}

#[test]
fn queue_registers_are_ignored_after_driver_ok() {
    let mem = memory(1 << 20);
    let mut d = Driver::new(&mem, QSIZE);
    let (mut t, irq, _) = transport(rng(), &mem);
    assert_eq!(bring_up(&mut t, &d, QSIZE), 15);
    // Try to move the queue out of memory, shrink it and disable it.
    write32(&mut t, 0x38, 2);
    for reg in [0x80, 0x84, 0x90, 0x94, 0xa0, 0xa4] {
        write32(&mut t, reg, 0xffff_f000);
    }
    write32(&mut t, 0x44, 0);
    assert_eq!(read32(&mut t, 0x44), 1);
    // The queue still works where it was set up.
    d.add(&[(BUF, 64, F_WRITE)]);
    assert_eq!(t.process_queue(0), None);
    assert_eq!(d.used_idx(), 1);
    assert_eq!(d.used(0), (0, 64));
    assert_eq!(irq.status(), INT_USED_RING);
    write32(&mut t, 0x64, INT_USED_RING);
    assert_eq!(read32(&mut t, 0x60), 0);
    assert_eq!(t.status() & DEVICE_NEEDS_RESET, 0);
}

#[test]
fn reset_clears_queues_features_and_interrupts() {
    let mem = memory(1 << 20);
    let mut d = Driver::new(&mem, QSIZE);
    let (mut t, irq, _) = transport(rng(), &mem);
    bring_up(&mut t, &d, QSIZE);
    d.add(&[(BUF, 8, F_WRITE)]);
    t.process_queue(0);
    assert_eq!(read32(&mut t, 0x60), INT_USED_RING);

    write32(&mut t, 0x70, 0);
    assert_eq!(read32(&mut t, 0x70), 0);
    assert_eq!(irq.status(), 0);
    assert_eq!(read32(&mut t, 0x44), 0, "queue not ready");
    assert_eq!(read32(&mut t, 0x34), 256);
    // The features acked before the reset are gone: FEATURES_OK is refused.
    write32(&mut t, 0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_eq!(read32(&mut t, 0x70), ACKNOWLEDGE | DRIVER);
    // Nothing is processed until the driver sets the device up again.
    d.add(&[(BUF, 8, F_WRITE)]);
    t.process_queue(0);
    assert_eq!(d.used_idx(), 1);

    // A fresh set-up starts the rings from index 0 again.
    let mut d = Driver::new(&mem, QSIZE);
    assert_eq!(bring_up(&mut t, &d, QSIZE), 15);
    d.add(&[(BUF, 8, F_WRITE)]);
    t.process_queue(0);
    assert_eq!(d.used_idx(), 1);
    assert_eq!(d.used(0), (0, 8));
}

#[test]
fn driver_ok_with_rings_outside_memory_needs_reset() {
    let mem = memory(1 << 20);
    let d = Driver::new(&mem, QSIZE);
    for (reg, addr) in [
        (0x80u64, 1u64 << 20),
        (0x90, (1 << 20) - 4),
        (0xa0, (1 << 20) - 8),
        (0x80, !0xf),
    ] {
        let (mut t, irq, _) = transport(rng(), &mem);
        write32(&mut t, 0x70, ACKNOWLEDGE | DRIVER);
        write32(&mut t, 0x24, 1);
        write32(&mut t, 0x20, 1);
        write32(&mut t, 0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        program_queue(&mut t, &d, QSIZE);
        write32(&mut t, reg, addr as u32);
        write32(&mut t, reg + 4, (addr >> 32) as u32);
        write32(&mut t, 0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        assert_ne!(
            read32(&mut t, 0x70) & DEVICE_NEEDS_RESET,
            0,
            "{reg:#x}={addr:#x}"
        );
        assert_eq!(irq.status(), INT_CONFIG);
        assert_eq!(t.process_queue(0), None);
    }
}

#[test]
fn notify_before_driver_ok_processes_nothing() {
    let mem = memory(1 << 20);
    let mut d = Driver::new(&mem, QSIZE);
    let (mut t, irq, evts) = transport(rng(), &mem);
    write32(&mut t, 0x70, ACKNOWLEDGE | DRIVER);
    write32(&mut t, 0x24, 1);
    write32(&mut t, 0x20, 1);
    write32(&mut t, 0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK);
    program_queue(&mut t, &d, QSIZE);
    d.add(&[(BUF, 8, F_WRITE)]);
    write32(&mut t, 0x50, 0);
    assert_eq!(
        evts[0].read().unwrap(),
        1,
        "the notification reaches the eventfd"
    );
    write32(&mut t, 0x50, 7); // no such queue: ignored
    assert_eq!(t.process_queue(0), None);
    assert_eq!(t.process_queue(5), None);
    assert_eq!(d.used_idx(), 0);
    assert_eq!(irq.status(), 0);
    // Once the driver is OK the pending request is served.
    write32(&mut t, 0x70, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    t.process_queue(0);
    assert_eq!(d.used_idx(), 1);
}

#[test]
fn register_accesses_not_32_bits_wide() {
    let mem = memory(1 << 20);
    let (mut t, _, _) = transport(rng(), &mem);
    for len in [0usize, 1, 2, 3, 8] {
        let mut b = vec![0u8; len];
        t.read(0x00, &mut b);
        assert!(b.iter().all(|&x| x == 0xff), "{len}");
        t.read(0x02, &mut b);
        assert!(b.iter().all(|&x| x == 0xff), "{len}");
    }
    // Narrow or wide writes to the status register do nothing.
    t.write(0x70, &[1]);
    t.write(0x70, &[1, 0]);
    t.write(0x70, &[1, 0, 0, 0, 0, 0, 0, 0]);
    t.write(0x70, &[]);
    assert_eq!(read32(&mut t, 0x70), 0);
    // A 32-bit access at an unaligned offset is an unknown register.
    write32(&mut t, 0x71, 1);
    assert_eq!(read32(&mut t, 0x70), 0);
    assert_eq!(read32(&mut t, 0x01), 0);
}

#[test]
fn config_reads_at_odd_offsets_and_past_the_end() {
    let mem = memory(1 << 20);
    let image = TempImage::new(&vec![0; 0x1234 * 512]);
    let (mut t, _, _) = transport(blk(&image), &mem);
    let read = |t: &mut vigil_devices::virtio::mmio::MmioTransport, offset: u64, len: usize| {
        let mut b = vec![0xaau8; len];
        t.read(0x100 + offset, &mut b);
        b
    };
    assert_eq!(read(&mut t, 0, 8), 0x1234u64.to_le_bytes());
    assert_eq!(read(&mut t, 1, 1), [0x12]);
    assert_eq!(read(&mut t, 1, 2), [0x12, 0]);
    assert_eq!(read(&mut t, 3, 8), [0; 8]);
    // write_zeroes_may_unmap is the last byte; past it everything reads zero.
    assert_eq!(read(&mut t, 56, 8), [1, 0, 0, 0, 0, 0, 0, 0]);
    assert_eq!(read(&mut t, 59, 4), [0; 4]);
    assert_eq!(read(&mut t, 0xeff, 1), [0]);
    assert_eq!(read(&mut t, 0xefc, 8), [0; 8]);
    assert_eq!(read(&mut t, 0x10_0000, 8), [0; 8]);
    assert_eq!(read(&mut t, 0, 0), [0; 0]);
    // The rng has no config space at all.
    let (mut t, _, _) = transport(rng(), &mem);
    assert_eq!(read(&mut t, 0, 4), [0; 4]);
    // Config writes are ignored, but bump the generation.
    let generation = read32(&mut t, 0xfc);
    t.write(0x100, &[1, 2, 3]);
    assert_eq!(read(&mut t, 0, 4), [0; 4]);
    assert_eq!(read32(&mut t, 0xfc), generation.wrapping_add(1));
}

#[test]
fn a_broken_ring_needs_reset_and_a_reset_recovers() {
    let mem = memory(1 << 20);
    let mut d = Driver::new(&mem, QSIZE);
    let image = TempImage::new(&[0; 4096]);
    let (mut t, irq, _) = transport(blk(&image), &mem);
    assert_eq!(bring_up(&mut t, &d, QSIZE), 15);
    d.set_avail_idx(QSIZE + 1);
    assert_eq!(t.process_queue(0), None);
    assert_ne!(t.status() & DEVICE_NEEDS_RESET, 0);
    assert_eq!(irq.status(), INT_CONFIG);
    assert_eq!(d.used_idx(), 0);
    // Stays broken: nothing more is processed.
    d.set_avail_idx(1);
    t.process_queue(0);
    assert_eq!(d.used_idx(), 0);

    let mut d = Driver::new(&mem, QSIZE);
    assert_eq!(bring_up(&mut t, &d, QSIZE), 15);
    d.add(&[(BUF, 16, 0), (BUF + 0x100, 1, F_WRITE)]); // a zeroed header: an empty read
    t.process_queue(0);
    assert_eq!(d.used(0), (0, 1));
    assert_eq!(d.read(BUF + 0x100, 1), [0]);
}

/// `VIRTIO_F_RING_EVENT_IDX` (bit 29) on virtio-blk: the used-buffer interrupt
/// comes only when the used index passes the driver's `used_event`, and the
/// device publishes in `avail_event` the entry it takes next.
#[test]
fn event_idx_interrupts_once_the_used_index_passes_used_event() {
    let mem = memory(1 << 20);
    let image = TempImage::new(&[0; 4096]);
    let mut d = Driver::new(&mem, QSIZE);
    let (mut t, irq, _evts) = transport(blk(&image), &mem);
    write32(&mut t, 0x14, 0);
    assert_ne!(read32(&mut t, 0x10) & 1 << 29, 0, "EVENT_IDX offered");
    bring_up_queues(&mut t, F_VERSION_1 | F_EVENT_IDX, &[&d], QSIZE);
    let used_event = d.vq.avail_addr().0 + 4 + 2 * u64::from(QSIZE);
    let avail_event = d.used_addr + 4 + 8 * u64::from(QSIZE);

    // Three requests, the driver asks to hear once the third (index 2) is used.
    d.write(used_event, &2u16.to_le_bytes());
    for _ in 0..3 {
        add_flush(&mut d);
    }
    t.process_queue(0);
    assert_eq!(d.used_idx(), 3);
    assert_eq!(irq.status(), INT_USED_RING, "used index passed used_event");
    assert_eq!(d.read(avail_event, 2), 3u16.to_le_bytes(), "avail_event");
    irq.ack(INT_USED_RING);

    // A driver that polls and has moved used_event ahead gets no interrupt.
    d.write(used_event, &10u16.to_le_bytes());
    add_flush(&mut d);
    t.process_queue(0);
    assert_eq!(d.used_idx(), 4);
    assert_eq!(irq.status(), 0, "used_event not reached: no interrupt");

    // Asked to hear at the first of three entries used in one pass (4, 5
    // and 6): interrupted once the pass ends.
    d.write(used_event, &4u16.to_le_bytes());
    for _ in 0..3 {
        add_flush(&mut d);
    }
    t.process_queue(0);
    assert_eq!(d.used_idx(), 7);
    assert_eq!(irq.status(), INT_USED_RING, "used_event inside the batch");

    // Without the feature every used batch interrupts, whatever used_event says.
    let (mut t, irq, _evts) = transport(blk(&image), &mem);
    let mut d = Driver::new(&mem, QSIZE);
    assert_eq!(bring_up(&mut t, &d, QSIZE) & DRIVER_OK, DRIVER_OK);
    d.write(used_event, &10u16.to_le_bytes());
    add_flush(&mut d);
    t.process_queue(0);
    assert_eq!(d.used_idx(), 1);
    assert_eq!(irq.status(), INT_USED_RING);
}

/// The guest reads and acknowledges the interrupt status while the device
/// thread holds the transport (processing a batch): neither waits for it. The
/// other registers still go through the transport.
#[test]
fn interrupt_status_is_read_and_acknowledged_while_the_transport_is_busy() {
    use std::sync::{mpsc, Arc, Mutex};
    use vigil_devices::virtio::mmio::MmioBusDevice;

    let mem = memory(1 << 20);
    let (t, irq, _) = transport(rng(), &mem);
    let t = Arc::new(Mutex::new(t));
    let mut bus = MmioBusDevice::new(t.clone());
    irq.signal(INT_USED_RING);

    let busy = t.lock().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        let mut word = [0u8; 4];
        bus.read(0x60, &mut word);
        let seen = u32::from_le_bytes(word);
        bus.write(0x64, &seen.to_le_bytes());
        tx.send(seen).unwrap();
        // The magic value needs the transport.
        bus.read(0x00, &mut word);
        u32::from_le_bytes(word)
    });
    let seen = rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("the interrupt status was read without the transport's lock");
    assert_eq!(seen, INT_USED_RING);
    assert_eq!(irq.status(), 0, "acknowledged");
    drop(busy);
    assert_eq!(reader.join().unwrap(), 0x7472_6976);
}

/// Makes a virtio-blk flush request available.
fn add_flush(d: &mut Driver) {
    let mut h = [0u8; 16];
    h[0] = 4; // VIRTIO_BLK_T_FLUSH
    d.write(BUF, &h);
    d.add(&[(BUF, 16, 0), (BUF + 16, 1, F_WRITE)]);
}

/// `vring_need_event`: whether a driver that moved its available index from
/// `old` to `new` notifies, given the device's `avail_event`.
fn driver_notifies(avail_event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(avail_event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// While the device event loop polls the rings, the transport serves what the
/// driver adds without a notification and asks the driver not to send one
/// (with event indices `avail_event` stays behind the device; without them
/// the used ring's NO_NOTIFY flag); when the poll ends notifications are asked
/// for again, and what was added meanwhile is served.
#[test]
fn a_polling_device_loop_serves_new_entries_and_asks_for_no_notifications() {
    use vigil_devices::virtio::poll::polling;

    let mem = memory(1 << 20);
    let image = TempImage::new(&[0; 4096]);
    let mut d = Driver::new(&mem, QSIZE);
    let (mut t, _irq, evts) = transport(blk(&image), &mem);
    bring_up_queues(&mut t, F_VERSION_1 | F_EVENT_IDX, &[&d], QSIZE);
    let avail_event = |d: &Driver| {
        let at = d.used_addr + 4 + 8 * u64::from(QSIZE);
        u16::from_le_bytes(d.read(at, 2).try_into().unwrap())
    };

    let guard = polling();
    assert!(!t.poll(), "nothing available yet");
    assert!(
        !driver_notifies(avail_event(&d), 1, 0),
        "asked not to notify"
    );
    add_flush(&mut d);
    add_flush(&mut d);
    assert!(t.poll(), "two entries seen without a notification");
    assert_eq!(d.used_idx(), 2);
    // The pass that emptied the queue did not ask for notifications again.
    assert!(!driver_notifies(avail_event(&d), 3, 2));
    assert!(!t.poll(), "nothing new: not processed again");
    assert!(
        evts[0].read().is_err(),
        "nothing handed back to the event loop"
    );
    drop(guard);

    // Added after the last look, before the poll ends: served by the end.
    add_flush(&mut d);
    t.end_poll();
    assert_eq!(d.used_idx(), 3);
    assert_eq!(avail_event(&d), 3, "notifications asked for again");
    assert!(driver_notifies(avail_event(&d), 4, 3));

    // Without event indices: the used ring's flags.
    let mut d = Driver::new(&mem, QSIZE);
    let (mut t, _irq, _evts) = transport(blk(&image), &mem);
    assert_eq!(bring_up(&mut t, &d, QSIZE) & DRIVER_OK, DRIVER_OK);
    let flags = |d: &Driver| u16::from_le_bytes(d.read(d.used_addr, 2).try_into().unwrap());
    let guard = polling();
    add_flush(&mut d);
    assert!(t.poll());
    assert_eq!(d.used_idx(), 1);
    assert_eq!(flags(&d), 1, "VRING_USED_F_NO_NOTIFY while polled");
    drop(guard);
    t.end_poll();
    assert_eq!(flags(&d), 0, "notifications on again");
}

/// A device the poll finds throttled is handed back to the event loop (its
/// queue's eventfd signalled), whose subscriber arms the retry timer: the
/// poll itself cannot. Until that timer processes the queue the poll leaves it
/// alone, so a throttled device does not keep the loop spinning (CI saw that:
/// each poll's end processed the waiting entry again and signalled again).
#[test]
fn a_throttled_device_found_by_the_poll_goes_back_to_the_event_loop() {
    use vigil_devices::virtio::poll::polling;

    let mem = memory(1 << 20);
    let mut d = Driver::new(&mem, QSIZE);
    let limited = Rng::new(RateLimit {
        ops: Some((1, Some(1))),
        ..Default::default()
    });
    let (mut t, _irq, evts) = transport(Box::new(limited), &mem);
    assert_eq!(bring_up(&mut t, &d, QSIZE) & DRIVER_OK, DRIVER_OK);
    let guard = polling();
    assert!(!t.poll());
    d.add(&[(BUF, 8, F_WRITE)]);
    d.add(&[(BUF + 8, 8, F_WRITE)]);
    assert!(t.poll());
    assert_eq!(d.used_idx(), 1, "one operation allowed");
    assert_eq!(evts[0].read().unwrap(), 1, "the event loop is told");
    d.add(&[(BUF + 16, 8, F_WRITE)]);
    assert!(!t.poll(), "a waiting queue is not looked at");
    drop(guard);
    t.end_poll();
    assert_eq!(d.used_idx(), 1);
    assert!(evts[0].read().is_err(), "told once, not again");
}

/// What a driver reads of `t` through the register page must be what a read
/// that exits to the transport returns, word by word, registers and
/// configuration space alike.
fn assert_page_current(t: &mut MmioTransport, page: &RegisterPage, when: &str) {
    for offset in (0..MMIO_WINDOW).step_by(4) {
        assert_eq!(
            page.load(offset),
            read32(t, offset),
            "{when}: word {offset:#x} of the register page"
        );
    }
}

/// A transport whose registers KVM would map read-only: the page stays equal to
/// the registers through negotiation, queue selection, interrupts and their
/// acknowledgement, a device that needs a reset, the reset, and a restore.
#[test]
fn the_register_page_follows_every_register_the_guest_reads() {
    let mem = memory(1 << 20);
    let image = TempImage::new(&[0x5a; 8192]);
    let page = Arc::new(RegisterPage::new().unwrap());
    let irq_fd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let irq = Arc::new(Interrupt::in_page(irq_fd, page.clone()));
    let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let mut t = MmioTransport::new(blk(&image), mem.clone(), irq.clone(), vec![evt]).unwrap();
    assert_eq!(page.load(0x00), 0x7472_6976, "magic before any access");
    assert_eq!(page.load(0x100), 16, "capacity in sectors");
    assert_page_current(&mut t, &page, "new");

    let mut d = Driver::new(&mem, QSIZE);
    assert_eq!(bring_up(&mut t, &d, QSIZE), 15);
    assert_page_current(&mut t, &page, "driver ok");
    for sel in [1, u32::MAX, 0] {
        write32(&mut t, 0x14, sel);
        write32(&mut t, 0x30, sel);
        assert_page_current(&mut t, &page, &format!("selectors {sel:#x}"));
    }

    // A flush, used: the status bit is in the page, and the acknowledgement
    // (which the MMIO bus takes without the transport's lock) clears it.
    add_flush(&mut d);
    t.process_queue(0);
    assert_eq!(d.used_idx(), 1);
    assert_eq!(page.load(0x60), INT_USED_RING);
    assert_page_current(&mut t, &page, "interrupted");
    let shared = Arc::new(Mutex::new(t));
    MmioBusDevice::new(shared.clone()).write(0x64, &INT_USED_RING.to_le_bytes());
    assert_eq!(page.load(0x60), 0, "acknowledged");
    let mut t = Arc::into_inner(shared).unwrap().into_inner().unwrap();

    // The device thread breaks the device: the guest reads DEVICE_NEEDS_RESET.
    d.set_avail_idx(QSIZE + 5);
    t.process_queue(0);
    assert_ne!(page.load(0x70) & DEVICE_NEEDS_RESET, 0);
    assert_eq!(page.load(0x60), INT_CONFIG);
    assert_page_current(&mut t, &page, "needs reset");
    write32(&mut t, 0x70, 0);
    assert_eq!(page.load(0x70), 0);
    assert_page_current(&mut t, &page, "reset");

    // Restored into a fresh page: the saved registers are there before any access.
    let d = Driver::new(&mem, QSIZE);
    assert_eq!(bring_up(&mut t, &d, QSIZE), 15);
    irq.signal(INT_CONFIG);
    let state = t.state();
    let restored_page = Arc::new(RegisterPage::new().unwrap());
    let irq_fd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let irq = Arc::new(Interrupt::in_page(irq_fd, restored_page.clone()));
    let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let mut t =
        MmioTransport::restore(&state, state.restore_device().unwrap(), mem, irq, vec![evt])
            .unwrap();
    assert_eq!(restored_page.load(0x70), 15);
    assert_eq!(restored_page.load(0x60), INT_CONFIG);
    assert_page_current(&mut t, &restored_page, "restored");
}
