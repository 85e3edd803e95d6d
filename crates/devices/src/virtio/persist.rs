//! What the virtio transport saves of any device: the state of a split queue, and
//! the device's own state through [`VirtioDeviceState`], by kind in
//! [`DeviceState`] (the one place that lists the kinds). Each device's state and
//! its restore live in its folder (`block/persist.rs`, ...).

use serde::{Deserialize, Serialize};
use virtio_queue::Queue;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::balloon::BalloonState;
use super::block::BlockState;
use super::net::NetState;
use super::rng::RngState;
use super::vsock::VsockState;
use super::VirtioDevice;
use crate::persist::RestoreError;

/// What the transport needs of a device's saved state, whatever the device.
pub trait VirtioDeviceState {
    /// The virtio device type the state is of.
    fn device_type(&self) -> u32;

    /// Checks the state and builds the device (with
    /// [`Persist::restore`](crate::persist::Persist::restore)), opening what it
    /// needs on the host.
    fn restore(&self) -> Result<Box<dyn VirtioDevice>, RestoreError>;

    /// Checks what the state says against the saved queues (a buffer it holds
    /// must be a descriptor of its queue), before anything is opened.
    fn check_queues(&self, queues: &[QueueState]) -> Result<(), RestoreError> {
        let _ = queues;
        Ok(())
    }
}

/// The device behind a transport, by kind.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum DeviceState {
    Block(BlockState),
    Rng(RngState),
    Net(NetState),
    Vsock(VsockState),
    Balloon(BalloonState),
}

impl DeviceState {
    /// The kind's name in a saved state (`block`), and its state.
    fn kind(&self) -> (&'static str, &dyn VirtioDeviceState) {
        match self {
            DeviceState::Block(s) => ("block", s),
            DeviceState::Rng(s) => ("rng", s),
            DeviceState::Net(s) => ("net", s),
            DeviceState::Vsock(s) => ("vsock", s),
            DeviceState::Balloon(s) => ("balloon", s),
        }
    }

    /// The virtio device type of this kind.
    pub fn device_type(&self) -> u32 {
        self.kind().1.device_type()
    }

    /// Checks the state and builds the device, opening what it needs on the host.
    /// A refusal names the field from here (`block.capacity`).
    pub fn restore(&self) -> Result<Box<dyn VirtioDevice>, RestoreError> {
        let (name, state) = self.kind();
        state.restore().map_err(|e| e.within(name))
    }

    /// See [`VirtioDeviceState::check_queues`].
    pub fn check_queues(&self, queues: &[QueueState]) -> Result<(), RestoreError> {
        let (name, state) = self.kind();
        state.check_queues(queues).map_err(|e| e.within(name))
    }
}

/// The state of one split virtqueue: a serializable mirror of
/// [`virtio_queue::QueueState`], which has no serde support.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct QueueState {
    /// The largest size the device offers.
    pub max_size: u16,
    /// Where the device reads the available ring next.
    pub next_avail: u16,
    /// Where the device writes the used ring next.
    pub next_used: u16,
    /// `VIRTIO_F_RING_EVENT_IDX` in use.
    pub event_idx_enabled: bool,
    /// The size the driver chose.
    pub size: u16,
    /// The driver set the queue up (`QueueReady`).
    pub ready: bool,
    /// Guest address of the descriptor table.
    pub desc_table: u64,
    /// Guest address of the available ring.
    pub avail_ring: u64,
    /// Guest address of the used ring.
    pub used_ring: u64,
}

