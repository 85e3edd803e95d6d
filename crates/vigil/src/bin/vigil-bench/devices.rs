//! `vigil bench blk|net`: the test guest's virtio-blk and virtio-net benchmarks
//! under Vigil, QEMU microvm and (blk) Firecracker, in the same invocation, the
//! VMMs interleaved round by round.

use std::io::Read;
use std::path::{Path, PathBuf};
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

    /// Also run Firecracker (this binary; `shared/peers/build-firecracker.sh`
    /// builds one): its drive on `io_engine: "Async"` (io_uring), its interface
    /// on the same tap. Left out without it.
    #[arg(long, value_name = "PATH")]
    pub firecracker: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct BlkBenchArgs {
    #[command(flatten)]
    pub common: DeviceBenchArgs,

    /// Queue depths to measure, comma-separated (requests the guest keeps in
    /// flight, 1 to 128; three descriptors each in a 256-entry queue, so above 85
    /// in indirect tables, which a device must offer: Firecracker's does not).
    #[arg(long, value_delimiter = ',', default_value = "1,8,32", value_name = "N,...",
          value_parser = clap::value_parser!(u16).range(1..=128))]
    pub qd: Vec<u16>,

    /// Request sizes to measure, comma-separated: KiB with a `k` suffix or MiB
    /// with `m`, 4k to 1m in 4 KiB steps (`4k,64k,1m`).
    #[arg(long, value_delimiter = ',', default_value = "4k,64k", value_name = "SIZE,...",
          value_parser = parse_request_size)]
    pub bs: Vec<u64>,

    /// Offsets drawn at random instead of in sequence.
    #[arg(long)]
    pub random: bool,

    /// The image each round starts from: `filled` (written all over with data
    /// and synced before the VMM starts, so reads copy data out of the host's
    /// page cache) or `sparse` (a fresh sparse file: reads read holes, which
    /// Vigil answers without the page cache, and a guest's first writes
    /// allocate blocks).
    #[arg(long, value_enum, default_value_t = Image::Filled, value_name = "KIND")]
    pub image: Image,

    /// Above 1, also run Vigil with its disk on the asynchronous engine and
    /// this many request queues (`num_queues`, 2 to 16), as a row of its own:
    /// the guest spreads its requests over them (`VIRTIO_BLK_F_MQ`; the other
    /// rows' devices offer one queue, so their guests use that one).
    #[arg(long, default_value_t = 1, value_name = "N",
          value_parser = clap::value_parser!(u16).range(1..=16))]
    pub queues: u16,
}

#[derive(Args, Debug)]
pub struct NetBenchArgs {
    #[command(flatten)]
    pub common: DeviceBenchArgs,

    /// Transmit queue depths to measure, comma-separated (frames the guest
    /// keeps in flight, 1 to 256).
    #[arg(long, value_delimiter = ',', default_value = "1,8,32", value_name = "N,...",
          value_parser = clap::value_parser!(u16).range(1..=256))]
    pub qd: Vec<u16>,

    /// Receive buffers the guest keeps posted, comma-separated (2 KiB each, 1 to
    /// 256). Firecracker reads its tap only while the guest has posted 64 KiB
    /// or more (room for the largest frame it could read), so under it fewer
    /// than 33 never receive a frame.
    #[arg(long, value_delimiter = ',', default_value = "64,256", value_name = "N,...",
          value_parser = clap::value_parser!(u16).range(1..=256))]
    pub rx_buffers: Vec<u16>,

    /// Ethernet frame sizes to send, comma-separated bytes (60 to 1514: from a
    /// minimum frame to a full 1500-byte payload).
    #[arg(long, value_delimiter = ',', default_value = "60,1514", value_name = "BYTES,...",
          value_parser = clap::value_parser!(u16).range(60..=1514))]
    pub frame: Vec<u16>,

    /// Directions to measure, comma-separated: `tx` (the guest sends) and `rx`
    /// (this process floods the tap from the host, pausing while the tap's queue
    /// is full, and the guest counts what arrives in its `--rx-buffers` posted
    /// buffers).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "tx,rx",
        value_name = "DIR,..."
    )]
    pub dir: Vec<Direction>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Image {
    Filled,
    Sparse,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Tx,
    Rx,
}

