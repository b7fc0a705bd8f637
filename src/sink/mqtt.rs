//! MQTT: each event (or each of the configured kinds) published as its JSON line to
//! `<topic_prefix>/<source>/<kind>`, e.g. `percept/door/alert`.
//!
//! The broker is a guest, never a dependency: events reach this sink through a dropping
//! subscription, are handed to the MQTT client without ever blocking, and a broker that is
//! down or slow costs queued messages, not pipeline time. While it is unreachable the client
//! retries in the background with a backoff (250 ms doubling to 10 s), at most
//! [`CLIENT_QUEUE`] events wait for it and the rest are counted as dropped; each outage is
//! logged once when it starts and once when it ends.
//!
//! Threads: `start` spawns two, owned by [`MqttSink`]: `mqtt-publish` turns events into
//! publish requests, `mqtt-conn` drives the connection (rumqttc's sync client, with its own
//! single-threaded runtime). Plain TCP only; a TLS broker is reached through a local bridge.
//!
//! Delivery: QoS 0 or 1 with a clean session, so a publish in flight when the connection
//! drops may be lost (QoS 1 messages still queued are sent after the reconnect).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use rumqttc::{Client, Connection, MqttOptions, Outgoing, Packet, QoS};

use crate::config::MqttConfig;
use crate::event::Event;
use crate::sink::Events;

/// Events that may wait in this sink's subscription before new ones are lost for it.
pub const SUBSCRIBE_CAPACITY: usize = 1024;
/// Publish requests that may wait for the broker (across a short outage) before new ones
/// are dropped.
pub const CLIENT_QUEUE: usize = 512;
/// Longest `stop` waits for queued events to go out.
pub const STOP_FLUSH: Duration = Duration::from_secs(2);
/// Largest event payload published; bigger events are dropped (and counted).
pub const MAX_PAYLOAD_BYTES: usize = 1 << 20;
const BACKOFF_START: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
const KEEP_ALIVE: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("[mqtt] qos must be 0 or 1, got {0}")]
    Qos(u8),
    #[error("[mqtt] password_env names {0}, which is not set in the environment")]
    PasswordEnv(String),
    #[error("[mqtt] password_env needs user")]
    PasswordWithoutUser,
    #[error("[mqtt] starting the {0} thread")]
    Thread(&'static str, #[source] std::io::Error),
}

/// Counters since `start`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MqttStats {
    /// Publish packets written to the broker connection.
    pub published: u64,
    /// Events not published: the queue was full (broker down or slow), or too big.
    pub dropped: u64,
    /// Whether the broker connection is up now.
    pub connected: bool,
}

#[derive(Debug, Default)]
struct Counters {
    published: AtomicU64,
    dropped: AtomicU64,
    connected: AtomicBool,
}

/// The running MQTT publisher; `stop` (or drop) flushes and disconnects.
pub struct MqttSink {
    /// Dropped to tell both threads to stop.
    stop_tx: Option<Sender<()>>,
    publisher: Option<JoinHandle<()>>,
    connection: Option<JoinHandle<()>>,
    /// Disconnected when the connection thread ends (a join with a deadline).
    connection_done: Receiver<()>,
    /// Held until the connection thread ends: while a client lives, the connection keeps
    /// reading after the disconnect, until the broker closes it. Closing first with acks
    /// unread would reset the socket, and the broker would lose the last publishes.
    client: Option<Client>,
    counters: Arc<Counters>,
}

struct Route {
    prefix: String,
    kinds: Vec<String>,
    qos: QoS,
}

