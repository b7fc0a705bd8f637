//! Writing GGUF files: percept's quantized cache, and test fixtures in the layout of
//! llama.cpp's converter.
//!
//! The writer streams: the header (metadata and the tensor table, offsets computed from
//! shapes and types) goes first, then each tensor's bytes are asked for one at a time, so a
//! model larger than memory can be written while only one tensor is held. The file is written
//! under a temporary name and renamed into place, so a reader never sees half a file.

use std::io::Write;
use std::path::{Path, PathBuf};

use super::gguf::Value;
use super::loader::LoadError;

/// Data alignment written (ggml's default).
pub const ALIGNMENT: usize = 32;

/// One tensor to write: its name, ggml type id, row-major shape and byte size.
#[derive(Debug, Clone)]
pub struct OutTensor {
    pub name: String,
    pub type_id: u32,
    pub shape: Vec<usize>,
    pub nbytes: usize,
}

fn put_str(w: &mut Vec<u8>, s: &str) {
    w.extend_from_slice(&(s.len() as u64).to_le_bytes());
    w.extend_from_slice(s.as_bytes());
}

fn type_code(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::Str(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn put_value(w: &mut Vec<u8>, v: &Value) {
    match v {
        Value::U8(x) => w.push(*x),
        Value::I8(x) => w.push(*x as u8),
        Value::U16(x) => w.extend_from_slice(&x.to_le_bytes()),
        Value::I16(x) => w.extend_from_slice(&x.to_le_bytes()),
        Value::U32(x) => w.extend_from_slice(&x.to_le_bytes()),
        Value::I32(x) => w.extend_from_slice(&x.to_le_bytes()),
        Value::U64(x) => w.extend_from_slice(&x.to_le_bytes()),
        Value::I64(x) => w.extend_from_slice(&x.to_le_bytes()),
        Value::F32(x) => w.extend_from_slice(&x.to_le_bytes()),
        Value::F64(x) => w.extend_from_slice(&x.to_le_bytes()),
        Value::Bool(x) => w.push(*x as u8),
        Value::Str(s) => put_str(w, s),
        Value::Array(a) => {
            // An empty array is written as an array of u32 (its element type is moot).
            let inner = a.first().map(type_code).unwrap_or(4);
            w.extend_from_slice(&inner.to_le_bytes());
            w.extend_from_slice(&(a.len() as u64).to_le_bytes());
            for x in a {
                put_value(w, x);
            }
        }
    }
}

/// Writes a GGUF v3 file at `path`. `data(i, out)` writes exactly `tensors[i].nbytes` bytes.
pub fn write_gguf(
    path: &Path,
    metadata: &[(String, Value)],
    tensors: &[OutTensor],
    mut data: impl FnMut(usize, &mut dyn Write) -> Result<(), LoadError>,
) -> Result<(), LoadError> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| LoadError::Io { path: p, source }
    };
    let mut h = Vec::new();
    h.extend_from_slice(b"GGUF");
    h.extend_from_slice(&3u32.to_le_bytes());
    h.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    h.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        put_str(&mut h, k);
        h.extend_from_slice(&type_code(v).to_le_bytes());
        put_value(&mut h, v);
    }
    let mut offset = 0usize;
    let mut offsets = Vec::with_capacity(tensors.len());
    for t in tensors {
        put_str(&mut h, &t.name);
        h.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
        for d in t.shape.iter().rev() {
            h.extend_from_slice(&(*d as u64).to_le_bytes());
        }
        h.extend_from_slice(&t.type_id.to_le_bytes());
        h.extend_from_slice(&(offset as u64).to_le_bytes());
        offsets.push(offset);
        offset = (offset + t.nbytes).div_ceil(ALIGNMENT) * ALIGNMENT;
    }
    h.resize(h.len().div_ceil(ALIGNMENT) * ALIGNMENT, 0);
    // Unique per writer: two threads (or processes) filling the same cache entry each
    // write their own file; the last rename wins, and both are complete.
    static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp: PathBuf = path.with_extension(format!("gguf.part{}-{seq}", std::process::id()));
    let file = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
    w.write_all(&h).map_err(io(&tmp))?;
    let mut pos = 0usize;
    for (i, t) in tensors.iter().enumerate() {
        let pad = offsets[i] - pos;
        w.write_all(&vec![0u8; pad]).map_err(io(&tmp))?;
        let mut counter = Counting {
            inner: &mut w,
            n: 0,
        };
        data(i, &mut counter)?;
        if counter.n != t.nbytes {
            let _ = std::fs::remove_file(&tmp);
            return Err(LoadError::Parse {
                path: path.to_path_buf(),
                message: format!(
                    "tensor {} wrote {} bytes, expected {}",
                    t.name, counter.n, t.nbytes
                ),
            });
        }
        pos = offsets[i] + t.nbytes;
    }
    let file = w.into_inner().map_err(|e| LoadError::Io {
        path: tmp.clone(),
        source: e.into_error(),
    })?;
    file.sync_all().map_err(io(&tmp))?;
    drop(file);
    std::fs::rename(&tmp, path).map_err(io(path))?;
    Ok(())
}

/// Counts the bytes written through it.
struct Counting<'a> {
    inner: &'a mut dyn Write,
    n: usize,
}

impl Write for Counting<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let k = self.inner.write(buf)?;
        self.n += k;
        Ok(k)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Bytes of a tensor of ggml type `type_id` and `shape` (0 for an unknown type).
pub fn nbytes(type_id: u32, shape: &[usize]) -> usize {
    let elems: usize = shape.iter().product();
    super::gguf::block_layout(type_id).map_or(0, |(per_block, bytes)| elems / per_block * bytes)
}
