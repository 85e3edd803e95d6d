//! What makes the guest look like a kernel to an introspecting host: a system call
//! table in `.rodata` that `syscall_entry` dispatches through, and functions a rootkit
//! would hook with; and the scenarios that tamper with the kernel's state after the
//! host took its baseline (`rootkit-*`, one of them through a virtio-blk read into its
//! own text), or make a known sequence of system calls for the host to trace
//! (`syscalls`, `syscall-loop`). See README.md for their output.

use core::arch::{asm, global_asm};
use core::ptr::{addr_of, addr_of_mut, read_volatile, write_volatile};
use core::sync::atomic::Ordering;

use crate::cpu::{self, rdtsc};
use crate::serial::{self, Line, Out, Serial};
use crate::{scenarios, virtio, Machine};

/// Entries of `sys_call_table`; `syscall_entry` answers -ENOSYS at and above.
pub const NR_SYSCALLS: usize = 16;
const ENOSYS: u64 = -38i64 as u64;

/// What `sys_call_table[nr]` returns for the arguments `a` (RDI, RSI, RDX, R10, R8,
/// R9): `(nr << 48) + a0 + 2*a1 + 3*a2 + 4*a3 + 5*a4 + 6*a5`, wrapping. Weighting the
/// arguments catches registers passed in the wrong order.
pub const fn sys_result(nr: u64, a: [u64; 6]) -> u64 {
    (nr << 48)
        .wrapping_add(a[0])
        .wrapping_add(a[1].wrapping_mul(2))
        .wrapping_add(a[2].wrapping_mul(3))
        .wrapping_add(a[3].wrapping_mul(4))
        .wrapping_add(a[4].wrapping_mul(5))
        .wrapping_add(a[5].wrapping_mul(6))
}

macro_rules! syscalls {
    ($($name:ident = $nr:literal),* $(,)?) => {
        $(
            /// An entry of `sys_call_table`: see `sys_result`.
            #[no_mangle]
            extern "C" fn $name(a: u64, b: u64, c: u64, d: u64, e: u64, f: u64) -> u64 {
                sys_result($nr, [a, b, c, d, e, f])
            }
        )*
    };
}

syscalls!(
    sys_vigil_0 = 0,
    sys_vigil_1 = 1,
    sys_vigil_2 = 2,
    sys_vigil_3 = 3,
    sys_vigil_4 = 4,
    sys_vigil_5 = 5,
    sys_vigil_6 = 6,
    sys_vigil_7 = 7,
    sys_vigil_8 = 8,
    sys_vigil_9 = 9,
    sys_vigil_10 = 10,
    sys_vigil_11 = 11,
    sys_vigil_12 = 12,
    sys_vigil_13 = 13,
    sys_vigil_14 = 14,
    sys_vigil_15 = 15,
);

/// What `rootkit-syscall-table` puts in `sys_call_table[1]`: the real entry's result
/// with its low bits flipped (never called by the guest).
#[no_mangle]
extern "C" fn rootkit_sys_hook(a: u64, b: u64, c: u64, d: u64, e: u64, f: u64) -> u64 {
    sys_result(1, [a, b, c, d, e, f]) ^ 0x6b6f_6f68
}

