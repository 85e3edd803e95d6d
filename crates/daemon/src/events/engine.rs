//! The engine thread: every event through detectors, correlation and the policy
//! (whose actions it executes), then to the outputs and the stream.

use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Weak;
use std::time::{Duration, Instant};

use vigil_events::{
    Correlator, Engine, EventsConfigError, HostDetector, PolicyEngine, Timestamp, VmDetector,
};

use super::actions::{validate_settings, DaemonActions, SettingsError};
use super::outputs::{OutputOpenError, Outputs};
use super::{EngineInput, Event, Events, EventsSettings, Input};
use crate::supervisor::Supervisor;

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

/// Why the engine thread did not start.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Settings(#[from] SettingsError),
    #[error(transparent)]
    Output(#[from] OutputOpenError),
    #[error("cannot start the events thread: {0}")]
    Thread(std::io::Error),
}

impl From<EventsConfigError> for EngineError {
    fn from(e: EventsConfigError) -> Self {
        EngineError::Settings(SettingsError::Config(e))
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
) -> Result<EngineHandle, EngineError> {
    validate_settings(settings)?;
    let mut outputs = Outputs::open(&settings.outputs)?;
    let config = &settings.config;
    let mut host = HostDetector::new(config.detectors.clone()).map_err(EventsConfigError::from)?;
    let mut vms = VmDetector::new(config.detectors.clone()).map_err(EventsConfigError::from)?;
    let policy = PolicyEngine::new(config.policy.clone()).map_err(EventsConfigError::from)?;
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
        .map_err(EngineError::Thread)?;
    Ok(EngineHandle {
        tx,
        thread: Some(thread),
    })
}
