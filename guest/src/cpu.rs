//! CPU primitives and the kernel's descriptor tables: GDT/TSS, IDT, syscall MSRs,
//! exception and interrupt entry, and the CPL3 round trip.

use core::arch::{asm, global_asm};
use core::ptr::{addr_of, addr_of_mut};
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::boot::{
    GDT_ENTRIES, KERNEL_CS, KERNEL_DS, MAX_APS, TSS_LIMIT, TSS_SEL, USER_CS, USER_DS,
};
use crate::serial::{Out, Serial};

/// LAPIC timer interrupt vector.
pub const TIMER_VECTOR: u8 = 0x20;
/// LAPIC spurious interrupt vector (low nibble all ones, as old xAPICs require).
pub const SPURIOUS_VECTOR: u8 = 0x2f;
/// The `rt` scenarios' timer interrupt (LAPIC one-shot or the RT timer device's MSI).
pub const RT_VECTOR: u8 = 0x40;
/// The `int $0x80` system call gate (Linux's 32-bit entry).
pub const INT80_VECTOR: u8 = 0x80;
/// #DB: the debug exception (single step, `int1`).
const DB_VECTOR: usize = 1;
/// Vectors 0..IDT_ENTRIES are described (those between the RT vector and 0x80 are not
/// present); anything above raises #GP, which reports.
const IDT_ENTRIES: usize = INT80_VECTOR as usize + 1;

const MSR_EFER: u32 = 0xc000_0080;
const MSR_STAR: u32 = 0xc000_0081;
pub const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_SFMASK: u32 = 0xc000_0084;
const MSR_SYSENTER_CS: u32 = 0x174;
const MSR_SYSENTER_ESP: u32 = 0x175;
const MSR_SYSENTER_EIP: u32 = 0x176;
/// RFLAGS bits cleared on `syscall`, as Linux does: TF, IF, DF, IOPL, NT, AC.
const SFMASK: u64 = 0x47700;

/// Timer interrupts taken since the counter was last reset.
#[no_mangle]
pub static TIMER_TICKS: AtomicU64 = AtomicU64::new(0);

/// Debug exceptions (#DB) taken: `db_isr` counts them and returns.
#[no_mangle]
pub static DB_HITS: AtomicU64 = AtomicU64::new(0);

static mut IDT: [u64; 2 * IDT_ENTRIES] = [0; 2 * IDT_ENTRIES];

extern "C" {
    static mut GDT: [u64; GDT_ENTRIES];
    static TSS: u8;
    static exception_stubs: u8;
    static __user_start: u8;
    static __user_end: u8;
    fn timer_isr();
    fn spurious_isr();
    fn syscall_entry();
    fn sysenter_entry();
    fn int80_entry();
    fn db_isr();
    static SYSENTER_STACK_TOP: u8;
}

pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O touches no memory; the ports used are the platform's devices.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    }
}

pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as for outb.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags))
    }
    value
}

pub fn outl(port: u16, value: u32) {
    // SAFETY: as for outb.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags))
    }
}

pub fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: as for outb.
    unsafe {
        asm!("in eax, dx", in("dx") port, out("eax") value, options(nomem, nostack, preserves_flags))
    }
    value
}

pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: rdtsc only reads the time-stamp counter.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// CPUID leaf `leaf`, sub-leaf 0: (eax, ebx, ecx, edx).
pub fn cpuid(leaf: u32) -> (u32, u32, u32, u32) {
    let (a, b, c, d): (u32, u32, u32, u32);
    // SAFETY: cpuid only reads; rbx is reserved by LLVM, so it is saved around it.
    unsafe {
        asm!(
            "mov {b:r}, rbx",
            "cpuid",
            "xchg {b:r}, rbx",
            b = out(reg) b,
            inout("eax") leaf => a,
            inout("ecx") 0u32 => c,
            out("edx") d,
            options(nomem, nostack, preserves_flags)
        )
    }
    (a, b, c, d)
}

/// CR0.WP: supervisor writes honour read-only pages.
pub const CR0_WP: u64 = 1 << 16;
/// CR4.UMIP: `sgdt`, `sidt`, `sldt`, `smsw` and `str` fault at CPL > 0.
pub const CR4_UMIP: u64 = 1 << 11;
/// CPUID leaf 7 (sub-leaf 0) ECX: UMIP.
const CPUID7_ECX_UMIP: u32 = 1 << 2;
/// Whether `init` set CR4.UMIP (the CPU offers it).
pub static UMIP_AT_BOOT: AtomicBool = AtomicBool::new(false);

