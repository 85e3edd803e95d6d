//! `vigil bench`: run the test guest with Vigil and with a peer VMM (QEMU microvm)
//! in the same invocation, and compare: start-up time and memory overhead
//! (`boot`), virtio-blk and virtio-net throughput (`blk`, `net`).

use std::io::Read;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;

#[derive(Args, Debug)]
pub struct BootBenchArgs {
    /// Boots per VMM for the timing figures.
    #[arg(long, default_value_t = 20, value_name = "N")]
    pub runs: usize,

    /// The peer to compare with: a qemu-system-x86_64 binary, or "none".
    #[arg(long, default_value = "qemu-system-x86_64", value_name = "PATH")]
    pub qemu: String,

    /// Guest memory in MiB for every boot.
    #[arg(long, default_value_t = 128, value_name = "MiB")]
    pub memory: u64,
}

/// One boot's figures.
#[derive(Clone, Copy, Debug)]
struct Sample {
    first_byte: Duration,
    exit: Duration,
    cpu: Duration,
}

/// A VMM under test: how to start it for a guest command line.
struct Vmm {
    name: &'static str,
    program: PathBuf,
    args: Vec<String>,
    cmdline_flag: &'static str,
    /// Exit status of a guest that wrote 0 to the debug-exit port.
    success: i32,
}

impl Vmm {
    fn command(&self, cmdline: &str) -> Command {
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args)
            .arg(self.cmdline_flag)
            .arg(cmdline)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        cmd
    }
}

fn vigil(memory: u64) -> anyhow::Result<Vmm> {
    Ok(Vmm {
        name: "vigil",
        program: std::env::current_exe().context("cannot find the vigil binary")?,
        args: vec![
            "run".into(),
            "--memory".into(),
            memory.to_string(),
            "--console".into(),
            "stdio".into(),
        ],
        cmdline_flag: "--cmdline",
        success: 0,
    })
}

fn qemu(program: &str, guest: &Path, memory: u64) -> Vmm {
    Vmm {
        name: "qemu-microvm",
        program: program.into(),
        args: [
            "-M",
            // Without ACPI, QEMU lists its virtio-mmio devices on the command line,
            // where the test guest looks for them.
            "microvm,acpi=off",
            "-accel",
            "kvm",
            // invtsc lets QEMU publish the timing leaf, as Vigil does, so neither
            // guest spends time calibrating its clocks.
            "-cpu",
            "host,+invtsc",
            "-m",
            &memory.to_string(),
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-serial",
            "stdio",
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=0x04",
            "-kernel",
            &guest.display().to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
        cmdline_flag: "-append",
        success: 1, // isa-debug-exit: (0 << 1) | 1
    }
}

/// Waits for `child` and returns its exit status and its user+system CPU time.
fn wait_with_usage(child: &mut Child) -> anyhow::Result<(std::process::ExitStatus, Duration)> {
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: rusage is plain data that wait4 fills in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: pid is our child, not yet reaped; status and usage are writable.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    if r != pid {
        bail!("wait4: {}", std::io::Error::last_os_error());
    }
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    Ok((
        std::process::ExitStatus::from_raw(status),
        tv(usage.ru_utime) + tv(usage.ru_stime),
    ))
}

fn boot_once(vmm: &Vmm) -> anyhow::Result<Sample> {
    let start = Instant::now();
    let mut child = vmm
        .command("")
        .spawn()
        .with_context(|| format!("cannot start {}", vmm.program.display()))?;
    let mut out = child.stdout.take().expect("piped");
    let mut byte = [0u8; 1];
    let first_byte = match out.read(&mut byte) {
        Ok(1) => start.elapsed(),
        _ => bail!("{} printed nothing", vmm.name),
    };
    let mut rest = Vec::new();
    out.read_to_end(&mut rest).ok();
    let (status, cpu) = wait_with_usage(&mut child)?;
    let exit = start.elapsed();
    if status.code() != Some(vmm.success) {
        bail!(
            "{} exited with {status}; output: {}",
            vmm.name,
            String::from_utf8_lossy(&rest)
        );
    }
    Ok(Sample {
        first_byte,
        exit,
        cpu,
    })
}

/// Resident memory of a running VMM: total, and the part that is guest RAM (the
/// anonymous mapping at least as large as the guest's memory).
fn resident_kib(pid: u32, memory_mib: u64) -> anyhow::Result<(u64, u64)> {
    let smaps =
        std::fs::read_to_string(format!("/proc/{pid}/smaps")).context("cannot read smaps")?;
    let (mut total, mut guest) = (0, 0);
    let mut size = 0;
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        match (words.next(), words.next()) {
            (Some("Size:"), Some(kib)) => size = kib.parse().unwrap_or(0),
            (Some("Rss:"), Some(kib)) => {
                let rss: u64 = kib.parse().unwrap_or(0);
                total += rss;
                if size >= memory_mib * 1024 {
                    guest += rss;
                }
            }
            _ => {}
        }
    }
    Ok((total, guest))
}

