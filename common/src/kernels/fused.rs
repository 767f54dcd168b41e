//! Fused CUDA kernels (common/kernels/fused.cu) for the memory-bound ops of a decoder
//! block: RMSNorm, RoPE and the gated activations, forward and backward. Each is one pass
//! over its operands with f32 arithmetic, for bf16 or f32 tensors, where the candle
//! reference in `ops::{rms_norm, rope, activation}` chains several elementwise kernels.
//!
//! The `ops` functions call these on a CUDA device when [`applies`] says so; the functions
//! here can also be called directly (the self-test does, to be sure the kernel ran).
//! Setting `QDISTILL_FUSED_KERNELS=0` in the environment turns the dispatch off for the
//! whole process, which runs the candle reference instead (A/B comparisons of a run).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use candle_core::cuda_backend::cudarc::driver::{result as driver, CudaSlice, CudaView, DevicePtrMut, DeviceRepr, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Shape, Storage, Tensor, D};

use super::gemm::dptr;
use super::{bf16, cuda_device};
use crate::ops::activation::Activation;
use crate::ops::rope::RopeTable;
use crate::{Error, Result};

const FUSED_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/fused.ptx"));
/// Name under which candle caches the loaded module (one load per device).
const FUSED_MODULE: &str = "qdistill_fused";

/// Environment variable that, set to `0`, makes the ops use the candle reference on CUDA.
pub const FUSED_KERNELS_ENV: &str = "QDISTILL_FUSED_KERNELS";

/// Threads per block of the elementwise kernels (RoPE, GLU).
const ELEMENTWISE_THREADS: u32 = 256;
/// Largest grid of the grid-stride kernels; more work loops inside the kernel.
const MAX_BLOCKS: usize = 1 << 20;
/// Largest block of the per-row RMSNorm kernels; longer rows loop inside the block.
const MAX_ROW_THREADS: usize = 512;

/// Whether the fused kernels are on for this process (read once from [`FUSED_KERNELS_ENV`]).
pub fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var(FUSED_KERNELS_ENV).map_or(true, |v| v.trim() != "0"))
}

/// Whether the `ops` dispatch these operands to the kernels: kernels enabled, all operands
/// non-empty, of one dtype the kernels have (bf16 or f32) and on one CUDA device. Anything
/// else goes to the candle reference, which also reports mismatched operands.
pub fn applies(operands: &[&Tensor]) -> bool {
    let Some(first) = operands.first() else { return false };
    enabled()
        && first.device().is_cuda()
        && matches!(first.dtype(), DType::BF16 | DType::F32)
        && operands.iter().all(|t| t.dtype() == first.dtype() && t.device().same_device(first.device()) && t.elem_count() > 0)
}

static POISON_OUTPUTS: AtomicBool = AtomicBool::new(false);

/// For self-tests: while on, every output buffer of these kernels is filled with NaN
/// before the launch, so an element a kernel fails to write shows up as NaN instead of
/// as whatever the memory pool left there.
pub fn poison_outputs(on: bool) {
    POISON_OUTPUTS.store(on, Ordering::SeqCst);
}

/// Element types the kernels are instantiated for.
trait Elem: CudaDType + DeviceRepr {
    /// The dtype part of the kernel names in fused.cu.
    const NAME: &'static str;
    const BYTES: usize;
}
impl Elem for bf16 {
    const NAME: &'static str = "bf16";
    const BYTES: usize = 2;
}
impl Elem for f32 {
    const NAME: &'static str = "f32";
    const BYTES: usize = 4;
}

fn unsupported(op: &str, dtype: DType) -> Error {
    Error::Msg(format!("{op}: the fused CUDA kernel has no {dtype:?} variant (bf16 and f32 only)"))
}

/// The largest VEC (elements per vector access of at most 16 bytes) that divides every
/// value given: the row length and every start offset, so that all accesses are aligned.
fn pick_vec<T: Elem>(multiples_of: &[usize]) -> usize {
    let mut v = 16 / T::BYTES;
    while v > 1 && multiples_of.iter().any(|m| m % v != 0) {
        v /= 2;
    }
    v
}

fn to_i32(op: &str, what: &str, v: usize) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::Msg(format!("{op}: {what} {v} is too large for the kernel's 32-bit index")))
}

fn grid_stride_cfg(work_items: usize) -> LaunchConfig {
    let blocks = work_items.div_ceil(ELEMENTWISE_THREADS as usize).clamp(1, MAX_BLOCKS);
    LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (ELEMENTWISE_THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// A read-only view of a contiguous tensor's elements on the device.
fn view<'a, T: Elem>(storage: &'a Storage, layout: &Layout, op: &str, what: &str) -> Result<CudaView<'a, T>> {
    let Storage::Cuda(s) = storage else {
        return Err(Error::Msg(format!("{op}: {what} is not on a CUDA device")));
    };
    let (start, end) = layout
        .contiguous_offsets()
        .ok_or_else(|| Error::Msg(format!("{op}: {what} is not contiguous")))?;
    Ok(s.as_cuda_slice::<T>()?.slice(start..end))
}

