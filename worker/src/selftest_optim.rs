//! GPU checks of the device-resident optimizer path (feature `cuda`), for `qdistill
//! selftest`: the AdamW kernel against the host AdamW, the gradient norm against the host's
//! f64 norm, the LoRA gradient GEMM against a naive f64 xᵀ·y, the master → compute-dtype
//! cast against candle's `to_dtype`, and whole training steps (micro-steps, clipping, AdamW,
//! checkpoint resume) on the device against the same steps on the CPU. Plus a benchmark of
//! the optimizer step at the size of Llama-3-8B's LoRA r16 adapters.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::path::Path;

use anyhow::{anyhow, Context};
use candle_core::{DType, Device, Tensor};
use qdistill_common::data::Batch;
use qdistill_common::kernels::optim::{cast_f32_into, gemm_tn_accumulate, sum_of_squares};
use qdistill_common::kernels::{cuda_device, time_on_stream};
use qdistill_common::lora::{LoraGrads, LoraParams, LoraSpec, ALL_LINEAR};
use qdistill_common::loss::{KdLoss, LossConfig};
use qdistill_common::model::decoder::LoadOptions;
use qdistill_common::model::{Model, ModelConfig};
use qdistill_common::optim::{clip_coef, clip_grad_norm, grad_norm, lr_at, AdamW, AdamWConfig, SchedulerType};
use qdistill_common::weights::WeightStore;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::trainer::{dropout_seed, teacher_hidden, DeviceBatch, Student, Teacher};

/// One named check: pass/fail and a line that says what was compared and by how much it
/// differed, or an error.
pub type Check = (String, anyhow::Result<(bool, String)>);

/// LoRA r16 on all seven linears of Llama-3-8B: the parameter count the benchmark uses.
pub const LLAMA3_8B_R16_PARAMS: usize = 41_943_040;

/// Every check of the device optimizer path; `fixtures` is the tests/fixtures directory.
pub fn optim_checks(device: &Device, fixtures: &Path) -> Vec<Check> {
    let mut out: Vec<Check> = Vec::new();
    let mut run = |name: String, f: &dyn Fn() -> anyhow::Result<(bool, String)>| {
        let res = std::panic::catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|p| {
            let msg = p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()));
            Err(anyhow!("panicked: {}", msg.unwrap_or_default()))
        });
        out.push((name, res));
    };
    run("optim: AdamW kernel vs host AdamW (6 steps, weight decay, clipping, state reload)".into(), &|| check_adamw(device));
    run(
        "optim: 8-bit AdamW kernel vs host 8-bit AdamW (6 steps, fp32 + 8-bit tensors, clipping, state reload)".into(),
        &|| check_adamw_8bit(device),
    );
    run("optim: grad norm kernel vs host f64 norm".into(), &|| check_norm(device));
    for dtype in [DType::BF16, DType::F16, DType::F32] {
        run(format!("optim: LoRA grad GEMM {dtype:?} vs f64 xᵀ·y"), &|| check_gemm(device, dtype));
    }
    for dtype in [DType::BF16, DType::F16, DType::F32] {
        run(format!("optim: f32 master -> {dtype:?} adapter cast vs candle to_dtype"), &|| check_cast(device, dtype));
    }
    let llama = fixtures.join("models").join("llama");
    run("optim: llama 3 train steps on device vs CPU (grads, norms, adapters, moments)".into(), &|| {
        check_train_steps(device, &llama)
    });
    out
}

/// max |got − want| over max |want|: the error on the scale of the whole buffer, so that
/// entries near zero are not over-weighted. Non-finite or mismatched input is an error.
fn max_rel(got: &[f32], want: &[f32]) -> anyhow::Result<f64> {
    if got.len() != want.len() {
        return Err(anyhow!("{} values vs {} in the reference", got.len(), want.len()));
    }
    if let Some(i) = got.iter().position(|x| !x.is_finite()) {
        return Err(anyhow!("non-finite value {} at index {i}", got[i]));
    }
    let scale = want.iter().fold(0f64, |m, &x| m.max(x.abs() as f64)).max(f64::MIN_POSITIVE);
    Ok(got.iter().zip(want).fold(0f64, |m, (&g, &w)| m.max((g as f64 - w as f64).abs())) / scale)
}

fn bitwise_equal(a: &[f32], b: &[f32]) -> usize {
    a.iter().zip(b).filter(|(x, y)| x.to_bits() == y.to_bits()).count()
}

