#![allow(clippy::unwrap_used)]
//! GGUF files written by llama.cpp's own converter (`crates/gemma4/tests/fixtures/gguf/`, made by
//! `make_gguf_fixtures.py` from the golden tiny checkpoints) against the safetensors path:
//! the same prompt ids, logits and greedy tokens; Q8_0 blocks bit for bit what percept's
//! quantizer makes of the same weights; the ways in (file, LM Studio folder, Ollama store);
//! one-line errors.

#[path = "../crates/gemma4/tests/golden/mod.rs"]
mod golden;

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device};
use golden::{ids_of, max_diff};
use percept::model::generate::{generate_batch, Request, Sampling};
use percept::model::gguf::{GgufFile, Value};
use percept::model::gguf_model;
use percept::model::gguf_write::{write_gguf, OutTensor};
use percept::model::loader::{ModelFiles, Weights};
use percept::model::multimodal::{embed_prompt, SoftTokens};
use percept::model::text::{LoadOptions, LogitRows, Segment};
use percept::model::tokenizer::MediaItem;
use percept::model::Gemma4;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("crates/gemma4/tests/fixtures")
}

fn gguf(name: &str) -> PathBuf {
    root().join("gguf").join(name)
}

/// A private cache folder per test (the rebuilt config/tokenizer are written there).
fn scratch(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("percept-gguf-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn with_cache<T>(tag: &str, f: impl FnOnce(&Path) -> T) -> T {
    // The cache root comes from XDG_CACHE_HOME; tests in this binary that load GGUF files
    // set it to their own folder under a lock so they never share state.
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let d = scratch(tag);
    std::env::set_var("XDG_CACHE_HOME", &d);
    let out = f(&d);
    let _ = std::fs::remove_dir_all(&d);
    out
}

fn load(spec: &str, mmproj: Option<&Path>) -> Gemma4 {
    let files = ModelFiles::resolve_with(spec, mmproj).unwrap();
    Gemma4::load_files(files, &LoadOptions::default()).unwrap()
}

/// Prompt ids, all-position logits and greedy tokens of a golden case: the GGUF model
/// against the safetensors model (and the reference's own ids and tokens).
fn same_as_safetensors(arch: &str, gguf_model: &Gemma4, st: &Gemma4, name: &str) {
    let cases: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join(arch).join("cases.json")).unwrap(),
    )
    .unwrap();
    let expected = candle_core::safetensors::load(
        root().join(arch).join("expected.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let c = cases["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap();
    let (ids, _) = ids_of(c, 0);
    // The tokenizer rebuilt from the GGUF metadata encodes the rendered prompt as the
    // checkpoint's tokenizer does.
    let text = c["prompt_text"]
        .as_str()
        .map(String::from)
        .or_else(|| c["prompt_text"][0].as_str().map(String::from))
        .unwrap();
    let t = &c["tensors"];
    let get = |k: &str| t[k].as_str().map(|n| expected[n].clone());
    let soft = SoftTokens {
        images: get("image_soft_tokens").into_iter().collect(),
        videos: vec![],
        audios: get("audio_soft_tokens").into_iter().collect(),
    };
    let mut media = Vec::new();
    for i in &soft.images {
        media.push(MediaItem::Image {
            tokens: i.dim(0).unwrap(),
        });
    }
    for a in &soft.audios {
        media.push(MediaItem::Audio {
            tokens: a.dim(0).unwrap(),
        });
    }
    let tok = gguf_model.tokenizer.as_ref().unwrap();
    let text = tok.expand_media(&text, &media).unwrap();
    assert_eq!(tok.encode(&text).unwrap(), ids, "{arch} {name}: prompt ids");
    assert_eq!(
        st.tokenizer.as_ref().unwrap().encode(&text).unwrap(),
        ids,
        "{arch} {name}: safetensors prompt ids"
    );
    let logits = |m: &Gemma4| {
        let pe = embed_prompt(&m.text, &ids, &soft, &m.placeholders()).unwrap();
        let mut cache = m.text.new_cache();
        let mut segs = [Segment {
            cache: &mut cache,
            len: ids.len(),
            logits: LogitRows::All,
            block_ids: Some(pe.block_ids.clone()),
        }];
        m.text
            .forward(&pe.embeds, pe.ple.as_ref(), &mut segs)
            .unwrap()
            .remove(0)
    };
    let d = max_diff(&logits(gguf_model), &logits(st));
    assert!(d <= 1e-5, "{arch} {name}: logits differ by {d}");
    let want: Vec<u32> = expected[t["generated"].as_str().unwrap()]
        .get(0)
        .unwrap()
        .to_vec1::<i64>()
        .unwrap()
        .into_iter()
        .map(|x| x as u32)
        .collect();
    let gen = |m: &Gemma4| {
        let mut opts = m.generate_options(5);
        opts.stop_ids.clear();
        let req = Request {
            input_ids: ids.clone(),
            soft: soft.clone(),
            max_new_tokens: want.len(),
            sampling: Sampling::default(),
        };
        generate_batch(&m.text, &opts, &[req], &mut |_, _| {})
            .unwrap()
            .remove(0)
            .output_ids
    };
    assert_eq!(gen(gguf_model), gen(st), "{arch} {name}: greedy tokens");
    assert_eq!(gen(gguf_model), want, "{arch} {name}: reference tokens");
}

#[test]
fn gguf_f32_gives_the_safetensors_ids_logits_and_tokens() {
    with_cache("f32", |_| {
        for arch in ["gemma4", "gemma4_unified"] {
            let g = load(gguf(&format!("{arch}-f32.gguf")).to_str().unwrap(), None);
            let opts = LoadOptions::default();
            let st = Gemma4::load_dir(&root().join(arch).join("model"), &opts).unwrap();
            assert_eq!(g.config.arch, st.config.arch, "{arch}: architecture");
            assert_eq!(
                g.config.text_config.layer_specs().unwrap(),
                st.config.text_config.layer_specs().unwrap(),
                "{arch}: per-layer shapes from the metadata"
            );
            assert_eq!(g.stop_ids, st.stop_ids, "{arch}: stop ids");
            for name in ["text", "image", "audio", "image_audio"] {
                same_as_safetensors(arch, &g, &st, name);
            }
            // The chat template comes from the metadata: the same rendered prompt.
            use percept::model::tokenizer::{ChatContent, ChatMessage};
            let msgs = [ChatMessage::user(vec![ChatContent::Text(
                "Hi there".into(),
            )])];
            assert_eq!(
                g.tokenizer
                    .as_ref()
                    .unwrap()
                    .render_chat(&msgs, true, false)
                    .unwrap(),
                st.tokenizer
                    .as_ref()
                    .unwrap()
                    .render_chat(&msgs, true, false)
                    .unwrap()
            );
        }
    });
}

#[test]
fn gguf_q8_0_blocks_are_percepts_own_and_run_in_place() {
    with_cache("q8", |_| {
        for arch in ["gemma4", "gemma4_unified"] {
            let path = gguf(&format!("{arch}-q8_0.gguf"));
            let f = GgufFile::open(&path).unwrap();
            let st = Weights::open(
                &[root().join(arch).join("model/model.safetensors")],
                &Device::Cpu,
                DType::F32,
            )
            .unwrap();
            let mut compared = 0;
            for t in f.tensors.iter().filter(|t| t.type_name() == "Q8_0") {
                let hf = gguf_model::checkpoint_name(&t.name).unwrap();
                let w = st.get_dtype(&hf, &t.shape, DType::F32).unwrap();
                let q = percept::model::layers::quantize(&w, GgmlDType::Q8_0).unwrap();
                assert!(
                    q.data().unwrap().as_ref() == f.bytes(t),
                    "{arch}: {} differs from percept's q8_0 blocks",
                    t.name
                );
                compared += 1;
            }
            assert!(compared >= 40, "{arch}: only {compared} Q8_0 tensors");
            // It loads with the blocks in place and answers.
            let g = load(path.to_str().unwrap(), None);
            assert_eq!(g.text.decoder_linear_storage(0), Some("q8_0"));
            let tok = g.tokenizer.as_ref().unwrap();
            let ids = tok.encode("<bos>hello").unwrap();
            let out = g
                .generate(
                    &[Request {
                        input_ids: ids,
                        soft: SoftTokens::default(),
                        max_new_tokens: 6,
                        sampling: Sampling::default(),
                    }],
                    16,
                    &mut |_, _| {},
                )
                .unwrap();
            assert!(!out[0].output_ids.is_empty());
            assert!(out[0].output_ids.iter().all(|&t| (t as usize) < 256));
        }
    });
}

/// Rewrites a GGUF with `edit` applied to its metadata and tensor table (data unchanged).
fn rewrite(src: &Path, dst: &Path, edit: impl Fn(&mut Vec<(String, Value)>, &mut Vec<OutTensor>)) {
    let f = GgufFile::open(src).unwrap();
    let mut meta: Vec<(String, Value)> = f
        .metadata
        .iter()
        .filter(|(k, _)| k.as_str() != "general.alignment")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let mut tensors: Vec<OutTensor> = f
        .tensors
        .iter()
        .map(|t| OutTensor {
            name: t.name.clone(),
            type_id: t.type_id,
            shape: t.shape.clone(),
            nbytes: t.nbytes,
        })
        .collect();
    edit(&mut meta, &mut tensors);
    write_gguf(dst, &meta, &tensors, |i, w| {
        let t = &f.tensors[i];
        let want = tensors[i].nbytes;
        let b = f.bytes(t);
        let mut v = b[..want.min(b.len())].to_vec();
        v.resize(want, 0);
        w.write_all(&v)
            .map_err(|source| percept::model::LoadError::Io {
                path: dst.to_path_buf(),
                source,
            })
    })
    .unwrap();
}

fn run_model(args: &[&str], cache: &Path) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_percept"))
        .args(args)
        .env("XDG_CACHE_HOME", cache)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn gguf_errors_are_one_line_and_name_the_problem() {
    let d = scratch("errors");
    let f32 = gguf("gemma4-f32.gguf");
    // Another architecture.
    let llama = d.join("llama.gguf");
    rewrite(&f32, &llama, |m, _| {
        for (k, v) in m.iter_mut() {
            if k == "general.architecture" {
                *v = Value::Str("llama".into());
            }
        }
    });
    // An unsupported tensor type (IQ4_NL: blocks of 32 in 18 bytes).
    let iq = d.join("iq.gguf");
    rewrite(&f32, &iq, |_, t| {
        let q = t
            .iter_mut()
            .find(|t| t.name == "blk.0.attn_q.weight")
            .unwrap();
        q.type_id = 20;
        q.nbytes = q.shape.iter().product::<usize>() / 32 * 18;
    });
    let cases: [(&str, Vec<String>, &str); 4] = [
        (
            "architecture",
            vec!["model".into(), "info".into(), llama.display().to_string()],
            "architecture \"llama\"",
        ),
        (
            "tensor type",
            vec![
                "model".into(),
                "run".into(),
                "--model".into(),
                iq.display().to_string(),
                "--prompt".into(),
                "hi".into(),
            ],
            "blk.0.attn_q.weight has type IQ4_NL",
        ),
        (
            "projector as model",
            vec![
                "model".into(),
                "info".into(),
                gguf("mmproj-gemma4-f32.gguf").display().to_string(),
            ],
            "projector (mmproj)",
        ),
        (
            "image without projector",
            vec![
                "model".into(),
                "run".into(),
                "--model".into(),
                llama_free_copy(&d),
                "--image".into(),
                root().join("gemma4/resized_70.png").display().to_string(),
                "--prompt".into(),
                "hi".into(),
            ],
            "projector",
        ),
    ];
    for (what, args, needle) in cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (ok, _, err) = run_model(&args, &d);
        assert!(!ok, "{what}: succeeded");
        let lines: Vec<&str> = err.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "{what}: not one line: {err}");
        assert!(err.contains(needle), "{what}: {err}");
    }
    let _ = std::fs::remove_dir_all(&d);
}

