//! virtio-balloon: the guest gives pages back on request (inflate) and takes them
//! again (deflate); given-back and reported-free pages are returned to the host with
//! `madvise(MADV_DONTNEED)`, so the VMM's resident memory shrinks. Optional memory
//! statistics and free page reporting.

mod device;
mod persist;

pub use device::{Balloon, BalloonControl, HintingStatus, Stats, PAGE_SIZE, TYPE_BALLOON};
pub use persist::{BalloonStat, BalloonState};
