//! `caption`: speech windows become partial and final captions through the stabilizer, and
//! final ones go to the `captions.dir` VTT/SRT files.

use std::time::Instant;

use crate::caption::{AudioWindow, CaptionFiles};
use crate::config::TaskKind;
use crate::event::{Body, CaptionStatus};

use super::*;

impl SourceTask {
    pub(super) fn caption_job(&self, w: AudioWindow, captured: Instant) -> Job {
        let next = w.next_t0;
        let mut j = self.audio_job(w.t0, w.samples, w.is_final, captured);
        j.next_t0 = next;
        j
    }

    pub(super) fn on_caption(&mut self, job: &Job, text: &str) {
        let mut updates = match (job.class, job.next_t0) {
            (JobClass::FinalAudio, Some(next)) => {
                self.stabilizer.push_cut(job.t, job.end, text, next)
            }
            (class, _) => self
                .stabilizer
                .push(job.t, job.end, text, class == JobClass::FinalAudio),
        };
        if self.spec.task != TaskKind::Caption {
            // Answered after the task changed: no later window will revise these words.
            updates.extend(self.stabilizer.finish());
        }
        self.emit_captions(updates);
    }

    pub(super) fn emit_captions(&mut self, updates: Vec<crate::caption::CaptionUpdate>) {
        for u in updates {
            if u.status == CaptionStatus::Final {
                self.write_caption(u.t, u.end, &u.text);
            }
            self.feed.emit(
                u.t,
                Some(u.end),
                Body::Caption {
                    text: u.text,
                    status: u.status,
                },
            );
        }
    }

    pub(super) fn write_caption(&mut self, t: f64, end: f64, text: &str) {
        let Some(dir) = &self.env.caption_dir else {
            return;
        };
        if self.captions.is_none() && !self.caption_error {
            let vtt = dir.join(format!("{}.vtt", self.name));
            let srt = dir.join(format!("{}.srt", self.name));
            let made = std::fs::create_dir_all(dir)
                .map_err(|e| e.to_string())
                .and_then(|()| {
                    CaptionFiles::continue_or_create(&vtt, &srt).map_err(|e| e.to_string())
                });
            match made {
                Ok(f) => self.captions = Some(f),
                Err(e) => {
                    self.caption_error = true;
                    tracing::error!(source = %self.name, dir = %dir.display(), error = %e, "Cannot write caption files.");
                }
            }
        }
        if let Some(f) = &mut self.captions {
            if let Err(e) = f.append(t, end, text) {
                tracing::error!(source = %self.name, error = %e, "Cannot append a caption.");
            }
        }
    }
}
