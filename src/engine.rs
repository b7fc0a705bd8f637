//! The model thread: one Gemma 4 instance serves every source. It loads the model (in the
//! background, so sources start at once), then repeatedly takes a batch of jobs across
//! sources from the dispatch, encodes their media with the model's own towers, runs one
//! batched generation and hands each answer back to its source's task.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::config::ModelConfig;
use crate::control::{LiveBoard, ModelStatus};
use crate::lock;
use crate::metrics::Metrics;
use crate::model::generate::{Request, Sampling};
use crate::model::layers::Quant;
use crate::model::media::TowerEncoder;
use crate::model::multimodal::SoftTokens;
use crate::model::text::LoadOptions;
use crate::model::tokenizer::{ChatContent, ChatMessage, MediaItem};
use crate::model::Gemma4;
use crate::preprocess::image::RgbImage;
use crate::tasks::dispatch::{Dispatch, ModelGate};
use crate::tasks::{Answer, Job, SourceTask};

pub struct Engine {
    pub cfg: ModelConfig,
    pub dispatch: Arc<Dispatch>,
    pub live: Arc<LiveBoard>,
    pub metrics: Arc<Metrics>,
}

impl Engine {
    pub fn spawn(self) -> std::io::Result<std::thread::JoinHandle<()>> {
        std::thread::Builder::new()
            .name("percept-model".into())
            .spawn(move || self.run())
    }

    fn run(self) {
        let id = self.cfg.id.clone();
        self.live.set_model(ModelStatus::Loading { id: id.clone() });
        let t0 = Instant::now();
        let model = match self.load() {
            Ok(m) => m,
            Err(message) => {
                tracing::error!(
                    "MODEL UNAVAILABLE: cannot load '{id}': {message}. Looked for it as a local folder and in the Hugging Face cache ({}). Point [model] id (or --model) at a folder with config.json, model.safetensors and tokenizer.json, or download it once with network access. Running signal analysis only.",
                    crate::model::loader::hf_hub_cache_dir()
                        .map(|p| p.display().to_string())
                        .unwrap_or_else(|| "no cache dir".into())
                );
                self.live.set_model(ModelStatus::Unavailable {
                    id,
                    message: message.clone(),
                });
                self.metrics.model.unavailable.set(1);
                self.dispatch.set_gate(ModelGate::Unavailable);
                return;
            }
        };
        let load_seconds = t0.elapsed().as_secs_f64();
        tracing::info!(model = %id, load_seconds, "Model ready.");
        self.live.set_model(ModelStatus::Ready {
            id,
            load_seconds: (load_seconds * 100.0).round() / 100.0,
        });
        self.serve(model);
    }

    /// Answers jobs with an already loaded model until the dispatch closes; gives the
    /// model back (the benchmark reuses one across runs).
    pub fn serve(self, model: Gemma4) -> Gemma4 {
        self.metrics.model.ready.set(1);
        self.dispatch.set_gate(ModelGate::Ready);
        let enc = TowerEncoder::new(crate::model::media::DEFAULT_IMAGE_SOFT_TOKENS);
        while let Some(batch) = self.dispatch.take_batch(self.cfg.max_batch) {
            let n = batch.len();
            self.step(&model, &enc, batch);
            self.dispatch.done(n);
        }
        model
    }

    fn load(&self) -> Result<Gemma4, String> {
        let quant = <Quant as clap::ValueEnum>::from_str(&self.cfg.quant, true)
            .map_err(|e| format!("quant '{}': {e}", self.cfg.quant))?;
        let (device, dtype) = crate::model::cli::default_device().map_err(|e| format!("{e:#}"))?;
        let opts = LoadOptions {
            device,
            dtype,
            quant,
            keep_f16: self.cfg.keep_f16,
            max_context: self.cfg.context,
        };
        let m = Gemma4::load(&self.cfg.id, &opts).map_err(|e| e.to_string())?;
        if m.tokenizer.is_none() {
            return Err(format!("{} has no tokenizer.json", m.files.dir.display()));
        }
        Ok(m)
    }

