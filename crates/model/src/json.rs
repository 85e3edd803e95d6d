//! JSON bodies and files, parsed with errors that name the field at fault by its
//! path (`machine-config.vcpu_count: invalid type ...`).

/// A JSON body that does not parse: the field at fault (its path) and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct JsonError(pub String);

/// Parses a JSON body as `T`; the error names the field at fault (its path) and
/// what was wrong with it.
pub fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, JsonError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        // serde_json appends " at line L column C": useful, keep it.
        let inner = inner.to_string();
        let last = path.rsplit('.').next().unwrap_or_default();
        JsonError(if path == "." || path.is_empty() {
            inner
        } else if let Some(rest) = inner.strip_prefix(last).filter(|r| r.starts_with(' ')) {
            // A value's own message names its field already: `policy "x": ...`.
            format!("{path}{rest}")
        } else {
            format!("{path}: {inner}")
        })
    })?;
    de.end().map_err(|e| JsonError(e.to_string()))?;
    Ok(value)
}
