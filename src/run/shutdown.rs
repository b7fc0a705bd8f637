//! The end of a run, in order: the worker drains the queues, takes every answer still owed
//! and closes the tasks; the model side is let go; then each source's `summary` event and
//! the run's report.

use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::Instant;

use crate::event::{Body, SourceState, Summary};
use crate::ingest::AUDIO_RATE;
use crate::lock;
use crate::tasks::dispatch::ModelGate;
use crate::worker::Control;

use super::{RunReport, Shared};

impl Shared {
    /// Tells the worker to finish (see [`Control::Finish`]: it drains the queues, applies
    /// every answer still owed, bounded by `deadline` on Ctrl-C, asks for the summaries
    /// recordings want and closes the tasks), waits for it, then lets the model side go: a
    /// model shared across runs only loses this run's slots, the run's own model thread is
    /// closed and joined (unless it is still loading: that is left behind at Ctrl-C).
    pub(super) fn wind_down(
        &self,
        deadline: Option<Instant>,
        worker: JoinHandle<()>,
        engine: Option<JoinHandle<()>>,
        external: bool,
    ) {
        let _ = self.ctl_tx.send(Control::Finish { deadline });
        let _ = worker.join();
        if external {
            for r in lock(&self.sources).iter() {
                self.dispatch.remove_source(&r.spec.name);
            }
        } else {
            self.dispatch.close();
        }
        if let Some(h) = engine {
            if self.dispatch.gate() != ModelGate::Loading {
                let _ = h.join();
            }
        }
    }

    /// Each source's `summary` event, the events flushed, and the sources' final states and
    /// failures for the exit code. `wall` is the run's length, seconds.
    pub(super) fn report(&self, wall: f64, events_path: &str) -> RunReport {
        let mut failures = Vec::new();
        let mut states = Vec::new();
        for r in lock(&self.sources).iter() {
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
                queue_bytes_peak: self.budget.peak() as u64,
                queue_budget_bytes: self.budget.limit() as u64,
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
        self.events.flush();
        let write_error = self.events.write_error();
        if let Some(e) = &write_error {
            failures.push(format!("events {events_path}: {e}"));
        }
        RunReport {
            states,
            failures,
            events_lost: write_error.is_some(),
        }
    }
}
