//! The request to create a VM: its id and configuration, the introspection,
//! tracing and debug options (checked, naming the field and value), and the
//! `vigil run` flags they become.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vigil_model::config::{IntrospectConfig, MemoryCompression};

/// The request to create a VM.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRequest {
    pub id: String,
    /// A Firecracker-style VM configuration (the JSON `--config-file` takes).
    pub config: serde_json::Value,
    /// Watch the guest kernel's integrity from its start (`vigil run --introspect`).
    #[serde(default)]
    pub introspect: Option<IntrospectConfig>,
    /// Trace the guest's system calls from its start into `DIR/syscalls.jsonl`
    /// (`vigil run --trace-syscalls`).
    #[serde(default)]
    pub trace_syscalls: Option<TraceSpec>,
    /// Serve `PUT /vigil/debug/memory` and `/vigil/debug/msr` on the VM's API
    /// socket (`vigil run --debug-api`): writes into the guest, for tests only.
    #[serde(default)]
    pub debug_api: bool,
    /// Put its virtio devices on PCI (`vigil run --enable-pci`).
    #[serde(default)]
    pub enable_pci: bool,
}

/// `trace_syscalls` in a create request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceSpec {
    /// Which calls: comma-separated names or numbers (`read,write,59`), optionally
    /// `cr3=0x...` for one process (`vigil run --trace-filter`). Default: all.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub syscalls: Option<String>,
}

/// A `trace_syscalls.syscalls` that cannot be a filter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("trace_syscalls.syscalls {0:?}: expected comma-separated system call names or numbers (read,write,59), optionally cr3=0x...")]
pub struct TraceSpecError(pub String);

impl TraceSpec {
    /// Refuses what cannot be a filter, naming the field and the value (the VMM
    /// checks the names themselves).
    pub fn validate(&self) -> Result<(), TraceSpecError> {
        if let Some(s) = &self.syscalls {
            let fine = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | ',' | '=');
            if s.is_empty() || s.len() > 4096 || !s.chars().all(fine) {
                return Err(TraceSpecError(s.clone()));
            }
        }
        Ok(())
    }
}

/// How the VMM process is started, besides its configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct LaunchOptions {
    pub(super) introspect: Option<IntrospectConfig>,
    pub(super) trace_syscalls: Option<TraceSpec>,
    pub(super) debug_api: bool,
    pub(super) enable_pci: bool,
    /// Wait for the VM from another host: the port and one-time token.
    pub(super) incoming: Option<(u16, String)>,
    /// The certificate and key the incoming migration is served with.
    pub(super) incoming_tls: Option<(PathBuf, PathBuf)>,
    /// The incoming VM's memory-compression policy (its source's): a VMM
    /// waiting for a VM takes no configuration file, only this flag.
    pub(super) incoming_compression: Option<MemoryCompression>,
}

impl LaunchOptions {
    /// The `vigil run` arguments; `dir` is the VM's folder.
    pub(super) fn args(&self, dir: &Path) -> Vec<std::ffi::OsString> {
        // Findings outlive the process there, for the sampler to read once it ended.
        let mut args: Vec<std::ffi::OsString> = vec![
            "--findings-path".into(),
            dir.join(crate::findings::FINDINGS_FILE).into(),
        ];
        if let Some(i) = &self.introspect {
            args.push(format!("--introspect={i}").into());
        }
        if let Some(t) = &self.trace_syscalls {
            args.push("--trace-syscalls".into());
            args.push(dir.join(SYSCALLS_FILE).into());
            if let Some(f) = &t.syscalls {
                args.push(format!("--trace-filter={f}").into());
            }
        }
        if self.debug_api {
            args.push("--debug-api".into());
        }
        if self.enable_pci {
            args.push("--enable-pci".into());
        }
        if let Some((port, token)) = &self.incoming {
            args.push(format!("--migrate-from=tcp:0.0.0.0:{port}").into());
            args.push(format!("--migration-token={token}").into());
            if let Some((cert, key)) = &self.incoming_tls {
                args.push("--migration-tls-cert".into());
                args.push(cert.into());
                args.push("--migration-tls-key".into());
                args.push(key.into());
            }
            if let Some(c) = &self.incoming_compression {
                args.push(format!("--memory-compression={c}").into());
            }
        }
        args
    }
}

