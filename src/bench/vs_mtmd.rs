//! The vision row of `percept bench vs-llamacpp`: one frame encoded by llama.cpp's `mtmd`
//! (`llama-mtmd-cli`) and by percept's vision tower, on the same projector file.
//!
//! The projector is written with random weights at the real tower shape in the converter's
//! `gemma4v` layout ([`super::random_mmproj`]); the frame is a picture file or a synthetic
//! 1280x720 PNG. For each image budget (soft tokens: 70, 140, 280, 560, 1120):
//! - llama.cpp: `llama-mtmd-cli -m TEXT.gguf --mmproj MMPROJ --image FRAME -n 1
//!   --image-max-tokens B -lv 4`, timed by its own log line around the encode of the image
//!   (the tower's graph, after the resize): `mtmd batch encoding done in N ms` (its batch
//!   path, one image per batch here) or `image slice encoded in N ms` (`mtmd-helper`'s
//!   path); the soft tokens are the `n_tokens_batch` of its image batches (a line printed at
//!   verbosity 4). mtmd warms the tower up at load (its own 256-token image) before the
//!   timed encode. The random text GGUF has no chat template: `--chat-template gemma` wraps
//!   the prompt (text tokens only; the image encode does not see them).
//! - percept: this binary again (`--vision-child`), which builds the tower from the projector
//!   alone ([`crate::model::gguf_mmproj::vision_tower`]), preprocesses the frame at budget B,
//!   encodes it once untimed and then times one [`VisionTower::encode`] (the same span: after
//!   the resize, to the soft tokens after the multimodal embedder).
//!
//! Both resize to the same grid: llama.cpp's `calc_size_preserved_ratio` with
//! `max_pixels = B * 48²` and percept's (the reference's) `floor(sqrt(9B*256/(H*W)) * side
//! / 48) * 48` agree, e.g. 1280x720 at 70 -> 528x288 = 11 x 6 = 66 soft tokens; the
//! comparison checks the counts and fails when they differ.
//!
//! [`VisionTower::encode`]: crate::model::vision::VisionTower::encode

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use super::vs_llamacpp::{last_line, run_child, Side};

/// Budgets percept's preprocessing (and the reference) accepts.
pub use crate::model::preprocess::image::SUPPORTED_SOFT_TOKENS;

/// What one `llama-mtmd-cli` run printed about its image.
#[derive(Debug, Clone, PartialEq)]
pub struct MtmdEncode {
    /// `mtmd batch encoding done in N ms` / `image slice encoded in N ms`, in order.
    pub encode_ms: Vec<f64>,
    /// Sum of `n_tokens_batch` over the image batches.
    pub soft_tokens: usize,
}

/// Parses the log of `llama-mtmd-cli` (stdout and stderr together): the encode times of
/// the image slices and the soft tokens decoded for them.
pub fn parse_mtmd_output(s: &str) -> anyhow::Result<MtmdEncode> {
    let mut encode_ms = Vec::new();
    let mut soft_tokens = 0usize;
    for line in s.lines() {
        let timed = ["mtmd batch encoding done in ", "image slice encoded in "]
            .iter()
            .find_map(|k| line.split(k).nth(1));
        if let Some(rest) = timed {
            let ms = rest
                .trim()
                .strip_suffix("ms")
                .map(str::trim)
                .and_then(|v| v.parse::<f64>().ok())
                .ok_or_else(|| anyhow::anyhow!("llama-mtmd-cli: unreadable line {line:?}"))?;
            encode_ms.push(ms);
        } else if line.contains("decoding image batch") {
            let n = line
                .split("n_tokens_batch =")
                .nth(1)
                .and_then(|v| v.trim().parse::<usize>().ok())
                .ok_or_else(|| anyhow::anyhow!("llama-mtmd-cli: unreadable line {line:?}"))?;
            soft_tokens += n;
        }
    }
    if encode_ms.is_empty() {
        anyhow::bail!(
            "llama-mtmd-cli printed no \"mtmd batch encoding done in\" or \"image slice encoded in\" line (last: {:?})",
            last_line(s).unwrap_or("")
        );
    }
    Ok(MtmdEncode {
        encode_ms,
        soft_tokens,
    })
}

