//! The worker: one thread that pulls from every source's queues, analyses what it gets
//! (signals, then the source's task), offers the task's jobs to the dispatch, and applies
//! every outcome the model side sends back over its reply channel. It alone owns each
//! source's task state: the model thread and the control API only send it messages.

use crossbeam_channel::{Receiver, Select};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::AnalysisConfig;
use crate::event::{Body, Media};
use crate::ingest::{AudioChunk, SourceInput, VideoFrame, AUDIO_RATE};
use crate::queue::{DropReason, QueueRx};
use crate::signal::{level_dbfs, MotionDetector, VoiceDetector};
use crate::tasks::dispatch::{Dispatch, ModelGate};
use crate::tasks::reply::{Outcome, Reply, ReplyTo};
use crate::tasks::{Job, JobClass, SourceTask, TaskSpec};

/// A source as the worker sees it.
pub struct WorkerSource {
    pub feed: Arc<SourceInput>,
    pub video: QueueRx<VideoFrame>,
    pub audio: QueueRx<AudioChunk>,
    /// What the model does with this source; None = signal analysis only.
    pub task: Option<ModelTask>,
    /// An interrupted recording: media already analysed is not analysed twice.
    pub resume: Option<crate::tasks::Resume>,
}

/// A source's task as the worker owns it, and where the model side sends its outcomes (the
/// same route is the source's slot in the dispatch).
pub struct ModelTask {
    pub state: SourceTask,
    pub reply: ReplyTo,
}

pub enum Control {
    Add(Box<WorkerSource>),
    /// Stop analysing a source (removed at runtime); what it still has queued is dropped.
    /// Outcomes already sent for it (the dispatch's `source_removed` skips) are applied
    /// first: the sender removes the dispatch slot before sending this.
    Remove(String),
    /// A new task (or new questions, prompt, window) for a source (control API, reload).
    SetTask {
        name: String,
        spec: TaskSpec,
    },
    /// No more media will be pushed: drain the queues, wait for every answer still owed
    /// (recordings then get their summary), close the tasks and exit. With a deadline, what
    /// is still queued then is counted as dropped ("shutdown"), and jobs still waiting for
    /// the model are skipped.
    Finish {
        deadline: Option<Instant>,
    },
}

struct Slot {
    src: WorkerSource,
    motion: MotionDetector,
}

/// How often pending drops become events and queue gauges are refreshed.
const REPORT_EVERY: Duration = Duration::from_millis(500);

pub struct Worker {
    cfg: AnalysisConfig,
    control: Receiver<Control>,
    /// Outcomes of the jobs this worker offered (see [`crate::tasks::reply`]).
    replies: Receiver<Reply>,
    vad: VoiceDetector,
    dispatch: Arc<Dispatch>,
    /// Set at shutdown: a file source's worker stops waiting for the model.
    stop: Arc<AtomicBool>,
}

impl Worker {
    pub fn new(
        cfg: AnalysisConfig,
        control: Receiver<Control>,
        replies: Receiver<Reply>,
        dispatch: Arc<Dispatch>,
        stop: Arc<AtomicBool>,
    ) -> Worker {
        let vad = VoiceDetector::new(cfg.voice_min_dbfs);
        Worker {
            cfg,
            control,
            replies,
            vad,
            dispatch,
            stop,
        }
    }

    /// Hands jobs to the model side (the dispatch counts what will not run).
    fn offer(&self, reply: &ReplyTo, jobs: impl IntoIterator<Item = Job>) {
        let stop = || self.stop.load(Ordering::Relaxed);
        for job in jobs {
            self.dispatch.offer(reply, job, &stop);
        }
    }

    /// One outcome from the model side, applied to its source's task; a follow-up job (a
    /// `watch` retry, the next summary window) goes back to the dispatch. Outcomes for a
    /// source removed meanwhile are let go.
    fn apply(&self, slots: &mut [Slot], r: Reply) {
        let Some(t) = slots
            .iter_mut()
            .filter_map(|s| s.src.task.as_mut())
            .find(|t| t.reply.key() == r.to)
        else {
            tracing::debug!(source = %r.job.source, "An outcome for a removed source; let go.");
            return;
        };
        match r.outcome {
            Outcome::Answer(a) => {
                let follow = t.state.on_answer(&r.job, &a);
                self.offer(&t.reply, follow);
            }
            Outcome::Error(message) => t.state.on_error(&r.job, &message),
            Outcome::Skipped(reason) => t.state.on_skipped(&r.job, reason),
        }
    }

