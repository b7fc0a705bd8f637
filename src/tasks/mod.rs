//! Per-source tasks: what the model is asked about a source, which media reach it (the
//! gates), how fast (the governor), and what its answers become (events, alerts, captions).
//!
//! Data flow: the worker analyses signals, then hands each frame and chunk to the source's
//! [`SourceTask`], which may turn it into a [`Job`]; jobs wait in the [`dispatch::Dispatch`]
//! slots; the engine batches them across sources and sends each outcome back over the
//! worker's reply channel ([`reply`]); the worker, the only owner of the task, applies it.
//!
//! [`SourceTask`] (here) routes frames, chunks and outcomes by task kind; each kind's part is
//! its own file: `look.rs` (`describe`, `watch`, `listen-and-look`), `captioning.rs`
//! (`caption`), `transcript.rs` (`transcribe`, recordings and their checkpoints),
//! `summarize.rs` (`summarize`, planned by `summary.rs`). `job.rs` holds what goes to the
//! model and back.

mod captioning;
pub mod config;
pub mod dispatch;
pub mod governor;
mod job;
mod look;
pub mod recording;
pub mod reply;
pub mod snapshot;
mod summarize;
pub mod summary;
#[cfg(test)]
pub(crate) mod test_support;
mod transcript;
pub mod watch;
pub mod webhook;

pub use job::{Answer, Job, JobClass, SkipReason};
use summarize::mmss;
pub use transcript::{empty_transcript_files, RecordingHooks, Resume};

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use crate::caption::{suppress_repetition, AudioWindower, CaptionFiles, Stabilizer};
use crate::config::{AlertConfig, CaptionConfig, GovernorConfig, TaskKind, TaskPrompts};
use crate::control::LiveBoard;
use crate::event::{Body, SourceState};
use crate::ingest::{AudioChunk, SourceInput, VideoFrame, AUDIO_RATE};
use governor::Governor;
use recording::RecordingWindower;

/// What a source asks the model, changeable at runtime.
#[derive(Debug, Clone, PartialEq)]
pub struct TaskSpec {
    pub task: TaskKind,
    pub questions: Vec<String>,
    pub prompt: Option<String>,
    pub window_frames: u32,
}

/// Soft tokens per frame of a video window (the reference's video default).
pub const VIDEO_FRAME_TOKENS: usize = 70;

/// Everything a task needs besides its own state.
#[derive(Clone)]
pub struct TaskEnv {
    pub prompts: TaskPrompts,
    pub governor: GovernorConfig,
    pub captions: CaptionConfig,
    pub alerts: AlertConfig,
    pub scene_threshold: f64,
    pub max_tokens: usize,
    /// The model's context (prompt + answer), tokens: recordings longer than it are
    /// summarized in windows (see [`summary`]).
    pub context: usize,
    pub live_board: Arc<LiveBoard>,
    /// Where caption files go for this run (None: no files).
    pub caption_dir: Option<PathBuf>,
    /// Recordings (`percept analyze`): transcript cues go to these VTT/SRT files.
    pub transcript_files: Option<(PathBuf, PathBuf)>,
    /// Lifecycle states, so governor `state` events repeat the source's real state.
    pub board: Option<Arc<crate::ingest::supervisor::StateBoard>>,
    /// Recordings (`percept analyze`): told after each transcript window, and of anything
    /// the recording lost.
    pub checkpoint: Option<Arc<dyn RecordingHooks>>,
}

/// Seconds of audio kept for `listen-and-look`.
const LISTEN_SECONDS: f64 = 5.0;
/// A `state` event with governor figures at least this often (media seconds).
const STATE_EVERY: f64 = 5.0;

