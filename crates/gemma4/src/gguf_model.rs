//! Gemma 4 from GGUF files as llama.cpp's `convert_hf_to_gguf.py` writes them (architecture
//! `gemma4`, for E2B/E4B and the 12B alike), and the ways users hold them: a `.gguf` path
//! (with `--mmproj`, or an `mmproj-*.gguf` beside it), an LM Studio folder
//! (`<publisher>/<repo>/*.gguf` + `mmproj-*.gguf`) and `ollama:NAME[:TAG]`.
//!
//! The converter renames tensors (`blk.N.attn_q.weight` ...) and drops what follows from the
//! architecture; this module maps the names back to the checkpoint's
//! (`model.language_model.layers.N.self_attn.q_proj.weight` ...) so the decoder loads through
//! the same code as a safetensors folder, and rebuilds `config.json`, `tokenizer.json`, the
//! chat template and `generation_config.json` from the metadata. What the converter changed
//! on the way is undone here: the token table lost the rows past the tokenizer's last token
//! (the vocabulary is then the table's rows), `layer_scalar` became
//! `layer_output_scale.weight`, the full layers' partial rotary factor became the
//! `rope_freqs` tensor (1 for rotated pairs, 1e30 for the rest), K=V and the kv-head split
//! became per-layer arrays or missing `attn_v` tensors.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor};

use super::gguf::{GgufFile, Value};
use super::gguf_mmproj::Fix;
use super::loader::{LoadError, ModelFiles};

/// Prefix of the decoder tensors in the checkpoint layout.
const TEXT: &str = "model.language_model";

/// llama.cpp's per-block tensor names (after `blk.N.`) and the checkpoint's (after
/// `layers.N.`).
const BLOCK_NAMES: &[(&str, &str)] = &[
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("attn_q_norm", "self_attn.q_norm"),
    ("attn_k_norm", "self_attn.k_norm"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
    ("attn_norm", "input_layernorm"),
    ("post_attention_norm", "post_attention_layernorm"),
    ("ffn_norm", "pre_feedforward_layernorm"),
    ("post_ffw_norm", "post_feedforward_layernorm"),
    ("inp_gate", "per_layer_input_gate"),
    ("proj", "per_layer_projection"),
    ("post_norm", "post_per_layer_input_norm"),
];

/// Top-level tensor names: (llama.cpp, checkpoint after `model.language_model.`).
const TOP_NAMES: &[(&str, &str)] = &[
    ("token_embd", "embed_tokens"),
    ("per_layer_token_embd", "embed_tokens_per_layer"),
    ("per_layer_model_proj", "per_layer_model_projection"),
    ("per_layer_proj_norm", "per_layer_projection_norm"),
    ("output_norm", "norm"),
];

/// The checkpoint name of a text-model GGUF tensor, None for tensors the decoder does not
/// read (`rope_freqs`, which becomes config).
pub fn checkpoint_name(gguf: &str) -> Option<String> {
    if let Some(rest) = gguf.strip_prefix("blk.") {
        let (n, tail) = rest.split_once('.')?;
        let n: usize = n.parse().ok()?;
        if tail == "layer_output_scale.weight" {
            return Some(format!("{TEXT}.layers.{n}.layer_scalar"));
        }
        let base = tail.strip_suffix(".weight")?;
        let hf = BLOCK_NAMES.iter().find(|(g, _)| *g == base)?.1;
        return Some(format!("{TEXT}.layers.{n}.{hf}.weight"));
    }
    let base = gguf.strip_suffix(".weight")?;
    let hf = TOP_NAMES.iter().find(|(g, _)| *g == base)?.1;
    Some(format!("{TEXT}.{hf}.weight"))
}

/// The llama.cpp name of a checkpoint tensor (the inverse of [`checkpoint_name`]).
pub fn gguf_name(checkpoint: &str) -> Option<String> {
    let rest = checkpoint.strip_prefix(TEXT)?.strip_prefix('.')?;
    if let Some(l) = rest.strip_prefix("layers.") {
        let (n, tail) = l.split_once('.')?;
        if tail == "layer_scalar" {
            return Some(format!("blk.{n}.layer_output_scale.weight"));
        }
        let base = tail.strip_suffix(".weight")?;
        let g = BLOCK_NAMES.iter().find(|(_, h)| *h == base)?.0;
        return Some(format!("blk.{n}.{g}.weight"));
    }
    let base = rest.strip_suffix(".weight")?;
    let g = TOP_NAMES.iter().find(|(_, h)| *h == base)?.0;
    Some(format!("{g}.weight"))
}

/// Metadata key that marks percept's own quantized cache files (tensors under checkpoint
/// names, no renaming).
pub const CACHE_MARK: &str = "percept.cache.version";

/// The tensors of one or more GGUF files under checkpoint names.
pub struct GgufTensors {
    pub files: Vec<Arc<GgufFile>>,
    /// checkpoint name -> (file, tensor index in that file's table, change to undo).
    map: HashMap<String, (usize, usize, Fix)>,
}

impl std::fmt::Debug for GgufTensors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufTensors")
            .field("files", &self.files)
            .finish()
    }
}