/// The text GGUF alone in a folder (no projector beside it).
fn llama_free_copy(d: &Path) -> String {
    let dir = d.join("alone");
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join("gemma4-f32.gguf");
    std::fs::copy(gguf("gemma4-f32.gguf"), &p).unwrap();
    p.display().to_string()
}

#[test]
fn lm_studio_folder_and_ollama_store_resolve_to_the_gguf_files() {
    with_cache("ways", |d| {
        // LM Studio: <models>/<publisher>/<repo>/*.gguf with mmproj-*.gguf.
        let repo = d.join("lmstudio/lmstudio-community/gemma-4-tiny-GGUF");
        std::fs::create_dir_all(&repo).unwrap();
        std::fs::copy(
            gguf("gemma4-q8_0.gguf"),
            repo.join("gemma-4-tiny-Q8_0.gguf"),
        )
        .unwrap();
        std::fs::copy(
            gguf("mmproj-gemma4-f32.gguf"),
            repo.join("mmproj-gemma-4-tiny-F32.gguf"),
        )
        .unwrap();
        let files = ModelFiles::resolve(repo.to_str().unwrap()).unwrap();
        assert_eq!(
            files.weights,
            vec![
                repo.join("gemma-4-tiny-Q8_0.gguf"),
                repo.join("mmproj-gemma-4-tiny-F32.gguf")
            ]
        );
        // A file path finds the projector beside it.
        let files =
            ModelFiles::resolve(repo.join("gemma-4-tiny-Q8_0.gguf").to_str().unwrap()).unwrap();
        assert_eq!(files.weights.len(), 2);
        let m = Gemma4::load_files(files, &LoadOptions::default()).unwrap();
        assert_eq!(m.text.decoder_linear_storage(0), Some("q8_0"));

        // Ollama: manifests name the model and projector blobs by digest.
        let store = d.join("ollama");
        let blobs = store.join("blobs");
        std::fs::create_dir_all(&blobs).unwrap();
        let model_hex = "a".repeat(64);
        let proj_hex = "b".repeat(64);
        std::fs::copy(
            gguf("gemma4-f32.gguf"),
            blobs.join(format!("sha256-{model_hex}")),
        )
        .unwrap();
        std::fs::copy(
            gguf("mmproj-gemma4-f32.gguf"),
            blobs.join(format!("sha256-{proj_hex}")),
        )
        .unwrap();
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": {"mediaType": "application/vnd.docker.container.image.v1+json",
                       "digest": format!("sha256:{}", "c".repeat(64)), "size": 10},
            "layers": [
                {"mediaType": "application/vnd.ollama.image.model",
                 "digest": format!("sha256:{model_hex}"), "size": 1},
                {"mediaType": "application/vnd.ollama.image.projector",
                 "digest": format!("sha256:{proj_hex}"), "size": 1},
                {"mediaType": "application/vnd.ollama.image.template",
                 "digest": format!("sha256:{}", "d".repeat(64)), "size": 1}
            ]
        });
        let mdir = store.join("manifests/registry.ollama.ai/library/gemma4tiny");
        std::fs::create_dir_all(&mdir).unwrap();
        std::fs::write(mdir.join("e2b"), manifest.to_string()).unwrap();
        std::env::set_var("OLLAMA_MODELS", &store);
        let files = ModelFiles::resolve("ollama:gemma4tiny:e2b").unwrap();
        assert_eq!(
            files.weights,
            vec![
                blobs.join(format!("sha256-{model_hex}")),
                blobs.join(format!("sha256-{proj_hex}"))
            ]
        );
        let m = Gemma4::load_files(files, &LoadOptions::default()).unwrap();
        assert_eq!(m.config.text_config.num_hidden_layers, 6);
        // Unknown tag: one line naming the store.
        let e = ModelFiles::resolve("ollama:gemma4tiny")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not in the Ollama store"), "{e}");
        // A blob in Ollama's own layout, not llama.cpp's GGUF.
        std::fs::write(blobs.join(format!("sha256-{model_hex}")), b"not a gguf").unwrap();
        let e = ModelFiles::resolve("ollama:gemma4tiny:e2b")
            .unwrap_err()
            .to_string();
        assert!(e.contains("not a GGUF file in llama.cpp's layout"), "{e}");
        assert_eq!(e.lines().count(), 1);
        std::env::remove_var("OLLAMA_MODELS");
    });
}

