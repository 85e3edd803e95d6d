//! Wall-clock timestamps: nanoseconds since the Unix epoch, written as RFC 3339 UTC.
//!
//! Std only: the civil-date conversion is Howard Hinnant's `days_from_civil` /
//! `civil_from_days`, restricted to dates from 1970 on (a `u64` of nanoseconds
//! reaches the year 2554).

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

const NS_PER_SEC: u64 = 1_000_000_000;
const SECS_PER_DAY: u64 = 86_400;

/// A point in time: nanoseconds since 1970-01-01T00:00:00Z.
///
/// Serialized as an RFC 3339 UTC string with nanoseconds
/// (`2026-11-27T10:30:00.123456789Z`); deserialized from any RFC 3339 date-time
/// (`Z` or a numeric offset, 0 to 9 fraction digits) at or after the epoch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Timestamp(u64);

impl Timestamp {
    /// The epoch itself.
    pub const EPOCH: Timestamp = Timestamp(0);

    /// From nanoseconds since the epoch.
    pub const fn from_unix_ns(ns: u64) -> Self {
        Timestamp(ns)
    }

    /// From whole seconds since the epoch (saturating).
    pub const fn from_unix_secs(secs: u64) -> Self {
        Timestamp(secs.saturating_mul(NS_PER_SEC))
    }

    /// The system clock now (the epoch if the clock is set before it).
    pub fn now() -> Self {
        let ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        Timestamp(ns)
    }

    /// Nanoseconds since the epoch.
    pub const fn unix_ns(self) -> u64 {
        self.0
    }

    /// Milliseconds since the epoch (CEF's `rt`).
    pub const fn unix_ms(self) -> u64 {
        self.0 / 1_000_000
    }

    /// `self + d`, saturating at the end of time.
    pub fn saturating_add(self, d: Duration) -> Self {
        let add = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        Timestamp(self.0.saturating_add(add))
    }

    /// How long after `earlier` this is; `None` when `earlier` is later.
    pub fn since(self, earlier: Timestamp) -> Option<Duration> {
        self.0.checked_sub(earlier.0).map(Duration::from_nanos)
    }

    /// `2026-11-27T10:30:00.123456789Z`: RFC 3339, UTC, nine fraction digits.
    pub fn rfc3339(self) -> String {
        self.format(9)
    }

    /// `2026-11-27T10:30:00.123456Z`: six fraction digits, the most RFC 5424
    /// (syslog) allows.
    pub fn rfc3339_micros(self) -> String {
        self.format(6)
    }

    fn format(self, digits: u32) -> String {
        let secs = self.0 / NS_PER_SEC;
        let nanos = self.0 % NS_PER_SEC;
        let days = secs / SECS_PER_DAY;
        let rem = secs % SECS_PER_DAY;
        let (y, m, d) = civil_from_days(days);
        let (hh, mm, ss) = (rem / 3600, (rem / 60) % 60, rem % 60);
        let frac = nanos / 10u64.pow(9 - digits.min(9));
        format!(
            "{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}.{frac:0width$}Z",
            width = digits as usize
        )
    }

    /// Parses an RFC 3339 date-time: `YYYY-MM-DDTHH:MM:SS[.fraction](Z|±HH:MM)`
    /// (`t`, `z` and a space for `T` accepted). More than nine fraction digits are
    /// truncated. `None` for anything else, or for a time before the epoch.
    pub fn parse_rfc3339(s: &str) -> Option<Self> {
        let b = s.as_bytes();
        let num = |from: usize, len: usize| -> Option<u64> {
            let part = b.get(from..from.checked_add(len)?)?;
            let mut v = 0u64;
            for &c in part {
                if !c.is_ascii_digit() {
                    return None;
                }
                v = v * 10 + u64::from(c - b'0');
            }
            Some(v)
        };
        let sep = |at: usize, ok: &[u8]| b.get(at).is_some_and(|c| ok.contains(c));
        let year = num(0, 4)?;
        let month = num(5, 2)?;
        let day = num(8, 2)?;
        let hour = num(11, 2)?;
        let minute = num(14, 2)?;
        let second = num(17, 2)?;
        if !(sep(4, b"-") && sep(7, b"-") && sep(10, b"Tt ") && sep(13, b":") && sep(16, b":")) {
            return None;
        }
        if !(1..=12).contains(&month)
            || day < 1
            || day > days_in_month(year, month)
            || hour > 23
            || minute > 59
            || second > 59
        {
            return None;
        }
        let mut i = 19;
        let mut nanos = 0u64;
        if sep(i, b".") {
            i += 1;
            let start = i;
            while b.get(i).is_some_and(u8::is_ascii_digit) {
                if i - start < 9 {
                    nanos = nanos * 10 + u64::from(b[i] - b'0');
                }
                i += 1;
            }
            let digits = i - start;
            if digits == 0 {
                return None;
            }
            for _ in digits..9 {
                nanos *= 10;
            }
        }
        let offset_secs: i64 = match b.get(i) {
            Some(b'Z' | b'z') if i + 1 == b.len() => 0,
            Some(&c @ (b'+' | b'-')) if i + 6 == b.len() && sep(i + 3, b":") => {
                let oh = num(i + 1, 2)?;
                let om = num(i + 4, 2)?;
                if oh > 23 || om > 59 {
                    return None;
                }
                let off = i64::try_from(oh * 3600 + om * 60).ok()?;
                if c == b'+' {
                    off
                } else {
                    -off
                }
            }
            _ => return None,
        };
        if year < 1970 && offset_secs >= 0 {
            return None;
        }
        let days = days_from_civil(year, month, day)?;
        let local = i128::from(days) * i128::from(SECS_PER_DAY)
            + i128::from(hour * 3600 + minute * 60 + second);
        let utc = local - i128::from(offset_secs);
        let ns = utc
            .checked_mul(i128::from(NS_PER_SEC))?
            .checked_add(i128::from(nanos))?;
        u64::try_from(ns).ok().map(Timestamp)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.rfc3339())
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.rfc3339())
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Timestamp::parse_rfc3339(&s)
            .ok_or_else(|| serde::de::Error::custom(format!("not an RFC 3339 time: {s:?}")))
    }
}

