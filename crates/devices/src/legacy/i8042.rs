//! The i8042 keyboard controller, reduced to what guests use it for: the CPU reset
//! line (`reboot=k` in Linux, and Firecracker-style guests' exit path), the
//! controller commands a driver probes with, and a keyboard that can type one thing:
//! Ctrl-Alt-Del, which a host sends to ask the guest to reboot or shut down.
//!
//! The controller answers like Firecracker's: the keyboard acknowledges every
//! command (`0xfa`), keys are scan code set 2 make codes in the output buffer, and
//! each byte put there raises IRQ 1 when the guest enabled keyboard interrupts.

use std::collections::VecDeque;

use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::{PowerEvent, PowerHandler};

/// Offset of the data port (0x60) from the device's base.
pub const DATA: u64 = 0;
/// Offset of the status (read) and command (write) port (0x64).
pub const COMMAND: u64 = 4;

/// Status: the output buffer holds a byte for the guest.
pub const STATUS_OUTPUT_FULL: u8 = 1 << 0;
/// Status: the system flag (set once the controller passed its self-test).
pub const STATUS_SYSTEM: u8 = 1 << 2;
/// Status: the last write was a command (port 0x64), not data.
pub const STATUS_COMMAND: u8 = 1 << 3;

/// Controller configuration: keyboard interrupt enabled.
const CTR_KBD_INT: u8 = 1 << 0;
/// Controller configuration: the system flag.
const CTR_SYSTEM: u8 = 1 << 2;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_DISABLE_KBD: u8 = 0xad;
const CMD_ENABLE_KBD: u8 = 0xae;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_WRITE_AUX: u8 = 0xd4;
const CMD_RESET_CPU: u8 = 0xfe;

const KBD_ACK: u8 = 0xfa;
const KBD_RESET: u8 = 0xff;
const KBD_GET_ID: u8 = 0xf2;
const KBD_SELF_TEST_OK: u8 = 0xaa;

/// Scan code set 2 make codes of Ctrl, Alt and Delete, in the order they are pressed.
pub const CTRL_ALT_DEL: [u8; 4] = [0x14, 0x11, 0xe0, 0x71];

/// Bytes the output buffer holds at most; a guest that does not read loses the rest.
pub(super) const BUFFER_MAX: usize = 16;

/// What the next data byte is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Pending {
    None,
    Ctr,
    OutputPort,
    Aux,
}

impl Pending {
    /// The name a saved state gives it.
    pub(super) fn name(self) -> &'static str {
        match self {
            Pending::None => "none",
            Pending::Ctr => "ctr",
            Pending::OutputPort => "output_port",
            Pending::Aux => "aux",
        }
    }

    pub(super) fn by_name(name: &str) -> Option<Self> {
        [
            Pending::None,
            Pending::Ctr,
            Pending::OutputPort,
            Pending::Aux,
        ]
        .into_iter()
        .find(|p| p.name() == name)
    }
}

/// i8042 at ports 0x60 (data) and 0x64 (command/status): register it with length 5.
pub struct I8042 {
    power: PowerHandler,
    irq: Option<EventFd>,
    pub(super) buffer: VecDeque<u8>,
    pub(super) status: u8,
    pub(super) ctr: u8,
    pub(super) pending: Pending,
}

impl I8042 {
    /// A controller that reports [`PowerEvent::Reset`] when the guest pulses reset,
    /// with no keyboard interrupt line.
    pub fn new(handler: PowerHandler) -> Self {
        Self {
            power: handler,
            irq: None,
            buffer: VecDeque::new(),
            status: STATUS_SYSTEM,
            ctr: CTR_KBD_INT | CTR_SYSTEM,
            pending: Pending::None,
        }
    }

    /// The same, raising `irq` (IRQ 1) when a byte waits for the guest.
    pub fn with_irq(handler: PowerHandler, irq: EventFd) -> Self {
        Self {
            irq: Some(irq),
            ..Self::new(handler)
        }
    }

    /// Presses Ctrl, Alt and Delete: the bytes of [`CTRL_ALT_DEL`] go to the output
    /// buffer and the keyboard interrupt is raised. Returns false (and queues
    /// nothing) when the buffer has no room for all of them.
    pub fn send_ctrl_alt_del(&mut self) -> bool {
        if self.buffer.len() + CTRL_ALT_DEL.len() > BUFFER_MAX {
            return false;
        }
        for byte in CTRL_ALT_DEL {
            self.push(byte);
        }
        true
    }

    fn push(&mut self, byte: u8) {
        if self.buffer.len() >= BUFFER_MAX {
            tracing::debug!(byte, "i8042 output buffer full; byte dropped");
            return;
        }
        self.buffer.push_back(byte);
        self.status |= STATUS_OUTPUT_FULL;
        self.raise();
    }

    fn raise(&self) {
        if self.ctr & CTR_KBD_INT == 0 {
            return;
        }
        if let Some(irq) = &self.irq {
            if let Err(e) = irq.write(1) {
                tracing::warn!("i8042 cannot raise its interrupt: {e}");
            }
        }
    }

    fn read_data(&mut self) -> u8 {
        let byte = self.buffer.pop_front().unwrap_or(0);
        if self.buffer.is_empty() {
            self.status &= !STATUS_OUTPUT_FULL;
        } else {
            // Edge-triggered line: one interrupt per byte the guest has to read.
            self.raise();
        }
        byte
    }

