//! What a VM process keeps resident: guest RAM in 4 KiB pages unless asked for
//! huge pages, and the kernel's symbols only once something needs them.

mod common;

use std::io::{BufRead, BufReader};

use common::{vigil, TIMEOUT};

/// The `VmFlags` of the guest RAM mapping (the one of at least 128 MiB) of `pid`.
fn guest_ram_flags(pid: u32) -> String {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut big = false;
    for line in smaps.lines() {
        if let Some(kib) = line.strip_prefix("Size:") {
            let kib: u64 = kib.trim().trim_end_matches("kB").trim().parse().unwrap();
            big = kib >= 128 << 10;
        }
        if let Some(flags) = line.strip_prefix("VmFlags:").filter(|_| big) {
            return flags.trim().to_owned();
        }
    }
    panic!("no guest RAM mapping in /proc/{pid}/smaps:\n{smaps}");
}

#[test]
fn guest_ram_uses_huge_pages_only_when_asked() {
    // smaps shows the advice: `nh` for MADV_NOHUGEPAGE, `hg` for MADV_HUGEPAGE,
    // whatever the host's own THP policy.
    for (extra, wanted, unwanted) in [
        (&[][..], "nh", "hg"),
        (&["--huge-pages", "thp"], "hg", "nh"),
    ] {
        let mut child = vigil()
            .args(["run", "--cmdline", "test=serial,hang"])
            .args(extra)
            .spawn()
            .unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let booted = stdout
            .lines()
            .map_while(Result::ok)
            .any(|l| l.starts_with("TEST serial PASS"));
        let flags = booted.then(|| guest_ram_flags(child.id()));
        child.kill().unwrap();
        let r = common::finish(child, TIMEOUT);
        assert!(booted, "{extra:?}: {r}");
        let flags = flags.unwrap();
        let words: Vec<&str> = flags.split_whitespace().collect();
        assert!(words.contains(&wanted), "{extra:?}: VmFlags {flags}");
        assert!(!words.contains(&unwanted), "{extra:?}: VmFlags {flags}");
    }
    let r = common::run(&["run", "--huge-pages", "2M"], TIMEOUT);
    assert_eq!(r.code, Some(2), "{r}");
    assert!(r.stderr.contains("'2M'"), "{r}");
}

#[test]
fn kernel_symbols_are_read_only_when_needed() {
    const READ: &str = "kernel symbols read";
    let debug_run = |extra: &[&str]| {
        let child = vigil()
            .env("VIGIL_LOG", "debug")
            .args(["run", "--cmdline", "test=serial"])
            .args(extra)
            .spawn()
            .unwrap();
        common::finish(child, TIMEOUT)
    };
    let r = debug_run(&[]);
    assert_eq!(r.code, Some(0), "{r}");
    assert!(r.stdout.contains("TEST serial PASS"), "{r}");
    assert!(
        !r.stderr.contains(READ),
        "a plain boot read the symbols: {r}"
    );
    // Introspection needs them (the test guest's ELF has its own).
    let r = debug_run(&["--introspect"]);
    assert_eq!(r.code, Some(0), "{r}");
    assert!(r.stderr.contains(READ), "{r}");
}
