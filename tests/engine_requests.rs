//! percept's live prompt builder (`engine::build_request`) on tiny generated checkpoints: the
//! jobs the pipeline makes become requests the model accepts.

#![allow(clippy::unwrap_used)]

use gemma4::media::TowerEncoder;
use gemma4::preprocess::image::RgbImage;
use gemma4::preprocess::unified::image_token_count;
use gemma4::testing::{temp_model_dir, write_tiny_checkpoint, TinySpec};
use gemma4::text::LoadOptions;
use gemma4::Gemma4;

fn tiny(tag: &str, spec: &TinySpec) -> std::path::PathBuf {
    write_tiny_checkpoint(&temp_model_dir(tag), spec).unwrap()
}

fn load(dir: &std::path::Path) -> Gemma4 {
    Gemma4::load_dir(dir, &LoadOptions::default()).unwrap()
}

fn image(w: usize, h: usize, seed: u8) -> RgbImage {
    let data = (0..w * h * 3)
        .map(|i| ((i * 31 + (i / (w * 3)) * 7) as u8).wrapping_add(seed))
        .collect();
    RgbImage::new(w, h, data)
}

/// The live pipeline's prompt builder (`engine::build_request`) on a unified model: a frame,
/// a window of frames sent as video and an audio chunk become placeholders whose counts
/// match the embedders' soft tokens, and the request generates.
#[test]
fn live_pipeline_requests_work_on_the_unified_model() {
    use percept::config::TaskKind;
    use percept::ingest::VideoFrame;
    use percept::tasks::{Job, JobClass};
    use std::sync::Arc;
    use std::time::Instant;
    let g = load(&tiny("u-engine", &TinySpec::unified()));
    let enc = TowerEncoder::new(70);
    let frame = |t: f64| {
        let img = image(160, 90, t as u8);
        Arc::new(VideoFrame {
            t,
            width: 160,
            height: 90,
            rgb: img.data,
            captured: Instant::now(),
        })
    };
    let job = Job {
        source: "cam".into(),
        task: TaskKind::Describe,
        class: JobClass::Frame,
        t: 10.0,
        end: 12.0,
        frame: Some(frame(10.0)),
        video: vec![frame(10.0), frame(11.0)],
        audio: Some(Arc::new(vec![0.05f32; 16_000])),
        prompt: "What happens?".into(),
        soft_tokens: 70,
        max_tokens: 3,
        attempt: 0,
        next_t0: None,
        captured: Instant::now(),
    };
    let req = percept::engine::build_request(&g, &enc, &job).unwrap();
    let ph = g.placeholders();
    let per_frame = image_token_count(90, 160, 70).unwrap();
    let count = |id: u32| req.input_ids.iter().filter(|&&t| t == id).count();
    assert_eq!(count(ph.image), per_frame);
    assert_eq!(count(ph.video), 2 * per_frame);
    assert_eq!(count(ph.audio), 25);
    let out = g.generate(&[req], 16, &mut |_, _| {}).unwrap();
    assert!(!out[0].output_ids.is_empty());
}
