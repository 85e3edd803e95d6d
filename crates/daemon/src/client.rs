//! A small HTTP/1.1 client: over a Unix socket (the daemon to each VM's API
//! socket, `vigil ctl` to the daemon's socket), and over TCP with the daemon's
//! bearer token, plain or TLS (`vigil ctl --url`, one daemon to another).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::{AlertDescription, CertificateError, InvalidMessage};
pub use vigil_tls::PemError;

/// What went wrong talking to a daemon or a VM; `peer` names it (a socket's
/// path, or a daemon's URL).
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {peer}: {source}")]
    Connect {
        peer: String,
        source: std::io::Error,
    },
    #[error("{peer} did not answer within {timeout:?}")]
    Timeout { peer: String, timeout: Duration },
    #[error("HTTP exchange with {peer} failed: {source}")]
    Http { peer: String, source: hyper::Error },
    /// The TLS session failed: the handshake, or the server's verdict on it
    /// (an alert) that came after; `why` says what it means.
    #[error("TLS with {peer} failed: {why}")]
    Tls { peer: String, why: String },
    #[error("HTTP exchange with {peer} failed: bad request {method} {target}: {source}")]
    Request {
        peer: String,
        method: String,
        target: String,
        source: hyper::http::Error,
    },
    #[error("HTTP exchange with {peer} failed: cannot start an I/O runtime: {source}")]
    Runtime {
        peer: String,
        source: std::io::Error,
    },
}

/// A daemon's TCP API: `https://HOST:PORT`, or `http://HOST:PORT` (also written
/// `HOST:PORT`); HOST a name, an IPv4 address or a bracketed IPv6 one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonUrl {
    pub https: bool,
    /// As written, brackets and all (`[::1]`).
    pub host: String,
    pub port: u16,
}

/// Text that is not a daemon's URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?}: expected https://HOST:PORT or http://HOST:PORT (HOST a DNS name, an IPv4 address or a bracketed IPv6 one)")]
pub struct UrlError(pub String);

impl DaemonUrl {
    pub fn parse(s: &str) -> Result<Self, UrlError> {
        let bad = || UrlError(s.to_owned());
        let (https, rest) = match s.split_once("://") {
            Some(("https", rest)) => (true, rest),
            Some(("http", rest)) => (false, rest),
            Some(_) => return Err(bad()),
            None => (false, s),
        };
        // A trailing slash is how URLs are often written; a path is not taken.
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let (host, port) = vigil_model::options::host_port(rest).ok_or_else(bad)?;
        let url = DaemonUrl {
            https,
            host: host.to_owned(),
            port,
        };
        url.server_name().map_err(|_| bad())?;
        Ok(url)
    }

    /// `HOST:PORT`, to connect to.
    pub fn authority(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// The name the daemon's certificate must carry: HOST without brackets.
    fn server_name(&self) -> Result<ServerName<'static>, ()> {
        let host = self
            .host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(&self.host);
        ServerName::try_from(host.to_owned()).map_err(|_| ())
    }
}

impl std::fmt::Display for DaemonUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.https { "https" } else { "http" };
        write!(f, "{scheme}://{}:{}", self.host, self.port)
    }
}

impl std::str::FromStr for DaemonUrl {
    type Err = UrlError;

    fn from_str(s: &str) -> Result<Self, UrlError> {
        Self::parse(s)
    }
}

/// A client's TLS: the CA the daemon's certificate must come from, and the
/// client's own certificate for a daemon that wants one (mutual TLS).
#[derive(Clone)]
pub struct ClientTls(tokio_rustls::TlsConnector);

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientTls(..)")
    }
}

impl ClientTls {
    /// Trusts the certificates in `ca` (PEM: a CA, or the daemon's own
    /// self-signed certificate); presents `identity` (certificate and key,
    /// PEM) when given.
    pub fn load(ca: &Path, identity: Option<(&Path, &Path)>) -> Result<Self, PemError> {
        let config = vigil_tls::client_config(ca, identity)?;
        Ok(Self(tokio_rustls::TlsConnector::from(Arc::new(config))))
    }
}

