//! What a snapshot holds besides guest memory: plain serde data, checked when a
//! VM is built back from it (the file may come from anywhere).

use std::collections::BTreeMap;
use std::path::PathBuf;

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use serde::{Deserialize, Serialize};
use vigil_devices::legacy::{I8042State, SerialState};
use vigil_devices::virtio::mmio::MmioTransportState;

/// A paused VM, all but its memory.
#[derive(Serialize, Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct VmState {
    /// The Vigil that wrote it (shown; the file's format version is what counts).
    pub vigil_version: String,
    pub machine: SavedMachine,
    /// Guest RAM, in the order the memory file holds it.
    pub memory: Vec<MemoryRange>,
    /// Whether the memory file was written whole or as a diff (files from
    /// before diffs existed are whole).
    #[serde(default)]
    pub memory_kind: MemoryKind,
    /// The in-kernel irqchip, PIT and clock.
    pub kvm: KvmVmState,
    /// One per vCPU, by index.
    pub vcpus: Vec<VcpuSnapshot>,
    pub serial: SerialState,
    pub i8042: I8042State,
    /// The virtio transports in attach order: each takes the next MMIO window
    /// and interrupt line, as when the VM was built.
    pub virtio: Vec<MmioTransportState>,
    /// What the layers above the VMM keep of this VM, by name, opaque here:
    /// each owner's provider fills its entry at capture
    /// (`VmControl::set_state_extension`), and reads it back from the VM built
    /// from this state (`Vm::extension`, `RunningVm::extension`). Introspection
    /// keeps its monitor here (`"introspection"`). Left out when empty; files
    /// from before it have none.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extensions: BTreeMap<String, serde_json::Value>,
}

/// What a snapshot's memory file holds, as written (`snapshot_type`).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum MemoryKind {
    /// All of guest RAM, pages of zeros as holes: loaded as it is.
    #[default]
    Full,
    /// Only the pages written since the VM's previous snapshot (or since it was
    /// restored), each at its offset, every other page a hole meaning
    /// "unchanged": it is loaded only after it has been merged onto that previous
    /// snapshot's memory file (`vigil snapshot merge`), which cannot be checked
    /// from the file's content.
    Diff,
}

/// What the VM was built from that building it back needs.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SavedMachine {
    pub vcpu_count: u32,
    pub mem_size_mib: u64,
    /// The kernel, as messages name it.
    pub kernel: String,
    /// The kernel's file, for its symbols; none for an image built into Vigil.
    pub kernel_file: Option<PathBuf>,
    /// A `System.map` given at boot.
    pub symbols: Option<PathBuf>,
}

/// A range of guest-physical RAM.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MemoryRange {
    pub guest_address: u64,
    pub bytes: u64,
}

/// The KVM VM's own devices.
#[derive(Serialize, Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct KvmVmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

/// One vCPU, as KVM reports it between two `KVM_RUN`s.
#[derive(Serialize, Deserialize, Debug)]
#[serde(deny_unknown_fields)]
pub struct VcpuSnapshot {
    pub id: u32,
    /// The CPUID the guest saw.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// The guest's TSC frequency, when KVM reports it.
    pub tsc_khz: Option<u32>,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    /// Every MSR of KVM's list that KVM could read.
    pub msrs: Vec<kvm_msr_entry>,
    pub events: kvm_vcpu_events,
    pub mp_state: kvm_mp_state,
}