pub fn read_cr0() -> u64 {
    let value: u64;
    // SAFETY: reading CR0 has no side effects.
    unsafe { asm!("mov {}, cr0", out(reg) value, options(nomem, nostack, preserves_flags)) }
    value
}

pub fn write_cr0(value: u64) {
    // SAFETY: callers change only WP, which this kernel runs with and without.
    unsafe { asm!("mov cr0, {}", in(reg) value, options(nostack, preserves_flags)) }
}

pub fn read_cr4() -> u64 {
    let value: u64;
    // SAFETY: reading CR4 has no side effects.
    unsafe { asm!("mov {}, cr4", out(reg) value, options(nomem, nostack, preserves_flags)) }
    value
}

pub fn write_cr4(value: u64) {
    // SAFETY: callers change only UMIP, which this kernel runs with and without.
    unsafe { asm!("mov cr4, {}", in(reg) value, options(nostack, preserves_flags)) }
}

/// The IDTR of this CPU: (base, limit).
pub fn sidt() -> (u64, u16) {
    let mut pointer = DescriptorPointer { limit: 0, base: 0 };
    // SAFETY: sidt writes the 10-byte pointer it is given (CPL0: UMIP does not apply).
    unsafe { asm!("sidt [{}]", in(reg) &mut pointer, options(nostack, preserves_flags)) }
    let (base, limit) = (pointer.base, pointer.limit);
    (base, limit)
}

/// Loads an IDT at `base` with `limit`.
///
/// # Safety
/// `base..=base+limit` must hold valid gates for every vector that can arrive.
pub unsafe fn lidt(base: u64, limit: u16) {
    let pointer = DescriptorPointer { limit, base };
    asm!("lidt [{}]", in(reg) &pointer, options(readonly, nostack, preserves_flags))
}

pub fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: only architectural MSRs present on every x86_64 CPU are read.
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// `wrmsr` that survives a #GP (an MSR the VMM refuses to let the guest write): true
/// when the instruction completed, false when it faulted.
pub fn try_wrmsr(msr: u32, value: u64) -> bool {
    let done: u64;
    // SAFETY: the fault fixup resumes at label 3 with the caller-saved registers
    // clobbered (clobber_abi); callers write MSRs whose new value this kernel survives.
    unsafe {
        asm!(
            "lea rsi, [rip + 2f]",
            "mov [{fault}], rsi",
            "lea rsi, [rip + 3f]",
            "mov [{recovery}], rsi",
            "2:",
            "wrmsr",
            "mov esi, 1",
            "jmp 4f",
            "3:",
            "xor esi, esi",
            "4:",
            out("rsi") done,
            fault = in(reg) FIXUP_FAULT_RIP.as_ptr(),
            recovery = in(reg) FIXUP_RECOVERY_RIP.as_ptr(),
            in("ecx") msr,
            in("eax") value as u32,
            in("edx") (value >> 32) as u32,
            clobber_abi("C"),
            options(nostack)
        )
    }
    FIXUP_FAULT_RIP.store(0, Ordering::SeqCst);
    FIXUP_RECOVERY_RIP.store(0, Ordering::SeqCst);
    done == 1
}

pub fn wrmsr(msr: u32, value: u64) {
    // SAFETY: callers write architectural MSRs with values valid for this kernel.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32,
             options(nostack, preserves_flags))
    }
}

/// Waits for an interrupt with interrupts enabled, then disables them again.
pub fn wait_for_interrupt() {
    // SAFETY: `sti; hlt` is atomic (STI's one-instruction shadow), so no wake-up is lost.
    unsafe { asm!("sti", "hlt", "cli", options(nomem, nostack)) }
}

/// Exits through isa-debug-exit (port 0xf4); where that port is absent, resets through
/// the i8042 (Firecracker's way out); failing both, halts forever.
pub fn exit(code: u8) -> ! {
    outb(0xf4, code);
    outb(0x64, 0xfe);
    halt_forever()
}

pub fn halt_forever() -> ! {
    loop {
        // SAFETY: halting with interrupts off stops this CPU for good.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) }
    }
}

#[repr(C, packed)]
struct DescriptorPointer {
    limit: u16,
    base: u64,
}

