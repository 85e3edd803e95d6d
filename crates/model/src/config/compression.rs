//! Cold guest memory compressed inside the VMM (`--memory-compression`).

use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

use crate::config::FieldError;
use crate::options::{Options, OptionsError};

/// The shortest idle time: below it the pager would chase pages the guest is
/// still using.
pub const MIN_IDLE: Duration = Duration::from_millis(200);
/// The longest idle time (a day).
pub const MAX_IDLE: Duration = Duration::from_secs(86_400);
/// The idle time of a pager given neither an idle time nor an RSS target.
pub const DEFAULT_IDLE_MS: u64 = 30_000;
/// The largest RSS target, in MiB (16 TiB: its bytes fit in a u64 many times).
pub const MAX_RSS_MIB: u64 = 16 << 20;

/// The memory-compression pager of a VM: guest pages not written for `idle`
/// are taken out of RAM, compressed into a pool inside the VMM, pages of zeros
/// kept as a marker and identical pages stored once, and put back when first
/// touched again. With an RSS target, guest memory's footprint (its pages in
/// RAM and the pool) is also kept under it, the coldest pages first, idle or
/// not.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MemoryCompression {
    /// How long a page must go unwritten before it is compressed, in ms; none:
    /// only the RSS target takes pages out ([`DEFAULT_IDLE_MS`] when there is
    /// no target either).
    pub idle_ms: Option<u64>,
    /// The most guest memory may keep in RAM (its resident pages and the
    /// pool), in MiB; none: no target.
    pub rss_mib: Option<u64>,
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

/// A memory-compression setting out of range, by field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MemoryCompressionError {
    #[error("memory_compression idle_ms={0}: expected {min} to {max} ms", min = MIN_IDLE.as_millis(), max = MAX_IDLE.as_millis())]
    Idle(u64),
    #[error("memory_compression rss_mib={0}: expected 1 to {MAX_RSS_MIB} MiB")]
    Rss(u64),
    #[error(
        "memory_compression idle_ms=null: the pager needs an idle time or an RSS target (rss_mib)"
    )]
    Nothing,
}

impl FieldError for MemoryCompressionError {
    fn field(&self) -> &'static str {
        "memory_compression"
    }
}

/// A change to a running pager's policy (`PATCH /vigil/memory`): each field
/// absent is kept, `null` clears it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryPolicyUpdate {
    #[serde(default, deserialize_with = "present")]
    pub idle_ms: Option<Option<u64>>,
    #[serde(default, deserialize_with = "present")]
    pub rss_mib: Option<Option<u64>>,
}

/// A field that is there, `null` or not (absent: the `default`, none).
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<u64>>, D::Error> {
    Option::<u64>::deserialize(d).map(Some)
}

impl MemoryPolicyUpdate {
    /// `current` with this change, checked; the codec is kept.
    pub fn apply(
        &self,
        current: MemoryCompression,
    ) -> Result<MemoryCompression, MemoryCompressionError> {
        let next = MemoryCompression {
            idle_ms: self.idle_ms.unwrap_or(current.idle_ms),
            rss_mib: self.rss_mib.unwrap_or(current.rss_mib),
            algo: current.algo,
        };
        // Not normalized: clearing both leaves the pager with nothing to go by.
        if next.idle_ms.is_none() && next.rss_mib.is_none() {
            return Err(MemoryCompressionError::Nothing);
        }
        next.validate()?;
        Ok(next)
    }
}

/// The `--memory-compression` spelling of a policy, which
/// [`MemoryCompression::parse`] reads back as it is (normalized).
impl std::fmt::Display for MemoryCompression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if let Some(ms) = self.idle_ms {
            parts.push(format!("idle={ms}ms"));
        }
        if let Some(mib) = self.rss_mib {
            parts.push(format!("rss={mib}"));
        }
        parts.push(
            match self.algo {
                CompressionAlgo::Lz4 => "algo=lz4",
                CompressionAlgo::Zstd => "algo=zstd",
            }
            .into(),
        );
        f.write_str(&parts.join(","))
    }
}

