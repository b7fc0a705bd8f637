//! `percept run`: wires sources, queues, the worker, sinks and the HTTP server together, and
//! shuts them down in order on EOS, Ctrl-C or SIGTERM.
//!
//! `prepare` turns each `[[source]]` into what a graph is built from, `sources` starts one,
//! `control` serves the control API, `reload` applies a fresh config, `shutdown` ends a run
//! in order, `model` is the model side a run talks to.

mod control;
mod model;
mod prepare;
mod reload;
mod shutdown;
mod sources;
#[cfg(test)]
mod tests;

pub use model::{RunExtras, SharedModel};

pub mod config;

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;

use crate::config::{Config, SourceConfig, TaskKind};
use crate::control::{ControlApi, LiveBoard};
use crate::event::SourceState;
use crate::http;
use crate::ingest::supervisor::StateBoard;
use crate::ingest::SourceInput;
use crate::lock;
use crate::metrics::Metrics;
use crate::progress;
use crate::queue::ByteBudget;
use crate::sink::Events;
use crate::source::SourceSpec;
use crate::tasks::dispatch::{Dispatch, ModelGate};
use crate::tasks::reply::Reply;
use crate::tasks::{TaskEnv, TaskSpec};
use crate::worker::{Control, Worker};

use prepare::{prepare, GraphKey};

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

/// One source started by this run (kept after it ends, for its summary).
struct Running {
    spec: SourceSpec,
    /// What its graph was built from (see [`GraphKey`]).
    key: GraphKey,
    feed: Arc<SourceInput>,
    /// What its task was last told to do (the worker owns the task itself); None without
    /// the model.
    task: Option<TaskSpec>,
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
    /// The worker's reply channel: each source's outcomes come back on it.
    replies: Sender<Reply>,
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
    let (reply_tx, reply_rx) = crossbeam_channel::unbounded();
    let worker = Worker::new(
        cfg.analysis.clone(),
        ctl_rx,
        reply_rx,
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
        replies: reply_tx,
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
    let feeds: Vec<Arc<SourceInput>> = lock(&shared.sources)
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
    shared.wind_down(deadline, worker_thread, engine, external);
    drop(progress);
    let report = shared.report(started.elapsed().as_secs_f64(), &cfg.run.events);
    outputs.stop();
    Ok(report)
}
