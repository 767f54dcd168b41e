//! `qdistill eval`: how well a model (optionally with an adapter) predicts held-out data —
//! perplexity over the trained tokens and KL(teacher ‖ model) at T = 1, computed as the
//! training run's evaluation computes them — and how it answers multiple-choice questions
//! by log-likelihood. With an adapter every number is also taken for the base alone, so
//! what the adapter gained and what it cost elsewhere (forgetting) sit side by side.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use serde::Serialize;
use serde_json::Value as Json;

use qdistill_common::chat_template::{ChatTemplate, Message};
use qdistill_common::config;
use qdistill_common::data::{self, BatchOptions, Batcher, DataFormat};
use qdistill_common::generate::{encode_prompt, KvCache};
use qdistill_common::lora::LoraTensors;
use qdistill_common::loss::{fused_linear_distill, KdLoss, LossConfig, TeacherOutput};
use qdistill_common::model::decoder::{token_logprobs, StepCtx};
use qdistill_common::model::Model;
use qdistill_common::tokenizer::{check_same_tokenizer, TokenizerInfo};
use qdistill_common::{Error, Result};

use crate::generate::{load_for_inference, ModelArgs};
use crate::models;
use crate::trainer::{teacher_hidden, DeviceBatch, LossSums, Teacher};

// ---------------------------------------------------------------------------------------
// Perplexity and KL

/// One pass over the samples of a data file, in batches of padded (unpacked) rows, read
/// and masked exactly as training reads it.
#[allow(clippy::too_many_arguments)]
pub fn eval_batches(
    path: &Path,
    format: DataFormat,
    tok: &TokenizerInfo,
    template: Option<&ChatTemplate>,
    max_seq_length: usize,
    max_samples: Option<usize>,
    batch_size: usize,
    device: &Device,
) -> Result<Vec<DeviceBatch>> {
    let opts = data::LoadOptions { format, skip_malformed: false, max_seq_length: Some(max_seq_length) };
    let (mut dataset, report) = data::load_dataset(path, &opts, tok, template)?;
    if let Some(n) = max_samples {
        dataset.samples.truncate(n);
    }
    tracing::info!(
        file = %path.display(), format = report.format.name(), records = report.records,
        dropped_no_target = report.dropped_no_target, truncated = report.truncated, "loaded eval data"
    );
    let opts = BatchOptions {
        batch_size,
        seq_len: max_seq_length,
        packing: false,
        // Rows of similar length waste less padding; the sums do not depend on the order.
        group_by_length: true,
        seed: 0,
        pad_id: tok.pad_id,
        eos_id: tok.eos_id,
    };
    let mut batcher = Batcher::new(Arc::new(dataset), opts)?;
    let mut out = Vec::new();
    while batcher.cursor().epoch == 0 {
        out.push(DeviceBatch::new(&batcher.next_batch(), device)?);
    }
    Ok(out)
}

