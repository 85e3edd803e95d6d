//! The scenarios `test=` selects. Each returns pass/fail and writes its detail.

use core::arch::global_asm;
use core::ptr::{addr_of, read_volatile, write_volatile};
use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::boot::MAX_APS;
use crate::cpu::{self, rdtsc, TIMER_TICKS, TIMER_VECTOR};
use crate::serial::{Line, Out, Serial};
use crate::{acpi, apic, introspect, net, paging, virtio, vsock, Machine};

pub fn run(name: &[u8], machine: &Machine, detail: &mut Line) -> bool {
    match name {
        b"serial" => serial(),
        b"timer" => timer(machine, detail),
        b"smp" => smp(machine, detail, None),
        b"memory" => memory(machine, detail),
        b"user" => user(machine, detail),
        b"cpuid" => cpuid(detail),
        b"acpi-poweroff" => acpi_poweroff(machine, detail),
        b"i8042-reset" => i8042_reset(detail),
        b"blk" => virtio::blk(machine, detail),
        b"blk-ro" => virtio::blk_ro(machine, detail),
        b"rng" => virtio::rng(machine, detail),
        b"mmio-reads" => virtio::mmio_reads(machine, detail),
        b"rng-evil" => virtio::rng_evil(machine, detail),
        b"virtio-evil" => virtio::virtio_evil(machine, detail),
        b"blk-bench" => virtio::blk_bench(machine, detail),
        b"blk-integrity" => virtio::blk_integrity(machine, detail),
        b"blk-mq" => virtio::blk_mq(machine, detail),
        b"pci" => virtio::pci_scenario(machine, detail),
        b"flood" => virtio::flood(machine, detail),
        b"io-evil" => crate::probe::io_evil(machine, detail),
        b"balloon" => crate::balloon::balloon(machine, detail),
        b"balloon-evil" => crate::balloon::balloon_evil(machine, detail),
        b"balloon-hint" => crate::balloon::balloon_hint(machine, detail),
        b"net" => net::net(machine, detail),
        b"net-bench" => net::net_bench(machine, detail),
        b"net-evil" => net::net_evil(machine, detail),
        b"net-csum" => net::net_csum(machine, detail),
        b"net-mq" => net::net_mq(machine, detail),
        b"mmds" => crate::mmds::mmds(machine, detail),
        b"vsock" => vsock::vsock(machine, detail),
        b"vsock-listen" => vsock::vsock_listen(machine, detail),
        b"vsock-evil" => vsock::vsock_evil(machine, detail),
        b"rootkit-idt" => introspect::rootkit_idt(machine, detail),
        b"rootkit-idtr" => introspect::rootkit_idtr(machine, detail),
        b"rootkit-text" => introspect::rootkit_text(machine, detail),
        b"rootkit-blk" => introspect::rootkit_blk(machine, detail),
        b"rootkit-syscall-table" => introspect::rootkit_syscall_table(machine, detail),
        b"rootkit-lstar" => introspect::rootkit_lstar(machine, detail),
        b"rootkit-wp" => introspect::rootkit_wp(machine, detail),
        b"rootkit-cr4" => introspect::rootkit_cr4(machine, detail),
        b"smp-rogue-ap" => introspect::smp_rogue_ap(machine, detail),
        b"syscalls" => introspect::syscalls(machine, detail),
        b"syscall-loop" => introspect::syscall_loop(machine, detail),
        b"syscalls32" => introspect::syscalls32(machine, detail),
        b"debug-trap" => introspect::debug_trap(machine, detail),
        b"msr-fixup" => introspect::msr_fixup(detail),
        b"module" => crate::module::module(machine, detail),
        b"counter" => crate::mobility::counter(machine, detail),
        b"dirty" => crate::mobility::dirty(machine, detail),
        b"mobility" => crate::mobility::mobility(machine, detail),
        b"compress" => crate::density::compress(machine, detail),
        b"rt" => crate::rt::rt(machine, detail),
        b"rt-spin" => crate::rt::rt_spin(machine, detail),
        // For the VMM's own tests: a guest that crashes, and one that never ends.
        b"triple-fault" => cpu::triple_fault(),
        b"hang" => cpu::halt_forever(),
        _ => {
            detail.str("unknown scenario");
            false
        }
    }
}

