//! `percept run`: wires sources, queues, the worker, sinks and the HTTP server together, and
//! shuts them down in order on EOS, Ctrl-C or SIGTERM.

pub mod config;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;

use crate::config::{one_line, Config, SourceConfig, TaskKind};
use crate::control::{AddSource, ControlApi, ControlError, LiveBoard, SourceInfo, TaskUpdate};
use crate::engine::Engine;
use crate::event::{Body, SourceState, Summary};
use crate::http;
use crate::ingest::graph::GraphParams;
use crate::ingest::supervisor::{StateBoard, Supervisor};
use crate::ingest::{Feed, AUDIO_RATE};
use crate::lock;
use crate::metrics::Metrics;
use crate::progress;
use crate::queue::{self, ByteBudget, WhenFull};
use crate::sink::Events;
use crate::source::{self, Credentials, SourceKind, SourceSpec};
use crate::tasks::dispatch::{Dispatch, ModelGate, TaskRef};
use crate::tasks::{SourceTask, TaskEnv, TaskSpec};
use crate::worker::{Control, Worker, WorkerSource};

/// Command-line values that override the config file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub sources: Vec<String>,
    pub fps: Option<f64>,
    pub events: Option<String>,
    pub listen: Option<String>,
    pub realtime: bool,
    pub no_http: bool,
    /// `--model`: hub id or folder.
    pub model: Option<String>,
    /// `--no-model`: signal analysis only.
    pub no_model: bool,
    /// `--task` / `--question` for the `--source` sources.
    pub task: Option<TaskKind>,
    pub questions: Vec<String>,
    /// The config file, re-read on SIGHUP / `POST /v1/reload`.
    pub config_path: Option<PathBuf>,
    /// `--shard K/N`: run only the sources this shard owns.
    pub shard: Option<crate::fleet::shard::Shard>,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Config(String),
    #[error("GStreamer: {0}")]
    Gst(String),
    #[error("events {path}: {error}")]
    Events { path: String, error: std::io::Error },
    #[error("{0}")]
    Http(#[from] http::HttpError),
    #[error("no source to run: give --source URI or [[source]] entries in the config")]
    NoSources,
}

/// The result of a run: per-source final states and failures (for the exit code).
#[derive(Debug)]
pub struct RunReport {
    pub states: Vec<(String, SourceState)>,
    pub failures: Vec<String>,
    /// The events file could not be written (disk full...): what was produced is not all
    /// on disk, which a script must learn from the exit code.
    pub events_lost: bool,
}

impl RunReport {
    /// 2 when no source could run, 1 when events could not be written, 0 otherwise (failed
    /// sources are `error` events).
    pub fn exit_code(&self) -> u8 {
        if !self.states.is_empty() && self.states.iter().all(|(_, s)| *s == SourceState::Failed) {
            2
        } else if self.events_lost {
            1
        } else {
            0
        }
    }
}

/// Apply CLI overrides to the config. `--source` flags replace the config's sources.
pub fn merge(mut cfg: Config, o: &Overrides) -> Config {
    if !o.sources.is_empty() {
        cfg.sources = o
            .sources
            .iter()
            .map(|s| {
                let mut sc = SourceConfig::from_uri(s);
                if let Some(t) = o.task {
                    sc.task = t;
                }
                sc.questions = o.questions.clone();
                sc
            })
            .collect();
    }
    if let Some(m) = &o.model {
        cfg.model.id = m.clone();
    }
    if o.no_model {
        cfg.model.enabled = false;
    }
    if let Some(f) = o.fps {
        cfg.run.fps = f;
    }
    if let Some(e) = &o.events {
        cfg.run.events = e.clone();
    }
    if let Some(l) = &o.listen {
        cfg.http.listen = l.clone();
    }
    if o.realtime {
        cfg.run.realtime = true;
    }
    if o.no_http {
        cfg.http.enabled = false;
    }
    if let Some(s) = o.shard {
        crate::fleet::shard::retain(&mut cfg.sources, s);
    }
    cfg
}

struct Prepared {
    spec: SourceSpec,
    params: GraphParams,
    source: SourceConfig,
}

/// What a source's graph is built from: when a reload changes it, the source restarts.
#[derive(Debug, Clone, PartialEq)]
struct GraphKey {
    /// What to open, with RTSP credentials and transport.
    kind: SourceKind,
    fps: f64,
    max_side: u32,
    keyframe_only: bool,
    sync: bool,
    chunk_seconds: f64,
    template: Option<String>,
    decoder_threads: u32,
}

impl Prepared {
    fn key(&self) -> GraphKey {
        let p = &self.params;
        GraphKey {
            kind: self.spec.kind.clone(),
            fps: p.fps,
            max_side: p.max_side,
            keyframe_only: p.keyframe_only,
            sync: p.sync,
            chunk_seconds: p.chunk_seconds,
            template: p.custom_template.clone(),
            decoder_threads: p.decoder_threads,
        }
    }

    fn task_spec(&self) -> TaskSpec {
        TaskSpec {
            task: self.source.task,
            questions: self.source.questions.clone(),
            prompt: self.source.prompt.clone(),
            window_frames: self.source.window_frames,
        }
    }
}

