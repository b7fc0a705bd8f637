//! One projector GGUF (`mmproj-*.gguf`) with random weights at a real Gemma 4 vision tower
//! shape, in the layout llama.cpp's converter writes for projector type `gemma4v`
//! (`conversion/gemma.py` `Gemma4VisionAudioModel`, over `MmprojModel` in `conversion/base.py`),
//! so that llama.cpp's `mtmd` and percept's [`VisionTower`](crate::model::vision::VisionTower)
//! encode images with the very same bytes.
//!
//! What the converter does and this writer repeats:
//! - metadata: `general.architecture = clip`, `general.type = mmproj`, `general.file_type`,
//!   `clip.has_vision_encoder`, `clip.vision.{projection_dim (the text width), image_size
//!   (224, unused), patch_size, embedding_length, feed_forward_length, block_count,
//!   attention.head_count, image_mean [0,0,0], image_std [1,1,1], projector_type gemma4v,
//!   attention.layer_norm_epsilon}`;
//! - tensor names (`v.blk.N.attn_q.weight`, `v.blk.N.ln1.weight`, `mm.input_projection.weight`,
//!   ...); the clip bounds of each clippable linear as 1-element F32 tensors
//!   (`v.blk.N.attn_q.input_max` ...);
//! - the patch projection `[n, p*p*3]` (HWC columns) stored as `[n, 3, p, p]`;
//! - types: at `f16` every matrix F16 (the patch projection too: `tensor_force_quant` keeps it
//!   F16 in an F16 file), at `f32` everything F32; vectors, clip bounds and the position table
//!   F32 whatever the file type.
//!
//! The audio tower is left out: the converter writes a vision-only projector for a checkpoint
//! without `audio_config`, and the image encode does not touch it.
//!
//! Weights are small random values (|w| <= 0.02, as trained weights are), norms 1, clip
//! bounds ±1e4 (finite, so both sides clamp as they do with a real checkpoint, never binding).

use std::path::Path;

use crate::model::config::VisionConfig;
use crate::model::gguf::Value;
use crate::model::gguf_write::{nbytes, write_gguf, OutTensor};
use crate::model::loader::LoadError;
use crate::model::rng::SplitMix64;

const F32: u32 = 0;
const F16: u32 = 1;

/// Storage of the projector's matrices (`convert_hf_to_gguf.py --mmproj --outtype`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum MmprojType {
    /// F16 matrices (what the published `mmproj-*-f16.gguf` files hold).
    #[value(name = "f16")]
    F16,
    /// F32 throughout.
    #[value(name = "f32")]
    F32,
}

impl MmprojType {
    pub fn as_str(self) -> &'static str {
        match self {
            MmprojType::F16 => "f16",
            MmprojType::F32 => "f32",
        }
    }

    /// `general.file_type` (llama_ftype: ALL_F32 = 0, MOSTLY_F16 = 1).
    fn file_type(self) -> u32 {
        match self {
            MmprojType::F16 => 1,
            MmprojType::F32 => 0,
        }
    }

    fn matrix(self) -> u32 {
        match self {
            MmprojType::F16 => F16,
            MmprojType::F32 => F32,
        }
    }
}

/// What one tensor holds.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fill {
    Random,
    Const(f32),
}

struct Planned {
    out: OutTensor,
    fill: Fill,
}

/// GGUF metadata key/value pairs, in file order.
type Metadata = Vec<(String, Value)>;

/// Bound written for every clip scalar (`±CLIP`).
const CLIP: f32 = 1e4;

