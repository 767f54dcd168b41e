//! Every recipe in examples/ runs, shortened, on the CPU: the example file as a user has it,
//! with the model paths, data, device and step counts changed through `train --set`, as a
//! user without the hub models or a GPU would. Tiny random models stand in for the hub
//! models (tests/fixtures/models/llama and qwen2, vocabulary 256), with a byte-level
//! tokenizer and ChatML chat template written here; the Qwen recipe gets a teacher whose
//! vocabulary is padded to 320 rows against the student's 256, as Qwen2.5-7B's 152,064
//! against Qwen2.5-0.5B's 151,936.
//!
//! Each run must lower the held-out cross-entropy (KL to the teacher where there is one)
//! from before training, and leave adapters that load onto the model.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{Device, Tensor};
use serde_json::{json, Value};

mod common;
use common::{root, write_chatml_tokenizer};

fn qdistill(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_qdistill"))
        .args(args)
        .current_dir(root())
        .env("NO_COLOR", "1")
        .output()
        .expect("run qdistill")
}

/// A copy of tests/fixtures/models/<fixture> with the tokenizer.
fn tiny_model(dir: &Path, fixture: &str, name: &str) -> PathBuf {
    let m = dir.join(name);
    std::fs::create_dir_all(&m).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(root().join("tests/fixtures/models").join(fixture).join(f), m.join(f)).unwrap();
    }
    write_chatml_tokenizer(&m);
    m
}

/// The Qwen2 fixture with its (tied) embedding padded from 256 to `vocab` rows: random
/// extra rows the tokenizer never produces, as in Qwen2.5's larger checkpoints.
fn padded_qwen2(dir: &Path, vocab: usize) -> PathBuf {
    let m = tiny_model(dir, "qwen2", "qwen2-padded");
    let mut tensors = candle_core::safetensors::load(m.join("model.safetensors"), &Device::Cpu).unwrap();
    let emb = &tensors["model.embed_tokens.weight"];
    let (rows, hidden) = emb.dims2().unwrap();
    let extra = Tensor::randn(0f32, 0.3, (vocab - rows, hidden), &Device::Cpu).unwrap();
    let padded = Tensor::cat(&[emb, &extra], 0).unwrap();
    tensors.insert("model.embed_tokens.weight".into(), padded);
    candle_core::safetensors::save(&tensors, m.join("model.safetensors")).unwrap();
    let mut cfg: Value = serde_json::from_str(&std::fs::read_to_string(m.join("config.json")).unwrap()).unwrap();
    cfg["vocab_size"] = json!(vocab);
    std::fs::write(m.join("config.json"), cfg.to_string()).unwrap();
    m
}

/// Training data in the recipes' formats: short arithmetic chats / instructions, whose
/// answers a model can learn in a few steps, and plain text for rehearsal.
struct Data {
    messages: PathBuf,
    alpaca: PathBuf,
    rehearsal: PathBuf,
}

