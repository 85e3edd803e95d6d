//! The system call tracer: hardware breakpoints on every vCPU at the system call
//! entries (LSTAR, SYSENTER_EIP, the handler of IDT gate 0x80), and on each vCPU
//! at the return of the call it last saw enter; each call decoded from the
//! registers, filtered, completed with its result at its return, kept in memory
//! and appended to its JSON-lines output.

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use vigil_events::Timestamp;
use vigil_metrics::IntrospectCounters;
use vigil_vmm::vstate::inspect::BreakpointHandler;
use vigil_vmm::GuestMemoryMmap;

use super::{lock, IntrospectError, Introspector, JsonLines};
use crate::syscall::CR3_ADDR;
use crate::{
    read_idt_gate, read_virt, CpuState, GuestRead, ReturnPoint, SyscallEntry, SyscallFilter,
    SyscallRecord, SyscallRegs,
};

/// The IDT vector of Linux's i386 system call entry.
const INT80_VECTOR: u8 = 0x80;
/// CR4.LA57: 5-level paging.
const CR4_LA57: u64 = 1 << 12;

/// The entries to trace, as the vCPU `cpu` has them: LSTAR always, SYSENTER_EIP
/// when set, the handler of IDT gate 0x80 when that gate is present and reads.
fn entries(mem: &GuestMemoryMmap, cpu: &CpuState) -> Vec<(u64, SyscallEntry)> {
    let mut entries = vec![(cpu.lstar, SyscallEntry::Syscall)];
    if cpu.sysenter_eip != 0 {
        entries.push((cpu.sysenter_eip, SyscallEntry::Sysenter));
    }
    let int80 = (u32::from(cpu.idt.limit) >= u32::from(INT80_VECTOR) * 16 + 15)
        .then(|| read_idt_gate(mem, cpu.cr3, cpu.la57(), cpu.idt.base, INT80_VECTOR).ok())
        .flatten()
        .filter(|g| g.present && g.handler != 0);
    if let Some(gate) = int80 {
        entries.push((gate.handler, SyscallEntry::Int80));
    }
    // One entry per address: the first (a kernel pointing two at one handler
    // decodes them with the first's ABI).
    let mut seen = Vec::new();
    entries.retain(|(a, _)| {
        let new = !seen.contains(a);
        seen.push(*a);
        new
    });
    entries
}