/// A daemon's TCP API, its token, and for https the client's TLS.
#[derive(Clone)]
pub struct TcpEndpoint {
    url: DaemonUrl,
    token: String,
    tls: Option<ClientTls>,
}

impl std::fmt::Debug for TcpEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpEndpoint")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

/// An https URL without the CA that its certificate must come from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}: https needs the CA the daemon's certificate comes from")]
pub struct NoCa(pub DaemonUrl);

impl TcpEndpoint {
    /// `tls` is what https needs; an http URL does not use it.
    pub fn new(url: DaemonUrl, token: &str, tls: Option<ClientTls>) -> Result<Self, NoCa> {
        if url.https && tls.is_none() {
            return Err(NoCa(url));
        }
        Ok(Self {
            tls: tls.filter(|_| url.https),
            url,
            token: token.trim().to_owned(),
        })
    }

    pub fn url(&self) -> &DaemonUrl {
        &self.url
    }
}

/// Where requests go.
#[derive(Debug, Clone)]
pub enum Endpoint {
    /// A Unix socket: no token (its file mode guards it).
    Unix(PathBuf),
    /// A daemon's TCP listener.
    Tcp(TcpEndpoint),
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(path) => write!(f, "{}", path.display()),
            Endpoint::Tcp(t) => write!(f, "{}", t.url),
        }
    }
}

/// A connected stream: Unix, TCP, or TLS on TCP.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// What a TLS failure means, from rustls' error somewhere in `error`'s chain;
/// `None` when none is there.
fn tls_failure(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut at = Some(error);
    while let Some(e) = at {
        let rustls_error = e.downcast_ref::<tokio_rustls::rustls::Error>().or_else(|| {
            e.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .and_then(|inner| inner.downcast_ref())
        });
        if let Some(r) = rustls_error {
            use tokio_rustls::rustls::Error as E;
            let hint = match r {
                E::AlertReceived(AlertDescription::CertificateRequired) => {
                    " (the daemon wants a client certificate: give one and its key)"
                }
                E::AlertReceived(
                    AlertDescription::UnknownCA | AlertDescription::BadCertificate,
                ) => " (the daemon does not accept this client certificate)",
                E::InvalidCertificate(CertificateError::UnknownIssuer) => {
                    " (the daemon's certificate does not come from the CA given)"
                }
                E::InvalidMessage(InvalidMessage::InvalidContentType) => {
                    " (it does not speak TLS: is it started with --tls-cert? else use http://)"
                }
                _ => "",
            };
            return Some(format!("{r}{hint}"));
        }
        at = e.source();
    }
    None
}

impl ClientError {
    /// An HTTP failure, or the TLS failure under it.
    fn http(peer: &str, source: hyper::Error) -> Self {
        match tls_failure(&source) {
            Some(why) => ClientError::Tls {
                peer: peer.to_owned(),
                why,
            },
            None => ClientError::Http {
                peer: peer.to_owned(),
                source,
            },
        }
    }
}

async fn connect(endpoint: &Endpoint, peer: &str) -> Result<Box<dyn Io>, ClientError> {
    let refused = |source| ClientError::Connect {
        peer: peer.to_owned(),
        source,
    };
    let t = match endpoint {
        Endpoint::Unix(path) => {
            return Ok(Box::new(UnixStream::connect(path).await.map_err(refused)?))
        }
        Endpoint::Tcp(t) => t,
    };
    let tcp = TcpStream::connect(t.url.authority())
        .await
        .map_err(refused)?;
    // Requests are small and answered at once: do not hold them back.
    let _ = tcp.set_nodelay(true);
    let Some(tls) = &t.tls else {
        return Ok(Box::new(tcp));
    };
    let failed = |why: String| ClientError::Tls {
        peer: peer.to_owned(),
        why,
    };
    let name = t
        .url
        .server_name()
        .map_err(|()| failed("not a DNS name or an IP address".into()))?;
    match tls.0.connect(name, tcp).await {
        Ok(stream) => Ok(Box::new(stream)),
        Err(e) => Err(failed(tls_failure(&e).unwrap_or_else(|| e.to_string()))),
    }
}