fn write_data(dir: &Path) -> Data {
    let messages = dir.join("chat.jsonl");
    let alpaca = dir.join("alpaca.jsonl");
    let rehearsal = dir.join("rehearsal.jsonl");
    let mut chat = String::new();
    let mut alp = String::new();
    for i in 0..40 {
        let (a, b) = (i % 7, i % 5);
        let q = format!("What is {a} plus {b}?");
        let ans = format!("{a} plus {b} is {}.", a + b);
        chat.push_str(&json!({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": ans}]}).to_string());
        chat.push('\n');
        alp.push_str(&json!({"instruction": q, "input": "", "output": ans}).to_string());
        alp.push('\n');
    }
    let words = ["the", "sun", "rises", "over", "quiet", "hills", "and", "rivers", "run", "to", "sea"];
    let text: String = (0..20)
        .map(|i| {
            let t: Vec<&str> = (0..10).map(|j| words[(i * 3 + j * 7) % words.len()]).collect();
            format!("{}\n", json!({"text": t.join(" ")}))
        })
        .collect();
    std::fs::write(&messages, chat).unwrap();
    std::fs::write(&alpaca, alp).unwrap();
    std::fs::write(&rehearsal, text).unwrap();
    Data { messages, alpaca, rehearsal }
}

/// Runs `qdistill train examples/<recipe> --set …` (CPU, float32, short sequences, a
/// learning rate for few steps) and returns all_results.json.
fn train(recipe: &str, out: &Path, overrides: &[String]) -> Value {
    let example = root().join("examples").join(recipe);
    assert!(example.exists(), "{} is missing", example.display());
    let mut args: Vec<String> = vec!["train".into(), example.display().to_string(), "--no-progress".into()];
    let common = [
        format!("output_dir={}", out.display()),
        "device=cpu".into(),
        "model.compute_dtype=float32".into(),
        "data.max_seq_length=64".into(),
        "data.eval_split=0.15".into(),
        "training.learning_rate=5e-3".into(),
        "training.per_device_train_batch_size=4".into(),
        "training.gradient_accumulation_steps=1".into(),
        "training.gradient_checkpointing=false".into(),
        "training.logging_steps=1".into(),
    ];
    for o in common.iter().chain(overrides) {
        args.push("--set".into());
        args.push(o.clone());
    }
    let o = qdistill(&args);
    assert!(o.status.success(), "{recipe} failed:\n{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_str(&std::fs::read_to_string(out.join("all_results.json")).unwrap()).unwrap()
}

fn eval(results: &Value, when: &str, what: &str) -> f64 {
    results[when][what].as_f64().unwrap_or_else(|| panic!("all_results.json has no {when}.{what}: {results}"))
}

/// The held-out CE after training is below the CE before it (and so for KL when `kl`).
fn assert_learned(recipe: &str, r: &Value, kl: bool) {
    let (ce0, ce1) = (eval(r, "eval_before", "ce"), eval(r, "eval_after", "ce"));
    assert!(ce1 < ce0, "{recipe}: held-out CE did not fall: {ce0} -> {ce1}");
    if kl {
        let (kl0, kl1) = (eval(r, "eval_before", "kl"), eval(r, "eval_after", "kl"));
        assert!(kl1 < kl0, "{recipe}: held-out KL to the teacher did not fall: {kl0} -> {kl1}");
    }
}

/// The adapter in `dir` loads onto `model` (every tensor matched by name and shape) and
/// is not the zero-B initialisation.
fn assert_adapter_loads(model: &Path, dir: &Path) {
    for f in ["adapter_config.json", "adapter_model.safetensors"] {
        assert!(dir.join(f).exists(), "{} is missing", dir.join(f).display());
    }
    let args = qdistill_worker::generate::ModelArgs {
        model: model.display().to_string(),
        adapter: Some(dir.to_path_buf()),
        device: "cpu".into(),
        dtype: "f32".into(),
        nf4: false,
    };
    let m = qdistill_worker::generate::load_for_inference(&args)
        .unwrap_or_else(|e| panic!("{} does not load onto {}: {e:#}", dir.display(), model.display()));
    let adapter = m.adapter.expect("an adapter was given");
    let values = adapter.host_values().unwrap();
    let b_max = adapter
        .entries
        .iter()
        .flat_map(|e| &values[e.b_offset..e.b_offset + e.out_features * adapter.spec.r])
        .fold(0f32, |m, x| m.max(x.abs()));
    assert!(b_max > 0.0, "{}: lora_B is still zero", dir.display());
}

fn checkpoints(out: &Path) -> Vec<u64> {
    let mut steps: Vec<u64> = std::fs::read_dir(out)
        .unwrap()
        .filter_map(|e| e.unwrap().file_name().to_str()?.strip_prefix("checkpoint-")?.parse().ok())
        .collect();
    steps.sort();
    steps
}

fn metrics(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("metrics.jsonl")).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}

#[test]
fn recipe_000_lwf_rehearsal_nf4_saves_an_adapter_per_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), "llama", "llama");
    let data = write_data(dir.path());
    let out = dir.path().join("out");
    let r = train(
        "000-lwf-rehearsal-nf4.toml",
        &out,
        &[
            format!("model.model_name_or_path={}", model.display()),
            format!("data.train_file={}", data.messages.display()),
            format!("data.rehearsal_file={}", data.rehearsal.display()),
            "training.num_train_epochs=2".into(),
        ],
    );
    assert_learned("000", &r, false);
    // Held-out rehearsal text is measured before and after (what LwF is meant to keep).
    assert!(r["rehearsal_before"]["ce"].is_number() && r["rehearsal_after"]["ce"].is_number(), "{r}");
    // save_strategy = "epoch": one checkpoint at the step that ended each epoch, the last
    // step included; metrics.jsonl's epoch counter crosses 1 and 2 at exactly those steps.
    let m = metrics(&out);
    let total = m.len() as u64;
    let ends: Vec<u64> = m
        .iter()
        .enumerate()
        .filter(|(i, l)| {
            let before = if *i == 0 { 0.0 } else { m[i - 1]["epoch"].as_f64().unwrap() };
            l["epoch"].as_f64().unwrap().floor() > before.floor()
        })
        .map(|(_, l)| l["step"].as_u64().unwrap())
        .collect();
    assert_eq!(ends.len(), 2, "two epochs must end: {m:?}");
    assert_eq!(*ends.last().unwrap(), total);
    assert_eq!(checkpoints(&out), ends, "one checkpoint per epoch end");
    for step in &ends {
        let ckpt = out.join(format!("checkpoint-{step}"));
        assert_adapter_loads(&model, &ckpt);
        assert!(ckpt.join("optimizer.safetensors").exists());
    }
    assert_adapter_loads(&model, &out.join("final_model"));
    // The last epoch's adapter is the final one.
    let last = std::fs::read(out.join(format!("checkpoint-{total}/adapter_model.safetensors"))).unwrap();
    assert!(last == std::fs::read(out.join("final_model/adapter_model.safetensors")).unwrap());
}

