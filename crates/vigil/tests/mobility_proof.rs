//! A guest that moves keeps everything it was doing (issue 11's proof): the test
//! guest's `mobility` scenario counts, dirties memory at a set rate, writes
//! numbered records to a virtio-blk disk and streams numbered records to the host
//! over vsock, all at once, while it is (a) snapshotted and loaded into another
//! Vigil process and (b) migrated over TCP between two Vigil processes, each in
//! its own network namespace (a veth pair between them). The host then checks
//! that the count never went back, that the guest found every word of its memory
//! as it left it (no FAIL), that the disk holds every record, intact and
//! contiguous, up to the last one the guest wrote, and that the stream's bytes
//! arrived in order and intact, with only the gap a transport reset allows
//! (records in flight when the VM stopped), the guest reconnecting after the move.

mod common;

use std::io::Read;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::mobility::{api_vigil, assert_counts_on, counts, ok, TIMEOUT};
use common::{scratch, Console};
use serde_json::json;

const TOKEN: &str = "9d2e-proof-one-time";
/// The host port the guest streams to (`<uds>_1235`).
const STREAM_PORT: u32 = 1235;
const DISK_BYTES: usize = 8 << 20;
const SECTOR: usize = 512;
/// Stream records in the device's credit window (256 KiB, 16 bytes each).
const CREDIT_RECORDS: u64 = (256 << 10) / 16;
/// The guest's command line: 16 MiB dirtied at 16 MiB/s, 200 disk records and
/// 4096 stream records (64 KiB) a second, for `seconds` of guest time.
fn boot_args(seconds: u64) -> String {
    format!(
        "test=mobility mobility_s={seconds} dirty_mib=16 dirty_mib_s=16 blk_rec_s=200 \
         vsock_rec_s=4096"
    )
}

/// The host end of the guest's stream: every connection to `<uds>_1235`, in
/// order, and the bytes each brought.
struct StreamServer {
    stop: Arc<AtomicBool>,
    acceptor: std::thread::JoinHandle<Vec<std::thread::JoinHandle<Vec<u8>>>>,
}

impl StreamServer {
    fn start(uds: &Path) -> StreamServer {
        let path = format!("{}_{STREAM_PORT}", uds.display());
        let listener = UnixListener::bind(&path).unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let acceptor = std::thread::spawn(move || {
            let mut readers = Vec::new();
            while !stopping.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((mut conn, _)) => {
                        conn.set_nonblocking(false).unwrap();
                        readers.push(std::thread::spawn(move || {
                            let mut got = Vec::new();
                            let _ = conn.read_to_end(&mut got);
                            got
                        }));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
            readers
        });
        StreamServer { stop, acceptor }
    }

    /// The bytes of each connection, in the order they came (each read to its
    /// end: call once the VMs are gone).
    fn finish(self) -> Vec<Vec<u8>> {
        self.stop.store(true, Ordering::SeqCst);
        let readers = self.acceptor.join().unwrap();
        readers.into_iter().map(|r| r.join().unwrap()).collect()
    }
}

/// A disk, a vsock socket path and the stream server, in `dir`.
struct Setup {
    dir: PathBuf,
    disk: PathBuf,
    uds: PathBuf,
    stream: StreamServer,
}

impl Setup {
    fn new(name: &str) -> Setup {
        let dir = scratch(name);
        let disk = dir.join("disk.img");
        std::fs::write(&disk, vec![0u8; DISK_BYTES]).unwrap();
        let uds = dir.join("v.sock");
        let stream = StreamServer::start(&uds);
        Setup {
            dir,
            disk,
            uds,
            stream,
        }
    }

    /// Boots the scenario through the API of the Vigil serving `sock`.
    fn boot(&self, sock: &Path, seconds: u64) {
        self.boot_with(sock, seconds, "Sync");
    }

