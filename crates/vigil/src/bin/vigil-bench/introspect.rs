//! `vigil bench introspect`: what introspection costs.
//!
//! 1. The integrity monitor's CPU on a Linux kernel (`linux-6.1-tiny`), booted in
//!    this process and kept, paused, at the emulation failure this machine's KVM
//!    stops it on (`--on-crash pause`; on a hardware KVM it would run on, so the
//!    figures would include the guest): the guest uses no CPU, so what the process
//!    uses with the monitor on, less what it uses with it off over the same
//!    window, is the monitor's cost (its thread, the vCPU threads answering its
//!    register reads, the dirty-log ioctls and the merge of the guest memory's
//!    dirty bitmap). Periods 1 s, 100 ms and 10 ms; and a
//!    full check without the dirty log (every text and read-only page re-hashed)
//!    for comparison.
//! 2. System call tracing: the test guest's `syscall-loop` scenario untraced,
//!    with a tracer whose filter keeps nothing (the bare breakpoint round trip),
//!    and traced to a file: ns per call each, and the differences.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use clap::Args;
use vigil_introspect::live::{cpu_state, Introspector, MonitorSettings};
use vigil_introspect::{kaslr_slide, Baseline, Checker, CpuState, KernelLayout};
use vigil_metrics::IntrospectCounters;
use vigil_model::config::{ConsoleConfig, CpuTemplate, HugePages, KernelImage, OnCrash, VmConfig};
use vigil_shared::siblings;
use vigil_vmm::VmInspect;

#[derive(Args, Debug)]
pub struct IntrospectBenchArgs {
    /// The Linux kernel (an ELF vmlinux with a PVH note). Default:
    /// guest-kernels/linux-6.1-tiny/vmlinux in $VIGIL_SHARED_DIR or ../shared.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,

    /// Its System.map. Default: System.map beside the kernel.
    #[arg(long, value_name = "PATH")]
    pub symbols: Option<PathBuf>,

    /// Length of each measuring window (monitor off, and each period), seconds.
    #[arg(long, default_value_t = 10, value_name = "N")]
    pub seconds: u64,

    /// System calls the test guest makes per tracing run.
    #[arg(long, default_value_t = 20000, value_name = "N")]
    pub syscalls: u64,

    /// Runs of each tracing variant (the median is shown).
    #[arg(long, default_value_t = 3, value_name = "N")]
    pub runs: usize,
}

/// The kernel and its map, from the options or the shared folder.
fn kernel_paths(args: &IntrospectBenchArgs) -> anyhow::Result<(PathBuf, PathBuf)> {
    let kernel = match &args.kernel {
        Some(k) => k.clone(),
        None => crate::peers::tiny_linux(),
    };
    if !kernel.is_file() {
        bail!(
            "kernel {}: not found (give --kernel PATH, or set VIGIL_SHARED_DIR to the folder holding guest-kernels/linux-6.1-tiny)",
            kernel.display()
        );
    }
    let symbols = match &args.symbols {
        Some(s) => s.clone(),
        None => kernel.with_file_name("System.map"),
    };
    if !symbols.is_file() {
        bail!(
            "symbols {}: not found (give --symbols PATH)",
            symbols.display()
        );
    }
    Ok((kernel, symbols))
}

