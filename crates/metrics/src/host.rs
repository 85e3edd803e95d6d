//! Host and process readings from `/proc`: pressure stall information (PSI), load
//! average, memory, CPU time, a process's resident memory and a thread's
//! scheduler statistics. Every parser takes the file's text and returns `None`
//! (never panics) on text it does not understand; every reader returns `None`
//! when the file is absent (PSI is often disabled: `psi=0`, or no
//! `CONFIG_PSI`).

use serde::{Deserialize, Serialize};

/// One line of a PSI file (`some` or `full`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PressureLine {
    /// Percentage of time stalled over the last 10 s, 60 s, 300 s.
    pub avg10: f64,
    pub avg60: f64,
    pub avg300: f64,
    /// Total time stalled, microseconds.
    pub total_us: u64,
}

/// One PSI resource (`/proc/pressure/cpu`, `memory` or `io`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Pressure {
    /// Some task stalled.
    pub some: PressureLine,
    /// Every non-idle task stalled at once (absent for `cpu` on kernels before 5.13).
    pub full: Option<PressureLine>,
}

/// `/proc/loadavg`'s first three fields.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadAvg {
    pub load1: f64,
    pub load5: f64,
    pub load15: f64,
}

/// `/proc/meminfo`'s totals.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemInfo {
    pub total_bytes: u64,
    pub available_bytes: u64,
}

/// The aggregate `cpu` line of `/proc/stat`, in seconds (`USER_HZ` is 100 on
/// every Linux ABI Vigil runs on).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CpuTimes {
    pub user: f64,
    pub nice: f64,
    pub system: f64,
    pub idle: f64,
    pub iowait: f64,
    pub irq: f64,
    pub softirq: f64,
    pub steal: f64,
}

impl CpuTimes {
    /// `(mode, seconds)` for every mode.
    pub fn iter(&self) -> [(&'static str, f64); 8] {
        [
            ("user", self.user),
            ("nice", self.nice),
            ("system", self.system),
            ("idle", self.idle),
            ("iowait", self.iowait),
            ("irq", self.irq),
            ("softirq", self.softirq),
            ("steal", self.steal),
        ]
    }
}

/// What the host looks like now. Each part is `None` where the kernel does not
/// offer it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct HostSnapshot {
    pub cpu_pressure: Option<Pressure>,
    pub memory_pressure: Option<Pressure>,
    pub io_pressure: Option<Pressure>,
    pub load: Option<LoadAvg>,
    pub memory: Option<MemInfo>,
    pub cpu: Option<CpuTimes>,
    /// Host CPUs online (`cpuN` lines of `/proc/stat`).
    pub cpus: Option<u32>,
}

impl HostSnapshot {
    /// Reads everything from `/proc`.
    pub fn read() -> Self {
        let stat = read("/proc/stat");
        HostSnapshot {
            cpu_pressure: read("/proc/pressure/cpu").and_then(|t| parse_pressure(&t)),
            memory_pressure: read("/proc/pressure/memory").and_then(|t| parse_pressure(&t)),
            io_pressure: read("/proc/pressure/io").and_then(|t| parse_pressure(&t)),
            load: read("/proc/loadavg").and_then(|t| parse_loadavg(&t)),
            memory: read("/proc/meminfo").and_then(|t| parse_meminfo(&t)),
            cpu: stat.as_deref().and_then(parse_stat_cpu),
            cpus: stat.as_deref().map(count_stat_cpus).filter(|&n| n > 0),
        }
    }

