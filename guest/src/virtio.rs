//! virtio 1.x ("modern") devices: discovery from the command line (virtio-mmio)
//! and of PCI bus 0 (virtio-pci, `pci.rs`), a polled split-virtqueue driver that
//! speaks virtio-mmio registers ([`Dev`] maps them onto virtio-pci structures for
//! a PCI device), and the scenarios `blk`, `blk-ro`, `rng`, `virtio-evil` and
//! `pci`.
//!
//! Only the discovery (parsing `virtio_mmio.device=` words, enumerating PCI,
//! mapping the MMIO pages uncacheable) runs at CPL0. Everything else, device set-up included, runs at CPL3
//! (`cpu::run_user`), where this platform executes natively: MMIO, rdtsc and the ring
//! memory need no privilege. One device, one queue (0) and one request at a time
//! (`blk-bench`: up to `blk_qd=` at once, with event indices when offered); no
//! interrupts are taken: completions are polled in the used ring, and InterruptStatus is
//! checked and acknowledged after each (after each batch in `blk-bench`).
//!
//! Devices with several queues (`net`, `vsock`, in their own files) use the same
//! pieces: [`negotiate`], then [`setup_queue`] for each queue with its rings at
//! [`ring`], [`Queue::push_avail`] / [`Queue::notify`] and [`Queue::take_used`].

use core::arch::global_asm;
use core::ptr::{addr_of, read_volatile, write_volatile};
use core::sync::atomic::{compiler_fence, fence, Ordering};

use crate::cpu::{self, rdtsc};
use crate::serial::{Line, Out, Serial};
use crate::{paging, pci, Machine};

const MAX_DEVICES: usize = 16;

// Registers (virtio 1.x MMIO transport).
const MAGIC: u64 = 0x000;
const VERSION: u64 = 0x004;
const DEVICE_ID: u64 = 0x008;
const DEVICE_FEATURES: u64 = 0x010;
const DEVICE_FEATURES_SEL: u64 = 0x014;
const DRIVER_FEATURES: u64 = 0x020;
const DRIVER_FEATURES_SEL: u64 = 0x024;
const QUEUE_SEL: u64 = 0x030;
const QUEUE_NUM_MAX: u64 = 0x034;
const QUEUE_NUM: u64 = 0x038;
const QUEUE_READY: u64 = 0x044;
const QUEUE_NOTIFY: u64 = 0x050;
const INTERRUPT_STATUS: u64 = 0x060;
const INTERRUPT_ACK: u64 = 0x064;
const STATUS: u64 = 0x070;
const QUEUE_DESC: u64 = 0x080;
const QUEUE_DRIVER: u64 = 0x090;
const QUEUE_DEVICE: u64 = 0x0a0;
const CONFIG_GENERATION: u64 = 0x0fc;
pub(crate) const CONFIG: u64 = 0x100;

const MAGIC_VALUE: u32 = 0x7472_6976;

// Device status bits.
const ACKNOWLEDGE: u32 = 1;
const DRIVER: u32 = 2;
const DRIVER_OK: u32 = 4;
const FEATURES_OK: u32 = 8;
const NEEDS_RESET: u32 = 0x40;

const F_VERSION_1: u64 = 1 << 32;

const ID_BLK: u32 = 2;
const ID_RNG: u32 = 4;
const BLK_F_RO: u64 = 1 << 5;
const BLK_F_FLUSH: u64 = 1 << 9;
const BLK_T_IN: u32 = 0;
const BLK_T_OUT: u32 = 1;
const BLK_T_FLUSH: u32 = 4;
const BLK_T_GET_ID: u32 = 8;
const BLK_S_OK: u8 = 0;
const BLK_S_IOERR: u8 = 1;
const SECTOR: u32 = 512;

// Descriptor flags.
pub(crate) const NEXT: u16 = 1;
pub(crate) const WRITE: u16 = 2;

/// Entries of queue 0 (fewer when the device offers fewer).
const QUEUE_SIZE: u32 = 16;

// The DMA area (`.dma`, page-aligned, identity-mapped below 4 GiB: guest-physical ==
// virtual): descriptor table, avail ring, used ring, one page each; a page of small
// buffers (request header, status byte, GET_ID buffer, entropy buffers); two 4 KiB data
// buffers (write, read); then the rings and buffers of several queues and devices.
const DESC: u64 = 0x0000;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
const HEADER: u64 = 0x3000;
const STATUS_BYTE: u64 = 0x3010;
const ID_BUF: u64 = 0x3020;
const ID_LEN: u32 = 20;
const RNG_BUF: u64 = 0x3100;
const RNG_LEN: u32 = 64;
const WRITE_BUF: u64 = 0x4000;
const READ_BUF: u64 = 0x5000;
const DATA_LEN: u32 = 4096;
/// Rings of queues 1 and 2 (three pages each), then four pages of buffers for the
/// multi-queue scenarios.
const RINGS_1: u64 = 0x6000;
/// Buffers of the `net` and `vsock` scenarios (16 KiB).
pub(crate) const MQ_BUF: u64 = 0xc000;
pub(crate) const MQ_BUF_LEN: u64 = 0x4000;
/// Rings of queue 0 of a second device (three pages): the `mobility` scenario's
/// disk, beside a vsock device whose queue 0 has the first rings.
pub(crate) const RINGS_SECOND: u64 = 0x10000;

global_asm!(
    r#"
    .section .dma, "aw", @nobits
    .balign 4096
    .skip 65536
    .global VIRTIO_STACK_TOP
VIRTIO_STACK_TOP:
    .global VIRTIO_DMA
VIRTIO_DMA:
    .skip 4096 * 19
    "#,
    options(att_syntax)
);

extern "C" {
    static VIRTIO_STACK_TOP: u8;
    static VIRTIO_DMA: u8;
}

pub(crate) fn dma(offset: u64) -> u64 {
    addr_of!(VIRTIO_DMA) as u64 + offset
}

pub(crate) fn rd<T: Copy>(addr: u64) -> T {
    // SAFETY: only DMA-area and MMIO addresses are passed, identity-mapped.
    unsafe { read_volatile(addr as *const T) }
}

pub(crate) fn wr<T: Copy>(addr: u64, value: T) {
    // SAFETY: as for rd.
    unsafe { write_volatile(addr as *mut T, value) }
}

pub(crate) fn zero(addr: u64, len: usize) {
    // SAFETY: a range of the DMA area.
    unsafe { core::ptr::write_bytes(addr as *mut u8, 0, len) }
}

/// The devices of the `virtio_mmio.device=` words of the command line, then
/// those on PCI, mapped uncacheable.
pub(crate) struct Devices {
    devs: [Dev; MAX_DEVICES],
    count: usize,
}

impl Devices {
    fn all(&self) -> &[Dev] {
        &self.devs[..self.count]
    }

    fn push(&mut self, dev: Dev) {
        if self.count < MAX_DEVICES {
            self.devs[self.count] = dev;
            self.count += 1;
        }
    }
}

/// A number as C's `%lli` reads it: `0x` hex, leading `0` octal, else decimal. Returns
/// it and the rest of the input.
fn number(s: &[u8]) -> Option<(u64, &[u8])> {
    let (radix, digits) = match s {
        [b'0', b'x' | b'X', rest @ ..] => (16, rest),
        [b'0', rest @ ..] if !rest.is_empty() && rest[0].is_ascii_digit() => (8, rest),
        _ => (10, s),
    };
    let mut value = 0u64;
    let mut used = 0;
    for &c in digits {
        let digit = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            b'A'..=b'F' => c - b'A' + 10,
            _ => break,
        };
        if u32::from(digit) >= radix {
            break;
        }
        value = value
            .checked_mul(u64::from(radix))?
            .checked_add(u64::from(digit))?;
        used += 1;
    }
    (used > 0).then(|| (value, &digits[used..]))
}

/// `<size>@<base>:<irq>[:<id>]` (Linux's syntax; the size takes K/M/G suffixes):
/// the base, when the size is non-zero.
fn parse_device(word: &[u8]) -> Option<u64> {
    let (mut size, mut rest) = number(word)?;
    if let [suffix, tail @ ..] = rest {
        let shift = match suffix {
            b'k' | b'K' => 10,
            b'm' | b'M' => 20,
            b'g' | b'G' => 30,
            _ => 0,
        };
        if shift != 0 {
            size <<= shift;
            rest = tail;
        }
    }
    let (base, rest) = number(rest.strip_prefix(b"@")?)?;
    let (_irq, _) = number(rest.strip_prefix(b":")?)?;
    (size != 0).then_some(base)
}

/// At CPL0: the devices of the command line, their pages mapped uncacheable.
fn discover(machine: &Machine) -> Devices {
    let mut devices = Devices {
        devs: [Dev { base: 0, pci: None }; MAX_DEVICES],
        count: 0,
    };
    for word in machine.info.cmdline().split(|&b| b == b' ') {
        let Some(spec) = word.strip_prefix(b"virtio_mmio.device=") else {
            continue;
        };
        if let Some(base) = parse_device(spec) {
            if devices.count < MAX_DEVICES && paging::map_uncached(base) {
                devices.push(Dev { base, pci: None });
            }
        }
    }
    pci::discover(machine, |t| {
        devices.push(Dev {
            base: t.bar,
            pci: Some(t),
        })
    });
    devices
}

/// TSC ticks per millisecond.
#[derive(Clone, Copy)]
pub(crate) struct Clock {
    tsc_khz: u64,
}

impl Clock {
    pub(crate) fn ms(self, ms: u64) -> u64 {
        self.tsc_khz * ms
    }
}

/// A device, driven through virtio-mmio register offsets: at `base` for a
/// virtio-mmio device, mapped onto the virtio-pci structures for a PCI one.
#[derive(Clone, Copy)]
pub(crate) struct Dev {
    base: u64,
    pci: Option<pci::Transport>,
}

impl Dev {
    pub(crate) fn read(self, reg: u64) -> u32 {
        let Some(t) = self.pci else {
            return rd(self.base + reg);
        };
        match reg {
            MAGIC => MAGIC_VALUE,
            VERSION => 2,
            DEVICE_ID => t.device_type,
            DEVICE_FEATURES => rd(t.common + 0x04),
            QUEUE_NUM_MAX => u32::from(rd::<u16>(t.common + 0x18)),
            QUEUE_READY => u32::from(rd::<u16>(t.common + 0x1c)),
            // Reading the ISR acknowledges it.
            INTERRUPT_STATUS => u32::from(rd::<u8>(t.isr)),
            STATUS => u32::from(rd::<u8>(t.common + 0x14)),
            CONFIG_GENERATION => u32::from(rd::<u8>(t.common + 0x15)),
            r if r >= CONFIG => rd(t.device + r - CONFIG),
            _ => 0,
        }
    }

    /// Byte `offset` of the device configuration space.
    pub(crate) fn config_u8(self, offset: u64) -> u8 {
        match self.pci {
            Some(t) => rd(t.device + offset),
            None => rd(self.base + CONFIG + offset),
        }
    }

