//! One GGUF file with random weights at a real Gemma 4 shape, in the layout llama.cpp's
//! converter writes for architecture `gemma4` (E2B/E4B with per-layer embeddings, the 12B
//! unified decoder without), so that llama.cpp and percept load the very same bytes.
//!
//! Quantizations: `q8_0` (every matrix Q8_0, what `convert_hf_to_gguf.py --outtype q8_0`
//! writes) and `q4k`, the mix `llama-quantize ... Q4_K_M` writes: Q4_K everywhere except
//! Q6_K for the tied token table (and the per-layer token table, which llama-quantize files
//! under the same category), for `attn_v` and `ffn_down` of the layers `use_more_bits`
//! picks (the first and last eighth and every third between), and `per_layer_model_proj`
//! left at F16. Norms, `layer_output_scale` and `rope_freqs` are F32 as the converter writes
//! them. A matrix whose rows do not fill whole blocks falls back to Q8_0, else F16 (tiny
//! test shapes), as llama-quantize falls back.
//!
//! The blocks are random bytes with their scale fields set so that weights stay within a
//! few hundredths (as trained weights are): no f32 copy is made and nothing is quantized, so
//! writing a 12 GB file is bound by the disk.

use std::path::Path;

use crate::model::config::{KvSource, TextConfig};
use crate::model::gguf::Value;
use crate::model::gguf_write::{nbytes, write_gguf, OutTensor};
use crate::model::loader::LoadError;
use crate::model::rng::SplitMix64;

const F32: u32 = 0;
const F16: u32 = 1;
const Q8_0: u32 = 8;
const Q4_K: u32 = 12;
const Q6_K: u32 = 14;

/// Quantization of the benchmark file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FileQuant {
    /// The Q4_K_M mix of llama-quantize (Q4_K with Q6_K where it puts it).
    #[value(name = "q4k")]
    Q4K,
    /// Q8_0 throughout.
    #[value(name = "q8_0")]
    Q8_0,
}

impl FileQuant {
    pub fn as_str(self) -> &'static str {
        match self {
            FileQuant::Q4K => "q4k",
            FileQuant::Q8_0 => "q8_0",
        }
    }

    /// `general.file_type` (llama_ftype: MOSTLY_Q8_0 = 7, MOSTLY_Q4_K_M = 15).
    fn file_type(self) -> u32 {
        match self {
            FileQuant::Q4K => 15,
            FileQuant::Q8_0 => 7,
        }
    }
}

/// llama-quantize's `use_more_bits`: the layers of a Q4_K_M file that get Q6_K.
fn use_more_bits(i: usize, n: usize) -> bool {
    i < n / 8 || i >= 7 * n / 8 || (i as i64 - (n / 8) as i64).rem_euclid(3) == 2
}

/// The type a matrix `[rows, cols]` gets: `want`, or the fallback when a row does not fill
/// whole blocks.
fn fit(want: u32, cols: usize) -> u32 {
    let block = match want {
        Q4_K | Q6_K => 256,
        Q8_0 => 32,
        _ => 1,
    };
    if cols.is_multiple_of(block) {
        want
    } else if cols.is_multiple_of(32) {
        Q8_0
    } else {
        F16
    }
}

/// What one tensor holds.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fill {
    /// Random blocks (or random small f16 values).
    Random,
    /// Every element this value (norm weights, scales).
    Const(f32),
    /// `rope_freqs`: 1 for the first `n` pairs (rotated), 1e30 for the rest.
    Rotated(usize),
}

/// GGUF metadata key/value pairs, in file order.
type Metadata = Vec<(String, Value)>;

struct Planned {
    out: OutTensor,
    fill: Fill,
}

