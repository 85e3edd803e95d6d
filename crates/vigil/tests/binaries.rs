//! The binaries: `vigil` (the VMM) hands `daemon`, `ctl`, `bench` and `jailer` to
//! `vigild`, `vigil-ctl`, `vigil-bench` and `vigil-jailer` beside it, and carries
//! none of their code; the jailer carries none of the VMM's.

mod common;

use std::path::{Path, PathBuf};

use common::{run, TIMEOUT};

const VIGIL: &str = env!("CARGO_BIN_EXE_vigil");
const VIGILD: &str = env!("CARGO_BIN_EXE_vigild");
const BENCH: &str = env!("CARGO_BIN_EXE_vigil-bench");
const JAILER: &str = env!("CARGO_BIN_EXE_vigil-jailer");

#[test]
fn vigil_hands_daemon_ctl_and_bench_to_their_binaries() {
    let r = run(&["--help"], TIMEOUT);
    assert_eq!(r.code, Some(0), "{r}");
    for line in ["  daemon ", "  ctl ", "  bench ", "  jailer "] {
        assert!(r.stdout.contains(line), "{r}");
    }
    for (args, usage, option) in [
        (&["daemon", "--help"][..], "Usage: vigild", "--state-dir"),
        (&["ctl", "--help"], "Usage: vigil-ctl", "--socket"),
        (&["bench", "--help"], "Usage: vigil-bench", "boot"),
        (&["jailer", "--help"], "Usage: vigil-jailer", "--exec-file"),
        (
            &["bench", "boot", "--help"],
            "Usage: vigil-bench boot",
            "--firecracker",
        ),
        // --log-level was global: it may still come first.
        (
            &["--log-level", "info", "ctl", "--help"],
            "Usage: vigil-ctl",
            "--json",
        ),
    ] {
        let r = run(args, TIMEOUT);
        assert_eq!(r.code, Some(0), "{args:?}: {r}");
        assert!(r.stdout.contains(usage), "{args:?}: {r}");
        assert!(r.stdout.contains(option), "{args:?}: {r}");
    }
    // The sibling's own errors and exit status come through.
    let r = run(
        &["ctl", "--socket", "/nonexistent/d.sock", "health"],
        TIMEOUT,
    );
    assert_eq!(r.code, Some(1), "{r}");
    assert!(r.stderr.contains("no daemon at /nonexistent/d.sock"), "{r}");
    let r = run(&["daemon", "--no-such-option"], TIMEOUT);
    assert_eq!(r.code, Some(2), "{r}");
}

/// A folder holding a hard link to `binary` alone (in the build folder, so on the
/// same file system; a copy where links fail).
fn alone(binary: &str, name: &str) -> PathBuf {
    let dir = Path::new(binary)
        .parent()
        .unwrap()
        .join(format!("alone-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    if std::fs::hard_link(binary, &path).is_err() {
        std::fs::copy(binary, &path).unwrap();
    }
    path
}

#[test]
fn a_missing_sibling_binary_is_named() {
    let vigil = alone(VIGIL, "vigil");
    let dir = vigil.parent().unwrap().to_owned();
    let r = common::finish(
        std::process::Command::new(&vigil)
            .args(["daemon", "--help"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
        TIMEOUT,
    );
    assert_eq!(r.code, Some(1), "{r}");
    assert!(
        r.stderr
            .contains(&format!("cannot find {}", dir.join("vigild").display())),
        "{r}"
    );
    std::fs::remove_dir_all(&dir).unwrap();

    // vigild without a VMM beside it refuses to start, naming where it looked.
    let vigild = alone(VIGILD, "vigild");
    let dir = vigild.parent().unwrap().to_owned();
    let daemon = |extra: &[&str], env: Option<&str>| {
        let mut cmd = std::process::Command::new(&vigild);
        cmd.arg("--state-dir")
            .arg(dir.join("state"))
            .arg("--socket")
            .arg(dir.join("d.sock"))
            .args(extra)
            .env_remove("VIGIL_VMM")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        if let Some(vmm) = env {
            cmd.env("VIGIL_VMM", vmm);
        }
        common::finish(cmd.spawn().unwrap(), TIMEOUT)
    };
    let r = daemon(&[], None);
    assert_eq!(r.code, Some(1), "{r}");
    assert!(
        r.stderr
            .contains(&format!("cannot find {}", dir.join("vigil").display())),
        "{r}"
    );
    let r = daemon(&["--vmm", "/nonexistent/vigil"], None);
    assert_eq!(r.code, Some(1), "{r}");
    assert!(
        r.stderr.contains("--vmm: cannot find /nonexistent/vigil"),
        "{r}"
    );
    let r = daemon(&[], Some("/nonexistent/vmm"));
    assert_eq!(r.code, Some(1), "{r}");
    assert!(
        r.stderr.contains("VIGIL_VMM: cannot find /nonexistent/vmm"),
        "{r}"
    );
    assert!(!dir.join("d.sock").exists(), "it must not have started");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn vigil_carries_no_daemon_dashboard_or_bench_code() {
    // As text (invalid UTF-8 replaced): std's substring search is fast even here.
    let bytes = |path: &str| String::from_utf8_lossy(&std::fs::read(path).unwrap()).into_owned();
    let contains = |haystack: &str, needle: &str| haystack.contains(needle);
    let vigil = bytes(VIGIL);
    let (vigild, bench) = (bytes(VIGILD), bytes(BENCH));
    for (needle, owner, what) in [
        // The dashboard's HTML, embedded in vigild.
        (r#"<button id="forget-token""#, &vigild, "dashboard"),
        // A message of the daemon's API (crates/daemon).
        (" is not one of true, false", &vigild, "daemon"),
        // The boot benchmark's trivial guest prints this.
        ("vigil-bench trivial PVH guest", &bench, "bench"),
    ] {
        assert!(
            contains(owner, needle),
            "{what}: {needle:?} is not in its own binary"
        );
        assert!(
            !contains(&vigil, needle),
            "the vigil binary carries {what} code: {needle:?}"
        );
    }
}

#[test]
fn the_jailer_carries_no_vmm_code() {
    let bytes = |path: &str| String::from_utf8_lossy(&std::fs::read(path).unwrap()).into_owned();
    let (vigil, jailer) = (bytes(VIGIL), bytes(JAILER));
    // A message of the VMM's (crates/vmm builder.rs), and one of the jailer's.
    let vmm = "(is KVM enabled, and may this user use it?)";
    let jail = "but the jail holds no libraries";
    assert!(
        vigil.contains(vmm) && !jailer.contains(vmm),
        "the jailer carries VMM code"
    );
    assert!(
        jailer.contains(jail) && !vigil.contains(jail),
        "the VMM carries jailer code"
    );
}
