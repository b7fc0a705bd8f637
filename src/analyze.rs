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
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::config::{Config, SourceConfig, TaskKind};
use crate::control::ModelStatus;
use crate::lock;
use crate::run::{self, Overrides, RunExtras, SharedModel};
use crate::tasks::{RecordingHooks, Resume};

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
    /// Why this recording is not done (it is analysed again, from its checkpoint, next
    /// time); the batch goes on with the next recording.
    pub failed: Option<String>,
}

impl Analyzed {
    fn failed(recording: &Path, out_dir: PathBuf, why: String) -> Analyzed {
        Analyzed {
            recording: recording.to_path_buf(),
            out_dir,
            skipped: false,
            resumed_from: None,
            transcript_windows: 0,
            failed: Some(why),
        }
    }

    /// How a finished recording went, for the one line `percept analyze` prints about it.
    pub fn outcome(&self) -> String {
        if self.skipped {
            "already analysed".to_string()
        } else if let Some(t) = self.resumed_from {
            format!(
                "resumed at {t:.1} s, {} transcript lines",
                self.transcript_windows
            )
        } else {
            format!("{} transcript lines", self.transcript_windows)
        }
    }
}

/// Recordings found, and folders that could not be read with the reason.
pub type Found = (Vec<PathBuf>, Vec<(PathBuf, String)>);

/// Files under `paths` (folders searched recursively for media), in a stable order, and
/// the folders that could not be read (reported as failed, the rest goes on). Symbolic
/// links to folders inside a searched folder are not followed (a link back up would loop
/// forever); links to files are.
pub fn collect(paths: &[PathBuf]) -> Result<Found, AnalyzeError> {
    let mut out = Vec::new();
    let mut unreadable = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut found = Vec::new();
            walk(p, &mut found, &mut unreadable);
            found.sort();
            if found.is_empty() && !unreadable.iter().any(|(u, _)| u.starts_with(p)) {
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
    Ok((out, unreadable))
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>, unreadable: &mut Vec<(PathBuf, String)>) {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => {
            unreadable.push((dir.to_path_buf(), format!("cannot read this folder: {e}")));
            return;
        }
    };
    for entry in entries {
        let entry = match entry {
            Ok(e) => e,
            Err(e) => {
                unreadable.push((dir.to_path_buf(), format!("cannot read this folder: {e}")));
                continue;
            }
        };
        let p = entry.path();
        // The entry's own type: a symbolic link is a link here, not what it points to.
        let Ok(ft) = entry.file_type() else {
            continue;
        };
        if ft.is_dir() {
            walk(&p, out, unreadable);
        } else if ft.is_symlink() && p.is_dir() {
            tracing::info!(path = %p.display(), "Not following a symbolic link to a folder.");
        } else if p
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| MEDIA_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        {
            out.push(p);
        }
    }
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
    // rename is atomic: a SIGKILL leaves the old or the new checkpoint, never half of one;
    // syncing the folder makes the rename itself survive a power cut.
    std::fs::rename(&tmp, path)?;
    sync_dir(path)
}

/// The folder holding `path`, synced (its entries: new files, renames).
fn sync_dir(path: &Path) -> std::io::Result<()> {
    match path.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(d) => std::fs::File::open(d)?.sync_all(),
        None => Ok(()),
    }
}

/// A file's data on disk. Any descriptor will do: `fsync` writes back the file, not the
/// descriptor's own writes.
fn sync_file(path: &Path) -> std::io::Result<()> {
    std::fs::File::open(path)?.sync_data()
}

fn read_checkpoint(path: &Path) -> Option<Checkpoint> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

