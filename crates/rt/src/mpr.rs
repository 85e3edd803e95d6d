//! Several vCPUs: the multiprocessor periodic resource model μ = ⟨Π, Θ, m'⟩ of
//! Shin, Easwaran & Lee ("Hierarchical scheduling framework for virtual clustering
//! of multiprocessors", ECRTS 2008; extended as Easwaran, Shin & Lee, "Optimal
//! virtual cluster-based multiprocessor scheduling", Real-Time Systems 43, 2009):
//! Θ units of CPU in every period Π, on at most m' CPUs at once. Its supply bound
//! function, the global EDF test of tasks on it, the smallest Θ, and the m'
//! periodic vCPU servers that supply it.

use crate::demand::{DeadlinePoints, DemandLine, Shortfall, Witness, MAX_POINTS};
use crate::model::Task;
use crate::time::Nanos;

/// The least supply of μ = ⟨`period`, `budget`, `cpus`⟩ in any interval of length
/// `t` (RTS 2009, Section 3.2, Definition 1): with α = ⌊Θ/m'⌋, β = Θ - m'α,
/// t' = t - (Π - ⌈Θ/m'⌉), x = t' - Π⌊t'/Π⌋ and y = Π - α,
/// sbf = ⌊t'/Π⌋Θ + max(0, m'x - (m'Π - Θ)) - (x ∈ [1, y] ? 0 : m' - β), and 0 for
/// t' < 0. Time is in whole ticks (here nanoseconds), as the paper's is. The
/// formula assumes Θ >= m' (a tick per CPU): below that it is not monotone, and
/// the searches never go there.
pub fn sbf(period: Nanos, budget: Nanos, cpus: u32, t: u128) -> u128 {
    if budget == 0 {
        return 0;
    }
    let (p, b, m) = (u128::from(period), u128::from(budget), u128::from(cpus));
    if b == m * p {
        // Whole CPUs: the formula would still take m' off at period boundaries.
        return m * t;
    }
    let alpha = b / m;
    let beta = b - m * alpha;
    let Some(shifted) = t.checked_sub(p - b.div_ceil(m)) else {
        return 0;
    };
    let (periods, x) = (shifted / p, shifted % p);
    let y = p - alpha;
    let supply = periods * b + (m * x).saturating_sub(m * p - b);
    if (1..=y).contains(&x) {
        supply
    } else {
        supply.saturating_sub(m - beta)
    }
}

/// The largest K with Π·sbf(t) >= Θ·t + K for every t, the linear bound the
/// search stops at. sbf - (Θ/Π)t repeats every period of t' and is piecewise
/// linear with slopes 0 and m' >= Θ/Π, so its least value is at one of the
/// breakpoints of the first two periods.
fn supply_offset(period: Nanos, budget: Nanos, cpus: u32) -> i128 {
    let (p, b, m) = (u128::from(period), u128::from(budget), u128::from(cpus));
    let shift = p - b.div_ceil(m);
    let rise = p - b.div_ceil(m);
    let y = p - b / m;
    let mut least = 0i128;
    for j in 0..2u128 {
        for x in [0, 1, 2, rise, rise + 1, y, y + 1, y + 2, p - 1] {
            for t in [x, x.saturating_sub(1)] {
                let t = shift + j * p + t;
                let value = (p * sbf(period, budget, cpus, t)) as i128 - (b * t) as i128;
                least = least.min(value);
            }
        }
    }
    least
}

/// The global EDF demand of task k's job in an interval of length t = A_k + D_k
/// (RTS 2009, Section 4.2, Theorem 1, after Bertogna et al.'s interference bound):
/// DEM = m'C_k + Σ Î_i + the m'-1 largest (Ī_i - Î_i), where Î_i bounds task i's
/// interference without carry-in and Ī_i with it.
fn demand(tasks: &[Task], k: usize, t: u128, cpus: u32, diffs: &mut Vec<u128>) -> u128 {
    let me = &tasks[k];
    let (c_k, a_k) = (u128::from(me.wcet), t - u128::from(me.deadline));
    let mut sum = 0;
    diffs.clear();
    for (i, task) in tasks.iter().enumerate() {
        let (period, c) = (u128::from(task.period), u128::from(task.wcet));
        // W_i(t) = ⌊(t + T_i - D_i)/T_i⌋C_i + CI_i(t), CI_i(t) = min(C_i, max(0, t - ⌊…⌋T_i)).
        let jobs = (t + period - u128::from(task.deadline)) / period;
        let whole = jobs * c;
        let carry = t.saturating_sub(jobs * period).min(c);
        let (hat, bar) = if i == k {
            ((whole - c_k).min(a_k), (whole + carry - c_k).min(a_k))
        } else {
            (whole.min(t - c_k), (whole + carry).min(t - c_k))
        };
        sum += hat;
        diffs.push(bar - hat);
    }
    let top = (cpus as usize).saturating_sub(1).min(diffs.len());
    if top > 0 && top < diffs.len() {
        diffs.select_nth_unstable_by(top - 1, |a, b| b.cmp(a));
    }
    sum + diffs[..top].iter().sum::<u128>() + u128::from(cpus) * c_k
}

