//! Per-source tasks: what the model is asked about a source, which media reach it (the
//! gates), how fast (the governor), and what its answers become (events, alerts, captions).
//!
//! Data flow: the worker analyses signals, then hands each frame and chunk to the source's
//! [`SourceTask`], which may turn it into a [`Job`]; jobs wait in the [`dispatch::Dispatch`]
//! slots; the engine batches them across sources and gives each answer back to its task.

pub mod dispatch;
pub mod governor;
pub mod recording;
pub mod summary;
pub mod watch;
pub mod webhook;

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use crate::caption::{suppress_repetition, AudioWindow, AudioWindower, CaptionFiles, Stabilizer};
use crate::config::{AlertConfig, CaptionConfig, GovernorConfig, TaskKind, TaskPrompts};
use crate::control::LiveBoard;
use crate::event::{Body, CaptionStatus, SourceState};
use crate::ingest::{AudioChunk, Feed, VideoFrame, AUDIO_RATE};
use governor::Governor;
use recording::RecordingWindower;

/// How a job waits for the model (see [`dispatch`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobClass {
    Frame,
    PartialAudio,
    FinalAudio,
    Text,
}

/// One request for the model, in media terms.
#[derive(Debug, Clone)]
pub struct Job {
    pub source: String,
    pub task: TaskKind,
    pub class: JobClass,
    /// Media span the answer is about.
    pub t: f64,
    pub end: f64,
    pub frame: Option<Arc<VideoFrame>>,
    /// A window of frames sent as video (describe with `window_frames` > 1).
    pub video: Vec<Arc<VideoFrame>>,
    pub audio: Option<Arc<Vec<f32>>>,
    /// The user text of the prompt.
    pub prompt: String,
    pub soft_tokens: usize,
    pub max_tokens: usize,
    /// 0 for the first try; `watch` retries once.
    pub attempt: u8,
    /// A caption window cut at the length cap: where the next (overlapping) window starts.
    pub next_t0: Option<f64>,
    pub captured: Instant,
}

impl Job {
    pub fn audio_seconds(&self) -> f64 {
        self.audio
            .as_ref()
            .map(|a| a.len() as f64 / f64::from(AUDIO_RATE))
            .unwrap_or(0.0)
    }
}

/// What the model said for a job.
#[derive(Debug, Clone)]
pub struct Answer {
    pub text: String,
    /// Wall seconds of the batched step this job was part of (shared by the batch).
    pub model_s: f64,
    pub prompt_tokens: usize,
    pub output_tokens: usize,
    /// Requests in the batched step.
    pub batch: usize,
}

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
    pub webhooks: Option<webhook::Webhooks>,
    /// Where caption files go for this run (None: no files).
    pub caption_dir: Option<PathBuf>,
    /// Recordings (`percept analyze`): transcript cues go to these VTT/SRT files.
    pub transcript_files: Option<(PathBuf, PathBuf)>,
    /// Lifecycle states, so governor `state` events repeat the source's real state.
    pub board: Option<Arc<crate::ingest::supervisor::StateBoard>>,
    /// Called after each transcript window is written, with its end (media seconds) and
    /// the events file length then.
    pub checkpoint: Option<Arc<dyn Fn(f64, u64) + Send + Sync>>,
}

/// Where an interrupted recording analysis picks up (see `percept analyze`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Resume {
    /// Audio from here on goes to the model again (end of the last committed window).
    pub model_from: f64,
    /// `audio` events already written up to this media time.
    pub audio_after: f64,
    /// `frame` events already written up to and including this media time.
    pub frame_after: Option<f64>,
    /// Transcript windows already committed: (t, end, text).
    pub transcript: Vec<(f64, f64, String)>,
}

/// Seconds of audio kept for `listen-and-look`.
const LISTEN_SECONDS: f64 = 5.0;
/// A `state` event with governor figures at least this often (media seconds).
const STATE_EVERY: f64 = 5.0;
/// Token budget of a summary.
const SUMMARY_TOKENS: usize = 256;

pub struct SourceTask {
    pub name: String,
    pub spec: TaskSpec,
    pub feed: Arc<Feed>,
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
    /// `summarize`: frames kept for the summary, one per `SUMMARY_FRAME_SECONDS`.
    clip_frames: Vec<Arc<VideoFrame>>,
    /// `summarize`: summary windows not yet asked for, and how many there are in all.
    summary_windows: VecDeque<summary::SummaryWindow>,
    summary_total: usize,
    /// Frames and transcript lines across all summary windows.
    summary_inputs: (usize, usize),
}