/// `--bs` words: `4k`, `64k`, `1m`; the size in KiB.
fn parse_request_size(s: &str) -> Result<u64, String> {
    let lower = s.to_ascii_lowercase();
    let (digits, unit) = match lower.strip_suffix('k') {
        Some(d) => (d, 1),
        None => match lower.strip_suffix('m') {
            Some(d) => (d, 1024),
            None => return Err(format!("{s:?}: expected KiB with k or MiB with m (4k, 1m)")),
        },
    };
    let kib = digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(unit))
        .ok_or_else(|| format!("{s:?}: expected a number before the unit"))?;
    if !(4..=1024).contains(&kib) || kib % 4 != 0 {
        return Err(format!("{s:?}: expected 4k to 1m in 4 KiB steps"));
    }
    Ok(kib)
}

/// A benchmark the test guest runs against one virtio device.
struct DeviceBench {
    /// The guest scenario; its PASS line carries `key=value` figures.
    scenario: &'static str,
    /// The figures to report, in table order.
    keys: &'static [&'static str],
    /// The PASS line's figure counting requests, and how many times over (one per
    /// direction) the device served that many: per-request columns divide by it.
    requests: Option<(&'static str, u64)>,
    /// The device's group in Vigil's metrics (`block`, `net`).
    metrics_group: &'static str,
    /// What the table's caption says.
    caption: String,
}

/// One run's figures: `bench.keys`, then the VMM's CPU time for the whole run
/// (boot included) in µs, the requests served, and from Vigil's metrics its
/// KVM exits and the device's used-buffer interrupts and queue notifications.
struct Sample {
    figures: Vec<u64>,
    cpu_us: u64,
    requests: Option<u64>,
    exits: Option<u64>,
    interrupts: Option<u64>,
    notifications: Option<u64>,
}

/// Runs `bench.scenario` once on `guest` with `params` on its command line;
/// `attach` adds the device to the VMM's command line. Vigil also writes its
/// metrics (into `scratch`) for the exit and interrupt counts.
fn device_once(
    vmm: &Vmm,
    guest: &Path,
    scratch: &Scratch,
    bench: &DeviceBench,
    params: &str,
    attach: &dyn Fn(&Vmm, &mut Command),
) -> anyhow::Result<Sample> {
    let cmdline = format!("test={} {params}", bench.scenario);
    let mut cmd = vmm.command(guest, cmdline.trim_end(), 128)?;
    attach(vmm, &mut cmd);
    let metrics = scratch.0.join("metrics.json");
    std::fs::remove_file(&metrics).ok();
    if let Kind::Vigil(_) = vmm.kind {
        cmd.arg("--metrics-path").arg(&metrics);
    }
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
    let figure = |k: &str| {
        figures
            .iter()
            .find(|(n, _)| *n == k)
            .map(|(_, v)| *v)
            .with_context(|| format!("{}: no {k} in {line}", vmm.name))
    };
    let values = bench
        .keys
        .iter()
        .map(|k| figure(k))
        .collect::<anyhow::Result<Vec<u64>>>()?;
    let requests = match bench.requests {
        Some((key, times)) => Some(figure(key)? * times),
        None => None,
    };
    let [exits, interrupts, notifications] = match vmm.kind {
        Kind::Vigil(_) => vigil_counts(&metrics, bench.metrics_group)
            .with_context(|| format!("{}: its metrics file {}", vmm.name, metrics.display()))?,
        _ => [None; 3],
    };
    Ok(Sample {
        figures: values,
        cpu_us: cpu.as_micros() as u64,
        requests,
        exits,
        interrupts,
        notifications,
    })
}

