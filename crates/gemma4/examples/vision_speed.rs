//! Times the E2B/E4B vision tower (random weights at the released shape) on one 1280x720
//! frame per image budget, f32 and int8 interleaved, and how far int8's soft tokens are
//! from f32's: `cargo run --release -p gemma4 --example vision_speed [budgets]`.
//! `VISION_LAYERS=n` builds a shallower tower, `ONLY=int8|f32` times one (profiling),
//! `PERTURB=0.002` also runs f32 on pixels moved by up to that much (the input's own
//! rounding as a yardstick).

use std::time::Instant;

use candle_core::{DType, Device};
use gemma4::clippable::VisionQuant;
use gemma4::config::VisionConfig;
use gemma4::layers::Quant;
use gemma4::loader::Weights;
use gemma4::preprocess::image::{preprocess, RgbImage};
use gemma4::vision::VisionTower;

fn main() -> anyhow::Result<()> {
    let budgets: Vec<usize> = std::env::args()
        .skip(1)
        .map(|s| s.parse())
        .collect::<Result<_, _>>()?;
    let budgets = if budgets.is_empty() {
        vec![70, 280]
    } else {
        budgets
    };
    // VISION_LAYERS=n: a shallower tower (how deviations grow with depth).
    let cfg: VisionConfig = match std::env::var("VISION_LAYERS") {
        Ok(n) => serde_json::from_str(&format!("{{\"num_hidden_layers\": {n}}}"))?,
        Err(_) => serde_json::from_str("{}")?,
    };
    let w = Weights::random(0x5eed, &Device::Cpu, DType::F32);
    // ONLY=int8 / ONLY=f32: one tower (profiling).
    let only = std::env::var("ONLY").ok();
    let towers = [VisionQuant::F32, VisionQuant::Int8]
        .map(|vq| VisionTower::load_quant(&w, &cfg, 1536, Quant::F32, vq).map(|t| (vq, t)));
    let towers = towers
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?
        .into_iter()
        .filter(|(vq, _)| only.as_deref().is_none_or(|o| o == vq.as_str()))
        .collect::<Vec<_>>();
    let (fw, fh) = (1280, 720);
    let frame = RgbImage::new(
        fw,
        fh,
        (0..fw * fh * 3).map(|i| (i * 131 % 251) as u8).collect(),
    );
    for b in budgets {
        let input = preprocess(&frame, b)?;
        let mut outs = Vec::new();
        for rep in 0..3 {
            for (vq, tower) in &towers {
                let t = Instant::now();
                let soft = tower.encode(&input)?;
                println!(
                    "budget {b} {vq} rep {rep}: {} tokens, {:.1} ms",
                    soft.dim(0)?,
                    t.elapsed().as_secs_f64() * 1e3
                );
                if rep == 0 {
                    outs.push(soft);
                }
            }
        }
        if let Ok(eps) = std::env::var("PERTURB") {
            let eps: f32 = eps.parse()?;
            let mut inp2 = input.clone();
            for (i, v) in inp2.pixel_values.iter_mut().enumerate() {
                *v += eps * (((i * 7919) % 1000) as f32 / 500.0 - 1.0);
            }
            let p = towers[0].1.encode(&inp2)?;
            let a = &outs[0];
            let dot = (a * &p)?.sum_all()?.to_scalar::<f32>()?;
            let na = a.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt();
            let nb = p.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt();
            println!(
                "budget {b}: f32 with pixels moved by up to {eps}: cosine {:.6}",
                dot / (na * nb)
            );
        }
        if outs.len() < 2 {
            continue;
        }
        let (a, b2) = (&outs[0], &outs[1]);
        let d = (a - b2)?.abs()?.max_all()?.to_scalar::<f32>()?;
        let m = a.abs()?.max_all()?.to_scalar::<f32>()?;
        let dot = (a * b2)?.sum_all()?.to_scalar::<f32>()?;
        let na = a.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt();
        let nb = b2.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt();
        println!(
            "budget {b}: int8 vs f32 max abs {d:.4e} (max |f32| {m:.3}), cosine {:.6}",
            dot / (na * nb)
        );
    }
    Ok(())
}
