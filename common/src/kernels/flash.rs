//! Causal flash attention on the GPU (common/kernels/flash_attn.cu, the FlashAttention-2
//! algorithm): the forward keeps only the row logsumexp, the backward recomputes the
//! probabilities tile by tile, so neither materialises the `T × T` scores.
//!
//! Same contract as [`crate::ops::attention`]'s reference path: q `[B, Hq, T, D]`, k, v
//! `[B, Hkv, T, D]`, query head `h` reads kv head `h / (Hq / Hkv)`, optional sliding window,
//! Gemma 2 soft-capping and packed-segment ids `[B, T]` (u32 or i64). Inputs are bf16 or
//! f16 with `D` in [`FLASH_HEAD_DIMS`]; the kernels accumulate in f32. The logsumexp is f32.

use candle_core::cuda_backend::cudarc::driver::{
    result, sys, CudaSlice, CudaView, DevicePtrMut, DeviceRepr, LaunchArgs, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, CudaStorage, DType, Layout, Storage, Tensor};

use super::{bf16, cuda_device};
use crate::ops::attention::{check, AttnConfig};
use crate::{Error, Result};

const FLASH_PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/flash_attn.ptx"));
/// Name under which candle caches the loaded module (one load per device).
const FLASH_MODULE: &str = "qdistill_flash_attn";

/// Head dims the kernels are instantiated for.
pub const FLASH_HEAD_DIMS: [usize; 2] = [64, 128];

// Tile shapes; they must match the constants and instantiations (FLASH_ALL) in flash_attn.cu.
const PAD: usize = 8;
const FWD_WARPS: usize = 4;
/// Query rows per forward CTA (one 16-row m-tile per warp).
const FWD_ROWS: usize = 16 * FWD_WARPS;
const FWD_KEYS: usize = 64;
/// Queries per backward tile.
const BWD_ROWS: usize = 64;
const SEG_BLOCK: usize = 64;

/// Warps of a backward CTA, 16 keys each.
fn bwd_warps(d: usize) -> usize {
    if d == 128 {
        8
    } else {
        4
    }
}

/// How the kernels' output buffers start out. [`OutputInit::Nan`] fills them with NaN
/// first, so that an element a kernel fails to write shows up in a check.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutputInit {
    #[default]
    Uninit,
    Nan,
}

/// Whether the kernels take these inputs: a CUDA tensor in bf16 or f16 with a head dim in
/// [`FLASH_HEAD_DIMS`].
pub fn flash_supported(q: &Tensor, cfg: &AttnConfig) -> bool {
    q.device().is_cuda() && matches!(q.dtype(), DType::BF16 | DType::F16) && FLASH_HEAD_DIMS.contains(&cfg.head_dim)
}

/// Q, and two stages of K and V.
fn fwd_smem_bytes(d: usize) -> usize {
    (FWD_ROWS + 4 * FWD_KEYS) * (d + PAD) * 2
}

/// K, V, two stages of Q and dO, dSᵀ, two stages of lse and delta.
fn bwd_smem_bytes(d: usize) -> usize {
    let keys = 16 * bwd_warps(d);
    (2 * keys + 4 * BWD_ROWS) * (d + PAD) * 2 + keys * (BWD_ROWS + PAD) * 2 + 4 * BWD_ROWS * 4
}

/// The kernel element types (bf16, f16) and their name suffix in flash_attn.cu.
trait FlashElem: CudaDType + DeviceRepr {
    const SUFFIX: &'static str;
}
impl FlashElem for bf16 {
    const SUFFIX: &'static str = "bf16";
}
impl FlashElem for half::f16 {
    const SUFFIX: &'static str = "f16";
}

struct Launch<'a> {
    dev: &'a CudaDevice,
    b: usize,
    hq: usize,
    hkv: usize,
    t: usize,
    d: usize,
    window: i32,
    scale: f32,
    softcap: f32,
}

