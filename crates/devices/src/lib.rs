//! Devices of a Vigil VM and the bus that routes guest accesses to them.
//!
//! The VMM builds a [`bus::Bus`] for port I/O and one for MMIO, inserts devices at
//! fixed ranges, and forwards each vCPU exit to [`bus::Bus::read`] or
//! [`bus::Bus::write`]. Devices signal VM-wide requests (power off, reset) through a
//! [`PowerHandler`].

pub mod bus;
pub mod legacy;
pub mod pci;
pub mod persist;
pub mod rate_limiter;
pub mod virtio;

use std::sync::Arc;

/// A request from a device that concerns the whole VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PowerEvent {
    /// The guest asked to power off (ACPI S5).
    PowerOff,
    /// The guest asked to reset the machine (i8042 or ACPI reset register).
    Reset,
    /// The guest wrote a status to the debug-exit port (QEMU's `isa-debug-exit`).
    DebugExit(u32),
}

/// Where devices send [`PowerEvent`]s. Called from vCPU threads.
pub type PowerHandler = Arc<dyn Fn(PowerEvent) + Send + Sync>;

/// Guest RAM, as the VMM and every device take it: mmap'ed regions, each with a
/// dirty bitmap (one bit per 4 KiB page) that the VMM's own writes mark (vm-memory's
/// `Bytes` writes, virtio-queue's `Writer`). KVM's dirty log sees only the guest's
/// writes; the VMM's dirty-log owner merges this bitmap with it, so that a device's
/// DMA into guest memory counts as a write too.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