/// Writes a 64-bit TSS descriptor (two GDT slots) for the TSS at `tss`.
///
/// # Safety
/// `gdt` must point at a GDT laid out as `boot.rs`'s, that no CPU reads meanwhile.
unsafe fn set_tss_descriptor(gdt: *mut u64, tss: u64, limit: u64) {
    let low = limit | ((tss & 0xff_ffff) << 16) | (0x89 << 40) | (((tss >> 24) & 0xff) << 56);
    gdt.add(usize::from(TSS_SEL / 8)).write(low);
    gdt.add(usize::from(TSS_SEL / 8) + 1).write(tss >> 32);
}

/// Fills the TSS descriptor and loads TR, builds and loads the IDT, and sets up the
/// syscall MSRs as a real kernel would (introspection targets).
pub fn init() {
    // SAFETY: single-threaded start-up; the GDT slots 5 and 6 are the TSS descriptor.
    unsafe {
        set_tss_descriptor(addr_of_mut!(GDT) as *mut u64, addr_of!(TSS) as u64, TSS_LIMIT);
        asm!("ltr {0:x}", in(reg) TSS_SEL, options(nostack, preserves_flags));
    }

    // The stubs are 16 bytes apart from `exception_stubs` (see below).
    let stubs = addr_of!(exception_stubs) as u64;
    for vector in 0..32 {
        set_gate(vector, stubs + 16 * vector as u64);
    }
    set_gate(usize::from(TIMER_VECTOR), timer_isr as *const () as u64);
    set_gate(
        usize::from(SPURIOUS_VECTOR),
        spurious_isr as *const () as u64,
    );
    set_gate(usize::from(RT_VECTOR), crate::rt::rt_isr as *const () as u64);
    set_gate(DB_VECTOR, db_isr as *const () as u64);
    set_gate(usize::from(INT80_VECTOR), int80_entry as *const () as u64);
    load_idt();

    UMIP_AT_BOOT.store(protect(), Ordering::SeqCst);
    setup_syscall(None);
}

/// Sets up this CPU's system call entry, as a kernel does on every CPU (the BSP
/// at boot, each AP the `smp` scenarios start): STAR, LSTAR = `syscall_entry`,
/// SYSENTER_CS/ESP/EIP, SFMASK, then EFER.SCE. With `other_lstar`, LSTAR is that instead, written
/// through the fault fixup (one CPU at a time): returns whether it was written
/// (false: the `wrmsr` faulted, a VMM refused it, and LSTAR kept its value).
pub fn setup_syscall(other_lstar: Option<u64>) -> bool {
    wrmsr(MSR_STAR, (KERNEL_DS << 48) | (KERNEL_CS << 32));
    let written = match other_lstar {
        None => {
            wrmsr(MSR_LSTAR, syscall_entry as *const () as u64);
            true
        }
        Some(lstar) => try_wrmsr(MSR_LSTAR, lstar) && rdmsr(MSR_LSTAR) == lstar,
    };
    // SFMASK and EFER.SCE last, as Linux's syscall_init writes SYSCALL_MASK
    // last: a host that deems a CPU's syscall entry set up once they are (the
    // integrity monitor, for an AP) then sees every syscall MSR in place.
    wrmsr(MSR_SYSENTER_CS, KERNEL_CS);
    wrmsr(MSR_SYSENTER_ESP, addr_of!(SYSENTER_STACK_TOP) as u64);
    wrmsr(MSR_SYSENTER_EIP, sysenter_entry as *const () as u64);
    wrmsr(MSR_SFMASK, SFMASK);
    wrmsr(MSR_EFER, rdmsr(MSR_EFER) | 1);
    written
}

/// Each AP's own GDT, as Linux gives each CPU its own: a copy of the boot GDT
/// whose TSS descriptor points at the AP's own TSS.
static mut AP_GDTS: [[u64; GDT_ENTRIES]; MAX_APS] = [[0; GDT_ENTRIES]; MAX_APS];

/// An AP's TSS: no stacks (APs never change privilege level) and no I/O bitmap
/// (they never run at CPL3): its I/O map base (bytes 102..104) is past the limit.
/// Its descriptor has the boot TSS's limit, as Linux gives every CPU's TSS the
/// same; the CPU reads no further than the 104 bytes.
#[repr(C, align(16))]
struct ApTss([u8; AP_TSS_LEN]);
const AP_TSS_LEN: usize = 104;
static mut AP_TSSS: [ApTss; MAX_APS] = [const {
    let mut tss = [0; AP_TSS_LEN];
    tss[102] = 0xff;
    tss[103] = 0xff;
    ApTss(tss)
}; MAX_APS];

