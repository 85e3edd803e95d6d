//! Vigil's introspection resources on the per-VM API: the integrity monitor
//! (`/vigil/introspect...`), the system call tracer (`/vigil/trace`) and, only
//! when the VMM was started with `--debug-api`, writes into the guest for tests
//! (`/vigil/debug/...`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::json;
use vigil_introspect::hex::{self, HexError};
use vigil_introspect::live::{IntrospectError, Introspector, MonitorSettings};
use vigil_introspect::{FilterError, SymbolTable, SyscallFilter};
use vigil_model::config::IntrospectConfig;
use vigil_vmm::symbols::SymbolError;

use crate::api::{body, done, Response};

/// The introspection resources, with the methods each accepts (the API routes
/// every path under `/vigil/introspect`, `/vigil/trace` and `/vigil/debug/` here;
/// each needs a running VM, the debug ones `--debug-api` too).
pub const ROUTES: &[(&str, &str)] = &[
    ("/vigil/introspect", "GET, PUT, DELETE"),
    ("/vigil/introspect/baseline", "GET"),
    ("/vigil/introspect/state", "GET"),
    ("/vigil/introspect/check", "PUT"),
    ("/vigil/introspect/findings", "GET"),
    ("/vigil/introspect/symbols", "PUT"),
    ("/vigil/trace", "GET, PUT, DELETE"),
    ("/vigil/debug/memory", "PUT"),
    ("/vigil/debug/msr", "PUT"),
];

/// `PUT /vigil/introspect/symbols`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SymbolsRequest {
    /// A `System.map` on the host.
    pub path: PathBuf,
}

/// `PUT /vigil/trace`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceRequest {
    /// Comma-separated system call names or numbers (default: all).
    #[serde(default)]
    pub syscalls: Option<String>,
    /// Only calls from the process with this CR3 (`"0x..."`).
    #[serde(default)]
    pub cr3: Option<String>,
    /// Also append each call to this file as a JSON line.
    #[serde(default)]
    pub output: Option<PathBuf>,
}

/// `PUT /vigil/debug/memory`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryWrite {
    /// `"0x..."`: guest-virtual through `vcpu`'s page tables, or guest-physical
    /// with `physical: true`.
    pub address: String,
    #[serde(default)]
    pub physical: bool,
    #[serde(default)]
    pub vcpu: u32,
    /// The bytes, in hex (`"90c3"`).
    pub bytes: String,
}

/// `PUT /vigil/debug/msr`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MsrWrite {
    #[serde(default)]
    pub vcpu: u32,
    /// `"0xc0000082"`.
    pub index: String,
    /// `"0x..."`.
    pub value: String,
}

/// A field of an introspection request that is not valid; the message names it.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum FieldError {
    #[error("{field} {source}")]
    Number {
        field: &'static str,
        source: HexError,
    },
    #[error("bytes {0:?}: expected 1 to 4096 bytes as an even number of hex digits")]
    ByteCount(String),
    #[error("bytes {0}")]
    Bytes(HexError),
    #[error("index {0}: MSR indices are 32-bit")]
    MsrIndex(String),
    #[error("syscalls: {0}")]
    Syscalls(FilterError),
}

/// Why an introspection request failed: one of its fields, or what it asked for.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error(transparent)]
    Field(#[from] FieldError),
    #[error(transparent)]
    Symbols(#[from] SymbolError),
    #[error(transparent)]
    Introspect(#[from] IntrospectError),
}

/// A `"0x..."` (or decimal) number from a request, the error naming `field`.
pub fn parse_u64(field: &'static str, s: &str) -> Result<u64, FieldError> {
    hex::parse_u64(s).map_err(|source| FieldError::Number { field, source })
}

fn parse_hex_bytes(s: &str) -> Result<Vec<u8>, FieldError> {
    let t = s.trim();
    if t.is_empty() || t.len() > 8192 {
        return Err(FieldError::ByteCount(s.to_owned()));
    }
    hex::parse_bytes(t).map_err(FieldError::Bytes)
}

fn since(query: &str) -> Result<u64, Response> {
    let mut since = 0;
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("since", v)) => {
                since = v.parse().map_err(|_| {
                    Response::bad(format!("since {v:?}: expected a sequence number"))
                })?;
            }
            _ => {
                return Err(Response::bad(format!(
                    "query {pair:?}: the only parameter is since=N"
                )))
            }
        }
    }
    Ok(since)
}

