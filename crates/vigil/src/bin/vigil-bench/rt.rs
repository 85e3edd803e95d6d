//! `vigil bench rt`: how late a real-time guest's periodic task runs when its vCPU
//! shares a host CPU with CPU hogs, under Vigil's vCPU scheduling policies and its
//! RT timer device, beside QEMU with the vCPU thread left to CFS or made SCHED_FIFO.
//! The test guest's `rt` scenario measures its own lateness; the hogs are threads
//! of this process, pinned to the vCPU's CPU, counting.

use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Child;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};

use crate::peers::{median, shell_line, Progress, Scratch, Vmm};

#[derive(Args, Debug)]
pub struct RtBenchArgs {
    /// Rounds; each runs every case with every hog count once. Tables show medians.
    #[arg(long, default_value_t = 10, value_name = "N")]
    pub runs: usize,

    /// Periods of 1 ms the guest measures per run (`rt_periods=`, 10 to 1000000).
    #[arg(long, default_value_t = 2000, value_name = "N")]
    pub periods: u64,

    /// CPU hogs beside the vCPU, comma-separated counts.
    #[arg(long, value_delimiter = ',', default_value = "0,1,2", value_name = "N")]
    pub hogs: Vec<usize>,

    /// The host CPU for the vCPU and the hogs [default: the last CPU this
    /// process may use].
    #[arg(long, value_name = "CPU")]
    pub cpu: Option<u32>,

    /// The cases, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "vigil-cfs,vigil-fifo,vigil-deadline,vigil-rt-timer,qemu-cfs,qemu-fifo"
    )]
    pub cases: Vec<Case>,

    /// QEMU: a qemu-system-x86_64 binary, or "none" (the qemu cases are left out).
    #[arg(long, default_value = "qemu-system-x86_64", value_name = "PATH")]
    pub qemu: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Case {
    /// Vigil, vCPU thread SCHED_OTHER pinned to the CPU (`--vcpu-sched`).
    VigilCfs,
    /// Vigil, vCPU thread SCHED_FIFO priority 10 pinned to the CPU.
    VigilFifo,
    /// Vigil, vCPU thread SCHED_DEADLINE 300 µs every 1 ms (not pinned: the kernel
    /// refuses SCHED_DEADLINE to a thread narrower than its root domain).
    VigilDeadline,
    /// Vigil with the RT timer device (`--rt-timer on`), the guest in `rt_mode=pv`,
    /// vCPU thread SCHED_OTHER pinned to the CPU.
    VigilRtTimer,
    /// QEMU microvm pinned to the CPU, its vCPU thread left to CFS.
    QemuCfs,
    /// QEMU microvm pinned to the CPU, its vCPU thread (`CPU 0/KVM`) made
    /// SCHED_FIFO priority 10 as soon as it exists.
    QemuFifo,
}

impl Case {
    fn name(self) -> &'static str {
        match self {
            Case::VigilCfs => "vigil cfs",
            Case::VigilFifo => "vigil fifo",
            Case::VigilDeadline => "vigil deadline",
            Case::VigilRtTimer => "vigil rt-timer",
            Case::QemuCfs => "qemu cfs",
            Case::QemuFifo => "qemu fifo",
        }
    }

    fn is_qemu(self) -> bool {
        matches!(self, Case::QemuCfs | Case::QemuFifo)
    }
}

/// SCHED_FIFO priority of the fifo cases.
const FIFO_PRIORITY: i32 = 10;
/// QEMU's vCPU thread name with `-name ...,debug-threads=on`.
const QEMU_VCPU_THREAD: &str = "CPU 0/KVM";
/// Longest one run may take beyond its periods.
const SLACK: Duration = Duration::from_secs(60);

/// How one case runs: the VMM, its extra arguments, the guest's mode, and what this
/// command does to the VMM's threads itself.
struct Plan {
    case: Case,
    vmm: Vmm,
    extra: Vec<String>,
    mode: &'static str,
    /// Pin the whole VMM process to the CPU from its start (what `--vcpu-sched`
    /// does for Vigil's vCPU thread alone).
    pin_process: bool,
    /// Make this thread SCHED_FIFO as soon as it exists.
    fifo_thread: Option<&'static str>,
    /// What the table says about it besides its name.
    note: Option<String>,
}