/// Boots the guest into a halt and measures resident memory once it has printed.
fn memory_once(vmm: &Vmm, memory_mib: u64) -> anyhow::Result<(u64, u64)> {
    let mut child = vmm.command("test=serial,hang").spawn()?;
    let mut out = child.stdout.take().expect("piped");
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    let deadline = Instant::now() + Duration::from_secs(20);
    while !String::from_utf8_lossy(&seen).contains("TEST serial PASS") {
        match out.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
        if Instant::now() > deadline {
            break;
        }
    }
    // Let the VMM settle (lazy allocations after the guest's last exit).
    std::thread::sleep(Duration::from_millis(200));
    let figures = resident_kib(child.id(), memory_mib);
    child.kill().ok();
    child.wait().ok();
    if !String::from_utf8_lossy(&seen).contains("TEST serial PASS") {
        bail!(
            "{} did not boot the guest: {}",
            vmm.name,
            String::from_utf8_lossy(&seen)
        );
    }
    figures
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

struct Summary {
    name: &'static str,
    first_byte: Duration,
    exit: Duration,
    cpu: Duration,
    rss_kib: u64,
    overhead_kib: u64,
}

fn measure(vmm: &Vmm, args: &BootBenchArgs) -> anyhow::Result<Summary> {
    let mut samples = Vec::with_capacity(args.runs);
    for i in 0..args.runs {
        samples.push(boot_once(vmm)?);
        eprint!("\r{}: {}/{} boots", vmm.name, i + 1, args.runs);
    }
    eprintln!();
    let (rss_kib, guest_kib) = memory_once(vmm, args.memory)?;
    Ok(Summary {
        name: vmm.name,
        first_byte: median(samples.iter().map(|s| s.first_byte).collect()),
        exit: median(samples.iter().map(|s| s.exit).collect()),
        cpu: median(samples.iter().map(|s| s.cpu).collect()),
        rss_kib,
        overhead_kib: rss_kib - guest_kib,
    })
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

#[derive(Args, Debug)]
pub struct DeviceBenchArgs {
    /// Rounds per VMM; the table shows the median.
    #[arg(long, default_value_t = 3, value_name = "N")]
    pub runs: usize,

    /// The peer to compare with: a qemu-system-x86_64 binary, or "none".
    #[arg(long, default_value = "qemu-system-x86_64", value_name = "PATH")]
    pub qemu: String,
}

/// A benchmark the test guest runs against one virtio device.
struct DeviceBench {
    /// The guest scenario; its PASS line carries `key=value` figures.
    scenario: &'static str,
    /// The figures to report, in table order.
    keys: &'static [&'static str],
    /// What the table's caption says.
    caption: &'static str,
}

/// Runs `bench.scenario` once; `attach` adds the device to the VMM's command line.
fn device_once(
    vmm: &Vmm,
    bench: &DeviceBench,
    attach: &dyn Fn(&Vmm, &mut Command),
) -> anyhow::Result<Vec<u64>> {
    let mut cmd = vmm.command(&format!("test={}", bench.scenario));
    attach(vmm, &mut cmd);
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {}", vmm.program.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let prefix = format!("TEST {} PASS", bench.scenario);
    let line = text
        .lines()
        .find(|l| l.starts_with(&prefix))
        .with_context(|| format!("{}: {} did not pass: {text}", vmm.name, bench.scenario))?;
    let figures: Vec<(&str, u64)> = line
        .split_whitespace()
        .filter_map(|w| w.split_once('='))
        .filter_map(|(k, v)| Some((k, v.parse().ok()?)))
        .collect();
    bench
        .keys
        .iter()
        .map(|k| {
            figures
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| *v)
                .with_context(|| format!("{}: no {k} in {line}", vmm.name))
        })
        .collect()
}