/// Metadata and tensor table of the projector for `cfg` feeding a decoder `text_hidden` wide.
fn plan(
    cfg: &VisionConfig,
    text_hidden: usize,
    ty: MmprojType,
) -> anyhow::Result<(Metadata, Vec<Planned>)> {
    if cfg.num_attention_heads == 0 || cfg.head_dim == 0 || cfg.hidden_size == 0 {
        anyhow::bail!("vision config without heads or width");
    }
    let u = |x: usize| Value::U32(x as u32);
    let meta = vec![
        ("general.architecture".into(), Value::Str("clip".into())),
        ("general.type".into(), Value::Str("mmproj".into())),
        (
            "general.name".into(),
            Value::Str("percept random-weight benchmark".into()),
        ),
        ("general.file_type".into(), Value::U32(ty.file_type())),
        ("clip.has_vision_encoder".into(), Value::Bool(true)),
        ("clip.vision.projection_dim".into(), u(text_hidden)),
        ("clip.vision.image_size".into(), u(224)),
        ("clip.vision.patch_size".into(), u(cfg.patch_size)),
        ("clip.vision.embedding_length".into(), u(cfg.hidden_size)),
        (
            "clip.vision.feed_forward_length".into(),
            u(cfg.intermediate_size),
        ),
        ("clip.vision.block_count".into(), u(cfg.num_hidden_layers)),
        (
            "clip.vision.attention.head_count".into(),
            u(cfg.num_attention_heads),
        ),
        (
            "clip.vision.image_mean".into(),
            Value::Array(vec![Value::F32(0.0); 3]),
        ),
        (
            "clip.vision.image_std".into(),
            Value::Array(vec![Value::F32(1.0); 3]),
        ),
        (
            "clip.vision.projector_type".into(),
            Value::Str("gemma4v".into()),
        ),
        (
            "clip.vision.attention.layer_norm_epsilon".into(),
            Value::F32(cfg.rms_norm_eps as f32),
        ),
        ("general.quantization_version".into(), Value::U32(2)),
    ];
    let m = ty.matrix();
    let hd = cfg.hidden_size;
    let (q_out, kv_out) = (
        cfg.num_attention_heads * cfg.head_dim,
        cfg.num_key_value_heads * cfg.head_dim,
    );
    let mut out = Vec::new();
    let mut push = |name: String, type_id: u32, shape: Vec<usize>, fill: Fill| {
        out.push(Planned {
            out: OutTensor {
                nbytes: nbytes(type_id, &shape),
                name,
                type_id,
                shape,
            },
            fill,
        });
    };
    // The converter's order: the checkpoint's tensor names sorted.
    push(
        "mm.input_projection.weight".into(),
        m,
        vec![text_hidden, hd],
        Fill::Random,
    );
    for i in 0..cfg.num_hidden_layers {
        let b = |t: &str| format!("v.blk.{i}.{t}");
        let linear = |push: &mut dyn FnMut(String, u32, Vec<usize>, Fill),
                      base: &str,
                      rows: usize,
                      cols: usize| {
            if cfg.use_clipped_linears {
                push(
                    b(&format!("{base}.input_max")),
                    F32,
                    vec![1],
                    Fill::Const(CLIP),
                );
                push(
                    b(&format!("{base}.input_min")),
                    F32,
                    vec![1],
                    Fill::Const(-CLIP),
                );
            }
            push(
                b(&format!("{base}.weight")),
                m,
                vec![rows, cols],
                Fill::Random,
            );
            if cfg.use_clipped_linears {
                push(
                    b(&format!("{base}.output_max")),
                    F32,
                    vec![1],
                    Fill::Const(CLIP),
                );
                push(
                    b(&format!("{base}.output_min")),
                    F32,
                    vec![1],
                    Fill::Const(-CLIP),
                );
            }
        };
        push(b("ln1.weight"), F32, vec![hd], Fill::Const(1.0));
        linear(&mut push, "ffn_down", hd, cfg.intermediate_size);
        linear(&mut push, "ffn_gate", cfg.intermediate_size, hd);
        linear(&mut push, "ffn_up", cfg.intermediate_size, hd);
        push(b("attn_post_norm.weight"), F32, vec![hd], Fill::Const(1.0));
        push(b("ffn_post_norm.weight"), F32, vec![hd], Fill::Const(1.0));
        push(b("ln2.weight"), F32, vec![hd], Fill::Const(1.0));
        push(
            b("attn_k_norm.weight"),
            F32,
            vec![cfg.head_dim],
            Fill::Const(1.0),
        );
        linear(&mut push, "attn_k", kv_out, hd);
        linear(&mut push, "attn_out", hd, q_out);
        push(
            b("attn_q_norm.weight"),
            F32,
            vec![cfg.head_dim],
            Fill::Const(1.0),
        );
        linear(&mut push, "attn_q", q_out, hd);
        linear(&mut push, "attn_v", kv_out, hd);
    }
    let p = cfg.patch_size;
    push(
        "v.patch_embd.weight".into(),
        m,
        vec![hd, 3, p, p],
        Fill::Random,
    );
    push(
        "v.position_embd.weight".into(),
        F32,
        vec![2, cfg.position_embedding_size, hd],
        Fill::Random,
    );
    if cfg.standardize {
        push("v.std_bias".into(), F32, vec![hd], Fill::Const(0.0));
        push("v.std_scale".into(), F32, vec![hd], Fill::Const(1.0));
    }
    Ok((meta, out))
}

