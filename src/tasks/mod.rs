//! Per-source tasks: what the model is asked about a source, which media reach it (the
//! gates), how fast (the governor), and what its answers become (events, alerts, captions).
//!
//! Data flow: the worker analyses signals, then hands each frame and chunk to the source's
//! [`SourceTask`], which may turn it into a [`Job`]; jobs wait in the [`dispatch::Dispatch`]
//! slots; the engine batches them across sources and sends each outcome back over the
//! worker's reply channel ([`reply`]); the worker, the only owner of the task, applies it.

pub mod dispatch;
pub mod governor;
pub mod recording;
pub mod reply;
pub mod snapshot;
pub mod summary;
#[cfg(test)]
pub(crate) mod test_support;
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

/// Why media or a job did not reach the model: the `reason` label of
/// `model_skipped_total`, and the words in brackets of a `speech not transcribed` gap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SkipReason {
    /// The governor's frame rate for the model was not due yet.
    Rate,
    /// Nothing moved, no heartbeat was due and no loud sound asked for a look.
    NoMotion,
    /// A newer job of the same slot replaced it (live sources: freshest wins).
    Superseded,
    /// Final caption windows piled up behind the model; the oldest went.
    ModelBehind,
    /// A live source's job while the model was still loading.
    ModelLoading,
    /// `[model] enabled = false`.
    ModelDisabled,
    /// The model could not be loaded.
    ModelUnavailable,
    /// Shutting down (or the drain deadline passed).
    Shutdown,
    /// The source was removed at runtime.
    SourceRemoved,
}

impl SkipReason {
    pub fn as_str(self) -> &'static str {
        match self {
            SkipReason::Rate => "rate",
            SkipReason::NoMotion => "no_motion",
            SkipReason::Superseded => "superseded",
            SkipReason::ModelBehind => "model_behind",
            SkipReason::ModelLoading => "model_loading",
            SkipReason::ModelDisabled => "model_disabled",
            SkipReason::ModelUnavailable => "model_unavailable",
            SkipReason::Shutdown => "shutdown",
            SkipReason::SourceRemoved => "source_removed",
        }
    }

    /// The model cannot answer at all: no gap per skipped window (the `model` status and
    /// `percept_model_unavailable` say it once).
    fn model_absent(self) -> bool {
        matches!(
            self,
            SkipReason::ModelDisabled | SkipReason::ModelUnavailable
        )
    }
}

impl std::fmt::Display for SkipReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
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

/// How a recording's task talks to `percept analyze` (see `analyze.rs`): its outputs are
/// made durable before the checkpoint moves past them, and a lost output or request keeps
/// the recording from being marked done.
pub trait RecordingHooks: Send + Sync {
    /// The transcript window ending at `t` (media seconds) is in the transcript files,
    /// which are synced; `events_bytes` is the events file's length after its last complete
    /// line. Syncs the events and moves the checkpoint; an error means the outputs could not
    /// be made durable.
    fn commit(&self, t: f64, events_bytes: u64) -> Result<(), String>;
    /// Where the recording's summary frames are kept (`frames/` in its output folder).
    fn frames_dir(&self) -> Option<PathBuf> {
        None
    }
    /// Something the recording owes was lost (an output write failed, a request failed or
    /// was skipped): the checkpoint no longer moves and the recording is not done.
    fn fail(&self, what: String);
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

    /// A recording lost something it owes (see [`RecordingHooks::fail`]).
    fn recording_lost(&self, what: String) {
        if let Some(h) = &self.env.checkpoint {
            self.recording_failed
                .store(true, std::sync::atomic::Ordering::Relaxed);
            h.fail(what);
        }
    }

