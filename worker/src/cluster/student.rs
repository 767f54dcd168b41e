//! The student role in a generation. Every student walks the whole seeded data stream (so
//! all agree on each step's batches and on the token count that normalises the gradient),
//! trains only its shard of each step's microbatches, and adds its partial sums into the
//! ordered all-reduce; then every student applies the identical optimizer step.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::Context;
use qdistill_common::collective::{ordered_all_reduce, Collective, SubGroup, TcpCollective, CHAIN_CHUNK};
use qdistill_common::config::{self, TeacherMode, TrainConfig};
use qdistill_common::data::Batcher;
use qdistill_common::optim::lr_at;
use qdistill_coordinator::state::{Assignment, Role};
use candle_core::Device;
use qdistill_proto::v1 as pb;
use tonic::Code;

use super::{ckpt, nccl, scheduler, wire, RoleCtx, RoleEnd, RoleError};
use crate::metrics::{self, PHASE_TARGET};
use crate::models;
use crate::run::{live_topk_spec, prepare, teacher_batch, Prepared};
use crate::trainer::{dropout_seed, DeviceBatch, LossSums, Teacher, TeacherBatch, TopKBatch};

/// Tells a teacher that this student finished a step, so it may compute one more ahead.
pub const CREDIT: &[u8] = &[1];

