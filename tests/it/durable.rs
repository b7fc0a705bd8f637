//! Crash and durability: a panicking model step (fault injected with
//! `PERCEPT_FAULT_MODEL_PANIC`), `percept analyze` on a full disk (a file-size limit makes
//! writes fail with EFBIG, as ENOSPC would), a resumed video recording, `analyze DIR` with a
//! bad file, a symlink loop and two recordings of the same name, and mutated media.

use crate::analyze::{config, content, recording};
use crate::common::*;
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Waits for a child with a deadline; a child still running then is killed and the test
/// fails: a hang is a failure, not a stuck test run. Its stderr is read meanwhile (a full
/// pipe would block the child and look like a hang).
pub fn wait_or_fail(mut child: Child, limit: Duration, what: &str) -> Output {
    use std::io::Read;
    let mut pipe = child.stderr.take();
    let reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        if let Some(p) = pipe.as_mut() {
            let _ = p.read_to_end(&mut buf);
        }
        buf
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let err = reader.join().unwrap();
    let Some(status) = status else {
        let text = String::from_utf8_lossy(&err);
        let tail: String = text
            .chars()
            .rev()
            .take(4000)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        panic!("{what}: still running after {limit:?} (hung); stderr tail:\n{tail}");
    };
    Output {
        status,
        stdout: Vec::new(),
        stderr: err,
    }
}

fn model_config(d: &Path, extra: &str) -> PathBuf {
    let p = d.join("model.toml");
    std::fs::write(
        &p,
        format!(
            "[model]\nid = \"{}\"\nmax_tokens = 4\n[governor]\nsoft_tokens = 70\nheartbeat_seconds = 1.0\n{extra}",
            fixture_model()
        ),
    )
    .unwrap();
    p
}

/// Before the fix, the panic killed the model thread with a job taken: `wait_idle` waited
/// for its answer forever and this run never ended.
#[test]
fn a_panicking_model_step_ends_its_requests_with_errors_and_the_model_is_reloaded() {
    let d = tmpdir("durable-panic");
    let cfg = model_config(&d, "");
    let events = d.join("events.jsonl");
    let child = Command::new(percept_bin())
        .args(["run", "--no-http", "--config", cfg.to_str().unwrap()])
        .arg("--events")
        .arg(&events)
        .args([
            "--source",
            "cam=test:?duration=4&live=false",
            "--task",
            "describe",
        ])
        .env("PERCEPT_FAULT_MODEL_PANIC", "2")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_or_fail(child, Duration::from_secs(120), "percept run after a panic");
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("Model reloaded after a panic"), "{err}");
    let ev = read_events(&events);
    let errors = of_kind(&ev, "cam", "error");
    assert_eq!(errors.len(), 1, "{errors:?}");
    let m = errors[0]["message"].as_str().unwrap();
    assert!(m.contains("the model step panicked"), "{m}");
    assert!(m.contains("PERCEPT_FAULT_MODEL_PANIC"), "{m}");
    // The other three frames were answered, by the first model and the reloaded one.
    let descs = of_kind(&ev, "cam", "description");
    assert_eq!(descs.len(), 3, "{descs:?}");
    let failed_t = f(errors[0], "t");
    assert!(descs.iter().any(|e| f(e, "t") > failed_t), "{descs:?}");
}

/// Reads the listen address from the log (the server binds port 0).
fn listen_addr(child: &mut Child) -> (String, std::sync::mpsc::Receiver<String>) {
    let err = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let start = Instant::now();
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("percept logs its listen address");
        if let Some(i) = line.find("addr=") {
            let addr: String = line[i + 5..]
                .chars()
                .take_while(|c| !c.is_whitespace())
                .collect();
            return (addr, rx);
        }
        assert!(start.elapsed() < Duration::from_secs(30));
    }
}

fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).unwrap();
    buf.split_once("\r\n\r\n")
        .map(|b| b.1.to_string())
        .unwrap_or_default()
}

