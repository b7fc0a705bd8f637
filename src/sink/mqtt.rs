//! MQTT: each event (or each of the configured kinds) published as its JSON line to
//! `<topic_prefix>/<source>/<kind>`, e.g. `percept/door/alert`; with `homeassistant = true`
//! also Home Assistant's discovery configs and entity states (see [`super::homeassistant`]).
//!
//! At least once: every message goes through the durable outbox (`<[outbox] dir>/mqtt`, see
//! [`super::outbox`]) before the events file, and leaves it only when the broker answered
//! its PUBLISH (QoS 1) with a PUBACK. A broker that is down, a full client queue or a
//! SIGKILL lose nothing: records wait on disk (the oldest dropped, counted, once the outbox
//! is full) and go out, oldest first, after the reconnect or the next start. What was
//! published but not acknowledged when a connection died is published again, so a consumer
//! may see an event twice and drops the duplicate by its `id`. With `qos = 0` a record
//! leaves the outbox once written to the connection (at most once).
//!
//! The broker is a guest, never a dependency: emitting an event only appends a file; one
//! thread, `mqtt-conn`, owned by [`MqttSink`], connects (persistent session: clean session
//! off, the stable `client_id`), reconnects with a backoff (250 ms doubling to 10 s) and
//! keeps up to [`WINDOW`] publishes in flight; a helper thread reads the broker's acks.
//! Each outage is logged once when it starts and once when it ends. Plain TCP only; a TLS
//! broker is reached through a local bridge.

use std::io::Write;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};

use crate::event::Event;
use crate::sink::config::MqttConfig;
use crate::sink::homeassistant::{HomeAssistant, Msg, SourceInfo};
use crate::sink::mqtt_wire as wire;
use crate::sink::outbox::Outbox;
use crate::sink::Events;

/// Longest `stop` waits for the outbox to be delivered; what is left stays on disk.
pub const STOP_FLUSH: Duration = Duration::from_secs(2);
/// Largest event payload published; bigger events are dropped (and counted).
pub const MAX_PAYLOAD_BYTES: usize = 1 << 20;
/// Publishes sent and not yet acknowledged, at most.
pub const WINDOW: usize = 64;
const BACKOFF_START: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(10);
const KEEP_ALIVE: Duration = Duration::from_secs(15);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const TICK: Duration = Duration::from_millis(250);

#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("[mqtt] qos must be 0 or 1, got {0}")]
    Qos(u8),
    #[error("[mqtt] password_env names {0}, which is not set in the environment")]
    PasswordEnv(String),
    #[error("[mqtt] password_env needs user")]
    PasswordWithoutUser,
    #[error("[mqtt] client_id must not be empty (it names the persistent session)")]
    ClientId,
    #[error("[mqtt] starting the {0} thread")]
    Thread(&'static str, #[source] std::io::Error),
}

/// Counters since `start`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MqttStats {
    /// Publish packets of outbox records written to the broker connection (a record sent
    /// again after a reconnect counts again).
    pub published: u64,
    /// Records the broker acknowledged (removed from the outbox).
    pub acked: u64,
    /// Records lost: dropped oldest-first from a full outbox, or too big to publish.
    pub dropped: u64,
    /// Records waiting in the outbox now.
    pub pending: u64,
    /// Whether the broker connection is up now.
    pub connected: bool,
}

#[derive(Debug, Default)]
struct Counters {
    published: AtomicU64,
    acked: AtomicU64,
    too_big: AtomicU64,
    connected: AtomicBool,
}

/// The running MQTT publisher; `stop` (or drop) delivers what it can within [`STOP_FLUSH`],
/// then disconnects (publishing `offline` first for Home Assistant).
pub struct MqttSink {
    /// Dropped to tell the connection thread to stop.
    stop_tx: Option<Sender<()>>,
    connection: Option<JoinHandle<()>>,
    /// Disconnected when the connection thread ends (a join with a deadline).
    connection_done: Receiver<()>,
    counters: Arc<Counters>,
    outbox: Outbox,
}

struct Route {
    prefix: String,
    kinds: Vec<String>,
}

