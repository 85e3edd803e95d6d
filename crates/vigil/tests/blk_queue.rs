//! virtio-blk with many requests in flight: the test guest's `blk-bench` keeps
//! `blk_qd=` requests queued, and the metrics file shows what the device saw
//! (requests, used-buffer interrupts) with and without
//! `VIRTIO_F_RING_EVENT_IDX`, over virtio-mmio and virtio-pci. `blk-mq` drives a
//! disk of several request queues (`--disk num_queues=`).

mod common;

use common::blk_bench::{bench, run_on_disk, Bench, Files};
use common::{integrity_byte, run, TIMEOUT};

fn assert_deep_queue_batches(b: &Bench) {
    assert_eq!(b.figure("qd"), 32);
    assert_eq!(
        b.figure("max_in_flight"),
        32,
        "the driver kept 32 in flight"
    );
    assert_eq!(b.figure("event_idx"), 1, "EVENT_IDX negotiated");
    assert_eq!(b.requests(), 2 * b.figure("requests"), "{}", b.block);
    let interrupts = b.metric("interrupts");
    assert!(
        interrupts > 0 && interrupts < b.requests(),
        "{interrupts} interrupts for {} requests: {}",
        b.requests(),
        b.block
    );
}

/// Both engines; `blk_requests=` sets how many requests go each way. The
/// guest's requests are sequential: both engines move runs of them together
/// (`merged`), reads of the sparse image's holes without reading it.
#[test]
fn at_queue_depth_32_with_event_idx_interrupts_come_per_batch() {
    // The image is fresh and sparse, and the reads come before the writes:
    // each lies in a hole, answered without reading the image (where the
    // filesystem tells holes from data).
    let hole_reads = if temp_dir_reports_holes() { 6000 } else { 0 };
    for engine in ["sync", "async"] {
        let b = bench(
            &format!("qd32-{engine}"),
            "blk_qd=32 blk_requests=6000",
            &[],
            &format!("io_engine={engine}"),
        );
        assert_deep_queue_batches(&b);
        assert_eq!(b.figure("requests"), 6000);
        assert_eq!(b.metric("read_bytes"), 6000 * 4096, "{}", b.block);
        let merged = b.metric("merged");
        assert!(
            merged > 0 && merged < b.requests(),
            "{engine}: {merged} of {} requests merged: {}",
            b.requests(),
            b.block
        );
        assert_eq!(b.metric("hole_reads"), hole_reads, "{engine}: {}", b.block);
    }
}

/// Whether the filesystem of the temporary directory, where the images are,
/// says where a sparse file's holes are (`SEEK_DATA` finds no data in a file
/// never written); one that cannot reports all of it as data.
fn temp_dir_reports_holes() -> bool {
    use std::os::fd::AsRawFd;
    let path = std::env::temp_dir().join(format!("vigil-blkq-{}-holes", std::process::id()));
    let file = std::fs::File::create_new(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    file.set_len(1 << 20).unwrap();
    // SAFETY: lseek on a descriptor of our own.
    let data = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_DATA) };
    if data >= 0 {
        eprintln!("{}: no holes reported; reads read", path.display());
    }
    data < 0
}

#[test]
fn over_pci_with_msix_event_idx_batches_interrupts_too() {
    for engine in ["sync", "async"] {
        let b = bench(
            &format!("pci-{engine}"),
            "blk_qd=32",
            &["--enable-pci"],
            &format!("io_engine={engine}"),
        );
        assert_deep_queue_batches(&b);
    }
}

