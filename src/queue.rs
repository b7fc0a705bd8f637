//! Bounded queues between GStreamer's streaming threads and the worker. Each queue has a
//! declared when-full policy, every item carries its size, and all queues share one byte
//! budget, so memory cannot grow with the input rate. Nothing here blocks without bound:
//! a blocking push wakes up regularly to check for shutdown.

use crossbeam_channel::{Receiver, Sender, TrySendError};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// What a push does when the queue (or the shared byte budget) is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenFull {
    /// Backpressure: wait for space (files: nothing is skipped).
    Block,
    /// Freshest wins: evict the oldest queued items (live video).
    DropOldest,
    /// Refuse the incoming item (live audio: whole chunks, reported as a gap).
    DropNewest,
}

/// Why media was lost before analysis: the `reason` of `drop` events and of the
/// `frames_dropped_total` / `audio_seconds_dropped_total` metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// The queue held its most items (live video evicts its oldest, live audio refuses the
    /// newest chunk).
    QueueFull,
    /// The byte budget shared by every queue was spent (other sources hold it).
    Budget,
    /// Shutting down: queued media past the drain deadline, or pushed after stop.
    Shutdown,
    /// The source was removed at runtime with media still queued.
    SourceRemoved,
    /// Resuming an interrupted recording: this media was analysed by the earlier run.
    Resumed,
}

impl DropReason {
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::QueueFull => "queue_full",
            DropReason::Budget => "budget",
            DropReason::Shutdown => "shutdown",
            DropReason::SourceRemoved => "source_removed",
            DropReason::Resumed => "resumed",
        }
    }
}

impl std::fmt::Display for DropReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Largest `[queues] budget_mib`, MiB (1 TiB).
pub const MAX_BUDGET_MIB: f64 = 1024.0 * 1024.0;

/// `[queues]`: the byte budget every source's queues share.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct QueueConfig {
    /// Total bytes queued across all sources' queues, in MiB.
    pub budget_mib: f64,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig { budget_mib: 64.0 }
    }
}

impl QueueConfig {
    pub fn budget_bytes(&self) -> usize {
        (self.budget_mib * 1024.0 * 1024.0) as usize
    }

    /// Problems with the section, one line each (an infinite or NaN value is reported once,
    /// by the file-level check in `config.rs`).
    pub fn validate(&self, p: &mut Vec<String>) {
        if self.budget_mib.is_nan() || self.budget_mib < 1.0 {
            p.push(format!(
                "[queues] budget_mib must be at least 1, got {}",
                self.budget_mib
            ));
        }
        if self.budget_mib.is_finite() && self.budget_mib > MAX_BUDGET_MIB {
            p.push(format!(
                "[queues] budget_mib must be at most {MAX_BUDGET_MIB}, got {}",
                self.budget_mib
            ));
        }
    }
}

/// Bytes queued across every queue of the process, against one limit.
#[derive(Debug)]
pub struct ByteBudget {
    limit: usize,
    used: AtomicUsize,
    peak: AtomicUsize,
}

impl ByteBudget {
    pub fn new(limit: usize) -> Arc<ByteBudget> {
        Arc::new(ByteBudget {
            limit,
            used: AtomicUsize::new(0),
            peak: AtomicUsize::new(0),
        })
    }

    /// Take `n` bytes if they fit. An item larger than the whole budget is let through when
    /// nothing else is queued, or it could never be delivered.
    fn try_reserve(&self, n: usize) -> bool {
        let mut cur = self.used.load(Ordering::Relaxed);
        loop {
            if cur + n > self.limit && cur != 0 {
                return false;
            }
            match self
                .used
                .compare_exchange_weak(cur, cur + n, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => {
                    self.peak.fetch_max(cur + n, Ordering::Relaxed);
                    return true;
                }
                Err(actual) => cur = actual,
            }
        }
    }

    fn release(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }

    pub fn limit(&self) -> usize {
        self.limit
    }
}

