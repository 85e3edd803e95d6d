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

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use serde_json::Value;
use tokio::sync::watch;
use vigil_events::output::{SSE_CONTENT_TYPE, SSE_KEEPALIVE};
use vigil_events::{
    sse_frame, Action, ActionKind, ActionSink, ApiTransport, CefFormat, Correlator, Engine,
    EventHub, EventsConfig, HostDetector, HostSample, HubConfig, JsonLinesWriter, PolicyEngine,
    Resume, SyslogFormat, Timestamp, VmDetector,
};
pub use vigil_events::{Event, Priority, Rule};

use crate::findings::{
    finding_event, parse_findings_file, FindingCursors, FindingRecord, FINDINGS_FILE,
    VM_FINDINGS_PATH,
};
use crate::supervisor::{StopMethod, Supervisor, VmState};

/// How long an SSE stream stays silent before a keep-alive comment.
const KEEPALIVE: Duration = Duration::from_secs(15);
/// How many past events a new `GET /events` stream (without `Last-Event-ID`) gets.
pub const BACKLOG: usize = 1024;

/// The format of one `--events-output`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    /// Falco-style JSON, one object per line.
    Json,
    /// RFC 5424 syslog lines.
    Syslog,
    /// ArcSight CEF lines.
    Cef,
}

/// Where one `--events-output` writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputTarget {
    Stderr,
    /// Appended to (created with mode 0600).
    File(PathBuf),
}

/// One `--events-output FORMAT:PATH`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputSpec {
    pub format: OutputFormat,
    pub target: OutputTarget,
}

impl FromStr for OutputSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = |why: &str| {
            format!("--events-output {s:?}: {why} (expected FORMAT:PATH, FORMAT one of json, syslog, cef; PATH `-` for stderr)")
        };
        let (format, path) = s.split_once(':').ok_or_else(|| bad("no `:`"))?;
        let format = match format {
            "json" => OutputFormat::Json,
            "syslog" => OutputFormat::Syslog,
            "cef" => OutputFormat::Cef,
            other => return Err(bad(&format!("unknown format {other:?}"))),
        };
        let target = match path {
            "" => return Err(bad("empty PATH")),
            "-" => OutputTarget::Stderr,
            p => OutputTarget::File(p.into()),
        };
        Ok(OutputSpec { format, target })
    }
}

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

/// Throttle parameters a policy rule may give (all per second, all optional, at
/// least one): `ops_per_s` and `bytes_per_s` apply to drives and interfaces,
/// the `disk_`/`net_` ones to one kind only (and win over the general ones).
pub const THROTTLE_PARAMS: [&str; 6] = [
    "ops_per_s",
    "bytes_per_s",
    "disk_ops_per_s",
    "disk_bytes_per_s",
    "net_packets_per_s",
    "net_bytes_per_s",
];

/// The rate limits a throttle action sets, from its parameters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ThrottleLimits {
    pub disk_ops: Option<u64>,
    pub disk_bytes: Option<u64>,
    pub net_packets: Option<u64>,
    pub net_bytes: Option<u64>,
}

impl ThrottleLimits {
    /// Reads a throttle action's parameters; `rule` names the policy rule in errors.
    pub fn from_params(rule: &str, params: &BTreeMap<String, Value>) -> Result<Self, String> {
        let get = |key: &str| -> Result<Option<u64>, String> {
            match params.get(key) {
                None => Ok(None),
                Some(v) => match v.as_u64() {
                    Some(n) if n > 0 => Ok(Some(n)),
                    _ => Err(format!(
                        "policy rule {rule:?}: params.{key} {v}: give a whole number above 0"
                    )),
                },
            }
        };
        let ops = get("ops_per_s")?;
        let bytes = get("bytes_per_s")?;
        let limits = ThrottleLimits {
            disk_ops: get("disk_ops_per_s")?.or(ops),
            disk_bytes: get("disk_bytes_per_s")?.or(bytes),
            net_packets: get("net_packets_per_s")?.or(ops),
            net_bytes: get("net_bytes_per_s")?.or(bytes),
        };
        if let Some(unknown) = params
            .keys()
            .find(|k| !THROTTLE_PARAMS.contains(&k.as_str()))
        {
            return Err(format!(
                "policy rule {rule:?}: unknown throttle parameter {unknown:?} (expected {})",
                THROTTLE_PARAMS.join(", ")
            ));
        }
        if limits == ThrottleLimits::default() {
            return Err(format!(
                "policy rule {rule:?}: a throttle needs params, e.g. {{\"ops_per_s\": 100}} (any of {})",
                THROTTLE_PARAMS.join(", ")
            ));
        }
        Ok(limits)
    }