fn prepare(cfg: &Config) -> Result<Vec<Prepared>, RunError> {
    let mut out = Vec::new();
    for sc in &cfg.sources {
        out.push(prepare_one(cfg, sc)?);
    }
    let mut specs: Vec<SourceSpec> = out.iter().map(|p| p.spec.clone()).collect();
    source::dedupe_names(&mut specs);
    for (p, s) in out.iter_mut().zip(specs) {
        p.spec.name = s.name;
    }
    Ok(out)
}

fn prepare_one(cfg: &Config, sc: &SourceConfig) -> Result<Prepared, RunError> {
    {
        let mut spec = match &sc.path {
            // A recording named by the caller (`percept analyze`), never re-parsed as a URI.
            Some(path) => SourceSpec {
                name: sc.name.clone().unwrap_or_else(|| "recording".into()),
                kind: SourceKind::File(path.clone()),
                display: path.display().to_string(),
            },
            None => source::parse(&sc.uri).map_err(|e| RunError::Config(e.to_string()))?,
        };
        if let Some(n) = &sc.name {
            spec.name = n.clone();
        }
        if let SourceKind::Rtsp {
            credentials,
            transport,
            ..
        } = &mut spec.kind
        {
            if let Some(t) = sc.transport {
                *transport = t;
            }
            let password = match (&sc.password, &sc.password_env) {
                (Some(p), _) => Some(p.clone()),
                (None, Some(var)) => Some(std::env::var(var).map_err(|_| {
                    RunError::Config(format!(
                        "source '{}': environment variable {var} is not set",
                        spec.name
                    ))
                })?),
                _ => None,
            };
            if sc.user.is_some() || password.is_some() {
                let c = credentials.get_or_insert_with(Credentials::default);
                if let Some(u) = &sc.user {
                    c.user = u.clone();
                }
                if let Some(p) = password {
                    c.password = p;
                }
            }
        }
        let custom_template = match &sc.template {
            Some(p) => Some(
                crate::ingest::template::read(p).map_err(|e| RunError::Config(e.to_string()))?,
            ),
            None => None,
        };
        let params = GraphParams {
            fps: sc.fps.unwrap_or(cfg.run.fps),
            max_side: cfg.video.max_side,
            keyframe_only: cfg.video.keyframe_only,
            sync: spec.kind.is_live() || cfg.run.realtime,
            chunk_seconds: cfg.audio.chunk_seconds,
            custom_template,
            rtsp_latency_ms: 200,
            decoder_threads: cfg.video.decoder_threads,
        };
        Ok(Prepared {
            spec,
            params,
            source: sc.clone(),
        })
    }
}

/// A model that outlives one run (`percept analyze` loads it once for all recordings).
#[derive(Clone)]
pub struct SharedModel {
    pub dispatch: Arc<Dispatch>,
    pub live: Arc<LiveBoard>,
    pub metrics: Arc<Metrics>,
}

impl SharedModel {
    fn new() -> SharedModel {
        SharedModel {
            dispatch: Arc::new(Dispatch::default()),
            live: Arc::new(LiveBoard::default()),
            metrics: Arc::new(Metrics::new()),
        }
    }

    fn engine(&self, cfg: &crate::config::ModelConfig) -> Engine {
        Engine {
            cfg: cfg.clone(),
            dispatch: self.dispatch.clone(),
            live: self.live.clone(),
            metrics: self.metrics.clone(),
        }
    }

    /// Starts the model thread (loading in the background).
    pub fn start(
        cfg: &crate::config::ModelConfig,
    ) -> Result<(SharedModel, JoinHandle<()>), RunError> {
        let m = SharedModel::new();
        let h = m
            .engine(cfg)
            .spawn()
            .map_err(|e| RunError::Gst(format!("cannot start the model thread: {e}")))?;
        Ok((m, h))
    }

    /// Serves an already loaded model on a thread until the dispatch closes; the thread
    /// gives the model back (the benchmarks build random-weight models themselves and reuse
    /// one across runs).
    pub fn serve(
        model: crate::model::Gemma4,
        cfg: &crate::config::ModelConfig,
    ) -> (SharedModel, JoinHandle<crate::model::Gemma4>) {
        let m = SharedModel::new();
        let engine = m.engine(cfg);
        (m, std::thread::spawn(move || engine.serve(model)))
    }
}

/// What `percept analyze` adds to a run of one recording.
#[derive(Clone, Default)]
pub struct RunExtras {
    pub model: Option<SharedModel>,
    pub resume: Option<crate::tasks::Resume>,
    pub transcript_files: Option<(PathBuf, PathBuf)>,
    pub checkpoint: Option<Arc<dyn crate::tasks::RecordingHooks>>,
}

/// One source started by this run (kept after it ends, for its summary).
struct Running {
    spec: SourceSpec,
    /// What its graph was built from (see [`GraphKey`]).
    key: GraphKey,
    feed: Arc<Feed>,
    task: Option<TaskRef>,
    handle: Option<JoinHandle<SourceState>>,
    stop: Arc<AtomicBool>,
    state: Option<SourceState>,
    removed: bool,
}

