//! Gated MLP activation `act(gate) * up` (SwiGLU for Llama/Qwen/Mistral, GeGLU for Gemma).
//!
//! The backward recomputes `act(gate)` from `gate` instead of saving it: it is one
//! elementwise pass, and saving it would cost an intermediate-sized activation per layer.
//!
//! On a CUDA device, bf16 and f32 inputs go to the fused kernels of
//! [`crate::kernels::fused`] (forward and backward one pass each); the `*_reference`
//! functions are the candle formulation that every other device runs and that the kernels
//! are checked against.

use candle_core::Tensor;
use serde::Deserialize;

use crate::{Error, Result};

/// HF `hidden_act` / `hidden_activation` names, as `transformers.activations.ACT2FN` maps
/// them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Activation {
    /// `x * sigmoid(x)`; HF maps both "silu" and "swish" to `nn.SiLU`.
    #[serde(rename = "silu", alias = "swish")]
    Silu,
    /// `0.5 x (1 + tanh(sqrt(2/π) (x + 0.044715 x³)))`. "gelu_pytorch_tanh" and "gelu_new"
    /// are two implementations of this same formula in HF.
    #[serde(rename = "gelu_pytorch_tanh", alias = "gelu_new")]
    GeluTanh,
    /// `0.5 x (1 + erf(x / √2))`, HF "gelu" (`nn.GELU()` without approximation).
    #[serde(rename = "gelu")]
    Gelu,
}

const SQRT_2_OVER_PI: f64 = 0.797_884_560_802_865_4;
const GELU_TANH_COEF: f64 = 0.044_715;
const FRAC_1_SQRT_2PI: f64 = 0.398_942_280_401_432_7;

fn check_same_shape(op: &str, gate: &Tensor, up: &Tensor) -> Result<()> {
    if gate.dims() != up.dims() {
        return Err(Error::Msg(format!(
            "{op}: gate has shape {:?} but up has {:?}",
            gate.dims(),
            up.dims()
        )));
    }
    Ok(())
}

fn act_fwd(x: &Tensor, act: Activation) -> Result<Tensor> {
    Ok(match act {
        Activation::Silu => x.silu()?,
        // candle's `gelu` is the tanh approximation and `gelu_erf` the exact one.
        Activation::GeluTanh => x.gelu()?,
        Activation::Gelu => x.gelu_erf()?,
    })
}

/// `act(x)` and `act'(x)` from shared intermediates.
fn act_and_grad(x: &Tensor, act: Activation) -> Result<(Tensor, Tensor)> {
    match act {
        Activation::Silu => {
            // σ from exp(-x): overflow to +inf for very negative x gives σ = 0, as it should.
            let sig = x.neg()?.exp()?.affine(1.0, 1.0)?.recip()?;
            let y = (x * &sig)?;
            // d/dx x σ(x) = σ (1 + x (1 - σ))
            let dy = (&sig * (x * sig.affine(-1.0, 1.0)?)?.affine(1.0, 1.0)?)?;
            Ok((y, dy))
        }
        Activation::GeluTanh => {
            let x2 = x.sqr()?;
            let inner = (x * x2.affine(GELU_TANH_COEF, 1.0)?)?.affine(SQRT_2_OVER_PI, 0.0)?;
            let t = inner.tanh()?;
            let half_1pt = t.affine(0.5, 0.5)?;
            let y = (x * &half_1pt)?;
            // d/dx = ½(1 + t) + ½ x (1 - t²) √(2/π) (1 + 3c x²)
            let dinner = x2.affine(3.0 * GELU_TANH_COEF * SQRT_2_OVER_PI, SQRT_2_OVER_PI)?;
            let sech2 = t.sqr()?.affine(-1.0, 1.0)?;
            let dy = (half_1pt + (x * sech2)?.affine(0.5, 0.0)?.mul(&dinner)?)?;
            Ok((y, dy))
        }
        Activation::Gelu => {
            let cdf = x
                .affine(std::f64::consts::FRAC_1_SQRT_2, 0.0)?
                .erf()?
                .affine(0.5, 0.5)?;
            let y = (x * &cdf)?;
            // d/dx = Φ(x) + x φ(x), φ(x) = exp(-x²/2) / √(2π)
            let pdf = x
                .sqr()?
                .affine(-0.5, 0.0)?
                .exp()?
                .affine(FRAC_1_SQRT_2PI, 0.0)?;
            let dy = (cdf + (x * pdf)?)?;
            Ok((y, dy))
        }
    }
}