/// Global EDF of `tasks` on μ = ⟨`period`, `budget`, `cpus`⟩ (RTS 2009, Section
/// 4.2, Theorems 1 and 2): DEM(A_k + D_k) <= sbf(A_k + D_k) for every task k and
/// every A_k up to the bound past which the demand line lies under the linear
/// supply. DEM only jumps at job deadlines and between them neither DEM nor sbf
/// decreases, so an interval [a, b] is clear when DEM(b) <= sbf(a); where that
/// does not settle it the interval is split down to single ticks, which makes the
/// check exact on the integer time grid.
pub fn gedf_check(
    tasks: &[Task],
    period: Nanos,
    budget: Nanos,
    cpus: u32,
) -> Result<(), Shortfall> {
    let mut largest: Vec<u128> = tasks.iter().map(|t| u128::from(t.wcet)).collect();
    largest.sort_unstable_by(|a, b| b.cmp(a));
    let c_sum: u128 = largest.iter().take(cpus as usize - 1).sum();
    let line = DemandLine::edf(tasks);
    let offset = supply_offset(period, budget, cpus);
    let mut diffs = Vec::with_capacity(tasks.len());
    let mut looked: u64 = 0;
    for (k, task) in tasks.iter().enumerate() {
        let extra = c_sum + u128::from(cpus - 1) * u128::from(task.wcet);
        let until = line
            .plus(extra)
            .crosses_supply(period, budget, offset)
            .unwrap_or(u128::MAX);
        let start = u128::from(task.deadline);
        let mut jumps = DeadlinePoints::new(tasks)
            .map(|(t, _)| t)
            .filter(|&t| t > start);
        let mut from = start;
        while from <= until {
            let to = jumps
                .next()
                .map_or(u128::MAX, |next| next - 1)
                .min(until.max(start));
            let mut pending = vec![(from, to)];
            while let Some((lo, hi)) = pending.pop() {
                looked += 1;
                if looked > MAX_POINTS {
                    return Err(Shortfall::TooLong(format!(
                        "global EDF on ⟨{}, {}, {cpus}⟩ needs more than {MAX_POINTS} intervals checked",
                        crate::time::display_duration(period),
                        crate::time::display_duration(budget)
                    )));
                }
                let dem = demand(tasks, k, hi, cpus, &mut diffs);
                if dem <= sbf(period, budget, cpus, lo) {
                    continue;
                }
                if lo == hi {
                    return Err(Shortfall::Demand(Witness {
                        task: k,
                        t: lo,
                        demand: dem,
                        supply: sbf(period, budget, cpus, lo),
                    }));
                }
                let mid = lo + (hi - lo) / 2;
                // Earlier intervals first, so the witness is the first failure.
                pending.push((mid + 1, hi));
                pending.push((lo, mid));
            }
            if to == u128::MAX {
                break;
            }
            from = to + 1;
        }
    }
    Ok(())
}

/// The smallest budget on the grid for which [`gedf_check`] passes with `cpus`
/// vCPUs of period `period`, by binary search between the utilization and m'Π.
pub fn gedf_budget(
    tasks: &[Task],
    period: Nanos,
    resolution: Nanos,
    cpus: u32,
) -> Result<Nanos, Shortfall> {
    let most = period * u64::from(cpus);
    gedf_check(tasks, period, most, cpus)?;
    let least =
        DemandLine::edf(tasks).least_budget(period, resolution, u64::from(cpus).max(resolution));
    let (mut lo, mut hi) = (least / resolution, most / resolution);
    if lo >= hi {
        return Ok(most);
    }
    if gedf_check(tasks, period, lo * resolution, cpus).is_ok() {
        return Ok(lo * resolution);
    }
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        match gedf_check(tasks, period, mid * resolution, cpus) {
            Ok(()) => hi = mid,
            Err(Shortfall::Demand(_)) => lo = mid,
            Err(e @ Shortfall::TooLong(_)) => return Err(e),
        }
    }
    Ok(hi * resolution)
}

/// The m' periodic servers (budget per period Π) that supply μ = ⟨Π, Θ, m'⟩ (ECRTS
/// 2008, Section 5.2, Definition 1; RTS 2009, Section 5): with α = ⌊Θ/m'⌋ and
/// β = Θ - m'α, β servers of budget α + 1 and m' - β of budget α (in ticks, here
/// nanoseconds). Together they give Θ every period.
pub fn servers(budget: Nanos, cpus: u32) -> Vec<Nanos> {
    let m = u64::from(cpus);
    let (alpha, beta) = (budget / m, budget % m);
    (0..m)
        .map(|j| if j < beta { alpha + 1 } else { alpha })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sbf_of_one_cpu_is_close_to_the_prm() {
        // m' = 1 is the PRM but for the tick lost at period boundaries.
        for t in 0..60u128 {
            let mpr = sbf(10, 4, 1, t);
            let prm = crate::prm::sbf(10, 4, t);
            assert!(mpr <= prm && prm <= mpr + 1, "t={t}: {mpr} vs {prm}");
        }
    }

    #[test]
    fn supply_offset_bounds_sbf() {
        for (p, m) in [(10u64, 2u32), (7, 3), (12, 4), (5, 2)] {
            for b in u64::from(m)..=p * u64::from(m) {
                let k = supply_offset(p, b, m);
                for t in 0..(6 * p) as u128 {
                    let value = i128::try_from(u128::from(p) * sbf(p, b, m, t)).unwrap()
                        - i128::try_from(u128::from(b) * t).unwrap();
                    assert!(value >= k, "⟨{p},{b},{m}⟩ t={t}: {value} < {k}");
                }
            }
        }
    }

    #[test]
    fn servers_split_the_budget() {
        assert_eq!(servers(10, 3), vec![4, 3, 3]);
        assert_eq!(servers(9, 3), vec![3, 3, 3]);
        assert_eq!(servers(11, 3), vec![4, 4, 3]);
    }
}
