//! Introspection: how the integrity monitor watches the guest kernel, in one
//! form for every surface (`vigil run --introspect`, `vigil-ctl create
//! --introspect`, `PUT /vigil/introspect`, the daemon's `POST /vms`).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::FieldError;
use crate::options::{Options, OptionsError};

/// The shortest period between two checks.
pub const MIN_PERIOD: Duration = Duration::from_millis(1);
/// The longest period between two checks, and the longest wait for the baseline.
pub const MAX_PERIOD: Duration = Duration::from_secs(3600);

/// What the monitor does about a guest write to a syscall MSR after the baseline.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Policy {
    /// Report it and let it happen.
    #[default]
    Report,
    /// Report it and refuse it: the guest's `wrmsr` raises #GP.
    Protect,
}

impl Policy {
    pub const fn as_str(self) -> &'static str {
        match self {
            Policy::Report => "report",
            Policy::Protect => "protect",
        }
    }
}

impl<'de> Deserialize<'de> for Policy {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

impl FromStr for Policy {
    type Err = IntrospectConfigError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "report" => Ok(Policy::Report),
            "protect" => Ok(Policy::Protect),
            other => Err(IntrospectConfigError::Policy(other.to_owned())),
        }
    }
}

/// How the integrity monitor runs, as given: what is left out takes its default
/// where the monitor starts ([`IntrospectConfig::period`], ...). In JSON:
/// `{"period_ms", "policy", "baseline_after_ms"}`, each optional; as an option
/// string: `period=100ms,policy=protect,baseline_after=30s`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntrospectConfig {
    /// Time between two checks (default 1 s).
    #[serde(
        rename = "period_ms",
        with = "millis",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub period: Option<Duration>,
    /// What a guest write to a syscall MSR meets (default: report).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<Policy>,
    /// How long after the monitor starts the baseline is taken (default: 1 s
    /// when it starts with the VM, to let the kernel set itself up; at once on a
    /// running VM).
    #[serde(
        rename = "baseline_after_ms",
        with = "millis",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub baseline_after: Option<Duration>,
}

/// The period when none is given.
pub const DEFAULT_PERIOD: Duration = Duration::from_secs(1);

/// The baseline's delay when the monitor starts with the VM and none is given:
/// time for the kernel to set itself up.
pub const BOOT_BASELINE_AFTER: Duration = Duration::from_secs(1);

impl IntrospectConfig {
    /// The period between two checks.
    pub fn period(&self) -> Duration {
        self.period.unwrap_or(DEFAULT_PERIOD)
    }

    /// The policy for syscall MSR writes.
    pub fn policy(&self) -> Policy {
        self.policy.unwrap_or_default()
    }

    /// The baseline's delay, `default` when none was given.
    pub fn baseline_after_or(&self, default: Duration) -> Duration {
        self.baseline_after.unwrap_or(default)
    }
}

mod millis {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(Duration::from_millis))
    }
}

/// Introspection settings outside their bounds.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IntrospectConfigError {
    #[error("period_ms {0}: expected 1 to 3600000 (1 ms to 1 h)")]
    Period(u128),
    #[error("baseline_after_ms {0}: expected 0 to 3600000 (at most 1 h)")]
    BaselineAfter(u128),
    #[error("policy {0:?}: expected report (tell) or protect (tell and refuse MSR writes)")]
    Policy(String),
    #[error("{0}")]
    Options(OptionsError),
}

impl FieldError for IntrospectConfigError {
    fn field(&self) -> &'static str {
        match self {
            Self::Period(_) => "period_ms",
            Self::BaselineAfter(_) => "baseline_after_ms",
            Self::Policy(_) => "policy",
            Self::Options(_) => "introspect",
        }
    }
}

impl IntrospectConfig {
    /// Refuses settings outside the bounds, naming the field and value.
    pub fn validate(&self) -> Result<(), IntrospectConfigError> {
        if let Some(p) = self.period.filter(|p| *p < MIN_PERIOD || *p > MAX_PERIOD) {
            return Err(IntrospectConfigError::Period(p.as_millis()));
        }
        if let Some(b) = self.baseline_after.filter(|b| *b > MAX_PERIOD) {
            return Err(IntrospectConfigError::BaselineAfter(b.as_millis()));
        }
        Ok(())
    }
}

