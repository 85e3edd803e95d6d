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
use vigil_devices::virtio::pci::VirtioPciState;

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
    /// The pages the memory-compression pager held at the capture (their
    /// true contents are in the memory file): a load with the pager puts
    /// them straight back in its pool, not in RAM. Left out when empty.
    #[serde(default, skip_serializing_if = "PageBits::is_empty")]
    pub memory_held: PageBits,
    /// How many of them the memory file keeps compressed, after its RAM image
    /// (a hole there), as the pager's pool kept them ([`super::packed`]): a
    /// Full snapshot's. Left out when none.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub memory_packed: u64,
    /// The in-kernel irqchip, PIT and clock.
    pub kvm: KvmVmState,
    /// One per vCPU, by index.
    pub vcpus: Vec<VcpuSnapshot>,
    pub serial: SerialState,
    pub i8042: I8042State,
    /// The virtio transports in attach order: each takes the next MMIO window
    /// and interrupt line, as when the VM was built.
    pub virtio: Vec<MmioTransportState>,
    /// With PCI (`--enable-pci`), each transport's function, in the same
    /// order: slot, BAR and vectors as the guest left them. Empty on
    /// virtio-mmio.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pci: Vec<VirtioPciState>,
    /// What the layers above the VMM keep of this VM, by name, opaque here:
    /// each owner's provider fills its entry at capture
    /// (`VmControl::set_state_extension`), and reads it back from the VM built
    /// from this state (`Vm::extension`, `RunningVm::extension`). Introspection
    /// keeps its monitor here (`"introspection"`). Left out when empty; files
    /// from before it have none.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extensions: BTreeMap<String, serde_json::Value>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
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

/// A set of guest pages, one bit each, numbered through the RAM ranges in
/// order (bit `i` of word `i / 64`); written as hex, the words little-endian:
/// a quarter of a byte per page however the set is scattered.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PageBits(pub Vec<u64>);

impl PageBits {
    /// The set of these page numbers.
    pub fn from_pages(pages: impl IntoIterator<Item = usize>) -> Self {
        let mut words = Vec::new();
        for p in pages {
            if words.len() <= p / 64 {
                words.resize(p / 64 + 1, 0);
            }
            words[p / 64] |= 1u64 << (p % 64);
        }
        Self(words)
    }

    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|&w| w == 0)
    }

    pub fn count(&self) -> u64 {
        self.0.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    pub fn contains(&self, page: usize) -> bool {
        self.0
            .get(page / 64)
            .is_some_and(|w| w & (1u64 << (page % 64)) != 0)
    }

    /// The page numbers in the set, ascending.
    pub fn pages(&self) -> impl Iterator<Item = usize> + '_ {
        self.0.iter().enumerate().flat_map(|(i, &w)| {
            (0..64)
                .filter(move |b| w & (1u64 << b) != 0)
                .map(move |b| i * 64 + b)
        })
    }
}

impl Serialize for PageBits {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let bytes: Vec<u8> = self.0.iter().flat_map(|w| w.to_le_bytes()).collect();
        s.serialize_str(&hex::encode(bytes))
    }
}

impl<'de> Deserialize<'de> for PageBits {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let bytes = hex::decode(&text).map_err(serde::de::Error::custom)?;
        if !bytes.len().is_multiple_of(8) {
            return Err(serde::de::Error::custom(
                "not whole 64-bit words (16 hex digits each)",
            ));
        }
        Ok(Self(
            bytes
                .chunks_exact(8)
                .map(|w| u64::from_le_bytes(w.try_into().unwrap_or_default()))
                .collect(),
        ))
    }
}

/// A range of guest-physical RAM.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MemoryRange {
    pub guest_address: u64,
    pub bytes: u64,
}

