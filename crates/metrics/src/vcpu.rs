//! Counters of one vCPU: exits by reason, how long the VMM took to handle each
//! exit, and time spent inside `KVM_RUN`. Written only by the vCPU's own thread,
//! with single-writer relaxed atomics (a load and a store: no locked instruction,
//! no lock, no allocation); read by anyone.

use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::host;
use crate::primitives::{duration_ns, Counter, Histogram, HistogramSnapshot};

/// Why `KVM_RUN` returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExitReason {
    /// Port I/O (`KVM_EXIT_IO`), in or out.
    Io,
    /// MMIO (`KVM_EXIT_MMIO`), read or write.
    Mmio,
    /// `KVM_EXIT_HLT`.
    Hlt,
    /// `KVM_EXIT_SHUTDOWN` (triple fault).
    Shutdown,
    /// `KVM_EXIT_INTERNAL_ERROR`.
    InternalError,
    /// `KVM_EXIT_FAIL_ENTRY`.
    FailEntry,
    /// `KVM_EXIT_SYSTEM_EVENT`.
    SystemEvent,
    /// `KVM_EXIT_X86_WRMSR` or `KVM_EXIT_X86_RDMSR`: a guest access to an MSR the
    /// VMM filters (an MSR write guard).
    Msr,
    /// `KVM_EXIT_DEBUG`: a hardware breakpoint or single step the VMM asked for.
    Debug,
    /// `KVM_RUN` failed with `EINTR`/`EAGAIN` (a kick from the VMM, a signal).
    Intr,
    /// Anything else, `KVM_RUN` errors included.
    Other,
}

impl ExitReason {
    /// Every reason, in the order of [`ExitCounts`]' fields.
    pub const ALL: [ExitReason; 11] = [
        ExitReason::Io,
        ExitReason::Mmio,
        ExitReason::Hlt,
        ExitReason::Shutdown,
        ExitReason::InternalError,
        ExitReason::FailEntry,
        ExitReason::SystemEvent,
        ExitReason::Msr,
        ExitReason::Debug,
        ExitReason::Intr,
        ExitReason::Other,
    ];

    /// The label value (`io`, `mmio`, `hlt`, `shutdown`, `internal_error`,
    /// `fail_entry`, `system_event`, `msr`, `debug`, `intr`, `other`).
    pub fn name(self) -> &'static str {
        match self {
            ExitReason::Io => "io",
            ExitReason::Mmio => "mmio",
            ExitReason::Hlt => "hlt",
            ExitReason::Shutdown => "shutdown",
            ExitReason::InternalError => "internal_error",
            ExitReason::FailEntry => "fail_entry",
            ExitReason::SystemEvent => "system_event",
            ExitReason::Msr => "msr",
            ExitReason::Debug => "debug",
            ExitReason::Intr => "intr",
            ExitReason::Other => "other",
        }
    }

    const fn index(self) -> usize {
        self as usize
    }
}

/// Counters of one vCPU.
#[derive(Debug, Default)]
pub struct VcpuCounters {
    id: u32,
    exits: [Counter; ExitReason::ALL.len()],
    /// From `KVM_RUN` returning to the next `KVM_RUN`: what the VMM spends on an exit.
    pub exit_handling: Histogram,
    /// Nanoseconds inside `KVM_RUN` (guest time, in-kernel exits and in-kernel
    /// halts included).
    pub guest_ns: Counter,
    /// Guest port I/O and MMIO accesses no device claims (reads get all ones,
    /// writes are dropped): a guest probing or attacking the VMM's address map.
    pub unclaimed_pio: Counter,
    pub unclaimed_mmio: Counter,
    /// The vCPU thread's Linux thread id while it runs (0: not running).
    tid: AtomicI32,
    /// The thread's schedstat (on-CPU ns, run-queue wait ns) as it left.
    final_cpu_ns: AtomicU64,
    final_wait_ns: AtomicU64,
}

impl VcpuCounters {
    /// Counters of vCPU `id`.
    pub fn new(id: u32) -> Self {
        Self {
            id,
            ..Default::default()
        }
    }

    /// The vCPU's index.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// Counts one exit. Only the vCPU's own thread may call this.
    #[inline]
    pub fn count_exit(&self, reason: ExitReason) {
        self.exits[reason.index()].add_single_writer(1);
    }

    /// Exits for `reason` so far.
    pub fn exits(&self, reason: ExitReason) -> u64 {
        self.exits[reason.index()].get()
    }

    /// Called by the vCPU thread when it starts, with its thread id (`gettid`), so
    /// that snapshots can read its scheduler statistics.
    pub fn thread_started(&self, tid: i32) {
        self.tid.store(tid, Ordering::Relaxed);
    }

