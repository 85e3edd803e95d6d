//! Hooks for introspection, all served on each vCPU's own thread: vCPU ioctls from
//! another thread would wait for `KVM_RUN` to return, which a halted guest may never
//! do, so other threads post requests in a per-vCPU [`Mailbox`] and kick the thread.
//!
//! On top of the mailbox: register and MSR snapshots ([`VcpuState`]), an MSR write
//! guard (KVM's MSR filter sends guest writes of chosen MSRs to the VMM, which asks
//! a [`MsrGuard`]), and hardware execution breakpoints ([`BreakpointHandler`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_debug_exit_arch, kvm_enable_cap, kvm_guest_debug, kvm_msr_entry, kvm_regs, kvm_sregs, Msrs,
    KVM_CAP_X86_USER_SPACE_MSR, KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_INJECT_DB,
    KVM_GUESTDBG_SINGLESTEP, KVM_GUESTDBG_USE_HW_BP, KVM_MSR_EXIT_REASON_FILTER,
    KVM_MSR_FILTER_MAX_RANGES,
};
use kvm_ioctls::{MsrFilterDefaultAction, MsrFilterRange, MsrFilterRangeFlags, VcpuFd, VmFd};

use crate::ControlError;

/// `IA32_SYSENTER_CS`.
pub const MSR_SYSENTER_CS: u32 = 0x174;
/// `IA32_SYSENTER_ESP`.
pub const MSR_SYSENTER_ESP: u32 = 0x175;
/// `IA32_SYSENTER_EIP`.
pub const MSR_SYSENTER_EIP: u32 = 0x176;
/// `IA32_STAR`: segment selectors of `syscall` and `sysret`.
pub const MSR_STAR: u32 = 0xc000_0081;
/// `IA32_LSTAR`: the 64-bit `syscall` entry point.
pub const MSR_LSTAR: u32 = 0xc000_0082;
/// `IA32_CSTAR`: the compatibility-mode `syscall` entry point.
pub const MSR_CSTAR: u32 = 0xc000_0083;
/// `IA32_FMASK`: RFLAGS bits cleared on `syscall`.
pub const MSR_SFMASK: u32 = 0xc000_0084;

/// The MSRs [`VcpuState`] holds: where system calls enter the guest kernel.
pub const INSPECTED_MSRS: [u32; 7] = [
    MSR_LSTAR,
    MSR_STAR,
    MSR_CSTAR,
    MSR_SFMASK,
    MSR_SYSENTER_CS,
    MSR_SYSENTER_ESP,
    MSR_SYSENTER_EIP,
];

/// Debug address registers: at most this many breakpoints.
pub const MAX_BREAKPOINTS: usize = 4;

/// KVM's MSR filter takes this many ranges; each guarded MSR takes one.
pub const MAX_GUARDED_MSRS: usize = KVM_MSR_FILTER_MAX_RANGES as usize;

/// How long a request waits for its vCPU thread.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(1);

/// One vCPU's registers and syscall MSRs, read on its own thread between two
/// `KVM_RUN`s.
#[derive(Clone, Debug)]
pub struct VcpuState {
    /// The vCPU's index.
    pub id: u32,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, descriptor-table and control registers, EFER.
    pub sregs: kvm_sregs,
    /// `(index, value)` of the [`INSPECTED_MSRS`] KVM could read, in that order (KVM
    /// stops at the first one it cannot read).
    pub msrs: Vec<(u32, u64)>,
}

impl VcpuState {
    /// The value of MSR `index`, when it was read.
    pub fn msr(&self, index: u32) -> Option<u64> {
        self.msrs.iter().find(|(i, _)| *i == index).map(|(_, v)| *v)
    }
}

/// What happens to a guest write of a guarded MSR.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MsrVerdict {
    /// The VMM writes the value for the guest.
    Allow,
    /// The guest gets #GP and the MSR keeps its value.
    Refuse,
}

