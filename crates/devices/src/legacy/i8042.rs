//! The i8042 keyboard controller, reduced to what guests use it for: the CPU
//! reset line (`reboot=k` in Linux, and Firecracker-style guests' exit path).

use super::PowerTrigger;
use crate::bus::BusDevice;
use crate::{PowerEvent, PowerHandler};

/// i8042 at ports 0x60 (data) and 0x64 (command/status): register it with length 5.
pub struct I8042 {
    inner: vm_superio::I8042Device<PowerTrigger>,
}

impl I8042 {
    /// A controller that reports [`PowerEvent::Reset`] when the guest pulses reset.
    pub fn new(handler: PowerHandler) -> Self {
        let trigger = PowerTrigger {
            handler,
            event: PowerEvent::Reset,
        };
        Self {
            inner: vm_superio::I8042Device::new(trigger),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        super::read_byte_register(data, || self.inner.read(offset as u8));
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let [value] = data {
            // The trigger is infallible.
            let _ = self.inner.write(offset as u8, *value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn reset_command_reports_reset() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let mut dev = I8042::new(Arc::new(move |e| s.lock().unwrap().push(e)));
        dev.write(4, &[0x20]);
        dev.write(0, &[0xfe]);
        assert!(seen.lock().unwrap().is_empty());
        dev.write(4, &[0xfe]);
        assert_eq!(*seen.lock().unwrap(), vec![PowerEvent::Reset]);
    }
}
