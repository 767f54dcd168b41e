//! GPU checks and timings of the fused RMSNorm, RoPE and gated-activation kernels
//! (common/kernels/fused.cu).
//!
//! Every check draws fresh normal inputs on the device, runs the kernel directly (not
//! through the ops' dispatch, so it is certain the kernel ran) with its output buffers
//! filled with NaN beforehand, and compares with the candle reference of `ops` run in f32
//! on the same device over the same values (bf16 inputs upcast). The printed number is the
//! relative error ‖kernel − reference‖ / ‖reference‖ over all elements; for bf16 the
//! candle reference run in bf16 is measured the same way, for scale. Shapes are those of
//! Llama-3-8B (2 × 2048 tokens, hidden 4096, 32 and 8 heads of 128, FFN 14336) and odd
//! ones that take the kernels' narrower vector paths (rows of 7 or 80, head_dim 64 or 6,
//! start offsets that are not a multiple of the vector width).

use anyhow::{anyhow, bail};
use candle_core::{DType, Device, Tensor};
use qdistill_common::kernels::fused::{self, HeadLayout};
use qdistill_common::kernels::time_on_stream;
use qdistill_common::ops::activation::{glu_bwd, glu_bwd_reference, glu_fwd, glu_fwd_reference, Activation};
use qdistill_common::ops::rms_norm::{rms_norm_bwd_reference, rms_norm_fwd, rms_norm_fwd_reference};
use qdistill_common::ops::rope::{rope_bwd_reference, rope_fwd, rope_fwd_reference, RopeScaling, RopeTable};

/// One row of the self-test table: name and (pass, detail), or the error that stopped it.
pub type FusedCheck = (String, anyhow::Result<(bool, String)>);

/// bf16 outputs carry a rounding error of about 2⁻⁹ relative; 1e-2 leaves room for the
/// accumulated f32 error but not for a wrong formula or a misplaced element.
const BF16_TOL: f64 = 1e-2;
const F32_TOL: f64 = 1e-5;

const LLAMA31_ROPE: RopeScaling = RopeScaling::Llama3 {
    factor: 8.0,
    low_freq_factor: 1.0,
    high_freq_factor: 4.0,
    original_max_position_embeddings: 8192,
};

fn tol(dtype: DType) -> f64 {
    if dtype == DType::F32 {
        F32_TOL
    } else {
        BF16_TOL
    }
}

fn dt_name(dtype: DType) -> &'static str {
    if dtype == DType::F32 {
        "f32"
    } else {
        "bf16"
    }
}

/// Turns the kernels' output poisoning on for its lifetime (off again even on a panic).
struct Poisoned;
impl Poisoned {
    fn on() -> Self {
        fused::poison_outputs(true);
        Poisoned
    }
}
impl Drop for Poisoned {
    fn drop(&mut self) {
        fused::poison_outputs(false);
    }
}

/// Normal values `mean + std·N(0, 1)` of `shape` in `dtype`, and the same values in f32.
/// With `offset` > 0 the tensor starts `offset` elements into its buffer, which forces the
/// kernels' narrower vector paths when it is not a multiple of their width.
fn input(shape: &[usize], mean: f64, std: f32, dtype: DType, offset: usize, device: &Device) -> anyhow::Result<(Tensor, Tensor)> {
    let n: usize = shape.iter().product();
    let flat = Tensor::randn(0f32, std, n + offset, device)?.affine(1.0, mean)?.to_dtype(dtype)?;
    let t = flat.narrow(0, offset, n)?.reshape(shape)?;
    let t32 = t.to_dtype(DType::F32)?;
    Ok((t, t32))
}

