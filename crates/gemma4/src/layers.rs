//! Small building blocks shared by the decoder and the towers.
//!
//! Numerics follow the reference (`modeling_gemma4.py`):
//! - [`RmsNorm`] multiplies by `w`, not `1 + w` (Gemma 2/3 used `1 + w`), and computes in f32;
//! - the activation `gelu_pytorch_tanh` is the tanh approximation of GELU (candle's `gelu`
//!   formula; on f32 CPU tensors with a vectorizable tanh, [`tanh_f32`]).

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Result as CResult, Tensor, D};

use super::loader::{LoadError, Weights};

/// Weight storage chosen at load time for decoder linears and embedding tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Quant {
    /// Full precision f32 (the default on CPU; what parity tests use).
    #[default]
    F32,
    F16,
    Bf16,
    /// 8-bit blocks of 32 (34 bytes per 32 weights).
    Q8_0,
    /// 4-bit K-quant, blocks of 256 (144 bytes per 256 weights).
    Q4K,
}

/// A name that is none of a choice's names (`--quant q5`, `keep_f16 = "all"`).
#[derive(Debug, Clone, thiserror::Error)]
#[error("'{given}' is not one of {}", .expected.join(", "))]
pub struct UnknownName {
    pub given: String,
    pub expected: &'static [&'static str],
}

fn parse_name<T: Copy>(
    s: &str,
    all: &[T],
    name: fn(T) -> &'static str,
    names: &'static [&'static str],
) -> Result<T, UnknownName> {
    let want = s.trim().to_ascii_lowercase();
    all.iter()
        .copied()
        .find(|&v| name(v) == want)
        .ok_or_else(|| UnknownName {
            given: s.to_string(),
            expected: names,
        })
}

impl std::str::FromStr for Quant {
    type Err = UnknownName;

    /// Case-insensitive: `q8_0`, `Q4K`.
    fn from_str(s: &str) -> Result<Quant, UnknownName> {
        parse_name(s, &Quant::ALL, Quant::as_str, Quant::NAMES)
    }
}

impl std::fmt::Display for Quant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Quant {
    pub const ALL: [Quant; 5] = [Quant::F32, Quant::F16, Quant::Bf16, Quant::Q8_0, Quant::Q4K];
    /// The names of [`Quant::ALL`], as [`Quant::as_str`] gives them.
    pub const NAMES: &'static [&'static str] = &["f32", "f16", "bf16", "q8_0", "q4k"];

    /// Bytes per weight, for memory estimates.
    pub fn bytes_per_weight(self) -> f64 {
        match self {
            Quant::F32 => 4.0,
            Quant::F16 | Quant::Bf16 => 2.0,
            Quant::Q8_0 => 34.0 / 32.0,
            Quant::Q4K => 144.0 / 256.0,
        }
    }

    /// The ggml block type, None for the dense float types.
    pub fn ggml(self) -> Option<GgmlDType> {
        match self {
            Quant::Q8_0 => Some(GgmlDType::Q8_0),
            Quant::Q4K => Some(GgmlDType::Q4K),
            _ => None,
        }
    }

    /// Dtype dense weights are stored in.
    pub fn dense_dtype(self) -> DType {
        match self {
            Quant::F16 => DType::F16,
            Quant::Bf16 => DType::BF16,
            _ => DType::F32,
        }
    }

    /// Dtype dense weights are stored in when activations run in `activations`: "f32"
    /// means full precision, so an f64 model (reference-precision checks) keeps f64.
    pub fn dense_dtype_for(self, activations: DType) -> DType {
        match (self, activations) {
            (Quant::F32, DType::F64) => DType::F64,
            _ => self.dense_dtype(),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Quant::F32 => "f32",
            Quant::F16 => "f16",
            Quant::Bf16 => "bf16",
            Quant::Q8_0 => "q8_0",
            Quant::Q4K => "q4k",
        }
    }
}

