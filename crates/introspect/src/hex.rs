//! Addresses and register values as `"0x..."` strings (a JSON number cannot hold
//! a kernel address exactly in JavaScript) and bytes as one hex string: serde
//! helpers, and the parsers the API uses for the same spellings.

/// `"0x..."` for a `u64`; reads a `"0x..."` string or a number.
pub mod u64 {
    use serde::{de, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{v:#x}"))
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        N(u64),
        S(String),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        match Either::deserialize(d)? {
            Either::N(n) => Ok(n),
            Either::S(s) => super::parse_u64(&s).map_err(de::Error::custom),
        }
    }
}

/// A list of `u64`s, each as `"0x..."`; reads `"0x..."` strings or numbers.
pub mod u64_vec {
    use serde::ser::SerializeSeq;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u64], s: S) -> Result<S::Ok, S::Error> {
        let mut seq = s.serialize_seq(Some(v.len()))?;
        for x in v {
            seq.serialize_element(&format_args!("{x:#x}").to_string())?;
        }
        seq.end()
    }

    #[derive(Deserialize)]
    struct Hex(#[serde(with = "super::u64")] u64);

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u64>, D::Error> {
        Ok(Vec::<Hex>::deserialize(d)?
            .into_iter()
            .map(|h| h.0)
            .collect())
    }
}

/// An optional `u64` as `"0x..."` (or `null`).
pub mod opt_u64 {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(n) => super::u64::serialize(n, s),
            None => s.serialize_none(),
        }
    }

    #[derive(Deserialize)]
    struct Hex(#[serde(with = "super::u64")] u64);

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
        Ok(Option::<Hex>::deserialize(d)?.map(|h| h.0))
    }
}

/// Optional bytes as one lowercase hex string (or `null`).
pub mod opt_bytes {
    use serde::{de, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(b) => s.serialize_str(&super::bytes(b)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|s| super::parse_bytes(&s).map_err(de::Error::custom))
            .transpose()
    }
}

/// A digest as one lowercase hex string.
pub mod digest {
    use serde::{de, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::bytes(v))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let b = super::parse_bytes(&String::deserialize(d)?).map_err(de::Error::custom)?;
        let n = b.len();
        b.try_into()
            .map_err(|_| de::Error::custom(format!("{n} bytes, expected a 32-byte SHA-256")))
    }
}

/// Lowercase hex of `b`, no separators.
pub fn bytes(b: &[u8]) -> String {
    ::hex::encode(b)
}

/// A number or bytes that did not parse.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum HexError {
    #[error("{text:?} is not a number (0x... hex or decimal): {source}")]
    Number {
        text: String,
        source: std::num::ParseIntError,
    },
    #[error("{text:?}: {source}")]
    Bytes {
        text: String,
        source: ::hex::FromHexError,
    },
}

/// A number: `0x...` is hex, anything else decimal.
pub fn parse_u64(s: &str) -> Result<u64, HexError> {
    let t = s.trim();
    let r = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(h) => u64::from_str_radix(h, 16),
        None => t.parse(),
    };
    r.map_err(|source| HexError::Number {
        text: s.to_owned(),
        source,
    })
}

/// Bytes from hex digits, two a byte (what [`bytes`] writes).
pub fn parse_bytes(s: &str) -> Result<Vec<u8>, HexError> {
    ::hex::decode(s).map_err(|source| HexError::Bytes {
        text: s.to_owned(),
        source,
    })
}
