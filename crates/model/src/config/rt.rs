//! Real-time guests: how each vCPU thread is scheduled on the host
//! (`--vcpu-sched`), and the RT timer device (`--rt-timer`).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::FieldError;
use crate::options::{Options, OptionsError};

/// Highest SCHED_FIFO / SCHED_RR priority Linux has.
pub const MAX_RT_PRIORITY: u8 = 99;
/// Smallest SCHED_DEADLINE runtime the kernel takes (`1 << DL_SCALE` ns).
pub const MIN_DEADLINE_RUNTIME_NS: u64 = 1024;
/// Longest SCHED_DEADLINE period the kernel takes by default
/// (`/proc/sys/kernel/sched_deadline_period_max_us`).
pub const MAX_DEADLINE_PERIOD_NS: u64 = 4_194_304_000;
/// Most timers the RT timer device gives one vCPU.
pub const MAX_RT_TIMERS: u32 = 16;

/// How the host schedules a vCPU thread.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(tag = "policy", rename_all = "lowercase")]
pub enum SchedPolicy {
    /// The default time-sharing scheduler (SCHED_OTHER).
    #[default]
    Other,
    /// SCHED_FIFO at this priority (1 to 99).
    Fifo { priority: u8 },
    /// SCHED_RR at this priority (1 to 99).
    Rr { priority: u8 },
    /// A SCHED_DEADLINE reservation: `runtime` of CPU in every `period`, by
    /// `deadline` after the period starts.
    Deadline {
        runtime_ns: u64,
        deadline_ns: u64,
        period_ns: u64,
    },
}

impl SchedPolicy {
    /// The CPU share a reservation takes (0 for the other policies).
    pub fn bandwidth(&self) -> f64 {
        match *self {
            Self::Deadline {
                runtime_ns,
                period_ns,
                ..
            } => runtime_ns as f64 / period_ns as f64,
            _ => 0.0,
        }
    }

    /// `other`, `fifo:10`, `deadline:2ms/10ms/10ms`.
    pub fn describe(&self) -> String {
        match *self {
            Self::Other => "other".into(),
            Self::Fifo { priority } => format!("fifo:{priority}"),
            Self::Rr { priority } => format!("rr:{priority}"),
            Self::Deadline {
                runtime_ns,
                deadline_ns,
                period_ns,
            } => format!(
                "deadline:{}/{}/{}",
                short(runtime_ns),
                short(deadline_ns),
                short(period_ns)
            ),
        }
    }
}

/// `2ms`, `2500us`, `3ns`: the largest unit that shows `ns` exactly.
fn short(ns: u64) -> String {
    for (unit, name) in [(1_000_000_000, "s"), (1_000_000, "ms"), (1_000, "us")] {
        if ns >= unit && ns % unit == 0 {
            return format!("{}{name}", ns / unit);
        }
    }
    format!("{ns}ns")
}

/// The scheduling of one vCPU, or of every vCPU (`vcpu` none).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct VcpuSched {
    /// The vCPU, or none for every vCPU not named by an entry of its own.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vcpu: Option<u32>,
    #[serde(flatten)]
    pub policy: SchedPolicy,
    /// The host CPUs the thread may run on (sorted, no repeats); none: any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpus: Option<Vec<u32>>,
}

/// The JSON form of [`VcpuSched`] (API bodies, configuration files): every
/// policy's fields side by side, checked by [`VcpuSched::try_from`].
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VcpuSchedBody {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpu: Option<u32>,
    pub policy: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_ns: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ns: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub period_ns: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<Vec<u32>>,
}

/// A scheduling entry that cannot be applied as given.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SchedConfigError {
    #[error("vcpu_sched {0:?}: unknown policy (expected other, fifo, rr or deadline)")]
    Policy(String),
    #[error("vcpu_sched {field}{why}")]
    Field { field: &'static str, why: String },
    #[error("vcpu_sched vcpu={vcpu}: the VM has {count} vCPU(s), 0 to {}", .count.saturating_sub(1))]
    NoVcpu { vcpu: u32, count: u32 },
    #[error("vcpu_sched vcpu={0}: given twice")]
    Twice(u32),
    #[error("vcpu_sched: more than one entry for every vCPU (no vcpu=)")]
    TwiceAll,
}

