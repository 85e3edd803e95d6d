//! Stopping VMs: SIGTERM (or Ctrl+Alt+Del through the VM's API) then SIGKILL
//! after the timeout, destroying a VM with its folder (and its jail and
//! cgroup), and stopping them all at shutdown. A jailed VM's process is the
//! jailer, which passes SIGTERM on to the VMM; SIGKILL ends the jailer, and
//! the VMM with it (its parent-death signal).

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::vm::{Vm, VmInfo, VmState};
use super::{Supervisor, SupervisorError};
use crate::client;
use crate::events::Priority;

/// How to stop a VM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StopMethod {
    /// SIGTERM to the VMM, which stops the VM cleanly and exits.
    #[default]
    Sigterm,
    /// Ctrl+Alt+Del to the guest through the VM's API (a Linux guest with
    /// `reboot=k` shuts down), then SIGTERM if it has not exited within the timeout.
    CtrlAltDel,
}

impl Supervisor {
    /// Stops a VM and waits until its process has been reaped.
    pub async fn stop(
        &self,
        id: &str,
        method: StopMethod,
        timeout: Duration,
    ) -> Result<VmInfo, SupervisorError> {
        let vm = self.get(id)?;
        self.stop_vm(&vm, method, timeout).await;
        Ok(vm.info(false))
    }

    pub(super) async fn stop_vm(&self, vm: &Vm, method: StopMethod, timeout: Duration) {
        {
            let mut status = vm.status();
            if !status.state.is_live() {
                return;
            }
            status.stop_requested = true;
            status.state = VmState::Stopping;
        }
        tracing::info!(id = %vm.id, ?method, "stopping VM");
        self.events.lifecycle(
            &vm.id,
            "stopping",
            VmState::Stopping,
            Priority::Notice,
            serde_json::json!({ "method": method }),
        );
        if method == StopMethod::CtrlAltDel {
            let body = serde_json::json!({ "action_type": "SendCtrlAltDel" });
            let sent = client::request(
                &vm.api_socket,
                "PUT",
                "/actions",
                Some(body.to_string().into_bytes()),
                self.config.vm_request_timeout,
            )
            .await;
            match sent {
                Ok(r) if r.is_success() => {
                    if vm.wait_ended(timeout).await {
                        return;
                    }
                }
                Ok(r) => {
                    tracing::warn!(id = %vm.id, "SendCtrlAltDel refused: {}", r.fault_message())
                }
                Err(e) => tracing::warn!(id = %vm.id, "SendCtrlAltDel failed: {e}"),
            }
        }
        vm.signal(libc::SIGTERM);
        if vm.wait_ended(timeout).await {
            return;
        }
        tracing::warn!(id = %vm.id, "VM did not exit within {timeout:?} of SIGTERM; sending SIGKILL");
        vm.signal(libc::SIGKILL);
        if !vm.wait_ended(Duration::from_secs(10)).await {
            tracing::error!(id = %vm.id, "VM process survived SIGKILL for 10 s");
        }
    }

    pub(super) async fn remove(&self, vm: &Vm) {
        {
            let mut table = self.table();
            if table
                .get(&vm.id)
                .is_some_and(|v| std::ptr::eq(Arc::as_ptr(v), vm))
            {
                table.remove(&vm.id);
            }
        }
        if let Err(e) = std::fs::remove_dir_all(&vm.dir) {
            if e.kind() != std::io::ErrorKind::NotFound {
                tracing::warn!(id = %vm.id, "cannot remove {}: {e}", vm.dir.display());
            }
        }
        // The daemon made the jail and its cgroup: the operator does not clean up.
        if let Some(jail) = &vm.jail {
            jail.remove(&vm.config).await;
        }
    }

    /// Stops a VM (when it runs) and removes it and its folder.
    pub async fn destroy(&self, id: &str, timeout: Duration) -> Result<(), SupervisorError> {
        let vm = self.get(id)?;
        self.stop_vm(&vm, StopMethod::Sigterm, timeout).await;
        self.remove(&vm).await;
        tracing::info!(id, "VM destroyed");
        self.events.lifecycle(
            id,
            "destroyed",
            vm.state(),
            Priority::Notice,
            serde_json::json!({}),
        );
        self.events.vm_destroyed(id);
        Ok(())
    }

    /// Stops every live VM, all at once (the daemon is shutting down).
    pub async fn stop_all(self: &Arc<Self>) {
        let mut tasks = tokio::task::JoinSet::new();
        for vm in self.list() {
            if vm.state().is_live() {
                let this = self.clone();
                let timeout = self.config.stop_timeout;
                tasks.spawn(async move { this.stop_vm(&vm, StopMethod::Sigterm, timeout).await });
            }
        }
        while tasks.join_next().await.is_some() {}
    }
}
