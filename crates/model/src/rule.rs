//! The vocabulary every event and finding shares: rules, priorities, sources and
//! ATT&CK techniques. Names are stable: outputs, Prometheus labels and stored
//! records carry them.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// How severe an event is: Falco's eight levels, which are syslog's.
///
/// Ordered by severity: `Priority::Debug < Priority::Warning < Priority::Emergency`,
/// so "at least Warning" is `p >= Priority::Warning`. Serialized as Falco writes it
/// (`"Warning"`); parsed case-insensitively, with `info` for `Informational`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Priority {
    Debug,
    Informational,
    Notice,
    Warning,
    Error,
    Critical,
    Alert,
    Emergency,
}

impl Priority {
    /// Every level, least severe first.
    pub const ALL: [Priority; 8] = [
        Priority::Debug,
        Priority::Informational,
        Priority::Notice,
        Priority::Warning,
        Priority::Error,
        Priority::Critical,
        Priority::Alert,
        Priority::Emergency,
    ];

    /// The name Falco writes: `Emergency` ... `Debug`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Priority::Debug => "Debug",
            Priority::Informational => "Informational",
            Priority::Notice => "Notice",
            Priority::Warning => "Warning",
            Priority::Error => "Error",
            Priority::Critical => "Critical",
            Priority::Alert => "Alert",
            Priority::Emergency => "Emergency",
        }
    }

    /// RFC 5424 severity: 0 (Emergency) to 7 (Debug).
    pub const fn syslog_severity(self) -> u8 {
        match self {
            Priority::Emergency => 0,
            Priority::Alert => 1,
            Priority::Critical => 2,
            Priority::Error => 3,
            Priority::Warning => 4,
            Priority::Notice => 5,
            Priority::Informational => 6,
            Priority::Debug => 7,
        }
    }

    /// CEF severity, 0 (lowest) to 10 (highest).
    pub const fn cef_severity(self) -> u8 {
        match self {
            Priority::Debug => 0,
            Priority::Informational => 1,
            Priority::Notice => 3,
            Priority::Warning => 5,
            Priority::Error => 7,
            Priority::Critical => 8,
            Priority::Alert => 9,
            Priority::Emergency => 10,
        }
    }
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A name that is not one of the values a field accepts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} {name:?} (expected one of: {expected})")]
pub struct UnknownName {
    what: &'static str,
    name: String,
    expected: String,
}

impl FromStr for Priority {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("info") {
            return Ok(Priority::Informational);
        }
        Priority::ALL
            .into_iter()
            .find(|p| p.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| UnknownName {
                what: "priority",
                name: s.to_owned(),
                expected: Priority::ALL.map(Priority::as_str).join(", "),
            })
    }
}

