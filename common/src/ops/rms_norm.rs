//! RMSNorm as in HF `LlamaRMSNorm` (`y = x * rsqrt(mean(x²) + eps) * w`) and
//! `GemmaRMSNorm` (`unit_offset`: `y = x * rsqrt(mean(x²) + eps) * (1 + w)`).
//!
//! The weight is frozen, so the backward returns only dX.
//!
//! On a CUDA device, bf16 and f32 inputs go to the fused kernels of
//! [`crate::kernels::fused`] (one pass each way); the `*_reference` functions are the
//! candle formulation that every other device runs and that the kernels are checked against.

use candle_core::{Tensor, D};

use crate::{Error, Result};

/// What the backward needs: the input and the per-row reciprocal RMS. The output is not
/// kept; it is cheaper to rebuild `x * rstd` than to hold another activation.
#[derive(Debug, Clone)]
pub struct RmsNormSaved {
    pub x: Tensor,
    /// `1 / sqrt(mean(x², -1) + eps)`, shape `[..., 1]`: f32 where the CUDA kernel computed
    /// it, x's dtype where the reference did. Either backward accepts either.
    pub rstd: Tensor,
}

/// The weight as it multiplies the normalised input: Gemma stores `w` and multiplies by
/// `1 + w`, so that a zero-initialised weight is the identity.
fn effective_weight(weight: &Tensor, unit_offset: bool) -> Result<Tensor> {
    Ok(if unit_offset {
        weight.affine(1.0, 1.0)?
    } else {
        weight.clone()
    })
}

fn check_weight(op: &str, last_dim: usize, weight: &Tensor) -> Result<()> {
    if weight.dims() != [last_dim] {
        return Err(Error::Msg(format!(
            "{op}: norm weight has shape {:?}, expected [{last_dim}] (the last dim of the input)",
            weight.dims()
        )));
    }
    Ok(())
}

/// `x`: `[..., d]`, `weight`: `[d]`. Returns `[..., d]` and the saved state for the backward.
pub fn rms_norm_fwd(
    x: &Tensor,
    weight: &Tensor,
    eps: f64,
    unit_offset: bool,
) -> Result<(Tensor, RmsNormSaved)> {
    let d = x.dim(D::Minus1)?;
    check_weight("rms_norm_fwd", d, weight)?;
    #[cfg(feature = "cuda")]
    if crate::kernels::fused::applies(&[x, weight]) {
        let (y, rstd) = crate::kernels::fused::rms_norm_fwd(x, weight, eps, unit_offset)?;
        return Ok((y, RmsNormSaved { x: x.clone(), rstd }));
    }
    rms_norm_fwd_reference(x, weight, eps, unit_offset)
}

/// [`rms_norm_fwd`] as candle ops on any device, in x's dtype.
pub fn rms_norm_fwd_reference(
    x: &Tensor,
    weight: &Tensor,
    eps: f64,
    unit_offset: bool,
) -> Result<(Tensor, RmsNormSaved)> {
    let d = x.dim(D::Minus1)?;
    check_weight("rms_norm_fwd", d, weight)?;
    let rstd = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    let w = effective_weight(weight, unit_offset)?;
    let y = x.broadcast_mul(&rstd)?.broadcast_mul(&w)?;
    Ok((y, RmsNormSaved { x: x.clone(), rstd }))
}

fn check_bwd(dy: &Tensor, weight: &Tensor, saved: &RmsNormSaved) -> Result<()> {
    let d = saved.x.dim(D::Minus1)?;
    check_weight("rms_norm_bwd", d, weight)?;
    if dy.dims() != saved.x.dims() {
        return Err(Error::Msg(format!(
            "rms_norm_bwd: dy has shape {:?} but the saved input has {:?}",
            dy.dims(),
            saved.x.dims()
        )));
    }
    Ok(())
}

/// With `x̂ = x * rstd` and `g = dy * w`, the gradient is
/// `dx = rstd * (g - x̂ * mean(g * x̂, -1))`: the mean term is the part of `g` along `x̂`
/// that the normalisation removes.
pub fn rms_norm_bwd(
    dy: &Tensor,
    weight: &Tensor,
    unit_offset: bool,
    saved: &RmsNormSaved,
) -> Result<Tensor> {
    check_bwd(dy, weight, saved)?;
    #[cfg(feature = "cuda")]
    if crate::kernels::fused::applies(&[dy, &saved.x, weight]) {
        return crate::kernels::fused::rms_norm_bwd(dy, &saved.x, weight, &saved.rstd, unit_offset, None);
    }
    rms_norm_bwd_reference(dy, weight, unit_offset, saved)
}

/// `residual + rms_norm_bwd(dy, …)`: a pre-norm block's input gradient, where the residual
/// stream's gradient `residual` skips the branch. One kernel on CUDA (the sum formed in
/// f32 and rounded once), the two steps elsewhere.
pub fn rms_norm_bwd_add(
    dy: &Tensor,
    weight: &Tensor,
    unit_offset: bool,
    saved: &RmsNormSaved,
    residual: &Tensor,
) -> Result<Tensor> {
    check_bwd(dy, weight, saved)?;
    #[cfg(feature = "cuda")]
    if crate::kernels::fused::applies(&[dy, &saved.x, weight, residual]) {
        return crate::kernels::fused::rms_norm_bwd(dy, &saved.x, weight, &saved.rstd, unit_offset, Some(residual));
    }
    Ok((residual + rms_norm_bwd_reference(dy, weight, unit_offset, saved)?)?)
}

