//! The VMM's command line: `vigil run`, `vigil guest export`, `vigil snapshot`,
//! `vigil rt analyze`, `vigil firecracker`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use vigil_migration::{ServerTls, Target, TlsError};
use vigil_model::config::{
    BalloonConfig, BootProtocol, ConsoleConfig, CpuTemplate, DriveConfig, HugePages,
    IntrospectConfig, KernelImage, MachineConfig, MemoryCompression, NetConfig, OnCrash, RateLimit,
    RtTimerConfig, VcpuSched, VmConfig, VsockConfig, DEFAULT_IO_POLL_US, MAX_IO_POLL_US,
};
use vigil_model::cpu::{CpuFeature, CpuModifiers};
use vigil_model::firecracker::Metrics;
use vigil_model::MacAddr;
use vigil_vmm::builder::BuildError;
use vigil_vmm::VmOutcome;

use crate::launch::{Incoming, IntrospectLaunch, Launch, Overrides};
use vigil_introspect::SyscallFilter;
use vigil_shared::exit::{EXIT_ERROR, EXIT_GUEST_CRASH, EXIT_GUEST_STATUS_BASE};
use vigil_shared::logging::Logging;

/// The exit statuses, for `vigil --help` and `vigil run --help`.
macro_rules! exit_status_help {
    () => {
        "\
Exit status:
  0        the guest powered off (ACPI), reset the machine, or wrote 0 to the debug-exit
           port; or the VM migrated away
  1        the VMM failed (bad input, KVM error); the message names the value at fault
  2        the command line could not be parsed
  3        the guest crashed (triple fault, KVM internal or emulation error); a report with
           the vCPU registers goes to stderr
  32+N     the guest wrote status N (1..223) to the debug-exit port (0xf4)
  130/143  stopped by SIGINT (Ctrl-C) / SIGTERM
  SIGSYS   (killed by the signal) a thread made a system call its seccomp filter forbids;
           stderr names the thread and the call (see --no-seccomp)

Set VIGIL_LOG=LEVEL (error, warn, info, debug, trace) or --log-level for detailed logs."
    };
}

const AFTER_HELP: &str = exit_status_help!();

/// `vigil --help`: the commands other binaries run, then the exit statuses.
const TOP_AFTER_HELP: &str = concat!(
    "\
Host commands (each runs the binary of that name beside vigil, with the rest of the
command line; `vigil daemon --help` and so on explain them):
  daemon    The host daemon: supervises VMs, one `vigil run` process each (vigild)
  ctl       Talk to the host daemon: create, list, stop VMs, events (vigil-ctl)
  bench     Measure Vigil against QEMU microvm and Firecracker (vigil-bench)
  jailer    Run one VMM jailed, with Firecracker's jailer flags (vigil-jailer)

",
    exit_status_help!()
);

/// Vigil: a KVM virtual machine monitor that watches what it runs.
#[derive(Parser, Debug)]
#[command(name = "vigil", version, about, after_help = TOP_AFTER_HELP)]
pub struct Cli {
    /// Log level for Vigil's own messages (error, warn, info, debug, trace)
    /// [default: warn].
    #[arg(long, global = true, value_name = "LEVEL")]
    pub log_level: Option<String>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Behave as Firecracker: take Firecracker's command-line flags (--api-sock,
    /// --config-file, --no-api, --id, --level, --log-path, --metrics-path, ...).
    /// The same happens when Vigil is run through a link named `firecracker`.
    /// `vigil firecracker --help` lists the flags and what Vigil does with each.
    #[command(disable_help_flag = true)]
    Firecracker {
        /// Firecracker's flags.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
    /// Boot a VM and connect its serial console to this terminal.
    ///
    /// Without --kernel, boots Vigil's embedded test guest, which prints what it
    /// found (vCPUs, memory, timer) and powers off. Give it scenarios with
    /// --cmdline "test=serial,timer,smp,memory,user".
    ///
    /// With --api-sock PATH, Vigil serves its REST API (Firecracker's, plus its own
    /// under /vigil/) on that Unix socket; without --kernel or --config-file it
    /// then boots nothing and waits for the VM's configuration and an
    /// InstanceStart action. With --config-file, the VM is described by a
    /// Firecracker configuration file and boots at once.
    #[command(after_help = AFTER_HELP)]
    Run(Box<RunArgs>),
    /// Work with the embedded test guest.
    #[command(subcommand)]
    Guest(GuestCommand),
    /// Work with snapshot files (taken with PUT /snapshot/create, loaded with
    /// PUT /snapshot/load).
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// Real-time VMs: the CPU reservations their tasks need.
    #[command(subcommand)]
    Rt(RtCommand),
}

/// `vigil rt analyze --help`: the models, the input, the output.
const RT_ANALYZE_HELP: &str = "\
What it computes:
  Each VM gets an interface: a period Π and a budget Θ of CPU time per period on m'
  vCPUs. With one vCPU this is the periodic resource model Γ=(Π,Θ) (Shin & Lee, RTSS
  2003): Θ anywhere in each period, so the worst case is a blackout of 2(Π-Θ). The
  VM's tasks must meet their deadlines under that worst case: under EDF when the
  demand bound function dbf(t) never exceeds the supply bound function sbf(t); under
  fixed priorities when each task's request bound rbf_i(t) is at most sbf(t) at some
  t <= its deadline. Both tests are exact; Θ is the least that passes, for each
  candidate Π, and the Π with the least bandwidth Θ/Π wins.
  When one vCPU cannot do it (EDF only), the VM gets m' >= 2 vCPUs under the
  multiprocessor periodic resource model <Π,Θ,m'> (Easwaran, Shin & Lee, Real-Time
  Systems 2009) with its global EDF test (sufficient, not exact), the fewest m' up
  to max_vcpus, split into m' servers of budget floor(Θ/m') or one more.
  Each vCPU becomes a SCHED_DEADLINE reservation (runtime = its budget, deadline =
  period = Π); they are placed on the host's cores first-fit decreasing, each core
  filled to at most utilization_limit, and their sum is checked as the kernel's
  admission control checks it.