#[test]
fn model_info_reports_gguf_format_and_tensor_types() {
    let d = scratch("info");
    let (ok, out, err) = run_model(
        &[
            "model",
            "info",
            gguf("gemma4-q8_0.gguf").to_str().unwrap(),
            "--json",
        ],
        &d,
    );
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["format"], "gguf");
    assert_eq!(v["architecture"]["layers"], 6);
    let files = v["gguf"].as_array().unwrap();
    assert!(files[0]["tensor_types"]["Q8_0"].as_u64().unwrap() > 40);
    assert!(files[0]["tensor_types"]["F32"].as_u64().unwrap() > 10);
    let (ok, out, err) = run_model(
        &["model", "info", gguf("gemma4-q8_0.gguf").to_str().unwrap()],
        &d,
    );
    assert!(ok, "{err}");
    assert!(out.contains("format: gguf"), "{out}");
    assert!(out.contains("Q8_0"), "{out}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn quant_cache_is_written_once_and_loads_the_same_model() {
    use percept::model::quant_cache::{self, CacheUse};
    use percept::model::testing::{write_tiny_checkpoint, TinySpec};
    use percept::model::{layers::KeepF16, Quant};
    with_cache("qcache", |d| {
        // Rows of 256 so that Q4K applies to the decoder linears and the PLE table.
        let spec = TinySpec {
            hidden: 256,
            intermediate: 256,
            ple_dim: 128,
            ..TinySpec::default()
        };
        let dir = d.join("ckpt");
        write_tiny_checkpoint(&dir, &spec).unwrap();
        let ids: Vec<u32> = vec![2, 105, 40, 41, 42, 43, 106, 107];
        for quant in [Quant::Q4K, Quant::Q8_0] {
            let opts = LoadOptions {
                quant,
                ..LoadOptions::default()
            };
            let run = |m: &Gemma4| {
                let logits = m.prompt_logits(&ids, &SoftTokens::default()).unwrap();
                let mut o = m.generate_options(4);
                o.stop_ids.clear();
                let req = Request {
                    input_ids: ids.clone(),
                    soft: SoftTokens::default(),
                    max_new_tokens: 6,
                    sampling: Sampling::default(),
                };
                let toks = generate_batch(&m.text, &o, &[req], &mut |_, _| {}).unwrap();
                (logits, toks[0].output_ids.clone())
            };
            std::env::set_var(quant_cache::ENV, "off");
            let quantizing = Gemma4::load_dir(&dir, &opts).unwrap();
            let files = ModelFiles::from_dir(&dir).unwrap();
            assert_eq!(
                quant_cache::prepare(&files, quant, KeepF16::None).unwrap(),
                CacheUse::None
            );
            // The tiny checkpoint is below the size the cache starts at; `always` caches it.
            std::env::set_var(quant_cache::ENV, "always");
            let path = quant_cache::path_for(&files, quant, KeepF16::None).unwrap();
            assert!(path.starts_with(d.join("percept/quant")), "{path:?}");
            assert!(!path.exists());
            let first = Gemma4::load_dir(&dir, &opts).unwrap();
            assert!(path.is_file(), "no cache file after the first load");
            let written = std::fs::metadata(&path).unwrap().modified().unwrap();
            assert_eq!(
                quant_cache::prepare(&files, quant, KeepF16::None).unwrap(),
                CacheUse::Hit(path.clone())
            );
            let second = Gemma4::load_dir(&dir, &opts).unwrap();
            assert_eq!(
                std::fs::metadata(&path).unwrap().modified().unwrap(),
                written,
                "the cache was rewritten"
            );
            // The cache holds the quantizing load's blocks: the same storage and answers.
            let f = GgufFile::open(&path).unwrap();
            let want = if quant == Quant::Q4K { "Q4_K" } else { "Q8_0" };
            assert!(f.type_counts()[want] >= 20, "{:?}", f.type_counts());
            assert_eq!(
                second.text.decoder_linear_storage(0),
                quantizing.text.decoder_linear_storage(0)
            );
            assert_eq!(second.text.table_storage(), quantizing.text.table_storage());
            let (lq, tq) = run(&quantizing);
            let (l1, t1) = run(&first);
            let (l2, t2) = run(&second);
            assert_eq!(t1, tq, "{quant:?}: greedy tokens from the cache");
            assert_eq!(t2, tq, "{quant:?}: greedy tokens from the cache");
            let scale = lq
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            // Q4K runs the same kernel on the same blocks; Q8_0 from a mapping skips candle's
            // repacked tiles (another summation order).
            if quant == Quant::Q4K {
                assert_eq!(max_diff(&l1, &lq), 0.0);
                assert_eq!(max_diff(&l2, &lq), 0.0);
            } else {
                // Q8_0 from a mapping takes percept's own kernel (activations rounded to
                // Q8_0 per block) instead of candle's repacked tiles, so logits differ in
                // rounding; the blocks themselves are the quantizing load's, bit for bit.
                let st = Weights::open(&[dir.join("model.safetensors")], &Device::Cpu, DType::F32)
                    .unwrap();
                let mut n = 0;
                for t in f.tensors.iter().filter(|t| t.type_name() == "Q8_0") {
                    let w = st.get_dtype(&t.name, &t.shape, DType::F32).unwrap();
                    let q = percept::model::layers::quantize(&w, GgmlDType::Q8_0).unwrap();
                    assert!(q.data().unwrap().as_ref() == f.bytes(t), "{}", t.name);
                    n += 1;
                }
                assert!(n >= 20);
                assert!(max_diff(&l1, &lq) <= 0.1 * scale);
                assert_eq!(max_diff(&l2, &l1), 0.0);
            }
        }
        std::env::remove_var(quant_cache::ENV);
        // `model info` shows the cache state per quant.
        let out = Command::new(env!("CARGO_BIN_EXE_percept"))
            .args(["model", "info", dir.to_str().unwrap(), "--json"])
            .env("XDG_CACHE_HOME", d)
            .output()
            .unwrap();
        assert!(out.status.success());
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["format"], "safetensors");
        let entries = v["quant_cache"]["entries"].as_array().unwrap();
        let cached = |q: &str, k: &str| {
            entries
                .iter()
                .find(|e| e["quant"] == q && e["keep_f16"] == k)
                .unwrap()["bytes"]
                .as_u64()
        };
        assert!(cached("q4k", "none").unwrap() > 0);
        assert!(cached("q8_0", "none").unwrap() > 0);
        assert_eq!(cached("q4k", "projections"), None);
    });
}