/// Runs `bench` under Vigil and the peer and prints the medians with ratios.
fn device_bench(
    args: &DeviceBenchArgs,
    bench: &DeviceBench,
    attach: &dyn Fn(&Vmm, &mut Command),
) -> anyhow::Result<()> {
    if args.runs == 0 {
        bail!("--runs 0: need at least one round");
    }
    let guest_file =
        std::env::temp_dir().join(format!("vigil-bench-guest-{}.elf", std::process::id()));
    let mut vmms = vec![vigil(128)?];
    if args.qemu != "none" {
        std::fs::write(&guest_file, vigil_test_guest::ELF)
            .context("cannot write the guest image")?;
        vmms.push(qemu(&args.qemu, &guest_file, 128));
    }
    let mut medians: Vec<Vec<u64>> = Vec::new();
    for vmm in &vmms {
        let mut rounds = Vec::new();
        for i in 0..args.runs {
            let round = device_once(vmm, bench, attach);
            if round.is_err() {
                std::fs::remove_file(&guest_file).ok();
            }
            rounds.push(round?);
            eprint!("\r{}: {}/{} rounds", vmm.name, i + 1, args.runs);
        }
        eprintln!();
        medians.push(
            (0..bench.keys.len())
                .map(|k| {
                    let mut v: Vec<u64> = rounds.iter().map(|r| r[k]).collect();
                    v.sort();
                    v[v.len() / 2]
                })
                .collect(),
        );
    }
    std::fs::remove_file(&guest_file).ok();

    println!("{}, median of {} rounds:\n", bench.caption, args.runs);
    println!("| VMM | {} |", bench.keys.join(" | "));
    println!("|---|{}", "---|".repeat(bench.keys.len()));
    for (vmm, m) in vmms.iter().zip(&medians) {
        let cells: Vec<String> = m.iter().map(u64::to_string).collect();
        println!("| {} | {} |", vmm.name, cells.join(" | "));
    }
    if let [ours, peer] = &medians[..] {
        let cells: Vec<String> = ours
            .iter()
            .zip(peer)
            .map(|(a, b)| format!("{:.2}", *a as f64 / (*b).max(1) as f64))
            .collect();
        println!("| ratio vigil/{} | {} |", vmms[1].name, cells.join(" | "));
    }
    Ok(())
}

pub fn run_blk(args: DeviceBenchArgs) -> anyhow::Result<()> {
    let image = std::env::temp_dir().join(format!("vigil-bench-disk-{}.img", std::process::id()));
    let bench = DeviceBench {
        scenario: "blk-bench",
        keys: &["read_iops", "read_kib_s", "write_iops", "write_kib_s"],
        caption: "virtio-blk, 4 KiB requests at queue depth 1 from the test guest (CPL3 polling \
                  driver), fresh raw 64 MiB image per round, 4000 reads then 4000 writes",
    };
    let attach = |vmm: &Vmm, cmd: &mut Command| {
        // A fresh image each round; creation errors show up as the VMM's own.
        if let Ok(f) = std::fs::File::create(&image) {
            let _ = f.set_len(64 << 20);
        }
        if vmm.name == "vigil" {
            cmd.arg("--disk").arg(format!("path={}", image.display()));
        } else {
            cmd.args(["-global", "virtio-mmio.force-legacy=false", "-drive"])
                .arg(format!(
                    "id=d0,file={},format=raw,if=none,cache=writeback",
                    image.display()
                ))
                .args(["-device", "virtio-blk-device,drive=d0"]);
        }
    };
    let result = device_bench(&args, &bench, &attach);
    std::fs::remove_file(&image).ok();
    result
}

