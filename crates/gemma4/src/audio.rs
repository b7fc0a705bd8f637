//! Gemma 4 audio tower (USM-style conformer, HF modeling_gemma4.py `Gemma4AudioModel`) +
//! `embed_audio`, one clip at a time:
//! two stride-2 3x3 Conv2d (no bias) each followed by LayerNorm (weight, no bias) + ReLU,
//! with the frame mask applied before each conv -> input_proj_linear -> conformer layers
//! (half-step FFN, chunked local attention with relative position logits and soft cap,
//! light causal depthwise conv, half-step FFN, norm) -> output_proj (bias) ->
//! RMSNorm (no scale) -> projection to the text width. Padding tokens are stripped.
//!
//! Attention window as HF 5.24's mask computes it: a query at t sees keys s with
//! `0 <= t - s < context_left - 1` (self + 11 past frames by default) or
//! `0 < s - t < context_right`, and only valid keys.

use candle_core::{DType, Device, Module, Result as CResult, Tensor, D};

use super::clippable::ClippableLinear;
use super::config::AudioConfig;
use super::layers::{Linear, Quant, RmsNorm};
use super::loader::{LoadError, Weights};
use super::ModelError;
use crate::preprocess::mel::{MelFeatures, N_MELS};

#[derive(Debug, Clone)]
struct SubLayer {
    conv: Tensor,
    norm_w: Tensor,
}

#[derive(Debug, Clone)]
struct FeedForward {
    ffw1: ClippableLinear,
    ffw2: ClippableLinear,
    pre: RmsNorm,
    post: RmsNorm,
}

#[derive(Debug, Clone)]
struct Attention {
    q: ClippableLinear,
    k: ClippableLinear,
    v: ClippableLinear,
    post: ClippableLinear,
    relative_k: Linear,
    /// `q_scale * softplus(per_dim_scale)`, `[head_dim]`.
    q_mul: Tensor,
}

#[derive(Debug, Clone)]
struct LightConv {
    start: ClippableLinear,
    end: ClippableLinear,
    /// `[hidden, kernel]`.
    dw: Tensor,
    pre: RmsNorm,
    conv_norm: RmsNorm,
}

#[derive(Debug, Clone)]
struct Layer {
    ff1: FeedForward,
    ff2: FeedForward,
    attn: Attention,
    lconv: LightConv,
    norm_pre_attn: RmsNorm,
    norm_post_attn: RmsNorm,
    norm_out: RmsNorm,
}

/// The audio tower and its multimodal embedder.
#[derive(Debug, Clone)]
pub struct AudioTower {
    sub: [SubLayer; 2],
    input_proj: Linear,
    layers: Vec<Layer>,
    out_w: Linear,
    out_b: Tensor,
    embed_norm: RmsNorm,
    embed_proj: Linear,
    /// `[context_left, hidden]` sinusoidal relative positions (distance ctx..0).
    pos_emb: Tensor,
    cfg: AudioConfig,
    text_hidden: usize,
}

fn silu(x: &Tensor) -> CResult<Tensor> {
    candle_nn::ops::silu(x)
}

impl AudioTower {
    /// Loads `model.audio_tower.*` and `model.embed_audio.*` from a checkpoint-rooted `w`.
    pub fn load(w: &Weights, cfg: &AudioConfig, text_hidden: usize) -> Result<Self, LoadError> {
        Self::load_with(w, cfg, text_hidden, Quant::F32)
    }