/// What the run loop, the control API and SIGHUP share.
struct Shared {
    cfg: Mutex<Config>,
    overrides: Overrides,
    sources: Mutex<Vec<Running>>,
    ctl_tx: Sender<Control>,
    events: Events,
    metrics: Arc<Metrics>,
    board: Arc<StateBoard>,
    budget: Arc<ByteBudget>,
    queue_stop: Arc<AtomicBool>,
    dispatch: Arc<Dispatch>,
    env: TaskEnv,
    closing: AtomicBool,
    /// Reloads restarting sources: the run does not end while one has none running.
    restarting: AtomicUsize,
    resume: Option<crate::tasks::Resume>,
}

impl Shared {
    /// Starts a source; the caller adds the returned entry to `sources` (under the same lock
    /// as its check that the name is free).
    fn start(&self, p: Prepared) -> Result<Running, RunError> {
        let cfg = lock(&self.cfg).clone();
        let live = p.spec.kind.is_live() || cfg.run.realtime;
        let (vpol, apol) = if live {
            (WhenFull::DropOldest, WhenFull::DropNewest)
        } else {
            (WhenFull::Block, WhenFull::Block)
        };
        let audio_cap = (cfg.audio.queue_seconds / cfg.audio.chunk_seconds).ceil() as usize;
        let (vtx, vrx) = queue::bounded(
            cfg.video.queue_frames,
            vpol,
            self.budget.clone(),
            self.queue_stop.clone(),
        );
        let (atx, arx) = queue::bounded(
            audio_cap,
            apol,
            self.budget.clone(),
            self.queue_stop.clone(),
        );
        let feed = Feed::new(
            p.spec.name.clone(),
            vtx,
            atx,
            self.metrics.clone(),
            self.events.clone(),
        );
        self.env
            .live_board
            .track_sampled(&p.spec.name, feed.latest.clone());
        // Every source gets a task while the model is on (task `none` asks nothing) so its
        // task can change at runtime.
        let task = if cfg.model.enabled {
            let mut st = SourceTask::new(
                feed.clone(),
                p.task_spec(),
                p.params.fps,
                live,
                self.env.clone(),
            );
            if let Some(r) = &self.resume {
                st.resume(r);
            }
            let t = Arc::new(Mutex::new(st));
            if !self.dispatch.add_source(&p.spec.name, t.clone(), live) {
                return Err(RunError::Config(format!(
                    "a source named '{}' exists",
                    p.spec.name
                )));
            }
            Some(t)
        } else {
            None
        };
        self.metrics
            .set_state(&p.spec.name, SourceState::Connecting);
        let _ = self.ctl_tx.send(Control::Add(WorkerSource {
            feed: feed.clone(),
            video: vrx,
            audio: arx,
            task: task.clone(),
            resume: self.resume.clone(),
        }));
        tracing::info!(source = %p.spec.name, uri = %p.spec.display, fps = p.params.fps, task = p.source.task.as_str(), "Starting source.");
        let stop = Arc::new(AtomicBool::new(false));
        let key = p.key();
        let sup = Supervisor {
            spec: p.spec.clone(),
            params: p.params,
            reconnect: cfg.reconnect.clone(),
            stall_seconds: cfg.watchdog.stall_seconds,
            realtime: cfg.run.realtime,
            feed: feed.clone(),
            stop: stop.clone(),
            board: self.board.clone(),
        };
        let h = std::thread::Builder::new()
            .name(format!("src-{}", p.spec.name))
            .spawn(move || sup.run())
            .map_err(|e| RunError::Gst(format!("cannot start source thread: {e}")))?;
        Ok(Running {
            spec: p.spec,
            key,
            feed,
            task,
            handle: Some(h),
            stop,
            state: None,
            removed: false,
        })
    }

    fn info(&self, r: &Running) -> SourceInfo {
        let (task, questions, prompt) = match &r.task {
            Some(t) => {
                let s = lock(t).spec.clone();
                (s.task, s.questions, s.prompt)
            }
            None => (TaskKind::None, Vec::new(), None),
        };
        SourceInfo {
            name: r.spec.name.clone(),
            uri: r.spec.display.clone(),
            state: r
                .state
                .or_else(|| self.board.snapshot().get(&r.spec.name).copied()),
            task,
            questions,
            prompt,
        }
    }

    fn apply_task(&self, r: &Running, u: TaskUpdate) -> Result<(), ControlError> {
        let Some(t) = &r.task else {
            return Err(ControlError::Invalid(format!(
                "source '{}' runs without the model (task none or model disabled); remove and add it again with a task",
                r.spec.name
            )));
        };
        let mut g = lock(t);
        let mut spec = g.spec.clone();
        if let Some(k) = u.task {
            spec.task = k;
        }
        if let Some(q) = u.questions {
            spec.questions = q;
        }
        if let Some(p) = u.prompt {
            spec.prompt = (!p.is_empty()).then_some(p);
        }
        if spec.task == TaskKind::Watch && spec.questions.is_empty() {
            return Err(ControlError::Invalid(
                "task 'watch' needs at least one question".into(),
            ));
        }
        tracing::info!(source = %r.spec.name, task = spec.task.as_str(), questions = spec.questions.len(), "Task changed.");
        g.set_spec(spec);
        Ok(())
    }
}

