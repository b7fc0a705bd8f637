//! Alert webhooks: each alert is POSTed as JSON (the event line, with its `id`) to every
//! configured URL, at least once.
//!
//! Each receiver has its own durable queue (`<[outbox] dir>/webhook-<hash of the URL>`, see
//! [`crate::sink::outbox`]) filled before the alert reaches the events file, and its own
//! thread: an alert leaves the queue only when the receiver answered 2xx. A receiver that is
//! down is retried with a backoff doubling from 250 ms to at most 30 s, in order, while the
//! others go on undisturbed; after `[alerts] webhook_attempts` failed attempts one `error`
//! event says so (once per outage) and the retries go on. A 4xx answer other than 408/429
//! means the receiver refuses that alert: after the attempts it is dropped and reported.
//! What is queued at exit stays on disk and is sent at the next start.
//!
//! URLs are never written out whole: the path and query often carry the receiver's token,
//! so logs and `error` events name a receiver as `scheme://host:port/…`. Plain `http://` is
//! spoken directly (IPv6 literals included); for `https://` put a TLS-terminating proxy in
//! front (refused at config check time).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use crate::event::{Body, Event};
use crate::sink::outbox::{url_key, Outbox};
use crate::sink::Events;

const TIMEOUT: Duration = Duration::from_secs(5);
/// First retry delay after a failed POST; doubles per failure up to [`BACKOFF_MAX`].
pub const BACKOFF_START: Duration = Duration::from_millis(250);
pub const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Longest `stop` waits for the queues to empty; what is left is sent at the next start.
pub const STOP_FLUSH: Duration = Duration::from_secs(2);

struct Receiving {
    outbox: Outbox,
    handle: Option<JoinHandle<()>>,
    done: Receiver<()>,
}

/// The running webhook senders; `stop` delivers what it can within [`STOP_FLUSH`].
pub struct Webhooks {
    receivers: Vec<Receiving>,
    stop_tx: Option<Sender<()>>,
}

impl Webhooks {
    /// One queue under `outbox_dir` (of at most `max_bytes`) and one thread per URL; alerts
    /// `events` emits from now on are queued for each.
    pub fn start(
        urls: &[String],
        attempts: u32,
        outbox_dir: &Path,
        max_bytes: u64,
        events: &Events,
    ) -> Result<Webhooks, String> {
        let (stop_tx, stop_rx) = crossbeam_channel::bounded::<()>(0);
        let mut receivers = Vec::new();
        for url in urls {
            let dir = outbox_dir.join(url_key(url));
            let outbox = Outbox::open(&dir, max_bytes)
                .map_err(|e| format!("[outbox] for webhook {}: {e}", redact(url)))?;
            let (done_tx, done) = crossbeam_channel::bounded::<()>(0);
            let sender = Courier {
                url: url.clone(),
                attempts: attempts.max(1),
                outbox: outbox.clone(),
                events: events.clone(),
                stop: stop_rx.clone(),
            };
            let handle = std::thread::Builder::new()
                .name("percept-webhook".into())
                .spawn(move || {
                    sender.run();
                    drop(done_tx);
                })
                .map_err(|e| format!("cannot start a webhook thread: {e}"))?;
            receivers.push(Receiving {
                outbox,
                handle: Some(handle),
                done,
            });
        }
        let outboxes: Vec<Outbox> = receivers.iter().map(|r| r.outbox.clone()).collect();
        events.tap(Arc::new(move |ev: &Event, line: &[u8]| {
            if !matches!(ev.body, Body::Alert { .. }) {
                return;
            }
            for o in &outboxes {
                if let Err(e) = o.push(line) {
                    tracing::error!(error = %e, "Webhook: cannot write to the outbox; alert lost for this receiver.");
                }
            }
        }));
        Ok(Webhooks {
            receivers,
            stop_tx: Some(stop_tx),
        })
    }

    /// Alerts waiting, over all receivers.
    pub fn pending(&self) -> usize {
        self.receivers.iter().map(|r| r.outbox.len()).sum()
    }

    /// Sends what is queued (at most [`STOP_FLUSH`]), then stops; the rest stays queued on
    /// disk for the next start.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let Some(stop) = self.stop_tx.take() else {
            return;
        };
        drop(stop);
        // A POST in progress may take up to its timeout more; it is not waited for.
        let deadline = Instant::now() + STOP_FLUSH + Duration::from_millis(300);
        for r in &mut self.receivers {
            if let Err(RecvTimeoutError::Timeout) = r.done.recv_deadline(deadline) {
                continue;
            }
            if let Some(h) = r.handle.take() {
                let _ = h.join();
            }
        }
        let pending = self.pending();
        if pending > 0 {
            tracing::warn!(
                pending,
                "Webhooks: undelivered alerts wait in the outbox for the next start."
            );
        }
    }
}

