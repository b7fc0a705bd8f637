//! llama.cpp's projector GGUF (`mmproj-*.gguf`) back in the checkpoint's layout: the E2B/E4B
//! vision and audio towers (`gemma4v` / `gemma4a`) and the 12B's embedders (`gemma4uv` /
//! `gemma4ua`), with the converter's changes undone (`conversion/gemma.py`,
//! `Gemma4VisionAudioModel` / `Gemma4UnifiedVisionAudioModel.modify_tensors`):
//! - clip bounds became 1-element tensors: back to scalars;
//! - the audio `per_dim_scale` went through softplus: inverted (`ln(expm1(y))`, in f64);
//! - the audio depthwise conv lost its middle axis `[c, 1, k] -> [c, k]`: restored;
//! - the vision patch projection `[n, p*p*3]` (HWC columns) became `[n, 3, p, p]`: permuted back;
//! - the 12B patch projection's columns and `patch_ln1` were reordered HWC -> CHW: reordered
//!   back; its position table `[size, 2, d]` became `[2, size, d]`: swapped back;
//!   `pos_norm` became `patch_norm.3`.
//!
//! Settings the converter does not write follow from the architecture (and equal the
//! published configs): vision RoPE theta 100 (axial), pooling 3, audio chunk 12 with 13 frames
//! of left context, logit cap 50, residual weight 0.5.

use candle_core::{DType, Device, Tensor};

use super::gguf::{GgufFile, TensorInfo, Value};
use super::loader::LoadError;

/// How a projector tensor differs from the checkpoint's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fix {
    None,
    /// `[1]` -> `[]`.
    Scalar,
    /// softplus undone.
    InvSoftplus,
    /// `[c, k]` -> `[c, 1, k]`.
    DepthwiseConv,
    /// `[n, 3, p, p]` -> `[n, p*p*3]` (channels last).
    PatchToHwc,
    /// Columns (or a vector) in CHW order -> HWC order, patch side `p`.
    ChwToHwc,
    /// `[a, b, c]` -> `[b, a, c]`.
    SwapFirstTwo,
}

/// Which projector a GGUF holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Towers,
    Unified,
}

const CLIP_SUFFIXES: &[&str] = &["input_max", "input_min", "output_max", "output_min"];

/// A clippable linear: `<gguf>.weight` -> `<hf>.linear.weight`, bounds -> scalars.
fn clippable(hf: &str, suffix: &str) -> Option<(String, Fix)> {
    if suffix == "weight" {
        Some((format!("{hf}.linear.weight"), Fix::None))
    } else if CLIP_SUFFIXES.contains(&suffix) {
        Some((format!("{hf}.{suffix}"), Fix::Scalar))
    } else {
        None
    }
}

