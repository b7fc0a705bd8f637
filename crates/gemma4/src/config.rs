//! Serde view of a Gemma 4 `config.json`: model_type `gemma4` (E2B/E4B, vision and audio
//! towers) or `gemma4_unified` (12B, encoder-free: raw pixel patches and waveform frames are
//! projected straight into the decoder; `configuration_gemma4_unified.py`).
//!
//! Field names and defaults follow `configuration_gemma4.py` (transformers 5.24.0).
//! Two text-config forms exist in the wild and both are accepted:
//! - released checkpoints: `global_head_dim` / `num_global_key_value_heads` at the top level;
//! - configs re-saved by transformers 5.24: a `per_layer_config` map of per-layer overrides
//!   (keys are layer indices, as JSON strings, or layer-type names).
//!
//! [`TextConfig::layer_specs`] resolves either form into one [`LayerSpec`] per decoder layer;
//! the rest of the model reads only those.

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

/// Errors found while reading or resolving a config.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("parsing {path}: {source}")]
    Json {
        path: String,
        source: serde_json::Error,
    },
    #[error("unsupported config: {0}")]
    Unsupported(String),
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// Attention type of one decoder layer (`layer_types` entries).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerType {
    SlidingAttention,
    FullAttention,
}

impl LayerType {
    pub fn as_str(self) -> &'static str {
        match self {
            LayerType::SlidingAttention => "sliding_attention",
            LayerType::FullAttention => "full_attention",
        }
    }
}

/// One entry of `rope_parameters` (per layer type).
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
pub struct RopeParams {
    /// `default` or `proportional`.
    #[serde(default = "default_rope_type")]
    pub rope_type: String,
    pub rope_theta: f64,
    /// Fraction of head_dim that rotates (proportional RoPE only; default RoPE ignores it
    /// in the reference).
    #[serde(default)]
    pub partial_rotary_factor: Option<f64>,
    /// Linear frequency divisor (`factor`), 1.0 when absent.
    #[serde(default)]
    pub factor: Option<f64>,
}

fn default_rope_type() -> String {
    "default".into()
}

/// `rope_parameters` of the text config, keyed by layer type.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
pub struct RopeParameters {
    pub sliding_attention: RopeParams,
    pub full_attention: RopeParams,
}

impl Default for RopeParameters {
    fn default() -> Self {
        Self {
            sliding_attention: RopeParams {
                rope_type: "default".into(),
                rope_theta: 10_000.0,
                partial_rotary_factor: None,
                factor: None,
            },
            full_attention: RopeParams {
                rope_type: "proportional".into(),
                rope_theta: 1_000_000.0,
                partial_rotary_factor: Some(0.25),
                factor: None,
            },
        }
    }
}

/// Per-layer override as written by transformers 5.24 in `per_layer_config`.
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, PartialEq)]
pub struct LayerOverride {
    #[serde(default)]
    pub head_dim: Option<usize>,
    #[serde(default)]
    pub num_key_value_heads: Option<usize>,
}

/// Text decoder config (`text_config`, upstream `Gemma4TextConfig`).
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
pub struct TextConfig {
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    #[serde(default = "d_hidden")]
    pub hidden_size: usize,
    #[serde(default = "d_inter")]
    pub intermediate_size: usize,
    #[serde(default = "d_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "d_kv_heads")]
    pub num_key_value_heads: usize,
    #[serde(default = "d_head_dim")]
    pub head_dim: usize,
    /// Released form: head_dim of full-attention layers (upstream default 512).
    #[serde(default)]
    pub global_head_dim: Option<usize>,
    /// Released form: kv heads of full-attention layers when `attention_k_eq_v`.
    #[serde(default)]
    pub num_global_key_value_heads: Option<usize>,
    /// transformers-5.24 form of the two fields above.
    #[serde(default)]
    pub per_layer_config: Option<BTreeMap<String, LayerOverride>>,
    #[serde(default = "d_act")]
    pub hidden_activation: String,
    #[serde(default = "d_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default = "d_eps")]
    pub rms_norm_eps: f64,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
    #[serde(default = "d_true")]
    pub tie_word_embeddings: bool,
    #[serde(default)]
    pub rope_parameters: Option<RopeParameters>,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default = "d_window")]
    pub sliding_window: usize,
    #[serde(default)]
    pub layer_types: Option<Vec<LayerType>>,
    #[serde(default)]
    pub final_logit_softcapping: Option<f64>,
    /// `None`, `"vision"` or `"all"`.
    #[serde(default)]
    pub use_bidirectional_attention: Option<String>,
    #[serde(default = "d_vocab")]
    pub vocab_size_per_layer_input: usize,
    /// PLE width; 0 or absent-with-null disables PLE.
    #[serde(default = "d_ple")]
    pub hidden_size_per_layer_input: usize,
    #[serde(default)]
    pub attention_k_eq_v: bool,
    #[serde(default)]
    pub num_kv_shared_layers: usize,
    #[serde(default)]
    pub enable_moe_block: bool,
    #[serde(default)]
    pub use_double_wide_mlp: bool,
}