/// Decides guest writes of the MSRs given to `guard_msrs`. Called on the writing
/// vCPU's thread, which waits for the verdict: it must not wait on that vCPU (no
/// `VmInspect` request to it).
pub trait MsrGuard: Send + Sync {
    /// vCPU `vcpu` executes `wrmsr` of `value` to MSR `index`.
    fn msr_write(&self, vcpu: u32, index: u32, value: u64) -> MsrVerdict;
}

/// Told of every hit of the breakpoints given to `set_breakpoints`, and of each
/// vCPU's own breakpoint (one per vCPU, which the handler moves: where a call it saw
/// enter will return). Called on the vCPU's thread before the instruction at the
/// breakpoint runs; that vCPU waits for it, so it must not wait on that vCPU (no
/// `VmInspect` request to it).
pub trait BreakpointHandler: Send + Sync {
    /// vCPU `vcpu` reached a breakpoint: `regs.rip` is its address. Returns the
    /// vCPU's own breakpoint from now on (`None`: none), armed in a debug address
    /// register the shared breakpoints leave free (with 4 shared ones, never); a
    /// non-canonical address is not armed.
    fn hit(&self, vcpu: u32, regs: &kvm_regs, sregs: &kvm_sregs) -> Option<u64>;
}

/// Whether `addr` is a canonical 48-bit address: the host loads breakpoint
/// addresses into its own debug registers, where any other faults.
pub fn is_canonical(addr: u64) -> bool {
    ((addr << 16) as i64 >> 16) as u64 == addr
}

/// RFLAGS.TF: the guest single-steps itself.
const RFLAGS_TF: u64 = 1 << 8;
/// DR6.B0..B3: which debug address register matched.
const DR6_B0_B3: u64 = 0xf;

/// What a request runs with on the vCPU thread.
pub(crate) struct VcpuAccess<'a> {
    pub id: u32,
    /// Mutable for a snapshot, which runs the vCPU once with `immediate_exit`.
    pub fd: &'a mut VcpuFd,
    pub breakpoints: &'a mut Breakpoints,
}