/// A fresh output buffer of `n` elements (NaN-filled while [`poison_outputs`] is on).
fn alloc_out<T: Elem>(dev: &CudaDevice, n: usize) -> Result<CudaSlice<T>> {
    // SAFETY: the kernel writes every element before anything reads it on this stream.
    let mut out = unsafe { dev.alloc::<T>(n)? };
    if POISON_OUTPUTS.load(Ordering::SeqCst) {
        let stream = dev.cuda_stream();
        let (ptr, _sync) = out.device_ptr_mut(&stream);
        // SAFETY: `ptr` addresses n * size_of::<T>() bytes owned by `out`; all-ones bytes
        // are a NaN in both bf16 and f32.
        unsafe { driver::memset_d8_async(ptr, 0xff, n * T::BYTES, stream.cu_stream()) }.w()?;
    }
    Ok(out)
}

fn into_tensor<T: Elem>(out: CudaSlice<T>, dev: &CudaDevice, shape: impl Into<Shape>) -> Tensor {
    Tensor::from_storage(Storage::Cuda(CudaStorage::wrap_cuda_slice(out, dev.clone())), shape, BackpropOp::none(), false)
}

fn check_operand(op: &str, what: &str, t: &Tensor, like: &Tensor, dims: &[usize]) -> Result<()> {
    if t.dims() != dims {
        return Err(Error::Msg(format!("{op}: {what} has shape {:?}, expected {dims:?}", t.dims())));
    }
    if t.dtype() != like.dtype() || !t.device().same_device(like.device()) {
        return Err(Error::Msg(format!(
            "{op}: {what} is {:?} on {:?} but the input is {:?} on {:?}",
            t.dtype(),
            t.device(),
            like.dtype(),
            like.device()
        )));
    }
    Ok(())
}

