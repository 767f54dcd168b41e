//! The optimizer side of a training step on the device (kernels in common/kernels/optim.cu),
//! over the flat fp32 buffers that hold every LoRA parameter, gradient and AdamW moment:
//!
//! - [`adamw_step`]: torch.optim.AdamW, bitwise the host's `AdamW::step` for equal inputs;
//! - [`adamw_8bit_step`]: the same with bitsandbytes' 8-bit block-wise moments, bitwise
//!   the host's 8-bit step;
//! - [`sum_of_squares`]: the global gradient norm, in f64, in a fixed order (deterministic);
//! - [`cast_f32_into`]: fp32 master weights into the compute-dtype tensor the forward reads;
//! - [`gemm_tn_accumulate`]: `acc[slice] += alpha·xᵀ·y` by cuBLAS straight into a slice of
//!   the flat fp32 gradient buffer, so a LoRA backward leaves dA and dB on the device.
//!
//! Everything is queued on candle's stream, so it orders with candle's own ops; only
//! [`sum_of_squares`] waits for the device (it reads its one result back).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::cublas::result::gemm_strided_batched_ex;
use candle_core::cuda_backend::cudarc::cublas::sys as cublas;
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaStream, DevicePtr, DevicePtrMut, LaunchArgs, LaunchConfig, PushKernelArg, SyncOnDrop,
};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CpuStorage, CudaDevice, CudaStorage, DType, InplaceOp1, Layout, Storage, Tensor};

use super::{bf16, cuda_device};
use crate::optim::AdamWScalars;
use crate::{Error, Result};

/// The step's scalars, in the order both AdamW kernels of optim.cu take them last.
fn push_scalars<'a>(b: &mut LaunchArgs<'a>, s: &'a AdamWScalars) {
    for x in [&s.grad_scale, &s.decay, &s.w1, &s.beta2, &s.w2, &s.bias_correction2_sqrt, &s.eps, &s.step_size] {
        b.arg(x);
    }
}

const OPTIM_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/optim.ptx"));
/// Name under which candle caches the loaded module (one load per device).
const OPTIM_MODULE: &str = "qdistill_optim";

/// Threads per block of every kernel here (`NORM_THREADS` in optim.cu for the norm).
const THREADS: u32 = 256;
/// Blocks of the first norm pass at most: enough to fill an H100 several times over, few
/// enough that the second pass is one block.
const NORM_MAX_BLOCKS: usize = 1024;

/// Grid for the element-wise kernels, which handle 4 elements per thread and iteration
/// (grid-stride, so any grid covers the buffer; block 0 also takes the n % 4 tail).
fn elementwise_grid(n: usize) -> Result<LaunchConfig> {
    let blocks = (n / 4).div_ceil(THREADS as usize).max(1);
    let blocks = u32::try_from(blocks).map_err(|_| Error::Msg(format!("optimizer kernels: {n} elements is too many for one launch")))?;
    Ok(LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 })
}

fn same_len(what: &str, got: usize, want: usize) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(Error::Msg(format!("AdamW on CUDA: {what} holds {got} values, the parameters {want}")))
    }
}

/// One AdamW update of `params` in place, with moments `exp_avg`/`exp_avg_sq` and gradients
/// `grads` (read only; scaled by `s.grad_scale` on the fly). The scalars come from
/// `AdamW::next_scalars`, which the host step uses too.
pub fn adamw_step(
    dev: &CudaDevice,
    params: &mut CudaSlice<f32>,
    exp_avg: &mut CudaSlice<f32>,
    exp_avg_sq: &mut CudaSlice<f32>,
    grads: &CudaSlice<f32>,
    s: &AdamWScalars,
) -> Result<()> {
    let n = params.len();
    same_len("exp_avg", exp_avg.len(), n)?;
    same_len("exp_avg_sq", exp_avg_sq.len(), n)?;
    same_len("the gradient buffer", grads.len(), n)?;
    if n == 0 {
        return Ok(());
    }
    let func = dev.get_or_load_custom_func("adamw_f32", OPTIM_MODULE, OPTIM_PTX)?;
    let n_i64 = n as i64;
    let mut b = func.builder();
    b.arg(params);
    b.arg(exp_avg);
    b.arg(exp_avg_sq);
    b.arg(grads);
    b.arg(&n_i64);
    push_scalars(&mut b, s);
    // SAFETY: argument order and types match adamw_f32 in optim.cu; the four buffers hold n
    // f32 each (checked above) and are whole allocations, so 16-byte aligned for its float4
    // accesses.
    unsafe { b.launch(elementwise_grid(n)?) }.w()?;
    Ok(())
}

