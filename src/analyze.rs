//! `percept analyze PATH...`: field recordings analysed as fast as the model allows, one
//! output folder per recording (`transcript.vtt`, `transcript.srt`, `events.jsonl`,
//! `summary.md`), resumable after any interruption, SIGKILL included.
//!
//! Resume works from `checkpoint.json`, replaced atomically after each committed transcript
//! window: the media time the model has covered and the length of `events.jsonl` then. A
//! rerun cuts `events.jsonl` back to that length (dropping anything written after it),
//! reads back which `audio`/`frame` events exist, rewrites the transcript files from the
//! committed windows, and continues: the model hears audio again from the checkpoint, and
//! no event is written twice. Audio windows are cut by the same voice-activity rule on the
//! same chunk grid in both runs, so the resumed windows are the ones the first run would
//! have made.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::config::{Config, SourceConfig, TaskKind};
use crate::control::ModelStatus;
use crate::run::{self, Overrides, RunExtras, SharedModel};
use crate::tasks::Resume;

const MEDIA_EXTENSIONS: [&str; 13] = [
    "wav", "flac", "mp3", "ogg", "opus", "m4a", "aac", "mp4", "mov", "mkv", "webm", "ts", "avi",
];

#[derive(Debug, thiserror::Error)]
pub enum AnalyzeError {
    #[error("{path}: {message}")]
    Input { path: String, message: String },
    #[error("{0}")]
    Config(String),
    #[error("model unavailable: {0}")]
    Model(String),
    #[error("{path}: {error}")]
    Io { path: String, error: std::io::Error },
    #[error("{0}")]
    Run(#[from] run::RunError),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> AnalyzeError + '_ {
    move |error| AnalyzeError::Io {
        path: path.display().to_string(),
        error,
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
struct Checkpoint {
    recording: String,
    /// Size and modification time: a changed recording starts over.
    size: u64,
    mtime: u64,
    /// Media seconds the transcript is complete up to.
    media_t: f64,
    /// Length of events.jsonl at that point.
    events_bytes: u64,
    done: bool,
}

/// Outcome per recording, for the caller's report.
#[derive(Debug)]
pub struct Analyzed {
    pub recording: PathBuf,
    pub out_dir: PathBuf,
    pub skipped: bool,
    pub resumed_from: Option<f64>,
    pub transcript_windows: usize,
}

/// Files under `paths` (folders searched recursively for media), in a stable order.
pub fn collect(paths: &[PathBuf]) -> Result<Vec<PathBuf>, AnalyzeError> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut found = Vec::new();
            walk(p, &mut found).map_err(io_err(p))?;
            found.sort();
            if found.is_empty() {
                return Err(AnalyzeError::Input {
                    path: p.display().to_string(),
                    message: format!(
                        "no media files in this folder (looked for {})",
                        MEDIA_EXTENSIONS.join(", ")
                    ),
                });
            }
            out.extend(found);
        } else if p.is_file() {
            out.push(p.clone());
        } else {
            return Err(AnalyzeError::Input {
                path: p.display().to_string(),
                message: "no such file or folder".into(),
            });
        }
    }
    Ok(out)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let p = entry?.path();
        if p.is_dir() {
            walk(&p, out)?;
        } else if p
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| MEDIA_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        {
            out.push(p);
        }
    }
    Ok(())
}

/// A short, file-system- and label-safe name from the file stem.
fn source_name(p: &Path) -> String {
    let stem = p
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("recording");
    let n: String = stem
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    if n.is_empty() {
        "recording".into()
    } else {
        n
    }
}

fn fingerprint(p: &Path) -> Result<(u64, u64), AnalyzeError> {
    let m = std::fs::metadata(p).map_err(io_err(p))?;
    let mtime = m
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map(|d| d.as_secs())
        .unwrap_or(0);
    Ok((m.len(), mtime))
}

fn write_checkpoint(path: &Path, cp: &Checkpoint) -> std::io::Result<()> {
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_vec_pretty(cp).map_err(std::io::Error::other)?;
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&text)?;
        f.sync_all()?;
    }
    // rename is atomic: a SIGKILL leaves the old or the new checkpoint, never half of one.
    std::fs::rename(&tmp, path)
}

fn read_checkpoint(path: &Path) -> Option<Checkpoint> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

/// Cut events.jsonl back to the checkpoint and read what it holds.
fn prepare_resume(events: &Path, cp: &Checkpoint) -> Result<Resume, AnalyzeError> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(events)
        .map_err(io_err(events))?;
    f.set_len(cp.events_bytes).map_err(io_err(events))?;
    drop(f);
    let text = std::fs::read_to_string(events).map_err(io_err(events))?;
    let mut r = Resume {
        model_from: cp.media_t,
        ..Resume::default()
    };
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let t = v["t"].as_f64().unwrap_or(0.0);
        let end = v["end"].as_f64().unwrap_or(t);
        match v["kind"].as_str() {
            Some("audio") => r.audio_after = r.audio_after.max(end),
            Some("frame") => r.frame_after = Some(r.frame_after.map_or(t, |f: f64| f.max(t))),
            Some("transcript") => {
                r.transcript
                    .push((t, end, v["text"].as_str().unwrap_or_default().to_string()))
            }
            _ => {}
        }
    }
    Ok(r)
}

