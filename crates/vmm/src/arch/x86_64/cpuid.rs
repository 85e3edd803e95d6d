//! The CPUID each vCPU sees: what KVM supports, with per-vCPU topology (APIC ids),
//! a timing leaf, and features hidden by a template or by the user.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};
use vigil_model::cpu::{CpuFeature, CpuidModifier, Reg};

/// Clears `feature`'s bit in `entry` (of the feature's leaf and subleaf).
fn clear(feature: &CpuFeature, entry: &mut kvm_cpuid_entry2) {
    let mask = !(1u32 << feature.bit);
    *register(entry, feature.reg) &= mask;
}

fn register(entry: &mut kvm_cpuid_entry2, reg: Reg) -> &mut u32 {
    match reg {
        Reg::Eax => &mut entry.eax,
        Reg::Ebx => &mut entry.ebx,
        Reg::Ecx => &mut entry.ecx,
        Reg::Edx => &mut entry.edx,
    }
}

/// Features that the CPL0 emulator of a `kvm_pvm` host cannot execute (see the
/// project's PLATFORM.md): hiding them lets kernels take their fallback paths.
///
/// Measured with the test guest's `cpuid` scenario: `kvm_pvm` only applies the bits
/// KVM reports in `KVM_GET_SUPPORTED_CPUID` (CX16 here); for the others it shows
/// the host's own bits whatever the table says, so a Linux guest there also needs
/// `noxsave clearcpuid=smap,smep,popcnt`. On other KVMs all five are hidden.
pub const EMULATED_CPL0_HIDDEN: &[&str] = &["xsave", "cx16", "smap", "smep", "popcnt"];

/// Whether this host's KVM runs guest kernel code through an emulator.
pub fn host_emulates_cpl0() -> bool {
    std::path::Path::new("/sys/module/kvm_pvm").exists()
}

/// KVM's signature leaf, and the VMware-style timing leaf Vigil adds after it.
const HYPERVISOR_BASE: u32 = 0x4000_0000;
const TIMING_LEAF: u32 = 0x4000_0010;
/// KVM's local APIC timer runs at 1 GHz (`APIC_BUS_CYCLE_NS` = 1).
const LAPIC_BUS_KHZ: u32 = 1_000_000;

/// Inputs that make one vCPU's CPUID differ from another's.
#[derive(Clone, Copy, Debug)]
pub struct Topology {
    /// This vCPU's APIC id.
    pub apic_id: u8,
    /// vCPUs in the VM (one socket, one thread per core).
    pub vcpus: u32,
}

/// Builds one vCPU's CPUID from KVM's supported set, then applies a custom
/// template's `modifiers` (adding the leaves KVM does not report).
pub fn build(
    base: &CpuId,
    topo: Topology,
    tsc_khz: Option<u32>,
    hide: &[CpuFeature],
    modifiers: &[CpuidModifier],
) -> Result<CpuId, CustomTemplateError> {
    let mut entries: Vec<kvm_cpuid_entry2> = base
        .as_slice()
        .iter()
        .copied()
        .filter(|e| e.function != TIMING_LEAF)
        .collect();
    // Bits needed to number every vCPU: the core-level shift in leaves 0xb/0x1f.
    let core_bits = 32 - (topo.vcpus.max(1) - 1).leading_zeros();
    let apic_id = u32::from(topo.apic_id);
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | ((topo.vcpus & 0xff) << 16);
                if topo.vcpus > 1 {
                    e.edx |= 1 << 28; // HTT: the logical processor count is valid
                }
                e.ecx |= 1 << 31; // running under a hypervisor
            }
            4 => {
                // Cores per package - 1; the cache sharing fields: L3 is shared.
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { topo.vcpus - 1 } else { 0 };
                e.eax = (e.eax & 0x3ff) | ((topo.vcpus - 1) << 26) | ((sharing & 0xfff) << 14);
            }
            0xb | 0x1f => {
                e.edx = apic_id;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = (1 << 8) | e.index;
                    }
                    1 => {
                        e.eax = core_bits;
                        e.ebx = topo.vcpus;
                        e.ecx = (2 << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            HYPERVISOR_BASE if tsc_khz.is_some() => e.eax = e.eax.max(TIMING_LEAF),
            _ => {}
        }
        let (function, index) = (e.function, e.index);
        for f in hide
            .iter()
            .filter(|f| f.leaf == function && f.subleaf == index)
        {
            clear(f, e);
        }
        if e.function == 1 && hide.iter().any(|f| f.name == "xsave") {
            e.ecx &= !(1 << 27); // OSXSAVE follows XSAVE
        }
    }
    if let Some(khz) = tsc_khz {
        entries.push(kvm_cpuid_entry2 {
            function: TIMING_LEAF,
            eax: khz,
            ebx: LAPIC_BUS_KHZ,
            ..Default::default()
        });
    }
    for m in modifiers {
        let at = entries
            .iter()
            .position(|e| e.function == m.leaf && e.index == m.subleaf)
            .unwrap_or_else(|| {
                entries.push(kvm_cpuid_entry2 {
                    function: m.leaf,
                    index: m.subleaf,
                    flags: m.flags,
                    ..Default::default()
                });
                entries.len() - 1
            });
        let reg = register(&mut entries[at], m.reg);
        *reg = m.bits.apply(*reg);
    }
    let count = entries.len();
    CpuId::from_entries(&entries).map_err(|_| CustomTemplateError::TooManyLeaves(count))
}

