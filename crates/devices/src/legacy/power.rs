//! Power-control ports: the ACPI sleep/reset register of a hardware-reduced
//! platform and QEMU's `isa-debug-exit` port.

use crate::bus::BusDevice;
use crate::{PowerEvent, PowerHandler};

/// The `SLP_TYP` value the DSDT's `\_S5_` package announces for soft-off.
pub const ACPI_S5_SLEEP_TYPE: u8 = 5;
/// The value the FADT's reset register entry tells the guest to write.
pub const ACPI_RESET_VALUE: u8 = 1;
const SLP_EN: u8 = 1 << 5;

/// The FADT `SLEEP_CONTROL_REG` and `RESET_REG` (one byte, one port).
///
/// Writing `SLP_TYP = 5 | SLP_EN` powers off; writing [`ACPI_RESET_VALUE`]
/// resets. Other values are ignored: sleep states other than S5 are not offered.
pub struct AcpiPowerPort {
    handler: PowerHandler,
}

impl AcpiPowerPort {
    /// A register that reports to `handler`.
    pub fn new(handler: PowerHandler) -> Self {
        Self { handler }
    }
}

impl BusDevice for AcpiPowerPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // No sleep is ever in progress: WAK_STS and every other status bit read 0.
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let [value] = data else { return };
        if *value == ACPI_RESET_VALUE {
            (self.handler)(PowerEvent::Reset);
        } else if value & SLP_EN != 0 && (value >> 2) & 0x7 == ACPI_S5_SLEEP_TYPE {
            (self.handler)(PowerEvent::PowerOff);
        } else {
            tracing::debug!(value, "ignored ACPI sleep control write");
        }
    }
}

/// QEMU's `isa-debug-exit`: the guest writes a status and the VM ends.
///
/// Vigil reports the value written as is; QEMU exits with `(value << 1) | 1`.
pub struct DebugExitPort {
    handler: PowerHandler,
}

impl DebugExitPort {
    /// A port that reports to `handler`.
    pub fn new(handler: PowerHandler) -> Self {
        Self { handler }
    }
}

impl BusDevice for DebugExitPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let mut value = [0u8; 4];
        let n = data.len().min(4);
        value[..n].copy_from_slice(&data[..n]);
        (self.handler)(PowerEvent::DebugExit(u32::from_le_bytes(value)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn recorder() -> (PowerHandler, Arc<Mutex<Vec<PowerEvent>>>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        (Arc::new(move |e| s.lock().unwrap().push(e)), seen)
    }

    #[test]
    fn acpi_port_decodes_s5_and_reset() {
        let (h, seen) = recorder();
        let mut port = AcpiPowerPort::new(h);
        port.write(0, &[(ACPI_S5_SLEEP_TYPE << 2) | SLP_EN]);
        port.write(0, &[ACPI_RESET_VALUE]);
        // S3 and a sleep type without SLP_EN are not power-off; wide writes are ignored.
        port.write(0, &[(3 << 2) | SLP_EN]);
        port.write(0, &[ACPI_S5_SLEEP_TYPE << 2]);
        port.write(0, &[0x34, 0]);
        assert_eq!(
            *seen.lock().unwrap(),
            vec![PowerEvent::PowerOff, PowerEvent::Reset]
        );
    }

    #[test]
    fn debug_exit_reports_the_value_written() {
        let (h, seen) = recorder();
        let mut port = DebugExitPort::new(h);
        port.write(0, &[0]);
        port.write(0, &[3]);
        port.write(0, &0x1234u32.to_le_bytes());
        assert_eq!(
            *seen.lock().unwrap(),
            vec![
                PowerEvent::DebugExit(0),
                PowerEvent::DebugExit(3),
                PowerEvent::DebugExit(0x1234)
            ]
        );
    }
}