struct Conn {
    host: String,
    port: u16,
    client_id: String,
    user: Option<String>,
    password: Option<String>,
    qos1: bool,
    ha: Option<Arc<HomeAssistant>>,
}

/// An outbox record: `r` (retained) or `-`, the topic, a newline, the payload.
pub fn record(topic: &str, payload: &[u8], retain: bool) -> Vec<u8> {
    let mut r = Vec::with_capacity(topic.len() + payload.len() + 2);
    r.push(if retain { b'r' } else { b'-' });
    r.extend_from_slice(topic.as_bytes());
    r.push(b'\n');
    r.extend_from_slice(payload);
    r
}

fn parse_record(r: &[u8]) -> Option<(bool, &str, &[u8])> {
    let retain = *r.first()? == b'r';
    let nl = r.iter().position(|&b| b == b'\n')?;
    let topic = std::str::from_utf8(r.get(1..nl)?).ok()?;
    Some((retain, topic, &r[nl + 1..]))
}

impl MqttSink {
    /// Starts publishing every event `events` emits from now on, plus what `outbox` holds
    /// from earlier runs. Returns at once: the broker need not be up. `sources` are the
    /// configured sources, announced to Home Assistant before their first event.
    pub fn start(
        cfg: &MqttConfig,
        outbox: Outbox,
        events: &Events,
        sources: &[SourceInfo],
    ) -> Result<MqttSink, MqttError> {
        let qos1 = match cfg.qos {
            0 => false,
            1 => true,
            q => return Err(MqttError::Qos(q)),
        };
        if cfg.client_id.is_empty() {
            return Err(MqttError::ClientId);
        }
        let password = match &cfg.password_env {
            // The value is read here and handed to the connection only: never logged.
            Some(name) => {
                Some(std::env::var(name).map_err(|_| MqttError::PasswordEnv(name.clone()))?)
            }
            None => None,
        };
        if cfg.user.is_none() && password.is_some() {
            return Err(MqttError::PasswordWithoutUser);
        }
        let route = Route {
            prefix: cfg.topic_prefix.trim_end_matches('/').to_string(),
            kinds: cfg.kinds.clone(),
        };
        let ha = cfg
            .homeassistant
            .then(|| Arc::new(HomeAssistant::new(cfg, sources)));
        let counters = Arc::new(Counters::default());
        let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
        let (done_tx, connection_done) = crossbeam_channel::bounded::<()>(0);
        let conn = Conn {
            host: cfg.host.clone(),
            port: cfg.port,
            client_id: cfg.client_id.clone(),
            user: cfg.user.clone(),
            password,
            qos1,
            ha: ha.clone(),
        };

        // Every event becomes outbox records before it reaches the events file.
        {
            let outbox = outbox.clone();
            let counters = Arc::clone(&counters);
            let ha = ha.clone();
            events.tap(Arc::new(move |ev: &Event, line: &[u8]| {
                let kind = ev.kind();
                if route.kinds.is_empty() || route.kinds.iter().any(|k| k == kind) {
                    if line.len() > MAX_PAYLOAD_BYTES {
                        tracing::warn!(source = %ev.source, kind, bytes = line.len(), "MQTT: event too big to publish; dropped.");
                        counters.too_big.fetch_add(1, Ordering::Relaxed);
                    } else {
                        let topic = format!("{}/{}/{kind}", route.prefix, topic_level(&ev.source));
                        push(&outbox, &record(&topic, line, false));
                    }
                }
                if let Some(ha) = &ha {
                    for m in ha.on_event(ev) {
                        push(&outbox, &record(&m.topic, &m.payload, m.retain));
                    }
                }
            }));
        }
        if let Some(ha) = &ha {
            let outbox = outbox.clone();
            let ha = Arc::clone(ha);
            events.on_answer(Arc::new(move |source: &str, question: &str, yes: bool| {
                for m in ha.on_answer(source, question, yes) {
                    push(&outbox, &record(&m.topic, &m.payload, m.retain));
                }
            }));
        }

        let broker = format!("{}:{}", cfg.host, cfg.port);
        let conn_counters = Arc::clone(&counters);
        let conn_outbox = outbox.clone();
        let handle = std::thread::Builder::new()
            .name("mqtt-conn".into())
            .spawn(move || {
                connection_loop(&conn, &conn_outbox, &stop_rx, &conn_counters, &broker);
                drop(done_tx);
            })
            .map_err(|e| MqttError::Thread("mqtt-conn", e))?;
        tracing::info!(host = %cfg.host, port = cfg.port, prefix = %cfg.topic_prefix, pending = outbox.len(), homeassistant = cfg.homeassistant, "MQTT sink started.");
        Ok(MqttSink {
            stop_tx: Some(stop_tx),
            connection: Some(handle),
            connection_done,
            counters,
            outbox,
        })
    }