/// Work for a vCPU thread, run between two `KVM_RUN`s.
pub(crate) type Request = Box<dyn FnOnce(&mut VcpuAccess<'_>) + Send>;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Requests waiting for one vCPU thread.
#[derive(Default)]
pub(crate) struct Mailbox {
    /// Set while `queue` may hold requests: all the run loop reads when there are none.
    pending: AtomicBool,
    queue: Mutex<Queue>,
}

#[derive(Default)]
struct Queue {
    requests: Vec<Request>,
    /// The vCPU thread has ended: nothing will serve a request any more.
    closed: bool,
}

impl Mailbox {
    /// Queues `request`; false when the vCPU thread has ended.
    pub fn post(&self, request: Request) -> bool {
        let mut queue = lock(&self.queue);
        if queue.closed {
            return false;
        }
        queue.requests.push(request);
        self.pending.store(true, Ordering::Release);
        true
    }

    /// The flag a parked vCPU watches.
    pub fn pending_flag(&self) -> &AtomicBool {
        &self.pending
    }

    /// Whether requests wait (one atomic load).
    #[inline]
    pub fn pending(&self) -> bool {
        self.pending.load(Ordering::Acquire)
    }

    /// Runs every waiting request. Only the vCPU thread calls this.
    pub fn serve(&self, access: &mut VcpuAccess<'_>) {
        let requests = {
            let mut queue = lock(&self.queue);
            self.pending.store(false, Ordering::Release);
            std::mem::take(&mut queue.requests)
        };
        for request in requests {
            request(access);
        }
    }

    /// Called as the vCPU thread ends: drops waiting requests (their askers hear
    /// at once) and refuses new ones.
    pub fn close(&self) {
        let mut queue = lock(&self.queue);
        queue.closed = true;
        queue.requests.clear();
        self.pending.store(false, Ordering::Release);
    }
}

/// Waits for the answer to a request posted to vCPU `vcpu`, calling `kick` (which
/// must get the vCPU out of `KVM_RUN` or its park) until it comes: a kick can land
/// just before the thread enters `KVM_RUN` and be lost.
pub(crate) fn wait_reply<T>(
    vcpu: u32,
    reply: &Receiver<T>,
    kick: impl Fn(),
) -> Result<T, ControlError> {
    let start = Instant::now();
    loop {
        kick();
        match reply.recv_timeout(Duration::from_millis(1)) {
            Ok(value) => return Ok(value),
            Err(RecvTimeoutError::Disconnected) => return Err(ControlError::VcpuGone(vcpu)),
            Err(RecvTimeoutError::Timeout) if start.elapsed() > REQUEST_TIMEOUT => {
                return Err(ControlError::VcpuTimeout {
                    vcpu,
                    waited_ms: start.elapsed().as_millis(),
                })
            }
            Err(RecvTimeoutError::Timeout) => {}
        }
    }
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> ControlError {
    move |source| ControlError::Kvm { what, source }
}

/// Reads `vcpu`'s registers and [`INSPECTED_MSRS`].
pub(crate) fn read_state(id: u32, fd: &VcpuFd) -> Result<VcpuState, ControlError> {
    let regs = fd.get_regs().map_err(kvm_err("read registers"))?;
    let sregs = fd.get_sregs().map_err(kvm_err("read special registers"))?;
    let entries: Vec<kvm_msr_entry> = INSPECTED_MSRS
        .iter()
        .map(|&index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    let mut msrs = Msrs::from_entries(&entries).map_err(|_| ControlError::Kvm {
        what: "read MSRs (too many entries)",
        source: kvm_ioctls::Error::new(libc::EINVAL),
    })?;
    let read = fd.get_msrs(&mut msrs).map_err(kvm_err("read MSRs"))?;
    let msrs = msrs.as_slice()[..read.min(entries.len())]
        .iter()
        .map(|e| (e.index, e.data))
        .collect();
    Ok(VcpuState {
        id,
        regs,
        sregs,
        msrs,
    })
}

/// Reads one MSR as the host (no filter applies).
pub(crate) fn get_msr(fd: &VcpuFd, index: u32) -> Option<u64> {
    let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
        index,
        ..Default::default()
    }])
    .ok()?;
    match fd.get_msrs(&mut msrs) {
        Ok(1) => Some(msrs.as_slice()[0].data),
        _ => None,
    }
}

/// Writes one MSR as the host (no filter applies); false when KVM refused the
/// value or the MSR.
pub(crate) fn set_msr(fd: &VcpuFd, index: u32, value: u64) -> bool {
    let Ok(msrs) = Msrs::from_entries(&[kvm_msr_entry {
        index,
        data: value,
        ..Default::default()
    }]) else {
        return false;
    };
    matches!(fd.set_msrs(&msrs), Ok(1))
}

/// The guard in force, shared by the VM's control handles and its vCPU threads.
#[derive(Default)]
pub(crate) struct MsrGuardSlot {
    state: Mutex<GuardState>,
}

#[derive(Default)]
struct GuardState {
    /// The guarded MSRs (sorted) and who decides their writes.
    guard: Option<(Vec<u32>, Arc<dyn MsrGuard>)>,
    /// `KVM_CAP_X86_USER_SPACE_MSR` is on (it cannot be turned on twice).
    exits_enabled: bool,
}

/// Denies every MSR of a one-MSR filter range.
static DENY_ONE: [u8; 1] = [0];

