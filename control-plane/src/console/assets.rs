//! The console's stylesheet and script, compiled into the binary (`include_str!`) so
//! an air-gapped control plane serves them like any other: nothing is fetched at run
//! time. They change only with the binary, so browsers may keep them an hour.

use axum::http::header;
use axum::response::{IntoResponse, Response};

pub const CSS: &str = include_str!("assets/console.css");
/// The script (progressive enhancement only: times, live refresh, copy buttons).
pub const JS: &str = include_str!("assets/console.js");

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type), (header::CACHE_CONTROL, "private, max-age=3600")], body)
        .into_response()
}

/// `GET /assets/console.css`.
pub(crate) async fn css() -> Response {
    asset("text/css; charset=utf-8", CSS)
}

/// `GET /assets/console.js`.
pub(crate) async fn js() -> Response {
    asset("text/javascript; charset=utf-8", JS)
}