impl Serialize for Priority {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Priority {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Where an event comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// Host-side ("physical") signals: pressure, rate limiters, floods, crashes.
    Host,
    /// VM-side ("virtual") signals from introspection.
    Vm,
    /// The control-plane API.
    Api,
    /// An action a policy took.
    Policy,
    /// A sequence the correlator recognised across events.
    Correlation,
}

impl Source {
    pub const fn as_str(self) -> &'static str {
        match self {
            Source::Host => "host",
            Source::Vm => "vm",
            Source::Api => "api",
            Source::Policy => "policy",
            Source::Correlation => "correlation",
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A MITRE ATT&CK technique an event is tagged with, and its tactic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Mitre {
    /// `T1499.001`
    pub technique: &'static str,
    /// `Endpoint Denial of Service: OS Exhaustion Flood`
    pub name: &'static str,
    /// Falco's tactic tag: `mitre_impact`
    pub tactic_tag: &'static str,
}

pub const T1499: Mitre = Mitre {
    technique: "T1499",
    name: "Endpoint Denial of Service",
    tactic_tag: "mitre_impact",
};
pub const T1499_001: Mitre = Mitre {
    technique: "T1499.001",
    name: "Endpoint Denial of Service: OS Exhaustion Flood",
    tactic_tag: "mitre_impact",
};
pub const T1498_001: Mitre = Mitre {
    technique: "T1498.001",
    name: "Network Denial of Service: Direct Network Flood",
    tactic_tag: "mitre_impact",
};
pub const T1068: Mitre = Mitre {
    technique: "T1068",
    name: "Exploitation for Privilege Escalation",
    tactic_tag: "mitre_privilege_escalation",
};
pub const T1014: Mitre = Mitre {
    technique: "T1014",
    name: "Rootkit",
    tactic_tag: "mitre_defense_evasion",
};
pub const T1547_006: Mitre = Mitre {
    technique: "T1547.006",
    name: "Boot or Logon Autostart Execution: Kernel Modules and Extensions",
    tactic_tag: "mitre_persistence",
};
/// Every technique a rule or event carries.
pub const TECHNIQUES: [Mitre; 7] = [T1499, T1499_001, T1498_001, T1068, T1014, T1547_006, T1190];

impl<'de> Deserialize<'de> for Mitre {
    /// From its technique id; a technique Vigil does not know is an error.
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        struct Repr {
            technique: String,
        }
        let r = Repr::deserialize(d)?;
        TECHNIQUES
            .into_iter()
            .find(|m| m.technique == r.technique)
            .ok_or_else(|| {
                serde::de::Error::custom(format!("unknown ATT&CK technique {:?}", r.technique))
            })
    }
}

pub const T1190: Mitre = Mitre {
    technique: "T1190",
    name: "Exploit Public-Facing Application",
    tactic_tag: "mitre_initial_access",
};

/// What an event is about: a stable identifier (`vm_io_flood`), the same in every
/// output. New rules (the introspection ones) are added as variants; names are
/// never reused or renamed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Rule {
    /// Host memory PSI `some avg10` crossed its threshold (or fell back below it).
    HostMemoryPressure,
    /// Host CPU PSI `some avg10` crossed its threshold.
    HostCpuPressure,
    /// Host I/O PSI `some avg10` crossed its threshold.
    HostIoPressure,
    /// A VM's rate limiter throttled it in N consecutive samples.
    VmRateLimitSaturated,
    /// A VM's disk operations per second stayed above the threshold for the window.
    VmIoFlood,
    /// A VM's received or sent packets per second stayed above the threshold.
    VmPacketFlood,
    /// A guest overran the budget of its RT timer boosts (it kept its vCPU
    /// thread at a real-time priority past what it asked for; the boost was withdrawn).
    VmRtBudgetOverrun,
    /// The API refused a request it could not parse or validate.
    ApiMalformedRequest,
    /// The API refused a request from a peer that may not make it.
    ApiUnauthorized,
    /// The guest crashed (triple fault, KVM internal or emulation error).
    VmCrashed,
    /// A policy acted on a VM (or tried to and failed).
    PolicyAction,
    /// The correlator saw a flood (or saturated rate limiter) then a crash of one VM.
    IncidentDosCrash,
    /// A VM's life went on: created, paused, resumed, stopping, stopped, exited,
    /// failed, destroyed (`vm.lifecycle` says which); a crash is [`Rule::VmCrashed`].
    VmLifecycle,
    // The introspection rules (source `vm`): differences from the guest kernel's
    // integrity baseline, found from outside the guest.
    /// An IDT gate differs from the integrity baseline.
    IdtEntryModified,
    /// A vCPU's IDTR (base or limit) differs from the baseline.
    IdtrChanged,
    /// A GDT descriptor differs from the baseline.
    GdtEntryModified,
    /// A vCPU's GDTR differs from the baseline.
    GdtrChanged,
    /// An entry of the guest kernel's system call table differs from the baseline.
    SyscallTableModified,
    /// A page of kernel text hashes differently from the baseline.
    KernelTextModified,
    /// A page of kernel read-only data hashes differently from the baseline.
    KernelRodataModified,
    /// A page of kernel text or read-only data is mapped elsewhere, unmapped or made writable.
    KernelMappingChanged,
    /// New executable pages in the kernel's module area: a module loaded (named
    /// from the guest's module list when it is there).
    KernelModuleLoaded,
    /// A run of module text present before is no longer mapped: a module unloaded.
    KernelModuleUnloaded,
    /// A page of module text hashes differently from when it was first seen, or
    /// is mapped elsewhere or made writable.
    KernelModuleTextModified,
    /// LSTAR, STAR, CSTAR, SFMASK or SYSENTER_* differs from the baseline.
    SyscallMsrChanged,
    /// The guest wrote a syscall MSR with a value other than its baseline one, caught at the write (refused under the protect policy).
    SyscallMsrWrite,
    /// CR0.WP was set at baseline and is clear.
    Cr0WpCleared,
    /// CR4.SMEP was set at baseline and is clear.
    Cr4SmepCleared,
    /// CR4.SMAP was set at baseline and is clear.
    Cr4SmapCleared,
    /// CR4.UMIP was set at baseline and is clear.
    Cr4UmipCleared,
    /// EFER.NXE was set at baseline and is clear.
    EferNxeCleared,
    /// EFER.SCE differs from the baseline.
    EferSceChanged,
    /// Memory an integrity check must read could not be read.
    IntegrityReadFailed,
}

impl Rule {
    /// Every rule, in the README's order.
    pub const ALL: [Rule; 33] = [
        Rule::HostMemoryPressure,
        Rule::HostCpuPressure,
        Rule::HostIoPressure,
        Rule::VmRateLimitSaturated,
        Rule::VmIoFlood,
        Rule::VmPacketFlood,
        Rule::VmRtBudgetOverrun,
        Rule::ApiMalformedRequest,
        Rule::ApiUnauthorized,
        Rule::VmCrashed,
        Rule::PolicyAction,
        Rule::IncidentDosCrash,
        Rule::VmLifecycle,
        Rule::IdtEntryModified,
        Rule::IdtrChanged,
        Rule::GdtEntryModified,
        Rule::GdtrChanged,
        Rule::SyscallTableModified,
        Rule::KernelTextModified,
        Rule::KernelRodataModified,
        Rule::KernelMappingChanged,
        Rule::KernelModuleLoaded,
        Rule::KernelModuleUnloaded,
        Rule::KernelModuleTextModified,
        Rule::SyscallMsrChanged,
        Rule::SyscallMsrWrite,
        Rule::Cr0WpCleared,
        Rule::Cr4SmepCleared,
        Rule::Cr4SmapCleared,
        Rule::Cr4UmipCleared,
        Rule::EferNxeCleared,
        Rule::EferSceChanged,
        Rule::IntegrityReadFailed,
    ];

