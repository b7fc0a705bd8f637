//! The live audio branch (GStreamer) against the file path (symphonia + the soxr-HQ resampler
//! of the gemma4 crate) on the same signal: the same 16 kHz samples.

#![allow(clippy::unwrap_used)]

use std::path::Path;

use gemma4::preprocess::wav::load_mono_16k;
use gemma4::testing::{mean_abs_diff, resample_fixture as fixture, test_signal, write_wav_f32};

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
    write_wav_f32(&path, rate, &left, &right).unwrap();
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