/// Where a VM created with `trace_syscalls` writes its calls, in its folder.
pub const SYSCALLS_FILE: &str = "syscalls.jsonl";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn introspection_options_become_run_flags() {
        let req: CreateRequest = serde_json::from_value(serde_json::json!({
            "id": "a", "config": {},
            "introspect": {"period_ms": 100, "policy": "protect", "baseline_after_ms": 0},
            "trace_syscalls": {"syscalls": "read,write,59"},
            "debug_api": true,
            "enable_pci": true
        }))
        .unwrap();
        let options = LaunchOptions {
            introspect: req.introspect,
            trace_syscalls: req.trace_syscalls,
            debug_api: req.debug_api,
            enable_pci: req.enable_pci,
            ..Default::default()
        };
        let args: Vec<String> = options
            .args(Path::new("/s/vms/a"))
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        assert_eq!(
            args,
            [
                "--findings-path",
                "/s/vms/a/findings.jsonl",
                "--introspect=period=100ms,policy=protect,baseline_after=0ms",
                "--trace-syscalls",
                "/s/vms/a/syscalls.jsonl",
                "--trace-filter=read,write,59",
                "--debug-api",
                "--enable-pci"
            ]
        );
        // `{}`: introspection with the VMM's defaults, all calls traced.
        let options = LaunchOptions {
            introspect: Some(IntrospectConfig::default()),
            trace_syscalls: Some(TraceSpec::default()),
            debug_api: false,
            ..Default::default()
        };
        assert_eq!(
            options.args(Path::new("d")),
            [
                "--findings-path",
                "d/findings.jsonl",
                "--introspect=",
                "--trace-syscalls",
                "d/syscalls.jsonl"
            ]
            .map(std::ffi::OsString::from)
        );
        // Every VM writes its findings down (monitoring may start through its API).
        assert_eq!(
            LaunchOptions::default().args(Path::new("d")),
            ["--findings-path", "d/findings.jsonl"].map(std::ffi::OsString::from)
        );
        // A VM arriving with its source's compression policy.
        let options = LaunchOptions {
            incoming: Some((4000, "t".into())),
            incoming_compression: MemoryCompression::parse("idle=1s,algo=zstd").unwrap(),
            ..Default::default()
        };
        assert_eq!(
            options.args(Path::new("d"))[2..],
            [
                "--migrate-from=tcp:0.0.0.0:4000",
                "--migration-token=t",
                "--memory-compression=idle=1000ms,algo=zstd"
            ]
            .map(std::ffi::OsString::from)
        );
    }

    #[test]
    fn introspection_options_are_checked() {
        // The VMM's own checks (`vigil_model`), which `create` names `introspect.*`.
        let spec = |v: serde_json::Value| serde_json::from_value::<IntrospectConfig>(v);
        assert!(spec(serde_json::json!({})).unwrap().validate().is_ok());
        for (v, want) in [
            (serde_json::json!({"period_ms": 0}), "period_ms 0"),
            (
                serde_json::json!({"period_ms": 3_600_001}),
                "period_ms 3600001",
            ),
            (
                serde_json::json!({"baseline_after_ms": 4_000_000}),
                "baseline_after_ms 4000000",
            ),
        ] {
            let e = spec(v).unwrap().validate().unwrap_err().to_string();
            assert!(e.starts_with(want), "{e}");
        }
        let e = spec(serde_json::json!({"policy": "block"})).unwrap_err();
        assert!(e.to_string().contains("policy \"block\""), "{e}");
        assert!(spec(serde_json::json!({"period": 5})).is_err());
        let t = TraceSpec {
            syscalls: Some("read; rm -rf".into()),
        };
        assert!(t
            .validate()
            .unwrap_err()
            .to_string()
            .contains("trace_syscalls.syscalls"));
        let t = TraceSpec {
            syscalls: Some("read,write,cr3=0x1000".into()),
        };
        assert!(t.validate().is_ok());
    }
}