/// A response: its status and its whole body.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Response {
    /// Whether the status is 2xx.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON, if it is JSON.
    pub fn json(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.body).ok()
    }

    /// The error message of a JSON error body (`fault_message`), or the body itself.
    pub fn fault_message(&self) -> String {
        self.json()
            .and_then(|v| v.get("fault_message")?.as_str().map(str::to_owned))
            .unwrap_or_else(|| self.text())
    }
}

/// Sends one request (`body` as JSON when given) on a fresh connection to the Unix
/// socket at `socket`, and reads the whole response, all within `timeout`.
pub async fn request(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<Response, ClientError> {
    request_to(
        &Endpoint::Unix(socket.to_owned()),
        method,
        path,
        body,
        timeout,
    )
    .await
}

/// [`request`] to any endpoint (a TCP one with its token).
pub async fn request_to(
    endpoint: &Endpoint,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<Response, ClientError> {
    let peer = endpoint.to_string();
    let exchange = async {
        let (response, connection) = send(endpoint, &peer, method, path, &[], body).await?;
        read_whole(&peer, response, connection).await
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(result) => result,
        Err(_) => Err(ClientError::Timeout { peer, timeout }),
    }
}

/// A request's connection, kept while its response body is read; dropping it
/// closes the connection.
struct Connection {
    _sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    driver: tokio::task::JoinHandle<Result<(), hyper::Error>>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// Connects to `endpoint` (`peer` names it in errors), sends one request
/// (`body` as JSON when given; the bearer token on TCP) and returns the
/// response's head, its body still to be read through the connection.
async fn send(
    endpoint: &Endpoint,
    peer: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<Vec<u8>>,
) -> Result<(hyper::Response<hyper::body::Incoming>, Connection), ClientError> {
    let stream = connect(endpoint, peer).await?;
    let http = |source| ClientError::http(peer, source);
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http)?;
    // The connection future ends when the response is read and `sender` is dropped.
    let mut driver = tokio::spawn(connection);
    let mut builder = Request::builder().method(method).uri(path);
    builder = match endpoint {
        Endpoint::Unix(_) => builder.header("host", "localhost"),
        Endpoint::Tcp(t) => builder
            .header("host", t.url.authority())
            .header("authorization", format!("Bearer {}", t.token)),
    };
    if body.is_some() {
        builder = builder.header("content-type", "application/json");
    }
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    let request = builder
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|source| ClientError::Request {
            peer: peer.to_owned(),
            method: method.into(),
            target: path.into(),
            source,
        })?;
    let response = match sender.send_request(request).await {
        Ok(response) => response,
        // The connection failed under the request: its own error says why (a
        // TLS alert, say).
        Err(e) if e.is_canceled() => match (&mut driver).await {
            Ok(Err(cause)) => return Err(http(cause)),
            _ => return Err(http(e)),
        },
        Err(e) => return Err(http(e)),
    };
    Ok((
        response,
        Connection {
            _sender: sender,
            driver,
        },
    ))
}

async fn read_whole(
    peer: &str,
    response: hyper::Response<hyper::body::Incoming>,
    _connection: Connection,
) -> Result<Response, ClientError> {
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|source| ClientError::http(peer, source))?
        .to_bytes()
        .to_vec();
    Ok(Response { status, body })
}

/// [`request`] for callers without a runtime (the CLI, benchmarks): requests run
/// on a single-threaded runtime that the client keeps.
pub struct BlockingClient {
    runtime: tokio::runtime::Runtime,
}

