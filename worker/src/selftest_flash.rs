//! GPU checks and timing of the flash-attention kernel (common/kernels/flash_attn.cu).
//!
//! Every check draws fresh normal inputs, runs the kernel's forward and backward in bf16
//! (one case in f16) with NaN-poisoned outputs, and compares out, lse, dq, dk, dv with the
//! reference attention path computed in f32 on the same device from the same rounded
//! inputs, by ‖a − b‖ / ‖b‖ per tensor.

use anyhow::ensure;
use candle_core::{DType, Device, Tensor};
use qdistill_common::kernels::flash::{flash_attn_bwd, flash_attn_fwd, OutputInit};
use qdistill_common::kernels::time_on_stream;
use qdistill_common::ops::attention::{
    attention_bwd_reference, attention_fwd, attention_fwd_reference, uses_flash_kernel, AttnConfig,
};

/// out, dq, dk, dv: bf16 operands of the tile products (P and dS are rounded to bf16 before
/// they multiply V, K and Q) leave ‖Δ‖/‖ref‖ of a few 1e-3.
const TOL: f64 = 1e-2;
/// lse is a sum of exponentials accumulated in f32 from f32 products of the same inputs.
const TOL_LSE: f64 = 1e-4;

#[derive(Clone, Copy)]
enum Segs {
    None,
    /// Three packed samples and a padded tail (id 0), as the data loader lays out a row.
    U32,
    /// The same ids as i64.
    I64,
}

struct Case {
    b: usize,
    hq: usize,
    hkv: usize,
    t: usize,
    d: usize,
    window: Option<usize>,
    softcap: Option<f64>,
    segs: Segs,
    dtype: DType,
    /// Standard deviation of q and k: the scaled scores have about qk_std² of it.
    qk_std: f32,
}

impl Case {
    fn label(&self) -> String {
        let mut s = format!("B={} Hq={} Hkv={} T={} D={} {:?}", self.b, self.hq, self.hkv, self.t, self.d, self.dtype);
        if let Some(w) = self.window {
            s.push_str(&format!(" window={w}"));
        }
        if let Some(c) = self.softcap {
            s.push_str(&format!(" softcap={c}"));
        }
        match self.segs {
            Segs::None => {}
            Segs::U32 => s.push_str(" segments(u32)"),
            Segs::I64 => s.push_str(" segments(i64)"),
        }
        s
    }
}

fn cases() -> Vec<Case> {
    let base = Case {
        b: 2,
        hq: 32,
        hkv: 8,
        t: 2048,
        d: 128,
        window: None,
        softcap: None,
        segs: Segs::None,
        dtype: DType::BF16,
        qk_std: 1.0,
    };
    vec![
        Case { ..base },
        Case { b: 1, hq: 9, hkv: 3, t: 300, d: 64, ..base },
        Case { hq: 4, hkv: 2, t: 257, window: Some(64), ..base },
        Case { b: 1, hq: 8, hkv: 4, t: 512, softcap: Some(50.0), qk_std: 4.0, ..base },
        Case { hq: 8, hkv: 2, t: 1000, segs: Segs::U32, ..base },
        Case { hq: 4, hkv: 4, t: 384, d: 64, ..base },
        Case { hq: 4, hkv: 2, t: 1, ..base },
        Case { hq: 6, hkv: 2, t: 700, d: 64, window: Some(100), softcap: Some(30.0), segs: Segs::I64, qk_std: 3.0, ..base },
        Case { b: 1, hq: 8, hkv: 2, t: 513, dtype: DType::F16, ..base },
    ]
}

/// (pass, detail) of each case, named for the selftest table.
pub fn flash_checks(device: &Device) -> Vec<(String, anyhow::Result<(bool, String)>)> {
    let mut out = vec![("flash attn dispatch picks the kernel for bf16".to_string(), check_dispatch(device))];
    for c in cases() {
        out.push((format!("flash attn {} vs reference f32", c.label()), check_case(device, &c)));
    }
    out
}

fn config(c: &Case) -> AttnConfig {
    AttnConfig {
        n_heads: c.hq,
        n_kv_heads: c.hkv,
        head_dim: c.d,
        scale: 1.0 / (c.d as f64).sqrt(),
        sliding_window: c.window,
        softcap: c.softcap,
    }
}