/// Writes the projector for `cfg` (a decoder `text_hidden` wide) at `ty` to `path`; returns
/// its size in bytes.
pub fn write(
    path: &Path,
    cfg: &VisionConfig,
    text_hidden: usize,
    ty: MmprojType,
    seed: u64,
) -> anyhow::Result<u64> {
    let (meta, planned) = plan(cfg, text_hidden, ty)?;
    let tensors: Vec<OutTensor> = planned.iter().map(|p| p.out.clone()).collect();
    let io = |source| LoadError::Io {
        path: path.to_path_buf(),
        source,
    };
    write_gguf(path, &meta, &tensors, |i, w| {
        let p = &planned[i];
        let elem = if p.out.type_id == F16 { 2 } else { 4 };
        let n = p.out.nbytes / elem;
        let mut rng = SplitMix64(seed ^ (i as u64).wrapping_mul(0x9E37_79B9));
        let mut buf = Vec::with_capacity(p.out.nbytes.min(4 << 20));
        let mut left = n;
        while left > 0 {
            buf.clear();
            for _ in 0..left.min((4 << 20) / elem) {
                let v = match p.fill {
                    Fill::Const(v) => v,
                    // Uniform in [-0.02, 0.02]: far from f16's subnormals at the low end.
                    Fill::Random => (rng.next_u64() % 4001) as f32 * 1e-5 - 0.02,
                };
                if elem == 2 {
                    buf.extend_from_slice(&half::f16::from_f32(v).to_bits().to_le_bytes());
                } else {
                    buf.extend_from_slice(&v.to_le_bytes());
                }
            }
            left -= buf.len() / elem;
            w.write_all(&buf).map_err(io)?;
        }
        Ok(())
    })?;
    Ok(std::fs::metadata(path)?.len())
}

/// Names, ggml types and row-major shapes of the file [`write`] makes (for tests).
pub fn planned_tensors(
    cfg: &VisionConfig,
    text_hidden: usize,
    ty: MmprojType,
) -> anyhow::Result<Vec<(String, u32, Vec<usize>)>> {
    Ok(plan(cfg, text_hidden, ty)?
        .1
        .into_iter()
        .map(|p| (p.out.name, p.out.type_id, p.out.shape))
        .collect())
}

