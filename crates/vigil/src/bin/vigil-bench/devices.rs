//! `vigil bench blk|net`: the test guest's virtio-blk and virtio-net benchmarks
//! under Vigil and under QEMU microvm, in the same invocation, the VMMs
//! interleaved round by round.

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};

use anyhow::{bail, Context};
use clap::Args;

use crate::peers::{median, shell_line, wait_with_usage, Kind, Progress, Scratch, Vmm};

#[derive(Args, Debug)]
pub struct DeviceBenchArgs {
    /// Rounds per VMM; the table shows the median.
    #[arg(long, default_value_t = 3, value_name = "N")]
    pub runs: usize,

    /// The peer to compare with: a qemu-system-x86_64 binary, or "none".
    #[arg(long, default_value = "qemu-system-x86_64", value_name = "PATH")]
    pub qemu: String,

    /// Also run Vigil with --no-seccomp, as a row of its own: what its seccomp
    /// filters cost on the device path.
    #[arg(long)]
    pub no_seccomp: bool,

    /// Also run Vigil with --enable-pci, as a row of its own: the device on
    /// virtio-pci (MSI-X) against the default virtio-mmio.
    #[arg(long)]
    pub pci: bool,
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

/// Runs `bench.scenario` once on `guest`; `attach` adds the device to the VMM's
/// command line. Returns the figures of `bench.keys`, then the VMM's CPU time for
/// the whole run (boot included) in ms.
fn device_once(
    vmm: &Vmm,
    guest: &Path,
    bench: &DeviceBench,
    attach: &dyn Fn(&Vmm, &mut Command),
) -> anyhow::Result<Vec<u64>> {
    let mut cmd = vmm.command(guest, &format!("test={}", bench.scenario), 128)?;
    attach(vmm, &mut cmd);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("{}: cannot start `{}`", vmm.name, shell_line(&cmd)))?;
    let mut err = child.stderr.take().expect("stderr piped");
    let stderr = std::thread::spawn(move || {
        let mut s = String::new();
        err.read_to_string(&mut s).ok();
        s
    });
    let mut text = String::new();
    child
        .stdout
        .take()
        .expect("stdout piped")
        .read_to_string(&mut text)
        .ok();
    let (status, cpu) = wait_with_usage(&mut child)?;
    let prefix = format!("TEST {} PASS", bench.scenario);
    let line = text
        .lines()
        .find(|l| l.starts_with(&prefix))
        .with_context(|| {
            format!(
                "{}: {} did not pass ({status})\ncommand: {}\nconsole:\n{text}\nstderr:\n{}",
                vmm.name,
                bench.scenario,
                shell_line(&cmd),
                stderr.join().unwrap_or_default()
            )
        })?;
    let figures: Vec<(&str, u64)> = line
        .split_whitespace()
        .filter_map(|w| w.split_once('='))
        .filter_map(|(k, v)| Some((k, v.parse().ok()?)))
        .collect();
    let mut out = bench
        .keys
        .iter()
        .map(|k| {
            figures
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| *v)
                .with_context(|| format!("{}: no {k} in {line}", vmm.name))
        })
        .collect::<anyhow::Result<Vec<u64>>>()?;
    out.push(cpu.as_millis() as u64);
    Ok(out)
}

/// Runs `bench` under Vigil (and without seccomp when asked) and the peer,
/// interleaved round by round (each round starting with the next VMM), and
/// prints the medians with each Vigil row's ratio to the peer.
fn device_bench(
    args: &DeviceBenchArgs,
    bench: &DeviceBench,
    attach: &dyn Fn(&Vmm, &mut Command),
) -> anyhow::Result<()> {
    if args.runs == 0 {
        bail!("--runs 0: need at least one round");
    }
    let scratch = Scratch::new("device")?;
    let guest = scratch.write("guest.elf", vigil_test_guest::ELF)?;
    let mut vmms = vec![Vmm::vigil("vigil", &[])?];
    if args.no_seccomp {
        vmms.push(Vmm::vigil("vigil (no seccomp)", &["--no-seccomp"])?);
    }
    if args.pci {
        vmms.push(Vmm::vigil("vigil (pci)", &["--enable-pci"])?);
    }
    if args.qemu != "none" {
        vmms.push(Vmm::qemu(&args.qemu));
    }
    let progress = Progress::new();
    let mut rounds: Vec<Vec<Vec<u64>>> = vec![Vec::new(); vmms.len()];
    for round in 0..args.runs {
        for k in 0..vmms.len() {
            let i = (round + k) % vmms.len();
            rounds[i].push(device_once(&vmms[i], &guest, bench, attach)?);
            progress.show(&format!(
                "round {}/{}: {}",
                round + 1,
                args.runs,
                vmms[i].name
            ));
        }
    }
    progress.done();
    let columns = bench.keys.len() + 1;
    let medians: Vec<Vec<u64>> = rounds
        .iter()
        .map(|r| {
            (0..columns)
                .map(|c| median(r.iter().map(|x| x[c]).collect()))
                .collect()
        })
        .collect();

    println!(
        "{}, medians of {} rounds (VMMs interleaved); VMM CPU: user + system time of the \
         VMM process for the whole run, boot included:\n",
        bench.caption, args.runs
    );
    println!("| VMM | {} | VMM CPU (ms) |", bench.keys.join(" | "));
    println!("|---|{}", "---|".repeat(columns));
    for (vmm, m) in vmms.iter().zip(&medians) {
        let cells: Vec<String> = m.iter().map(u64::to_string).collect();
        println!("| {} | {} |", vmm.name, cells.join(" | "));
    }
    if let (true, Some(peer)) = (args.qemu != "none", medians.last()) {
        let peer_name = &vmms[vmms.len() - 1].name;
        for (vmm, ours) in vmms.iter().zip(&medians).take(vmms.len() - 1) {
            let cells: Vec<String> = ours
                .iter()
                .zip(peer)
                .map(|(a, b)| format!("{:.2}", *a as f64 / (*b).max(1) as f64))
                .collect();
            println!("| ratio {}/{peer_name} | {} |", vmm.name, cells.join(" | "));
        }
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
        if let Kind::Vigil(_) = vmm.kind {
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
        if let Kind::Vigil(_) = vmm.kind {
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
