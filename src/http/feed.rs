//! Live event feeds: SSE at `/v1/events` and WebSocket at `/v1/ws`, both filtered by
//! `?source=a,b&kind=caption,alert` (comma lists; absent or empty = all).
//!
//! Each client gets its own bounded subscription to [`crate::sink::Events`], so a slow client
//! loses its own events and never slows the pipeline. A small std thread per client moves
//! events from that crossbeam channel into tokio (crossbeam's `recv` would block a tokio
//! worker), filters and serializes them there, and ends within [`POLL`] of the client leaving.
//! Clients beyond `[http] max_feed_clients` are refused with 503, so no number of open tabs
//! or scripted connections can take more than that many threads.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures_util::Stream;
use serde::Deserialize;

use std::sync::Arc;

use axum::http::StatusCode;
use axum::Extension;

use super::{ApiError, AppState, FeedPermit, FeedSlots};
use crate::event::Event;
use crate::sink::Events;

/// Events a client may fall behind by before it loses them (at the pipeline's side).
pub const SUBSCRIBER_CAPACITY: usize = 256;
/// Serialized events waiting for the client's socket.
const CLIENT_BUFFER: usize = 64;
/// How often an idle forwarder checks that its client is still there.
const POLL: Duration = Duration::from_millis(250);
/// Keeps proxies from closing a quiet feed, and lets a client tell a dead server from a calm one.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

#[derive(Debug, Default, Deserialize)]
pub(super) struct FeedQuery {
    source: Option<String>,
    kind: Option<String>,
}

/// Which events a client asked for; an empty list means all.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct Filter {
    sources: Vec<String>,
    kinds: Vec<String>,
}

fn split_list(s: Option<&str>) -> Vec<String> {
    s.unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|x| !x.is_empty())
        .map(str::to_string)
        .collect()
}

impl Filter {
    fn from_query(q: &FeedQuery) -> Filter {
        Filter {
            sources: split_list(q.source.as_deref()),
            kinds: split_list(q.kind.as_deref()),
        }
    }

    fn accepts(&self, e: &Event) -> bool {
        (self.sources.is_empty() || self.sources.contains(&e.source))
            && (self.kinds.is_empty() || self.kinds.iter().any(|k| k == e.kind()))
    }
}

/// One event ready for the wire.
struct Item {
    kind: &'static str,
    json: String,
}

/// Subscribes now (so nothing emitted after the request is missed) and starts the forwarder.
fn subscribe(events: &Events, filter: Filter) -> tokio::sync::mpsc::Receiver<Item> {
    let rx = events.subscribe(SUBSCRIBER_CAPACITY);
    let (tx, out) = tokio::sync::mpsc::channel(CLIENT_BUFFER);
    let spawned = std::thread::Builder::new()
        .name("percept-feed".into())
        .spawn(move || forward(rx, tx, filter));
    if let Err(e) = spawned {
        // The client sees a feed that ends at once; the server stays up.
        tracing::error!(error = %e, "Cannot start a feed thread.");
    }
    out
}

fn forward(
    rx: crossbeam_channel::Receiver<Event>,
    tx: tokio::sync::mpsc::Sender<Item>,
    filter: Filter,
) {
    loop {
        if tx.is_closed() {
            return;
        }
        let event = match rx.recv_timeout(POLL) {
            Ok(e) => e,
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => continue,
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
        };
        if !filter.accepts(&event) {
            continue;
        }
        let json = match serde_json::to_string(&event) {
            Ok(j) => j,
            Err(e) => {
                tracing::error!(error = %e, "Cannot serialize event for a feed.");
                continue;
            }
        };
        let item = Item {
            kind: event.kind(),
            json,
        };
        // Waiting here only backs up this client's own subscription, which then drops.
        if tx.blocking_send(item).is_err() {
            return;
        }
    }
}

/// A slot for one more feed client, or the 503 that refuses it. Without a guard (a router
/// built by [`super::app`] alone) there is no cap.
fn admit(slots: Option<Extension<Arc<FeedSlots>>>) -> Result<Option<FeedPermit>, ApiError> {
    let Some(Extension(slots)) = slots else {
        return Ok(None);
    };
    match slots.try_acquire() {
        Some(p) => Ok(Some(p)),
        None => {
            tracing::warn!(
                max = slots.max(),
                "Feed client refused: [http] max_feed_clients reached."
            );
            Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "too many feed clients ({} connected, [http] max_feed_clients); try again later",
                    slots.max()
                ),
            ))
        }
    }
}

/// `GET /v1/events`: `event: <kind>` and `data: <event JSON>` per event.
pub(super) async fn sse(
    State(s): State<AppState>,
    Query(q): Query<FeedQuery>,
    slots: Option<Extension<Arc<FeedSlots>>>,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, Infallible>>>, ApiError> {
    let permit = admit(slots)?;
    let rx = subscribe(&s.events, Filter::from_query(&q));
    // The permit lives as long as the stream: the slot frees when the client leaves.
    let stream = futures_util::stream::unfold((rx, permit), |(mut rx, permit)| async move {
        let item = rx.recv().await?;
        let ev = SseEvent::default().event(item.kind).data(item.json);
        Some((Ok(ev), (rx, permit)))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(KEEP_ALIVE)))
}

/// `GET /v1/ws`: one text frame of event JSON per event; client messages are ignored.
pub(super) async fn ws(
    State(s): State<AppState>,
    Query(q): Query<FeedQuery>,
    slots: Option<Extension<Arc<FeedSlots>>>,
    upgrade: WebSocketUpgrade,
) -> Response {
    // Refused before the upgrade, so the client sees a 503 rather than a closed socket.
    let permit = match admit(slots) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    let filter = Filter::from_query(&q);
    upgrade
        .on_upgrade(move |socket| ws_session(socket, s.events, filter, permit))
        .into_response()
}

async fn ws_session(
    mut socket: WebSocket,
    events: Events,
    filter: Filter,
    _permit: Option<FeedPermit>,
) {
    let mut rx = subscribe(&events, filter);
    let mut ping = tokio::time::interval(KEEP_ALIVE);
    ping.tick().await;
    loop {
        tokio::select! {
            item = rx.recv() => {
                let Some(item) = item else { break };
                if socket.send(Message::Text(item.json.into())).await.is_err() {
                    break;
                }
            }
            msg = socket.recv() => match msg {
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                Some(Ok(_)) => {}
            },
            _ = ping.tick() => {
                if socket.send(Message::Ping(Vec::new().into())).await.is_err() {
                    break;
                }
            }
        }
    }
    // Dropping `rx` here is what tells the forwarder thread to stop.
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{Body, CaptionStatus};

    fn caption(source: &str) -> Event {
        Event::new(
            source,
            1.0,
            Some(2.0),
            Body::Caption {
                text: "hi".into(),
                status: CaptionStatus::Final,
            },
        )
    }

    #[test]
    fn filter_lists_trim_and_empty_means_all() {
        let f = Filter::from_query(&FeedQuery {
            source: Some(" a, b ,".into()),
            kind: Some("".into()),
        });
        assert_eq!(f.sources, vec!["a", "b"]);
        assert!(f.kinds.is_empty());
        assert!(f.accepts(&caption("a")));
        assert!(f.accepts(&caption("b")));
        assert!(!f.accepts(&caption("c")));
        let f = Filter::from_query(&FeedQuery {
            source: None,
            kind: Some("alert".into()),
        });
        assert!(!f.accepts(&caption("a")));
        assert!(Filter::default().accepts(&caption("z")));
    }
}
