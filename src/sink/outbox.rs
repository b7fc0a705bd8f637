//! The durable outbox: what MQTT and webhooks must still deliver, in one folder per
//! destination (`<dir>/mqtt`, `<dir>/webhook-<hash of the URL>`) of append-only segments.
//!
//! A record is appended before the event reaches the events file, and removed only once its destination acknowledged it (MQTT PUBACK, HTTP 2xx). So a
//! crash, a SIGKILL or an unreachable receiver costs nothing: at the next start the folder is
//! read back and delivery resumes with the oldest record. A record delivered just before a
//! crash may be delivered again: consumers drop duplicates by the event `id`.
//!
//! Records are not synced one by one (that would cost a disk flush per event); the folder
//! survives the process dying at any point, and a power cut may lose the last records the
//! kernel had not yet written.
//!
//! Bounded: when a destination's records exceed its share of `[outbox] max_mib`, the oldest
//! are deleted and counted (`percept_outbox_dropped_total`), so a receiver that stays away
//! for days cannot fill the disk.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crossbeam_channel::{Receiver, Sender};

const SUFFIX: &str = ".log";

/// Outbox metrics, one set per process (labels: the destination's folder name, never a URL).
pub struct OutboxMetrics {
    pub pending: prometheus::IntGaugeVec,
    pub pending_bytes: prometheus::IntGaugeVec,
    pub dropped: prometheus::IntCounterVec,
    pub delivered: prometheus::IntCounterVec,
}

/// The process-wide outbox metrics, registered into `registry` (again registering into the
/// same registry is harmless).
pub fn metrics(registry: Option<&prometheus::Registry>) -> &'static OutboxMetrics {
    static M: OnceLock<OutboxMetrics> = OnceLock::new();
    let m = M.get_or_init(|| {
        let gauge = |name: &str, help: &str| {
            prometheus::IntGaugeVec::new(prometheus::Opts::new(name, help), &["destination"])
                .expect("valid metric")
        };
        let counter = |name: &str, help: &str| {
            prometheus::IntCounterVec::new(prometheus::Opts::new(name, help), &["destination"])
                .expect("valid metric")
        };
        OutboxMetrics {
            pending: gauge(
                "percept_outbox_pending",
                "Records waiting in the outbox for their destination.",
            ),
            pending_bytes: gauge(
                "percept_outbox_pending_bytes",
                "Bytes of the records waiting in the outbox.",
            ),
            dropped: counter(
                "percept_outbox_dropped_total",
                "Records dropped undelivered because the outbox was full (oldest first).",
            ),
            delivered: counter(
                "percept_outbox_delivered_total",
                "Records acknowledged by their destination and removed from the outbox.",
            ),
        }
    });
    if let Some(r) = registry {
        let _ = r.register(Box::new(m.pending.clone()));
        let _ = r.register(Box::new(m.pending_bytes.clone()));
        let _ = r.register(Box::new(m.dropped.clone()));
        let _ = r.register(Box::new(m.delivered.clone()));
    }
    m
}

/// Bytes of a segment before the next record starts a new one.
const SEGMENT_BYTES: u64 = 4 << 20;
/// Record framing: u32 length, u64 seq (little endian), then the bytes.
const HEADER: usize = 12;

#[derive(Debug, Clone, Copy)]
struct Loc {
    segment: u64,
    offset: u64,
    len: u64,
}

#[derive(Debug, Default)]
struct Segment {
    /// Records of this segment still to deliver.
    live: u64,
    /// The done journal (acknowledged or dropped seqs), opened on first use.
    done: Option<std::fs::File>,
}

#[derive(Default)]
struct State {
    next_seq: u64,
    /// seq -> where every undelivered record is.
    index: BTreeMap<u64, Loc>,
    bytes: u64,
    /// By id (the first seq written to it).
    segments: BTreeMap<u64, Segment>,
    /// The segment appended to: (id, file, its length).
    current: Option<(u64, std::fs::File, u64)>,
}

struct Inner {
    dir: PathBuf,
    name: String,
    max_bytes: u64,
    state: Mutex<State>,
    dropped: AtomicU64,
    wake_tx: Sender<()>,
    wake_rx: Receiver<()>,
}