impl MsrGuardSlot {
    /// Sends guest writes of `msrs` (and only writes, only those) to `guard`,
    /// replacing any guard before.
    pub fn install(
        &self,
        vm_fd: &VmFd,
        msrs: &[u32],
        guard: Arc<dyn MsrGuard>,
    ) -> Result<(), ControlError> {
        let mut msrs = msrs.to_vec();
        msrs.sort_unstable();
        msrs.dedup();
        if msrs.is_empty() || msrs.len() > MAX_GUARDED_MSRS {
            return Err(ControlError::GuardedMsrCount(msrs.len()));
        }
        let mut state = lock(&self.state);
        if !state.exits_enabled {
            let cap = kvm_enable_cap {
                cap: KVM_CAP_X86_USER_SPACE_MSR,
                args: [u64::from(KVM_MSR_EXIT_REASON_FILTER), 0, 0, 0],
                ..Default::default()
            };
            vm_fd
                .enable_cap(&cap)
                .map_err(kvm_err("send filtered MSR accesses to the VMM"))?;
            state.exits_enabled = true;
        }
        let ranges: Vec<MsrFilterRange<'_>> = msrs
            .iter()
            .map(|&base| MsrFilterRange {
                flags: MsrFilterRangeFlags::WRITE,
                base,
                msr_count: 1,
                bitmap: &DENY_ONE,
            })
            .collect();
        // The guard goes in first, so that an exit the new filter causes finds it.
        let previous = state.guard.replace((msrs.clone(), guard));
        if let Err(e) = vm_fd.set_msr_filter(MsrFilterDefaultAction::ALLOW, &ranges) {
            state.guard = previous;
            return Err(ControlError::Kvm {
                what: "install an MSR filter",
                source: e,
            });
        }
        Ok(())
    }

    /// Lets the guest write every MSR again.
    pub fn remove(&self, vm_fd: &VmFd) -> Result<(), ControlError> {
        let mut state = lock(&self.state);
        if state.guard.is_none() {
            return Ok(());
        }
        vm_fd
            .set_msr_filter(MsrFilterDefaultAction::ALLOW, &[])
            .map_err(kvm_err("remove the MSR filter"))?;
        state.guard = None;
        Ok(())
    }

    /// The verdict on a guest write. A write to an MSR no longer guarded (an exit
    /// from a filter just replaced) is allowed without asking.
    fn verdict(&self, vcpu: u32, index: u32, value: u64) -> MsrVerdict {
        let guard = match &lock(&self.state).guard {
            Some((msrs, guard)) if msrs.binary_search(&index).is_ok() => guard.clone(),
            _ => return MsrVerdict::Allow,
        };
        guard.msr_write(vcpu, index, value)
    }
}

/// Answers a guest `wrmsr` that the filter sent to the VMM: the error to report
/// (0: written, 1: #GP). KVM does not write the MSR itself: an allowed value is
/// written here, as the host, which the filter does not stop.
pub(crate) fn guest_wrmsr(
    slot: &MsrGuardSlot,
    fd: &VcpuFd,
    vcpu: u32,
    index: u32,
    value: u64,
) -> u8 {
    match slot.verdict(vcpu, index, value) {
        MsrVerdict::Allow if set_msr(fd, index, value) => 0,
        MsrVerdict::Allow => {
            tracing::debug!(vcpu, index, value, "guest wrote an invalid MSR value: #GP");
            1
        }
        MsrVerdict::Refuse => 1,
    }
}

/// Breakpoints armed on one vCPU, and where its step over a hit stands. Lives on
/// the vCPU thread.
///
/// This platform's KVM does not honour RFLAGS.RF, so resuming at a breakpoint would
/// hit it again: each hit is followed by a single step with the breakpoints off,
/// and the step's own debug exit arms them again.
///
/// The guest's own debug exceptions are its own: a debug exit that is none of ours
/// is given back to the guest (`KVM_GUESTDBG_INJECT_DB`), and so is the trap of the
/// guest's own single step (RFLAGS.TF) over an instruction we stepped over, which
/// our step's exit took.
#[derive(Default)]
pub(crate) struct Breakpoints {
    armed: Option<Armed>,
    /// A single step over a hit is under way.
    stepping: bool,
    /// The guest had RFLAGS.TF set at the hit being stepped over.
    guest_tf: bool,
    /// A debug exit nobody asked for was logged once already.
    stray_logged: bool,
}

struct Armed {
    addrs: Vec<u64>,
    /// This vCPU's own breakpoint (see [`BreakpointHandler::hit`]).
    own: Option<u64>,
    handler: Arc<dyn BreakpointHandler>,
}

impl Armed {
    fn debug_regs(&self) -> kvm_guest_debug {
        hw_breakpoints(&self.addrs, self.own)
    }
}

