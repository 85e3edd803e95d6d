//! The system calls each kind of thread may make. Taken from what the test suite
//! makes each thread do (every device, API request, snapshot, migration and
//! introspection path), then read through and completed from the code for the
//! paths tests reach rarely (a discard, a metrics line, a terminal's restore).
//! What no list holds: running programs, new processes, tracing, mounts, modules,
//! users, keys, BPF, namespaces.

use std::collections::BTreeMap;

use seccompiler::{BackendError, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};
use syscalls::Sysno::{self, *};

use crate::ThreadKind;

/// `ioctl` request types (bits 8..15): KVM's and userfaultfd's.
const KVM_IO: u64 = 0xAE;
const UFFD_IO: u64 = 0xAA;
/// Terminal requests (the console's raw mode and its restore) and FIONBIO.
const TCGETS: u64 = 0x5401;
const TCSETS: u64 = 0x5402;
const TCSETSW: u64 = 0x5403;
const TCSETSF: u64 = 0x5404;
const TIOCGWINSZ: u64 = 0x5413;
const FIONREAD: u64 = 0x541B;
const FIONBIO: u64 = 0x5421;
/// A tap's offloads, set when a virtio-net driver accepts its features (a vCPU
/// thread's register write) or a device is restored (the API, migration or main
/// thread), and cleared by a device reset.
const TUNSETOFFLOAD: u64 = libc::TUNSETOFFLOAD;
/// A multi-queue tap's queue attached or detached: when the driver chooses how
/// many queue pairs it uses (the device thread's control queue), and where
/// `TUNSETOFFLOAD` is (a reset goes back to one pair, a restore to the saved
/// number).
const TUNSETQUEUE: u64 = libc::TUNSETQUEUE;

/// One kind's list while it is built: `None` = the call with any arguments.
#[derive(Default)]
struct List(BTreeMap<Sysno, Option<Vec<SeccompRule>>>);

impl List {
    /// `calls` with any arguments.
    fn any(&mut self, calls: &[Sysno]) {
        for &call in calls {
            self.0.insert(call, None);
        }
    }

    /// `call` when one of `rules` holds (added to those it has).
    fn when(&mut self, call: Sysno, rules: Vec<SeccompRule>) {
        // `None`: already allowed with any arguments.
        if let Some(have) = self.0.entry(call).or_insert_with(|| Some(Vec::new())) {
            have.extend(rules);
        }
    }

    /// `call` when argument `arg` is one of `values`.
    fn when_arg(&mut self, call: Sysno, arg: u8, values: &[u64]) -> Result<(), BackendError> {
        let rules = values
            .iter()
            .map(|&v| rule(&[(arg, SeccompCmpOp::Eq, v)]))
            .collect::<Result<_, _>>()?;
        self.when(call, rules);
        Ok(())
    }

    fn into_rules(self) -> BTreeMap<i64, Vec<SeccompRule>> {
        self.0
            .into_iter()
            .map(|(call, rules)| (call.id() as i64, rules.unwrap_or_default()))
            .collect()
    }
}

/// A rule: every `(argument, comparison, value)` holds.
fn rule(conditions: &[(u8, SeccompCmpOp, u64)]) -> Result<SeccompRule, BackendError> {
    SeccompRule::new(
        conditions
            .iter()
            .map(|(arg, op, value)| {
                SeccompCondition::new(*arg, SeccompCmpArgLen::Qword, op.clone(), *value)
            })
            .collect::<Result<_, _>>()?,
    )
}

/// `kind`'s list, with those of the kinds it starts.
pub(crate) fn rules(kind: ThreadKind) -> Result<BTreeMap<i64, Vec<SeccompRule>>, BackendError> {
    let mut list = List::default();
    every_thread(&mut list)?;
    own(kind, &mut list)?;
    for &started in kind.starts() {
        own(started, &mut list)?;
    }
    Ok(list.into_rules())
}