    pub(crate) fn write(self, reg: u64, value: u32) {
        let Some(t) = self.pci else {
            return wr(self.base + reg, value);
        };
        let c = t.common;
        match reg {
            DEVICE_FEATURES_SEL => wr(c, value),
            DRIVER_FEATURES_SEL => wr(c + 0x08, value),
            DRIVER_FEATURES => wr(c + 0x0c, value),
            QUEUE_SEL => wr(c + 0x16, value as u16),
            QUEUE_NUM => wr(c + 0x18, value as u16),
            QUEUE_READY => wr(c + 0x1c, value as u16),
            // The queue's notify_off is its index (checked at set-up).
            QUEUE_NOTIFY => wr(
                t.notify + u64::from(value) * u64::from(t.notify_multiplier),
                value as u16,
            ),
            STATUS => wr(c + 0x14, value as u8),
            QUEUE_DESC | 0x084 => wr(c + 0x20 + (reg - QUEUE_DESC), value),
            QUEUE_DRIVER | 0x094 => wr(c + 0x28 + (reg - QUEUE_DRIVER), value),
            QUEUE_DEVICE | 0x0a4 => wr(c + 0x30 + (reg - QUEUE_DEVICE), value),
            r if r >= CONFIG => wr(t.device + r - CONFIG, value),
            // INTERRUPT_ACK: reading the ISR did it.
            _ => {}
        }
    }

    /// On PCI: points queue `index`'s MSI-X vector at vector `index + 1` (the
    /// BSP's timer vector, as `pci.rs` set every vector up), and checks that its
    /// notification register is where [`Self::write`] notifies it.
    fn pci_queue(self, index: u16) -> Result<(), &'static str> {
        let Some(t) = self.pci else {
            return Ok(());
        };
        if rd::<u16>(t.common + 0x1e) != index {
            return Err("queue_notify_off is not the queue index");
        }
        wr(t.common + 0x1a, index + 1);
        if rd::<u16>(t.common + 0x1a) != index + 1 {
            return Err("MSI-X vector for the queue refused");
        }
        Ok(())
    }

    fn status(self) -> u32 {
        self.read(STATUS)
    }

    fn add_status(self, bits: u32) {
        self.write(STATUS, self.status() | bits)
    }

    /// Writes 0 to Status and waits (up to 100 ms) until it reads back 0.
    pub(crate) fn reset(self, clock: Clock) -> Result<(), &'static str> {
        self.write(STATUS, 0);
        let start = rdtsc();
        while self.status() != 0 {
            if rdtsc() - start > clock.ms(100) {
                return Err("reset: status stays non-zero");
            }
        }
        Ok(())
    }

    fn device_features(self) -> u64 {
        self.write(DEVICE_FEATURES_SEL, 0);
        let low = self.read(DEVICE_FEATURES);
        self.write(DEVICE_FEATURES_SEL, 1);
        let high = self.read(DEVICE_FEATURES);
        (u64::from(high) << 32) | u64::from(low)
    }

    /// Reset, ACKNOWLEDGE | DRIVER, the device features, reset again.
    fn probe_features(self, clock: Clock) -> u64 {
        if self.reset(clock).is_err() {
            return 0;
        }
        self.write(STATUS, ACKNOWLEDGE);
        self.write(STATUS, ACKNOWLEDGE | DRIVER);
        let features = self.device_features();
        let _ = self.reset(clock);
        features
    }

    /// A 64-bit config field, read as two 32-bit halves under the config generation.
    pub(crate) fn config_u64(self, offset: u64) -> u64 {
        let mut value = 0;
        for _ in 0..16 {
            let generation = self.read(CONFIG_GENERATION);
            let low = self.read(CONFIG + offset);
            let high = self.read(CONFIG + offset + 4);
            value = (u64::from(high) << 32) | u64::from(low);
            if self.read(CONFIG_GENERATION) == generation {
                break;
            }
        }
        value
    }
}

/// The first device with `id` whose features satisfy `wanted` (any version: a legacy
/// device is reported, not skipped).
pub(crate) fn find(
    devices: &Devices,
    clock: Clock,
    id: u32,
    wanted: impl Fn(u64) -> bool,
) -> Option<Dev> {
    devices
        .all()
        .iter()
        .copied()
        .filter(|dev| dev.read(MAGIC) == MAGIC_VALUE && dev.read(DEVICE_ID) == id)
        .find(|dev| wanted(dev.probe_features(clock)))
}

/// `found=<base>:<device id>,...` for a FAIL detail.
pub(crate) fn list_devices(devices: &Devices, detail: &mut Line) {
    detail.str(" found=");
    if devices.all().is_empty() {
        detail.str("none");
    }
    let mut first = true;
    for &dev in devices.all() {
        if !first {
            detail.str(",");
        }
        first = false;
        if dev.pci.is_some() {
            detail.str("pci@");
        }
        detail.hex(dev.base).str(":");
        if dev.read(MAGIC) == MAGIC_VALUE {
            detail.dec(u64::from(dev.read(DEVICE_ID)));
        } else {
            detail.str("none");
        }
    }
}

/// Version 2 (virtio 1.x); version 1 is the legacy transport this driver does not do.
fn modern(dev: Dev) -> Result<(), &'static str> {
    match dev.read(VERSION) {
        2 => Ok(()),
        1 => Err("legacy virtio-mmio"),
        _ => Err("unknown virtio-mmio version"),
    }
}

enum Wait {
    /// The device used the chain; the used element's length.
    Used(u32),
    /// The device set DEVICE_NEEDS_RESET.
    NeedsReset,
    Timeout,
}

/// One queue of a set-up device, its rings in the three pages at `ring`.
pub(crate) struct Queue {
    dev: Dev,
    clock: Clock,
    index: u16,
    ring: u64,
    size: u16,
    avail: u16,
    used: u16,
    features: u64,
}

/// Where the rings of queue `index` (0 to 3) live: three pages each. Queue 3 (the
/// balloon's reporting queue after its statistics queue) takes the pages of the
/// single-queue scenarios' buffers, which multi-queue scenarios leave alone.
pub(crate) fn ring(index: u16) -> u64 {
    match index {
        0 => dma(DESC),
        3 => dma(HEADER),
        n => dma(RINGS_1 + u64::from(n - 1) * 0x3000),
    }
}

/// Brings `dev` up to FEATURES_OK with VIRTIO_F_VERSION_1 and the offered part of
/// `features`, sets up queue 0, and sets DRIVER_OK when `driver_ok`.
fn setup(dev: Dev, clock: Clock, features: u64, driver_ok: bool) -> Result<Queue, &'static str> {
    let accepted = negotiate(dev, clock, features)?;
    let q = setup_queue(dev, clock, 0, accepted)?;
    if driver_ok {
        dev.add_status(DRIVER_OK);
    }
    if dev.status() & NEEDS_RESET != 0 {
        return Err("DEVICE_NEEDS_RESET after set-up");
    }
    Ok(q)
}

/// Sets DRIVER_OK once the queues are set up.
pub(crate) fn driver_ok(dev: Dev) -> Result<(), &'static str> {
    dev.add_status(DRIVER_OK);
    if dev.status() & NEEDS_RESET != 0 {
        return Err("DEVICE_NEEDS_RESET after set-up");
    }
    Ok(())
}

/// Reset, ACKNOWLEDGE | DRIVER, VIRTIO_F_VERSION_1 and the offered part of
/// `features` accepted, FEATURES_OK: the accepted features.
pub(crate) fn negotiate(dev: Dev, clock: Clock, features: u64) -> Result<u64, &'static str> {
    modern(dev)?;
    dev.reset(clock)?;
    dev.write(STATUS, ACKNOWLEDGE);
    dev.write(STATUS, ACKNOWLEDGE | DRIVER);
    let offered = dev.device_features();
    if offered & F_VERSION_1 == 0 {
        return Err("no VIRTIO_F_VERSION_1");
    }
    let accepted = offered & (features | F_VERSION_1);
    dev.write(DRIVER_FEATURES_SEL, 0);
    dev.write(DRIVER_FEATURES, accepted as u32);
    dev.write(DRIVER_FEATURES_SEL, 1);
    dev.write(DRIVER_FEATURES, (accepted >> 32) as u32);
    dev.add_status(FEATURES_OK);
    if dev.status() & FEATURES_OK == 0 {
        return Err("FEATURES_OK not accepted");
    }
    Ok(accepted)
}

/// Sets up queue `index` (rings at [`ring`]) on a device at FEATURES_OK.
pub(crate) fn setup_queue(
    dev: Dev,
    clock: Clock,
    index: u16,
    features: u64,
) -> Result<Queue, &'static str> {
    setup_queue_at(dev, clock, index, features, ring(index), QUEUE_SIZE)
}

/// [`setup_queue`] with the rings in the three pages at `base`, at most `entries`
/// entries (256 at most: three pages hold its rings).
pub(crate) fn setup_queue_at(
    dev: Dev,
    clock: Clock,
    index: u16,
    features: u64,
    base: u64,
    entries: u32,
) -> Result<Queue, &'static str> {
    dev.write(QUEUE_SEL, u32::from(index));
    if dev.read(QUEUE_READY) != 0 {
        return Err("queue ready after reset");
    }
    let max = dev.read(QUEUE_NUM_MAX);
    if max == 0 {
        return Err(match index {
            0 => "no queue 0",
            1 => "no queue 1",
            2 => "no queue 2",
            _ => "no queue 3",
        });
    }
    let size = max.min(entries);
    zero(base, 3 * 4096);
    dev.pci_queue(index)?;
    dev.write(QUEUE_NUM, size);
    for (reg, addr) in [
        (QUEUE_DESC, base + DESC),
        (QUEUE_DRIVER, base + AVAIL),
        (QUEUE_DEVICE, base + USED),
    ] {
        dev.write(reg, addr as u32);
        dev.write(reg + 4, (addr >> 32) as u32);
    }
    dev.write(QUEUE_READY, 1);
    Ok(Queue {
        dev,
        clock,
        index,
        ring: base,
        size: size as u16,
        avail: 0,
        used: 0,
        features,
    })
}