impl IntrospectConfig {
    /// The settings of an option string, `[period=DUR][,policy=report|protect]
    /// [,baseline_after=DUR]` (or `period_ms=N`, `baseline_after_ms=N`, as in
    /// JSON), not yet validated: a client passes them on for the VMM or the
    /// daemon to judge.
    pub fn from_options(s: &str) -> Result<Self, IntrospectConfigError> {
        let o = Options::parse(
            s,
            &[
                "period",
                "period_ms",
                "policy",
                "baseline_after",
                "baseline_after_ms",
            ],
        )
        .map_err(IntrospectConfigError::Options)?;
        let duration = |key: &str, ms_key: &str| -> Result<Option<Duration>, OptionsError> {
            match o.duration(key)? {
                Some(d) => Ok(Some(d)),
                None => Ok(o.number::<u64>(ms_key)?.map(Duration::from_millis)),
            }
        };
        Ok(IntrospectConfig {
            period: duration("period", "period_ms").map_err(IntrospectConfigError::Options)?,
            policy: o.get("policy").map(str::parse).transpose()?,
            baseline_after: duration("baseline_after", "baseline_after_ms")
                .map_err(IntrospectConfigError::Options)?,
        })
    }
}

impl FromStr for IntrospectConfig {
    type Err = IntrospectConfigError;

    /// [`IntrospectConfig::from_options`], validated.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let config = Self::from_options(s)?;
        config.validate()?;
        Ok(config)
    }
}

impl fmt::Display for IntrospectConfig {
    /// The option string [`FromStr`] reads back: `period=100ms,policy=protect`
    /// (only what was given).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(p) = self.period {
            parts.push(format!("period={}ms", p.as_millis()));
        }
        if let Some(p) = self.policy {
            parts.push(format!("policy={}", p.as_str()));
        }
        if let Some(b) = self.baseline_after {
            parts.push(format!("baseline_after={}ms", b.as_millis()));
        }
        f.write_str(&parts.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_strings_round_trip_and_are_checked() {
        let c: IntrospectConfig = "period=100ms,policy=protect".parse().unwrap();
        assert_eq!(c.period(), Duration::from_millis(100));
        assert_eq!(c.policy(), Policy::Protect);
        assert_eq!(
            c.baseline_after_or(BOOT_BASELINE_AFTER),
            BOOT_BASELINE_AFTER
        );
        assert_eq!(c.to_string(), "period=100ms,policy=protect");
        assert_eq!(c.to_string().parse::<IntrospectConfig>().unwrap(), c);
        let d: IntrospectConfig = "".parse().unwrap();
        assert_eq!(d, IntrospectConfig::default());
        assert_eq!(d.period(), DEFAULT_PERIOD);
        assert_eq!(d.to_string(), "");
        for (bad, needle) in [
            ("period=0ms", "period_ms 0: expected 1 to 3600000"),
            ("period=2h", "period_ms 7200000"),
            ("baseline_after=2h", "baseline_after_ms 7200000"),
            ("policy=block", "policy \"block\""),
            ("speed=1", "unknown key \"speed\""),
            ("period=fast", "period=fast: expected a number and a unit"),
            ("period_ms=0", "period_ms 0: expected 1 to 3600000"),
            ("period_ms=soon", "period_ms=soon: not a number"),
        ] {
            let e = bad.parse::<IntrospectConfig>().unwrap_err().to_string();
            assert!(e.contains(needle), "{bad}: {e}");
        }
    }

    #[test]
    fn json_takes_milliseconds() {
        let c: IntrospectConfig =
            serde_json::from_str(r#"{"period_ms": 250, "policy": "protect"}"#).unwrap();
        assert_eq!(c.period(), Duration::from_millis(250));
        assert_eq!(c.baseline_after, None);
        let v = serde_json::to_value(c).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"period_ms": 250, "policy": "protect"})
        );
        assert_eq!(
            serde_json::to_value(IntrospectConfig::default()).unwrap(),
            serde_json::json!({})
        );
        assert!(serde_json::from_str::<IntrospectConfig>(r#"{"speed": 1}"#).is_err());
    }
}
