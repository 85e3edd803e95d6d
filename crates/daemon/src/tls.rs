//! TLS on the daemon's TCP listener (`--tls-cert`, `--tls-key`, and with
//! `--tls-client-ca` mutual TLS): rustls through tokio-rustls, configured by
//! `vigil-tls`. Handshakes run each in its own task (at most
//! [`MAX_HANDSHAKES`] at once, each within [`HANDSHAKE_TIMEOUT`]), so a slow
//! or silent client holds up no one; the API sees only connections whose
//! handshake completed. A client that speaks plain HTTP to this port gets a
//! plain `400` saying to use https, and nothing else.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use vigil_tls::PemError;

/// How long a client may take over its handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The most handshakes under way at once; connections beyond are closed.
pub const MAX_HANDSHAKES: usize = 256;
/// The first byte of a TLS handshake record.
const HANDSHAKE_RECORD: u8 = 0x16;

/// The TCP listener's certificate, key, and the CA of its clients' certificates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// With it, every client must present a certificate this CA issued.
    pub client_ca: Option<PathBuf>,
}

/// A `--tls-*` or `--peer-tls-*` file the daemon cannot use: the flag and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{flag} {source}")]
pub struct TlsFileError {
    pub flag: &'static str,
    pub source: PemError,
}

impl ApiTls {
    /// Reads the files; an error names the flag and the file at fault.
    pub fn acceptor(&self) -> Result<TlsAcceptor, TlsFileError> {
        let mut config = vigil_tls::server_config(&self.cert, &self.key, self.client_ca.as_deref())
            .map_err(|source| TlsFileError {
                flag: match source {
                    PemError::Cert { .. } => "--tls-cert",
                    PemError::Key { .. } => "--tls-key",
                    PemError::Ca { .. } => "--tls-client-ca",
                },
                source,
            })?;
        // The API speaks HTTP/1.1 only.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(TlsAcceptor::from(Arc::new(config)))
    }
}

/// What the daemon presents to, and trusts in, the other daemons' https APIs
/// it sends VMs to (`--peer-tls-ca`, `--peer-tls-cert`, `--peer-tls-key`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerTls {
    /// The CA the peers' certificates come from.
    pub ca: PathBuf,
    /// This daemon's client certificate and key, for peers that want one.
    pub identity: Option<(PathBuf, PathBuf)>,
}

impl PeerTls {
    /// Reads the files; an error names the flag and the file at fault.
    pub fn load(&self) -> Result<crate::client::ClientTls, TlsFileError> {
        let identity = self
            .identity
            .as_ref()
            .map(|(c, k)| (c.as_path(), k.as_path()));
        crate::client::ClientTls::load(&self.ca, identity).map_err(|source| TlsFileError {
            flag: match source {
                PemError::Cert { .. } => "--peer-tls-cert",
                PemError::Key { .. } => "--peer-tls-key",
                PemError::Ca { .. } => "--peer-tls-ca",
            },
            source,
        })
    }
}

/// The TCP listener behind TLS, as axum serves it: each `accept` yields a
/// connection whose handshake is done.
pub struct TlsListener {
    accepted: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl TlsListener {
    pub fn new(listener: TcpListener, acceptor: TlsAcceptor) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        let (tx, accepted) = mpsc::channel(16);
        let task = tokio::spawn(accept_loop(listener, acceptor, tx));
        Ok(Self {
            accepted,
            local,
            task,
        })
    }
}

impl Drop for TlsListener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.accepted.recv().await {
            Some(connection) => connection,
            // The accept loop ended (it never does while the listener lives).
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    tx: mpsc::Sender<(TlsStream<TcpStream>, SocketAddr)>,
) {
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(connection) => connection,
                Err(e) => {
                    // Out of file descriptors, say: wait rather than spin.
                    tracing::warn!("--listen-tcp: cannot accept a connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = tx.closed() => return,
        };
        let Ok(permit) = handshakes.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "{MAX_HANDSHAKES} TLS handshakes under way: connection closed");
            continue;
        };
        let (acceptor, tx) = (acceptor.clone(), tx.clone());
        tokio::spawn(async move {
            let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(stream, acceptor));
            let result = handshake.await;
            drop(permit);
            match result {
                Ok(Ok(tls)) => {
                    let _ = tx.send((tls, peer)).await;
                }
                Ok(Err(e)) => tracing::debug!(%peer, "TLS handshake failed: {e}"),
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake not done within {HANDSHAKE_TIMEOUT:?}")
                }
            }
        });
    }
}

/// The plain answer to plain HTTP on the TLS port.
const PLAIN_ANSWER: &str = "{\"fault_message\": \"this listener speaks TLS only: use https://\"}";

async fn handshake(
    mut stream: TcpStream,
    acceptor: TlsAcceptor,
) -> std::io::Result<TlsStream<TcpStream>> {
    let mut first = [0u8; 1];
    if stream.peek(&mut first).await? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    if first[0] != HANDSHAKE_RECORD {
        // Read the request's head (what came of it) so that closing does not
        // reset the connection before the answer is read.
        let mut head = vec![0u8; 8192];
        let mut len = 0;
        while len < head.len() && !head[..len].windows(4).any(|w| w == b"\r\n\r\n") {
            match stream.read(&mut head[len..]).await? {
                0 => break,
                n => len += n,
            }
        }
        let answer = format!(
            "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{PLAIN_ANSWER}",
            PLAIN_ANSWER.len()
        );
        stream.write_all(answer.as_bytes()).await?;
        stream.shutdown().await?;
        return Err(std::io::Error::other("plain HTTP on the TLS listener"));
    }
    acceptor.accept(stream).await
}