fn randn(shape: (usize, usize, usize, usize), std: f32, dtype: DType, device: &Device) -> anyhow::Result<Tensor> {
    Ok(Tensor::randn(0f32, std, shape, device)?.to_dtype(dtype)?)
}

fn segment_ids(c: &Case, device: &Device) -> anyhow::Result<Option<Tensor>> {
    let dtype = match c.segs {
        Segs::None => return Ok(None),
        Segs::U32 => DType::U32,
        Segs::I64 => DType::I64,
    };
    // Row r: samples of 40%, 25% and 25% of T (shifted by r so the rows differ), then padding.
    let mut ids = Vec::with_capacity(c.b * c.t);
    for r in 0..c.b {
        let a = c.t * 2 / 5 + 7 * r;
        let bnd = [a, a + c.t / 4, a + c.t / 2];
        ids.extend((0..c.t).map(|i| bnd.iter().position(|&e| i < e).map_or(0u32, |s| s as u32 + 1)));
    }
    Ok(Some(Tensor::from_vec(ids, (c.b, c.t), device)?.to_dtype(dtype)?))
}

/// ‖a − b‖ / ‖b‖ in f64, or an error naming how many elements of `a` are not finite.
/// ‖b‖ counts as at least 1e-3 per element: at T = 1 the softmax is a constant 1, dq and dk
/// are exactly 0, and the kernel's rounding residue (~1e-7) must not read as a relative error.
fn rel_err(name: &str, a: &Tensor, b: &Tensor) -> anyhow::Result<f64> {
    let a = a.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let b = b.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    ensure!(a.len() == b.len(), "{name}: {} elements vs {} in the reference", a.len(), b.len());
    let bad = a.iter().filter(|x| !x.is_finite()).count();
    ensure!(bad == 0, "{name}: {bad} of {} elements are not finite (unwritten outputs stay NaN)", a.len());
    let (mut num, mut den) = (0f64, 0f64);
    for (x, y) in a.iter().zip(&b) {
        num += (x - y) * (x - y);
        den += y * y;
    }
    let floor = 1e-6 * b.len() as f64;
    Ok((num / den.max(floor)).sqrt())
}

fn check_case(device: &Device, c: &Case) -> anyhow::Result<(bool, String)> {
    let cfg = config(c);
    let q = randn((c.b, c.hq, c.t, c.d), c.qk_std, c.dtype, device)?;
    let k = randn((c.b, c.hkv, c.t, c.d), c.qk_std, c.dtype, device)?;
    let v = randn((c.b, c.hkv, c.t, c.d), 1.0, c.dtype, device)?;
    let dout = randn((c.b, c.hq, c.t, c.d), 1.0, c.dtype, device)?;
    let seg = segment_ids(c, device)?;
    let seg = seg.as_ref();

    let (out, lse) = flash_attn_fwd(&q, &k, &v, &cfg, seg, OutputInit::Nan)?;
    let (dq, dk, dv) = flash_attn_bwd(&dout, &q, &k, &v, &out, &lse, &cfg, seg, OutputInit::Nan)?;

    let f32 = |x: &Tensor| x.to_dtype(DType::F32);
    let (out_r, saved_r) = attention_fwd_reference(&f32(&q)?, &f32(&k)?, &f32(&v)?, &cfg, seg)?;
    let (dq_r, dk_r, dv_r) = attention_bwd_reference(&f32(&dout)?, &saved_r, &cfg, seg)?;

    let errs = [
        ("out", rel_err("out", &out, &out_r)?, TOL),
        ("lse", rel_err("lse", &lse, &saved_r.lse)?, TOL_LSE),
        ("dq", rel_err("dq", &dq, &dq_r)?, TOL),
        ("dk", rel_err("dk", &dk, &dk_r)?, TOL),
        ("dv", rel_err("dv", &dv, &dv_r)?, TOL),
    ];
    let pass = errs.iter().all(|(_, e, tol)| e < tol);
    let detail = errs.iter().map(|(n, e, tol)| format!("{n} {e:.1e}{}", if e < tol { "" } else { " FAIL" })).collect::<Vec<_>>();
    Ok((pass, format!("‖Δ‖/‖ref‖: {} (tol {TOL:.0e}, lse {TOL_LSE:.0e})", detail.join(", "))))
}