    pub fn stats(&self) -> MqttStats {
        MqttStats {
            published: self.counters.published.load(Ordering::Relaxed),
            acked: self.counters.acked.load(Ordering::Relaxed),
            dropped: self.counters.too_big.load(Ordering::Relaxed) + self.outbox.dropped(),
            pending: self.outbox.len() as u64,
            connected: self.counters.connected.load(Ordering::Relaxed),
        }
    }

    /// Delivers what the outbox holds (waiting at most [`STOP_FLUSH`] for the broker), then
    /// disconnects. What is left stays in the outbox for the next start. Returns the final
    /// counters.
    pub fn stop(mut self) -> MqttStats {
        self.shutdown();
        self.stats()
    }

    fn shutdown(&mut self) {
        let Some(stop) = self.stop_tx.take() else {
            return;
        };
        drop(stop);
        // The thread gives up delivering at STOP_FLUSH; a connect or write in progress then
        // may take up to its own timeout more, which is not waited for.
        let deadline = Instant::now() + STOP_FLUSH + Duration::from_millis(700);
        match self.connection_done.recv_deadline(deadline) {
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                tracing::warn!(
                    pending = self.outbox.len(),
                    "MQTT: the broker did not take everything within {} s; the rest waits in the outbox.",
                    STOP_FLUSH.as_secs()
                );
            }
            _ => {
                if let Some(c) = self.connection.take() {
                    let _ = c.join();
                }
                let pending = self.outbox.len();
                if pending > 0 {
                    tracing::warn!(
                        pending,
                        "MQTT: undelivered records wait in the outbox for the next start."
                    );
                }
            }
        }
    }
}