/// `eos_token_id` may be one id or a list.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(untagged)]
pub enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(i) => vec![*i],
            TokenIds::Many(v) => v.clone(),
        }
    }
}

fn d_vocab() -> usize {
    262_144
}
fn d_hidden() -> usize {
    2304
}
fn d_inter() -> usize {
    9216
}
fn d_layers() -> usize {
    30
}
fn d_heads() -> usize {
    8
}
fn d_kv_heads() -> usize {
    4
}
fn d_head_dim() -> usize {
    256
}
fn d_act() -> String {
    "gelu_pytorch_tanh".into()
}
fn d_max_pos() -> usize {
    131_072
}
fn d_eps() -> f64 {
    1e-6
}
fn d_true() -> bool {
    true
}
fn d_window() -> usize {
    512
}
fn d_ple() -> usize {
    256
}

/// Where a layer's keys and values come from (upstream `kv_sharing_modes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvSource {
    /// The layer computes and caches its own K/V.
    Own,
    /// The layer reuses the K/V of the given earlier layer (same layer type).
    Shared(usize),
}

/// Everything one decoder layer needs, resolved from either config form.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerSpec {
    pub index: usize,
    pub layer_type: LayerType,
    pub head_dim: usize,
    pub num_kv_heads: usize,
    /// Sliding window in keys (exactly W keys visible, the query's own included); None on
    /// full layers.
    pub sliding_window: Option<usize>,
    pub rope: RopeParams,
    pub kv: KvSource,
    /// V is the raw K projection (no `v_proj`): `attention_k_eq_v` on full layers.
    pub k_eq_v: bool,
    pub intermediate_size: usize,
}

impl TextConfig {
    /// `layer_types`, defaulting to the upstream 5:1 pattern; the last layer is forced to
    /// full attention as upstream does.
    pub fn layer_types(&self) -> Vec<LayerType> {
        let mut types = self.layer_types.clone().unwrap_or_else(|| {
            (0..self.num_hidden_layers)
                .map(|i| {
                    if (i + 1) % 6 != 0 {
                        LayerType::SlidingAttention
                    } else {
                        LayerType::FullAttention
                    }
                })
                .collect()
        });
        if let Some(last) = types.last_mut() {
            *last = LayerType::FullAttention;
        }
        types
    }

    pub fn rope_parameters(&self) -> RopeParameters {
        self.rope_parameters.clone().unwrap_or_default()
    }

    /// PLE width, None when PLE is disabled.
    pub fn ple_dim(&self) -> Option<usize> {
        (self.hidden_size_per_layer_input > 0).then_some(self.hidden_size_per_layer_input)
    }

    /// First layer index that reuses another layer's K/V.
    pub fn first_kv_shared_layer(&self) -> usize {
        self.num_hidden_layers - self.num_kv_shared_layers
    }