/// Parts kept at higher precision than `--quant` (`--keep-f16`, `[model] keep_f16`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeepF16 {
    /// Everything big takes the quant: decoder linears, the token table (tied lm_head) and
    /// the image/audio projections into the decoder.
    #[default]
    None,
    /// The image/audio projections into the decoder (`embed_vision`, `embed_audio`, and the
    /// 12B's patch embedding `patch_dense`) and the token table with its tied lm_head stay at
    /// f16 (f32 when `--quant` is f32); decoder linears and the E2B/E4B per-layer table are
    /// still quantized.
    Projections,
}

impl std::str::FromStr for KeepF16 {
    type Err = UnknownName;

    fn from_str(s: &str) -> Result<KeepF16, UnknownName> {
        parse_name(s, &KeepF16::ALL, KeepF16::as_str, KeepF16::NAMES)
    }
}

impl std::fmt::Display for KeepF16 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl KeepF16 {
    pub const ALL: [KeepF16; 2] = [KeepF16::None, KeepF16::Projections];
    pub const NAMES: &'static [&'static str] = &["none", "projections"];

    pub fn as_str(self) -> &'static str {
        match self {
            KeepF16::None => "none",
            KeepF16::Projections => "projections",
        }
    }

    /// Storage of the projections and the token table under `quant`.
    pub fn projection_quant(self, quant: Quant) -> Quant {
        match (self, quant) {
            // Block types become f16; dense types are already at least f16.
            (KeepF16::Projections, Quant::Q8_0 | Quant::Q4K) => Quant::F16,
            _ => quant,
        }
    }
}

/// The dtype the reference upcasts to for norms, softmax and RoPE: f32, except that f64
/// activations stay f64 (percept in f64 is a reference-precision check against the reference
/// patched to do the same; computing those in f32 leaves ~1e-4 of rounding in the logits).
pub fn upcast_dtype(dtype: DType) -> DType {
    if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}

/// `Gemma4RMSNorm`: `x * (mean(x^2) + eps)^-0.5 * w`, in [`upcast_dtype`], cast back to the
/// input dtype.
/// `with_scale = false` (v-norm, multimodal pre-projection norm) has no weight.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Option<Tensor>,
    eps: f64,
}

impl RmsNorm {
    /// Loads `<name>.weight` of shape `[dim]`.
    pub fn load(w: &Weights, name: &str, dim: usize, eps: f64) -> Result<Self, LoadError> {
        let weight = w.get_dtype(&format!("{name}.weight"), &[dim], DType::F32)?;
        Ok(Self {
            weight: Some(weight),
            eps,
        })
    }

    /// A norm with a given f32 weight (tests, generated checkpoints).
    pub fn from_weight(weight: Tensor, eps: f64) -> Self {
        Self {
            weight: Some(weight),
            eps,
        }
    }

    /// The `with_scale=False` variant: normalisation only.
    pub fn without_scale(eps: f64) -> Self {
        Self { weight: None, eps }
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        let dtype = x.dtype();
        let xf = x.to_dtype(upcast_dtype(dtype))?;
        let ms = (xf.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?;
        let mut y = xf.broadcast_mul(&ms.powf(-0.5)?)?;
        if let Some(w) = &self.weight {
            y = y.broadcast_mul(&w.to_dtype(xf.dtype())?)?;
        }
        y.to_dtype(dtype)
    }
}

/// A bias-free linear layer `y = x W^T` over dense or block-quantized weights.
///
/// Input may be any float dtype; it is cast to what the weight needs and the output is cast
/// back, so callers keep one activation dtype.
#[derive(Debug, Clone)]
pub struct Linear {
    inner: QMatMul,
    out_dim: usize,
    in_dim: usize,
}

impl Linear {
    /// Loads `<name>.weight` `[out, in]` and stores it as `quant` asks.
    pub fn load(
        w: &Weights,
        name: &str,
        out_dim: usize,
        in_dim: usize,
        quant: Quant,
    ) -> Result<Self, LoadError> {
        let full = format!("{name}.weight");
        // Block-quantized in a GGUF file: used in place, whatever `quant` says.
        if let Some(q) = w.quantized(&full)? {
            w.check_shape(&full, &[out_dim, in_dim])?;
            return Self::from_qtensor(q)
                .map_err(|e| LoadError::candle(format!("mapping {full}"), e));
        }
        let t = w.get_dtype(&full, &[out_dim, in_dim], quant.dense_dtype_for(w.dtype()))?;
        Self::from_tensor(t, quant).map_err(|e| LoadError::candle(format!("quantizing {full}"), e))
    }