/// The vocabulary written: Gemma 4's special tokens at their ids, byte-fallback tokens, and
/// ordinary filler tokens up to `vocab` (random weights need no real vocabulary; both
/// loaders need one of the table's size).
fn vocabulary(vocab: usize) -> (Vec<String>, Vec<i32>) {
    let mut toks: Vec<String> = Vec::with_capacity(vocab);
    let mut types: Vec<i32> = Vec::with_capacity(vocab);
    for s in ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"] {
        toks.push(s.into());
        types.push(3);
    }
    for s in [
        "<|turn>",
        "<turn|>",
        "<|image>",
        "<image|>",
        "<|image|>",
        "<|audio>",
        "<audio|>",
        "<|audio|>",
        "<|video|>",
    ] {
        toks.push(s.into());
        types.push(3);
    }
    for b in 0..=255u8 {
        toks.push(format!("<0x{b:02X}>"));
        types.push(6);
    }
    for s in ["\n", "▁", "t", "h", "th", "▁th"] {
        toks.push(s.into());
        types.push(1);
    }
    let mut i = 0usize;
    while toks.len() < vocab {
        toks.push(format!("w{i}"));
        types.push(1);
        i += 1;
    }
    toks.truncate(vocab);
    types.truncate(vocab);
    (toks, types)
}