impl Drop for MqttSink {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn push(outbox: &Outbox, rec: &[u8]) {
    if let Err(e) = outbox.push(rec) {
        tracing::error!(error = %e, "MQTT: cannot write to the outbox; message lost.");
    }
}

/// `/`, `+`, `#`, NUL and newlines would change the topic's levels, make it a wildcard or
/// break the outbox record.
pub fn topic_level(s: &str) -> String {
    let cleaned: String = s
        .chars()
        .map(|c| match c {
            '/' | '+' | '#' | '\0' | '\n' | '\r' => '_',
            c => c,
        })
        .collect();
    if cleaned.is_empty() {
        "_".into()
    } else {
        cleaned
    }
}

enum End {
    /// The connection broke (or never came up): reconnect.
    Lost(String),
    /// Stopped: everything delivered, or the flush deadline passed.
    Stopped,
}

fn connection_loop(
    conn: &Conn,
    outbox: &Outbox,
    stop: &Receiver<()>,
    counters: &Counters,
    broker: &str,
) {
    let mut backoff = BACKOFF_START;
    let mut ever_connected = false;
    // Since when the broker has been unreachable (logged once per outage).
    let mut outage: Option<Instant> = None;
    let mut stop_at: Option<Instant> = None;
    loop {
        if stop_at.is_none()
            && matches!(
                stop.try_recv(),
                Err(crossbeam_channel::TryRecvError::Disconnected)
            )
        {
            stop_at = Some(Instant::now() + STOP_FLUSH);
        }
        if let Some(at) = stop_at {
            if outbox.is_empty() || Instant::now() >= at {
                break;
            }
        }
        let end = match open(conn) {
            Ok((stream, session_present)) => {
                counters.connected.store(true, Ordering::Relaxed);
                backoff = BACKOFF_START;
                if outage.take().is_some() {
                    tracing::info!(%broker, pending = outbox.len(), "MQTT broker reachable again.");
                } else if !ever_connected {
                    tracing::info!(%broker, session_present, pending = outbox.len(), "MQTT connected.");
                }
                ever_connected = true;
                let end = session(conn, stream, outbox, stop, &mut stop_at, counters);
                counters.connected.store(false, Ordering::Relaxed);
                end
            }
            Err(e) => End::Lost(e),
        };
        match end {
            End::Stopped => break,
            End::Lost(e) => {
                if outage.is_none() {
                    tracing::warn!(%broker, error = %e, pending = outbox.len(), "MQTT broker unreachable; retrying in the background, messages wait in the outbox.");
                    outage = Some(Instant::now());
                }
                let wait = match stop_at {
                    Some(at) => at.saturating_duration_since(Instant::now()).min(backoff),
                    None => backoff,
                };
                // Waiting on the stop channel: a stop ends the wait at once.
                if stop_at.is_none() {
                    if let Err(crossbeam_channel::RecvTimeoutError::Disconnected) =
                        stop.recv_timeout(wait)
                    {
                        stop_at = Some(Instant::now() + STOP_FLUSH);
                    }
                } else {
                    std::thread::sleep(wait);
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
    counters.connected.store(false, Ordering::Relaxed);
}

/// TCP connect, CONNECT, CONNACK: the stream and whether the broker kept our session.
fn open(conn: &Conn) -> Result<(TcpStream, bool), String> {
    let addrs: Vec<_> = (conn.host.as_str(), conn.port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {}: {e}", conn.host))?
        .collect();
    let mut last = format!("cannot resolve {}", conn.host);
    let mut stream = None;
    for a in addrs {
        match TcpStream::connect_timeout(&a, CONNECT_TIMEOUT) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = e.to_string(),
        }
    }
    let mut stream = stream.ok_or(last)?;
    let io = |e: std::io::Error| e.to_string();
    stream.set_nodelay(true).map_err(io)?;
    stream.set_read_timeout(Some(CONNECT_TIMEOUT)).map_err(io)?;
    stream
        .set_write_timeout(Some(CONNECT_TIMEOUT))
        .map_err(io)?;
    let will_topic = conn.ha.as_ref().map(|h| h.availability_topic());
    let packet = wire::connect(&wire::Connect {
        client_id: &conn.client_id,
        clean_session: false,
        keep_alive_s: KEEP_ALIVE.as_secs() as u16,
        user: conn.user.as_deref(),
        password: conn.password.as_deref(),
        will: will_topic.as_deref().map(|topic| wire::Will {
            topic,
            payload: b"offline",
            retain: true,
        }),
    });
    stream.write_all(&packet).map_err(io)?;
    let p = wire::read_packet(&mut stream).map_err(io)?;
    let (session_present, code) = wire::connack(&p).ok_or("no CONNACK from the broker")?;
    if code != 0 {
        return Err(format!(
            "broker refused the connection: {}",
            wire::connack_reason(code)
        ));
    }
    stream.set_read_timeout(None).map_err(io)?;
    Ok((stream, session_present))
}

/// One connection: publish the outbox oldest first (everything not yet acknowledged, so
/// what the last connection left unacknowledged goes out again), keep it alive, remove what
/// the broker acknowledges.
fn session(
    conn: &Conn,
    mut stream: TcpStream,
    outbox: &Outbox,
    stop: &Receiver<()>,
    stop_at: &mut Option<Instant>,
    counters: &Counters,
) -> End {
    let (pk_tx, pk_rx) = crossbeam_channel::unbounded::<wire::Packet>();
    let reader = match stream.try_clone() {
        Ok(mut r) => std::thread::Builder::new()
            .name("mqtt-read".into())
            .spawn(move || {
                while let Ok(p) = wire::read_packet(&mut r) {
                    if pk_tx.send(p).is_err() {
                        break;
                    }
                }
            }),
        Err(e) => return End::Lost(e.to_string()),
    };
    if let Err(e) = reader {
        return End::Lost(e.to_string());
    }
    let wake = outbox.wakeups();
    let never = crossbeam_channel::never::<()>();
    // pkid -> outbox record (None: a message of the connection itself, e.g. discovery).
    let mut inflight: std::collections::HashMap<u16, Option<u64>> = Default::default();
    let mut next_pkid: u16 = 0;
    let mut alloc = |inflight: &std::collections::HashMap<u16, Option<u64>>| loop {
        next_pkid = next_pkid.wrapping_add(1);
        if next_pkid != 0 && !inflight.contains_key(&next_pkid) {
            break next_pkid;
        }
    };
    let mut cursor: Option<u64> = None;
    let mut last_write = Instant::now();
    let mut ping_sent: Option<Instant> = None;
    let lost = |stream: &TcpStream, why: String| {
        let _ = stream.shutdown(std::net::Shutdown::Both);
        End::Lost(why)
    };

    // Discovery configs and the birth message first, on every connect: a broker that
    // restarted without persistence has forgotten its retained messages.
    let hello: Vec<Msg> = conn
        .ha
        .as_ref()
        .map(|h| h.connect_messages())
        .unwrap_or_default();
    for m in hello {
        let pkid = alloc(&inflight);
        inflight.insert(pkid, None);
        if let Err(e) = stream.write_all(&wire::publish(&m.topic, &m.payload, true, m.retain, pkid))
        {
            return lost(&stream, e.to_string());
        }
    }
    loop {
        // Fill the window.
        while inflight.len() < WINDOW {
            let Some(seq) = outbox.next_after(cursor) else {
                break;
            };
            cursor = Some(seq);
            let Some(rec) = outbox.read(seq) else {
                continue;
            };
            let Some((retain, topic, payload)) = parse_record(&rec) else {
                tracing::warn!(seq, "MQTT: malformed outbox record; skipped.");
                outbox.ack(seq);
                continue;
            };
            let pkid = if conn.qos1 { alloc(&inflight) } else { 0 };
            if let Err(e) =
                stream.write_all(&wire::publish(topic, payload, conn.qos1, retain, pkid))
            {
                return lost(&stream, e.to_string());
            }
            last_write = Instant::now();
            counters.published.fetch_add(1, Ordering::Relaxed);
            if conn.qos1 {
                inflight.insert(pkid, Some(seq));
            } else {
                outbox.ack(seq);
                counters.acked.fetch_add(1, Ordering::Relaxed);
            }
        }
        if let Some(at) = *stop_at {
            let drained = inflight.is_empty() && outbox.next_after(cursor).is_none();
            if drained || Instant::now() >= at {
                goodbye(conn, &mut stream, &pk_rx);
                return End::Stopped;
            }
        }
        let stop_rx = if stop_at.is_some() { &never } else { stop };
        crossbeam_channel::select! {
            recv(pk_rx) -> p => match p {
                Ok(p) if p.kind == wire::PUBACK => {
                    if let Some(Some(seq)) = p.pkid().and_then(|id| inflight.remove(&id)) {
                        outbox.ack(seq);
                        counters.acked.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(p) if p.kind == wire::PINGRESP => ping_sent = None,
                Ok(p) => {
                    // Nothing is subscribed, but a QoS 1 message stored in the session is
                    // acknowledged so the broker stops resending it.
                    if let Some(id) = p.pkid().filter(|_| p.kind == wire::PUBLISH) {
                        let _ = stream.write_all(&wire::puback(id));
                    }
                }
                Err(_) => return lost(&stream, "connection closed by the broker".into()),
            },
            recv(wake) -> _ => {}
            recv(stop_rx) -> _ => *stop_at = Some(Instant::now() + STOP_FLUSH),
            default(TICK) => {}
        }
        if let Some(sent) = ping_sent {
            if sent.elapsed() > KEEP_ALIVE {
                return lost(&stream, "no PINGRESP within the keep-alive".into());
            }
        } else if last_write.elapsed() >= KEEP_ALIVE / 2 {
            if let Err(e) = stream.write_all(&wire::pingreq()) {
                return lost(&stream, e.to_string());
            }
            last_write = Instant::now();
            ping_sent = Some(last_write);
        }
    }
}

/// A clean end: `offline` for Home Assistant (a DISCONNECT suppresses the will), then
/// DISCONNECT, then the broker's close (closing first could reset the connection before
/// the broker read the last packets).
fn goodbye(conn: &Conn, stream: &mut TcpStream, pk_rx: &Receiver<wire::Packet>) {
    if let Some(ha) = &conn.ha {
        let topic = ha.availability_topic();
        if stream
            .write_all(&wire::publish(&topic, b"offline", true, true, 65535))
            .is_ok()
        {
            let until = Instant::now() + Duration::from_millis(500);
            while let Ok(p) = pk_rx.recv_deadline(until) {
                if p.kind == wire::PUBACK && p.pkid() == Some(65535) {
                    break;
                }
            }
        }
    }
    let _ = stream.write_all(&wire::disconnect());
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let until = Instant::now() + Duration::from_millis(500);
    while pk_rx.recv_deadline(until).is_ok() {}
    let _ = stream.shutdown(std::net::Shutdown::Both);
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn outbox(name: &str) -> (Outbox, std::path::PathBuf) {
        let d =
            std::env::temp_dir().join(format!("percept-mqtt-unit-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        (Outbox::open(&d, 1 << 30).unwrap(), d)
    }

    #[test]
    fn topic_levels_are_sanitized() {
        assert_eq!(topic_level("door"), "door");
        assert_eq!(topic_level("a/b+c#"), "a_b_c_");
        assert_eq!(topic_level(""), "_");
    }

    #[test]
    fn records_round_trip() {
        let r = record("percept/door/alert", b"{\"a\":\"x\ny\"}", true);
        assert_eq!(
            parse_record(&r),
            Some((true, "percept/door/alert", &b"{\"a\":\"x\ny\"}"[..]))
        );
    }

    #[test]
    fn config_errors_are_reported_before_anything_starts() {
        let events = Events::with_writer(None);
        let (ob, d) = outbox("cfg");
        let cfg = MqttConfig {
            qos: 2,
            ..MqttConfig::default()
        };
        assert!(matches!(
            MqttSink::start(&cfg, ob.clone(), &events, &[]),
            Err(MqttError::Qos(2))
        ));
        let cfg = MqttConfig {
            user: Some("u".into()),
            password_env: Some("PERCEPT_TEST_SURELY_UNSET_PASSWORD".into()),
            ..MqttConfig::default()
        };
        let err = MqttSink::start(&cfg, ob, &events, &[])
            .err()
            .map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("[mqtt] password_env names PERCEPT_TEST_SURELY_UNSET_PASSWORD, which is not set in the environment")
        );
        let _ = std::fs::remove_dir_all(d);
    }

    /// Nothing listens on the port: start returns at once, emitting never blocks, nothing
    /// is dropped (every event waits in the outbox), and stop is bounded.
    #[test]
    fn a_missing_broker_costs_nothing_and_loses_nothing() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let events = Events::with_writer(None);
        let (ob, d) = outbox("missing");
        let cfg = MqttConfig {
            enabled: true,
            port,
            ..MqttConfig::default()
        };
        let sink = MqttSink::start(&cfg, ob, &events, &[]).unwrap();
        let t = Instant::now();
        let n = 2000;
        for i in 0..n {
            events.emit(Event::new(
                "door",
                i as f64,
                None,
                crate::event::Body::Gap {
                    reason: "test".into(),
                },
            ));
        }
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        let s = sink.stats();
        assert!(!s.connected);
        assert_eq!(s.dropped, 0, "{s:?}");
        assert_eq!(s.pending, n, "{s:?}");
        let t = Instant::now();
        let s = sink.stop();
        assert!(t.elapsed() <= STOP_FLUSH + Duration::from_millis(900));
        assert_eq!(s.published, 0);
        assert_eq!(s.pending, n);
        // Still on disk for the next start.
        assert_eq!(Outbox::open(&d, 1 << 30).unwrap().len() as u64, n);
        let _ = std::fs::remove_dir_all(d);
    }
}