    /// Applies every outcome already sent; true if there was any.
    fn apply_sent(&self, slots: &mut [Slot]) -> bool {
        let mut any = false;
        while let Ok(r) = self.replies.try_recv() {
            self.apply(slots, r);
            any = true;
        }
        any
    }

    /// Applies outcomes until every job offered has one (true), or the deadline passes, or
    /// the model cannot answer (false). The model side sends a step's outcomes before it
    /// tells the dispatch the step is done, so once the dispatch is idle, the outcomes still
    /// to apply are all in the channel.
    fn settle(&self, slots: &mut [Slot], deadline: Option<Instant>) -> bool {
        loop {
            let idle = self.dispatch.is_idle();
            if self.apply_sent(slots) {
                // Follow-ups may have been offered.
                continue;
            }
            if idle {
                return true;
            }
            if matches!(
                self.dispatch.gate(),
                ModelGate::Unavailable | ModelGate::Disabled
            ) || deadline.is_some_and(|d| Instant::now() >= d)
            {
                return false;
            }
            if let Ok(r) = self.replies.recv_timeout(Duration::from_millis(20)) {
                self.apply(slots, r);
            }
        }
    }

    /// The end of the run, once the queues are drained: speech still being windowed
    /// becomes its last window, every answer owed is applied (bounded by the deadline),
    /// recordings that asked for one get their summary, and the tasks close (words the
    /// caption stabilizer still holds become final).
    fn finish_tasks(&self, slots: &mut [Slot], deadline: Option<Instant>) {
        for s in slots.iter_mut() {
            if let Some(t) = &mut s.src.task {
                let jobs = t.state.finish();
                self.offer(&t.reply, jobs);
            }
        }
        if !self.settle(slots, deadline) {
            self.dispatch.drain_all();
            // Skipped now, or answered by the step the model is in.
            self.settle(slots, None);
        }
        if deadline.is_none() {
            for s in slots.iter_mut() {
                if let Some(t) = &mut s.src.task {
                    let job = t.state.summary_job();
                    self.offer(&t.reply, job);
                }
            }
            self.settle(slots, None);
        }
        for s in slots.iter_mut() {
            if let Some(t) = &mut s.src.task {
                t.state.close();
            }
        }
    }

    pub fn run(self) {
        let mut slots: Vec<Slot> = Vec::new();
        let mut finish: Option<Option<Instant>> = None;
        let mut last_report = Instant::now();
        let mut incoming: Option<Control> = None;
        loop {
            let pending = incoming
                .take()
                .into_iter()
                .chain(std::iter::from_fn(|| self.control.try_recv().ok()));
            for msg in pending.collect::<Vec<_>>() {
                match msg {
                    Control::Add(src) => slots.push(Slot {
                        src: *src,
                        motion: MotionDetector::default(),
                    }),
                    Control::Remove(name) => {
                        self.apply_sent(&mut slots);
                        if let Some(i) = slots.iter().position(|s| s.src.feed.name == name) {
                            let s = slots.remove(i);
                            let frames: Vec<VideoFrame> =
                                std::iter::from_fn(|| s.src.video.try_recv()).collect();
                            s.src.feed.drop_frames(&frames, DropReason::SourceRemoved);
                            let chunks: Vec<AudioChunk> =
                                std::iter::from_fn(|| s.src.audio.try_recv()).collect();
                            s.src.feed.drop_audio(&chunks, DropReason::SourceRemoved);
                            report(std::slice::from_ref(&s));
                            forget(&s.src.feed);
                            report(&slots);
                        }
                    }
                    Control::SetTask { name, spec } => {
                        let task = slots
                            .iter_mut()
                            .filter(|s| s.src.feed.name == name)
                            .find_map(|s| s.src.task.as_mut());
                        if let Some(t) = task {
                            t.state.set_spec(spec);
                        }
                    }
                    Control::Finish { deadline } => finish = Some(deadline),
                }
            }
            if last_report.elapsed() >= REPORT_EVERY {
                report(&slots);
                last_report = Instant::now();
            }
            if let Some(deadline) = finish {
                let empty = slots
                    .iter()
                    .all(|s| s.src.video.is_empty() && s.src.audio.is_empty());
                if empty || deadline.is_some_and(|d| Instant::now() >= d) {
                    for s in &slots {
                        let frames: Vec<VideoFrame> =
                            std::iter::from_fn(|| s.src.video.try_recv()).collect();
                        s.src.feed.drop_frames(&frames, DropReason::Shutdown);
                        let chunks: Vec<AudioChunk> =
                            std::iter::from_fn(|| s.src.audio.try_recv()).collect();
                        s.src.feed.drop_audio(&chunks, DropReason::Shutdown);
                    }
                    report(&slots);
                    self.finish_tasks(&mut slots, deadline);
                    return;
                }
            }
            incoming = self.step(&mut slots);
        }
    }

