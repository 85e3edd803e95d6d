//! Option strings of the form `key=value,key=value` (`--disk path=a.img,ro=on`,
//! `--introspect period=100ms,policy=protect`): one parser for every flag of
//! every binary that takes them.

use std::time::Duration;

/// The `key=value` pairs of one option string, each key one of those allowed.
#[derive(Clone, Debug)]
pub struct Options<'a> {
    pairs: Vec<(&'a str, &'a str)>,
}

/// What is wrong with an option string; the front end names the option.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OptionsError {
    #[error("{0:?} is not key=value")]
    NotKeyValue(String),
    #[error("unknown key {key:?} (known: {known})")]
    UnknownKey { key: String, known: String },
    #[error("{0} given twice")]
    Twice(String),
    #[error("{key} is required")]
    Missing { key: &'static str },
    #[error("{key}={value}: {why}")]
    BadValue {
        key: String,
        value: String,
        why: &'static str,
    },
}

impl OptionsError {
    /// The message with the option named first: `--disk ro=x: expected on or off`,
    /// `--disk: unknown key "size" (known: ...)`.
    pub fn for_option(&self, option: &str) -> String {
        match self {
            OptionsError::BadValue { .. } => format!("{option} {self}"),
            _ => format!("{option}: {self}"),
        }
    }
}

impl<'a> Options<'a> {
    /// Splits `s` at commas; every key must be in `known` and given once. Empty
    /// items (`a=1,,b=2`, a trailing comma) are ignored.
    pub fn parse(s: &'a str, known: &[&str]) -> Result<Self, OptionsError> {
        let mut pairs: Vec<(&str, &str)> = Vec::new();
        for item in s.split(',').filter(|i| !i.is_empty()) {
            let (key, value) = item
                .split_once('=')
                .ok_or_else(|| OptionsError::NotKeyValue(item.to_owned()))?;
            if !known.contains(&key) {
                return Err(OptionsError::UnknownKey {
                    key: key.to_owned(),
                    known: known.join(", "),
                });
            }
            if pairs.iter().any(|(k, _)| *k == key) {
                return Err(OptionsError::Twice(key.to_owned()));
            }
            pairs.push((key, value));
        }
        Ok(Self { pairs })
    }

    /// The value of `key`, if given.
    pub fn get(&self, key: &str) -> Option<&'a str> {
        self.pairs.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
    }

    /// The value of `key`, which must be given and not empty.
    pub fn required(&self, key: &'static str) -> Result<&'a str, OptionsError> {
        self.get(key)
            .filter(|v| !v.is_empty())
            .ok_or(OptionsError::Missing { key })
    }

    fn bad(key: &str, value: &str, why: &'static str) -> OptionsError {
        OptionsError::BadValue {
            key: key.to_owned(),
            value: value.to_owned(),
            why,
        }
    }

    /// `on` or `off` (absent: off).
    pub fn on_off(&self, key: &str) -> Result<bool, OptionsError> {
        match self.get(key) {
            None | Some("off") => Ok(false),
            Some("on") => Ok(true),
            Some(v) => Err(Self::bad(key, v, "expected on or off")),
        }
    }

    /// A number with an optional binary suffix: `123`, `4K`, `10M`, `1G`.
    pub fn size(&self, key: &str) -> Result<Option<u64>, OptionsError> {
        self.get(key)
            .map(|v| {
                parse_size(v)
                    .ok_or_else(|| Self::bad(key, v, "not a number (suffixes K, M, G allowed)"))
            })
            .transpose()
    }

    /// A whole number.
    pub fn number<T: std::str::FromStr>(&self, key: &str) -> Result<Option<T>, OptionsError> {
        self.get(key)
            .map(|v| v.parse().map_err(|_| Self::bad(key, v, "not a number")))
            .transpose()
    }

    /// A duration: `100ms`, `2s`, `1m`, `1h 30m`.
    pub fn duration(&self, key: &str) -> Result<Option<Duration>, OptionsError> {
        self.get(key)
            .map(|v| {
                humantime::parse_duration(v)
                    .map_err(|_| Self::bad(key, v, "expected a number and a unit (100ms, 2s, 1m)"))
            })
            .transpose()
    }
}

/// `123`, `4K`, `10M`, `1G` (powers of 1024).
/// The host and port of a `HOST:PORT` address (a host name, an IPv4 address or
/// a bracketed IPv6 one, and a port number), as every TCP address option takes
/// it; `None` when it is not one.
pub fn host_port(s: &str) -> Option<(&str, u16)> {
    let (host, port) = s.rsplit_once(':')?;
    let port = port.parse().ok()?;
    (!host.is_empty()).then_some((host, port))
}

pub fn parse_size(s: &str) -> Option<u64> {
    let (digits, unit) = match s.char_indices().last()? {
        (i, 'K' | 'k') => (&s[..i], 1 << 10),
        (i, 'M' | 'm') => (&s[..i], 1 << 20),
        (i, 'G' | 'g') => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    digits.parse::<u64>().ok()?.checked_mul(unit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_takes_a_host_and_a_port_number() {
        assert_eq!(host_port("10.0.0.2:7070"), Some(("10.0.0.2", 7070)));
        assert_eq!(host_port("[::1]:80"), Some(("[::1]", 80)));
        for bad in ["10.0.0.2", ":7070", "h:", "h:99999", "h:x"] {
            assert_eq!(host_port(bad), None, "{bad}");
        }
    }

    #[test]
    fn pairs_keys_and_values() {
        let o = Options::parse("path=a.img,ro=on,,bw=10M", &["path", "ro", "bw", "t"]).unwrap();
        assert_eq!(o.get("path"), Some("a.img"));
        assert!(o.on_off("ro").unwrap());
        assert!(!o.on_off("t").unwrap());
        assert_eq!(o.size("bw").unwrap(), Some(10 << 20));
        assert_eq!(o.required("path").unwrap(), "a.img");
        assert_eq!(
            o.required("t").unwrap_err().for_option("--disk"),
            "--disk: t is required"
        );
        let e = Options::parse("size=1", &["path"]).unwrap_err();
        assert_eq!(
            e.for_option("--disk"),
            "--disk: unknown key \"size\" (known: path)"
        );
        let e = Options::parse("path=a,path=b", &["path"]).unwrap_err();
        assert_eq!(e.for_option("--disk"), "--disk: path given twice");
        let e = Options::parse("path", &["path"]).unwrap_err();
        assert_eq!(e.for_option("--disk"), "--disk: \"path\" is not key=value");
        let o = Options::parse("ro=yes,bw=10X,p=2s,q=9q", &["ro", "bw", "p", "q"]).unwrap();
        assert_eq!(
            o.on_off("ro").unwrap_err().for_option("--disk"),
            "--disk ro=yes: expected on or off"
        );
        assert!(o.size("bw").is_err());
        assert_eq!(o.duration("p").unwrap(), Some(Duration::from_secs(2)));
        assert!(o.duration("q").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4K"), Some(4096));
        assert_eq!(parse_size("1g"), Some(1 << 30));
        assert_eq!(parse_size("12"), Some(12));
        assert_eq!(parse_size(""), None);
        assert_eq!(parse_size("K"), None);
        assert_eq!(parse_size("99999999999999999999G"), None);
    }
}
