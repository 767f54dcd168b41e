//! Activation checkpoints kept in pinned host memory instead of on the GPU.
//!
//! With gradient checkpointing the backward needs only each block's input; at Llama-3-8B
//! and 4×2048 tokens those are 32 × 64 MiB = 2 GiB of device memory for the whole forward
//! and backward. Here each input is copied out to page-locked host memory on a second
//! stream while the next block computes, and copied back one block ahead of the backward
//! that recomputes it, so at most two inputs are on the device at any time and the copies
//! (25+ GB/s each way over PCIe 5, ≈3 ms per input) hide behind ≈13 ms of block compute.
//!
//! Ordering is explicit (events between candle's stream and the copy stream), so it holds
//! whether or not cudarc's per-allocation event tracking is on:
//! - copy out: the copy stream waits for the input to be written; the device tensor is kept
//!   until candle's stream has waited for the copy, and only then dropped (freed in the
//!   order of candle's stream, after everything that read it);
//! - copy in: the buffer is allocated on candle's stream, the copy stream waits for that,
//!   and candle's stream waits for the copy before the block reads it.

use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{result, CudaContext, CudaEvent, CudaStream};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaDevice, DType, Tensor};

use super::gemm::{dptr, uninit};
use crate::{Error, Result};

fn msg(s: String) -> Error {
    Error::Msg(format!("activation offloading: {s}"))
}

/// One page-locked host allocation.
struct Pinned {
    ptr: *mut u8,
    bytes: usize,
    ctx: Arc<CudaContext>,
}

// SAFETY: the allocation is plain host memory owned by this value; the raw pointer is only
// handed to the driver's copy calls, which `HostOffload` orders with events.
unsafe impl Send for Pinned {}

impl Pinned {
    fn new(ctx: &Arc<CudaContext>, bytes: usize) -> Result<Self> {
        ctx.bind_to_thread().w()?;
        // SAFETY: a plain pinned allocation of `bytes` (flags 0: not write-combined, since
        // the device writes it and reads it back).
        let ptr = unsafe { result::malloc_host(bytes.max(1), 0) }
            .map_err(|e| msg(format!("pinning {bytes} bytes of host memory: {e}")))?;
        Ok(Self { ptr: ptr as *mut u8, bytes, ctx: ctx.clone() })
    }

    fn slice(&self, bytes: usize) -> &mut [u8] {
        debug_assert!(bytes <= self.bytes);
        // SAFETY: `bytes` ≤ the allocation; the driver is the only other user, ordered by
        // the copy stream (see `HostOffload`).
        unsafe { std::slice::from_raw_parts_mut(self.ptr, bytes) }
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: allocated by malloc_host; `HostOffload::drop` synchronised the copy stream,
        // so no copy still reads or writes it.
        let _ = unsafe { result::free_host(self.ptr as *mut _) };
    }
}

#[derive(Default)]
struct Slot {
    host: Option<Pinned>,
    shape: Vec<usize>,
    dtype: Option<DType>,
    /// The device tensor while its copy out may be in flight, with the copy's event.
    on_device: Option<(Tensor, CudaEvent)>,
    /// The tensor copied back in, with the event of that copy.
    fetched: Option<(Tensor, CudaEvent)>,
}

/// Per-block host slots (reused from step to step: pinning is slow) and the copy stream.
pub struct HostOffload {
    dev: CudaDevice,
    copy: Arc<CudaStream>,
    slots: Vec<Slot>,
    /// Staging for embedding rows gathered on the host, and the event of its last copy.
    rows: Option<(Pinned, CudaEvent)>,
}

impl HostOffload {
    pub fn new(dev: &CudaDevice) -> Result<Self> {
        let copy = dev.cuda_stream().fork().map_err(|e| msg(format!("creating the copy stream: {e}")))?;
        Ok(Self { dev: dev.clone(), copy, slots: Vec::new(), rows: None })
    }

    /// Host bytes pinned so far (the size of every block input together).
    pub fn host_bytes(&self) -> usize {
        self.slots.iter().filter_map(|s| s.host.as_ref()).map(|h| h.bytes).sum()
    }

