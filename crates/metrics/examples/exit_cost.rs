//! What counting costs a vCPU per exit: `RunClock::entering` + `RunClock::exited`
//! (two clock reads, a histogram record, a guest-time add, an exit count) against
//! the bare loop. `cargo run --release -p vigil-metrics --example exit_cost`
use std::hint::black_box;
use std::time::Instant;

use vigil_metrics::{ExitReason, RunClock, VcpuCounters};

fn main() {
    const N: u64 = 5_000_000;
    let counters = VcpuCounters::new(0);
    let mut clock = RunClock::default();
    for round in 0..3 {
        let t = Instant::now();
        for i in 0..N {
            black_box(i);
        }
        let bare = t.elapsed();
        let t = Instant::now();
        for i in 0..N {
            clock.entering(&counters);
            black_box(i);
            clock.exited(&counters, ExitReason::Io);
        }
        let counted = t.elapsed();
        let t = Instant::now();
        for _ in 0..N {
            black_box(Instant::now());
        }
        let clock_read = t.elapsed();
        println!(
            "round {round}: {:.1} ns per exit counted ({:.1} ns bare loop; one Instant::now() {:.1} ns)",
            (counted.as_nanos() as f64 - bare.as_nanos() as f64) / N as f64,
            bare.as_nanos() as f64 / N as f64,
            clock_read.as_nanos() as f64 / N as f64,
        );
    }
    black_box(counters.snapshot());
}