#[test]
fn gguf_projector_gives_the_checkpoints_towers() {
    use percept::model::media::TowerEncoder;
    use percept::model::multimodal::MediaEncoder;
    with_cache("mmproj", |_| {
        for arch in ["gemma4", "gemma4_unified"] {
            let proj = gguf(&format!("mmproj-{arch}-f32.gguf"));
            let g = load(
                gguf(&format!("{arch}-f32.gguf")).to_str().unwrap(),
                Some(&proj),
            );
            let st = Gemma4::load_dir(&root().join(arch).join("model"), &LoadOptions::default())
                .unwrap();
            // The tower settings rebuilt from the projector's metadata and tensor shapes.
            let js = |v: &dyn ToJson| v.json();
            assert_eq!(
                js(&g.config.vision_config),
                js(&st.config.vision_config),
                "{arch}"
            );
            assert_eq!(
                js(&g.config.audio_config),
                js(&st.config.audio_config),
                "{arch}"
            );
            assert_eq!(g.config.unified_vision, st.config.unified_vision, "{arch}");
            assert_eq!(g.config.unified_audio, st.config.unified_audio, "{arch}");
            // One encoder per model: an encoder keeps the towers it loaded first.
            let (eg, es) = (TowerEncoder::new(70), TowerEncoder::new(70));
            let inputs = root().join(arch).join("inputs");
            let (a, b) = (
                eg.encode_image(&g, &inputs.join("image.png")).unwrap(),
                es.encode_image(&st, &inputs.join("image.png")).unwrap(),
            );
            let scale = b
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let d = max_diff(&a, &b);
            eprintln!("{arch}: image soft tokens differ by {d} (scale {scale})");
            assert!(
                d <= 1e-5 * scale.max(1.0),
                "{arch}: image soft tokens differ by {d}"
            );
            let (a, b) = (
                eg.encode_audio(&g, &inputs.join("audio.wav")).unwrap(),
                es.encode_audio(&st, &inputs.join("audio.wav")).unwrap(),
            );
            assert_eq!(a.len(), b.len());
            for (x, y) in a.iter().zip(&b) {
                let scale = y
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                let d = max_diff(x, y);
                eprintln!("{arch}: audio soft tokens differ by {d} (scale {scale})");
                // per_dim_scale is stored through softplus and inverted in f64.
                assert!(
                    d <= 1e-5 * scale.max(1.0),
                    "{arch}: audio soft tokens differ by {d}"
                );
            }
            // The q8_0 projector runs too (blocks in place where the converter did not
            // reorder them), close to the f32 towers.
            let q = load(
                gguf(&format!("{arch}-q8_0.gguf")).to_str().unwrap(),
                Some(&gguf(&format!("mmproj-{arch}-q8_0.gguf"))),
            );
            let a = TowerEncoder::new(70)
                .encode_image(&q, &inputs.join("image.png"))
                .unwrap();
            let b = es.encode_image(&st, &inputs.join("image.png")).unwrap();
            assert_eq!(a.dims(), b.dims());
            let scale = b
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let d = max_diff(&a, &b);
            eprintln!("{arch}: q8_0 image soft tokens differ by {d} (scale {scale})");
            assert!(
                d <= 0.1 * scale,
                "{arch}: q8_0 image soft tokens differ by {d}"
            );
        }
    });
}

