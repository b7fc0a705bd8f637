//! `Gemma4ClippableLinear` (HF modeling_gemma4.py 167-193): a bias-free linear whose weight
//! lives at `<name>.linear.weight`, with optional scalar clamps `input_min/input_max` on the
//! input and `output_min/output_max` on the output (only when `use_clipped_linears`).
//!
//! The vision tower's linears may instead run in int8 ([`VisionQuant::Int8`], `w8a8`).

use candle_core::{DType, Module, Result as CResult, Tensor};

use super::layers::{Linear, Quant};
use super::loader::{LoadError, Weights};
use super::w8a8::PackedI8;

/// Precision of the E2B/E4B vision tower's encoder linears (`[model] vision_quant`,
/// `--vision-quant`).
///
/// The library's default ([`crate::text::LoadOptions`]) is `F32`, the reference precision;
/// percept's `[model] vision_quant` and `--vision-quant` default to `Int8`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VisionQuant {
    /// int8 weights (per output row scale) x int8 activations (per row scale, per call)
    /// with AVX-512 VNNI: about half the f32 tower's time per frame at 70 soft tokens
    /// (`bench model`, 2-core AMD EPYC). Soft tokens move by up to 3.5% of the largest
    /// value on the tiny fixture tower, cosine 0.9997 (`tests/towers_parity.rs`). Runs f32 where the CPU lacks AVX-512 VNNI or the
    /// tower is not on the CPU.
    Int8,
    /// f32 throughout, the reference's precision (what parity tests use).
    F32,
}

impl VisionQuant {
    pub const ALL: [VisionQuant; 2] = [VisionQuant::Int8, VisionQuant::F32];
    pub const NAMES: &'static [&'static str] = &["int8", "f32"];

    pub fn as_str(self) -> &'static str {
        match self {
            VisionQuant::Int8 => "int8",
            VisionQuant::F32 => "f32",
        }
    }
}

impl std::str::FromStr for VisionQuant {
    type Err = super::layers::UnknownName;

    fn from_str(s: &str) -> Result<VisionQuant, Self::Err> {
        let want = s.trim().to_ascii_lowercase();
        VisionQuant::ALL
            .into_iter()
            .find(|v| v.as_str() == want)
            .ok_or_else(|| super::layers::UnknownName {
                given: s.to_string(),
                expected: VisionQuant::NAMES,
            })
    }
}

impl std::fmt::Display for VisionQuant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone)]
enum Inner {
    Dense(Linear),
    Int8(PackedI8),
}

#[derive(Debug, Clone)]
pub struct ClippableLinear {
    linear: Inner,
    input: (Option<f64>, Option<f64>),
    output: (Option<f64>, Option<f64>),
}

fn scalar(w: &Weights, name: &str) -> Result<Option<f64>, LoadError> {
    let t = match w.get_opt(name, &[], DType::F32)? {
        Some(t) => t,
        None => return Ok(None),
    };
    let v = t
        .to_scalar::<f32>()
        .map_err(|e| LoadError::candle(format!("reading clip bound {name}"), e))?
        as f64;
    // Infinite bounds (the reference's defaults) clamp nothing.
    Ok(v.is_finite().then_some(v))
}

fn clamp(x: &Tensor, (lo, hi): (Option<f64>, Option<f64>)) -> CResult<Tensor> {
    let mut x = x.clone();
    if let Some(lo) = lo {
        x = x.maximum(lo)?;
    }
    if let Some(hi) = hi {
        x = x.minimum(hi)?;
    }
    Ok(x)
}

impl ClippableLinear {
    /// Loads `<name>.linear.weight` `[out, in]` and, with `clipped`, the clip bounds present.
    pub fn load(
        w: &Weights,
        name: &str,
        out_dim: usize,
        in_dim: usize,
        clipped: bool,
        quant: Quant,
    ) -> Result<Self, LoadError> {
        let linear = Inner::Dense(Linear::load(
            w,
            &format!("{name}.linear"),
            out_dim,
            in_dim,
            quant,
        )?);
        Self::with_bounds(w, name, linear, clipped)
    }

    /// Like [`ClippableLinear::load`] with the weight as int8 ([`VisionQuant::Int8`]) when
    /// asked for and the CPU runs the VNNI kernel; f32 otherwise.
    pub fn load_vision(
        w: &Weights,
        name: &str,
        out_dim: usize,
        in_dim: usize,
        clipped: bool,
        vq: VisionQuant,
    ) -> Result<Self, LoadError> {
        let full = format!("{name}.linear.weight");
        let int8 = vq == VisionQuant::Int8
            && w.device().is_cpu()
            && w.dtype() == DType::F32
            && super::w8a8::available()
            && w.quantized(&full)?.is_none();
        let linear = if int8 {
            let t = w.get_dtype(&full, &[out_dim, in_dim], DType::F32)?;
            let v = t
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .map_err(|e| LoadError::candle(format!("reading {full}"), e))?;
            Inner::Int8(PackedI8::pack(&v, out_dim, in_dim))
        } else {
            Inner::Dense(Linear::load(
                w,
                &format!("{name}.linear"),
                out_dim,
                in_dim,
                Quant::F32,
            )?)
        };
        Self::with_bounds(w, name, linear, clipped)
    }

    fn with_bounds(
        w: &Weights,
        name: &str,
        linear: Inner,
        clipped: bool,
    ) -> Result<Self, LoadError> {
        let (input, output) = if clipped {
            (
                (
                    scalar(w, &format!("{name}.input_min"))?,
                    scalar(w, &format!("{name}.input_max"))?,
                ),
                (
                    scalar(w, &format!("{name}.output_min"))?,
                    scalar(w, &format!("{name}.output_max"))?,
                ),
            )
        } else {
            ((None, None), (None, None))
        };
        Ok(Self {
            linear,
            input,
            output,
        })
    }

    pub fn out_dim(&self) -> usize {
        match &self.linear {
            Inner::Dense(l) => l.out_dim(),
            Inner::Int8(p) => p.out_dim(),
        }
    }

    /// How the weight is stored: `f32`, `int8`, ... (see [`Linear::storage`]).
    pub fn storage(&self) -> &'static str {
        match &self.linear {
            Inner::Dense(l) => l.storage(),
            Inner::Int8(_) => "int8",
        }
    }
}

impl Module for ClippableLinear {
    fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        let x = clamp(x, self.input)?;
        let y = match &self.linear {
            Inner::Dense(l) => l.forward(&x)?,
            Inner::Int8(p) if x.dtype() == DType::F32 => {
                let dims = x.dims().to_vec();
                let k = p.in_dim();
                if dims.last() != Some(&k) {
                    candle_core::bail!("int8 linear: input {dims:?}, weight takes {k}");
                }
                let rows = x.elem_count() / k.max(1);
                let lhs = x.flatten_all()?.to_vec1::<f32>()?;
                let mut dst = vec![0f32; rows * p.out_dim()];
                p.matmul(&lhs, rows, &mut dst);
                let mut out = dims;
                let last = out.len() - 1;
                out[last] = p.out_dim();
                Tensor::from_vec(dst, out, x.device())?
            }
            Inner::Int8(_) => candle_core::bail!("int8 linear: activations must be f32"),
        };
        clamp(&y, self.output)
    }
}