#[test]
fn recipe_002_qlora_sft_alpaca() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), "llama", "llama");
    let data = write_data(dir.path());
    let out = dir.path().join("out");
    let r = train(
        "002-qlora-sft-alpaca.toml",
        &out,
        &[
            format!("model.model_name_or_path={}", model.display()),
            format!("data.train_file={}", data.alpaca.display()),
            "training.max_steps=12".into(),
        ],
    );
    assert_learned("002", &r, false);
    assert_eq!(eval(&r, "eval_after", "kl"), 0.0, "002 has no teacher");
    assert_adapter_loads(&model, &out.join("final_model"));
}

#[test]
fn recipe_003_logit_kd_from_a_bigger_teacher() {
    let dir = tempfile::tempdir().unwrap();
    // The student is the teacher's first layer: smaller, and clearly off the teacher.
    let teacher = tiny_model(dir.path(), "llama", "teacher");
    let student = tiny_model(dir.path(), "llama", "student");
    let data = write_data(dir.path());
    let out = dir.path().join("out");
    let r = train(
        "003-logit-kd.toml",
        &out,
        &[
            format!("model.model_name_or_path={}", student.display()),
            "model.keep_layers=0".into(),
            format!("teacher.model_name_or_path={}", teacher.display()),
            format!("data.train_file={}", data.messages.display()),
            "training.max_steps=12".into(),
        ],
    );
    // The teacher is a random model, not better at the data than the student, so the CE
    // part pulls the student away from it: KL at T = 1 need not fall. The held-out CE and
    // the trained objective (mean of the last three steps vs the first three) must.
    assert_learned("003", &r, false);
    let loss: Vec<f64> = metrics(&out).iter().map(|l| l["loss"].as_f64().unwrap()).collect();
    let (head, tail) = (loss[..3].iter().sum::<f64>(), loss[loss.len() - 3..].iter().sum::<f64>());
    assert!(tail < head, "003: the KD objective did not fall: {loss:?}");
    // The loss logged is alpha·T²·KL + (1 − alpha)·CE with the example's alpha = 0.5, T = 2.
    for l in metrics(&out) {
        let (loss, ce, kd) = (l["loss"].as_f64().unwrap(), l["ce"].as_f64().unwrap(), l["kd"].as_f64().unwrap());
        let want = 0.5 * 4.0 * kd + 0.5 * ce;
        assert!((loss - want).abs() <= 1e-9 * want.abs().max(1.0), "step {}: loss {loss} vs {want}", l["step"]);
    }
    let cfg = std::fs::read_to_string(out.join("final_model/qdistill_config.toml")).unwrap();
    assert!(cfg.contains("keep_layers = [0]") || cfg.contains("keep_layers = \"0\""), "{cfg}");
}