/// The arguments the forward and backward kernels both end with: the segment ids and
/// ranges (without segments the kernel never reads them, and `dummy`, any device pointer,
/// stands in), the integer shape arguments, scale and softcap.
fn push_tail<'a, T: DeviceRepr>(
    b: &mut LaunchArgs<'a>,
    seg: Option<(&'a CudaView<'a, u32>, &'a Segments)>,
    dummy: &'a CudaView<'a, T>,
    ints: &'a [i32; 6],
    l: &'a Launch,
) {
    match seg {
        Some((ids, s)) => {
            b.arg(ids);
            b.arg(&s.ranges);
        }
        None => {
            b.arg(dummy);
            b.arg(dummy);
        }
    }
    for x in ints {
        b.arg(x);
    }
    b.arg(&l.scale);
    b.arg(&l.softcap);
}

impl Launch<'_> {
    /// (has segments, Hq, Hkv, T, window, segment blocks), as the kernels take them.
    fn ints(&self, seg: Option<&Segments>) -> Result<[i32; 6]> {
        Ok([
            seg.is_some() as i32,
            self.i32("Hq", self.hq)?,
            self.i32("Hkv", self.hkv)?,
            self.i32("T", self.t)?,
            self.window,
            seg.map_or(0, |s| s.blocks as i32),
        ])
    }

    fn kernel_name(&self, stem: &str, suffix: &str) -> String {
        let cap = if self.softcap > 0.0 { "_softcap" } else { "" };
        format!("{stem}_d{}_{suffix}{cap}", self.d)
    }

    fn i32(&self, what: &str, v: usize) -> Result<i32> {
        i32::try_from(v).map_err(|_| Error::Msg(format!("flash attention: {what} = {v} does not fit the kernel's 32-bit index")))
    }
}

/// The device memory of a contiguous CUDA tensor of element type `T`.
fn view<'a, T: CudaDType>(storage: &'a Storage, layout: &Layout, name: &str) -> Result<CudaView<'a, T>> {
    let Storage::Cuda(s) = storage else {
        return Err(Error::Msg(format!("flash attention: {name} is not on a CUDA device")));
    };
    if !layout.is_contiguous() {
        return Err(Error::Msg(format!("flash attention: {name} is not contiguous")));
    }
    let start = layout.start_offset();
    Ok(s.as_cuda_slice::<T>()?.slice(start..start + layout.shape().elem_count()))
}

/// A new device buffer of `n` elements, NaN-filled for [`OutputInit::Nan`].
fn alloc_out<T: DeviceRepr>(dev: &CudaDevice, n: usize, init: OutputInit) -> Result<CudaSlice<T>> {
    // SAFETY: the kernels write every element before it is read (and OutputInit::Nan checks it).
    let mut s = unsafe { dev.alloc::<T>(n)? };
    if init == OutputInit::Nan && n > 0 {
        let stream = dev.cuda_stream();
        let bytes = s.num_bytes();
        let (ptr, _sync) = s.device_ptr_mut(&stream);
        // SAFETY: `ptr` addresses the `bytes` bytes of `s`, filled on the stream that uses them
        // next. 0xff bytes are NaN in f32, bf16 and f16.
        unsafe { result::memset_d8_async(ptr, 0xff, bytes, stream.cu_stream()) }.w()?;
    }
    Ok(s)
}

fn wrap<T: CudaDType>(s: CudaSlice<T>, dev: &CudaDevice, shape: &[usize]) -> Tensor {
    Tensor::from_storage(Storage::Cuda(CudaStorage::wrap_cuda_slice(s, dev.clone())), shape, BackpropOp::none(), false)
}

/// Segment ids as contiguous u32 on the device, and the (min, max) id of each 64 positions
/// of each row, which lets the kernels skip tiles that two segments never share.
struct Segments {
    ids: Tensor,
    ranges: CudaSlice<u32>,
    blocks: usize,
}

