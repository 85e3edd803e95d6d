//! `rt` and `rt-spin`: a periodic real-time task at CPL0 that measures how late its
//! timer interrupts arrive, with the LAPIC timer or with Vigil's paravirtual RT timer
//! device (docs/rt-timer.md), and a handler that overruns the device's budget.
//!
//! The interrupt handler only stamps the TSC into a ring, EOIs and (with the device)
//! writes DONE: every CPL0 instruction is emulated on the build machines, and what
//! runs before the stamp counts as lateness. The bookkeeping runs after each wake-up,
//! the statistics after the run.

use core::arch::global_asm;
use core::ptr::{addr_of, addr_of_mut};
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::cpu::{self, cpuid, inl, outl, rdtsc, RT_VECTOR, TIMER_VECTOR};
use crate::serial::{Line, Out};
use crate::{apic, Machine};

/// Stamps the handler keeps (a ring; the scenarios drain it after each wake-up).
const STAMPS: usize = 256;

/// Interrupts `rt_isr` took since the scenario reset it; the handler stamps
/// `RT_STAMPS[RT_COUNT % STAMPS]` before counting.
#[no_mangle]
static RT_COUNT: AtomicU64 = AtomicU64::new(0);
#[no_mangle]
static mut RT_STAMPS: [u64; STAMPS] = [0; STAMPS];
/// The device's command port, where the handler writes DONE; 0: no device (LAPIC).
#[no_mangle]
static RT_DONE_PORT: AtomicU32 = AtomicU32::new(0);
/// TSC ticks the handler busy-waits after its EOI, before DONE (`rt-spin`); 0: none.
#[no_mangle]
static RT_SPIN_TICKS: AtomicU64 = AtomicU64::new(0);

extern "C" {
    /// The IDT gate of [`RT_VECTOR`].
    pub fn rt_isr();
}

// Stamp, EOI, optional spin, optional DONE (3 to the command port), return.
global_asm!(
    r#"
    .section .text, "ax"
    .global rt_isr
rt_isr:
    pushq %rax
    pushq %rdx
    pushq %rcx
    rdtsc
    shlq $32, %rdx
    orq %rdx, %rax
    movq RT_COUNT(%rip), %rcx
    movzbl %cl, %edx
    movq %rax, RT_STAMPS(,%rdx,8)
    incq %rcx
    movq %rcx, RT_COUNT(%rip)
    movl $0xfee000b0, %edx
    movl $0, (%rdx)
    movq RT_SPIN_TICKS(%rip), %rcx
    testq %rcx, %rcx
    jz 2f
    addq %rax, %rcx
1:
    rdtsc
    shlq $32, %rdx
    orq %rdx, %rax
    cmpq %rcx, %rax
    jb 1b
2:
    movl RT_DONE_PORT(%rip), %edx
    testl %edx, %edx
    jz 3f
    movl ${done}, %eax
    outl %eax, %dx
3:
    popq %rcx
    popq %rdx
    popq %rax
    iretq
    "#,
    done = const COMMAND_DONE,
    options(att_syntax)
);

/// The stamp of interrupt number `n` (counted from 0).
fn stamp(n: u64) -> u64 {
    // SAFETY: the handler writes the ring only with interrupts enabled, and the
    // scenarios read it with interrupts off.
    unsafe { addr_of!(RT_STAMPS[(n % STAMPS as u64) as usize]).read_volatile() }
}

/// The device's registers (dword I/O at its base), see docs/rt-timer.md.
const REG_COMMAND: u16 = 0x00;
const REG_STATUS: u16 = 0x04;
const REG_DEADLINE_LOW: u16 = 0x08;
const REG_DEADLINE_HIGH: u16 = 0x0c;
const REG_PERIOD_NS: u16 = 0x10;
const REG_BUDGET_US: u16 = 0x14;
const REG_FLAGS: u16 = 0x18;
const REG_OVERRUNS: u16 = 0x1c;
/// "VRT1", what the command register reads.
const MAGIC: u32 = 0x3154_5256;
const COMMAND_ARM: u32 = 1;
const COMMAND_CANCEL: u32 = 2;
const COMMAND_DONE: u32 = 3;
/// The device's CPUID leaf (EAX: I/O base).
const LEAF: u32 = 0x4000_0020;
/// The timer these scenarios use.
const TIMER: u32 = 0;