/// `SLP_TYP` for S5 (from the DSDT's `\_S5_`, which Vigil sets to 5) with `SLP_EN`.
const S5_SLEEP_CONTROL: u8 = (5 << 2) | (1 << 5);

/// Powers off the way Linux's ACPI driver does on a hardware-reduced platform. When
/// it works, the VM is gone and no TEST line follows.
fn acpi_poweroff(machine: &Machine, detail: &mut Line) -> bool {
    match acpi::sleep_control_port(machine.info.rsdp) {
        Some(port) => {
            cpu::outb(port, S5_SLEEP_CONTROL);
            detail
                .str("still running after writing S5 to port ")
                .hex(u64::from(port));
        }
        None => {
            detail.str("no FADT sleep control register in I/O space");
        }
    }
    false
}

/// Pulses the CPU reset line through the i8042, as `reboot=k` does.
fn i8042_reset(detail: &mut Line) -> bool {
    cpu::outb(0x64, 0xfe);
    detail.str("still running after the i8042 reset command");
    false
}

/// IA32_MISC_ENABLE, which the VMM sets at boot: a custom CPU template's MSR modifiers
/// are checked through it.
const MSR_MISC_ENABLE: u32 = 0x1a0;

/// Reports the feature words the VMM's CPUID template shapes, and an MSR a
/// custom template can set, for the host to check.
fn cpuid(detail: &mut Line) -> bool {
    let (_, leaf1_ebx, leaf1_ecx, leaf1_edx) = cpu::cpuid(1);
    let (_, leaf7_ebx, leaf7_ecx, _) = cpu::cpuid(7);
    detail
        .str("apic_id=")
        .dec(u64::from(leaf1_ebx >> 24))
        .str(" leaf1_ecx=")
        .hex(u64::from(leaf1_ecx))
        .str(" leaf1_edx=")
        .hex(u64::from(leaf1_edx))
        .str(" leaf7_ebx=")
        .hex(u64::from(leaf7_ebx))
        .str(" leaf7_ecx=")
        .hex(u64::from(leaf7_ecx))
        .str(" misc_enable=")
        .hex(cpu::rdmsr(MSR_MISC_ENABLE));
    true
}

/// The host checks that this line arrives intact.
fn serial() -> bool {
    Serial.str("serial: the quick brown fox jumps over the lazy dog 0123456789\n");
    true
}

const ONE_SHOTS: u64 = 10;
const ONE_SHOT_US: u64 = 2_000;
const PERIODS: u64 = 20;
const PERIOD_US: u64 = 5_000;

/// LAPIC timer interrupts, one-shot then periodic, timed against the TSC.
fn timer(machine: &Machine, detail: &mut Line) -> bool {
    let (tsc_khz, lapic_khz) = (machine.tsc_khz, machine.lapic_khz);
    if tsc_khz == 0 || lapic_khz == 0 {
        detail.str("no timer frequencies");
        return false;
    }
    let wait_ticks = |ticks: u64| {
        while TIMER_TICKS.load(Ordering::SeqCst) < ticks {
            cpu::wait_for_interrupt();
        }
    };

    TIMER_TICKS.store(0, Ordering::SeqCst);
    let start = rdtsc();
    for shot in 1..=ONE_SHOTS {
        apic::start_timer(TIMER_VECTOR, (lapic_khz * ONE_SHOT_US / 1000) as u32, false);
        wait_ticks(shot);
    }
    let one_shot_us = (rdtsc() - start) * 1000 / tsc_khz;
    let one_shots = TIMER_TICKS.load(Ordering::SeqCst);

    TIMER_TICKS.store(0, Ordering::SeqCst);
    let start = rdtsc();
    apic::start_timer(TIMER_VECTOR, (lapic_khz * PERIOD_US / 1000) as u32, true);
    wait_ticks(PERIODS);
    let periodic_us = (rdtsc() - start) * 1000 / tsc_khz;
    apic::stop_timer();
    let periods = TIMER_TICKS.load(Ordering::SeqCst);

    detail
        .str("oneshot=")
        .dec(one_shots)
        .str(" oneshot_us=")
        .dec(one_shot_us)
        .str(" periodic=")
        .dec(periods)
        .str(" periodic_us=")
        .dec(periodic_us);
    // Generous: this machine's emulated CPL0 is slow and its timing noisy.
    let plausible =
        |measured: u64, expected: u64| measured * 2 >= expected && measured <= expected * 3;
    one_shots == ONE_SHOTS
        && plausible(one_shot_us, ONE_SHOTS * ONE_SHOT_US)
        && plausible(periodic_us, PERIODS * PERIOD_US)
}

