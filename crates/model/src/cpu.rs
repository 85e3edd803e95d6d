//! CPUID feature bits by name, as `--cpuid-hide` takes them (Linux's
//! `/proc/cpuinfo` spelling).

use std::fmt;
use std::str::FromStr;

/// A CPUID register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reg {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

/// A CPUID feature bit Vigil can hide from the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuFeature {
    /// Name as used by `--cpuid-hide` (Linux's `/proc/cpuinfo` spelling).
    pub name: &'static str,
    pub leaf: u32,
    pub subleaf: u32,
    pub reg: Reg,
    pub bit: u8,
}

const fn feature(name: &'static str, leaf: u32, subleaf: u32, reg: Reg, bit: u8) -> CpuFeature {
    CpuFeature {
        name,
        leaf,
        subleaf,
        reg,
        bit,
    }
}

/// Every feature `--cpuid-hide` knows, by name.
pub const FEATURES: &[CpuFeature] = &[
    feature("sse3", 1, 0, Reg::Ecx, 0),
    feature("pclmulqdq", 1, 0, Reg::Ecx, 1),
    feature("ssse3", 1, 0, Reg::Ecx, 9),
    feature("fma", 1, 0, Reg::Ecx, 12),
    feature("cx16", 1, 0, Reg::Ecx, 13),
    feature("pcid", 1, 0, Reg::Ecx, 17),
    feature("sse4_1", 1, 0, Reg::Ecx, 19),
    feature("sse4_2", 1, 0, Reg::Ecx, 20),
    feature("x2apic", 1, 0, Reg::Ecx, 21),
    feature("movbe", 1, 0, Reg::Ecx, 22),
    feature("popcnt", 1, 0, Reg::Ecx, 23),
    feature("tsc_deadline_timer", 1, 0, Reg::Ecx, 24),
    feature("aes", 1, 0, Reg::Ecx, 25),
    feature("xsave", 1, 0, Reg::Ecx, 26),
    feature("avx", 1, 0, Reg::Ecx, 28),
    feature("rdrand", 1, 0, Reg::Ecx, 30),
    feature("fsgsbase", 7, 0, Reg::Ebx, 0),
    feature("avx2", 7, 0, Reg::Ebx, 5),
    feature("smep", 7, 0, Reg::Ebx, 7),
    feature("invpcid", 7, 0, Reg::Ebx, 10),
    feature("rdseed", 7, 0, Reg::Ebx, 18),
    feature("smap", 7, 0, Reg::Ebx, 20),
    feature("umip", 7, 0, Reg::Ecx, 2),
    feature("pku", 7, 0, Reg::Ecx, 3),
    feature("la57", 7, 0, Reg::Ecx, 16),
    feature("rdpid", 7, 0, Reg::Ecx, 22),
    feature("pdpe1gb", 0x8000_0001, 0, Reg::Edx, 26),
    feature("rdtscp", 0x8000_0001, 0, Reg::Edx, 27),
];

impl CpuFeature {
    /// Looks a feature up by name.
    pub fn by_name(name: &str) -> Option<CpuFeature> {
        FEATURES.iter().copied().find(|f| f.name == name)
    }
}

/// A name no feature has.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown CPUID feature {0:?}; known: {known}", known = FEATURES.iter().map(|f| f.name).collect::<Vec<_>>().join(", "))]
pub struct UnknownFeature(pub String);

impl FromStr for CpuFeature {
    type Err = UnknownFeature;

    fn from_str(s: &str) -> Result<Self, UnknownFeature> {
        CpuFeature::by_name(s).ok_or_else(|| UnknownFeature(s.to_owned()))
    }
}

impl fmt::Display for CpuFeature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }
}

/// Bits a custom CPU template forces in a register of `T` bits: those in `set`
/// become 1, those in `clear` 0, and the others stay as KVM and Vigil's template
/// left them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BitModifier<T> {
    pub set: T,
    pub clear: T,
}

impl<T> BitModifier<T>
where
    T: Copy
        + std::ops::BitAnd<Output = T>
        + std::ops::BitOr<Output = T>
        + std::ops::Not<Output = T>,
{
    pub fn apply(&self, value: T) -> T {
        (value & !self.clear) | self.set
    }
}

/// One CPUID register of one leaf and subleaf, modified.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuidModifier {
    pub leaf: u32,
    pub subleaf: u32,
    /// KVM's flags for the entry (`KVM_CPUID_FLAG_SIGNIFCANT_INDEX`), used when
    /// the leaf is not in KVM's set and is added.
    pub flags: u32,
    pub reg: Reg,
    pub bits: BitModifier<u32>,
}

/// One MSR's value at boot, modified.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MsrModifier {
    pub addr: u32,
    pub bits: BitModifier<u64>,
}

/// A custom CPU template (Firecracker's `PUT /cpu-config`): applied on top of
/// Vigil's own template and `--cpuid-hide`, to every vCPU.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CpuModifiers {
    pub cpuid: Vec<CpuidModifier>,
    pub msrs: Vec<MsrModifier>,
    /// KVM capabilities (`KVM_CAP_*` numbers) the VM must have: building fails,
    /// naming the number, on a host whose KVM lacks one.
    pub required_kvm_caps: Vec<u32>,
}

impl CpuModifiers {
    pub fn is_empty(&self) -> bool {
        self.cpuid.is_empty() && self.msrs.is_empty() && self.required_kvm_caps.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_feature_names_list_the_known_ones() {
        let e = "sse9".parse::<CpuFeature>().unwrap_err().to_string();
        assert!(e.contains("\"sse9\"") && e.contains("xsave"), "{e}");
        assert_eq!("smap".parse::<CpuFeature>().unwrap().leaf, 7);
    }

    #[test]
    fn a_modifier_sets_and_clears_only_its_bits() {
        let m = BitModifier {
            set: 0b0001u32,
            clear: 0b0110,
        };
        assert_eq!(m.apply(0b1110), 0b1001);
        assert_eq!(m.apply(0), 0b0001);
    }
}
