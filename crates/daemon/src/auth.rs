//! The TCP listener's guard: a bearer token, compared in constant time, and the
//! rules for where the daemon may listen.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;

/// The shortest token the daemon accepts.
pub const MIN_TOKEN_LEN: usize = 16;

/// A bearer token.
#[derive(Clone)]
pub struct Token(Arc<[u8]>);

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

/// A token the daemon refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("the token is {len} bytes long: use at least {MIN_TOKEN_LEN} (e.g. `head -c 32 /dev/urandom | base64`)")]
    TooShort { len: usize },
    #[error("the token must be printable ASCII without spaces")]
    NotPrintable,
}

/// A `--token-file` the daemon cannot use.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error("--token-file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--token-file {}: other users may read it (mode {mode:04o}): run `chmod 600 {}`", path.display(), path.display())]
    Readable { path: PathBuf, mode: u32 },
    #[error("--token-file {}: {source}", path.display())]
    Token { path: PathBuf, source: TokenError },
}

impl Token {
    pub fn new(token: &str) -> Result<Token, TokenError> {
        let token = token.trim();
        if token.len() < MIN_TOKEN_LEN {
            return Err(TokenError::TooShort { len: token.len() });
        }
        if token.bytes().any(|b| !b.is_ascii_graphic()) {
            return Err(TokenError::NotPrintable);
        }
        Ok(Token(token.as_bytes().into()))
    }

    /// Reads a token from a file that only its owner may read (the way ssh treats
    /// private keys): surrounding whitespace is ignored.
    pub fn from_file(path: &Path) -> Result<Token, TokenFileError> {
        let read = |source| TokenFileError::Read {
            path: path.into(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(read)?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(TokenFileError::Readable {
                path: path.into(),
                mode,
            });
        }
        let text = std::fs::read_to_string(path).map_err(read)?;
        Token::new(&text).map_err(|source| TokenFileError::Token {
            path: path.into(),
            source,
        })
    }

    /// The token itself, for a client to present.
    pub fn as_str(&self) -> &str {
        // Checked printable ASCII when made.
        std::str::from_utf8(&self.0).unwrap_or_default()
    }

    /// Whether `candidate` is this token; the time taken does not depend on where
    /// they differ.
    pub fn matches(&self, candidate: &[u8]) -> bool {
        constant_time_eq(&self.0, candidate)
    }
}

/// Compares two byte strings in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u64;
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0xff);
        diff |= u64::from(x ^ y);
    }
    std::hint::black_box(diff) == 0
}

/// A TCP listener the daemon refuses to open.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TcpListenError {
    /// No token: refused, loopback or not.
    #[error(
        "--listen-tcp {addr} needs --token-file: {}. Create one with \
         `head -c 32 /dev/urandom | base64 > token && chmod 600 token`, \
         or use the Unix socket alone",
        if addr.ip().is_loopback() {
            "any local user can reach a loopback port"
        } else {
            "it is not a loopback address, so other machines could reach it"
        }
    )]
    NoToken { addr: SocketAddr },
    /// A non-loopback address without TLS: the token would cross the network
    /// in clear text.
    #[error(
        "--listen-tcp {addr} is not a loopback address: serve it over TLS \
         (--tls-cert and --tls-key), or the bearer token crosses the network in \
         clear text; --insecure-plain-tcp serves plain HTTP anyway (behind a TLS \
         proxy on the same host, say)"
    )]
    PlainNotLoopback { addr: SocketAddr },
    #[error("--insecure-plain-tcp with --tls-cert: the listener serves TLS; drop one of them")]
    InsecureWithTls,
}

/// Checks a TCP listen address against the rules: the daemon's TCP API always
/// needs a token, and off loopback it needs TLS too, unless the operator says
/// `insecure_plain` (then a warning is logged).
pub fn check_tcp_listen(
    addr: SocketAddr,
    token: Option<&Token>,
    tls: bool,
    insecure_plain: bool,
) -> Result<(), TcpListenError> {
    if token.is_none() {
        return Err(TcpListenError::NoToken { addr });
    }
    if tls && insecure_plain {
        return Err(TcpListenError::InsecureWithTls);
    }
    if !tls && !addr.ip().is_loopback() {
        if !insecure_plain {
            return Err(TcpListenError::PlainNotLoopback { addr });
        }
        tracing::warn!(
            "--listen-tcp {addr} serves plain HTTP off loopback (--insecure-plain-tcp): the bearer token and every answer cross the network in clear text"
        );
    }
    Ok(())
}

/// Middleware: requests without `Authorization: Bearer <token>` get 401.
pub async fn require_token(State(token): State<Token>, request: Request, next: Next) -> Response {
    let presented = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
    match presented {
        Some(candidate) if token.matches(candidate) => next.run(request).await,
        _ => {
            let mut response = ApiError::new(
                axum::http::StatusCode::UNAUTHORIZED,
                "this listener needs the header `Authorization: Bearer <token>` with the daemon's token (--token-file)",
            )
            .into_response();
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
            response
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compare() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(!constant_time_eq(b"", b"a"));
        assert!(constant_time_eq(b"", b""));
        // A shorter candidate padded with what the token has is still refused.
        assert!(!constant_time_eq(b"ab\xff", b"ab"));
    }

    #[test]
    fn tokens() {
        assert!(Token::new("short")
            .unwrap_err()
            .to_string()
            .contains("at least 16"));
        assert!(Token::new("0123456789abcdef 0").is_err());
        let t = Token::new("  0123456789abcdef\n").unwrap();
        assert!(t.matches(b"0123456789abcdef"));
        assert!(!t.matches(b"0123456789abcdeF"));
        assert_eq!(format!("{t:?}"), "Token(..)");
    }

    #[test]
    fn listen_rules() {
        let lo: SocketAddr = "127.0.0.1:7000".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:7000".parse().unwrap();
        let token = Token::new("0123456789abcdef").unwrap();
        for tls in [false, true] {
            assert!(check_tcp_listen(lo, None, tls, false)
                .unwrap_err()
                .to_string()
                .contains("--token-file"));
            let e = check_tcp_listen(any, None, tls, false)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("0.0.0.0:7000") && e.contains("not a loopback"),
                "{e}"
            );
        }
        // Loopback: plain or TLS.
        assert!(check_tcp_listen(lo, Some(&token), false, false).is_ok());
        assert!(check_tcp_listen(lo, Some(&token), true, false).is_ok());
        // Elsewhere: TLS, or plain only when the operator insists.
        let e = check_tcp_listen(any, Some(&token), false, false).unwrap_err();
        assert_eq!(e, TcpListenError::PlainNotLoopback { addr: any });
        assert!(e.to_string().contains("--insecure-plain-tcp"), "{e}");
        assert!(check_tcp_listen(any, Some(&token), true, false).is_ok());
        assert!(check_tcp_listen(any, Some(&token), false, true).is_ok());
        assert_eq!(
            check_tcp_listen(any, Some(&token), true, true),
            Err(TcpListenError::InsecureWithTls)
        );
    }

    #[test]
    fn token_file_mode() {
        let dir = std::env::temp_dir().join(format!("vigil-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("token");
        std::fs::write(&path, "0123456789abcdef0123\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(Token::from_file(&path)
            .unwrap_err()
            .to_string()
            .contains("chmod 600"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(Token::from_file(&path)
            .unwrap()
            .matches(b"0123456789abcdef0123"));
        assert!(Token::from_file(&dir.join("absent")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
