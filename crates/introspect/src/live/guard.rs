//! The MSR guard: a guest write to a syscall MSR, caught by KVM's MSR filter and
//! decided the moment it happens, against the baseline, by the policy (`report`
//! lets it through, `protect` refuses it); each new value is one finding.

use std::sync::Arc;

use vigil_events::Rule;
use vigil_vmm::vstate::inspect::{
    MsrGuard, MsrVerdict, MSR_CSTAR, MSR_LSTAR, MSR_SFMASK, MSR_STAR, MSR_SYSENTER_CS,
    MSR_SYSENTER_EIP, MSR_SYSENTER_ESP,
};

use super::monitor::Command;
use super::{lock, Shared};
use crate::{CpuState, Finding};
use vigil_model::config::Policy;

/// How many (vCPU, MSR, value) the MSR guard remembers having reported; past
/// that, new values are still decided but not reported again.
pub(super) const MSR_REPORTS_KEEP: usize = 4096;

/// A guest write to a syscall MSR, decided the moment it happens.
pub(super) struct Guard(pub(super) Arc<Shared>);

/// `c`'s value of syscall MSR `index`.
fn syscall_msr(c: &CpuState, index: u32) -> Option<u64> {
    Some(match index {
        MSR_LSTAR => c.lstar,
        MSR_STAR => c.star,
        MSR_CSTAR => c.cstar,
        MSR_SFMASK => c.sfmask,
        MSR_SYSENTER_CS => c.sysenter_cs,
        MSR_SYSENTER_ESP => c.sysenter_esp,
        MSR_SYSENTER_EIP => c.sysenter_eip,
        _ => return None,
    })
}

/// The value a write of syscall MSR `index` by `vcpu` is held to: the boot
/// vCPU's at baseline (`boot`), for the boot vCPU and every other alike (an
/// application processor gets the same syscall MSRs, whenever it comes up),
/// except another vCPU's SYSENTER_ESP, which Linux points at each CPU's own
/// entry stack. `None` leaves the write free: before the baseline, or when the
/// boot vCPU had no system call entry at baseline (nothing to hold it to).
fn expected_msr(boot: Option<&CpuState>, vcpu: u32, index: u32) -> Option<u64> {
    let boot = boot?;
    if vcpu != boot.vcpu && index == MSR_SYSENTER_ESP {
        return None;
    }
    syscall_msr(boot, index)
}

fn msr_name(index: u32) -> &'static str {
    match index {
        MSR_LSTAR => "LSTAR",
        MSR_STAR => "STAR",
        MSR_CSTAR => "CSTAR",
        MSR_SFMASK => "SFMASK",
        MSR_SYSENTER_CS => "SYSENTER_CS",
        MSR_SYSENTER_ESP => "SYSENTER_ESP",
        MSR_SYSENTER_EIP => "SYSENTER_EIP",
        _ => "MSR",
    }
}

