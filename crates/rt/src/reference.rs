//! The brute-force reference the analysis is checked against (tests and `vigil
//! bench rt-analyze`): the worst-case supply pattern of a periodic resource laid out
//! tick by tick, and EDF or fixed-priority scheduling of the synchronous periodic
//! task set simulated on it, one tick at a time.

use crate::model::{Scheduler, Task};
use crate::time::Nanos;

/// The supply that sbf describes, from time 0: nothing for 2(Π - Θ), then Θ at the
/// end of every period. `true` where tick `[s, s+1)` is supplied.
pub fn worst_case_supply(period: u64, budget: u64, ticks: u64) -> Vec<bool> {
    let gap = period - budget;
    (0..ticks)
        .map(|s| match s.checked_sub(gap) {
            None => false,
            Some(x) => x % period >= gap,
        })
        .collect()
}

/// The first deadline miss of the synchronous periodic `tasks` (times in ticks)
/// scheduled by `scheduler` on `supply`: (task, deadline); `None` when every job
/// due within the supply's length meets its deadline.
pub fn first_miss(tasks: &[Task], scheduler: Scheduler, supply: &[bool]) -> Option<(usize, u64)> {
    struct Job {
        task: usize,
        deadline: u64,
        left: u64,
    }
    let mut jobs: Vec<Job> = Vec::new();
    for (now, &supplied) in supply.iter().enumerate() {
        let now = now as u64;
        for (i, task) in tasks.iter().enumerate() {
            if now.is_multiple_of(task.period) {
                jobs.push(Job {
                    task: i,
                    deadline: now + task.deadline,
                    left: task.wcet,
                });
            }
        }
        if let Some(missed) = jobs.iter().find(|j| j.deadline <= now) {
            return Some((missed.task, missed.deadline));
        }
        if supplied {
            let next = match scheduler {
                Scheduler::Edf => jobs.iter_mut().min_by_key(|j| (j.deadline, j.task)),
                Scheduler::Fp => jobs
                    .iter_mut()
                    .min_by_key(|j| (std::cmp::Reverse(tasks[j.task].priority), j.deadline)),
            };
            if let Some(job) = next {
                job.left -= 1;
            }
        }
        jobs.retain(|j| j.left > 0);
    }
    let end = supply.len() as u64;
    jobs.iter()
        .find(|j| j.deadline <= end)
        .map(|j| (j.task, j.deadline))
}

/// The least supply of `supply` (CPUs supplied per tick) over every window of each
/// length 0..=`longest` that fits in it.
pub fn least_supply_per_window(supply: &[u64], longest: usize) -> Vec<u64> {
    let mut prefix = vec![0u64; supply.len() + 1];
    for (i, &s) in supply.iter().enumerate() {
        prefix[i + 1] = prefix[i] + s;
    }
    (0..=longest.min(supply.len()))
        .map(|len| {
            (0..=supply.len() - len)
                .map(|start| prefix[start + len] - prefix[start])
                .min()
                .unwrap_or(0)
        })
        .collect()
}

/// xorshift64*: reproducible random cases for the tests and the benchmark without a
/// dependency.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform enough in `lo..=hi` for small ranges.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }
}

/// The smallest budget on the grid (multiples of `resolution` ticks, up to Π) with
/// which the simulation on the worst-case supply misses nothing up to `ticks`.
pub fn least_budget_by_simulation(
    tasks: &[Task],
    scheduler: Scheduler,
    period: Nanos,
    resolution: Nanos,
    ticks: u64,
) -> Option<Nanos> {
    (1..=period / resolution)
        .map(|k| k * resolution)
        .find(|&budget| {
            first_miss(tasks, scheduler, &worst_case_supply(period, budget, ticks)).is_none()
        })
}

/// The first deadline miss of the synchronous periodic `tasks` under global EDF on
/// several CPUs, CPU `c` available in the ticks where `supplies[c]` is `true`;
/// a job runs on at most one CPU at a time.
pub fn first_miss_global_edf(tasks: &[Task], supplies: &[Vec<bool>]) -> Option<(usize, u64)> {
    let ticks = supplies.iter().map(Vec::len).min().unwrap_or(0);
    // (deadline, task, work left)
    let mut jobs: Vec<(u64, usize, u64)> = Vec::new();
    for now in 0..ticks as u64 {
        for (i, task) in tasks.iter().enumerate() {
            if now.is_multiple_of(task.period) {
                jobs.push((now + task.deadline, i, task.wcet));
            }
        }
        if let Some(&(deadline, task, _)) = jobs.iter().find(|j| j.0 <= now) {
            return Some((task, deadline));
        }
        let cpus = supplies.iter().filter(|s| s[now as usize]).count();
        jobs.sort_unstable();
        for job in jobs.iter_mut().take(cpus) {
            job.2 -= 1;
        }
        jobs.retain(|j| j.2 > 0);
    }
    jobs.iter()
        .find(|j| j.0 <= ticks as u64)
        .map(|&(deadline, task, _)| (task, deadline))
}
