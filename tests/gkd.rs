//! On-policy distillation (GKD) on the tiny Llama fixture (2 layers, vocab 256) as teacher
//! and its first layer as student: `lmbda` = 0 is exactly the off-policy run; on-policy
//! micro-batches are the student's own samples (checked against a sampler written here on
//! the full, uncached forward) with targets on the generated tokens only, laid out as TRL's
//! `generate_on_policy_outputs` lays them out; and a short on-policy run lowers the JSD on
//! held-out prompts' student samples.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use qdistill_common::config;
use qdistill_common::generate::{LogitsProcessor, SamplingParams};
use qdistill_common::loss::{fused_linear_distill, KdLoss, LossConfig, TeacherOutput, IGNORE_INDEX};
use qdistill_common::model::decoder::StepCtx;
use qdistill_worker::gkd::{self, Completions, GkdSettings};
use qdistill_worker::run::{prepare_embedded, Prepared};
use qdistill_worker::trainer::{teacher_hidden, DeviceBatch, Student, Teacher};
use rand::{Rng, SeedableRng};

mod common;
use common::fixture_llama;

/// Prompt/completion data, models and a GKD job (JSD, beta 0.5, at T = 1 with no CE term,
/// as TRL's loss) under `dir`; returns the config path.
fn write_job(dir: &Path) -> PathBuf {
    let model = fixture_llama(dir, "llama");
    let words = common::WORDS;
    let lines: String = (0..30)
        .map(|i| {
            let w = |j: usize| words[(i * 7 + j * 3) % words.len()];
            format!("{{\"prompt\": \"{} {}:\", \"completion\": \" {} {}\"}}\n", w(0), w(1), w(2), w(3))
        })
        .collect();
    let data = dir.join("train.jsonl");
    std::fs::write(&data, lines).unwrap();
    let cfg = dir.join("job.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"output_dir = "{out}"
seed = 5
[model]
model_name_or_path = "{model}"
keep_layers = "0"
quantization = "none"
[teacher]
mode = "model"
model_name_or_path = "{model}"
[lora]
r = 8
lora_alpha = 16
lora_dropout = 0.0
[distill]
loss = "jsd"
beta = 0.5
temperature = 1.0
ce_weight = 0.0
kd_weight = 1.0
max_new_tokens = 10
generation_temperature = 1.0
[data]
train_file = "{data}"
max_seq_length = 32
eval_split = 0.2
[training]
per_device_train_batch_size = 4
gradient_accumulation_steps = 2
max_steps = 3
learning_rate = 2e-2
warmup_steps = 0
lr_scheduler_type = "constant"
logging_steps = 1
"#,
            out = dir.join("out").display(),
            model = model.display(),
            data = data.display(),
        ),
    )
    .unwrap();
    cfg
}

fn set(pairs: &[&str]) -> Vec<String> {
    pairs.iter().map(|s| s.to_string()).collect()
}

fn train(cfg: &Path, overrides: &[String], out: &Path) {
    let mut o = overrides.to_vec();
    o.push(format!("output_dir={}", out.display()));
    qdistill_worker::run::train(cfg, &o, false).unwrap();
}

fn adapter_bits(out: &Path) -> Vec<(String, Vec<u32>)> {
    let t = candle_core::safetensors::load(out.join("final_model/adapter_model.safetensors"), &Device::Cpu).unwrap();
    let mut v: Vec<(String, Vec<u32>)> = t
        .into_iter()
        .map(|(k, x)| (k, x.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|f| f.to_bits()).collect()))
        .collect();
    v.sort();
    v
}

fn metrics(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

fn prepared(cfg: &Path, overrides: &[String]) -> (Prepared, GkdSettings) {
    let c = config::load(cfg, overrides).unwrap();
    let (p, tok) = prepare_embedded(&c).unwrap();
    let settings = GkdSettings::from_config(&c, &tok).unwrap().expect("lmbda > 0");
    (p, settings)
}

#[test]
fn lmbda_zero_is_exactly_the_off_policy_run() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_job(dir.path());
    let plain = dir.path().join("plain");
    train(&cfg, &[], &plain);
    let zero = dir.path().join("zero");
    train(&cfg, &set(&["distill.lmbda=0.0", "distill.max_new_tokens=4", "distill.generation_temperature=0.3"]), &zero);
    assert_eq!(adapter_bits(&zero), adapter_bits(&plain));
    let loss = |m: &[serde_json::Value]| m.iter().map(|r| r["loss"].as_f64().unwrap().to_bits()).collect::<Vec<_>>();
    assert_eq!(loss(&metrics(&zero)), loss(&metrics(&plain)));
    // Not vacuous: lmbda = 1 trains on other sequences, and says so in metrics.jsonl.
    let one = dir.path().join("one");
    train(&cfg, &set(&["distill.lmbda=1.0"]), &one);
    assert_ne!(adapter_bits(&one), adapter_bits(&plain));
    assert!(metrics(&one).iter().all(|r| r["generated_micro_batches"] == 2), "{:?}", metrics(&one));
}