    /// [`Self::boot`] with the disk on `io_engine`.
    fn boot_with(&self, sock: &Path, seconds: u64, io_engine: &str) {
        ok(
            sock,
            "PUT",
            "/boot-source",
            json!({"kernel_image_path": vigil_test_guest::ELF_PATH, "boot_args": boot_args(seconds)}),
        );
        ok(
            sock,
            "PUT",
            "/drives/disk",
            json!({"drive_id": "disk", "path_on_host": self.disk, "is_root_device": false,
                   "is_read_only": false, "io_engine": io_engine}),
        );
        ok(
            sock,
            "PUT",
            "/vsock",
            json!({"guest_cid": 3, "uds_path": self.uds}),
        );
        ok(
            sock,
            "PUT",
            "/actions",
            json!({"action_type": "InstanceStart"}),
        );
    }
}

/// The number after `key=` in `line`.
fn field(line: &str, key: &str) -> u64 {
    let prefix = format!("{key}=");
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {key}= in {line:?}"))
        .parse()
        .unwrap()
}

/// What the host checks after a move, `before` and `after` being the consoles
/// of the VM before and after it.
fn check_everything(before: &str, after: &str, disk: &Path, stream: Vec<Vec<u8>>) {
    let both = format!("--- before the move\n{before}--- after the move\n{after}");
    assert!(
        !before.contains("FAIL") && !after.contains("FAIL"),
        "the guest found something wrong:\n{both}"
    );
    let pass = after
        .lines()
        .find(|l| l.starts_with("TEST mobility PASS "))
        .unwrap_or_else(|| panic!("no PASS:\n{both}"));
    eprintln!("{pass}");

    // The count goes on one tick at a time, never back, every tick having
    // checked the words the last one wrote.
    assert_counts_on(before, after);
    assert!(
        field(pass, "ticks") >= *counts(after).last().unwrap(),
        "{pass}"
    );

    // Every disk record, intact and contiguous, up to the last one written.
    let written = field(pass, "blk");
    let image = std::fs::read(disk).unwrap();
    let on_disk = image
        .chunks(SECTOR)
        .take_while(|s| s.starts_with(b"VIGILREC"))
        .count() as u64;
    assert_eq!(
        on_disk, written,
        "records on the disk vs the guest's count\n{both}"
    );
    for (n, sector) in image.chunks(SECTOR).enumerate() {
        if (n as u64) < written {
            assert_eq!(sector, record(n as u64), "disk record {n}");
        } else {
            assert!(
                sector.iter().all(|&b| b == 0),
                "sector {n} past the last record was written"
            );
        }
    }

    // The stream: each connection's records in order and intact from the number
    // the guest said it started at; across the move only the records in flight
    // are missing; the last connection ends with the last record sent.
    let starts: Vec<u64> = both
        .lines()
        .filter(|l| l.starts_with("vsock: connected port="))
        .map(|l| field(l, "seq"))
        .collect();
    // One connection before the move, one after.
    assert_eq!(stream.len(), 2, "connections the host took\n{both}");
    assert_eq!(field(pass, "connections"), 2, "{both}");
    assert_eq!(starts.len(), 2, "connections the guest made\n{both}");
    assert!(
        after.contains("vsock: transport reset at seq="),
        "the guest saw no transport reset after the move\n{after}"
    );
    let mut expected = 0u64;
    for (i, (bytes, &start)) in stream.iter().zip(&starts).enumerate() {
        let last_conn = i + 1 == stream.len();
        // What a reset may lose: what the device had taken from the guest but
        // not yet passed on, at most its credit window.
        assert!(
            start >= expected && start - expected <= CREDIT_RECORDS,
            "connection {i} starts at record {start}; the last one ended before {expected}"
        );
        for (k, chunk) in bytes.chunks(16).enumerate() {
            let n = start + k as u64;
            let mut want = n.to_le_bytes().to_vec();
            want.extend_from_slice(&stream_check(n).to_le_bytes());
            // Only a connection the move cut may end inside a record.
            assert!(
                chunk.len() == 16 || !last_conn,
                "the last connection ends inside record {n}"
            );
            assert_eq!(
                chunk,
                &want[..chunk.len()],
                "connection {i}: stream record {n} (byte {})",
                k * 16
            );
        }
        expected = start + (bytes.len() / 16) as u64;
        if last_conn {
            assert_eq!(
                expected,
                field(pass, "vsock"),
                "the last connection ends with the last record sent"
            );
        } else {
            eprintln!(
                "connection {i}: records {start}..{expected}; the next starts at {}",
                starts[i + 1]
            );
        }
    }
}

/// Disk record `n`, as the guest writes it (guest/src/virtio.rs, `Records`).
fn record(n: u64) -> Vec<u8> {
    let mut r = b"VIGILREC".to_vec();
    r.extend_from_slice(&n.to_le_bytes());
    r.extend((16..504u64).map(|i| (n.wrapping_mul(13) ^ i.wrapping_mul(7)) as u8));
    let hash = r.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    });
    r.extend_from_slice(&hash.to_le_bytes());
    r
}