/// ‖got − want‖ / ‖want‖ in f64 on the device, and how many elements of `got` are NaN or
/// infinite (a NaN is what an element the kernel never wrote holds).
fn rel_err(got: &Tensor, want: &Tensor) -> anyhow::Result<(f64, usize)> {
    if got.dims() != want.dims() {
        bail!("output has shape {:?}, the reference {:?}", got.dims(), want.dims());
    }
    let g = got.to_dtype(DType::F32)?.to_dtype(DType::F64)?;
    let w = want.to_dtype(DType::F32)?.to_dtype(DType::F64)?;
    // 0·g is NaN exactly where g is NaN or ±inf, and 0 elsewhere.
    let z = g.affine(0.0, 0.0)?;
    let nonfinite = z.ne(&z)?.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()? as usize;
    let num = (&g - &w)?.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    let den = w.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    Ok((num / den.max(f64::MIN_POSITIVE), nonfinite))
}

/// One output of a kernel: its name, the kernel's tensor, the f32 reference, the candle
/// reference in the low precision (bf16 cases), and the tolerance.
struct Out<'a> {
    name: &'static str,
    got: &'a Tensor,
    want: &'a Tensor,
    candle_low: Option<&'a Tensor>,
    tol: f64,
}

/// Passes when every output is finite and within its tolerance; the detail names each
/// output's error, its tolerance, and the count of non-finite elements if any.
fn judge(outs: &[Out]) -> anyhow::Result<(bool, String)> {
    let mut pass = true;
    let mut parts = Vec::new();
    for o in outs {
        let (err, nonfinite) = rel_err(o.got, o.want)?;
        let ok = nonfinite == 0 && err <= o.tol;
        pass &= ok;
        let mut s = format!("{}: rel err {err:.2e} {} {:.0e}", o.name, if ok { "<=" } else { "NOT <=" }, o.tol);
        if let Some(low) = o.candle_low {
            s.push_str(&format!(" (candle bf16 path {:.2e})", rel_err(low, o.want)?.0));
        }
        if nonfinite > 0 {
            s.push_str(&format!(", {nonfinite} of {} outputs NaN/inf (unwritten or overflowed)", o.got.elem_count()));
        }
        parts.push(s);
    }
    Ok((pass, parts.join("; ")))
}

/// Two rows (forward, backward) that share their inputs; an error before either verdict
/// is reported on both.
fn fwd_bwd(names: [String; 2], res: anyhow::Result<[(bool, String); 2]>) -> Vec<FusedCheck> {
    match res {
        Ok([f, b]) => {
            let [nf, nb] = names;
            vec![(nf, Ok(f)), (nb, Ok(b))]
        }
        Err(e) => {
            let msg = format!("{e:#}");
            names.into_iter().map(|n| (n, Err(anyhow!("{msg}")))).collect()
        }
    }
}

fn rms_norm_case(device: &Device, dims: &[usize], dtype: DType, unit_offset: bool, offset: usize) -> Vec<FusedCheck> {
    let what = format!("{} {dims:?} unit_offset={unit_offset} offset={offset}", dt_name(dtype));
    let names = [format!("fused rms_norm fwd {what} vs candle f32"), format!("fused rms_norm bwd {what} vs candle f32")];
    let run = || -> anyhow::Result<[(bool, String); 2]> {
        let eps = 1e-5;
        let d = *dims.last().ok_or_else(|| anyhow!("empty shape"))?;
        let (x, x32) = input(dims, 0.0, 1.0, dtype, offset, device)?;
        let (w, w32) = input(&[d], 0.0, 1.0, dtype, 0, device)?;
        let (dy, dy32) = input(dims, 0.0, 1.0, dtype, 0, device)?;
        let (y, rstd) = fused::rms_norm_fwd(&x, &w, eps, unit_offset)?;
        let (y_ref, saved_ref) = rms_norm_fwd_reference(&x32, &w32, eps, unit_offset)?;
        let low = (dtype != DType::F32).then(|| rms_norm_fwd_reference(&x, &w, eps, unit_offset)).transpose()?;
        // rstd is f32 from the same input values either way: held to the f32 tolerance.
        let fwd = judge(&[
            Out { name: "y", got: &y, want: &y_ref, candle_low: low.as_ref().map(|l| &l.0), tol: tol(dtype) },
            Out { name: "rstd", got: &rstd, want: &saved_ref.rstd, candle_low: None, tol: F32_TOL },
        ])?;
        let dx = fused::rms_norm_bwd(&dy, &x, &w, &rstd, unit_offset, None)?;
        let dx_ref = rms_norm_bwd_reference(&dy32, &w32, unit_offset, &saved_ref)?;
        let dx_low = low.as_ref().map(|(_, s)| rms_norm_bwd_reference(&dy, &w, unit_offset, s)).transpose()?;
        // The residual-adding variant: res + dx, the sum formed in the kernel.
        let (res, res32) = input(dims, 0.0, 1.0, dtype, 0, device)?;
        let dx_res = fused::rms_norm_bwd(&dy, &x, &w, &rstd, unit_offset, Some(&res))?;
        let dx_res_ref = (&res32 + &dx_ref)?;
        let bwd = judge(&[
            Out { name: "dx", got: &dx, want: &dx_ref, candle_low: dx_low.as_ref(), tol: tol(dtype) },
            Out { name: "res + dx", got: &dx_res, want: &dx_res_ref, candle_low: None, tol: tol(dtype) },
        ])?;
        Ok([fwd, bwd])
    };
    fwd_bwd(names, run())
}

