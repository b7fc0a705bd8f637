//! percept's built-in signal analysis: a motion / scene-change score per sampled frame and a
//! level plus voice-activity flag per audio chunk. Cheap enough to run on every item, which is
//! why it later becomes the gate in front of the model.

use rustfft::{num_complex::Complex32, Fft, FftPlanner};
use std::sync::Arc;

/// `[analysis]`: the thresholds of the built-in signal analysis.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AnalysisConfig {
    /// Motion score (0..1) above which a frame counts as a scene change.
    pub scene_threshold: f64,
    /// Chunk level below which audio is never voice, in dBFS.
    pub voice_min_dbfs: f64,
    /// Artificial delay per analysed item in milliseconds: for overload tests and demos.
    pub delay_ms: u64,
}

impl Default for AnalysisConfig {
    fn default() -> Self {
        AnalysisConfig {
            scene_threshold: 0.3,
            voice_min_dbfs: -50.0,
            delay_ms: 0,
        }
    }
}

impl AnalysisConfig {
    /// Problems with the section, one line each.
    pub fn validate(&self, p: &mut Vec<String>) {
        if !(0.0..=1.0).contains(&self.scene_threshold) {
            p.push(format!(
                "[analysis] scene_threshold must be in [0, 1], got {}",
                self.scene_threshold
            ));
        }
    }
}

/// Side of the luma grid frames are reduced to before comparing; small enough to ignore
/// sensor noise and compression artefacts, large enough to see a person walk in.
const GRID_W: usize = 64;
const GRID_H: usize = 36;

/// Block-averaged luma of an RGB24 frame (tightly packed rows).
pub fn luma_grid(rgb: &[u8], width: usize, height: usize) -> Vec<f32> {
    let mut sums = vec![0f32; GRID_W * GRID_H];
    let mut counts = vec![0u32; GRID_W * GRID_H];
    if width == 0 || height == 0 || rgb.len() < width * height * 3 {
        return sums;
    }
    // Every 2nd pixel in each direction is plenty for a 64x36 average and halves the cost.
    for y in (0..height).step_by(2) {
        let gy = y * GRID_H / height;
        let row = &rgb[y * width * 3..(y + 1) * width * 3];
        for x in (0..width).step_by(2) {
            let gx = x * GRID_W / width;
            let p = &row[x * 3..x * 3 + 3];
            // BT.601 luma.
            let l = 0.299 * p[0] as f32 + 0.587 * p[1] as f32 + 0.114 * p[2] as f32;
            sums[gy * GRID_W + gx] += l;
            counts[gy * GRID_W + gx] += 1;
        }
    }
    for (s, c) in sums.iter_mut().zip(counts) {
        if c > 0 {
            *s /= c as f32;
        }
    }
    sums
}

/// Tracks the previous frame of one source.
#[derive(Default)]
pub struct MotionDetector {
    prev: Option<Vec<f32>>,
}

impl MotionDetector {
    /// Mean absolute luma change against the previous frame, in 0..1 (0 for the first frame).
    pub fn score(&mut self, rgb: &[u8], width: usize, height: usize) -> f64 {
        let grid = luma_grid(rgb, width, height);
        let score = match &self.prev {
            Some(prev) => {
                let sum: f32 = grid.iter().zip(prev).map(|(a, b)| (a - b).abs()).sum();
                f64::from(sum / (grid.len() as f32 * 255.0))
            }
            None => 0.0,
        };
        self.prev = Some(grid);
        score
    }
}

/// RMS level in dBFS; -120 stands for digital silence.
pub fn level_dbfs(samples: &[f32]) -> f64 {
    if samples.is_empty() {
        return -120.0;
    }
    let ms: f64 = samples
        .iter()
        .map(|&s| f64::from(s) * f64::from(s))
        .sum::<f64>()
        / samples.len() as f64;
    if ms <= 1e-12 {
        -120.0
    } else {
        (10.0 * ms.log10()).max(-120.0)
    }
}

/// Energy-and-spectrum voice activity detector for 16 kHz mono.
///
/// A 20 ms frame is voiced when it is loud enough, most of its energy lies in the speech band
/// and its spectrum is not flat (noise). A chunk has voice when enough frames are voiced and
/// the frame energies move like syllables do: a steady tone has the first two properties but
/// not the third.
pub struct VoiceDetector {
    fft: Arc<dyn Fft<f32>>,
    window: Vec<f32>,
    min_dbfs: f64,
}

const VAD_FRAME: usize = 320;
const VAD_FFT: usize = 512;
const SAMPLE_RATE: f32 = 16_000.0;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VoiceReport {
    pub voice: bool,
    pub voiced_fraction: f64,
    pub energy_spread_db: f64,
}