/// A driver that does not negotiate EVENT_IDX: every processed batch raises the
/// interrupt. One request at a time and the device loop not polling, a batch
/// is the request whose notification woke the device, and also the driver's
/// next one where the driver made it available before the pass ended: this
/// guest sees its completion at once (it reads the used ring and, from the
/// register page, the interrupt status without an exit), so that happens for
/// 5-10% of requests on a quiet host; a loaded one preempts the device thread
/// mid-pass more often. So between one interrupt per two requests and one per
/// request, every request notified.
#[test]
fn without_event_idx_every_batch_interrupts() {
    let b = bench(
        "noevidx1",
        "blk_qd=1 blk_event_idx=0",
        &["--io-poll-us", "0"],
        "io_engine=sync",
    );
    assert_eq!(b.figure("event_idx"), 0);
    assert_eq!(b.figure("max_in_flight"), 1);
    let (interrupts, requests) = (b.metric("interrupts"), b.requests());
    assert_eq!(b.metric("notifications"), requests, "{}", b.block);
    assert!(
        interrupts <= requests && interrupts >= requests / 2,
        "{interrupts} interrupts for {requests} requests: {}",
        b.block
    );

    let b = bench(
        "noevidx32",
        "blk_qd=32 blk_event_idx=0 blk_bs_kib=64 blk_pattern=rand",
        &[],
        "io_engine=async",
    );
    assert_eq!(b.figure("event_idx"), 0);
    assert_eq!(b.figure("max_in_flight"), 32);
    assert_eq!(b.figure("bs_kib"), 64);
    assert_eq!(b.metric("read_bytes"), b.figure("requests") * 65536);
    assert!(b.metric("interrupts") > 0, "{}", b.block);
}

/// 128 requests of three descriptors do not fit a 256-entry ring: each goes in
/// an indirect table of its own (`VIRTIO_F_RING_INDIRECT_DESC`), on both engines.
#[test]
fn at_queue_depth_128_requests_go_in_indirect_tables() {
    for engine in ["sync", "async"] {
        let b = bench(
            &format!("qd128-{engine}"),
            "blk_qd=128 blk_bs_kib=16",
            &[],
            &format!("io_engine={engine}"),
        );
        assert_eq!(b.figure("indirect"), 1);
        assert_eq!(b.figure("max_in_flight"), 128, "{engine}");
        assert_eq!(b.requests(), 2 * b.figure("requests"), "{}", b.block);
        assert_eq!(b.metric("read_bytes"), b.figure("requests") * 16384);
        assert!(b.metric("interrupts") < b.requests(), "{}", b.block);
    }
}

#[test]
fn bench_parameters_out_of_range_are_named() {
    for (params, expected) in [
        ("blk_qd=0", "blk_qd=0: expected 1 to 128"),
        ("blk_bs_kib=6", "blk_bs_kib=6: expected a multiple of 4"),
        ("blk_requests=0", "blk_requests=0: expected 1 to 10000000"),
        (
            "blk_pattern=zigzag",
            "blk_pattern=zigzag: expected seq or rand",
        ),
    ] {
        let files = Files::new("bad");
        let disk = format!("path={}", files.disk.display());
        let cmdline = format!("test=blk-bench {params}");
        let r = run(
            &[
                "run",
                "--memory",
                "128",
                "--disk",
                &disk,
                "--cmdline",
                &cmdline,
            ],
            TIMEOUT,
        );
        assert_eq!(
            r.line("TEST blk-bench "),
            format!("TEST blk-bench FAIL {expected}"),
            "{r}"
        );
    }
}

/// `--disk ...,io_engine=async`: the disk is served through io_uring, 32
/// requests in flight, and what the `blk` scenario writes and flushes reaches
/// the image.
#[test]
fn the_async_engine_serves_a_deep_queue_and_writes_reach_the_image() {
    let files = Files::new("async-run");
    let disk = format!("path={},io_engine=async", files.disk.display());
    let r = run(
        &[
            "run",
            "--log-level",
            "info",
            "--memory",
            "128",
            "--disk",
            &disk,
            "--cmdline",
            "test=blk-bench,blk blk_qd=32",
        ],
        TIMEOUT,
    );
    assert!(
        r.stderr
            .contains("io_engine Async: requests go to an io_uring"),
        "{r}"
    );
    let line = r.line("TEST blk-bench ");
    assert!(line.starts_with("TEST blk-bench PASS"), "{r}");
    assert!(line.contains(" max_in_flight=32 "), "{line}");
    assert!(r.line("TEST blk ").starts_with("TEST blk PASS"), "{r}");
    let bytes = std::fs::read(&files.disk).unwrap();
    // The `blk` scenario's pattern in sector 0 (guest/README.md).
    for (i, &byte) in bytes[..512].iter().enumerate() {
        assert_eq!(byte, ((i * 7 + 0x5a) & 0xff) as u8, "byte {i}");
    }
}

