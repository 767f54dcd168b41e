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

use candle_core::{DType, Device, Tensor};
use qdistill_common::data::Batch;
use qdistill_common::lora::{LoraGrads, LoraParams};
use qdistill_common::loss::{fused_linear_distill, KdLoss, LossConfig, TeacherOutput, IGNORE_INDEX};
use qdistill_common::model::decoder::StepCtx;
use qdistill_common::model::Model;
#[cfg(feature = "cuda")]
use qdistill_common::optim::clip_coef;
use qdistill_common::optim::{clip_grad_norm, grad_norm, AdamW};
use qdistill_common::teacher_cache::{TopKRows, ValueDtype};
use qdistill_common::{Error, Result};

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

/// The teacher's LM head and final soft-cap (the student's own for LwF); None for SFT.
pub fn teacher_head<'a>(teacher: &'a Teacher, student: &'a Model) -> Option<(&'a Tensor, Option<f64>)> {
    match teacher {
        Teacher::Model(m) => Some((m.lm_head(), m.cfg.final_logit_softcapping)),
        Teacher::Lwf => Some((student.lm_head(), student.cfg.final_logit_softcapping)),
        Teacher::None => None,
    }
}

/// How a top-K teacher output is taken: `teacher.output = "topk:K"` at the training
/// temperature, over the first `vocab` logits (min of the student's and teacher's
/// vocabularies, as the full-distribution loss does), rounded to `dtype`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TopKSpec {
    pub k: usize,
    pub temperature: f64,
    pub vocab: usize,
    pub dtype: ValueDtype,
    /// Rows of the teacher LM head per matmul: bounds the `[chunk, V]` logits.
    pub chunk_tokens: usize,
}

/// The teacher's top-K log-probabilities at the supervised tokens (label ≠ -100) of a
/// micro-batch, from its final hidden states `h_t` `[N, d]` (or `[B, T, d]`) and LM head:
/// log_softmax(softcap(h·Wᵀ)[:vocab] / T), the same numbers the full-distribution loss
/// forms, then the K largest per token and rounding to `spec.dtype`.
pub fn teacher_topk(h_t: &Tensor, lm_head: &Tensor, softcap: Option<f64>, labels: &[i64], spec: &TopKSpec) -> Result<TopKRows> {
    let d = h_t.dim(candle_core::D::Minus1)?;
    let h = h_t.reshape((h_t.elem_count() / d, d))?;
    if h.dim(0)? != labels.len() {
        return Err(Error::Msg(format!("teacher top-K: {} hidden rows for {} labels", h.dim(0)?, labels.len())));
    }
    let vt = lm_head.dim(0)?;
    if spec.vocab > vt || spec.k > spec.vocab {
        return Err(Error::Mismatch(format!(
            "teacher top-K: K = {} over a vocabulary of {} entries, but the teacher's LM head has {vt} rows",
            spec.k, spec.vocab
        )));
    }
    let rows: Vec<u32> = labels.iter().enumerate().filter(|(_, &l)| l != IGNORE_INDEX).map(|(i, _)| i as u32).collect();
    let mut out = TopKRows { k: spec.k, logprobs: Vec::with_capacity(rows.len() * spec.k), indices: Vec::with_capacity(rows.len() * spec.k) };
    let w_t = lm_head.t()?;
    for chunk in rows.chunks(spec.chunk_tokens.max(1)) {
        let ids = Tensor::new(chunk, h.device())?;
        let mut z = h.index_select(&ids, 0)?.matmul(&w_t)?.to_dtype(DType::F32)?;
        if let Some(cap) = softcap {
            z = ((z / cap)?.tanh()? * cap)?;
        }
        let u = (z.narrow(1, 0, spec.vocab)? / spec.temperature)?;
        let max = u.max_keepdim(1)?;
        let shifted = u.broadcast_sub(&max)?;
        let lse = shifted.exp()?.sum_keepdim(1)?.log()?;
        let logp: Vec<f32> = shifted.broadcast_sub(&lse)?.flatten_all()?.to_vec1()?;
        let top = TopKRows::select(&logp, spec.vocab, spec.k)?;
        out.logprobs.extend(top.logprobs);
        out.indices.extend(top.indices);
    }
    spec.dtype.round(&mut out.logprobs);
    Ok(out)
}

/// Top-K teacher outputs of a micro-batch on the device, `[N, K]` over all its tokens, as
/// the loss's `TeacherOutput::TopK` takes them.
pub struct TopKBatch {
    pub logprobs: Tensor,
    pub indices: Tensor,
}