    /// Called by the vCPU thread as it leaves: keeps its final scheduler statistics
    /// (read from `/proc/thread-self/schedstat`) and forgets its thread id, which
    /// the kernel may give to another thread.
    pub fn thread_exiting(&self) {
        if let Some((cpu, wait)) = host::read_schedstat("/proc/thread-self/schedstat") {
            self.final_cpu_ns.store(cpu, Ordering::Relaxed);
            self.final_wait_ns.store(wait, Ordering::Relaxed);
        }
        self.tid.store(0, Ordering::Relaxed);
    }

    /// (on-CPU ns, run-queue wait ns) of the vCPU thread: live while it runs, as it
    /// left afterwards, `None` before it started or where schedstat is missing.
    fn schedstat(&self) -> Option<(u64, u64)> {
        match self.tid.load(Ordering::Relaxed) {
            0 => {
                let cpu = self.final_cpu_ns.load(Ordering::Relaxed);
                let wait = self.final_wait_ns.load(Ordering::Relaxed);
                (cpu != 0 || wait != 0).then_some((cpu, wait))
            }
            tid => host::read_schedstat(&format!("/proc/self/task/{tid}/schedstat")),
        }
    }

    /// The counts now.
    pub fn snapshot(&self) -> VcpuSnapshot {
        let e = |r: ExitReason| self.exits(r);
        let sched = self.schedstat();
        VcpuSnapshot {
            id: self.id,
            exits: ExitCounts {
                io: e(ExitReason::Io),
                mmio: e(ExitReason::Mmio),
                hlt: e(ExitReason::Hlt),
                shutdown: e(ExitReason::Shutdown),
                internal_error: e(ExitReason::InternalError),
                fail_entry: e(ExitReason::FailEntry),
                system_event: e(ExitReason::SystemEvent),
                msr: e(ExitReason::Msr),
                debug: e(ExitReason::Debug),
                intr: e(ExitReason::Intr),
                other: e(ExitReason::Other),
            },
            exit_handling: self.exit_handling.snapshot(),
            guest_ns: self.guest_ns.get(),
            unclaimed_pio: self.unclaimed_pio.get(),
            unclaimed_mmio: self.unclaimed_mmio.get(),
            cpu_ns: sched.map(|s| s.0),
            wait_ns: sched.map(|s| s.1),
        }
    }
}

/// The timing state of one vCPU run loop (a local of the vCPU thread): call
/// [`Self::entering`] just before `KVM_RUN` and [`Self::exited`] just after.
/// The vCPU thread is the only writer of its [`VcpuCounters`]. Two clock reads
/// per exit.
#[derive(Debug, Default)]
pub struct RunClock {
    entered: Option<Instant>,
    left: Option<Instant>,
}

impl RunClock {
    /// `KVM_RUN` is about to be entered: the previous exit's handling ends now.
    #[inline]
    pub fn entering(&mut self, counters: &VcpuCounters) {
        let now = Instant::now();
        if let Some(left) = self.left.take() {
            counters
                .exit_handling
                .record_ns_single_writer(duration_ns(now.saturating_duration_since(left)));
        }
        self.entered = Some(now);
    }

    /// The vCPU was parked (the VM paused) since its last exit: that wait is not
    /// exit handling.
    pub fn parked(&mut self) {
        self.left = None;
    }

    /// `KVM_RUN` returned for `reason`.
    #[inline]
    pub fn exited(&mut self, counters: &VcpuCounters, reason: ExitReason) {
        let now = Instant::now();
        if let Some(entered) = self.entered.take() {
            counters
                .guest_ns
                .add_single_writer(duration_ns(now.saturating_duration_since(entered)));
        }
        counters.count_exit(reason);
        self.left = Some(now);
    }
}

/// Exits by reason.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitCounts {
    pub io: u64,
    pub mmio: u64,
    pub hlt: u64,
    pub shutdown: u64,
    pub internal_error: u64,
    pub fail_entry: u64,
    pub system_event: u64,
    // Absent from snapshots taken before these reasons were counted.
    #[serde(default)]
    pub msr: u64,
    #[serde(default)]
    pub debug: u64,
    pub intr: u64,
    pub other: u64,
}

impl ExitCounts {
    /// `(reason, count)` for every reason.
    pub fn iter(&self) -> impl Iterator<Item = (ExitReason, u64)> {
        let v = [
            self.io,
            self.mmio,
            self.hlt,
            self.shutdown,
            self.internal_error,
            self.fail_entry,
            self.system_event,
            self.msr,
            self.debug,
            self.intr,
            self.other,
        ];
        ExitReason::ALL.into_iter().zip(v)
    }

