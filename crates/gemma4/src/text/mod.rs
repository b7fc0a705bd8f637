//! The Gemma 4 text decoder (`Gemma4TextModel` + tied `lm_head`).
//!
//! Faithful to `modeling_gemma4.py` (transformers 5.24.0):
//! - RMSNorm with weight `w`; q/k norms with scale, v norm without; attention scaling 1.0;
//! - RoPE per layer type, computed in f32 from positions (no max-length tables):
//!   `default` on sliding layers, `proportional` (partial rotary, zero frequencies for the
//!   non-rotated pairs) on full layers;
//! - sliding layers see exactly `W` keys (`q - W < k <= q`);
//! - per-layer embeddings (PLE), `layer_scalar`, KV sharing for the last
//!   `num_kv_shared_layers` layers, K=V on full layers when `attention_k_eq_v`,
//!   double-wide MLP on KV-shared layers when `use_double_wide_mlp`;
//! - final logit soft-capping.
//!
//! Batching is ragged: the rows of several sequences are packed into one `[T, hidden]`
//! tensor, so all projections run as one GEMM while attention runs per sequence against its
//! own cache. No padding is ever attended, so a batch computes what single runs compute.

use candle_core::{DType, Device, Module, Result as CResult, Tensor, D};

use super::config::{KvSource, LayerSpec, LayerType, TextConfig};
use super::layers::{
    gelu_tanh, round_through, softcap, upcast_dtype, Embedding, KeepF16, Linear, Quant, RmsNorm,
};
use super::loader::{LoadError, Weights};

mod attention;
mod cache;
mod load;
pub use attention::build_mask;
pub use cache::{sliding_slack, LayerCache, SeqCache};

/// Prefix of the decoder tensors in the official checkpoints.
pub const TEXT_PREFIX: &str = "model.language_model";

/// Load-time options.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    /// Activation dtype (f32 on CPU).
    pub dtype: DType,
    /// Storage of decoder linears, the token table and the PLE table.
    pub quant: Quant,
    /// Parts kept at f16 although `quant` is a block type (token table, media projections).
    pub keep_f16: KeepF16,
    /// Largest number of positions one sequence may reach (prompt + generated); full-layer
    /// caches grow up to this, never beyond.
    pub max_context: usize,
    /// Precision of the E2B/E4B vision tower's encoder linears (default f32).
    pub vision_quant: crate::clippable::VisionQuant,
}

impl LoadOptions {
    /// Storage of the token table (and its tied lm_head) and of the image/audio projections.
    pub fn projection_quant(&self) -> Quant {
        self.keep_f16.projection_quant(self.quant)
    }
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            dtype: DType::F32,
            quant: Quant::F32,
            keep_f16: KeepF16::None,
            max_context: 8192,
            vision_quant: crate::clippable::VisionQuant::F32,
        }
    }
}

struct Attention {
    spec: LayerSpec,
    num_heads: usize,
    q_proj: Linear,
    q_norm: RmsNorm,
    /// None on KV-shared layers.
    k_proj: Option<Linear>,
    /// None on KV-shared layers and with K=V.
    v_proj: Option<Linear>,
    k_norm: Option<RmsNorm>,
    v_norm: RmsNorm,
    o_proj: Linear,
}

struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl Mlp {
    fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        let g = gelu_tanh(&self.gate.forward(x)?)?;
        self.down.forward(&(g * self.up.forward(x)?)?)
    }
}

struct PleLayer {
    gate: Linear,
    proj: Linear,
    norm: RmsNorm,
}

struct DecoderLayer {
    attn: Attention,
    mlp: Mlp,
    input_norm: RmsNorm,
    post_attn_norm: RmsNorm,
    pre_ff_norm: RmsNorm,
    post_ff_norm: RmsNorm,
    ple: Option<PleLayer>,
    layer_scalar: f64,
}

struct Ple {
    table: Embedding,
    /// `sqrt(ple_dim)`, rounded through the table dtype as the reference does.
    table_scale: f64,
    model_projection: Linear,
    projection_norm: RmsNorm,
    dim: usize,
}

/// Which rows of a segment need logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitRows {
    /// No logits (intermediate prefill chunk).
    None,
    /// The last row only.
    Last,
    /// Every row (parity tests).
    All,
}

