//! The `balloon` scenario: a virtio-balloon driver that gives the host the pages it
//! asks for (inflate), holds them long enough for the host to see its resident
//! memory drop, takes them back (deflate) and checks they come back zeroed, i.e.
//! that the host really discarded them.
//!
//! Discovery runs at CPL0; set-up and the data path at CPL3 (native here), like the
//! other virtio scenarios. Two queues (inflate 0, deflate 1), polled.

use core::arch::global_asm;
use core::ptr::{addr_of, read_volatile, write_volatile};
use core::sync::atomic::{compiler_fence, Ordering};

use crate::cpu::{self, rdtsc};
use crate::serial::{Line, Out, Serial};
use crate::{virtio, Machine};

const ID_BALLOON: u32 = 5;
// virtio-mmio registers and status bits (virtio 1.1, 4.2.2).
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
const CONFIG: u64 = 0x100;
const ACKNOWLEDGE: u32 = 1;
const DRIVER: u32 = 2;
const DRIVER_OK: u32 = 4;
const FEATURES_OK: u32 = 8;

const QUEUE_SIZE: u32 = 8;
/// Page numbers per request: one 4 KiB buffer of little-endian u32s.
const PFNS_PER_REQUEST: u64 = 1024;
/// Where the pages the balloon gives back live: RAM above the guest's own image.
const POOL_START: u64 = 16 << 20;
const PAGE: u64 = 4096;
/// How long each phase holds so the host can read its resident memory.
const HOLD_MS: u64 = 1500;

// Per queue: descriptors, avail ring, used ring (a page each); then the PFN buffer.
global_asm!(
    r#"
    .section .dma, "aw", @nobits
    .balign 4096
    .skip 16384
    .global BALLOON_STACK_TOP
BALLOON_STACK_TOP:
    .global BALLOON_DMA
BALLOON_DMA:
    .skip 4096 * 7
    "#,
    options(att_syntax)
);

extern "C" {
    static BALLOON_STACK_TOP: u8;
    static BALLOON_DMA: u8;
}

fn dma(page: u64) -> u64 {
    addr_of!(BALLOON_DMA) as u64 + page * PAGE
}

const PFN_BUF: u64 = 6;

fn rd<T: Copy>(addr: u64) -> T {
    // SAFETY: MMIO registers, the DMA area and the page pool, all identity-mapped.
    unsafe { read_volatile(addr as *const T) }
}

fn wr<T: Copy>(addr: u64, value: T) {
    // SAFETY: as for rd.
    unsafe { write_volatile(addr as *mut T, value) }
}

struct Balloon {
    base: u64,
    tsc_khz: u64,
    avail: [u16; 2],
    used: [u16; 2],
    size: [u16; 2],
}

impl Balloon {
    fn reg(&self, offset: u64) -> u32 {
        rd(self.base + offset)
    }

    fn set(&self, offset: u64, value: u32) {
        wr(self.base + offset, value)
    }

    fn setup(&mut self) -> Result<(), &'static str> {
        self.set(STATUS, 0);
        self.set(STATUS, ACKNOWLEDGE | DRIVER);
        self.set(DEVICE_FEATURES_SEL, 1);
        if self.reg(DEVICE_FEATURES) & 1 == 0 {
            return Err("no VIRTIO_F_VERSION_1");
        }
        // VERSION_1 only: no statistics or reporting queues.
        self.set(DRIVER_FEATURES_SEL, 0);
        self.set(DRIVER_FEATURES, 0);
        self.set(DRIVER_FEATURES_SEL, 1);
        self.set(DRIVER_FEATURES, 1);
        self.set(STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        if self.reg(STATUS) & FEATURES_OK == 0 {
            return Err("FEATURES_OK not accepted");
        }
        for q in 0..2u64 {
            self.set(QUEUE_SEL, q as u32);
            let max = self.reg(QUEUE_NUM_MAX);
            if max == 0 {
                return Err("missing inflate or deflate queue");
            }
            let size = max.min(QUEUE_SIZE);
            self.size[q as usize] = size as u16;
            self.set(QUEUE_NUM, size);
            for (i, reg) in [QUEUE_DESC, QUEUE_DRIVER, QUEUE_DEVICE].into_iter().enumerate() {
                let addr = dma(q * 3 + i as u64);
                // SAFETY: a page of the DMA area.
                unsafe { core::ptr::write_bytes(addr as *mut u8, 0, PAGE as usize) };
                self.set(reg, addr as u32);
                self.set(reg + 4, (addr >> 32) as u32);
            }
            self.set(QUEUE_READY, 1);
        }
        self.set(STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
        Ok(())
    }

    /// Sends `count` page numbers from the PFN buffer on queue `q` and waits for them.
    fn send(&mut self, q: usize, count: u64) -> Result<(), &'static str> {
        let (desc, avail, used) = (dma(q as u64 * 3), dma(q as u64 * 3 + 1), dma(q as u64 * 3 + 2));
        wr(desc, dma(PFN_BUF));
        wr(desc + 8, (count * 4) as u32);
        wr(desc + 12, 0u16);
        wr(avail + 4 + 2 * u64::from(self.avail[q] % self.size[q]), 0u16);
        compiler_fence(Ordering::SeqCst);
        self.avail[q] = self.avail[q].wrapping_add(1);
        wr(avail + 2, self.avail[q]);
        compiler_fence(Ordering::SeqCst);
        self.set(QUEUE_NOTIFY, q as u32);
        let start = rdtsc();
        while rd::<u16>(used + 2) == self.used[q] {
            if rdtsc() - start > self.tsc_khz * 2000 {
                return Err("timeout");
            }
        }
        self.used[q] = self.used[q].wrapping_add(1);
        let isr = self.reg(INTERRUPT_STATUS);
        self.set(INTERRUPT_ACK, isr);
        Ok(())
    }