pub struct SourceTask {
    pub name: String,
    pub spec: TaskSpec,
    pub feed: Arc<SourceInput>,
    pub live: bool,
    env: TaskEnv,
    gov: Governor,
    last_sent: Option<f64>,
    look_requested: bool,
    windower: AudioWindower,
    recording: RecordingWindower,
    stabilizer: Stabilizer,
    captions: Option<CaptionFiles>,
    caption_error: bool,
    recent_audio: VecDeque<(f64, Vec<f32>, bool)>,
    window: Vec<Arc<VideoFrame>>,
    transcript: Vec<(f64, f64, String)>,
    transcript_files: Option<CaptionFiles>,
    last_state: f64,
    /// `summarize`: frames kept for the summary, one per `SUMMARY_FRAME_SECONDS`, small
    /// JPEGs (files under the recording's folder for `percept analyze`).
    clip_frames: Vec<summary::KeptFrame>,
    /// Media time of the last kept frame (kept frames may already be in windows).
    last_kept: Option<f64>,
    /// Kept frame files written since the last checkpoint (synced before the next one).
    unsynced_frames: Vec<PathBuf>,
    /// Live `summarize`: start of the rolling window being gathered; whether a summary
    /// is being asked for; the latest rolling summary (carried into the next window).
    rolling_t0: f64,
    summary_busy: bool,
    rolling_summary: Option<String>,
    /// Media start of the summary being made (0 for a whole recording).
    summary_t0: f64,
    /// `summarize`: summary windows not yet asked for, and how many there are in all.
    summary_windows: VecDeque<summary::SummaryWindow>,
    summary_total: usize,
    /// Frames and transcript lines across all summary windows.
    summary_inputs: (usize, usize),
    /// A recording lost a window or an output: its checkpoint stays where it was.
    recording_failed: std::sync::atomic::AtomicBool,
}