/// One sequence's slice of a packed forward.
pub struct Segment<'a> {
    pub cache: &'a mut SeqCache,
    /// Rows of this sequence in the packed input, in order.
    pub len: usize,
    pub logits: LogitRows,
    /// Vision block id per row (`-1` for non-vision) for the vision-bidirectional mask;
    /// None = causal only.
    pub block_ids: Option<Vec<i64>>,
}

/// Keys, values (`[kv_heads, len, head_dim]`) and the position of the first key.
type KvView = (Tensor, Tensor, usize);

/// Query rows of one segment during a forward.
struct QueryRows {
    start: usize,
    positions: Vec<usize>,
}

/// The decoder.
pub struct TextModel {
    cfg: TextConfig,
    specs: Vec<LayerSpec>,
    embed: Embedding,
    embed_scale: f64,
    ple: Option<Ple>,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    device: Device,
    dtype: DType,
    max_context: usize,
    vision_mask: VisionMask,
    /// Most bytes of f32 attention scores per block of query rows (`SCORE_BLOCK_BYTES`).
    score_block_bytes: usize,
    /// Unique per loaded decoder in this process (see [`TextModel::instance_id`]).
    instance: u64,
}

/// Source of [`TextModel::instance_id`]s.
static NEXT_INSTANCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// How image/video tokens of one block attend to each other
/// (`use_bidirectional_attention = "vision"`); text tokens are always causal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VisionMask {
    /// Plain causal (+ window) masks everywhere.
    Causal,
    /// `create_masks_for_vision_model` (used by `Gemma4Model`, i.e. the `gemma4` 26B/31B):
    /// sliding layers `AND(window, OR(causal, same block))`, full layers causal.
    WindowedBlock,
    /// What `Gemma4UnifiedModel.forward` builds on its default path (a plain forward and
    /// `generate()` with the default dynamic cache, transformers 5.24):
    /// every layer `OR(causal [+ window], same block)`, so a vision token sees its whole
    /// image on every layer, beyond the window.
    BlockEverywhere,
}

impl TextModel {
    /// Identifies this loaded decoder within the process: K/V kept for one model is never
    /// handed to another (the prefix cache keys its entries by it).
    pub fn instance_id(&self) -> u64 {
        self.instance
    }

    pub fn config(&self) -> &TextConfig {
        &self.cfg
    }

    pub fn specs(&self) -> &[LayerSpec] {
        &self.specs
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn max_context(&self) -> usize {
        self.max_context
    }

    /// Whether vision tokens of one image see each other (then prefill never splits an
    /// image across forwards).
    pub fn bidirectional_vision(&self) -> bool {
        self.vision_mask != VisionMask::Causal
    }

    pub fn vision_mask(&self) -> VisionMask {
        self.vision_mask
    }

    /// Chooses the vision mask variant (the architecture decides; see [`VisionMask`]). A
    /// config without `use_bidirectional_attention = "vision"` stays causal.
    /// Caps the f32 attention scores of one block of query rows (default 64 MiB); smaller
    /// caps trade speed for peak memory, and tests use them to cut prompts into many blocks.
    pub fn set_score_block_bytes(&mut self, bytes: usize) {
        self.score_block_bytes = bytes.max(1);
    }

    pub fn set_vision_mask(&mut self, mask: VisionMask) {
        if self.vision_mask != VisionMask::Causal {
            self.vision_mask = mask;
        }
    }

    /// Bytes held by all weights of the decoder.
    pub fn weight_bytes(&self) -> usize {
        let mut n = self.embed.size_in_bytes() + self.lm_head_extra_bytes();
        if let Some(p) = &self.ple {
            n += p.table.size_in_bytes() + p.model_projection.size_in_bytes();
        }
        for l in &self.layers {
            let a = &l.attn;
            n += a.q_proj.size_in_bytes() + a.o_proj.size_in_bytes();
            n += a.k_proj.as_ref().map(Linear::size_in_bytes).unwrap_or(0);
            n += a.v_proj.as_ref().map(Linear::size_in_bytes).unwrap_or(0);
            n += l.mlp.gate.size_in_bytes() + l.mlp.up.size_in_bytes() + l.mlp.down.size_in_bytes();
            if let Some(p) = &l.ple {
                n += p.gate.size_in_bytes() + p.proj.size_in_bytes();
            }
        }
        n
    }

    /// Weight bytes one decode step reads: everything but the PLE table, of which only one
    /// row per token is touched.
    pub fn decode_bytes_per_token(&self) -> usize {
        let ple = self
            .ple
            .as_ref()
            .map(|p| p.table.size_in_bytes())
            .unwrap_or(0);
        self.weight_bytes() - ple
    }

    fn lm_head_extra_bytes(&self) -> usize {
        match self.embed {
            // Dense and single quantized tables share storage with the head.
            Embedding::Dense(_) | Embedding::Quantized(_) => 0,
            Embedding::Chunked { .. } => self.lm_head.size_in_bytes(),
        }
    }

    /// A fresh, empty cache for one sequence.
    pub fn new_cache(&self) -> SeqCache {
        let layers = self
            .specs
            .iter()
            .map(|s| match s.kv {
                KvSource::Own => Some(LayerCache::new(s.sliding_window, self.max_context)),
                KvSource::Shared(_) => None,
            })
            .collect();
        SeqCache { layers, pos: 0 }
    }

    /// Storage of the token table and of the (tied) lm_head: `f32`, `f16`, `q8_0`, `q4k`.
    pub fn table_storage(&self) -> (&'static str, &'static str) {
        (self.embed.storage(), self.lm_head.storage())
    }

    /// Storage of layer `i`'s MLP gate projection (a representative decoder linear).
    pub fn decoder_linear_storage(&self, i: usize) -> Option<&'static str> {
        self.layers.get(i).map(|l| l.mlp.gate.storage())
    }

