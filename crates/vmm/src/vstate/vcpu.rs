//! One vCPU thread: `KVM_RUN`, dispatch of port and MMIO exits to the buses,
//! requests from other threads (`inspect`), guarded MSR writes and breakpoints, and
//! turning the exits that end a VM into [`VmEvent`]s.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;

use crate::GuestMemoryMmap;
use kvm_bindings::{
    kvm_debug_exit_arch, kvm_regs, kvm_sregs, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vigil_devices::bus::Bus;
use vigil_devices::PowerEvent;
use vigil_metrics::{ExitReason, RunClock, VcpuCounters};
use vm_memory::{Bytes, GuestAddress};

use super::inspect::{self, Breakpoints, Mailbox, MsrGuardSlot, VcpuAccess};
use crate::rt::RtTimer;
use crate::VmEvent;

/// Why a vCPU stopped the VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CrashReason {
    /// `KVM_EXIT_SHUTDOWN`: the guest triple-faulted.
    TripleFault,
    /// `KVM_EXIT_INTERNAL_ERROR`: KVM could not go on (on emulating hosts, most
    /// often an instruction its emulator lacks).
    InternalError {
        /// `KVM_INTERNAL_ERROR_*` code.
        suberror: u32,
        /// Extra words KVM gave.
        data: Vec<u64>,
    },
    /// `KVM_EXIT_FAIL_ENTRY`: the hardware refused to enter the guest.
    EntryFailure {
        /// Hardware-specific reason.
        reason: u64,
    },
    /// The guest reported a crash through a system event (pvpanic-like).
    GuestPanic,
}

impl std::fmt::Display for CrashReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CrashReason::TripleFault => write!(f, "triple fault (KVM_EXIT_SHUTDOWN)"),
            CrashReason::InternalError { suberror, data } => {
                let what = match suberror {
                    1 => "emulation failure",
                    2 => "simultaneous exceptions",
                    3 => "delivery event failure",
                    _ => "internal error",
                };
                write!(f, "{what} (KVM_EXIT_INTERNAL_ERROR, suberror {suberror}")?;
                if !data.is_empty() {
                    let words: Vec<String> = data.iter().map(|d| format!("{d:#x}")).collect();
                    write!(f, ", data {}", words.join(" "))?;
                }
                write!(f, ")")
            }
            CrashReason::EntryFailure { reason } => {
                write!(
                    f,
                    "VM entry failure (KVM_EXIT_FAIL_ENTRY, reason {reason:#x})"
                )
            }
            CrashReason::GuestPanic => write!(f, "guest reported a crash (KVM_SYSTEM_EVENT_CRASH)"),
        }
    }
}

/// What a vCPU looked like when it crashed.
#[derive(Clone, Debug)]
pub struct CrashReport {
    /// The vCPU's index.
    pub vcpu: u32,
    /// Why.
    pub reason: CrashReason,
    /// General registers, when KVM still gave them.
    pub regs: Option<kvm_regs>,
    /// Segment and control registers, when KVM still gave them.
    pub sregs: Option<kvm_sregs>,
    /// Up to 16 bytes of code at RIP, when RIP translated to guest memory.
    pub code: Vec<u8>,
}

