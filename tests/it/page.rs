//! The live page at `/` in headless Chromium, asserting what a person sees: a real run's
//! pictures change and its audio meters follow a tone and stay down in silence; history from
//! before the page opened, captions in order (partials grey), alerts with their snapshot, a
//! timeline that lists what the JSONL file has, the full-screen captions view, screenshots at
//! desktop and phone sizes without horizontal overflow.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use percept::config::TaskKind;
use percept::control::{AddSource, ControlApi, ControlError, LiveBoard, SourceInfo, TaskUpdate};
use percept::event::{Body, CaptionStatus, Event, SourceState};
use percept::http::{self, AppState};
use percept::ingest::supervisor::StateBoard;
use percept::ingest::VideoFrame;
use percept::metrics::Metrics;
use percept::sink::Events;
use serde_json::Value;

use crate::browser::{richness, Browser};
use crate::common::*;

/// `(status, body)` of a request with `Connection: close`.
fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, raw[split + 4..].to_vec())
}

/// Sources as a run would list them; nothing else is called by the page.
struct Sources(Mutex<Vec<SourceInfo>>);

impl ControlApi for Sources {
    fn list(&self) -> Vec<SourceInfo> {
        self.0.lock().unwrap().clone()
    }
    fn add(&self, _: AddSource) -> Result<SourceInfo, ControlError> {
        Err(ControlError::Invalid("not here".into()))
    }
    fn remove(&self, _: &str) -> Result<(), ControlError> {
        Err(ControlError::Invalid("not here".into()))
    }
    fn set_task(&self, _: &str, _: TaskUpdate) -> Result<SourceInfo, ControlError> {
        Err(ControlError::Invalid("not here".into()))
    }
    fn reload(&self) -> Result<(), ControlError> {
        Ok(())
    }
}

fn source(name: &str, task: TaskKind) -> SourceInfo {
    SourceInfo {
        name: name.into(),
        uri: format!("rtsp://cam/{name}"),
        state: Some(SourceState::Running),
        task,
        questions: Vec::new(),
        prompt: None,
    }
}