// The system call table, in .rodata as Linux has it (the guest maps every page
// writable, so `rootkit-syscall-table` can still overwrite it); and the code a rootkit
// would point the kernel at: a #PF handler and a syscall entry that chain to the real
// ones, and `patch_target`, a function that is never called (`rootkit-text` patches it);
// and `blk_target`, a page of text of its own, never executed, that `rootkit-blk` has
// a virtio-blk device read a sector into (a page alone, so no code around it changes).
global_asm!(
    r#"
    .section .rodata.sys_call_table, "a"
    .balign 8
    .global sys_call_table
    .type sys_call_table, @object
    .size sys_call_table, {nr} * 8
sys_call_table:
    .quad sys_vigil_0, sys_vigil_1, sys_vigil_2, sys_vigil_3
    .quad sys_vigil_4, sys_vigil_5, sys_vigil_6, sys_vigil_7
    .quad sys_vigil_8, sys_vigil_9, sys_vigil_10, sys_vigil_11
    .quad sys_vigil_12, sys_vigil_13, sys_vigil_14, sys_vigil_15

    .section .text.rootkit, "ax"
    .balign 16
    .global rootkit_page_fault
    .type rootkit_page_fault, @function
rootkit_page_fault:
    jmp exception_stubs + 14 * 16
    .size rootkit_page_fault, . - rootkit_page_fault

    .balign 16
    .global rootkit_syscall_entry
    .type rootkit_syscall_entry, @function
rootkit_syscall_entry:
    jmp syscall_entry
    .size rootkit_syscall_entry, . - rootkit_syscall_entry

    .balign 16
    .global patch_target
    .type patch_target, @function
patch_target:
    movl $0x6c696769, %eax
    ret
    .size patch_target, . - patch_target

    .section .text.rootkit_blk, "ax"
    .balign 4096
    .global blk_target
    .type blk_target, @function
blk_target:
    .fill 4096, 1, 0xc3
    .size blk_target, . - blk_target
    "#,
    nr = const NR_SYSCALLS,
    options(att_syntax)
);

extern "C" {
    #[allow(non_upper_case_globals)]
    static mut sys_call_table: [u64; NR_SYSCALLS];
    fn rootkit_page_fault();
    fn rootkit_syscall_entry();
    fn patch_target();
    fn blk_target();
}

/// How long the guest waits for each byte from the host.
const GO_TIMEOUT_S: u64 = 60;

pub fn wait_for_host(machine: &Machine) -> bool {
    serial::read_byte(machine.delay_tsc_khz() * 1000 * GO_TIMEOUT_S).is_some()
}

pub fn ready(name: &[u8]) {
    Serial.str("introspect: ready ").bytes(name).str("\n");
}

/// The rootkit flow: `ready`, a byte from the host (its baseline), the tampering,
/// `tampered`, a second byte (its findings), PASS with the tampering's detail.
fn rootkit(
    name: &[u8],
    machine: &Machine,
    detail: &mut Line,
    tamper: impl FnOnce(&mut Line) -> bool,
) -> bool {
    ready(name);
    if !wait_for_host(machine) {
        detail.str("no go from the host");
        return false;
    }
    let mut what = Line::new();
    if !tamper(&mut what) {
        detail.bytes(what.as_bytes());
        return false;
    }
    Serial
        .str("introspect: tampered ")
        .bytes(name)
        .str(" ")
        .bytes(what.as_bytes())
        .str("\n");
    if !wait_for_host(machine) {
        detail
            .str("no second go from the host: ")
            .bytes(what.as_bytes());
        return false;
    }
    detail.bytes(what.as_bytes());
    true
}

pub fn rootkit_idt(machine: &Machine, detail: &mut Line) -> bool {
    rootkit(b"rootkit-idt", machine, detail, tamper_idt)
}

pub fn rootkit_idtr(machine: &Machine, detail: &mut Line) -> bool {
    rootkit(b"rootkit-idtr", machine, detail, tamper_idtr)
}

pub fn rootkit_text(machine: &Machine, detail: &mut Line) -> bool {
    rootkit(b"rootkit-text", machine, detail, tamper_text)
}

/// The DMA flow: the guest has its disk write over its own kernel text, which
/// KVM's dirty log does not see (the VMM, not the guest, writes the page).
pub fn rootkit_blk(machine: &Machine, detail: &mut Line) -> bool {
    rootkit(b"rootkit-blk", machine, detail, |what| {
        tamper_blk(machine, what)
    })
}

pub fn rootkit_syscall_table(machine: &Machine, detail: &mut Line) -> bool {
    rootkit(
        b"rootkit-syscall-table",
        machine,
        detail,
        tamper_syscall_table,
    )
}

pub fn rootkit_lstar(machine: &Machine, detail: &mut Line) -> bool {
    rootkit(b"rootkit-lstar", machine, detail, tamper_lstar)
}

