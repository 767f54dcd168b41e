//! The CUDA path of [`crate::loss::fused_linear_distill`] (common/kernels/loss.cu).
//!
//! Per chunk of labelled rows, three cuBLAS GEMMs and one row kernel, all on candle's
//! stream and without any `[chunk, V]` temporary beyond two buffers allocated once per
//! call and reused by every chunk:
//!
//! 1. `zs = h_c · W_sᵀ` in the student's dtype (bf16 or f32, f32 accumulation), into the
//!    student buffer `[chunk, Vs]`;
//! 2. with a `Hidden` teacher, `zt = h_t,c · W_tᵀ` into the teacher buffer `[chunk, Vt]`
//!    (`Logits` are read where they are, through the chunk's row indices);
//! 3. `loss_rows_*`: CE, divergence and dz in f32, dz written over `zs` in place, the
//!    per-row CE and divergence into two f32 vectors summed on the host in f64;
//! 4. `dh[rows] = dz · W_s`, written by cuBLAS straight into the rows of the one `[N, d]`
//!    output when the chunk's rows are consecutive, else into a `[chunk, d]` buffer that
//!    `loss_scatter_rows_*` copies to the rows.
//!
//! The chunk size is the caller's `chunk_tokens`: the two buffers hold
//! chunk·(Vs + Vt) logits (1 GiB in bf16 at 2048 rows and V = 128K each).

use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{DType, Tensor};

use super::gemm::{dptr, to_i32, uninit, Gemm};
use super::{cuda_device, fused};
use crate::loss::{check_inputs, Checked, KdLoss, LossConfig, LossOutput, Teacher, TeacherOutput};
use crate::{Error, Result};

const LOSS_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/loss.ptx"));
/// Name under which candle caches the loaded module (one load per device).
const LOSS_MODULE: &str = "qdistill_loss";
/// Largest block of the row kernel; longer rows loop inside the block. A multiple of 32
/// and at most 1024 (the kernel's block reductions need both).
const MAX_ROW_THREADS: usize = 512;
const SCATTER_THREADS: u32 = 256;

/// Divergence codes of loss.cu's `Kind`.
const KIND_NONE: i32 = 0;
const KIND_FORWARD: i32 = 1;
const KIND_REVERSE: i32 = 2;
const KIND_JSD: i32 = 3;

fn is_kernel_dtype(dt: DType) -> bool {
    matches!(dt, DType::BF16 | DType::F32)
}

/// Whether [`crate::loss::fused_linear_distill`] takes this path: fused kernels enabled
/// (`QDISTILL_FUSED_KERNELS`), `h` on a CUDA device, `h` and `lm_head` of one dtype,
/// bf16 or f32, and a teacher that is absent, logits or hidden states (bf16 or f32, on
/// the same device). Top-k teachers and anything else go to the candle reference, which
/// also reports mismatched inputs.
pub fn applies(h: &Tensor, lm_head: &Tensor, teacher: &TeacherOutput) -> bool {
    let dev = h.device();
    let here = |t: &Tensor| is_kernel_dtype(t.dtype()) && t.device().same_device(dev);
    fused::enabled()
        && dev.is_cuda()
        && here(h)
        && lm_head.dtype() == h.dtype()
        && here(lm_head)
        && match teacher {
            TeacherOutput::None => true,
            TeacherOutput::Logits(z) => here(z),
            TeacherOutput::Hidden { h: th, lm_head: tw, .. } => here(th) && tw.dtype() == th.dtype() && here(tw),
            TeacherOutput::TopK { .. } => false,
        }
}

fn msg(s: String) -> Error {
    Error::Msg(format!("fused_linear_distill (CUDA): {s}"))
}

fn dtype_name(dt: DType) -> &'static str {
    if dt == DType::BF16 {
        "bf16"
    } else {
        "f32"
    }
}

/// Largest of 8, 4, 2, 1 elements that divides every value given (row lengths, strides,
/// start offsets), so that every vector access of the row kernel is aligned.
fn pick_vec(multiples_of: &[usize]) -> usize {
    let mut v = 8;
    while v > 1 && multiples_of.iter().any(|m| m % v != 0) {
        v /= 2;
    }
    v
}