/// The checkpoint name of a projector tensor and the change to undo.
pub fn checkpoint_name(name: &str, kind: Kind) -> Option<(String, Fix)> {
    let w = |s: &str| Some((s.to_string(), Fix::None));
    match name {
        "mm.input_projection.weight" => return w("model.embed_vision.embedding_projection.weight"),
        "mm.a.input_projection.weight" => {
            return w("model.embed_audio.embedding_projection.weight")
        }
        _ => {}
    }
    if kind == Kind::Unified {
        let e = "model.vision_embedder";
        return match name {
            "v.patch_embd.weight" => Some((format!("{e}.patch_dense.weight"), Fix::ChwToHwc)),
            "v.patch_embd.bias" => Some((format!("{e}.patch_dense.bias"), Fix::None)),
            "v.patch_norm.1.weight" => Some((format!("{e}.patch_ln1.weight"), Fix::ChwToHwc)),
            "v.patch_norm.1.bias" => Some((format!("{e}.patch_ln1.bias"), Fix::ChwToHwc)),
            "v.patch_norm.2.weight" => Some((format!("{e}.patch_ln2.weight"), Fix::None)),
            "v.patch_norm.2.bias" => Some((format!("{e}.patch_ln2.bias"), Fix::None)),
            "v.patch_norm.3.weight" => Some((format!("{e}.pos_norm.weight"), Fix::None)),
            "v.patch_norm.3.bias" => Some((format!("{e}.pos_norm.bias"), Fix::None)),
            "v.position_embd.weight" => Some((format!("{e}.pos_embedding"), Fix::SwapFirstTwo)),
            _ => None,
        };
    }
    let v = "model.vision_tower";
    match name {
        "v.patch_embd.weight" => {
            return Some((
                format!("{v}.patch_embedder.input_proj.weight"),
                Fix::PatchToHwc,
            ))
        }
        "v.position_embd.weight" => {
            return w(&format!("{v}.patch_embedder.position_embedding_table"))
        }
        "v.std_bias" => return w(&format!("{v}.std_bias")),
        "v.std_scale" => return w(&format!("{v}.std_scale")),
        _ => {}
    }
    let a = "model.audio_tower";
    let sub = format!("{a}.subsample_conv_projection");
    match name {
        "a.pre_encode.out.weight" => return w(&format!("{a}.output_proj.weight")),
        "a.pre_encode.out.bias" => return w(&format!("{a}.output_proj.bias")),
        "a.input_projection.weight" => return w(&format!("{sub}.input_proj_linear.weight")),
        _ => {}
    }
    if let Some(rest) = name.strip_prefix("a.conv1d.") {
        let (i, tail) = rest.split_once('.')?;
        let i: usize = i.parse().ok()?;
        return match tail {
            "weight" => w(&format!("{sub}.layer{i}.conv.weight")),
            "norm.weight" => w(&format!("{sub}.layer{i}.norm.weight")),
            _ => None,
        };
    }
    if let Some(rest) = name.strip_prefix("v.blk.") {
        let (n, tail) = rest.split_once('.')?;
        let n: usize = n.parse().ok()?;
        let p = format!("{v}.encoder.layers.{n}");
        let (base, suffix) = tail.rsplit_once('.')?;
        let norm = |h: &str| (suffix == "weight").then(|| (format!("{p}.{h}.weight"), Fix::None));
        return match base {
            "ln1" => norm("input_layernorm"),
            "ln2" => norm("pre_feedforward_layernorm"),
            "attn_post_norm" => norm("post_attention_layernorm"),
            "ffn_post_norm" => norm("post_feedforward_layernorm"),
            "attn_q_norm" => norm("self_attn.q_norm"),
            "attn_k_norm" => norm("self_attn.k_norm"),
            "attn_q" => clippable(&format!("{p}.self_attn.q_proj"), suffix),
            "attn_k" => clippable(&format!("{p}.self_attn.k_proj"), suffix),
            "attn_v" => clippable(&format!("{p}.self_attn.v_proj"), suffix),
            "attn_out" => clippable(&format!("{p}.self_attn.o_proj"), suffix),
            "ffn_gate" => clippable(&format!("{p}.mlp.gate_proj"), suffix),
            "ffn_up" => clippable(&format!("{p}.mlp.up_proj"), suffix),
            "ffn_down" => clippable(&format!("{p}.mlp.down_proj"), suffix),
            _ => None,
        };
    }
    if let Some(rest) = name.strip_prefix("a.blk.") {
        let (n, tail) = rest.split_once('.')?;
        let n: usize = n.parse().ok()?;
        let p = format!("{a}.layers.{n}");
        let (base, suffix) = tail.rsplit_once('.')?;
        let norm = |h: &str| (suffix == "weight").then(|| (format!("{p}.{h}.weight"), Fix::None));
        return match base {
            "ffn_norm" => norm("feed_forward1.pre_layer_norm"),
            "ffn_post_norm" => norm("feed_forward1.post_layer_norm"),
            "ffn_norm_1" => norm("feed_forward2.pre_layer_norm"),
            "ffn_post_norm_1" => norm("feed_forward2.post_layer_norm"),
            "norm_conv" => norm("lconv1d.conv_norm"),
            "conv_norm" => norm("lconv1d.pre_layer_norm"),
            "ln2" => norm("norm_out"),
            "attn_post_norm" => norm("norm_post_attn"),
            "attn_pre_norm" => norm("norm_pre_attn"),
            "conv_dw" => (suffix == "weight").then(|| {
                (
                    format!("{p}.lconv1d.depthwise_conv1d.weight"),
                    Fix::DepthwiseConv,
                )
            }),
            "per_dim_scale" => (suffix == "weight")
                .then(|| (format!("{p}.self_attn.per_dim_scale"), Fix::InvSoftplus)),
            "attn_k_rel" => norm("self_attn.relative_k_proj"),
            "ffn_up" => clippable(&format!("{p}.feed_forward1.ffw_layer_1"), suffix),
            "ffn_down" => clippable(&format!("{p}.feed_forward1.ffw_layer_2"), suffix),
            "ffn_up_1" => clippable(&format!("{p}.feed_forward2.ffw_layer_1"), suffix),
            "ffn_down_1" => clippable(&format!("{p}.feed_forward2.ffw_layer_2"), suffix),
            "conv_pw1" => clippable(&format!("{p}.lconv1d.linear_start"), suffix),
            "conv_pw2" => clippable(&format!("{p}.lconv1d.linear_end"), suffix),
            "attn_q" => clippable(&format!("{p}.self_attn.q_proj"), suffix),
            "attn_k" => clippable(&format!("{p}.self_attn.k_proj"), suffix),
            "attn_v" => clippable(&format!("{p}.self_attn.v_proj"), suffix),
            "attn_out" => clippable(&format!("{p}.self_attn.post"), suffix),
            _ => None,
        };
    }
    None
}