/// Positions of `b` packed rows of `t` tokens: row 0 counts from 0, the others hold two
/// sequences, the first starting mid-way (as after truncation), the second restarting at 0.
fn positions(b: usize, t: usize, max_len: usize, device: &Device) -> anyhow::Result<Tensor> {
    let mut pos = Vec::with_capacity(b * t);
    for row in 0..b {
        let split = if row == 0 { t } else { t * 2 / 3 };
        let start = if row == 0 { 0 } else { (max_len - t).min(977 * row) };
        pos.extend((0..split).map(|i| (start + i) as u32));
        pos.extend((0..t - split).map(|i| i as u32));
    }
    Ok(Tensor::from_vec(pos, (b, t), device)?)
}

/// `[b, h, t, d]` RoPE; `bthd` runs the transposing variants (forward from `[B, T, H, D]`,
/// backward to it) instead of the plain ones.
#[allow(clippy::too_many_arguments)]
fn rope_case(device: &Device, (b, h, t, d): (usize, usize, usize, usize), scaling: Option<RopeScaling>, theta: f64, dtype: DType, bthd: bool, offset: usize) -> Vec<FusedCheck> {
    let variant = if bthd { " [B,T,H,D]<->[B,H,T,D]" } else { "" };
    let what = format!("{} [{b}, {h}, {t}, {d}]{variant} offset={offset}", dt_name(dtype));
    let names = [format!("fused rope fwd {what} vs candle f32"), format!("fused rope bwd {what} vs candle f32")];
    let run = || -> anyhow::Result<[(bool, String); 2]> {
        let max_len = 8192;
        let table = RopeTable::new(d, theta, scaling, max_len, device)?;
        let pos = positions(b, t, max_len, device)?;
        let tol = tol(dtype);
        let low = dtype != DType::F32;
        // Forward input: [B, T, H, D] for the transposing variant, else [B, H, T, D].
        let x_dims = if bthd { [b, t, h, d] } else { [b, h, t, d] };
        let (x, x32) = input(&x_dims, 0.0, 1.0, dtype, offset, device)?;
        let (dy, dy32) = input(&[b, h, t, d], 0.0, 1.0, dtype, offset, device)?;
        let to_bhtd = |x: &Tensor| -> anyhow::Result<Tensor> { Ok(if bthd { x.transpose(1, 2)?.contiguous()? } else { x.clone() }) };
        let from = if bthd { HeadLayout::Bthd } else { HeadLayout::Bhtd };
        let y = fused::rope(&x, &table, &pos, from, HeadLayout::Bhtd, false)?;
        let y_ref = rope_fwd_reference(&to_bhtd(&x32)?, &table, &pos)?;
        let y_low = low.then(|| rope_fwd_reference(&to_bhtd(&x)?, &table, &pos).map_err(anyhow::Error::from)).transpose()?;
        let fwd = judge(&[Out { name: "y", got: &y, want: &y_ref, candle_low: y_low.as_ref(), tol }])?;
        let dx = fused::rope(&dy, &table, &pos, HeadLayout::Bhtd, from, true)?;
        let dx_ref = to_bhtd(&rope_bwd_reference(&dy32, &table, &pos)?)?;
        let dx_low = low.then(|| to_bhtd(&rope_bwd_reference(&dy, &table, &pos)?)).transpose()?;
        let bwd = judge(&[Out { name: "dx", got: &dx, want: &dx_ref, candle_low: dx_low.as_ref(), tol }])?;
        Ok([fwd, bwd])
    };
    fwd_bwd(names, run())
}