/// Rows of `d` elements and the launch shape of the per-row RMSNorm kernels.
fn row_launch(op: &str, x: &Tensor, vec: usize) -> Result<(usize, i32, LaunchConfig)> {
    let d = x.dim(D::Minus1)?;
    if d == 0 || x.elem_count() == 0 {
        return Err(Error::Msg(format!("{op}: input of shape {:?} is empty", x.dims())));
    }
    let rows = x.elem_count() / d;
    let grid = u32::try_from(rows)
        .ok()
        .filter(|&r| r <= i32::MAX as u32)
        .ok_or_else(|| Error::Msg(format!("{op}: {rows} rows are more than one launch takes")))?;
    // A multiple of 32 (block_sum's full-mask shuffles), at most MAX_ROW_THREADS.
    let threads = ((d / vec).div_ceil(32) * 32).min(MAX_ROW_THREADS) as u32;
    let cfg = LaunchConfig { grid_dim: (grid, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 };
    Ok((rows, to_i32(op, "row length", d)?, cfg))
}

// ---------------------------------------------------------------------------------------
// RMSNorm
// ---------------------------------------------------------------------------------------

/// RMSNorm forward of `x` `[..., d]` with `weight` `[d]` (`unit_offset`: Gemma's `1 + w`).
/// Returns `y` (x's shape and dtype) and `rstd` (`[..., 1]`, f32).
pub fn rms_norm_fwd(x: &Tensor, weight: &Tensor, eps: f64, unit_offset: bool) -> Result<(Tensor, Tensor)> {
    match x.dtype() {
        DType::BF16 => rms_norm_fwd_t::<bf16>(x, weight, eps, unit_offset),
        DType::F32 => rms_norm_fwd_t::<f32>(x, weight, eps, unit_offset),
        dt => Err(unsupported("fused rms_norm_fwd", dt)),
    }
}

fn rms_norm_fwd_t<T: Elem>(x: &Tensor, weight: &Tensor, eps: f64, unit_offset: bool) -> Result<(Tensor, Tensor)> {
    let op = "fused rms_norm_fwd";
    let d = x.dim(D::Minus1)?;
    check_operand(op, "norm weight", weight, x, &[d])?;
    let (x, w) = (x.contiguous()?, weight.contiguous()?);
    let dev = cuda_device(x.device())?;
    let vec = pick_vec::<T>(&[d, x.layout().start_offset(), w.layout().start_offset()]);
    let (rows, d_i32, cfg) = row_launch(op, &x, vec)?;
    let mut y = alloc_out::<T>(dev, rows * d)?;
    let mut rstd = alloc_out::<f32>(dev, rows)?;
    {
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        let xv = view::<T>(&xs, xl, op, "x")?;
        let wv = view::<T>(&ws, wl, op, "weight")?;
        let func = dev.get_or_load_custom_func(&format!("fused_rms_norm_fwd_{}_v{vec}", T::NAME), FUSED_MODULE, FUSED_PTX)?;
        let (eps, w_offset) = (eps as f32, if unit_offset { 1f32 } else { 0f32 });
        let mut b = func.builder();
        b.arg(&xv).arg(&wv).arg(&mut y).arg(&mut rstd).arg(&d_i32).arg(&eps).arg(&w_offset);
        // SAFETY: arguments match fused_rms_norm_fwd_* in fused.cu; x and y hold rows * d
        // elements, w holds d and rstd rows; the grid has one block per row and d and both
        // start offsets are multiples of vec, so every vector access is in bounds and aligned.
        unsafe { b.launch(cfg) }.w()?;
    }
    let mut rstd_dims = x.dims().to_vec();
    if let Some(last) = rstd_dims.last_mut() {
        *last = 1;
    }
    Ok((into_tensor(y, dev, x.shape().clone()), into_tensor(rstd, dev, rstd_dims)))
}

/// RMSNorm backward: dX from `dy`, the forward's input `x`, the frozen `weight` and the
/// forward's `rstd` (`[..., 1]`, any float dtype; f32 is what [`rms_norm_fwd`] returns).
/// With `residual` (x's shape) the result is `residual + dX`, summed in the kernel: the
/// residual stream's gradient joins the norm branch's without a separate add.
pub fn rms_norm_bwd(dy: &Tensor, x: &Tensor, weight: &Tensor, rstd: &Tensor, unit_offset: bool, residual: Option<&Tensor>) -> Result<Tensor> {
    match x.dtype() {
        DType::BF16 => rms_norm_bwd_t::<bf16>(dy, x, weight, rstd, unit_offset, residual),
        DType::F32 => rms_norm_bwd_t::<f32>(dy, x, weight, rstd, unit_offset, residual),
        dt => Err(unsupported("fused rms_norm_bwd", dt)),
    }
}

fn rms_norm_bwd_t<T: Elem>(dy: &Tensor, x: &Tensor, weight: &Tensor, rstd: &Tensor, unit_offset: bool, residual: Option<&Tensor>) -> Result<Tensor> {
    let op = "fused rms_norm_bwd";
    let d = x.dim(D::Minus1)?;
    check_operand(op, "norm weight", weight, x, &[d])?;
    check_operand(op, "dy", dy, x, x.dims())?;
    if let Some(r) = residual {
        check_operand(op, "residual", r, x, x.dims())?;
    }
    let residual = residual.map(|r| r.contiguous()).transpose()?;
    let mut rstd_dims = x.dims().to_vec();
    if let Some(last) = rstd_dims.last_mut() {
        *last = 1;
    }
    if rstd.dims() != rstd_dims.as_slice() {
        return Err(Error::Msg(format!("{op}: rstd has shape {:?}, expected {rstd_dims:?}", rstd.dims())));
    }
    let (dy, x, w) = (dy.contiguous()?, x.contiguous()?, weight.contiguous()?);
    let rstd = rstd.to_dtype(DType::F32)?.contiguous()?;
    let dev = cuda_device(x.device())?;
    let res_offset = residual.as_ref().map_or(0, |r| r.layout().start_offset());
    let vec = pick_vec::<T>(&[d, dy.layout().start_offset(), x.layout().start_offset(), w.layout().start_offset(), res_offset]);
    let (rows, d_i32, cfg) = row_launch(op, &x, vec)?;
    let mut dx = alloc_out::<T>(dev, rows * d)?;
    {
        let (dys, dyl) = dy.storage_and_layout();
        let (xs, xl) = x.storage_and_layout();
        let (ws, wl) = w.storage_and_layout();
        let (rs, rl) = rstd.storage_and_layout();
        let dyv = view::<T>(&dys, dyl, op, "dy")?;
        let xv = view::<T>(&xs, xl, op, "x")?;
        let wv = view::<T>(&ws, wl, op, "weight")?;
        let rv = view::<f32>(&rs, rl, op, "rstd")?;
        let res = residual.as_ref().map(|r| r.storage_and_layout());
        let resv = match &res {
            Some((st, l)) => Some(view::<T>(st, l, op, "residual")?),
            None => None,
        };
        let kind = if resv.is_some() { "bwd_res" } else { "bwd" };
        let func = dev.get_or_load_custom_func(&format!("fused_rms_norm_{kind}_{}_v{vec}", T::NAME), FUSED_MODULE, FUSED_PTX)?;
        let w_offset = if unit_offset { 1f32 } else { 0f32 };
        let mut b = func.builder();
        b.arg(&dyv).arg(&xv).arg(&wv).arg(&rv);
        if let Some(r) = &resv {
            b.arg(r);
        }
        b.arg(&mut dx).arg(&d_i32).arg(&w_offset);
        // SAFETY: as in rms_norm_fwd_t; dy, residual and dx hold rows * d elements, rstd
        // holds rows; the kernel named takes the residual argument exactly when one is passed.
        unsafe { b.launch(cfg) }.w()?;
    }
    Ok(into_tensor(dx, dev, x.shape().clone()))
}

// ---------------------------------------------------------------------------------------
// RoPE
// ---------------------------------------------------------------------------------------

/// Memory order of a `[batch, heads, tokens, head_dim]` activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadLayout {
    /// `[B, H, T, D]`: what attention consumes.
    Bhtd,
    /// `[B, T, H, D]`: a linear layer's `[B·T, H·D]` output, reshaped.
    Bthd,
}