/// Answers the introspection resources.
pub fn route(
    intro: &Arc<Introspector>,
    debug_api: bool,
    method: &str,
    path: &str,
    query: &str,
    bytes: &[u8],
) -> Response {
    match (method, path) {
        ("GET", "/vigil/introspect") => Response::json(&intro.status()),
        ("PUT", "/vigil/introspect") => {
            // An empty body takes every default.
            let req = if bytes.iter().all(u8::is_ascii_whitespace) {
                Ok(IntrospectConfig::default())
            } else {
                body::<IntrospectConfig>(method, path, bytes)
            };
            match req {
                Ok(r) => match r.validate() {
                    // On a running VM the baseline is taken at once unless asked.
                    Ok(()) => done(
                        method,
                        path,
                        intro.start_monitor(MonitorSettings::resolve(&r, Duration::ZERO)),
                    ),
                    Err(e) => Response::bad(format!("{method} {path}: {e}")),
                },
                Err(r) => r,
            }
        }
        ("DELETE", "/vigil/introspect") => {
            if intro.stop_monitor() {
                Response::no_content()
            } else {
                Response::bad(format!("{method} {path}: the monitor is not running"))
            }
        }
        ("GET", "/vigil/introspect/baseline") => match intro.baseline() {
            Some(b) => Response::json(&*b),
            None => Response::bad(format!(
                "{method} {path}: no baseline yet (PUT /vigil/introspect takes one)"
            )),
        },
        ("GET", "/vigil/introspect/state") => match intro.current_state() {
            Ok(view) => Response::json(&view),
            Err(e) => Response::error(500, format!("{method} {path}: {e}")),
        },
        ("PUT", "/vigil/introspect/check") => match intro.check_now() {
            Ok(found) => Response::json(&found),
            Err(e) => Response::bad(format!("{method} {path}: {e}")),
        },
        ("GET", "/vigil/introspect/findings") => match since(query) {
            Ok(n) => Response::json(&intro.findings(n)),
            Err(r) => r,
        },
        ("PUT", "/vigil/introspect/symbols") => match body::<SymbolsRequest>(method, path, bytes) {
            Ok(r) => done(method, path, set_symbols(intro, &r)),
            Err(r) => r,
        },
        ("PUT", "/vigil/trace") => match body::<TraceRequest>(method, path, bytes) {
            Ok(r) => done(method, path, start_trace(intro, &r)),
            Err(r) => r,
        },
        ("DELETE", "/vigil/trace") => {
            if intro.stop_trace() {
                Response::no_content()
            } else {
                Response::bad(format!("{method} {path}: tracing is not on"))
            }
        }
        ("GET", "/vigil/trace") => match since(query) {
            Ok(n) => {
                let (calls, tracing) = intro.trace(n);
                Response::json(&json!({ "tracing": tracing, "calls": calls }))
            }
            Err(r) => r,
        },
        (_, p) if p.starts_with("/vigil/debug/") && !debug_api => Response::error(
            403,
            format!("{method} {path}: the debug API is off (start the VMM with --debug-api)"),
        ),
        ("PUT", "/vigil/debug/memory") => match body::<MemoryWrite>(method, path, bytes) {
            Ok(w) => done(method, path, debug_memory(intro, &w)),
            Err(r) => r,
        },
        ("PUT", "/vigil/debug/msr") => match body::<MsrWrite>(method, path, bytes) {
            Ok(w) => done(method, path, debug_msr(intro, &w)),
            Err(r) => r,
        },
        _ => Response::bad(format!("{method} {path}: no such introspection resource")),
    }
}

fn set_symbols(intro: &Introspector, r: &SymbolsRequest) -> Result<(), RequestError> {
    Ok(intro.set_symbols(SymbolTable::load(&r.path)?)?)
}

fn start_trace(intro: &Introspector, r: &TraceRequest) -> Result<(), RequestError> {
    let mut filter = match &r.syscalls {
        Some(s) => SyscallFilter::parse(s).map_err(FieldError::Syscalls)?,
        None => SyscallFilter::all(),
    };
    if let Some(cr3) = &r.cr3 {
        filter = filter.with_cr3(parse_u64("cr3", cr3)?);
    }
    Ok(intro.start_trace(filter, r.output.as_deref())?)
}

fn debug_memory(intro: &Introspector, w: &MemoryWrite) -> Result<(), RequestError> {
    let address = parse_u64("address", &w.address)?;
    let bytes = parse_hex_bytes(&w.bytes)?;
    Ok(intro.debug_write_memory(w.vcpu, address, w.physical, &bytes)?)
}

fn debug_msr(intro: &Introspector, w: &MsrWrite) -> Result<(), RequestError> {
    let index = parse_u64("index", &w.index)?;
    let index = u32::try_from(index).map_err(|_| FieldError::MsrIndex(w.index.clone()))?;
    let value = parse_u64("value", &w.value)?;
    Ok(intro.debug_write_msr(w.vcpu, index, value)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_bytes() {
        assert_eq!(parse_u64("x", "0xc0000082"), Ok(0xc000_0082));
        assert_eq!(parse_u64("x", "42"), Ok(42));
        assert!(parse_u64("index", "0xzz")
            .unwrap_err()
            .to_string()
            .contains("index \"0xzz\""));
        assert_eq!(parse_hex_bytes("90c3"), Ok(vec![0x90, 0xc3]));
        assert!(parse_hex_bytes("9").is_err());
        assert!(parse_hex_bytes("zz")
            .unwrap_err()
            .to_string()
            .contains("\"zz\""));
        // Not a panic on a character split by the two-digit steps.
        assert!(parse_hex_bytes("a\u{e9}b").is_err());
        assert_eq!(since("since=5").ok(), Some(5));
        assert_eq!(since("").ok(), Some(0));
        assert!(since("until=3").is_err());
        assert!(since("since=1&until=3").is_err());
    }

    #[test]
    fn every_introspection_route_reaches_this_router() {
        for (path, _) in ROUTES {
            assert!(crate::api::is_introspection(path), "{path}");
            assert!(
                !crate::api::ROUTES.iter().any(|(p, _)| p == path),
                "{path} is in both route lists"
            );
        }
        for (path, _) in crate::api::ROUTES {
            assert!(!crate::api::is_introspection(path), "{path}");
        }
    }
}
