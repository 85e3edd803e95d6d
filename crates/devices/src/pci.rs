//! A PCI root complex for one bus (segment 0, bus 0, 32 slots, function 0 each):
//! its ECAM configuration window, the memory window its functions' BARs sit in,
//! the host bridge in slot 0, and the type-0 configuration header every function
//! builds on ([`ConfigSpace`]: read-only and writable bits, one 64-bit memory BAR
//! that the guest may size and move, a capability list).
//!
//! The guest is hostile: any value it writes lands only in the bits a register
//! defines as writable, a BAR moved outside the window is not reached (and is
//! logged), and an access the header does not define reads as zero.

use std::sync::{Arc, Mutex};

use crate::bus::BusDevice;

/// Slots on the bus (device numbers 0 to 31).
pub const SLOTS: usize = 32;
/// ECAM bytes per bus: 32 devices x 8 functions x 4 KiB.
pub const ECAM_BUS_SIZE: u64 = (SLOTS as u64) * 8 * 4096;
/// Bytes of configuration space Vigil decodes per function (the rest of the 4 KiB
/// of extended space reads as zero).
pub const CONFIG_SIZE: usize = 256;

/// Configuration header offsets (PCI Local Bus 3.0, 6.1).
pub mod reg {
    pub const VENDOR_ID: usize = 0x00;
    pub const COMMAND: usize = 0x04;
    pub const STATUS: usize = 0x06;
    pub const REVISION: usize = 0x08;
    pub const CLASS: usize = 0x09;
    pub const HEADER_TYPE: usize = 0x0e;
    pub const BAR0: usize = 0x10;
    pub const SUBSYSTEM_VENDOR_ID: usize = 0x2c;
    pub const CAPABILITIES: usize = 0x34;
    pub const INTERRUPT_PIN: usize = 0x3d;
}

/// Command register: memory space decoding.
pub const COMMAND_MEMORY: u16 = 1 << 1;
/// Command register: the function may master the bus (DMA, MSI writes).
const COMMAND_BUS_MASTER: u16 = 1 << 2;
/// Command register: legacy INTx disabled.
const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// Status register: the function has a capability list.
const STATUS_CAP_LIST: u16 = 1 << 4;
/// BAR type bits: 64-bit memory, not prefetchable.
const BAR_MEM64: u32 = 0b100;

/// A function's identity in its header.
#[derive(Clone, Copy, Debug)]
pub struct Identity {
    pub vendor: u16,
    pub device: u16,
    pub revision: u8,
    /// Base class, subclass, programming interface.
    pub class: [u8; 3],
    pub subsystem_vendor: u16,
    pub subsystem: u16,
}

/// A type-0 configuration header with at most one BAR (BAR0/1, 64-bit memory).
pub struct ConfigSpace {
    bytes: [u8; CONFIG_SIZE],
    /// The bits of each byte the guest may change.
    writable: [u8; CONFIG_SIZE],
    /// Size of BAR0 (a power of two, at least 4 KiB), 0 without one.
    bar_size: u64,
    /// Where the last capability ends (the next one goes here).
    next_cap: usize,
    /// The last capability's `next` byte, to link the next one.
    last_link: usize,
}

impl ConfigSpace {
    /// A header for `id`, with a 64-bit memory BAR0 of `bar_size` bytes at
    /// `bar_addr` when `bar_size` is not zero.
    pub fn new(id: Identity, bar_size: u64, bar_addr: u64) -> Self {
        debug_assert!(bar_size == 0 || (bar_size.is_power_of_two() && bar_size >= 4096));
        let mut c = Self {
            bytes: [0; CONFIG_SIZE],
            writable: [0; CONFIG_SIZE],
            bar_size,
            next_cap: 0x40,
            last_link: reg::CAPABILITIES,
        };
        c.put(reg::VENDOR_ID, &id.vendor.to_le_bytes());
        c.put(reg::VENDOR_ID + 2, &id.device.to_le_bytes());
        c.put(reg::REVISION, &[id.revision]);
        c.put(reg::CLASS, &[id.class[2], id.class[1], id.class[0]]);
        c.put(reg::SUBSYSTEM_VENDOR_ID, &id.subsystem_vendor.to_le_bytes());
        c.put(reg::SUBSYSTEM_VENDOR_ID + 2, &id.subsystem.to_le_bytes());
        let command = COMMAND_MEMORY | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE;
        c.allow(reg::COMMAND, &command.to_le_bytes());
        if bar_size != 0 {
            let mask = !(bar_size - 1);
            c.put(reg::BAR0, &(bar_addr as u32 | BAR_MEM64).to_le_bytes());
            c.put(reg::BAR0 + 4, &((bar_addr >> 32) as u32).to_le_bytes());
            c.allow(reg::BAR0, &(mask as u32).to_le_bytes());
            c.allow(reg::BAR0 + 4, &((mask >> 32) as u32).to_le_bytes());
        }
        c
    }

