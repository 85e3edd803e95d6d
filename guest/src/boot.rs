//! PVH entry, boot page tables, GDT, TSS, stacks and the AP trampoline.
//!
//! Everything that can be laid out at link time is (page tables, GDT, TSS), so that
//! the emulated CPL0 start-up runs as few instructions as possible.

use core::arch::global_asm;

/// Selectors of the GDT below.
pub const KERNEL_CS: u64 = 0x08;
pub const KERNEL_DS: u64 = 0x10;
pub const USER_DS: u64 = 0x18 | 3;
pub const USER_CS: u64 = 0x20 | 3;
pub const TSS_SEL: u16 = 0x28;
/// TSS limit: the 104-byte TSS, its 8 KiB I/O bitmap, and the bitmap's 0xff terminator.
pub const TSS_LIMIT: u64 = 104 + 8192;
/// Entries in the GDT (the TSS descriptor takes two).
pub const GDT_ENTRIES: usize = 8;
/// Application processors that get a stack (`.stack` reserves one page each).
pub const MAX_APS: usize = 63;

// The PVH ELF note (XEN_ELFNOTE_PHYS32_ENTRY = 18): the 32-bit physical entry point.
global_asm!(
    r#"
    .section .note.pvh, "a", @note
    .balign 4
    .long 4
    .long 4
    .long 18
    .asciz "Xen"
    .long pvh_start32
    "#,
    options(att_syntax)
);

// Identity map of the first 4 GiB with 2 MiB pages, all user-accessible (U bit) so
// that CPL3 code runs anywhere. Higher addresses are mapped on demand (paging.rs).
global_asm!(
    r#"
    .section .data.pagetables, "aw"
    .balign 4096
    .global PML4
PML4:
    .quad PDPT + 0x7
    .fill 511, 8, 0
    .global PDPT
PDPT:
    .quad PD + 0x0007
    .quad PD + 0x1007
    .quad PD + 0x2007
    .quad PD + 0x3007
    .fill 508, 8, 0
PD:
    .set .Lpd_index, 0
    .rept 2048
    .quad (.Lpd_index << 21) | 0x87
    .set .Lpd_index, .Lpd_index + 1
    .endr
    "#,
    options(att_syntax)
);

// GDT: kernel code/data, user data/code (in the order SYSRET expects from STAR), the
// 64-bit TSS (its descriptor is filled at run time: a relocation cannot split an
// address into its fields) and a flat 32-bit code segment for the AP trampoline.
// The TSS carries an I/O permission bitmap that allows every port: IOPL=3 alone should
// let CPL3 use port I/O, but the build machines' nested KVM ignores IOPL and #GPs
// unless the bitmap allows the port.
global_asm!(
    r#"
    .section .data.gdt, "aw"
    .balign 16
    .global GDT
GDT:
    .quad 0
    .quad 0x00af9a000000ffff
    .quad 0x00cf92000000ffff
    .quad 0x00cff2000000ffff
    .quad 0x00affa000000ffff
    .quad 0, 0
    .quad 0x00cf9a000000ffff
GDT_END:
    .balign 8
    .global GDT_PTR
GDT_PTR:
    .word GDT_END - GDT - 1
    .quad GDT

    .balign 16
    .global TSS
TSS:
    .long 0
    .quad kernel_stack_top
    .fill 11, 8, 0
    .word 0
    .word 104
    .fill 8192, 1, 0
    .byte 0xff
TSS_END:

    .section .stack, "aw", @nobits
    .balign 4096
    .skip 16384
boot_stack_top:
    .skip 16384
kernel_stack_top:
    .global USER_STACK
USER_STACK:
    .skip 4096
    .global USER_STACK_TOP
USER_STACK_TOP:
ap_stacks:
    .skip 4096 * {max_aps}
    .global PD_POOL
    .balign 4096
PD_POOL:
    .skip 4096 * {pd_pool}
    "#,
    max_aps = const MAX_APS,
    pd_pool = const crate::paging::PD_POOL_PAGES,
    options(att_syntax)
);

// 32-bit entry (PVH: protected mode, paging off, EBX = hvm_start_info), shared with the
// APs once their trampoline reaches protected mode; EDI tells them apart.
global_asm!(
    r#"
    .section .text.boot, "ax"
    .code32
    .global pvh_start32
pvh_start32:
    cli
    cld
    lgdtl GDT_PTR
    movl $0x10, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl %eax, %fs
    movl %eax, %gs
    movl $__bss_start, %edi
    movl $__bss_end, %ecx
    subl %edi, %ecx
    shrl $2, %ecx
    xorl %eax, %eax
    rep stosl
    movl %ebx, %esi
    xorl %edi, %edi
    jmp enter_long_mode

    .global ap_start32
ap_start32:
    movl $0x10, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    movl %eax, %fs
    movl %eax, %gs
    movl $1, %edi

enter_long_mode:
    movl %cr4, %eax
    orl $0x20, %eax
    movl %eax, %cr4
    movl $PML4, %eax
    movl %eax, %cr3
    movl $0xc0000080, %ecx
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl %cr0, %eax
    orl $0x80000001, %eax
    movl %eax, %cr0
    ljmpl $0x08, $long_mode

    .code64
long_mode:
    movl $0x10, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    testl %edi, %edi
    jnz 1f
    movl $boot_stack_top, %esp
    movl %esi, %edi
    call kmain
    ud2
1:
    movl $1, %eax
    lock xaddl %eax, AP_NEXT(%rip)
    cmpl ${max_aps}, %eax
    jae 2f
    movl %eax, %edi
    leal 1(%rax), %ecx
    shll $12, %ecx
    addq $ap_stacks, %rcx
    movq %rcx, %rsp
    call ap_main
2:
    cli
    hlt
    jmp 2b
    "#,
    max_aps = const MAX_APS,
    options(att_syntax)
);

// AP trampoline, copied at run time to a page below 1 MiB whose number is the STARTUP
// IPI vector: real mode (CS = that page, IP = 0) -> protected mode -> ap_start32.
global_asm!(
    r#"
    .section .rodata.trampoline, "a"
    .code16
    .global AP_TRAMPOLINE
AP_TRAMPOLINE:
    cli
    cld
    movw %cs, %ax
    movw %ax, %ds
    lgdtl ap_gdt_ptr - AP_TRAMPOLINE
    movl %cr0, %eax
    orl $1, %eax
    movl %eax, %cr0
    ljmpl $0x38, $ap_start32
    .balign 8
ap_gdt_ptr:
    .word GDT_END - GDT - 1
    .long GDT
    .global AP_TRAMPOLINE_END
AP_TRAMPOLINE_END:
    .code64
    "#,
    options(att_syntax)
);
