//! Moving a VM from this daemon's host to another daemon's: this daemon asks
//! the other, over its TCP API with its token, to make room (`POST
//! /vms/{id}/receive`: a `vigil run --migrate-from` process on a fresh port
//! with a one-time token), then tells its own VM's API to migrate there (`PUT
//! /vigil/migration`) and follows it until the VM runs there (its process here
//! exits: the record says `migrated`) or the migration fails (the VM runs here
//! still, and the other daemon's waiting process is stopped).

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::request::LaunchOptions;
use super::stop::StopMethod;
use super::vm::{Vm, VmInfo, VmState};
use super::{Supervisor, SupervisorError};
use crate::client;
use crate::events::Priority;
use crate::id::validate_id;

/// `POST /vms/{id}/receive`: the VM about to arrive.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiveRequest {
    /// Its configuration at the source, for the record here.
    pub config: serde_json::Value,
}

/// Where the waiting process listens, and the token it wants.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Incoming {
    pub id: String,
    pub port: u16,
    pub token: String,
}

/// `POST /vms/{id}/migrate`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// The other daemon's TCP API (its `--listen-tcp`): `https://HOST:PORT`, or
    /// `HOST:PORT` (`http://HOST:PORT`) for one without TLS.
    pub to: String,
    /// The other daemon's bearer token.
    pub peer_token: String,
    /// The longest pause at the end (default 100 ms).
    #[serde(default)]
    pub downtime_ms: Option<u64>,
    /// At most this many MiB/s (default: no limit).
    #[serde(default)]
    pub bandwidth_mib_s: Option<u64>,
    /// How memory moves (default: auto).
    #[serde(default)]
    pub method: Option<vigil_model::migration::MigrationMethod>,
}

/// How long the whole migration may take before it is cancelled.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(600);

/// A one-time token: 16 random bytes as hex.
fn one_time_token() -> std::io::Result<String> {
    let mut bytes = [0u8; 16];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut bytes)?;
    Ok(hex::encode(bytes))
}