/// The 8-bit AdamW state on a device: what [`crate::optim8bit::Moments8bit`] holds on the
/// host, plus the block table the kernel walks (4 int64 per block: first parameter, length,
/// first state value, absmax index or -1 for fp32 moments).
pub struct DeviceMoments8bit {
    state1: CudaSlice<u8>,
    state2: CudaSlice<u8>,
    absmax1: CudaSlice<f32>,
    absmax2: CudaSlice<f32>,
    exp_avg: CudaSlice<f32>,
    exp_avg_sq: CudaSlice<f32>,
    qmap1: CudaSlice<f32>,
    qmap2: CudaSlice<f32>,
    blocks: CudaSlice<i64>,
    n_blocks: usize,
    num_params: usize,
}

impl std::fmt::Debug for DeviceMoments8bit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceMoments8bit({} values, {} blocks)", self.num_params, self.n_blocks)
    }
}

/// A device copy of `v`; an empty `v` gets one unused element, as a device buffer cannot
/// be empty.
fn upload<T: candle_core::cuda_backend::cudarc::driver::DeviceRepr + Default + Copy + 'static>(
    dev: &CudaDevice,
    v: &[T],
) -> Result<CudaSlice<T>> {
    Ok(if v.is_empty() { dev.clone_htod(&[T::default()])? } else { dev.clone_htod(v)? })
}

/// The first `n` values of a device buffer (see [`upload`] for why it may hold one more).
fn download<T: candle_core::cuda_backend::cudarc::driver::DeviceRepr + Default + Copy + 'static>(
    dev: &CudaDevice,
    d: &CudaSlice<T>,
    n: usize,
) -> Result<Vec<T>> {
    let mut v = dev.clone_dtoh(d)?;
    v.truncate(n);
    Ok(v)
}

impl DeviceMoments8bit {
    /// Uploads the host state `q`.
    pub fn upload(dev: &CudaDevice, q: &crate::optim8bit::Moments8bit) -> Result<Self> {
        q.check_sizes("the host")?;
        let l = &q.layout;
        let table: Vec<i64> = l
            .blocks
            .iter()
            .flat_map(|b| [b.param as i64, b.len as i64, b.state as i64, b.absmax.map_or(-1, |a| a as i64)])
            .collect();
        Ok(DeviceMoments8bit {
            state1: upload(dev, &q.state1)?,
            state2: upload(dev, &q.state2)?,
            absmax1: upload(dev, &q.absmax1)?,
            absmax2: upload(dev, &q.absmax2)?,
            exp_avg: upload(dev, &q.exp_avg)?,
            exp_avg_sq: upload(dev, &q.exp_avg_sq)?,
            qmap1: dev.clone_htod(&q.qmap1)?,
            qmap2: dev.clone_htod(&q.qmap2)?,
            blocks: upload(dev, &table)?,
            n_blocks: l.blocks.len(),
            num_params: l.num_params(),
        })
    }

    /// The state as host buffers, with the layout and code books of `like`.
    pub fn download(&self, dev: &CudaDevice, like: &crate::optim8bit::Moments8bit) -> Result<crate::optim8bit::Moments8bit> {
        let l = &like.layout;
        Ok(crate::optim8bit::Moments8bit {
            layout: l.clone(),
            qmap1: like.qmap1,
            qmap2: like.qmap2,
            state1: download(dev, &self.state1, l.n_8bit)?,
            state2: download(dev, &self.state2, l.n_8bit)?,
            absmax1: download(dev, &self.absmax1, l.n_absmax)?,
            absmax2: download(dev, &self.absmax2, l.n_absmax)?,
            exp_avg: download(dev, &self.exp_avg, l.n_fp32)?,
            exp_avg_sq: download(dev, &self.exp_avg_sq, l.n_fp32)?,
        })
    }