impl Plan {
    fn new(case: Case, cpu: u32, qemu: &str) -> anyhow::Result<Plan> {
        let sched = |policy: &str| vec!["--vcpu-sched".to_string(), format!("vcpu=0,{policy}")];
        let vigil = |extra: Vec<String>| -> anyhow::Result<Plan> {
            Ok(Plan {
                case,
                vmm: Vmm::vigil("vigil", &[])?,
                extra,
                mode: "lapic",
                pin_process: false,
                fifo_thread: None,
                note: None,
            })
        };
        let qemu_plan = |fifo| Plan {
            case,
            vmm: Vmm::qemu(qemu),
            extra: vec!["-name".into(), "rt,debug-threads=on".into()],
            mode: "lapic",
            pin_process: true,
            fifo_thread: fifo,
            note: None,
        };
        Ok(match case {
            Case::VigilCfs => vigil(sched(&format!("policy=other,cpus={cpu}")))?,
            Case::VigilFifo => vigil(sched(&format!(
                "policy=fifo,priority={FIFO_PRIORITY},cpus={cpu}"
            )))?,
            Case::VigilDeadline => {
                let mut plan = vigil(sched(
                    "policy=deadline,runtime=300us,deadline=1ms,period=1ms",
                ))?;
                plan.note = Some("not pinned: SCHED_DEADLINE floats over the root domain".into());
                plan
            }
            Case::VigilRtTimer => {
                let mut extra = vec!["--rt-timer".to_string(), "on".into()];
                extra.extend(sched(&format!("policy=other,cpus={cpu}")));
                let mut plan = vigil(extra)?;
                plan.mode = "pv";
                plan
            }
            Case::QemuCfs => qemu_plan(None),
            Case::QemuFifo => qemu_plan(Some(QEMU_VCPU_THREAD)),
        })
    }

    /// Vigil cfs without `--vcpu-sched` (a Vigil that does not have it): the whole
    /// process pinned by this command instead.
    fn cfs_without_vcpu_sched(&mut self) {
        self.extra.clear();
        self.pin_process = true;
        self.note = Some("--vcpu-sched refused: the whole process pinned by the bench".into());
    }
}

/// What the guest's PASS line said, and the hogs' rate beside it.
#[derive(Clone, Copy)]
struct Sample {
    p50_us: u64,
    p99_us: u64,
    max_us: u64,
    missed: u64,
    /// Hog iterations per second, summed over the hogs.
    hog_rate: u64,
}

/// A run that did not give a PASS line: a one-line reason and everything else.
struct Failure {
    reason: String,
    full: String,
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Failure {
        Failure {
            reason: e.to_string(),
            full: format!("{e:#}"),
        }
    }
}

/// CPU `cpu` alone, for sched_setaffinity.
fn cpu_set(cpu: u32) -> libc::cpu_set_t {
    // SAFETY: cpu_set_t is plain data; CPU_SET stays within it for cpu < CPU_SETSIZE,
    // which the caller checked.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        set
    }
}

/// Pins thread (or process) `tid` (0: the calling thread) to `cpu`.
fn pin(tid: libc::pid_t, cpu: u32) -> std::io::Result<()> {
    let set = cpu_set(cpu);
    // SAFETY: set is a valid cpu_set_t of the size given.
    let r = unsafe { libc::sched_setaffinity(tid, std::mem::size_of_val(&set), &set) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The last CPU this process may run on.
fn last_cpu() -> anyhow::Result<u32> {
    // SAFETY: as in cpu_set; sched_getaffinity fills the set it is given.
    let set = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) != 0 {
            bail!("sched_getaffinity: {}", std::io::Error::last_os_error());
        }
        set
    };
    (0..libc::CPU_SETSIZE as u32)
        .rev()
        // SAFETY: cpu < CPU_SETSIZE.
        .find(|&cpu| unsafe { libc::CPU_ISSET(cpu as usize, &set) })
        .context("this process may run on no CPU")
}

