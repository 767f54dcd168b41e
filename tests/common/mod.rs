//! What several end-to-end test files share: the repository root and the tiny fixture
//! model, its tokenizer and data.

// Each test file compiles this module on its own and uses a part of it.
#![allow(dead_code)]

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