impl Introspector {
    /// Starts tracing system calls that pass `filter`; each is kept in memory (the
    /// last [`TRACE_KEEP`]) and, with `output`, written there as a JSON line.
    /// The entries are those of the first vCPU in long mode, read now: a guest
    /// that moves them later is traced where they were.
    pub fn start_trace(
        &self,
        filter: SyscallFilter,
        output: Option<&Path>,
    ) -> Result<(), IntrospectError> {
        let entries = self.trace_entries()?;
        let out = output
            .map(JsonLines::open)
            .transpose()
            .map_err(IntrospectError::TraceOutput)?;
        self.stop_trace();
        let tracer = Arc::new(Tracer {
            filter,
            entries: entries.clone(),
            mem: self.mem.clone(),
            out: Mutex::new(out),
            kept: Mutex::default(),
            pending: Mutex::default(),
            seq: AtomicU64::new(0),
            counters: self.shared.counters.clone(),
        });
        let addrs: Vec<u64> = entries.iter().map(|(a, _)| *a).collect();
        self.vm
            .set_breakpoints(&addrs, tracer.clone())
            .map_err(|source| IntrospectError::Breakpoint {
                entries: entries
                    .iter()
                    .map(|(a, e)| format!("{e:?} {a:#x}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                source,
            })?;
        self.shared.counters.tracing.set(1);
        *lock(&self.tracer) = Some(tracer);
        Ok(())
    }

    /// The entries to trace now (see [`entries`]), those of the first vCPU in
    /// long mode with LSTAR set.
    fn trace_entries(&self) -> Result<Vec<(u64, SyscallEntry)>, IntrospectError> {
        let cpus = self.cpus()?;
        let cpu = cpus
            .iter()
            .find(|c| c.long_mode() && c.lstar != 0)
            .ok_or(IntrospectError::NoLstar)?;
        Ok(entries(&self.mem, cpu))
    }

    /// Starts tracing into `output` as soon as the guest has its system call
    /// entries (LSTAR set, early in its boot, and the same entries two polls in a
    /// row: a kernel writes SYSENTER_EIP just after LSTAR): `--trace-syscalls`.
    pub fn trace_once_ready(self: &Arc<Self>, filter: SyscallFilter, output: PathBuf) {
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("trace-start".into())
            .spawn(move || {
                vigil_seccomp::confine(vigil_seccomp::ThreadKind::Introspect);
                let mut last = None;
                while !me.vm.is_stopping() {
                    let now = me.trace_entries().ok();
                    if now.is_some() && now == last {
                        if let Err(e) = me.start_trace(filter, Some(&output)) {
                            tracing::error!("--trace-syscalls: {e}");
                        }
                        return;
                    }
                    last = now;
                    std::thread::sleep(Duration::from_millis(5));
                }
            });
        if let Err(e) = spawned {
            tracing::error!("--trace-syscalls: cannot start its thread: {e}");
        }
    }

    /// Stops tracing: the guest runs at full speed again.
    pub fn stop_trace(&self) -> bool {
        let Some(tracer) = lock(&self.tracer).take() else {
            return false;
        };
        if !self.vm.is_stopping() {
            if let Err(e) = self.vm.clear_breakpoints() {
                tracing::warn!("cannot clear the tracing breakpoints: {e}");
            }
        }
        tracer.flush();
        self.shared.counters.tracing.set(0);
        true
    }

    /// Traced calls with a sequence number above `since`, and whether tracing runs.
    pub fn trace(&self, since: u64) -> (Vec<TraceRecord>, bool) {
        match lock(&self.tracer).as_ref() {
            Some(t) => (t.since(since), true),
            None => (Vec::new(), false),
        }
    }
}

/// How many traced calls are kept in memory for `GET /vigil/trace`.
pub const TRACE_KEEP: usize = 65536;

/// A traced system call with its place and time.
#[derive(Clone, Debug, Serialize)]
pub struct TraceRecord {
    pub seq: u64,
    pub time_unix_ns: u64,
    #[serde(flatten)]
    pub call: SyscallRecord,
}

pub(super) struct Tracer {
    filter: SyscallFilter,
    /// (address, entry) of each traced entry.
    entries: Vec<(u64, SyscallEntry)>,
    mem: GuestMemoryMmap,
    out: Mutex<Option<JsonLines>>,
    kept: Mutex<VecDeque<TraceRecord>>,
    /// Per vCPU, the traced call whose return it waits for: one at most (a call
    /// entering before the last one returned is recorded without a result).
    pending: Mutex<HashMap<u32, Pending>>,
    seq: AtomicU64,
    counters: Arc<IntrospectCounters>,
}

struct Pending {
    record: TraceRecord,
    at: ReturnPoint,
    cr3: u64,
}

/// The calling process's memory, through its page tables.
struct AddressSpace<'a> {
    mem: &'a GuestMemoryMmap,
    cr3: u64,
    la57: bool,
}

impl GuestRead for AddressSpace<'_> {
    fn read<const N: usize>(&self, vaddr: u64) -> Option<[u8; N]> {
        let mut buf = [0u8; N];
        read_virt(self.mem, self.cr3, self.la57, vaddr, &mut buf).ok()?;
        Some(buf)
    }
}

impl Tracer {
    fn since(&self, since: u64) -> Vec<TraceRecord> {
        lock(&self.kept)
            .iter()
            .filter(|r| r.seq > since)
            .cloned()
            .collect()
    }

    /// Writes a finished call out and keeps it.
    fn emit(&self, record: TraceRecord) {
        if let Some(out) = lock(&self.out).as_mut() {
            out.append(&record);
        }
        let mut kept = lock(&self.kept);
        if kept.len() == TRACE_KEEP {
            kept.pop_front();
        }
        kept.push_back(record);
    }

