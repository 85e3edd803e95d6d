//! Cold guest memory compressed inside the VMM (`--memory-compression`).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::FieldError;
use crate::options::{Options, OptionsError};

/// The shortest idle time: below it the pager would chase pages the guest is
/// still using.
pub const MIN_IDLE: Duration = Duration::from_millis(200);
/// The longest idle time (a day).
pub const MAX_IDLE: Duration = Duration::from_secs(86_400);

/// The memory-compression pager of a VM: guest pages not written for `idle`
/// are taken out of RAM, compressed (LZ4) into a pool inside the VMM, pages of
/// zeros kept as a marker and identical pages stored once, and put back when
/// first touched again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryCompression {
    /// How long a page must go unwritten before it is compressed, in ms.
    pub idle_ms: u64,
}

impl Default for MemoryCompression {
    fn default() -> Self {
        Self { idle_ms: 30_000 }
    }
}

/// A memory-compression setting out of range.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("memory_compression idle_ms={idle_ms}: expected {min} to {max} ms", min = MIN_IDLE.as_millis(), max = MAX_IDLE.as_millis())]
pub struct MemoryCompressionError {
    pub idle_ms: u64,
}

impl FieldError for MemoryCompressionError {
    fn field(&self) -> &'static str {
        "memory_compression"
    }
}

impl MemoryCompression {
    /// The option keys of `--memory-compression`.
    pub const KEYS: &'static [&'static str] = &["idle"];

    /// `on` (idle 30 s), `off` (none) or `idle=30s`.
    pub fn parse(s: &str) -> Result<Option<Self>, String> {
        let flag = "--memory-compression";
        match s {
            "off" => return Ok(None),
            "on" => return Ok(Some(Self::default())),
            _ => {}
        }
        let o = Options::parse(s, Self::KEYS).map_err(|e| e.for_option(flag))?;
        let idle = o
            .duration("idle")
            .map_err(|e: OptionsError| e.for_option(flag))?;
        let config = Self {
            idle_ms: idle.map_or(Self::default().idle_ms, |d| {
                u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
            }),
        };
        config.validate().map_err(|_| {
            format!(
                "{flag} idle={}: expected {}ms to {}h",
                o.get("idle").unwrap_or(""),
                MIN_IDLE.as_millis(),
                MAX_IDLE.as_secs() / 3600
            )
        })?;
        Ok(Some(config))
    }

    /// Checks the idle time's range.
    pub fn validate(&self) -> Result<(), MemoryCompressionError> {
        let range = MIN_IDLE.as_millis() as u64..=MAX_IDLE.as_millis() as u64;
        if range.contains(&self.idle_ms) {
            Ok(())
        } else {
            Err(MemoryCompressionError {
                idle_ms: self.idle_ms,
            })
        }
    }

    /// How long a page must go unwritten before it is compressed.
    pub fn idle(&self) -> Duration {
        Duration::from_millis(self.idle_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_on_off_and_idle() {
        assert_eq!(MemoryCompression::parse("off").unwrap(), None);
        assert_eq!(
            MemoryCompression::parse("on").unwrap(),
            Some(MemoryCompression { idle_ms: 30_000 })
        );
        assert_eq!(
            MemoryCompression::parse("idle=2s").unwrap(),
            Some(MemoryCompression { idle_ms: 2000 })
        );
        assert_eq!(
            MemoryCompression::parse("idle=10ms").unwrap_err(),
            "--memory-compression idle=10ms: expected 200ms to 24h"
        );
        assert_eq!(
            MemoryCompression::parse("idle=soon").unwrap_err(),
            "--memory-compression idle=soon: expected a number and a unit (100ms, 2s, 1m)"
        );
        assert!(MemoryCompression::parse("algo=lz4")
            .unwrap_err()
            .starts_with("--memory-compression: unknown key \"algo\""));
        assert_eq!(
            MemoryCompression { idle_ms: 5 }
                .validate()
                .unwrap_err()
                .to_string(),
            "memory_compression idle_ms=5: expected 200 to 86400000 ms"
        );
    }
}