/// Creates tap `name` (up, no address) with iproute2, removed on drop.
struct Tap(String);

impl Tap {
    fn new(name: String) -> anyhow::Result<Self> {
        for args in [
            vec!["tuntap", "add", &name, "mode", "tap"],
            vec!["link", "set", &name, "up"],
        ] {
            let status = Command::new("ip")
                .args(&args)
                .status()
                .context("cannot run ip (iproute2) to create a tap")?;
            if !status.success() {
                bail!(
                    "ip {} failed (creating taps needs root or CAP_NET_ADMIN)",
                    args.join(" ")
                );
            }
        }
        Ok(Tap(name))
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "delete", &self.0])
            .status();
    }
}

pub fn run_net(args: DeviceBenchArgs) -> anyhow::Result<()> {
    let tap = Tap::new(format!("vgbench{}", std::process::id() % 10000))?;
    let bench = DeviceBench {
        scenario: "net-bench",
        keys: &["tx_pps"],
        caption: "virtio-net on a tap, 60-byte frames sent one at a time by the test guest \
                  (CPL3 polling driver), 20000 frames",
    };
    let attach = |vmm: &Vmm, cmd: &mut Command| {
        if vmm.name == "vigil" {
            cmd.arg("--net").arg(format!("tap={}", tap.0));
        } else {
            cmd.args(["-global", "virtio-mmio.force-legacy=false", "-netdev"])
                .arg(format!(
                    "tap,id=n0,ifname={},script=no,downscript=no",
                    tap.0
                ))
                .args(["-device", "virtio-net-device,netdev=n0"]);
        }
    };
    device_bench(&args, &bench, &attach)
}

pub fn run(args: BootBenchArgs) -> anyhow::Result<()> {
    if args.runs == 0 {
        bail!("--runs 0: need at least one boot");
    }
    let mut vmms = vec![vigil(args.memory)?];
    let guest_file =
        std::env::temp_dir().join(format!("vigil-bench-guest-{}.elf", std::process::id()));
    if args.qemu != "none" {
        std::fs::write(&guest_file, vigil_test_guest::ELF)
            .context("cannot write the guest image")?;
        vmms.push(qemu(&args.qemu, &guest_file, args.memory));
    }
    let results: anyhow::Result<Vec<Summary>> = vmms.iter().map(|v| measure(v, &args)).collect();
    std::fs::remove_file(&guest_file).ok();
    let results = results?;

    println!(
        "Boot of the embedded test guest (1 vCPU, {} MiB, PVH), median of {} boots; memory once the guest has printed:\n",
        args.memory, args.runs
    );
    println!("| VMM | first serial byte (ms) | exit (ms) | CPU user+sys (ms) | RSS (MiB) | VMM overhead: RSS - guest RAM resident (MiB) |");
    println!("|---|---|---|---|---|---|");
    for r in &results {
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            r.name,
            ms(r.first_byte),
            ms(r.exit),
            ms(r.cpu),
            mib(r.rss_kib),
            mib(r.overhead_kib)
        );
    }
    if let [ours, peer] = &results[..] {
        let ratio = |a: f64, b: f64| format!("{:.2}", a / b);
        println!(
            "| ratio vigil/{} | {} | {} | {} | {} | {} |",
            peer.name,
            ratio(ours.first_byte.as_secs_f64(), peer.first_byte.as_secs_f64()),
            ratio(ours.exit.as_secs_f64(), peer.exit.as_secs_f64()),
            ratio(ours.cpu.as_secs_f64(), peer.cpu.as_secs_f64()),
            ratio(ours.rss_kib as f64, peer.rss_kib as f64),
            ratio(ours.overhead_kib as f64, peer.overhead_kib as f64)
        );
    }
    Ok(())
}
