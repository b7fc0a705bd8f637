//! `summarize`: frames kept one per `SUMMARY_FRAME_SECONDS` and the transcript become a
//! summary in windows that fit the context (at the end of a recording; every
//! `summary_window_seconds` on a live source, carrying the previous summary). The planning
//! itself is in [`super::summary`].

use std::sync::Arc;
use std::time::Instant;

use crate::config::TaskKind;
use crate::ingest::VideoFrame;

use super::*;

/// Token budget of a summary.
const SUMMARY_TOKENS: usize = 256;

impl SourceTask {
    /// `summarize`: frames are kept for the windowed summary (at the end of a recording,
    /// every `summary_window_seconds` on a live source), not asked about one by one.
    pub(super) fn keep_for_summary(&mut self, frame: VideoFrame) -> Option<Job> {
        if summary::frame_due(self.last_kept, frame.t) {
            self.last_kept = Some(frame.t);
            match summary::KeptFrame::keep(&frame, self.frames_dir().as_deref()) {
                Ok(k) => {
                    if let Some(p) = k.path() {
                        self.unsynced_frames.push(p.to_path_buf());
                    }
                    self.clip_frames.push(k);
                }
                Err(e) => {
                    tracing::error!(source = %self.name, error = %e, "Cannot keep a frame for the summary.");
                    self.recording_lost(e);
                }
            }
        }
        self.rolling_summary_job(frame.t)
    }

    /// Live `summarize`: once `summary_window_seconds` of media have passed since the
    /// window began, its frames and transcript lines become a summary request carrying
    /// the previous rolling summary; what it used is then let go, so memory holds one
    /// window at most. While a summary is still being made the window grows, its frames
    /// thinned to one every two seconds, then four..., so it stays bounded.
    pub(super) fn rolling_summary_job(&mut self, now: f64) -> Option<Job> {
        if !self.live {
            return None;
        }
        let span = self.env.captions.summary_window_seconds;
        let cap = (2.0 * span / summary::SUMMARY_FRAME_SECONDS)
            .ceil()
            .max(2.0) as usize;
        while self.clip_frames.len() > cap {
            let mut i = 0;
            self.clip_frames.retain(|_| {
                i += 1;
                i % 2 == 1
            });
        }
        if self.summary_busy || now - self.rolling_t0 < span {
            return None;
        }
        let (t0, t1) = (self.rolling_t0, now);
        self.rolling_t0 = now;
        let lines: Vec<(f64, f64, String)> = self
            .transcript
            .iter()
            .filter(|l| l.0 >= t0 && l.0 < t1)
            .cloned()
            .collect();
        // Lines of earlier windows are not needed any more (live transcripts are endless).
        self.transcript.retain(|l| l.0 >= t1);
        let frames = std::mem::take(&mut self.clip_frames);
        if frames.is_empty() && lines.is_empty() {
            return None;
        }
        let budget = self.summary_budget();
        let windows = summary::plan(&frames, &lines, t1, &budget);
        self.start_summary(t0, windows, self.rolling_summary.clone())
    }

    pub(super) fn summary_budget(&self) -> summary::WindowBudget {
        summary::WindowBudget {
            context_tokens: self.env.context,
            answer_tokens: SUMMARY_TOKENS,
            frame_tokens: VIDEO_FRAME_TOKENS + summary::FRAME_TEXT_TOKENS,
            prompt_tokens: summary::prompt_tokens(&self.env.prompts.summarize),
            max_seconds: self.env.captions.summary_window_seconds,
        }
    }

    pub(super) fn start_summary(
        &mut self,
        t0: f64,
        windows: Vec<summary::SummaryWindow>,
        previous: Option<String>,
    ) -> Option<Job> {
        self.summary_total = windows.len();
        self.summary_inputs = windows
            .iter()
            .fold((0, 0), |(f, l), w| (f + w.frames.len(), l + w.lines.len()));
        self.summary_windows = windows.into();
        self.summary_t0 = t0;
        let job = self.next_summary_job(previous.as_deref());
        self.summary_busy = job.is_some();
        job
    }

    /// The first job of the recording's summary (task `summarize`), if there is anything
    /// to summarize: the clip's frames and transcript cut into windows that fit the context
    /// (see [`summary`]); the later windows follow one by one from [`SourceTask::on_answer`],
    /// each carrying the summary so far.
    pub fn summary_job(&mut self) -> Option<Job> {
        if self.spec.task != TaskKind::Summarize
            || (self.transcript.is_empty() && self.clip_frames.is_empty())
        {
            return None;
        }
        let end = self.transcript.last().map(|l| l.1).unwrap_or(0.0).max(
            self.clip_frames
                .last()
                .map(|f| f.t + summary::SUMMARY_FRAME_SECONDS)
                .unwrap_or(0.0),
        );
        if self.live {
            // The rest of a live source's last rolling window.
            let t0 = self.rolling_t0;
            let lines: Vec<_> = self
                .transcript
                .iter()
                .filter(|l| l.0 >= t0)
                .cloned()
                .collect();
            let frames = std::mem::take(&mut self.clip_frames);
            if self.summary_busy || (frames.is_empty() && lines.is_empty()) {
                return None;
            }
            let windows = summary::plan(&frames, &lines, end.max(t0), &self.summary_budget());
            return self.start_summary(t0, windows, self.rolling_summary.clone());
        }
        let windows = summary::plan(
            &self.clip_frames,
            &self.transcript,
            end,
            &self.summary_budget(),
        );
        // The frames now live in the windows only.
        self.clip_frames = Vec::new();
        self.start_summary(0.0, windows, None)
    }

    pub(super) fn next_summary_job(&mut self, previous: Option<&str>) -> Option<Job> {
        let w = self.summary_windows.pop_front()?;
        let n = self.summary_total;
        let k = n - self.summary_windows.len();
        let mut j = self.job(JobClass::Text, w.t0, w.t1, Instant::now());
        j.task = TaskKind::Summarize;
        j.prompt = summary::window_prompt(&self.env.prompts.summarize, k, n, &w, previous);
        j.max_tokens = SUMMARY_TOKENS;
        j.soft_tokens = VIDEO_FRAME_TOKENS;
        tracing::info!(source = %self.name, window = k, of = n, t0 = w.t0, t1 = w.t1, frames = w.frames.len(), lines = w.lines.len(), prompt = %j.prompt, "Summary window.");
        // Decoded only now: one window's frames are in memory as RGB at a time.
        let mut video = Vec::with_capacity(w.frames.len());
        for f in &w.frames {
            match f.load() {
                Ok(v) => video.push(Arc::new(v)),
                Err(e) => {
                    tracing::error!(source = %self.name, error = %e, "A kept frame cannot be read; the summary goes on without it.");
                    self.recording_lost(e);
                }
            }
        }
        j.video = video;
        Some(j)
    }

    /// A summary window that will not be answered ends its summary: the next (live) window
    /// starts a new one.
    pub(super) fn summary_chain_broken(&mut self, job: &Job) {
        if job.class == JobClass::Text && job.task == TaskKind::Summarize {
            self.summary_windows.clear();
            self.summary_busy = false;
        }
    }
}

pub(super) fn mmss(t: f64) -> String {
    let s = t.max(0.0) as u64;
    format!("{:02}:{:02}", s / 60, s % 60)
}
