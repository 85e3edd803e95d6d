//! The 8250 UART (COM1), on `vm-superio`, with its interrupt on an eventfd that the
//! VMM wires to an irqfd, and a device event-loop subscriber that feeds it input.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use vm_superio::serial::NoEvents;
use vm_superio::Trigger;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// Where the guest's console output goes.
pub enum ConsoleOutput {
    /// The VMM's standard output.
    Stdout,
    /// A file (created or truncated by the VMM).
    File(File),
    /// Nowhere.
    Sink,
}

impl Write for ConsoleOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            ConsoleOutput::Stdout => {
                let mut out = io::stdout().lock();
                let n = out.write(buf)?;
                out.flush()?;
                Ok(n)
            }
            ConsoleOutput::File(f) => f.write(buf),
            ConsoleOutput::Sink => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            ConsoleOutput::Stdout => io::stdout().flush(),
            ConsoleOutput::File(f) => f.flush(),
            ConsoleOutput::Sink => Ok(()),
        }
    }
}

pub(super) struct IrqTrigger(pub(super) EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// A 16550-compatible UART: register it on the port bus with length 8.
pub struct Serial {
    pub(super) inner: vm_superio::Serial<IrqTrigger, NoEvents, ConsoleOutput>,
}

impl Serial {
    /// A UART writing to `out` and raising `irq` on interrupt conditions.
    pub fn new(irq: EventFd, out: ConsoleOutput) -> Self {
        Self {
            inner: vm_superio::Serial::new(IrqTrigger(irq), out),
        }
    }

    /// Queues `input` for the guest to read; returns how many bytes fit in the FIFO.
    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
        let room = self.inner.fifo_capacity().min(input.len());
        if room == 0 {
            return 0;
        }
        match self.inner.enqueue_raw_bytes(&input[..room]) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("serial input dropped: {e:?}");
                0
            }
        }
    }

    fn input_room(&self) -> usize {
        self.inner.fifo_capacity()
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        super::read_byte_register(data, || self.inner.read(offset as u8));
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let [value] = data {
            if let Err(e) = self.inner.write(offset as u8, *value) {
                tracing::warn!("serial write failed: {e:?}");
            }
        }
    }
}

/// Device event-loop subscriber that moves bytes from an input file (the VMM's
/// stdin) into the UART's receive FIFO.
pub struct SerialInput<R: Read + AsRawFd + Send> {
    serial: Arc<Mutex<Serial>>,
    input: R,
}

impl<R: Read + AsRawFd + Send> SerialInput<R> {
    /// Feeds `serial` from `input`.
    pub fn new(serial: Arc<Mutex<Serial>>, input: R) -> Self {
        Self { serial, input }
    }
}

impl<R: Read + AsRawFd + Send> MutEventSubscriber for SerialInput<R> {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        let room = serial.input_room();
        if room == 0 {
            // The guest has not drained its FIFO; let it run before we poll again.
            drop(serial);
            std::thread::sleep(std::time::Duration::from_millis(2));
            return;
        }
        let mut buf = [0u8; 64];
        let closed = match self.input.read(&mut buf[..room.min(64)]) {
            Ok(0) => true,
            Ok(n) => {
                serial.enqueue_input(&buf[..n]);
                false
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => false,
            Err(e) => {
                tracing::warn!("console input closed: {e}");
                true
            }
        };
        if closed || events.event_set().contains(EventSet::HANG_UP) {
            let _ = ops.remove(Events::empty(&self.input));
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.input, EventSet::IN)) {
            tracing::debug!("console input cannot be polled (a regular file or /dev/null?), so the guest gets none: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Seek;

    #[test]
    fn output_reaches_the_console_and_input_the_guest() {
        let out = tempfile();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut uart = Serial::new(
            irq.try_clone().unwrap(),
            ConsoleOutput::File(out.try_clone().unwrap()),
        );
        for b in b"hi\n" {
            uart.write(0, &[*b]);
        }
        let mut written = String::new();
        let mut f = out;
        f.rewind().unwrap();
        f.read_to_string(&mut written).unwrap();
        assert_eq!(written, "hi\n");

        // Enable the received-data interrupt, queue input, read it back.
        uart.write(1, &[0x01]);
        assert_eq!(uart.enqueue_input(b"ok"), 2);
        assert!(irq.read().unwrap() >= 1);
        let mut lsr = [0];
        uart.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready");
        let mut got = Vec::new();
        for _ in 0..2 {
            let mut d = [0];
            uart.read(0, &mut d);
            got.push(d[0]);
        }
        assert_eq!(got, b"ok");
    }

    fn tempfile() -> File {
        let path = std::env::temp_dir().join(format!("vigil-serial-test-{}", std::process::id()));
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        f
    }
}
