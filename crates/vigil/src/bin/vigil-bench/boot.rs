//! `vigil bench boot`: start-up time and memory of Vigil beside QEMU microvm and
//! Firecracker, on three guests, the VMMs interleaved over the rounds so that
//! the machine's load drifts over all of them alike.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use clap::{Args, ValueEnum};

use crate::peers::{self, median, resident_kib, Kind, Progress, Running, Scratch, Vmm};
use crate::pvh;

#[derive(Args, Debug)]
pub struct BootBenchArgs {
    /// Rounds; each boots every guest once under every VMM. Tables show medians.
    #[arg(long, default_value_t = 15, value_name = "N")]
    pub runs: usize,

    /// QEMU: a qemu-system-x86_64 binary, or "none".
    #[arg(long, default_value = "qemu-system-x86_64", value_name = "PATH")]
    pub qemu: String,

    /// Firecracker: its binary (run as `firecracker --no-api --config-file`).
    /// Without it, Firecracker is left out.
    #[arg(long, value_name = "PATH")]
    pub firecracker: Option<PathBuf>,

    /// Guest memory in MiB for every boot.
    #[arg(long, default_value_t = 128, value_name = "MiB")]
    pub memory: u64,

    /// The guests to boot.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "trivial,test-guest,linux"
    )]
    pub guests: Vec<GuestName>,

    /// The Linux kernel (an ELF vmlinux) [default: guest-kernels/linux-6.1-tiny/vmlinux
    /// in $VIGIL_SHARED_DIR, else ../shared]. Left out, with a message, when absent.
    #[arg(long, value_name = "PATH")]
    pub linux: Option<PathBuf>,

    /// The Linux guest's console line that ends its measurement.
    #[arg(long, default_value = "Linux version", value_name = "TEXT")]
    pub linux_line: String,

    /// Also run Vigil with --huge-pages thp, as a row of its own.
    #[arg(long)]
    pub thp: bool,

    /// Also run Vigil through the vigil-jailer beside this binary (as user 65534,
    /// the kernel linked into a fresh jail before each boot), as a row of its own:
    /// the jailer's cost. Needs root.
    #[arg(long)]
    pub jailer: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum GuestName {
    /// A minimal PVH ELF this command writes: one line on COM1, then halt.
    Trivial,
    /// Vigil's test guest (`test=hang`): its banner is the line.
    TestGuest,
    /// The small Linux kernel, until its "Linux version" line (--linux-line).
    Linux,
}

/// A guest as every VMM boots it: the same file, command line and line to wait for.
struct Guest {
    caption: String,
    kernel: PathBuf,
    cmdline: &'static str,
    line: String,
}

/// The Linux command line: the serial console from the first printk on, and what
/// this project's emulating KVM needs (PLATFORM.md), for every VMM alike.
const LINUX_CMDLINE: &str =
    "console=ttyS0 earlyprintk=serial reboot=k panic=1 noxsave clearcpuid=smap,smep,popcnt nopti";

/// How long a boot may take to its line.
const TIMEOUT: Duration = Duration::from_secs(120);

/// One boot's figures.
struct Sample {
    line: Duration,
    cpu: Duration,
    rss_kib: u64,
    guest_kib: u64,
}

/// Boots `guest` under `vmm`, waits for its line, reads the resident memory at
/// once, then stops the VMM (SIGKILL) for its CPU time.
fn boot_once(vmm: &Vmm, guest: &Guest, memory_mib: u64) -> anyhow::Result<Sample> {
    let cmd = vmm.command(&guest.kernel, guest.cmdline, memory_mib)?;
    let mut run = Running::spawn(&vmm.name, cmd)?;
    let line = run.wait_for_line(&guest.line, TIMEOUT)?;
    let (rss_kib, guest_kib) = match resident_kib(run.pid(), memory_mib) {
        Ok(figures) => figures,
        Err(e) => return Err(run.failure(&format!("{e:#}"))),
    };
    let cpu = run.kill()?;
    Ok(Sample {
        line,
        cpu,
        rss_kib,
        guest_kib,
    })
}

/// The medians of one VMM on one guest.
struct Summary {
    line: Duration,
    cpu: Duration,
    rss_kib: u64,
    guest_kib: u64,
    overhead_kib: u64,
}

