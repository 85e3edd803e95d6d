//! An address bus: maps non-overlapping `[base, base + len)` ranges to devices.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device that answers reads and writes at offsets within its range.
///
/// `data.len()` is the access width the guest used (1, 2, 4 or 8 bytes); a device
/// answers widths it does not support with all-ones and ignores such writes.
pub trait BusDevice: Send {
    /// The guest reads `data.len()` bytes at `offset` from the start of the range.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset` from the start of the range.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Shared handle to a device on a bus.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Errors from building a bus.
#[derive(Debug, PartialEq, Eq)]
pub enum BusError {
    /// The new range is empty or wraps around the address space.
    InvalidRange { base: u64, len: u64 },
    /// The new range overlaps one already registered.
    Overlap { base: u64, len: u64 },
}

impl std::fmt::Display for BusError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BusError::InvalidRange { base, len } => {
                write!(f, "invalid bus range: base {base:#x}, length {len:#x}")
            }
            BusError::Overlap { base, len } => write!(
                f,
                "bus range {base:#x}..{:#x} overlaps a registered device",
                base + len
            ),
        }
    }
}

impl std::error::Error for BusError {}

#[derive(Clone)]
struct Entry {
    len: u64,
    device: SharedDevice,
}

/// A set of devices keyed by the start of their range.
#[derive(Clone, Default)]
pub struct Bus {
    devices: BTreeMap<u64, Entry>,
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `device` at `[base, base + len)`.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::InvalidRange { base, len })?;
        let overlaps_previous = self
            .devices
            .range(..end)
            .next_back()
            .is_some_and(|(b, e)| b + e.len > base);
        if overlaps_previous {
            return Err(BusError::Overlap { base, len });
        }
        self.devices.insert(base, Entry { len, device });
        Ok(())
    }

    fn resolve(&self, addr: u64, width: usize) -> Option<(u64, &SharedDevice)> {
        let (base, entry) = self.devices.range(..=addr).next_back()?;
        let offset = addr - base;
        (offset.checked_add(width as u64)? <= entry.len).then_some((offset, &entry.device))
    }

    /// Forwards a read; returns false (leaving `data` untouched) when no device
    /// covers the whole access.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, dev)) => {
                lock(dev).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Forwards a write; returns false when no device covers the whole access.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((offset, dev)) => {
                lock(dev).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device, recovering from a poisoned lock: a device panic must not take
/// every later access down with it (the state is plain data and stays usable).
fn lock(dev: &SharedDevice) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    dev.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Recorder(Vec<(u64, Vec<u8>)>);
    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    fn recorder() -> Arc<Mutex<Recorder>> {
        Arc::new(Mutex::new(Recorder(Vec::new())))
    }

    #[test]
    fn routes_by_range_and_offset() {
        let mut bus = Bus::new();
        let a = recorder();
        let b = recorder();
        bus.insert(a.clone(), 0x3f8, 8).unwrap();
        bus.insert(b.clone(), 0x400, 4).unwrap();
        assert!(bus.write(0x3fb, &[7]));
        assert!(bus.write(0x402, &[1, 2]));
        let mut d = [0u8; 1];
        assert!(bus.read(0x3fc, &mut d));
        assert_eq!(d, [4]);
        assert_eq!(a.lock().unwrap().0, vec![(3, vec![7])]);
        assert_eq!(b.lock().unwrap().0, vec![(2, vec![1, 2])]);
    }

    #[test]
    fn refuses_accesses_outside_or_across_ranges() {
        let mut bus = Bus::new();
        bus.insert(recorder(), 0x3f8, 8).unwrap();
        assert!(!bus.write(0x3f7, &[0]));
        assert!(!bus.write(0x400, &[0]));
        // A 4-byte access starting at the last byte crosses the end.
        assert!(!bus.write(0x3ff, &[0; 4]));
        let mut d = [0xaa; 2];
        assert!(!bus.read(0x3ff, &mut d));
        assert_eq!(d, [0xaa; 2]);
    }

    #[test]
    fn refuses_overlaps_and_bad_ranges() {
        let mut bus = Bus::new();
        bus.insert(recorder(), 0x100, 0x10).unwrap();
        assert_eq!(
            bus.insert(recorder(), 0x10f, 1),
            Err(BusError::Overlap {
                base: 0x10f,
                len: 1
            })
        );
        assert_eq!(
            bus.insert(recorder(), 0xf8, 0x10),
            Err(BusError::Overlap {
                base: 0xf8,
                len: 0x10
            })
        );
        assert!(bus.insert(recorder(), 0x110, 1).is_ok());
        assert!(bus.insert(recorder(), 0xff, 1).is_ok());
        assert_eq!(
            bus.insert(recorder(), 0x200, 0),
            Err(BusError::InvalidRange {
                base: 0x200,
                len: 0
            })
        );
        assert!(bus.insert(recorder(), u64::MAX, 2).is_err());
    }
}