    /// Loads with `embed_audio.embedding_projection` stored as `proj`; the tower itself
    /// stays f32.
    pub fn load_with(
        w: &Weights,
        cfg: &AudioConfig,
        text_hidden: usize,
        proj: Quant,
    ) -> Result<Self, LoadError> {
        let at = w.pp("model.audio_tower");
        let hd = cfg.hidden_size;
        let q = Quant::F32;
        let clip = cfg.use_clipped_linears;
        let eps = cfg.rms_norm_eps;
        let ch = &cfg.subsampling_conv_channels;
        if ch.len() != 2 {
            return Err(LoadError::candle(
                "audio config",
                candle_core::Error::Msg(format!("subsampling_conv_channels {ch:?}: need 2")),
            ));
        }
        let sp = at.pp("subsample_conv_projection");
        let sub = [
            SubLayer {
                conv: sp.get_dtype("layer0.conv.weight", &[ch[0], 1, 3, 3], DType::F32)?,
                norm_w: sp.get_dtype("layer0.norm.weight", &[ch[0]], DType::F32)?,
            },
            SubLayer {
                conv: sp.get_dtype("layer1.conv.weight", &[ch[1], ch[0], 3, 3], DType::F32)?,
                norm_w: sp.get_dtype("layer1.norm.weight", &[ch[1]], DType::F32)?,
            },
        ];
        // Frequency bins after two stride-2 convs of the 128 mel bins.
        let f_out = N_MELS.div_ceil(2).div_ceil(2);
        let input_proj = Linear::load(&sp, "input_proj_linear", hd, f_out * ch[1], q)?;
        let nh = cfg.num_attention_heads;
        let dh = hd / nh;
        let q_scale = (dh as f64).powf(-0.5) / std::f64::consts::LN_2;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for i in 0..cfg.num_hidden_layers {
            let l = at.pp(&format!("layers.{i}"));
            let lin = |n: &str, o: usize, i_: usize| ClippableLinear::load(&l, n, o, i_, clip, q);
            let ff = |p: &str| -> Result<FeedForward, LoadError> {
                Ok(FeedForward {
                    ffw1: lin(&format!("{p}.ffw_layer_1"), hd * 4, hd)?,
                    ffw2: lin(&format!("{p}.ffw_layer_2"), hd, hd * 4)?,
                    // The reference builds these with the default eps (1e-6).
                    pre: RmsNorm::load(&l, &format!("{p}.pre_layer_norm"), hd, 1e-6)?,
                    post: RmsNorm::load(&l, &format!("{p}.post_layer_norm"), hd, 1e-6)?,
                })
            };
            let pds = l.get_dtype("self_attn.per_dim_scale", &[dh], DType::F32)?;
            let load_err = |e| LoadError::candle(format!("layers.{i}.self_attn.per_dim_scale"), e);
            // softplus(x) = ln(1 + e^x)
            let softplus = (pds.exp().and_then(|e| e + 1.0))
                .and_then(|t| t.log())
                .map_err(load_err)?;
            let q_mul = (softplus * q_scale).map_err(|e| LoadError::candle("per_dim_scale", e))?;
            let dw = l
                .get_dtype(
                    "lconv1d.depthwise_conv1d.weight",
                    &[hd, 1, cfg.conv_kernel_size],
                    DType::F32,
                )?
                .reshape((hd, cfg.conv_kernel_size))
                .map_err(|e| LoadError::candle("depthwise_conv1d", e))?;
            layers.push(Layer {
                ff1: ff("feed_forward1")?,
                ff2: ff("feed_forward2")?,
                attn: Attention {
                    q: lin("self_attn.q_proj", hd, hd)?,
                    k: lin("self_attn.k_proj", hd, hd)?,
                    v: lin("self_attn.v_proj", hd, hd)?,
                    post: lin("self_attn.post", hd, hd)?,
                    relative_k: Linear::load(&l, "self_attn.relative_k_proj", hd, hd, q)?,
                    q_mul,
                },
                lconv: LightConv {
                    start: lin("lconv1d.linear_start", hd * 2, hd)?,
                    end: lin("lconv1d.linear_end", hd, hd)?,
                    dw,
                    pre: RmsNorm::load(&l, "lconv1d.pre_layer_norm", hd, eps)?,
                    conv_norm: RmsNorm::load(&l, "lconv1d.conv_norm", hd, eps)?,
                },
                norm_pre_attn: RmsNorm::load(&l, "norm_pre_attn", hd, 1e-6)?,
                norm_post_attn: RmsNorm::load(&l, "norm_post_attn", hd, 1e-6)?,
                norm_out: RmsNorm::load(&l, "norm_out", hd, 1e-6)?,
            });
        }
        let od = cfg.output_proj_dims;
        let out_w = Linear::load(&at, "output_proj", od, hd, q)?;
        let out_b = at.get_dtype("output_proj.bias", &[od], DType::F32)?;
        let ea = w.pp("model.embed_audio");
        let embed_proj = Linear::load(&ea, "embedding_projection", text_hidden, od, proj)?;
        let pos_emb = rel_pos_table(cfg, w.device())
            .map_err(|e| LoadError::candle("audio relative positions", e))?;
        Ok(Self {
            sub,
            input_proj,
            layers,
            out_w,
            out_b,
            embed_norm: RmsNorm::without_scale(eps),
            embed_proj,
            pos_emb,
            cfg: cfg.clone(),
            text_hidden,
        })
    }

