#![allow(clippy::unwrap_used)]
//! Resampling to 16 kHz matches the reference loader (soundfile, channel mean, soxr HQ):
//! compared with soxr's own output, committed in tests/fixtures/resample/ by
//! `make_reference.py` (python-soxr 1.1.0).

use std::path::{Path, PathBuf};

use percept::preprocess::resample::resample;
use percept::preprocess::wav::load_mono_16k;

fn fixture(name: &str) -> Vec<f32> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/resample")
        .join(name);
    std::fs::read(&p)
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// The signal of `make_reference.py`: a tone, a chirp from 50 Hz to Nyquist, splitmix64 noise.
fn test_signal(rate: u32, n: usize, seed: u64, tone_hz: f64) -> Vec<f32> {
    let mut rng = percept::model::testing::SplitMix64(seed);
    let dur = n as f64 / f64::from(rate);
    let k = (f64::from(rate) / 2.0 - 50.0) / (2.0 * dur);
    let tau = 2.0 * std::f64::consts::PI;
    (0..n)
        .map(|i| {
            let t = i as f64 / f64::from(rate);
            let u = rng.next_f64() * 2.0 - 1.0;
            (0.25 * (tau * tone_hz * t).sin()
                + 0.2 * (tau * (50.0 * t + k * t * t)).sin()
                + 0.05 * u) as f32
        })
        .collect()
}

fn mean_abs_diff(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| f64::from((x - y).abs()))
        .sum::<f64>()
        / a.len() as f64
}

fn write_wav_f32(path: &PathBuf, rate: u32, left: &[f32], right: &[f32]) {
    let data_len = (left.len() * 8) as u32;
    let mut b = Vec::new();
    b.extend_from_slice(b"RIFF");
    b.extend_from_slice(&(36 + data_len).to_le_bytes());
    b.extend_from_slice(b"WAVEfmt ");
    b.extend_from_slice(&16u32.to_le_bytes());
    b.extend_from_slice(&3u16.to_le_bytes()); // IEEE float
    b.extend_from_slice(&2u16.to_le_bytes());
    b.extend_from_slice(&rate.to_le_bytes());
    b.extend_from_slice(&(rate * 8).to_le_bytes());
    b.extend_from_slice(&8u16.to_le_bytes());
    b.extend_from_slice(&32u16.to_le_bytes());
    b.extend_from_slice(b"data");
    b.extend_from_slice(&data_len.to_le_bytes());
    for (l, r) in left.iter().zip(right) {
        b.extend_from_slice(&l.to_le_bytes());
        b.extend_from_slice(&r.to_le_bytes());
    }
    std::fs::write(path, b).unwrap();
}

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
    write_wav_f32(&path, rate, &left, &right);
    let y = load_mono_16k(&path).unwrap();
    std::fs::remove_dir_all(&dir).ok();
    let reference = fixture("soxr_hq_44100_stereo_mean.f32");
    assert_eq!(y.len(), 8_000);
    let mad = mean_abs_diff(&y, &reference);
    eprintln!("44.1 kHz stereo WAV -> 16 kHz mono: mean |percept - soxr HQ| = {mad:.2e}");
    assert!(mad < 1e-4, "{mad}");
}

/// Runs `filesrc ! wavparse ! <branch>` and returns what the appsink delivered, converted the
/// way the live graph converts it (`audio_sample` of graph.rs + [`LiveAudio`]).
fn through_gstreamer(path: &Path, branch: &str) -> Vec<f32> {
    use gstreamer as gst;
    use gstreamer::prelude::*;
    use gstreamer_app as gst_app;
    use percept::ingest::audio_file::LiveAudio;
    gst::init().unwrap();
    let branch = branch.replace("{sync}", "false");
    let desc = format!(
        "filesrc location=\"{}\" ! wavparse ! {branch}",
        path.display()
    );
    let pipeline = gst::parse::launch(&desc)
        .unwrap()
        .downcast::<gst::Pipeline>()
        .unwrap();
    let sink = pipeline
        .by_name("audio_sink")
        .unwrap()
        .downcast::<gst_app::AppSink>()
        .unwrap();
    pipeline.set_state(gst::State::Playing).unwrap();
    let mut live = LiveAudio::default();
    let mut out = Vec::new();
    let mut last_t: Option<f64> = None;
    while let Ok(sample) = sink.pull_sample() {
        let buffer = sample.buffer().unwrap();
        let t = buffer.pts().map(|p| p.nseconds() as f64 / 1e9);
        let (rate, channels) = percept::ingest::graph::audio_format(&sample).unwrap();
        let map = buffer.map_readable().unwrap();
        let samples: Vec<f32> = map
            .as_slice()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        for (at, piece) in live.push(t, &samples, rate, channels).unwrap() {
            // One contiguous run: each piece starts where the previous one ended.
            if let (Some(at), Some(prev)) = (at, last_t) {
                assert!((at - prev).abs() < 1e-9, "{at} vs {prev}");
            }
            last_t = at.map(|a| a + piece.len() as f64 / 16_000.0);
            out.extend(piece);
        }
    }
    for (_, piece) in live.finish() {
        out.extend(piece);
    }
    pipeline.set_state(gst::State::Null).unwrap();
    out
}

#[test]
fn live_audio_branch_gives_the_file_paths_samples() {
    let rate = 44_100;
    let left = test_signal(rate, rate as usize / 2, 1, 440.0);
    let right = test_signal(rate, rate as usize / 2, 2, 3000.0);
    let dir = std::env::temp_dir().join(format!("percept-live-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("stereo44k.wav");
    write_wav_f32(&path, rate, &left, &right);
    let file = load_mono_16k(&path).unwrap();
    let live = through_gstreamer(&path, percept::ingest::template::AUDIO_BRANCH);
    // What the branch did before it kept the source rate: GStreamer's own resampler.
    let old = through_gstreamer(
        &path,
        "audioconvert ! audioresample ! audio/x-raw,format=F32LE,rate=16000,channels=1,\
         layout=interleaved ! appsink name=audio_sink sync={sync}",
    );
    std::fs::remove_dir_all(&dir).ok();
    let reference = fixture("soxr_hq_44100_stereo_mean.f32");
    assert_eq!(live.len(), file.len());
    let live_vs_file = mean_abs_diff(&live, &file);
    let n = old.len().min(reference.len());
    let old_vs_soxr = mean_abs_diff(&old[..n], &reference[..n]);
    eprintln!(
        "live branch vs file path: {live_vs_file:.2e}; GStreamer audioresample vs soxr HQ: \
         {old_vs_soxr:.2e} ({} vs {} samples)",
        old.len(),
        reference.len()
    );
    assert!(live_vs_file < 1e-7, "{live_vs_file}");
    assert!(mean_abs_diff(&live, &reference) < 1e-4);
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
    use percept::model::generate::{Request, Sampling};
    use percept::model::media::TowerEncoder;
    use percept::model::multimodal::SoftTokens;
    use percept::model::testing::{temp_model_dir, write_tiny_checkpoint, TinySpec};
    use percept::model::text::LoadOptions;
    use percept::model::Gemma4;

    let rate = 44_100;
    let left = test_signal(rate, rate as usize / 2, 1, 440.0);
    let right = test_signal(rate, rate as usize / 2, 2, 3000.0);
    let dir = temp_model_dir("soxr-e2e");
    std::fs::create_dir_all(&dir).unwrap();
    let wav = dir.join("stereo44k.wav");
    write_wav_f32(&wav, rate, &left, &right);
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
