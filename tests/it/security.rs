//! Network safety (README "Security"): the token, Host and Origin checks, what the API may
//! open, the feed client cap, secrets kept out of errors and logs, config bounds and the unit
//! file.
//! Servers listen on ephemeral loopback ports; `percept run` processes use `--no-model`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use percept::config::HttpConfig;
use percept::control::{AddSource, ControlApi, ControlError, LiveBoard, SourceInfo, TaskUpdate};
use percept::event::{Body, Event};
use percept::http::{self, AppState, Server};
use percept::ingest::supervisor::StateBoard;
use percept::metrics::Metrics;
use percept::sink::Events;

use crate::common::*;

/// Accepts every call, remembering the URIs it was asked to open.
#[derive(Default)]
struct OpenAll {
    added: Mutex<Vec<String>>,
}

impl ControlApi for OpenAll {
    fn list(&self) -> Vec<SourceInfo> {
        Vec::new()
    }
    fn add(&self, req: AddSource) -> Result<SourceInfo, ControlError> {
        self.added.lock().unwrap().push(req.uri.clone());
        Ok(SourceInfo {
            name: req.name.unwrap_or_else(|| "x".into()),
            uri: req.uri,
            state: None,
            task: req.task.unwrap_or_default(),
            questions: req.questions,
            prompt: req.prompt,
        })
    }
    fn remove(&self, _: &str) -> Result<(), ControlError> {
        Ok(())
    }
    fn set_task(&self, name: &str, _: TaskUpdate) -> Result<SourceInfo, ControlError> {
        Err(ControlError::NotFound(name.into()))
    }
    fn reload(&self) -> Result<(), ControlError> {
        Ok(())
    }
}

struct Running {
    server: Server,
    events: Events,
    control: Arc<OpenAll>,
}

impl Running {
    fn addr(&self) -> SocketAddr {
        self.server.addr
    }
    fn host(&self) -> String {
        self.server.addr.to_string()
    }
}

fn start(cfg: HttpConfig) -> Running {
    let events = Events::with_writer(None);
    let control = Arc::new(OpenAll::default());
    let server = http::serve_with(
        &HttpConfig {
            listen: "127.0.0.1:0".into(),
            ..cfg
        },
        AppState {
            metrics: Arc::new(Metrics::new()),
            board: Arc::new(StateBoard::default()),
            events: events.clone(),
            live: Arc::new(LiveBoard::default()),
            control: Some(control.clone()),
        },
    )
    .expect("serve");
    Running {
        server,
        events,
        control,
    }
}

fn with_token(token: &str) -> HttpConfig {
    HttpConfig {
        token: Some(token.into()),
        ..HttpConfig::default()
    }
}

struct Reply {
    status: u16,
    headers: String,
    body: String,
}

/// One request; `Host` is the server's address unless `headers` names one. Reads the head
/// and, unless the reply is a stream (feeds, upgrades), the body to its end.
fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> (Reply, TcpStream) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut head = format!("{method} {path} HTTP/1.1\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        head.push_str(&format!("Host: {addr}\r\n"));
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    let body = body.unwrap_or("");
    if !body.is_empty() || method != "GET" {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("Connection: close\r\n\r\n");
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body.as_bytes()).unwrap();
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
            break;
        }
        head.push_str(&line);
    }
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    let lower = head.to_ascii_lowercase();
    let streaming = status == 101 || lower.contains("content-type: text/event-stream");
    let mut body = String::new();
    if !streaming {
        let mut raw = Vec::new();
        reader.read_to_end(&mut raw).unwrap();
        body = String::from_utf8_lossy(&raw).into_owned();
        if lower.contains("transfer-encoding: chunked") {
            body = dechunk(&body);
        }
    }
    (
        Reply {
            status,
            headers: head,
            body,
        },
        s,
    )
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&rest[..n]);
        s = &rest[n + 2..];
    }
    out
}

fn get(r: &Running, path: &str, headers: &[(&str, &str)]) -> Reply {
    send(r.addr(), "GET", path, headers, None).0
}