impl SourceTask {
    pub fn new(feed: Arc<Feed>, spec: TaskSpec, fps: f64, live: bool, env: TaskEnv) -> SourceTask {
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
            summary_windows: VecDeque::new(),
            summary_total: 0,
            summary_inputs: (0, 0),
        }
    }

    /// Continue an interrupted recording: its committed transcript is kept (and the
    /// transcript files rewritten from it).
    pub fn resume(&mut self, r: &Resume) {
        self.transcript = r.transcript.clone();
        if let Some((vtt, srt)) = &self.env.transcript_files {
            match CaptionFiles::open_resume(vtt, srt, &self.transcript) {
                Ok(f) => self.transcript_files = Some(f),
                Err(e) => {
                    tracing::error!(path = %vtt.display(), error = %e, "Cannot write the transcript.")
                }
            }
        }
    }

    pub fn set_spec(&mut self, spec: TaskSpec) {
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
            soft_tokens: self.gov.soft_tokens() as usize,
            max_tokens: self.env.max_tokens,
            attempt: 0,
            next_t0: None,
            captured,
        }
    }

    fn skip(&self, reason: &str) {
        self.feed
            .metrics
            .model
            .skipped
            .with_label_values(&[&self.name, reason])
            .inc();
    }

    /// A frame the worker analysed: does it go to the model?
    pub fn on_frame(&mut self, frame: VideoFrame, motion: f64) -> Option<Job> {
        self.gov.note_input(frame.t);
        let task = self.spec.task;
        if task == TaskKind::Summarize {
            // Kept for the windowed summary at the end, not asked about one by one.
            let due = self
                .clip_frames
                .last()
                .is_none_or(|f| frame.t - f.t >= summary::SUMMARY_FRAME_SECONDS - 1e-6);
            if due {
                self.clip_frames.push(Arc::new(frame));
            }
            return None;
        }
        if !task.uses_video() {
            return None;
        }
        if !self.gov.frame_due(frame.t, self.last_sent) {
            self.skip("rate");
            return None;
        }
        let heartbeat = self
            .last_sent
            .is_none_or(|l| frame.t - l >= self.env.governor.heartbeat_seconds);
        let moved = motion >= self.env.scene_threshold;
        if !(heartbeat || moved || self.look_requested) {
            self.skip("no_motion");
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
            TaskKind::Transcribe | TaskKind::Summarize => self
                .recording
                .push(chunk.t, &chunk.samples, voice)
                .map(|w| self.audio_job(w.t0, w.samples, true, chunk.captured))
                .into_iter()
                .collect(),
            _ => Vec::new(),
        }
    }

    fn caption_job(&self, w: AudioWindow, captured: Instant) -> Job {
        let next = w.next_t0;
        let mut j = self.audio_job(w.t0, w.samples, w.is_final, captured);
        j.next_t0 = next;
        j
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
        let budget = summary::WindowBudget {
            context_tokens: self.env.context,
            answer_tokens: SUMMARY_TOKENS,
            frame_tokens: VIDEO_FRAME_TOKENS + summary::FRAME_TEXT_TOKENS,
            prompt_tokens: summary::prompt_tokens(&self.env.prompts.summarize),
            max_seconds: self.env.captions.summary_window_seconds,
        };
        let windows = summary::plan(&self.clip_frames, &self.transcript, end, &budget);
        // The frames now live in the windows only.
        self.clip_frames = Vec::new();
        self.summary_total = windows.len();
        self.summary_inputs = windows
            .iter()
            .fold((0, 0), |(f, l), w| (f + w.frames.len(), l + w.lines.len()));
        self.summary_windows = windows.into();
        self.next_summary_job(None)
    }

    fn next_summary_job(&mut self, previous: Option<&str>) -> Option<Job> {
        let w = self.summary_windows.pop_front()?;
        let n = self.summary_total;
        let k = n - self.summary_windows.len();
        let mut j = self.job(JobClass::Text, w.t0, w.t1, Instant::now());
        j.task = TaskKind::Summarize;
        j.prompt = summary::window_prompt(&self.env.prompts.summarize, k, n, &w, previous);
        j.max_tokens = SUMMARY_TOKENS;
        j.soft_tokens = VIDEO_FRAME_TOKENS;
        tracing::info!(source = %self.name, window = k, of = n, t0 = w.t0, t1 = w.t1, frames = w.frames.len(), lines = w.lines.len(), prompt = %j.prompt, "Summary window.");
        j.video = w.frames;
        Some(j)
    }

    /// Jobs that will not run (superseded, unavailable...) are counted here.
    pub fn on_skipped(&self, job: &Job, reason: &str) {
        self.skip(reason);
        if job.class == JobClass::FinalAudio
            && reason != "model_unavailable"
            && reason != "model_disabled"
        {
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
                    self.feed.emit(
                        0.0,
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
                    if let Some(cp) = &self.env.checkpoint {
                        cp(job.end, self.feed.events.position());
                    }
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

    fn on_watch(&mut self, job: &Job, text: &str) -> Option<Job> {
        match watch::parse_reply(text, &self.spec.questions) {
            Ok(answers) => {
                for a in answers {
                    if !a.yes || a.confidence < self.env.alerts.min_confidence {
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
                    let ev =
                        crate::event::Event::new(&self.name, job.t, Some(job.end), body.clone());
                    if let Some(w) = &self.env.webhooks {
                        w.send(ev);
                    }
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

    fn snapshot(&self, f: &VideoFrame) -> Option<String> {
        if self.env.alerts.snapshot_dir.is_empty() {
            return None;
        }
        let dir = PathBuf::from(&self.env.alerts.snapshot_dir).join(&self.name);
        let path = dir.join(format!("{:010.3}.jpg", f.t));
        let jpeg = f.jpeg()?;
        match std::fs::create_dir_all(&dir).and_then(|()| std::fs::write(&path, jpeg)) {
            Ok(()) => Some(path.display().to_string()),
            Err(e) => {
                tracing::warn!(source = %self.name, error = %e, path = %path.display(), "Cannot write the alert snapshot.");
                None
            }
        }
    }

    fn on_caption(&mut self, job: &Job, text: &str) {
        let updates = match (job.class, job.next_t0) {
            (JobClass::FinalAudio, Some(next)) => {
                self.stabilizer.push_cut(job.t, job.end, text, next)
            }
            (class, _) => self
                .stabilizer
                .push(job.t, job.end, text, class == JobClass::FinalAudio),
        };
        self.emit_captions(updates);
    }

    fn emit_captions(&mut self, updates: Vec<crate::caption::CaptionUpdate>) {
        for u in updates {
            if u.status == CaptionStatus::Final {
                self.write_caption(u.t, u.end, &u.text);
            }
            self.feed.emit(
                u.t,
                Some(u.end),
                Body::Caption {
                    text: u.text,
                    status: u.status,
                },
            );
        }
    }

    fn write_transcript(&mut self, t: f64, end: f64, text: &str) {
        if self.transcript_files.is_none() {
            if let Some((vtt, srt)) = &self.env.transcript_files {
                match CaptionFiles::create(vtt, srt) {
                    Ok(f) => self.transcript_files = Some(f),
                    Err(e) => {
                        tracing::error!(path = %vtt.display(), error = %e, "Cannot write the transcript.");
                        return;
                    }
                }
            }
        }
        if let Some(f) = &mut self.transcript_files {
            if let Err(e) = f.append(t, end, text) {
                tracing::error!(source = %self.name, error = %e, "Cannot append to the transcript.");
            }
        }
    }

    fn write_caption(&mut self, t: f64, end: f64, text: &str) {
        let Some(dir) = &self.env.caption_dir else {
            return;
        };
        if self.captions.is_none() && !self.caption_error {
            let vtt = dir.join(format!("{}.vtt", self.name));
            let srt = dir.join(format!("{}.srt", self.name));
            let made = std::fs::create_dir_all(dir)
                .map_err(|e| e.to_string())
                .and_then(|()| CaptionFiles::create(&vtt, &srt).map_err(|e| e.to_string()));
            match made {
                Ok(f) => self.captions = Some(f),
                Err(e) => {
                    self.caption_error = true;
                    tracing::error!(source = %self.name, dir = %dir.display(), error = %e, "Cannot write caption files.");
                }
            }
        }
        if let Some(f) = &mut self.captions {
            if let Err(e) = f.append(t, end, text) {
                tracing::error!(source = %self.name, error = %e, "Cannot append a caption.");
            }
        }
    }
}

/// Valid subtitle files with no cue (a recording without speech).
pub fn empty_transcript_files(
    vtt: &std::path::Path,
    srt: &std::path::Path,
) -> Result<(), crate::caption::CaptionFileError> {
    CaptionFiles::create(vtt, srt).map(|_| ())
}

fn mmss(t: f64) -> String {
    let s = t.max(0.0) as u64;
    format!("{:02}:{:02}", s / 60, s % 60)
}
