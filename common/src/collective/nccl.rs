//! The NCCL implementation of [`Collective`], for ranks that each drive one CUDA device.
//!
//! Bulk data stays on the GPUs: [`NcclCollective::all_reduce_device`] sums a device
//! buffer in place (the students' flat fp32 gradient buffer) and
//! [`NcclCollective::send_tensor`] / [`NcclCollective::recv_tensor`] move teacher outputs
//! device to device. The byte-message methods of the trait go through small staging
//! buffers, so the same conformance suite as the CPU transports runs over NCCL too — on
//! two ranks: NCCL's point-to-point is a rendezvous (a send completes once the peer posts
//! its receive), so patterns where every rank sends to several peers before it receives,
//! which the buffered CPU transports allow, deadlock beyond two ranks. The training path
//! sends only teacher → student tensors that the student is waiting for, and keeps its
//! control messages on the TCP mesh.
//!
//! Streams: NCCL work runs on a stream of its own. A send waits only for the compute
//! stream's work queued before it and holds its tensor until NCCL has read it, so a teacher
//! keeps computing the next microbatch while the previous one is on the wire; a receive or
//! an all-reduce makes the compute stream wait for its result.
//!
//! NCCL reduces in its own order (ring or tree, chosen by topology), so sums are identical
//! on every rank of one communicator but differ in the last bits from a single-process sum;
//! [`super::ordered_all_reduce`] over `send`/`recv` still gives the fixed order when that
//! matters more than speed.

use std::ffi::c_void;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::cuda_backend::cudarc::driver::{CudaEvent, CudaSlice, CudaStream, DevicePtr, DevicePtrMut};
use candle_core::cuda_backend::cudarc::nccl::{result as nccl, sys, NcclType};
use candle_core::cuda_backend::{CudaDType, CudaStorage};
use candle_core::op::BackpropOp;
use candle_core::{CudaDevice, DType, Device, Storage, Tensor};

use super::{err, Collective};
use crate::{Error, Result};

/// Bytes of an `ncclUniqueId`.
pub const UNIQUE_ID_BYTES: usize = 128;

/// Makes the id a group's root hands to the other members (over the coordinator). The
/// root's process hosts NCCL's bootstrap until everyone joined.
pub fn new_unique_id() -> Result<Vec<u8>> {
    let id = nccl::get_uniqueid().map_err(|e| err(format!("ncclGetUniqueId: {e:?}")))?;
    Ok(id.internal.iter().map(|&c| c as u8).collect())
}

/// The raw communicator, shared with [`NcclAbortHandle`]: NCCL's way out of a hung
/// operation (a peer died) is ncclCommAbort from another thread.
struct CommHandle {
    comm: sys::ncclComm_t,
    aborted: AtomicBool,
}

// SAFETY: NCCL allows a communicator to be used from any thread as long as operations on
// it are not issued concurrently (NcclCollective's mutex serialises them) and allows
// ncclCommAbort from another thread while one is pending.
unsafe impl Send for CommHandle {}
unsafe impl Sync for CommHandle {}

impl CommHandle {
    fn live(&self) -> Result<sys::ncclComm_t> {
        if self.aborted.load(Ordering::SeqCst) {
            return Err(err("the NCCL communicator was aborted (the generation ended)".into()));
        }
        Ok(self.comm)
    }

    fn abort(&self) {
        if !self.aborted.swap(true, Ordering::SeqCst) {
            // SAFETY: aborted at most once; `live` refuses every later use.
            let _ = unsafe { nccl::comm_abort(self.comm) };
        }
    }
}

impl Drop for CommHandle {
    fn drop(&mut self) {
        // ncclCommAbort also frees a healthy communicator, without waiting for peers.
        self.abort();
    }
}

/// Aborts a communicator from another thread: every pending and later operation on it
/// fails instead of waiting for a peer that is gone.
#[derive(Clone)]
pub struct NcclAbortHandle(Arc<CommHandle>);

impl NcclAbortHandle {
    pub fn abort(&self) {
        self.0.abort();
    }
}

/// One rank of an NCCL communicator.
pub struct NcclCollective {
    comm: Arc<CommHandle>,
    /// Serialises operations on the communicator; holds sent tensors with the event after
    /// their send, because a buffer must outlive NCCL's read of it.
    in_flight: Mutex<Vec<(Tensor, CudaEvent)>>,
    dev: CudaDevice,
    /// The stream candle computes on; results are handed back ordered on it.
    compute: Arc<CudaStream>,
    /// The stream NCCL runs on.
    comm_stream: Arc<CudaStream>,
    rank: usize,
    world: usize,
}

