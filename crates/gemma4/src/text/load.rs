//! Building the decoder from a checkpoint's tensors: layer specs, quantization of the linears
//! and tables, per-layer embeddings, K/V sharing.

use super::attention::SCORE_BLOCK_BYTES;
use super::*;

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
            return Err(LoadError::Config(crate::config::ConfigError::Unsupported(
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
}
