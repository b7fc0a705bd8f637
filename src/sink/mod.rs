//! Where events go. Every event is written as one JSON line and flushed at once, so a crash,
//! a SIGKILL or Ctrl-C never leaves a half-written line behind; live subscribers (HTTP feeds)
//! get a copy through bounded channels that drop for them, never for the file.

pub mod mqtt;

use std::fs::OpenOptions;
use std::io::{self, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};

use crate::event::Event;

type Writer = Box<dyn Write + Send>;

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
    /// Why the writer was given up (disk full...), for the run's exit code.
    write_error: Mutex<Option<String>>,
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
                write_error: Mutex::new(None),
            }),
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

    pub fn emit(&self, event: Event) {
        {
            let mut guard = self.inner.writer.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(w) = guard.as_mut() {
                let mut line = match serde_json::to_vec(&event) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(error = %e, "Cannot serialize event.");
                        return;
                    }
                };
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