impl MsrGuard for Guard {
    fn msr_write(&self, vcpu: u32, index: u32, value: u64) -> MsrVerdict {
        let shared = &self.0;
        let boot = *lock(&shared.boot_msrs);
        let expected = expected_msr(boot.as_ref(), vcpu, index);
        // Before the baseline (boot), a vCPU or an MSR the rule leaves free, or a
        // write of the expected value: nothing to say.
        let Some(old) = expected.filter(|&old| old != value) else {
            shared.counters.msr_writes_allowed.inc();
            return MsrVerdict::Allow;
        };
        let whose = match boot {
            Some(boot) if boot.vcpu != vcpu => format!("vCPU {}'s baseline", boot.vcpu),
            _ => "baseline".to_string(),
        };
        let policy = *lock(&shared.policy);
        let report = {
            let mut reported = lock(&shared.msr_reported);
            reported.len() < MSR_REPORTS_KEEP && reported.insert((vcpu, index, value))
        };
        if report {
            let name = msr_name(index);
            let (from_symbol, symbol) = (shared.describe(old), shared.describe(value));
            let verdict = match policy {
                Policy::Protect => "refused",
                Policy::Report => "let through",
            };
            let rule = Rule::SyscallMsrWrite;
            let _ = shared.record(vec![Finding {
                rule,
                priority: rule.default_priority(),
                mitre: rule.mitre(),
                vcpu: Some(vcpu),
                message: format!(
                    "vCPU {vcpu}: wrmsr {name} {value:#x}{} ({whose} {old:#x}{}): {verdict}",
                    symbol
                        .as_ref()
                        .map(|s| format!(" <{s}>"))
                        .unwrap_or_default(),
                    from_symbol
                        .as_ref()
                        .map(|s| format!(" <{s}>"))
                        .unwrap_or_default(),
                ),
                location: name.to_string(),
                from: format!("{old:#x}"),
                to: format!("{value:#x}"),
                from_symbol,
                symbol,
                restored: false,
            }]);
            // An event: check the rest of the kernel now rather than at the period.
            if let Some(tx) = lock(&shared.monitor_tx).as_ref() {
                let _ = tx.send(Command::Check(None));
            }
        }
        match policy {
            Policy::Protect => {
                shared.counters.msr_writes_refused.inc();
                MsrVerdict::Refuse
            }
            Policy::Report => {
                shared.counters.msr_writes_allowed.inc();
                MsrVerdict::Allow
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::{EFER_LMA, EFER_SCE};
    use crate::live::tests::shared;

    #[test]
    fn a_guest_cycling_msr_values_is_reported_a_bounded_number_of_times() {
        let s = Arc::new(shared());
        let base = CpuState {
            cr0: 0x8000_0001,
            efer: EFER_SCE | EFER_LMA,
            lstar: 0x1000,
            sfmask: 0x4_7700,
            ..CpuState::default()
        };
        *lock(&s.boot_msrs) = Some(base);
        *lock(&s.policy) = Policy::Protect;
        let guard = Guard(s.clone());
        for v in 0..(MSR_REPORTS_KEEP as u64 + 100) {
            assert_eq!(
                guard.msr_write(0, MSR_LSTAR, 0x2000 + v),
                MsrVerdict::Refuse
            );
        }
        // The baseline value itself is let through, unreported.
        assert_eq!(guard.msr_write(0, MSR_LSTAR, 0x1000), MsrVerdict::Allow);
        assert_eq!(lock(&s.findings).last_seq, MSR_REPORTS_KEEP as u64);
        assert_eq!(
            s.counters.snapshot().msr_writes_refused,
            MSR_REPORTS_KEEP as u64 + 100
        );
    }

    #[test]
    fn an_ap_is_held_to_the_boot_vcpus_msrs() {
        let s = Arc::new(shared());
        let guard = Guard(s.clone());
        // Before the baseline: free.
        assert_eq!(guard.msr_write(1, MSR_LSTAR, 0x6666), MsrVerdict::Allow);
        let boot = CpuState {
            cr0: 0x8000_0001,
            efer: EFER_SCE | EFER_LMA,
            lstar: 0x1000,
            sfmask: 0x4_7700,
            sysenter_esp: 0x5000,
            ..CpuState::default()
        };
        *lock(&s.boot_msrs) = Some(boot);
        *lock(&s.policy) = Policy::Protect;
        // An AP writing what the boot vCPU has, and its own SYSENTER_ESP: let
        // through, unreported.
        assert_eq!(guard.msr_write(1, MSR_LSTAR, 0x1000), MsrVerdict::Allow);
        assert_eq!(guard.msr_write(1, MSR_SFMASK, 0x4_7700), MsrVerdict::Allow);
        assert_eq!(
            guard.msr_write(1, MSR_SYSENTER_ESP, 0x9000),
            MsrVerdict::Allow
        );
        assert_eq!(lock(&s.findings).last_seq, 0);
        // Another LSTAR: refused, one finding naming the AP and the boot vCPU's value.
        assert_eq!(guard.msr_write(1, MSR_LSTAR, 0x6666), MsrVerdict::Refuse);
        let findings = lock(&s.findings);
        let f = &findings.records.back().unwrap().finding;
        assert_eq!(
            (
                f.rule,
                f.vcpu,
                f.location.as_str(),
                f.from.as_str(),
                f.to.as_str()
            ),
            (Rule::SyscallMsrWrite, Some(1), "LSTAR", "0x1000", "0x6666")
        );
        assert!(
            f.message.contains("vCPU 0's baseline 0x1000") && f.message.ends_with("refused"),
            "{}",
            f.message
        );
        drop(findings);
        // The boot vCPU's own SYSENTER_ESP is held to its baseline.
        assert_eq!(
            guard.msr_write(0, MSR_SYSENTER_ESP, 0x9000),
            MsrVerdict::Refuse
        );
        // A boot vCPU without its syscall entry at baseline: nothing to hold to.
        *lock(&s.boot_msrs) = None;
        assert_eq!(guard.msr_write(1, MSR_LSTAR, 0x7777), MsrVerdict::Allow);
    }
}
