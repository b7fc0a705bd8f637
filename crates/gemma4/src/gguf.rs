//! GGUF files, read in place: header, metadata and tensor table parsed from the mapped
//! file; block-quantized tensors handed to the model as [`QTensor`]s whose storage *is* the
//! mapping (no copy, no re-quantization).
//!
//! Layout (ggml's `docs/gguf.md`, versions 2 and 3): magic `GGUF`, version, tensor count,
//! metadata count, metadata `key: type value`, tensor infos (`name, n_dims, ne[0..n] (innermost
//! first), type, offset`), then the data section at the next multiple of `general.alignment`
//! (32 by default). Shapes here are row-major (outermost first), as candle and safetensors
//! write them: ggml's `ne` reversed.
//!
//! Tensor types read: F32, F16, BF16 (dense), Q8_0, Q4_0, Q4_K, Q5_K, Q6_K (blocks used as
//! they are). Any other type is named in a one-line error.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, RwLock};

use candle_core::quantized::k_quants::{
    BlockQ4K, BlockQ4_0, BlockQ5K, BlockQ6K, BlockQ8_0, GgmlType,
};
use candle_core::quantized::{GgmlDType, QStorage, QTensor, QuantizedType};
use candle_core::{CpuStorage, DType, Device, Tensor};

use super::loader::LoadError;

/// Whether `path` is a GGUF file (by its magic: Ollama's blobs have no extension).
pub fn is_gguf_file(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    path.is_file()
        && std::fs::File::open(path)
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
            .is_ok()
        && &magic == b"GGUF"
}

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    Str(String),
    Array(Vec<Value>),
}

impl Value {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v as u64),
            Value::U16(v) => Some(v as u64),
            Value::U32(v) => Some(v as u64),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            Value::Bool(b) => Some(b as u64),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            // The shortest decimal that rounds to this f32: what the converter was given
            // (1e-6, not 9.99999997e-7).
            Value::F32(v) => v.to_string().parse().ok(),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<&[Value]> {
        match self {
            Value::Array(a) => Some(a),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Value::Bool(b) => Some(b),
            _ => self.as_u64().map(|v| v != 0),
        }
    }

    /// Short rendering for `model info` (arrays as their length).
    pub fn summary(&self) -> String {
        match self {
            Value::Str(s) if s.len() > 60 => format!(
                "{:?}... ({} bytes)",
                &s[..s.floor_char_boundary(57)],
                s.len()
            ),
            Value::Str(s) => format!("{s:?}"),
            Value::Array(a) => format!("[{} values]", a.len()),
            Value::F32(v) => v.to_string(),
            Value::F64(v) => v.to_string(),
            Value::Bool(b) => b.to_string(),
            other => other
                .as_u64()
                .map(|v| v.to_string())
                .unwrap_or_else(|| format!("{other:?}")),
        }
    }
}

/// ggml type ids: (id, name, elements per block, bytes per block). All of ggml's types are
/// listed so an unsupported one is named, not numbered.
const GGML_TYPES: &[(u32, &str, usize, usize)] = &[
    (0, "F32", 1, 4),
    (1, "F16", 1, 2),
    (2, "Q4_0", 32, 18),
    (3, "Q4_1", 32, 20),
    (6, "Q5_0", 32, 22),
    (7, "Q5_1", 32, 24),
    (8, "Q8_0", 32, 34),
    (9, "Q8_1", 32, 36),
    (10, "Q2_K", 256, 84),
    (11, "Q3_K", 256, 110),
    (12, "Q4_K", 256, 144),
    (13, "Q5_K", 256, 176),
    (14, "Q6_K", 256, 210),
    (15, "Q8_K", 256, 292),
    (16, "IQ2_XXS", 256, 66),
    (17, "IQ2_XS", 256, 74),
    (18, "IQ3_XXS", 256, 98),
    (19, "IQ1_S", 256, 50),
    (20, "IQ4_NL", 32, 18),
    (21, "IQ3_S", 256, 110),
    (22, "IQ2_S", 256, 82),
    (23, "IQ4_XS", 256, 136),
    (24, "I8", 1, 1),
    (25, "I16", 1, 2),
    (26, "I32", 1, 4),
    (27, "I64", 1, 8),
    (28, "F64", 1, 8),
    (29, "IQ1_M", 256, 56),
    (30, "BF16", 1, 2),
    (34, "TQ1_0", 256, 54),
    (35, "TQ2_0", 256, 66),
    (39, "MXFP4", 32, 17),
];

