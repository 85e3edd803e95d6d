//! virtio-blk driven from the driver's side of a split queue: every request type,
//! and the malformed or hostile requests a guest can make.

mod common;

use common::{memory, Driver, TempImage, F_INDIRECT, F_NEXT, F_WRITE};
use vigil_devices::virtio::block::{Block, S_IOERR, S_OK, S_UNSUPP};
use vigil_devices::virtio::{QueueOutcome, VirtioDevice};
use vigil_devices::GuestMemoryMmap;
use vigil_model::config::DriveConfig;
use vigil_model::config::RateLimit;

const SECTORS: usize = 16;
const HDR: u64 = 0x1000;
const DATA: u64 = 0x2000;
const STATUS: u64 = 0xf000;
const QSIZE: u16 = 16;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;

fn pattern() -> Vec<u8> {
    (0..SECTORS * 512)
        .map(|i| (i * 7 + i / 512) as u8)
        .collect()
}

fn block(image: &TempImage, read_only: bool) -> Block {
    Block::new(&DriveConfig {
        path: image.0.clone(),
        read_only,
        id: "vigil-disk-0".into(),
        rate_limit: RateLimit::default(),
        ..Default::default()
    })
    .unwrap()
}

struct Rig {
    mem: GuestMemoryMmap,
    image: TempImage,
}

impl Rig {
    fn new() -> Self {
        Rig {
            mem: memory(1 << 20),
            image: TempImage::new(&pattern()),
        }
    }
}

fn header(d: &Driver, kind: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&kind.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    d.write(HDR, &h);
}

fn range(sector: u64, sectors: u32, flags: u32) -> Vec<u8> {
    let mut r = sector.to_le_bytes().to_vec();
    r.extend(sectors.to_le_bytes());
    r.extend(flags.to_le_bytes());
    r
}

/// Serves everything available; returns how it ended.
fn process(dev: &mut Block, q: &mut virtio_queue::Queue, mem: &GuestMemoryMmap) -> QueueOutcome {
    dev.process_queue(0, q, mem).expect("device broken")
}

/// A request's data descriptor: its length and whether the device writes it.
type Data = Option<(u32, bool)>;

/// Submits one request: a header, then `data` (device-writable or not), then a
/// status byte. Returns (status byte, used length).
fn request(
    dev: &mut Block,
    d: &mut Driver,
    q: &mut virtio_queue::Queue,
    kind: u32,
    sector: u64,
    data: Data,
) -> (u8, u32) {
    header(d, kind, sector);
    d.write(STATUS, &[0xee]);
    let mut descs = vec![(HDR, 16, 0)];
    if let Some((len, writable)) = data {
        descs.push((DATA, len, if writable { F_WRITE } else { 0 }));
    }
    descs.push((STATUS, 1, F_WRITE));
    let head = d.add(&descs);
    let before = d.used_idx();
    assert_eq!(process(dev, q, d.mem), QueueOutcome::Done(true));
    assert_eq!(d.used_idx(), before.wrapping_add(1));
    let (id, len) = d.used(before);
    assert_eq!(id, u32::from(head));
    (d.read(STATUS, 1)[0], len)
}