    /// Wraps an `[out, in]` weight, quantizing it when `quant` is a block type.
    pub fn from_tensor(weight: Tensor, quant: Quant) -> CResult<Self> {
        let (out_dim, in_dim) = weight.dims2()?;
        let inner = match quant.ggml() {
            Some(g) if in_dim % g.block_size() == 0 => {
                let q = quantize(&weight, g)?;
                QMatMul::QTensor(std::sync::Arc::new(q))
            }
            // Rows that do not fill whole blocks stay dense (tiny test shapes).
            _ => QMatMul::Tensor(weight.to_dtype(quant.dense_dtype_for(weight.dtype()))?),
        };
        Ok(Self {
            inner,
            out_dim,
            in_dim,
        })
    }

    /// Shares an already quantized tensor (tied embeddings / lm_head).
    pub fn from_qtensor(q: std::sync::Arc<QTensor>) -> CResult<Self> {
        let (out_dim, in_dim) = q.shape().dims2()?;
        Ok(Self {
            inner: QMatMul::QTensor(q),
            out_dim,
            in_dim,
        })
    }

    pub fn out_dim(&self) -> usize {
        self.out_dim
    }

    pub fn in_dim(&self) -> usize {
        self.in_dim
    }

    /// How the weight is stored: `f32`, `f16`, `bf16`, `q8_0`, `q4k`.
    pub fn storage(&self) -> &'static str {
        match &self.inner {
            QMatMul::QTensor(q) => ggml_name(q.dtype()),
            QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.dtype().as_str(),
        }
    }

    /// Bytes held by the weight.
    pub fn size_in_bytes(&self) -> usize {
        match &self.inner {
            QMatMul::QTensor(q) => q.storage_size_in_bytes(),
            QMatMul::Tensor(t) | QMatMul::TensorF16(t) => {
                t.elem_count() * t.dtype().size_in_bytes()
            }
        }
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        let in_dtype = x.dtype();
        let want = match &self.inner {
            QMatMul::QTensor(_) => DType::F32,
            QMatMul::Tensor(t) | QMatMul::TensorF16(t) => t.dtype(),
        };
        let xs = if in_dtype == want {
            x.clone()
        } else {
            x.to_dtype(want)?
        };
        let y = match &self.inner {
            // Flatten to 2D: the matmul then runs as one GEMM with no broadcast copies.
            QMatMul::Tensor(w) | QMatMul::TensorF16(w) => {
                let dims = xs.dims().to_vec();
                let k = dims[dims.len() - 1];
                let rows = xs.elem_count() / k.max(1);
                let y = xs.reshape((rows, k))?.matmul(&w.t()?)?;
                let mut out = dims;
                let last = out.len() - 1;
                out[last] = self.out_dim;
                y.reshape(out)?
            }
            // Every block type on CPU: one copy of the weights (see `qmm` for why not
            // `QMatMul`). Q8_0 used to keep candle's repacked tiles beside the blocks: they
            // doubled its resident size (the 12B at q8_0 was OOM-killed at 24.3 GB on a 24 GB
            // machine, issue 19), so every quantization now reads its compact blocks.
            QMatMul::QTensor(q) if xs.device().is_cpu() && super::qmm::supports(q) => {
                let dims = xs.dims().to_vec();
                let k = dims[dims.len() - 1];
                let rows = xs.elem_count() / k.max(1);
                let lhs = xs.flatten_all()?.to_vec1::<f32>()?;
                let mut dst = vec![0f32; rows * self.out_dim];
                super::qmm::matmul(q, &lhs, rows, &mut dst)?;
                let mut out = dims;
                let last = out.len() - 1;
                out[last] = self.out_dim;
                Tensor::from_vec(dst, out, xs.device())?
            }
            QMatMul::QTensor(_) => self.inner.forward(&xs.contiguous()?)?,
        };
        if y.dtype() == in_dtype {
            Ok(y)
        } else {
            y.to_dtype(in_dtype)
        }
    }
}