fn mmss(t: f64) -> String {
    let s = t.max(0.0) as u64;
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

/// summary.md from the recording's events: the model's summary, then the transcript.
fn write_summary_md(recording: &Path, events: &Path, out: &Path) -> Result<usize, AnalyzeError> {
    let text = std::fs::read_to_string(events).map_err(io_err(events))?;
    let mut summary = None;
    let mut lines = Vec::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        match v["kind"].as_str() {
            Some("summary") if v.get("text").is_some() => {
                summary = v["text"].as_str().map(str::to_string)
            }
            Some("transcript") => lines.push(format!(
                "- [{}] {}",
                mmss(v["t"].as_f64().unwrap_or(0.0)),
                md_escape(v["text"].as_str().unwrap_or_default())
            )),
            _ => {}
        }
    }
    let md = format!(
        "# {}\n\n## Summary\n\n{}\n\n## Transcript\n\n{}\n",
        md_escape(&recording.display().to_string()),
        summary.map(|s| md_escape(&s)).unwrap_or_else(|| {
            "(no speech was transcribed, so there is nothing to summarize)".into()
        }),
        if lines.is_empty() {
            "(no speech)".to_string()
        } else {
            lines.join("\n")
        }
    );
    std::fs::write(out, md).map_err(io_err(out))?;
    Ok(lines.len())
}

/// Model text is untrusted: no raw HTML or link syntax reaches a Markdown renderer.
fn md_escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '&' => o.push_str("&amp;"),
            '[' | ']' | '`' | '*' | '_' | '#' | '|' | '\\' => {
                o.push('\\');
                o.push(c);
            }
            '\n' | '\r' => o.push(' '),
            _ => o.push(c),
        }
    }
    o
}