    /// Wait briefly for any queue or outcome and handle one; a control message is returned.
    fn step(&self, slots: &mut [Slot]) -> Option<Control> {
        // Clones (cheap handles) so the selection does not borrow the slots being analysed.
        // A file source whose model slot is taken is skipped this round (its queue applies
        // backpressure upstream) so it never holds up the other sources.
        let waits = |s: &Slot, class| {
            s.src.task.is_some() && self.dispatch.would_wait(&s.src.feed.name, class)
        };
        let video: Vec<_> = slots
            .iter()
            .map(|s| {
                if waits(s, JobClass::Frame) {
                    crossbeam_channel::never()
                } else {
                    s.src.video.receiver().clone()
                }
            })
            .collect();
        let audio: Vec<_> = slots
            .iter()
            .map(|s| {
                if waits(s, JobClass::FinalAudio) {
                    crossbeam_channel::never()
                } else {
                    s.src.audio.receiver().clone()
                }
            })
            .collect();
        let mut sel = Select::new();
        for (v, a) in video.iter().zip(&audio) {
            sel.recv(v);
            sel.recv(a);
        }
        let ctl = sel.recv(&self.control);
        let replies = sel.recv(&self.replies);
        let Ok(op) = sel.select_timeout(Duration::from_millis(100)) else {
            return None;
        };
        let idx = op.index();
        if idx == ctl {
            return op.recv(&self.control).ok();
        }
        if idx == replies {
            if let Ok(r) = op.recv(&self.replies) {
                self.apply(slots, r);
            }
            return None;
        }
        let slot = &mut slots[idx / 2];
        if idx % 2 == 0 {
            if let Ok(raw) = op.recv(&video[idx / 2]) {
                let frame = slot.src.video.accept(raw);
                self.analyse_frame(slot, frame);
            }
        } else if let Ok(raw) = op.recv(&audio[idx / 2]) {
            let chunk = slot.src.audio.accept(raw);
            self.analyse_audio(slot, chunk);
        }
        None
    }

    fn delay(&self) {
        if self.cfg.delay_ms > 0 {
            std::thread::sleep(Duration::from_millis(self.cfg.delay_ms));
        }
    }

    fn analyse_frame(&self, slot: &mut Slot, frame: VideoFrame) {
        if let Some(after) = slot.src.resume.as_ref().and_then(|r| r.frame_after) {
            if frame.t <= after + 1e-6 {
                slot.src
                    .feed
                    .drop_frames(std::slice::from_ref(&frame), DropReason::Resumed);
                return;
            }
        }
        let motion = self.signal_frame(slot, &frame);
        if let Some(t) = &mut slot.src.task {
            let job = t.state.on_frame(frame, motion);
            self.offer(&t.reply, job);
        }
    }

    /// Motion analysis and the `frame` event; returns the motion score.
    fn signal_frame(&self, slot: &mut Slot, frame: &VideoFrame) -> f64 {
        let feed = &slot.src.feed;
        let motion = slot
            .motion
            .score(&frame.rgb, frame.width as usize, frame.height as usize);
        self.delay();
        let latency = frame.captured.elapsed().as_secs_f64();
        feed.stats.frames_analyzed.fetch_add(1, Ordering::Relaxed);
        feed.metrics
            .frames_analyzed
            .with_label_values(&[&feed.name])
            .inc();
        feed.metrics
            .latency
            .with_label_values(&[&feed.name, "video"])
            .observe(latency);
        feed.emit(
            frame.t,
            None,
            Body::Frame {
                width: frame.width,
                height: frame.height,
                motion: (motion * 1e4).round() / 1e4,
                scene_change: motion >= self.cfg.scene_threshold,
                latency_ms: (latency * 1e4).round() / 10.0,
            },
        );
        motion
    }

