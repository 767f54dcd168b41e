//! `model.random_init` / `teacher.random_init`: a job whose model directories hold only
//! config.json and a tokenizer trains end to end on random weights of those shapes. The
//! reference for the shapes is PEFT's adapter layout computed here from config.json:
//! lora_A [r, in_features] and lora_B [out_features, r] for each linear of each layer.

use std::path::Path;

use candle_core::Device;

mod common;
use common::{root, write_tokenizer, write_word_text};

/// The tiny Llama fixture's config.json and the character tokenizer, without weights.
fn weightless_llama(dir: &Path) -> std::path::PathBuf {
    let model = dir.join("llama-config-only");
    std::fs::create_dir_all(&model).unwrap();
    std::fs::copy(root().join("tests/fixtures/models/llama/config.json"), model.join("config.json")).unwrap();
    write_tokenizer(&model);
    model
}

#[test]
fn a_random_init_job_trains_and_its_adapter_has_the_configs_shapes() {
    let tmp = tempfile::tempdir().unwrap();
    let model = weightless_llama(tmp.path());
    let data = tmp.path().join("train.jsonl");
    write_word_text(&data);
    let cfg = tmp.path().join("job.toml");
    let r = 4;
    std::fs::write(
        &cfg,
        format!(
            "output_dir = \"{out}\"\nseed = 3\n[model]\nmodel_name_or_path = \"{m}\"\nrandom_init = true\n\
             [teacher]\nmode = \"model\"\nmodel_name_or_path = \"{m}\"\nquantization = \"nf4\"\nrandom_init = true\n\
             [lora]\nr = {r}\nlora_alpha = 8\n[data]\ntrain_file = \"{d}\"\nmax_seq_length = 64\n\
             [training]\nper_device_train_batch_size = 4\nmax_steps = 3\nlearning_rate = 1e-2\nlogging_steps = 1\n",
            out = tmp.path().join("out").display(),
            m = model.display(),
            d = data.display()
        ),
    )
    .unwrap();
    let summary = qdistill_worker::run::train(&cfg, &[], false).unwrap();
    assert_eq!(summary.steps, 3);
    assert!(summary.last_loss.is_finite() && summary.last_loss > 0.0, "{}", summary.last_loss);

    let hf: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap()).unwrap();
    let get = |k: &str| hf[k].as_u64().unwrap() as usize;
    let (d, f) = (get("hidden_size"), get("intermediate_size"));
    let (q, kv) = (get("num_attention_heads") * get("head_dim"), get("num_key_value_heads") * get("head_dim"));
    let linears = [
        ("self_attn.q_proj", d, q),
        ("self_attn.k_proj", d, kv),
        ("self_attn.v_proj", d, kv),
        ("self_attn.o_proj", q, d),
        ("mlp.gate_proj", d, f),
        ("mlp.up_proj", d, f),
        ("mlp.down_proj", f, d),
    ];
    let mut want: Vec<(String, Vec<usize>)> = Vec::new();
    for layer in 0..get("num_hidden_layers") {
        for (name, inf, outf) in linears {
            let base = format!("base_model.model.model.layers.{layer}.{name}");
            want.push((format!("{base}.lora_A.weight"), vec![r, inf]));
            want.push((format!("{base}.lora_B.weight"), vec![outf, r]));
        }
    }
    want.sort();
    let saved = candle_core::safetensors::load(summary.output.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    let mut got: Vec<(String, Vec<usize>)> = saved.iter().map(|(k, t)| (k.clone(), t.dims().to_vec())).collect();
    got.sort();
    assert_eq!(got, want);
    // Training moved the adapters: lora_B starts at zero (PEFT) and is not zero any more.
    let moved = saved.iter().filter(|(k, _)| k.contains("lora_B")).any(|(_, t)| {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().any(|&x| x != 0.0)
    });
    assert!(moved, "no lora_B changed in 3 steps");
}

#[test]
fn without_random_init_a_weightless_model_is_refused_by_name() {
    let tmp = tempfile::tempdir().unwrap();
    let model = weightless_llama(tmp.path());
    let data = tmp.path().join("train.jsonl");
    write_word_text(&data);
    let cfg = tmp.path().join("job.toml");
    std::fs::write(
        &cfg,
        format!(
            "output_dir = \"{out}\"\n[model]\nmodel_name_or_path = \"{m}\"\n[data]\ntrain_file = \"{d}\"\n[training]\nmax_steps = 1\n",
            out = tmp.path().join("out").display(),
            m = model.display(),
            d = data.display()
        ),
    )
    .unwrap();
    let e = format!("{:#}", qdistill_worker::run::train(&cfg, &[], false).err().unwrap());
    assert!(e.contains("llama-config-only") && e.contains("model.random_init"), "{e}");
    assert!(!tmp.path().join("out").exists(), "a refused start wrote {}", tmp.path().join("out").display());
}