impl CrashReport {
    /// A multi-line report; `describe` names an address (for example from a
    /// `System.map`).
    pub fn render(&self, describe: &dyn Fn(u64) -> Option<String>) -> String {
        let mut out = format!("vCPU {} crashed: {}\n", self.vcpu, self.reason);
        if let Some(r) = &self.regs {
            let sym = describe(r.rip)
                .map(|s| format!(" <{s}>"))
                .unwrap_or_default();
            out += &format!(
                "  RIP {:#018x}{sym}  RSP {:#018x}  RFLAGS {:#010x}\n",
                r.rip, r.rsp, r.rflags
            );
            out += &format!(
                "  RAX {:#018x}  RBX {:#018x}  RCX {:#018x}  RDX {:#018x}\n",
                r.rax, r.rbx, r.rcx, r.rdx
            );
            out += &format!(
                "  RSI {:#018x}  RDI {:#018x}  RBP {:#018x}  R8  {:#018x}\n",
                r.rsi, r.rdi, r.rbp, r.r8
            );
            out += &format!(
                "  R9  {:#018x}  R10 {:#018x}  R11 {:#018x}  R12 {:#018x}\n",
                r.r9, r.r10, r.r11, r.r12
            );
            out += &format!(
                "  R13 {:#018x}  R14 {:#018x}  R15 {:#018x}\n",
                r.r13, r.r14, r.r15
            );
        }
        if let Some(s) = &self.sregs {
            out += &format!(
                "  CS {:#06x} (CPL {}, {})  CR0 {:#x}  CR2 {:#x}  CR3 {:#x}  CR4 {:#x}  EFER {:#x}\n",
                s.cs.selector,
                s.cs.selector & 3,
                if s.cs.l == 1 { "64-bit" } else if s.cs.db == 1 { "32-bit" } else { "16-bit" },
                s.cr0,
                s.cr2,
                s.cr3,
                s.cr4,
                s.efer
            );
            out += &format!(
                "  GDT {:#x}/{:#x}  IDT {:#x}/{:#x}\n",
                s.gdt.base, s.gdt.limit, s.idt.base, s.idt.limit
            );
        }
        if !self.code.is_empty() {
            let bytes: Vec<String> = self.code.iter().map(|b| format!("{b:02x}")).collect();
            out += &format!("  code at RIP: {}\n", bytes.join(" "));
        }
        out
    }
}

/// Everything a vCPU thread needs besides its file descriptor.
pub struct VcpuContext {
    /// Port I/O devices.
    pub pio: Bus,
    /// MMIO devices.
    pub mmio: Bus,
    /// Guest memory (to read code at RIP for crash reports).
    pub mem: GuestMemoryMmap,
    /// Where VM-ending events go.
    pub events: Sender<VmEvent>,
    /// Set when the VM is stopping: leave the run loop.
    pub stop: Arc<AtomicBool>,
    /// This vCPU's counters.
    pub metrics: Arc<VcpuCounters>,
    /// Where the vCPU parks while the VM is paused.
    pub pause: Arc<super::pause::PauseGate>,
    /// Requests from other threads, served between two `KVM_RUN`s and while parked.
    pub(crate) mailbox: Arc<Mailbox>,
    /// Decides guest writes of the MSRs the VM's filter sends here.
    pub(crate) msr_guard: Arc<MsrGuardSlot>,
    /// What a crash of this vCPU does to the VM.
    pub on_crash: vigil_model::config::OnCrash,
    /// How the host schedules this thread (applied as it starts).
    pub(crate) sched: Arc<crate::rt::VcpuScheduler>,
    /// The RT timer device, whose registers are per vCPU.
    pub(crate) rt_timer: Option<Arc<crate::rt::RtTimer>>,
}

/// A vCPU ready to run.
pub struct Vcpu {
    /// Index (also its APIC id).
    pub id: u32,
    /// The KVM vCPU.
    pub fd: VcpuFd,
}

enum Outcome {
    Continue,
    Event(VmEvent),
    Crash(CrashReason),
    /// A guest `wrmsr` the MSR filter sent here; answered once the exit no longer
    /// borrows the vCPU fd.
    Wrmsr {
        index: u32,
        value: u64,
    },
    /// A guest `rdmsr` the MSR filter sent here.
    Rdmsr {
        index: u32,
    },
    /// A breakpoint hit or single step.
    Debug(kvm_debug_exit_arch),
    /// A guest `out` to the RT timer device.
    RtTimerWrite {
        port: u16,
        value: [u8; 4],
        len: usize,
    },
}

