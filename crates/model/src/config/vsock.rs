//! The vsock device, bridged to Unix sockets with Firecracker's convention.

use std::path::PathBuf;

use crate::config::FieldError;

/// How a vsock device is attached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VsockConfig {
    /// The guest's CID (3 or more).
    pub cid: u64,
    /// Where the device listens; guest-initiated connections go to `<uds>_<port>`.
    pub uds: PathBuf,
}

/// A vsock device that cannot be attached as given.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum VsockConfigError {
    #[error("guest_cid {cid}: {why}")]
    Cid { cid: u64, why: &'static str },
    #[error("uds_path {path:?}: {why}")]
    Uds { path: String, why: &'static str },
}

impl FieldError for VsockConfigError {
    fn field(&self) -> &'static str {
        match self {
            Self::Cid { .. } => "guest_cid",
            Self::Uds { .. } => "uds_path",
        }
    }
}

impl VsockConfig {
    /// Checks the CID and the socket path.
    pub fn validate(&self) -> Result<(), VsockConfigError> {
        let bad_cid = |why| VsockConfigError::Cid { cid: self.cid, why };
        if self.cid < 3 {
            return Err(bad_cid(
                "0 to 2 are reserved (2 is the host); use 3 or more",
            ));
        }
        if self.cid >= u64::from(u32::MAX) {
            return Err(bad_cid("above the 32-bit CIDs guests use"));
        }
        let bad_uds = |why| VsockConfigError::Uds {
            path: self.uds.display().to_string(),
            why,
        };
        // sun_path holds 108 bytes; `_<port>` (up to 11 more) is appended for guest
        // connections.
        let len = self.uds.as_os_str().len();
        if len == 0 {
            return Err(bad_uds("needs a path"));
        }
        if len + 11 > 107 {
            return Err(bad_uds(
                "longer than a Unix socket path allows (96 bytes here)",
            ));
        }
        Ok(())
    }
}