    /// Scaled token embeddings `[n, hidden]` (`embed_tokens(ids) * sqrt(hidden)`).
    pub fn embed_tokens(&self, ids: &[u32]) -> CResult<Tensor> {
        self.embed.lookup(ids, &self.device, self.dtype)? * self.embed_scale
    }

    /// The token-identity half of PLE, `[n, layers, ple_dim]`; None without PLE. Callers pass
    /// the pad id at multimodal positions.
    pub fn ple_token_inputs(&self, ids: &[u32]) -> CResult<Option<Tensor>> {
        let Some(p) = &self.ple else {
            return Ok(None);
        };
        let t = (p.table.lookup(ids, &self.device, self.dtype)? * p.table_scale)?;
        Ok(Some(t.reshape((
            ids.len(),
            self.cfg.num_hidden_layers,
            p.dim,
        ))?))
    }

    /// Combines the token part with the projection of the (merged) input embeddings:
    /// `(norm(proj(x) / sqrt(hidden)) + token_part) * 2^-0.5`.
    pub fn ple_inputs(
        &self,
        embeds: &Tensor,
        token_part: Option<&Tensor>,
    ) -> CResult<Option<Tensor>> {
        let Some(p) = &self.ple else {
            return Ok(None);
        };
        let n = embeds.dim(0)?;
        let proj =
            (p.model_projection.forward(embeds)? * (self.cfg.hidden_size as f64).powf(-0.5))?;
        let proj = proj.reshape((n, self.cfg.num_hidden_layers, p.dim))?;
        let proj = p.projection_norm.forward(&proj)?;
        match token_part {
            Some(t) => Ok(Some(((proj + t)? * 2f64.powf(-0.5))?)),
            None => Ok(Some(proj)),
        }
    }