/// Loads AP `slot`'s own GDT (the boot GDT's layout, its own TSS) and TR.
pub fn load_ap_gdt(slot: usize) {
    if slot >= MAX_APS {
        return;
    }
    // SAFETY: slot `slot` of AP_GDTS and AP_TSSS is this AP's alone (boot.rs hands
    // out each slot once); the copy has the boot GDT's segments at the same
    // selectors, so CS and the data segments stay valid across the `lgdt`; its TSS
    // descriptor is not busy, so `ltr` takes it.
    unsafe {
        let gdt = addr_of_mut!(AP_GDTS[slot]) as *mut u64;
        core::ptr::copy_nonoverlapping(addr_of!(GDT) as *const u64, gdt, GDT_ENTRIES);
        let tss = addr_of!(AP_TSSS[slot]) as u64;
        set_tss_descriptor(gdt, tss, TSS_LIMIT);
        let pointer = DescriptorPointer {
            limit: (GDT_ENTRIES * 8 - 1) as u16,
            base: gdt as u64,
        };
        asm!(
            "lgdt [{}]",
            "ltr {1:x}",
            in(reg) &pointer,
            in(reg) TSS_SEL,
            options(readonly, nostack, preserves_flags)
        );
    }
}

/// Sets CR0.WP on this CPU, as every kernel does (the guest's own pages are all
/// writable, so its writes to its text and rodata still work), and CR4.UMIP where the
/// CPU offers it (CPUID leaf 7 ECX bit 2); returns whether UMIP was set. No SMEP/SMAP:
/// every page is user-accessible. The BSP at boot and each AP call it.
pub fn protect() -> bool {
    write_cr0(read_cr0() | CR0_WP);
    let umip = cpuid(0).0 >= 7 && cpuid(7).2 & CPUID7_ECX_UMIP != 0;
    if umip {
        write_cr4(read_cr4() | CR4_UMIP);
    }
    umip
}

fn set_gate(vector: usize, handler: u64) {
    let low =
        (handler & 0xffff) | (KERNEL_CS << 16) | (0x8e << 40) | (((handler >> 16) & 0xffff) << 48);
    // SAFETY: single-threaded start-up, before the IDT is loaded on any CPU.
    unsafe {
        let idt = addr_of_mut!(IDT) as *mut u64;
        idt.add(2 * vector).write(low);
        idt.add(2 * vector + 1).write(handler >> 32);
    }
}

/// Loads an empty IDT and raises #UD: neither it nor the double fault can be
/// delivered, so the CPU shuts down (a triple fault), as a broken kernel would.
pub fn triple_fault() -> ! {
    let empty = DescriptorPointer { limit: 0, base: 0 };
    // SAFETY: deliberately unrecoverable; nothing runs after this on this CPU.
    unsafe { asm!("lidt [{}]", "ud2", in(reg) &empty, options(noreturn, nostack)) }
}

/// Loads the (already built) IDT on this CPU.
pub fn load_idt() {
    let pointer = DescriptorPointer {
        limit: (IDT_ENTRIES * 16 - 1) as u16,
        base: addr_of!(IDT) as u64,
    };
    // SAFETY: the IDT is static and fully built before any CPU loads it.
    unsafe { asm!("lidt [{}]", in(reg) &pointer, options(readonly, nostack, preserves_flags)) }
}

/// What the exception stubs push, then what the CPU pushed.
#[repr(C)]
pub struct ExceptionFrame {
    vector: u64,
    error: u64,
    rip: u64,
    cs: u64,
}

/// An expected #GP at CPL0: (faulting RIP, recovery RIP), armed by `try_wrmsr` (0, 0
/// when none is armed).
static FIXUP_FAULT_RIP: AtomicU64 = AtomicU64::new(0);
static FIXUP_RECOVERY_RIP: AtomicU64 = AtomicU64::new(0);