/// CE over the trained tokens of `batches` and KL(teacher ‖ model) at T = 1, as
/// `Student::evaluate` computes them during training, with the adapter on (`lora`) or off.
/// With `Teacher::Lwf` the KL is to the model's own base.
pub fn loss_sums(model: &Model, lora: Option<&LoraTensors>, batches: &[DeviceBatch], teacher: &Teacher) -> Result<LossSums> {
    let cfg = LossConfig {
        ce_weight: 1.0,
        kd_weight: 1.0,
        kd: KdLoss::ForwardKl,
        temperature: 1.0,
        chunk_tokens: 1024,
        student_softcap: model.cfg.final_logit_softcapping,
    };
    let mut sums = LossSums::default();
    for b in batches {
        let h_t = teacher_hidden(teacher, model, b)?;
        let t_out = match (teacher, &h_t) {
            (Teacher::Model(t), Some(h)) => TeacherOutput::Hidden { h, lm_head: t.lm_head(), softcap: t.cfg.final_logit_softcapping },
            (Teacher::Lwf, Some(h)) => {
                TeacherOutput::Hidden { h, lm_head: model.lm_head(), softcap: model.cfg.final_logit_softcapping }
            }
            _ => TeacherOutput::None,
        };
        let ctx = StepCtx { position_ids: &b.position_ids, segment_ids: b.segment_ids.as_ref(), lora, dropout_seed: None };
        let h = model.forward_hidden(&b.ids, &ctx)?;
        let out = fused_linear_distill(&h, model.lm_head(), &b.labels, t_out, &cfg, 1.0)?;
        sums.add(&LossSums { ce: out.ce_sum, kd: out.kd_sum, tokens: out.n_tokens });
    }
    Ok(sums)
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LossMetrics {
    /// Trained (non-masked) tokens scored.
    pub tokens: usize,
    /// Mean cross-entropy per token, nats.
    pub ce: f64,
    /// exp(ce).
    pub perplexity: f64,
    /// Mean KL(teacher ‖ model) per token at T = 1, when there is a teacher.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kl_teacher: Option<f64>,
    /// Mean KL(base ‖ base + adapter) per token: how far the adapter moved the model.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kl_base: Option<f64>,
}

impl LossMetrics {
    fn new(s: &LossSums) -> Self {
        LossMetrics { tokens: s.tokens, ce: s.ce_mean(), perplexity: s.ce_mean().exp(), kl_teacher: None, kl_base: None }
    }
}

// ---------------------------------------------------------------------------------------
// Multiple choice

/// A multiple-choice question (MMLU, ARC, HellaSwag, Winogrande, … converted to
/// `{"question", "choices", "answer"}` JSONL).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct McQuestion {
    pub question: String,
    pub choices: Vec<String>,
    /// 0-based index of the right choice.
    pub answer: usize,
}

/// Reads a JSONL file of `{"question": str, "choices": [str, …], "answer": index or letter}`
/// (index 0-based; letter A for the first choice). A bad line is an error naming the file
/// and the 1-based line.
pub fn read_mc(path: &Path) -> Result<Vec<McQuestion>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let q = serde_json::from_str::<Json>(line)
            .map_err(|e| format!("invalid JSON: {e}"))
            .and_then(|v| parse_mc(&v))
            .map_err(|msg| Error::format(path, format!("line {}: {msg}", i + 1)))?;
        out.push(q);
    }
    if out.is_empty() {
        return Err(Error::format(path, "no multiple-choice question in the file"));
    }
    Ok(out)
}

fn parse_mc(v: &Json) -> std::result::Result<McQuestion, String> {
    let question = v.get("question").and_then(Json::as_str).ok_or("missing string `question`")?.to_string();
    let choices: Vec<String> = v
        .get("choices")
        .and_then(Json::as_array)
        .ok_or("missing array `choices`")?
        .iter()
        .enumerate()
        .map(|(k, c)| c.as_str().map(str::to_string).ok_or(format!("choices[{k}] is not a string")))
        .collect::<std::result::Result<_, _>>()?;
    if choices.len() < 2 {
        return Err(format!("`choices` has {} entries; a question needs at least 2", choices.len()));
    }
    let answer = match v.get("answer") {
        Some(Json::Number(n)) => n.as_u64().map(|a| a as usize).ok_or(format!("`answer` {n} is not a 0-based index"))?,
        Some(Json::String(s)) if s.len() == 1 && s.as_bytes()[0].is_ascii_alphabetic() => {
            (s.as_bytes()[0].to_ascii_uppercase() - b'A') as usize
        }
        Some(other) => return Err(format!("`answer` {other} must be a 0-based index or a letter (A = first choice)")),
        None => return Err("missing `answer`".into()),
    };
    if answer >= choices.len() {
        return Err(format!("`answer` points at choice {answer} of {}", choices.len()));
    }
    Ok(McQuestion { question, choices, answer })
}

/// A question as token ids, posed the way lm-evaluation-harness poses log-likelihood
/// requests: `context` is the question (as a user turn followed by the generation prompt
/// when there is a chat template; without one, the choice follows after a space), and each
/// continuation is the tokens of context + choice after the context's own tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct McRequest {
    pub context: Vec<u32>,
    pub continuations: Vec<Vec<u32>>,
    /// Characters of each continuation's text: the length-normalised score divides by them
    /// (lm-evaluation-harness's `acc_norm`).
    pub chars: Vec<usize>,
    pub answer: usize,
}

