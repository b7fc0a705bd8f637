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

/// Positions a sliding layer's cache holds beyond its window `w` before it compacts: a
/// quarter window (256 on the 12B), at least 4. Was W (a 2W buffer from the first token
/// on: 1.3 GB of f32 keys/values on the 12B's 40 sliding layers even for a 150-token
/// prompt); a quarter keeps the compaction copy (W-1 rows) to one per W/4 decoded tokens.
pub fn sliding_slack(w: usize) -> usize {
    (w / 4).max(4)
}

/// One layer's K/V cache for one sequence: `[kv_heads, capacity, head_dim]` buffers holding
/// positions `first_pos .. first_pos + len`.
///
/// Sliding layers keep at most `window - 1` past keys between calls (the query itself is the
/// W-th key), compacting when the buffer fills, so their memory is bounded by the window plus
/// [`sliding_slack`] (or one chunk). All layers grow by doubling; full layers up to `max_len`.
#[derive(Debug, Clone)]
pub struct LayerCache {
    k: Option<Tensor>,
    v: Option<Tensor>,
    len: usize,
    first_pos: usize,
    window: Option<usize>,
    max_len: usize,
}

impl LayerCache {
    fn new(window: Option<usize>, max_len: usize) -> Self {
        Self {
            k: None,
            v: None,
            len: 0,
            first_pos: 0,
            window,
            max_len,
        }
    }

    /// Number of positions currently held.
    pub fn len(&self) -> usize {
        self.len
    }

    /// An independent copy. `Clone` shares the K/V storage, and `append` writes into it in
    /// place, so a clone and its original would overwrite each other's next positions; a
    /// copy keeps the same capacity, length and first position, so it continues exactly as
    /// the original would.
    pub fn deep_copy(&self) -> CResult<Self> {
        Ok(Self {
            k: self.k.as_ref().map(Tensor::copy).transpose()?,
            v: self.v.as_ref().map(Tensor::copy).transpose()?,
            ..*self
        })
    }