/// A 320x240 frame: a gradient with a dark square whose place depends on `t`.
fn frame(t: f64) -> Arc<VideoFrame> {
    let off = (t as u32 * 37) % 200;
    let img = image::RgbImage::from_fn(320, 240, |x, y| {
        if (off..off + 80).contains(&x) && (80..160).contains(&y) {
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

fn state(src: &str) -> Event {
    Event::new(
        src,
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
    )
}

fn caption(src: &str, t: f64, text: &str, status: CaptionStatus) -> Event {
    Event::new(
        src,
        t,
        Some(t + 1.0),
        Body::Caption {
            text: text.into(),
            status,
        },
    )
}

fn description(t: f64, text: &str) -> Event {
    Event::new(
        "door",
        t,
        None,
        Body::Description {
            text: text.into(),
            frames: 1,
            soft_tokens: 280,
            model_ms: 850.0,
            batch: 1,
            latency_ms: 900.0,
        },
    )
}

fn alert(t: f64) -> Event {
    Event::new(
        "door",
        t,
        None,
        Body::Alert {
            question: "Is someone at the door?".into(),
            answer: "yes".into(),
            confidence: 0.9,
            evidence: "a person in a red coat by the door".into(),
            snapshot: None,
        },
    )
}

const TIMELINE_KINDS: [&str; 9] = [
    "alert",
    "description",
    "scene",
    "caption",
    "transcript",
    "summary",
    "state",
    "gap",
    "error",
];

/// The events of a JSONL file the timeline should list: (kind, source), sorted.
fn timeline_of(path: &std::path::Path) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = read_events(path)
        .into_iter()
        .filter(|e| TIMELINE_KINDS.contains(&e["kind"].as_str().unwrap()))
        .filter(|e| e["kind"] != "caption" || e["status"] == "final")
        .filter(|e| e["kind"] != "summary" || e["text"].is_string())
        .map(|e| {
            (
                e["kind"].as_str().unwrap().to_string(),
                e["source"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    v.sort();
    v
}

/// What the page's timeline lists: (kind, source), sorted.
fn timeline_shown(b: &mut Browser) -> Vec<(String, String)> {
    let v = b.eval(
        "Array.from(document.querySelectorAll('#events li')).map(li => [li.dataset.kind, li.dataset.source])",
    );
    let mut out: Vec<(String, String)> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p[0].as_str().unwrap().to_string(),
                p[1].as_str().unwrap().to_string(),
            )
        })
        .collect();
    out.sort();
    out
}

/// Screenshots at desktop and phone size: rendered, and nothing wider than the screen.
/// `min_content`: the share of pixels unlike the most common colour (the captions view is
/// mostly black by design).
fn check_sizes(b: &mut Browser, dir: &std::path::Path, name: &str, min_content: f64) {
    for (w, h, mobile) in [(1280, 800, false), (390, 844, true)] {
        b.viewport(w, h, mobile);
        // Let the layout and the strips redraw at the new size.
        std::thread::sleep(Duration::from_millis(1500));
        let overflow = b.eval(
            "[document.documentElement.scrollWidth, window.innerWidth, \
              Array.from(document.querySelectorAll('body *')).filter(e => e.getBoundingClientRect().right > window.innerWidth + 1 && e.getClientRects().length && !e.closest('#capview')).map(e => e.tagName + '.' + e.className).slice(0, 5)]",
        );
        assert!(
            overflow[0].as_u64().unwrap() <= overflow[1].as_u64().unwrap(),
            "{name} at {w}x{h} scrolls sideways: {overflow}"
        );
        assert_eq!(
            overflow[2].as_array().unwrap().len(),
            0,
            "{name} at {w}x{h}: elements past the right edge: {overflow}"
        );
        let shot = b.screenshot(&dir.join(format!("{name}-{w}x{h}.png")));
        assert_eq!((shot.width(), shot.height()), (w, h));
        let (colours, content) = richness(&shot);
        assert!(colours > 150, "{name} {w}x{h}: only {colours} colours");
        assert!(
            content > min_content,
            "{name} {w}x{h}: {content:.2} of the pixels differ from the background"
        );
    }
    b.viewport(1280, 800, false);
}

#[test]
fn page_shows_history_captions_alerts_and_the_timeline_of_the_jsonl_file() {
    let dir = tmpdir("page-history");
    let jsonl = dir.join("events.jsonl");
    let events = Events::open(jsonl.to_str().unwrap()).unwrap();
    let live = Arc::new(LiveBoard::default());
    let ctl = Arc::new(Sources(Mutex::new(vec![
        SourceInfo {
            questions: vec!["Is someone at the door?".into()],
            ..source("door", TaskKind::Watch)
        },
        source("meeting", TaskKind::Caption),
    ])));
    let server = http::serve(
        "127.0.0.1:0",
        AppState {
            metrics: Arc::new(Metrics::new()),
            board: Arc::new(StateBoard::default()),
            events: events.clone(),
            live: live.clone(),
            control: Some(ctl),
        },
    )
    .unwrap();
    let addr = server.addr;
    let until = Instant::now() + Duration::from_secs(10);
    while events.subscribers() < 1 {
        assert!(
            Instant::now() < until,
            "the page's history never subscribed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // Before anyone opens the page: the model looks at two frames and answers.
    events.emit(state("door"));
    events.emit(state("meeting"));
    live.set_frame("door", frame(4.0));
    events.emit(description(4.0, "A courier waits at the grey door."));
    live.set_frame("door", frame(7.0));
    events.emit(alert(7.0));
    events.emit(caption("meeting", 1.0, "First line.", CaptionStatus::Final));
    events.emit(caption(
        "meeting",
        2.0,
        "<script>document.title='owned'</script>Second line.",
        CaptionStatus::Final,
    ));
    events.emit(Event::new(
        "meeting",
        2.5,
        Some(3.0),
        Body::Gap {
            reason: "audio dropped (queue_full)".into(),
        },
    ));
    let until = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = http(addr, "GET", "/v1/history", "");
        let v: Value = serde_json::from_slice(&body).unwrap();
        if v["timeline"].as_array().unwrap().len() == 7 {
            assert_eq!(v["timeline"][3]["frame"], true, "{v}");
            break;
        }
        assert!(Instant::now() < until, "history: {v}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The alert's frame is served for its media time.
    let (code, jpeg) = http(addr, "GET", "/v1/sources/door/snapshot.jpg?t=7", "");
    assert_eq!(code, 200);
    assert_eq!(
        image::load_from_memory(&jpeg)
            .unwrap()
            .to_rgb8()
            .dimensions(),
        (320, 240)
    );
    assert_eq!(
        http(addr, "GET", "/v1/sources/door/snapshot.jpg?t=99", "").0,
        404
    );
    assert_eq!(
        http(addr, "GET", "/v1/sources/door/snapshot.jpg?t=x", "").0,
        400
    );

    let url = format!("http://{addr}/?token=abc");
    let Some(mut b) = Browser::launch(&url, &dir) else {
        return;
    };
    b.wait(
        "the history to show",
        "document.querySelectorAll('#events li').length === 7 \
         && document.querySelectorAll('[data-source=meeting] .captions .final').length === 2",
    );
    // Captions in the order they were spoken; model text stays text.
    let finals = b.eval(
        "Array.from(document.querySelectorAll('[data-source=meeting] .captions .final span:last-child')).map(s => s.textContent)",
    );
    assert_eq!(
        finals,
        serde_json::json!([
            "First line.",
            "<script>document.title='owned'</script>Second line."
        ])
    );
    assert_eq!(b.eval("document.title"), "percept");
    assert_eq!(b.eval("document.querySelectorAll('script').length"), 1);

    // Live: a partial (grey) then its final (black), in order after the others.
    b.wait(
        "the feed",
        "document.getElementById('feed').textContent === 'feed: live'",
    );
    let mut emitted_partial = false;
    let until = Instant::now() + Duration::from_secs(60);
    while b.eval("document.querySelector('[data-source=meeting] .captions .partial').textContent")
        != "Third li"
    {
        assert!(Instant::now() < until, "the partial caption never showed");
        if !emitted_partial {
            events.emit(caption("meeting", 3.0, "Third li", CaptionStatus::Partial));
            emitted_partial = true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        b.eval("getComputedStyle(document.querySelector('[data-source=meeting] .captions .partial')).color"),
        "rgb(156, 163, 175)"
    );
    events.emit(caption("meeting", 3.0, "Third line.", CaptionStatus::Final));
    b.wait(
        "the final caption",
        "document.querySelectorAll('[data-source=meeting] .captions .final').length === 3 \
         && document.querySelector('[data-source=meeting] .captions .partial').textContent === ''",
    );
    let last = b.eval(
        "(() => { const f = document.querySelectorAll('[data-source=meeting] .captions .final'); \
           const l = f[f.length - 1]; return [l.lastChild.textContent, getComputedStyle(l).color]; })()",
    );
    assert_eq!(last, serde_json::json!(["Third line.", "rgb(17, 24, 39)"]));

    // A live alert with its snapshot thumbnail.
    live.set_frame("door", frame(11.0));
    events.emit(alert(11.0));
    b.wait(
        "both alerts with decoded thumbnails",
        "Array.from(document.querySelectorAll('[data-source=door] .alerts img.thumb')).filter(i => i.complete && i.naturalWidth === 320).length === 2",
    );

    // The timeline lists exactly what the JSONL file has.
    events.flush();
    let expected = timeline_of(&jsonl);
    assert_eq!(expected.len(), 9, "{expected:?}");
    b.wait(
        "the live events in the timeline",
        "document.querySelectorAll('#events li').length === 9",
    );
    assert_eq!(timeline_shown(&mut b), expected);

    // Filtered by kind, then by source.
    b.eval("(() => { const s = document.getElementById('f-kind'); s.value = 'alert'; s.dispatchEvent(new Event('change')); })()");
    let shown = b.eval(
        "Array.from(document.querySelectorAll('#events li')).filter(li => li.getClientRects().length).map(li => li.dataset.kind)",
    );
    assert_eq!(shown, serde_json::json!(["alert", "alert"]));
    b.eval("(() => { const k = document.getElementById('f-kind'); k.value = ''; const s = document.getElementById('f-source'); s.value = 'meeting'; s.dispatchEvent(new Event('change')); })()");
    let shown = b.eval(
        "Array.from(document.querySelectorAll('#events li')).filter(li => li.getClientRects().length).map(li => li.dataset.source)",
    );
    assert_eq!(shown.as_array().unwrap().len(), 5, "{shown}");
    assert!(shown.as_array().unwrap().iter().all(|s| s == "meeting"));
    b.eval("(() => { const s = document.getElementById('f-source'); s.value = ''; s.dispatchEvent(new Event('change')); })()");

    // A description opens with the frame the model looked at.
    b.eval("document.querySelector('#events li[data-kind=description]').click()");
    b.wait(
        "the description's frame",
        "document.getElementById('moment').open && document.getElementById('moment-img').complete \
         && document.getElementById('moment-img').naturalWidth === 320",
    );
    assert_eq!(
        b.eval("document.getElementById('moment-text').textContent"),
        "A courier waits at the grey door."
    );
    check_sizes(&mut b, &dir, "page-dialog", 0.2);
    b.eval("document.getElementById('moment').close()");

    // The captions view for a meeting room: the newest lines in large type.
    b.eval("document.getElementById('open-captions').click()");
    b.wait(
        "the captions view",
        "getComputedStyle(document.getElementById('capview')).display === 'flex' \
         && document.getElementById('cap-lines').textContent.includes('Third line.')",
    );
    let size =
        b.eval("parseFloat(getComputedStyle(document.getElementById('cap-lines')).fontSize)");
    assert!(size.as_f64().unwrap() >= 28.0, "{size}");
    check_sizes(&mut b, &dir, "captions", 0.01);
    b.eval("document.getElementById('close-captions').click()");

    check_sizes(&mut b, &dir, "page", 0.2);
    // Every request the page made carried the token it was opened with.
    let urls = b.eval("performance.getEntriesByType('resource').map(e => e.name)");
    let urls = urls.as_array().unwrap();
    for want in [
        "/v1/history",
        "/v1/sources?",
        "/frame.jpg",
        "/snapshot.jpg",
        "/healthz",
    ] {
        assert!(
            urls.iter().any(|u| u.as_str().unwrap().contains(want)),
            "no request for {want}: {urls:?}"
        );
    }
    // (The favicon is the browser's own request, not the page's.)
    for u in urls
        .iter()
        .filter(|u| !u.as_str().unwrap().ends_with("/favicon.ico"))
    {
        assert!(
            u.as_str().unwrap().contains("token=abc"),
            "{u} lacks the token"
        );
    }
}

/// The address `percept run --listen 127.0.0.1:0` logged.
fn listen_addr(stderr: std::process::ChildStderr) -> SocketAddr {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let plain: String = strip_ansi(&line);
            if let Some(i) = plain.find("addr=") {
                let a: String = plain[i + 5..]
                    .chars()
                    .take_while(|c| c.is_ascii_digit() || *c == '.' || *c == ':')
                    .collect();
                if let Ok(a) = a.parse::<SocketAddr>() {
                    let _ = tx.send(a);
                }
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("percept never said where it listens")
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut esc = false;
    for c in s.chars() {
        match (esc, c) {
            (false, '\u{1b}') => esc = true,
            (true, 'm') => esc = false,
            (true, _) => {}
            (false, c) => out.push(c),
        }
    }
    out
}

/// A hash of what the `<img>` of a source shows now (0 before it decoded).
const IMG_HASH: &str = "(name) => { const i = document.querySelector(`[data-source=${name}] img.live`); \
    if (!i || !i.complete || !i.naturalWidth) return 0; const c = document.createElement('canvas'); \
    c.width = i.naturalWidth; c.height = i.naturalHeight; const g = c.getContext('2d'); g.drawImage(i, 0, 0); \
    const d = g.getImageData(0, 0, c.width, c.height).data; let h = 0; \
    for (let k = 0; k < d.length; k += 4) h = (h * 31 + d[k] + d[k + 1] * 7) >>> 0; return h; }";

#[test]
fn page_follows_a_real_run_frames_meters_and_sources_coming_and_going() {
    let dir = tmpdir("page-run");
    let events = dir.join("events.jsonl");
    // The test adds a synthetic source over the API, which the default schemes refuse.
    let config = dir.join("page.toml");
    std::fs::write(&config, "[http]\napi_schemes = [\"test\"]\n").unwrap();
    let mut child = spawn_run(
        &[
            "--config",
            config.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--no-model",
            "--source",
            "tone=test:?video=ball&audio=sine",
            "--source",
            "quiet=test:?video=snow&audio=silence",
        ],
        &events,
    );
    let addr = listen_addr(child.stderr.take().unwrap());
    let url = format!("http://{addr}/");
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        // The picture is there from the first sampled frame, without a model.
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            let (code, body) = http(addr, "GET", "/v1/sources/tone/frame.jpg", "");
            if code == 200 {
                let img = image::load_from_memory(&body).unwrap().to_rgb8();
                assert_eq!(img.dimensions(), (640, 360));
                break;
            }
            assert!(Instant::now() < until, "no frame.jpg: {code}");
            std::thread::sleep(Duration::from_millis(200));
        }
        assert_eq!(
            http(addr, "GET", "/v1/sources/tone/model-frame.jpg", "").0,
            404
        );
        let Some(mut b) = Browser::launch(&url, &dir) else {
            return;
        };
        let hash = |b: &mut Browser, name: &str| b.eval(&format!("({IMG_HASH})('{name}')"));
        b.wait(
            "both pictures",
            "['tone', 'quiet'].every(n => { const i = document.querySelector(`[data-source=${n}] img.live`); return i && i.complete && i.naturalWidth === 640; })",
        );
        // The ball moves: the picture changes while the page is open.
        let first = hash(&mut b, "tone");
        assert_ne!(first, 0);
        let until = Instant::now() + Duration::from_secs(60);
        while hash(&mut b, "tone") == first {
            assert!(Instant::now() < until, "the picture never changed");
            std::thread::sleep(Duration::from_millis(300));
        }
        // The tone moves the meter; silence keeps it down.
        b.wait(
            "the tone's meter",
            "Number(document.querySelector('[data-source=tone] .meter').dataset.level) > -30 \
             && parseFloat(document.querySelector('[data-source=tone] .meter .fill').style.width) > 50",
        );
        b.wait(
            "the silent source's meter",
            "document.querySelector('[data-source=quiet] .meter').dataset.level !== undefined",
        );
        for _ in 0..3 {
            let quiet = b.eval(
                "[Number(document.querySelector('[data-source=quiet] .meter').dataset.level), \
                  parseFloat(document.querySelector('[data-source=quiet] .meter .fill').style.width)]",
            );
            assert!(quiet[0].as_f64().unwrap() < -60.0, "{quiet}");
            assert!(quiet[1].as_f64().unwrap() < 5.0, "{quiet}");
            std::thread::sleep(Duration::from_millis(700));
        }
        // Figures and the strip of the last minutes are drawn.
        b.wait(
            "the frame rate",
            "/fps [1-9]/.test(document.querySelector('[data-source=tone] .figs').textContent)",
        );
        b.wait(
            "the strip",
            "(() => { const c = document.querySelector('[data-source=tone] canvas.strip'); \
               const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; \
               let n = 0; for (let k = 3; k < d.length; k += 4) if (d[k]) n++; return n > 50; })()",
        );
        // A source added at runtime gets a card; removed, the card goes.
        let (code, body) = http(
            addr,
            "POST",
            "/v1/sources",
            r#"{"name":"extra","uri":"test:?video=smpte&audio=none"}"#,
        );
        assert_eq!(code, 201, "{}", String::from_utf8_lossy(&body));
        b.wait(
            "the added source's picture",
            "(() => { const i = document.querySelector('[data-source=extra] img.live'); return !!i && i.complete && i.naturalWidth === 640; })()",
        );
        check_sizes(&mut b, &dir, "run", 0.2);
        assert_eq!(http(addr, "DELETE", "/v1/sources/extra", "").0, 204);
        b.wait(
            "the removed source's card to go",
            "document.querySelector('.card[data-source=extra]') === null",
        );
        // Every state change the file has is on the timeline.
        let until = Instant::now() + Duration::from_secs(60);
        loop {
            let want: Vec<_> = timeline_of(&events);
            let shown = timeline_shown(&mut b);
            if shown == want {
                assert!(
                    want.iter().any(|(k, s)| k == "state" && s == "tone"),
                    "{want:?}"
                );
                break;
            }
            assert!(
                Instant::now() < until,
                "timeline {shown:?} != file {want:?}"
            );
            std::thread::sleep(Duration::from_millis(300));
        }
    }));
    run_tool("kill", &["-TERM", &child.id().to_string()]);
    let status = child.wait().unwrap();
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
    assert!(status.success(), "{status:?}");
}
