#![allow(clippy::unwrap_used)]
//! Log-mel features, token counts, WAV decode and resampling.

use std::f32::consts::PI;
use std::path::PathBuf;

use gemma4::preprocess::audio_file::MonoResampler;
use gemma4::preprocess::mel::{
    audio_token_count, mel_filters, MelExtractor, MEL_FLOOR, N_MELS, SAMPLE_RATE,
};
use gemma4::preprocess::wav::load_mono_16k;

/// The ingest resampler over a whole buffer.
fn resample(x: &[f32], from: u32, channels: usize) -> Vec<f32> {
    let mut r = MonoResampler::new(from).unwrap();
    let mut y = r.push(x, channels);
    y.extend(r.finish());
    y
}

fn sine(freq: f32, rate: u32, n: usize, amp: f32) -> Vec<f32> {
    (0..n)
        .map(|i| amp * (2.0 * PI * freq * i as f32 / rate as f32).sin())
        .collect()
}

/// Magnitude of the DFT of `x` at `freq` (Goertzel-style direct sum), normalised by length.
fn tone_level(x: &[f32], freq: f64, rate: u32) -> f64 {
    let (mut re, mut im) = (0f64, 0f64);
    for (i, &v) in x.iter().enumerate() {
        let a = 2.0 * std::f64::consts::PI * freq * i as f64 / rate as f64;
        re += v as f64 * a.cos();
        im += v as f64 * a.sin();
    }
    (re * re + im * im).sqrt() / x.len() as f64
}

fn mel_center_hz(m: usize) -> f64 {
    let mel = |f: f64| 2595.0 * (1.0 + f / 700.0).log10();
    let hz = |m: f64| 700.0 * (10f64.powf(m / 2595.0) - 1.0);
    hz(mel(8000.0) * (m + 1) as f64 / (N_MELS + 1) as f64)
}

#[test]
fn sine_peaks_in_the_right_mel_band_and_framing_matches_reference() {
    // 16150 samples pad to 16256 (multiple of 128): (16256 + 160 - 321) / 160 + 1 = 101
    // frames; the last one ends at padded index 16320 >= 160 + 16150, so it is padding.
    let x = sine(1000.0, 16_000, 16_150, 0.5);
    let f = MelExtractor::new().extract(&x);
    assert_eq!(f.n_frames, 101);
    assert_eq!(f.n_valid(), 100);
    assert!(!f.mask[100]);
    assert!(f.data[100 * N_MELS..].iter().all(|&v| v == 0.0));
    assert_eq!(f.n_soft_tokens(), 25);
    assert_eq!(audio_token_count(16_150), 25);
    let row = &f.data[50 * N_MELS..51 * N_MELS];
    let (argmax, _) = row
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .unwrap();
    let best = (0..N_MELS)
        .min_by(|&a, &b| {
            (mel_center_hz(a) - 1000.0)
                .abs()
                .total_cmp(&(mel_center_hz(b) - 1000.0).abs())
        })
        .unwrap();
    assert!(
        argmax.abs_diff(best) <= 1,
        "peak band {argmax}, 1 kHz band {best}"
    );
    // Far bands see only window leakage.
    assert!(row[argmax] - row[N_MELS - 1] > 5.0);
}

#[test]
fn silence_is_log_floor_on_valid_frames() {
    let f = MelExtractor::new().extract(&vec![0.0; 4000]);
    let floor = (MEL_FLOOR as f32).ln();
    for (i, &valid) in f.mask.iter().enumerate() {
        let row = &f.data[i * N_MELS..(i + 1) * N_MELS];
        if valid {
            assert!(row.iter().all(|&v| (v - floor).abs() < 1e-6));
        } else {
            assert!(row.iter().all(|&v| v == 0.0));
        }
    }
}

#[test]
fn token_counts_agree_between_processor_formula_and_mask() {
    let ex = MelExtractor::new();
    for n in [321usize, 640, 1000, 16_000, 19_200, 24_001, 47_999, 100_000] {
        let f = ex.extract(&vec![0.1; n]);
        assert_eq!(f.n_soft_tokens(), audio_token_count(n), "n = {n}");
    }
    assert_eq!(audio_token_count(160_000), 250);
    assert_eq!(audio_token_count(480_000), 750);
    assert_eq!(audio_token_count(10_000_000), 750);
    assert_eq!(audio_token_count(100), 0);
}

#[test]
fn long_audio_is_split_into_30s_clips() {
    let ex = MelExtractor::new();
    let clips = ex.extract_clips(&vec![0.0; 65 * SAMPLE_RATE]);
    assert_eq!(clips.len(), 3);
    assert_eq!(clips[0].n_frames, 2999);
    assert_eq!(clips[0].n_soft_tokens(), 750);
    assert_eq!(clips[2].n_soft_tokens(), audio_token_count(5 * SAMPLE_RATE));
}

