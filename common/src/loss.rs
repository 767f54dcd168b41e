//! Fused LM head + cross-entropy + distillation loss, chunked over tokens.
//!
//! A full `[N, V]` fp32 logits tensor at N = 8192, V = 128K is 4 GiB, and the unfused
//! backward needs several of them. Here the student's final normed hidden states go
//! through the LM head one chunk of `chunk_tokens` rows at a time: the chunk's logits,
//! its loss terms and its dlogits live only inside the loop, and only `dh = dlogits · W`
//! leaves it. The head is frozen, so there is no dW.
//!
//! Masked tokens (label -100) contribute nothing, so they are dropped before the head
//! matmul: prompt tokens, often most of a chat sample, cost no vocabulary work.
//!
//! [`fused_linear_distill_reference`] does the loss math as device-agnostic candle code
//! in f32; per-token sums are added up in f64 on the host. On a CUDA device (feature
//! `cuda`, bf16 or f32 inputs, every teacher form but top-k), [`fused_linear_distill`]
//! runs `kernels::loss` instead: the three GEMMs straight through cuBLAS into reused
//! buffers and one row kernel for all the math between them, with dlogits written over
//! the logits in place.

use candle_core::{DType, Device, Tensor, D};

use crate::{Error, Result};

/// Label value of tokens that take no part in the loss (HF's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

/// Floor for probabilities of the top-k tail buckets, so that an empty tail (K covering
/// the whole support, or a teacher whose top-k mass rounds to 1) keeps finite logs.
const TAIL_FLOOR: f32 = f32::MIN_POSITIVE;

/// Divergence between the teacher distribution p = softmax(z_t/T) and the student
/// distribution q = softmax(z_s/T).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KdLoss {
    /// KL(p ‖ q): mass-covering.
    ForwardKl,
    /// KL(q ‖ p): mode-seeking.
    ReverseKl,
    /// Generalized Jensen-Shannon divergence as TRL's `GKDTrainer.generalized_jsd_loss`:
    /// with m = β·p + (1-β)·q, JSD_β = β·KL(p ‖ m) + (1-β)·KL(q ‖ m); TRL special-cases
    /// β = 0 as forward KL and β = 1 as reverse KL (the formula itself tends to 0 at both
    /// ends), and so does this.
    Jsd { beta: f64 },
}

#[derive(Debug, Clone, PartialEq)]
pub struct LossConfig {
    pub ce_weight: f64,
    pub kd_weight: f64,
    pub kd: KdLoss,
    pub temperature: f64,
    /// Rows of the LM head matmul per chunk: bounds the transient `[chunk, V]` buffers.
    pub chunk_tokens: usize,
    /// Gemma2's `final_logit_softcapping`: logits become cap·tanh(z/cap).
    pub student_softcap: Option<f64>,
}

/// What the teacher sends for the same N tokens as the student's `h`.
#[derive(Debug, Clone, Copy)]
pub enum TeacherOutput<'a> {
    /// Plain supervised fine-tuning: no KD term.
    None,
    /// `[N, Vt]` teacher logits, as the teacher's forward returns them (already
    /// softcapped where the teacher's model does so).
    Logits(&'a Tensor),
    /// The teacher's final normed hidden states `[N, dt]` and its LM head `[Vt, dt]`; the
    /// head is applied inside the chunk loop, so teacher logits never exist in full either.
    Hidden {
        h: &'a Tensor,
        lm_head: &'a Tensor,
        softcap: Option<f64>,
    },
    /// Sparse KD: the teacher's top-K log-probabilities at the training temperature
    /// `[N, K]` and their vocabulary indices `[N, K]` (u32 or i64). The mass outside the
    /// top K (1 - Σp for the teacher, 1 - Σq for the student) is kept as one extra bucket
    /// of both distributions, so the divergence is over K + 1 outcomes.
    TopK {
        logprobs: &'a Tensor,
        indices: &'a Tensor,
    },
}

#[derive(Debug, Clone)]
pub struct LossOutput {
    /// Σ over tokens with a label of -log softmax(z_s)[label] (temperature 1).
    pub ce_sum: f64,
    /// Σ over the same tokens of the per-token divergence at temperature T (no T² factor).
    pub kd_sum: f64,
    /// Tokens with a label, i.e. the tokens both sums run over.
    pub n_tokens: usize,
    /// Gradient of grad_scale·(ce_weight·ce_sum + kd_weight·T²·kd_sum) with respect to
    /// `h`, `[N, d]`, in `h`'s dtype; zero rows at masked tokens.
    pub dh: Tensor,
}

/// Checks hidden states `[n, d]` against an LM head `[v, d]` of the same dtype; returns
/// (n, d, v). Errors name the inputs as the caller knows them.
fn check_head(h_name: &str, h: &Tensor, w_name: &str, w: &Tensor) -> Result<(usize, usize, usize)> {
    let (n, d) = dims2(h_name, h)?;
    let (v, d_head) = dims2(w_name, w)?;
    if d_head != d {
        return Err(input_err(
            w_name,
            format!("has shape [{v}, {d_head}], but `{h_name}` is [{n}, {d}]: hidden sizes differ"),
        ));
    }
    if h.dtype() != w.dtype() {
        return Err(input_err(w_name, format!("has dtype {:?}, but `{h_name}` has {:?}", w.dtype(), h.dtype())));
    }
    Ok((n, d, v))
}

/// Loss and dL/dh of the student's LM head over `h` `[N, d]` with frozen `lm_head`
/// `[Vs, d]`, without materialising full logits. See [`LossOutput`] for what is returned;
/// the objective is grad_scale·(ce_weight·ce_sum + kd_weight·T²·kd_sum), where the caller
/// puts 1/(tokens in the accumulated batch) into `grad_scale`.
///
/// When the student and teacher vocabularies differ in size (padded vocabularies of one
/// tokenizer), KD runs over the first min(Vs, Vt) entries of both; CE always uses the
/// student's full vocabulary. With `TopK`, the student's KD distribution is over its full
/// vocabulary and the indices must be below Vs.
pub fn fused_linear_distill(
    h: &Tensor,
    lm_head: &Tensor,
    labels: &[i64],
    teacher: TeacherOutput,
    cfg: &LossConfig,
    grad_scale: f64,
) -> Result<LossOutput> {
    #[cfg(feature = "cuda")]
    if crate::kernels::loss::applies(h, lm_head, &teacher) {
        return crate::kernels::loss::fused_linear_distill_cuda(h, lm_head, labels, teacher, cfg, grad_scale);
    }
    fused_linear_distill_reference(h, lm_head, labels, teacher, cfg, grad_scale)
}