/// The checkpoint shape of a tensor stored with `shape` under `fix`.
pub fn fixed_shape(shape: &[usize], fix: Fix) -> Vec<usize> {
    match (fix, shape) {
        (Fix::Scalar, [1]) => vec![],
        (Fix::DepthwiseConv, [c, k]) => vec![*c, 1, *k],
        (Fix::PatchToHwc, [n, c, p, q]) => vec![*n, c * p * q],
        (Fix::SwapFirstTwo, [a, b, rest @ ..]) => [vec![*b, *a], rest.to_vec()].concat(),
        _ => shape.to_vec(),
    }
}

/// Column order CHW -> HWC over the last axis of `x` (length `3 p²`): the converter stored
/// `gguf[.., i] = hf[.., perm(i)]` with `perm(i)` the HWC index of CHW position `i`.
fn chw_to_hwc(x: &Tensor) -> candle_core::Result<Tensor> {
    let n = *x.dims().last().unwrap_or(&0);
    let p = ((n / 3) as f64).sqrt().round() as usize;
    if 3 * p * p != n {
        candle_core::bail!("{n} values are not 3 x p x p");
    }
    // inverse: hf[.., j] = gguf[.., i] where perm(i) = j.
    let mut src = vec![0u32; n];
    for i in 0..n {
        let (ch, rem) = (i / (p * p), i % (p * p));
        let (row, col) = (rem / p, rem % p);
        src[row * p * 3 + col * 3 + ch] = i as u32;
    }
    let idx = Tensor::from_vec(src, n, x.device())?;
    x.index_select(&idx, x.rank() - 1)
}

/// Reads `t` as the checkpoint's f32 tensor (dequantized if stored in blocks).
pub fn fixed_dense(
    f: &GgufFile,
    t: &TensorInfo,
    fix: Fix,
    device: &Device,
    dtype: DType,
) -> Result<Tensor, LoadError> {
    let x = f.dense(t, &Device::Cpu, DType::F32)?;
    let ctx = |e| LoadError::candle(format!("undoing the converter's change to {}", t.name), e);
    let y = match fix {
        Fix::None => Ok(x),
        Fix::Scalar | Fix::DepthwiseConv => x.reshape(fixed_shape(&t.shape, fix)),
        Fix::InvSoftplus => x.to_dtype(DType::F64).and_then(|v| {
            // softplus(x) = ln(1 + e^x)  =>  x = ln(e^y - 1) = y + ln(1 - e^-y).
            let e = (v.neg()?.exp()?.neg()? + 1.0)?.log()?;
            (v + e)?.to_dtype(DType::F32)
        }),
        Fix::PatchToHwc => x
            .permute((0, 2, 3, 1))
            .and_then(|v| v.contiguous())
            .and_then(|v| {
                let s = fixed_shape(&t.shape, fix);
                v.reshape(s)
            }),
        Fix::ChwToHwc => chw_to_hwc(&x),
        Fix::SwapFirstTwo => x.transpose(0, 1).and_then(|v| v.contiguous()),
    }
    .map_err(ctx)?;
    y.to_dtype(dtype)
        .and_then(|v| v.to_device(device))
        .map_err(ctx)
}