pub(crate) fn run(ctx: &RoleCtx, a: &Assignment, cfg: &TrainConfig) -> Result<RoleEnd, RoleError> {
    let teacher_ranks: Vec<usize> = a.peers.iter().filter(|p| p.role == Role::Teacher).map(|p| p.rank).collect();
    // The teacher's weights live on the teacher ranks; this side only needs its LM head
    // (hidden-state outputs are turned into logits inside the student's fused loss).
    // Preparing as LwF keeps every other choice (LoRA init, loss weights, data, optimizer)
    // exactly as the single-process run makes it.
    let remote_teacher = cfg.teacher.mode == TeacherMode::Model;
    if remote_teacher && teacher_ranks.is_empty() {
        return Err(RoleError::Fatal(anyhow::anyhow!("the config has a teacher model but generation {} has no teacher rank", a.generation)));
    }
    let mut local = cfg.clone();
    if remote_teacher {
        local.teacher.mode = TeacherMode::Lwf;
    }
    let Prepared { mut student, teacher, data, device } = prepare(&local)?;
    let teacher = if remote_teacher {
        let spec = cfg.teacher.model_name_or_path.as_deref().unwrap_or(&cfg.model.model_name_or_path);
        let path = config::resolve_model_path(spec, None, None).map_err(anyhow::Error::from)?;
        let head = models::load_teacher(cfg, &path, Some(Vec::new()), &device, student.model.dtype())
            .with_context(|| format!("loading the LM head of teacher {}", path.display()))?;
        Teacher::Model(head.model)
    } else {
        teacher
    };
    let t = &cfg.training;
    let g = t.gradient_accumulation_steps;
    if a.plan.micro_batches_per_step != g {
        return Err(RoleError::Fatal(anyhow::anyhow!(
            "the plan has {} microbatches per step, the config {g}",
            a.plan.micro_batches_per_step
        )));
    }
    let total = a.total_steps;
    let warmup = t.num_warmup_steps(total as usize) as u64;

    let tmp = tempfile::tempdir().context("creating a temp dir for checkpoints")?;
    let mut stream = if a.resume {
        let dir = ckpt::download(ctx.rpc, &ctx.session.id, a.start_step, tmp.path())?;
        let (step, cursor) = ckpt::load(&dir, &mut student)?;
        if step != a.start_step {
            return Err(RoleError::Fatal(anyhow::anyhow!("checkpoint-{} says it holds {step} steps", a.start_step)));
        }
        Batcher::resume(data.train.clone(), data.opts.clone(), cursor)?
    } else {
        data.train_stream()?
    };

    let addrs: Vec<String> = a.peers.iter().map(|p| p.collective_addr.clone()).collect();
    let mesh = TcpCollective::connect_cancellable(a.rank, &addrs, ctx.listener, a.generation, ctx.opts.collective_timeout, &|| ctx.cancelled())
        .map_err(RoleError::lost)?;
    ctx.session.shared.set_abort(mesh.abort_handle());
    let nccl = nccl::form(ctx, a, &device)?;
    // `teacher.output = "topk:K"`: top-K rows instead of hidden states, taken as the
    // single-process run takes them.
    let topk = live_topk_spec(cfg, &teacher, &student);
    let teacher_width = match &teacher {
        Teacher::Model(m) => m.cfg.hidden_size,
        _ => 0,
    };
    let students: Vec<usize> = a.peers.iter().filter(|p| p.role == Role::Student).map(|p| p.rank).collect();
    let group = SubGroup::new(&mesh, students)?;
    let my_shards = a.plan.shards_of(a.role_rank);
    let my_teachers: BTreeSet<usize> = my_shards.iter().flat_map(|(_, ms)| ms.iter()).filter_map(|&k| a.plan.micros[k].teacher_rank).collect();
    let n_params = student.params.len();
    let clock = StepClock::new(&device, nccl.is_some())?;
    let mut timings: Vec<StepTiming> = Vec::new();
    metrics::get().inspect(|m| m.start_steps());

    for step in a.start_step..total {
        ctx.check()?;
        let started = Instant::now();
        let mut recv_marks = Vec::new();
        let _step_span = tracing::info_span!(target: PHASE_TARGET, "step", step = step + 1, role = "student", rank = a.role_rank).entered();
        let batches: Vec<_> = tracing::info_span!(target: PHASE_TARGET, "data").in_scope(|| (0..g).map(|_| stream.next_batch()).collect());
        let n_target: usize = batches.iter().map(|b| b.n_target_tokens).sum();
        let scale = 1.0 / n_target.max(1) as f64;
        let mut sums = LossSums::default();
        let mut partials: Vec<Vec<f32>> = Vec::with_capacity(my_shards.len());
        let mut trained = Vec::new();
        let mut sample_ids = Vec::new();
        let mut step_tokens = 0;
        let last_micro = my_shards.iter().flat_map(|(_, m)| m.iter().copied()).last();
        for (_, micros) in &my_shards {
            for &k in micros {
                let db = DeviceBatch::new(&batches[k], &device)?;
                step_tokens += db.n_tokens as u64;
                let waits = a.plan.micros[k].teacher_rank.is_some();
                let before = if waits { Some(clock.mark()?) } else { None };
                let t_out = match (a.plan.micros[k].teacher_rank, &nccl) {
                    (Some(tr), _) if topk.is_some() => {
                        let _s = tracing::info_span!(target: PHASE_TARGET, "transfer").entered();
                        let bytes = mesh.recv(tr).map_err(RoleError::lost)?;
                        let k_top = topk.as_ref().map_or(0, |s| s.k);
                        let rows = wire::decode_topk(&bytes, k_top, db.n_target, tr)?;
                        TeacherBatch::TopK(TopKBatch::new(&rows, &db, &device)?)
                    }
                    // Over NCCL the shape is known on both sides: the batch's tokens × the
                    // teacher's width.
                    (Some(tr), Some(n)) => {
                        let _s = tracing::info_span!(target: PHASE_TARGET, "transfer").entered();
                        TeacherBatch::Hidden(Some(n.recv_hidden(tr, &[db.ids.elem_count(), teacher_width], student.model.dtype())?))
                    }
                    (Some(tr), None) => {
                        let _s = tracing::info_span!(target: PHASE_TARGET, "transfer").entered();
                        let bytes = mesh.recv(tr).map_err(RoleError::lost)?;
                        TeacherBatch::Hidden(Some(wire::decode(&bytes, &device, student.model.dtype(), tr)?))
                    }
                    (None, _) => tracing::info_span!(target: PHASE_TARGET, "teacher_forward")
                        .in_scope(|| teacher_batch(&teacher, &student, &db, topk.as_ref(), None))?,
                };
                if let Some(b) = before {
                    recv_marks.push((b, clock.mark()?));
                }
                let _s = tracing::info_span!(target: PHASE_TARGET, "student_forward_backward").entered();
                // The step's last backward starts the all-reduce block by block.
                if let (Some(n), true) = (&nccl, Some(k) == last_micro) {
                    n.overlap_next_backward(&mut student.grads)?;
                }
                let s = student.micro_step_with(&db, &teacher, &t_out, scale, dropout_seed(cfg.seed, step, k as u64))?;
                sums.add(&s);
                trained.push(step * g as u64 + k as u64);
                sample_ids.extend_from_slice(&batches[k].sample_ids);
            }
            // Over TCP every virtual shard's partial sum is reduced on its own, in shard
            // order, so the sum is the same bits for any number of students; NCCL sums
            // the whole device buffer in its own order instead (no host copies).
            if nccl.is_none() {
                partials.push(student.grads.take_host()?);
            }
        }
        let reduce_start = clock.mark()?;
        {
            let _s = tracing::info_span!(target: PHASE_TARGET, "allreduce").entered();
            match &nccl {
                Some(n) => n.finish_grads(&mut student.grads)?,
                None => {
                    let parts: Vec<&[f32]> = partials.iter().map(|p| p.as_slice()).collect();
                    let mut reduced = vec![0.0; n_params];
                    ordered_all_reduce(&group, &parts, &mut reduced, CHAIN_CHUNK).map_err(RoleError::lost)?;
                    student.grads.set_host(reduced)?;
                }
            }
        }
        let reduce_end = clock.mark()?;
        let lr = lr_at(scheduler(t.lr_scheduler_type), t.learning_rate, step, warmup, total);
        let grad_norm = tracing::info_span!(target: PHASE_TARGET, "optimizer").in_scope(|| student.optimizer_step(lr, t.max_grad_norm))?;
        for &tr in &my_teachers {
            mesh.send(tr, CREDIT).map_err(RoleError::lost)?;
        }
        let req = pb::StepCommitRequest {
            session_id: ctx.session.id.clone(),
            generation: a.generation,
            step,
            student_rank: a.role_rank as u32,
            ce_sum: sums.ce,
            kd_sum: sums.kd,
            target_tokens: sums.tokens as u64,
            grad_norm,
            learning_rate: lr,
            micro_batches: trained,
            sample_ids,
        };
        let ack = match ctx.rpc.call(|mut c| {
            let req = req.clone();
            async move { c.step_commit(req).await }
        }) {
            Ok(ack) => ack,
            Err(s) if matches!(s.code(), Code::Aborted | Code::NotFound | Code::Unavailable) => return Err(RoleError::Lost(s.message().to_string())),
            Err(s) if s.code() == Code::FailedPrecondition => return Err(RoleError::Stopped),
            Err(s) => return Err(RoleError::Fatal(ctx.rpc.error(s).context(format!("committing step {step}")))),
        };
        // The optimizer step read the gradient norm back, so every event above is complete.
        let mut recv_ms = 0.0;
        for (b, e) in &recv_marks {
            recv_ms += clock.ms(b, e)?;
        }
        let timing = StepTiming {
            step: step + 1,
            step_ms: started.elapsed().as_secs_f64() * 1e3,
            recv_wait_ms: recv_ms,
            allreduce_ms: clock.ms(&reduce_start, &reduce_end)?,
            tokens: step_tokens,
        };
        tracing::info!(
            rank = a.role_rank, step = timing.step, step_ms = timing.step_ms, recv_wait_ms = timing.recv_wait_ms,
            allreduce_ms = timing.allreduce_ms, tokens = timing.tokens, "student step timing"
        );
        timings.push(timing);
        ctx.session.shared.step.store(step + 1, Ordering::SeqCst);
        if let Some(m) = metrics::get() {
            let l = &student.loss;
            let loss = l.ce_weight * sums.ce_mean() + l.kd_weight * l.temperature.powi(2) * sums.kd_mean();
            let r = metrics::StepReport { step: step + 1, loss, kd_loss: sums.kd_mean(), tokens: step_tokens, samples: req.sample_ids.len() as u64 };
            m.record_step(&r, &device);
        }
        if a.role_rank == 0 && step % t.logging_steps.max(1) as u64 == 0 {
            tracing::info!(step = step + 1, ce = sums.ce_mean(), kd = sums.kd_mean(), lr, grad_norm, "train (student rank 0's shard)");
        }
        let terminating = ctx.terminating();
        if ack.checkpoint_requested || terminating {
            let _s = tracing::info_span!(target: PHASE_TARGET, "checkpoint").entered();
            let dir = tmp.path().join(format!("save-{}", step + 1));
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            ckpt::save(&dir, &student, cfg, step + 1, total, stream.cursor())?;
            let bytes = ckpt::upload(ctx.rpc, &ctx.session.id, a.generation, step + 1, &dir)?;
            std::fs::remove_dir_all(&dir).ok();
            tracing::info!(bytes, "checkpoint-{} uploaded", step + 1);
            metrics::get().inspect(|m| m.record_checkpoint());
        }
        if terminating {
            return Ok(RoleEnd::Terminated);
        }
    }
    if let Some(s) = StepTiming::steady_mean(&timings) {
        tracing::info!(
            rank = a.role_rank, steps = s.steps, step_ms = s.step_ms, recv_wait_ms = s.recv_wait_ms, recv_wait_pct = s.recv_wait_pct(),
            allreduce_ms = s.allreduce_ms, allreduce_pct = s.allreduce_pct(), tokens_per_s = s.tokens_per_s(),
            "student step timing summary (mean over the steps after the first {WARMUP_STEPS})"
        );
    }
    Ok(RoleEnd::Finished)
}

