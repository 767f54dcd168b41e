//! The student and teacher roles of one training step, and the embedded single-process
//! run that drives them (what `qdistill train` runs on one machine).
//!
//! One optimizer step = `gradient_accumulation_steps` microbatches. For each: the teacher
//! computes its final hidden states (or nothing, for SFT), the student runs its
//! hand-written forward, the fused LM-head loss returns dL/dh, and the student's backward
//! accumulates adapter gradients into one flat buffer. Gradients are normalised by the
//! number of target tokens in the whole accumulated batch, so accumulation is exactly
//! equivalent to one large batch.
//!
//! On a CUDA device the adapters (fp32 master and compute-dtype copy), their gradients and
//! the AdamW moments move to the device at the first microbatch and stay there: the
//! backward accumulates into the device gradient buffer, and the optimizer step (norm,
//! clipping, AdamW, refresh of the compute copy) runs there, reading back only the norm.

use std::time::Instant;

use candle_core::{Device, Tensor};
use qdistill_common::data::Batch;
use qdistill_common::lora::{LoraGrads, LoraParams};
use qdistill_common::loss::{fused_linear_distill, KdLoss, LossConfig, TeacherOutput};
use qdistill_common::model::decoder::StepCtx;
use qdistill_common::model::Model;
#[cfg(feature = "cuda")]
use qdistill_common::optim::clip_coef;
use qdistill_common::optim::{clip_grad_norm, grad_norm, AdamW};
use qdistill_common::Result;

/// Where the teacher's outputs come from.
pub enum Teacher {
    /// A separate model (same tokenizer).
    Model(Model),
    /// Learning without Forgetting: the student's own frozen base, adapters off.
    Lwf,
    /// Plain SFT.
    None,
}

/// Batch tensors on the device.
pub struct DeviceBatch {
    pub ids: Tensor,
    pub position_ids: Tensor,
    pub segment_ids: Option<Tensor>,
    pub labels: Vec<i64>,
    pub n_target: usize,
    /// Real (non-padding) tokens.
    pub n_tokens: usize,
}

impl DeviceBatch {
    pub fn new(b: &Batch, device: &Device) -> Result<Self> {
        let shape = (b.batch, b.seq_len);
        // Unpacked rows hold one sample (segment 1) and right padding (segment 0), which
        // causal attention already keeps out of real tokens' view: no segment mask needed.
        let packed = b.segment_ids.iter().any(|&s| s > 1);
        Ok(Self {
            ids: Tensor::from_slice(&b.input_ids, shape, device)?,
            position_ids: Tensor::from_slice(&b.position_ids, shape, device)?,
            segment_ids: if packed { Some(Tensor::from_slice(&b.segment_ids, shape, device)?) } else { None },
            labels: b.labels.clone(),
            n_target: b.n_target_tokens,
            // Padding sits in segment 0; real tokens are in segments 1.. (packed or not).
            n_tokens: b.segment_ids.iter().filter(|&&s| s != 0).count(),
        })
    }
}

/// Loss sums of one or more microbatches.
#[derive(Debug, Clone, Copy, Default)]
pub struct LossSums {
    pub ce: f64,
    pub kd: f64,
    pub tokens: usize,
}

impl LossSums {
    pub fn add(&mut self, o: &LossSums) {
        self.ce += o.ce;
        self.kd += o.kd;
        self.tokens += o.tokens;
    }
    pub fn ce_mean(&self) -> f64 {
        self.ce / self.tokens.max(1) as f64
    }
    pub fn kd_mean(&self) -> f64 {
        self.kd / self.tokens.max(1) as f64
    }
}

/// The teacher's final hidden states for a batch (None for SFT).
pub fn teacher_hidden(teacher: &Teacher, student: &Model, batch: &DeviceBatch) -> Result<Option<Tensor>> {
    let ctx = StepCtx { position_ids: &batch.position_ids, segment_ids: batch.segment_ids.as_ref(), lora: None, dropout_seed: None };
    Ok(match teacher {
        Teacher::Model(m) if !m.device().same_device(batch.ids.device()) => {
            // The teacher has its own GPU: its inputs go there, its hidden states come back.
            let dev = m.device();
            let (ids, pos) = (batch.ids.to_device(dev)?, batch.position_ids.to_device(dev)?);
            let seg = batch.segment_ids.as_ref().map(|s| s.to_device(dev)).transpose()?;
            let ctx = StepCtx { position_ids: &pos, segment_ids: seg.as_ref(), lora: None, dropout_seed: None };
            Some(m.forward_hidden(&ids, &ctx)?.to_device(batch.ids.device())?)
        }
        Teacher::Model(m) => Some(m.forward_hidden(&batch.ids, &ctx)?),
        Teacher::Lwf => Some(student.forward_hidden(&batch.ids, &ctx)?),
        Teacher::None => None,
    })
}

fn teacher_output<'a>(teacher: &'a Teacher, student: &'a Model, h_t: Option<&'a Tensor>) -> TeacherOutput<'a> {
    match (teacher, h_t) {
        (Teacher::Model(m), Some(h)) => TeacherOutput::Hidden { h, lm_head: m.lm_head(), softcap: m.cfg.final_logit_softcapping },
        (Teacher::Lwf, Some(h)) => {
            TeacherOutput::Hidden { h, lm_head: student.lm_head(), softcap: student.cfg.final_logit_softcapping }
        }
        _ => TeacherOutput::None,
    }
}

/// The student role: model, adapters, gradients, optimizer.
pub struct Student {
    pub model: Model,
    pub params: LoraParams,
    pub grads: LoraGrads,
    pub opt: AdamW,
    pub loss: LossConfig,
    pub checkpointing: bool,
}

