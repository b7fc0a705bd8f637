//! Log-mel features of `Gemma4AudioFeatureExtractor` (transformers 5.24.0,
//! `feature_extraction_gemma4.py`) for one 16 kHz mono clip:
//! pad to a multiple of 128 samples, prepend 160 zeros (semicausal), frames of 321 samples
//! every 160 of which the first 320 are used (no preemphasis), periodic Hann(320),
//! rfft n=512, magnitude, 128 HTK mel filters 0..8000 Hz without normalisation,
//! `ln(mel + 1e-3)`; a frame is valid iff the last sample of its 321-window is real audio,
//! and invalid frames are zeroed. Clips longer than 30 s are split (the reference truncates).

use std::sync::Arc;

use realfft::{RealFftPlanner, RealToComplex};

pub const SAMPLE_RATE: usize = super::SAMPLE_RATE as usize;
pub const N_MELS: usize = 128;
pub const FRAME_LENGTH: usize = 320;
pub const HOP_LENGTH: usize = 160;
pub const FFT_LENGTH: usize = 512;
pub const PAD_MULTIPLE: usize = 128;
pub const MAX_SAMPLES: usize = 480_000;
pub const MEL_FLOOR: f64 = 1e-3;
/// `audio_seq_length`: most audio soft tokens per clip.
pub const MAX_AUDIO_TOKENS: usize = 750;

/// Features of one clip.
#[derive(Debug, Clone)]
pub struct MelFeatures {
    /// `[n_frames * 128]`, row-major frames.
    pub data: Vec<f32>,
    pub n_frames: usize,
    /// true = valid frame (HF `input_features_mask` polarity).
    pub mask: Vec<bool>,
}

impl MelFeatures {
    pub fn n_valid(&self) -> usize {
        self.mask.iter().filter(|&&m| m).count()
    }

    /// Soft tokens the audio tower yields for this clip.
    pub fn n_soft_tokens(&self) -> usize {
        audio_tokens_from_valid_frames(self.n_valid())
    }
}

/// Two stride-2 convolutions (kernel 3, pad 1) each map t -> ceil(t/2); capped at 750.
pub fn audio_tokens_from_valid_frames(valid: usize) -> usize {
    valid.div_ceil(2).div_ceil(2).min(MAX_AUDIO_TOKENS)
}

/// Soft tokens for a clip of `n_samples` at 16 kHz (`_compute_audio_num_tokens`).
pub fn audio_token_count(n_samples: usize) -> usize {
    let unfold = FRAME_LENGTH + 1;
    let padded = n_samples + FRAME_LENGTH / 2;
    if padded < unfold {
        return 0;
    }
    let frames = (padded - unfold) / HOP_LENGTH + 1;
    audio_tokens_from_valid_frames(frames)
}

fn hz_to_mel(f: f64) -> f64 {
    2595.0 * (1.0 + f / 700.0).log10()
}

fn mel_to_hz(m: f64) -> f64 {
    700.0 * (10f64.powf(m / 2595.0) - 1.0)
}

/// `mel_filter_bank(257, 128, 0, 8000, 16000, norm=None, mel_scale="htk")`: `[257][128]`.
pub fn mel_filters() -> Vec<[f64; N_MELS]> {
    let n_bins = FFT_LENGTH / 2 + 1;
    let (mmin, mmax) = (hz_to_mel(0.0), hz_to_mel(8000.0));
    let n_pts = N_MELS + 2;
    // np.linspace: start + i * step, with the last point exactly `stop`.
    let step = (mmax - mmin) / (n_pts - 1) as f64;
    let filter_freqs: Vec<f64> = (0..n_pts)
        .map(|i| {
            if i == n_pts - 1 {
                mel_to_hz(mmax)
            } else {
                mel_to_hz(mmin + i as f64 * step)
            }
        })
        .collect();
    let nyq = (SAMPLE_RATE / 2) as f64;
    let bin_step = nyq / (n_bins - 1) as f64;
    let diff: Vec<f64> = filter_freqs.windows(2).map(|w| w[1] - w[0]).collect();
    (0..n_bins)
        .map(|b| {
            let f = if b == n_bins - 1 {
                nyq
            } else {
                b as f64 * bin_step
            };
            let mut row = [0f64; N_MELS];
            for (m, r) in row.iter_mut().enumerate() {
                let down = -(filter_freqs[m] - f) / diff[m];
                let up = (filter_freqs[m + 2] - f) / diff[m + 1];
                *r = down.min(up).max(0.0);
            }
            row
        })
        .collect()
}

