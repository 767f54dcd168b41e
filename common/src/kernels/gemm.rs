//! Row-major cuBLAS GEMMs on raw device addresses, for the places where candle's matmul
//! would cost a temporary and an extra pass: writing into a slice of a larger buffer
//! (the loss kernel's chunk rows) and accumulating into an existing output with β = 1
//! (the LoRA branch added onto the base GEMM's output, the dX of several linears summed
//! in one buffer). Everything runs on candle's stream, so it orders with candle's ops.

use candle_core::cuda_backend::cudarc::cublas::result::gemm_strided_batched_ex;
use candle_core::cuda_backend::cudarc::cublas::sys as cublas;
use candle_core::cuda_backend::cudarc::driver::DevicePtr;
use candle_core::cuda_backend::{gemm_reduced_precision_bf16, gemm_reduced_precision_f32, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Storage, Tensor};

use super::{bf16, cuda_device};
use crate::{Error, Result};

fn msg(s: String) -> Error {
    Error::Msg(format!("GEMM (CUDA): {s}"))
}

pub(crate) fn to_i32(what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| msg(format!("{what} = {v} exceeds cuBLAS' 32-bit sizes")))
}

/// Device address of the first element of `t` (its layout's start offset included).
///
/// All work on a device runs in order on candle's one stream, and the caller keeps `t`
/// alive until its last launch is queued (a buffer freed after that is freed in stream
/// order), so the address stays valid for every launch that uses it.
pub(crate) fn dptr(t: &Tensor) -> Result<u64> {
    let (st, layout) = t.storage_and_layout();
    let Storage::Cuda(s) = &*st else {
        return Err(msg(format!("a {:?} operand is not on a CUDA device", t.dims())));
    };
    let stream = s.device.cuda_stream();
    let base = match t.dtype() {
        DType::BF16 => s.as_cuda_slice::<bf16>()?.device_ptr(&stream).0,
        DType::F16 => s.as_cuda_slice::<half::f16>()?.device_ptr(&stream).0,
        DType::F32 => s.as_cuda_slice::<f32>()?.device_ptr(&stream).0,
        DType::U32 => s.as_cuda_slice::<u32>()?.device_ptr(&stream).0,
        other => return Err(msg(format!("no kernel takes a {other:?} operand"))),
    };
    Ok(base + (layout.start_offset() * t.dtype().size_in_bytes()) as u64)
}

/// A contiguous tensor of `shape` whose elements are whatever the pool held: every
/// element is written by a GEMM or kernel before anything reads it.
pub(crate) fn uninit(dev: &CudaDevice, dtype: DType, shape: &[usize]) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    // SAFETY: as stated above; the callers write before they read.
    let storage = match dtype {
        DType::BF16 => CudaStorage::wrap_cuda_slice(unsafe { dev.alloc::<bf16>(n)? }, dev.clone()),
        DType::F32 => CudaStorage::wrap_cuda_slice(unsafe { dev.alloc::<f32>(n)? }, dev.clone()),
        other => return Err(msg(format!("no buffer of dtype {other:?}"))),
    };
    Ok(Tensor::from_storage(Storage::Cuda(storage), shape, BackpropOp::none(), false))
}

fn cuda_dtype(dt: DType) -> Result<cublas::cudaDataType_t> {
    match dt {
        DType::BF16 => Ok(cublas::cudaDataType_t::CUDA_R_16BF),
        DType::F16 => Ok(cublas::cudaDataType_t::CUDA_R_16F),
        DType::F32 => Ok(cublas::cudaDataType_t::CUDA_R_32F),
        other => Err(msg(format!("no GEMM for dtype {other:?}"))),
    }
}

/// One row-major GEMM: `C[m, n] = alpha·A[m, k]·Bᵀ + beta·C` for `B` `[n, k]`
/// (`b_transposed`), else `alpha·A·B + beta·C` for `B` `[k, n]`; `lda`, `ldb`, `ldc` are row
/// strides in elements, all three matrices of one dtype, accumulated in f32 with the same
/// compute type as candle's matmul (so β = 0 gives candle's numbers).
pub(crate) struct Gemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: u64,
    pub lda: usize,
    pub b: u64,
    pub ldb: usize,
    pub b_transposed: bool,
    pub c: u64,
    pub ldc: usize,
    pub alpha: f32,
    pub beta: f32,
}

