//! Polled output on the 8250 UART at 0x3f8, with hand-written number formatting
//! (no `core::fmt`: its precompiled code uses SSE, which CPL0 cannot run here).

use crate::cpu::{inb, outb, rdtsc};

const COM1: u16 = 0x3f8;
const LSR_THR_EMPTY: u8 = 0x20;
const LSR_DATA_READY: u8 = 0x01;

/// Interrupts off, 8 data bits, no parity, 1 stop bit.
pub fn init() {
    outb(COM1 + 1, 0);
    outb(COM1 + 3, 0x03);
}

/// Polls for one received byte (LSR bit 0, then RBR) for up to `timeout_tsc` TSC
/// ticks; `None` when none arrived.
pub fn read_byte(timeout_tsc: u64) -> Option<u8> {
    let start = rdtsc();
    loop {
        if inb(COM1 + 5) & LSR_DATA_READY != 0 {
            return Some(inb(COM1));
        }
        if rdtsc().wrapping_sub(start) >= timeout_tsc {
            return None;
        }
    }
}

/// Text output with the few formats the guest prints.
pub trait Out {
    fn byte(&mut self, byte: u8);

    fn str(&mut self, s: &str) -> &mut Self {
        self.bytes(s.as_bytes())
    }

    fn bytes(&mut self, bytes: &[u8]) -> &mut Self {
        for &byte in bytes {
            self.byte(byte);
        }
        self
    }

    fn dec(&mut self, mut value: u64) -> &mut Self {
        let mut digits = [0u8; 20];
        let mut start = digits.len();
        loop {
            start -= 1;
            digits[start] = b'0' + (value % 10) as u8;
            value /= 10;
            if value == 0 {
                break;
            }
        }
        self.bytes(&digits[start..])
    }

    /// `0x` then lowercase hex digits, no leading zeros.
    fn hex(&mut self, value: u64) -> &mut Self {
        self.str("0x");
        let mut shift = 60;
        while shift > 0 && (value >> shift) == 0 {
            shift -= 4;
        }
        loop {
            self.byte(b"0123456789abcdef"[((value >> shift) & 0xf) as usize]);
            if shift == 0 {
                return self;
            }
            shift -= 4;
        }
    }

    /// Comma-separated decimal numbers.
    fn dec_list(&mut self, values: &[u32]) -> &mut Self {
        for (i, &value) in values.iter().enumerate() {
            if i > 0 {
                self.byte(b',');
            }
            self.dec(u64::from(value));
        }
        self
    }
}

/// The serial console.
pub struct Serial;

impl Out for Serial {
    fn byte(&mut self, byte: u8) {
        while inb(COM1 + 5) & LSR_THR_EMPTY == 0 {}
        outb(COM1, byte);
    }
}

/// A line built before it is printed (scenario details).
pub struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Line {
    pub const fn new() -> Line {
        Line {
            buf: [0; 256],
            len: 0,
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl Out for Line {
    /// Truncates silently: a detail is a diagnostic, not data.
    fn byte(&mut self, byte: u8) {
        if self.len < self.buf.len() {
            self.buf[self.len] = byte;
            self.len += 1;
        }
    }
}
