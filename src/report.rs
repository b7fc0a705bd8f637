//! `report.html`, written by `percept analyze` beside `summary.md`: the summary, a timeline
//! drawn by percept as SVG (audio level, voice, motion, scene changes, transcript segments and
//! thumbnails on one time axis), frame thumbnails that open their moment in the transcript,
//! and the transcript itself.
//!
//! One file that reads offline: thumbnails are embedded as JPEG data URIs, there is no script,
//! and a Content-Security-Policy forbids loading or running anything. Model text is escaped
//! like in the other outputs: it is text, never markup.
//!
//! Everything comes from the recording's `events.jsonl`, except the thumbnails, which are
//! decoded again from the recording by seeking to each chosen moment (a few tens of frames,
//! however long the recording).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;

/// File name of the report inside the recording's output folder.
pub const REPORT_FILE: &str = "report.html";
/// Most thumbnails in one report.
pub const MAX_THUMBNAILS: usize = 48;
/// Width of a thumbnail, pixels.
pub const THUMB_WIDTH: u32 = 240;
/// Columns of the SVG's signal rows: longer recordings are binned to this many.
const BINS: usize = 600;
/// How long one seek may take before the thumbnails are given up.
const SEEK_TIMEOUT: Duration = Duration::from_secs(10);

/// What the report is drawn from, read out of `events.jsonl`.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ReportData {
    pub summary: Option<String>,
    /// Media seconds covered by the events.
    pub duration: f64,
    /// (t, end, level dBFS, voice) per audio chunk.
    pub audio: Vec<(f64, f64, f64, bool)>,
    /// (t, motion 0..1, scene change) per analysed frame.
    pub frames: Vec<(f64, f64, bool)>,
    /// (t, end, text) per transcript window.
    pub transcript: Vec<(f64, f64, String)>,
    /// (t, end, reason) per gap.
    pub gaps: Vec<(f64, f64, String)>,
}

/// A frame shown in the report.
#[derive(Debug, Clone, PartialEq)]
pub struct Thumbnail {
    pub t: f64,
    pub jpeg: Vec<u8>,
    pub scene_change: bool,
}

/// Reads the events of one recording.
pub fn read_events(text: &str) -> ReportData {
    let mut d = ReportData::default();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let t = v["t"].as_f64().unwrap_or(0.0);
        let end = v["end"].as_f64().unwrap_or(t);
        let text = |k: &str| v[k].as_str().unwrap_or_default().to_string();
        match v["kind"].as_str() {
            Some("audio") => d.audio.push((
                t,
                end,
                v["level"].as_f64().unwrap_or(-120.0),
                v["voice"].as_bool().unwrap_or(false),
            )),
            Some("frame") => d.frames.push((
                t,
                v["motion"].as_f64().unwrap_or(0.0),
                v["scene_change"].as_bool().unwrap_or(false),
            )),
            Some("transcript") => d.transcript.push((t, end, text("text"))),
            Some("gap") => d.gaps.push((t, end, text("reason"))),
            Some("summary") if v["text"].is_string() => d.summary = Some(text("text")),
            _ => {}
        }
        if matches!(
            v["kind"].as_str(),
            Some("audio" | "frame" | "transcript" | "gap")
        ) {
            d.duration = d.duration.max(end).max(t);
        }
    }
    d.transcript.sort_by(|a, b| a.0.total_cmp(&b.0));
    d
}

