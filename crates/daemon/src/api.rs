//! The daemon's REST API (the same on the Unix socket and, behind the token, on TCP).
//!
//! | method and path | what |
//! |---|---|
//! | `POST /vms` `{"id", "config"}` | create a VM and start it; 201 with its record |
//! | `GET /vms` | every VM's record |
//! | `GET /vms/{id}` | one VM's record, with its configuration |
//! | `PATCH /vms/{id}` `{"state": "Paused"\|"Resumed"}` | pause or resume it |
//! | `POST /vms/{id}/stop` `[{"timeout_s", "method"}]` | stop it; its record stays |
//! | `DELETE /vms/{id}` | stop it and remove it and its folder; 204 |
//! | `GET /vms/{id}/metrics` | one live VM's vigil-metrics snapshot (JSON), from its API socket |
//! | `GET /events` | server-sent events: security and lifecycle events as Falco-style JSON ([`crate::events`]); `Last-Event-ID` resumes, `?follow=false` ends after the backlog |
//! | `GET /metrics` | Prometheus text: host, daemon, every VM labelled `vm="<id>"` |
//! | `GET /health` | `{"status": "ok", ...}` |
//! | `GET /`, `GET /assets/{name}` | the web dashboard (`vigil-dashboard`; public on TCP: the data it shows needs the token) |
//!
//! Errors are `{"fault_message": "..."}` with a 4xx/5xx status.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;

use crate::client;
use crate::error::{ApiError, FaultMessage};
use crate::events::{Events, Peer, Rule};
use crate::metrics;
use crate::supervisor::{
    CreateRequest, MigrateRequest, ReceiveRequest, StopMethod, Supervisor, VmState,
};

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub supervisor: Arc<Supervisor>,
    pub started: Instant,
    pub scrape_timeout: Duration,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/vms", post(create).get(list))
        .route("/vms/{id}", get(inspect).patch(patch).delete(destroy))
        .route("/vms/{id}/stop", post(stop))
        .route("/vms/{id}/migrate", post(migrate))
        .route("/vms/{id}/migration", get(migration))
        .route("/vms/{id}/receive", post(receive))
        .route("/vms/{id}/metrics", get(vm_metrics))
        .route("/events", get(events))
        .route("/metrics", get(prometheus))
        .route("/health", get(health))
        .fallback(not_found)
        .method_not_allowed_fallback(not_allowed)
        .with_state(state)
}

/// Parses a JSON body, naming the field at fault when it does not fit.
fn parse<T: serde::de::DeserializeOwned>(body: &[u8], what: &str) -> Result<T, ApiError> {
    vigil_model::json::parse(body)
        .map_err(|e| ApiError::bad_request(format!("the body of {what} is not valid: {e}")))
}

async fn create(State(app): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let request: CreateRequest = parse(
        &body,
        "POST /vms (expected {\"id\": \"NAME\", \"config\": {...}}, optionally \"introspect\", \"trace_syscalls\", \"debug_api\", \"enable_pci\")",
    )?;
    let info = app.supervisor.create(request).await?;
    Ok((StatusCode::CREATED, Json(info)).into_response())
}

async fn list(State(app): State<AppState>) -> Response {
    let vms: Vec<_> = app
        .supervisor
        .list()
        .iter()
        .map(|vm| vm.info(false))
        .collect();
    Json(vms).into_response()
}

