//! `vigil run --metrics-path`: the JSON line written when the VM ends counts what
//! the test guest did.

mod common;

use common::{run, TIMEOUT};

#[test]
fn metrics_file_counts_exits_block_requests_and_memory() {
    let dir = std::env::temp_dir();
    let pid = std::process::id();
    let disk = dir.join(format!("vigil-metrics-{pid}.img"));
    let metrics = dir.join(format!("vigil-metrics-{pid}.json"));
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    std::fs::remove_file(&metrics).ok();
    let r = run(
        &[
            "run",
            "--memory",
            "96",
            "--disk",
            &format!("path={}", disk.display()),
            "--metrics-path",
            metrics.to_str().unwrap(),
            "--cmdline",
            "test=blk",
        ],
        TIMEOUT,
    );
    let text = std::fs::read_to_string(&metrics);
    std::fs::remove_file(&disk).ok();
    std::fs::remove_file(&metrics).ok();
    assert_eq!(r.code, Some(0), "{r}");
    assert!(r.line("TEST blk ").starts_with("TEST blk PASS"), "{r}");
    let text = text.expect("the metrics file exists");
    // The VM lives well under the 60 s period: one line, written as it ended.
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "{text}");
    let m: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    let u = |group: &str, key: &str| {
        m[group][key]
            .as_u64()
            .unwrap_or_else(|| panic!("{group}.{key} missing in {text}"))
    };

    assert!(m["utc_timestamp_ms"].as_u64().unwrap() > 0);
    assert_eq!(u("vm", "guest_memory_bytes"), 96 << 20);
    assert!(u("vm", "rss_bytes") > 0);
    assert!(u("vm", "uptime_ms") > 0);

    // The guest prints on the serial port (port I/O) and drives virtio-mmio.
    assert!(u("vcpu0", "exits_io") > 0, "{text}");
    assert!(u("vcpu0", "exits_mmio") > 0, "{text}");
    assert!(u("vcpu0", "guest_ns") > 0);
    assert!(u("vcpu0", "exit_handling_count") > 0);
    assert!(u("vcpu0", "exit_handling_count") <= u("vcpu0", "exits_total"));
    assert_eq!(u("vcpu", "exits_total"), u("vcpu0", "exits_total"));

    // The `blk` scenario (guest/README.md): GET_ID; one 4096-byte OUT; FLUSH; a
    // 4096-byte IN; a 512-byte IN of the last sector; an IN past the end (IOERR).
    assert!(u("block_blk0", "write_bytes") >= 4096, "{text}");
    assert!(u("block_blk0", "write_count") >= 1);
    assert!(u("block_blk0", "read_bytes") >= 4096 + 512, "{text}");
    assert!(u("block_blk0", "read_count") >= 3);
    assert!(u("block_blk0", "other_count") >= 2, "GET_ID and FLUSH");
    assert!(u("block_blk0", "errors") >= 1, "the read past the end");
    assert_eq!(u("block_blk0", "throttled"), 0);
    // One request at a time, no EVENT_IDX negotiated: every request interrupts.
    assert_eq!(
        u("block_blk0", "interrupts"),
        u("block_blk0", "read_count")
            + u("block_blk0", "write_count")
            + u("block_blk0", "other_count"),
        "{text}"
    );
    assert_eq!(u("block", "read_bytes"), u("block_blk0", "read_bytes"));
}

#[test]
fn an_unwritable_metrics_path_is_a_vmm_error() {
    let r = run(
        &["run", "--metrics-path", "/nonexistent/vigil/metrics.json"],
        TIMEOUT,
    );
    assert_eq!(r.code, Some(1), "{r}");
    assert!(
        r.stderr
            .contains("--metrics-path /nonexistent/vigil/metrics.json: cannot open it"),
        "{r}"
    );
}
