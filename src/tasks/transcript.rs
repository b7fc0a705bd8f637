//! `transcribe` and recordings (`percept analyze`): transcript windows go to the transcript
//! files, and the checkpoint moves past a window only once its outputs are durable.

use std::path::PathBuf;

use crate::caption::CaptionFiles;

use super::*;

/// How a recording's task talks to `percept analyze` (see `analyze.rs`): its outputs are
/// made durable before the checkpoint moves past them, and a lost output or request keeps
/// the recording from being marked done.
pub trait RecordingHooks: Send + Sync {
    /// The transcript window ending at `t` (media seconds) is in the transcript files,
    /// which are synced; `events_bytes` is the events file's length after its last complete
    /// line. Syncs the events and moves the checkpoint; an error means the outputs could not
    /// be made durable.
    fn commit(&self, t: f64, events_bytes: u64) -> Result<(), String>;
    /// Where the recording's summary frames are kept (`frames/` in its output folder).
    fn frames_dir(&self) -> Option<PathBuf> {
        None
    }
    /// Something the recording owes was lost (an output write failed, a request failed or
    /// was skipped): the checkpoint no longer moves and the recording is not done.
    fn fail(&self, what: String);
}

/// Where an interrupted recording analysis picks up (see `percept analyze`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Resume {
    /// Audio from here on goes to the model again (end of the last committed window).
    pub model_from: f64,
    /// `audio` events already written up to this media time.
    pub audio_after: f64,
    /// `frame` events already written up to and including this media time.
    pub frame_after: Option<f64>,
    /// Transcript windows already committed: (t, end, text).
    pub transcript: Vec<(f64, f64, String)>,
}

impl SourceTask {
    /// A recording lost something it owes (see [`RecordingHooks::fail`]).
    pub(super) fn recording_lost(&self, what: String) {
        if let Some(h) = &self.env.checkpoint {
            self.recording_failed
                .store(true, std::sync::atomic::Ordering::Relaxed);
            h.fail(what);
        }
    }

    /// After a transcript window: transcript files synced, then the hooks sync the events
    /// and move the checkpoint. Never past a window that was lost.
    pub(super) fn commit(&mut self, t: f64) {
        let Some(h) = self.env.checkpoint.clone() else {
            return;
        };
        if self
            .recording_failed
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return;
        }
        if let Some(e) = self.feed.events.write_error() {
            self.recording_lost(format!("writing events: {e}"));
            return;
        }
        if let Some(f) = &self.transcript_files {
            if let Err(e) = f.sync() {
                self.recording_lost(format!("{e}"));
                return;
            }
        }
        if let Err(e) = summary::sync_kept(&self.unsynced_frames) {
            self.recording_lost(format!("syncing summary frames: {e}"));
            return;
        }
        self.unsynced_frames.clear();
        if let Err(e) = h.commit(t, self.feed.events.position()) {
            self.recording_lost(e);
        }
    }

    /// Continue an interrupted recording: its committed transcript is kept (and the
    /// transcript files rewritten from it).
    pub fn resume(&mut self, r: &Resume) {
        self.transcript = r.transcript.clone();
        // The frames kept before the resume point come back from the recording's folder:
        // the worker does not hand those frames over again.
        if let (Some(dir), Some(after)) = (self.frames_dir(), r.frame_after) {
            self.clip_frames = summary::kept_in(&dir)
                .into_iter()
                .filter(|f| f.t <= after + 1e-6)
                .collect();
            self.last_kept = self.clip_frames.last().map(|f| f.t);
        }
        if let Some((vtt, srt)) = &self.env.transcript_files {
            match CaptionFiles::open_resume(vtt, srt, &self.transcript) {
                Ok(f) => self.transcript_files = Some(f),
                Err(e) => {
                    tracing::error!(path = %vtt.display(), error = %e, "Cannot write the transcript.")
                }
            }
        }
    }

    pub(super) fn write_transcript(&mut self, t: f64, end: f64, text: &str) {
        if self.transcript_files.is_none() {
            if let Some((vtt, srt)) = &self.env.transcript_files {
                match CaptionFiles::create(vtt, srt) {
                    Ok(f) => self.transcript_files = Some(f),
                    Err(e) => {
                        tracing::error!(path = %vtt.display(), error = %e, "Cannot write the transcript.");
                        self.recording_lost(e.to_string());
                        return;
                    }
                }
            }
        }
        if let Some(f) = &mut self.transcript_files {
            if let Err(e) = f.append(t, end, text) {
                tracing::error!(source = %self.name, error = %e, "Cannot append to the transcript.");
                self.recording_lost(e.to_string());
            }
        }
    }

    /// Where `percept analyze` keeps this recording's summary frames.
    pub(super) fn frames_dir(&self) -> Option<PathBuf> {
        self.env.checkpoint.as_ref().and_then(|h| h.frames_dir())
    }
}

/// Valid subtitle files with no cue (a recording without speech).
pub fn empty_transcript_files(
    vtt: &std::path::Path,
    srt: &std::path::Path,
) -> Result<(), crate::caption::CaptionFileError> {
    CaptionFiles::create(vtt, srt).map(|_| ())
}