async fn inspect(
    State(app): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let vm = app.supervisor.get(&id)?;
    app.supervisor.refresh(&vm).await;
    Ok(Json(vm.info(true)).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PatchRequest {
    state: String,
}

async fn patch(
    State(app): State<AppState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let request: PatchRequest = parse(
        &body,
        "PATCH /vms/{id} (expected {\"state\": \"Paused\"|\"Resumed\"})",
    )?;
    let paused = match request.state.as_str() {
        "Paused" => true,
        "Resumed" => false,
        other => {
            return Err(ApiError::bad_request(format!(
                "state {other:?} is not one of \"Paused\", \"Resumed\""
            )))
        }
    };
    let info = app.supervisor.set_paused(&id, paused).await?;
    Ok(Json(info).into_response())
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct StopRequest {
    timeout_s: Option<f64>,
    method: Option<StopMethod>,
}

/// The longest stop timeout a request may ask for.
const MAX_STOP_TIMEOUT_S: f64 = 600.0;

fn stop_timeout(requested: Option<f64>, default: Duration) -> Result<Duration, ApiError> {
    match requested {
        None => Ok(default),
        Some(t) if t.is_finite() && t > 0.0 && t <= MAX_STOP_TIMEOUT_S => {
            Ok(Duration::from_secs_f64(t))
        }
        Some(t) => Err(ApiError::bad_request(format!(
            "timeout_s {t} is out of range: give seconds in (0, {MAX_STOP_TIMEOUT_S}]"
        ))),
    }
}

async fn stop(
    State(app): State<AppState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let request: StopRequest = if body.iter().all(u8::is_ascii_whitespace) {
        StopRequest::default()
    } else {
        parse(
            &body,
            "POST /vms/{id}/stop (expected {\"timeout_s\": N, \"method\": \"sigterm\"|\"ctrl-alt-del\"}, both optional)",
        )?
    };
    let timeout = stop_timeout(request.timeout_s, app.supervisor.config().stop_timeout)?;
    let info = app
        .supervisor
        .stop(&id, request.method.unwrap_or_default(), timeout)
        .await?;
    Ok(Json(info).into_response())
}

async fn migrate(
    State(app): State<AppState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let request: MigrateRequest = parse(
        &body,
        "POST /vms/{id}/migrate (expected {\"to\": \"HOST:PORT\", \"peer_token\": \"...\"}, with downtime_ms and bandwidth_mib_s optional)",
    )?;
    let info = app.supervisor.migrate(&id, request).await?;
    Ok(Json(info).into_response())
}

async fn receive(
    State(app): State<AppState>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let request: ReceiveRequest = parse(
        &body,
        "POST /vms/{id}/receive (expected {\"config\": {...}}: the VM's configuration at its source)",
    )?;
    let incoming = app.supervisor.receive(&id, request).await?;
    Ok((StatusCode::CREATED, Json(incoming)).into_response())
}

async fn destroy(
    State(app): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let timeout = app.supervisor.config().stop_timeout;
    app.supervisor.destroy(&id, timeout).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// One VM's metrics snapshot, as its API socket gives it (`GET /vigil/metrics`).
/// `GET /vms/{id}/migration`: the VM's own migration status while it runs
/// (`GET /vigil/migration`), else the last one this daemon saw.
async fn migration(
    State(app): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let vm = app.supervisor.get(&id)?;
    let info = vm.info(false);
    if matches!(info.state, VmState::Running | VmState::Paused) {
        let live = client::request(
            vm.api_socket(),
            "GET",
            "/vigil/migration",
            None,
            app.scrape_timeout,
        )
        .await;
        if let Some(status) = live.ok().filter(|r| r.is_success()).and_then(|r| r.json()) {
            return Ok(Json::<serde_json::Value>(status).into_response());
        }
    }
    match info.migration {
        Some(status) => Ok(Json(status).into_response()),
        None => Err(ApiError::not_found(format!(
            "VM {id:?} is {} and did not migrate through this daemon",
            info.state.as_str()
        ))),
    }
}

async fn vm_metrics(
    State(app): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let vm = app.supervisor.get(&id)?;
    let state = vm.state();
    if !matches!(state, VmState::Running | VmState::Paused) {
        return Err(ApiError::conflict(format!(
            "VM {id:?} is {}: only a running or paused VM has metrics",
            state.as_str()
        )));
    }
    let response = client::request(
        vm.api_socket(),
        "GET",
        metrics::VM_METRICS_PATH,
        None,
        app.scrape_timeout,
    )
    .await
    .map_err(|e| ApiError::bad_gateway(format!("VM {id:?}: {e}")))?;
    match response.json() {
        Some(snapshot) if response.is_success() => Ok(Json(snapshot).into_response()),
        _ => Err(ApiError::bad_gateway(format!(
            "VM {id:?} gave no metrics snapshot (HTTP {}): {}",
            response.status,
            response.fault_message()
        ))),
    }
}

#[derive(Deserialize)]
struct EventsQuery {
    follow: Option<String>,
}

async fn events(
    State(app): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<EventsQuery>,
) -> Result<Response, ApiError> {
    let last_event_id = match headers.get("last-event-id") {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(vigil_events::output::parse_last_event_id)
                .ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "Last-Event-ID {v:?} is not an event id (a whole number)"
                    ))
                })?,
        ),
    };
    let follow = match query.follow.as_deref() {
        None | Some("true" | "1" | "yes") => true,
        Some("false" | "0" | "no") => false,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "follow {other:?} is not one of true, false"
            )))
        }
    };
    Ok(app.supervisor.events().stream().sse(last_event_id, follow))
}