/// The kind of projector a GGUF is, from `clip.*.projector_type`.
pub fn kind(f: &GgufFile) -> Option<Kind> {
    let (v, a) = super::gguf_model::projector_types(f);
    match (v.as_deref(), a.as_deref()) {
        (Some("gemma4uv"), _) | (_, Some("gemma4ua")) => Some(Kind::Unified),
        (Some("gemma4v"), _) | (_, Some("gemma4a")) => Some(Kind::Towers),
        _ => None,
    }
}

/// `vision_config` and `audio_config` of the checkpoint, rebuilt from the projector.
pub fn configs(f: &GgufFile) -> Result<(serde_json::Value, serde_json::Value), LoadError> {
    let bad = |m: String| LoadError::Parse {
        path: f.path.clone(),
        message: m,
    };
    let kind = kind(f).ok_or_else(|| {
        bad("projector type is not Gemma 4's (gemma4v/gemma4a or gemma4uv/gemma4ua)".into())
    })?;
    let u = |k: &str| f.meta(k).and_then(Value::as_u64).map(|v| v as usize);
    let eps = |k: &str| f.meta(k).and_then(Value::as_f64).unwrap_or(1e-6);
    let shape = |n: &str| f.get(n).map(|t| t.shape.clone());
    let has_vision = f
        .meta("clip.has_vision_encoder")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let has_audio = f
        .meta("clip.has_audio_encoder")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let v_eps = eps("clip.vision.attention.layer_norm_epsilon");
    let a_eps = eps("clip.audio.attention.layer_norm_epsilon");
    if kind == Kind::Unified {
        let vision = match shape("v.patch_embd.weight") {
            Some(s) if has_vision => {
                let p = (((s[1] / 3) as f64).sqrt().round()) as usize;
                let d = u("clip.vision.embedding_length").unwrap_or(s[0]);
                let pos = shape("v.position_embd.weight")
                    .map(|s| s[1])
                    .unwrap_or(1120);
                serde_json::json!({"model_type": "gemma4_unified_vision", "patch_size": p / 3,
                    "pooling_kernel_size": 3, "mm_embed_dim": d, "mm_posemb_size": pos,
                    "output_proj_dims": d, "rms_norm_eps": v_eps})
            }
            _ => serde_json::Value::Null,
        };
        let audio = if has_audio {
            serde_json::json!({"model_type": "gemma4_unified_audio",
                "audio_embed_dim": u("clip.audio.embedding_length").unwrap_or(640),
                "rms_norm_eps": a_eps})
        } else {
            serde_json::Value::Null
        };
        return Ok((vision, audio));
    }
    let vision = if has_vision {
        let hidden = u("clip.vision.embedding_length")
            .ok_or_else(|| bad("no clip.vision.embedding_length".into()))?;
        let heads = u("clip.vision.attention.head_count").unwrap_or(1).max(1);
        let head_dim = shape("v.blk.0.attn_q_norm.weight")
            .map(|s| s[0])
            .unwrap_or(hidden / heads);
        let kv = shape("v.blk.0.attn_k.weight")
            .map(|s| s[0] / head_dim.max(1))
            .unwrap_or(heads);
        serde_json::json!({"model_type": "gemma4_vision", "hidden_size": hidden,
            "intermediate_size": u("clip.vision.feed_forward_length").unwrap_or(4 * hidden),
            "num_hidden_layers": u("clip.vision.block_count").unwrap_or(0),
            "num_attention_heads": heads, "num_key_value_heads": kv, "head_dim": head_dim,
            "hidden_activation": "gelu_pytorch_tanh", "rms_norm_eps": v_eps,
            "attention_bias": false,
            "max_position_embeddings": 131072,
            "rope_parameters": {"rope_theta": 100.0, "rope_type": "axial"},
            "pooling_kernel_size": 3,
            "patch_size": u("clip.vision.patch_size").unwrap_or(16),
            "position_embedding_size": shape("v.position_embd.weight").map(|s| s[1]).unwrap_or(10240),
            "use_clipped_linears": f.get("v.blk.0.attn_q.input_max").is_some(),
            "standardize": f.get("v.std_bias").is_some()})
    } else {
        serde_json::Value::Null
    };
    let audio = if has_audio {
        let c0 = shape("a.conv1d.0.weight").map(|s| s[0]).unwrap_or(128);
        let c1 = shape("a.conv1d.1.weight").map(|s| s[0]).unwrap_or(32);
        serde_json::json!({"model_type": "gemma4_audio",
            "hidden_size": u("clip.audio.embedding_length").unwrap_or(1536),
            "num_hidden_layers": u("clip.audio.block_count").unwrap_or(0),
            "num_attention_heads": u("clip.audio.attention.head_count").unwrap_or(8),
            "hidden_act": "silu", "subsampling_conv_channels": [c0, c1],
            "conv_kernel_size": shape("a.blk.0.conv_dw.weight").map(|s| s[1]).unwrap_or(5),
            "residual_weight": 0.5, "attention_chunk_size": 12, "attention_context_left": 13,
            "attention_context_right": 0, "attention_logit_cap": 50.0,
            "attention_invalid_logits_value": -1.0e9,
            "use_clipped_linears": f.get("a.blk.0.attn_q.input_max").is_some(),
            "rms_norm_eps": a_eps, "gradient_clipping": 1.0e10,
            "output_proj_dims": shape("a.pre_encode.out.weight").map(|s| s[0]).unwrap_or(1536)})
    } else {
        serde_json::Value::Null
    };
    Ok((vision, audio))
}