/// KVM exits (all vCPUs), and the interrupts and queue notifications of the
/// devices of metrics `group`, from the last line of a Vigil metrics file.
fn vigil_counts(path: &Path, group: &str) -> anyhow::Result<[Option<u64>; 3]> {
    let text = std::fs::read_to_string(path)?;
    let last = text.lines().last().context("empty")?;
    let m: serde_json::Value = serde_json::from_str(last)?;
    Ok([
        m["vcpu"]["exits_total"].as_u64(),
        m[group]["interrupts"].as_u64(),
        m[group]["notifications"].as_u64(),
    ])
}

/// One configuration to measure: its label in the tables and the scenario's
/// command-line words.
struct Case {
    label: String,
    params: String,
}

/// Runs every case of `bench` under `vmms` (the peers last), interleaved round
/// by round (each round going through every case, each case starting with the
/// next VMM), and prints one table per case: medians, per-request costs and
/// each Vigil row's ratio to each peer.
fn device_bench(
    runs: usize,
    vmms: &[Vmm],
    bench: &DeviceBench,
    cases: &[Case],
    attach: &dyn Fn(&Vmm, &mut Command),
) -> anyhow::Result<()> {
    if runs == 0 {
        bail!("--runs 0: need at least one round");
    }
    let scratch = Scratch::new("device")?;
    let guest = scratch.write("guest.elf", vigil_test_guest::ELF)?;
    let progress = Progress::new();
    // samples[case][vmm]
    let mut samples: Vec<Vec<Vec<Sample>>> = cases
        .iter()
        .map(|_| vmms.iter().map(|_| Vec::new()).collect())
        .collect();
    for round in 0..runs {
        for (c, case) in cases.iter().enumerate() {
            for k in 0..vmms.len() {
                let i = (round + k) % vmms.len();
                let sample = device_once(&vmms[i], &guest, &scratch, bench, &case.params, attach)?;
                samples[c][i].push(sample);
                progress.show(&format!(
                    "round {}/{runs}: {}: {}",
                    round + 1,
                    case.label,
                    vmms[i].name
                ));
            }
        }
    }
    progress.done();

    println!(
        "{}, medians of {runs} rounds (VMMs interleaved). VMM CPU: user + system time of \
         the VMM process for the whole run, boot included, per request served; exits: \
         KVM exits to the VMM of all vCPUs per request, used-buffer interrupts and queue \
         notifications per request, from Vigil's metrics (a peer's are not counted: n/a):\n",
        bench.caption
    );
    let per_request = bench.requests.is_some();
    for (case, by_vmm) in cases.iter().zip(&samples) {
        if !case.label.is_empty() {
            println!("{}:\n", case.label);
        }
        let mut head = bench.keys.join(" | ");
        if per_request {
            head.push_str(
                " | VMM CPU µs/request | exits/request | interrupts/request | notifications/request",
            );
        } else {
            head.push_str(" | VMM CPU (ms)");
        }
        let columns = head.split(" | ").count();
        println!("| VMM | {head} |");
        println!("|---|{}", "---:|".repeat(columns));
        // Per VMM: the medians of the figures, then of the per-request costs.
        let rows: Vec<Vec<Option<f64>>> = by_vmm
            .iter()
            .map(|s| medians(s, bench.keys.len(), per_request))
            .collect();
        let cell = |v: &Option<f64>| match v {
            None => "n/a".to_string(),
            Some(x) if x.fract() == 0.0 => format!("{x:.0}"),
            Some(x) if *x >= 100.0 => format!("{x:.0}"),
            Some(x) => format!("{x:.2}"),
        };
        for (vmm, row) in vmms.iter().zip(&rows) {
            let cells: Vec<String> = row.iter().map(cell).collect();
            println!("| {} | {} |", vmm.name, cells.join(" | "));
        }
        let peers = vmms
            .iter()
            .enumerate()
            .filter(|(_, v)| !matches!(v.kind, Kind::Vigil(_)));
        for (p, peer) in peers {
            for (vmm, ours) in vmms
                .iter()
                .zip(&rows)
                .filter(|(v, _)| matches!(v.kind, Kind::Vigil(_)))
            {
                let cells: Vec<String> = ours
                    .iter()
                    .zip(&rows[p])
                    .map(|(a, b)| match (a, b) {
                        (Some(a), Some(b)) if *b > 0.0 => format!("{:.2}", a / b),
                        _ => "n/a".into(),
                    })
                    .collect();
                println!(
                    "| ratio {}/{} | {} |",
                    vmm.name,
                    peer.name,
                    cells.join(" | ")
                );
            }
        }
        println!();
    }
    Ok(())
}

