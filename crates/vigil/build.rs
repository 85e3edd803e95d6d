//! The release `vigil` binary is linked with its start-up functions packed together
//! (layout/vigil.order, written by layout/profile.py): the kernel maps a binary's text
//! 64 KiB around each page a process touches, so start-up code spread over the whole
//! binary made nearly all of its text resident in every VM (BENCHMARKS.md, "Boot").
//! Its relative relocations are packed (RELR): the static-PIE start-up reads them all.

fn main() {
    let order = std::path::Path::new(&std::env::var("CARGO_MANIFEST_DIR").unwrap())
        .join("layout/vigil.order");
    println!("cargo:rerun-if-changed={}", order.display());
    // Release builds for this target link with Rust's own lld (the default since Rust
    // 1.90), which reads a symbol ordering file; debug and test builds link as before.
    // Symbols the file names that the binary no longer has are skipped, not errors.
    // RELR: 1.5 KiB of relocations instead of 127 KiB, which glibc (2.36 and later)
    // applies at start-up like the others.
    if std::env::var("PROFILE").as_deref() == Ok("release")
        && std::env::var("TARGET").as_deref() == Ok("x86_64-unknown-linux-gnu")
    {
        println!(
            "cargo:rustc-link-arg-bin=vigil=-Wl,--symbol-ordering-file={}",
            order.display()
        );
        println!("cargo:rustc-link-arg-bin=vigil=-Wl,--no-warn-symbol-ordering");
        println!("cargo:rustc-link-arg-bin=vigil=-Wl,-z,pack-relative-relocs");
    }
}