/// The RT timer device of this vCPU.
struct Device {
    base: u16,
}

impl Device {
    /// From CPUID leaf 0x40000020 when the hypervisor leaf reaches it, and the magic.
    fn discover() -> Option<Device> {
        let hypervisor = cpuid(1).2 & (1 << 31) != 0;
        if !hypervisor || cpuid(0x4000_0000).0 < LEAF {
            return None;
        }
        let base = u16::try_from(cpuid(LEAF).0).ok()?;
        if base == 0 || base > u16::MAX - 0x1f {
            return None;
        }
        let device = Device { base };
        (device.read(REG_COMMAND) == MAGIC).then_some(device)
    }

    fn read(&self, reg: u16) -> u32 {
        inl(self.base + reg)
    }

    fn write(&self, reg: u16, value: u32) {
        outl(self.base + reg, value)
    }

    /// Stages a periodic timer (all but its deadline) on [`RT_VECTOR`].
    fn stage(&self, period_ns: u32, budget_us: u32) {
        self.write(REG_STATUS, TIMER);
        self.write(REG_PERIOD_NS, period_ns);
        self.write(REG_BUDGET_US, budget_us);
        self.write(REG_FLAGS, u32::from(RT_VECTOR));
    }

    /// Arms the staged timer for its first expiry at TSC `deadline`; the status.
    fn arm(&self, deadline: u64) -> u32 {
        self.write(REG_DEADLINE_LOW, deadline as u32);
        self.write(REG_DEADLINE_HIGH, (deadline >> 32) as u32);
        self.write(REG_COMMAND, COMMAND_ARM);
        self.read(REG_STATUS)
    }

    fn cancel(&self) {
        self.write(REG_STATUS, TIMER);
        self.write(REG_COMMAND, COMMAND_CANCEL);
    }
}

/// Deadlines on a fixed grid: deadline `k` is `t0 + k` periods, in TSC ticks.
struct Grid {
    t0: u64,
    period_us: u64,
    tsc_khz: u64,
}

impl Grid {
    fn deadline(&self, k: u64) -> u64 {
        // Product first: no rounding error that grows with k.
        self.t0 + k * self.period_us * self.tsc_khz / 1000
    }

    /// The last deadline index at or before `t` (0: before the first).
    fn index_at(&self, t: u64) -> u64 {
        let mut k = t.saturating_sub(self.t0) * 1000 / (self.period_us * self.tsc_khz);
        while self.deadline(k + 1) <= t {
            k += 1;
        }
        k
    }

    fn us(&self, ticks: u64) -> u64 {
        ticks * 1000 / self.tsc_khz
    }
}

/// Lateness below this many µs gets a bucket per µs...
const FINE_US: u64 = 16_384;
/// ...above it one per 1024 µs, the last bucket open-ended.
const COARSE: usize = 1024;
const BUCKETS: usize = FINE_US as usize + COARSE;
static mut HISTOGRAM: [u32; BUCKETS] = [0; BUCKETS];

fn bucket(us: u64) -> usize {
    if us < FINE_US {
        us as usize
    } else {
        FINE_US as usize + (((us - FINE_US) >> 10) as usize).min(COARSE - 1)
    }
}

/// The smallest lateness bucket `i` holds.
fn bucket_floor(i: usize) -> u64 {
    if (i as u64) < FINE_US {
        i as u64
    } else {
        FINE_US + ((i as u64 - FINE_US) << 10)
    }
}

/// What a run saw, deadline by deadline.
struct Tally {
    grid: Grid,
    periods: u64,
    /// The first deadline not yet accounted for.
    next: u64,
    samples: u64,
    max_us: u64,
    missed: u64,
    /// The last device expiry's lateness and the deadlines its match skipped
    /// (none after a mended match: one mend per late burst).
    last: Option<(u64, u64)>,
}

impl Tally {
    /// Before the run: clearing the histogram takes a while at CPL0.
    fn clear() {
        // SAFETY: the histogram is this module's, used by one scenario at a time.
        unsafe { addr_of_mut!(HISTOGRAM).write_bytes(0, 1) };
    }

