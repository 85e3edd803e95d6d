//! Saving a device's state apart from the device and rebuilding the device from
//! it, for snapshot and live migration (Firecracker's `persist.rs` style).
//!
//! A state is plain data (serde) and carries no host resource: an image is named
//! by its path, a tap by its name. Its version is its shape: every state struct
//! refuses fields it does not know (`deny_unknown_fields`), so a state written by
//! a later Vigil with more in it is refused naming that field rather than half
//! understood; a field added later must carry `#[serde(default)]` so that older
//! states still restore, and a change that cannot be made so is a new variant of
//! the state's enum.
//!
//! A state is also untrusted input (a file from disk, a stream from another
//! host): [`Persist::restore`] checks every field against the rules the live
//! device keeps and refuses a value that breaks one with a [`RestoreError`]
//! naming the field and the value. Nothing here panics.

use std::fmt::Display;

/// A component whose state can be saved and from which it can be rebuilt.
pub trait Persist: Sized {
    /// What is saved: plain serde data, with no host resource in it.
    type State;
    /// What rebuilding needs besides the state: host-side resources the state
    /// cannot carry.
    type Resources;

    /// The component's state now. For a virtio device, take it with the vCPUs
    /// paused so that its queues do not move meanwhile.
    fn save(&self) -> Self::State;

    /// Checks `state` and rebuilds the component from it, opening on the host
    /// what the state names. A refusal's field is relative to the state (`id`,
    /// `rate_limit.ops.rate`); whoever holds the state places it with
    /// [`RestoreError::within`].
    fn restore(resources: Self::Resources, state: &Self::State) -> Result<Self, RestoreError>;
}

/// Why a state cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// A field has a value the device cannot take.
    #[error("{field} = {value}: {why}")]
    Invalid {
        /// Where in the state, as in `queues[0].size` or `device.block.capacity`.
        field: String,
        /// The value found there.
        value: String,
        /// What is wrong with it.
        why: String,
    },
    /// A host resource the state names (an image, a tap, a socket) cannot be
    /// opened.
    #[error("{field} = {value}: {why}: {source}")]
    Resource {
        field: String,
        value: String,
        why: String,
        source: std::io::Error,
    },
}

impl RestoreError {
    /// The field at fault.
    pub fn field(&self) -> &str {
        match self {
            RestoreError::Invalid { field, .. } | RestoreError::Resource { field, .. } => field,
        }
    }

    /// A field with a value that breaks a rule.
    pub fn invalid(field: impl Into<String>, value: impl Display, why: impl Into<String>) -> Self {
        RestoreError::Invalid {
            field: field.into(),
            value: value.to_string(),
            why: why.into(),
        }
    }

    /// The same error with its field placed inside `outer`: `capacity` within
    /// `block` is `block.capacity`, `[1].size` within `queues` is `queues[1].size`.
    pub fn within(mut self, outer: &str) -> Self {
        let (RestoreError::Invalid { field, .. } | RestoreError::Resource { field, .. }) =
            &mut self;
        *field = if field.starts_with('[') {
            format!("{outer}{field}")
        } else {
            format!("{outer}.{field}")
        };
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_are_placed_inside_their_holders() {
        let e = RestoreError::invalid("capacity", 7, "too big")
            .within("block")
            .within("device");
        assert_eq!(e.field(), "device.block.capacity");
        assert_eq!(e.to_string(), "device.block.capacity = 7: too big");
        let e = RestoreError::invalid("[1].size", 3, "odd").within("queues");
        assert_eq!(e.field(), "queues[1].size");
        let e = RestoreError::Resource {
            field: "path".into(),
            value: "/x".into(),
            why: "cannot open it".into(),
            source: std::io::ErrorKind::NotFound.into(),
        }
        .within("block");
        assert_eq!(e.field(), "block.path");
    }
}
