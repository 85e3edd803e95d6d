//! What the analyses share: the verdict types, the point budget, and the linear
//! bound past which demand can no longer overtake supply.

use crate::model::Task;
use crate::time::{lcm_within, Nanos};

/// Where demand overtakes supply: the interval length `t`, the work due in it, the
/// work the resource is sure to deliver, and the task that names the interval.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Witness {
    pub task: usize,
    pub t: u128,
    pub demand: u128,
    pub supply: u128,
}

/// Why no budget works.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Shortfall {
    /// Even the whole resource (Θ = Π, or Θ = m'Π) falls short here.
    Demand(Witness),
    /// The analysis would have to look at more points than it may.
    TooLong(String),
}

/// The most interval lengths one analysis looks at before it gives up: keeps every
/// input to seconds of work.
pub const MAX_POINTS: u64 = 50_000_000;

/// Fixed-point scale of utilizations: 2^32.
const SCALE_BITS: u32 = 32;

/// An upper line on demand: demand(t) <= (slope·t + offset) / 2^32, every term
/// rounded up so that the line stays above the exact one.
#[derive(Clone, Copy, Debug)]
pub struct DemandLine {
    slope: u128,
    offset: u128,
}

impl DemandLine {
    /// dbf(t) <= Σ C_i (t + T_i - D_i) / T_i = U·t + Σ (T_i - D_i) U_i.
    pub fn edf(tasks: &[Task]) -> DemandLine {
        let mut line = DemandLine {
            slope: 0,
            offset: 0,
        };
        for task in tasks {
            let u = scaled_share(task.wcet, task.period);
            line.slope += u;
            line.offset += u * u128::from(task.period - task.deadline);
        }
        line
    }

    /// The same line raised by a constant amount of work.
    pub fn plus(self, work: u128) -> DemandLine {
        DemandLine {
            slope: self.slope,
            offset: self.offset + (work << SCALE_BITS),
        }
    }

    /// The t from which the demand line lies under a supply line with
    /// `period`·sbf(t) >= `budget`·t + `supply_offset`; `None` when it never
    /// does (the budget's share of the period is not above the utilization) or
    /// the numbers are too large.
    pub fn crosses_supply(self, period: Nanos, budget: Nanos, supply_offset: i128) -> Option<u128> {
        let period = i128::from(period);
        let slope_gap = (i128::from(budget) << SCALE_BITS)
            .checked_sub(period.checked_mul(i128::try_from(self.slope).ok()?)?)?;
        if slope_gap <= 0 {
            return None;
        }
        let need = period
            .checked_mul(i128::try_from(self.offset).ok()?)?
            .checked_sub(supply_offset.checked_mul(1 << SCALE_BITS)?)?;
        if need <= 0 {
            return Some(0);
        }
        Some((need as u128).div_ceil(slope_gap as u128))
    }

    /// The smallest budget on the grid whose share of `period` is above this line's
    /// slope (a necessary condition for any bound), at least `floor`.
    pub fn least_budget(self, period: Nanos, resolution: Nanos, floor: Nanos) -> Nanos {
        let over = (u128::from(period) * self.slope) >> SCALE_BITS;
        let least = u64::try_from(over + 1).unwrap_or(u64::MAX);
        least
            .div_ceil(resolution)
            .saturating_mul(resolution)
            .max(floor)
    }
}

/// C/T scaled by 2^32, rounded up.
fn scaled_share(wcet: Nanos, period: Nanos) -> u128 {
    (u128::from(wcet) << SCALE_BITS).div_ceil(u128::from(period))
}

/// The hyperperiod of the tasks, when it is at most `limit`.
pub fn hyperperiod(tasks: &[Task], limit: u128) -> Option<u128> {
    tasks
        .iter()
        .try_fold(1u128, |h, t| lcm_within(h, u128::from(t.period), limit))
}

/// The synchronous job deadlines of `tasks` in increasing order, each with the
/// task whose job it is: the points where dbf steps.
pub struct DeadlinePoints<'a> {
    tasks: &'a [Task],
    heap: std::collections::BinaryHeap<std::cmp::Reverse<(u128, usize)>>,
}

impl<'a> DeadlinePoints<'a> {
    pub fn new(tasks: &'a [Task]) -> DeadlinePoints<'a> {
        let heap = tasks
            .iter()
            .enumerate()
            .map(|(i, t)| std::cmp::Reverse((u128::from(t.deadline), i)))
            .collect();
        DeadlinePoints { tasks, heap }
    }
}

impl Iterator for DeadlinePoints<'_> {
    type Item = (u128, usize);

    fn next(&mut self) -> Option<(u128, usize)> {
        let std::cmp::Reverse((t, i)) = self.heap.pop()?;
        self.heap
            .push(std::cmp::Reverse((t + u128::from(self.tasks[i].period), i)));
        Some((t, i))
    }
}
