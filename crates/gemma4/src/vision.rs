//! Gemma 4 vision tower + `embed_vision` (HF modeling_gemma4.py `Gemma4VisionModel`,
//! `Gemma4MultimodalEmbedder`), one image at a time without padding rows:
//! patch embedder (`2*(x-0.5)` -> input_proj + x/y position tables) -> encoder layers
//! (RMSNorm sandwich, q/k norms, axial 2D RoPE, bidirectional attention with scale 1.0,
//! v-norm without weight, gated gelu-tanh MLP) -> 3x3 average pooling by patch position ->
//! `* sqrt(hidden)` -> standardize -> RMSNorm (no scale) -> projection to the text width.
//!
//! Padding rows are never materialised: the reference masks them out of attention and
//! pooling, so processing only real patches gives the same soft tokens.

use candle_core::{DType, Device, Module, Result as CResult, Tensor, D};

use super::clippable::{ClippableLinear, VisionQuant};
use super::config::VisionConfig;
use super::layers::{gelu_tanh, Linear, Quant, RmsNorm};
use super::loader::{LoadError, Weights};
use super::ModelError;
use crate::preprocess::image::ImageInput;

/// Score elements per attention chunk (queries x keys x heads): a 16 MiB f32 score buffer
/// that stays in the last-level cache between the two matmuls and the softmax, and that
/// the allocator reuses. 256 MiB chunks (64M elements, before) were written, read three
/// times and page-faulted in fresh at every layer: the int8 tower took (min of 3, one
/// process alternating, 2-core EPYC under load ~6) 3006 ms at 70 tokens and 21424 ms at
/// 280 with them, 2935 / 17183 ms at 4M and 1749 / 18756 ms at 1M elements.
const MAX_SCORE_ELEMS: usize = 4 << 20;

#[derive(Debug, Clone)]
struct Attention {
    q: ClippableLinear,
    k: ClippableLinear,
    v: ClippableLinear,
    o: ClippableLinear,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    v_norm: RmsNorm,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

#[derive(Debug, Clone)]
struct Mlp {
    gate: ClippableLinear,
    up: ClippableLinear,
    down: ClippableLinear,
}

#[derive(Debug, Clone)]
struct Layer {
    attn: Attention,
    mlp: Mlp,
    input_ln: RmsNorm,
    post_attn_ln: RmsNorm,
    pre_ff_ln: RmsNorm,
    post_ff_ln: RmsNorm,
}

/// The vision tower and its multimodal embedder.
#[derive(Debug, Clone)]
pub struct VisionTower {
    input_proj: Linear,
    /// `[2, position_embedding_size, hidden]`: x table, y table.
    pos_table: Tensor,
    layers: Vec<Layer>,
    std: Option<(Tensor, Tensor)>,
    embed_norm: RmsNorm,
    embed_proj: Linear,
    /// Axial RoPE inverse frequencies (`head_dim / 4` of them).
    inv_freq: Vec<f32>,
    cfg: VisionConfig,
    text_hidden: usize,
}

impl VisionTower {
    /// Loads `model.vision_tower.*` and `model.embed_vision.*` from a checkpoint-rooted `w`.
    pub fn load(w: &Weights, cfg: &VisionConfig, text_hidden: usize) -> Result<Self, LoadError> {
        Self::load_with(w, cfg, text_hidden, Quant::F32)
    }

    /// Loads with `embed_vision.embedding_projection` stored as `proj`; the tower itself
    /// stays f32.
    pub fn load_with(
        w: &Weights,
        cfg: &VisionConfig,
        text_hidden: usize,
        proj: Quant,
    ) -> Result<Self, LoadError> {
        Self::load_quant(w, cfg, text_hidden, proj, VisionQuant::F32)
    }