/// The moments to show: every scene change, and one frame per `every` seconds in between,
/// at most [`MAX_THUMBNAILS`] (scene changes first, then the regular ones, evenly thinned).
pub fn thumbnail_times(d: &ReportData) -> Vec<(f64, bool)> {
    if d.frames.is_empty() {
        return Vec::new();
    }
    let every = (d.duration / 24.0).clamp(5.0, 300.0);
    let first = d.frames.first().map(|f| f.0).unwrap_or(0.0);
    let mut scenes: Vec<f64> = d.frames.iter().filter(|f| f.2).map(|f| f.0).collect();
    if scenes.len() > MAX_THUMBNAILS {
        scenes = thin(&scenes, MAX_THUMBNAILS);
    }
    let mut regular = Vec::new();
    let mut t = first;
    while t <= d.duration {
        // A scene change close by stands for this moment already.
        if !scenes.iter().any(|s| (s - t).abs() < every / 2.0) {
            regular.push(t);
        }
        t += every;
    }
    let room = MAX_THUMBNAILS - scenes.len();
    if regular.len() > room {
        regular = thin(&regular, room);
    }
    let mut out: Vec<(f64, bool)> = scenes
        .into_iter()
        .map(|s| (s, true))
        .chain(regular.into_iter().map(|r| (r, false)))
        .collect();
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

/// `n` of `v`, evenly spaced.
fn thin(v: &[f64], n: usize) -> Vec<f64> {
    if n == 0 {
        return Vec::new();
    }
    (0..n).map(|i| v[i * v.len() / n]).collect()
}

#[derive(Debug, thiserror::Error)]
pub enum ThumbnailError {
    #[error("GStreamer: {0}")]
    Gst(String),
    #[error("the recording did not preroll within {0:?}")]
    Timeout(Duration),
}

fn gst_err(e: impl std::fmt::Display) -> ThumbnailError {
    ThumbnailError::Gst(e.to_string())
}

/// Decodes the frames at `times` (seconds) from `recording`, [`THUMB_WIDTH`] wide, as JPEG.
pub fn grab_thumbnails(
    recording: &Path,
    times: &[(f64, bool)],
) -> Result<Vec<Thumbnail>, ThumbnailError> {
    if times.is_empty() {
        return Ok(Vec::new());
    }
    gst::init().map_err(gst_err)?;
    let abs = std::fs::canonicalize(recording).map_err(gst_err)?;
    let uri = gst::glib::filename_to_uri(&abs, None).map_err(gst_err)?;
    let pipeline = gst::parse::launch(&format!(
        "uridecodebin name=d uri=\"{uri}\" d. ! queue ! videoconvert ! videoscale \
         ! video/x-raw,format=RGB,width={THUMB_WIDTH},pixel-aspect-ratio=1/1 \
         ! appsink name=sink sync=false max-buffers=1"
    ))
    .map_err(gst_err)?
    .downcast::<gst::Pipeline>()
    .map_err(|_| ThumbnailError::Gst("not a pipeline".into()))?;
    let result = grab_with(&pipeline, times);
    let _ = pipeline.set_state(gst::State::Null);
    result
}

fn grab_with(
    pipeline: &gst::Pipeline,
    times: &[(f64, bool)],
) -> Result<Vec<Thumbnail>, ThumbnailError> {
    let sink = pipeline
        .by_name("sink")
        .and_then(|e| e.downcast::<gst_app::AppSink>().ok())
        .ok_or_else(|| ThumbnailError::Gst("no appsink".into()))?;
    let bus = pipeline
        .bus()
        .ok_or_else(|| ThumbnailError::Gst("no bus".into()))?;
    pipeline.set_state(gst::State::Paused).map_err(gst_err)?;
    wait_preroll(&bus)?;
    let mut out = Vec::new();
    for &(t, scene_change) in times {
        let pos = gst::ClockTime::from_nseconds((t.max(0.0) * 1e9) as u64);
        if pipeline
            .seek_simple(gst::SeekFlags::FLUSH | gst::SeekFlags::ACCURATE, pos)
            .is_err()
        {
            continue;
        }
        wait_preroll(&bus)?;
        let Some(sample) = sink.try_pull_preroll(gst::ClockTime::from_seconds(2)) else {
            continue;
        };
        if let Some(jpeg) = sample_jpeg(&sample) {
            out.push(Thumbnail {
                t,
                jpeg,
                scene_change,
            });
        }
    }
    Ok(out)
}

/// Until the pipeline has prerolled (after start or a flushing seek).
fn wait_preroll(bus: &gst::Bus) -> Result<(), ThumbnailError> {
    use gst::MessageView;
    let msg = bus.timed_pop_filtered(
        gst::ClockTime::from_mseconds(SEEK_TIMEOUT.as_millis() as u64),
        &[gst::MessageType::AsyncDone, gst::MessageType::Error],
    );
    match msg.as_ref().map(|m| m.view()) {
        Some(MessageView::AsyncDone(_)) => Ok(()),
        Some(MessageView::Error(e)) => Err(ThumbnailError::Gst(e.error().to_string())),
        _ => Err(ThumbnailError::Timeout(SEEK_TIMEOUT)),
    }
}

fn sample_jpeg(sample: &gst::Sample) -> Option<Vec<u8>> {
    let caps = sample.caps()?;
    let s = caps.structure(0)?;
    let w = u32::try_from(s.get::<i32>("width").ok()?).ok()?;
    let h = u32::try_from(s.get::<i32>("height").ok()?).ok()?;
    let buf = sample.buffer()?.map_readable().ok()?;
    // Rows may be padded to 4 bytes.
    let stride = (w as usize * 3).div_ceil(4) * 4;
    let mut rgb = Vec::with_capacity(w as usize * h as usize * 3);
    for y in 0..h as usize {
        let row = buf.get(y * stride..y * stride + w as usize * 3)?;
        rgb.extend_from_slice(row);
    }
    let frame = crate::ingest::VideoFrame {
        t: 0.0,
        width: w,
        height: h,
        rgb,
        captured: std::time::Instant::now(),
    };
    crate::ingest::latest::encode_jpeg(&frame, 75)
}

/// Writes `report.html` into `out_dir` for `recording` from its `events` file; thumbnails that
/// cannot be decoded are left out (logged), the report is still written.
pub fn write(recording: &Path, events: &Path, out_dir: &Path) -> std::io::Result<PathBuf> {
    let text = std::fs::read_to_string(events)?;
    let data = read_events(&text);
    let times = thumbnail_times(&data);
    let thumbs = grab_thumbnails(recording, &times).unwrap_or_else(|e| {
        tracing::warn!(recording = %recording.display(), error = %e, "Cannot decode thumbnails for the report; it is written without them.");
        Vec::new()
    });
    let html = render(&recording.display().to_string(), &data, &thumbs);
    let path = out_dir.join(REPORT_FILE);
    let tmp = out_dir.join(format!("{REPORT_FILE}.tmp"));
    std::fs::write(&tmp, html)?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

/// Text for HTML content and attribute values.
pub fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            _ => o.push(c),
        }
    }
    o
}