impl HeadLayout {
    /// (batch, heads, tokens, head_dim) of `x`, read as laid out in `self`.
    fn sizes(self, op: &str, x: &Tensor) -> Result<(usize, usize, usize, usize)> {
        match (self, x.dims()) {
            (HeadLayout::Bhtd, &[b, h, t, d]) | (HeadLayout::Bthd, &[b, t, h, d]) => Ok((b, h, t, d)),
            (_, dims) => Err(Error::Msg(format!("{op}: input has shape {dims:?}, expected 4 dims laid out as {self:?}"))),
        }
    }

    fn dims(self, b: usize, h: usize, t: usize, d: usize) -> [usize; 4] {
        match self {
            HeadLayout::Bhtd => [b, h, t, d],
            HeadLayout::Bthd => [b, t, h, d],
        }
    }

    /// Element strides of (batch, head, token) in a contiguous tensor of this layout.
    fn strides(self, h: usize, t: usize, d: usize) -> [i64; 3] {
        let (h, t, d) = (h as i64, t as i64, d as i64);
        match self {
            HeadLayout::Bhtd => [h * t * d, t * d, d],
            HeadLayout::Bthd => [t * h * d, d, h * d],
        }
    }
}

/// Rotates `x` (laid out as `from`) by each token's position, `+θ` (forward) or `-θ`
/// (`inverse`, the backward), and writes the result laid out as `to`. `position_ids` is
/// `[B, T]` u32; the cos/sin rows come from `table`, which must be on x's device.
pub fn rope(x: &Tensor, table: &RopeTable, position_ids: &Tensor, from: HeadLayout, to: HeadLayout, inverse: bool) -> Result<Tensor> {
    match x.dtype() {
        DType::BF16 => rope_t::<bf16>(x, table, position_ids, from, to, inverse),
        DType::F32 => rope_t::<f32>(x, table, position_ids, from, to, inverse),
        dt => Err(unsupported("fused rope", dt)),
    }
}

fn rope_t<T: Elem>(x: &Tensor, table: &RopeTable, position_ids: &Tensor, from: HeadLayout, to: HeadLayout, inverse: bool) -> Result<Tensor> {
    let op = if inverse { "fused rope_bwd" } else { "fused rope_fwd" };
    let (b, h, t, d) = from.sizes(op, x)?;
    if d != table.head_dim() || position_ids.dims() != [b, t] {
        return Err(Error::Msg(format!(
            "{op}: input {:?} ({from:?}) with position_ids {:?} does not match head_dim {} and [B, T]",
            x.dims(),
            position_ids.dims(),
            table.head_dim()
        )));
    }
    if x.elem_count() == 0 {
        return Err(Error::Msg(format!("{op}: input of shape {:?} is empty", x.dims())));
    }
    for (what, tab) in [("cos", table.cos()), ("sin", table.sin())] {
        if tab.dtype() != DType::F32 || !tab.device().same_device(x.device()) {
            return Err(Error::Msg(format!(
                "{op}: the RoPE {what} table is {:?} on {:?}, the kernel needs f32 on the input's device {:?}",
                tab.dtype(),
                tab.device(),
                x.device()
            )));
        }
    }
    if !position_ids.device().same_device(x.device()) {
        return Err(Error::Msg(format!("{op}: position_ids are on {:?}, the input on {:?}", position_ids.device(), x.device())));
    }
    table.check_positions(op, position_ids)?;
    let half = d / 2;
    let (x, pos) = (x.contiguous()?, position_ids.contiguous()?);
    let (cos, sin) = (table.cos().contiguous()?, table.sin().contiguous()?);
    let dev = cuda_device(x.device())?;
    let vec = pick_vec::<T>(&[half, x.layout().start_offset(), cos.layout().start_offset(), sin.layout().start_offset()]);
    let rows = (b * h * t) as i64;
    let cfg = grid_stride_cfg(b * h * t * (half / vec));
    let [in_sb, in_sh, in_st] = from.strides(h, t, d);
    let [out_sb, out_sh, out_st] = to.strides(h, t, d);
    let (h_i32, t_i32, half_i32) = (to_i32(op, "heads", h)?, to_i32(op, "tokens", t)?, to_i32(op, "head_dim", half)?);
    let sign = if inverse { -1f32 } else { 1f32 };
    let mut y = alloc_out::<T>(dev, x.elem_count())?;
    {
        let (xs, xl) = x.storage_and_layout();
        let (ps, pl) = pos.storage_and_layout();
        let (cs, cl) = cos.storage_and_layout();
        let (ss, sl) = sin.storage_and_layout();
        let xv = view::<T>(&xs, xl, op, "x")?;
        let pv = match &*ps {
            Storage::Cuda(s) => {
                let (start, end) = pl.contiguous_offsets().ok_or_else(|| Error::Msg(format!("{op}: position_ids are not contiguous")))?;
                s.as_cuda_slice::<u32>()?.slice(start..end)
            }
            _ => return Err(Error::Msg(format!("{op}: position_ids are not on a CUDA device"))),
        };
        let cv = view::<f32>(&cs, cl, op, "cos table")?;
        let sv = view::<f32>(&ss, sl, op, "sin table")?;
        let func = dev.get_or_load_custom_func(&format!("fused_rope_{}_v{vec}", T::NAME), FUSED_MODULE, FUSED_PTX)?;
        let mut bld = func.builder();
        bld.arg(&xv).arg(&mut y).arg(&pv).arg(&cv).arg(&sv).arg(&rows).arg(&h_i32).arg(&t_i32).arg(&half_i32);
        bld.arg(&in_sb).arg(&in_sh).arg(&in_st).arg(&out_sb).arg(&out_sh).arg(&out_st).arg(&sign);
        // SAFETY: arguments match fused_rope_* in fused.cu. x and y hold b·h·t·d elements
        // and the strides of both layouts address exactly those; every position id is
        // below the table's max_len (check_positions), whose rows hold d = 2·half f32;
        // half and every start offset are multiples of vec (aligned vector accesses).
        unsafe { bld.launch(cfg) }.w()?;
    }
    Ok(into_tensor(y, dev, to.dims(b, h, t, d).to_vec()))
}