/// What the Rust runtime, the allocator, logging and the signal handlers need
/// on any thread.
fn every_thread(list: &mut List) -> Result<(), BackendError> {
    list.any(&[
        // Locks, channels, sleeps, clocks the vDSO does not serve (thread CPU time).
        futex,
        sched_yield,
        clock_nanosleep,
        nanosleep,
        clock_gettime,
        getrandom,
        // The CPUs this process may use (std's available_parallelism, the
        // vCPU scheduler's admission): read-only.
        sched_getaffinity,
        // The allocator.
        brk,
        munmap,
        mremap,
        // Logs go to stderr or the log file; dropped handles are closed.
        write,
        close,
        // Signals: the vCPU kick, signal-hook's handler (a byte sent to its
        // socket), a return from any handler, an interrupted sleep resumed.
        rt_sigprocmask,
        rt_sigreturn,
        sigaltstack,
        restart_syscall,
        sendto,
        // A thread's end, the process's end, abort(), the SIGSYS report.
        exit,
        exit_group,
        getpid,
        gettid,
        tgkill,
    ]);
    // Memory is never made executable.
    let not_exec = || rule(&[(2, SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64), 0)]);
    list.when(mmap, vec![not_exec()?]);
    list.when(mprotect, vec![not_exec()?]);
    list.when_arg(
        madvise,
        2,
        &[
            libc::MADV_DONTNEED as u64,
            libc::MADV_FREE as u64,
            libc::MADV_HUGEPAGE as u64,
            libc::MADV_NOHUGEPAGE as u64,
            libc::MADV_REMOVE as u64,
        ],
    )?;
    // The SIGSYS report: the thread's name, no core file, SIGSYS's default action.
    list.when_arg(prctl, 0, &[libc::PR_GET_NAME as u64])?;
    list.when(
        prlimit64,
        vec![rule(&[
            (0, SeccompCmpOp::Eq, 0),
            (1, SeccompCmpOp::Eq, libc::RLIMIT_CORE as u64),
        ])?],
    );
    list.when_arg(rt_sigaction, 0, &[libc::SIGSYS as u64])?;
    Ok(())
}

/// Reading files (the VM's own, /proc and /sys).
const READ_FILES: &[Sysno] = &[
    openat, read, pread64, readv, preadv, lseek, fstat, newfstatat, statx, fcntl, getdents64,
];
/// Writing files the VMM was pointed at (snapshots, metrics, logs, findings).
const WRITE_FILES: &[Sysno] = &[
    pwrite64, writev, pwritev, ftruncate, fallocate, fsync, fdatasync, rename, renameat, unlink,
    unlinkat, mkdirat,
];

/// A disk on the asynchronous engine (`io_engine` Async): its io_uring is set up
/// and its completion eventfd registered where the device is built (the main
/// thread; the API or migration thread for a restored VM), requests are
/// submitted and completions drained on the device thread, and a snapshot's
/// wait for requests in flight runs where the snapshot is taken.
const IO_URING: &[Sysno] = &[io_uring_setup, io_uring_enter, io_uring_register];