fn rel(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(f64::MIN_POSITIVE)
}

/// Six AdamW steps on 1M random parameters, on the device (kernel norm, clipping factor,
/// kernel step) and on the host (clip_grad_norm, AdamW::step), with warmup/linear lr values
/// (the first is 0), weight decay, gradients whose norms are below and far above max_norm,
/// and exact-zero gradients. Halfway the device optimizer is rebuilt from its own
/// checkpoint state (download, then upload into a fresh resident optimizer). The kernel
/// does the host's f32 operations in the host's order, so agreement should be bitwise.
fn check_adamw(device: &Device) -> anyhow::Result<(bool, String)> {
    let dev = cuda_device(device)?;
    let n = 1_000_003; // odd: exercises the kernel's scalar tail
    let config = AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 };
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut p_host: Vec<f32> = (0..n).map(|_| rng.random_range(-0.1f32..0.1)).collect();
    let mut p_dev = dev.clone_htod(&p_host)?;
    let mut g_dev = dev.alloc_zeros::<f32>(n)?;
    let mut host = AdamW::new(n, config);
    let mut gpu = AdamW::new(n, config);
    gpu.make_resident(device)?;
    let max_norm = 1.0;
    // Gradient norms ≈ scale·√(n/3): 0.06, 577, 0.03, 5774, 0.02, 289.
    let scales = [1e-4f32, 1.0, 5e-5, 10.0, 3e-5, 0.5];
    let total = scales.len() as u64;
    let (mut worst_norm, mut clipped) = (0f64, 0);
    for (step, &scale) in scales.iter().enumerate() {
        let mut g: Vec<f32> = (0..n).map(|_| scale * rng.random_range(-1f32..1.0)).collect();
        for x in g.iter_mut().step_by(97) {
            *x = 0.0;
        }
        let lr = lr_at(SchedulerType::Linear, 1e-3, step as u64, 1, total);
        dev.memcpy_htod(&g, &mut g_dev)?;
        let norm_dev = sum_of_squares(dev, &g_dev)?.sqrt();
        let norm_host = clip_grad_norm(&mut g, max_norm);
        worst_norm = worst_norm.max(rel(norm_dev, norm_host));
        let coef = clip_coef(norm_dev, max_norm);
        clipped += usize::from(coef < 1.0);
        host.step(&mut p_host, &g, lr)?;
        gpu.step_cuda(&mut p_dev, &g_dev, lr, coef)?;
        if step == 2 {
            let state: HashMap<String, Tensor> = gpu.state_tensors()?.into_iter().collect();
            gpu = AdamW::new(n, config);
            gpu.make_resident(device)?;
            gpu.load_state(&state, Path::new("device AdamW state"))?;
        }
    }
    let p_got = dev.clone_dtoh(&p_dev)?;
    let state: HashMap<String, Tensor> = gpu.state_tensors()?.into_iter().collect();
    let moment = |name: &str| -> anyhow::Result<Vec<f32>> {
        Ok(state.get(name).ok_or_else(|| anyhow!("no {name} in the state"))?.to_vec1::<f32>()?)
    };
    let (m_got, v_got) = (moment("exp_avg")?, moment("exp_avg_sq")?);
    let e_p = max_rel(&p_got, &p_host)?;
    let e_m = max_rel(&m_got, host.exp_avg())?;
    let e_v = max_rel(&v_got, host.exp_avg_sq())?;
    let tol = 1e-6;
    let pass = e_p <= tol
        && e_m <= tol
        && e_v <= tol
        && worst_norm <= 1e-9
        && gpu.step_count() == host.step_count()
        && clipped > 0
        && clipped < scales.len();
    Ok((
        pass,
        format!(
            "n={n}, {clipped}/{} steps clipped, step count {} vs {}: params rel err {e_p:.1e} ({} bitwise), exp_avg {e_m:.1e} ({}), \
             exp_avg_sq {e_v:.1e} ({}) (tol {tol:.0e}); norm rel err {worst_norm:.1e} (tol 1e-9)",
            scales.len(),
            gpu.step_count(),
            host.step_count(),
            bitwise_equal(&p_got, &p_host),
            bitwise_equal(&m_got, host.exp_avg()),
            bitwise_equal(&v_got, host.exp_avg_sq()),
        ),
    ))
}