    fn new(grid: Grid, periods: u64) -> Tally {
        Tally {
            grid,
            periods,
            next: 1,
            samples: 0,
            max_us: 0,
            missed: 0,
            last: None,
        }
    }

    fn record(us: u64, add: bool) {
        // SAFETY: as in clear; bucket() is below BUCKETS.
        unsafe {
            let slot = addr_of_mut!(HISTOGRAM[bucket(us)]);
            let n = slot.read();
            slot.write(if add { n + 1 } else { n.saturating_sub(1) });
        }
    }

    /// Deadline `k`'s interrupt was stamped at `stamp` (early counts as on time).
    fn measure(&mut self, k: u64, stamp: u64) {
        let us = self.grid.us(stamp.saturating_sub(self.grid.deadline(k)));
        Self::record(us, true);
        self.samples += 1;
        self.max_us = self.max_us.max(us);
        self.last = Some((us, 0));
    }

    /// A device expiry stamped at `stamp`: it belongs to the last deadline at or
    /// before it (the device skips expiries it could not deliver in time), the
    /// deadlines jumped over were missed. Expiries after the run's last deadline
    /// do not count.
    ///
    /// An expiry stamped before the deadline the previous one left next is the
    /// previous deadline's: interrupts the guest took late came together, and the
    /// previous one, taken more than a period late, was an earlier deadline's
    /// (not a skipped one). That match is mended: its lateness grows by the
    /// periods it skipped, which were not missed.
    fn expiry(&mut self, stamp: u64) {
        let at = self.grid.index_at(stamp);
        if let Some((us, _)) = self.last.filter(|&(_, s)| s > 0 && at < self.next) {
            Self::record(us, false);
            let mended = us + self.grid.period_us;
            Self::record(mended, true);
            self.max_us = self.max_us.max(mended);
            self.missed -= 1;
            self.last = None;
            let k = self.next - 1;
            let late = self.grid.us(stamp.saturating_sub(self.grid.deadline(k)));
            Self::record(late, true);
            self.samples += 1;
            self.max_us = self.max_us.max(late);
            return;
        }
        let k = at.max(self.next);
        if k > self.periods {
            return;
        }
        self.missed += k - self.next;
        self.measure(k, stamp);
        self.last = self.last.map(|(us, _)| (us, k - self.next));
        self.next = k + 1;
    }

    /// The deadlines never accounted for count as missed.
    fn finish(&mut self) {
        if self.next <= self.periods {
            self.missed += self.periods + 1 - self.next;
            self.next = self.periods + 1;
        }
    }

    /// Lateness at percentile `p` (the bucket's floor; the exact maximum at 100).
    fn percentile(&self, p: u64) -> u64 {
        let rank = (self.samples * p).div_ceil(100).max(1);
        let mut seen = 0u64;
        for i in 0..BUCKETS {
            // SAFETY: as in clear.
            seen += u64::from(unsafe { addr_of!(HISTOGRAM[i]).read() });
            if seen >= rank {
                return bucket_floor(i).min(self.max_us);
            }
        }
        self.max_us
    }
}

/// The command-line words both scenarios take.
struct Words {
    period_us: u64,
    periods: u64,
    budget_us: u64,
}

impl Words {
    /// `rt`'s defaults: 2000 periods of 1 ms, 200 µs budget.
    const RT: Words = Words {
        period_us: 1000,
        periods: 2000,
        budget_us: 200,
    };
    /// `rt-spin`'s: 20 periods of 10 ms, 100 µs budget.
    const RT_SPIN: Words = Words {
        period_us: 10_000,
        periods: 20,
        budget_us: 100,
    };