    /// A Firecracker `rate_limiter` body: a token bucket per limit, refilled each
    /// second; `None` when neither limit is set.
    pub fn rate_limiter(ops: Option<u64>, bytes: Option<u64>) -> Option<Value> {
        let bucket = |size: u64| serde_json::json!({"size": size, "refill_time": 1000});
        let mut body = serde_json::Map::new();
        if let Some(n) = ops {
            body.insert("ops".into(), bucket(n));
        }
        if let Some(n) = bytes {
            body.insert("bandwidth".into(), bucket(n));
        }
        (!body.is_empty()).then_some(Value::Object(body))
    }
}

/// Checks what `vigil-events` cannot: the parameters of each policy action.
pub fn validate_settings(settings: &EventsSettings) -> Result<(), String> {
    settings
        .config
        .validate()
        .map_err(|e| format!("--events-config: {e}"))?;
    for (i, rule) in settings.config.policy.rules.iter().enumerate() {
        let name = if rule.name.is_empty() {
            format!("#{i}")
        } else {
            rule.name.clone()
        };
        match rule.action {
            ActionKind::Throttle => {
                ThrottleLimits::from_params(&name, &rule.params)
                    .map_err(|e| format!("--events-config: {e}"))?;
            }
            ActionKind::Pause | ActionKind::Stop => {
                if let Some(key) = rule.params.keys().next() {
                    return Err(format!(
                        "--events-config: policy rule {name:?}: {} takes no params, got {key:?}",
                        rule.action
                    ));
                }
            }
        }
    }
    Ok(())
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

/// `GET /events`: the hub (ids, backlog, resume) and what wakes async streams.
pub struct EventStream {
    hub: EventHub,
    published: watch::Sender<u64>,
    closed: watch::Sender<bool>,
    hostname: String,
}

impl EventStream {
    fn new(first_id: u64, hostname: String) -> Self {
        EventStream {
            hub: EventHub::new(HubConfig {
                backlog: BACKLOG,
                subscriber_queue: 256,
                first_id,
            }),
            published: watch::channel(0).0,
            closed: watch::channel(false).0,
            hostname,
        }
    }

    fn publish(&self, event: Event) {
        let id = self.hub.publish(event);
        self.published.send_replace(id);
    }

    /// Ends every stream (the daemon is shutting down).
    pub fn close(&self) {
        self.closed.send_replace(true);
    }

    /// The id of the last event published, if any.
    pub fn last_id(&self) -> Option<u64> {
        self.hub.last_id()
    }

    /// The `GET /events` response: `text/event-stream`, one frame per event
    /// (`id:`, `event: vigil`, `data:` Falco-style JSON), a keep-alive comment
    /// after 15 s of silence. Without `last_event_id`, the backlog first; with it,
    /// the events after it (a comment says when some were lost in between). With
    /// `follow` false the stream ends after what is there now.
    pub fn sse(&self, last_event_id: Option<u64>, follow: bool) -> Response {
        let mut published = self.published.subscribe();
        published.borrow_and_update();
        let resume = last_event_id.map_or(Resume::Backlog, Resume::After);
        let subscription = self.hub.subscribe(resume);
        let gap = subscription.gap().then(|| {
            ": some events were lost before these (they left the backlog, or the daemon restarted)\n\n".to_owned()
        });
        let hostname = self.hostname.clone();
        let closed = self.closed.subscribe();
        let state = (subscription, published, closed, gap);
        let stream = futures_util::stream::unfold(
            state,
            move |(mut sub, mut published, mut closed, gap)| {
                let hostname = hostname.clone();
                async move {
                    if let Some(text) = gap {
                        return Some((Ok::<_, Infallible>(text), (sub, published, closed, None)));
                    }
                    loop {
                        if *closed.borrow() {
                            return None;
                        }
                        match sub.try_next() {
                            Ok(Some(p)) => {
                                let frame = sse_frame(p.id, &p.event, &hostname);
                                return Some((Ok(frame), (sub, published, closed, None)));
                            }
                            Ok(None) if !follow => return None,
                            Ok(None) => {}
                            // Dropped for being too slow: the client resumes with
                            // Last-Event-ID.
                            Err(_) => return None,
                        }
                        tokio::select! {
                            changed = published.changed() => if changed.is_err() { return None },
                            _ = closed.changed() => {}
                            _ = tokio::time::sleep(KEEPALIVE) => {
                                return Some((Ok(SSE_KEEPALIVE.to_owned()), (sub, published, closed, None)));
                            }
                        }
                    }
                }
            },
        );
        (
            [
                (
                    header::CONTENT_TYPE,
                    HeaderValue::from_static(SSE_CONTENT_TYPE),
                ),
                (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            ],
            Body::from_stream(stream),
        )
            .into_response()
    }
}

/// Per-peer limits on API misuse events, so a scanner cannot flood the log.
struct ApiLimiter {
    per_window: u32,
    window: Duration,
    /// (peer, rule) -> (window start, reported, suppressed, last transport, last detail)
    peers: HashMap<(String, Rule), ApiWindow>,
}

struct ApiWindow {
    start: Instant,
    reported: u32,
    suppressed: u64,
    transport: ApiTransport,
}

/// The most peers the limiter tracks; beyond that, new peers share one entry.
const MAX_PEERS: usize = 4096;

impl ApiLimiter {
    /// Whether this event may be reported now; also returns the summary of the
    /// peer's previous window when one ended with events suppressed.
    fn admit(
        &mut self,
        peer: &str,
        rule: Rule,
        transport: ApiTransport,
        now: Instant,
    ) -> (bool, Option<Event>) {
        let mut summaries = self.expire(now, Some((peer, rule)));
        let mut key = (peer.to_owned(), rule);
        if !self.peers.contains_key(&key) && self.peers.len() >= MAX_PEERS {
            key = ("(other peers)".to_owned(), rule);
        }
        let w = self.peers.entry(key).or_insert(ApiWindow {
            start: now,
            reported: 0,
            suppressed: 0,
            transport,
        });
        w.transport = transport;
        let admit = if w.reported < self.per_window {
            w.reported += 1;
            true
        } else {
            w.suppressed += 1;
            false
        };
        (admit, summaries.pop())
    }

    /// Ends the windows older than the window length (`only`: just that one),
    /// returning a summary event for each that suppressed events.
    fn expire(&mut self, now: Instant, only: Option<(&str, Rule)>) -> Vec<Event> {
        let window = self.window;
        let mut out = Vec::new();
        self.peers.retain(|(peer, rule), w| {
            if only.is_some_and(|(p, r)| p != peer || r != *rule)
                || now.saturating_duration_since(w.start) < window
            {
                return true;
            }
            if w.suppressed > 0 {
                let detail = format!(
                    "{} more such requests in {} s were not reported one by one",
                    w.suppressed,
                    window.as_secs()
                );
                out.push(
                    Event::api_rejected(*rule, Timestamp::now(), None, w.transport, peer, &detail)
                        .with_field("api.suppressed", w.suppressed),
                );
            }
            false
        });
        out
    }
}

/// Where an API request came from, as the API's middleware knows it.
#[derive(Debug, Clone)]
pub struct Peer {
    pub transport: ApiTransport,
    /// `uid=1000 pid=42` on the Unix socket, `192.0.2.1:5555` on TCP.
    pub name: String,
    /// What the limiter counts by: the uid, or the IP address (not the port).
    pub key: String,
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

/// The outputs the engine writes each event to.
struct Outputs {
    writers: Vec<(OutputSpec, Box<dyn Write + Send>)>,
    hostname: String,
    syslog: SyslogFormat,
    cef: CefFormat,
    failures: u64,
}

impl Outputs {
    fn open(specs: &[OutputSpec]) -> anyhow::Result<Outputs> {
        let hostname = vigil_events::output::hostname();
        let mut writers: Vec<(OutputSpec, Box<dyn Write + Send>)> = Vec::new();
        for spec in specs {
            let out: Box<dyn Write + Send> = match &spec.target {
                OutputTarget::Stderr => Box::new(std::io::stderr()),
                OutputTarget::File(path) => Box::new(
                    std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .mode(0o600)
                        .open(path)
                        .map_err(|e| {
                            anyhow::anyhow!(
                                "--events-output {}: cannot open it: {e}",
                                path.display()
                            )
                        })?,
                ),
            };
            writers.push((spec.clone(), out));
        }
        let mut syslog = SyslogFormat::new(hostname.clone());
        syslog.procid = Some(std::process::id());
        Ok(Outputs {
            writers,
            cef: CefFormat::new(hostname.clone()),
            syslog,
            hostname,
            failures: 0,
        })
    }

    fn write(&mut self, event: &Event) {
        for (spec, out) in &mut self.writers {
            let line = match spec.format {
                OutputFormat::Json => {
                    // One write_all per line, as JsonLinesWriter does.
                    let mut w = JsonLinesWriter::new(&mut *out, self.hostname.as_str());
                    w.write_event(event).err()
                }
                OutputFormat::Syslog => write_line(out, &self.syslog.format(event)).err(),
                OutputFormat::Cef => write_line(out, &self.cef.format(event)).err(),
            };
            if let Some(e) = line {
                self.failures += 1;
                // Say so, but not for every event of a full disk.
                if self.failures.is_power_of_two() {
                    tracing::warn!(
                        "--events-output {:?}: cannot write an event ({} failures so far): {e}",
                        spec.target,
                        self.failures
                    );
                }
            }
        }
    }
}

fn write_line(out: &mut Box<dyn Write + Send>, line: &str) -> std::io::Result<()> {
    let mut text = String::with_capacity(line.len() + 1);
    text.push_str(line);
    text.push('\n');
    out.write_all(text.as_bytes())?;
    out.flush()
}

/// Executes the policy's actions on the daemon's VMs.
pub struct DaemonActions {
    supervisor: Weak<Supervisor>,
    runtime: tokio::runtime::Handle,
}

impl ActionSink for DaemonActions {
    fn execute(&mut self, action: &Action) -> Result<(), String> {
        let supervisor = self
            .supervisor
            .upgrade()
            .ok_or("the daemon is shutting down")?;
        let id = action.vm_id.as_str();
        match action.kind {
            ActionKind::Throttle => {
                let limits = ThrottleLimits::from_params(&action.policy_rule, &action.params)?;
                let done = self
                    .runtime
                    .block_on(supervisor.throttle(id, limits))
                    .map_err(|e| e.message)?;
                tracing::warn!(id, rule = %action.policy_rule, "policy: throttled {}", done.join(", "));
                Ok(())
            }
            ActionKind::Pause => {
                self.runtime
                    .block_on(supervisor.set_paused(id, true))
                    .map_err(|e| e.message)?;
                tracing::warn!(id, rule = %action.policy_rule, "policy: paused");
                Ok(())
            }
            ActionKind::Stop => {
                // A stop waits for the process to end (up to the stop timeout):
                // start it, and let the engine go on.
                let vm = supervisor.get(id).map_err(|e| e.message)?;
                let state = vm.state();
                if !state.is_live() {
                    return Err(format!("VM {id:?} is {}: nothing to stop", state.as_str()));
                }
                let timeout = supervisor.config().stop_timeout;
                let id = id.to_owned();
                tracing::warn!(id, rule = %action.policy_rule, "policy: stopping");
                self.runtime.spawn(async move {
                    let _ = supervisor.stop(&id, StopMethod::Sigterm, timeout).await;
                });
                Ok(())
            }
        }
    }
}

/// The running engine thread.
pub struct EngineHandle {
    tx: mpsc::Sender<Input>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl EngineHandle {
    /// Processes what is queued, then ends the thread.
    pub async fn stop(mut self) {
        let _ = self.tx.send(Input::Stop);
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

/// Starts the engine thread: detectors, correlation, policy, outputs, hub. Fails
/// when an output cannot be opened or the configuration is not valid.
pub fn start_engine(
    input: EngineInput,
    events: &Events,
    settings: &EventsSettings,
    supervisor: Weak<Supervisor>,
    runtime: tokio::runtime::Handle,
) -> anyhow::Result<EngineHandle> {
    validate_settings(settings).map_err(anyhow::Error::msg)?;
    let mut outputs = Outputs::open(&settings.outputs)?;
    let config = &settings.config;
    let mut host = HostDetector::new(config.detectors.clone())
        .map_err(|e| anyhow::anyhow!("--events-config: {e}"))?;
    let mut vms = VmDetector::new(config.detectors.clone())
        .map_err(|e| anyhow::anyhow!("--events-config: {e}"))?;
    let policy = PolicyEngine::new(config.policy.clone())
        .map_err(|e| anyhow::anyhow!("--events-config: {e}"))?;
    // Incident ids, like event ids, keep growing across restarts.
    let seed = Timestamp::now().unix_ns() / 1_000_000;
    let mut engine = Engine::new(
        Correlator::new(config.correlation.clone()).with_next_id(seed.max(1)),
        policy,
    );
    let mut sink = DaemonActions {
        supervisor,
        runtime,
    };
    let stream = events.stream.clone();
    let tx = events.tx.clone();
    let thread = std::thread::Builder::new()
        .name("vigil-events".into())
        .spawn(move || {
            let EngineInput(rx) = input;
            let mut found = Vec::new();
            let mut last_expiry = Instant::now();
            let mut handle = |event: Event, engine: &mut Engine, outputs: &mut Outputs| {
                for e in engine.handle(event, &mut sink) {
                    outputs.write(&e);
                    stream.publish(e);
                }
            };
            loop {
                match rx.recv_timeout(Duration::from_secs(1)) {
                    Ok(Input::Event(e)) => handle(e, &mut engine, &mut outputs),
                    Ok(Input::Tick {
                        host: h,
                        vms: samples,
                    }) => {
                        use vigil_events::Detector;
                        host.observe(&h, &mut found);
                        for s in &samples {
                            vms.observe(s, &mut found);
                        }
                        for e in found.drain(..) {
                            handle(e, &mut engine, &mut outputs);
                        }
                    }
                    Ok(Input::Ended(id)) => vms.forget(&id),
                    Ok(Input::Destroyed(id)) => {
                        vms.forget(&id);
                        engine.forget_vm(&id);
                    }
                    Ok(Input::Stop) | Err(RecvTimeoutError::Disconnected) => break,
                    Err(RecvTimeoutError::Timeout) => {}
                }
                if last_expiry.elapsed() >= Duration::from_secs(1) {
                    last_expiry = Instant::now();
                    for incident in engine.expire(Timestamp::now()) {
                        tracing::info!(
                            vm = incident.vm_id.as_str(),
                            "incident {} closed: {} ({}, {} events)",
                            incident.id,
                            incident.summary(),
                            incident.severity,
                            incident.event_count
                        );
                    }
                }
            }
        })
        .map_err(|e| anyhow::anyhow!("cannot start the events thread: {e}"))?;
    Ok(EngineHandle {
        tx,
        thread: Some(thread),
    })
}

/// The sampler: every `interval`, each running VM's metrics snapshot (as `GET
/// /metrics` takes them) and the host's readings, to the detectors. Ends when
/// `stop` turns true.
pub async fn sample(
    supervisor: Arc<Supervisor>,
    events: Events,
    interval: Duration,
    scrape_timeout: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let mut cursors = FindingCursors::default();
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let timeout = scrape_timeout.min(interval);
        let samples = crate::metrics::collect(&supervisor, timeout).await;
        emit_findings(&events, &mut cursors, &samples, timeout).await;
        let vms = samples
            .iter()
            .filter_map(|s| Some(vm_sample(&s.info.id, s.snapshot.as_ref()?)))
            .collect();
        let host = host_sample(&vigil_metrics::HostSnapshot::read());
        let _ = events.tx.send(Input::Tick { host, vms });
        events.flush_api_summaries();
    }
}

/// Emits the introspection findings of each VM whose snapshot counts more of them
/// than were emitted (see [`crate::findings`]); forgets the VMs that are gone.
async fn emit_findings(
    events: &Events,
    cursors: &mut FindingCursors,
    samples: &[crate::metrics::VmSample],
    timeout: Duration,
) {
    cursors.retain(samples.iter().map(|s| s.info.id.as_str()));
    let emit = |id: &str, records: &[FindingRecord]| {
        for r in records {
            match finding_event(id, r) {
                Some(e) => events.emit(e),
                None => tracing::warn!(
                    id,
                    rule = r.rule,
                    "introspection finding {} of an unknown rule: not reported",
                    r.seq
                ),
            }
        }
    };
    // VMs that ended: what they found after the last fetch, from their file.
    for s in samples.iter().filter(|s| !s.info.state.is_live()) {
        let Some(since) = cursors.drain(&s.info.id) else {
            continue;
        };
        let path = s.info.dir.join(FINDINGS_FILE);
        // A small local file, read once per ended VM.
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                tracing::warn!(id = s.info.id, "cannot read {}: {e}", path.display());
                continue;
            }
        };
        let records = crate::findings::after(since, parse_findings_file(&text));
        emit(&s.info.id, &records);
    }
    let mut fetches = tokio::task::JoinSet::new();
    for s in samples {
        let Some(snapshot) = &s.snapshot else {
            continue;
        };
        let total = snapshot.introspection.findings_total();
        let Some(since) = cursors.due(&s.info.id, s.info.pid, total) else {
            continue;
        };
        let (id, pid, socket) = (s.info.id.clone(), s.info.pid, s.info.api_socket.clone());
        fetches.spawn(async move {
            let path = format!("{VM_FINDINGS_PATH}?since={since}");
            let records = match crate::client::request(&socket, "GET", &path, None, timeout).await {
                Ok(r) if r.is_success() => serde_json::from_slice::<Vec<FindingRecord>>(&r.body)
                    .map_err(|e| format!("not a list of findings: {e}")),
                Ok(r) => Err(format!("status {}: {}", r.status, r.fault_message())),
                Err(e) => Err(e.to_string()),
            };
            (id, pid, since, records)
        });
    }
    while let Some(joined) = fetches.join_next().await {
        let Ok((id, pid, since, records)) = joined else {
            continue;
        };
        match records {
            Ok(records) => {
                let records = crate::findings::after(since, records);
                emit(&id, &records);
                cursors.advance(&id, pid, &records);
            }
            // Asked again next tick.
            Err(e) => tracing::debug!(id, "cannot fetch introspection findings: {e}"),
        }
    }
}

/// A VM's metrics snapshot as the detectors' sample: disk ops (every block
/// device's requests), packets each way (every net device), and the throttle
/// counters of all devices. A kind of device the VM lacks gives `None`.
pub fn vm_sample(id: &str, s: &vigil_metrics::VmMetricsSnapshot) -> vigil_events::VmSample {
    use vigil_metrics::DeviceKind;
    let sum = |kind: DeviceKind, f: fn(&vigil_metrics::DeviceSnapshot) -> u64| {
        s.devices
            .iter()
            .filter(|d| d.kind == kind)
            .map(f)
            .reduce(u64::saturating_add)
    };
    vigil_events::VmSample {
        vm_id: id.to_owned(),
        at: Timestamp::from_unix_ns(s.utc_timestamp_ms.saturating_mul(1_000_000)),
        disk_ops_total: sum(DeviceKind::Block, |d| {
            d.ops_in
                .saturating_add(d.ops_out)
                .saturating_add(d.ops_other)
        }),
        net_rx_packets_total: sum(DeviceKind::Net, |d| d.ops_in),
        net_tx_packets_total: sum(DeviceKind::Net, |d| d.ops_out),
        throttled_total: s
            .devices
            .iter()
            .map(|d| d.throttled)
            .reduce(u64::saturating_add),
    }
}

/// The host's pressure readings as the detectors' sample.
pub fn host_sample(h: &vigil_metrics::HostSnapshot) -> HostSample {
    HostSample {
        at: Timestamp::now(),
        psi_cpu_some_avg10: h.cpu_pressure.as_ref().map(|p| p.some.avg10),
        psi_memory_some_avg10: h.memory_pressure.as_ref().map(|p| p.some.avg10),
        psi_io_some_avg10: h.io_pressure.as_ref().map(|p| p.some.avg10),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn output_specs() {
        assert_eq!(
            "json:/var/log/vigil.jsonl".parse::<OutputSpec>(),
            Ok(OutputSpec {
                format: OutputFormat::Json,
                target: OutputTarget::File("/var/log/vigil.jsonl".into())
            })
        );
        assert_eq!(
            "cef:-".parse::<OutputSpec>().unwrap().target,
            OutputTarget::Stderr
        );
        assert_eq!(
            "syslog:a:b".parse::<OutputSpec>().unwrap().target,
            OutputTarget::File("a:b".into())
        );
        for bad in ["json", "xml:/tmp/x", "json:", ":x"] {
            let e = bad.parse::<OutputSpec>().unwrap_err();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
    }

    fn params(v: Value) -> BTreeMap<String, Value> {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn throttle_params() {
        let l = ThrottleLimits::from_params("r", &params(json!({"ops_per_s": 100}))).unwrap();
        assert_eq!(l.disk_ops, Some(100));
        assert_eq!(l.net_packets, Some(100));
        assert_eq!(l.disk_bytes, None);
        let l = ThrottleLimits::from_params(
            "r",
            &params(json!({"ops_per_s": 100, "disk_ops_per_s": 5, "net_bytes_per_s": 1000})),
        )
        .unwrap();
        assert_eq!(
            l,
            ThrottleLimits {
                disk_ops: Some(5),
                disk_bytes: None,
                net_packets: Some(100),
                net_bytes: Some(1000)
            }
        );
        let e = ThrottleLimits::from_params("slow", &params(json!({"ops": 1}))).unwrap_err();
        assert!(e.contains("\"slow\"") && e.contains("\"ops\""), "{e}");
        let e = ThrottleLimits::from_params("slow", &params(json!({"ops_per_s": 0}))).unwrap_err();
        assert!(e.contains("params.ops_per_s 0"), "{e}");
        let e =
            ThrottleLimits::from_params("slow", &params(json!({"ops_per_s": "x"}))).unwrap_err();
        assert!(e.contains("params.ops_per_s \"x\""), "{e}");
        assert!(ThrottleLimits::from_params("slow", &params(json!({}))).is_err());
        assert_eq!(
            ThrottleLimits::rate_limiter(Some(100), None),
            Some(json!({"ops": {"size": 100, "refill_time": 1000}}))
        );
        assert_eq!(ThrottleLimits::rate_limiter(None, None), None);
    }

    #[test]
    fn settings_are_checked() {
        let mut s = EventsSettings::default();
        assert!(validate_settings(&s).is_ok());
        s.config = serde_json::from_value(json!({"policy": {"rules": [
            {"name": "p", "when": {"rule": "vm_crashed"}, "action": "pause", "params": {"x": 1}}
        ]}}))
        .unwrap();
        let e = validate_settings(&s).unwrap_err();
        assert!(e.contains("\"p\"") && e.contains("\"x\""), "{e}");
        s.config = serde_json::from_value(json!({"policy": {"rules": [
            {"when": {"rule": "vm_io_flood"}, "action": "throttle"}
        ]}}))
        .unwrap();
        assert!(validate_settings(&s).unwrap_err().contains("\"#0\""));
    }

    #[test]
    fn api_events_are_limited_per_peer() {
        let mut l = ApiLimiter {
            per_window: 3,
            window: Duration::from_secs(60),
            peers: HashMap::new(),
        };
        let t0 = Instant::now();
        let net = ApiTransport::Network;
        let admitted: Vec<bool> = (0..10)
            .map(|_| l.admit("192.0.2.1", Rule::ApiUnauthorized, net, t0).0)
            .collect();
        assert_eq!(admitted.iter().filter(|a| **a).count(), 3);
        // Another peer, and another rule, have their own share.
        assert!(l.admit("192.0.2.2", Rule::ApiUnauthorized, net, t0).0);
        assert!(l.admit("192.0.2.1", Rule::ApiMalformedRequest, net, t0).0);
        // The window ends: one summary, then events again.
        let later = t0 + Duration::from_secs(61);
        let (admit, summary) = l.admit("192.0.2.1", Rule::ApiUnauthorized, net, later);
        assert!(admit);
        let summary = summary.expect("a summary");
        assert_eq!(summary.rule, Rule::ApiUnauthorized);
        assert_eq!(summary.fields["api.suppressed"], json!(7));
        assert!(summary.message.contains("7 more"), "{}", summary.message);
        // Windows without suppressed events end silently.
        assert!(l.expire(later + Duration::from_secs(61), None).is_empty());
        assert!(l.peers.is_empty());
    }

    #[test]
    fn samples_from_snapshots() {
        use vigil_metrics::{DeviceKind, DeviceSnapshot, VmMetricsSnapshot};
        let dev = |kind, ops_in, ops_out, throttled| DeviceSnapshot {
            name: "d".into(),
            kind,
            ops_in,
            ops_out,
            ops_other: 1,
            throttled,
            ..DeviceSnapshot::default()
        };
        let snap = VmMetricsSnapshot {
            utc_timestamp_ms: 1_700_000_000_000,
            devices: vec![
                dev(DeviceKind::Block, 10, 20, 3),
                dev(DeviceKind::Block, 1, 2, 0),
                dev(DeviceKind::Net, 7, 8, 4),
                dev(DeviceKind::Entropy, 100, 0, 5),
            ],
            ..VmMetricsSnapshot::default()
        };
        let s = vm_sample("vm-1", &snap);
        assert_eq!(s.vm_id, "vm-1");
        assert_eq!(s.at, Timestamp::from_unix_secs(1_700_000_000));
        assert_eq!(s.disk_ops_total, Some(35));
        assert_eq!(s.net_rx_packets_total, Some(7));
        assert_eq!(s.net_tx_packets_total, Some(8));
        assert_eq!(s.throttled_total, Some(12));
        let bare = vm_sample("vm-2", &VmMetricsSnapshot::default());
        assert_eq!(bare.disk_ops_total, None);
        assert_eq!(bare.throttled_total, None);
    }
}