/// [`fused_linear_distill`] as a chain of candle ops over each `[chunk, V]` block, on any
/// device: the CPU implementation, the reference of the CUDA kernel path, and the path for
/// inputs that path does not take (top-k teachers, f16, or `QDISTILL_FUSED_KERNELS=0`).
pub fn fused_linear_distill_reference(
    h: &Tensor,
    lm_head: &Tensor,
    labels: &[i64],
    teacher: TeacherOutput,
    cfg: &LossConfig,
    grad_scale: f64,
) -> Result<LossOutput> {
    let Checked { n, d, vs, valid } = check_inputs(h, lm_head, labels, cfg, grad_scale)?;
    let teacher = Teacher::new(teacher, n, vs, h.device())?;

    let dev = h.device();
    let mut ce_sum = 0f64;
    let mut kd_sum = 0f64;
    let mut dh_chunks = Vec::with_capacity(valid.len().div_ceil(cfg.chunk_tokens));
    let w_t = lm_head.t()?;
    for rows in valid.chunks(cfg.chunk_tokens) {
        let c = rows.len();
        let row_ids = Tensor::new(rows, dev)?;
        let hc = take_rows(h, rows, &row_ids)?;
        let (zs, dcap) = softcap(&hc.matmul(&w_t)?.to_dtype(DType::F32)?, cfg.student_softcap)?;

        // Cross-entropy at T = 1 over the full student vocabulary; dz = softmax - onehot.
        let chunk_labels: Vec<u32> = rows.iter().map(|&r| labels[r as usize] as u32).collect();
        let label_ids = Tensor::from_vec(chunk_labels, (c, 1), dev)?;
        let log_p1 = log_softmax(&zs)?;
        ce_sum -= sum_f64(&log_p1.gather(&label_ids, 1)?)?;
        let mut dz =
            log_p1
                .exp()?
                .scatter_add(&label_ids, &Tensor::full(-1f32, (c, 1), dev)?, 1)?;
        dz = (dz * cfg.ce_weight)?;

        if let Some((kd_rows, du)) = teacher.chunk_divergence(cfg, &zs, rows, &row_ids)? {
            kd_sum += sum_f64(&kd_rows)?;
            // u = z/T and the KD term carries T², so dz = kd_weight·T·du.
            let du = (du * (cfg.kd_weight * cfg.temperature))?;
            let du = if du.dim(1)? < vs {
                du.pad_with_zeros(1, 0, vs - du.dim(1)?)?
            } else {
                du
            };
            dz = (dz + du)?;
        }

        let mut dz = (dz * grad_scale)?;
        if let Some(dcap) = dcap {
            dz = (dz * dcap)?;
        }
        dh_chunks.push(dz.to_dtype(lm_head.dtype())?.matmul(lm_head)?);
    }

    let dh = if dh_chunks.is_empty() {
        Tensor::zeros((n, d), h.dtype(), dev)?
    } else {
        let dh_valid = Tensor::cat(&dh_chunks, 0)?;
        if valid.len() == n {
            dh_valid
        } else {
            let ids = Tensor::new(valid.as_slice(), dev)?;
            Tensor::zeros((n, d), dh_valid.dtype(), dev)?.index_add(&ids, &dh_valid, 0)?
        }
        .to_dtype(h.dtype())?
    };
    Ok(LossOutput {
        ce_sum,
        kd_sum,
        n_tokens: valid.len(),
        dh,
    })
}

/// Sizes of validated inputs: `h` `[n, d]`, a student vocabulary of `vs`, and the rows
/// of `h` that carry a label (the rows both loss sums run over).
pub(crate) struct Checked {
    pub n: usize,
    pub d: usize,
    pub vs: usize,
    pub valid: Vec<u32>,
}

/// The checks every path runs before any device work: config, head shapes, labels.
pub(crate) fn check_inputs(h: &Tensor, lm_head: &Tensor, labels: &[i64], cfg: &LossConfig, grad_scale: f64) -> Result<Checked> {
    validate_config(cfg, grad_scale)?;
    let (n, d, vs) = check_head("h", h, "lm_head", lm_head)?;
    if labels.len() != n {
        return Err(input_err(
            "labels",
            format!("has {} entries, but `h` has {n} rows", labels.len()),
        ));
    }
    let valid = valid_rows(labels, vs)?;
    Ok(Checked { n, d, vs, valid })
}

/// The teacher input after validation, with what every chunk needs.
pub(crate) enum Teacher<'a> {
    None,
    Logits {
        logits: &'a Tensor,
        v_kd: usize,
    },
    Hidden {
        h: &'a Tensor,
        lm_head: &'a Tensor,
        softcap: Option<f64>,
        v_kd: usize,
    },
    TopK {
        logprobs: Tensor,
        indices: Tensor,
    },
}

impl<'a> Teacher<'a> {
    pub(crate) fn new(t: TeacherOutput<'a>, n: usize, vs: usize, dev: &Device) -> Result<Self> {
        Ok(match t {
            TeacherOutput::None => Teacher::None,
            TeacherOutput::Logits(logits) => {
                let (rows, vt) = dims2("teacher logits", logits)?;
                if rows != n {
                    return Err(input_err(
                        "teacher logits",
                        format!("has {rows} rows, but `h` has {n}"),
                    ));
                }
                Teacher::Logits {
                    logits,
                    v_kd: vs.min(vt),
                }
            }
            TeacherOutput::Hidden {
                h,
                lm_head,
                softcap,
            } => {
                let (rows, _, vt) = check_head("teacher h", h, "teacher lm_head", lm_head)?;
                if rows != n {
                    return Err(input_err(
                        "teacher h",
                        format!("has {rows} rows, but `h` has {n}"),
                    ));
                }
                check_softcap("teacher softcap", softcap)?;
                Teacher::Hidden {
                    h,
                    lm_head,
                    softcap,
                    v_kd: vs.min(vt),
                }
            }
            TeacherOutput::TopK { logprobs, indices } => {
                let (rows, k) = dims2("teacher top-k logprobs", logprobs)?;
                if rows != n || k == 0 {
                    return Err(input_err(
                        "teacher top-k logprobs",
                        format!("has shape [{rows}, {k}], expected [{n}, K] with K >= 1"),
                    ));
                }
                if indices.dims() != logprobs.dims() {
                    return Err(input_err(
                        "teacher top-k indices",
                        format!(
                            "has shape {:?}, but the logprobs are {:?}",
                            indices.dims(),
                            logprobs.dims()
                        ),
                    ));
                }
                let logprobs = logprobs.to_dtype(DType::F32)?;
                check_topk_logprobs(&logprobs)?;
                // A teacher probability of exactly 0 (log-prob -inf) would make p·log p NaN.
                let logprobs = logprobs.clamp(TAIL_FLOOR.ln(), 0f32)?;
                let indices = check_topk_indices(indices, vs)?;
                Teacher::TopK {
                    logprobs,
                    indices: Tensor::from_vec(indices, (n, k), dev)?,
                }
            }
        })
    }