    /// Runs the decoder over packed rows of several sequences and returns logits per segment
    /// (`[rows, vocab]`, f32; empty `[0, vocab]` for `LogitRows::None`).
    ///
    /// `embeds` is `[T, hidden]` with `T = sum(seg.len)`; `ple` the matching
    /// `[T, layers, ple_dim]` from [`TextModel::ple_inputs`]. Each segment's cache advances by
    /// its `len`.
    pub fn forward(
        &self,
        embeds: &Tensor,
        ple: Option<&Tensor>,
        segments: &mut [Segment<'_>],
    ) -> CResult<Vec<Tensor>> {
        // Run the step on a rayon worker (inline when already on one): the parallel matmuls
        // of `qmm` then split between this thread and the other workers, instead of this
        // thread sleeping through each one and being woken after it (~300 hand-offs per
        // decoded token on E2B), and no idle worker spins against the serial work between
        // them.
        super::subnormal::flush_to_zero();
        rayon::scope(|_| self.forward_inner(embeds, ple, segments, None))
    }

    /// [`TextModel::forward`] that also returns the hidden states the reference reports
    /// (`output_hidden_states`): the input embeddings, then each decoder layer's output
    /// (packed rows, before the final norm). For parity debugging.
    pub fn forward_traced(
        &self,
        embeds: &Tensor,
        ple: Option<&Tensor>,
        segments: &mut [Segment<'_>],
    ) -> CResult<(Vec<Tensor>, Vec<Tensor>)> {
        let mut trace = vec![embeds.clone()];
        let out = self.forward_inner(embeds, ple, segments, Some(&mut trace))?;
        Ok((out, trace))
    }

    fn forward_inner(
        &self,
        embeds: &Tensor,
        ple: Option<&Tensor>,
        segments: &mut [Segment<'_>],
        mut trace: Option<&mut Vec<Tensor>>,
    ) -> CResult<Vec<Tensor>> {
        let total: usize = segments.iter().map(|s| s.len).sum();
        if embeds.dim(0)? != total {
            candle_core::bail!(
                "packed input has {} rows, segments declare {total}",
                embeds.dim(0)?
            );
        }
        let mut rows: Vec<QueryRows> = Vec::with_capacity(segments.len());
        let mut start = 0;
        for s in segments.iter() {
            if s.cache.pos + s.len > self.max_context {
                candle_core::bail!(
                    "sequence would reach {} positions, max_context is {}",
                    s.cache.pos + s.len,
                    self.max_context
                );
            }
            rows.push(QueryRows {
                start,
                positions: (s.cache.pos..s.cache.pos + s.len).collect(),
            });
            start += s.len;
        }
        let mut h = embeds.to_dtype(self.dtype)?;
        let mut ple = ple.cloned();
        let first_shared = self.cfg.first_kv_shared_layer();
        let all_last = segments.iter().all(|s| s.logits != LogitRows::All);
        // K/V views produced in this call, per layer, per segment: (k, v, first_pos).
        let mut produced: Vec<Option<Vec<KvView>>> = vec![None; self.layers.len()];
        let mut rope_cache: Vec<(LayerType, usize, Tensor, Tensor)> = Vec::new();

        for (li, layer) in self.layers.iter().enumerate() {
            if li == first_shared && all_last && first_shared < self.layers.len() {
                // KV-shared layers write no cache, so rows whose logits nobody needs can be
                // dropped here (the reference does the same with `logits_to_keep`).
                let mut keep: Vec<u32> = Vec::new();
                let mut new_rows = Vec::with_capacity(rows.len());
                for (s, r) in segments.iter().zip(rows.iter()) {
                    let n_keep = if s.logits == LogitRows::None || r.positions.is_empty() {
                        0
                    } else {
                        1
                    };
                    let st = keep.len();
                    let n = r.positions.len();
                    let mut pos = Vec::new();
                    for j in n - n_keep..n {
                        keep.push((r.start + j) as u32);
                        pos.push(r.positions[j]);
                    }
                    new_rows.push(QueryRows {
                        start: st,
                        positions: pos,
                    });
                }
                let idx = Tensor::from_vec(keep.clone(), keep.len(), &self.device)?;
                h = h.index_select(&idx, 0)?;
                ple = match ple {
                    Some(p) => Some(p.index_select(&idx, 0)?),
                    None => None,
                };
                rows = new_rows;
                rope_cache.clear();
            }
            if h.dim(0)? == 0 {
                break;
            }
            let spec = &layer.attn.spec;
            let all_pos: Vec<usize> = rows
                .iter()
                .flat_map(|r| r.positions.iter().copied())
                .collect();
            let (cos, sin) = match rope_cache
                .iter()
                .find(|(t, d, _, _)| *t == spec.layer_type && *d == spec.head_dim)
            {
                Some((_, _, c, s)) => (c.clone(), s.clone()),
                None => {
                    let (c, s) = self.rope_tables(spec, &all_pos)?;
                    rope_cache.push((spec.layer_type, spec.head_dim, c.clone(), s.clone()));
                    (c, s)
                }
            };
            let residual = h.clone();
            let x = layer.input_norm.forward(&h)?;
            let a = self.attention(layer, li, &x, &cos, &sin, segments, &rows, &mut produced)?;
            let a = layer.post_attn_norm.forward(&a)?;
            h = (residual + a)?;
            let residual = h.clone();
            let x = layer.pre_ff_norm.forward(&h)?;
            let x = layer.mlp.forward(&x)?;
            let x = layer.post_ff_norm.forward(&x)?;
            h = (residual + x)?;
            if let (Some(pl), Some(p)) = (&layer.ple, &ple) {
                let residual = h.clone();
                let pi = p.narrow(1, li, 1)?.squeeze(1)?;
                let x = gelu_tanh(&pl.gate.forward(&h)?)?;
                let x = (x * pi)?;
                let x = pl.norm.forward(&pl.proj.forward(&x)?)?;
                h = (residual + x)?;
            }
            if layer.layer_scalar != 1.0 {
                h = (h * layer.layer_scalar)?;
            }
            if let Some(t) = trace.as_deref_mut() {
                t.push(h.clone());
            }
        }
        for s in segments.iter_mut() {
            s.cache.pos += s.len;
        }
        let h = if h.dim(0)? > 0 {
            self.norm.forward(&h)?
        } else {
            h
        };
        let vocab = self.cfg.vocab_size;
        let mut out = Vec::with_capacity(segments.len());
        for (s, r) in segments.iter().zip(rows.iter()) {
            let n = r.positions.len();
            let sel = match s.logits {
                LogitRows::None => None,
                LogitRows::Last if n > 0 => Some(h.narrow(0, r.start + n - 1, 1)?),
                LogitRows::All if n > 0 => Some(h.narrow(0, r.start, n)?),
                _ => None,
            };
            let logits = match sel {
                Some(x) => {
                    let l = self.lm_head.forward(&x)?;
                    let l = l.to_dtype(upcast_dtype(l.dtype()))?;
                    match self.cfg.final_logit_softcapping {
                        Some(c) => softcap(&l, c)?,
                        None => l,
                    }
                    .to_dtype(DType::F32)?
                }
                None => Tensor::zeros((0, vocab), DType::F32, &self.device)?,
            };
            out.push(logits);
        }
        Ok(out)
    }
}
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn sliding_mask_admits_exactly_w_keys() {
        let w = 4;
        let pos: Vec<usize> = (0..10).collect();
        let m = build_mask(&pos, 0, 10, Some(w), None, false, 0, &Device::Cpu)
            .unwrap()
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        for (q, row) in m.iter().enumerate() {
            let visible = row.iter().filter(|v| v.is_finite()).count();
            assert_eq!(visible, (q + 1).min(w), "query {q}");
            for (k, v) in row.iter().enumerate() {
                assert_eq!(v.is_finite(), k <= q && k + w > q);
            }
        }
    }

    #[test]
    fn vision_blocks_see_forward_within_block() {
        let pos: Vec<usize> = (0..6).collect();
        let blocks = [-1, 0, 0, 0, -1, -1];
        let m = build_mask(&pos, 0, 6, Some(8), Some(&blocks), false, 0, &Device::Cpu)
            .unwrap()
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert!(m[1][3].is_finite());
        assert!(!m[0][1].is_finite());
        assert!(!m[3][4].is_finite());
    }

    #[test]
    fn unified_blocks_see_their_whole_image_past_the_window() {
        // Window 2; positions 1..=5 are one image.
        let pos: Vec<usize> = (0..7).collect();
        let blocks = [-1, 0, 0, 0, 0, 0, -1];
        let vis = |beyond: bool| {
            build_mask(&pos, 0, 7, Some(2), Some(&blocks), beyond, 0, &Device::Cpu)
                .unwrap()
                .unwrap()
                .to_vec2::<f32>()
                .unwrap()
        };
        let (or, and) = (vis(true), vis(false));
        // Query 5 (image) sees key 1 (same image, 4 back) only with the OR variant.
        assert!(or[5][1].is_finite());
        assert!(!and[5][1].is_finite());
        // Query 1 sees the future key 5 in both.
        assert!(or[1][5].is_finite() && and[1][5].is_finite());
        // Text query 6 keeps exactly W keys in both.
        assert_eq!(or[6].iter().filter(|v| v.is_finite()).count(), 2);
        assert_eq!(and[6].iter().filter(|v| v.is_finite()).count(), 2);
    }
}
