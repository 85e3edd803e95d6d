//! KVM state of a VM: the VM file descriptor with its memory and irqchip, and the
//! vCPUs with their run loops, and the introspection hooks served on vCPU threads.

pub mod inspect;
pub mod pause;
pub(crate) mod threads;
pub mod vcpu;
pub mod vm;