/// The teacher as the chunk loop uses it.
enum GpuTeacher {
    None,
    /// `[N, Vt]` logits read in place through row indices.
    Logits { z: Tensor, vt: usize, v_kd: usize },
    /// Hidden states `[N, dt]` and head `[Vt, dt]`, contiguous.
    Hidden { h: Tensor, w: Tensor, vt: usize, v_kd: usize, softcap: Option<f64> },
}

impl GpuTeacher {
    fn dtype(&self) -> Option<DType> {
        match self {
            GpuTeacher::None => None,
            GpuTeacher::Logits { z, .. } => Some(z.dtype()),
            GpuTeacher::Hidden { h, .. } => Some(h.dtype()),
        }
    }
}

/// [`crate::loss::fused_linear_distill`] on a CUDA device, for the inputs [`applies`]
/// accepts (others are an error here). Same checks, same [`LossOutput`]; dh is in `h`'s
/// dtype. Called directly by the self-test, so that it is certain the kernels ran.
pub fn fused_linear_distill_cuda(
    h: &Tensor,
    lm_head: &Tensor,
    labels: &[i64],
    teacher: TeacherOutput,
    cfg: &LossConfig,
    grad_scale: f64,
) -> Result<LossOutput> {
    if !applies(h, lm_head, &teacher) {
        return Err(msg(format!(
            "inputs the kernels do not take: h {:?} {:?}, lm_head {:?} (bf16 or f32 on one CUDA device; no top-k teacher)",
            h.dtype(),
            h.device(),
            lm_head.dtype()
        )));
    }
    let Checked { n, d, vs, valid } = check_inputs(h, lm_head, labels, cfg, grad_scale)?;
    let teacher = match Teacher::new(teacher, n, vs, h.device())? {
        Teacher::None => GpuTeacher::None,
        Teacher::Logits { logits, v_kd } => GpuTeacher::Logits { z: logits.contiguous()?, vt: logits.dim(1)?, v_kd },
        Teacher::Hidden { h: th, lm_head: tw, softcap, v_kd } => {
            GpuTeacher::Hidden { h: th.contiguous()?, w: tw.contiguous()?, vt: tw.dim(0)?, v_kd, softcap }
        }
        Teacher::TopK { .. } => return Err(msg("a top-k teacher takes the candle path".into())),
    };
    let dev = cuda_device(h.device())?;
    let dtype = h.dtype();
    to_i32("tokens", n)?;
    to_i32("student vocabulary", vs)?;
    if valid.is_empty() {
        return Ok(LossOutput { ce_sum: 0.0, kd_sum: 0.0, n_tokens: 0, dh: Tensor::zeros((n, d), dtype, h.device())? });
    }
    let (h, w) = (h.contiguous()?, lm_head.contiguous()?);
    let chunk = cfg.chunk_tokens.min(valid.len());
    let n_valid = valid.len();

    let (kind, beta) = match cfg.kd {
        _ if matches!(teacher, GpuTeacher::None) => (KIND_NONE, 0.0),
        KdLoss::ForwardKl | KdLoss::Jsd { beta: 0.0 } => (KIND_FORWARD, 0.0),
        KdLoss::ReverseKl | KdLoss::Jsd { beta: 1.0 } => (KIND_REVERSE, 1.0),
        KdLoss::Jsd { beta } => (KIND_JSD, beta),
    };
    let (vt, v_kd, t_cap, t_offset) = match &teacher {
        GpuTeacher::None => (vs, vs, None, 0),
        GpuTeacher::Logits { z, vt, v_kd } => (*vt, *v_kd, None, z.layout().start_offset()),
        GpuTeacher::Hidden { vt, v_kd, softcap, .. } => (*vt, *v_kd, *softcap, 0),
    };
    let t_dtype = teacher.dtype().unwrap_or(dtype);
    let vec = pick_vec(&[vs, vt, t_offset]);
    let func_name = format!("loss_rows_{}_{}_v{vec}", dtype_name(dtype), dtype_name(t_dtype));
    let func = dev.get_or_load_custom_func(&func_name, LOSS_MODULE, LOSS_PTX)?;
    let threads = ((vs / vec).div_ceil(32) * 32).clamp(32, MAX_ROW_THREADS) as u32;

    // The rows and labels of the labelled tokens, in chunk order, as i32 (read as such by
    // the kernels; both are below 2³¹, checked above).
    let row_ids = Tensor::from_vec(valid.clone(), n_valid, h.device())?;
    let label_ids: Vec<u32> = valid.iter().map(|&r| labels[r as usize] as u32).collect();
    let label_ids = Tensor::from_vec(label_ids, n_valid, h.device())?;
    // Unwritten rows stay NaN and make the sums NaN rather than silently smaller.
    let ce_rows = Tensor::full(f32::NAN, n_valid, h.device())?;
    let kd_rows = Tensor::full(f32::NAN, n_valid, h.device())?;
    let zs = uninit(dev, dtype, &[chunk, vs])?;
    let zt = match &teacher {
        GpuTeacher::Hidden { vt, .. } => Some(uninit(dev, t_dtype, &[chunk, *vt])?),
        _ => None,
    };
    let dh = if n_valid == n { uninit(dev, dtype, &[n, d])? } else { Tensor::zeros((n, d), dtype, h.device())? };
    let mut dh_gathered: Option<Tensor> = None;

    let esz = dtype.size_in_bytes() as u64;
    let (h_ptr, w_ptr, zs_ptr, dh_ptr) = (dptr(&h)?, dptr(&w)?, dptr(&zs)?, dptr(&dh)?);
    let (rows_ptr, labels_ptr, ce_ptr, kd_ptr) = (dptr(&row_ids)?, dptr(&label_ids)?, dptr(&ce_rows)?, dptr(&kd_rows)?);
    let inv_t = (1.0 / cfg.temperature) as f32;
    let beta = beta as f32;
    let s_cap = cfg.student_softcap.unwrap_or(0.0) as f32;
    let t_cap = t_cap.unwrap_or(0.0) as f32;
    let ce_coef = (grad_scale * cfg.ce_weight) as f32;
    let kd_coef = (grad_scale * cfg.kd_weight * cfg.temperature) as f32;
    let (vs_i32, v_kd_i32) = (vs as i32, to_i32("KD vocabulary", v_kd)?);
    let (ld_s, ld_t) = (vs as i64, vt as i64);

    for (ci, rows) in valid.chunks(chunk).enumerate() {
        let start = ci * chunk;
        let c = rows.len();
        let consecutive = rows[c - 1] as usize - rows[0] as usize + 1 == c;
        let chunk_ids = row_ids.narrow(0, start, c)?;
        // Hidden states of the chunk: a view when consecutive, else gathered (small).
        let gathered_h;
        let a_ptr = if consecutive {
            h_ptr + rows[0] as u64 * d as u64 * esz
        } else {
            gathered_h = h.index_select(&chunk_ids, 0)?;
            dptr(&gathered_h)?
        };
        // SAFETY: `a_ptr` addresses c rows of d elements of `h` (or its gathered copy,
        // alive to the end of this iteration); W is [Vs, d]; zs holds chunk ≥ c rows of Vs.
        unsafe { Gemm { m: c, n: vs, k: d, a: a_ptr, lda: d, b: w_ptr, ldb: d, b_transposed: true, c: zs_ptr, ldc: vs, alpha: 1.0, beta: 0.0 }.run(dev, dtype)? };

        let gathered_th;
        let (zt_ptr, zt_rows_on) = match &teacher {
            GpuTeacher::None => (zs_ptr, 0i32),
            GpuTeacher::Logits { z, .. } => (dptr(z)?, 1),
            GpuTeacher::Hidden { h: th, w: tw, vt, .. } => {
                let dt_ = th.dim(1)?;
                let tsz = t_dtype.size_in_bytes() as u64;
                let ta = if consecutive {
                    dptr(th)? + rows[0] as u64 * dt_ as u64 * tsz
                } else {
                    gathered_th = th.index_select(&chunk_ids, 0)?;
                    dptr(&gathered_th)?
                };
                let zt_buf = zt.as_ref().ok_or_else(|| msg("no teacher logits buffer".into()))?;
                let zt_ptr = dptr(zt_buf)?;
                // SAFETY: as for the student GEMM, with the teacher's [N, dt] and [Vt, dt].
                unsafe {
                    Gemm { m: c, n: *vt, k: dt_, a: ta, lda: dt_, b: dptr(tw)?, ldb: dt_, b_transposed: true, c: zt_ptr, ldc: *vt, alpha: 1.0, beta: 0.0 }
                        .run(dev, t_dtype)?
                };
                (zt_ptr, 0)
            }
        };

        let off = start as u64 * 4;
        let (zt_rows, chunk_labels, ce_out, kd_out) = (rows_ptr + off, labels_ptr + off, ce_ptr + off, kd_ptr + off);
        let mut b = func.builder();
        b.arg(&zs_ptr).arg(&ld_s).arg(&zt_ptr).arg(&ld_t).arg(&zt_rows).arg(&zt_rows_on).arg(&chunk_labels);
        b.arg(&ce_out).arg(&kd_out).arg(&vs_i32).arg(&v_kd_i32).arg(&kind).arg(&inv_t).arg(&beta);
        b.arg(&s_cap).arg(&t_cap).arg(&ce_coef).arg(&kd_coef);
        let cfg_launch = LaunchConfig { grid_dim: (c as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
        // SAFETY: arguments match loss_rows_* in loss.cu. zs holds c rows of Vs elements of
        // the student dtype; the teacher rows (chunk rows of the teacher buffer, or rows
        // `valid[start..start + c]` < N of the [N, Vt] logits) hold Vt ≥ V_kd elements of
        // the teacher dtype; zt_rows, labels, ce_out and kd_out address c entries of their
        // n_valid-long vectors; labels are in [0, Vs) (check_inputs); Vs, Vt and the
        // logits' start offset are multiples of vec, so every vector access is aligned;
        // `threads` is a multiple of 32 and at most 1024.
        unsafe { b.launch(cfg_launch) }.w()?;

        if consecutive {
            let c_ptr = dh_ptr + rows[0] as u64 * d as u64 * esz;
            // SAFETY: zs now holds dz [c, Vs]; W is [Vs, d]; dh rows rows[0]..rows[0]+c exist.
            unsafe { Gemm { m: c, n: d, k: vs, a: zs_ptr, lda: vs, b: w_ptr, ldb: d, b_transposed: false, c: c_ptr, ldc: d, alpha: 1.0, beta: 0.0 }.run(dev, dtype)? };
        } else {
            if dh_gathered.is_none() {
                dh_gathered = Some(uninit(dev, dtype, &[chunk, d])?);
            }
            let tmp = dh_gathered.as_ref().ok_or_else(|| msg("no dh buffer".into()))?;
            let tmp_ptr = dptr(tmp)?;
            // SAFETY: as above, into the [chunk, d] buffer.
            unsafe { Gemm { m: c, n: d, k: vs, a: zs_ptr, lda: vs, b: w_ptr, ldb: d, b_transposed: false, c: tmp_ptr, ldc: d, alpha: 1.0, beta: 0.0 }.run(dev, dtype)? };
            let scatter = dev.get_or_load_custom_func(&format!("loss_scatter_rows_{}", dtype_name(dtype)), LOSS_MODULE, LOSS_PTX)?;
            let (n_rows, d_i64) = (c as i64, d as i64);
            let chunk_rows = rows_ptr + off;
            let mut b = scatter.builder();
            b.arg(&tmp_ptr).arg(&dh_ptr).arg(&chunk_rows).arg(&n_rows).arg(&d_i64);
            let blocks = (c * d).div_ceil(SCATTER_THREADS as usize).min(1 << 16) as u32;
            // SAFETY: arguments match loss_scatter_rows_* in loss.cu: c rows of d elements
            // from the buffer to rows valid[start..start + c] < N of dh [N, d].
            unsafe { b.launch(LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (SCATTER_THREADS, 1, 1), shared_mem_bytes: 0 }) }.w()?;
        }
    }

    let sum = |t: &Tensor| -> Result<f64> { Ok(t.to_vec1::<f32>()?.iter().map(|&x| x as f64).sum()) };
    let ce_sum = sum(&ce_rows)?;
    let kd_sum = if kind == KIND_NONE { 0.0 } else { sum(&kd_rows)? };
    // Buffers the launches used are released only here, after the host read that waited
    // for them.
    drop((zs, zt, dh_gathered, row_ids, label_ids));
    Ok(LossOutput { ce_sum, kd_sum, n_tokens: n_valid, dh })
}