impl Supervisor {
    /// Starts a process that waits for VM `id` to arrive by migration, on a free
    /// port; returns the port and the token the source must present.
    pub async fn receive(
        &self,
        id: &str,
        request: ReceiveRequest,
    ) -> Result<Incoming, SupervisorError> {
        validate_id(id)?;
        // The process here opens the VM's files (its disks) as the source names
        // them: the same rule as for a VM created here.
        let document = vigil_model::firecracker::parse(request.config.to_string().as_bytes())?;
        self.config.paths.check(id, &document)?;
        let spawn_error = |source| SupervisorError::Spawn {
            vmm: self.config.vmm_binary.clone(),
            source,
        };
        // The port is free now; the VMM binds it at once.
        let port = std::net::TcpListener::bind("0.0.0.0:0")
            .and_then(|l| l.local_addr())
            .map_err(spawn_error)?
            .port();
        let token = one_time_token().map_err(spawn_error)?;
        let options = LaunchOptions {
            incoming: Some((port, token.clone())),
            incoming_tls: self.config.migration_tls.identity.clone(),
            // The pages its pager holds arrive packed, into a pager here.
            incoming_compression: document.memory_compression.map(|c| c.normalized()),
            ..Default::default()
        };
        let vm = self
            .launch_new(id.to_owned(), request.config, options)
            .await?;
        vm.status().state = VmState::Incoming;
        // Wait until it listens (its API socket answers), then watch for arrival.
        let deadline = Instant::now() + self.config.start_timeout;
        while client::request(&vm.api_socket, "GET", "/", None, Duration::from_millis(200))
            .await
            .is_err()
        {
            if !vm.state().is_live() || Instant::now() > deadline {
                self.stop_vm(&vm, StopMethod::Sigterm, Duration::from_secs(2))
                    .await;
                let info = vm.info(false);
                self.remove(&vm).await;
                return Err(SupervisorError::StartFailed {
                    id: id.into(),
                    reason: info
                        .exit
                        .map(|e| e.reason)
                        .unwrap_or_else(|| "it did not listen in time".into()),
                    log: info.stderr_tail.unwrap_or_default(),
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::spawn(watch_arrival(vm.clone(), self.events.clone()));
        self.events.lifecycle(
            id,
            "incoming",
            VmState::Incoming,
            Priority::Informational,
            serde_json::json!({ "migration.port": port }),
        );
        Ok(Incoming {
            id: id.into(),
            port,
            token,
        })
    }

    /// Moves VM `id` to the daemon at `request.to`; returns its record here
    /// (`migrated`) once it runs there.
    pub async fn migrate(
        &self,
        id: &str,
        request: MigrateRequest,
    ) -> Result<VmInfo, SupervisorError> {
        let vm = self.get(id)?;
        let state = vm.state();
        if !matches!(state, VmState::Running | VmState::Paused) {
            return Err(SupervisorError::CannotMigrate {
                id: id.into(),
                state: state.as_str(),
            });
        }
        let to = request.to.clone();
        let peer_daemon = self.peer_endpoint(&to, &request.peer_token)?;
        let host = peer_daemon.url().host.clone();
        let peer_daemon = client::Endpoint::Tcp(peer_daemon);
        let peer = |why: String| SupervisorError::Peer {
            to: to.clone(),
            why,
        };
        let body = serde_json::to_vec(&ReceiveRequest {
            config: vm.config.clone(),
        })
        .map_err(SupervisorError::EncodeConfig)?;
        let answer = client::request_to(
            &peer_daemon,
            "POST",
            &format!("/vms/{id}/receive"),
            Some(body),
            self.config.start_timeout + Duration::from_secs(5),
        )
        .await
        .map_err(|e| peer(format!("cannot be reached: {e}")))?;
        if !answer.is_success() {
            return Err(peer(format!(
                "refused to receive the VM (HTTP {}): {}",
                answer.status,
                answer.fault_message()
            )));
        }
        let incoming: Incoming = serde_json::from_slice(&answer.body).map_err(|e| {
            peer(format!(
                "answered something that is not a receiving VM: {e}"
            ))
        })?;
        let destination = format!("tcp:{host}:{}", incoming.port);
        self.events.lifecycle(
            id,
            "migrating",
            state,
            Priority::Informational,
            serde_json::json!({ "migration.to": destination }),
        );
        vm.status().migrating_to = Some(destination.clone());
        vm.status().migration = None;
        let result = self
            .follow_migration(&vm, &destination, &incoming.token, &request)
            .await;
        if result.is_ok() {
            let status = vm.status().migration.clone().unwrap_or_default();
            self.events.lifecycle(
                id,
                "migration completed",
                VmState::Migrated,
                Priority::Informational,
                serde_json::json!({
                    "migration.to": destination,
                    "migration.total_ms": status["total_ms"],
                    "migration.downtime_ms": status["downtime_ms"],
                    "migration.bytes_sent": status["bytes_sent"],
                    "migration.rounds": status["round"],
                }),
            );
        }
        if let Err(e) = &result {
            vm.status().migrating_to = None;
            // Nothing runs there: the waiting process goes.
            let _ = client::request_to(
                &peer_daemon,
                "POST",
                &format!("/vms/{id}/stop"),
                Some(b"{}".to_vec()),
                Duration::from_secs(10),
            )
            .await;
            self.events.lifecycle(
                id,
                "migration failed",
                vm.state(),
                Priority::Warning,
                serde_json::json!({ "migration.to": destination, "reason": e.to_string() }),
            );
        }
        result
    }

    /// The other daemon's TCP API at `to` (`https://HOST:PORT`, or
    /// `HOST:PORT` for plain HTTP) with its token; https needs `--peer-tls-ca`.
    fn peer_endpoint(&self, to: &str, token: &str) -> Result<client::TcpEndpoint, SupervisorError> {
        let url =
            client::DaemonUrl::parse(to).map_err(|_| SupervisorError::BadPeer { to: to.into() })?;
        client::TcpEndpoint::new(url, token, self.config.peer_tls.clone())
            .map_err(|_| SupervisorError::PeerTlsCa { to: to.into() })
    }

    /// Starts the migration on the VM's API and waits until its process ends
    /// (it migrated) or the migration fails.
    async fn follow_migration(
        &self,
        vm: &Arc<Vm>,
        destination: &str,
        token: &str,
        request: &MigrateRequest,
    ) -> Result<VmInfo, SupervisorError> {
        let failed = |why: String| SupervisorError::MigrationFailed {
            id: vm.id.clone(),
            to: destination.into(),
            why,
        };
        let body = serde_json::json!({
            "destination": destination,
            "token": token,
            "downtime_ms": request.downtime_ms,
            "bandwidth_mib_s": request.bandwidth_mib_s,
            "method": request.method,
            // A jailed VMM has its copy in the jail (`launch`).
            "tls_ca": match &vm.jail {
                Some(_) => self.config.migration_tls.ca.as_ref().map(|_| super::jail::MIGRATION_CA.into()),
                None => self.config.migration_tls.ca.clone(),
            },
        });
        let timeout = self.config.vm_request_timeout;
        let answer = client::request(
            &vm.api_socket,
            "PUT",
            "/vigil/migration",
            Some(body.to_string().into_bytes()),
            timeout,
        )
        .await
        .map_err(|e| failed(e.to_string()))?;
        if !answer.is_success() {
            return Err(failed(answer.fault_message()));
        }
        let deadline = Instant::now() + MIGRATION_TIMEOUT;
        let mut ended = vm.ended.clone();
        loop {
            if *ended.borrow() {
                break;
            }
            match client::request(&vm.api_socket, "GET", "/vigil/migration", None, timeout).await {
                Ok(r) => {
                    let status: serde_json::Value = r.json().unwrap_or_default();
                    if status.is_object() {
                        vm.status().migration = Some(status.clone());
                    }
                    match status["state"].as_str() {
                        Some("failed") | Some("cancelled") => {
                            return Err(failed(
                                status["error"].as_str().unwrap_or("cancelled").into(),
                            ))
                        }
                        _ if Instant::now() > deadline => {
                            let _ = client::request(
                                &vm.api_socket,
                                "DELETE",
                                "/vigil/migration",
                                None,
                                timeout,
                            )
                            .await;
                            return Err(failed(format!(
                                "it took longer than {MIGRATION_TIMEOUT:?}; cancelled"
                            )));
                        }
                        _ => {}
                    }
                }
                // Its API is gone: the process is ending.
                Err(_) => {
                    let _ =
                        tokio::time::timeout(Duration::from_secs(10), ended.wait_for(|e| *e)).await;
                    break;
                }
            }
            // The last round (`stopped`) is short: its end, the summary, is
            // read before the process goes.
            let pace = if status_is(vm, "stopped") { 5 } else { 50 };
            tokio::time::sleep(Duration::from_millis(pace)).await;
        }
        let info = vm.info(false);
        if info.state == VmState::Migrated {
            Ok(info)
        } else {
            Err(failed(format!(
                "its process ended {}: {}",
                info.state.as_str(),
                info.exit.map(|e| e.reason).unwrap_or_default()
            )))
        }
    }
}

/// Whether the migration's last status seen is in `state`.
fn status_is(vm: &Vm, state: &str) -> bool {
    vm.status()
        .migration
        .as_ref()
        .is_some_and(|m| m["state"] == state)
}

/// Marks an incoming VM running once its API says it runs (it arrived).
async fn watch_arrival(vm: Arc<Vm>, events: crate::events::Events) {
    loop {
        if vm.state() != VmState::Incoming {
            return;
        }
        if let Ok(r) =
            client::request(&vm.api_socket, "GET", "/", None, Duration::from_millis(500)).await
        {
            if let Some(s @ (VmState::Running | VmState::Paused)) =
                super::process::reported_state(&r)
            {
                let mut status = vm.status();
                if status.state == VmState::Incoming {
                    status.state = s;
                    drop(status);
                    events.lifecycle(
                        &vm.id,
                        "arrived",
                        s,
                        Priority::Informational,
                        serde_json::json!({}),
                    );
                }
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
