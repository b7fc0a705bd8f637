//! The HTTP surfaces against a real server on a loopback port: the SSE and WebSocket feeds with
//! their filters, the control API over an in-memory `ControlApi`, the frame image, `/healthz`
//! with the model's status, and the web page rendered by headless Chromium.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use percept::config::TaskKind;
use percept::control::{
    AddSource, ControlApi, ControlError, LiveBoard, ModelStatus, SourceInfo, TaskUpdate,
};
use percept::event::{Body, CaptionStatus, Event, SourceState};
use percept::http::{self, AppState, Server};
use percept::ingest::supervisor::StateBoard;
use percept::ingest::VideoFrame;
use percept::metrics::Metrics;
use percept::sink::Events;
use serde_json::Value;

/// The run loop's control surface, in memory.
#[derive(Default)]
struct FakeControl {
    sources: Mutex<Vec<SourceInfo>>,
    shutting_down: std::sync::atomic::AtomicBool,
    reloads: std::sync::atomic::AtomicU32,
}

fn info(name: &str, task: TaskKind, state: SourceState) -> SourceInfo {
    SourceInfo {
        name: name.into(),
        uri: format!("rtsp://cam/{name}"),
        state: Some(state),
        task,
        questions: Vec::new(),
        prompt: None,
    }
}

impl FakeControl {
    fn with(sources: Vec<SourceInfo>) -> Arc<FakeControl> {
        Arc::new(FakeControl {
            sources: Mutex::new(sources),
            ..Default::default()
        })
    }

    fn check_running(&self) -> Result<(), ControlError> {
        if self.shutting_down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(ControlError::ShuttingDown);
        }
        Ok(())
    }
}

impl ControlApi for FakeControl {
    fn list(&self) -> Vec<SourceInfo> {
        self.sources.lock().unwrap().clone()
    }

    fn add(&self, req: AddSource) -> Result<SourceInfo, ControlError> {
        self.check_running()?;
        if req.uri.is_empty() {
            return Err(ControlError::Invalid("uri is empty".into()));
        }
        let name = req.name.unwrap_or_else(|| "unnamed".into());
        let mut all = self.sources.lock().unwrap();
        if all.iter().any(|s| s.name == name) {
            return Err(ControlError::Conflict(format!(
                "a source named '{name}' exists"
            )));
        }
        let s = SourceInfo {
            name,
            uri: req.uri,
            state: None,
            task: req.task.unwrap_or_default(),
            questions: req.questions,
            prompt: req.prompt,
        };
        all.push(s.clone());
        Ok(s)
    }

    fn remove(&self, name: &str) -> Result<(), ControlError> {
        self.check_running()?;
        let mut all = self.sources.lock().unwrap();
        let before = all.len();
        all.retain(|s| s.name != name);
        if all.len() == before {
            return Err(ControlError::NotFound(name.into()));
        }
        Ok(())
    }

    fn set_task(&self, name: &str, update: TaskUpdate) -> Result<SourceInfo, ControlError> {
        self.check_running()?;
        let mut all = self.sources.lock().unwrap();
        let s = all
            .iter_mut()
            .find(|s| s.name == name)
            .ok_or_else(|| ControlError::NotFound(name.into()))?;
        if let Some(t) = update.task {
            s.task = t;
        }
        if let Some(q) = update.questions {
            s.questions = q;
        }
        if update.prompt.is_some() {
            s.prompt = update.prompt;
        }
        Ok(s.clone())
    }

    fn reload(&self) -> Result<(), ControlError> {
        self.check_running()?;
        self.reloads
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
}

struct Running {
    server: Server,
    events: Events,
    live: Arc<LiveBoard>,
}

fn start(control: Option<Arc<dyn ControlApi>>) -> Running {
    let events = Events::with_writer(None);
    let live = Arc::new(LiveBoard::default());
    let server = http::serve(
        "127.0.0.1:0",
        AppState {
            metrics: Arc::new(Metrics::new()),
            board: Arc::new(StateBoard::default()),
            events: events.clone(),
            live: live.clone(),
            control,
        },
    )
    .expect("serve");
    // The page's history follows events from the start (one subscription of its own).
    wait_for("the page's history", || events.subscribers() == 1);
    Running {
        server,
        events,
        live,
    }
}

/// A response read to its end (`Connection: close`).
struct Reply {
    status: u16,
    headers: String,
    body: Vec<u8>,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }
}