/// The median of each figure over `samples`, then either the VMM's CPU (ms) or
/// the CPU µs, exits and interrupts per request.
fn medians(samples: &[Sample], keys: usize, per_request: bool) -> Vec<Option<f64>> {
    let mut row: Vec<Option<f64>> = (0..keys)
        .map(|c| Some(median(samples.iter().map(|s| s.figures[c]).collect()) as f64))
        .collect();
    if !per_request {
        row.push(Some(
            median(samples.iter().map(|s| s.cpu_us / 1000).collect()) as f64,
        ));
        return row;
    }
    // Medians of ratios, in thousandths so that `median` can sort them.
    let per = |get: &dyn Fn(&Sample) -> Option<u64>| -> Option<f64> {
        let v: Option<Vec<u64>> = samples
            .iter()
            .map(|s| Some(get(s)? * 1000 / s.requests?.max(1)))
            .collect();
        v.map(|v| median(v) as f64 / 1000.0)
    };
    row.push(per(&|s| Some(s.cpu_us)));
    row.push(per(&|s| s.exits));
    row.push(per(&|s| s.interrupts));
    row.push(per(&|s| s.notifications));
    row
}

/// Vigil (without seccomp and on PCI when asked), QEMU and Firecracker as `args`
/// says; Firecracker's configuration files go into `scratch`.
fn vmms(args: &DeviceBenchArgs, scratch: &Path) -> anyhow::Result<Vec<Vmm>> {
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
    match &args.firecracker {
        Some(path) => vmms.push(Vmm::firecracker(path, scratch)?),
        None => eprintln!("firecracker: left out (give --firecracker PATH to compare with it)"),
    }
    Ok(vmms)
}

/// The row of Vigil with its disk on the asynchronous engine (io_uring).
const VIGIL_ASYNC: &str = "vigil (io_engine=async)";

/// Requests per direction of a `blk-bench` case: 1000 per request in flight,
/// 4000 to 65536, 256 MiB at most. At depth 32, 4000 requests took ~15 ms,
/// a run that measured start-up as much as the path (a 200,000-request run
/// went 35% faster).
fn blk_requests(qd: u16, kib: u64) -> u64 {
    (1000 * u64::from(qd))
        .clamp(4000, 65536)
        .min((256 << 10) / kib)
}