/// `x` laid out as `from` (`[B, H, T, D]` or `[B, T, H, D]`, 4 dims) copied into the other
/// layout: the head transpose around attention, at copy bandwidth.
pub fn transpose_heads(x: &Tensor, from: HeadLayout) -> Result<Tensor> {
    match x.dtype() {
        DType::BF16 => transpose_heads_t::<bf16>(x, from),
        DType::F32 => transpose_heads_t::<f32>(x, from),
        dt => Err(unsupported("fused transpose_heads", dt)),
    }
}

fn transpose_heads_t<T: Elem>(x: &Tensor, from: HeadLayout) -> Result<Tensor> {
    let op = "fused transpose_heads";
    let (b, h, t, d) = from.sizes(op, x)?;
    if x.elem_count() == 0 {
        return Err(Error::Msg(format!("{op}: input of shape {:?} is empty", x.dims())));
    }
    let to = match from {
        HeadLayout::Bhtd => HeadLayout::Bthd,
        HeadLayout::Bthd => HeadLayout::Bhtd,
    };
    let x = x.contiguous()?;
    let dev = cuda_device(x.device())?;
    let vec = pick_vec::<T>(&[d, x.layout().start_offset()]);
    let rows = (b * h * t) as i64;
    let [in_sb, in_sh, in_st] = from.strides(h, t, d);
    let [out_sb, out_sh, out_st] = to.strides(h, t, d);
    let (h_i32, t_i32, d_i32) = (to_i32(op, "heads", h)?, to_i32(op, "tokens", t)?, to_i32(op, "head_dim", d)?);
    let mut y = alloc_out::<T>(dev, x.elem_count())?;
    {
        let (xs, xl) = x.storage_and_layout();
        let xv = view::<T>(&xs, xl, op, "x")?;
        let func = dev.get_or_load_custom_func(&format!("fused_head_copy_{}_v{vec}", T::NAME), FUSED_MODULE, FUSED_PTX)?;
        let mut bld = func.builder();
        bld.arg(&xv).arg(&mut y).arg(&rows).arg(&h_i32).arg(&t_i32).arg(&d_i32);
        bld.arg(&in_sb).arg(&in_sh).arg(&in_st).arg(&out_sb).arg(&out_sh).arg(&out_st);
        // SAFETY: arguments match fused_head_copy_* in fused.cu; x and y hold b·h·t·d
        // elements, which the strides of both layouts address exactly; d and x's start
        // offset are multiples of vec.
        unsafe { bld.launch(grid_stride_cfg(b * h * t * (d / vec))) }.w()?;
    }
    Ok(into_tensor(y, dev, to.dims(b, h, t, d).to_vec()))
}

/// `a + b` (one shape and dtype) with vector accesses; the sum is formed in f32 and
/// rounded once, which for bf16 and f32 operands is candle's result bit for bit.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    match a.dtype() {
        DType::BF16 => add_t::<bf16>(a, b),
        DType::F32 => add_t::<f32>(a, b),
        dt => Err(unsupported("fused add", dt)),
    }
}

fn add_t<T: Elem>(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    elementwise2::<T>("fused add", ["a", "b"], a, b, &|vec| format!("fused_add_{}_v{vec}", T::NAME))
}