/// Metadata and tensor table of the file.
fn plan(cfg: &TextConfig, quant: FileQuant) -> anyhow::Result<(Metadata, Vec<Planned>)> {
    let specs = cfg.layer_specs()?;
    let n = specs.len();
    let hidden = cfg.hidden_size;
    let heads = cfg.num_attention_heads;
    let vocab = cfg.vocab_size;
    let ple = cfg.ple_dim().unwrap_or(0);
    let head_full = cfg.global_head_dim.unwrap_or(cfg.head_dim);
    let head_swa = cfg.head_dim;
    let first_shared = cfg.first_kv_shared_layer();
    let a = |k: &str| format!("gemma4.{k}");
    let u32v = |x: usize| Value::U32(x as u32);
    let arr_i32 =
        |v: Vec<usize>| Value::Array(v.into_iter().map(|x| Value::I32(x as i32)).collect());
    let (toks, types) = vocabulary(vocab);
    let meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::Str("gemma4".into())),
        ("general.type".into(), Value::Str("model".into())),
        (
            "general.name".into(),
            Value::Str("percept random-weight benchmark".into()),
        ),
        (a("block_count"), u32v(n)),
        (a("context_length"), u32v(cfg.max_position_embeddings)),
        (a("embedding_length"), u32v(hidden)),
        (
            a("feed_forward_length"),
            arr_i32(specs.iter().map(|s| s.intermediate_size).collect()),
        ),
        (a("attention.head_count"), u32v(heads)),
        (
            a("attention.head_count_kv"),
            arr_i32(specs.iter().map(|s| s.num_kv_heads).collect()),
        ),
        (
            a("rope.freq_base"),
            Value::F32(cfg.rope_parameters().full_attention.rope_theta as f32),
        ),
        (
            a("rope.freq_base_swa"),
            Value::F32(cfg.rope_parameters().sliding_attention.rope_theta as f32),
        ),
        (
            a("attention.layer_norm_rms_epsilon"),
            Value::F32(cfg.rms_norm_eps as f32),
        ),
        (a("attention.key_length"), u32v(head_full)),
        (a("attention.value_length"), u32v(head_full)),
        ("general.file_type".into(), Value::U32(quant.file_type())),
        (
            a("final_logit_softcapping"),
            Value::F32(cfg.final_logit_softcapping.unwrap_or(30.0) as f32),
        ),
        (a("attention.sliding_window"), u32v(cfg.sliding_window)),
        (
            a("attention.shared_kv_layers"),
            u32v(cfg.num_kv_shared_layers),
        ),
        (a("embedding_length_per_layer_input"), u32v(ple)),
        (
            a("attention.sliding_window_pattern"),
            Value::Array(
                specs
                    .iter()
                    .map(|s| Value::Bool(s.sliding_window.is_some()))
                    .collect(),
            ),
        ),
        (a("attention.key_length_swa"), u32v(head_swa)),
        (a("attention.value_length_swa"), u32v(head_swa)),
        (a("rope.dimension_count"), u32v(head_full)),
        (a("rope.dimension_count_swa"), u32v(head_swa)),
        ("general.quantization_version".into(), Value::U32(2)),
        ("tokenizer.ggml.model".into(), Value::Str("gemma4".into())),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(toks.into_iter().map(Value::Str).collect()),
        ),
        (
            "tokenizer.ggml.scores".into(),
            Value::Array(
                types
                    .iter()
                    .map(|&t| Value::F32(if t == 1 { 0.0 } else { -1000.0 }))
                    .collect(),
            ),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            Value::Array(types.into_iter().map(Value::I32).collect()),
        ),
        (
            "tokenizer.ggml.merges".into(),
            Value::Array(vec![Value::Str("t h".into()), Value::Str("▁ th".into())]),
        ),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(2)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.unknown_token_id".into(), Value::U32(3)),
        ("tokenizer.ggml.padding_token_id".into(), Value::U32(0)),
        ("tokenizer.ggml.mask_token_id".into(), Value::U32(4)),
        ("tokenizer.ggml.add_space_prefix".into(), Value::Bool(false)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(true)),
    ];

    let q4k = quant == FileQuant::Q4K;
    let base = if q4k { Q4_K } else { Q8_0 };
    let mut out = Vec::new();
    let mut push = |name: String, type_id: u32, shape: Vec<usize>, fill: Fill| {
        let nb = nbytes(type_id, &shape);
        out.push(Planned {
            out: OutTensor {
                name,
                type_id,
                shape,
                nbytes: nb,
            },
            fill,
        });
    };
    let matrix = |want: u32, rows: usize, cols: usize| (fit(want, cols), vec![rows, cols]);
    let rotated = (head_full as f64 / 2.0
        * cfg
            .rope_parameters()
            .full_attention
            .partial_rotary_factor
            .unwrap_or(1.0))
    .round() as usize;
    push(
        "rope_freqs.weight".into(),
        F32,
        vec![head_full / 2],
        Fill::Rotated(rotated),
    );
    let embd_type = if q4k { Q6_K } else { Q8_0 };
    let (t, s) = matrix(embd_type, vocab, hidden);
    push("token_embd.weight".into(), t, s, Fill::Random);
    if ple > 0 {
        let (t, s) = matrix(embd_type, cfg.vocab_size_per_layer_input, n * ple);
        push("per_layer_token_embd.weight".into(), t, s, Fill::Random);
    }
    // attn_v tensors are counted in file order for use_more_bits (llama-quantize's
    // i_attention_wv / n_attention_wv).
    let n_v = specs
        .iter()
        .filter(|s| s.kv == KvSource::Own && !s.k_eq_v)
        .count();
    let mut i_v = 0usize;
    for s in &specs {
        let i = s.index;
        let b = |t: &str| format!("blk.{i}.{t}.weight");
        let hd = s.head_dim;
        let own_kv = i < first_shared && s.kv == KvSource::Own;
        push(b("attn_norm"), F32, vec![hidden], Fill::Const(1.0));
        push(b("layer_output_scale"), F32, vec![1], Fill::Const(1.0));
        let down = if q4k && use_more_bits(i, n) {
            Q6_K
        } else {
            base
        };
        let ff = s.intermediate_size;
        let (t, sh) = matrix(down, hidden, ff);
        push(b("ffn_down"), t, sh, Fill::Random);
        let (t, sh) = matrix(base, ff, hidden);
        push(b("ffn_gate"), t, sh.clone(), Fill::Random);
        push(b("ffn_up"), t, sh, Fill::Random);
        if ple > 0 {
            let (t, sh) = matrix(base, ple, hidden);
            push(b("inp_gate"), t, sh, Fill::Random);
            let (t, sh) = matrix(base, hidden, ple);
            push(b("proj"), t, sh, Fill::Random);
            push(b("post_norm"), F32, vec![hidden], Fill::Const(1.0));
        }
        push(
            b("post_attention_norm"),
            F32,
            vec![hidden],
            Fill::Const(1.0),
        );
        push(b("post_ffw_norm"), F32, vec![hidden], Fill::Const(1.0));
        push(b("ffn_norm"), F32, vec![hidden], Fill::Const(1.0));
        if own_kv {
            push(b("attn_k_norm"), F32, vec![hd], Fill::Const(1.0));
            let (t, sh) = matrix(base, s.num_kv_heads * hd, hidden);
            push(b("attn_k"), t, sh, Fill::Random);
        }
        let (t, sh) = matrix(base, hidden, heads * hd);
        push(b("attn_output"), t, sh, Fill::Random);
        push(b("attn_q_norm"), F32, vec![hd], Fill::Const(1.0));
        let (t, sh) = matrix(base, heads * hd, hidden);
        push(b("attn_q"), t, sh, Fill::Random);
        if own_kv && !s.k_eq_v {
            let v = if q4k && use_more_bits(i_v, n_v) {
                Q6_K
            } else {
                base
            };
            i_v += 1;
            let (t, sh) = matrix(v, s.num_kv_heads * hd, hidden);
            push(b("attn_v"), t, sh, Fill::Random);
        }
    }
    push(
        "output_norm.weight".into(),
        F32,
        vec![hidden],
        Fill::Const(1.0),
    );
    if ple > 0 {
        // llama-quantize leaves per_layer_model_proj as converted (F16 from a bf16/f16
        // conversion); a q8_0 conversion writes it as Q8_0.
        let want = if q4k { F16 } else { Q8_0 };
        let (t, sh) = matrix(want, n * ple, hidden);
        push("per_layer_model_proj.weight".into(), t, sh, Fill::Random);
        push(
            "per_layer_proj_norm.weight".into(),
            F32,
            vec![ple],
            Fill::Const(1.0),
        );
    }
    Ok((meta, out))
}

