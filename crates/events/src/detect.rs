//! Detectors: periodic samples in, events out, on state changes only.
//!
//! Each condition is a small state machine with hysteresis: one event when it
//! starts (at the rule's priority) and one `Informational` event when it ends, and
//! nothing in between however many samples arrive. Rates come from consecutive
//! samples of monotonic counters; a counter that goes backwards (a device or VMM
//! restart) or a clock that does not advance gives no rate for that interval and
//! starts a fresh baseline.

use std::collections::HashMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::event::{Event, Priority, Rule};
use crate::time::Timestamp;

/// Something fed samples that emits events.
pub trait Detector {
    type Sample;
    /// Takes one sample; appends the events it causes (usually none) to `out`.
    fn observe(&mut self, sample: &Self::Sample, out: &mut Vec<Event>);
}

/// A host-wide sample: pressure stall information (`/proc/pressure/*`), the `some`
/// line's `avg10` (percent of the last 10 s in which at least one task stalled).
/// `None` where the host has no PSI (kernel without `CONFIG_PSI`).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HostSample {
    pub at: Timestamp,
    pub psi_cpu_some_avg10: Option<f64>,
    pub psi_memory_some_avg10: Option<f64>,
    pub psi_io_some_avg10: Option<f64>,
}

impl HostSample {
    /// Reads `/proc/pressure/{cpu,memory,io}` now; a file that is missing or
    /// unreadable gives `None`.
    pub fn read_proc_pressure() -> Self {
        let read = |name: &str| {
            std::fs::read_to_string(format!("/proc/pressure/{name}"))
                .ok()
                .and_then(|s| parse_psi_some_avg10(&s))
        };
        HostSample {
            at: Timestamp::now(),
            psi_cpu_some_avg10: read("cpu"),
            psi_memory_some_avg10: read("memory"),
            psi_io_some_avg10: read("io"),
        }
    }
}

/// The `avg10` of the `some` line of a PSI file
/// (`some avg10=1.23 avg60=0.50 avg300=0.10 total=12345`).
pub fn parse_psi_some_avg10(text: &str) -> Option<f64> {
    let line = text.lines().find(|l| l.starts_with("some "))?;
    let v = line
        .split_ascii_whitespace()
        .find_map(|kv| kv.strip_prefix("avg10="))?;
    v.parse::<f64>().ok().filter(|x| x.is_finite())
}

/// One VM's counters at one instant. Counters are monotonic totals since the VM
/// (or its device) started; `None` where the VM has no such device. Disk and
/// packet counters sum over the VM's devices of that kind.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct VmSample {
    pub vm_id: String,
    pub at: Timestamp,
    /// Disk requests completed (reads, writes, flushes, discards).
    pub disk_ops_total: Option<u64>,
    pub net_rx_packets_total: Option<u64>,
    pub net_tx_packets_total: Option<u64>,
    /// Times a rate limiter (any device) held back a request.
    pub throttled_total: Option<u64>,
    /// RT timer boosts the guest overran (withdrawn by the VMM).
    pub rt_overruns_total: Option<u64>,
}

/// Hysteresis thresholds for one PSI resource, in percent.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PsiThreshold {
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Pressure starts when `some avg10` rises above this.
    pub enter: f64,
    /// ... and ends when it falls below this (at most `enter`).
    pub exit: f64,
}

/// When a rate limiter counts as saturated.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitThreshold {
    #[serde(default = "yes")]
    pub enabled: bool,
    /// The throttle counter rose in this many consecutive sample intervals.
    pub consecutive_samples: u32,
    /// Saturation ends after this many consecutive intervals without a rise.
    pub clear_samples: u32,
}

/// When a rate counts as a flood.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FloodThreshold {
    #[serde(default = "yes")]
    pub enabled: bool,
    /// The flood starts when the rate stays above this (per second) ...
    pub enter_per_s: f64,
    /// ... for this long (0: the first interval above is enough),
    pub sustain_s: u64,
    /// and ends at the first interval below this (at most `enter_per_s`).
    pub exit_per_s: f64,
}

fn yes() -> bool {
    true
}

