//! One vCPU: the periodic resource model Γ = (Π, Θ) of Shin & Lee ("Periodic
//! resource model for compositional real-time guarantees", RTSS 2003): Θ units of
//! CPU in every period Π, placed anywhere in it. Its supply bound function, the
//! exact EDF and fixed-priority tests against it, and the smallest Θ for a Π.

use crate::demand::{hyperperiod, DeadlinePoints, DemandLine, Shortfall, Witness, MAX_POINTS};
use crate::model::Task;
use crate::time::Nanos;

/// The least CPU time Γ = (`period`, `budget`) supplies in any interval of length
/// `t` (Shin & Lee 2003, Theorem 1): the worst case is a blackout of 2(Π - Θ) (the
/// budget given at the very start of one period, then at the very end of the
/// next), then Θ at the end of every period.
pub fn sbf(period: Nanos, budget: Nanos, t: u128) -> u128 {
    let (period, budget) = (u128::from(period), u128::from(budget));
    let gap = period - budget;
    let Some(x) = t.checked_sub(gap) else {
        return 0;
    };
    let (periods, into) = (x / period, x % period);
    periods * budget + into.saturating_sub(gap)
}

/// Π·sbf(t) >= Θ·t + offset for every t: the linear bound lsbf(t) = (Θ/Π)(t - 2(Π - Θ)).
fn supply_offset(period: Nanos, budget: Nanos) -> i128 {
    -2 * i128::from(budget) * i128::from(period - budget)
}