/// CPU time of the whole process (all threads), precise to the scheduler's ns.
fn process_cpu() -> Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a pointer to a timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// CPU time of this process's threads named `name` (from /proc/self/task/*/schedstat).
fn thread_cpu(name: &str) -> Duration {
    let mut total = 0u64;
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for t in tasks.flatten() {
            let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
            if comm.trim_end() != name {
                continue;
            }
            let stat = std::fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
            total += stat
                .split_whitespace()
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Duration::from_nanos(total)
}

/// One window's figures.
struct Window {
    label: String,
    wall: Duration,
    process_cpu: Duration,
    monitor_thread_cpu: Duration,
    checks: u64,
    check_ns_sum: u64,
    pages_hashed: u64,
}

fn measure(label: String, counters: &IntrospectCounters, seconds: u64) -> Window {
    let before = counters.snapshot();
    let (cpu0, thread0, t0) = (process_cpu(), thread_cpu("introspect"), Instant::now());
    std::thread::sleep(Duration::from_secs(seconds));
    let (cpu1, thread1, wall) = (process_cpu(), thread_cpu("introspect"), t0.elapsed());
    let after = counters.snapshot();
    Window {
        label,
        wall,
        process_cpu: cpu1.saturating_sub(cpu0),
        monitor_thread_cpu: thread1.saturating_sub(thread0),
        checks: after.checks - before.checks,
        check_ns_sum: after.check_time.sum_ns - before.check_time.sum_ns,
        pages_hashed: after.pages_hashed - before.pages_hashed,
    }
}

fn pct(cpu: Duration, wall: Duration) -> f64 {
    100.0 * cpu.as_secs_f64() / wall.as_secs_f64()
}

/// A VM kept, paused, at its crash, and the thread waiting for it to end.
struct KeptVm {
    inspect: VmInspect,
    counters: std::sync::Arc<IntrospectCounters>,
    crash: String,
    stop: vigil_vmm::StopHandle,
    waiter: std::thread::JoinHandle<()>,
}

/// Boots the kernel in this process and waits for its emulation failure.
fn boot_until_crash(kernel: &Path, symbols: &Path) -> anyhow::Result<(KeptVm, Duration)> {
    let mut config = VmConfig::new(KernelImage::File(kernel.to_owned()));
    config.boot.cmdline = "console=ttyS0 earlyprintk=serial".into();
    config.machine.vcpu_count = 2;
    config.machine.mem_size_mib = 256;
    config.machine.huge_pages = HugePages::Transparent;
    config.console = ConsoleConfig::None;
    config.boot.symbols = Some(symbols.to_owned());
    // Offers XSAVE: on this machine's emulating KVM the kernel stops on `xrstor`
    // in its FPU set-up, after its IDT, GDT and LSTAR are in place.
    config.machine.cpu_template = CpuTemplate::Host;
    config.on_crash = OnCrash::Pause;
    let started = Instant::now();
    let vm = vigil_vmm::builder::build(&config)?;
    let running = vm.start().context("cannot start the VM's threads")?;
    let control = running.control();
    let inspect = running.inspect();
    let counters = running.metrics().metrics().introspect().clone();
    let stop = running.stop_handle();
    let waiter = std::thread::Builder::new()
        .name("bench-wait".into())
        .spawn(move || {
            let _ = running.wait_reporting(&mut |_| {});
        })
        .context("cannot start a thread")?;
    let deadline = started + Duration::from_secs(300);
    while control.crashed().is_none() {
        if Instant::now() > deadline || inspect.is_stopping() {
            stop.stop(libc::SIGTERM);
            let _ = waiter.join();
            bail!(
                "the kernel did not stop on an emulation failure within 300 s (on a hardware-backed KVM it does not: this benchmark keeps the guest idle by keeping it crashed)"
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let kept = KeptVm {
        inspect,
        counters,
        crash: control.crashed().unwrap_or_default(),
        stop,
        waiter,
    };
    Ok((kept, started.elapsed()))
}

fn wait_baseline(intro: &Introspector) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !intro.status().baseline_taken {
        if Instant::now() > deadline {
            bail!("the monitor took no baseline within 60 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

fn cpus(inspect: &VmInspect) -> anyhow::Result<Vec<CpuState>> {
    Ok(inspect
        .vcpu_states()
        .map_err(|e| anyhow!("vCPU states: {e}"))?
        .iter()
        .map(cpu_state)
        .collect())
}

fn monitor_bench(args: &IntrospectBenchArgs) -> anyhow::Result<()> {
    let (kernel, symbols_path) = kernel_paths(args)?;
    eprintln!(
        "booting {} until its emulation failure...",
        kernel.display()
    );
    let (vm, took) = boot_until_crash(&kernel, &symbols_path)?;
    eprintln!("kept, paused after {took:.1?}: {}", vm.crash);
    let inspect = &vm.inspect;
    // The VM's own symbols (its --symbols), as the monitor reads them.
    let symbols = inspect
        .symbols()
        .get()
        .ok_or_else(|| anyhow!("{}: no symbols", symbols_path.display()))?;
    let intro = Introspector::new(inspect.clone(), vm.counters.clone());

    let mut windows = Vec::new();
    eprintln!("monitor off, {} s...", args.seconds);
    windows.push(measure("monitor off".into(), &vm.counters, args.seconds));
    for period in [
        Duration::from_secs(1),
        Duration::from_millis(100),
        Duration::from_millis(10),
    ] {
        intro
            .start_monitor(MonitorSettings {
                period,
                ..MonitorSettings::default()
            })
            .map_err(|e| anyhow!("{e}"))?;
        // The baseline (every page hashed once) is not part of the steady state.
        wait_baseline(&intro)?;
        std::thread::sleep(Duration::from_millis(50));
        eprintln!("monitor every {period:?}, {} s...", args.seconds);
        windows.push(measure(
            format!("monitor every {period:?}"),
            &vm.counters,
            args.seconds,
        ));
        intro.stop_monitor();
    }

    // Checks in this thread, timed one by one: the dirty-log check as the monitor
    // does it (nothing written: no page re-hashed) and the full check.
    let cpus_now = cpus(inspect)?;
    let boot = cpus_now
        .iter()
        .find(|c| c.long_mode())
        .ok_or_else(|| anyhow!("no vCPU in long mode"))?;
    let slide = kaslr_slide(&symbols, boot.lstar).unwrap_or(0);
    let layout = KernelLayout::from_symbols(&symbols, slide, None).map_err(|e| anyhow!("{e}"))?;
    let mem = inspect.guest_memory();
    // A reader of its own, as the monitor has: its first take counts every page.
    let reader = inspect.dirty_log().subscribe()?;
    reader.take()?;
    let t = Instant::now();
    let baseline = Baseline::take(&mem, &cpus_now, &layout).map_err(|e| anyhow!("{e}"))?;
    let baseline_time = t.elapsed();
    let pages = baseline.text.pages.len() + baseline.rodata.as_ref().map_or(0, |r| r.pages.len());
    let mut checker = Checker::new(baseline, Some(symbols.clone()));
    let runs = 50u32;
    let time = |checker: &mut Checker, full: bool| -> anyhow::Result<Duration> {
        let t = Instant::now();
        for _ in 0..runs {
            let cpus_now = cpus(inspect)?;
            let findings = if full {
                checker.check(&mem, &cpus_now, None)
            } else {
                let dirty = reader.take()?;
                let is_dirty = |gpa: u64| dirty.is_dirty(gpa);
                checker.check(&mem, &cpus_now, Some(&is_dirty))
            };
            if !findings.is_empty() {
                bail!("findings on an unchanged guest: {findings:?}");
            }
        }
        Ok(t.elapsed() / runs)
    };
    let dirty_check = time(&mut checker, false)?;
    let full_check = time(&mut checker, true)?;
    // Its parts: reading the vCPUs' registers (a request to each vCPU thread),
    // fetching the dirty log (an ioctl per memory slot, and the memory's dirty
    // bitmap read and reset), and the checker's own
    // work with nothing dirty (mappings walked, IDT, GDT, syscall table read).
    let t = Instant::now();
    for _ in 0..runs {
        cpus(inspect)?;
    }
    let regs_time = t.elapsed() / runs;
    let t = Instant::now();
    for _ in 0..runs {
        reader.take()?;
    }
    let log_time = t.elapsed() / runs;
    let t = Instant::now();
    for _ in 0..runs {
        let clean = |_: u64| false;
        checker.check(&mem, &cpus_now, Some(&clean));
    }
    let walk_time = t.elapsed() / runs;
    // What logging's start costs: the last reader gone turns it off, a new one
    // turns it on; its first take (the monitor's, before its baseline hashes)
    // fetches and counts every page dirty, then a second one.
    drop(reader);
    let reader = inspect.dirty_log().subscribe()?;
    let t = Instant::now();
    reader.take()?;
    let first_fetch = t.elapsed();
    let t = Instant::now();
    reader.take()?;
    let second_fetch = t.elapsed();
    drop(reader);

    let off = &windows[0];
    let off_pct = pct(off.process_cpu, off.wall);
    println!(
        "### Integrity monitor, Linux 6.1 tiny kept at its emulation failure ({} s windows)\n",
        args.seconds
    );
    println!("| window | process CPU, % of one CPU | less monitor off | monitor thread, % | checks | monitor thread CPU per check | mean check (wall) | pages hashed |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for w in &windows {
        let p = pct(w.process_cpu, w.wall);
        let mean = if w.checks > 0 {
            format!("{:.0} µs", w.check_ns_sum as f64 / w.checks as f64 / 1000.0)
        } else {
            "-".into()
        };
        let per_check = if w.checks > 0 {
            format!(
                "{:.0} µs",
                w.monitor_thread_cpu.as_secs_f64() * 1e6 / w.checks as f64
            )
        } else {
            "-".into()
        };
        let delta = if std::ptr::eq(w, off) {
            "-".to_string()
        } else {
            format!("{:.4}%", p - off_pct)
        };
        println!(
            "| {} | {p:.4}% | {delta} | {:.4}% | {} | {per_check} | {mean} | {} |",
            w.label,
            pct(w.monitor_thread_cpu, w.wall),
            w.checks,
            w.pages_hashed
        );
    }
    println!();
    println!("### One check, timed in a loop of {runs} ({pages} protected pages: text and read-only data)\n");
    println!("| check | time |");
    println!("|---|---:|");
    println!(
        "| baseline (every page hashed) | {:.0} µs |",
        baseline_time.as_secs_f64() * 1e6
    );
    println!(
        "| with the dirty log (nothing written: mappings walked, tables and registers read, no page re-hashed) | {:.0} µs |",
        dirty_check.as_secs_f64() * 1e6
    );
    for (what, d) in [
        ("  of which: the vCPUs' registers (2 vCPUs)", regs_time),
        (
            "  of which: the dirty log (KVM_GET_DIRTY_LOG, the memory's dirty bitmap)",
            log_time,
        ),
        ("  of which: the checker, nothing dirty", walk_time),
        (
            "a new reader's first take, logging just turned on (once per baseline)",
            first_fetch,
        ),
        ("the take after it", second_fetch),
    ] {
        println!("| {what} | {:.0} µs |", d.as_secs_f64() * 1e6);
    }
    println!(
        "| without the dirty log (every page re-hashed) | {:.0} µs |",
        full_check.as_secs_f64() * 1e6
    );
    println!(
        "| full check every 1 s, as % of one CPU | {:.4}% |",
        full_check.as_secs_f64() * 100.0
    );
    println!();

    intro.shutdown();
    vm.stop.stop(libc::SIGTERM);
    let _ = vm.waiter.join();
    Ok(())
}

/// One run of the `syscall-loop` scenario: the guest's ns per call.
fn syscall_loop(n: u64, trace: Option<(&Path, &str)>) -> anyhow::Result<f64> {
    let vigil = siblings::beside_me(siblings::VMM)?;
    siblings::check_executable(&vigil, "the VMM to measure (vigil, beside vigil-bench)")?;
    let mut cmd = Command::new(vigil);
    cmd.args([
        "run",
        "--console",
        "stdio",
        "--cmdline",
        &format!("test=syscall-loop syscall_n={n}"),
    ]);
    if let Some((path, filter)) = trace {
        cmd.arg("--trace-syscalls").arg(path);
        if !filter.is_empty() {
            cmd.args(["--trace-filter", filter]);
        }
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start vigil run")?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
    let mut result = Err(anyhow!("the guest ended without a PASS line"));
    let mut text = String::new();
    for line in stdout.lines() {
        let line = line.context("reading the guest's console")?;
        text.push_str(&line);
        text.push('\n');
        if line.contains("introspect: ready syscall-loop") {
            // The tracer starts once LSTAR is set (polled every 5 ms): give it
            // time to arm before the calls begin.
            std::thread::sleep(Duration::from_millis(300));
            stdin.write_all(b"g").context("writing the go byte")?;
            stdin.flush()?;
        }
        if let Some(rest) = line.split("TEST syscall-loop PASS").nth(1) {
            let ns = rest
                .split_whitespace()
                .find_map(|w| w.strip_prefix("ns_per_call="))
                .and_then(|v| v.parse::<f64>().ok());
            result = ns.ok_or_else(|| anyhow!("no ns_per_call in {line:?}"));
            break;
        }
        if line.contains("TEST syscall-loop FAIL") {
            result = Err(anyhow!("{line}"));
            break;
        }
    }
    drop(stdin);
    let _ = child.kill();
    let _ = child.wait();
    result.with_context(|| format!("console:\n{text}"))
}

fn tracing_bench(args: &IntrospectBenchArgs) -> anyhow::Result<()> {
    let n = args.syscalls;
    let dir = std::env::temp_dir().join(format!("vigil-bench-introspect-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let trace = dir.join("trace.jsonl");
    let (mut untraced, mut bare, mut traced) = (Vec::new(), Vec::new(), Vec::new());
    let mut lines = 0;
    // The three alternate, so that a change in the machine's load touches all.
    for round in 1..=args.runs {
        eprintln!(
            "syscall-loop, {n} calls, round {round}/{}: untraced, breakpoint only, traced...",
            args.runs
        );
        untraced.push(syscall_loop(n, None)?);
        bare.push(syscall_loop(n, Some((&dir.join("none.jsonl"), "write")))?);
        let _ = std::fs::remove_file(&trace);
        traced.push(syscall_loop(n, Some((&trace, "")))?);
        lines = std::fs::read_to_string(&trace)
            .map(|t| t.lines().count())
            .unwrap_or(0);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (untraced, bare, traced) = (
        median(&mut untraced),
        median(&mut bare),
        median(&mut traced),
    );
    let _ = std::fs::remove_dir_all(&dir);
    println!(
        "### System call tracing, test guest `syscall-loop`, {n} calls (read, RAX = 0), median of {} runs\n",
        args.runs
    );
    println!("| run | ns per call (guest TSC) | cost per call over untraced |");
    println!("|---|---:|---:|");
    println!("| untraced | {untraced:.0} | - |");
    println!(
        "| entry breakpoint only, filter keeps nothing (`--trace-filter write`) | {bare:.0} | {:.0} ns |",
        bare - untraced
    );
    println!(
        "| traced to a file, entry and return (`--trace-syscalls`, {lines} records) | {traced:.0} | {:.0} ns |",
        traced - untraced
    );
    println!();
    if lines as u64 != n {
        eprintln!("note: the trace has {lines} records for {n} calls (the tracer armed late?)");
    }
    Ok(())
}

pub fn run(args: IntrospectBenchArgs) -> anyhow::Result<()> {
    if args.seconds == 0 {
        bail!("--seconds 0: expected at least 1");
    }
    if args.runs == 0 {
        bail!("--runs 0: expected at least 1");
    }
    if args.syscalls == 0 || args.syscalls > 10_000_000 {
        bail!("--syscalls {}: expected 1 to 10000000", args.syscalls);
    }
    monitor_bench(&args)?;
    tracing_bench(&args)
}
