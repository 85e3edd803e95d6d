//! The virtio-pci modern transport (virtio 1.1, 4.1): a PCI function (vendor
//! 0x1af4, device 0x1040 + type, revision 1) whose one 64-bit memory BAR holds
//! the common configuration, the ISR, the device configuration, the queue
//! notification registers and the MSI-X table and PBA. The common configuration
//! maps onto the register file of [`MmioTransport`], so feature negotiation,
//! queue set-up, the status state machine and queue processing are the same code
//! whichever transport a device is on.
//!
//! Interrupts are MSI-X: a vector for the configuration and one per queue, each
//! an irqfd on its own GSI whose KVM route ([`PciVm::set_msi_route`]) follows
//! what the guest writes in the table. A vector masked when it fires sets its
//! pending bit and fires when unmasked. While the driver has not enabled MSI-X
//! (a kernel without `CONFIG_PCI_MSI`), every cause raises INTA instead, an
//! I/O APIC line the DSDT's `_PRT` routes the slot to.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use super::mmio::{MmioTransport, CONFIG_SPACE, QUEUE_NOTIFY};
use super::{Interrupt, INT_CONFIG, INT_USED_RING};
use crate::bus::BusDevice;
use crate::pci::{reg, ConfigSpace, Identity, PciFunction, COMMAND_MEMORY, CONFIG_SIZE};
use crate::persist::RestoreError;

/// Size of a virtio-pci function's BAR.
pub const BAR_SIZE: u64 = 0x8000;
/// BAR offsets of the virtio structures and the MSI-X table and PBA.
const COMMON: u64 = 0x0000;
const COMMON_LEN: u64 = 0x38;
const ISR: u64 = 0x1000;
const DEVICE: u64 = 0x2000;
const DEVICE_LEN: u64 = 0x1000;
/// Queue `n` is notified by a write at `NOTIFY + n * NOTIFY_MULTIPLIER`.
pub const NOTIFY: u64 = 0x3000;
/// Bytes between queues' notification registers.
pub const NOTIFY_MULTIPLIER: u64 = 4;
const MSIX_TABLE: u64 = 0x4000;
const MSIX_PBA: u64 = 0x5000;

/// "No vector" in `msix_config` and `queue_msix_vector`.
pub const NO_VECTOR: u16 = 0xffff;
/// Vectors a function may have: its PBA is one 64-bit word.
const MAX_VECTORS: usize = 64;
/// MSI-X message control: enabled, all vectors masked.
const MSIX_ENABLE: u16 = 1 << 15;
const MSIX_FUNCTION_MASK: u16 = 1 << 14;
/// Vector control: masked.
const VECTOR_MASKED: u32 = 1;

/// virtio_pci_cap cfg_type values (virtio 1.1, 4.1.4).
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;
const CAP_ID_VENDOR: u8 = 0x09;
const CAP_ID_MSIX: u8 = 0x11;

/// Bad values a function logs as errors; the rest go to `debug`, so that a guest
/// that keeps writing them cannot flood the host's log.
const LOGGED_ERRORS: u32 = 16;

/// Logs a guest-caused error at `error` level while `$count` (a function's
/// tally) is under [`LOGGED_ERRORS`], at `debug` after.
macro_rules! guest_error {
    ($count:expr, $($arg:tt)+) => {
        if $count < LOGGED_ERRORS {
            $count += 1;
            tracing::error!($($arg)+);
        } else {
            tracing::debug!($($arg)+);
        }
    };
}

/// What a virtio-pci function needs of the VM: MSI routes for its vectors' GSIs,
/// and its queue notifications caught in KVM where the guest put its BAR.
pub trait PciVm: Send + Sync {
    /// Routes `gsi` to the MSI message `(address, data)`.
    fn set_msi_route(&self, gsi: u32, address: u64, data: u32) -> Result<(), String>;
    /// Signals `evt` on a 4-byte write of any value at guest address `addr`.
    fn register_notify(&self, evt: &EventFd, addr: u64) -> Result<(), String>;
    /// Stops what [`Self::register_notify`] started.
    fn unregister_notify(&self, evt: &EventFd, addr: u64) -> Result<(), String>;
}

/// A vector: an irqfd on its GSI, and its table entry.
struct Vector {
    irqfd: EventFd,
    gsi: u32,
    /// Message address low, high, data, vector control.
    entry: [u32; 4],
}

/// A function's MSI-X vectors, and which the driver chose for what; its INTx
/// line for when MSI-X is off.
pub struct Msix {
    vectors: Vec<Vector>,
    intx: EventFd,
    intx_gsi: u32,
    pending: u64,
    /// MSI-X message control's enable and function-mask bits.
    enabled: bool,
    function_masked: bool,
    config_vector: u16,
    queue_vectors: Vec<u16>,
    vm: Arc<dyn PciVm>,
    /// Errors logged so far ([`LOGGED_ERRORS`]).
    errors: u32,
}

impl Msix {
    /// Vectors raised through `irqfds`, each registered on the GSI beside it, for
    /// a device of `queues` queues; INTx raised through `intx` (the irqfd and its
    /// GSI).
    pub fn new(
        irqfds: Vec<(EventFd, u32)>,
        intx: (EventFd, u32),
        queues: usize,
        vm: Arc<dyn PciVm>,
    ) -> Self {
        debug_assert!(irqfds.len() <= MAX_VECTORS);
        Self {
            intx: intx.0,
            intx_gsi: intx.1,
            vectors: irqfds
                .into_iter()
                .map(|(irqfd, gsi)| Vector {
                    irqfd,
                    gsi,
                    entry: [0, 0, 0, VECTOR_MASKED],
                })
                .collect(),
            pending: 0,
            enabled: false,
            function_masked: false,
            config_vector: NO_VECTOR,
            queue_vectors: vec![NO_VECTOR; queues],
            vm,
            errors: 0,
        }
    }

