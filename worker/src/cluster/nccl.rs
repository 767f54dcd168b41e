//! NCCL in a generation whose peers are all on GPUs: teacher outputs go device to device
//! and the students' gradient buffer is all-reduced where it lives. The TCP mesh stays for
//! the small control messages (step credits), so a blocked NCCL transfer never holds up a
//! credit and no send order can deadlock.
//!
//! Two communicators per generation, their ids relayed by the coordinator: "world" (every
//! rank, for teacher → student sends) and "students" (the gradient all-reduce).

use candle_core::{DType, Device, Tensor};
use qdistill_common::lora::LoraGrads;
use qdistill_coordinator::state::Assignment;

use super::{RoleCtx, RoleError};

#[cfg(feature = "cuda")]
pub(crate) use imp::form;

#[cfg(not(feature = "cuda"))]
pub(crate) enum NcclGroups {}

/// Without CUDA no worker offers NCCL, so no generation uses it.
#[cfg(not(feature = "cuda"))]
pub(crate) fn form(_ctx: &RoleCtx, a: &Assignment, _device: &Device) -> Result<Option<NcclGroups>, RoleError> {
    if a.nccl() {
        return Err(RoleError::Fatal(anyhow::anyhow!("generation {} uses NCCL, which this build (without `cuda`) lacks", a.generation)));
    }
    Ok(None)
}

#[cfg(not(feature = "cuda"))]
impl NcclGroups {
    pub fn send_hidden(&self, _to: usize, _h: &Tensor) -> Result<(), RoleError> {
        match *self {}
    }
    pub fn recv_hidden(&self, _from: usize, _shape: &[usize], _dtype: DType) -> Result<Tensor, RoleError> {
        match *self {}
    }
    pub fn overlap_next_backward(&self, _grads: &mut LoraGrads) -> Result<(), RoleError> {
        match *self {}
    }
    pub fn finish_grads(&self, _grads: &mut LoraGrads) -> Result<(), RoleError> {
        match *self {}
    }
}

#[cfg(feature = "cuda")]
mod imp {
    use std::time::Instant;

    use qdistill_common::collective::nccl::{new_unique_id, NcclCollective};
    use qdistill_common::collective::Collective;
    use qdistill_coordinator::state::Role;
    use qdistill_proto::v1 as pb;

    use std::ops::Range;
    use std::sync::{Arc, Mutex, MutexGuard};

    use super::*;

    fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) struct NcclGroups {
        world: NcclCollective,
        /// Absent on teacher ranks.
        students: Option<Arc<NcclCollective>>,
        /// While a backward's all-reduce is overlapped: the gradient ranges already started.
        started: Arc<Mutex<Option<Vec<Range<usize>>>>>,
    }

    /// Forms the generation's communicators when it uses NCCL (`None` otherwise). Every
    /// member calls it at the same point of its role, teachers and students alike, since
    /// joining a communicator waits for all of its members.
    pub(crate) fn form(ctx: &RoleCtx, a: &Assignment, device: &Device) -> Result<Option<NcclGroups>, RoleError> {
        if !a.nccl() {
            return Ok(None);
        }
        let n_students = a.peers.iter().filter(|p| p.role == Role::Student).count();
        let world = join(ctx, a, device, "world", a.rank, a.peers.len())?;
        let generation = a.generation;
        ctx.session.shared.add_abort({
            let h = world.abort_handle();
            move || {
                tracing::warn!(generation, "generation over: aborting its NCCL communicators");
                h.abort()
            }
        });
        let students = if a.role == Role::Student {
            let c = join(ctx, a, device, "students", a.role_rank, n_students)?;
            let h = c.abort_handle();
            ctx.session.shared.add_abort(move || h.abort());
            Some(Arc::new(c))
        } else {
            None
        };
        tracing::info!(generation = a.generation, world = a.peers.len(), students = n_students, "NCCL communicators formed");
        Ok(Some(NcclGroups { world, students, started: Arc::default() }))
    }

    /// The group's root makes the id and offers it through the coordinator; the others ask
    /// until it is there. Then everyone joins.
    fn join(ctx: &RoleCtx, a: &Assignment, device: &Device, group: &str, rank: usize, size: usize) -> Result<NcclCollective, RoleError> {
        let offer = if rank == 0 { new_unique_id()? } else { Vec::new() };
        let deadline = Instant::now() + ctx.opts.collective_timeout;
        let id = loop {
            ctx.check()?;
            let req = pb::ExchangeNcclIdRequest {
                session_id: ctx.session.id.clone(),
                generation: a.generation,
                group: group.to_string(),
                offer: offer.clone(),
            };
            let got = ctx
                .rpc
                .call(|mut c| {
                    let req = req.clone();
                    async move { c.exchange_nccl_id(req).await }
                })
                .map_err(|s| RoleError::Lost(format!("exchanging the NCCL id of {group:?}: {}", s.message())))?;
            if !got.unique_id.is_empty() {
                break got.unique_id;
            }
            if Instant::now() > deadline {
                return Err(RoleError::Lost(format!("the root of NCCL group {group:?} never offered its id")));
            }
        };
        NcclCollective::init(device, rank, size, &id).map_err(RoleError::lost)
    }

    impl NcclGroups {
        pub fn send_hidden(&self, to: usize, h: &Tensor) -> Result<(), RoleError> {
            self.world.send_tensor(to, h).map_err(RoleError::lost)
        }

        pub fn recv_hidden(&self, from: usize, shape: &[usize], dtype: DType) -> Result<Tensor, RoleError> {
            self.world.recv_tensor(from, shape, dtype).map_err(RoleError::lost)
        }

        fn students(&self) -> Result<&Arc<NcclCollective>, RoleError> {
            self.students.as_ref().ok_or_else(|| RoleError::Fatal(anyhow::anyhow!("a teacher rank has no gradients to reduce")))
        }

        /// For the step's last micro-batch: the backward starts the all-reduce of each
        /// block's gradients on the NCCL stream as soon as that block is done, overlapped
        /// with the backward of the blocks below (device-resident gradients only; on the
        /// host [`Self::finish_grads`] reduces everything at the end).
        pub fn overlap_next_backward(&self, grads: &mut LoraGrads) -> Result<(), RoleError> {
            // QDISTILL_NCCL_OVERLAP=0: one all-reduce after the backward instead.
            if !grads.is_resident() || std::env::var("QDISTILL_NCCL_OVERLAP").is_ok_and(|v| v == "0") {
                return Ok(());
            }
            let c = self.students()?.clone();
            let started = self.started.clone();
            *lock(&started) = Some(Vec::new());
            grads.set_ready_hook(Some(Box::new(move |buf, range| {
                c.all_reduce_device_range_async(buf, range.clone())?;
                if let Some(v) = lock(&started).as_mut() {
                    v.push(range);
                }
                Ok(())
            })));
            Ok(())
        }

        /// Completes the step's gradient sum: after an overlapped backward, reduces what
        /// its hook did not cover (in buffer order, the same on every rank) and makes the
        /// compute stream wait for it all; otherwise sums the whole buffer.
        pub fn finish_grads(&self, grads: &mut LoraGrads) -> Result<(), RoleError> {
            grads.set_ready_hook(None);
            let Some(mut done) = lock(&self.started).take() else { return self.all_reduce_grads(grads) };
            let c = self.students()?;
            let n = grads.len();
            let buf = grads.device_buffer_mut().ok_or_else(|| RoleError::Fatal(anyhow::anyhow!("the gradients left the device mid-step")))?;
            done.sort_by_key(|r| r.start);
            let mut at = 0;
            for r in done.iter().chain(std::iter::once(&(n..n))) {
                if r.start > at {
                    c.all_reduce_device_range_async(buf, at..r.start).map_err(RoleError::lost)?;
                }
                at = at.max(r.end);
            }
            c.join_compute().map_err(RoleError::lost)
        }

        /// Sums the students' gradients in place, on the device when they live there.
        fn all_reduce_grads(&self, grads: &mut LoraGrads) -> Result<(), RoleError> {
            let c = self.students()?;
            match grads.device_buffer_mut() {
                Some(buf) => c.all_reduce_device(buf).map_err(RoleError::lost),
                None => {
                    let mut host = grads.take_host()?;
                    c.all_reduce_sum(&mut host).map_err(RoleError::lost)?;
                    grads.set_host(host)?;
                    Ok(())
                }
            }
        }
    }
}