    /// The stable identifier.
    pub const fn as_str(self) -> &'static str {
        match self {
            Rule::HostMemoryPressure => "host_memory_pressure",
            Rule::HostCpuPressure => "host_cpu_pressure",
            Rule::HostIoPressure => "host_io_pressure",
            Rule::VmRateLimitSaturated => "vm_rate_limit_saturated",
            Rule::VmIoFlood => "vm_io_flood",
            Rule::VmPacketFlood => "vm_packet_flood",
            Rule::VmRtBudgetOverrun => "vm_rt_budget_overrun",
            Rule::ApiMalformedRequest => "api_malformed_request",
            Rule::ApiUnauthorized => "api_unauthorized",
            Rule::VmCrashed => "vm_crashed",
            Rule::PolicyAction => "policy_action",
            Rule::IncidentDosCrash => "incident_dos_crash",
            Rule::VmLifecycle => "vm_lifecycle",
            Rule::IdtEntryModified => "idt_entry_modified",
            Rule::IdtrChanged => "idtr_changed",
            Rule::GdtEntryModified => "gdt_entry_modified",
            Rule::GdtrChanged => "gdtr_changed",
            Rule::SyscallTableModified => "syscall_table_modified",
            Rule::KernelTextModified => "kernel_text_modified",
            Rule::KernelRodataModified => "kernel_rodata_modified",
            Rule::KernelMappingChanged => "kernel_mapping_changed",
            Rule::KernelModuleLoaded => "kernel_module_loaded",
            Rule::KernelModuleUnloaded => "kernel_module_unloaded",
            Rule::KernelModuleTextModified => "kernel_module_text_modified",
            Rule::SyscallMsrChanged => "syscall_msr_changed",
            Rule::SyscallMsrWrite => "syscall_msr_write",
            Rule::Cr0WpCleared => "cr0_wp_cleared",
            Rule::Cr4SmepCleared => "cr4_smep_cleared",
            Rule::Cr4SmapCleared => "cr4_smap_cleared",
            Rule::Cr4UmipCleared => "cr4_umip_cleared",
            Rule::EferNxeCleared => "efer_nxe_cleared",
            Rule::EferSceChanged => "efer_sce_changed",
            Rule::IntegrityReadFailed => "integrity_read_failed",
        }
    }