    /// Loads with the projection stored as `proj` and the encoder layers' linears at
    /// `vq` (the patch embedding stays f32: one small matmul per frame).
    pub fn load_quant(
        w: &Weights,
        cfg: &VisionConfig,
        text_hidden: usize,
        proj: Quant,
        vq: VisionQuant,
    ) -> Result<Self, LoadError> {
        let vt = w.pp("model.vision_tower");
        let hd = cfg.hidden_size;
        let p = cfg.patch_size;
        let clip = cfg.use_clipped_linears;
        let q = Quant::F32;
        let input_proj = Linear::load(&vt, "patch_embedder.input_proj", hd, 3 * p * p, q)?;
        let pos_table = vt.get_dtype(
            "patch_embedder.position_embedding_table",
            &[2, cfg.position_embedding_size, hd],
            DType::F32,
        )?;
        let (nh, nkv, dh) = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.head_dim,
        );
        let eps = cfg.rms_norm_eps;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let l = vt.pp(&format!("encoder.layers.{i}"));
            let lin =
                |n: &str, o: usize, i_: usize| ClippableLinear::load_vision(&l, n, o, i_, clip, vq);
            layers.push(Layer {
                attn: Attention {
                    q: lin("self_attn.q_proj", nh * dh, hd)?,
                    k: lin("self_attn.k_proj", nkv * dh, hd)?,
                    v: lin("self_attn.v_proj", nkv * dh, hd)?,
                    o: lin("self_attn.o_proj", hd, nh * dh)?,
                    q_norm: RmsNorm::load(&l, "self_attn.q_norm", dh, eps)?,
                    k_norm: RmsNorm::load(&l, "self_attn.k_norm", dh, eps)?,
                    v_norm: RmsNorm::without_scale(eps),
                    heads: nh,
                    kv_heads: nkv,
                    head_dim: dh,
                },
                mlp: Mlp {
                    gate: lin("mlp.gate_proj", cfg.intermediate_size, hd)?,
                    up: lin("mlp.up_proj", cfg.intermediate_size, hd)?,
                    down: lin("mlp.down_proj", hd, cfg.intermediate_size)?,
                },
                input_ln: RmsNorm::load(&l, "input_layernorm", hd, eps)?,
                post_attn_ln: RmsNorm::load(&l, "post_attention_layernorm", hd, eps)?,
                pre_ff_ln: RmsNorm::load(&l, "pre_feedforward_layernorm", hd, eps)?,
                post_ff_ln: RmsNorm::load(&l, "post_feedforward_layernorm", hd, eps)?,
            });
        }
        let std = if cfg.standardize {
            Some((
                vt.get_dtype("std_bias", &[hd], DType::F32)?,
                vt.get_dtype("std_scale", &[hd], DType::F32)?,
            ))
        } else {
            None
        };
        let ev = w.pp("model.embed_vision");
        let embed_proj = Linear::load(&ev, "embedding_projection", text_hidden, hd, proj)?;
        let spatial = dh / 2;
        let theta = cfg.rope_theta();
        let inv_freq = (0..spatial)
            .step_by(2)
            .map(|i| (1.0 / theta.powf(i as f64 / spatial as f64)) as f32)
            .collect();
        Ok(Self {
            input_proj,
            pos_table,
            layers,
            std,
            embed_norm: RmsNorm::without_scale(eps),
            embed_proj,
            inv_freq,
            cfg: cfg.clone(),
            text_hidden,
        })
    }

    pub fn text_hidden(&self) -> usize {
        self.text_hidden
    }

    fn device(&self) -> &Device {
        self.pos_table.device()
    }

    /// Encodes one preprocessed image to soft tokens `[n_soft_tokens, text_hidden]`.
    pub fn encode(&self, img: &ImageInput) -> Result<Tensor, ModelError> {
        let row = 3 * self.cfg.patch_size * self.cfg.patch_size;
        let pv = Tensor::from_slice(&img.pixel_values, (img.n_patches, row), self.device())?;
        self.forward(&pv, &img.positions)
    }

    /// Storage of the encoder linears (`f32`, or `int8` with [`VisionQuant::Int8`]).
    pub fn encoder_storage(&self) -> &'static str {
        self.layers
            .first()
            .map(|l| l.mlp.gate.storage())
            .unwrap_or("f32")
    }

    /// Storage of `embed_vision.embedding_projection`.
    pub fn projection_storage(&self) -> &'static str {
        self.embed_proj.storage()
    }

    /// `pixel_values` `[n_patches, 3*p*p]` in [0, 1] (real patches only), `positions` (x, y)
    /// per patch -> soft tokens `[n_patches / k^2, text_hidden]` after `embed_vision`.
    pub fn forward(
        &self,
        pixel_values: &Tensor,
        positions: &[[i64; 2]],
    ) -> Result<Tensor, ModelError> {
        let pooled = self.forward_tower(pixel_values, positions)?;
        let y = self
            .embed_proj
            .forward(&self.embed_norm.forward(&pooled)?)?;
        Ok(y)
    }

    /// The tower alone (after pooling, scaling and standardize): `[n_soft, hidden]`.
    pub fn forward_tower(
        &self,
        pixel_values: &Tensor,
        positions: &[[i64; 2]],
    ) -> Result<Tensor, ModelError> {
        let n = positions.len();
        let (rows, _) = pixel_values.dims2()?;
        let k = self.cfg.pooling_kernel_size;
        if rows != n || n == 0 || !n.is_multiple_of(k * k) {
            return Err(ModelError::Request(format!(
                "vision: {rows} patch rows, {n} positions (need equal, a multiple of {})",
                k * k
            )));
        }
        let max_pos = self.cfg.position_embedding_size as i64;
        if positions
            .iter()
            .any(|p| p[0] < 0 || p[1] < 0 || p[0] >= max_pos || p[1] >= max_pos)
        {
            return Err(ModelError::Request(format!(
                "vision: patch position outside 0..{max_pos}"
            )));
        }
        let dev = self.device().clone();
        let pv = pixel_values.to_dtype(DType::F32)?;
        let x = ((pv - 0.5)? * 2.0)?;
        let mut h = self.input_proj.forward(&x)?;
        let xs: Vec<u32> = positions.iter().map(|p| p[0] as u32).collect();
        let ys: Vec<u32> = positions.iter().map(|p| p[1] as u32).collect();
        let xs_t = Tensor::from_slice(&xs, n, &dev)?;
        let ys_t = Tensor::from_slice(&ys, n, &dev)?;
        let xe = self.pos_table.get(0)?.index_select(&xs_t, 0)?;
        let ye = self.pos_table.get(1)?.index_select(&ys_t, 0)?;
        h = (h + (xe + ye)?)?;

        let (cos, sin) = self.rope_tables(positions, &dev)?;
        for layer in &self.layers {
            let r = h.clone();
            let a = layer
                .attn
                .forward(&layer.input_ln.forward(&h)?, &cos, &sin)?;
            h = (r + layer.post_attn_ln.forward(&a)?)?;
            let r = h.clone();
            let m = layer.mlp.forward(&layer.pre_ff_ln.forward(&h)?)?;
            h = (r + layer.post_ff_ln.forward(&m)?)?;
        }

        // Average pooling over k x k patch blocks, indexed as the reference does:
        // (x/k) + (max_x+1)/k * (y/k).
        let n_out = n / (k * k);
        let kk = k as i64;
        let max_x = positions.iter().map(|p| p[0]).max().unwrap_or(0) + 1;
        let idx: Vec<u32> = positions
            .iter()
            .map(|p| (p[0] / kk + (max_x / kk) * (p[1] / kk)) as u32)
            .collect();
        if idx.iter().any(|&i| i as usize >= n_out) {
            return Err(ModelError::Request(
                "vision: patch positions do not form a full grid".into(),
            ));
        }
        let idx_t = Tensor::from_slice(&idx, n, &dev)?;
        let zeros = Tensor::zeros((n_out, self.cfg.hidden_size), DType::F32, &dev)?;
        let pooled = (zeros.index_add(&idx_t, &h, 0)? / (k * k) as f64)?;
        let mut out = (pooled * (self.cfg.hidden_size as f64).sqrt())?;
        if let Some((bias, scale)) = &self.std {
            out = out.broadcast_sub(bias)?.broadcast_mul(scale)?;
        }
        Ok(out)
    }

    /// cos/sin `[n, head_dim]` laid out [x, x, y, y] (each `head_dim/4` wide).
    fn rope_tables(&self, positions: &[[i64; 2]], dev: &Device) -> CResult<(Tensor, Tensor)> {
        let q = self.inv_freq.len();
        let dh = 4 * q;
        let mut c = Vec::with_capacity(positions.len() * dh);
        let mut s = Vec::with_capacity(positions.len() * dh);
        for p in positions {
            for &coord in p.iter() {
                for _ in 0..2 {
                    for f in &self.inv_freq {
                        let a = coord as f32 * f;
                        c.push(a.cos());
                        s.push(a.sin());
                    }
                }
            }
        }
        let n = positions.len();
        Ok((
            Tensor::from_vec(c, (n, 1, dh), dev)?,
            Tensor::from_vec(s, (n, 1, dh), dev)?,
        ))
    }
}