    fn compute(&self) -> Arc<CudaStream> {
        self.dev.cuda_stream()
    }

    /// Starts copying block `li`'s input out and releases the device copies of earlier
    /// blocks whose copies are done (candle's stream waits for them first).
    pub fn store(&mut self, li: usize, x: &Tensor) -> Result<()> {
        if !x.is_contiguous() {
            return Err(msg(format!("block {li}'s input {:?} is not contiguous", x.dims())));
        }
        self.release_except(Some(li))?;
        if self.slots.len() <= li {
            self.slots.resize_with(li + 1, Slot::default);
        }
        let bytes = x.elem_count() * x.dtype().size_in_bytes();
        let ctx = self.copy.context().clone();
        let slot = &mut self.slots[li];
        if slot.host.as_ref().is_none_or(|h| h.bytes < bytes) {
            slot.host = None;
            slot.host = Some(Pinned::new(&ctx, bytes)?);
        }
        slot.shape = x.dims().to_vec();
        slot.dtype = Some(x.dtype());
        slot.fetched = None;
        let written = self.dev.cuda_stream().record_event(None).w()?;
        self.copy.wait(&written).w()?;
        let host = slot.host.as_ref().expect("allocated above").slice(bytes);
        // SAFETY: `x` holds `bytes` contiguous bytes at dptr(x) and stays alive (kept in the
        // slot) until candle's stream has waited for `copied`; the host slice is ours.
        unsafe { result::memcpy_dtoh_async(host, dptr(x)?, self.copy.cu_stream()) }
            .map_err(|e| msg(format!("copying block {li}'s input to the host: {e}")))?;
        let copied = self.copy.record_event(None).w()?;
        slot.on_device = Some((x.clone(), copied));
        Ok(())
    }

    /// After the forward: frees the device copies of every input but the last block's
    /// (whose backward comes first).
    pub fn end_forward(&mut self) -> Result<()> {
        let last = self.slots.iter().rposition(|s| s.on_device.is_some());
        self.release_except(last)
    }

    fn release_except(&mut self, keep: Option<usize>) -> Result<()> {
        let compute = self.compute();
        for (i, slot) in self.slots.iter_mut().enumerate() {
            if Some(i) == keep {
                continue;
            }
            if let Some((t, copied)) = slot.on_device.take() {
                compute.wait(&copied).w()?;
                drop(t);
            }
        }
        Ok(())
    }

    /// Block `li`'s input on the device, ordered for candle's stream; starts bringing in
    /// block `li - 1`'s.
    pub fn load(&mut self, li: usize) -> Result<Tensor> {
        let compute = self.compute();
        let slot = self.slots.get_mut(li).ok_or_else(|| msg(format!("no input stored for block {li}")))?;
        let t = if let Some((t, copied)) = slot.on_device.take() {
            // Never left the device; its copy out only has to finish before the slot is reused.
            compute.wait(&copied).w()?;
            t
        } else {
            if slot.fetched.is_none() {
                self.prefetch(li)?;
            }
            let (t, ready) = self.slots[li].fetched.take().ok_or_else(|| msg(format!("block {li}'s input was not fetched")))?;
            compute.wait(&ready).w()?;
            t
        };
        if li > 0 {
            self.prefetch(li - 1)?;
        }
        Ok(t)
    }

    fn prefetch(&mut self, li: usize) -> Result<()> {
        let slot = &mut self.slots[li];
        if slot.fetched.is_some() || slot.on_device.is_some() {
            return Ok(());
        }
        let (Some(host), Some(dtype)) = (slot.host.as_ref(), slot.dtype) else {
            return Err(msg(format!("no input stored for block {li}")));
        };
        let t = uninit(&self.dev, dtype, &slot.shape)?;
        let bytes = t.elem_count() * dtype.size_in_bytes();
        let allocated = self.dev.cuda_stream().record_event(None).w()?;
        self.copy.wait(&allocated).w()?;
        // SAFETY: `t` is a fresh contiguous buffer of `bytes` bytes, allocated in candle's
        // stream order before `allocated`; the host slot holds that many bytes written by
        // the copy out, earlier on this same copy stream.
        unsafe { result::memcpy_htod_async(dptr(&t)?, &*host.slice(bytes), self.copy.cu_stream()) }
            .map_err(|e| msg(format!("copying block {li}'s input back to the device: {e}")))?;
        let ready = self.copy.record_event(None).w()?;
        slot.fetched = Some((t, ready));
        Ok(())
    }
}

