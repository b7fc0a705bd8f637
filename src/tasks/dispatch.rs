//! Between the worker (gates) and the model thread: per-source slots with declared
//! when-full rules, so the model never builds a backlog.
//!
//! Live sources: a new frame job replaces a waiting one (freshest wins); partial caption
//! windows replace each other; final windows queue up to a small bound, then the oldest is
//! dropped and counted. Files: the worker waits for a free slot (backpressure), so nothing
//! is skipped. Jobs are taken round-robin across sources, one per source per step first, so
//! a batch spans sources.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use super::{Job, JobClass, SourceTask};

/// Final caption windows waiting per live source before the oldest is dropped.
const MAX_FINALS: usize = 3;

/// Where the model stands, as the gates see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelGate {
    Disabled,
    Loading,
    Ready,
    Unavailable,
}

struct Pending {
    task: Arc<Mutex<SourceTask>>,
    live: bool,
    frame: Option<Job>,
    partial: Option<Job>,
    finals: VecDeque<Job>,
    text: VecDeque<Job>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.frame.is_none()
            && self.partial.is_none()
            && self.finals.is_empty()
            && self.text.is_empty()
    }

    /// Text jobs (retries, summaries) and final windows first: they are owed to the user.
    fn take(&mut self) -> Option<Job> {
        self.text
            .pop_front()
            .or_else(|| self.finals.pop_front())
            .or_else(|| self.frame.take())
            .or_else(|| self.partial.take())
    }
}

struct Inner {
    sources: BTreeMap<String, Pending>,
    gate: ModelGate,
    closed: bool,
    /// Jobs taken by the model side and not yet answered.
    busy: usize,
    /// Round-robin start, so no source is always first in a batch.
    turn: usize,
}

pub struct Dispatch {
    inner: Mutex<Inner>,
    cv: Condvar,
}

