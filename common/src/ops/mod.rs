//! Hand-written forward/backward ops over candle tensors (no `Var`, no graph).
//!
//! Convention: `*_fwd` returns the output and, when the backward needs it, a `*Saved`
//! struct of explicit saved activations; `*_bwd` takes the upstream gradient and the saved
//! struct and returns input gradients. Frozen parameters (norm weights, base linears) get
//! no gradient. All ops are device-agnostic candle code; CUDA kernels replace the hot ones
//! behind the `cuda` feature later, with these as the reference.

pub mod activation;
pub mod attention;
pub mod embedding;
pub mod rms_norm;
pub mod rope;
#[cfg(test)]
pub(crate) mod testutil;
