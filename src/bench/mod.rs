//! Benchmark and study commands, apart from the product.

pub mod bandwidth;
pub mod random_gguf;
pub mod vs_llamacpp;
