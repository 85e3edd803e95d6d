//! Parsing of device options: `--disk path=...,ro=on,id=...,bw=...`, `--rng bw=...`,
//! `--net tap=...,mac=...,rx_bw=...`.

use vigil_model::config::{BalloonConfig, DriveConfig, NetConfig, RateLimit, VsockConfig};

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
        self.rate_limit_prefixed("")
    }

    /// The rate keys with `prefix` (`rx_`: `rx_bw`, `rx_bw_burst`, ...).
    fn rate_limit_prefixed(&self, prefix: &str) -> Result<RateLimit, String> {
        Ok(RateLimit {
            bandwidth: self.rate(&format!("{prefix}bw"), &format!("{prefix}bw_burst"))?,
            ops: self.rate(&format!("{prefix}ops"), &format!("{prefix}ops_burst"))?,
            ..Default::default()
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
pub fn parse_disk(s: &str) -> Result<DriveConfig, String> {
    const DIRECTION_KEYS: [&str; 8] = [
        "rd_bw",
        "rd_bw_burst",
        "rd_ops",
        "rd_ops_burst",
        "wr_bw",
        "wr_bw_burst",
        "wr_ops",
        "wr_ops_burst",
    ];
    let keys: Vec<&str> = ["path", "ro", "id"]
        .into_iter()
        .chain(RATE_KEYS)
        .chain(DIRECTION_KEYS)
        .collect();
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
    Ok(DriveConfig {
        path: path.into(),
        read_only,
        id: p.get("id").unwrap_or_default().to_string(),
        rate_limit: p.rate_limit()?,
        read_limit: p.rate_limit_prefixed("rd_")?,
        write_limit: p.rate_limit_prefixed("wr_")?,
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

/// `aa:bb:cc:dd:ee:ff` (hex, either case).
fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// Parses one `--net` value. Without `mac=`, the MAC is all zeros, which the
/// caller replaces with the interface's default.
pub fn parse_net(s: &str) -> Result<NetConfig, String> {
    let keys: Vec<&str> = ["tap", "mac"]
        .into_iter()
        .chain(RATE_KEYS.iter().map(|k| match *k {
            "bw" => "rx_bw",
            "bw_burst" => "rx_bw_burst",
            "ops" => "rx_ops",
            _ => "rx_ops_burst",
        }))
        .chain(["tx_bw", "tx_bw_burst", "tx_ops", "tx_ops_burst"])
        .collect();
    let p = Pairs::parse("--net", s, &keys)?;
    let tap = p
        .get("tap")
        .filter(|v| !v.is_empty())
        .ok_or("--net: tap=NAME is required")?;
    let mac = match p.get("mac") {
        None => [0; 6],
        Some(v) => match parse_mac(v) {
            Some([0, 0, 0, 0, 0, 0]) => {
                return Err(format!("--net mac={v}: the all-zero address"));
            }
            Some(mac) => mac,
            None => {
                return Err(format!(
                    "--net mac={v}: expected six hex bytes as in 02:00:00:00:00:01"
                ))
            }
        },
    };
    Ok(NetConfig {
        tap: tap.into(),
        mac,
        rx_rate_limit: p.rate_limit_prefixed("rx_")?,
        tx_rate_limit: p.rate_limit_prefixed("tx_")?,
    })
}

/// Parses the `--vsock` value.
pub fn parse_vsock(s: &str) -> Result<VsockConfig, String> {
    let p = Pairs::parse("--vsock", s, &["cid", "uds"])?;
    let cid = p.get("cid").ok_or("--vsock: cid=N is required")?;
    let cid = cid
        .parse::<u64>()
        .map_err(|_| format!("--vsock cid={cid}: not a number"))?;
    let uds = p
        .get("uds")
        .filter(|v| !v.is_empty())
        .ok_or("--vsock: uds=PATH is required")?;
    Ok(VsockConfig {
        cid,
        uds: uds.into(),
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
        let d = parse_disk("path=c.img,rd_bw=1M,wr_ops=5,wr_ops_burst=2").unwrap();
        assert_eq!(d.read_limit.bandwidth, Some((1 << 20, None)));
        assert_eq!(d.write_limit.ops, Some((5, Some(2))));
        assert_eq!(d.rate_limit, RateLimit::default());
        assert!(parse_disk("path=a,rd_ops_burst=3")
            .unwrap_err()
            .contains("rd_ops_burst needs rd_ops"));
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
    fn vsocks() {
        let v = parse_vsock("cid=3,uds=/tmp/v.sock").unwrap();
        assert_eq!((v.cid, v.uds.to_str()), (3, Some("/tmp/v.sock")));
        assert_eq!(
            parse_vsock("uds=/x").unwrap_err(),
            "--vsock: cid=N is required"
        );
        assert!(parse_vsock("cid=x,uds=/x")
            .unwrap_err()
            .contains("cid=x: not a number"));
        assert!(parse_vsock("cid=3")
            .unwrap_err()
            .contains("uds=PATH is required"));
    }

    #[test]
    fn nets() {
        let n =
            parse_net("tap=vg0,mac=02:AB:cd:00:00:01,rx_bw=1M,tx_ops=10,tx_ops_burst=2").unwrap();
        assert_eq!(n.tap, "vg0");
        assert_eq!(n.mac, [2, 0xab, 0xcd, 0, 0, 1]);
        assert_eq!(n.rx_rate_limit.bandwidth, Some((1 << 20, None)));
        assert_eq!(n.rx_rate_limit.ops, None);
        assert_eq!(n.tx_rate_limit.ops, Some((10, Some(2))));
        assert_eq!(parse_net("tap=x").unwrap().mac, [0; 6]);
        assert_eq!(
            parse_net("mac=02:00:00:00:00:01").unwrap_err(),
            "--net: tap=NAME is required"
        );
        assert!(parse_net("tap=x,mac=02:00:00:00:00")
            .unwrap_err()
            .contains("mac=02:00:00:00:00: expected six hex bytes"));
        assert!(parse_net("tap=x,mac=02:00:00:00:00:0g").is_err());
        assert!(parse_net("tap=x,mac=00:00:00:00:00:00")
            .unwrap_err()
            .contains("all-zero"));
        assert!(parse_net("tap=x,bw=1M")
            .unwrap_err()
            .contains("unknown key \"bw\""));
        assert!(parse_net("tap=x,tx_bw_burst=1M")
            .unwrap_err()
            .contains("tx_bw_burst needs tx_bw"));
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