impl MqttSink {
    /// Subscribes to `events` and starts publishing in the background. Returns at once: the
    /// broker need not be up (it is connected to, and reconnected to, in the background).
    pub fn start(cfg: &MqttConfig, events: &Events) -> Result<MqttSink, MqttError> {
        let qos = match cfg.qos {
            0 => QoS::AtMostOnce,
            1 => QoS::AtLeastOnce,
            q => return Err(MqttError::Qos(q)),
        };
        let mut opts = MqttOptions::new(cfg.client_id.clone(), cfg.host.clone(), cfg.port);
        opts.set_keep_alive(KEEP_ALIVE)
            .set_clean_session(true)
            // Headroom over the largest payload for the topic and header.
            .set_max_packet_size(64 * 1024, MAX_PAYLOAD_BYTES + 64 * 1024);
        let password = match &cfg.password_env {
            // The value is read here and handed to the client only: never logged.
            Some(name) => {
                Some(std::env::var(name).map_err(|_| MqttError::PasswordEnv(name.clone()))?)
            }
            None => None,
        };
        match (&cfg.user, password) {
            (Some(user), password) => {
                opts.set_credentials(user.clone(), password.unwrap_or_default());
            }
            (None, Some(_)) => return Err(MqttError::PasswordWithoutUser),
            (None, None) => {}
        }
        let (client, connection) = Client::new(opts, CLIENT_QUEUE);
        let route = Route {
            prefix: cfg.topic_prefix.trim_end_matches('/').to_string(),
            kinds: cfg.kinds.clone(),
            qos,
        };
        let counters = Arc::new(Counters::default());
        let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
        let (done_tx, connection_done) = crossbeam_channel::bounded::<()>(0);
        let broker = format!("{}:{}", cfg.host, cfg.port);

        let conn_counters = Arc::clone(&counters);
        let conn_stop = stop_rx.clone();
        let conn = std::thread::Builder::new()
            .name("mqtt-conn".into())
            .spawn(move || {
                connection_loop(connection, &conn_stop, &conn_counters, &broker);
                drop(done_tx);
            })
            .map_err(|e| MqttError::Thread("mqtt-conn", e))?;

        let rx = events.subscribe(SUBSCRIBE_CAPACITY);
        let pub_counters = Arc::clone(&counters);
        let publisher = std::thread::Builder::new()
            .name("mqtt-publish".into())
            .spawn({
                let client = client.clone();
                move || publish_loop(&client, &rx, &stop_rx, &route, &pub_counters)
            })
            .map_err(|e| MqttError::Thread("mqtt-publish", e))?;
        tracing::info!(host = %cfg.host, port = cfg.port, prefix = %cfg.topic_prefix, "MQTT sink started.");
        Ok(MqttSink {
            stop_tx: Some(stop_tx),
            publisher: Some(publisher),
            connection: Some(conn),
            connection_done,
            client: Some(client),
            counters,
        })
    }

    pub fn stats(&self) -> MqttStats {
        MqttStats {
            published: self.counters.published.load(Ordering::Relaxed),
            dropped: self.counters.dropped.load(Ordering::Relaxed),
            connected: self.counters.connected.load(Ordering::Relaxed),
        }
    }

    /// Publishes what is queued (waiting at most [`STOP_FLUSH`] for the broker), then
    /// disconnects. Returns the final counters.
    pub fn stop(mut self) -> MqttStats {
        self.shutdown();
        self.stats()
    }

    fn shutdown(&mut self) {
        let Some(stop) = self.stop_tx.take() else {
            return;
        };
        let deadline = Instant::now() + STOP_FLUSH;
        drop(stop);
        // The publisher never blocks on the broker, so it ends promptly.
        if let Some(p) = self.publisher.take() {
            let _ = p.join();
        }
        match self.connection_done.recv_deadline(deadline) {
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                // It ends by itself once its connect attempt or write times out; waiting
                // longer here would hold up percept's shutdown for a broker.
                tracing::warn!(
                    "MQTT: queued events not delivered within {} s; leaving them.",
                    STOP_FLUSH.as_secs()
                );
            }
            _ => {
                if let Some(c) = self.connection.take() {
                    let _ = c.join();
                }
            }
        }
        // With the last client gone a connection thread still running ends as soon as it
        // polls its requests.
        self.client = None;
    }
}

