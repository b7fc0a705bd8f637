//! `percept bench`: measurements apart from the product, one module per command. They build
//! on the product's pieces (the model, ingest, the pipeline) and never the other way round.

pub mod bandwidth;
pub mod clip;
pub mod model;
pub mod pipeline;
pub mod quant_study;
pub mod random_gguf;
pub mod random_mmproj;
pub mod vs_llamacpp;
pub mod vs_mtmd;
