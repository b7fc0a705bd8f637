//! Alert webhooks: each alert is POSTed as JSON to every configured URL from one background
//! thread, with retries and backoff, so a slow receiver never holds up the model.
//! Plain `http://` is spoken directly; for `https://` put a TLS-terminating proxy in front
//! (refused at config check time).

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use crossbeam_channel::{Sender, TrySendError};

use crate::event::{Body, Event};
use crate::sink::Events;

/// Alerts waiting for delivery before new ones are refused (and reported).
const QUEUE: usize = 256;
const TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub struct Webhooks {
    tx: Sender<Event>,
    events: Events,
}

impl Webhooks {
    pub fn start(urls: Vec<String>, attempts: u32, events: Events) -> Option<Webhooks> {
        if urls.is_empty() {
            return None;
        }
        let (tx, rx) = crossbeam_channel::bounded::<Event>(QUEUE);
        let ev = events.clone();
        let spawned = std::thread::Builder::new()
            .name("percept-webhooks".into())
            .spawn(move || {
                for alert in rx {
                    let body = match serde_json::to_vec(&alert) {
                        Ok(b) => b,
                        Err(_) => continue,
                    };
                    for url in &urls {
                        if let Err(e) = deliver(url, &body, attempts.max(1)) {
                            tracing::warn!(url = %redact(url), error = %e, "Webhook delivery failed.");
                            ev.emit(Event::new(
                                &alert.source,
                                alert.t,
                                None,
                                Body::Error {
                                    message: format!("webhook {}: {e}", redact(url)),
                                    raw: None,
                                },
                            ));
                        }
                    }
                }
            });
        match spawned {
            Ok(_) => Some(Webhooks { tx, events }),
            Err(e) => {
                tracing::error!(error = %e, "Cannot start the webhook thread.");
                None
            }
        }
    }

    pub fn send(&self, alert: Event) {
        if let Err(TrySendError::Full(a)) = self.tx.try_send(alert) {
            self.events.emit(Event::new(
                &a.source,
                a.t,
                None,
                Body::Error {
                    message: format!(
                        "webhook queue full ({QUEUE} alerts waiting): alert not delivered"
                    ),
                    raw: None,
                },
            ));
        }
    }
}

/// The URL without userinfo or query (they may hold tokens).
fn redact(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(u) => {
            format!(
                "{}://{}{}",
                u.scheme(),
                u.host_str().unwrap_or(""),
                u.port().map(|p| format!(":{p}")).unwrap_or_default()
            ) + u.path()
        }
        Err(_) => "<invalid url>".into(),
    }
}

fn deliver(url: &str, body: &[u8], attempts: u32) -> Result<(), String> {
    let mut delay = Duration::from_millis(250);
    let mut seen: Vec<String> = Vec::new();
    for i in 0..attempts {
        match post(url, body) {
            Ok(code) if (200..300).contains(&code) => return Ok(()),
            Ok(code) => seen.push(format!("HTTP {code}")),
            Err(e) => seen.push(e),
        }
        if i + 1 < attempts {
            std::thread::sleep(delay);
            delay *= 2;
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
    let host = u.host_str().ok_or("URL has no host")?;
    let port = u.port().unwrap_or(80);
    let addr = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host}: {e}"))?
        .next()
        .ok_or_else(|| format!("cannot resolve {host}"))?;
    let mut s = TcpStream::connect_timeout(&addr, TIMEOUT).map_err(|e| e.to_string())?;
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
        assert_eq!(redact(&url), format!("http://127.0.0.1:{port}/hook"));
    }
}