    /// Fires the vectors for `bits` (of queue `queue`, or every queue's).
    pub(crate) fn signal(&mut self, bits: u32, queue: Option<usize>) {
        if !self.enabled {
            if let Err(e) = self.intx.write(1) {
                tracing::warn!("cannot raise a virtio-pci INTx: {e}");
            }
            return;
        }
        if bits & INT_CONFIG != 0 {
            self.fire(self.config_vector);
        }
        if bits & INT_USED_RING != 0 {
            let mut vectors: Vec<u16> = match queue {
                Some(q) => self.queue_vectors.get(q).copied().into_iter().collect(),
                None => self.queue_vectors.clone(),
            };
            vectors.sort_unstable();
            vectors.dedup();
            for v in vectors {
                self.fire(v);
            }
        }
    }

    fn masked(&self, v: usize) -> bool {
        self.function_masked || self.vectors[v].entry[3] & VECTOR_MASKED != 0
    }

    fn fire(&mut self, vector: u16) {
        let v = usize::from(vector);
        if !self.enabled || v >= self.vectors.len() {
            return;
        }
        if self.masked(v) {
            self.pending |= 1 << v;
        } else if let Err(e) = self.vectors[v].irqfd.write(1) {
            tracing::warn!(vector, "cannot raise an MSI-X vector: {e}");
        }
    }

    /// Fires the vectors that are pending and no longer masked.
    fn deliver_pending(&mut self) {
        for v in 0..self.vectors.len() {
            if self.pending & (1 << v) != 0 && self.enabled && !self.masked(v) {
                self.pending &= !(1 << v);
                if let Err(e) = self.vectors[v].irqfd.write(1) {
                    tracing::warn!(vector = v, "cannot raise an MSI-X vector: {e}");
                }
            }
        }
    }

    /// The guest wrote MSI-X message control.
    fn set_control(&mut self, control: u16) {
        self.enabled = control & MSIX_ENABLE != 0;
        self.function_masked = control & MSIX_FUNCTION_MASK != 0;
        self.deliver_pending();
    }

    /// A vector number the driver asked for, or [`NO_VECTOR`] when out of range
    /// (which tells the driver the assignment failed).
    fn checked(&self, vector: u16) -> u16 {
        if usize::from(vector) < self.vectors.len() {
            vector
        } else {
            NO_VECTOR
        }
    }

    fn table_read(&self, offset: u64, data: &mut [u8]) {
        let bytes: Vec<u8> = self
            .vectors
            .iter()
            .flat_map(|v| v.entry.iter().flat_map(|w| w.to_le_bytes()))
            .collect();
        read_bytes(&bytes, offset, data);
    }

    fn table_write(&mut self, offset: u64, data: &[u8]) {
        let (index, word) = ((offset / 16) as usize, ((offset % 16) / 4) as usize);
        if index >= self.vectors.len() {
            tracing::debug!(offset, "MSI-X table write past its vectors; ignored");
            return;
        }
        let vector = &mut self.vectors[index];
        // 4-byte accesses to one field, or 8 bytes to the address (virtio and PCI
        // allow both); anything else is refused.
        match (data.len(), offset % 4) {
            (4, 0) => vector.entry[word] = u32::from_le_bytes(data.try_into().unwrap_or([0; 4])),
            (8, 0) if word % 2 == 0 => {
                vector.entry[word] = u32::from_le_bytes(data[..4].try_into().unwrap_or([0; 4]));
                vector.entry[word + 1] = u32::from_le_bytes(data[4..].try_into().unwrap_or([0; 4]));
            }
            _ => {
                guest_error!(
                    self.errors,
                    offset,
                    len = data.len(),
                    "MSI-X table access neither 4 nor 8 bytes aligned; ignored"
                );
                return;
            }
        }
        vector.entry[3] &= VECTOR_MASKED;
        let [lo, hi, msg, _] = vector.entry;
        let address = u64::from(hi) << 32 | u64::from(lo);
        if let Err(e) = self.vm.set_msi_route(vector.gsi, address, msg) {
            guest_error!(
                self.errors,
                vector = index,
                "cannot route an MSI-X vector: {e}"
            );
        }
        self.deliver_pending();
    }
}

/// Copies what `data` covers of `bytes` from `offset`; zero past the end.
fn read_bytes(bytes: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    super::copy_config(bytes, offset, data);
}

/// A virtio device as a PCI function.
pub struct VirtioPci {
    config: ConfigSpace,
    transport: Arc<Mutex<MmioTransport>>,
    interrupt: Arc<Interrupt>,
    msix: Arc<Mutex<Msix>>,
    /// Offset of the MSI-X capability in configuration space.
    msix_cap: usize,
    queues: usize,
    /// The selectors of the common configuration, as the driver wrote them.
    device_feature_select: u32,
    driver_feature_select: u32,
    queue_select: u16,
    /// The queue notification eventfds, and the BAR address they are caught at in KVM.
    notify_evts: Vec<EventFd>,
    notify_at: Option<u64>,
    /// Where the guest may put the BAR for its notifications to be caught in KVM.
    window: (u64, u64),
    vm: Arc<dyn PciVm>,
    /// Errors logged so far ([`LOGGED_ERRORS`]).
    errors: u32,
}

