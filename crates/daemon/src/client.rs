//! A small HTTP/1.1 client over a Unix socket: the daemon uses it to talk to each
//! VM's API socket, and `vigil ctl` to talk to the daemon; and over TCP with a
//! bearer token, from one daemon to another (migration).

use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::Request;
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;

/// What went wrong talking to a socket.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {}: {source}", path.display())]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} did not answer within {timeout:?}", path.display())]
    Timeout { path: PathBuf, timeout: Duration },
    #[error("HTTP exchange with {} failed: {source}", path.display())]
    Http { path: PathBuf, source: hyper::Error },
    #[error("HTTP exchange with {} failed: bad request {method} {target}: {source}", path.display())]
    Request {
        path: PathBuf,
        method: String,
        target: String,
        source: hyper::http::Error,
    },
    #[error("HTTP exchange with {} failed: cannot start an I/O runtime: {source}", path.display())]
    Runtime {
        path: PathBuf,
        source: std::io::Error,
    },
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
    match tokio::time::timeout(timeout, exchange(socket, method, path, body)).await {
        Ok(result) => result,
        Err(_) => Err(ClientError::Timeout {
            path: socket.to_owned(),
            timeout,
        }),
    }
}

/// A request's connection, kept while its response body is read; dropping it
/// closes the connection.
struct Connection {
    _sender: hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    driver: tokio::task::JoinHandle<()>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// Connects to `socket`, sends one request (`body` as JSON when given) and
/// returns the response's head, its body still to be read through the connection.
async fn send(
    socket: &Path,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<Vec<u8>>,
) -> Result<(hyper::Response<hyper::body::Incoming>, Connection), ClientError> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|source| ClientError::Connect {
            path: socket.to_owned(),
            source,
        })?;
    send_on(stream, socket, method, path, headers, body).await
}

/// [`send`] on a connected stream; `peer` names it in errors.
async fn send_on<S>(
    stream: S,
    peer: &Path,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<Vec<u8>>,
) -> Result<(hyper::Response<hyper::body::Incoming>, Connection), ClientError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let socket = peer;
    let http = |source| ClientError::Http {
        path: socket.to_owned(),
        source,
    };
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(http)?;
    // The connection future ends when the response is read and `sender` is dropped.
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut builder = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost");
    if body.is_some() {
        builder = builder.header("content-type", "application/json");
    }
    for (k, v) in headers {
        builder = builder.header(*k, *v);
    }
    let request = builder
        .body(Full::new(Bytes::from(body.unwrap_or_default())))
        .map_err(|source| ClientError::Request {
            path: socket.to_owned(),
            method: method.into(),
            target: path.into(),
            source,
        })?;
    let response = sender.send_request(request).await.map_err(http)?;
    Ok((
        response,
        Connection {
            _sender: sender,
            driver,
        },
    ))
}

/// Sends one request to another daemon's TCP listener at `addr` (`HOST:PORT`),
/// with its bearer `token`, and reads the whole response, all within `timeout`.
pub async fn request_tcp(
    addr: &str,
    token: &str,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
    timeout: Duration,
) -> Result<Response, ClientError> {
    let peer = PathBuf::from(format!("tcp:{addr}"));
    let exchange = async {
        let stream = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|source| ClientError::Connect {
                path: peer.clone(),
                source,
            })?;
        let bearer = format!("Bearer {token}");
        let (response, connection) = send_on(
            stream,
            &peer,
            method,
            path,
            &[("authorization", &bearer)],
            body,
        )
        .await?;
        read_whole(&peer, response, connection).await
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(result) => result,
        Err(_) => Err(ClientError::Timeout {
            path: peer.clone(),
            timeout,
        }),
    }
}

async fn read_whole(
    socket: &Path,
    response: hyper::Response<hyper::body::Incoming>,
    _connection: Connection,
) -> Result<Response, ClientError> {
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|source| ClientError::Http {
            path: socket.to_owned(),
            source,
        })?
        .to_bytes()
        .to_vec();
    Ok(Response { status, body })
}

async fn exchange(
    socket: &Path,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<Response, ClientError> {
    let (response, connection) = send(socket, method, path, &[], body).await?;
    read_whole(socket, response, connection).await
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

    /// Sends one request; see [`request`].
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
        path: socket.to_owned(),
        source,
    })?;
    client.request(socket, method, path, body, timeout)
}

/// Sends a GET to the Unix socket at `socket` and hands each piece of the response
/// body to `on_chunk` as it arrives, until it returns false or the body ends (a
/// stream such as `GET /events`). `connect_timeout` bounds the wait for the
/// response's head. A response that is not 2xx is returned whole instead
/// (`Ok(Some(response))`); a stream that was read gives `Ok(None)`.
pub async fn stream(
    socket: &Path,
    path: &str,
    headers: &[(&str, &str)],
    connect_timeout: Duration,
    mut on_chunk: impl FnMut(&[u8]) -> bool,
) -> Result<Option<Response>, ClientError> {
    let http = |source| ClientError::Http {
        path: socket.to_owned(),
        source,
    };
    let (response, connection) =
        match tokio::time::timeout(connect_timeout, send(socket, "GET", path, headers, None)).await
        {
            Ok(r) => r?,
            Err(_) => {
                return Err(ClientError::Timeout {
                    path: socket.to_owned(),
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

impl BlockingClient {
    /// [`stream`], for callers without a runtime.
    pub fn stream(
        &self,
        socket: &Path,
        path: &str,
        headers: &[(&str, &str)],
        connect_timeout: Duration,
        on_chunk: impl FnMut(&[u8]) -> bool,
    ) -> Result<Option<Response>, ClientError> {
        self.runtime
            .block_on(stream(socket, path, headers, connect_timeout, on_chunk))
    }
}
