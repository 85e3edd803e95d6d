//! The types Vigil's processes share, with no dependency on KVM, threads or I/O
//! beyond reading a file's metadata: the VMM (`vigil`), the host daemon
//! (`vigild`) and the client (`vigil-ctl`) all speak these.
//!
//! - [`rule`] and [`time`]: the vocabulary of security events and introspection
//!   findings (rules, priorities, sources, ATT&CK techniques, timestamps).

pub mod rule;
pub mod time;

pub use rule::{Mitre, Priority, Rule, Source, UnknownName};
pub use time::Timestamp;
