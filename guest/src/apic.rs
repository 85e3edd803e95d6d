//! The local APIC (xAPIC MMIO), its timer, IPIs, and the TSC/LAPIC timer frequencies.

use crate::cpu::{cpuid, inb, outb, rdtsc, SPURIOUS_VECTOR};

const BASE: u64 = 0xfee0_0000;
const TPR: u64 = 0x80;
const SVR: u64 = 0xf0;
const ICR_LOW: u64 = 0x300;
const ICR_HIGH: u64 = 0x310;
const LVT_TIMER: u64 = 0x320;
const LVT_LINT0: u64 = 0x350;
const TIMER_INITIAL: u64 = 0x380;
const TIMER_CURRENT: u64 = 0x390;
const TIMER_DIVIDE: u64 = 0x3e0;

const SVR_ENABLE: u32 = 1 << 8;
const LVT_MASKED: u32 = 1 << 16;
const LVT_PERIODIC: u32 = 1 << 17;
const DIVIDE_BY_1: u32 = 0xb;
const ICR_PENDING: u32 = 1 << 12;
pub const ICR_INIT: u32 = 0x4500;
pub const ICR_STARTUP: u32 = 0x4600;

fn read(reg: u64) -> u32 {
    // SAFETY: xAPIC registers are 32-bit MMIO at BASE, identity-mapped.
    unsafe { core::ptr::read_volatile((BASE + reg) as *const u32) }
}

fn write(reg: u64, value: u32) {
    // SAFETY: as for read.
    unsafe { core::ptr::write_volatile((BASE + reg) as *mut u32, value) }
}

/// This CPU's initial APIC id (CPUID leaf 1, EBX[31:24]).
pub fn id() -> u32 {
    cpuid(1).1 >> 24
}

/// Software-enables the LAPIC, accepts every priority, timer masked, divide by 1.
/// Masks the legacy 8259 PICs and LINT0 (ExtINT): firmware such as SeaBIOS leaves
/// them set up, and their IRQ0 would arrive on an exception vector.
pub fn init() {
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
    write(LVT_LINT0, LVT_MASKED);
    write(SVR, SVR_ENABLE | u32::from(SPURIOUS_VECTOR));
    write(TPR, 0);
    write(TIMER_DIVIDE, DIVIDE_BY_1);
    stop_timer();
}

pub fn send_ipi(apic_id: u32, command: u32) {
    write(ICR_HIGH, apic_id << 24);
    write(ICR_LOW, command);
    while read(ICR_LOW) & ICR_PENDING != 0 {}
}

pub fn start_timer(vector: u8, count: u32, periodic: bool) {
    write(
        LVT_TIMER,
        u32::from(vector) | if periodic { LVT_PERIODIC } else { 0 },
    );
    write(TIMER_INITIAL, count);
}

pub fn stop_timer() {
    write(LVT_TIMER, LVT_MASKED);
    write(TIMER_INITIAL, 0);
}

/// Busy-waits `us` microseconds of TSC time.
pub fn delay_us(tsc_khz: u64, us: u64) {
    let start = rdtsc();
    while rdtsc() - start < tsc_khz * us / 1000 {}
}

/// (TSC kHz, LAPIC timer kHz): from the hypervisor timing leaf 0x40000010 when offered,
/// else measured (TSC against PIT channel 2, LAPIC timer against the TSC).
pub fn frequencies() -> (u64, u64) {
    let hypervisor = cpuid(1).2 & (1 << 31) != 0;
    if hypervisor && cpuid(0x4000_0000).0 >= 0x4000_0010 {
        let (tsc_khz, lapic_khz, _, _) = cpuid(0x4000_0010);
        if tsc_khz != 0 && lapic_khz != 0 {
            return (u64::from(tsc_khz), u64::from(lapic_khz));
        }
    }
    // Each measurement is the median of three: a late exit on this nested machine can
    // skew one.
    let tsc_khz = median3(tsc_khz_from_pit);
    (
        tsc_khz,
        if tsc_khz == 0 {
            0
        } else {
            median3(|| lapic_khz_from_tsc(tsc_khz))
        },
    )
}

fn median3(mut measure: impl FnMut() -> u64) -> u64 {
    let (a, b, c) = (measure(), measure(), measure());
    a.max(b).min(a.min(b).max(c))
}

/// TSC ticks during 10 ms of PIT channel 0, read with latch commands; 0 without a PIT.
/// Channel 2 (gated through port 0x61) is the classic choice, but QEMU's microvm has
/// no port 0x61, and KVM's PIT leaves channel 2's gate low without it.
fn tsc_khz_from_pit() -> u64 {
    const PIT_HZ: u64 = 1_193_182;
    const MS: u64 = 10;
    const TICKS: u16 = (PIT_HZ * MS / 1000) as u16;
    // Channel 0, lobyte/hibyte access, mode 0 (count down once).
    const CHANNEL0_MODE0: u8 = 0x30;
    // The TSC is read just before each latch command: the exit's way back, where this
    // nested machine is most often delayed, then does not count.
    let sample = || {
        let tsc = rdtsc();
        outb(0x43, 0x00);
        (tsc, u16::from_le_bytes([inb(0x40), inb(0x40)]))
    };
    outb(0x43, CHANNEL0_MODE0);
    outb(0x40, 0xff);
    outb(0x40, 0xff);
    let (start, first) = sample();
    let mut polls = 0u32;
    let khz = loop {
        let (now, count) = sample();
        if first.wrapping_sub(count) >= TICKS {
            break (now - start) * PIT_HZ / 1000 / u64::from(first.wrapping_sub(count));
        }
        polls += 1;
        // A PIT counts at 1.19 MHz: a counter that never moves is no PIT.
        if (polls >= 100 && count == first) || polls == 1_000_000 {
            break 0;
        }
    };
    // Writing the mode alone stops the count: channel 0 never reaches IRQ0.
    outb(0x43, CHANNEL0_MODE0);
    khz
}

/// LAPIC timer counts (divide by 1) per millisecond of TSC time, over 10 ms. Both ends
/// are (TSC, current count) pairs read the same way, so the delay of the exits does not
/// count.
fn lapic_khz_from_tsc(tsc_khz: u64) -> u64 {
    const MS: u64 = 10;
    let sample = || (rdtsc(), read(TIMER_CURRENT));
    write(LVT_TIMER, LVT_MASKED);
    write(TIMER_INITIAL, u32::MAX);
    let (start, first) = sample();
    delay_us(tsc_khz, MS * 1000);
    let (end, last) = sample();
    stop_timer();
    u64::from(first - last) * tsc_khz / (end - start).max(1)
}