/// One output from two inputs of one shape, elementwise: the kernel named by `kernel(vec)`
/// with arguments (a, b, out, n_vec), as fused_add_* and fused_glu_fwd_* in fused.cu.
fn elementwise2<T: Elem>(op: &str, names: [&str; 2], a: &Tensor, b: &Tensor, kernel: &dyn Fn(usize) -> String) -> Result<Tensor> {
    check_operand(op, names[1], b, a, a.dims())?;
    let n = a.elem_count();
    if n == 0 {
        return Err(Error::Msg(format!("{op}: input of shape {:?} is empty", a.dims())));
    }
    let (a, b) = (a.contiguous()?, b.contiguous()?);
    let dev = cuda_device(a.device())?;
    let vec = pick_vec::<T>(&[n, a.layout().start_offset(), b.layout().start_offset()]);
    let n_vec = (n / vec) as i64;
    let mut out = alloc_out::<T>(dev, n)?;
    {
        let (as_, al) = a.storage_and_layout();
        let (bs, bl) = b.storage_and_layout();
        let av = view::<T>(&as_, al, op, names[0])?;
        let bv = view::<T>(&bs, bl, op, names[1])?;
        let func = dev.get_or_load_custom_func(&kernel(vec), FUSED_MODULE, FUSED_PTX)?;
        let mut bld = func.builder();
        bld.arg(&av).arg(&bv).arg(&mut out).arg(&n_vec);
        // SAFETY: the kernel takes (a, b, out, n_vec); all three buffers hold
        // n = n_vec · vec elements and start at offsets that are multiples of vec.
        unsafe { bld.launch(grid_stride_cfg(n / vec)) }.w()?;
    }
    Ok(into_tensor(out, dev, a.shape().clone()))
}

// ---------------------------------------------------------------------------------------
// Gated activations
// ---------------------------------------------------------------------------------------

fn act_name(act: Activation) -> &'static str {
    match act {
        Activation::Silu => "silu",
        Activation::GeluTanh => "gelu_tanh",
        Activation::Gelu => "gelu_erf",
    }
}

/// `act(gate) * up`, both of one shape and dtype.
pub fn glu_fwd(gate: &Tensor, up: &Tensor, act: Activation) -> Result<Tensor> {
    match gate.dtype() {
        DType::BF16 => glu_fwd_t::<bf16>(gate, up, act),
        DType::F32 => glu_fwd_t::<f32>(gate, up, act),
        dt => Err(unsupported("fused glu_fwd", dt)),
    }
}

fn glu_fwd_t<T: Elem>(gate: &Tensor, up: &Tensor, act: Activation) -> Result<Tensor> {
    elementwise2::<T>("fused glu_fwd", ["gate", "up"], gate, up, &|vec| format!("fused_glu_fwd_{}_{}_v{vec}", act_name(act), T::NAME))
}

/// `(dgate, dup)` of `m = act(gate) * up` from `dm`, in one pass.
pub fn glu_bwd(dm: &Tensor, gate: &Tensor, up: &Tensor, act: Activation) -> Result<(Tensor, Tensor)> {
    match gate.dtype() {
        DType::BF16 => glu_bwd_t::<bf16>(dm, gate, up, act),
        DType::F32 => glu_bwd_t::<f32>(dm, gate, up, act),
        dt => Err(unsupported("fused glu_bwd", dt)),
    }
}

/// [`glu_bwd`] writing dgate over `gate` and dup over `up`, which it takes: at 8K tokens
/// and FFN 14336 that is two 235 MB buffers fewer at the backward's memory peak. `gate` and
/// `up` must be contiguous tensors no one else holds (the block's own saved activations).
pub fn glu_bwd_in_place(dm: &Tensor, gate: Tensor, up: Tensor, act: Activation) -> Result<(Tensor, Tensor)> {
    let op = "fused glu_bwd (in place)";
    check_operand(op, "up", &up, &gate, gate.dims())?;
    check_operand(op, "dm", dm, &gate, gate.dims())?;
    if !gate.is_contiguous() || !up.is_contiguous() {
        return Err(Error::Msg(format!("{op}: gate and up must be contiguous to be overwritten")));
    }
    let n = gate.elem_count();
    if n == 0 {
        return Err(Error::Msg(format!("{op}: input of shape {:?} is empty", gate.dims())));
    }
    let dm = dm.contiguous()?;
    match gate.dtype() {
        DType::BF16 => glu_bwd_in_place_t::<bf16>(&dm, &gate, &up, act)?,
        DType::F32 => glu_bwd_in_place_t::<f32>(&dm, &gate, &up, act)?,
        dt => return Err(unsupported(op, dt)),
    }
    Ok((gate, up))
}

fn glu_bwd_in_place_t<T: Elem>(dm: &Tensor, gate: &Tensor, up: &Tensor, act: Activation) -> Result<()> {
    let n = gate.elem_count();
    let dev = cuda_device(gate.device())?;
    let vec = pick_vec::<T>(&[n, dm.layout().start_offset(), gate.layout().start_offset(), up.layout().start_offset()]);
    let func = dev.get_or_load_custom_func(&format!("fused_glu_bwd_inplace_{}_{}_v{vec}", act_name(act), T::NAME), FUSED_MODULE, FUSED_PTX)?;
    let n_vec = (n / vec) as i64;
    let (dm_ptr, g_ptr, u_ptr) = (dptr(dm)?, dptr(gate)?, dptr(up)?);
    let mut b = func.builder();
    b.arg(&dm_ptr).arg(&g_ptr).arg(&u_ptr).arg(&n_vec);
    // SAFETY: arguments match fused_glu_bwd_inplace_* in fused.cu; the three buffers hold
    // n = n_vec · vec elements of T from offsets that are multiples of vec; gate and up are
    // owned by the caller, which hands them back as the outputs.
    unsafe { b.launch(grid_stride_cfg(n / vec)) }.w()?;
    Ok(())
}