    pub fn text_hidden(&self) -> usize {
        self.text_hidden
    }

    fn device(&self) -> &Device {
        self.out_b.device()
    }

    /// Storage of `embed_audio.embedding_projection`.
    pub fn projection_storage(&self) -> &'static str {
        self.embed_proj.storage()
    }

    /// Encodes one clip's features to soft tokens `[n_valid_tokens, text_hidden]`.
    pub fn encode(&self, mel: &MelFeatures) -> Result<Tensor, ModelError> {
        let t = Tensor::from_slice(&mel.data, (mel.n_frames, N_MELS), self.device())?;
        self.forward(&t, &mel.mask)
    }

    /// `mel` `[frames, 128]`, `mask` true = valid frame -> `[n_valid_tokens, text_hidden]`.
    pub fn forward(&self, mel: &Tensor, mask: &[bool]) -> Result<Tensor, ModelError> {
        let (h, valid) = self.forward_tower(mel, mask)?;
        let keep: Vec<u32> = (0..valid.len() as u32)
            .filter(|&i| valid[i as usize])
            .collect();
        let idx = Tensor::from_slice(&keep, keep.len(), self.device())?;
        let h = h.index_select(&idx, 0)?;
        Ok(self.embed_proj.forward(&self.embed_norm.forward(&h)?)?)
    }

    /// The tower alone (after output_proj), all tokens `[T', output_proj_dims]`, plus the
    /// token validity mask (true = valid).
    pub fn forward_tower(
        &self,
        mel: &Tensor,
        mask: &[bool],
    ) -> Result<(Tensor, Vec<bool>), ModelError> {
        let (frames, bins) = mel.dims2()?;
        if frames != mask.len() || bins != N_MELS || frames == 0 {
            return Err(ModelError::Request(format!(
                "audio: mel {frames}x{bins} with {} mask entries (need [frames, {N_MELS}])",
                mask.len()
            )));
        }
        let dev = self.device().clone();
        let mut x = mel.to_dtype(DType::F32)?.reshape((1, 1, frames, bins))?;
        let mut m: Vec<bool> = mask.to_vec();
        let eps = self.cfg.rms_norm_eps;
        for s in &self.sub {
            let mf: Vec<f32> = m.iter().map(|&b| if b { 1.0 } else { 0.0 }).collect();
            let mt = Tensor::from_vec(mf, (1, 1, m.len(), 1), &dev)?;
            x = x.broadcast_mul(&mt)?;
            x = x.conv2d(&s.conv, 1, 2, 1, 1)?;
            // LayerNorm over channels (weight, no bias), then ReLU.
            // Contiguous channels-last: reductions over a strided last dim are slow in candle.
            let xc = x.permute((0, 2, 3, 1))?.contiguous()?;
            let mean = xc.mean_keepdim(D::Minus1)?;
            let xc = xc.broadcast_sub(&mean)?;
            let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
            let xc = xc
                .broadcast_div(&(var + eps)?.sqrt()?)?
                .broadcast_mul(&s.norm_w)?;
            x = xc.relu()?.permute((0, 3, 1, 2))?.contiguous()?;
            m = m.iter().step_by(2).copied().collect();
        }
        let (_, c, t, f) = x.dims4()?;
        let x = x.permute((0, 2, 3, 1))?.reshape((t, f * c))?;
        let mut h = self.input_proj.forward(&x)?;
        let attn_mask = self.attention_mask(&m, &dev)?;
        let gc = self.cfg.gradient_clipping;
        for layer in &self.layers {
            h = layer.ff1.forward(&h, gc, self.cfg.residual_weight)?;
            let r = h.clone();
            let a = layer.norm_pre_attn.forward(&h.clamp(-gc, gc)?)?;
            let a = layer
                .attn
                .forward(&a, &self.pos_emb, &attn_mask, &self.cfg)?;
            h = (layer.norm_post_attn.forward(&a.clamp(-gc, gc)?)? + r)?;
            h = layer.lconv.forward(&h, gc)?;
            h = layer.ff2.forward(&h, gc, self.cfg.residual_weight)?;
            h = layer.norm_out.forward(&h.clamp(-gc, gc)?)?;
        }
        let y = self.out_w.forward(&h)?.broadcast_add(&self.out_b)?;
        Ok((y, m))
    }

    /// Blocked additive-free mask `[n_blocks, chunk, context]`: 1.0 = masked.
    fn attention_mask(&self, valid: &[bool], dev: &Device) -> CResult<Tensor> {
        let c = self.cfg.attention_chunk_size;
        let past = self.cfg.attention_context_left.saturating_sub(1);
        let fut = self.cfg.attention_context_right;
        let ctx = c + past + fut;
        let t = valid.len();
        let nb = t.div_ceil(c);
        let mut v = vec![1f32; nb * c * ctx];
        for b in 0..nb {
            for i in 0..c {
                let q = b * c + i;
                for j in 0..ctx {
                    // key index: block start - past + j
                    let k = (b * c + j) as i64 - past as i64;
                    if k < 0 || k as usize >= t || q >= t || !valid[k as usize] {
                        continue;
                    }
                    let dist = q as i64 - k;
                    let ok = (dist >= 0 && dist < past as i64) || (dist < 0 && -dist < fut as i64);
                    if ok {
                        v[(b * c + i) * ctx + j] = 0.0;
                    }
                }
            }
        }
        Tensor::from_vec(v, (nb, c, ctx), dev)
    }
}

