//! Vigil's security event stream.
//!
//! Typed [`Event`]s for everything security-relevant about a host and its VMs;
//! [`detect`]ors that turn periodic samples into events; a [`Correlator`] that
//! groups one VM's events into incidents and recognises sequences; a
//! [`PolicyEngine`] that decides what to do (throttle, pause, stop) and reports
//! each action as an event; and the [`output`] formats: Falco-like JSON lines,
//! server-sent events with a broadcast hub, syslog (RFC 5424) and CEF.
//!
//! A library: the daemon embeds it, feeds it samples and events, executes the
//! actions it decides, and serves its outputs. Nothing here spawns threads, does
//! network I/O or reads the clock except where asked to ([`Timestamp::now`],
//! [`HostSample::read_proc_pressure`], [`output::hostname`]).
//!
//! ```
//! use vigil_events::*;
//!
//! let mut vms = VmDetector::new(DetectorConfig::default()).unwrap();
//! let mut engine = Engine::new(
//!     Correlator::new(CorrelatorConfig::default()),
//!     PolicyEngine::new(Policy::default()).unwrap(),
//! );
//! let hub = EventHub::new(HubConfig::default());
//! let mut sink = |_: &Action| -> Result<(), std::convert::Infallible> { Ok(()) };
//!
//! let mut found = Vec::new();
//! for t in 0..40u64 {
//!     let sample = VmSample {
//!         vm_id: "vm1".into(),
//!         at: Timestamp::from_unix_secs(t),
//!         disk_ops_total: Some(t * 50_000), // 50 000 ops/s: a flood after 30 s
//!         ..VmSample::default()
//!     };
//!     vms.observe(&sample, &mut found);
//! }
//! for event in found.drain(..) {
//!     for e in engine.handle(event, &mut sink) {
//!         hub.publish(e);
//!     }
//! }
//! let mut sub = hub.subscribe(Resume::Backlog);
//! let first = sub.try_next().unwrap().unwrap();
//! assert_eq!(first.event.rule, Rule::VmIoFlood);
//! assert_eq!(first.event.incident_id, Some(1));
//! println!("{}", sse_frame(first.id, &first.event, "host-a"));
//! ```

pub mod correlate;
pub mod detect;
pub mod engine;
pub mod event;
pub mod output;
pub mod policy;
pub use vigil_model::time;

pub use correlate::{Correlator, CorrelatorConfig, Incident, IncidentEntry, Pattern};
pub use detect::{
    parse_psi_some_avg10, ConfigError, Detector, DetectorConfig, FloodThreshold, HostDetector,
    HostSample, PsiThreshold, RateLimitThreshold, VmDetector, VmSample,
};
pub use engine::{Engine, EventsConfig, EventsConfigError};
pub use event::{ApiTransport, Event, EventTimeError, Mitre, Priority, Rule, Source, UnknownName};
pub use output::{
    falco_json, falco_json_line, sse_frame, CefFormat, EventHub, HubConfig, JsonLinesWriter,
    Published, Resume, Subscription, SyslogFormat,
};
pub use policy::{
    action_event, Action, ActionKind, ActionSink, Condition, Policy, PolicyEngine, PolicyError,
    PolicyRule,
};
pub use time::Timestamp;
