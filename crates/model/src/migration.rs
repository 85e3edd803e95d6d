//! What a live migration's caller chooses, shared by the VMM (which migrates),
//! its API and the daemon (whose policy picks it).

use serde::{Deserialize, Serialize};

/// How guest memory moves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationMethod {
    /// Pre-copy; post-copy when pre-copy does not converge.
    #[default]
    Auto,
    /// Pre-copy only: when the rounds run out, the VM pauses for all that is left.
    Precopy,
    /// The VM moves at once and its memory follows: the shortest pause and
    /// every page sent once, but the guest waits for each page it touches
    /// before it arrives, and the VM is lost if the link fails meanwhile.
    Postcopy,
}

impl MigrationMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            MigrationMethod::Auto => "auto",
            MigrationMethod::Precopy => "precopy",
            MigrationMethod::Postcopy => "postcopy",
        }
    }
}

impl std::str::FromStr for MigrationMethod {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        [Self::Auto, Self::Precopy, Self::Postcopy]
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| format!("{s:?}: expected auto, precopy or postcopy"))
    }
}
