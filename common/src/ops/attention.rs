//! Causal scaled-dot-product attention with grouped-query heads, HF sliding window,
//! Gemma 2 logit soft-capping and packed-segment masking.
//!
//! The forward keeps only the row logsumexp of the masked scores, not the probabilities;
//! the backward rebuilds `P = exp(S - lse)` from q and k, as flash attention does, so the
//! saved state is O(T) per head instead of O(T²).
//!
//! GQA without copying k/v: query head `h` reads kv head `h / group` (HF `repeat_kv`
//! repeats each kv head `group` times in a row), so viewing q as
//! `[B, Hkv, group * T, D]` lines every query row up with its kv head, and one batched
//! matmul per kv head covers the whole group. The same view sums dk/dv over the group for
//! free.
//!
//! [`attention_fwd`] and [`attention_bwd`] run the fused flash-attention kernel
//! ([`crate::kernels::flash`], feature `cuda`) where [`uses_flash_kernel`] says so: bf16 or
//! f16 CUDA tensors with head_dim 64 or 128, unless `QDISTILL_ATTENTION=reference` is set.
//! Everything else takes the reference path ([`attention_fwd_reference`],
//! [`attention_bwd_reference`]), which materialises the `T × T` scores of every head.

use candle_core::{DType, Device, Tensor, D};

use crate::{Error, Result};

#[derive(Debug, Clone, PartialEq)]
pub struct AttnConfig {
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Multiplies `q·k` (usually `head_dim^-0.5`; Gemma uses `query_pre_attn_scalar^-0.5`).
    pub scale: f64,
    /// Query `i` sees key `j` iff `i - window < j <= i` (transformers'
    /// `sliding_window_overlay`: `kv_idx > q_idx - sliding_window`).
    pub sliding_window: Option<usize>,
    /// Gemma 2 `attn_logit_softcapping`: scores become `cap * tanh(scores / cap)` before
    /// masking.
    pub softcap: Option<f64>,
}

/// What the backward needs. `lse` is the logsumexp of each query row's masked scores,
/// `[B, Hq, T]`.
#[derive(Debug, Clone)]
pub struct AttnSaved {
    pub q: Tensor,
    pub k: Tensor,
    pub v: Tensor,
    pub out: Tensor,
    pub lse: Tensor,
}

pub(crate) struct Dims {
    pub(crate) b: usize,
    pub(crate) t: usize,
    pub(crate) group: usize,
}

fn shape_err(op: &str, what: &str, got: &[usize], expected: String) -> Error {
    Error::Msg(format!(
        "{op}: {what} has shape {got:?}, expected {expected}"
    ))
}

pub(crate) fn check(
    op: &str,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cfg: &AttnConfig,
    segment_ids: Option<&Tensor>,
) -> Result<Dims> {
    if cfg.n_heads == 0 || cfg.n_kv_heads == 0 || !cfg.n_heads.is_multiple_of(cfg.n_kv_heads) {
        return Err(Error::Config(format!(
            "attention: {} query heads cannot be grouped over {} kv heads",
            cfg.n_heads, cfg.n_kv_heads
        )));
    }
    if cfg.sliding_window == Some(0) {
        return Err(Error::Config(
            "attention: sliding_window must be at least 1".into(),
        ));
    }
    if let Some(cap) = cfg.softcap {
        if !(cap > 0.0 && cap.is_finite()) {
            return Err(Error::Config(format!(
                "attention: attn_logit_softcapping must be positive, got {cap}"
            )));
        }
    }
    let (b, t) = match q.dims() {
        &[b, h, t, d] if h == cfg.n_heads && d == cfg.head_dim => (b, t),
        got => {
            let want = format!("[B, {}, T, {}]", cfg.n_heads, cfg.head_dim);
            return Err(shape_err(op, "q", got, want));
        }
    };
    let kv_shape = [b, cfg.n_kv_heads, t, cfg.head_dim];
    for (name, x) in [("k", k), ("v", v)] {
        if x.dims() != kv_shape {
            return Err(shape_err(op, name, x.dims(), format!("{kv_shape:?}")));
        }
    }
    if let Some(seg) = segment_ids {
        if seg.dims() != [b, t] {
            return Err(shape_err(
                op,
                "segment_ids",
                seg.dims(),
                format!("[{b}, {t}]"),
            ));
        }
    }
    Ok(Dims {
        b,
        t,
        group: cfg.n_heads / cfg.n_kv_heads,
    })
}

