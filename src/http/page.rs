//! The web page at `/` and the latest frame per source. The page is one embedded file (no CDN:
//! percept runs offline) and puts every model-made string in with `textContent`, because model
//! output is untrusted text.

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};

use super::{ApiError, AppState};

const INDEX_HTML: &str = include_str!("assets/index.html");

pub(super) async fn index() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // Defence in depth: even a slip in the page cannot load or run anything foreign.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src 'self'",
            ),
        ],
        INDEX_HTML,
    )
}

/// `GET /v1/sources/{name}/frame.jpg`: the newest frame the model looked at, 404 when none.
pub(super) async fn frame(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let f = s.live.frame(&name).ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            format!("no frame for source '{name}'"),
        )
    })?;
    let jpeg = tokio::task::spawn_blocking(move || f.jpeg())
        .await
        .ok()
        .flatten()
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot encode the frame of source '{name}'"),
            )
        })?;
    Ok((
        [
            (header::CONTENT_TYPE, "image/jpeg"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        jpeg,
    )
        .into_response())
}
