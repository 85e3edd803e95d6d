//! Legacy x86 platform devices.

mod i8042;
mod persist;
mod power;
mod serial;

pub use i8042::{CTRL_ALT_DEL, I8042};
pub use persist::{I8042State, SerialState};
pub use power::{AcpiPowerPort, DebugExitPort, ACPI_RESET_VALUE, ACPI_S5_SLEEP_TYPE};
pub use serial::{ConsoleOutput, Serial, SerialInput};

/// Reads a byte-wide register for the bus: wider accesses read as zero.
fn read_byte_register(data: &mut [u8], read: impl FnOnce() -> u8) {
    data.fill(0);
    if let [byte] = data {
        *byte = read();
    }
}
