//! Finding a checkpoint and reading its tensors.
//!
//! A model is a Hugging Face-style folder: `config.json`, `model.safetensors` or shards listed
//! in `model.safetensors.index.json`, `tokenizer.json`, a chat template
//! (`chat_template.jinja` or inside `tokenizer_config.json`) and `generation_config.json`.
//! A hub id (`google/gemma-4-E2B-it`) is looked up in the local HF cache (`$HF_HOME/hub`,
//! default `~/.cache/huggingface/hub`); with the `hub` feature (on by default) and
//! `HF_HUB_OFFLINE` unset it is downloaded into that cache ([`super::hub`]). Pickle
//! checkpoints are refused.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::safetensors::MmapedSafetensors;
use candle_core::{DType, Device, Tensor};

use super::config::ConfigError;

/// Everything that can go wrong while loading a model.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("model not found: {0}")]
    NotFound(String),
    #[error(
        "{path}: pickle checkpoints (.bin/.pt/.pth) are refused because loading them can run \
         arbitrary code; convert to safetensors"
    )]
    Pickle { path: PathBuf },
    #[error("missing tensor {name}")]
    MissingTensor { name: String },
    #[error("tensor {name} has shape {actual:?}, expected {expected:?}")]
    ShapeMismatch {
        name: String,
        expected: Vec<usize>,
        actual: Vec<usize>,
    },
    #[error("reading {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("parsing {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{context}: {source}")]
    Candle {
        context: String,
        source: candle_core::Error,
    },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("hub download of {repo}: {message}")]
    Hub { repo: String, message: String },
}

impl LoadError {
    pub fn candle(context: impl Into<String>, source: candle_core::Error) -> Self {
        LoadError::Candle {
            context: context.into(),
            source,
        }
    }
}

/// Paths of the files that make up one checkpoint.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub dir: PathBuf,
    pub config: PathBuf,
    pub weights: Vec<PathBuf>,
    pub tokenizer: Option<PathBuf>,
    pub tokenizer_config: Option<PathBuf>,
    pub chat_template: Option<PathBuf>,
    pub generation_config: Option<PathBuf>,
}

fn existing(p: PathBuf) -> Option<PathBuf> {
    p.is_file().then_some(p)
}

impl ModelFiles {
    /// Resolves a local folder.
    pub fn from_dir(dir: &Path) -> Result<Self, LoadError> {
        if !dir.is_dir() {
            return Err(LoadError::NotFound(format!(
                "{} is not a directory",
                dir.display()
            )));
        }
        let config = dir.join("config.json");
        if !config.is_file() {
            return Err(LoadError::NotFound(format!(
                "{} has no config.json",
                dir.display()
            )));
        }
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let weights = if index.is_file() {
            let text = std::fs::read_to_string(&index).map_err(|source| LoadError::Io {
                path: index.clone(),
                source,
            })?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| LoadError::Parse {
                    path: index.clone(),
                    message: e.to_string(),
                })?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| LoadError::Parse {
                    path: index.clone(),
                    message: "no weight_map object".into(),
                })?;
            let files: BTreeSet<String> = map
                .values()
                .filter_map(|f| f.as_str().map(str::to_string))
                .collect();
            let mut out = Vec::new();
            for f in files {
                let p = dir.join(&f);
                refuse_pickle(&p)?;
                if !p.is_file() {
                    return Err(LoadError::NotFound(format!(
                        "shard {} listed in {} is missing",
                        p.display(),
                        index.display()
                    )));
                }
                out.push(p);
            }
            out
        } else if single.is_file() {
            vec![single]
        } else {
            for name in [
                "pytorch_model.bin",
                "model.bin",
                "model.pt",
                "pytorch_model.bin.index.json",
            ] {
                let p = dir.join(name);
                if p.exists() {
                    return Err(LoadError::Pickle { path: p });
                }
            }
            return Err(LoadError::NotFound(format!(
                "{} has neither model.safetensors nor model.safetensors.index.json",
                dir.display()
            )));
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            config,
            weights,
            tokenizer: existing(dir.join("tokenizer.json")),
            tokenizer_config: existing(dir.join("tokenizer_config.json")),
            chat_template: existing(dir.join("chat_template.jinja")),
            generation_config: existing(dir.join("generation_config.json")),
        })
    }

    /// Resolves a local path, or a hub id through the HF cache (and the hub with the `hub`
    /// feature).
    pub fn resolve(spec: &str) -> Result<Self, LoadError> {
        Self::resolve_with(spec, None)
    }

    /// [`ModelFiles::resolve`], and GGUF models (`x.gguf`, an LM Studio folder,
    /// `ollama:NAME[:TAG]`) with an explicit projector (`--mmproj`); see
    /// [`super::gguf_model::resolve`].
    pub fn resolve_with(spec: &str, mmproj: Option<&Path>) -> Result<Self, LoadError> {
        if let Some(g) = super::gguf_model::resolve(spec, mmproj)? {
            return super::gguf_model::model_files(&g);
        }
        let p = Path::new(spec);
        if p.exists() {
            refuse_pickle(p)?;
            return Self::from_dir(p);
        }
        if !looks_like_hub_id(spec) {
            return Err(LoadError::NotFound(format!(
                "{spec}: no such folder, and not a hub id (owner/name)"
            )));
        }
        if let Some(dir) = hf_cache_snapshot(spec) {
            if let Ok(files) = Self::from_dir(&dir) {
                return Ok(files);
            }
        }
        download(spec)
    }
}

