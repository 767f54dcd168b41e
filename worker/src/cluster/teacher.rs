//! The teacher role: walk the same seeded data stream as the students, compute the
//! teacher's final hidden states for the microbatches the plan gives this rank, and send
//! each to the student that trains it. It runs at most `teacher_lookahead_steps` ahead:
//! past that it waits for each student's per-step credit, so queues stay bounded.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;

use anyhow::Context;
use qdistill_common::collective::{Collective, TcpCollective};
use qdistill_common::config::{self, TeacherMode, TrainConfig};
use qdistill_common::tokenizer::check_same_tokenizer;
use qdistill_coordinator::state::{Assignment, Role};

use super::{device_of, dtype_of, nccl, wire, RoleCtx, RoleEnd, RoleError};
use crate::data_plan;
use crate::metrics::PHASE_TARGET;
use crate::models;
use crate::trainer::{teacher_hidden, teacher_topk, DeviceBatch, Teacher, TopKSpec};

pub(crate) fn run(ctx: &RoleCtx, a: &Assignment, cfg: &TrainConfig) -> Result<RoleEnd, RoleError> {
    if cfg.teacher.mode != TeacherMode::Model {
        return Err(RoleError::Fatal(anyhow::anyhow!("assigned the teacher role, but the config's teacher mode has no teacher model")));
    }
    let device = device_of(cfg.device)?;
    let dtype = dtype_of(cfg.model.compute_dtype);
    let student_path = config::resolve_model_path(&cfg.model.model_name_or_path, cfg.model.revision.as_deref(), None).map_err(anyhow::Error::from)?;
    let (_, student_cfg, student_tok) = models::open(&student_path)?;
    let spec = cfg.teacher.model_name_or_path.as_deref().unwrap_or(&cfg.model.model_name_or_path);
    let path = config::resolve_model_path(spec, None, None).map_err(anyhow::Error::from)?;
    let loaded = models::load_teacher(cfg, &path, None, &device, dtype)?;
    check_same_tokenizer(&loaded.tokenizer, &student_tok)
        .with_context(|| format!("teacher {} and student {} must share one tokenizer", path.display(), student_path.display()))?;
    let teacher = Teacher::Model(loaded.model);
    let Teacher::Model(model) = &teacher else { unreachable!("built just above") };
    // `teacher.output = "topk:K"`: the teacher sends the supervised tokens' top-K rows,
    // taken exactly as the single-process run takes them (over min(Vs, Vt) entries).
    let topk = match cfg.teacher.output {
        config::TeacherOutput::TopK(k) => Some(TopKSpec {
            k,
            temperature: cfg.distill.temperature,
            vocab: student_cfg.vocab_size.min(model.cfg.vocab_size),
            dtype: crate::teacher_cache::value_dtype(cfg.teacher.topk_dtype),
            chunk_tokens: cfg.distill.chunk_tokens,
        }),
        _ => None,
    };
    // Batches come from the student's tokenizer and the same seed, so they are the
    // students' batches.
    let data = data_plan::build(cfg, &student_tok)?;
    let g = cfg.training.gradient_accumulation_steps;
    let mut stream = data.train_stream()?;
    // The stream is deterministic: replaying the batches before `start_step` lands exactly
    // where the checkpoint's data cursor does.
    for _ in 0..a.start_step * g as u64 {
        stream.next_batch();
    }

    let addrs: Vec<String> = a.peers.iter().map(|p| p.collective_addr.clone()).collect();
    let mesh = TcpCollective::connect_cancellable(a.rank, &addrs, ctx.listener, a.generation, ctx.opts.collective_timeout, &|| ctx.cancelled())
        .map_err(RoleError::lost)?;
    ctx.session.shared.set_abort(mesh.abort_handle());
    let nccl = nccl::form(ctx, a, &device)?;
    let student_rank_of: Vec<usize> = {
        let mut v: Vec<(usize, usize)> = a.peers.iter().filter(|p| p.role == Role::Student).map(|p| (p.role_rank, p.rank)).collect();
        v.sort_unstable();
        v.into_iter().map(|(_, r)| r).collect()
    };
    let mine: Vec<(usize, usize)> = a
        .plan
        .micros
        .iter()
        .filter(|m| m.teacher_rank == Some(a.rank))
        .map(|m| (m.micro, student_rank_of[m.student_rank]))
        .collect();
    let served: BTreeSet<usize> = mine.iter().map(|&(_, s)| s).collect();
    let lookahead = ctx.opts.teacher_lookahead_steps.max(1);
    // One credit per student per finished step.
    let take_credits = |n: u64| -> Result<(), RoleError> {
        for _ in 0..n {
            for &s in &served {
                let credit = mesh.recv(s).map_err(RoleError::lost)?;
                if credit != super::student::CREDIT {
                    return Err(RoleError::Lost(format!("student rank {s} sent {} bytes where a step credit was due", credit.len())));
                }
            }
        }
        Ok(())
    };

    let mut credited = a.start_step;
    for step in a.start_step..a.total_steps {
        ctx.check()?;
        if ctx.terminating() {
            return Ok(RoleEnd::Terminated);
        }
        if step >= credited + lookahead {
            take_credits(1)?;
            credited += 1;
        }
        let _step_span = tracing::info_span!(target: PHASE_TARGET, "step", step = step + 1, role = "teacher", rank = a.rank).entered();
        let batches: Vec<_> = tracing::info_span!(target: PHASE_TARGET, "data").in_scope(|| (0..g).map(|_| stream.next_batch()).collect());
        for &(k, to) in &mine {
            let db = DeviceBatch::new(&batches[k], &device)?;
            let h = tracing::info_span!(target: PHASE_TARGET, "teacher_forward").in_scope(|| teacher_hidden(&teacher, model, &db))?;
            let h = h.expect("a teacher model always gives hidden states");
            if let Some(spec) = &topk {
                let rows = teacher_topk(&h, model.lm_head(), model.cfg.final_logit_softcapping, &db.labels, spec)?;
                let _s = tracing::info_span!(target: PHASE_TARGET, "transfer").entered();
                // A few bytes per token: the TCP mesh carries them even between GPUs.
                mesh.send(to, &wire::encode_topk(&rows)).map_err(RoleError::lost)?;
                continue;
            }
            let _s = tracing::info_span!(target: PHASE_TARGET, "transfer").entered();
            match &nccl {
                Some(n) => n.send_hidden(to, &h)?,
                None => mesh.send(to, &wire::encode(&h)?).map_err(RoleError::lost)?,
            }
        }
        ctx.session.shared.step.store(step + 1, Ordering::SeqCst);
    }
    // Stay connected until every student finished its last step: closing earlier would
    // break the connections they still send their credits on.
    take_credits(a.total_steps - credited)?;
    Ok(RoleEnd::Finished)
}
