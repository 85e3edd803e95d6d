//! Correlation: events about one VM grouped into incidents.
//!
//! An incident opens at the first event for a VM at or above
//! [`CorrelatorConfig::open_at`] (Warning by default) and absorbs every later event
//! for that VM, whatever its priority, until the VM has been quiet for
//! [`CorrelatorConfig::window_s`] (5 minutes by default). Its severity is the
//! highest priority it has seen; its summary is the chain of what happened
//! ("io flood → rate limit saturated → crashed"). Known sequences raise it and
//! produce an event of their own: a flood or a saturated rate limiter followed by a
//! crash is a Critical `incident_dos_crash`.
//!
//! Host-wide events (no VM id) are not filed under an incident.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::event::{Event, Priority, Rule, Source};
use crate::time::Timestamp;

/// How incidents are grouped and bounded.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CorrelatorConfig {
    /// An incident closes after this long without an event for its VM (300).
    pub window_s: u64,
    /// The least priority that opens an incident (Warning).
    pub open_at: Priority,
    /// Events kept per incident; later ones are counted, not kept (256).
    pub max_events_per_incident: usize,
    /// Steps kept in a summary (32).
    pub max_summary_steps: usize,
    /// Closed incidents waiting for [`Correlator::take_closed`]; the oldest go
    /// first when more pile up (1024).
    pub max_closed_backlog: usize,
}

impl Default for CorrelatorConfig {
    fn default() -> Self {
        CorrelatorConfig {
            window_s: 300,
            open_at: Priority::Warning,
            max_events_per_incident: 256,
            max_summary_steps: 32,
            max_closed_backlog: 1024,
        }
    }
}

/// A sequence of events the correlator recognises.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Pattern {
    /// A flood or saturated rate limiter, then a crash, of one VM.
    DosLeadingToCrash,
}

impl Pattern {
    pub const fn description(self) -> &'static str {
        match self {
            Pattern::DosLeadingToCrash => "possible denial of service leading to crash",
        }
    }
}

/// One event as an incident keeps it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IncidentEntry {
    pub time: Timestamp,
    pub rule: Rule,
    pub priority: Priority,
    pub message: String,
}

/// Events about one VM that belong together.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Incident {
    pub id: u64,
    pub vm_id: String,
    pub opened: Timestamp,
    /// The time of its latest event.
    pub last: Timestamp,
    /// The highest priority among its events and recognised patterns.
    pub severity: Priority,
    /// All events filed under it, kept or not.
    pub event_count: u64,
    /// The first `max_events_per_incident` events.
    pub events: Vec<IncidentEntry>,
    /// What happened, in order, consecutive repeats merged: Warning-or-worse
    /// events and policy actions.
    pub steps: Vec<String>,
    pub patterns: Vec<Pattern>,
    pub closed: bool,
}

impl Incident {
    /// "io flood → rate limit saturated → crashed", with the recognised patterns
    /// first: "possible denial of service leading to crash: io flood → crashed".
    pub fn summary(&self) -> String {
        let chain = self.steps.join(" → ");
        if self.patterns.is_empty() {
            chain
        } else {
            let names: Vec<&str> = self.patterns.iter().map(|p| p.description()).collect();
            format!("{}: {chain}", names.join("; "))
        }
    }
}

/// What an incident's summary calls an event.
fn step_label(e: &Event) -> String {
    if e.rule == Rule::PolicyAction {
        let action = e
            .fields
            .get("policy.action")
            .and_then(|v| v.as_str())
            .unwrap_or("action");
        let done = match action {
            "throttle" => "throttled",
            "pause" => "paused",
            "stop" => "stopped",
            _ => "policy action",
        };
        let failed = e.fields.get("policy.result").and_then(|v| v.as_str()) == Some("failed");
        if failed {
            format!("{done} (failed)")
        } else {
            done.to_owned()
        }
    } else {
        e.rule.label().to_owned()
    }
}

#[derive(Debug)]
struct Open {
    incident: Incident,
    /// The first exhaustion signal seen, for the flood-then-crash sequence.
    exhaustion: Option<Rule>,
}

/// Groups events into incidents. Feed it every event, in time order, with
/// [`Correlator::observe`]; call [`Correlator::expire`] now and then (each sample
/// tick) to close quiet incidents.
#[derive(Debug)]
pub struct Correlator {
    config: CorrelatorConfig,
    next_id: u64,
    open: HashMap<String, Open>,
    closed: VecDeque<Incident>,
}

impl Correlator {
    /// Incident ids count from 1; see [`Correlator::with_next_id`].
    pub fn new(config: CorrelatorConfig) -> Self {
        Correlator {
            config,
            next_id: 1,
            open: HashMap::new(),
            closed: VecDeque::new(),
        }
    }

