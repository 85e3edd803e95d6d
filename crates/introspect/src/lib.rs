//! Vigil's view of a guest from outside it: guest memory by physical and by
//! virtual address (a walk of the guest's own page tables), kernel symbols and
//! the KASLR slide.
//!
//! The crate never touches vCPU threads or KVM file descriptors: the VMM hands it
//! guest memory through [`GuestPhysMemory`] and register values (CR3, CR4.LA57,
//! LSTAR, IDTR) as plain numbers.

pub mod kaslr;
pub mod mem;
pub mod paging;

pub use kaslr::{
    decode_idt_gate, exception_handler_symbol, kaslr_slide, kaslr_slide_from_idt, read_idt_gate,
    IdtGate, KASLR_ALIGN,
};
pub use mem::{GuestPhysMemory, PhysReadError};
pub use paging::{read_virt, translate, PageWalker, Translation, WalkError};
pub use vigil_vmm::symbols::SymbolTable;