fn request(r: &Running, method: &str, path: &str, body: Option<&str>) -> Reply {
    let mut s = TcpStream::connect(r.server.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        r.server.addr,
        body.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("end of headers");
    let headers = String::from_utf8_lossy(&raw[..split]).to_string();
    let status = headers
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status code");
    let mut body = raw[split + 4..].to_vec();
    if headers
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    Reply {
        status,
        headers,
        body,
    }
}

fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let nl = raw.windows(2).position(|w| w == b"\r\n").unwrap();
        let size =
            usize::from_str_radix(std::str::from_utf8(&raw[..nl]).unwrap().trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&raw[nl + 2..nl + 2 + size]);
        raw = &raw[nl + 2 + size + 2..];
    }
}

fn caption(source: &str, text: &str, status: CaptionStatus) -> Event {
    Event::new(
        source,
        3.0,
        Some(4.5),
        Body::Caption {
            text: text.into(),
            status,
        },
    )
}

fn audio(source: &str) -> Event {
    Event::new(
        source,
        1.0,
        Some(1.5),
        Body::Audio {
            level: -20.0,
            voice: true,
            samples: 8000,
        },
    )
}

fn alert(source: &str, question: &str) -> Event {
    Event::new(
        source,
        7.0,
        None,
        Body::Alert {
            question: question.into(),
            answer: "yes".into(),
            confidence: 0.9,
            evidence: "a person in a red coat by the door".into(),
            snapshot: None,
        },
    )
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(5);
    while !ok() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An SSE client reading the chunked stream event by event.
struct SseClient {
    reader: BufReader<TcpStream>,
    pending: String,
}

impl SseClient {
    fn connect(r: &Running, query: &str) -> SseClient {
        let mut s = TcpStream::connect(r.server.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(
            s,
            "GET /v1/events{query} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\n\r\n",
            r.server.addr
        )
        .unwrap();
        let mut reader = BufReader::new(s);
        let mut head = String::new();
        loop {
            let mut line = String::new();
            reader.read_line(&mut line).unwrap();
            if line == "\r\n" {
                break;
            }
            head.push_str(&line);
        }
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: text/event-stream"),
            "{head}"
        );
        SseClient {
            reader,
            pending: String::new(),
        }
    }

    /// The next event (`event:` name, `data:` JSON), skipping keep-alive comments.
    fn next(&mut self) -> (String, Value) {
        loop {
            if let Some(end) = self.pending.find("\n\n") {
                let block: String = self.pending.drain(..end + 2).collect();
                let mut name = None;
                let mut data = None;
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event: ") {
                        name = Some(v.to_string());
                    } else if let Some(v) = line.strip_prefix("data: ") {
                        data = Some(serde_json::from_str(v).unwrap());
                    }
                }
                if let Some(data) = data {
                    return (name.expect("event: line"), data);
                }
                continue;
            }
            // One HTTP chunk: hex size line, bytes, CRLF.
            let mut size = String::new();
            self.reader.read_line(&mut size).unwrap();
            let size = usize::from_str_radix(size.trim(), 16).unwrap();
            assert!(size > 0, "the feed ended");
            let mut buf = vec![0; size + 2];
            self.reader.read_exact(&mut buf).unwrap();
            buf.truncate(size);
            self.pending.push_str(&String::from_utf8(buf).unwrap());
        }
    }
}