/// Cut events.jsonl back to what the checkpoint vouches for and read what it holds.
///
/// The checkpoint is written after the events were synced, but a file system may still
/// hand back less (a shorter file) or zeros (blocks allocated, never written) after a power
/// cut. So the file is read, not trusted: it is cut at the first line that is not a
/// complete event or at the checkpoint's length, whichever comes first, and never made
/// longer (that would pad it with NULs). When it had to be cut before the checkpoint's
/// length, the model goes back to the end of the last transcript window still there, so
/// what was lost is analysed again. The same holds for a `frame` event whose frame the
/// summary kept (the keep rule is replayed) but whose JPEG is not in `frames`.
fn prepare_resume(events: &Path, frames: &Path, cp: &Checkpoint) -> Result<Resume, AnalyzeError> {
    let kept: std::collections::HashSet<u64> = crate::tasks::summary::kept_in(frames)
        .iter()
        .map(|f| (f.t * 1000.0).round() as u64)
        .collect();
    let mut last_kept = None;
    let bytes = std::fs::read(events).map_err(io_err(events))?;
    let limit = (cp.events_bytes as usize).min(bytes.len());
    let mut kept_bytes = 0usize;
    let mut r = Resume {
        model_from: cp.media_t,
        ..Resume::default()
    };
    for line in bytes[..limit].split_inclusive(|b| *b == b'\n') {
        if !line.ends_with(b"\n") {
            break;
        }
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(line) else {
            break;
        };
        if !v.is_object() {
            break;
        }
        kept_bytes += line.len();
        let t = v["t"].as_f64().unwrap_or(0.0);
        let end = v["end"].as_f64().unwrap_or(t);
        match v["kind"].as_str() {
            Some("audio") => r.audio_after = r.audio_after.max(end),
            Some("frame") => {
                if crate::tasks::summary::frame_due(last_kept, t) {
                    if !kept.contains(&((t * 1000.0).round() as u64)) {
                        // Its summary frame is missing: this line and all after it go.
                        kept_bytes -= line.len();
                        break;
                    }
                    last_kept = Some(t);
                }
                r.frame_after = Some(r.frame_after.map_or(t, |f: f64| f.max(t)));
            }
            Some("transcript") => {
                r.transcript
                    .push((t, end, v["text"].as_str().unwrap_or_default().to_string()))
            }
            _ => {}
        }
    }
    let kept = kept_bytes;
    if (kept as u64) < cp.events_bytes {
        let back_to = r.transcript.last().map(|l| l.1).unwrap_or(0.0);
        tracing::warn!(
            events = %events.display(),
            on_disk = kept,
            checkpoint = cp.events_bytes,
            from = back_to,
            "The events file holds less than the checkpoint says (a power cut?); analysing again from the last transcript window on disk."
        );
        r.model_from = back_to.min(cp.media_t);
    }
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(events)
        .map_err(io_err(events))?;
    f.set_len(kept as u64).map_err(io_err(events))?;
    f.sync_all().map_err(io_err(events))?;
    Ok(r)
}

/// `percept analyze`'s side of [`RecordingHooks`]: syncs the events file and moves the
/// checkpoint; keeps the first failure.
struct Durable {
    checkpoint: PathBuf,
    events: PathBuf,
    frames: PathBuf,
    base: Checkpoint,
    failure: Mutex<Option<String>>,
}

impl Durable {
    fn failure(&self) -> Option<String> {
        lock(&self.failure).clone()
    }
}

impl RecordingHooks for Durable {
    fn commit(&self, t: f64, events_bytes: u64) -> Result<(), String> {
        let on_disk = std::fs::metadata(&self.events)
            .map(|m| m.len())
            .map_err(|e| format!("{}: {e}", self.events.display()))?;
        if on_disk < events_bytes {
            return Err(format!(
                "{}: {on_disk} bytes, but {events_bytes} were written",
                self.events.display()
            ));
        }
        sync_file(&self.events).map_err(|e| format!("syncing {}: {e}", self.events.display()))?;
        let cp = Checkpoint {
            media_t: t,
            events_bytes,
            ..self.base.clone()
        };
        write_checkpoint(&self.checkpoint, &cp)
            .map_err(|e| format!("writing {}: {e}", self.checkpoint.display()))
    }

    fn frames_dir(&self) -> Option<PathBuf> {
        Some(self.frames.clone())
    }

