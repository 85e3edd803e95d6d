//! Host memory pressure squeezes the VMs that can give memory back: while
//! the host's memory PSI (`/proc/pressure/memory`, `some avg10`) is above a
//! threshold, at most every `step` each running VM with the
//! memory-compression pager gives some back: its balloon first, where it has
//! one (inflated by an eighth of guest memory, up to half: the guest chooses
//! what to give), then its pager's RSS target (`PATCH /vigil/memory`), set
//! to 3/4 of what it keeps now (the lower of its target and guest memory's
//! footprint, its pages in RAM and the pool), never below `floor_mib`. Once the pressure has stayed under half
//! the threshold for `relax_samples` samples, every VM squeezed gets its
//! balloon and target back as they were. Each change is a `policy_action`
//! event (`policy.rule` `memory_pressure`).
//!
//! [`Squeezer`] only decides, from the samples it is given; the sampler
//! reads the VMs and sends the changes.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// `--squeeze-*`.
#[derive(Debug, Clone, PartialEq)]
pub struct SqueezeSettings {
    /// Host memory PSI `some avg10` (%) above which VMs are squeezed.
    pub pressure: f64,
    /// The shortest time between two squeezes (PSI's avg10 needs a while to
    /// show the last one).
    pub step: Duration,
    /// The lowest RSS target set, in MiB.
    pub floor_mib: u64,
    /// Samples under half the threshold before the VMs get their memory back.
    pub relax_samples: u32,
}

impl Default for SqueezeSettings {
    fn default() -> Self {
        Self {
            pressure: 20.0,
            step: Duration::from_secs(10),
            floor_mib: 16,
            relax_samples: 10,
        }
    }
}

/// A running VM with the pager, as sampled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PagerVm {
    pub id: String,
    /// Guest memory.
    pub memory_mib: u64,
    /// Guest memory's footprint now (its pages in RAM and the pool: what a
    /// target bounds).
    pub footprint_mib: u64,
    /// The pager's RSS target now.
    pub target_mib: Option<u64>,
    /// The balloon's target now, when the VM has a balloon.
    pub balloon_mib: Option<u64>,
}

/// A change to one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// `PATCH /balloon {"amount_mib": N}`.
    Balloon(u64),
    /// `PATCH /vigil/memory {"rss_mib": N}` (`null`: no target).
    Target(Option<u64>),
}

/// What to do to one VM, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Action {
    pub vm: String,
    pub change: Change,
    /// `squeeze` or `relax`.
    pub kind: &'static str,
    pub reason: String,
}

/// What a VM had before it was squeezed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Before {
    target_mib: Option<u64>,
    balloon_mib: Option<u64>,
}

/// The memory-pressure policy's state.
#[derive(Debug)]
pub struct Squeezer {
    settings: SqueezeSettings,
    last_squeeze: Option<Instant>,
    calm_samples: u32,
    before: HashMap<String, Before>,
}

impl Squeezer {
    pub fn new(settings: SqueezeSettings) -> Self {
        Self {
            settings,
            last_squeeze: None,
            calm_samples: 0,
            before: HashMap::new(),
        }
    }

    pub fn settings(&self) -> &SqueezeSettings {
        &self.settings
    }

    /// Whether the next [`Squeezer::observe`] with this pressure may act, so
    /// that the VMs are worth reading.
    pub fn wants_vms(&self, psi: Option<f64>) -> bool {
        psi.is_some_and(|p| p > self.settings.pressure) || !self.before.is_empty()
    }

    /// One sample: the host's memory pressure (none: no PSI on this host)
    /// and the running VMs with the pager; the changes to make.
    pub fn observe(&mut self, now: Instant, psi: Option<f64>, vms: &[PagerVm]) -> Vec<Action> {
        let Some(psi) = psi else {
            return Vec::new();
        };
        let threshold = self.settings.pressure;
        if psi > threshold {
            self.calm_samples = 0;
            if self
                .last_squeeze
                .is_some_and(|t| now.duration_since(t) < self.settings.step)
            {
                return Vec::new();
            }
            let actions: Vec<Action> = vms.iter().filter_map(|vm| self.squeeze(vm, psi)).collect();
            if !actions.is_empty() {
                self.last_squeeze = Some(now);
            }
            return actions;
        }
        if psi >= threshold / 2.0 || self.before.is_empty() {
            self.calm_samples = 0;
            return Vec::new();
        }
        self.calm_samples += 1;
        if self.calm_samples < self.settings.relax_samples {
            return Vec::new();
        }
        self.calm_samples = 0;
        self.last_squeeze = None;
        let before = std::mem::take(&mut self.before);
        let reason = format!(
            "host memory pressure {psi:.1}% under {:.1}% for {} samples",
            threshold / 2.0,
            self.settings.relax_samples
        );
        let mut actions = Vec::new();
        // VMs gone meanwhile are forgotten.
        for vm in vms {
            let Some(b) = before.get(&vm.id) else {
                continue;
            };
            let relax = |change| Action {
                vm: vm.id.clone(),
                change,
                kind: "relax",
                reason: reason.clone(),
            };
            if let (Some(was), Some(now)) = (b.balloon_mib, vm.balloon_mib) {
                if was != now {
                    actions.push(relax(Change::Balloon(was)));
                }
            }
            if b.target_mib != vm.target_mib {
                actions.push(relax(Change::Target(b.target_mib)));
            }
        }
        actions
    }

