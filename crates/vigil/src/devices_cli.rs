//! Parsing of device options: `--disk path=...,ro=on,id=...,bw=...`, `--rng bw=...`,
//! `--net tap=...,mac=...,rx_bw=...`, `--balloon ...`, `--vsock ...`, with the
//! option strings of `vigil_model::options`. What is checked here is the shape
//! of each value; the configuration's own checks (`VmConfig::validate`) come after.

use vigil_model::config::{
    BalloonConfig, DriveConfig, IoEngine, NetConfig, RateLimit, VsockConfig,
};
use vigil_model::options::{Options, OptionsError};
use vigil_model::MacAddr;

/// One option's `key=value` pairs, the errors naming the option.
struct Pairs<'a> {
    option: &'static str,
    options: Options<'a>,
}

impl<'a> Pairs<'a> {
    fn parse(option: &'static str, s: &'a str, known: &[&str]) -> Result<Self, String> {
        Ok(Self {
            option,
            options: Options::parse(s, known).map_err(|e| e.for_option(option))?,
        })
    }

    fn named<T>(&self, r: Result<T, OptionsError>) -> Result<T, String> {
        r.map_err(|e| e.for_option(self.option))
    }

    fn rate(&self, key: &str, burst_key: &str) -> Result<Option<(u64, Option<u64>)>, String> {
        let burst = self.named(self.options.size(burst_key))?;
        match self.named(self.options.size(key))? {
            Some(0) => Err(format!(
                "{} {key}=0: a rate must be above zero (leave it out for no limit)",
                self.option
            )),
            Some(rate) => Ok(Some((rate, burst))),
            None if burst.is_some() => Err(format!("{} {burst_key} needs {key}", self.option)),
            None => Ok(None),
        }
    }

    /// The rate keys with `prefix` (`rx_`: `rx_bw`, `rx_bw_burst`, ...).
    fn rate_limit(&self, prefix: &str) -> Result<RateLimit, String> {
        Ok(RateLimit {
            bandwidth: self.rate(&format!("{prefix}bw"), &format!("{prefix}bw_burst"))?,
            ops: self.rate(&format!("{prefix}ops"), &format!("{prefix}ops_burst"))?,
            ..Default::default()
        })
    }
}

/// The rate-limit keys, each with `prefix`.
fn rate_keys(prefix: &str) -> [String; 4] {
    ["bw", "bw_burst", "ops", "ops_burst"].map(|k| format!("{prefix}{k}"))
}

fn keys<'k>(plain: &[&'k str], rates: &'k [String]) -> Vec<&'k str> {
    plain
        .iter()
        .copied()
        .chain(rates.iter().map(String::as_str))
        .collect()
}

/// Parses one `--disk` value (an empty id is filled in later with the disk's index).
pub fn parse_disk(s: &str) -> Result<DriveConfig, String> {
    let rates: Vec<String> = ["", "rd_", "wr_"].into_iter().flat_map(rate_keys).collect();
    let p = Pairs::parse(
        "--disk",
        s,
        &keys(&["path", "ro", "id", "io_engine", "num_queues"], &rates),
    )?;
    let path = p
        .options
        .get("path")
        .filter(|v| !v.is_empty())
        .ok_or("--disk: path=IMAGE is required")?;
    Ok(DriveConfig {
        path: path.into(),
        read_only: p.named(p.options.on_off("ro"))?,
        id: p.options.get("id").unwrap_or_default().to_string(),
        rate_limit: p.rate_limit("")?,
        read_limit: p.rate_limit("rd_")?,
        write_limit: p.rate_limit("wr_")?,
        io_engine: match p.options.get("io_engine") {
            None | Some("sync") => IoEngine::Sync,
            Some("async") => IoEngine::Async,
            Some(v) => {
                return Err(format!(
                "--disk io_engine={v}: expected sync (one request at a time) or async (io_uring)"
            ))
            }
        },
        num_queues: p.named(p.options.number("num_queues"))?.unwrap_or(1),
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
            "free_page_hinting",
            "deflate_on_oom",
        ],
    )?;
    let stats_interval = match p.named(p.options.size("stats_s"))? {
        None | Some(0) => None,
        Some(s) => Some(std::time::Duration::from_secs(s)),
    };
    Ok(BalloonConfig {
        target_mib: p.named(p.options.size("size_mib"))?.unwrap_or(0),
        stats_interval,
        free_page_reporting: p.named(p.options.on_off("free_page_reporting"))?,
        free_page_hinting: p.named(p.options.on_off("free_page_hinting"))?,
        deflate_on_oom: p.named(p.options.on_off("deflate_on_oom"))?,
    })
}

