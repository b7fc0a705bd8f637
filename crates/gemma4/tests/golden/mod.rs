//! What the golden parity tests share: a fixture folder (`model/`, `expected.safetensors`,
//! `cases.json`) loaded once, and reading its cases.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use gemma4::text::LoadOptions;
use gemma4::Gemma4;

pub struct Fixture {
    pub model: Gemma4,
    pub expected: HashMap<String, Tensor>,
    pub cases: serde_json::Value,
}

impl Fixture {
    /// The fixture in `dir`, its model loaded with activations in `dtype`.
    pub fn load(dir: &Path, dtype: DType) -> Fixture {
        let opts = LoadOptions {
            dtype,
            ..LoadOptions::default()
        };
        let model = Gemma4::load_dir(&dir.join("model"), &opts).unwrap();
        let expected =
            candle_core::safetensors::load(dir.join("expected.safetensors"), &Device::Cpu).unwrap();
        let cases: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("cases.json")).unwrap())
                .unwrap();
        Fixture {
            model,
            expected,
            cases,
        }
    }
}

pub fn case<'a>(f: &'a Fixture, name: &str) -> &'a serde_json::Value {
    f.cases["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap()
}

/// A row's input ids without its left padding, and the padding length.
pub fn ids_of(v: &serde_json::Value, row: usize) -> (Vec<u32>, usize) {
    let ids: Vec<u32> = v["input_ids"][row]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect();
    let mask: Vec<u64> = v["attention_mask"][row]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap())
        .collect();
    let pad = mask.iter().take_while(|&&m| m == 0).count();
    (ids[pad..].to_vec(), pad)
}

pub fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}