    /// The next squeeze of `vm`, if it has any left.
    fn squeeze(&mut self, vm: &PagerVm, psi: f64) -> Option<Action> {
        self.before.entry(vm.id.clone()).or_insert(Before {
            target_mib: vm.target_mib,
            balloon_mib: vm.balloon_mib,
        });
        let reason = format!(
            "host memory pressure {psi:.1}% above {:.1}%",
            self.settings.pressure
        );
        let action = |change| Action {
            vm: vm.id.clone(),
            change,
            kind: "squeeze",
            reason: reason.clone(),
        };
        // The balloon first: the guest gives what it can spare, and knows
        // best what that is.
        if let Some(balloon) = vm.balloon_mib {
            let most = vm.memory_mib / 2;
            if balloon < most {
                let next = (balloon + vm.memory_mib.div_ceil(8)).min(most);
                return Some(action(Change::Balloon(next)));
            }
        }
        let keeps = vm
            .target_mib
            .map_or(vm.footprint_mib, |t| t.min(vm.footprint_mib));
        let next = (keeps * 3 / 4).max(self.settings.floor_mib);
        if vm.target_mib.is_some_and(|t| t <= next) {
            return None;
        }
        Some(action(Change::Target(Some(next))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(
        id: &str,
        footprint_mib: u64,
        target_mib: Option<u64>,
        balloon_mib: Option<u64>,
    ) -> PagerVm {
        PagerVm {
            id: id.into(),
            memory_mib: 512,
            footprint_mib,
            target_mib,
            balloon_mib,
        }
    }

    fn changes(actions: &[Action]) -> Vec<(&str, Change)> {
        actions
            .iter()
            .map(|a| (a.vm.as_str(), a.change.clone()))
            .collect()
    }

    #[test]
    fn pressure_lowers_targets_balloons_first_and_relief_gives_them_back() {
        let settings = SqueezeSettings {
            relax_samples: 2,
            ..SqueezeSettings::default()
        };
        let step = settings.step;
        let mut s = Squeezer::new(settings);
        let t0 = Instant::now();
        // No PSI, or calm: nothing.
        let vms = [vm("a", 400, None, None), vm("b", 300, Some(200), Some(0))];
        assert!(s.observe(t0, None, &vms).is_empty());
        assert!(s.observe(t0, Some(5.0), &vms).is_empty());
        assert!(!s.wants_vms(Some(5.0)) && s.wants_vms(Some(25.0)));

        // Pressure: a's target from its footprint; b's balloon first.
        let a = s.observe(t0, Some(25.0), &vms);
        assert_eq!(
            changes(&a),
            [("a", Change::Target(Some(300))), ("b", Change::Balloon(64))]
        );
        assert_eq!(a[0].kind, "squeeze");
        assert_eq!(a[0].reason, "host memory pressure 25.0% above 20.0%");
        // Not again before the step has passed.
        assert!(s.observe(t0 + step / 2, Some(30.0), &vms).is_empty());
        // b's balloon at its most: then its target, from the lower of the two.
        let vms = [
            vm("a", 320, Some(300), None),
            vm("b", 250, Some(200), Some(256)),
        ];
        let a = s.observe(t0 + step, Some(30.0), &vms);
        assert_eq!(
            changes(&a),
            [
                ("a", Change::Target(Some(225))),
                ("b", Change::Target(Some(150)))
            ]
        );
        // At the floor: nothing left to take.
        let floor = [vm("a", 20, Some(16), None)];
        assert!(s.observe(t0 + 3 * step, Some(30.0), &floor).is_empty());

        // Relief: under half the threshold for 2 samples, then back as before.
        let vms = [
            vm("a", 200, Some(225), None),
            vm("b", 150, Some(150), Some(256)),
        ];
        assert!(s.observe(t0 + 4 * step, Some(9.0), &vms).is_empty());
        // Between half and the threshold: not calm yet.
        assert!(s.observe(t0 + 4 * step, Some(15.0), &vms).is_empty());
        assert!(s.observe(t0 + 4 * step, Some(9.0), &vms).is_empty());
        let a = s.observe(t0 + 4 * step, Some(1.0), &vms);
        assert_eq!(
            changes(&a),
            [
                ("a", Change::Target(None)),
                ("b", Change::Balloon(0)),
                ("b", Change::Target(Some(200)))
            ]
        );
        assert_eq!(a[0].kind, "relax");
        assert!(!s.wants_vms(Some(1.0)));
        assert!(s.observe(t0 + 5 * step, Some(1.0), &vms).is_empty());
    }
}
