//! Between the worker (gates) and the model thread: per-source slots with declared
//! when-full rules, so the model never builds a backlog.
//!
//! Live sources: a new frame job replaces a waiting one (freshest wins); partial caption
//! windows replace each other; final windows queue up to a small bound, then the oldest is
//! dropped and counted. Files: the worker waits for a free slot (backpressure), so nothing
//! is skipped. Jobs are taken round-robin across sources, one per source per step first, so
//! a batch spans sources.
//!
//! Every job that will not run (superseded, model unavailable, source removed, shutdown) is
//! counted and sent back to its source's worker here, in one place, after the dispatch lock
//! is released (see [`super::reply`]).

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

use super::reply::{ReplyTo, Taken};
use super::{Job, JobClass, SkipReason};

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
    reply: ReplyTo,
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

/// A job that did not reach the model, and why.
type Skipped = (Job, SkipReason);

/// Counts skipped jobs and sends them back to their source's worker (which turns them into
/// `gap` events). Called without the dispatch lock held.
fn report(reply: &ReplyTo, skipped: Vec<Skipped>) {
    for (job, why) in skipped {
        reply.skipped(job, why);
    }
}

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

    /// A slot for a source's jobs. A name that has a slot already keeps it (returns false):
    /// one source's jobs must never land in another's task.
    pub fn add_source(&self, name: &str, reply: ReplyTo, live: bool) -> bool {
        let mut g = self.lock();
        if g.sources.contains_key(name) {
            return false;
        }
        g.sources.insert(
            name.to_string(),
            Pending {
                reply,
                live,
                frame: None,
                partial: None,
                finals: VecDeque::new(),
                text: VecDeque::new(),
            },
        );
        drop(g);
        self.cv.notify_all();
        true
    }

    /// Forget a source; its waiting jobs are counted as skipped (`source_removed`).
    pub fn remove_source(&self, name: &str) {
        let mut g = self.lock();
        let removed = g.sources.remove(name);
        drop(g);
        self.cv.notify_all();
        if let Some(mut p) = removed {
            let skipped = std::iter::from_fn(|| p.take())
                .map(|j| (j, SkipReason::SourceRemoved))
                .collect();
            report(&p.reply, skipped);
        }
    }

    /// Hands a job of `reply`'s source to the model side; what will not run (this job or
    /// older ones it replaces) is counted and sent back to the source. For files this blocks
    /// while the slot is taken or the model is loading, unless `stop` says the run is ending.
    pub fn offer(&self, reply: &ReplyTo, job: Job, stop: &dyn Fn() -> bool) {
        let skipped = self.place(job, stop);
        report(reply, skipped);
    }

    fn place(&self, job: Job, stop: &dyn Fn() -> bool) -> Vec<Skipped> {
        let mut g = self.lock();
        loop {
            match g.gate {
                ModelGate::Disabled => return vec![(job, SkipReason::ModelDisabled)],
                ModelGate::Unavailable => return vec![(job, SkipReason::ModelUnavailable)],
                ModelGate::Loading | ModelGate::Ready => {}
            }
            // Follow-ups (retries, summaries) are still owed after close.
            if g.closed && job.class != JobClass::Text {
                return vec![(job, SkipReason::Shutdown)];
            }
            let gate = g.gate;
            let Some(p) = g.sources.get_mut(&job.source) else {
                return vec![(job, SkipReason::SourceRemoved)];
            };
            let live = p.live;
            if live {
                if gate == ModelGate::Loading {
                    return vec![(job, SkipReason::ModelLoading)];
                }
                let mut skipped = Vec::new();
                match job.class {
                    JobClass::Frame => {
                        if let Some(old) = p.frame.replace(job) {
                            skipped.push((old, SkipReason::Superseded));
                        }
                    }
                    JobClass::PartialAudio => {
                        if let Some(old) = p.partial.replace(job) {
                            skipped.push((old, SkipReason::Superseded));
                        }
                    }
                    JobClass::FinalAudio => {
                        // A final window covers its partials.
                        if let Some(old) = p.partial.take() {
                            skipped.push((old, SkipReason::Superseded));
                        }
                        p.finals.push_back(job);
                        while p.finals.len() > MAX_FINALS {
                            if let Some(old) = p.finals.pop_front() {
                                skipped.push((old, SkipReason::ModelBehind));
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
                return vec![(job, SkipReason::Shutdown)];
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
    /// While the model loads every file job waits (see [`Dispatch::offer`]), so a file
    /// source is left alone until the model is ready or known to be unavailable.
    pub fn would_wait(&self, source: &str, class: JobClass) -> bool {
        let g = self.lock();
        if g.closed {
            return false;
        }
        match g.sources.get(source) {
            Some(p) if !p.live => match g.gate {
                ModelGate::Loading => true,
                ModelGate::Disabled | ModelGate::Unavailable => false,
                ModelGate::Ready => match class {
                    JobClass::Frame => p.frame.is_some(),
                    JobClass::PartialAudio => p.partial.is_some(),
                    JobClass::FinalAudio => !p.finals.is_empty(),
                    JobClass::Text => false,
                },
            },
            _ => false,
        }
    }

    /// No more jobs will be offered: the model side drains what waits, then stops.
    pub fn close(&self) {
        self.lock().closed = true;
        self.cv.notify_all();
    }

    /// Drop everything still waiting (shutdown deadline passed), counted as `shutdown`.
    pub fn drain_all(&self) {
        let mut g = self.lock();
        let mut out = Vec::new();
        for p in g.sources.values_mut() {
            let skipped: Vec<Skipped> = std::iter::from_fn(|| p.take())
                .map(|j| (j, SkipReason::Shutdown))
                .collect();
            out.push((p.reply.clone(), skipped));
        }
        drop(g);
        self.cv.notify_all();
        for (reply, skipped) in out {
            report(&reply, skipped);
        }
    }

    /// Waits for work and takes up to `max` jobs, one per source per round. `None` once
    /// closed and empty.
    pub fn take_batch(&self, max: usize) -> Option<Vec<Taken>> {
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
                        batch.push(Taken {
                            job: j,
                            reply: p.reply.clone(),
                        });
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

    /// Nothing waits and nothing is being answered: every outcome has been sent.
    pub fn is_idle(&self) -> bool {
        let g = self.lock();
        g.busy == 0 && g.sources.values().all(Pending::is_empty)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TaskKind;
    use crate::metrics::Metrics;
    use crate::tasks::test_support::reply_to;
    use std::sync::Arc;

    fn job(source: &str, class: JobClass) -> Job {
        Job {
            source: source.into(),
            task: TaskKind::Describe,
            class,
            t: 0.0,
            end: 0.0,
            frame: None,
            video: Vec::new(),
            audio: None,
            prompt: String::new(),
            instructions: Default::default(),
            soft_tokens: 70,
            max_tokens: 8,
            attempt: 0,
            next_t0: None,
            captured: std::time::Instant::now(),
        }
    }

    fn skipped(metrics: &Metrics, source: &str, reason: &str) -> u64 {
        metrics
            .model
            .skipped
            .with_label_values(&[source, reason])
            .get()
    }

    /// A name keeps its first slot: a second source of that name must not take over the
    /// first one's jobs.
    #[test]
    fn a_second_slot_for_a_name_is_refused() {
        let metrics = Arc::new(Metrics::new());
        let (ta, _rxa) = reply_to(&metrics);
        let (tb, _rxb) = reply_to(&metrics);
        let d = Dispatch::default();
        d.set_gate(ModelGate::Ready);
        assert!(d.add_source("cam", ta.clone(), true));
        let second = d.add_source("cam", tb, true);
        d.offer(&ta, job("cam", JobClass::Frame), &|| false);
        let batch = d.take_batch(4).unwrap();
        assert_eq!(batch.len(), 1);
        assert_eq!(
            batch[0].reply.key(),
            ta.key(),
            "the first source keeps its slot"
        );
        assert!(!second);
    }

    /// Skipped jobs are counted by the dispatch itself, with their reason.
    #[test]
    fn the_dispatch_counts_what_it_skips() {
        let metrics = Arc::new(Metrics::new());
        let (t, replies) = reply_to(&metrics);
        let d = Dispatch::default();
        d.add_source("cam", t.clone(), true);
        d.offer(&t, job("cam", JobClass::Frame), &|| false);
        assert_eq!(skipped(&metrics, "cam", "model_loading"), 1);
        d.set_gate(ModelGate::Ready);
        d.offer(&t, job("cam", JobClass::Frame), &|| false);
        d.offer(&t, job("cam", JobClass::Frame), &|| false);
        assert_eq!(skipped(&metrics, "cam", "superseded"), 1);
        d.remove_source("cam");
        assert_eq!(skipped(&metrics, "cam", "source_removed"), 1);
        d.offer(&t, job("cam", JobClass::Frame), &|| false);
        assert_eq!(skipped(&metrics, "cam", "source_removed"), 2);
        // Each skip also went back to the source's worker, with its reason.
        let told: Vec<SkipReason> = replies
            .try_iter()
            .filter_map(|r| match r.outcome {
                crate::tasks::reply::Outcome::Skipped(why) => Some(why),
                _ => None,
            })
            .collect();
        assert_eq!(
            told,
            [
                SkipReason::ModelLoading,
                SkipReason::Superseded,
                SkipReason::SourceRemoved,
                SkipReason::SourceRemoved
            ]
        );
    }

    /// While the model loads, a file source's jobs would wait: the worker must leave its
    /// queues alone; a live source's never wait (they are skipped as `model_loading`).
    #[test]
    fn file_sources_wait_while_the_model_loads() {
        let metrics = Arc::new(Metrics::new());
        let d = Dispatch::default();
        d.add_source("file", reply_to(&metrics).0, false);
        d.add_source("cam", reply_to(&metrics).0, true);
        assert!(d.would_wait("file", JobClass::Frame));
        assert!(d.would_wait("file", JobClass::FinalAudio));
        assert!(!d.would_wait("cam", JobClass::Frame));
        d.set_gate(ModelGate::Ready);
        assert!(!d.would_wait("file", JobClass::Frame));
        d.set_gate(ModelGate::Unavailable);
        assert!(!d.would_wait("file", JobClass::Frame));
    }
}