pub fn run_blk(args: BlkBenchArgs) -> anyhow::Result<()> {
    let scratch = Scratch::new("blk")?;
    let image = scratch.0.join("disk.img");
    let mut vmms = vmms(&args.common, &scratch.0)?;
    vmms.insert(1, Vmm::vigil(VIGIL_ASYNC, &[])?);
    let multi_queue = format!("vigil (io_engine=async, num_queues={})", args.queues);
    if args.queues > 1 {
        vmms.insert(2, Vmm::vigil(&multi_queue, &[])?);
    }
    for fc in vmms.iter_mut() {
        if let Kind::Firecracker(_) = fc.kind {
            fc.name = "firecracker (Async)".into();
        }
    }
    let pattern = if args.random { "rand" } else { "seq" };
    let mut cases = Vec::new();
    for &qd in &args.qd {
        for &kib in &args.bs {
            cases.push(Case {
                label: format!("queue depth {qd}, {kib} KiB requests, {pattern}"),
                params: format!(
                    "blk_qd={qd} blk_bs_kib={kib} blk_pattern={pattern} blk_queues={} \
                     blk_requests={}",
                    args.queues,
                    blk_requests(qd, kib)
                ),
            });
        }
    }
    let bench = DeviceBench {
        scenario: "blk-bench",
        keys: &["read_iops", "read_kib_s", "write_iops", "write_kib_s"],
        requests: Some(("requests", 2)),
        metrics_group: "block",
        caption: format!(
            "virtio-blk from the test guest (CPL3 polling driver, EVENT_IDX where the \
             device offers it), a fresh raw 64 MiB image per run ({}), reads then writes \
             over it: 1000 requests per direction per request in flight, 4000 to 65536 \
             (256 MiB at most)",
            match args.image {
                Image::Filled => "written all over and synced first",
                Image::Sparse => "sparse: reads read holes",
            }
        ),
    };
    let attach = |vmm: &Vmm, cmd: &mut Command| {
        // A fresh image each round; creation errors show up as the VMM's own.
        if let Err(e) = fresh_image(&image, args.image) {
            eprintln!("{}: {e}", image.display());
        }
        match &vmm.kind {
            Kind::Vigil(_) | Kind::JailedVigil(_) => {
                let engine = if vmm.name == VIGIL_ASYNC {
                    ",io_engine=async".to_string()
                } else if vmm.name == multi_queue {
                    format!(",io_engine=async,num_queues={}", args.queues)
                } else {
                    String::new()
                };
                cmd.arg("--disk")
                    .arg(format!("path={}{engine}", image.display()));
            }
            Kind::Qemu => {
                cmd.args(["-global", "virtio-mmio.force-legacy=false", "-drive"])
                    .arg(format!(
                        "id=d0,file={},format=raw,if=none,cache=writeback",
                        image.display()
                    ))
                    .args(["-device", "virtio-blk-device,drive=d0"]);
            }
            Kind::Firecracker(dir) => {
                // A writable data drive on the Async (io_uring) engine, in the
                // configuration file `command` wrote.
                let drive = serde_json::json!([{
                    "drive_id": "data",
                    "path_on_host": image,
                    "is_root_device": false,
                    "is_read_only": false,
                    "io_engine": "Async",
                }]);
                if let Err(e) =
                    set_firecracker_config(&dir.join("firecracker.json"), "drives", drive)
                {
                    eprintln!("firecracker: {e:#}");
                }
            }
        }
    };
    device_bench(args.common.runs, &vmms, &bench, &cases, &attach)
}

/// Makes the bench's 64 MiB image at `path`: sparse, or written all over
/// (bytes that are not zero) and synced.
fn fresh_image(path: &Path, kind: Image) -> std::io::Result<()> {
    const BYTES: u64 = 64 << 20;
    let mut f = std::fs::File::create(path)?;
    match kind {
        Image::Sparse => f.set_len(BYTES),
        Image::Filled => {
            let chunk = vec![0x5a; 1 << 20];
            for _ in 0..BYTES / chunk.len() as u64 {
                std::io::Write::write_all(&mut f, &chunk)?;
            }
            f.sync_all()
        }
    }
}