/// Execute breakpoints (R/W and LEN 0) at `addrs`, then `own` in the next free
/// register (if any), locally enabled.
fn hw_breakpoints(addrs: &[u64], own: Option<u64>) -> kvm_guest_debug {
    let mut debug = kvm_guest_debug {
        control: KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP,
        ..Default::default()
    };
    for (i, &addr) in addrs
        .iter()
        .chain(own.as_ref())
        .take(MAX_BREAKPOINTS)
        .enumerate()
    {
        debug.arch.debugreg[i] = addr;
        debug.arch.debugreg[7] |= 1 << (2 * i);
    }
    debug
}

fn single_step() -> kvm_guest_debug {
    kvm_guest_debug {
        control: KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_SINGLESTEP,
        ..Default::default()
    }
}

impl Breakpoints {
    /// Arms `addrs` (1 to 4) on this vCPU, replacing what was armed. During a step
    /// over a hit, the step's end arms them.
    pub fn arm(
        &mut self,
        fd: &VcpuFd,
        addrs: &[u64],
        handler: Arc<dyn BreakpointHandler>,
    ) -> Result<(), ControlError> {
        let armed = self.armed.insert(Armed {
            addrs: addrs.to_vec(),
            own: None,
            handler,
        });
        if self.stepping {
            return Ok(());
        }
        fd.set_guest_debug(&armed.debug_regs())
            .map_err(kvm_err("arm hardware breakpoints"))
    }

    /// Disarms everything: the guest runs without debug exits again.
    pub fn clear(&mut self, fd: &VcpuFd) -> Result<(), ControlError> {
        self.armed = None;
        self.stepping = false;
        self.guest_tf = false;
        fd.set_guest_debug(&kvm_guest_debug::default())
            .map_err(kvm_err("disarm hardware breakpoints"))
    }

    /// Handles a `KVM_EXIT_DEBUG`. Never fails the VM: a KVM error is logged and the
    /// breakpoints are dropped.
    pub fn on_debug_exit(&mut self, fd: &VcpuFd, vcpu: u32, exit: &kvm_debug_exit_arch) {
        let Some(armed) = &mut self.armed else {
            // A stale exit (from before a clear) or one nobody asked for.
            log_stray_once(
                &mut self.stray_logged,
                vcpu,
                exit,
                "debug exit with no breakpoint armed; ignored",
            );
            let _ = self.clear(fd);
            return;
        };
        let mut give_back = false;
        let was_stepping = self.stepping;
        let next = if self.stepping {
            // The step is done; if it landed on a breakpoint, that breakpoint hits
            // as soon as the vCPU runs. Our step's exit took the trap of the
            // guest's own single step, if it had one: it gets it now.
            self.stepping = false;
            give_back = std::mem::take(&mut self.guest_tf);
            armed.debug_regs()
        } else if armed.addrs.contains(&exit.pc) || armed.own == Some(exit.pc) {
            match (fd.get_regs(), fd.get_sregs()) {
                (Ok(regs), Ok(sregs)) => {
                    armed.own = armed
                        .handler
                        .hit(vcpu, &regs, &sregs)
                        .filter(|&a| is_canonical(a));
                    self.guest_tf = regs.rflags & RFLAGS_TF != 0;
                }
                (Err(e), _) | (_, Err(e)) => {
                    tracing::warn!(vcpu, "cannot read registers at a breakpoint: {e}")
                }
            }
            self.stepping = true;
            single_step()
        } else if exit.dr6 & DR6_B0_B3 != 0 {
            // One of our registers matched where nothing is armed any more (moved
            // since): not the guest's; it does not match again.
            armed.debug_regs()
        } else {
            // The guest's own #DB (its single step, `int1`): delivered to it.
            log_stray_once(
                &mut self.stray_logged,
                vcpu,
                exit,
                "the guest's own debug exception; given back",
            );
            give_back = true;
            armed.debug_regs()
        };
        if let Err(e) = fd.set_guest_debug(&next) {
            tracing::warn!(
                vcpu,
                "cannot step over a breakpoint: {e}; breakpoints dropped"
            );
            let _ = self.clear(fd);
            return;
        }
        if give_back {
            if was_stepping {
                // Before the injection: KVM_SET_REGS drops a pending exception.
                restore_tf(fd, vcpu);
            }
            let mut inject = next;
            inject.control |= KVM_GUESTDBG_INJECT_DB;
            if let Err(e) = fd.set_guest_debug(&inject) {
                // KVM refuses while another exception is pending: that one goes
                // first, and this #DB is lost, as two traps at once can be.
                tracing::debug!(vcpu, "cannot give the guest its #DB: {e}");
            }
        }
    }
}

