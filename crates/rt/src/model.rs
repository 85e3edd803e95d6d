//! The validated system: a host and its real-time VMs, every time in nanoseconds.

use crate::time::Nanos;

/// How a VM's guest schedules its tasks on its vCPUs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheduler {
    /// Earliest deadline first (global EDF over several vCPUs).
    Edf,
    /// Fixed priorities: deadline monotonic unless the tasks give `priority`.
    Fp,
}

/// A periodic (or sporadic) task with a constrained deadline: `wcet <= deadline <= period`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Task {
    pub name: String,
    pub period: Nanos,
    pub deadline: Nanos,
    pub wcet: Nanos,
    /// Under `fp`: larger runs first. Deadline monotonic ranks (shorter deadline,
    /// then earlier in the file, first) when the input gives none.
    pub priority: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vm {
    pub name: String,
    pub scheduler: Scheduler,
    /// The interface period Π the input fixes; `None` searches for one.
    pub period: Option<Nanos>,
    /// The most vCPUs the VM may get.
    pub max_vcpus: u32,
    pub tasks: Vec<Task>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Host {
    pub cores: u32,
    /// The share of each core SCHED_DEADLINE may hand out, in millionths
    /// (the kernel's `sched_rt_runtime_us / sched_rt_period_us`, 950000 by default).
    pub utilization_limit_ppm: u64,
    /// The shortest interface period the search considers.
    pub min_period: Nanos,
    /// Interface periods and budgets are multiples of this.
    pub resolution: Nanos,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct System {
    pub host: Host,
    pub vms: Vec<Vm>,
}

impl Task {
    pub fn new(name: &str, period: Nanos, deadline: Nanos, wcet: Nanos) -> Task {
        Task {
            name: name.to_string(),
            period,
            deadline,
            wcet,
            priority: 0,
        }
    }
}

/// Gives `tasks` deadline-monotonic priorities (shorter deadline first, then
/// shorter period, then input order).
pub fn deadline_monotonic(tasks: &mut [Task]) {
    let mut order: Vec<usize> = (0..tasks.len()).collect();
    order.sort_by_key(|&i| (tasks[i].deadline, tasks[i].period, i));
    let n = tasks.len() as u64;
    for (rank, i) in order.into_iter().enumerate() {
        tasks[i].priority = n - rank as u64;
    }
}