fn is_leap(y: u64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: u64, m: u64) -> u64 {
    match m {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if is_leap(y) => 29,
        2 => 28,
        _ => 0,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (may be negative for
/// 1969-12-31 when a positive offset brings it after the epoch).
fn days_from_civil(y: u64, m: u64, d: u64) -> Option<i64> {
    let y = i64::try_from(y).ok()? - i64::from(m <= 2);
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400);
    let m = i64::try_from(m).ok()?;
    let d = i64::try_from(d).ok()?;
    let mp = if m > 2 { m - 3 } else { m + 9 };
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    Some(era * 146_097 + doe - 719_468)
}

/// (year, month, day) of a day count since 1970-01-01.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_known_instants() {
        assert_eq!(Timestamp::EPOCH.rfc3339(), "1970-01-01T00:00:00.000000000Z");
        // 2000-02-29 (a leap day in a century leap year) 12:34:56.000000789
        let t = Timestamp::from_unix_ns(951_827_696_000_000_789);
        assert_eq!(t.rfc3339(), "2000-02-29T12:34:56.000000789Z");
        assert_eq!(t.rfc3339_micros(), "2000-02-29T12:34:56.000000Z");
        let t = Timestamp::from_unix_ns(1_700_000_000_123_456_789);
        assert_eq!(t.rfc3339(), "2023-11-14T22:13:20.123456789Z");
        assert_eq!(t.rfc3339_micros(), "2023-11-14T22:13:20.123456Z");
        // The end of u64 nanoseconds formats without panicking.
        assert_eq!(
            Timestamp::from_unix_ns(u64::MAX).rfc3339(),
            "2554-07-21T23:34:33.709551615Z"
        );
    }

    #[test]
    fn parse_round_trips_and_offsets() {
        for ns in [
            0,
            1,
            951_827_696_000_000_789,
            1_700_000_000_123_456_789,
            4_102_444_800_000_000_000, // 2100-01-01 (not a leap year)
            u64::MAX,
        ] {
            let t = Timestamp::from_unix_ns(ns);
            assert_eq!(Timestamp::parse_rfc3339(&t.rfc3339()), Some(t), "{t}");
        }
        assert_eq!(
            Timestamp::parse_rfc3339("2023-11-14T23:13:20.5+01:00"),
            Some(Timestamp::from_unix_ns(1_700_000_000_500_000_000))
        );
        assert_eq!(
            Timestamp::parse_rfc3339("1969-12-31T23:00:00-01:00"),
            Some(Timestamp::EPOCH)
        );
        assert_eq!(
            Timestamp::parse_rfc3339("2023-11-14t22:13:20.1234567891234z"),
            Some(Timestamp::from_unix_ns(1_700_000_000_123_456_789))
        );
    }

    #[test]
    fn parse_rejects_garbage_without_panicking() {
        for s in [
            "",
            "2023",
            "2023-11-14",
            "2023-11-14T22:13:20",
            "2023-11-14T22:13:20.Z",
            "2023-13-14T22:13:20Z",
            "2023-02-29T22:13:20Z",
            "2023-11-14T24:13:20Z",
            "2023-11-14T22:13:20+1:00",
            "2023-11-14T22:13:20+01:00x",
            "1969-12-31T23:59:59Z",
            "2023-11-14T22:13:20Zjunk",
            "２０２３-11-14T22:13:20Z",
            "9999-12-31T23:59:59Z",
        ] {
            assert_eq!(Timestamp::parse_rfc3339(s), None, "{s:?}");
        }
    }

    #[test]
    fn arithmetic_saturates() {
        let t = Timestamp::from_unix_secs(10);
        assert_eq!(
            t.since(Timestamp::from_unix_secs(4)),
            Some(Duration::from_secs(6))
        );
        assert_eq!(Timestamp::from_unix_secs(4).since(t), None);
        assert_eq!(
            Timestamp::from_unix_ns(u64::MAX).saturating_add(Duration::from_secs(1)),
            Timestamp::from_unix_ns(u64::MAX)
        );
        assert_eq!(t.unix_ms(), 10_000);
    }
}