#[test]
fn sse_delivers_filtered_events_and_stops_when_the_client_leaves() {
    let r = start(None);
    let mut c = SseClient::connect(&r, "?source=a,c&kind=caption,alert");
    // The page's history and this client.
    assert_eq!(r.events.subscribers(), 2);
    // In emit order: only the third and the last two pass the filter.
    r.events.emit(audio("a"));
    r.events
        .emit(caption("b", "not for me", CaptionStatus::Final));
    r.events
        .emit(caption("a", "hello from a", CaptionStatus::Partial));
    r.events.emit(Event::new(
        "a",
        5.0,
        None,
        Body::TextSummary {
            text: "a summary".into(),
            windows: 1,
            frames: 0,
            transcript_lines: 1,
        },
    ));
    r.events.emit(alert("c", "Is someone at the door?"));
    r.events
        .emit(caption("a", "hello from a, final", CaptionStatus::Final));

    let (name, e) = c.next();
    assert_eq!(name, "caption");
    assert_eq!(e["source"], "a");
    assert_eq!(e["kind"], "caption");
    assert_eq!(e["text"], "hello from a");
    assert_eq!(e["status"], "partial");
    assert_eq!(e["end"], 4.5);
    let (name, e) = c.next();
    assert_eq!(name, "alert");
    assert_eq!(e["source"], "c");
    assert_eq!(e["question"], "Is someone at the door?");
    let (_, e) = c.next();
    assert_eq!(e["text"], "hello from a, final");
    assert_eq!(e["status"], "final");

    // The forwarder notices the closed client on its own and drops its subscription.
    drop(c);
    wait_for("the feed's subscription to end", || {
        r.events.emit(audio("z"));
        r.events.subscribers() == 1
    });
}

#[test]
fn a_stalled_client_never_blocks_emit_and_shutdown_cuts_open_feeds() {
    let r = start(None);
    // Subscribed, but never reads: its buffers fill and it loses events, the emitter does not wait.
    let stalled = SseClient::connect(&r, "");
    let t0 = Instant::now();
    for i in 0..20_000 {
        r.events.emit(caption(
            "a",
            &format!("line {i} {}", "x".repeat(200)),
            CaptionStatus::Partial,
        ));
    }
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "emit took {:?} with a stalled client",
        t0.elapsed()
    );
    // A graceful shutdown with a feed still open ends after the grace period, not never.
    let Running { server, events, .. } = r;
    let t0 = Instant::now();
    drop(server);
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "shutdown took {:?}",
        t0.elapsed()
    );
    drop(stalled);
    wait_for("the stalled feed's subscription to end", || {
        events.emit(audio("z"));
        events.subscribers() == 1
    });
}

#[test]
fn sse_without_filters_gets_every_kind() {
    let r = start(None);
    let mut c = SseClient::connect(&r, "");
    r.events.emit(audio("b"));
    let (name, e) = c.next();
    assert_eq!(name, "audio");
    assert_eq!(e["source"], "b");
    assert_eq!(e["voice"], true);
}