fn own(kind: ThreadKind, list: &mut List) -> Result<(), BackendError> {
    match kind {
        ThreadKind::Main => {
            // After the start it waits for the VM, reports a crash (symbols may be
            // read then), writes the last metrics line, removes the API socket and
            // restores the terminal.
            list.any(READ_FILES);
            list.any(WRITE_FILES);
            list.any(IO_URING);
            kvm_ioctls(
                list,
                &[
                    TCGETS,
                    TCSETS,
                    TCSETSW,
                    TCSETSF,
                    TIOCGWINSZ,
                    TUNSETOFFLOAD,
                    TUNSETQUEUE,
                ],
            )?;
        }
        ThreadKind::Api => {
            // HTTP on the API socket (tokio); snapshots, logger and metrics files;
            // dirty logs and vCPU state for snapshots; vCPU scheduling (other
            // threads' policies and CPUs); starting the threads of `starts`.
            list.any(&[
                epoll_wait,
                epoll_pwait,
                epoll_ctl,
                accept4,
                recvfrom,
                recvmsg,
                sendmsg,
                shutdown,
                getsockopt,
                eventfd2,
                sched_setattr,
                sched_getattr,
                sched_setaffinity,
            ]);
            list.any(READ_FILES);
            list.any(WRITE_FILES);
            list.any(IO_URING);
            kvm_ioctls(list, &[FIONBIO, FIONREAD, TUNSETOFFLOAD, TUNSETQUEUE])?;
            start_threads(list)?;
        }
        ThreadKind::Signals => {
            // Reads signal-hook's socket.
            list.any(&[recvfrom, read, fcntl]);
        }
        ThreadKind::Metrics => {
            // A metrics line: /proc for the process and host figures, the dirty
            // rate from KVM's dirty log (KVM_GET_DIRTY_LOG), then the line
            // appended to the metrics file.
            list.any(READ_FILES);
            list.any(WRITE_FILES);
            kvm_ioctls(list, &[])?;
        }
        ThreadKind::Vcpu => {
            // KVM_RUN and the exits it serves (device registers, the console's
            // output); its scheduling once it first exits (it reads /proc and
            // /sys for the host's limits, never writes there).
            list.any(&[
                read,
                fcntl,
                lseek,
                fstat,
                newfstatat,
                statx,
                sched_setattr,
                sched_getattr,
                sched_setaffinity,
            ]);
            list.when(
                openat,
                vec![rule(&[(
                    2,
                    SeccompCmpOp::MaskedEq((libc::O_ACCMODE | libc::O_CREAT) as u64),
                    libc::O_RDONLY as u64,
                )])?],
            );
            kvm_ioctls(list, &[TUNSETOFFLOAD, TUNSETQUEUE])?;
        }
        ThreadKind::Devices => {
            // virtio queues: disk I/O (flush, discard, write-zeroes), the tap,
            // vsock's Unix sockets, the rng, the balloon's pages, rate limit timers.
            list.any(&[
                epoll_wait,
                epoll_pwait,
                epoll_ctl,
                timerfd_settime,
                timerfd_gettime,
                read,
                readv,
                pread64,
                preadv,
                pwrite64,
                writev,
                pwritev,
                fallocate,
                fsync,
                fdatasync,
                fcntl,
                fstat,
                newfstatat,
                statx,
                accept4,
                connect,
                recvfrom,
                recvmsg,
                sendmsg,
                shutdown,
                getsockopt,
            ]);
            list.any(IO_URING);
            // Whether a read lies in a hole of its image.
            list.when_arg(lseek, 2, &[libc::SEEK_DATA as u64])?;
            list.when(
                socket,
                vec![rule(&[(0, SeccompCmpOp::Eq, libc::AF_UNIX as u64)])?],
            );
            kvm_ioctls(list, &[FIONBIO, FIONREAD, TUNSETQUEUE])?;
        }
        ThreadKind::RtTimer => {
            // Boosts vCPU threads and sends MSIs (KVM_SIGNAL_MSI).
            list.any(&[sched_setattr, sched_getattr, sched_setaffinity]);
            kvm_ioctls(list, &[])?;
        }
        ThreadKind::Introspect => {
            // Dirty logs and vCPU state, findings appended to a file, the trace's
            // output; vCPUs are kicked to read their registers.
            list.any(READ_FILES);
            list.any(WRITE_FILES);
            kvm_ioctls(list, &[])?;
        }
        ThreadKind::Migration => {
            // The stream (Unix or TCP, TLS), its reader thread and the throttle on
            // the source; pages written in through userfaultfd on the destination.
            list.any(&[
                poll,
                ppoll,
                connect,
                setsockopt,
                getsockopt,
                getsockname,
                getpeername,
                recvfrom,
                recvmsg,
                sendmsg,
                shutdown,
            ]);
            list.any(READ_FILES);
            list.any(WRITE_FILES);
            list.any(IO_URING);
            list.when_arg(
                socket,
                0,
                &[
                    libc::AF_UNIX as u64,
                    libc::AF_INET as u64,
                    libc::AF_INET6 as u64,
                ],
            )?;
            list.when(
                ioctl,
                vec![rule(&[(1, SeccompCmpOp::MaskedEq(0xff00), UFFD_IO << 8)])?],
            );
            kvm_ioctls(list, &[TUNSETOFFLOAD, TUNSETQUEUE])?;
            start_threads(list)?;
        }
        ThreadKind::Pager => {
            // Faults read from the userfaultfd (poll, read) and answered by its
            // ioctls (copy, zero page, write-protect); the dirty log
            // (KVM_GET_DIRTY_LOG) and /proc/self/pagemap for the scanner;
            // pages dropped with madvise (every thread's list).
            list.any(&[poll, ppoll, read, pread64, fstat, fcntl]);
            list.when(
                openat,
                vec![rule(&[(
                    2,
                    SeccompCmpOp::MaskedEq((libc::O_ACCMODE | libc::O_CREAT) as u64),
                    libc::O_RDONLY as u64,
                )])?],
            );
            list.when(
                ioctl,
                vec![
                    rule(&[(1, SeccompCmpOp::MaskedEq(0xff00), UFFD_IO << 8)])?,
                    rule(&[(1, SeccompCmpOp::MaskedEq(0xff00), KVM_IO << 8)])?,
                ],
            );
        }
    }
    Ok(())
}

/// `ioctl` with KVM's requests, and the `others` named.
fn kvm_ioctls(list: &mut List, others: &[u64]) -> Result<(), BackendError> {
    let mut rules = vec![rule(&[(1, SeccompCmpOp::MaskedEq(0xff00), KVM_IO << 8)])?];
    for &request in others {
        rules.push(rule(&[(1, SeccompCmpOp::Eq, request)])?);
    }
    list.when(ioctl, rules);
    Ok(())
}

/// Starting threads: `clone` for a thread of this process only (never a new
/// process), `clone3` (answered ENOSYS before this list), and the new thread's
/// own confinement.
fn start_threads(list: &mut List) -> Result<(), BackendError> {
    let thread = libc::CLONE_THREAD as u64;
    list.when(
        clone,
        vec![rule(&[(0, SeccompCmpOp::MaskedEq(thread), thread)])?],
    );
    list.any(&[clone3, seccomp, set_robust_list, rseq]);
    list.when_arg(
        prctl,
        0,
        &[
            libc::PR_SET_NAME as u64,
            libc::PR_SET_NO_NEW_PRIVS as u64,
            libc::PR_GET_NAME as u64,
        ],
    )?;
    Ok(())
}
