//! The HTTP surface, served by tokio on its own thread so the media threads never wait on a
//! client: `/metrics` (Prometheus text), `/healthz`, the live event feeds (SSE and WebSocket,
//! [`feed`]), the control API ([`control`]) and the web page with its frame images ([`page`]).

pub mod config;
mod control;
mod feed;
mod guard;
mod history;
mod page;

pub use guard::{check_exposure, constant_time_eq, FeedPermit, FeedSlots, Guard};

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use std::sync::Arc;

use crate::control::{ControlApi, LiveBoard, ModelStatus};
use crate::event::SourceState;
use crate::http::config::HttpConfig;
use crate::ingest::supervisor::StateBoard;
use crate::metrics::Metrics;
use crate::sink::Events;

#[derive(Clone)]
pub struct AppState {
    pub metrics: Arc<Metrics>,
    pub board: Arc<StateBoard>,
    /// Every event; each feed client subscribes on its own bounded channel.
    pub events: Events,
    /// Model status and the latest frame per source.
    pub live: Arc<LiveBoard>,
    /// The run loop's control surface; `None` (e.g. `percept analyze`) answers 503.
    pub control: Option<Arc<dyn ControlApi>>,
}

pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/", get(page::index))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/v1/events", get(feed::sse))
        .route("/v1/ws", get(feed::ws))
        .route("/v1/sources", get(control::list).post(control::add))
        .route("/v1/sources/{name}", axum::routing::delete(control::remove))
        .route("/v1/sources/{name}/task", put(control::set_task))
        .route("/v1/sources/{name}/frame.jpg", get(page::frame))
        .route("/v1/reload", post(control::reload))
        .merge(page::routes(&state))
        .with_state(state)
}

/// An error answered as `{"error": "<one line>"}`.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        // One line, so a client that logs it does not get its log split by a model's text.
        let message = self.message.replace(['\n', '\r'], " ");
        (self.status, Json(serde_json::json!({ "error": message }))).into_response()
    }
}

async fn metrics(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.render(),
    )
}

/// 200 while at least one source is healthy (or none has started yet); 503 when every
/// source has failed. An unavailable model is "degraded", not a failure: signal analysis runs.
async fn healthz(State(s): State<AppState>) -> impl IntoResponse {
    let states = s.board.snapshot();
    let model = s.live.model();
    let all_failed = !states.is_empty() && states.values().all(|s| *s == SourceState::Failed);
    let degraded = states
        .values()
        .any(|s| matches!(s, SourceState::Failed | SourceState::Reconnecting))
        || matches!(model, ModelStatus::Unavailable { .. });
    let status = if all_failed {
        "failed"
    } else if degraded {
        "degraded"
    } else {
        "ok"
    };
    let code = if all_failed {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    (
        code,
        Json(serde_json::json!({ "status": status, "sources": states, "model": model })),
    )
}

/// How long open connections (live feeds, control calls) may hold up a shutdown.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// A running server; dropped or `shutdown` stops it.
pub struct Server {
    pub addr: std::net::SocketAddr,
    shutdown: Option<tokio::sync::watch::Sender<bool>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot listen on {addr}: {error}")]
    Bind { addr: String, error: std::io::Error },
    #[error("cannot start HTTP runtime: {0}")]
    Runtime(std::io::Error),
    /// Serving beyond loopback without a token.
    #[error("{0}")]
    Exposed(String),
}

/// [`app`] behind the [`Guard`]: origin, host, token, body and scheme checks on every route.
pub fn guarded_app(state: AppState, guard: Arc<Guard>) -> Router {
    app(state).layer(axum::middleware::from_fn_with_state(guard, guard::check))
}

/// [`serve_with`] with the default `[http]` settings on `listen` (loopback hosts only, no
/// token unless `PERCEPT_HTTP_TOKEN` is set).
pub fn serve(listen: &str, state: AppState) -> Result<Server, HttpError> {
    serve_with(
        &HttpConfig {
            listen: listen.to_string(),
            ..HttpConfig::default()
        },
        state,
    )
}

/// Serve on `cfg.listen` with `cfg`'s access rules. A non-loopback address without a token
/// is refused before anything binds.
pub fn serve_with(cfg: &HttpConfig, state: AppState) -> Result<Server, HttpError> {
    check_exposure(cfg).map_err(HttpError::Exposed)?;
    let listen = cfg.listen.as_str();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("percept-http")
        .enable_all()
        .build()
        .map_err(HttpError::Runtime)?;
    let listener = rt
        .block_on(tokio::net::TcpListener::bind(listen))
        .map_err(|error| HttpError::Bind {
            addr: listen.to_string(),
            error,
        })?;
    let addr = listener.local_addr().map_err(|error| HttpError::Bind {
        addr: listen.to_string(),
        error,
    })?;
    let router = guarded_app(state, Arc::new(Guard::new(cfg, addr)));
    let (tx, mut rx) = tokio::sync::watch::channel(false);
    let mut grace_rx = tx.subscribe();
    let thread = std::thread::Builder::new()
        .name("percept-http".into())
        .spawn(move || {
            rt.block_on(async move {
                let server = axum::serve(listener, router).with_graceful_shutdown(async move {
                    let _ = rx.wait_for(|stop| *stop).await;
                });
                // Live feeds never end on their own, so a graceful shutdown would wait for
                // every browser tab; they get SHUTDOWN_GRACE, then are cut.
                let grace = async move {
                    let _ = grace_rx.wait_for(|stop| *stop).await;
                    tokio::time::sleep(SHUTDOWN_GRACE).await;
                };
                tokio::select! {
                    res = server => {
                        if let Err(e) = res {
                            tracing::error!(error = %e, "HTTP server stopped.");
                        }
                    }
                    () = grace => {
                        tracing::debug!("HTTP clients still connected at shutdown; closing them.");
                    }
                }
            });
            // A control call stuck in the run loop must not hold up the exit.
            rt.shutdown_timeout(SHUTDOWN_GRACE);
        })
        .map_err(HttpError::Runtime)?;
    Ok(Server {
        addr,
        shutdown: Some(tx),
        thread: Some(thread),
    })
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(true);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