impl VoiceDetector {
    pub fn new(min_dbfs: f64) -> VoiceDetector {
        let window = (0..VAD_FRAME)
            .map(|i| 0.5 - 0.5 * (2.0 * std::f32::consts::PI * i as f32 / VAD_FRAME as f32).cos())
            .collect();
        VoiceDetector {
            fft: FftPlanner::new().plan_fft_forward(VAD_FFT),
            window,
            min_dbfs,
        }
    }

    pub fn analyse(&self, samples: &[f32]) -> VoiceReport {
        let mut voiced = 0usize;
        let mut frames = 0usize;
        let mut loud_db = Vec::new();
        let mut buf = vec![Complex32::new(0.0, 0.0); VAD_FFT];
        let bin_hz = SAMPLE_RATE / VAD_FFT as f32;
        let lo = (250.0 / bin_hz) as usize;
        let hi = (4000.0 / bin_hz) as usize;
        for frame in samples.chunks_exact(VAD_FRAME) {
            frames += 1;
            let db = level_dbfs(frame);
            if db < self.min_dbfs {
                continue;
            }
            loud_db.push(db);
            for (i, b) in buf.iter_mut().enumerate() {
                *b = if i < VAD_FRAME {
                    Complex32::new(frame[i] * self.window[i], 0.0)
                } else {
                    Complex32::new(0.0, 0.0)
                };
            }
            self.fft.process(&mut buf);
            let power: Vec<f32> = buf[1..VAD_FFT / 2]
                .iter()
                .map(|c| c.norm_sqr() + 1e-12)
                .collect();
            let total: f32 = power.iter().sum();
            let band: f32 = power[lo - 1..hi - 1].iter().sum();
            let log_mean = power.iter().map(|p| p.ln()).sum::<f32>() / power.len() as f32;
            let flatness = log_mean.exp() / (total / power.len() as f32);
            if band / total > 0.6 && flatness < 0.3 {
                voiced += 1;
            }
        }
        let voiced_fraction = if frames == 0 {
            0.0
        } else {
            voiced as f64 / frames as f64
        };
        let energy_spread_db = std_dev(&loud_db);
        VoiceReport {
            voice: voiced_fraction >= 0.2 && energy_spread_db >= 3.0,
            voiced_fraction,
            energy_spread_db,
        }
    }
}

fn std_dev(v: &[f64]) -> f64 {
    if v.len() < 2 {
        return 0.0;
    }
    let mean = v.iter().sum::<f64>() / v.len() as f64;
    (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / v.len() as f64).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(w: usize, h: usize, f: impl Fn(usize, usize) -> u8) -> Vec<u8> {
        let mut v = Vec::with_capacity(w * h * 3);
        for y in 0..h {
            for x in 0..w {
                let l = f(x, y);
                v.extend_from_slice(&[l, l, l]);
            }
        }
        v
    }

    #[test]
    fn still_frames_have_no_motion_moving_square_has_some() {
        let mut m = MotionDetector::default();
        let a = frame(320, 180, |x, _| (x % 256) as u8);
        assert_eq!(m.score(&a, 320, 180), 0.0);
        assert!(m.score(&a, 320, 180) < 1e-6);
        let b = frame(320, 180, |x, y| {
            if (100..160).contains(&x) && (50..110).contains(&y) {
                255
            } else {
                (x % 256) as u8
            }
        });
        let s = m.score(&b, 320, 180);
        assert!(s > 0.01 && s < 0.3, "{s}");
        let c = frame(320, 180, |_, _| 0);
        assert!(m.score(&c, 320, 180) > 0.3);
    }

    #[test]
    fn level_of_full_scale_sine_is_minus_3() {
        let s: Vec<f32> = (0..16000).map(|i| (i as f32 * 0.1).sin()).collect();
        assert!((level_dbfs(&s) + 3.01).abs() < 0.05);
        assert_eq!(level_dbfs(&vec![0.0; 100]), -120.0);
    }

    #[test]
    fn steady_tone_and_noise_are_not_voice() {
        let vad = VoiceDetector::new(-50.0);
        let tone: Vec<f32> = (0..16000)
            .map(|i| 0.3 * (2.0 * std::f32::consts::PI * 440.0 * i as f32 / 16000.0).sin())
            .collect();
        assert!(!vad.analyse(&tone).voice);
        let mut x: u64 = 1;
        let noise: Vec<f32> = (0..16000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.5
            })
            .collect();
        assert!(!vad.analyse(&noise).voice, "{:?}", vad.analyse(&noise));
        assert!(!vad.analyse(&vec![0.0; 16000]).voice);
    }
}
