//! The quantized cache: the first load of a safetensors checkpoint at a block quant
//! (`--quant q8_0` / `q4k`) writes the quantized weights once as a GGUF file under
//! `$XDG_CACHE_HOME/percept/quant/` (else `~/.cache/percept/quant/`); later starts map it and
//! use the blocks in place, so a start costs what reading the file costs.
//!
//! The file is keyed by the checkpoint files' identity (paths, sizes, mtimes of the weights
//! and `config.json`), the quant and `keep_f16`: a changed checkpoint or another setting
//! gets another file. It holds every tensor of the checkpoint under its own name: the ones
//! the quantizing load quantizes (decoder linears, the token and per-layer tables, the media
//! projections: see [`quantized_as`]) as blocks made by the same quantizer, the rest in their
//! stored dtype. Loading it therefore gives bit for bit the model the quantizing load gives.
//!
//! Checkpoints smaller than [`MIN_BYTES`] quantize in well under a second and are not
//! cached (test fixtures stay where they are). `PERCEPT_QUANT_CACHE=off` (or `0`) disables
//! the cache; `PERCEPT_QUANT_CACHE=always` caches checkpoints of any size.

use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor};

use super::gguf::Value;
use super::gguf_write::{nbytes, write_gguf, OutTensor};
use super::layers::{KeepF16, Quant, EMBED_QUANT_CHUNK_ROWS};
use super::loader::{LoadError, ModelFiles, Weights};

/// Environment variable that turns the cache off (`off`, `0`, `false`).
pub const ENV: &str = "PERCEPT_QUANT_CACHE";

/// Format version written into each file; a different version is rewritten.
pub const VERSION: u32 = 1;

/// Checkpoints whose weight files are smaller than this are quantized at every load.
pub const MIN_BYTES: u64 = 64 << 20;

/// Whether the cache is on (the default).
pub fn enabled() -> bool {
    !matches!(
        std::env::var(ENV).as_deref(),
        Ok("off") | Ok("0") | Ok("false") | Ok("no")
    )
}

/// Whether a checkpoint of `bytes` is cached (see [`MIN_BYTES`]).
fn worth_caching(bytes: u64) -> bool {
    bytes >= MIN_BYTES || std::env::var(ENV).as_deref() == Ok("always")
}

/// The cache folder: `<cache root>/quant`.
pub fn dir() -> PathBuf {
    super::gguf_model::cache_root().join("quant")
}

/// The cache file of `files` at `quant` / `keep`; None for dense quants and GGUF inputs
/// (those are used in place already).
pub fn path_for(files: &ModelFiles, quant: Quant, keep: KeepF16) -> Option<PathBuf> {
    quant.ggml()?;
    if super::gguf_info::is_gguf(files) {
        return None;
    }
    let mut ids: Vec<&Path> = files.weights.iter().map(|p| p.as_path()).collect();
    ids.push(&files.config);
    let id = super::gguf_model::file_identity(&ids);
    let stem = files
        .dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("model")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect::<String>();
    Some(dir().join(format!(
        "{stem}-{id}-{}-{}.gguf",
        quant.as_str(),
        keep.as_str()
    )))
}

/// The block type the quantizing load stores `name` (shape `shape`) in, None when it stays
/// dense. Mirrors `TextModel::load` and the towers' loaders: decoder linears and the
/// per-layer table take `quant`; the token table (tied head) and the media projections take
/// `keep_f16`'s projection quant; rows that do not fill whole blocks stay dense.
pub fn quantized_as(name: &str, shape: &[usize], quant: Quant, keep: KeepF16) -> Option<GgmlDType> {
    let [_, cols] = shape else { return None };
    let tq = keep.projection_quant(quant);
    let text = "model.language_model.";
    let q = if let Some(rest) = name.strip_prefix(text) {
        if rest == "embed_tokens.weight" {
            tq
        } else if rest == "embed_tokens_per_layer.weight"
            || rest == "per_layer_model_projection.weight"
            || rest.starts_with("layers.")
                && [
                    ".self_attn.q_proj.weight",
                    ".self_attn.k_proj.weight",
                    ".self_attn.v_proj.weight",
                    ".self_attn.o_proj.weight",
                    ".mlp.gate_proj.weight",
                    ".mlp.up_proj.weight",
                    ".mlp.down_proj.weight",
                    ".per_layer_input_gate.weight",
                    ".per_layer_projection.weight",
                ]
                .iter()
                .any(|s| rest.ends_with(s))
        {
            quant
        } else {
            return None;
        }
    } else if (name.starts_with("model.embed_vision.") || name.starts_with("model.embed_audio."))
        && name.ends_with("embedding_projection.weight")
        || (name.starts_with("model.vision_embedder.") || name.starts_with("model.embed_vision."))
            && name.ends_with("patch_dense.weight")
    {
        tq
    } else {
        return None;
    };
    let g = q.ggml()?;
    cols.is_multiple_of(g.block_size()).then_some(g)
}