    /// All exits.
    pub fn total(&self) -> u64 {
        self.iter().map(|(_, n)| n).sum()
    }

    fn add(&mut self, o: &ExitCounts) {
        self.io += o.io;
        self.mmio += o.mmio;
        self.hlt += o.hlt;
        self.shutdown += o.shutdown;
        self.internal_error += o.internal_error;
        self.fail_entry += o.fail_entry;
        self.system_event += o.system_event;
        self.msr += o.msr;
        self.debug += o.debug;
        self.intr += o.intr;
        self.other += o.other;
    }
}

/// A vCPU's counters at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuSnapshot {
    pub id: u32,
    pub exits: ExitCounts,
    /// Exit handling latency (ns).
    pub exit_handling: HistogramSnapshot,
    /// Time inside `KVM_RUN`, ns.
    pub guest_ns: u64,
    /// Port I/O and MMIO accesses no device claims.
    #[serde(default)]
    pub unclaimed_pio: u64,
    #[serde(default)]
    pub unclaimed_mmio: u64,
    /// The vCPU thread's time on a host CPU, ns (schedstat).
    pub cpu_ns: Option<u64>,
    /// The vCPU thread's time runnable but waiting for a host CPU, ns (schedstat):
    /// steal as the guest would see it.
    pub wait_ns: Option<u64>,
}

impl VcpuSnapshot {
    /// The sum of several vCPUs (id 0): the VM-wide `vcpu` group.
    pub fn sum<'a>(all: impl IntoIterator<Item = &'a VcpuSnapshot>) -> VcpuSnapshot {
        let mut total = VcpuSnapshot::default();
        for v in all {
            total.exits.add(&v.exits);
            total.exit_handling.merge(&v.exit_handling);
            total.guest_ns += v.guest_ns;
            total.unclaimed_pio += v.unclaimed_pio;
            total.unclaimed_mmio += v.unclaimed_mmio;
            total.cpu_ns = sum_opt(total.cpu_ns, v.cpu_ns);
            total.wait_ns = sum_opt(total.wait_ns, v.wait_ns);
        }
        total
    }
}

fn sum_opt(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a + b),
        (a, b) => a.or(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_clock_counts_exits_guest_time_and_handling() {
        let c = VcpuCounters::new(0);
        let mut clock = RunClock::default();
        for reason in [ExitReason::Io, ExitReason::Io, ExitReason::Mmio] {
            clock.entering(&c);
            std::thread::sleep(std::time::Duration::from_millis(1));
            clock.exited(&c, reason);
        }
        clock.entering(&c);
        let s = c.snapshot();
        assert_eq!(s.exits.io, 2);
        assert_eq!(s.exits.mmio, 1);
        assert_eq!(s.exits.total(), 3);
        assert!(s.guest_ns >= 3_000_000, "{}", s.guest_ns);
        assert_eq!(
            s.exit_handling.count, 3,
            "one per exit followed by an entry"
        );
        let names: Vec<_> = s.exits.iter().map(|(r, _)| r.name()).collect();
        assert_eq!(names[0], "io");
        assert_eq!(names.len(), ExitReason::ALL.len());
        assert_eq!(names[7..9], ["msr", "debug"]);
    }

    #[test]
    fn schedstat_of_a_live_thread_then_its_final_values() {
        let c = std::sync::Arc::new(VcpuCounters::new(1));
        assert_eq!(c.snapshot().cpu_ns, None, "not started yet");
        let c2 = c.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            // /proc/thread-self links to /proc/<pid>/task/<tid>.
            let tid = std::fs::read_link("/proc/thread-self")
                .ok()
                .and_then(|p| p.file_name()?.to_str()?.parse().ok())
                .unwrap_or(0);
            c2.thread_started(tid);
            let mut x = 0u64;
            for i in 0..1_000_000u64 {
                x = x.wrapping_add(i * i);
            }
            std::hint::black_box(x);
            tx.send(()).unwrap();
            done_rx.recv().unwrap();
            c2.thread_exiting();
        });
        rx.recv().unwrap();
        let live = c.snapshot();
        done_tx.send(()).unwrap();
        t.join().unwrap();
        let after = c.snapshot();
        if std::path::Path::new("/proc/thread-self/schedstat").exists() {
            assert!(live.cpu_ns.unwrap() > 0);
            assert!(after.cpu_ns.unwrap() >= live.cpu_ns.unwrap());
        }
        let sum = VcpuSnapshot::sum([&live, &after]);
        assert_eq!(sum.exits.total(), 0);
    }
}
