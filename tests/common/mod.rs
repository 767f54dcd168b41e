//! What several end-to-end test files share: the repository root and the tiny fixture
//! model, its tokenizer and data.

// Each test file compiles this module on its own and uses a part of it.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A WordLevel tokenizer of single characters for the fixture model (vocab 256): ids 0-3
/// are `<pad>`, `<s>`, `</s>`, `<unk>`, then the printable ASCII characters.
pub fn write_tokenizer(dir: &Path) {
    let specials = ["<pad>", "<s>", "</s>", "<unk>"];
    let mut vocab = serde_json::Map::new();
    for (i, s) in specials.iter().enumerate() {
        vocab.insert(s.to_string(), i.into());
    }
    for c in 32u8..127 {
        vocab.insert((c as char).to_string(), (c as usize - 32 + specials.len()).into());
    }
    let added: Vec<serde_json::Value> = specials
        .iter()
        .enumerate()
        .map(|(i, s)| serde_json::json!({"id": i, "content": s, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    let tok = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": null,
        "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "."}, "behavior": "Isolated", "invert": false},
        "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"}
    });
    std::fs::write(dir.join("tokenizer.json"), serde_json::to_string(&tok).unwrap()).unwrap();
    let cfg = serde_json::json!({"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "add_bos_token": false});
    std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
}

/// A copy of the tiny Llama fixture (tests/fixtures/models/llama) with the character
/// tokenizer, at `dir/name`.
pub fn fixture_llama(dir: &Path, name: &str) -> PathBuf {
    let model = dir.join(name);
    std::fs::create_dir_all(&model).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(root().join("tests/fixtures/models/llama").join(f), model.join(f)).unwrap();
    }
    write_tokenizer(&model);
    model
}

/// gradient_accumulation_steps of [`write_cluster_job`].
pub const G: usize = 4;

/// Model, data and config of the small distillation job the cluster and embedded tests
/// train (a teacher model, `G` microbatches a step, ten steps, checkpoints every two),
/// under `dir`; returns the config path.
pub fn write_cluster_job(dir: &Path) -> PathBuf {
    let model = fixture_llama(dir, "llama");
    let data = dir.join("train.jsonl");
    write_word_text(&data);
    let cfg = dir.join("job.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"output_dir = "{out}"
seed = 11
device = "cpu"
[model]
model_name_or_path = "{model}"
keep_layers = "0"
[teacher]
mode = "model"
model_name_or_path = "{model}"
[lora]
r = 4
lora_alpha = 8
lora_dropout = 0.1
[distill]
temperature = 2.0
kd_weight = 0.5
[data]
train_file = "{data}"
max_seq_length = 64
[training]
per_device_train_batch_size = 4
gradient_accumulation_steps = {G}
max_steps = 10
learning_rate = 1e-2
warmup_steps = 1
lr_scheduler_type = "cosine"
max_grad_norm = 1.0
save_steps = 2
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

/// Ten words, for data the character tokenizer covers.
pub const WORDS: [&str; 10] = ["red", "fox", "jumps", "over", "lazy", "dog", "blue", "sky", "rain", "falls"];

/// Forty plain-text records of 8 to 16 words at `path`.
pub fn write_word_text(path: &Path) {
    let lines: String = (0..40)
        .map(|i| {
            let text: Vec<&str> = (0..8 + i % 9).map(|j| WORDS[(i * 7 + j * 3) % WORDS.len()]).collect();
            format!("{{\"text\": \"{i}: {}\"}}\n", text.join(" "))
        })
        .collect();
    std::fs::write(path, lines).unwrap();
}

/// GPT-2's byte → char table (`bytes_to_unicode`), which byte-level BPE vocabularies use.
fn byte_char(b: u8) -> char {
    let printable = |x: u32| (33..=126).contains(&x) || (161..=172).contains(&x) || (174..=255).contains(&x);
    if printable(b as u32) {
        return char::from_u32(b as u32).unwrap();
    }
    let n = (0..b as u32).filter(|&x| !printable(x)).count() as u32;
    char::from_u32(256 + n).unwrap()
}

/// A byte-level tokenizer of 256 ids (three ChatML specials, then bytes 0..=252, one token
/// each) with the ChatML chat template: fits every fixture model, whose vocabularies are
/// 256 or more.
pub fn write_chatml_tokenizer(dir: &Path) {
    use serde_json::{json, Value};
    let specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
    let mut vocab = serde_json::Map::new();
    for (i, s) in specials.iter().enumerate() {
        vocab.insert(s.to_string(), json!(i));
    }
    for b in 0..=252u8 {
        vocab.insert(byte_char(b).to_string(), json!(3 + b as u32));
    }
    let added: Vec<Value> = specials
        .iter()
        .enumerate()
        .map(|(i, s)| json!({"id": i, "content": s, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
        .collect();
    let tokenizer = json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": []}
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    let chatml = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";
    let cfg = json!({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "bos_token": null, "add_bos_token": false, "chat_template": chatml});
    std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
}

// The coordinator's per-sample ledger (ledger.json), as the cluster and embedded tests read it.
#[derive(serde::Deserialize)]
pub struct LedgerRank {
    pub student_rank: usize,
    pub micro_batches: Vec<u64>,
    pub sample_ids: Vec<u64>,
}
#[derive(serde::Deserialize)]
pub struct LedgerStep {
    pub step: u64,
    pub generation: u64,
    pub ranks: Vec<LedgerRank>,
}
#[derive(serde::Deserialize)]
pub struct Ledger {
    pub steps: Vec<LedgerStep>,
    pub rolled_back: Vec<LedgerStep>,
}

/// Every step is in the ledger once, with exactly its own microbatches (each trained by
/// one student) and the data stream's samples in order.
pub fn check_ledger(out: &Path, samples: &[Vec<u64>]) -> Ledger {
    let path = out.join("ledger.json");
    let l: Ledger = serde_json::from_slice(&std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap();
    assert_eq!(l.steps.iter().map(|s| s.step).collect::<Vec<_>>(), (0..samples.len() as u64).collect::<Vec<_>>(), "steps in the ledger");
    for s in &l.steps {
        let mut ranks: Vec<&LedgerRank> = s.ranks.iter().collect();
        ranks.sort_by_key(|r| r.student_rank);
        let batches: Vec<u64> = ranks.iter().flat_map(|r| r.micro_batches.iter().copied()).collect();
        assert_eq!(batches, (0..G as u64).map(|k| s.step * G as u64 + k).collect::<Vec<_>>(), "step {}: microbatches", s.step);
        let ids: Vec<u64> = ranks.iter().flat_map(|r| r.sample_ids.iter().copied()).collect();
        assert_eq!(ids, samples[s.step as usize], "step {}: samples", s.step);
    }
    l
}

/// A PEFT adapter file's tensors, flattened to f32, by name.
pub fn read_adapter(path: &Path) -> HashMap<String, Vec<f32>> {
    let t = candle_core::safetensors::load(path, &candle_core::Device::Cpu).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    t.into_iter().map(|(n, t)| (n, t.flatten_all().unwrap().to_vec1::<f32>().unwrap())).collect()
}

/// Every tensor of `got` equals `want`'s bit for bit (the message counts the values that differ).
pub fn assert_bit_identical(got: &HashMap<String, Vec<f32>>, want: &HashMap<String, Vec<f32>>, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: tensor count");
    for (name, w) in want {
        let g = got.get(name).unwrap_or_else(|| panic!("{what}: {name} missing"));
        let diff = g.iter().zip(w).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
        let max = g.iter().zip(w).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert_eq!(diff, 0, "{what}: {name}: {diff} of {} values differ (max |Δ| {max:e})", w.len());
    }
}
