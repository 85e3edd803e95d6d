//! A VM's interface: the period Π, budget Θ and vCPU count m' with the least
//! bandwidth Θ/Π that keeps its tasks schedulable, found over candidate periods.

use crate::demand::{Shortfall, Witness};
use crate::model::{Host, Scheduler, Vm};
use crate::time::Nanos;
use crate::{mpr, prm};

/// How many candidate periods one vCPU tries, and how many several vCPUs try (each
/// global EDF check costs far more).
const MAX_CANDIDATES: usize = 48;
const MAX_MPR_CANDIDATES: usize = 8;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Interface {
    pub period: Nanos,
    pub budget: Nanos,
    pub vcpus: u32,
    /// Each vCPU's runtime per period (one entry for one vCPU).
    pub servers: Vec<Nanos>,
}

/// Why a VM has no interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NoInterface {
    /// With the whole of `vcpus` vCPUs of period `period`, task `witness.task` still
    /// misses at `witness.t`.
    Demand {
        period: Nanos,
        budget: Nanos,
        vcpus: u32,
        witness: Witness,
        /// Fixed priorities on one vCPU only: more were allowed but not analysed.
        fp_single: bool,
    },
    TooLong(String),
}

/// The candidate interface periods for `vm`: its own `period` when it gives one;
/// else, between `host.min_period` and the shortest deadline (both on the
/// resolution grid), that deadline divided by 1 to 32, and the divisors of the
/// shortest period in that range (periods that divide a task's period waste no
/// supply at its deadlines), at most 48, the longest first.
pub fn candidate_periods(vm: &Vm, host: &Host) -> Vec<Nanos> {
    if let Some(period) = vm.period {
        return vec![period];
    }
    let res = host.resolution;
    let shortest_deadline = vm.tasks.iter().map(|t| t.deadline).min().unwrap_or(res);
    let lo = host.min_period;
    let hi = (shortest_deadline / res * res).max(lo);
    let mut periods = vec![hi];
    periods.extend((2..=32u64).map(|k| hi / k / res * res).filter(|&p| p >= lo));
    let shortest_period = vm.tasks.iter().map(|t| t.period).min().unwrap_or(res);
    if shortest_period.is_multiple_of(res) {
        let units = shortest_period / res;
        let mut d = 1;
        while d * d <= units {
            if units.is_multiple_of(d) {
                periods.extend(
                    [d * res, units / d * res]
                        .into_iter()
                        .filter(|p| (lo..=hi).contains(p)),
                );
            }
            d += 1;
        }
    }
    periods.sort_unstable_by(|a, b| b.cmp(a));
    periods.dedup();
    periods.truncate(MAX_CANDIDATES);
    periods
}

/// Θ1/Π1 < Θ2/Π2, or equal with the longer period (fewer switches).
fn better(a: (Nanos, Nanos), b: (Nanos, Nanos)) -> bool {
    let (lhs, rhs) = (
        u128::from(a.1) * u128::from(b.0),
        u128::from(b.1) * u128::from(a.0),
    );
    lhs < rhs || (lhs == rhs && a.0 > b.0)
}

/// Every `step`th of `periods`, at most `most` of them, the first always.
fn thin(periods: &[Nanos], most: usize) -> Vec<Nanos> {
    let step = periods.len().div_ceil(most).max(1);
    periods.iter().step_by(step).copied().collect()
}

/// The least-bandwidth interface of `vm`: one vCPU (the periodic resource model)
/// if that works; else, under EDF, the fewest vCPUs m' (from ⌈U⌉, at least 2, up to
/// `max_vcpus`) for which some candidate period passes the global EDF test on an
/// MPR, with the least bandwidth among those periods.
pub fn find_interface(vm: &Vm, host: &Host) -> Result<Interface, NoInterface> {
    let periods = candidate_periods(vm, host);
    let res = host.resolution;
    let mut best: Option<(Nanos, Nanos)> = None;
    let mut first_failure = None;
    for &period in &periods {
        let found = match vm.scheduler {
            Scheduler::Edf => prm::edf_budget(&vm.tasks, period, res, None),
            Scheduler::Fp => prm::fp_budget(&vm.tasks, period, res, None),
        };
        match found {
            Ok(budget) => {
                if best.is_none_or(|b| better((period, budget), b)) {
                    best = Some((period, budget));
                }
            }
            Err(Shortfall::TooLong(why)) => return Err(NoInterface::TooLong(why)),
            Err(Shortfall::Demand(witness)) => {
                first_failure.get_or_insert(NoInterface::Demand {
                    period,
                    budget: period,
                    vcpus: 1,
                    witness,
                    fp_single: vm.scheduler == Scheduler::Fp && vm.max_vcpus > 1,
                });
            }
        }
    }
    if let Some((period, budget)) = best {
        return Ok(Interface {
            period,
            budget,
            vcpus: 1,
            servers: vec![budget],
        });
    }
    if vm.scheduler == Scheduler::Fp {
        return Err(first_failure.unwrap_or(NoInterface::TooLong("no candidate period".into())));
    }
    let utilization_ceiling = vm
        .tasks
        .iter()
        .map(|t| (u128::from(t.wcet) << 32).div_ceil(u128::from(t.period)))
        .sum::<u128>()
        .div_ceil(1 << 32);
    let fewest = u32::try_from(utilization_ceiling)
        .unwrap_or(u32::MAX)
        .max(2);
    let periods = thin(&periods, MAX_MPR_CANDIDATES);
    for cpus in fewest..=vm.max_vcpus {
        let mut best: Option<(Nanos, Nanos)> = None;
        for &period in &periods {
            match mpr::gedf_budget(&vm.tasks, period, res, cpus) {
                Ok(budget) => {
                    if best.is_none_or(|b| better((period, budget), b)) {
                        best = Some((period, budget));
                    }
                }
                Err(Shortfall::TooLong(why)) => return Err(NoInterface::TooLong(why)),
                Err(Shortfall::Demand(witness)) => {
                    if cpus == vm.max_vcpus && period == periods[0] {
                        first_failure = Some(NoInterface::Demand {
                            period,
                            budget: period * u64::from(cpus),
                            vcpus: cpus,
                            witness,
                            fp_single: false,
                        });
                    }
                }
            }
        }
        if let Some((period, budget)) = best {
            return Ok(Interface {
                period,
                budget,
                vcpus: cpus,
                servers: mpr::servers(budget, cpus),
            });
        }
    }
    Err(first_failure.unwrap_or(NoInterface::TooLong("no candidate period".into())))
}