    /// Records the calls still waiting for their return, without a result.
    fn flush(&self) {
        let pending: Vec<Pending> = lock(&self.pending).drain().map(|(_, p)| p).collect();
        let mut records: Vec<TraceRecord> = pending.into_iter().map(|p| p.record).collect();
        records.sort_by_key(|r| r.seq);
        for r in records {
            self.emit(r);
        }
    }

    /// A hit at `regs.rip` on vCPU `vcpu`: the return of its pending call?
    /// Completes and emits it when so; returns whether it was.
    fn returned(&self, vcpu: u32, regs: &kvm_bindings::kvm_regs, cr3: u64) -> bool {
        let done = {
            let mut pending = lock(&self.pending);
            match pending.get(&vcpu) {
                // The same stack and process: the return (the address alone may be
                // code another frame runs first).
                Some(p)
                    if p.at.rip == regs.rip
                        && p.at.rsp == regs.rsp
                        && p.cr3 & CR3_ADDR == cr3 & CR3_ADDR =>
                {
                    pending.remove(&vcpu)
                }
                _ => None,
            }
        };
        let Some(mut p) = done else {
            return false;
        };
        p.record.call.ret = Some(p.record.call.entry.result(regs.rax));
        self.emit(p.record);
        true
    }

    /// The vCPU's own breakpoint from now on: its pending call's return.
    fn return_breakpoint(&self, vcpu: u32) -> Option<u64> {
        lock(&self.pending).get(&vcpu).map(|p| p.at.rip)
    }
}