fn clock(t: f64) -> String {
    let s = t.max(0.0).round() as u64;
    if s >= 3600 {
        format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
    } else {
        format!("{:02}:{:02}", s / 60, s % 60)
    }
}

/// The transcript segment a moment opens: the one playing then, else the last before it,
/// else the first.
fn segment_at(d: &ReportData, t: f64) -> Option<usize> {
    if d.transcript.is_empty() {
        return None;
    }
    d.transcript
        .iter()
        .position(|s| s.0 <= t + 1e-6 && t < s.1)
        .or_else(|| d.transcript.iter().rposition(|s| s.0 <= t))
        .or(Some(0))
}

/// A tick spacing for the axis: about eight labels whatever the length.
fn tick_step(duration: f64) -> f64 {
    const STEPS: [f64; 14] = [
        1.0, 2.0, 5.0, 10.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 3600.0, 7200.0,
    ];
    STEPS
        .iter()
        .copied()
        .find(|s| duration / s <= 10.0)
        .unwrap_or(14400.0)
}

// SVG geometry, in viewBox units.
const W: f64 = 1000.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 8.0;
const PLOT: f64 = W - LEFT - RIGHT;
const ROW_AUDIO: (f64, f64) = (4.0, 56.0);
const ROW_VOICE: (f64, f64) = (64.0, 12.0);
const ROW_MOTION: (f64, f64) = (80.0, 40.0);
const ROW_SPEECH: (f64, f64) = (126.0, 22.0);
const ROW_FRAMES: (f64, f64) = (152.0, 12.0);
const AXIS_Y: f64 = 168.0;
const H: f64 = 186.0;

