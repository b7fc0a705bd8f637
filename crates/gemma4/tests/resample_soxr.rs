#![allow(clippy::unwrap_used)]
//! Resampling to 16 kHz matches the reference loader (soundfile, channel mean, soxr HQ):
//! compared with soxr's own output, committed in tests/fixtures/resample/ by
//! `make_reference.py` (python-soxr 1.1.0).

use gemma4::preprocess::resample::resample;
use gemma4::preprocess::wav::load_mono_16k;
use gemma4::testing::{mean_abs_diff, resample_fixture as fixture, test_signal, write_wav_f32};

#[test]
fn resampling_48k_matches_soxr_hq() {
    let x = test_signal(48_000, 24_000, 3, 440.0);
    let y = resample(&x, 48_000, 16_000);
    let mad = mean_abs_diff(&y, &fixture("soxr_hq_48000.f32"));
    eprintln!("48 kHz -> 16 kHz: mean |percept - soxr HQ| = {mad:.2e}");
    assert!(mad < 1e-4, "{mad}");
    // soxr runs this ratio as the very same single FIR: agreement is at float precision.
    assert!(mad < 1e-6, "{mad}");
}

#[test]
fn stereo_44k_wav_is_channel_mean_then_soxr_hq() {
    let rate = 44_100;
    let left = test_signal(rate, rate as usize / 2, 1, 440.0);
    let right = test_signal(rate, rate as usize / 2, 2, 3000.0);
    let dir = std::env::temp_dir().join(format!("percept-soxr-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("stereo44k.wav");
    write_wav_f32(&path, rate, &left, &right).unwrap();
    let y = load_mono_16k(&path).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    let reference = fixture("soxr_hq_44100_stereo_mean.f32");
    assert_eq!(y.len(), 8_000);
    let mad = mean_abs_diff(&y, &reference);
    eprintln!("44.1 kHz stereo WAV -> 16 kHz mono: mean |percept - soxr HQ| = {mad:.2e}");
    assert!(mad < 1e-4, "{mad}");
}

#[test]
fn resampling_speed_is_printed() {
    // Not a pass/fail timing (CPU is shared): prints the figure the README quotes.
    for rate in [44_100u32, 48_000] {
        let x = test_signal(rate, rate as usize * 10, 9, 440.0);
        let t = std::time::Instant::now();
        let y = resample(&x, rate, 16_000);
        let s = t.elapsed().as_secs_f64();
        assert_eq!(y.len(), 160_000);
        eprintln!(
            "{rate} Hz -> 16 kHz: 10 s of audio in {:.0} ms ({:.0}x real time)",
            s * 1e3,
            10.0 / s
        );
    }
}

/// End to end on the 12B architecture (tiny weights): the 44.1 kHz stereo WAV, loaded the way
/// `percept model run --audio` loads it, gives the same audio soft tokens' greedy answer as
/// soxr's own 16 kHz output of the same signal (the reference loader's samples).
#[test]
fn stereo_44k_wav_answers_like_the_soxr_resampled_audio() {
    use gemma4::generate::{Request, Sampling};
    use gemma4::media::TowerEncoder;
    use gemma4::multimodal::SoftTokens;
    use gemma4::testing::{temp_model_dir, write_tiny_checkpoint, TinySpec};
    use gemma4::text::LoadOptions;
    use gemma4::Gemma4;

    let rate = 44_100;
    let left = test_signal(rate, rate as usize / 2, 1, 440.0);
    let right = test_signal(rate, rate as usize / 2, 2, 3000.0);
    let dir = temp_model_dir("soxr-e2e");
    std::fs::create_dir_all(&dir).unwrap();
    let wav = dir.join("stereo44k.wav");
    write_wav_f32(&wav, rate, &left, &right).unwrap();
    let ours = load_mono_16k(&wav).unwrap();
    let model = write_tiny_checkpoint(&dir.join("model"), &TinySpec::unified()).unwrap();
    let g = Gemma4::load_dir(&model, &LoadOptions::default()).unwrap();
    let enc = TowerEncoder::new(70);
    let answer = |samples: &[f32]| {
        let audio = enc.encode_samples(&g, samples).unwrap();
        let n = audio.dim(0).unwrap();
        let ph = g.placeholders();
        let mut ids: Vec<u32> = (0..5).map(|i| 282 + i * 3).collect();
        ids.extend(std::iter::repeat_n(ph.audio, n));
        ids.extend([300, 301]);
        let req = Request {
            input_ids: ids,
            soft: SoftTokens {
                audios: vec![audio],
                ..Default::default()
            },
            max_new_tokens: 8,
            sampling: Sampling::default(),
        };
        g.generate(&[req], 8, &mut |_, _| {}).unwrap()[0]
            .output_ids
            .clone()
    };
    let reference = answer(&fixture("soxr_hq_44100_stereo_mean.f32"));
    assert_eq!(reference.len(), 8);
    assert_eq!(answer(&ours), reference);
    // The answer does depend on the audio: another signal of the same length changes it.
    let other = resample(
        &test_signal(rate, rate as usize / 2, 5, 1200.0),
        rate,
        16_000,
    );
    assert_ne!(answer(&other), reference);
    std::fs::remove_dir_all(&dir).ok();
}