fn nccl_err(what: String) -> impl FnOnce(nccl::NcclError) -> Error {
    move |e| err(format!("{what}: {e:?}"))
}

impl NcclCollective {
    /// Joins the communicator `id` (from [`new_unique_id`] on its root) as `rank` of
    /// `world`, on `device`. Blocks until every rank joined.
    pub fn init(device: &Device, rank: usize, world: usize, id: &[u8]) -> Result<Self> {
        let dev = crate::kernels::cuda_device(device)?.clone();
        let bytes: [u8; UNIQUE_ID_BYTES] =
            id.try_into().map_err(|_| err(format!("an NCCL unique id has {UNIQUE_ID_BYTES} bytes, got {}", id.len())))?;
        if rank >= world {
            return Err(err(format!("rank {rank} is outside a communicator of {world}")));
        }
        let compute = dev.cuda_stream();
        let comm_stream = compute.fork().map_err(|e| err(format!("creating the NCCL stream: {e}")))?;
        compute.context().bind_to_thread().map_err(|e| err(format!("binding the CUDA context: {e}")))?;
        let unique = sys::ncclUniqueId { internal: bytes.map(|b| b as std::ffi::c_char) };
        let mut comm = std::mem::MaybeUninit::uninit();
        // SAFETY: `comm` is written by a successful call and read only then.
        let comm = unsafe {
            nccl::comm_init_rank(comm.as_mut_ptr(), world as i32, unique, rank as i32)
                .map_err(nccl_err(format!("ncclCommInitRank (rank {rank} of {world})")))?;
            comm.assume_init()
        };
        Ok(Self {
            comm: Arc::new(CommHandle { comm, aborted: AtomicBool::new(false) }),
            in_flight: Mutex::new(Vec::new()),
            dev,
            compute,
            comm_stream,
            rank,
            world,
        })
    }

    /// Every rank of a single process driving `devices` (one rank per device), e.g. for
    /// the self-test; ranks follow the order of `devices`.
    pub fn group(devices: &[Device]) -> Result<Vec<Self>> {
        let id = new_unique_id()?;
        let world = devices.len();
        // ncclCommInitRank blocks until all ranks arrive: one thread per rank.
        std::thread::scope(|s| {
            let handles: Vec<_> = devices
                .iter()
                .enumerate()
                .map(|(r, d)| {
                    let id = &id;
                    s.spawn(move || NcclCollective::init(d, r, world, id))
                })
                .collect();
            handles.into_iter().map(|h| h.join().map_err(|_| err("a rank's NCCL init panicked".into()))?).collect()
        })
    }

    /// The device this rank runs on (tensors for `send_tensor` go here).
    pub fn device(&self) -> Device {
        Device::Cuda(self.dev.clone())
    }