#[test]
fn read_write_flush_get_id() {
    let rig = Rig::new();
    let mut dev = block(&rig.image, false);
    assert_eq!(dev.capacity(), SECTORS as u64);
    let mut d = Driver::new(&rig.mem, QSIZE);
    let mut q = d.queue();

    // IN: two sectors from sector 2.
    let r = request(&mut dev, &mut d, &mut q, T_IN, 2, Some((1024, true)));
    assert_eq!(r, (S_OK, 1025));
    assert_eq!(d.read(DATA, 1024), pattern()[1024..2048]);

    // OUT: one sector to sector 5.
    d.write(DATA, &[0xab; 512]);
    let r = request(&mut dev, &mut d, &mut q, T_OUT, 5, Some((512, false)));
    assert_eq!(r, (S_OK, 1));
    let mut want = pattern();
    want[5 * 512..6 * 512].fill(0xab);
    assert_eq!(rig.image.bytes(), want);

    // FLUSH.
    assert_eq!(
        request(&mut dev, &mut d, &mut q, T_FLUSH, 0, None),
        (S_OK, 1)
    );

    // GET_ID: the id, zero-padded to 20 bytes.
    d.write(DATA, &[0xff; 20]);
    let r = request(&mut dev, &mut d, &mut q, T_GET_ID, 0, Some((20, true)));
    assert_eq!(r, (S_OK, 21));
    let mut id = b"vigil-disk-0".to_vec();
    id.resize(20, 0);
    assert_eq!(d.read(DATA, 20), id);

    // An IN chain split over several descriptors, the status in its own.
    header(&d, T_IN, 0);
    let head = d.add(&[
        (HDR, 16, 0),
        (DATA, 100, F_WRITE),
        (DATA + 0x1000, 412, F_WRITE),
        (STATUS, 1, F_WRITE),
    ]);
    assert_eq!(
        process(&mut dev, &mut q, &rig.mem),
        QueueOutcome::Done(true)
    );
    assert_eq!(d.used(d.used_idx() - 1), (u32::from(head), 513));
    assert_eq!(d.read(DATA, 100), want[..100]);
    assert_eq!(d.read(DATA + 0x1000, 412), want[100..512]);
    assert_eq!(d.read(STATUS, 1), [S_OK]);
    assert_eq!(dev.counters(), (5, 0));
}

#[test]
fn discard_and_write_zeroes() {
    let rig = Rig::new();
    let mut dev = block(&rig.image, false);
    let mut d = Driver::new(&rig.mem, QSIZE);
    let mut q = d.queue();

    // WRITE_ZEROES over sectors 3..5 (no unmap) and 9 (unmap allowed).
    let mut ranges = range(3, 2, 0);
    ranges.extend(range(9, 1, 1));
    d.write(DATA, &ranges);
    let r = request(
        &mut dev,
        &mut d,
        &mut q,
        T_WRITE_ZEROES,
        0,
        Some((32, false)),
    );
    assert_eq!(r, (S_OK, 1));
    let mut want = pattern();
    want[3 * 512..5 * 512].fill(0);
    want[9 * 512..10 * 512].fill(0);
    assert_eq!(rig.image.bytes(), want);

    // DISCARD: succeeds and keeps the image size (the data may or may not stay).
    d.write(DATA, &range(12, 4, 0));
    let r = request(&mut dev, &mut d, &mut q, T_DISCARD, 0, Some((16, false)));
    assert_eq!(r, (S_OK, 1));
    let now = rig.image.bytes();
    assert_eq!(now.len(), SECTORS * 512);
    assert_eq!(now[..12 * 512], want[..12 * 512]);

    // A zero-sector range is in bounds and does nothing.
    d.write(DATA, &range(SECTORS as u64, 0, 0));
    let r = request(
        &mut dev,
        &mut d,
        &mut q,
        T_WRITE_ZEROES,
        0,
        Some((16, false)),
    );
    assert_eq!(r, (S_OK, 1));
}

#[test]
fn out_of_range_and_unaligned_requests_fail_with_ioerr() {
    let rig = Rig::new();
    let mut dev = block(&rig.image, false);
    let mut d = Driver::new(&rig.mem, QSIZE);
    let mut q = d.queue();
    let last = SECTORS as u64 - 1;

    let cases: &[(u32, u64, Data)] = &[
        (T_IN, last, Some((1024, true))), // runs past the end
        (T_IN, SECTORS as u64, Some((512, true))),
        (T_IN, u64::MAX, Some((512, true))), // sector + length overflows
        (T_IN, u64::MAX / 512, Some((512, true))),
        (T_IN, 0, Some((100, true))), // not a multiple of 512
        (T_IN, 0, Some((513, true))),
        (T_OUT, last, Some((1024, false))),
        (T_OUT, u64::MAX, Some((512, false))),
        (T_OUT, 0, Some((511, false))),
        (T_OUT, 0, Some((513, false))),
    ];
    for &(kind, sector, data) in cases {
        let r = request(&mut dev, &mut d, &mut q, kind, sector, data);
        assert_eq!(r, (S_IOERR, 1), "type {kind} sector {sector} data {data:?}");
    }

    let bad_ranges: &[Vec<u8>] = &[
        range(last, 2, 0),         // past the end
        range(u64::MAX, 1, 0),     // overflows
        range(0, 0x40_0000, 0),    // more than max_discard_sectors
        Vec::new(),                // no segment at all
        range(0, 1, 0).repeat(17), // more than max_discard_seg
        vec![0; 15],               // a truncated segment
        // A good segment, then a bad one: all are checked before any is done.
        [range(2, 2, 0), range(last, 2, 0)].concat(),
    ];
    for ranges in bad_ranges {
        for kind in [T_DISCARD, T_WRITE_ZEROES] {
            d.write(DATA, ranges);
            let data = (!ranges.is_empty()).then_some((ranges.len() as u32, false));
            let r = request(&mut dev, &mut d, &mut q, kind, 0, data);
            assert_eq!(r, (S_IOERR, 1), "type {kind} ranges {ranges:?}");
        }
    }
    assert_eq!(rig.image.bytes(), pattern(), "nothing was zeroed");
    let (requests, errors) = dev.counters();
    assert_eq!(requests, errors);
}