impl HostOffload {
    /// `table[ids]` on the device for a table `[V, d]` in host memory: host threads copy
    /// the rows into pinned staging, one asynchronous copy moves them (64 MiB at 8K tokens
    /// and d = 4096: a few ms, where a gather by candle on the host and a pageable copy
    /// took ≈45).
    pub fn gather_rows(&mut self, table: &Tensor, ids: &[u32]) -> Result<Tensor> {
        let (v, d) = table.dims2()?;
        let dtype = table.dtype();
        let row = d * dtype.size_in_bytes();
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= v) {
            return Err(msg(format!("token id {bad} is outside the {v}-row embedding")));
        }
        let table = table.contiguous()?;
        let (storage, layout) = table.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            return Err(msg("the host embedding table is not in host memory".into()));
        };
        let bytes: &[u8] = match cpu {
            candle_core::CpuStorage::BF16(x) => bytes_of(x),
            candle_core::CpuStorage::F16(x) => bytes_of(x),
            candle_core::CpuStorage::F32(x) => bytes_of(x),
            _ => return Err(msg(format!("no host gather for a {dtype:?} embedding"))),
        };
        let bytes = &bytes[layout.start_offset() * dtype.size_in_bytes()..][..v * row];
        let need = ids.len() * row;
        // The staging buffer is reused: the previous copy out of it must be over.
        if let Some((_, done)) = &self.rows {
            done.synchronize().w()?;
        }
        if self.rows.as_ref().is_none_or(|(p, _)| p.bytes < need) {
            let ctx = self.copy.context().clone();
            self.rows = None;
            let event = self.dev.cuda_stream().record_event(None).w()?;
            self.rows = Some((Pinned::new(&ctx, need)?, event));
        }
        let (staging, _) = self.rows.as_ref().expect("allocated above");
        let out = staging.slice(need);
        let threads = std::thread::available_parallelism().map_or(4, |n| n.get()).clamp(1, 16);
        let per = ids.len().div_ceil(threads).max(1);
        std::thread::scope(|scope| {
            for (ids, out) in ids.chunks(per).zip(out.chunks_mut(per * row)) {
                scope.spawn(move || {
                    for (&id, dst) in ids.iter().zip(out.chunks_exact_mut(row)) {
                        let at = id as usize * row;
                        dst.copy_from_slice(&bytes[at..at + row]);
                    }
                });
            }
        });
        let t = uninit(&self.dev, dtype, &[ids.len(), d])?;
        let stream = self.dev.cuda_stream();
        // SAFETY: `t` holds `need` bytes, allocated on candle's stream, which runs the copy;
        // the staging is not written again before `copied` completes (waited above).
        unsafe { result::memcpy_htod_async(dptr(&t)?, &*out, stream.cu_stream()) }
            .map_err(|e| msg(format!("copying embedding rows to the device: {e}")))?;
        let copied = stream.record_event(None).w()?;
        if let Some((_, done)) = self.rows.as_mut() {
            *done = copied;
        }
        Ok(t)
    }
}

fn bytes_of<T>(x: &[T]) -> &[u8] {
    // SAFETY: plain numeric elements (bf16, f16, f32) without padding, read as bytes.
    unsafe { std::slice::from_raw_parts(x.as_ptr() as *const u8, std::mem::size_of_val(x)) }
}

impl Drop for HostOffload {
    fn drop(&mut self) {
        // Copies still in flight read or write the pinned slots freed below.
        let _ = self.copy.synchronize();
    }
}
