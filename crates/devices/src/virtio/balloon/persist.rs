//! The saved state of a virtio-balloon device and its restore: its config space,
//! its configuration and the statistics buffer it holds.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::device::{Balloon, MAX_STATS, PAGE_SIZE, TYPE_BALLOON};
use crate::persist::{Persist, RestoreError};
use crate::virtio::persist::{QueueState, VirtioDeviceState};
use crate::virtio::VirtioDevice;
use vigil_model::config::BalloonConfig;

/// One memory statistic the guest sent (virtio 1.1, 5.5.6.3).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BalloonStat {
    pub tag: u16,
    pub value: u64,
}

/// virtio-balloon: its config space, its configuration, and the statistics
/// buffer it holds (the guest gave it and waits for it back).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BalloonState {
    /// The target, in 4 KiB pages (config space `num_pages`).
    pub num_pages: u32,
    /// What the driver says it gave back (config space `actual`).
    pub actual: u32,
    /// How often statistics are asked for; `None`: no statistics queue.
    pub stats_interval: Option<Duration>,
    pub free_page_reporting: bool,
    /// Free page hinting offered, and the last command id of each side
    /// (`u32::MAX`: the guest sent none). Absent from older snapshots.
    #[serde(default)]
    pub free_page_hinting: bool,
    #[serde(default)]
    pub hint_host_cmd: u32,
    #[serde(default = "no_guest_cmd")]
    pub hint_guest_cmd: u32,
    /// The run under way acknowledges the guest's stop (`acknowledge_on_stop`).
    #[serde(default = "ack_on_stop_default")]
    pub hint_ack_on_stop: bool,
    pub deflate_on_oom: bool,
    /// Head of the statistics buffer the device holds, if any.
    pub stats_held: Option<u16>,
    /// The statistics last received.
    pub stats: Vec<BalloonStat>,
}

fn no_guest_cmd() -> u32 {
    u32::MAX
}

/// Firecracker's default, for snapshots from before the field was kept.
fn ack_on_stop_default() -> bool {
    true
}

/// The statistics queue's place: after inflate and deflate.
const STATS_QUEUE: usize = 2;

impl Persist for Balloon {
    type State = BalloonState;
    /// Nothing: the pages it gave back are guest memory's, saved with it.
    type Resources = ();

    fn save(&self) -> BalloonState {
        BalloonState {
            num_pages: self.control.pages().0,
            actual: self.actual_pages,
            stats_interval: self.config.stats_interval,
            free_page_reporting: self.config.free_page_reporting,
            free_page_hinting: self.config.free_page_hinting,
            hint_host_cmd: self.control.hinting_status().host_cmd,
            hint_guest_cmd: self.control.hinting_status().guest_cmd.unwrap_or(u32::MAX),
            hint_ack_on_stop: self.control.hint_ack_on_stop(),
            deflate_on_oom: self.config.deflate_on_oom,
            stats_held: self.stats_held,
            stats: self
                .stats
                .iter()
                .map(|&(tag, value)| BalloonStat { tag, value })
                .collect(),
        }
    }

    fn restore((): (), s: &BalloonState) -> Result<Self, RestoreError> {
        if s.stats_interval == Some(Duration::ZERO) {
            return Err(RestoreError::invalid(
                "stats_interval",
                "0s",
                "statistics every 0 s (no statistics queue is null)",
            ));
        }
        if s.stats.len() > MAX_STATS {
            return Err(RestoreError::invalid(
                "stats",
                format_args!("{} entries", s.stats.len()),
                format!("the device keeps at most {MAX_STATS}"),
            ));
        }
        if s.stats_held.is_some() && s.stats_interval.is_none() {
            return Err(RestoreError::invalid(
                "stats_held",
                format_args!("{:?}", s.stats_held),
                "a held statistics buffer without a statistics queue",
            ));
        }
        let config = BalloonConfig {
            target_mib: (u64::from(s.num_pages) * PAGE_SIZE) >> 20,
            stats_interval: s.stats_interval,
            free_page_reporting: s.free_page_reporting,
            free_page_hinting: s.free_page_hinting,
            deflate_on_oom: s.deflate_on_oom,
        };
        let stats = s.stats.iter().map(|s| (s.tag, s.value)).collect();
        let balloon = Balloon::restored(config, s.num_pages, s.actual, s.stats_held, stats);
        balloon
            .control
            .restore_hinting(s.hint_host_cmd, s.hint_guest_cmd, s.hint_ack_on_stop);
        Ok(balloon)
    }
}

impl VirtioDeviceState for BalloonState {
    fn device_type(&self) -> u32 {
        TYPE_BALLOON
    }

    fn restore(&self) -> Result<Box<dyn VirtioDevice>, RestoreError> {
        Ok(Box::new(Balloon::restore((), self)?))
    }

    fn check_queues(&self, queues: &[QueueState]) -> Result<(), RestoreError> {
        if let (Some(head), Some(q)) = (self.stats_held, queues.get(STATS_QUEUE)) {
            if head >= q.size {
                return Err(RestoreError::invalid(
                    "stats_held",
                    head,
                    format!("not a descriptor of the {}-entry statistics queue", q.size),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hinting run that does not acknowledge the guest's stop stays so
    /// across a snapshot; a state from before the field was kept acknowledges.
    #[test]
    fn a_hinting_run_keeps_its_acknowledge_on_stop() {
        let balloon = Balloon::new(BalloonConfig {
            target_mib: 0,
            stats_interval: None,
            free_page_reporting: false,
            free_page_hinting: true,
            deflate_on_oom: false,
        });
        balloon.control().start_hinting(false);
        let state = balloon.save();
        assert!(!state.hint_ack_on_stop);
        let back = Balloon::restore((), &state).unwrap();
        assert!(!back.control().hint_ack_on_stop());
        assert_eq!(
            back.control().hinting_status(),
            balloon.control().hinting_status()
        );
        let mut old = serde_json::to_value(&state).unwrap();
        old.as_object_mut().unwrap().remove("hint_ack_on_stop");
        let old: BalloonState = serde_json::from_value(old).unwrap();
        assert!(old.hint_ack_on_stop);
    }
}