#[test]
fn read_only_disk_refuses_writes_and_keeps_the_file() {
    let rig = Rig::new();
    let mut dev = block(&rig.image, true);
    assert_ne!(dev.features() & (1 << 5), 0, "VIRTIO_BLK_F_RO");
    assert_eq!(
        dev.features() & (1 << 13 | 1 << 14),
        0,
        "no discard/write-zeroes"
    );
    let mut d = Driver::new(&rig.mem, QSIZE);
    let mut q = d.queue();

    d.write(DATA, &[0x11; 512]);
    let r = request(&mut dev, &mut d, &mut q, T_OUT, 0, Some((512, false)));
    assert_eq!(r, (S_IOERR, 1));
    d.write(DATA, &range(0, 1, 0));
    for kind in [T_DISCARD, T_WRITE_ZEROES] {
        let r = request(&mut dev, &mut d, &mut q, kind, 0, Some((16, false)));
        assert_eq!(r, (S_IOERR, 1));
    }
    // Reads and flushes still work.
    let r = request(&mut dev, &mut d, &mut q, T_IN, 1, Some((512, true)));
    assert_eq!(r, (S_OK, 513));
    assert_eq!(d.read(DATA, 512), pattern()[512..1024]);
    assert_eq!(
        request(&mut dev, &mut d, &mut q, T_FLUSH, 0, None),
        (S_OK, 1)
    );
    assert_eq!(rig.image.bytes(), pattern());
}

#[test]
fn unknown_request_types_are_unsupported() {
    let rig = Rig::new();
    let mut dev = block(&rig.image, false);
    let mut d = Driver::new(&rig.mem, QSIZE);
    let mut q = d.queue();
    for kind in [2, 3, 5, 7, 9, 12, 14, 0x8000_0000, u32::MAX] {
        let r = request(&mut dev, &mut d, &mut q, kind, 0, Some((512, true)));
        assert_eq!(r, (S_UNSUPP, 1), "type {kind}");
    }
    assert_eq!(rig.image.bytes(), pattern());
}

/// Submits `descs` as one chain and processes it; returns the used length.
fn submit_raw(
    dev: &mut Block,
    d: &mut Driver,
    q: &mut virtio_queue::Queue,
    descs: &[(u64, u32, u16)],
) -> u32 {
    let head = d.add(descs);
    let before = d.used_idx();
    assert_eq!(process(dev, q, d.mem), QueueOutcome::Done(true));
    assert_eq!(d.used_idx(), before.wrapping_add(1));
    let (id, len) = d.used(before);
    assert_eq!(id, u32::from(head));
    len
}