/// Six steps of AdamW with 8-bit moments on the device and on the host, over parameter
/// tensors that exercise every case of the layout: below min_8bit_size (fp32 moments), a
/// multiple of the 256-value block, and partial last blocks; clipping on some steps, a
/// zero-lr first step, exact-zero gradients, and a reload of the device state from its
/// checkpoint tensors halfway. The kernel does the host's f32 operations in the host's
/// order and the same nearest-code search, so parameters, codes, absmax and fp32 moments
/// must agree bitwise.
fn check_adamw_8bit(device: &Device) -> anyhow::Result<(bool, String)> {
    use qdistill_common::optim8bit::MIN_8BIT_SIZE;
    let dev = cuda_device(device)?;
    let lens = [300, 65_536, 4096, 5000, 1000, 70_001];
    let n: usize = lens.iter().sum();
    let config = AdamWConfig { beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 };
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let mut p_host: Vec<f32> = (0..n).map(|_| rng.random_range(-0.1f32..0.1)).collect();
    let mut p_dev = dev.clone_htod(&p_host)?;
    let mut g_dev = dev.alloc_zeros::<f32>(n)?;
    let mut host = AdamW::new_8bit(&lens, MIN_8BIT_SIZE, config);
    let mut gpu = AdamW::new_8bit(&lens, MIN_8BIT_SIZE, config);
    gpu.make_resident(device)?;
    let scales = [1e-4f32, 1.0, 5e-5, 10.0, 3e-5, 0.5];
    let total = scales.len() as u64;
    let mut clipped = 0;
    for (step, &scale) in scales.iter().enumerate() {
        // Magnitudes spread over four decades within each block, so codes across the map
        // are used.
        let mut g: Vec<f32> = (0..n).map(|i| scale * rng.random_range(-1f32..1.0) * 10f32.powi(-((i % 5) as i32))).collect();
        for x in g.iter_mut().step_by(97) {
            *x = 0.0;
        }
        let lr = lr_at(SchedulerType::Linear, 1e-3, step as u64, 1, total);
        dev.memcpy_htod(&g, &mut g_dev)?;
        let norm = clip_grad_norm(&mut g, 1.0);
        let coef = clip_coef(sum_of_squares(dev, &g_dev)?.sqrt(), 1.0);
        if coef != clip_coef(norm, 1.0) {
            return Ok((false, format!("step {step}: clipping factor {coef} on the device vs {} on the host", clip_coef(norm, 1.0))));
        }
        clipped += usize::from(coef < 1.0);
        host.step(&mut p_host, &g, lr)?;
        gpu.step_cuda(&mut p_dev, &g_dev, lr, coef)?;
        if step == 2 {
            let state: HashMap<String, Tensor> = gpu.state_tensors()?.into_iter().collect();
            gpu = AdamW::new_8bit(&lens, MIN_8BIT_SIZE, config);
            gpu.make_resident(device)?;
            gpu.load_state(&state, Path::new("device 8-bit AdamW state"))?;
        }
    }
    let p_got = dev.clone_dtoh(&p_dev)?;
    let state: HashMap<String, Tensor> = gpu.state_tensors()?.into_iter().collect();
    let want = host.moments_8bit().ok_or_else(|| anyhow!("the host optimizer has no 8-bit state"))?;
    let bytes = |name: &str| -> anyhow::Result<Vec<u8>> {
        Ok(state.get(name).ok_or_else(|| anyhow!("no {name} in the device state"))?.to_vec1::<u8>()?)
    };
    let floats = |name: &str| -> anyhow::Result<Vec<f32>> {
        Ok(state.get(name).ok_or_else(|| anyhow!("no {name} in the device state"))?.to_vec1::<f32>()?)
    };
    let code_diff = |a: &[u8], b: &[u8]| a.iter().zip(b).filter(|(x, y)| x != y).count() + a.len().abs_diff(b.len());
    let f32_diff = |a: &[f32], b: &[f32]| a.len().max(b.len()) - bitwise_equal(a, b);
    let d_p = f32_diff(&p_got, &p_host);
    let (d_s1, d_s2) = (code_diff(&bytes("state1")?, &want.state1), code_diff(&bytes("state2")?, &want.state2));
    let (d_a1, d_a2) = (f32_diff(&floats("absmax1")?, &want.absmax1), f32_diff(&floats("absmax2")?, &want.absmax2));
    let (d_m, d_v) = (f32_diff(&floats("exp_avg")?, &want.exp_avg), f32_diff(&floats("exp_avg_sq")?, &want.exp_avg_sq));
    let e_p = max_rel(&p_got, &p_host)?;
    let pass = d_p + d_s1 + d_s2 + d_a1 + d_a2 + d_m + d_v == 0
        && gpu.step_count() == host.step_count()
        && clipped > 0
        && clipped < scales.len();
    Ok((
        pass,
        format!(
            "n={n} in tensors {lens:?} ({} 8-bit values, {} blocks), {clipped}/{} steps clipped, step count {} vs {}; \
             values differing from the host (all must be 0): params {d_p} (max rel err {e_p:.1e}), state1 codes {d_s1}, \
             state2 codes {d_s2}, absmax1 {d_a1}, absmax2 {d_a2}, fp32 exp_avg {d_m}, fp32 exp_avg_sq {d_v}",
            want.layout.n_8bit,
            want.layout.n_absmax,
            scales.len(),
            gpu.step_count(),
            host.step_count(),
        ),
    ))
}