fn f16_bits(x: f32) -> [u8; 2] {
    half::f16::from_f32(x).to_bits().to_le_bytes()
}

/// Fills `buf` (whole blocks of `type_id`) with random blocks whose scales keep the weights
/// within a few hundredths.
fn random_blocks(type_id: u32, rng: &mut SplitMix64, buf: &mut [u8]) {
    for c in buf.chunks_mut(8) {
        let r = rng.next_u64().to_le_bytes();
        c.copy_from_slice(&r[..c.len()]);
    }
    match type_id {
        Q8_0 => {
            // d f16, 32 x i8: |w| <= 127 * 2e-4.
            let d = f16_bits(2e-4);
            for b in buf.chunks_exact_mut(34) {
                b[..2].copy_from_slice(&d);
            }
        }
        Q4_K => {
            // d, dmin f16, 12 bytes of 6-bit scales/mins, 128 bytes of nibbles:
            // w = d*sc*q - dmin*m, |w| <= 63 * 15 * 4e-5.
            let d = f16_bits(4e-5);
            for b in buf.chunks_exact_mut(144) {
                b[..2].copy_from_slice(&d);
                b[2..4].copy_from_slice(&d);
            }
        }
        Q6_K => {
            // ql[128], qh[64], scales i8[16], d f16: w = d*sc*(q-32), scales kept in 0..16.
            let d = f16_bits(5e-5);
            for b in buf.chunks_exact_mut(210) {
                for s in &mut b[192..208] {
                    *s &= 0x0f;
                }
                b[208..210].copy_from_slice(&d);
            }
        }
        F16 => {
            for v in buf.chunks_exact_mut(2) {
                let r = u16::from_le_bytes([v[0], v[1]]);
                let x = (r % 2001) as f32 * 2e-5 - 0.02;
                v.copy_from_slice(&f16_bits(x));
            }
        }
        _ => {
            for v in buf.chunks_exact_mut(4) {
                let r = u32::from_le_bytes([v[0], v[1], v[2], v[3]]);
                let x = (r % 2001) as f32 * 2e-5 - 0.02;
                v.copy_from_slice(&x.to_le_bytes());
            }
        }
    }
}