/// Next free AP stack slot (taken by boot.rs), APs that reported, and their APIC ids.
#[no_mangle]
static AP_NEXT: AtomicU32 = AtomicU32::new(0);
static AP_REPORTED: AtomicU32 = AtomicU32::new(0);
static AP_IDS: [AtomicU32; MAX_APS] = [const { AtomicU32::new(0) }; MAX_APS];

extern "C" {
    static AP_TRAMPOLINE: u8;
    static AP_TRAMPOLINE_END: u8;
}

/// For `smp-rogue-ap`: the LSTAR the first AP writes instead of `syscall_entry` (0:
/// none), and what became of it (0 not tried, 1 written, 2 refused).
static AP_ROGUE_LSTAR: AtomicU64 = AtomicU64::new(0);
static AP_ROGUE_RESULT: AtomicU32 = AtomicU32::new(0);

/// An AP, in long mode on its own stack: set up as Linux sets up each CPU (the
/// boot CPU's IDT, its own GDT of the same layout with its own TSS, CR0.WP and
/// CR4.UMIP, the boot CPU's syscall MSRs: the first AP another LSTAR under
/// `smp-rogue-ap`), record the APIC id, then halt for good.
#[no_mangle]
extern "C" fn ap_main(slot: u32) -> ! {
    cpu::load_idt();
    cpu::load_ap_gdt(slot as usize);
    cpu::protect();
    let rogue = AP_ROGUE_LSTAR.load(Ordering::SeqCst);
    if slot == 0 && rogue != 0 {
        let written = cpu::setup_syscall(Some(rogue));
        AP_ROGUE_RESULT.store(if written { 1 } else { 2 }, Ordering::SeqCst);
    } else {
        cpu::setup_syscall(None);
    }
    AP_IDS[slot as usize].store(apic::id(), Ordering::SeqCst);
    AP_REPORTED.fetch_add(1, Ordering::SeqCst);
    cpu::halt_forever()
}

/// Whether the first AP's other LSTAR was written (`smp-rogue-ap`): `None` when it
/// did not try.
pub fn rogue_ap_lstar_written() -> Option<bool> {
    match AP_ROGUE_RESULT.load(Ordering::SeqCst) {
        1 => Some(true),
        2 => Some(false),
        _ => None,
    }
}

