//! `percept analyze`: output folder per recording, and resume after SIGKILL with no
//! duplicated and no missing events.

use crate::common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Four spoken sentences with 1.5 s pauses (about 21 s).
pub(crate) fn recording(d: &Path) -> PathBuf {
    let mut inputs = Vec::new();
    let pause = d.join("pause.wav");
    ffmpeg(&format!(
        "-f lavfi -t 1.5 -i anullsrc=r=22050:cl=mono {}",
        pause.display()
    ));
    for i in 1..=4 {
        let s = d.join(format!("s{i}.wav"));
        run_tool(
            "espeak-ng",
            &[
                "-w",
                s.to_str().unwrap(),
                &format!(
                    "This is sentence number {i} of the field recording. The birds are singing."
                ),
            ],
        );
        inputs.push(s);
        if i < 4 {
            inputs.push(pause.clone());
        }
    }
    let rec = d.join("field day.wav");
    // The output name has a space: pass it through run_tool, not the whitespace splitter.
    let mut a: Vec<String> = vec![
        "-hide_banner".into(),
        "-loglevel".into(),
        "error".into(),
        "-y".into(),
    ];
    for p in &inputs {
        a.push("-i".into());
        a.push(p.display().to_string());
    }
    a.push("-filter_complex".into());
    a.push(format!("concat=n={}:v=0:a=1", inputs.len()));
    a.push(rec.display().to_string());
    let refs: Vec<&str> = a.iter().map(String::as_str).collect();
    run_tool("ffmpeg", &refs);
    rec
}

pub(crate) fn config(d: &Path, name: &str, delay_ms: u64) -> PathBuf {
    let p = d.join(name);
    std::fs::write(
        &p,
        format!(
            "[model]\nid = \"{}\"\nmax_tokens = 6\ndelay_ms = {delay_ms}\n",
            fixture_model()
        ),
    )
    .unwrap();
    p
}