fn svg_timeline(d: &ReportData, thumbs: &[Thumbnail]) -> String {
    let dur = d.duration.max(1e-3);
    let x = |t: f64| LEFT + (t / dur).clamp(0.0, 1.0) * PLOT;
    let mut s = String::new();
    let _ = write!(
        s,
        "<svg id=\"timeline-svg\" viewBox=\"0 0 {W} {H}\" role=\"img\" data-duration=\"{dur:.3}\" \
         aria-label=\"timeline from 00:00 to {}\">",
        clock(dur)
    );
    for (name, (y, h)) in [
        ("audio", ROW_AUDIO),
        ("voice", ROW_VOICE),
        ("motion", ROW_MOTION),
        ("speech", ROW_SPEECH),
        ("frames", ROW_FRAMES),
    ] {
        let _ = write!(
            s,
            "<rect class=\"row\" x=\"{LEFT}\" y=\"{y}\" width=\"{PLOT}\" height=\"{h}\"/>\
             <text class=\"lbl\" x=\"{}\" y=\"{}\">{name}</text>",
            LEFT - 6.0,
            y + h / 2.0 + 4.0
        );
    }
    // Audio level and voice, binned: the loudest chunk and any voice per column.
    let bins = BINS;
    let bw = PLOT / bins as f64;
    let mut level = vec![None::<f64>; bins];
    let mut voice = vec![false; bins];
    let bin_of = |t: f64| (((t / dur) * bins as f64) as usize).min(bins - 1);
    for &(t, end, l, v) in &d.audio {
        for b in bin_of(t)..=bin_of((end - 1e-6).max(t)) {
            level[b] = Some(level[b].map_or(l, |m: f64| m.max(l)));
            voice[b] |= v;
        }
    }
    let (ay, ah) = ROW_AUDIO;
    for (b, l) in level.iter().enumerate() {
        let Some(l) = l else { continue };
        let hgt = (((l + 80.0) / 80.0).clamp(0.0, 1.0) * ah).max(0.5);
        let _ = write!(
            s,
            "<rect class=\"level\" x=\"{:.2}\" y=\"{:.2}\" width=\"{:.2}\" height=\"{hgt:.2}\"/>",
            LEFT + b as f64 * bw,
            ay + ah - hgt,
            bw
        );
    }
    // Voice as runs, so a long speech is one shape.
    let (vy, vh) = ROW_VOICE;
    let mut b = 0;
    while b < bins {
        if voice[b] {
            let start = b;
            while b < bins && voice[b] {
                b += 1;
            }
            let _ = write!(
                s,
                "<rect class=\"voice\" x=\"{:.2}\" y=\"{vy}\" width=\"{:.2}\" height=\"{vh}\"/>",
                LEFT + start as f64 * bw,
                (b - start) as f64 * bw
            );
        } else {
            b += 1;
        }
    }
    let (my, mh) = ROW_MOTION;
    let mut motion = vec![None::<f64>; bins];
    for &(t, m, _) in &d.frames {
        let i = bin_of(t);
        motion[i] = Some(motion[i].map_or(m, |x: f64| x.max(m)));
    }
    for (i, m) in motion.iter().enumerate() {
        let Some(m) = m else { continue };
        // Motion scores are small (mean luma change); a quarter already reads as full.
        let hgt = ((m * 4.0).clamp(0.0, 1.0) * mh).max(0.5);
        let _ = write!(
            s,
            "<rect class=\"motion\" x=\"{:.2}\" y=\"{:.2}\" width=\"{:.2}\" height=\"{hgt:.2}\"/>",
            LEFT + i as f64 * bw,
            my + mh - hgt,
            bw
        );
    }
    for &(t, _, scene) in &d.frames {
        if scene {
            let _ = write!(
                s,
                "<line class=\"scene\" x1=\"{0:.2}\" x2=\"{0:.2}\" y1=\"{1}\" y2=\"{2}\"><title>scene change at {3}</title></line>",
                x(t),
                ROW_AUDIO.0,
                ROW_MOTION.0 + ROW_MOTION.1,
                clock(t)
            );
        }
    }
    for (t, end, reason) in &d.gaps {
        let _ = write!(
            s,
            "<rect class=\"gap\" x=\"{:.2}\" y=\"{}\" width=\"{:.2}\" height=\"{}\"><title>gap {}-{}: {}</title></rect>",
            x(*t),
            ROW_AUDIO.0,
            (x(*end) - x(*t)).max(1.0),
            ROW_FRAMES.0 + ROW_FRAMES.1 - ROW_AUDIO.0,
            clock(*t),
            clock(*end),
            esc(reason)
        );
    }
    let (sy, sh) = ROW_SPEECH;
    for (i, (t, end, text)) in d.transcript.iter().enumerate() {
        let _ = write!(
            s,
            "<a href=\"#seg-{i}\"><rect class=\"seg\" x=\"{:.2}\" y=\"{sy}\" width=\"{:.2}\" height=\"{sh}\"><title>{} {}</title></rect></a>",
            x(*t),
            (x(*end) - x(*t)).max(1.5),
            clock(*t),
            esc(text)
        );
    }
    let (fy, fh) = ROW_FRAMES;
    for (i, th) in thumbs.iter().enumerate() {
        let _ = write!(
            s,
            "<a href=\"#frame-{i}\"><rect class=\"thumbmark\" x=\"{:.2}\" y=\"{fy}\" width=\"3\" height=\"{fh}\"><title>frame at {}</title></rect></a>",
            x(th.t) - 1.5,
            clock(th.t)
        );
    }
    let step = tick_step(dur);
    let mut t = 0.0;
    while t <= dur + 1e-6 {
        let _ = write!(
            s,
            "<line class=\"tick\" x1=\"{0:.2}\" x2=\"{0:.2}\" y1=\"{1}\" y2=\"{2}\"/>\
             <text class=\"axis\" x=\"{0:.2}\" y=\"{3}\">{4}</text>",
            x(t),
            AXIS_Y - 4.0,
            AXIS_Y,
            AXIS_Y + 14.0,
            clock(t)
        );
        t += step;
    }
    s.push_str("</svg>");
    s
}