/// Sets `key` to `value` in the Firecracker configuration file at `config`.
fn set_firecracker_config(
    config: &Path,
    key: &str,
    value: serde_json::Value,
) -> anyhow::Result<()> {
    let text = std::fs::read_to_string(config)
        .with_context(|| format!("cannot read {}", config.display()))?;
    let mut body: serde_json::Value = serde_json::from_str(&text)?;
    body[key] = value;
    std::fs::write(config, body.to_string())
        .with_context(|| format!("cannot write {}", config.display()))
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

pub fn run_net(args: NetBenchArgs) -> anyhow::Result<()> {
    let tap = Tap::new(format!("vgbench{}", std::process::id() % 10000))?;
    let scratch = Scratch::new("net")?;
    let vmms = vmms(&args.common, &scratch.0)?;
    let attach = |vmm: &Vmm, cmd: &mut Command| match &vmm.kind {
        Kind::Vigil(_) | Kind::JailedVigil(_) => {
            cmd.arg("--net").arg(format!("tap={}", tap.0));
        }
        Kind::Qemu => {
            cmd.args(["-global", "virtio-mmio.force-legacy=false", "-netdev"])
                .arg(format!(
                    "tap,id=n0,ifname={},script=no,downscript=no",
                    tap.0
                ))
                .args(["-device", "virtio-net-device,netdev=n0"]);
        }
        Kind::Firecracker(dir) => {
            let interface = serde_json::json!([{"iface_id": "eth0", "host_dev_name": tap.0}]);
            let config = dir.join("firecracker.json");
            if let Err(e) = set_firecracker_config(&config, "network-interfaces", interface) {
                eprintln!("firecracker: {e:#}");
            }
        }
    };
    for dir in &args.dir {
        // Receive runs at up to a million frames a second: 200,000 make a window
        // of a fifth of a second or more, where 20,000 swung with single hiccups.
        let (word, frames, keys, caption) = match dir {
            Direction::Tx => (
                "tx",
                20_000,
                &["tx_pps", "tx_kib_s"],
                "virtio-net on a tap, frames sent by the test guest (CPL3 polling driver, \
                 event indices where offered), 20000 frames per case",
            ),
            Direction::Rx => (
                "rx",
                200_000,
                &["rx_pps", "rx_kib_s"],
                "virtio-net on a tap, frames received by the test guest (CPL3 polling \
                 driver, event indices where offered, `--rx-buffers` 2 KiB buffers posted, each \
                 posted again once read) while this process floods the tap from the host \
                 (pausing while the tap's 1000-frame queue is full); 200000 frames per \
                 case, timed from the first",
            ),
        };
        // The flooder answers the guest's ready frames for every run of this direction.
        let _flooder = match dir {
            Direction::Rx => Some(Flooder::start(&tap.0)?),
            Direction::Tx => None,
        };
        let bench = DeviceBench {
            scenario: "net-bench",
            keys,
            requests: Some(("frames", 1)),
            metrics_group: "net",
            caption: caption.into(),
        };
        let (depths, what) = match dir {
            Direction::Tx => (&args.qd, "in flight"),
            Direction::Rx => (&args.rx_buffers, "buffers posted"),
        };
        let cases: Vec<Case> = args
            .frame
            .iter()
            .flat_map(|frame| {
                depths.iter().map(move |qd| Case {
                    label: format!("{word}: {frame}-byte frames, {qd} {what}"),
                    params: format!(
                        "net_dir={word} net_qd={qd} net_frame={frame} net_frames={frames}"
                    ),
                })
            })
            .collect();
        device_bench(args.common.runs, &vmms, &bench, &cases, &attach)?;
    }
    Ok(())
}

/// The guest's `net_dir=rx` frames (`guest/src/net.rs`): its ethertype, the
/// ready frame (followed by the wanted frame length, big-endian), the done
/// frame, and the prefix of the frames the flooder sends.
const ETHERTYPE: u16 = 0x88b5;
const RX_READY: &[u8] = b"vigil-net-bench-rx-ready";
const RX_DONE: &[u8] = b"vigil-net-bench-rx-done";
const RX_FLOOD: &[u8] = b"vigil-net-bench-rx-flood";
/// The longest a flood lasts without the guest's done frame (a VMM that died).
const FLOOD_MOST: std::time::Duration = std::time::Duration::from_secs(20);

/// The host side of `net-bench net_dir=rx`: a thread on a packet socket bound to
/// the tap that waits for the guest's ready frame, then sends frames of the
/// length it asked for as fast as the tap takes them until the done frame,
/// pausing 50 µs whenever the tap's queue is full: the VMM's reads set the pace,
/// and the flooder's CPU goes to the VMM while it waits.
struct Flooder {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Flooder {
    fn start(tap: &str) -> anyhow::Result<Self> {
        use std::os::fd::{FromRawFd, OwnedFd};
        let name = std::ffi::CString::new(tap)?;
        // SAFETY: `name` is a valid NUL-terminated string.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        if ifindex == 0 {
            bail!("tap {tap}: {}", std::io::Error::last_os_error());
        }
        let protocol = ETHERTYPE.to_be();
        // SAFETY: plain socket creation; the result is checked.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(protocol)) };
        if fd < 0 {
            bail!("packet socket: {}", std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_ll is plain old data; all zeros is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = protocol;
        addr.sll_ifindex = ifindex as i32;
        // SAFETY: `addr` is a sockaddr_ll of the length given.
        let bound = unsafe {
            libc::bind(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if bound != 0 {
            bail!(
                "binding a packet socket to {tap}: {}",
                std::io::Error::last_os_error()
            );
        }
        // Straight to the tap, without a queueing discipline: a full tap refuses
        // the frame (ENOBUFS), which paces the flooder to what the VMM reads.
        let one: libc::c_int = 1;
        // SAFETY: PACKET_QDISC_BYPASS takes an int.
        let set = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                libc::SOL_PACKET,
                libc::PACKET_QDISC_BYPASS,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            )
        };
        if set != 0 {
            bail!("PACKET_QDISC_BYPASS: {}", std::io::Error::last_os_error());
        }
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::Builder::new()
            .name("flooder".into())
            .spawn(move || flood_loop(fd, &stopped))?;
        Ok(Flooder {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Flooder {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// One frame from the packet socket within 50 ms (its length), or None.
fn receive_frame(fd: std::os::fd::BorrowedFd, buf: &mut [u8], wait: bool) -> Option<usize> {
    use std::os::fd::AsRawFd;
    if wait {
        let mut poll = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut poll, 1, 50) } <= 0 {
            return None;
        }
    }
    // SAFETY: `buf` is writable for its length.
    let n = unsafe {
        libc::recv(
            fd.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    };
    usize::try_from(n).ok()
}

/// The payload of a frame of our ethertype, after the Ethernet header.
fn payload(frame: &[u8]) -> &[u8] {
    frame.get(14..).unwrap_or_default()
}

fn flood_loop(fd: std::os::fd::OwnedFd, stop: &std::sync::atomic::AtomicBool) {
    use std::os::fd::{AsFd, AsRawFd};
    use std::sync::atomic::Ordering;
    let mut buf = [0u8; 2048];
    while !stop.load(Ordering::Relaxed) {
        let Some(n) = receive_frame(fd.as_fd(), &mut buf, true) else {
            continue;
        };
        let Some(len) = payload(&buf[..n])
            .strip_prefix(RX_READY)
            .and_then(|rest| rest.get(..2))
            .map(|l| usize::from(u16::from_be_bytes([l[0], l[1]])))
        else {
            continue;
        };
        let mut frame = vec![0u8; len.clamp(60, 1514)];
        frame[..6].fill(0xff);
        frame[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0xaa]);
        frame[12..14].copy_from_slice(&ETHERTYPE.to_be_bytes());
        frame[14..14 + RX_FLOOD.len()].copy_from_slice(RX_FLOOD);
        let started = std::time::Instant::now();
        'flood: while !stop.load(Ordering::Relaxed) && started.elapsed() < FLOOD_MOST {
            for _ in 0..32 {
                // SAFETY: `frame` is readable for its length.
                let sent = unsafe {
                    libc::send(
                        fd.as_raw_fd(),
                        frame.as_ptr().cast(),
                        frame.len(),
                        libc::MSG_DONTWAIT,
                    )
                };
                if sent < 0 {
                    // The tap's queue is full (1000 frames): the VMM is behind.
                    std::thread::sleep(std::time::Duration::from_micros(50));
                    break;
                }
            }
            while let Some(n) = receive_frame(fd.as_fd(), &mut buf, false) {
                if payload(&buf[..n]).starts_with(RX_DONE) {
                    break 'flood;
                }
            }
        }
    }
}
