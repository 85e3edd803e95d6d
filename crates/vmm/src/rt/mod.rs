//! Real-time guests: how the host schedules each vCPU thread (`sched`) and the
//! RT timer device that raises a vCPU when its guest's deadline comes (`timer`).

pub mod sched;
pub mod timer;

pub use sched::{SchedError, VcpuScheduler};
pub use timer::RtTimer;