/// Checks guest RAM ranges that came from outside (a state file, a migration
/// source's `Begin`) before anything is sized from them: each a whole number
/// of 4 KiB pages at a page boundary, none empty, past the end of the address
/// space or over the one before. Returns the bytes of RAM they make; `Err`
/// says which range is wrong and why.
pub fn check_memory(ranges: &[MemoryRange]) -> Result<u64, String> {
    let page = crate::dirty_log::PAGE_SIZE;
    let mut total = 0u64;
    let mut previous_end = 0u64;
    for (i, r) in ranges.iter().enumerate() {
        let at = format!("range {i} ({:#x}+{:#x})", r.guest_address, r.bytes);
        if r.bytes == 0 || !r.guest_address.is_multiple_of(page) || !r.bytes.is_multiple_of(page) {
            return Err(format!("{at}: not whole 4 KiB pages at a page boundary"));
        }
        let end = r
            .guest_address
            .checked_add(r.bytes)
            .ok_or_else(|| format!("{at}: ends past the 64-bit address space"))?;
        if i > 0 && r.guest_address < previous_end {
            return Err(format!(
                "{at}: starts below the end of the range before ({previous_end:#x}): ranges go up and do not overlap"
            ));
        }
        previous_end = end;
        // Disjoint ranges of a 64-bit space: their sum fits.
        total += r.bytes;
    }
    Ok(total)
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

impl KvmVmState {
    /// The host's real time (ns since the epoch) when the clock was read, if
    /// KVM said: what a `clock_realtime` load advances the clock from.
    pub fn clock_read_at(&self) -> Option<u64> {
        (self.clock.flags & kvm_bindings::KVM_CLOCK_REALTIME != 0).then_some(self.clock.realtime)
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_bits_stay_a_quarter_byte_per_page_and_bad_hex_is_refused() {
        // Every other page of 1 GiB: the worst case for a list of ranges.
        let bits = PageBits::from_pages((0..262_144).step_by(2));
        let json = serde_json::to_string(&bits).unwrap();
        assert_eq!(json.len(), 262_144 / 4 + 2);
        let back: PageBits = serde_json::from_str(&json).unwrap();
        assert_eq!(back, bits);
        assert_eq!(back.count(), 131_072);
        assert_eq!(back.pages().take(3).collect::<Vec<_>>(), [0, 2, 4]);
        let one = PageBits::from_pages([65]);
        assert_eq!(
            serde_json::to_string(&one).unwrap(),
            r#""00000000000000000200000000000000""#
        );
        for bad in [r#""0g00000000000000""#, r#""00""#] {
            assert!(serde_json::from_str::<PageBits>(bad).is_err(), "{bad}");
        }
    }

    fn ranges(r: &[(u64, u64)]) -> Vec<MemoryRange> {
        r.iter()
            .map(|&(guest_address, bytes)| MemoryRange {
                guest_address,
                bytes,
            })
            .collect()
    }

    #[test]
    fn ram_ranges_are_whole_pages_going_up_apart() {
        assert_eq!(
            check_memory(&ranges(&[(0, 0xc000_0000), (1 << 32, 1 << 30)])),
            Ok(0xc000_0000 + (1 << 30))
        );
        assert_eq!(check_memory(&[]), Ok(0));
        for (bad, words) in [
            (vec![(0, 100)], "range 0 (0x0+0x64): not whole 4 KiB pages"),
            (
                vec![(0x800, 0x1000)],
                "not whole 4 KiB pages at a page boundary",
            ),
            (vec![(0, 0)], "range 0 (0x0+0x0): not whole"),
            (
                vec![(u64::MAX - 0xfff, 0x2000)],
                "ends past the 64-bit address space",
            ),
            (
                vec![(0, 0x2000), (0x1000, 0x1000)],
                "range 1 (0x1000+0x1000): starts below the end of the range before (0x2000)",
            ),
            (
                vec![(0x2000, 0x1000), (0, 0x1000)],
                "range 1 (0x0+0x1000): starts below",
            ),
            // Sizes that add up past 2^64.
            (
                vec![(0, u64::MAX - 0xfff), (0, 0x2000)],
                "range 1 (0x0+0x2000): starts below",
            ),
        ] {
            let e = check_memory(&ranges(&bad)).unwrap_err();
            assert!(e.contains(words), "{bad:x?}: {e}");
        }
    }
}