/// A Unix-socket client, as the kernel names it (`SO_PEERCRED`).
#[derive(Debug, Clone, Copy)]
pub struct UnixPeer {
    pub uid: Option<u32>,
    pub pid: Option<i32>,
}

impl
    axum::extract::connect_info::Connected<
        axum::serve::IncomingStream<'_, tokio::net::UnixListener>,
    > for UnixPeer
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, tokio::net::UnixListener>) -> Self {
        let cred = stream.io().peer_cred().ok();
        UnixPeer {
            uid: cred.map(|c| c.uid()),
            pid: cred.and_then(|c| c.pid()),
        }
    }
}

/// A TCP client's address, as both TCP listeners (plain and TLS) report it.
#[derive(Debug, Clone, Copy)]
pub struct TcpPeer(pub std::net::SocketAddr);

impl
    axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, tokio::net::TcpListener>>
    for TcpPeer
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, tokio::net::TcpListener>) -> Self {
        TcpPeer(*stream.remote_addr())
    }
}

impl
    axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, crate::tls::TlsListener>>
    for TcpPeer
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, crate::tls::TlsListener>) -> Self {
        TcpPeer(*stream.remote_addr())
    }
}

fn peer_of(request: &Request) -> Peer {
    use vigil_events::ApiTransport;
    if let Some(ConnectInfo(TcpPeer(addr))) = request.extensions().get::<ConnectInfo<TcpPeer>>() {
        return Peer {
            transport: ApiTransport::Network,
            name: addr.to_string(),
            key: addr.ip().to_string(),
        };
    }
    let (uid, pid) = match request.extensions().get::<ConnectInfo<UnixPeer>>() {
        Some(ConnectInfo(p)) => (p.uid, p.pid),
        None => (None, None),
    };
    let uid = uid.map_or_else(|| "?".to_owned(), |u| u.to_string());
    let pid = pid.map_or_else(|| "?".to_owned(), |p| p.to_string());
    Peer {
        transport: ApiTransport::UnixSocket,
        name: format!("uid={uid} pid={pid}"),
        key: format!("uid={uid}"),
    }
}

/// The longest request detail an API misuse event carries.
const MAX_DETAIL: usize = 300;

/// Middleware (outermost, so it sees the token check's answers too): a request
/// the API refused as malformed (400, 413, 422) or unauthorized (401, 403) becomes
/// an `api_malformed_request` / `api_unauthorized` event, with the peer, the
/// method and path, and the refusal's message (limited per peer: [`Events::api_rejected`]).
pub async fn report_misuse(State(events): State<Events>, request: Request, next: Next) -> Response {
    let peer = peer_of(&request);
    let what = format!("{} {}", request.method(), request.uri().path());
    let response = next.run(request).await;
    let status = response.status();
    let rule = match status.as_u16() {
        400 | 413 | 422 => Rule::ApiMalformedRequest,
        401 | 403 => Rule::ApiUnauthorized,
        _ => return response,
    };
    let mut detail = match response.extensions().get::<FaultMessage>() {
        Some(FaultMessage(m)) => format!("{what}: {m}"),
        None => format!("{what}: HTTP {status}"),
    };
    if detail.len() > MAX_DETAIL {
        let mut cut = MAX_DETAIL;
        while !detail.is_char_boundary(cut) {
            cut -= 1;
        }
        detail.truncate(cut);
        detail.push_str("...");
    }
    events.api_rejected(rule, &peer, &detail);
    response
}

async fn prometheus(State(app): State<AppState>) -> Response {
    let samples = metrics::collect(&app.supervisor, app.scrape_timeout).await;
    let text = metrics::render(&samples, app.started);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

async fn health(State(app): State<AppState>) -> Response {
    Json(serde_json::json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_s": app.started.elapsed().as_secs_f64(),
        "vms": app.supervisor.list().len(),
        "pid": std::process::id(),
    }))
    .into_response()
}

async fn not_found(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::not_found(format!(
        "no endpoint {method} {}: see GET /vms, POST /vms, GET|PATCH|DELETE /vms/{{id}}, POST /vms/{{id}}/stop, POST /vms/{{id}}/migrate, GET /vms/{{id}}/migration, GET /vms/{{id}}/metrics, GET /events, GET /metrics, GET /health, and the dashboard at /",
        uri.path()
    ))
}

async fn not_allowed(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{} does not take {method}", uri.path()),
    )
}