#[test]
fn malformed_chains_complete_with_nothing_written_and_the_device_goes_on() {
    let rig = Rig::new();
    let mut dev = block(&rig.image, false);
    let mut d = Driver::new(&rig.mem, QSIZE);
    let mut q = d.queue();
    let end = rig.mem_end();

    let chains: Vec<Vec<(u64, u32, u16)>> = vec![
        // No status byte: nothing device-writable.
        vec![(HDR, 16, 0)],
        vec![(HDR, 16, 0), (DATA, 512, 0)],
        // Header too short (and split oddly).
        vec![(HDR, 8, 0), (STATUS, 1, F_WRITE)],
        vec![(STATUS, 1, F_WRITE)],
        // Descriptors outside guest memory, or running past its end.
        vec![(end, 16, 0), (STATUS, 1, F_WRITE)],
        vec![(end - 8, 16, 0), (STATUS, 1, F_WRITE)],
        vec![(HDR, 16, 0), (end - 4, 512, F_WRITE), (STATUS, 1, F_WRITE)],
        vec![
            (HDR, 16, 0),
            (STATUS, 1, F_WRITE),
            (u64::MAX - 1, 1, F_WRITE),
        ],
        vec![(HDR, 16, 0), (u64::MAX, u32::MAX, F_WRITE)],
        // The status byte would lie past the end of the address space.
        vec![(HDR, 16, 0), (u64::MAX - 8, 513, F_WRITE)],
    ];
    header(&d, T_IN, 0);
    for chain in &chains {
        d.write(STATUS, &[0xee]);
        assert_eq!(submit_raw(&mut dev, &mut d, &mut q, chain), 0, "{chain:x?}");
        assert_eq!(d.read(STATUS, 1), [0xee], "{chain:x?}");
    }

    // A chain whose "next" loops back on itself ends after queue-size descriptors.
    d.write_desc(0, HDR, 16, F_NEXT, 0);
    d.publish(0);
    assert_eq!(
        process(&mut dev, &mut q, &rig.mem),
        QueueOutcome::Done(true)
    );
    assert_eq!(d.used(d.used_idx() - 1), (0, 0));

    // A next index beyond the table ends the chain.
    d.write_desc(0, HDR, 16, F_NEXT, 1000);
    d.publish(0);
    assert_eq!(
        process(&mut dev, &mut q, &rig.mem),
        QueueOutcome::Done(true)
    );
    assert_eq!(d.used(d.used_idx() - 1), (0, 0));

    // The device still serves a good request.
    let r = request(&mut dev, &mut d, &mut q, T_IN, 3, Some((512, true)));
    assert_eq!(r, (S_OK, 513));
    assert_eq!(d.read(DATA, 512), pattern()[3 * 512..4 * 512]);
}

/// Reads and writes go straight to the image when their header lies in the
/// first device-readable buffer (with the data written after it, if it shares
/// that buffer); a header split over two buffers takes the longer way, through
/// virtio-queue's reader, to the same effect.
#[test]
fn headers_split_or_sharing_a_buffer_with_data_are_served_too() {
    let rig = Rig::new();
    let mut dev = block(&rig.image, false);
    let mut d = Driver::new(&rig.mem, QSIZE);
    let mut q = d.queue();

    header(&d, T_IN, 2);
    d.write(STATUS, &[0xee]);
    let chain = [
        (HDR, 8, 0),
        (HDR + 8, 8, 0),
        (DATA, 1024, F_WRITE),
        (STATUS, 1, F_WRITE),
    ];
    assert_eq!(submit_raw(&mut dev, &mut d, &mut q, &chain), 1025);
    assert_eq!(d.read(STATUS, 1), [S_OK]);
    assert_eq!(d.read(DATA, 1024), pattern()[2 * 512..4 * 512]);

    // A write whose data follows the header in the same buffer.
    header(&d, T_OUT, 5);
    d.write(HDR + 16, &[0x3c; 512]);
    d.write(STATUS, &[0xee]);
    let chain = [(HDR, 16 + 512, 0), (STATUS, 1, F_WRITE)];
    assert_eq!(submit_raw(&mut dev, &mut d, &mut q, &chain), 1);
    assert_eq!(d.read(STATUS, 1), [S_OK]);
    let mut expected = pattern();
    expected[5 * 512..6 * 512].fill(0x3c);
    assert_eq!(rig.image.bytes(), expected);
}

impl Rig {
    fn mem_end(&self) -> u64 {
        1 << 20
    }
}