/// CPU hogs: threads pinned to one CPU, counting, stopped and joined when dropped
/// (every way out of the benchmark drops them).
struct Hogs {
    stop: Arc<AtomicBool>,
    counts: Vec<Arc<AtomicU64>>,
    threads: Vec<JoinHandle<()>>,
}

impl Hogs {
    fn start(n: usize, cpu: u32) -> anyhow::Result<Hogs> {
        let mut hogs = Hogs {
            stop: Arc::new(AtomicBool::new(false)),
            counts: Vec::new(),
            threads: Vec::new(),
        };
        for i in 0..n {
            let (stop, count) = (hogs.stop.clone(), Arc::new(AtomicU64::new(0)));
            hogs.counts.push(count.clone());
            let (tx, rx) = std::sync::mpsc::channel();
            let thread = std::thread::Builder::new()
                .name(format!("hog{i}"))
                .spawn(move || {
                    let pinned = pin(0, cpu);
                    let ok = pinned.is_ok();
                    let _ = tx.send(pinned);
                    let mut n = 0u64;
                    while ok && !stop.load(Ordering::Relaxed) {
                        for _ in 0..(1 << 16) {
                            n = std::hint::black_box(n + 1);
                        }
                        count.store(n, Ordering::Relaxed);
                    }
                })
                .context("cannot start a hog thread")?;
            hogs.threads.push(thread);
            rx.recv()
                .context("a hog thread ended at once")?
                .with_context(|| format!("cannot pin a hog to CPU {cpu}"))?;
        }
        Ok(hogs)
    }