/// The device norm (f64 accumulation, fixed order) against the host's sequential f64 norm
/// at sizes that hit every tail of the kernel, up to the 8B adapter size; twice each, which
/// must agree bitwise; and a buffer with one inf / one NaN, whose norm must be non-finite.
fn check_norm(device: &Device) -> anyhow::Result<(bool, String)> {
    let dev = cuda_device(device)?;
    let mut rng = ChaCha8Rng::seed_from_u64(12);
    let (mut worst, mut deterministic) = (0f64, true);
    for n in [1usize, 3, 4, 5, 1023, 4099, 1_000_003, LLAMA3_8B_R16_PARAMS] {
        // Magnitudes over six decades, as gradients of different modules have.
        let v: Vec<f32> = (0..n).map(|_| rng.random_range(-1f32..1.0) * 10f32.powi(rng.random_range(-4..2))).collect();
        let d = dev.clone_htod(&v)?;
        let a = sum_of_squares(dev, &d)?.sqrt();
        let b = sum_of_squares(dev, &d)?.sqrt();
        deterministic &= a.to_bits() == b.to_bits();
        worst = worst.max(rel(a, grad_norm(&v)));
    }
    let mut v = vec![0.5f32; 4099];
    v[2049] = f32::INFINITY;
    let inf = sum_of_squares(dev, &dev.clone_htod(&v)?)?.sqrt();
    v[2049] = f32::NAN;
    let nan = sum_of_squares(dev, &dev.clone_htod(&v)?)?.sqrt();
    let tol = 1e-9;
    Ok((
        worst <= tol && deterministic && inf.is_infinite() && nan.is_nan(),
        format!("sizes 1..{LLAMA3_8B_R16_PARAMS}: max rel err {worst:.1e} (tol {tol:.0e}); repeat bitwise equal: {deterministic}; with an inf: {inf}; with a NaN: {nan}"),
    ))
}