    fn put(&mut self, offset: usize, value: &[u8]) {
        self.bytes[offset..offset + value.len()].copy_from_slice(value);
    }

    /// Lets the guest change the bits of `mask` from `offset` on.
    fn allow(&mut self, offset: usize, mask: &[u8]) {
        self.writable[offset..offset + mask.len()].copy_from_slice(mask);
    }

    /// Appends capability `id` with `body` (the bytes after its id and next
    /// pointer), of which the guest may change the bits of `writable`. Returns the
    /// capability's offset.
    pub fn add_capability(&mut self, id: u8, body: &[u8], writable: &[u8]) -> usize {
        let at = self.next_cap;
        self.put(at, &[id, 0]);
        self.put(at + 2, body);
        self.allow(at + 2, writable);
        self.bytes[self.last_link] = at as u8;
        self.last_link = at + 1;
        self.next_cap = (at + 2 + body.len() + 3) & !3;
        debug_assert!(self.next_cap <= CONFIG_SIZE);
        let status = u16::from_le_bytes([self.bytes[reg::STATUS], self.bytes[reg::STATUS + 1]]);
        self.put(reg::STATUS, &(status | STATUS_CAP_LIST).to_le_bytes());
        at
    }

    /// Reads `data.len()` bytes at `offset` (zero past what is decoded).
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.bytes.get(offset + i).copied().unwrap_or(0);
        }
    }

    /// Writes `data` at `offset`: only writable bits change.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        for (i, &v) in data.iter().enumerate() {
            let at = offset + i;
            if at >= CONFIG_SIZE {
                return;
            }
            let mask = self.writable[at];
            self.bytes[at] = (self.bytes[at] & !mask) | (v & mask);
        }
    }

    /// INTA on I/O APIC line `gsi` (the interrupt line register, which the guest
    /// may overwrite: it is the OS's scratch byte).
    pub fn set_interrupt(&mut self, gsi: u32) {
        self.put(reg::INTERRUPT_PIN - 1, &[gsi as u8, 1]);
        self.allow(reg::INTERRUPT_PIN - 1, &[0xff]);
    }

    /// A 16-bit register.
    pub fn u16_at(&self, offset: usize) -> u16 {
        u16::from_le_bytes([self.bytes[offset], self.bytes[offset + 1]])
    }

    /// Where BAR0 is while memory decoding is on: `(address, size)`.
    pub fn bar(&self) -> Option<(u64, u64)> {
        if self.bar_size == 0 || self.u16_at(reg::COMMAND) & COMMAND_MEMORY == 0 {
            return None;
        }
        let mut lo = [0u8; 4];
        let mut hi = [0u8; 4];
        self.read(reg::BAR0, &mut lo);
        self.read(reg::BAR0 + 4, &mut hi);
        let addr =
            (u64::from(u32::from_le_bytes(hi)) << 32) | u64::from(u32::from_le_bytes(lo) & !0xf);
        Some((addr, self.bar_size))
    }
}

/// A function on the bus: its configuration space and its BAR.
pub trait PciFunction: Send {
    /// Reads configuration space at `offset` (below 4096).
    fn config_read(&mut self, offset: usize, data: &mut [u8]);
    /// Writes configuration space at `offset` (below 4096).
    fn config_write(&mut self, offset: usize, data: &[u8]);
    /// Where its BAR answers now (`None` while memory decoding is off).
    fn bar(&self) -> Option<(u64, u64)>;
    /// Reads its BAR at `offset`.
    fn bar_read(&mut self, offset: u64, data: &mut [u8]);
    /// Writes its BAR at `offset`.
    fn bar_write(&mut self, offset: u64, data: &[u8]);
}

