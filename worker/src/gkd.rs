//! On-policy distillation, as TRL's `GKDTrainer` ("On-Policy Distillation of Language
//! Models", Agarwal et al. 2024): with probability `lmbda` per micro-batch the student
//! samples completions for the batch's prompts, the sequences become prompt + generated
//! tokens, and the teacher scores them; the loss (`distill.loss`, TRL uses the generalized
//! JSD with `beta`) covers the generated tokens only. With `seq_kd` the other micro-batches
//! get teacher-generated completions instead of the dataset's.
//!
//! As in TRL: sampling is plain temperature sampling (`top_k` = 0, `top_p` = 1); a
//! completion ends after its first stop token, which is kept and trained on, or after
//! `max_new_tokens` tokens; the prompt is everything before the sample's last completion
//! (TRL's chat collator's prompt is all messages but the last). Different from TRL: the
//! coin and the sampler are seeded per (seed, step, micro-batch), so a run and its resumed
//! continuation draw the same completions, and the loss is normalised by the target tokens
//! actually trained (TRL divides by the dataset batch's count from before generation).

use qdistill_common::chat_template::ChatTemplate;
use qdistill_common::config::TrainConfig;
use qdistill_common::data::Batch;
use qdistill_common::generate::{stop_tokens, GenerateOptions, LogitsProcessor, SamplingParams, Session, StopReason};
use qdistill_common::lora::LoraTensors;
use qdistill_common::loss::IGNORE_INDEX;
use qdistill_common::model::Model;
use qdistill_common::tokenizer::TokenizerInfo;
use qdistill_common::{Error, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::trainer::{dropout_seed, Student, Teacher};

/// Where a micro-batch's completions come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completions {
    /// The data set's own (off-policy).
    Dataset,
    /// Sampled from the student with its current adapters (on-policy).
    Student,
    /// Sampled from the teacher (sequence-level KD).
    Teacher,
}

/// The `distill` keys of on-policy distillation, with what generation needs from the
/// tokenizer.
#[derive(Debug, Clone, PartialEq)]
pub struct GkdSettings {
    pub lmbda: f64,
    pub seq_kd: bool,
    pub max_new_tokens: usize,
    /// Sampling temperature (TRL's `GKDConfig.temperature`); 0 = greedy.
    pub temperature: f64,
    /// EOS and the chat template's end-of-turn token (TRL: the generation config's
    /// `eos_token_id`, which chat models set to both).
    pub stop_tokens: Vec<u32>,
    pub pad_id: u32,
    pub seed: u64,
}

impl GkdSettings {
    /// None when nothing is generated (`lmbda` = 0 and no `seq_kd`): training is then the
    /// plain off-policy run, untouched.
    pub fn from_config(cfg: &TrainConfig, tok: &TokenizerInfo) -> Result<Option<Self>> {
        let d = &cfg.distill;
        if d.lmbda == 0.0 && !d.seq_kd {
            return Ok(None);
        }
        let template = ChatTemplate::from_tokenizer(tok)?;
        Ok(Some(GkdSettings {
            lmbda: d.lmbda,
            seq_kd: d.seq_kd,
            max_new_tokens: d.max_new_tokens,
            temperature: d.generation_temperature,
            stop_tokens: stop_tokens(tok, template.as_ref())?,
            pad_id: tok.pad_id,
            seed: cfg.seed,
        }))
    }

    /// Seed of micro-batch `micro` of optimizer step `step`: kept apart from the dropout
    /// seeds of the same micro-batch.
    fn micro_seed(&self, step: u64, micro: u64) -> u64 {
        dropout_seed(self.seed ^ 0x6A09_E667_F3BC_C908, step, micro)
    }

    /// TRL's per-micro-batch coin: on-policy with probability `lmbda`, else teacher
    /// completions with `seq_kd`, else the data set's.
    pub fn choose(&self, step: u64, micro: u64) -> Completions {
        let u: f64 = ChaCha8Rng::seed_from_u64(self.micro_seed(step, micro)).random();
        if u < self.lmbda {
            Completions::Student
        } else if self.seq_kd {
            Completions::Teacher
        } else {
            Completions::Dataset
        }
    }

    /// TRL's generation config: `do_sample`, `top_k` = 0, `top_p` = 1 at `temperature`.
    pub fn sampling(&self, step: u64, micro: u64) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: self.micro_seed(step, micro).wrapping_add(1),
        }
    }
}