impl VirtioPci {
    /// The function for `transport`'s device, its BAR at `bar_addr`, its vectors
    /// in `msix` and raised through `interrupt` (built on `msix`), its queues
    /// notified through `notify_evts`. Notifications are caught in KVM while its
    /// BAR lies in `window` (start, end); elsewhere the BAR is not reached.
    pub fn new(
        transport: Arc<Mutex<MmioTransport>>,
        interrupt: Arc<Interrupt>,
        msix: Arc<Mutex<Msix>>,
        notify_evts: Vec<EventFd>,
        bar_addr: u64,
        window: (u64, u64),
        vm: Arc<dyn PciVm>,
    ) -> Self {
        let (device_type, queues) = {
            let t = transport.lock().unwrap_or_else(|e| e.into_inner());
            (t.device().device_type(), t.device().queue_max_sizes().len())
        };
        let (vectors, intx_gsi) = {
            let m = msix.lock().unwrap_or_else(|e| e.into_inner());
            (m.vectors.len(), m.intx_gsi)
        };
        let mut config = ConfigSpace::new(
            Identity {
                vendor: 0x1af4,
                device: 0x1040 + device_type as u16,
                revision: 1,
                class: class_of(device_type),
                subsystem_vendor: 0x1af4,
                subsystem: 0x40,
            },
            BAR_SIZE,
            bar_addr,
        );
        config.set_interrupt(intx_gsi);
        let virtio_cap = |cfg_type: u8, offset: u64, len: u64, extra: &[u8]| {
            let mut body = vec![16 + extra.len() as u8, cfg_type, 0, 0, 0, 0];
            body.extend_from_slice(&(offset as u32).to_le_bytes());
            body.extend_from_slice(&(len as u32).to_le_bytes());
            body.extend_from_slice(extra);
            body
        };
        let none = [0u8; 32];
        for body in [
            virtio_cap(CAP_COMMON, COMMON, COMMON_LEN, &[]),
            virtio_cap(
                CAP_NOTIFY,
                NOTIFY,
                queues as u64 * NOTIFY_MULTIPLIER,
                &(NOTIFY_MULTIPLIER as u32).to_le_bytes(),
            ),
            virtio_cap(CAP_ISR, ISR, 1, &[]),
            virtio_cap(CAP_DEVICE, DEVICE, DEVICE_LEN, &[]),
        ] {
            config.add_capability(CAP_ID_VENDOR, &body, &none[..body.len()]);
        }
        let mut msix_body = ((vectors as u16).saturating_sub(1)).to_le_bytes().to_vec();
        msix_body.extend_from_slice(&(MSIX_TABLE as u32).to_le_bytes());
        msix_body.extend_from_slice(&(MSIX_PBA as u32).to_le_bytes());
        let mut msix_writable = vec![0u8; msix_body.len()];
        msix_writable[..2].copy_from_slice(&(MSIX_ENABLE | MSIX_FUNCTION_MASK).to_le_bytes());
        let msix_cap = config.add_capability(CAP_ID_MSIX, &msix_body, &msix_writable);
        let mut function = Self {
            config,
            transport,
            interrupt,
            msix,
            msix_cap,
            queues,
            device_feature_select: 0,
            driver_feature_select: 0,
            queue_select: 0,
            notify_evts,
            notify_at: None,
            window,
            vm,
            errors: 0,
        };
        // Decoding on at the address given, as firmware leaves a device it placed.
        function
            .config
            .write(reg::COMMAND, &COMMAND_MEMORY.to_le_bytes());
        function.follow_bar();
        function
    }

    fn transport(&self) -> std::sync::MutexGuard<'_, MmioTransport> {
        self.transport.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn msix(&self) -> std::sync::MutexGuard<'_, Msix> {
        self.msix.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keeps KVM's notification catch where the BAR is now: moved with the BAR,
    /// dropped while decoding is off or the BAR is outside the window.
    fn follow_bar(&mut self) {
        let placed = self.config.bar();
        let want = placed.and_then(|(addr, size)| {
            (addr >= self.window.0 && addr.saturating_add(size) <= self.window.1).then_some(addr)
        });
        if want == self.notify_at {
            return;
        }
        if let (Some((addr, _)), None) = (placed, want) {
            guest_error!(
                self.errors,
                bar = addr,
                "virtio-pci BAR placed outside the PCI window; the device is unreachable there"
            );
        }
        if let Some(old) = self.notify_at.take() {
            for (q, evt) in self.notify_evts.iter().enumerate() {
                let addr = old + NOTIFY + q as u64 * NOTIFY_MULTIPLIER;
                if let Err(e) = self.vm.unregister_notify(evt, addr) {
                    guest_error!(
                        self.errors,
                        queue = q,
                        "cannot stop catching a queue notification: {e}"
                    );
                }
            }
        }
        if let Some(new) = want {
            for (q, evt) in self.notify_evts.iter().enumerate() {
                let addr = new + NOTIFY + q as u64 * NOTIFY_MULTIPLIER;
                if let Err(e) = self.vm.register_notify(evt, addr) {
                    // Notifications still arrive through the BAR handler, only slower.
                    guest_error!(
                        self.errors,
                        queue = q,
                        "cannot catch a queue notification in KVM: {e}"
                    );
                }
            }
            self.notify_at = Some(new);
        }
    }

    fn common_read(&mut self, offset: u64, data: &mut [u8]) {
        let value: u64 = match (offset, data.len()) {
            (0x00, 4) => u64::from(self.device_feature_select),
            (0x04, 4) => {
                let features = self.transport().device().features();
                match self.device_feature_select {
                    0 => features & 0xffff_ffff,
                    1 => features >> 32,
                    _ => 0,
                }
            }
            (0x08, 4) => u64::from(self.driver_feature_select),
            (0x10, 2) => u64::from(self.msix().config_vector),
            (0x12, 2) => self.queues as u64,
            (0x14, 1) => u64::from(self.transport().read_register(0x70) as u8),
            (0x15, 1) => u64::from(self.transport().read_register(0xfc) as u8),
            (0x16, 2) => u64::from(self.queue_select),
            (0x18, 2) => self.with_queue(|q| u64::from(virtio_queue::QueueT::size(q))),
            (0x1a, 2) => self
                .msix()
                .queue_vectors
                .get(usize::from(self.queue_select))
                .map_or(u64::from(NO_VECTOR), |&v| u64::from(v)),
            (0x1c, 2) => self.with_queue(|q| u64::from(virtio_queue::QueueT::ready(q))),
            (0x1e, 2) => u64::from(self.queue_select),
            (0x20 | 0x28 | 0x30, 8) => self.queue_address(offset),
            (0x20 | 0x28 | 0x30, 4) => self.queue_address(offset) & 0xffff_ffff,
            (0x24 | 0x2c | 0x34, 4) => self.queue_address(offset - 4) >> 32,
            _ => {
                tracing::debug!(
                    offset,
                    len = data.len(),
                    "virtio-pci common config read undefined"
                );
                0
            }
        };
        let bytes = value.to_le_bytes();
        data.copy_from_slice(&bytes[..data.len()]);
    }

