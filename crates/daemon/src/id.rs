//! VM ids: the names the daemon files VMs under (and the names of their folders).

/// The longest id the daemon accepts.
pub const MAX_ID_LEN: usize = 64;

/// A VM id the daemon refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("id is empty: give 1 to 64 characters from A-Z a-z 0-9 _ -")]
    Empty,
    /// `shown` is the id's first characters.
    #[error("id {shown:?} is {len} bytes long: at most {MAX_ID_LEN} are allowed")]
    TooLong { shown: String, len: usize },
    #[error("id {id:?} contains {c:?}: only A-Z a-z 0-9 _ - are allowed")]
    BadCharacter { id: String, c: char },
}

/// Checks that `id` is 1 to 64 characters from `A-Z a-z 0-9 _ -`, so that it is safe
/// as a folder name, in a URL path and as a Prometheus label value.
pub fn validate_id(id: &str) -> Result<(), IdError> {
    if id.is_empty() {
        return Err(IdError::Empty);
    }
    if id.len() > MAX_ID_LEN {
        return Err(IdError::TooLong {
            shown: truncate(id),
            len: id.len(),
        });
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'))
    {
        return Err(IdError::BadCharacter { id: id.into(), c });
    }
    Ok(())
}

fn truncate(s: &str) -> String {
    s.chars().take(24).chain("...".chars()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        for ok in ["a", "vm-1", "VM_2", &"x".repeat(64)] {
            assert!(validate_id(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a b", "../x", "a/b", "é", "a.b", &"x".repeat(65), "a\0"] {
            let e = validate_id(bad).unwrap_err().to_string();
            assert!(e.contains("id"), "{e}");
        }
        assert!(validate_id("a/b").unwrap_err().to_string().contains("'/'"));
    }
}
