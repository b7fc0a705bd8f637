//! Ask Gemma 4 about an image and/or an audio file, printing the answer as it is generated.
//!
//!     cargo run --release -p gemma4 --example describe -- MODEL [--image PNG|JPEG]... \
//!         [--audio WAV|FLAC|MP3] [--max-tokens N] PROMPT
//!
//! MODEL is a checkpoint folder (as published on the hub), a hub id already in the Hugging
//! Face cache, or a GGUF file (its `mmproj-*.gguf` found beside it). For example, with the
//! tiny test checkpoint of this crate:
//!
//!     cargo run -p gemma4 --example describe -- crates/gemma4/tests/fixtures/gemma4/model \
//!         --image crates/gemma4/tests/fixtures/gemma4/inputs/image.png "What is shown?"

use std::io::Write;
use std::path::PathBuf;

use gemma4::generate::Sampling;
use gemma4::loader::ModelFiles;
use gemma4::media::{TowerEncoder, DEFAULT_IMAGE_SOFT_TOKENS};
use gemma4::multimodal::MediaEncoder;
use gemma4::prompt::Prompt;
use gemma4::text::LoadOptions;
use gemma4::Gemma4;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: describe MODEL [--image PATH]... [--audio PATH] [--max-tokens N] PROMPT";
    let model = args.next().ok_or_else(|| anyhow::anyhow!(usage))?;
    let (mut images, mut audio, mut max_tokens, mut text) = (Vec::new(), None, 64, None);
    while let Some(a) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| anyhow::anyhow!("{a} needs a value"))
        };
        match a.as_str() {
            "--image" => images.push(PathBuf::from(value()?)),
            "--audio" => audio = Some(PathBuf::from(value()?)),
            "--max-tokens" => max_tokens = value()?.parse()?,
            _ => text = Some(a),
        }
    }
    let text = text.ok_or_else(|| anyhow::anyhow!(usage))?;

    let (device, dtype) = gemma4::device::open(None)?;
    let opts = LoadOptions {
        device,
        dtype,
        ..LoadOptions::default()
    };
    let model = Gemma4::load_files(ModelFiles::resolve(&model)?, &opts)?;
    let tok = model
        .tokenizer
        .as_ref()
        .ok_or_else(|| anyhow::anyhow!("the checkpoint has no tokenizer"))?;

    let towers = TowerEncoder::new(DEFAULT_IMAGE_SOFT_TOKENS);
    let mut prompt = Prompt::new();
    for p in &images {
        prompt.image(towers.encode_image(&model, p)?)?;
    }
    if let Some(p) = &audio {
        for clip in towers.encode_audio(&model, p)? {
            prompt.audio(clip)?;
        }
    }
    prompt.text(&text);
    let request = prompt.request(tok, max_tokens, Sampling::default())?;

    // Decode everything so far and print the new suffix: a token can end mid-character.
    let (mut ids, mut shown) = (Vec::new(), 0);
    model.generate(&[request], 512, &mut |_, id| {
        ids.push(id);
        if let Ok(s) = tok.decode(&ids, true) {
            if s.len() > shown && s.is_char_boundary(shown) {
                print!("{}", &s[shown..]);
                let _ = std::io::stdout().flush();
                shown = s.len();
            }
        }
    })?;
    println!();
    Ok(())
}