/// Where llama-mtmd-cli is looked for, in order.
pub struct MtmdSearch<'a> {
    /// `--llama-mtmd-cli`.
    pub flag: Option<&'a Path>,
    /// `PERCEPT_LLAMA_MTMD_CLI`.
    pub env: Option<OsString>,
    /// The folder of the llama-bench in use (both are built from one tree).
    pub beside: Option<&'a Path>,
    /// percept's llama.cpp build folder (`<cache>/llama.cpp/build`).
    pub cache_build: PathBuf,
    /// `--llama-src`: a tree to build it from.
    pub src: Option<&'a Path>,
}

/// Finds llama-mtmd-cli, or builds it into the cache from `--llama-src`. A miss is one line
/// naming every way to give one.
pub fn find_mtmd_cli(s: &MtmdSearch) -> anyhow::Result<PathBuf> {
    let check = |p: PathBuf, from: &str| -> anyhow::Result<PathBuf> {
        if p.is_file() {
            Ok(p)
        } else {
            anyhow::bail!("{from} {}: no such file", p.display())
        }
    };
    if let Some(p) = s.flag {
        return check(p.to_path_buf(), "--llama-mtmd-cli");
    }
    if let Some(p) = s.env.clone().filter(|p| !p.is_empty()) {
        return check(PathBuf::from(p), "PERCEPT_LLAMA_MTMD_CLI");
    }
    let name = "llama-mtmd-cli";
    if let Some(p) = s.beside.map(|d| d.join(name)).filter(|p| p.is_file()) {
        return Ok(p);
    }
    let bin = s.cache_build.join("bin").join(name);
    if bin.is_file() {
        return Ok(bin);
    }
    let Some(src) = s.src else {
        anyhow::bail!(
            "llama-mtmd-cli not found (for the vision row): give --llama-mtmd-cli PATH, set PERCEPT_LLAMA_MTMD_CLI, put it beside llama-bench, pass --llama-src DIR to build it into {}, or skip the row with --no-vision",
            s.cache_build.display()
        );
    };
    super::vs_llamacpp::cmake_build(src, &s.cache_build, name)?;
    check(bin, "built llama-mtmd-cli")
}

/// Parses `WIDTHxHEIGHT`.
pub fn parse_frame(s: &str) -> anyhow::Result<(u32, u32)> {
    let bad = || anyhow::anyhow!("--frame {s:?}: expected WIDTHxHEIGHT, e.g. 1280x720");
    let (w, h) = s.split_once(['x', 'X']).ok_or_else(bad)?;
    let (w, h): (u32, u32) = (
        w.trim().parse().map_err(|_| bad())?,
        h.trim().parse().map_err(|_| bad())?,
    );
    if w == 0 || h == 0 {
        return Err(bad());
    }
    Ok((w, h))
}

/// Writes a synthetic frame (gradients, edges and texture, so neither side meets a flat
/// image) as PNG.
pub fn write_frame(path: &Path, w: u32, h: u32) -> anyhow::Result<()> {
    let mut rng = crate::model::rng::SplitMix64(0xf7a3e);
    let img = image::RgbImage::from_fn(w, h, |x, y| {
        let n = (rng.next_u64() % 32) as u32;
        let band = if (x / 80 + y / 60) % 2 == 0 { 40 } else { 0 };
        image::Rgb([
            ((x * 255 / w.max(1)) + n).min(255) as u8,
            ((y * 255 / h.max(1)) + band).min(255) as u8,
            (((x + y) % 256) / 2 + n) as u8,
        ])
    });
    img.save_with_format(path, image::ImageFormat::Png)
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))
}

/// Everything the vision row needs for one arch.
#[derive(Debug, Clone)]
pub struct VisionRun {
    pub mtmd_cli: PathBuf,
    pub mmproj: PathBuf,
    pub frame: PathBuf,
    /// `WIDTHxHEIGHT` of the frame, for the table.
    pub frame_label: String,
    pub budgets: Vec<usize>,
}