/// The types percept reads, as listed in errors.
pub const SUPPORTED_TYPES: &str = "F32, F16, BF16, Q8_0, Q4_0, Q4_K, Q5_K, Q6_K";

/// Elements and bytes per block of a ggml type id (1 element for dense types).
pub fn block_layout(id: u32) -> Option<(usize, usize)> {
    GGML_TYPES.iter().find(|t| t.0 == id).map(|t| (t.2, t.3))
}

/// Name of a ggml type id (`type 77` when unknown).
pub fn type_name(id: u32) -> String {
    GGML_TYPES
        .iter()
        .find(|t| t.0 == id)
        .map(|t| t.1.to_string())
        .unwrap_or_else(|| format!("type {id}"))
}

/// candle's dtype for a type percept reads.
pub fn candle_type(id: u32) -> Option<GgmlDType> {
    Some(match id {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        30 => GgmlDType::BF16,
        8 => GgmlDType::Q8_0,
        2 => GgmlDType::Q4_0,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        _ => return None,
    })
}

/// ggml type id of a candle dtype (for writing).
pub fn type_id(t: GgmlDType) -> Option<u32> {
    Some(match t {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::BF16 => 30,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        _ => return None,
    })
}

/// One entry of the tensor table.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    pub name: String,
    /// ggml type id (see [`type_name`]).
    pub type_id: u32,
    /// Row-major shape, outermost dimension first.
    pub shape: Vec<usize>,
    /// Absolute byte offset of the data in the file.
    pub offset: usize,
    pub nbytes: usize,
}

impl TensorInfo {
    pub fn type_name(&self) -> String {
        type_name(self.type_id)
    }
}

/// A parsed, memory-mapped GGUF file.
pub struct GgufFile {
    pub path: PathBuf,
    pub version: u32,
    pub metadata: BTreeMap<String, Value>,
    pub tensors: Vec<TensorInfo>,
    index: HashMap<String, usize>,
    mmap: Arc<memmap2::Mmap>,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

/// Bounds-checked little-endian reader over the mapped header.
struct Cursor<'a> {
    b: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or_else(|| format!("truncated header (wanted {n} bytes at offset {})", self.pos))?;
        let s = &self.b[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.arr()?))
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.arr()?))
    }
    fn len(&mut self) -> Result<usize, String> {
        let n = self.u64()?;
        // No length can exceed what is left of the file.
        if n > (self.b.len() - self.pos) as u64 {
            return Err(format!(
                "length {n} at offset {} runs past the end of the file",
                self.pos
            ));
        }
        Ok(n as usize)
    }
    fn string(&mut self) -> Result<String, String> {
        let n = self.len()?;
        let s = self.take(n)?;
        String::from_utf8(s.to_vec())
            .map_err(|_| format!("string at offset {} is not UTF-8", self.pos - n))
    }
    fn value(&mut self, ty: u32, depth: usize) -> Result<Value, String> {
        Ok(match ty {
            0 => Value::U8(self.arr::<1>()?[0]),
            1 => Value::I8(self.arr::<1>()?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.arr()?)),
            3 => Value::I16(i16::from_le_bytes(self.arr()?)),
            4 => Value::U32(self.u32()?),
            5 => Value::I32(i32::from_le_bytes(self.arr()?)),
            6 => Value::F32(f32::from_le_bytes(self.arr()?)),
            7 => Value::Bool(self.arr::<1>()?[0] != 0),
            8 => Value::Str(self.string()?),
            9 => {
                if depth > 8 {
                    return Err("metadata arrays nested too deeply".into());
                }
                let inner = self.u32()?;
                let n = self.len()?;
                let mut v = Vec::with_capacity(n.min(1 << 20));
                for _ in 0..n {
                    v.push(self.value(inner, depth + 1)?);
                }
                Value::Array(v)
            }
            10 => Value::U64(self.u64()?),
            11 => Value::I64(i64::from_le_bytes(self.arr()?)),
            12 => Value::F64(f64::from_le_bytes(self.arr()?)),
            other => return Err(format!("unknown metadata value type {other}")),
        })
    }
}

