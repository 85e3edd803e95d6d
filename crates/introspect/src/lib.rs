//! Vigil's view of a guest from outside it: guest memory by physical and by
//! virtual address (a walk of the guest's own page tables), kernel symbols and
//! the KASLR slide; the kernel integrity monitor (a baseline of the kernel's
//! protection state and checks against it); and system call decoding for
//! tracing.
//!
//! The crate never touches vCPU threads or KVM file descriptors: the VMM hands it
//! guest memory through [`GuestPhysMemory`] and register values (CR3, CR4.LA57,
//! LSTAR, IDTR, ...) as plain numbers ([`CpuState`], [`SyscallRegs`]).

pub mod cpu;
pub mod hex;
pub mod integrity;
pub mod kaslr;
pub mod layout;
pub mod live;
pub mod mem;
pub mod paging;
pub mod syscall;
pub mod view;

pub use cpu::{CpuState, TableRegister};
pub use integrity::{
    Baseline, BaselineError, Checker, Finding, PageRecord, RegionBaseline, ReportedLocation,
    SyscallTableBaseline, VcpuBaseline,
};
pub use kaslr::{
    decode_idt_gate, exception_handler_symbol, kaslr_slide, kaslr_slide_from_idt, read_idt_gate,
    IdtGate, KASLR_ALIGN,
};
pub use layout::{
    KernelLayout, LayoutError, SyscallTableLoc, VirtRange, LINUX_GDT_VOLATILE, MAX_SYSCALLS,
};
pub use mem::{GuestPhysMemory, PhysReadError};
pub use paging::{read_virt, translate, PageWalker, Translation, WalkError};
pub use syscall::{
    syscall_name, syscall_number, FilterError, GuestRead, ReturnPoint, SyscallEntry, SyscallFilter,
    SyscallRecord, SyscallRegs,
};
pub use vigil_events::Priority;
pub use vigil_vmm::symbols::SymbolTable;