/// One repetition of llama.cpp's side: one `llama-mtmd-cli` process per budget.
pub fn llama_round(side: &mut Side, v: &VisionRun, text_gguf: &Path, threads: usize) {
    for &b in &v.budgets {
        let mut cmd = Command::new(&v.mtmd_cli);
        cmd.arg("-m")
            .arg(text_gguf)
            .arg("--mmproj")
            .arg(&v.mmproj)
            .arg("--image")
            .arg(&v.frame)
            .args([
                "-p",
                "Describe this frame.",
                "-n",
                "1",
                "-c",
                "4096",
                "-lv",
                "4",
            ])
            .args(["--chat-template", "gemma"])
            .args(["-t", &threads.to_string()])
            .args(["--image-max-tokens", &b.to_string()]);
        let r = run_child(&mut cmd);
        let what = format!("llama-mtmd-cli (image encode @{b})");
        if let Some(f) = r.failure {
            return side.fail(&what, f);
        }
        match parse_mtmd_output(&format!("{}\n{}", r.stdout, r.stderr)) {
            Ok(e) => {
                let ms = e.encode_ms.iter().copied().fold(f64::INFINITY, f64::min);
                side.best_vision(b, ms, e.soft_tokens);
            }
            Err(e) => return side.fail(&what, e.to_string()),
        }
    }
}

/// One repetition of percept's side: one child process for every budget.
pub fn percept_round(side: &mut Side, cmd: &mut Command) {
    let r = run_child(cmd);
    let what = "percept (vision tower encode)";
    if let Some(f) = r.failure {
        return side.fail(what, f);
    }
    let v: serde_json::Value = match last_line(&r.stdout).map(serde_json::from_str) {
        Some(Ok(v)) => v,
        _ => {
            return side.fail(
                what,
                format!(
                    "no JSON result line in its output ({:?})",
                    last_line(&r.stdout)
                ),
            )
        }
    };
    for (k, ms) in v["encode_ms"].as_object().into_iter().flatten() {
        let tokens = v["soft_tokens"][k].as_u64().unwrap_or(0) as usize;
        if let (Ok(b), Some(ms)) = (k.parse(), ms.as_f64()) {
            side.best_vision(b, ms, tokens);
        }
    }
}

/// percept's side, in this process: the tower from the projector alone, its encoder linears
/// at percept's default `[model] vision_quant`, the frame at each budget, one untimed
/// encode, then one timed. One JSON line.
pub fn percept_side(
    mmproj: &Path,
    frame: &Path,
    budgets: &[usize],
) -> anyhow::Result<serde_json::Value> {
    use crate::model::preprocess::image;
    let t0 = Instant::now();
    let tower = crate::model::gguf_mmproj::vision_tower(
        mmproj,
        &candle_core::Device::Cpu,
        crate::model::Quant::F32,
        crate::config::ModelConfig::default().vision_quant,
    )?;
    let load_s = t0.elapsed().as_secs_f64();
    let img = image::load_rgb(frame).map_err(|e| anyhow::anyhow!("{}: {e}", frame.display()))?;
    let (mut encode, mut tokens, mut pre) = (
        serde_json::Map::new(),
        serde_json::Map::new(),
        serde_json::Map::new(),
    );
    for &b in budgets {
        let t = Instant::now();
        let input = image::preprocess(&img, b).map_err(|e| anyhow::anyhow!("frame at {b}: {e}"))?;
        pre.insert(b.to_string(), (t.elapsed().as_secs_f64() * 1e3).into());
        tower.encode(&input)?;
        let t = Instant::now();
        let soft = tower.encode(&input)?;
        encode.insert(b.to_string(), (t.elapsed().as_secs_f64() * 1e3).into());
        tokens.insert(b.to_string(), soft.dim(0)?.into());
    }
    Ok(serde_json::json!({
        "load_s": load_s,
        "encode_ms": encode,
        "soft_tokens": tokens,
        "preprocess_ms": pre,
    }))
}

/// The soft-token counts of both sides, where they differ: `(budget, llama.cpp, percept)`.
pub fn token_mismatches(llama: &Side, percept: &Side) -> Vec<(usize, usize, usize)> {
    let mut out = Vec::new();
    for (b, &l) in &llama.vision_tokens {
        if let Some(&p) = percept.vision_tokens.get(b) {
            if l != p {
                out.push((*b, l, p));
            }
        }
    }
    out
}

