//! Compositional schedulability analysis for Vigil's real-time VMs: from each VM's
//! periodic tasks to the smallest CPU reservation (an interface) that keeps them
//! schedulable, to the vCPUs' SCHED_DEADLINE parameters and their placement on the
//! host's cores. Pure computation: nothing here touches KVM, threads or the host's
//! scheduler.

pub mod demand;
pub mod input;
pub mod model;
pub mod prm;
pub mod reference;
pub mod time;