/// attention_fwd on bf16 CUDA inputs returns the kernel's f32 logsumexp (the reference
/// path keeps the input dtype), so the training path really runs the kernel.
fn check_dispatch(device: &Device) -> anyhow::Result<(bool, String)> {
    let c = Case { b: 1, hq: 4, hkv: 2, t: 64, d: 64, window: None, softcap: None, segs: Segs::None, dtype: DType::BF16, qk_std: 1.0 };
    let cfg = config(&c);
    let q = randn((c.b, c.hq, c.t, c.d), 1.0, c.dtype, device)?;
    let kv = randn((c.b, c.hkv, c.t, c.d), 1.0, c.dtype, device)?;
    let picked = uses_flash_kernel(&q, &cfg);
    let (_, saved) = attention_fwd(&q, &kv, &kv, &cfg, None)?;
    let lse_dtype = saved.lse.dtype();
    Ok((
        picked && lse_dtype == DType::F32,
        format!("uses_flash_kernel = {picked}, saved lse dtype {lse_dtype:?} (kernel: F32; set QDISTILL_ATTENTION=reference to force the reference path)"),
    ))
}

/// Median times of the kernel's forward and backward (and of the reference path at B=2)
/// at the Llama 3 8B attention shape, with TFLOP/s of the causal products.
pub fn flash_bench(device: &Device) -> anyhow::Result<String> {
    let (hq, hkv, d) = (32usize, 8usize, 128usize);
    let mut lines = Vec::new();
    for (b, t) in [(2usize, 2048usize), (4, 2048)] {
        let c = Case { b, hq, hkv, t, d, window: None, softcap: None, segs: Segs::None, dtype: DType::BF16, qk_std: 1.0 };
        let cfg = config(&c);
        let q = randn((b, hq, t, d), 1.0, DType::BF16, device)?;
        let k = randn((b, hkv, t, d), 1.0, DType::BF16, device)?;
        let v = randn((b, hkv, t, d), 1.0, DType::BF16, device)?;
        let dout = randn((b, hq, t, d), 1.0, DType::BF16, device)?;
        // Causal: half of the T × T products; fwd QKᵀ and PV, bwd five products = 2.5× fwd.
        let fwd_flop = 2.0 * 2.0 * (b * hq * t * t * d) as f64 / 2.0;
        let bwd_flop = 2.5 * fwd_flop;
        let median = |v: Vec<f64>| v[v.len() / 2];
        let fwd_ms = median(time_on_stream(device, 3, 20, || flash_attn_fwd(&q, &k, &v, &cfg, None, OutputInit::Uninit).map(|_| ()))?);
        let (out, lse) = flash_attn_fwd(&q, &k, &v, &cfg, None, OutputInit::Uninit)?;
        let bwd_ms = median(time_on_stream(device, 3, 20, || {
            flash_attn_bwd(&dout, &q, &k, &v, &out, &lse, &cfg, None, OutputInit::Uninit).map(|_| ())
        })?);
        let tflops = |flop: f64, ms: f64| flop / (ms * 1e-3) / 1e12;
        lines.push(format!(
            "flash B={b} T={t} Hq={hq} Hkv={hkv} D={d} bf16: fwd {fwd_ms:.3} ms ({:.0} TFLOP/s), bwd {bwd_ms:.3} ms ({:.0} TFLOP/s)",
            tflops(fwd_flop, fwd_ms),
            tflops(bwd_flop, bwd_ms)
        ));
        if b == 2 {
            let ref_fwd = median(time_on_stream(device, 1, 10, || attention_fwd_reference(&q, &k, &v, &cfg, None).map(|_| ()))?);
            let (_, saved) = attention_fwd_reference(&q, &k, &v, &cfg, None)?;
            let ref_bwd = median(time_on_stream(device, 1, 10, || {
                attention_bwd_reference(&dout, &saved, &cfg, None).map(|_| ())
            })?);
            lines.push(format!(
                "reference B={b} T={t} bf16: fwd {ref_fwd:.3} ms, bwd {ref_bwd:.3} ms (flash is {:.0}x / {:.0}x faster)",
                ref_fwd / fwd_ms,
                ref_bwd / bwd_ms
            ));
        }
    }
    Ok(lines.join("\n"))
}