/// The rootkit flow through a CPU that comes up after the baseline: starts the APs
/// as `smp` does, the first writing `rootkit_syscall_entry` to LSTAR (a #GP, a VMM
/// that refuses it, caught by the fault fixup).
pub fn smp_rogue_ap(machine: &Machine, detail: &mut Line) -> bool {
    if machine.cpus.ids().len() < 2 {
        detail.str("no application processor to start");
        return false;
    }
    rootkit(b"smp-rogue-ap", machine, detail, |what| {
        let new = rootkit_syscall_entry as *const () as u64;
        if !scenarios::smp(machine, what, Some(new)) {
            return false;
        }
        match scenarios::rogue_ap_lstar_written() {
            Some(true) => {
                what.str(" ap_lstar=written new=").hex(new);
                true
            }
            Some(false) => {
                what.str(" ap_lstar=refused");
                true
            }
            None => {
                what.str(" ap_lstar=not tried");
                false
            }
        }
    })
}

pub fn rootkit_wp(machine: &Machine, detail: &mut Line) -> bool {
    rootkit(b"rootkit-wp", machine, detail, tamper_wp)
}

/// FAILs at once, before `ready`, when UMIP was not set at boot (nothing to clear).
pub fn rootkit_cr4(machine: &Machine, detail: &mut Line) -> bool {
    if !cpu::UMIP_AT_BOOT.load(Ordering::SeqCst) {
        detail.str("umip not set at boot");
        return false;
    }
    rootkit(b"rootkit-cr4", machine, detail, tamper_cr4)
}

const PF_VECTOR: u64 = 14;

/// Points IDT gate 14 (#PF) of the loaded IDT at `rootkit_page_fault`.
fn tamper_idt(what: &mut Line) -> bool {
    let (base, _) = cpu::sidt();
    let gate = (base + PF_VECTOR * 16) as *mut u64;
    let new = rootkit_page_fault as *const () as u64;
    // SAFETY: the gate lies in the loaded IDT (vector 14 < its 48 entries), which is
    // writable kernel memory; the new handler chains to the real #PF stub.
    let old = unsafe {
        let (low, high) = (read_volatile(gate), read_volatile(gate.add(1)));
        let old = (low & 0xffff) | (((low >> 48) & 0xffff) << 16) | ((high & 0xffff_ffff) << 32);
        let low = (low & 0x0000_ffff_ffff_0000) | (new & 0xffff) | (((new >> 16) & 0xffff) << 48);
        write_volatile(gate, low);
        write_volatile(gate.add(1), (high & !0xffff_ffff) | (new >> 32));
        old
    };
    what.str("vector=")
        .dec(PF_VECTOR)
        .str(" old=")
        .hex(old)
        .str(" new=")
        .hex(new);
    true
}

/// Where `rootkit-idtr` copies the IDT (at most a page of it).
#[repr(C, align(16))]
struct IdtCopy([u8; 4096]);
static mut ROOTKIT_IDT: IdtCopy = IdtCopy([0; 4096]);

/// Copies the loaded IDT to `ROOTKIT_IDT` and loads that (same limit).
fn tamper_idtr(what: &mut Line) -> bool {
    let (old, limit) = cpu::sidt();
    if usize::from(limit) >= 4096 {
        what.str("idt limit ")
            .hex(u64::from(limit))
            .str(" too large");
        return false;
    }
    let new = addr_of_mut!(ROOTKIT_IDT) as u64;
    // SAFETY: the copy holds the same gates as the loaded IDT, within the same limit;
    // ROOTKIT_IDT is this function's alone.
    unsafe {
        core::ptr::copy_nonoverlapping(old as *const u8, new as *mut u8, usize::from(limit) + 1);
        cpu::lidt(new, limit);
    }
    let (now, _) = cpu::sidt();
    what.str("old_base=").hex(old).str(" new_base=").hex(now);
    now == new
}

/// What `rootkit-text` writes over the first byte of `patch_target`: `ret`.
const PATCH_BYTE: u8 = 0xc3;

