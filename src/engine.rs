//! The model thread: one Gemma 4 instance serves every source. It loads the model (in the
//! background, so sources start at once), then repeatedly takes a batch of jobs across
//! sources from the dispatch, encodes their media with the model's own towers, runs one
//! batched generation and sends each outcome back over the reply channel of the worker that
//! offered the job (the worker alone applies it to the source's task).

pub mod config;

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::{Instructions, ModelConfig};
use crate::control::{LiveBoard, ModelStatus};
use crate::ingest::VideoFrame;
use crate::metrics::Metrics;
use crate::model::generate::{Request, Sampling};
use crate::model::layers::Quant;
use crate::model::media::TowerEncoder;
use crate::model::prompt::Prompt;
use crate::model::text::LoadOptions;
use crate::model::{Gemma4, ModelError};
use crate::preprocess::image::RgbImage;
use crate::tasks::dispatch::{Dispatch, ModelGate};
use crate::tasks::reply::Taken;
use crate::tasks::{Answer, Job, SkipReason};

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
        // Whatever ends this thread, the dispatch must not wait for it any longer: a
        // `wait_idle` on a dead model thread would hang `run` and `analyze` forever.
        let _exit = ExitGuard {
            dispatch: &self.dispatch,
        };
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
                self.unavailable(message);
                return;
            }
        };
        let load_seconds = t0.elapsed().as_secs_f64();
        tracing::info!(model = %id, load_seconds, "Model ready.");
        self.live.set_model(ModelStatus::Ready {
            id,
            load_seconds: (load_seconds * 100.0).round() / 100.0,
        });
        let mut st = LoopState::new();
        let mut model = model;
        loop {
            let (m, panicked) = self.serve_loop(model, true, &mut st);
            let Some(what) = panicked else {
                return;
            };
            // The old weights go before the new ones come, so a reload never needs the
            // memory of two models.
            drop(m);
            self.dispatch.set_gate(ModelGate::Loading);
            self.metrics.model.ready.set(0);
            self.live.set_model(ModelStatus::Loading {
                id: self.cfg.id.clone(),
            });
            let t0 = Instant::now();
            match self.load() {
                Ok(fresh) => {
                    let load_seconds = t0.elapsed().as_secs_f64();
                    tracing::warn!(model = %self.cfg.id, load_seconds, "Model reloaded after a panic.");
                    self.live.set_model(ModelStatus::Ready {
                        id: self.cfg.id.clone(),
                        load_seconds: (load_seconds * 100.0).round() / 100.0,
                    });
                    model = fresh;
                }
                Err(e) => {
                    self.give_up(format!(
                        "the model step panicked ({what}) and reloading it failed: {e}"
                    ));
                    // Nothing to serve with: skip what still comes until the dispatch closes.
                    while let Some(batch) = self.dispatch.take_batch(self.cfg.max_batch) {
                        for t in &batch {
                            t.skip(SkipReason::ModelUnavailable);
                        }
                        self.dispatch.done(batch.len());
                    }
                    return;
                }
            }
        }
    }

    /// Answers jobs with an already loaded model until the dispatch closes; gives the
    /// model back (the benchmark reuses one across runs). A panicking step is caught as in
    /// [`Engine::spawn`]'s thread, but the model is not reloaded (the caller built it).
    pub fn serve(self, model: Gemma4) -> Gemma4 {
        let _exit = ExitGuard {
            dispatch: &self.dispatch,
        };
        self.serve_loop(model, false, &mut LoopState::new()).0
    }

    /// The model cannot answer: said on the live board (`/healthz` turns `degraded`), in
    /// the metrics, and to the gates, which then skip instead of waiting.
    fn unavailable(&self, message: String) {
        self.live.set_model(ModelStatus::Unavailable {
            id: self.cfg.id.clone(),
            message,
        });
        self.metrics.model.ready.set(0);
        self.metrics.model.unavailable.set(1);
        self.dispatch.set_gate(ModelGate::Unavailable);
    }

    /// The step loop. Each step runs under `catch_unwind`: a panic (a bug in a kernel, the
    /// tokenizer, a task) ends the step's unanswered requests with `error` events. Returns
    /// the model and, after a panic when `reload` is set, the panic's text: the caller then
    /// drops the model (a panic may leave its state half-changed) and loads it again before
    /// coming back. After [`MAX_PANICS_IN_A_ROW`] panicking steps with no good step between
    /// them the model is marked unavailable instead; jobs still waiting are then skipped as
    /// `model_unavailable` until the dispatch closes, so shutdown never waits on a model
    /// that will not answer.
    fn serve_loop(
        &self,
        model: Gemma4,
        reload: bool,
        st: &mut LoopState,
    ) -> (Gemma4, Option<String>) {
        self.metrics.model.ready.set(1);
        self.dispatch.set_gate(ModelGate::Ready);
        let enc = TowerEncoder::new(crate::model::media::DEFAULT_IMAGE_SOFT_TOKENS);
        while let Some(batch) = self.dispatch.take_batch(self.cfg.max_batch) {
            let n = batch.len();
            if st.given_up {
                for t in &batch {
                    t.skip(SkipReason::ModelUnavailable);
                }
                self.dispatch.done(n);
                continue;
            }
            st.steps += 1;
            let step = st.steps;
            let mut handled = vec![false; n];
            let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| {
                if st.fault.panics_at(step) {
                    panic!("fault injected by {FAULT_ENV} at model step {step}");
                }
                self.step(&model, &enc, &batch, &mut handled);
            }));
            let Err(payload) = outcome else {
                st.panics_in_a_row = 0;
                self.dispatch.done(n);
                continue;
            };
            st.panics_in_a_row += 1;
            let what = panic_text(payload.as_ref());
            self.metrics.model.panics.inc();
            tracing::error!(step, in_a_row = st.panics_in_a_row, panic = %what, "The model step panicked; its requests end with errors.");
            for (t, done) in batch.iter().zip(&handled) {
                if !done {
                    t.error(format!("the model step panicked: {what}"));
                }
            }
            self.dispatch.done(n);
            if st.panics_in_a_row >= MAX_PANICS_IN_A_ROW {
                st.given_up = true;
                self.give_up(format!(
                    "the model step panicked {} times in a row (last: {what})",
                    st.panics_in_a_row
                ));
            } else if reload {
                return (model, Some(what));
            }
        }
        (model, None)
    }

    fn give_up(&self, message: String) {
        tracing::error!(model = %self.cfg.id, "MODEL UNAVAILABLE: {message}. Running signal analysis only.");
        self.unavailable(message);
        // Jobs already waiting will not be answered: the loop skips them as it takes them.
    }

    fn load(&self) -> Result<Gemma4, String> {
        let quant = self
            .cfg
            .quant
            .parse::<Quant>()
            .map_err(|e| format!("quant: {e}"))?;
        let (device, dtype) = crate::model_cli::default_device().map_err(|e| format!("{e:#}"))?;
        let opts = LoadOptions {
            device,
            dtype,
            quant,
            keep_f16: self.cfg.keep_f16,
            max_context: self.cfg.context,
            vision_quant: self.cfg.vision_quant,
        };
        let m = Gemma4::load(&self.cfg.id, &opts).map_err(|e| e.to_string())?;
        if m.tokenizer.is_none() {
            return Err(format!("{} has no tokenizer.json", m.files.dir.display()));
        }
        Ok(m)
    }

    /// One batched step over jobs of several sources. `handled[i]` is set once job `i`'s
    /// answer or error was sent, so a panic part-way leaves the others to the caller.
    fn step(&self, model: &Gemma4, enc: &TowerEncoder, batch: &[Taken], handled: &mut [bool]) {
        let t0 = Instant::now();
        let mut ready = Vec::new();
        let mut requests = Vec::new();
        for (i, t) in batch.iter().enumerate() {
            match build_request(model, enc, &t.job) {
                Ok(r) => {
                    requests.push(r);
                    ready.push((i, t));
                }
                Err(e) => {
                    handled[i] = true;
                    t.error(e);
                }
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
                for (i, t) in &ready {
                    handled[*i] = true;
                    t.error(e.to_string());
                }
                return;
            }
        };
        let Some(tok) = model.tokenizer.as_ref() else {
            return;
        };
        for ((i, t), (g, req)) in ready.iter().zip(gens.iter().zip(&requests)) {
            handled[*i] = true;
            m.tokens
                .with_label_values(&["prompt"])
                .inc_by(req.input_ids.len() as u64);
            m.tokens
                .with_label_values(&["prompt_cached"])
                .inc_by(g.cached_prompt_tokens as u64);
            m.tokens
                .with_label_values(&["generated"])
                .inc_by(g.output_ids.len() as u64);
            let text = match tok.decode(&g.output_ids, true) {
                Ok(t) => t,
                Err(e) => {
                    t.error(e.to_string());
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
            // Follow-ups (a `watch` retry, the next summary window) are the worker's to
            // offer once it applied the answer.
            t.answer(answer);
        }
    }
}

/// The chat prompt of a job, with its soft tokens: the task's text in a system turn and the
/// media alone in the user turn, or media first and then the task's text in the user turn
/// (`[tasks] instructions`; a job without media always takes the second form).
pub fn build_request(model: &Gemma4, enc: &TowerEncoder, job: &Job) -> Result<Request, String> {
    let tok = model
        .tokenizer
        .as_ref()
        .ok_or("the model has no tokenizer")?;
    let rgb = |f: &VideoFrame| RgbImage::new(f.width as usize, f.height as usize, f.rgb.clone());
    let err = |e: ModelError| e.to_string();
    let mut prompt = Prompt::new();
    let has_media = job.frame.is_some() || !job.video.is_empty() || job.audio.is_some();
    let in_system = has_media && job.instructions == Instructions::System;
    if in_system {
        prompt.system(&job.prompt);
    }
    if let Some(f) = &job.frame {
        let t = enc
            .encode_rgb(model, &rgb(f), job.soft_tokens)
            .map_err(err)?;
        prompt.image(t).map_err(err)?;
    }
    if !job.video.is_empty() {
        let mut frames = Vec::with_capacity(job.video.len());
        for f in &job.video {
            frames.push(
                enc.encode_rgb(model, &rgb(f), job.soft_tokens)
                    .map_err(err)?,
            );
        }
        // Stamps relative to the window start, as the reference's video processor does.
        let stamps = job.video.iter().map(|f| f.t - job.t).collect();
        prompt.video(frames, stamps).map_err(err)?;
    }
    if let Some(a) = &job.audio {
        prompt
            .audio(enc.encode_samples(model, a).map_err(err)?)
            .map_err(err)?;
    }
    if !in_system {
        prompt.text(&job.prompt);
    }
    prompt
        .request(tok, job.max_tokens, Sampling::default())
        .map_err(err)
}

/// Panicking steps in a row (no good step between them) after which the model is given up
/// rather than reloaded again: a panic that a fresh model repeats is a bug in the input or
/// the code, and reloading a multi-GB model forever would only hide it.
pub const MAX_PANICS_IN_A_ROW: u32 = 3;

/// Fault injection for the crash tests: `PERCEPT_FAULT_MODEL_PANIC=N` makes model step N
/// (counted from 1 over the whole process) panic, `N+` every step from N on. The tests drive
/// the real binary in a child process, where `cfg(test)` does not reach and a cargo feature
/// would mean a second build of the binary; an environment variable read once when the
/// model thread starts costs nothing when unset, is said loudly in the log when set, and
/// panics inside the real step, so the real recovery path runs.
pub const FAULT_ENV: &str = "PERCEPT_FAULT_MODEL_PANIC";

/// What the step loop keeps across reloads.
struct LoopState {
    /// Steps taken since the thread started (the fault plan counts these).
    steps: u64,
    panics_in_a_row: u32,
    given_up: bool,
    fault: FaultPlan,
}

impl LoopState {
    fn new() -> LoopState {
        LoopState {
            steps: 0,
            panics_in_a_row: 0,
            given_up: false,
            fault: FaultPlan::from_env(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct FaultPlan {
    /// First step that panics, and whether every later step does too.
    at: Option<(u64, bool)>,
}

impl FaultPlan {
    fn from_env() -> FaultPlan {
        let Ok(v) = std::env::var(FAULT_ENV) else {
            return FaultPlan::default();
        };
        let plan = FaultPlan::parse(&v);
        match plan.at {
            Some(_) => {
                tracing::warn!(value = %v, "{FAULT_ENV} is set: model steps will panic on purpose (a test hook).")
            }
            None => tracing::warn!(value = %v, "{FAULT_ENV} is not N or N+; ignored."),
        }
        plan
    }

    fn parse(v: &str) -> FaultPlan {
        let v = v.trim();
        let (num, every) = match v.strip_suffix('+') {
            Some(n) => (n, true),
            None => (v, false),
        };
        FaultPlan {
            at: num
                .parse::<u64>()
                .ok()
                .filter(|n| *n > 0)
                .map(|n| (n, every)),
        }
    }

    fn panics_at(&self, step: u64) -> bool {
        match self.at {
            Some((n, true)) => step >= n,
            Some((n, false)) => step == n,
            None => false,
        }
    }
}

fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".into()
    }
}

/// Marks the model unavailable to the gates if the model thread ends while the dispatch
/// is still open (a panic outside a step, or any early return), so nothing waits on it.
struct ExitGuard<'a> {
    dispatch: &'a Dispatch,
}

impl Drop for ExitGuard<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dispatch.set_gate(ModelGate::Unavailable);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fault_plans_parse() {
        assert!(FaultPlan::parse("2").panics_at(2));
        assert!(!FaultPlan::parse("2").panics_at(3));
        assert!(FaultPlan::parse("2+").panics_at(7));
        assert!(!FaultPlan::parse("2+").panics_at(1));
        assert_eq!(FaultPlan::parse("x"), FaultPlan::default());
        assert_eq!(FaultPlan::parse("0"), FaultPlan::default());
    }
}
