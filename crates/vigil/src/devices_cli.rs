//! Parsing of device options: `--disk path=...,ro=on,id=...,bw=...`, `--rng bw=...`.

use vigil_vmm::config::{BalloonConfig, BlockConfig, RateLimit};

/// `key=value` pairs of one option, with the keys it accepts.
struct Pairs<'a> {
    option: &'static str,
    pairs: Vec<(&'a str, &'a str)>,
}

impl<'a> Pairs<'a> {
    fn parse(option: &'static str, s: &'a str, known: &[&str]) -> Result<Self, String> {
        let mut pairs = Vec::new();
        for item in s.split(',').filter(|i| !i.is_empty()) {
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| format!("{option}: {item:?} is not key=value"))?;
            if !known.contains(&key) {
                return Err(format!(
                    "{option}: unknown key {key:?} (known: {})",
                    known.join(", ")
                ));
            }
            if pairs.iter().any(|(k, _)| *k == key) {
                return Err(format!("{option}: {key} given twice"));
            }
            pairs.push((key, value));
        }
        Ok(Self { option, pairs })
    }

    fn get(&self, key: &str) -> Option<&'a str> {
        self.pairs.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
    }

    fn size(&self, key: &str) -> Result<Option<u64>, String> {
        self.get(key)
            .map(|v| {
                parse_size(v).ok_or_else(|| {
                    format!(
                        "{} {key}={v}: not a number (suffixes K, M, G allowed)",
                        self.option
                    )
                })
            })
            .transpose()
    }

    fn rate(&self, key: &str, burst_key: &str) -> Result<Option<(u64, Option<u64>)>, String> {
        let burst = self.size(burst_key)?;
        match self.size(key)? {
            Some(0) => Err(format!(
                "{} {key}=0: a rate must be above zero (leave it out for no limit)",
                self.option
            )),
            Some(rate) => Ok(Some((rate, burst))),
            None if burst.is_some() => Err(format!("{} {burst_key} needs {key}", self.option)),
            None => Ok(None),
        }
    }

    fn rate_limit(&self) -> Result<RateLimit, String> {
        Ok(RateLimit {
            bandwidth: self.rate("bw", "bw_burst")?,
            ops: self.rate("ops", "ops_burst")?,
        })
    }
}

const RATE_KEYS: [&str; 4] = ["bw", "bw_burst", "ops", "ops_burst"];

/// `123`, `4K`, `10M`, `1G` (powers of 1024).
fn parse_size(s: &str) -> Option<u64> {
    let (digits, unit) = match s.char_indices().last()? {
        (i, 'K' | 'k') => (&s[..i], 1 << 10),
        (i, 'M' | 'm') => (&s[..i], 1 << 20),
        (i, 'G' | 'g') => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    digits.parse::<u64>().ok()?.checked_mul(unit)
}

/// Parses one `--disk` value (an empty id is filled in later with the disk's index).
pub fn parse_disk(s: &str) -> Result<BlockConfig, String> {
    let keys: Vec<&str> = ["path", "ro", "id"].into_iter().chain(RATE_KEYS).collect();
    let p = Pairs::parse("--disk", s, &keys)?;
    let path = p
        .get("path")
        .filter(|v| !v.is_empty())
        .ok_or("--disk: path=IMAGE is required")?;
    let read_only = match p.get("ro") {
        None | Some("off") => false,
        Some("on") => true,
        Some(v) => return Err(format!("--disk ro={v}: expected on or off")),
    };
    Ok(BlockConfig {
        path: path.into(),
        read_only,
        id: p.get("id").unwrap_or_default().to_string(),
        rate_limit: p.rate_limit()?,
    })
}

/// Parses one `--balloon` value.
pub fn parse_balloon(s: &str) -> Result<BalloonConfig, String> {
    let p = Pairs::parse(
        "--balloon",
        s,
        &[
            "size_mib",
            "stats_s",
            "free_page_reporting",
            "deflate_on_oom",
        ],
    )?;
    let on_off = |key: &str| match p.get(key) {
        None | Some("off") => Ok(false),
        Some("on") => Ok(true),
        Some(v) => Err(format!("--balloon {key}={v}: expected on or off")),
    };
    let stats_interval = match p.size("stats_s")? {
        None | Some(0) => None,
        Some(s) => Some(std::time::Duration::from_secs(s)),
    };
    Ok(BalloonConfig {
        target_mib: p.size("size_mib")?.unwrap_or(0),
        stats_interval,
        free_page_reporting: on_off("free_page_reporting")?,
        deflate_on_oom: on_off("deflate_on_oom")?,
    })
}

/// Parses the `--rng` value (empty: no limit).
pub fn parse_rng(s: &str) -> Result<RateLimit, String> {
    Pairs::parse("--rng", s, &RATE_KEYS)?.rate_limit()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks() {
        let d = parse_disk("path=/tmp/a.img,ro=on,id=root,bw=10M,ops=1000,ops_burst=50").unwrap();
        assert_eq!(d.path.to_str(), Some("/tmp/a.img"));
        assert!(d.read_only);
        assert_eq!(d.id, "root");
        assert_eq!(d.rate_limit.bandwidth, Some((10 << 20, None)));
        assert_eq!(d.rate_limit.ops, Some((1000, Some(50))));
        let d = parse_disk("path=b.img").unwrap();
        assert!(!d.read_only && d.id.is_empty() && d.rate_limit == RateLimit::default());
    }

    #[test]
    fn disk_errors_name_the_key() {
        assert_eq!(
            parse_disk("ro=on").unwrap_err(),
            "--disk: path=IMAGE is required"
        );
        assert!(parse_disk("path=a,ro=yes")
            .unwrap_err()
            .contains("ro=yes: expected on or off"));
        assert!(parse_disk("path=a,speed=3")
            .unwrap_err()
            .contains("unknown key \"speed\""));
        assert!(parse_disk("path=a,bw=fast")
            .unwrap_err()
            .contains("bw=fast: not a number"));
        assert!(parse_disk("path=a,bw=0")
            .unwrap_err()
            .contains("bw=0: a rate must be above zero"));
        assert!(parse_disk("path=a,ops_burst=4")
            .unwrap_err()
            .contains("ops_burst needs ops"));
        assert!(parse_disk("path=a,path=b")
            .unwrap_err()
            .contains("path given twice"));
        assert!(parse_disk("path=a,junk")
            .unwrap_err()
            .contains("\"junk\" is not key=value"));
    }

    #[test]
    fn balloon() {
        let b = parse_balloon("size_mib=64,stats_s=2,free_page_reporting=on").unwrap();
        assert_eq!(b.target_mib, 64);
        assert_eq!(b.stats_interval, Some(std::time::Duration::from_secs(2)));
        assert!(b.free_page_reporting && !b.deflate_on_oom);
        assert_eq!(parse_balloon("").unwrap(), BalloonConfig::default());
        assert!(parse_balloon("deflate_on_oom=maybe")
            .unwrap_err()
            .contains("deflate_on_oom=maybe: expected on or off"));
    }

    #[test]
    fn rng_and_sizes() {
        assert_eq!(parse_rng("").unwrap(), RateLimit::default());
        assert_eq!(parse_rng("bw=4K").unwrap().bandwidth, Some((4096, None)));
        assert_eq!(parse_size("1G"), Some(1 << 30));
        assert_eq!(parse_size("12"), Some(12));
        assert_eq!(parse_size("M"), None);
        assert_eq!(parse_size("99999999999999999999G"), None);
    }
}
