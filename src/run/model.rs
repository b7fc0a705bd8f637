//! The model side a run talks to: its own, or one shared across runs (`percept analyze`,
//! the queue worker, the benchmarks).

use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::control::LiveBoard;
use crate::engine::Engine;
use crate::metrics::Metrics;
use crate::tasks::dispatch::Dispatch;

use super::RunError;

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
