//! `vigil bench migrate`: live migration of the test guest over TCP on
//! 127.0.0.1, Vigil to Vigil (`PUT /vigil/migration`, `vigil run
//! --migrate-from`) and QEMU to QEMU (QMP `migrate`, `-incoming`), the two
//! interleaved round by round, idle and dirtying guests.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use clap::{Args, ValueEnum};
use serde_json::{json, Value};
use vigil_daemon::client::request_blocking;
use vigil_shared::qemu;

use crate::peers::{median, Progress, Running, Scratch, Vmm};

#[derive(Args, Debug)]
pub struct MigrateBenchArgs {
    /// Rounds per case and VMM (Vigil and QEMU alternate); tables show medians.
    #[arg(long, default_value_t = 5, value_name = "N")]
    pub runs: usize,

    /// Guest memory sizes in MiB, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "256,1024",
        value_name = "MiB"
    )]
    pub memory: Vec<u64>,

    /// Cases, comma-separated: idle (test=hang, no bandwidth limit), near (the
    /// guest dirties 3/4 of the link), fast (twice the link), fast-plain (fast,
    /// pre-copy only, without auto-converge), fast-postcopy (fast, post-copy
    /// from the start: Vigil's method postcopy, QEMU's postcopy-ram with
    /// migrate-start-postcopy at once), compressed (half of guest memory
    /// filled with a mix of zero, duplicate, text and random pages, then idle,
    /// over the link: Vigil's source and destination with
    /// --memory-compression idle=1s, the pages its pager holds sent as its pool
    /// keeps them; QEMU with multifd and zstd compression on both sides).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "idle,near,fast,fast-plain,fast-postcopy,compressed"
    )]
    pub cases: Vec<Case>,

    /// The link of the dirtying cases: both VMMs' bandwidth limit, MiB/s.
    #[arg(long, default_value_t = 64, value_name = "MiB/s")]
    pub link: u64,

    /// The region the dirtying guest writes, MiB.
    #[arg(long, default_value_t = 32, value_name = "MiB")]
    pub dirty_mib: u64,

    /// Longest one migration may take before it counts as not converged (QEMU
    /// is then cancelled; Vigil stops after its 30 rounds on its own).
    #[arg(long, default_value_t = 30, value_name = "S")]
    pub timeout: u64,

    /// The peer to compare with: a qemu-system-x86_64 binary, or "none".
    #[arg(long, default_value = "qemu-system-x86_64", value_name = "PATH")]
    pub qemu: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Case {
    Idle,
    Near,
    Fast,
    FastPlain,
    FastPostcopy,
    Compressed,
}

/// The downtime target both VMMs get.
const DOWNTIME_MS: u64 = 100;
const TOKEN: &str = "bench-migrate-token";
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// One case at one memory size: what the guest does and how it moves.
struct Setup {
    memory_mib: u64,
    cmdline: String,
    /// The console line that says the guest is at work.
    ready: &'static str,
    /// Bytes per second; `None`: as fast as the link goes.
    bandwidth: Option<u64>,
    auto_converge: bool,
    /// Vigil's method: auto, precopy or postcopy (QEMU: post-copy or not).
    method: &'static str,
    timeout: Duration,
    tsc_khz: u64,
    /// The compressed case: MiB of the mix the guest fills.
    mix_mib: Option<u64>,
}

impl Setup {
    fn new(case: Case, memory_mib: u64, args: &MigrateBenchArgs, tsc_khz: u64) -> Setup {
        let dirty = |mib_s: u64| {
            format!(
                "test=dirty dirty_mib={} dirty_mib_s={mib_s}",
                args.dirty_mib
            )
        };
        let mix_mib = (case == Case::Compressed).then_some(memory_mib / 2);
        let (cmdline, ready, bandwidth) = match case {
            Case::Idle => ("test=hang".to_string(), "timer:", None),
            // Idle for an hour once filled: it never checks during a round.
            Case::Compressed => (
                format!(
                    "test=compress compress_mib={} compress_idle_s=3600",
                    memory_mib / 2
                ),
                "compress: filled",
                Some(args.link << 20),
            ),
            Case::Near => (dirty(args.link * 3 / 4), "dirty: ", Some(args.link << 20)),
            Case::Fast | Case::FastPlain | Case::FastPostcopy => {
                (dirty(args.link * 2), "dirty: ", Some(args.link << 20))
            }
        };
        Setup {
            memory_mib,
            cmdline,
            ready,
            bandwidth,
            auto_converge: case == Case::Near || case == Case::Fast,
            method: match case {
                Case::FastPlain | Case::Compressed => "precopy",
                Case::FastPostcopy => "postcopy",
                _ => "auto",
            },
            timeout: Duration::from_secs(args.timeout),
            tsc_khz,
            mix_mib,
        }
    }
}