impl TopKBatch {
    pub fn new(rows: &TopKRows, batch: &DeviceBatch, device: &Device) -> Result<Self> {
        let (lp, ix) = rows.expand(&batch.labels)?;
        let n = batch.labels.len();
        Ok(TopKBatch { logprobs: Tensor::from_vec(lp, (n, rows.k), device)?, indices: Tensor::from_vec(ix, (n, rows.k), device)? })
    }
}

/// What the loss gets from the teacher for one micro-batch.
pub enum TeacherBatch {
    /// Final hidden states of a live teacher (None for SFT); the LM head is applied in the loss.
    Hidden(Option<Tensor>),
    /// Top-K log-probabilities, live or from a cache.
    TopK(TopKBatch),
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
        self.micro_step_from(batch, teacher, StepTeacher::Hidden(h_t), grad_scale, dropout_seed)
    }

    /// `micro_step` with the teacher's outputs in either form.
    pub fn micro_step_with(
        &mut self,
        batch: &DeviceBatch,
        teacher: &Teacher,
        t: &TeacherBatch,
        grad_scale: f64,
        dropout_seed: u64,
    ) -> Result<LossSums> {
        let st = match t {
            TeacherBatch::Hidden(h) => StepTeacher::Hidden(h.as_ref()),
            TeacherBatch::TopK(b) => StepTeacher::TopK(b),
        };
        self.micro_step_from(batch, teacher, st, grad_scale, dropout_seed)
    }

    fn micro_step_from(
        &mut self,
        batch: &DeviceBatch,
        teacher: &Teacher,
        t: StepTeacher<'_>,
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
            match t {
                StepTeacher::Hidden(h_t) => teacher_output(teacher, &self.model, h_t),
                StepTeacher::TopK(b) => TeacherOutput::TopK { logprobs: &b.logprobs, indices: &b.indices },
            },
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

enum StepTeacher<'a> {
    Hidden(Option<&'a Tensor>),
    TopK(&'a TopKBatch),
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

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// `teacher_topk` against a naive f64 computation written here: logits h·Wᵀ,
    /// soft-capped, cut to the KD vocabulary, divided by T, log-softmax, full sort.
    #[test]
    fn teacher_topk_matches_a_naive_f64_reference() {
        let mut rng = ChaCha8Rng::seed_from_u64(17);
        let (n, d, vt, vocab, k, t, cap) = (7usize, 8usize, 20usize, 17usize, 4usize, 1.7f64, 5.0f64);
        let h: Vec<f32> = (0..n * d).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        let w: Vec<f32> = (0..vt * d).map(|_| rng.random_range(-1.5f32..1.5)).collect();
        let labels = [3, IGNORE_INDEX, 5, 9, IGNORE_INDEX, 1, 0];
        let ht = Tensor::from_vec(h.clone(), (n, d), &Device::Cpu).unwrap();
        let wt = Tensor::from_vec(w.clone(), (vt, d), &Device::Cpu).unwrap();
        let spec = TopKSpec { k, temperature: t, vocab, dtype: ValueDtype::F32, chunk_tokens: 2 };
        let got = teacher_topk(&ht, &wt, Some(cap), &labels, &spec).unwrap();
        let mut row = 0;
        for (i, &l) in labels.iter().enumerate() {
            if l == IGNORE_INDEX {
                continue;
            }
            let z: Vec<f64> = (0..vocab)
                .map(|v| {
                    let dot: f64 = (0..d).map(|j| h[i * d + j] as f64 * w[v * d + j] as f64).sum();
                    cap * (dot / cap).tanh() / t
                })
                .collect();
            let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + z.iter().map(|x| (x - m).exp()).sum::<f64>().ln();
            let mut all: Vec<(f64, u32)> = z.iter().enumerate().map(|(v, x)| (x - lse, v as u32)).collect();
            all.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap());
            for j in 0..k {
                assert_eq!(got.indices[row * k + j], all[j].1, "token {i}, rank {j}");
                let g = got.logprobs[row * k + j] as f64;
                assert!((g - all[j].0).abs() < 1e-5, "token {i}, rank {j}: {g} vs {}", all[j].0);
            }
            row += 1;
        }
        assert_eq!(got.n_rows(), 5);
        // float16 storage: the same entries, each within half an f16 ulp of the f32 value.
        let half = teacher_topk(&ht, &wt, Some(cap), &labels, &TopKSpec { dtype: ValueDtype::F16, ..spec }).unwrap();
        assert_eq!(half.indices, got.indices);
        for (a, b) in half.logprobs.iter().zip(&got.logprobs) {
            assert!((a - b).abs() <= b.abs() * 2f32.powi(-11) + 1e-7, "{a} vs {b}");
        }
    }
}