/// Rotates each half of the head dim separately (`apply_multidimensional_rope`, ndim 2).
fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> CResult<Tensor> {
    let dh = x.dim(D::Minus1)?;
    let q = dh / 4;
    let p = |i: usize| x.narrow(D::Minus1, i * q, q);
    let rot = Tensor::cat(&[p(1)?.neg()?, p(0)?, p(3)?.neg()?, p(2)?], D::Minus1)?;
    x.broadcast_mul(cos)? + rot.broadcast_mul(sin)?
}

impl Attention {
    fn forward(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> CResult<Tensor> {
        let n = x.dim(0)?;
        let (nh, nkv, dh) = (self.heads, self.kv_heads, self.head_dim);
        let q = self
            .q_norm
            .forward(&self.q.forward(x)?.reshape((n, nh, dh))?)?;
        let q = rope(&q, cos, sin)?.transpose(0, 1)?.contiguous()?;
        let k = self
            .k_norm
            .forward(&self.k.forward(x)?.reshape((n, nkv, dh))?)?;
        let k = rope(&k, cos, sin)?.transpose(0, 1)?.contiguous()?;
        let v = self
            .v_norm
            .forward(&self.v.forward(x)?.reshape((n, nkv, dh))?)?;
        let v = v.transpose(0, 1)?.contiguous()?;
        let (k, v) = if nkv != nh {
            let rep = nh / nkv;
            let expand = |t: &Tensor| -> CResult<Tensor> {
                t.unsqueeze(1)?
                    .broadcast_as((nkv, rep, n, dh))?
                    .reshape((nh, n, dh))
            };
            (expand(&k)?, expand(&v)?)
        } else {
            (k, v)
        };
        let kt = k.transpose(1, 2)?.contiguous()?;
        // Scaling is 1.0 (q/k norms stand in for 1/sqrt(d)).
        let chunk = (MAX_SCORE_ELEMS / (n * nh).max(1)).clamp(1, n);
        let mut outs = Vec::with_capacity(n.div_ceil(chunk));
        let mut start = 0;
        while start < n {
            let len = chunk.min(n - start);
            let qc = q.narrow(1, start, len)?;
            let scores = qc.matmul(&kt)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            outs.push(probs.matmul(&v)?);
            start += len;
        }
        let o = Tensor::cat(&outs, 1)?
            .transpose(0, 1)?
            .reshape((n, nh * dh))?;
        self.o.forward(&o)
    }
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        let g = gelu_tanh(&self.gate.forward(x)?)?;
        self.down.forward(&(g * self.up.forward(x)?)?)
    }
}
