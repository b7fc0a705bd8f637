//! TEMPORARY stand-in for crate::caption (being written on another branch): voice-gated
//! windows cut at pauses or at the length cap, final text only, plain VTT/SRT appends.

use std::io::Write;
use std::path::Path;

use crate::config::CaptionConfig;
use crate::event::CaptionStatus;

pub struct AudioWindow {
    pub t0: f64,
    pub samples: Vec<f32>,
    pub is_final: bool,
}

pub struct AudioWindower {
    cfg: CaptionConfig,
    t0: f64,
    buf: Vec<f32>,
    silence: f64,
}

impl AudioWindower {
    pub fn new(cfg: &CaptionConfig) -> Self {
        Self {
            cfg: cfg.clone(),
            t0: 0.0,
            buf: Vec::new(),
            silence: 0.0,
        }
    }

    pub fn push(&mut self, t: f64, samples: &[f32], voice: bool) -> Vec<AudioWindow> {
        let d = samples.len() as f64 / 16000.0;
        if self.buf.is_empty() {
            if !voice {
                return vec![];
            }
            self.t0 = t;
        }
        self.buf.extend_from_slice(samples);
        self.silence = if voice { 0.0 } else { self.silence + d };
        if self.silence >= self.cfg.pause_seconds
            || self.buf.len() as f64 / 16000.0 >= self.cfg.max_window_seconds
        {
            return self.flush();
        }
        vec![]
    }

    pub fn flush(&mut self) -> Vec<AudioWindow> {
        if self.buf.is_empty() {
            return vec![];
        }
        self.silence = 0.0;
        vec![AudioWindow {
            t0: self.t0,
            samples: std::mem::take(&mut self.buf),
            is_final: true,
        }]
    }
}

pub struct CaptionUpdate {
    pub t: f64,
    pub end: f64,
    pub text: String,
    pub status: CaptionStatus,
}

#[derive(Default)]
pub struct Stabilizer {
    _n: usize,
}

impl Stabilizer {
    pub fn push(&mut self, t0: f64, t1: f64, text: &str, _is_final: bool) -> Vec<CaptionUpdate> {
        if text.trim().is_empty() {
            return vec![];
        }
        vec![CaptionUpdate {
            t: t0,
            end: t1,
            text: text.trim().to_string(),
            status: CaptionStatus::Final,
        }]
    }
}

pub fn suppress_repetition(text: &str) -> String {
    text.to_string()
}

pub struct CaptionFiles {
    vtt: std::fs::File,
    srt: std::fs::File,
    n: usize,
}

fn ts(t: f64, sep: char) -> String {
    let ms = (t * 1000.0).round() as u64;
    format!(
        "{:02}:{:02}:{:02}{sep}{:03}",
        ms / 3_600_000,
        ms / 60_000 % 60,
        ms / 1000 % 60,
        ms % 1000
    )
}

impl CaptionFiles {
    pub fn create(vtt: &Path, srt: &Path) -> std::io::Result<Self> {
        let mut v = std::fs::File::create(vtt)?;
        v.write_all(b"WEBVTT\n\n")?;
        Ok(Self {
            vtt: v,
            srt: std::fs::File::create(srt)?,
            n: 0,
        })
    }

    pub fn append(&mut self, t: f64, end: f64, text: &str) -> std::io::Result<()> {
        self.n += 1;
        let clean = text.replace("-->", "->").replace('\n', " ");
        let esc = clean
            .replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;");
        write!(self.vtt, "{} --> {}\n{esc}\n\n", ts(t, '.'), ts(end, '.'))?;
        write!(
            self.srt,
            "{}\n{} --> {}\n{clean}\n\n",
            self.n,
            ts(t, ','),
            ts(end, ',')
        )?;
        self.vtt.flush()?;
        self.srt.flush()
    }
}