fn glu_bwd_t<T: Elem>(dm: &Tensor, gate: &Tensor, up: &Tensor, act: Activation) -> Result<(Tensor, Tensor)> {
    let op = "fused glu_bwd";
    check_operand(op, "up", up, gate, gate.dims())?;
    check_operand(op, "dm", dm, gate, gate.dims())?;
    let n = gate.elem_count();
    if n == 0 {
        return Err(Error::Msg(format!("{op}: input of shape {:?} is empty", gate.dims())));
    }
    let (dm, gate, up) = (dm.contiguous()?, gate.contiguous()?, up.contiguous()?);
    let dev = cuda_device(gate.device())?;
    let vec = pick_vec::<T>(&[n, dm.layout().start_offset(), gate.layout().start_offset(), up.layout().start_offset()]);
    let n_vec = (n / vec) as i64;
    let mut dgate = alloc_out::<T>(dev, n)?;
    let mut dup = alloc_out::<T>(dev, n)?;
    {
        let (ds, dl) = dm.storage_and_layout();
        let (gs, gl) = gate.storage_and_layout();
        let (us, ul) = up.storage_and_layout();
        let dv = view::<T>(&ds, dl, op, "dm")?;
        let gv = view::<T>(&gs, gl, op, "gate")?;
        let uv = view::<T>(&us, ul, op, "up")?;
        let name = format!("fused_glu_bwd_{}_{}_v{vec}", act_name(act), T::NAME);
        let func = dev.get_or_load_custom_func(&name, FUSED_MODULE, FUSED_PTX)?;
        let mut b = func.builder();
        b.arg(&dv).arg(&gv).arg(&uv).arg(&mut dgate).arg(&mut dup).arg(&n_vec);
        // SAFETY: as in glu_fwd_t, for the five buffers of fused_glu_bwd_*.
        unsafe { b.launch(grid_stride_cfg(n / vec)) }.w()?;
    }
    Ok((into_tensor(dgate, dev, gate.shape().clone()), into_tensor(dup, dev, gate.shape().clone())))
}

#[cfg(test)]
mod tests {
    //! These run only where a CUDA device is present; elsewhere they report that they were
    //! skipped by returning early. Each compares a kernel with the candle reference of
    //! `ops` in f32 on the same device over the same values, with NaN-poisoned outputs.
    //! (`qdistill selftest` runs the same comparisons at the model's full shapes.)
    use super::*;
    use crate::ops::activation::{glu_bwd_reference, glu_fwd_reference};
    use crate::ops::rms_norm::{rms_norm_bwd_reference, rms_norm_fwd_reference};
    use crate::ops::rope::{rope_bwd_reference, rope_fwd_reference};
    use candle_core::Device;

    /// The device, with the kernels' outputs poisoned from here on. Poisoning stays on for
    /// the whole test process: tests run in parallel, so none may turn it off under another.
    fn device() -> Option<Device> {
        let dev = Device::new_cuda(0).ok()?;
        poison_outputs(true);
        Some(dev)
    }

    /// Normal values of `shape` in `dtype`, starting `offset` elements into their buffer.
    fn randn(dev: &Device, shape: &[usize], dtype: DType, offset: usize) -> Tensor {
        let n: usize = shape.iter().product();
        let flat = Tensor::randn(0f32, 1.0, n + offset, dev).unwrap().to_dtype(dtype).unwrap();
        flat.narrow(0, offset, n).unwrap().reshape(shape).unwrap()
    }

    fn up(t: &Tensor) -> Tensor {
        t.to_dtype(DType::F32).unwrap()
    }

    /// Panics unless ‖got − want‖ / ‖want‖ <= tol with every element of `got` finite.
    fn assert_rel(got: &Tensor, want: &Tensor, dtype: DType, what: &str) {
        let tol = if dtype == DType::F32 { 1e-5 } else { 1e-2 };
        let g = up(got).flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let w = up(want).flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(g.len(), w.len(), "{what}: lengths differ");
        if let Some(i) = g.iter().position(|v| !v.is_finite()) {
            panic!("{what}: element {i} is {} (unwritten or overflowed)", g[i]);
        }
        let num: f64 = g.iter().zip(&w).map(|(a, b)| ((a - b) as f64).powi(2)).sum();
        let den: f64 = w.iter().map(|b| (*b as f64).powi(2)).sum();
        let err = (num / den).sqrt();
        assert!(err <= tol, "{what}: relative error {err:.3e} above {tol:.0e}");
    }