/// Metadata of the file [`write`] makes (for tests).
pub fn planned_metadata(
    cfg: &VisionConfig,
    text_hidden: usize,
    ty: MmprojType,
) -> anyhow::Result<Metadata> {
    Ok(plan(cfg, text_hidden, ty)?.0)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::model::gguf::GgufFile;

    fn fixture(rel: &str) -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("crates/gemma4/tests/fixtures")
            .join(rel)
    }

    /// The tiny golden checkpoint's vision config and text width.
    fn tiny() -> (VisionConfig, usize) {
        let cfg =
            crate::model::config::Gemma4Config::from_file(&fixture("gemma4/model/config.json"))
                .unwrap();
        (
            cfg.vision_config.clone().unwrap(),
            cfg.text_config.hidden_size,
        )
    }

    /// The plan for the tiny checkpoint is what `convert_hf_to_gguf.py --mmproj --outtype f32`
    /// wrote for it (the fixture), vision part: every tensor name, type and shape, and the
    /// metadata the loaders read.
    #[test]
    fn layout_matches_the_converters_projector() {
        let (cfg, text_hidden) = tiny();
        let f = GgufFile::open(&fixture("gguf/mmproj-gemma4-f32.gguf")).unwrap();
        let mut theirs: Vec<(String, u32, Vec<usize>)> = f
            .tensors
            .iter()
            .filter(|t| t.name.starts_with("v.") || t.name == "mm.input_projection.weight")
            .map(|t| (t.name.clone(), t.type_id, t.shape.clone()))
            .collect();
        let mut ours = planned_tensors(&cfg, text_hidden, MmprojType::F32).unwrap();
        theirs.sort();
        ours.sort();
        assert_eq!(ours, theirs);
        for (k, v) in planned_metadata(&cfg, text_hidden, MmprojType::F32).unwrap() {
            if k == "general.name" {
                continue;
            }
            assert_eq!(f.meta(&k), Some(&v), "{k}");
        }
        // At f16 the matrices (patch projection included) are F16, the rest stays F32.
        let f16 = planned_tensors(&cfg, text_hidden, MmprojType::F16).unwrap();
        let ty = |n: &str| f16.iter().find(|t| t.0 == n).unwrap().1;
        assert_eq!(ty("v.patch_embd.weight"), F16);
        assert_eq!(ty("v.blk.1.attn_q.weight"), F16);
        assert_eq!(ty("mm.input_projection.weight"), F16);
        assert_eq!(ty("v.position_embd.weight"), F32);
        assert_eq!(ty("v.blk.1.attn_q.input_max"), F32);
        assert_eq!(ty("v.blk.1.ln1.weight"), F32);
    }

    /// A written projector loads as percept's vision tower and encodes a frame into as many
    /// soft tokens as the budget gives, of the decoder's width, all finite.
    #[test]
    fn written_projector_encodes_an_image() {
        let (cfg, text_hidden) = tiny();
        let dir = std::env::temp_dir().join(format!("percept-mmproj-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for ty in [MmprojType::F16, MmprojType::F32] {
            let path = dir.join(format!("mmproj-{}.gguf", ty.as_str()));
            let n = write(&path, &cfg, text_hidden, ty, 1).unwrap();
            assert_eq!(n, std::fs::metadata(&path).unwrap().len());
            let tower = crate::model::gguf_mmproj::vision_tower(
                &path,
                &candle_core::Device::Cpu,
                crate::model::Quant::F32,
                crate::model::clippable::VisionQuant::F32,
            )
            .unwrap();
            assert_eq!(tower.text_hidden(), text_hidden);
            // 16:9 like a video frame; at 70 soft tokens 1280x720 resizes to 528x288.
            let (w, h) = (320, 180);
            let data: Vec<u8> = (0..w * h * 3).map(|i| (i * 7 % 251) as u8).collect();
            let img = crate::model::preprocess::image::RgbImage::new(w, h, data);
            let input = crate::model::preprocess::image::preprocess(&img, 70).unwrap();
            let soft = tower.encode(&input).unwrap();
            assert_eq!(soft.dims(), &[input.n_soft_tokens, text_hidden]);
            assert_eq!(
                input.n_soft_tokens,
                crate::model::preprocess::image::soft_token_count(h, w, 70).unwrap()
            );
            let v: Vec<f32> = soft.flatten_all().unwrap().to_vec1().unwrap();
            assert!(v.iter().all(|x| x.is_finite()), "{}", ty.as_str());
            assert!(v.iter().any(|x| *x != 0.0), "{}", ty.as_str());
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