fn ggml_name(g: GgmlDType) -> &'static str {
    match g {
        GgmlDType::Q8_0 => "q8_0",
        GgmlDType::Q4K => "q4k",
        GgmlDType::Q4_0 => "q4_0",
        GgmlDType::Q5K => "q5k",
        GgmlDType::Q6K => "q6k",
        GgmlDType::BF16 => "bf16",
        GgmlDType::F16 => "f16",
        GgmlDType::F32 => "f32",
        _ => "quantized",
    }
}

/// An embedding table `[rows, dim]`, dense or quantized in row chunks.
///
/// Quantized tables are kept as several [`QTensor`] chunks so that loading never holds more
/// than one chunk in f32 (the E4B PLE table is 11 GB in f32), and lookups dequantize only the
/// rows asked for.
#[derive(Debug, Clone)]
pub enum Embedding {
    Dense(Tensor),
    /// One quantized matrix (the token table, shared with the tied lm_head).
    Quantized(std::sync::Arc<QTensor>),
    Chunked {
        chunks: Vec<std::sync::Arc<QTensor>>,
        rows_per_chunk: usize,
        rows: usize,
        dim: usize,
    },
}

/// Rows quantized at a time when loading a quantized table.
pub const EMBED_QUANT_CHUNK_ROWS: usize = 8192;

impl Embedding {
    /// Loads `<name>` (full tensor name) `[rows, dim]`.
    pub fn load(
        w: &Weights,
        name: &str,
        rows: usize,
        dim: usize,
        quant: Quant,
        dense_dtype: DType,
    ) -> Result<Self, LoadError> {
        if let Some(q) = w.quantized(name)? {
            w.check_shape(name, &[rows, dim])?;
            return Ok(Embedding::Quantized(q));
        }
        match quant.ggml() {
            Some(g) if dim.is_multiple_of(g.block_size()) => {
                w.check_shape(name, &[rows, dim])?;
                let mut chunks = Vec::new();
                let mut start = 0;
                while start < rows {
                    let n = EMBED_QUANT_CHUNK_ROWS.min(rows - start);
                    let part = w.get_rows_f32(name, start, n, dim)?;
                    let q = quantize(&part, g).map_err(|e| {
                        LoadError::candle(
                            format!("quantizing {name} rows {start}..{}", start + n),
                            e,
                        )
                    })?;
                    chunks.push(std::sync::Arc::new(q));
                    start += n;
                }
                Ok(Embedding::Chunked {
                    chunks,
                    rows_per_chunk: EMBED_QUANT_CHUNK_ROWS,
                    rows,
                    dim,
                })
            }
            _ => Ok(Embedding::Dense(w.get_dtype(
                name,
                &[rows, dim],
                dense_dtype,
            )?)),
        }
    }

    /// Loads a table as one quantized matrix, quantizing `EMBED_QUANT_CHUNK_ROWS` rows at a
    /// time so only one chunk is ever held in f32; falls back to dense when rows do not fill
    /// whole blocks.
    pub fn load_single(
        w: &Weights,
        name: &str,
        rows: usize,
        dim: usize,
        quant: Quant,
        dense_dtype: DType,
    ) -> Result<Self, LoadError> {
        if let Some(q) = w.quantized(name)? {
            w.check_shape(name, &[rows, dim])?;
            return Ok(Embedding::Quantized(q));
        }
        let Some(g) = quant.ggml().filter(|g| dim.is_multiple_of(g.block_size())) else {
            return Ok(Embedding::Dense(w.get_dtype(
                name,
                &[rows, dim],
                dense_dtype,
            )?));
        };
        w.check_shape(name, &[rows, dim])?;
        let row_bytes = dim / g.block_size() * g.type_size();
        let mut bytes: Vec<u8> = Vec::with_capacity(rows * row_bytes);
        let mut start = 0;
        while start < rows {
            let n = EMBED_QUANT_CHUNK_ROWS.min(rows - start);
            let part = w.get_rows_f32(name, start, n, dim)?;
            let q = quantize(&part, g).map_err(|e| {
                LoadError::candle(format!("quantizing {name} rows {start}..{}", start + n), e)
            })?;
            let data = q
                .data()
                .map_err(|e| LoadError::candle(format!("reading quantized {name}"), e))?;
            bytes.extend_from_slice(&data);
            start += n;
        }
        let q = candle_core::quantized::ggml_file::qtensor_from_ggml(
            g,
            &bytes,
            vec![rows, dim],
            w.device(),
        )
        .map_err(|e| LoadError::candle(format!("assembling quantized {name}"), e))?;
        Ok(Embedding::Quantized(std::sync::Arc::new(q)))
    }

