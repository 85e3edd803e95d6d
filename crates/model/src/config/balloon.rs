//! The memory balloon.

use std::time::Duration;

use crate::config::FieldError;

/// How the balloon is configured.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BalloonConfig {
    /// Initial target: how much memory the guest should give back, in MiB.
    pub target_mib: u64,
    /// Ask the guest for memory statistics this often (`None`: no statistics queue).
    pub stats_interval: Option<Duration>,
    /// Offer free page reporting.
    pub free_page_reporting: bool,
    /// Offer free page hinting: runs the host starts and stops, in which the
    /// guest hints free pages that the host discards.
    pub free_page_hinting: bool,
    /// Let the guest deflate when it runs out of memory.
    pub deflate_on_oom: bool,
}

/// A balloon that does not fit the machine.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BalloonConfigError {
    #[error("amount_mib {size}: more than the guest's {memory} MiB")]
    TooBig { size: u64, memory: u64 },
}

impl FieldError for BalloonConfigError {
    fn field(&self) -> &'static str {
        "amount_mib"
    }
}

impl BalloonConfig {
    /// Checks the balloon against a guest of `mem_size_mib`.
    pub fn validate(&self, mem_size_mib: u64) -> Result<(), BalloonConfigError> {
        if self.target_mib > mem_size_mib {
            return Err(BalloonConfigError::TooBig {
                size: self.target_mib,
                memory: mem_size_mib,
            });
        }
        Ok(())
    }
}
