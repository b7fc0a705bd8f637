//! `percept run`: wires sources, queues, the worker, sinks and the HTTP server together, and
//! shuts them down in order on EOS, Ctrl-C or SIGTERM.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::{Config, SourceConfig};
use crate::event::{Body, SourceState, Summary};
use crate::http;
use crate::ingest::graph::GraphParams;
use crate::ingest::supervisor::{StateBoard, Supervisor};
use crate::ingest::{Feed, AUDIO_RATE};
use crate::metrics::Metrics;
use crate::progress;
use crate::queue::{self, ByteBudget, WhenFull};
use crate::sink::Events;
use crate::source::{self, Credentials, SourceKind, SourceSpec};
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
}

impl RunReport {
    /// 2 when no source could run, 0 otherwise (failed sources are `error` events).
    pub fn exit_code(&self) -> u8 {
        if !self.states.is_empty() && self.states.iter().all(|(_, s)| *s == SourceState::Failed) {
            2
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
            .map(|s| SourceConfig::from_uri(s))
            .collect();
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
    cfg
}

struct Prepared {
    spec: SourceSpec,
    params: GraphParams,
}

fn prepare(cfg: &Config) -> Result<Vec<Prepared>, RunError> {
    let mut out = Vec::new();
    for sc in &cfg.sources {
        let mut spec = source::parse(&sc.uri).map_err(|e| RunError::Config(e.to_string()))?;
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
        out.push(Prepared { spec, params });
    }
    let mut specs: Vec<SourceSpec> = out.iter().map(|p| p.spec.clone()).collect();
    source::dedupe_names(&mut specs);
    for (p, s) in out.iter_mut().zip(specs) {
        p.spec.name = s.name;
    }
    Ok(out)
}

/// Run every configured source to the end (or until `stop` is set) and write summaries.
pub fn run(cfg: &Config, stop: Arc<AtomicBool>) -> Result<RunReport, RunError> {
    gstreamer::init().map_err(|e| RunError::Gst(e.to_string()))?;
    let problems = cfg.validate();
    if !problems.is_empty() {
        return Err(RunError::Config(problems.join("; ")));
    }
    let prepared = prepare(cfg)?;
    if prepared.is_empty() {
        return Err(RunError::NoSources);
    }
    let events = Events::open(&cfg.run.events).map_err(|error| RunError::Events {
        path: cfg.run.events.clone(),
        error,
    })?;
    let metrics = Arc::new(Metrics::new());
    let board = Arc::new(StateBoard::default());
    let budget = ByteBudget::new(cfg.queues.budget_bytes());
    metrics.queue_budget_bytes.set(budget.limit() as i64);
    let _server = if cfg.http.enabled {
        let s = http::serve(
            &cfg.http.listen,
            http::AppState {
                metrics: metrics.clone(),
                board: board.clone(),
                events: events.clone(),
                live: Arc::new(crate::control::LiveBoard::default()),
                control: None,
            },
        )?;
        tracing::info!(addr = %s.addr, "Serving /metrics and /healthz.");
        Some(s)
    } else {
        None
    };
    let (ctl_tx, ctl_rx) = crossbeam_channel::unbounded();
    let worker = Worker::new(cfg.analysis.clone(), ctl_rx);
    let worker_thread = std::thread::Builder::new()
        .name("percept-worker".into())
        .spawn(move || worker.run())
        .map_err(|e| RunError::Gst(format!("cannot start worker: {e}")))?;
    // Producers stop blocking at shutdown through their own flag, set once sources are told to stop.
    let queue_stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut handles = Vec::new();
    let mut feeds = Vec::new();
    for p in prepared {
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
            budget.clone(),
            queue_stop.clone(),
        );
        let (atx, arx) = queue::bounded(audio_cap, apol, budget.clone(), queue_stop.clone());
        let feed = Feed::new(
            p.spec.name.clone(),
            vtx,
            atx,
            metrics.clone(),
            events.clone(),
        );
        metrics.set_state(&p.spec.name, SourceState::Connecting);
        let _ = ctl_tx.send(Control::Add(WorkerSource {
            feed: feed.clone(),
            video: vrx,
            audio: arx,
        }));
        tracing::info!(source = %p.spec.name, uri = %p.spec.display, fps = p.params.fps, "Starting source.");
        let sup = Supervisor {
            spec: p.spec.clone(),
            params: p.params,
            reconnect: cfg.reconnect.clone(),
            stall_seconds: cfg.watchdog.stall_seconds,
            realtime: cfg.run.realtime,
            feed: feed.clone(),
            stop: stop.clone(),
            board: board.clone(),
        };
        let h = std::thread::Builder::new()
            .name(format!("src-{}", p.spec.name))
            .spawn(move || sup.run())
            .map_err(|e| RunError::Gst(format!("cannot start source thread: {e}")))?;
        handles.push((p.spec, h));
        feeds.push(feed);
    }
    let progress = progress::Progress::start(&feeds, &cfg.sources);
    // Wait for all sources; a stop request makes each supervisor return promptly.
    let mut states = Vec::new();
    for (spec, h) in handles {
        while !h.is_finished() {
            if stop.load(Ordering::Relaxed) {
                queue_stop.store(true, Ordering::Relaxed);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let state = h.join().unwrap_or(SourceState::Failed);
        states.push((spec.name.clone(), state));
    }
    let deadline = stop
        .load(Ordering::Relaxed)
        .then(|| Instant::now() + Duration::from_secs_f64(cfg.run.drain_seconds));
    let _ = ctl_tx.send(Control::Finish { deadline });
    let _ = worker_thread.join();
    drop(progress);
    let wall = started.elapsed().as_secs_f64();
    let mut failures = Vec::new();
    for (feed, (name, state)) in feeds.iter().zip(&states) {
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
            final_state: Some(*state),
            wall_seconds: (wall * 1000.0).round() / 1000.0,
        };
        feed.emit(
            0.0,
            Some(feed.last_media_end().unwrap_or(0.0)),
            Body::Summary(summary),
        );
        if *state == SourceState::Failed {
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
    }
    events.flush();
    Ok(RunReport { states, failures })
}
