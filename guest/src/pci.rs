//! virtio-pci (modern) devices on PCI bus 0: the ECAM window from the ACPI MCFG,
//! each virtio function's BAR (sized, then left where the VMM placed it) and its
//! capabilities, and its MSI-X vectors pointed at this CPU's [`TIMER_VECTOR`], so
//! that a used buffer shows up as a tick of `TIMER_TICKS` once interrupts are on.
//!
//! [`Transport`] maps the virtio-mmio register offsets the driver in `virtio.rs`
//! uses onto the virtio-pci structures, so every scenario runs over either.
//! Discovery runs at CPL0 (config space is a few dozen accesses); the driver at
//! CPL3.

use crate::cpu::TIMER_VECTOR;
use crate::virtio::{rd, wr};
use crate::{acpi, apic, paging, Machine};

const VENDOR_VIRTIO: u16 = 0x1af4;
const COMMAND: u64 = 0x04;
const COMMAND_MEMORY: u16 = 1 << 1;
const COMMAND_MASTER: u16 = 1 << 2;
const BAR0: u64 = 0x10;
const CAPABILITIES: u64 = 0x34;
const CAP_VENDOR: u8 = 0x09;
const CAP_MSIX: u8 = 0x11;
const MSIX_ENABLE: u16 = 1 << 15;

/// Where a virtio-pci function's structures are (guest-physical, in its BAR).
#[derive(Clone, Copy)]
pub(crate) struct Transport {
    /// Virtio device type (PCI device id - 0x1040).
    pub(crate) device_type: u32,
    pub(crate) common: u64,
    pub(crate) isr: u64,
    pub(crate) device: u64,
    pub(crate) notify: u64,
    pub(crate) notify_multiplier: u32,
    /// Where the BAR is, and its size as sizing read it.
    pub(crate) bar: u64,
    pub(crate) bar_size: u64,
    /// PCI device number on bus 0.
    pub(crate) slot: u8,
}

fn cfg<T: Copy>(function: u64, offset: u64) -> T {
    rd(function + offset)
}

fn set_cfg<T: Copy>(function: u64, offset: u64, value: T) {
    wr(function + offset, value)
}

/// Sizes BAR0/1 (64-bit memory) with decoding off, puts back the address the VMM
/// gave it, and turns decoding and bus mastering on: `(address, size)`.
fn size_bar(function: u64) -> (u64, u64) {
    let command: u16 = cfg(function, COMMAND);
    set_cfg(function, COMMAND, command & !COMMAND_MEMORY);
    let lo: u32 = cfg(function, BAR0);
    let hi: u32 = cfg(function, BAR0 + 4);
    set_cfg(function, BAR0, u32::MAX);
    set_cfg(function, BAR0 + 4, u32::MAX);
    let mask = (u64::from(cfg::<u32>(function, BAR0 + 4)) << 32)
        | u64::from(cfg::<u32>(function, BAR0) & !0xf);
    set_cfg(function, BAR0, lo);
    set_cfg(function, BAR0 + 4, hi);
    set_cfg(function, COMMAND, command | COMMAND_MEMORY | COMMAND_MASTER);
    let addr = (u64::from(hi) << 32) | u64::from(lo & !0xf);
    (addr, (!mask).wrapping_add(1))
}

/// The function's capabilities: its virtio structures, and its MSI-X vectors
/// pointed at the BSP's timer vector and enabled.
fn capabilities(function: u64, bar: u64, t: &mut Transport) -> bool {
    let mut at = u64::from(cfg::<u8>(function, CAPABILITIES));
    let mut found = 0u32;
    // At most 48 capabilities fit in the 192 bytes after the header.
    for _ in 0..48 {
        if at < 0x40 {
            break;
        }
        let id: u8 = cfg(function, at);
        if id == CAP_VENDOR && cfg::<u8>(function, at + 4) == 0 {
            let kind: u8 = cfg(function, at + 3);
            let addr = bar + u64::from(cfg::<u32>(function, at + 8));
            match kind {
                1 => t.common = addr,
                2 => {
                    t.notify = addr;
                    t.notify_multiplier = cfg(function, at + 16);
                }
                3 => t.isr = addr,
                4 => t.device = addr,
                _ => {}
            }
            found |= 1 << kind;
        } else if id == CAP_MSIX {
            let control: u16 = cfg(function, at + 2);
            let table = bar + u64::from(cfg::<u32>(function, at + 4) & !7);
            let message = 0xfee0_0000 | (u64::from(apic::id()) << 12);
            for v in 0..=u64::from(control & 0x7ff) {
                wr(table + 16 * v, message as u32);
                wr(table + 16 * v + 4, 0u32);
                wr(table + 16 * v + 8, u32::from(TIMER_VECTOR));
                wr(table + 16 * v + 12, 0u32);
            }
            set_cfg(function, at + 2, control | MSIX_ENABLE);
        }
        at = u64::from(cfg::<u8>(function, at + 1));
    }
    found & 0b11110 == 0b11110
}

/// At CPL0: the virtio functions on bus 0 of the MCFG's ECAM window, mapped
/// uncacheable, handed to `add` in slot order. Nothing without an MCFG.
pub(crate) fn discover(machine: &Machine, mut add: impl FnMut(Transport)) {
    let Some(ecam) = acpi::ecam_base(machine.info.rsdp) else {
        return;
    };
    if !paging::map_uncached(ecam) {
        return;
    }
    for slot in 0..32u8 {
        let function = ecam + (u64::from(slot) << 15);
        let vendor: u16 = cfg(function, 0);
        let device: u16 = cfg(function, 2);
        if vendor != VENDOR_VIRTIO || !(0x1041..0x107f).contains(&device) {
            continue;
        }
        let (bar, bar_size) = size_bar(function);
        if bar == 0 || !paging::map_uncached(bar) {
            continue;
        }
        let mut t = Transport {
            device_type: u32::from(device - 0x1040),
            common: 0,
            isr: 0,
            device: 0,
            notify: 0,
            notify_multiplier: 0,
            bar,
            bar_size,
            slot,
        };
        if capabilities(function, bar, &mut t) {
            add(t);
        }
    }
}
