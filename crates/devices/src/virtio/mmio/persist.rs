//! The saved state of a virtio-mmio transport: the registers a driver sees, its
//! queues and its device (through [`DeviceState`], so that the transport knows
//! devices only through [`VirtioDevice`] and
//! [`VirtioDeviceState`](crate::virtio::persist::VirtioDeviceState)).
//!
//! Saving is [`MmioTransport::state`]. Restoring is two steps, in the shape of
//! the builder: [`MmioTransportState::restore_device`] checks what needs no
//! device and re-opens what the device needs on the host (the image, the tap, the
//! listening socket) and returns the device, whose queue count says how many
//! notification eventfds to make; then [`MmioTransport::restore`] puts it behind
//! its registers with its queues, given guest memory, the interrupt and those
//! eventfds.
//!
//! Every field is checked (what needs no device before the device is built, the
//! rest before the transport is) against the rules the live transport itself
//! keeps (a queue size is a power of two no larger than the device's maximum, a
//! negotiated feature set is one the device offered, a running queue's rings lie
//! in guest memory, ...), which is why the live transport drops undefined status
//! bits and ignores feature writes after `FEATURES_OK`.
//!
//! What is not carried: guest memory (saved on its own), bytes in flight on the
//! host side (a frame read from a tap and not yet delivered is lost, as on a real
//! link), open vsock connections (the guest is told to drop them), rate-limiter
//! tokens (only the configuration: the buckets start full), and statistics
//! counters.

use std::sync::Arc;

use crate::GuestMemoryMmap;
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{status, MmioTransport, KNOWN_STATUS};
use crate::persist::RestoreError;
use crate::virtio::persist::{DeviceState, QueueState};
use crate::virtio::{
    Interrupt, VirtioDevice, INT_CONFIG, INT_USED_RING, VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1,
};

/// Everything of a virtio-mmio transport a driver can observe, and its device.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MmioTransportState {
    /// The device status register.
    pub device_status: u32,
    /// `DeviceFeaturesSel`.
    pub device_features_sel: u32,
    /// `DriverFeaturesSel`.
    pub driver_features_sel: u32,
    /// The features the driver acknowledged (negotiated once `FEATURES_OK`).
    pub acked_features: u64,
    /// `QueueSel`.
    pub queue_sel: u32,
    /// The interrupt status register.
    pub interrupt_status: u32,
    /// `ConfigGeneration`.
    pub config_generation: u32,
    /// One per queue of the device, in order.
    pub queues: Vec<QueueState>,
    /// The device.
    pub device: DeviceState,
}

impl MmioTransport {
    /// Rebuilds a transport from `state` around `device` (made by
    /// [`MmioTransportState::restore_device`]), over the guest memory the state
    /// was saved with; `queue_evts` as for [`Self::new`]. Every field is checked
    /// first; nothing is changed when one is refused.
    ///
    /// The interrupt status is restored without raising the line (the interrupt
    /// controller's own state carries a pending interrupt). When the driver was
    /// running, each queue's eventfd is signalled, so that the event loop looks at
    /// every queue once it runs: what the guest made available before the
    /// snapshot is served, and a device owes the guest news of what it lost (vsock:
    /// a transport reset event) sends it.
    pub fn restore(
        state: &MmioTransportState,
        mut device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        queue_evts: Vec<EventFd>,
    ) -> Result<Self, RestoreError> {
        let queues = state.check(device.as_ref(), &mem)?;
        if queues.len() != queue_evts.len() {
            return Err(RestoreError::invalid(
                "queues",
                format_args!("{} queues", queues.len()),
                format!("but {} eventfds to notify them", queue_evts.len()),
            ));
        }
        interrupt.restore_status(state.interrupt_status);
        let page = interrupt.page().cloned();
        if state.device_status & status::FEATURES_OK != 0 {
            device.ack_features(state.acked_features);
        }
        let mut transport = Self {
            device,
            mem,
            interrupt,
            used_checked: queues.iter().map(|q| q.next_used()).collect(),
            polled: vec![(false, 0); queues.len()],
            waiting: vec![false; queues.len()],
            watched: Vec::new(),
            queues,
            queue_evts,
            status: state.device_status,
            device_features_sel: state.device_features_sel,
            driver_features_sel: state.driver_features_sel,
            driver_features: state.acked_features,
            queue_sel: state.queue_sel,
            config_generation: state.config_generation,
            page,
        };
        transport.refresh_page();
        if transport.driver_ok() {
            // A state saved while the device loop polled has the driver's
            // notifications off in guest memory: on again before the first look.
            for queue in transport.queues.iter_mut().filter(|q| q.ready()) {
                if let Err(e) = queue.enable_notification(&transport.mem) {
                    tracing::warn!("cannot turn a restored virtio queue's notifications on: {e:?}");
                }
            }
            for evt in &transport.queue_evts {
                if let Err(e) = evt.write(1) {
                    tracing::warn!("cannot wake a restored virtio queue: {e}");
                }
            }
        }
        Ok(transport)
    }

