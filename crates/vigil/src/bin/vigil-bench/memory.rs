//! `vigil bench memory`: the memory-compression pager (crates/vmm `pager`) on
//! the test guest's `compress` mix (a quarter each of zero, duplicate, text
//! and random pages), beside zram (`/dev/zram0`, when it is free and this runs
//! as root), KSM (when it is idle and this runs as root) and a bare
//! userfaultfd round trip (the floor of any fault-in).
//!
//! Each works on the same bytes in this process: the pager on anonymous
//! memory registered as guest RAM, zram as a block device (O_DIRECT writes
//! compress in the writer's context, O_DIRECT reads decompress), KSM on the
//! mix's mapping marked mergeable (its pages stay mapped: the cost a guest pays
//! is the copy on its first write to a merged page), the round trip on memory
//! whose every fault is answered with a page copy.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use vigil_metrics::PagerCounters;
use vigil_model::config::{CompressionAlgo, MemoryCompression};
use vigil_test_guest::compress_mix_word;
use vigil_vmm::lazy_memory::LazyMemory;
use vigil_vmm::pager::Pager;
use vigil_vmm::{DirtyTracker, GuestMemoryMmap};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use crate::peers::median;

const PAGE: u64 = 4096;
const ZRAM: &str = "/sys/block/zram0";
const KSM: &str = "/sys/kernel/mm/ksm";

#[derive(Args, Debug)]
pub struct MemoryBenchArgs {
    /// MiB of the mix.
    #[arg(long, default_value_t = 256, value_name = "MIB")]
    mib: u64,
    /// Rounds; the table gives medians.
    #[arg(long, default_value_t = 3, value_name = "N")]
    runs: usize,
}

/// One round of one contender.
#[derive(Clone, Copy, Default)]
struct Sample {
    /// Bytes that hold the mix: the pool and the pages left in RAM, or zram's
    /// memory.
    held: u64,
    /// Compression throughput, bytes per CPU second (0: not measured).
    per_cpu_s: u64,
    /// Fault-in (or read) latency of the pages taken out, ns.
    p50_ns: u64,
    p99_ns: u64,
    /// CPU at rest once everything cold was taken out, in millionths of a
    /// core (0: not measured).
    rest_ppm: u64,
}

/// How long the pager is watched at rest.
const REST: Duration = Duration::from_secs(5);

pub fn run(args: MemoryBenchArgs) -> anyhow::Result<()> {
    if args.mib == 0 || args.runs == 0 {
        bail!("--mib and --runs must be at least 1");
    }
    let bytes = args.mib << 20;
    let mut rows: Vec<(String, Vec<Sample>)> = vec![
        ("Vigil pager, LZ4".into(), Vec::new()),
        ("Vigil pager, zstd".into(), Vec::new()),
        ("userfaultfd round trip (copy only)".into(), Vec::new()),
    ];
    let zram = zram_free();
    if let Err(why) = &zram {
        eprintln!("zram left out: {why}");
    } else {
        rows.push(("zram, lz4 (kernel)".into(), Vec::new()));
    }
    let ksm = ksm_free();
    match &ksm {
        Err(why) => eprintln!("KSM left out: {why}"),
        Ok(()) => rows.push(("KSM (kernel), write fault-in".into(), Vec::new())),
    }
    for round in 0..args.runs {
        eprintln!("round {} of {}", round + 1, args.runs);
        rows[0].1.push(pager(bytes, CompressionAlgo::Lz4)?);
        rows[1].1.push(pager(bytes, CompressionAlgo::Zstd)?);
        rows[2].1.push(round_trip(bytes)?);
        if zram.is_ok() {
            rows[3].1.push(zram_round(bytes)?);
        }
        if ksm.is_ok() {
            rows.last_mut()
                .expect("the KSM row")
                .1
                .push(ksm_round(bytes)?);
        }
    }
    println!(
        "{} MiB of the mix (zero, duplicate, text, random pages, a quarter each), medians of {} rounds\n",
        args.mib, args.runs
    );
    println!("| | memory holding the mix | ratio | compression (per CPU) | fault-in p50 | fault-in p99 | CPU at rest |");
    println!("|---|---|---|---|---|---|---|");
    for (name, samples) in rows {
        let held = median(samples.iter().map(|s| s.held).collect());
        let rate = median(samples.iter().map(|s| s.per_cpu_s).collect());
        let p50 = median(samples.iter().map(|s| s.p50_ns).collect());
        let p99 = median(samples.iter().map(|s| s.p99_ns).collect());
        let rest = median(samples.iter().map(|s| s.rest_ppm).collect());
        let rest = if rest == 0 {
            "-".into()
        } else {
            format!("{:.3}% of a core", rest as f64 / 1e4)
        };
        let (held, ratio) = if held == 0 {
            ("-".into(), "-".into())
        } else {
            (
                format!("{:.1} MiB", held as f64 / (1u64 << 20) as f64),
                format!("{:.2}", bytes as f64 / held as f64),
            )
        };
        let rate = if rate == 0 {
            "-".into()
        } else {
            format!("{:.2} GB/s", rate as f64 / 1e9)
        };
        println!(
            "| {name} | {held} | {ratio} | {rate} | {:.1} µs | {:.1} µs | {rest} |",
            p50 as f64 / 1e3,
            p99 as f64 / 1e3
        );
    }
    Ok(())
}