impl Shared {
    /// Adds a source from its full config (the control API and reloads). The name check and
    /// the insert happen under one lock: of two requests for one name, the second gets 409.
    fn add_config(&self, sc: SourceConfig) -> Result<SourceInfo, ControlError> {
        if self.closing.load(Ordering::Relaxed) {
            return Err(ControlError::ShuttingDown);
        }
        let mut cfg = lock(&self.cfg).clone();
        cfg.sources = vec![sc.clone()];
        let problems = cfg.validate();
        if !problems.is_empty() {
            return Err(ControlError::Invalid(problems.join("; ")));
        }
        let p = prepare_one(&cfg, &sc).map_err(|e| ControlError::Invalid(e.to_string()))?;
        let name = p.spec.name.clone();
        if let Some(s) = self.overrides.shard {
            s.check(&name).map_err(ControlError::Conflict)?;
        }
        let mut sources = lock(&self.sources);
        if sources.iter().any(|r| r.spec.name == name && !r.removed) {
            return Err(ControlError::Conflict(format!(
                "a source named '{name}' exists"
            )));
        }
        let r = self
            .start(p)
            .map_err(|e| ControlError::Invalid(e.to_string()))?;
        let info = self.info(&r);
        sources.push(r);
        Ok(info)
    }

    /// Waits (a bounded time) until a removed source's thread has ended, so a source
    /// restarted under the same name does not see the old one's last state land after its
    /// own first.
    fn wait_stopped(&self, name: &str) {
        let t0 = Instant::now();
        loop {
            let done = lock(&self.sources)
                .iter()
                .filter(|r| r.spec.name == name && r.removed)
                .all(|r| r.handle.as_ref().is_none_or(JoinHandle::is_finished));
            if done {
                return;
            }
            if t0.elapsed() > RESTART_WAIT {
                tracing::warn!(source = %name, "The source's old graph is still stopping; starting the new one anyway.");
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Applies the sources of a fresh config: sources no longer listed are removed, new ones
    /// added, those whose graph changed (URI, fps, credentials, transport, template, ...)
    /// restarted, the others retasked in place. Names are derived and deduplicated as at
    /// startup. A source that cannot be applied does not stop the others; every failure is
    /// returned.
    fn reload_sources(&self, fresh: &Config) -> Vec<String> {
        let mut failures = Vec::new();
        let mut wanted: Vec<SourceConfig> = Vec::new();
        let mut specs: Vec<SourceSpec> = Vec::new();
        for sc in &fresh.sources {
            match source::parse(&sc.uri) {
                Ok(mut spec) => {
                    if let Some(n) = &sc.name {
                        spec.name = n.clone();
                    }
                    specs.push(spec);
                    wanted.push(sc.clone());
                }
                Err(e) => failures.push(e.to_string()),
            }
        }
        source::dedupe_names(&mut specs);
        for (sc, spec) in wanted.iter_mut().zip(&specs) {
            sc.name = Some(spec.name.clone());
        }
        let current: Vec<(String, GraphKey)> = lock(&self.sources)
            .iter()
            .filter(|r| !r.removed)
            .map(|r| (r.spec.name.clone(), r.key.clone()))
            .collect();
        for (name, _) in &current {
            if !wanted
                .iter()
                .any(|sc| sc.name.as_deref() == Some(name.as_str()))
            {
                let _ = self.remove(name);
            }
        }
        for sc in wanted {
            let name = sc.name.clone().unwrap_or_default();
            let mut failed = |e: &dyn std::fmt::Display| {
                let e = one_line(&e.to_string());
                tracing::error!(source = %name, error = %e, "Reload: source not applied.");
                failures.push(if e.contains(&format!("'{name}'")) {
                    e
                } else {
                    format!("source '{name}': {e}")
                });
            };
            let Some((_, key)) = current.iter().find(|(n, _)| *n == name) else {
                if let Err(e) = self.add_config(sc) {
                    failed(&e);
                }
                continue;
            };
            let p = match prepare_one(fresh, &sc) {
                Ok(p) => p,
                Err(e) => {
                    failed(&e);
                    continue;
                }
            };
            if p.key() != *key {
                tracing::info!(source = %name, uri = %p.spec.display, "Source changed; restarting it.");
                self.restarting.fetch_add(1, Ordering::SeqCst);
                let _ = self.remove(&name);
                self.wait_stopped(&name);
                let added = self.add_config(sc);
                self.restarting.fetch_sub(1, Ordering::SeqCst);
                if let Err(e) = added {
                    failed(&e);
                }
            } else if let Err(e) = self.retask(&name, p.task_spec()) {
                failed(&e);
            }
        }
        failures
    }

    /// A reload's task settings for a running source (kept when they did not change).
    fn retask(&self, name: &str, spec: TaskSpec) -> Result<(), ControlError> {
        let sources = lock(&self.sources);
        let Some(r) = sources.iter().find(|r| r.spec.name == name && !r.removed) else {
            return Err(ControlError::NotFound(name.to_string()));
        };
        // Without the model (`[model] enabled = false`) there is no task to change.
        let Some(t) = &r.task else {
            return Ok(());
        };
        let mut g = lock(t);
        if g.spec != spec {
            tracing::info!(source = %name, task = spec.task.as_str(), questions = spec.questions.len(), "Task changed.");
            g.set_spec(spec);
        }
        Ok(())
    }
}

/// How long a reload waits for a restarted source's old graph to stop.
const RESTART_WAIT: Duration = Duration::from_secs(10);

impl ControlApi for Shared {
    fn list(&self) -> Vec<SourceInfo> {
        lock(&self.sources)
            .iter()
            .filter(|r| !r.removed)
            .map(|r| self.info(r))
            .collect()
    }

    fn add(&self, req: AddSource) -> Result<SourceInfo, ControlError> {
        let mut sc = SourceConfig::from_uri(&req.uri);
        sc.name = req.name;
        sc.fps = req.fps;
        sc.task = req.task.unwrap_or_default();
        sc.questions = req.questions;
        sc.prompt = req.prompt;
        self.add_config(sc)
    }

    fn remove(&self, name: &str) -> Result<(), ControlError> {
        let mut sources = lock(&self.sources);
        let r = sources
            .iter_mut()
            .find(|r| r.spec.name == name && !r.removed)
            .ok_or_else(|| ControlError::NotFound(name.to_string()))?;
        r.removed = true;
        r.stop.store(true, Ordering::Relaxed);
        self.env.live_board.remove_source(name);
        tracing::info!(source = %name, "Removing source.");
        let _ = self.ctl_tx.send(Control::Remove(name.to_string()));
        self.dispatch.remove_source(name);
        // Its summary frames, transcript and windows go now, not at exit.
        if let Some(t) = r.task.take() {
            lock(&t).release();
        }
        Ok(())
    }

    fn set_task(&self, name: &str, u: TaskUpdate) -> Result<SourceInfo, ControlError> {
        let sources = lock(&self.sources);
        let r = sources
            .iter()
            .find(|r| r.spec.name == name && !r.removed)
            .ok_or_else(|| ControlError::NotFound(name.to_string()))?;
        self.apply_task(r, u)?;
        Ok(self.info(r))
    }

    fn reload(&self) -> Result<(), ControlError> {
        let Some(path) = &self.overrides.config_path else {
            return Err(ControlError::Invalid(
                "percept was started without --config: nothing to reload".into(),
            ));
        };
        let fresh =
            Config::load(path).map_err(|e| ControlError::Invalid(one_line(&e.to_string())))?;
        let fresh = merge(fresh, &self.overrides);
        tracing::info!(config = %path.display(), "Reloading the config.");
        // Sources added or restarted now are built with the fresh settings.
        *lock(&self.cfg) = fresh.clone();
        // Sources: the file's list wins unless --source flags replaced it.
        if self.overrides.sources.is_empty() {
            let failures = self.reload_sources(&fresh);
            if !failures.is_empty() {
                return Err(ControlError::Invalid(format!(
                    "reloaded except {} source(s): {}",
                    failures.len(),
                    failures.join("; ")
                )));
            }
        }
        Ok(())
    }
}

/// Run every configured source to the end (or until `stop` is set) and write summaries.
/// `reload` (SIGHUP) re-reads the config file between polls.
pub fn run(
    cfg: &Config,
    overrides: &Overrides,
    stop: Arc<AtomicBool>,
    reload: Arc<AtomicBool>,
) -> Result<RunReport, RunError> {
    run_with(cfg, overrides, stop, reload, RunExtras::default())
}

/// [`run`] with a model shared across runs and recording hooks (`percept analyze`).
pub fn run_with(
    cfg: &Config,
    overrides: &Overrides,
    stop: Arc<AtomicBool>,
    reload: Arc<AtomicBool>,
    extras: RunExtras,
) -> Result<RunReport, RunError> {
    gstreamer::init().map_err(|e| RunError::Gst(e.to_string()))?;
    let problems = cfg.validate();
    if !problems.is_empty() {
        return Err(RunError::Config(problems.join("; ")));
    }
    // Before the model loads: an exposed server without a token must not start at all.
    if cfg.http.enabled {
        http::check_exposure(&cfg.http).map_err(RunError::Config)?;
    }
    let prepared = prepare(cfg)?;
    if prepared.is_empty() && overrides.shard.is_none() {
        return Err(RunError::NoSources);
    }
    let events = Events::open(&cfg.run.events).map_err(|error| RunError::Events {
        path: cfg.run.events.clone(),
        error,
    })?;
    let board = Arc::new(StateBoard::default());
    let budget = ByteBudget::new(cfg.queues.budget_bytes());
    let external = extras.model.is_some();
    let (model, engine) = match extras.model.clone() {
        Some(m) => (m, None),
        None if cfg.model.enabled => {
            let (m, h) = SharedModel::start(&cfg.model)?;
            (m, Some(h))
        }
        None => {
            let m = SharedModel {
                dispatch: Arc::new(Dispatch::default()),
                live: Arc::new(LiveBoard::default()),
                metrics: Arc::new(Metrics::new()),
            };
            m.dispatch.set_gate(ModelGate::Disabled);
            m.live.set_model(crate::control::ModelStatus::Disabled);
            (m, None)
        }
    };
    let SharedModel {
        dispatch,
        live,
        metrics,
    } = model;
    metrics.queue_budget_bytes.set(budget.limit() as i64);
    let queue_stop = Arc::new(AtomicBool::new(false));
    let (ctl_tx, ctl_rx) = crossbeam_channel::unbounded();
    let worker = Worker::new(
        cfg.analysis.clone(),
        ctl_rx,
        dispatch.clone(),
        queue_stop.clone(),
    );
    let worker_thread = std::thread::Builder::new()
        .name("percept-worker".into())
        .spawn(move || worker.run())
        .map_err(|e| RunError::Gst(format!("cannot start worker: {e}")))?;
    let names: Vec<String> = prepared.iter().map(|p| p.spec.name.clone()).collect();
    let outputs = crate::sink::delivery::Outputs::start(cfg, &events, &metrics.registry, &names)
        .map_err(RunError::Config)?;
    let env = TaskEnv {
        prompts: cfg.tasks.clone(),
        governor: cfg.governor.clone(),
        captions: cfg.captions.clone(),
        alerts: cfg.alerts.clone(),
        scene_threshold: cfg.analysis.scene_threshold,
        max_tokens: cfg.model.max_tokens,
        context: cfg.model.context,
        live_board: live.clone(),
        caption_dir: (!cfg.captions.dir.is_empty()).then(|| PathBuf::from(&cfg.captions.dir)),
        transcript_files: extras.transcript_files.clone(),
        board: Some(board.clone()),
        checkpoint: extras.checkpoint.clone(),
    };
    let shared = Arc::new(Shared {
        cfg: Mutex::new(cfg.clone()),
        overrides: overrides.clone(),
        sources: Mutex::new(Vec::new()),
        ctl_tx: ctl_tx.clone(),
        events: events.clone(),
        metrics: metrics.clone(),
        board: board.clone(),
        budget: budget.clone(),
        queue_stop: queue_stop.clone(),
        dispatch: dispatch.clone(),
        env,
        closing: AtomicBool::new(false),
        restarting: AtomicUsize::new(0),
        resume: extras.resume.clone(),
    });
    let _server = if cfg.http.enabled {
        let control: Arc<dyn ControlApi> = shared.clone();
        let s = http::serve_with(
            &cfg.http,
            http::AppState {
                metrics: metrics.clone(),
                board: board.clone(),
                events: events.clone(),
                live: live.clone(),
                control: Some(control),
            },
        )?;
        tracing::info!(addr = %s.addr, "Serving /metrics and /healthz.");
        Some(s)
    } else {
        None
    };
    let started = Instant::now();
    for p in prepared {
        let r = shared.start(p)?;
        lock(&shared.sources).push(r);
    }
    let feeds: Vec<Arc<Feed>> = lock(&shared.sources)
        .iter()
        .map(|r| r.feed.clone())
        .collect();
    let progress = progress::Progress::start(&feeds, &cfg.sources);
    // Wait for all sources; a stop request makes each supervisor return promptly.
    loop {
        let stopping = stop.load(Ordering::Relaxed);
        if reload.swap(false, Ordering::Relaxed) && !stopping {
            if let Err(e) = shared.reload() {
                tracing::error!(error = %e, "Reload failed.");
            }
        }
        let mut running = 0;
        for r in lock(&shared.sources).iter_mut() {
            if stopping {
                r.stop.store(true, Ordering::Relaxed);
                queue_stop.store(true, Ordering::Relaxed);
            }
            if let Some(h) = r.handle.take_if(|h| h.is_finished()) {
                r.state = Some(h.join().unwrap_or(SourceState::Failed));
            } else if r.handle.is_some() {
                running += 1;
            }
        }
        // A shard with no source of its own waits (serving HTTP) for one to be added.
        let idle_shard = overrides.shard.is_some()
            && cfg.http.enabled
            && !stopping
            && lock(&shared.sources).is_empty();
        if running == 0 && shared.restarting.load(Ordering::SeqCst) == 0 && !idle_shard {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    shared.closing.store(true, Ordering::Relaxed);
    let deadline = stop
        .load(Ordering::Relaxed)
        .then(|| Instant::now() + Duration::from_secs_f64(cfg.run.drain_seconds));
    let _ = ctl_tx.send(Control::Finish { deadline });
    let _ = worker_thread.join();
    // The model answers what waits (bounded by the drain deadline on Ctrl-C), then the
    // recordings that asked for one get their summary.
    let tasks: Vec<Arc<Mutex<SourceTask>>> = lock(&shared.sources)
        .iter()
        .filter(|r| !r.removed)
        .filter_map(|r| r.task.clone())
        .collect();
    if !dispatch.wait_idle(deadline) {
        dispatch.drain_all();
    }
    if deadline.is_none() {
        for t in &tasks {
            let job = lock(t).summary_job();
            if let Some(j) = job {
                dispatch.offer(t, j, &|| false);
            }
        }
        dispatch.wait_idle(None);
    }
    for t in &tasks {
        lock(t).close();
    }
    if external {
        for r in lock(&shared.sources).iter() {
            dispatch.remove_source(&r.spec.name);
        }
    } else {
        dispatch.close();
    }
    if let Some(h) = engine {
        // A model still loading at Ctrl-C is left behind rather than waited for.
        if dispatch.gate() != ModelGate::Loading {
            let _ = h.join();
        }
    }
    drop(progress);
    let wall = started.elapsed().as_secs_f64();
    let mut failures = Vec::new();
    let mut states = Vec::new();
    for r in lock(&shared.sources).iter() {
        let state = r.state.unwrap_or(SourceState::Failed);
        let name = r.spec.name.clone();
        let feed = &r.feed;
        let s = &feed.stats;
        let summary = Summary {
            frames_decoded: s.frames_decoded.load(Ordering::Relaxed),
            frames_sampled: s.frames_sampled.load(Ordering::Relaxed),
            frames_analyzed: s.frames_analyzed.load(Ordering::Relaxed),
            frames_dropped: s.frames_dropped.load(Ordering::Relaxed),
            audio_seconds: s.audio_samples_analyzed.load(Ordering::Relaxed) as f64
                / f64::from(AUDIO_RATE),
            audio_seconds_dropped: s.audio_samples_dropped.load(Ordering::Relaxed) as f64
                / f64::from(AUDIO_RATE),
            gaps: s.gaps.load(Ordering::Relaxed),
            reconnects: s.reconnects.load(Ordering::Relaxed),
            keyframe_only: s.keyframe_only.load(Ordering::Relaxed),
            queue_bytes_peak: budget.peak() as u64,
            queue_budget_bytes: budget.limit() as u64,
            final_state: Some(state),
            wall_seconds: (wall * 1000.0).round() / 1000.0,
        };
        feed.emit(
            0.0,
            Some(feed.last_media_end().unwrap_or(0.0)),
            Body::Summary(summary),
        );
        if state == SourceState::Failed && !r.removed {
            let msg = feed
                .last_error
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            failures.push(format!(
                "source '{name}': {}",
                msg.unwrap_or_else(|| "failed".into())
            ));
        }
        if !r.removed {
            states.push((name, state));
        }
    }
    events.flush();
    let write_error = events.write_error();
    if let Some(e) = &write_error {
        failures.push(format!("events {}: {e}", cfg.run.events));
    }
    outputs.stop();
    Ok(RunReport {
        states,
        failures,
        events_lost: write_error.is_some(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::source::RtspTransport;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "percept-run-{tag}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// A run's shared state as `run_with` builds it, with no worker, model or HTTP: the
    /// control messages wait in the returned receiver.
    fn shared(
        cfg: &Config,
        config: Option<PathBuf>,
    ) -> (Arc<Shared>, crossbeam_channel::Receiver<Control>) {
        gstreamer::init().unwrap();
        let (ctl_tx, ctl_rx) = crossbeam_channel::unbounded();
        let metrics = Arc::new(Metrics::new());
        let env = crate::tasks::test_support::env();
        let s = Shared {
            cfg: Mutex::new(cfg.clone()),
            overrides: Overrides {
                config_path: config,
                ..Overrides::default()
            },
            sources: Mutex::new(Vec::new()),
            ctl_tx,
            events: Events::with_writer(None),
            metrics,
            board: Arc::new(StateBoard::default()),
            budget: ByteBudget::new(64 << 20),
            queue_stop: Arc::new(AtomicBool::new(false)),
            dispatch: Arc::new(Dispatch::default()),
            env,
            closing: AtomicBool::new(false),
            restarting: AtomicUsize::new(0),
            resume: None,
        };
        let s = Arc::new(s);
        for p in prepare(cfg).unwrap() {
            let r = s.start(p).unwrap();
            lock(&s.sources).push(r);
        }
        (s, ctl_rx)
    }

    /// Stops every source thread (they run real GStreamer graphs) and waits a while for them.
    fn stop_all(s: &Shared) {
        for r in lock(&s.sources).iter() {
            r.stop.store(true, Ordering::Relaxed);
        }
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(10)
            && lock(&s.sources)
                .iter()
                .any(|r| r.handle.as_ref().is_some_and(|h| !h.is_finished()))
        {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn running(s: &Shared) -> Vec<String> {
        lock(&s.sources)
            .iter()
            .filter(|r| !r.removed)
            .map(|r| r.spec.name.clone())
            .collect()
    }

    const BASE: &str = "[run]\nfps = 2.0\n[model]\nenabled = true\n";

    #[test]
    fn reload_keeps_derived_names_and_restarts_changed_sources() {
        let d = tmpdir("reload-names");
        let path = d.join("c.toml");
        let two = format!(
            "{BASE}[[source]]\nuri = \"test:?live=true\"\n[[source]]\nuri = \"test:?live=true\"\n\
             [[source]]\nname = \"cam\"\nuri = \"test:?live=true\"\nfps = 1.0\n"
        );
        std::fs::write(&path, &two).unwrap();
        let cfg = Config::load(&path).unwrap();
        let (s, _rx) = shared(&cfg, Some(path.clone()));
        assert_eq!(running(&s), ["test", "test-2", "cam"]);

        // The same file: nothing changes, `test-2` included.
        s.reload().unwrap();
        assert_eq!(running(&s), ["test", "test-2", "cam"]);
        assert_eq!(lock(&s.sources).len(), 3, "no source restarted");

        // cam's fps changes (it restarts) and its window grows (a task setting).
        std::fs::write(
            &path,
            two.replace("fps = 1.0\n", "fps = 4.0\nwindow_frames = 3\n"),
        )
        .unwrap();
        s.reload().unwrap();
        assert_eq!(running(&s), ["test", "test-2", "cam"]);
        {
            let sources = lock(&s.sources);
            let cams: Vec<&Running> = sources.iter().filter(|r| r.spec.name == "cam").collect();
            assert_eq!(cams.len(), 2, "cam restarted");
            assert!(cams[0].removed && !cams[1].removed);
            assert_eq!(cams[1].key.fps, 4.0);
            let t = cams[1].task.as_ref().unwrap();
            assert_eq!(lock(t).spec.window_frames, 3);
        }
        stop_all(&s);
    }

    #[test]
    fn reload_adds_sources_with_every_setting_and_reports_every_failure() {
        let d = tmpdir("reload-add");
        let path = d.join("c.toml");
        std::fs::write(
            &path,
            format!("{BASE}[[source]]\nname = \"a\"\nuri = \"test:?live=true\"\n"),
        )
        .unwrap();
        let cfg = Config::load(&path).unwrap();
        let (s, _rx) = shared(&cfg, Some(path.clone()));
        let var = format!("PERCEPT_TEST_DOOR_{}", std::process::id());
        std::env::set_var(&var, "s3cret");
        std::fs::write(
            &path,
            format!(
                "{BASE}[[source]]\nname = \"a\"\nuri = \"test:?live=true\"\n\
                 [[source]]\nname = \"broken\"\nuri = \"rtsp://127.0.0.1:9/x\"\npassword_env = \"PERCEPT_TEST_UNSET_{pid}\"\n\
                 [[source]]\nname = \"door\"\nuri = \"rtsp://127.0.0.1:9/x\"\nuser = \"admin\"\npassword_env = \"{var}\"\ntransport = \"udp\"\n\
                 [[source]]\nname = \"also-broken\"\nuri = \"rtsp://127.0.0.1:9/y\"\npassword_env = \"PERCEPT_TEST_UNSET_{pid}\"\n\
                 [[source]]\nname = \"hall\"\nuri = \"test:?live=true\"\nwindow_frames = 4\n",
                pid = std::process::id(),
            ),
        )
        .unwrap();
        let err = s.reload().unwrap_err().to_string();
        assert!(
            err.contains("'broken'") && err.contains("also-broken"),
            "{err}"
        );
        assert!(!err.contains("s3cret"), "{err}");
        assert_eq!(running(&s), ["a", "door", "hall"]);
        {
            let sources = lock(&s.sources);
            let door = sources.iter().find(|r| r.spec.name == "door").unwrap();
            match &door.spec.kind {
                SourceKind::Rtsp {
                    credentials,
                    transport,
                    ..
                } => {
                    let c = credentials.as_ref().expect("credentials");
                    assert_eq!((c.user.as_str(), c.password.as_str()), ("admin", "s3cret"));
                    assert_eq!(*transport, RtspTransport::Udp);
                }
                other => panic!("{other:?}"),
            }
            let hall = sources.iter().find(|r| r.spec.name == "hall").unwrap();
            assert_eq!(lock(hall.task.as_ref().unwrap()).spec.window_frames, 4);
        }
        stop_all(&s);
    }

    /// Requests for one name at once: one source starts, the others get 409, and the
    /// running source keeps its model slot.
    #[test]
    fn concurrent_adds_of_one_name_start_one_source() {
        let cfg = Config::parse(BASE).unwrap();
        let (s, _rx) = shared(&cfg, None);
        for round in 0..6 {
            let name = format!("cam{round}");
            let barrier = Arc::new(std::sync::Barrier::new(12));
            let handles: Vec<_> = (0..12)
                .map(|_| {
                    let (s, b, name) = (s.clone(), barrier.clone(), name.clone());
                    std::thread::spawn(move || {
                        b.wait();
                        s.add(AddSource {
                            name: Some(name),
                            uri: "test:?live=true".into(),
                            task: Some(TaskKind::Describe),
                            questions: Vec::new(),
                            prompt: None,
                            fps: None,
                        })
                    })
                })
                .collect();
            let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
            let ok = results.iter().filter(|r| r.is_ok()).count();
            let conflicts = results
                .iter()
                .filter(|r| matches!(r, Err(ControlError::Conflict(_))))
                .count();
            assert_eq!((ok, conflicts), (1, 11), "{results:?}");
            assert_eq!(running(&s).iter().filter(|n| **n == name).count(), 1);
        }
        stop_all(&s);
    }

    /// `percept analyze take=1.wav` opens `take=1.wav`, not a source named `take` at `1.wav`.
    #[test]
    fn a_recording_path_is_opened_as_given() {
        let cfg = Config::default();
        let mut sc = SourceConfig::from_path(std::path::Path::new("take=1.wav"));
        sc.name = Some("take_1".into());
        let p = prepare_one(&cfg, &sc).unwrap();
        assert_eq!(p.spec.kind, SourceKind::File(PathBuf::from("take=1.wav")));
        assert_eq!(p.spec.name, "take_1");
        let mut c = cfg.clone();
        c.sources = vec![sc];
        assert!(c.validate().is_empty());
    }
}
