//! What Vigil's binaries share: `vigil` (the VMM, one process per VM), `vigild`
//! (the host daemon), `vigil-ctl` (its client) and `vigil-bench` (the benchmarks).
//! Each binary links only the parts it uses.

pub mod args;
pub mod exit;
pub mod logging;
pub mod page_server;
pub mod qemu;
pub mod siblings;
