//! Running summary of a recording longer than the model's context (`percept analyze`).
//!
//! The clip's frames (one kept per [`SUMMARY_FRAME_SECONDS`]) and transcript lines are
//! merged in time order and cut into consecutive windows `[t0, t1)` that each fit the
//! token budget (context minus the answer and the carried summary) and a length cap in
//! seconds. Window k's prompt holds its frames (as a video), its transcript lines and the
//! summary the model wrote after window k-1; the answer to the last window is the
//! recording's summary. Windows are requested one after the other, each only once the
//! previous answer is in.
//!
//! Kept frames are small: scaled down to [`KEPT_FRAME_MAX_SIDE`] and JPEG-encoded
//! ([`KeptFrame`]), in memory or, for `percept analyze`, as files under the recording's
//! output folder (`frames/<media ms>.jpg`), so a resumed analysis still has the frames of
//! the first run. A window's frames are decoded only when its request is made.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use crate::ingest::VideoFrame;
use crate::preprocess::image::{decode_rgb, resize_bicubic, RgbImage};

/// Longest side of a kept frame, pixels: above what the model's video frames use (70 soft
/// tokens are about 535x300 for 16:9), so scaling down loses nothing the model would see.
pub const KEPT_FRAME_MAX_SIDE: usize = 640;
/// JPEG quality of kept frames.
const KEPT_FRAME_QUALITY: u8 = 90;

/// A frame kept for a summary: its media time and a small JPEG.
#[derive(Debug, Clone)]
pub struct KeptFrame {
    pub t: f64,
    jpeg: Kept,
}

#[derive(Debug, Clone)]
enum Kept {
    Memory(Arc<Vec<u8>>),
    File(PathBuf),
}

impl KeptFrame {
    /// Scales `frame` down, encodes it and, with `dir`, writes it there (not synced: see
    /// [`sync_kept`]). A memory-only kept frame when `dir` is `None`.
    pub fn keep(frame: &VideoFrame, dir: Option<&Path>) -> Result<KeptFrame, String> {
        let (w, h) = (frame.width as usize, frame.height as usize);
        if w == 0 || h == 0 || frame.rgb.len() != w * h * 3 {
            return Err(format!("frame at {:.3} s: bad size {w}x{h}", frame.t));
        }
        let scale = KEPT_FRAME_MAX_SIDE as f64 / w.max(h) as f64;
        let img = RgbImage::new(w, h, frame.rgb.clone());
        let img = if scale < 1.0 {
            let nw = ((w as f64 * scale).round() as usize).max(1);
            let nh = ((h as f64 * scale).round() as usize).max(1);
            resize_bicubic(&img, nw, nh)
        } else {
            img
        };
        let mut jpeg = Vec::new();
        {
            use image::ImageEncoder;
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, KEPT_FRAME_QUALITY)
                .write_image(
                    &img.data,
                    img.width as u32,
                    img.height as u32,
                    image::ExtendedColorType::Rgb8,
                )
                .map_err(|e| format!("frame at {:.3} s: {e}", frame.t))?;
        }
        let Some(dir) = dir else {
            return Ok(KeptFrame {
                t: frame.t,
                jpeg: Kept::Memory(Arc::new(jpeg)),
            });
        };
        let path = dir.join(kept_name(frame.t));
        std::fs::create_dir_all(dir)
            .and_then(|()| std::fs::write(&path, &jpeg))
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
        Ok(KeptFrame {
            t: frame.t,
            jpeg: Kept::File(path),
        })
    }

    /// The frame, decoded (for the window's request).
    pub fn load(&self) -> Result<VideoFrame, String> {
        let bytes = match &self.jpeg {
            Kept::Memory(b) => Arc::clone(b),
            Kept::File(p) => {
                Arc::new(std::fs::read(p).map_err(|e| format!("reading {}: {e}", p.display()))?)
            }
        };
        let img = decode_rgb(&bytes).map_err(|e| format!("frame at {:.3} s: {e}", self.t))?;
        Ok(VideoFrame {
            t: self.t,
            width: img.width as u32,
            height: img.height as u32,
            rgb: img.data,
            captured: Instant::now(),
        })
    }

    /// The file this frame is in, if it is in one.
    pub fn path(&self) -> Option<&Path> {
        match &self.jpeg {
            Kept::File(p) => Some(p),
            Kept::Memory(_) => None,
        }
    }

    /// Bytes this frame holds in memory.
    pub fn memory_bytes(&self) -> usize {
        match &self.jpeg {
            Kept::Memory(b) => b.len(),
            Kept::File(_) => 0,
        }
    }
}