/// Steps left out of the timing summary: the first ones pay for allocations, NCCL's
/// connection set-up and the teacher filling its look-ahead.
const WARMUP_STEPS: usize = 2;

/// One student step's wall time and the parts of it spent waiting for teacher outputs and
/// in the gradient all-reduce (milliseconds), and the tokens it trained.
#[derive(Debug, Clone, Copy, PartialEq)]
struct StepTiming {
    step: u64,
    step_ms: f64,
    recv_wait_ms: f64,
    allreduce_ms: f64,
    tokens: u64,
}

/// The mean of [`StepTiming`]s over a run's steady steps.
#[derive(Debug, Clone, Copy, PartialEq)]
struct SteadyTiming {
    steps: usize,
    step_ms: f64,
    recv_wait_ms: f64,
    allreduce_ms: f64,
    tokens: f64,
}

impl SteadyTiming {
    fn recv_wait_pct(&self) -> f64 {
        100.0 * self.recv_wait_ms / self.step_ms.max(1e-9)
    }
    fn allreduce_pct(&self) -> f64 {
        100.0 * self.allreduce_ms / self.step_ms.max(1e-9)
    }
    fn tokens_per_s(&self) -> f64 {
        self.tokens / (self.step_ms.max(1e-9) / 1e3)
    }
}