/// A model whose every step panics is given up after three tries: `/healthz` says
/// `degraded` with the reason, the metrics count the panics, the signals go on, and
/// SIGTERM still ends the run at once.
#[test]
fn repeated_panics_mark_the_model_unavailable_and_shutdown_does_not_hang() {
    let d = tmpdir("durable-panics");
    let cfg = model_config(&d, "");
    let events = d.join("events.jsonl");
    let mut child = Command::new(percept_bin())
        .args(["run", "--listen", "127.0.0.1:0", "--config"])
        .arg(&cfg)
        .arg("--events")
        .arg(&events)
        .args(["--source", "cam=test:?live=true", "--task", "describe"])
        .env("PERCEPT_FAULT_MODEL_PANIC", "1+")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (addr, _log) = listen_addr(&mut child);
    let start = Instant::now();
    let health = loop {
        let h = http_get(&addr, "/healthz");
        if h.contains("unavailable") {
            break h;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "model never marked unavailable: {h}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let v: Value = serde_json::from_str(&health).unwrap();
    assert_eq!(v["status"], "degraded", "{health}");
    assert!(health.contains("panicked 3 times in a row"), "{health}");
    let metrics = http_get(&addr, "/metrics");
    assert!(
        metrics.lines().any(|l| l == "percept_model_panics_total 3"),
        "{metrics}"
    );
    assert!(
        metrics.lines().any(|l| l == "percept_model_unavailable 1"),
        "{metrics}"
    );
    let frames_then = of_kind(&read_events(&events), "cam", "frame").len();
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        of_kind(&read_events(&events), "cam", "frame").len() > frames_then,
        "signal analysis stopped"
    );
    run_tool("kill", &["-TERM", &child.id().to_string()]);
    let out = wait_or_fail(child, Duration::from_secs(30), "percept run at SIGTERM");
    assert!(out.status.success());
    let ev = read_events(&events);
    assert_eq!(of_kind(&ev, "cam", "error").len(), 3);
    assert!(of_kind(&ev, "cam", "description").is_empty());
}

fn analyze_cmd(args: &[&str]) -> Command {
    let mut c = Command::new(percept_bin());
    c.arg("analyze")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

fn analyze_run(args: &[&str], what: &str) -> Output {
    wait_or_fail(
        analyze_cmd(args).spawn().unwrap(),
        Duration::from_secs(240),
        what,
    )
}

fn checkpoint(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("checkpoint.json")).unwrap()).unwrap()
}