/// The second word of stream record `n` (guest/src/vsock.rs).
fn stream_check(n: u64) -> u64 {
    n.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0x005e_ed0f_5eed
}

/// The guest's per-second line for second `k`.
fn second(k: u64) -> String {
    format!("mobility: seconds={k} ")
}

#[test]
fn a_restored_guest_keeps_its_count_memory_disk_records_and_stream() {
    snapshot_and_restore("proof-snapshot", "Sync", &[]);
}

/// The same with the disk on the asynchronous engine: what was in flight
/// completes before the snapshot captures the queue, and the restored disk is
/// on io_uring again.
#[test]
fn a_restored_guest_on_the_async_engine_keeps_its_disk_records() {
    snapshot_and_restore("proof-snapshot-async", "Async", &[]);
}

/// The same on PCI: the restored functions keep their BARs, vectors and MSI
/// routes (the guest's disk and stream go on through MSI-X).
#[test]
fn a_restored_pci_guest_keeps_its_count_memory_disk_records_and_stream() {
    snapshot_and_restore("proof-snapshot-pci", "Sync", &["--enable-pci"]);
}

fn snapshot_and_restore(name: &str, io_engine: &str, flags: &[&str]) {
    let setup = Setup::new(name);
    let (state, mem) = (setup.dir.join("vm.snap"), setup.dir.join("vm.mem"));
    let sock = setup.dir.join("source.sock");
    let mut source =
        Console::spawn(&[&["run", "--api-sock", sock.to_str().unwrap()], flags].concat());
    common::http::wait_for(&sock, TIMEOUT);
    setup.boot_with(&sock, 8, io_engine);
    source.wait_for(&[&second(3)], TIMEOUT);
    ok(&sock, "PATCH", "/vm", json!({"state": "Paused"}));
    ok(
        &sock,
        "PUT",
        "/snapshot/create",
        json!({"snapshot_path": state, "mem_file_path": mem, "snapshot_type": "Full"}),
    );
    // The source stops for good: its stream connection ends, as it would
    // were the host gone.
    let before = source.poll().to_string();
    drop(source);
    let inspect = common::run(&["snapshot", "inspect", state.to_str().unwrap()], TIMEOUT);
    let on_pci = inspect.stdout.matches("; on PCI, BAR 0xc00").count();
    assert_eq!(on_pci, usize::from(!flags.is_empty()) * 2, "{inspect}");
    let (restored, sock) = api_vigil(&setup.dir, "restored");
    ok(
        &sock,
        "PUT",
        "/snapshot/load",
        json!({
            "snapshot_path": state,
            "mem_backend": {"backend_type": "File", "backend_path": mem},
            "resume_vm": true
        }),
    );
    let after = restored.finish(TIMEOUT);
    assert_eq!(after.code, Some(0), "{after}");
    check_everything(&before, &after.stdout, &setup.disk, setup.stream.finish());
    std::fs::remove_dir_all(&setup.dir).ok();
}

/// Two network namespaces joined by a veth pair, 10.77.0.1 in the first and
/// 10.77.0.2 in the second; deleted (with the pair) when dropped.
struct Namespaces {
    names: [String; 2],
}