    /// The per-row divergence `[c]` and its gradient with respect to the student's
    /// tempered logits u = z_s/T, `[c, V_kd]` (V_kd <= Vs), for the chunk `rows`.
    fn chunk_divergence(
        &self,
        cfg: &LossConfig,
        zs: &Tensor,
        rows: &[u32],
        row_ids: &Tensor,
    ) -> Result<Option<(Tensor, Tensor)>> {
        let t = cfg.temperature;
        let full = |zt: Tensor, v_kd: usize| -> Result<Option<(Tensor, Tensor)>> {
            let log_p = log_softmax(&(zt.narrow(1, 0, v_kd)? / t)?)?;
            let log_q = log_softmax(&(zs.narrow(1, 0, v_kd)? / t)?)?;
            divergence(cfg.kd, &log_q, &log_p).map(Some)
        };
        match self {
            Teacher::None => Ok(None),
            Teacher::Logits { logits, v_kd } => full(
                take_rows(logits, rows, row_ids)?.to_dtype(DType::F32)?,
                *v_kd,
            ),
            Teacher::Hidden {
                h,
                lm_head,
                softcap: cap,
                v_kd,
            } => {
                let zt = take_rows(h, rows, row_ids)?
                    .matmul(&lm_head.t()?)?
                    .to_dtype(DType::F32)?;
                full(softcap(&zt, *cap)?.0, *v_kd)
            }
            Teacher::TopK { logprobs, indices } => {
                let log_p_k = take_rows(logprobs, rows, row_ids)?;
                let idx = take_rows(indices, rows, row_ids)?;
                topk_divergence(cfg.kd, &log_softmax(&(zs / t)?)?, &log_p_k, &idx).map(Some)
            }
        }
    }
}

/// Top-k divergence over K + 1 buckets (the K teacher indices and the rest).
///
/// With q the student distribution over the full vocabulary and Q_b its bucket sums, the
/// chain rule through the bucket sums gives dD/du_j = (q_j / Q_b(j)) · dD/dU_b, where
/// dD/dU_b is the gradient the divergence would have if the buckets were logits. For the
/// K singleton buckets q_j / Q_b = 1; tail entries share the tail's gradient pro rata.
fn topk_divergence(
    kd: KdLoss,
    log_q: &Tensor,
    log_p_k: &Tensor,
    idx: &Tensor,
) -> Result<(Tensor, Tensor)> {
    let (c, k) = log_p_k.dims2()?;
    let dev = log_q.device();
    let q = log_q.exp()?;
    let in_topk = Tensor::zeros(log_q.shape(), DType::F32, dev)?.scatter_add(
        idx,
        &Tensor::ones((c, k), DType::F32, dev)?,
        1,
    )?;
    let outside = (1.0 - in_topk)?;
    // Summing the tail directly rather than as 1 - Σq_k keeps a small tail accurate.
    let q_tail = (&q * &outside)?
        .sum_keepdim(1)?
        .clamp(TAIL_FLOOR, f32::INFINITY)?;
    let p_tail = (1.0 - log_p_k.exp()?.sum_keepdim(1)?)?.clamp(TAIL_FLOOR, f32::INFINITY)?;
    let log_q_b = Tensor::cat(&[log_q.gather(idx, 1)?, q_tail.log()?], 1)?;
    let log_p_b = Tensor::cat(&[log_p_k.clone(), p_tail.log()?], 1)?;
    let (d, g_b) = divergence(kd, &log_q_b, &log_p_b)?;

    let g_topk = Tensor::zeros(log_q.shape(), DType::F32, dev)?.scatter_add(
        idx,
        &g_b.narrow(1, 0, k)?.contiguous()?,
        1,
    )?;
    let tail_per_mass = (g_b.narrow(1, k, 1)? / q_tail)?;
    let g_tail = (q * outside)?.broadcast_mul(&tail_per_mass)?;
    Ok((d, (g_topk + g_tail)?))
}

/// Per-row divergence D(p ‖ q) `[c]` and dD/du `[c, B]` where q = softmax(u), from
/// log-probabilities `[c, B]` of the student (`log_q`) and the teacher (`log_p`).
///
/// For a divergence whose partial derivatives in q are G, the softmax Jacobian gives
/// dD/du = q ⊙ (G - Σ q·G). Reverse KL has G = log q - log p + 1, and the generalized JSD
/// has G = (1-β)(log q - log m) (the 1/m terms cancel because m is linear in q).
fn divergence(kd: KdLoss, log_q: &Tensor, log_p: &Tensor) -> Result<(Tensor, Tensor)> {
    let q = log_q.exp()?;
    let forward = || -> Result<(Tensor, Tensor)> {
        let p = log_p.exp()?;
        let d = (&p * (log_p - log_q)?)?.sum(D::Minus1)?;
        Ok((d, (&q - p)?))
    };
    let reverse = || -> Result<(Tensor, Tensor)> {
        let r = (log_q - log_p)?;
        let d = (&q * &r)?.sum_keepdim(D::Minus1)?;
        let g = (&q * r.broadcast_sub(&d)?)?;
        Ok((d.squeeze(D::Minus1)?, g))
    };
    match kd {
        KdLoss::ForwardKl => forward(),
        KdLoss::ReverseKl => reverse(),
        KdLoss::Jsd { beta: 0.0 } => forward(),
        KdLoss::Jsd { beta: 1.0 } => reverse(),
        KdLoss::Jsd { beta } => {
            let log_m = log_add_exp(&(log_q + (1.0 - beta).ln())?, &(log_p + beta.ln())?)?;
            let kl_p_m = (log_p.exp()? * (log_p - &log_m)?)?.sum(D::Minus1)?;
            let r = (log_q - &log_m)?;
            let kl_q_m = (&q * &r)?.sum_keepdim(D::Minus1)?;
            let d = ((kl_p_m * beta)? + (kl_q_m.squeeze(D::Minus1)? * (1.0 - beta))?)?;
            let g = ((&q * r.broadcast_sub(&kl_q_m)?)? * (1.0 - beta))?;
            Ok((d, g))
        }
    }
}

