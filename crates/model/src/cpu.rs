//! CPUID feature bits by name, as `--cpuid-hide` takes them (Linux's
//! `/proc/cpuinfo` spelling).

use std::fmt;
use std::str::FromStr;

/// A CPUID register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reg {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_feature_names_list_the_known_ones() {
        let e = "sse9".parse::<CpuFeature>().unwrap_err().to_string();
        assert!(e.contains("\"sse9\"") && e.contains("xsave"), "{e}");
        assert_eq!("smap".parse::<CpuFeature>().unwrap().leaf, 7);
    }
}