/// Called by every exception stub. Returns 0 for `ud2` in the CPL3 code: that is how
/// user code hands control back (see `user_enter`); returns a recovery RIP for the one
/// expected #GP `try_wrmsr` armed (the stub resumes there, with the caller-saved
/// registers clobbered); anything else is fatal.
#[no_mangle]
extern "C" fn exception_handler(frame: &ExceptionFrame) -> u64 {
    let user = addr_of!(__user_start) as u64..addr_of!(__user_end) as u64;
    if frame.vector == 6 && frame.cs & 3 == 3 && user.contains(&frame.rip) {
        return 0;
    }
    let expected = FIXUP_FAULT_RIP.load(Ordering::SeqCst);
    if frame.vector == 13 && frame.cs & 3 == 0 && expected != 0 && frame.rip == expected {
        FIXUP_FAULT_RIP.store(0, Ordering::SeqCst);
        return FIXUP_RECOVERY_RIP.swap(0, Ordering::SeqCst);
    }
    Serial
        .str("EXCEPTION vec=")
        .dec(frame.vector)
        .str(" err=")
        .hex(frame.error)
        .str(" rip=")
        .hex(frame.rip)
        .str(" cs=")
        .hex(frame.cs)
        .str("\n");
    exit(2)
}

extern "C" {
    /// Runs `entry(arg)` at CPL3 on `stack` with IOPL=3 and interrupts off; returns when
    /// the user code executes `ud2`.
    pub fn user_enter(entry: u64, stack: u64, arg: u64);
}

/// Runs `f` at CPL3 on the stack ending at `stack_top` (16-byte aligned), with IOPL=3
/// and interrupts off, through the `.text.user` trampoline `user_call`: `f` itself is
/// ordinary kernel-image code (every page is user-accessible), and returns normally;
/// the trampoline then executes `ud2`, which brings the kernel back here. `f` must not
/// execute privileged instructions (port I/O is allowed: IOPL=3 and the I/O bitmap).
pub fn run_user<F: FnMut()>(stack_top: u64, f: &mut F) {
    extern "C" fn call<F: FnMut()>(f: *mut F) {
        // SAFETY: `f` is the `&mut F` run_user holds for the whole call.
        unsafe { (*f)() }
    }
    let pair: [u64; 2] = [f as *mut F as u64, call::<F> as *const () as u64];
    // SAFETY: user_call runs call::<F>(f) and ends in `ud2` (see user_enter); `pair` and
    // `f` outlive the call; the caller reserves the stack.
    unsafe {
        user_enter(
            user_call as *const () as u64,
            stack_top,
            pair.as_ptr() as u64,
        )
    }
}

extern "C" {
    fn user_call();
}

// CPL3 trampoline for run_user: RDI = &[closure, function].
global_asm!(
    r#"
    .section .text.user, "ax"
    .global user_call
user_call:
    movq 8(%rdi), %rax
    movq (%rdi), %rdi
    andq $-16, %rsp
    call *%rax
    ud2
    "#,
    options(att_syntax)
);