impl GgufTensors {
    /// Indexes `files`: llama.cpp files through [`checkpoint_name`], percept's cache files
    /// as they are.
    pub fn new(files: Vec<Arc<GgufFile>>) -> Result<Self, LoadError> {
        let mut map = HashMap::new();
        for (fi, f) in files.iter().enumerate() {
            let ours = f.meta(CACHE_MARK).is_some();
            let projector = if is_mmproj(f) {
                Some(super::gguf_mmproj::kind(f).ok_or_else(|| {
                    parse_err(
                        f,
                        "projector type is not Gemma 4's (gemma4v/gemma4a or gemma4uv/gemma4ua)"
                            .into(),
                    )
                })?)
            } else {
                None
            };
            for (ti, t) in f.tensors.iter().enumerate() {
                let name = match projector {
                    _ if ours => Some((t.name.clone(), Fix::None)),
                    Some(kind) => super::gguf_mmproj::checkpoint_name(&t.name, kind),
                    None => checkpoint_name(&t.name).map(|n| (n, Fix::None)),
                };
                if let Some((n, fix)) = name {
                    map.insert(n, (fi, ti, fix));
                }
            }
        }
        Ok(Self { files, map })
    }

    fn entry(&self, name: &str) -> Option<(&GgufFile, &super::gguf::TensorInfo)> {
        self.entry_fix(name).map(|(f, t, _)| (f, t))
    }

    fn entry_fix(&self, name: &str) -> Option<(&GgufFile, &super::gguf::TensorInfo, Fix)> {
        let &(fi, ti, fix) = self.map.get(name)?;
        let f = &self.files[fi];
        Some((f, &f.tensors[ti], fix))
    }

    fn missing(name: &str) -> LoadError {
        LoadError::MissingTensor {
            name: name.to_string(),
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.map.contains_key(name)
    }

    pub fn shape(&self, name: &str) -> Result<Vec<usize>, LoadError> {
        self.entry_fix(name)
            .map(|(_, t, fix)| super::gguf_mmproj::fixed_shape(&t.shape, fix))
            .ok_or_else(|| Self::missing(name))
    }

    pub fn dense(&self, name: &str, device: &Device, dtype: DType) -> Result<Tensor, LoadError> {
        let (f, t, fix) = self.entry_fix(name).ok_or_else(|| Self::missing(name))?;
        if fix != Fix::None {
            return super::gguf_mmproj::fixed_dense(f, t, fix, device, dtype);
        }
        f.dense(t, device, dtype)
    }

    pub fn rows_f32(&self, name: &str, start: usize, n: usize) -> Result<Tensor, LoadError> {
        let (f, t, fix) = self.entry_fix(name).ok_or_else(|| Self::missing(name))?;
        if fix != Fix::None {
            return super::gguf_mmproj::fixed_dense(f, t, fix, &Device::Cpu, DType::F32)?
                .narrow(0, start, n)
                .map_err(|e| LoadError::candle(format!("rows of {name}"), e));
        }
        f.rows_f32(t, start, n)
    }

    /// The tensor as stored, when it is block-quantized (Q8_0, Q4_0, Q4_K, Q5_K, Q6_K): the
    /// blocks stay in the mapping. None for dense tensors.
    pub fn quantized(
        &self,
        name: &str,
        device: &Device,
    ) -> Result<Option<Arc<QTensor>>, LoadError> {
        let Some((f, t, fix)) = self.entry_fix(name) else {
            return Ok(None);
        };
        // Blocks the converter reordered are read through the dense path (undone there).
        if matches!(t.type_id, 0 | 1 | 30) || fix != Fix::None {
            return Ok(None);
        }
        Ok(Some(Arc::new(f.qtensor(t, device)?)))
    }

    /// The candle dtype of a dense (F32, F16, BF16) stored tensor.
    pub fn dense_dtype(&self, name: &str) -> Option<DType> {
        let (_, t, fix) = self.entry_fix(name)?;
        if fix != Fix::None {
            return Some(DType::F32);
        }
        match t.type_id {
            0 => Some(DType::F32),
            1 => Some(DType::F16),
            30 => Some(DType::BF16),
            _ => None,
        }
    }

    /// ggml type name of a stored tensor (`Q4_K`, `F32`, ...).
    pub fn type_of(&self, name: &str) -> Option<String> {
        self.entry(name).map(|(_, t)| t.type_name())
    }

    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.map.keys().cloned().collect();
        v.sort();
        v
    }
}

