//! The types Vigil's processes share, with no dependency on KVM, threads or I/O
//! beyond reading a file's metadata: the VMM (`vigil`), the host daemon
//! (`vigild`) and the client (`vigil-ctl`) all speak these.
//!
//! - [`config`]: a VM's configuration, one struct per resource (machine, boot
//!   source, drives, network interfaces, vsock, balloon, entropy, introspection),
//!   validated once by [`config::VmConfig::validate`], with neutral errors that
//!   each front end names in its own terms ([`config::FieldError`]).
//! - [`firecracker`]: Firecracker's configuration document (API bodies and
//!   `--config-file`), translated into a [`config::VmConfig`].
//! - [`finding`], [`rule`] and [`time`]: introspection findings and the
//!   vocabulary of security events (rules, priorities, sources, ATT&CK
//!   techniques, timestamps).
//! - [`migration`]: how a live migration moves memory.
//! - [`mac`], [`cpu`], [`options`] and [`json`]: MAC addresses, CPUID features by
//!   name, the `key=value,...` option strings of the command-line tools, and JSON
//!   parsing whose errors name the field.

pub mod config;
pub mod cpu;
pub mod finding;
pub mod firecracker;
pub mod json;
pub mod mac;
pub mod migration;
pub mod options;
pub mod rule;
pub mod time;

pub use mac::MacAddr;
pub use rule::{Mitre, Priority, Rule, Source, UnknownName};
pub use time::Timestamp;
