//! Policies: what to do to a VM when an event about it matches.
//!
//! A [`Policy`] is a list of rules `{ when: { rule, min_priority, source }, action,
//! params, cooldown_s }`, read from a config file or an API body. For each event
//! about a VM, the [`PolicyEngine`] picks the strongest action of the rules that
//! match (stop > pause > throttle), skips it if the same action was taken on the
//! same VM within its cooldown, hands it to an [`ActionSink`] (the daemon, which
//! does it), and returns a `policy_action` event saying what was done or why it
//! failed. Events about no VM, and `policy_action` events themselves, never
//! trigger a policy.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::event::{Event, Priority, Rule, Source};
use crate::time::Timestamp;

/// What may be done to a VM, weakest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ActionKind {
    /// Tighten its rate limits (`params` say how; the daemon interprets them).
    Throttle,
    /// Pause its vCPUs.
    Pause,
    /// Stop the VM.
    Stop,
}

impl ActionKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            ActionKind::Throttle => "throttle",
            ActionKind::Pause => "pause",
            ActionKind::Stop => "stop",
        }
    }

    /// The priority of the `policy_action` event when it succeeds.
    pub const fn event_priority(self) -> Priority {
        match self {
            ActionKind::Throttle => Priority::Notice,
            ActionKind::Pause | ActionKind::Stop => Priority::Warning,
        }
    }
}

impl fmt::Display for ActionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which events a policy rule matches: all the given conditions hold.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    /// This rule only (any rule when absent).
    #[serde(default)]
    pub rule: Option<Rule>,
    /// At least this priority (Warning when absent).
    #[serde(default = "warning")]
    pub min_priority: Priority,
    /// From this source only.
    #[serde(default)]
    pub source: Option<Source>,
}

fn warning() -> Priority {
    Priority::Warning
}

impl Condition {
    pub fn matches(&self, e: &Event) -> bool {
        self.rule.is_none_or(|r| r == e.rule)
            && e.priority >= self.min_priority
            && self.source.is_none_or(|s| s == e.source)
    }
}

/// One rule of a policy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyRule {
    /// Names it in `policy_action` events (`#<index>` when empty).
    #[serde(default)]
    pub name: String,
    pub when: Condition,
    pub action: ActionKind,
    /// Passed to the sink as they are (for throttle, say, new limits).
    #[serde(default)]
    pub params: BTreeMap<String, Value>,
    /// Overrides the policy's cooldown for this rule's action.
    #[serde(default)]
    pub cooldown_s: Option<u64>,
}

/// A list of rules and a default cooldown.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    #[serde(default)]
    pub rules: Vec<PolicyRule>,
    /// The same action on the same VM is not taken again within this many
    /// seconds (60).
    #[serde(default = "default_cooldown")]
    pub cooldown_s: u64,
}

fn default_cooldown() -> u64 {
    60
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            rules: Vec::new(),
            cooldown_s: default_cooldown(),
        }
    }
}

/// A policy that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("policy rule {index}: `policy_action` events cannot trigger a policy (a loop)")]
    SelfTrigger { index: usize },
    #[error("policy has {0} rules; at most {MAX_RULES}")]
    TooManyRules(usize),
    #[error("policy rule {index}: cooldown_s {value} is more than a day")]
    Cooldown { index: usize, value: u64 },
}

/// The most rules a policy may have.
pub const MAX_RULES: usize = 256;
const MAX_COOLDOWN_S: u64 = 86_400;

impl Policy {
    /// Checks that the policy can be used.
    pub fn validate(&self) -> Result<(), PolicyError> {
        if self.rules.len() > MAX_RULES {
            return Err(PolicyError::TooManyRules(self.rules.len()));
        }
        if self.cooldown_s > MAX_COOLDOWN_S {
            return Err(PolicyError::Cooldown {
                index: 0,
                value: self.cooldown_s,
            });
        }
        for (index, r) in self.rules.iter().enumerate() {
            if r.when.rule == Some(Rule::PolicyAction) || r.when.source == Some(Source::Policy) {
                return Err(PolicyError::SelfTrigger { index });
            }
            if let Some(value) = r.cooldown_s.filter(|c| *c > MAX_COOLDOWN_S) {
                return Err(PolicyError::Cooldown { index, value });
            }
        }
        Ok(())
    }
}