    /// Overwrites the device state with `q` (same layout).
    pub fn load(&mut self, dev: &CudaDevice, q: &crate::optim8bit::Moments8bit) -> Result<()> {
        q.check_sizes("a checkpoint")?;
        *self = Self::upload(dev, q)?;
        Ok(())
    }
}

/// One AdamW step with 8-bit moments over the device-resident `params` (kernel
/// `adamw_8bit_blockwise`): bitwise the host `AdamW::step` with 8-bit state for equal
/// inputs, gradients scaled by `s.grad_scale` as they are read.
pub fn adamw_8bit_step(
    dev: &CudaDevice,
    params: &mut CudaSlice<f32>,
    grads: &CudaSlice<f32>,
    q: &mut DeviceMoments8bit,
    s: &AdamWScalars,
) -> Result<()> {
    let n = q.num_params;
    same_len("the parameter buffer", params.len(), n)?;
    same_len("the gradient buffer", grads.len(), n)?;
    if q.n_blocks == 0 {
        return Ok(());
    }
    let func = dev.get_or_load_custom_func("adamw_8bit_blockwise", OPTIM_MODULE, OPTIM_PTX)?;
    let mut b = func.builder();
    b.arg(params);
    b.arg(grads);
    b.arg(&mut q.state1);
    b.arg(&mut q.state2);
    b.arg(&mut q.absmax1);
    b.arg(&mut q.absmax2);
    b.arg(&mut q.exp_avg);
    b.arg(&mut q.exp_avg_sq);
    b.arg(&q.qmap1);
    b.arg(&q.qmap2);
    b.arg(&q.blocks);
    push_scalars(&mut b, s);
    let blocks = u32::try_from(q.n_blocks)
        .map_err(|_| Error::Msg(format!("8-bit AdamW on CUDA: {} blocks is too many for one launch", q.n_blocks)))?;
    let cfg = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: argument order and types match adamw_8bit_blockwise in optim.cu, launched with
    // THREADS = Q8_BLOCK threads; the block table was built from the layout these buffers
    // were sized by (upload checks the sizes), so every index it yields is in bounds, and
    // params/grads hold the layout's num_params values (checked above).
    unsafe { b.launch(cfg) }.w()?;
    Ok(())
}

/// Σ x² over the buffer, accumulated in f64 in an order fixed by `x.len()` alone (two
/// passes, no atomics), so equal inputs give an equal sum on every run. Waits for the
/// device: the result is read back (one f64).
pub fn sum_of_squares(dev: &CudaDevice, x: &CudaSlice<f32>) -> Result<f64> {
    let n = x.len();
    let blocks = (n / 4).div_ceil(THREADS as usize).clamp(1, NORM_MAX_BLOCKS);
    // SAFETY: pass 1 writes every one of the `blocks` partials, pass 2 the one total, before
    // anything reads them (same stream).
    let mut partial = unsafe { dev.alloc::<f64>(blocks)? };
    let mut total = unsafe { dev.alloc::<f64>(1)? };
    let n_i64 = n as i64;
    let pass1 = dev.get_or_load_custom_func("sumsq_partial_f32", OPTIM_MODULE, OPTIM_PTX)?;
    let mut b = pass1.builder();
    b.arg(x);
    b.arg(&n_i64);
    b.arg(&mut partial);
    let cfg = LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: matches sumsq_partial_f32 (block size THREADS = NORM_THREADS); `x` is a whole
    // allocation of n f32 (16-byte aligned), `partial` holds one f64 per block.
    unsafe { b.launch(cfg) }.w()?;
    let blocks_i32 = blocks as i32;
    let pass2 = dev.get_or_load_custom_func("sum_partials_f64", OPTIM_MODULE, OPTIM_PTX)?;
    let mut b = pass2.builder();
    b.arg(&partial);
    b.arg(&blocks_i32);
    b.arg(&mut total);
    let cfg = LaunchConfig { grid_dim: (1, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 };
    // SAFETY: matches sum_partials_f64; `partial` holds `blocks` values, `total` one.
    unsafe { b.launch(cfg) }.w()?;
    let v = dev.clone_dtoh(&total)?;
    Ok(v[0])
}

/// Overwrites the contiguous tensor `dst` (bf16, f16 or f32, same element count, starting
/// at its storage's first element) with `src` rounded to its dtype, in place: tensors that
/// view `dst`'s storage (the per-module adapter views) see the new values.
pub fn cast_f32_into(src: &CudaSlice<f32>, dst: &Tensor) -> Result<()> {
    let dev = cuda_device(dst.device())?;
    if !dst.is_contiguous() || dst.layout().start_offset() != 0 || dst.elem_count() != src.len() {
        return Err(Error::Msg(format!(
            "cast of the fp32 master weights: the destination must be a whole contiguous tensor of {} elements, got {:?} at offset {}",
            src.len(),
            dst.shape(),
            dst.layout().start_offset()
        )));
    }
    dst.inplace_op1(&CastFromF32 { src, dev })?;
    Ok(())
}

struct CastFromF32<'a> {
    src: &'a CudaSlice<f32>,
    dev: &'a CudaDevice,
}