impl FieldError for SchedConfigError {
    fn field(&self) -> &'static str {
        "vcpu_sched"
    }
}

fn field_error(field: &'static str, why: impl Into<String>) -> SchedConfigError {
    SchedConfigError::Field {
        field,
        why: why.into(),
    }
}

impl TryFrom<VcpuSchedBody> for VcpuSched {
    type Error = SchedConfigError;

    fn try_from(b: VcpuSchedBody) -> Result<Self, SchedConfigError> {
        let priority = |p: Option<u8>| p.ok_or_else(|| field_error("priority", ": required"));
        let policy = match b.policy.as_str() {
            "other" => SchedPolicy::Other,
            "fifo" => SchedPolicy::Fifo {
                priority: priority(b.priority)?,
            },
            "rr" => SchedPolicy::Rr {
                priority: priority(b.priority)?,
            },
            "deadline" => {
                let need = |v: Option<u64>, f| v.ok_or_else(|| field_error(f, ": required"));
                let runtime_ns = need(b.runtime_ns, "runtime_ns")?;
                let period_ns = need(b.period_ns, "period_ns")?;
                SchedPolicy::Deadline {
                    runtime_ns,
                    deadline_ns: b.deadline_ns.unwrap_or(period_ns),
                    period_ns,
                }
            }
            other => return Err(SchedConfigError::Policy(other.into())),
        };
        let unused = match policy {
            SchedPolicy::Other => [
                ("priority", b.priority.is_some()),
                ("runtime_ns", b.runtime_ns.is_some()),
            ],
            SchedPolicy::Fifo { .. } | SchedPolicy::Rr { .. } => [
                ("runtime_ns", b.runtime_ns.is_some()),
                ("period_ns", b.period_ns.is_some()),
            ],
            SchedPolicy::Deadline { .. } => [("priority", b.priority.is_some()), ("", false)],
        };
        if let Some((field, _)) = unused.iter().find(|(_, given)| *given) {
            return Err(field_error(
                field,
                format!(": does not apply to policy {}", b.policy),
            ));
        }
        let entry = VcpuSched {
            vcpu: b.vcpu,
            policy,
            cpus: b.cpus.map(normalize_cpus),
        };
        entry.validate()?;
        Ok(entry)
    }
}

fn normalize_cpus(mut cpus: Vec<u32>) -> Vec<u32> {
    cpus.sort_unstable();
    cpus.dedup();
    cpus
}

/// `1`, `0-3`, `0-1:4:6-7`: host CPUs (`:` separates items, since `,`
/// separates options).
pub fn parse_cpu_list(s: &str) -> Option<Vec<u32>> {
    let mut cpus = Vec::new();
    for item in s.split(':') {
        let (first, last) = match item.split_once('-') {
            Some((a, b)) => (a.parse::<u32>().ok()?, b.parse::<u32>().ok()?),
            None => {
                let n = item.parse::<u32>().ok()?;
                (n, n)
            }
        };
        if first > last || last - first >= 4096 {
            return None;
        }
        cpus.extend(first..=last);
    }
    Some(normalize_cpus(cpus))
}

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