    /// After a transcript window: transcript files synced, then the hooks sync the events
    /// and move the checkpoint. Never past a window that was lost.
    fn commit(&mut self, t: f64) {
        let Some(h) = self.env.checkpoint.clone() else {
            return;
        };
        if self
            .recording_failed
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return;
        }
        if let Some(e) = self.feed.events.write_error() {
            self.recording_lost(format!("writing events: {e}"));
            return;
        }
        if let Some(f) = &self.transcript_files {
            if let Err(e) = f.sync() {
                self.recording_lost(format!("{e}"));
                return;
            }
        }
        if let Err(e) = summary::sync_kept(&self.unsynced_frames) {
            self.recording_lost(format!("syncing summary frames: {e}"));
            return;
        }
        self.unsynced_frames.clear();
        if let Err(e) = h.commit(t, self.feed.events.position()) {
            self.recording_lost(e);
        }
    }

    /// Continue an interrupted recording: its committed transcript is kept (and the
    /// transcript files rewritten from it).
    pub fn resume(&mut self, r: &Resume) {
        self.transcript = r.transcript.clone();
        // The frames kept before the resume point come back from the recording's folder:
        // the worker does not hand those frames over again.
        if let (Some(dir), Some(after)) = (self.frames_dir(), r.frame_after) {
            self.clip_frames = summary::kept_in(&dir)
                .into_iter()
                .filter(|f| f.t <= after + 1e-6)
                .collect();
            self.last_kept = self.clip_frames.last().map(|f| f.t);
        }
        if let Some((vtt, srt)) = &self.env.transcript_files {
            match CaptionFiles::open_resume(vtt, srt, &self.transcript) {
                Ok(f) => self.transcript_files = Some(f),
                Err(e) => {
                    tracing::error!(path = %vtt.display(), error = %e, "Cannot write the transcript.")
                }
            }
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
        let task = self.spec.task;
        if task == TaskKind::Summarize {
            // Kept for the windowed summary (at the end of a recording, every
            // `summary_window_seconds` on a live source), not asked about one by one.
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
            return self.rolling_summary_job(frame.t);
        }
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

    /// Where `percept analyze` keeps this recording's summary frames.
    fn frames_dir(&self) -> Option<PathBuf> {
        self.env.checkpoint.as_ref().and_then(|h| h.frames_dir())
    }

    /// Live `summarize`: once `summary_window_seconds` of media have passed since the
    /// window began, its frames and transcript lines become a summary request carrying
    /// the previous rolling summary; what it used is then let go, so memory holds one
    /// window at most. While a summary is still being made the window grows, its frames
    /// thinned to one every two seconds, then four..., so it stays bounded.
    fn rolling_summary_job(&mut self, now: f64) -> Option<Job> {
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

    fn summary_budget(&self) -> summary::WindowBudget {
        summary::WindowBudget {
            context_tokens: self.env.context,
            answer_tokens: SUMMARY_TOKENS,
            frame_tokens: VIDEO_FRAME_TOKENS + summary::FRAME_TEXT_TOKENS,
            prompt_tokens: summary::prompt_tokens(&self.env.prompts.summarize),
            max_seconds: self.env.captions.summary_window_seconds,
        }
    }

    fn start_summary(
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

    /// A summary window that will not be answered ends its summary: the next (live) window
    /// starts a new one.
    fn summary_chain_broken(&mut self, job: &Job) {
        if job.class == JobClass::Text && job.task == TaskKind::Summarize {
            self.summary_windows.clear();
            self.summary_busy = false;
        }
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

    fn on_watch(&mut self, job: &Job, text: &str) -> Option<Job> {
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

    fn snapshot(&self, f: &VideoFrame) -> Option<String> {
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

    fn on_caption(&mut self, job: &Job, text: &str) {
        let mut updates = match (job.class, job.next_t0) {
            (JobClass::FinalAudio, Some(next)) => {
                self.stabilizer.push_cut(job.t, job.end, text, next)
            }
            (class, _) => self
                .stabilizer
                .push(job.t, job.end, text, class == JobClass::FinalAudio),
        };
        if self.spec.task != TaskKind::Caption {
            // Answered after the task changed: no later window will revise these words.
            updates.extend(self.stabilizer.finish());
        }
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
                        self.recording_lost(e.to_string());
                        return;
                    }
                }
            }
        }
        if let Some(f) = &mut self.transcript_files {
            if let Err(e) = f.append(t, end, text) {
                tracing::error!(source = %self.name, error = %e, "Cannot append to the transcript.");
                self.recording_lost(e.to_string());
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
                .and_then(|()| {
                    CaptionFiles::continue_or_create(&vtt, &srt).map_err(|e| e.to_string())
                });
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

#[cfg(test)]
mod tests;

fn mmss(t: f64) -> String {
    let s = t.max(0.0) as u64;
    format!("{:02}:{:02}", s / 60, s % 60)
}