    fn analyse_audio(&self, slot: &mut Slot, chunk: AudioChunk) {
        let feed = &slot.src.feed;
        let level = level_dbfs(&chunk.samples);
        let voice = self.vad.analyse(&chunk.samples).voice && level >= self.cfg.voice_min_dbfs;
        if let Some(r) = &slot.src.resume {
            // Resuming: `audio` events up to audio_after exist already; the model hears
            // again from model_from (the chunker's grid is the same in both runs).
            let already = chunk.t + chunk.duration() <= r.audio_after + 1e-6;
            let to_model = chunk.t >= r.model_from - 1e-6;
            if already {
                if to_model {
                    if let Some(t) = &mut slot.src.task {
                        let jobs = t.state.on_audio(&chunk, voice, level);
                        self.offer(&t.reply, jobs);
                    }
                }
                return;
            }
        }
        self.delay();
        let latency = chunk.captured.elapsed().as_secs_f64();
        let n = chunk.samples.len() as u64;
        feed.stats
            .audio_samples_analyzed
            .fetch_add(n, Ordering::Relaxed);
        feed.metrics
            .audio_seconds_analyzed
            .with_label_values(&[&feed.name])
            .inc_by(chunk.duration());
        feed.metrics
            .latency
            .with_label_values(&[&feed.name, "audio"])
            .observe(latency);
        feed.metrics
            .level_dbfs
            .with_label_values(&[&feed.name])
            .set(level);
        feed.emit(
            chunk.t,
            Some(chunk.t + n as f64 / f64::from(AUDIO_RATE)),
            Body::Audio {
                level: (level * 100.0).round() / 100.0,
                voice,
                samples: n,
            },
        );
        if let Some(t) = &mut slot.src.task {
            let jobs = t.state.on_audio(&chunk, voice, level);
            self.offer(&t.reply, jobs);
        }
    }
}

/// Turn pending drops into events and refresh queue gauges.
fn report(slots: &[Slot]) {
    let mut total = 0usize;
    for s in slots {
        let feed = &s.src.feed;
        for (media, q) in [
            (Media::Video, s.src.video.stats()),
            (Media::Audio, s.src.audio.stats()),
        ] {
            let bytes = q.bytes.load(Ordering::Relaxed);
            total += bytes;
            feed.metrics
                .queue_depth
                .with_label_values(&[&feed.name, media.as_str()])
                .set(q.depth.load(Ordering::Relaxed) as i64);
            feed.metrics
                .queue_bytes
                .with_label_values(&[&feed.name, media.as_str()])
                .set(bytes as i64);
        }
        let mut gaps: HashMap<DropReason, (f64, f64)> = HashMap::new();
        for d in feed.take_drops() {
            let end = (d.t1 > d.t0).then_some(d.t1);
            feed.emit(
                d.t0,
                end,
                Body::Drop {
                    media: d.media,
                    count: d.count,
                    reason: d.reason.as_str().to_string(),
                },
            );
            if d.media == Media::Audio {
                gaps.insert(d.reason, (d.t0, d.t1));
            }
        }
        for (reason, (t0, t1)) in gaps {
            feed.gap(t0, t1, &format!("audio dropped ({reason})"));
        }
    }
    if let Some(s) = slots.first() {
        s.src.feed.metrics.queue_bytes_total.set(total as i64);
    }
}