/// `--disk num_queues=4`: the guest negotiates `VIRTIO_BLK_F_MQ`, writes on
/// all four queues at once, flushes each, and reads every block back through
/// another queue; each queue's used ring gave back its 33 requests, the device
/// counted them all, and the image holds what was written. Over virtio-mmio
/// and virtio-pci (a vector per queue), on both engines.
#[test]
fn four_queues_each_complete_their_own_requests() {
    for (engine, transport) in [
        ("sync", None),
        ("async", None),
        ("sync", Some("--enable-pci")),
        ("async", Some("--enable-pci")),
    ] {
        let files = Files::new(&format!("mq-{engine}-{}", transport.is_some()));
        let options = format!("io_engine={engine},num_queues=4");
        let extra: Vec<&str> = transport.into_iter().collect();
        let (r, metrics) = run_on_disk(&files, &options, "test=blk-mq", &extra);
        let block = &metrics["block"];
        assert_eq!(
            r.line("TEST blk-mq "),
            "TEST blk-mq PASS queues=4 blocks=64 flush=1 per_queue=33,33,33,33",
            "{engine} {transport:?}: {r}"
        );
        assert_eq!(block["write_count"], 64, "{block}");
        assert_eq!(block["read_count"], 64, "{block}");
        assert_eq!(block["write_bytes"], 64 * 4096, "{block}");
        assert_eq!(block["other_count"], 4, "the flushes: {block}");
        assert_eq!(block["errors"], 0, "{block}");
        let bytes = std::fs::read(&files.disk).unwrap();
        for (b, chunk) in bytes[..64 * 4096].chunks(4096).enumerate() {
            for (i, &byte) in chunk.iter().enumerate() {
                assert_eq!(
                    byte,
                    integrity_byte(b as u64, i as u64),
                    "block {b} byte {i}"
                );
            }
        }
    }
}

/// `blk-bench` with `blk_queues=4` on a disk of four queues: slot `s` goes on
/// queue `s % 4`, all 32 in flight together, on both engines.
#[test]
fn blk_bench_spreads_its_requests_over_four_queues() {
    for engine in ["sync", "async"] {
        let b = bench(
            &format!("mq-bench-{engine}"),
            "blk_qd=32 blk_queues=4",
            &[],
            &format!("io_engine={engine},num_queues=4"),
        );
        assert_eq!(b.figure("queues"), 4, "{}", b.run);
        assert_eq!(b.figure("max_in_flight"), 32);
        assert_eq!(b.requests(), 2 * b.figure("requests"), "{}", b.block);
    }
}

/// A disk of one queue (the default) offers no `VIRTIO_BLK_F_MQ`: `blk-mq`
/// runs on queue 0 alone.
#[test]
fn one_queue_by_default() {
    let files = Files::new("mq-default");
    let disk = format!("path={}", files.disk.display());
    let r = run(
        &[
            "run",
            "--memory",
            "128",
            "--disk",
            &disk,
            "--cmdline",
            "test=blk-mq",
        ],
        TIMEOUT,
    );
    assert_eq!(
        r.line("TEST blk-mq "),
        "TEST blk-mq PASS queues=1 blocks=16 flush=1 per_queue=33",
        "{r}"
    );
}