impl Vcpu {
    /// Runs until the VM stops or this vCPU ends it.
    pub fn run(mut self, ctx: VcpuContext) {
        // SAFETY: the gettid system call takes no arguments and cannot fail. (Not
        // libc::gettid: a static glibc can leave that symbol unresolved.)
        let tid = unsafe { libc::syscall(libc::SYS_gettid) };
        ctx.metrics.thread_started(tid as i32);
        self.run_loop(&ctx, tid as i32);
        ctx.sched.thread_exiting(self.id);
        ctx.mailbox.close();
        ctx.metrics.thread_exiting();
    }

    fn run_loop(&mut self, ctx: &VcpuContext, tid: i32) {
        let mut clock = RunClock::default();
        let mut scheduled = false;
        let mut breakpoints = Breakpoints::default();
        while !ctx.stop.load(Ordering::Acquire) {
            let mut serve = |bps: &mut Breakpoints| {
                ctx.mailbox.serve(&mut VcpuAccess {
                    id: self.id,
                    fd: &mut self.fd,
                    breakpoints: bps,
                })
            };
            if ctx
                .pause
                .park_if_requested(&ctx.stop, ctx.mailbox.pending_flag(), || {
                    serve(&mut breakpoints)
                })
            {
                clock.parked();
            }
            if ctx.stop.load(Ordering::Acquire) {
                return;
            }
            if ctx.mailbox.pending() {
                serve(&mut breakpoints);
            }
            let outcome = self.run_once(ctx, &mut clock);
            // After the first exit: a vCPU whose very first KVM_RUN starts under
            // SCHED_DEADLINE makes no progress on nested kvm_pvm (measured).
            if !scheduled {
                scheduled = true;
                if let Err(e) = ctx.sched.thread_started(self.id, tid) {
                    let _ = ctx.events.send(VmEvent::Failed(format!("scheduling: {e}")));
                    return;
                }
            }
            let event = match outcome {
                Outcome::Continue => continue,
                Outcome::Wrmsr { index, value } => {
                    let error =
                        inspect::guest_wrmsr(&ctx.msr_guard, &self.fd, self.id, index, value);
                    self.answer_msr_exit(error, None);
                    continue;
                }
                Outcome::Rdmsr { index } => {
                    let value = inspect::get_msr(&self.fd, index);
                    self.answer_msr_exit(u8::from(value.is_none()), value);
                    continue;
                }
                Outcome::RtTimerWrite { port, value, len } => {
                    if let Some(rt) = &ctx.rt_timer {
                        rt.write(self.id, &self.fd, port, &value[..len]);
                    }
                    continue;
                }
                Outcome::Debug(exit) => {
                    breakpoints.on_debug_exit(&self.fd, self.id, &exit);
                    continue;
                }
                Outcome::Event(e) => e,
                Outcome::Crash(reason) => {
                    let report = Box::new(self.crash_report(reason, &ctx.mem));
                    if ctx.on_crash == vigil_model::config::OnCrash::Pause {
                        self.keep_crashed(ctx, report, &mut breakpoints);
                        return;
                    }
                    VmEvent::Crash(report)
                }
            };
            // The receiver is gone only when the VM is already being torn down.
            let _ = ctx.events.send(event);
            return;
        }
    }