/// Address ranges of every mapped GGUF file, so the matmul can tell blocks that live in a
/// mapping (read in place, never repacked) from blocks percept quantized itself.
fn mapped_ranges() -> &'static RwLock<Vec<(usize, usize)>> {
    static R: OnceLock<RwLock<Vec<(usize, usize)>>> = OnceLock::new();
    R.get_or_init(|| RwLock::new(Vec::new()))
}

/// Whether `q`'s CPU storage lies inside a mapped GGUF file.
pub fn is_mapped(q: &QTensor) -> bool {
    let Ok(d) = q.data() else { return false };
    let p = d.as_ptr() as usize;
    let ranges = mapped_ranges().read().unwrap_or_else(|e| e.into_inner());
    ranges.iter().any(|&(a, b)| p >= a && p < b)
}

impl GgufFile {
    /// Maps and parses `path`. Errors name the file and what is wrong with it.
    pub fn open(path: &Path) -> Result<Self, LoadError> {
        let file = std::fs::File::open(path).map_err(|source| LoadError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        // SAFETY: mapped read-only; like every mmap-based loader we rely on nobody
        // truncating the file while the model is alive.
        #[allow(unsafe_code)]
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|source| LoadError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let bad = |message: String| LoadError::Parse {
            path: path.to_path_buf(),
            message,
        };
        if mmap.len() < 4 || &mmap[..4] != b"GGUF" {
            return Err(bad("not a GGUF file (no GGUF magic)".into()));
        }
        let mut c = Cursor { b: &mmap, pos: 4 };
        let version = c.u32().map_err(&bad)?;
        if !(2..=3).contains(&version) {
            return Err(bad(format!(
                "GGUF version {version}; percept reads versions 2 and 3"
            )));
        }
        let n_tensors = c.u64().map_err(&bad)?;
        let n_kv = c.u64().map_err(&bad)?;
        let mut metadata = BTreeMap::new();
        for _ in 0..n_kv {
            let key = c.string().map_err(&bad)?;
            let ty = c.u32().map_err(&bad)?;
            let v = c
                .value(ty, 0)
                .map_err(|e| bad(format!("metadata {key}: {e}")))?;
            metadata.insert(key, v);
        }
        let mut raw = Vec::new();
        for _ in 0..n_tensors {
            let name = c.string().map_err(&bad)?;
            let nd = c.u32().map_err(&bad)? as usize;
            if nd == 0 || nd > 4 {
                return Err(bad(format!("tensor {name} has {nd} dimensions")));
            }
            let mut ne = Vec::with_capacity(nd);
            for _ in 0..nd {
                ne.push(c.u64().map_err(&bad)? as usize);
            }
            let ty = c.u32().map_err(&bad)?;
            let off = c.u64().map_err(&bad)? as usize;
            ne.reverse();
            raw.push((name, ne, ty, off));
        }
        let align = metadata
            .get("general.alignment")
            .and_then(Value::as_u64)
            .unwrap_or(32)
            .max(1) as usize;
        let data_start = c.pos.div_ceil(align) * align;
        let mut tensors = Vec::with_capacity(raw.len());
        let mut index = HashMap::new();
        for (name, shape, ty, off) in raw {
            let (bs, bb) = block_layout(ty).unwrap_or((1, 0));
            let elems: usize = shape.iter().product();
            let inner = shape.last().copied().unwrap_or(1);
            if bb > 0 && !inner.is_multiple_of(bs) {
                return Err(bad(format!(
                    "tensor {name}: {} rows of {inner} do not fill whole blocks of {bs}",
                    type_name(ty)
                )));
            }
            let nbytes = elems / bs * bb;
            let offset = data_start + off;
            if offset + nbytes > mmap.len() {
                return Err(bad(format!(
                    "tensor {name} ({nbytes} bytes at {offset}) runs past the end of the file ({} bytes)",
                    mmap.len()
                )));
            }
            index.insert(name.clone(), tensors.len());
            tensors.push(TensorInfo {
                name,
                type_id: ty,
                shape,
                offset,
                nbytes,
            });
        }
        let base = mmap.as_ptr() as usize;
        mapped_ranges()
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push((base, base + mmap.len()));
        Ok(Self {
            path: path.to_path_buf(),
            version,
            metadata,
            tensors,
            index,
            mmap: Arc::new(mmap),
        })
    }

    /// Asks the kernel to read the whole file ahead (`madvise(MADV_WILLNEED)`, as llama.cpp's
    /// loader does): from a cold page cache the file then streams in at disk speed while the
    /// model is built, instead of one page fault at a time during the first forward.
    /// `PERCEPT_GGUF_PREFETCH=0` turns it off.
    pub fn prefetch(&self) {
        if matches!(
            std::env::var("PERCEPT_GGUF_PREFETCH").as_deref(),
            Ok("0") | Ok("off")
        ) {
            return;
        }
        if let Err(e) = self.mmap.advise(memmap2::Advice::WillNeed) {
            tracing::debug!(path = %self.path.display(), error = %e, "madvise(WILLNEED) failed");
        }
    }

    pub fn get(&self, name: &str) -> Option<&TensorInfo> {
        self.index.get(name).map(|&i| &self.tensors[i])
    }

    pub fn meta(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    /// `general.architecture`.
    pub fn architecture(&self) -> Option<&str> {
        self.meta("general.architecture").and_then(Value::as_str)
    }

    /// The raw bytes of a tensor inside the mapping.
    pub fn bytes(&self, t: &TensorInfo) -> &[u8] {
        &self.mmap[t.offset..t.offset + t.nbytes]
    }

    /// Error for a tensor of a type percept does not read.
    pub fn unsupported(&self, t: &TensorInfo) -> LoadError {
        LoadError::Parse {
            path: self.path.clone(),
            message: format!(
                "tensor {} has type {}, which percept does not read (it reads {SUPPORTED_TYPES})",
                t.name,
                t.type_name()
            ),
        }
    }

    /// A dense copy of a tensor in `dtype` (block types are dequantized).
    pub fn dense(
        &self,
        t: &TensorInfo,
        device: &Device,
        dtype: DType,
    ) -> Result<Tensor, LoadError> {
        let ctx = |e| {
            LoadError::candle(
                format!("reading {} from {}", t.name, self.path.display()),
                e,
            )
        };
        let g = candle_type(t.type_id).ok_or_else(|| self.unsupported(t))?;
        let bytes = self.bytes(t);
        let raw = match g {
            GgmlDType::F32 => Tensor::from_raw_buffer(bytes, DType::F32, &t.shape, &Device::Cpu),
            GgmlDType::F16 => Tensor::from_raw_buffer(bytes, DType::F16, &t.shape, &Device::Cpu),
            GgmlDType::BF16 => Tensor::from_raw_buffer(bytes, DType::BF16, &t.shape, &Device::Cpu),
            _ => self.qtensor(t, &Device::Cpu)?.dequantize(&Device::Cpu),
        }
        .map_err(ctx)?;
        raw.to_dtype(dtype)
            .and_then(|x| x.to_device(device))
            .map_err(ctx)
    }

    /// Rows `start..start+n` of a 2D tensor as f32, touching only those bytes.
    pub fn rows_f32(&self, t: &TensorInfo, start: usize, n: usize) -> Result<Tensor, LoadError> {
        let ctx = |e| LoadError::candle(format!("reading rows of {}", t.name), e);
        let g = candle_type(t.type_id).ok_or_else(|| self.unsupported(t))?;
        let [rows, dim] = t.shape[..] else {
            return Err(LoadError::ShapeMismatch {
                name: t.name.clone(),
                expected: vec![start + n, 0],
                actual: t.shape.clone(),
            });
        };
        if start + n > rows {
            return Err(LoadError::ShapeMismatch {
                name: t.name.clone(),
                expected: vec![start + n, dim],
                actual: t.shape.clone(),
            });
        }
        let row_bytes = t.nbytes / rows.max(1);
        let bytes = &self.bytes(t)[start * row_bytes..(start + n) * row_bytes];
        let out = match g {
            GgmlDType::F32 => Tensor::from_raw_buffer(bytes, DType::F32, &[n, dim], &Device::Cpu),
            GgmlDType::F16 => Tensor::from_raw_buffer(bytes, DType::F16, &[n, dim], &Device::Cpu),
            GgmlDType::BF16 => Tensor::from_raw_buffer(bytes, DType::BF16, &[n, dim], &Device::Cpu),
            _ => QTensor::new(
                QStorage::from_data(std::borrow::Cow::Borrowed(bytes), &Device::Cpu, g)
                    .map_err(ctx)?,
                (n, dim),
            )
            .and_then(|q| q.dequantize(&Device::Cpu)),
        }
        .and_then(|x| x.to_dtype(DType::F32))
        .map_err(ctx)?;
        Ok(out)
    }

    /// A block-quantized tensor whose CPU storage is the mapping itself. On a GPU the blocks
    /// are copied to device memory once.
    pub fn qtensor(&self, t: &TensorInfo, device: &Device) -> Result<QTensor, LoadError> {
        let g = candle_type(t.type_id).ok_or_else(|| self.unsupported(t))?;
        let ctx = |e| {
            LoadError::candle(
                format!("mapping {} from {}", t.name, self.path.display()),
                e,
            )
        };
        if !device.is_cpu() {
            let s = QStorage::from_data(std::borrow::Cow::Borrowed(self.bytes(t)), device, g)
                .map_err(ctx)?;
            return QTensor::new(s, t.shape.as_slice()).map_err(ctx);
        }
        let m = |_: ()| Mapped {
            mmap: self.mmap.clone(),
            offset: t.offset,
            nbytes: t.nbytes,
        };
        let storage: Box<dyn QuantizedType> = match g {
            GgmlDType::Q8_0 => Box::new(MappedBlocks::<BlockQ8_0>::new(m(()))?),
            GgmlDType::Q4_0 => Box::new(MappedBlocks::<BlockQ4_0>::new(m(()))?),
            GgmlDType::Q4K => Box::new(MappedBlocks::<BlockQ4K>::new(m(()))?),
            GgmlDType::Q5K => Box::new(MappedBlocks::<BlockQ5K>::new(m(()))?),
            GgmlDType::Q6K => Box::new(MappedBlocks::<BlockQ6K>::new(m(()))?),
            // Dense types as candle's own f32/f16/bf16 "quantized" storage (a copy).
            _ => g.from_data(std::borrow::Cow::Borrowed(self.bytes(t))),
        };
        QTensor::new(QStorage::Cpu(storage), t.shape.as_slice()).map_err(ctx)
    }

    /// Bytes of the data section (all tensors).
    pub fn data_bytes(&self) -> usize {
        self.tensors.iter().map(|t| t.nbytes).sum()
    }

    /// Counts of tensors per type name, e.g. `{"F32": 12, "Q4_K": 40}`.
    pub fn type_counts(&self) -> BTreeMap<String, usize> {
        let mut m = BTreeMap::new();
        for t in &self.tensors {
            *m.entry(t.type_name()).or_insert(0) += 1;
        }
        m
    }
}

/// A byte range of a shared mapping.
struct Mapped {
    mmap: Arc<memmap2::Mmap>,
    offset: usize,
    nbytes: usize,
}

/// Blocks of type `T` read where they lie in a mapped file: candle's CPU storage trait over a
/// borrowed slice instead of its own `Vec<T>`.
struct MappedBlocks<T> {
    m: Mapped,
    _t: std::marker::PhantomData<T>,
}

impl<T: GgmlType> MappedBlocks<T> {
    fn new(m: Mapped) -> Result<Self, LoadError> {
        let size = std::mem::size_of::<T>();
        let p = m.mmap[m.offset..].as_ptr() as usize;
        if !m.nbytes.is_multiple_of(size) || !p.is_multiple_of(std::mem::align_of::<T>()) {
            return Err(LoadError::Parse {
                path: PathBuf::new(),
                message: format!(
                    "{:?} blocks at offset {} are not aligned",
                    T::DTYPE,
                    m.offset
                ),
            });
        }
        Ok(Self {
            m,
            _t: std::marker::PhantomData,
        })
    }

    fn blocks(&self) -> &[T] {
        let bytes = &self.m.mmap[self.m.offset..self.m.offset + self.m.nbytes];
        // SAFETY: length and alignment were checked in `new`; the block types are `repr(C)`
        // structs of f16/f32/integers, valid for every bit pattern, and the slice borrows the
        // mapping, which `self` keeps alive.
        #[allow(unsafe_code)]
        unsafe {
            std::slice::from_raw_parts(
                bytes.as_ptr().cast::<T>(),
                bytes.len() / std::mem::size_of::<T>(),
            )
        }
    }
}

impl<T: GgmlType + Send + Sync + 'static> QuantizedType for MappedBlocks<T> {
    fn dtype(&self) -> GgmlDType {
        T::DTYPE
    }
    fn matmul_t(
        &self,
        mkn: (usize, usize, usize),
        lhs: &[f32],
        dst: &mut [f32],
    ) -> candle_core::Result<()> {
        candle_core::quantized::k_quants::matmul(mkn, lhs, self.blocks(), dst)
    }
    fn matmul_t_f16(
        &self,
        mkn: (usize, usize, usize),
        lhs: &[half::f16],
        dst: &mut [half::f16],
    ) -> candle_core::Result<()> {
        candle_core::quantized::k_quants::matmul_f16(mkn, lhs, self.blocks(), dst)
    }
    fn embedding(
        &self,
        ids: &[u32],
        rows: usize,
        hidden: usize,
    ) -> candle_core::Result<CpuStorage> {
        let bpr = hidden / T::BLCK_SIZE;
        let blocks = self.blocks();
        if !hidden.is_multiple_of(T::BLCK_SIZE) || blocks.len() != rows * bpr {
            candle_core::bail!(
                "mapped embedding: {} blocks do not make {rows} rows of {hidden}",
                blocks.len()
            );
        }
        let mut out = vec![0f32; ids.len() * hidden];
        for (o, &id) in out.chunks_exact_mut(hidden.max(1)).zip(ids) {
            let r = id as usize;
            if r >= rows {
                candle_core::bail!("embedding id {r} is out of range for {rows} rows");
            }
            T::to_float(&blocks[r * bpr..(r + 1) * bpr], o);
        }
        Ok(CpuStorage::F32(out))
    }
    fn dequantize(&self, elem_count: usize) -> candle_core::Result<CpuStorage> {
        let mut ys = vec![0f32; elem_count];
        T::to_float(self.blocks(), &mut ys);
        Ok(CpuStorage::F32(ys))
    }
    fn storage_size_in_bytes(&self) -> usize {
        self.m.nbytes
    }
    fn as_ptr(&self) -> *const u8 {
        self.m.mmap[self.m.offset..].as_ptr()
    }
    fn block_size(&self) -> usize {
        T::BLCK_SIZE
    }
    // The mapping is read-only: quantizing into it is never asked of a loaded weight (candle
    // calls these only on storage it allocated for `QTensor::quantize`).
    fn from_float(&mut self, _xs: &[f32]) {}
    fn from_float_imatrix(&mut self, _xs: &[f32], _w: &[f32], _n: usize) {}
    fn size(&self) -> usize {
        self.m.nbytes
    }
}