/// `Gemma4AudioRelPositionalEncoding`: positions `ctx/2 .. 0`, `[sin..., cos...]`.
fn rel_pos_table(cfg: &AudioConfig, dev: &Device) -> CResult<Tensor> {
    let ctx =
        cfg.attention_chunk_size + cfg.attention_context_left - 1 + cfg.attention_context_right;
    let n_pos = ctx / 2 + 1;
    let hd = cfg.hidden_size;
    let nts = hd / 2;
    let inc = (10000f64).ln() / (nts.saturating_sub(1).max(1)) as f64;
    let inv: Vec<f32> = (0..nts).map(|i| ((i as f64) * -inc).exp() as f32).collect();
    let mut v = Vec::with_capacity(n_pos * hd);
    for p in (0..n_pos).rev() {
        let row: Vec<f32> = inv.iter().map(|f| p as f32 * f).collect();
        v.extend(row.iter().map(|a| a.sin()));
        v.extend(row.iter().map(|a| a.cos()));
    }
    Tensor::from_vec(v, (n_pos, hd), dev)
}

impl FeedForward {
    fn forward(&self, x: &Tensor, gc: f64, scale: f64) -> CResult<Tensor> {
        let h = self.pre.forward(&x.clamp(-gc, gc)?)?;
        let h = self.ffw2.forward(&silu(&self.ffw1.forward(&h)?)?)?;
        let h = self.post.forward(&h.clamp(-gc, gc)?)?;
        (h * scale)? + x
    }
}

impl LightConv {
    fn forward(&self, x: &Tensor, gc: f64) -> CResult<Tensor> {
        let (t, hd) = x.dims2()?;
        let h = self.start.forward(&self.pre.forward(x)?)?;
        // GLU: first half * sigmoid(second half).
        let h = (h.narrow(1, 0, hd)? * candle_nn::ops::sigmoid(&h.narrow(1, hd, hd)?)?)?;
        // Causal depthwise conv: left-pad kernel-1 zeros.
        let kw = self.dw.dim(1)?;
        let padded = Tensor::cat(
            &[Tensor::zeros((kw - 1, hd), DType::F32, x.device())?, h],
            0,
        )?;
        let mut acc = Tensor::zeros((t, hd), DType::F32, x.device())?;
        for j in 0..kw {
            let wj = self.dw.narrow(1, j, 1)?.reshape((1, hd))?;
            acc = (acc + padded.narrow(0, j, t)?.broadcast_mul(&wj)?)?;
        }
        let h = self.conv_norm.forward(&acc.clamp(-gc, gc)?)?;
        let h = self.end.forward(&silu(&h)?)?;
        h + x
    }
}

