//! Option values that `vigild` and `vigil-ctl` both take.

use std::path::PathBuf;

/// The daemon's socket when neither --socket nor VIGIL_SOCKET says otherwise:
/// /run/vigil/daemon.sock for root, else $XDG_RUNTIME_DIR/vigil/daemon.sock (or
/// /tmp/vigil-UID/daemon.sock without XDG_RUNTIME_DIR).
pub fn default_socket() -> PathBuf {
    if let Some(path) = std::env::var_os("VIGIL_SOCKET") {
        return path.into();
    }
    // SAFETY: getuid cannot fail and touches no memory.
    let uid = unsafe { libc::getuid() };
    if uid == 0 {
        return "/run/vigil/daemon.sock".into();
    }
    match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(dir) => PathBuf::from(dir).join("vigil/daemon.sock"),
        None => PathBuf::from(format!("/tmp/vigil-{uid}/daemon.sock")),
    }
}

/// A number of seconds in (0, 3600] (timeouts).
pub fn parse_seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v <= 3600.0 => Ok(v),
        _ => Err(format!("{s:?} is not a number of seconds in (0, 3600]")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds() {
        assert_eq!(parse_seconds("2.5"), Ok(2.5));
        for bad in ["0", "-1", "3601", "NaN", "inf", "soon"] {
            assert!(parse_seconds(bad).unwrap_err().contains(bad), "{bad}");
        }
    }
}