    /// Checks what this implementation supports.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        if self.enable_moe_block {
            problems.push("enable_moe_block (MoE) is not supported".to_string());
        }
        if self.use_bidirectional_attention.as_deref() == Some("all") {
            problems.push("use_bidirectional_attention=\"all\" is not supported".to_string());
        }
        if self.num_kv_shared_layers > self.num_hidden_layers {
            problems.push("num_kv_shared_layers > num_hidden_layers".to_string());
        }
        let types = self.layer_types();
        if types.len() != self.num_hidden_layers {
            problems.push(format!(
                "layer_types has {} entries, num_hidden_layers is {}",
                types.len(),
                self.num_hidden_layers
            ));
        }
        if self.hidden_activation != "gelu_pytorch_tanh" && self.hidden_activation != "gelu" {
            problems.push(format!(
                "hidden_activation {:?} is not supported",
                self.hidden_activation
            ));
        }
        for r in [
            &self.rope_parameters().sliding_attention,
            &self.rope_parameters().full_attention,
        ] {
            if r.rope_type != "default" && r.rope_type != "proportional" {
                problems.push(format!("rope_type {:?} is not supported", r.rope_type));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Unsupported(problems.join("; ")))
        }
    }

    /// Resolves per-layer shapes, RoPE and KV sharing (upstream `per_layer_config` and
    /// `kv_sharing_modes`).
    pub fn layer_specs(&self) -> Result<Vec<LayerSpec>, ConfigError> {
        self.validate()?;
        let types = self.layer_types();
        let rope = self.rope_parameters();
        let n = self.num_hidden_layers;
        let first_shared = self.first_kv_shared_layer();
        let all_shared = self.num_kv_shared_layers == n;
        if all_shared {
            return Err(ConfigError::Unsupported(
                "every layer shares K/V (num_kv_shared_layers == num_hidden_layers)".into(),
            ));
        }
        let mut specs = Vec::with_capacity(n);
        for (i, &lt) in types.iter().enumerate() {
            let mut head_dim = self.head_dim;
            let mut kv_heads = self.num_key_value_heads;
            match &self.per_layer_config {
                Some(map) => {
                    for key in [i.to_string(), lt.as_str().to_string()] {
                        if let Some(o) = map.get(&key) {
                            if let Some(h) = o.head_dim {
                                head_dim = h;
                            }
                            if let Some(k) = o.num_key_value_heads {
                                kv_heads = k;
                            }
                        }
                    }
                }
                None => {
                    if lt == LayerType::FullAttention {
                        head_dim = self.global_head_dim.unwrap_or(512);
                        if self.attention_k_eq_v {
                            if let Some(k) = self.num_global_key_value_heads {
                                kv_heads = k;
                            }
                        }
                    }
                }
            }
            if kv_heads == 0 || !self.num_attention_heads.is_multiple_of(kv_heads) {
                return Err(ConfigError::Invalid(format!(
                    "layer {i}: {} attention heads not divisible by {kv_heads} kv heads",
                    self.num_attention_heads
                )));
            }
            let kv = if i < first_shared {
                KvSource::Own
            } else {
                let src = (0..first_shared)
                    .rev()
                    .find(|&j| types[j] == lt)
                    .ok_or_else(|| {
                        ConfigError::Invalid(format!(
                        "layer {i} ({}) shares K/V but no earlier layer of that type owns a cache",
                        lt.as_str()
                    ))
                    })?;
                KvSource::Shared(src)
            };
            let shared = matches!(kv, KvSource::Shared(_));
            let intermediate_size = if self.use_double_wide_mlp && shared {
                self.intermediate_size * 2
            } else {
                self.intermediate_size
            };
            let (sliding_window, rope) = match lt {
                LayerType::SlidingAttention => {
                    (Some(self.sliding_window), rope.sliding_attention.clone())
                }
                LayerType::FullAttention => (None, rope.full_attention.clone()),
            };
            specs.push(LayerSpec {
                index: i,
                layer_type: lt,
                head_dim,
                num_kv_heads: kv_heads,
                sliding_window,
                rope,
                kv,
                k_eq_v: self.attention_k_eq_v && lt == LayerType::FullAttention,
                intermediate_size,
            });
        }
        // A shared layer attends with its source's K/V, so shapes must agree.
        for s in &specs {
            if let KvSource::Shared(src) = s.kv {
                let o = &specs[src];
                if o.head_dim != s.head_dim || o.num_kv_heads != s.num_kv_heads {
                    return Err(ConfigError::Invalid(format!(
                        "layer {} shares K/V with layer {src} but head shapes differ",
                        s.index
                    )));
                }
            }
        }
        Ok(specs)
    }
}