    fn with_queue(&self, f: impl Fn(&virtio_queue::Queue) -> u64) -> u64 {
        self.transport()
            .queue(usize::from(self.queue_select))
            .map_or(0, f)
    }

    fn queue_address(&self, offset: u64) -> u64 {
        use virtio_queue::QueueT;
        self.with_queue(|q| match offset {
            0x20 => q.desc_table(),
            0x28 => q.avail_ring(),
            _ => q.used_ring(),
        })
    }

    fn common_write(&mut self, offset: u64, data: &[u8]) {
        let mut bytes = [0u8; 8];
        bytes[..data.len()].copy_from_slice(data);
        let value = u64::from_le_bytes(bytes);
        let v32 = value as u32;
        let v16 = value as u16;
        match (offset, data.len()) {
            (0x00, 4) => self.device_feature_select = v32,
            (0x08, 4) => {
                self.driver_feature_select = v32;
                self.transport().write_register(0x24, v32);
            }
            (0x0c, 4) => self.transport().write_register(0x20, v32),
            (0x10, 2) => {
                let mut msix = self.msix();
                msix.config_vector = msix.checked(v16);
            }
            (0x14, 1) => {
                self.transport()
                    .write_register(0x70, u32::from(value as u8));
                if value == 0 {
                    self.device_feature_select = 0;
                    self.driver_feature_select = 0;
                    self.queue_select = 0;
                    let mut msix = self.msix();
                    msix.config_vector = NO_VECTOR;
                    msix.queue_vectors.fill(NO_VECTOR);
                }
            }
            (0x16, 2) => {
                self.queue_select = v16;
                self.transport().write_register(0x30, u32::from(v16));
            }
            (0x18, 2) => self.transport().write_register(0x38, u32::from(v16)),
            (0x1a, 2) => {
                let q = usize::from(self.queue_select);
                let mut msix = self.msix();
                let v = msix.checked(v16);
                if let Some(slot) = msix.queue_vectors.get_mut(q) {
                    *slot = v;
                }
            }
            (0x1c, 2) => self.transport().write_register(0x44, u32::from(v16 == 1)),
            (0x20 | 0x28 | 0x30, 8) => {
                let reg = mmio_address_register(offset);
                let mut t = self.transport();
                t.write_register(reg, v32);
                t.write_register(reg + 4, (value >> 32) as u32);
            }
            (0x20 | 0x28 | 0x30, 4) => self
                .transport()
                .write_register(mmio_address_register(offset), v32),
            (0x24 | 0x2c | 0x34, 4) => self
                .transport()
                .write_register(mmio_address_register(offset - 4) + 4, v32),
            _ => {
                guest_error!(
                    self.errors,
                    offset,
                    len = data.len(),
                    "virtio-pci common config write to a read-only or undefined field, or of the wrong width; ignored"
                );
            }
        }
    }
}

/// The virtio-mmio register of a queue address's low half, for the common
/// configuration field at `offset`.
fn mmio_address_register(offset: u64) -> u64 {
    match offset {
        0x20 => 0x80,
        0x28 => 0x90,
        _ => 0xa0,
    }
}

/// The PCI class of a virtio device type.
fn class_of(device_type: u32) -> [u8; 3] {
    match device_type {
        super::TYPE_NET => [0x02, 0x00, 0x00],
        super::TYPE_BLOCK => [0x01, 0x80, 0x00],
        _ => [0xff, 0x00, 0x00],
    }
}

impl PciFunction for VirtioPci {
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        self.config.read(offset, data);
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
        if (reg::COMMAND..reg::COMMAND + 2).contains(&offset)
            || (reg::BAR0..reg::BAR0 + 8).contains(&offset)
        {
            self.follow_bar();
        }
        if (self.msix_cap..self.msix_cap + 4).contains(&offset) {
            let control = self.config.u16_at(self.msix_cap + 2);
            self.msix().set_control(control);
        }
    }

    fn bar(&self) -> Option<(u64, u64)> {
        self.config.bar()
    }

    fn bar_read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            COMMON..0x1000 if offset + data.len() as u64 <= COMMON_LEN => {
                self.common_read(offset, data)
            }
            ISR => {
                // Reading the ISR acknowledges it (virtio 1.1, 4.1.4.5).
                let status = self.interrupt.status();
                self.interrupt.ack(status);
                data.fill(0);
                data[0] = status as u8;
            }
            DEVICE..0x3000 => {
                data.fill(0);
                self.transport().read(CONFIG_SPACE + offset - DEVICE, data);
            }
            MSIX_TABLE..MSIX_PBA => self.msix().table_read(offset - MSIX_TABLE, data),
            MSIX_PBA..0x6000 => {
                let pending = self.msix().pending.to_le_bytes();
                read_bytes(&pending, offset - MSIX_PBA, data);
            }
            _ => data.fill(0),
        }
    }

    fn bar_write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            COMMON..0x1000 if offset + data.len() as u64 <= COMMON_LEN => {
                self.common_write(offset, data)
            }
            DEVICE..0x3000 => self.transport().write(CONFIG_SPACE + offset - DEVICE, data),
            NOTIFY..MSIX_TABLE => {
                // Normally caught in KVM; passed on the same way.
                let queue = (offset - NOTIFY) / NOTIFY_MULTIPLIER;
                self.transport().write_register(QUEUE_NOTIFY, queue as u32);
            }
            MSIX_TABLE..MSIX_PBA => self.msix().table_write(offset - MSIX_TABLE, data),
            _ => tracing::debug!(
                offset,
                "write to a read-only part of a virtio-pci BAR; ignored"
            ),
        }
    }
}