fn segments(l: &Launch, seg: Option<&Tensor>, device: &candle_core::Device) -> Result<Option<Segments>> {
    let Some(seg) = seg else { return Ok(None) };
    let ids = seg.to_device(device)?.to_dtype(DType::U32)?.contiguous()?;
    let blocks = l.t.div_ceil(SEG_BLOCK);
    // SAFETY: flash_seg_ranges writes all 2 * b * blocks entries.
    let mut ranges = unsafe { l.dev.alloc::<u32>(2 * l.b * blocks)? };
    let func = l.dev.get_or_load_custom_func("flash_seg_ranges", FLASH_MODULE, FLASH_PTX)?;
    let n = l.b * blocks;
    let cfg = LaunchConfig { grid_dim: (n.div_ceil(256) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let (batch, t, nblk) = (l.i32("batch", l.b)?, l.i32("T", l.t)?, l.i32("segment blocks", blocks)?);
    {
        let (st, lay) = ids.storage_and_layout();
        let ids_v = view::<u32>(&st, lay, "segment_ids")?;
        let mut b = func.builder();
        b.arg(&ids_v);
        b.arg(&mut ranges);
        b.arg(&batch);
        b.arg(&t);
        b.arg(&nblk);
        // SAFETY: argument order and types match flash_seg_ranges; ids holds b * t u32.
        unsafe { b.launch(cfg) }.w()?;
    }
    Ok(Some(Segments { ids, ranges, blocks }))
}

fn launch_of<'a>(q: &Tensor, cfg: &AttnConfig, dev: &'a CudaDevice) -> Result<Launch<'a>> {
    let (b, hq, t, d) = q.dims4()?;
    let window = match cfg.sliding_window {
        // A window as long as the sequence masks nothing beyond causality.
        Some(w) if w < t => i32::try_from(w).map_err(|_| Error::Msg(format!("flash attention: window {w} too large")))?,
        _ => 0,
    };
    let softcap = cfg.softcap.map_or(0.0, |c| c as f32);
    if t.div_ceil(FWD_ROWS) > 65535 {
        return Err(Error::Msg(format!("flash attention: T = {t} is too long for the kernel's grid (at most {})", 65535 * FWD_ROWS)));
    }
    Ok(Launch { dev, b, hq, hkv: cfg.n_kv_heads, t, d, window, scale: cfg.scale as f32, softcap })
}

/// Forward: returns the output `[B, Hq, T, D]` (input dtype) and the row logsumexp of the
/// masked, scaled (soft-capped) scores, f32 `[B, Hq, T]`.
pub fn flash_attn_fwd(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cfg: &AttnConfig,
    segment_ids: Option<&Tensor>,
    init: OutputInit,
) -> Result<(Tensor, Tensor)> {
    check("flash_attn_fwd", q, k, v, cfg, segment_ids)?;
    require_supported("flash_attn_fwd", q, k, v, cfg)?;
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    match q.dtype() {
        DType::BF16 => fwd_typed::<bf16>(&q, &k, &v, cfg, segment_ids, init),
        _ => fwd_typed::<half::f16>(&q, &k, &v, cfg, segment_ids, init),
    }
}

fn require_supported(op: &str, q: &Tensor, k: &Tensor, v: &Tensor, cfg: &AttnConfig) -> Result<()> {
    if !flash_supported(q, cfg) {
        return Err(Error::Msg(format!(
            "{op}: the kernel takes bf16/f16 CUDA tensors with head_dim in {FLASH_HEAD_DIMS:?}, got {:?} on {:?} with head_dim {}",
            q.dtype(),
            q.device(),
            cfg.head_dim
        )));
    }
    for (name, x) in [("k", k), ("v", v)] {
        if x.dtype() != q.dtype() || !x.device().same_device(q.device()) {
            return Err(Error::Msg(format!(
                "{op}: {name} is {:?} on {:?}, q is {:?} on {:?}",
                x.dtype(),
                x.device(),
                q.dtype(),
                q.device()
            )));
        }
    }
    Ok(())
}

