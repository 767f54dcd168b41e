//! NF4 weights on the device: [`CudaNf4`] holds the packed codes and (double-quantized)
//! absmax of one weight; [`CudaNf4::dequantize_into`] expands it into a caller's buffer,
//! [`CudaNf4::to_tensor`] into a fresh candle tensor for one GEMM.

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Device, Storage, Tensor};

use super::{bf16, cuda_device};
use crate::nf4::{Absmax, Nf4Tensor};
use crate::{Error, Result};

const NF4_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/nf4.ptx"));
/// Name under which candle caches the loaded module (one load per device).
const NF4_MODULE: &str = "qdistill_nf4";

/// A launch shape of the NF4 kernel: `units` units of `8 * vec` elements per thread and
/// iteration (the template arguments of the named kernel in nf4.cu), `threads` per block,
/// and the grid: `waves == 0` gives one block per `threads * units` units (each block runs
/// its loop once), `waves == k` caps the grid at k times the blocks the GPU holds at once,
/// so each block loops over the weight with a grid stride and its prologue (the 256-entry
/// double-quant code table into shared memory, a barrier) is paid once per resident block
/// instead of once per 4,096 elements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nf4Launch {
    pub kernel_suffix: &'static str,
    pub units: usize,
    pub vec: usize,
    pub threads: u32,
    pub waves: u32,
}

/// What [`CudaNf4::dequantize_into`] launches (the kernels without suffix: UNITS 2, VEC 1).
pub const NF4_DEFAULT_LAUNCH: Nf4Launch = Nf4Launch { kernel_suffix: "", units: 2, vec: 1, threads: 256, waves: 0 };

const fn shape(kernel_suffix: &'static str, units: usize, threads: u32, waves: u32) -> Nf4Launch {
    Nf4Launch { kernel_suffix, units, vec: 1, threads, waves }
}

/// Launch shapes of the bf16 double-quant kernel that the benchmark times side by side.
pub const NF4_BF16_DQ_VARIANTS: [Nf4Launch; 12] = [
    NF4_DEFAULT_LAUNCH,
    shape("", 2, 512, 0),
    shape("_u2v1cs", 2, 256, 0),
    shape("_u4v1", 4, 256, 0),
    shape("_u4v1cs", 4, 256, 0),
    shape("_u8v1", 8, 256, 0),
    Nf4Launch { kernel_suffix: "_u2v2", units: 2, vec: 2, threads: 256, waves: 0 },
    shape("", 2, 256, 1),
    shape("", 2, 256, 2),
    shape("", 2, 256, 4),
    shape("_u4v1", 4, 256, 1),
    shape("_u4v1cs", 4, 512, 2),
];

enum DeviceAbsmax {
    F32(CudaSlice<f32>),
    Double { quantized: CudaSlice<u8>, code: CudaSlice<f32>, absmax2: CudaSlice<f32>, offset: f32, bs2_shift: i32 },
}

/// An NF4 weight `[rows, cols]` resident on a CUDA device, in bitsandbytes' layout (the
/// same bytes as [`Nf4Tensor`], uploaded once).
pub struct CudaNf4 {
    pub rows: usize,
    pub cols: usize,
    bs_shift: i32,
    packed: CudaSlice<u8>,
    absmax: DeviceAbsmax,
    device: CudaDevice,
}

/// Output element types the dequantization kernel writes.
pub trait Nf4Out: DeviceRepr {
    const KERNEL_DQ: &'static str;
    const KERNEL_F32ABSMAX: &'static str;
}
impl Nf4Out for bf16 {
    const KERNEL_DQ: &'static str = "nf4_dequant_bf16_dq";
    const KERNEL_F32ABSMAX: &'static str = "nf4_dequant_bf16_f32absmax";
}
impl Nf4Out for f32 {
    const KERNEL_DQ: &'static str = "nf4_dequant_f32_dq";
    const KERNEL_F32ABSMAX: &'static str = "nf4_dequant_f32_f32absmax";
}

fn log2_exact(what: &str, v: usize) -> Result<i32> {
    if v >= 8 && v.is_power_of_two() {
        Ok(v.trailing_zeros() as i32)
    } else {
        Err(Error::Msg(format!(
            "NF4 on CUDA: {what} {v} is not supported (the kernel needs a power of two of at least 8, \
             as every bitsandbytes block size is)"
        )))
    }
}