/// Reusable extractor (FFT plan, window and filters computed once).
pub struct MelExtractor {
    fft: Arc<dyn RealToComplex<f64>>,
    window: Vec<f64>,
    /// Sparse filters: per mel band the first bin and weights.
    bands: Vec<(usize, Vec<f64>)>,
}

impl std::fmt::Debug for MelExtractor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MelExtractor").finish_non_exhaustive()
    }
}

impl Default for MelExtractor {
    fn default() -> Self {
        Self::new()
    }
}

impl MelExtractor {
    pub fn new() -> Self {
        let fft = RealFftPlanner::<f64>::new().plan_fft_forward(FFT_LENGTH);
        // np.hanning(321)[:-1]; the reference stores it as float32.
        let window = (0..FRAME_LENGTH)
            .map(|n| {
                let w =
                    0.5 - 0.5 * (2.0 * std::f64::consts::PI * n as f64 / FRAME_LENGTH as f64).cos();
                w as f32 as f64
            })
            .collect();
        let filters = mel_filters();
        let bands = (0..N_MELS)
            .map(|m| {
                let nz: Vec<usize> = (0..filters.len())
                    .filter(|&b| filters[b][m] != 0.0)
                    .collect();
                match (nz.first(), nz.last()) {
                    (Some(&a), Some(&z)) => (a, (a..=z).map(|b| filters[b][m]).collect()),
                    _ => (0, Vec::new()),
                }
            })
            .collect();
        Self { fft, window, bands }
    }

    /// Features of one clip of at most 30 s (longer input is truncated, as the reference
    /// does; use [`MelExtractor::extract_clips`] to keep all of it).
    pub fn extract(&self, samples: &[f32]) -> MelFeatures {
        let n = samples.len().min(MAX_SAMPLES);
        let padded = n.div_ceil(PAD_MULTIPLE) * PAD_MULTIPLE;
        let pad_left = FRAME_LENGTH / 2;
        let total = padded + pad_left;
        let unfold = FRAME_LENGTH + 1;
        let n_frames = if total >= unfold {
            (total - unfold) / HOP_LENGTH + 1
        } else {
            0
        };
        let mut wave = vec![0f32; total];
        wave[pad_left..pad_left + n].copy_from_slice(&samples[..n]);
        let mut data = vec![0f32; n_frames * N_MELS];
        let mut mask = vec![false; n_frames];
        let mut input = self.fft.make_input_vec();
        let mut spec = self.fft.make_output_vec();
        let mut mag = vec![0f64; FFT_LENGTH / 2 + 1];
        let mut scratch = self.fft.make_scratch_vec();
        for (i, valid) in mask.iter_mut().enumerate() {
            let start = i * HOP_LENGTH;
            // Valid iff the window's last sample (index start + 320 in the padded signal)
            // is real audio.
            let last = start + unfold - 1;
            *valid = last >= pad_left && last < pad_left + n;
            if !*valid {
                continue;
            }
            for (k, v) in input.iter_mut().enumerate() {
                *v = if k < FRAME_LENGTH {
                    // float32 product as in the reference (frames * float32 window).
                    (wave[start + k] * self.window[k] as f32) as f64
                } else {
                    0.0
                };
            }
            if self
                .fft
                .process_with_scratch(&mut input, &mut spec, &mut scratch)
                .is_err()
            {
                // Only fails on wrong buffer lengths, which are fixed above.
                continue;
            }
            for (m, c) in mag.iter_mut().zip(spec.iter()) {
                *m = c.norm();
            }
            let row = &mut data[i * N_MELS..(i + 1) * N_MELS];
            for (r, (b0, w)) in row.iter_mut().zip(self.bands.iter()) {
                let s: f64 = w.iter().zip(&mag[*b0..]).map(|(a, b)| a * b).sum();
                *r = (s + MEL_FLOOR).ln() as f32;
            }
        }
        MelFeatures {
            data,
            n_frames,
            mask,
        }
    }

    /// Splits audio into 30 s clips and extracts each.
    pub fn extract_clips(&self, samples: &[f32]) -> Vec<MelFeatures> {
        if samples.is_empty() {
            return Vec::new();
        }
        samples
            .chunks(MAX_SAMPLES)
            .map(|c| self.extract(c))
            .collect()
    }
}
