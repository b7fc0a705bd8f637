//! Whole-file audio decode for `model run --audio`: symphonia (WAV, FLAC, OGG/Vorbis, ...)
//! to f32, downmix to mono, resample to 16 kHz with a Blackman-windowed sinc.
//! (Streaming ingest has its own decoder in src/ingest.)

use std::path::Path;

use symphonia::core::audio::SampleBuffer;
use symphonia::core::codecs::{DecoderOptions, CODEC_TYPE_NULL};
use symphonia::core::errors::Error as SymError;
use symphonia::core::formats::FormatOptions;
use symphonia::core::io::MediaSourceStream;
use symphonia::core::meta::MetadataOptions;
use symphonia::core::probe::Hint;

use super::PreprocessError;

/// Decoded audio, interleaved channels.
#[derive(Debug, Clone)]
pub struct Decoded {
    pub sample_rate: u32,
    pub channels: usize,
    pub samples: Vec<f32>,
}

fn err(path: &Path, msg: impl std::fmt::Display) -> PreprocessError {
    PreprocessError::AudioDecode {
        path: path.display().to_string(),
        msg: msg.to_string(),
    }
}

/// Decodes every sample of the default track.
pub fn decode_file(path: &Path) -> Result<Decoded, PreprocessError> {
    let file = std::fs::File::open(path).map_err(|source| PreprocessError::Io {
        path: path.display().to_string(),
        source,
    })?;
    let mss = MediaSourceStream::new(Box::new(file), Default::default());
    let mut hint = Hint::new();
    if let Some(ext) = path.extension().and_then(|e| e.to_str()) {
        hint.with_extension(ext);
    }
    let probed = symphonia::default::get_probe()
        .format(
            &hint,
            mss,
            &FormatOptions::default(),
            &MetadataOptions::default(),
        )
        .map_err(|e| err(path, format!("probe: {e}")))?;
    let mut format = probed.format;
    let track = format
        .tracks()
        .iter()
        .find(|t| t.codec_params.codec != CODEC_TYPE_NULL)
        .ok_or_else(|| err(path, "no audio track"))?;
    let track_id = track.id;
    let mut sample_rate = track.codec_params.sample_rate.unwrap_or(0);
    let mut channels = track.codec_params.channels.map(|c| c.count()).unwrap_or(0);
    let mut decoder = symphonia::default::get_codecs()
        .make(&track.codec_params, &DecoderOptions::default())
        .map_err(|e| err(path, format!("codec: {e}")))?;
    let mut samples = Vec::new();
    loop {
        let packet = match format.next_packet() {
            Ok(p) => p,
            Err(SymError::IoError(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => break,
            Err(SymError::ResetRequired) => break,
            Err(e) => return Err(err(path, format!("read: {e}"))),
        };
        if packet.track_id() != track_id {
            continue;
        }
        let buf = match decoder.decode(&packet) {
            Ok(b) => b,
            // A corrupt packet is skipped, as symphonia's own players do.
            Err(SymError::DecodeError(_)) => continue,
            Err(e) => return Err(err(path, format!("decode: {e}"))),
        };
        let spec = *buf.spec();
        sample_rate = spec.rate;
        channels = spec.channels.count();
        let mut sb = SampleBuffer::<f32>::new(buf.capacity() as u64, spec);
        sb.copy_interleaved_ref(buf);
        samples.extend_from_slice(sb.samples());
    }
    if sample_rate == 0 || channels == 0 {
        return Err(err(path, "unknown sample rate or channel count"));
    }
    Ok(Decoded {
        sample_rate,
        channels,
        samples,
    })
}

/// Averages interleaved channels.
pub fn downmix(samples: &[f32], channels: usize) -> Vec<f32> {
    if channels <= 1 {
        return samples.to_vec();
    }
    samples
        .chunks_exact(channels)
        .map(|f| f.iter().sum::<f32>() / channels as f32)
        .collect()
}

/// Half-width of the sinc kernel in input samples at unit cutoff.
const SINC_HALF_TAPS: usize = 32;

fn blackman(x: f64) -> f64 {
    // x in [-1, 1] -> window value.
    let t = (x + 1.0) * 0.5;
    0.42 - 0.5 * (2.0 * std::f64::consts::PI * t).cos()
        + 0.08 * (4.0 * std::f64::consts::PI * t).cos()
}

/// Band-limited resampling by windowed sinc. When downsampling the cutoff moves to the
/// output Nyquist (times 0.95 to leave the window's transition band below it).
pub fn resample(input: &[f32], from: u32, to: u32) -> Vec<f32> {
    if from == to || input.is_empty() {
        return input.to_vec();
    }
    let ratio = to as f64 / from as f64;
    let out_len = ((input.len() as u64 * to as u64).div_ceil(from as u64)) as usize;
    let cutoff = ratio.min(1.0) * 0.95;
    let half = (SINC_HALF_TAPS as f64 / cutoff).ceil() as i64;
    let n_in = input.len() as i64;
    (0..out_len)
        .map(|j| {
            let t = j as f64 / ratio;
            let center = t.floor() as i64;
            let mut acc = 0.0f64;
            let mut wsum = 0.0f64;
            for i in (center - half + 1)..=(center + half) {
                let d = t - i as f64;
                let x = d / half as f64;
                if x.abs() >= 1.0 {
                    continue;
                }
                let arg = std::f64::consts::PI * cutoff * d;
                let s = if arg.abs() < 1e-12 {
                    1.0
                } else {
                    arg.sin() / arg
                };
                let w = cutoff * s * blackman(x);
                wsum += w;
                if (0..n_in).contains(&i) {
                    acc += w * input[i as usize] as f64;
                }
            }
            // Normalise by the kernel's DC gain so a constant stays constant.
            if wsum != 0.0 {
                (acc / wsum) as f32
            } else {
                0.0
            }
        })
        .collect()
}

/// Decode, downmix and resample to 16 kHz mono.
pub fn load_mono_16k(path: &Path) -> Result<Vec<f32>, PreprocessError> {
    let d = decode_file(path)?;
    let mono = downmix(&d.samples, d.channels);
    Ok(resample(
        &mono,
        d.sample_rate,
        super::mel::SAMPLE_RATE as u32,
    ))
}