/// Additive mask, 0 where query `i` may see key `j` and -inf elsewhere, shaped
/// `[B or 1, 1, 1, T, T]` to broadcast over `[B, Hkv, group, T, T]` scores. Every row
/// keeps its diagonal, so no row is fully masked and the softmax never divides by zero.
fn mask_bias(
    t: usize,
    cfg: &AttnConfig,
    segment_ids: Option<&Tensor>,
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let pos = Tensor::arange(0i64, t as i64, device)?;
    // dist[i, j] = i - j
    let dist = pos.reshape((t, 1))?.broadcast_sub(&pos.reshape((1, t))?)?;
    let mut allowed = dist.ge(0i64)?;
    if let Some(w) = cfg.sliding_window {
        allowed = (allowed * dist.lt(w as i64)?)?;
    }
    let allowed = match segment_ids {
        Some(seg) => {
            let (b, _) = seg.dims2()?;
            let same = seg.unsqueeze(2)?.broadcast_eq(&seg.unsqueeze(1)?)?;
            allowed
                .unsqueeze(0)?
                .broadcast_mul(&same)?
                .reshape((b, 1, 1, t, t))?
        }
        None => allowed.reshape((1, 1, 1, t, t))?,
    };
    let zero = Tensor::zeros((), dtype, device)?.broadcast_as(allowed.shape())?;
    let neg_inf = Tensor::full(f64::NEG_INFINITY, (), device)?
        .to_dtype(dtype)?
        .broadcast_as(allowed.shape())?;
    Ok(allowed.where_cond(&zero, &neg_inf)?)
}

/// Scaled (and soft-capped) scores `[B, Hkv, group, T, T]`, before masking, and
/// `tanh(raw / cap)` when soft-capping, which the backward needs.
fn scores(
    q_grouped: &Tensor,
    k: &Tensor,
    cfg: &AttnConfig,
    dims: &Dims,
) -> Result<(Tensor, Option<Tensor>)> {
    let Dims { b, t, group } = *dims;
    let raw = (q_grouped.matmul(&k.t()?)? * cfg.scale)?;
    let (s, th) = match cfg.softcap {
        Some(cap) => {
            let th = (raw / cap)?.tanh()?;
            ((&th * cap)?, Some(th))
        }
        None => (raw, None),
    };
    Ok((s.reshape((b, cfg.n_kv_heads, group, t, t))?, th))
}

/// Set to `reference` to keep every attention call on the reference path (for comparing
/// the two on a GPU).
pub const ATTENTION_PATH_ENV: &str = "QDISTILL_ATTENTION";

#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn reference_forced() -> bool {
    static FORCED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *FORCED.get_or_init(|| std::env::var(ATTENTION_PATH_ENV).is_ok_and(|v| v == "reference"))
}

/// A linear layer's output viewed as `[B, T, H, D]`, copied to the `[B, H, T, D]` layout
/// attention reads (one vectorised copy on CUDA).
pub fn heads_to_bhtd(x: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if x.rank() == 4 && crate::kernels::fused::applies(&[x]) {
        return crate::kernels::fused::transpose_heads(x, crate::kernels::fused::HeadLayout::Bthd);
    }
    Ok(x.transpose(1, 2)?.contiguous()?)
}

/// The reverse of [`heads_to_bhtd`]: `[B, H, T, D]` to `[B, T, H, D]`, ready to reshape
/// into a linear layer's `[B·T, H·D]` input or gradient.
pub fn heads_to_bthd(x: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if x.rank() == 4 && crate::kernels::fused::applies(&[x]) {
        return crate::kernels::fused::transpose_heads(x, crate::kernels::fused::HeadLayout::Bhtd);
    }
    Ok(x.transpose(1, 2)?.contiguous()?)
}

/// Whether [`attention_fwd`] / [`attention_bwd`] run the flash-attention kernel for these
/// inputs (always false without the `cuda` feature).
pub fn uses_flash_kernel(q: &Tensor, cfg: &AttnConfig) -> bool {
    #[cfg(feature = "cuda")]
    {
        !reference_forced() && crate::kernels::flash::flash_supported(q, cfg)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (q, cfg);
        false
    }
}