    fn command(&mut self, cmd: u8) {
        self.status |= STATUS_COMMAND;
        self.pending = Pending::None;
        match cmd {
            CMD_READ_CTR => self.push(self.ctr),
            CMD_WRITE_CTR => self.pending = Pending::Ctr,
            CMD_SELF_TEST => self.push(0x55),
            CMD_KBD_TEST => self.push(0x00),
            CMD_DISABLE_KBD | CMD_ENABLE_KBD => {}
            CMD_READ_OUTPUT_PORT => self.push(0x01),
            CMD_WRITE_OUTPUT_PORT => self.pending = Pending::OutputPort,
            CMD_WRITE_AUX => self.pending = Pending::Aux,
            CMD_RESET_CPU => (self.power)(PowerEvent::Reset),
            other => tracing::debug!(cmd = other, "i8042 command ignored"),
        }
    }

    fn write_data(&mut self, value: u8) {
        self.status &= !STATUS_COMMAND;
        match std::mem::replace(&mut self.pending, Pending::None) {
            Pending::Ctr => self.ctr = value,
            // Bit 0 of the output port is the reset line, active low.
            Pending::OutputPort if value & 1 == 0 => (self.power)(PowerEvent::Reset),
            Pending::OutputPort | Pending::Aux => {}
            Pending::None => match value {
                KBD_RESET => {
                    self.push(KBD_ACK);
                    self.push(KBD_SELF_TEST_OK);
                }
                KBD_GET_ID => {
                    self.push(KBD_ACK);
                    self.push(0xab);
                    self.push(0x83);
                }
                _ => self.push(KBD_ACK),
            },
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        super::read_byte_register(data, || match offset {
            DATA => self.read_data(),
            COMMAND => self.status,
            _ => 0,
        });
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data) {
            (DATA, [value]) => self.write_data(*value),
            (COMMAND, [value]) => self.command(*value),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn device() -> (I8042, Arc<Mutex<Vec<PowerEvent>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        (
            I8042::new(Arc::new(move |e| s.lock().unwrap().push(e))),
            seen,
        )
    }

    fn read(dev: &mut I8042, offset: u64) -> u8 {
        let mut b = [0u8];
        dev.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn reset_command_reports_reset() {
        let (mut dev, seen) = device();
        dev.write(4, &[0x20]);
        dev.write(0, &[0xfe]);
        assert!(seen.lock().unwrap().is_empty());
        dev.write(4, &[0xfe]);
        assert_eq!(*seen.lock().unwrap(), vec![PowerEvent::Reset]);
    }

    #[test]
    fn ctrl_alt_del_is_what_the_guest_reads_with_one_interrupt_per_byte() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = I8042::with_irq(Arc::new(|_| {}), irq.try_clone().unwrap());
        assert_eq!(read(&mut dev, COMMAND) & STATUS_OUTPUT_FULL, 0);
        assert!(dev.send_ctrl_alt_del());
        // Four bytes queued, each raised the line.
        assert_eq!(irq.read().unwrap(), 4);
        let mut got = Vec::new();
        while read(&mut dev, COMMAND) & STATUS_OUTPUT_FULL != 0 {
            got.push(read(&mut dev, DATA));
        }
        assert_eq!(got, [0x14, 0x11, 0xe0, 0x71]);
        // Reading re-raised the line for each byte still waiting.
        assert_eq!(irq.read().unwrap(), 3);
        assert_eq!(read(&mut dev, DATA), 0);
    }

    #[test]
    fn no_interrupt_when_the_guest_disabled_it_and_a_full_buffer_refuses() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = I8042::with_irq(Arc::new(|_| {}), irq.try_clone().unwrap());
        dev.write(COMMAND, &[CMD_WRITE_CTR]);
        dev.write(DATA, &[CTR_SYSTEM]);
        assert!(dev.send_ctrl_alt_del());
        assert!(irq.read().is_err(), "no interrupt with CTR bit 0 clear");
        assert!(dev.send_ctrl_alt_del());
        assert!(dev.send_ctrl_alt_del());
        assert!(dev.send_ctrl_alt_del());
        assert!(!dev.send_ctrl_alt_del(), "16 bytes is the most it holds");
    }

    #[test]
    fn controller_and_keyboard_answer_a_driver_probe() {
        let (mut dev, _) = device();
        dev.write(COMMAND, &[CMD_SELF_TEST]);
        assert_eq!(read(&mut dev, DATA), 0x55);
        dev.write(COMMAND, &[CMD_READ_CTR]);
        assert_eq!(read(&mut dev, DATA), CTR_KBD_INT | CTR_SYSTEM);
        dev.write(COMMAND, &[CMD_WRITE_CTR]);
        dev.write(DATA, &[0x47]);
        dev.write(COMMAND, &[CMD_READ_CTR]);
        assert_eq!(read(&mut dev, DATA), 0x47);
        dev.write(DATA, &[KBD_RESET]);
        assert_eq!(read(&mut dev, DATA), KBD_ACK);
        assert_eq!(read(&mut dev, DATA), KBD_SELF_TEST_OK);
        dev.write(DATA, &[0xed]);
        assert_eq!(read(&mut dev, DATA), KBD_ACK);
        assert_eq!(read(&mut dev, COMMAND) & STATUS_OUTPUT_FULL, 0);
    }

    #[test]
    fn output_port_reset_line() {
        let (mut dev, seen) = device();
        dev.write(COMMAND, &[CMD_WRITE_OUTPUT_PORT]);
        dev.write(DATA, &[0xfe]);
        assert_eq!(*seen.lock().unwrap(), vec![PowerEvent::Reset]);
    }
}