    /// Iterations so far, all hogs together.
    fn total(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}

impl Drop for Hogs {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// A VMM child killed and reaped when dropped, unless it already was.
struct Reaped(Option<Child>);

impl Reaped {
    fn child(&mut self) -> &mut Child {
        self.0.as_mut().expect("the child is kept until drop")
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The thread ids of `pid` whose name is `name`.
fn find_thread(pid: u32, name: &str) -> Option<libc::pid_t> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?;
    tasks.flatten().find_map(|task| {
        let comm = std::fs::read_to_string(task.path().join("comm")).ok()?;
        (comm.trim_end() == name)
            .then(|| task.file_name().to_str()?.parse().ok())
            .flatten()
    })
}

fn make_fifo(tid: libc::pid_t) -> std::io::Result<()> {
    let param = libc::sched_param {
        sched_priority: FIFO_PRIORITY,
    };
    // SAFETY: param is a valid sched_param; tid is a thread of our child.
    if unsafe { libc::sched_setscheduler(tid, libc::SCHED_FIFO, &param) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The figures `keys` of the `TEST rt PASS` line in `console`.
fn pass_figures(console: &str, keys: &[&str]) -> Option<Vec<u64>> {
    let line = console.lines().find(|l| l.starts_with("TEST rt PASS"))?;
    keys.iter()
        .map(|key| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))?
                .parse()
                .ok()
        })
        .collect()
}

/// One run of `plan` with `hogs` running (their rate measured over the run).
fn run_once(
    plan: &Plan,
    guest: &Path,
    periods: u64,
    cpu: u32,
    hogs: &Hogs,
) -> Result<Sample, Failure> {
    let cmdline = format!("test=rt rt_mode={} rt_periods={periods}", plan.mode);
    let mut cmd = plan.vmm.command(guest, &cmdline, 128)?;
    cmd.args(&plan.extra);
    if plan.pin_process {
        let set = cpu_set(cpu);
        // SAFETY: between fork and exec the closure only calls sched_setaffinity,
        // which is async-signal-safe, on a set copied in before the fork.
        unsafe {
            cmd.pre_exec(move || {
                if libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
    }
    let command = shell_line(&cmd);
    let started = Instant::now();
    let hog_start = hogs.total();
    let mut child = Reaped(Some(cmd.spawn().map_err(|e| Failure {
        reason: format!("cannot start {}: {e}", plan.vmm.program().display()),
        full: format!("cannot start `{command}`: {e}"),
    })?));
    let output_seen = Arc::new(AtomicBool::new(false));
    let mut stdout = child.child().stdout.take().expect("stdout is piped");
    let mut stderr = child.child().stderr.take().expect("stderr is piped");
    let seen = output_seen.clone();
    let console = std::thread::spawn(move || {
        let mut text = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n @ 1..) = stdout.read(&mut buf) {
            seen.store(true, Ordering::SeqCst);
            text.extend_from_slice(&buf[..n]);
        }
        String::from_utf8_lossy(&text).into_owned()
    });
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let timeout = Duration::from_millis(periods) + SLACK;
    let mut thread_problem = None;
    if let Some(name) = plan.fifo_thread {
        let pid = child.child().id();
        thread_problem = Some(format!("no thread {name:?} within {timeout:?}"));
        while started.elapsed() < timeout {
            if let Some(tid) = find_thread(pid, name) {
                thread_problem = match make_fifo(tid) {
                    Err(e) => Some(format!("cannot make {name:?} SCHED_FIFO: {e}")),
                    // The guest prints its banner before its scenario starts.
                    Ok(()) if output_seen.load(Ordering::SeqCst) => Some(format!(
                        "{name:?} became SCHED_FIFO only after the guest had started"
                    )),
                    Ok(()) => None,
                };
                break;
            }
            if let Ok(Some(_)) = child.child().try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    let status = wait_until(child.child(), started + timeout);
    let elapsed = started.elapsed();
    let hog_rate = ((hogs.total() - hog_start) as f64 / elapsed.as_secs_f64()) as u64;
    drop(child);
    let console = console.join().unwrap_or_default();
    let stderr = errors.join().unwrap_or_default();
    let full =
        |why: &str| format!("{why}\ncommand: {command}\nconsole:\n{console}stderr:\n{stderr}");
    if let Some(problem) = thread_problem {
        return Err(Failure {
            full: full(&problem),
            reason: problem,
        });
    }
    let keys = ["p50_us", "p99_us", "max_us", "missed"];
    match pass_figures(&console, &keys) {
        Some(f) => Ok(Sample {
            p50_us: f[0],
            p99_us: f[1],
            max_us: f[2],
            missed: f[3],
            hog_rate,
        }),
        None => {
            // The guest's verdict, else what the VMM said first (a refused flag).
            let reason = console
                .lines()
                .find(|l| l.starts_with("TEST rt "))
                .or_else(|| stderr.lines().find(|l| !l.trim().is_empty()))
                .map(str::to_owned)
                .unwrap_or_else(|| format!("no TEST rt line ({status})"));
            Err(Failure {
                full: full(&format!("{} ({status})", plan.case.name())),
                reason,
            })
        }
    }
}

/// Waits for `child` until `deadline`, then kills it; its status either way.
fn wait_until(child: &mut Child, deadline: Instant) -> String {
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status.to_string(),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return "killed: ran past its time".into();
            }
            Err(e) => return format!("wait: {e}"),
        }
    }
}

pub fn run(args: RtBenchArgs) -> anyhow::Result<()> {
    if args.runs == 0 {
        bail!("--runs 0: need at least one round");
    }
    if !(10..=1_000_000).contains(&args.periods) {
        bail!("--periods {}: expected 10 to 1000000", args.periods);
    }
    if args.hogs.is_empty() || args.cases.is_empty() {
        bail!("--hogs and --cases need at least one entry each");
    }
    let cpu = match args.cpu {
        Some(cpu) if cpu as usize >= libc::CPU_SETSIZE as usize => {
            bail!(
                "--cpu {cpu}: above the most CPUs Linux has, {}",
                libc::CPU_SETSIZE
            )
        }
        Some(cpu) => cpu,
        None => last_cpu()?,
    };
    // Fails now, with the reason, when the CPU cannot take a thread.
    drop(Hogs::start(1, cpu).with_context(|| format!("--cpu {cpu}"))?);
    let scratch = Scratch::new("rt")?;
    let guest = scratch.write("guest.elf", vigil_test_guest::ELF)?;

    // A short run of each case first: a VMM that refuses a flag (a Vigil without
    // the RT features, a kernel without SCHED_DEADLINE bandwidth) leaves it out.
    let progress = Progress::new();
    let mut plans = Vec::new();
    let mut skipped = Vec::new();
    let none = Hogs::start(0, cpu)?;
    for &case in &args.cases {
        if case.is_qemu() && args.qemu == "none" {
            continue;
        }
        let mut plan = Plan::new(case, cpu, &args.qemu)?;
        progress.show(&format!("trying {}", case.name()));
        let mut outcome = run_once(&plan, &guest, 10, cpu, &none);
        if case == Case::VigilCfs {
            if let Err(refused) = &outcome {
                if refused.reason.contains("--vcpu-sched") {
                    plan.cfs_without_vcpu_sched();
                    outcome = run_once(&plan, &guest, 10, cpu, &none);
                }
            }
        }
        match outcome {
            Ok(_) => plans.push(plan),
            Err(failure) => {
                progress.done();
                eprintln!("skipping {}: {}", case.name(), failure.full);
                skipped.push((case, failure.reason));
            }
        }
    }
    progress.done();
    if plans.is_empty() {
        bail!("every case was skipped (see above)");
    }

    // samples[plan][hog count index], one per round; each round starts with the
    // next case.
    let mut samples = vec![vec![Vec::new(); args.hogs.len()]; plans.len()];
    for round in 0..args.runs {
        for (h, &n) in args.hogs.iter().enumerate() {
            let hogs = Hogs::start(n, cpu)?;
            for k in 0..plans.len() {
                let p = (round + k) % plans.len();
                let plan = &plans[p];
                progress.show(&format!(
                    "round {}/{}: {}, {n} hog(s)",
                    round + 1,
                    args.runs,
                    plan.case.name()
                ));
                let sample = run_once(plan, &guest, args.periods, cpu, &hogs)
                    .map_err(|f| anyhow::anyhow!("{}", f.full))?;
                samples[p][h].push(sample);
            }
        }
    }
    progress.done();

    println!(
        "Real-time guest: lateness of the test guest's 1 ms periodic task at CPL0 \
         (`test=rt rt_periods={}`: deadlines on a fixed TSC grid; lateness = the handler's \
         `rdtsc` less the deadline), the vCPU on host CPU {cpu} with 0 to {} CPU hogs \
         (threads counting, pinned there); medians of {} rounds, cases interleaved. \
         Hog rate: their iterations per second, summed, during the run.\n",
        args.periods,
        args.hogs.iter().max().unwrap_or(&0),
        args.runs
    );
    println!("| case | hogs | p50 (µs) | p99 (µs) | max (µs) | missed | hog rate (M/s) | p99 / vigil fifo, 0 hogs |");
    println!("|---|---|---|---|---|---|---|---|");
    let med = |v: &[Sample], f: fn(&Sample) -> u64| median(v.iter().map(f).collect());
    let reference = plans
        .iter()
        .position(|p| p.case == Case::VigilFifo)
        .zip(args.hogs.iter().position(|&n| n == 0))
        .map(|(p, h)| med(&samples[p][h], |s| s.p99_us).max(1));
    for (p, plan) in plans.iter().enumerate() {
        for (h, &n) in args.hogs.iter().enumerate() {
            let v = &samples[p][h];
            let p99 = med(v, |s| s.p99_us);
            let rate = if n == 0 {
                "-".to_string()
            } else {
                format!("{:.0}", med(v, |s| s.hog_rate) as f64 / 1e6)
            };
            let ratio = reference
                .map(|r| format!("{:.2}", p99 as f64 / r as f64))
                .unwrap_or_else(|| "-".into());
            println!(
                "| {} | {n} | {} | {p99} | {} | {} | {rate} | {ratio} |",
                plan.case.name(),
                med(v, |s| s.p50_us),
                med(v, |s| s.max_us),
                med(v, |s| s.missed),
            );
        }
    }
    let notes: Vec<String> = plans
        .iter()
        .filter_map(|p| Some(format!("- {}: {}", p.case.name(), p.note.as_ref()?)))
        .chain(
            skipped
                .iter()
                .map(|(case, why)| format!("- {} skipped: {why}", case.name())),
        )
        .collect();
    if !notes.is_empty() {
        println!("\n{}", notes.join("\n"));
    }
    Ok(())
}
