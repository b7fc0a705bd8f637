//! Outcomes going back: the model thread (answers, errors) and the dispatch (jobs that will
//! not run) send each job's outcome over a channel to the worker that offered it. The worker
//! alone applies it to the source's task, so no other thread touches task state.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crossbeam_channel::Sender;

use super::{Answer, Job, SkipReason};
use crate::metrics::Metrics;

/// What became of a job.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// The model's answer, with the step's timings.
    Answer(Answer),
    /// The request failed (encoding, generation, decoding, a panicking step).
    Error(String),
    /// The job never ran; already counted in `model_skipped_total`.
    Skipped(SkipReason),
}

/// One job's outcome on its way to the worker.
#[derive(Debug)]
pub struct Reply {
    /// The source start it belongs to ([`ReplyTo::key`]).
    pub to: u64,
    pub job: Job,
    pub outcome: Outcome,
}

/// Where one source's outcomes go: the worker's reply channel, tagged with a key unique to
/// this start of the source, so a source restarted under the same name never gets its
/// predecessor's answers. Skips are counted here, where they happen.
#[derive(Clone)]
pub struct ReplyTo {
    key: u64,
    tx: Sender<Reply>,
    metrics: Arc<Metrics>,
}

impl ReplyTo {
    pub fn new(tx: Sender<Reply>, metrics: Arc<Metrics>) -> ReplyTo {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        ReplyTo {
            key: NEXT.fetch_add(1, Ordering::Relaxed),
            tx,
            metrics,
        }
    }

    pub fn key(&self) -> u64 {
        self.key
    }

    pub fn send(&self, job: Job, outcome: Outcome) {
        // The channel is unbounded: the model thread never waits on the worker. A closed
        // one means the run ended (past its drain deadline): nobody is left to tell.
        let _ = self.tx.send(Reply {
            to: self.key,
            job,
            outcome,
        });
    }

    /// A job that will not run: counted now (`model_skipped_total`), told to the task.
    pub fn skipped(&self, job: Job, reason: SkipReason) {
        self.metrics
            .model
            .skipped
            .with_label_values(&[&job.source, reason.as_str()])
            .inc();
        self.send(job, Outcome::Skipped(reason));
    }
}

/// A job the model side took from the dispatch; its outcome goes back exactly once.
pub struct Taken {
    pub job: Job,
    pub reply: ReplyTo,
}

impl Taken {
    pub fn answer(&self, a: Answer) {
        self.reply.send(self.job.clone(), Outcome::Answer(a));
    }

    pub fn error(&self, message: String) {
        self.reply.send(self.job.clone(), Outcome::Error(message));
    }

    pub fn skip(&self, reason: SkipReason) {
        self.reply.skipped(self.job.clone(), reason);
    }
}