    /// A few words for an incident summary: "io flood", "crashed".
    pub const fn label(self) -> &'static str {
        match self {
            Rule::HostMemoryPressure => "host memory pressure",
            Rule::HostCpuPressure => "host cpu pressure",
            Rule::HostIoPressure => "host io pressure",
            Rule::VmRateLimitSaturated => "rate limit saturated",
            Rule::VmIoFlood => "io flood",
            Rule::VmPacketFlood => "packet flood",
            Rule::VmRtBudgetOverrun => "real-time budget overrun",
            Rule::ApiMalformedRequest => "malformed api request",
            Rule::ApiUnauthorized => "unauthorized api request",
            Rule::VmCrashed => "crashed",
            Rule::PolicyAction => "policy action",
            Rule::IncidentDosCrash => "possible denial of service leading to crash",
            Rule::VmLifecycle => "lifecycle",
            Rule::IdtEntryModified => "idt gate modified",
            Rule::IdtrChanged => "idtr changed",
            Rule::GdtEntryModified => "gdt entry modified",
            Rule::GdtrChanged => "gdtr changed",
            Rule::SyscallTableModified => "syscall table modified",
            Rule::KernelTextModified => "kernel text modified",
            Rule::KernelRodataModified => "kernel rodata modified",
            Rule::KernelMappingChanged => "kernel mapping changed",
            Rule::KernelModuleLoaded => "kernel module loaded",
            Rule::KernelModuleUnloaded => "kernel module unloaded",
            Rule::KernelModuleTextModified => "kernel module text modified",
            Rule::SyscallMsrChanged => "syscall msr changed",
            Rule::SyscallMsrWrite => "syscall msr written",
            Rule::Cr0WpCleared => "cr0.wp cleared",
            Rule::Cr4SmepCleared => "cr4.smep cleared",
            Rule::Cr4SmapCleared => "cr4.smap cleared",
            Rule::Cr4UmipCleared => "cr4.umip cleared",
            Rule::EferNxeCleared => "efer.nxe cleared",
            Rule::EferSceChanged => "efer.sce changed",
            Rule::IntegrityReadFailed => "integrity read failed",
        }
    }

    /// The priority of the rule's main ("started", "crossed") event.
    pub const fn default_priority(self) -> Priority {
        match self {
            Rule::HostMemoryPressure => Priority::Error,
            Rule::HostCpuPressure | Rule::HostIoPressure => Priority::Warning,
            Rule::VmRateLimitSaturated
            | Rule::VmIoFlood
            | Rule::VmPacketFlood
            | Rule::VmRtBudgetOverrun => Priority::Warning,
            Rule::ApiMalformedRequest => Priority::Notice,
            Rule::ApiUnauthorized => Priority::Warning,
            Rule::VmCrashed => Priority::Error,
            Rule::PolicyAction => Priority::Notice,
            Rule::IncidentDosCrash => Priority::Critical,
            Rule::VmLifecycle => Priority::Informational,
            Rule::Cr4UmipCleared
            | Rule::EferSceChanged
            | Rule::IntegrityReadFailed
            | Rule::KernelModuleLoaded => Priority::Warning,
            Rule::KernelModuleUnloaded => Priority::Notice,
            // The other introspection rules: a hooked or patched kernel.
            _ => Priority::Critical,
        }
    }

    /// Which source emits it.
    pub const fn source(self) -> Source {
        if self.is_introspection() {
            return Source::Vm;
        }
        match self {
            Rule::ApiMalformedRequest | Rule::ApiUnauthorized => Source::Api,
            Rule::PolicyAction => Source::Policy,
            Rule::IncidentDosCrash => Source::Correlation,
            _ => Source::Host,
        }
    }

    /// The ATT&CK technique the rule's events carry, if one applies (the README
    /// explains each choice). API rules carry the Unix-socket mapping here; see
    /// [`ApiTransport`].
    pub const fn mitre(self) -> Option<Mitre> {
        match self {
            Rule::HostMemoryPressure | Rule::HostCpuPressure | Rule::HostIoPressure => None,
            Rule::VmRateLimitSaturated | Rule::VmRtBudgetOverrun => Some(T1499),
            Rule::VmIoFlood => Some(T1499_001),
            Rule::VmPacketFlood => Some(T1498_001),
            Rule::ApiMalformedRequest | Rule::ApiUnauthorized => Some(T1068),
            Rule::VmCrashed => None,
            Rule::PolicyAction => None,
            Rule::IncidentDosCrash => Some(T1499),
            Rule::VmLifecycle => None,
            Rule::Cr4SmepCleared
            | Rule::Cr4SmapCleared
            | Rule::Cr4UmipCleared
            | Rule::EferNxeCleared => Some(T1068),
            Rule::IntegrityReadFailed | Rule::KernelModuleUnloaded => None,
            Rule::KernelModuleLoaded => Some(T1547_006),
            Rule::IdtEntryModified
            | Rule::IdtrChanged
            | Rule::GdtEntryModified
            | Rule::GdtrChanged
            | Rule::SyscallTableModified
            | Rule::KernelTextModified
            | Rule::KernelRodataModified
            | Rule::KernelMappingChanged
            | Rule::KernelModuleTextModified
            | Rule::SyscallMsrChanged
            | Rule::SyscallMsrWrite
            | Rule::Cr0WpCleared
            | Rule::EferSceChanged => Some(T1014),
        }
    }

    /// Whether it is one of the introspection rules (a finding about the guest
    /// kernel's integrity).
    pub const fn is_introspection(self) -> bool {
        matches!(
            self,
            Rule::IdtEntryModified
                | Rule::IdtrChanged
                | Rule::GdtEntryModified
                | Rule::GdtrChanged
                | Rule::SyscallTableModified
                | Rule::KernelTextModified
                | Rule::KernelRodataModified
                | Rule::KernelMappingChanged
                | Rule::KernelModuleLoaded
                | Rule::KernelModuleUnloaded
                | Rule::KernelModuleTextModified
                | Rule::SyscallMsrChanged
                | Rule::SyscallMsrWrite
                | Rule::Cr0WpCleared
                | Rule::Cr4SmepCleared
                | Rule::Cr4SmapCleared
                | Rule::Cr4UmipCleared
                | Rule::EferNxeCleared
                | Rule::EferSceChanged
                | Rule::IntegrityReadFailed
        )
    }

    /// Whether it is a resource-exhaustion signal from one VM (what the
    /// flood-then-crash sequence starts with).
    pub const fn is_vm_exhaustion(self) -> bool {
        matches!(
            self,
            Rule::VmIoFlood
                | Rule::VmPacketFlood
                | Rule::VmRateLimitSaturated
                | Rule::VmRtBudgetOverrun
        )
    }

    /// Tags: a few category words, then the ATT&CK tactic and technique, Falco-style
    /// (`["vm", "resource_exhaustion", "mitre_impact", "T1499.001"]`).
    pub fn default_tags(self) -> Vec<String> {
        let categories: &[&str] = match self {
            Rule::HostMemoryPressure | Rule::HostCpuPressure | Rule::HostIoPressure => {
                &["host", "resource_exhaustion"]
            }
            Rule::VmRateLimitSaturated
            | Rule::VmIoFlood
            | Rule::VmPacketFlood
            | Rule::VmRtBudgetOverrun => &["vm", "resource_exhaustion"],
            Rule::ApiMalformedRequest | Rule::ApiUnauthorized => &["api"],
            Rule::VmCrashed => &["vm", "availability"],
            Rule::PolicyAction => &["policy", "response"],
            Rule::IncidentDosCrash => &["vm", "incident", "availability"],
            Rule::VmLifecycle => &["vm", "lifecycle"],
            // The introspection rules.
            _ => &["vm", "introspection", "integrity"],
        };
        let mut tags: Vec<String> = categories.iter().map(|s| (*s).to_owned()).collect();
        if let Some(m) = self.mitre() {
            tags.push(m.tactic_tag.to_owned());
            tags.push(m.technique.to_owned());
        }
        tags
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Rule {
    type Err = UnknownName;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Rule::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| UnknownName {
                what: "rule",
                name: s.to_owned(),
                expected: Rule::ALL.map(Rule::as_str).join(", "),
            })
    }
}

