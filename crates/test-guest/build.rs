//! Builds the freestanding test guest in `guest/` with the same `rustc` cargo uses,
//! into `$OUT_DIR/vigil-test-guest.elf`.
//!
//! The guest is always optimized: its CPL0 code is emulated instruction by instruction
//! on the nested KVM of our build machines (~1 µs each), so a debug build would be
//! far too slow whatever the workspace profile is.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let guest = manifest.join("../../guest");
    let guest = guest.canonicalize().unwrap_or(guest);
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").expect("OUT_DIR"));
    let elf = out_dir.join("vigil-test-guest.elf");
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let linker_script = guest.join("linker.ld");

    println!("cargo:rerun-if-changed={}", linker_script.display());
    let src = guest.join("src");
    for file in rust_sources(&src) {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    println!("cargo:rerun-if-changed={}", src.display());

    let output = Command::new(&rustc)
        .env(
            "VIGIL_TEST_GUEST_VERSION",
            env::var("CARGO_PKG_VERSION").unwrap_or_default(),
        )
        .arg(src.join("main.rs"))
        .args([
            "--crate-name",
            "vigil_test_guest",
            "--crate-type",
            "bin",
            "--edition",
            "2021",
        ])
        .args([
            "-C",
            "opt-level=2",
            "-C",
            "panic=abort",
            "-C",
            "codegen-units=1",
            "-C",
            "lto=fat",
        ])
        .args([
            "-C",
            "debuginfo=0",
            "-C",
            "strip=debuginfo",
            "-C",
            "debug-assertions=off",
            "-C",
            "overflow-checks=off",
            "-D",
            "warnings",
        ])
        .args(["-C", "relocation-model=static", "-C", "no-redzone=yes"])
        .args(["-C", "force-unwind-tables=no"])
        // No SSE at CPL0: the platform's emulator cannot execute SSE arithmetic, and rustc
        // otherwise zeroes structs with `xorps`. rustc warns that disabling SSE2 on this
        // target is deprecated; the warning (not a lint: `-D warnings` spares it) is
        // accepted, see guest/README.md.
        .args(["-C", "target-feature=-sse,-sse2"])
        .args(["-C", "link-arg=-nostartfiles", "-C", "link-arg=-nostdlib"])
        .args(["-C", "link-arg=-static", "-C", "link-arg=-no-pie"])
        .args(["-C", "link-arg=-Wl,--build-id=none"])
        .arg("-C")
        .arg(format!("link-arg=-Wl,-T,{}", linker_script.display()))
        .arg("-o")
        .arg(&elf)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", Path::new(&rustc).display()));
    if !output.status.success() {
        panic!(
            "building the test guest failed ({}):\n{}{}",
            output.status,
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// Every `.rs` file under `dir`, recursively.
fn rust_sources(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                files.extend(rust_sources(&path));
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}
