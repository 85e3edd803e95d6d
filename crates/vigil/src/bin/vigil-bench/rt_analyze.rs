//! `vigil bench rt-analyze`: how long `vigil rt analyze`'s analysis takes on random
//! task sets of 10, 100 and 1000 tasks, beside the brute-force reference (tick-by-tick
//! simulation on the worst-case supply) where the hyperperiod keeps it feasible.

use std::time::Instant;

use clap::Args;
use vigil_rt::interface::find_interface;
use vigil_rt::model::{deadline_monotonic, Host, Scheduler, System, Task, Vm};
use vigil_rt::reference::{first_miss, worst_case_supply, Rng};
use vigil_rt::time::{gcd, NS_PER_MS, NS_PER_US};

use crate::peers::median;

#[derive(Args, Debug)]
pub struct RtBenchArgs {
    /// Rounds per task set; the tables give medians.
    #[arg(long, default_value_t = 10, value_name = "N")]
    rounds: usize,
    /// Seed of the task-set generator.
    #[arg(long, default_value_t = 12, value_name = "N")]
    seed: u64,
    /// The most simulated ticks (tick × task) the brute force may take per VM.
    #[arg(long, default_value_t = 200_000_000, value_name = "N")]
    brute_force_limit: u64,
}

#[derive(Clone, Copy)]
enum Periods {
    /// Whole milliseconds from 2 to 100.
    Random,
    /// 5, 10, 20, 40 or 80 ms.
    Harmonic,
}

/// `tasks` tasks over `vms` VMs (alternately EDF and FP), each VM at about 0.4 of
/// a CPU in tasks; a host with a core per VM.
fn system(rng: &mut Rng, tasks: usize, vms: usize, periods: Periods) -> System {
    let per_vm = tasks / vms;
    let vms = (0..vms)
        .map(|v| {
            let mut tasks: Vec<Task> = (0..per_vm)
                .map(|i| {
                    let period = match periods {
                        Periods::Random => rng.range(2, 100) * NS_PER_MS,
                        Periods::Harmonic => (5 << rng.range(0, 4)) * NS_PER_MS,
                    };
                    // About 0.4 / per_vm of the period, in whole microseconds.
                    let share = rng.range(200, 600) as u128;
                    let wcet = (u128::from(period) * share / 1000 / per_vm as u128) as u64;
                    let wcet = (wcet / NS_PER_US).max(1) * NS_PER_US;
                    let deadline = period - rng.range(0, 2) * (period / 10);
                    Task::new(&format!("t{i}"), period, deadline, wcet.min(deadline))
                })
                .collect();
            deadline_monotonic(&mut tasks);
            Vm {
                name: format!("vm{v}"),
                scheduler: if v % 2 == 0 {
                    Scheduler::Edf
                } else {
                    Scheduler::Fp
                },
                period: None,
                max_vcpus: 1,
                tasks,
            }
        })
        .collect::<Vec<_>>();
    System {
        host: Host {
            cores: vms.len() as u32,
            utilization_limit_ppm: 950_000,
            min_period: 100 * NS_PER_US,
            resolution: NS_PER_US,
        },
        vms,
    }
}

/// The brute force for one VM at the analysis's period: the least Θ (binary search
/// on the grid; Θ is monotone for one vCPU) for which simulating the VM over two
/// hyperperiods plus the blackout misses nothing, in ticks of the greatest common
/// divisor of every time. `None` when that is more than `limit` ticks × tasks.
fn brute_force(vm: &Vm, period: u64, resolution: u64, limit: u64) -> Option<u64> {
    let tick = vm
        .tasks
        .iter()
        .flat_map(|t| [t.period, t.deadline, t.wcet])
        .chain([period, resolution])
        .fold(0u128, |g, x| gcd(g, u128::from(x))) as u64;
    let hyper = vm.tasks.iter().try_fold(u128::from(period), |h, t| {
        vigil_rt::time::lcm_within(
            h,
            u128::from(t.period),
            u128::from(limit) * u128::from(tick),
        )
    })? as u64;
    let ticks = (2 * hyper + 2 * period + vm.tasks.iter().map(|t| t.deadline).max()?) / tick;
    if ticks.checked_mul(vm.tasks.len() as u64)? > limit {
        return None;
    }
    let scaled: Vec<Task> = vm
        .tasks
        .iter()
        .map(|t| Task {
            period: t.period / tick,
            deadline: t.deadline / tick,
            wcet: t.wcet / tick,
            ..t.clone()
        })
        .collect();
    let (p, step) = (period / tick, resolution / tick);
    let fits = |budget: u64| {
        first_miss(&scaled, vm.scheduler, &worst_case_supply(p, budget, ticks)).is_none()
    };
    let (mut lo, mut hi) = (0, p / step);
    if !fits(hi * step) {
        return None;
    }
    while hi - lo > 1 {
        let mid = (lo + hi) / 2;
        if fits(mid * step) {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Some(hi * step * tick)
}

pub fn run(args: RtBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(args.rounds > 0, "--rounds 0: at least one round");
    println!("| tasks | VMs | periods | analysis (ms) | brute force (ms) | Θ agree | bandwidth / utilization |");
    println!("|---|---|---|---|---|---|---|");
    for (tasks, vms) in [(10, 2), (100, 4), (1000, 8)] {
        for (periods, name) in [
            (Periods::Random, "random 2-100 ms"),
            (Periods::Harmonic, "harmonic 5-80 ms"),
        ] {
            let mut rng = Rng(args.seed ^ (tasks as u64) << 8 ^ name.len() as u64);
            let system = system(&mut rng, tasks, vms, periods);
            let mut analysis = Vec::new();
            let mut interfaces = Vec::new();
            for _ in 0..args.rounds {
                let start = Instant::now();
                interfaces = system
                    .vms
                    .iter()
                    .map(|vm| find_interface(vm, &system.host))
                    .collect();
                analysis.push(start.elapsed().as_micros() as u64);
            }
            let mut brute = Vec::new();
            let mut agree = Some(true);
            for _ in 0..args.rounds {
                let start = Instant::now();
                for (vm, found) in system.vms.iter().zip(&interfaces) {
                    let Ok(interface) = found else { continue };
                    match brute_force(
                        vm,
                        interface.period,
                        system.host.resolution,
                        args.brute_force_limit,
                    ) {
                        Some(budget) => {
                            if agree.is_some() && budget != interface.budget {
                                agree = Some(false);
                            }
                        }
                        None => agree = None,
                    }
                }
                if agree.is_none() {
                    break;
                }
                brute.push(start.elapsed().as_micros() as u64);
            }
            let utilization: f64 = system
                .vms
                .iter()
                .flat_map(|vm| &vm.tasks)
                .map(|t| t.wcet as f64 / t.period as f64)
                .sum();
            let bandwidth: f64 = interfaces
                .iter()
                .flatten()
                .map(|i| i.budget as f64 / i.period as f64)
                .sum();
            let ms = |us: u64| format!("{:.2}", us as f64 / 1000.0);
            let (brute, agree) = match agree {
                Some(agree) => (ms(median(brute)), if agree { "yes" } else { "NO" }),
                None => ("n/a".to_string(), "n/a"),
            };
            println!(
                "| {tasks} | {vms} | {name} | {} | {brute} | {agree} | {bandwidth:.3} / {utilization:.3} |",
                ms(median(analysis))
            );
        }
    }
    Ok(())
}
