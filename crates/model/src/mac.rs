//! MAC addresses: `aa:bb:cc:dd:ee:ff` on every surface (CLI, API bodies, config
//! files), six bytes inside.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A 48-bit MAC address.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

/// A string that is not `aa:bb:cc:dd:ee:ff`.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0:?}: not a MAC address (aa:bb:cc:dd:ee:ff)")]
pub struct BadMac(pub String);

impl MacAddr {
    /// `02:76:69:67:00:NN` ("vig", locally administered): the address of
    /// interface `index` when none is given.
    pub const fn for_interface(index: usize) -> Self {
        MacAddr([0x02, 0x76, 0x69, 0x67, (index >> 8) as u8, index as u8])
    }

    /// A group address (the low bit of the first byte), which no interface may take.
    pub const fn is_multicast(self) -> bool {
        self.0[0] & 1 != 0
    }

    /// `00:00:00:00:00:00`.
    pub fn is_zero(self) -> bool {
        self.0 == [0; 6]
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

impl FromStr for MacAddr {
    type Err = BadMac;

    fn from_str(s: &str) -> Result<Self, BadMac> {
        let bad = || BadMac(s.to_owned());
        let mut mac = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut mac {
            let part = parts.next().ok_or_else(bad)?;
            if part.len() != 2 {
                return Err(bad());
            }
            *byte = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(MacAddr(mac))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_print() {
        let mac: MacAddr = "02:00:00:00:00:0a".parse().unwrap();
        assert_eq!(mac, MacAddr([2, 0, 0, 0, 0, 10]));
        assert_eq!(mac.to_string(), "02:00:00:00:00:0a");
        assert_eq!(MacAddr::for_interface(1).to_string(), "02:76:69:67:00:01");
        for bad in [
            "",
            "02:00",
            "02:00:00:00:00:0g",
            "02:00:00:00:00:00:00",
            "2:0:0:0:0:0",
        ] {
            let e = bad.parse::<MacAddr>().unwrap_err();
            assert!(e.to_string().starts_with(&format!("{bad:?}")), "{e}");
        }
        assert!("01:00:00:00:00:00"
            .parse::<MacAddr>()
            .unwrap()
            .is_multicast());
        assert!(MacAddr::default().is_zero());
        assert_eq!(
            serde_json::from_str::<MacAddr>("\"02:00:00:00:00:0A\"").unwrap(),
            mac
        );
        assert_eq!(
            serde_json::to_string(&mac).unwrap(),
            "\"02:00:00:00:00:0a\""
        );
    }
}
