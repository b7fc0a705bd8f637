//! `percept analyze`: output folder per recording, and resume after SIGKILL with no
//! duplicated and no missing events.

use crate::common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Four spoken sentences with 1.5 s pauses (about 21 s).
fn recording(d: &Path) -> PathBuf {
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

fn config(d: &Path, name: &str, delay_ms: u64) -> PathBuf {
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
fn content(dir: &Path) -> Vec<String> {
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