/// Writes the benchmark GGUF for `cfg` at `quant` to `path`; returns its size in bytes.
pub fn write(path: &Path, cfg: &TextConfig, quant: FileQuant, seed: u64) -> anyhow::Result<u64> {
    let (meta, planned) = plan(cfg, quant)?;
    let tensors: Vec<OutTensor> = planned.iter().map(|p| p.out.clone()).collect();
    if let Some(t) = tensors.iter().find(|t| t.nbytes == 0) {
        anyhow::bail!("{}: no size for ggml type {}", t.name, t.type_id);
    }
    let io = |source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    };
    write_gguf(path, &meta, &tensors, |i, w| {
        let p = &planned[i];
        match p.fill {
            Fill::Random => {
                let mut rng = SplitMix64(seed ^ (i as u64).wrapping_mul(0x9E37_79B9));
                let bb = crate::model::gguf::block_layout(p.out.type_id).map_or(1, |l| l.1);
                // About 4 MiB of whole blocks at a time.
                let chunk = ((4usize << 20) / bb).max(1) * bb;
                let mut buf = vec![0u8; chunk.min(p.out.nbytes)];
                let mut left = p.out.nbytes;
                while left > 0 {
                    let k = left.min(buf.len());
                    random_blocks(p.out.type_id, &mut rng, &mut buf[..k]);
                    w.write_all(&buf[..k]).map_err(io)?;
                    left -= k;
                }
            }
            Fill::Const(v) => {
                let n = p.out.nbytes / 4;
                let bytes: Vec<u8> = (0..n).flat_map(|_| v.to_le_bytes()).collect();
                w.write_all(&bytes).map_err(io)?;
            }
            Fill::Rotated(r) => {
                let n = p.out.nbytes / 4;
                let bytes: Vec<u8> = (0..n)
                    .flat_map(|j| if j < r { 1f32 } else { 1e30f32 }.to_le_bytes())
                    .collect();
                w.write_all(&bytes).map_err(io)?;
            }
        }
        Ok(())
    })?;
    Ok(std::fs::metadata(path)?.len())
}

/// Weight bytes one decode step reads from the file: every tensor but the per-layer token
/// table, of which a step reads one row (the tied token table is the output head, read
/// whole).
pub fn decode_bytes(cfg: &TextConfig, quant: FileQuant) -> anyhow::Result<u64> {
    Ok(plan(cfg, quant)?
        .1
        .iter()
        .filter(|p| p.out.name != "per_layer_token_embd.weight")
        .map(|p| p.out.nbytes as u64)
        .sum())
}

/// Type counts of the file [`write`] makes (for tests and the report).
pub fn planned_types(cfg: &TextConfig, quant: FileQuant) -> anyhow::Result<Vec<(String, u32)>> {
    Ok(plan(cfg, quant)?
        .1
        .into_iter()
        .map(|p| (p.out.name, p.out.type_id))
        .collect())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn q4_k_m_mix_follows_llama_quantize() {
        let cfg = crate::bench::model::real_text_config("e2b").unwrap();
        let types = planned_types(&cfg, FileQuant::Q4K).unwrap();
        let ty = |n: &str| types.iter().find(|(k, _)| k == n).map(|x| x.1);
        assert_eq!(ty("token_embd.weight"), Some(Q6_K));
        assert_eq!(ty("per_layer_token_embd.weight"), Some(Q6_K));
        assert_eq!(ty("per_layer_model_proj.weight"), Some(F16));
        // 35 layers: more bits for 0..4, 30..35 and every third from 6.
        assert_eq!(ty("blk.0.ffn_down.weight"), Some(Q6_K));
        assert_eq!(ty("blk.5.ffn_down.weight"), Some(Q4_K));
        assert_eq!(ty("blk.6.ffn_down.weight"), Some(Q6_K));
        assert_eq!(ty("blk.34.ffn_down.weight"), Some(Q6_K));
        assert_eq!(ty("blk.3.ffn_gate.weight"), Some(Q4_K));
        // KV-shared layers (15..) have no K/V projections.
        assert!(ty("blk.14.attn_v.weight").is_some());
        assert!(ty("blk.15.attn_k.weight").is_none());
        let c12 = crate::bench::model::real_config("12b").unwrap().text_config;
        let t12 = planned_types(&c12, FileQuant::Q8_0).unwrap();
        // K=V on the full layers: no attn_v there, no per-layer embeddings.
        assert!(t12.iter().any(|(n, _)| n == "blk.4.attn_v.weight"));
        assert!(!t12.iter().any(|(n, _)| n == "blk.5.attn_v.weight"));
        assert!(!t12.iter().any(|(n, _)| n.starts_with("per_layer")));
        assert!(t12
            .iter()
            .filter(|(n, _)| n.contains("attn_q.weight"))
            .all(|(_, t)| *t == Q8_0));
    }
}