/// Per-queue figures: depth in items and bytes.
#[derive(Debug, Default)]
pub struct QueueStats {
    pub depth: AtomicUsize,
    pub bytes: AtomicUsize,
    /// The consumer is gone (its source was removed): pushes are refused.
    closed: AtomicBool,
}

/// Why a push did not queue its item, or which items it evicted to make room.
#[derive(Debug)]
pub enum Pushed<T> {
    Queued,
    /// Queued after evicting these older items (DropOldest).
    QueuedEvicting(Vec<T>),
    /// Not queued: the queue ([`DropReason::QueueFull`], DropNewest) or the byte budget
    /// ([`DropReason::Budget`]: DropNewest, or DropOldest with nothing of its own to evict)
    /// was full. The item is handed back for accounting.
    Rejected(T, DropReason),
    /// Not queued: shutting down or the worker has gone.
    Closed(T),
}

/// An item in a queue with its size in bytes, which the byte budget accounts for.
pub struct SizedItem<T> {
    item: T,
    bytes: usize,
}

/// The producer side, owned by a streaming thread.
pub struct QueueTx<T> {
    tx: Sender<SizedItem<T>>,
    // A receiver clone lets the producer evict the oldest item itself (freshest wins).
    evict: Receiver<SizedItem<T>>,
    policy: WhenFull,
    budget: Arc<ByteBudget>,
    stats: Arc<QueueStats>,
    stop: Arc<AtomicBool>,
}

/// The consumer side, owned by the worker.
pub struct QueueRx<T> {
    rx: Receiver<SizedItem<T>>,
    budget: Arc<ByteBudget>,
    stats: Arc<QueueStats>,
}

/// A bounded queue of `capacity` items under `budget`.
pub fn bounded<T>(
    capacity: usize,
    policy: WhenFull,
    budget: Arc<ByteBudget>,
    stop: Arc<AtomicBool>,
) -> (QueueTx<T>, QueueRx<T>) {
    let (tx, rx) = crossbeam_channel::bounded(capacity.max(1));
    let stats = Arc::new(QueueStats::default());
    (
        QueueTx {
            tx,
            evict: rx.clone(),
            policy,
            budget: budget.clone(),
            stats: stats.clone(),
            stop,
        },
        QueueRx { rx, budget, stats },
    )
}

/// How often a blocked producer re-checks for shutdown.
const BLOCK_POLL: Duration = Duration::from_millis(50);

impl<T> QueueTx<T> {
    pub fn stats(&self) -> &Arc<QueueStats> {
        &self.stats
    }

    pub fn push(&self, item: T, bytes: usize) -> Pushed<T> {
        if self.stats.closed.load(Ordering::Acquire) {
            return Pushed::Closed(item);
        }
        let pushed = self.push_open(item, bytes);
        if matches!(pushed, Pushed::Queued | Pushed::QueuedEvicting(_))
            && self.stats.closed.load(Ordering::Acquire)
        {
            // The consumer let go while this item went in: nobody will take it out, so
            // take back what waits here rather than hold budget bytes for ever.
            let mut last = None;
            while let Ok(old) = self.evict.try_recv() {
                self.account_out(old.bytes);
                last = Some(old.item);
            }
            if let Some(item) = last {
                return Pushed::Closed(item);
            }
        }
        pushed
    }