/// The vision tower (`gemma4v`) of a projector GGUF alone, without its text model: what a
/// benchmark of the tower needs (`model run` loads it with the decoder instead). The tower
/// settings come from [`configs`], the decoder width from `mm.input_projection.weight`
/// (`[text_hidden, vision_hidden]`); `proj` is the storage of that projection, `vq` that of
/// the encoder linears.
pub fn vision_tower(
    path: &std::path::Path,
    device: &Device,
    proj: super::Quant,
    vq: super::clippable::VisionQuant,
) -> Result<super::vision::VisionTower, LoadError> {
    let w = super::loader::Weights::open_gguf(&[path.to_path_buf()], device, DType::F32)?;
    let bad = |m: &str| LoadError::Parse {
        path: path.to_path_buf(),
        message: m.to_string(),
    };
    let f = w
        .gguf()
        .and_then(|g| g.files.first())
        .ok_or_else(|| bad("no GGUF file mapped"))?;
    if kind(f) != Some(Kind::Towers) {
        return Err(bad(
            "not a gemma4v projector (percept builds the E2B/E4B vision tower from it)",
        ));
    }
    let (vision, _) = configs(f)?;
    if vision.is_null() {
        return Err(bad("projector without a vision encoder"));
    }
    let cfg: super::config::VisionConfig =
        serde_json::from_value(vision).map_err(|e| bad(&format!("vision settings: {e}")))?;
    let text_hidden = f
        .get("mm.input_projection.weight")
        .map(|t| t.shape[0])
        .ok_or_else(|| bad("no mm.input_projection.weight"))?;
    super::vision::VisionTower::load_quant(&w, &cfg, text_hidden, proj, vq)
}
