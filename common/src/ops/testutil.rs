//! Shared pieces of the op tests: seeded random tensors, a closeness assertion that reports
//! the worst element, and a central finite-difference gradient.

use candle_core::{DType, Device, Shape, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Values uniform in `[-scale, scale)`, reproducible from `seed`.
pub(crate) fn rand_vec(seed: u64, n: usize, scale: f64) -> Vec<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

pub(crate) fn rand_tensor<S: Into<Shape>>(seed: u64, shape: S, dtype: DType) -> Tensor {
    let shape = shape.into();
    let v = rand_vec(seed, shape.elem_count(), 1.0);
    Tensor::from_vec(v, shape, &Device::Cpu)
        .and_then(|t| t.to_dtype(dtype))
        .expect("random tensor")
}

pub(crate) fn to_f64_vec(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f64>())
        .expect("tensor to vec")
}

/// Panics unless `|got - want| <= atol + rtol * |want|` everywhere, naming the worst element.
pub(crate) fn assert_close(got: &Tensor, want: &Tensor, atol: f64, rtol: f64, what: &str) {
    assert_eq!(got.dims(), want.dims(), "{what}: shapes differ");
    assert_close_vec(&to_f64_vec(got), &to_f64_vec(want), atol, rtol, what);
}

pub(crate) fn assert_close_vec(got: &[f64], want: &[f64], atol: f64, rtol: f64, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    let mut worst: Option<(usize, f64)> = None;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!(g.is_finite(), "{what}: element {i} is {g}");
        let excess = (g - w).abs() - (atol + rtol * w.abs());
        if excess > 0.0 && worst.is_none_or(|(_, e)| excess > e) {
            worst = Some((i, excess));
        }
    }
    if let Some((i, _)) = worst {
        panic!(
            "{what}: element {i} is {} but expected {} (atol {atol}, rtol {rtol})",
            got[i], want[i]
        );
    }
}

/// Central finite-difference gradient of `L(x) = sum(f(x) * dy)` with respect to `x`.
/// Meant for small f64 tensors: it evaluates `f` twice per element of `x`.
pub(crate) fn fd_grad(
    f: impl Fn(&Tensor) -> crate::Result<Tensor>,
    x: &Tensor,
    dy: &Tensor,
    h: f64,
) -> Tensor {
    let base = to_f64_vec(x);
    let loss = |v: &[f64]| -> f64 {
        let xt = Tensor::from_vec(v.to_vec(), x.shape(), x.device()).expect("perturbed x");
        let y = f(&xt).expect("function under finite differences");
        y.mul(dy)
            .and_then(|t| t.sum_all())
            .and_then(|t| t.to_scalar::<f64>())
            .expect("loss")
    };
    let mut grad = Vec::with_capacity(base.len());
    let mut v = base.clone();
    for i in 0..base.len() {
        v[i] = base[i] + h;
        let plus = loss(&v);
        v[i] = base[i] - h;
        let minus = loss(&v);
        v[i] = base[i];
        grad.push((plus - minus) / (2.0 * h));
    }
    Tensor::from_vec(grad, x.shape(), x.device()).expect("fd grad")
}
