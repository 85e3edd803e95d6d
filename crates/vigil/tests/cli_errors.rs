//! Bad input to `vigil run` gets a clear error naming the value, and exit status 1.

mod common;

use common::{run, Run, TIMEOUT};

fn fails(args: &[&str]) -> Run {
    let r = run(&[&["run"], args].concat(), TIMEOUT);
    assert_eq!(r.code, Some(1), "{r}");
    assert_eq!(r.stdout, "", "nothing booted: {r}");
    r
}

fn temp_file(name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("vigil-{}-{name}", std::process::id()));
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn vcpu_counts() {
    assert!(fails(&["--cpus", "0"])
        .stderr
        .contains("--cpus 0: a VM needs at least one vCPU"));
    let r = fails(&["--cpus", "100000"]);
    assert!(
        r.stderr
            .contains("--cpus 100000: above this host's limit of"),
        "{r}"
    );
}

#[test]
fn memory_sizes() {
    assert!(fails(&["--memory", "0"])
        .stderr
        .contains("--memory 0: a VM needs memory"));
    let r = fails(&["--memory", "1"]);
    assert!(
        r.stderr
            .contains("--memory 1 MiB: the guest needs at least 2 MiB"),
        "{r}"
    );
    let r = fails(&["--memory", "100000000"]);
    assert!(
        r.stderr
            .contains("--memory 100000000 MiB: larger than this host's"),
        "{r}"
    );
}

#[test]
fn missing_or_corrupt_kernel() {
    let r = fails(&["--kernel", "/nonexistent/vmlinux"]);
    assert!(
        r.stderr
            .contains("--kernel /nonexistent/vmlinux: cannot read it: No such file"),
        "{r}"
    );

    let junk = temp_file("junk-kernel", &[0x42; 8192]);
    let r = fails(&["--kernel", junk.to_str().unwrap()]);
    std::fs::remove_file(&junk).unwrap();
    assert!(
        r.stderr.contains("neither an ELF vmlinux nor a bzImage"),
        "{r}"
    );

    // An ELF header cut short.
    let truncated = temp_file("truncated-kernel", &vigil_test_guest::ELF[..100]);
    let r = fails(&["--kernel", truncated.to_str().unwrap()]);
    std::fs::remove_file(&truncated).unwrap();
    assert!(r.stderr.contains(truncated.to_str().unwrap()), "{r}");
}

#[test]
fn unreadable_or_oversized_initrd() {
    let r = fails(&["--initrd", "/nonexistent/initrd"]);
    assert!(
        r.stderr
            .contains("--initrd /nonexistent/initrd: cannot read it"),
        "{r}"
    );

    let big = temp_file("big-initrd", &vec![0u8; 3 << 20]);
    let r = fails(&["--memory", "4", "--initrd", big.to_str().unwrap()]);
    std::fs::remove_file(&big).unwrap();
    assert!(
        r.stderr
            .contains("3145728 bytes do not fit in guest memory"),
        "{r}"
    );
}

#[test]
fn kernel_larger_than_guest_memory() {
    let Some((vmlinux, _)) = common::tiny_linux() else {
        return;
    };
    let r = fails(&["--kernel", vmlinux.to_str().unwrap(), "--memory", "8"]);
    assert!(
        r.stderr.contains("does not fit in 8 MiB of guest memory"),
        "{r}"
    );
}

#[test]
fn usage_errors_name_the_value() {
    let r = run(&["run", "--console", "tty"], TIMEOUT);
    assert_eq!(r.code, Some(2), "{r}");
    assert!(
        r.stderr
            .contains("\"tty\" is not one of stdio, file:PATH, none"),
        "{r}"
    );
    let r = run(&["run", "--cpuid-hide", "sse9"], TIMEOUT);
    assert_eq!(r.code, Some(2), "{r}");
    assert!(r.stderr.contains("unknown CPUID feature \"sse9\""), "{r}");
    let r = run(&["run", "--io-poll-us", "20000"], TIMEOUT);
    assert_eq!(r.code, Some(2), "{r}");
    assert!(
        r.stderr.contains("'20000' for '--io-poll-us <US>'") && r.stderr.contains("0..=10000"),
        "{r}"
    );
    let r = run(&["run", "--symbols", "/nonexistent/System.map"], TIMEOUT);
    assert_eq!(r.code, Some(1), "{r}");
    assert!(
        r.stderr
            .contains("--symbols /nonexistent/System.map: cannot read it"),
        "{r}"
    );
}

#[test]
fn memory_compression_settings() {
    let r = run(&["run", "--memory-compression", "idle=10ms"], TIMEOUT);
    assert_eq!(r.code, Some(2), "{r}");
    assert!(
        r.stderr
            .contains("--memory-compression idle=10ms: expected 200ms to 24h"),
        "{r}"
    );
    let r = run(&["run", "--memory-compression", "algo=gzip"], TIMEOUT);
    assert_eq!(r.code, Some(2), "{r}");
    assert!(
        r.stderr
            .contains("--memory-compression algo=gzip: expected lz4 or zstd"),
        "{r}"
    );
    let r = run(&["run", "--memory-compression", "rss=0,idle=1s"], TIMEOUT);
    assert_eq!(r.code, Some(2), "{r}");
    assert!(
        r.stderr
            .contains("--memory-compression rss=0: expected 1 to 16777216 (MiB)"),
        "{r}"
    );
    let r = fails(&["--memory-compression", "on", "--huge-pages", "thp"]);
    assert!(
        r.stderr.contains(
            "--memory-compression: works on 4 KiB guest pages; turn huge_pages off (--huge-pages none)"
        ),
        "{r}"
    );
}

