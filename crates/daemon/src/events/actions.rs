//! The policy's actions on the daemon's VMs (throttle, pause, stop, through the
//! supervisor), and the checks of their params that `vigil-events` cannot make.

use std::collections::BTreeMap;
use std::sync::Weak;

use serde_json::Value;
use vigil_events::{Action, ActionKind, ActionSink, EventsConfigError};

use super::EventsSettings;
use crate::supervisor::{StopMethod, Supervisor, SupervisorError};

/// Throttle parameters a policy rule may give (all per second, all optional, at
/// least one): `ops_per_s` and `bytes_per_s` apply to drives and interfaces,
/// the `disk_`/`net_` ones to one kind only (and win over the general ones).
pub const THROTTLE_PARAMS: [&str; 6] = [
    "ops_per_s",
    "bytes_per_s",
    "disk_ops_per_s",
    "disk_bytes_per_s",
    "net_packets_per_s",
    "net_bytes_per_s",
];

/// Throttle parameters a policy rule (named `rule`) gets wrong.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ThrottleParamError {
    #[error("policy rule {rule:?}: params.{key} {value}: give a whole number above 0")]
    NotPositive {
        rule: String,
        key: &'static str,
        value: Value,
    },
    #[error("policy rule {rule:?}: unknown throttle parameter {key:?} (expected {})", THROTTLE_PARAMS.join(", "))]
    Unknown { rule: String, key: String },
    #[error("policy rule {rule:?}: a throttle needs params, e.g. {{\"ops_per_s\": 100}} (any of {})", THROTTLE_PARAMS.join(", "))]
    Missing { rule: String },
}

/// An `--events-config` the daemon cannot act on.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SettingsError {
    #[error("--events-config: {0}")]
    Config(#[from] EventsConfigError),
    #[error("--events-config: {0}")]
    Throttle(#[from] ThrottleParamError),
    /// A pause or stop rule with params (`key` is the first).
    #[error("--events-config: policy rule {rule:?}: {action} takes no params, got {key:?}")]
    UnexpectedParams {
        rule: String,
        action: ActionKind,
        key: String,
    },
}

/// Why a policy's action on a VM failed (the `policy.error` of its event).
#[derive(Debug, thiserror::Error)]
pub enum ActionError {
    #[error("the daemon is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Params(#[from] ThrottleParamError),
    #[error(transparent)]
    Supervisor(#[from] SupervisorError),
    #[error("VM {id:?} is {state}: nothing to stop")]
    NotLive { id: String, state: &'static str },
}

/// The rate limits a throttle action sets, from its parameters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ThrottleLimits {
    pub disk_ops: Option<u64>,
    pub disk_bytes: Option<u64>,
    pub net_packets: Option<u64>,
    pub net_bytes: Option<u64>,
}

impl ThrottleLimits {
    /// Reads a throttle action's parameters; `rule` names the policy rule in errors.
    pub fn from_params(
        rule: &str,
        params: &BTreeMap<String, Value>,
    ) -> Result<Self, ThrottleParamError> {
        let get = |key: &'static str| match params.get(key) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) if n > 0 => Ok(Some(n)),
                _ => Err(ThrottleParamError::NotPositive {
                    rule: rule.into(),
                    key,
                    value: v.clone(),
                }),
            },
        };
        let ops = get("ops_per_s")?;
        let bytes = get("bytes_per_s")?;
        let limits = ThrottleLimits {
            disk_ops: get("disk_ops_per_s")?.or(ops),
            disk_bytes: get("disk_bytes_per_s")?.or(bytes),
            net_packets: get("net_packets_per_s")?.or(ops),
            net_bytes: get("net_bytes_per_s")?.or(bytes),
        };
        if let Some(unknown) = params
            .keys()
            .find(|k| !THROTTLE_PARAMS.contains(&k.as_str()))
        {
            return Err(ThrottleParamError::Unknown {
                rule: rule.into(),
                key: unknown.clone(),
            });
        }
        if limits == ThrottleLimits::default() {
            return Err(ThrottleParamError::Missing { rule: rule.into() });
        }
        Ok(limits)
    }

    /// A Firecracker `rate_limiter` body: a token bucket per limit, refilled each
    /// second; `None` when neither limit is set.
    pub fn rate_limiter(ops: Option<u64>, bytes: Option<u64>) -> Option<Value> {
        let bucket = |size: u64| serde_json::json!({"size": size, "refill_time": 1000});
        let mut body = serde_json::Map::new();
        if let Some(n) = ops {
            body.insert("ops".into(), bucket(n));
        }
        if let Some(n) = bytes {
            body.insert("bandwidth".into(), bucket(n));
        }
        (!body.is_empty()).then_some(Value::Object(body))
    }
}

