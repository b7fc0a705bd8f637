//! What `percept model info` / `model run` say about a model's file format: safetensors or
//! GGUF (with each file's tensor types), and the quantized cache entries of a checkpoint
//! (`quant_cache.applies` is false for GGUF, whose blocks are used in place).

use anyhow::{bail, Context};

use super::loader::ModelFiles;

/// Whether the model's weights are GGUF files.
pub fn is_gguf(files: &ModelFiles) -> bool {
    !files.weights.is_empty() && files.weights.iter().all(|p| super::gguf::is_gguf_file(p))
}

/// The projector among a GGUF model's files, if any.
fn projector(files: &ModelFiles) -> Option<&std::path::Path> {
    files.weights.iter().skip(1).map(|p| p.as_path()).next()
}

/// Adds `format`, `gguf` (per file: tensor types, metadata) and `quant_cache` to `model info`'s
/// JSON.
pub fn add_format(out: &mut serde_json::Value, files: &ModelFiles) -> anyhow::Result<()> {
    let Some(obj) = out.as_object_mut() else {
        return Ok(());
    };
    if is_gguf(files) {
        obj.insert("format".into(), "gguf".into());
        obj.insert("gguf".into(), super::gguf_model::describe(&files.weights)?);
        obj.insert("projector".into(), serde_json::json!(projector(files)));
        // GGUF blocks are used in place: nothing is quantized, so nothing is cached.
        obj.insert(
            "quant_cache".into(),
            serde_json::json!({"dir": super::quant_cache::dir(),
                "enabled": super::quant_cache::enabled(), "applies": false,
                "why_not": "GGUF blocks are used in place from the file", "entries": []}),
        );
    } else {
        obj.insert("format".into(), "safetensors".into());
        obj.insert("safetensors".into(), safetensors_files(&files.weights)?);
        obj.insert("quant_cache".into(), super::quant_cache::describe(files));
    }
    Ok(())
}

/// Per safetensors file: path, tensor count, bytes and the count of tensors per dtype
/// (`BF16`, `F32`, ...), from the file's JSON header alone.
fn safetensors_files(paths: &[std::path::PathBuf]) -> anyhow::Result<serde_json::Value> {
    use std::io::Read;
    let mut out = Vec::new();
    for p in paths {
        let ctx = || format!("reading the safetensors header of {}", p.display());
        let mut f = std::fs::File::open(p).with_context(ctx)?;
        let mut len = [0u8; 8];
        f.read_exact(&mut len).with_context(ctx)?;
        let len = u64::from_le_bytes(len);
        anyhow::ensure!(
            len <= 100 << 20,
            "{}: safetensors header of {len} bytes",
            p.display()
        );
        let mut header = vec![0u8; len as usize];
        f.read_exact(&mut header).with_context(ctx)?;
        let header: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&header).with_context(ctx)?;
        let mut types = std::collections::BTreeMap::<String, usize>::new();
        let mut tensors = 0;
        for (name, t) in &header {
            if name == "__metadata__" {
                continue;
            }
            tensors += 1;
            *types
                .entry(t["dtype"].as_str().unwrap_or("?").to_string())
                .or_default() += 1;
        }
        out.push(serde_json::json!({
            "path": p, "tensors": tensors,
            "bytes": std::fs::metadata(p).with_context(ctx)?.len(),
            "tensor_types": types,
        }));
    }
    Ok(out.into())
}

/// `Q8_0 x40, F32 x12` from a `{type: count}` object.
fn types_line(types: &serde_json::Value) -> String {
    let v: Vec<String> = types
        .as_object()
        .map(|m| m.iter().map(|(k, v)| format!("{k} x{v}")).collect())
        .unwrap_or_default();
    v.join(", ")
}

/// Prints the lines of [`add_format`].
pub fn print_format(out: &serde_json::Value) {
    println!("  format: {}", out["format"].as_str().unwrap_or("?"));
    if let Some(files) = out["gguf"].as_array() {
        for f in files {
            println!(
                "    {} ({} tensors, {:.1} MiB): {}",
                f["path"].as_str().unwrap_or("?"),
                f["tensors"],
                f["data_bytes"].as_f64().unwrap_or(0.0) / (1u64 << 20) as f64,
                types_line(&f["tensor_types"])
            );
        }
        match out["projector"].as_str() {
            Some(p) => println!("    projector: {p}"),
            None => println!("    projector: none (text only; image/audio need an mmproj GGUF)"),
        }
    }
    if let Some(files) = out["safetensors"].as_array() {
        for f in files {
            println!(
                "    {} ({} tensors, {:.1} MiB): {}",
                f["path"].as_str().unwrap_or("?"),
                f["tensors"],
                f["bytes"].as_f64().unwrap_or(0.0) / (1u64 << 20) as f64,
                types_line(&f["tensor_types"])
            );
        }
    }
    if let Some(why) = out["quant_cache"]["why_not"].as_str() {
        println!("  quantized cache: not used ({why})");
    } else if let Some(entries) = out["quant_cache"]["entries"].as_array() {
        println!(
            "  quantized cache ({}):",
            out["quant_cache"]["dir"].as_str().unwrap_or("?")
        );
        for e in entries {
            println!(
                "    {:5} keep_f16={:11} {}",
                e["quant"].as_str().unwrap_or("?"),
                e["keep_f16"].as_str().unwrap_or("?"),
                match e["bytes"].as_u64() {
                    Some(b) => format!("cached, {:.1} MiB", b as f64 / (1u64 << 20) as f64),
                    None => "not cached (written on the first load at this quant)".into(),
                }
            );
        }
    }
}

/// One line when an image or audio prompt meets a GGUF model without its projector.
pub fn check_projector(files: &ModelFiles, image: bool, audio: bool) -> anyhow::Result<()> {
    if !is_gguf(files) || !(image || audio) || projector(files).is_some() {
        return Ok(());
    }
    let what = if image { "an image" } else { "an audio" };
    bail!(
        "{}: {what} prompt needs the model's projector GGUF (mmproj-*.gguf); pass --mmproj or put it beside the model",
        files.weights[0].display()
    )
}