/// A removed source's queue gauges go (a series for a source that is gone would stay at
/// its last value), and the total counts only the sources left.
fn forget(feed: &SourceInput) {
    for media in [Media::Video, Media::Audio] {
        let labels = [feed.name.as_str(), media.as_str()];
        let _ = feed.metrics.queue_depth.remove_label_values(&labels);
        let _ = feed.metrics.queue_bytes.remove_label_values(&labels);
    }
    feed.metrics.queue_bytes_total.set(0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TaskKind;
    use crate::metrics::Metrics;
    use crate::queue::ByteBudget;
    use crate::tasks::test_support::{frame, source, task};

    /// A worker thread; its control sender and the sender of its reply channel.
    fn start(
        dispatch: &Arc<Dispatch>,
    ) -> (
        crossbeam_channel::Sender<Control>,
        crossbeam_channel::Sender<Reply>,
        std::thread::JoinHandle<()>,
    ) {
        let (tx, rx) = crossbeam_channel::unbounded();
        let (reply_tx, reply_rx) = crossbeam_channel::unbounded();
        let w = Worker::new(
            AnalysisConfig::default(),
            rx,
            reply_rx,
            dispatch.clone(),
            Arc::new(AtomicBool::new(false)),
        );
        (tx, reply_tx, std::thread::spawn(move || w.run()))
    }

    fn wait_for(secs: u64, ok: &dyn Fn() -> bool) -> bool {
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(secs) {
            if ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        ok()
    }

    fn add(
        tx: &crossbeam_channel::Sender<Control>,
        s: crate::tasks::test_support::TestSource,
        task: Option<ModelTask>,
    ) -> Arc<SourceInput> {
        let feed = s.feed.clone();
        tx.send(Control::Add(Box::new(WorkerSource {
            feed: s.feed,
            video: s.video,
            audio: s.audio,
            task,
            resume: None,
        })))
        .unwrap();
        feed
    }

    /// While the model loads, a file source's job waits, and so would the one worker thread
    /// if it took the file's frame: a live source beside it must still be analysed.
    #[test]
    fn a_file_waiting_for_the_model_does_not_stall_live_sources() {
        let metrics = Arc::new(Metrics::new());
        let budget = ByteBudget::new(1 << 20);
        let dispatch = Arc::new(Dispatch::default());
        assert_eq!(dispatch.gate(), crate::tasks::dispatch::ModelGate::Loading);
        let (tx, reply_tx, worker) = start(&dispatch);
        let file = source("file", false, &metrics, &budget);
        let reply = ReplyTo::new(reply_tx, metrics.clone());
        assert!(dispatch.add_source("file", reply.clone(), false));
        let file_task = ModelTask {
            state: task(&file.feed, TaskKind::Describe, false),
            reply,
        };
        let file = add(&tx, file, Some(file_task));
        let live = add(&tx, source("cam", true, &metrics, &budget), None);

        file.push_frame(frame(0.0));
        // Give the worker time to take the file's frame (it must not).
        wait_for(1, &|| file.video.stats().depth.load(Ordering::Relaxed) == 0);
        for i in 0..3 {
            live.push_frame(frame(f64::from(i) * 0.2));
        }
        assert!(
            wait_for(10, &|| live.stats.frames_analyzed.load(Ordering::Relaxed)
                == 3),
            "live frames analysed while the model loads: {}",
            live.stats.frames_analyzed.load(Ordering::Relaxed)
        );
        assert_eq!(file.stats.frames_analyzed.load(Ordering::Relaxed), 0);

        // Once the model is ready the file's frame goes to it: nothing of the file is lost.
        dispatch.set_gate(crate::tasks::dispatch::ModelGate::Ready);
        let (btx, brx) = crossbeam_channel::bounded(1);
        let d = dispatch.clone();
        std::thread::spawn(move || {
            let _ = btx.send(d.take_batch(4));
        });
        let batch = brx
            .recv_timeout(Duration::from_secs(10))
            .expect("the file's job reaches the model")
            .expect("a batch");
        assert_eq!(batch.len(), 1);
        assert_eq!(batch[0].job.source, "file");
        dispatch.done(1);
        tx.send(Control::Finish {
            deadline: Some(Instant::now()),
        })
        .unwrap();
        dispatch.close();
        worker.join().unwrap();
    }

    /// Removing the last source leaves no queue gauge behind, and what its graph pushes while
    /// stopping holds no budget.
    #[test]
    fn removing_the_last_source_resets_the_queue_gauges() {
        let metrics = Arc::new(Metrics::new());
        let budget = ByteBudget::new(1 << 20);
        let dispatch = Arc::new(Dispatch::default());
        let (tx, _reply_tx, worker) = start(&dispatch);
        let feed = add(&tx, source("cam", true, &metrics, &budget), None);
        feed.push_frame(frame(0.0));
        assert!(wait_for(10, &|| feed
            .stats
            .frames_analyzed
            .load(Ordering::Relaxed)
            == 1));
        // Gauges are written at the worker's next report.
        assert!(wait_for(10, &|| metrics.render().contains(
            "percept_queue_bytes{media=\"video\",source=\"cam\"}"
        )));
        tx.send(Control::Remove("cam".into())).unwrap();
        let gone = || {
            !metrics
                .render()
                .lines()
                .any(|l| l.starts_with("percept_queue_") && l.contains("source=\"cam\""))
        };
        assert!(wait_for(10, &gone), "{}", metrics.render());
        assert!(metrics
            .render()
            .lines()
            .any(|l| l == "percept_queue_bytes_all_sources 0"));
        // The source's graph is still stopping and pushes once more.
        feed.push_frame(frame(0.2));
        assert_eq!(budget.used(), 0);
        tx.send(Control::Finish { deadline: None }).unwrap();
        worker.join().unwrap();
    }
}