/// Overwrites the first byte of `patch_target` (never executed afterwards).
fn tamper_text(what: &mut Line) -> bool {
    let addr = patch_target as *const () as u64;
    // SAFETY: kernel text is mapped writable; patch_target is never called.
    let old = unsafe {
        let old = read_volatile(addr as *const u8);
        write_volatile(addr as *mut u8, PATCH_BYTE);
        old
    };
    what.str("addr=")
        .hex(addr)
        .str(" old=")
        .hex(u64::from(old))
        .str(" new=")
        .hex(u64::from(PATCH_BYTE));
    true
}

/// How much of `blk_target` `rootkit-blk` reads over: one sector.
const BLK_PATCH_LEN: u32 = 512;

/// Reads sector 0 of the first virtio-blk device over the start of `blk_target`
/// (guest-physical == virtual here).
fn tamper_blk(machine: &Machine, what: &mut Line) -> bool {
    let addr = blk_target as *const () as u64;
    if !virtio::blk_read_into(machine, what, addr, BLK_PATCH_LEN) {
        return false;
    }
    what.str("addr=")
        .hex(addr)
        .str(" bytes=")
        .dec(u64::from(BLK_PATCH_LEN));
    true
}

/// The entry of `sys_call_table` that `rootkit-syscall-table` replaces.
const HOOKED_SYSCALL: usize = 1;

fn tamper_syscall_table(what: &mut Line) -> bool {
    let new = rootkit_sys_hook as *const () as u64;
    // SAFETY: the table is writable kernel memory; the hook takes the same arguments.
    let old = unsafe {
        let entry = (addr_of_mut!(sys_call_table) as *mut u64).add(HOOKED_SYSCALL);
        let old = read_volatile(entry);
        write_volatile(entry, new);
        old
    };
    what.str("entry=")
        .dec(HOOKED_SYSCALL as u64)
        .str(" old=")
        .hex(old)
        .str(" new=")
        .hex(new);
    true
}

/// Writes LSTAR = `rootkit_syscall_entry`; a VMM may refuse (#GP, caught).
fn tamper_lstar(what: &mut Line) -> bool {
    let new = rootkit_syscall_entry as *const () as u64;
    let done = cpu::try_wrmsr(cpu::MSR_LSTAR, new);
    if done && cpu::rdmsr(cpu::MSR_LSTAR) == new {
        what.str("lstar=written new=").hex(new);
    } else {
        what.str("lstar=refused");
    }
    true
}

fn tamper_wp(what: &mut Line) -> bool {
    let old = cpu::read_cr0();
    cpu::write_cr0(old & !cpu::CR0_WP);
    let new = cpu::read_cr0();
    what.str("cr0_old=").hex(old).str(" cr0_new=").hex(new);
    old & cpu::CR0_WP != 0 && new & cpu::CR0_WP == 0
}

fn tamper_cr4(what: &mut Line) -> bool {
    let old = cpu::read_cr4();
    cpu::write_cr4(old & !cpu::CR4_UMIP);
    let new = cpu::read_cr4();
    what.str("umip=cleared cr4_old=")
        .hex(old)
        .str(" cr4_new=")
        .hex(new);
    old & cpu::CR4_UMIP != 0 && new & cpu::CR4_UMIP == 0
}

/// One `syscall` at CPL0 with the Linux argument registers; returns RAX.
fn syscall6(nr: u64, a: [u64; 6]) -> u64 {
    let ret: u64;
    // SAFETY: syscall_entry returns to the next instruction with RFLAGS restored; it
    // clobbers RCX and R11 (the instruction itself) and, calling a C function, the
    // other caller-saved registers.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") nr => ret,
            in("rdi") a[0],
            in("rsi") a[1],
            in("rdx") a[2],
            in("r10") a[3],
            in("r8") a[4],
            in("r9") a[5],
            clobber_abi("C"),
        )
    }
    ret
}

/// The system call that `syscalls` makes last, which the table does not hold.
const SYSCALLS_BAD_NR: u64 = 1000;
const SYSCALLS_BAD_ARGS: [u64; 6] = [
    0xdead_0001,
    0xdead_0002,
    0xdead_0003,
    0xdead_0004,
    0xdead_0005,
    0xdead_0006,
];
/// Calls 0..SYSCALLS_TABLE_CALLS go through the table.
const SYSCALLS_TABLE_CALLS: u64 = 8;

