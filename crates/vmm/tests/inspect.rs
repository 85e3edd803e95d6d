//! Introspection hooks against the test guest: vCPU state snapshots, the MSR write
//! guard and hardware breakpoints, asserted by what the guest does and prints.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_regs, kvm_sregs};
use vigil_model::config::{ConsoleConfig, KernelImage, VmConfig};
use vigil_vmm::builder::build;
use vigil_vmm::symbols::SymbolTable;
use vigil_vmm::{
    BreakpointHandler, ControlError, MsrGuard, MsrVerdict, RunState, RunningVm, Vm, VmControl,
    VmInspect, VmOutcome, MSR_CSTAR, MSR_LSTAR,
};

const EFER_SCE: u64 = 1;
const CR0_PG: u64 = 1 << 31;

/// The value of `name` in the test guest's ELF symbol table.
fn symbol(name: &str) -> u64 {
    static SYMBOLS: OnceLock<SymbolTable> = OnceLock::new();
    SYMBOLS
        .get_or_init(|| SymbolTable::from_elf(vigil_test_guest::ELF).expect("the guest's symbols"))
        .address_of(name)
        .unwrap_or_else(|| panic!("no symbol {name} in the test guest"))
}

/// A guest's serial console, in a file removed at the end of the test.
struct Console(PathBuf);

