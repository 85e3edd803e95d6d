//! Reading a system description (TOML or JSON) and checking every value, so that the
//! analysis only ever sees a valid [`System`]. Errors name the field and its value.

use serde::Deserialize;

use crate::model::{deadline_monotonic, Host, Scheduler, System, Task, Vm};
use crate::time::{display_duration, parse_duration, Nanos, NS_PER_US};

/// The kernel's default `sched_rt_runtime_us / sched_rt_period_us`, in millionths.
pub const DEFAULT_UTILIZATION_LIMIT_PPM: u64 = 950_000;
/// The kernel's default `sched_deadline_period_min_us`: the shortest period
/// SCHED_DEADLINE accepts, so the shortest interface period worth searching.
pub const DEFAULT_MIN_PERIOD: Nanos = 100 * NS_PER_US;
pub const DEFAULT_RESOLUTION: Nanos = NS_PER_US;
const MAX_CORES: u64 = 4096;
const MAX_TASKS: usize = 100_000;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InputError {
    #[error("cannot read the {format} document: {message}")]
    Syntax {
        format: &'static str,
        message: String,
    },
    #[error("{field} {value}: {why}")]
    Invalid {
        field: String,
        value: String,
        why: String,
    },
    #[error("{0}")]
    Unsupported(String),
}

fn invalid(
    field: impl Into<String>,
    value: impl Into<String>,
    why: impl Into<String>,
) -> InputError {
    InputError::Invalid {
        field: field.into(),
        value: value.into(),
        why: why.into(),
    }
}

/// The document's format: by the file's extension, else by its first character.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Toml,
    Json,
}

pub fn detect_format(path: Option<&str>, text: &str) -> Result<Format, InputError> {
    let extension = path
        .and_then(|p| p.rsplit_once('.'))
        .map(|(_, e)| e.to_ascii_lowercase());
    match extension.as_deref() {
        Some("toml") => return Ok(Format::Toml),
        Some("json") => return Ok(Format::Json),
        Some("xml") => return Err(xml_unsupported()),
        _ => {}
    }
    match text.trim_start().chars().next() {
        Some('{') => Ok(Format::Json),
        Some('<') => Err(xml_unsupported()),
        _ => Ok(Format::Toml),
    }
}

fn xml_unsupported() -> InputError {
    InputError::Unsupported(
        "XML (CARTS) input is not read: describe the system in TOML or JSON \
         (see `vigil rt analyze --help`)"
            .into(),
    )
}