/// Elementwise log(exp(a) + exp(b)), stable for large magnitudes.
fn log_add_exp(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let m = a.maximum(b)?;
    let s = ((a - &m)?.exp()? + (b - &m)?.exp()?)?;
    Ok((m + s.log()?)?)
}

fn log_softmax(z: &Tensor) -> Result<Tensor> {
    let max = z.max_keepdim(D::Minus1)?;
    let shifted = z.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(shifted.broadcast_sub(&lse)?)
}

/// Applies cap·tanh(z/cap) and returns dz_out/dz_in = 1 - tanh² for the backward.
fn softcap(z: &Tensor, cap: Option<f64>) -> Result<(Tensor, Option<Tensor>)> {
    match cap {
        None => Ok((z.clone(), None)),
        Some(cap) => {
            let t = (z / cap)?.tanh()?;
            let dcap = (1.0 - t.sqr()?)?;
            Ok(((t * cap)?, Some(dcap)))
        }
    }
}

fn sum_f64(t: &Tensor) -> Result<f64> {
    Ok(t.flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .map(|&x| x as f64)
        .sum())
}

/// Rows `rows` of `t` (`row_ids` is the same list on the device): a narrow view when they
/// are consecutive, which is the common case of fully supervised packed sequences.
fn take_rows(t: &Tensor, rows: &[u32], row_ids: &Tensor) -> Result<Tensor> {
    let first = rows[0] as usize;
    if rows[rows.len() - 1] as usize - first + 1 == rows.len() {
        Ok(t.narrow(0, first, rows.len())?)
    } else {
        Ok(t.index_select(row_ids, 0)?)
    }
}

/// Row indices of tokens with a label, checking each label against the student vocab.
fn valid_rows(labels: &[i64], vs: usize) -> Result<Vec<u32>> {
    let mut rows = Vec::new();
    for (i, &l) in labels.iter().enumerate() {
        if l == IGNORE_INDEX {
            continue;
        }
        if l < 0 || l as u64 >= vs as u64 {
            return Err(Error::Data(format!(
                "fused_linear_distill: label {l} at token {i} is outside the student vocabulary [0, {vs}) and is not {IGNORE_INDEX}"
            )));
        }
        rows.push(i as u32);
    }
    Ok(rows)
}

fn check_topk_logprobs(logprobs: &Tensor) -> Result<()> {
    for (i, row) in logprobs.to_vec2::<f32>()?.iter().enumerate() {
        if let Some(j) = row.iter().position(|x| x.is_nan() || *x > 1e-4) {
            return Err(input_err(
                "teacher top-k logprobs",
                format!("[{i}, {j}] = {} is not a log-probability", row[j]),
            ));
        }
        let mass: f64 = row.iter().map(|&x| (x as f64).exp()).sum();
        if mass > 1.0 + 1e-3 {
            return Err(input_err(
                "teacher top-k logprobs",
                format!("row {i} has probability mass {mass} > 1: expected log-softmax values"),
            ));
        }
    }
    Ok(())
}

fn check_topk_indices(indices: &Tensor, vs: usize) -> Result<Vec<u32>> {
    let rows: Vec<Vec<i64>> = match indices.dtype() {
        DType::U32 | DType::I64 | DType::U8 => indices.to_dtype(DType::I64)?.to_vec2()?,
        other => {
            return Err(input_err(
                "teacher top-k indices",
                format!("has dtype {other:?}, expected u32 or i64"),
            ))
        }
    };
    let mut flat = Vec::with_capacity(rows.len() * rows.first().map_or(0, Vec::len));
    let mut seen = vec![usize::MAX; vs];
    for (i, row) in rows.iter().enumerate() {
        for &ix in row {
            if ix < 0 || ix as u64 >= vs as u64 {
                return Err(input_err(
                    "teacher top-k indices",
                    format!("row {i} has index {ix}, outside the student vocabulary [0, {vs})"),
                ));
            }
            // A repeated index would count one token's probability twice.
            if seen[ix as usize] == i {
                return Err(input_err(
                    "teacher top-k indices",
                    format!("row {i} repeats index {ix}"),
                ));
            }
            seen[ix as usize] = i;
            flat.push(ix as u32);
        }
    }
    Ok(flat)
}

fn validate_config(cfg: &LossConfig, grad_scale: f64) -> Result<()> {
    if !(cfg.temperature.is_finite() && cfg.temperature > 0.0) {
        crate::config_bail!(
            "distillation temperature must be a positive number, got {}",
            cfg.temperature
        );
    }
    if cfg.chunk_tokens == 0 {
        crate::config_bail!("loss chunk_tokens must be at least 1");
    }
    if let KdLoss::Jsd { beta } = cfg.kd {
        if !(0.0..=1.0).contains(&beta) {
            crate::config_bail!("JSD beta must be in [0, 1], got {beta}");
        }
    }
    for (name, w) in [
        ("ce_weight", cfg.ce_weight),
        ("kd_weight", cfg.kd_weight),
        ("grad_scale", grad_scale),
    ] {
        if !w.is_finite() {
            crate::config_bail!("loss {name} must be finite, got {w}");
        }
    }
    check_softcap("student softcap", cfg.student_softcap)
}

fn check_softcap(name: &str, cap: Option<f64>) -> Result<()> {
    match cap {
        Some(c) if !(c.is_finite() && c > 0.0) => {
            crate::config_bail!(
                "{name} (final_logit_softcapping) must be a positive number, got {c}"
            )
        }
        _ => Ok(()),
    }
}

fn dims2(name: &str, t: &Tensor) -> Result<(usize, usize)> {
    match t.dims() {
        &[a, b] => Ok((a, b)),
        other => Err(input_err(
            name,
            format!("must be a 2-D tensor, got shape {other:?}"),
        )),
    }
}