fn glu_case(device: &Device, dims: &[usize], act: Activation, dtype: DType, offset: usize) -> Vec<FusedCheck> {
    let what = format!("{act:?} {} {dims:?} offset={offset}", dt_name(dtype));
    let names = [format!("fused glu fwd {what} vs candle f32"), format!("fused glu bwd {what} vs candle f32")];
    let run = || -> anyhow::Result<[(bool, String); 2]> {
        let tol = tol(dtype);
        let low = dtype != DType::F32;
        // A wide gate reaches both tails of the activations and their derivatives.
        let (gate, gate32) = input(dims, 0.0, 3.0, dtype, offset, device)?;
        let (up, up32) = input(dims, 0.0, 1.0, dtype, 0, device)?;
        let (dm, dm32) = input(dims, 0.0, 1.0, dtype, offset, device)?;
        let m = fused::glu_fwd(&gate, &up, act)?;
        let m_ref = glu_fwd_reference(&gate32, &up32, act)?;
        let m_low = low.then(|| glu_fwd_reference(&gate, &up, act)).transpose()?;
        let fwd = judge(&[Out { name: "m", got: &m, want: &m_ref, candle_low: m_low.as_ref(), tol }])?;
        let (dg, du) = fused::glu_bwd(&dm, &gate, &up, act)?;
        let (dg_ref, du_ref) = glu_bwd_reference(&dm32, &gate32, &up32, act)?;
        let lows = low.then(|| glu_bwd_reference(&dm, &gate, &up, act)).transpose()?;
        let (ok, report) = judge(&[
            Out { name: "dgate", got: &dg, want: &dg_ref, candle_low: lows.as_ref().map(|l| &l.0), tol },
            Out { name: "dup", got: &du, want: &du_ref, candle_low: lows.as_ref().map(|l| &l.1), tol },
        ])?;
        // The in-place kernel (dgate over gate, dup over up) does the same arithmetic.
        let (dg_in, du_in) = fused::glu_bwd_in_place(&dm, gate.copy()?, up.copy()?, act)?;
        let same = same_bits(&dg_in, &dg)? && same_bits(&du_in, &du)?;
        let bwd = (ok && same, format!("{report}; in place = out of place bit for bit: {same}"));
        Ok([fwd, bwd])
    };
    fwd_bwd(names, run())
}