/// Cache state of a checkpoint for `model info`: the folder and, for each block quant and
/// `keep_f16`, the file and its size when written.
pub fn describe(files: &ModelFiles) -> serde_json::Value {
    let mut entries = Vec::new();
    for quant in [Quant::Q8_0, Quant::Q4K] {
        for keep in [KeepF16::None, KeepF16::Projections] {
            if let Some(p) = path_for(files, quant, keep) {
                let bytes = std::fs::metadata(&p).ok().map(|m| m.len());
                entries.push(serde_json::json!({
                    "quant": quant.as_str(),
                    "keep_f16": keep.as_str(),
                    "path": p,
                    "bytes": bytes,
                }));
            }
        }
    }
    let bytes: u64 = files
        .weights
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum();
    let why_not = if !enabled() {
        Some(format!("turned off by {ENV}"))
    } else if !worth_caching(bytes) {
        Some(format!(
            "weights under {} MiB are quantized at each load",
            MIN_BYTES >> 20
        ))
    } else {
        None
    };
    serde_json::json!({"dir": dir(), "enabled": enabled(), "applies": why_not.is_none(),
        "why_not": why_not, "entries": entries})
}

/// What [`prepare`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CacheUse {
    /// Not used (dense quant, GGUF input, or turned off).
    None,
    /// Mapped an existing file.
    Hit(PathBuf),
    /// Wrote the file now (quantizing), then mapped it.
    Written(PathBuf),
}

/// The cache file to load `files` from at `quant` / `keep`, written first when missing.
/// `None` when the cache does not apply or is turned off.
pub fn prepare(files: &ModelFiles, quant: Quant, keep: KeepF16) -> Result<CacheUse, LoadError> {
    if !enabled() {
        return Ok(CacheUse::None);
    }
    let Some(path) = path_for(files, quant, keep) else {
        return Ok(CacheUse::None);
    };
    let bytes: u64 = files
        .weights
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.len())
        .sum();
    if !worth_caching(bytes) {
        return Ok(CacheUse::None);
    }
    if is_current(&path) {
        return Ok(CacheUse::Hit(path));
    }
    let parent = dir();
    std::fs::create_dir_all(&parent).map_err(|source| LoadError::Io {
        path: parent.clone(),
        source,
    })?;
    write(files, quant, keep, &path)?;
    tracing::info!(path = %path.display(), quant = quant.as_str(), "wrote the quantized cache");
    Ok(CacheUse::Written(path))
}

/// Whether `path` is a complete cache file of this version.
fn is_current(path: &Path) -> bool {
    if !path.is_file() {
        return false;
    }
    match super::gguf::GgufFile::open(path) {
        Ok(f) => {
            f.meta(super::gguf_model::CACHE_MARK)
                .and_then(Value::as_u64)
                == Some(VERSION as u64)
        }
        Err(_) => false,
    }
}

fn le_bytes(t: &Tensor) -> candle_core::Result<Vec<u8>> {
    let t = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::F32 => t
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::F16 => t
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|x| x.to_bits().to_le_bytes())
            .collect(),
        DType::BF16 => t
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|x| x.to_bits().to_le_bytes())
            .collect(),
        _ => t
            .to_dtype(DType::F32)?
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
    })
}

