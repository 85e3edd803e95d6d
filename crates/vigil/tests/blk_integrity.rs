//! What a virtio-blk flush acknowledges survives the VMM: the test guest's
//! `blk-integrity` writes rounds of 31 blocks with a flush, 32 requests in
//! flight; the VMM is killed (SIGKILL) once a flush was acknowledged; every
//! block acknowledged as flushed must then be in the image, as the host reads it
//! and as a VMM restarted on it serves it. With both engines.
//!
//! A killed VMM process leaves the host's page cache behind, so this checks that
//! nothing acknowledged was still inside the VMM; durability across a host
//! crash is the flush's `fdatasync`, which this cannot observe.

mod common;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;

use common::{integrity_byte, run, vigil, TIMEOUT};

/// Blocks acknowledged as flushed before the kill.
const KILL_AFTER: u64 = 31 * 40;

struct Image(PathBuf);

impl Drop for Image {
    fn drop(&mut self) {
        std::fs::remove_file(&self.0).ok();
    }
}

fn flushed_blocks_survive_a_killed_vmm(engine: &str) {
    let image = Image(std::env::temp_dir().join(format!(
        "vigil-integrity-{}-{engine}.img",
        std::process::id()
    )));
    // 256 MiB: 2114 rounds, far more than are written before the kill.
    std::fs::File::create(&image.0)
        .unwrap()
        .set_len(256 << 20)
        .unwrap();
    let disk = format!("path={},io_engine={engine}", image.0.display());
    let mut child = vigil()
        .args([
            "run",
            "--memory",
            "128",
            "--disk",
            &disk,
            "--cmdline",
            "test=blk-integrity",
        ])
        .spawn()
        .expect("spawn vigil");
    let mut flushed = 0;
    let mut seen = Vec::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap();
        if let Some(n) = line.strip_prefix("blk-integrity: flushed ") {
            flushed = n.parse().unwrap();
            if flushed >= KILL_AFTER {
                child.kill().unwrap();
                break;
            }
        }
        seen.push(line);
    }
    let status = child.wait().unwrap();
    assert!(
        flushed >= KILL_AFTER,
        "the guest stopped at {flushed} blocks ({status}):\n{}",
        seen.join("\n")
    );
    assert!(
        !seen.iter().any(|l| l.starts_with("TEST blk-integrity")),
        "killed before the guest finished: {seen:?}"
    );

    let bytes = std::fs::read(&image.0).unwrap();
    for block in 0..flushed {
        let at = (block * 4096) as usize;
        let wrong = (0..4096).find(|&i| bytes[at + i as usize] != integrity_byte(block, i));
        assert_eq!(wrong, None, "{engine}: block {block} of {flushed} flushed");
    }

    let r = run(
        &[
            "run",
            "--memory",
            "128",
            "--disk",
            &disk,
            "--cmdline",
            &format!("test=blk-integrity blk_integrity_verify={flushed}"),
        ],
        TIMEOUT,
    );
    assert_eq!(
        r.line("TEST blk-integrity "),
        format!("TEST blk-integrity PASS verified={flushed}"),
        "{r}"
    );
}

#[test]
fn flushed_blocks_survive_a_killed_vmm_sync_engine() {
    flushed_blocks_survive_a_killed_vmm("sync");
}

#[test]
fn flushed_blocks_survive_a_killed_vmm_async_engine() {
    flushed_blocks_survive_a_killed_vmm("async");
}

/// The guest resets its disk with a round submitted (its flush, often, still in
/// flight): the reset arrives on a vCPU thread, which must not wait for the
/// io_uring there (its seccomp filter has no io_uring calls); the VM goes on and
/// what it flushes afterwards is there. Three times, as the flush is not always
/// still in flight at the reset.
#[test]
fn a_reset_with_requests_in_flight_is_survived_on_the_async_engine() {
    let image = Image(
        std::env::temp_dir().join(format!("vigil-integrity-{}-reset.img", std::process::id())),
    );
    std::fs::File::create(&image.0)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let disk = format!("path={},io_engine=async", image.0.display());
    for _ in 0..3 {
        let r = run(
            &[
                "run",
                "--memory",
                "128",
                "--disk",
                &disk,
                "--cmdline",
                "test=blk-integrity blk_integrity_reset=1 blk_integrity_rounds=4",
            ],
            TIMEOUT,
        );
        assert_eq!(r.code, Some(0), "{r}");
        assert_eq!(
            r.line("TEST blk-integrity "),
            "TEST blk-integrity PASS flushed=124",
            "{r}"
        );
    }
}
