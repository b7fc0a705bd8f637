//! Running summary of a recording longer than the model's context (`percept analyze`).
//!
//! The clip's frames (one kept per [`SUMMARY_FRAME_SECONDS`]) and transcript lines are
//! merged in time order and cut into consecutive windows `[t0, t1)` that each fit the
//! token budget (context minus the answer and the carried summary) and a length cap in
//! seconds. Window k's prompt holds its frames (as a video), its transcript lines and the
//! summary the model wrote after window k-1; the answer to the last window is the
//! recording's summary. Windows are requested one after the other, each only once the
//! previous answer is in.

use std::sync::Arc;

use crate::ingest::VideoFrame;

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
    pub frames: Vec<Arc<VideoFrame>>,
    /// Transcript lines `(t, text)`.
    pub lines: Vec<(f64, String)>,
}

/// A rough token count of text (about 3 characters per token, plus the line's stamp).
pub fn text_tokens(s: &str) -> usize {
    s.chars().count().div_ceil(3) + 4
}

enum Item {
    Frame(Arc<VideoFrame>),
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
    frames: &[Arc<VideoFrame>],
    transcript: &[(f64, f64, String)],
    end: f64,
    budget: &WindowBudget,
) -> Vec<SummaryWindow> {
    let mut items: Vec<Item> = frames
        .iter()
        .map(|f| Item::Frame(Arc::clone(f)))
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

    fn frame(t: f64) -> Arc<VideoFrame> {
        Arc::new(VideoFrame {
            t,
            width: 2,
            height: 2,
            rgb: vec![0; 12],
            captured: std::time::Instant::now(),
        })
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