/// An action to take on a VM, for the [`ActionSink`].
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Action {
    pub vm_id: String,
    pub kind: ActionKind,
    pub params: BTreeMap<String, Value>,
    /// The policy rule's name (`#<index>` when it has none).
    pub policy_rule: String,
    /// The event that triggered it.
    pub trigger_rule: Rule,
    pub trigger_priority: Priority,
    pub incident_id: Option<u64>,
    pub at: Timestamp,
}

/// Does actions: the daemon implements it (or passes a closure
/// `FnMut(&Action) -> Result<(), E>`). An error is reported, as its `Display`
/// text, in the `policy_action` event; it must not panic.
pub trait ActionSink {
    /// Why an action failed.
    type Error: std::fmt::Display;
    fn execute(&mut self, action: &Action) -> Result<(), Self::Error>;
}

impl<F, E> ActionSink for F
where
    F: FnMut(&Action) -> Result<(), E>,
    E: std::fmt::Display,
{
    type Error = E;
    fn execute(&mut self, action: &Action) -> Result<(), E> {
        self(action)
    }
}

/// Applies a policy to events.
#[derive(Debug)]
pub struct PolicyEngine {
    policy: Policy,
    /// When each (VM, action) was last taken, and its cooldown.
    last: HashMap<(String, ActionKind), (Timestamp, Duration)>,
}

/// Cooldown entries kept before expired ones are swept.
const SWEEP_AT: usize = 4096;

impl PolicyEngine {
    /// Fails on a policy that [`Policy::validate`] rejects.
    pub fn new(policy: Policy) -> Result<Self, PolicyError> {
        policy.validate()?;
        Ok(PolicyEngine {
            policy,
            last: HashMap::new(),
        })
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Replaces the policy (validated); cooldowns in progress carry over.
    pub fn set_policy(&mut self, policy: Policy) -> Result<(), PolicyError> {
        policy.validate()?;
        self.policy = policy;
        Ok(())
    }

    /// Forgets a VM's cooldowns (it stopped).
    pub fn forget(&mut self, vm_id: &str) {
        self.last.retain(|(vm, _), _| vm != vm_id);
    }

    /// The action the policy wants for `event`, if any and not cooling down; the
    /// cooldown starts now (the action counts as taken, whether or not it
    /// succeeds, so that a failing action is not retried every sample).
    pub fn decide(&mut self, event: &Event) -> Option<Action> {
        let vm_id = event.vm_id.as_deref()?;
        if event.rule == Rule::PolicyAction || event.source == Source::Policy {
            return None;
        }
        let (index, rule) = self
            .policy
            .rules
            .iter()
            .enumerate()
            .filter(|(_, r)| r.when.matches(event))
            // The strongest action; the first rule among equals.
            .fold(
                None,
                |best: Option<(usize, &PolicyRule)>, (i, r)| match best {
                    Some((_, b)) if b.action >= r.action => best,
                    _ => Some((i, r)),
                },
            )?;
        let key = (vm_id.to_owned(), rule.action);
        if let Some((then, cooldown)) = self.last.get(&key) {
            let cooling = event.time.since(*then).is_none_or(|d| d < *cooldown);
            if cooling {
                return None;
            }
        }
        let cooldown = Duration::from_secs(rule.cooldown_s.unwrap_or(self.policy.cooldown_s));
        if self.last.len() >= SWEEP_AT {
            let now = event.time;
            self.last
                .retain(|_, (then, cd)| now.since(*then).is_none_or(|d| d < *cd));
        }
        self.last.insert(key, (event.time, cooldown));
        Some(Action {
            vm_id: vm_id.to_owned(),
            kind: rule.action,
            params: rule.params.clone(),
            policy_rule: if rule.name.is_empty() {
                format!("#{index}")
            } else {
                rule.name.clone()
            },
            trigger_rule: event.rule,
            trigger_priority: event.priority,
            incident_id: event.incident_id,
            at: event.time,
        })
    }

    /// [`PolicyEngine::decide`], then has `sink` execute the action; returns the
    /// `policy_action` event to publish (and correlate).
    pub fn apply<S: ActionSink + ?Sized>(&mut self, event: &Event, sink: &mut S) -> Option<Event> {
        let action = self.decide(event)?;
        let error = sink.execute(&action).err().map(|e| e.to_string());
        Some(action_event(&action, error.as_deref()))
    }
}

/// The `policy_action` event for an action taken (`error: None`) or failed.
pub fn action_event(action: &Action, error: Option<&str>) -> Event {
    let vm = &action.vm_id;
    let kind = action.kind;
    let (priority, message) = match error {
        None => (
            kind.event_priority(),
            format!(
                "policy: {kind} vm {vm} (rule {:?}, triggered by {})",
                action.policy_rule, action.trigger_rule
            ),
        ),
        Some(err) => (
            Priority::Error,
            format!(
                "policy: {kind} vm {vm} failed: {err} (rule {:?}, triggered by {})",
                action.policy_rule, action.trigger_rule
            ),
        ),
    };
    let mut e = Event::new(Rule::PolicyAction, action.at, message)
        .with_vm(vm.clone())
        .with_priority(priority)
        .with_field("policy.action", kind.as_str())
        .with_field("policy.rule", action.policy_rule.clone())
        .with_field("policy.trigger_rule", action.trigger_rule.as_str())
        .with_field(
            "policy.result",
            if error.is_some() { "failed" } else { "ok" },
        );
    if !action.params.is_empty() {
        let params: serde_json::Map<String, Value> = action
            .params
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        e = e.with_field("policy.params", Value::Object(params));
    }
    if let Some(err) = error {
        e = e.with_field("policy.error", err);
    }
    e.incident_id = action.incident_id;
    e
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: u64) -> Timestamp {
        Timestamp::from_unix_secs(s)
    }