impl VcpuSched {
    /// The option keys of `--vcpu-sched`.
    pub const KEYS: &'static [&'static str] = &[
        "vcpu", "policy", "priority", "runtime", "deadline", "period", "cpus",
    ];

    /// Parses `vcpu=0,policy=deadline,runtime=2ms,deadline=10ms,period=10ms` or
    /// `policy=fifo,priority=10,cpus=1` (no `vcpu`: every vCPU).
    pub fn parse(s: &str) -> Result<Self, String> {
        let flag = "--vcpu-sched";
        let o = Options::parse(s, Self::KEYS).map_err(|e| e.for_option(flag))?;
        let opt = |e: OptionsError| e.for_option(flag);
        let vcpu = match o.get("vcpu") {
            None | Some("all") => None,
            Some(_) => o.number::<u32>("vcpu").map_err(opt)?,
        };
        let ns = |key| -> Result<Option<u64>, String> {
            Ok(o.duration(key).map_err(opt)?.map(duration_ns))
        };
        let cpus = match o.get("cpus") {
            None => None,
            Some(v) => Some(parse_cpu_list(v).ok_or_else(|| {
                format!("{flag} cpus={v}: expected CPU numbers and ranges joined by ':' (1, 0-3, 0-1:4)")
            })?),
        };
        let body = VcpuSchedBody {
            vcpu,
            policy: o.get("policy").unwrap_or("other").to_owned(),
            priority: o.number("priority").map_err(opt)?,
            runtime_ns: ns("runtime")?,
            deadline_ns: ns("deadline")?,
            period_ns: ns("period")?,
            cpus,
        };
        VcpuSched::try_from(body).map_err(|e| {
            // Name the flag's keys, not the JSON fields.
            let message = e.named(flag);
            message
                .replace("runtime_ns", "runtime")
                .replace("deadline_ns", "deadline")
                .replace("period_ns", "period")
        })
    }

    /// Checks what does not depend on the VM or the host.
    pub fn validate(&self) -> Result<(), SchedConfigError> {
        match self.policy {
            SchedPolicy::Other => {}
            SchedPolicy::Fifo { priority } | SchedPolicy::Rr { priority } => {
                if !(1..=MAX_RT_PRIORITY).contains(&priority) {
                    return Err(field_error(
                        "priority",
                        format!(" {priority}: expected 1 to {MAX_RT_PRIORITY}"),
                    ));
                }
            }
            SchedPolicy::Deadline {
                runtime_ns,
                deadline_ns,
                period_ns,
            } => {
                if runtime_ns < MIN_DEADLINE_RUNTIME_NS {
                    return Err(field_error(
                        "runtime_ns",
                        format!(
                            " {}: below the kernel's smallest runtime, {}",
                            short(runtime_ns),
                            short(MIN_DEADLINE_RUNTIME_NS)
                        ),
                    ));
                }
                if runtime_ns > deadline_ns {
                    return Err(field_error(
                        "runtime_ns",
                        format!(
                            " {}: longer than the deadline {}",
                            short(runtime_ns),
                            short(deadline_ns)
                        ),
                    ));
                }
                if deadline_ns > period_ns {
                    return Err(field_error(
                        "deadline_ns",
                        format!(
                            " {}: longer than the period {}",
                            short(deadline_ns),
                            short(period_ns)
                        ),
                    ));
                }
                if period_ns > MAX_DEADLINE_PERIOD_NS {
                    return Err(field_error(
                        "period_ns",
                        format!(
                            " {}: above the kernel's longest period, {}",
                            short(period_ns),
                            short(MAX_DEADLINE_PERIOD_NS)
                        ),
                    ));
                }
                if self.cpus.is_some() {
                    return Err(field_error(
                        "cpus",
                        ": a SCHED_DEADLINE thread cannot be pinned: the kernel admits it on every CPU of its root domain",
                    ));
                }
            }
        }
        if self.cpus.as_ref().is_some_and(|c| c.is_empty()) {
            return Err(field_error("cpus", ": empty: give at least one CPU"));
        }
        Ok(())
    }

    /// The scheduling of each of `vcpu_count` vCPUs: the entry naming it, else
    /// the entry for every vCPU, else the default (time-sharing, any CPU).
    pub fn resolve(
        entries: &[VcpuSched],
        vcpu_count: u32,
    ) -> Result<Vec<VcpuSched>, SchedConfigError> {
        let mut all = None;
        for (i, e) in entries.iter().enumerate() {
            e.validate()?;
            match e.vcpu {
                None if all.is_some() => return Err(SchedConfigError::TwiceAll),
                None => all = Some(e),
                Some(v) if v >= vcpu_count => {
                    return Err(SchedConfigError::NoVcpu {
                        vcpu: v,
                        count: vcpu_count,
                    })
                }
                Some(v) if entries[..i].iter().any(|p| p.vcpu == Some(v)) => {
                    return Err(SchedConfigError::Twice(v))
                }
                Some(_) => {}
            }
        }
        Ok((0..vcpu_count)
            .map(|v| {
                let entry = entries
                    .iter()
                    .find(|e| e.vcpu == Some(v))
                    .or(all)
                    .cloned()
                    .unwrap_or_default();
                VcpuSched {
                    vcpu: Some(v),
                    ..entry
                }
            })
            .collect())
    }
}