/// One migration's figures.
#[derive(Clone, Copy)]
struct Outcome {
    total: Duration,
    /// `None`: it did not complete within the timeout.
    downtime: Option<Duration>,
    bytes: u64,
    /// The source process's user+system CPU from the request to the end.
    cpu: Duration,
    rounds: u64,
}

/// The TSC frequency KVM gives guests here, in kHz: what the test guest reads
/// from Vigil's CPUID (its `timer: tsc_khz=` line). QEMU refuses to migrate a
/// VM with `invtsc` unless told this frequency.
fn tsc_khz(vigil: &Vmm, guest: &Path) -> anyhow::Result<u64> {
    let mut cmd = vigil.command(guest, "", 64)?;
    let out = cmd
        .output()
        .context("cannot run vigil for the TSC frequency")?;
    let console = String::from_utf8_lossy(&out.stdout);
    console
        .lines()
        .find_map(|l| field(l.strip_prefix("timer: ")?, "tsc_khz")?.parse().ok())
        .filter(|&khz| khz > 0)
        .with_context(|| format!("the test guest printed no tsc_khz under Vigil:\n{console}"))
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Waits until something listens on 127.0.0.1:`port` (from /proc/net/tcp, so
/// that no probe connection reaches the destination).
fn wait_listening(port: u16, who: &mut Running) -> anyhow::Result<()> {
    let local = format!("0100007F:{port:04X}");
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
        let listening = table.lines().any(|l| {
            let mut w = l.split_whitespace();
            w.nth(1) == Some(local.as_str()) && w.nth(1) == Some("0A")
        });
        if listening {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(who.failure(&format!("never listened on 127.0.0.1:{port}")));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// User+system CPU of a live process, from /proc/PID/stat (clock ticks).
fn process_cpu(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read /proc/{pid}/stat"))?;
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|f| f.parse().ok())
        .collect();
    let [utime, stime] = fields[..] else {
        bail!("/proc/{pid}/stat has no utime and stime: {stat}");
    };
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    Ok(Duration::from_micros((utime + stime) * 1_000_000 / hz))
}

/// A `Duration` as `tracing` writes it with `?` (`12.5ms`, `1.2s`, `950µs`).
fn parse_debug_duration(s: &str) -> Option<Duration> {
    let at = s.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
    let (n, unit) = s.split_at(at);
    let n: f64 = n.parse().ok()?;
    let scale = match unit {
        "s" => 1.0,
        "ms" => 1e-3,
        "µs" | "us" => 1e-6,
        "ns" => 1e-9,
        _ => return None,
    };
    Some(Duration::from_secs_f64(n * scale))
}

/// The `key=value` of a log line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

/// Vigil to Vigil: the destination waits on a TCP port, the source boots the
/// guest with its API socket and the log at info, and is asked to migrate; it
/// exits once the destination runs the VM, its log's `migrated` line giving the
/// downtime, the total and the bytes.
fn vigil_once(vigil: &Vmm, guest: &Path, dir: &Path, s: &Setup) -> anyhow::Result<Outcome> {
    let port = free_port()?;
    let mut dest_cmd = Command::new(vigil.program());
    let compression: &[&str] = if s.mix_mib.is_some() {
        &["--memory-compression", "idle=1s"]
    } else {
        &[]
    };
    dest_cmd
        .args(["run", "--console", "stdio", "--migrate-from"])
        .arg(format!("tcp:127.0.0.1:{port}"))
        .args(["--migration-token", TOKEN])
        .args(compression)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut dest = Running::spawn("vigil (destination)", dest_cmd)?;
    wait_listening(port, &mut dest)?;

    let sock = dir.join("vigil-source.sock");
    let _ = std::fs::remove_file(&sock);
    let mut cmd = vigil.command(guest, &s.cmdline, s.memory_mib)?;
    cmd.args(["--log-level", "info", "--api-sock"])
        .arg(&sock)
        .args(compression);
    let mut src = Running::spawn("vigil (source)", cmd)?;
    src.wait_for_line(s.ready, START_TIMEOUT)?;
    if let Some(mix) = s.mix_mib {
        wait_held(&sock, mix, &mut src)?;
    }

    let mut body = json!({
        "destination": format!("tcp:127.0.0.1:{port}"),
        "token": TOKEN,
        "downtime_ms": DOWNTIME_MS,
        "auto_converge": s.auto_converge,
        "method": s.method,
    });
    if let Some(b) = s.bandwidth {
        body["bandwidth_mib_s"] = json!(b >> 20);
    }
    let cpu_before = process_cpu(src.pid())?;
    let started = Instant::now();
    let answer = request_blocking(
        &sock,
        "PUT",
        "/vigil/migration",
        Some(body.to_string().into_bytes()),
        Duration::from_secs(10),
    )?;
    if !answer.is_success() {
        return Err(src.failure(&format!(
            "refused PUT /vigil/migration {body}: HTTP {}: {}",
            answer.status,
            answer.fault_message()
        )));
    }
    // Vigil's own 30-round limit ends every migration; this only catches a hang.
    let (status, cpu_after, log) = src.wait_exit(s.timeout * 4)?;
    let _ = dest.kill();
    let migrated = log.lines().find(|l| l.contains(" migrated "));
    let (Some(line), true) = (migrated, status.success()) else {
        bail!(
            "vigil (source) did not migrate ({status}) after {:?}\nstderr:\n{log}",
            started.elapsed()
        );
    };
    let figure = |key| {
        field(line, key).with_context(|| format!("no {key}= in the source's log line {line}"))
    };
    let duration = |key| {
        let text = figure(key)?;
        parse_debug_duration(text).with_context(|| format!("{key}={text}: not a duration"))
    };
    Ok(Outcome {
        total: duration("total")?,
        downtime: Some(duration("downtime")?),
        bytes: figure("bytes")?.parse()?,
        cpu: cpu_after.saturating_sub(cpu_before),
        rounds: log.lines().filter(|l| l.contains("pre-copy round")).count() as u64,
    })
}

/// Waits until the source's pager holds the mix's zero, duplicate and text
/// pages (three quarters of `mix_mib`).
fn wait_held(sock: &Path, mix_mib: u64, src: &mut Running) -> anyhow::Result<()> {
    let want = mix_mib * 256 * 3 / 4;
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        let answer = request_blocking(sock, "GET", "/vigil/memory", None, Duration::from_secs(10))?;
        let held = serde_json::from_slice::<Value>(&answer.body)
            .ok()
            .and_then(|m| m["compression"]["pages_held"].as_u64())
            .unwrap_or(0);
        if held + 64 >= want {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(src.failure(&format!("its pager holds {held} pages, not {want}")));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A QMP connection (capabilities negotiated).
struct Qmp(BufReader<UnixStream>);

impl Qmp {
    fn connect(path: &Path, qemu: &mut Running) -> anyhow::Result<Qmp> {
        let deadline = Instant::now() + START_TIMEOUT;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() > deadline => {
                    return Err(qemu.failure(&format!("QMP at {}: {e}", path.display())))
                }
                Err(_) => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut qmp = Qmp(BufReader::new(stream));
        qmp.read()?; // the greeting
        qmp.call("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    fn read(&mut self) -> anyhow::Result<Value> {
        let mut line = String::new();
        if self.0.read_line(&mut line)? == 0 {
            bail!("QMP: QEMU closed the connection");
        }
        Ok(serde_json::from_str(&line)?)
    }

    /// Runs `command`; its `return`, skipping events.
    fn call(&mut self, command: &str, arguments: Value) -> anyhow::Result<Value> {
        let request = json!({"execute": command, "arguments": arguments});
        writeln!(self.0.get_mut(), "{request}")?;
        loop {
            let mut answer = self.read()?;
            if let Some(r) = answer.get_mut("return") {
                return Ok(r.take());
            }
            if let Some(e) = answer.get("error") {
                bail!("QMP {request}: {e}");
            }
        }
    }
}

/// QEMU to QEMU: the destination with `-incoming` (`defer` and QMP for
/// post-copy, which both sides must allow), the source driven through QMP
/// (downtime limit, bandwidth, auto-converge, post-copy, `migrate`,
/// `query-migrate` polled); a migration still running at the timeout is
/// cancelled.
fn qemu_once(qemu: &Vmm, guest: &Path, dir: &Path, s: &Setup) -> anyhow::Result<Outcome> {
    let port = free_port()?;
    // The later -cpu wins: the same CPU with the TSC frequency fixed, which
    // QEMU wants before it migrates a VM with invtsc.
    let cpu = format!("{},tsc-frequency={}", qemu::CPU, s.tsc_khz * 1000);
    let postcopy = s.method == "postcopy";
    // Compressed: multifd with zstd, which both sides must set before the
    // stream starts.
    let multifd = s.mix_mib.is_some();
    let capabilities = json!({"capabilities": [
        {"capability": "postcopy-ram", "state": postcopy},
        {"capability": "multifd", "state": multifd},
    ]});
    let uri = format!("tcp:127.0.0.1:{port}");
    let mut dest_cmd = qemu.command(guest, &s.cmdline, s.memory_mib)?;
    dest_cmd.args(["-cpu", &cpu]).arg("-incoming");
    let dest_qmp = dir.join("qemu-destination.qmp");
    if postcopy || multifd {
        let _ = std::fs::remove_file(&dest_qmp);
        dest_cmd
            .arg("defer")
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", dest_qmp.display()));
    } else {
        dest_cmd.arg(&uri);
    }
    let mut dest = Running::spawn("qemu (destination)", dest_cmd)?;
    if postcopy || multifd {
        let mut qmp = Qmp::connect(&dest_qmp, &mut dest)?;
        let incoming = qmp
            .call("migrate-set-capabilities", capabilities.clone())
            .and_then(|_| {
                if multifd {
                    qmp.call(
                        "migrate-set-parameters",
                        json!({"multifd-compression": "zstd"}),
                    )?;
                }
                qmp.call("migrate-incoming", json!({"uri": uri}))
            });
        if let Err(e) = incoming {
            return Err(dest.failure(&e.to_string()));
        }
    }
    wait_listening(port, &mut dest)?;

    let qmp_path = dir.join("qemu-source.qmp");
    let _ = std::fs::remove_file(&qmp_path);
    let mut cmd = qemu.command(guest, &s.cmdline, s.memory_mib)?;
    cmd.args(["-cpu", &cpu])
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp_path.display()));
    let mut src = Running::spawn("qemu (source)", cmd)?;
    src.wait_for_line(s.ready, START_TIMEOUT)?;
    let mut qmp = Qmp::connect(&qmp_path, &mut src)?;
    // QEMU's default is 128 MiB/s; "as fast as the link goes" is a limit it
    // never reaches.
    let bandwidth = s.bandwidth.unwrap_or(1 << 40);
    let setup = (|| {
        // Post-copy has its own limit, unlimited by default: the same link.
        let mut parameters = json!({
            "downtime-limit": DOWNTIME_MS,
            "max-bandwidth": bandwidth,
            "max-postcopy-bandwidth": bandwidth,
        });
        if multifd {
            parameters["multifd-compression"] = json!("zstd");
        }
        qmp.call("migrate-set-parameters", parameters)?;
        let mut capabilities = capabilities.clone();
        if let Some(c) = capabilities["capabilities"].as_array_mut() {
            c.push(json!({"capability": "auto-converge", "state": s.auto_converge}));
        }
        qmp.call("migrate-set-capabilities", capabilities)
    })();
    if let Err(e) = setup {
        return Err(src.failure(&e.to_string()));
    }
    let cpu_before = process_cpu(src.pid())?;
    let started = Instant::now();
    let start = qmp.call("migrate", json!({"uri": uri})).and_then(|_| {
        if postcopy {
            qmp.call("migrate-start-postcopy", json!({}))?;
        }
        Ok(())
    });
    if let Err(e) = start {
        return Err(src.failure(&e.to_string()));
    }
    let info = loop {
        std::thread::sleep(Duration::from_millis(10));
        let info = match qmp.call("query-migrate", json!({})) {
            Ok(info) => info,
            Err(e) => return Err(src.failure(&e.to_string())),
        };
        match info["status"].as_str().unwrap_or_default() {
            "completed" => break info,
            "failed" | "cancelled" => {
                let _ = dest.kill();
                return Err(src.failure(&format!("migration ended: {info}")));
            }
            _ if started.elapsed() > s.timeout => {
                let _ = qmp.call("migrate_cancel", json!({}));
                let cpu = process_cpu(src.pid())?.saturating_sub(cpu_before);
                let _ = (src.kill(), dest.kill());
                return Ok(Outcome {
                    total: started.elapsed(),
                    downtime: None,
                    bytes: info["ram"]["transferred"].as_u64().unwrap_or(0),
                    cpu,
                    rounds: info["ram"]["dirty-sync-count"].as_u64().unwrap_or(0),
                });
            }
            _ => {}
        }
    };
    let cpu = process_cpu(src.pid())?.saturating_sub(cpu_before);
    let _ = (src.kill(), dest.kill());
    let ms = |key: &str| {
        info[key]
            .as_u64()
            .map(Duration::from_millis)
            .ok_or_else(|| anyhow!("query-migrate has no {key}: {info}"))
    };
    Ok(Outcome {
        total: ms("total-time")?,
        downtime: Some(ms("downtime")?),
        bytes: info["ram"]["transferred"].as_u64().unwrap_or(0),
        cpu,
        rounds: info["ram"]["dirty-sync-count"].as_u64().unwrap_or(0),
    })
}

/// One VMM's rounds of one case: what they gave, or why it failed.
struct Column {
    outcomes: Vec<Outcome>,
    failed: Option<String>,
}

impl Column {
    /// Medians over the migrations that completed: total ms, downtime ms, MiB
    /// sent, CPU ms, rounds.
    fn medians(&self) -> Option<[f64; 5]> {
        let done: Vec<&Outcome> = self
            .outcomes
            .iter()
            .filter(|o| o.downtime.is_some())
            .collect();
        if done.is_empty() {
            return None;
        }
        let m = |f: &dyn Fn(&Outcome) -> u64| median(done.iter().map(|o| f(o)).collect()) as f64;
        Some([
            m(&|o| o.total.as_micros() as u64) / 1000.0,
            m(&|o| o.downtime.unwrap_or_default().as_micros() as u64) / 1000.0,
            m(&|o| o.bytes) / f64::from(1 << 20),
            m(&|o| o.cpu.as_micros() as u64) / 1000.0,
            m(&|o| o.rounds),
        ])
    }

    fn completed(&self) -> String {
        let done = self
            .outcomes
            .iter()
            .filter(|o| o.downtime.is_some())
            .count();
        format!("{done}/{}", self.outcomes.len())
    }
}

fn case_name(case: Case) -> &'static str {
    match case {
        Case::Idle => "idle",
        Case::Near => "near",
        Case::Fast => "fast",
        Case::FastPlain => "fast-plain",
        Case::FastPostcopy => "fast-postcopy",
        Case::Compressed => "compressed",
    }
}

pub fn run(args: MigrateBenchArgs) -> anyhow::Result<()> {
    if args.runs == 0 {
        bail!("--runs 0: need at least one round");
    }
    if args
        .memory
        .iter()
        .any(|&m| m < 64 || m < 16 + args.dirty_mib + 16)
    {
        bail!(
            "--memory {:?}: each size must be at least 64 MiB and hold the {} MiB dirty region \
             above 16 MiB",
            args.memory,
            args.dirty_mib
        );
    }
    if args.link == 0 || args.dirty_mib == 0 || args.timeout == 0 {
        bail!("--link, --dirty-mib and --timeout are at least 1");
    }
    let scratch = Scratch::new("migrate")?;
    let guest = scratch.write("guest.elf", vigil_test_guest::ELF)?;
    let vigil = Vmm::vigil("vigil", &[])?;
    let qemu = (args.qemu != "none").then(|| Vmm::qemu(&args.qemu));
    let tsc_khz = tsc_khz(&vigil, &guest)?;
    let progress = Progress::new();

    println!(
        "Live migration over TCP on 127.0.0.1, test guest, downtime target {DOWNTIME_MS} ms on \
         both; medians of {} rounds (Vigil and QEMU alternating). Dirtying cases: the guest \
         writes one word per 4 KiB page over {} MiB at the rate shown; both VMMs limited to \
         {} MiB/s. CPU: the source process, user+system, from the request to the end.\n",
        args.runs, args.dirty_mib, args.link
    );
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "Host: {} CPUs, load average {} at the start; TSC {tsc_khz} kHz.\n",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "| guest | case | VMM | total ms | downtime ms | sent MiB | source CPU ms | rounds | \
         completed |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut failures = Vec::new();
    for &memory in &args.memory {
        for &case in &args.cases {
            let setup = Setup::new(case, memory, &args, tsc_khz);
            let mut columns: Vec<(&Vmm, Column)> = std::iter::once(&vigil)
                .chain(qemu.as_ref())
                .map(|v| {
                    (
                        v,
                        Column {
                            outcomes: Vec::new(),
                            failed: None,
                        },
                    )
                })
                .collect();
            for i in 0..args.runs {
                for (vmm, column) in columns.iter_mut() {
                    if column.failed.is_some() {
                        continue;
                    }
                    let once = if std::ptr::eq(*vmm, &vigil) {
                        vigil_once
                    } else {
                        qemu_once
                    };
                    match once(vmm, &guest, &scratch.0, &setup) {
                        Ok(o) => column.outcomes.push(o),
                        Err(e) => column.failed = Some(format!("{e:#}")),
                    }
                }
                progress.show(&format!(
                    "{memory} MiB {}: {}/{} rounds",
                    case_name(case),
                    i + 1,
                    args.runs
                ));
            }
            progress.done();
            let what = match case {
                Case::Idle => "idle (hang)".to_string(),
                Case::Compressed => format!(
                    "compressed ({} MiB mix idle, {} MiB/s, Vigil's pager / QEMU multifd zstd)",
                    memory / 2,
                    args.link
                ),
                _ => format!(
                    "{} ({} MiB/s, auto-converge {}, {})",
                    case_name(case),
                    setup.cmdline.rsplit('=').next().unwrap_or_default(),
                    if setup.auto_converge { "on" } else { "off" },
                    setup.method
                ),
            };
            for (vmm, column) in &columns {
                let cells = match (&column.failed, column.medians()) {
                    (Some(_), _) => "failed (below) | | | | |".to_string(),
                    (None, None) => format!(
                        "did not complete in {} s | | {} | {} | |",
                        args.timeout,
                        column.outcomes.first().map(|o| o.bytes >> 20).unwrap_or(0),
                        column
                            .outcomes
                            .first()
                            .map(|o| o.cpu.as_millis())
                            .unwrap_or(0)
                    ),
                    (None, Some(m)) => format!(
                        "{:.0} | {:.1} | {:.1} | {:.0} | {:.0} |",
                        m[0], m[1], m[2], m[3], m[4]
                    ),
                };
                println!(
                    "| {memory} MiB | {what} | {} | {cells} {} |",
                    vmm.name,
                    column.completed()
                );
                if let Some(why) = &column.failed {
                    failures.push(format!("{} {memory} MiB {what}: {why}", vmm.name));
                }
            }
            if let [(_, ours), (peer, theirs)] = &columns[..] {
                if let (Some(a), Some(b)) = (ours.medians(), theirs.medians()) {
                    let r: Vec<String> = a
                        .iter()
                        .zip(&b)
                        .map(|(a, b)| format!("{:.2}", a / b.max(1e-9)))
                        .collect();
                    println!(
                        "| {memory} MiB | {what} | ratio vigil/{} | {} | | |",
                        peer.name,
                        r[..4].join(" | ")
                    );
                }
            }
        }
    }
    for f in &failures {
        println!("\nFAILED: {f}");
    }
    Ok(())
}
