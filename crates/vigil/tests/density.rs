//! Memory density: test-guest VMs that together touch more memory than their
//! memory cgroup allows (no swap) run to completion with the pager's RSS
//! target (`--memory-compression rss=MiB`), and are OOM-killed without it.
//!
//! Each guest fills `FILL_MIB` of its RAM with the compress mix (a quarter
//! each zeros, duplicates, text and random data) a step at a time, idling
//! between steps, idles, then checks every byte a step at a time. With the
//! pager, the zero, duplicate and text pages leave RAM as the fill goes, so
//! each VMM keeps about the random quarter; without it, each keeps all of it.
//!
//! The cgroup is a child of this process's own memory cgroup (cgroup v2, or
//! the v1 memory controller where that is what the host has); the test says
//! why and passes when neither can be used (not root, no memory controller).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{http, scratch, Console, Run};
use serde_json::Value;

const MIB: u64 = 1 << 20;
const VMS: usize = 3;
const GUEST_MIB: u64 = 128;
const FILL_MIB: u64 = 96;
const FILL_PAGES: u64 = FILL_MIB * MIB / 4096;
const STEP_MIB: u64 = 8;
const STEP_MS: u64 = 1500;
/// Each VM's RSS target: the random quarter of the fill (24 MiB) and room for
/// the guest's own pages and the pool.
const RSS_MIB: u64 = 32;
/// The cgroup's limit: below the sum of what the VMs touch (3 x 96 MiB of
/// guest memory alone), above what the targets leave (3 x 32 MiB, each VMM's
/// own memory and a step of fill each not yet taken).
const LIMIT_MIB: u64 = 224;
/// Generous: a loaded two-core machine runs three VMs and their pagers.
const RUN_TIMEOUT: Duration = Duration::from_secs(420);

/// A memory cgroup of the test's own, removed on drop (after its processes
/// are gone).
struct Cgroup {
    dir: PathBuf,
    v2: bool,
}

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

fn write(path: &Path, value: &str) -> Result<(), String> {
    std::fs::write(path, value).map_err(|e| format!("write {value:?} to {}: {e}", path.display()))
}

/// A `KEY VALUE` line's value in a cgroup file.
fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok())?
    })
}