/// The pages of the mix that leave RAM (all but the random quarter), shuffled.
fn taken_pages(pages: u64) -> Vec<u64> {
    let mut v: Vec<u64> = (0..pages).filter(|i| i % 4 != 3).collect();
    let mut x = 0x2545_f491_4f6c_dd1du64;
    for i in (1..v.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
    v
}

fn quantiles(mut ns: Vec<u64>) -> (u64, u64) {
    ns.sort_unstable();
    let at = |q: f64| ns[((ns.len() - 1) as f64 * q) as usize];
    (at(0.5), at(0.99))
}

fn fill(host: *mut u64, pages: u64) {
    for i in 0..pages {
        for w in 0..PAGE / 8 {
            // SAFETY: `host` maps `pages` pages this function alone uses now.
            unsafe {
                host.add((i * PAGE / 8 + w) as usize)
                    .write(compress_mix_word(i, w))
            };
        }
    }
}

/// Reads one word of each page of `order`, timing each read.
fn touch(host: *const u64, order: &[u64]) -> (u64, u64) {
    let mut ns = Vec::with_capacity(order.len());
    for &i in order {
        let start = Instant::now();
        // SAFETY: inside the mapping; a missing page waits for its handler.
        let _ = unsafe { host.add((i * PAGE / 8) as usize).read_volatile() };
        ns.push(start.elapsed().as_nanos() as u64);
    }
    quantiles(ns)
}

fn memory(bytes: u64) -> anyhow::Result<(GuestMemoryMmap, *mut u64)> {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), bytes as usize)])?;
    let host = mem.get_host_address(GuestAddress(0))?.cast::<u64>();
    Ok((mem, host))
}