/// Writes past a file-size limit fail with EFBIG (SIGXFSZ ignored), the way a full disk
/// fails them with ENOSPC: the recording fails with exit 1, is not marked done, and the
/// next run (disk space back) completes it to the same content as an uninterrupted run.
#[test]
fn a_full_disk_fails_the_recording_and_the_next_run_completes_it() {
    let d = tmpdir("durable-full");
    let rec = recording(&d);
    let fast = config(&d, "fast.toml", 0);
    let whole = d.join("whole");
    let out = analyze_run(
        &[
            rec.to_str().unwrap(),
            "--out",
            whole.to_str().unwrap(),
            "--config",
            fast.to_str().unwrap(),
        ],
        "reference analyze",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let w = whole.join("field_day");
    let reference = content(&w);
    let size = std::fs::metadata(w.join("events.jsonl")).unwrap().len();
    // Half the events fit.
    let blocks = (size / 2 / 1024).max(1);
    let part = d.join("part");
    let script = format!("trap '' XFSZ; ulimit -f {blocks}; exec \"$0\" \"$@\"");
    let child = Command::new("bash")
        .args(["-c", &script, percept_bin(), "analyze"])
        .args([
            rec.to_str().unwrap(),
            "--out",
            part.to_str().unwrap(),
            "--config",
            fast.to_str().unwrap(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_or_fail(child, Duration::from_secs(240), "analyze on a full disk");
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("FAILED"), "{err}");
    assert!(err.contains("File too large"), "{err}");
    let p = part.join("field_day");
    let cp = checkpoint(&p);
    assert_eq!(cp["done"], false, "{cp}");
    assert!(!p.join("summary.md").exists());
    // The checkpoint never points past what is in the file.
    let len = std::fs::metadata(p.join("events.jsonl")).unwrap().len();
    assert!(cp["events_bytes"].as_u64().unwrap() <= len, "{cp} vs {len}");

    let out = analyze_run(
        &[
            rec.to_str().unwrap(),
            "--out",
            part.to_str().unwrap(),
            "--config",
            fast.to_str().unwrap(),
        ],
        "analyze after the disk was freed",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(content(&p), reference);
    assert_eq!(checkpoint(&p)["done"], true);
    assert_eq!(
        std::fs::read_to_string(p.join("transcript.vtt")).unwrap(),
        std::fs::read_to_string(w.join("transcript.vtt")).unwrap()
    );
}

/// The checkpoint says more than the events file holds (a power cut lost the tail, or left
/// zeros): the resume cuts the file at the last good line, never pads it, and redoes the
/// rest, ending with the content of an uninterrupted run.
#[test]
fn a_resume_redoes_what_the_disk_lost() {
    let d = tmpdir("durable-lost");
    let rec = recording(&d);
    let fast = config(&d, "fast.toml", 0);
    let args = |out: &Path| -> Vec<String> {
        vec![
            rec.display().to_string(),
            "--out".into(),
            out.display().to_string(),
            "--config".into(),
            fast.display().to_string(),
        ]
    };
    let whole = d.join("whole");
    let a = args(&whole);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let out = analyze_run(&a, "reference analyze");
    assert!(out.status.success(), "{}", stderr(&out));
    let w = whole.join("field_day");
    let reference = content(&w);
    // Simulate the power cut on a copy: a checkpoint in the middle, the file shorter than
    // it says, and a block of zeros where its last lines were.
    let part = d.join("part");
    let p = part.join("field_day");
    std::fs::create_dir_all(&p).unwrap();
    let text = std::fs::read_to_string(w.join("events.jsonl")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let (i, t) = lines
        .iter()
        .enumerate()
        .filter_map(|(i, l)| {
            let v: Value = serde_json::from_str(l).unwrap();
            (v["kind"] == "transcript").then(|| (i, v["end"].as_f64().unwrap()))
        })
        .nth(1)
        .expect("two transcript lines");
    let upto: usize = lines[..=i].iter().map(|l| l.len() + 1).sum();
    let mut cp = checkpoint(&w);
    cp["done"] = false.into();
    cp["media_t"] = t.into();
    cp["events_bytes"] = (upto as u64).into();
    std::fs::write(p.join("checkpoint.json"), cp.to_string()).unwrap();
    let first: usize = lines[..=i / 2].iter().map(|l| l.len() + 1).sum();
    let mut bytes = text.as_bytes()[..first].to_vec();
    bytes.extend(std::iter::repeat_n(0u8, (upto - first) / 2));
    std::fs::write(p.join("events.jsonl"), &bytes).unwrap();
    let a = args(&part);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let out = analyze_run(&a, "resume after a lost tail");
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    let events = std::fs::read(p.join("events.jsonl")).unwrap();
    assert!(!events.contains(&0u8), "NUL bytes in events.jsonl");
    assert_eq!(content(&p), reference);
    assert_eq!(
        std::fs::read_to_string(p.join("transcript.srt")).unwrap(),
        std::fs::read_to_string(w.join("transcript.srt")).unwrap()
    );
}

/// A recording with video, killed after its first checkpoint and resumed: the summary is
/// made from every frame of the clip (the first run's kept frames come back from the
/// recording's `frames/` folder, small JPEGs), as in an uninterrupted run.
#[test]
fn a_resumed_video_recording_summarizes_every_frame() {
    let d = tmpdir("durable-video");
    let speech = recording(&d);
    let clip = d.join("clip.mp4");
    run_tool(
        "ffmpeg",
        &[
            "-hide_banner",
            "-loglevel",
            "error",
            "-y",
            "-f",
            "lavfi",
            "-i",
            "testsrc2=size=96x64:rate=2",
            "-i",
            speech.to_str().unwrap(),
            "-shortest",
            "-c:v",
            "libx264",
            "-preset",
            "ultrafast",
            "-pix_fmt",
            "yuv420p",
            "-c:a",
            "aac",
            clip.to_str().unwrap(),
        ],
    );
    let fast = config(&d, "fast.toml", 0);
    let slow = config(&d, "slow.toml", 700);
    let whole = d.join("whole");
    let out = analyze_run(
        &[
            clip.to_str().unwrap(),
            "--out",
            whole.to_str().unwrap(),
            "--config",
            fast.to_str().unwrap(),
        ],
        "reference analyze",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let summary_of = |dir: &Path| -> Value {
        read_events(&dir.join("events.jsonl"))
            .into_iter()
            .find(|e| e["kind"] == "summary" && e.get("text").is_some())
            .expect("a summary")
    };
    let w = whole.join("clip");
    let reference = summary_of(&w);
    let frames = u(&reference, "frames");
    assert!(frames >= 20, "{reference}");
    let kept = std::fs::read_dir(w.join("frames")).unwrap().count() as u64;
    assert_eq!(kept, frames);

    let part = d.join("part");
    let child = analyze_cmd(&[
        clip.to_str().unwrap(),
        "--out",
        part.to_str().unwrap(),
        "--config",
        slow.to_str().unwrap(),
    ])
    .spawn()
    .unwrap();
    let p = part.join("clip");
    let start = Instant::now();
    let mut child = child;
    loop {
        let t = std::fs::read_to_string(p.join("checkpoint.json"))
            .ok()
            .and_then(|s| serde_json::from_str::<Value>(&s).ok())
            .and_then(|v| v["media_t"].as_f64())
            .unwrap_or(0.0);
        if t > 0.0 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "no checkpoint");
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    let _ = child.wait();
    assert_eq!(checkpoint(&p)["done"], false, "killed too late");
    let out = analyze_run(
        &[
            clip.to_str().unwrap(),
            "--out",
            part.to_str().unwrap(),
            "--config",
            fast.to_str().unwrap(),
        ],
        "resumed analyze",
    );
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("resumed at"), "{err}");
    let resumed = summary_of(&p);
    assert_eq!(resumed["frames"], reference["frames"], "{resumed}");
    assert_eq!(resumed["windows"], reference["windows"], "{resumed}");
    assert_eq!(content(&p), content(&w));
}

/// `analyze DIR`: a symbolic link back up the tree is not followed, a file that is not
/// media fails alone (exit 1, listed at the end), and a/x.wav and b/x.wav get their own
/// folders, the same ones on a later run whatever else is analysed then.
#[test]
fn analyze_dir_survives_loops_bad_files_and_same_names() {
    let d = tmpdir("durable-dir");
    let root = d.join("in");
    for sub in ["a", "b", "c"] {
        std::fs::create_dir_all(root.join(sub)).unwrap();
    }
    for (sub, hz) in [("a", 440), ("b", 880)] {
        ffmpeg(&format!(
            "-f lavfi -t 2 -i sine=frequency={hz}:sample_rate=16000 {}",
            root.join(sub).join("x.wav").display()
        ));
    }
    std::fs::write(
        root.join("c/bad.wav"),
        b"RIFF\x10\x00\x00\x00WAVEnot really",
    )
    .unwrap();
    std::os::unix::fs::symlink("..", root.join("a/loop")).unwrap();
    let cfg = config(&d, "fast.toml", 0);
    let out_dir = d.join("out");
    let out = analyze_run(
        &[
            root.to_str().unwrap(),
            "--out",
            out_dir.to_str().unwrap(),
            "--config",
            cfg.to_str().unwrap(),
        ],
        "analyze DIR",
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let failed: Vec<&str> = err.lines().filter(|l| l.contains("FAILED")).collect();
    assert_eq!(failed.len(), 1, "{err}");
    assert!(failed[0].contains("bad.wav"), "{err}");
    assert!(err.contains("1 of 3 recordings failed"), "{err}");
    let owner = |name: &str| -> String {
        let cp = checkpoint(&out_dir.join(name));
        assert_eq!(cp["done"], true, "{cp}");
        cp["recording"].as_str().unwrap().to_string()
    };
    let canon = |p: PathBuf| std::fs::canonicalize(p).unwrap().display().to_string();
    assert_eq!(owner("x"), canon(root.join("a/x.wav")));
    assert_eq!(owner("x-2"), canon(root.join("b/x.wav")));
    // Only b/x.wav this time: its own folder, already done; a's is untouched.
    let out = analyze_run(
        &[
            root.join("b/x.wav").to_str().unwrap(),
            "--out",
            out_dir.to_str().unwrap(),
            "--config",
            cfg.to_str().unwrap(),
        ],
        "analyze one",
    );
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("x-2 (already analysed)"), "{err}");
}

/// A few mutated files (fixed seeds) through the file and audio paths: each run ends, in
/// success or in one clear error, never a panic or a hang. The full set (thousands of
/// cases) is `fault_mutated_media_long` (ignored; run by hand).
#[test]
fn mutated_media_end_in_success_or_one_clear_error() {
    let d = tmpdir("durable-mutate");
    let cases = crate::faults::mutated_cases(&d, 1, 6);
    for c in &cases {
        crate::faults::check_one(&d, c);
    }
}

/// `summarize` on a live source: a rolling `summary` event every
/// `summary_window_seconds` of media, each over its own window's frames (one a second,
/// never the whole stream's), carrying the previous one forward.
#[test]
fn live_summarize_is_a_rolling_summary_with_bounded_frames() {
    let d = tmpdir("durable-rolling");
    let cfg = model_config(&d, "[captions]\nsummary_window_seconds = 3.0\n");
    let events = d.join("events.jsonl");
    let child = Command::new(percept_bin())
        .args(["run", "--no-http", "--config"])
        .arg(&cfg)
        .arg("--events")
        .arg(&events)
        .args(["--source", "cam=test:?live=true", "--task", "summarize"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    loop {
        let n = of_kind(&read_events(&events), "cam", "summary").len();
        if n >= 3 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "{n} rolling summaries"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    run_tool("kill", &["-TERM", &child.id().to_string()]);
    let out = wait_or_fail(child, Duration::from_secs(30), "percept run at SIGTERM");
    assert!(out.status.success(), "{}", stderr(&out));
    let ev = read_events(&events);
    let rolling: Vec<&Value> = of_kind(&ev, "cam", "summary")
        .into_iter()
        .filter(|e| e.get("text").is_some())
        .collect();
    assert!(rolling.len() >= 3, "{rolling:?}");
    for pair in rolling.windows(2) {
        assert!(f(pair[1], "t") >= f(pair[0], "end") - 1e-3, "{pair:?}");
    }
    for s in &rolling {
        // One frame a second of its window; thinned, never more than two windows' worth.
        let frames = u(s, "frames");
        assert!((1..=6).contains(&frames), "{s}");
        assert!(f(s, "end") - f(s, "t") >= 3.0 - 1e-3, "{s}");
    }
}