#[test]
fn mel_filters_are_htk_triangles_without_normalisation() {
    let fb = mel_filters();
    assert_eq!(fb.len(), 257);
    for m in 0..N_MELS {
        let col: Vec<f64> = fb.iter().map(|r| r[m]).collect();
        assert!(col.iter().all(|&v| (0.0..=1.0).contains(&v)));
    }
    // DC and Nyquist bins lie on the edges of the first/last triangles: weight 0.
    assert!(fb[0].iter().all(|&v| v == 0.0));
}

#[test]
fn mel_speed_10s() {
    let x = sine(440.0, 16_000, 160_000, 0.3);
    let ex = MelExtractor::new();
    let t = std::time::Instant::now();
    let f = ex.extract(&x);
    let ms = t.elapsed().as_secs_f64() * 1e3;
    eprintln!("mel: {ms:.1} ms per 10 s of audio ({} frames)", f.n_frames);
    assert_eq!(f.n_frames, 999);
}

#[test]
fn resampling_keeps_lengths_and_tone_frequency() {
    for (from, n) in [
        (44_100u32, 44_100usize),
        (48_000, 24_000),
        (8_000, 8_000),
        (22_050, 1),
    ] {
        let x = sine(440.0, from, n, 0.5);
        let y = resample(&x, from, 1);
        assert_eq!(
            y.len(),
            (n as f64 * 16_000.0 / f64::from(from)).round() as usize
        );
        if n > 1000 {
            let mid = &y[y.len() / 8..y.len() * 7 / 8];
            let at = tone_level(mid, 440.0, 16_000);
            let off = tone_level(mid, 470.0, 16_000);
            assert!((at - 0.25).abs() < 0.01, "{from}: level {at}");
            assert!(off < at / 10.0, "{from}: 440 {at}, 470 {off}");
        }
    }
    // A tone above the new Nyquist is filtered out, not aliased to 16000 - 10000 = 6 kHz.
    let x = sine(10_000.0, 44_100, 44_100, 0.5);
    let y = resample(&x, 44_100, 1);
    let mid = &y[2000..14_000];
    assert!(tone_level(mid, 6_000.0, 16_000) < 1e-3);
    let rms = (mid.iter().map(|v| v * v).sum::<f32>() / mid.len() as f32).sqrt();
    assert!(rms < 5e-3, "rms {rms}");
    assert_eq!(resample(&[1.0, 2.0], 16_000, 1), vec![1.0, 2.0]);
}

#[test]
fn downmix_averages_channels() {
    assert_eq!(resample(&[1.0, 3.0, -1.0, 1.0], 16_000, 2), vec![2.0, 0.0]);
}

fn write_wav_i16(path: &PathBuf, rate: u32, channels: u16, frames: &[Vec<i16>]) {
    let data_len = (frames.len() * channels as usize * 2) as u32;
    let mut b = Vec::new();
    b.extend_from_slice(b"RIFF");
    b.extend_from_slice(&(36 + data_len).to_le_bytes());
    b.extend_from_slice(b"WAVEfmt ");
    b.extend_from_slice(&16u32.to_le_bytes());
    b.extend_from_slice(&1u16.to_le_bytes());
    b.extend_from_slice(&channels.to_le_bytes());
    b.extend_from_slice(&rate.to_le_bytes());
    b.extend_from_slice(&(rate * channels as u32 * 2).to_le_bytes());
    b.extend_from_slice(&(channels * 2).to_le_bytes());
    b.extend_from_slice(&16u16.to_le_bytes());
    b.extend_from_slice(b"data");
    b.extend_from_slice(&data_len.to_le_bytes());
    for f in frames {
        for s in f {
            b.extend_from_slice(&s.to_le_bytes());
        }
    }
    std::fs::write(path, b).unwrap();
}

#[test]
fn wav_decode_downmix_resample() {
    let dir = std::env::temp_dir().join(format!("percept-wav-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("stereo.wav");
    let rate = 44_100u32;
    // Left: 440 Hz, right: silence -> mono has half the amplitude.
    let frames: Vec<Vec<i16>> = sine(440.0, rate, rate as usize, 0.5)
        .iter()
        .map(|v| vec![(v * 32767.0) as i16, 0])
        .collect();
    write_wav_i16(&path, rate, 2, &frames);
    let y = load_mono_16k(&path).unwrap();
    assert_eq!(y.len(), 16_000);
    let mid = &y[2000..14_000];
    let level = tone_level(mid, 440.0, 16_000);
    assert!((level - 0.125).abs() < 0.005, "level {level}");
    assert!(load_mono_16k(&dir.join("missing.wav")).is_err());
    std::fs::remove_dir_all(&dir).ok();
}