fn analyze(args: &[&str]) -> std::process::Output {
    Command::new(percept_bin())
        .arg("analyze")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// What the user keeps: analysis events with their times and text (lifecycle and drop
/// reports differ between one run and two by nature).
pub(crate) fn content(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = read_events(&dir.join("events.jsonl"))
        .into_iter()
        .filter(|e| {
            matches!(e["kind"].as_str(), Some("audio" | "frame" | "transcript"))
                || (e["kind"] == "summary" && e.get("text").is_some())
        })
        .map(|e: Value| format!("{} {} {} {}", e["kind"], e["t"], e["end"], e["text"]))
        .collect();
    v.sort();
    v
}

#[test]
fn resumes_after_sigkill_without_duplicates_or_holes() {
    let d = tmpdir("analyze-resume");
    let rec = recording(&d);
    let fast = config(&d, "fast.toml", 0);
    let slow = config(&d, "slow.toml", 700);
    // The reference: one uninterrupted run.
    let whole = d.join("whole");
    let out = analyze(&[
        rec.to_str().unwrap(),
        "--out",
        whole.to_str().unwrap(),
        "--config",
        fast.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let w = whole.join("field_day");
    for f in [
        "transcript.vtt",
        "transcript.srt",
        "events.jsonl",
        "summary.md",
    ] {
        assert!(w.join(f).is_file(), "missing {f}");
    }
    let reference = content(&w);
    let transcripts = reference
        .iter()
        .filter(|l| l.starts_with("\"transcript\""))
        .count();
    assert!(transcripts >= 3, "{reference:?}");
    let md = std::fs::read_to_string(w.join("summary.md")).unwrap();
    assert!(
        md.contains("## Summary") && md.contains("## Transcript"),
        "{md}"
    );

    // Killed mid-way (after at least one committed window, before the end), then resumed.
    let part = d.join("part");
    let mut child = Command::new(percept_bin())
        .args([
            "analyze",
            rec.to_str().unwrap(),
            "--out",
            part.to_str().unwrap(),
            "--config",
            slow.to_str().unwrap(),
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let cp = part.join("field_day/checkpoint.json");
    let start = Instant::now();
    loop {
        let t = std::fs::read_to_string(&cp)
            .ok()
            .and_then(|s| serde_json::from_str::<Value>(&s).ok())
            .and_then(|v| v["media_t"].as_f64())
            .unwrap_or(0.0);
        if t > 0.0 {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(60), "no checkpoint");
        std::thread::sleep(Duration::from_millis(50));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let before: Value = serde_json::from_str(&std::fs::read_to_string(&cp).unwrap()).unwrap();
    assert_eq!(before["done"], false, "killed too late: {before}");
    let out = analyze(&[
        rec.to_str().unwrap(),
        "--out",
        part.to_str().unwrap(),
        "--config",
        fast.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("resumed at"), "{}", stderr(&out));
    let p = part.join("field_day");
    assert_eq!(content(&p), reference);
    assert_eq!(
        std::fs::read_to_string(p.join("transcript.vtt")).unwrap(),
        std::fs::read_to_string(w.join("transcript.vtt")).unwrap()
    );
    assert_eq!(
        std::fs::read_to_string(p.join("transcript.srt")).unwrap(),
        std::fs::read_to_string(w.join("transcript.srt")).unwrap()
    );
    // A third run has nothing left to do.
    let out = analyze(&[
        rec.to_str().unwrap(),
        "--out",
        part.to_str().unwrap(),
        "--config",
        fast.to_str().unwrap(),
    ]);
    assert!(
        stderr(&out).contains("already analysed"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn bad_paths_and_missing_model_are_one_line_errors() {
    let d = tmpdir("analyze-bad");
    let out = analyze(&["/nonexistent/rec.wav", "--out", d.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("/nonexistent/rec.wav: no such file or folder"),
        "{err}"
    );
    let empty = d.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let out = analyze(&[empty.to_str().unwrap(), "--out", d.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("no media files"), "{}", stderr(&out));
    let wav = d.join("a.wav");
    ffmpeg(&format!(
        "-f lavfi -t 1 -i anullsrc=r=16000:cl=mono {}",
        wav.display()
    ));
    let out = analyze(&[
        wav.to_str().unwrap(),
        "--out",
        d.to_str().unwrap(),
        "--model",
        "/nonexistent/model",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("model unavailable"),
        "{}",
        stderr(&out)
    );
}

/// A clip longer than one summary window (`[captions] summary_window_seconds = 8` on a
/// 21 s clip with video): the summary is asked for window by window in time order, frames
/// and speech together, and each window's prompt carries the summary the model wrote after
/// the previous one; the last answer is the recording's summary.
#[test]
fn long_clip_is_summarized_in_windows_with_a_running_summary() {
    let d = tmpdir("analyze-windows");
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
            "testsrc2=size=96x64:rate=4",
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
    let cfg = d.join("windows.toml");
    std::fs::write(
        &cfg,
        format!(
            "[model]\nid = \"{}\"\nmax_tokens = 6\n\n[captions]\nsummary_window_seconds = 8.0\n",
            fixture_model()
        ),
    )
    .unwrap();
    let out_dir = d.join("out");
    let out = Command::new(percept_bin())
        .args([
            "analyze",
            clip.to_str().unwrap(),
            "--out",
            out_dir.to_str().unwrap(),
            "--config",
            cfg.to_str().unwrap(),
        ])
        .env("PERCEPT_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    // Each log record starts on a line with a timestamp; prompts span several lines.
    let mut records: Vec<String> = Vec::new();
    for line in err.lines() {
        if line.starts_with("20") || records.is_empty() {
            records.push(line.to_string());
        } else if let Some(r) = records.last_mut() {
            r.push('\n');
            r.push_str(line);
        }
    }
    let field = |r: &str, k: &str| -> f64 {
        let s = &r[r.find(&format!(" {k}=")).unwrap() + k.len() + 2..];
        s.split_whitespace().next().unwrap().parse().unwrap()
    };
    let windows: Vec<&String> = records
        .iter()
        .filter(|r| r.contains("Summary window."))
        .collect();
    let running: Vec<&String> = records
        .iter()
        .filter(|r| r.contains("Running summary."))
        .collect();
    assert!(windows.len() >= 3, "{err}");
    assert_eq!(running.len(), windows.len() - 1, "{err}");
    // In order, contiguous, from 0 to the end of the clip, each at most 8 s.
    let spans: Vec<(f64, f64)> = windows
        .iter()
        .map(|r| (field(r, "t0"), field(r, "t1")))
        .collect();
    assert_eq!(spans[0].0, 0.0);
    for (k, w) in windows.iter().enumerate() {
        assert_eq!(field(w, "window") as usize, k + 1);
        assert_eq!(field(w, "of") as usize, windows.len());
    }
    for p in spans.windows(2) {
        assert_eq!(p[0].1, p[1].0, "{spans:?}");
        assert!(p[0].1 - p[0].0 <= 8.0 + 1.0, "{spans:?}");
    }
    assert!(spans.last().unwrap().1 >= 19.0, "{spans:?}");
    // Frames and speech both go in.
    assert!(windows.iter().all(|w| field(w, "frames") >= 4.0), "{err}");
    assert!(windows.iter().any(|w| field(w, "lines") >= 1.0), "{err}");
    // Window k+1's prompt holds the summary written after window k.
    for (k, r) in running.iter().enumerate() {
        let summary = &r[r.find(" summary=").unwrap() + 9..];
        let next = windows[k + 1];
        let prompt = &next[next.find(" prompt=").unwrap() + 8..];
        assert!(
            prompt.contains(&format!(
                "Summary of the recording up to {}",
                mmss_short(spans[k + 1].0)
            )),
            "{prompt}"
        );
        assert!(
            prompt.contains(summary.trim()),
            "window {} prompt lacks the summary {summary:?}:\n{prompt}",
            k + 2
        );
    }
    assert!(!windows[0].contains("Summary of the recording up to"));
    // The last answer is the summary event.
    let events = read_events(&out_dir.join("clip/events.jsonl"));
    let s: Vec<&Value> = events
        .iter()
        .filter(|e| e["kind"] == "summary" && e.get("text").is_some())
        .collect();
    assert_eq!(s.len(), 1, "{events:?}");
    // It says what went in: the windows, and the frames and lines across them.
    assert_eq!(s[0]["windows"], windows.len(), "{:?}", s[0]);
    let frames: f64 = windows.iter().map(|w| field(w, "frames")).sum();
    let lines: f64 = windows.iter().map(|w| field(w, "lines")).sum();
    assert_eq!(s[0]["frames"].as_f64(), Some(frames), "{:?}", s[0]);
    assert_eq!(s[0]["transcript_lines"].as_f64(), Some(lines), "{:?}", s[0]);
}

fn mmss_short(t: f64) -> String {
    let s = t.max(0.0) as u64;
    format!("{:02}:{:02}", s / 60, s % 60)
}
