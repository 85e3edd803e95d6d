//! The dashboard's routes serve the embedded assets with the right types and headers.

use axum::body::Body;
use axum::http::{header, Request, StatusCode};
use axum::Router;
use http_body_util::BodyExt;
use tower::ServiceExt;

async fn get(path: &str) -> (StatusCode, axum::http::HeaderMap, String) {
    let app: Router = vigil_dashboard::router();
    let res = app
        .oneshot(Request::get(path).body(Body::empty()).expect("request"))
        .await
        .expect("response");
    let status = res.status();
    let headers = res.headers().clone();
    let body = res.into_body().collect().await.expect("body").to_bytes();
    (status, headers, String::from_utf8_lossy(&body).into_owned())
}

#[tokio::test]
async fn index_is_html_with_a_strict_policy() {
    let (status, h, body) = get("/").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(h[header::CONTENT_TYPE], "text/html; charset=utf-8");
    let csp = h[header::CONTENT_SECURITY_POLICY].to_str().unwrap();
    assert!(csp.contains("default-src 'none'") && csp.contains("connect-src 'self'"));
    assert_eq!(h[header::X_CONTENT_TYPE_OPTIONS], "nosniff");
    assert!(body.contains("<table id=\"vms\">"));
    assert!(body.contains("aria-live"));
}

#[tokio::test]
async fn every_asset_is_served_and_nothing_points_off_the_daemon() {
    let (_, _, index) = get("/").await;
    for name in vigil_dashboard::asset_names() {
        assert!(
            index.contains(&format!("assets/{name}")),
            "index.html does not load {name}"
        );
        let (status, h, body) = get(&format!("/assets/{name}")).await;
        assert_eq!(status, StatusCode::OK, "{name}");
        let ct = h[header::CONTENT_TYPE].to_str().unwrap();
        assert!(ct.starts_with(if name.ends_with(".js") {
            "text/javascript"
        } else {
            "text/css"
        }));
        // Works offline: no URL with a scheme or a protocol-relative one.
        for bad in ["http://", "https://", "//cdn", "src=\"//", "url(//"] {
            assert!(!body.contains(bad), "{name} mentions {bad}");
        }
    }
    for bad in ["http://", "https://"] {
        assert!(!index.contains(bad), "index.html mentions {bad}");
    }
}

#[tokio::test]
async fn unknown_assets_are_404() {
    assert_eq!(get("/assets/nope.js").await.0, StatusCode::NOT_FOUND);
    assert_eq!(get("/assets/../Cargo.toml").await.0, StatusCode::NOT_FOUND);
}