/// `max_len` bounds context + continuation; longer questions lose their start, as
/// lm-evaluation-harness truncates them.
pub fn mc_request(q: &McQuestion, tok: &TokenizerInfo, template: Option<&ChatTemplate>, max_len: usize) -> Result<McRequest> {
    let (context, sep) = match template {
        Some(t) => (t.render(&[Message::new("user", q.question.clone())], true)?, ""),
        None => (q.question.clone(), " "),
    };
    let mut ctx = encode_prompt(tok, &context)?;
    let mut continuations = Vec::with_capacity(q.choices.len());
    let mut chars = Vec::with_capacity(q.choices.len());
    for (k, choice) in q.choices.iter().enumerate() {
        let cont = format!("{sep}{choice}");
        let whole = encode_prompt(tok, &format!("{context}{cont}"))?;
        let ids = whole.get(ctx.len()..).unwrap_or_default().to_vec();
        if ids.is_empty() {
            return Err(Error::Data(format!("question {:?}: choice {k} ({choice:?}) has no tokens of its own", q.question)));
        }
        chars.push(cont.chars().count());
        continuations.push(ids);
    }
    let longest = continuations.iter().map(Vec::len).max().unwrap_or(0);
    if ctx.len() + longest > max_len {
        let cut = ctx.len() + longest - max_len;
        if cut >= ctx.len() {
            return Err(Error::Data(format!(
                "question {:?}: a choice of {longest} tokens leaves no room for the question within {max_len} tokens",
                q.question
            )));
        }
        ctx.drain(..cut);
    }
    Ok(McRequest { context: ctx, continuations, chars, answer: q.answer })
}

