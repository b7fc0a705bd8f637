//! Where events go. Every event is written as one JSON line and flushed at once, so a crash,
//! a SIGKILL or Ctrl-C never leaves a half-written line behind; live subscribers (HTTP feeds)
//! get a copy through bounded channels that drop for them, never for the file.

pub mod config;
pub mod delivery;
pub mod homeassistant;
pub mod mqtt;
pub mod mqtt_wire;
pub mod outbox;

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::event::Event;

type Writer = Box<dyn Write + Send>;

/// A durable consumer of every event (an outbox): called under the events lock, in id order,
/// with the event and its JSON, *before* the event reaches the events file, so nothing that is
/// in the file can be missing from an outbox after a crash.
pub type Tap = Arc<dyn Fn(&Event, &[u8]) + Send + Sync>;

/// Told each `watch` answer: (source, question, yes). `yes` is what made an alert (a yes with
/// enough confidence); anything else is a no.
pub type AnswerTap = Arc<dyn Fn(&str, &str, bool) + Send + Sync>;

#[derive(Clone)]
pub struct Events {
    inner: Arc<Inner>,
}

struct Inner {
    writer: Mutex<Option<Writer>>,
    /// Bytes in the events file after the last complete line (file targets; for
    /// checkpoints that must point between lines).
    written: std::sync::atomic::AtomicU64,
    subscribers: Mutex<Vec<crossbeam_channel::Sender<Event>>>,
    /// `<run>` of the event ids (see [`crate::event`]).
    run_id: String,
    /// Per source: the last `seq` given. Guarded by `writer`'s lock in `emit` (taken first).
    seqs: Mutex<std::collections::HashMap<String, u64>>,
    taps: Mutex<Vec<Tap>>,
    answer_taps: Mutex<Vec<AnswerTap>>,
    /// Why the writer was given up (disk full...), for the run's exit code.
    write_error: Mutex<Option<String>>,
}

/// 11 hex digits of Unix milliseconds, then 4 that differ between processes started in the
/// same millisecond.
fn new_run_id() -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let ms = now.as_millis() as u64 & 0xfff_ffff_ffff;
    let mix = (u64::from(now.subsec_nanos()) ^ u64::from(std::process::id()).rotate_left(17))
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        >> 48;
    format!("{ms:011x}{mix:04x}")
}

impl Events {
    /// "-" writes to stdout; anything else is a file path, appended to.
    pub fn open(target: &str) -> io::Result<Events> {
        let mut start = 0;
        let writer: Writer = if target == "-" {
            Box::new(io::stdout())
        } else {
            let path = Path::new(target);
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)?;
            }
            let f = OpenOptions::new().create(true).append(true).open(path)?;
            start = f.metadata()?.len();
            Box::new(f)
        };
        let e = Events::with_writer(Some(writer));
        e.inner
            .written
            .store(start, std::sync::atomic::Ordering::Relaxed);
        Ok(e)
    }

    pub fn with_writer(writer: Option<Writer>) -> Events {
        Events {
            inner: Arc::new(Inner {
                writer: Mutex::new(writer),
                written: std::sync::atomic::AtomicU64::new(0),
                subscribers: Mutex::new(Vec::new()),
                run_id: new_run_id(),
                seqs: Mutex::new(std::collections::HashMap::new()),
                taps: Mutex::new(Vec::new()),
                answer_taps: Mutex::new(Vec::new()),
                write_error: Mutex::new(None),
            }),
        }
    }

    /// The `<run>` part of this run's event ids.
    pub fn run_id(&self) -> &str {
        &self.inner.run_id
    }

    /// Adds a durable consumer (see [`Tap`]) that sees every event from now on.
    pub fn tap(&self, tap: Tap) {
        self.inner
            .taps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(tap);
    }

    /// Adds a listener for `watch` answers (see [`AnswerTap`]).
    pub fn on_answer(&self, tap: AnswerTap) {
        self.inner
            .answer_taps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(tap);
    }

    /// One `watch` answer, for the listeners (Home Assistant's binary sensors).
    pub fn answer(&self, source: &str, question: &str, yes: bool) {
        let taps = self
            .inner
            .answer_taps
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for t in taps {
            t(source, question, yes);
        }
    }

    /// A live copy of every event from now on; `capacity` events may wait before this
    /// subscriber starts losing them.
    pub fn subscribe(&self, capacity: usize) -> crossbeam_channel::Receiver<Event> {
        let (tx, rx) = crossbeam_channel::bounded(capacity);
        self.inner
            .subscribers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(tx);
        rx
    }

    /// Live subscriptions, counting one whose receiver is gone until the next `emit` finds out.
    pub fn subscribers(&self) -> usize {
        self.inner
            .subscribers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    pub fn emit(&self, mut event: Event) {
        {
            let mut guard = self.inner.writer.lock().unwrap_or_else(|e| e.into_inner());
            {
                let mut seqs = self.inner.seqs.lock().unwrap_or_else(|e| e.into_inner());
                let seq = seqs.entry(event.source.clone()).or_insert(0);
                *seq += 1;
                event.id = Some(format!("{}-{}-{seq}", self.inner.run_id, event.source));
            }
            let taps = self
                .inner
                .taps
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            if guard.is_some() || !taps.is_empty() {
                let mut line = match serde_json::to_vec(&event) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(error = %e, "Cannot serialize event.");
                        return;
                    }
                };
                // Outboxes first: an event in the file is never missing from them.
                for t in &taps {
                    t(&event, &line);
                }
                if let Some(w) = guard.as_mut() {
                    line.push(b'\n');
                    let res = w.write_all(&line).and_then(|()| w.flush());
                    if res.is_ok() {
                        self.inner
                            .written
                            .fetch_add(line.len() as u64, std::sync::atomic::Ordering::Relaxed);
                    }
                    if let Err(e) = res {
                        // A closed pipe (`percept run ... | head`) is the reader's choice, not an error.
                        if e.kind() != io::ErrorKind::BrokenPipe {
                            tracing::error!(error = %e, "Cannot write events; further events are not written.");
                            *self
                                .inner
                                .write_error
                                .lock()
                                .unwrap_or_else(|e| e.into_inner()) = Some(e.to_string());
                        }
                        *guard = None;
                    }
                }
            }
        }
        let mut subs = self
            .inner
            .subscribers
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        subs.retain(|s| match s.try_send(event.clone()) {
            Ok(()) | Err(crossbeam_channel::TrySendError::Full(_)) => true,
            Err(crossbeam_channel::TrySendError::Disconnected(_)) => false,
        });
    }

    /// Byte length of the events file after the last complete event.
    pub fn position(&self) -> u64 {
        // Taken under the writer lock so it never points inside a line being written.
        let _guard = self.inner.writer.lock().unwrap_or_else(|e| e.into_inner());
        self.inner
            .written
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Why events stopped being written, if they did (not for a closed stdout pipe).
    pub fn write_error(&self) -> Option<String> {
        self.inner
            .write_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn flush(&self) {
        if let Some(w) = self
            .inner
            .writer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
        {
            let _ = w.flush();
        }
    }
}
