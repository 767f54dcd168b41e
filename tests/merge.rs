//! `qdistill merge` as users run it. The numbers (merged weights, logits against PEFT's
//! merge_and_unload) are checked by the unit tests of `qdistill_common::merge`; these
//! check the command line: defaults taken from the adapter, the files written, the errors.

use std::path::PathBuf;
use std::process::{Command, Output};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn qdistill(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qdistill")).args(args).current_dir(root()).output().expect("run qdistill")
}

#[test]
fn merge_takes_the_base_from_the_adapter_and_writes_an_hf_directory() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("merged");
    // No --model: llama-peft's adapter_config.json names tests/fixtures/models/llama.
    let o = qdistill(&["merge", "--adapter", "tests/fixtures/models/llama-peft", "--out", out.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(stdout.contains("merged 14 linear layers (scaling 2) of 2 decoder layers"), "{stdout}");
    let mut files: Vec<String> =
        std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    files.sort();
    // The fixture base has no tokenizer files; the log says so.
    assert_eq!(files, ["config.json", "generation_config.json", "model.safetensors"]);
    assert!(stderr.contains("no tokenizer files"), "{stderr}");
    let cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["dtype"], "bfloat16");
    let st = candle_core::safetensors::load(out.join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
    assert_eq!(st.len(), 21);
    assert!(st.values().all(|t| t.dtype() == candle_core::DType::BF16));
}

#[test]
fn merge_errors_name_what_is_wrong_and_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("merged");
    let o = qdistill(&["merge", "--model", "tests/fixtures/models/llama", "--adapter", "tests/fixtures/models/llama", "--out", out.to_str().unwrap()]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(e.contains("tests/fixtures/models/llama") && e.contains("adapter_config.json"), "{e}");
    let o = qdistill(&[
        "merge",
        "--adapter",
        "tests/fixtures/models/llama-peft",
        "--out",
        out.to_str().unwrap(),
        "--dtype",
        "f16",
    ]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("--dtype \"f16\" is not one of bf16, f32"), "{e}");
    let o = qdistill(&[
        "merge",
        "--adapter",
        "tests/fixtures/models/llama-peft",
        "--out",
        out.to_str().unwrap(),
        "--keep-layers",
        "0",
    ]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("model.layers.1.") && e.contains("different base model"), "{e}");
    assert!(!out.exists());
}