/// What of a virtio-pci function a snapshot keeps besides its transport: the
/// configuration header as the guest left it (command, BAR, interrupt line,
/// MSI-X control), the MSI-X table and pending bits, the vectors the driver
/// chose and the common configuration's selectors.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VirtioPciState {
    /// The 256 bytes of the configuration header and capabilities.
    pub config: Vec<u8>,
    /// Each vector's table entry: message address low, high, data, control.
    pub msix_table: Vec<[u32; 4]>,
    pub msix_pending: u64,
    pub config_vector: u16,
    pub queue_vectors: Vec<u16>,
    pub device_feature_select: u32,
    pub driver_feature_select: u32,
    pub queue_select: u16,
}

impl VirtioPci {
    /// The function's state; its transport's is saved with the transport.
    pub fn save(&self) -> VirtioPciState {
        let mut config = vec![0u8; CONFIG_SIZE];
        self.config.read(0, &mut config);
        let msix = self.msix();
        VirtioPciState {
            config,
            msix_table: msix.vectors.iter().map(|v| v.entry).collect(),
            msix_pending: msix.pending,
            config_vector: msix.config_vector,
            queue_vectors: msix.queue_vectors.clone(),
            device_feature_select: self.device_feature_select,
            driver_feature_select: self.driver_feature_select,
            queue_select: self.queue_select,
        }
    }

    /// Puts a freshly built function (of the same device, its transport
    /// restored) back in `s`: the saved header, table and control are written
    /// as the guest wrote them, through the same checks, so that the BAR's
    /// notifications and the vectors' MSI routes follow; a state that does not
    /// fit the function is refused, naming the field.
    pub fn restore_state(&mut self, s: &VirtioPciState) -> Result<(), RestoreError> {
        let (vectors, queues) = {
            let m = self.msix();
            (m.vectors.len(), m.queue_vectors.len())
        };
        if s.config.len() != CONFIG_SIZE {
            return Err(RestoreError::invalid(
                "config",
                format_args!("{} bytes", s.config.len()),
                format!("a configuration header has {CONFIG_SIZE}"),
            ));
        }
        if s.msix_table.len() != vectors {
            return Err(RestoreError::invalid(
                "msix_table",
                format_args!("{} vectors", s.msix_table.len()),
                format!("the device has {vectors}"),
            ));
        }
        if s.queue_vectors.len() != queues {
            return Err(RestoreError::invalid(
                "queue_vectors",
                format_args!("{} queues", s.queue_vectors.len()),
                format!("the device has {queues}"),
            ));
        }
        let out_of_range = |field: String, v: u16| {
            (v != NO_VECTOR && usize::from(v) >= vectors).then(|| {
                RestoreError::invalid(field, v, format!("the device has {vectors} vectors"))
            })
        };
        let vectors_chosen = std::iter::once(("config_vector".to_owned(), s.config_vector)).chain(
            (s.queue_vectors.iter().enumerate()).map(|(q, &v)| (format!("queue_vectors[{q}]"), v)),
        );
        if let Some(e) = vectors_chosen
            .into_iter()
            .find_map(|(field, v)| out_of_range(field, v))
        {
            return Err(e);
        }
        for (i, entry) in s.msix_table.iter().enumerate() {
            for (w, word) in entry.iter().enumerate() {
                self.msix()
                    .table_write((i * 16 + w * 4) as u64, &word.to_le_bytes());
            }
        }
        {
            let mut msix = self.msix();
            msix.pending = s.msix_pending & (u64::MAX >> (64 - vectors.max(1)));
            msix.config_vector = s.config_vector;
            msix.queue_vectors.clone_from(&s.queue_vectors);
        }
        self.device_feature_select = s.device_feature_select;
        self.driver_feature_select = s.driver_feature_select;
        self.queue_select = s.queue_select;
        // The BAR before decoding is turned on, then MSI-X control last: it may
        // deliver what was pending.
        let header = |at: usize, len: usize| &s.config[at..at + len];
        self.config_write(reg::BAR0, header(reg::BAR0, 8));
        self.config_write(reg::INTERRUPT_PIN - 1, header(reg::INTERRUPT_PIN - 1, 1));
        self.config_write(reg::COMMAND, header(reg::COMMAND, 2));
        self.config_write(self.msix_cap + 2, header(self.msix_cap + 2, 2));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::{BarWindow, EcamWindow, PciBus};
    use crate::virtio::block::Block;
    use crate::virtio::rng::Rng;
    use crate::virtio::VirtioDevice;
    use crate::GuestMemoryMmap;
    use vigil_model::config::{DriveConfig, IoEngine};
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::epoll::EventSet;

    #[derive(Default)]
    struct FakeVm {
        routes: Mutex<Vec<(u32, u64, u32)>>,
        notify: Mutex<Vec<(bool, u64)>>,
    }

    impl PciVm for FakeVm {
        fn set_msi_route(&self, gsi: u32, address: u64, data: u32) -> Result<(), String> {
            self.routes.lock().unwrap().push((gsi, address, data));
            Ok(())
        }
        fn register_notify(&self, _evt: &EventFd, addr: u64) -> Result<(), String> {
            self.notify.lock().unwrap().push((true, addr));
            Ok(())
        }
        fn unregister_notify(&self, _evt: &EventFd, addr: u64) -> Result<(), String> {
            self.notify.lock().unwrap().push((false, addr));
            Ok(())
        }
    }

    const WINDOW: (u64, u64) = (0xc000_0000, 0xd000_0000);

    struct Rig {
        vm: Arc<FakeVm>,
        function: Arc<Mutex<VirtioPci>>,
        ecam: EcamWindow,
        bars: BarWindow,
        irqfds: Vec<EventFd>,
        intx: EventFd,
        interrupt: Arc<Interrupt>,
    }

    /// A virtio-rng function on `vm`, its BAR in the window's second slot;
    /// its vector irqfds, INTx irqfd and interrupt.
    fn function(vm: &Arc<FakeVm>) -> (VirtioPci, Vec<EventFd>, EventFd, Arc<Interrupt>) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        function_of(vm, Box::new(Rng::new(Default::default())), mem)
    }

