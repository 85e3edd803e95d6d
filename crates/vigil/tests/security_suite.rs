//! The guest-driven security suite (issue 14): one hostile test guest throws at
//! the VMM port I/O and MMIO to every address no device claims, an interrupt storm,
//! malformed virtio-blk chains (out of RAM, looping, 2 GiB, wrong direction,
//! before DRIVER_OK) and a balloon inflated past RAM, over its own image and with
//! hostile chains, while a neighbour VM runs its memory-checking counter. The VMM
//! must stay up and serving, count each access no device claims exactly as the
//! guest made them and each refused chain as a device error, and the neighbour
//! must go on counting, its memory intact.
//!
//! SECURITY.md's table "From the guest" reports what this suite tries.

mod common;

use std::path::Path;
use std::time::Duration;

use common::http::{request, wait_for};
use common::{scratch, Console};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(120);

fn metrics(sock: &Path) -> Value {
    let a = request(sock, "GET", "/vigil/metrics", "");
    assert_eq!(a.status, 200, "{a:?}");
    a.json()
}

/// (unclaimed port I/O, unclaimed MMIO) over every vCPU.
fn unclaimed(m: &Value) -> (u64, u64) {
    let sum = |key: &str| {
        m["vcpus"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v[key].as_u64().unwrap())
            .sum()
    };
    (sum("unclaimed_pio"), sum("unclaimed_mmio"))
}

fn device<'a>(m: &'a Value, kind: &str) -> &'a Value {
    m["devices"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind} device in {m:#}"))
}

fn word(detail: &str, key: &str) -> u64 {
    detail
        .split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("no {key}= in {detail:?}"))
        .parse()
        .unwrap()
}

/// The last `counter: N` tick the neighbour printed.
fn last_tick(c: &mut Console) -> u64 {
    c.poll()
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("counter: ")?.parse().ok())
        .unwrap_or(0)
}

#[test]
fn a_hostile_guest_is_counted_and_survived_and_its_neighbour_runs_on() {
    let dir = scratch("security-suite");
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let sock = dir.join("api.sock");

    let mut neighbour = Console::spawn(&["run", "--cmdline", "test=counter"]);
    neighbour.wait_for(&["counter: 1"], TIMEOUT);

    let mut hostile = Console::spawn(&[
        "run",
        "--kernel",
        vigil_test_guest::ELF_PATH,
        "--api-sock",
        sock.to_str().unwrap(),
        "--disk",
        &format!("path={}", disk.display()),
        "--balloon",
        "size_mib=1",
        "--rng",
        "--cmdline",
        "test=virtio-evil,balloon-evil,rng-evil,io-evil",
    ]);
    wait_for(&sock, TIMEOUT);
    let ticks_before = last_tick(&mut neighbour);

    let virtio = hostile.wait_for(&["TEST virtio-evil "], TIMEOUT);
    assert!(virtio.starts_with("TEST virtio-evil PASS"), "{virtio}");
    let balloon = hostile.wait_for(&["TEST balloon-evil "], TIMEOUT);
    assert_eq!(
        balloon,
        "TEST balloon-evil PASS beyond=used image=zeroed oob=used loop=used huge=used good=used"
    );
    // Out of RAM, looping, 2 GiB past RAM, device-readable: each used, empty.
    let rng = hostile.wait_for(&["TEST rng-evil "], TIMEOUT);
    assert_eq!(
        rng,
        "TEST rng-evil PASS oob=used:0 loop=used:0 huge=used:0 dir=used:0 good=used:64"
    );
    hostile.wait_for(&["io-evil: ready"], TIMEOUT);
    let before = metrics(&sock);
    // Each malformed chain the block device refused is one error; the balloon
    // counts one for each page number outside RAM and each bad chain at least.
    // (`nostatus`: the chain given back without a status, there being no
    // valid status byte to write; `ioerr`, `unsupp`, `needs_reset` count too.)
    let refused = ["oob", "loop", "huge", "dir"]
        .iter()
        .filter(|case| {
            let outcome = virtio
                .split_whitespace()
                .find_map(|t| t.strip_prefix(*case)?.strip_prefix('='))
                .unwrap_or("missing");
            !["idle", "ok", "missing"].contains(&outcome)
        })
        .count() as u64;
    assert_eq!(refused, 4, "oob, loop, huge and dir refused: {virtio}");
    assert_eq!(device(&before, "block")["errors"], refused, "{before:#}");
    assert_eq!(device(&before, "entropy")["errors"], 4, "{before:#}");
    let balloon_errors = device(&before, "balloon")["errors"].as_u64().unwrap();
    assert!(balloon_errors >= 3 + 3, "{before:#}");
    hostile.send(b"g");
    let done = hostile.wait_for(&["io-evil: done "], TIMEOUT);
    let detail = &done["io-evil: done ".len()..];
    let after = metrics(&sock);
    // Every access no device claims was counted, and nothing else.
    let (pio0, mmio0) = unclaimed(&before);
    let (pio1, mmio1) = unclaimed(&after);
    assert_eq!(pio1 - pio0, word(detail, "pio"), "{detail}");
    assert_eq!(mmio1 - mmio0, word(detail, "mmio"), "{detail}");
    assert!(word(detail, "pio") > 130_000, "every port: {detail}");
    hostile.send(b"k");
    hostile.wait_for(&["DONE passed=4 failed=0"], TIMEOUT);
    let run = hostile.finish(TIMEOUT);
    assert_eq!(
        run.code,
        Some(0),
        "the hostile VM powered off cleanly: {run}"
    );

    // The neighbour counted on through all of it, its memory as it left it.
    let ticks_after = last_tick(&mut neighbour);
    assert!(
        ticks_after > ticks_before,
        "the neighbour stopped at tick {ticks_before} while the hostile guest ran"
    );
    let next = format!("counter: {}", ticks_after + 2);
    neighbour.wait_for(&[&next], TIMEOUT);
    assert!(!neighbour.poll().contains("lost:"), "{}", neighbour.poll());
    assert!(neighbour.running());
    drop(neighbour);
    std::fs::remove_dir_all(&dir).ok();
}