#[test]
fn websocket_delivers_filtered_events_as_text_frames() {
    let r = start(None);
    let stream = TcpStream::connect(r.server.addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let url = format!("ws://{}/v1/ws?source=a&kind=caption", r.server.addr);
    let (mut ws, resp) = tungstenite::client::client(url.as_str(), stream).expect("handshake");
    assert_eq!(resp.status(), 101);
    // The session subscribes just after the upgrade.
    wait_for("the WebSocket subscription", || r.events.subscribers() == 2);
    r.events.emit(audio("a"));
    r.events
        .emit(caption("b", "other source", CaptionStatus::Final));
    r.events
        .emit(caption("a", "over the socket", CaptionStatus::Final));
    let msg = loop {
        match ws.read().expect("read") {
            tungstenite::Message::Text(t) => break t,
            tungstenite::Message::Ping(_) | tungstenite::Message::Pong(_) => continue,
            other => panic!("unexpected frame {other:?}"),
        }
    };
    let e: Value = serde_json::from_str(msg.as_str()).unwrap();
    assert_eq!(e["source"], "a");
    assert_eq!(e["kind"], "caption");
    assert_eq!(e["text"], "over the socket");

    ws.close(None).unwrap();
    let _ = ws.flush();
    drop(ws);
    wait_for("the WebSocket subscription to end", || {
        r.events.emit(audio("z"));
        r.events.subscribers() == 1
    });
}

#[test]
fn control_api_maps_calls_and_errors() {
    let ctl = FakeControl::with(vec![info("door", TaskKind::Watch, SourceState::Running)]);
    let r = start(Some(ctl.clone()));

    let list = request(&r, "GET", "/v1/sources", None);
    assert_eq!(list.status, 200);
    let v = list.json();
    assert_eq!(v.as_array().unwrap().len(), 1);
    assert_eq!(v[0]["name"], "door");
    assert_eq!(v[0]["task"], "watch");
    assert_eq!(v[0]["state"], "running");
    assert!(v[0]["frame"].is_null());

    let add = request(
        &r,
        "POST",
        "/v1/sources",
        Some(r#"{"name":"hall","uri":"rtsp://cam/hall","task":"caption"}"#),
    );
    assert_eq!(add.status, 201, "{}", String::from_utf8_lossy(&add.body));
    assert_eq!(add.json()["name"], "hall");
    assert_eq!(add.json()["task"], "caption");
    assert_eq!(ctl.list().len(), 2);

    let dup = request(
        &r,
        "POST",
        "/v1/sources",
        Some(r#"{"name":"hall","uri":"rtsp://cam/hall"}"#),
    );
    assert_eq!(dup.status, 409);
    assert_eq!(dup.json()["error"], "a source named 'hall' exists");

    let invalid = request(&r, "POST", "/v1/sources", Some(r#"{"uri":""}"#));
    assert_eq!(invalid.status, 400);
    assert_eq!(invalid.json()["error"], "uri is empty");

    let broken = request(&r, "POST", "/v1/sources", Some("{not json"));
    assert_eq!(broken.status, 400);
    let msg = broken.json()["error"].as_str().unwrap().to_string();
    assert!(msg.starts_with("invalid JSON body"), "{msg}");
    assert!(!msg.contains('\n'), "{msg}");

    let unknown = request(
        &r,
        "POST",
        "/v1/sources",
        Some(r#"{"uri":"x","colour":"red"}"#),
    );
    assert_eq!(unknown.status, 400);
    assert!(unknown.json()["error"].as_str().unwrap().contains("colour"));

    let task = request(
        &r,
        "PUT",
        "/v1/sources/door/task",
        Some(r#"{"questions":["Is the gate open?"]}"#),
    );
    assert_eq!(task.status, 200);
    assert_eq!(task.json()["task"], "watch");
    assert_eq!(task.json()["questions"][0], "Is the gate open?");

    let bad_task = request(
        &r,
        "PUT",
        "/v1/sources/door/task",
        Some(r#"{"task":"juggle"}"#),
    );
    assert_eq!(bad_task.status, 400);
    assert!(bad_task.json()["error"]
        .as_str()
        .unwrap()
        .contains("juggle"));

    let missing = request(&r, "PUT", "/v1/sources/nope/task", Some("{}"));
    assert_eq!(missing.status, 404);
    assert_eq!(missing.json()["error"], "no source named 'nope'");

    let del = request(&r, "DELETE", "/v1/sources/hall", None);
    assert_eq!(del.status, 204);
    assert!(del.body.is_empty());
    assert_eq!(request(&r, "DELETE", "/v1/sources/hall", None).status, 404);

    let reload = request(&r, "POST", "/v1/reload", None);
    assert_eq!(reload.status, 200);
    assert_eq!(ctl.reloads.load(std::sync::atomic::Ordering::SeqCst), 1);

    ctl.shutting_down
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let late = request(&r, "POST", "/v1/reload", None);
    assert_eq!(late.status, 503);
    assert_eq!(late.json()["error"], "percept is shutting down");
}

#[test]
fn control_api_without_control_is_503() {
    let r = start(None);
    for (method, path, body) in [
        ("GET", "/v1/sources", None),
        ("POST", "/v1/sources", Some(r#"{"uri":"rtsp://cam/x"}"#)),
        ("DELETE", "/v1/sources/a", None),
        ("PUT", "/v1/sources/a/task", Some("{}")),
        ("POST", "/v1/reload", None),
    ] {
        let reply = request(&r, method, path, body);
        assert_eq!(reply.status, 503, "{method} {path}");
        assert!(reply.json()["error"].is_string(), "{method} {path}");
    }
}

#[test]
fn frame_image_and_model_health() {
    let r = start(None);
    let none = request(&r, "GET", "/v1/sources/door/frame.jpg", None);
    assert_eq!(none.status, 404);
    assert!(none.json()["error"].as_str().unwrap().contains("door"));

    r.live.set_frame("door", test_frame(2.0));
    let img = request(&r, "GET", "/v1/sources/door/frame.jpg", None);
    assert_eq!(img.status, 200);
    assert!(img
        .headers
        .to_ascii_lowercase()
        .contains("content-type: image/jpeg"));
    // The frame, encoded on request: a 320x240 JPEG whose dark square is still there.
    let decoded = image::load_from_memory(&img.body).unwrap().to_rgb8();
    assert_eq!(decoded.dimensions(), (320, 240));
    assert!(decoded.get_pixel(140, 120).0.iter().all(|&c| c < 60));
    assert!(decoded.get_pixel(10, 10).0[2] > 120);

    let ok = request(&r, "GET", "/healthz", None);
    assert_eq!(ok.status, 200);
    assert_eq!(ok.json()["status"], "ok");
    assert_eq!(ok.json()["model"]["status"], "disabled");

    r.live.set_model(ModelStatus::Unavailable {
        id: "google/gemma-4-E2B-it".into(),
        message: "not in the cache".into(),
    });
    let h = request(&r, "GET", "/healthz", None);
    assert_eq!(h.status, 200);
    let v = h.json();
    assert_eq!(v["status"], "degraded");
    assert_eq!(v["model"]["status"], "unavailable");
    assert_eq!(v["model"]["id"], "google/gemma-4-E2B-it");
}

#[test]
fn page_is_self_contained() {
    let r = start(None);
    let page = request(&r, "GET", "/", None);
    assert_eq!(page.status, 200);
    let html = String::from_utf8(page.body).unwrap();
    assert!(html.contains("new EventSource(api(\"/v1/events"));
    // Offline machines: nothing may come from elsewhere.
    assert!(!html.contains("http://") && !html.contains("https://"));
    // Model text never goes through the HTML parser.
    assert!(!html.contains("innerHTML"));
    assert!(!html.contains("insertAdjacentHTML"));
}

/// A 320x240 colour gradient with a dark square, as JPEG.
fn test_frame(t: f64) -> Arc<VideoFrame> {
    let img = image::RgbImage::from_fn(320, 240, |x, y| {
        if (100..180).contains(&x) && (80..160).contains(&y) {
            image::Rgb([20, 20, 20])
        } else {
            image::Rgb([(x * 255 / 320) as u8, (y * 255 / 240) as u8, 160])
        }
    });
    Arc::new(VideoFrame {
        t,
        width: 320,
        height: 240,
        rgb: img.into_raw(),
        captured: Instant::now(),
    })
}

/// What Chromium rendered: the DOM once the live events show, and a 1024x768 screenshot.
struct Rendered {
    dom: String,
    img: image::RgbImage,
}

/// Two sources (one with a frame) behind a fake control; once the page subscribes to the feed
/// it gets a state change, captions, a description and an alert.
///
/// Driven over the DevTools protocol rather than `--dump-dom`/`--screenshot`: those wait for
/// the network to go idle under `--virtual-time-budget`, and a live SSE feed never does (they
/// hang), while without the budget they capture the page before any event arrived.
fn render_page() -> Option<Rendered> {
    let ctl = FakeControl::with(vec![
        SourceInfo {
            questions: vec!["Is someone at the door?".into()],
            ..info("door", TaskKind::Watch, SourceState::Running)
        },
        info("meeting", TaskKind::Caption, SourceState::Connecting),
    ]);
    let r = start(Some(ctl.clone()));
    r.live.set_frame("door", test_frame(6.0));
    r.live
        .describe_frame("door", 6.0, "A grey door with a dark square window.");
    let dir = crate::common::tmpdir("chromium");
    let url = format!("http://{}/", r.server.addr);
    let mut b = crate::browser::Browser::launch(&url, &dir)?;
    b.viewport(1024, 768, false);
    // The page's own EventSource is the only subscriber.
    wait_long("the page to subscribe", || r.events.subscribers() >= 2);
    // As the run loop would: the board and the feed agree on the new state.
    ctl.sources.lock().unwrap()[1].state = Some(SourceState::Running);
    // Emitted again every few seconds until the page shows them: on a loaded machine the
    // page may build its source cards (from /v1/sources) after its feed has connected,
    // and it does not replay events it got before a card existed.
    let emit_all = || {
        r.events.emit(Event::new(
            "meeting",
            0.0,
            None,
            Body::State {
                state: SourceState::Running,
                reason: None,
                attempt: None,
                retry_in: None,
                governor: None,
                shard: None,
            },
        ));
        r.events.emit(caption(
            "meeting",
            "Welcome everyone to the weekly review.",
            CaptionStatus::Final,
        ));
        r.events.emit(caption(
            "meeting",
            "<b id=\"evil\">not markup</b>",
            CaptionStatus::Partial,
        ));
        r.events.emit(Event::new(
            "door",
            6.0,
            None,
            Body::Description {
                text: "A courier waits at the grey door.".into(),
                frames: 1,
                soft_tokens: 280,
                model_ms: 850.0,
                batch: 1,
                latency_ms: 900.0,
            },
        ));
        r.events.emit(alert("door", "Is someone at the door?"));
    };
    emit_all();
    let mut last = Instant::now();

    wait_long(
        "the events, the frame and the source list to render",
        || {
            if last.elapsed() > Duration::from_secs(3) {
                emit_all();
                last = Instant::now();
            }
            b.eval(
                "document.body.innerText.includes('Is someone at the door?') \
                 && document.body.innerText.includes('A courier waits') \
                 && document.querySelector('[data-source=door] img').naturalWidth > 0 \
                 && document.querySelector('[data-source=meeting] .badge.running') !== null \
                 && document.body.innerText.includes('task: watch | Is someone at the door?') \
                 && document.body.innerText.includes('Welcome everyone to the weekly review.') \
                 && document.body.innerText.includes('a person in a red coat by the door')",
            ) == Value::Bool(true)
        },
    );
    let dom = b
        .eval("document.documentElement.outerHTML")
        .as_str()
        .unwrap()
        .to_string();
    let img = b.screenshot(&dir.join("page.png"));
    Some(Rendered { dom, img })
}

fn wait_long(what: &str, mut ok: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(60);
    while !ok() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn page_renders_live_events_in_headless_chromium() {
    let Some(page) = render_page() else { return };
    let dom = &page.dom;
    for text in [
        "Welcome everyone to the weekly review.",
        "A courier waits at the grey door.",
        "Is someone at the door?",
        "a person in a red coat by the door",
        "task: watch | Is someone at the door?",
        "meeting",
    ] {
        assert!(dom.contains(text), "{text:?} not in the page:\n{dom}");
    }
    // The state event moved the meeting's badge from connecting to running.
    assert!(!dom.contains(r#"class="badge connecting""#), "{dom}");
    assert!(dom.contains(r#"class="badge running""#), "{dom}");
    // Model text is text, never markup.
    assert!(
        dom.contains("&lt;b id=\"evil\"&gt;not markup&lt;/b&gt;"),
        "{dom}"
    );
    assert!(!dom.contains("<b id=\"evil\">"), "{dom}");

    // The screenshot: right size, and a rendered page rather than a blank or error page.
    let img = &page.img;
    assert_eq!((img.width(), img.height()), (1024, 768));
    let background = image::Rgb([0xf3, 0xf4, 0xf6]);
    let header = image::Rgb([0x1f, 0x29, 0x37]);
    let alert_red = image::Rgb([0xdc, 0x26, 0x26]);
    let mut colours = std::collections::HashSet::new();
    let (mut not_background, mut header_px, mut red_px) = (0usize, 0usize, 0usize);
    for p in img.pixels() {
        colours.insert(p.0);
        not_background += usize::from(*p != background);
        header_px += usize::from(*p == header);
        red_px += usize::from(*p == alert_red);
    }
    let total = (img.width() * img.height()) as usize;
    // Cards, text and the JPEG frame give many colours; a blank or error page a handful.
    assert!(colours.len() > 200, "only {} colours", colours.len());
    assert!(
        not_background * 5 > total,
        "{not_background} of {total} pixels differ from the background"
    );
    // The styled header bar and the alert's red border are drawn.
    assert!(header_px > 1024 * 20, "{header_px} header pixels");
    assert!(red_px > 50, "{red_px} alert-red pixels");
}