fn parse_err(f: &GgufFile, message: String) -> LoadError {
    LoadError::Parse {
        path: f.path.clone(),
        message,
    }
}

/// Checks that `f` is a Gemma 4 text model GGUF (not a projector, not another architecture).
pub fn check_text_model(f: &GgufFile) -> Result<(), LoadError> {
    if f.meta(CACHE_MARK).is_some() {
        return Ok(());
    }
    if f.meta("general.type").and_then(Value::as_str) == Some("mmproj")
        || f.meta("clip.projector_type").is_some()
        || f.meta("clip.has_vision_encoder").is_some()
    {
        return Err(parse_err(
            f,
            "is a projector (mmproj) GGUF, not a text model; pass the model GGUF and give this one as --mmproj".into(),
        ));
    }
    match f.architecture() {
        Some("gemma4") => Ok(()),
        Some(other) => Err(parse_err(
            f,
            format!(
                "GGUF of architecture {other:?}; percept reads Gemma 4 (\"gemma4\": E2B, E4B, 12B)"
            ),
        )),
        None => Err(parse_err(f, "GGUF without general.architecture".into())),
    }
}

/// The projector type of an mmproj GGUF (`gemma4v`, `gemma4uv`, ...), vision first.
pub fn projector_types(f: &GgufFile) -> (Option<String>, Option<String>) {
    let s = |k: &str| f.meta(k).and_then(Value::as_str).map(String::from);
    let any = s("clip.projector_type");
    (
        s("clip.vision.projector_type").or(any.clone()),
        s("clip.audio.projector_type").or(any),
    )
}

/// Whether a GGUF is llama.cpp's projector file.
pub fn is_mmproj(f: &GgufFile) -> bool {
    f.meta("general.type").and_then(Value::as_str) == Some("mmproj")
        || f.meta("clip.projector_type").is_some()
        || f.meta("clip.vision.projector_type").is_some()
        || f.meta("clip.audio.projector_type").is_some()
}

fn tokens(f: &GgufFile) -> Result<Vec<&str>, LoadError> {
    f.meta("tokenizer.ggml.tokens")
        .and_then(Value::as_array)
        .ok_or_else(|| parse_err(f, "no tokenizer.ggml.tokens in the metadata".into()))?
        .iter()
        .map(|v| {
            v.as_str()
                .ok_or_else(|| parse_err(f, "tokenizer.ggml.tokens holds a non-string".into()))
        })
        .collect()
}