impl Drop for Webhooks {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// One receiver's sender thread.
struct Courier {
    url: String,
    attempts: u32,
    outbox: Outbox,
    events: Events,
    stop: Receiver<()>,
}

impl Courier {
    fn run(self) {
        let wake = self.outbox.wakeups();
        let mut stop_at: Option<Instant> = None;
        let mut failures = 0u32;
        let mut backoff = BACKOFF_START;
        let mut reported = false;
        loop {
            if let Some(at) = stop_at {
                if self.outbox.is_empty() || Instant::now() >= at {
                    return;
                }
            }
            let Some(seq) = self.outbox.next_after(None) else {
                crossbeam_channel::select! {
                    recv(wake) -> _ => {}
                    recv(self.stop) -> _ => {
                        if stop_at.is_none() {
                            stop_at = Some(Instant::now() + STOP_FLUSH);
                        }
                    }
                }
                continue;
            };
            let Some(body) = self.outbox.read(seq) else {
                continue;
            };
            let outcome = post(&self.url, &body);
            let refused = match &outcome {
                Ok(code) if (200..300).contains(code) => {
                    self.outbox.ack(seq);
                    if reported {
                        tracing::info!(url = %redact(&self.url), pending = self.outbox.len(), "Webhook receiver accepts alerts again.");
                    }
                    failures = 0;
                    backoff = BACKOFF_START;
                    reported = false;
                    continue;
                }
                // The receiver understood and refused this alert: retrying will not help.
                Ok(code) => (400..500).contains(code) && *code != 408 && *code != 429,
                Err(_) => false,
            };
            failures += 1;
            let why = match outcome {
                Ok(code) => format!("HTTP {code}"),
                Err(e) => e,
            };
            if failures >= self.attempts {
                if refused {
                    self.report(
                        &body,
                        &format!("{why} after {failures} attempt(s); alert dropped"),
                    );
                    self.outbox.ack(seq);
                    failures = 0;
                    backoff = BACKOFF_START;
                    continue;
                }
                if !reported {
                    reported = true;
                    self.report(
                        &body,
                        &format!(
                            "{why} after {failures} attempt(s); alerts wait in the outbox, retrying every {} s at most",
                            BACKOFF_MAX.as_secs()
                        ),
                    );
                }
            }
            // Waiting on the stop channel: a stop shortens the wait to the flush deadline.
            let until = Instant::now() + backoff;
            let until = stop_at.map_or(until, |at| until.min(at));
            if stop_at.is_none() {
                if let Err(RecvTimeoutError::Disconnected) = self.stop.recv_deadline(until) {
                    stop_at = Some(Instant::now() + STOP_FLUSH);
                }
            } else {
                std::thread::sleep(until.saturating_duration_since(Instant::now()));
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }

    /// A log line and an `error` event on the alert's source; the URL redacted.
    fn report(&self, alert: &[u8], what: &str) {
        let v: serde_json::Value = serde_json::from_slice(alert).unwrap_or_default();
        let source = v["source"].as_str().unwrap_or("");
        let t = v["t"].as_f64().unwrap_or(0.0);
        let url = redact(&self.url);
        tracing::warn!(%url, %source, error = %what, "Webhook delivery failed.");
        self.events.emit(Event::new(
            source,
            t,
            None,
            Body::Error {
                message: format!("webhook {url}: {what}"),
                raw: None,
            },
        ));
    }
}

/// `scheme://host:port/…`: never the userinfo, path or query (they may hold tokens).
pub fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(u) => format!(
            "{}://{}{}/…",
            u.scheme(),
            u.host_str().unwrap_or(""),
            u.port_or_known_default()
                .map(|p| format!(":{p}"))
                .unwrap_or_default()
        ),
        Err(_) => "<invalid url>".into(),
    }
}

#[cfg(test)]
fn deliver(url: &str, body: &[u8], attempts: u32) -> Result<(), String> {
    let mut delay = BACKOFF_START;
    let mut seen: Vec<String> = Vec::new();
    for i in 0..attempts {
        match post(url, body) {
            Ok(code) if (200..300).contains(&code) => return Ok(()),
            Ok(code) => seen.push(format!("HTTP {code}")),
            Err(e) => seen.push(e),
        }
        if i + 1 < attempts {
            std::thread::sleep(delay);
            delay = (delay * 2).min(BACKOFF_MAX);
        }
    }
    Err(format!("{} after {attempts} attempt(s)", seen.join("; ")))
}

/// One HTTP/1.1 POST; returns the status code.
fn post(url: &str, body: &[u8]) -> Result<u16, String> {
    let u = url::Url::parse(url).map_err(|e| format!("bad URL: {e}"))?;
    if u.scheme() != "http" {
        return Err("only http:// webhooks are spoken directly".into());
    }
    // For an IPv6 literal this is `[::1]`, as the Host header wants it.
    let host = u.host_str().ok_or("URL has no host")?;
    let port = u.port().unwrap_or(80);
    let addrs = u
        .socket_addrs(|| Some(80))
        .map_err(|e| format!("cannot resolve {host}: {e}"))?;
    let mut last = format!("cannot resolve {host}");
    let mut stream = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, TIMEOUT) {
            Ok(s) => {
                stream = Some(s);
                break;
            }
            Err(e) => last = e.to_string(),
        }
    }
    let mut s = stream.ok_or(last)?;
    s.set_read_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(TIMEOUT))
        .map_err(|e| e.to_string())?;
    let path = match u.query() {
        Some(q) => format!("{}?{q}", u.path()),
        None => u.path().to_string(),
    };
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nUser-Agent: percept\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let mut req = head.into_bytes();
    req.extend_from_slice(body);
    s.write_all(&req).map_err(|e| e.to_string())?;
    // Only the status line matters; read until it is complete.
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while !got.windows(2).any(|w| w == b"\r\n") && got.len() < 4096 {
        let n = s.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&got);
    line.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| "no HTTP status line in the reply".to_string())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn retries_until_the_receiver_accepts() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let h = std::thread::spawn(move || {
            let mut bodies = Vec::new();
            // Other tests' clients may land on this ephemeral port (a port another test
            // freed and keeps dialing): only our POSTs count.
            let mut codes = [500, 200].into_iter();
            let mut code = codes.next();
            while let Some(status) = code {
                let (mut c, _) = l.accept().unwrap();
                c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                // Read the whole request: headers, then Content-Length bytes of body.
                while let Ok(n) = c.read(&mut buf) {
                    req.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&req).into_owned();
                    let complete = text.split_once("\r\n\r\n").is_some_and(|(head, body)| {
                        head.lines()
                            .find_map(|l| l.strip_prefix("Content-Length: "))
                            .and_then(|v| v.parse::<usize>().ok())
                            .is_some_and(|len| body.len() >= len)
                    });
                    if complete || n == 0 {
                        break;
                    }
                }
                if !req.starts_with(b"POST /hook") {
                    continue;
                }
                bodies.push(String::from_utf8_lossy(&req).into_owned());
                let _ = write!(c, "HTTP/1.1 {status} X\r\nContent-Length: 0\r\n\r\n");
                let _ = c.flush();
                code = codes.next();
            }
            bodies
        });
        let url = format!("http://127.0.0.1:{port}/hook?token=secret");
        deliver(&url, br#"{"kind":"alert"}"#, 3).unwrap();
        let bodies = h.join().unwrap();
        assert_eq!(bodies.len(), 2);
        assert!(bodies[1].starts_with("POST /hook?token=secret HTTP/1.1"));
        assert!(bodies[1].ends_with(r#"{"kind":"alert"}"#));
        assert_eq!(redact(&url), format!("http://127.0.0.1:{port}/…"));
        assert_eq!(redact("http://[::1]:81/a?t=1"), "http://[::1]:81/…");
        assert_eq!(redact("http://u:pw@h/x"), "http://h:80/…");
    }

    /// A receiver that records each POST's request line and body and answers `status()`.
    fn receiver(
        l: TcpListener,
        status: Arc<std::sync::atomic::AtomicU16>,
    ) -> crossbeam_channel::Receiver<(String, serde_json::Value)> {
        let (tx, rx) = crossbeam_channel::unbounded();
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(mut c) = c else { continue };
                c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let mut req = Vec::new();
                let mut buf = [0u8; 4096];
                while let Ok(n) = c.read(&mut buf) {
                    req.extend_from_slice(&buf[..n]);
                    let text = String::from_utf8_lossy(&req).into_owned();
                    let complete = text.split_once("\r\n\r\n").is_some_and(|(head, body)| {
                        head.lines()
                            .find_map(|l| l.strip_prefix("Content-Length: "))
                            .and_then(|v| v.parse::<usize>().ok())
                            .is_some_and(|len| body.len() >= len)
                    });
                    if complete || n == 0 {
                        break;
                    }
                }
                let text = String::from_utf8_lossy(&req).into_owned();
                let Some((head, body)) = text.split_once("\r\n\r\n") else {
                    continue;
                };
                let code = status.load(std::sync::atomic::Ordering::SeqCst);
                let _ = write!(c, "HTTP/1.1 {code} X\r\nContent-Length: 0\r\n\r\n");
                let line = head.lines().next().unwrap_or("").to_string();
                if code == 200 {
                    let _ = tx.send((line, serde_json::from_str(body).unwrap_or_default()));
                }
            }
        });
        rx
    }

    fn alert(source: &str, t: f64) -> Event {
        Event::new(
            source,
            t,
            None,
            Body::Alert {
                question: "Is someone at the door?".into(),
                answer: "yes".into(),
                confidence: 0.9,
                evidence: "a person".into(),
                snapshot: None,
            },
        )
    }

    fn outbox_dir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("percept-webhook-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    /// One receiver accepts connections and never answers, one refuses them; the third, on an
    /// IPv6 literal, still gets every alert at once, in order, with its id. The refused one
    /// is reported by an `error` event that does not show the URL's path or query.
    #[test]
    fn a_dead_receiver_never_delays_another() {
        let hung = TcpListener::bind("127.0.0.1:0").unwrap();
        let hung_port = hung.local_addr().unwrap().port();
        let refused_port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let live = TcpListener::bind("[::1]:0").unwrap();
        let live_port = live.local_addr().unwrap().port();
        let got = receiver(live, Arc::new(std::sync::atomic::AtomicU16::new(200)));
        let events = Events::with_writer(None);
        let errors = events.subscribe(64);
        let dir = outbox_dir("dead");
        let urls = vec![
            format!("http://127.0.0.1:{hung_port}/hung"),
            format!("http://127.0.0.1:{refused_port}/secret-path?token=abc123"),
            format!("http://[::1]:{live_port}/hook?token=t"),
        ];
        let hooks = Webhooks::start(&urls, 2, &dir, 1 << 20, &events).unwrap();
        for i in 0..5 {
            events.emit(alert("door", f64::from(i)));
        }
        let t = Instant::now();
        for i in 0..5 {
            let (line, v) = got
                .recv_timeout(Duration::from_secs(3))
                .expect("alert at the live receiver");
            assert_eq!(line, "POST /hook?token=t HTTP/1.1");
            assert_eq!(v["t"], f64::from(i));
            assert!(
                v["id"]
                    .as_str()
                    .unwrap()
                    .ends_with(&format!("-door-{}", i + 1)),
                "{v}"
            );
        }
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
        let err = loop {
            let e = errors
                .recv_timeout(Duration::from_secs(5))
                .expect("an error event");
            if e.kind() == "error" {
                break e;
            }
        };
        let Body::Error { message, .. } = &err.body else {
            unreachable!()
        };
        assert!(
            message.starts_with(&format!("webhook http://127.0.0.1:{refused_port}/…: ")),
            "{message}"
        );
        assert!(message.contains("after 2 attempt(s)"), "{message}");
        assert!(
            !message.contains("secret") && !message.contains("abc123"),
            "{message}"
        );
        assert_eq!(err.source, "door");
        let t = Instant::now();
        hooks.stop();
        assert!(
            t.elapsed() < STOP_FLUSH + Duration::from_secs(1),
            "{:?}",
            t.elapsed()
        );
        drop(hung);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// Alerts a receiver did not take before exit are sent, with their ids, at the next start.
    #[test]
    fn queued_alerts_are_sent_after_a_restart() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let status = Arc::new(std::sync::atomic::AtomicU16::new(503));
        let got = receiver(l, status.clone());
        let dir = outbox_dir("restart");
        let url = vec![format!("http://127.0.0.1:{port}/hook")];
        let events = Events::with_writer(None);
        let hooks = Webhooks::start(&url, 3, &dir, 1 << 20, &events).unwrap();
        let ids: Vec<String> = (0..3)
            .map(|i| {
                let rx = events.subscribe(4);
                events.emit(alert("yard", f64::from(i)));
                rx.recv().unwrap().id.unwrap()
            })
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(hooks.pending(), 3);
        hooks.stop();
        status.store(200, std::sync::atomic::Ordering::SeqCst);
        let events = Events::with_writer(None);
        let hooks = Webhooks::start(&url, 3, &dir, 1 << 20, &events).unwrap();
        for id in &ids {
            let (_, v) = got
                .recv_timeout(Duration::from_secs(5))
                .expect("queued alert");
            assert_eq!(v["id"].as_str(), Some(id.as_str()));
        }
        let t = Instant::now();
        while hooks.pending() > 0 {
            assert!(t.elapsed() < Duration::from_secs(2));
            std::thread::sleep(Duration::from_millis(10));
        }
        hooks.stop();
        let _ = std::fs::remove_dir_all(dir);
    }

    /// `percept config check` names a bad receiver without its path or query either.
    #[test]
    fn config_check_does_not_echo_the_token() {
        let mut cfg = crate::config::Config::default();
        cfg.alerts.webhooks =
            vec!["https://hooks.example:8443/services/T0/B1/s3cr3t?token=abc".into()];
        let problems = cfg.validate().join("; ");
        assert!(
            problems.contains("'https://hooks.example:8443/…' must be an http:// URL"),
            "{problems}"
        );
        assert!(
            !problems.contains("s3cr3t") && !problems.contains("abc"),
            "{problems}"
        );
    }
}