#[test]
fn recipe_004_qlora_sft_messages_with_chat_template() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), "qwen2", "qwen2");
    let data = write_data(dir.path());
    let out = dir.path().join("out");
    let r = train(
        "004-qlora-sft-messages.toml",
        &out,
        &[
            format!("model.model_name_or_path={}", model.display()),
            format!("data.train_file={}", data.messages.display()),
            "training.num_train_epochs=1".into(),
        ],
    );
    assert_learned("004", &r, false);
    assert_eq!(checkpoints(&out).len(), 1, "save_strategy = \"epoch\" with one epoch: one checkpoint");
    assert_adapter_loads(&model, &out.join("final_model"));
}

#[test]
fn recipe_qwen25_kd_with_padded_teacher_vocabulary() {
    let dir = tempfile::tempdir().unwrap();
    let teacher = padded_qwen2(dir.path(), 320);
    let student = tiny_model(dir.path(), "qwen2", "student");
    let data = write_data(dir.path());
    let out = dir.path().join("out");
    let r = train(
        "qwen2.5-kd.toml",
        &out,
        &[
            format!("model.model_name_or_path={}", student.display()),
            "model.keep_layers=0".into(),
            format!("teacher.model_name_or_path={}", teacher.display()),
            format!("data.train_file={}", data.messages.display()),
            "training.max_steps=12".into(),
        ],
    );
    assert_learned("qwen2.5-kd", &r, true);
    assert_adapter_loads(&student, &out.join("final_model"));
}