/// Whether the host has swap (without a way to forbid it, the VMs would
/// swap rather than be killed).
fn host_swaps() -> bool {
    read(Path::new("/proc/meminfo"))
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("SwapTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .is_some_and(|kib| kib > 0)
}

impl Cgroup {
    /// A fresh child cgroup named `name`, limited to `limit` bytes without
    /// swap; `Err`: why this host cannot give one.
    fn create(name: &str, limit: u64) -> Result<Self, String> {
        // SAFETY: no arguments; reads the effective user id.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not root".into());
        }
        let own = read(Path::new("/proc/self/cgroup")).ok_or("no /proc/self/cgroup")?;
        let name = format!("{name}-{}", std::process::id());
        // cgroup v2: under this process's cgroup if it delegates memory, or
        // under the root (exempt from the no-internal-processes rule).
        let root = Path::new("/sys/fs/cgroup");
        if read(&root.join("cgroup.controllers")).is_some_and(|c| c.contains("memory")) {
            let path = own
                .lines()
                .find_map(|l| l.strip_prefix("0::"))
                .unwrap_or("/")
                .trim_start_matches('/');
            for parent in [root.join(path), root.to_path_buf()] {
                let delegated = read(&parent.join("cgroup.subtree_control"))
                    .is_some_and(|c| c.split_whitespace().any(|c| c == "memory"));
                if !delegated {
                    continue;
                }
                let dir = parent.join(&name);
                let _ = std::fs::remove_dir(&dir);
                if std::fs::create_dir(&dir).is_err() {
                    continue;
                }
                let cg = Self { dir, v2: true };
                write(&cg.dir.join("memory.max"), &limit.to_string())?;
                // No swap to fall back on.
                if cg.dir.join("memory.swap.max").exists() {
                    write(&cg.dir.join("memory.swap.max"), "0")?;
                } else if host_swaps() {
                    return Err("the host swaps and cgroup v2 has no memory.swap.max".into());
                }
                return Ok(cg);
            }
        }
        // The v1 memory controller.
        let v1 = root.join("memory");
        let path = own
            .lines()
            .find_map(|l| {
                let (_, rest) = l.split_once(':')?;
                let (controllers, path) = rest.split_once(':')?;
                controllers
                    .split(',')
                    .any(|c| c == "memory")
                    .then_some(path)
            })
            .ok_or("no memory controller (cgroup v2 memory not delegated here, no v1 memory)")?;
        let parent = v1.join(path.trim_start_matches('/'));
        if !parent.join("memory.limit_in_bytes").exists() {
            return Err(format!("no memory controller at {}", parent.display()));
        }
        let dir = parent.join(&name);
        let _ = std::fs::remove_dir(&dir);
        std::fs::create_dir(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
        let cg = Self { dir, v2: false };
        write(&cg.dir.join("memory.limit_in_bytes"), &limit.to_string())?;
        // memory+swap no higher than memory: no swap.
        if cg.dir.join("memory.memsw.limit_in_bytes").exists() {
            write(
                &cg.dir.join("memory.memsw.limit_in_bytes"),
                &limit.to_string(),
            )?;
        } else if host_swaps() {
            return Err("the host swaps and the v1 memory controller cannot forbid it".into());
        }
        Ok(cg)
    }

    fn procs(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }

    /// Processes of the cgroup killed by its OOM killer so far.
    fn oom_kills(&self) -> u64 {
        let (file, key) = if self.v2 {
            ("memory.events", "oom_kill")
        } else {
            ("memory.oom_control", "oom_kill")
        };
        read(&self.dir.join(file))
            .and_then(|t| keyed(&t, key))
            .unwrap_or_else(|| panic!("no {key} in {}", self.dir.join(file).display()))
    }

    /// The memory charged to it now.
    fn current(&self) -> u64 {
        let file = if self.v2 {
            "memory.current"
        } else {
            "memory.usage_in_bytes"
        };
        read(&self.dir.join(file))
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Its processes may take a moment to be reaped.
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("could not remove {}", self.dir.display());
    }
}

/// A vigil VM started inside `cg` (the shell puts itself in, then becomes
/// vigil, so every byte vigil allocates is charged to it).
fn spawn_in(cg: &Cgroup, sock: &Path, compression: Option<&str>) -> Console {
    let cmdline = format!(
        "test=compress compress_mib={FILL_MIB} compress_step_mib={STEP_MIB} \
         compress_step_ms={STEP_MS} compress_idle_s=3"
    );
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(r#"echo $$ > "$0" && exec "$@""#)
        .arg(cg.procs())
        .arg(env!("CARGO_BIN_EXE_vigil"))
        .args(["run", "--kernel", vigil_test_guest::ELF_PATH])
        .args(["--memory", &GUEST_MIB.to_string()])
        .args(["--api-sock", sock.to_str().unwrap()])
        .args(["--cmdline", &cmdline]);
    if let Some(c) = compression {
        cmd.args(["--memory-compression", c]);
    }
    cmd.stdin(Stdio::null());
    Console::spawn_command(cmd)
}

/// What one run of the VMs showed.
struct Outcome {
    runs: Vec<Run>,
    oom_kills: u64,
    peak: u64,
    /// Each VM's GET /vigil/memory once it had filled its memory (if it got
    /// that far and still answered).
    filled: Vec<Option<Value>>,
}

fn run_vms(name: &str, compression: Option<&str>) -> Result<Outcome, String> {
    let cg = Cgroup::create(name, LIMIT_MIB * MIB)?;
    let dir = scratch(name);
    let socks: Vec<PathBuf> = (0..VMS).map(|i| dir.join(format!("vm{i}.sock"))).collect();
    let mut vms: Vec<Console> = socks
        .iter()
        .map(|s| spawn_in(&cg, s, compression))
        .collect();
    let mut filled = vec![None; VMS];
    let mut peak = 0;
    let deadline = Instant::now() + RUN_TIMEOUT;
    while vms.iter_mut().any(Console::running) && Instant::now() < deadline {
        peak = peak.max(cg.current());
        for (i, vm) in vms.iter_mut().enumerate() {
            if filled[i].is_none() && vm.poll().contains("compress: filled") {
                let a = http::request(&socks[i], "GET", "/vigil/memory", "");
                // Null when it did not answer: looked at once only.
                filled[i] = Some(if a.status == 200 {
                    a.json()
                } else {
                    Value::Null
                });
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let runs: Vec<Run> = vms
        .into_iter()
        .map(|vm| vm.finish(Duration::from_secs(5)))
        .collect();
    let oom_kills = cg.oom_kills();
    drop(cg);
    std::fs::remove_dir_all(&dir).ok();
    Ok(Outcome {
        runs,
        oom_kills,
        peak,
        filled: filled
            .into_iter()
            .map(|v| v.filter(|v| !v.is_null()))
            .collect(),
    })
}

#[test]
fn compressed_vms_fit_a_cgroup_that_oom_kills_them_uncompressed() {
    let policy = format!("rss={RSS_MIB}");
    let on = match run_vms("density-on", Some(&policy)) {
        Ok(o) => o,
        Err(why) => {
            eprintln!("SKIPPED: no memory cgroup for the density test: {why}");
            return;
        }
    };
    let summary = |o: &Outcome| {
        o.filled
            .iter()
            .map(|m| match m {
                Some(m) => format!(
                    "VmRSS {} MiB footprint {} MiB pool {} KiB held {}",
                    m["rss_bytes"].as_u64().unwrap_or(0) / MIB,
                    m["compression"]["footprint_bytes"].as_u64().unwrap_or(0) / MIB,
                    m["compression"]["pool_bytes"].as_u64().unwrap_or(0) / 1024,
                    m["compression"]["pages_held"].as_u64().unwrap_or(0)
                ),
                None => "-".into(),
            })
            .collect::<Vec<_>>()
            .join("; ")
    };
    eprintln!(
        "with rss={RSS_MIB}: cgroup limit {LIMIT_MIB} MiB, peak {} MiB, oom_kill {}; once filled: {}",
        on.peak / MIB,
        on.oom_kills,
        summary(&on)
    );
    for (i, r) in on.runs.iter().enumerate() {
        assert_eq!(r.code, Some(0), "VM {i} with the pager: {r}");
        assert!(
            r.stdout.contains(&format!(
                "compress: verified pages={FILL_PAGES} mismatches=0"
            )) && r.stdout.contains("TEST compress PASS"),
            "VM {i}: {r}"
        );
    }
    assert_eq!(on.oom_kills, 0, "OOM kills with the pager");
    for (i, m) in on.filled.iter().enumerate() {
        let m = m
            .as_ref()
            .unwrap_or_else(|| panic!("VM {i}: no GET /vigil/memory"));
        assert_eq!(m["policy"]["rss_mib"], RSS_MIB, "{m}");
        assert_eq!(m["policy"]["idle_ms"], Value::Null, "{m}");
        // At least the zero and duplicate pages of all but the last step.
        let held = m["compression"]["pages_held"].as_u64().unwrap_or(0);
        assert!(held >= FILL_PAGES / 3, "VM {i}: {m}");
        // The target bounds the footprint, give or take the steps the pager
        // has not caught up with yet (one is just written).
        let footprint = m["compression"]["footprint_bytes"].as_u64().unwrap_or(0);
        assert!(
            footprint > 0 && footprint <= (RSS_MIB + 3 * STEP_MIB) * MIB,
            "VM {i}: {m}"
        );
    }

    let off = run_vms("density-off", None).expect("the cgroup was there a moment ago");
    eprintln!(
        "without the pager: cgroup limit {LIMIT_MIB} MiB, peak {} MiB, oom_kill {}; exits {:?}",
        off.peak / MIB,
        off.oom_kills,
        off.runs
            .iter()
            .map(|r| (r.code, r.signal))
            .collect::<Vec<_>>()
    );
    assert!(off.oom_kills > 0, "no OOM kill without the pager");
    assert!(
        off.runs.iter().any(|r| r.signal == Some(libc::SIGKILL)),
        "no VMM killed"
    );
}