impl CastFromF32<'_> {
    fn launch<T: candle_core::cuda_backend::CudaDType + candle_core::cuda_backend::cudarc::driver::DeviceRepr>(
        &self,
        kernel: &str,
        dst: &mut CudaStorage,
    ) -> candle_core::Result<()> {
        let n = self.src.len();
        let out = dst.as_cuda_slice_mut::<T>()?;
        let func = self.dev.get_or_load_custom_func(kernel, OPTIM_MODULE, OPTIM_PTX)?;
        let n_i64 = n as i64;
        let mut b = func.builder();
        b.arg(self.src);
        b.arg(out);
        b.arg(&n_i64);
        let cfg = elementwise_grid(n).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        // SAFETY: matches cast_f32_<dtype> in optim.cu; `out` is the whole allocation behind
        // a tensor of n elements at offset 0 (checked by `cast_f32_into`), so it holds at
        // least n elements and is 8-byte aligned for the 4-element stores.
        unsafe { b.launch(cfg) }.w()?;
        Ok(())
    }
}

impl InplaceOp1 for CastFromF32<'_> {
    fn name(&self) -> &'static str {
        "cast-f32-master"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> candle_core::Result<()> {
        candle_core::bail!("the fp32 master weights live on a CUDA device; the destination is on the CPU")
    }

    fn cuda_fwd(&self, dst: &mut CudaStorage, _: &Layout) -> candle_core::Result<()> {
        match dst.dtype() {
            DType::BF16 => self.launch::<bf16>("cast_f32_bf16", dst),
            DType::F16 => self.launch::<half::f16>("cast_f32_f16", dst),
            DType::F32 => {
                let out = dst.as_cuda_slice_mut::<f32>()?;
                let mut out = out.slice_mut(..self.src.len());
                self.dev.memcpy_dtod(self.src, &mut out)
            }
            other => candle_core::bail!("adapter compute dtype {other:?} is not supported on CUDA (bf16, f16, f32)"),
        }
    }
}

/// Device address of the first element of a contiguous tensor's storage, and the guard that
/// orders other streams after its use (drop it only after the launch).
fn tensor_ptr<'a>(s: &'a CudaStorage, layout: &Layout, stream: &'a CudaStream) -> Result<(u64, SyncOnDrop<'a>)> {
    let dtype = s.dtype();
    let (base, guard) = match dtype {
        DType::BF16 => s.as_cuda_slice::<bf16>()?.device_ptr(stream),
        DType::F16 => s.as_cuda_slice::<half::f16>()?.device_ptr(stream),
        DType::F32 => s.as_cuda_slice::<f32>()?.device_ptr(stream),
        other => return Err(Error::Msg(format!("LoRA gradient GEMM: dtype {other:?} is not supported on CUDA (bf16, f16, f32)"))),
    };
    Ok((base + (layout.start_offset() * dtype.size_in_bytes()) as u64, guard))
}

fn gemm_dim(what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::Msg(format!("LoRA gradient GEMM: {what} = {v} exceeds cuBLAS' 32-bit sizes")))
}

