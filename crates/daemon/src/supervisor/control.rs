//! Requests to a live VM through its API socket: pause and resume, rate limits
//! on its drives and interfaces (a policy's throttle), and refreshing its state.

use std::time::Duration;

use super::process::reported_state;
use super::vm::{Vm, VmInfo, VmState};
use super::{Supervisor, SupervisorError};
use crate::client;
use crate::events::{Priority, ThrottleLimits};

impl Supervisor {
    /// Pauses or resumes a VM through its API socket.
    pub async fn set_paused(&self, id: &str, paused: bool) -> Result<VmInfo, SupervisorError> {
        let vm = self.get(id)?;
        let (from, to, word) = if paused {
            (VmState::Running, VmState::Paused, "paused")
        } else {
            (VmState::Paused, VmState::Running, "resumed")
        };
        let state = vm.state();
        if state == to {
            return Ok(vm.info(false));
        }
        if state != from {
            return Err(SupervisorError::CannotPauseOrResume {
                id: id.into(),
                state: state.as_str(),
                from: from.as_str(),
                word,
            });
        }
        let body = serde_json::json!({ "state": if paused { "Paused" } else { "Resumed" } });
        self.patch_vm(&vm, "/vm", &body, &format!("to be {word}"))
            .await?;
        {
            let mut status = vm.status();
            if status.state == from {
                status.state = to;
            }
        }
        tracing::info!(id, "VM {word}");
        self.events
            .lifecycle(id, word, to, Priority::Informational, serde_json::json!({}));
        Ok(vm.info(false))
    }

    /// Sets rate limits on a live VM's drives and network interfaces (those of its
    /// configuration) through its API socket (`PATCH /drives/{id}`, `PATCH
    /// /network-interfaces/{id}`); returns what it limited. Fails when the VM is
    /// not running or paused, has no device the limits apply to, or refuses one.
    pub async fn throttle(
        &self,
        id: &str,
        limits: ThrottleLimits,
    ) -> Result<Vec<String>, SupervisorError> {
        let vm = self.get(id)?;
        let state = vm.state();
        if !matches!(state, VmState::Running | VmState::Paused) {
            return Err(SupervisorError::CannotThrottle {
                id: id.into(),
                state: state.as_str(),
            });
        }
        let ids = |list: &str, key: &str| -> Vec<String> {
            vm.config
                .get(list)
                .and_then(serde_json::Value::as_array)
                .map(|items| {
                    items
                        .iter()
                        .filter_map(|d| d.get(key)?.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default()
        };
        let mut requests = Vec::new();
        if let Some(limiter) = ThrottleLimits::rate_limiter(limits.disk_ops, limits.disk_bytes) {
            for drive in ids("drives", "drive_id") {
                let body = serde_json::json!({"drive_id": drive, "rate_limiter": limiter});
                requests.push((format!("/drives/{drive}"), format!("drive {drive}"), body));
            }
        }
        if let Some(limiter) = ThrottleLimits::rate_limiter(limits.net_packets, limits.net_bytes) {
            for iface in ids("network-interfaces", "iface_id") {
                let body = serde_json::json!({
                    "iface_id": iface, "rx_rate_limiter": limiter, "tx_rate_limiter": limiter,
                });
                requests.push((
                    format!("/network-interfaces/{iface}"),
                    format!("interface {iface}"),
                    body,
                ));
            }
        }
        if requests.is_empty() {
            return Err(SupervisorError::NothingToThrottle {
                id: id.into(),
                limits,
            });
        }
        let mut done = Vec::new();
        for (path, what, body) in requests {
            self.patch_vm(&vm, &path, &body, &format!("PATCH {path}"))
                .await?;
            done.push(what);
        }
        Ok(done)
    }

    /// Sends `PATCH path` with `body` to the VM's API socket; `what` names the
    /// request in errors ("VM \"a\" refused <what> (HTTP 400): ...").
    async fn patch_vm(
        &self,
        vm: &Vm,
        path: &str,
        body: &serde_json::Value,
        what: &str,
    ) -> Result<(), SupervisorError> {
        let id = &vm.id;
        let response = client::request(
            &vm.api_socket,
            "PATCH",
            path,
            Some(body.to_string().into_bytes()),
            self.config.vm_request_timeout,
        )
        .await
        .map_err(|source| SupervisorError::VmUnreachable {
            id: id.clone(),
            what: what.into(),
            source: Box::new(source),
        })?;
        if !response.is_success() {
            return Err(SupervisorError::VmRefused {
                id: id.clone(),
                what: what.into(),
                status: response.status,
                message: response.fault_message(),
            });
        }
        Ok(())
    }

    /// Asks the VM's API socket for its state ("Running"/"Paused"), to refresh the
    /// record; a VM paused or resumed behind the daemon's back is noticed here.
    pub async fn refresh(&self, vm: &Vm) {
        if !matches!(vm.state(), VmState::Running | VmState::Paused) {
            return;
        }
        if let Ok(response) =
            client::request(&vm.api_socket, "GET", "/", None, Duration::from_millis(250)).await
        {
            if let Some(s @ (VmState::Running | VmState::Paused)) = reported_state(&response) {
                let mut status = vm.status();
                if matches!(status.state, VmState::Running | VmState::Paused) {
                    status.state = s;
                }
            }
        }
    }
}