/// The head transposes and the residual add: pure data movement and one rounding, so
/// they must give candle's `transpose(1, 2).contiguous()` and `a + b` bit for bit.
fn layout_case(device: &Device, (b, h, t, d): (usize, usize, usize, usize), dtype: DType, offset: usize) -> FusedCheck {
    let name = format!("fused head transposes + residual add {} [{b}, {h}, {t}, {d}] offset={offset} vs candle, bit for bit", dt_name(dtype));
    let run = || -> anyhow::Result<(bool, String)> {
        let (x, _) = input(&[b, t, h, d], 0.0, 1.0, dtype, offset, device)?;
        let (y, _) = input(&[b, h, t, d], 0.0, 1.0, dtype, offset, device)?;
        let (z, _) = input(&[b, h, t, d], 0.0, 1.0, dtype, 0, device)?;
        let to_bhtd = fused::transpose_heads(&x, HeadLayout::Bthd)?;
        let to_bthd = fused::transpose_heads(&y, HeadLayout::Bhtd)?;
        let sum = fused::add(&y, &z)?;
        let checks = [
            ("[B,T,H,D] -> [B,H,T,D]", same_bits(&to_bhtd, &x.transpose(1, 2)?.contiguous()?)?),
            ("[B,H,T,D] -> [B,T,H,D]", same_bits(&to_bthd, &y.transpose(1, 2)?.contiguous()?)?),
            ("add", same_bits(&sum, &(&y + &z)?)?),
        ];
        let bad: Vec<&str> = checks.iter().filter(|c| !c.1).map(|c| c.0).collect();
        Ok((bad.is_empty(), if bad.is_empty() { "identical".into() } else { format!("differ: {}", bad.join(", ")) }))
    };
    (name, run())
}

/// Bit-equality of two tensors (small ones: compared on the host).
pub(crate) fn same_bits(a: &Tensor, b: &Tensor) -> anyhow::Result<bool> {
    let bits = |t: &Tensor| -> anyhow::Result<Vec<u32>> {
        Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?.into_iter().map(f32::to_bits).collect())
    };
    Ok(a.dims() == b.dims() && bits(a)? == bits(b)?)
}

/// The `ops` functions on a CUDA bf16 tensor return exactly the kernel's bits (or, with
/// QDISTILL_FUSED_KERNELS=0, exactly the candle reference's): the dispatch is wired.
fn dispatch_check(device: &Device) -> anyhow::Result<(bool, String)> {
    let on = fused::enabled();
    let (x, _) = input(&[3, 5, 64], 0.0, 1.0, DType::BF16, 0, device)?;
    let (w, _) = input(&[64], 0.0, 1.0, DType::BF16, 0, device)?;
    let (gate, _) = input(&[3, 40], 0.0, 3.0, DType::BF16, 0, device)?;
    let (up, _) = input(&[3, 40], 0.0, 1.0, DType::BF16, 0, device)?;
    let (q, _) = input(&[2, 4, 6, 64], 0.0, 1.0, DType::BF16, 0, device)?;
    let table = RopeTable::new(64, 1e4, None, 64, device)?;
    let pos = positions(2, 6, 64, device)?;
    let via_ops = [
        rms_norm_fwd(&x, &w, 1e-6, true)?.0,
        rope_fwd(&q, &table, &pos)?,
        glu_fwd(&gate, &up, Activation::GeluTanh)?,
        glu_bwd(&up, &gate, &up, Activation::Silu)?.0,
    ];
    let expected = if on {
        [
            fused::rms_norm_fwd(&x, &w, 1e-6, true)?.0,
            fused::rope(&q, &table, &pos, HeadLayout::Bhtd, HeadLayout::Bhtd, false)?,
            fused::glu_fwd(&gate, &up, Activation::GeluTanh)?,
            fused::glu_bwd(&up, &gate, &up, Activation::Silu)?.0,
        ]
    } else {
        [
            rms_norm_fwd_reference(&x, &w, 1e-6, true)?.0,
            rope_fwd_reference(&q, &table, &pos)?,
            glu_fwd_reference(&gate, &up, Activation::GeluTanh)?,
            glu_bwd_reference(&up, &gate, &up, Activation::Silu)?.0,
        ]
    };
    let names = ["rms_norm_fwd", "rope_fwd", "glu_fwd", "glu_bwd"];
    let mut wrong = Vec::new();
    for ((name, a), b) in names.iter().zip(&via_ops).zip(&expected) {
        if !same_bits(a, b)? {
            wrong.push(*name);
        }
    }
    let path = if on { "the fused kernel" } else { "the candle reference (QDISTILL_FUSED_KERNELS=0)" };
    Ok(if wrong.is_empty() {
        (true, format!("ops::{{{}}} on CUDA bf16 match {path} bit for bit", names.join(", ")))
    } else {
        (false, format!("ops::{{{}}} on CUDA bf16 differ from {path}: the dispatch takes the other path", wrong.join(", ")))
    })
}