/// Parses one `--net` value. Without `mac=`, the MAC is all zeros, which the
/// caller replaces with the interface's default.
pub fn parse_net(s: &str) -> Result<NetConfig, String> {
    let rates: Vec<String> = ["rx_", "tx_"].into_iter().flat_map(rate_keys).collect();
    let p = Pairs::parse("--net", s, &keys(&["tap", "mac", "queue_pairs"], &rates))?;
    let tap = p
        .options
        .get("tap")
        .filter(|v| !v.is_empty())
        .ok_or("--net: tap=NAME is required")?;
    let mac = match p.options.get("mac") {
        None => MacAddr::default(),
        Some(v) => match v.parse::<MacAddr>() {
            Ok(mac) if mac.is_zero() => {
                return Err(format!("--net mac={v}: the all-zero address"));
            }
            Ok(mac) => mac,
            Err(_) => {
                return Err(format!(
                    "--net mac={v}: expected six hex bytes as in 02:00:00:00:00:01"
                ))
            }
        },
    };
    Ok(NetConfig {
        id: None,
        tap: tap.into(),
        mac,
        rx_rate_limit: p.rate_limit("rx_")?,
        tx_rate_limit: p.rate_limit("tx_")?,
        mmds: None,
        queue_pairs: p.named(p.options.number("queue_pairs"))?.unwrap_or(1),
    })
}

/// Parses the `--vsock` value.
pub fn parse_vsock(s: &str) -> Result<VsockConfig, String> {
    let p = Pairs::parse("--vsock", s, &["cid", "uds"])?;
    if p.options.get("cid").is_none() {
        return Err("--vsock: cid=N is required".into());
    }
    let cid = p.named(p.options.number::<u64>("cid"))?.unwrap_or_default();
    let uds = p
        .options
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
    let rates = rate_keys("");
    Pairs::parse("--rng", s, &keys(&[], &rates))?.rate_limit("")
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
        assert_eq!(d.io_engine, IoEngine::Sync);
        let d = parse_disk("path=b.img,io_engine=async").unwrap();
        assert_eq!(d.io_engine, IoEngine::Async);
        assert_eq!(
            parse_disk("path=b.img,io_engine=sync").unwrap().io_engine,
            IoEngine::Sync
        );
        assert_eq!(d.num_queues, 1);
        assert_eq!(parse_disk("path=b.img,num_queues=4").unwrap().num_queues, 4);
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
        assert_eq!(
            parse_disk("path=a,io_engine=Turbo").unwrap_err(),
            "--disk io_engine=Turbo: expected sync (one request at a time) or async (io_uring)"
        );
        assert!(parse_disk("path=a,num_queues=many")
            .unwrap_err()
            .contains("num_queues=many: not a number"));
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
        assert_eq!(n.mac, MacAddr([2, 0xab, 0xcd, 0, 0, 1]));
        assert_eq!(n.rx_rate_limit.bandwidth, Some((1 << 20, None)));
        assert_eq!(n.rx_rate_limit.ops, None);
        assert_eq!(n.tx_rate_limit.ops, Some((10, Some(2))));
        assert!(parse_net("tap=x").unwrap().mac.is_zero());
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
        assert!(parse_rng("bw=4X")
            .unwrap_err()
            .contains("--rng bw=4X: not a number"));
    }
}
