//! The HTTP surface: `/metrics` (Prometheus text) and `/healthz`, served by tokio on its own
//! thread so the media threads never wait on a client.

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use std::sync::Arc;

use crate::event::SourceState;
use crate::ingest::supervisor::StateBoard;
use crate::metrics::Metrics;

#[derive(Clone)]
pub struct AppState {
    pub metrics: Arc<Metrics>,
    pub board: Arc<StateBoard>,
}

pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .with_state(state)
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
/// source has failed.
async fn healthz(State(s): State<AppState>) -> impl IntoResponse {
    let states = s.board.snapshot();
    let all_failed = !states.is_empty() && states.values().all(|s| *s == SourceState::Failed);
    let degraded = states
        .values()
        .any(|s| matches!(s, SourceState::Failed | SourceState::Reconnecting));
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
        Json(serde_json::json!({ "status": status, "sources": states })),
    )
}

/// A running server; dropped or `shutdown` stops it.
pub struct Server {
    pub addr: std::net::SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot listen on {addr}: {error}")]
    Bind { addr: String, error: std::io::Error },
    #[error("cannot start HTTP runtime: {0}")]
    Runtime(std::io::Error),
}

pub fn serve(listen: &str, state: AppState) -> Result<Server, HttpError> {
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
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("percept-http".into())
        .spawn(move || {
            rt.block_on(async move {
                let res = axum::serve(listener, app(state))
                    .with_graceful_shutdown(async {
                        let _ = rx.await;
                    })
                    .await;
                if let Err(e) = res {
                    tracing::error!(error = %e, "HTTP server stopped.");
                }
            });
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
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