impl Queue {
    pub(crate) fn desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let desc = self.ring + DESC + 16 * u64::from(index);
        wr(desc, addr);
        wr(desc + 8, len);
        wr(desc + 12, flags);
        wr(desc + 14, next);
    }

    /// A chain of descriptors 0, 1, ... of `(addr, len, device-writable)`.
    pub(crate) fn chain(&self, buffers: &[(u64, u32, bool)]) {
        for (i, &(addr, len, writable)) in buffers.iter().enumerate() {
            let last = i + 1 == buffers.len();
            let flags = if last { 0 } else { NEXT } | if writable { WRITE } else { 0 };
            self.desc(i as u16, addr, len, flags, i as u16 + 1);
        }
    }

    /// Makes the chain at `head` available and notifies the queue.
    fn kick(&mut self, head: u16) {
        self.push_avail(head);
        self.notify();
    }

    /// Makes the chain at `head` available, without a notification.
    pub(crate) fn push_avail(&mut self, head: u16) {
        let slot = self.ring + AVAIL + 4 + 2 * u64::from(self.avail % self.size);
        wr(slot, head);
        compiler_fence(Ordering::SeqCst);
        self.avail = self.avail.wrapping_add(1);
        wr(self.ring + AVAIL + 2, self.avail);
        compiler_fence(Ordering::SeqCst);
    }

    /// Notifies the device of new available buffers on this queue.
    pub(crate) fn notify(&self) {
        self.dev.write(QUEUE_NOTIFY, u32::from(self.index));
    }

    /// The next used element (descriptor id, length), if the device used one;
    /// acknowledges the interrupt status.
    pub(crate) fn take_used(&mut self) -> Option<(u16, u32)> {
        let used = self.pop_used()?;
        self.ack_interrupts();
        Some(used)
    }

    /// The next used element, the interrupt status left as it is (a batch
    /// acknowledges it once, [`Self::ack_interrupts`]).
    pub(crate) fn pop_used(&mut self) -> Option<(u16, u32)> {
        if rd::<u16>(self.ring + USED + 2) == self.used {
            return None;
        }
        compiler_fence(Ordering::SeqCst);
        let elem = self.ring + USED + 4 + 8 * u64::from(self.used % self.size);
        let id = rd::<u32>(elem) as u16;
        let len = rd::<u32>(elem + 4);
        self.used = self.used.wrapping_add(1);
        Some((id, len))
    }

    /// Reads and acknowledges the interrupt status, as an interrupt handler does.
    pub(crate) fn ack_interrupts(&self) {
        let isr = self.dev.read(INTERRUPT_STATUS);
        if isr != 0 {
            self.dev.write(INTERRUPT_ACK, isr);
        }
    }

    /// The available index: what the driver made available so far.
    pub(crate) fn avail_index(&self) -> u16 {
        self.avail
    }

    /// The ring's size.
    pub(crate) fn size(&self) -> u16 {
        self.size
    }

    /// Whether the device set DEVICE_NEEDS_RESET.
    pub(crate) fn needs_reset(&self) -> bool {
        self.dev.status() & NEEDS_RESET != 0
    }

    /// Polls for the next used element for up to `ms` (DEVICE_NEEDS_RESET ends it).
    pub(crate) fn wait_used(&mut self, ms: u64) -> Result<(u16, u32), &'static str> {
        let start = rdtsc();
        let mut checked = start;
        loop {
            if let Some(used) = self.take_used() {
                return Ok(used);
            }
            let now = rdtsc();
            if now - checked >= self.clock.ms(1) {
                checked = now;
                if self.needs_reset() {
                    return Err("DEVICE_NEEDS_RESET");
                }
            }
            if now - start > self.clock.ms(ms) {
                return Err("timeout");
            }
        }
    }

    /// Polls the used ring (and, each millisecond, DEVICE_NEEDS_RESET) for up to `ms`.
    fn wait(&mut self, ms: u64) -> Wait {
        let start = rdtsc();
        let mut status_checked = start;
        loop {
            if rd::<u16>(self.ring + USED + 2) != self.used {
                compiler_fence(Ordering::SeqCst);
                let elem = self.ring + USED + 4 + 8 * u64::from(self.used % self.size);
                let len = rd::<u32>(elem + 4);
                self.used = self.used.wrapping_add(1);
                return Wait::Used(len);
            }
            let now = rdtsc();
            if now - status_checked >= self.clock.ms(1) || now - start > self.clock.ms(ms) {
                status_checked = now;
                if self.dev.status() & NEEDS_RESET != 0 {
                    return Wait::NeedsReset;
                }
                if now - start > self.clock.ms(ms) {
                    return Wait::Timeout;
                }
            }
        }
    }

    /// After a completion: InterruptStatus must show a used-buffer interrupt (polled up
    /// to 100 ms: the device may set it just after the used index); acknowledges it.
    fn ack_interrupt(&self) -> Result<(), &'static str> {
        let start = rdtsc();
        loop {
            let isr = self.dev.read(INTERRUPT_STATUS);
            if isr & 1 != 0 {
                self.dev.write(INTERRUPT_ACK, isr);
                return Ok(());
            }
            if rdtsc() - start > self.clock.ms(100) {
                return Err("no used-buffer interrupt in InterruptStatus");
            }
        }
    }

    /// Submits the chain already in descriptors from `head`, waits up to 2 s for it,
    /// checks and acknowledges the interrupt: the used length.
    fn complete(&mut self, head: u16) -> Result<u32, &'static str> {
        self.complete_within(head, 2000)
    }

    /// [`Self::complete`], waiting up to `ms`.
    fn complete_within(&mut self, head: u16, ms: u64) -> Result<u32, &'static str> {
        self.kick(head);
        match self.wait(ms) {
            Wait::Used(len) => {
                self.ack_interrupt()?;
                Ok(len)
            }
            Wait::NeedsReset => Err("DEVICE_NEEDS_RESET"),
            Wait::Timeout => Err("timeout"),
        }
    }

    /// Writes a virtio-blk request header and the status sentinel 0xff.
    fn blk_header(&self, kind: u32, sector: u64) {
        wr(dma(HEADER), kind);
        wr(dma(HEADER) + 4, 0u32);
        wr(dma(HEADER) + 8, sector);
        wr(dma(STATUS_BYTE), 0xffu8);
    }

    /// One virtio-blk request: header, data (`len` bytes at `data`, none when 0),
    /// status. The status byte the device wrote.
    fn blk(&mut self, kind: u32, sector: u64, data: u64, len: u32) -> Result<u8, &'static str> {
        self.blk_within(kind, sector, data, len, 2000)
    }

    /// [`Self::blk`], waiting up to `ms` for the device (a rate-limited one may
    /// take long).
    fn blk_within(
        &mut self,
        kind: u32,
        sector: u64,
        data: u64,
        len: u32,
        ms: u64,
    ) -> Result<u8, &'static str> {
        self.blk_header(kind, sector);
        let device_writes = kind != BLK_T_OUT;
        let header = (dma(HEADER), 16, false);
        let status = (dma(STATUS_BYTE), 1, true);
        if len == 0 {
            self.chain(&[header, status]);
        } else {
            self.chain(&[header, (data, len, device_writes), status]);
        }
        self.complete_within(0, ms)?;
        Ok(rd(dma(STATUS_BYTE)))
    }
}

/// Runs `body` at CPL3 on the virtio stack; its error, if any, becomes the detail.
pub(crate) fn run_at_cpl3(
    machine: &Machine,
    detail: &mut Line,
    body: impl Fn(&Devices, Clock, &mut Line) -> Result<(), ()>,
) -> bool {
    let devices = discover(machine);
    let clock = Clock {
        tsc_khz: machine.delay_tsc_khz(),
    };
    let mut pass = false;
    cpu::run_user(addr_of!(VIRTIO_STACK_TOP) as u64, &mut || {
        pass = body(&devices, clock, detail).is_ok();
    });
    pass
}

/// `pci`: the virtio devices found on PCI bus 0 (`devices=<slot>:<type>:<BAR>/<size>`,
/// then how many on virtio-mmio), then the `blk` scenario over PCI, whose used
/// buffers raise the queue's MSI-X vector: pending at the local APIC while the
/// CPL3 driver runs with interrupts off, taken (a `TIMER_TICKS` tick) once they
/// are on.
pub fn pci_scenario(machine: &Machine, detail: &mut Line) -> bool {
    let devices = discover(machine);
    let mut mmio = 0;
    detail.str("devices=");
    for dev in devices.all() {
        match dev.pci {
            Some(t) => {
                detail
                    .dec(u64::from(t.slot))
                    .str(":")
                    .dec(u64::from(t.device_type))
                    .str(":")
                    .hex(t.bar)
                    .str("/")
                    .hex(t.bar_size)
                    .str(",");
            }
            None => mmio += 1,
        }
    }
    detail.str(" mmio=").dec(mmio).str(" ");
    let before = cpu::TIMER_TICKS.load(Ordering::SeqCst);
    if !blk(machine, detail) {
        return false;
    }
    // IRR bit of the timer vector (0x20: register 1, bit 0).
    let irr = rd::<u32>(0xfee0_0210);
    if irr & 1 == 0 {
        detail.str("no MSI-X interrupt pending at the local APIC");
        return false;
    }
    cpu::wait_for_interrupt();
    let ticks = cpu::TIMER_TICKS.load(Ordering::SeqCst) - before;
    detail.str(" msix=").dec(ticks);
    ticks > 0
}

/// Runs `body` at CPL3 on the first device of type `id` whose offered features
/// satisfy `wanted` (`missing`, and the devices found, are the detail when there is
/// none); resets the device after.
fn with_device_where(
    machine: &Machine,
    detail: &mut Line,
    id: u32,
    wanted: impl Fn(u64) -> bool,
    missing: &str,
    body: impl Fn(Dev, Clock, &mut Line) -> Result<(), ()>,
) -> bool {
    run_at_cpl3(machine, detail, |devices, clock, detail| {
        let Some(dev) = find(devices, clock, id, &wanted) else {
            detail.str(missing);
            list_devices(devices, detail);
            return Err(());
        };
        let result = body(dev, clock, detail);
        let _ = dev.reset(clock);
        result
    })
}

/// [`with_device_where`] for a device of any features.
pub(crate) fn with_device(
    machine: &Machine,
    detail: &mut Line,
    id: u32,
    missing: &str,
    body: impl Fn(Dev, Clock, &mut Line) -> Result<(), ()>,
) -> bool {
    with_device_where(machine, detail, id, |_| true, missing, body)
}

/// [`with_device_where`] for the first virtio-blk device a driver may write.
fn with_writable_disk(
    machine: &Machine,
    detail: &mut Line,
    body: impl Fn(Dev, Clock, &mut Line) -> Result<(), ()>,
) -> bool {
    with_device_where(
        machine,
        detail,
        ID_BLK,
        |f| f & BLK_F_RO == 0,
        "no virtio-blk device without VIRTIO_BLK_F_RO",
        body,
    )
}

/// Runs `body` at CPL3 on queue 0 of the first device of type `id` whose offered
/// features satisfy `wanted`, set up with `features`; resets the device after.
fn with_queue0(
    machine: &Machine,
    detail: &mut Line,
    id: u32,
    wanted: impl Fn(u64) -> bool,
    missing: &str,
    features: u64,
    body: impl Fn(&mut Queue, Clock, &mut Line) -> Result<(), ()>,
) -> bool {
    with_device_where(
        machine,
        detail,
        id,
        wanted,
        missing,
        |dev, clock, detail| match setup(dev, clock, features, true) {
            Ok(mut q) => body(&mut q, clock, detail),
            Err(error) => {
                detail.str(error);
                Err(())
            }
        },
    )
}

/// Writes `what: error` to the detail.
fn fail<T>(detail: &mut Line, what: &str, error: &str) -> Result<T, ()> {
    detail.str(what).str(": ").str(error);
    Err(())
}

/// A request's status must be OK.
fn expect_ok(detail: &mut Line, what: &str, status: Result<u8, &'static str>) -> Result<(), ()> {
    match status {
        Ok(BLK_S_OK) => Ok(()),
        Ok(status) => {
            detail.str(what).str(": status=").dec(u64::from(status));
            Err(())
        }
        Err(error) => fail(detail, what, error),
    }
}

/// `byte[i]` of sector `s` of the `blk` write pattern.
pub fn pattern(sector: u64, i: u64) -> u8 {
    (sector * 31 + i * 7 + 0x5a) as u8
}

const PATTERN_SECTORS: u64 = (DATA_LEN / SECTOR) as u64;

pub fn blk(machine: &Machine, detail: &mut Line) -> bool {
    with_queue0(
        machine,
        detail,
        ID_BLK,
        |f| f & BLK_F_RO == 0,
        "no virtio-blk device without VIRTIO_BLK_F_RO",
        BLK_F_FLUSH,
        |q, _clock, detail| blk_body(q, detail),
    )
}