    fn fail(&self, what: String) {
        let mut f = lock(&self.failure);
        if f.is_none() {
            tracing::error!(checkpoint = %self.checkpoint.display(), error = %what, "The recording lost output; it stays not done and its checkpoint stays where it was.");
            *f = Some(what);
        }
    }
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

/// Analyse every recording under `paths` into `out`, loading the model once. A recording
/// that fails is reported in its [`Analyzed::failed`] and the batch goes on; errors that
/// stop everything (bad config, no model) are `Err`.
pub fn analyze(
    cfg: Config,
    paths: &[PathBuf],
    out: &Path,
    stop: Arc<AtomicBool>,
) -> Result<Vec<Analyzed>, AnalyzeError> {
    let found = prepare(&cfg, paths)?;
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
    let results = analyze_each(&cfg, &found, out, &model, stop);
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
    let found = prepare(&cfg, paths)?;
    analyze_each(&cfg, &found, out, model, stop)
}

/// Checks the config and finds the recordings.
pub(crate) fn prepare(cfg: &Config, paths: &[PathBuf]) -> Result<Found, AnalyzeError> {
    let problems = cfg.validate();
    if !problems.is_empty() {
        return Err(AnalyzeError::Config(problems.join("; ")));
    }
    if !cfg.model.enabled {
        return Err(AnalyzeError::Config(
            "analyze needs the model: [model] enabled is false".into(),
        ));
    }
    let found = collect(paths)?;
    gstreamer::init().map_err(|e| AnalyzeError::Config(format!("GStreamer: {e}")))?;
    Ok(found)
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
    found: &Found,
    out: &Path,
    model: &SharedModel,
    stop: Arc<AtomicBool>,
) -> Result<Vec<Analyzed>, AnalyzeError> {
    let (recordings, unreadable) = found;
    let mut results: Vec<Analyzed> = unreadable
        .iter()
        .map(|(p, why)| Analyzed::failed(p, PathBuf::new(), why.clone()))
        .collect();
    let mut used = std::collections::HashSet::new();
    let mut seen = std::collections::HashSet::new();
    for rec in recordings {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        if let ModelStatus::Unavailable { message, .. } = model.live.model() {
            results.push(Analyzed::failed(
                rec,
                PathBuf::new(),
                format!("model unavailable: {message}"),
            ));
            continue;
        }
        let identity = recording_identity(rec);
        if !seen.insert(identity.clone()) {
            // The same file named twice (or through a link): analysed once.
            continue;
        }
        let name = match claim_dir(out, rec, &identity, &mut used) {
            Ok(n) => n,
            Err(e) => {
                results.push(Analyzed::failed(rec, out.to_path_buf(), e.to_string()));
                continue;
            }
        };
        let dir = out.join(&name);
        match analyze_one(cfg, rec, &identity, &name, out, model, stop.clone()) {
            Ok(a) => results.push(a),
            Err(e) => {
                tracing::error!(recording = %rec.display(), error = %e, "Recording failed; going on with the next.");
                results.push(Analyzed::failed(rec, dir, e.to_string()));
            }
        }
    }
    Ok(results)
}

/// Who a recording is, across runs and working directories: its canonical path.
pub(crate) fn recording_identity(rec: &Path) -> String {
    std::fs::canonicalize(rec)
        .unwrap_or_else(|_| rec.to_path_buf())
        .display()
        .to_string()
}

/// The output folder of a recording: `<stem>`, or `<stem>-2`, `<stem>-3`... when another
/// recording with the same stem has that one. A folder belongs to the recording its
/// `checkpoint.json` names (written before anything else), so the same recording gets
/// the same folder on every run, whatever else is analysed with it and in what order.
fn claim_dir(
    out: &Path,
    rec: &Path,
    identity: &str,
    used: &mut std::collections::HashSet<String>,
) -> Result<String, AnalyzeError> {
    let base = source_name(rec);
    let candidate = |k: usize| {
        if k == 1 {
            base.clone()
        } else {
            format!("{base}-{k}")
        }
    };
    let mut free = None;
    for k in 1.. {
        let name = candidate(k);
        let dir = out.join(&name);
        if !dir.exists() {
            free = free.or(Some(name));
            break;
        }
        match read_checkpoint(&dir.join("checkpoint.json")) {
            Some(c) if c.recording == identity && !used.contains(&name) => {
                used.insert(name.clone());
                return Ok(name);
            }
            Some(_) => {}
            None if free.is_none() && !used.contains(&name) => free = Some(name),
            None => {}
        }
    }
    let name = free.unwrap_or_else(|| candidate(1));
    used.insert(name.clone());
    Ok(name)
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn analyze_one(
    cfg: &Config,
    rec: &Path,
    identity: &str,
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
    let summary_md = dir.join("summary.md");
    let frames = dir.join("frames");
    let (size, mtime) = fingerprint(rec)?;
    let recording = identity.to_string();
    let previous = read_checkpoint(&cp_path)
        .filter(|c| c.recording == recording && c.size == size && c.mtime == mtime);
    let mut resume = None;
    let base = Checkpoint {
        recording: recording.clone(),
        size,
        mtime,
        media_t: 0.0,
        events_bytes: 0,
        done: false,
    };
    match &previous {
        Some(c) if c.done => {
            tracing::info!(recording = %recording, out = %dir.display(), "Already analysed; remove its folder to analyse it again.");
            return Ok(Analyzed {
                recording: rec.to_path_buf(),
                out_dir: dir,
                skipped: true,
                resumed_from: None,
                transcript_windows: 0,
                failed: None,
            });
        }
        Some(c) if events.exists() => {
            let r = prepare_resume(&events, &frames, c)?;
            tracing::info!(recording = %recording, from = r.model_from, "Resuming from the checkpoint.");
            resume = Some(r);
        }
        _ => {
            for f in [&events, &vtt, &srt, &summary_md, &cp_path] {
                if f.exists() {
                    std::fs::remove_file(f).map_err(io_err(f))?;
                }
            }
            if frames.exists() {
                std::fs::remove_dir_all(&frames).map_err(io_err(&frames))?;
            }
            // The folder is this recording's from now on (see `claim_dir`).
            write_checkpoint(&cp_path, &base).map_err(io_err(&cp_path))?;
        }
    }
    let resumed_from = resume.as_ref().map(|r| r.model_from);
    let mut c = cfg.clone();
    let mut sc = SourceConfig::from_path(rec);
    sc.name = Some(name.to_string());
    sc.task = TaskKind::Summarize;
    c.sources = vec![sc];
    c.run.events = events.display().to_string();
    c.run.realtime = false;
    c.http.enabled = false;
    c.captions.dir = String::new();
    let durable = Arc::new(Durable {
        checkpoint: cp_path.clone(),
        events: events.clone(),
        frames: frames.clone(),
        base: Checkpoint {
            media_t: resumed_from.unwrap_or(0.0),
            ..base.clone()
        },
        failure: Mutex::new(None),
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
            checkpoint: Some(durable.clone()),
        },
    )?;
    if stop.load(Ordering::Relaxed) {
        // Interrupted: the checkpoint stays for the next run.
        return Ok(Analyzed {
            recording: rec.to_path_buf(),
            out_dir: dir,
            skipped: false,
            resumed_from,
            transcript_windows: 0,
            failed: None,
        });
    }
    let not_done = |message: String| AnalyzeError::Input {
        path: rec.display().to_string(),
        message,
    };
    if let Some(f) = report.failures.first() {
        return Err(not_done(f.clone()));
    }
    if let Some(f) = durable.failure() {
        return Err(not_done(format!(
            "{f} (not marked done; the next run goes on from the last checkpoint)"
        )));
    }
    if let ModelStatus::Unavailable { message, .. } = model.live.model() {
        return Err(not_done(format!("model unavailable: {message}")));
    }
    if !vtt.exists() {
        // No speech: still leave valid, empty subtitle files.
        crate::tasks::empty_transcript_files(&vtt, &srt).map_err(|e| AnalyzeError::Input {
            path: vtt.display().to_string(),
            message: e.to_string(),
        })?;
    }
    let windows = write_summary_md(rec, &events, &summary_md)?;
    // Everything the done checkpoint vouches for is on disk first.
    for f in [&events, &vtt, &srt, &summary_md] {
        sync_file(f).map_err(io_err(f))?;
    }
    crate::report::write(rec, &events, &dir).map_err(io_err(&dir.join("report.html")))?;
    sync_file(&dir.join("report.html")).map_err(io_err(&dir.join("report.html")))?;
    sync_dir(&summary_md).map_err(io_err(&dir))?;
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
        failed: None,
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