#[test]
fn indirect_tables_are_followed_once_and_never_nested() {
    let rig = Rig::new();
    let mut dev = block(&rig.image, false);
    let mut d = Driver::new(&rig.mem, QSIZE);
    let mut q = d.queue();
    const TABLE: u64 = 0x8000;
    let table = |d: &Driver, entries: &[(u64, u32, u16, u16)]| {
        let mut bytes = Vec::new();
        for &(addr, len, flags, next) in entries {
            bytes.extend(addr.to_le_bytes());
            bytes.extend(len.to_le_bytes());
            bytes.extend(flags.to_le_bytes());
            bytes.extend(next.to_le_bytes());
        }
        d.write(TABLE, &bytes);
        bytes.len() as u32
    };

    // A well-formed indirect chain is served.
    header(&d, T_IN, 4);
    let len = table(
        &d,
        &[
            (HDR, 16, F_NEXT, 1),
            (DATA, 512, F_NEXT | F_WRITE, 2),
            (STATUS, 1, F_WRITE, 0),
        ],
    );
    assert_eq!(
        submit_raw(&mut dev, &mut d, &mut q, &[(TABLE, len, F_INDIRECT)]),
        513
    );
    assert_eq!(d.read(DATA, 512), pattern()[4 * 512..5 * 512]);

    // An indirect descriptor inside an indirect table ends the chain.
    d.write(STATUS, &[0xee]);
    let len = table(&d, &[(HDR, 16, F_NEXT, 1), (TABLE, 48, F_INDIRECT, 0)]);
    assert_eq!(
        submit_raw(&mut dev, &mut d, &mut q, &[(TABLE, len, F_INDIRECT)]),
        0
    );
    // A table whose length is not a multiple of 16, or outside memory.
    for (addr, len) in [(TABLE, 17), (1 << 40, 48), (TABLE, 0)] {
        assert_eq!(
            submit_raw(&mut dev, &mut d, &mut q, &[(addr, len, F_INDIRECT)]),
            0
        );
    }
    assert_eq!(d.read(STATUS, 1), [0xee]);
}

#[test]
fn avail_index_beyond_the_queue_size_breaks_the_device() {
    let rig = Rig::new();
    let mut dev = block(&rig.image, false);
    let mut d = Driver::new(&rig.mem, QSIZE);
    let mut q = d.queue();
    d.set_avail_idx(QSIZE + 1);
    let err = dev.process_queue(0, &mut q, &rig.mem).unwrap_err();
    assert!(err.0.contains("ahead"), "{err:?}");
    assert_eq!(d.used_idx(), 0);
    // Exactly a queue's worth is fine (and served as malformed chains).
    let mut d = Driver::new(&rig.mem, QSIZE);
    let mut q = d.queue();
    d.set_avail_idx(QSIZE);
    assert_eq!(
        process(&mut dev, &mut q, &rig.mem),
        QueueOutcome::Done(true)
    );
    assert_eq!(d.used_idx(), QSIZE);
}

#[test]
fn head_index_beyond_the_queue_size_breaks_the_device() {
    let rig = Rig::new();
    let mut dev = block(&rig.image, false);
    let mut d = Driver::new(&rig.mem, QSIZE);
    let mut q = d.queue();
    d.publish(QSIZE);
    let err = dev.process_queue(0, &mut q, &rig.mem).unwrap_err();
    // Refused before it is served, not when its used entry cannot be written.
    assert!(err.0.contains(&format!("chain {QSIZE}")), "{err:?}");
    assert_eq!(d.used_idx(), 0);
}

#[test]
fn config_space_reads_clamp_at_its_end() {
    let rig = Rig::new();
    let dev = block(&rig.image, false);
    let mut b = [0xffu8; 8];
    dev.read_config(0, &mut b);
    assert_eq!(u64::from_le_bytes(b), SECTORS as u64);
    let mut b = [0xffu8; 4];
    dev.read_config(20, &mut b);
    assert_eq!(u32::from_le_bytes(b), 512, "blk_size");
    // Past the end: the transport zero-fills, the device leaves it alone.
    for (offset, len) in [(58, 8), (60, 4), (0xeff, 1), (u64::MAX, 8), (1, 0)] {
        let mut b = vec![0u8; len];
        dev.read_config(offset, &mut b);
        assert!(b.iter().all(|&x| x == 0), "{offset} {len}");
    }
}