    /// [`function`] for `device` over `mem`: a vector per queue and one for
    /// the configuration.
    fn function_of(
        vm: &Arc<FakeVm>,
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
    ) -> (VirtioPci, Vec<EventFd>, EventFd, Arc<Interrupt>) {
        let queues = device.queue_max_sizes().len();
        let queue_evts: Vec<EventFd> = (0..queues)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect();
        let notify = queue_evts.iter().map(|e| e.try_clone().unwrap()).collect();
        let irqfds: Vec<EventFd> = (0..=queues)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
            .collect();
        let intx = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let msix = Arc::new(Mutex::new(Msix::new(
            irqfds
                .iter()
                .enumerate()
                .map(|(i, e)| (e.try_clone().unwrap(), 24 + i as u32))
                .collect(),
            (intx.try_clone().unwrap(), 5),
            queues,
            vm.clone(),
        )));
        let interrupt = Arc::new(Interrupt::msix(msix.clone()));
        let transport = MmioTransport::new(device, mem, interrupt.clone(), queue_evts).unwrap();
        let function = VirtioPci::new(
            Arc::new(Mutex::new(transport)),
            interrupt.clone(),
            msix,
            notify,
            WINDOW.0 + 0x8000,
            WINDOW,
            vm.clone(),
        );
        (function, irqfds, intx, interrupt)
    }

    fn rig() -> Rig {
        let vm = Arc::new(FakeVm::default());
        let (function, irqfds, intx, interrupt) = function(&vm);
        let function = Arc::new(Mutex::new(function));
        let mut bus = PciBus::new();
        assert_eq!(bus.add(function.clone()), Some(1));
        let bus = Arc::new(bus);
        Rig {
            vm,
            function,
            ecam: EcamWindow(bus.clone()),
            bars: BarWindow {
                bus,
                base: WINDOW.0,
            },
            irqfds,
            intx,
            interrupt,
        }
    }

    impl Rig {
        fn cfg_read(&mut self, at: u64, len: usize) -> u64 {
            let mut b = [0u8; 8];
            self.ecam.read((1 << 15) + at, &mut b[..len]);
            u64::from_le_bytes(b)
        }
        fn cfg_write(&mut self, at: u64, value: u64, len: usize) {
            self.ecam.write((1 << 15) + at, &value.to_le_bytes()[..len]);
        }
        fn bar_read(&mut self, bar: u64, at: u64, len: usize) -> u64 {
            let mut b = [0u8; 8];
            self.bars.read(bar - WINDOW.0 + at, &mut b[..len]);
            u64::from_le_bytes(b)
        }
        fn bar_write(&mut self, bar: u64, at: u64, value: u64, len: usize) {
            self.bars
                .write(bar - WINDOW.0 + at, &value.to_le_bytes()[..len]);
        }
    }