/// The smallest budget on the grid from `from` up to Π with sbf(t) >= `demand`;
/// `None` when even Θ = Π (sbf(t) = t) is short.
pub fn least_budget_for(
    period: Nanos,
    t: u128,
    demand: u128,
    resolution: Nanos,
    from: Nanos,
) -> Option<Nanos> {
    if demand > t {
        return None;
    }
    let (mut lo, mut hi) = (from / resolution, period / resolution);
    if sbf(period, lo * resolution, t) >= demand {
        return Some(lo * resolution);
    }
    // sbf grows with Θ; sbf(Π, Π, t) = t >= demand.
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if sbf(period, mid * resolution, t) >= demand {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Some(hi * resolution)
}

/// EDF on Γ = (`period`, Θ): the smallest Θ on the grid with dbf(t) <= sbf(t) for
/// every t (Shin & Lee 2003, Theorem 2; dbf only steps at job deadlines and sbf
/// never decreases, so the deadlines are the points to check). With `fixed`, Θ is
/// that budget and the first point where it falls short is the answer.
///
/// One pass over the deadlines in order: Θ rises to what each deadline needs, and
/// the pass stops where the demand line U·t + Σ(T_i - D_i)U_i falls under the
/// supply line (Θ/Π)(t - 2(Π - Θ)), after which dbf <= lsbf <= sbf for good.
pub fn edf_budget(
    tasks: &[Task],
    period: Nanos,
    resolution: Nanos,
    fixed: Option<Nanos>,
) -> Result<Nanos, Shortfall> {
    let line = DemandLine::edf(tasks);
    let floor = resolution.min(period);
    let mut budget = match fixed {
        Some(b) => b,
        None => line.least_budget(period, resolution, floor).min(period),
    };
    let horizon = |budget: Nanos| -> Result<u128, Shortfall> {
        if let Some(t) = line.crosses_supply(period, budget, supply_offset(period, budget)) {
            return Ok(t);
        }
        if budget == period {
            // A whole CPU and a utilization of 1 (or rounding near it): the
            // schedule repeats every hyperperiod.
            let max_deadline = tasks.iter().map(|t| t.deadline).max().unwrap_or(0);
            if let Some(h) = hyperperiod(tasks, u128::from(MAX_POINTS) * u128::from(period)) {
                return Ok(h + u128::from(max_deadline));
            }
        }
        // Utilization above the supply's share: demand overtakes supply somewhere;
        // the scan below finds where.
        Ok(u128::MAX)
    };
    let mut until = horizon(budget)?;
    let mut demand: u128 = 0;
    let mut points = DeadlinePoints::new(tasks).peekable();
    let mut looked: u64 = 0;
    while let Some((t, task)) = points.next() {
        if t > until {
            break;
        }
        demand += u128::from(tasks[task].wcet);
        // Several deadlines at the same t count together.
        while let Some(&(next, other)) = points.peek() {
            if next != t {
                break;
            }
            demand += u128::from(tasks[other].wcet);
            points.next();
        }
        let supply = sbf(period, budget, t);
        if supply < demand {
            let needed = match fixed {
                Some(_) => None,
                None => least_budget_for(period, t, demand, resolution, budget),
            };
            let Some(needed) = needed else {
                return Err(Shortfall::Demand(Witness {
                    task,
                    t,
                    demand,
                    supply: if fixed.is_some() { supply } else { t },
                }));
            };
            budget = needed;
            until = horizon(budget)?;
        }
        looked += 1;
        if looked > MAX_POINTS {
            return Err(Shortfall::TooLong(format!(
                "EDF with Π={} needs more than {MAX_POINTS} deadlines checked",
                crate::time::display_duration(period)
            )));
        }
    }
    Ok(budget)
}

/// The points where task `i`'s request bound function rbf_i(t) = C_i +
/// Σ_{j of higher priority} ⌈t/T_j⌉ C_j is worth checking, with its value there:
/// every release of a higher-priority task before D_i, and D_i. rbf is constant
/// on each (release, next release], and sbf never decreases, so the right end of
/// each such interval is where supply is largest for that demand.
fn rbf_points(tasks: &[Task], i: usize) -> Result<Vec<(u128, u128)>, Shortfall> {
    let me = &tasks[i];
    let higher: Vec<&Task> = tasks
        .iter()
        .enumerate()
        .filter(|&(j, t)| j != i && t.priority >= me.priority)
        .map(|(_, t)| t)
        .collect();
    let mut heap: std::collections::BinaryHeap<std::cmp::Reverse<(u64, usize)>> = (0..higher.len())
        .map(|j| std::cmp::Reverse((0, j)))
        .collect();
    let deadline = me.deadline;
    let mut released: u128 = 0;
    let mut points = Vec::new();
    while let Some(&std::cmp::Reverse((at, _))) = heap.peek() {
        if at >= deadline {
            break;
        }
        if at > 0 {
            points.push((u128::from(at), u128::from(me.wcet) + released));
        }
        while let Some(&std::cmp::Reverse((same, j))) = heap.peek() {
            if same != at {
                break;
            }
            heap.pop();
            released += u128::from(higher[j].wcet);
            heap.push(std::cmp::Reverse((same + higher[j].period, j)));
        }
        if points.len() as u64 > MAX_POINTS {
            return Err(Shortfall::TooLong(format!(
                "task {:?} has more than {MAX_POINTS} scheduling points",
                me.name
            )));
        }
    }
    points.push((u128::from(deadline), u128::from(me.wcet) + released));
    Ok(points)
}

/// Fixed priorities on Γ = (`period`, Θ): task i meets its deadlines iff some t <=
/// D_i has rbf_i(t) <= sbf(t) (Shin & Lee 2003, Theorem 3, at the scheduling
/// points). The smallest Θ is the largest over the tasks of the smallest Θ that
/// one point of each task needs. With `fixed`, checks that budget.
pub fn fp_budget(
    tasks: &[Task],
    period: Nanos,
    resolution: Nanos,
    fixed: Option<Nanos>,
) -> Result<Nanos, Shortfall> {
    let mut budget = fixed.unwrap_or(resolution.min(period));
    let mut order: Vec<usize> = (0..tasks.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(tasks[i].priority));
    for i in order {
        let points = rbf_points(tasks, i)?;
        if points
            .iter()
            .any(|&(t, demand)| demand <= sbf(period, budget, t))
        {
            continue;
        }
        let (t, demand) = points[points.len() - 1];
        let shortfall = |supply| {
            Shortfall::Demand(Witness {
                task: i,
                t,
                demand,
                supply,
            })
        };
        if fixed.is_some() {
            return Err(shortfall(sbf(period, budget, t)));
        }
        budget = points
            .iter()
            .filter_map(|&(t, demand)| least_budget_for(period, t, demand, resolution, budget))
            .min()
            .ok_or_else(|| shortfall(t))?;
    }
    Ok(budget)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sbf_shape() {
        // Π = 10, Θ = 4: blackout 12, then 4 at the end of every period.
        let values: Vec<u128> = (0..=30).map(|t| sbf(10, 4, t)).collect();
        assert_eq!(&values[..13], &[0; 13]);
        assert_eq!(&values[13..17], &[1, 2, 3, 4]);
        assert_eq!(&values[17..23], &[4; 6]);
        assert_eq!(&values[23..27], &[5, 6, 7, 8]);
        assert_eq!(sbf(10, 10, 37), 37);
        assert_eq!(sbf(10, 0, 1000), 0);
    }

    #[test]
    fn one_task_on_its_own_period() {
        // A task (T=10, C=2) on Π=10 needs 2(10-Θ) + 2 <= 10: Θ=6.
        let tasks = [Task::new("a", 10, 10, 2)];
        assert_eq!(edf_budget(&tasks, 10, 1, None), Ok(6));
        assert_eq!(fp_budget(&tasks, 10, 1, None), Ok(6));
        // Π=5: sbf(10) = Θ + max(0, 2 - (5 - Θ)) >= 2 → Θ = 2.
        assert_eq!(edf_budget(&tasks, 5, 1, None), Ok(2));
        let shortfall = edf_budget(&tasks, 10, 1, Some(5)).unwrap_err();
        assert_eq!(
            shortfall,
            Shortfall::Demand(Witness {
                task: 0,
                t: 10,
                demand: 2,
                supply: 0
            })
        );
    }

    #[test]
    fn infeasible_even_with_the_whole_cpu() {
        let tasks = [Task::new("a", 10, 10, 6), Task::new("b", 10, 10, 5)];
        let Err(Shortfall::Demand(w)) = edf_budget(&tasks, 5, 1, None) else {
            panic!("two tasks of 110% fit one CPU");
        };
        assert_eq!((w.t, w.demand, w.supply), (10, 11, 10));
    }
}