/// `<media milliseconds, 12 digits>.jpg`: sorts by time, and the time reads back exactly.
fn kept_name(t: f64) -> String {
    format!("{:012}.jpg", (t.max(0.0) * 1000.0).round() as u64)
}

/// The frames an earlier run kept in `dir`, in time order (none if there is no folder).
pub fn kept_in(dir: &Path) -> Vec<KeptFrame> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<KeptFrame> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let ms: u64 = name.strip_suffix(".jpg")?.parse().ok()?;
            Some(KeptFrame {
                t: ms as f64 / 1000.0,
                jpeg: Kept::File(e.path()),
            })
        })
        .collect();
    out.sort_by(|a, b| a.t.total_cmp(&b.t));
    out
}

/// The kept frame files in `paths` and their folder, on disk (before a checkpoint that
/// vouches for them).
pub fn sync_kept(paths: &[PathBuf]) -> std::io::Result<()> {
    for p in paths {
        std::fs::File::open(p)?.sync_data()?;
    }
    if let Some(dir) = paths.first().and_then(|p| p.parent()) {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// Is a frame at `t` kept, the last kept one being at `last`? One per
/// [`SUMMARY_FRAME_SECONDS`] of media: the first frame, then each one at least that long
/// after the last kept one. A resumed analysis replays this rule over the `frame` events.
pub fn frame_due(last: Option<f64>, t: f64) -> bool {
    last.is_none_or(|l| t - l >= SUMMARY_FRAME_SECONDS - 1e-6)
}

/// Spacing of the frames kept for the summary (1 fps, the seed's demonstration rate).
pub const SUMMARY_FRAME_SECONDS: f64 = 1.0;
/// Bytes of the text a window's prompt adds around the task's own prompt (the part header,
/// the carried-summary preamble, the chat template's turn markers), rounded up.
const PROMPT_TEXT_BYTES: usize = 320;
/// Text tokens around each frame's soft tokens: its `mm:ss ` stamp (6 bytes), the image
/// start and end markers and the joining space (see `tokenizer::video_expansion`).
pub const FRAME_TEXT_TOKENS: usize = 9;

/// Tokens reserved for a window's prompt text: its bytes, an upper bound for any
/// byte-fallback tokenizer (a 12B summary window once overflowed an 8192-token context when
/// this was a flat 64 and frames were counted without their stamps).
pub fn prompt_tokens(task_prompt: &str) -> usize {
    task_prompt.len() + PROMPT_TEXT_BYTES
}

/// How big a summary window may be.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WindowBudget {
    /// The model's context (prompt + answer), tokens.
    pub context_tokens: usize,
    /// Tokens of the answer (the summary carried into the next window).
    pub answer_tokens: usize,
    /// Tokens per frame: soft tokens and [`FRAME_TEXT_TOKENS`].
    pub frame_tokens: usize,
    /// Tokens of the prompt text (see [`prompt_tokens`]).
    pub prompt_tokens: usize,
    /// Longest window, media seconds.
    pub max_seconds: f64,
}

impl WindowBudget {
    /// Tokens one window's frames and lines may take: the context less the answer, the
    /// carried summary (at most one answer long) and the prompt text.
    pub fn media_tokens(&self) -> usize {
        self.context_tokens
            .saturating_sub(2 * self.answer_tokens + self.prompt_tokens)
            .max(self.frame_tokens)
    }
}

/// One window of the clip: `[t0, t1)` and what falls in it, in time order.
#[derive(Debug, Clone)]
pub struct SummaryWindow {
    pub t0: f64,
    pub t1: f64,
    pub frames: Vec<KeptFrame>,
    /// Transcript lines `(t, text)`.
    pub lines: Vec<(f64, String)>,
}

/// A rough token count of text (about 3 characters per token, plus the line's stamp).
pub fn text_tokens(s: &str) -> usize {
    s.chars().count().div_ceil(3) + 4
}

enum Item {
    Frame(KeptFrame),
    Line(f64, String),
}

impl Item {
    fn t(&self) -> f64 {
        match self {
            Item::Frame(f) => f.t,
            Item::Line(t, _) => *t,
        }
    }
}

/// Cuts `[0, end)` into consecutive windows holding the frames and transcript lines in time
/// order, each within `budget`. Windows without anything in them are not made (a silent,
/// still stretch extends the next window back to the previous one's end).
pub fn plan(
    frames: &[KeptFrame],
    transcript: &[(f64, f64, String)],
    end: f64,
    budget: &WindowBudget,
) -> Vec<SummaryWindow> {
    let mut items: Vec<Item> = frames
        .iter()
        .map(|f| Item::Frame(f.clone()))
        .chain(transcript.iter().map(|(t, _, s)| Item::Line(*t, s.clone())))
        .collect();
    // Stable: at equal times frames come before the words spoken over them.
    items.sort_by(|a, b| a.t().total_cmp(&b.t()));
    let limit = budget.media_tokens();
    let mut out: Vec<SummaryWindow> = Vec::new();
    let mut cur = SummaryWindow {
        t0: 0.0,
        t1: 0.0,
        frames: Vec::new(),
        lines: Vec::new(),
    };
    let mut used = 0usize;
    for it in items {
        let cost = match &it {
            Item::Frame(_) => budget.frame_tokens,
            Item::Line(_, s) => text_tokens(s),
        };
        let t = it.t();
        let has_any = !cur.frames.is_empty() || !cur.lines.is_empty();
        if has_any && (used + cost > limit || t >= cur.t0 + budget.max_seconds) {
            let t0 = t.max(cur.t0);
            cur.t1 = t0;
            out.push(std::mem::replace(
                &mut cur,
                SummaryWindow {
                    t0,
                    t1: t0,
                    frames: Vec::new(),
                    lines: Vec::new(),
                },
            ));
            used = 0;
        }
        used += cost;
        match it {
            Item::Frame(f) => cur.frames.push(f),
            Item::Line(t, s) => cur.lines.push((t, s)),
        }
    }
    if !cur.frames.is_empty() || !cur.lines.is_empty() {
        cur.t1 = end.max(cur.t0);
        out.push(cur);
    }
    out
}

/// The prompt of window `k` (1-based) of `n`: the task's summary prompt, where the window
/// lies, the summary so far (windows after the first) and the window's transcript.
pub fn window_prompt(
    base: &str,
    k: usize,
    n: usize,
    w: &SummaryWindow,
    previous: Option<&str>,
) -> String {
    let mut p = base.to_string();
    if n > 1 {
        p.push_str(&format!(
            "\n\nThe recording is long, so it comes in {n} parts; this is part {k}, from {} to {}.",
            super::mmss(w.t0),
            super::mmss(w.t1)
        ));
        if !w.frames.is_empty() {
            p.push_str(" The video shows its frames, one per second.");
        }
    }
    if let Some(s) = previous {
        p.push_str(&format!(
            "\n\nSummary of the recording up to {}:\n{s}\n\nWrite the summary of the recording so far, keeping what still matters from it.",
            super::mmss(w.t0)
        ));
    }
    if w.lines.is_empty() {
        p.push_str("\n\n(No speech in this part.)");
    } else {
        let lines: Vec<String> = w
            .lines
            .iter()
            .map(|(t, s)| format!("[{}] {s}", super::mmss(*t)))
            .collect();
        p.push_str("\n\n");
        p.push_str(&lines.join("\n"));
    }
    p
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn frame(t: f64) -> KeptFrame {
        KeptFrame::keep(
            &VideoFrame {
                t,
                width: 2,
                height: 2,
                rgb: vec![0; 12],
                captured: std::time::Instant::now(),
            },
            None,
        )
        .unwrap()
    }

    #[test]
    fn kept_frames_are_small_and_come_back_from_disk() {
        let d = std::env::temp_dir().join(format!("percept-kept-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        // A 1280x720 gradient: 2.7 MB of RGB.
        let (w, h) = (1280usize, 720usize);
        let rgb: Vec<u8> = (0..w * h * 3)
            .map(|i| ((i / 3) % w * 255 / w) as u8)
            .collect();
        let f = VideoFrame {
            t: 12.5,
            width: w as u32,
            height: h as u32,
            rgb,
            captured: std::time::Instant::now(),
        };
        let k = KeptFrame::keep(&f, Some(&d)).unwrap();
        assert_eq!(k.memory_bytes(), 0);
        let on_disk = std::fs::metadata(k.path().unwrap()).unwrap().len();
        assert!(on_disk < 60_000, "{on_disk} bytes");
        let again = kept_in(&d);
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].t, 12.5);
        let back = again[0].load().unwrap();
        assert_eq!((back.width, back.height), (640, 360));
        // The gradient survives: left dark, right bright.
        assert!(back.rgb[0] < 10 && back.rgb[(639) * 3] > 240);
        sync_kept(&[k.path().unwrap().to_path_buf()]).unwrap();
        assert!(frame_due(None, 0.0) && frame_due(Some(1.0), 2.0) && !frame_due(Some(1.0), 1.5));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn windows_cover_the_clip_in_order_within_the_budget() {
        // 300 s at 1 fps with a line every 10 s; 70 tokens a frame; 4096 context.
        let frames: Vec<_> = (0..300).map(|i| frame(i as f64)).collect();
        let lines: Vec<_> = (0..30)
            .map(|i| {
                (
                    i as f64 * 10.0 + 0.5,
                    i as f64 * 10.0 + 3.0,
                    format!("line {i}"),
                )
            })
            .collect();
        let b = WindowBudget {
            context_tokens: 4096,
            answer_tokens: 256,
            frame_tokens: 70,
            prompt_tokens: 64,
            max_seconds: 120.0,
        };
        let w = plan(&frames, &lines, 300.0, &b);
        // (4096 - 512 - 64) = 3520 tokens: 48 frames and their 5 lines per window.
        assert_eq!(w.len(), 7);
        assert_eq!(w[0].t0, 0.0);
        assert_eq!(w.last().unwrap().t1, 300.0);
        for pair in w.windows(2) {
            assert_eq!(pair[0].t1, pair[1].t0, "contiguous");
        }
        let mut seen_frames = 0;
        for x in &w {
            let cost =
                x.frames.len() * 70 + x.lines.iter().map(|l| text_tokens(&l.1)).sum::<usize>();
            assert!(cost <= b.media_tokens(), "{cost}");
            assert!(x.frames.iter().all(|f| f.t >= x.t0 && f.t < x.t1));
            assert!(x.lines.iter().all(|l| l.0 >= x.t0 && l.0 < x.t1));
            seen_frames += x.frames.len();
        }
        assert_eq!(seen_frames, 300);
        assert_eq!(w.iter().map(|x| x.lines.len()).sum::<usize>(), 30);

        // Audio only: the seconds cap cuts.
        let w = plan(
            &[],
            &lines,
            300.0,
            &WindowBudget {
                max_seconds: 100.0,
                ..b
            },
        );
        let spans: Vec<(f64, f64)> = w.iter().map(|x| (x.t0, x.t1)).collect();
        assert_eq!(spans, vec![(0.0, 100.5), (100.5, 200.5), (200.5, 300.0)]);
    }

    #[test]
    fn the_prompt_carries_the_previous_summary() {
        let w = SummaryWindow {
            t0: 60.0,
            t1: 120.0,
            frames: vec![frame(61.0)],
            lines: vec![(62.0, "hello there".into())],
        };
        let p = window_prompt("Summarize.", 2, 3, &w, Some("A dog barks."));
        assert!(p.starts_with("Summarize."));
        assert!(p.contains("part 2, from 01:00 to 02:00"), "{p}");
        assert!(p.contains("Summary of the recording up to 01:00:\nA dog barks."));
        assert!(p.ends_with("[01:02] hello there"));
        let one = window_prompt("Summarize.", 1, 1, &w, None);
        assert_eq!(one, "Summarize.\n\n[01:02] hello there");
    }
}