impl Attention {
    fn forward(
        &self,
        x: &Tensor,
        pos_emb: &Tensor,
        mask: &Tensor,
        cfg: &AudioConfig,
    ) -> CResult<Tensor> {
        let (t, hd) = x.dims2()?;
        let nh = cfg.num_attention_heads;
        let dh = hd / nh;
        let c = cfg.attention_chunk_size;
        let past = cfg.attention_context_left.saturating_sub(1);
        let fut = cfg.attention_context_right;
        let ctx = c + past + fut;
        let nb = t.div_ceil(c);
        let dev = x.device();
        let k_scale = (1.0 + std::f64::consts::E).ln() / std::f64::consts::LN_2;
        let q = self
            .q
            .forward(x)?
            .reshape((t, nh, dh))?
            .broadcast_mul(&self.q_mul)?;
        let k = (self.k.forward(x)?.reshape((t, nh, dh))? * k_scale)?;
        let v = self.v.forward(x)?.reshape((t, nh, dh))?;
        // Queries in blocks: [nh, nb, c, dh].
        let qb = Tensor::cat(
            &[q, Tensor::zeros((nb * c - t, nh, dh), DType::F32, dev)?],
            0,
        )?
        .reshape((nb, c, nh, dh))?
        .permute((2, 0, 1, 3))?
        .contiguous()?;
        // Key/value context per block: padded sequence gathered at block_start + j.
        let pad_r = fut + c - 1;
        let ctx_of = |s: &Tensor| -> CResult<Tensor> {
            let sp = Tensor::cat(
                &[
                    Tensor::zeros((past, nh, dh), DType::F32, dev)?,
                    s.clone(),
                    Tensor::zeros((pad_r, nh, dh), DType::F32, dev)?,
                ],
                0,
            )?;
            let idx: Vec<u32> = (0..nb)
                .flat_map(|b| (0..ctx).map(move |j| (b * c + j) as u32))
                .collect();
            let idx = Tensor::from_vec(idx, nb * ctx, dev)?;
            sp.index_select(&idx, 0)?
                .reshape((nb, ctx, nh, dh))?
                .permute((2, 0, 1, 3))?
                .contiguous()
        };
        let kc = ctx_of(&k)?; // [nh, nb, ctx, dh]
        let vc = ctx_of(&v)?;
        let ac = qb.matmul(&kc.transpose(2, 3)?.contiguous()?)?; // [nh, nb, c, ctx]
        let n_pos = pos_emb.dim(0)?;
        let rk = self
            .relative_k
            .forward(pos_emb)?
            .reshape((n_pos, nh, dh))?
            .permute((1, 2, 0))?
            .contiguous()?; // [nh, dh, n_pos]
        let bd = qb
            .reshape((nh, nb * c, dh))?
            .matmul(&rk)?
            .reshape((nh, nb, c, n_pos))?;
        // Relative shift (Transformer-XL appendix B), as the reference does it.
        let bd = Tensor::cat(
            &[
                bd,
                Tensor::zeros((nh, nb, c, ctx + 1 - n_pos), DType::F32, dev)?,
            ],
            3,
        )?
        .reshape((nh, nb, c * (ctx + 1)))?
        .narrow(2, 0, c * ctx)?
        .reshape((nh, nb, c, ctx))?;
        let logits = (ac + bd)?;
        let cap = cfg.attention_logit_cap;
        let logits = ((logits / cap)?.tanh()? * cap)?;
        let m = mask.unsqueeze(0)?.broadcast_as(logits.shape())?;
        let fill = Tensor::full(
            cfg.attention_invalid_logits_value as f32,
            logits.shape(),
            dev,
        )?;
        let logits = m.ne(0f32)?.where_cond(&fill, &logits)?;
        let probs = candle_nn::ops::softmax_last_dim(&logits)?;
        let o = probs.matmul(&vc)?; // [nh, nb, c, dh]
        let o = o
            .permute((1, 2, 0, 3))?
            .reshape((nb * c, nh * dh))?
            .narrow(0, 0, t)?;
        self.post.forward(&o)
    }
}
