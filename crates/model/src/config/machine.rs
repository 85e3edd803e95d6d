//! The machine: vCPUs, memory, and what the guest's CPUID shows.

use crate::config::{FieldError, HostLimits};
use crate::cpu::{CpuFeature, CpuModifiers};

/// Most vCPUs Vigil describes: xAPIC ids in the MADT are 8-bit and 0xff is broadcast.
pub const MAX_VCPUS: u32 = 254;

/// Smallest VM Vigil builds: room for the boot structures, a kernel and its stack.
pub const MIN_MEMORY_MIB: u64 = 2;

/// CPUID features to hide from the guest.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum CpuTemplate {
    /// Pass through what KVM supports, except on hosts whose KVM emulates guest
    /// kernel code (`kvm_pvm`), where instructions that emulator lacks are hidden.
    #[default]
    Auto,
    /// Pass through what KVM supports.
    Host,
}

/// How guest RAM is backed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HugePages {
    /// 4 KiB pages (`MADV_NOHUGEPAGE`): the VMM's resident memory grows only by
    /// the pages the guest touches.
    #[default]
    None,
    /// Transparent huge pages (`MADV_HUGEPAGE`), where the host allows them: KVM
    /// maps guest memory in 2 MiB pages, faster for guests that touch much of it;
    /// a touched byte makes its whole 2 MiB page resident.
    Transparent,
}

/// The vCPUs and memory of a VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MachineConfig {
    /// Number of vCPUs.
    pub vcpu_count: u32,
    /// Guest memory in MiB (the part above 3 GiB is mapped above 4 GiB).
    pub mem_size_mib: u64,
    /// Base CPUID template.
    pub cpu_template: CpuTemplate,
    /// Extra features to hide, on top of the template.
    pub cpuid_hide: Vec<CpuFeature>,
    /// A custom CPU template (`PUT /cpu-config`, `--cpu-config`), applied last.
    pub cpu_modifiers: CpuModifiers,
    /// How guest RAM is backed.
    pub huge_pages: HugePages,
}

impl Default for MachineConfig {
    /// Vigil's defaults: 1 vCPU, 128 MiB.
    fn default() -> Self {
        Self {
            vcpu_count: 1,
            mem_size_mib: 128,
            cpu_template: CpuTemplate::Auto,
            cpuid_hide: Vec::new(),
            cpu_modifiers: CpuModifiers::default(),
            huge_pages: HugePages::None,
        }
    }
}

/// A machine the host cannot give.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MachineConfigError {
    #[error("vcpu_count 0: a VM needs at least one vCPU (1 to {MAX_VCPUS})")]
    NoVcpus,
    #[error("vcpu_count {requested}: above this host's limit of {limit} (KVM allows {kvm}, Vigil's MADT {MAX_VCPUS})", limit = .kvm.min(&MAX_VCPUS))]
    TooManyVcpus { requested: u32, kvm: u32 },
    #[error("mem_size_mib 0: a VM needs memory")]
    NoMemory,
    #[error("mem_size_mib {requested} MiB: the guest needs at least {MIN_MEMORY_MIB} MiB")]
    TooLittleMemory { requested: u64 },
    #[error("mem_size_mib {requested} MiB: larger than this host's {host} MiB of RAM")]
    TooMuchMemory { requested: u64, host: u64 },
}

impl FieldError for MachineConfigError {
    fn field(&self) -> &'static str {
        match self {
            Self::NoVcpus | Self::TooManyVcpus { .. } => "vcpu_count",
            _ => "mem_size_mib",
        }
    }
}

impl MachineConfig {
    /// Guest memory in bytes.
    pub fn memory_bytes(&self) -> u64 {
        self.mem_size_mib << 20
    }

    /// Checks the machine against what this host allows.
    pub fn validate(&self, limits: &HostLimits) -> Result<(), MachineConfigError> {
        match self.vcpu_count {
            0 => return Err(MachineConfigError::NoVcpus),
            n if n > limits.kvm_max_vcpus.min(MAX_VCPUS) => {
                return Err(MachineConfigError::TooManyVcpus {
                    requested: n,
                    kvm: limits.kvm_max_vcpus,
                })
            }
            _ => {}
        }
        match self.mem_size_mib {
            0 => Err(MachineConfigError::NoMemory),
            m if m < MIN_MEMORY_MIB => Err(MachineConfigError::TooLittleMemory { requested: m }),
            m if m.saturating_mul(1 << 20) > limits.host_memory_bytes => {
                Err(MachineConfigError::TooMuchMemory {
                    requested: m,
                    host: limits.host_memory_bytes >> 20,
                })
            }
            _ => Ok(()),
        }
    }
}
