//! Durations: whole nanoseconds (`u64`), read from `"10ms"`-style strings or from
//! integers in microseconds, and written in the largest unit that holds them exactly.

/// A duration in nanoseconds: every time in the analysis. Integers keep every
/// comparison that decides schedulability exact.
pub type Nanos = u64;

pub const NS_PER_US: Nanos = 1_000;
pub const NS_PER_MS: Nanos = 1_000_000;
pub const NS_PER_S: Nanos = 1_000_000_000;

/// The longest time the analysis accepts (an hour): large enough for any real-time
/// period, small enough that products of times never overflow 128 bits.
pub const MAX_TIME: Nanos = 3_600 * NS_PER_S;

const UNITS: [(&str, Nanos); 6] = [
    ("ns", 1),
    ("us", NS_PER_US),
    ("µs", NS_PER_US),
    ("ms", NS_PER_MS),
    ("s", NS_PER_S),
    ("", NS_PER_US),
];

/// Parses `"10ms"`, `"500us"`, `"2s"`, `"250ns"`, `"1.5ms"` or a bare number of
/// microseconds (`"500"`). The value must be a whole number of nanoseconds.
pub fn parse_duration(text: &str) -> Result<Nanos, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let unit = unit.trim();
    let scale = UNITS
        .iter()
        .find(|(name, _)| *name == unit)
        .map(|(_, scale)| *scale)
        .ok_or_else(|| format!("unknown unit \"{unit}\" (use s, ms, us or ns)"))?;
    if number.is_empty() {
        return Err("no number before the unit".into());
    }
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if fraction.contains('.') || (whole.is_empty() && fraction.is_empty()) {
        return Err("not a number".into());
    }
    let too_long = || "too long (the limit is 1h)".to_string();
    let mut value: u128 = 0;
    for digit in whole.bytes() {
        value = value * 10 + u128::from(digit - b'0');
        if value > u128::from(MAX_TIME) {
            return Err(too_long());
        }
    }
    value *= u128::from(scale);
    // Each fractional digit is worth a tenth of the one before; what is left must be
    // whole nanoseconds.
    let mut place = u128::from(scale);
    for digit in fraction.bytes() {
        let digit = u128::from(digit - b'0');
        if !place.is_multiple_of(10) {
            if digit != 0 {
                return Err("finer than a nanosecond".into());
            }
            continue;
        }
        place /= 10;
        value += digit * place;
    }
    if value > u128::from(MAX_TIME) {
        return Err(too_long());
    }
    Ok(value as Nanos)
}

/// The duration in the largest unit that represents it exactly (`2500us`, `10ms`,
/// `0ns`): the form `vigil run --vcpu-sched` takes.
pub fn format_duration(ns: Nanos) -> String {
    for (unit, scale) in [("s", NS_PER_S), ("ms", NS_PER_MS), ("us", NS_PER_US)] {
        if ns != 0 && ns.is_multiple_of(scale) {
            return format!("{}{unit}", ns / scale);
        }
    }
    format!("{ns}ns")
}

/// The duration for people: exact, with a decimal point where needed (`2.5ms`).
pub fn display_duration(ns: Nanos) -> String {
    let (unit, scale) = if ns >= NS_PER_S {
        ("s", NS_PER_S)
    } else if ns >= NS_PER_MS {
        ("ms", NS_PER_MS)
    } else if ns >= NS_PER_US {
        ("us", NS_PER_US)
    } else {
        return format!("{ns}ns");
    };
    let whole = ns / scale;
    let rest = ns % scale;
    if rest == 0 {
        return format!("{whole}{unit}");
    }
    let digits = scale.ilog10() as usize;
    let fraction = format!("{rest:0digits$}");
    format!("{whole}.{}{unit}", fraction.trim_end_matches('0'))
}

pub fn gcd(mut a: u128, mut b: u128) -> u128 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// The least common multiple, or `None` past `limit`.
pub fn lcm_within(a: u128, b: u128, limit: u128) -> Option<u128> {
    if a == 0 || b == 0 {
        return Some(0);
    }
    let l = (a / gcd(a, b)).checked_mul(b)?;
    (l <= limit).then_some(l)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_fractions() {
        assert_eq!(parse_duration("10ms"), Ok(10 * NS_PER_MS));
        assert_eq!(parse_duration("500us"), Ok(500 * NS_PER_US));
        assert_eq!(parse_duration("500µs"), Ok(500 * NS_PER_US));
        assert_eq!(parse_duration("2s"), Ok(2 * NS_PER_S));
        assert_eq!(parse_duration("250ns"), Ok(250));
        assert_eq!(parse_duration("1.5ms"), Ok(1_500_000));
        assert_eq!(parse_duration("0.25us"), Ok(250));
        assert_eq!(parse_duration("7"), Ok(7_000));
        assert_eq!(parse_duration(" 3 ms "), Ok(3 * NS_PER_MS));
    }

    #[test]
    fn rejects_bad_durations() {
        assert!(parse_duration("1.5ns").unwrap_err().contains("nanosecond"));
        assert!(parse_duration("10 minutes").unwrap_err().contains("unit"));
        assert!(parse_duration("ms").unwrap_err().contains("no number"));
        assert!(parse_duration("1.2.3ms").is_err());
        assert!(parse_duration("2h").is_err());
        assert!(parse_duration("99999999999999999999999s")
            .unwrap_err()
            .contains("too long"));
        assert!(parse_duration("3601s").unwrap_err().contains("too long"));
    }

    #[test]
    fn formats_in_the_largest_exact_unit() {
        assert_eq!(format_duration(2 * NS_PER_MS), "2ms");
        assert_eq!(format_duration(2_500_000), "2500us");
        assert_eq!(format_duration(10 * NS_PER_S), "10s");
        assert_eq!(format_duration(1_001), "1001ns");
        assert_eq!(format_duration(0), "0ns");
        assert_eq!(display_duration(2_500_000), "2.5ms");
        assert_eq!(display_duration(1_000_001), "1.000001ms");
        assert_eq!(display_duration(40 * NS_PER_MS), "40ms");
    }
}
