//! The saved state of a virtio-vsock device and its restore: the device listens
//! on its socket path again. Open connections are not carried: the restored
//! device sends `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` on the event queue (virtio
//! 1.2, 5.10.6.7) as soon as the driver has an event buffer there, and the guest
//! drops its connections.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::device::{Vsock, VsockError};
use crate::persist::{Persist, RestoreError};
use crate::virtio::persist::VirtioDeviceState;
use crate::virtio::{VirtioDevice, TYPE_VSOCK};
use vigil_model::config::VsockConfig;

/// virtio-vsock: the guest's CID and where the device listens.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VsockState {
    pub cid: u64,
    pub uds: PathBuf,
}

impl Persist for Vsock {
    type State = VsockState;
    /// Nothing: the socket path is in the state.
    type Resources = ();

    fn save(&self) -> VsockState {
        VsockState {
            cid: self.cid,
            uds: self.uds.clone(),
        }
    }

    fn restore((): (), s: &VsockState) -> Result<Self, RestoreError> {
        if s.cid < 3 || s.cid >= u64::from(u32::MAX) {
            return Err(RestoreError::invalid(
                "cid",
                s.cid,
                "a guest CID is from 3 to 2^32 - 2",
            ));
        }
        let len = s.uds.as_os_str().len();
        // `_<port>` (up to 11 bytes) is appended for guest connections; sun_path
        // holds 107 bytes and a NUL.
        if len == 0 || len + 11 > 107 {
            return Err(RestoreError::invalid(
                "uds",
                s.uds.display(),
                "a socket path has 1 to 96 bytes",
            ));
        }
        let mut vsock = Vsock::new(&VsockConfig {
            cid: s.cid,
            uds: s.uds.clone(),
        })
        .map_err(|e| match e {
            VsockError::Listen { source, .. } => RestoreError::Resource {
                field: "uds".into(),
                value: s.uds.display().to_string(),
                why: "cannot listen there".into(),
                source,
            },
        })?;
        vsock.queue_transport_reset();
        Ok(vsock)
    }
}

impl VirtioDeviceState for VsockState {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn restore(&self) -> Result<Box<dyn VirtioDevice>, RestoreError> {
        Ok(Box::new(Vsock::restore((), self)?))
    }
}