Input (TOML, or the same as JSON; times are strings with a unit, s, ms, us or ns,
or integers of microseconds):
  [host]
  cores = 4
  utilization_limit = 0.95   # optional: sched_rt_runtime_us / sched_rt_period_us
  min_period = \"100us\"       # optional: the shortest Π searched
  resolution = \"1us\"         # optional: Π and Θ are multiples of it

  [[vms]]
  name = \"ctl\"
  scheduler = \"edf\"          # or \"fp\": deadline monotonic unless tasks give priority
  period = \"5ms\"             # optional: fixes Π; else Π is searched from min_period
                             # up to the shortest deadline
  max_vcpus = 2              # optional: default the host's cores (at most one per task)
  tasks = [
    { name = \"sensor\", period = \"10ms\", wcet = \"2ms\" },
    { name = \"filter\", period = \"20ms\", deadline = \"15ms\", wcet = 3000 },
  ]
  A deadline defaults to the period and may not exceed it; under fp a larger
  priority runs first.

Output: per VM its interface, and for each vCPU the `vigil run` flag that applies it
(--vcpu-sched vcpu=0,policy=deadline,runtime=2ms,deadline=10ms,period=10ms) and, with
--format json, the same as the API's body ({\"vcpu\":0,\"policy\":\"deadline\",
\"runtime_ns\":...}). A \"no\" names the VM, the task, the interval t, the demand and
the supply there, or the vCPU that fits no core and the cores' loads.

Exit status:
  0  everything is schedulable
  1  the file could not be read or a value is wrong (the message names it)
  4  something is not schedulable (the report says what)";

#[derive(Subcommand, Debug)]
pub enum RtCommand {
    /// Compute each real-time VM's CPU reservation (period, budget, vCPUs), the
    /// vCPUs' SCHED_DEADLINE parameters and their host cores, or explain why not.
    #[command(after_help = RT_ANALYZE_HELP)]
    Analyze {
        /// The system: a TOML or JSON file (by its extension, else its first
        /// character).
        file: PathBuf,
        /// text for people, json for programs.
        #[arg(long, value_enum, default_value = "text")]
        format: RtFormat,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum RtFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum SnapshotCommand {
    /// Check a snapshot's state file (format version, length, checksum, every
    /// field) and print what it holds: the machine, each vCPU, the devices.
    /// With --mem, also check that the memory file is the snapshot's size.
    /// Exits 1, naming what is wrong, for a file that cannot be loaded.
    Inspect {
        /// The state file (`snapshot_path`).
        path: PathBuf,
        /// The memory file (`mem_file_path`), to check its size and count its
        /// data (the rest is holes), and the packed pages after its RAM image
        /// when the saved VM's pager held some (checked whole).
        #[arg(long, value_name = "PATH")]
        mem: Option<PathBuf>,
    },
    /// Merge a diff snapshot's memory file onto the memory file of the snapshot
    /// before it, in place, so that the result can be loaded with the diff's
    /// state file.
    ///
    /// A diff (PUT /snapshot/create with "snapshot_type": "Diff") holds only the
    /// guest pages written since the VM's previous snapshot, every other page a
    /// hole that means "unchanged"; its state file says "memory file: Diff".
    /// Loading it needs complete memory: the previous snapshot's memory file
    /// (a Full one, or one already merged up to the previous diff) with this
    /// diff's pages copied onto it, which is what this command does. Merge the
    /// diffs of a chain in the order they were taken. Keep a copy of BASE when
    /// it is still needed: it is overwritten. Never merge onto the memory file a
    /// running VM was loaded from: its memory is a private mapping of that file.
    ///
    ///   cp full.mem vm.mem
    ///   vigil snapshot merge --base vm.mem --diff diff1.mem
    ///   vigil snapshot merge --base vm.mem --diff diff2.mem
    ///   # then PUT /snapshot/load with diff2.snap and vm.mem
    ///
    /// Only the diff's data is copied (found with SEEK_DATA/SEEK_HOLE), so the
    /// file system holding it must keep its holes (ext4, XFS, btrfs, tmpfs do).
    /// A Full snapshot of a VM with --memory-compression keeps the pages its
    /// pager held compressed after the RAM image: those the diff does not
    /// replace are unpacked into BASE's RAM image, which is all BASE keeps.
    /// Exits 1, naming the file and what is wrong, when the two files differ in
    /// size or cannot be read or written.
    #[command(verbatim_doc_comment)]
    Merge {
        /// The memory file to merge onto, overwritten in place.
        #[arg(long, value_name = "BASE.mem")]
        base: PathBuf,
        /// The diff snapshot's memory file.
        #[arg(long, value_name = "DIFF.mem")]
        diff: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub enum GuestCommand {
    /// Write the embedded test guest (an ELF with a PVH entry) to PATH, to boot the
    /// very same guest under QEMU or Firecracker.
    Export {
        /// Where to write the ELF image.
        path: PathBuf,
    },
}

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Serve the REST API on this Unix socket (HTTP/1.1, JSON). It answers
    /// Firecracker's requests (PUT /boot-source, PUT /machine-config,
    /// PUT /drives/ID, PUT /actions {"action_type": "InstanceStart"}, PATCH /vm
    /// {"state": "Paused"}, ...) with Firecracker's status codes and
    /// {"fault_message": ...} errors; GET /vigil/openapi.yaml describes them all.
    /// Without --kernel or --config-file, the VM waits for its configuration;
    /// --console, --symbols, --boot-protocol, --cpu-template, --cpuid-hide and
    /// --on-crash still apply to it. A socket path in use is refused; a stale socket nobody
    /// listens on is replaced; the socket is removed on exit. Example:
    /// vigil run --api-sock /tmp/vm.sock & curl --unix-socket /tmp/vm.sock http://localhost/
    #[arg(long, value_name = "PATH")]
    pub api_sock: Option<PathBuf>,

    /// Receive a VM from another Vigil instead of booting one: listen on TARGET
    /// (tcp:HOST:PORT, or unix:PATH for a local upgrade) for a source that
    /// presents --migration-token (the source is told with PUT
    /// /vigil/migration {"destination": TARGET, "token": TOKEN}). A failed
    /// attempt (a wrong token, a corrupt or cut stream) is logged and the wait
    /// goes on; the VM runs here once the source has stopped its own. With
    /// --api-sock, the API serves the VM once it runs. Example:
    /// vigil run --migrate-from tcp:0.0.0.0:4444 --migration-token "$(openssl rand -hex 16)"
    #[arg(long, value_name = "TARGET", requires = "migration_token")]
    pub migrate_from: Option<Target>,

    /// The one-time token a migration source must present (with --migrate-from).
    #[arg(long, value_name = "TOKEN", requires = "migrate_from")]
    pub migration_token: Option<String>,

    /// Take migration sources over TLS only, presenting this certificate (PEM,
    /// the chain from this destination's own; with --migration-tls-key). The
    /// source checks it against the CA it is given (PUT /vigil/migration
    /// "tls_ca"); the token is still checked, inside TLS.
    #[arg(
        long,
        value_name = "PEM",
        requires_all = ["migrate_from", "migration_tls_key"]
    )]
    pub migration_tls_cert: Option<PathBuf>,

    /// The private key of --migration-tls-cert (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(long, value_name = "PEM", requires = "migration_tls_cert")]
    pub migration_tls_key: Option<PathBuf>,

    /// Boot the VM described by a Firecracker configuration file (JSON with the
    /// keys "boot-source", "machine-config", "drives", "network-interfaces",
    /// "vsock", "balloon", "entropy", "logger", "metrics"; the bodies of the API's
    /// requests; and Vigil's own "vcpu-scheduling", a list of --vcpu-sched entries
    /// as PUT /vigil/vcpus/sched takes them, "rt-timer", {"max_timers",
    /// "min_period_us", "max_budget_us", "priority"}, and "memory-compression",
    /// {"idle_ms", "algo": "lz4" or "zstd"}). No API is needed; with
    /// --api-sock the API serves the running VM.
    /// Cannot be combined with options that describe the VM (--kernel, --disk, ...).
    #[arg(long, value_name = "PATH")]
    pub config_file: Option<PathBuf>,

    /// The instance id that GET / and metrics report.
    #[arg(long, default_value = "anonymous-instance", value_name = "ID")]
    pub id: String,

    /// Kernel to boot: an ELF vmlinux (PVH entry when it has the PVH note, else the
    /// Linux 64-bit entry) or a bzImage. Default: the embedded test guest.
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,

    /// Initial ramdisk, loaded at the top of low memory.
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,

    /// Kernel command line. Default: "console=ttyS0 reboot=k panic=1" for a
    /// --kernel, empty for the test guest.
    #[arg(long, value_name = "STR")]
    pub cmdline: Option<String>,

    /// Number of vCPUs (1 to the host's KVM limit, at most 254).
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub cpus: u32,

    /// Guest memory in MiB (the part above 3 GiB is mapped above 4 GiB).
    #[arg(long, default_value_t = 128, value_name = "MiB")]
    pub memory: u64,

    /// Serial console (COM1): stdio, file:PATH (output only), or none.
    #[arg(long, default_value = "stdio", value_name = "stdio|file:PATH|none", value_parser = parse_console)]
    pub console: ConsoleConfig,

    /// A System.map for the kernel, to name the function at RIP in crash reports.
    #[arg(long, value_name = "PATH")]
    pub symbols: Option<PathBuf>,

    /// Entry point: auto (PVH when the ELF note is present), pvh, or linux
    /// (64-bit boot protocol with a zero page).
    #[arg(long, default_value = "auto", value_enum)]
    pub boot_protocol: BootProtocolArg,

    /// CPUID template: auto hides XSAVE, CX16, SMAP, SMEP and POPCNT on hosts
    /// whose KVM emulates guest kernel code (kvm_pvm), whose emulator lacks those
    /// instructions; host passes through everything KVM supports. kvm_pvm lets
    /// the host's own bits through for features KVM does not report (XSAVE, SMAP,
    /// SMEP, POPCNT there), so Linux guests on it also need
    /// "noxsave clearcpuid=smap,smep,popcnt" on their command line.
    #[arg(long, default_value = "auto", value_enum)]
    pub cpu_template: CpuTemplateArg,

    /// How guest RAM is backed. none: 4 KiB pages; the VM's resident memory grows
    /// only by the pages the guest touches (as with Firecracker's default). thp:
    /// transparent huge pages (MADV_HUGEPAGE; the host's
    /// /sys/kernel/mm/transparent_hugepage/enabled must say madvise or always): KVM
    /// can map guest memory in 2 MiB pages, sparing page-table work for guests that
    /// use much of their memory, but each 2 MiB region the guest touches at all is
    /// resident in full. Measured on a nested KVM with the small Linux kernel: no
    /// faster to boot, 35% more resident memory (BENCHMARKS.md). Applies to VMs
    /// configured through the API or a file too.
    #[arg(long, default_value = "none", value_enum)]
    pub huge_pages: HugePagesArg,

    /// What a guest crash (a triple fault, an instruction KVM cannot run, a failed
    /// VM entry) does. exit: the VM ends and vigil prints a crash report (registers,
    /// the function at RIP, code bytes) and exits with status 3. pause: the crash
    /// report is printed at once, and pause keeps the crashed VM, paused, so its
    /// state can be inspected through the API (and introspection) until it is
    /// stopped (SIGTERM, Ctrl-C, or the API); vigil then exits with status 3 and
    /// the same report. A crashed VM cannot resume.
    #[arg(long, default_value = "exit", value_enum)]
    pub on_crash: OnCrashArg,

    /// How the host schedules vCPU threads; repeat for several vCPUs. Keys:
    /// vcpu=N (or all, the default: every vCPU no other entry names),
    /// policy=other|fifo|rr|deadline (default other, the time-sharing scheduler),
    /// priority=1..99 (fifo, rr), runtime=DUR, deadline=DUR (default the period),
    /// period=DUR (deadline: a SCHED_DEADLINE reservation of runtime in every
    /// period), cpus=LIST (pin to host CPUs: 1, 0-3, 0-1:4; not with deadline,
    /// which the kernel admits on every CPU). Checked against the host before the
    /// VM starts: CPUs this process may use, and every SCHED_DEADLINE reservation
    /// of the host within sched_rt_runtime_us/sched_rt_period_us of its CPUs. The
    /// per-VM API changes it while the VM runs (PUT /vigil/vcpus/sched);
    /// `vigil rt analyze` computes reservations for a task set. Examples:
    /// --vcpu-sched policy=fifo,priority=10,cpus=1
    /// --vcpu-sched vcpu=0,policy=deadline,runtime=2ms,deadline=10ms,period=10ms
    #[arg(long, value_name = "[vcpu=N,]policy=..[,..]", value_parser = VcpuSched::parse)]
    pub vcpu_sched: Vec<VcpuSched>,

    /// The RT timer device (docs/rt-timer.md): the guest arms deadlines per vCPU
    /// through I/O ports 0x620-0x63f (CPUID leaf 0x40000020, ACPI VGL0001); at each
    /// expiry Vigil raises the vCPU's thread to SCHED_FIFO for the guest's budget
    /// and injects the interrupt, so the guest runs on time even when other work
    /// shares its CPU. `on` takes the defaults; keys: max_timers=N per vCPU
    /// (default 4), min_period=DUR (default 100us), max_budget=DUR per expiry
    /// (default 500us), priority=1..98 (default 50; the timer thread runs one
    /// above). A vCPU is never boosted more than half of the time; a guest that
    /// overruns its budget loses the boost and the overrun is counted
    /// (vigil_rt_timer_overruns_total, a security event in vigild).
    #[arg(long, value_name = "on|off|max_timers=N,..", value_parser = parse_rt_timer)]
    pub rt_timer: Option<RtTimerArg>,

    /// Compress cold guest memory inside the VMM (off by default). A guest page
    /// not written for the idle time (`idle=30s`, 200ms to 24h; `on` = 30s, LZ4)
    /// is taken out of RAM: pages of zeros are kept as a marker, identical pages
    /// once, the rest compressed into a pool in this process (`algo=lz4`, the
    /// default and fastest, or `algo=zstd`, smaller and slower to fault in; a
    /// page that does not compress to 3/4 stays in RAM). The guest's or a
    /// device's next touch faults it back in (userfaultfd, tens of µs). GET
    /// /vigil/memory and the metrics show the pool, the ratio and the fault-in
    /// latency. Needs 4 KiB pages (--huge-pages none). A VM loaded from a
    /// snapshot (File backend) or received by pre-copy migration runs with it
    /// too: the pages the saved or sending VM held go straight to the pool. The pool is VMM
    /// memory: like guest RAM, it is lost if the VMM dies. With an RSS target
    /// (`rss=MiB`, 1 to 16777216), guest memory's footprint (its pages in RAM
    /// and the pool) is kept under it, the coldest pages taken first, idle or
    /// not; with no idle time given, only the target takes pages. PATCH
    /// /vigil/memory changes both while the VM runs. Examples:
    /// --memory-compression idle=2m,algo=zstd; --memory-compression rss=512
    #[arg(long, value_name = "on|off|[rss=MiB,][idle=DUR][,algo=lz4|zstd]", value_parser = parse_memory_compression)]
    pub memory_compression: Option<CompressionArg>,

    /// CPUID features to hide from the guest, comma-separated, in
    /// /proc/cpuinfo spelling (e.g. "avx2,rdrand").
    #[arg(long, value_delimiter = ',', value_name = "LIST")]
    pub cpuid_hide: Vec<CpuFeature>,

    /// A custom CPU template: a JSON file as Firecracker's PUT /cpu-config takes
    /// (and its cpu-template-helper writes): cpuid_modifiers force bits of CPUID
    /// registers ("0b" + 32 of 0, 1 or x, most significant first), msr_modifiers
    /// the MSRs each vCPU boots with (64 bits), kvm_capabilities the KVM_CAP_*
    /// numbers the host must have. Applied last, to every vCPU; takes the place of
    /// a configuration's PUT /cpu-config.
    #[arg(long, value_name = "FILE", value_parser = parse_cpu_config)]
    pub cpu_config: Option<CpuConfigArg>,

    /// A virtio-blk disk backed by a raw image; repeat for several. Keys:
    /// path=IMAGE (required), ro=on|off (default off), id=NAME (the serial the
    /// guest reads, at most 20 bytes; default diskN), and rate limits on all
    /// requests: bw=BYTES/s, bw_burst=BYTES, ops=REQUESTS/s, ops_burst=REQUESTS; on
    /// reads alone: rd_bw, rd_bw_burst, rd_ops, rd_ops_burst; on writes (and discard,
    /// write-zeroes) alone: wr_bw, wr_bw_burst, wr_ops, wr_ops_burst (sizes take K,
    /// M, G suffixes); io_engine=sync|async: sync (default) serves requests on the
    /// device thread, async submits reads, writes and flushes to io_uring, many
    /// in flight (Firecracker's io_engine "Async"; refused where the host has no
    /// io_uring); either moves contiguous reads or writes together, in one
    /// call, and answers reads of a sparse image's holes with zeroes without
    /// reading it; num_queues=N: request queues, 1 (default) to 16
    /// (VIRTIO_BLK_F_MQ above 1: a guest gives each vCPU its own). Example:
    /// --disk path=rootfs.img,ro=on,id=root,bw=50M,wr_ops=200,io_engine=async,num_queues=2
    #[arg(long, value_name = "path=IMAGE[,ro=on][,id=NAME][,bw=..][,io_engine=async][,num_queues=N]", value_parser = crate::devices_cli::parse_disk)]
    pub disk: Vec<DriveConfig>,

    /// A virtio-rng entropy device fed by the host's getrandom, with an optional
    /// rate limit (bw=BYTES/s, bw_burst, ops, ops_burst). Example: --rng bw=64K
    #[arg(long, value_name = "[bw=..,ops=..]", num_args = 0..=1, default_missing_value = "", value_parser = crate::devices_cli::parse_rng)]
    pub rng: Option<RateLimit>,

    /// A virtio-balloon device. Keys: size_mib=N (how much memory the guest is
    /// asked to give back at boot, default 0), stats_s=N (ask for memory statistics
    /// every N seconds; 0 or absent: no statistics queue), free_page_reporting=on
    /// (the guest reports free pages, which are returned to the host),
    /// free_page_hinting=on (hinting runs, started through the API's PATCH
    /// /balloon/hinting/start: the pages the guest hints are returned to the host),
    /// deflate_on_oom=on. Pages the guest gives back leave the VMM's resident memory.
    #[arg(long, value_name = "size_mib=N[,stats_s=N][,..]", num_args = 0..=1, default_missing_value = "", value_parser = crate::devices_cli::parse_balloon)]
    pub balloon: Option<BalloonConfig>,

    /// A virtio-net interface on a Linux tap; repeat for several. Keys: tap=NAME
    /// (required: attaches to the tap, or creates it when absent, which needs root or
    /// CAP_NET_ADMIN; bring it up and into a bridge on the host yourself),
    /// mac=XX:XX:XX:XX:XX:XX (default 02:76:69:67:00:NN, NN the interface's index),
    /// rate limits per direction (rx: to the guest, tx: from it): rx_bw,
    /// rx_bw_burst, rx_ops, rx_ops_burst, tx_bw, tx_bw_burst, tx_ops, tx_ops_burst
    /// (each for the whole interface), and queue_pairs=N: receive/transmit queue
    /// pairs, 1 (default) to 16, each on a queue of a multi-queue tap (one made
    /// with `ip tuntap add NAME mode tap multi_queue`, or created so here); the
    /// guest's driver chooses how many it uses (Linux: one per vCPU). Checksum
    /// and segmentation offloads go to the tap as the guest's driver accepts
    /// them. Example: --net tap=vm0,mac=02:00:00:00:00:01,tx_bw=10M,queue_pairs=2
    #[arg(long, value_name = "tap=NAME[,mac=..][,rx_bw=..][,queue_pairs=N]", value_parser = crate::devices_cli::parse_net)]
    pub net: Vec<NetConfig>,

    /// A virtio-vsock device with Firecracker's Unix-socket convention: cid=N (the
    /// guest's CID, 3 or more) and uds=PATH. A guest connection to CID 2 port P
    /// goes to the Unix socket PATH_P; a host client connects to PATH, writes
    /// "CONNECT <port>\n" and, once the guest accepts, reads "OK <host port>\n"
    /// before the stream. Example: --vsock cid=3,uds=/tmp/vm.vsock
    #[arg(long, value_name = "cid=N,uds=PATH", value_parser = crate::devices_cli::parse_vsock)]
    pub vsock: Option<VsockConfig>,

    /// Put the virtio devices on a PCI bus (virtio-pci 1.x, MSI-X interrupts)
    /// instead of virtio-mmio, as Firecracker's flag of the same name does: the
    /// guest finds PCI bus 0 through ACPI (MCFG, ECAM at 0xe0000000; the PCI0 root
    /// bridge in the DSDT, BARs in 0xc0000000-0xcfffffff) and enumerates it, and no
    /// virtio_mmio.device= entries are added to the command line. A guest kernel
    /// needs CONFIG_PCI, CONFIG_PCI_MMCONFIG and CONFIG_VIRTIO_PCI. Snapshots and
    /// migration of such a VM are refused.
    #[arg(long)]
    pub enable_pci: bool,

    /// The most microseconds the device thread keeps polling the virtio rings
    /// after its last work instead of sleeping, with the guest's drivers asked
    /// not to notify meanwhile: a guest that keeps requests coming saves an exit
    /// per notification and the device thread a wake-up. The time polled adapts
    /// (from nothing up to this, while requests come closer together than
    /// this), so an idle VM costs nothing; 0 never polls. Applies to a VM
    /// loaded from a snapshot too.
    #[arg(long, value_name = "US", default_value_t = DEFAULT_IO_POLL_US, value_parser = clap::value_parser!(u32).range(0..=i64::from(MAX_IO_POLL_US)))]
    pub io_poll_us: u32,

    /// Watch the guest kernel's integrity from outside it: after the baseline
    /// (baseline_after=DURATION after the VM starts, default 1s), each vCPU's
    /// CR0.WP, CR4.SMEP/SMAP/UMIP, EFER.NXE/SCE, IDTR, GDTR and syscall MSRs, and
    /// the IDT, GDT, system call table, kernel text and read-only data are
    /// checked every period=DURATION (default 1s; 1ms to 1h), re-hashing only the
    /// pages the dirty log says changed; each difference is logged once (and served
    /// at GET /vigil/introspect/findings). Guest writes to the syscall MSRs are
    /// caught as they happen; policy=protect refuses them (the guest's wrmsr
    /// faults). Needs the kernel's symbols: --symbols, or an ELF kernel with a
    /// symbol table. Example: --introspect period=100ms,policy=protect
    #[arg(long, value_name = "[period=DUR][,policy=report|protect][,baseline_after=DUR]", num_args = 0..=1, default_missing_value = "", value_parser = parse_introspect)]
    pub introspect: Option<IntrospectConfig>,

    /// Trace the guest's system calls (hardware breakpoints at its entries:
    /// syscall at LSTAR, sysenter at SYSENTER_EIP, int 0x80 at its IDT gate, and
    /// at each call's return) into PATH as JSON lines, one per call as it returns:
    /// {"seq", "time_unix_ns", "vcpu", "entry", "nr", "name", "args" (x86-64:
    /// RDI, RSI, RDX, R10, R8, R9; i386: EBX, ECX, EDX, ESI, EDI, EBP), "cr3",
    /// "return_rip", "ret" (null when the return was not seen)}. Starts once the
    /// guest has set LSTAR. Each traced call costs two exits and two single steps.
    /// Past 64 MiB the file is moved to PATH.1 (replacing it) and started afresh.
    #[arg(long, value_name = "PATH")]
    pub trace_syscalls: Option<PathBuf>,

    /// Which system calls --trace-syscalls keeps: comma-separated names or numbers
    /// (read,write,59), optionally cr3=0x... for one process. A name keeps its
    /// number in each ABI (write: 1 for syscall, 4 for int 0x80 and sysenter).
    /// Default: all.
    #[arg(long, value_name = "LIST", requires = "trace_syscalls", value_parser = parse_trace_filter)]
    pub trace_filter: Option<SyscallFilter>,

    /// Append every introspection finding to PATH as a JSON line, the moment it is
    /// found (the records GET /vigil/introspect/findings serves: seq, time_unix_ns,
    /// rule, priority, mitre, vcpu, location, from, to, from_symbol, symbol,
    /// restored, message): a record of what the monitor saw that outlives the VMM.
    /// Past 64 MiB the file is moved to PATH.1 (replacing it) and started afresh.
    #[arg(long, value_name = "PATH")]
    pub findings_path: Option<PathBuf>,

    /// Serve PUT /vigil/debug/memory and PUT /vigil/debug/msr on the API socket:
    /// writes into the guest's memory and MSRs, for testing introspection. Never
    /// on a production VM.
    #[arg(long)]
    pub debug_api: bool,

    /// Run without seccomp filters. By default every thread of the VMM confines
    /// itself to the system calls its job needs (vCPU, devices, API, ...; the lists
    /// are in crates/seccomp), and a forbidden call stops the VMM with a line naming
    /// the thread and the call. For debugging only: a warning says so.
    #[arg(long)]
    pub no_seccomp: bool,

    /// Append the VM's metrics to PATH as JSON lines (created if absent): one line
    /// every 60 seconds and one when the VM ends, each a JSON object with
    /// "utc_timestamp_ms" and groups of counters: "vm" (uptime, guest memory,
    /// resident memory, balloon), "vcpu" and "vcpu<N>" (exits by reason, exit
    /// handling latency, time in the guest, host CPU time and run-queue wait),
    /// "block", "block_blk<N>", "net", "net_net<N>", "vsock", "entropy", "balloon"
    /// (bytes and requests each way, errors, rate-limiter throttles) and "host"
    /// (load, memory, pressure). Counters are totals since the VM started (unlike
    /// Firecracker's per-flush deltas).
    #[arg(long, value_name = "PATH")]
    pub metrics_path: Option<PathBuf>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum BootProtocolArg {
    Auto,
    Pvh,
    Linux,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum HugePagesArg {
    None,
    Thp,
}

impl From<HugePagesArg> for HugePages {
    fn from(a: HugePagesArg) -> Self {
        match a {
            HugePagesArg::None => HugePages::None,
            HugePagesArg::Thp => HugePages::Transparent,
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum OnCrashArg {
    Exit,
    Pause,
}

impl From<OnCrashArg> for OnCrash {
    fn from(a: OnCrashArg) -> Self {
        match a {
            OnCrashArg::Exit => OnCrash::Exit,
            OnCrashArg::Pause => OnCrash::Pause,
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum CpuTemplateArg {
    Auto,
    Host,
}

/// `--introspect [period=DUR][,policy=report|protect][,baseline_after=DUR]`.
fn parse_introspect(s: &str) -> Result<IntrospectConfig, String> {
    s.parse::<IntrospectConfig>().map_err(|e| e.to_string())
}

fn parse_trace_filter(s: &str) -> Result<SyscallFilter, String> {
    SyscallFilter::parse(s).map_err(|e| e.to_string())
}

fn parse_console(s: &str) -> Result<ConsoleConfig, String> {
    match s {
        "stdio" => Ok(ConsoleConfig::Stdio),
        "none" => Ok(ConsoleConfig::None),
        _ => match s.strip_prefix("file:") {
            Some("") => Err("file: needs a path, as in file:/tmp/console.log".into()),
            Some(path) => Ok(ConsoleConfig::File(path.into())),
            None => Err(format!("{s:?} is not one of stdio, file:PATH, none")),
        },
    }
}

/// `--rt-timer`: the device's limits, or none (`off`).
#[derive(Clone, Copy, Debug)]
pub struct RtTimerArg(Option<RtTimerConfig>);

/// A custom CPU template read from its file (`--cpu-config`).
#[derive(Clone, Debug)]
pub struct CpuConfigArg(pub CpuModifiers);

fn parse_cpu_config(path: &str) -> Result<CpuConfigArg, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{path}: cannot read it: {e}"))?;
    let body: vigil_model::firecracker::CpuConfig =
        vigil_model::firecracker::parse(&bytes).map_err(|e| format!("{path}: {e}"))?;
    body.to_config()
        .map(CpuConfigArg)
        .map_err(|e| format!("{path}: {e}"))
}

fn parse_rt_timer(s: &str) -> Result<RtTimerArg, String> {
    RtTimerConfig::parse(s).map(RtTimerArg)
}

/// `--memory-compression`: the pager's settings, or none (`off`).
#[derive(Clone, Copy, Debug)]
pub struct CompressionArg(Option<MemoryCompression>);

fn parse_memory_compression(s: &str) -> Result<CompressionArg, String> {
    MemoryCompression::parse(s).map(CompressionArg)
}

/// The `vigil run` flag of each configuration field (`VmConfig`'s errors name
/// the fields as the configuration document spells them).
fn flag_of(field: &str) -> Option<&'static str> {
    Some(match field {
        "vcpu_count" => "--cpus",
        "mem_size_mib" => "--memory",
        "kernel_image_path" => "--kernel",
        "initrd_path" => "--initrd",
        "boot_args" => "--cmdline",
        "symbols" => "--symbols",
        "console" => "--console",
        "drive_id" => "--disk id=",
        "path_on_host" => "--disk path=",
        "num_queues" => "--disk num_queues=",
        "host_dev_name" => "--net tap=",
        "guest_mac" => "--net mac=",
        "queue_pairs" => "--net queue_pairs=",
        "guest_cid" => "--vsock cid=",
        "uds_path" => "--vsock uds=",
        "amount_mib" => "--balloon size_mib=",
        "vcpu_sched" => "--vcpu-sched",
        "rt_timer" => "--rt-timer",
        "memory_compression" => "--memory-compression",
        _ => return None,
    })
}

/// A VM built from `vigil run`'s flags: an error about one of its fields names
/// the flag that set it (`--cpus 0: ...`), not the configuration field.
fn named_as_flags(e: anyhow::Error) -> anyhow::Error {
    let Some(build) = e.downcast_ref::<BuildError>() else {
        return e;
    };
    match build
        .field_error()
        .and_then(|f| Some(f.named(flag_of(f.field())?)))
    {
        Some(message) => anyhow::anyhow!(message),
        None => e,
    }
}

const TEST_GUEST_NAME: &str = "vigil-test-guest";
const DEFAULT_LINUX_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

impl RunArgs {
    /// The certificate and key of --migration-tls-cert and --migration-tls-key.
    fn migration_tls(&self) -> anyhow::Result<Option<ServerTls>> {
        let (Some(cert), Some(key)) = (&self.migration_tls_cert, &self.migration_tls_key) else {
            return Ok(None);
        };
        ServerTls::load(cert, key).map(Some).map_err(|e| {
            let option = match e {
                TlsError::Pem(vigil_migration::PemError::Key { .. }) => "--migration-tls-key",
                _ => "--migration-tls-cert",
            };
            anyhow::anyhow!("{option} {e}")
        })
    }

    /// The options that describe the VM itself (as opposed to how Vigil runs it).
    fn vm_options_given(&self) -> Vec<&'static str> {
        let mut given = Vec::new();
        let mut check = |yes: bool, name| {
            if yes {
                given.push(name)
            }
        };
        check(self.kernel.is_some(), "--kernel");
        check(self.initrd.is_some(), "--initrd");
        check(self.cmdline.is_some(), "--cmdline");
        check(self.cpus != 1, "--cpus");
        check(self.memory != 128, "--memory");
        check(!self.disk.is_empty(), "--disk");
        check(self.rng.is_some(), "--rng");
        check(self.balloon.is_some(), "--balloon");
        check(!self.net.is_empty(), "--net");
        check(self.vsock.is_some(), "--vsock");
        given
    }

    fn overrides(&self) -> Overrides {
        Overrides {
            console: self.console.clone(),
            symbols: self.symbols.clone(),
            boot_protocol: match self.boot_protocol {
                BootProtocolArg::Auto => BootProtocol::Auto,
                BootProtocolArg::Pvh => BootProtocol::Pvh,
                BootProtocolArg::Linux => BootProtocol::Linux,
            },
            cpu_template: match self.cpu_template {
                CpuTemplateArg::Auto => CpuTemplate::Auto,
                CpuTemplateArg::Host => CpuTemplate::Host,
            },
            cpuid_hide: self.cpuid_hide.clone(),
            cpu_modifiers: self.cpu_config.as_ref().map(|c| c.0.clone()),
            on_crash: self.on_crash.into(),
            huge_pages: self.huge_pages.into(),
            vcpu_sched: self.vcpu_sched.clone(),
            rt_timer: self.rt_timer.as_ref().and_then(|a| a.0),
            memory_compression: self.memory_compression.and_then(|a| a.0),
            pci: self.enable_pci,
            io_poll_us: self.io_poll_us,
            introspect: IntrospectLaunch {
                monitor: self.introspect,
                trace: self
                    .trace_syscalls
                    .clone()
                    .map(|p| (p, self.trace_filter.clone().unwrap_or_default())),
                debug_api: self.debug_api,
                findings_path: self.findings_path.clone(),
            },
        }
    }

    fn run(self, logging: &Logging) -> anyhow::Result<ExitCode> {
        if let Some(path) = &self.metrics_path {
            // Checked here so that the error names the option.
            std::fs::File::options()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("--metrics-path {}: cannot open it", path.display()))?;
        }
        for (option, path) in [
            ("--trace-syscalls", &self.trace_syscalls),
            ("--findings-path", &self.findings_path),
        ] {
            if let Some(path) = path {
                std::fs::File::options()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| format!("{option} {}: cannot open it", path.display()))?;
            }
        }
        let metrics = self.metrics_path.as_ref().map(|path| Metrics {
            metrics_path: path.display().to_string(),
            ..Default::default()
        });
        let (id, overrides) = (self.id.clone(), self.overrides());
        // The flags describe the VM unless a file or the API does.
        let from_flags =
            self.config_file.is_none() && (self.kernel.is_some() || self.api_sock.is_none());
        let launch = if let Some(from) = self.migrate_from.clone() {
            if let Some(option) = self.vm_options_given().first() {
                anyhow::bail!(
                    "{option} with --migrate-from {from}: the VM comes from the source as it is there"
                );
            }
            if let Some(file) = &self.config_file {
                anyhow::bail!(
                    "--config-file {} with --migrate-from {from}: the VM comes from the source",
                    file.display()
                );
            }
            Launch {
                api_sock: self.api_sock.clone(),
                id,
                boot_now: None,
                pre: Default::default(),
                logger: None,
                metrics,
                overrides,
                incoming: Some(Incoming {
                    from,
                    token: self.migration_token.clone().unwrap_or_default(),
                    tls: self.migration_tls()?,
                }),
                seccomp: !self.no_seccomp,
                mmds: Default::default(),
            }
        } else if let Some(file) = &self.config_file {
            if let Some(option) = self.vm_options_given().first() {
                anyhow::bail!(
                    "{option} with --config-file {}: the file describes the VM; put it there",
                    file.display()
                );
            }
            let (pre, config, logger, file_metrics) = crate::launch::from_config_file(file)?;
            if let (Some(path), Some(_)) = (&self.metrics_path, &file_metrics) {
                anyhow::bail!(
                    "--metrics-path {} with --config-file {}: the file has a \"metrics\" section already; keep one",
                    path.display(),
                    file.display()
                );
            }
            Launch {
                api_sock: self.api_sock.clone(),
                id,
                boot_now: Some(config),
                pre,
                logger,
                metrics: file_metrics.or(metrics),
                overrides,
                incoming: None,
                seccomp: !self.no_seccomp,
                mmds: Default::default(),
            }
        } else {
            let waits = self.api_sock.is_some() && self.kernel.is_none();
            if waits {
                if let Some(option) = self.vm_options_given().first() {
                    anyhow::bail!(
                        "{option} with --api-sock and no --kernel: the VM waits for its configuration through the API (PUT /machine-config, PUT /drives/ID, ...); give --kernel to boot it at once instead"
                    );
                }
            }
            Launch {
                api_sock: self.api_sock.clone(),
                id,
                seccomp: !self.no_seccomp,
                mmds: Default::default(),
                boot_now: (!waits).then(|| self.into_config()),
                pre: Default::default(),
                logger: None,
                metrics,
                overrides,
                incoming: None,
            }
        };
        let result = crate::launch::launch(launch, logging);
        if from_flags {
            result.map_err(named_as_flags)
        } else {
            result
        }
    }

    fn into_config(self) -> VmConfig {
        let kernel = match self.kernel {
            Some(path) => KernelImage::File(path),
            None => KernelImage::Embedded {
                name: TEST_GUEST_NAME,
                bytes: vigil_test_guest::ELF,
            },
        };
        let default_cmdline = match kernel {
            KernelImage::File(_) => DEFAULT_LINUX_CMDLINE,
            KernelImage::Embedded { .. } => "",
        };
        let mut config = VmConfig::new(kernel);
        config.boot.initrd = self.initrd;
        config.boot.cmdline = self.cmdline.unwrap_or_else(|| default_cmdline.into());
        config.boot.symbols = self.symbols;
        config.boot.protocol = match self.boot_protocol {
            BootProtocolArg::Auto => BootProtocol::Auto,
            BootProtocolArg::Pvh => BootProtocol::Pvh,
            BootProtocolArg::Linux => BootProtocol::Linux,
        };
        config.machine = MachineConfig {
            vcpu_count: self.cpus,
            mem_size_mib: self.memory,
            cpu_template: match self.cpu_template {
                CpuTemplateArg::Auto => CpuTemplate::Auto,
                CpuTemplateArg::Host => CpuTemplate::Host,
            },
            cpuid_hide: self.cpuid_hide,
            cpu_modifiers: self.cpu_config.map(|c| c.0).unwrap_or_default(),
            huge_pages: self.huge_pages.into(),
        };
        config.console = self.console;
        config.on_crash = self.on_crash.into();
        config.vcpu_sched = self.vcpu_sched;
        config.rt_timer = self.rt_timer.and_then(|a| a.0);
        config.memory_compression = self.memory_compression.and_then(|a| a.0);
        config.pci = self.enable_pci;
        config.io_poll_us = self.io_poll_us;
        config.drives = self.disk;
        for (i, disk) in config.drives.iter_mut().enumerate() {
            if disk.id.is_empty() {
                disk.id = format!("disk{i}");
            }
        }
        config.rng = self.rng;
        config.balloon = self.balloon;
        config.vsock = self.vsock;
        config.nets = self.net;
        for (i, net) in config.nets.iter_mut().enumerate() {
            if net.mac.is_zero() {
                net.mac = MacAddr::for_interface(i);
            }
        }
        config
    }
}

impl Command {
    pub fn run(self, logging: &Logging) -> anyhow::Result<ExitCode> {
        match self {
            Command::Firecracker { args } => {
                let mut argv = vec![std::ffi::OsString::from("firecracker")];
                argv.extend(args);
                crate::firecracker::main(argv, logging)
            }
            Command::Run(args) => args.run(logging),
            Command::Snapshot(SnapshotCommand::Inspect { path, mem }) => {
                print!("{}", crate::snapshot::inspect(&path, mem.as_deref())?);
                Ok(ExitCode::SUCCESS)
            }
            Command::Snapshot(SnapshotCommand::Merge { base, diff }) => {
                eprintln!("{}", crate::snapshot::merge(&base, &diff)?);
                Ok(ExitCode::SUCCESS)
            }
            Command::Rt(RtCommand::Analyze { file, format }) => rt_analyze(&file, format),
            Command::Guest(GuestCommand::Export { path }) => {
                std::fs::write(&path, vigil_test_guest::ELF).with_context(|| {
                    format!("cannot write the test guest to {}", path.display())
                })?;
                eprintln!(
                    "wrote {} ({} bytes)",
                    path.display(),
                    vigil_test_guest::ELF.len()
                );
                Ok(ExitCode::SUCCESS)
            }
        }
    }
}

/// Exit status of `vigil rt analyze` when something is not schedulable.
const EXIT_NOT_SCHEDULABLE: u8 = 4;

fn rt_analyze(file: &std::path::Path, format: RtFormat) -> anyhow::Result<ExitCode> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let report = vigil_rt::analyze_text(&text, file.to_str())
        .with_context(|| format!("{}", file.display()))?;
    match format {
        RtFormat::Text => print!("{}", report.text()),
        RtFormat::Json => println!("{}", serde_json::to_string_pretty(&report)?),
    }
    Ok(if report.schedulable {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_NOT_SCHEDULABLE)
    })
}

pub(crate) fn exit_code(outcome: VmOutcome, describe: &dyn Fn(u64) -> Option<String>) -> ExitCode {
    match outcome {
        VmOutcome::PoweredOff => ExitCode::SUCCESS,
        VmOutcome::Reset => {
            tracing::info!(
                "the guest reset the machine; Vigil stops the VM instead of rebooting it"
            );
            ExitCode::SUCCESS
        }
        VmOutcome::DebugExit(0) => ExitCode::SUCCESS,
        VmOutcome::DebugExit(n) => {
            eprintln!("vigil: the guest exited with status {n}");
            let code = u32::from(EXIT_GUEST_STATUS_BASE).saturating_add(n).min(255);
            ExitCode::from(code as u8)
        }
        VmOutcome::Crashed(report) => {
            eprint!("vigil: the guest crashed.\n{}", report.render(describe));
            ExitCode::from(EXIT_GUEST_CRASH)
        }
        VmOutcome::Stopped(signal) => {
            eprintln!("vigil: stopped by signal {signal}");
            ExitCode::from(128 + signal as u8)
        }
        VmOutcome::Failed(e) => {
            eprintln!("vigil: error: {e}");
            ExitCode::from(EXIT_ERROR)
        }
        VmOutcome::Migrated(to) => {
            eprintln!("vigil: the VM migrated to {to} and runs there now");
            ExitCode::SUCCESS
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn console_values() {
        assert_eq!(parse_console("stdio").unwrap(), ConsoleConfig::Stdio);
        assert_eq!(parse_console("none").unwrap(), ConsoleConfig::None);
        assert_eq!(
            parse_console("file:/tmp/x").unwrap(),
            ConsoleConfig::File("/tmp/x".into())
        );
        assert!(parse_console("file:").unwrap_err().contains("needs a path"));
        assert!(parse_console("tty")
            .unwrap_err()
            .contains("\"tty\" is not one of"));
    }

    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
