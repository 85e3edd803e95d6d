//! Where a migration goes: `tcp:HOST:PORT` or `unix:PATH`, and the byte stream
//! to it.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use vigil_model::options::host_port;

use crate::tls::{ClientTls, ServerTls, TlsError};

/// A migration endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// A TCP address, `HOST:PORT`.
    Tcp(String),
    /// A Unix socket (a local upgrade).
    Unix(PathBuf),
}

/// A target that does not parse.
#[derive(Debug, thiserror::Error)]
#[error("{0:?}: expected tcp:HOST:PORT or unix:PATH")]
pub struct BadTarget(pub String);

impl FromStr for Target {
    type Err = BadTarget;

    fn from_str(s: &str) -> Result<Self, BadTarget> {
        match s.split_once(':') {
            Some(("tcp", addr)) if host_port(addr).is_some() => Ok(Target::Tcp(addr.to_owned())),
            Some(("unix", path)) if !path.is_empty() => Ok(Target::Unix(path.into())),
            _ => Err(BadTarget(s.to_owned())),
        }
    }
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Tcp(addr) => write!(f, "tcp:{addr}"),
            Target::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// A connected byte stream, either kind.
pub trait Stream: Read + Write + Send {
    /// Limits how long one read may wait.
    fn set_read_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()>;
    /// A second handle on the same connection, so that one thread reads while
    /// another writes (post-copy: page requests one way, pages the other).
    fn try_clone(&self) -> std::io::Result<Box<dyn Stream>>;
}

impl Stream for TcpStream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        TcpStream::set_read_timeout(self, timeout)
    }

    fn try_clone(&self) -> std::io::Result<Box<dyn Stream>> {
        Ok(Box::new(TcpStream::try_clone(self)?))
    }
}

impl Stream for UnixStream {
    fn set_read_timeout(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        UnixStream::set_read_timeout(self, timeout)
    }

    fn try_clone(&self) -> std::io::Result<Box<dyn Stream>> {
        Ok(Box::new(UnixStream::try_clone(self)?))
    }
}

impl Target {
    /// Connects to a waiting destination, over TLS with `tls`.
    pub fn connect(&self, tls: Option<&ClientTls>) -> std::io::Result<Box<dyn Stream>> {
        let socket: Box<dyn Stream> = match self {
            Target::Tcp(addr) => {
                let s = TcpStream::connect(addr)?;
                s.set_nodelay(true)?;
                Box::new(s)
            }
            Target::Unix(path) => Box::new(UnixStream::connect(path)?),
        };
        match tls {
            Some(tls) => tls.connect(socket),
            None => Ok(socket),
        }
    }

    /// The host of a TCP target (without an IPv6 address's brackets): the
    /// name its TLS certificate must carry unless told another.
    pub fn host(&self) -> Option<&str> {
        match self {
            Target::Tcp(addr) => host_port(addr).map(|(host, _)| {
                host.strip_prefix('[')
                    .and_then(|h| h.strip_suffix(']'))
                    .unwrap_or(host)
            }),
            Target::Unix(_) => None,
        }
    }

    /// Listens for sources (a stale Unix socket file is replaced).
    pub fn listen(&self) -> std::io::Result<Listener> {
        let socket = match self {
            Target::Tcp(addr) => Socket::Tcp(TcpListener::bind(addr)?),
            Target::Unix(path) => {
                if UnixStream::connect(path).is_err() {
                    let _ = std::fs::remove_file(path);
                }
                Socket::Unix(UnixListener::bind(path)?, path.clone())
            }
        };
        Ok(Listener { socket, tls: None })
    }
}

/// A listening destination.
pub struct Listener {
    socket: Socket,
    tls: Option<ServerTls>,
}

enum Socket {
    Tcp(TcpListener),
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Takes sources over TLS only, presenting `tls`'s certificate.
    pub fn with_tls(mut self, tls: ServerTls) -> Self {
        self.tls = Some(tls);
        self
    }

    /// An accepted source's stream as the migration reads it: over TLS (the
    /// handshake done) when the listener has a certificate.
    pub fn secure(&self, socket: Box<dyn Stream>) -> Result<Box<dyn Stream>, TlsError> {
        match &self.tls {
            Some(tls) => tls.accept(socket),
            None => Ok(socket),
        }
    }

    /// The next source; `Interrupted` once `stop` says so (asked every 50 ms).
    pub fn accept(&self, stop: &dyn Fn() -> bool) -> std::io::Result<Box<dyn Stream>> {
        match &self.socket {
            Socket::Tcp(l) => l.set_nonblocking(true)?,
            Socket::Unix(l, _) => l.set_nonblocking(true)?,
        }
        loop {
            if stop() {
                return Err(std::io::ErrorKind::Interrupted.into());
            }
            let accepted: std::io::Result<Box<dyn Stream>> = match &self.socket {
                Socket::Tcp(l) => l.accept().and_then(|(s, _)| {
                    s.set_nonblocking(false)?;
                    s.set_nodelay(true)?;
                    Ok(Box::new(s) as Box<dyn Stream>)
                }),
                Socket::Unix(l, _) => l.accept().and_then(|(s, _)| {
                    s.set_nonblocking(false)?;
                    Ok(Box::new(s) as Box<dyn Stream>)
                }),
            };
            match accepted {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                other => return other,
            }
        }
    }

    /// Where it listens (with the port a `:0` address was given).
    pub fn local(&self) -> String {
        match &self.socket {
            Socket::Tcp(l) => l
                .local_addr()
                .map_or_else(|_| "tcp:?".into(), |a| format!("tcp:{a}")),
            Socket::Unix(_, path) => format!("unix:{}", path.display()),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Socket::Unix(_, path) = &self.socket {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_or_say_what_is_expected() {
        assert_eq!(
            "tcp:10.0.0.2:4000".parse::<Target>().unwrap(),
            Target::Tcp("10.0.0.2:4000".into())
        );
        assert_eq!(
            "unix:/run/m.sock".parse::<Target>().unwrap(),
            Target::Unix("/run/m.sock".into())
        );
        for bad in [
            "10.0.0.2:4000",
            "tcp:host",
            "tcp::4000",
            "tcp:h:99999",
            "unix:",
            "udp:x:1",
        ] {
            let e = bad.parse::<Target>().unwrap_err().to_string();
            assert!(e.contains(bad) && e.contains("tcp:HOST:PORT"), "{e}");
        }
    }
}
