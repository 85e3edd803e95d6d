//! `vigil`: the VMM, one process per VM: `vigil run`, `vigil guest export`,
//! `vigil snapshot inspect|merge`, `vigil rt analyze`, and
//! Firecracker's command line through a link named `firecracker` (or as `vigil
//! firecracker`). It links nothing of the host daemon, its dashboard or the
//! benchmarks: `vigil daemon|ctl|bench|jailer ...` run the binaries beside it
//! (`vigild`, `vigil-ctl`, `vigil-bench`, `vigil-jailer`) with the rest of the
//! command line.

mod cli;
mod devices_cli;
mod firecracker;
mod launch;
mod snapshot;
mod terminal;

use std::ffi::OsString;
use std::process::ExitCode;

use clap::Parser;
use tracing_subscriber::filter::LevelFilter;
use vigil_shared::{exit, logging, siblings};

/// `vigil WORD ...` that another binary runs, and that binary.
const HANDED_ON: [(&str, &str); 4] = [
    ("daemon", siblings::DAEMON),
    ("ctl", siblings::CTL),
    ("bench", siblings::BENCH),
    ("jailer", siblings::JAILER),
];

fn main() -> ExitCode {
    let argv: Vec<OsString> = std::env::args_os().collect();
    let invoked_as = argv
        .first()
        .map(std::path::Path::new)
        .and_then(|p| p.file_name())
        .and_then(|n| n.to_str())
        .unwrap_or("vigil")
        .to_string();
    if invoked_as == "firecracker" {
        let logging = logging::Logging::init(LevelFilter::WARN);
        return exit::report("vigil", firecracker::main(argv, &logging));
    }
    if let Some(error) = hand_on(&argv) {
        return exit::report("vigil", Err(error));
    }
    let cli = cli::Cli::parse();
    let logging = match logging::start("vigil", cli.log_level.as_deref(), "warn") {
        Ok(logging) => logging,
        Err(code) => return code,
    };
    exit::report("vigil", cli.command.run(&logging))
}

/// `vigil [--log-level L] daemon|ctl|bench|jailer ARGS`: replaces this process with the
/// binary beside it that does the job (`vigild ARGS`, ...), before the VMM's own
/// command line is parsed. `None` for every other command; else why it could not.
fn hand_on(argv: &[OsString]) -> Option<anyhow::Error> {
    // `--log-level` was a global option of every command; it still may come first.
    let mut globals = Vec::new();
    let mut rest = argv.get(1..).unwrap_or_default();
    loop {
        match rest {
            [flag, value, tail @ ..] if flag == "--log-level" => {
                globals.extend([flag.clone(), value.clone()]);
                rest = tail;
            }
            [flag, tail @ ..] if flag.to_str().is_some_and(|f| f.starts_with("--log-level=")) => {
                globals.push(flag.clone());
                rest = tail;
            }
            _ => break,
        }
    }
    let (word, args) = rest.split_first()?;
    let (word, binary) = HANDED_ON.iter().find(|(w, _)| word == *w)?;
    let path = match siblings::beside_me(binary) {
        Ok(path) => path,
        Err(e) => return Some(e),
    };
    let what = format!("vigil {word} runs {binary}, built and installed beside vigil");
    Some(siblings::exec(
        &path,
        globals.into_iter().chain(args.iter().cloned()),
        &what,
    ))
}