    /// An independent copy whose buffers hold just the positions held (no spare capacity):
    /// what a kept prompt prefix stores. A cache copied from it grows on its first append
    /// like any cache that ran out of room.
    pub fn compacted(&self) -> CResult<Self> {
        let trim = |t: &Option<Tensor>| -> CResult<Option<Tensor>> {
            match t {
                Some(t) if self.len > 0 => {
                    // A fresh buffer: `copy` of a view clones its whole storage.
                    let (kvh, _, hd) = t.dims3()?;
                    let buf = Tensor::zeros((kvh, self.len, hd), t.dtype(), t.device())?;
                    buf.slice_set(&t.narrow(1, 0, self.len)?.contiguous()?, 1, 0)?;
                    Ok(Some(buf))
                }
                _ => Ok(None),
            }
        };
        Ok(Self {
            k: trim(&self.k)?,
            v: trim(&self.v)?,
            ..*self
        })
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Allocated key+value bytes.
    pub fn capacity_bytes(&self) -> usize {
        self.k
            .as_ref()
            .map(|k| 2 * k.elem_count() * k.dtype().size_in_bytes())
            .unwrap_or(0)
    }

    /// Appends `[kv, n, hd]` keys/values and returns views over everything held.
    fn append(&mut self, k_new: &Tensor, v_new: &Tensor) -> CResult<(Tensor, Tensor, usize)> {
        let (kvh, n, hd) = k_new.dims3()?;
        let needed = self.len + n;
        let cap = self.k.as_ref().map(|k| k.dims()[1]).unwrap_or(0);
        if needed > cap {
            let (keep, new_cap) = match self.window {
                // Short sequences grow the buffer like a full layer, up to W + slack.
                Some(w) if needed <= w + sliding_slack(w) => {
                    let mut c = cap.max(64);
                    while c < needed {
                        c *= 2;
                    }
                    (self.len, c.min(w + sliding_slack(w)))
                }
                Some(w) => {
                    // Only the last W-1 past keys can still be seen by later queries; they
                    // move to the front and the slack takes the next appends, so the copy
                    // comes once per `sliding_slack(w)` decoded tokens.
                    let keep = self.len.min(w.saturating_sub(1));
                    (keep, (w + sliding_slack(w)).max(keep + n))
                }
                None => {
                    if needed > self.max_len {
                        candle_core::bail!(
                            "context of {needed} positions exceeds the configured maximum of {}",
                            self.max_len
                        );
                    }
                    let mut c = cap.max(64);
                    while c < needed {
                        c *= 2;
                    }
                    (self.len, c.min(self.max_len))
                }
            };
            let dev = k_new.device();
            let dt = k_new.dtype();
            let k_buf = Tensor::zeros((kvh, new_cap, hd), dt, dev)?;
            let v_buf = Tensor::zeros((kvh, new_cap, hd), dt, dev)?;
            if keep > 0 {
                if let (Some(k), Some(v)) = (&self.k, &self.v) {
                    let from = self.len - keep;
                    k_buf.slice_set(&k.narrow(1, from, keep)?.contiguous()?, 1, 0)?;
                    v_buf.slice_set(&v.narrow(1, from, keep)?.contiguous()?, 1, 0)?;
                }
            }
            self.first_pos += self.len - keep;
            self.len = keep;
            self.k = Some(k_buf);
            self.v = Some(v_buf);
        }
        let (k, v) = match (&self.k, &self.v) {
            (Some(k), Some(v)) => (k, v),
            _ => candle_core::bail!("kv cache buffer missing"),
        };
        k.slice_set(&k_new.contiguous()?, 1, self.len)?;
        v.slice_set(&v_new.contiguous()?, 1, self.len)?;
        self.len += n;
        Ok((
            k.narrow(1, 0, self.len)?,
            v.narrow(1, 0, self.len)?,
            self.first_pos,
        ))
    }
}

/// All caches of one sequence plus its position.
#[derive(Debug, Clone)]
pub struct SeqCache {
    layers: Vec<Option<LayerCache>>,
    /// Positions consumed so far (the next token's position).
    pub pos: usize,
}

impl SeqCache {
    /// Total allocated K/V bytes.
    pub fn bytes(&self) -> usize {
        self.layers
            .iter()
            .flatten()
            .map(LayerCache::capacity_bytes)
            .sum()
    }

    /// Positions held by layer `i`'s own cache (None for KV-shared layers).
    pub fn layer_len(&self, i: usize) -> Option<usize> {
        self.layers.get(i).and_then(|c| c.as_ref().map(|c| c.len()))
    }

    /// An independent copy of every layer's cache (see [`LayerCache::deep_copy`]): what a
    /// request starts from when it reuses a kept prompt prefix.
    pub fn deep_copy(&self) -> CResult<SeqCache> {
        let layers = self
            .layers
            .iter()
            .map(|c| c.as_ref().map(LayerCache::deep_copy).transpose())
            .collect::<CResult<Vec<_>>>()?;
        Ok(SeqCache {
            layers,
            pos: self.pos,
        })
    }