impl CudaNf4 {
    /// Copies the packed codes and scales of `q` to `device` (once; they stay there).
    pub fn upload(q: &Nf4Tensor, device: &Device) -> Result<Self> {
        let dev = cuda_device(device)?;
        let bs_shift = log2_exact("blocksize", q.blocksize)?;
        let n = q.rows * q.cols;
        if q.packed.len() != n.div_ceil(2) {
            return Err(Error::Msg(format!(
                "NF4 on CUDA: {}x{} weight has {} packed bytes, expected {}",
                q.rows,
                q.cols,
                q.packed.len(),
                n.div_ceil(2)
            )));
        }
        let n_blocks = n.div_ceil(q.blocksize);
        // The kernel reads whole units of packed words only below n and the odd tail byte by
        // byte, so the codes upload as they are.
        let packed = dev.clone_htod(&q.packed)?;
        let absmax = match &q.absmax {
            Absmax::F32(v) => {
                check_len("absmax", v.len(), n_blocks)?;
                DeviceAbsmax::F32(dev.clone_htod(v)?)
            }
            Absmax::Double { quantized, code, absmax2, offset, blocksize2 } => {
                check_len("quantized absmax", quantized.len(), n_blocks)?;
                check_len("nested absmax", absmax2.len(), n_blocks.div_ceil(*blocksize2))?;
                check_len("nested quant map", code.len(), 256)?;
                DeviceAbsmax::Double {
                    quantized: dev.clone_htod(quantized)?,
                    code: dev.clone_htod(code)?,
                    absmax2: dev.clone_htod(absmax2)?,
                    offset: *offset,
                    bs2_shift: log2_exact("nested blocksize", *blocksize2)?,
                }
            }
        };
        Ok(Self { rows: q.rows, cols: q.cols, bs_shift, packed, absmax, device: dev.clone() })
    }

    pub fn numel(&self) -> usize {
        self.rows * self.cols
    }

    /// Device bytes held (packed codes and scales).
    pub fn memory_bytes(&self) -> usize {
        self.packed.len()
            + match &self.absmax {
                DeviceAbsmax::F32(a) => 4 * a.len(),
                DeviceAbsmax::Double { quantized, code, absmax2, .. } => quantized.len() + 4 * (code.len() + absmax2.len()),
            }
    }

    /// Writes the dequantized weight, row-major, into the first `numel()` elements of
    /// `out` (e.g. one scratch buffer reused for every layer of a model). Asynchronous on
    /// candle's stream.
    pub fn dequantize_into<T: Nf4Out>(&self, out: &mut CudaSlice<T>) -> Result<()> {
        self.dequantize_into_with(out, &NF4_DEFAULT_LAUNCH)
    }