/// Every fused kernel, forward and backward, against the candle reference in f32 on the
/// same device, plus one check that the ops dispatch to them.
pub fn fused_checks(device: &Device) -> Vec<FusedCheck> {
    let _poison = Poisoned::on();
    let (bf16, f32) = (DType::BF16, DType::F32);
    let mut rows = Vec::new();
    // RMSNorm: Llama-8B rows; Gemma's (1 + w) at an odd width; a row of 7 (scalar path);
    // rows longer than one block pass (8200 = 1025 vectors of 8) with a start offset of 3
    // (scalar path again); f32 with 1024 vectors of 4 per row (two block passes).
    rows.extend(rms_norm_case(device, &[2, 2048, 4096], bf16, false, 0));
    rows.extend(rms_norm_case(device, &[7, 80], bf16, true, 0));
    rows.extend(rms_norm_case(device, &[3, 7], bf16, false, 0));
    rows.extend(rms_norm_case(device, &[5, 8200], bf16, true, 3));
    rows.extend(rms_norm_case(device, &[2, 256, 4096], f32, false, 0));
    rows.extend(rms_norm_case(device, &[7, 80], f32, true, 0));
    // RoPE: Llama-3.1-8B q (32 heads) and k (8 heads) with its llama3 frequencies; the
    // fused transposes; head_dim 64 over 7 tokens; head_dim 6 (scalar path); f32.
    rows.extend(rope_case(device, (2, 32, 2048, 128), Some(LLAMA31_ROPE), 5e5, bf16, false, 0));
    rows.extend(rope_case(device, (2, 8, 2048, 128), Some(LLAMA31_ROPE), 5e5, bf16, false, 0));
    rows.extend(rope_case(device, (2, 32, 2048, 128), Some(LLAMA31_ROPE), 5e5, bf16, true, 0));
    rows.extend(rope_case(device, (1, 3, 7, 64), None, 1e4, bf16, false, 0));
    rows.extend(rope_case(device, (1, 3, 7, 64), None, 1e4, bf16, true, 0));
    rows.extend(rope_case(device, (2, 3, 5, 6), None, 1e4, bf16, false, 1));
    rows.extend(rope_case(device, (2, 4, 33, 128), Some(LLAMA31_ROPE), 5e5, f32, false, 0));
    rows.extend(rope_case(device, (2, 4, 33, 80), None, 1e4, f32, true, 2));
    // Gated activations: Llama-8B SwiGLU; Gemma's GeGLU (tanh) and exact GELU at small
    // odd sizes; an offset of 3 (scalar path); f32.
    rows.extend(glu_case(device, &[2, 2048, 14336], Activation::Silu, bf16, 0));
    rows.extend(glu_case(device, &[7, 80], Activation::GeluTanh, bf16, 0));
    rows.extend(glu_case(device, &[2, 333, 2048], Activation::GeluTanh, bf16, 0));
    rows.extend(glu_case(device, &[7, 80], Activation::Gelu, bf16, 0));
    rows.extend(glu_case(device, &[5, 77], Activation::Silu, bf16, 3));
    rows.extend(glu_case(device, &[3, 1000], Activation::Silu, f32, 0));
    rows.extend(glu_case(device, &[7, 80], Activation::GeluTanh, f32, 0));
    rows.extend(glu_case(device, &[7, 81], Activation::Gelu, f32, 1));
    // Head transposes and residual add: Llama-8B q (32 heads) and k/v (8 heads); head_dim
    // 6 at an odd offset (scalar path); f32.
    rows.push(layout_case(device, (2, 32, 2048, 128), bf16, 0));
    rows.push(layout_case(device, (2, 8, 2048, 128), bf16, 0));
    rows.push(layout_case(device, (2, 3, 5, 6), bf16, 1));
    rows.push(layout_case(device, (2, 4, 33, 80), f32, 2));
    rows.push(("fused kernels: ops dispatch on CUDA".into(), dispatch_check(device)));
    rows
}