impl Student {
    /// Forward + backward of one microbatch; gradients scaled by `grad_scale`
    /// (1 / target tokens of the accumulated batch).
    pub fn micro_step(
        &mut self,
        batch: &DeviceBatch,
        teacher: &Teacher,
        h_t: Option<&Tensor>,
        grad_scale: f64,
        dropout_seed: u64,
    ) -> Result<LossSums> {
        self.keep_on_device()?;
        let lora = self.params.to_device(self.model.device(), self.model.dtype())?;
        let ctx = StepCtx {
            position_ids: &batch.position_ids,
            segment_ids: batch.segment_ids.as_ref(),
            lora: Some(&lora),
            dropout_seed: Some(dropout_seed),
        };
        let (h, saved) = self.model.forward_train(&batch.ids, &ctx, self.checkpointing)?;
        let out = fused_linear_distill(
            &h,
            self.model.lm_head(),
            &batch.labels,
            teacher_output(teacher, &self.model, h_t),
            &self.loss,
            grad_scale,
        )?;
        self.model.backward(&out.dh, saved, &ctx, &self.params, &mut self.grads)?;
        Ok(LossSums { ce: out.ce_sum, kd: out.kd_sum, tokens: out.n_tokens })
    }

    /// On a CUDA device, moves adapters, gradients and optimizer moments there (once, so
    /// that no step copies them again); a no-op on the CPU and once resident. Checkpoint
    /// loads before or after this land in the right place either way.
    pub fn keep_on_device(&mut self) -> Result<()> {
        let device = self.model.device().clone();
        if device.is_cpu() || self.grads.is_resident() {
            return Ok(());
        }
        self.params.make_resident(&device, self.model.dtype())?;
        self.opt.make_resident(&device)?;
        self.grads.make_resident(&device)
    }

    /// Clip, step, zero. Returns the pre-clip gradient norm. A non-finite norm skips the
    /// update (as HF's AMP path does) rather than writing NaNs into the adapters.
    pub fn optimizer_step(&mut self, lr: f64, max_grad_norm: f64) -> Result<f64> {
        #[cfg(feature = "cuda")]
        if self.grads.is_resident() {
            return self.optimizer_step_on_device(lr, max_grad_norm);
        }
        let norm = if max_grad_norm > 0.0 { clip_grad_norm(&mut self.grads.flat, max_grad_norm) } else { grad_norm(&self.grads.flat) };
        if norm.is_finite() {
            self.opt.step(&mut self.params.values, &self.grads.flat, lr)?;
        } else {
            tracing::warn!(norm, "non-finite gradient norm: optimizer step skipped");
        }
        self.grads.zero()?;
        Ok(norm)
    }

    /// `optimizer_step` with everything on the device: the norm is the one value read
    /// back; clipping is a factor the AdamW kernel applies as it reads each gradient (the
    /// same f32 product as the host's in-place scaling).
    #[cfg(feature = "cuda")]
    fn optimizer_step_on_device(&mut self, lr: f64, max_grad_norm: f64) -> Result<f64> {
        let norm = self.grads.norm()?;
        if norm.is_finite() {
            let grad_scale = if max_grad_norm > 0.0 { clip_coef(norm, max_grad_norm) } else { 1.0 };
            let (opt, grads) = (&mut self.opt, &self.grads);
            self.params.update_on_device(|p| opt.step_cuda(p, grads.cuda_slice()?, lr, grad_scale))?;
        } else {
            tracing::warn!(norm, "non-finite gradient norm: optimizer step skipped");
        }
        self.grads.zero()?;
        Ok(norm)
    }

    /// CE and KL(teacher ‖ student) at T = 1 over `batches`, adapters on; the metric the
    /// quick start shows falling. No dropout, no gradients kept.
    pub fn evaluate(&self, batches: &[DeviceBatch], teacher: &Teacher) -> Result<LossSums> {
        let lora = self.params.to_device(self.model.device(), self.model.dtype())?;
        let cfg = LossConfig { ce_weight: 1.0, kd_weight: 1.0, kd: KdLoss::ForwardKl, temperature: 1.0, ..self.loss.clone() };
        let mut sums = LossSums::default();
        for b in batches {
            let h_t = teacher_hidden(teacher, &self.model, b)?;
            let ctx = StepCtx { position_ids: &b.position_ids, segment_ids: b.segment_ids.as_ref(), lora: Some(&lora), dropout_seed: None };
            let h = self.model.forward_hidden(&b.ids, &ctx)?;
            let out = fused_linear_distill(&h, self.model.lm_head(), &b.labels, teacher_output(teacher, &self.model, h_t.as_ref()), &cfg, 1.0)?;
            sums.add(&LossSums { ce: out.ce_sum, kd: out.kd_sum, tokens: out.n_tokens });
        }
        Ok(sums)
    }
}

/// Seed for one microbatch's dropout masks: a pure function of (run seed, step, micro) so
/// that a resumed run draws the same masks.
pub fn dropout_seed(seed: u64, step: u64, micro: u64) -> u64 {
    seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ step.wrapping_mul(0xD1B5_4A32_D192_ED03) ^ micro.wrapping_add(1).wrapping_mul(0xABCD_EF12_3456_789B)
}

/// Elapsed-time helper for tokens/s.
pub struct Throughput {
    start: Instant,
    tokens: u64,
}

impl Throughput {
    pub fn new() -> Self {
        Self { start: Instant::now(), tokens: 0 }
    }
    pub fn add(&mut self, n: usize) {
        self.tokens += n as u64;
    }
    pub fn tokens_per_sec(&self) -> f64 {
        self.tokens as f64 / self.start.elapsed().as_secs_f64().max(1e-9)
    }
}

impl Default for Throughput {
    fn default() -> Self {
        Self::new()
    }
}