fn blk_body(q: &mut Queue, detail: &mut Line) -> Result<(), ()> {
    let capacity = q.dev.config_u64(0);
    if capacity < PATTERN_SECTORS {
        detail.str("capacity=").dec(capacity).str(" too small");
        return Err(());
    }

    zero(dma(ID_BUF), ID_LEN as usize);
    let status = q.blk(BLK_T_GET_ID, 0, dma(ID_BUF), ID_LEN);
    expect_ok(detail, "get_id", status)?;

    for s in 0..PATTERN_SECTORS {
        for i in 0..u64::from(SECTOR) {
            wr(dma(WRITE_BUF) + s * u64::from(SECTOR) + i, pattern(s, i));
        }
    }
    let status = q.blk(BLK_T_OUT, 0, dma(WRITE_BUF), DATA_LEN);
    expect_ok(detail, "write", status)?;

    let flush = q.features & BLK_F_FLUSH != 0;
    if flush {
        let status = q.blk(BLK_T_FLUSH, 0, 0, 0);
        expect_ok(detail, "flush", status)?;
    }

    zero(dma(READ_BUF), DATA_LEN as usize);
    let status = q.blk(BLK_T_IN, 0, dma(READ_BUF), DATA_LEN);
    expect_ok(detail, "read", status)?;
    for offset in 0..u64::from(DATA_LEN) {
        if rd::<u8>(dma(READ_BUF) + offset) != rd::<u8>(dma(WRITE_BUF) + offset) {
            detail.str("read back: mismatch at byte ").dec(offset);
            return Err(());
        }
    }

    let status = q.blk(BLK_T_IN, capacity - 1, dma(READ_BUF), SECTOR);
    expect_ok(detail, "read last sector", status)?;

    match q.blk(BLK_T_IN, capacity, dma(READ_BUF), SECTOR) {
        Ok(BLK_S_IOERR) => {}
        Ok(status) => {
            detail
                .str("read past the end: status=")
                .dec(u64::from(status));
            return Err(());
        }
        Err(error) => return fail(detail, "read past the end", error),
    }

    detail.str("capacity=").dec(capacity).str(" id=");
    for i in 0..u64::from(ID_LEN) {
        let byte: u8 = rd(dma(ID_BUF) + i);
        if byte == 0 {
            break;
        }
        detail.bytes(&[if byte.is_ascii_graphic() { byte } else { b'?' }]);
    }
    detail.str(" flush=").dec(u64::from(flush));
    Ok(())
}

/// One read (`IN`) of sector 0 of the first virtio-blk device (RO or not) into
/// `len` bytes at guest-physical `addr`, wherever that is: `rootkit-blk` aims it
/// at the guest's own kernel text.
pub(crate) fn blk_read_into(machine: &Machine, detail: &mut Line, addr: u64, len: u32) -> bool {
    with_any_blk(machine, detail, |q, _clock, detail| {
        expect_ok(detail, "read", q.blk(BLK_T_IN, 0, addr, len))
    })
}

/// [`with_queue0`] on the first virtio-blk device, read-only or not, with no
/// feature but `VIRTIO_F_VERSION_1`.
fn with_any_blk(
    machine: &Machine,
    detail: &mut Line,
    body: impl Fn(&mut Queue, Clock, &mut Line) -> Result<(), ()>,
) -> bool {
    with_queue0(
        machine,
        detail,
        ID_BLK,
        |_| true,
        "no virtio-blk device",
        0,
        body,
    )
}

pub fn blk_ro(machine: &Machine, detail: &mut Line) -> bool {
    with_queue0(
        machine,
        detail,
        ID_BLK,
        |f| f & BLK_F_RO != 0,
        "no virtio-blk device with VIRTIO_BLK_F_RO",
        BLK_F_RO,
        |q, _clock, detail| blk_ro_body(q, detail),
    )
}

fn blk_ro_body(q: &mut Queue, detail: &mut Line) -> Result<(), ()> {
    // Sector 0 is read first and the write offers the same bytes: a device that wrongly
    // accepts the write leaves the image as it was.
    zero(dma(READ_BUF), SECTOR as usize);
    let status = q.blk(BLK_T_IN, 0, dma(READ_BUF), SECTOR);
    expect_ok(detail, "read", status)?;
    let first: u32 = rd(dma(READ_BUF));
    for i in 0..u64::from(SECTOR) {
        wr(dma(WRITE_BUF) + i, rd::<u8>(dma(READ_BUF) + i));
    }
    let write_status = match q.blk(BLK_T_OUT, 0, dma(WRITE_BUF), SECTOR) {
        Ok(status) => status,
        Err(error) => return fail(detail, "write", error),
    };
    zero(dma(READ_BUF), SECTOR as usize);
    let status = q.blk(BLK_T_IN, 0, dma(READ_BUF), SECTOR);
    expect_ok(detail, "read after write", status)?;
    detail
        .str("write_status=")
        .dec(u64::from(write_status))
        .str(" first_bytes=")
        .hex(u64::from(first));
    if write_status == BLK_S_OK {
        detail.str(" (the device accepted a write)");
        return Err(());
    }
    if rd::<u32>(dma(READ_BUF)) != first {
        detail.str(" (sector 0 changed)");
        return Err(());
    }
    Ok(())
}

pub fn rng(machine: &Machine, detail: &mut Line) -> bool {
    with_queue0(
        machine,
        detail,
        ID_RNG,
        |_| true,
        "no virtio-rng device",
        0,
        |q, _clock, detail| rng_body(q, detail),
    )
}

fn rng_body(q: &mut Queue, detail: &mut Line) -> Result<(), ()> {
    let bufs = [dma(RNG_BUF), dma(RNG_BUF) + u64::from(RNG_LEN)];
    zero(bufs[0], 2 * RNG_LEN as usize);
    for (k, &buf) in bufs.iter().enumerate() {
        q.chain(&[(buf, RNG_LEN, true)]);
        match q.complete(0) {
            Ok(RNG_LEN) => {}
            Ok(len) => {
                detail
                    .str("request ")
                    .dec(k as u64)
                    .str(": len=")
                    .dec(u64::from(len));
                return Err(());
            }
            Err(error) => {
                detail.str("request ").dec(k as u64).str(": ").str(error);
                return Err(());
            }
        }
        if (0..u64::from(RNG_LEN)).all(|i| rd::<u8>(buf + i) == 0) {
            detail.str("request ").dec(k as u64).str(": all zeros");
            return Err(());
        }
    }
    if (0..u64::from(RNG_LEN)).all(|i| rd::<u8>(bufs[0] + i) == rd::<u8>(bufs[1] + i)) {
        detail.str("both requests returned the same bytes");
        return Err(());
    }
    detail.str("bytes=").dec(2 * u64::from(RNG_LEN));
    Ok(())
}

/// Rounds of `mmio-reads`; five register reads each.
const MMIO_READ_ROUNDS: u64 = 2000;

/// `mmio-reads`: reads registers of the first virtio-blk device from CPL3,
/// [`MMIO_READ_ROUNDS`] rounds of its magic value, device id, first
/// configuration word, status and interrupt status, checking the first three;
/// reports the TSC ticks per read. See README.md.
pub fn mmio_reads(machine: &Machine, detail: &mut Line) -> bool {
    with_device(
        machine,
        detail,
        ID_BLK,
        "no virtio-blk device",
        |dev, _clock, detail| {
            let capacity = dev.read(CONFIG);
            let start = rdtsc();
            for round in 0..MMIO_READ_ROUNDS {
                let (magic, id, config) = (dev.read(MAGIC), dev.read(DEVICE_ID), dev.read(CONFIG));
                let _ = (dev.read(STATUS), dev.read(INTERRUPT_STATUS));
                if (magic, id, config) != (MAGIC_VALUE, ID_BLK, capacity) {
                    detail
                        .str("round ")
                        .dec(round)
                        .str(": magic=")
                        .hex(u64::from(magic))
                        .str(" id=")
                        .dec(u64::from(id))
                        .str(" config=")
                        .dec(u64::from(config));
                    return Err(());
                }
            }
            let reads = 5 * MMIO_READ_ROUNDS;
            detail
                .str("reads=")
                .dec(reads)
                .str(" ticks_per_read=")
                .dec((rdtsc() - start) / reads);
            Ok(())
        },
    )
}

/// `rng-evil`: four malformed requests on one set-up of the first virtio-rng device,
/// each waited for up to 2 s, then a good one. See README.md.
pub fn rng_evil(machine: &Machine, detail: &mut Line) -> bool {
    with_queue0(
        machine,
        detail,
        ID_RNG,
        |_| true,
        "no virtio-rng device",
        0,
        |q, _clock, detail| rng_evil_body(q, detail),
    )
}

/// Where `rng-evil`'s `huge` buffer starts: free RAM at 16 MiB, away from the image.
const RNG_HUGE_AT: u64 = 0x100_0000;

fn rng_evil_body(q: &mut Queue, detail: &mut Line) -> Result<(), ()> {
    let buf = dma(RNG_BUF);
    let cases: [(&str, &dyn Fn(&Queue)); 5] = [
        ("oob", &|q| q.chain(&[(FAR_OUTSIDE_RAM, RNG_LEN, true)])),
        ("loop", &|q| {
            q.desc(0, buf, RNG_LEN / 2, NEXT | WRITE, 1);
            q.desc(
                1,
                buf + u64::from(RNG_LEN / 2),
                RNG_LEN / 2,
                NEXT | WRITE,
                0,
            );
        }),
        ("huge", &|q| q.chain(&[(RNG_HUGE_AT, 0x7fff_ffff, true)])),
        ("dir", &|q| q.chain(&[(buf, RNG_LEN, false)])),
        ("good", &|q| q.chain(&[(buf, RNG_LEN, true)])),
    ];
    zero(buf, RNG_LEN as usize);
    let mut good = false;
    for (name, make) in cases {
        make(q);
        q.kick(0);
        if name != "oob" {
            detail.str(" ");
        }
        detail.str(name).str("=");
        match q.wait_used(2000) {
            Ok((_, len)) => {
                detail.str("used:").dec(u64::from(len));
                good = name == "good" && len == RNG_LEN;
            }
            Err(why) => {
                detail.str(evil_outcome::<()>(Err(why)));
                return Err(());
            }
        }
    }
    if !good || (0..u64::from(RNG_LEN)).all(|i| rd::<u8>(buf + i) == 0) {
        detail.str(" (the good request got no entropy)");
        return Err(());
    }
    Ok(())
}

/// The malformed requests of `virtio-evil`, in order.
#[derive(Clone, Copy)]
enum Evil {
    /// A valid read, notified with the queue set up but before DRIVER_OK.
    PreOk,
    /// A data descriptor far outside RAM.
    Oob,
    /// Descriptor 0 -> 1 -> 0.
    Loop,
    /// A data descriptor of 0x7fff_ffff bytes.
    Huge,
    /// The header descriptor marked device-writable.
    Dir,
}

const EVILS: [(Evil, &str); 5] = [
    (Evil::PreOk, "pre_ok"),
    (Evil::Oob, "oob"),
    (Evil::Loop, "loop"),
    (Evil::Huge, "huge"),
    (Evil::Dir, "dir"),
];

/// A guest-physical address far outside RAM, for descriptors that point nowhere.
pub(crate) const FAR_OUTSIDE_RAM: u64 = 0xffff_0000_0000;

/// What a device made of a malformed chain on a multi-queue device, as
/// [`Queue::wait_used`] saw it.
pub(crate) fn evil_outcome<T>(waited: Result<T, &'static str>) -> &'static str {
    match waited {
        Ok(_) => "used",
        Err("DEVICE_NEEDS_RESET") => "needs_reset",
        Err(_) => "idle",
    }
}

/// What the device made of a malformed request.
fn outcome(wait: Wait) -> &'static str {
    match wait {
        Wait::Timeout => "idle",
        Wait::NeedsReset => "needs_reset",
        Wait::Used(_) => match rd::<u8>(dma(STATUS_BYTE)) {
            0 => "ok",
            1 => "ioerr",
            2 => "unsupp",
            _ => "nostatus",
        },
    }
}