// Exception stubs, 16 bytes apart: push a zero error code where the CPU pushes none,
// push the vector, and go to the common path. Handlers never return to the faulting
// code, so no registers are saved; the only way back is the CPL3 `ud2` return, which
// resumes the kernel on the stack `user_enter` saved.
// `syscall_entry` (LSTAR) serves `syscall` at CPL0, the only place it works on the
// build machines: it returns to the caller with the caller's RFLAGS (saved in R11).
global_asm!(
    r#"
    .section .text.exceptions, "ax"
    .balign 16
    .global exception_stubs
exception_stubs:
    .irp n, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
    .balign 16
    .if (\n == 8) || ((\n >= 10) && (\n <= 14)) || (\n == 17) || (\n == 21) || (\n == 29) || (\n == 30)
    .else
    pushq $0
    .endif
    pushq $\n
    jmp exception_common
    .endr

exception_common:
    pushq %rbx
    leaq 8(%rsp), %rdi
    movq %rsp, %rbx
    andq $-16, %rsp
    call exception_handler
    testq %rax, %rax
    jz 1f
    movq %rbx, %rsp
    popq %rbx
    movq %rax, 16(%rsp)
    addq $16, %rsp
    iretq
1:
    movq USER_KERNEL_RSP(%rip), %rsp
    movl ${kds}, %eax
    movl %eax, %ss
    movl %eax, %ds
    movl %eax, %es
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbp
    popq %rbx
    ret

    .global user_enter
user_enter:
    pushq %rbx
    pushq %rbp
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, USER_KERNEL_RSP(%rip)
    pushq ${uds}
    pushq %rsi
    pushq $0x3002
    pushq ${ucs}
    pushq %rdi
    movq %rdx, %rdi
    iretq

    .global timer_isr
timer_isr:
    pushq %rax
    lock incq TIMER_TICKS(%rip)
    movl $0xfee000b0, %eax
    movl $0, (%rax)
    popq %rax
    iretq

    .global spurious_isr
spurious_isr:
    iretq

    .global syscall_entry
    .type syscall_entry, @function
syscall_entry:
    cmpq ${nr_syscalls}, %rax
    jae 1f
    pushq %rbp
    movq %rsp, %rbp
    andq $-16, %rsp
    pushq %rcx
    pushq %r11
    movq %r10, %rcx
    callq *sys_call_table(, %rax, 8)
    popq %r11
    popq %rcx
    movq %rbp, %rsp
    popq %rbp
    pushq %r11
    popfq
    jmpq *%rcx
1:
    movq $-38, %rax
    pushq %r11
    popfq
    jmpq *%rcx
    .size syscall_entry, . - syscall_entry

    // #DB: count and return (a kernel that single-steps its own code).
    .global db_isr
db_isr:
    lock incq DB_HITS(%rip)
    iretq

    // `int $0x80` with the Linux i386 registers: EAX the number, EBX, ECX, EDX, ESI,
    // EDI, EBP the arguments (32 bits each); EAX the 32-bit result; every other
    // register kept.
    .global int80_entry
    .type int80_entry, @function
int80_entry:
    pushq %rbx
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r11
    pushq %r12
    movl %ebp, %r9d
    call sys32_dispatch
    popq %r12
    popq %r11
    popq %r10
    popq %r9
    popq %r8
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rbx
    iretq
    .size int80_entry, . - int80_entry

    // `sysenter` as Linux's 32-bit vDSO makes it: EAX the number, EBX, ECX, EDX, ESI,
    // EDI the first five arguments, the caller's stack in EBP with the sixth argument
    // at [EBP] and, as `__kernel_vsyscall`'s frame has it, its caller's return
    // address at [EBP+12] (32-bit slots). Returns there with RSP = RBP + 16 (where
    // `ret` out of `__kernel_vsyscall` leaves it), EAX the 32-bit result, R11
    // clobbered, the other registers kept.
    .global sysenter_entry
    .type sysenter_entry, @function
sysenter_entry:
    pushq %rbp
    pushq %rbx
    pushq %rcx
    pushq %rdx
    pushq %rsi
    pushq %rdi
    pushq %r8
    pushq %r9
    pushq %r10
    pushq %r12
    movl (%rbp), %r9d
    call sys32_dispatch
    popq %r12
    popq %r10
    popq %r9
    popq %r8
    popq %rdi
    popq %rsi
    popq %rdx
    popq %rcx
    popq %rbx
    popq %rbp
    movl 12(%rbp), %r11d
    leaq 16(%rbp), %rsp
    jmpq *%r11
    .size sysenter_entry, . - sysenter_entry

    // The common part of both 32-bit entries: EAX, EBX, ECX, EDX, ESI, EDI and R9D
    // (the sixth argument) to `sys_call_table[EAX](EBX, ECX, EDX, ESI, EDI, R9D)`;
    // -ENOSYS for EAX >= the table's size. Clobbers RDI, RSI, RDX, RCX, R8..R12.
sys32_dispatch:
    movl %eax, %eax
    cmpq ${nr_syscalls}, %rax
    jae 1f
    movl %edi, %r8d
    movl %esi, %r10d
    movl %ecx, %esi
    movl %r10d, %ecx
    movl %ebx, %edi
    movl %edx, %edx
    movq %rsp, %r12
    andq $-16, %rsp
    callq *sys_call_table(, %rax, 8)
    movq %r12, %rsp
    movl %eax, %eax
    ret
1:
    movl $-38, %eax
    ret

    .section .bss.sysenter_stack, "aw", @nobits
    .balign 16
    .skip 4096
    .global SYSENTER_STACK_TOP
SYSENTER_STACK_TOP:

    .section .bss.user_kernel_rsp, "aw", @nobits
    .balign 8
USER_KERNEL_RSP:
    .skip 8
    "#,
    kds = const KERNEL_DS,
    uds = const USER_DS,
    ucs = const USER_CS,
    nr_syscalls = const crate::introspect::NR_SYSCALLS,
    options(att_syntax)
);