/// Submits the request whose header is at HDR, with `len` bytes of data the device
/// reads: the device must hold it back. Returns how long it asks to wait.
fn throttled(
    dev: &mut Block,
    d: &mut Driver,
    q: &mut virtio_queue::Queue,
    len: u32,
) -> std::time::Duration {
    d.add(&[(HDR, 16, 0), (DATA, len, 0), (STATUS, 1, F_WRITE)]);
    let before = d.used_idx();
    let outcome = process(dev, q, d.mem);
    assert_eq!(
        d.used_idx(),
        before,
        "the throttled request stays available"
    );
    match outcome {
        QueueOutcome::RetryAfter(wait, false) => wait,
        other => panic!("not throttled: {other:?}"),
    }
}

#[test]
fn write_limit_throttles_writes_but_not_reads() {
    let rig = Rig::new();
    let one_write = RateLimit {
        ops: Some((1, Some(1))),
        ..Default::default()
    };
    let mut dev = Block::new(&DriveConfig {
        path: rig.image.0.clone(),
        id: "limited".into(),
        write_limit: one_write,
        ..Default::default()
    })
    .unwrap();
    let mut d = Driver::new(&rig.mem, QSIZE);
    let mut q = d.queue();
    // Reads are not limited: many pass.
    for _ in 0..5 {
        let r = request(&mut dev, &mut d, &mut q, T_IN, 0, Some((512, true)));
        assert_eq!(r, (S_OK, 513));
    }
    // The first write uses the write bucket's one token; the second must wait.
    let r = request(&mut dev, &mut d, &mut q, T_OUT, 1, Some((512, false)));
    assert_eq!(r, (S_OK, 1));
    header(&d, T_OUT, 2);
    assert!(throttled(&mut dev, &mut d, &mut q, 512) > std::time::Duration::ZERO);

    // A read limit leaves writes alone.
    let mut dev = Block::new(&DriveConfig {
        path: rig.image.0.clone(),
        id: "limited".into(),
        read_limit: one_write,
        ..Default::default()
    })
    .unwrap();
    let mut d = Driver::new(&rig.mem, QSIZE);
    let mut q = d.queue();
    for sector in 0..3 {
        let r = request(&mut dev, &mut d, &mut q, T_OUT, sector, Some((512, false)));
        assert_eq!(r, (S_OK, 1));
    }
}

#[test]
fn write_zeroes_is_charged_the_bytes_it_zeroes_and_discard_only_an_operation() {
    let rig = Rig::new();
    // 4 KiB/s with a 4 KiB burst, on the overall bucket, then on the write bucket.
    let small = RateLimit {
        bandwidth: Some((4096, Some(4096))),
        ..Default::default()
    };
    for (rate_limit, write_limit) in [(small, RateLimit::default()), (RateLimit::default(), small)]
    {
        let mut dev = Block::new(&DriveConfig {
            path: rig.image.0.clone(),
            id: "limited".into(),
            rate_limit,
            write_limit,
            ..Default::default()
        })
        .unwrap();
        let mut d = Driver::new(&rig.mem, QSIZE);
        let mut q = d.queue();
        // Discards free storage: however large, they cost no bandwidth.
        let one_range = Some((16, false));
        d.write(DATA, &range(0, SECTORS as u32, 0));
        for _ in 0..4 {
            let r = request(&mut dev, &mut d, &mut q, T_DISCARD, 0, one_range);
            assert_eq!(r, (S_OK, 1));
        }
        // A 16-byte range that zeroes 8 KiB: let through on a full bucket (as any
        // request larger than the burst), and it leaves the bucket 4 KiB in debt.
        let r = request(&mut dev, &mut d, &mut q, T_WRITE_ZEROES, 0, one_range);
        assert_eq!(r, (S_OK, 1));
        d.write(DATA, &range(0, 1, 0));
        header(&d, T_WRITE_ZEROES, 0);
        let wait = throttled(&mut dev, &mut d, &mut q, 16);
        assert!(wait >= std::time::Duration::from_millis(900), "{wait:?}");
    }
}