/// Every detector's thresholds. The defaults (see the README) are meant for a
/// host running a few dozen small VMs; tune them per deployment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DetectorConfig {
    /// Default 60 % / 40 %: runnable tasks waiting for a CPU most of the time.
    pub psi_cpu: PsiThreshold,
    /// Default 20 % / 10 %: reclaim stalls a fifth of the time, OOM is near.
    pub psi_memory: PsiThreshold,
    /// Default 40 % / 20 %.
    pub psi_io: PsiThreshold,
    /// Default: throttled in 5 consecutive samples; clear after 3 without.
    pub rate_limit: RateLimitThreshold,
    /// Default: above 20 000 disk ops/s for 30 s; ends below 10 000.
    pub disk_ops: FloodThreshold,
    /// Per direction. Default: above 100 000 packets/s for 30 s; ends below 50 000.
    pub net_packets: FloodThreshold,
}

impl Default for DetectorConfig {
    fn default() -> Self {
        let psi = |enter, exit| PsiThreshold {
            enabled: true,
            enter,
            exit,
        };
        DetectorConfig {
            psi_cpu: psi(60.0, 40.0),
            psi_memory: psi(20.0, 10.0),
            psi_io: psi(40.0, 20.0),
            rate_limit: RateLimitThreshold {
                enabled: true,
                consecutive_samples: 5,
                clear_samples: 3,
            },
            disk_ops: FloodThreshold {
                enabled: true,
                enter_per_s: 20_000.0,
                sustain_s: 30,
                exit_per_s: 10_000.0,
            },
            net_packets: FloodThreshold {
                enabled: true,
                enter_per_s: 100_000.0,
                sustain_s: 30,
                exit_per_s: 50_000.0,
            },
        }
    }
}

/// A threshold that makes no sense, named by its section of `detectors`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error("detector config: {name}: need 0 <= exit <= enter <= 100 and enter > 0 (enter={enter}, exit={exit})")]
    Psi {
        name: &'static str,
        enter: f64,
        exit: f64,
    },
    #[error(
        "detector config: rate_limit: consecutive_samples and clear_samples must be at least 1"
    )]
    RateLimitSamples,
    #[error(
        "detector config: {name}: need 0 <= exit_per_s <= enter_per_s, enter_per_s > 0, sustain_s <= 86400 \
         (enter_per_s={enter_per_s}, exit_per_s={exit_per_s}, sustain_s={sustain_s})"
    )]
    Flood {
        name: &'static str,
        enter_per_s: f64,
        exit_per_s: f64,
        sustain_s: u64,
    },
}

impl DetectorConfig {
    /// Checks every threshold: finite, `exit <= enter`, PSI within 0..=100,
    /// sample counts at least 1, windows at most a day.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (name, t) in [
            ("psi_cpu", &self.psi_cpu),
            ("psi_memory", &self.psi_memory),
            ("psi_io", &self.psi_io),
        ] {
            let ok = t.enter.is_finite()
                && t.exit.is_finite()
                && t.enter > 0.0
                && t.enter <= 100.0
                && t.exit >= 0.0
                && t.exit <= t.enter;
            if !ok {
                return Err(ConfigError::Psi {
                    name,
                    enter: t.enter,
                    exit: t.exit,
                });
            }
        }
        let r = &self.rate_limit;
        if r.consecutive_samples == 0 || r.clear_samples == 0 {
            return Err(ConfigError::RateLimitSamples);
        }
        for (name, f) in [
            ("disk_ops", &self.disk_ops),
            ("net_packets", &self.net_packets),
        ] {
            let ok = f.enter_per_s.is_finite()
                && f.exit_per_s.is_finite()
                && f.enter_per_s > 0.0
                && f.exit_per_s >= 0.0
                && f.exit_per_s <= f.enter_per_s
                && f.sustain_s <= 86_400;
            if !ok {
                return Err(ConfigError::Flood {
                    name,
                    enter_per_s: f.enter_per_s,
                    exit_per_s: f.exit_per_s,
                    sustain_s: f.sustain_s,
                });
            }
        }
        Ok(())
    }
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

/// Host pressure: one event when a resource's PSI rises above `enter`, one
/// `Informational` "recovered" event when it falls below `exit`.
#[derive(Debug)]
pub struct HostDetector {
    config: DetectorConfig,
    cpu: bool,
    memory: bool,
    io: bool,
}

impl HostDetector {
    /// Fails on a config that [`DetectorConfig::validate`] rejects.
    pub fn new(config: DetectorConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(HostDetector {
            config,
            cpu: false,
            memory: false,
            io: false,
        })
    }