    fn push_open(&self, item: T, bytes: usize) -> Pushed<T> {
        let mut evicted = Vec::new();
        let mut entry = SizedItem { item, bytes };
        // Reserve budget first so the total never exceeds it, even for an instant.
        // Once stopping, a push still queues what fits (the worker drains it) but never waits.
        loop {
            if self.budget.try_reserve(bytes) {
                break;
            }
            if self.stop.load(Ordering::Relaxed) {
                return Pushed::Closed(entry.item);
            }
            match self.policy {
                WhenFull::Block => std::thread::sleep(Duration::from_millis(2)),
                WhenFull::DropNewest => return Pushed::Rejected(entry.item, DropReason::Budget),
                WhenFull::DropOldest => match self.evict.try_recv() {
                    Ok(old) => {
                        self.account_out(old.bytes);
                        evicted.push(old.item);
                    }
                    // Our queue is empty: the budget is held by other sources' queues.
                    Err(_) => return Pushed::Rejected(entry.item, DropReason::Budget),
                },
            }
        }
        loop {
            match self.tx.try_send(entry) {
                Ok(()) => {
                    self.stats.depth.fetch_add(1, Ordering::Relaxed);
                    self.stats.bytes.fetch_add(bytes, Ordering::Relaxed);
                    return if evicted.is_empty() {
                        Pushed::Queued
                    } else {
                        Pushed::QueuedEvicting(evicted)
                    };
                }
                Err(TrySendError::Disconnected(s)) => {
                    self.budget.release(bytes);
                    return Pushed::Closed(s.item);
                }
                Err(TrySendError::Full(s)) => {
                    entry = s;
                    match self.policy {
                        WhenFull::DropNewest => {
                            self.budget.release(bytes);
                            return Pushed::Rejected(entry.item, DropReason::QueueFull);
                        }
                        WhenFull::DropOldest => {
                            if let Ok(old) = self.evict.try_recv() {
                                self.account_out(old.bytes);
                                evicted.push(old.item);
                            }
                        }
                        WhenFull::Block => {
                            if self.stop.load(Ordering::Relaxed) {
                                self.budget.release(bytes);
                                return Pushed::Closed(entry.item);
                            }
                            match self.tx.send_timeout(entry, BLOCK_POLL) {
                                Ok(()) => {
                                    self.stats.depth.fetch_add(1, Ordering::Relaxed);
                                    self.stats.bytes.fetch_add(bytes, Ordering::Relaxed);
                                    return Pushed::Queued;
                                }
                                Err(crossbeam_channel::SendTimeoutError::Timeout(s)) => entry = s,
                                Err(crossbeam_channel::SendTimeoutError::Disconnected(s)) => {
                                    self.budget.release(bytes);
                                    return Pushed::Closed(s.item);
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    fn account_out(&self, bytes: usize) {
        self.budget.release(bytes);
        self.stats.depth.fetch_sub(1, Ordering::Relaxed);
        self.stats.bytes.fetch_sub(bytes, Ordering::Relaxed);
    }
}

/// The consumer gone (a removed source's queues): what still waits is released from the
/// byte budget (the worker has counted it as dropped) and later pushes are refused.
impl<T> Drop for QueueRx<T> {
    fn drop(&mut self) {
        self.stats.closed.store(true, Ordering::Release);
        while let Ok(s) = self.rx.try_recv() {
            self.accept(s);
        }
    }
}

impl<T> QueueRx<T> {
    /// The channel, for `crossbeam_channel::Select` across many queues. Items received from
    /// it directly must be passed to [`QueueRx::accept`].
    pub fn receiver(&self) -> &Receiver<SizedItem<T>> {
        &self.rx
    }

    /// Account for an item taken out of the channel and return it.
    pub fn accept(&self, entry: SizedItem<T>) -> T {
        self.budget.release(entry.bytes);
        self.stats.depth.fetch_sub(1, Ordering::Relaxed);
        self.stats.bytes.fetch_sub(entry.bytes, Ordering::Relaxed);
        entry.item
    }

    pub fn try_recv(&self) -> Option<T> {
        self.rx.try_recv().ok().map(|s| self.accept(s))
    }

    pub fn stats(&self) -> &Arc<QueueStats> {
        &self.stats
    }

    pub fn len(&self) -> usize {
        self.rx.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rx.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stop() -> Arc<AtomicBool> {
        Arc::new(AtomicBool::new(false))
    }

    #[test]
    fn drop_oldest_keeps_freshest_and_counts() {
        let budget = ByteBudget::new(1_000);
        let (tx, rx) = bounded::<u32>(3, WhenFull::DropOldest, budget.clone(), stop());
        let mut evicted = Vec::new();
        for i in 0..10 {
            match tx.push(i, 10) {
                Pushed::Queued => {}
                Pushed::QueuedEvicting(v) => evicted.extend(v),
                other => panic!("{other:?}"),
            }
        }
        let got: Vec<u32> = std::iter::from_fn(|| rx.try_recv()).collect();
        assert_eq!(got, vec![7, 8, 9]);
        assert_eq!(evicted, (0..7).collect::<Vec<_>>());
        assert_eq!(budget.used(), 0);
        assert_eq!(rx.stats().depth.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn budget_is_shared_and_never_exceeded() {
        let budget = ByteBudget::new(100);
        let (a, ra) = bounded::<u32>(100, WhenFull::DropNewest, budget.clone(), stop());
        let (b, _rb) = bounded::<u32>(100, WhenFull::DropOldest, budget.clone(), stop());
        for i in 0..6 {
            a.push(i, 10);
        }
        let mut rejected = 0;
        for i in 0..10 {
            if let Pushed::Rejected(..) = b.push(i, 10) {
                rejected += 1;
            }
        }
        assert!(budget.peak() <= 100);
        assert_eq!(budget.used(), 100);
        // b may hold 4 items; 6 are in a. b's later pushes evict b's own oldest.
        assert_eq!(rejected, 0);
        assert!(matches!(
            a.push(99, 10),
            Pushed::Rejected(99, DropReason::Budget)
        ));
        assert_eq!(ra.len(), 6);
    }

    #[test]
    fn drop_newest_says_whether_the_queue_or_the_budget_was_full() {
        let budget = ByteBudget::new(100);
        let (a, _ra) = bounded::<u32>(2, WhenFull::DropNewest, budget.clone(), stop());
        assert!(matches!(a.push(1, 10), Pushed::Queued));
        assert!(matches!(a.push(2, 10), Pushed::Queued));
        assert!(matches!(
            a.push(3, 10),
            Pushed::Rejected(3, DropReason::QueueFull)
        ));
        let (b, _rb) = bounded::<u32>(10, WhenFull::DropNewest, budget.clone(), stop());
        assert!(matches!(
            b.push(4, 90),
            Pushed::Rejected(4, DropReason::Budget)
        ));
        assert_eq!(budget.used(), 20);
    }

    /// A removed source's producer may push until its graph stops: nothing it queues after
    /// the worker let go of the queue may keep budget bytes.
    #[test]
    fn a_dropped_consumer_frees_the_budget_and_refuses_pushes() {
        let budget = ByteBudget::new(1_000);
        let (tx, rx) = bounded::<u32>(10, WhenFull::DropOldest, budget.clone(), stop());
        assert!(matches!(tx.push(1, 100), Pushed::Queued));
        drop(rx);
        assert_eq!(budget.used(), 0);
        assert!(matches!(tx.push(2, 100), Pushed::Closed(2)));
        assert_eq!(budget.used(), 0);
        assert_eq!(tx.stats().bytes.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn block_waits_then_stops_on_shutdown() {
        let budget = ByteBudget::new(1_000);
        let flag = stop();
        let (tx, rx) = bounded::<u32>(1, WhenFull::Block, budget, flag.clone());
        assert!(matches!(tx.push(1, 1), Pushed::Queued));
        let h = std::thread::spawn(move || tx.push(2, 1));
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(rx.try_recv(), Some(1));
        assert!(matches!(h.join().unwrap(), Pushed::Queued));
        assert_eq!(rx.try_recv(), Some(2));
        let (tx2, _rx2) = bounded::<u32>(1, WhenFull::Block, ByteBudget::new(1_000), flag.clone());
        tx2.push(1, 1);
        let h = std::thread::spawn(move || tx2.push(2, 1));
        std::thread::sleep(Duration::from_millis(100));
        flag.store(true, Ordering::Relaxed);
        assert!(matches!(h.join().unwrap(), Pushed::Closed(2)));
    }
}
