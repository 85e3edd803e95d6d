//! virtio-mmio devices end to end: the test guest drives virtio-blk and
//! virtio-rng through `vigil run`, and the host checks what reached the images.

mod common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use common::blk_bench::{run_on_disk, Files};
use common::{run, Run, TIMEOUT};

struct Image(PathBuf);

impl Image {
    fn new(name: &str, bytes: &[u8], size: u64) -> Self {
        let path =
            std::env::temp_dir().join(format!("vigil-virtio-{}-{name}.img", std::process::id()));
        std::fs::write(&path, bytes).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(size)
            .unwrap();
        Image(path)
    }

    fn arg(&self, extra: &str) -> String {
        format!("path={}{extra}", self.0.display())
    }

    fn bytes(&self) -> Vec<u8> {
        std::fs::read(&self.0).unwrap()
    }
}

impl Drop for Image {
    fn drop(&mut self) {
        std::fs::remove_file(&self.0).ok();
    }
}

fn guest(args: &[String], tests: &str) -> Run {
    let mut all: Vec<String> = vec!["run".into()];
    all.extend_from_slice(args);
    all.extend(["--cmdline".into(), format!("test={tests}")]);
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    run(&all, TIMEOUT)
}

fn pass_detail<'a>(r: &'a Run, name: &str) -> &'a str {
    let line = r.line(&format!("TEST {name} "));
    line.strip_prefix(&format!("TEST {name} PASS"))
        .unwrap_or_else(|| panic!("{name} did not pass: {line}\n{r}"))
        .trim()
}

/// The test guest's write pattern (guest/README.md).
fn pattern_byte(sector: usize, i: usize) -> u8 {
    ((sector * 31 + i * 7 + 0x5a) & 0xff) as u8
}

#[test]
fn blk_writes_reach_the_image_and_read_back() {
    let disk = Image::new("rw", &[], 1 << 20);
    let r = guest(&["--disk".into(), disk.arg(",id=vigil-disk0")], "blk");
    assert_eq!(
        pass_detail(&r, "blk"),
        "capacity=2048 id=vigil-disk0 flush=1"
    );
    assert_eq!(r.code, Some(0), "{r}");
    let bytes = disk.bytes();
    for s in 0..8 {
        for i in 0..512 {
            assert_eq!(
                bytes[s * 512 + i],
                pattern_byte(s, i),
                "sector {s} byte {i}"
            );
        }
    }
    assert!(
        bytes[4096..].iter().all(|b| *b == 0),
        "nothing written past the 8 sectors"
    );
}

/// A virtio-mmio device's registers are read from memory KVM maps read-only:
/// the guest's 10,000 register reads (checked by the guest against the
/// device's identity and configuration) cost the vCPU no MMIO exit; its
/// writes (set-up, reset) still do.
#[test]
fn register_reads_do_not_exit_to_the_vmm() {
    let files = Files::new("mmio-reads");
    let (r, metrics) = run_on_disk(&files, "io_engine=sync", "test=mmio-reads", &[]);
    let detail = pass_detail(&r, "mmio-reads");
    assert!(detail.starts_with("reads=10000 "), "{detail}");
    let exits = metrics["vcpu0"]["exits_mmio"]
        .as_u64()
        .expect("vcpu0.exits_mmio");
    // The set-up and reset writes exit; the reads do not.
    assert!(
        (1..1000).contains(&exits),
        "{exits} MMIO exits for 10,000 register reads\n{r}"
    );
}

#[test]
fn blk_read_only_refuses_writes_and_keeps_the_image() {
    let rw = Image::new("rw2", &[], 1 << 20);
    let ro = Image::new("ro", b"ABCDEFGH", 64 << 10);
    let before = ro.bytes();
    let r = guest(
        &[
            "--disk".into(),
            rw.arg(""),
            "--disk".into(),
            ro.arg(",ro=on"),
        ],
        "blk-ro,blk",
    );
    assert_eq!(
        pass_detail(&r, "blk-ro"),
        "write_status=1 first_bytes=0x44434241"
    );
    // Disks without an id are named by their position.
    assert_eq!(pass_detail(&r, "blk"), "capacity=2048 id=disk0 flush=1");
    assert_eq!(ro.bytes(), before);
}

#[test]
fn rng_gives_fresh_bytes() {
    let r = guest(&["--rng".into()], "rng");
    assert_eq!(pass_detail(&r, "rng"), "bytes=128");
    assert_eq!(r.code, Some(0), "{r}");
}

#[test]
fn rng_rate_limit_spaces_requests() {
    // Two requests at two per second with a burst of one: the second waits ~0.5 s.
    let start = Instant::now();
    let r = guest(&["--rng".into(), "ops=2,ops_burst=1".into()], "rng");
    let elapsed = start.elapsed();
    assert_eq!(pass_detail(&r, "rng"), "bytes=128");
    assert!(
        elapsed >= Duration::from_millis(400),
        "the limiter let both through at once: {elapsed:?}"
    );
}