    /// One batched step over jobs of several sources.
    fn step(&self, model: &Gemma4, enc: &TowerEncoder, batch: Vec<(Arc<Mutex<SourceTask>>, Job)>) {
        let t0 = Instant::now();
        let mut ready = Vec::new();
        let mut requests = Vec::new();
        for (task, job) in batch {
            match build_request(model, enc, &job) {
                Ok(r) => {
                    requests.push(r);
                    ready.push((task, job));
                }
                Err(e) => lock(&task).on_error(&job, &e),
            }
        }
        if requests.is_empty() {
            return;
        }
        if self.cfg.delay_ms > 0 {
            std::thread::sleep(Duration::from_millis(self.cfg.delay_ms));
        }
        let result = model.generate(&requests, self.cfg.prefill_chunk, &mut |_, _| {});
        let model_s = t0.elapsed().as_secs_f64();
        let m = &self.metrics.model;
        m.batch_size.observe(requests.len() as f64);
        m.step_seconds.observe(model_s);
        let gens = match result {
            Ok(g) => g,
            Err(e) => {
                for (task, job) in &ready {
                    lock(task).on_error(job, &e.to_string());
                }
                return;
            }
        };
        let Some(tok) = model.tokenizer.as_ref() else {
            return;
        };
        for ((task, job), (g, req)) in ready.iter().zip(gens.iter().zip(&requests)) {
            m.tokens
                .with_label_values(&["prompt"])
                .inc_by(req.input_ids.len() as u64);
            m.tokens
                .with_label_values(&["generated"])
                .inc_by(g.output_ids.len() as u64);
            let text = match tok.decode(&g.output_ids, true) {
                Ok(t) => t,
                Err(e) => {
                    lock(task).on_error(job, &e.to_string());
                    continue;
                }
            };
            let answer = Answer {
                text,
                model_s,
                prompt_tokens: req.input_ids.len(),
                output_tokens: g.output_ids.len(),
                batch: requests.len(),
            };
            let follow = lock(task).on_answer(job, &answer);
            if let Some(f) = follow {
                self.dispatch.offer(task, f, &|| false);
            }
        }
    }
}

/// The chat prompt of a job (media first, then the task's text), with its soft tokens.
pub fn build_request(model: &Gemma4, enc: &TowerEncoder, job: &Job) -> Result<Request, String> {
    let tok = model
        .tokenizer
        .as_ref()
        .ok_or("the model has no tokenizer")?;
    let mut content = Vec::new();
    let mut media = Vec::new();
    let mut soft = SoftTokens::default();
    if let Some(f) = &job.frame {
        let img = RgbImage::new(f.width as usize, f.height as usize, f.rgb.clone());
        let t = enc
            .encode_rgb(model, &img, job.soft_tokens)
            .map_err(|e| e.to_string())?;
        media.push(MediaItem::Image {
            tokens: t.dim(0).map_err(|e| e.to_string())?,
        });
        soft.images.push(t);
        content.push(ChatContent::Image);
    }
    if !job.video.is_empty() {
        let mut stamps = Vec::with_capacity(job.video.len());
        let mut per_frame = 0;
        for f in &job.video {
            let img = RgbImage::new(f.width as usize, f.height as usize, f.rgb.clone());
            let t = enc
                .encode_rgb(model, &img, job.soft_tokens)
                .map_err(|e| e.to_string())?;
            per_frame = t.dim(0).map_err(|e| e.to_string())?;
            soft.videos.push(t);
            // Stamps relative to the window start, as the reference's video processor does.
            stamps.push(f.t - job.t);
        }
        media.push(MediaItem::Video {
            tokens_per_frame: per_frame,
            timestamps_s: stamps,
        });
        content.push(ChatContent::Video);
    }
    if let Some(a) = &job.audio {
        let t = enc.encode_samples(model, a).map_err(|e| e.to_string())?;
        media.push(MediaItem::Audio {
            tokens: t.dim(0).map_err(|e| e.to_string())?,
        });
        soft.audios.push(t);
        content.push(ChatContent::Audio);
    }
    content.push(ChatContent::Text(job.prompt.clone()));
    let rendered = tok
        .render_chat(&[ChatMessage::user(content)], true, false)
        .map_err(|e| e.to_string())?;
    let prompt = tok
        .expand_media(&rendered, &media)
        .map_err(|e| e.to_string())?;
    let input_ids = tok.encode(&prompt).map_err(|e| e.to_string())?;
    Ok(Request {
        input_ids,
        soft,
        max_new_tokens: job.max_tokens,
        sampling: Sampling::default(),
    })
}