/// [`rms_norm_bwd`] as candle ops on any device, in x's dtype.
pub fn rms_norm_bwd_reference(
    dy: &Tensor,
    weight: &Tensor,
    unit_offset: bool,
    saved: &RmsNormSaved,
) -> Result<Tensor> {
    check_bwd(dy, weight, saved)?;
    let w = effective_weight(weight, unit_offset)?;
    // A kernel's forward saves rstd in f32; the candle ops need one dtype throughout.
    let rstd = saved.rstd.to_dtype(saved.x.dtype())?;
    let x_hat = saved.x.broadcast_mul(&rstd)?;
    let g = dy.broadcast_mul(&w)?;
    let proj = (&g * &x_hat)?.mean_keepdim(D::Minus1)?;
    let dx = (g - x_hat.broadcast_mul(&proj)?)?.broadcast_mul(&rstd)?;
    Ok(dx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::{assert_close, assert_close_vec, fd_grad, rand_tensor, to_f64_vec};
    use candle_core::{DType, Var};

    const EPS: f64 = 1e-6;

    /// Direct per-row formula in f64, written without tensor ops.
    fn naive(x: &Tensor, w: &Tensor, eps: f64, unit_offset: bool) -> Vec<f64> {
        let d = x.dim(D::Minus1).unwrap();
        let (xv, wv) = (to_f64_vec(x), to_f64_vec(w));
        let mut out = Vec::with_capacity(xv.len());
        for row in xv.chunks(d) {
            let ms = row.iter().map(|v| v * v).sum::<f64>() / d as f64;
            let r = 1.0 / (ms + eps).sqrt();
            for (v, w) in row.iter().zip(&wv) {
                let w = if unit_offset { 1.0 + w } else { *w };
                out.push(v * r * w);
            }
        }
        out
    }

    #[test]
    fn forward_matches_naive_formula() {
        for unit_offset in [false, true] {
            let x = rand_tensor(1, (2, 3, 16), DType::F32);
            let w = rand_tensor(2, 16, DType::F32);
            let (y, saved) = rms_norm_fwd(&x, &w, EPS, unit_offset).unwrap();
            assert_eq!(y.dims(), &[2, 3, 16]);
            assert_eq!(saved.rstd.dims(), &[2, 3, 1]);
            let want = naive(&x, &w, EPS, unit_offset);
            assert_close_vec(&to_f64_vec(&y), &want, 1e-6, 1e-5, "rms_norm forward");
        }
    }

    #[test]
    fn backward_matches_candle_autograd() {
        for unit_offset in [false, true] {
            let x = Var::from_tensor(&rand_tensor(3, (2, 5, 8), DType::F32)).unwrap();
            let w = rand_tensor(4, 8, DType::F32);
            let dy = rand_tensor(5, (2, 5, 8), DType::F32);

            // The same function built from plain candle ops, differentiated by candle.
            let xt = x.as_tensor();
            let ms = (xt.sqr().unwrap().sum_keepdim(2).unwrap() / 8.0).unwrap();
            let r = (ms + EPS).unwrap().sqrt().unwrap();
            let w_eff = if unit_offset {
                (&w + 1.0).unwrap()
            } else {
                w.clone()
            };
            let y = xt.broadcast_div(&r).unwrap().broadcast_mul(&w_eff).unwrap();
            let grads = (y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
            let want = grads.get(xt).unwrap();

            let (_, saved) = rms_norm_fwd(xt, &w, EPS, unit_offset).unwrap();
            let got = rms_norm_bwd(&dy, &w, unit_offset, &saved).unwrap();
            assert_close(&got, want, 1e-5, 1e-4, "rms_norm dx vs autograd");
        }
    }

    #[test]
    fn backward_matches_finite_differences_f64() {
        for unit_offset in [false, true] {
            let x = rand_tensor(6, (3, 7), DType::F64);
            let w = rand_tensor(7, 7, DType::F64);
            let dy = rand_tensor(8, (3, 7), DType::F64);
            // Large eps keeps the function smooth at this tiny width; the formula is the same.
            let eps = 1e-2;
            let (_, saved) = rms_norm_fwd(&x, &w, eps, unit_offset).unwrap();
            let got = rms_norm_bwd(&dy, &w, unit_offset, &saved).unwrap();
            let want = fd_grad(
                |x| Ok(rms_norm_fwd(x, &w, eps, unit_offset)?.0),
                &x,
                &dy,
                1e-5,
            );
            assert_close(&got, &want, 1e-8, 1e-6, "rms_norm dx vs finite differences");
        }
    }

    #[test]
    fn backward_takes_an_f32_rstd_with_bf16_inputs() {
        // The CUDA forward saves rstd in f32 whatever x's dtype; the candle backward must
        // accept that state (e.g. when the kernels are switched off between the passes).
        let x = rand_tensor(11, (3, 32), DType::BF16);
        let w = rand_tensor(12, 32, DType::BF16);
        let dy = rand_tensor(13, (3, 32), DType::BF16);
        let up = |t: &Tensor| t.to_dtype(DType::F32).unwrap();
        let (_, saved32) = rms_norm_fwd(&up(&x), &up(&w), EPS, true).unwrap();
        let want = rms_norm_bwd(&up(&dy), &up(&w), true, &saved32).unwrap();
        let mixed = RmsNormSaved { x: x.clone(), rstd: saved32.rstd.clone() };
        let got = rms_norm_bwd(&dy, &w, true, &mixed).unwrap();
        assert_eq!(got.dtype(), DType::BF16);
        assert_close(&got, &want, 2e-2, 2e-2, "bf16 dx with f32 rstd");
    }

    #[test]
    fn wrong_weight_shape_is_a_typed_error() {
        let x = rand_tensor(9, (2, 4), DType::F32);
        let w = rand_tensor(10, 5, DType::F32);
        let err = rms_norm_fwd(&x, &w, EPS, false).unwrap_err().to_string();
        assert!(
            err.contains("norm weight has shape [5], expected [4]"),
            "{err}"
        );
    }
}