/// Why a job did not reach the model.
pub type Skipped = (Job, &'static str);

impl Default for Dispatch {
    fn default() -> Self {
        Dispatch {
            inner: Mutex::new(Inner {
                sources: BTreeMap::new(),
                gate: ModelGate::Loading,
                closed: false,
                busy: 0,
                turn: 0,
            }),
            cv: Condvar::new(),
        }
    }
}

impl Dispatch {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn set_gate(&self, gate: ModelGate) {
        self.lock().gate = gate;
        self.cv.notify_all();
    }

    pub fn gate(&self) -> ModelGate {
        self.lock().gate
    }

    pub fn add_source(&self, name: &str, task: Arc<Mutex<SourceTask>>, live: bool) {
        self.lock().sources.insert(
            name.to_string(),
            Pending {
                task,
                live,
                frame: None,
                partial: None,
                finals: VecDeque::new(),
                text: VecDeque::new(),
            },
        );
        self.cv.notify_all();
    }

    /// Forget a source; its waiting jobs are returned as skipped.
    pub fn remove_source(&self, name: &str) -> Vec<Skipped> {
        let mut g = self.lock();
        let mut out = Vec::new();
        if let Some(mut p) = g.sources.remove(name) {
            while let Some(j) = p.take() {
                out.push((j, "source_removed"));
            }
        }
        self.cv.notify_all();
        out
    }

    /// Hands a job to the model side. Returns the jobs that will not run, with a reason
    /// (the caller counts them). For files this blocks while the slot is taken or the
    /// model is loading, unless `stop` says the run is ending.
    pub fn offer(&self, job: Job, stop: &dyn Fn() -> bool) -> Vec<Skipped> {
        let mut g = self.lock();
        loop {
            match g.gate {
                ModelGate::Disabled => return vec![(job, "model_disabled")],
                ModelGate::Unavailable => return vec![(job, "model_unavailable")],
                ModelGate::Loading | ModelGate::Ready => {}
            }
            // Follow-ups (retries, summaries) are still owed after close.
            if g.closed && job.class != JobClass::Text {
                return vec![(job, "shutdown")];
            }
            let gate = g.gate;
            let Some(p) = g.sources.get_mut(&job.source) else {
                return vec![(job, "source_removed")];
            };
            let live = p.live;
            if live {
                if gate == ModelGate::Loading {
                    return vec![(job, "model_loading")];
                }
                let mut skipped = Vec::new();
                match job.class {
                    JobClass::Frame => {
                        if let Some(old) = p.frame.replace(job) {
                            skipped.push((old, "superseded"));
                        }
                    }
                    JobClass::PartialAudio => {
                        if let Some(old) = p.partial.replace(job) {
                            skipped.push((old, "superseded"));
                        }
                    }
                    JobClass::FinalAudio => {
                        // A final window covers its partials.
                        if let Some(old) = p.partial.take() {
                            skipped.push((old, "superseded"));
                        }
                        p.finals.push_back(job);
                        while p.finals.len() > MAX_FINALS {
                            if let Some(old) = p.finals.pop_front() {
                                skipped.push((old, "model_behind"));
                            }
                        }
                    }
                    JobClass::Text => p.text.push_back(job),
                }
                self.cv.notify_all();
                return skipped;
            }
            let free = gate == ModelGate::Ready
                && match job.class {
                    JobClass::Frame => p.frame.is_none(),
                    JobClass::PartialAudio => p.partial.is_none(),
                    JobClass::FinalAudio => p.finals.is_empty(),
                    JobClass::Text => true,
                };
            if free {
                match job.class {
                    JobClass::Frame => p.frame = Some(job),
                    JobClass::PartialAudio => p.partial = Some(job),
                    JobClass::FinalAudio => p.finals.push_back(job),
                    JobClass::Text => p.text.push_back(job),
                }
                self.cv.notify_all();
                return Vec::new();
            }
            if stop() {
                return vec![(job, "shutdown")];
            }
            g = self
                .cv
                .wait_timeout(g, Duration::from_millis(50))
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }

    /// Would a job of `class` from this file source have to wait? The worker then leaves
    /// that source's queue alone for now instead of blocking every other source behind it.
    pub fn would_wait(&self, source: &str, class: JobClass) -> bool {
        let g = self.lock();
        if g.gate != ModelGate::Ready || g.closed {
            return false;
        }
        match g.sources.get(source) {
            Some(p) if !p.live => match class {
                JobClass::Frame => p.frame.is_some(),
                JobClass::PartialAudio => p.partial.is_some(),
                JobClass::FinalAudio => !p.finals.is_empty(),
                JobClass::Text => false,
            },
            _ => false,
        }
    }

    /// No more jobs will be offered: the model side drains what waits, then stops.
    pub fn close(&self) {
        self.lock().closed = true;
        self.cv.notify_all();
    }

    /// Drop everything still waiting (shutdown deadline passed).
    pub fn drain_all(&self) -> Vec<Skipped> {
        let mut g = self.lock();
        let mut out = Vec::new();
        for p in g.sources.values_mut() {
            while let Some(j) = p.take() {
                out.push((j, "shutdown"));
            }
        }
        out
    }

    /// Waits for work and takes up to `max` jobs, one per source per round. `None` once
    /// closed and empty.
    pub fn take_batch(&self, max: usize) -> Option<Vec<(Arc<Mutex<SourceTask>>, Job)>> {
        let mut g = self.lock();
        loop {
            let any = g.sources.values().any(|p| !p.is_empty());
            if any {
                break;
            }
            if g.closed {
                return None;
            }
            g = self
                .cv
                .wait_timeout(g, Duration::from_millis(100))
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        let n = g.sources.len();
        let start = g.turn % n.max(1);
        g.turn = g.turn.wrapping_add(1);
        let names: Vec<String> = g.sources.keys().cloned().collect();
        let mut batch = Vec::new();
        'rounds: loop {
            let mut took = false;
            for k in 0..n {
                if batch.len() >= max {
                    break 'rounds;
                }
                let name = &names[(start + k) % n];
                if let Some(p) = g.sources.get_mut(name) {
                    if let Some(j) = p.take() {
                        batch.push((p.task.clone(), j));
                        took = true;
                    }
                }
            }
            if !took {
                break;
            }
        }
        g.busy += batch.len();
        self.cv.notify_all();
        Some(batch)
    }

    /// The model side answered `n` taken jobs.
    pub fn done(&self, n: usize) {
        let mut g = self.lock();
        g.busy = g.busy.saturating_sub(n);
        self.cv.notify_all();
    }

    /// Waits until nothing waits and nothing is being answered, or the deadline passes, or
    /// the model cannot answer. Returns true when idle.
    pub fn wait_idle(&self, deadline: Option<std::time::Instant>) -> bool {
        let mut g = self.lock();
        loop {
            let idle = g.busy == 0 && g.sources.values().all(Pending::is_empty);
            if idle || matches!(g.gate, ModelGate::Unavailable | ModelGate::Disabled) {
                return idle;
            }
            if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
                return false;
            }
            g = self
                .cv
                .wait_timeout(g, Duration::from_millis(50))
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
    }
}