/// `act(gate) * up`, both of the same shape.
pub fn glu_fwd(gate: &Tensor, up: &Tensor, act: Activation) -> Result<Tensor> {
    check_same_shape("glu_fwd", gate, up)?;
    #[cfg(feature = "cuda")]
    if crate::kernels::fused::applies(&[gate, up]) {
        return crate::kernels::fused::glu_fwd(gate, up, act);
    }
    glu_fwd_reference(gate, up, act)
}

/// [`glu_fwd`] as candle ops on any device, in the inputs' dtype.
pub fn glu_fwd_reference(gate: &Tensor, up: &Tensor, act: Activation) -> Result<Tensor> {
    check_same_shape("glu_fwd", gate, up)?;
    Ok((act_fwd(gate, act)? * up)?)
}

fn check_bwd(dy: &Tensor, gate: &Tensor, up: &Tensor) -> Result<()> {
    check_same_shape("glu_bwd", gate, up)?;
    check_same_shape("glu_bwd", gate, dy).map_err(|_| {
        Error::Msg(format!(
            "glu_bwd: dy has shape {:?} but gate has {:?}",
            dy.dims(),
            gate.dims()
        ))
    })
}

/// Returns `(dgate, dup)` for `y = act(gate) * up`.
pub fn glu_bwd(
    dy: &Tensor,
    gate: &Tensor,
    up: &Tensor,
    act: Activation,
) -> Result<(Tensor, Tensor)> {
    check_bwd(dy, gate, up)?;
    #[cfg(feature = "cuda")]
    if crate::kernels::fused::applies(&[dy, gate, up]) {
        return crate::kernels::fused::glu_bwd(dy, gate, up, act);
    }
    glu_bwd_reference(dy, gate, up, act)
}

/// [`glu_bwd`] that may write dgate over `gate` and dup over `up` (the fused CUDA kernel
/// does; elsewhere new tensors are returned): for a backward that no longer needs them.
pub fn glu_bwd_in_place(dy: &Tensor, gate: Tensor, up: Tensor, act: Activation) -> Result<(Tensor, Tensor)> {
    check_bwd(dy, &gate, &up)?;
    #[cfg(feature = "cuda")]
    if crate::kernels::fused::applies(&[dy, &gate, &up]) && gate.is_contiguous() && up.is_contiguous() {
        return crate::kernels::fused::glu_bwd_in_place(dy, gate, up, act);
    }
    glu_bwd_reference(dy, &gate, &up, act)
}