impl SourceTask {
    pub fn new(
        feed: Arc<SourceInput>,
        spec: TaskSpec,
        fps: f64,
        live: bool,
        env: TaskEnv,
    ) -> SourceTask {
        SourceTask {
            name: feed.name.clone(),
            gov: Governor::new(&env.governor, fps, live),
            windower: AudioWindower::new(&env.captions),
            recording: RecordingWindower::new(&env.captions),
            stabilizer: Stabilizer::new(),
            spec,
            feed,
            live,
            env,
            last_sent: None,
            look_requested: false,
            captions: None,
            caption_error: false,
            recent_audio: VecDeque::new(),
            window: Vec::new(),
            transcript: Vec::new(),
            transcript_files: None,
            last_state: f64::NEG_INFINITY,
            clip_frames: Vec::new(),
            last_kept: None,
            unsynced_frames: Vec::new(),
            rolling_t0: 0.0,
            summary_busy: false,
            rolling_summary: None,
            summary_t0: 0.0,
            summary_windows: VecDeque::new(),
            summary_total: 0,
            summary_inputs: (0, 0),
            recording_failed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// A new task (or new questions, prompt, window) from the control API or a reload. When
    /// the task kind changes, the old task's state goes with it: caption words the
    /// stabilizer still held become final (nothing will revise them now), and audio or
    /// frames gathered for the old task's next window are let go.
    pub fn set_spec(&mut self, spec: TaskSpec) {
        let old = self.spec.task;
        if spec.task != old {
            if old == TaskKind::Caption {
                let updates = self.stabilizer.finish();
                self.emit_captions(updates);
            }
            self.windower = AudioWindower::new(&self.env.captions);
            self.recording = RecordingWindower::new(&self.env.captions);
            self.recent_audio.clear();
            self.look_requested = false;
        }
        if spec.task != old || spec.window_frames != self.spec.window_frames {
            self.window.clear();
        }
        self.spec = spec;
    }

    fn prompt_for(&self, task: TaskKind) -> String {
        if let Some(p) = &self.spec.prompt {
            return p.clone();
        }
        let p = &self.env.prompts;
        match task {
            TaskKind::Watch => watch::render_prompt(&p.watch, &self.spec.questions),
            TaskKind::Describe | TaskKind::None => p.describe.clone(),
            TaskKind::Caption => p.caption.clone(),
            TaskKind::ListenAndLook => p.listen_and_look.clone(),
            TaskKind::Transcribe | TaskKind::Summarize => p.transcribe.clone(),
        }
    }

    fn job(&self, class: JobClass, t: f64, end: f64, captured: Instant) -> Job {
        Job {
            source: self.name.clone(),
            task: self.spec.task,
            class,
            t,
            end,
            frame: None,
            video: Vec::new(),
            audio: None,
            prompt: self.prompt_for(self.spec.task),
            instructions: self.env.prompts.instructions,
            soft_tokens: self.gov.soft_tokens() as usize,
            max_tokens: self.env.max_tokens,
            attempt: 0,
            next_t0: None,
            captured,
        }
    }

    fn skip(&self, reason: SkipReason) {
        self.feed
            .metrics
            .model
            .skipped
            .with_label_values(&[&self.name, reason.as_str()])
            .inc();
    }

    /// A frame the worker analysed: does it go to the model?
    pub fn on_frame(&mut self, frame: VideoFrame, motion: f64) -> Option<Job> {
        self.gov.note_input(frame.t);
        if self.spec.task == TaskKind::Summarize {
            return self.keep_for_summary(frame);
        }
        self.look(frame, motion)
    }

    /// An audio chunk the worker analysed.
    pub fn on_audio(&mut self, chunk: &AudioChunk, voice: bool, level: f64) -> Vec<Job> {
        let end = chunk.t + chunk.duration();
        self.gov.note_input(end);
        let task = self.spec.task;
        if level >= self.env.governor.loud_dbfs && task.uses_video() {
            // A loud sound: look at the next frame even if nothing moved.
            self.look_requested = true;
        }
        match task {
            TaskKind::ListenAndLook => {
                self.recent_audio
                    .push_back((chunk.t, chunk.samples.clone(), voice));
                while self
                    .recent_audio
                    .front()
                    .is_some_and(|(t, _, _)| end - t > LISTEN_SECONDS + 1e-6)
                {
                    self.recent_audio.pop_front();
                }
                Vec::new()
            }
            TaskKind::Caption => {
                let windows = self.windower.push(chunk.t, &chunk.samples, voice);
                windows
                    .into_iter()
                    .map(|w| self.caption_job(w, chunk.captured))
                    .collect()
            }
            TaskKind::Transcribe | TaskKind::Summarize => {
                let mut jobs: Vec<Job> = self
                    .recording
                    .push(chunk.t, &chunk.samples, voice)
                    .map(|w| self.audio_job(w.t0, w.samples, true, chunk.captured))
                    .into_iter()
                    .collect();
                if task == TaskKind::Summarize {
                    jobs.extend(self.rolling_summary_job(end));
                }
                jobs
            }
            _ => Vec::new(),
        }
    }

    fn audio_job(&self, t0: f64, samples: Vec<f32>, is_final: bool, captured: Instant) -> Job {
        let end = t0 + samples.len() as f64 / f64::from(AUDIO_RATE);
        let class = if is_final {
            JobClass::FinalAudio
        } else {
            JobClass::PartialAudio
        };
        let mut j = self.job(class, t0, end, captured);
        j.audio = Some(Arc::new(samples));
        j
    }

    /// The source ended: pending speech becomes a last window; recordings get a summary
    /// once their transcript is complete (see [`SourceTask::summary_job`]).
    pub fn finish(&mut self) -> Vec<Job> {
        let now = Instant::now();
        match self.spec.task {
            TaskKind::Caption => self
                .windower
                .flush()
                .map(|w| self.caption_job(w, now))
                .into_iter()
                .collect(),
            TaskKind::Transcribe | TaskKind::Summarize => self
                .recording
                .flush()
                .map(|w| self.audio_job(w.t0, w.samples, true, now))
                .into_iter()
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Every answer is in: words the stabilizer still holds become final captions.
    pub fn close(&mut self) {
        if self.spec.task == TaskKind::Caption {
            let updates = self.stabilizer.finish();
            self.emit_captions(updates);
        }
    }

    /// A job that did not run (superseded, unavailable...), already counted by the
    /// dispatch: a lost recording window, a `gap` for speech, a broken summary chain.
    pub fn on_skipped(&mut self, job: &Job, reason: SkipReason) {
        self.summary_chain_broken(job);
        if matches!(job.class, JobClass::FinalAudio | JobClass::Text) {
            self.recording_lost(format!(
                "{} request for {:.1}-{:.1} s not answered ({reason})",
                job.task.as_str(),
                job.t,
                job.end
            ));
        }
        if job.class == JobClass::FinalAudio && !reason.model_absent() {
            self.feed.gap(
                job.t,
                job.end,
                &format!("speech not transcribed ({reason})"),
            );
        }
    }

    /// A failed request (encoding or model error).
    pub fn on_error(&mut self, job: &Job, message: &str) {
        self.count_error(job);
        self.summary_chain_broken(job);
        if matches!(job.class, JobClass::FinalAudio | JobClass::Text) {
            self.recording_lost(format!(
                "{} request for {:.1}-{:.1} s failed: model: {message}",
                job.task.as_str(),
                job.t,
                job.end
            ));
        }
        self.feed.emit(
            job.t,
            Some(job.end),
            Body::Error {
                message: format!("model: {message}"),
                raw: None,
            },
        );
    }

    fn count_error(&self, job: &Job) {
        self.feed
            .metrics
            .model
            .errors
            .with_label_values(&[&self.name, job.task.as_str()])
            .inc();
    }

    /// The model's answer to one of this source's jobs; may return a follow-up job.
    pub fn on_answer(&mut self, job: &Job, a: &Answer) -> Option<Job> {
        let m = &self.feed.metrics.model;
        m.requests
            .with_label_values(&[&self.name, job.task.as_str()])
            .inc();
        m.latency
            .with_label_values(&[&self.name, job.task.as_str()])
            .observe(job.captured.elapsed().as_secs_f64());
        let text = suppress_repetition(a.text.trim());
        let model_ms = (a.model_s * 1e4).round() / 10.0;
        let latency_ms = (job.captured.elapsed().as_secs_f64() * 1e4).round() / 10.0;
        let follow = match job.task {
            TaskKind::Describe | TaskKind::None => {
                self.env
                    .live_board
                    .describe_frame(&self.name, job.end, &text);
                let frames = job.video.len().max(1) as u32;
                self.feed.emit(
                    job.t,
                    Some(job.end),
                    Body::Description {
                        text,
                        frames,
                        soft_tokens: job.soft_tokens as u32,
                        model_ms,
                        batch: a.batch as u32,
                        latency_ms,
                    },
                );
                None
            }
            TaskKind::Watch => self.on_watch(job, &text),
            TaskKind::ListenAndLook => {
                self.env
                    .live_board
                    .describe_frame(&self.name, job.end, &text);
                self.feed.emit(
                    job.t,
                    Some(job.end),
                    Body::Scene {
                        text,
                        audio_seconds: (job.audio_seconds() * 1000.0).round() / 1000.0,
                        model_ms,
                        batch: a.batch as u32,
                        latency_ms,
                    },
                );
                None
            }
            TaskKind::Caption => {
                self.on_caption(job, &text);
                None
            }
            TaskKind::Transcribe | TaskKind::Summarize if job.class == JobClass::Text => {
                if self.summary_windows.is_empty() {
                    let (frames, lines) = self.summary_inputs;
                    self.summary_busy = false;
                    if self.live {
                        self.rolling_summary = Some(text.clone());
                    }
                    self.feed.emit(
                        self.summary_t0,
                        Some(job.end),
                        Body::TextSummary {
                            text,
                            windows: self.summary_total as u32,
                            frames: frames as u32,
                            transcript_lines: lines as u32,
                        },
                    );
                    None
                } else {
                    tracing::info!(source = %self.name, until = job.end, summary = %text, "Running summary.");
                    self.next_summary_job(Some(&text))
                }
            }
            TaskKind::Transcribe | TaskKind::Summarize => {
                if !text.is_empty() {
                    self.transcript.push((job.t, job.end, text.clone()));
                    self.write_transcript(job.t, job.end, &text);
                    self.feed
                        .emit(job.t, Some(job.end), Body::Transcript { text });
                }
                if job.class == JobClass::FinalAudio {
                    self.commit(job.end);
                }
                None
            }
        };
        self.governor_update(job, a);
        follow
    }

    fn governor_update(&mut self, job: &Job, a: &Answer) {
        let video = job.frame.is_some() || !job.video.is_empty();
        let media_s = if video {
            1.0 / self.gov.model_fps()
        } else {
            job.audio_seconds()
        };
        let changed = self.gov.on_result(job.end, a.model_s, media_s, video);
        let st = self.gov.state();
        let m = &self.feed.metrics.model;
        let n = self.name.as_str();
        m.lag_seconds.with_label_values(&[n]).set(st.lag_seconds);
        m.effective_fps
            .with_label_values(&[n])
            .set(st.effective_fps);
        m.rtf.with_label_values(&[n, "video"]).set(st.rtf_video);
        m.rtf.with_label_values(&[n, "audio"]).set(st.rtf_audio);
        m.governor_level
            .with_label_values(&[n])
            .set(i64::from(st.level));
        m.soft_tokens
            .with_label_values(&[n])
            .set(i64::from(st.soft_tokens));
        if changed || job.end - self.last_state >= STATE_EVERY {
            self.last_state = job.end;
            self.feed.emit(
                job.end,
                None,
                Body::State {
                    state: self
                        .env
                        .board
                        .as_ref()
                        .and_then(|b| b.get(&self.name))
                        .unwrap_or(SourceState::Running),
                    reason: changed.then(|| format!("governor level {}", st.level)),
                    attempt: None,
                    retry_in: None,
                    governor: Some(st),
                    shard: crate::fleet::shard::label(),
                },
            );
        }
    }
}

#[cfg(test)]
mod tests;