/// Vision tower config (`vision_config`, upstream `Gemma4VisionConfig`).
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
pub struct VisionConfig {
    #[serde(default = "v_hidden")]
    pub hidden_size: usize,
    #[serde(default = "v_inter")]
    pub intermediate_size: usize,
    #[serde(default = "v_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "v_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "v_heads")]
    pub num_key_value_heads: usize,
    #[serde(default = "v_head_dim")]
    pub head_dim: usize,
    #[serde(default = "d_act")]
    pub hidden_activation: String,
    #[serde(default = "d_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "d_max_pos")]
    pub max_position_embeddings: usize,
    #[serde(default)]
    pub attention_bias: Option<bool>,
    /// Raw `rope_parameters` (axial RoPE, `rope_theta` default 100).
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    #[serde(default = "v_pool")]
    pub pooling_kernel_size: usize,
    #[serde(default = "v_patch")]
    pub patch_size: usize,
    #[serde(default = "v_pos_emb")]
    pub position_embedding_size: usize,
    #[serde(default)]
    pub use_clipped_linears: bool,
    #[serde(default)]
    pub standardize: bool,
}

impl VisionConfig {
    /// Axial RoPE theta (`rope_parameters.rope_theta`, upstream default 100).
    pub fn rope_theta(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .and_then(|v| v.get("rope_theta"))
            .and_then(|v| v.as_f64())
            .unwrap_or(100.0)
    }
}

fn v_hidden() -> usize {
    768
}
fn v_inter() -> usize {
    3072
}
fn v_layers() -> usize {
    16
}
fn v_heads() -> usize {
    12
}
fn v_head_dim() -> usize {
    64
}
fn v_pool() -> usize {
    3
}
fn v_patch() -> usize {
    16
}
fn v_pos_emb() -> usize {
    10 * 1024
}

/// Audio tower config (`audio_config`, upstream `Gemma4AudioConfig`).
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
pub struct AudioConfig {
    #[serde(default = "a_hidden")]
    pub hidden_size: usize,
    #[serde(default = "a_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "a_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "a_act")]
    pub hidden_act: String,
    #[serde(default = "a_sub")]
    pub subsampling_conv_channels: Vec<usize>,
    #[serde(default = "a_kernel")]
    pub conv_kernel_size: usize,
    #[serde(default = "a_resw")]
    pub residual_weight: f64,
    #[serde(default = "a_chunk")]
    pub attention_chunk_size: usize,
    #[serde(default = "a_left")]
    pub attention_context_left: usize,
    #[serde(default)]
    pub attention_context_right: usize,
    #[serde(default = "a_cap")]
    pub attention_logit_cap: f64,
    #[serde(default = "a_invalid")]
    pub attention_invalid_logits_value: f64,
    #[serde(default = "d_true")]
    pub use_clipped_linears: bool,
    #[serde(default = "d_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "a_gclip")]
    pub gradient_clipping: f64,
    #[serde(default = "a_out")]
    pub output_proj_dims: usize,
}

fn a_hidden() -> usize {
    1024
}
fn a_layers() -> usize {
    12
}
fn a_heads() -> usize {
    8
}
fn a_act() -> String {
    "silu".into()
}
fn a_sub() -> Vec<usize> {
    vec![128, 32]
}
fn a_kernel() -> usize {
    5
}
fn a_resw() -> f64 {
    0.5
}
fn a_chunk() -> usize {
    12
}
fn a_left() -> usize {
    13
}
fn a_cap() -> f64 {
    50.0
}
fn a_invalid() -> f64 {
    -1.0e9
}
fn a_gclip() -> f64 {
    1e10
}
fn a_out() -> usize {
    1536
}

/// Top-level `config.json` (upstream `Gemma4Config`).
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
pub struct Gemma4Config {
    #[serde(default)]
    pub model_type: Option<String>,
    pub text_config: TextConfig,
    #[serde(default)]
    pub vision_config: Option<VisionConfig>,
    #[serde(default)]
    pub audio_config: Option<AudioConfig>,
    #[serde(default = "t_boi")]
    pub boi_token_id: u32,
    #[serde(default = "t_eoi")]
    pub eoi_token_id: u32,
    #[serde(default = "t_image")]
    pub image_token_id: u32,
    #[serde(default = "t_video")]
    pub video_token_id: u32,
    #[serde(default = "t_boa")]
    pub boa_token_id: u32,
    /// Upstream spells it `eoa_token_index`; the published configs also carry
    /// `eoa_token_id` (reconciled in [`reconcile_spellings`] before deserializing).
    #[serde(default = "t_eoa")]
    pub eoa_token_index: u32,
    #[serde(default = "t_audio")]
    pub audio_token_id: u32,
    #[serde(default)]
    pub eos_token_id: Option<TokenIds>,
    #[serde(default = "d_true")]
    pub tie_word_embeddings: bool,
    /// Which architecture `model_type` names (not a JSON field of its own).
    #[serde(skip)]
    pub arch: Arch,
    /// `vision_config` of a `gemma4_unified` checkpoint (then `vision_config` is None).
    #[serde(skip)]
    pub unified_vision: Option<UnifiedVisionConfig>,
    /// `audio_config` of a `gemma4_unified` checkpoint (then `audio_config` is None).
    #[serde(skip)]
    pub unified_audio: Option<UnifiedAudioConfig>,
}

