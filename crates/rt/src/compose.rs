//! Host composition: every vCPU is a periodic server (runtime per period) for
//! SCHED_DEADLINE; they are placed on the host's cores first-fit decreasing by
//! utilization, each core filled to at most the utilization limit, and their sum is
//! checked as the kernel's admission control checks it.

use crate::time::Nanos;

/// One vCPU's server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Server {
    pub vm: usize,
    pub vcpu: u32,
    pub runtime: Nanos,
    pub period: Nanos,
}

/// Where the servers go, or which does not fit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    /// The core of each server (in the order given), `None` for those that fit none.
    pub cores: Vec<Option<u32>>,
    /// Each core's load in millionths of the core, to the nearest.
    pub core_load_ppm: Vec<u64>,
    /// Σ runtime/period as the kernel sums it (fixed point, 2^-20, rounded down), and
    /// what it admits: cores × the limit.
    pub total_bw: u64,
    pub capacity_bw: u64,
}

/// The kernel's SCHED_DEADLINE bandwidth unit (`BW_SHIFT`).
const BW_SHIFT: u32 = 20;
const SCALE_BITS: u32 = 32;

fn share(runtime: Nanos, period: Nanos) -> u128 {
    (u128::from(runtime) << SCALE_BITS).div_ceil(u128::from(period))
}

/// A core's exact load Σ runtime/period as one fraction, while its denominator
/// (the periods' least common multiple) fits.
#[derive(Clone, Copy)]
struct Load {
    num: u128,
    den: u128,
}

impl Load {
    fn plus(self, runtime: Nanos, period: Nanos) -> Option<Load> {
        let (r, p) = (u128::from(runtime), u128::from(period));
        let den = crate::time::lcm_within(self.den, p, u128::from(u64::MAX))?;
        let num = self
            .num
            .checked_mul(den / self.den)?
            .checked_add(r * (den / p))?;
        Some(Load { num, den })
    }

    /// num/den <= ppm/10^6; `None` when the numbers are too large to tell.
    fn within(self, ppm: u64) -> Option<bool> {
        Some(self.num.checked_mul(1_000_000)? <= self.den.checked_mul(u128::from(ppm))?)
    }
}

/// First-fit decreasing: the servers by falling runtime/period (compared exactly),
/// each onto the first core whose load stays at most `limit_ppm` millionths.
/// Loads are exact fractions; where their denominators grow too large, the sum of
/// runtime/period rounded up at 2^-32 decides, so a core that is said to fit does.
pub fn place(servers: &[Server], cores: u32, limit_ppm: u64) -> Placement {
    let mut order: Vec<usize> = (0..servers.len()).collect();
    order.sort_by(|&a, &b| {
        let (x, y) = (&servers[a], &servers[b]);
        (u128::from(y.runtime) * u128::from(x.period))
            .cmp(&(u128::from(x.runtime) * u128::from(y.period)))
            .then(a.cmp(&b))
    });
    let limit = (u128::from(limit_ppm) << SCALE_BITS) / 1_000_000;
    let mut load = vec![0u128; cores as usize];
    let mut exact = vec![Some(Load { num: 0, den: 1 }); cores as usize];
    let mut placed = vec![None; servers.len()];
    for i in order {
        let (runtime, period) = (servers[i].runtime, servers[i].period);
        let s = share(runtime, period);
        let fits = |core: usize| {
            let sum = exact[core].and_then(|l| l.plus(runtime, period));
            match sum.and_then(|l| l.within(limit_ppm)) {
                Some(fits) => fits,
                None => load[core] + s <= limit,
            }
        };
        if let Some(core) = (0..load.len()).find(|&c| fits(c)) {
            load[core] += s;
            exact[core] = exact[core].and_then(|l| l.plus(runtime, period));
            placed[i] = Some(core as u32);
        }
    }
    let total_bw = servers
        .iter()
        .map(|s| ((u128::from(s.runtime) << BW_SHIFT) / u128::from(s.period)) as u64)
        .sum();
    let per_core = ((u128::from(limit_ppm) << BW_SHIFT) / 1_000_000) as u64;
    Placement {
        cores: placed,
        core_load_ppm: load
            .iter()
            .map(|&l| ((l * 1_000_000 + (1 << (SCALE_BITS - 1))) >> SCALE_BITS) as u64)
            .collect(),
        total_bw,
        capacity_bw: per_core * u64::from(cores),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(vm: usize, runtime: Nanos, period: Nanos) -> Server {
        Server {
            vm,
            vcpu: 0,
            runtime,
            period,
        }
    }

    #[test]
    fn first_fit_decreasing() {
        // 0.6, 0.5, 0.4, 0.3 on two cores at 0.95: 0.6+0.3 and 0.5+0.4.
        let servers = [
            server(0, 5, 10),
            server(1, 6, 10),
            server(2, 3, 10),
            server(3, 4, 10),
        ];
        let p = place(&servers, 2, 950_000);
        assert_eq!(p.cores, vec![Some(1), Some(0), Some(0), Some(1)]);
        assert_eq!(p.core_load_ppm, vec![900_000, 900_000]);
        // A fifth at 0.1 fits nowhere.
        let mut more = servers.to_vec();
        more.push(server(4, 1, 10));
        assert_eq!(place(&more, 2, 950_000).cores[4], None);
        // Exactly the limit fits.
        assert_eq!(
            place(&[server(0, 95, 100)], 1, 950_000).cores,
            vec![Some(0)]
        );
    }
}
