//! `vigil bench snapshot`: snapshot create and load through Firecracker's API
//! (`PATCH /vm`, `PUT /snapshot/create`, `PUT /snapshot/load`), Vigil beside
//! Firecracker, the two interleaved round by round. Each round boots the test
//! guest through the VMM's API with its memory touched, pauses it, takes a full
//! snapshot, and loads it into two fresh processes of the same VMM: one with
//! the `File` memory backend, one with `Uffd` served by a page-fault handler in
//! this program (Firecracker's protocol, the same code for both VMMs).

use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use serde_json::{json, Value};
use vigil_daemon::client::BlockingClient;
use vigil_shared::page_server::PageServer;

use crate::peers::{median, Kind, Progress, Running, Scratch, Vmm};

#[derive(Args, Debug)]
pub struct SnapshotBenchArgs {
    /// Rounds; each takes one snapshot per memory size under every VMM and
    /// loads it twice (File, Uffd). Tables show medians.
    #[arg(long, default_value_t = 10, value_name = "N")]
    pub runs: usize,

    /// Guest memory sizes in MiB, comma-separated. The guest writes into every
    /// page of all but its first 16 and last 16 MiB before it is snapshotted.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "128,1024",
        value_name = "MiB"
    )]
    pub memory: Vec<u64>,

    /// Firecracker: its binary (run as `firecracker --api-sock`). Without it,
    /// Vigil runs alone.
    #[arg(long, value_name = "PATH")]
    pub firecracker: Option<PathBuf>,
}

/// The guest's tick: its first `counter:` line after a load comes at most this
/// long after it runs again.
const TICK_MS: u64 = 1;
/// Memory the guest leaves untouched: its image below 16 MiB, and 16 MiB at
/// the top.
const UNTOUCHED_MIB: u64 = 32;
const TIMEOUT: Duration = Duration::from_secs(120);
/// What the guest prints once its memory is written and it counts.
const COUNTING: &str = "counter: 3";

/// The memory backends a snapshot is loaded with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    File,
    Uffd,
}

impl Backend {
    const ALL: [Backend; 2] = [Backend::File, Backend::Uffd];

    fn name(self) -> &'static str {
        match self {
            Backend::File => "File",
            Backend::Uffd => "Uffd",
        }
    }
}

/// One load's figures.
#[derive(Clone, Copy)]
struct Load {
    /// From sending `PUT /snapshot/load` to its answer.
    request: Duration,
    /// From sending the request to the first console line the guest prints.
    first_line: Duration,
    /// The VMM process's CPU from the request until it is stopped, at the
    /// guest's next whole line.
    cpu: Duration,
    /// Pages the handler copied in until that next line (Uffd).
    served: u64,
}

/// One round of one VMM at one memory size.
struct Sample {
    create: Duration,
    /// Bytes the memory file holds on disk, and its length.
    mem_held: u64,
    mem_len: u64,
    state_len: u64,
    loads: Vec<Result<Load, String>>,
}