/// A custom CPU template (`PUT /cpu-config`) this host's KVM cannot apply.
#[derive(Debug, thiserror::Error)]
pub enum CustomTemplateError {
    #[error("cpu-config: cpuid_modifiers: {0} CPUID entries with the leaves they add, more than the {max} KVM takes", max = kvm_bindings::KVM_MAX_CPUID_ENTRIES)]
    TooManyLeaves(usize),
    #[error("cpu-config: kvm_capabilities \"{0}\": this host's KVM does not have capability {0}")]
    MissingKvmCapability(u32),
    #[error("cpu-config: msr_modifiers addr {addr:#x}: KVM refused {what} it")]
    Msr { addr: u32, what: &'static str },
}

/// Adds hypervisor leaf `function` (above `0x4000_0000`, such as the RT timer's)
/// with `regs` (EAX, EBX, ECX, EDX), raising the hypervisor base leaf's maximum
/// to reach it.
pub fn add_hypervisor_leaf(cpuid: &CpuId, function: u32, regs: [u32; 4]) -> CpuId {
    let mut entries: Vec<kvm_cpuid_entry2> = cpuid
        .as_slice()
        .iter()
        .copied()
        .filter(|e| e.function != function)
        .collect();
    for e in entries.iter_mut().filter(|e| e.function == HYPERVISOR_BASE) {
        e.eax = e.eax.max(function);
    }
    entries.push(kvm_cpuid_entry2 {
        function,
        eax: regs[0],
        ebx: regs[1],
        ecx: regs[2],
        edx: regs[3],
        ..Default::default()
    });
    CpuId::from_entries(&entries).expect("one entry more than a CPUID KVM accepted")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: 0xffff_ffff,
            ebx: 0xffff_ffff,
            ecx: 0xffff_ffff,
            edx: 0xffff_ffff,
            ..Default::default()
        }
    }

    fn find(c: &CpuId, function: u32, index: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap()
    }

    fn base() -> CpuId {
        CpuId::from_entries(&[
            entry(1, 0),
            entry(7, 0),
            entry(0xb, 0),
            entry(0xb, 1),
            entry(HYPERVISOR_BASE, 0),
        ])
        .unwrap()
    }

    #[test]
    fn topology_is_per_vcpu() {
        let c = build(
            &base(),
            Topology {
                apic_id: 3,
                vcpus: 4,
            },
            None,
            &[],
            &[],
        )
        .unwrap();
        let l1 = find(&c, 1, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_ne!(l1.ecx & (1 << 31), 0);
        let smt = find(&c, 0xb, 0);
        let core = find(&c, 0xb, 1);
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 3));
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (2, 4, 0x201, 3));
    }

    #[test]
    fn hides_features_and_adds_timing_leaf() {
        let hide: Vec<_> = ["xsave", "smap", "smep"]
            .iter()
            .map(|n| n.parse().unwrap())
            .collect();
        let c = build(
            &base(),
            Topology {
                apic_id: 0,
                vcpus: 1,
            },
            Some(2_500_000),
            &hide,
            &[],
        )
        .unwrap();
        assert_eq!(find(&c, 1, 0).ecx & (1 << 26 | 1 << 27), 0);
        assert_eq!(find(&c, 7, 0).ebx & (1 << 7 | 1 << 20), 0);
        assert_eq!(find(&c, 7, 0).ebx | (1 << 7 | 1 << 20), 0xffff_ffff);
        assert_eq!(find(&c, HYPERVISOR_BASE, 0).eax, 0xffff_ffff);
        let t = find(&c, TIMING_LEAF, 0);
        assert_eq!((t.eax, t.ebx), (2_500_000, LAPIC_BUS_KHZ));
    }

    #[test]
    fn a_custom_template_modifies_leaves_and_adds_missing_ones() {
        use vigil_model::cpu::BitModifier;
        let modifier = |leaf, reg, set, clear| CpuidModifier {
            leaf,
            subleaf: 0,
            flags: 0,
            reg,
            bits: BitModifier { set, clear },
        };
        let c = build(
            &base(),
            Topology {
                apic_id: 0,
                vcpus: 1,
            },
            None,
            &[],
            &[
                modifier(7, Reg::Ebx, 0, 0xff),
                modifier(0x4000_0010, Reg::Edx, 0x1234, 0),
            ],
        )
        .unwrap();
        assert_eq!(find(&c, 7, 0).ebx, 0xffff_ff00);
        assert_eq!(find(&c, 0x4000_0010, 0).edx, 0x1234);
        let too_many: Vec<_> = (0..kvm_bindings::KVM_MAX_CPUID_ENTRIES as u32)
            .map(|i| modifier(0x4000_1000 + i, Reg::Eax, 1, 0))
            .collect();
        let topo = Topology {
            apic_id: 0,
            vcpus: 1,
        };
        let e = build(&base(), topo, None, &[], &too_many).unwrap_err();
        assert!(
            e.to_string().starts_with("cpu-config: cpuid_modifiers: "),
            "{e}"
        );
    }
}