impl From<virtio_queue::QueueState> for QueueState {
    fn from(s: virtio_queue::QueueState) -> Self {
        Self {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

impl From<QueueState> for virtio_queue::QueueState {
    fn from(s: QueueState) -> Self {
        Self {
            max_size: s.max_size,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx_enabled: s.event_idx_enabled,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
        }
    }
}

impl From<&Queue> for QueueState {
    fn from(q: &Queue) -> Self {
        q.state().into()
    }
}

impl QueueState {
    /// Rebuilds the queue through `Queue::try_from`, which checks the sizes and
    /// the ring alignments; `field` names the queue in errors (`queues[1]`).
    /// Guest memory is not consulted here (see [`Self::check_rings`]).
    pub fn to_queue(&self, field: &str) -> Result<Queue, RestoreError> {
        let max = self.max_size;
        if max == 0 || !max.is_power_of_two() || max > 32768 {
            return Err(RestoreError::invalid(
                format!("{field}.max_size"),
                max,
                "a queue's maximum size is a power of two from 1 to 32768",
            ));
        }
        if self.size == 0 || !self.size.is_power_of_two() || self.size > max {
            return Err(RestoreError::invalid(
                format!("{field}.size"),
                self.size,
                format!("a queue size is a power of two from 1 to max_size ({max})"),
            ));
        }
        for (name, addr, align) in [
            ("desc_table", self.desc_table, 16),
            ("avail_ring", self.avail_ring, 2),
            ("used_ring", self.used_ring, 4),
        ] {
            if addr % align != 0 {
                return Err(RestoreError::invalid(
                    format!("{field}.{name}"),
                    format_args!("{addr:#x}"),
                    format!("not aligned to {align} bytes"),
                ));
            }
        }
        // The checks above are the ones `try_from` makes; its error, should it
        // find another, is still named.
        Queue::try_from(virtio_queue::QueueState::from(*self))
            .map_err(|e| RestoreError::invalid(field, format_args!("{self:?}"), format!("{e:?}")))
    }

    /// Checks that the rings of a queue of `self.size` entries lie in `mem`.
    pub(crate) fn check_rings(
        &self,
        field: &str,
        mem: &GuestMemoryMmap,
    ) -> Result<(), RestoreError> {
        let n = u64::from(self.size);
        for (name, addr, len) in [
            ("desc_table", self.desc_table, 16 * n),
            ("avail_ring", self.avail_ring, 6 + 2 * n),
            ("used_ring", self.used_ring, 6 + 8 * n),
        ] {
            if !mem.check_range(GuestAddress(addr), len as usize) {
                return Err(RestoreError::invalid(
                    format!("{field}.{name}"),
                    format_args!("{addr:#x}"),
                    format!("its {len} bytes are not all in guest memory"),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::QueueT;

    #[test]
    fn queue_state_mirrors_virtio_queue_both_ways() {
        let mut q = Queue::new(256).unwrap();
        q.set_size(64);
        q.set_ready(true);
        q.set_desc_table_address(Some(0x1000), Some(1));
        q.set_avail_ring_address(Some(0x2002), None);
        q.set_used_ring_address(Some(0x3004), None);
        q.set_next_avail(7);
        q.set_next_used(5);
        let s = QueueState::from(&q);
        assert_eq!(s.desc_table, 0x1_0000_1000);
        assert_eq!(virtio_queue::QueueState::from(s), q.state());
        let back = s.to_queue("queues[0]").unwrap();
        assert_eq!(back.state(), q.state());
    }

    #[test]
    fn bad_queue_fields_are_named() {
        let good = QueueState::from(&Queue::new(16).unwrap());
        type Corrupt = fn(&mut QueueState);
        let cases: [(Corrupt, &str); 6] = [
            (|s| s.size = 3, "queues[2].size"),
            (|s| s.size = 32, "queues[2].size"),
            (|s| s.size = 0, "queues[2].size"),
            (|s| s.max_size = 100, "queues[2].max_size"),
            (|s| s.desc_table = 8, "queues[2].desc_table"),
            (|s| s.used_ring = 2, "queues[2].used_ring"),
        ];
        for (break_it, field) in cases {
            let mut s = good;
            break_it(&mut s);
            let e = s.to_queue("queues[2]").unwrap_err();
            assert_eq!(e.field(), field, "{e}");
        }
    }
}