    pub fn dim(&self) -> usize {
        match self {
            Embedding::Dense(t) => t.dims()[1],
            Embedding::Quantized(q) => q.shape().dims()[1],
            Embedding::Chunked { dim, .. } => *dim,
        }
    }

    pub fn rows(&self) -> usize {
        match self {
            Embedding::Dense(t) => t.dims()[0],
            Embedding::Quantized(q) => q.shape().dims()[0],
            Embedding::Chunked { rows, .. } => *rows,
        }
    }

    /// How the table is stored: `f32`, `f16`, `bf16`, `q8_0`, `q4k`.
    pub fn storage(&self) -> &'static str {
        match self {
            Embedding::Dense(t) => t.dtype().as_str(),
            Embedding::Quantized(q) => ggml_name(q.dtype()),
            Embedding::Chunked { chunks, .. } => chunks
                .first()
                .map(|c| ggml_name(c.dtype()))
                .unwrap_or("empty"),
        }
    }

    /// Bytes held by the table.
    pub fn size_in_bytes(&self) -> usize {
        match self {
            Embedding::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            Embedding::Quantized(q) => q.storage_size_in_bytes(),
            Embedding::Chunked { chunks, .. } => {
                chunks.iter().map(|c| c.storage_size_in_bytes()).sum()
            }
        }
    }

    /// Looks up `ids` (any shape, u32) and returns `[..ids, dim]` in `dtype`.
    pub fn lookup(&self, ids: &[u32], device: &Device, dtype: DType) -> CResult<Tensor> {
        let n = ids.len();
        match self {
            Embedding::Dense(t) => {
                let idx = Tensor::from_slice(ids, n, t.device())?;
                t.index_select(&idx, 0)?.to_dtype(dtype)?.to_device(device)
            }
            Embedding::Quantized(q) => {
                let idx = Tensor::from_slice(ids, n, device)?;
                q.embedding(&idx)?.to_dtype(dtype)
            }
            Embedding::Chunked {
                chunks,
                rows_per_chunk,
                rows,
                dim,
            } => {
                let mut parts = Vec::with_capacity(n);
                for &id in ids {
                    let id = id as usize;
                    if id >= *rows {
                        candle_core::bail!("token id {id} out of range for table of {rows} rows");
                    }
                    let c = &chunks[id / rows_per_chunk];
                    let local = Tensor::from_slice(&[(id % rows_per_chunk) as u32], 1, device)?;
                    parts.push(c.embedding(&local)?);
                }
                if parts.is_empty() {
                    return Tensor::zeros((0, *dim), dtype, device);
                }
                Tensor::cat(&parts, 0)?.to_dtype(dtype)
            }
        }
    }

    /// The dense table, when dense (tied lm_head).
    pub fn dense(&self) -> Option<&Tensor> {
        match self {
            Embedding::Dense(t) => Some(t),
            Embedding::Quantized(_) | Embedding::Chunked { .. } => None,
        }
    }
}

/// Quantizes a 2D weight; on CPU rows are split across threads (`qmm::quantize_par`).
pub fn quantize(weight: &Tensor, dtype: GgmlDType) -> CResult<QTensor> {
    let (rows, k) = weight.dims2()?;
    if weight.device().is_cpu() && super::qmm::supported_dtype(dtype) {
        let v = weight
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        return super::qmm::quantize_par(&v, rows, k, dtype);
    }
    // `QTensor::quantize` reads the whole backing storage and ignores the layout, so hand it
    // a tensor that owns exactly its elements.
    QTensor::quantize(&owned_f32(weight)?, dtype)
}