impl StepTiming {
    /// The mean over the steps after the first [`WARMUP_STEPS`] (over all of them when the
    /// run is not longer than that); None for no steps.
    fn steady_mean(all: &[StepTiming]) -> Option<SteadyTiming> {
        let steady = if all.len() > WARMUP_STEPS { &all[WARMUP_STEPS..] } else { all };
        if steady.is_empty() {
            return None;
        }
        let n = steady.len() as f64;
        let mean = |f: fn(&StepTiming) -> f64| steady.iter().map(f).sum::<f64>() / n;
        Some(SteadyTiming {
            steps: steady.len(),
            step_ms: mean(|t| t.step_ms),
            recv_wait_ms: mean(|t| t.recv_wait_ms),
            allreduce_ms: mean(|t| t.allreduce_ms),
            tokens: mean(|t| t.tokens as f64),
        })
    }
}

/// Marks points of a student step. With NCCL, receives and the all-reduce are queued on
/// the GPU and return at once on the host, so the marks are CUDA events on candle's
/// compute stream: the time between the marks around a receive is how long the stream
/// stalled for the teacher's data. Elsewhere the calls block the host, and host clocks
/// measure them. Events are read only after the step's gradient norm came back to the
/// host, so marking adds no synchronisation and leaves the overlap as it is.
enum StepClock {
    Host,
    #[cfg(feature = "cuda")]
    Cuda(std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>),
}