fn input_err(name: &str, msg: String) -> Error {
    Error::Msg(format!("fused_linear_distill: `{name}` {msg}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn rand_vec(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| rng.random_range(-1.0f32..1.0) * scale)
            .collect()
    }

    fn rand_tensor(rng: &mut ChaCha8Rng, rows: usize, cols: usize, scale: f32) -> Tensor {
        Tensor::from_vec(
            rand_vec(rng, rows * cols, scale),
            (rows, cols),
            &Device::Cpu,
        )
        .unwrap()
    }

    fn cfg(
        kd: KdLoss,
        temperature: f64,
        chunk_tokens: usize,
        student_softcap: Option<f64>,
    ) -> LossConfig {
        LossConfig {
            ce_weight: 0.7,
            kd_weight: 1.3,
            kd,
            temperature,
            chunk_tokens,
            student_softcap,
        }
    }

    const KD_KINDS: [KdLoss; 6] = [
        KdLoss::ForwardKl,
        KdLoss::ReverseKl,
        KdLoss::Jsd { beta: 0.0 },
        KdLoss::Jsd { beta: 0.3 },
        KdLoss::Jsd { beta: 0.9 },
        KdLoss::Jsd { beta: 1.0 },
    ];

    /// Teacher inputs of one test case, owned so that `TeacherOutput` can borrow them.
    enum OwnedTeacher {
        None,
        Logits(Tensor),
        Hidden {
            h: Tensor,
            lm_head: Tensor,
            softcap: Option<f64>,
        },
        TopK {
            logprobs: Tensor,
            indices: Tensor,
        },
    }

    impl OwnedTeacher {
        fn as_output(&self) -> TeacherOutput<'_> {
            match self {
                OwnedTeacher::None => TeacherOutput::None,
                OwnedTeacher::Logits(t) => TeacherOutput::Logits(t),
                OwnedTeacher::Hidden {
                    h,
                    lm_head,
                    softcap,
                } => TeacherOutput::Hidden {
                    h,
                    lm_head,
                    softcap: *softcap,
                },
                OwnedTeacher::TopK { logprobs, indices } => {
                    TeacherOutput::TopK { logprobs, indices }
                }
            }
        }
    }

    fn mat_f64(t: &Tensor) -> Vec<Vec<f64>> {
        t.to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap()
    }

    /// logits = h·Wᵀ in f64, with an optional softcap.
    fn logits_f64(h: &Tensor, w: &Tensor, cap: Option<f64>) -> Vec<Vec<f64>> {
        let (h, w) = (mat_f64(h), mat_f64(w));
        h.iter()
            .map(|hr| {
                w.iter()
                    .map(|wr| {
                        let z: f64 = hr.iter().zip(wr).map(|(a, b)| a * b).sum();
                        cap.map_or(z, |c| c * (z / c).tanh())
                    })
                    .collect()
            })
            .collect()
    }

    fn log_softmax_f64(z: &[f64], t: f64) -> Vec<f64> {
        let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max) / t;
        let lse = z.iter().map(|x| (x / t - m).exp()).sum::<f64>().ln() + m;
        z.iter().map(|x| x / t - lse).collect()
    }

    /// The divergence straight from its definition, on probability vectors.
    fn divergence_f64(kd: KdLoss, p: &[f64], q: &[f64]) -> f64 {
        let kl = |a: &[f64], b: &[f64]| -> f64 {
            a.iter()
                .zip(b)
                .map(|(x, y)| if *x == 0.0 { 0.0 } else { x * (x / y).ln() })
                .sum()
        };
        match kd {
            KdLoss::ForwardKl | KdLoss::Jsd { beta: 0.0 } => kl(p, q),
            KdLoss::ReverseKl | KdLoss::Jsd { beta: 1.0 } => kl(q, p),
            KdLoss::Jsd { beta } => {
                let m: Vec<f64> = p
                    .iter()
                    .zip(q)
                    .map(|(a, b)| beta * a + (1.0 - beta) * b)
                    .collect();
                beta * kl(p, &m) + (1.0 - beta) * kl(q, &m)
            }
        }
    }

    /// (ce_sum, kd_sum) computed in f64 with plain loops.
    fn naive_sums(
        h: &Tensor,
        w: &Tensor,
        labels: &[i64],
        teacher: &OwnedTeacher,
        cfg: &LossConfig,
    ) -> (f64, f64) {
        let zs = logits_f64(h, w, cfg.student_softcap);
        let t = cfg.temperature;
        let teacher_logits = match teacher {
            OwnedTeacher::Logits(l) => Some(mat_f64(l)),
            OwnedTeacher::Hidden {
                h,
                lm_head,
                softcap,
            } => Some(logits_f64(h, lm_head, *softcap)),
            _ => None,
        };
        let (mut ce, mut kd) = (0.0, 0.0);
        for (i, &label) in labels.iter().enumerate() {
            if label == IGNORE_INDEX {
                continue;
            }
            ce -= log_softmax_f64(&zs[i], 1.0)[label as usize];
            if let Some(zt) = &teacher_logits {
                let v = zs[i].len().min(zt[i].len());
                let q: Vec<f64> = log_softmax_f64(&zs[i][..v], t)
                    .iter()
                    .map(|x| x.exp())
                    .collect();
                let p: Vec<f64> = log_softmax_f64(&zt[i][..v], t)
                    .iter()
                    .map(|x| x.exp())
                    .collect();
                kd += divergence_f64(cfg.kd, &p, &q);
            }
            if let OwnedTeacher::TopK { logprobs, indices } = teacher {
                let lp = mat_f64(logprobs);
                let ix = indices
                    .to_dtype(DType::I64)
                    .unwrap()
                    .to_vec2::<i64>()
                    .unwrap();
                let q_full: Vec<f64> = log_softmax_f64(&zs[i], t).iter().map(|x| x.exp()).collect();
                let mut q: Vec<f64> = ix[i].iter().map(|&j| q_full[j as usize]).collect();
                let mut p: Vec<f64> = lp[i].iter().map(|x| x.exp()).collect();
                q.push(1.0 - q.iter().sum::<f64>());
                p.push(1.0 - p.iter().sum::<f64>());
                kd += divergence_f64(cfg.kd, &p, &q);
            }
        }
        (ce, kd)
    }

    fn ref_log_softmax(z: &Tensor) -> Tensor {
        let m = z.max_keepdim(1).unwrap().detach();
        let zm = z.broadcast_sub(&m).unwrap();
        zm.broadcast_sub(&zm.exp().unwrap().sum_keepdim(1).unwrap().log().unwrap())
            .unwrap()
    }

    /// Per-row divergence in candle ops from probabilities (not log-probabilities, unlike
    /// the code under test), so that autograd differentiates an independent formulation.
    fn ref_divergence(kd: KdLoss, p: &Tensor, q: &Tensor) -> Tensor {
        let kl = |a: &Tensor, b: &Tensor| {
            (a * (a.log().unwrap() - b.log().unwrap()).unwrap())
                .unwrap()
                .sum(1)
                .unwrap()
        };
        match kd {
            KdLoss::ForwardKl | KdLoss::Jsd { beta: 0.0 } => kl(p, q),
            KdLoss::ReverseKl | KdLoss::Jsd { beta: 1.0 } => kl(q, p),
            KdLoss::Jsd { beta } => {
                let m = ((p * beta).unwrap() + (q * (1.0 - beta)).unwrap()).unwrap();
                ((kl(p, &m) * beta).unwrap() + (kl(q, &m) * (1.0 - beta)).unwrap()).unwrap()
            }
        }
    }

    /// dL/dh from candle autograd on the unfused loss over full logits.
    fn autograd_dh(
        h: &Tensor,
        w: &Tensor,
        labels: &[i64],
        teacher: &OwnedTeacher,
        cfg: &LossConfig,
        grad_scale: f64,
    ) -> Tensor {
        let dev = &Device::Cpu;
        let (n, vs) = (h.dim(0).unwrap(), w.dim(0).unwrap());
        let hv = Var::from_tensor(h).unwrap();
        let cap = |z: Tensor, c: Option<f64>| match c {
            Some(c) => ((z / c).unwrap().tanh().unwrap() * c).unwrap(),
            None => z,
        };
        let zs = cap(
            hv.as_tensor().matmul(&w.t().unwrap()).unwrap(),
            cfg.student_softcap,
        );
        let mask: Vec<f32> = labels
            .iter()
            .map(|&l| if l == IGNORE_INDEX { 0.0 } else { 1.0 })
            .collect();
        let mask = Tensor::from_vec(mask, n, dev).unwrap();
        let mut onehot = vec![0f32; n * vs];
        for (i, &l) in labels.iter().enumerate() {
            if l != IGNORE_INDEX {
                onehot[i * vs + l as usize] = 1.0;
            }
        }
        let onehot = Tensor::from_vec(onehot, (n, vs), dev).unwrap();
        let ce = (ref_log_softmax(&zs) * onehot)
            .unwrap()
            .sum_all()
            .unwrap()
            .neg()
            .unwrap();

        let t = cfg.temperature;
        let full_kd = |zt: Tensor| {
            let v = vs.min(zt.dim(1).unwrap());
            let p = ref_log_softmax(&(zt.narrow(1, 0, v).unwrap() / t).unwrap())
                .exp()
                .unwrap();
            let q = ref_log_softmax(&(zs.narrow(1, 0, v).unwrap() / t).unwrap())
                .exp()
                .unwrap();
            ref_divergence(cfg.kd, &p, &q)
        };
        let kd_rows = match teacher {
            OwnedTeacher::None => None,
            OwnedTeacher::Logits(l) => Some(full_kd(l.clone())),
            OwnedTeacher::Hidden {
                h,
                lm_head,
                softcap,
            } => Some(full_kd(cap(
                h.matmul(&lm_head.t().unwrap()).unwrap(),
                *softcap,
            ))),
            OwnedTeacher::TopK { logprobs, indices } => {
                let q = ref_log_softmax(&(&zs / t).unwrap())
                    .exp()
                    .unwrap()
                    .gather(indices, 1)
                    .unwrap();
                let p = logprobs.exp().unwrap();
                let tail = |x: &Tensor| (1.0 - x.sum_keepdim(1).unwrap()).unwrap();
                let q = Tensor::cat(&[&q, &tail(&q)], 1).unwrap();
                let p = Tensor::cat(&[&p, &tail(&p)], 1).unwrap();
                Some(ref_divergence(cfg.kd, &p, &q))
            }
        };
        let mut loss = (ce * cfg.ce_weight).unwrap();
        if let Some(kd_rows) = kd_rows {
            let kd = (kd_rows * &mask).unwrap().sum_all().unwrap();
            loss = (loss + (kd * (cfg.kd_weight * t * t)).unwrap()).unwrap();
        }
        let grads = (loss * grad_scale).unwrap().backward().unwrap();
        grads.get(hv.as_tensor()).unwrap().clone()
    }

    /// Teacher top-k log-probs at temperature t from full teacher logits, picked in f64.
    fn topk_from_logits(zt: &Tensor, k: usize, t: f64) -> OwnedTeacher {
        let rows = mat_f64(zt);
        let (mut lp, mut ix) = (Vec::new(), Vec::new());
        for r in &rows {
            let logp = log_softmax_f64(r, t);
            let mut order: Vec<usize> = (0..r.len()).collect();
            order.sort_by(|&a, &b| r[b].partial_cmp(&r[a]).unwrap());
            for &j in &order[..k] {
                lp.push(logp[j] as f32);
                ix.push(j as u32);
            }
        }
        let n = rows.len();
        OwnedTeacher::TopK {
            logprobs: Tensor::from_vec(lp, (n, k), &Device::Cpu).unwrap(),
            indices: Tensor::from_vec(ix, (n, k), &Device::Cpu).unwrap(),
        }
    }

    fn assert_close_tensor(got: &Tensor, want: &Tensor, rel: f64, what: &str) {
        let (g, w) = (mat_f64(got), mat_f64(want));
        let scale = w
            .iter()
            .flatten()
            .fold(0f64, |m, x| m.max(x.abs()))
            .max(1e-6);
        for (i, (gr, wr)) in g.iter().zip(&w).enumerate() {
            for (j, (a, b)) in gr.iter().zip(wr).enumerate() {
                assert!(
                    (a - b).abs() <= rel * scale,
                    "{what}: [{i},{j}] got {a}, want {b} (scale {scale})"
                );
            }
        }
    }

    fn assert_close(got: f64, want: f64, rel: f64, what: &str) {
        assert!(
            (got - want).abs() <= rel * want.abs().max(1e-3),
            "{what}: got {got}, want {want}"
        );
    }

    fn check_case(
        h: &Tensor,
        w: &Tensor,
        labels: &[i64],
        teacher: &OwnedTeacher,
        cfg: &LossConfig,
        what: &str,
    ) {
        let grad_scale = 0.37;
        let out = fused_linear_distill(h, w, labels, teacher.as_output(), cfg, grad_scale).unwrap();
        let (ce, kd) = naive_sums(h, w, labels, teacher, cfg);
        assert_eq!(
            out.n_tokens,
            labels.iter().filter(|&&l| l != IGNORE_INDEX).count(),
            "{what}"
        );
        assert_close(out.ce_sum, ce, 1e-5, &format!("{what} ce_sum"));
        assert_close(out.kd_sum, kd, 1e-4, &format!("{what} kd_sum"));
        let want = autograd_dh(h, w, labels, teacher, cfg, grad_scale);
        assert_close_tensor(&out.dh, &want, 2e-5, &format!("{what} dh"));
    }

    const N: usize = 7;
    const D_S: usize = 6;
    const VS: usize = 13;
    // Tokens 1 and 4 are masked, so the valid rows are not consecutive.
    const LABELS: [i64; N] = [3, -100, 0, 12, -100, 7, 5];

    #[test]
    fn every_teacher_form_and_divergence_matches_autograd_and_naive_sums() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let h = rand_tensor(&mut rng, N, D_S, 1.0);
        let w = rand_tensor(&mut rng, VS, D_S, 1.5);
        let teachers = [
            ("none", OwnedTeacher::None),
            (
                "logits Vt<Vs",
                OwnedTeacher::Logits(rand_tensor(&mut rng, N, 11, 4.0)),
            ),
            (
                "logits Vt>Vs",
                OwnedTeacher::Logits(rand_tensor(&mut rng, N, 16, 4.0)),
            ),
            (
                "hidden",
                OwnedTeacher::Hidden {
                    h: rand_tensor(&mut rng, N, 5, 1.0),
                    lm_head: rand_tensor(&mut rng, 15, 5, 2.0),
                    softcap: Some(3.0),
                },
            ),
            (
                "topk",
                topk_from_logits(&rand_tensor(&mut rng, N, VS, 4.0), 4, 2.0),
            ),
        ];
        for (name, teacher) in &teachers {
            for kd in KD_KINDS {
                for (chunk, cap) in [(3, Some(2.5)), (2, None), (64, Some(30.0))] {
                    let c = cfg(kd, 2.0, chunk, cap);
                    check_case(
                        &h,
                        &w,
                        &LABELS,
                        teacher,
                        &c,
                        &format!("{name} {kd:?} chunk {chunk} cap {cap:?}"),
                    );
                }
            }
        }
    }

    /// TRL's `generalized_jsd_loss` and torch autograd, from
    /// scripts/fixtures/make_loss_fixtures.py.
    #[test]
    fn matches_trl_generalized_jsd_and_torch_autograd() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/loss/trl_gkd.json"
        );
        let fx: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let mat = |key: &str| {
            let rows: Vec<Vec<f32>> = serde_json::from_value(fx[key].clone()).unwrap();
            let (r, c) = (rows.len(), rows[0].len());
            Tensor::from_vec(rows.concat(), (r, c), &Device::Cpu).unwrap()
        };
        let num = |key: &str| fx[key].as_f64().unwrap();
        let labels: Vec<i64> = serde_json::from_value(fx["labels"].clone()).unwrap();
        let (h, w) = (mat("h"), mat("lm_head"));
        let (th, tw, tl) = (
            mat("teacher_h"),
            mat("teacher_lm_head"),
            mat("teacher_logits"),
        );
        for case in fx["cases"].as_array().unwrap() {
            let beta = case["beta"].as_f64().unwrap();
            let c = LossConfig {
                ce_weight: num("ce_weight"),
                kd_weight: num("kd_weight"),
                kd: KdLoss::Jsd { beta },
                temperature: num("temperature"),
                chunk_tokens: 4,
                student_softcap: Some(num("student_softcap")),
            };
            let want_dh: Vec<Vec<f32>> = serde_json::from_value(case["dh"].clone()).unwrap();
            let want_dh = Tensor::from_vec(want_dh.concat(), h.dims(), &Device::Cpu).unwrap();
            let teachers = [
                ("logits", TeacherOutput::Logits(&tl)),
                (
                    "hidden",
                    TeacherOutput::Hidden {
                        h: &th,
                        lm_head: &tw,
                        softcap: None,
                    },
                ),
            ];
            for (name, teacher) in teachers {
                let out =
                    fused_linear_distill(&h, &w, &labels, teacher, &c, num("grad_scale")).unwrap();
                let what = format!("beta {beta} {name}");
                assert_close(
                    out.kd_sum,
                    case["kd_sum"].as_f64().unwrap(),
                    1e-5,
                    &format!("{what} kd_sum"),
                );
                assert_close(
                    out.ce_sum,
                    case["ce_sum"].as_f64().unwrap(),
                    1e-5,
                    &format!("{what} ce_sum"),
                );
                assert_close_tensor(&out.dh, &want_dh, 1e-5, &format!("{what} dh"));
            }
        }
    }

    #[test]
    fn temperature_one_and_all_tokens_supervised() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let h = rand_tensor(&mut rng, N, D_S, 1.0);
        let w = rand_tensor(&mut rng, VS, D_S, 1.5);
        let teacher = OwnedTeacher::Logits(rand_tensor(&mut rng, N, VS, 3.0));
        let labels = [1i64, 2, 3, 4, 5, 6, 0];
        for kd in KD_KINDS {
            check_case(
                &h,
                &w,
                &labels,
                &teacher,
                &cfg(kd, 1.0, 4, None),
                &format!("T=1 {kd:?}"),
            );
        }
    }

    #[test]
    fn topk_covering_the_whole_vocabulary_equals_full_kd() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let h = rand_tensor(&mut rng, N, D_S, 1.0);
        let w = rand_tensor(&mut rng, VS, D_S, 1.5);
        let zt = rand_tensor(&mut rng, N, VS, 3.0);
        let topk = topk_from_logits(&zt, VS, 1.5);
        for kd in KD_KINDS {
            let c = cfg(kd, 1.5, 3, None);
            let full =
                fused_linear_distill(&h, &w, &LABELS, TeacherOutput::Logits(&zt), &c, 1.0).unwrap();
            let sparse = fused_linear_distill(&h, &w, &LABELS, topk.as_output(), &c, 1.0).unwrap();
            assert_close(sparse.kd_sum, full.kd_sum, 1e-4, &format!("{kd:?} kd_sum"));
            assert_close_tensor(&sparse.dh, &full.dh, 1e-4, &format!("{kd:?} dh"));
        }
    }

    #[test]
    fn no_supervised_token_gives_zero_loss_and_gradient() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let h = rand_tensor(&mut rng, 3, D_S, 1.0);
        let w = rand_tensor(&mut rng, VS, D_S, 1.0);
        let zt = rand_tensor(&mut rng, 3, VS, 1.0);
        let out = fused_linear_distill(
            &h,
            &w,
            &[-100; 3],
            TeacherOutput::Logits(&zt),
            &cfg(KdLoss::ForwardKl, 2.0, 2, None),
            1.0,
        )
        .unwrap();
        assert_eq!((out.ce_sum, out.kd_sum, out.n_tokens), (0.0, 0.0, 0));
        assert_eq!(out.dh.dims(), &[3, D_S]);
        assert_eq!(
            out.dh
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
    }

    #[test]
    fn bf16_inputs_give_bf16_gradient_close_to_f32() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let h = rand_tensor(&mut rng, N, D_S, 1.0);
        let w = rand_tensor(&mut rng, VS, D_S, 1.5);
        let zt = rand_tensor(&mut rng, N, VS, 3.0);
        let c = cfg(KdLoss::Jsd { beta: 0.5 }, 2.0, 3, None);
        let f32_out =
            fused_linear_distill(&h, &w, &LABELS, TeacherOutput::Logits(&zt), &c, 1.0).unwrap();
        let (hb, wb) = (
            h.to_dtype(DType::BF16).unwrap(),
            w.to_dtype(DType::BF16).unwrap(),
        );
        let zb = zt.to_dtype(DType::BF16).unwrap();
        let bf16_out =
            fused_linear_distill(&hb, &wb, &LABELS, TeacherOutput::Logits(&zb), &c, 1.0).unwrap();
        assert_eq!(bf16_out.dh.dtype(), DType::BF16);
        assert_close(bf16_out.ce_sum, f32_out.ce_sum, 2e-2, "bf16 ce_sum");
        assert_close_tensor(&bf16_out.dh, &f32_out.dh, 5e-2, "bf16 dh");
    }

    fn err_of(r: Result<LossOutput>) -> String {
        match r {
            Ok(_) => panic!("expected an error"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn bad_inputs_are_errors_that_name_the_input() {
        let dev = &Device::Cpu;
        let h = Tensor::zeros((4, 3), DType::F32, dev).unwrap();
        let w = Tensor::zeros((10, 3), DType::F32, dev).unwrap();
        let labels = [1i64, -100, 2, 3];
        let c = cfg(KdLoss::ForwardKl, 1.0, 2, None);
        let run = |h: &Tensor, w: &Tensor, labels: &[i64], t: TeacherOutput, c: &LossConfig| {
            err_of(fused_linear_distill(h, w, labels, t, c, 1.0))
        };

        let w_bad = Tensor::zeros((10, 4), DType::F32, dev).unwrap();
        assert!(run(&h, &w_bad, &labels, TeacherOutput::None, &c).contains("`lm_head`"));
        assert!(run(&h, &w, &labels[..3], TeacherOutput::None, &c).contains("`labels`"));
        let e = run(&h, &w, &[1, -100, 10, 3], TeacherOutput::None, &c);
        assert!(e.contains("label 10 at token 2"), "{e}");
        assert!(run(&h, &w, &[1, -5, 2, 3], TeacherOutput::None, &c).contains("label -5"));
        let zt = Tensor::zeros((3, 10), DType::F32, dev).unwrap();
        assert!(run(&h, &w, &labels, TeacherOutput::Logits(&zt), &c).contains("`teacher logits`"));
        let th = Tensor::zeros((4, 5), DType::F32, dev).unwrap();
        let tw = Tensor::zeros((10, 6), DType::F32, dev).unwrap();
        let t = TeacherOutput::Hidden {
            h: &th,
            lm_head: &tw,
            softcap: None,
        };
        assert!(run(&h, &w, &labels, t, &c).contains("`teacher lm_head`"));

        let lp = Tensor::full(-2f32, (4, 2), dev).unwrap();
        let dup = Tensor::new(&[[1u32, 2], [3, 3], [0, 1], [4, 5]], dev).unwrap();
        let e = run(
            &h,
            &w,
            &labels,
            TeacherOutput::TopK {
                logprobs: &lp,
                indices: &dup,
            },
            &c,
        );
        assert!(
            e.contains("`teacher top-k indices`") && e.contains("repeats index 3"),
            "{e}"
        );
        let oob = Tensor::new(&[[1u32, 2], [3, 10], [0, 1], [4, 5]], dev).unwrap();
        let e = run(
            &h,
            &w,
            &labels,
            TeacherOutput::TopK {
                logprobs: &lp,
                indices: &oob,
            },
            &c,
        );
        assert!(e.contains("index 10"), "{e}");
        let ok_ix = Tensor::new(&[[1u32, 2], [3, 4], [0, 1], [4, 5]], dev).unwrap();
        let too_much = Tensor::full(-0.1f32, (4, 2), dev).unwrap();
        let e = run(
            &h,
            &w,
            &labels,
            TeacherOutput::TopK {
                logprobs: &too_much,
                indices: &ok_ix,
            },
            &c,
        );
        assert!(
            e.contains("`teacher top-k logprobs`") && e.contains("mass"),
            "{e}"
        );

        let bad_beta = cfg(KdLoss::Jsd { beta: 1.5 }, 1.0, 2, None);
        assert!(run(&h, &w, &labels, TeacherOutput::None, &bad_beta).contains("beta"));
        let bad_t = cfg(KdLoss::ForwardKl, 0.0, 2, None);
        assert!(run(&h, &w, &labels, TeacherOutput::None, &bad_t).contains("temperature"));
        let bad_chunk = cfg(KdLoss::ForwardKl, 1.0, 0, None);
        assert!(run(&h, &w, &labels, TeacherOutput::None, &bad_chunk).contains("chunk_tokens"));
        let bad_cap = cfg(KdLoss::ForwardKl, 1.0, 2, Some(-1.0));
        assert!(run(&h, &w, &labels, TeacherOutput::None, &bad_cap).contains("softcap"));
    }
}