/// Analyse every recording under `paths` into `out`, loading the model once.
pub fn analyze(
    cfg: Config,
    paths: &[PathBuf],
    out: &Path,
    stop: Arc<AtomicBool>,
) -> Result<Vec<Analyzed>, AnalyzeError> {
    let recordings = prepare(&cfg, paths)?;
    let (model, engine) = SharedModel::start(&cfg.model)?;
    loop {
        match model.live.model() {
            ModelStatus::Ready { .. } => break,
            ModelStatus::Unavailable { id, message } => {
                return Err(AnalyzeError::Model(format!("'{id}': {message}")));
            }
            _ if stop.load(Ordering::Relaxed) => return Ok(Vec::new()),
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    let results = analyze_each(&cfg, &recordings, out, &model, stop);
    model.dispatch.close();
    let _ = engine.join();
    results
}

/// [`analyze`] with a model that is already being served (`bench clip` passes random
/// weights at a real shape); the caller closes its dispatch.
pub fn analyze_with(
    cfg: Config,
    paths: &[PathBuf],
    out: &Path,
    stop: Arc<AtomicBool>,
    model: &SharedModel,
) -> Result<Vec<Analyzed>, AnalyzeError> {
    let recordings = prepare(&cfg, paths)?;
    analyze_each(&cfg, &recordings, out, model, stop)
}

/// Checks the config and finds the recordings.
pub(crate) fn prepare(cfg: &Config, paths: &[PathBuf]) -> Result<Vec<PathBuf>, AnalyzeError> {
    let problems = cfg.validate();
    if !problems.is_empty() {
        return Err(AnalyzeError::Config(problems.join("; ")));
    }
    if !cfg.model.enabled {
        return Err(AnalyzeError::Config(
            "analyze needs the model: [model] enabled is false".into(),
        ));
    }
    let recordings = collect(paths)?;
    gstreamer::init().map_err(|e| AnalyzeError::Config(format!("GStreamer: {e}")))?;
    Ok(recordings)
}

/// The output folder name of each recording: its file stem made safe, `-2`, `-3`... on a
/// repeat (`percept enqueue` names queued jobs with it too).
pub fn output_names(recordings: &[PathBuf]) -> Vec<String> {
    let mut used = std::collections::HashSet::new();
    recordings
        .iter()
        .map(|rec| {
            let mut name = source_name(rec);
            let mut k = 2;
            while !used.insert(name.clone()) {
                name = format!("{}-{k}", source_name(rec));
                k += 1;
            }
            name
        })
        .collect()
}

fn analyze_each(
    cfg: &Config,
    recordings: &[PathBuf],
    out: &Path,
    model: &SharedModel,
    stop: Arc<AtomicBool>,
) -> Result<Vec<Analyzed>, AnalyzeError> {
    let mut results = Vec::new();
    for (rec, name) in recordings.iter().zip(output_names(recordings)) {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        results.push(analyze_one(cfg, rec, &name, out, model, stop.clone())?);
    }
    Ok(results)
}

pub(crate) fn analyze_one(
    cfg: &Config,
    rec: &Path,
    name: &str,
    out: &Path,
    model: &SharedModel,
    stop: Arc<AtomicBool>,
) -> Result<Analyzed, AnalyzeError> {
    let dir = out.join(name);
    std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let events = dir.join("events.jsonl");
    let cp_path = dir.join("checkpoint.json");
    let vtt = dir.join("transcript.vtt");
    let srt = dir.join("transcript.srt");
    let (size, mtime) = fingerprint(rec)?;
    let recording = rec.display().to_string();
    let previous = read_checkpoint(&cp_path)
        .filter(|c| c.recording == recording && c.size == size && c.mtime == mtime);
    let mut resume = None;
    match &previous {
        Some(c) if c.done => {
            tracing::info!(recording = %recording, out = %dir.display(), "Already analysed; remove its folder to analyse it again.");
            return Ok(Analyzed {
                recording: rec.to_path_buf(),
                out_dir: dir,
                skipped: true,
                resumed_from: None,
                transcript_windows: 0,
            });
        }
        Some(c) if events.exists() => {
            tracing::info!(recording = %recording, from = c.media_t, "Resuming from the checkpoint.");
            resume = Some(prepare_resume(&events, c)?);
        }
        _ => {
            for f in [&events, &vtt, &srt, &dir.join("summary.md"), &cp_path] {
                if f.exists() {
                    std::fs::remove_file(f).map_err(io_err(f))?;
                }
            }
        }
    }
    let resumed_from = resume.as_ref().map(|r| r.model_from);
    let mut c = cfg.clone();
    let mut sc = SourceConfig::from_uri(&recording);
    sc.name = Some(name.to_string());
    sc.task = TaskKind::Summarize;
    c.sources = vec![sc];
    c.run.events = events.display().to_string();
    c.run.realtime = false;
    c.http.enabled = false;
    c.captions.dir = String::new();
    let cp_file = cp_path.clone();
    let base = Checkpoint {
        recording: recording.clone(),
        size,
        mtime,
        media_t: resumed_from.unwrap_or(0.0),
        events_bytes: 0,
        done: false,
    };
    let cp_base = base.clone();
    let checkpoint: Arc<dyn Fn(f64, u64) + Send + Sync> = Arc::new(move |t, bytes| {
        let cp = Checkpoint {
            media_t: t,
            events_bytes: bytes,
            ..cp_base.clone()
        };
        if let Err(e) = write_checkpoint(&cp_file, &cp) {
            tracing::error!(path = %cp_file.display(), error = %e, "Cannot write the checkpoint.");
        }
    });
    let started = Instant::now();
    let report = run::run_with(
        &c,
        &Overrides::default(),
        stop.clone(),
        Arc::new(AtomicBool::new(false)),
        RunExtras {
            model: Some(model.clone()),
            resume,
            transcript_files: Some((vtt.clone(), srt.clone())),
            checkpoint: Some(checkpoint),
        },
    )?;
    if let Some(f) = report.failures.first() {
        return Err(AnalyzeError::Input {
            path: recording,
            message: f.clone(),
        });
    }
    if stop.load(Ordering::Relaxed) {
        // Interrupted: the checkpoint stays for the next run.
        return Ok(Analyzed {
            recording: rec.to_path_buf(),
            out_dir: dir,
            skipped: false,
            resumed_from,
            transcript_windows: 0,
        });
    }
    if !vtt.exists() {
        // No speech: still leave valid, empty subtitle files.
        crate::tasks::empty_transcript_files(&vtt, &srt).map_err(|e| AnalyzeError::Input {
            path: vtt.display().to_string(),
            message: e.to_string(),
        })?;
    }
    let windows = write_summary_md(rec, &events, &dir.join("summary.md"))?;
    let done = Checkpoint {
        done: true,
        events_bytes: std::fs::metadata(&events).map(|m| m.len()).unwrap_or(0),
        ..base
    };
    write_checkpoint(&cp_path, &done).map_err(io_err(&cp_path))?;
    tracing::info!(recording = %recording, out = %dir.display(), transcript_windows = windows, wall_seconds = started.elapsed().as_secs_f64(), "Recording analysed.");
    Ok(Analyzed {
        recording: rec.to_path_buf(),
        out_dir: dir,
        skipped: false,
        resumed_from,
        transcript_windows: windows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_markdown_are_safe() {
        assert_eq!(
            source_name(Path::new("/a/field rec #1.wav")),
            "field_rec__1"
        );
        assert_eq!(md_escape("<script>[x](y)"), "&lt;script&gt;\\[x\\](y)");
        assert_eq!(mmss(3725.2), "01:02:05");
    }
}
