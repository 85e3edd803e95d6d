//! The policy's actions on the daemon's VMs (throttle, pause, stop, through the
//! supervisor), and the checks of their params that `vigil-events` cannot make.

use std::collections::BTreeMap;
use std::sync::Weak;

use serde_json::Value;
use vigil_events::{Action, ActionKind, ActionSink};

use super::EventsSettings;
use crate::supervisor::{StopMethod, Supervisor};

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
    pub fn from_params(rule: &str, params: &BTreeMap<String, Value>) -> Result<Self, String> {
        let get = |key: &str| -> Result<Option<u64>, String> {
            match params.get(key) {
                None => Ok(None),
                Some(v) => match v.as_u64() {
                    Some(n) if n > 0 => Ok(Some(n)),
                    _ => Err(format!(
                        "policy rule {rule:?}: params.{key} {v}: give a whole number above 0"
                    )),
                },
            }
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
            return Err(format!(
                "policy rule {rule:?}: unknown throttle parameter {unknown:?} (expected {})",
                THROTTLE_PARAMS.join(", ")
            ));
        }
        if limits == ThrottleLimits::default() {
            return Err(format!(
                "policy rule {rule:?}: a throttle needs params, e.g. {{\"ops_per_s\": 100}} (any of {})",
                THROTTLE_PARAMS.join(", ")
            ));
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
pub fn validate_settings(settings: &EventsSettings) -> Result<(), String> {
    settings
        .config
        .validate()
        .map_err(|e| format!("--events-config: {e}"))?;
    for (i, rule) in settings.config.policy.rules.iter().enumerate() {
        let name = if rule.name.is_empty() {
            format!("#{i}")
        } else {
            rule.name.clone()
        };
        match rule.action {
            ActionKind::Throttle => {
                ThrottleLimits::from_params(&name, &rule.params)
                    .map_err(|e| format!("--events-config: {e}"))?;
            }
            ActionKind::Pause | ActionKind::Stop => {
                if let Some(key) = rule.params.keys().next() {
                    return Err(format!(
                        "--events-config: policy rule {name:?}: {} takes no params, got {key:?}",
                        rule.action
                    ));
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
    fn execute(&mut self, action: &Action) -> Result<(), String> {
        let supervisor = self
            .supervisor
            .upgrade()
            .ok_or("the daemon is shutting down")?;
        let id = action.vm_id.as_str();
        match action.kind {
            ActionKind::Throttle => {
                let limits = ThrottleLimits::from_params(&action.policy_rule, &action.params)?;
                let done = self
                    .runtime
                    .block_on(supervisor.throttle(id, limits))
                    .map_err(|e| e.message)?;
                tracing::warn!(id, rule = %action.policy_rule, "policy: throttled {}", done.join(", "));
                Ok(())
            }
            ActionKind::Pause => {
                self.runtime
                    .block_on(supervisor.set_paused(id, true))
                    .map_err(|e| e.message)?;
                tracing::warn!(id, rule = %action.policy_rule, "policy: paused");
                Ok(())
            }
            ActionKind::Stop => {
                // A stop waits for the process to end (up to the stop timeout):
                // start it, and let the engine go on.
                let vm = supervisor.get(id).map_err(|e| e.message)?;
                let state = vm.state();
                if !state.is_live() {
                    return Err(format!("VM {id:?} is {}: nothing to stop", state.as_str()));
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
        let e = ThrottleLimits::from_params("slow", &params(json!({"ops": 1}))).unwrap_err();
        assert!(e.contains("\"slow\"") && e.contains("\"ops\""), "{e}");
        let e = ThrottleLimits::from_params("slow", &params(json!({"ops_per_s": 0}))).unwrap_err();
        assert!(e.contains("params.ops_per_s 0"), "{e}");
        let e =
            ThrottleLimits::from_params("slow", &params(json!({"ops_per_s": "x"}))).unwrap_err();
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
        let e = validate_settings(&s).unwrap_err();
        assert!(e.contains("\"p\"") && e.contains("\"x\""), "{e}");
        s.config = serde_json::from_value(json!({"policy": {"rules": [
            {"when": {"rule": "vm_io_flood"}, "action": "throttle"}
        ]}}))
        .unwrap();
        assert!(validate_settings(&s).unwrap_err().contains("\"#0\""));
    }
}