fn pager(bytes: u64, algo: CompressionAlgo) -> anyhow::Result<Sample> {
    let pages = bytes / PAGE;
    let (mem, host) = memory(bytes)?;
    fill(host, pages);
    let counters = Arc::new(PagerCounters::default());
    let dirty = DirtyTracker::for_memory(mem.clone());
    // Long enough that no page touched below goes again meanwhile.
    let config = MemoryCompression {
        idle_ms: Some(5000),
        rss_mib: None,
        algo,
    };
    let pager = Pager::start(config, &mem, &dirty, counters.clone())?;
    let deadline = Instant::now() + Duration::from_secs(600);
    while counters.pages_compressed.get() + counters.pages_incompressible.get() < pages {
        if Instant::now() > deadline {
            bail!(
                "the pager took {} of {pages} pages in 10 minutes",
                counters.pages_compressed.get()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let cpu_ns = counters.cpu_ns.get().max(1);
    let held = counters.pool_bytes.get() + counters.pages_incompressible.get() * PAGE;
    let (p50_ns, p99_ns) = touch(host, &taken_pages(pages));
    // Then at rest: nothing cold left to take (what came back waits an idle
    // time), the guest idle; the scanner still reads the dirty log every
    // quarter of the idle time.
    let before = counters.cpu_ns.get();
    std::thread::sleep(REST);
    let rest_ns = counters.cpu_ns.get().saturating_sub(before);
    drop(pager);
    Ok(Sample {
        held,
        per_cpu_s: (bytes as u128 * 1_000_000_000 / cpu_ns as u128) as u64,
        p50_ns,
        p99_ns,
        rest_ppm: (rest_ns as u128 * 1_000_000 / REST.as_nanos()) as u64,
    })
}

/// Faults answered by copying a page in, nothing else: what any fault-in
/// through userfaultfd costs at least.
fn round_trip(bytes: u64) -> anyhow::Result<Sample> {
    let pages = bytes / PAGE;
    let (mem, host) = memory(bytes)?;
    let lazy = Arc::new(LazyMemory::register(&mem, false)?);
    let stop = Arc::new(AtomicBool::new(false));
    let server = {
        let (lazy, stop) = (lazy.clone(), stop.clone());
        std::thread::spawn(move || -> anyhow::Result<()> {
            let page = vec![0x5au8; PAGE as usize];
            while !stop.load(Ordering::Relaxed) {
                for gpa in lazy.faults(Duration::from_millis(50))? {
                    lazy.copy(gpa, &page)?;
                }
            }
            Ok(())
        })
    };
    let (p50_ns, p99_ns) = touch(host, &taken_pages(pages));
    stop.store(true, Ordering::Relaxed);
    server
        .join()
        .map_err(|_| anyhow::anyhow!("the fault server panicked"))??;
    Ok(Sample {
        p50_ns,
        p99_ns,
        ..Sample::default()
    })
}

/// Whether `/dev/zram0` may be used: root, and the device unused (no size).
fn zram_free() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("needs root");
    }
    let size = std::fs::read_to_string(Path::new(ZRAM).join("disksize"))
        .context("no /dev/zram0 (modprobe zram)")?;
    if size.trim() != "0" {
        bail!("/dev/zram0 is in use (disksize {})", size.trim());
    }
    Ok(())
}

fn zram_set(key: &str, value: &str) -> anyhow::Result<()> {
    let path = Path::new(ZRAM).join(key);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .with_context(|| format!("writing {value:?} to {}", path.display()))
}

/// This thread's CPU time, ns.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the call to fill.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// One round on zram, reset afterwards whatever happened.
fn zram_round(bytes: u64) -> anyhow::Result<Sample> {
    let r = zram_measure(bytes);
    let reset = zram_set("reset", "1");
    let sample = r?;
    reset?;
    Ok(sample)
}

fn zram_measure(bytes: u64) -> anyhow::Result<Sample> {
    zram_set("comp_algorithm", "lz4")?;
    zram_set("disksize", &bytes.to_string())?;
    let pages = bytes / PAGE;
    // The mix in an anonymous mapping (page-aligned, as O_DIRECT wants).
    let (_mem, host) = memory(bytes)?;
    fill(host, pages);
    let dev = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open("/dev/zram0")
        .context("opening /dev/zram0")?;
    const CHUNK: u64 = 1 << 20;
    let cpu = thread_cpu_ns();
    for off in (0..bytes).step_by(CHUNK as usize) {
        let n = CHUNK.min(bytes - off) as usize;
        // SAFETY: `n` bytes of the mix at `off`, inside the mapping.
        let chunk = unsafe { std::slice::from_raw_parts(host.cast::<u8>().add(off as usize), n) };
        dev.write_all_at(chunk, off)?;
    }
    let cpu_ns = (thread_cpu_ns() - cpu).max(1);
    // orig_data_size compr_data_size mem_used_total ...
    let stat = std::fs::read_to_string(Path::new(ZRAM).join("mm_stat"))?;
    eprintln!(
        "zram mm_stat (orig compr mem_used limit max same_pages compacted huge_pages): {}",
        stat.trim()
    );
    let held: u64 = stat
        .split_whitespace()
        .nth(2)
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("zram mm_stat {stat:?}"))?;
    let (buf_mem, buf) = memory(PAGE)?;
    // SAFETY: one page of our own mapping.
    let page = unsafe { std::slice::from_raw_parts_mut(buf.cast::<u8>(), PAGE as usize) };
    let mut ns = Vec::new();
    for i in taken_pages(pages) {
        let start = Instant::now();
        dev.read_exact_at(page, i * PAGE)?;
        ns.push(start.elapsed().as_nanos() as u64);
    }
    drop(buf_mem);
    let (p50_ns, p99_ns) = quantiles(ns);
    Ok(Sample {
        held,
        per_cpu_s: (bytes as u128 * 1_000_000_000 / cpu_ns as u128) as u64,
        p50_ns,
        p99_ns,
        ..Sample::default()
    })
}

/// Whether KSM may be used: root, present, and not running for anyone else.
fn ksm_free() -> anyhow::Result<()> {
    let run = std::fs::read_to_string(Path::new(KSM).join("run"))
        .context("no /sys/kernel/mm/ksm (a kernel without CONFIG_KSM)")?;
    if run.trim() != "0" {
        bail!("KSM is already running (run = {})", run.trim());
    }
    // SAFETY: no arguments, no memory.
    if unsafe { libc::geteuid() } != 0 {
        bail!("starting KSM needs root");
    }
    Ok(())
}

fn ksm_read(key: &str) -> anyhow::Result<u64> {
    let v = std::fs::read_to_string(Path::new(KSM).join(key))?;
    v.trim()
        .parse()
        .with_context(|| format!("{KSM}/{key}: {v:?}"))
}