/// Starts every AP of the MADT with INIT, STARTUP, STARTUP (as firmware-less kernels
/// do); with `rogue_lstar`, the first AP writes that to LSTAR.
pub fn smp(machine: &Machine, detail: &mut Line, rogue_lstar: Option<u64>) -> bool {
    const MAX_CPUS: usize = MAX_APS + 1;
    let me = apic::id();
    let mut expected = [0u32; MAX_CPUS];
    let mut wanted = 0;
    for &id in machine.cpus.ids() {
        if id != me && wanted < MAX_APS {
            expected[wanted] = id;
            wanted += 1;
        }
    }
    let expected = &expected[..wanted];

    if !expected.is_empty() {
        let Some(page) = trampoline_page(machine) else {
            detail.str("no free page below 1 MiB for the AP trampoline");
            return false;
        };
        // SAFETY: the trampoline is position-independent 16-bit code and smaller than a
        // page; `page` is RAM below 1 MiB that nothing else uses.
        unsafe {
            let start = addr_of!(AP_TRAMPOLINE);
            let len = addr_of!(AP_TRAMPOLINE_END) as usize - start as usize;
            core::ptr::copy_nonoverlapping(start, page as *mut u8, len);
        }
        AP_NEXT.store(0, Ordering::SeqCst);
        AP_REPORTED.store(0, Ordering::SeqCst);
        AP_ROGUE_LSTAR.store(rogue_lstar.unwrap_or(0), Ordering::SeqCst);
        AP_ROGUE_RESULT.store(0, Ordering::SeqCst);
        // xAPIC destinations are 8 bits: larger ids cannot be reached and stay missing.
        let reachable = || expected.iter().copied().filter(|&id| id <= 0xff);
        for id in reachable() {
            apic::send_ipi(id, apic::ICR_INIT);
        }
        apic::delay_us(machine.delay_tsc_khz(), 10_000);
        for _ in 0..2 {
            for id in reachable() {
                apic::send_ipi(id, apic::ICR_STARTUP | (page >> 12) as u32);
            }
            apic::delay_us(machine.delay_tsc_khz(), 200);
        }
        let start = rdtsc();
        while (AP_REPORTED.load(Ordering::SeqCst) as usize) < expected.len()
            && rdtsc() - start < machine.delay_tsc_khz() * 2_000
        {}
    }

    let reported = (AP_REPORTED.load(Ordering::SeqCst) as usize).min(MAX_APS);
    let mut seen = [0u32; MAX_CPUS];
    seen[0] = me;
    for (slot, id) in seen[1..=reported].iter_mut().zip(AP_IDS.iter()) {
        *slot = id.load(Ordering::SeqCst);
    }
    let seen = &mut seen[..=reported];
    // Insertion sort: core's sort is a lot of code to run emulated.
    for i in 1..seen.len() {
        let mut j = i;
        while j > 0 && seen[j - 1] > seen[j] {
            seen.swap(j - 1, j);
            j -= 1;
        }
    }
    detail
        .str("cpus=")
        .dec(seen.len() as u64)
        .str(" apic_ids=")
        .dec_list(seen);
    let all = expected.iter().all(|id| seen.contains(id));
    if !all {
        detail.str(" expected=").dec_list(machine.cpus.ids());
    }
    all
}

/// A RAM page below 1 MiB for the trampoline; its number is the STARTUP vector.
fn trampoline_page(machine: &Machine) -> Option<u64> {
    (0x8000..0xa0000u64).step_by(4096).find(|&page| {
        machine
            .info
            .ram()
            .iter()
            .any(|r| r.base <= page && page + 4096 <= r.end())
    })
}

const PAGE: u64 = 4096;

extern "C" {
    static __image_start: u8;
    static __image_end: u8;
}

/// Writes and reads back a pattern in the first and last page of every RAM region,
/// skipping the guest's own image (code, data, page tables, stacks).
fn memory(machine: &Machine, detail: &mut Line) -> bool {
    let ram = machine.info.ram();
    if ram.is_empty() {
        detail.str("no memory map");
        return false;
    }
    let image = addr_of!(__image_start) as u64..addr_of!(__image_end) as u64;
    let clear = |page: u64| page + PAGE <= image.start || page >= image.end;
    let mut pages = 0u64;
    for region in ram {
        let mut first = region.base.next_multiple_of(PAGE);
        if !clear(first) {
            first = image.end;
        }
        let mut last = (region.end() & !(PAGE - 1)).saturating_sub(PAGE);
        if !clear(last) {
            last = image.start - PAGE;
        }
        for (i, page) in [first, last].into_iter().enumerate() {
            if (i == 1 && page == first) || page < region.base || page + PAGE > region.end() {
                continue;
            }
            if !paging::map(page) {
                detail.str("cannot map ").hex(page);
                return false;
            }
            if let Err(addr) = check_page(page) {
                detail.str("mismatch at ").hex(addr);
                return false;
            }
            pages += 1;
        }
    }
    detail
        .str("ram_kib=")
        .dec(machine.info.ram_kib())
        .str(" top=")
        .hex(machine.info.ram_top())
        .str(" pages=")
        .dec(pages);
    true
}