    /// The three PSI resources with their names (`cpu`, `memory`, `io`).
    pub fn pressures(&self) -> [(&'static str, Option<&Pressure>); 3] {
        [
            ("cpu", self.cpu_pressure.as_ref()),
            ("memory", self.memory_pressure.as_ref()),
            ("io", self.io_pressure.as_ref()),
        ]
    }
}

fn read(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

fn parse_pressure_line(fields: &str) -> Option<PressureLine> {
    let (mut avg10, mut avg60, mut avg300, mut total) = (None, None, None, None);
    for kv in fields.split_whitespace() {
        let (k, v) = kv.split_once('=')?;
        match k {
            "avg10" => avg10 = v.parse::<f64>().ok().filter(|x| x.is_finite()),
            "avg60" => avg60 = v.parse::<f64>().ok().filter(|x| x.is_finite()),
            "avg300" => avg300 = v.parse::<f64>().ok().filter(|x| x.is_finite()),
            "total" => total = v.parse::<u64>().ok(),
            _ => {}
        }
    }
    Some(PressureLine {
        avg10: avg10?,
        avg60: avg60?,
        avg300: avg300?,
        total_us: total?,
    })
}

/// Parses a `/proc/pressure/*` file:
/// `some avg10=0.00 avg60=0.00 avg300=0.00 total=0` and maybe a `full` line.
pub fn parse_pressure(text: &str) -> Option<Pressure> {
    let mut some = None;
    let mut full = None;
    for line in text.lines() {
        match line.split_once(' ') {
            Some(("some", rest)) => some = Some(parse_pressure_line(rest)?),
            Some(("full", rest)) => full = Some(parse_pressure_line(rest)?),
            _ => {}
        }
    }
    Some(Pressure { some: some?, full })
}

/// Parses `/proc/loadavg` (`0.52 0.58 0.59 1/389 12345`).
pub fn parse_loadavg(text: &str) -> Option<LoadAvg> {
    let mut f = text
        .split_whitespace()
        .map(|v| v.parse::<f64>().ok().filter(|x| x.is_finite()));
    Some(LoadAvg {
        load1: f.next()??,
        load5: f.next()??,
        load15: f.next()??,
    })
}

/// Parses `MemTotal` and `MemAvailable` out of `/proc/meminfo` (in kB).
pub fn parse_meminfo(text: &str) -> Option<MemInfo> {
    let kib = |name: &str| {
        text.lines().find_map(|l| {
            let rest = l.strip_prefix(name)?.strip_prefix(':')?;
            let kb: u64 = rest.split_whitespace().next()?.parse().ok()?;
            kb.checked_mul(1024)
        })
    };
    Some(MemInfo {
        total_bytes: kib("MemTotal")?,
        available_bytes: kib("MemAvailable")?,
    })
}

/// `USER_HZ`: the unit of `/proc/stat`.
const USER_HZ: f64 = 100.0;

/// Parses the aggregate `cpu` line of `/proc/stat`. Older kernels without
/// `steal` (or `iowait`...) give zeros for the missing fields.
pub fn parse_stat_cpu(text: &str) -> Option<CpuTimes> {
    let line = text.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    if v.len() < 4 {
        return None;
    }
    let s = |i: usize| v.get(i).copied().unwrap_or(0) as f64 / USER_HZ;
    Some(CpuTimes {
        user: s(0),
        nice: s(1),
        system: s(2),
        idle: s(3),
        iowait: s(4),
        irq: s(5),
        softirq: s(6),
        steal: s(7),
    })
}

fn count_stat_cpus(text: &str) -> u32 {
    text.lines()
        .filter(|l| {
            l.strip_prefix("cpu")
                .and_then(|r| r.split(char::is_whitespace).next())
                .is_some_and(|n| n.parse::<u32>().is_ok())
        })
        .count() as u32
}

/// Parses `/proc/<pid>/statm` into resident bytes (second field, in pages of
/// `page_size` bytes).
pub fn parse_statm_rss(text: &str, page_size: u64) -> Option<u64> {
    let pages: u64 = text.split_whitespace().nth(1)?.parse().ok()?;
    pages.checked_mul(page_size)
}

/// Resident memory of this process (`/proc/self/statm`; `page_size` is the host's,
/// 4096 on x86_64).
pub fn process_rss_bytes(page_size: u64) -> Option<u64> {
    parse_statm_rss(&read("/proc/self/statm")?, page_size)
}

/// Parses a `schedstat` file: (ns on a CPU, ns runnable but waiting for one).
pub fn parse_schedstat(text: &str) -> Option<(u64, u64)> {
    let mut f = text.split_whitespace().map(|v| v.parse::<u64>().ok());
    Some((f.next()??, f.next()??))
}

/// Reads a `schedstat` file (`/proc/self/task/<tid>/schedstat`).
pub fn read_schedstat(path: &str) -> Option<(u64, u64)> {
    parse_schedstat(&read(path)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PSI_MEM: &str = "some avg10=1.50 avg60=0.25 avg300=0.00 total=123456\n\
                           full avg10=0.10 avg60=0.00 avg300=0.00 total=789\n";

    #[test]
    fn pressure_some_and_full() {
        let p = parse_pressure(PSI_MEM).unwrap();
        assert_eq!(p.some.avg10, 1.5);
        assert_eq!(p.some.avg60, 0.25);
        assert_eq!(p.some.total_us, 123456);
        assert_eq!(p.full.unwrap().total_us, 789);
        // Kernels before 5.13 have no `full` line for cpu.
        let cpu = parse_pressure("some avg10=0.00 avg60=0.00 avg300=0.00 total=5\n").unwrap();
        assert_eq!(cpu.full, None);
    }

    #[test]
    fn loadavg_meminfo_stat_statm_schedstat() {
        let l = parse_loadavg("0.52 0.58 0.59 1/389 12345\n").unwrap();
        assert_eq!((l.load1, l.load5, l.load15), (0.52, 0.58, 0.59));
        let m = parse_meminfo(
            "MemTotal:       16318016 kB\nMemFree:         1000 kB\nMemAvailable:   12000000 kB\n",
        )
        .unwrap();
        assert_eq!(m.total_bytes, 16318016 * 1024);
        assert_eq!(m.available_bytes, 12000000 * 1024);
        let stat = "cpu  100 2 50 1000 7 0 3 4 0 0\ncpu0 50 1 25 500 3 0 1 2 0 0\ncpu1 50 1 25 500 4 0 2 2 0 0\nintr 1\n";
        let c = parse_stat_cpu(stat).unwrap();
        assert_eq!(c.user, 1.0);
        assert_eq!(c.idle, 10.0);
        assert_eq!(c.steal, 0.04);
        assert_eq!(count_stat_cpus(stat), 2);
        // An old kernel: four fields only.
        assert_eq!(parse_stat_cpu("cpu 1 2 3 4\n").unwrap().steal, 0.0);
        assert_eq!(
            parse_statm_rss("1000 250 100 10 0 200 0\n", 4096),
            Some(250 * 4096)
        );
        assert_eq!(parse_schedstat("123456 7890 42\n"), Some((123456, 7890)));
    }

    #[test]
    fn malformed_text_gives_none_not_a_panic() {
        let junk = [
            "",
            "\n",
            "some",
            "some avg10=x avg60=0 avg300=0 total=1",
            "some avg10=1 avg60=1 avg300=1",
            "some avg10=NaN avg60=1 avg300=1 total=1",
            "full avg10=0 avg60=0 avg300=0 total=0",
            "some avg10=1 avg60=1 avg300=1 total=-5",
            "some avg10 avg60=1",
            "\u{0}\u{ff}garbage===",
            "cpu",
            "cpu x y z w",
            "1.0",
            "MemTotal: lots",
            "MemTotal: 99999999999999999999 kB\nMemAvailable: 1 kB",
        ];
        for t in junk {
            assert_eq!(parse_pressure(t), None, "{t:?}");
            assert_eq!(parse_loadavg(t), None, "{t:?}");
            assert_eq!(parse_meminfo(t), None, "{t:?}");
            assert_eq!(parse_stat_cpu(t), None, "{t:?}");
            assert_eq!(parse_statm_rss(t, 4096), None, "{t:?}");
            assert_eq!(parse_schedstat(t), None, "{t:?}");
        }
        assert_eq!(parse_stat_cpu("cpu 1 2"), None);
        assert_eq!(parse_statm_rss("1 18446744073709551615", 4096), None);
    }

    #[test]
    fn reading_this_host_never_fails() {
        let h = HostSnapshot::read();
        // /proc is there on Linux; PSI may not be.
        assert!(h.load.is_some());
        assert!(h.memory.unwrap().total_bytes > 0);
        assert!(h.cpus.unwrap() >= 1);
        assert_eq!(
            h.cpu_pressure.is_some(),
            std::path::Path::new("/proc/pressure/cpu").exists()
                && std::fs::read_to_string("/proc/pressure/cpu").is_ok()
        );
        assert!(process_rss_bytes(4096).unwrap() > 0);
    }
}
