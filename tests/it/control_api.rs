//! The runtime control API against a running `percept run`: sources added, retasked and
//! removed over HTTP while the model stays loaded.

use crate::common::*;
use serde_json::Value;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn request(addr: &str, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).unwrap();
    let code = buf.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = buf
        .split_once("\r\n\r\n")
        .map(|b| b.1.to_string())
        .unwrap_or_default();
    (code, body)
}

fn wait_until(events: &Path, secs: u64, ok: &dyn Fn(&[Value]) -> bool) {
    let start = Instant::now();
    loop {
        let ev = if events.exists() {
            read_events(events)
        } else {
            Vec::new()
        };
        if ok(&ev) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "timed out: {ev:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn sources_are_added_retasked_and_removed_at_runtime() {
    let d = tmpdir("control-api");
    let port = 20000 + (std::process::id() % 1000) as u16;
    let addr = format!("127.0.0.1:{port}");
    let cfg = d.join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "[model]\nid = \"{}\"\nmax_tokens = 4\n\
             [governor]\nsoft_tokens = 70\nheartbeat_seconds = 1.0\n[captions]\ndir = \"\"\n\
             [http]\napi_schemes = [\"test\"]\n",
            fixture_model()
        ),
    )
    .unwrap();
    let events = d.join("events.jsonl");
    let child = Command::new(percept_bin())
        .args(["run", "--listen", &addr, "--config", cfg.to_str().unwrap()])
        .arg("--events")
        .arg(&events)
        .args(["--source", "a=test:?live=true"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_until(&events, 60, &|ev| {
        !of_kind(ev, "a", "description").is_empty()
    });

    // Bad requests say what is wrong.
    let (code, body) = request(
        &addr,
        "POST",
        "/v1/sources",
        Some(r#"{"uri": "gopher://x"}"#),
    );
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("gopher"), "{body}");
    let (code, _) = request(&addr, "DELETE", "/v1/sources/nope", None);
    assert_eq!(code, 404);

    let (code, body) = request(
        &addr,
        "POST",
        "/v1/sources",
        Some(r#"{"name": "b", "uri": "test:?live=true&video=checkers-8", "task": "describe"}"#),
    );
    assert_eq!(code, 201, "{body}");
    let (code, _) = request(
        &addr,
        "POST",
        "/v1/sources",
        Some(r#"{"name": "b", "uri": "test:?live=true"}"#),
    );
    assert_eq!(code, 409, "duplicate name");
    wait_until(&events, 60, &|ev| {
        !of_kind(ev, "b", "description").is_empty()
    });

    let (code, body) = request(
        &addr,
        "PUT",
        "/v1/sources/b/task",
        Some(r#"{"task": "watch", "questions": ["Is the board black and white?"]}"#),
    );
    assert_eq!(code, 200, "{body}");
    let info: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(info["task"], "watch");
    wait_until(&events, 60, &|ev| {
        of_kind(ev, "b", "error")
            .iter()
            .any(|e| e["message"].as_str().unwrap_or("").starts_with("watch:"))
    });

    let (code, body) = request(&addr, "DELETE", "/v1/sources/b", None);
    assert_eq!(code, 204, "{body}");
    let (code, body) = request(&addr, "GET", "/v1/sources", None);
    assert_eq!(code, 200);
    let list: Value = serde_json::from_str(&body).unwrap();
    let names: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["a"], "{body}");
    // `a` keeps going after b is gone.
    let before = of_kind(&read_events(&events), "a", "frame").len();
    wait_until(&events, 30, &|ev| {
        of_kind(ev, "a", "frame").len() >= before + 2
    });

    run_tool("kill", &["-TERM", &child.id().to_string()]);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.matches("Model ready").count(), 1, "{err}");
    let ev = read_events(&events);
    // Both sources end with summaries; the model was loaded once.
    assert!(ev
        .iter()
        .any(|e| e["kind"] == "summary" && e["source"] == "b"));
    assert!(ev
        .iter()
        .any(|e| e["kind"] == "summary" && e["source"] == "a"));
}
