//! The one-vCPU analysis against the brute-force reference: random small task sets
//! (fixed seed), EDF and fixed priorities, simulated tick by tick on the worst-case
//! supply of the periodic resource.

use vigil_rt::demand::Shortfall;
use vigil_rt::model::{deadline_monotonic, Scheduler, Task};
use vigil_rt::prm;
use vigil_rt::reference::{first_miss, least_supply_per_window, worst_case_supply, Rng};
use vigil_rt::time::lcm_within;

fn random_tasks(rng: &mut Rng) -> Vec<Task> {
    let n = rng.range(1, 4);
    let mut tasks: Vec<Task> = (0..n)
        .map(|i| {
            let period = rng.range(3, 20);
            let deadline = rng.range(period.div_ceil(2), period);
            let wcet = rng.range(1, (deadline / 2).max(1));
            Task::new(&format!("t{i}"), period, deadline, wcet)
        })
        .collect();
    deadline_monotonic(&mut tasks);
    tasks
}

/// Ticks that cover the schedule's repetition: the hyperperiod and Π, twice, and
/// the blackout and the longest deadline.
fn horizon(tasks: &[Task], period: u64) -> u64 {
    let h = tasks
        .iter()
        .try_fold(u128::from(period), |h, t| {
            lcm_within(h, u128::from(t.period), 1 << 20)
        })
        .expect("small hyperperiod");
    let longest = tasks.iter().map(|t| t.deadline).max().unwrap();
    2 * h as u64 + 2 * period + longest
}

fn budget(
    tasks: &[Task],
    scheduler: Scheduler,
    period: u64,
    fixed: Option<u64>,
) -> Result<u64, Shortfall> {
    match scheduler {
        Scheduler::Edf => prm::edf_budget(tasks, period, 1, fixed),
        Scheduler::Fp => prm::fp_budget(tasks, period, 1, fixed),
    }
}

#[test]
fn least_budget_agrees_with_simulation() {
    let mut rng = Rng(0x5eed_0fc0_ffee);
    let mut checked = 0;
    for case in 0..1500 {
        let tasks = random_tasks(&mut rng);
        let shortest = tasks.iter().map(|t| t.period).min().unwrap();
        let period = rng.range(1, shortest);
        let ticks = horizon(&tasks, period);
        for scheduler in [Scheduler::Edf, Scheduler::Fp] {
            let what = format!("case {case} {scheduler:?} Π={period} {tasks:?}");
            match budget(&tasks, scheduler, period, None) {
                Ok(theta) => {
                    let supply = worst_case_supply(period, theta, ticks);
                    assert_eq!(
                        first_miss(&tasks, scheduler, &supply),
                        None,
                        "Θ={theta} misses: {what}"
                    );
                    // Θ-1: the analysis names an interval, and the simulation misses
                    // a deadline by then.
                    if theta > 1 {
                        let Err(Shortfall::Demand(w)) =
                            budget(&tasks, scheduler, period, Some(theta - 1))
                        else {
                            panic!("Θ-1={} accepted: {what}", theta - 1);
                        };
                        let longer = ticks.max(w.t as u64 + 1);
                        let supply = worst_case_supply(period, theta - 1, longer);
                        let miss = first_miss(&tasks, scheduler, &supply);
                        assert!(
                            miss.is_some_and(|(_, at)| u128::from(at) <= w.t),
                            "Θ-1={} fails at t={} by analysis, simulation says {miss:?}: {what}",
                            theta - 1,
                            w.t
                        );
                    }
                    checked += 1;
                }
                Err(Shortfall::Demand(w)) => {
                    // Not schedulable even with the whole CPU: the simulation misses too.
                    let supply = worst_case_supply(period, period, ticks.max(w.t as u64 + 1));
                    assert!(first_miss(&tasks, scheduler, &supply).is_some(), "{what}");
                    assert!(w.demand > w.supply);
                }
                Err(Shortfall::TooLong(why)) => panic!("{why}: {what}"),
            }
        }
    }
    assert!(checked > 2000, "only {checked} schedulable cases");
}

fn ticks(supply: &[bool]) -> Vec<u64> {
    supply.iter().map(|&s| u64::from(s)).collect()
}

#[test]
fn sbf_is_the_least_supply_of_any_periodic_pattern() {
    let mut rng = Rng(0xdead_beef_1234);
    for _ in 0..300 {
        let period = rng.range(1, 12);
        let budget = rng.range(0, period);
        let periods = 12;
        // Θ ticks placed at random in each period.
        let mut supply = Vec::new();
        for _ in 0..periods {
            let mut slots = vec![false; period as usize];
            let mut placed = 0;
            while placed < budget {
                let s = rng.range(0, period - 1) as usize;
                if !slots[s] {
                    slots[s] = true;
                    placed += 1;
                }
            }
            supply.extend(slots);
        }
        let longest = (6 * period) as usize;
        let least = least_supply_per_window(&ticks(&supply), longest);
        for (t, &l) in least.iter().enumerate() {
            assert!(
                u128::from(l) >= prm::sbf(period, budget, t as u128),
                "Π={period} Θ={budget} t={t}"
            );
        }
        // The worst case pattern reaches sbf at every length.
        let worst = worst_case_supply(period, budget, periods * period);
        let least = least_supply_per_window(&ticks(&worst), longest);
        for (t, &l) in least.iter().enumerate() {
            assert_eq!(
                u128::from(l),
                prm::sbf(period, budget, t as u128),
                "Π={period} Θ={budget} t={t}"
            );
        }
        // More budget never supplies less.
        if budget < period {
            for t in 0..longest as u128 {
                assert!(prm::sbf(period, budget + 1, t) >= prm::sbf(period, budget, t));
            }
        }
    }
}