    /// Start incident ids at `id` (at least 1), so that ids stay unique across
    /// restarts of the daemon (seed it from the clock or from stored state).
    pub fn with_next_id(mut self, id: u64) -> Self {
        self.next_id = id.max(1);
        self
    }

    pub fn config(&self) -> &CorrelatorConfig {
        &self.config
    }

    fn window(&self) -> Duration {
        Duration::from_secs(self.config.window_s)
    }

    /// Files `event` under its VM's incident (setting `event.incident_id`), opening
    /// one if the event is severe enough. Returns the events the incident gives
    /// rise to (a recognised sequence), already filed under it; feed them on to the
    /// outputs and the policy like any other.
    pub fn observe(&mut self, event: &mut Event) -> Vec<Event> {
        let Some(vm_id) = event.vm_id.clone() else {
            return Vec::new();
        };
        let window = self.window();
        // A stale incident closes first; the event may then open a new one.
        let stale = self.open.get(&vm_id).is_some_and(|o| {
            event
                .time
                .since(o.incident.last)
                .is_some_and(|quiet| quiet > window)
        });
        if stale {
            if let Some(o) = self.open.remove(&vm_id) {
                self.close(o.incident);
            }
        }
        if !self.open.contains_key(&vm_id) {
            if event.priority < self.config.open_at || event.source == Source::Correlation {
                return Vec::new();
            }
            let id = self.next_id;
            self.next_id = self.next_id.saturating_add(1);
            self.open.insert(
                vm_id.clone(),
                Open {
                    incident: Incident {
                        id,
                        vm_id: vm_id.clone(),
                        opened: event.time,
                        last: event.time,
                        severity: event.priority,
                        event_count: 0,
                        events: Vec::new(),
                        steps: Vec::new(),
                        patterns: Vec::new(),
                        closed: false,
                    },
                    exhaustion: None,
                },
            );
        }
        let cfg = &self.config;
        let Some(open) = self.open.get_mut(&vm_id) else {
            return Vec::new();
        };
        let inc = &mut open.incident;
        event.incident_id = Some(inc.id);
        inc.last = inc.last.max(event.time);
        inc.severity = inc.severity.max(event.priority);
        inc.event_count = inc.event_count.saturating_add(1);
        if inc.events.len() < cfg.max_events_per_incident {
            inc.events.push(IncidentEntry {
                time: event.time,
                rule: event.rule,
                priority: event.priority,
                message: event.message.clone(),
            });
        }
        let is_step = event.source != Source::Correlation
            && (event.priority >= cfg.open_at || event.rule == Rule::PolicyAction);
        if is_step {
            let label = step_label(event);
            if inc.steps.last() != Some(&label) && inc.steps.len() < cfg.max_summary_steps {
                inc.steps.push(label);
            }
        }
        if event.rule.is_vm_exhaustion() && event.priority >= cfg.open_at {
            open.exhaustion.get_or_insert(event.rule);
        }
        let mut derived = Vec::new();
        if event.rule == Rule::VmCrashed && !inc.patterns.contains(&Pattern::DosLeadingToCrash) {
            if let Some(cause) = open.exhaustion {
                inc.patterns.push(Pattern::DosLeadingToCrash);
                inc.severity = inc.severity.max(Priority::Critical);
                let mut e = Event::new(
                    Rule::IncidentDosCrash,
                    event.time,
                    format!(
                        "vm {vm_id}: {} (incident {}: {})",
                        Pattern::DosLeadingToCrash.description(),
                        inc.id,
                        inc.steps.join(" → ")
                    ),
                )
                .with_vm(vm_id.clone())
                .with_field("incident.id", inc.id)
                .with_field("incident.summary", inc.summary())
                .with_field("incident.cause_rule", cause.as_str());
                e.incident_id = Some(inc.id);
                derived.push(e);
            }
        }
        derived
    }

    /// Closes the incidents quiet for longer than the window at `now`, and returns
    /// them with any closed since the last call (by [`Correlator::observe`] or
    /// [`Correlator::close_vm`]), oldest first.
    pub fn expire(&mut self, now: Timestamp) -> Vec<Incident> {
        let window = self.window();
        let stale: Vec<String> = self
            .open
            .iter()
            .filter(|(_, o)| now.since(o.incident.last).is_some_and(|q| q > window))
            .map(|(vm, _)| vm.clone())
            .collect();
        let mut stale_incidents: Vec<Incident> = stale
            .iter()
            .filter_map(|vm| self.open.remove(vm))
            .map(|o| o.incident)
            .collect();
        stale_incidents.sort_by_key(|i| i.id);
        for i in stale_incidents {
            self.close(i);
        }
        self.take_closed()
    }

    /// Closes the VM's incident now (the VM is gone).
    pub fn close_vm(&mut self, vm_id: &str) {
        if let Some(o) = self.open.remove(vm_id) {
            self.close(o.incident);
        }
    }

