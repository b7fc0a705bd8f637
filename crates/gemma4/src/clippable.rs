//! `Gemma4ClippableLinear` (HF modeling_gemma4.py 167-193): a bias-free linear whose weight
//! lives at `<name>.linear.weight`, with optional scalar clamps `input_min/input_max` on the
//! input and `output_min/output_max` on the output (only when `use_clipped_linears`).

use candle_core::{DType, Module, Result as CResult, Tensor};

use super::layers::{Linear, Quant};
use super::loader::{LoadError, Weights};

#[derive(Debug, Clone)]
pub struct ClippableLinear {
    linear: Linear,
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
        let linear = Linear::load(w, &format!("{name}.linear"), out_dim, in_dim, quant)?;
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
        self.linear.out_dim()
    }
}

impl Module for ClippableLinear {
    fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        let x = clamp(x, self.input)?;
        let y = self.linear.forward(&x)?;
        clamp(&y, self.output)
    }
}
