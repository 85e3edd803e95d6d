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
/// are taken out of RAM, compressed into a pool inside the VMM, pages of zeros
/// kept as a marker and identical pages stored once, and put back when first
/// touched again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MemoryCompression {
    /// How long a page must go unwritten before it is compressed, in ms.
    pub idle_ms: u64,
    /// The codec.
    pub algo: CompressionAlgo,
}

/// How held pages are compressed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CompressionAlgo {
    /// LZ4: the fastest to compress and to put a page back.
    #[default]
    Lz4,
    /// Zstandard at level 1: smaller pool, slower fault-ins.
    Zstd,
}

impl Default for MemoryCompression {
    fn default() -> Self {
        Self {
            idle_ms: 30_000,
            algo: CompressionAlgo::Lz4,
        }
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
    pub const KEYS: &'static [&'static str] = &["idle", "algo"];

    /// `on` (idle 30 s, LZ4), `off` (none) or `idle=30s,algo=zstd`.
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
        let algo = match o.get("algo") {
            None | Some("lz4") => CompressionAlgo::Lz4,
            Some("zstd") => CompressionAlgo::Zstd,
            Some(other) => {
                return Err(OptionsError::BadValue {
                    key: "algo".into(),
                    value: other.into(),
                    why: "expected lz4 or zstd",
                }
                .for_option(flag))
            }
        };
        let config = Self {
            idle_ms: idle.map_or(Self::default().idle_ms, |d| {
                u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
            }),
            algo,
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
            Some(MemoryCompression {
                idle_ms: 30_000,
                algo: CompressionAlgo::Lz4
            })
        );
        assert_eq!(
            MemoryCompression::parse("idle=2s,algo=zstd").unwrap(),
            Some(MemoryCompression {
                idle_ms: 2000,
                algo: CompressionAlgo::Zstd
            })
        );
        assert_eq!(
            MemoryCompression::parse("algo=gzip").unwrap_err(),
            "--memory-compression algo=gzip: expected lz4 or zstd"
        );
        assert_eq!(
            MemoryCompression::parse("idle=10ms").unwrap_err(),
            "--memory-compression idle=10ms: expected 200ms to 24h"
        );
        assert_eq!(
            MemoryCompression::parse("idle=soon").unwrap_err(),
            "--memory-compression idle=soon: expected a number and a unit (100ms, 2s, 1m)"
        );
        assert!(MemoryCompression::parse("level=3")
            .unwrap_err()
            .starts_with("--memory-compression: unknown key \"level\""));
        assert_eq!(
            MemoryCompression {
                idle_ms: 5,
                ..Default::default()
            }
            .validate()
            .unwrap_err()
            .to_string(),
            "memory_compression idle_ms=5: expected 200 to 86400000 ms"
        );
    }
}
