//! A kernel module as Linux lays one out, for the host's module watch: two pages of
//! text mapped in the module area (at `MODULE_BASE`, where a KASLR kernel puts its
//! first module) and a `struct module` linked into the `modules` list (`list` at
//! offset 8, `name` at 24, and the text's address further in, where Linux keeps its
//! layout's base). The `module` scenario loads it, patches its text and unloads it,
//! each after a byte from the host. See README.md.

use core::arch::asm;
use core::ptr::{addr_of, addr_of_mut, write_volatile};

use crate::introspect::{ready, wait_for_host};
use crate::serial::{Line, Out, Serial};
use crate::Machine;

/// Where the module's text is mapped: Linux's module area, PML4 slot 511, PDPT
/// slot 511, PD slot 0.
pub const MODULE_BASE: u64 = 0xffff_ffff_c000_0000;
const PAGES: usize = 2;
const PAGE: usize = 4096;
const PRESENT_RW: u64 = 0x3;
/// `offsetof(struct module, list)`, `offsetof(struct module, name)`, and where this
/// one keeps its text's address (any offset in the first 2 KiB is found).
const LIST: usize = 8;
const NAME: usize = 24;
const BASE: usize = 0x158;
const MODULE_NAME: &[u8] = b"vigil_mod";
/// The module's one function: `mov eax, 0x6d6f64; ret`.
const CODE: [u8; 6] = [0xb8, 0x64, 0x6f, 0x6d, 0x00, 0xc3];
const CODE_RESULT: u64 = 0x6d6f64;
/// The byte `module` patches in the second page, and with what.
const PATCH_OFFSET: usize = PAGE + 5;
const PATCH_BYTE: u8 = 0xcc;

#[repr(C, align(4096))]
struct Page([u64; 512]);

#[repr(C, align(4096))]
struct Text([u8; PAGE * PAGES]);

#[repr(C, align(8))]
struct Module([u8; 1024]);

static mut MOD_PDPT: Page = Page([0; 512]);
static mut MOD_PD: Page = Page([0; 512]);
static mut MOD_PT: Page = Page([0; 512]);
static mut TEXT: Text = Text([0; PAGE * PAGES]);
static mut MODULE: Module = Module([0; 1024]);

/// Linux's list head of loaded modules: `{next, prev}`.
#[no_mangle]
#[allow(non_upper_case_globals)]
static mut modules: [u64; 2] = [0; 2];

extern "C" {
    static mut PML4: [u64; 512];
}

fn reload_cr3() {
    // SAFETY: rewriting CR3 with its own value flushes the TLB and changes nothing else.
    unsafe {
        asm!("mov {t}, cr3", "mov cr3, {t}", t = out(reg) _, options(nostack, preserves_flags));
    }
}

/// The guest's memory is identity-mapped: a static's address is its physical one.
fn phys<T>(p: *const T) -> u64 {
    p as u64
}

fn module_field(offset: usize) -> *mut u64 {
    // SAFETY: offsets are within the 1 KiB structure, 8-aligned.
    unsafe { (addr_of_mut!(MODULE) as *mut u8).add(offset) as *mut u64 }
}

fn head() -> *mut u64 {
    addr_of_mut!(modules) as *mut u64
}

/// An empty `modules` list and the module's text written (not mapped yet).
fn prepare() {
    // SAFETY: only the BSP runs scenarios; these statics are this module's.
    unsafe {
        write_volatile(head(), head() as u64);
        write_volatile(head().add(1), head() as u64);
        let text = addr_of_mut!(TEXT) as *mut u8;
        for i in 0..PAGE * PAGES {
            write_volatile(text.add(i), 0xc3);
        }
        for (i, b) in CODE.iter().enumerate() {
            write_volatile(text.add(i), *b);
        }
        let name = (addr_of_mut!(MODULE) as *mut u8).add(NAME);
        for (i, b) in MODULE_NAME.iter().enumerate() {
            write_volatile(name.add(i), *b);
        }
        write_volatile(module_field(BASE), MODULE_BASE);
    }
}

/// Maps the text at `MODULE_BASE`, links the module into `modules` and calls its
/// function there. False when the call does not return what the code says.
fn load() -> bool {
    // SAFETY: the tables are this module's, PML4 slot 511 is unused otherwise; the
    // text mapped is the code written by `prepare`.
    unsafe {
        let pt = addr_of_mut!(MOD_PT.0) as *mut u64;
        for i in 0..PAGES {
            write_volatile(
                pt.add(i),
                phys(addr_of!(TEXT)) + (i * PAGE) as u64 | PRESENT_RW,
            );
        }
        write_volatile(
            addr_of_mut!(MOD_PD.0) as *mut u64,
            phys(addr_of!(MOD_PT)) | PRESENT_RW,
        );
        write_volatile(
            (addr_of_mut!(MOD_PDPT.0) as *mut u64).add(511),
            phys(addr_of!(MOD_PD)) | PRESENT_RW,
        );
        write_volatile(
            (addr_of_mut!(PML4) as *mut u64).add(511),
            phys(addr_of!(MOD_PDPT)) | PRESENT_RW,
        );
        reload_cr3();
        let entry = module_field(LIST) as u64;
        write_volatile(module_field(LIST), head() as u64);
        write_volatile(module_field(LIST + 8), head() as u64);
        write_volatile(head(), entry);
        write_volatile(head().add(1), entry);
        let f: extern "C" fn() -> u64 = core::mem::transmute(MODULE_BASE as usize);
        f() & 0xffff_ffff == CODE_RESULT
    }
}

fn patch() -> u64 {
    // SAFETY: the byte is in the mapped text, past the function (never executed).
    unsafe { write_volatile((MODULE_BASE as *mut u8).add(PATCH_OFFSET), PATCH_BYTE) };
    MODULE_BASE + PATCH_OFFSET as u64
}

fn unload() {
    // SAFETY: as in `load`; nothing runs from the module area any more.
    unsafe {
        write_volatile(head(), head() as u64);
        write_volatile(head().add(1), head() as u64);
        let pt = addr_of_mut!(MOD_PT.0) as *mut u64;
        for i in 0..PAGES {
            write_volatile(pt.add(i), 0);
        }
    }
    reload_cr3();
}

/// `module`: ready, then after each byte from the host: loaded, patched, unloaded;
/// PASS after a fourth byte.
pub fn module(machine: &Machine, detail: &mut Line) -> bool {
    prepare();
    ready(b"module");
    let step = |what: &[u8], line: &Line| {
        Serial
            .str("introspect: tampered module ")
            .bytes(what)
            .str(" ")
            .bytes(line.as_bytes())
            .str("\n");
    };
    if !wait_for_host(machine) {
        detail.str("no go from the host");
        return false;
    }
    if !load() {
        detail.str("the module's code did not run at its address");
        return false;
    }
    let mut l = Line::new();
    l.str("name=vigil_mod base=")
        .hex(MODULE_BASE)
        .str(" bytes=")
        .dec((PAGE * PAGES) as u64);
    step(b"loaded", &l);
    if !wait_for_host(machine) {
        detail.str("no go from the host after loaded");
        return false;
    }
    let mut l = Line::new();
    l.str("addr=").hex(patch());
    step(b"patched", &l);
    if !wait_for_host(machine) {
        detail.str("no go from the host after patched");
        return false;
    }
    unload();
    step(b"unloaded", &Line::new());
    if !wait_for_host(machine) {
        detail.str("no go from the host after unloaded");
        return false;
    }
    detail.str("loaded patched unloaded");
    true
}
