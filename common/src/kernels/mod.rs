//! CUDA kernels (feature `cuda`) and the few driver-level helpers the training path needs
//! on a GPU. The kernels live in common/kernels/*.cu; build.rs compiles them to PTX, which
//! is embedded by each module here and JIT-loaded once per device through candle's module
//! cache, and launched through cudarc on candle's stream, so they order with every candle op.
//!
//! - [`nf4`]: NF4 weights resident on the device and their dequantization.
//! - [`loss`]: the CUDA path of the fused LM-head CE/KD loss (cuBLAS GEMMs around one
//!   row kernel that writes dlogits in place).
//! - [`optim`]: AdamW, the gradient norm and the LoRA gradient GEMMs over flat fp32 buffers.
//! - [`MemPool`]: the device's stream-ordered memory pool, which cudarc allocates from:
//!   keep freed blocks (no re-mapping between steps) and read the high-water mark of
//!   memory in use (what torch calls `max_memory_allocated`).

use candle_core::cuda_backend::cudarc::driver::sys;
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaDevice, Device};
/// The bf16 element type of device buffers (re-exported so callers need no `half` dependency).
pub use half::bf16;

use crate::{Error, Result};

pub mod flash;
pub mod fused;
pub mod gemm;
pub mod loss;
pub mod nf4;
pub mod offload;
pub mod optim;
pub use nf4::{CudaNf4, Nf4Launch, Nf4Out, NF4_BF16_DQ_VARIANTS, NF4_DEFAULT_LAUNCH};

/// The CUDA device behind a candle device, or a typed error naming what was given.
pub fn cuda_device(device: &Device) -> Result<&CudaDevice> {
    match device {
        Device::Cuda(d) => Ok(d),
        other => Err(Error::Msg(format!("a CUDA kernel was asked to run on {other:?}, which is not a CUDA device"))),
    }
}

/// The device's default stream-ordered memory pool, from which cudarc (and so candle)
/// allocates when the driver supports it.
pub struct MemPool {
    pool: sys::CUmemoryPool,
}

impl MemPool {
    pub fn of(device: &Device) -> Result<Self> {
        let dev = cuda_device(device)?;
        let stream = dev.cuda_stream();
        let ctx = stream.context();
        ctx.bind_to_thread().w()?;
        let mut pool = std::ptr::null_mut();
        // SAFETY: plain driver query into a local out-pointer.
        unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, ctx.cu_device()) }.result().w()?;
        Ok(Self { pool })
    }

    fn get(&self, attr: sys::CUmemPool_attribute) -> Result<u64> {
        let mut v = 0u64;
        // SAFETY: these attributes are cuuint64_t.
        unsafe { sys::cuMemPoolGetAttribute(self.pool, attr, &mut v as *mut u64 as *mut _) }.result().w()?;
        Ok(v)
    }

    fn set(&self, attr: sys::CUmemPool_attribute, mut v: u64) -> Result<()> {
        // SAFETY: as in `get`.
        unsafe { sys::cuMemPoolSetAttribute(self.pool, attr, &mut v as *mut u64 as *mut _) }.result().w()?;
        Ok(())
    }

    /// Keep freed memory in the pool across synchronisations instead of handing it back to
    /// the driver (the default threshold of 0 unmaps it at every sync, and the next step
    /// maps it again), as PyTorch's caching allocator does.
    pub fn retain_freed(&self) -> Result<()> {
        self.set(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, u64::MAX)
    }

    /// Bytes currently allocated from the pool.
    pub fn used(&self) -> Result<u64> {
        self.get(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)
    }

    /// High-water mark of allocated bytes since the last [`MemPool::reset_peak`].
    pub fn peak_used(&self) -> Result<u64> {
        self.get(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH)
    }

    /// Bytes the pool holds from the driver (allocated or cached).
    pub fn reserved(&self) -> Result<u64> {
        self.get(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)
    }

    pub fn reset_peak(&self) -> Result<()> {
        self.set(sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH, 0)
    }
}

/// Free and total device memory (bytes) as the driver sees them.
pub fn mem_get_info(device: &Device) -> Result<(usize, usize)> {
    let dev = cuda_device(device)?;
    let stream = dev.cuda_stream();
    Ok(stream.context().mem_get_info().w()?)
}

/// Blocks until all work queued on the device's stream has finished.
pub fn synchronize(device: &Device) -> Result<()> {
    let dev = cuda_device(device)?;
    dev.cuda_stream().synchronize().w()?;
    Ok(())
}

/// Device name and CUDA driver version (e.g. 13000), for benchmark reports.
pub fn device_info(device: &Device) -> Result<(String, i32)> {
    let dev = cuda_device(device)?;
    let stream = dev.cuda_stream();
    let name = stream.context().name().w()?;
    let mut v = 0;
    // SAFETY: plain driver query into a local out-pointer.
    unsafe { sys::cuDriverGetVersion(&mut v) }.result().w()?;
    Ok((name, v))
}

/// Times `f` with CUDA events on candle's stream: `warmup` untimed runs, then `iters` runs
/// each between its own pair of events; returns the per-run milliseconds (sorted).
pub fn time_on_stream(device: &Device, warmup: usize, iters: usize, mut f: impl FnMut() -> Result<()>) -> Result<Vec<f64>> {
    let dev = cuda_device(device)?;
    let stream = dev.cuda_stream();
    let ctx = stream.context();
    for _ in 0..warmup {
        f()?;
    }
    let flags = Some(sys::CUevent_flags::CU_EVENT_DEFAULT);
    let mut times = Vec::with_capacity(iters);
    for _ in 0..iters {
        let start = ctx.new_event(flags).w()?;
        let end = ctx.new_event(flags).w()?;
        start.record(&stream).w()?;
        f()?;
        end.record(&stream).w()?;
        times.push(start.elapsed_ms(&end).w()? as f64);
    }
    times.sort_by(f64::total_cmp);
    Ok(times)
}