/// An f32 tensor with storage of its own, exactly `elem_count` long: `QTensor::quantize`
/// reads the backing storage and ignores narrowing (`copy()` clones the whole storage too).
pub fn owned_f32(t: &Tensor) -> CResult<Tensor> {
    t.to_dtype(DType::F32)?.affine(1.0, 0.0)
}

/// `gelu_pytorch_tanh`: `x/2 · (1 + tanh(√(2/π) · (x + 0.044715 x³)))`.
pub fn gelu_tanh(x: &Tensor) -> CResult<Tensor> {
    const S: f32 = 0.797_884_6; // √(2/π)
    map_f32(x, |v| {
        0.5 * v * (1.0 + tanh_f32(S * v * (1.0 + 0.044_715 * v * v)))
    })
    .unwrap_or_else(|| x.gelu())
}

/// `tanh(x / cap) * cap`.
pub fn softcap(x: &Tensor, cap: f64) -> CResult<Tensor> {
    let (c, inv) = (cap as f32, (1.0 / cap) as f32);
    map_f32(x, |v| tanh_f32(v * inv) * c).unwrap_or_else(|| (x / cap)?.tanh()? * cap)
}

/// `f` over every element of an f32 CPU tensor, in a loop the compiler vectorizes; `None`
/// for other dtypes/devices (callers then use candle's ops, e.g. f64 parity runs).
fn map_f32(x: &Tensor, f: impl Fn(f32) -> f32) -> Option<CResult<Tensor>> {
    if x.dtype() != DType::F32 || !x.device().is_cpu() {
        return None;
    }
    Some((|| {
        let mut v = x.flatten_all()?.to_vec1::<f32>()?;
        v.iter_mut().for_each(|e| *e = f(*e));
        Tensor::from_vec(v, x.shape(), x.device())
    })())
}

/// tanh in f32 as a rational function (odd degree-13 over even degree-6 polynomial, the
/// minimax fit fast math libraries use), within a few ulp of `f32::tanh` and branch-free,
/// so loops over it vectorize: libm's scalar `tanhf` was 6% of q4k decode time (the MLP
/// activation and the final softcap over 262,144 logits per token).
#[inline(always)]
pub fn tanh_f32(x: f32) -> f32 {
    // Beyond this |x| the fit (and tanh in f32) is ±1 to within rounding.
    const CLAMP: f32 = 7.905_311;
    let x = x.clamp(-CLAMP, CLAMP);
    let x2 = x * x;
    let p = (((((-2.760_768_5e-16f32 * x2 + 2.000_188e-13) * x2 - 8.604_672e-11) * x2
        + 5.122_297e-8)
        * x2
        + 1.485_722_4e-5)
        * x2
        + 6.372_619_3e-4)
        * x2
        + 4.893_524_6e-3;
    let q = ((1.198_258_4e-6f32 * x2 + 1.185_347e-4) * x2 + 2.268_434_6e-3) * x2 + 4.893_525e-3;
    x * p / q
}