/// Median milliseconds of `f` over 20 runs after 3 warm-up runs, on candle's stream.
fn median_ms(device: &Device, f: &mut dyn FnMut() -> qdistill_common::Result<()>) -> anyhow::Result<f64> {
    let times = time_on_stream(device, 3, 20, f)?;
    Ok(times[times.len() / 2])
}

/// Times each kernel at the Llama-3-8B shapes (2 × 2048 tokens, bf16) beside the candle
/// reference it replaces. GB/s counts the bytes a single pass must move (inputs read once,
/// outputs written once). The RMSNorm operands (32 MB each) partly stay in L2 between the
/// repetitions, so its GB/s can read above the DRAM bandwidth; each time includes the
/// launch and the output allocation, as in training.
pub fn fused_bench(device: &Device) -> anyhow::Result<String> {
    let bf16 = DType::BF16;
    let (b, t, d, f, hq, hkv, hd) = (2usize, 2048usize, 4096usize, 14336usize, 32usize, 8usize, 128usize);
    let n = b * t;
    let rnd = |shape: &[usize]| -> anyhow::Result<Tensor> { Ok(input(shape, 0.0, 1.0, bf16, 0, device)?.0) };
    let x = rnd(&[b, t, d])?;
    let dy = rnd(&[b, t, d])?;
    let w = rnd(&[d])?;
    let (_, saved) = rms_norm_fwd_reference(&x, &w, 1e-5, false)?;
    let (_, rstd) = fused::rms_norm_fwd(&x, &w, 1e-5, false)?;
    let table = RopeTable::new(hd, 5e5, Some(LLAMA31_ROPE), 8192, device)?;
    let pos = positions(b, t, 8192, device)?;
    let q = rnd(&[b, hq, t, hd])?;
    let k = rnd(&[b, hkv, t, hd])?;
    let q_bthd = rnd(&[b, t, hq, hd])?;
    let gate = rnd(&[n, f])?;
    let up = rnd(&[n, f])?;
    let dm = rnd(&[n, f])?;
    let act = Activation::Silu;
    let (act_bytes, ffn_bytes, q_bytes, k_bytes) = ((n * d * 2) as f64, (n * f * 2) as f64, (q.elem_count() * 2) as f64, (k.elem_count() * 2) as f64);
    use HeadLayout::{Bhtd, Bthd};
    type Op<'a> = Box<dyn FnMut() -> qdistill_common::Result<()> + 'a>;
    let cases: Vec<(&str, String, f64, Op<'_>, Op<'_>)> = vec![
        (
            "rms_norm fwd",
            format!("[{b}, {t}, {d}]"),
            2.0 * act_bytes,
            Box::new(|| fused::rms_norm_fwd(&x, &w, 1e-5, false).map(drop)),
            Box::new(|| rms_norm_fwd_reference(&x, &w, 1e-5, false).map(drop)),
        ),
        (
            "rms_norm bwd",
            format!("[{b}, {t}, {d}]"),
            3.0 * act_bytes,
            Box::new(|| fused::rms_norm_bwd(&dy, &x, &w, &rstd, false, None).map(drop)),
            Box::new(|| rms_norm_bwd_reference(&dy, &w, false, &saved).map(drop)),
        ),
        (
            "rope fwd q+k",
            format!("[{b}, {hq}+{hkv}, {t}, {hd}]"),
            2.0 * (q_bytes + k_bytes),
            Box::new(|| {
                fused::rope(&q, &table, &pos, Bhtd, Bhtd, false)?;
                fused::rope(&k, &table, &pos, Bhtd, Bhtd, false).map(drop)
            }),
            Box::new(|| {
                rope_fwd_reference(&q, &table, &pos)?;
                rope_fwd_reference(&k, &table, &pos).map(drop)
            }),
        ),
        (
            "rope bwd q+k",
            format!("[{b}, {hq}+{hkv}, {t}, {hd}]"),
            2.0 * (q_bytes + k_bytes),
            Box::new(|| {
                fused::rope(&q, &table, &pos, Bhtd, Bhtd, true)?;
                fused::rope(&k, &table, &pos, Bhtd, Bhtd, true).map(drop)
            }),
            Box::new(|| {
                rope_bwd_reference(&q, &table, &pos)?;
                rope_bwd_reference(&k, &table, &pos).map(drop)
            }),
        ),
        (
            "rope fwd q from [B,T,H,D]",
            format!("[{b}, {t}, {hq}, {hd}]"),
            2.0 * q_bytes,
            Box::new(|| fused::rope(&q_bthd, &table, &pos, Bthd, Bhtd, false).map(drop)),
            Box::new(|| rope_fwd_reference(&q_bthd.transpose(1, 2)?.contiguous()?, &table, &pos).map(drop)),
        ),
        (
            "head transpose q [B,T,H,D] -> [B,H,T,D]",
            format!("[{b}, {t}, {hq}, {hd}]"),
            2.0 * q_bytes,
            Box::new(|| fused::transpose_heads(&q_bthd, Bthd).map(drop)),
            Box::new(|| q_bthd.transpose(1, 2)?.contiguous().map(drop).map_err(Into::into)),
        ),
        (
            "residual add",
            format!("[{b}, {t}, {d}]"),
            3.0 * act_bytes,
            Box::new(|| fused::add(&x, &dy).map(drop)),
            Box::new(|| (&x + &dy).map(drop).map_err(Into::into)),
        ),
        (
            "swiglu fwd",
            format!("[{n}, {f}]"),
            3.0 * ffn_bytes,
            Box::new(|| fused::glu_fwd(&gate, &up, act).map(drop)),
            Box::new(|| glu_fwd_reference(&gate, &up, act).map(drop)),
        ),
        (
            "swiglu bwd",
            format!("[{n}, {f}]"),
            5.0 * ffn_bytes,
            Box::new(|| fused::glu_bwd(&dm, &gate, &up, act).map(drop)),
            Box::new(|| glu_bwd_reference(&dm, &gate, &up, act).map(drop)),
        ),
    ];
    let mut out = String::from("| fused kernel (bf16) | shape | fused ms | GB/s | candle ms | speedup |\n|---|---|---|---|---|---|\n");
    for (name, shape, bytes, mut fused_op, mut candle_op) in cases {
        let ms = median_ms(device, &mut *fused_op)?;
        let ref_ms = median_ms(device, &mut *candle_op)?;
        out.push_str(&format!(
            "| {name} | {shape} | {ms:.3} | {:.0} | {ref_ms:.3} | {:.1}x |\n",
            bytes / (ms / 1e3) / 1e9,
            ref_ms / ms
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The whole table on the first CUDA device, where there is one (skipped elsewhere).
    #[test]
    fn fused_checks_pass_on_a_gpu() {
        let Ok(dev) = Device::new_cuda(0) else {
            eprintln!("no CUDA device: skipped");
            return;
        };
        let mut failed = Vec::new();
        for (name, res) in fused_checks(&dev) {
            match res {
                Ok((true, detail)) => println!("PASS {name}: {detail}"),
                Ok((false, detail)) => failed.push(format!("FAIL {name}: {detail}")),
                Err(e) => failed.push(format!("FAIL {name}: error: {e:#}")),
            }
        }
        assert!(failed.is_empty(), "{}", failed.join("\n"));
    }
}