    /// [`SeqCache::deep_copy`] without spare capacity (see [`LayerCache::compacted`]).
    pub fn compacted(&self) -> CResult<SeqCache> {
        let layers = self
            .layers
            .iter()
            .map(|c| c.as_ref().map(LayerCache::compacted).transpose())
            .collect::<CResult<Vec<_>>>()?;
        Ok(SeqCache {
            layers,
            pos: self.pos,
        })
    }
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
    /// Loads `model.language_model.*` from `w` (rooted at the checkpoint root).
    pub fn load(w: &Weights, cfg: &TextConfig, opts: &LoadOptions) -> Result<Self, LoadError> {
        let specs = cfg.layer_specs()?;
        let root = w.pp(TEXT_PREFIX);
        let h = cfg.hidden_size;
        let eps = cfg.rms_norm_eps;
        let q = opts.quant;
        let dense_dt = match q {
            Quant::F32 | Quant::Q8_0 | Quant::Q4K => opts.dtype,
            _ => q.dense_dtype(),
        };
        // `--keep-f16 projections` keeps the table (and so the tied head) dense.
        let tq = opts.projection_quant();
        let table_store = if tq == q { dense_dt } else { tq.dense_dtype() };
        let embed = Embedding::load_single(
            &root,
            "embed_tokens.weight",
            cfg.vocab_size,
            h,
            tq,
            table_store,
        )?;
        // The reference multiplies by a scale buffer cast to the weight dtype.
        let table_dt = root
            .shape_of("embed_tokens.weight")
            .ok()
            .map(|_| dense_dt)
            .unwrap_or(DType::F32);
        let embed_scale = round_through((h as f64).sqrt(), table_dt)
            .map_err(|e| LoadError::candle("embed scale", e))?;
        // Tied head: the same storage serves lookups and the output projection.
        let lm_head = match &embed {
            Embedding::Dense(t) => Linear::from_tensor(t.clone(), tq),
            Embedding::Quantized(qt) => Linear::from_qtensor(qt.clone()),
            Embedding::Chunked { .. } => Err(candle_core::Error::Msg(
                "token table must be one matrix".into(),
            )),
        }
        .map_err(|e| LoadError::candle("tied lm_head", e))?;
        if !cfg.tie_word_embeddings && w.contains("lm_head.weight") {
            // Untied heads are not used by any Gemma 4 checkpoint; refuse rather than guess.
            return Err(LoadError::Config(super::config::ConfigError::Unsupported(
                "untied lm_head".into(),
            )));
        }
        let ple = match cfg.ple_dim() {
            Some(d) => {
                let n = cfg.num_hidden_layers;
                let table = Embedding::load(
                    &root,
                    "embed_tokens_per_layer.weight",
                    cfg.vocab_size_per_layer_input,
                    n * d,
                    q,
                    dense_dt,
                )?;
                Some(Ple {
                    table,
                    table_scale: round_through((d as f64).sqrt(), dense_dt)
                        .map_err(|e| LoadError::candle("ple scale", e))?,
                    model_projection: Linear::load(
                        &root,
                        "per_layer_model_projection",
                        n * d,
                        h,
                        q,
                    )?,
                    projection_norm: RmsNorm::load(&root, "per_layer_projection_norm", d, eps)?,
                    dim: d,
                })
            }
            None => None,
        };
        let mut layers = Vec::with_capacity(specs.len());
        for s in &specs {
            let lw = root.pp(&format!("layers.{}", s.index));
            let aw = lw.pp("self_attn");
            let nh = cfg.num_attention_heads;
            let hd = s.head_dim;
            let kvd = s.num_kv_heads * hd;
            let own = s.kv == KvSource::Own;
            let attn = Attention {
                spec: s.clone(),
                num_heads: nh,
                q_proj: Linear::load(&aw, "q_proj", nh * hd, h, q)?,
                q_norm: RmsNorm::load(&aw, "q_norm", hd, eps)?,
                k_proj: if own {
                    Some(Linear::load(&aw, "k_proj", kvd, h, q)?)
                } else {
                    None
                },
                v_proj: if own && !s.k_eq_v {
                    Some(Linear::load(&aw, "v_proj", kvd, h, q)?)
                } else {
                    None
                },
                k_norm: if own {
                    Some(RmsNorm::load(&aw, "k_norm", hd, eps)?)
                } else {
                    None
                },
                v_norm: RmsNorm::without_scale(eps),
                o_proj: Linear::load(&aw, "o_proj", h, nh * hd, q)?,
            };
            let mw = lw.pp("mlp");
            let inter = s.intermediate_size;
            let mlp = Mlp {
                gate: Linear::load(&mw, "gate_proj", inter, h, q)?,
                up: Linear::load(&mw, "up_proj", inter, h, q)?,
                down: Linear::load(&mw, "down_proj", h, inter, q)?,
            };
            let ple_layer = match cfg.ple_dim() {
                Some(d) => Some(PleLayer {
                    gate: Linear::load(&lw, "per_layer_input_gate", d, h, q)?,
                    proj: Linear::load(&lw, "per_layer_projection", h, d, q)?,
                    norm: RmsNorm::load(&lw, "post_per_layer_input_norm", h, eps)?,
                }),
                None => None,
            };
            let layer_scalar = match lw.get_opt("layer_scalar", &[1], DType::F32)? {
                Some(t) => t
                    .flatten_all()
                    .and_then(|t| t.to_vec1::<f32>())
                    .map_err(|e| LoadError::candle("layer_scalar", e))?[0]
                    as f64,
                None => 1.0,
            };
            layers.push(DecoderLayer {
                attn,
                mlp,
                input_norm: RmsNorm::load(&lw, "input_layernorm", h, eps)?,
                post_attn_norm: RmsNorm::load(&lw, "post_attention_layernorm", h, eps)?,
                pre_ff_norm: RmsNorm::load(&lw, "pre_feedforward_layernorm", h, eps)?,
                post_ff_norm: RmsNorm::load(&lw, "post_feedforward_layernorm", h, eps)?,
                ple: ple_layer,
                layer_scalar,
            });
        }
        let norm = RmsNorm::load(&root, "norm", h, eps)?;
        Ok(Self {
            cfg: cfg.clone(),
            specs,
            embed,
            embed_scale,
            ple,
            layers,
            norm,
            lm_head,
            device: opts.device.clone(),
            dtype: opts.dtype,
            max_context: opts.max_context,
            vision_mask: if cfg.use_bidirectional_attention.as_deref() == Some("vision") {
                VisionMask::WindowedBlock
            } else {
                VisionMask::Causal
            },
            score_block_bytes: SCORE_BLOCK_BYTES,
            instance: NEXT_INSTANCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        })
    }

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