/// The two Gemma 4 architectures this crate runs, from `config.json` `model_type`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Arch {
    /// `gemma4`: E2B/E4B with vision and audio encoder towers.
    #[default]
    Gemma4,
    /// `gemma4_unified`: the encoder-free 12B.
    Gemma4Unified,
}

impl Arch {
    pub fn model_type(self) -> &'static str {
        match self {
            Arch::Gemma4 => "gemma4",
            Arch::Gemma4Unified => "gemma4_unified",
        }
    }
}

/// `vision_config` of `gemma4_unified` (upstream `Gemma4UnifiedVisionConfig`): raw
/// `(patch_size * pooling_kernel_size)^2 * 3` pixel patches projected by the vision embedder.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
pub struct UnifiedVisionConfig {
    #[serde(default = "v_patch")]
    pub patch_size: usize,
    #[serde(default = "v_pool")]
    pub pooling_kernel_size: usize,
    /// Width of the patch embedding (upstream default 3840).
    #[serde(default = "u_mm")]
    pub mm_embed_dim: usize,
    /// Rows of the factorized position table `[mm_posemb_size, 2, mm_embed_dim]`.
    #[serde(default = "u_posemb")]
    pub mm_posemb_size: usize,
    #[serde(default = "d_eps")]
    pub rms_norm_eps: f64,
    /// Input width of the multimodal projection; must equal `mm_embed_dim`.
    #[serde(default = "u_mm")]
    pub output_proj_dims: usize,
}

impl UnifiedVisionConfig {
    /// Side of a merged model patch in pixels (48).
    pub fn model_patch_size(&self) -> usize {
        self.patch_size * self.pooling_kernel_size
    }

    /// Values per merged patch: `model_patch_size^2 * 3` (6912).
    pub fn patch_dim(&self) -> usize {
        self.model_patch_size().pow(2) * 3
    }
}

/// `audio_config` of `gemma4_unified` (upstream `Gemma4UnifiedAudioConfig`): each audio soft
/// token is `audio_embed_dim` raw 16 kHz samples (640 = 40 ms).
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
pub struct UnifiedAudioConfig {
    #[serde(default = "u_audio")]
    pub audio_embed_dim: usize,
    #[serde(default = "d_eps")]
    pub rms_norm_eps: f64,
}

impl UnifiedAudioConfig {
    /// Raw samples per audio soft token (`audio_samples_per_token == audio_embed_dim`).
    pub fn samples_per_token(&self) -> usize {
        self.audio_embed_dim
    }
}

fn u_mm() -> usize {
    3840
}
fn u_posemb() -> usize {
    1120
}
fn u_audio() -> usize {
    640
}

fn t_boi() -> u32 {
    255_999
}
fn t_eoi() -> u32 {
    258_882
}
fn t_image() -> u32 {
    258_880
}
fn t_video() -> u32 {
    258_884
}
fn t_boa() -> u32 {
    256_000
}
fn t_eoa() -> u32 {
    258_883
}
fn t_audio() -> u32 {
    258_881
}

/// Fields that configs in the wild spell two ways: (the name percept reads, the other one).
/// The published `google/gemma-4-E2B-it` config carries both `eoa_token_index` and
/// `eoa_token_id`; configs written by other tools (vLLM, Gemma 3-era converters) use the
/// `*_token_index` forms of the other media token ids.
const TOP_LEVEL_SPELLINGS: &[(&str, &str)] = &[
    ("eoa_token_index", "eoa_token_id"),
    ("boi_token_id", "boi_token_index"),
    ("eoi_token_id", "eoi_token_index"),
    ("image_token_id", "image_token_index"),
    ("video_token_id", "video_token_index"),
    ("boa_token_id", "boa_token_index"),
    ("audio_token_id", "audio_token_index"),
];