    /// Whether each resource is under pressure now: (cpu, memory, io).
    pub fn under_pressure(&self) -> (bool, bool, bool) {
        (self.cpu, self.memory, self.io)
    }
}

fn psi_step(
    active: &mut bool,
    t: &PsiThreshold,
    value: Option<f64>,
    rule: Rule,
    resource: &str,
    at: Timestamp,
    out: &mut Vec<Event>,
) {
    // Garbage (NaN, negative, infinite) changes nothing.
    let Some(v) = value.filter(|v| v.is_finite() && *v >= 0.0) else {
        return;
    };
    if !t.enabled {
        *active = false;
        return;
    }
    let v = round2(v);
    let (state, threshold, priority, message) = if !*active && v > t.enter {
        *active = true;
        (
            "pressure",
            t.enter,
            rule.default_priority(),
            format!(
                "host {resource} pressure: some avg10={v:.2}% above {:.2}%",
                t.enter
            ),
        )
    } else if *active && v < t.exit {
        *active = false;
        (
            "recovered",
            t.exit,
            Priority::Informational,
            format!(
                "host {resource} pressure recovered: some avg10={v:.2}% below {:.2}%",
                t.exit
            ),
        )
    } else {
        return;
    };
    out.push(
        Event::new(rule, at, message)
            .with_priority(priority)
            .with_field("psi.resource", resource)
            .with_field("psi.some_avg10", v)
            .with_field("psi.threshold", threshold)
            .with_field("psi.state", state),
    );
}

impl Detector for HostDetector {
    type Sample = HostSample;

    fn observe(&mut self, s: &HostSample, out: &mut Vec<Event>) {
        let c = &self.config;
        psi_step(
            &mut self.cpu,
            &c.psi_cpu,
            s.psi_cpu_some_avg10,
            Rule::HostCpuPressure,
            "cpu",
            s.at,
            out,
        );
        psi_step(
            &mut self.memory,
            &c.psi_memory,
            s.psi_memory_some_avg10,
            Rule::HostMemoryPressure,
            "memory",
            s.at,
            out,
        );
        psi_step(
            &mut self.io,
            &c.psi_io,
            s.psi_io_some_avg10,
            Rule::HostIoPressure,
            "io",
            s.at,
            out,
        );
    }
}

/// The change of a counter over one interval.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Delta {
    /// No value on one side: nothing to say.
    Missing,
    /// It went backwards: the counter restarted.
    Reset,
    Value(u64),
}

fn delta(prev: Option<u64>, cur: Option<u64>) -> Delta {
    match (prev, cur) {
        (Some(p), Some(c)) if c >= p => Delta::Value(c - p),
        (Some(_), Some(_)) => Delta::Reset,
        _ => Delta::Missing,
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct FloodState {
    /// Start of the current run of intervals above `enter`.
    above_since: Option<Timestamp>,
    active: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum FloodKind {
    Disk,
    NetRx,
    NetTx,
}

impl FloodKind {
    fn rule(self) -> Rule {
        match self {
            FloodKind::Disk => Rule::VmIoFlood,
            FloodKind::NetRx | FloodKind::NetTx => Rule::VmPacketFlood,
        }
    }
    fn name(self) -> &'static str {
        match self {
            FloodKind::Disk => "disk_ops",
            FloodKind::NetRx => "net_rx_packets",
            FloodKind::NetTx => "net_tx_packets",
        }
    }
    fn what(self) -> &'static str {
        match self {
            FloodKind::Disk => "disk I/O flood",
            FloodKind::NetRx => "packet flood (received)",
            FloodKind::NetTx => "packet flood (sent)",
        }
    }
    fn unit(self) -> &'static str {
        match self {
            FloodKind::Disk => "ops/s",
            FloodKind::NetRx | FloodKind::NetTx => "packets/s",
        }
    }
}

struct Interval<'a> {
    vm_id: &'a str,
    from: Timestamp,
    to: Timestamp,
    secs: f64,
}