    /// The transport's and the device's state, for snapshot and migration. Take
    /// it with the vCPUs paused, so that the rings do not move meanwhile.
    pub fn state(&self) -> MmioTransportState {
        MmioTransportState {
            device_status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            acked_features: self.driver_features,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt.status(),
            config_generation: self.config_generation,
            queues: self.queues.iter().map(QueueState::from).collect(),
            device: self.device.state(),
        }
    }
}

impl MmioTransportState {
    /// The first step of restoring: checks everything that needs no device (the
    /// status, the interrupt status, each queue's own fields, ...), then builds
    /// the device with [`DeviceState::restore`], which opens what it needs on
    /// the host. The second step is [`MmioTransport::restore`].
    pub fn restore_device(&self) -> Result<Box<dyn VirtioDevice>, RestoreError> {
        self.check_registers()?;
        self.device.restore().map_err(|e| e.within("device"))
    }

    /// The first step of restoring for a caller that builds the device itself
    /// (from [`MmioTransportState::device`], to keep a typed handle on it): the
    /// checks that need no device. The second step is [`MmioTransport::restore`].
    pub fn check_registers_only(&self) -> Result<(), RestoreError> {
        self.check_registers().map(drop)
    }

    /// The checks that need no device; returns the queues.
    fn check_registers(&self) -> Result<Vec<Queue>, RestoreError> {
        let s = self.device_status;
        if s & !KNOWN_STATUS != 0 {
            return Err(RestoreError::invalid(
                "device_status",
                format_args!("{s:#x}"),
                format!("bits {:#x} are not device status bits", s & !KNOWN_STATUS),
            ));
        }
        if s & status::DRIVER_OK != 0 && s & (status::FEATURES_OK | status::FAILED) == 0 {
            return Err(RestoreError::invalid(
                "device_status",
                format_args!("{s:#x}"),
                "DRIVER_OK without FEATURES_OK (the device would have failed)",
            ));
        }
        let acked = self.acked_features;
        if s & status::FEATURES_OK != 0 && acked & VIRTIO_F_VERSION_1 == 0 {
            return Err(RestoreError::invalid(
                "acked_features",
                format_args!("{acked:#x}"),
                "FEATURES_OK without VIRTIO_F_VERSION_1",
            ));
        }
        if self.interrupt_status & !(INT_USED_RING | INT_CONFIG) != 0 {
            return Err(RestoreError::invalid(
                "interrupt_status",
                format_args!("{:#x}", self.interrupt_status),
                "only bits 0x1 (used ring) and 0x2 (configuration) exist",
            ));
        }
        // A queue uses event indices exactly when the feature was negotiated (the
        // live transport turns them on at FEATURES_OK).
        let event_idx = s & status::FEATURES_OK != 0 && acked & VIRTIO_F_RING_EVENT_IDX != 0;
        let mut queues = Vec::with_capacity(self.queues.len().min(16));
        for (i, q) in self.queues.iter().enumerate() {
            let field = format!("queues[{i}]");
            if q.event_idx_enabled && !event_idx {
                return Err(RestoreError::invalid(
                    format!("{field}.event_idx_enabled"),
                    true,
                    "VIRTIO_F_RING_EVENT_IDX was not negotiated",
                ));
            }
            let mut queue = q.to_queue(&field)?;
            queue.set_event_idx(event_idx);
            queues.push(queue);
        }
        self.device
            .check_queues(&self.queues)
            .map_err(|e| e.within("device"))?;
        Ok(queues)
    }

    /// Checks the whole state against `device` (built from `self.device`) and
    /// guest memory, and rebuilds the queues.
    fn check(
        &self,
        device: &dyn VirtioDevice,
        mem: &GuestMemoryMmap,
    ) -> Result<Vec<Queue>, RestoreError> {
        if device.device_type() != self.device.device_type() {
            return Err(RestoreError::invalid(
                "device",
                format_args!("type {}", self.device.device_type()),
                format!("restored into a device of type {}", device.device_type()),
            ));
        }
        let queues = self.check_registers()?;
        let s = self.device_status;
        let offered = device.features();
        let acked = self.acked_features;
        if s & status::FEATURES_OK != 0 && acked & !offered != 0 {
            return Err(RestoreError::invalid(
                "acked_features",
                format_args!("{acked:#x}"),
                format!(
                    "bits {:#x} were never offered (the device offers {offered:#x})",
                    acked & !offered
                ),
            ));
        }
        let max_sizes = device.queue_max_sizes();
        if self.queues.len() != max_sizes.len() {
            return Err(RestoreError::invalid(
                "queues",
                format_args!("{} queues", self.queues.len()),
                format!("the device has {}", max_sizes.len()),
            ));
        }
        let running = s & (status::DRIVER_OK | status::DEVICE_NEEDS_RESET | status::FAILED)
            == status::DRIVER_OK;
        for (i, (q, &max)) in self.queues.iter().zip(max_sizes).enumerate() {
            let field = format!("queues[{i}]");
            if q.max_size != max {
                return Err(RestoreError::invalid(
                    format!("{field}.max_size"),
                    q.max_size,
                    format!("the device's queue {i} has {max} entries at most"),
                ));
            }
            // The live transport checks the rings of ready queues at DRIVER_OK
            // (and fails the device otherwise); after that they cannot move.
            if running && q.ready {
                q.check_rings(&field, mem)?;
            }
        }
        Ok(queues)
    }
}