/// Each row's prompt: the tokens before the row's last completion span (its last run of
/// supervised labels). Labels are shifted, so the span's first target is predicted at the
/// prompt's last position. Rows must hold one sample each (no packing).
pub fn prompts(b: &Batch) -> Result<Vec<Vec<u32>>> {
    let mut out = Vec::with_capacity(b.batch);
    for r in 0..b.batch {
        let at = r * b.seq_len;
        let labels = &b.labels[at..at + b.seq_len];
        if b.segment_ids[at..at + b.seq_len].iter().any(|&s| s > 1) {
            return Err(Error::Data(format!("on-policy distillation: row {r} packs several samples; set data.packing = false")));
        }
        let last = labels.iter().rposition(|&l| l != IGNORE_INDEX).ok_or_else(|| {
            Error::Data(format!("on-policy distillation: row {r} has no supervised token, so no prompt/completion split"))
        })?;
        let mut start = last;
        while start > 0 && labels[start - 1] != IGNORE_INDEX {
            start -= 1;
        }
        out.push(b.input_ids[at..at + start + 1].to_vec());
    }
    Ok(out)
}

/// Samples one completion per prompt from `model` (with `lora`, or the bare base), one
/// prompt after another from the one `sampler` stream. A completion that ended on a stop
/// token keeps it, as TRL's completion mask does.
pub fn generate(
    model: &Model,
    lora: Option<LoraTensors>,
    prompts: &[Vec<u32>],
    settings: &GkdSettings,
    sampler: &mut LogitsProcessor,
) -> Result<Vec<Vec<u32>>> {
    let opts = GenerateOptions { max_new_tokens: settings.max_new_tokens, stop_tokens: settings.stop_tokens.clone() };
    let mut session = Session::new(model, lora);
    let mut out = Vec::with_capacity(prompts.len());
    for p in prompts {
        // Each prompt from an empty cache, so a completion does not depend on its neighbours.
        session.reset();
        let g = session.generate(p, &opts, sampler, |_| Ok(()))?;
        let mut tokens = g.tokens;
        if let StopReason::StopToken(t) = g.stop {
            tokens.push(t);
        }
        out.push(tokens);
    }
    Ok(out)
}

/// TRL's `generate_on_policy_outputs` for rows of one sample: each row is its prompt
/// followed by its completion, right-padded; labels (shifted, as everywhere here) cover
/// the completion tokens only; positions count from 0 and the real tokens are segment 1.
pub fn completion_batch(prompts: &[Vec<u32>], completions: &[Vec<u32>], pad_id: u32) -> Batch {
    let seq_len = prompts.iter().zip(completions).map(|(p, c)| p.len() + c.len()).max().unwrap_or(0).max(2);
    let n = prompts.len() * seq_len;
    let mut b = Batch {
        input_ids: vec![pad_id; n],
        labels: vec![IGNORE_INDEX; n],
        position_ids: vec![0; n],
        segment_ids: vec![0; n],
        batch: prompts.len(),
        seq_len,
        n_target_tokens: 0,
        sample_ids: Vec::new(),
    };
    for (r, (p, c)) in prompts.iter().zip(completions).enumerate() {
        let at = r * seq_len;
        let len = p.len() + c.len();
        b.input_ids[at..at + p.len()].copy_from_slice(p);
        b.input_ids[at + p.len()..at + len].copy_from_slice(c);
        for t in 0..len {
            b.position_ids[at + t] = t as u32;
            b.segment_ids[at + t] = 1;
        }
        // Position t predicts token t + 1: targets run from the last prompt position.
        for (j, &tok) in c.iter().enumerate() {
            b.labels[at + p.len() - 1 + j] = tok as i64;
        }
    }
    b.n_target_tokens = b.labels.iter().filter(|&&l| l != IGNORE_INDEX).count();
    b
}

/// The micro-batch `step`/`micro` trains on: `b` itself, or its prompts with completions
/// from the student (current adapters) or the teacher, as the coin decides.
pub fn micro_batch(
    settings: &GkdSettings,
    student: &Student,
    teacher: &Teacher,
    b: &Batch,
    step: u64,
    micro: u64,
) -> Result<(Batch, Completions)> {
    let which = settings.choose(step, micro);
    let (model, lora) = match (which, teacher) {
        (Completions::Dataset, _) => return Ok((b.clone(), which)),
        (Completions::Student, _) => {
            // Generation runs in the compute dtype on the student's device, as training does.
            let lora = student.params.to_device(student.model.device(), student.model.dtype())?;
            (&student.model, Some(lora))
        }
        (Completions::Teacher, Teacher::Model(m)) => (m, None),
        (Completions::Teacher, Teacher::Lwf) => (&student.model, None),
        (Completions::Teacher, Teacher::None) => {
            return Err(Error::Config("distill.seq_kd needs a teacher to generate completions".into()))
        }
    };
    let prompts = prompts(b)?;
    let mut sampler = LogitsProcessor::new(settings.sampling(step, micro))?;
    let completions = generate(model, lora, &prompts, settings, &mut sampler)?;
    Ok((completion_batch(&prompts, &completions, settings.pad_id), which))
}