    /// cos/sin `[rows, head_dim]` for a layer spec at the given positions. The frequencies are
    /// the reference's f32 constants; angles and cos/sin are f32 like the reference, or f64
    /// for an f64 model (see [`upcast_dtype`]).
    fn rope_tables(&self, spec: &LayerSpec, positions: &[usize]) -> CResult<(Tensor, Tensor)> {
        let hd = spec.head_dim;
        let half = hd / 2;
        let theta = spec.rope.rope_theta;
        let factor = spec.rope.factor.unwrap_or(1.0);
        let inv: Vec<f64> = if spec.rope.rope_type == "proportional" {
            let prf = spec.rope.partial_rotary_factor.unwrap_or(1.0);
            let angles = ((prf * hd as f64) / 2.0).floor() as usize;
            (0..half)
                .map(|i| {
                    if i < angles {
                        // f32 like torch: base ** (arange(0, 2a, 2).float() / head_dim)
                        let e = ((2 * i) as f32 / hd as f32) as f64;
                        (1.0 / (theta as f32).powf(e as f32)) as f64 / factor
                    } else {
                        0.0
                    }
                })
                .collect()
        } else {
            (0..half)
                .map(|i| {
                    let e = (2 * i) as f32 / hd as f32;
                    (1.0 / (theta as f32).powf(e)) as f64 / factor
                })
                .collect()
        };
        let n = positions.len();
        let mut cos = Vec::with_capacity(n * hd);
        let mut sin = Vec::with_capacity(n * hd);
        let exact = upcast_dtype(self.dtype) == DType::F64;
        for &p in positions {
            for _ in 0..2 {
                for f in &inv {
                    let f = *f as f32;
                    let (c, s) = if exact {
                        let a = p as f64 * f as f64;
                        (a.cos(), a.sin())
                    } else {
                        let a = (p as f32) * f;
                        (a.cos() as f64, a.sin() as f64)
                    };
                    cos.push(c);
                    sin.push(s);
                }
            }
        }
        let cos = Tensor::from_vec(cos, (n, hd), &self.device)?.to_dtype(self.dtype)?;
        let sin = Tensor::from_vec(sin, (n, hd), &self.device)?.to_dtype(self.dtype)?;
        Ok((cos, sin))
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

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        layer: &DecoderLayer,
        li: usize,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        segments: &mut [Segment<'_>],
        rows: &[QueryRows],
        produced: &mut [Option<Vec<KvView>>],
    ) -> CResult<Tensor> {
        let a = &layer.attn;
        let spec = &a.spec;
        let t = x.dim(0)?;
        let hd = spec.head_dim;
        let nh = a.num_heads;
        let nkv = spec.num_kv_heads;
        let q = a.q_proj.forward(x)?.reshape((t, nh, hd))?;
        let q = a.q_norm.forward(&q)?;
        let q = apply_rope(&q, cos, sin)?;
        let kv_views: Vec<KvView> = match spec.kv {
            KvSource::Shared(src) => match &produced[src] {
                Some(v) => v.clone(),
                None => candle_core::bail!("layer {li} shares K/V of layer {src}, not computed"),
            },
            KvSource::Own => {
                let (Some(kp), Some(kn)) = (&a.k_proj, &a.k_norm) else {
                    candle_core::bail!("layer {li} has no k_proj");
                };
                let k_raw = kp.forward(x)?.reshape((t, nkv, hd))?;
                let v_raw = match &a.v_proj {
                    Some(vp) => vp.forward(x)?.reshape((t, nkv, hd))?,
                    // K=V: values are the raw key projection, before k-norm and RoPE.
                    None => k_raw.clone(),
                };
                let k = apply_rope(&kn.forward(&k_raw)?, cos, sin)?;
                let v = a.v_norm.forward(&v_raw)?;
                let mut views = Vec::with_capacity(segments.len());
                for (s, r) in segments.iter_mut().zip(rows.iter()) {
                    let n = r.positions.len();
                    let ks = k.narrow(0, r.start, n)?.transpose(0, 1)?;
                    let vs = v.narrow(0, r.start, n)?.transpose(0, 1)?;
                    let cache = match s.cache.layers.get_mut(li).and_then(|c| c.as_mut()) {
                        Some(c) => c,
                        None => candle_core::bail!("sequence cache has no slot for layer {li}"),
                    };
                    views.push(cache.append(&ks, &vs)?);
                }
                views
            }
        };
        let mut outs = Vec::with_capacity(rows.len());
        let groups = nh / nkv;
        for ((s, r), (kv_k, kv_v, first_pos)) in
            segments.iter().zip(rows.iter()).zip(kv_views.iter())
        {
            let lq = r.positions.len();
            let lk = kv_k.dim(1)?;
            // Query rows in blocks whose f32 scores stay within score_block_bytes: a long
            // prompt's 1024-row chunk against 7,000 cached keys is 470 MB of scores per
            // layer, held two or three times over (mask added, softmax), on a model that
            // must fit in 11 GB.
            let block = (self.score_block_bytes / (nh * lk.max(1) * 4)).max(1);
            let block_ids = match self.vision_mask {
                VisionMask::Causal => None,
                VisionMask::WindowedBlock => (spec.layer_type == LayerType::SlidingAttention)
                    .then_some(s.block_ids.as_deref())
                    .flatten(),
                VisionMask::BlockEverywhere => s.block_ids.as_deref(),
            };
            for b0 in (0..lq).step_by(block) {
                let n = block.min(lq - b0);
                let qs = q
                    .narrow(0, r.start + b0, n)?
                    .transpose(0, 1)?
                    .contiguous()?
                    .reshape((nkv, groups * n, hd))?;
                let scores = qs.matmul(&kv_k.t()?)?; // scaling = 1.0
                let scores = scores
                    .to_dtype(upcast_dtype(scores.dtype()))?
                    .reshape((nkv, groups, n, lk))?;
                let scores = match build_mask(
                    &r.positions[b0..b0 + n],
                    *first_pos,
                    lk,
                    spec.sliding_window,
                    block_ids,
                    self.vision_mask == VisionMask::BlockEverywhere,
                    s.cache.pos,
                    &self.device,
                )? {
                    Some(m) => scores.broadcast_add(&m.to_dtype(scores.dtype())?)?,
                    None => scores,
                };
                let probs = candle_nn::ops::softmax_last_dim(&scores)?
                    .to_dtype(kv_v.dtype())?
                    .reshape((nkv, groups * n, lk))?;
                let o = probs.matmul(kv_v)?; // [nkv, g*n, hd]
                let o = o
                    .reshape((nh, n, hd))?
                    .transpose(0, 1)?
                    .reshape((n, nh * hd))?;
                outs.push(o);
            }
        }
        if matches!(spec.kv, KvSource::Own) {
            produced[li] = Some(kv_views);
        }
        let o = if outs.len() == 1 {
            outs.pop()
                .ok_or_else(|| candle_core::Error::Msg("no rows".into()))?
        } else {
            Tensor::cat(&outs, 0)?
        };
        a.o_proj.forward(&o.to_dtype(x.dtype())?)
    }
}

/// Most bytes of f32 attention scores one block of query rows may take by default (see
/// `TextModel::attention`); decode steps and short prompts are one block.
const SCORE_BLOCK_BYTES: usize = 64 << 20;

/// `x * cos + rotate_half(x) * sin` for `x: [rows, heads, hd]`, `cos/sin: [rows, hd]`.
fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> CResult<Tensor> {
    let hd = x.dim(D::Minus1)?;
    let half = hd / 2;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    let cos = cos.unsqueeze(1)?;
    let sin = sin.unsqueeze(1)?;
    x.broadcast_mul(&cos)? + rot.broadcast_mul(&sin)?
}

/// Additive mask `[lq, lk]` (0 or -inf), None when nothing is masked.
///
/// Keys hold positions `first_pos..first_pos+lk`. A key is visible iff it is not in the
/// future (`k <= q`) and, on sliding layers, inside the window (`k > q - W`, so exactly W
/// keys). With vision block ids, keys of the same image block are visible in both
/// directions: still subject to the window's left edge (`create_masks_for_vision_model`), or,
/// with `block_beyond_window`, regardless of the window (`Gemma4UnifiedModel`'s default
/// masks: `OR(sliding causal, same block)`).
/// `seg_start` is the position of the segment's first row; block ids index rows from it
/// (keys from earlier calls count as non-vision: callers never split a vision block).
#[allow(clippy::too_many_arguments)]
pub fn build_mask(
    q_positions: &[usize],
    first_pos: usize,
    lk: usize,
    window: Option<usize>,
    block_ids: Option<&[i64]>,
    block_beyond_window: bool,
    seg_start: usize,
    device: &Device,
) -> CResult<Option<Tensor>> {
    let lq = q_positions.len();
    let mut m = vec![0f32; lq * lk];
    let mut any = false;
    let block_of = |p: usize| -> i64 {
        match block_ids {
            Some(b) => {
                let base = seg_start;
                if p >= base && p - base < b.len() {
                    b[p - base]
                } else {
                    -1
                }
            }
            None => -1,
        }
    };
    for (i, &qp) in q_positions.iter().enumerate() {
        let qb = block_of(qp);
        for j in 0..lk {
            let kp = first_pos + j;
            let causal = kp <= qp;
            let same_block = qb >= 0 && block_of(kp) == qb;
            let in_window = match window {
                Some(w) => kp + w > qp,
                None => true,
            };
            let visible = if block_beyond_window {
                (in_window && causal) || same_block
            } else {
                in_window && (causal || same_block)
            };
            if !visible {
                m[i * lk + j] = f32::NEG_INFINITY;
                any = true;
            }
        }
    }
    if !any {
        return Ok(None);
    }
    Ok(Some(Tensor::from_vec(m, (lq, lk), device)?))
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