fn post_json(r: &Running, path: &str, headers: &[(&str, &str)], body: &str) -> Reply {
    let mut h = vec![("Content-Type", "application/json")];
    h.extend_from_slice(headers);
    send(r.addr(), "POST", path, &h, Some(body)).0
}

const WS_HEADERS: [(&str, &str); 4] = [
    ("Upgrade", "websocket"),
    ("Connection", "Upgrade"),
    ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ("Sec-WebSocket-Version", "13"),
];

/// A WebSocket handshake to `path` with `extra` headers; the open stream when it is 101.
fn ws(r: &Running, path: &str, extra: &[(&str, &str)]) -> (Reply, TcpStream) {
    // `Connection: Upgrade` replaces the default close.
    let mut s = TcpStream::connect(r.addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut head = format!("GET {path} HTTP/1.1\r\n");
    if !extra.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        head.push_str(&format!("Host: {}\r\n", r.host()));
    }
    for (k, v) in WS_HEADERS.iter().chain(extra) {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    let mut reader = BufReader::new(s.try_clone().unwrap());
    let mut head = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
            break;
        }
        head.push_str(&line);
    }
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    let mut body = String::new();
    if status != 101 {
        // The connection stays open (no `Connection: close`): read just the body.
        let length = head
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("content-length:")
                    .map(|v| v.trim().parse::<usize>().unwrap())
            })
            .unwrap_or(0);
        let mut raw = vec![0; length];
        reader.read_exact(&mut raw).unwrap();
        body = String::from_utf8(raw).unwrap();
    }
    (
        Reply {
            status,
            headers: head,
            body,
        },
        s,
    )
}