/// Sets RFLAGS.TF again after our single step: KVM owns TF while it steps and
/// leaves it clear when the step ends, which would end the guest's own stepping.
fn restore_tf(fd: &VcpuFd, vcpu: u32) {
    let restored = fd.get_regs().and_then(|mut regs| {
        regs.rflags |= RFLAGS_TF;
        fd.set_regs(&regs)
    });
    if let Err(e) = restored {
        tracing::debug!(vcpu, "cannot give the guest its RFLAGS.TF back: {e}");
    }
}

/// Logs the first debug exit that is not a hit of ours (later ones are not).
fn log_stray_once(logged: &mut bool, vcpu: u32, exit: &kvm_debug_exit_arch, what: &str) {
    if !*logged {
        *logged = true;
        tracing::debug!(vcpu, pc = exit.pc, dr6 = exit.dr6, "{what}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breakpoint_registers_enable_one_execute_slot_each() {
        let d = hw_breakpoints(&[0x1000, 0x2000, 0x3000], None);
        assert_eq!(d.control, KVM_GUESTDBG_ENABLE | KVM_GUESTDBG_USE_HW_BP);
        assert_eq!(d.arch.debugreg[..4], [0x1000, 0x2000, 0x3000, 0]);
        // L0, L1, L2; R/W and LEN bits 0: execute, one byte.
        assert_eq!(d.arch.debugreg[7], 0b01_0101);
        // The vCPU's own breakpoint takes the next free register...
        let d = hw_breakpoints(&[0x1000], Some(0x5000));
        assert_eq!(d.arch.debugreg[..4], [0x1000, 0x5000, 0, 0]);
        assert_eq!(d.arch.debugreg[7], 0b0101);
        // ...and none is left with four shared ones.
        let d = hw_breakpoints(&[1, 2, 3, 4], Some(0x5000));
        assert_eq!(d.arch.debugreg[..4], [1, 2, 3, 4]);
    }

    #[test]
    fn canonical_addresses() {
        assert!(is_canonical(0x7fff_ffff_ffff) && is_canonical(0xffff_8000_0000_0000));
        assert!(!is_canonical(1 << 47) && !is_canonical(0x8000_0000_0000_0000));
    }

    #[test]
    fn closed_mailbox_refuses_and_drops_waiting_requests() {
        let mailbox = Mailbox::default();
        let (tx, rx) = std::sync::mpsc::sync_channel::<()>(1);
        assert!(mailbox.post(Box::new(move |_| {
            let _ = tx.send(());
        })));
        assert!(mailbox.pending());
        mailbox.close();
        assert!(!mailbox.pending());
        assert!(matches!(
            wait_reply(3, &rx, || {}),
            Err(ControlError::VcpuGone(3))
        ));
        assert!(!mailbox.post(Box::new(|_| {})));
    }

    #[test]
    fn unanswered_request_times_out() {
        let (_tx, rx) = std::sync::mpsc::sync_channel::<()>(1);
        let kicks = std::sync::atomic::AtomicUsize::new(0);
        let e = wait_reply(1, &rx, || {
            kicks.fetch_add(1, Ordering::Relaxed);
        })
        .unwrap_err();
        assert!(
            matches!(e, ControlError::VcpuTimeout { vcpu: 1, .. }),
            "{e}"
        );
        assert!(
            kicks.load(Ordering::Relaxed) > 10,
            "kicked until the deadline"
        );
    }
}