/// Config structs compared through their JSON form.
trait ToJson {
    fn json(&self) -> serde_json::Value;
}

impl<T: serde::Serialize> ToJson for T {
    fn json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap()
    }
}

/// Load times of the quantized cache on a mid-size random checkpoint (run by hand:
/// `cargo test --test model_gguf cache_load_times -- --ignored --nocapture`):
/// cold (quantizing + writing the cache), warm (cache in the page cache), cold cache
/// (evicted with posix_fadvise DONTNEED) and `cat file > /dev/null` of the same file.
#[test]
#[ignore]
fn cache_load_times() {
    use percept::model::quant_cache;
    use percept::model::testing::{write_tiny_checkpoint, TinySpec};
    use percept::model::Quant;
    use std::time::Instant;
    fn evict(p: &Path) {
        use std::os::unix::io::AsRawFd;
        let f = std::fs::File::open(p).unwrap();
        // SAFETY: a valid open descriptor; advice only.
        #[allow(unsafe_code)]
        unsafe {
            libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
        }
    }
    with_cache("times", |d| {
        let spec = TinySpec {
            hidden: 1024,
            intermediate: 4096,
            heads: 8,
            head_dim: 128,
            global_head_dim: 256,
            ple_dim: 256,
            ..TinySpec::default()
        };
        let dir = d.join("ckpt");
        write_tiny_checkpoint(&dir, &spec).unwrap();
        std::env::set_var(quant_cache::ENV, "always");
        let files = ModelFiles::from_dir(&dir).unwrap();
        for quant in [Quant::Q4K, Quant::Q8_0] {
            let opts = LoadOptions {
                quant,
                ..LoadOptions::default()
            };
            let path = quant_cache::path_for(&files, quant, Default::default()).unwrap();
            let t = Instant::now();
            drop(Gemma4::load_dir(&dir, &opts).unwrap());
            let cold = t.elapsed().as_secs_f64();
            let t = Instant::now();
            drop(Gemma4::load_dir(&dir, &opts).unwrap());
            let warm = t.elapsed().as_secs_f64();
            evict(&path);
            let t = Instant::now();
            let m = Gemma4::load_dir(&dir, &opts).unwrap();
            // Touch every weight byte as a first forward would: one prompt.
            let _ = m
                .prompt_logits(&[2, 40, 41], &SoftTokens::default())
                .unwrap();
            let cold_cache = t.elapsed().as_secs_f64();
            drop(m);
            evict(&path);
            let t = Instant::now();
            let st = Command::new("sh")
                .arg("-c")
                .arg(format!("cat '{}' > /dev/null", path.display()))
                .status()
                .unwrap();
            assert!(st.success());
            let cat = t.elapsed().as_secs_f64();
            let mib = std::fs::metadata(&path).unwrap().len() as f64 / (1u64 << 20) as f64;
            let ckpt = std::fs::metadata(dir.join("model.safetensors"))
                .unwrap()
                .len() as f64
                / (1u64 << 20) as f64;
            eprintln!(
                "{:5} checkpoint {ckpt:.0} MiB, cache {mib:.0} MiB: cold (quantize+write) {cold:.2} s, warm {warm:.3} s, cold cache + first forward {cold_cache:.3} s, cat {cat:.3} s",
                quant.as_str()
            );
        }
        std::env::remove_var(quant_cache::ENV);
    });
}