    /// Sends the pages of the pool, `PFNS_PER_REQUEST` at a time, on queue `q`.
    fn send_pool(&mut self, q: usize, pages: u64) -> Result<(), &'static str> {
        let mut done = 0;
        while done < pages {
            let n = (pages - done).min(PFNS_PER_REQUEST);
            for i in 0..n {
                wr(dma(PFN_BUF) + 4 * i, ((POOL_START / PAGE) + done + i) as u32);
            }
            self.send(q, n)?;
            done += n;
        }
        Ok(())
    }

    fn hold(&self) {
        let start = rdtsc();
        while rdtsc() - start < self.tsc_khz * HOLD_MS {}
    }
}

pub fn balloon(machine: &Machine, detail: &mut Line) -> bool {
    let Some(base) = virtio::find_base(machine, ID_BALLOON) else {
        detail.str("no virtio-balloon device");
        return false;
    };
    let mut pass = false;
    let mut driver = Balloon {
        base,
        tsc_khz: machine.delay_tsc_khz(),
        avail: [0; 2],
        used: [0; 2],
        size: [0; 2],
    };
    let ram_top = machine.info.ram_top();
    cpu::run_user(addr_of!(BALLOON_STACK_TOP) as u64, &mut || {
        pass = run(&mut driver, ram_top, detail).is_ok();
    });
    let _ = pass;
    pass
}

fn run(b: &mut Balloon, ram_top: u64, detail: &mut Line) -> Result<(), ()> {
    let fail = |detail: &mut Line, what: &str| {
        detail.str(what);
        Err(())
    };
    if let Err(e) = b.setup() {
        return fail(detail, e);
    }
    let pages = u64::from(b.reg(CONFIG));
    if pages == 0 {
        return fail(detail, "the host asks for no pages (num_pages=0)");
    }
    if POOL_START + pages * PAGE > ram_top.min(1 << 32) {
        return fail(detail, "the host asks for more pages than the pool has");
    }
    for p in 0..pages {
        wr(POOL_START + p * PAGE, 0x5a5a_0000_0000_0000u64 | p);
    }
    Serial.str("balloon: touched ").dec(pages).str(" pages\n");
    b.hold();
    if let Err(e) = b.send_pool(0, pages) {
        detail.str("inflate: ");
        return fail(detail, e);
    }
    b.set(CONFIG + 4, pages as u32);
    Serial.str("balloon: inflated ").dec(pages).str(" pages\n");
    b.hold();
    if let Err(e) = b.send_pool(1, pages) {
        detail.str("deflate: ");
        return fail(detail, e);
    }
    b.set(CONFIG + 4, 0);
    // Pages the host discarded come back as zeroes.
    let zeroed = (0..pages).filter(|p| rd::<u64>(POOL_START + p * PAGE) == 0).count() as u64;
    b.set(STATUS, 0);
    detail.str("pages=").dec(pages).str(" zeroed=").dec(zeroed);
    if zeroed != pages {
        return Err(());
    }
    Ok(())
}