/// Submits the malformed request `evil` on a freshly set-up device.
fn evil_case(dev: Dev, clock: Clock, evil: Evil) -> Result<&'static str, &'static str> {
    let mut q = setup(dev, clock, 0, !matches!(evil, Evil::PreOk))?;
    q.blk_header(BLK_T_IN, 0);
    let header = (dma(HEADER), 16, false);
    let status = (dma(STATUS_BYTE), 1, true);
    let data = (dma(READ_BUF), SECTOR, true);
    let timeout_ms = match evil {
        Evil::PreOk => {
            q.chain(&[header, data, status]);
            100
        }
        Evil::Oob => {
            q.chain(&[header, (FAR_OUTSIDE_RAM, SECTOR, true), status]);
            2000
        }
        Evil::Loop => {
            q.desc(0, dma(HEADER), 16, NEXT, 1);
            q.desc(1, dma(READ_BUF), SECTOR, NEXT | WRITE, 0);
            2000
        }
        Evil::Huge => {
            q.chain(&[header, (dma(READ_BUF), 0x7fff_ffff, true), status]);
            2000
        }
        Evil::Dir => {
            q.chain(&[(dma(HEADER), 16, true), data, status]);
            2000
        }
    };
    q.kick(0);
    Ok(outcome(q.wait(timeout_ms)))
}

/// After a malformed request: reset, set up again, one valid 512-byte read of sector 0.
fn recover(dev: Dev, clock: Clock) -> Result<(), &'static str> {
    dev.reset(clock)?;
    let mut q = setup(dev, clock, 0, true)?;
    match q.blk(BLK_T_IN, 0, dma(READ_BUF), SECTOR)? {
        BLK_S_OK => Ok(()),
        _ => Err("status not OK"),
    }
}

pub fn virtio_evil(machine: &Machine, detail: &mut Line) -> bool {
    run_at_cpl3(machine, detail, |devices, clock, detail| {
        let Some(dev) = find(devices, clock, ID_BLK, |_| true) else {
            detail.str("no virtio-blk device");
            list_devices(devices, detail);
            return Err(());
        };
        if let Err(error) = modern(dev) {
            detail.str(error);
            return Err(());
        }
        let mut recovered = 0;
        let mut bad: Option<(&str, &str)> = None;
        let mut accepted = false;
        for (evil, name) in EVILS {
            let result = match evil_case(dev, clock, evil) {
                Ok(outcome) => outcome,
                Err(error) => {
                    let _ = dev.reset(clock);
                    return fail(detail, name, error);
                }
            };
            accepted |= result == "ok";
            detail.str(name).str("=").str(result).str(" ");
            match recover(dev, clock) {
                Ok(()) => recovered += 1,
                Err(error) => {
                    if bad.is_none() {
                        bad = Some((name, error));
                    }
                }
            }
        }
        let _ = dev.reset(clock);
        detail.str("recovered=").dec(recovered);
        if let Some((name, error)) = bad {
            detail
                .str(" (recovery after ")
                .str(name)
                .str(": ")
                .str(error)
                .str(")");
            return Err(());
        }
        if accepted {
            return Err(());
        }
        Ok(())
    })
}

/// Requests per direction in `blk-bench` unless `blk_requests=` says (fewer
/// for large requests: [`BENCH_BYTES`] at most).
const BENCH_REQUESTS: u64 = 4000;
/// The most bytes per direction in `blk-bench`.
const BENCH_BYTES: u64 = 256 << 20;
/// The deepest `blk_qd=`.
const BENCH_MAX_QD: u64 = 128;
/// The largest `blk_bs_kib=`.
const BENCH_MAX_BS_KIB: u64 = 1024;
/// Entries of the `blk-bench` queue and the `net-bench` transmit queue (their
/// rings fill the three ring pages).
pub(crate) const BENCH_QUEUE_SIZE: u32 = 256;
/// Descriptors per request: header, data, status.
const DESCS_PER_REQUEST: u16 = 3;
/// The most data buffer memory `blk-bench` uses; deeper queues of larger requests
/// share buffers (a benchmark's data need not be kept apart).
const BENCH_BUFFER_MIB: u64 = 32;
/// `VIRTIO_RING_F_EVENT_IDX` (virtio 1.1, 2.6.7 and 2.6.10).
pub(crate) const F_EVENT_IDX: u64 = 1 << 29;
/// `VIRTIO_RING_F_INDIRECT_DESC` (virtio 1.1, 2.6.5.3): `blk-bench` puts each
/// request's three descriptors in a table of its own when the ring is too
/// small for them.
const F_INDIRECT_DESC: u64 = 1 << 28;
/// `VIRTQ_DESC_F_INDIRECT`.
const INDIRECT: u16 = 4;
/// Bytes of one request's indirect table.
const TABLE_BYTES: u64 = 48;

/// What `blk-bench` runs, from the command line.
#[derive(Clone, Copy)]
struct BenchParams {
    /// Requests kept in flight (`blk_qd=`, 1 to [`BENCH_MAX_QD`], default 1).
    qd: u16,
    /// Bytes per request (`blk_bs_kib=`, 4 to [`BENCH_MAX_BS_KIB`] KiB in 4 KiB
    /// steps, default 4).
    bs: u32,
    /// `blk_pattern=rand`: offsets drawn at random instead of in sequence.
    random: bool,
    /// `blk_event_idx=0` leaves `VIRTIO_RING_F_EVENT_IDX` unnegotiated even when
    /// offered (default: negotiated when offered).
    event_idx: bool,
    /// Requests per direction (`blk_requests=`, 1 to 10,000,000: a run long
    /// enough to profile; default [`BENCH_REQUESTS`], within [`BENCH_BYTES`]).
    requests: u64,
    /// Request queues (`blk_queues=`, 1 to [`MQ_MAX_QUEUES`], default 1): more
    /// than one negotiates `VIRTIO_BLK_F_MQ` when offered; request slot `s`
    /// goes on queue `s % queues`.
    queues: usize,
    /// Where the data buffers begin, and their bytes.
    buffers: u64,
    buffer_bytes: u64,
    /// The indirect tables, one per request slot, after the buffers.
    tables: u64,
    /// The rings of queues 1 and up (three pages each), after the tables.
    rings: u64,
}

impl BenchParams {
    /// The parameters, or the detail naming the word that is wrong.
    fn parse(machine: &Machine, detail: &mut Line) -> Result<Self, ()> {
        let info = &machine.info;
        let number = |key: &str, min: u64, max: u64, default: u64, detail: &mut Line| match info
            .param_number(key.as_bytes(), min, max)
        {
            Ok(n) => Ok(n.unwrap_or(default)),
            Err(value) => {
                detail
                    .str(key)
                    .str("=")
                    .bytes(value)
                    .str(": expected ")
                    .dec(min)
                    .str(" to ")
                    .dec(max);
                Err(())
            }
        };
        let qd = number("blk_qd", 1, BENCH_MAX_QD, 1, detail)?;
        let bs_kib = number("blk_bs_kib", 4, BENCH_MAX_BS_KIB, 4, detail)?;
        if bs_kib % 4 != 0 {
            detail
                .str("blk_bs_kib=")
                .dec(bs_kib)
                .str(": expected a multiple of 4");
            return Err(());
        }
        let event_idx = number("blk_event_idx", 0, 1, 1, detail)? == 1;
        let queues = number("blk_queues", 1, MQ_MAX_QUEUES as u64, 1, detail)? as usize;
        let requests = number("blk_requests", 1, 10_000_000, 0, detail)?;
        let requests = match requests {
            0 => BENCH_REQUESTS.min(BENCH_BYTES / (bs_kib << 10)),
            n => n,
        };
        let random = match info.param(b"blk_pattern") {
            None | Some(b"seq") => false,
            Some(b"rand") => true,
            Some(other) => {
                detail
                    .str("blk_pattern=")
                    .bytes(other)
                    .str(": expected seq or rand");
                return Err(());
            }
        };
        let buffer_bytes = (qd * bs_kib * 1024).min(BENCH_BUFFER_MIB << 20);
        let tables = crate::mobility::DIRTY_BASE + buffer_bytes;
        let rings = (tables + BENCH_MAX_QD * TABLE_BYTES).next_multiple_of(4096);
        let end = rings + 0x3000 * MQ_MAX_QUEUES as u64;
        let mib = (end - crate::mobility::DIRTY_BASE).div_ceil(1 << 20);
        let Some(_) = crate::mobility::free_region(machine, "blk_qd*blk_bs_kib", mib, detail)
        else {
            return Err(());
        };
        Ok(Self {
            qd: qd as u16,
            bs: (bs_kib * 1024) as u32,
            random,
            event_idx,
            requests,
            queues,
            buffers: crate::mobility::DIRTY_BASE,
            buffer_bytes,
            tables,
            rings,
        })
    }

    /// The data buffer of request slot `slot`.
    fn buffer(&self, slot: u16) -> u64 {
        self.buffers + (u64::from(slot) * u64::from(self.bs)) % self.buffer_bytes
    }
}

/// `blk-bench`: reads then writes of `blk_bs_kib=` KiB, `blk_qd=` of them in flight,
/// in sequence or at random (`blk_pattern=`) over the first 64 MiB of the first
/// writable disk, timed with the TSC at CPL3, spread over `blk_queues=` request
/// queues where the device has them. `VIRTIO_RING_F_EVENT_IDX` is used when the
/// device offers it (unless `blk_event_idx=0`).
pub fn blk_bench(machine: &Machine, detail: &mut Line) -> bool {
    let Ok(params) = BenchParams::parse(machine, detail) else {
        return false;
    };
    with_writable_disk(machine, detail, |dev, clock, detail| {
        let wanted = F_INDIRECT_DESC | if params.event_idx { F_EVENT_IDX } else { 0 };
        let mut queues: [Option<Queue>; MQ_MAX_QUEUES] = core::array::from_fn(|_| None);
        let ring_at = |q: usize| match q {
            0 => ring(0),
            q => params.rings + 0x3000 * (q as u64 - 1),
        };
        match mq_setup(dev, clock, wanted, params.queues, ring_at, &mut queues) {
            Ok(n) => blk_bench_body(&mut queues, n, clock, params, detail),
            Err(error) => fail(detail, "set-up", error),
        }
    })
}

/// Sectors per 4 KiB request.
const PER_REQUEST: u64 = (DATA_LEN / SECTOR) as u64;

/// The sectors the benchmarks spread their 4 KiB requests over: the first 64 MiB
/// of the disk, in whole requests.
fn bench_span(q: &Queue, detail: &mut Line) -> Result<u64, ()> {
    let span = q.dev.config_u64(0).min(64 * 2048) / PER_REQUEST * PER_REQUEST;
    if span == 0 {
        detail.str("disk smaller than 4 KiB");
        return Err(());
    }
    Ok(span)
}

/// Request `i` of a benchmark: 4 KiB of `kind` at the `i`-th 4 KiB of `span`.
fn bench_request(
    q: &mut Queue,
    kind: u32,
    buffer: u64,
    i: u64,
    span: u64,
    ms: u64,
) -> Result<u8, &'static str> {
    let sector = (i * PER_REQUEST) % span;
    q.blk_within(kind, sector, dma(buffer), DATA_LEN, ms)
}