/// `config.json` of the checkpoint the GGUF was converted from, as far as the decoder needs
/// it. `unified` picks `gemma4_unified` (the 12B); see [`is_unified`].
pub fn config_json(
    f: &GgufFile,
    unified: bool,
    projector: Option<&GgufFile>,
) -> Result<serde_json::Value, LoadError> {
    let a = "gemma4";
    let key = |k: &str| f.meta(&format!("{a}.{k}"));
    let need = |k: &str| {
        key(k)
            .and_then(Value::as_u64)
            .map(|v| v as usize)
            .ok_or_else(|| parse_err(f, format!("metadata {a}.{k} is missing")))
    };
    let n = need("block_count")?;
    let hidden = need("embedding_length")?;
    let heads = need("attention.head_count").or_else(|_| {
        key("attention.head_count")
            .and_then(Value::as_array)
            .and_then(|v| v.first())
            .and_then(Value::as_u64)
            .map(|v| v as usize)
            .ok_or_else(|| parse_err(f, format!("metadata {a}.attention.head_count is missing")))
    })?;
    let per_layer = |k: &str| -> Result<Vec<usize>, LoadError> {
        match key(k) {
            Some(Value::Array(v)) => {
                let out: Vec<usize> = v
                    .iter()
                    .filter_map(Value::as_u64)
                    .map(|x| x as usize)
                    .collect();
                if out.len() != n {
                    return Err(parse_err(
                        f,
                        format!("metadata {a}.{k} has {} values for {n} layers", out.len()),
                    ));
                }
                Ok(out)
            }
            Some(v) => Ok(vec![v.as_u64().unwrap_or(0) as usize; n]),
            None => Err(parse_err(f, format!("metadata {a}.{k} is missing"))),
        }
    };
    let ff = per_layer("feed_forward_length")?;
    let kv = per_layer("attention.head_count_kv")?;
    let swa: Vec<bool> = match key("attention.sliding_window_pattern") {
        Some(Value::Array(v)) if v.len() == n => {
            v.iter().map(|b| b.as_bool().unwrap_or(false)).collect()
        }
        _ => {
            return Err(parse_err(
                f,
                format!(
                    "metadata {a}.attention.sliding_window_pattern is missing or not {n} values"
                ),
            ))
        }
    };
    let head_full = need("attention.key_length")?;
    let head_swa = need("attention.key_length_swa").unwrap_or(head_full);
    let shared = need("attention.shared_kv_layers").unwrap_or(0);
    let ple = need("embedding_length_per_layer_input").unwrap_or(0);
    let window = need("attention.sliding_window")?;
    let eps = key("attention.layer_norm_rms_epsilon")
        .and_then(Value::as_f64)
        .unwrap_or(1e-6);
    let softcap = key("final_logit_softcapping").and_then(Value::as_f64);
    let theta_full = key("rope.freq_base")
        .and_then(Value::as_f64)
        .unwrap_or(1_000_000.0);
    let theta_swa = key("rope.freq_base_swa")
        .and_then(Value::as_f64)
        .unwrap_or(10_000.0);
    let ctx = need("context_length").unwrap_or(131_072);
    let embd = f
        .get("token_embd.weight")
        .ok_or_else(|| parse_err(f, "no token_embd.weight".into()))?;
    let vocab = embd.shape[0];
    // The full layers' rotated share: `rope_freqs` holds 1 for each rotated pair, 1e30 for the
    // pairs left alone (see the converter's `generate_extra_tensors`).
    let partial = match f.get("rope_freqs.weight") {
        Some(t) => {
            let v = f.dense(t, &Device::Cpu, DType::F32)?;
            let v = v
                .flatten_all()
                .and_then(|v| v.to_vec1::<f32>())
                .map_err(|e| LoadError::candle("rope_freqs", e))?;
            let rotated = v.iter().filter(|&&x| x < 1e10).count();
            2.0 * rotated as f64 / head_full as f64
        }
        None => 1.0,
    };
    let first_shared = n - shared.min(n);
    let full_layers: Vec<usize> = (0..n).filter(|&i| !swa[i]).collect();
    // K=V: a full layer that owns its K/V but has no V projection.
    let k_eq_v = full_layers.iter().any(|&i| {
        i < first_shared
            && f.get(&format!("blk.{i}.attn_k.weight")).is_some()
            && f.get(&format!("blk.{i}.attn_v.weight")).is_none()
    });
    let kv_swa = (0..n).find(|&i| swa[i]).map(|i| kv[i]).unwrap_or(kv[0]);
    let kv_full = full_layers.first().map(|&i| kv[i]).unwrap_or(kv_swa);
    let inter = ff[0];
    let double_wide = ff.iter().any(|&x| x == 2 * inter && inter > 0);
    let layer_types: Vec<&str> = swa
        .iter()
        .map(|&s| {
            if s {
                "sliding_attention"
            } else {
                "full_attention"
            }
        })
        .collect();
    let toks = tokens(f)?;
    let id = |s: &str| toks.iter().position(|t| *t == s).map(|i| i as u32);
    let tid = |k: &str| f.meta(k).and_then(Value::as_u64).map(|v| v as u32);
    let eos = tid("tokenizer.ggml.eos_token_id").unwrap_or(1);
    let mut eos_ids = vec![eos];
    eos_ids.extend(id("<turn|>"));
    let mut text = serde_json::json!({
        "model_type": if unified { "gemma4_unified_text" } else { "gemma4_text" },
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": n,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_swa,
        "head_dim": head_swa,
        "global_head_dim": head_full,
        "num_global_key_value_heads": if k_eq_v || kv_full != kv_swa { Some(kv_full) } else { None },
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": ctx,
        "rms_norm_eps": eps,
        "pad_token_id": tid("tokenizer.ggml.padding_token_id").unwrap_or(0),
        "eos_token_id": eos_ids,
        "bos_token_id": tid("tokenizer.ggml.bos_token_id").unwrap_or(2),
        "tie_word_embeddings": f.get("output.weight").is_none(),
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default", "rope_theta": theta_swa},
            "full_attention": {"rope_type": "proportional", "partial_rotary_factor": partial,
                               "rope_theta": theta_full}
        },
        "attention_bias": false,
        "sliding_window": window,
        "layer_types": layer_types,
        "final_logit_softcapping": softcap,
        "use_bidirectional_attention": if unified { Some("vision") } else { None },
        "attention_k_eq_v": k_eq_v,
        "num_kv_shared_layers": shared,
        "enable_moe_block": false,
        "use_double_wide_mlp": double_wide,
    });
    if let (Some(obj), false) = (text.as_object_mut(), unified) {
        let ple_rows = f
            .get("per_layer_token_embd.weight")
            .map(|t| t.shape[0])
            .unwrap_or(vocab);
        obj.insert("hidden_size_per_layer_input".into(), ple.into());
        obj.insert("vocab_size_per_layer_input".into(), ple_rows.into());
    }
    let (vision, audio) = match projector {
        Some(p) => super::gguf_mmproj::configs(p)?,
        None => (serde_json::Value::Null, serde_json::Value::Null),
    };
    let mut top = serde_json::json!({
        "model_type": if unified { "gemma4_unified" } else { "gemma4" },
        "text_config": text,
        "vision_config": vision,
        "audio_config": audio,
        "eos_token_id": eos_ids,
        "tie_word_embeddings": true,
    });
    for (k, tok) in [
        ("boi_token_id", "<|image>"),
        ("eoi_token_id", "<image|>"),
        ("image_token_id", "<|image|>"),
        ("video_token_id", "<|video|>"),
        ("boa_token_id", "<|audio>"),
        ("eoa_token_index", "<audio|>"),
        ("audio_token_id", "<|audio|>"),
    ] {
        if let (Some(i), Some(obj)) = (id(tok), top.as_object_mut()) {
            obj.insert(k.into(), i.into());
        }
    }
    Ok(top)
}

