//! Legacy x86 platform devices.

mod i8042;
mod power;
mod serial;

pub use i8042::I8042;
pub use power::{AcpiPowerPort, DebugExitPort, ACPI_RESET_VALUE, ACPI_S5_SLEEP_TYPE};
pub use serial::{ConsoleOutput, Serial, SerialInput};

use crate::PowerHandler;
use vm_superio::Trigger;

/// A `vm-superio` trigger that turns a line assertion into a [`crate::PowerEvent`].
struct PowerTrigger {
    handler: PowerHandler,
    event: crate::PowerEvent,
}

impl Trigger for PowerTrigger {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        (self.handler)(self.event);
        Ok(())
    }
}

/// Reads a byte-wide register for the bus: wider accesses read as zero.
fn read_byte_register(data: &mut [u8], read: impl FnOnce() -> u8) {
    data.fill(0);
    if let [byte] = data {
        *byte = read();
    }
}