/// Σ log p(continuation | context) for each continuation: the context runs once into a KV
/// cache, each continuation then runs from a copy of that cache.
pub fn continuation_logprobs(model: &Model, lora: Option<&LoraTensors>, context: &[u32], continuations: &[Vec<u32>]) -> Result<Vec<f64>> {
    if context.is_empty() {
        return Err(Error::Data("a multiple-choice context has no tokens".into()));
    }
    let dev = model.device();
    let logits = |h: &Tensor| -> Result<Tensor> { Ok(model.logits(h)?.to_dtype(DType::F32)?) };
    let mut cache = KvCache::new(model);
    let h = model.forward_cached(&Tensor::from_slice(context, (1, context.len()), dev)?, &mut cache, lora)?;
    let next = logits(&h.narrow(0, context.len() - 1, 1)?)?;
    let mut out = Vec::with_capacity(continuations.len());
    for cont in continuations {
        let Some((&first, rest)) = cont.split_first() else {
            return Err(Error::Data("an empty multiple-choice continuation".into()));
        };
        let mut sum = token_logprobs(&next, &[first as i64])?[0] as f64;
        if !rest.is_empty() {
            let mut c = cache.clone();
            let feed = &cont[..cont.len() - 1];
            let h = model.forward_cached(&Tensor::from_slice(feed, (1, feed.len()), dev)?, &mut c, lora)?;
            let labels: Vec<i64> = rest.iter().map(|&t| t as i64).collect();
            sum += token_logprobs(&logits(&h)?, &labels)?.iter().map(|&x| x as f64).sum::<f64>();
        }
        out.push(sum);
    }
    Ok(out)
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct McMetrics {
    pub questions: usize,
    /// Right when the answer's summed log-probability is the highest.
    pub accuracy: f64,
    /// The same with each sum divided by the continuation's characters.
    pub accuracy_norm: f64,
}

/// The first index of the largest score.
fn best(scores: impl Iterator<Item = f64>) -> usize {
    scores.enumerate().fold((0, f64::NEG_INFINITY), |(bi, bs), (i, s)| if s > bs { (i, s) } else { (bi, bs) }).0
}

pub fn mc_metrics(model: &Model, lora: Option<&LoraTensors>, requests: &[McRequest]) -> Result<McMetrics> {
    let (mut right, mut right_norm) = (0usize, 0usize);
    for r in requests {
        let lp = continuation_logprobs(model, lora, &r.context, &r.continuations)?;
        right += usize::from(best(lp.iter().copied()) == r.answer);
        right_norm += usize::from(best(lp.iter().zip(&r.chars).map(|(s, &c)| s / c as f64)) == r.answer);
    }
    let n = requests.len().max(1) as f64;
    Ok(McMetrics { questions: requests.len(), accuracy: right as f64 / n, accuracy_norm: right_norm as f64 / n })
}

// ---------------------------------------------------------------------------------------
// The command

#[derive(Debug, Clone)]
pub struct EvalArgs {
    pub model: ModelArgs,
    /// A teacher (same tokenizer) for KL(teacher ‖ model).
    pub teacher: Option<String>,
    pub data: Option<PathBuf>,
    pub format: DataFormat,
    /// General data the adapter should not have hurt (read with the format detected).
    pub rehearsal: Option<PathBuf>,
    /// Multiple-choice questions (JSONL).
    pub mc: Option<PathBuf>,
    pub max_seq_length: usize,
    /// Score only the first N samples of --data and --rehearsal.
    pub max_samples: Option<usize>,
    pub batch_size: usize,
    pub chat_template: bool,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Metrics {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<LossMetrics>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rehearsal: Option<LossMetrics>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mc: Option<McMetrics>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EvalReport {
    pub model: String,
    pub adapter: Option<String>,
    pub teacher: Option<String>,
    /// The model alone (the base, when there is an adapter).
    pub base: Metrics,
    /// Base + adapter.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub adapted: Option<Metrics>,
}

type Getter = fn(&Metrics) -> Option<f64>;

fn rows() -> Vec<(&'static str, Getter)> {
    vec![
        ("data: CE (nats/token)", |m| m.data.map(|d| d.ce)),
        ("data: perplexity", |m| m.data.map(|d| d.perplexity)),
        ("data: KL(teacher‖model)", |m| m.data.and_then(|d| d.kl_teacher)),
        ("data: KL(base‖adapted)", |m| m.data.and_then(|d| d.kl_base)),
        ("rehearsal: CE (nats/token)", |m| m.rehearsal.map(|d| d.ce)),
        ("rehearsal: perplexity", |m| m.rehearsal.map(|d| d.perplexity)),
        ("rehearsal: KL(teacher‖model)", |m| m.rehearsal.and_then(|d| d.kl_teacher)),
        ("rehearsal: KL(base‖adapted)", |m| m.rehearsal.and_then(|d| d.kl_base)),
        ("mc: accuracy", |m| m.mc.map(|x| x.accuracy)),
        ("mc: accuracy (length-normalised)", |m| m.mc.map(|x| x.accuracy_norm)),
    ]
}

impl EvalReport {
    /// The metrics as a table; with an adapter: base, adapted and the change.
    pub fn table(&self) -> String {
        let mut s = format!("model: {}\n", self.model);
        if let Some(a) = &self.adapter {
            s.push_str(&format!("adapter: {a}\n"));
        }
        if let Some(t) = &self.teacher {
            s.push_str(&format!("teacher: {t}\n"));
        }
        for (name, d) in [("data", self.base.data), ("rehearsal", self.base.rehearsal)] {
            if let Some(d) = d {
                s.push_str(&format!("{name}: {} scored tokens\n", d.tokens));
            }
        }
        if let Some(mc) = self.base.mc {
            s.push_str(&format!("mc: {} questions\n", mc.questions));
        }
        let cell = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |x| format!("{x:.4}"));
        match &self.adapted {
            None => {
                s.push_str(&format!("{:<34} {:>10}\n", "metric", "value"));
                for (name, get) in rows() {
                    if let Some(v) = get(&self.base) {
                        s.push_str(&format!("{name:<34} {:>10}\n", cell(Some(v))));
                    }
                }
            }
            Some(adapted) => {
                s.push_str(&format!("{:<34} {:>10} {:>10} {:>10}\n", "metric", "base", "adapted", "change"));
                for (name, get) in rows() {
                    let (b, a) = (get(&self.base), get(adapted));
                    if b.is_none() && a.is_none() {
                        continue;
                    }
                    let change = b.zip(a).map_or_else(|| "-".to_string(), |(b, a)| format!("{:+.4}", a - b));
                    s.push_str(&format!("{name:<34} {:>10} {:>10} {change:>10}\n", cell(b), cell(a)));
                }
            }
        }
        s.trim_end().to_string()
    }

    pub fn write_json(&self, path: &Path) -> anyhow::Result<()> {
        let text = serde_json::to_string_pretty(self)? + "\n";
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    }
}

/// Runs `qdistill eval`. Every input is read and checked before the first forward.
pub fn run_eval(args: &EvalArgs) -> anyhow::Result<EvalReport> {
    if args.data.is_none() && args.rehearsal.is_none() && args.mc.is_none() {
        bail!("nothing to evaluate: give --data, --rehearsal or --mc");
    }
    if args.batch_size == 0 || args.max_seq_length < 2 || args.max_samples == Some(0) {
        bail!("--batch-size and --max-samples must be ≥ 1 and --max-seq-length ≥ 2");
    }
    let m = load_for_inference(&args.model)?;
    let (model, tok) = (&m.model, &m.tokenizer);
    let device = model.device().clone();
    let template = if args.chat_template { ChatTemplate::from_tokenizer(tok)? } else { None };
    let batches = |path: &Path, format: DataFormat| -> anyhow::Result<Vec<DeviceBatch>> {
        let (max_len, n) = (args.max_seq_length, args.max_samples);
        Ok(eval_batches(path, format, tok, template.as_ref(), max_len, n, args.batch_size, &device)?)
    };
    let data = args.data.as_deref().map(|p| batches(p, args.format)).transpose()?;
    let rehearsal = args.rehearsal.as_deref().map(|p| batches(p, DataFormat::Auto)).transpose()?;
    let mc = match args.mc.as_deref() {
        Some(p) => {
            let questions = read_mc(p)?;
            let requests = questions
                .iter()
                .map(|q| mc_request(q, tok, template.as_ref(), args.max_seq_length))
                .collect::<Result<Vec<_>>>()
                .with_context(|| format!("tokenizing {}", p.display()))?;
            Some(requests)
        }
        None => None,
    };
    let teacher = match &args.teacher {
        Some(spec) => {
            let path = config::resolve_model_path(spec, None, None)?;
            tracing::info!(model = %path.display(), "loading teacher");
            let t = models::load(&path, None, false, true, &device, model.dtype())?;
            check_same_tokenizer(&t.tokenizer, tok)
                .with_context(|| format!("teacher {} and model {} must share one tokenizer", path.display(), m.path.display()))?;
            Teacher::Model(t.model)
        }
        None => Teacher::None,
    };
    let lora = m.lora()?;
    let measure = |lora: Option<&LoraTensors>, what: &str| -> anyhow::Result<Metrics> {
        let losses = |b: &Option<Vec<DeviceBatch>>| -> anyhow::Result<Option<LossMetrics>> {
            let Some(b) = b else { return Ok(None) };
            // Without a teacher, the adapted pass takes its own base as the KL reference
            // (one pass gives both numbers); with one, the base needs a pass of its own.
            let base_as_teacher = lora.is_some() && matches!(teacher, Teacher::None);
            let sums = loss_sums(model, lora, b, if base_as_teacher { &Teacher::Lwf } else { &teacher })?;
            let mut out = LossMetrics::new(&sums);
            if base_as_teacher {
                out.kl_base = Some(sums.kd_mean());
            } else {
                out.kl_teacher = (!matches!(teacher, Teacher::None)).then(|| sums.kd_mean());
                if lora.is_some() {
                    out.kl_base = Some(loss_sums(model, lora, b, &Teacher::Lwf)?.kd_mean());
                }
            }
            Ok(Some(out))
        };
        let metrics = Metrics {
            data: losses(&data)?,
            rehearsal: losses(&rehearsal)?,
            mc: mc.as_deref().map(|r| mc_metrics(model, lora, r)).transpose()?,
        };
        tracing::info!("evaluated {what}");
        tracing::debug!(?metrics);
        Ok(metrics)
    };
    let base = measure(None, if lora.is_some() { "the base" } else { "the model" })?;
    let adapted = lora.as_ref().map(|l| measure(Some(l), "base + adapter")).transpose()?;
    Ok(EvalReport {
        model: args.model.model.clone(),
        adapter: args.model.adapter.as_ref().map(|p| p.display().to_string()),
        teacher: args.teacher.clone(),
        base,
        adapted,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use qdistill_common::data::{Batch, Row, Sample, IGNORE_INDEX};
    use qdistill_common::generate::attach_adapter;
    use qdistill_common::lora::{LoraGrads, LoraParams};
    use qdistill_common::model::decoder::LoadOptions;
    use qdistill_common::model::ModelConfig;
    use qdistill_common::optim::{AdamW, AdamWConfig};
    use qdistill_common::weights::WeightStore;
    use crate::trainer::Student;
    use rand::{Rng, SeedableRng};

    fn fixture(rel: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(rel)
    }

    fn tiny(name: &str) -> Model {
        let dir = fixture(&format!("models/{name}"));
        let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
        let opts = LoadOptions { keep_layers: None, nf4: false, double_quant: false, device: Device::Cpu, dtype: DType::F32 };
        Model::load(&WeightStore::open(&dir).unwrap(), &cfg, &opts).unwrap()
    }

    fn with_adapter(name: &str, adapter: &str) -> (Model, LoraParams) {
        let mut m = tiny(name);
        let p = attach_adapter(&mut m, &fixture(&format!("models/{adapter}"))).unwrap();
        (m, p)
    }

    fn ids(n: usize, seed: u64) -> Vec<u32> {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| rng.random_range(3..256u32)).collect()
    }

    /// Logits [T, V] of one unpadded sequence through the ordinary forward.
    fn full_logits(m: &Model, seq: &[u32], lora: Option<&LoraTensors>) -> Tensor {
        let x = Tensor::from_slice(seq, (1, seq.len()), &Device::Cpu).unwrap();
        let pos = Tensor::from_vec((0..seq.len() as u32).collect::<Vec<_>>(), (1, seq.len()), &Device::Cpu).unwrap();
        let h = m.forward_hidden(&x, &StepCtx { position_ids: &pos, segment_ids: None, lora, dropout_seed: None }).unwrap();
        m.logits(&h).unwrap()
    }

    #[test]
    fn choice_scores_equal_a_naive_per_choice_forward() {
        for (name, adapter) in [("llama", "llama-peft"), ("gemma2", "gemma2-peft")] {
            let (m, params) = with_adapter(name, adapter);
            let lora = params.to_device(&Device::Cpu, DType::F32).unwrap();
            // A context past gemma2's sliding window of 8, continuations of 1 to 6 tokens.
            let context = ids(11, 1);
            let conts: Vec<Vec<u32>> = [1, 3, 6, 2].iter().enumerate().map(|(k, &n)| ids(n, 10 + k as u64)).collect();
            for lora in [None, Some(&lora)] {
                let got = continuation_logprobs(&m, lora, &context, &conts).unwrap();
                for (k, cont) in conts.iter().enumerate() {
                    let seq: Vec<u32> = context.iter().chain(cont).copied().collect();
                    // Position t predicts token t + 1: the choice's tokens are predicted from
                    // the last context position on.
                    let labels: Vec<i64> =
                        (0..seq.len()).map(|t| if t + 1 >= context.len() && t + 1 < seq.len() { seq[t + 1] as i64 } else { -100 }).collect();
                    let lp = token_logprobs(&full_logits(&m, &seq, lora), &labels).unwrap();
                    let want: f64 = lp.iter().filter(|x| !x.is_nan()).map(|&x| x as f64).sum();
                    assert!(
                        (got[k] - want).abs() < 1e-4 * want.abs().max(1.0),
                        "{name} (adapter: {}): choice {k}: {} vs naive {want}",
                        lora.is_some(),
                        got[k]
                    );
                }
            }
        }
    }

    #[test]
    fn accuracy_counts_the_best_scored_choice() {
        let m = tiny("llama");
        let context = ids(6, 2);
        let conts: Vec<Vec<u32>> = (0..4).map(|k| ids(1 + k, 20 + k as u64)).collect();
        let chars = vec![3, 1, 7, 2];
        let lp = continuation_logprobs(&m, None, &context, &conts).unwrap();
        let raw = (0..4).max_by(|&a, &b| lp[a].total_cmp(&lp[b])).unwrap();
        let norm = (0..4).max_by(|&a, &b| (lp[a] / chars[a] as f64).total_cmp(&(lp[b] / chars[b] as f64))).unwrap();
        let req = |answer| McRequest { context: context.clone(), continuations: conts.clone(), chars: chars.clone(), answer };
        let requests: Vec<McRequest> = (0..4).map(req).collect();
        let got = mc_metrics(&m, None, &requests).unwrap();
        // Exactly one of the four answers is the model's raw pick, one its normalised pick.
        assert_eq!(got.questions, 4);
        assert_eq!(got.accuracy, 0.25);
        assert_eq!(got.accuracy_norm, 0.25);
        assert_eq!(mc_metrics(&m, None, &requests[raw..=raw]).unwrap().accuracy, 1.0);
        assert_eq!(mc_metrics(&m, None, &requests[norm..=norm]).unwrap().accuracy_norm, 1.0);
    }

    /// Two samples of different lengths with masked prompts, batched with right padding.
    fn batch() -> (Vec<Sample>, DeviceBatch) {
        let sample = |n: usize, prompt: usize, seed| {
            let input_ids = ids(n, seed);
            let labels = input_ids.iter().enumerate().map(|(t, &i)| if t < prompt { IGNORE_INDEX } else { i as i64 }).collect();
            Sample { input_ids, labels }
        };
        let samples = vec![sample(13, 5, 3), sample(7, 2, 4)];
        let rows: Vec<Row> = samples
            .iter()
            .enumerate()
            .map(|(k, s)| {
                let mut r = Row::default();
                r.push(k as u64, s);
                r
            })
            .collect();
        let b = Batch::from_rows(&rows, 13, 0);
        (samples, DeviceBatch::new(&b, &Device::Cpu).unwrap())
    }

    #[test]
    fn perplexity_is_exp_of_the_mean_token_cross_entropy() {
        let (m, params) = with_adapter("llama", "llama-peft");
        let lora = params.to_device(&Device::Cpu, DType::F32).unwrap();
        let (samples, b) = batch();
        for lora in [None, Some(&lora)] {
            let got = LossMetrics::new(&loss_sums(&m, lora, std::slice::from_ref(&b), &Teacher::None).unwrap());
            // Independently: each sample alone (no padding), log p of every trained token
            // given what precedes it.
            let mut nll = Vec::new();
            for s in &samples {
                let labels: Vec<i64> = s.labels[1..].iter().copied().chain([IGNORE_INDEX]).collect();
                let lp = token_logprobs(&full_logits(&m, &s.input_ids, lora), &labels).unwrap();
                nll.extend(lp.iter().filter(|x| !x.is_nan()).map(|&x| -(x as f64)));
            }
            let want = (nll.iter().sum::<f64>() / nll.len() as f64).exp();
            assert_eq!(got.tokens, nll.len());
            assert!((got.perplexity / want - 1.0).abs() < 1e-5, "perplexity {} vs exp(mean CE) {want}", got.perplexity);
        }
    }

    #[test]
    fn adapted_losses_equal_the_training_runs_evaluation() {
        let (m, params) = with_adapter("llama", "llama-peft");
        let lora = params.to_device(&Device::Cpu, DType::F32).unwrap();
        let (_, b) = batch();
        let teacher = Teacher::Model(tiny("llama"));
        let got = loss_sums(&m, Some(&lora), std::slice::from_ref(&b), &teacher).unwrap();
        let student = Student {
            grads: LoraGrads::zeros(&params),
            opt: AdamW::new(params.len(), AdamWConfig::default()),
            params,
            model: m,
            loss: LossConfig { ce_weight: 1.0, kd_weight: 0.5, kd: KdLoss::Jsd { beta: 0.5 }, temperature: 2.0, chunk_tokens: 4, student_softcap: None },
            checkpointing: false,
        };
        let want = student.evaluate(std::slice::from_ref(&b), &teacher).unwrap();
        assert_eq!(got.tokens, want.tokens);
        assert!((got.ce - want.ce).abs() < 1e-6 * want.ce, "CE {} vs {}", got.ce, want.ce);
        assert!((got.kd - want.kd).abs() < 1e-6 * want.kd, "KL {} vs {}", got.kd, want.kd);
        assert!(got.kd > 0.0);
    }

    #[test]
    fn kl_to_the_base_is_the_kl_of_the_two_softmaxes() {
        let (m, params) = with_adapter("llama", "llama-peft");
        let lora = params.to_device(&Device::Cpu, DType::F32).unwrap();
        let (samples, b) = batch();
        let got = loss_sums(&m, Some(&lora), std::slice::from_ref(&b), &Teacher::Lwf).unwrap();
        let (mut kl, mut n) = (0f64, 0usize);
        for s in &samples {
            let p = full_logits(&m, &s.input_ids, None).to_vec2::<f32>().unwrap();
            let q = full_logits(&m, &s.input_ids, Some(&lora)).to_vec2::<f32>().unwrap();
            let log_softmax = |z: &[f32]| -> Vec<f64> {
                let mx = z.iter().fold(f32::MIN, |a, &b| a.max(b)) as f64;
                let lse = mx + z.iter().map(|&x| (x as f64 - mx).exp()).sum::<f64>().ln();
                z.iter().map(|&x| x as f64 - lse).collect()
            };
            // Only positions with a target count, as in training.
            for t in 0..s.len() - 1 {
                if s.labels[t + 1] == IGNORE_INDEX {
                    continue;
                }
                let (lp, lq) = (log_softmax(&p[t]), log_softmax(&q[t]));
                kl += lp.iter().zip(&lq).map(|(a, b)| a.exp() * (a - b)).sum::<f64>();
                n += 1;
            }
        }
        assert_eq!(got.tokens, n);
        let want = kl / n as f64;
        assert!((got.kd_mean() / want - 1.0).abs() < 1e-4, "KL(base‖adapted) {} vs {want}", got.kd_mean());
    }

    #[test]
    fn multiple_choice_lines_are_checked_and_named() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("mc.jsonl");
        let good = r#"{"question": "q", "choices": ["a", "b", "c"], "answer": "c"}"#;
        std::fs::write(&p, format!("{good}\n\n{}\n", r#"{"question": "q", "choices": ["a", "b"], "answer": 0}"#)).unwrap();
        let qs = read_mc(&p).unwrap();
        assert_eq!(qs.iter().map(|q| q.answer).collect::<Vec<_>>(), vec![2, 0]);
        for (bad, what) in [
            (r#"{"question": "q", "choices": ["a", "b"], "answer": 2}"#, "choice 2 of 2"),
            (r#"{"question": "q", "choices": ["a", "b"], "answer": "E"}"#, "choice 4 of 2"),
            (r#"{"question": "q", "choices": ["a"], "answer": 0}"#, "at least 2"),
            (r#"{"question": "q", "choices": ["a", 3], "answer": 0}"#, "choices[1]"),
            (r#"{"question": "q", "choices": ["a", "b"], "answer": "1"}"#, "0-based index or a letter"),
            (r#"{"choices": ["a", "b"], "answer": 0}"#, "question"),
            (r#"{"question": "q", "choices": ["a", "b"]"#, "invalid JSON"),
        ] {
            std::fs::write(&p, format!("{good}\n{good}\n{bad}\n")).unwrap();
            let e = read_mc(&p).unwrap_err().to_string();
            assert!(e.contains("mc.jsonl") && e.contains("line 3") && e.contains(what), "{e}");
        }
    }
}