    pub fn abort_handle(&self) -> NcclAbortHandle {
        NcclAbortHandle(self.comm.clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(Tensor, CudaEvent)>> {
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn raw_stream(&self) -> sys::cudaStream_t {
        self.comm_stream.cu_stream() as _
    }

    fn wait_for_compute(&self) -> Result<()> {
        self.comm_stream.join(&self.compute).map_err(|e| err(format!("ordering the NCCL stream: {e}")))
    }

    fn hand_back_to_compute(&self) -> Result<()> {
        self.compute.join(&self.comm_stream).map_err(|e| err(format!("ordering the compute stream: {e}")))
    }

    fn all_reduce_raw<B: DevicePtrMut<f32>>(&self, buf: &mut B) -> Result<()> {
        let n = buf.len();
        let comm = self.comm.live()?;
        let (ptr, _sync) = buf.device_ptr_mut(&self.comm_stream);
        // SAFETY: in place over the n floats of `buf`, on the comm stream that orders its use.
        unsafe {
            nccl::all_reduce(ptr as *const c_void, ptr as *mut c_void, n, f32::as_nccl_type(), sys::ncclRedOp_t::ncclSum, comm, self.raw_stream())
        }
        .map_err(nccl_err(format!("ncclAllReduce of {n} floats")))?;
        Ok(())
    }

    fn send_raw<T: NcclType, S: DevicePtr<T>>(&self, to: usize, data: &S) -> Result<()> {
        let n = data.len();
        let comm = self.comm.live()?;
        let (ptr, _sync) = data.device_ptr(&self.comm_stream);
        // SAFETY: reads the n elements of `data`, which the caller keeps alive until the
        // comm stream passed this point.
        unsafe { nccl::send(ptr as *const c_void, n, T::as_nccl_type(), to as i32, comm, self.raw_stream()) }
            .map_err(nccl_err(format!("ncclSend of {n} elements to rank {to}")))?;
        Ok(())
    }

    fn recv_raw<T: NcclType, R: DevicePtrMut<T>>(&self, from: usize, buf: &mut R) -> Result<()> {
        let n = buf.len();
        let comm = self.comm.live()?;
        let (ptr, _sync) = buf.device_ptr_mut(&self.comm_stream);
        // SAFETY: writes the n elements of `buf`.
        unsafe { nccl::recv(ptr as *mut c_void, n, T::as_nccl_type(), from as i32, comm, self.raw_stream()) }
            .map_err(nccl_err(format!("ncclRecv of {n} elements from rank {from}")))?;
        Ok(())
    }

    /// Sums `buf` (a device buffer on this rank's GPU) over all ranks in place. Queued
    /// after the compute stream's pending work; the compute stream's later work sees the sum.
    pub fn all_reduce_device(&self, buf: &mut CudaSlice<f32>) -> Result<()> {
        let _serial = self.lock();
        self.wait_for_compute()?;
        self.all_reduce_raw(buf)?;
        self.hand_back_to_compute()
    }

    /// Starts summing `buf[range]` over all ranks in place, after the compute stream's work
    /// queued so far, without making the compute stream wait for it: for gradients that are
    /// final while the backward of other layers still runs. [`Self::join_compute`] makes
    /// the compute stream wait for every reduction started this way. All ranks must start
    /// the same ranges in the same order.
    pub fn all_reduce_device_range_async(&self, buf: &mut CudaSlice<f32>, range: std::ops::Range<usize>) -> Result<()> {
        if range.end > buf.len() || range.start > range.end {
            return Err(err(format!("all-reduce of floats {range:?} of a {}-float buffer", buf.len())));
        }
        let _serial = self.lock();
        self.wait_for_compute()?;
        self.all_reduce_raw(&mut buf.slice_mut(range))
    }

    /// Makes the compute stream wait for the NCCL work queued so far (the reductions of
    /// [`Self::all_reduce_device_range_async`]).
    pub fn join_compute(&self) -> Result<()> {
        let _serial = self.lock();
        self.hand_back_to_compute()
    }

    /// Sends a CUDA tensor (f32, bf16 or f16) to rank `to`; the receiver must know its shape
    /// and dtype. Returns once the send is queued; the tensor is kept until it completed.
    pub fn send_tensor(&self, to: usize, t: &Tensor) -> Result<()> {
        super::check_peer(self, to)?;
        let t = t.contiguous()?;
        let mut in_flight = self.lock();
        in_flight.retain(|(_, done)| !done.is_complete());
        self.wait_for_compute()?;
        {
            let (storage, layout) = t.storage_and_layout();
            let Storage::Cuda(s) = &*storage else {
                return Err(err(format!("send_tensor: the tensor is on {:?}, not on this rank's GPU", t.device())));
            };
            let (lo, n) = (layout.start_offset(), layout.shape().elem_count());
            match t.dtype() {
                DType::F32 => self.send_raw(to, &s.as_cuda_slice::<f32>()?.slice(lo..lo + n))?,
                DType::BF16 => self.send_raw(to, &s.as_cuda_slice::<half::bf16>()?.slice(lo..lo + n))?,
                DType::F16 => self.send_raw(to, &s.as_cuda_slice::<half::f16>()?.slice(lo..lo + n))?,
                other => return Err(err(format!("send_tensor: dtype {other:?} is not sent over NCCL"))),
            }
        }
        let done = self.comm_stream.record_event(None).map_err(|e| err(format!("recording a send: {e}")))?;
        in_flight.push((t, done));
        Ok(())
    }

    /// Receives a tensor of `shape` and `dtype` sent by rank `from` with [`Self::send_tensor`].
    /// The compute stream's later work sees its contents.
    pub fn recv_tensor(&self, from: usize, shape: &[usize], dtype: DType) -> Result<Tensor> {
        super::check_peer(self, from)?;
        match dtype {
            DType::F32 => self.recv_typed::<f32>(from, shape),
            DType::BF16 => self.recv_typed::<half::bf16>(from, shape),
            DType::F16 => self.recv_typed::<half::f16>(from, shape),
            other => Err(err(format!("recv_tensor: dtype {other:?} is not sent over NCCL"))),
        }
    }

    fn recv_typed<T: CudaDType + NcclType + candle_core::cuda_backend::cudarc::driver::DeviceRepr>(&self, from: usize, shape: &[usize]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let _serial = self.lock();
        // SAFETY: ncclRecv writes all n elements before the compute stream reads any.
        let mut buf = unsafe { self.dev.alloc::<T>(n)? };
        self.wait_for_compute()?;
        self.recv_raw(from, &mut buf)?;
        self.hand_back_to_compute()?;
        Ok(Tensor::from_storage(Storage::Cuda(CudaStorage::wrap_cuda_slice(buf, self.dev.clone())), shape, BackpropOp::none(), false))
    }

    /// Waits for the comm stream; a host-side message is complete only then.
    fn sync_comm(&self) -> Result<()> {
        self.comm_stream.synchronize().map_err(|e| err(format!("waiting for NCCL: {e}")))?;
        self.comm.live().map(|_| ())
    }

    fn send_bytes_now(&self, to: usize, data: &[u8]) -> Result<()> {
        let buf = {
            let _serial = self.lock();
            let buf = self.comm_stream.clone_htod(data).map_err(|e| Error::Msg(format!("staging {} bytes for rank {to}: {e}", data.len())))?;
            self.send_raw(to, &buf)?;
            buf
        };
        // Outside the lock, so that an abort from another thread is never kept waiting.
        self.sync_comm()?;
        drop(buf);
        Ok(())
    }

    fn recv_bytes_now(&self, from: usize, len: usize) -> Result<Vec<u8>> {
        let buf = {
            let _serial = self.lock();
            let mut buf = self.comm_stream.alloc_zeros::<u8>(len).map_err(|e| Error::Msg(format!("staging {len} bytes from rank {from}: {e}")))?;
            self.recv_raw(from, &mut buf)?;
            buf
        };
        self.sync_comm()?;
        self.comm_stream.clone_dtoh(&buf).map_err(|e| Error::Msg(format!("reading {len} bytes from rank {from}: {e}")))
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_sum(&self, buf: &mut [f32]) -> Result<()> {
        if buf.is_empty() {
            return self.barrier_raw();
        }
        let d = {
            let _serial = self.lock();
            let mut d = self.comm_stream.clone_htod(buf).map_err(|e| Error::Msg(format!("staging {} floats: {e}", buf.len())))?;
            self.all_reduce_raw(&mut d)?;
            d
        };
        self.sync_comm()?;
        self.comm_stream.memcpy_dtoh(&d, buf).map_err(|e| Error::Msg(format!("reading the all-reduce back: {e}")))?;
        self.comm_stream.synchronize().map_err(|e| err(format!("waiting for NCCL: {e}")))
    }

    /// NCCL needs the receiver to post a buffer of the right size, so a message is a u64
    /// length, then (when non-empty) its bytes.
    fn send(&self, to: usize, data: &[u8]) -> Result<()> {
        super::check_peer(self, to)?;
        self.send_bytes_now(to, &(data.len() as u64).to_le_bytes())?;
        if !data.is_empty() {
            self.send_bytes_now(to, data)?;
        }
        Ok(())
    }

    fn recv(&self, from: usize) -> Result<Vec<u8>> {
        super::check_peer(self, from)?;
        let head = self.recv_bytes_now(from, 8)?;
        let len = u64::from_le_bytes(head.try_into().expect("8 bytes")) as usize;
        if len == 0 {
            return Ok(Vec::new());
        }
        self.recv_bytes_now(from, len)
    }

    fn barrier(&self) -> Result<()> {
        self.barrier_raw()
    }
}

impl NcclCollective {
    /// A one-float all-reduce: returns once every rank reached it.
    fn barrier_raw(&self) -> Result<()> {
        let mut one = [0f32];
        self.all_reduce_sum(&mut one)
    }
}

impl Drop for NcclCollective {
    fn drop(&mut self) {
        // Sends still in flight read their tensors; let them finish before the buffers go
        // (an aborted communicator's operations are over or will never finish).
        if !self.comm.aborted.load(Ordering::SeqCst) {
            let _ = self.comm_stream.synchronize();
        }
    }
}
