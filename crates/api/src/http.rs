//! HTTP/1.1 on a Unix socket: one thread with a current-thread tokio runtime, so
//! the VMM's own threads never share a scheduler with the API.

use std::convert::Infallible;
use std::io::ErrorKind;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::thread::JoinHandle;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONNECTION, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;

use crate::api::{Api, Response, OPENAPI_PATH};

/// Why the API could not be served; `path` is the `--api-sock`.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("--api-sock {}: cannot inspect it: {source}", path.display())]
    Inspect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--api-sock {}: exists and is not a socket; remove it or choose another path", path.display())]
    NotASocket { path: PathBuf },
    #[error("--api-sock {}: another process is serving this socket", path.display())]
    InUse { path: PathBuf },
    #[error("--api-sock {}: cannot remove the stale socket: {source}", path.display())]
    RemoveStale {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--api-sock {}: cannot listen there: {source}", path.display())]
    Listen {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("--api-sock {}: {source}", path.display())]
    NonBlocking {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start the API's runtime: {0}")]
    Runtime(std::io::Error),
    #[error("cannot start the API thread: {0}")]
    Thread(std::io::Error),
}

/// Largest request body accepted (Firecracker's limit is 50 KiB).
pub const MAX_BODY: usize = 64 << 10;

/// Binds `path`, refusing a path that is in use.
///
/// Policy: a socket that a process still accepts connections on is never taken
/// over, and a path that is not a socket (a file, a folder) is never removed; a
/// socket file nobody listens on (left behind by a process that died) is removed
/// and bound again, with a warning. Firecracker refuses any existing path; Vigil
/// differs only for the stale socket, which is safe to reuse.
pub fn bind(path: &Path) -> Result<UnixListener, ServeError> {
    let path_buf = || path.to_path_buf();
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => {}
        Err(source) => {
            return Err(ServeError::Inspect {
                path: path_buf(),
                source,
            })
        }
        Ok(meta) if !meta.file_type().is_socket() => {
            return Err(ServeError::NotASocket { path: path_buf() })
        }
        Ok(_) => match UnixStream::connect(path) {
            Ok(_) => return Err(ServeError::InUse { path: path_buf() }),
            Err(_) => {
                tracing::warn!(
                    "--api-sock {}: removing a stale socket nobody listens on",
                    path.display()
                );
                std::fs::remove_file(path).map_err(|source| ServeError::RemoveStale {
                    path: path_buf(),
                    source,
                })?;
            }
        },
    }
    UnixListener::bind(path).map_err(|source| ServeError::Listen {
        path: path_buf(),
        source,
    })
}

/// The serving thread; dropping it removes the socket file.
pub struct ApiServer {
    path: PathBuf,
    _thread: JoinHandle<()>,
}

impl ApiServer {
    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        // The thread blocks in accept(); the process ends right after this.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Serves `api` on a socket bound at `path` (see [`bind`]).
pub fn serve(path: &Path, api: Arc<Api>) -> Result<ApiServer, ServeError> {
    let listener = bind(path)?;
    listener
        .set_nonblocking(true)
        .map_err(|source| ServeError::NonBlocking {
            path: path.to_path_buf(),
            source,
        })?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(ServeError::Runtime)?;
    let thread = std::thread::Builder::new()
        .name("api".into())
        .spawn(move || {
            vigil_seccomp::confine(vigil_seccomp::ThreadKind::Api);
            runtime.block_on(accept_loop(listener, api))
        })
        .map_err(ServeError::Thread)?;
    Ok(ApiServer {
        path: path.to_path_buf(),
        _thread: thread,
    })
}

async fn accept_loop(listener: UnixListener, api: Arc<Api>) {
    let listener = match tokio::net::UnixListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("API socket: {e}");
            return;
        }
    };
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!("API socket: accept failed: {e}");
                continue;
            }
        };
        let api = api.clone();
        tokio::task::spawn(async move {
            let service = service_fn(move |req| answer(api.clone(), req));
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(Persistent(stream)), service)
                .await
            {
                tracing::debug!("API connection: {e}");
            }
        });
    }
}

/// A connection on which HTTP/1.0 requests are taken as HTTP/1.1, so that it
/// stays open after the answer. Firecracker keeps every connection open, and
/// clients written against it send HTTP/1.0 request lines and then reuse the
/// connection. The request line's `HTTP/1.0\r\n` is rewritten as it is read
/// (a JSON body cannot hold a raw CR LF); one split across two reads keeps
/// HTTP/1.0's close, as before.
struct Persistent(tokio::net::UnixStream);

impl tokio::io::AsyncRead for Persistent {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.0).poll_read(cx, buf);
        let fresh = &mut buf.filled_mut()[before..];
        let mut at = 0;
        while let Some(i) = fresh[at..].windows(10).position(|w| w == b"HTTP/1.0\r\n") {
            fresh[at + i + 7] = b'1';
            at += i + 10;
        }
        polled
    }
}

impl tokio::io::AsyncWrite for Persistent {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

async fn answer(
    api: Arc<Api>,
    req: Request<Incoming>,
) -> Result<hyper::Response<Full<Bytes>>, Infallible> {
    let method = req.method().as_str().to_string();
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    // A Content-Length over the limit is refused as its headers arrive, as
    // Firecracker does: a client is not left sending (or waiting on) a body the
    // server will not take, and the connection is closed after the answer.
    let declared = hyper::body::Body::size_hint(req.body()).lower();
    let too_large = declared > MAX_BODY as u64;
    let response = if too_large {
        Response::error(
            400,
            format!(
                "{method} {path}: the request body is {declared} bytes, more than the \
                 {MAX_BODY} bytes accepted"
            ),
        )
    } else {
        match Limited::new(req.into_body(), MAX_BODY).collect().await {
            Ok(collected) => api.handle(&method, &path, &collected.to_bytes()),
            Err(e) => Response::error(
                400,
                format!("{method} {path}: cannot read the body (at most {MAX_BODY} bytes): {e}"),
            ),
        }
    };
    let content_type = if path == OPENAPI_PATH && response.status == 200 {
        "application/yaml"
    } else {
        "application/json"
    };
    let mut out = hyper::Response::new(Full::new(Bytes::from(
        response.body.clone().unwrap_or_default(),
    )));
    *out.status_mut() = StatusCode::from_u16(response.status).unwrap_or(StatusCode::OK);
    if response.body.is_some() {
        out.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    }
    if too_large {
        out.headers_mut()
            .insert(CONNECTION, HeaderValue::from_static("close"));
    }
    Ok(out)
}