/// [`glu_bwd`] as candle ops on any device, in the inputs' dtype.
pub fn glu_bwd_reference(
    dy: &Tensor,
    gate: &Tensor,
    up: &Tensor,
    act: Activation,
) -> Result<(Tensor, Tensor)> {
    check_bwd(dy, gate, up)?;
    let (a, da) = act_and_grad(gate, act)?;
    let dgate = (dy * up)?.mul(&da)?;
    let dup = (dy * a)?;
    Ok((dgate, dup))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::{assert_close, assert_close_vec, fd_grad, rand_tensor, to_f64_vec};
    use candle_core::{DType, Var};

    const ALL: [Activation; 3] = [Activation::Silu, Activation::GeluTanh, Activation::Gelu];

    /// Scalar formulas in f64, independent of candle's unary kernels.
    fn naive_act(x: f64, act: Activation) -> f64 {
        match act {
            Activation::Silu => x / (1.0 + (-x).exp()),
            Activation::GeluTanh => {
                let pi = std::f64::consts::PI;
                0.5 * x * (1.0 + ((2.0 / pi).sqrt() * (x + 0.044715 * x.powi(3))).tanh())
            }
            Activation::Gelu => 0.5 * x * (1.0 + erf(x / 2f64.sqrt())),
        }
    }

    /// erf by its Taylor series, accurate to f64 precision for |x| < 3 (all test inputs).
    fn erf(x: f64) -> f64 {
        let (mut term, mut sum) = (x, x);
        for n in 1..80 {
            term *= -x * x / n as f64;
            sum += term / (2 * n + 1) as f64;
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    }

    /// The same activation built from primitive candle ops, so that autograd derives it.
    fn autograd_act(x: &Tensor, act: Activation) -> Tensor {
        match act {
            Activation::Silu => (x / (x.neg().unwrap().exp().unwrap() + 1.0).unwrap()).unwrap(),
            Activation::GeluTanh => {
                let cube = (x.sqr().unwrap() * x).unwrap();
                let inner = ((x + (cube * 0.044715).unwrap()).unwrap() * SQRT_2_OVER_PI).unwrap();
                ((x * 0.5).unwrap() * (inner.tanh().unwrap() + 1.0).unwrap()).unwrap()
            }
            Activation::Gelu => {
                let e = (x * std::f64::consts::FRAC_1_SQRT_2)
                    .unwrap()
                    .erf()
                    .unwrap();
                ((x * 0.5).unwrap() * (e + 1.0).unwrap()).unwrap()
            }
        }
    }

    #[test]
    fn forward_matches_scalar_formulas() {
        for act in ALL {
            let gate = (rand_tensor(1, (3, 40), DType::F32) * 3.0).unwrap();
            let up = rand_tensor(2, (3, 40), DType::F32);
            let y = glu_fwd(&gate, &up, act).unwrap();
            let want: Vec<f64> = to_f64_vec(&gate)
                .iter()
                .zip(to_f64_vec(&up))
                .map(|(&g, u)| naive_act(g, act) * u)
                .collect();
            assert_close_vec(
                &to_f64_vec(&y),
                &want,
                1e-6,
                1e-5,
                &format!("{act:?} forward"),
            );
        }
    }

    #[test]
    fn backward_matches_candle_autograd() {
        for act in ALL {
            let gate =
                Var::from_tensor(&(rand_tensor(3, (4, 24), DType::F32) * 4.0).unwrap()).unwrap();
            let up = Var::from_tensor(&rand_tensor(4, (4, 24), DType::F32)).unwrap();
            let dy = rand_tensor(5, (4, 24), DType::F32);
            let y = (autograd_act(gate.as_tensor(), act) * up.as_tensor()).unwrap();
            let grads = (y * &dy).unwrap().sum_all().unwrap().backward().unwrap();

            let (dgate, dup) = glu_bwd(&dy, &gate, &up, act).unwrap();
            let what = format!("{act:?}");
            assert_close(
                &dgate,
                grads.get(&gate).unwrap(),
                1e-5,
                1e-4,
                &format!("{what} dgate"),
            );
            assert_close(
                &dup,
                grads.get(&up).unwrap(),
                1e-5,
                1e-4,
                &format!("{what} dup"),
            );
        }
    }

    #[test]
    fn backward_matches_finite_differences_f64() {
        for act in ALL {
            let gate = (rand_tensor(6, (2, 9), DType::F64) * 3.0).unwrap();
            let up = rand_tensor(7, (2, 9), DType::F64);
            let dy = rand_tensor(8, (2, 9), DType::F64);
            let (dgate, dup) = glu_bwd(&dy, &gate, &up, act).unwrap();
            let fd_gate = fd_grad(|g| glu_fwd(g, &up, act), &gate, &dy, 1e-5);
            let fd_up = fd_grad(|u| glu_fwd(&gate, u, act), &up, &dy, 1e-5);
            let what = format!("{act:?}");
            assert_close(&dgate, &fd_gate, 1e-8, 1e-6, &format!("{what} dgate vs fd"));
            assert_close(&dup, &fd_up, 1e-8, 1e-6, &format!("{what} dup vs fd"));
        }
    }

    #[test]
    fn silu_backward_is_finite_for_large_inputs() {
        let gate = Tensor::new(
            &[-200f32, -90.0, 0.0, 90.0, 200.0],
            &candle_core::Device::Cpu,
        )
        .unwrap();
        let up = gate.ones_like().unwrap();
        let (dgate, _) = glu_bwd(&up, &gate, &up, Activation::Silu).unwrap();
        assert_close_vec(
            &to_f64_vec(&dgate),
            &[0.0, 0.0, 0.5, 1.0, 1.0],
            1e-6,
            0.0,
            "silu' tails",
        );
    }

    #[test]
    fn deserialises_hf_names() {
        let parse = |s: &str| serde_json::from_str::<Activation>(&format!("\"{s}\""));
        assert_eq!(parse("silu").unwrap(), Activation::Silu);
        assert_eq!(parse("swish").unwrap(), Activation::Silu);
        assert_eq!(parse("gelu_pytorch_tanh").unwrap(), Activation::GeluTanh);
        assert_eq!(parse("gelu_new").unwrap(), Activation::GeluTanh);
        assert_eq!(parse("gelu").unwrap(), Activation::Gelu);
        let err = parse("relu2").unwrap_err().to_string();
        assert!(err.contains("relu2"), "{err}");
    }

    #[test]
    fn mismatched_shapes_are_typed_errors() {
        let a = rand_tensor(9, (2, 3), DType::F32);
        let b = rand_tensor(10, (3, 2), DType::F32);
        let err = glu_fwd(&a, &b, Activation::Silu).unwrap_err().to_string();
        assert!(
            err.contains("gate has shape [2, 3] but up has [3, 2]"),
            "{err}"
        );
        let err = glu_bwd(&b, &a, &a, Activation::Silu)
            .unwrap_err()
            .to_string();
        assert!(err.contains("dy has shape [3, 2]"), "{err}");
    }
}