/// Whether the text GGUF is the 12B (`gemma4_unified`; llama.cpp writes both as `gemma4`):
/// its projector says `gemma4uv` / `gemma4ua`; without a projector, the decoder without
/// per-layer embeddings is the 12B (E2B and E4B both have them).
pub fn is_unified(text: &GgufFile, mmproj: Option<&GgufFile>) -> bool {
    if let Some(m) = mmproj {
        let (v, a) = projector_types(m);
        return v.as_deref() == Some("gemma4uv") || a.as_deref() == Some("gemma4ua");
    }
    text.meta("gemma4.embedding_length_per_layer_input")
        .and_then(Value::as_u64)
        .unwrap_or(0)
        == 0
}

/// Tokens the converter marks USER_DEFINED only so llama.cpp prints them; they are special
/// in the checkpoint's tokenizer.
fn looks_special(tok: &str) -> bool {
    tok.len() > 2
        && tok.starts_with('<')
        && tok.ends_with('>')
        && !tok.starts_with("<0x")
        && (tok.contains('|')
            || tok.starts_with("<unused")
            || tok.starts_with("<start_of_")
            || tok.starts_with("<end_of_"))
}

/// `tokenizer.json` rebuilt from `tokenizer.ggml.*`: Gemma's BPE with byte fallback (`▁` for
/// spaces, no pre-tokenizer), the merges as stored, control / user-defined / special-looking
/// tokens as added tokens so that prompts split on them as the checkpoint's tokenizer does.
pub fn tokenizer_json(f: &GgufFile) -> Result<serde_json::Value, LoadError> {
    let model = f
        .meta("tokenizer.ggml.model")
        .and_then(Value::as_str)
        .unwrap_or("");
    if !matches!(model, "gemma4" | "llama") {
        return Err(parse_err(
            f,
            format!("tokenizer.ggml.model {model:?}; percept rebuilds Gemma 4's BPE tokenizer (\"gemma4\")"),
        ));
    }
    let toks = tokens(f)?;
    let types: Vec<i64> = match f.meta("tokenizer.ggml.token_type") {
        Some(Value::Array(v)) => v
            .iter()
            .map(|x| x.as_u64().map(|u| u as i64).unwrap_or(1))
            .collect(),
        _ => vec![1; toks.len()],
    };
    let merges: Vec<&str> = match f.meta("tokenizer.ggml.merges") {
        Some(Value::Array(v)) => v.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    let mut vocab = serde_json::Map::new();
    let mut added = Vec::new();
    for (i, t) in toks.iter().enumerate() {
        vocab.insert((*t).to_string(), i.into());
        let ty = types.get(i).copied().unwrap_or(1);
        // 2 unknown, 3 control, 4 user-defined, 5 unused (ggml's llama_token_type).
        let is_added = matches!(ty, 2..=5) || looks_special(t);
        if is_added {
            let special = ty != 4 || looks_special(t);
            added.push(
                serde_json::json!({"id": i, "content": t, "single_word": false,
                "lstrip": false, "rstrip": false, "normalized": false, "special": special}),
            );
        }
    }
    let unk = f
        .meta("tokenizer.ggml.unknown_token_id")
        .and_then(Value::as_u64)
        .and_then(|i| toks.get(i as usize))
        .copied()
        .unwrap_or("<unk>");
    Ok(gemma_bpe_tokenizer_json(
        added,
        unk,
        serde_json::Value::Object(vocab),
        serde_json::json!(merges),
    ))
}

/// A `tokenizer.json` of Gemma 4's form (SentencePiece-style BPE: spaces as `▁`, byte
/// fallback) around the given added tokens, unknown token, vocabulary and merges. The GGUF
/// loader rebuilds the real tokenizer with it; the tiny test checkpoints are written with it.
pub fn gemma_bpe_tokenizer_json(
    added: Vec<serde_json::Value>,
    unk: &str,
    vocab: serde_json::Value,
    merges: serde_json::Value,
) -> serde_json::Value {
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "▁"},
        "pre_tokenizer": null,
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"}
        ]},
        "model": {"type": "BPE", "dropout": null, "unk_token": unk,
            "continuing_subword_prefix": null, "end_of_word_suffix": null,
            "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
            "vocab": vocab, "merges": merges}
    })
}