/// `gemm_tn_accumulate` twice into a slice in the middle of a buffer (so beta = 1
/// accumulates), with x a transposed (non-contiguous) view and y a view at a non-zero
/// offset, against acc₀ + 2·α·xᵀ·y in f64 from the same rounded inputs. The error is
/// measured against the a-priori bound of f32 accumulation (|acc₀| + 2|α|·Σ|x||y|);
/// everything outside the slice must be untouched.
fn check_gemm(device: &Device, dtype: DType) -> anyhow::Result<(bool, String)> {
    let dev = cuda_device(device)?;
    let (n, p, q, offset, tail) = (300usize, 16usize, 200usize, 37usize, 11usize);
    let alpha = 1.5f32;
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    let mut rand_vec = |len: usize| -> Vec<f32> { (0..len).map(|_| rng.random_range(-1f32..1.0)).collect() };
    let xt = Tensor::from_vec(rand_vec(p * n), (p, n), device)?.to_dtype(dtype)?;
    let x = xt.t()?; // [n, p], not contiguous
    let y_big = Tensor::from_vec(rand_vec((n + 5) * q), (n + 5, q), device)?.to_dtype(dtype)?;
    let y = y_big.narrow(0, 5, n)?; // [n, q] at a non-zero storage offset
    let acc0 = rand_vec(offset + p * q + tail);
    let mut acc = dev.clone_htod(&acc0)?;
    gemm_tn_accumulate(&mut acc, offset, &x, &y, alpha)?;
    gemm_tn_accumulate(&mut acc, offset, &x, &y, alpha)?;
    let got = dev.clone_dtoh(&acc)?;
    let xs = x.to_dtype(DType::F64)?.to_vec2::<f64>()?;
    let ys = y.to_dtype(DType::F64)?.to_vec2::<f64>()?;
    let mut worst = 0f64;
    for i in 0..p {
        for j in 0..q {
            let (mut dot, mut mag) = (0f64, 0f64);
            for k in 0..n {
                dot += xs[k][i] * ys[k][j];
                mag += (xs[k][i] * ys[k][j]).abs();
            }
            let a0 = acc0[offset + i * q + j] as f64;
            let want = a0 + 2.0 * alpha as f64 * dot;
            let bound = a0.abs() + 2.0 * alpha.abs() as f64 * mag;
            worst = worst.max((got[offset + i * q + j] as f64 - want).abs() / bound);
        }
    }
    let outside_ok = got[..offset].iter().zip(&acc0[..offset]).all(|(a, b)| a.to_bits() == b.to_bits())
        && got[offset + p * q..].iter().zip(&acc0[offset + p * q..]).all(|(a, b)| a.to_bits() == b.to_bits());
    // Recursive f32 summation of n products: |error| ≤ ~n·2⁻²⁴ of the magnitude sum.
    let tol = 2.0 * n as f64 * f32::EPSILON as f64 / 2.0;
    Ok((
        worst <= tol && outside_ok,
        format!("[{p}x{q}] += 2·{alpha}·xᵀ·y over N={n}: max err {worst:.1e} of the magnitude bound (tol {tol:.1e}); values outside the slice untouched: {outside_ok}"),
    ))
}

/// Adapters made resident in `dtype`: the views `to_device` hands out must equal, bit for
/// bit, candle's cast of the same fp32 values (the host upload path), including values on
/// bf16/f16 rounding ties; after `update_on_device`, views taken before the update must
/// show the new values (the refresh is in place), and `host_values` must return them.
fn check_cast(device: &Device, dtype: DType) -> anyhow::Result<(bool, String)> {
    let dev = cuda_device(device)?;
    let spec = LoraSpec { r: 4, lora_alpha: 8.0, lora_dropout: 0.0, use_rslora: false, target_modules: vec!["q_proj".into()] };
    let modules = vec![("m.0".to_string(), 37, 29), ("m.1".to_string(), 64, 8), ("m.2".to_string(), 5, 3)];
    let mut params = LoraParams::init(&spec, &modules, 3);
    let mut rng = ChaCha8Rng::seed_from_u64(14);
    let mut values = |len: usize| -> Vec<f32> {
        (0..len)
            .map(|i| match i % 7 {
                0 => 1.0 + 2f32.powi(-8),          // bf16 tie: rounds to even (1.0)
                1 => -(1.0 + 3.0 * 2f32.powi(-8)), // bf16 tie: rounds to even (away)
                2 => 1.0 + 2f32.powi(-11),         // f16 tie
                _ => rng.random_range(-1f32..1.0) * 10f32.powi(rng.random_range(-6..3)),
            })
            .collect()
    };
    params.values = values(params.len());
    let want = flat_views(&params.to_device(device, dtype)?.ab)?;
    params.make_resident(device, dtype)?;
    let views = params.to_device(device, dtype)?;
    let got = flat_views(&views.ab)?;
    let same_initial = bitwise_equal(&got, &want) == want.len();
    let new_values = values(params.len());
    params.update_on_device(|master| Ok(dev.memcpy_htod(&new_values, master)?))?;
    let want_new = Tensor::from_slice(&new_values, new_values.len(), device)?.to_dtype(dtype)?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let got_new = flat_views(&views.ab)?;
    let same_after = bitwise_equal(&got_new, &want_new) == want_new.len();
    let host_back = params.host_values()?.into_owned();
    params.to_host()?;
    let master_back = bitwise_equal(&host_back, &new_values) == new_values.len()
        && !params.is_resident()
        && bitwise_equal(&params.values, &new_values) == new_values.len();
    Ok((
        same_initial && same_after && master_back,
        format!(
            "{} values: resident views = candle cast: {same_initial}; old views after an update = cast of the new values: {same_after}; \
             master read back (host_values, to_host) exactly: {master_back}",
            want.len()
        ),
    ))
}

