//! The data store and the V2 session tokens, behind one handle that the API and
//! the net devices share.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use crate::config::MmdsConfig;

/// Longest session token life a guest may ask for, in seconds (6 hours).
pub const TOKEN_TTL_MAX: u64 = 21600;
/// Live tokens kept at once: a guest asking for more loses its oldest.
const MAX_TOKENS: usize = 64;

/// Why the API could not change the data store.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    #[error("the MMDS data store is a JSON object, not {0}")]
    NotObject(&'static str),
    #[error("the MMDS data store would take {size} bytes, over its limit of {limit} bytes (--mmds-size-limit)")]
    TooLarge { size: usize, limit: usize },
    #[error("the MMDS data store is not initialized: PUT /mmds before PATCH")]
    NotInitialized,
}

pub(crate) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

pub(crate) struct State {
    /// The configuration the VM booted with (`PUT /mmds/config`).
    pub(crate) config: Option<MmdsConfig>,
    /// `None` until the first `PUT /mmds`.
    pub(crate) data: Option<Value>,
    limit: usize,
    tokens: Vec<([u8; 32], Instant)>,
}

/// The MMDS of one VM: its data store, its configuration once set, and the
/// session tokens handed out. Cloning shares it.
#[derive(Clone)]
pub struct Mmds(Arc<Mutex<State>>);

impl PartialEq for Mmds {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for Mmds {}

impl fmt::Debug for Mmds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.lock();
        f.debug_struct("Mmds")
            .field("config", &s.config)
            .field("limit", &s.limit)
            .finish_non_exhaustive()
    }
}

/// RFC 7396: members of a patch object replace, or with `null` remove, those of
/// the target; anything else replaces the target.
fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(members) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(t) = target {
        for (key, value) in members {
            if value.is_null() {
                t.remove(key);
            } else {
                merge(t.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

impl Mmds {
    /// An empty store of at most `limit` bytes (as JSON), not configured.
    pub fn new(limit: usize) -> Self {
        Self(Arc::new(Mutex::new(State {
            config: None,
            data: None,
            limit,
            tokens: Vec::new(),
        })))
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The largest store, in bytes of JSON, `PUT` and `PATCH` may leave.
    pub fn size_limit(&self) -> usize {
        self.lock().limit
    }

    pub fn set_size_limit(&self, limit: usize) {
        self.lock().limit = limit;
    }

    /// The configuration the guest side follows.
    pub fn config(&self) -> Option<MmdsConfig> {
        self.lock().config.clone()
    }

    pub fn set_config(&self, config: MmdsConfig) {
        self.lock().config = Some(config);
    }

    /// `GET /mmds`: the store, `{}` before anything was put.
    pub fn get(&self) -> Value {
        self.lock()
            .data
            .clone()
            .unwrap_or_else(|| Value::Object(Map::new()))
    }

    fn fits(limit: usize, v: &Value) -> Result<(), StoreError> {
        let size = serde_json::to_vec(v).map_or(usize::MAX, |b| b.len());
        if size > limit {
            return Err(StoreError::TooLarge { size, limit });
        }
        Ok(())
    }

    /// `PUT /mmds`: replaces the store.
    pub fn put(&self, v: Value) -> Result<(), StoreError> {
        if !v.is_object() {
            return Err(StoreError::NotObject(kind(&v)));
        }
        let mut s = self.lock();
        Self::fits(s.limit, &v)?;
        s.data = Some(v);
        Ok(())
    }

    /// `PATCH /mmds`: an RFC 7396 merge patch; the store is left as it was if
    /// the result would be over the limit.
    pub fn patch(&self, patch: &Value) -> Result<(), StoreError> {
        if !patch.is_object() {
            return Err(StoreError::NotObject(kind(patch)));
        }
        let mut s = self.lock();
        let mut data = s.data.clone().ok_or(StoreError::NotInitialized)?;
        merge(&mut data, patch);
        Self::fits(s.limit, &data)?;
        s.data = Some(data);
        Ok(())
    }

    /// A new session token living `ttl`, as hex.
    pub(crate) fn new_token(&self, now: Instant, ttl: Duration) -> std::io::Result<String> {
        let mut token = [0u8; 32];
        // getrandom, not /dev/urandom: the device thread that calls this may not
        // open files (its seccomp filter).
        // SAFETY: the kernel writes at most `token.len()` bytes into `token`.
        let n = unsafe { libc::getrandom(token.as_mut_ptr().cast(), token.len(), 0) };
        if n != token.len() as isize {
            return Err(std::io::Error::last_os_error());
        }
        let mut s = self.lock();
        s.tokens.retain(|(_, until)| *until > now);
        if s.tokens.len() >= MAX_TOKENS {
            s.tokens.remove(0);
        }
        s.tokens.push((token, now + ttl));
        Ok(hex::encode(token))
    }

    /// Whether `token` was handed out and has not expired.
    pub(crate) fn token_valid(&self, token: &str, now: Instant) -> bool {
        let mut bytes = [0u8; 32];
        if hex::decode_to_slice(token, &mut bytes).is_err() {
            return false;
        }
        let mut s = self.lock();
        s.tokens.retain(|(_, until)| *until > now);
        s.tokens.iter().any(|(t, _)| *t == bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn put_patch_get_follow_rfc_7396() {
        let m = Mmds::new(1 << 10);
        assert_eq!(m.get(), json!({}));
        assert_eq!(m.patch(&json!({"a": 1})), Err(StoreError::NotInitialized));
        m.put(json!({"a": {"b": 1, "c": 2}, "d": [1, 2]})).unwrap();
        m.patch(&json!({"a": {"b": null, "e": "x"}, "d": 3}))
            .unwrap();
        assert_eq!(m.get(), json!({"a": {"c": 2, "e": "x"}, "d": 3}));
        assert_eq!(m.put(json!([1])), Err(StoreError::NotObject("an array")));
    }

    #[test]
    fn the_size_limit_holds_and_leaves_the_store() {
        let m = Mmds::new(20);
        m.put(json!({"k": "v"})).unwrap();
        let e = m.patch(&json!({"k": "0123456789abcdef"})).unwrap_err();
        assert_eq!(
            e,
            StoreError::TooLarge {
                size: 24,
                limit: 20
            }
        );
        assert!(e.to_string().contains("limit of 20 bytes"), "{e}");
        assert_eq!(m.get(), json!({"k": "v"}));
        assert!(m.put(json!({"k": "0123456789abcdef"})).is_err());
    }

    #[test]
    fn tokens_expire_and_are_bounded() {
        let m = Mmds::new(64);
        let now = Instant::now();
        let t = m.new_token(now, Duration::from_secs(1)).unwrap();
        assert_eq!(t.len(), 64);
        assert!(m.token_valid(&t, now));
        assert!(!m.token_valid(&t, now + Duration::from_secs(2)));
        assert!(!m.token_valid("zz", now));
        let first = m.new_token(now, Duration::from_secs(60)).unwrap();
        for _ in 0..MAX_TOKENS {
            m.new_token(now, Duration::from_secs(60)).unwrap();
        }
        assert!(!m.token_valid(&first, now), "the oldest token gives way");
    }
}