impl BreakpointHandler for Tracer {
    fn hit(
        &self,
        vcpu: u32,
        regs: &kvm_bindings::kvm_regs,
        sregs: &kvm_bindings::kvm_sregs,
    ) -> Option<u64> {
        if self.returned(vcpu, regs, sregs.cr3) {
            return None;
        }
        let Some(&(_, entry)) = self.entries.iter().find(|(a, _)| *a == regs.rip) else {
            return self.return_breakpoint(vcpu);
        };
        self.counters.syscalls_seen.inc();
        let r = SyscallRegs {
            entry,
            rax: regs.rax,
            rbx: regs.rbx,
            rcx: regs.rcx,
            rdx: regs.rdx,
            rsi: regs.rsi,
            rdi: regs.rdi,
            rbp: regs.rbp,
            rsp: regs.rsp,
            r8: regs.r8,
            r9: regs.r9,
            r10: regs.r10,
            cr3: sregs.cr3,
        };
        if !self.filter.matches(&r) {
            return self.return_breakpoint(vcpu);
        }
        self.counters.syscalls_traced.inc();
        let space = AddressSpace {
            mem: &self.mem,
            cr3: sregs.cr3,
            la57: sregs.cr4 & CR4_LA57 != 0,
        };
        let record = TraceRecord {
            seq: self.seq.fetch_add(1, Ordering::Relaxed) + 1,
            time_unix_ns: Timestamp::now().unix_ns(),
            call: SyscallRecord::decode(vcpu, &r, &space),
        };
        let Some(at) = entry.return_point(&r, &space) else {
            // Nowhere to wait for its return (the caller's stack does not read).
            self.counters.syscalls_unreturned.inc();
            self.emit(record);
            return self.return_breakpoint(vcpu);
        };
        let replaced = lock(&self.pending).insert(
            vcpu,
            Pending {
                record,
                at,
                cr3: sregs.cr3,
            },
        );
        if let Some(old) = replaced {
            // Entered again before the last call returned (it blocked, or never
            // returns there): that one is recorded without its result.
            self.counters.syscalls_unreturned.inc();
            self.emit(old.record);
        }
        Some(at.rip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::paging::tests::Tables;
    use kvm_bindings::{kvm_regs, kvm_sregs};

    const LSTAR: u64 = 0xffff_ffff_8100_0000;
    const INT80: u64 = 0xffff_ffff_8100_0100;
    /// A mapped kernel stack page (at physical 8 MiB).
    const STACK: u64 = 0xffff_c900_0000_0000;

    fn tracer(tables: &Tables) -> Tracer {
        Tracer {
            filter: SyscallFilter::all(),
            entries: vec![(LSTAR, SyscallEntry::Syscall), (INT80, SyscallEntry::Int80)],
            mem: tables.mem.clone(),
            out: Mutex::new(None),
            kept: Mutex::default(),
            pending: Mutex::default(),
            seq: AtomicU64::new(0),
            counters: Arc::default(),
        }
    }

    fn at(rip: u64, rax: u64, rcx: u64, rsp: u64) -> kvm_regs {
        kvm_regs {
            rip,
            rax,
            rcx,
            rsp,
            ..Default::default()
        }
    }

    /// Entries, returns, calls that never return and stacks that do not
    /// translate, as a hostile guest makes them: one pending call per vCPU,
    /// every call recorded once, the unreturned ones counted.
    #[test]
    fn calls_complete_at_their_return_or_are_recorded_without_it() {
        let mut tables = Tables::new(false);
        tables.map(STACK, 0x80_0000, 0x1000, 0);
        let t = tracer(&tables);
        let sregs = kvm_sregs {
            cr3: tables.root,
            ..Default::default()
        };
        let seqs = |t: &Tracer| t.since(0).iter().map(|r| r.seq).collect::<Vec<_>>();

        // syscall: its return is at RCX with the same RSP.
        assert_eq!(
            t.hit(0, &at(LSTAR, 1, 0x40_1000, 0x7000), &sregs),
            Some(0x40_1000)
        );
        // The address on another stack is not the return; nor on another vCPU.
        assert_eq!(
            t.hit(0, &at(0x40_1000, 5, 0, 0x6000), &sregs),
            Some(0x40_1000)
        );
        assert_eq!(t.hit(1, &at(0x40_1000, 5, 0, 0x7000), &sregs), None);
        assert!(t.since(0).is_empty());
        assert_eq!(t.hit(0, &at(0x40_1000, 42, 0, 0x7000), &sregs), None);
        let done = t.since(0);
        assert_eq!((done.len(), done[0].call.ret), (1, Some(42)));

        // Entered again before the return: the first is recorded without it.
        assert_eq!(
            t.hit(0, &at(LSTAR, 2, 0x40_2000, 0x7000), &sregs),
            Some(0x40_2000)
        );
        assert_eq!(
            t.hit(0, &at(LSTAR, 3, 0x40_3000, 0x7000), &sregs),
            Some(0x40_3000)
        );
        assert_eq!(t.counters.syscalls_unreturned.get(), 1);
        assert_eq!(t.since(1)[0].call.nr, 2);
        assert_eq!(t.since(1)[0].call.ret, None);

        // int 0x80 with the frame on a stack that translates...
        tables.write(0x80_0000, 0x40_4000); // RIP
        tables.write(0x80_0018, 0x9000); // RSP
        assert_eq!(t.hit(1, &at(INT80, 4, 0, STACK), &sregs), Some(0x40_4000));
        assert_eq!(
            t.hit(1, &at(0x40_4000, 0xffff_ffff_0000_0007, 0, 0x9000), &sregs),
            None
        );
        let last = t.since(0).pop().unwrap();
        assert_eq!((last.call.nr, last.call.ret), (4, Some(7)));
        // ...and on one that does not: recorded at once; vCPU 0's call still waits.
        assert_eq!(
            t.hit(0, &at(INT80, 5, 0, 0x1234_5000), &sregs),
            Some(0x40_3000)
        );
        let last = t.since(0).pop().unwrap();
        assert_eq!((last.call.return_rip, last.call.ret), (None, None));
        assert_eq!(t.counters.syscalls_unreturned.get(), 2);

        // Stopping records what still waits.
        t.flush();
        assert_eq!(seqs(&t), vec![1, 2, 4, 5, 3]);
        assert!(lock(&t.pending).is_empty());
        assert_eq!(t.counters.syscalls_seen.get(), 5);
    }
}