impl Drop for MqttSink {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// `/`, `+`, `#` and NUL would change the topic's levels or make it a wildcard.
fn topic_level(s: &str) -> String {
    let cleaned: String = s
        .chars()
        .map(|c| match c {
            '/' | '+' | '#' | '\0' => '_',
            c => c,
        })
        .collect();
    if cleaned.is_empty() {
        "_".into()
    } else {
        cleaned
    }
}

fn publish_loop(
    client: &Client,
    events: &Receiver<Event>,
    stop: &Receiver<()>,
    route: &Route,
    counters: &Counters,
) {
    loop {
        crossbeam_channel::select! {
            recv(events) -> ev => match ev {
                Ok(ev) => publish(client, &ev, route, counters),
                Err(_) => break,
            },
            recv(stop) -> _ => {
                // What was emitted before the stop still goes out.
                while let Ok(ev) = events.try_recv() {
                    publish(client, &ev, route, counters);
                }
                break;
            }
        }
    }
    // The disconnect queues behind the publishes, so they are written before it. When the
    // queue is full the client is dropped instead, which ends the connection once the
    // queue is drained.
    let _ = client.try_disconnect();
}

fn publish(client: &Client, ev: &Event, route: &Route, counters: &Counters) {
    let kind = ev.kind();
    if !route.kinds.is_empty() && !route.kinds.iter().any(|k| k == kind) {
        return;
    }
    let payload = match serde_json::to_vec(ev) {
        Ok(p) if p.len() <= MAX_PAYLOAD_BYTES => p,
        Ok(p) => {
            tracing::warn!(source = %ev.source, kind, bytes = p.len(), "MQTT: event too big to publish; dropped.");
            counters.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        Err(e) => {
            tracing::error!(error = %e, "MQTT: cannot serialize event.");
            counters.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    let topic = format!("{}/{}/{kind}", route.prefix, topic_level(&ev.source));
    if client
        .try_publish(topic, route.qos, false, payload)
        .is_err()
    {
        counters.dropped.fetch_add(1, Ordering::Relaxed);
    }
}

fn connection_loop(
    mut connection: Connection,
    stop: &Receiver<()>,
    counters: &Counters,
    broker: &str,
) {
    let mut backoff = BACKOFF_START;
    let mut ever_connected = false;
    // Dropped count when the current outage began.
    let mut outage: Option<u64> = None;
    let mut disconnecting = false;
    for notification in connection.iter() {
        match notification {
            Ok(rumqttc::Event::Incoming(Packet::ConnAck(_))) => {
                counters.connected.store(true, Ordering::Relaxed);
                backoff = BACKOFF_START;
                if let Some(before) = outage.take() {
                    let dropped = counters.dropped.load(Ordering::Relaxed) - before;
                    tracing::info!(%broker, dropped, "MQTT broker reachable again.");
                } else if !ever_connected {
                    tracing::info!(%broker, "MQTT connected.");
                }
                ever_connected = true;
            }
            Ok(rumqttc::Event::Outgoing(Outgoing::Publish(_))) => {
                counters.published.fetch_add(1, Ordering::Relaxed);
            }
            // The broker closes the connection after a DISCONNECT; reading on until then
            // takes in the last acks (see `MqttSink::client`).
            Ok(rumqttc::Event::Outgoing(Outgoing::Disconnect)) => disconnecting = true,
            Ok(_) => {}
            Err(_) if disconnecting => break,
            Err(e) => {
                counters.connected.store(false, Ordering::Relaxed);
                if outage.is_none() {
                    tracing::warn!(%broker, error = %e, "MQTT broker unreachable; retrying in the background, events are dropped while the queue is full.");
                    outage = Some(counters.dropped.load(Ordering::Relaxed));
                }
                // Waiting on the stop channel: a stop ends the wait at once.
                match stop.recv_timeout(backoff) {
                    Err(RecvTimeoutError::Timeout) => {}
                    _ => break,
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
    counters.connected.store(false, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_levels_are_sanitized() {
        assert_eq!(topic_level("door"), "door");
        assert_eq!(topic_level("a/b+c#"), "a_b_c_");
        assert_eq!(topic_level(""), "_");
    }

    #[test]
    fn config_errors_are_reported_before_anything_starts() {
        let events = Events::with_writer(None);
        let cfg = MqttConfig {
            qos: 2,
            ..MqttConfig::default()
        };
        assert!(matches!(
            MqttSink::start(&cfg, &events),
            Err(MqttError::Qos(2))
        ));
        let cfg = MqttConfig {
            user: Some("u".into()),
            password_env: Some("PERCEPT_TEST_SURELY_UNSET_PASSWORD".into()),
            ..MqttConfig::default()
        };
        let err = MqttSink::start(&cfg, &events).err().map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("[mqtt] password_env names PERCEPT_TEST_SURELY_UNSET_PASSWORD, which is not set in the environment")
        );
    }

    /// Nothing listens on the port: start returns at once, emitting never blocks, the
    /// queue overflow is counted, and stop is bounded.
    #[test]
    fn a_missing_broker_costs_nothing_but_drops() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let events = Events::with_writer(None);
        let cfg = MqttConfig {
            enabled: true,
            port,
            ..MqttConfig::default()
        };
        let sink = MqttSink::start(&cfg, &events).unwrap();
        let t = Instant::now();
        for i in 0..(CLIENT_QUEUE + 300) {
            events.emit(Event::new(
                "door",
                i as f64,
                None,
                crate::event::Body::Gap {
                    reason: "test".into(),
                },
            ));
            if i % 100 == 0 {
                // Let the publisher keep up with the subscription.
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        assert!(t.elapsed() < Duration::from_secs(2));
        std::thread::sleep(Duration::from_millis(200));
        let s = sink.stats();
        assert!(!s.connected);
        assert!(s.dropped >= 300, "{s:?}");
        let t = Instant::now();
        let s = sink.stop();
        assert!(t.elapsed() <= STOP_FLUSH + Duration::from_millis(500));
        assert_eq!(s.published, 0);
    }
}
