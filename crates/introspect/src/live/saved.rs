//! The monitor carried by a snapshot or a migration: its settings and, once
//! taken, its baseline with what it has reported, kept as the VM state's
//! `"introspection"` extension ([`STATE_EXTENSION`]), so that the monitor of
//! the VM built back goes on from the baseline of the guest as it booted,
//! instead of taking a new one that would trust whatever the guest changed
//! since. `vigil-vmm` keeps it without reading it.

use std::collections::HashSet;
use std::sync::{mpsc, Arc};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vigil_model::config::IntrospectConfig;
use vigil_vmm::snapshot::StateExtension;

use super::guard::MSR_REPORTS_KEEP;
use super::monitor::{Command, Located, Start};
use super::{lock, IntrospectError, Introspector, MonitorSettings};
use crate::{Baseline, Checker, CpuState, ReportedLocation};

/// The name of the monitor's entry in `VmState::extensions`.
pub const STATE_EXTENSION: &str = "introspection";

/// The format of [`MonitorState`] this Vigil writes and reads.
const FORMAT: u32 = 1;

/// The integrity monitor of a VM, as a snapshot or a migration carries it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MonitorState {
    /// [`FORMAT`]; another is refused.
    pub format: u32,
    /// The monitor's settings, every one given.
    pub settings: IntrospectConfig,
    /// `None` while the baseline was not taken yet.
    pub baseline: Option<CarriedBaseline>,
}

/// A monitor's baseline and what it has reported against it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CarriedBaseline {
    /// The baseline, with the vCPUs that joined since it was taken; its layout
    /// holds the KASLR slide.
    pub baseline: Baseline,
    /// How the slide was found (`GET /vigil/introspect`'s `kaslr_slide_from`).
    pub kaslr_slide_from: String,
    /// The checker's locations reported and not restored since.
    pub reported: Vec<ReportedLocation>,
    /// The boot vCPU's syscall MSRs, which the MSR guard holds guest writes to
    /// (empty when it had none set up at baseline; an older Vigil put every
    /// vCPU's here: only the boot vCPU's is read).
    pub guard_msrs: Vec<CpuState>,
    /// (vCPU, MSR, value) the MSR guard has reported.
    pub guard_reported: Vec<(u32, u32, u64)>,
}

/// A carried monitor that cannot be used: `field` is its path in the state.
fn carried(field: impl std::fmt::Display, why: impl std::fmt::Display) -> IntrospectError {
    IntrospectError::Carried(format!("{field}: {why}"))
}

impl MonitorState {
    /// The monitor state a snapshot or migration carried, checked: every field
    /// parses, the format is this Vigil's, the settings are within bounds, and
    /// the baseline is one the checks can use ([`Baseline::validate`]).
    pub fn from_json(value: &serde_json::Value) -> Result<Self, IntrospectError> {
        let bytes = serde_json::to_vec(value).unwrap_or_default();
        let state: Self =
            vigil_model::json::parse(&bytes).map_err(|e| carried(STATE_EXTENSION, e))?;
        if state.format != FORMAT {
            return Err(carried(
                "format",
                format!("{}; this Vigil reads {FORMAT}", state.format),
            ));
        }
        let s = &state.settings;
        s.validate().map_err(|e| carried("settings", e))?;
        if s.period.is_none() || s.policy.is_none() || s.baseline_after.is_none() {
            return Err(carried(
                "settings",
                "period_ms, policy and baseline_after_ms must all be given",
            ));
        }
        if let Some(b) = &state.baseline {
            b.baseline
                .validate()
                .map_err(|e| carried("baseline.baseline", e))?;
            if b.guard_reported.len() > MSR_REPORTS_KEEP {
                return Err(carried(
                    "baseline.guard_reported",
                    format!(
                        "{} values, more than the {MSR_REPORTS_KEEP} kept",
                        b.guard_reported.len()
                    ),
                ));
            }
        }
        Ok(state)
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).expect("a MonitorState always serializes")
    }

    /// The settings it runs with on arrival: those given there (`--introspect`
    /// at the destination or the loading Vigil) where given, else the carried
    /// ones.
    fn settings(&self, overrides: Option<&IntrospectConfig>) -> MonitorSettings {
        let o = overrides.copied().unwrap_or_default();
        let c = &self.settings;
        let merged = IntrospectConfig {
            period: o.period.or(c.period),
            policy: o.policy.or(c.policy),
            baseline_after: o.baseline_after.or(c.baseline_after),
        };
        MonitorSettings::resolve(&merged, Duration::ZERO)
    }
}

impl Introspector {
    /// The running monitor's state, to carry (asked of its thread, which
    /// answers between two checks); `None` when no monitor runs.
    pub fn monitor_state(&self) -> Result<Option<MonitorState>, IntrospectError> {
        let (reply, answer) = mpsc::channel();
        {
            let monitor = lock(&self.monitor);
            let Some(m) = monitor.as_ref() else {
                return Ok(None);
            };
            m.commands
                .send(Command::Save(reply))
                .map_err(|_| IntrospectError::MonitorEnded)?;
        }
        answer
            .recv_timeout(Duration::from_secs(30))
            .map(Some)
            .map_err(|_| IntrospectError::MonitorTimeout)
    }