fn error_line(reply: &Reply) -> String {
    let v: serde_json::Value = serde_json::from_str(&reply.body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", reply.body));
    let e = v["error"].as_str().expect("error field").to_string();
    assert!(!e.contains('\n'), "{e}");
    e
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(10);
    while !ok() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

const EVIL: &str = "http://evil.example";

#[test]
fn websocket_and_sse_from_another_origin_are_403() {
    let r = start(HttpConfig::default());
    // The page's history holds one subscription of its own.
    let before = r.events.subscribers();
    let (reply, _) = ws(&r, "/v1/ws", &[("Origin", EVIL)]);
    assert_eq!(reply.status, 403, "{}", reply.headers);
    assert!(error_line(&reply).contains("allowed_origins"));
    let (reply, _) = ws(&r, "/v1/ws", &[("Origin", "null")]);
    assert_eq!(reply.status, 403);
    let reply = get(&r, "/v1/events", &[("Origin", EVIL)]);
    assert_eq!(reply.status, 403);
    assert_eq!(
        r.events.subscribers(),
        before,
        "a refused client never subscribes"
    );
    // The server's own page may.
    let own = format!("http://{}", r.host());
    let (reply, _ws_stream) = ws(&r, "/v1/ws", &[("Origin", own.as_str())]);
    assert_eq!(reply.status, 101, "{}", reply.headers);
    let (reply, _sse_stream) = send(r.addr(), "GET", "/v1/events", &[("Origin", &own)], None);
    assert_eq!(reply.status, 200, "{}", reply.headers);
    // And so may a listed origin.
    let r = start(HttpConfig {
        allowed_origins: vec!["https://dash.example".into()],
        ..HttpConfig::default()
    });
    let (reply, _s) = ws(&r, "/v1/ws", &[("Origin", "https://dash.example")]);
    assert_eq!(reply.status, 101);
    let (reply, _) = ws(&r, "/v1/ws", &[("Origin", EVIL)]);
    assert_eq!(reply.status, 403);
}

#[test]
fn state_changing_routes_refuse_other_origins_before_anything_else() {
    let r = start(HttpConfig {
        api_schemes: vec!["test".into()],
        ..HttpConfig::default()
    });
    let evil = [("Origin", EVIL)];
    let reply = post_json(&r, "/v1/sources", &evil, r#"{"uri": "test:"}"#);
    assert_eq!(reply.status, 403, "{}", reply.body);
    let reply = post_json(&r, "/v1/reload", &evil, "{}");
    assert_eq!(reply.status, 403);
    let (reply, _) = send(r.addr(), "DELETE", "/v1/sources/a", &evil, None);
    assert_eq!(reply.status, 403);
    let (reply, _) = send(
        r.addr(),
        "PUT",
        "/v1/sources/a/task",
        &[("Origin", EVIL), ("Content-Type", "application/json")],
        Some("{}"),
    );
    assert_eq!(reply.status, 403);
    assert!(r.control.added.lock().unwrap().is_empty());
    // Same request from the server's own origin goes through.
    let own = format!("http://{}", r.host());
    let reply = post_json(
        &r,
        "/v1/sources",
        &[("Origin", &own)],
        r#"{"uri": "test:"}"#,
    );
    assert_eq!(reply.status, 201, "{}", reply.body);
}

#[test]
fn foreign_host_headers_are_403_on_every_route() {
    let r = start(HttpConfig {
        allowed_hosts: vec!["nvr.lan".into()],
        ..HttpConfig::default()
    });
    let port = r.addr().port();
    let evil = format!("evil.example:{port}");
    for path in ["/", "/healthz", "/metrics", "/v1/sources", "/v1/events"] {
        let reply = get(&r, path, &[("Host", &evil)]);
        assert_eq!(reply.status, 403, "{path}");
        let e = error_line(&reply);
        assert!(e.contains("allowed_hosts"), "{e}");
    }
    let (reply, _) = ws(&r, "/v1/ws", &[("Host", &evil)]);
    assert_eq!(reply.status, 403);
    // Loopback of another port is someone else's name.
    let other = format!("127.0.0.1:{}", port.wrapping_add(1));
    assert_eq!(get(&r, "/healthz", &[("Host", &other)]).status, 403);
    for ok in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("[::1]:{port}"),
        "nvr.lan".to_string(),
        format!("nvr.lan:{port}"),
    ] {
        assert_eq!(get(&r, "/healthz", &[("Host", &ok)]).status, 200, "{ok}");
    }
}

#[test]
fn token_is_required_everywhere_but_healthz() {
    // base64-style: `+`, `/` and `=` are pasted into URLs as they are.
    let token = "t0k3n+for/tests=";
    let r = start(with_token(token));
    let bearer = format!("Bearer {token}");
    assert_eq!(get(&r, "/healthz", &[]).status, 200);
    for path in [
        "/",
        "/metrics",
        "/v1/sources",
        "/v1/events",
        "/v1/sources/a/frame.jpg",
    ] {
        let reply = get(&r, path, &[]);
        assert_eq!(reply.status, 401, "{path}");
        assert!(
            reply
                .headers
                .to_ascii_lowercase()
                .contains("www-authenticate: bearer"),
            "{}",
            reply.headers
        );
        assert!(!reply.body.contains(token));
        let wrong = get(&r, path, &[("Authorization", "Bearer t0k3n+for/testz=")]);
        assert_eq!(wrong.status, 401, "{path}");
    }
    let (reply, _) = ws(&r, "/v1/ws", &[]);
    assert_eq!(reply.status, 401);
    assert_eq!(post_json(&r, "/v1/reload", &[], "{}").status, 401);
    // The right token opens every route.
    assert_eq!(
        get(&r, "/metrics", &[("Authorization", &bearer)]).status,
        200
    );
    assert_eq!(
        get(&r, "/v1/sources", &[("Authorization", &bearer)]).status,
        200
    );
    assert_eq!(
        post_json(&r, "/v1/reload", &[("Authorization", &bearer)], "{}").status,
        200
    );
    // ?token= works where browsers cannot set headers (feeds, the page), and only there.
    let (sse, _s) = send(
        r.addr(),
        "GET",
        &format!("/v1/events?kind=alert&token={token}"),
        &[],
        None,
    );
    assert_eq!(sse.status, 200, "{}", sse.headers);
    let (reply, _w) = ws(&r, &format!("/v1/ws?token={token}"), &[]);
    assert_eq!(reply.status, 101);
    assert_eq!(
        get(&r, &format!("/v1/sources?token={token}"), &[]).status,
        401
    );
    assert_eq!(get(&r, "/v1/events?token=nope", &[]).status, 401);
    // The page opened with ?token= gets a cookie its images and calls then carry.
    let page = get(&r, &format!("/?token={token}"), &[]);
    assert_eq!(page.status, 200);
    let cookie = page
        .headers
        .lines()
        .find_map(|l| {
            l.strip_prefix("set-cookie: ")
                .or_else(|| l.strip_prefix("Set-Cookie: "))
        })
        .expect("the page sets a cookie")
        .to_string();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let pair = cookie.split(';').next().unwrap().to_string();
    assert_eq!(get(&r, "/v1/sources", &[("Cookie", &pair)]).status, 200);
    assert_eq!(get(&r, "/v1/events", &[("Cookie", &pair)]).status, 200);
    // 404: authorised, and there is no frame yet.
    assert_eq!(
        get(&r, "/v1/sources/a/frame.jpg", &[("Cookie", &pair)]).status,
        404
    );
    assert_eq!(
        get(&r, "/v1/sources", &[("Cookie", "percept_token_1=00")]).status,
        401
    );
    // A wrong ?token= gets no cookie.
    let page = get(&r, "/?token=wrong", &[]);
    assert_eq!(page.status, 401);
    assert!(!page.headers.to_ascii_lowercase().contains("set-cookie"));
}

#[test]
fn reload_takes_only_a_json_body() {
    let r = start(HttpConfig::default());
    for ct in [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
    ] {
        let (reply, _) = send(
            r.addr(),
            "POST",
            "/v1/reload",
            &[("Content-Type", ct)],
            Some("a=b"),
        );
        assert_eq!(reply.status, 415, "{ct}");
        assert!(error_line(&reply).contains("application/json"));
    }
    let (reply, _) = send(r.addr(), "POST", "/v1/reload", &[], None);
    assert_eq!(reply.status, 415);
    let reply = post_json(&r, "/v1/reload", &[], "not json");
    assert_eq!(reply.status, 400);
    assert_eq!(post_json(&r, "/v1/reload", &[], "{}").status, 200);
    assert_eq!(post_json(&r, "/v1/reload", &[], "").status, 200);
}

#[test]
fn api_opens_only_listed_schemes() {
    let r = start(HttpConfig::default());
    for uri in [
        "file:///etc/passwd",
        "/etc/passwd",
        "x=file:///etc/passwd",
        "v4l2:///dev/video0",
        "pulse://",
        "alsa://default",
        "test:?live=true",
    ] {
        let body = serde_json::json!({ "uri": uri }).to_string();
        let reply = post_json(&r, "/v1/sources", &[], &body);
        assert_eq!(reply.status, 403, "{uri}: {}", reply.body);
        let e = error_line(&reply);
        assert!(e.contains("api_schemes"), "{e}");
    }
    assert!(r.control.added.lock().unwrap().is_empty());
    for uri in [
        "rtsp://cam/x",
        "rtsps://cam/x",
        "http://cam/x.m3u8",
        "https://cam/x.mp4",
    ] {
        let body = serde_json::json!({ "uri": uri }).to_string();
        assert_eq!(
            post_json(&r, "/v1/sources", &[], &body).status,
            201,
            "{uri}"
        );
    }
    // Listed schemes open.
    let r = start(HttpConfig {
        api_schemes: vec!["file".into(), "test".into()],
        ..HttpConfig::default()
    });
    for uri in ["/tmp/a.mp4", "test:"] {
        let body = serde_json::json!({ "uri": uri }).to_string();
        assert_eq!(
            post_json(&r, "/v1/sources", &[], &body).status,
            201,
            "{uri}"
        );
    }
    let reply = post_json(&r, "/v1/sources", &[], r#"{"uri": "rtsp://cam/x"}"#);
    assert_eq!(reply.status, 403);
}

#[test]
fn feed_clients_are_capped_and_slots_come_back() {
    let r = start(HttpConfig {
        max_feed_clients: 2,
        ..HttpConfig::default()
    });
    let (a, sse_a) = send(r.addr(), "GET", "/v1/events", &[], None);
    assert_eq!(a.status, 200);
    let (b, _ws_b) = ws(&r, "/v1/ws", &[]);
    assert_eq!(b.status, 101);
    let (c, _) = send(r.addr(), "GET", "/v1/events", &[], None);
    assert_eq!(c.status, 503);
    assert!(error_line(&c).contains("max_feed_clients"));
    let (d, _) = ws(&r, "/v1/ws", &[]);
    assert_eq!(d.status, 503);
    // Other routes are not counted.
    assert_eq!(get(&r, "/healthz", &[]).status, 200);
    // A client that leaves frees its slot (noticed on the next event written to it).
    drop(sse_a);
    wait_for("a free feed slot", || {
        r.events.emit(Event::new(
            "z",
            0.0,
            None,
            Body::Error {
                message: "ping".into(),
                raw: None,
            },
        ));
        let (e, _s) = send(r.addr(), "GET", "/v1/events", &[], None);
        e.status == 200
    });
}

#[test]
fn exposed_listen_without_token_exits_2_naming_token() {
    let d = tmpdir("sec-exposed");
    let out = Command::new(percept_bin())
        .args([
            "run",
            "--listen",
            "0.0.0.0:0",
            "--no-model",
            "--source",
            "test:?duration=1",
        ])
        .arg("--events")
        .arg(d.join("e.jsonl"))
        .env_remove("PERCEPT_HTTP_TOKEN")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].contains("token"), "{err}");
}

/// `percept run` with stderr read on a thread; the first `addr=` it logs is where it serves.
struct Proc {
    child: std::process::Child,
    stderr: Arc<Mutex<String>>,
}

impl Proc {
    fn spawn(args: &[&str], envs: &[(&str, &str)]) -> Proc {
        let mut cmd = Command::new(percept_bin());
        cmd.arg("run")
            .args(args)
            .env_remove("PERCEPT_HTTP_TOKEN")
            .env("NO_COLOR", "1");
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = Arc::new(Mutex::new(String::new()));
        let pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        Proc { child, stderr }
    }

    fn port(&self) -> u16 {
        let mut port = None;
        wait_for("the server's address in the log", || {
            let s = self.stderr.lock().unwrap();
            port = s
                .split("addr=")
                .nth(1)
                .and_then(|rest| rest.split_whitespace().next())
                .and_then(|a| a.rsplit(':').next())
                .and_then(|p| p.trim_matches(|c: char| !c.is_ascii_digit()).parse().ok());
            port.is_some()
        });
        port.unwrap()
    }

    fn stop(mut self) -> String {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let until = Instant::now() + Duration::from_secs(20);
        while self.child.try_wait().unwrap().is_none() {
            assert!(Instant::now() < until, "percept did not stop");
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(100));
        let s = self.stderr.lock().unwrap().clone();
        s
    }
}

#[test]
fn exposed_listen_with_env_token_serves_with_auth() {
    let d = tmpdir("sec-env-token");
    let events = d.join("e.jsonl");
    let token = "env-token-123456";
    let p = Proc::spawn(
        &[
            "--listen",
            "0.0.0.0:0",
            "--no-model",
            "--events",
            events.to_str().unwrap(),
            "--source",
            "a=test:?live=true&width=64&height=64&fps=5",
        ],
        &[("PERCEPT_HTTP_TOKEN", token)],
    );
    let addr: SocketAddr = format!("127.0.0.1:{}", p.port()).parse().unwrap();
    let (h, _) = send(addr, "GET", "/healthz", &[], None);
    assert_eq!(h.status, 200);
    let evil = format!("evil.example:{}", addr.port());
    let (h, _) = send(addr, "GET", "/healthz", &[("Host", &evil)], None);
    assert_eq!(h.status, 403);
    // On 0.0.0.0 any address of the machine is its name (what a health probe sends).
    let probe = format!("10.1.2.3:{}", addr.port());
    let (h, _) = send(addr, "GET", "/healthz", &[("Host", &probe)], None);
    assert_eq!(h.status, 200);
    let (s, _) = send(addr, "GET", "/v1/sources", &[], None);
    assert_eq!(s.status, 401);
    let bearer = format!("Bearer {token}");
    let (s, _) = send(
        addr,
        "GET",
        "/v1/sources",
        &[("Authorization", &bearer)],
        None,
    );
    assert_eq!(s.status, 200, "{}", s.body);
    assert!(s.body.contains("\"a\""), "{}", s.body);
    let err = p.stop();
    assert!(!err.contains(token), "the token reached the log: {err}");
}

#[test]
fn reload_error_hides_a_password_and_api_test_sources_are_bounded() {
    let d = tmpdir("sec-reload");
    let cfg = d.join("c.toml");
    let good =
        "[model]\nenabled = false\n[captions]\ndir = \"\"\n[http]\napi_schemes = [\"test\"]\n\
                [[source]]\nname = \"a\"\nuri = \"test:?live=true&width=64&height=64&fps=5\"\n";
    std::fs::write(&cfg, good).unwrap();
    let events = d.join("e.jsonl");
    let p = Proc::spawn(
        &[
            "--listen",
            "127.0.0.1:0",
            "--config",
            cfg.to_str().unwrap(),
            "--events",
            events.to_str().unwrap(),
        ],
        &[],
    );
    let addr: SocketAddr = format!("127.0.0.1:{}", p.port()).parse().unwrap();
    let json = [("Content-Type", "application/json")];

    // A 40000x40000 test source would ask GStreamer for 6.4 GB frames.
    let (reply, _) = send(
        addr,
        "POST",
        "/v1/sources",
        &json,
        Some(r#"{"name": "big", "uri": "test:?width=40000&height=40000"}"#),
    );
    assert_eq!(reply.status, 400, "{}", reply.body);
    assert!(reply.body.contains("width"), "{}", reply.body);

    // An unterminated string on a password line: the reload error names the line, not it.
    let secret = "hunter2-Sup3rSecret";
    std::fs::write(
        &cfg,
        format!(
            "{good}[[source]]\nname = \"door\"\nuri = \"rtsp://cam/x\"\npassword = \"{secret}\n"
        ),
    )
    .unwrap();
    let (reply, _) = send(addr, "POST", "/v1/reload", &json, Some("{}"));
    assert_eq!(reply.status, 400, "{}", reply.body);
    assert!(!reply.body.contains("hunter2"), "{}", reply.body);
    assert!(
        reply.body.contains("syntax error at line 13"),
        "{}",
        reply.body
    );
    // A password of the wrong type is not quoted either.
    std::fs::write(
        &cfg,
        format!("{good}[[source]]\nname = \"door\"\nuri = \"rtsp://cam/x\"\npassword = 98765432\n"),
    )
    .unwrap();
    let (reply, _) = send(addr, "POST", "/v1/reload", &json, Some("{}"));
    assert_eq!(reply.status, 400, "{}", reply.body);
    assert!(!reply.body.contains("98765432"), "{}", reply.body);
    let err = p.stop();
    assert!(
        !err.contains("hunter2") && !err.contains("98765432"),
        "{err}"
    );
}

#[test]
fn debug_logs_never_show_http_credentials() {
    let d = tmpdir("sec-debug-log");
    let cfg = d.join("c.toml");
    std::fs::write(
        &cfg,
        "[reconnect]\nconnect_attempts = 1\ninitial_seconds = 0.1\nmax_seconds = 0.1\n",
    )
    .unwrap();
    // A password (percent-encoded '/' inside) and a signed query: neither may be logged.
    let uri = "cam=https://viewer:pa%2Fss-w0rd@127.0.0.1:9/live.m3u8?sig=S1GNATURE&x=1";
    let out = Command::new(percept_bin())
        .args([
            "run",
            "--no-http",
            "--no-model",
            "--config",
            cfg.to_str().unwrap(),
        ])
        .arg("--events")
        .arg(d.join("e.jsonl"))
        .args(["--source", uri])
        .env("PERCEPT_LOG", "debug")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("Building graph"),
        "the debug line under test: {err}"
    );
    assert!(!err.contains("w0rd"), "{err}");
    assert!(!err.contains("S1GNATURE"), "{err}");
    let events = std::fs::read_to_string(d.join("e.jsonl")).unwrap_or_default();
    assert!(
        !events.contains("w0rd") && !events.contains("S1GNATURE"),
        "{events}"
    );
}

#[test]
fn config_check_bounds_numbers() {
    let d = tmpdir("sec-bounds");
    let bad = d.join("bad.toml");
    std::fs::write(
        &bad,
        "[run]\ndrain_seconds = inf\n[video]\nqueue_frames = 1000000000000\n\
         [audio]\nqueue_seconds = 1e12\n[reconnect]\nmax_seconds = inf\n\
         [governor]\nloud_dbfs = nan\n[http]\napi_schemes = [\"gopher\"]\nmax_feed_clients = 0\n\
         [[source]]\nuri = \"test:?width=40000&height=40000\"\n",
    )
    .unwrap();
    let out = Command::new(percept_bin())
        .args(["config", "check"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    for needle in [
        "[run] drain_seconds must be a finite number, got inf",
        "[video] queue_frames must be at most 1024",
        "[audio] queue_seconds must be at most 600",
        "[reconnect] max_seconds must be a finite number",
        "[governor] loud_dbfs must be a finite number, got NaN",
        "[http] api_schemes: unknown scheme 'gopher'",
        "[http] max_feed_clients must be in 1..=",
        "width and height must be in 16..=7680, got 40000x40000",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
    }
    // `percept run` refuses the same file before starting anything.
    let out = Command::new(percept_bin())
        .args(["run", "--no-http", "--no-model", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn unit_file_gives_a_writable_working_directory() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/percept.service");
    let text = std::fs::read_to_string(path).unwrap();
    let value = |key: &str| {
        text.lines()
            .rev()
            .find_map(|l| l.trim().strip_prefix(&format!("{key}=")))
            .map(str::to_string)
    };
    assert_eq!(value("ProtectSystem").as_deref(), Some("strict"));
    let state = value("StateDirectory").expect("StateDirectory");
    let wd = value("WorkingDirectory")
        .expect("WorkingDirectory: relative captions/ and snapshots/ need one");
    // Under ProtectSystem=strict only the state directory (and ReadWritePaths) is writable.
    let writable: Vec<String> = std::iter::once(format!("/var/lib/{state}"))
        .chain(
            value("ReadWritePaths")
                .map(|v| v.split_whitespace().map(str::to_string).collect())
                .unwrap_or_else(Vec::<String>::new),
        )
        .collect();
    let wd = wd.replace("%S", "/var/lib");
    assert!(
        writable
            .iter()
            .any(|w| wd == *w || wd.starts_with(&format!("{w}/"))),
        "WorkingDirectory {wd} is not writable ({writable:?})"
    );
    // The default config writes captions/ and snapshots/ relative to it.
    let cfg = percept::config::Config::default();
    assert!(std::path::Path::new(&cfg.captions.dir).is_relative());
    assert!(std::path::Path::new(&cfg.alerts.snapshot_dir).is_relative());
}

#[test]
fn rtsp_password_with_plus_and_slash_reaches_the_camera() {
    // A free port: bound and released (the server binds it again at once).
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let password = "a+b/c d";
    let mut server = Command::new(percept_bin())
        .args(["testsrc", "rtsp", "--port", &port.to_string()])
        .args(["--width", "160", "--height", "90", "--fps", "10"])
        .args(["--user", "viewer", "--password", password])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for("the RTSP server", || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let d = tmpdir("sec-rtsp-plus");
    let events = d.join("e.jsonl");
    // '+' typed as is, '/' and ' ' percent-encoded: as a user copies it into a URL.
    let uri = format!("cam=rtsp://viewer:a+b%2Fc%20d@127.0.0.1:{port}/test");
    let p = Proc::spawn(
        &[
            "--no-http",
            "--no-model",
            "--events",
            events.to_str().unwrap(),
            "--source",
            &uri,
        ],
        &[],
    );
    let until = Instant::now() + Duration::from_secs(30);
    let mut frames = 0;
    while Instant::now() < until && frames == 0 {
        frames = of_kind(&read_events(&events), "cam", "frame").len();
        std::thread::sleep(Duration::from_millis(100));
    }
    let err = p.stop();
    let _ = server.kill();
    let _ = server.wait();
    assert!(
        frames > 0,
        "no frame: the password did not authenticate: {err}"
    );
    assert!(!err.contains("a+b"), "{err}");
}