/// The per-module views concatenated in layout order (A then B per entry), as f32.
fn flat_views(ab: &[(Tensor, Tensor)]) -> anyhow::Result<Vec<f32>> {
    let mut out = Vec::new();
    for (a, b) in ab {
        for t in [a, b] {
            out.extend(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?);
        }
    }
    Ok(out)
}

/// One host batch of random tokens: rows × cols, labels shifted with -100 at each row's
/// end and on a few prompt-like positions.
fn random_batch(rng: &mut ChaCha8Rng, rows: usize, cols: usize, vocab: usize) -> Batch {
    let input_ids: Vec<u32> = (0..rows * cols).map(|_| rng.random_range(0..vocab as u32)).collect();
    let labels: Vec<i64> = (0..rows * cols)
        .map(|i| if i % cols == cols - 1 || i % cols < 2 { -100 } else { input_ids[i + 1] as i64 })
        .collect();
    let n_target_tokens = labels.iter().filter(|&&l| l >= 0).count();
    Batch {
        input_ids,
        labels,
        position_ids: (0..rows).flat_map(|_| 0..cols as u32).collect(),
        segment_ids: vec![1; rows * cols],
        batch: rows,
        seq_len: cols,
        n_target_tokens,
        sample_ids: (0..rows as u64).collect(),
    }
}

/// The tiny llama fixture as an f32 student with LoRA r8 (dropout 0.1) on all linears,
/// random B (so every gradient path carries values), AdamW with weight decay, LwF
/// distillation loss and activation checkpointing.
fn fixture_student(dir: &Path, device: &Device) -> anyhow::Result<Student> {
    let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
    let store = WeightStore::open(dir)?;
    let opts = LoadOptions { keep_layers: None, nf4: false, double_quant: false, device: device.clone(), dtype: DType::F32 };
    let mut model = Model::load(&store, &cfg, &opts).with_context(|| format!("loading {}", dir.display()))?;
    let spec = LoraSpec {
        r: 8,
        lora_alpha: 16.0,
        lora_dropout: 0.1,
        use_rslora: false,
        target_modules: ALL_LINEAR.iter().map(|s| s.to_string()).collect(),
    };
    let modules = model.attach_lora(&spec)?;
    let mut params = LoraParams::init(&spec, &modules, 5);
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    for e in params.entries.clone() {
        for v in &mut params.values[e.b_offset..e.b_offset + e.out_features * spec.r] {
            *v = rng.random_range(-0.05..0.05);
        }
    }
    let grads = LoraGrads::zeros(&params);
    let opt = AdamW::new(params.len(), AdamWConfig { weight_decay: 0.01, ..AdamWConfig::default() });
    let loss = LossConfig {
        ce_weight: 1.0,
        kd_weight: 0.5,
        kd: KdLoss::ForwardKl,
        temperature: 2.0,
        chunk_tokens: 7,
        student_softcap: model.cfg.final_logit_softcapping,
    };
    Ok(Student { model, params, grads, opt, loss, checkpointing: true })
}

/// Micro-steps of optimizer step `step` (every batch of `micro`) on `s`.
fn micro_steps(s: &mut Student, micro: &[Batch], step: usize, device: &Device) -> anyhow::Result<()> {
    let n_target: usize = micro.iter().map(|b| b.n_target_tokens).sum();
    for (k, b) in micro.iter().enumerate() {
        let db = DeviceBatch::new(b, device)?;
        let h_t = teacher_hidden(&Teacher::Lwf, &s.model, &db)?;
        s.micro_step(&db, &Teacher::Lwf, h_t.as_ref(), 1.0 / n_target as f64, dropout_seed(7, step as u64, k as u64))?;
    }
    Ok(())
}

const TRAIN_STEPS: usize = 3;
const TRAIN_LR: f64 = 5e-3;

/// Optimizer step `step` after its micro-steps; returns the pre-clip norm.
fn optimizer_step(s: &mut Student, step: usize, max_norm: f64) -> anyhow::Result<f64> {
    let lr = lr_at(SchedulerType::Linear, TRAIN_LR, step as u64, 0, TRAIN_STEPS as u64);
    Ok(s.optimizer_step(lr, max_norm)?)
}

/// Per-tensor (each module's A and B) max relative error of `got` against `want`.
fn worst_per_tensor(params: &LoraParams, got: &[f32], want: &[f32]) -> anyhow::Result<f64> {
    let r = params.spec.r;
    let mut worst = 0f64;
    for e in &params.entries {
        for (off, len) in [(e.a_offset, r * e.in_features), (e.b_offset, e.out_features * r)] {
            let err = max_rel(&got[off..off + len], &want[off..off + len]).with_context(|| format!("{}", e.module))?;
            worst = worst.max(err);
        }
    }
    Ok(worst)
}