/// `vring_need_event` (virtio 1.1, 2.6.7.2): whether moving an index from `old` to
/// `new` passes `event`, the index the other side asked to hear about.
fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

impl Queue {
    pub(crate) fn event_idx(&self) -> bool {
        self.features & F_EVENT_IDX != 0
    }

    /// Notifies the device of what was made available since the index was `old`,
    /// unless it said it does not need to hear about it (`avail_event`, or
    /// `VIRTQ_USED_F_NO_NOTIFY` without event indices).
    pub(crate) fn notify_since(&self, old: u16) {
        // A full barrier: the new available index must be visible before the
        // device's flag or `avail_event` is read (x86 lets a load pass an
        // earlier store), or a device that re-armed meanwhile is never told.
        fence(Ordering::SeqCst);
        let needed = if self.event_idx() {
            let avail_event = rd::<u16>(self.ring + USED + 4 + 8 * u64::from(self.size));
            need_event(avail_event, self.avail, old)
        } else {
            rd::<u16>(self.ring + USED) & 1 == 0
        };
        if needed {
            self.notify();
        }
    }

    /// With event indices: asks for an interrupt at the next used buffer (what a
    /// driver re-arming its callback does).
    pub(crate) fn arm_used_event(&self) {
        if self.event_idx() {
            wr(self.ring + AVAIL + 4 + 2 * u64::from(self.size), self.used);
            compiler_fence(Ordering::SeqCst);
        }
    }
}

/// What one direction of `blk-bench` saw.
struct BenchRun {
    ticks: u64,
    /// The most requests in flight at once.
    max_in_flight: u64,
    /// Requests completed after one submitted later than them had completed.
    reordered: u64,
}

/// Request slots of `blk-bench` on each of `n` queues.
fn slots_per_queue(params: BenchParams, n: usize) -> u16 {
    params.qd.div_ceil(n as u16)
}

/// Whether `blk-bench` puts its requests in indirect tables: when a ring of
/// `size` entries cannot hold three descriptors for each of its slots.
fn uses_indirect(size: u16, params: BenchParams, n: usize) -> bool {
    u32::from(slots_per_queue(params, n)) * u32::from(DESCS_PER_REQUEST) > u32::from(size)
}

/// One direction of `blk-bench`: `total` requests of `kind`, `params.qd` in
/// flight, slot `s` on queue `s % n` (the first `n` of `queues`, all of `size`
/// entries).
fn bench_direction(
    queues: &mut [Option<Queue>; MQ_MAX_QUEUES],
    n: usize,
    size: u16,
    clock: Clock,
    params: BenchParams,
    kind: u32,
    total: u64,
    span: u64,
) -> Result<BenchRun, &'static str> {
    let sectors = u64::from(params.bs / SECTOR);
    let header = |slot: u16| dma(HEADER) + 16 * u64::from(slot);
    let status = |slot: u16| dma(HEADER) + 0x800 + u64::from(slot);
    // Indirect tables only where a ring cannot hold three descriptors per
    // request (checked offered by `blk_bench_body`).
    let indirect = uses_indirect(size, params, n);
    let per_request = if indirect { 1 } else { DESCS_PER_REQUEST };
    let mut free: [u16; BENCH_MAX_QD as usize] = [0; BENCH_MAX_QD as usize];
    for (slot, f) in free.iter_mut().enumerate() {
        *f = slot as u16;
    }
    let mut free_count = usize::from(params.qd);
    // The submission number of each slot's request, and the latest completed.
    let mut seq: [u64; BENCH_MAX_QD as usize] = [0; BENCH_MAX_QD as usize];
    let (mut latest_done, mut reordered) = (0u64, 0u64);
    let (mut submitted, mut completed) = (0u64, 0u64);
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut max_in_flight = 0;
    for q in queues[..n].iter_mut().flatten() {
        q.arm_used_event();
    }
    let start = rdtsc();
    let mut progress = start;
    let mut checked = start;
    while completed < total {
        let mut old = [0u16; MQ_MAX_QUEUES];
        for (q, old) in queues[..n].iter().flatten().zip(old.iter_mut()) {
            *old = q.avail;
        }
        while free_count > 0 && submitted < total {
            free_count -= 1;
            let slot = free[free_count];
            let Some(q) = queues[usize::from(slot) % n].as_mut() else {
                return Err("a request slot without its queue");
            };
            let index = if params.random {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng % span
            } else {
                submitted % span
            };
            wr(header(slot), kind);
            wr(header(slot) + 4, 0u32);
            wr(header(slot) + 8, index * sectors);
            wr(status(slot), 0xffu8);
            let writes = if kind == BLK_T_OUT { 0 } else { WRITE };
            let chain = [
                (header(slot), 16, NEXT),
                (params.buffer(slot), params.bs, NEXT | writes),
                (status(slot), 1, WRITE),
            ];
            let head = slot / n as u16 * per_request;
            if indirect {
                // One ring descriptor for the table of the three.
                let table = params.tables + TABLE_BYTES * u64::from(slot);
                for (i, &(addr, len, flags)) in chain.iter().enumerate() {
                    let entry = table + 16 * i as u64;
                    wr(entry, addr);
                    wr(entry + 8, len);
                    wr(entry + 12, flags);
                    wr(entry + 14, i as u16 + 1);
                }
                q.desc(head, table, TABLE_BYTES as u32, INDIRECT, 0);
            } else {
                for (i, &(addr, len, flags)) in chain.iter().enumerate() {
                    let i = i as u16;
                    q.desc(head + i, addr, len, flags, head + i + 1);
                }
            }
            q.push_avail(head);
            submitted += 1;
            seq[usize::from(slot)] = submitted;
        }
        max_in_flight = max_in_flight.max(submitted - completed);
        for (q, &old) in queues[..n].iter().flatten().zip(old.iter()) {
            if q.avail != old {
                q.notify_since(old);
            }
        }
        // Every used buffer there is on every queue, then one interrupt status
        // read for the batch, as an interrupt handler does.
        let mut batch = 0;
        for (index, q) in queues[..n].iter_mut().flatten().enumerate() {
            let mut used = 0;
            while rd::<u16>(q.ring + USED + 2) != q.used {
                compiler_fence(Ordering::SeqCst);
                let elem = q.ring + USED + 4 + 8 * u64::from(q.used % q.size);
                let slot = (rd::<u32>(elem) as u16 / per_request)
                    .wrapping_mul(n as u16)
                    .wrapping_add(index as u16);
                q.used = q.used.wrapping_add(1);
                if slot >= params.qd {
                    return Err("used id is no request's head");
                }
                match rd::<u8>(status(slot)) {
                    BLK_S_OK => {}
                    BLK_S_IOERR => return Err("status IOERR"),
                    _ => return Err("status not OK"),
                }
                let done = seq[usize::from(slot)];
                if done < latest_done {
                    reordered += 1;
                }
                latest_done = latest_done.max(done);
                free[free_count] = slot;
                free_count += 1;
                completed += 1;
                used += 1;
            }
            if used > 0 {
                q.arm_used_event();
            }
            batch += used;
        }
        let Some(first) = queues[0].as_ref() else {
            return Err("no queue 0");
        };
        let now = rdtsc();
        if batch > 0 {
            let isr = first.dev.read(INTERRUPT_STATUS);
            if isr != 0 {
                first.dev.write(INTERRUPT_ACK, isr);
            }
            progress = now;
        } else if now - checked >= clock.ms(1) {
            checked = now;
            if first.needs_reset() {
                return Err("DEVICE_NEEDS_RESET");
            }
            if now - progress > clock.ms(2000) {
                return Err("timeout");
            }
        }
    }
    Ok(BenchRun {
        ticks: rdtsc() - start,
        max_in_flight,
        reordered,
    })
}

fn blk_bench_body(
    queues: &mut [Option<Queue>; MQ_MAX_QUEUES],
    n: usize,
    clock: Clock,
    params: BenchParams,
    detail: &mut Line,
) -> Result<(), ()> {
    let Some(q) = queues[0].as_ref() else {
        return fail(detail, "set-up", "no queue 0");
    };
    let (size, features, event_idx, dev) = (q.size, q.features, q.event_idx(), q.dev);
    let indirect = uses_indirect(size, params, n);
    if indirect && (features & F_INDIRECT_DESC == 0 || slots_per_queue(params, n) > size) {
        detail
            .str("blk_qd=")
            .dec(u64::from(params.qd))
            .str(": a queue of ")
            .dec(u64::from(size))
            .str(" entries holds ")
            .dec(u64::from(size / DESCS_PER_REQUEST))
            .str(" requests of three descriptors at most, and the device offers no indirect descriptors");
        return Err(());
    }
    let per_request = u64::from(params.bs / SECTOR);
    let span = dev.config_u64(0).min(64 * 2048) / per_request;
    if span == 0 {
        detail.str("disk smaller than one request");
        return Err(());
    }
    let total = params.requests;
    let (mut deepest, mut reordered) = (0, 0);
    for (kind, name) in [(BLK_T_IN, "read"), (BLK_T_OUT, "write")] {
        let run = match bench_direction(queues, n, size, clock, params, kind, total, span) {
            Ok(run) => run,
            Err(error) => return fail(detail, name, error),
        };
        deepest = deepest.max(run.max_in_flight);
        reordered += run.reordered;
        let us = (run.ticks * 1000 / clock.tsc_khz).max(1);
        let iops = total * 1_000_000 / us;
        detail
            .str(name)
            .str("_iops=")
            .dec(iops)
            .str(" ")
            .str(name)
            .str("_kib_s=")
            .dec(iops * u64::from(params.bs) / 1024)
            .str(" ");
    }
    detail
        .str("requests=")
        .dec(total)
        .str(" qd=")
        .dec(u64::from(params.qd))
        .str(" bs_kib=")
        .dec(u64::from(params.bs / 1024))
        .str(" event_idx=")
        .dec(u64::from(event_idx))
        .str(" indirect=")
        .dec(u64::from(indirect))
        .str(" max_in_flight=")
        .dec(deepest)
        .str(" reordered=")
        .dec(reordered)
        .str(" queues=")
        .dec(n as u64);
    Ok(())
}

/// Writes per `blk-integrity` round; the round's flush makes 32 in flight.
const INTEGRITY_WRITES: usize = 31;
/// The most `blk_integrity_rounds=` and `blk_integrity_verify=`.
const INTEGRITY_MAX: u64 = 1 << 24;

/// Byte `i` of block (4 KiB) `block` as `blk-integrity` writes it.
pub fn integrity_byte(block: u64, i: u64) -> u8 {
    (block.wrapping_mul(131) ^ i.wrapping_mul(7) ^ (block >> 8)) as u8
}

