use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// The tiny Gemma 4 checkpoint of the parity fixture (towers, tokenizer, template).
pub fn fixture_model() -> String {
    format!(
        "{}/crates/gemma4/tests/fixtures/gemma4/model",
        env!("CARGO_MANIFEST_DIR")
    )
}

/// `percept run --events EVENTS ARGS...` in the background, stderr piped.
pub fn spawn_run(args: &[&str], events: &Path) -> std::process::Child {
    Command::new(percept_bin())
        .arg("run")
        .arg("--events")
        .arg(events)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn percept")
}

pub fn percept_bin() -> &'static str {
    env!("CARGO_BIN_EXE_percept")
}

/// A fresh folder for one test's media and outputs.
pub fn tmpdir(name: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let d = std::env::temp_dir().join(format!(
        "percept-it-{}-{}-{name}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create temp dir");
    d
}

pub fn run_tool(tool: &str, args: &[&str]) {
    let out = Command::new(tool)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {tool}: {e}"));
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// gst-launch-1.0 with a description split on whitespace (no quoted values needed here).
pub fn gst_launch(desc: &str) {
    let mut args = vec!["-q"];
    args.extend(desc.split_whitespace());
    run_tool("gst-launch-1.0", &args);
}

pub fn ffmpeg(args: &str) {
    let mut a = vec!["-hide_banner", "-loglevel", "error", "-y"];
    a.extend(args.split_whitespace());
    run_tool("ffmpeg", &a);
}

/// Run `percept run` to completion with events going to a file; returns (output, events).
pub fn run_percept(dir: &Path, args: &[&str]) -> (Output, Vec<Value>) {
    let events = dir.join(format!("events-{}.jsonl", rand_suffix()));
    let out = Command::new(percept_bin())
        .arg("run")
        .arg("--no-http")
        .arg("--events")
        .arg(&events)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run percept");
    (out, read_events(&events))
}

fn rand_suffix() -> u32 {
    static N: AtomicU32 = AtomicU32::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// Every line must be a complete JSON object with the contract's fields.
pub fn read_events(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .map(|l| {
            let v: Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("bad event line {l:?}: {e}"));
            assert!(v["source"].is_string(), "{l}");
            assert!(v["kind"].is_string(), "{l}");
            assert!(v["t"].is_number(), "{l}");
            v
        })
        .collect()
}

pub fn of_kind<'a>(events: &'a [Value], source: &str, kind: &str) -> Vec<&'a Value> {
    events
        .iter()
        .filter(|e| e["source"] == source && e["kind"] == kind)
        .collect()
}

pub fn summary<'a>(events: &'a [Value], source: &str) -> &'a Value {
    let s = of_kind(events, source, "summary");
    assert_eq!(s.len(), 1, "one summary for {source}: {events:?}");
    s[0]
}

pub fn u(v: &Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("{k} missing in {v}"))
}

pub fn f(v: &Value, k: &str) -> f64 {
    v[k].as_f64()
        .unwrap_or_else(|| panic!("{k} missing in {v}"))
}

/// The invariant every summary keeps.
pub fn assert_frame_accounting(events: &[Value], source: &str) {
    let s = summary(events, source);
    assert_eq!(
        u(s, "frames_sampled"),
        u(s, "frames_analyzed") + u(s, "frames_dropped"),
        "{s}"
    );
    let analysed = of_kind(events, source, "frame").len() as u64;
    assert_eq!(analysed, u(s, "frames_analyzed"), "{s}");
    let dropped: u64 = of_kind(events, source, "drop")
        .iter()
        .filter(|d| d["media"] == "video")
        .map(|d| u(d, "count"))
        .sum();
    assert_eq!(dropped, u(s, "frames_dropped"), "{s}");
}

/// Audio events tile [0, end) with no hole or overlap.
pub fn assert_audio_contiguous(events: &[Value], source: &str, expect_end: f64) {
    let mut a = of_kind(events, source, "audio");
    a.sort_by(|x, y| f(x, "t").total_cmp(&f(y, "t")));
    assert!(!a.is_empty(), "no audio events");
    assert!(f(a[0], "t").abs() < 0.05, "first audio at {}", a[0]);
    for w in a.windows(2) {
        assert!(
            (f(w[1], "t") - f(w[0], "end")).abs() < 1e-4,
            "hole or overlap between {} and {}",
            w[0],
            w[1]
        );
    }
    let end = f(a[a.len() - 1], "end");
    assert!(
        (end - expect_end).abs() < 0.2,
        "audio ends at {end}, expected {expect_end}"
    );
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