fn ksm_set(key: &str, value: &str) -> anyhow::Result<()> {
    std::fs::write(Path::new(KSM).join(key), value)
        .with_context(|| format!("writing {value} to {KSM}/{key}"))
}

/// ksmd's CPU time (user and system), ns.
fn ksmd_cpu_ns() -> anyhow::Result<u64> {
    for entry in std::fs::read_dir("/proc")? {
        let path = entry?.path();
        if std::fs::read_to_string(path.join("comm")).is_ok_and(|c| c.trim() == "ksmd") {
            let stat = std::fs::read_to_string(path.join("stat"))?;
            // The fields after the command's closing parenthesis; utime and
            // stime are the 14th and 15th of the line.
            let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or_default();
            let field = |n: usize| -> u64 {
                rest.split_whitespace()
                    .nth(n)
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0)
            };
            // SAFETY: no arguments, no memory.
            let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
            return Ok((field(11) + field(12)) * 1_000_000_000 / hz);
        }
    }
    bail!("no ksmd thread")
}

/// One round of KSM, its settings put back and its merged pages undone
/// afterwards whatever happened.
fn ksm_round(bytes: u64) -> anyhow::Result<Sample> {
    let saved = ["pages_to_scan", "sleep_millisecs"]
        .map(|k| std::fs::read_to_string(Path::new(KSM).join(k)).unwrap_or_default());
    let r = ksm_measure(bytes);
    // Stopping with 2 unmerges every page KSM merged.
    let stop = ksm_set("run", "2").and_then(|()| ksm_set("run", "0"));
    for (key, value) in ["pages_to_scan", "sleep_millisecs"].iter().zip(&saved) {
        if !value.trim().is_empty() {
            let _ = ksm_set(key, value.trim());
        }
    }
    let sample = r?;
    stop?;
    Ok(sample)
}

fn ksm_measure(bytes: u64) -> anyhow::Result<Sample> {
    let pages = bytes / PAGE;
    let (_mem, host) = memory(bytes)?;
    fill(host, pages);
    // SAFETY: the range is this mapping, which stays mapped until `_mem` drops.
    if unsafe { libc::madvise(host.cast(), bytes as usize, libc::MADV_MERGEABLE) } != 0 {
        bail!(
            "madvise(MADV_MERGEABLE): {}",
            std::io::Error::last_os_error()
        );
    }
    // Fast scanning, so that the round does not take minutes: 1000 pages
    // every 10 ms.
    ksm_set("pages_to_scan", "1000")?;
    ksm_set("sleep_millisecs", "10")?;
    let cpu = ksmd_cpu_ns()?;
    let scans = ksm_read("full_scans")?;
    ksm_set("run", "1")?;
    // Merged once two more full scans changed nothing.
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut last = (scans, u64::MAX);
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let now = (ksm_read("full_scans")?, ksm_read("pages_sharing")?);
        if now.0 >= scans + 3 && now.0 > last.0 && now.1 == last.1 {
            break;
        }
        if now.0 > last.0 {
            last = now;
        }
        if Instant::now() > deadline {
            bail!("KSM did not settle in 10 minutes ({} pages sharing)", now.1);
        }
    }
    let cpu_ns = ksmd_cpu_ns()?.saturating_sub(cpu).max(1);
    ksm_set("run", "0")?;
    // pages_sharing: how many more pages share a KSM page than KSM keeps.
    let saved = ksm_read("pages_sharing")? * PAGE;
    eprintln!(
        "KSM: pages_shared {}, pages_sharing {}, full scans {}, ksmd CPU {:.2} s",
        ksm_read("pages_shared")?,
        saved / PAGE,
        ksm_read("full_scans")? - scans,
        cpu_ns as f64 / 1e9
    );
    // A write to a merged page copies it first (a read costs nothing).
    let mut ns = Vec::new();
    for i in taken_pages(pages) {
        let start = Instant::now();
        // SAFETY: inside the mapping, which only this thread uses.
        unsafe {
            let word = host.add((i * PAGE / 8) as usize);
            word.write_volatile(word.read_volatile());
        }
        ns.push(start.elapsed().as_nanos() as u64);
    }
    let (p50_ns, p99_ns) = quantiles(ns);
    Ok(Sample {
        held: bytes - saved.min(bytes),
        per_cpu_s: (bytes as u128 * 1_000_000_000 / cpu_ns as u128) as u64,
        p50_ns,
        p99_ns,
        ..Sample::default()
    })
}
