//! A loaded Gemma 4 checkpoint (`gemma4` or `gemma4_unified`): config, decoder, tokenizer
//! and stop ids. Both architectures share the decoder ([`TextModel`]); they differ in the
//! media front ([`super::media::TowerEncoder`] picks towers or embedders) and the vision mask.

use std::path::Path;

use candle_core::Tensor;

use super::config::{Arch, Gemma4Config};
use super::generate::{generate_batch_reusing, GenerateOptions, Generation, Request};
use super::loader::{LoadError, ModelFiles, Weights};
use super::multimodal::{embed_prompt, PlaceholderIds, SoftTokens};
use super::prefix::PrefixCache;
use super::text::{LoadOptions, LogitRows, Segment, TextModel, VisionMask};
use super::tokenizer::Gemma4Tokenizer;
use super::ModelError;

/// Everything needed to turn prompts into tokens.
pub struct Gemma4 {
    pub files: ModelFiles,
    pub config: Gemma4Config,
    pub text: TextModel,
    pub tokenizer: Option<Gemma4Tokenizer>,
    /// Union of `generation_config.json` `eos_token_id` and the config's `eos_token_id`.
    pub stop_ids: Vec<u32>,
    pub weights: Weights,
    pub opts: LoadOptions,
    /// Prompt prefixes [`Gemma4::generate`] keeps and reuses (on by default; same tokens).
    pub prefixes: PrefixCache,
}

impl Gemma4 {
    /// Loads a local folder or hub id.
    pub fn load(spec: &str, opts: &LoadOptions) -> Result<Self, LoadError> {
        let files = ModelFiles::resolve(spec)?;
        Self::load_files(files, opts)
    }

    pub fn load_dir(dir: &Path, opts: &LoadOptions) -> Result<Self, LoadError> {
        Self::load_files(ModelFiles::from_dir(dir)?, opts)
    }

    pub fn load_files(files: ModelFiles, opts: &LoadOptions) -> Result<Self, LoadError> {
        // At a block quant the quantized cache (written on the first load) is mapped instead.
        let weights = match super::quant_cache::prepare(&files, opts.quant, opts.keep_f16)? {
            super::quant_cache::CacheUse::Hit(p) | super::quant_cache::CacheUse::Written(p) => {
                Weights::open_gguf(&[p], &opts.device, opts.dtype)?
            }
            super::quant_cache::CacheUse::None => {
                Weights::open(&files.weights, &opts.device, opts.dtype)?
            }
        };
        Self::assemble(files, opts, weights)
    }

    /// Builds the model from `files`' config and tokenizer over any weights (the
    /// benchmarks pass random weights at real shapes).
    pub fn assemble(
        files: ModelFiles,
        opts: &LoadOptions,
        weights: Weights,
    ) -> Result<Self, LoadError> {
        let config = Gemma4Config::from_file(&files.config)?;
        let mut text = TextModel::load(&weights, &config.text_config, opts)?;
        if config.arch == Arch::Gemma4Unified {
            // The unified model's own forward lets a vision token see its whole image on
            // every layer (see `VisionMask::BlockEverywhere`); that is what its `generate()`
            // computes with the default cache.
            text.set_vision_mask(VisionMask::BlockEverywhere);
        }
        let tokenizer = match &files.tokenizer {
            Some(_) => Some(Gemma4Tokenizer::load(&files)?),
            None => None,
        };
        let mut stop_ids = Vec::new();
        if let Some(p) = &files.generation_config {
            let text = std::fs::read_to_string(p).map_err(|source| LoadError::Io {
                path: p.clone(),
                source,
            })?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| LoadError::Parse {
                    path: p.clone(),
                    message: e.to_string(),
                })?;
            match v.get("eos_token_id") {
                Some(serde_json::Value::Number(n)) => stop_ids.extend(n.as_u64().map(|x| x as u32)),
                Some(serde_json::Value::Array(a)) => {
                    stop_ids.extend(a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32))
                }
                _ => {}
            }
        }
        for ids in [&config.eos_token_id, &config.text_config.eos_token_id]
            .into_iter()
            .flatten()
        {
            stop_ids.extend(ids.to_vec());
        }
        if let Some(t) = &tokenizer {
            stop_ids.push(t.special.eos);
        }
        stop_ids.sort_unstable();
        stop_ids.dedup();
        Ok(Self {
            files,
            config,
            text,
            tokenizer,
            stop_ids,
            weights,
            opts: opts.clone(),
            prefixes: PrefixCache::default(),
        })
    }

    /// Logits `[n, vocab]` of every position of one prompt, from one prefill in a fresh
    /// cache, media soft tokens placed as generation places them.
    pub fn prompt_logits(&self, ids: &[u32], soft: &SoftTokens) -> Result<Tensor, ModelError> {
        let pe = embed_prompt(&self.text, ids, soft, &self.placeholders())?;
        let mut cache = self.text.new_cache();
        let mut segs = [Segment {
            cache: &mut cache,
            len: ids.len(),
            logits: LogitRows::All,
            block_ids: Some(pe.block_ids.clone()),
        }];
        self.text
            .forward(&pe.embeds, pe.ple.as_ref(), &mut segs)?
            .into_iter()
            .next()
            .ok_or_else(|| ModelError::Request("the prefill returned no logits".into()))
    }

    /// Placeholder ids: from the tokenizer when present, else the config.
    pub fn placeholders(&self) -> PlaceholderIds {
        match &self.tokenizer {
            Some(t) => PlaceholderIds {
                image: t.special.image,
                video: t.special.video,
                audio: t.special.audio,
                pad: t.special.pad,
            },
            None => PlaceholderIds {
                image: self.config.image_token_id,
                video: self.config.video_token_id,
                audio: self.config.audio_token_id,
                pad: self.config.text_config.pad_token_id.unwrap_or(0),
            },
        }
    }

    pub fn generate_options(&self, prefill_chunk: usize) -> GenerateOptions {
        GenerateOptions {
            prefill_chunk,
            stop_ids: self.stop_ids.clone(),
            placeholders: self.placeholders(),
            turn_start: self.tokenizer.as_ref().and_then(|t| t.special.turn_start),
        }
    }

    /// Runs a batch of requests, reusing kept prompt prefixes; see
    /// [`super::generate::generate_batch`] and [`super::prefix`].
    pub fn generate(
        &self,
        requests: &[Request],
        prefill_chunk: usize,
        on_token: &mut dyn FnMut(usize, u32),
    ) -> Result<Vec<Generation>, ModelError> {
        generate_batch_reusing(
            &self.text,
            &self.generate_options(prefill_chunk),
            &self.prefixes,
            requests,
            on_token,
        )
    }
}