    /// `OnCrash::Pause`: holds the pause gate shut (the other vCPUs park at their
    /// next exit; the thread waiting on the VM kicks them), reports the crash, and
    /// stays parked in the gate (never in `KVM_RUN` again) until the VM stops,
    /// still serving requests (introspection of the crashed state).
    fn keep_crashed(&mut self, ctx: &VcpuContext, report: Box<CrashReport>, bps: &mut Breakpoints) {
        ctx.pause
            .hold(format!("vCPU {}: {}", self.id, report.reason));
        let _ = ctx.events.send(VmEvent::CrashKept(report));
        while !ctx.stop.load(Ordering::Acquire) {
            let parked = ctx
                .pause
                .park_if_requested(&ctx.stop, ctx.mailbox.pending_flag(), || {
                    ctx.mailbox.serve(&mut VcpuAccess {
                        id: self.id,
                        fd: &mut self.fd,
                        breakpoints: bps,
                    })
                });
            if !parked {
                // Not reached while the gate is held; bounds a spin if it were not.
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        }
    }

    fn run_once(&mut self, ctx: &VcpuContext, clock: &mut RunClock) -> Outcome {
        clock.entering(&ctx.metrics);
        let exit = self.fd.run();
        clock.exited(&ctx.metrics, exit_reason(&exit));
        match exit {
            Ok(VcpuExit::IoOut(port, data)) => {
                if ctx.rt_timer.is_some() && RtTimer::claims(port) {
                    // Served once the exit no longer borrows the vCPU fd (ARM reads the TSC).
                    let mut value = [0u8; 4];
                    let len = data.len().min(4);
                    value[..len].copy_from_slice(&data[..len]);
                    return Outcome::RtTimerWrite { port, value, len };
                } else if !ctx.pio.write(u64::from(port), data) {
                    ctx.metrics.unclaimed_pio.add_single_writer(1);
                    tracing::trace!(vcpu = self.id, port, "write to unhandled port");
                }
                Outcome::Continue
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                if let Some(rt) = ctx.rt_timer.as_ref().filter(|_| RtTimer::claims(port)) {
                    rt.read(self.id, port, data);
                } else if !ctx.pio.read(u64::from(port), data) {
                    ctx.metrics.unclaimed_pio.add_single_writer(1);
                    data.fill(0xff);
                }
                Outcome::Continue
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !ctx.mmio.read(addr, data) {
                    ctx.metrics.unclaimed_mmio.add_single_writer(1);
                    tracing::debug!(vcpu = self.id, addr, "read from unhandled MMIO address");
                    data.fill(0xff);
                }
                Outcome::Continue
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if !ctx.mmio.write(addr, data) {
                    ctx.metrics.unclaimed_mmio.add_single_writer(1);
                    tracing::debug!(vcpu = self.id, addr, "write to unhandled MMIO address");
                }
                Outcome::Continue
            }
            Ok(VcpuExit::Shutdown) => Outcome::Crash(CrashReason::TripleFault),
            Ok(VcpuExit::InternalError) => {
                // SAFETY: on KVM_EXIT_INTERNAL_ERROR the kernel fills the `internal`
                // member of the kvm_run exit union, and nothing else writes it.
                let internal = unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal };
                let n = (internal.ndata as usize).min(internal.data.len());
                Outcome::Crash(CrashReason::InternalError {
                    suberror: internal.suberror,
                    data: internal.data[..n].to_vec(),
                })
            }
            Ok(VcpuExit::FailEntry(reason, _cpu)) => {
                Outcome::Crash(CrashReason::EntryFailure { reason })
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => Outcome::Event(VmEvent::Power(PowerEvent::PowerOff)),
                KVM_SYSTEM_EVENT_RESET => Outcome::Event(VmEvent::Power(PowerEvent::Reset)),
                KVM_SYSTEM_EVENT_CRASH => Outcome::Crash(CrashReason::GuestPanic),
                other => Outcome::Event(VmEvent::VcpuFailed {
                    vcpu: self.id,
                    error: format!("unknown KVM system event {other}"),
                }),
            },
            Ok(VcpuExit::X86Wrmsr(exit)) => Outcome::Wrmsr {
                index: exit.index,
                value: exit.data,
            },
            Ok(VcpuExit::X86Rdmsr(exit)) => Outcome::Rdmsr { index: exit.index },
            Ok(VcpuExit::Debug(exit)) => Outcome::Debug(exit),
            // With the in-kernel irqchip, HLT is handled by KVM; a stray one is harmless.
            Ok(VcpuExit::Hlt) => Outcome::Continue,
            Ok(other) => Outcome::Event(VmEvent::VcpuFailed {
                vcpu: self.id,
                error: format!("unexpected exit from KVM_RUN: {other:?}"),
            }),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Outcome::Continue,
            Err(e) => Outcome::Event(VmEvent::VcpuFailed {
                vcpu: self.id,
                error: format!("KVM_RUN failed: {e}"),
            }),
        }
    }