/// The sub-configs of a composite `config.json`.
const SUB_CONFIGS: [&str; 3] = ["text_config", "vision_config", "audio_config"];

/// Folds each second spelling into the first, which serde would otherwise see as unknown (or,
/// for `eoa_token_*`, as one field given twice). Both present with different values is an
/// error naming both.
fn reconcile_spellings(
    obj: &mut serde_json::Map<String, serde_json::Value>,
    spellings: &[(&str, &str)],
    path: &str,
) -> Result<(), ConfigError> {
    for (name, other) in spellings {
        let Some(second) = obj.remove(*other) else {
            continue;
        };
        match obj.get(*name) {
            Some(first) if *first != second => {
                return Err(ConfigError::Invalid(format!(
                    "{path}: {name} = {first} and {other} = {second} disagree; they name the same token"
                )))
            }
            Some(_) => {}
            None => {
                obj.insert((*name).to_string(), second);
            }
        }
    }
    Ok(())
}

/// Brings a `config.json` as published (or as transformers 5.x re-saves it) into the form
/// the serde types read, accepting what transformers accepts:
/// - `null` values mean "not set": they are dropped so the upstream defaults apply (transformers
///   types these fields `X | None`), in the top level and in each sub-config;
/// - a missing or `null` `text_config` is the default text config, as upstream;
/// - the two spellings of a token id are folded into one ([`TOP_LEVEL_SPELLINGS`]).
///
/// Unknown keys (`_name_or_path`, `architectures`, `id2label`, `label2id`, `dtype`,
/// `torch_dtype`, `chunk_size_feed_forward`, `transformers_version`, `initializer_range`,
/// `use_cache`, ...) need nothing: the serde types ignore them. percept's own TOML stays
/// strict; this leniency is only for checkpoint files percept does not write.
fn normalize_published(v: &mut serde_json::Value, path: &str) -> Result<(), ConfigError> {
    let Some(obj) = v.as_object_mut() else {
        return Err(ConfigError::Invalid(format!("{path}: not a JSON object")));
    };
    obj.retain(|_, value| !value.is_null());
    obj.entry("text_config")
        .or_insert_with(|| serde_json::json!({}));
    for sub in SUB_CONFIGS {
        if let Some(s) = obj.get_mut(sub).and_then(|s| s.as_object_mut()) {
            s.retain(|_, value| !value.is_null());
        }
    }
    reconcile_spellings(obj, TOP_LEVEL_SPELLINGS, path)
}

