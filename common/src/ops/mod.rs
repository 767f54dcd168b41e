//! Hand-written forward/backward ops over candle tensors (no `Var`, no graph).
//!
//! Convention: `*_fwd` returns the output and, when the backward needs it, a `*Saved`
//! struct of explicit saved activations; `*_bwd` takes the upstream gradient and the saved
//! struct and returns input gradients. Frozen parameters (norm weights, base linears) get
//! no gradient. All ops are device-agnostic candle code; CUDA kernels replace the hot ones
//! behind the `cuda` feature later, with these as the reference.

use candle_core::Tensor;

pub mod activation;
pub mod attention;
pub mod embedding;
pub mod rms_norm;
pub mod rope;
#[cfg(test)]
pub(crate) mod testutil;

/// `a + b` of one shape: the residual stream's adds. On CUDA one vectorised kernel
/// (candle's add moves one element per thread, at half the copy bandwidth); elsewhere
/// candle's add, which gives the same bits.
pub fn residual_add(a: &Tensor, b: &Tensor) -> crate::Result<Tensor> {
    #[cfg(feature = "cuda")]
    if a.dims() == b.dims() && crate::kernels::fused::applies(&[a, b]) {
        return crate::kernels::fused::add(a, b);
    }
    Ok((a + b)?)
}
