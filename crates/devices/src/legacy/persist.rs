//! The saved state of the legacy devices that keep any: the 8250's registers
//! and receive FIFO, and the i8042's output buffer and registers. The ACPI
//! power and debug-exit ports keep none. Like every state (see
//! [`crate::persist`]), each is checked when it is restored.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use super::i8042::{Pending, BUFFER_MAX};
use super::serial::{ConsoleOutput, IrqTrigger};
use super::{Serial, I8042};
use crate::persist::{Persist, RestoreError};
use crate::PowerHandler;

/// The 16550's registers and the bytes waiting in its receive FIFO: a serde
/// mirror of `vm_superio::serial::SerialState`.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SerialState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    /// Received bytes the guest has not read yet.
    pub in_buffer: Vec<u8>,
}

impl Persist for Serial {
    type State = SerialState;
    /// The interrupt and where the console goes: the restoring process's.
    type Resources = (EventFd, ConsoleOutput);

    fn save(&self) -> SerialState {
        let s = self.inner.state();
        SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    fn restore((irq, out): Self::Resources, s: &SerialState) -> Result<Self, RestoreError> {
        let state = vm_superio::serial::SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        };
        let inner = vm_superio::Serial::from_state(
            &state,
            IrqTrigger(irq),
            vm_superio::serial::NoEvents,
            out,
        )
        .map_err(|e| {
            RestoreError::invalid(
                "in_buffer",
                format_args!("{} bytes", s.in_buffer.len()),
                format!("more than the receive FIFO holds ({e:?})"),
            )
        })?;
        Ok(Serial { inner })
    }
}

/// The i8042's output buffer and registers.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct I8042State {
    /// Bytes waiting for the guest, oldest first (at most 16).
    pub buffer: Vec<u8>,
    pub status: u8,
    /// The controller configuration byte.
    pub ctr: u8,
    /// What the next data byte is for: `none`, `ctr`, `output_port` or `aux`.
    pub pending: String,
}

impl Persist for I8042 {
    type State = I8042State;
    /// Where a reset goes, and the keyboard interrupt.
    type Resources = (PowerHandler, EventFd);

    fn save(&self) -> I8042State {
        I8042State {
            buffer: self.buffer.iter().copied().collect(),
            status: self.status,
            ctr: self.ctr,
            pending: self.pending.name().into(),
        }
    }

    fn restore((power, irq): Self::Resources, s: &I8042State) -> Result<Self, RestoreError> {
        if s.buffer.len() > BUFFER_MAX {
            return Err(RestoreError::invalid(
                "buffer",
                format_args!("{} bytes", s.buffer.len()),
                format!("the output buffer holds at most {BUFFER_MAX}"),
            ));
        }
        let pending = Pending::by_name(&s.pending).ok_or_else(|| {
            RestoreError::invalid(
                "pending",
                format_args!("{:?}", s.pending),
                "expected none, ctr, output_port or aux",
            )
        })?;
        let mut i8042 = I8042::with_irq(power, irq);
        i8042.buffer = VecDeque::from(s.buffer.clone());
        i8042.status = s.status;
        i8042.ctr = s.ctr;
        i8042.pending = pending;
        Ok(i8042)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::bus::BusDevice;

    fn irq() -> EventFd {
        EventFd::new(libc::EFD_NONBLOCK).unwrap()
    }

    #[test]
    fn a_restored_uart_keeps_its_registers_and_unread_input() {
        let mut uart = Serial::new(irq(), ConsoleOutput::Sink);
        uart.write(3, &[0x1b]); // line control
        uart.write(7, &[0x5a]); // scratch
        uart.enqueue_input(b"hi");
        let state = uart.save();
        let mut restored = Serial::restore((irq(), ConsoleOutput::Sink), &state).unwrap();
        assert_eq!(restored.save(), state);
        let mut byte = [0];
        restored.read(7, &mut byte);
        assert_eq!(byte[0], 0x5a);
        restored.read(0, &mut byte);
        assert_eq!(byte[0], b'h');
    }

    #[test]
    fn a_uart_state_with_more_input_than_its_fifo_is_refused() {
        let mut state = Serial::new(irq(), ConsoleOutput::Sink).save();
        state.in_buffer = vec![0; 4096];
        let e = Serial::restore((irq(), ConsoleOutput::Sink), &state)
            .err()
            .unwrap();
        assert_eq!(e.field(), "in_buffer");
    }

    #[test]
    fn a_restored_i8042_keeps_its_buffer_and_refuses_nonsense() {
        let power: PowerHandler = Arc::new(|_| {});
        let mut i8042 = I8042::with_irq(power.clone(), irq());
        assert!(i8042.send_ctrl_alt_del());
        let state = i8042.save();
        assert_eq!(state.buffer.len(), 4);
        let restored = I8042::restore((power.clone(), irq()), &state).unwrap();
        assert_eq!(restored.save(), state);

        let mut bad = state.clone();
        bad.pending = "later".into();
        let e = I8042::restore((power.clone(), irq()), &bad).err().unwrap();
        assert_eq!(e.field(), "pending");
        let mut bad = state;
        bad.buffer = vec![0; 17];
        let e = I8042::restore((power, irq()), &bad).err().unwrap();
        assert_eq!(e.field(), "buffer");
    }
}