/// The tiny llama fixture trained for 3 optimizer steps of 2 micro-batches (LwF
/// distillation + CE, dropout, checkpointing, weight decay, clipping at 0.7× the first
/// step's norm) on the device and on the CPU, both in f32. Compared: the accumulated
/// gradients of the first step (GEMMs into the device buffer vs candle matmuls + host
/// adds), every step's norm, and the adapters and AdamW moments after the last step
/// (downloaded through the checkpoint accessors), each within 1e-4 of its tensor's scale.
/// Then two device-only properties: a run resumed from the device state after step 2
/// (loaded before the adapters move to the device, as `train` resumes, and loaded into
/// adapters and moments already there) ends bitwise where the uninterrupted run ends, and
/// a NaN gradient skips the update and leaves the adapters untouched.
fn check_train_steps(device: &Device, dir: &Path) -> anyhow::Result<(bool, String)> {
    let mut cpu = fixture_student(dir, &Device::Cpu)?;
    let mut gpu = fixture_student(dir, device)?;
    let vocab = cpu.model.cfg.vocab_size;
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    let data: Vec<Vec<Batch>> = (0..TRAIN_STEPS).map(|_| (0..2).map(|_| random_batch(&mut rng, 2, 12, vocab)).collect()).collect();

    // Clip step 0 (at 0.7× its norm) so that the clipping factor takes part.
    let mut probe = fixture_student(dir, &Device::Cpu)?;
    micro_steps(&mut probe, &data[0], 0, &Device::Cpu)?;
    let max_norm = 0.7 * probe.grads.norm()?;

    let tol = 1e-4;
    let (mut grad_err, mut norm_err, mut norms) = (0f64, 0f64, Vec::new());
    let mut snapshot = None;
    for (step, micro) in data.iter().enumerate() {
        micro_steps(&mut cpu, micro, step, &Device::Cpu)?;
        micro_steps(&mut gpu, micro, step, device)?;
        if step == 0 {
            if !gpu.grads.is_resident() || !gpu.params.is_resident() || !gpu.opt.is_resident() {
                return Ok((false, "after a micro-step on the device, adapters/grads/moments are not device-resident".into()));
            }
            grad_err = worst_per_tensor(&cpu.params, &gpu.grads.host_values()?, &cpu.grads.flat)?;
        }
        let nc = optimizer_step(&mut cpu, step, max_norm)?;
        let ng = optimizer_step(&mut gpu, step, max_norm)?;
        norm_err = norm_err.max(rel(ng, nc));
        norms.push(nc);
        if step == TRAIN_STEPS - 2 {
            snapshot = Some((gpu.params.peft_tensors()?, gpu.opt.state_tensors()?));
        }
    }
    let adapters = gpu.params.host_values()?.into_owned();
    let adapter_err = worst_per_tensor(&cpu.params, &adapters, &cpu.params.values)?;
    let state: HashMap<String, Tensor> = gpu.opt.state_tensors()?.into_iter().collect();
    let m = state.get("exp_avg").ok_or_else(|| anyhow!("no exp_avg"))?.to_vec1::<f32>()?;
    let v = state.get("exp_avg_sq").ok_or_else(|| anyhow!("no exp_avg_sq"))?.to_vec1::<f32>()?;
    let moment_err = worst_per_tensor(&cpu.params, &m, cpu.opt.exp_avg())?.max(worst_per_tensor(&cpu.params, &v, cpu.opt.exp_avg_sq())?);

    // Resume from the snapshot taken after step TRAIN_STEPS - 2: loaded before the state
    // moves to the device (as `train` resumes), and loaded into state already on the
    // device (the upload path).
    let (peft, opt_state) = snapshot.ok_or_else(|| anyhow!("no snapshot"))?;
    let opt_state: HashMap<String, Tensor> = opt_state.into_iter().collect();
    let (mut resume_exact, mut resume_diff) = (true, 0f64);
    for load_on_device in [false, true] {
        let mut resumed = fixture_student(dir, device)?;
        if load_on_device {
            resumed.keep_on_device()?;
        }
        resumed.params.load_peft_tensors(&peft, Path::new("device snapshot"))?;
        resumed.opt.load_state(&opt_state, Path::new("device snapshot"))?;
        let last = TRAIN_STEPS - 1;
        micro_steps(&mut resumed, &data[last], last, device)?;
        optimizer_step(&mut resumed, last, max_norm)?;
        let resumed_adapters = resumed.params.host_values()?.into_owned();
        resume_exact &= bitwise_equal(&resumed_adapters, &adapters) == adapters.len();
        resume_diff = resume_diff.max(max_rel(&resumed_adapters, &adapters)?);
    }

    // A non-finite gradient norm skips the update.
    let mut poisoned = vec![0f32; gpu.grads.len()];
    poisoned[gpu.grads.len() / 2] = f32::NAN;
    gpu.grads.set_host(poisoned)?;
    let nan_norm = gpu.optimizer_step(1e-3, max_norm)?;
    let skipped = nan_norm.is_nan() && bitwise_equal(&gpu.params.host_values()?, &adapters) == adapters.len();
    let zeroed = gpu.grads.host_values()?.iter().all(|&g| g == 0.0);

    let norms: Vec<String> = norms.iter().map(|n| format!("{n:.3e}")).collect();
    let norms = norms.join(", ");
    let pass = grad_err <= tol && norm_err <= tol && adapter_err <= tol && moment_err <= tol && resume_exact && skipped && zeroed;
    Ok((
        pass,
        format!(
            "step-0 grads rel err {grad_err:.1e}, norms [{norms}] rel err {norm_err:.1e} (max_norm {max_norm:.3e}), adapters after {TRAIN_STEPS} \
             steps {adapter_err:.1e}, moments {moment_err:.1e} (tol {tol:.0e}); resumed runs (load before / after the move to the device) bitwise equal: {resume_exact} (diff {resume_diff:.1e}); \
             NaN grad skips the step: {skipped}, grads zeroed after: {zeroed}"
        ),
    ))
}