/// Rounds an f32 scalar through `dtype` the way the reference does when it casts a scale
/// buffer to the weight dtype (`embed_scale.to(weight.dtype)`).
pub fn round_through(value: f64, dtype: DType) -> CResult<f64> {
    let t = Tensor::new(value as f32, &Device::Cpu)?
        .to_dtype(dtype)?
        .to_dtype(DType::F32)?;
    Ok(t.to_scalar::<f32>()? as f64)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn fast_tanh_gelu_and_softcap_match_libm() {
        let xs: Vec<f32> = (-40_000..=40_000).map(|i| i as f32 * 5e-4).collect();
        let mut worst_abs = 0f32;
        let mut worst_rel = 0f32;
        for &x in &xs {
            let (got, want) = (tanh_f32(x), x.tanh());
            worst_abs = worst_abs.max((got - want).abs());
            if want != 0.0 {
                worst_rel = worst_rel.max(((got - want) / want).abs());
            }
        }
        assert!(
            worst_abs <= 5e-7 && worst_rel <= 1e-6,
            "tanh: abs {worst_abs} rel {worst_rel}"
        );
        assert_eq!(tanh_f32(1e4), 1.0);
        assert_eq!(tanh_f32(-1e4), -1.0);
        assert_eq!(tanh_f32(0.0), 0.0);

        let t = Tensor::from_slice(&xs, (xs.len(),), &Device::Cpu).unwrap();
        // candle's gelu (libm tanh) and the reference formula of softcap.
        assert!(max_abs_diff(&gelu_tanh(&t).unwrap(), &t.gelu().unwrap()) <= 1e-5);
        let want = ((&t * 40.0).unwrap() / 30.0).unwrap().tanh().unwrap() * 30.0;
        // 30 x the tanh tolerance.
        assert!(
            max_abs_diff(
                &softcap(&(&t * 40.0).unwrap(), 30.0).unwrap(),
                &want.unwrap()
            ) <= 2e-5
        );
        // f64 keeps candle's ops (parity runs in f64 are unchanged).
        let t64 = t.to_dtype(DType::F64).unwrap();
        assert_eq!(gelu_tanh(&t64).unwrap().dtype(), DType::F64);
        assert_eq!(softcap(&t64, 30.0).unwrap().dtype(), DType::F64);
    }

    #[test]
    fn rms_norm_uses_w_not_one_plus_w() {
        let x = Tensor::new(&[[1f32, 2., 3., 4.]], &Device::Cpu).unwrap();
        let w = Tensor::new(&[2f32, 2., 2., 2.], &Device::Cpu).unwrap();
        let y = RmsNorm::from_weight(w, 0.0).forward(&x).unwrap();
        let rms = (30f32 / 4.0).sqrt();
        let got = y.to_vec2::<f32>().unwrap();
        for (i, v) in got[0].iter().enumerate() {
            assert!((v - 2.0 * (i as f32 + 1.0) / rms).abs() < 1e-5);
        }
        let y = RmsNorm::without_scale(0.0).forward(&x).unwrap();
        assert!((y.to_vec2::<f32>().unwrap()[0][3] - 4.0 / rms).abs() < 1e-5);
    }

    #[test]
    fn quantized_linear_and_embedding_track_f32() {
        let w = Tensor::randn(0f32, 1.0, (64, 256), &Device::Cpu).unwrap();
        let x = Tensor::randn(0f32, 1.0, (3, 256), &Device::Cpu).unwrap();
        let f = Linear::from_tensor(w.clone(), Quant::F32)
            .unwrap()
            .forward(&x)
            .unwrap();
        for (q, tol) in [(Quant::Q8_0, 0.02), (Quant::Q4K, 0.15)] {
            let y = Linear::from_tensor(w.clone(), q)
                .unwrap()
                .forward(&x)
                .unwrap();
            let err = (&y - &f)
                .unwrap()
                .sqr()
                .unwrap()
                .mean_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                .sqrt();
            let norm = f
                .sqr()
                .unwrap()
                .mean_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                .sqrt();
            assert!(err / norm < tol, "{q:?}: relative rms error {}", err / norm);
        }
        let table = Tensor::randn(0f32, 1.0, (20, 64), &Device::Cpu).unwrap();
        let q = candle_core::quantized::QTensor::quantize(
            &table.narrow(0, 0, 16).unwrap().affine(1.0, 0.0).unwrap(),
            GgmlDType::Q8_0,
        )
        .unwrap();
        let q2 = candle_core::quantized::QTensor::quantize(
            &table.narrow(0, 16, 4).unwrap().affine(1.0, 0.0).unwrap(),
            GgmlDType::Q8_0,
        )
        .unwrap();
        let e = Embedding::Chunked {
            chunks: vec![std::sync::Arc::new(q), std::sync::Arc::new(q2)],
            rows_per_chunk: 16,
            rows: 20,
            dim: 64,
        };
        let got = e.lookup(&[3, 17], &Device::Cpu, DType::F32).unwrap();
        let want = table
            .index_select(&Tensor::new(&[3u32, 17], &Device::Cpu).unwrap(), 0)
            .unwrap();
        let d = max_abs_diff(&got, &want);
        assert!(d < 0.05, "chunked lookup off by {d}");
    }
}