/// Relative RMS difference `|a - b| / |b|` of two same-shaped tensors.
fn rel_rms(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f64 {
    let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let num: f64 = a
        .iter()
        .zip(&b)
        .map(|(x, y)| ((x - y) as f64).powi(2))
        .sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

/// llama.cpp's own K-quant files: `gemma4-wide-{Q4_0,Q4_K_M,Q5_K_M}.gguf`, made by
/// `llama-quantize` from the BF16 `gemma4-wide-bf16.gguf` (rows of 256, so the K-quants
/// apply; see make_gguf_fixtures.py --wide). Each loads with its blocks in place, `model
/// info` reports the tensor types the file holds, every block tensor dequantizes to the
/// BF16 weights within its format's error (percept's own quantizer of the same weights to
/// the same type as the yardstick), and the model answers close to the BF16 model.
#[test]
fn llama_quantize_k_quant_files_load_and_run_near_the_bf16_model() {
    with_cache("kquant", |d| {
        let bf16 = gguf("gemma4-wide-bf16.gguf");
        let wb = Weights::open(std::slice::from_ref(&bf16), &Device::Cpu, DType::F32).unwrap();
        let base = load(bf16.to_str().unwrap(), None);
        let tok = base.tokenizer.as_ref().unwrap();
        let ids = tok.encode("<bos>hello world").unwrap();
        let gen = |g: &Gemma4| {
            g.generate(
                &[Request {
                    input_ids: ids.clone(),
                    soft: SoftTokens::default(),
                    max_new_tokens: 8,
                    sampling: Sampling::default(),
                }],
                32,
                &mut |_, _| {},
            )
            .unwrap()[0]
                .output_ids
                .clone()
        };
        let base_tokens = gen(&base);
        let base_logits = base.prompt_logits(&ids, &SoftTokens::default()).unwrap();
        for (file, types) in [
            ("gemma4-wide-Q4_0.gguf", &["Q4_0", "Q6_K"][..]),
            ("gemma4-wide-Q4_K_M.gguf", &["Q4_K", "Q6_K"][..]),
            ("gemma4-wide-Q5_K_M.gguf", &["Q5_K", "Q6_K"][..]),
        ] {
            let path = gguf(file);
            let f = GgufFile::open(&path).unwrap();
            let counts = f.type_counts();
            for t in types {
                assert!(
                    counts.get(*t).copied().unwrap_or(0) > 0,
                    "{file}: no {t} in {counts:?}"
                );
            }
            // `model info` reports the file's own tensor types.
            let (ok, out, err) = run_model(&["model", "info", path.to_str().unwrap(), "--json"], d);
            assert!(ok, "{err}");
            let v: serde_json::Value = serde_json::from_str(&out).unwrap();
            let reported: std::collections::BTreeMap<String, usize> =
                serde_json::from_value(v["gguf"][0]["tensor_types"].clone()).unwrap();
            assert_eq!(reported, counts, "{file}");
            // Every block tensor against the BF16 weights, beside percept's own quantizer.
            let wq = Weights::open(std::slice::from_ref(&path), &Device::Cpu, DType::F32).unwrap();
            let mut compared = 0;
            for t in f
                .tensors
                .iter()
                .filter(|t| types.contains(&t.type_name().as_str()))
            {
                let hf = gguf_model::checkpoint_name(&t.name).unwrap();
                let shape = wq.shape_of(&hf).unwrap();
                let want = wb.get(&hf, &shape).unwrap();
                let got = wq.get(&hf, &shape).unwrap();
                let g = percept::model::gguf::candle_type(t.type_id).unwrap();
                let q = percept::model::layers::quantize(&want, g).unwrap();
                if g == GgmlDType::Q4_0 {
                    // ggml's Q4_0 rounding is deterministic, as Q8_0's is.
                    assert!(
                        q.data().unwrap().as_ref() == f.bytes(t),
                        "{file}: {} differs from percept's q4_0 blocks",
                        t.name
                    );
                }
                let ours = q.dequantize(&Device::Cpu).unwrap();
                let (e, e_ours) = (rel_rms(&got, &want), rel_rms(&ours, &want));
                eprintln!(
                    "{file}: {} {}: {e:.4} (percept's {e_ours:.4})",
                    t.name,
                    t.type_name()
                );
                // Measured: Q4_0 0.086, Q4_K 0.071, Q5_K 0.036, Q6_K 0.018 (llama-quantize's
                // K-quant search does a little better than percept's quantizer).
                let bound = match t.type_name().as_str() {
                    "Q4_0" => 0.1,
                    "Q4_K" => 0.085,
                    "Q5_K" => 0.045,
                    _ => 0.022,
                };
                assert!(e < bound, "{file}: {} off by {e}", t.name);
                assert!(
                    e <= 1.02 * e_ours,
                    "{file}: {} off by {e} (percept's quantizer {e_ours})",
                    t.name
                );
                compared += 1;
            }
            assert!(compared >= 10, "{file}: {compared}");
            // It runs with the blocks in place, near the BF16 model: prompt logits within the
            // quantization noise (measured 0.067 / 0.061 / 0.041), the same greedy tokens.
            let g = load(path.to_str().unwrap(), None);
            let storage = g.text.decoder_linear_storage(0).unwrap();
            assert_eq!(
                storage,
                types[0].to_lowercase().replace("_k", "k"),
                "{file}"
            );
            let logits = g.prompt_logits(&ids, &SoftTokens::default()).unwrap();
            let e = rel_rms(&logits, &base_logits);
            let tokens = gen(&g);
            eprintln!("{file}: storage {storage}, logits rel rms {e:.4}, tokens {tokens:?} vs bf16 {base_tokens:?}");
            assert!(
                e < if file.contains("Q5") { 0.06 } else { 0.1 },
                "{file}: logits off by {e}"
            );
            assert_eq!(tokens, base_tokens, "{file}");
        }
    });
}

/// The 12B's patch projection stored in blocks (a projector quantized whole:
/// `v.patch_embd.weight` as Q8_0 or Q4_K, its columns in the converter's CHW order; this
/// converter keeps it F32, others and `llama-quantize --pure` need not): dequantized and
/// reordered at load, so the vision embedder gives the F32 projector's soft tokens within the
/// quantization noise.
#[test]
fn unified_projector_with_a_block_quantized_patch_projection_embeds_images() {
    use percept::model::media::TowerEncoder;
    use percept::model::multimodal::MediaEncoder;
    with_cache("patchq", |d| {
        let src = gguf("mmproj-gemma4_unified-f32.gguf");
        let text = gguf("gemma4_unified-f32.gguf");
        let f = GgufFile::open(&src).unwrap();
        let image = root().join("gemma4_unified/inputs/image.png");
        let base = load(text.to_str().unwrap(), Some(&src));
        let want = TowerEncoder::new(70).encode_image(&base, &image).unwrap();
        let scale = want
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let name = "v.patch_embd.weight";
        let dense = f
            .dense(f.get(name).unwrap(), &Device::Cpu, DType::F32)
            .unwrap();
        for (g, tol) in [(GgmlDType::Q8_0, 0.02), (GgmlDType::Q4K, 0.15)] {
            let blocks = percept::model::layers::quantize(&dense, g)
                .unwrap()
                .data()
                .unwrap()
                .to_vec();
            let dst = d.join(format!("mmproj-patch-{g:?}.gguf"));
            let type_id = percept::model::gguf::type_id(g).unwrap();
            let n = blocks.len();
            rewrite(&src, &dst, |_, tensors| {
                let t = tensors.iter_mut().find(|t| t.name == name).unwrap();
                t.type_id = type_id;
                t.nbytes = n;
            });
            // `rewrite` copies the old bytes; put the blocks in place of them.
            let out = GgufFile::open(&dst).unwrap();
            let off = out.get(name).unwrap().offset;
            let mut bytes = std::fs::read(&dst).unwrap();
            bytes[off..off + n].copy_from_slice(&blocks);
            std::fs::write(&dst, &bytes).unwrap();
            assert_eq!(
                GgufFile::open(&dst).unwrap().get(name).unwrap().type_name(),
                percept::model::gguf::type_name(type_id)
            );
            let m = load(text.to_str().unwrap(), Some(&dst));
            let got = TowerEncoder::new(70).encode_image(&m, &image).unwrap();
            assert_eq!(got.dims(), want.dims());
            let diff = max_diff(&got, &want);
            eprintln!("{g:?} patch projection: image soft tokens differ by {diff} (scale {scale})");
            assert!(diff > 0.0, "{g:?}: the blocks were not read");
            assert!(
                diff <= tol * scale,
                "{g:?}: image soft tokens differ by {diff}"
            );
        }
    });
}