    /// What the monitor thread answers [`Command::Save`] with.
    pub(super) fn state_of(
        &self,
        settings: MonitorSettings,
        checker: Option<&Checker>,
    ) -> MonitorState {
        let baseline = checker.map(|c| CarriedBaseline {
            baseline: c.baseline().clone(),
            kaslr_slide_from: lock(&self.located)
                .as_ref()
                .map(|l| l.slide_from.clone())
                .unwrap_or_default(),
            reported: c.reported(),
            guard_msrs: lock(&self.shared.boot_msrs).iter().copied().collect(),
            guard_reported: {
                let mut r: Vec<_> = lock(&self.shared.msr_reported).iter().copied().collect();
                r.sort_unstable();
                r
            },
        });
        MonitorState {
            format: FORMAT,
            settings: IntrospectConfig {
                period: Some(settings.period),
                policy: Some(settings.policy),
                baseline_after: Some(settings.baseline_after),
            },
            baseline,
        }
    }

    /// The provider of the VM state's [`STATE_EXTENSION`], to register on the
    /// VM (`VmControl::set_state_extension`): the monitor's state at every
    /// snapshot and migration, nothing when no monitor runs.
    pub fn state_extension(self: &Arc<Self>) -> StateExtension {
        let me = Arc::downgrade(self);
        Arc::new(move || {
            let Some(me) = me.upgrade() else {
                return Ok(None);
            };
            me.monitor_state()
                .map(|s| s.map(|s| s.to_json()))
                .map_err(|e| format!("the introspection monitor: {e}"))
        })
    }

    /// Starts the monitor a snapshot or migration carried, with `overrides`'
    /// settings where given ([`MonitorState`]): from its baseline, not
    /// reporting again what it had reported, the first check re-reading every
    /// page (what changed before the capture and was not checked yet is
    /// found); without a baseline yet, as [`Introspector::start_monitor`].
    pub fn resume_monitor(
        self: &Arc<Self>,
        state: MonitorState,
        overrides: Option<&IntrospectConfig>,
    ) -> Result<(), IntrospectError> {
        let settings = state.settings(overrides);
        let Some(carried) = state.baseline else {
            return self.start_monitor(settings);
        };
        let symbols = self.symbols();
        self.stop_monitor();
        let baseline = carried.baseline;
        *lock(&self.located) = Some(Located {
            slide: baseline.layout.slide,
            slide_from: carried.kaslr_slide_from,
            layout: baseline.layout.clone(),
        });
        *lock(&self.shared.baseline) = Some(Arc::new(baseline.clone()));
        *lock(&self.shared.boot_msrs) = carried
            .guard_msrs
            .into_iter()
            .find(|c| c.vcpu == baseline.reference_vcpu);
        *lock(&self.shared.msr_reported) =
            carried.guard_reported.into_iter().collect::<HashSet<_>>();
        // A new reader's first take counts every page written: the first check
        // re-hashes them all.
        let reader = self.vm.dirty_log().subscribe()?;
        let checker = Checker::resume(baseline, symbols.clone(), carried.reported);
        tracing::info!("introspection: the monitor goes on from its carried baseline");
        self.spawn_monitor(
            symbols,
            settings,
            Start::Resume(Box::new((checker, reader))),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bad_carried_state_is_refused_naming_the_field() {
        let good = MonitorState {
            format: FORMAT,
            settings: IntrospectConfig {
                period: Some(Duration::from_millis(100)),
                policy: Some(vigil_model::config::Policy::Protect),
                baseline_after: Some(Duration::ZERO),
            },
            baseline: None,
        };
        let back = MonitorState::from_json(&good.to_json()).unwrap();
        assert_eq!(back.settings, good.settings);
        // Overrides win where given.
        let o = IntrospectConfig {
            period: Some(Duration::from_secs(2)),
            ..Default::default()
        };
        let s = back.settings(Some(&o));
        assert_eq!(
            (s.period, s.policy),
            (Duration::from_secs(2), vigil_model::config::Policy::Protect)
        );

        let refused = |v: serde_json::Value, needle: &str| {
            let e = MonitorState::from_json(&v).unwrap_err().to_string();
            assert!(e.contains(needle), "{e} lacks {needle:?}");
        };
        let mut v = good.to_json();
        v["format"] = 2.into();
        refused(v, "format: 2");
        let mut v = good.to_json();
        v["settings"]["period_ms"] = 0.into();
        refused(v, "period_ms 0");
        let mut v = good.to_json();
        v["settings"]
            .as_object_mut()
            .unwrap()
            .remove("baseline_after_ms");
        refused(v, "must all be given");
        let mut v = good.to_json();
        v["bogus"] = 1.into();
        refused(v, "bogus");
    }
}
