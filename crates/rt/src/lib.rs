//! Compositional schedulability analysis for Vigil's real-time VMs: from each VM's
//! periodic tasks to the smallest CPU reservation (an interface) that keeps them
//! schedulable, to the vCPUs' SCHED_DEADLINE parameters and their placement on the
//! host's cores. Pure computation: nothing here touches KVM, threads or the host's
//! scheduler.

pub mod compose;
pub mod demand;
pub mod input;
pub mod interface;
pub mod model;
pub mod mpr;
pub mod prm;
pub mod reference;
pub mod report;
pub mod time;

pub use input::{Format, InputError};
pub use report::{analyze, Report};

/// Reads a system description (`path` picks the format by its extension, else the
/// text's first character does) and analyses it.
pub fn analyze_text(text: &str, path: Option<&str>) -> Result<Report, InputError> {
    let format = input::detect_format(path, text)?;
    let system = input::parse_system(text, format)?;
    Ok(analyze(&system))
}