/// `vigil rt analyze`: a wrong value is named (exit 1), a "no" is explained (exit
/// 4), and a schedulable system prints the flags that apply it (exit 0).
#[test]
fn rt_analyze() {
    let bad = temp_file(
        "rt-bad.toml",
        br#"[host]
cores = 2
[[vms]]
name = "ctl"
scheduler = "edf"
tasks = [{ name = "sensor", period = "10ms", wcet = "12ms" }]
"#,
    );
    let r = run(&["rt", "analyze", bad.to_str().unwrap()], TIMEOUT);
    assert_eq!(r.code, Some(1), "{r}");
    assert!(
        r.stderr
            .contains("vms[0].tasks[0].wcet 12ms: larger than its deadline 10ms"),
        "{r}"
    );

    let no = temp_file(
        "rt-no.toml",
        br#"[host]
cores = 2
[[vms]]
name = "ctl"
scheduler = "fp"
period = "10ms"
tasks = [{ name = "sensor", period = "10ms", wcet = "6ms" },
         { name = "log", period = "20ms", wcet = "9ms" }]
"#,
    );
    let r = run(&["rt", "analyze", no.to_str().unwrap()], TIMEOUT);
    assert_eq!(r.code, Some(4), "{r}");
    assert!(
        r.stdout.contains(
            "vm \"ctl\" task \"log\": at t=20ms demand 21ms > supply 20ms with Θ=10ms Π=10ms"
        ),
        "{r}"
    );

    let yes = temp_file(
        "rt-yes.json",
        br#"{"host":{"cores":1},"vms":[{"name":"ctl","scheduler":"edf","period":"5ms",
            "tasks":[{"name":"sensor","period":"10ms","wcet":"2ms"}]}]}"#,
    );
    let r = run(&["rt", "analyze", yes.to_str().unwrap()], TIMEOUT);
    assert_eq!(r.code, Some(0), "{r}");
    // Γ=(5ms, Θ): sbf(10ms) = Θ + max(0, 5ms - 2(5ms - Θ)) >= 2ms needs Θ = 2ms.
    assert!(
        r.stdout
            .contains("--vcpu-sched vcpu=0,policy=deadline,runtime=2ms,deadline=5ms,period=5ms"),
        "{r}"
    );
    let r = run(
        &["rt", "analyze", "--format", "json", yes.to_str().unwrap()],
        TIMEOUT,
    );
    let report: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    assert_eq!(
        report["vms"][0]["vcpu_sched"][0],
        serde_json::json!({"vcpu":0,"policy":"deadline","runtime_ns":2000000u64,
                           "deadline_ns":5000000u64,"period_ns":5000000u64})
    );
    for file in [bad, no, yes] {
        let _ = std::fs::remove_file(file);
    }
}

/// Every flag `vigil firecracker` takes has a row in the README's table of
/// Firecracker's flags, and every row names a flag it takes.
#[test]
fn the_readme_says_what_becomes_of_every_firecracker_flag() {
    let help = run(&["firecracker", "--help"], TIMEOUT);
    assert_eq!(help.code, Some(0), "{help}");
    // Option lines of clap's help: "      --api-sock <PATH>".
    let flags: Vec<&str> = help
        .stdout
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|w| w.starts_with("--") && *w != "--help")
        .collect();
    assert!(flags.contains(&"--enable-pci"), "{help}");
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"))
        .expect("README.md");
    let rows: Vec<&str> = readme
        .lines()
        .filter_map(|l| l.strip_prefix("| `--"))
        .filter_map(|l| l.split('|').next())
        .collect();
    let named: Vec<String> = rows
        .iter()
        .flat_map(|cell| cell.split(", "))
        .map(|f| format!("--{}", f.trim().trim_start_matches("`--").trim_matches('`')))
        .collect();
    for flag in &flags {
        assert!(
            named.contains(&flag.to_string()),
            "{flag}: no row in the README"
        );
    }
    for flag in &named {
        assert!(
            flags.contains(&flag.as_str()),
            "{flag}: in the README, not a flag"
        );
    }
}

/// `vigil firecracker --metadata FILE`: a file that is missing, not JSON, not
/// an object or over `--mmds-size-limit` is named with why, before any API.
#[test]
fn firecracker_metadata_files_that_cannot_seed_the_store() {
    let sock = std::env::temp_dir().join(format!("vigil-{}-metadata.sock", std::process::id()));
    let not_json = temp_file("metadata-not-json", b"{\"latest\": ");
    let array = temp_file("metadata-array", b"[1, 2]");
    let big = temp_file(
        "metadata-big",
        br#"{"latest": {"meta-data": "0123456789"}}"#,
    );
    let missing = "/nonexistent/metadata.json";
    for (file, limit, why) in [
        (missing, "65536", "cannot read it"),
        (not_json.to_str().unwrap(), "65536", "not JSON"),
        (
            array.to_str().unwrap(),
            "65536",
            "the MMDS data store is a JSON object, not an array",
        ),
        (
            big.to_str().unwrap(),
            "16",
            "the MMDS data store would take 37 bytes, over its limit of 16 bytes",
        ),
    ] {
        let r = run(
            &[
                "firecracker",
                "--api-sock",
                sock.to_str().unwrap(),
                "--metadata",
                file,
                "--mmds-size-limit",
                limit,
            ],
            TIMEOUT,
        );
        assert_eq!(r.code, Some(1), "{r}");
        assert!(
            r.stderr.contains(&format!("--metadata {file}: {why}")),
            "{r}\nlacks {why:?}"
        );
        assert!(!sock.exists(), "no API was served: {r}");
    }
}