/// A VMM serving its API on `sock`, configured by nothing yet.
fn api_process(vmm: &Vmm, sock: &Path) -> anyhow::Result<Running> {
    let _ = std::fs::remove_file(sock);
    let mut cmd = Command::new(vmm.program());
    match &vmm.kind {
        Kind::Vigil(extra) => {
            cmd.args(["run", "--console", "stdio", "--api-sock"])
                .arg(sock)
                .args(extra);
        }
        Kind::Firecracker(_) => {
            cmd.args(["--log-path", "/dev/null", "--api-sock"])
                .arg(sock);
        }
        Kind::Qemu => bail!("QEMU has no Firecracker API"),
        Kind::JailedVigil(_) => bail!("the snapshot benchmark runs no jailed Vigil"),
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut run = Running::spawn(&vmm.name, cmd)?;
    let deadline = Instant::now() + TIMEOUT;
    while UnixStream::connect(sock).is_err() {
        if Instant::now() > deadline {
            return Err(run.failure(&format!("never listened on {}", sock.display())));
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(run)
}

/// One API request that must succeed.
fn call(
    client: &BlockingClient,
    run: &mut Running,
    sock: &Path,
    method: &str,
    path: &str,
    body: Value,
) -> anyhow::Result<()> {
    let answer = client
        .request(
            sock,
            method,
            path,
            Some(body.to_string().into_bytes()),
            TIMEOUT,
        )
        .map_err(|e| run.failure(&format!("{method} {path}: {e}")))?;
    if !answer.is_success() {
        return Err(run.failure(&format!(
            "refused {method} {path} {body}: HTTP {}: {}",
            answer.status,
            answer.fault_message()
        )));
    }
    Ok(())
}

/// Boots the guest through the API, waits until it counts, pauses it and
/// takes a full snapshot into `dir`; returns the create request's time.
fn take_snapshot(
    client: &BlockingClient,
    vmm: &Vmm,
    guest: &Path,
    memory_mib: u64,
    dir: &Path,
) -> anyhow::Result<Duration> {
    let sock = dir.join("source.sock");
    let mut run = api_process(vmm, &sock)?;
    let cmdline = format!(
        "test=counter counter_ms={TICK_MS} counter_fill_mib={}",
        memory_mib - UNTOUCHED_MIB
    );
    let calls = [
        (
            "PUT",
            "/machine-config",
            json!({"vcpu_count": 1, "mem_size_mib": memory_mib}),
        ),
        (
            "PUT",
            "/boot-source",
            json!({"kernel_image_path": guest, "boot_args": cmdline}),
        ),
        ("PUT", "/actions", json!({"action_type": "InstanceStart"})),
    ];
    for (method, path, body) in calls {
        call(client, &mut run, &sock, method, path, body)?;
    }
    run.wait_for_line(COUNTING, TIMEOUT)?;
    call(
        client,
        &mut run,
        &sock,
        "PATCH",
        "/vm",
        json!({"state": "Paused"}),
    )?;
    let body = json!({
        "snapshot_type": "Full",
        "snapshot_path": dir.join("vm.snap"),
        "mem_file_path": dir.join("vm.mem"),
    });
    let started = Instant::now();
    call(client, &mut run, &sock, "PUT", "/snapshot/create", body)?;
    let create = started.elapsed();
    run.kill()?;
    Ok(create)
}

/// Loads the snapshot in `dir` into a fresh process of `vmm` with `backend`
/// and waits for the guest's first line.
fn load_once(
    client: &BlockingClient,
    vmm: &Vmm,
    dir: &Path,
    backend: Backend,
) -> anyhow::Result<Load> {
    let mem = dir.join("vm.mem");
    let handler_sock = dir.join("uffd.sock");
    let _ = std::fs::remove_file(&handler_sock);
    let handler = match backend {
        Backend::File => None,
        Backend::Uffd => Some(PageServer::listen(&handler_sock, &mem)?),
    };
    let sock = dir.join("load.sock");
    let mut run = api_process(vmm, &sock)?;
    let backend_path = match backend {
        Backend::File => &mem,
        Backend::Uffd => &handler_sock,
    };
    let body = json!({
        "snapshot_path": dir.join("vm.snap"),
        "mem_backend": {"backend_type": backend.name(), "backend_path": backend_path},
        "resume_vm": true,
    });
    let cpu_before = process_cpu_ns(run.pid());
    let started = Instant::now();
    call(client, &mut run, &sock, "PUT", "/snapshot/load", body)?;
    let request = started.elapsed();
    // Nothing but the guest writes on the console. The pause comes at an exit,
    // which the guest's console output makes, so the line it was printing is
    // nearly always cut in two: its rest is the first thing the guest does.
    let since_spawn = run.wait_for_line("", TIMEOUT)?;
    let first_line = since_spawn.saturating_sub(started - run.started());
    // One whole tick later the guest has touched what it touches each tick.
    run.wait_for_line("counter: ", TIMEOUT)?;
    let served = handler.as_ref().map_or(0, PageServer::served);
    let cpu = run.kill()?.saturating_sub(cpu_before);
    if let Some(handler) = handler {
        handler.finish()?;
    }
    Ok(Load {
        request,
        first_line,
        cpu,
        served,
    })
}

/// CPU time of a live process's threads so far, from their schedstat
/// (nanoseconds, unlike /proc/PID/stat's clock ticks).
fn process_cpu_ns(pid: u32) -> Duration {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Duration::ZERO;
    };
    let ns: u64 = tasks
        .flatten()
        .filter_map(|t| std::fs::read_to_string(t.path().join("schedstat")).ok())
        .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .sum();
    Duration::from_nanos(ns)
}

fn one_round(
    client: &BlockingClient,
    vmm: &Vmm,
    guest: &Path,
    memory_mib: u64,
    dir: &Path,
) -> anyhow::Result<Sample> {
    let create = take_snapshot(client, vmm, guest, memory_mib, dir)?;
    let meta = std::fs::metadata(dir.join("vm.mem")).context("the memory file")?;
    let state_len = std::fs::metadata(dir.join("vm.snap"))
        .context("the state file")?
        .len();
    let loads = Backend::ALL
        .iter()
        .map(|&b| load_once(client, vmm, dir, b).map_err(|e| format!("{e:#}")))
        .collect();
    Ok(Sample {
        create,
        mem_held: meta.blocks() * 512,
        mem_len: meta.len(),
        state_len,
        loads,
    })
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

fn ratio(a: f64, b: f64) -> String {
    format!("{:.2}", a / b)
}

/// The medians of one VMM at one memory size, as table cells.
struct Row {
    create: Duration,
    mem_held: u64,
    mem_len: u64,
    state_len: u64,
    loads: Vec<Option<Load>>,
}

fn summarize(samples: &[Sample]) -> Option<Row> {
    if samples.is_empty() {
        return None;
    }
    let loads = (0..Backend::ALL.len())
        .map(|b| {
            let ok: Vec<Load> = samples
                .iter()
                .filter_map(|s| s.loads[b].as_ref().ok().copied())
                .collect();
            (!ok.is_empty()).then(|| Load {
                request: median(ok.iter().map(|l| l.request).collect()),
                first_line: median(ok.iter().map(|l| l.first_line).collect()),
                cpu: median(ok.iter().map(|l| l.cpu).collect()),
                served: median(ok.iter().map(|l| l.served).collect()),
            })
        })
        .collect();
    Some(Row {
        create: median(samples.iter().map(|s| s.create).collect()),
        mem_held: median(samples.iter().map(|s| s.mem_held).collect()),
        mem_len: median(samples.iter().map(|s| s.mem_len).collect()),
        state_len: median(samples.iter().map(|s| s.state_len).collect()),
        loads,
    })
}

fn cells(row: &Row) -> Vec<String> {
    let mib = |b: u64| format!("{:.1}", b as f64 / (1 << 20) as f64);
    let mut c = vec![
        ms(row.create),
        format!("{} of {}", mib(row.mem_held), mib(row.mem_len)),
        format!("{:.1}", row.state_len as f64 / 1024.0),
    ];
    for (b, load) in Backend::ALL.iter().zip(&row.loads) {
        match load {
            Some(l) => {
                c.extend([ms(l.request), ms(l.first_line), ms(l.cpu)]);
                if *b == Backend::Uffd {
                    c.push(l.served.to_string());
                }
            }
            None => {
                c.extend(["failed".to_string(), "-".into(), "-".into()]);
                if *b == Backend::Uffd {
                    c.push("-".into());
                }
            }
        }
    }
    c
}

fn ratio_cells(ours: &Row, peer: &Row) -> Vec<String> {
    let mut c = vec![
        ratio(ours.create.as_secs_f64(), peer.create.as_secs_f64()),
        ratio(ours.mem_held as f64, peer.mem_held as f64),
        ratio(ours.state_len as f64, peer.state_len as f64),
    ];
    for (b, (a, p)) in Backend::ALL.iter().zip(ours.loads.iter().zip(&peer.loads)) {
        match (a, p) {
            (Some(a), Some(p)) => {
                c.extend([
                    ratio(a.request.as_secs_f64(), p.request.as_secs_f64()),
                    ratio(a.first_line.as_secs_f64(), p.first_line.as_secs_f64()),
                    ratio(a.cpu.as_secs_f64(), p.cpu.as_secs_f64()),
                ]);
                if *b == Backend::Uffd {
                    c.push(ratio(a.served as f64, p.served as f64));
                }
            }
            _ => {
                let n = if *b == Backend::Uffd { 4 } else { 3 };
                c.extend(std::iter::repeat_n("-".to_string(), n));
            }
        }
    }
    c
}

pub fn run(args: SnapshotBenchArgs) -> anyhow::Result<()> {
    if args.runs == 0 {
        bail!("--runs 0: need at least one round");
    }
    if let Some(&m) = args.memory.iter().find(|&&m| m <= UNTOUCHED_MIB) {
        bail!("--memory {m}: need more than {UNTOUCHED_MIB} MiB");
    }
    let scratch = Scratch::new("snapshot")?;
    let guest = scratch.write("test-guest.elf", vigil_test_guest::ELF)?;
    let mut vmms = vec![Vmm::vigil("vigil", &[])?];
    match &args.firecracker {
        Some(path) => vmms.push(Vmm::firecracker(path, &scratch.0)?),
        None => eprintln!("firecracker: left out (give --firecracker PATH to compare with it)"),
    }
    let client = BlockingClient::new()?;

    // samples[memory][vmm]; a VMM whose boot or snapshot fails is left out of
    // that memory size from then on, its error kept for the table.
    let mut samples: Vec<Vec<Vec<Sample>>> = args
        .memory
        .iter()
        .map(|_| vmms.iter().map(|_| Vec::new()).collect())
        .collect();
    let mut failed: Vec<Vec<Option<String>>> =
        args.memory.iter().map(|_| vec![None; vmms.len()]).collect();
    let progress = Progress::new();
    for round in 0..args.runs {
        for (m, &memory_mib) in args.memory.iter().enumerate() {
            for k in 0..vmms.len() {
                let v = (round + k) % vmms.len();
                if failed[m][v].is_some() {
                    continue;
                }
                progress.show(&format!(
                    "round {}/{}: {} with {memory_mib} MiB",
                    round + 1,
                    args.runs,
                    vmms[v].name
                ));
                let dir = scratch.0.join(format!("{}-{memory_mib}", vmms[v].name));
                std::fs::create_dir_all(&dir)?;
                match one_round(&client, &vmms[v], &guest, memory_mib, &dir) {
                    Ok(sample) => samples[m][v].push(sample),
                    Err(e) => failed[m][v] = Some(format!("{e:#}")),
                }
                let _ = std::fs::remove_dir_all(&dir);
            }
        }
    }
    progress.done();

    println!(
        "Snapshots: the test guest (`test=counter counter_ms={TICK_MS} \
         counter_fill_mib=MEMORY-{UNTOUCHED_MIB}`: it has written a word into every page but \
         its first and last 16 MiB, then counts, printing a line each {TICK_MS} ms) booted \
         through each VMM's API on 1 vCPU, paused (`PATCH /vm`) and saved (`PUT \
         /snapshot/create`, Full); medians of {} rounds, the VMMs interleaved. create: the \
         request's time; memory file: MiB it holds on disk of its length; state: the other \
         file. Each snapshot is loaded into two fresh processes of the same VMM (`PUT \
         /snapshot/load`, resume_vm: true), the memory file in the page cache: File maps the \
         memory file, Uffd registers guest memory with a userfaultfd and hands it to a \
         page-fault handler inside vigil-bench (Firecracker's protocol, the same code for both \
         VMMs), which copies each page in from the file's bytes (read beforehand) when first \
         touched. load: the request's time; to line: from sending the request to the first \
         console line the guest ends after it (the pause, taken at a VM exit, nearly always \
         cuts a line in two, so this is the rest of it: the guest's first instructions after \
         the load; else its next tick, at most {TICK_MS} ms later); CPU: the VMM process's user \
         + system time from the request until it is stopped at the guest's next whole \
         `counter:` line (one tick, which reads and writes its 64 counter pages: the guest \
         spins at CPL3 between ticks, so about {TICK_MS} ms of that is the guest's); pages: \
         what the handler served until that line.",
        args.runs
    );
    if vmms.len() == 1 {
        println!("\nFirecracker was not given (--firecracker PATH): Vigil alone.");
    }
    for (m, &memory_mib) in args.memory.iter().enumerate() {
        println!("\n{memory_mib} MiB guest:\n");
        println!(
            "| VMM | create (ms) | memory file (MiB) | state (KiB) | File: load (ms) | File: to \
             line (ms) | File: CPU (ms) | Uffd: load (ms) | Uffd: to line (ms) | Uffd: CPU \
             (ms) | Uffd: pages |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|---|");
        let rows: Vec<Option<Row>> = samples[m].iter().map(|s| summarize(s)).collect();
        for (v, vmm) in vmms.iter().enumerate() {
            match (&rows[v], &failed[m][v]) {
                (Some(row), _) => println!("| {} | {} |", vmm.name, cells(row).join(" | ")),
                (None, Some(_)) => {
                    println!("| {} | failed (below) |{}", vmm.name, " - |".repeat(10))
                }
                (None, None) => {}
            }
        }
        if let Some(ours) = &rows[0] {
            for (vmm, peer) in vmms.iter().zip(&rows).skip(1) {
                if let Some(peer) = peer {
                    println!(
                        "| ratio vigil/{} | {} |",
                        vmm.name,
                        ratio_cells(ours, peer).join(" | ")
                    );
                }
            }
        }
        for (v, vmm) in vmms.iter().enumerate() {
            if let Some(e) = &failed[m][v] {
                println!(
                    "\n{} failed after {} good rounds:\n\n```\n{e}\n```",
                    vmm.name,
                    samples[m][v].len()
                );
            }
            for (b, backend) in Backend::ALL.iter().enumerate() {
                let errors: Vec<&String> = samples[m][v]
                    .iter()
                    .filter_map(|s| s.loads[b].as_ref().err())
                    .collect();
                if let Some(first) = errors.first() {
                    println!(
                        "\n{} {} load failed in {} of {} rounds; the first:\n\n```\n{first}\n```",
                        vmm.name,
                        backend.name(),
                        errors.len(),
                        samples[m][v].len()
                    );
                }
            }
        }
    }
    Ok(())
}