    fn flood(vm: &str, t: u64) -> Event {
        Event::new(Rule::VmIoFlood, at(t), "flood").with_vm(vm)
    }

    fn policy(json: &str) -> PolicyEngine {
        PolicyEngine::new(serde_json::from_str(json).unwrap()).unwrap()
    }

    #[test]
    fn parses_the_documented_shape() {
        let p: Policy = serde_json::from_str(
            r#"{"rules":[
                {"name":"throttle floods","when":{"rule":"vm_io_flood","min_priority":"Warning"},
                 "action":"throttle","params":{"disk_ops_per_s":1000}},
                {"when":{"rule":"incident_dos_crash"},"action":"stop","cooldown_s":5}
            ]}"#,
        )
        .unwrap();
        assert_eq!(p.cooldown_s, 60);
        assert_eq!(p.rules[0].params["disk_ops_per_s"], 1000);
        assert_eq!(p.rules[1].when.min_priority, Priority::Warning);
        assert!(p.validate().is_ok());
        for bad in [
            r#"{"rules":[{"when":{"rule":"vm_io_flod"},"action":"stop"}]}"#,
            r#"{"rules":[{"when":{},"action":"reboot"}]}"#,
            r#"{"rules":[{"when":{},"action":"stop","extra":1}]}"#,
            r#"{"rulez":[]}"#,
        ] {
            assert!(serde_json::from_str::<Policy>(bad).is_err(), "{bad}");
        }
        let looped: Policy = serde_json::from_str(
            r#"{"rules":[{"when":{"rule":"policy_action"},"action":"stop"}]}"#,
        )
        .unwrap();
        assert_eq!(
            looped.validate(),
            Err(PolicyError::SelfTrigger { index: 0 })
        );
        let long: Policy =
            serde_json::from_str(r#"{"rules":[{"when":{},"action":"stop","cooldown_s":999999}]}"#)
                .unwrap();
        assert!(PolicyEngine::new(long).is_err());
    }

    #[test]
    fn acts_once_per_cooldown_and_emits_an_event() {
        let mut e = policy(
            r#"{"cooldown_s":60,"rules":[{"name":"t","when":{"rule":"vm_io_flood"},
                "action":"throttle","params":{"disk_ops_per_s":1000}}]}"#,
        );
        let mut done = Vec::new();
        let mut sink = |a: &Action| -> Result<(), std::convert::Infallible> {
            done.push((a.vm_id.clone(), a.kind, a.at));
            Ok(())
        };
        let mut events = Vec::new();
        for t in [0, 10, 59, 60, 61, 125] {
            events.extend(e.apply(&flood("a", t), &mut sink));
        }
        // Another VM has its own cooldown.
        events.extend(e.apply(&flood("b", 10), &mut sink));
        assert_eq!(
            done,
            [
                ("a".to_owned(), ActionKind::Throttle, at(0)),
                ("a".to_owned(), ActionKind::Throttle, at(60)),
                ("a".to_owned(), ActionKind::Throttle, at(125)),
                ("b".to_owned(), ActionKind::Throttle, at(10)),
            ]
        );
        assert_eq!(events.len(), 4);
        let ev = &events[0];
        assert_eq!(ev.rule, Rule::PolicyAction);
        assert_eq!(ev.source, Source::Policy);
        assert_eq!(ev.priority, Priority::Notice);
        assert_eq!(ev.vm_id.as_deref(), Some("a"));
        assert_eq!(ev.fields["policy.action"], "throttle");
        assert_eq!(ev.fields["policy.result"], "ok");
        assert_eq!(ev.fields["policy.rule"], "t");
        assert_eq!(ev.fields["policy.trigger_rule"], "vm_io_flood");
        assert_eq!(ev.fields["policy.params"]["disk_ops_per_s"], 1000);
        // A policy_action event never triggers a policy, even a catch-all one.
        let mut any = policy(r#"{"rules":[{"when":{"min_priority":"Debug"},"action":"stop"}]}"#);
        assert!(any.decide(ev).is_none());
    }

    #[test]
    fn failed_action_is_an_error_event_and_still_cools_down() {
        let mut e = policy(r#"{"rules":[{"when":{"rule":"vm_io_flood"},"action":"pause"}]}"#);
        let mut calls = 0;
        let mut sink = |_: &Action| -> Result<(), &str> {
            calls += 1;
            Err("vm not found")
        };
        let mut flooded = flood("a", 0);
        flooded.incident_id = Some(9);
        let ev = e.apply(&flooded, &mut sink).unwrap();
        assert!(e.apply(&flood("a", 1), &mut sink).is_none());
        assert_eq!(calls, 1);
        assert_eq!(ev.priority, Priority::Error);
        assert_eq!(ev.fields["policy.result"], "failed");
        assert_eq!(ev.fields["policy.error"], "vm not found");
        assert_eq!(ev.fields["policy.rule"], "#0");
        assert_eq!(ev.incident_id, Some(9));
        assert!(ev.message.contains("failed: vm not found"));
    }

    #[test]
    fn strongest_matching_action_wins() {
        let mut e = policy(
            r#"{"rules":[
                {"when":{"rule":"vm_io_flood"},"action":"throttle"},
                {"when":{"min_priority":"Critical"},"action":"stop"},
                {"when":{"source":"host","min_priority":"Warning"},"action":"pause"}
            ]}"#,
        );
        let a = e.decide(&flood("a", 0)).unwrap();
        assert_eq!((a.kind, a.policy_rule.as_str()), (ActionKind::Pause, "#2"));
        let crit = flood("b", 0).with_priority(Priority::Critical);
        assert_eq!(e.decide(&crit).unwrap().kind, ActionKind::Stop);
        // Pause cooling down on "a": nothing, not a weaker throttle.
        assert!(e.decide(&flood("a", 1)).is_none());
    }

    #[test]
    fn conditions_filter() {
        let mut e = policy(
            r#"{"rules":[{"when":{"rule":"vm_crashed","min_priority":"Critical"},"action":"stop"}]}"#,
        );
        let crash = Event::vm_crashed("a", at(0), "triple fault"); // Error
        assert!(e.decide(&crash).is_none());
        assert!(e
            .decide(&crash.clone().with_priority(Priority::Alert))
            .is_some());
        // A host event (no VM) is never acted on.
        let mut any = policy(r#"{"rules":[{"when":{"min_priority":"Debug"},"action":"stop"}]}"#);
        assert!(any
            .decide(&Event::new(Rule::HostMemoryPressure, at(0), "host"))
            .is_none());
        // An empty policy does nothing.
        let mut none = PolicyEngine::new(Policy::default()).unwrap();
        assert!(none.decide(&flood("a", 0)).is_none());
    }

    #[test]
    fn forget_resets_cooldown_and_clock_going_back_cools_down() {
        let mut e = policy(r#"{"rules":[{"when":{},"action":"throttle","cooldown_s":10}]}"#);
        assert!(e.decide(&flood("a", 100)).is_some());
        assert!(e.decide(&flood("a", 50)).is_none()); // earlier than the last action
        e.forget("a");
        assert!(e.decide(&flood("a", 101)).is_some());
        assert!(e.decide(&flood("a", 111)).is_some());
    }
}