#[test]
fn hostile_requests_fail_safely_and_the_device_recovers() {
    // On both engines: the asynchronous one hands only well-formed reads,
    // writes and flushes to io_uring.
    for engine in ["sync", "async"] {
        let disk = Image::new("evil", &[], 1 << 20);
        let r = guest(
            &["--disk".into(), disk.arg(&format!(",io_engine={engine}"))],
            "virtio-evil,blk",
        );
        let detail = pass_detail(&r, "virtio-evil");
        // Nothing was accepted as valid, and every reset brought the device back.
        assert!(
            !detail.split_whitespace().any(|t| t.ends_with("=ok")),
            "{engine}: {detail}"
        );
        assert!(detail.ends_with("recovered=5"), "{engine}: {detail}");
        // A request before DRIVER_OK is not processed at all.
        assert!(detail.starts_with("pre_ok=idle"), "{engine}: {detail}");
        // And the same disk still does real I/O afterwards.
        pass_detail(&r, "blk");
        assert_eq!(r.code, Some(0), "{r}");
    }
}

#[test]
fn disk_option_errors_name_the_value() {
    let r = run(&["run", "--disk", "path=/nonexistent/disk.img"], TIMEOUT);
    assert_eq!(r.code, Some(1), "{r}");
    assert!(
        r.stderr
            .contains("--disk path=/nonexistent/disk.img: cannot open it for writing"),
        "{r}"
    );
    let disk = Image::new("dup", &[], 1 << 20);
    let r = run(
        &[
            "run",
            "--disk",
            &disk.arg(",id=a"),
            "--disk",
            &disk.arg(",id=a"),
        ],
        TIMEOUT,
    );
    assert_eq!(r.code, Some(1), "{r}");
    assert!(r.stderr.contains("--disk id=a: used by two disks"), "{r}");
    let r = run(&["run", "--disk", "ro=on"], TIMEOUT);
    assert_eq!(r.code, Some(2), "{r}");
    assert!(r.stderr.contains("path=IMAGE is required"), "{r}");
    let r = run(
        &["run", "--disk", &disk.arg(",id=abcdefghijklmnopqrstuvwxyz")],
        TIMEOUT,
    );
    assert_eq!(r.code, Some(1), "{r}");
    assert!(r.stderr.contains("longer than the 20 bytes"), "{r}");
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn balloon_inflated_to_all_free_memory_returns_it_to_the_host() {
    use std::io::BufRead;
    let mut child = common::vigil()
        .args([
            "run",
            "--memory",
            "128",
            "--balloon",
            "size_mib=112",
            "--cmdline",
            "test=balloon",
        ])
        .spawn()
        .unwrap();
    let pid = child.id();
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let (mut touched, mut inflated) = (None, None);
    let mut console = String::new();
    // The guest holds each phase for 1.5 s: long enough to read /proc.
    for line in stdout.lines().map_while(Result::ok) {
        if line.starts_with("balloon: touched") {
            touched = Some(rss_kib(pid));
        } else if line.starts_with("balloon: inflated") {
            inflated = Some(rss_kib(pid));
        }
        console.push_str(&line);
        console.push('\n');
    }
    let status = child.wait().unwrap();
    assert!(
        console.contains("TEST balloon PASS pages=28672 zeroed=28672"),
        "{console}"
    );
    assert_eq!(status.code(), Some(0), "{console}");
    let (touched, inflated) = (touched.unwrap(), inflated.unwrap());
    // Ballooned to nothing: all its memory above its own first 16 MiB (image,
    // tables, DMA area) given back; at least 96 of those 112 MiB must have left
    // the VMM's RSS, and the guest takes them back and runs on.
    assert!(
        touched >= inflated + 96 * 1024,
        "RSS {touched} KiB -> {inflated} KiB\n{console}"
    );
}

#[test]
fn balloon_hostile_requests_are_survived_and_the_device_goes_on() {
    for (options, report) in [
        ("size_mib=1", ""),
        (
            "size_mib=1,free_page_reporting=on,stats_s=1",
            " report=exact",
        ),
    ] {
        let r = guest(&["--balloon".into(), options.into()], "balloon-evil");
        // Page numbers outside RAM, and chains outside RAM, looping or of 2 GiB,
        // are used and ignored; a page of the guest's own image is given back (its
        // business: it reads zero after); a report gives back exactly the whole
        // pages it covers; a good inflate and deflate work after all that.
        assert_eq!(
            pass_detail(&r, "balloon-evil"),
            format!("beyond=used image=zeroed oob=used loop=used huge=used{report} good=used"),
            "{options}"
        );
        assert_eq!(r.code, Some(0), "{r}");
    }
}

#[test]
fn balloon_larger_than_memory_is_refused() {
    let r = run(
        &["run", "--memory", "64", "--balloon", "size_mib=65"],
        TIMEOUT,
    );
    assert_eq!(r.code, Some(1), "{r}");
    assert!(
        r.stderr
            .contains("--balloon size_mib=65: more than the guest's 64 MiB"),
        "{r}"
    );
}
