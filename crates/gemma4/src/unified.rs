//! The encoder-free multimodal front of Gemma 4 12B (`gemma4_unified`,
//! `modeling_gemma4_unified.py`, transformers 5.24.0). There are no towers:
//!
//! - vision (`model.embed_vision.*`, `Gemma4UnifiedVisionEmbedder`): merged 48x48 pixel
//!   patches -> LayerNorm -> Dense (+bias) -> LayerNorm -> + factorized (x, y) position
//!   embedding -> LayerNorm -> RMSNorm (no scale) -> Linear to the text hidden size;
//! - audio (`model.embed_audio.*`, `Gemma4UnifiedMultimodalEmbedder`): 640-sample waveform
//!   frames -> RMSNorm (no scale) -> Linear.
//!
//! The three LayerNorms are torch `nn.LayerNorm` (weight and bias, eps 1e-5), not RMSNorms.
//! Checkpoints saved by transformers 5.24 keep the patch embedding under
//! `model.vision_embedder.*` and the final projection under `model.embed_vision.*`; both
//! layouts are read.

use candle_core::{DType, Module, Tensor, D};

use super::config::{UnifiedAudioConfig, UnifiedVisionConfig};
use super::layers::{upcast_dtype, Linear, Quant, RmsNorm};
use super::loader::{LoadError, Weights};
use super::ModelError;
use crate::preprocess::unified::PatchInput;

/// The embedders run in f32, or in f64 when the whole model does (reference-precision checks).
fn compute_dtype(w: &Weights) -> DType {
    upcast_dtype(w.dtype())
}

/// torch `nn.LayerNorm` default eps.
const LAYER_NORM_EPS: f64 = 1e-5;

/// Rows normalised at a time (128 x 6912 f64 values = 7 MB).
const LAYER_NORM_ROWS: usize = 128;

/// `nn.LayerNorm(dim)` with weight and bias. The normalisation runs in f64 whatever the
/// embedders' dtype: candle's f32 row sums over the 6912 pixel values of a merged patch lose
/// enough precision to leave the image soft tokens 1.3e-5 from exact arithmetic (torch's f32
/// run: 1.5e-6), and the decoder turns soft-token errors of that size into ~1e-3 in the
/// logits. Rows go in blocks of [`LAYER_NORM_ROWS`] so the f64 copies stay a few MB.
#[derive(Debug, Clone)]
struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
}

impl LayerNorm {
    fn load(w: &Weights, name: &str, dim: usize) -> Result<Self, LoadError> {
        Ok(Self {
            weight: w.get_dtype(&format!("{name}.weight"), &[dim], compute_dtype(w))?,
            bias: w.get_dtype(&format!("{name}.bias"), &[dim], compute_dtype(w))?,
        })
    }

    /// `[n, dim]` -> `[n, dim]`.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let n = x.dim(0)?;
        if n == 0 {
            return Ok(x.clone());
        }
        let mut parts = Vec::with_capacity(n.div_ceil(LAYER_NORM_ROWS));
        for start in (0..n).step_by(LAYER_NORM_ROWS) {
            let rows = x.narrow(0, start, LAYER_NORM_ROWS.min(n - start))?;
            let r = rows.to_dtype(DType::F64)?;
            let rc = r.broadcast_sub(&r.mean_keepdim(D::Minus1)?)?;
            let var = rc.sqr()?.mean_keepdim(D::Minus1)?;
            parts.push(
                rc.broadcast_div(&(var + LAYER_NORM_EPS)?.sqrt()?)?
                    .to_dtype(x.dtype())?,
            );
        }
        Tensor::cat(&parts, 0)?
            .broadcast_mul(&self.weight)?
            .broadcast_add(&self.bias)
    }
}

/// `Gemma4UnifiedMultimodalEmbedder`: RMSNorm without scale, then a bias-free projection.
#[derive(Debug, Clone)]
pub struct MultimodalEmbedder {
    norm: RmsNorm,
    projection: Linear,
}

impl MultimodalEmbedder {
    /// Loads `<prefix>.embedding_projection.weight` `[text_hidden, in_dim]`, stored as `proj`.
    pub fn load(
        w: &Weights,
        prefix: &str,
        in_dim: usize,
        text_hidden: usize,
        eps: f64,
        proj: Quant,
    ) -> Result<Self, LoadError> {
        Ok(Self {
            norm: RmsNorm::without_scale(eps),
            projection: Linear::load(
                &w.pp(prefix),
                "embedding_projection",
                text_hidden,
                in_dim,
                proj,
            )?,
        })
    }