/// `syscalls`: after the host's go, RAX = k (0..8) with RDI..R9 = 0x1000*k + 1..6, then
/// RAX = 1000 with 0xdead0001..6 (-ENOSYS); each result checked.
pub fn syscalls(machine: &Machine, detail: &mut Line) -> bool {
    ready(b"syscalls");
    if !wait_for_host(machine) {
        detail.str("no go from the host");
        return false;
    }
    // The calls first, the checks after: the host's trace sees them back to back.
    let mut results = [0u64; SYSCALLS_TABLE_CALLS as usize + 1];
    for k in 0..SYSCALLS_TABLE_CALLS {
        let base = 0x1000 * k;
        let args = [base + 1, base + 2, base + 3, base + 4, base + 5, base + 6];
        results[k as usize] = syscall6(k, args);
    }
    results[SYSCALLS_TABLE_CALLS as usize] = syscall6(SYSCALLS_BAD_NR, SYSCALLS_BAD_ARGS);
    for (k, &got) in results.iter().enumerate() {
        let k = k as u64;
        let (nr, expected) = if k < SYSCALLS_TABLE_CALLS {
            let base = 0x1000 * k;
            let args = [base + 1, base + 2, base + 3, base + 4, base + 5, base + 6];
            (k, sys_result(k, args))
        } else {
            (SYSCALLS_BAD_NR, ENOSYS)
        };
        if got != expected {
            detail
                .str("call ")
                .dec(k)
                .str(": nr=")
                .dec(nr)
                .str(" returned ")
                .hex(got)
                .str(" expected ")
                .hex(expected);
            return false;
        }
    }
    detail.str("calls=").dec(results.len() as u64);
    true
}

const LOOP_DEFAULT: u64 = 10_000;
const LOOP_MAX: u64 = 10_000_000;

/// `syscall_n=N` (decimal, 1 to LOOP_MAX); the default without it.
fn loop_count(machine: &Machine) -> Result<u64, &[u8]> {
    let Some(value) = machine.info.param(b"syscall_n") else {
        return Ok(LOOP_DEFAULT);
    };
    let mut n = 0u64;
    for &c in value {
        if !c.is_ascii_digit() {
            return Err(value);
        }
        n = n.saturating_mul(10).saturating_add(u64::from(c - b'0'));
    }
    if value.is_empty() || n == 0 || n > LOOP_MAX {
        return Err(value);
    }
    Ok(n)
}

/// `syscall-loop`: after the host's go, `syscall_n` system calls with RAX = 0, timed.
pub fn syscall_loop(machine: &Machine, detail: &mut Line) -> bool {
    let n = match loop_count(machine) {
        Ok(n) => n,
        Err(value) => {
            detail
                .str("syscall_n=")
                .bytes(value)
                .str(": expected 1 to ")
                .dec(LOOP_MAX);
            return false;
        }
    };
    ready(b"syscall-loop");
    if !wait_for_host(machine) {
        detail.str("no go from the host");
        return false;
    }
    let start = rdtsc();
    // SAFETY: as in syscall6; R12 (callee-saved, so syscall_entry keeps it) counts.
    unsafe {
        asm!(
            "2:",
            "xor eax, eax",
            "syscall",
            "dec r12",
            "jnz 2b",
            inout("r12") n => _,
            clobber_abi("C"),
        )
    }
    let cycles = rdtsc() - start;
    detail.str("calls=").dec(n);
    if let Some(ns) = (cycles * 1_000_000).checked_div(machine.tsc_khz) {
        detail.str(" ns_per_call=").dec(ns / n);
    }
    true
}

