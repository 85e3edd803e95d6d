//! Vigil's web dashboard: a page, a style sheet and a script, embedded in the binary
//! and served by an [`axum::Router`] that the daemon merges into its own.
//!
//! The assets are static and hold no secret, so they load without a token; the page
//! asks for the daemon's bearer token and sends it in an `Authorization` header on
//! every API call and on the event stream. Nothing is fetched from anywhere but the
//! daemon itself (see the `Content-Security-Policy` below): the dashboard works
//! offline.
//!
//! What the page calls (relative to where it is served):
//!
//! | call | use |
//! |---|---|
//! | `GET vms` | the VM table, every second |
//! | `GET vms/{id}/metrics` | a vigil-metrics snapshot per live VM, every second; rates come from counter deltas |
//! | `PATCH vms/{id}` `{"state":"Paused"\|"Resumed"}` | Pause, Resume |
//! | `POST vms/{id}/stop` | Stop (after a confirmation dialog) |
//! | `GET events` | server-sent events, each a JSON object with Falco's keys (`time`, `rule`, `priority`, `output`, `output_fields`, `source`) |

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

/// One embedded file.
struct Asset {
    name: &'static str,
    content_type: &'static str,
    body: &'static [u8],
}

const INDEX: Asset = Asset {
    name: "index.html",
    content_type: "text/html; charset=utf-8",
    body: include_bytes!("../assets/index.html"),
};

const ASSETS: &[Asset] = &[
    Asset {
        name: "dashboard.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../assets/dashboard.js"),
    },
    Asset {
        name: "dashboard.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("../assets/dashboard.css"),
    },
];

/// The page may only talk to the daemon that served it and load nothing from elsewhere.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; \
                   img-src 'self' data:; connect-src 'self'; base-uri 'none'; \
                   form-action 'none'; frame-ancestors 'none'";

/// The dashboard's routes: `GET /` (the page) and `GET /assets/{name}`.
///
/// Generic over the daemon's state so that `daemon_router.merge(vigil_dashboard::router())`
/// works whatever state the daemon's router carries. These routes need no token: the
/// assets are public; the data behind them is not.
pub fn router<S>() -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    Router::new()
        .route("/", get(|| async { serve(&INDEX) }))
        .route("/index.html", get(|| async { serve(&INDEX) }))
        .route(
            "/assets/{name}",
            get(
                |axum::extract::Path(name): axum::extract::Path<String>| async move {
                    match ASSETS.iter().find(|a| a.name == name) {
                        Some(asset) => serve(asset),
                        None => (StatusCode::NOT_FOUND, "no such asset\n").into_response(),
                    }
                },
            ),
        )
}

/// The names of the embedded assets under `/assets/` (for tests and listings).
pub fn asset_names() -> impl Iterator<Item = &'static str> {
    ASSETS.iter().map(|a| a.name)
}

fn serve(asset: &'static Asset) -> Response {
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static(asset.content_type),
            ),
            // The assets change with the binary; revalidate cheaply rather than keep
            // a stale page after an upgrade.
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(CSP),
            ),
            (
                header::X_CONTENT_TYPE_OPTIONS,
                HeaderValue::from_static("nosniff"),
            ),
            (
                header::REFERRER_POLICY,
                HeaderValue::from_static("no-referrer"),
            ),
            (header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")),
        ],
        asset.body,
    )
        .into_response()
}