impl Namespaces {
    /// The reason where namespaces cannot be made here. `tag` (a letter) keeps
    /// the names of the tests that run at once apart.
    fn new(tag: char) -> Result<Namespaces, String> {
        let id = std::process::id();
        let ns = Namespaces {
            names: [
                format!("vigil-proof-{tag}a-{id}"),
                format!("vigil-proof-{tag}b-{id}"),
            ],
        };
        let [a, b] = &ns.names;
        // Interface names have at most 15 bytes.
        let (va, vb) = (
            format!("vp{tag}a{}", id % 1_000_000),
            format!("vp{tag}b{}", id % 1_000_000),
        );
        let steps: [&[&str]; 10] = [
            &["netns", "add", a],
            &["netns", "add", b],
            &["link", "add", &va, "type", "veth", "peer", "name", &vb],
            &["link", "set", &va, "netns", a],
            &["link", "set", &vb, "netns", b],
            &["-n", a, "addr", "add", "10.77.0.1/24", "dev", &va],
            &["-n", b, "addr", "add", "10.77.0.2/24", "dev", &vb],
            &["-n", a, "link", "set", &va, "up"],
            &["-n", b, "link", "set", &vb, "up"],
            &["-n", a, "link", "set", "lo", "up"],
        ];
        for step in steps {
            let out = Command::new("ip")
                .args(step)
                .output()
                .map_err(|e| format!("ip: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "ip {}: {}",
                    step.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
        }
        Ok(ns)
    }

    /// `vigil` run in namespace `i`.
    fn vigil(&self, i: usize) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.names[i], env!("CARGO_BIN_EXE_vigil")]);
        cmd
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for name in &self.names {
            let _ = Command::new("ip").args(["netns", "del", name]).output();
        }
    }
}

/// Whether the process `pid` sees a TCP socket listening on `port` in its
/// network namespace.
fn listening(pid: u32, port: u16) -> bool {
    let tcp = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")).unwrap_or_default();
    let local = format!(":{port:04X}");
    tcp.lines().skip(1).any(|l| {
        let cols: Vec<&str> = l.split_whitespace().collect();
        cols.len() > 3 && cols[1].ends_with(&local) && cols[3] == "0A"
    })
}

/// Migrates the scenario with `method` from namespace a to namespace b over TCP.
fn migrate_between_namespaces(name: &str, tag: char, method: &str) {
    let ns = match Namespaces::new(tag) {
        Ok(ns) => ns,
        Err(why) => {
            eprintln!("skipped: cannot make network namespaces here ({why})");
            return;
        }
    };
    let setup = Setup::new(name);
    let target = "tcp:10.77.0.2:7777";
    let dest_sock = setup.dir.join("dest.sock");
    let mut cmd = ns.vigil(1);
    cmd.args(["run", "--migrate-from", target, "--migration-token", TOKEN])
        .args(["--api-sock", dest_sock.to_str().unwrap()]);
    let dest = Console::spawn_command(cmd);
    let deadline = Instant::now() + TIMEOUT;
    while !listening(dest.pid(), 7777) {
        assert!(Instant::now() < deadline, "the destination never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    let src_sock = setup.dir.join("source.sock");
    let mut cmd = ns.vigil(0);
    cmd.args(["run", "--api-sock", src_sock.to_str().unwrap()]);
    let mut source = Console::spawn_command(cmd);
    common::http::wait_for(&src_sock, TIMEOUT);
    setup.boot(&src_sock, 10);
    source.wait_for(&[&second(3)], TIMEOUT);
    ok(
        &src_sock,
        "PUT",
        "/vigil/migration",
        json!({"destination": target, "token": TOKEN, "method": method, "downtime_ms": 50}),
    );
    let run = source.finish(TIMEOUT);
    assert_eq!(run.code, Some(0), "{run}");
    assert!(
        run.stderr.contains(&format!("the VM migrated to {target}")),
        "{run}"
    );
    eprintln!("{}", run.stderr);
    let after = dest.finish(TIMEOUT);
    assert_eq!(after.code, Some(0), "{after}");
    check_everything(
        &run.stdout,
        &after.stdout,
        &setup.disk,
        setup.stream.finish(),
    );
    std::fs::remove_dir_all(&setup.dir).ok();
}

#[test]
fn a_guest_migrated_between_network_namespaces_keeps_everything() {
    migrate_between_namespaces("proof-migrate", 'm', "auto");
}

#[test]
fn a_guest_migrated_post_copy_between_network_namespaces_keeps_everything() {
    migrate_between_namespaces("proof-postcopy", 'p', "postcopy");
}
