//! Which device the model runs on, from a short spec (`cpu`, `cuda`, `cuda:N`, `metal`,
//! `metal:N`), and the activation dtype that goes with it.
//!
//! Unset, a `cuda` (or `metal`) build takes GPU 0 with bf16 activations and a default build the
//! CPU with f32. A GPU build never falls back to the CPU on its own: a model meant for a GPU
//! silently running 50x slower would only show up as a stalled pipeline.

use candle_core::{DType, Device};

/// Why a device spec cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("{spec}: '{number}' is not a device number")]
    BadNumber { spec: String, number: String },
    #[error("{spec}: expected cpu, cuda, cuda:N, metal or metal:N")]
    Unknown { spec: String },
    #[error("{spec}: this build has no `{feature}` feature")]
    NotBuilt { spec: String, feature: &'static str },
    #[error("no usable {kind} device {ordinal} ({detail})")]
    Unavailable {
        kind: &'static str,
        ordinal: usize,
        detail: String,
    },
}

/// The build's default spec: `cuda`, `metal` or `cpu`.
pub fn default_spec() -> &'static str {
    if cfg!(feature = "cuda") {
        "cuda"
    } else if cfg!(feature = "metal") {
        "metal"
    } else {
        "cpu"
    }
}

/// Opens the device a spec names (`None`: [`default_spec`]) with its activation dtype.
pub fn open(spec: Option<&str>) -> Result<(Device, DType), DeviceError> {
    let spec = spec
        .map(str::trim)
        .unwrap_or(default_spec())
        .to_ascii_lowercase();
    let (kind, ordinal) = match spec.split_once(':') {
        Some((k, n)) => {
            let ordinal = n.parse::<usize>().map_err(|_| DeviceError::BadNumber {
                spec: spec.clone(),
                number: n.to_string(),
            })?;
            (k, ordinal)
        }
        None => (spec.as_str(), 0),
    };
    #[allow(unused_variables)]
    let unavailable = |kind: &'static str, e: candle_core::Error| {
        // With RUST_BACKTRACE set candle appends a backtrace; callers report one line.
        let e = match e {
            candle_core::Error::WithBacktrace { inner, .. } => *inner,
            e => e,
        };
        let detail = e
            .to_string()
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        DeviceError::Unavailable {
            kind,
            ordinal,
            detail,
        }
    };
    match kind {
        "cpu" => Ok((Device::Cpu, DType::F32)),
        "cuda" => {
            #[cfg(feature = "cuda")]
            {
                Device::new_cuda(ordinal)
                    .map(|d| (d, DType::BF16))
                    .map_err(|e| unavailable("CUDA", e))
            }
            #[cfg(not(feature = "cuda"))]
            Err(DeviceError::NotBuilt {
                spec: spec.clone(),
                feature: "cuda",
            })
        }
        "metal" => {
            #[cfg(feature = "metal")]
            {
                Device::new_metal(ordinal)
                    .map(|d| (d, DType::BF16))
                    .map_err(|e| unavailable("Metal", e))
            }
            #[cfg(not(feature = "metal"))]
            Err(DeviceError::NotBuilt {
                spec: spec.clone(),
                feature: "metal",
            })
        }
        _ => Err(DeviceError::Unknown { spec: spec.clone() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_and_bad_specs() {
        let (d, t) = open(Some(" CPU ")).unwrap();
        assert!(d.is_cpu());
        assert_eq!(t, DType::F32);
        let e = open(Some("tpu")).unwrap_err().to_string();
        assert!(e.contains("expected cpu, cuda"), "{e}");
        let e = open(Some("cuda:x")).unwrap_err().to_string();
        assert!(e.contains("'x' is not a device number"), "{e}");
    }
}