extern "C" {
    /// `int $0x80` with `nr` in EAX and `args` in EBX, ECX, EDX, ESI, EDI, EBP; made
    /// as the CPU makes it (RSP aligned to 16, SS, RSP, RFLAGS, CS, RIP pushed, a
    /// jump to the gate's handler) since the build machines' CPL0 emulator cannot
    /// execute `int n` in long mode. Interrupts are off in every scenario, as the
    /// interrupt gate would make them. Clobbers R11.
    fn int80_call(nr: u64, args: *const u64) -> u64;
    /// `sysenter` as Linux's `__kernel_vsyscall` makes it (see `sysenter_entry`),
    /// made as the CPU makes it (RSP = SYSENTER_ESP, a jump to SYSENTER_EIP, both
    /// as `cpu::init` set them; CS and SS stay the kernel's, which SYSENTER_CS
    /// names) since the CPL0 emulator cannot execute `sysenter` either.
    fn sysenter_call(nr: u64, args: *const u64) -> u64;
    static USER_STACK_TOP: u8;
}

// The callers of the 32-bit entries: global_asm, since inline asm cannot name RBX and
// RBP. Both do what the instruction would (see above). `sysenter_call` builds the frame `__kernel_vsyscall` would: EBP, EDX, ECX and
// the return address in 32-bit slots (the image lies below 4 GiB), RBP pointing at it.
global_asm!(
    r#"
    .section .text.int80_call, "ax"
    .global int80_call
int80_call:
    pushq %rbx
    pushq %rbp
    movq %rdi, %rax
    movq 0(%rsi), %rbx
    movq 8(%rsi), %rcx
    movq 16(%rsi), %rdx
    movq 32(%rsi), %rdi
    movq 40(%rsi), %rbp
    movq 24(%rsi), %rsi
    movq %rsp, %r11
    andq $-16, %rsp
    pushq ${kds}
    pushq %r11
    pushfq
    pushq ${kcs}
    leaq 1f(%rip), %r11
    pushq %r11
    jmp int80_entry
1:
    popq %rbp
    popq %rbx
    ret

    .global sysenter_call
sysenter_call:
    pushq %rbx
    pushq %rbp
    movq %rdi, %rax
    movq 0(%rsi), %rbx
    movq 8(%rsi), %rcx
    movq 16(%rsi), %rdx
    movq 32(%rsi), %rdi
    movq 40(%rsi), %rbp
    movq 24(%rsi), %rsi
    subq $16, %rsp
    leaq 1f(%rip), %r11
    movl %r11d, 12(%rsp)
    movl %ecx, 8(%rsp)
    movl %edx, 4(%rsp)
    movl %ebp, 0(%rsp)
    movq %rsp, %rbp
    leaq SYSENTER_STACK_TOP(%rip), %rsp
    jmp sysenter_entry
1:
    popq %rbp
    popq %rbx
    ret
    "#,
    kds = const crate::boot::KERNEL_DS,
    kcs = const crate::boot::KERNEL_CS,
    options(att_syntax)
);

/// The arguments of call `k` of `syscalls32`: 32-bit values, `0x100*k + 0x10 + i`.
const fn sys32_args(k: u64) -> [u64; 6] {
    let b = 0x100 * k + 0x10;
    [b + 1, b + 2, b + 3, b + 4, b + 5, b + 6]
}

