//! KVM state of a VM: the VM file descriptor with its memory and irqchip, and the
//! vCPUs with their run loops, the introspection hooks served on vCPU threads, and
//! the state of both saved and restored for snapshots.

pub mod inspect;
pub mod pause;
pub mod persist;
pub(crate) mod threads;
pub mod vcpu;
pub mod vm;