/// `budget -> value` as JSON with string keys.
pub fn keyed<T: Copy + Into<serde_json::Value>>(m: &BTreeMap<usize, T>) -> serde_json::Value {
    serde_json::Value::Object(
        m.iter()
            .map(|(k, v)| (k.to_string(), (*v).into()))
            .collect(),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Lines as llama-mtmd-cli (llama-cpp-python 0.3.36's vendored llama.cpp) printed them
    /// at `-lv 4` for the E2B-shaped files (abridged).
    const LOG: &str = "\
0.06.461.864 I clip_model_loader: model name:   percept random-weight benchmark
0.06.462.452 I load_hparams: image_min_pixels:   161280
0.06.462.452 I load_hparams: image_max_pixels:   161280 (custom value)
0.06.926.216 I get_dummy_batch: warmup with image size = 768 x 768
0.06.934.506 I warmup: flash attention is enabled
0.16.730.509 I encoding mtmd batch, n_chunks = 1 (done = 1, total = 3)
0.23.230.948 I mtmd batch encoding done in 6501 ms
0.23.233.666 I decoding image batch 1/1, n_tokens_batch = 66
0.29.226.140 I image decoded (batch 1/1) in 5992 ms
";

    #[test]
    fn mtmd_cli_output_parses() {
        let e = parse_mtmd_output(LOG).unwrap();
        assert_eq!(
            e,
            MtmdEncode {
                encode_ms: vec![6501.0],
                soft_tokens: 66
            }
        );
        // Two batches of one image add up; two slices give two times.
        let two = LOG.replace(
            "decoding image batch 1/1, n_tokens_batch = 66",
            "decoding image batch 1/2, n_tokens_batch = 40\ndecoding image batch 2/2, n_tokens_batch = 26\nimage slice encoded in 17 ms",
        );
        let e = parse_mtmd_output(&two).unwrap();
        assert_eq!((e.encode_ms, e.soft_tokens), (vec![6501.0, 17.0], 66));
        let err = parse_mtmd_output("main: error: failed to load model\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("no \"mtmd batch encoding done in\"")
                && err.contains("failed to load model"),
            "{err}"
        );
        assert!(parse_mtmd_output("image slice encoded in many ms").is_err());
    }

    #[test]
    fn a_missing_mtmd_cli_is_one_line_naming_every_way_to_give_one() {
        let dir = std::env::temp_dir().join(format!("percept-mtmd-find-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let search = |flag: Option<&'static Path>, env: Option<&str>| MtmdSearch {
            flag,
            env: env.map(OsString::from),
            beside: Some(Path::new("/nonexistent-llama-bin")),
            cache_build: dir.join("build"),
            src: None,
        };
        let e = find_mtmd_cli(&search(None, None)).unwrap_err().to_string();
        assert_eq!(e.lines().count(), 1, "{e}");
        for way in [
            "--llama-mtmd-cli",
            "PERCEPT_LLAMA_MTMD_CLI",
            "--llama-src",
            "--no-vision",
        ] {
            assert!(e.contains(way), "{e}");
        }
        let e = find_mtmd_cli(&search(Some(Path::new("/nonexistent/mtmd")), None))
            .unwrap_err()
            .to_string();
        assert_eq!(e, "--llama-mtmd-cli /nonexistent/mtmd: no such file");
        let e = find_mtmd_cli(&search(None, Some("/nonexistent/env-mtmd")))
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "PERCEPT_LLAMA_MTMD_CLI /nonexistent/env-mtmd: no such file"
        );
        // Beside llama-bench it is found without being named.
        std::fs::write(dir.join("llama-mtmd-cli"), "").unwrap();
        let found = find_mtmd_cli(&MtmdSearch {
            beside: Some(&dir),
            ..search(None, None)
        })
        .unwrap();
        assert_eq!(found, dir.join("llama-mtmd-cli"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn frame_sizes_parse_and_frames_are_written() {
        assert_eq!(parse_frame("1280x720").unwrap(), (1280, 720));
        assert!(parse_frame("1280").is_err() && parse_frame("0x720").is_err());
        let p = std::env::temp_dir().join(format!("percept-frame-{}.png", std::process::id()));
        write_frame(&p, 96, 54).unwrap();
        let img = crate::model::preprocess::image::load_rgb(&p).unwrap();
        assert_eq!((img.width, img.height), (96, 54));
        std::fs::remove_file(&p).unwrap();
    }
}