/// `blk-integrity`: rounds of 31 writes of 4 KiB (block `k` holds
/// [`integrity_byte`]) and a flush, the 32 submitted together; once a round's
/// flush completes (after its writes: checked), prints `blk-integrity: flushed
/// <blocks>`. Up to `blk_integrity_rounds=` rounds (default: the disk full).
/// With `blk_integrity_verify=<n>`: reads blocks 0 to n-1 back, 32 at a time,
/// and checks them. For a host that kills the VMM after a flush and checks the
/// image.
pub fn blk_integrity(machine: &Machine, detail: &mut Line) -> bool {
    let info = &machine.info;
    let (verify, rounds, reset) = match (
        info.param_number(b"blk_integrity_verify", 1, INTEGRITY_MAX),
        info.param_number(b"blk_integrity_rounds", 1, INTEGRITY_MAX),
        info.param_number(b"blk_integrity_reset", 0, 1),
    ) {
        (Ok(v), Ok(r), Ok(x)) => (v, r.unwrap_or(INTEGRITY_MAX), x == Some(1)),
        (Err(value), _, _) | (_, Err(value), _) | (_, _, Err(value)) => {
            detail
                .str("blk_integrity_verify=/_rounds=/_reset=")
                .bytes(value)
                .str(": out of range");
            return false;
        }
    };
    if crate::mobility::free_region(machine, "blk-integrity buffers", 1, detail).is_none() {
        return false;
    }
    let data = crate::mobility::DIRTY_BASE;
    with_writable_disk(machine, detail, |dev, clock, detail| {
        let set_up = || {
            negotiate(dev, clock, F_EVENT_IDX).and_then(|features| {
                let q = setup_queue_at(dev, clock, 0, features, ring(0), BENCH_QUEUE_SIZE)?;
                driver_ok(dev)?;
                Ok(q)
            })
        };
        let mut q = match set_up() {
            Ok(q) => q,
            Err(error) => return fail(detail, "set-up", error),
        };
        if reset {
            // A round submitted, and the device reset at once, its flush (and
            // maybe writes) in flight; then set up again.
            let mut requests = [(BLK_T_FLUSH, 0); INTEGRITY_WRITES + 1];
            for (k, request) in requests[..INTEGRITY_WRITES].iter_mut().enumerate() {
                *request = (BLK_T_OUT, k as u64 * 8);
            }
            blk_submit(&mut q, &requests, data, dma(HEADER));
            q = match set_up() {
                Ok(q) => q,
                Err(error) => return fail(detail, "set-up after a reset in flight", error),
            };
        }
        let blocks = q.dev.config_u64(0) / 8;
        match verify {
            Some(n) if n > blocks => {
                detail
                    .str("blk_integrity_verify=")
                    .dec(n)
                    .str(": the disk has ")
                    .dec(blocks)
                    .str(" blocks");
                Err(())
            }
            Some(n) => integrity_verify(&mut q, clock, n, data, detail),
            None => integrity_write(
                &mut q,
                clock,
                rounds.min(blocks / INTEGRITY_WRITES as u64),
                data,
                detail,
            ),
        }
    })
}

fn integrity_write(
    q: &mut Queue,
    clock: Clock,
    rounds: u64,
    data: u64,
    detail: &mut Line,
) -> Result<(), ()> {
    let mut requests = [(BLK_T_FLUSH, 0); INTEGRITY_WRITES + 1];
    let mut order = [0u16; INTEGRITY_WRITES + 1];
    for round in 0..rounds {
        for (k, request) in requests[..INTEGRITY_WRITES].iter_mut().enumerate() {
            let block = round * INTEGRITY_WRITES as u64 + k as u64;
            let buffer = data + 4096 * k as u64;
            for i in 0..4096 {
                wr(buffer + i, integrity_byte(block, i));
            }
            *request = (BLK_T_OUT, block * 8);
        }
        if let Err(error) = blk_batch(q, clock, &requests, data, &mut order) {
            return fail(detail, "round", error);
        }
        if usize::from(order[INTEGRITY_WRITES]) != INTEGRITY_WRITES {
            detail
                .str("round ")
                .dec(round)
                .str(": the flush completed before a write submitted with it");
            return Err(());
        }
        Serial
            .str("blk-integrity: flushed ")
            .dec((round + 1) * INTEGRITY_WRITES as u64)
            .str("\n");
    }
    detail.str("flushed=").dec(rounds * INTEGRITY_WRITES as u64);
    Ok(())
}

fn integrity_verify(
    q: &mut Queue,
    clock: Clock,
    blocks: u64,
    data: u64,
    detail: &mut Line,
) -> Result<(), ()> {
    let mut requests = [(BLK_T_IN, 0); INTEGRITY_WRITES + 1];
    let mut order = [0u16; INTEGRITY_WRITES + 1];
    let mut first = 0;
    while first < blocks {
        let n = (blocks - first).min(requests.len() as u64) as usize;
        for (k, request) in requests[..n].iter_mut().enumerate() {
            *request = (BLK_T_IN, (first + k as u64) * 8);
        }
        if let Err(error) = blk_batch(q, clock, &requests[..n], data, &mut order) {
            return fail(detail, "read", error);
        }
        for k in 0..n as u64 {
            let block = first + k;
            if (0..4096).any(|i| rd::<u8>(data + 4096 * k + i) != integrity_byte(block, i)) {
                detail
                    .str("block ")
                    .dec(block)
                    .str(" does not hold what was flushed");
                return Err(());
            }
        }
        first += n as u64;
    }
    detail.str("verified=").dec(blocks);
    Ok(())
}

/// Where `blk_batch` puts slot `slot`'s request header and status byte, in
/// the page at `meta`.
fn batch_header(meta: u64, slot: u16) -> u64 {
    meta + 16 * u64::from(slot)
}

fn batch_status(meta: u64, slot: u16) -> u64 {
    meta + 0x800 + u64::from(slot)
}

/// Submits `requests` (`(kind, sector)`: request `k` in slot `k`, its 4 KiB of
/// data at `data + 4096 k`, none for a flush) together and waits for all of
/// them; `order` gets the slots in the order they completed.
fn blk_batch(
    q: &mut Queue,
    clock: Clock,
    requests: &[(u32, u64)],
    data: u64,
    order: &mut [u16],
) -> Result<(), &'static str> {
    blk_submit(q, requests, data, dma(HEADER));
    blk_collect(q, clock, requests.len(), dma(HEADER), order)
}

/// The waiting half of [`blk_batch`]: the `n` requests [`blk_submit`] made
/// available with their headers and statuses at `meta`.
fn blk_collect(
    q: &mut Queue,
    clock: Clock,
    n: usize,
    meta: u64,
    order: &mut [u16],
) -> Result<(), &'static str> {
    let start = rdtsc();
    let mut done = 0;
    while done < n {
        if rd::<u16>(q.ring + USED + 2) == q.used {
            if rdtsc() - start > clock.ms(5000) {
                return Err(if q.needs_reset() {
                    "DEVICE_NEEDS_RESET"
                } else {
                    "timeout"
                });
            }
            continue;
        }
        compiler_fence(Ordering::SeqCst);
        let elem = q.ring + USED + 4 + 8 * u64::from(q.used % q.size);
        let slot = rd::<u32>(elem) as u16 / DESCS_PER_REQUEST;
        q.used = q.used.wrapping_add(1);
        if usize::from(slot) >= n {
            return Err("used id is no request's head");
        }
        if rd::<u8>(batch_status(meta, slot)) != BLK_S_OK {
            return Err("status not OK");
        }
        order[done] = slot;
        done += 1;
        q.arm_used_event();
    }
    let isr = q.dev.read(INTERRUPT_STATUS);
    if isr != 0 {
        q.dev.write(INTERRUPT_ACK, isr);
    }
    Ok(())
}

/// The submitting half of [`blk_batch`]: makes `requests` available, their
/// headers and statuses in the page at `meta`, and notifies the device.
fn blk_submit(q: &mut Queue, requests: &[(u32, u64)], data: u64, meta: u64) {
    let header = |slot| batch_header(meta, slot);
    let status = |slot| batch_status(meta, slot);
    let old = q.avail;
    q.arm_used_event();
    for (k, &(kind, sector)) in requests.iter().enumerate() {
        let slot = k as u16;
        wr(header(slot), kind);
        wr(header(slot) + 4, 0u32);
        wr(header(slot) + 8, sector);
        wr(status(slot), 0xffu8);
        let head = slot * DESCS_PER_REQUEST;
        q.desc(head, header(slot), 16, NEXT, head + 1);
        if kind == BLK_T_FLUSH {
            q.desc(head + 1, status(slot), 1, WRITE, 0);
        } else {
            let writes = if kind == BLK_T_OUT { 0 } else { WRITE };
            q.desc(
                head + 1,
                data + 4096 * u64::from(slot),
                4096,
                NEXT | writes,
                head + 2,
            );
            q.desc(head + 2, status(slot), 1, WRITE, 0);
        }
        q.push_avail(head);
    }
    q.notify_since(old);
}

/// `VIRTIO_BLK_F_MQ` (virtio 1.1, 5.2.3): `num_queues` request queues.
const BLK_F_MQ: u64 = 1 << 12;
/// The most request queues `blk-mq` and `blk-bench` drive.
pub(crate) const MQ_MAX_QUEUES: usize = 16;
/// Requests `blk-mq` keeps in flight on each queue.
const MQ_PER_QUEUE: usize = 8;
/// Rounds of writes, then of reads, of `blk-mq`.
const MQ_ROUNDS: u64 = 2;

/// Negotiates `wanted` and, when `max` is above 1, `VIRTIO_BLK_F_MQ`; sets up
/// as many request queues as the device has (`num_queues`, le16 at config
/// offset 34, with F_MQ; else one), `max` at most, queue `q`'s rings at
/// `ring_at(q)`, 256 entries each; DRIVER_OK. The queues used.
fn mq_setup(
    dev: Dev,
    clock: Clock,
    wanted: u64,
    max: usize,
    ring_at: impl Fn(usize) -> u64,
    queues: &mut [Option<Queue>; MQ_MAX_QUEUES],
) -> Result<usize, &'static str> {
    let mq = if max > 1 { BLK_F_MQ } else { 0 };
    let features = negotiate(dev, clock, wanted | mq)?;
    let n = if features & BLK_F_MQ == 0 {
        1
    } else {
        match u16::from_le_bytes([dev.config_u8(34), dev.config_u8(35)]) {
            0 => return Err("num_queues=0 with VIRTIO_BLK_F_MQ"),
            n => usize::from(n).min(max),
        }
    };
    for (q, slot) in queues[..n].iter_mut().enumerate() {
        *slot = Some(setup_queue_at(
            dev,
            clock,
            q as u16,
            features,
            ring_at(q),
            BENCH_QUEUE_SIZE,
        )?);
    }
    driver_ok(dev)?;
    Ok(n)
}

/// `blk-mq`: on the first writable disk, `VIRTIO_BLK_F_MQ` negotiated when
/// offered and every queue set up (16 at most; one without F_MQ); rounds of 8
/// writes of 4 KiB on each queue, every queue's in flight together; a flush on
/// each queue; then each queue's blocks read back through the next queue and
/// checked. Block `(round * queues + q) * 8 + k` is queue `q`'s `k`-th write of
/// `round`, and holds [`integrity_byte`].
pub fn blk_mq(machine: &Machine, detail: &mut Line) -> bool {
    if crate::mobility::free_region(machine, "blk-mq buffers", 1, detail).is_none() {
        return false;
    }
    let base = crate::mobility::DIRTY_BASE;
    with_writable_disk(machine, detail, |dev, clock, detail| {
        let mut queues: [Option<Queue>; MQ_MAX_QUEUES] = core::array::from_fn(|_| None);
        let wanted = F_EVENT_IDX | BLK_F_FLUSH;
        let ring_at = |q: usize| base + 0x3000 * q as u64;
        match mq_setup(dev, clock, wanted, MQ_MAX_QUEUES, ring_at, &mut queues) {
            Ok(n) => blk_mq_body(&mut queues, n, clock, base, detail),
            Err(error) => fail(detail, "set-up", error),
        }
    })
}