impl Gemma4Config {
    /// Parses a `config.json` text. A bare text config (`gemma4_text`) is accepted too and
    /// wrapped with no towers.
    pub fn from_json_str(s: &str, path: &str) -> Result<Self, ConfigError> {
        let json_err = |source| ConfigError::Json {
            path: path.into(),
            source,
        };
        let mut v: serde_json::Value = serde_json::from_str(s).map_err(json_err)?;
        let mt = v
            .get("model_type")
            .and_then(|m| m.as_str())
            .unwrap_or("")
            .to_string();
        let arch = match mt.as_str() {
            "gemma4" | "gemma4_text" | "" => Arch::Gemma4,
            "gemma4_unified" | "gemma4_unified_text" => Arch::Gemma4Unified,
            other => {
                return Err(ConfigError::Unsupported(format!(
                    "{path}: model_type {other:?}; this loader reads \"gemma4\" (E2B/E4B) and \"gemma4_unified\" (12B)"
                )))
            }
        };
        // A bare text config is wrapped with no vision/audio.
        if mt == "gemma4_text" || mt == "gemma4_unified_text" {
            v = serde_json::json!({"model_type": arch.model_type(), "text_config": v});
        } else if mt.is_empty() && v.get("text_config").is_none() {
            return Err(ConfigError::Unsupported(format!(
                "{path}: no model_type and no text_config; expected gemma4 or gemma4_unified"
            )));
        }
        normalize_published(&mut v, path)?;
        let (mut unified_vision, mut unified_audio) = (None, None);
        if arch == Arch::Gemma4Unified {
            let Some(obj) = v.as_object_mut() else {
                return Err(ConfigError::Invalid(format!("{path}: not a JSON object")));
            };
            // The unified sub-configs have their own fields; keep them out of the tower types.
            if let Some(vc) = obj.insert("vision_config".into(), serde_json::Value::Null) {
                if !vc.is_null() {
                    unified_vision = Some(serde_json::from_value(vc).map_err(json_err)?);
                }
            }
            if let Some(ac) = obj.insert("audio_config".into(), serde_json::Value::Null) {
                if !ac.is_null() {
                    unified_audio = Some(serde_json::from_value(ac).map_err(json_err)?);
                }
            }
            // Defaults of `Gemma4UnifiedTextConfig` that differ from `Gemma4TextConfig`:
            // no per-layer embeddings, window 1024, vision-bidirectional attention.
            if let Some(t) = obj.get_mut("text_config").and_then(|t| t.as_object_mut()) {
                for (k, d) in [
                    ("hidden_size_per_layer_input", serde_json::json!(0)),
                    ("sliding_window", serde_json::json!(1024)),
                    ("use_bidirectional_attention", serde_json::json!("vision")),
                    ("max_position_embeddings", serde_json::json!(262_144)),
                ] {
                    t.entry(k).or_insert(d);
                }
                if t.get("hidden_size_per_layer_input")
                    .is_some_and(|x| x.is_null())
                {
                    t.insert("hidden_size_per_layer_input".into(), serde_json::json!(0));
                }
            }
        }
        let mut cfg: Gemma4Config = serde_json::from_value(v).map_err(json_err)?;
        cfg.model_type = Some(arch.model_type().to_string());
        cfg.arch = arch;
        cfg.unified_vision = unified_vision;
        cfg.unified_audio = unified_audio;
        cfg.text_config.validate()?;
        if arch == Arch::Gemma4Unified {
            if cfg.text_config.ple_dim().is_some() {
                return Err(ConfigError::Unsupported(format!(
                    "{path}: gemma4_unified with per-layer embeddings (hidden_size_per_layer_input > 0)"
                )));
            }
            if let Some(vc) = &cfg.unified_vision {
                if vc.output_proj_dims != vc.mm_embed_dim {
                    // Upstream sizes the projection by output_proj_dims but feeds it
                    // mm_embed_dim-wide rows: they must agree.
                    return Err(ConfigError::Invalid(format!(
                        "{path}: vision_config.output_proj_dims {} != mm_embed_dim {}",
                        vc.output_proj_dims, vc.mm_embed_dim
                    )));
                }
            }
        }
        Ok(cfg)
    }

    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let s = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_json_str(&s, &path.display().to_string())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn base(extra: &str) -> String {
        format!(
            r#"{{"model_type":"gemma4","text_config":{{"hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":6,"num_attention_heads":4,"num_key_value_heads":1,"head_dim":16,
            "layer_types":["sliding_attention","sliding_attention","full_attention",
                           "sliding_attention","sliding_attention","full_attention"],
            "num_kv_shared_layers":3,"use_double_wide_mlp":true{extra}}}}}"#
        )
    }

    #[test]
    fn released_form_resolves_global_head_dim_and_sharing() {
        let cfg = Gemma4Config::from_json_str(&base(r#","global_head_dim":32"#), "t").unwrap();
        let specs = cfg.text_config.layer_specs().unwrap();
        assert_eq!(specs[2].head_dim, 32);
        assert_eq!(specs[0].head_dim, 16);
        assert_eq!(specs[3].kv, KvSource::Shared(1));
        assert_eq!(specs[5].kv, KvSource::Shared(2));
        assert_eq!(specs[2].kv, KvSource::Own);
        assert_eq!(specs[3].intermediate_size, 256);
        assert_eq!(specs[2].intermediate_size, 128);
        assert_eq!(specs[0].sliding_window, Some(512));
    }

    #[test]
    fn per_layer_config_form_matches_released_form() {
        let a = Gemma4Config::from_json_str(&base(r#","global_head_dim":32"#), "t").unwrap();
        let b = Gemma4Config::from_json_str(
            &base(r#","per_layer_config":{"2":{"head_dim":32},"5":{"head_dim":32}}"#),
            "t",
        )
        .unwrap();
        assert_eq!(
            a.text_config.layer_specs().unwrap(),
            b.text_config.layer_specs().unwrap()
        );
    }

    #[test]
    fn published_form_with_both_eoa_spellings_loads() {
        let s = base("").replacen(
            '{',
            r#"{"eoa_token_id":258883,"eoa_token_index":258883,"_name_or_path":"x","architectures":null,"#,
            1,
        );
        let cfg = Gemma4Config::from_json_str(&s, "t").unwrap();
        assert_eq!(cfg.eoa_token_index, 258883);
        let only_id = base("").replacen('{', r#"{"eoa_token_id":7,"#, 1);
        assert_eq!(
            Gemma4Config::from_json_str(&only_id, "t")
                .unwrap()
                .eoa_token_index,
            7
        );
        let disagree = base("").replacen('{', r#"{"eoa_token_id":7,"eoa_token_index":8,"#, 1);
        let e = Gemma4Config::from_json_str(&disagree, "cfg.json")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("eoa_token_index") && e.contains("eoa_token_id") && e.contains("cfg.json"),
            "{e}"
        );
    }

    /// Variants that transformers 5.24 `Gemma4Config.from_dict` accepts (checked by
    /// `tests/parity/transformers_config_variants.py`): percept must load them too.
    #[test]
    fn configs_transformers_accepts_load() {
        let legacy = r#""_name_or_path":"google/gemma-4-E2B-it","architectures":null,
            "id2label":{"0":"LABEL_0"},"label2id":{"LABEL_0":0},"dtype":"bfloat16",
            "torch_dtype":"bfloat16","chunk_size_feed_forward":0,"transformers_version":"5.5.0",
            "initializer_range":0.02,"use_cache":true,"attention_dropout":0.0,"#;
        let cases = [
            // Legacy keys in the top level and in the text config.
            base("").replacen('{', &format!("{{{legacy}"), 1),
            base(&format!(",{}", legacy.trim_end_matches(','))),
            // null where upstream types `X | None`.
            base("").replacen('{', r#"{"boi_token_id":null,"eoa_token_index":null,"vision_config":null,"audio_config":null,"#, 1),
            base(r#","final_logit_softcapping":null,"rope_parameters":null,"pad_token_id":null,"bos_token_id":null,"eos_token_id":null,"use_bidirectional_attention":null"#),
            base(r#","eos_token_id":[1,106]"#),
            // Integer RoPE thetas and extra RoPE keys.
            base(r#","rope_parameters":{"sliding_attention":{"rope_type":"default","rope_theta":10000},
                "full_attention":{"rope_type":"proportional","partial_rotary_factor":0.25,"rope_theta":1000000,"extra":1}}"#),
            // Tower sub-configs with legacy keys and nulls.
            base("").replacen('{', r#"{"vision_config":{"model_type":"gemma4_vision","hidden_size":32,"attention_bias":null,
                "rope_parameters":null,"_name_or_path":"","torch_dtype":"bfloat16"},
                "audio_config":{"model_type":"gemma4_audio","hidden_size":32,"_name_or_path":"","dtype":"bfloat16","id2label":{"0":"a"}},"#, 1),
        ];
        for c in &cases {
            let cfg = Gemma4Config::from_json_str(c, "t").unwrap_or_else(|e| panic!("{e}\n{c}"));
            assert_eq!(cfg.text_config.num_hidden_layers, 6, "{c}");
        }
        // A null or absent text_config is upstream's default text config.
        let d = Gemma4Config::from_json_str(r#"{"model_type":"gemma4","text_config":null}"#, "t")
            .unwrap();
        assert_eq!(d.text_config.hidden_size, 2304);
        // The `*_token_index` spellings of the other media ids fold the same way.
        let s = base("").replacen(
            '{',
            r#"{"image_token_index":9,"boi_token_index":5,"boi_token_id":5,"#,
            1,
        );
        let cfg = Gemma4Config::from_json_str(&s, "t").unwrap();
        assert_eq!((cfg.image_token_id, cfg.boi_token_id), (9, 5));
        let bad = base("").replacen('{', r#"{"image_token_index":9,"image_token_id":8,"#, 1);
        let e = Gemma4Config::from_json_str(&bad, "c.json")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("image_token_id") && e.contains("image_token_index") && !e.contains('\n'),
            "{e}"
        );
    }

    #[test]
    fn moe_is_refused() {
        let e = Gemma4Config::from_json_str(&base(r#","enable_moe_block":true"#), "t");
        assert!(matches!(e, Err(ConfigError::Unsupported(_))));
    }
}