    /// The incidents closed and not yet taken, oldest first.
    pub fn take_closed(&mut self) -> Vec<Incident> {
        self.closed.drain(..).collect()
    }

    /// The VM's open incident.
    pub fn open_incident(&self, vm_id: &str) -> Option<&Incident> {
        self.open.get(vm_id).map(|o| &o.incident)
    }

    /// Every open incident, in no particular order.
    pub fn open_incidents(&self) -> impl Iterator<Item = &Incident> {
        self.open.values().map(|o| &o.incident)
    }

    fn close(&mut self, mut incident: Incident) {
        incident.closed = true;
        if self.config.max_closed_backlog == 0 {
            return;
        }
        while self.closed.len() >= self.config.max_closed_backlog {
            self.closed.pop_front();
        }
        self.closed.push_back(incident);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: u64) -> Timestamp {
        Timestamp::from_unix_secs(s)
    }

    fn ev(rule: Rule, vm: &str, t: u64) -> Event {
        Event::new(rule, at(t), format!("{rule} on {vm}")).with_vm(vm)
    }

    fn feed(c: &mut Correlator, events: Vec<Event>) -> (Vec<Event>, Vec<Event>) {
        let mut filed = Vec::new();
        let mut derived = Vec::new();
        for mut e in events {
            let d = c.observe(&mut e);
            filed.push(e);
            for mut x in d {
                derived.extend(c.observe(&mut x));
                derived.push(x);
            }
        }
        (filed, derived)
    }

    #[test]
    fn groups_one_vms_events_and_keeps_vms_apart() {
        let mut c = Correlator::new(CorrelatorConfig::default());
        let (filed, derived) = feed(
            &mut c,
            vec![
                ev(Rule::ApiMalformedRequest, "a", 0), // Notice: opens nothing
                ev(Rule::VmIoFlood, "a", 10),          // opens incident 1
                ev(Rule::VmIoFlood, "b", 11),          // opens incident 2
                ev(Rule::VmIoFlood, "a", 12).with_priority(Priority::Informational), // joins 1
                ev(Rule::VmRateLimitSaturated, "a", 20),
                ev(Rule::HostMemoryPressure, "x", 21).with_priority(Priority::Error),
                Event::new(Rule::HostCpuPressure, at(22), "host"),
            ],
        );
        assert!(derived.is_empty());
        let ids: Vec<_> = filed.iter().map(|e| e.incident_id).collect();
        assert_eq!(
            ids,
            [None, Some(1), Some(2), Some(1), Some(1), Some(3), None]
        );
        let a = c.open_incident("a").unwrap();
        assert_eq!(a.event_count, 3);
        assert_eq!(a.severity, Priority::Warning);
        assert_eq!(a.summary(), "io flood → rate limit saturated");
        assert_eq!(a.opened, at(10));
        assert_eq!(a.last, at(20));
        assert_eq!(c.open_incidents().count(), 3);
    }

    #[test]
    fn window_expiry_closes_and_a_later_event_opens_a_new_incident() {
        let mut c = Correlator::new(CorrelatorConfig {
            window_s: 60,
            ..CorrelatorConfig::default()
        });
        let (filed, _) = feed(
            &mut c,
            vec![
                ev(Rule::VmIoFlood, "a", 0),
                ev(Rule::VmIoFlood, "a", 60), // exactly the window: still in
                ev(Rule::VmIoFlood, "a", 121), // 61 s quiet: a new incident
            ],
        );
        let ids: Vec<_> = filed.iter().map(|e| e.incident_id).collect();
        assert_eq!(ids, [Some(1), Some(1), Some(2)]);
        // The first closed on arrival of the third event; expire hands it over.
        assert!(c.expire(at(150)).iter().map(|i| i.id).eq([1]));
        assert!(c.expire(at(181)).is_empty()); // 60 s quiet: not yet
        let closed = c.expire(at(182));
        assert_eq!(closed.len(), 1);
        assert_eq!(closed[0].id, 2);
        assert!(closed[0].closed);
        assert!(c.open_incident("a").is_none());
        // A quiet low-priority event after expiry opens nothing.
        let (filed, _) = feed(
            &mut c,
            vec![ev(Rule::VmIoFlood, "a", 500).with_priority(Priority::Informational)],
        );
        assert_eq!(filed[0].incident_id, None);
    }