/// One destination's queue on disk. Cheap to clone; any thread may push, one deliverer reads
/// and acknowledges.
///
/// Storage: append-only segments `<first seq>.log` of framed records, each with a journal
/// `<first seq>.done` of the seqs delivered (or dropped); a segment and its journal are
/// deleted once none of its records is left. Appending costs a `write` (no file created per
/// record); a record cut short by a crash ends its segment's readable part.
#[derive(Clone)]
pub struct Outbox {
    inner: Arc<Inner>,
}

fn read_u64s(path: &Path) -> std::collections::HashSet<u64> {
    std::fs::read(path)
        .map(|b| {
            b.chunks_exact(8)
                .map(|c| u64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
                .collect()
        })
        .unwrap_or_default()
}

impl Outbox {
    /// Opens (creating) `dir` and takes in the records a previous run left undelivered.
    pub fn open(dir: &Path, max_bytes: u64) -> io::Result<Outbox> {
        let ctx = |what: &str, e: io::Error| {
            io::Error::new(e.kind(), format!("{what} {}: {e}", dir.display()))
        };
        std::fs::create_dir_all(dir).map_err(|e| ctx("creating", e))?;
        let mut ids: Vec<u64> = std::fs::read_dir(dir)
            .map_err(|e| ctx("reading", e))?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                e.file_name()
                    .to_string_lossy()
                    .strip_suffix(SUFFIX)
                    .and_then(|n| n.parse::<u64>().ok())
            })
            .collect();
        ids.sort_unstable();
        let mut st = State::default();
        for id in ids {
            let log = dir.join(format!("{id:020}{SUFFIX}"));
            let done_path = log.with_extension("done");
            let data = std::fs::read(&log).map_err(|e| ctx("reading", e))?;
            let done = read_u64s(&done_path);
            let mut seg = Segment::default();
            let mut off = 0usize;
            while off + HEADER <= data.len() {
                let len =
                    u32::from_le_bytes([data[off], data[off + 1], data[off + 2], data[off + 3]])
                        as usize;
                let mut s8 = [0u8; 8];
                s8.copy_from_slice(&data[off + 4..off + HEADER]);
                let seq = u64::from_le_bytes(s8);
                if off + HEADER + len > data.len() {
                    break; // cut short by a crash
                }
                st.next_seq = st.next_seq.max(seq + 1);
                if !done.contains(&seq) {
                    st.index.insert(
                        seq,
                        Loc {
                            segment: id,
                            offset: (off + HEADER) as u64,
                            len: len as u64,
                        },
                    );
                    st.bytes += len as u64;
                    seg.live += 1;
                }
                off += HEADER + len;
            }
            if seg.live == 0 {
                let _ = std::fs::remove_file(&log);
                let _ = std::fs::remove_file(&done_path);
            } else {
                st.segments.insert(id, seg);
            }
        }
        st.next_seq = st.next_seq.max(1);
        let name = dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "outbox".into());
        let (wake_tx, wake_rx) = crossbeam_channel::bounded(1);
        let ob = Outbox {
            inner: Arc::new(Inner {
                dir: dir.to_path_buf(),
                name,
                max_bytes: max_bytes.max(1),
                state: Mutex::new(st),
                dropped: AtomicU64::new(0),
                wake_tx,
                wake_rx,
            }),
        };
        if !ob.is_empty() {
            tracing::info!(destination = %ob.inner.name, records = ob.len(), "Outbox: records from an earlier run will be delivered.");
        }
        ob.publish_gauges(&ob.lock());
        Ok(ob)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn path(&self, segment: u64) -> PathBuf {
        self.inner.dir.join(format!("{segment:020}{SUFFIX}"))
    }

    fn publish_gauges(&self, st: &State) {
        let m = metrics(None);
        m.pending
            .with_label_values(&[&self.inner.name])
            .set(st.index.len() as i64);
        m.pending_bytes
            .with_label_values(&[&self.inner.name])
            .set(st.bytes as i64);
    }

    /// The destination's folder name (the metric label).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// Appends a record; when the outbox is over its size the oldest records go (counted).
    pub fn push(&self, record: &[u8]) -> io::Result<u64> {
        let len = u32::try_from(record.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "outbox record too large"))?;
        let mut st = self.lock();
        let seq = st.next_seq;
        let full = st
            .current
            .as_ref()
            .is_none_or(|(_, _, size)| *size >= SEGMENT_BYTES.min(self.inner.max_bytes / 4 + 1));
        if full {
            let path = self.path(seq);
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&path)
                .map_err(|e| {
                    io::Error::new(e.kind(), format!("writing {}: {e}", path.display()))
                })?;
            if let Some((old, _, _)) = st.current.take() {
                // A finished segment with nothing left to deliver goes now.
                if st.segments.get(&old).is_some_and(|s| s.live == 0) {
                    self.delete_segment(&mut st, old);
                }
            }
            st.segments.insert(seq, Segment::default());
            st.current = Some((seq, f, 0));
        }
        let mut frame = Vec::with_capacity(HEADER + record.len());
        frame.extend_from_slice(&len.to_le_bytes());
        frame.extend_from_slice(&seq.to_le_bytes());
        frame.extend_from_slice(record);
        let Some((segment, file, size)) = st.current.as_mut() else {
            return Err(io::Error::other("no outbox segment"));
        };
        let segment = *segment;
        let offset = *size + HEADER as u64;
        if let Err(e) = file.write_all(&frame) {
            // A partial frame would hide everything after it: start a new segment.
            st.current = None;
            return Err(io::Error::new(
                e.kind(),
                format!("writing {}: {e}", self.path(segment).display()),
            ));
        }
        *size += frame.len() as u64;
        st.next_seq += 1;
        st.index.insert(
            seq,
            Loc {
                segment,
                offset,
                len: u64::from(len),
            },
        );
        st.bytes += u64::from(len);
        if let Some(s) = st.segments.get_mut(&segment) {
            s.live += 1;
        }
        let mut dropped = 0u64;
        while st.bytes > self.inner.max_bytes && st.index.len() > 1 {
            let Some((&old, _)) = st.index.iter().next() else {
                break;
            };
            self.finish(&mut st, old);
            dropped += 1;
        }
        if dropped > 0 {
            let before = self.inner.dropped.fetch_add(dropped, Ordering::Relaxed);
            metrics(None)
                .dropped
                .with_label_values(&[&self.inner.name])
                .inc_by(dropped);
            if before == 0 {
                tracing::warn!(destination = %self.inner.name, max_bytes = self.inner.max_bytes, "Outbox full: the oldest undelivered records are dropped (see percept_outbox_dropped_total).");
            }
        }
        self.publish_gauges(&st);
        drop(st);
        let _ = self.inner.wake_tx.try_send(());
        Ok(seq)
    }

    fn delete_segment(&self, st: &mut State, id: u64) {
        st.segments.remove(&id);
        let log = self.path(id);
        let _ = std::fs::remove_file(log.with_extension("done"));
        let _ = std::fs::remove_file(log);
    }

    /// The record is done with (delivered or dropped): out of the index, into its segment's
    /// journal, and its segment deleted when nothing of it is left.
    fn finish(&self, st: &mut State, seq: u64) -> bool {
        let Some(loc) = st.index.remove(&seq) else {
            return false;
        };
        st.bytes -= loc.len;
        let current = st.current.as_ref().map(|(id, _, _)| *id);
        let Some(seg) = st.segments.get_mut(&loc.segment) else {
            return true;
        };
        seg.live = seg.live.saturating_sub(1);
        if seg.live == 0 && current != Some(loc.segment) {
            self.delete_segment(st, loc.segment);
            return true;
        }
        if seg.done.is_none() {
            let path = self.path(loc.segment).with_extension("done");
            seg.done = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .ok();
        }
        if let Some(f) = seg.done.as_mut() {
            // Lost on a crash only means the record is sent again.
            let _ = f.write_all(&seq.to_le_bytes());
        }
        true
    }

    /// The oldest record after `after` (all when None): its seq.
    pub fn next_after(&self, after: Option<u64>) -> Option<u64> {
        let st = self.lock();
        match after {
            None => st.index.keys().next().copied(),
            Some(a) => st.index.range(a + 1..).next().map(|(k, _)| *k),
        }
    }

    /// A record's bytes; None when it is gone (dropped for room, or acknowledged).
    pub fn read(&self, seq: u64) -> Option<Vec<u8>> {
        let loc = *self.lock().index.get(&seq)?;
        let got = (|| {
            use std::io::{Read, Seek};
            let mut f = std::fs::File::open(self.path(loc.segment))?;
            f.seek(io::SeekFrom::Start(loc.offset))?;
            let mut buf = vec![0u8; loc.len as usize];
            f.read_exact(&mut buf)?;
            Ok::<_, io::Error>(buf)
        })();
        match got {
            Ok(b) => Some(b),
            Err(e) => {
                tracing::warn!(destination = %self.inner.name, seq, error = %e, "Outbox: record unreadable; skipped.");
                let mut st = self.lock();
                self.finish(&mut st, seq);
                self.publish_gauges(&st);
                None
            }
        }
    }

    /// The destination has the record: it is removed for good.
    pub fn ack(&self, seq: u64) {
        let mut st = self.lock();
        if self.finish(&mut st, seq) {
            self.publish_gauges(&st);
            metrics(None)
                .delivered
                .with_label_values(&[&self.inner.name])
                .inc();
        }
    }

    /// Wakes (at most one pending wake-up) after each push.
    pub fn wakeups(&self) -> Receiver<()> {
        self.inner.wake_rx.clone()
    }

    pub fn len(&self) -> usize {
        self.lock().index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Records dropped for room since this process opened the outbox.
    pub fn dropped(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }
}