enum Mark {
    Host(Instant),
    #[cfg(feature = "cuda")]
    Cuda(candle_core::cuda_backend::cudarc::driver::CudaEvent),
}

impl StepClock {
    fn new(device: &Device, on_stream: bool) -> Result<Self, RoleError> {
        #[cfg(feature = "cuda")]
        if on_stream {
            let dev = device.as_cuda_device().map_err(|e| RoleError::Fatal(anyhow::anyhow!("timing NCCL transfers: {e}")))?;
            return Ok(Self::Cuda(dev.cuda_stream()));
        }
        let _ = (device, on_stream);
        Ok(Self::Host)
    }

    fn mark(&self) -> Result<Mark, RoleError> {
        match self {
            Self::Host => Ok(Mark::Host(Instant::now())),
            #[cfg(feature = "cuda")]
            Self::Cuda(stream) => {
                use candle_core::cuda_backend::cudarc::driver::sys::CUevent_flags;
                // Timing events (cudarc's default disables timing).
                let e = stream
                    .record_event(Some(CUevent_flags::CU_EVENT_DEFAULT))
                    .map_err(|e| RoleError::Fatal(anyhow::anyhow!("recording a timing event: {e}")))?;
                Ok(Mark::Cuda(e))
            }
        }
    }

    fn ms(&self, from: &Mark, to: &Mark) -> Result<f64, RoleError> {
        match (from, to) {
            (Mark::Host(a), Mark::Host(b)) => Ok(b.saturating_duration_since(*a).as_secs_f64() * 1e3),
            #[cfg(feature = "cuda")]
            (Mark::Cuda(a), Mark::Cuda(b)) => {
                a.elapsed_ms(b).map(f64::from).map_err(|e| RoleError::Fatal(anyhow::anyhow!("reading a timing event: {e}")))
            }
            #[cfg(feature = "cuda")]
            _ => Err(RoleError::Fatal(anyhow::anyhow!("timing marks of two different clocks"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(step: u64, step_ms: f64, recv: f64, reduce: f64, tokens: u64) -> StepTiming {
        StepTiming { step, step_ms, recv_wait_ms: recv, allreduce_ms: reduce, tokens }
    }

    #[test]
    fn the_summary_leaves_out_the_first_two_steps() {
        let all = [t(1, 900.0, 800.0, 50.0, 100), t(2, 500.0, 300.0, 40.0, 100), t(3, 100.0, 10.0, 20.0, 100), t(4, 300.0, 30.0, 20.0, 300)];
        let s = StepTiming::steady_mean(&all).unwrap();
        // Steps 3 and 4, computed by hand.
        assert_eq!(s.steps, 2);
        assert_eq!((s.step_ms, s.recv_wait_ms, s.allreduce_ms, s.tokens), (200.0, 20.0, 20.0, 200.0));
        assert_eq!((s.recv_wait_pct(), s.allreduce_pct()), (10.0, 10.0));
        assert_eq!(s.tokens_per_s(), 1000.0);
        // Too short a run to leave any out: all steps count.
        assert_eq!(StepTiming::steady_mean(&all[..2]).unwrap().steps, 2);
        assert!(StepTiming::steady_mean(&[]).is_none());
    }
}