/// The GGUF files that make up one model: the text GGUF and its projector, if any.
#[derive(Debug, Clone)]
pub struct GgufPaths {
    pub model: PathBuf,
    pub mmproj: Option<PathBuf>,
    /// Where they were found, for `model info` (`file`, `LM Studio folder`, `ollama:NAME:TAG`).
    pub source: String,
}

fn is_gguf_path(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

fn file_name_lower(p: &Path) -> String {
    p.file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("")
        .to_ascii_lowercase()
}

/// `mmproj*.gguf` files in a folder, sorted.
fn mmprojs_in(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && is_gguf_path(p) && file_name_lower(p).starts_with("mmproj"))
        .collect();
    v.sort();
    v
}

/// The projector for `model` among `candidates`: the one whose name (without `mmproj-`)
/// shares the longest prefix with the model's file name (a folder can hold the projectors
/// of several models or quants).
fn best_mmproj(model: &Path, candidates: Vec<PathBuf>) -> Option<PathBuf> {
    let m = file_name_lower(model);
    let score = |c: &PathBuf| {
        let n = file_name_lower(c);
        let n = n
            .trim_start_matches("mmproj")
            .trim_start_matches(['-', '_', '.'])
            .to_string();
        m.chars().zip(n.chars()).take_while(|(a, b)| a == b).count()
    };
    let best = candidates.iter().map(score).max()?;
    candidates.into_iter().find(|c| score(c) == best)
}