    /// `rt_period_us=`, `rt_periods=`, `rt_budget_us=` or their `defaults`; `None`
    /// (said in `detail`) for a bad value or unknown timer frequencies.
    fn parse(machine: &Machine, defaults: Words, detail: &mut Line) -> Option<Words> {
        let (Ok(Some(period_us)), Ok(Some(periods)), Ok(Some(budget_us))) = (
            machine.number("rt_period_us", 100, 100_000, Some(defaults.period_us), detail),
            machine.number("rt_periods", 10, 1_000_000, Some(defaults.periods), detail),
            machine.number("rt_budget_us", 1, 100_000, Some(defaults.budget_us), detail),
        ) else {
            return None;
        };
        if machine.tsc_khz == 0 || machine.lapic_khz == 0 {
            detail.str("no timer frequencies");
            return None;
        }
        Some(Words {
            period_us,
            periods,
            budget_us,
        })
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Lapic,
    Pv,
}

/// `rt`: deadlines `rt_period_us` apart, `rt_periods` of them, each met by a LAPIC
/// one-shot (`rt_mode=lapic`) or by one periodic RT timer (`rt_mode=pv`).
pub fn rt(machine: &Machine, detail: &mut Line) -> bool {
    let mode = match machine.info.param(b"rt_mode") {
        None | Some(b"lapic") => Mode::Lapic,
        Some(b"pv") => Mode::Pv,
        Some(other) => {
            detail
                .str("rt_mode=")
                .bytes(other)
                .str(": expected lapic or pv");
            return false;
        }
    };
    let Some(Words {
        period_us,
        periods,
        budget_us,
    }) = Words::parse(machine, Words::RT, detail)
    else {
        return false;
    };
    let device = match mode {
        Mode::Lapic => None,
        Mode::Pv => match Device::discover() {
            Some(device) => Some(device),
            None => {
                detail.str("no rt timer device");
                return false;
            }
        },
    };
    RT_COUNT.store(0, Ordering::SeqCst);
    Tally::clear();
    let tally = match &device {
        None => run_lapic(machine, period_us, periods),
        Some(device) => run_pv(machine, device, period_us, periods, budget_us),
    };
    let tally = match tally {
        Ok(tally) => tally,
        Err(status) => {
            detail.str("arm: status=").dec(u64::from(status));
            return false;
        }
    };
    detail
        .str("mode=")
        .str(if mode == Mode::Lapic { "lapic" } else { "pv" })
        .str(" periods=")
        .dec(periods)
        .str(" period_us=")
        .dec(period_us)
        .str(" p50_us=")
        .dec(tally.percentile(50))
        .str(" p99_us=")
        .dec(tally.percentile(99))
        .str(" max_us=")
        .dec(tally.max_us)
        .str(" missed=")
        .dec(tally.missed);
    if tally.samples == 0 {
        detail.str(" (no interrupt arrived)");
    }
    tally.samples > 0
}

/// LAPIC ticks from now to TSC `deadline` (at least 1, at most what the counter holds).
fn lapic_ticks(machine: &Machine, tsc_ticks: u64) -> u32 {
    (tsc_ticks * machine.lapic_khz / machine.tsc_khz).clamp(1, u64::from(u32::MAX)) as u32
}

/// Each deadline in turn: a one-shot for the time left, `sti; hlt` until it fires.
/// A deadline that passed before it could be armed is missed, as is one whose
/// interrupt came after the next deadline.
fn run_lapic(machine: &Machine, period_us: u64, periods: u64) -> Result<Tally, u32> {
    let grid = Grid {
        t0: rdtsc(),
        period_us,
        tsc_khz: machine.tsc_khz,
    };
    let mut tally = Tally::new(grid, periods);
    while tally.next <= periods {
        let k = tally.next;
        let deadline = tally.grid.deadline(k);
        let now = rdtsc();
        if now >= deadline {
            let passed = tally.grid.index_at(now).min(periods);
            tally.missed += passed + 1 - k;
            tally.next = passed + 1;
            continue;
        }
        let count = RT_COUNT.load(Ordering::SeqCst);
        apic::start_timer(RT_VECTOR, lapic_ticks(machine, deadline - now), false);
        while RT_COUNT.load(Ordering::SeqCst) == count {
            cpu::wait_for_interrupt();
        }
        let at = stamp(count);
        tally.measure(k, at);
        if at >= tally.grid.deadline(k + 1) {
            tally.missed += 1;
        }
        tally.next = k + 1;
    }
    Ok(tally)
}

/// A LAPIC periodic timer every 16 periods, so that `hlt` ends even when the device
/// stays silent.
fn start_watchdog(machine: &Machine, period_us: u64) {
    let ticks = 16 * period_us * machine.tsc_khz / 1000;
    apic::start_timer(TIMER_VECTOR, lapic_ticks(machine, ticks), true);
}

/// Arms timer 0 of the device (status != 0: `Err`), a periodic timer whose first
/// deadline is one period from now; with `handler_done`, DONE from the handler
/// from then on (otherwise the caller writes it when its work is done).
fn arm_periodic(
    machine: &Machine,
    device: &Device,
    period_us: u64,
    budget_us: u64,
    handler_done: bool,
) -> Result<Grid, u32> {
    device.stage((period_us * 1000) as u32, budget_us as u32);
    if handler_done {
        RT_DONE_PORT.store(u32::from(device.base + REG_COMMAND), Ordering::SeqCst);
    }
    // The grid starts 9 periods on: the first deadline is still ahead when the ARM
    // lands, even if the host preempts this (time-shared) vCPU in between.
    let grid = Grid {
        t0: rdtsc() + 9 * period_us * machine.tsc_khz / 1000,
        period_us,
        tsc_khz: machine.tsc_khz,
    };
    match device.arm(grid.deadline(1)) {
        0 => Ok(grid),
        status => {
            RT_DONE_PORT.store(0, Ordering::SeqCst);
            Err(status)
        }
    }
}

/// Ends what arm_periodic and start_watchdog started, and the boost of an expiry
/// after the last deadline.
fn disarm(device: &Device) {
    apic::stop_timer();
    device.cancel();
    device.write(REG_COMMAND, COMMAND_DONE);
    RT_DONE_PORT.store(0, Ordering::SeqCst);
}

/// One periodic device timer; each stamp is matched to its deadline after the wake-up
/// until the last deadline is accounted for or two periods have passed since it.
fn run_pv(
    machine: &Machine,
    device: &Device,
    period_us: u64,
    periods: u64,
    budget_us: u64,
) -> Result<Tally, u32> {
    let grid = arm_periodic(machine, device, period_us, budget_us, false)?;
    let end = grid.deadline(periods + 2);
    let mut tally = Tally::new(grid, periods);
    start_watchdog(machine, period_us);
    let mut seen = 0;
    loop {
        let count = RT_COUNT.load(Ordering::SeqCst);
        while seen < count {
            tally.expiry(stamp(seen));
            seen += 1;
        }
        if tally.next > periods || rdtsc() > end {
            break;
        }
        // The period's work (matching stamps) is done: the boost may end. Written
        // here rather than in the handler, so that the work runs boosted.
        device.write(REG_COMMAND, COMMAND_DONE);
        cpu::wait_for_interrupt();
    }
    disarm(device);
    tally.finish();
    Ok(tally)
}

/// How much longer than its budget the `rt-spin` handler runs.
const SPIN_BUDGETS: u64 = 5;

/// `rt-spin`: a periodic device timer (`rt_period_us`, default 10 ms; budget
/// `rt_budget_us`, default 100 µs) whose handler busy-waits 5 budgets before DONE,
/// for `rt_periods` (default 20) expiries; then the device's overrun count.
pub fn rt_spin(machine: &Machine, detail: &mut Line) -> bool {
    let Some(Words {
        period_us,
        periods,
        budget_us,
    }) = Words::parse(machine, Words::RT_SPIN, detail)
    else {
        return false;
    };
    let Some(device) = Device::discover() else {
        detail.str("no rt timer device");
        return false;
    };
    RT_COUNT.store(0, Ordering::SeqCst);
    RT_SPIN_TICKS.store(
        SPIN_BUDGETS * budget_us * machine.tsc_khz / 1000,
        Ordering::SeqCst,
    );
    let grid = match arm_periodic(machine, &device, period_us, budget_us, true) {
        Ok(grid) => grid,
        Err(status) => {
            RT_SPIN_TICKS.store(0, Ordering::SeqCst);
            detail.str("arm: status=").dec(u64::from(status));
            return false;
        }
    };
    start_watchdog(machine, period_us);
    let end = grid.deadline(periods + 2);
    while RT_COUNT.load(Ordering::SeqCst) < periods && rdtsc() <= end {
        cpu::wait_for_interrupt();
    }
    let overruns = device.read(REG_OVERRUNS);
    disarm(&device);
    RT_SPIN_TICKS.store(0, Ordering::SeqCst);
    detail
        .str("overruns=")
        .dec(u64::from(overruns))
        .str(" periods=")
        .dec(RT_COUNT.load(Ordering::SeqCst).min(periods));
    true
}
