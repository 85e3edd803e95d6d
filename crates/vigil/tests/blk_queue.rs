//! virtio-blk with many requests in flight: the test guest's `blk-bench` keeps
//! `blk_qd=` requests queued, and the metrics file shows what the device saw
//! (requests, used-buffer interrupts) with and without
//! `VIRTIO_F_RING_EVENT_IDX`, over virtio-mmio and virtio-pci. `blk-mq` drives a
//! disk of several request queues (`--disk num_queues=`).

mod common;

use std::path::PathBuf;

use common::{integrity_byte, run, Run, TIMEOUT};

/// A fresh 64 MiB image and a metrics path, removed on drop.
struct Files {
    disk: PathBuf,
    metrics: PathBuf,
}

impl Files {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir();
        let pid = std::process::id();
        let disk = dir.join(format!("vigil-blkq-{pid}-{name}.img"));
        let metrics = dir.join(format!("vigil-blkq-{pid}-{name}.json"));
        std::fs::File::create(&disk)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        std::fs::remove_file(&metrics).ok();
        Files { disk, metrics }
    }
}

impl Drop for Files {
    fn drop(&mut self) {
        std::fs::remove_file(&self.disk).ok();
        std::fs::remove_file(&self.metrics).ok();
    }
}

/// What one `blk-bench` run reported: its PASS line's figures and the block
/// device's metrics.
struct Bench {
    figures: Vec<(String, u64)>,
    block: serde_json::Value,
    run: Run,
}

impl Bench {
    fn figure(&self, key: &str) -> u64 {
        self.figures
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| *v)
            .unwrap_or_else(|| panic!("no {key} in the PASS line\n{}", self.run))
    }

    fn metric(&self, key: &str) -> u64 {
        self.block[key]
            .as_u64()
            .unwrap_or_else(|| panic!("block.{key} missing: {}", self.block))
    }

    /// Reads and writes the device completed.
    fn requests(&self) -> u64 {
        self.metric("read_count") + self.metric("write_count")
    }
}

/// Runs `blk-bench` with `params` (and `extra` options) on a fresh image, the
/// disk with `options` (`io_engine=async`, ...).
fn bench(name: &str, params: &str, extra: &[&str], options: &str) -> Bench {
    let files = Files::new(name);
    let disk = format!("path={},{options}", files.disk.display());
    let cmdline = format!("test=blk-bench {params}");
    let mut args = vec![
        "run",
        "--memory",
        "128",
        "--disk",
        &disk,
        "--metrics-path",
        files.metrics.to_str().unwrap(),
        "--cmdline",
        &cmdline,
    ];
    args.extend_from_slice(extra);
    let run = run(&args, TIMEOUT);
    let line = run.line("TEST blk-bench ");
    assert!(line.starts_with("TEST blk-bench PASS"), "{run}");
    let figures = line
        .split_whitespace()
        .filter_map(|w| w.split_once('='))
        .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
        .collect();
    let text = std::fs::read_to_string(&files.metrics).expect("the metrics file");
    let m: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    Bench {
        figures,
        block: m["block"].clone(),
        run,
    }
}

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

/// Both engines.
#[test]
fn at_queue_depth_32_with_event_idx_interrupts_come_per_batch() {
    for engine in ["sync", "async"] {
        let b = bench(
            &format!("qd32-{engine}"),
            "blk_qd=32",
            &[],
            &format!("io_engine={engine}"),
        );
        assert_deep_queue_batches(&b);
    }
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
/// interrupt; one request at a time, that is one interrupt per request, but for
/// the rare pass that also takes the driver's next request (made available
/// while the device was still in the pass that completed the one before; a
/// loaded host preempts the device thread there). With event indices the same
/// run takes 0.6 to 0.8 interrupts per request (BENCHMARKS.md).
#[test]
fn without_event_idx_every_batch_interrupts() {
    let b = bench(
        "noevidx1",
        "blk_qd=1 blk_event_idx=0",
        &[],
        "io_engine=sync",
    );
    assert_eq!(b.figure("event_idx"), 0);
    assert_eq!(b.figure("max_in_flight"), 1);
    let (interrupts, requests) = (b.metric("interrupts"), b.requests());
    assert!(
        interrupts <= requests && interrupts >= requests - requests / 100,
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
        let disk = format!(
            "path={},io_engine={engine},num_queues=4",
            files.disk.display()
        );
        let mut args = vec![
            "run",
            "--memory",
            "128",
            "--disk",
            &disk,
            "--metrics-path",
            files.metrics.to_str().unwrap(),
            "--cmdline",
            "test=blk-mq",
        ];
        args.extend(transport);
        let r = run(&args, TIMEOUT);
        assert_eq!(
            r.line("TEST blk-mq "),
            "TEST blk-mq PASS queues=4 blocks=64 flush=1 per_queue=33,33,33,33",
            "{engine} {transport:?}: {r}"
        );
        let text = std::fs::read_to_string(&files.metrics).expect("the metrics file");
        let m: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        let block = &m["block"];
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

/// The device loop polls the rings after work and asks the driver not to
/// notify meanwhile: a driver keeping 8 requests in flight sends a fraction of
/// the notifications it sends with polling off (`--io-poll-us 0`), with event
/// indices (`avail_event` kept behind) and without (`VRING_USED_F_NO_NOTIFY`).
/// The polled run may poll 10 ms: the default 200 µs stops polling where the
/// gaps between requests grow past it, as they do on a loaded test host.
#[test]
fn polling_the_rings_spares_the_driver_its_notifications() {
    for (name, params) in [
        ("poll-evidx", "blk_qd=8"),
        ("poll-noevidx", "blk_qd=8 blk_event_idx=0"),
    ] {
        let polled = bench(name, params, &["--io-poll-us", "10000"], "io_engine=sync");
        let unpolled = bench(name, params, &["--io-poll-us", "0"], "io_engine=sync");
        for b in [&polled, &unpolled] {
            assert_eq!(b.requests(), 2 * b.figure("requests"), "{}", b.block);
        }
        let (with, without) = (
            polled.metric("notifications"),
            unpolled.metric("notifications"),
        );
        assert!(
            without >= unpolled.requests() / 16,
            "{params}: {without} notifications for {} requests without polling",
            unpolled.requests()
        );
        assert!(
            with * 4 < without,
            "{params}: {with} notifications polled, {without} not"
        );
    }
}