    #[test]
    fn rms_norm_matches_reference() {
        let Some(dev) = device() else {
            eprintln!("no CUDA device: skipped");
            return;
        };
        for (dtype, dims, unit_offset, offset) in
            [(DType::BF16, [7, 80], true, 0), (DType::BF16, [3, 7], false, 0), (DType::BF16, [5, 8200], false, 3), (DType::F32, [4, 4096], true, 1)]
        {
            let what = format!("{dtype:?} {dims:?} unit_offset={unit_offset} offset={offset}");
            let x = randn(&dev, &dims, dtype, offset);
            let w = randn(&dev, &dims[1..], dtype, 0);
            let dy = randn(&dev, &dims, dtype, 0);
            let (y, rstd) = rms_norm_fwd(&x, &w, 1e-6, unit_offset).unwrap();
            let (y_ref, saved) = rms_norm_fwd_reference(&up(&x), &up(&w), 1e-6, unit_offset).unwrap();
            assert_rel(&y, &y_ref, dtype, &format!("rms_norm y {what}"));
            assert_rel(&rstd, &saved.rstd, DType::F32, &format!("rms_norm rstd {what}"));
            let dx = rms_norm_bwd(&dy, &x, &w, &rstd, unit_offset).unwrap();
            let dx_ref = rms_norm_bwd_reference(&up(&dy), &up(&w), unit_offset, &saved).unwrap();
            assert_rel(&dx, &dx_ref, dtype, &format!("rms_norm dx {what}"));
        }
    }

    #[test]
    fn rope_matches_reference_in_both_layouts() {
        let Some(dev) = device() else {
            eprintln!("no CUDA device: skipped");
            return;
        };
        for (dtype, (b, h, t, d), offset) in [(DType::BF16, (2, 3, 7, 64), 0), (DType::BF16, (1, 2, 5, 6), 1), (DType::F32, (2, 4, 9, 80), 2)] {
            let table = RopeTable::new(d, 1e4, None, 32, &dev).unwrap();
            let pos: Vec<u32> = (0..b * t).map(|i| ((i * 7) % 32) as u32).collect();
            let pos = Tensor::from_vec(pos, (b, t), &dev).unwrap();
            let what = format!("{dtype:?} [{b}, {h}, {t}, {d}] offset={offset}");
            let x = randn(&dev, &[b, h, t, d], dtype, offset);
            let y = rope(&x, &table, &pos, HeadLayout::Bhtd, HeadLayout::Bhtd, false).unwrap();
            let y_ref = rope_fwd_reference(&up(&x), &table, &pos).unwrap();
            assert_rel(&y, &y_ref, dtype, &format!("rope fwd {what}"));
            let dx = rope(&x, &table, &pos, HeadLayout::Bhtd, HeadLayout::Bhtd, true).unwrap();
            let dx_ref = rope_bwd_reference(&up(&x), &table, &pos).unwrap();
            assert_rel(&dx, &dx_ref, dtype, &format!("rope bwd {what}"));
            // [B, T, H, D] in, [B, H, T, D] out, and back.
            let x_bthd = x.transpose(1, 2).unwrap().contiguous().unwrap();
            let y_t = rope(&x_bthd, &table, &pos, HeadLayout::Bthd, HeadLayout::Bhtd, false).unwrap();
            assert_rel(&y_t, &y_ref, dtype, &format!("rope fwd from [B, T, H, D] {what}"));
            let dx_t = rope(&x, &table, &pos, HeadLayout::Bhtd, HeadLayout::Bthd, true).unwrap();
            let dx_t_ref = dx_ref.transpose(1, 2).unwrap().contiguous().unwrap();
            assert_rel(&dx_t, &dx_t_ref, dtype, &format!("rope bwd to [B, T, H, D] {what}"));
        }
    }

    #[test]
    fn glu_matches_reference() {
        let Some(dev) = device() else {
            eprintln!("no CUDA device: skipped");
            return;
        };
        for act in [Activation::Silu, Activation::GeluTanh, Activation::Gelu] {
            for (dtype, dims, offset) in [(DType::BF16, [7, 80], 0), (DType::BF16, [5, 77], 3), (DType::F32, [3, 1000], 1)] {
                let what = format!("{act:?} {dtype:?} {dims:?} offset={offset}");
                let gate = (randn(&dev, &dims, dtype, offset) * 3.0).unwrap();
                let u = randn(&dev, &dims, dtype, 0);
                let dm = randn(&dev, &dims, dtype, offset);
                let m = glu_fwd(&gate, &u, act).unwrap();
                let m_ref = glu_fwd_reference(&up(&gate), &up(&u), act).unwrap();
                assert_rel(&m, &m_ref, dtype, &format!("glu m {what}"));
                let (dg, du) = glu_bwd(&dm, &gate, &u, act).unwrap();
                let (dg_ref, du_ref) = glu_bwd_reference(&up(&dm), &up(&gate), &up(&u), act).unwrap();
                assert_rel(&dg, &dg_ref, dtype, &format!("glu dgate {what}"));
                assert_rel(&du, &du_ref, dtype, &format!("glu dup {what}"));
            }
        }
    }
}