/// `acc[offset .. offset + p·q]`, read as a row-major `[p, q]` matrix, += `alpha`·xᵀ·y for
/// `x` `[N, p]` and `y` `[N, q]` of one dtype (bf16, f16 or f32). One cuBLAS GEMM with
/// beta = 1, products accumulated in f32 and added to the f32 buffer directly (no rounding
/// to the compute dtype on the way, no temporary).
pub fn gemm_tn_accumulate(acc: &mut CudaSlice<f32>, offset: usize, x: &Tensor, y: &Tensor, alpha: f32) -> Result<()> {
    let (n, p) = x.dims2()?;
    let (n_y, q) = y.dims2()?;
    if n != n_y || x.dtype() != y.dtype() {
        return Err(Error::Msg(format!(
            "LoRA gradient GEMM: xᵀ·y needs equal row counts and dtypes, got x {:?} {:?} and y {:?} {:?}",
            x.shape(),
            x.dtype(),
            y.shape(),
            y.dtype()
        )));
    }
    let end = offset + p * q;
    if end > acc.len() {
        return Err(Error::Msg(format!(
            "LoRA gradient GEMM: a [{p}, {q}] gradient at offset {offset} overruns the {}-value gradient buffer",
            acc.len()
        )));
    }
    if n == 0 || p == 0 || q == 0 {
        return Ok(());
    }
    let data_type = match x.dtype() {
        DType::BF16 => cublas::cudaDataType_t::CUDA_R_16BF,
        DType::F16 => cublas::cudaDataType_t::CUDA_R_16F,
        DType::F32 => cublas::cudaDataType_t::CUDA_R_32F,
        other => return Err(Error::Msg(format!("LoRA gradient GEMM: dtype {other:?} is not supported on CUDA (bf16, f16, f32)"))),
    };
    let (m_, n_, k_) = (gemm_dim("q", q)?, gemm_dim("p", p)?, gemm_dim("N", n)?);
    let x = x.contiguous()?;
    let y = y.contiguous()?;
    let dev = cuda_device(x.device())?;
    let stream = dev.cuda_stream();
    let blas = dev.cublas_handle();
    let (xs, xl) = x.storage_and_layout();
    let (ys, yl) = y.storage_and_layout();
    let (Storage::Cuda(xs), Storage::Cuda(ys)) = (&*xs, &*ys) else {
        return Err(Error::Msg("LoRA gradient GEMM: the activations are not on the CUDA device of the gradient buffer".into()));
    };
    let (x_ptr, _x_guard) = tensor_ptr(xs, xl, &stream)?;
    let (y_ptr, _y_guard) = tensor_ptr(ys, yl, &stream)?;
    let mut c = acc.slice_mut(offset..end);
    let (c_ptr, _c_guard) = c.device_ptr_mut(&stream);
    let (alpha, beta) = (alpha, 1f32);
    // Row-major [p, q] is column-major [q, p] (ldc = q). Row-major y [N, q] is column-major
    // yᵀ [q, N] (lda = q), row-major x [N, p] is column-major xᵀ [p, N] (ldb = p), so
    // C = yᵀ·(xᵀ)ᵀ = (xᵀ·y)ᵀ in column-major terms: op(A) = N, op(B) = T, m = q, n = p, k = N.
    // The strided-batched entry point with one batch is cublasGemmEx; it is the one candle
    // itself calls, so a build links against no cuBLAS symbol beyond candle's.
    // SAFETY: the pointers address contiguous buffers of N·q, N·p and p·q elements of the
    // declared types (checked above); alpha and beta are host f32, as CUBLAS_COMPUTE_32F
    // wants; candle's handle is bound to candle's stream, the stream of every operand.
    unsafe {
        gemm_strided_batched_ex(
            *blas.handle(),
            cublas::cublasOperation_t::CUBLAS_OP_N,
            cublas::cublasOperation_t::CUBLAS_OP_T,
            m_,
            n_,
            k_,
            &alpha as *const f32 as *const _,
            y_ptr as *const _,
            data_type,
            m_,
            0,
            x_ptr as *const _,
            data_type,
            n_,
            0,
            &beta as *const f32 as *const _,
            c_ptr as *mut _,
            cublas::cudaDataType_t::CUDA_R_32F,
            m_,
            0,
            1,
            cublas::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cublas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
        )
    }
    .w()?;
    Ok(())
}