/// Writes the cache file of `files` at `path`: one tensor at a time, big tables quantized
/// [`EMBED_QUANT_CHUNK_ROWS`] rows at a time, so memory holds one chunk in f32 at most.
pub fn write(
    files: &ModelFiles,
    quant: Quant,
    keep: KeepF16,
    path: &Path,
) -> Result<(), LoadError> {
    let w = Weights::open(&files.weights, &Device::Cpu, DType::F32)?;
    let mut tensors = Vec::new();
    for name in w.names() {
        let shape = w.shape_of(&name)?;
        let stored = match w.stored_dtype(&name) {
            Some(d @ (DType::F32 | DType::F16 | DType::BF16)) => d,
            _ => DType::F32,
        };
        tensors.push((name, shape, stored));
    }
    let source: Vec<Value> = files
        .weights
        .iter()
        .map(|p| Value::Str(p.display().to_string()))
        .collect();
    write_from(&w, &tensors, quant, keep, source, path)
}

/// Writes a cache file at `path` holding `tensors` (checkpoint name, shape, dtype a dense
/// tensor is stored in) of `w`, quantized as [`quantized_as`] says; `source` names the
/// checkpoint files in the metadata. [`write`] passes a checkpoint's own tensors;
/// `percept bench model --load` passes random weights at a real shape.
pub fn write_from(
    w: &Weights,
    tensors: &[(String, Vec<usize>, DType)],
    quant: Quant,
    keep: KeepF16,
    source: Vec<Value>,
    path: &Path,
) -> Result<(), LoadError> {
    let mut plan: Vec<(OutTensor, Option<GgmlDType>, DType)> = Vec::new();
    for (name, shape, stored) in tensors {
        let (name, shape, stored) = (name.clone(), shape.clone(), *stored);
        let q = quantized_as(&name, &shape, quant, keep);
        let type_id = match (q, stored) {
            (Some(g), _) => super::gguf::type_id(g).unwrap_or(0),
            (None, DType::F16) => 1,
            (None, DType::BF16) => 30,
            (None, _) => 0,
        };
        let nb = nbytes(type_id, &shape);
        plan.push((
            OutTensor {
                name,
                type_id,
                shape,
                nbytes: nb,
            },
            q,
            stored,
        ));
    }
    let meta = vec![
        (
            "general.architecture".to_string(),
            Value::Str("percept-cache".into()),
        ),
        (
            super::gguf_model::CACHE_MARK.to_string(),
            Value::U32(VERSION),
        ),
        (
            "percept.cache.quant".to_string(),
            Value::Str(quant.as_str().into()),
        ),
        (
            "percept.cache.keep_f16".to_string(),
            Value::Str(keep.as_str().into()),
        ),
        ("percept.cache.source".to_string(), Value::Array(source)),
    ];
    let tensors: Vec<OutTensor> = plan.iter().map(|p| p.0.clone()).collect();
    let io = |source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    };
    write_gguf(path, &meta, &tensors, |i, out| {
        let (t, q, stored) = &plan[i];
        match q {
            Some(g) => {
                let [rows, cols] = t.shape[..] else {
                    return Err(LoadError::candle(
                        format!("quantizing {}", t.name),
                        candle_core::Error::Msg("not 2D".into()),
                    ));
                };
                let mut start = 0;
                while start < rows {
                    let n = EMBED_QUANT_CHUNK_ROWS.min(rows - start);
                    let part = w.get_rows_f32(&t.name, start, n, cols)?;
                    let qt = super::layers::quantize(&part, *g)
                        .map_err(|e| LoadError::candle(format!("quantizing {}", t.name), e))?;
                    let data = qt
                        .data()
                        .map_err(|e| LoadError::candle(format!("quantizing {}", t.name), e))?;
                    out.write_all(&data).map_err(io)?;
                    start += n;
                }
                Ok(())
            }
            None => {
                let v = w.get_dtype(&t.name, &t.shape, *stored)?;
                let b = le_bytes(&v)
                    .map_err(|e| LoadError::candle(format!("writing {}", t.name), e))?;
                out.write_all(&b).map_err(io)
            }
        }
    })
}