/// `syscalls32`: after the host's go, `int $0x80` with EAX = 2, 3 and `sysenter`
/// with EAX = 4, 5 (arguments `sys32_args(k)` for the k-th call), then `int $0x80`
/// and `sysenter` with EAX = 1000 (-ENOSYS); each 32-bit result checked.
pub fn syscalls32(machine: &Machine, detail: &mut Line) -> bool {
    ready(b"syscalls32");
    if !wait_for_host(machine) {
        detail.str("no go from the host");
        return false;
    }
    // (nr, sysenter?) in call order.
    const CALLS: [(u64, bool); 6] = [
        (2, false),
        (3, false),
        (4, true),
        (5, true),
        (SYSCALLS_BAD_NR, false),
        (SYSCALLS_BAD_NR, true),
    ];
    let mut results = [0u64; CALLS.len()];
    for (k, &(nr, sysenter)) in CALLS.iter().enumerate() {
        let args = sys32_args(k as u64);
        // SAFETY: both entries keep every register but RAX (and R11 for sysenter,
        // caller-saved) and return to the caller on its stack.
        results[k] = unsafe {
            if sysenter {
                sysenter_call(nr, args.as_ptr())
            } else {
                int80_call(nr, args.as_ptr())
            }
        };
    }
    for (k, (&(nr, sysenter), &got)) in CALLS.iter().zip(&results).enumerate() {
        let expected = if nr < NR_SYSCALLS as u64 {
            sys_result(nr, sys32_args(k as u64)) & 0xffff_ffff
        } else {
            ENOSYS & 0xffff_ffff
        };
        if got != expected {
            detail
                .str("call ")
                .dec(k as u64)
                .str(if sysenter { " sysenter" } else { " int80" })
                .str(": nr=")
                .dec(nr)
                .str(" returned ")
                .hex(got)
                .str(" expected ")
                .hex(expected);
            return false;
        }
    }
    detail.str("calls=").dec(CALLS.len() as u64);
    true
}

const RFLAGS_TF: u64 = 0x100;

/// `debug-trap`: after the host's go, single-steps a few instructions with RFLAGS.TF
/// at CPL0 (a `syscall` among them) and at CPL3; `db_isr` counts the #DBs.
pub fn debug_trap(machine: &Machine, detail: &mut Line) -> bool {
    ready(b"debug-trap");
    if !wait_for_host(machine) {
        detail.str("no go from the host");
        return false;
    }
    let before = cpu::DB_HITS.load(Ordering::SeqCst);
    // SAFETY: TF makes each instruction trap to db_isr, which only counts; the
    // syscall is syscall6's (RAX = 0: sys_vigil_0, no side effect).
    unsafe {
        asm!(
            "pushfq",
            "or qword ptr [rsp], {tf}",
            "popfq",
            "nop",
            "nop",
            "xor eax, eax",
            "syscall",
            "nop",
            "pushfq",
            "and qword ptr [rsp], {notf}",
            "popfq",
            "nop",
            tf = const RFLAGS_TF,
            notf = const !RFLAGS_TF,
            clobber_abi("C"),
        )
    }
    let cpl0 = cpu::DB_HITS.load(Ordering::SeqCst) - before;
    let before = cpu::DB_HITS.load(Ordering::SeqCst);
    cpu::run_user(addr_of!(USER_STACK_TOP) as u64, &mut || {
        // SAFETY: as above, at CPL3 (no syscall: it does not work there).
        unsafe {
            asm!(
                "pushfq",
                "or qword ptr [rsp], {tf}",
                "popfq",
                "nop",
                "nop",
                "nop",
                "pushfq",
                "and qword ptr [rsp], {notf}",
                "popfq",
                "nop",
                ".byte 0xf1",
                tf = const RFLAGS_TF,
                notf = const !RFLAGS_TF,
            )
        }
    });
    let cpl3 = cpu::DB_HITS.load(Ordering::SeqCst) - before;
    detail.str("dbs_cpl0=").dec(cpl0).str(" dbs_cpl3=").dec(cpl3);
    cpl0 > 0 && cpl3 > 0
}

/// A non-canonical address: writing it to LSTAR raises #GP on every x86_64 CPU.
const NON_CANONICAL: u64 = 0x8000_0000_0000_0000;

/// `msr-fixup`: checks the #GP fixup `rootkit-lstar` relies on, with a write to LSTAR
/// that always faults; LSTAR must be unchanged after it.
pub fn msr_fixup(detail: &mut Line) -> bool {
    let before = cpu::rdmsr(cpu::MSR_LSTAR);
    let done = cpu::try_wrmsr(cpu::MSR_LSTAR, NON_CANONICAL);
    let after = cpu::rdmsr(cpu::MSR_LSTAR);
    if done || after != before {
        detail
            .str("wrmsr of a non-canonical LSTAR ")
            .str(if done { "completed" } else { "faulted" })
            .str(", lstar=")
            .hex(after);
        return false;
    }
    detail.str("gp=caught lstar=").hex(after);
    true
}