#[cfg(test)]
mod tests {
    use super::*;
    use qdistill_common::data::{Batch, Row, Sample};

    /// A hand-built prompt/completion case: the generated batch's labels are exactly the
    /// completion tokens (stop token included), shifted one to the left, and nothing else.
    #[test]
    fn completion_batch_supervises_generated_tokens_only() {
        let prompts = vec![vec![10, 11, 12], vec![20]];
        let completions = vec![vec![13, 2], vec![21, 22, 23, 24]];
        let b = completion_batch(&prompts, &completions, 0);
        assert_eq!((b.batch, b.seq_len), (2, 5));
        let m = IGNORE_INDEX;
        assert_eq!(b.input_ids, vec![10, 11, 12, 13, 2, /**/ 20, 21, 22, 23, 24]);
        assert_eq!(b.labels, vec![m, m, 13, 2, m, /**/ 21, 22, 23, 24, m]);
        assert_eq!(b.position_ids, vec![0, 1, 2, 3, 4, /**/ 0, 1, 2, 3, 4]);
        assert_eq!(b.segment_ids, vec![1, 1, 1, 1, 1, /**/ 1, 1, 1, 1, 1]);
        assert_eq!(b.n_target_tokens, 6);
        // Shorter rows are right-padded with pad, label -100, segment 0.
        let b = completion_batch(&[vec![5, 6], vec![7]], &[vec![8], vec![]], 99);
        assert_eq!(b.input_ids, vec![5, 6, 8, 7, 99, 99]);
        assert_eq!(b.labels, vec![m, 8, m, m, m, m]);
        assert_eq!(b.segment_ids, vec![1, 1, 1, 1, 0, 0]);
    }

    /// Prompts are the tokens before each row's last completion, from a batch built the
    /// way the data pipeline builds one (labels shifted by `Row::push`).
    #[test]
    fn prompts_are_the_tokens_before_the_last_completion() {
        let m = IGNORE_INDEX;
        // Two turns: the first answer (4, 5) stays in the prompt, the second (8, 9) is the
        // completion. Sample labels are unshifted: labels[t] is token t's own target.
        let two_turns = Sample { input_ids: vec![1, 2, 3, 4, 5, 6, 7, 8, 9], labels: vec![m, m, m, 4, 5, m, m, 8, 9] };
        let one_turn = Sample { input_ids: vec![1, 30, 31, 32], labels: vec![m, m, 31, 32] };
        let mut rows = vec![Row::default(), Row::default()];
        rows[0].push(0, &two_turns);
        rows[1].push(1, &one_turn);
        let b = Batch::from_rows(&rows, 9, 0);
        assert_eq!(prompts(&b).unwrap(), vec![vec![1, 2, 3, 4, 5, 6, 7], vec![1, 30]]);
        let mut packed = Row::default();
        packed.push(0, &one_turn);
        packed.push(1, &one_turn);
        let e = prompts(&Batch::from_rows(&[packed], 8, 0)).unwrap_err().to_string();
        assert!(e.contains("packing"), "{e}");
    }

    #[test]
    fn coin_follows_lmbda_and_seq_kd() {
        let mut s = GkdSettings { lmbda: 0.0, seq_kd: false, max_new_tokens: 4, temperature: 1.0, stop_tokens: vec![2], pad_id: 0, seed: 3 };
        let draws = |s: &GkdSettings| (0..400u64).map(|i| s.choose(i / 4, i % 4)).collect::<Vec<_>>();
        assert!(draws(&s).iter().all(|&c| c == Completions::Dataset));
        s.lmbda = 1.0;
        assert!(draws(&s).iter().all(|&c| c == Completions::Student));
        s.lmbda = 0.25;
        s.seq_kd = true;
        let d = draws(&s);
        let on = d.iter().filter(|&&c| c == Completions::Student).count();
        // Binomial(400, 0.25): mean 100, sd 8.7; ±40 is beyond 4.5 sd.
        assert!((60..=140).contains(&on), "{on} of 400 on-policy at lmbda = 0.25");
        assert!(d.iter().all(|&c| c != Completions::Dataset), "seq_kd replaces every off-policy batch");
        assert_eq!(d, draws(&s), "the coin is a pure function of (seed, step, micro)");
    }
}