/// A time as written: a string with a unit, or an integer number of microseconds.
#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
enum RawTime {
    Micros(i64),
    Text(String),
    Other(serde_json::Value),
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawSystem {
    host: RawHost,
    #[serde(default)]
    vms: Vec<RawVm>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawHost {
    cores: i64,
    utilization_limit: Option<f64>,
    min_period: Option<RawTime>,
    resolution: Option<RawTime>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawVm {
    name: String,
    scheduler: String,
    period: Option<RawTime>,
    max_vcpus: Option<i64>,
    #[serde(default)]
    tasks: Vec<RawTask>,
}

#[derive(Deserialize, Debug)]
#[serde(deny_unknown_fields)]
struct RawTask {
    name: String,
    period: RawTime,
    deadline: Option<RawTime>,
    wcet: RawTime,
    priority: Option<i64>,
}

/// Reads and checks a system description.
pub fn parse_system(text: &str, format: Format) -> Result<System, InputError> {
    let raw: RawSystem = match format {
        Format::Toml => toml::from_str(text).map_err(|e| InputError::Syntax {
            format: "TOML",
            message: e.to_string().trim_end().to_string(),
        })?,
        Format::Json => serde_json::from_str(text).map_err(|e| InputError::Syntax {
            format: "JSON",
            message: e.to_string(),
        })?,
    };
    validate(raw)
}

fn time(field: &str, raw: &RawTime) -> Result<Nanos, InputError> {
    match raw {
        RawTime::Micros(us) => {
            let ns = u64::try_from(*us)
                .ok()
                .and_then(|us| us.checked_mul(NS_PER_US))
                .filter(|ns| *ns <= crate::time::MAX_TIME);
            ns.ok_or_else(|| {
                invalid(
                    field,
                    us.to_string(),
                    "not a time from 0 to 1h (integers are microseconds)",
                )
            })
        }
        RawTime::Text(text) => {
            parse_duration(text).map_err(|why| invalid(field, format!("\"{text}\""), why))
        }
        RawTime::Other(value) => Err(invalid(
            field,
            value.to_string(),
            "not a time: write a string with a unit (\"2.5ms\") or an integer of microseconds",
        )),
    }
}

fn positive_time(field: &str, raw: &RawTime) -> Result<Nanos, InputError> {
    let ns = time(field, raw)?;
    if ns == 0 {
        return Err(invalid(
            field,
            display_duration(0),
            "must be more than zero",
        ));
    }
    Ok(ns)
}

fn validate(raw: RawSystem) -> Result<System, InputError> {
    let host = validate_host(&raw.host)?;
    if raw.vms.is_empty() {
        return Err(invalid("vms", "[]", "no VMs to analyse"));
    }
    let mut vms = Vec::with_capacity(raw.vms.len());
    for (v, raw_vm) in raw.vms.iter().enumerate() {
        let vm = validate_vm(&format!("vms[{v}]"), raw_vm, &host)?;
        if let Some(other) = vms.iter().position(|o: &Vm| o.name == vm.name) {
            return Err(invalid(
                format!("vms[{v}].name"),
                format!("\"{}\"", vm.name),
                format!("vms[{other}] has the same name"),
            ));
        }
        vms.push(vm);
    }
    Ok(System { host, vms })
}

fn validate_host(raw: &RawHost) -> Result<Host, InputError> {
    let cores = u64::try_from(raw.cores)
        .ok()
        .filter(|c| (1..=MAX_CORES).contains(c))
        .ok_or_else(|| {
            invalid(
                "host.cores",
                raw.cores.to_string(),
                format!("must be 1 to {MAX_CORES}"),
            )
        })?;
    let utilization_limit_ppm = match raw.utilization_limit {
        None => DEFAULT_UTILIZATION_LIMIT_PPM,
        Some(limit) if limit > 0.0 && limit <= 1.0 => {
            // A share of a core, read to a millionth as the kernel's
            // sched_rt_runtime_us is.
            (limit * 1e6).round() as u64
        }
        Some(limit) => {
            return Err(invalid(
                "host.utilization_limit",
                limit.to_string(),
                "must be more than 0 and at most 1 (the kernel's sched_rt_runtime_us / sched_rt_period_us)",
            ))
        }
    };
    if utilization_limit_ppm == 0 {
        return Err(invalid(
            "host.utilization_limit",
            "0",
            "must be at least a millionth",
        ));
    }
    let resolution = match &raw.resolution {
        None => DEFAULT_RESOLUTION,
        Some(raw) => positive_time("host.resolution", raw)?,
    };
    let min_period = match &raw.min_period {
        None => DEFAULT_MIN_PERIOD,
        Some(raw) => positive_time("host.min_period", raw)?,
    };
    let min_period = min_period.div_ceil(resolution) * resolution;
    Ok(Host {
        cores: cores as u32,
        utilization_limit_ppm,
        min_period,
        resolution,
    })
}

fn validate_vm(field: &str, raw: &RawVm, host: &Host) -> Result<Vm, InputError> {
    if raw.name.trim().is_empty() {
        return Err(invalid(
            format!("{field}.name"),
            "\"\"",
            "a VM needs a name",
        ));
    }
    let scheduler = match raw.scheduler.as_str() {
        "edf" | "EDF" => Scheduler::Edf,
        "fp" | "FP" | "rm" | "dm" => Scheduler::Fp,
        other => {
            return Err(invalid(
                format!("{field}.scheduler"),
                format!("\"{other}\""),
                "is not one of edf, fp",
            ))
        }
    };
    let period = match &raw.period {
        None => None,
        Some(raw_period) => {
            let f = format!("{field}.period");
            let period = positive_time(&f, raw_period)?;
            if !period.is_multiple_of(host.resolution) {
                return Err(invalid(
                    f,
                    display_duration(period),
                    format!(
                        "not a multiple of host.resolution {}",
                        display_duration(host.resolution)
                    ),
                ));
            }
            Some(period)
        }
    };
    if raw.tasks.is_empty() {
        return Err(invalid(
            format!("{field}.tasks"),
            "[]",
            "a VM needs at least one task",
        ));
    }
    if raw.tasks.len() > MAX_TASKS {
        return Err(invalid(
            format!("{field}.tasks"),
            format!("{} tasks", raw.tasks.len()),
            format!("more than {MAX_TASKS}"),
        ));
    }
    let with_priority = raw.tasks.iter().filter(|t| t.priority.is_some()).count();
    if with_priority != 0 && with_priority != raw.tasks.len() {
        let missing = raw
            .tasks
            .iter()
            .position(|t| t.priority.is_none())
            .unwrap_or(0);
        return Err(invalid(
            format!("{field}.tasks[{missing}].priority"),
            "(none)",
            "either every task of a VM gives a priority or none does",
        ));
    }
    let mut tasks: Vec<Task> = Vec::with_capacity(raw.tasks.len());
    for (t, raw_task) in raw.tasks.iter().enumerate() {
        let task = validate_task(&format!("{field}.tasks[{t}]"), raw_task)?;
        if let Some(other) = tasks.iter().position(|o| o.name == task.name) {
            return Err(invalid(
                format!("{field}.tasks[{t}].name"),
                format!("\"{}\"", task.name),
                format!("{field}.tasks[{other}] has the same name"),
            ));
        }
        tasks.push(task);
    }
    if with_priority == 0 {
        deadline_monotonic(&mut tasks);
    }
    // Σ C/T more than the cores: no number of vCPUs helps. Exact: C/T > cores
    // compared through a common scale, rounding every share down.
    let scaled: u128 = tasks
        .iter()
        .map(|t| (u128::from(t.wcet) << 40) / u128::from(t.period))
        .sum();
    if scaled > u128::from(host.cores) << 40 {
        return Err(invalid(
            format!("{field}.tasks"),
            format!("utilization {:.3}", scaled as f64 / (1u64 << 40) as f64),
            format!("more than the host's {} cores", host.cores),
        ));
    }
    let max_vcpus = match raw.max_vcpus {
        None => host.cores.min(tasks.len() as u32),
        Some(m) => u32::try_from(m).ok().filter(|m| *m >= 1).ok_or_else(|| {
            invalid(
                format!("{field}.max_vcpus"),
                m.to_string(),
                "must be at least 1",
            )
        })?,
    };
    Ok(Vm {
        name: raw.name.clone(),
        scheduler,
        period,
        max_vcpus,
        tasks,
    })
}

fn validate_task(field: &str, raw: &RawTask) -> Result<Task, InputError> {
    if raw.name.trim().is_empty() {
        return Err(invalid(
            format!("{field}.name"),
            "\"\"",
            "a task needs a name",
        ));
    }
    let period = positive_time(&format!("{field}.period"), &raw.period)?;
    let deadline = match &raw.deadline {
        None => period,
        Some(d) => positive_time(&format!("{field}.deadline"), d)?,
    };
    if deadline > period {
        return Err(invalid(
            format!("{field}.deadline"),
            display_duration(deadline),
            format!(
                "larger than its period {} (only deadlines up to the period are analysed)",
                display_duration(period)
            ),
        ));
    }
    let wcet = positive_time(&format!("{field}.wcet"), &raw.wcet)?;
    if wcet > deadline {
        return Err(invalid(
            format!("{field}.wcet"),
            display_duration(wcet),
            format!("larger than its deadline {}", display_duration(deadline)),
        ));
    }
    let priority = match raw.priority {
        None => 0,
        Some(p) => u64::try_from(p).map_err(|_| {
            invalid(
                format!("{field}.priority"),
                p.to_string(),
                "must be 0 or more",
            )
        })?,
    };
    Ok(Task {
        name: raw.name.clone(),
        period,
        deadline,
        wcet,
        priority,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(text: &str) -> String {
        parse_system(text, Format::Toml).unwrap_err().to_string()
    }

    const HOST: &str = "[host]\ncores = 2\n";

    #[test]
    fn reads_toml_and_json() {
        let toml = format!(
            "{HOST}[[vms]]\nname = \"ctl\"\nscheduler = \"fp\"\n\
             tasks = [{{ name = \"a\", period = \"10ms\", wcet = 2000 }},\n\
                      {{ name = \"b\", period = \"5ms\", deadline = \"4ms\", wcet = \"1ms\" }}]\n"
        );
        let system = parse_system(&toml, Format::Toml).unwrap();
        assert_eq!(system.host.cores, 2);
        assert_eq!(system.host.utilization_limit_ppm, 950_000);
        assert_eq!(system.host.min_period, 100_000);
        let tasks = &system.vms[0].tasks;
        assert_eq!(tasks[0].wcet, 2_000_000);
        assert_eq!(tasks[0].deadline, 10_000_000);
        // Deadline monotonic: b (4ms) before a (10ms).
        assert!(tasks[1].priority > tasks[0].priority);

        let json = r#"{"host":{"cores":1,"utilization_limit":0.5},
            "vms":[{"name":"v","scheduler":"edf","period":"1ms",
                    "tasks":[{"name":"t","period":10000,"wcet":"1ms"}]}]}"#;
        assert_eq!(detect_format(None, json), Ok(Format::Json));
        let system = parse_system(json, Format::Json).unwrap();
        assert_eq!(system.host.utilization_limit_ppm, 500_000);
        assert_eq!(system.vms[0].period, Some(1_000_000));
    }

    #[test]
    fn errors_name_the_field_and_value() {
        let vm = |tasks: &str| {
            format!("{HOST}[[vms]]\nname = \"v\"\nscheduler = \"edf\"\ntasks = [{tasks}]\n")
        };
        assert_eq!(
            error(&vm(r#"{ name = "a", period = "10ms", wcet = "12ms" }"#)),
            "vms[0].tasks[0].wcet 12ms: larger than its deadline 10ms"
        );
        assert_eq!(
            error(&vm(r#"{ name = "a", period = "0ms", wcet = "1ms" }"#)),
            "vms[0].tasks[0].period 0ns: must be more than zero"
        );
        assert_eq!(
            error(&vm(r#"{ name = "a", period = "10ms", deadline = "11ms", wcet = "1ms" }"#)),
            "vms[0].tasks[0].deadline 11ms: larger than its period 10ms (only deadlines up to the period are analysed)"
        );
        assert!(error(&vm(
            r#"{ name = "a", period = "10 parsecs", wcet = "1ms" }"#
        ))
        .starts_with("vms[0].tasks[0].period \"10 parsecs\": unknown unit"));
        assert!(error(&vm(r#"{ name = "a", period = 1.5, wcet = "1ms" }"#))
            .starts_with("vms[0].tasks[0].period 1.5: not a time"));
        assert!(error(&vm(r#"{ name = "a", period = -3, wcet = "1ms" }"#))
            .starts_with("vms[0].tasks[0].period -3: not a time"));
        assert_eq!(
            error(&vm(
                r#"{ name = "a", period = "1ms", wcet = "1ms" }, { name = "b", period = "1ms", wcet = "1ms" },
                   { name = "c", period = "1ms", wcet = "1ms" }"#
            )),
            "vms[0].tasks utilization 3.000: more than the host's 2 cores"
        );
        assert_eq!(
            error(&vm("")),
            "vms[0].tasks []: a VM needs at least one task"
        );
        assert_eq!(
            error(&vm(
                r#"{ name = "a", period = "1ms", wcet = "1us" }, { name = "a", period = "1ms", wcet = "1us" }"#
            )),
            "vms[0].tasks[1].name \"a\": vms[0].tasks[0] has the same name"
        );
        assert_eq!(
            error(&vm(r#"{ name = "a", period = "1ms", wcet = "1us", priority = 3 }, { name = "b", period = "1ms", wcet = "1us" }"#)),
            "vms[0].tasks[1].priority (none): either every task of a VM gives a priority or none does"
        );
        assert_eq!(
            error("[host]\ncores = 0\n"),
            "host.cores 0: must be 1 to 4096"
        );
        assert!(error("[host]\ncores = 2\nutilization_limit = 1.5\n")
            .starts_with("host.utilization_limit 1.5: must be"));
        assert_eq!(error(HOST), "vms []: no VMs to analyse");
        assert_eq!(
            error(&format!(
                "{HOST}[[vms]]\nname = \"v\"\nscheduler = \"lottery\"\n"
            )),
            "vms[0].scheduler \"lottery\": is not one of edf, fp"
        );
        assert_eq!(
            error(&format!(
                "{HOST}[[vms]]\nname = \"v\"\nscheduler = \"edf\"\nperiod = \"1500ns\"\ntasks = [{{ name = \"a\", period = \"1ms\", wcet = \"1us\" }}]\n"
            )),
            "vms[0].period 1.5us: not a multiple of host.resolution 1us"
        );
        assert!(error("[host]\ncores = 2\nspeed = 3\n").contains("unknown field"));
        assert!(error("[host\n").starts_with("cannot read the TOML document"));
        assert!(matches!(
            detect_format(Some("x.xml"), ""),
            Err(InputError::Unsupported(_))
        ));
    }
}