/// Slot 0: the host bridge (class 06 00 00), no BAR.
pub struct HostBridge(ConfigSpace);

impl Default for HostBridge {
    fn default() -> Self {
        Self(ConfigSpace::new(
            Identity {
                // Red Hat's QEMU PCIe host bridge id, which guests know to need no driver.
                vendor: 0x1b36,
                device: 0x0008,
                revision: 0,
                class: [0x06, 0x00, 0x00],
                subsystem_vendor: 0,
                subsystem: 0,
            },
            0,
            0,
        ))
    }
}

impl PciFunction for HostBridge {
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        self.0.read(offset, data);
    }
    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.0.write(offset, data);
    }
    fn bar(&self) -> Option<(u64, u64)> {
        None
    }
    fn bar_read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn bar_write(&mut self, _offset: u64, _data: &[u8]) {}
}

/// A shared function on the bus.
pub type SharedFunction = Arc<Mutex<dyn PciFunction>>;

/// The functions of bus 0, by slot; fixed once the VM is built.
pub struct PciBus {
    slots: Vec<SharedFunction>,
}

impl Default for PciBus {
    fn default() -> Self {
        Self::new()
    }
}

impl PciBus {
    /// A bus with the host bridge in slot 0.
    pub fn new() -> Self {
        Self {
            slots: vec![Arc::new(Mutex::new(HostBridge::default()))],
        }
    }

    /// The slot the next function takes, `None` when the bus is full.
    pub fn next_slot(&self) -> Option<usize> {
        (self.slots.len() < SLOTS).then_some(self.slots.len())
    }

    /// Puts `function` in the next slot; returns the slot (`None`: the bus is full).
    pub fn add(&mut self, function: SharedFunction) -> Option<usize> {
        let slot = self.next_slot()?;
        self.slots.push(function);
        Some(slot)
    }