/// The 8-bit optimizer on a real (tiny) training run: recipe 000 with LoRA r = 64, so that
/// every adapter tensor has ≥ 4096 values and gets 8-bit state, run once with fp32 AdamW
/// and once with paged_adamw_8bit from the same start. Tolerances: every step's loss within
/// 2% of the fp32 run's, final lora_B (which starts at zero) within 5% relative L2 of the
/// fp32 one; the state takes the bytes bitsandbytes' layout implies, under a third of fp32.
#[test]
fn adamw_8bit_tracks_fp32_adamw_on_a_tiny_model_run() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), "llama", "llama");
    let data = write_data(dir.path());
    let run = |optim: &str| {
        let out = dir.path().join(optim);
        let r = train(
            "000-lwf-rehearsal-nf4.toml",
            &out,
            &[
                format!("model.model_name_or_path={}", model.display()),
                format!("data.train_file={}", data.messages.display()),
                format!("data.rehearsal_file={}", data.rehearsal.display()),
                "lora.r=64".into(),
                "lora.lora_alpha=64".into(),
                "lora.lora_dropout=0.0".into(),
                "training.max_steps=20".into(),
                "training.save_strategy=no".into(),
                format!("training.optim={optim}"),
            ],
        );
        let losses: Vec<f64> = metrics(&out).iter().map(|l| l["loss"].as_f64().unwrap()).collect();
        let adapter = candle_core::safetensors::load(out.join("final_model/adapter_model.safetensors"), &Device::Cpu).unwrap();
        (r, losses, adapter)
    };
    let (r32, l32, a32) = run("adamw_torch");
    let (r8, l8, a8) = run("paged_adamw_8bit");
    assert!(checkpoints(&dir.path().join("adamw_torch")).is_empty(), "save_strategy = \"no\" wrote a checkpoint");
    for (s, (x, y)) in l8.iter().zip(&l32).enumerate() {
        assert!((x - y).abs() <= 0.02 * y.abs(), "step {}: 8-bit loss {x}, fp32 loss {y}", s + 1);
    }
    assert!(l32.last().unwrap() < &l32[0], "the fp32 run did not train: {l32:?}");
    // lora_B starts at zero in both runs, so its values are how far training moved it.
    let (mut diff, mut moved) = (0f64, 0f64);
    for (name, t32) in a32.iter().filter(|(n, _)| n.contains("lora_B")) {
        let (v32, v8) = (t32.flatten_all().unwrap().to_vec1::<f32>().unwrap(), a8[name].flatten_all().unwrap().to_vec1::<f32>().unwrap());
        moved += v32.iter().map(|x| (*x as f64).powi(2)).sum::<f64>();
        diff += v32.iter().zip(&v8).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>();
    }
    let rel = (diff / moved).sqrt();
    assert!(rel <= 0.05, "8-bit lora_B is {rel:.4} (relative L2) from the fp32 one");
    // State bytes from the adapter's tensor sizes, as bitsandbytes sizes them: 2 bytes per
    // value plus 2 f32 absmax per 256 values for tensors of ≥ 4096 values (here all but
    // k_proj/v_proj's lora_B, [32, 64]), 8 bytes per value otherwise.
    let (mut want8, mut want32) = (0u64, 0u64);
    for t in a32.values() {
        let n = t.elem_count() as u64;
        want32 += 8 * n;
        want8 += if n >= 4096 { 2 * n + 8 * n.div_ceil(256) } else { 8 * n };
    }
    let (b32, b8) = (r32["optimizer_state_bytes"].as_u64().unwrap(), r8["optimizer_state_bytes"].as_u64().unwrap());
    assert_eq!((b8, b32), (want8, want32), "optimizer state bytes (8-bit, fp32)");
    assert!(b8 * 3 < b32, "8-bit optimizer state {b8} B vs fp32 {b32} B");
}

/// A run with 8-bit optimizer state interrupted after a checkpoint and resumed from it
/// ends with the same adapter, bit for bit, as the run that was not interrupted: the
/// checkpoint holds the codes and absmax themselves.
#[test]
fn adamw_8bit_run_resumes_bit_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path(), "llama", "llama");
    let data = write_data(dir.path());
    let out = dir.path().join("out");
    let overrides = |extra: &[&str]| -> Vec<String> {
        let mut v = vec![
            format!("model.model_name_or_path={}", model.display()),
            format!("data.train_file={}", data.alpaca.display()),
            "lora.r=64".into(),
            "lora.lora_alpha=64".into(),
            "training.max_steps=6".into(),
            "training.save_steps=3".into(),
            "training.optim=adamw_8bit".into(),
        ];
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    train("002-qlora-sft-alpaca.toml", &out, &overrides(&[]));
    let whole = std::fs::read(out.join("final_model/adapter_model.safetensors")).unwrap();
    let (opt, _) = qdistill_common::checkpoint::load_optimizer(&out.join("checkpoint-3/optimizer.safetensors")).unwrap();
    let state1 = opt.iter().find(|(n, _)| n == "state1").expect("the checkpoint holds 8-bit codes");
    assert_eq!(state1.1.dtype(), candle_core::DType::U8);
    std::fs::remove_dir_all(out.join("final_model")).unwrap();
    train("002-qlora-sft-alpaca.toml", &out, &overrides(&["training.resume_from_checkpoint=true"]));
    let resumed = std::fs::read(out.join("final_model/adapter_model.safetensors")).unwrap();
    assert!(resumed == whole, "the resumed 8-bit run wrote a different adapter");
}