impl Gemm {
    /// SAFETY: the addresses hold the matrices the shapes and strides describe, in `dtype`,
    /// on `dev`, and stay allocated until the GEMM has run on candle's stream.
    pub(crate) unsafe fn run(&self, dev: &CudaDevice, dtype: DType) -> Result<()> {
        let data_type = cuda_dtype(dtype)?;
        let compute = match dtype {
            DType::BF16 if gemm_reduced_precision_bf16() => cublas::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_16BF,
            DType::F32 if gemm_reduced_precision_f32() => cublas::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32,
            _ => cublas::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        };
        let (m, n, k) = (to_i32("GEMM m", self.m)?, to_i32("GEMM n", self.n)?, to_i32("GEMM k", self.k)?);
        let (lda, ldb, ldc) = (to_i32("lda", self.lda)?, to_i32("ldb", self.ldb)?, to_i32("ldc", self.ldc)?);
        // cuBLAS is column-major, where a row-major X with row stride ld is Xᵀ with leading
        // dimension ld. So Cᵀ[n, m] = op(B)ᵀ · Aᵀ: the first operand is B (transposed when
        // B is [n, k]), the second A as it lies.
        let op_b = if self.b_transposed { cublas::cublasOperation_t::CUBLAS_OP_T } else { cublas::cublasOperation_t::CUBLAS_OP_N };
        let blas = dev.cublas_handle();
        gemm_strided_batched_ex(
            *blas.handle(),
            op_b,
            cublas::cublasOperation_t::CUBLAS_OP_N,
            n,
            m,
            k,
            &self.alpha as *const f32 as *const _,
            self.b as *const _,
            data_type,
            ldb,
            0,
            self.a as *const _,
            data_type,
            lda,
            0,
            &self.beta as *const f32 as *const _,
            self.c as *mut _,
            data_type,
            ldc,
            0,
            1,
            compute,
            cublas::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT_TENSOR_OP,
        )
        .w()?;
        Ok(())
    }
}

/// `c += alpha·a·bᵀ` (`b_transposed`, `b` `[n, k]`) or `c += alpha·a·b` (`b` `[k, n]`) for
/// `a` `[m, k]` and `c` `[m, n]`, written into `c`'s storage in place: one GEMM with β = 1
/// instead of a product, a scale and an add (three temporaries, five passes over `c`).
///
/// `c` must be a tensor no one else reads before this runs — the caller's own fresh
/// output (a GEMM result it has not handed out); candle's tensors are otherwise immutable.
pub fn add_matmul(c: &Tensor, a: &Tensor, b: &Tensor, b_transposed: bool, alpha: f32) -> Result<()> {
    let (m, k) = a.dims2()?;
    let (b0, b1) = b.dims2()?;
    let (n, kb) = if b_transposed { (b0, b1) } else { (b1, b0) };
    let (cm, cn) = c.dims2()?;
    if kb != k || cm != m || cn != n || a.dtype() != c.dtype() || b.dtype() != c.dtype() {
        return Err(msg(format!(
            "c {:?} {:?} += a {:?} {:?} · b{} {:?} {:?}: shapes or dtypes do not agree",
            c.dims(),
            c.dtype(),
            a.dims(),
            a.dtype(),
            if b_transposed { "ᵀ" } else { "" },
            b.dims(),
            b.dtype()
        )));
    }
    for (name, t) in [("c", c), ("a", a), ("b", b)] {
        if !t.is_contiguous() {
            return Err(msg(format!("operand {name} {:?} is not contiguous", t.dims())));
        }
    }
    if m == 0 || n == 0 || k == 0 {
        return Ok(());
    }
    let dev = cuda_device(c.device())?;
    let ldb = if b_transposed { k } else { n };
    let g = Gemm { m, n, k, a: dptr(a)?, lda: k, b: dptr(b)?, ldb, b_transposed, c: dptr(c)?, ldc: n, alpha, beta: 1.0 };
    // SAFETY: the three tensors are contiguous with the shapes checked above, on one device
    // (dptr fails otherwise), and alive until this returns, after the GEMM is queued.
    unsafe { g.run(dev, c.dtype()) }
}