fn fwd_typed<T: FlashElem>(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cfg: &AttnConfig,
    segment_ids: Option<&Tensor>,
    init: OutputInit,
) -> Result<(Tensor, Tensor)> {
    let dev = cuda_device(q.device())?;
    let l = launch_of(q, cfg, dev)?;
    let n_out = l.b * l.hq * l.t * l.d;
    let mut out = alloc_out::<T>(dev, n_out, init)?;
    let mut lse = alloc_out::<f32>(dev, l.b * l.hq * l.t, init)?;
    if n_out > 0 {
        let seg = segments(&l, segment_ids, q.device())?;
        let name = l.kernel_name("flash_fwd", T::SUFFIX);
        let func = dev.get_or_load_custom_func(&name, FLASH_MODULE, FLASH_PTX)?;
        let smem = fwd_smem_bytes(l.d);
        func.set_attribute(sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32).w()?;
        let cfg = LaunchConfig {
            grid_dim: (l.i32("B * Hq", l.b * l.hq)? as u32, l.t.div_ceil(FWD_ROWS) as u32, 1),
            block_dim: (32 * FWD_WARPS as u32, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let (qs, ql) = q.storage_and_layout();
        let (ks, kl) = k.storage_and_layout();
        let (vs, vl) = v.storage_and_layout();
        let (qv, kv, vv) = (view::<T>(&qs, ql, "q")?, view::<T>(&ks, kl, "k")?, view::<T>(&vs, vl, "v")?);
        let seg_guard = seg.as_ref().map(|s| s.ids.storage_and_layout());
        let seg_view = match &seg_guard {
            Some((st, lay)) => Some(view::<u32>(st, lay, "segment_ids")?),
            None => None,
        };
        let ints = l.ints(seg.as_ref())?;
        let mut b = func.builder();
        b.arg(&qv);
        b.arg(&kv);
        b.arg(&vv);
        b.arg(&mut out);
        b.arg(&mut lse);
        push_tail(&mut b, seg_view.as_ref().zip(seg.as_ref()), &qv, &ints, &l);
        // SAFETY: argument order and types match the kernel in flash_attn.cu; q, k, v are
        // contiguous [B, H, T, D] of T (checked by `check` and `view`), out holds B*Hq*T*D
        // and lse B*Hq*T elements; segment ids hold B*T u32 and ranges 2*B*blocks.
        unsafe { b.launch(cfg) }.w()?;
    }
    Ok((wrap(out, dev, &[l.b, l.hq, l.t, l.d]), wrap(lse, dev, &[l.b, l.hq, l.t])))
}

/// Backward from the forward's output and logsumexp: returns `(dq, dk, dv)` in the input
/// dtype, dk and dv `[B, Hkv, T, D]` summed over each query group.
#[allow(clippy::too_many_arguments)]
pub fn flash_attn_bwd(
    dout: &Tensor,
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    out: &Tensor,
    lse: &Tensor,
    cfg: &AttnConfig,
    segment_ids: Option<&Tensor>,
    init: OutputInit,
) -> Result<(Tensor, Tensor, Tensor)> {
    let dims = check("flash_attn_bwd", q, k, v, cfg, segment_ids)?;
    require_supported("flash_attn_bwd", q, k, v, cfg)?;
    for (name, x) in [("dout", dout), ("out", out)] {
        if x.dims() != q.dims() || x.dtype() != q.dtype() {
            return Err(Error::Msg(format!(
                "flash_attn_bwd: {name} is {:?} {:?}, expected {:?} {:?}",
                x.dims(),
                x.dtype(),
                q.dims(),
                q.dtype()
            )));
        }
    }
    if lse.dims() != [dims.b, cfg.n_heads, dims.t] {
        return Err(Error::Msg(format!(
            "flash_attn_bwd: lse has shape {:?}, expected {:?}",
            lse.dims(),
            [dims.b, cfg.n_heads, dims.t]
        )));
    }
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let (dout, out) = (dout.contiguous()?, out.contiguous()?);
    let lse = lse.to_dtype(DType::F32)?.contiguous()?;
    let t = [&dout, &q, &k, &v, &out];
    match q.dtype() {
        DType::BF16 => bwd_typed::<bf16>(t, &lse, cfg, segment_ids, init),
        _ => bwd_typed::<half::f16>(t, &lse, cfg, segment_ids, init),
    }
}

fn bwd_typed<T: FlashElem>(
    [dout, q, k, v, out]: [&Tensor; 5],
    lse: &Tensor,
    cfg: &AttnConfig,
    segment_ids: Option<&Tensor>,
    init: OutputInit,
) -> Result<(Tensor, Tensor, Tensor)> {
    let dev = cuda_device(q.device())?;
    let l = launch_of(q, cfg, dev)?;
    let n_q = l.b * l.hq * l.t * l.d;
    let n_kv = l.b * l.hkv * l.t * l.d;
    let mut dq = alloc_out::<T>(dev, n_q, init)?;
    let mut dk = alloc_out::<T>(dev, n_kv, init)?;
    let mut dv = alloc_out::<T>(dev, n_kv, init)?;
    if n_q > 0 {
        let seg = segments(&l, segment_ids, q.device())?;
        let rows = l.b * l.hq * l.t;
        // Intermediates are written by flash_bwd_pre before anything reads them; NaN-filled
        // under OutputInit::Nan so that a row it skips poisons dq.
        let mut delta = alloc_out::<f32>(dev, rows, init)?;
        let mut dq_acc = alloc_out::<f32>(dev, n_q, init)?;
        let (qs, ql) = q.storage_and_layout();
        let (ks, kl) = k.storage_and_layout();
        let (vs, vl) = v.storage_and_layout();
        let (ds, dl) = dout.storage_and_layout();
        let (os, ol) = out.storage_and_layout();
        let (ls, ll) = lse.storage_and_layout();
        let qv = view::<T>(&qs, ql, "q")?;
        let kv = view::<T>(&ks, kl, "k")?;
        let vv = view::<T>(&vs, vl, "v")?;
        let dov = view::<T>(&ds, dl, "dout")?;
        let ov = view::<T>(&os, ol, "out")?;
        let lv = view::<f32>(&ls, ll, "lse")?;

        // delta = rowsum(dO ∘ O); dq_acc = 0.
        let func = dev.get_or_load_custom_func(&format!("flash_bwd_pre_d{}_{}", l.d, T::SUFFIX), FLASH_MODULE, FLASH_PTX)?;
        let cfg_pre = LaunchConfig { grid_dim: (rows.div_ceil(8) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let rows_i64 = rows as i64;
        let mut b = func.builder();
        b.arg(&ov);
        b.arg(&dov);
        b.arg(&mut delta);
        b.arg(&mut dq_acc);
        b.arg(&rows_i64);
        // SAFETY: matches flash_bwd_pre_*; out and dout hold rows * D elements, delta rows
        // and dq_acc rows * D.
        unsafe { b.launch(cfg_pre) }.w()?;

        let name = l.kernel_name("flash_bwd", T::SUFFIX);
        let func = dev.get_or_load_custom_func(&name, FLASH_MODULE, FLASH_PTX)?;
        let smem = bwd_smem_bytes(l.d);
        func.set_attribute(sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem as i32).w()?;
        let warps = bwd_warps(l.d);
        let cfg_main = LaunchConfig {
            grid_dim: (l.i32("B * Hkv", l.b * l.hkv)? as u32, l.t.div_ceil(16 * warps) as u32, 1),
            block_dim: (32 * warps as u32, 1, 1),
            shared_mem_bytes: smem as u32,
        };
        let seg_guard = seg.as_ref().map(|s| s.ids.storage_and_layout());
        let seg_view = match &seg_guard {
            Some((st, lay)) => Some(view::<u32>(st, lay, "segment_ids")?),
            None => None,
        };
        let ints = l.ints(seg.as_ref())?;
        let mut b = func.builder();
        b.arg(&qv);
        b.arg(&kv);
        b.arg(&vv);
        b.arg(&dov);
        b.arg(&lv);
        b.arg(&delta);
        b.arg(&mut dq_acc);
        b.arg(&mut dk);
        b.arg(&mut dv);
        push_tail(&mut b, seg_view.as_ref().zip(seg.as_ref()), &qv, &ints, &l);
        // SAFETY: matches flash_bwd_*; shapes as checked above, dq_acc holds B*Hq*T*D f32,
        // dk and dv B*Hkv*T*D elements.
        unsafe { b.launch(cfg_main) }.w()?;

        let func =
            dev.get_or_load_custom_func(&format!("flash_bwd_dq_convert_{}", T::SUFFIX), FLASH_MODULE, FLASH_PTX)?;
        let blocks = (n_q / 4).div_ceil(256).min(65536) as u32;
        let cfg_conv = LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
        let n_i64 = n_q as i64;
        let mut b = func.builder();
        b.arg(&dq_acc);
        b.arg(&mut dq);
        b.arg(&n_i64);
        b.arg(&l.scale);
        // SAFETY: matches flash_bwd_dq_convert_*; both buffers hold n_q elements, n_q % 4 == 0.
        unsafe { b.launch(cfg_conv) }.w()?;
    }
    Ok((
        wrap(dq, dev, &[l.b, l.hq, l.t, l.d]),
        wrap(dk, dev, &[l.b, l.hkv, l.t, l.d]),
        wrap(dv, dev, &[l.b, l.hkv, l.t, l.d]),
    ))
}