fn looks_like_hub_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 2 && parts.iter().all(|p| !p.is_empty() && !p.starts_with('.'))
}

fn refuse_pickle(p: &Path) -> Result<(), LoadError> {
    let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
    if matches!(ext, "bin" | "pt" | "pth" | "pkl" | "ckpt") {
        return Err(LoadError::Pickle {
            path: p.to_path_buf(),
        });
    }
    Ok(())
}

/// `$HF_HOME/hub` (or `$HF_HUB_CACHE`), default `~/.cache/huggingface/hub`.
pub fn hf_hub_cache_dir() -> Option<PathBuf> {
    if let Ok(c) = std::env::var("HF_HUB_CACHE") {
        return Some(PathBuf::from(c));
    }
    if let Ok(h) = std::env::var("HF_HOME") {
        return Some(PathBuf::from(h).join("hub"));
    }
    std::env::var("HOME")
        .ok()
        .map(|h| PathBuf::from(h).join(".cache/huggingface/hub"))
}

/// The snapshot folder of `repo` in the HF cache (`refs/main` first, else any snapshot).
fn hf_cache_snapshot(repo: &str) -> Option<PathBuf> {
    let root = hf_hub_cache_dir()?.join(format!("models--{}", repo.replace('/', "--")));
    if let Ok(r) = std::fs::read_to_string(root.join("refs/main")) {
        let snap = root.join("snapshots").join(r.trim());
        if snap.is_dir() {
            return Some(snap);
        }
    }
    let mut snaps: Vec<PathBuf> = std::fs::read_dir(root.join("snapshots"))
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    snaps.sort();
    snaps.pop()
}

fn offline() -> bool {
    matches!(
        std::env::var("HF_HUB_OFFLINE").as_deref(),
        Ok("1") | Ok("true") | Ok("TRUE") | Ok("yes")
    )
}

#[cfg(not(feature = "hub"))]
fn download(repo: &str) -> Result<ModelFiles, LoadError> {
    let why = if offline() {
        "HF_HUB_OFFLINE is set"
    } else {
        "this build has no `hub` feature"
    };
    Err(LoadError::NotFound(format!(
        "{repo} is not in the HF cache ({}) and {why}",
        hf_hub_cache_dir()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "unknown".into())
    )))
}

#[cfg(feature = "hub")]
fn download(repo: &str) -> Result<ModelFiles, LoadError> {
    if offline() {
        return Err(LoadError::NotFound(format!(
            "{repo} is not in the HF cache and HF_HUB_OFFLINE is set"
        )));
    }
    super::hub::Hub::from_env()?.download(repo)
}