    /// [`CudaNf4::dequantize_into`] with another launch shape (benchmarking; only the bf16
    /// double-quant kernel has variants, see [`NF4_BF16_DQ_VARIANTS`]).
    pub fn dequantize_into_with<T: Nf4Out>(&self, out: &mut CudaSlice<T>, launch: &Nf4Launch) -> Result<()> {
        let n = self.numel();
        if out.len() < n {
            return Err(Error::Msg(format!(
                "NF4 on CUDA: output buffer has {} elements, the {}x{} weight needs {n}",
                out.len(),
                self.rows,
                self.cols
            )));
        }
        if 8 * launch.vec > (1usize << self.bs_shift) {
            return Err(Error::Msg(format!(
                "NF4 on CUDA: launch {launch:?} reads {} elements per unit, more than the block size {}",
                8 * launch.vec,
                1usize << self.bs_shift
            )));
        }
        let base = match &self.absmax {
            DeviceAbsmax::Double { .. } => T::KERNEL_DQ,
            DeviceAbsmax::F32(_) => T::KERNEL_F32ABSMAX,
        };
        let name = format!("{base}{}", launch.kernel_suffix);
        let func = self.device.get_or_load_custom_func(&name, NF4_MODULE, NF4_PTX)?;
        let n_units = n / (8 * launch.vec);
        let per_block = launch.threads as usize * launch.units;
        let mut grid = n_units.div_ceil(per_block).max(1);
        if launch.waves > 0 {
            let sms = self.device.cuda_stream().context().attribute(
                candle_core::cuda_backend::cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
            ).w()? as usize;
            let resident = sms * (2048 / launch.threads as usize).max(1);
            grid = grid.min(resident * launch.waves as usize);
        }
        let grid = u32::try_from(grid).map_err(|_| Error::Msg(format!("NF4 on CUDA: {n} elements is too many for one launch")))?;
        let cfg = LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (launch.threads, 1, 1), shared_mem_bytes: 0 };
        let n_i64 = n as i64;
        let mut b = func.builder();
        b.arg(&self.packed);
        b.arg(&n_i64);
        b.arg(&self.bs_shift);
        // Unused pointer arguments of the other absmax form get any valid device pointer.
        match &self.absmax {
            DeviceAbsmax::F32(a) => {
                b.arg(a);
                b.arg(&self.packed);
                b.arg(a);
                b.arg(a);
                b.arg(&0f32);
                b.arg(&8i32);
            }
            DeviceAbsmax::Double { quantized, code, absmax2, offset, bs2_shift } => {
                b.arg(absmax2);
                b.arg(quantized);
                b.arg(code);
                b.arg(absmax2);
                b.arg(offset);
                b.arg(bs2_shift);
            }
        }
        b.arg(out);
        // SAFETY: argument order and types match the kernel's signature in nf4.cu; `out`
        // holds at least n elements (checked above); `packed` holds ceil(n/2) bytes, of which
        // the kernel reads whole units only below n; cudarc allocations are 256-byte aligned.
        unsafe { b.launch(cfg) }.w()?;
        Ok(())
    }

    /// The dequantized weight as a new `[rows, cols]` tensor in `dtype` (bf16 and f32 are
    /// written by the kernel directly; other dtypes go through f32). The allocation comes
    /// from the stream-ordered pool, so a transient per-GEMM copy reuses the same memory.
    pub fn to_tensor(&self, dtype: DType) -> Result<Tensor> {
        let n = self.numel();
        let storage = match dtype {
            DType::BF16 => {
                // SAFETY: every element is written by the kernel before any read on this stream.
                let mut out = unsafe { self.device.alloc::<bf16>(n)? };
                self.dequantize_into(&mut out)?;
                CudaStorage::wrap_cuda_slice(out, self.device.clone())
            }
            _ => {
                // SAFETY: as above.
                let mut out = unsafe { self.device.alloc::<f32>(n)? };
                self.dequantize_into(&mut out)?;
                CudaStorage::wrap_cuda_slice(out, self.device.clone())
            }
        };
        let t = Tensor::from_storage(Storage::Cuda(storage), (self.rows, self.cols), BackpropOp::none(), false);
        Ok(if t.dtype() == dtype { t } else { t.to_dtype(dtype)? })
    }
}

fn check_len(what: &str, got: usize, want: usize) -> Result<()> {
    if got == want {
        Ok(())
    } else {
        Err(Error::Msg(format!("NF4 on CUDA: {what} has {got} entries, expected {want}")))
    }
}

#[cfg(test)]
mod tests {
    //! These run only where a CUDA device is present (the GPU check script); elsewhere they
    //! report that they were skipped by returning early.
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn device() -> Option<Device> {
        Device::new_cuda(0).ok()
    }

    fn random_weight(rows: usize, cols: usize, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        // Rows of very different magnitude, so the absmax (and its double quantization)
        // spans decades as real weights' do.
        (0..rows * cols)
            .map(|i| {
                let row_scale = 10f32.powi((i / cols % 5) as i32 - 3);
                row_scale * (rng.random::<f32>() * 2.0 - 1.0)
            })
            .collect()
    }

    #[test]
    fn dequant_matches_cpu_bitwise() {
        let Some(dev) = device() else {
            eprintln!("no CUDA device: skipped");
            return;
        };
        // Odd sizes exercise the tail path and a last partial block.
        for (rows, cols, dq) in [(64, 64, true), (300, 517, true), (7, 9, false), (1000, 4096, false), (3, 3, true)] {
            let w = random_weight(rows, cols, (rows * cols) as u64);
            let q = Nf4Tensor::quantize(&w, rows, cols, dq).unwrap();
            let want = q.dequantize();
            let g = CudaNf4::upload(&q, &dev).unwrap();
            let cuda = cuda_device(&dev).unwrap();
            // Poisoned outputs: an element the kernel skips stays NaN and fails the check.
            let mut out = cuda.clone_htod(&vec![f32::NAN; want.len()]).unwrap();
            g.dequantize_into(&mut out).unwrap();
            let got = cuda.clone_dtoh(&out).unwrap();
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert_eq!(a.to_bits(), b.to_bits(), "{rows}x{cols} dq={dq}: element {i}: gpu {a} cpu {b}");
            }
            let mut out = cuda.clone_htod(&vec![bf16::NAN; want.len()]).unwrap();
            g.dequantize_into(&mut out).unwrap();
            let got = cuda.clone_dtoh(&out).unwrap();
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert_eq!(a.to_bits(), bf16::from_f32(*b).to_bits(), "{rows}x{cols} dq={dq} bf16: element {i}");
            }
        }
    }
}