/// Next-token logits of `seq` from a full forward without KV cache, adapters on.
fn last_logits(student: &Student, seq: &[u32]) -> Vec<f32> {
    let lora = student.params.to_device(&Device::Cpu, DType::F32).unwrap();
    let ids = Tensor::from_slice(seq, (1, seq.len()), &Device::Cpu).unwrap();
    let pos: Vec<u32> = (0..seq.len() as u32).collect();
    let pos = Tensor::from_slice(&pos, (1, seq.len()), &Device::Cpu).unwrap();
    let ctx = StepCtx { position_ids: &pos, segment_ids: None, lora: Some(&lora), dropout_seed: None };
    let h = student.model.forward_hidden(&ids, &ctx).unwrap();
    let d = h.dim(candle_core::D::Minus1).unwrap();
    let h = h.reshape((seq.len(), d)).unwrap().narrow(0, seq.len() - 1, 1).unwrap();
    student.model.logits(&h).unwrap().flatten_all().unwrap().to_dtype(DType::F32).unwrap().to_vec1().unwrap()
}

/// With lmbda = 1 a micro-batch is rebuilt from the student's own samples: each row is the
/// original prompt followed by the tokens an independent sampler draws here (full forward,
/// softmax(z/T) in f64, the same seeded stream), up to and including a stop token; labels
/// cover exactly those tokens; and the same (seed, step, micro) draws the same batch.
#[test]
fn on_policy_batches_are_the_students_samples_with_targets_on_generated_tokens_only() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_job(dir.path());
    let (Prepared { mut student, teacher, data, .. }, settings) =
        prepared(&cfg, &set(&["distill.lmbda=1.0", "distill.generation_temperature=0.8"]));
    // Adapters away from their zero-B start, so the student is not its base model.
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(99);
    student.params.values.iter_mut().for_each(|v| *v = rng.random_range(-0.3f32..0.3));
    let batch = data.train_stream().unwrap().next_batch();
    let (got, which) = gkd::micro_batch(&settings, &student, &teacher, &batch, 3, 1).unwrap();
    assert_eq!(which, Completions::Student);

    let mut draws = rand_chacha::ChaCha8Rng::seed_from_u64(settings.sampling(3, 1).seed);
    let t = settings.temperature as f32;
    let mut completions = Vec::new();
    for r in 0..batch.batch {
        let row = &batch.labels[r * batch.seq_len..(r + 1) * batch.seq_len];
        let first_target = row.iter().position(|&l| l != IGNORE_INDEX).unwrap();
        let prompt = batch.input_ids[r * batch.seq_len..r * batch.seq_len + first_target + 1].to_vec();
        let mut seq = prompt.clone();
        let mut completion = Vec::new();
        while completion.len() < settings.max_new_tokens {
            let z: Vec<f64> = last_logits(&student, &seq).iter().map(|&x| (x / t) as f64).collect();
            let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = z.iter().map(|x| (x - m).exp()).collect();
            let total: f64 = e.iter().sum();
            let u: f64 = draws.random();
            let mut acc = 0.0;
            let next = e.iter().position(|p| {
                acc += p / total;
                acc > u
            });
            let next = next.unwrap() as u32;
            completion.push(next);
            seq.push(next);
            if settings.stop_tokens.contains(&next) {
                break;
            }
        }
        completions.push((prompt, completion));
    }
    assert!(completions.iter().any(|(_, c)| c.len() > 1));
    let width = got.seq_len;
    assert_eq!(got.batch, batch.batch);
    for (r, (p, c)) in completions.iter().enumerate() {
        let ids = &got.input_ids[r * width..(r + 1) * width];
        let labels = &got.labels[r * width..(r + 1) * width];
        let n = p.len() + c.len();
        assert_eq!(&ids[..p.len()], p.as_slice(), "row {r}: prompt");
        assert_eq!(&ids[p.len()..n], c.as_slice(), "row {r}: the student's sample");
        let want: Vec<i64> = (0..width)
            .map(|i| if i + 1 >= p.len() && i + 1 < n { ids[i + 1] as i64 } else { IGNORE_INDEX })
            .collect();
        assert_eq!(labels, want.as_slice(), "row {r}: targets on generated tokens only");
    }
    assert_eq!(got.n_target_tokens, completions.iter().map(|(_, c)| c.len()).sum::<usize>());
    let (again, _) = gkd::micro_batch(&settings, &student, &teacher, &batch, 3, 1).unwrap();
    assert_eq!(again, got, "seeded: the same micro-batch draws the same samples");
}