#[derive(Clone)]
enum Backend {
    Mmap(Arc<MmapedSafetensors>),
    /// Seeded random tensors of whatever shape is asked (benchmarks at real shapes without
    /// any checkpoint on disk).
    Random(u64),
    /// GGUF files (llama.cpp's or percept's quantized cache), tensors under checkpoint names.
    Gguf(Arc<super::gguf_model::GgufTensors>),
    /// Zeros of whatever shape is asked, recording each name and shape: a load over these
    /// lists a checkpoint's tensors without computing any (the zeros are calloc'd pages a
    /// dense load never touches). See [`Weights::shapes`].
    Shapes(Arc<std::sync::Mutex<std::collections::BTreeMap<String, Vec<usize>>>>),
}

/// Deterministic pseudo-random f32 data: uniform in `[-a, a]` around `center`.
fn random_data(seed: u64, n: usize, a: f64, center: f32) -> Vec<f32> {
    let mut rng = crate::rng::SplitMix64(seed);
    (0..n).map(|_| center + rng.uniform(a)).collect()
}

/// Rows `start..start+n` of a random `[_, dim]` matrix: each row seeded on its own, uniform
/// in `[-dim^-0.5, dim^-0.5]`.
fn random_rows(seed: u64, start: usize, n: usize, dim: usize) -> Vec<f32> {
    let a = (dim.max(1) as f64).powf(-0.5);
    let mut out = Vec::with_capacity(n * dim);
    for r in start..start + n {
        let row_seed = seed ^ (r as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        out.extend(random_data(row_seed, dim, a, 0.0));
    }
    out
}

fn name_hash(s: &str) -> u64 {
    // FNV-1a: stable across runs (std's hasher is randomly keyed).
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// Memory-mapped safetensors with typed, name- and shape-checked access.
///
/// `prefix` is prepended to every name (see [`Weights::pp`]).
#[derive(Clone)]
pub struct Weights {
    backend: Backend,
    prefix: String,
    device: Device,
    dtype: DType,
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Weights")
            .field("prefix", &self.prefix)
            .field("dtype", &self.dtype)
            .finish()
    }
}

impl Weights {
    /// Maps the given safetensors files. `dtype` is what [`Weights::get`] converts to.
    pub fn open(paths: &[PathBuf], device: &Device, dtype: DType) -> Result<Self, LoadError> {
        if !paths.is_empty() && paths.iter().all(|p| super::gguf::is_gguf_file(p)) {
            return Self::open_gguf(paths, device, dtype);
        }
        for p in paths {
            refuse_pickle(p)?;
            if !p.is_file() {
                return Err(LoadError::NotFound(format!(
                    "{} does not exist",
                    p.display()
                )));
            }
        }
        // SAFETY: the files are mapped read-only; like every mmap-based loader we rely on
        // nobody truncating the checkpoint while the model is alive.
        #[allow(unsafe_code)]
        let st = unsafe { MmapedSafetensors::multi(paths) }
            .map_err(|e| LoadError::candle("mapping safetensors", e))?;
        Ok(Self {
            backend: Backend::Mmap(Arc::new(st)),
            prefix: String::new(),
            device: device.clone(),
            dtype,
        })
    }

    /// Maps GGUF files (see [`super::gguf_model::GgufTensors`]).
    pub fn open_gguf(paths: &[PathBuf], device: &Device, dtype: DType) -> Result<Self, LoadError> {
        let files = paths
            .iter()
            .map(|p| super::gguf::GgufFile::open(p).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        for f in &files {
            f.prefetch();
        }
        Ok(Self {
            backend: Backend::Gguf(Arc::new(super::gguf_model::GgufTensors::new(files)?)),
            prefix: String::new(),
            device: device.clone(),
            dtype,
        })
    }

    /// The GGUF tensors behind these weights, if they are GGUF.
    pub fn gguf(&self) -> Option<&super::gguf_model::GgufTensors> {
        match &self.backend {
            Backend::Gguf(g) => Some(g),
            _ => None,
        }
    }

    /// `name` as stored when it is block-quantized in a GGUF file: its blocks are used where
    /// they lie (no copy, no re-quantization). None for every other backend and dense tensors.
    pub fn quantized(
        &self,
        name: &str,
    ) -> Result<Option<Arc<candle_core::quantized::QTensor>>, LoadError> {
        match &self.backend {
            Backend::Gguf(g) => g.quantized(&self.full(name), &self.device),
            _ => Ok(None),
        }
    }

    /// A view with `prefix.` prepended to names.
    pub fn pp(&self, prefix: &str) -> Self {
        let mut w = self.clone();
        w.prefix = if self.prefix.is_empty() {
            prefix.to_string()
        } else {
            format!("{}.{prefix}", self.prefix)
        };
        w
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    fn full(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    /// Random weights of any requested shape (see [`Backend::Random`]): every name exists.
    pub fn random(seed: u64, device: &Device, dtype: DType) -> Self {
        Self {
            backend: Backend::Random(seed),
            prefix: String::new(),
            device: device.clone(),
            dtype,
        }
    }

    /// Zero weights that record every tensor a load asks for; [`Weights::recorded`] then
    /// lists them (name with prefix, shape), which is the checkpoint of that config.
    pub fn shapes(device: &Device, dtype: DType) -> Self {
        Self {
            backend: Backend::Shapes(Arc::default()),
            prefix: String::new(),
            device: device.clone(),
            dtype,
        }
    }

    /// What a load over [`Weights::shapes`] asked for, sorted by name (empty otherwise).
    pub fn recorded(&self) -> Vec<(String, Vec<usize>)> {
        match &self.backend {
            Backend::Shapes(r) => r
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .map(|(n, s)| (n.clone(), s.clone()))
                .collect(),
            _ => Vec::new(),
        }
    }

    fn record(&self, name: &str, shape: &[usize]) {
        if let Backend::Shapes(r) = &self.backend {
            r.lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(self.full(name), shape.to_vec());
        }
    }

    fn mmap(&self, name: &str) -> Result<&MmapedSafetensors, LoadError> {
        match &self.backend {
            Backend::Mmap(st) => Ok(st),
            Backend::Random(_) | Backend::Shapes(_) => Err(LoadError::NotFound(format!(
                "{name}: random weights have no stored shape"
            ))),
            Backend::Gguf(_) => Err(LoadError::NotFound(format!(
                "{name}: GGUF weights are not safetensors"
            ))),
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        match &self.backend {
            Backend::Mmap(st) => st.get(&self.full(name)).is_ok(),
            Backend::Random(_) | Backend::Shapes(_) => true,
            Backend::Gguf(g) => g.contains(&self.full(name)),
        }
    }

    /// Shape of a stored tensor.
    pub fn shape_of(&self, name: &str) -> Result<Vec<usize>, LoadError> {
        let full = self.full(name);
        if let Backend::Gguf(g) = &self.backend {
            return g.shape(&full);
        }
        if let Backend::Shapes(r) = &self.backend {
            return r
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&full)
                .cloned()
                .ok_or(LoadError::MissingTensor { name: full });
        }
        let view = self
            .mmap(&full)?
            .get(&full)
            .map_err(|_| LoadError::MissingTensor { name: full.clone() })?;
        Ok(view.shape().to_vec())
    }

    /// The dtype `name` is stored in (None for random weights and block-quantized GGUF
    /// tensors, or when the file's dtype has no candle equivalent).
    pub fn stored_dtype(&self, name: &str) -> Option<DType> {
        let full = self.full(name);
        match &self.backend {
            Backend::Mmap(st) => st.get(&full).ok().and_then(|v| v.dtype().try_into().ok()),
            Backend::Gguf(g) => g.dense_dtype(&full),
            Backend::Random(_) | Backend::Shapes(_) => None,
        }
    }

    /// Errors unless `name` exists with exactly `shape`.
    pub fn check_shape(&self, name: &str, shape: &[usize]) -> Result<(), LoadError> {
        match self.backend {
            Backend::Random(_) => return Ok(()),
            Backend::Shapes(_) => {
                self.record(name, shape);
                return Ok(());
            }
            _ => {}
        }
        let actual = self.shape_of(name)?;
        if actual != shape {
            return Err(LoadError::ShapeMismatch {
                name: self.full(name),
                expected: shape.to_vec(),
                actual,
            });
        }
        Ok(())
    }

    /// Loads `name` with the given shape, converted to the default dtype.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor, LoadError> {
        self.get_dtype(name, shape, self.dtype)
    }

    /// Loads `name` with the given shape, converted to `dtype`.
    pub fn get_dtype(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
    ) -> Result<Tensor, LoadError> {
        self.check_shape(name, shape)?;
        let full = self.full(name);
        let t = match &self.backend {
            Backend::Gguf(g) => return g.dense(&full, &self.device, dtype),
            Backend::Shapes(_) => Tensor::zeros(shape, dtype, &self.device),
            Backend::Mmap(st) => st.load(&full, &self.device),
            Backend::Random(seed) => {
                let n = shape.iter().product();
                let data = match shape {
                    // Norm weights and scalars: near 1.
                    [_] => random_data(seed ^ name_hash(&full), n, 0.1, 1.0),
                    // Matrices row by row, so `get_rows_f32` (quantized tables) reads the
                    // very rows a dense load gets.
                    [rows, dim] => random_rows(seed ^ name_hash(&full), 0, *rows, *dim),
                    _ => {
                        let fan_in = *shape.last().unwrap_or(&1) as f64;
                        random_data(seed ^ name_hash(&full), n, fan_in.powf(-0.5), 0.0)
                    }
                };
                Tensor::from_vec(data, shape, &self.device)
            }
        }
        .map_err(|e| LoadError::candle(format!("loading {full}"), e))?;
        t.to_dtype(dtype)
            .map_err(|e| LoadError::candle(format!("converting {full}"), e))
    }

    /// Loads `name` if present.
    pub fn get_opt(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
    ) -> Result<Option<Tensor>, LoadError> {
        if self.contains(name) {
            self.get_dtype(name, shape, dtype).map(Some)
        } else {
            Ok(None)
        }
    }

    /// Loads rows `start..start+n` of a 2D tensor as f32, touching only those bytes of the
    /// mapping (quantizing big tables chunk by chunk).
    pub fn get_rows_f32(
        &self,
        name: &str,
        start: usize,
        n: usize,
        dim: usize,
    ) -> Result<Tensor, LoadError> {
        let full = self.full(name);
        if let Backend::Random(seed) = self.backend {
            let data = random_rows(seed ^ name_hash(&full), start, n, dim);
            return Tensor::from_vec(data, (n, dim), &self.device)
                .map_err(|e| LoadError::candle(format!("loading {full}"), e));
        }
        if let Backend::Shapes(_) = self.backend {
            return Tensor::zeros((n, dim), DType::F32, &self.device)
                .map_err(|e| LoadError::candle(format!("loading {full}"), e));
        }
        if let Backend::Gguf(g) = &self.backend {
            let shape = g.shape(&full)?;
            if shape.len() != 2 || start + n > shape[0] || shape[1] != dim {
                return Err(LoadError::ShapeMismatch {
                    name: full,
                    expected: vec![start + n, dim],
                    actual: shape,
                });
            }
            return g
                .rows_f32(&full, start, n)?
                .to_device(&self.device)
                .map_err(|e| LoadError::candle(format!("loading rows of {full}"), e));
        }
        let view = self
            .mmap(&full)?
            .get(&full)
            .map_err(|_| LoadError::MissingTensor { name: full.clone() })?;
        let shape = view.shape().to_vec();
        if shape.len() != 2 || start + n > shape[0] || shape[1] != dim {
            return Err(LoadError::ShapeMismatch {
                name: full,
                expected: vec![start + n, dim],
                actual: shape,
            });
        }
        let dim = shape[1];
        let dtype: DType = view
            .dtype()
            .try_into()
            .map_err(|e| LoadError::candle(format!("dtype of {full}"), e))?;
        let es = dtype.size_in_bytes();
        let bytes = &view.data()[start * dim * es..(start + n) * dim * es];
        let t = Tensor::from_raw_buffer(bytes, dtype, &[n, dim], &Device::Cpu)
            .and_then(|t| t.to_dtype(DType::F32))
            .and_then(|t| t.to_device(&self.device))
            .map_err(|e| LoadError::candle(format!("loading rows of {full}"), e))?;
        Ok(t)
    }

    /// All tensor names (with the full prefix), sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = match &self.backend {
            Backend::Mmap(st) => st.tensors().into_iter().map(|(n, _)| n).collect(),
            Backend::Random(_) => Vec::new(),
            Backend::Shapes(r) => r
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .keys()
                .cloned()
                .collect(),
            Backend::Gguf(g) => g.names(),
        };
        v.sort();
        v
    }
}
