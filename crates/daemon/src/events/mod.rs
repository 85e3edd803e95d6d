//! The daemon's security event stream: `vigil-events` embedded and fed.
//!
//! Sources: the sampler (every `--sample-interval`, each running VM's metrics
//! snapshot and the host's pressure readings, through the detectors; and each
//! VM's new introspection findings, one event each: [`crate::findings`]), the
//! supervisor (VM lifecycle events, `vm_crashed` when it reaps a crashed VM) and the
//! API (`api_malformed_request`, `api_unauthorized`, limited per peer). Every event
//! goes through one [`vigil_events::Engine`] (correlation into incidents, then the
//! policy, whose actions the daemon executes: [`DaemonActions`]), then to the
//! configured outputs (Falco-style JSON lines, syslog, CEF) and to the hub behind
//! `GET /events` (server-sent events, resumable with `Last-Event-ID`).
//!
//! The engine runs on its own thread, fed through a channel: sources never wait
//! for it, and a policy action (an HTTP request to a VM's API socket) can block
//! it without blocking the runtime.
//!
//! The parts: `sampler` (VM and host samples, introspection findings), `engine`
//! (the engine thread), `actions` (the policy's actions on VMs, their params),
//! `outputs` (`--events-output`), `stream` (`GET /events`) and `limiter` (API
//! misuse events per peer). This module holds the [`Events`] handle that
//! sources use and the settings.

use std::collections::HashMap;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
pub use vigil_events::{Event, Priority, Rule};
use vigil_events::{EventsConfig, HostSample, Timestamp};

use crate::supervisor::VmState;

mod actions;
mod engine;
mod limiter;
mod outputs;
mod sampler;
mod stream;

pub use actions::{
    validate_settings, ActionError, DaemonActions, SettingsError, ThrottleLimits,
    ThrottleParamError, THROTTLE_PARAMS,
};
pub use engine::{start_engine, EngineError, EngineHandle};
pub use limiter::Peer;
pub use outputs::{
    OutputFormat, OutputOpenError, OutputSpec, OutputSpecError, OutputSpecProblem, OutputTarget,
};
pub use sampler::{host_sample, sample, vm_sample};
pub use stream::{EventStream, BACKLOG};

use limiter::ApiLimiter;

/// What the daemon is told about security events.
#[derive(Debug, Clone)]
pub struct EventsSettings {
    /// Detector thresholds, correlation window, policy (`--events-config`).
    pub config: EventsConfig,
    /// Where events are written besides `GET /events`.
    pub outputs: Vec<OutputSpec>,
    /// How often running VMs and the host are sampled.
    pub sample_interval: Duration,
    /// API misuse events reported per peer and rule in each `api_window`; more are
    /// counted and reported as one summary.
    pub api_events_per_window: u32,
    pub api_window: Duration,
}

impl Default for EventsSettings {
    fn default() -> Self {
        EventsSettings {
            config: EventsConfig::default(),
            outputs: Vec::new(),
            sample_interval: Duration::from_secs(1),
            api_events_per_window: 10,
            api_window: Duration::from_secs(60),
        }
    }
}

/// What the engine thread is fed.
enum Input {
    Event(Event),
    Tick {
        host: HostSample,
        vms: Vec<vigil_events::VmSample>,
    },
    /// A VM ended: its detector state goes (a new VM of that id starts afresh).
    Ended(String),
    /// A VM was destroyed: its incident and policy cooldowns go too.
    Destroyed(String),
    /// Finish what is queued, then end.
    Stop,
}

/// The handle sources use: cheap to clone, never blocks.
#[derive(Clone)]
pub struct Events {
    tx: mpsc::Sender<Input>,
    stream: Arc<EventStream>,
    limiter: Arc<Mutex<ApiLimiter>>,
}

impl Events {
    /// The handle and the engine's input, to be given to [`start_engine`].
    pub fn new(settings: &EventsSettings) -> (Events, EngineInput) {
        let (tx, rx) = mpsc::channel();
        // Ids keep growing across restarts (microseconds since the epoch at
        // start), so a client's Last-Event-ID from before one is never mistaken.
        let first_id = (Timestamp::now().unix_ns() / 1000).max(1);
        let events = Events {
            tx,
            stream: Arc::new(EventStream::new(first_id, vigil_events::output::hostname())),
            limiter: Arc::new(Mutex::new(ApiLimiter {
                per_window: settings.api_events_per_window,
                window: settings.api_window,
                peers: HashMap::new(),
            })),
        };
        (events, EngineInput(rx))
    }

    pub fn stream(&self) -> &Arc<EventStream> {
        &self.stream
    }

    /// Sends one event through the engine to every output.
    pub fn emit(&self, event: Event) {
        // The engine is gone only at shutdown; the event then has nowhere to go.
        let _ = self.tx.send(Input::Event(event));
    }

    /// A VM lifecycle event (`vm_lifecycle`): `what` happened ("created", "paused",
    /// ...), the VM is now in `state`; `fields` are added.
    pub fn lifecycle(
        &self,
        id: &str,
        what: &str,
        state: VmState,
        priority: Priority,
        fields: Value,
    ) {
        let state = state.as_str();
        let detail = fields
            .get("reason")
            .and_then(Value::as_str)
            .map(|r| format!(": {r}"))
            .unwrap_or_default();
        let mut event = Event::new(
            Rule::VmLifecycle,
            Timestamp::now(),
            format!("vm {id} {what}{detail}"),
        )
        .with_vm(id)
        .with_priority(priority)
        .with_field("vm.lifecycle", what)
        .with_field("vm.state", state);
        if let Value::Object(fields) = fields {
            for (k, v) in fields {
                if !v.is_null() {
                    event = event.with_field(k, v);
                }
            }
        }
        self.emit(event);
    }

    /// The API refused a request (`api_malformed_request` or `api_unauthorized`):
    /// reported unless this peer already had its share of such events in the
    /// current window.
    pub fn api_rejected(&self, rule: Rule, peer: &Peer, detail: &str) {
        let (admit, summary) = self
            .limiter
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .admit(&peer.key, rule, peer.transport, Instant::now());
        if let Some(summary) = summary {
            self.emit(summary);
        }
        if admit {
            self.emit(Event::api_rejected(
                rule,
                Timestamp::now(),
                None,
                peer.transport,
                &peer.name,
                detail,
            ));
        }
    }

    /// Reports the API misuse summaries of windows that ended.
    fn flush_api_summaries(&self) {
        let summaries = self
            .limiter
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .expire(Instant::now(), None);
        for s in summaries {
            self.emit(s);
        }
    }

    /// A VM's process ended.
    pub fn vm_ended(&self, id: &str) {
        let _ = self.tx.send(Input::Ended(id.to_owned()));
    }

    /// A VM was destroyed.
    pub fn vm_destroyed(&self, id: &str) {
        let _ = self.tx.send(Input::Destroyed(id.to_owned()));
    }
}

/// The engine's end of the channel.
pub struct EngineInput(mpsc::Receiver<Input>);