/// Checks what `vigil-events` cannot: the parameters of each policy action.
pub fn validate_settings(settings: &EventsSettings) -> Result<(), SettingsError> {
    settings.config.validate()?;
    for (i, rule) in settings.config.policy.rules.iter().enumerate() {
        let name = if rule.name.is_empty() {
            format!("#{i}")
        } else {
            rule.name.clone()
        };
        match rule.action {
            ActionKind::Throttle => {
                ThrottleLimits::from_params(&name, &rule.params)?;
            }
            ActionKind::Pause | ActionKind::Stop => {
                if let Some(key) = rule.params.keys().next() {
                    return Err(SettingsError::UnexpectedParams {
                        rule: name,
                        action: rule.action,
                        key: key.clone(),
                    });
                }
            }
        }
    }
    Ok(())
}

/// Executes the policy's actions on the daemon's VMs.
pub struct DaemonActions {
    pub(super) supervisor: Weak<Supervisor>,
    pub(super) runtime: tokio::runtime::Handle,
}

impl ActionSink for DaemonActions {
    type Error = ActionError;

    fn execute(&mut self, action: &Action) -> Result<(), ActionError> {
        let supervisor = self.supervisor.upgrade().ok_or(ActionError::ShuttingDown)?;
        let id = action.vm_id.as_str();
        match action.kind {
            ActionKind::Throttle => {
                let limits = ThrottleLimits::from_params(&action.policy_rule, &action.params)?;
                let done = self.runtime.block_on(supervisor.throttle(id, limits))?;
                tracing::warn!(id, rule = %action.policy_rule, "policy: throttled {}", done.join(", "));
                Ok(())
            }
            ActionKind::Pause => {
                self.runtime.block_on(supervisor.set_paused(id, true))?;
                tracing::warn!(id, rule = %action.policy_rule, "policy: paused");
                Ok(())
            }
            ActionKind::Stop => {
                // A stop waits for the process to end (up to the stop timeout):
                // start it, and let the engine go on.
                let vm = supervisor.get(id)?;
                let state = vm.state();
                if !state.is_live() {
                    return Err(ActionError::NotLive {
                        id: id.into(),
                        state: state.as_str(),
                    });
                }
                let timeout = supervisor.config().stop_timeout;
                let id = id.to_owned();
                tracing::warn!(id, rule = %action.policy_rule, "policy: stopping");
                self.runtime.spawn(async move {
                    let _ = supervisor.stop(&id, StopMethod::Sigterm, timeout).await;
                });
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn params(v: Value) -> BTreeMap<String, Value> {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn throttle_params() {
        let l = ThrottleLimits::from_params("r", &params(json!({"ops_per_s": 100}))).unwrap();
        assert_eq!(l.disk_ops, Some(100));
        assert_eq!(l.net_packets, Some(100));
        assert_eq!(l.disk_bytes, None);
        let l = ThrottleLimits::from_params(
            "r",
            &params(json!({"ops_per_s": 100, "disk_ops_per_s": 5, "net_bytes_per_s": 1000})),
        )
        .unwrap();
        assert_eq!(
            l,
            ThrottleLimits {
                disk_ops: Some(5),
                disk_bytes: None,
                net_packets: Some(100),
                net_bytes: Some(1000)
            }
        );
        let throttle_err = |p: Value| {
            ThrottleLimits::from_params("slow", &params(p))
                .unwrap_err()
                .to_string()
        };
        let e = throttle_err(json!({"ops": 1}));
        assert!(e.contains("\"slow\"") && e.contains("\"ops\""), "{e}");
        let e = throttle_err(json!({"ops_per_s": 0}));
        assert!(e.contains("params.ops_per_s 0"), "{e}");
        let e = throttle_err(json!({"ops_per_s": "x"}));
        assert!(e.contains("params.ops_per_s \"x\""), "{e}");
        assert!(ThrottleLimits::from_params("slow", &params(json!({}))).is_err());
        assert_eq!(
            ThrottleLimits::rate_limiter(Some(100), None),
            Some(json!({"ops": {"size": 100, "refill_time": 1000}}))
        );
        assert_eq!(ThrottleLimits::rate_limiter(None, None), None);
    }

    #[test]
    fn settings_are_checked() {
        let mut s = EventsSettings::default();
        assert!(validate_settings(&s).is_ok());
        s.config = serde_json::from_value(json!({"policy": {"rules": [
            {"name": "p", "when": {"rule": "vm_crashed"}, "action": "pause", "params": {"x": 1}}
        ]}}))
        .unwrap();
        let e = validate_settings(&s).unwrap_err().to_string();
        assert!(e.contains("\"p\"") && e.contains("\"x\""), "{e}");
        s.config = serde_json::from_value(json!({"policy": {"rules": [
            {"when": {"rule": "vm_io_flood"}, "action": "throttle"}
        ]}}))
        .unwrap();
        assert!(validate_settings(&s)
            .unwrap_err()
            .to_string()
            .contains("\"#0\""));
    }
}
