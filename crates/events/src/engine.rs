//! The pipeline the daemon embeds: correlation, then policy, for each event.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::correlate::{Correlator, CorrelatorConfig, Incident};
use crate::detect::{ConfigError, DetectorConfig};
use crate::event::Event;
use crate::policy::{ActionSink, Policy, PolicyEngine, PolicyError};
use crate::time::Timestamp;

/// The whole crate's configuration, as one section of the daemon's config file:
/// `{"detectors": {...}, "correlation": {...}, "policy": {...}}`, every part
/// optional.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EventsConfig {
    pub detectors: DetectorConfig,
    pub correlation: CorrelatorConfig,
    pub policy: Policy,
}

/// A part of [`EventsConfig`] that cannot be used.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum EventsConfigError {
    #[error(transparent)]
    Detectors(#[from] ConfigError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
}

impl EventsConfig {
    pub fn validate(&self) -> Result<(), EventsConfigError> {
        self.detectors.validate()?;
        self.policy.validate()?;
        Ok(())
    }

    /// The engine this config describes (the detectors are built separately,
    /// from `detectors`, since the daemon feeds them).
    pub fn engine(&self) -> Result<Engine, EventsConfigError> {
        self.validate()?;
        Ok(Engine::new(
            Correlator::new(self.correlation.clone()),
            PolicyEngine::new(self.policy.clone())?,
        ))
    }
}

/// More events than one input can reasonably cause (each input causes at most a
/// sequence event and two policy actions); a guard, not a limit anyone should hit.
const MAX_CASCADE: usize = 16;

/// Correlation and policy together.
///
/// ```
/// use vigil_events::{Correlator, CorrelatorConfig, Engine, Event, Policy, PolicyEngine, Timestamp};
/// let policy: Policy = serde_json::from_str(
///     r#"{"rules":[{"when":{"rule":"vm_io_flood"},"action":"throttle"}]}"#).unwrap();
/// let mut engine = Engine::new(
///     Correlator::new(CorrelatorConfig::default()),
///     PolicyEngine::new(policy).unwrap(),
/// );
/// let flood = Event::new(vigil_events::Rule::VmIoFlood, Timestamp::from_unix_secs(1), "flood")
///     .with_vm("vm1");
/// let mut sink = |_: &vigil_events::Action| -> Result<(), std::convert::Infallible> { Ok(()) };
/// let out = engine.handle(flood, &mut sink);
/// assert_eq!(out.len(), 2); // the flood, then the throttle's policy_action event
/// assert_eq!(out[1].incident_id, out[0].incident_id);
/// ```
#[derive(Debug)]
pub struct Engine {
    pub correlator: Correlator,
    pub policy: PolicyEngine,
}

impl Engine {
    pub fn new(correlator: Correlator, policy: PolicyEngine) -> Self {
        Engine { correlator, policy }
    }

    /// Files `event` under an incident, applies the policy to it (actions go to
    /// `sink`), and does the same for what that causes (a recognised sequence, a
    /// `policy_action` event). Returns every event to publish, in order: `event`
    /// first, each followed by its consequences.
    pub fn handle<S: ActionSink + ?Sized>(&mut self, event: Event, sink: &mut S) -> Vec<Event> {
        let mut out = Vec::new();
        let mut queue = VecDeque::from([event]);
        while let Some(mut e) = queue.pop_front() {
            let derived = self.correlator.observe(&mut e);
            let action = self.policy.apply(&e, sink);
            out.push(e);
            if out.len() >= MAX_CASCADE {
                break;
            }
            // Depth first keeps each consequence next to its cause.
            for d in action.into_iter().rev().chain(derived.into_iter().rev()) {
                queue.push_front(d);
            }
        }
        out
    }

    /// Closes quiet incidents (see [`Correlator::expire`]).
    pub fn expire(&mut self, now: Timestamp) -> Vec<Incident> {
        self.correlator.expire(now)
    }

    /// The VM is gone: close its incident, forget its cooldowns.
    pub fn forget_vm(&mut self, vm_id: &str) {
        self.correlator.close_vm(vm_id);
        self.policy.forget(vm_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Priority, Rule};
    use crate::policy::{Action, ActionKind};

    #[test]
    fn one_config_section() {
        let c: EventsConfig = serde_json::from_str(
            r#"{"correlation":{"window_s":60},
                "policy":{"rules":[{"when":{"rule":"vm_crashed"},"action":"stop"}]}}"#,
        )
        .unwrap();
        assert_eq!(c.correlation.window_s, 60);
        assert_eq!(c.detectors, DetectorConfig::default());
        let e = c.engine().unwrap();
        assert_eq!(e.policy.policy().rules.len(), 1);
        assert_eq!(
            serde_json::from_str::<EventsConfig>("{}").unwrap(),
            EventsConfig::default()
        );
        assert!(serde_json::from_str::<EventsConfig>(r#"{"polcy":{}}"#).is_err());
        let bad: EventsConfig =
            serde_json::from_str(r#"{"detectors":{"psi_io":{"enter":10,"exit":50}}}"#).unwrap();
        assert!(matches!(bad.engine(), Err(EventsConfigError::Detectors(_))));
    }

    #[test]
    fn flood_crash_stop_end_to_end() {
        let policy: Policy = serde_json::from_str(
            r#"{"rules":[
                {"name":"slow down","when":{"rule":"vm_io_flood"},"action":"throttle"},
                {"name":"dos","when":{"rule":"incident_dos_crash"},"action":"stop"}
            ]}"#,
        )
        .unwrap();
        let mut engine = Engine::new(
            Correlator::new(CorrelatorConfig::default()),
            PolicyEngine::new(policy).unwrap(),
        );
        let mut actions = Vec::new();
        let mut sink = |a: &Action| -> Result<(), std::convert::Infallible> {
            actions.push(a.kind);
            Ok(())
        };
        let t = Timestamp::from_unix_secs;
        let mut out = engine.handle(
            Event::new(Rule::VmIoFlood, t(0), "flood").with_vm("a"),
            &mut sink,
        );
        out.extend(engine.handle(Event::vm_crashed("a", t(10), "triple fault"), &mut sink));
        let seen: Vec<_> = out
            .iter()
            .map(|e| (e.rule, e.priority, e.incident_id))
            .collect();
        assert_eq!(
            seen,
            [
                (Rule::VmIoFlood, Priority::Warning, Some(1)),
                (Rule::PolicyAction, Priority::Notice, Some(1)),
                (Rule::VmCrashed, Priority::Error, Some(1)),
                (Rule::IncidentDosCrash, Priority::Critical, Some(1)),
                (Rule::PolicyAction, Priority::Warning, Some(1)),
            ]
        );
        assert_eq!(actions, [ActionKind::Throttle, ActionKind::Stop]);
        let inc = engine.correlator.open_incident("a").unwrap();
        assert_eq!(inc.severity, Priority::Critical);
        assert_eq!(
            inc.summary(),
            "possible denial of service leading to crash: io flood → throttled → crashed → stopped"
        );
        engine.forget_vm("a");
        assert_eq!(engine.expire(t(20)).len(), 1);
    }
}