impl Serialize for Rule {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Rule {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn priority_order_names_and_mappings() {
        assert!(Priority::Emergency > Priority::Alert);
        assert!(Priority::Warning > Priority::Notice);
        assert!(Priority::Debug < Priority::Informational);
        for p in Priority::ALL {
            assert_eq!(p.as_str().parse::<Priority>(), Ok(p));
            assert_eq!(p.as_str().to_uppercase().parse::<Priority>(), Ok(p));
        }
        assert_eq!("info".parse::<Priority>(), Ok(Priority::Informational));
        assert!("severe".parse::<Priority>().is_err());
        // Syslog severity falls as priority rises; CEF severity rises with it.
        for w in Priority::ALL.windows(2) {
            assert!(w[0].syslog_severity() > w[1].syslog_severity());
            assert!(w[0].cef_severity() < w[1].cef_severity());
        }
        assert_eq!(Priority::Emergency.cef_severity(), 10);
        assert_eq!(
            serde_json::to_string(&Priority::Critical).unwrap(),
            "\"Critical\""
        );
        assert_eq!(
            serde_json::from_str::<Priority>("\"WARNING\"").unwrap(),
            Priority::Warning
        );
    }

    #[test]
    fn rule_names_are_stable_and_unique() {
        let names: Vec<&str> = Rule::ALL.iter().map(|r| r.as_str()).collect();
        assert_eq!(
            names,
            [
                "host_memory_pressure",
                "host_cpu_pressure",
                "host_io_pressure",
                "vm_rate_limit_saturated",
                "vm_io_flood",
                "vm_packet_flood",
                "vm_rt_budget_overrun",
                "api_malformed_request",
                "api_unauthorized",
                "vm_crashed",
                "policy_action",
                "incident_dos_crash",
                "vm_lifecycle",
                "idt_entry_modified",
                "idtr_changed",
                "gdt_entry_modified",
                "gdtr_changed",
                "syscall_table_modified",
                "kernel_text_modified",
                "kernel_rodata_modified",
                "kernel_mapping_changed",
                "kernel_module_loaded",
                "kernel_module_unloaded",
                "kernel_module_text_modified",
                "syscall_msr_changed",
                "syscall_msr_write",
                "cr0_wp_cleared",
                "cr4_smep_cleared",
                "cr4_smap_cleared",
                "cr4_umip_cleared",
                "efer_nxe_cleared",
                "efer_sce_changed",
                "integrity_read_failed",
            ]
        );
        for r in Rule::ALL {
            assert_eq!(r.is_introspection(), r.source() == Source::Vm, "{r}");
        }
        for r in Rule::ALL {
            assert_eq!(r.as_str().parse::<Rule>(), Ok(r));
            assert_eq!(
                serde_json::to_string(&r).unwrap(),
                format!("\"{}\"", r.as_str())
            );
            // RFC 5424 MSGID holds at most 32 characters.
            assert!(r.as_str().len() <= 32);
        }
        assert!("vm_io_flod".parse::<Rule>().is_err());
    }
}
