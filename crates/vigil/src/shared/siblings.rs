//! Vigil's binaries find each other in the folder they were built or installed
//! into: `vigil` hands `vigil daemon|ctl|bench|jailer ...` to `vigild`,
//! `vigil-ctl`, `vigil-bench` and `vigil-jailer`; `vigild` spawns each VM with `vigil`; the benchmarks run both.

use std::ffi::OsString;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};

/// The VMM binary.
pub const VMM: &str = "vigil";
/// The host daemon.
pub const DAEMON: &str = "vigild";
/// The daemon's client.
pub const CTL: &str = "vigil-ctl";
/// The benchmarks.
pub const BENCH: &str = "vigil-bench";
/// The jailer.
pub const JAILER: &str = "vigil-jailer";

/// Where binary `name` is: the folder of the running executable.
pub fn beside_me(name: &str) -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe().context("cannot find the running binary (current_exe)")?;
    Ok(me.with_file_name(name))
}

/// Checks that `path` is an executable file; the error names the path and what
/// it was looked up for (`what`).
pub fn check_executable(path: &Path, what: &str) -> anyhow::Result<()> {
    let meta = std::fs::metadata(path)
        .with_context(|| format!("{what}: cannot find {}", path.display()))?;
    if !meta.is_file() {
        bail!("{what}: {} is not a file", path.display());
    }
    if meta.permissions().mode() & 0o111 == 0 {
        bail!("{what}: {} is not executable", path.display());
    }
    Ok(())
}

/// Replaces this process with `path ARGS` (the same process id: whoever waits
/// for it or signals it sees no difference). Returns only on failure.
pub fn exec(path: &Path, args: impl IntoIterator<Item = OsString>, what: &str) -> anyhow::Error {
    if let Err(e) = check_executable(path, what) {
        return e;
    }
    let e = std::process::Command::new(path).args(args).exec();
    anyhow::anyhow!("{what}: cannot run {}: {e}", path.display())
}
