//! `io-evil`: a guest probing the VMM's address map. Port I/O to every port no device
//! of Vigil's claims (a byte read, which must read 0xff, and a byte write of each),
//! MMIO to every 4 KiB page of two windows of the 32-bit hole where no device is (a
//! 32-bit read, which must read all ones, and a write of each), and an interrupt storm
//! from the serial port (its THR-empty interrupt enabled and disabled 10000 times,
//! the I/O APIC line it raises left masked). The host counts what no device claims:
//! the test compares its counts with the guest's, read between the two bytes it
//! sends. See README.md.

use core::ptr::{read_volatile, write_volatile};

use crate::cpu::{inb, outb};
use crate::introspect::wait_for_host;
use crate::paging;
use crate::serial::{Line, Out, Serial};
use crate::Machine;

/// Ports some device claims, in Vigil or in KVM's in-kernel chips: the PICs (0x20,
/// 0xa0), the PIT (0x40..0x43) and its speaker port (0x61), the i8042 (0x60..0x64),
/// the debug exit port (0xf4..0xf7), the ELCR (0x4d0), COM1, the ACPI power port
/// (0x600) and the RT timer (0x620..0x63f). Anything else is unclaimed.
const CLAIMED: [(u16, u16); 10] = [
    (0x20, 0x21),
    (0x40, 0x43),
    (0x60, 0x64),
    (0xa0, 0xa1),
    (0xf4, 0xf7),
    (0x4d0, 0x4d1),
    (0x3f8, 0x3ff),
    (0x600, 0x600),
    (0x620, 0x63f),
    // The PCI configuration ports: unclaimed in Vigil, but a write of 0xcf9 resets
    // the machine on a PC, and a host with a PCI host bridge would answer.
    (0xcf8, 0xcff),
];

/// MMIO windows with no device in Vigil's memory map: the start of the 32-bit hole
/// (below the virtio-mmio devices at 0xd0000000) and the page range between the
/// I/O APIC and the local APIC.
const WINDOWS: [(u64, u64); 2] = [(0xc000_0000, 0xc100_0000), (0xfed0_0000, 0xfee0_0000)];
const PAGE: u64 = 4096;
const COM1_IER: u16 = 0x3f9;
const IER_THRE: u8 = 0x02;
const IRQ_TOGGLES: u64 = 10_000;

fn claimed(port: u16) -> bool {
    CLAIMED.iter().any(|&(lo, hi)| (lo..=hi).contains(&port))
}

pub fn io_evil(machine: &Machine, detail: &mut Line) -> bool {
    Serial.str("io-evil: ready\n");
    if !wait_for_host(machine) {
        detail.str("no go from the host");
        return false;
    }
    let (mut pio, mut pio_ones) = (0u64, 0u64);
    for port in 0..=u16::MAX {
        if claimed(port) {
            continue;
        }
        pio_ones += u64::from(inb(port) == 0xff);
        outb(port, 0);
        pio += 2;
    }
    let (mut mmio, mut mmio_ones) = (0u64, 0u64);
    for (start, end) in WINDOWS {
        let mut page = start;
        while page < end {
            if !paging::map_uncached(page) {
                detail.str("cannot map 0x").hex(page);
                return false;
            }
            // SAFETY: guest-physical addresses with no RAM and no device behind them,
            // identity-mapped uncacheable; each access exits to the VMM.
            unsafe {
                mmio_ones += u64::from(read_volatile(page as *const u32) == u32::MAX);
                write_volatile(page as *mut u32, 0x6576_696c);
            }
            mmio += 2;
            page += PAGE;
        }
    }
    let ier = inb(COM1_IER);
    for i in 0..IRQ_TOGGLES {
        outb(COM1_IER, if i % 2 == 0 { IER_THRE } else { 0 });
    }
    outb(COM1_IER, ier);
    detail
        .str("pio=")
        .dec(pio)
        .str(" pio_ones=")
        .dec(pio_ones)
        .str(" mmio=")
        .dec(mmio)
        .str(" mmio_ones=")
        .dec(mmio_ones)
        .str(" irq_toggles=")
        .dec(IRQ_TOGGLES);
    // The host reads its counters now, then lets the scenario end.
    Serial.str("io-evil: done ").bytes(detail.as_bytes()).str("\n");
    if !wait_for_host(machine) {
        detail.str(" (no second go from the host)");
        return false;
    }
    // Every read of nothing must read as nothing (all ones).
    pio_ones * 2 == pio && mmio_ones * 2 == mmio
}