fn summarize(samples: &[Sample]) -> Summary {
    Summary {
        line: median(samples.iter().map(|s| s.line).collect()),
        cpu: median(samples.iter().map(|s| s.cpu).collect()),
        rss_kib: median(samples.iter().map(|s| s.rss_kib).collect()),
        guest_kib: median(samples.iter().map(|s| s.guest_kib).collect()),
        overhead_kib: median(
            samples
                .iter()
                .map(|s| s.rss_kib.saturating_sub(s.guest_kib))
                .collect(),
        ),
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

fn mib(kib: u64) -> String {
    format!("{:.2}", kib as f64 / 1024.0)
}

fn guests(args: &BootBenchArgs, scratch: &Scratch) -> anyhow::Result<Vec<Guest>> {
    let mut guests = Vec::new();
    for name in &args.guests {
        match name {
            GuestName::Trivial => guests.push(Guest {
                caption: "Trivial PVH guest (written by this command: one line on COM1, then halt)"
                    .into(),
                kernel: scratch.write("trivial.elf", &pvh::image())?,
                cmdline: "",
                line: pvh::LINE.into(),
            }),
            GuestName::TestGuest => guests.push(Guest {
                caption: "Vigil's test guest (`test=hang`), until its banner".into(),
                kernel: scratch.write("test-guest.elf", vigil_test_guest::ELF)?,
                cmdline: "test=hang",
                line: String::new(),
            }),
            GuestName::Linux => {
                let kernel = args.linux.clone().unwrap_or_else(peers::tiny_linux);
                if !kernel.is_file() {
                    eprintln!(
                        "linux: left out: {} not found (give --linux PATH, or set VIGIL_SHARED_DIR)",
                        kernel.display()
                    );
                    continue;
                }
                guests.push(Guest {
                    caption: format!(
                        "Linux ({}), until its {:?} line",
                        kernel.display(),
                        args.linux_line
                    ),
                    kernel,
                    cmdline: LINUX_CMDLINE,
                    line: args.linux_line.clone(),
                });
            }
        }
    }
    Ok(guests)
}

pub fn run(args: BootBenchArgs) -> anyhow::Result<()> {
    if args.runs == 0 {
        bail!("--runs 0: need at least one round");
    }
    let scratch = Scratch::new("boot")?;
    let mut vmms = vec![Vmm::vigil("vigil", &[])?];
    if args.thp {
        vmms.push(Vmm::vigil(
            "vigil --huge-pages thp",
            &["--huge-pages", "thp"],
        )?);
    }
    if args.jailer {
        vmms.push(Vmm::jailed_vigil(&scratch.0)?);
    }
    if args.qemu != "none" {
        vmms.push(Vmm::qemu(&args.qemu));
    }
    match &args.firecracker {
        Some(path) => vmms.push(Vmm::firecracker(path, &scratch.0)?),
        None => eprintln!("firecracker: left out (give --firecracker PATH to compare with it)"),
    }
    let guests = guests(&args, &scratch)?;

    // samples[guest][vmm]; each round starts with the next VMM.
    let mut samples: Vec<Vec<Vec<Sample>>> = guests
        .iter()
        .map(|_| vmms.iter().map(|_| Vec::new()).collect())
        .collect();
    let progress = Progress::new();
    for round in 0..args.runs {
        for (g, guest) in guests.iter().enumerate() {
            for k in 0..vmms.len() {
                let v = (round + k) % vmms.len();
                progress.show(&format!(
                    "round {}/{}: {} on {}",
                    round + 1,
                    args.runs,
                    vmms[v].name,
                    guest.kernel.display()
                ));
                samples[g][v].push(boot_once(&vmms[v], guest, args.memory)?);
            }
        }
    }
    progress.done();

    println!(
        "Boot: 1 vCPU, {} MiB, medians of {} rounds (VMMs interleaved). \"line\": from the \
         VMM's spawn to the guest's line on its serial console (read from a pipe); CPU: user + \
         system time of the VMM process until it is stopped right after the line; RSS: read \
         from /proc/PID/smaps at the line; guest RAM: the resident part of the guest memory \
         mapping; VMM overhead: RSS - guest RAM.",
        args.memory, args.runs
    );
    for (guest, per_vmm) in guests.iter().zip(&samples) {
        let sums: Vec<Summary> = per_vmm.iter().map(|s| summarize(s)).collect();
        println!("\n{}:\n", guest.caption);
        println!(
            "| VMM | line (ms) | CPU (ms) | RSS (MiB) | guest RAM (MiB) | VMM overhead (MiB) |"
        );
        println!("|---|---|---|---|---|---|");
        for (vmm, s) in vmms.iter().zip(&sums) {
            println!(
                "| {} | {} | {} | {} | {} | {} |",
                vmm.name,
                ms(s.line),
                ms(s.cpu),
                mib(s.rss_kib),
                mib(s.guest_kib),
                mib(s.overhead_kib)
            );
        }
        let ours = &sums[0];
        let ratio = |a: f64, b: f64| format!("{:.2}", a / b);
        for (vmm, peer) in vmms.iter().zip(&sums) {
            if let Kind::Vigil(_) | Kind::JailedVigil(_) = vmm.kind {
                continue;
            }
            println!(
                "| ratio vigil/{} | {} | {} | {} | {} | {} |",
                vmm.name,
                ratio(ours.line.as_secs_f64(), peer.line.as_secs_f64()),
                ratio(ours.cpu.as_secs_f64(), peer.cpu.as_secs_f64()),
                ratio(ours.rss_kib as f64, peer.rss_kib as f64),
                ratio(ours.guest_kib as f64, peer.guest_kib as f64),
                ratio(ours.overhead_kib as f64, peer.overhead_kib as f64)
            );
        }
    }
    Ok(())
}