/// Each quadword: save, write a pattern that depends on the address, read it back,
/// restore (the page may hold something the VMM placed there).
fn check_page(page: u64) -> Result<(), u64> {
    for addr in (page..page + PAGE).step_by(8) {
        let pattern = addr.rotate_left(17) ^ 0xa5a5_5a5a_0ff0_f00f;
        let word = addr as *mut u64;
        // SAFETY: `page` is RAM from the memory map, identity-mapped, outside the image.
        let readback = unsafe {
            let saved = read_volatile(word);
            write_volatile(word, pattern);
            let readback = read_volatile(word);
            write_volatile(word, saved);
            readback
        };
        if readback != pattern {
            return Err(addr);
        }
    }
    Ok(())
}

const USER_ITERATIONS: u64 = 100_000_000;
const USER_SEED: u64 = 0x9e37_79b9_7f4a_7c15;
/// xorshift64 (13, 7, 17) applied USER_ITERATIONS times to USER_SEED, computed ahead.
const USER_EXPECTED: u64 = 0xe501_68cc_8792_3160;

extern "C" {
    fn user_main();
    static USER_STACK_TOP: u8;
    static USER_CPL: u64;
    static USER_RESULT: u64;
}

// CPL3 code: checks CS.RPL, says hello on the serial port (IOPL=3), runs the xorshift
// loop natively, stores the result, and returns to the kernel with `ud2`. It does not
// poll the UART's LSR: a virtual UART is always ready, and each `in` is one more exit.
global_asm!(
    r#"
    .section .text.user, "ax"
    .global user_main
user_main:
    movl %cs, %eax
    andl $3, %eax
    movq %rax, USER_CPL(%rip)
    cmpl $3, %eax
    jne 5f
    leaq user_banner(%rip), %rsi
1:
    movb (%rsi), %cl
    testb %cl, %cl
    jz 3f
    movw $0x3f8, %dx
    movb %cl, %al
    outb %al, %dx
    incq %rsi
    jmp 1b
3:
    movabsq ${seed}, %rax
4:
    movq %rax, %rdx
    shlq $13, %rdx
    xorq %rdx, %rax
    movq %rax, %rdx
    shrq $7, %rdx
    xorq %rdx, %rax
    movq %rax, %rdx
    shlq $17, %rdx
    xorq %rdx, %rax
    decq %rdi
    jnz 4b
    movq %rax, USER_RESULT(%rip)
5:
    ud2

    .section .rodata.user, "a"
user_banner:
    .asciz "user: running at cpl3\n"

    .section .data.user, "aw"
    .balign 8
    .global USER_CPL
USER_CPL:
    .quad 0
    .global USER_RESULT
USER_RESULT:
    .quad 0
    "#,
    seed = const USER_SEED,
    options(att_syntax)
);

/// Enters CPL3 with `iretq`, runs the compute loop there, comes back through `ud2`.
fn user(machine: &Machine, detail: &mut Line) -> bool {
    let start = rdtsc();
    // SAFETY: user_main is CPL3 code that ends in `ud2`, which the #UD handler turns
    // into a return from user_enter; USER_STACK is reserved for it.
    let (cpl, result) = unsafe {
        cpu::user_enter(
            user_main as *const () as u64,
            addr_of!(USER_STACK_TOP) as u64,
            USER_ITERATIONS,
        );
        (
            read_volatile(addr_of!(USER_CPL)),
            read_volatile(addr_of!(USER_RESULT)),
        )
    };
    let cycles = rdtsc() - start;
    detail
        .str("iterations=")
        .dec(USER_ITERATIONS)
        .str(" result=")
        .hex(result)
        .str(" cpl=")
        .dec(cpl);
    if let Some(us) = (cycles * 1000).checked_div(machine.tsc_khz) {
        detail.str(" us=").dec(us);
    }
    cpl == 3 && result == USER_EXPECTED
}