/// The RT timer device's limits: what a guest may ask of the host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RtTimerConfig {
    /// Timers per vCPU (1 to 16).
    pub max_timers: u32,
    /// Shortest period a guest may ask for, in µs (10 to 1 000 000).
    pub min_period_us: u32,
    /// Longest boost per expiry, in µs (1 to 1 000 000).
    pub max_budget_us: u32,
    /// The SCHED_FIFO priority a vCPU thread is raised to on expiry (1 to 98;
    /// the timer thread runs one above).
    pub priority: u8,
}

impl Default for RtTimerConfig {
    fn default() -> Self {
        Self {
            max_timers: 4,
            min_period_us: 100,
            max_budget_us: 500,
            priority: 50,
        }
    }
}

/// RT timer limits that cannot be applied.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("rt_timer {field} {value}: expected {range}")]
pub struct RtTimerConfigError {
    pub field: &'static str,
    pub value: u64,
    pub range: &'static str,
}

impl FieldError for RtTimerConfigError {
    fn field(&self) -> &'static str {
        "rt_timer"
    }
}

impl RtTimerConfig {
    /// The option keys of `--rt-timer`.
    pub const KEYS: &'static [&'static str] =
        &["max_timers", "min_period", "max_budget", "priority"];

    /// `on`, or `max_timers=4,min_period=100us,max_budget=500us,priority=50`
    /// (keys left out keep their defaults); `off` gives none.
    pub fn parse(s: &str) -> Result<Option<Self>, String> {
        let flag = "--rt-timer";
        match s {
            "off" => return Ok(None),
            "on" => return Ok(Some(Self::default())),
            _ => {}
        }
        let o = Options::parse(s, Self::KEYS).map_err(|e| e.for_option(flag))?;
        let opt = |e: OptionsError| e.for_option(flag);
        let us = |key| -> Result<Option<u32>, String> {
            o.duration(key)
                .map_err(opt)?
                .map(|d| {
                    u32::try_from(d.as_micros())
                        .map_err(|_| format!("{flag} {key}={}: too long", o.get(key).unwrap_or("")))
                })
                .transpose()
        };
        let d = Self::default();
        let config = Self {
            max_timers: o.number("max_timers").map_err(opt)?.unwrap_or(d.max_timers),
            min_period_us: us("min_period")?.unwrap_or(d.min_period_us),
            max_budget_us: us("max_budget")?.unwrap_or(d.max_budget_us),
            priority: o.number("priority").map_err(opt)?.unwrap_or(d.priority),
        };
        config.validate().map_err(|e| {
            e.to_string()
                .replacen("rt_timer", flag, 1)
                .replace("min_period_us", "min_period (µs)")
                .replace("max_budget_us", "max_budget (µs)")
        })?;
        Ok(Some(config))
    }

    /// Checks each limit's range.
    pub fn validate(&self) -> Result<(), RtTimerConfigError> {
        let check = |field, value: u64, lo: u64, hi: u64, range| {
            if (lo..=hi).contains(&value) {
                Ok(())
            } else {
                Err(RtTimerConfigError {
                    field,
                    value,
                    range,
                })
            }
        };
        check(
            "max_timers",
            self.max_timers.into(),
            1,
            MAX_RT_TIMERS.into(),
            "1 to 16",
        )?;
        check(
            "min_period_us",
            self.min_period_us.into(),
            10,
            1_000_000,
            "10 to 1000000 µs",
        )?;
        check(
            "max_budget_us",
            self.max_budget_us.into(),
            1,
            1_000_000,
            "1 to 1000000 µs",
        )?;
        check("priority", self.priority.into(), 1, 98, "1 to 98")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_policy() {
        let d = VcpuSched::parse("vcpu=1,policy=deadline,runtime=2ms,deadline=5ms,period=10ms")
            .unwrap();
        assert_eq!(d.vcpu, Some(1));
        assert_eq!(
            d.policy,
            SchedPolicy::Deadline {
                runtime_ns: 2_000_000,
                deadline_ns: 5_000_000,
                period_ns: 10_000_000
            }
        );
        assert_eq!(d.policy.describe(), "deadline:2ms/5ms/10ms");
        let f = VcpuSched::parse("policy=fifo,priority=10,cpus=1").unwrap();
        assert_eq!(f.vcpu, None);
        assert_eq!(f.policy, SchedPolicy::Fifo { priority: 10 });
        assert_eq!(f.cpus, Some(vec![1]));
        let o = VcpuSched::parse("vcpu=all,cpus=0-2:5:1").unwrap();
        assert_eq!(o.policy, SchedPolicy::Other);
        assert_eq!(o.cpus, Some(vec![0, 1, 2, 5]));
    }

    #[test]
    fn refuses_bad_entries_naming_the_key() {
        let err = |s| VcpuSched::parse(s).unwrap_err();
        assert!(
            err("policy=fifo").contains("priority: required"),
            "{}",
            err("policy=fifo")
        );
        assert!(err("policy=fifo,priority=0").contains("priority 0: expected 1 to 99"));
        assert!(err("policy=idle").contains("idle: unknown policy"));
        assert!(err("policy=deadline,runtime=20ms,period=10ms")
            .contains("runtime 20ms: longer than the deadline 10ms"));
        assert!(err("policy=deadline,runtime=1ms,period=10ms,cpus=1").contains("cannot be pinned"));
        assert!(err("policy=deadline,runtime=1ms,period=10ms,priority=3")
            .contains("priority: does not apply to policy deadline"));
        assert!(err("cpus=3-1").contains("cpus=3-1: expected CPU numbers"));
        assert!(err("policy=deadline,runtime=100ns,period=10ms").contains("below the kernel"));
    }

    #[test]
    fn resolves_entries_per_vcpu() {
        let all = VcpuSched::parse("policy=fifo,priority=5").unwrap();
        let one = VcpuSched::parse("vcpu=1,policy=other,cpus=0").unwrap();
        let r = VcpuSched::resolve(&[all.clone(), one.clone()], 3).unwrap();
        assert_eq!(r[0].policy, SchedPolicy::Fifo { priority: 5 });
        assert_eq!(r[1].policy, SchedPolicy::Other);
        assert_eq!(r[1].cpus, Some(vec![0]));
        assert_eq!(r[2].vcpu, Some(2));
        assert_eq!(
            VcpuSched::resolve(&[one.clone(), one], 3).unwrap_err(),
            SchedConfigError::Twice(1)
        );
        assert_eq!(
            VcpuSched::resolve(&[all.clone(), all], 3).unwrap_err(),
            SchedConfigError::TwiceAll
        );
        let far = VcpuSched::parse("vcpu=4").unwrap();
        assert_eq!(
            VcpuSched::resolve(&[far], 2).unwrap_err().to_string(),
            "vcpu_sched vcpu=4: the VM has 2 vCPU(s), 0 to 1"
        );
    }

    #[test]
    fn json_bodies_check_their_fields() {
        let body: VcpuSchedBody = serde_json::from_str(
            r#"{"vcpu":0,"policy":"deadline","runtime_ns":2000000,"period_ns":10000000}"#,
        )
        .unwrap();
        let entry = VcpuSched::try_from(body).unwrap();
        assert_eq!(entry.policy.bandwidth(), 0.2);
        assert_eq!(
            serde_json::to_value(&entry).unwrap(),
            serde_json::json!({"vcpu":0,"policy":"deadline","runtime_ns":2000000,
                "deadline_ns":10000000,"period_ns":10000000})
        );
        assert!(serde_json::from_str::<VcpuSchedBody>(r#"{"policy":"other","prio":1}"#).is_err());
    }

    #[test]
    fn rt_timer_options() {
        assert_eq!(RtTimerConfig::parse("off").unwrap(), None);
        assert_eq!(
            RtTimerConfig::parse("on").unwrap(),
            Some(RtTimerConfig::default())
        );
        let c = RtTimerConfig::parse("max_timers=2,min_period=1ms,max_budget=50us")
            .unwrap()
            .unwrap();
        assert_eq!(
            (c.max_timers, c.min_period_us, c.max_budget_us),
            (2, 1000, 50)
        );
        assert!(RtTimerConfig::parse("max_timers=99")
            .unwrap_err()
            .contains("--rt-timer max_timers 99: expected 1 to 16"));
        assert!(RtTimerConfig::parse("priority=99")
            .unwrap_err()
            .contains("1 to 98"));
    }
}