/// Times the device optimizer step on [`LLAMA3_8B_R16_PARAMS`] parameters (median of 20 after
/// 3 warm-ups): the gradient norm (incl. its read-back), the AdamW kernel, the bf16 refresh
/// of the compute copy, and the three together, as `Student::optimizer_step` runs them.
pub fn optim_bench(device: &Device) -> anyhow::Result<String> {
    let dev = cuda_device(device)?;
    let n = LLAMA3_8B_R16_PARAMS;
    let mut rng = ChaCha8Rng::seed_from_u64(15);
    let host_p: Vec<f32> = (0..n).map(|_| rng.random_range(-0.05f32..0.05)).collect();
    let host_g: Vec<f32> = (0..n).map(|_| rng.random_range(-1e-3f32..1e-3)).collect();
    let mut params = dev.clone_htod(&host_p)?;
    let grads = dev.clone_htod(&host_g)?;
    let compute = Tensor::zeros(n, DType::BF16, device)?;
    let mut opt = AdamW::new(n, AdamWConfig { weight_decay: 0.01, ..AdamWConfig::default() });
    opt.make_resident(device)?;
    let median = |t: Vec<f64>| t[t.len() / 2];
    let norm_ms = median(time_on_stream(device, 3, 20, || sum_of_squares(dev, &grads).map(|_| ()))?);
    let adamw_ms = median(time_on_stream(device, 3, 20, || opt.step_cuda(&mut params, &grads, 1e-4, 1.0))?);
    let cast_ms = median(time_on_stream(device, 3, 20, || cast_f32_into(&params, &compute))?);
    let step_ms = median(time_on_stream(device, 3, 20, || {
        let norm = sum_of_squares(dev, &grads)?.sqrt();
        opt.step_cuda(&mut params, &grads, 1e-4, clip_coef(norm, 1.0))?;
        cast_f32_into(&params, &compute)
    })?);
    // AdamW reads params, grads and both moments and writes params and moments: 28 B/value.
    let gbs = |bytes: usize, ms: f64| bytes as f64 * n as f64 / (ms * 1e6);
    Ok(format!(
        "device optimizer step, {n} fp32 params: norm {norm_ms:.3} ms ({:.0} GB/s), AdamW {adamw_ms:.3} ms ({:.0} GB/s), \
         bf16 refresh {cast_ms:.3} ms ({:.0} GB/s), all three {step_ms:.3} ms",
        gbs(4, norm_ms),
        gbs(28, adamw_ms),
        gbs(6, cast_ms),
    ))
}