const STYLE: &str = "\
*{box-sizing:border-box}\
body{margin:0;font:15px/1.5 system-ui,sans-serif;color:#111827;background:#f3f4f6}\
header{background:#1f2937;color:#f9fafb;padding:14px 20px}\
header h1{margin:0;font-size:20px;overflow-wrap:anywhere}\
header .meta{color:#d1d5db;font-size:13px;overflow-wrap:anywhere}\
section{background:#fff;border:1px solid #d1d5db;border-radius:6px;margin:14px;padding:12px 16px}\
h2{margin:0 0 8px;font-size:16px}\
.summary{white-space:pre-wrap;overflow-wrap:anywhere;margin:0}\
svg{display:block;width:100%;height:auto}\
svg .row{fill:#f9fafb;stroke:#e5e7eb;stroke-width:.5}\
svg .lbl{font-size:11px;fill:#6b7280;text-anchor:end}\
svg .axis{font-size:11px;fill:#374151;text-anchor:middle}\
svg .tick{stroke:#9ca3af;stroke-width:1}\
svg .level{fill:#10b981}\
svg .voice{fill:#7c3aed}\
svg .motion{fill:#3b82f6}\
svg .scene{stroke:#f59e0b;stroke-width:1.5}\
svg .gap{fill:#9ca3af;fill-opacity:.45}\
svg .seg{fill:#c4b5fd;stroke:#7c3aed;stroke-width:.5}\
svg a:hover .seg{fill:#7c3aed}\
svg .thumbmark{fill:#111827}\
.legend{display:flex;flex-wrap:wrap;gap:2px 14px;font-size:12px;color:#4b5563;margin-top:6px}\
.legend i{display:inline-block;width:10px;height:9px;margin-right:4px}\
.thumbs{display:grid;grid-template-columns:repeat(auto-fill,minmax(150px,1fr));gap:10px}\
.thumb{display:block;text-decoration:none;color:#374151;font-size:12px;border:1px solid #e5e7eb;border-radius:4px;overflow:hidden;background:#f9fafb}\
.thumb img{display:block;width:100%;height:auto}\
.thumb span{display:block;padding:2px 6px}\
.thumb.scene span{color:#b45309}\
.thumb:target{outline:3px solid #2563eb}\
ol.transcript{list-style:none;margin:0;padding:0}\
ol.transcript li{padding:4px 6px;border-radius:4px;overflow-wrap:anywhere;scroll-margin-top:12px}\
ol.transcript li:target{background:#fef3c7;outline:2px solid #f59e0b}\
ol.transcript .time{font-variant-numeric:tabular-nums;color:#6b7280;margin-right:8px;text-decoration:none}\
.none{color:#6b7280}\
";

