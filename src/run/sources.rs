//! Starting a source: its queues, feed, task (handed to the worker) and supervisor thread.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use crate::config::TaskKind;
use crate::control::SourceInfo;
use crate::event::SourceState;
use crate::ingest::supervisor::Supervisor;
use crate::ingest::SourceInput;
use crate::lock;
use crate::queue::{self, WhenFull};
use crate::tasks::reply::ReplyTo;
use crate::tasks::SourceTask;
use crate::worker::{Control, ModelTask, WorkerSource};

use super::prepare::Prepared;
use super::{RunError, Running, Shared};

impl Shared {
    /// Starts a source; the caller adds the returned entry to `sources` (under the same lock
    /// as its check that the name is free).
    pub(super) fn start(&self, p: Prepared) -> Result<Running, RunError> {
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
        let feed = SourceInput::new(
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
            let reply = ReplyTo::new(self.replies.clone(), self.metrics.clone());
            if !self.dispatch.add_source(&p.spec.name, reply.clone(), live) {
                return Err(RunError::Config(format!(
                    "a source named '{}' exists",
                    p.spec.name
                )));
            }
            Some(ModelTask { state: st, reply })
        } else {
            None
        };
        self.metrics
            .set_state(&p.spec.name, SourceState::Connecting);
        let spec = task.as_ref().map(|t| t.state.spec.clone());
        let _ = self.ctl_tx.send(Control::Add(Box::new(WorkerSource {
            feed: feed.clone(),
            video: vrx,
            audio: arx,
            task,
            resume: self.resume.clone(),
        })));
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
            task: spec,
            handle: Some(h),
            stop,
            state: None,
            removed: false,
        })
    }

    pub(super) fn info(&self, r: &Running) -> SourceInfo {
        let (task, questions, prompt) = match &r.task {
            Some(s) => (s.task, s.questions.clone(), s.prompt.clone()),
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
}