/// Resolves `spec` to GGUF files when it names any: a `.gguf` file, a folder holding
/// `.gguf` files and no `config.json` (LM Studio's `<publisher>/<repo>/`), or
/// `ollama:NAME[:TAG]`. None when `spec` is something else (a checkpoint folder, a hub id).
pub fn resolve(spec: &str, mmproj: Option<&Path>) -> Result<Option<GgufPaths>, LoadError> {
    if let Some(name) = spec.strip_prefix("ollama:") {
        return ollama(name, mmproj).map(Some);
    }
    let p = Path::new(spec);
    if p.is_file() && is_gguf_path(p) {
        let beside = match mmproj {
            Some(m) => Some(m.to_path_buf()),
            None => p.parent().and_then(|d| best_mmproj(p, mmprojs_in(d))),
        };
        return Ok(Some(GgufPaths {
            model: p.to_path_buf(),
            mmproj: beside,
            source: "file".into(),
        }));
    }
    if p.is_dir() && !p.join("config.json").is_file() {
        let mut models: Vec<PathBuf> = std::fs::read_dir(p)
            .map_err(|source| LoadError::Io {
                path: p.to_path_buf(),
                source,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|q| q.is_file() && is_gguf_path(q) && !file_name_lower(q).starts_with("mmproj"))
            .collect();
        if models.is_empty() {
            return Ok(None);
        }
        models.sort();
        if models.len() > 1 {
            return Err(LoadError::NotFound(format!(
                "{} holds {} model GGUF files ({}); name one of them",
                p.display(),
                models.len(),
                models
                    .iter()
                    .filter_map(|m| m.file_name().and_then(|n| n.to_str()))
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
        let mmproj = mmproj
            .map(Path::to_path_buf)
            .or_else(|| best_mmproj(&models[0], mmprojs_in(p)));
        return Ok(Some(GgufPaths {
            model: models.remove(0),
            mmproj,
            source: "LM Studio folder".into(),
        }));
    }
    Ok(None)
}

/// Ollama's model store: `$OLLAMA_MODELS`, else `~/.ollama/models`.
pub fn ollama_root() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("OLLAMA_MODELS") {
        if !p.is_empty() {
            return Some(PathBuf::from(p));
        }
    }
    std::env::var("HOME")
        .ok()
        .map(|h| PathBuf::from(h).join(".ollama/models"))
}

/// `ollama:NAME[:TAG]` through the manifest store: `manifests/registry.ollama.ai/library/NAME/TAG`
/// (or `NAMESPACE/NAME`) lists layers; the `application/vnd.ollama.image.model` layer is the
/// text GGUF, `application/vnd.ollama.image.projector` the projector, each a blob
/// `blobs/sha256-<hex>`.
pub fn ollama(spec: &str, mmproj: Option<&Path>) -> Result<GgufPaths, LoadError> {
    let root = ollama_root().ok_or_else(|| {
        LoadError::NotFound("ollama: neither OLLAMA_MODELS nor HOME is set".into())
    })?;
    let (name, tag) = match spec.rsplit_once(':') {
        Some((n, t)) if !t.contains('/') => (n, t),
        _ => (spec, "latest"),
    };
    if name.is_empty()
        || name
            .split('/')
            .any(|s| s.is_empty() || s == "." || s == "..")
        || tag.contains("..")
    {
        return Err(LoadError::NotFound(format!(
            "ollama:{spec}: not a model name (NAME[:TAG])"
        )));
    }
    let path = if name.contains('/') {
        root.join("manifests/registry.ollama.ai")
            .join(name)
            .join(tag)
    } else {
        root.join("manifests/registry.ollama.ai/library")
            .join(name)
            .join(tag)
    };
    let text = std::fs::read_to_string(&path).map_err(|_| {
        LoadError::NotFound(format!(
            "ollama:{name}:{tag} is not in the Ollama store ({} has no manifest {})",
            root.display(),
            path.display()
        ))
    })?;
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| LoadError::Parse {
        path: path.clone(),
        message: e.to_string(),
    })?;
    let layers = v
        .get("layers")
        .and_then(|l| l.as_array())
        .cloned()
        .unwrap_or_default();
    let blob = |media: &str| -> Result<Option<PathBuf>, LoadError> {
        let Some(l) = layers
            .iter()
            .find(|l| l.get("mediaType").and_then(|m| m.as_str()) == Some(media))
        else {
            return Ok(None);
        };
        let digest = l.get("digest").and_then(|d| d.as_str()).unwrap_or("");
        let hex = digest.strip_prefix("sha256:").unwrap_or("");
        if hex.is_empty() || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(LoadError::Parse {
                path: path.clone(),
                message: format!("layer {media} has digest {digest:?}, not sha256:<hex>"),
            });
        }
        let p = root.join("blobs").join(format!("sha256-{hex}"));
        if !p.is_file() {
            return Err(LoadError::NotFound(format!(
                "ollama:{name}:{tag}: blob {} is missing",
                p.display()
            )));
        }
        // Ollama can store models in its own layout; only llama.cpp's GGUF is read here.
        let mut magic = [0u8; 4];
        let ok = std::fs::File::open(&p)
            .and_then(|mut fh| std::io::Read::read_exact(&mut fh, &mut magic))
            .is_ok();
        if !ok || &magic != b"GGUF" {
            return Err(LoadError::Parse {
                path: p.clone(),
                message: format!("the {media} blob of ollama:{name}:{tag} is not a GGUF file in llama.cpp's layout"),
            });
        }
        Ok(Some(p))
    };
    let model = blob("application/vnd.ollama.image.model")?.ok_or_else(|| LoadError::Parse {
        path: path.clone(),
        message: "manifest has no application/vnd.ollama.image.model layer".into(),
    })?;
    let projector = match mmproj {
        Some(m) => Some(m.to_path_buf()),
        None => blob("application/vnd.ollama.image.projector")?,
    };
    Ok(GgufPaths {
        model,
        mmproj: projector,
        source: format!("ollama:{name}:{tag}"),
    })
}

/// percept's cache folder: `$XDG_CACHE_HOME/percept`, else `~/.cache/percept`.
pub fn cache_root() -> PathBuf {
    if let Ok(x) = std::env::var("XDG_CACHE_HOME") {
        if !x.is_empty() {
            return PathBuf::from(x).join("percept");
        }
    }
    std::env::var("HOME")
        .map(|h| PathBuf::from(h).join(".cache/percept"))
        .unwrap_or_else(|_| std::env::temp_dir().join("percept-cache"))
}

/// A stable key of a file's identity: path, size, mtime (FNV-1a, hex).
pub fn file_identity(paths: &[&Path]) -> String {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    let mut eat = |b: &[u8]| {
        for &x in b {
            h = (h ^ x as u64).wrapping_mul(0x100_0000_01b3);
        }
    };
    for p in paths {
        let abs = std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        eat(abs.to_string_lossy().as_bytes());
        if let Ok(m) = std::fs::metadata(p) {
            eat(&m.len().to_le_bytes());
            if let Ok(t) = m.modified() {
                if let Ok(d) = t.duration_since(std::time::UNIX_EPOCH) {
                    eat(&d.as_nanos().to_le_bytes());
                }
            }
        }
        eat(&[0]);
    }
    format!("{h:016x}")
}

/// The files of a GGUF model as a [`ModelFiles`]: `weights` are the GGUF paths; the config,
/// tokenizer, chat template and generation config rebuilt from the metadata are written to
/// `<cache>/gguf-meta/<identity>/` (small, rewritten when the GGUF changes).
pub fn model_files(paths: &GgufPaths) -> Result<ModelFiles, LoadError> {
    let text = GgufFile::open(&paths.model)?;
    check_text_model(&text)?;
    let proj = match &paths.mmproj {
        Some(p) => {
            let m = GgufFile::open(p)?;
            if !is_mmproj(&m) {
                return Err(parse_err(
                    &m,
                    "given as projector but is not an mmproj GGUF".into(),
                ));
            }
            Some(m)
        }
        None => None,
    };
    let unified = is_unified(&text, proj.as_ref());
    let mut ids: Vec<&Path> = vec![&paths.model];
    if let Some(p) = &paths.mmproj {
        ids.push(p);
    }
    let dir = cache_root().join("gguf-meta").join(file_identity(&ids));
    std::fs::create_dir_all(&dir).map_err(|source| LoadError::Io {
        path: dir.clone(),
        source,
    })?;
    let write = |name: &str, body: String| -> Result<PathBuf, LoadError> {
        let p = dir.join(name);
        static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = dir.join(format!(".{name}.{}-{seq}", std::process::id()));
        std::fs::write(&tmp, body)
            .and_then(|_| std::fs::rename(&tmp, &p))
            .map_err(|source| LoadError::Io {
                path: p.clone(),
                source,
            })?;
        Ok(p)
    };
    let cfg = config_json(&text, unified, proj.as_ref())?;
    let config = write("config.json", cfg.to_string())?;
    let tokenizer = write("tokenizer.json", tokenizer_json(&text)?.to_string())?;
    let chat_template = match text.meta("tokenizer.chat_template").and_then(Value::as_str) {
        Some(t) => Some(write("chat_template.jinja", t.to_string())?),
        None => None,
    };
    let generation_config = Some(write(
        "generation_config.json",
        serde_json::json!({"eos_token_id": cfg["eos_token_id"]}).to_string(),
    )?);
    let mut weights = vec![paths.model.clone()];
    weights.extend(paths.mmproj.clone());
    Ok(ModelFiles {
        dir,
        config,
        weights,
        tokenizer: Some(tokenizer),
        tokenizer_config: None,
        chat_template,
        generation_config,
    })
}

/// Summary of the GGUF files behind a model, for `model info`.
pub fn describe(paths: &[PathBuf]) -> Result<serde_json::Value, LoadError> {
    let mut out = Vec::new();
    for p in paths {
        let f = GgufFile::open(p)?;
        let mut meta = BTreeMap::new();
        for k in [
            "general.architecture",
            "general.type",
            "general.name",
            "general.file_type",
            "clip.vision.projector_type",
            "clip.audio.projector_type",
            CACHE_MARK,
        ] {
            if let Some(v) = f.meta(k) {
                meta.insert(k, v.summary());
            }
        }
        out.push(serde_json::json!({
            "path": p,
            "version": f.version,
            "tensors": f.tensors.len(),
            "data_bytes": f.data_bytes(),
            "tensor_types": f.type_counts(),
            "metadata": meta,
        }));
    }
    Ok(serde_json::Value::Array(out))
}