/// The whole report as one HTML document.
pub fn render(recording: &str, d: &ReportData, thumbs: &[Thumbnail]) -> String {
    use base64::Engine as _;
    let name = Path::new(recording)
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| recording.to_string());
    let mut h = String::new();
    let _ = write!(
        h,
        "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'\">\
         <title>{} - percept report</title><style>{STYLE}</style></head><body>\
         <header><h1>{}</h1><div class=\"meta\">{} · {} analysed · {} transcript segments · {} frames shown</div></header>",
        esc(&name),
        esc(&name),
        esc(recording),
        clock(d.duration),
        d.transcript.len(),
        thumbs.len()
    );
    let _ = write!(
        h,
        "<section id=\"summary\"><h2>Summary</h2><p class=\"summary\">{}</p></section>",
        d.summary.as_deref().map(esc).unwrap_or_else(|| {
            "(no speech was transcribed, so there is nothing to summarize)".into()
        })
    );
    let _ = write!(
        h,
        "<section id=\"timeline\"><h2>Timeline</h2>{}<div class=\"legend\">\
         <span><i style=\"background:#10b981\"></i>audio level</span>\
         <span><i style=\"background:#7c3aed\"></i>voice</span>\
         <span><i style=\"background:#3b82f6\"></i>motion</span>\
         <span><i style=\"background:#f59e0b\"></i>scene change</span>\
         <span><i style=\"background:#c4b5fd\"></i>transcript segment (opens it)</span>\
         <span><i style=\"background:#111827\"></i>frame below</span>\
         <span><i style=\"background:#9ca3af\"></i>gap</span></div></section>",
        svg_timeline(d, thumbs)
    );
    h.push_str("<section id=\"frames\"><h2>Frames</h2>");
    if thumbs.is_empty() {
        h.push_str("<p class=\"none\">(no video)</p>");
    } else {
        h.push_str("<div class=\"thumbs\">");
        for (i, th) in thumbs.iter().enumerate() {
            let href = segment_at(d, th.t)
                .map(|k| format!("#seg-{k}"))
                .unwrap_or_else(|| "#transcript".into());
            let _ = write!(
                h,
                "<a class=\"thumb{}\" id=\"frame-{i}\" href=\"{href}\" data-t=\"{:.3}\">\
                 <img alt=\"frame at {}\" src=\"data:image/jpeg;base64,{}\"><span>{}{}</span></a>",
                if th.scene_change { " scene" } else { "" },
                th.t,
                clock(th.t),
                base64::engine::general_purpose::STANDARD.encode(&th.jpeg),
                clock(th.t),
                if th.scene_change {
                    " · scene change"
                } else {
                    ""
                }
            );
        }
        h.push_str("</div>");
    }
    h.push_str("</section><section id=\"transcript\"><h2>Transcript</h2>");
    if d.transcript.is_empty() {
        h.push_str("<p class=\"none\">(no speech)</p>");
    } else {
        h.push_str("<ol class=\"transcript\">");
        for (i, (t, end, text)) in d.transcript.iter().enumerate() {
            let _ = write!(
                h,
                "<li id=\"seg-{i}\" data-t=\"{t:.3}\" data-end=\"{end:.3}\"><a class=\"time\" href=\"#seg-{i}\">{}-{}</a>{}</li>",
                clock(*t),
                clock(*end),
                esc(text)
            );
        }
        h.push_str("</ol>");
    }
    h.push_str("</section></body></html>\n");
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data() -> ReportData {
        read_events(
            &[
                r#"{"source":"r","t":0.0,"end":1.0,"kind":"audio","level":-30.0,"voice":true,"samples":16000}"#,
                r#"{"source":"r","t":1.0,"end":2.0,"kind":"audio","level":-70.0,"voice":false,"samples":16000}"#,
                r#"{"source":"r","t":0.5,"kind":"frame","width":4,"height":4,"motion":0.0,"scene_change":false,"latency_ms":1.0}"#,
                r#"{"source":"r","t":1.5,"kind":"frame","width":4,"height":4,"motion":0.5,"scene_change":true,"latency_ms":1.0}"#,
                r#"{"source":"r","t":0.0,"end":1.0,"kind":"transcript","text":"<script>alert(1)</script> & \"quotes\""}"#,
                r#"{"source":"r","t":2.0,"kind":"summary","text":"A <b>short</b> talk."}"#,
                r#"{"source":"r","t":2.0,"kind":"summary","frames_decoded":2}"#,
                "not json",
            ]
            .join("\n"),
        )
    }

    #[test]
    fn reads_events_and_escapes_model_text() {
        let d = data();
        assert_eq!(d.duration, 2.0);
        assert_eq!(d.audio.len(), 2);
        assert_eq!(d.frames.len(), 2);
        assert_eq!(d.summary.as_deref(), Some("A <b>short</b> talk."));
        let html = render("/x/a <b>.wav", &d, &[]);
        assert!(!html.contains("<script>"), "{html}");
        assert!(!html.contains("<b>"), "{html}");
        assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt; &amp; &quot;quotes&quot;"));
        assert!(html.contains("A &lt;b&gt;short&lt;/b&gt; talk."));
        assert!(html.contains("<li id=\"seg-0\""));
        // No script and nothing fetched from elsewhere.
        assert!(!html.contains("<script"));
        assert!(!html.contains("http://") && !html.contains("https://"));
    }

    #[test]
    fn thumbnails_at_scene_changes_and_regular_moments() {
        let mut d = data();
        // The regular moment at 0.5 s is close enough to the cut at 1.5 s to be left out.
        assert_eq!(thumbnail_times(&d), vec![(1.5, true)]);
        d.duration = 3600.0;
        d.frames = (0..3600).map(|i| (f64::from(i), 0.0, i % 7 == 0)).collect();
        let t = thumbnail_times(&d);
        assert_eq!(t.len(), MAX_THUMBNAILS);
        assert!(t.iter().all(|x| x.1));
        assert!(t.windows(2).all(|w| w[0].0 < w[1].0));
        d.frames = vec![(0.0, 0.0, false)];
        assert!(thumbnail_times(&ReportData::default()).is_empty());
        assert!(segment_at(&d, 10.0).is_some());
    }
}
