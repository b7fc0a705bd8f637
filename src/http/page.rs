//! The web page at `/` and the images and history it reads. The page is one embedded file (no
//! CDN: percept runs offline) and puts every model-made string in with `textContent`, because
//! model output is untrusted text.
//!
//! Images per source: `frame.jpg` is the newest sampled frame (from the first sampled frame
//! on, with or without a model; before that, the model's frame if any), `model-frame.jpg` the
//! newest frame the model looked at, and `snapshot.jpg?t=T` the frame behind a recent alert
//! or description at media time `T` (see [`History`]). `/v1/history` is what the page draws
//! when it opens or its feed reconnects.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use serde::Deserialize;

use super::history::History;
use super::{ApiError, AppState};

const INDEX_HTML: &str = include_str!("assets/index.html");

/// The page's own routes beyond `/` and `frame.jpg`, with the history they read; the history
/// starts following events now.
pub(super) fn routes(state: &AppState) -> Router<AppState> {
    let history = History::start(&state.events, Arc::clone(&state.live));
    Router::new()
        .route("/v1/sources/{name}/model-frame.jpg", get(model_frame))
        .route("/v1/sources/{name}/snapshot.jpg", get(snapshot))
        .route("/v1/history", get(history_json))
        .layer(Extension(history))
}

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

fn jpeg_response(jpeg: Vec<u8>) -> Response {
    (
        [
            (header::CONTENT_TYPE, "image/jpeg"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        jpeg,
    )
        .into_response()
}

fn not_found(what: String) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, what)
}

fn cannot_encode(name: &str) -> ApiError {
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        format!("cannot encode the frame of source '{name}'"),
    )
}

/// `GET /v1/sources/{name}/frame.jpg`: the newest sampled frame; before the first one, the
/// newest frame the model looked at; 404 when neither exists.
pub(super) async fn frame(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    if let Some(v) = s.live.sampled(&name) {
        let jpeg = tokio::task::spawn_blocking(move || v.jpeg())
            .await
            .ok()
            .flatten()
            .ok_or_else(|| cannot_encode(&name))?;
        return Ok(jpeg_response(jpeg));
    }
    model_frame(State(s), Path(name)).await
}

/// `GET /v1/sources/{name}/model-frame.jpg`: the newest frame the model looked at, 404 when none.
pub(super) async fn model_frame(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let f = s
        .live
        .frame(&name)
        .ok_or_else(|| not_found(format!("no frame for source '{name}'")))?;
    let jpeg = tokio::task::spawn_blocking(move || f.jpeg())
        .await
        .ok()
        .flatten()
        .ok_or_else(|| cannot_encode(&name))?;
    Ok(jpeg_response(jpeg))
}

#[derive(Debug, Deserialize)]
pub(super) struct AtQuery {
    t: Option<String>,
}

/// `GET /v1/sources/{name}/snapshot.jpg?t=T`: the frame behind the alert or description of
/// this source at media time `T` (seconds), while it is among the recent ones kept.
async fn snapshot(
    Extension(h): Extension<Arc<History>>,
    Path(name): Path<String>,
    Query(q): Query<AtQuery>,
) -> Result<Response, ApiError> {
    let t: f64 =
        q.t.as_deref()
            .and_then(|t| t.parse().ok())
            .filter(|t: &f64| t.is_finite())
            .ok_or_else(|| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "t must be the event's media time in seconds, e.g. ?t=12.5",
                )
            })?;
    let jpeg = h
        .frame(&name, t)
        .ok_or_else(|| not_found(format!("no frame kept for source '{name}' at t={t}")))?;
    Ok(jpeg_response(jpeg.as_ref().clone()))
}

/// `GET /v1/history`: the last hour's timeline, the last five minutes' strips and each
/// source's running figures.
async fn history_json(Extension(h): Extension<Arc<History>>) -> Response {
    let v = tokio::task::spawn_blocking(move || h.snapshot())
        .await
        .unwrap_or_default();
    ([(header::CACHE_CONTROL, "no-store")], Json(v)).into_response()
}
