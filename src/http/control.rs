//! The control API over [`crate::control::ControlApi`]: list, add and remove sources, change a
//! source's task, reload the config. The run loop's calls may start or stop GStreamer graphs,
//! so they run on tokio's blocking pool, never on the worker that serves the feeds.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;

use super::{ApiError, AppState};
use crate::control::{AddSource, ControlApi, ControlError, SourceInfo, TaskUpdate};

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> ApiError {
        let status = match e {
            ControlError::NotFound(_) => StatusCode::NOT_FOUND,
            ControlError::Conflict(_) => StatusCode::CONFLICT,
            ControlError::Invalid(_) => StatusCode::BAD_REQUEST,
            ControlError::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError::new(status, e.to_string())
    }
}

/// A body that is not JSON, or not the expected shape, is the client's mistake: 400 with
/// serde's words (they name the field and position).
fn bad_json(r: JsonRejection) -> ApiError {
    ApiError::new(
        StatusCode::BAD_REQUEST,
        format!("invalid JSON body: {}", r.body_text()),
    )
}

fn control(s: &AppState) -> Result<Arc<dyn ControlApi>, ApiError> {
    s.control.clone().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "this run has no control API",
        )
    })
}

/// Runs a control call off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ControlError> + Send + 'static,
) -> Result<T, ApiError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(ApiError::from),
        Err(e) => {
            tracing::error!(error = %e, "Control call panicked.");
            Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal error",
            ))
        }
    }
}

/// What `GET /v1/sources` shows per source: the control view plus the latest frame the model
/// looked at (its image is at `/v1/sources/{name}/frame.jpg`).
#[derive(Serialize)]
struct SourceView {
    #[serde(flatten)]
    info: SourceInfo,
    frame: Option<FrameView>,
}

#[derive(Serialize)]
struct FrameView {
    t: f64,
    description: Option<String>,
}

pub(super) async fn list(State(s): State<AppState>) -> Result<Response, ApiError> {
    let ctl = control(&s)?;
    let infos = blocking(move || Ok(ctl.list())).await?;
    let views: Vec<SourceView> = infos
        .into_iter()
        .map(|info| {
            let frame = s.live.frame(&info.name).map(|f| FrameView {
                t: f.t,
                description: f.description,
            });
            SourceView { info, frame }
        })
        .collect();
    Ok(Json(views).into_response())
}

pub(super) async fn add(
    State(s): State<AppState>,
    body: Result<Json<AddSource>, JsonRejection>,
) -> Result<Response, ApiError> {
    let ctl = control(&s)?;
    let Json(req) = body.map_err(bad_json)?;
    let info = blocking(move || ctl.add(req)).await?;
    Ok((StatusCode::CREATED, Json(info)).into_response())
}

pub(super) async fn remove(
    State(s): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let ctl = control(&s)?;
    blocking(move || ctl.remove(&name)).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub(super) async fn set_task(
    State(s): State<AppState>,
    Path(name): Path<String>,
    body: Result<Json<TaskUpdate>, JsonRejection>,
) -> Result<Response, ApiError> {
    let ctl = control(&s)?;
    let Json(update) = body.map_err(bad_json)?;
    let info = blocking(move || ctl.set_task(&name, update)).await?;
    Ok(Json(info).into_response())
}

pub(super) async fn reload(State(s): State<AppState>) -> Result<Response, ApiError> {
    let ctl = control(&s)?;
    blocking(move || ctl.reload()).await?;
    Ok(Json(serde_json::json!({ "reloaded": true })).into_response())
}