    /// Completes a filtered MSR access: `error` 1 gives the guest #GP; `value` is
    /// what its `rdmsr` reads.
    fn answer_msr_exit(&mut self, error: u8, value: Option<u64>) {
        let run = self.fd.get_kvm_run();
        // SAFETY: the last exit was KVM_EXIT_X86_WRMSR or KVM_EXIT_X86_RDMSR, for
        // which the kernel filled the `msr` member of the exit union and reads back
        // its `error` and `data` on the next KVM_RUN; plain integers, any value valid.
        let msr = unsafe { &mut run.__bindgen_anon_1.msr };
        msr.error = error;
        if let Some(value) = value {
            msr.data = value;
        }
    }

    fn crash_report(&self, reason: CrashReason, mem: &GuestMemoryMmap) -> CrashReport {
        let regs = self.fd.get_regs().ok();
        let sregs = self.fd.get_sregs().ok();
        let code = regs
            .and_then(|r| self.fd.translate_gva(r.rip).ok())
            .filter(|t| t.valid != 0)
            .map(|t| {
                let mut buf = [0u8; 16];
                let n = mem
                    .read(&mut buf, GuestAddress(t.physical_address))
                    .unwrap_or(0);
                buf[..n].to_vec()
            })
            .unwrap_or_default();
        CrashReport {
            vcpu: self.id,
            reason,
            regs,
            sregs,
            code,
        }
    }
}

/// What a `KVM_RUN` result counts as.
fn exit_reason(exit: &Result<VcpuExit, kvm_ioctls::Error>) -> ExitReason {
    match exit {
        Ok(VcpuExit::IoIn(..) | VcpuExit::IoOut(..)) => ExitReason::Io,
        Ok(VcpuExit::MmioRead(..) | VcpuExit::MmioWrite(..)) => ExitReason::Mmio,
        Ok(VcpuExit::Hlt) => ExitReason::Hlt,
        Ok(VcpuExit::Shutdown) => ExitReason::Shutdown,
        Ok(VcpuExit::InternalError) => ExitReason::InternalError,
        Ok(VcpuExit::FailEntry(..)) => ExitReason::FailEntry,
        Ok(VcpuExit::SystemEvent(..)) => ExitReason::SystemEvent,
        Ok(VcpuExit::X86Wrmsr(..) | VcpuExit::X86Rdmsr(..)) => ExitReason::Msr,
        Ok(VcpuExit::Debug(..)) => ExitReason::Debug,
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => ExitReason::Intr,
        _ => ExitReason::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_names_reason_registers_and_symbol() {
        let report = CrashReport {
            vcpu: 1,
            reason: CrashReason::InternalError {
                suberror: 1,
                data: vec![0x3],
            },
            regs: Some(kvm_regs {
                rip: 0xffff_ffff_8100_0010,
                ..Default::default()
            }),
            sregs: Some(kvm_sregs::default()),
            code: vec![0x9b, 0xdb, 0xe3],
        };
        let text =
            report.render(&|a| (a >> 32 == 0xffff_ffff).then(|| "fpu__init_cpu+0x10".to_string()));
        assert!(
            text.starts_with(
                "vCPU 1 crashed: emulation failure (KVM_EXIT_INTERNAL_ERROR, suberror 1, data 0x3)"
            ),
            "{text}"
        );
        assert!(
            text.contains("RIP 0xffffffff81000010 <fpu__init_cpu+0x10>"),
            "{text}"
        );
        assert!(text.contains("code at RIP: 9b db e3"), "{text}");
        assert_eq!(
            CrashReason::TripleFault.to_string(),
            "triple fault (KVM_EXIT_SHUTDOWN)"
        );
    }
}
