//! `vigil-bench`: Vigil measured against its peers on this machine (also run as
//! `vigil bench`). It runs the `vigil` and `vigild` binaries beside it, QEMU
//! microvm and Firecracker as separate processes, and prints markdown tables.

mod api;
mod boot;
mod devices;
mod introspect;
mod memory;
mod migrate;
mod peers;
mod pvh;
mod rt;
mod rt_analyze;
mod snapshot;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vigil_shared::{exit, logging};

/// Measure Vigil against a peer VMM on this machine.
#[derive(Parser, Debug)]
#[command(name = "vigil-bench", version)]
struct BenchArgs {
    /// Log level for the benchmark's own messages (error, warn, info, debug, trace)
    /// [default: warn; VIGIL_LOG overrides it].
    #[arg(long, global = true, value_name = "LEVEL")]
    log_level: Option<String>,

    #[command(subcommand)]
    command: BenchCommand,
}

#[derive(Subcommand, Debug)]
enum BenchCommand {
    /// Boot three guests (a trivial PVH guest, Vigil's test guest, the small Linux
    /// kernel) under Vigil, QEMU microvm and Firecracker (--firecracker PATH), the
    /// VMMs interleaved over the rounds, and print markdown tables: time to the
    /// guest's line on the serial console, CPU time, resident memory at that line
    /// and the VMM's overhead (RSS less the guest's resident RAM), with ratios.
    Boot(boot::BootBenchArgs),
    /// Run the test guest's virtio-blk benchmark (reads then writes, at each
    /// --qd queue depth and --bs request size) under Vigil (its disk on the
    /// synchronous and on the io_uring engine), QEMU microvm and
    /// Firecracker (--firecracker PATH), interleaved, and print IOPS and KiB/s,
    /// the VMM's CPU, KVM exits and interrupts per request, with ratios.
    Blk(devices::BlkBenchArgs),
    /// Run the test guest's virtio-net transmit benchmark (minimum-size frames to a
    /// tap this command creates, so it needs root) at each queue depth (--qd)
    /// under Vigil and under QEMU microvm, interleaved, and print packets per
    /// second, the VMM's CPU, KVM exits and interrupts per frame, with ratios.
    Net(devices::NetBenchArgs),
    /// Start `vigild` in a scratch folder and measure API request latency
    /// (p50/p99 of GET / on a VM's socket, GET /vms and GET /metrics on the daemon)
    /// and VM creation and destruction rates through the daemon (test-guest VMs,
    /// one at a time and all at once); print markdown tables.
    Api(api::ApiBenchArgs),
    /// Measure introspection: the integrity monitor's CPU (% of one CPU at 1 s,
    /// 100 ms and 10 ms periods) on the small Linux kernel kept paused at its
    /// emulation failure, one check with and without the dirty log, and the cost
    /// per traced system call (the test guest's syscall-loop); print markdown
    /// tables.
    Introspect(introspect::IntrospectBenchArgs),
    /// Live-migrate the test guest over TCP on 127.0.0.1, Vigil to Vigil and QEMU
    /// to QEMU alternating, idle and dirtying memory (256 MiB and 1 GiB guests),
    /// and print median total time, downtime, bytes sent and the source's CPU
    /// time, with ratios.
    Migrate(migrate::MigrateBenchArgs),
    /// Snapshot the test guest (128 MiB and 1 GiB, its memory written) through
    /// Firecracker's API under Vigil and Firecracker (--firecracker PATH),
    /// interleaved, and load it into a fresh process with the File backend and
    /// with the Uffd backend (a page-fault handler in this program serving both);
    /// print median create and load times, time from the load request to the
    /// guest's first console line, the VMM's CPU and the pages served, with ratios.
    Snapshot(snapshot::SnapshotBenchArgs),
    /// Time `vigil rt analyze`'s analysis (interfaces of every VM) on random task
    /// sets of 10, 100 and 1000 tasks over 2, 4 and 8 VMs, periods random or
    /// harmonic, beside the brute-force reference (least budget by tick-by-tick
    /// simulation on the worst-case supply) where the hyperperiod allows it; print
    /// a markdown table of medians.
    RtAnalyze(rt_analyze::RtBenchArgs),
    /// Run the test guest's periodic real-time task (1 ms deadlines, lateness
    /// measured in the guest) with its vCPU on one host CPU beside 0 to 2 CPU hogs:
    /// Vigil with the vCPU thread SCHED_OTHER, SCHED_FIFO, SCHED_DEADLINE and with
    /// the RT timer device, QEMU microvm with its vCPU thread under CFS and
    /// SCHED_FIFO, interleaved; print median p50/p99/max lateness, missed periods
    /// and the hogs' throughput. Cases a VMM refuses are left out with the reason.
    Rt(rt::RtBenchArgs),
    /// Measure the memory-compression pager on the test guest's mix (zero,
    /// duplicate, text and random pages) with LZ4 and zstd, beside zram with lz4
    /// (/dev/zram0, as root, when unused; reset after) and a bare userfaultfd
    /// round trip: memory holding the mix, ratio, compression per CPU second,
    /// fault-in p50/p99; print a markdown table of medians.
    Memory(memory::MemoryBenchArgs),
}

fn main() -> ExitCode {
    let args = BenchArgs::parse();
    if let Err(code) = logging::start("vigil-bench", args.log_level.as_deref(), "warn") {
        return code;
    }
    let result = match args.command {
        BenchCommand::Boot(args) => boot::run(args),
        BenchCommand::Blk(args) => devices::run_blk(args),
        BenchCommand::Net(args) => devices::run_net(args),
        BenchCommand::Api(args) => api::run(args),
        BenchCommand::Introspect(args) => introspect::run(args),
        BenchCommand::Migrate(args) => migrate::run(args),
        BenchCommand::Snapshot(args) => snapshot::run(args),
        BenchCommand::RtAnalyze(args) => rt_analyze::run(args),
        BenchCommand::Rt(args) => rt::run(args),
        BenchCommand::Memory(args) => memory::run(args),
    };
    exit::report("vigil-bench", result.map(|()| ExitCode::SUCCESS))
}

#[cfg(test)]
mod tests {
    #[test]
    fn cli_is_consistent() {
        use clap::CommandFactory;
        super::BenchArgs::command().debug_assert();
    }
}
