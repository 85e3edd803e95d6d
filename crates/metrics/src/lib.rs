//! Vigil's metrics: what a VM and its host are doing, counted cheaply and
//! rendered for people and machines.
//!
//! - [`Counter`], [`Gauge`], [`Histogram`]: lock-free primitives (relaxed
//!   atomics; recording never allocates or locks).
//! - [`VcpuCounters`] (exits by reason, exit handling latency, time in `KVM_RUN`,
//!   the vCPU thread's CPU and run-queue wait) with the [`RunClock`] a vCPU run
//!   loop keeps; [`DeviceCounters`] (bytes, operations, errors, rate-limiter
//!   throttles), shared with a device through an `Arc`.
//! - [`VmMetrics`] holds one VM's counters; [`MetricsHandle`] is the cheap
//!   cloneable handle other threads take [`VmMetricsSnapshot`]s through.
//! - [`IntrospectCounters`]: integrity checks, findings by rule, guarded MSR
//!   writes and traced system calls of the VM's introspection.
//! - [`RtCounters`]: the RT timer device's expiries, boosts and budget overruns.
//! - [`PagerCounters`]: the memory-compression pager's pages, pool and fault-ins.
//! - [`host`]: PSI, load, memory and CPU of the host, from `/proc`.
//! - [`prometheus::render`]: the Prometheus text format of many VMs (labelled by VM
//!   id) and the host; [`json::json_line`]: a Firecracker-style JSON line per VM.

pub mod device;
pub mod host;
pub mod introspect;
pub mod json;
pub mod pager;
pub mod primitives;
pub mod prometheus;
pub mod rt;
pub mod vcpu;
pub mod vm;

pub use device::{BalloonSnapshot, DeviceCounters, DeviceKind, DeviceSnapshot};
pub use host::HostSnapshot;
pub use introspect::{IntrospectCounters, IntrospectSnapshot};
pub use pager::{PagerCounters, PagerSnapshot};
pub use primitives::{Counter, Gauge, Histogram, HistogramSnapshot};
pub use rt::{RtCounters, RtSnapshot};
pub use vcpu::{ExitCounts, ExitReason, RunClock, VcpuCounters, VcpuSnapshot};
pub use vm::{MemorySnapshot, MetricsHandle, VmMetrics, VmMetricsSnapshot};
