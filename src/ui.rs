//! The dashboard page: static assets embedded in the binary, served at `/` and `/ui/…` by
//! `broadside serve` next to the analytics API. The page holds no data of its own: it asks
//! the API with the caller's token (kept in the tab's session storage), so every figure on it
//! passes the API's authentication, workspace checks and limits.
//!
//! `BROADSIDE_UI_DIR=DIR` serves the files from DIR instead (for working on the page without
//! rebuilding); the set of files is the same.

use axum::extract::Path;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

/// The page's files: name, content type, embedded content.
const ASSETS: [(&str, &str, &str); 3] = [
    (
        "index.html",
        "text/html; charset=utf-8",
        include_str!("ui/index.html"),
    ),
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("ui/app.js"),
    ),
    (
        "app.css",
        "text/css; charset=utf-8",
        include_str!("ui/app.css"),
    ),
];

/// Scripts and styles from this origin only, data from this origin only, no frames.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

/// `GET /` (the page) and `GET /ui/{file}` (its script and styles).
pub fn router() -> Router {
    Router::new().route("/", get(|| asset("index.html"))).route(
        "/ui/{file}",
        get(|Path(file): Path<String>| asset_owned(file)),
    )
}

async fn asset_owned(file: String) -> Response {
    asset(&file).await
}

async fn asset(file: &str) -> Response {
    let Some((name, kind, embedded)) = ASSETS.iter().find(|(n, _, _)| *n == file) else {
        return (StatusCode::NOT_FOUND, "no such file").into_response();
    };
    let body = match std::env::var_os("BROADSIDE_UI_DIR") {
        Some(dir) => match std::fs::read_to_string(std::path::Path::new(&dir).join(name)) {
            Ok(text) => text,
            Err(e) => {
                return (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("BROADSIDE_UI_DIR: {name}: {e}"),
                )
                    .into_response()
            }
        },
        None => embedded.to_string(),
    };
    let mut r = ([(header::CONTENT_TYPE, *kind)], body).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    r
}