/// A stable folder-safe name for a webhook URL (the URL itself may hold tokens): FNV-1a 64.
pub fn url_key(url: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in url.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("webhook-{h:016x}")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "percept-outbox-{}-{name}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn records_survive_a_reopen_and_go_when_acknowledged() {
        let d = tmp("reopen");
        let ob = Outbox::open(&d, 1 << 20).unwrap();
        let a = ob.push(b"one").unwrap();
        let b = ob.push(b"two").unwrap();
        ob.ack(a);
        drop(ob);
        // A record half-written by a killed process is not taken for a record.
        let seg = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.extension().is_some_and(|x| x == "log"))
            .unwrap();
        let mut f = std::fs::OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&[200, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, b'h'])
            .unwrap();
        drop(f);
        let ob = Outbox::open(&d, 1 << 20).unwrap();
        assert_eq!(ob.len(), 1);
        assert_eq!(ob.next_after(None), Some(b));
        assert_eq!(ob.read(b).unwrap(), b"two");
        assert_eq!(ob.next_after(Some(b)), None);
        // New records continue after the old ones.
        let c = ob.push(b"three").unwrap();
        assert!(c > b);
        ob.ack(b);
        ob.ack(c);
        drop(ob);
        // Everything delivered: nothing comes back, and the old segment is gone.
        assert!(Outbox::open(&d, 1 << 20).unwrap().is_empty());
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 0);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn full_outbox_drops_the_oldest_and_counts() {
        let d = tmp("full");
        let ob = Outbox::open(&d, 100).unwrap();
        let first = ob.push(&[b'x'; 40]).unwrap();
        ob.push(&[b'y'; 40]).unwrap();
        ob.push(&[b'z'; 40]).unwrap();
        assert_eq!(ob.len(), 2);
        assert_eq!(ob.dropped(), 1);
        assert!(ob.read(first).is_none());
        assert_eq!(ob.read(ob.next_after(None).unwrap()).unwrap(), [b'y'; 40]);
        // The dropped record's segment is deleted from the disk.
        assert_eq!(std::fs::read_dir(&d).unwrap().count(), 2);
        drop(ob);
        let ob = Outbox::open(&d, 100).unwrap();
        assert_eq!(ob.len(), 2);
        assert_eq!(ob.read(ob.next_after(None).unwrap()).unwrap(), [b'y'; 40]);
        let registry = prometheus::Registry::new();
        metrics(Some(&registry));
        let mut text = Vec::new();
        prometheus::Encoder::encode(
            &prometheus::TextEncoder::new(),
            &registry.gather(),
            &mut text,
        )
        .unwrap();
        let text = String::from_utf8(text).unwrap();
        let line = format!(
            "percept_outbox_dropped_total{{destination=\"{}\"}} 1",
            ob.name()
        );
        assert!(text.contains(&line), "{text}");
        assert!(text.contains(&format!(
            "percept_outbox_pending{{destination=\"{}\"}} 2",
            ob.name()
        )));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn url_keys_are_stable_and_hide_the_url() {
        let k = url_key("http://h:1/hook?token=secret");
        assert_eq!(k, url_key("http://h:1/hook?token=secret"));
        assert_ne!(k, url_key("http://h:1/hook?token=other"));
        assert!(!k.contains("secret") && k.starts_with("webhook-"));
    }
}