impl Console {
    fn read(&self) -> String {
        std::fs::read_to_string(&self.0).unwrap_or_default()
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The test guest with `cmdline`, its console going to a file of its own.
fn guest(name: &str, cmdline: &str, vcpus: u32) -> (Vm, Console) {
    let console = std::env::temp_dir().join(format!(
        "vigil-vmm-inspect-{}-{name}.log",
        std::process::id()
    ));
    let mut config = VmConfig::new(KernelImage::Embedded {
        name: "vigil-test-guest",
        bytes: vigil_test_guest::ELF,
    });
    config.boot.cmdline = cmdline.into();
    config.machine.vcpu_count = vcpus;
    config.machine.mem_size_mib = 64;
    config.console = ConsoleConfig::File(console.clone());
    (
        build(&config).expect("build the test guest"),
        Console(console),
    )
}

/// Polls `f` for up to 5 s.
fn eventually(mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    false
}

/// vCPU 0's LSTAR, once the guest's `cpu::init` has written it.
fn wait_for_lstar(inspect: &VmInspect, expected: u64) -> bool {
    eventually(|| {
        inspect
            .vcpu_states()
            .map(|s| s[0].msr(MSR_LSTAR) == Some(expected))
            .unwrap_or(false)
    })
}

fn stop(running: RunningVm) -> VmOutcome {
    running.control().stop(libc::SIGTERM);
    running.wait()
}

#[test]
fn vcpu_states_of_a_running_then_paused_guest() {
    let (vm, _console) = guest("states", "test=hang", 2);
    let running = vm.start().unwrap();
    let control = running.control();
    let inspect = running.inspect();
    let syscall_entry = symbol("syscall_entry");
    assert_eq!(inspect.vcpu_count(), 2);
    assert!(
        wait_for_lstar(&inspect, syscall_entry),
        "LSTAR never became syscall_entry ({syscall_entry:#x})"
    );
    let check = |states: &[vigil_vmm::VcpuState]| {
        assert_eq!(states.len(), 2);
        assert_eq!((states[0].id, states[1].id), (0, 1));
        let bsp = &states[0];
        assert_eq!(bsp.msr(MSR_LSTAR), Some(syscall_entry));
        assert_eq!(
            bsp.msrs.len(),
            vigil_vmm::INSPECTED_MSRS.len(),
            "{:x?}",
            bsp.msrs
        );
        assert_ne!(bsp.sregs.efer & EFER_SCE, 0, "EFER {:#x}", bsp.sregs.efer);
        assert_ne!(bsp.sregs.cr0 & CR0_PG, 0, "CR0 {:#x}", bsp.sregs.cr0);
    };
    check(&inspect.vcpu_states().unwrap());

    control.pause().unwrap();
    assert_eq!(control.state(), RunState::Paused);
    check(&inspect.vcpu_states().unwrap());
    // A host write goes to the vCPU's MSR while it is parked.
    inspect.write_msr(0, MSR_CSTAR, 0x1234_5000).unwrap();
    assert_eq!(
        inspect.vcpu_states().unwrap()[0].msr(MSR_CSTAR),
        Some(0x1234_5000)
    );
    assert!(matches!(
        inspect.write_msr(0, MSR_LSTAR, 1 << 63),
        Err(ControlError::MsrRefused { vcpu: 0, .. })
    ));
    assert!(matches!(
        inspect.vcpu_states().map(|s| s[0].msr(MSR_LSTAR)),
        Ok(Some(v)) if v == syscall_entry
    ));
    control.resume().unwrap();
    check(&inspect.vcpu_states().unwrap());
    assert!(matches!(
        inspect.write_msr(2, MSR_CSTAR, 0),
        Err(ControlError::NoVcpu(2, 2))
    ));
    assert!(matches!(stop(running), VmOutcome::Stopped(libc::SIGTERM)));
}

/// Counts hits on `timer_isr` and on the instruction after its 1-byte `push %rax`,
/// remembers any elsewhere, and times the step from the first to the second.
struct IsrHits {
    isr: u64,
    at_isr: AtomicU64,
    after_push: AtomicU64,
    wrong: Mutex<Vec<(u32, u64)>>,
    /// When the last hit on `timer_isr` returned, and the sum of the times from
    /// there to the hit after the push.
    last_isr_hit: Mutex<Option<Instant>>,
    step_ns: AtomicU64,
}

impl IsrHits {
    fn total(&self) -> u64 {
        self.at_isr.load(Ordering::SeqCst) + self.after_push.load(Ordering::SeqCst)
    }
}

impl BreakpointHandler for IsrHits {
    fn hit(&self, vcpu: u32, regs: &kvm_regs, _sregs: &kvm_sregs) -> Option<u64> {
        match regs.rip {
            _ if vcpu != 0 => self.wrong.lock().unwrap().push((vcpu, regs.rip)),
            rip if rip == self.isr => {
                self.at_isr.fetch_add(1, Ordering::SeqCst);
                *self.last_isr_hit.lock().unwrap() = Some(Instant::now());
            }
            rip if rip == self.isr + 1 => {
                if let Some(t) = self.last_isr_hit.lock().unwrap().take() {
                    self.step_ns
                        .fetch_add(t.elapsed().as_nanos() as u64, Ordering::SeqCst);
                }
                self.after_push.fetch_add(1, Ordering::SeqCst);
            }
            rip => self.wrong.lock().unwrap().push((vcpu, rip)),
        }
        None
    }
}

/// Breakpoints on `timer_isr` and on the next instruction: the single step over
/// the first lands on the second, which must hit too, once per interrupt.
#[test]
fn breakpoints_in_the_timer_interrupt_see_every_tick_until_cleared() {
    let (vm, console) = guest("timer-bp", "test=timer,timer", 1);
    let isr = symbol("timer_isr");
    let hits = Arc::new(IsrHits {
        isr,
        at_isr: AtomicU64::new(0),
        after_push: AtomicU64::new(0),
        wrong: Mutex::new(Vec::new()),
        last_isr_hit: Mutex::new(None),
        step_ns: AtomicU64::new(0),
    });
    let running = vm.start().unwrap();
    let control = running.control();
    let inspect = running.inspect();
    inspect
        .set_breakpoints(&[isr, isr + 1], hits.clone())
        .unwrap();
    let armed = Instant::now();
    assert!(
        eventually(|| console.read().contains("TEST timer PASS")),
        "first timer scenario: {}",
        console.read()
    );
    let first_pass = armed.elapsed();
    inspect.clear_breakpoints().unwrap();
    let at_clear = hits.total();
    let outcome = running.wait();
    let out = console.read();
    assert!(
        matches!(outcome, VmOutcome::DebugExit(0)),
        "{outcome:?}\n{out}"
    );
    assert_eq!(out.matches("TEST timer PASS").count(), 2, "{out}");
    let (at_isr, after_push) = (
        hits.at_isr.load(Ordering::SeqCst),
        hits.after_push.load(Ordering::SeqCst),
    );
    assert!(at_isr >= 30, "{at_isr} hits in the first timer scenario");
    assert_eq!(
        at_isr, after_push,
        "the step lands on the second breakpoint"
    );
    assert_eq!(hits.wrong.lock().unwrap().as_slice(), &[]);
    assert_eq!(hits.total(), at_clear, "hits after clear_breakpoints");
    let debug_exits = control.metrics().snapshot().vcpus[0].exits.debug;
    assert!(
        debug_exits >= 2 * at_clear,
        "a hit and a step each: {debug_exits}"
    );
    eprintln!(
        "{at_isr} interrupts in {first_pass:?}, {debug_exits} debug exits; \
         from a hit's handler to the next hit one instruction on: {} ns on average",
        hits.step_ns.load(Ordering::SeqCst) / after_push.max(1)
    );
}

/// Records every write it is asked about and gives one verdict.
struct Recorder {
    verdict: MsrVerdict,
    writes: Mutex<Vec<(u32, u32, u64)>>,
    /// When set, a refusal pauses the VM before the guest sees its #GP.
    pause_on_refusal: OnceLock<VmControl>,
}

impl Recorder {
    fn new(verdict: MsrVerdict) -> Arc<Self> {
        Arc::new(Self {
            verdict,
            writes: Mutex::new(Vec::new()),
            pause_on_refusal: OnceLock::new(),
        })
    }
}

impl MsrGuard for Recorder {
    fn msr_write(&self, vcpu: u32, index: u32, value: u64) -> MsrVerdict {
        self.writes.lock().unwrap().push((vcpu, index, value));
        if self.verdict == MsrVerdict::Refuse {
            // The pause cannot complete on this thread, which must park; ask for it
            // elsewhere and return once asked: the vCPU parks before the next KVM_RUN.
            let control = eventually(|| self.pause_on_refusal.get().is_some())
                .then(|| self.pause_on_refusal.get().cloned())
                .flatten();
            if let Some(control) = control {
                let pauser = control.clone();
                std::thread::spawn(move || pauser.pause());
                eventually(|| control.state() == RunState::Paused);
            }
        }
        self.verdict
    }
}

#[test]
fn msr_guard_from_the_first_instruction_allows_the_boot_write() {
    let (vm, console) = guest("guard-allow", "test=hang", 1);
    let guard = Recorder::new(MsrVerdict::Allow);
    vm.guard_msrs(&[MSR_LSTAR], guard.clone()).unwrap();
    let running = vm.start().unwrap();
    let control = running.control();
    let inspect = running.inspect();
    let syscall_entry = symbol("syscall_entry");
    assert!(
        wait_for_lstar(&inspect, syscall_entry),
        "{}",
        console.read()
    );
    assert_eq!(
        guard.writes.lock().unwrap().as_slice(),
        &[(0, MSR_LSTAR, syscall_entry)]
    );
    let states = inspect.vcpu_states().unwrap();
    // cpu::init goes on after LSTAR: SFMASK, then EFER.SCE.
    assert_ne!(states[0].sregs.efer & EFER_SCE, 0);
    assert!(!console.read().contains("EXCEPTION"));
    assert!(control.metrics().snapshot().vcpus[0].exits.msr >= 1);
    let seventeen: Vec<u32> = (0xc000_0100..0xc000_0111).collect();
    assert!(matches!(
        inspect.guard_msrs(&seventeen, guard.clone()),
        Err(ControlError::GuardedMsrCount(17))
    ));
    assert!(matches!(
        inspect.guard_msrs(&[], guard.clone()),
        Err(ControlError::GuardedMsrCount(0))
    ));
    inspect.unguard_msrs().unwrap();
    assert!(matches!(stop(running), VmOutcome::Stopped(_)));
}

#[test]
fn msr_guard_refusal_gives_the_guest_a_general_protection_fault() {
    let (vm, console) = guest("guard-refuse", "test=serial", 1);
    let guard = Recorder::new(MsrVerdict::Refuse);
    vm.guard_msrs(&[MSR_LSTAR], guard.clone()).unwrap();
    let running = vm.start().unwrap();
    let control = running.control();
    let inspect = running.inspect();
    guard.pause_on_refusal.set(control.clone()).ok().unwrap();
    assert!(eventually(|| !guard.writes.lock().unwrap().is_empty()));
    assert!(eventually(|| control.state() == RunState::Paused));
    // Paused right after the refusal: the MSR kept the value Vigil set at reset.
    assert!(eventually(|| inspect
        .vcpu_states()
        .is_ok_and(|s| s[0].msr(MSR_LSTAR) == Some(0))));
    control.resume().unwrap();
    let outcome = running.wait();
    let out = console.read();
    assert!(
        matches!(outcome, VmOutcome::DebugExit(2)),
        "{outcome:?}\n{out}"
    );
    assert!(out.contains("EXCEPTION vec=13"), "{out}");
    assert!(!out.contains("TEST serial"), "{out}");
    assert_eq!(
        guard.writes.lock().unwrap().as_slice(),
        &[(0, MSR_LSTAR, symbol("syscall_entry"))]
    );
}

#[test]
fn requests_fail_fast_once_the_vm_has_ended() {
    let (vm, _console) = guest("ended", "test=serial", 2);
    let running = vm.start().unwrap();
    let inspect = running.inspect();
    assert!(matches!(running.wait(), VmOutcome::DebugExit(0)));
    let start = Instant::now();
    assert!(matches!(
        inspect.vcpu_states(),
        Err(ControlError::VcpuGone(0))
    ));
    assert!(matches!(
        inspect.write_msr(1, MSR_CSTAR, 0),
        Err(ControlError::VcpuGone(1))
    ));
    assert!(matches!(
        inspect.set_breakpoints(&[0x10_0000], Arc::new(NoHits)),
        Err(ControlError::VcpuGone(0))
    ));
    assert!(matches!(
        inspect.clear_breakpoints(),
        Err(ControlError::VcpuGone(0))
    ));
    assert!(matches!(
        inspect.guard_msrs(&[MSR_LSTAR], Recorder::new(MsrVerdict::Allow)),
        Err(ControlError::Stopping)
    ));
    assert!(
        start.elapsed() < Duration::from_millis(100),
        "{:?}",
        start.elapsed()
    );
    assert!(matches!(
        inspect.set_breakpoints(&[1, 2, 3, 4, 5], Arc::new(NoHits)),
        Err(ControlError::BreakpointCount(5))
    ));
    assert!(matches!(
        inspect.set_breakpoints(&[0xffff_ffff_8100_0000, 1 << 47], Arc::new(NoHits)),
        Err(ControlError::BreakpointAddress(0x8000_0000_0000))
    ));
}

struct NoHits;

impl BreakpointHandler for NoHits {
    fn hit(&self, _: u32, _: &kvm_regs, _: &kvm_sregs) -> Option<u64> {
        None
    }
}

/// Records hits, and what a request from the handler's own thread gives.
#[derive(Default)]
struct ApHits {
    hits: Mutex<Vec<(u32, u64)>>,
    inspect: OnceLock<VmInspect>,
    own_thread: Mutex<Vec<String>>,
}

impl BreakpointHandler for ApHits {
    fn hit(&self, vcpu: u32, regs: &kvm_regs, _sregs: &kvm_sregs) -> Option<u64> {
        self.hits.lock().unwrap().push((vcpu, regs.rip));
        if let Some(inspect) = self.inspect.get() {
            let answer = match inspect.vcpu_states() {
                Err(e @ ControlError::OwnThread(_)) => e.to_string(),
                other => format!("unexpected: {other:?}"),
            };
            self.own_thread.lock().unwrap().push(answer);
        }
        None
    }
}

/// Breakpoints set while paused reach every vCPU, the one still waiting for its
/// start-up IPI included.
#[test]
fn breakpoints_set_while_paused_reach_every_vcpu() {
    // The timer scenario first: 120 ms before the second CPU starts.
    let (vm, console) = guest("ap-bp", "test=timer,smp", 2);
    let ap_main = symbol("ap_main");
    let handler = Arc::new(ApHits::default());
    let running = vm.start().unwrap();
    let control = running.control();
    let inspect = running.inspect();
    handler.inspect.set(inspect.clone()).ok().unwrap();
    control.pause().unwrap();
    inspect
        .set_breakpoints(&[ap_main], handler.clone())
        .unwrap();
    control.resume().unwrap();
    let outcome = running.wait();
    let out = console.read();
    assert!(
        matches!(outcome, VmOutcome::DebugExit(0)),
        "{outcome:?}\n{out}"
    );
    assert!(out.contains("TEST smp PASS cpus=2"), "{out}");
    assert_eq!(handler.hits.lock().unwrap().as_slice(), &[(1, ap_main)]);
    assert_eq!(
        handler.own_thread.lock().unwrap().as_slice(),
        &[ControlError::OwnThread(1).to_string()]
    );
}