    /// The guest finds the function and its capabilities, sizes and moves the BAR
    /// (the notification catch moves with it), negotiates, and an MSI-X vector it
    /// routed fires for a config change; masked, it waits in the PBA.
    #[test]
    fn a_driver_finds_sizes_moves_and_is_interrupted() {
        let mut r = rig();
        assert_eq!(r.cfg_read(0, 4), 0x1044_1af4, "virtio-rng, modern id");
        assert_eq!(r.cfg_read(reg::REVISION as u64, 1), 1);
        // The capability list: four virtio structures, then MSI-X.
        let mut at = r.cfg_read(reg::CAPABILITIES as u64, 1);
        let mut found = Vec::new();
        while at != 0 {
            let id = r.cfg_read(at, 1);
            let kind = if id == 9 { r.cfg_read(at + 3, 1) } else { 0 };
            found.push((id, kind));
            at = r.cfg_read(at + 1, 1);
        }
        assert_eq!(found, [(9, 1), (9, 2), (9, 3), (9, 4), (0x11, 0)]);

        // Placed and decoding where the VMM put it; the guest turns decoding off,
        // sizes the BAR, moves it and turns decoding back on.
        let first = WINDOW.0 + 0x8000;
        assert_eq!(*r.vm.notify.lock().unwrap(), [(true, first + NOTIFY)]);
        assert_eq!(r.bar_read(first, 0x12, 2), 1, "num_queues");
        r.cfg_write(reg::COMMAND as u64, 0, 2);
        r.cfg_write(0x10, 0xffff_ffff, 4);
        r.cfg_write(0x14, 0xffff_ffff, 4);
        assert_eq!(r.cfg_read(0x10, 4), 0xffff_8004);
        let bar = WINDOW.0 + 0x10_0000;
        r.cfg_write(0x10, bar, 4);
        r.cfg_write(0x14, 0, 4);
        assert_eq!(
            r.vm.notify.lock().unwrap().len(),
            2,
            "decoding off: dropped"
        );
        r.cfg_write(reg::COMMAND as u64, u64::from(COMMAND_MEMORY), 2);
        assert_eq!(
            r.vm.notify.lock().unwrap()[1..],
            [(false, first + NOTIFY), (true, bar + NOTIFY)],
            "the notification is caught where the BAR is"
        );
        assert_eq!(r.bar_read(bar, 0x12, 2), 1, "num_queues");
        assert_eq!(r.bar_read(bar, 0x18, 2), 256, "queue size");

        // A BAR moved outside the window is dropped, not caught anywhere.
        r.cfg_write(0x14, 0x1, 4);
        assert_eq!(
            r.vm.notify.lock().unwrap().last(),
            Some(&(false, bar + NOTIFY))
        );
        assert_eq!(r.bar_read(bar, 0x12, 2), 0xffff, "unreachable");
        r.cfg_write(0x14, 0, 4);

        // MSI-X: vector 0 for the configuration, routed, then enabled.
        r.bar_write(bar, 0x10, 0, 2);
        assert_eq!(r.bar_read(bar, 0x10, 2), 0);
        r.bar_write(bar, 0x10, 7, 2);
        assert_eq!(
            r.bar_read(bar, 0x10, 2),
            u64::from(NO_VECTOR),
            "vector 7 does not exist"
        );
        r.bar_write(bar, 0x10, 0, 2);
        r.bar_write(bar, MSIX_TABLE, 0xfee0_0000, 4);
        r.bar_write(bar, MSIX_TABLE + 8, 0x41, 4);
        // MSI-X still off: INTA (its line in config space) is raised instead.
        assert_eq!(r.cfg_read(reg::INTERRUPT_PIN as u64, 1), 1);
        assert_eq!(r.cfg_read(reg::INTERRUPT_PIN as u64 - 1, 1), 5);
        r.interrupt.signal(INT_CONFIG);
        assert_eq!(r.intx.read().unwrap(), 1);
        assert!(r.irqfds[0].read().is_err());
        assert_eq!(
            r.vm.routes.lock().unwrap().last(),
            Some(&(24, 0xfee0_0000, 0x41))
        );
        let cap = 0x84;
        assert_eq!(r.cfg_read(cap, 1), 0x11);
        r.cfg_write(cap + 2, u64::from(MSIX_ENABLE), 2);
        // Still masked (entries start masked): pending, not fired.
        r.interrupt.signal(INT_CONFIG);
        assert!(r.irqfds[0].read().is_err());
        assert_eq!(r.bar_read(bar, MSIX_PBA, 8), 1);
        // Unmasked: the pending vector fires.
        r.bar_write(bar, MSIX_TABLE + 12, 0, 4);
        assert_eq!(r.irqfds[0].read().unwrap(), 1);
        assert_eq!(r.bar_read(bar, MSIX_PBA, 8), 0);
        r.interrupt.signal(INT_CONFIG);
        assert_eq!(r.irqfds[0].read().unwrap(), 1);
        assert!(r.intx.read().is_err(), "no INTx with MSI-X on");
        assert_eq!(r.bar_read(bar, ISR, 1), u64::from(INT_CONFIG));
        assert_eq!(r.bar_read(bar, ISR, 1), 0, "reading the ISR clears it");
    }

    /// Garbage in every part of configuration space and the BAR neither panics
    /// nor escapes the bits a register allows.
    #[test]
    fn hostile_writes_are_contained() {
        let mut r = rig();
        r.cfg_write(reg::COMMAND as u64, u64::from(COMMAND_MEMORY), 2);
        let bar = WINDOW.0 + 0x8000;
        for len in [1usize, 2, 4, 8] {
            for at in (0..0x1000).step_by(len) {
                r.cfg_write(at, u64::MAX, len.min(4));
            }
        }
        // BAR0 took all-ones (sizing) and the guest left it there: put it back.
        r.cfg_write(0x10, bar, 4);
        r.cfg_write(0x14, 0, 4);
        assert_eq!(r.cfg_read(0, 4), 0x1044_1af4);
        for len in [1usize, 2, 4, 8] {
            for at in (0..BAR_SIZE).step_by(len) {
                r.bar_write(bar, at, u64::MAX, len);
                r.bar_read(bar, at, len);
            }
        }
        assert_eq!(r.cfg_read(0, 4), 0x1044_1af4);
    }