/// `completion_batch` lays rows out as TRL's `GKDTrainer.generate_on_policy_outputs`
/// (trl f2cd577, trl/experimental/gkd/gkd_trainer.py) does, up to padding side and the
/// label shift: TRL's output below was produced by running that function's source with
/// torch on left-padded prompts [10, 11, 12] and [20] and a stub `generate` returning
/// [10, 11, 12, 13, EOS=2, PAD=0] and [0, 0, 20, 21, 22, 23] (EOS 2, PAD 0).
#[test]
fn completion_layout_matches_trl_generate_on_policy_outputs() {
    let trl_ids = [[10, 11, 12, 13, 2, 0], [0, 0, 20, 21, 22, 23]];
    let trl_mask = [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]];
    let trl_labels = [[-100, -100, -100, 13, 2, -100], [-100, -100, -100, 21, 22, 23]];
    // What our generation returns for the same case: the stop token kept, nothing after it.
    let prompts = vec![vec![10, 11, 12], vec![20]];
    let completions = vec![vec![13, 2], vec![21, 22, 23]];
    let b = gkd::completion_batch(&prompts, &completions, 0);
    for r in 0..2 {
        // TRL's real tokens and their unshifted labels; ours shifted: label t is token t+1's.
        let real: Vec<usize> = (0..6).filter(|&i| trl_mask[r][i] == 1).collect();
        let ids: Vec<u32> = real.iter().map(|&i| trl_ids[r][i]).collect();
        let shifted: Vec<i64> = real.iter().skip(1).map(|&i| trl_labels[r][i]).chain([IGNORE_INDEX]).collect();
        let row = r * b.seq_len..r * b.seq_len + ids.len();
        assert_eq!(&b.input_ids[row.clone()], ids.as_slice(), "row {r}");
        assert_eq!(&b.labels[row.clone()], shifted.as_slice(), "row {r}");
        assert!(b.labels[row.end..(r + 1) * b.seq_len].iter().all(|&l| l == IGNORE_INDEX));
    }
}

/// Mean generalized JSD (beta 0.5, T = 1) between teacher and student over the student's
/// own samples for `prompts`, drawn with a fixed seed.
fn on_policy_jsd(student: &Student, teacher: &Teacher, prompts: &[Vec<u32>], settings: &GkdSettings) -> f64 {
    let params = SamplingParams { temperature: settings.temperature, top_k: 0, top_p: 1.0, repetition_penalty: 1.0, seed: 1234 };
    let mut sampler = LogitsProcessor::new(params).unwrap();
    let lora = student.params.to_device(&Device::Cpu, DType::F32).unwrap();
    let completions = gkd::generate(&student.model, Some(lora), prompts, settings, &mut sampler).unwrap();
    let b = gkd::completion_batch(prompts, &completions, settings.pad_id);
    let db = DeviceBatch::new(&b, &Device::Cpu).unwrap();
    let h_t = teacher_hidden(teacher, &student.model, &db).unwrap().unwrap();
    let Teacher::Model(tm) = teacher else { panic!("a teacher model") };
    let lora = student.params.to_device(&Device::Cpu, DType::F32).unwrap();
    let ctx = StepCtx { position_ids: &db.position_ids, segment_ids: None, lora: Some(&lora), dropout_seed: None };
    let h = student.model.forward_hidden(&db.ids, &ctx).unwrap();
    let cfg = LossConfig {
        ce_weight: 0.0,
        kd_weight: 1.0,
        kd: KdLoss::Jsd { beta: 0.5 },
        temperature: 1.0,
        chunk_tokens: 64,
        student_softcap: None,
    };
    let t_out = TeacherOutput::Hidden { h: &h_t, lm_head: tm.lm_head(), softcap: None };
    let out = fused_linear_distill(&h, student.model.lm_head(), &db.labels, t_out, &cfg, 1.0).unwrap();
    out.kd_sum / out.n_tokens as f64
}

#[test]
fn a_short_on_policy_run_lowers_the_jsd_on_held_out_student_samples() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_job(dir.path());
    let o = set(&["distill.lmbda=1.0", "max_steps=100"]);
    let out = dir.path().join("gkd");
    train(&cfg, &o, &out);
    let (Prepared { mut student, teacher, data, .. }, settings) = prepared(&cfg, &o);
    let prompts: Vec<Vec<u32>> = data.eval.iter().flat_map(|b| gkd::prompts(b).unwrap()).collect();
    assert!(prompts.len() >= 4, "held-out prompts: {}", prompts.len());
    let before = on_policy_jsd(&student, &teacher, &prompts, &settings);
    let (_, tensors) = qdistill_common::checkpoint::load_adapter(&out.join("final_model")).unwrap();
    student.params.load_peft_tensors(&tensors, &out.join("final_model")).unwrap();
    let after = on_policy_jsd(&student, &teacher, &prompts, &settings);
    assert!(after < 0.85 * before, "on-policy JSD {before:.4} -> {after:.4}");
}