impl BlockingClient {
    pub fn new() -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(BlockingClient { runtime })
    }

    /// Sends one request to a Unix socket; see [`request`].
    pub fn request(
        &self,
        socket: &Path,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<Response, ClientError> {
        self.runtime
            .block_on(request(socket, method, path, body, timeout))
    }

    /// Sends one request to any endpoint; see [`request_to`].
    pub fn request_to(
        &self,
        endpoint: &Endpoint,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
        timeout: Duration,
    ) -> Result<Response, ClientError> {
        self.runtime
            .block_on(request_to(endpoint, method, path, body, timeout))
    }

    /// [`stream`], for callers without a runtime.
    pub fn stream(
        &self,
        endpoint: &Endpoint,
        path: &str,
        headers: &[(&str, &str)],
        connect_timeout: Duration,
        on_chunk: impl FnMut(&[u8]) -> bool,
    ) -> Result<Option<Response>, ClientError> {
        self.runtime
            .block_on(stream(endpoint, path, headers, connect_timeout, on_chunk))
    }
}

/// One request from a caller without a runtime (see [`BlockingClient`]).
pub fn request_blocking(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<Response, ClientError> {
    let client = BlockingClient::new().map_err(|source| ClientError::Runtime {
        peer: socket.display().to_string(),
        source,
    })?;
    client.request(socket, method, path, body, timeout)
}

/// Sends a GET to `endpoint` and hands each piece of the response body to
/// `on_chunk` as it arrives, until it returns false or the body ends (a stream
/// such as `GET /events`). `connect_timeout` bounds the wait for the response's
/// head. A response that is not 2xx is returned whole instead
/// (`Ok(Some(response))`); a stream that was read gives `Ok(None)`.
pub async fn stream(
    endpoint: &Endpoint,
    path: &str,
    headers: &[(&str, &str)],
    connect_timeout: Duration,
    mut on_chunk: impl FnMut(&[u8]) -> bool,
) -> Result<Option<Response>, ClientError> {
    let peer = endpoint.to_string();
    let http = |source| ClientError::http(&peer, source);
    let (response, connection) = match tokio::time::timeout(
        connect_timeout,
        send(endpoint, &peer, "GET", path, headers, None),
    )
    .await
    {
        Ok(r) => r?,
        Err(_) => {
            return Err(ClientError::Timeout {
                peer,
                timeout: connect_timeout,
            })
        }
    };
    let status = response.status().as_u16();
    let mut body = response.into_body();
    let result = if (200..300).contains(&status) {
        loop {
            match body.frame().await {
                None => break Ok(None),
                Some(Err(e)) => break Err(http(e)),
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        if !on_chunk(data) {
                            break Ok(None);
                        }
                    }
                }
            }
        }
    } else {
        body.collect()
            .await
            .map(|b| {
                Some(Response {
                    status,
                    body: b.to_bytes().to_vec(),
                })
            })
            .map_err(http)
    };
    drop(connection);
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let url = DaemonUrl::parse("https://vigil.example:7443").unwrap();
        assert!(url.https);
        assert_eq!(url.authority(), "vigil.example:7443");
        assert_eq!(url.to_string(), "https://vigil.example:7443");
        let url = DaemonUrl::parse("http://127.0.0.1:7070/").unwrap();
        assert!(!url.https);
        assert_eq!(url.to_string(), "http://127.0.0.1:7070");
        // A bare HOST:PORT (what --migrate-peer and `to` always took) is http.
        assert_eq!(
            DaemonUrl::parse("10.0.0.2:7070").unwrap().to_string(),
            "http://10.0.0.2:7070"
        );
        let url = DaemonUrl::parse("https://[::1]:7443").unwrap();
        assert_eq!(url.authority(), "[::1]:7443");
        assert!(url.server_name().is_ok());
        for bad in [
            "ftp://h:1",
            "https://h",
            "https://h:99999",
            "https://:7070",
            "https://h:1/vms",
            "https://not a name:1",
        ] {
            let e = DaemonUrl::parse(bad).unwrap_err();
            assert!(e.to_string().contains("expected https://HOST:PORT"), "{e}");
        }
    }

    #[test]
    fn https_needs_a_ca() {
        let url = DaemonUrl::parse("https://h:1").unwrap();
        let e = TcpEndpoint::new(url, "t", None).unwrap_err();
        assert!(
            e.to_string().starts_with("https://h:1: https needs the CA"),
            "{e}"
        );
        let url = DaemonUrl::parse("http://h:1").unwrap();
        assert!(TcpEndpoint::new(url, "t", None).is_ok());
    }
}