fn flood_step(
    st: &mut FloodState,
    t: &FloodThreshold,
    kind: FloodKind,
    d: Delta,
    iv: &Interval<'_>,
    out: &mut Vec<Event>,
) {
    if !t.enabled {
        *st = FloodState::default();
        return;
    }
    let n = match d {
        Delta::Value(n) => n,
        Delta::Missing => return,
        // A restarted counter: no rate, and a run in progress starts over.
        Delta::Reset => {
            st.above_since = None;
            return;
        }
    };
    let rate = round2(n as f64 / iv.secs);
    let rule = kind.rule();
    let mut event = |priority: Priority, state: &str, message: String, sustained: Option<u64>| {
        let mut e = Event::new(rule, iv.to, message)
            .with_vm(iv.vm_id)
            .with_priority(priority)
            .with_field("flood.kind", kind.name())
            .with_field("flood.rate_per_s", rate)
            .with_field("flood.state", state);
        if let Some(s) = sustained {
            e = e
                .with_field("flood.threshold_per_s", t.enter_per_s)
                .with_field("flood.sustained_s", s);
        } else {
            e = e.with_field("flood.threshold_per_s", t.exit_per_s);
        }
        match kind {
            FloodKind::NetRx => e = e.with_field("net.direction", "rx"),
            FloodKind::NetTx => e = e.with_field("net.direction", "tx"),
            FloodKind::Disk => {}
        }
        out.push(e);
    };
    if rate > t.enter_per_s {
        let since = *st.above_since.get_or_insert(iv.from);
        let held = iv.to.since(since).unwrap_or_default();
        if !st.active && held >= Duration::from_secs(t.sustain_s) {
            st.active = true;
            let secs = held.as_secs();
            event(
                rule.default_priority(),
                "started",
                format!(
                    "vm {}: {}: {rate:.0} {} for {secs} s (threshold {:.0} {})",
                    iv.vm_id,
                    kind.what(),
                    kind.unit(),
                    t.enter_per_s,
                    kind.unit()
                ),
                Some(secs),
            );
        }
    } else {
        st.above_since = None;
        if st.active && rate < t.exit_per_s {
            st.active = false;
            event(
                Priority::Informational,
                "ended",
                format!(
                    "vm {}: {} ended: {rate:.0} {} (below {:.0})",
                    iv.vm_id,
                    kind.what(),
                    kind.unit(),
                    t.exit_per_s
                ),
                None,
            );
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct RateLimitState {
    rising: u32,
    flat: u32,
    active: bool,
}

fn rate_limit_step(
    st: &mut RateLimitState,
    t: &RateLimitThreshold,
    d: Delta,
    iv: &Interval<'_>,
    out: &mut Vec<Event>,
) {
    if !t.enabled {
        *st = RateLimitState::default();
        return;
    }
    let n = match d {
        Delta::Value(n) => n,
        // A restart of the counter is neither a rise nor a quiet interval.
        Delta::Missing | Delta::Reset => return,
    };
    let rule = Rule::VmRateLimitSaturated;
    if n > 0 {
        st.rising = st.rising.saturating_add(1);
        st.flat = 0;
        if !st.active && st.rising >= t.consecutive_samples {
            st.active = true;
            out.push(
                Event::new(
                    rule,
                    iv.to,
                    format!(
                        "vm {}: rate limiter saturated: throttled in {} consecutive samples",
                        iv.vm_id, st.rising
                    ),
                )
                .with_vm(iv.vm_id)
                .with_field("ratelimit.consecutive_samples", st.rising)
                .with_field("ratelimit.throttled_in_interval", n)
                .with_field("ratelimit.state", "saturated"),
            );
        }
    } else {
        st.flat = st.flat.saturating_add(1);
        st.rising = 0;
        if st.active && st.flat >= t.clear_samples {
            st.active = false;
            out.push(
                Event::new(
                    rule,
                    iv.to,
                    format!(
                        "vm {}: rate limiter no longer saturated ({} samples without throttling)",
                        iv.vm_id, st.flat
                    ),
                )
                .with_vm(iv.vm_id)
                .with_priority(Priority::Informational)
                .with_field("ratelimit.clear_samples", st.flat)
                .with_field("ratelimit.state", "cleared"),
            );
        }
    }
}

#[derive(Debug, Default)]
struct VmState {
    last: Option<VmSample>,
    disk: FloodState,
    rx: FloodState,
    tx: FloodState,
    rate_limit: RateLimitState,
}

/// Per-VM rate-limiter saturation and I/O and packet floods. Keeps one small
/// state per VM id it has seen: call [`VmDetector::forget`] when a VM goes away.
#[derive(Debug)]
pub struct VmDetector {
    config: DetectorConfig,
    vms: HashMap<String, VmState>,
}

impl VmDetector {
    /// Fails on a config that [`DetectorConfig::validate`] rejects.
    pub fn new(config: DetectorConfig) -> Result<Self, ConfigError> {
        config.validate()?;
        Ok(VmDetector {
            config,
            vms: HashMap::new(),
        })
    }

    /// Drops what is kept about a VM (it stopped); a later sample starts afresh.
    pub fn forget(&mut self, vm_id: &str) {
        self.vms.remove(vm_id);
    }

    /// How many VMs it keeps state for.
    pub fn tracked_vms(&self) -> usize {
        self.vms.len()
    }
}

impl Detector for VmDetector {
    type Sample = VmSample;

    fn observe(&mut self, s: &VmSample, out: &mut Vec<Event>) {
        let c = &self.config;
        let st = self.vms.entry(s.vm_id.clone()).or_default();
        let Some(prev) = st.last.replace(s.clone()) else {
            return; // the first sample is a baseline
        };
        let Some(elapsed) = s.at.since(prev.at).filter(|d| !d.is_zero()) else {
            // The clock stood still or went back: a new baseline, no rates.
            st.disk.above_since = None;
            st.rx.above_since = None;
            st.tx.above_since = None;
            return;
        };
        let iv = Interval {
            vm_id: &s.vm_id,
            from: prev.at,
            to: s.at,
            secs: elapsed.as_secs_f64(),
        };
        rate_limit_step(
            &mut st.rate_limit,
            &c.rate_limit,
            delta(prev.throttled_total, s.throttled_total),
            &iv,
            out,
        );
        flood_step(
            &mut st.disk,
            &c.disk_ops,
            FloodKind::Disk,
            delta(prev.disk_ops_total, s.disk_ops_total),
            &iv,
            out,
        );
        flood_step(
            &mut st.rx,
            &c.net_packets,
            FloodKind::NetRx,
            delta(prev.net_rx_packets_total, s.net_rx_packets_total),
            &iv,
            out,
        );
        flood_step(
            &mut st.tx,
            &c.net_packets,
            FloodKind::NetTx,
            delta(prev.net_tx_packets_total, s.net_tx_packets_total),
            &iv,
            out,
        );
        // Every overrun is the guest's doing: no threshold, one event per interval.
        if let Delta::Value(n @ 1..) = delta(prev.rt_overruns_total, s.rt_overruns_total) {
            out.push(
                Event::new(
                    Rule::VmRtBudgetOverrun,
                    iv.to,
                    format!(
                        "vm {}: the guest overran its RT timer budget {n} time(s) in {:.0} s; each boost was withdrawn",
                        iv.vm_id, iv.secs
                    ),
                )
                .with_vm(iv.vm_id)
                .with_field("rt.overruns_in_interval", n)
                .with_field("rt.overruns_total", s.rt_overruns_total.unwrap_or(0)),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(at_s: u64, cpu: Option<f64>, mem: Option<f64>, io: Option<f64>) -> HostSample {
        HostSample {
            at: Timestamp::from_unix_secs(at_s),
            psi_cpu_some_avg10: cpu,
            psi_memory_some_avg10: mem,
            psi_io_some_avg10: io,
        }
    }

    fn feed<D: Detector>(d: &mut D, samples: &[D::Sample]) -> Vec<Event> {
        let mut out = Vec::new();
        for s in samples {
            d.observe(s, &mut out);
        }
        out
    }

    #[test]
    fn psi_parser() {
        let text = "some avg10=12.34 avg60=1.00 avg300=0.10 total=123\n\
                    full avg10=99.00 avg60=0.00 avg300=0.00 total=0\n";
        assert_eq!(parse_psi_some_avg10(text), Some(12.34));
        assert_eq!(parse_psi_some_avg10("full avg10=1.00\n"), None);
        assert_eq!(parse_psi_some_avg10("some avg10=nan total=1"), None);
        assert_eq!(parse_psi_some_avg10("some avg10=x"), None);
        assert_eq!(parse_psi_some_avg10(""), None);
    }

    #[test]
    fn psi_crossing_up_once_then_recovered_once() {
        let mut d = HostDetector::new(DetectorConfig::default()).unwrap();
        // memory: enter 20, exit 10.
        let mem = [
            5.0, 19.9, 20.0, 25.0, 30.0, 22.0, 15.0, 10.0, 11.0, 40.0, 9.99, 5.0,
        ];
        let samples: Vec<_> = mem
            .iter()
            .enumerate()
            .map(|(i, v)| host(i as u64, None, Some(*v), None))
            .collect();
        let out = feed(&mut d, &samples);
        let seen: Vec<_> = out
            .iter()
            .map(|e| {
                (
                    e.time.unix_ns() / 1_000_000_000,
                    e.priority,
                    e.fields["psi.state"].clone(),
                )
            })
            .collect();
        // Up at 25 (index 3): 20.0 is not above 20. Hovering between exit and enter
        // (22, 15, 10, 11, 40) says nothing more; down at 9.99 (index 10), once.
        assert_eq!(
            seen,
            [
                (3, Priority::Error, "pressure".into()),
                (10, Priority::Informational, "recovered".into()),
            ]
        );
        assert!(out
            .iter()
            .all(|e| e.rule == Rule::HostMemoryPressure && e.vm_id.is_none()));
        assert_eq!(out[0].fields["psi.some_avg10"], 25.0);
        assert_eq!(out[0].fields["psi.threshold"], 20.0);
        assert_eq!(d.under_pressure(), (false, false, false));
    }

    #[test]
    fn psi_resources_are_independent_and_garbage_is_ignored() {
        let mut d = HostDetector::new(DetectorConfig::default()).unwrap();
        let out = feed(
            &mut d,
            &[
                host(0, Some(70.0), Some(f64::NAN), Some(50.0)),
                host(1, Some(f64::INFINITY), Some(-3.0), None),
                host(2, None, None, None),
                host(3, Some(65.0), Some(1.0), Some(45.0)),
            ],
        );
        let rules: Vec<_> = out.iter().map(|e| (e.rule, e.priority)).collect();
        assert_eq!(
            rules,
            [
                (Rule::HostCpuPressure, Priority::Warning),
                (Rule::HostIoPressure, Priority::Warning)
            ]
        );
        assert_eq!(d.under_pressure(), (true, false, true));
    }

    #[test]
    fn config_validation_and_serde_defaults() {
        assert!(DetectorConfig::default().validate().is_ok());
        let mut c = DetectorConfig::default();
        c.psi_memory.exit = 30.0; // above enter
        let e = HostDetector::new(c).unwrap_err().to_string();
        assert!(
            e.starts_with("detector config: psi_memory: ") && e.contains("exit=30"),
            "{e}"
        );
        let mut c = DetectorConfig::default();
        c.disk_ops.enter_per_s = f64::NAN;
        assert!(VmDetector::new(c).is_err());
        let mut c = DetectorConfig::default();
        c.rate_limit.consecutive_samples = 0;
        assert!(c.validate().is_err());
        // A partial config takes defaults for the rest; unknown keys are refused.
        let c: DetectorConfig = serde_json::from_str(
            r#"{"disk_ops":{"enter_per_s":100,"sustain_s":0,"exit_per_s":50}}"#,
        )
        .unwrap();
        assert_eq!(c.disk_ops.enter_per_s, 100.0);
        assert!(c.disk_ops.enabled);
        assert_eq!(c.psi_cpu, DetectorConfig::default().psi_cpu);
        assert!(serde_json::from_str::<DetectorConfig>(r#"{"psi_gpu":{}}"#).is_err());
    }

    fn vm(
        at_s: u64,
        disk: Option<u64>,
        rx: Option<u64>,
        tx: Option<u64>,
        thr: Option<u64>,
    ) -> VmSample {
        VmSample {
            vm_id: "vm1".into(),
            at: Timestamp::from_unix_secs(at_s),
            disk_ops_total: disk,
            net_rx_packets_total: rx,
            net_tx_packets_total: tx,
            throttled_total: thr,
            rt_overruns_total: None,
        }
    }

    #[test]
    fn rt_budget_overruns_raise_an_event_per_interval() {
        let mut d = VmDetector::new(DetectorConfig::default()).unwrap();
        let at = |secs, overruns| VmSample {
            rt_overruns_total: overruns,
            ..vm(secs, None, None, None, None)
        };
        let out = feed(
            &mut d,
            &[
                at(0, Some(0)),
                at(1, Some(0)),
                at(2, Some(3)),
                at(3, Some(3)),
                at(4, None),
            ],
        );
        assert_eq!(out.len(), 1, "{out:#?}");
        assert_eq!(out[0].rule, Rule::VmRtBudgetOverrun);
        assert!(
            out[0]
                .message
                .contains("overran its RT timer budget 3 time(s)"),
            "{}",
            out[0].message
        );
    }

    fn small_floods() -> DetectorConfig {
        DetectorConfig {
            disk_ops: FloodThreshold {
                enabled: true,
                enter_per_s: 100.0,
                sustain_s: 20,
                exit_per_s: 50.0,
            },
            net_packets: FloodThreshold {
                enabled: true,
                enter_per_s: 1000.0,
                sustain_s: 0,
                exit_per_s: 500.0,
            },
            ..DetectorConfig::default()
        }
    }

    #[test]
    fn io_flood_needs_the_whole_window_and_fires_once() {
        let mut d = VmDetector::new(small_floods()).unwrap();
        // 10 s samples; disk at 200 ops/s from t=0 on.
        let samples: Vec<_> = (0..10)
            .map(|i| vm(i * 10, Some(i * 2000), None, None, None))
            .collect();
        let out = feed(&mut d, &samples);
        assert_eq!(out.len(), 1, "{out:#?}");
        let e = &out[0];
        assert_eq!(e.rule, Rule::VmIoFlood);
        assert_eq!(e.priority, Priority::Warning);
        assert_eq!(e.vm_id.as_deref(), Some("vm1"));
        // Intervals end at 10, 20: 20 s above the threshold by t=20.
        assert_eq!(e.time, Timestamp::from_unix_secs(20));
        assert_eq!(e.fields["flood.rate_per_s"], 200.0);
        assert_eq!(e.fields["flood.sustained_s"], 20);
        assert_eq!(e.fields["flood.state"], "started");
        assert!(e.tags.contains(&"T1499.001".to_owned()));
    }

    #[test]
    fn io_flood_interrupted_run_restarts_the_window_and_ends_with_hysteresis() {
        let mut d = VmDetector::new(small_floods()).unwrap();
        // rates per 10 s interval: 200, 70 (breaks the run), 200, 200, 80 (between
        // exit and enter: still active), 200, 40 (ends), 10.
        let rates = [200, 70, 200, 200, 80, 200, 40, 10];
        let mut total = 0;
        let mut samples = vec![vm(0, Some(0), None, None, None)];
        for (i, r) in rates.iter().enumerate() {
            total += r * 10;
            samples.push(vm((i as u64 + 1) * 10, Some(total), None, None, None));
        }
        let out = feed(&mut d, &samples);
        let seen: Vec<_> = out
            .iter()
            .map(|e| {
                (
                    e.time.unix_ns() / 1_000_000_000,
                    e.fields["flood.state"].clone(),
                )
            })
            .collect();
        assert_eq!(seen, [(40, "started".into()), (70, "ended".into())]);
        assert_eq!(out[1].priority, Priority::Informational);
    }

    #[test]
    fn packet_flood_per_direction() {
        let mut d = VmDetector::new(small_floods()).unwrap();
        let out = feed(
            &mut d,
            &[
                vm(0, None, Some(0), Some(0), None),
                vm(1, None, Some(500), Some(5000), None),
                vm(2, None, Some(5500), Some(10_000), None),
            ],
        );
        let seen: Vec<_> = out
            .iter()
            .map(|e| {
                (
                    e.rule,
                    e.fields["net.direction"].clone(),
                    e.time.unix_ns() / 1_000_000_000,
                )
            })
            .collect();
        assert_eq!(
            seen,
            [
                (Rule::VmPacketFlood, "tx".into(), 1),
                (Rule::VmPacketFlood, "rx".into(), 2)
            ]
        );
        assert!(out[0].tags.contains(&"T1498.001".to_owned()));
    }

    #[test]
    fn counter_reset_gives_no_rate_and_no_event() {
        let mut c = small_floods();
        c.disk_ops.sustain_s = 0;
        let mut d = VmDetector::new(c).unwrap();
        // A restart from 1_000_000 to 50 would read as a huge negative (or, wrapped,
        // positive) rate; it must read as nothing.
        let out = feed(
            &mut d,
            &[
                vm(0, Some(1_000_000), None, None, Some(100)),
                vm(10, Some(50), None, None, Some(0)),
                vm(20, Some(100), None, None, Some(0)),
            ],
        );
        assert!(out.is_empty(), "{out:#?}");
        // A reset in the middle of a run starts the window again.
        let mut d = VmDetector::new(small_floods()).unwrap();
        let out = feed(
            &mut d,
            &[
                vm(0, Some(0), None, None, None),
                vm(10, Some(2000), None, None, None),
                vm(20, Some(10), None, None, None), // reset
                vm(30, Some(2010), None, None, None),
                vm(40, Some(4010), None, None, None),
            ],
        );
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].time, Timestamp::from_unix_secs(40));
    }

    #[test]
    fn clock_going_back_or_standing_still_is_a_new_baseline() {
        let mut c = small_floods();
        c.disk_ops.sustain_s = 0;
        let mut d = VmDetector::new(c).unwrap();
        let out = feed(
            &mut d,
            &[
                vm(100, Some(0), None, None, None),
                vm(100, Some(1_000_000), None, None, None), // dt = 0
                vm(50, Some(2_000_000), None, None, None),  // back in time
                vm(60, Some(2_000_100), None, None, None),  // 10 ops/s
            ],
        );
        assert!(out.is_empty(), "{out:#?}");
    }

    #[test]
    fn rate_limit_saturation_after_n_consecutive_rises_then_clears() {
        let mut d = VmDetector::new(DetectorConfig::default()).unwrap();
        // throttled_total: rises 4 times, pauses (run broken), rises 5 times
        // (saturated), keeps rising (no more events), a reset (neither), 3 flat
        // samples (cleared).
        let thr = [0, 1, 2, 3, 4, 4, 5, 6, 7, 8, 9, 10, 11, 12, 0, 0, 0, 0, 0];
        let samples: Vec<_> = thr
            .iter()
            .enumerate()
            .map(|(i, t)| vm(i as u64, None, None, None, Some(*t)))
            .collect();
        let out = feed(&mut d, &samples);
        let seen: Vec<_> = out
            .iter()
            .map(|e| {
                (
                    e.time.unix_ns() / 1_000_000_000,
                    e.priority,
                    e.fields["ratelimit.state"].clone(),
                )
            })
            .collect();
        assert_eq!(
            seen,
            [
                (10, Priority::Warning, "saturated".into()),
                (17, Priority::Informational, "cleared".into()),
            ]
        );
        assert!(out.iter().all(|e| e.rule == Rule::VmRateLimitSaturated));
    }

    #[test]
    fn vms_are_tracked_separately_and_forgotten() {
        let mut c = small_floods();
        c.disk_ops.sustain_s = 0;
        let mut d = VmDetector::new(c).unwrap();
        let mut a = vm(0, Some(0), None, None, None);
        let mut b = a.clone();
        b.vm_id = "vm2".into();
        let mut out = Vec::new();
        d.observe(&a, &mut out);
        d.observe(&b, &mut out);
        a.at = Timestamp::from_unix_secs(1);
        a.disk_ops_total = Some(1000);
        b.at = Timestamp::from_unix_secs(1);
        b.disk_ops_total = Some(10);
        d.observe(&a, &mut out);
        d.observe(&b, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].vm_id.as_deref(), Some("vm1"));
        assert_eq!(d.tracked_vms(), 2);
        d.forget("vm1");
        d.forget("nope");
        assert_eq!(d.tracked_vms(), 1);
    }

    #[test]
    fn disabled_detectors_say_nothing() {
        let mut c = small_floods();
        c.disk_ops.enabled = false;
        c.psi_memory.enabled = false;
        c.disk_ops.sustain_s = 0;
        let mut v = VmDetector::new(c.clone()).unwrap();
        let mut h = HostDetector::new(c).unwrap();
        let mut out = feed(
            &mut v,
            &[
                vm(0, Some(0), None, None, None),
                vm(1, Some(10_000), None, None, None),
            ],
        );
        out.extend(feed(&mut h, &[host(0, None, Some(99.0), None)]));
        assert!(out.is_empty());
    }

    #[test]
    fn extreme_counters_do_not_panic() {
        let mut c = small_floods();
        c.disk_ops.sustain_s = 0;
        let mut d = VmDetector::new(c).unwrap();
        let out = feed(
            &mut d,
            &[
                vm(0, Some(0), Some(0), Some(u64::MAX), Some(0)),
                VmSample {
                    vm_id: "vm1".into(),
                    at: Timestamp::from_unix_ns(1),
                    disk_ops_total: Some(u64::MAX),
                    net_rx_packets_total: Some(u64::MAX),
                    net_tx_packets_total: Some(0),
                    throttled_total: Some(u64::MAX),
                    rt_overruns_total: None,
                },
            ],
        );
        assert_eq!(out.len(), 2); // disk and rx floods; tx reset
    }
}