/// `q`: `[B, Hq, T, D]`, `k`, `v`: `[B, Hkv, T, D]`, `segment_ids`: `[B, T]` u32 or i64
/// (tokens attend only within their own segment). Returns `[B, Hq, T, D]`.
pub fn attention_fwd(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cfg: &AttnConfig,
    segment_ids: Option<&Tensor>,
) -> Result<(Tensor, AttnSaved)> {
    #[cfg(feature = "cuda")]
    if uses_flash_kernel(q, cfg) {
        use crate::kernels::flash::{flash_attn_fwd, OutputInit};
        // Saved contiguous, so that the backward does not copy them again.
        let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
        let (out, lse) = flash_attn_fwd(&q, &k, &v, cfg, segment_ids, OutputInit::Uninit)?;
        let saved = AttnSaved { q, k, v, out: out.clone(), lse };
        return Ok((out, saved));
    }
    attention_fwd_reference(q, k, v, cfg, segment_ids)
}

/// [`attention_fwd`] on the reference path, whatever the device and dtype.
pub fn attention_fwd_reference(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cfg: &AttnConfig,
    segment_ids: Option<&Tensor>,
) -> Result<(Tensor, AttnSaved)> {
    let dims = check("attention_fwd", q, k, v, cfg, segment_ids)?;
    let Dims { b, t, group } = dims;
    let (hkv, d) = (cfg.n_kv_heads, cfg.head_dim);
    let q_grouped = q.reshape((b, hkv, group * t, d))?;
    let (s, _) = scores(&q_grouped, k, cfg, &dims)?;
    let s = s.broadcast_add(&mask_bias(t, cfg, segment_ids, q.dtype(), q.device())?)?;
    let m = s.max_keepdim(D::Minus1)?;
    let e = s.broadcast_sub(&m)?.exp()?;
    let l = e.sum_keepdim(D::Minus1)?;
    let p = e.broadcast_div(&l)?;
    let lse = (m + l.log()?)?.reshape((b, cfg.n_heads, t))?;
    let out = p
        .reshape((b, hkv, group * t, t))?
        .matmul(v)?
        .reshape((b, cfg.n_heads, t, d))?;
    let saved = AttnSaved {
        q: q.clone(),
        k: k.clone(),
        v: v.clone(),
        out: out.clone(),
        lse,
    };
    Ok((out, saved))
}

/// Returns `(dq, dk, dv)`; dk and dv are `[B, Hkv, T, D]`, summed over each query group.
pub fn attention_bwd(
    dout: &Tensor,
    saved: &AttnSaved,
    cfg: &AttnConfig,
    segment_ids: Option<&Tensor>,
) -> Result<(Tensor, Tensor, Tensor)> {
    #[cfg(feature = "cuda")]
    if uses_flash_kernel(&saved.q, cfg) {
        use crate::kernels::flash::{flash_attn_bwd, OutputInit};
        let AttnSaved { q, k, v, out, lse } = saved;
        return flash_attn_bwd(dout, q, k, v, out, lse, cfg, segment_ids, OutputInit::Uninit);
    }
    attention_bwd_reference(dout, saved, cfg, segment_ids)
}

