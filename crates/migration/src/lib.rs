//! Live migration of a Vigil VM from one Vigil process to another, over TCP or
//! a Unix socket (in TLS when certificates are given: [`tls`]): the wire
//! protocol ([`wire`]), the source's pre-copy rounds with auto-converge
//! ([`send`], driven by a [`Migrator`]), post-copy (`postcopy`) and the
//! destination ([`receive`]). The VM's state travels as a snapshot's does
//! (`vigil_vmm::snapshot::VmState`); guest memory as pages from the dirty log.

pub mod pages;
mod postcopy;
pub mod receive;
pub mod send;
pub mod target;
pub mod tls;
pub mod wire;

pub use receive::{receive, ReceiveError};
pub use send::{
    MigrationError, MigrationRequest, MigrationStatus, Migrator, Phase, DEFAULT_DOWNTIME,
    DEFAULT_MAX_ROUNDS,
};
pub use target::{BadTarget, Listener, Target};
pub use tls::{ClientTls, PemError, ServerTls, TlsError};