    fn lock(f: &SharedFunction) -> std::sync::MutexGuard<'_, dyn PciFunction + 'static> {
        f.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The ECAM window of bus 0 ([`ECAM_BUS_SIZE`] bytes): offset = device << 15 |
/// function << 12 | register. Absent devices and functions read as all-ones.
pub struct EcamWindow(pub Arc<PciBus>);

impl EcamWindow {
    fn function(&self, offset: u64) -> Option<(&SharedFunction, usize)> {
        let device = (offset >> 15) as usize;
        let function = (offset >> 12) & 7;
        let register = (offset & 0xfff) as usize;
        match self.0.slots.get(device) {
            Some(f) if function == 0 => Some((f, register)),
            _ => None,
        }
    }
}

/// Whether a configuration access is naturally aligned and 1, 2 or 4 bytes wide.
fn config_access_ok(offset: u64, len: usize) -> bool {
    matches!(len, 1 | 2 | 4) && offset & (len as u64 - 1) == 0
}

impl BusDevice for EcamWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        if !config_access_ok(offset, data.len()) {
            tracing::debug!(offset, len = data.len(), "unaligned PCI config read");
            return;
        }
        if let Some((f, register)) = self.function(offset) {
            PciBus::lock(f).config_read(register, data);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if !config_access_ok(offset, data.len()) {
            tracing::debug!(
                offset,
                len = data.len(),
                "unaligned PCI config write; ignored"
            );
            return;
        }
        if let Some((f, register)) = self.function(offset) {
            PciBus::lock(f).config_write(register, data);
        }
    }
}

/// The memory window the BARs sit in: an access goes to the function whose BAR
/// covers it, where the guest placed it.
pub struct BarWindow {
    pub bus: Arc<PciBus>,
    /// Guest address of the window's start.
    pub base: u64,
}

impl BarWindow {
    fn find(&self, offset: u64, len: usize) -> Option<(&SharedFunction, u64)> {
        let addr = self.base.checked_add(offset)?;
        let end = addr.checked_add(len as u64)?;
        self.bus.slots.iter().find_map(|f| {
            let (bar, size) = PciBus::lock(f).bar()?;
            (addr >= bar && end <= bar.saturating_add(size)).then(|| (f, addr - bar))
        })
    }
}

impl BusDevice for BarWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match self.find(offset, data.len()) {
            Some((f, at)) => PciBus::lock(f).bar_read(at, data),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some((f, at)) = self.find(offset, data.len()) {
            PciBus::lock(f).bar_write(at, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> Identity {
        Identity {
            vendor: 0x1af4,
            device: 0x1042,
            revision: 1,
            class: [0x01, 0x80, 0x00],
            subsystem_vendor: 0x1af4,
            subsystem: 0x40,
        }
    }

    fn word(c: &ConfigSpace, at: usize) -> u32 {
        let mut b = [0u8; 4];
        c.read(at, &mut b);
        u32::from_le_bytes(b)
    }

    /// The guest sizes the BAR by writing all-ones, reads the size back, moves it.
    #[test]
    fn a_bar_is_sized_and_moved_by_the_guest() {
        let mut c = ConfigSpace::new(id(), 0x8000, 0xc000_0000);
        assert_eq!(word(&c, 0), 0x1042_1af4);
        assert_eq!(word(&c, reg::BAR0), 0xc000_0004);
        assert_eq!(c.bar(), None, "memory decoding starts off");
        c.write(reg::COMMAND, &COMMAND_MEMORY.to_le_bytes());
        assert_eq!(c.bar(), Some((0xc000_0000, 0x8000)));
        c.write(reg::BAR0, &[0xff; 4]);
        c.write(reg::BAR0 + 4, &[0xff; 4]);
        assert_eq!(word(&c, reg::BAR0), 0xffff_8004, "size 32 KiB, 64-bit");
        assert_eq!(word(&c, reg::BAR0 + 4), 0xffff_ffff);
        c.write(reg::BAR0, &0xc001_0000u32.to_le_bytes());
        c.write(reg::BAR0 + 4, &0u32.to_le_bytes());
        assert_eq!(c.bar(), Some((0xc001_0000, 0x8000)));
        // Low bits of an address are not writable: the BAR stays aligned.
        c.write(reg::BAR0, &0xc001_1234u32.to_le_bytes());
        assert_eq!(c.bar(), Some((0xc001_0000, 0x8000)));
    }

    /// Read-only registers keep their value whatever the guest writes.
    #[test]
    fn read_only_registers_ignore_writes() {
        let mut c = ConfigSpace::new(id(), 0x8000, 0xc000_0000);
        let cap = c.add_capability(0x09, &[16, 1, 0, 0], &[0, 0, 0, 0]);
        assert_eq!(cap, 0x40);
        for at in (0..CONFIG_SIZE).step_by(4) {
            if at != reg::COMMAND && at != reg::BAR0 && at != reg::BAR0 + 4 {
                let before = word(&c, at);
                c.write(at, &[0xa5; 4]);
                assert_eq!(word(&c, at), before, "register {at:#x}");
            }
        }
        assert_eq!(c.bytes[reg::CAPABILITIES], 0x40);
        assert_ne!(c.u16_at(reg::STATUS) & STATUS_CAP_LIST, 0);
        let mut far = [0u8; 4];
        c.read(0x800, &mut far);
        assert_eq!(far, [0; 4]);
        c.write(0xffe, &[1, 2]);
    }

    /// ECAM finds the host bridge in slot 0 and nothing elsewhere.
    #[test]
    fn ecam_reaches_slots_and_empty_ones_read_all_ones() {
        let mut ecam = EcamWindow(Arc::new(PciBus::new()));
        let mut b = [0u8; 4];
        ecam.read(0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x0008_1b36);
        ecam.read(1 << 15, &mut b);
        assert_eq!(b, [0xff; 4]);
        ecam.read(1 << 12, &mut b);
        assert_eq!(b, [0xff; 4], "function 1");
        ecam.read(2, &mut b);
        assert_eq!(b, [0xff; 4], "unaligned");
        ecam.write(ECAM_BUS_SIZE - 4, &[0; 4]);
    }
}