fn blk_mq_body(
    queues: &mut [Option<Queue>; MQ_MAX_QUEUES],
    n: usize,
    clock: Clock,
    base: u64,
    detail: &mut Line,
) -> Result<(), ()> {
    // After the rings: a page of headers and statuses, then the data, per queue.
    let meta = |q: usize| base + 0x30000 + 0x1000 * q as u64;
    let data = |q: usize| base + 0x40000 + (MQ_PER_QUEUE * 4096 * q) as u64;
    let block = |round: u64, q: usize, k: usize| (round * n as u64 + q as u64) * 8 + k as u64;
    let blocks = MQ_ROUNDS * (n * MQ_PER_QUEUE) as u64;
    let Some(first) = queues[0].as_ref() else {
        return fail(detail, "set-up", "no queue 0");
    };
    let flush = first.features & BLK_F_FLUSH != 0;
    if first.dev.config_u64(0) / 8 < blocks {
        return fail(detail, "capacity", "smaller than the blocks written");
    }
    let mut counts = [0u64; MQ_MAX_QUEUES];
    let mut order = [0u16; MQ_PER_QUEUE];
    let mut requests = [(BLK_T_OUT, 0); MQ_PER_QUEUE];
    // Submits `requests[..len]` on each queue `q` (what `fill(q)` put there),
    // then waits for every queue's.
    let mut batch = |what: &str,
                     fill: &mut dyn FnMut(usize, &mut [(u32, u64); MQ_PER_QUEUE]),
                     len: usize,
                     counts: &mut [u64; MQ_MAX_QUEUES],
                     detail: &mut Line|
     -> Result<(), ()> {
        for (q, queue) in queues[..n].iter_mut().flatten().enumerate() {
            fill(q, &mut requests);
            blk_submit(queue, &requests[..len], data(q), meta(q));
        }
        for (q, queue) in queues[..n].iter_mut().flatten().enumerate() {
            if let Err(error) = blk_collect(queue, clock, len, meta(q), &mut order) {
                detail.str("queue ").dec(q as u64).str(" ");
                return fail(detail, what, error);
            }
            counts[q] += len as u64;
        }
        Ok(())
    };
    for round in 0..MQ_ROUNDS {
        let mut writes = |q: usize, requests: &mut [(u32, u64); MQ_PER_QUEUE]| {
            for (k, request) in requests.iter_mut().enumerate() {
                let b = block(round, q, k);
                let buffer = data(q) + 4096 * k as u64;
                for i in 0..4096 {
                    wr(buffer + i, integrity_byte(b, i));
                }
                *request = (BLK_T_OUT, b * 8);
            }
        };
        batch("write", &mut writes, MQ_PER_QUEUE, &mut counts, detail)?;
    }
    if flush {
        let mut flushes = |_: usize, requests: &mut [(u32, u64); MQ_PER_QUEUE]| {
            requests[0] = (BLK_T_FLUSH, 0);
        };
        batch("flush", &mut flushes, 1, &mut counts, detail)?;
    }
    for round in 0..MQ_ROUNDS {
        // Queue `q` reads what queue `q - 1` wrote.
        let writer = |q: usize| (q + n - 1) % n;
        let mut reads = |q: usize, requests: &mut [(u32, u64); MQ_PER_QUEUE]| {
            for (k, request) in requests.iter_mut().enumerate() {
                *request = (BLK_T_IN, block(round, writer(q), k) * 8);
            }
        };
        batch("read", &mut reads, MQ_PER_QUEUE, &mut counts, detail)?;
        for q in 0..n {
            for k in 0..MQ_PER_QUEUE {
                let b = block(round, writer(q), k);
                let buffer = data(q) + 4096 * k as u64;
                if (0..4096).any(|i| rd::<u8>(buffer + i) != integrity_byte(b, i)) {
                    detail
                        .str("block ")
                        .dec(b)
                        .str(" read back through queue ")
                        .dec(q as u64)
                        .str(" does not hold what was written");
                    return Err(());
                }
            }
        }
    }
    detail
        .str("queues=")
        .dec(n as u64)
        .str(" blocks=")
        .dec(blocks)
        .str(" flush=")
        .dec(u64::from(flush))
        .str(" per_queue=");
    for (q, count) in counts[..n].iter().enumerate() {
        if q > 0 {
            detail.str(",");
        }
        detail.dec(*count);
    }
    Ok(())
}

/// `flood` runs this long without `flood_s=`.
const FLOOD_DEFAULT_S: u64 = 5;
/// The longest `flood_s=`.
const FLOOD_MAX_S: u64 = 3600;
/// How long one `flood` request may wait: a rate-limited device may hold it.
const FLOOD_REQUEST_MS: u64 = 30_000;

/// `flood_s=N` (decimal seconds, 1 to [`FLOOD_MAX_S`]); the default without it.
fn flood_seconds(machine: &Machine) -> Result<u64, &[u8]> {
    let seconds = machine.info.param_number(b"flood_s", 1, FLOOD_MAX_S)?;
    Ok(seconds.unwrap_or(FLOOD_DEFAULT_S))
}

/// `flood`: 4 KiB reads, one at a time, as fast as the first virtio-blk disk
/// serves them, for `flood_s=` seconds (TSC time, at CPL3); prints
/// `flood: <ops> ops in second <k>` at the end of each second, so that a host
/// sees its rate limit bite.
pub fn flood(machine: &Machine, detail: &mut Line) -> bool {
    let seconds = match flood_seconds(machine) {
        Ok(s) => s,
        Err(value) => {
            detail
                .str("flood_s=")
                .bytes(value)
                .str(": expected 1 to ")
                .dec(FLOOD_MAX_S)
                .str(" seconds");
            return false;
        }
    };
    with_any_blk(machine, detail, |q, clock, detail| {
        flood_body(q, clock, seconds, detail)
    })
}

fn flood_body(q: &mut Queue, clock: Clock, seconds: u64, detail: &mut Line) -> Result<(), ()> {
    let span = bench_span(q, detail)?;
    let second = clock.ms(1000);
    let start = rdtsc();
    let (mut total, mut in_second, mut k) = (0u64, 0u64, 1u64);
    while k <= seconds {
        let status = bench_request(q, BLK_T_IN, READ_BUF, total, span, FLOOD_REQUEST_MS);
        expect_ok(detail, "read", status)?;
        total += 1;
        in_second += 1;
        // A request that outlasted several seconds counts in the one it ended in;
        // the seconds it spanned report 0.
        while k <= seconds && rdtsc() - start >= k * second {
            Serial
                .str("flood: ")
                .dec(in_second)
                .str(" ops in second ")
                .dec(k)
                .str("\n");
            in_second = 0;
            k += 1;
        }
    }
    detail.str("ops=").dec(total).str(" seconds=").dec(seconds);
    Ok(())
}

/// The `mobility` scenario's disk records: record `n` fills sector `n` (512 bytes):
/// `VIGILREC`, `n` (u64, little-endian), 488 payload bytes ([`record_byte`]),
/// and the FNV-1a 64 hash of the 504 bytes before it (u64).
const RECORD_MAGIC: &[u8; 8] = b"VIGILREC";
const RECORD_HASH_AT: u64 = 504;
/// Written records are read back and checked this many at a time (one 4 KiB
/// request), each time that many more are written.
const RECORDS_PER_CHECK: u64 = PER_REQUEST;

/// Payload byte `i` (16..504) of record `n`.
fn record_byte(n: u64, i: u64) -> u8 {
    (n.wrapping_mul(13) ^ i.wrapping_mul(7)) as u8
}

/// FNV-1a 64 of `len` bytes at `addr`.
fn fnv1a(addr: u64, len: u64) -> u64 {
    (0..len).fold(0xcbf2_9ce4_8422_2325, |h, i| {
        (h ^ u64::from(rd::<u8>(addr + i))).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Writes record `n` at `addr`.
fn fill_record(addr: u64, n: u64) {
    for (i, &b) in RECORD_MAGIC.iter().enumerate() {
        wr(addr + i as u64, b);
    }
    wr(addr + 8, n);
    for i in 16..RECORD_HASH_AT {
        wr(addr + i, record_byte(n, i));
    }
    wr(addr + RECORD_HASH_AT, fnv1a(addr, RECORD_HASH_AT));
}

/// Whether `addr` holds record `n`, intact.
fn is_record(addr: u64, n: u64) -> bool {
    RECORD_MAGIC
        .iter()
        .enumerate()
        .all(|(i, &b)| rd::<u8>(addr + i as u64) == b)
        && rd::<u64>(addr + 8) == n
        && (16..RECORD_HASH_AT).all(|i| rd::<u8>(addr + i) == record_byte(n, i))
        && rd::<u64>(addr + RECORD_HASH_AT) == fnv1a(addr, RECORD_HASH_AT)
}

/// A virtio-blk disk written with records, one request at a time, its queue's
/// rings apart from those of other devices.
pub(crate) struct Records {
    q: Queue,
    capacity: u64,
    /// Records written (the next one's number) and checked by reading back.
    pub(crate) written: u64,
    pub(crate) checked: u64,
}

impl Records {
    /// The first virtio-blk device without `VIRTIO_BLK_F_RO`, set up.
    pub(crate) fn open(devices: &Devices, clock: Clock) -> Result<Records, &'static str> {
        let dev = find(devices, clock, ID_BLK, |f| f & BLK_F_RO == 0)
            .ok_or("no virtio-blk device without VIRTIO_BLK_F_RO")?;
        let features = negotiate(dev, clock, 0)?;
        let q = setup_queue_at(dev, clock, 0, features, dma(RINGS_SECOND), QUEUE_SIZE)?;
        driver_ok(dev)?;
        Ok(Records {
            capacity: dev.config_u64(0),
            q,
            written: 0,
            checked: 0,
        })
    }

    /// Whether every sector holds a record.
    pub(crate) fn full(&self) -> bool {
        self.written == self.capacity
    }

    /// Writes the next record; each [`RECORDS_PER_CHECK`] records, reads them
    /// back and checks them. The error names the request or the record.
    pub(crate) fn write_next(&mut self, detail: &mut Line) -> Result<(), ()> {
        let n = self.written;
        fill_record(dma(WRITE_BUF), n);
        expect_ok(
            detail,
            "blk write",
            self.q.blk(BLK_T_OUT, n, dma(WRITE_BUF), SECTOR),
        )?;
        self.written += 1;
        if self.written - self.checked == RECORDS_PER_CHECK {
            self.check(detail)?;
        }
        Ok(())
    }

    /// Reads back the records written since the last check (up to
    /// [`RECORDS_PER_CHECK`] at a time) and checks each.
    pub(crate) fn check(&mut self, detail: &mut Line) -> Result<(), ()> {
        while self.checked < self.written {
            let first = self.checked;
            let count = (self.written - first).min(RECORDS_PER_CHECK);
            let len = (count * u64::from(SECTOR)) as u32;
            expect_ok(
                detail,
                "blk read",
                self.q.blk(BLK_T_IN, first, dma(READ_BUF), len),
            )?;
            for k in 0..count {
                if !is_record(dma(READ_BUF) + k * u64::from(SECTOR), first + k) {
                    detail
                        .str("blk record ")
                        .dec(first + k)
                        .str(" read back wrong");
                    return Err(());
                }
            }
            self.checked += count;
        }
        Ok(())
    }

    /// Resets the device.
    pub(crate) fn reset(&self) {
        let _ = self.q.dev.reset(self.q.clock);
    }

    /// Reads every record written so far back and checks it.
    pub(crate) fn check_all(&mut self, detail: &mut Line) -> Result<(), ()> {
        self.checked = 0;
        self.check(detail)
    }
}
