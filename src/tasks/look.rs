//! Tasks that look at frames: `describe` (one frame or a window of frames as video),
//! `watch` (questions answered as JSON, alerts with snapshots, one retry) and
//! `listen-and-look` (a frame with the last seconds of audio).

use std::path::PathBuf;
use std::sync::Arc;

use crate::config::TaskKind;
use crate::event::Body;
use crate::ingest::VideoFrame;

use super::*;

impl SourceTask {
    /// `describe`, `watch`, `listen-and-look`: the gates (governor rate, motion, heartbeat,
    /// a loud sound) decide whether this frame becomes a job.
    pub(super) fn look(&mut self, frame: VideoFrame, motion: f64) -> Option<Job> {
        let task = self.spec.task;
        if !task.uses_video() {
            return None;
        }
        if !self.gov.frame_due(frame.t, self.last_sent) {
            self.skip(SkipReason::Rate);
            return None;
        }
        let heartbeat = self
            .last_sent
            .is_none_or(|l| frame.t - l >= self.env.governor.heartbeat_seconds);
        let moved = motion >= self.env.scene_threshold;
        if !(heartbeat || moved || self.look_requested) {
            self.skip(SkipReason::NoMotion);
            return None;
        }
        self.look_requested = false;
        self.last_sent = Some(frame.t);
        self.gov.note_frame_sent(frame.t);
        let frame = Arc::new(frame);
        self.env
            .live_board
            .set_frame(&self.name, Arc::clone(&frame));
        let captured = frame.captured;
        let t = frame.t;
        if task == TaskKind::Describe && self.spec.window_frames > 1 {
            self.window.push(frame);
            if self.window.len() < self.spec.window_frames as usize {
                return None;
            }
            let frames = std::mem::take(&mut self.window);
            let t0 = frames.first().map(|f| f.t).unwrap_or(t);
            let mut job = self.job(JobClass::Frame, t0, t, captured);
            job.prompt = self
                .spec
                .prompt
                .clone()
                .unwrap_or_else(|| self.env.prompts.describe_video.clone());
            job.soft_tokens = VIDEO_FRAME_TOKENS;
            job.video = frames;
            return Some(job);
        }
        let mut job = self.job(JobClass::Frame, t, t, captured);
        if task == TaskKind::ListenAndLook {
            let voice_only = self.gov.audio_voice_only();
            let any_voice = self.recent_audio.iter().any(|c| c.2);
            if !voice_only || any_voice {
                let mut samples = Vec::new();
                let mut t0 = t;
                for (ct, s, _) in &self.recent_audio {
                    if samples.is_empty() {
                        t0 = *ct;
                    }
                    samples.extend_from_slice(s);
                }
                if !samples.is_empty() {
                    job.t = t0.min(t);
                    job.audio = Some(Arc::new(samples));
                }
            }
        }
        job.frame = Some(frame);
        Some(job)
    }

    pub(super) fn on_watch(&mut self, job: &Job, text: &str) -> Option<Job> {
        match watch::parse_reply(text, &self.spec.questions) {
            Ok(answers) => {
                for a in answers {
                    let alert = a.yes && a.confidence >= self.env.alerts.min_confidence;
                    self.feed.events.answer(&self.name, &a.question, alert);
                    if !alert {
                        continue;
                    }
                    let snapshot = job.frame.as_ref().and_then(|f| self.snapshot(f));
                    let body = Body::Alert {
                        question: a.question,
                        answer: "yes".into(),
                        confidence: a.confidence,
                        evidence: a.evidence,
                        snapshot,
                    };
                    // Webhooks take alerts from the events (`tasks::webhook`).
                    self.feed.emit(job.t, Some(job.end), body);
                }
                None
            }
            Err(problem) if job.attempt == 0 => {
                let mut retry = job.clone();
                retry.attempt = 1;
                retry.class = JobClass::Text;
                retry.prompt =
                    watch::retry_prompt(&self.env.prompts.watch, &self.spec.questions, &problem);
                Some(retry)
            }
            Err(problem) => {
                self.count_error(job);
                self.feed.emit(
                    job.t,
                    None,
                    Body::Error {
                        message: format!(
                            "watch: the model's answer is not valid after a retry: {problem}"
                        ),
                        raw: Some(text.chars().take(2000).collect()),
                    },
                );
                None
            }
        }
    }

    pub(super) fn snapshot(&self, f: &VideoFrame) -> Option<String> {
        if self.env.alerts.snapshot_dir.is_empty() {
            return None;
        }
        let dir = PathBuf::from(&self.env.alerts.snapshot_dir).join(&self.name);
        let jpeg = f.jpeg()?;
        match std::fs::create_dir_all(&dir).and_then(|()| snapshot::write_new(&dir, f.t, &jpeg)) {
            Ok(path) => Some(path.display().to_string()),
            Err(e) => {
                tracing::warn!(source = %self.name, error = %e, dir = %dir.display(), "Cannot write the alert snapshot.");
                None
            }
        }
    }
}