    #[test]
    fn flood_then_crash_is_a_critical_incident_once() {
        let mut c = Correlator::new(CorrelatorConfig::default()).with_next_id(41);
        let (filed, derived) = feed(
            &mut c,
            vec![
                ev(Rule::VmIoFlood, "a", 0),
                ev(Rule::VmRateLimitSaturated, "a", 5),
                ev(Rule::VmRateLimitSaturated, "a", 6),
                Event::vm_crashed("a", at(30), "triple fault"),
                Event::vm_crashed("a", at(31), "triple fault"),
            ],
        );
        assert!(filed.iter().all(|e| e.incident_id == Some(41)));
        assert_eq!(derived.len(), 1);
        let d = &derived[0];
        assert_eq!(d.rule, Rule::IncidentDosCrash);
        assert_eq!(d.priority, Priority::Critical);
        assert_eq!(d.source, Source::Correlation);
        assert_eq!(d.incident_id, Some(41));
        assert_eq!(d.vm_id.as_deref(), Some("a"));
        assert_eq!(d.fields["incident.cause_rule"], "vm_io_flood");
        assert!(d.tags.contains(&"T1499".to_owned()));
        let inc = c.open_incident("a").unwrap();
        assert_eq!(inc.severity, Priority::Critical);
        assert_eq!(inc.patterns, [Pattern::DosLeadingToCrash]);
        assert_eq!(
            inc.summary(),
            "possible denial of service leading to crash: io flood → rate limit saturated → crashed"
        );
        // The derived event is kept but is no step of the chain.
        assert_eq!(inc.event_count, 6);
    }

    #[test]
    fn crash_without_flood_or_after_expiry_is_no_dos() {
        let mut c = Correlator::new(CorrelatorConfig {
            window_s: 60,
            ..CorrelatorConfig::default()
        });
        let (_, derived) = feed(
            &mut c,
            vec![
                Event::vm_crashed("a", at(0), "triple fault"),
                ev(Rule::VmPacketFlood, "b", 0),
                Event::vm_crashed("b", at(100), "triple fault"), // flood's incident expired
                // An ended flood (Informational) is not an exhaustion signal.
                ev(Rule::VmIoFlood, "c", 0).with_priority(Priority::Informational),
                ev(Rule::ApiUnauthorized, "c", 1),
                Event::vm_crashed("c", at(2), "triple fault"),
            ],
        );
        assert!(derived.is_empty(), "{derived:#?}");
        assert_eq!(c.open_incident("a").unwrap().severity, Priority::Error);
        assert_eq!(
            c.open_incident("c").unwrap().summary(),
            "unauthorized api request → crashed"
        );
    }

    #[test]
    fn bounded_memory() {
        let mut c = Correlator::new(CorrelatorConfig {
            max_events_per_incident: 3,
            max_summary_steps: 2,
            max_closed_backlog: 2,
            window_s: 1,
            ..CorrelatorConfig::default()
        });
        let rules = [
            Rule::VmIoFlood,
            Rule::VmPacketFlood,
            Rule::VmRateLimitSaturated,
        ];
        let events: Vec<_> = (0..10).map(|i| ev(rules[i % 3], "a", 0)).collect();
        feed(&mut c, events);
        let inc = c.open_incident("a").unwrap();
        assert_eq!(inc.event_count, 10);
        assert_eq!(inc.events.len(), 3);
        assert_eq!(inc.steps.len(), 2);
        // Six incidents closed, two kept: the newest.
        let events: Vec<_> = (0..5)
            .map(|i| ev(Rule::VmIoFlood, "a", 10 * (i + 1)))
            .collect();
        feed(&mut c, events);
        let closed = c.expire(at(1000));
        assert!(closed.iter().map(|i| i.id).eq([5, 6]));
    }

    #[test]
    fn out_of_order_and_closed_vm() {
        let mut c = Correlator::new(CorrelatorConfig::default());
        let (filed, _) = feed(
            &mut c,
            vec![ev(Rule::VmIoFlood, "a", 100), ev(Rule::VmIoFlood, "a", 50)],
        );
        assert_eq!(filed[1].incident_id, Some(1));
        assert_eq!(c.open_incident("a").unwrap().last, at(100));
        c.close_vm("a");
        c.close_vm("a");
        assert_eq!(c.take_closed().len(), 1);
        assert!(c.take_closed().is_empty());
    }

    #[test]
    fn policy_actions_are_steps() {
        let mut c = Correlator::new(CorrelatorConfig::default());
        let (filed, _) = feed(
            &mut c,
            vec![
                ev(Rule::VmPacketFlood, "a", 0),
                ev(Rule::PolicyAction, "a", 0)
                    .with_field("policy.action", "throttle")
                    .with_field("policy.result", "ok"),
                ev(Rule::PolicyAction, "a", 1)
                    .with_field("policy.action", "stop")
                    .with_field("policy.result", "failed")
                    .with_priority(Priority::Error),
            ],
        );
        assert!(filed.iter().all(|e| e.incident_id == Some(1)));
        assert_eq!(
            c.open_incident("a").unwrap().summary(),
            "packet flood → throttled → stopped (failed)"
        );
    }
}
