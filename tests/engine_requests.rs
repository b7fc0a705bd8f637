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
        instructions: Default::default(),
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

/// `[tasks] instructions = "system"` (the default) puts a job's text in a system turn, before
/// its media: consecutive frames of a source then share a prompt prefix that covers the
/// instructions, and the model computes it once instead of once per frame. `user` (media
/// first, then the text) shares only the turn header.
#[test]
fn instructions_before_the_media_are_computed_once_per_source() {
    use percept::config::{Instructions, TaskKind};
    use percept::ingest::VideoFrame;
    use percept::tasks::{Job, JobClass};
    use std::sync::Arc;
    use std::time::Instant;
    let g = load(&tiny("u-instructions", &TinySpec::unified()));
    let enc = TowerEncoder::new(70);
    let text = "Describe what is happening in this camera image in one or two short sentences. \
                Mention people, vehicles, animals and anything unusual.";
    let job = |seed: u8, instructions: Instructions| {
        let img = image(160, 90, seed);
        Job {
            source: "cam".into(),
            task: TaskKind::Describe,
            class: JobClass::Frame,
            t: f64::from(seed),
            end: f64::from(seed),
            frame: Some(Arc::new(VideoFrame {
                t: f64::from(seed),
                width: 160,
                height: 90,
                rgb: img.data,
                captured: Instant::now(),
            })),
            video: Vec::new(),
            audio: None,
            prompt: text.into(),
            instructions,
            soft_tokens: 70,
            max_tokens: 2,
            attempt: 0,
            next_t0: None,
            captured: Instant::now(),
        }
    };
    let ph = g.placeholders();
    let first_media = |ids: &[u32]| ids.iter().position(|&t| t == ph.image).unwrap();
    let text_tokens = g.tokenizer.as_ref().unwrap().encode(text).unwrap().len();
    assert!(
        text_tokens > 8,
        "the test needs instructions of some length"
    );
    let sys: Vec<_> = (1..=3)
        .map(|s| percept::engine::build_request(&g, &enc, &job(s, Instructions::System)).unwrap())
        .collect();
    let user: Vec<_> = (1..=3)
        .map(|s| percept::engine::build_request(&g, &enc, &job(s, Instructions::User)).unwrap())
        .collect();
    // Same tokens before the media for every frame; the instructions are among them with
    // `system` and after the media with `user`.
    let head = &sys[0].input_ids[..first_media(&sys[0].input_ids)];
    assert_eq!(
        head,
        &sys[2].input_ids[..first_media(&sys[2].input_ids)],
        "frames of one source must share the tokens before their media"
    );
    let user_head = first_media(&user[0].input_ids);
    assert!(
        head.len() >= user_head + text_tokens,
        "system layout: {} tokens before the image, user layout {user_head}, instructions {text_tokens}",
        head.len()
    );
    let reused = |reqs: &[percept::model::generate::Request]| {
        g.prefixes.set_enabled(false);
        g.prefixes.set_enabled(true);
        g.prefixes.reset_stats();
        for r in reqs {
            g.generate(std::slice::from_ref(r), 16, &mut |_, _| {})
                .unwrap();
        }
        g.prefixes.stats().reused_tokens as usize
    };
    let (r_sys, r_user) = (reused(&sys), reused(&user));
    // The third frame starts from the prefix the second one kept.
    assert!(
        r_sys >= user_head + text_tokens && r_sys > r_user,
        "reused prompt tokens: system layout {r_sys}, user layout {r_user} (instructions {text_tokens})"
    );
}
