//! Counters of one device, shared (`Arc`) between the device model, which
//! increments them on its event loop, and whoever takes snapshots.

use serde::{Deserialize, Serialize};

use crate::primitives::{Counter, Gauge};

/// What a device is; decides its group in the JSON lines and the names of its two
/// directions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceKind {
    /// virtio-blk: `read` (disk to guest) and `write` (guest to disk).
    #[default]
    Block,
    /// virtio-net: `rx` (to the guest) and `tx` (from the guest).
    Net,
    /// virtio-vsock: `rx` (to the guest) and `tx` (from the guest).
    Vsock,
    /// virtio-rng: `read` (entropy handed to the guest).
    Entropy,
    /// virtio-balloon: `deflate` (memory given back to the guest) and `inflate`
    /// (memory the guest gave to the host, free page reports included).
    Balloon,
}

impl DeviceKind {
    /// The group name in the JSON lines (`block`, `net`, `vsock`, `entropy`, `balloon`).
    pub fn group(self) -> &'static str {
        match self {
            DeviceKind::Block => "block",
            DeviceKind::Net => "net",
            DeviceKind::Vsock => "vsock",
            DeviceKind::Entropy => "entropy",
            DeviceKind::Balloon => "balloon",
        }
    }

    /// Names of the direction towards the guest and the one from it.
    pub fn directions(self) -> (&'static str, &'static str) {
        match self {
            DeviceKind::Block | DeviceKind::Entropy => ("read", "write"),
            DeviceKind::Net | DeviceKind::Vsock => ("rx", "tx"),
            DeviceKind::Balloon => ("deflate", "inflate"),
        }
    }
}

/// Counters of one device. "In" is towards the guest (blk reads, net/vsock rx,
/// rng, balloon deflate), "out" is from it (blk writes, net/vsock tx, balloon
/// inflate and free page reports). Bytes count payload only (no virtio headers).
/// Every update is a relaxed atomic add.
#[derive(Debug, Default)]
pub struct DeviceCounters {
    kind: DeviceKind,
    name: String,
    /// Payload bytes delivered to the guest.
    pub bytes_in: Counter,
    /// Payload bytes taken from the guest.
    pub bytes_out: Counter,
    /// Requests, frames or packets towards the guest.
    pub ops_in: Counter,
    /// Requests, frames or packets from the guest.
    pub ops_out: Counter,
    /// Other requests (flush, get-id, discard; vsock control packets; balloon
    /// statistics; guest frames a net device's MMDS took instead of its tap).
    pub ops_other: Counter,
    /// Failed requests and dropped frames or packets.
    pub errors: Counter,
    /// Times a request had to wait for the rate limiter.
    pub throttled: Counter,
    /// Used-buffer interrupts raised (virtio-blk only so far); below the
    /// requests when the driver batches with `VIRTIO_F_RING_EVENT_IDX`.
    pub interrupts: Counter,
    /// Queue notifications the device event loop took (virtio-blk and
    /// virtio-net): below the requests when the driver batches with event
    /// indices, and far below while the loop polls the rings.
    pub notifications: Counter,
    /// Requests moved by the same system call as the one before them
    /// or io_uring entry (virtio-blk: contiguous reads or writes taken
    /// together); a request moved on its own is not counted.
    pub merged: Counter,
    /// Reads answered with zeroes because they lay in a hole of a sparse
    /// image, without reading it (virtio-blk).
    pub hole_reads: Counter,
    /// Balloon only: pages (4 KiB) the driver says it holds (`actual`).
    pub balloon_actual_pages: Gauge,
    /// Balloon only: pages (4 KiB) the device asks for (`num_pages`).
    pub balloon_target_pages: Gauge,
}

impl DeviceCounters {
    /// Counters of a device of `kind` named `name` (`blk0`, `net1`: a label value).
    pub fn new(kind: DeviceKind, name: impl Into<String>) -> Self {
        Self {
            kind,
            name: name.into(),
            ..Default::default()
        }
    }

    /// The device's kind.
    pub fn kind(&self) -> DeviceKind {
        self.kind
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// One completed transfer towards the guest of `bytes`.
    #[inline]
    pub fn transfer_in(&self, bytes: u64) {
        self.ops_in.inc();
        self.bytes_in.add(bytes);
    }

    /// One completed transfer from the guest of `bytes`.
    #[inline]
    pub fn transfer_out(&self, bytes: u64) {
        self.ops_out.inc();
        self.bytes_out.add(bytes);
    }

    /// The counts now.
    pub fn snapshot(&self) -> DeviceSnapshot {
        let balloon = (self.kind == DeviceKind::Balloon).then(|| BalloonSnapshot {
            actual_pages: self.balloon_actual_pages.get(),
            target_pages: self.balloon_target_pages.get(),
        });
        DeviceSnapshot {
            name: self.name.clone(),
            kind: self.kind,
            bytes_in: self.bytes_in.get(),
            bytes_out: self.bytes_out.get(),
            ops_in: self.ops_in.get(),
            ops_out: self.ops_out.get(),
            ops_other: self.ops_other.get(),
            errors: self.errors.get(),
            throttled: self.throttled.get(),
            interrupts: self.interrupts.get(),
            notifications: self.notifications.get(),
            merged: self.merged.get(),
            hole_reads: self.hole_reads.get(),
            balloon,
        }
    }
}

/// A device's counters at one moment (see [`DeviceCounters`]).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceSnapshot {
    pub name: String,
    pub kind: DeviceKind,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub ops_in: u64,
    pub ops_out: u64,
    pub ops_other: u64,
    pub errors: u64,
    pub throttled: u64,
    /// Used-buffer interrupts (see [`DeviceCounters::interrupts`]).
    #[serde(default)]
    pub interrupts: u64,
    /// Queue notifications (see [`DeviceCounters::notifications`]).
    #[serde(default)]
    pub notifications: u64,
    /// Requests merged (see [`DeviceCounters::merged`]).
    #[serde(default)]
    pub merged: u64,
    /// Reads of holes (see [`DeviceCounters::hole_reads`]).
    #[serde(default)]
    pub hole_reads: u64,
    /// Present for a balloon.
    pub balloon: Option<BalloonSnapshot>,
}

/// A balloon's size.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonSnapshot {
    /// Pages (4 KiB) the guest holds in the balloon.
    pub actual_pages: u64,
    /// Pages (4 KiB) the device asks for.
    pub target_pages: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_has_every_counter() {
        let c = DeviceCounters::new(DeviceKind::Block, "blk0");
        c.transfer_in(4096);
        c.transfer_in(512);
        c.transfer_out(4096);
        c.ops_other.inc();
        c.errors.inc();
        c.throttled.add(2);
        c.interrupts.add(3);
        c.notifications.add(5);
        c.merged.add(7);
        c.hole_reads.add(11);
        let s = c.snapshot();
        assert_eq!(
            s,
            DeviceSnapshot {
                name: "blk0".into(),
                kind: DeviceKind::Block,
                bytes_in: 4608,
                bytes_out: 4096,
                ops_in: 2,
                ops_out: 1,
                ops_other: 1,
                errors: 1,
                throttled: 2,
                interrupts: 3,
                notifications: 5,
                merged: 7,
                hole_reads: 11,
                balloon: None,
            }
        );
        let b = DeviceCounters::new(DeviceKind::Balloon, "balloon0");
        b.balloon_actual_pages.set(256);
        assert_eq!(b.snapshot().balloon.unwrap().actual_pages, 256);
    }
}