    /// Storage of the projection (`f32`, `f16`, `q8_0`, `q4k`).
    pub fn projection_storage(&self) -> &'static str {
        self.projection.storage()
    }

    /// `[n, in_dim]` f32 -> `[n, text_hidden]`. The norm runs in f64 like the LayerNorms (640
    /// waveform samples per audio frame).
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dtype = x.dtype();
        let n = self
            .norm
            .forward(&x.to_dtype(DType::F64)?)?
            .to_dtype(dtype)?;
        self.projection.forward(&n)
    }
}

/// `Gemma4UnifiedVisionEmbedder` (+ its multimodal projection).
#[derive(Debug, Clone)]
pub struct VisionEmbedder {
    patch_ln1: LayerNorm,
    patch_dense: Linear,
    patch_dense_bias: Tensor,
    patch_ln2: LayerNorm,
    /// `[mm_posemb_size, 2, mm_embed_dim]`.
    pos_embedding: Tensor,
    pos_norm: LayerNorm,
    embedder: MultimodalEmbedder,
    posemb_size: usize,
    patch_dim: usize,
}

impl VisionEmbedder {
    /// Loads from weights rooted at the checkpoint root, everything in f32.
    pub fn load(
        w: &Weights,
        cfg: &UnifiedVisionConfig,
        text_hidden: usize,
    ) -> Result<Self, LoadError> {
        Self::load_with(w, cfg, text_hidden, Quant::F32)
    }

    /// Loads with the two projections (`patch_dense`, `embedding_projection`) stored as
    /// `proj`; norms and the position table stay f32.
    pub fn load_with(
        w: &Weights,
        cfg: &UnifiedVisionConfig,
        text_hidden: usize,
        proj: Quant,
    ) -> Result<Self, LoadError> {
        let pd = cfg.patch_dim();
        let d = cfg.mm_embed_dim;
        // transformers 5.24 writes the patch embedding beside the projection
        // (`model.vision_embedder.*`); the module tree has it under `model.embed_vision`.
        let pe = if w.contains("model.vision_embedder.patch_dense.weight") {
            w.pp("model.vision_embedder")
        } else {
            w.pp("model.embed_vision")
        };
        let proj_prefix = if w.contains("model.embed_vision.embedding_projection.weight") {
            "model.embed_vision"
        } else {
            "model.embed_vision.multimodal_embedder"
        };
        Ok(Self {
            patch_ln1: LayerNorm::load(&pe, "patch_ln1", pd)?,
            patch_dense: Linear::load(&pe, "patch_dense", d, pd, proj)?,
            patch_dense_bias: pe.get_dtype("patch_dense.bias", &[d], compute_dtype(&pe))?,
            patch_ln2: LayerNorm::load(&pe, "patch_ln2", d)?,
            pos_embedding: pe.get_dtype(
                "pos_embedding",
                &[cfg.mm_posemb_size, 2, d],
                compute_dtype(&pe),
            )?,
            pos_norm: LayerNorm::load(&pe, "pos_norm", d)?,
            embedder: MultimodalEmbedder::load(
                w,
                proj_prefix,
                cfg.output_proj_dims,
                text_hidden,
                cfg.rms_norm_eps,
                proj,
            )?,
            posemb_size: cfg.mm_posemb_size,
            patch_dim: pd,
        })
    }

    /// Storage of `patch_dense` and of the final projection.
    pub fn projection_storage(&self) -> (&'static str, &'static str) {
        (
            self.patch_dense.storage(),
            self.embedder.projection_storage(),
        )
    }