/// [`attention_bwd`] on the reference path, whatever the device and dtype.
pub fn attention_bwd_reference(
    dout: &Tensor,
    saved: &AttnSaved,
    cfg: &AttnConfig,
    segment_ids: Option<&Tensor>,
) -> Result<(Tensor, Tensor, Tensor)> {
    let AttnSaved { q, k, v, out, lse } = saved;
    let dims = check("attention_bwd", q, k, v, cfg, segment_ids)?;
    if dout.dims() != q.dims() {
        return Err(shape_err(
            "attention_bwd",
            "dout",
            dout.dims(),
            format!("{:?}", q.dims()),
        ));
    }
    let Dims { b, t, group } = dims;
    let (hkv, d) = (cfg.n_kv_heads, cfg.head_dim);
    let grouped = |x: &Tensor| x.reshape((b, hkv, group * t, d));
    let (q_g, do_g, out_g) = (grouped(q)?, grouped(dout)?, grouped(out)?);

    let (s, th) = scores(&q_g, k, cfg, &dims)?;
    let s = s.broadcast_add(&mask_bias(t, cfg, segment_ids, q.dtype(), q.device())?)?;
    // The kernel saves lse in f32 whatever the input dtype.
    let lse = lse.to_dtype(q.dtype())?.reshape((b, hkv, group, t, 1))?;
    let p = s
        .broadcast_sub(&lse)?
        .exp()?
        .reshape((b, hkv, group * t, t))?;

    let dv = p.t()?.matmul(&do_g)?;
    let dp = do_g.matmul(&v.t()?)?;
    // rowsum(dP ∘ P) equals rowsum(dO ∘ O), which is O(T·D) instead of O(T²).
    let delta = (&do_g * &out_g)?.sum_keepdim(D::Minus1)?;
    let mut ds = (&p * dp.broadcast_sub(&delta)?)?;
    if let Some(th) = th {
        // d/dx cap·tanh(x/cap) = 1 - tanh²(x/cap)
        ds = (ds * th.sqr()?.affine(-1.0, 1.0)?)?;
    }
    let ds = (ds * cfg.scale)?;
    let dq = ds.matmul(k)?.reshape((b, cfg.n_heads, t, d))?;
    let dk = ds.t()?.matmul(&q_g)?;
    Ok((dq, dk, dv))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testutil::{assert_close, assert_close_vec, fd_grad, rand_tensor, to_f64_vec};
    use candle_core::Var;

    const B: usize = 2;
    const T: usize = 7;

    fn cfg(d: usize, sliding_window: Option<usize>, softcap: Option<f64>) -> AttnConfig {
        AttnConfig {
            n_heads: 4,
            n_kv_heads: 2,
            head_dim: d,
            scale: 1.0 / (d as f64).sqrt(),
            sliding_window,
            softcap,
        }
    }

    fn segments() -> Tensor {
        // Row 0: two packed sequences; row 1: three, the last one of length 2.
        Tensor::new(
            &[[0u32, 0, 0, 1, 1, 1, 1], [0, 0, 1, 1, 1, 2, 2]],
            &Device::Cpu,
        )
        .unwrap()
    }

    /// The cases every test runs: plain GQA, a window smaller than T, soft-capping,
    /// packed segments, and all of them at once.
    fn cases(d: usize) -> Vec<(&'static str, AttnConfig, Option<Tensor>)> {
        vec![
            ("gqa", cfg(d, None, None), None),
            ("window", cfg(d, Some(3), None), None),
            ("softcap", cfg(d, None, Some(1.5)), None),
            ("segments", cfg(d, None, None), Some(segments())),
            ("all", cfg(d, Some(2), Some(1.5)), Some(segments())),
        ]
    }

    /// Whether query i of batch row b may see key j, straight from the HF definitions.
    fn visible(c: &AttnConfig, seg: Option<&Vec<Vec<u32>>>, b: usize, i: usize, j: usize) -> bool {
        let causal = j <= i;
        // `i - j < w`, written so that it cannot underflow above the diagonal.
        let in_window = c.sliding_window.is_none_or(|w| i < j + w);
        let same_segment = seg.is_none_or(|s| s[b][i] == s[b][j]);
        causal && in_window && same_segment
    }

    /// Plain loops in f64: returns (out [B,Hq,T,D], lse [B,Hq,T]).
    fn naive(
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        c: &AttnConfig,
        seg: Option<&Tensor>,
    ) -> (Vec<f64>, Vec<f64>) {
        let (b, hq, t, d) = q.dims4().unwrap();
        let hkv = c.n_kv_heads;
        let (qv, kv, vv) = (to_f64_vec(q), to_f64_vec(k), to_f64_vec(v));
        let seg = seg.map(|s| s.to_vec2::<u32>().unwrap());
        let (mut out, mut lse) = (vec![0.0; b * hq * t * d], vec![0.0; b * hq * t]);
        for bi in 0..b {
            for h in 0..hq {
                let kh = h / (hq / hkv);
                for i in 0..t {
                    let qrow = &qv[((bi * hq + h) * t + i) * d..][..d];
                    let mut logits = Vec::new();
                    for j in 0..t {
                        if !visible(c, seg.as_ref(), bi, i, j) {
                            continue;
                        }
                        let krow = &kv[((bi * hkv + kh) * t + j) * d..][..d];
                        let mut s: f64 = qrow.iter().zip(krow).map(|(a, b)| a * b).sum();
                        s *= c.scale;
                        if let Some(cap) = c.softcap {
                            s = cap * (s / cap).tanh();
                        }
                        logits.push((j, s));
                    }
                    let m = logits.iter().map(|x| x.1).fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = logits.iter().map(|x| (x.1 - m).exp()).sum();
                    lse[(bi * hq + h) * t + i] = m + z.ln();
                    for (j, s) in logits {
                        let p = (s - m).exp() / z;
                        let vrow = &vv[((bi * hkv + kh) * t + j) * d..][..d];
                        for e in 0..d {
                            out[((bi * hq + h) * t + i) * d + e] += p * vrow[e];
                        }
                    }
                }
            }
        }
        (out, lse)
    }

    /// The same attention built from candle ops on `Var`s: HF `repeat_kv`, explicit mask,
    /// softmax by hand. Returns the loss `sum(out * dout)`'s gradients for q, k, v.
    fn autograd_grads(
        q: &Var,
        k: &Var,
        v: &Var,
        c: &AttnConfig,
        seg: Option<&Tensor>,
        dout: &Tensor,
    ) -> (Tensor, Tensor, Tensor) {
        let (b, hq, t, _) = q.dims4().unwrap();
        let group = hq / c.n_kv_heads;
        let rep: Vec<u32> = (0..hq as u32).map(|h| h / group as u32).collect();
        let rep = Tensor::new(rep.as_slice(), &Device::Cpu).unwrap();
        let k_rep = k.as_tensor().index_select(&rep, 1).unwrap();
        let v_rep = v.as_tensor().index_select(&rep, 1).unwrap();
        let mut s = (q.as_tensor().matmul(&k_rep.t().unwrap()).unwrap() * c.scale).unwrap();
        if let Some(cap) = c.softcap {
            s = ((s / cap).unwrap().tanh().unwrap() * cap).unwrap();
        }
        let seg_v = seg.map(|s| s.to_vec2::<u32>().unwrap());
        let mut mask = Vec::new();
        for bi in 0..b {
            for i in 0..t {
                for j in 0..t {
                    mask.push(visible(c, seg_v.as_ref(), bi, i, j) as u8);
                }
            }
        }
        let mask = Tensor::from_vec(mask, (b, 1, t, t), &Device::Cpu)
            .unwrap()
            .broadcast_as(s.shape())
            .unwrap();
        let neg_inf = Tensor::full(f32::NEG_INFINITY, s.shape(), &Device::Cpu).unwrap();
        let s = mask.where_cond(&s, &neg_inf).unwrap();
        let m = s.detach().max_keepdim(3).unwrap();
        let e = s.broadcast_sub(&m).unwrap().exp().unwrap();
        let p = e.broadcast_div(&e.sum_keepdim(3).unwrap()).unwrap();
        let out = p.matmul(&v_rep).unwrap();
        let grads = (out * dout).unwrap().sum_all().unwrap().backward().unwrap();
        let g = |x: &Var| grads.get(x.as_tensor()).unwrap().clone();
        (g(q), g(k), g(v))
    }

    #[test]
    fn forward_matches_naive_loops() {
        let d = 8;
        for (name, c, seg) in cases(d) {
            // Inputs scaled up so that soft-capping changes the scores noticeably.
            let q = (rand_tensor(1, (B, 4, T, d), DType::F32) * 2.0).unwrap();
            let k = (rand_tensor(2, (B, 2, T, d), DType::F32) * 2.0).unwrap();
            let v = rand_tensor(3, (B, 2, T, d), DType::F32);
            let (out, saved) = attention_fwd(&q, &k, &v, &c, seg.as_ref()).unwrap();
            let (want_out, want_lse) = naive(&q, &k, &v, &c, seg.as_ref());
            assert_close_vec(
                &to_f64_vec(&out),
                &want_out,
                1e-5,
                1e-4,
                &format!("{name} out"),
            );
            assert_close_vec(
                &to_f64_vec(&saved.lse),
                &want_lse,
                1e-5,
                1e-4,
                &format!("{name} lse"),
            );
        }
    }

    #[test]
    fn backward_matches_candle_autograd() {
        let d = 8;
        for (name, c, seg) in cases(d) {
            let q = Var::from_tensor(&(rand_tensor(4, (B, 4, T, d), DType::F32) * 2.0).unwrap())
                .unwrap();
            let k = Var::from_tensor(&(rand_tensor(5, (B, 2, T, d), DType::F32) * 2.0).unwrap())
                .unwrap();
            let v = Var::from_tensor(&rand_tensor(6, (B, 2, T, d), DType::F32)).unwrap();
            let dout = rand_tensor(7, (B, 4, T, d), DType::F32);
            let (want_dq, want_dk, want_dv) = autograd_grads(&q, &k, &v, &c, seg.as_ref(), &dout);

            let (_, saved) = attention_fwd(&q, &k, &v, &c, seg.as_ref()).unwrap();
            let (dq, dk, dv) = attention_bwd(&dout, &saved, &c, seg.as_ref()).unwrap();
            assert_close(&dq, &want_dq, 1e-5, 1e-4, &format!("{name} dq"));
            assert_close(&dk, &want_dk, 1e-5, 1e-4, &format!("{name} dk"));
            assert_close(&dv, &want_dv, 1e-5, 1e-4, &format!("{name} dv"));
        }
    }

    #[test]
    fn backward_matches_finite_differences_f64() {
        let d = 3;
        for (name, c, seg) in cases(d) {
            let q = (rand_tensor(8, (B, 4, T, d), DType::F64) * 2.0).unwrap();
            let k = (rand_tensor(9, (B, 2, T, d), DType::F64) * 2.0).unwrap();
            let v = rand_tensor(10, (B, 2, T, d), DType::F64);
            let dout = rand_tensor(11, (B, 4, T, d), DType::F64);
            let seg = seg.as_ref();
            let (_, saved) = attention_fwd(&q, &k, &v, &c, seg).unwrap();
            let (dq, dk, dv) = attention_bwd(&dout, &saved, &c, seg).unwrap();
            let out = |q: &Tensor, k: &Tensor, v: &Tensor| Ok(attention_fwd(q, k, v, &c, seg)?.0);
            let h = 1e-5;
            let fd_q = fd_grad(|x| out(x, &k, &v), &q, &dout, h);
            let fd_k = fd_grad(|x| out(&q, x, &v), &k, &dout, h);
            let fd_v = fd_grad(|x| out(&q, &k, x), &v, &dout, h);
            assert_close(&dq, &fd_q, 1e-8, 1e-6, &format!("{name} dq vs fd"));
            assert_close(&dk, &fd_k, 1e-8, 1e-6, &format!("{name} dk vs fd"));
            assert_close(&dv, &fd_v, 1e-8, 1e-6, &format!("{name} dv vs fd"));
        }
    }

    #[test]
    fn bad_inputs_are_typed_errors() {
        let d = 4;
        let q = rand_tensor(12, (1, 4, 3, d), DType::F32);
        let kv = rand_tensor(13, (1, 2, 3, d), DType::F32);
        let err = |c: &AttnConfig, k: &Tensor, seg: Option<&Tensor>| {
            attention_fwd(&q, k, &kv, c, seg).unwrap_err().to_string()
        };
        let e = err(&cfg(d, None, None), &q, None);
        assert!(
            e.contains("k has shape [1, 4, 3, 4], expected [1, 2, 3, 4]"),
            "{e}"
        );
        let e = err(
            &AttnConfig {
                n_kv_heads: 3,
                ..cfg(d, None, None)
            },
            &kv,
            None,
        );
        assert!(
            e.contains("4 query heads cannot be grouped over 3 kv heads"),
            "{e}"
        );
        let e = err(&cfg(d, Some(0), None), &kv, None);
        assert!(e.contains("sliding_window must be at least 1"), "{e}");
        let e = err(&cfg(d, None, Some(0.0)), &kv, None);
        assert!(e.contains("softcapping must be positive"), "{e}");
        let e = err(&cfg(d, None, None), &kv, Some(&segments()));
        assert!(
            e.contains("segment_ids has shape [2, 7], expected [1, 3]"),
            "{e}"
        );
        let (_, saved) = attention_fwd(&q, &kv, &kv, &cfg(d, None, None), None).unwrap();
        let e = attention_bwd(&kv, &saved, &cfg(d, None, None), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("dout has shape"), "{e}");
    }
}