impl MemoryCompression {
    /// The option keys of `--memory-compression`.
    pub const KEYS: &'static [&'static str] = &["idle", "rss", "algo"];

    /// `on` (idle 30 s, LZ4), `off` (none), `idle=30s,algo=zstd` or
    /// `rss=512[,idle=1m]`.
    pub fn parse(s: &str) -> Result<Option<Self>, String> {
        let flag = "--memory-compression";
        match s {
            "off" => return Ok(None),
            "on" => return Ok(Some(Self::default().normalized())),
            _ => {}
        }
        let o = Options::parse(s, Self::KEYS).map_err(|e| e.for_option(flag))?;
        let idle = o
            .duration("idle")
            .map_err(|e: OptionsError| e.for_option(flag))?;
        let rss_mib = o
            .number::<u64>("rss")
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
            idle_ms: idle.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            rss_mib,
            algo,
        }
        .normalized();
        config.validate().map_err(|e| match e {
            MemoryCompressionError::Rss(_) => format!(
                "{flag} rss={}: expected 1 to {MAX_RSS_MIB} (MiB)",
                o.get("rss").unwrap_or("")
            ),
            _ => format!(
                "{flag} idle={}: expected {}ms to {}h",
                o.get("idle").unwrap_or(""),
                MIN_IDLE.as_millis(),
                MAX_IDLE.as_secs() / 3600
            ),
        })?;
        Ok(Some(config))
    }

    /// The same policy with the default idle time filled in when there is
    /// neither an idle time nor an RSS target.
    pub fn normalized(mut self) -> Self {
        if self.idle_ms.is_none() && self.rss_mib.is_none() {
            self.idle_ms = Some(DEFAULT_IDLE_MS);
        }
        self
    }

    /// Checks the idle time's and the target's ranges.
    pub fn validate(&self) -> Result<(), MemoryCompressionError> {
        let range = MIN_IDLE.as_millis() as u64..=MAX_IDLE.as_millis() as u64;
        if let Some(idle_ms) = self.idle_ms.filter(|ms| !range.contains(ms)) {
            return Err(MemoryCompressionError::Idle(idle_ms));
        }
        if let Some(mib) = self.rss_mib.filter(|m| !(1..=MAX_RSS_MIB).contains(m)) {
            return Err(MemoryCompressionError::Rss(mib));
        }
        Ok(())
    }

    /// How long a page must go unwritten before it is compressed; none: only
    /// the RSS target takes pages out.
    pub fn idle(&self) -> Option<Duration> {
        self.normalized().idle_ms.map(Duration::from_millis)
    }

    /// The RSS target in bytes.
    pub fn rss_bytes(&self) -> Option<u64> {
        self.rss_mib.map(|m| m.saturating_mul(1 << 20))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_policy_written_as_a_flag_reads_back_the_same() {
        for flag in ["on", "idle=1500ms,algo=zstd", "rss=512", "rss=64,idle=2m"] {
            let policy = MemoryCompression::parse(flag).unwrap().unwrap();
            let again = MemoryCompression::parse(&policy.to_string()).unwrap();
            assert_eq!(again, Some(policy), "{flag} -> {policy}");
        }
        let p = MemoryCompression::parse("idle=2s,algo=zstd")
            .unwrap()
            .unwrap();
        assert_eq!(p.to_string(), "idle=2000ms,algo=zstd");
    }

    #[test]
    fn parses_on_off_idle_and_rss() {
        assert_eq!(MemoryCompression::parse("off").unwrap(), None);
        assert_eq!(
            MemoryCompression::parse("on").unwrap(),
            Some(MemoryCompression {
                idle_ms: Some(30_000),
                rss_mib: None,
                algo: CompressionAlgo::Lz4
            })
        );
        assert_eq!(
            MemoryCompression::parse("idle=2s,algo=zstd").unwrap(),
            Some(MemoryCompression {
                idle_ms: Some(2000),
                rss_mib: None,
                algo: CompressionAlgo::Zstd
            })
        );
        // A target alone: no idle time.
        assert_eq!(
            MemoryCompression::parse("rss=256").unwrap(),
            Some(MemoryCompression {
                idle_ms: None,
                rss_mib: Some(256),
                algo: CompressionAlgo::Lz4
            })
        );
        assert_eq!(
            MemoryCompression::parse("rss=64,idle=1m").unwrap().unwrap(),
            MemoryCompression {
                idle_ms: Some(60_000),
                rss_mib: Some(64),
                algo: CompressionAlgo::Lz4
            }
        );
        assert_eq!(
            MemoryCompression::parse("rss=0").unwrap_err(),
            "--memory-compression rss=0: expected 1 to 16777216 (MiB)"
        );
        assert_eq!(
            MemoryCompression::parse("rss=lots").unwrap_err(),
            "--memory-compression rss=lots: not a number"
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
        let bad = |c: MemoryCompression| c.validate().unwrap_err().to_string();
        assert_eq!(
            bad(MemoryCompression {
                idle_ms: Some(5),
                ..Default::default()
            }),
            "memory_compression idle_ms=5: expected 200 to 86400000 ms"
        );
        assert_eq!(
            bad(MemoryCompression {
                rss_mib: Some(0),
                ..Default::default()
            }),
            "memory_compression rss_mib=0: expected 1 to 16777216 MiB"
        );
        // The JSON form: a target alone has no idle time; nothing at all is 30 s.
        let json = |s: &str| serde_json::from_str::<MemoryCompression>(s);
        let c = json(r#"{"rss_mib": 96}"#).unwrap();
        assert_eq!((c.idle(), c.rss_bytes()), (None, Some(96 << 20)));
        assert_eq!(json("{}").unwrap().idle(), Some(Duration::from_secs(30)));
        assert!(json(r#"{"rss": 96}"#).is_err());
    }

    #[test]
    fn a_policy_update_keeps_what_it_does_not_name() {
        let current = MemoryCompression {
            idle_ms: Some(2000),
            rss_mib: None,
            algo: CompressionAlgo::Zstd,
        };
        let update = |s: &str| serde_json::from_str::<MemoryPolicyUpdate>(s).unwrap();
        let c = update(r#"{"rss_mib": 64}"#).apply(current).unwrap();
        assert_eq!(
            (c.idle_ms, c.rss_mib, c.algo),
            (Some(2000), Some(64), CompressionAlgo::Zstd)
        );
        let c = update(r#"{"idle_ms": null}"#).apply(c).unwrap();
        assert_eq!((c.idle_ms, c.rss_mib), (None, Some(64)));
        // Nothing left to go by.
        assert_eq!(
            update(r#"{"rss_mib": null}"#).apply(c).unwrap_err(),
            MemoryCompressionError::Nothing
        );
        assert_eq!(
            update(r#"{"idle_ms": 10}"#)
                .apply(c)
                .unwrap_err()
                .to_string(),
            "memory_compression idle_ms=10: expected 200 to 86400000 ms"
        );
        assert!(serde_json::from_str::<MemoryPolicyUpdate>(r#"{"algo": "lz4"}"#).is_err());
        assert!(serde_json::from_str::<MemoryPolicyUpdate>(r#"{"rss_mib": -1}"#).is_err());
    }
}