    /// Hidden states after `pos_norm` (`[n, mm_embed_dim]`, the reference's
    /// `last_hidden_state` without padding rows).
    pub fn hidden(
        &self,
        pixel_values: &Tensor,
        positions: &[[i64; 2]],
    ) -> Result<Tensor, ModelError> {
        let (n, pd) = pixel_values.dims2()?;
        if pd != self.patch_dim || n != positions.len() {
            return Err(ModelError::Request(format!(
                "vision embedder: {n} patches of {pd} values with {} positions, expected {} values per patch",
                positions.len(),
                self.patch_dim
            )));
        }
        let x = self
            .patch_ln1
            .forward(&pixel_values.to_dtype(self.patch_dense_bias.dtype())?)?;
        let x = self
            .patch_dense
            .forward(&x)?
            .broadcast_add(&self.patch_dense_bias)?;
        let x = self.patch_ln2.forward(&x)?;
        let mut xs = Vec::with_capacity(n);
        let mut ys = Vec::with_capacity(n);
        for p in positions {
            let (x, y) = (p[0], p[1]);
            if x < 0 || y < 0 || x as usize >= self.posemb_size || y as usize >= self.posemb_size {
                return Err(ModelError::Request(format!(
                    "patch position ({x}, {y}) outside the {}-entry position table",
                    self.posemb_size
                )));
            }
            xs.push(x as u32);
            ys.push(y as u32);
        }
        let dev = pixel_values.device();
        let table_x = self
            .pos_embedding
            .narrow(1, 0, 1)?
            .squeeze(1)?
            .contiguous()?;
        let table_y = self
            .pos_embedding
            .narrow(1, 1, 1)?
            .squeeze(1)?
            .contiguous()?;
        let px = table_x.index_select(&Tensor::from_vec(xs, n, dev)?, 0)?;
        let py = table_y.index_select(&Tensor::from_vec(ys, n, dev)?, 0)?;
        let x = (x + (px + py)?)?;
        Ok(self.pos_norm.forward(&x)?)
    }

    /// Soft tokens `[n, text_hidden]` of one image's merged patches.
    pub fn forward(
        &self,
        pixel_values: &Tensor,
        positions: &[[i64; 2]],
    ) -> Result<Tensor, ModelError> {
        let h = self.hidden(pixel_values, positions)?;
        Ok(self.embedder.forward(&h)?)
    }

    /// Soft tokens of a preprocessed image.
    pub fn encode(
        &self,
        input: &PatchInput,
        dev: &candle_core::Device,
    ) -> Result<Tensor, ModelError> {
        let pv = Tensor::from_slice(&input.pixel_values, (input.n_patches, self.patch_dim), dev)?;
        self.forward(&pv, &input.positions)
    }
}

/// The audio side: waveform frames -> soft tokens.
#[derive(Debug, Clone)]
pub struct AudioEmbedder {
    embedder: MultimodalEmbedder,
    samples_per_token: usize,
    dtype: DType,
}

impl AudioEmbedder {
    /// Loads in f32.
    pub fn load(
        w: &Weights,
        cfg: &UnifiedAudioConfig,
        text_hidden: usize,
    ) -> Result<Self, LoadError> {
        Self::load_with(w, cfg, text_hidden, Quant::F32)
    }

    /// Loads with the projection stored as `proj`.
    pub fn load_with(
        w: &Weights,
        cfg: &UnifiedAudioConfig,
        text_hidden: usize,
        proj: Quant,
    ) -> Result<Self, LoadError> {
        Ok(Self {
            embedder: MultimodalEmbedder::load(
                w,
                "model.embed_audio",
                cfg.audio_embed_dim,
                text_hidden,
                cfg.rms_norm_eps,
                proj,
            )?,
            samples_per_token: cfg.samples_per_token(),
            dtype: compute_dtype(w),
        })
    }

    /// Storage of the projection.
    pub fn projection_storage(&self) -> &'static str {
        self.embedder.projection_storage()
    }

    pub fn samples_per_token(&self) -> usize {
        self.samples_per_token
    }

    /// `[n, samples_per_token]` frames -> `[n, text_hidden]`.
    pub fn forward(&self, frames: &Tensor) -> Result<Tensor, ModelError> {
        Ok(self.embedder.forward(&frames.to_dtype(self.dtype)?)?)
    }

    /// Soft tokens of one audio item (16 kHz mono samples), one per 640-sample frame.
    pub fn encode(&self, samples: &[f32], dev: &candle_core::Device) -> Result<Tensor, ModelError> {
        if samples.is_empty() {
            return Err(ModelError::Request("no audio samples".into()));
        }
        let (frames, n) = crate::preprocess::unified::audio_frames(samples, self.samples_per_token);
        let t = Tensor::from_vec(frames, (n, self.samples_per_token), dev)?;
        self.forward(&t)
    }
}