    /// A function's saved state, put back in a fresh one, leaves it where the
    /// guest had it: BAR moved (its notifications caught there), vectors routed,
    /// MSI-X enabled, a pending vector delivered once unmasked; a state that
    /// does not fit is refused, naming the field.
    #[test]
    fn a_saved_function_comes_back_as_the_guest_left_it() {
        let mut r = rig();
        let moved = WINDOW.0 + 0x40000;
        r.cfg_write(reg::COMMAND as u64, 0, 2);
        r.cfg_write(0x10, moved & 0xffff_ffff, 4);
        r.cfg_write(0x14, moved >> 32, 4);
        r.cfg_write(reg::COMMAND as u64, u64::from(COMMAND_MEMORY), 2);
        r.bar_write(moved, MSIX_TABLE, 0xfee0_0000, 4);
        r.bar_write(moved, MSIX_TABLE + 8, 0x41, 4);
        r.bar_write(moved, MSIX_TABLE + 12, 0, 4);
        r.bar_write(moved, 0x10, 0, 2); // msix_config: vector 0
        let cap = {
            let mut at = r.cfg_read(reg::CAPABILITIES as u64, 1);
            while r.cfg_read(at, 1) != u64::from(CAP_ID_MSIX) {
                at = r.cfg_read(at + 1, 1);
            }
            at
        };
        r.cfg_write(cap + 2, u64::from(MSIX_ENABLE | MSIX_FUNCTION_MASK), 2);
        r.interrupt.signal(INT_CONFIG);
        let saved = r.function.lock().unwrap().save();
        assert_eq!(saved.msix_pending, 1, "masked when it fired");

        let vm = Arc::new(FakeVm::default());
        let (mut back, irqfds, _, _) = function(&vm);
        let mut bad = saved.clone();
        bad.msix_table.pop();
        let e = back.restore_state(&bad).unwrap_err();
        assert_eq!(e.field(), "msix_table", "{e}");
        let mut bad = saved.clone();
        bad.queue_vectors[0] = 7;
        let e = back.restore_state(&bad).unwrap_err();
        assert_eq!(e.field(), "queue_vectors[0]", "{e}");

        back.restore_state(&saved).unwrap();
        assert_eq!(back.bar(), Some((moved, BAR_SIZE)));
        assert_eq!(
            vm.notify.lock().unwrap().last(),
            Some(&(true, moved + NOTIFY))
        );
        assert!(vm.routes.lock().unwrap().contains(&(24, 0xfee0_0000, 0x41)));
        assert!(irqfds[0].read().is_err(), "still masked: nothing fired");
        assert_eq!(back.save(), saved);
        // The guest unmasks the function: the pending vector fires.
        back.config_write(cap as usize + 2, &MSIX_ENABLE.to_le_bytes());
        assert_eq!(irqfds[0].read().unwrap(), 1);
    }

    /// A disk of two queues on the asynchronous engine: a flush on queue 1
    /// completes through queue 1's io_uring, and only queue 1's vector fires.
    #[test]
    fn each_queue_of_a_disk_has_its_own_vector() {
        let image = std::env::temp_dir().join(format!("vigil-pci-mq-{}.img", std::process::id()));
        std::fs::write(&image, [0x5au8; 4096]).unwrap();
        let disk = Block::new(&DriveConfig {
            path: image.clone(),
            id: "mq".into(),
            io_engine: IoEngine::Async,
            num_queues: 2,
            ..Default::default()
        })
        .expect("io_uring on this host");
        std::fs::remove_file(&image).ok();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let vm = Arc::new(FakeVm::default());
        let (mut f, irqfds, intx, _) = function_of(&vm, Box::new(disk), mem.clone());
        let write = |f: &mut VirtioPci, at: u64, value: u64, len: usize| {
            f.bar_write(at, &value.to_le_bytes()[..len]);
        };
        // Every vector routed and unmasked, MSI-X on.
        for v in 0..3 {
            write(&mut f, MSIX_TABLE + 16 * v, 0xfee0_0000, 4);
            write(&mut f, MSIX_TABLE + 16 * v + 8, 0x41 + v, 4);
            write(&mut f, MSIX_TABLE + 16 * v + 12, 0, 4);
        }
        let cap = f.msix_cap;
        f.config_write(cap + 2, &MSIX_ENABLE.to_le_bytes());
        // VERSION_1 and VIRTIO_BLK_F_MQ; queue q's rings at 0x10000 * (q + 1),
        // on vector q + 1.
        write(&mut f, 0x14, 1 | 2, 1);
        write(&mut f, 0x08, 0, 4);
        write(&mut f, 0x0c, 1 << 12, 4);
        write(&mut f, 0x08, 1, 4);
        write(&mut f, 0x0c, 1, 4);
        write(&mut f, 0x14, 1 | 2 | 8, 1);
        for q in 0..2u64 {
            let rings = 0x10000 * (q + 1);
            write(&mut f, 0x16, q, 2);
            write(&mut f, 0x18, 16, 2);
            write(&mut f, 0x1a, q + 1, 2);
            write(&mut f, 0x20, rings, 8);
            write(&mut f, 0x28, rings + 0x1000, 8);
            write(&mut f, 0x30, rings + 0x2000, 8);
            write(&mut f, 0x1c, 1, 2);
        }
        write(&mut f, 0x14, 1 | 2 | 8 | 4, 1);
        assert_eq!(f.transport().status(), 1 | 2 | 8 | 4);
        // A flush on queue 1 (header, status): it goes to the kernel's workers,
        // so it completes through the ring's eventfd.
        let rings = 0x20000u64;
        mem.write_obj([4u64, 0u64], GuestAddress(0x40000)).unwrap();
        for (i, (addr, len, flags)) in [(0x40000u64, 16u32, 1u16), (0x42000, 1, 2)]
            .into_iter()
            .enumerate()
        {
            let desc = rings + 16 * i as u64;
            mem.write_obj(addr, GuestAddress(desc)).unwrap();
            mem.write_obj(len, GuestAddress(desc + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(desc + 12)).unwrap();
            mem.write_obj(i as u16 + 1, GuestAddress(desc + 14))
                .unwrap();
        }
        mem.write_obj(0xffu8, GuestAddress(0x42000)).unwrap();
        mem.write_obj([0u16, 1, 0], GuestAddress(rings + 0x1000))
            .unwrap();
        f.transport().process_queue(1);
        let used =
            |mem: &GuestMemoryMmap| mem.read_obj::<u16>(GuestAddress(rings + 0x2002)).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while used(&mem) == 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the read never completed"
            );
            let fds = f.transport().watched_fds();
            for (fd, _) in fds {
                f.transport().process_fd(fd, EventSet::IN);
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(0x42000)).unwrap(),
            0,
            "S_OK"
        );
        assert_eq!(irqfds[2].read().unwrap(), 1, "queue 1's vector");
        assert!(irqfds[1].read().is_err(), "not queue 0's");
        assert!(irqfds[0].read().is_err(), "not the configuration's");
        assert!(intx.read().is_err(), "no INTx with MSI-X on");
    }
}
