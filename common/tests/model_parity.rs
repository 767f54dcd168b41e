//! Whole-model checks against fixtures written by HF transformers and PEFT
//! (scripts/fixtures/make_model_fixtures.py): logits of tiny random models of every
//! supported architecture, and the gradients of a PEFT LoRA model — the independent
//! reference for the hand-written backward of the whole network.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use qdistill_common::lora::{LoraGrads, LoraParams, LoraSpec};
use qdistill_common::loss::{fused_linear_distill, KdLoss, LossConfig, TeacherOutput};
use qdistill_common::model::decoder::{LoadOptions, StepCtx};
use qdistill_common::model::{Model, ModelConfig};
use qdistill_common::weights::WeightStore;

fn fixture(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures").join(rel)
}

fn load_io(dir: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(dir.join("io.safetensors"), &Device::Cpu).unwrap()
}

fn load_model(dir: &Path, nf4: bool, dtype: DType) -> Model {
    let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    let store = WeightStore::open(dir).unwrap();
    Model::load(&store, &cfg, &LoadOptions { keep_layers: None, nf4, double_quant: false, device: Device::Cpu, dtype }).unwrap()
}

fn ids_and_positions(io: &HashMap<String, Tensor>) -> (Tensor, Tensor) {
    let ids = io["input_ids"].to_dtype(DType::U32).unwrap();
    let (b, t) = ids.dims2().unwrap();
    let pos: Vec<u32> = (0..b).flat_map(|_| 0..t as u32).collect();
    (ids, Tensor::from_vec(pos, (b, t), &Device::Cpu).unwrap())
}

fn max_rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap().to_vec1::<f64>().unwrap();
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-12);
    a.iter().zip(&b).fold(0f64, |m, (x, y)| m.max((x - y).abs())) / scale
}

fn check_logits(name: &str) {
    let dir = fixture(&format!("models/{name}"));
    let model = load_model(&dir, false, DType::F32);
    let io = load_io(&dir);
    let (ids, pos) = ids_and_positions(&io);
    let ctx = StepCtx { position_ids: &pos, segment_ids: None, lora: None, dropout_seed: None };
    let h = model.forward_hidden(&ids, &ctx).unwrap();
    let logits = model.logits(&h).unwrap();
    let want = io["logits"].reshape(logits.shape()).unwrap();
    let err = max_rel_err(&logits, &want);
    println!("{name}: max |Δlogit| / max |logit| = {err:.2e}");
    assert!(err < 1e-5, "{name}: logits differ from transformers by {err:.2e} (relative to the largest logit)");
}

#[test]
fn llama_logits_match_transformers() {
    check_logits("llama");
}
#[test]
fn smollm_tied_logits_match_transformers() {
    check_logits("smollm");
}
#[test]
fn mistral_sliding_window_logits_match_transformers() {
    check_logits("mistral");
}
#[test]
fn qwen2_bias_logits_match_transformers() {
    check_logits("qwen2");
}
#[test]
fn gemma_logits_match_transformers() {
    check_logits("gemma");
}
#[test]
fn gemma2_logits_match_transformers() {
    check_logits("gemma2");
}
#[test]
fn sharded_checkpoint_loads_like_single_file() {
    let a = load_model(&fixture("models/llama"), false, DType::F32);
    let b = load_model(&fixture("models/llama-sharded"), false, DType::F32);
    let io = load_io(&fixture("models/llama"));
    let (ids, pos) = ids_and_positions(&io);
    let ctx = StepCtx { position_ids: &pos, segment_ids: None, lora: None, dropout_seed: None };
    let ha = a.forward_hidden(&ids, &ctx).unwrap();
    let hb = b.forward_hidden(&ids, &ctx).unwrap();
    assert_eq!(max_rel_err(&ha, &hb), 0.0);
}

/// A PEFT adapter loaded into our layout, plus the PEFT fixture's tensors.
struct PeftCase {
    model: Model,
    params: LoraParams,
    io: HashMap<String, Tensor>,
    dir: PathBuf,
}

fn peft_case(name: &str, base: &str) -> PeftCase {
    let dir = fixture(&format!("models/{name}"));
    let acfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap()).unwrap();
    let mut targets: Vec<String> =
        acfg["target_modules"].as_array().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect();
    targets.sort();
    let spec = LoraSpec {
        r: acfg["r"].as_u64().unwrap() as usize,
        lora_alpha: acfg["lora_alpha"].as_f64().unwrap(),
        lora_dropout: 0.0,
        use_rslora: acfg["use_rslora"].as_bool().unwrap_or(false),
        target_modules: targets,
    };
    let mut model = load_model(&fixture(&format!("models/{base}")), false, DType::F32);
    let modules = model.attach_lora(&spec).unwrap();
    let mut params = LoraParams::init(&spec, &modules, 0);
    let adapter = candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu).unwrap();
    let tensors: Vec<(String, Tensor)> = adapter.into_iter().collect();
    params.load_peft_tensors(&tensors, &dir).unwrap();
    PeftCase { model, params, io: load_io(&dir), dir }
}

/// HF's causal-LM shift: position t predicts labels[t+1]; the last position predicts nothing.
fn shifted_labels(labels: &Tensor) -> Vec<i64> {
    let rows = labels.to_vec2::<i64>().unwrap();
    rows.iter().flat_map(|r| r[1..].iter().copied().chain(std::iter::once(-100))).collect()
}

fn check_grads(case: &PeftCase, grads: &LoraGrads, file: &str, tol: f64) {
    let want = candle_core::safetensors::load(case.dir.join(file), &Device::Cpu).unwrap();
    let r = case.params.spec.r;
    let mut worst = 0f64;
    for e in &case.params.entries {
        for (name, off, shape) in [
            (e.peft_a_name(), e.a_offset, (r, e.in_features)),
            (e.peft_b_name(), e.b_offset, (e.out_features, r)),
        ] {
            let n = shape.0 * shape.1;
            let got = Tensor::from_slice(&grads.flat[off..off + n], shape, &Device::Cpu).unwrap();
            let w = want.get(&name).unwrap_or_else(|| panic!("{file} has no {name}"));
            let err = max_rel_err(&got, w);
            worst = worst.max(err);
            assert!(err < tol, "{name}: gradient differs from PEFT by {err:.2e} (relative to its largest entry)");
        }
    }
    println!("{file}: worst relative gradient error {worst:.2e}");
}

fn run_step(case: &PeftCase, teacher: bool, loss: &LossConfig, checkpointing: bool) -> (LoraGrads, f64) {
    let (ids, pos) = ids_and_positions(&case.io);
    let labels = shifted_labels(&case.io["labels"]);
    let n_valid = labels.iter().filter(|&&l| l >= 0).count();
    let lora = case.params.to_device(&Device::Cpu, DType::F32).unwrap();
    let ctx = StepCtx { position_ids: &pos, segment_ids: None, lora: Some(&lora), dropout_seed: None };
    let base_ctx = StepCtx { position_ids: &pos, segment_ids: None, lora: None, dropout_seed: None };
    let h_t = teacher.then(|| case.model.forward_hidden(&ids, &base_ctx).unwrap());
    let (h, saved) = case.model.forward_train(&ids, &ctx, checkpointing).unwrap();
    let t_out = match &h_t {
        Some(h) => TeacherOutput::Hidden { h, lm_head: case.model.lm_head(), softcap: case.model.cfg.final_logit_softcapping },
        None => TeacherOutput::None,
    };
    let out = fused_linear_distill(&h, case.model.lm_head(), &labels, t_out, loss, 1.0 / n_valid as f64).unwrap();
    let mut grads = LoraGrads::zeros(&case.params);
    case.model.backward(&out.dh, saved, &ctx, &case.params, &mut grads).unwrap();
    let t2 = loss.temperature * loss.temperature;
    (grads, (loss.ce_weight * out.ce_sum + loss.kd_weight * t2 * out.kd_sum) / n_valid as f64)
}

fn ce_only() -> LossConfig {
    LossConfig { ce_weight: 1.0, kd_weight: 0.0, kd: KdLoss::ForwardKl, temperature: 1.0, chunk_tokens: 7, student_softcap: None }
}

#[test]
fn peft_adapter_gives_peft_logits() {
    let case = peft_case("llama-peft", "llama");
    let (ids, pos) = ids_and_positions(&case.io);
    let lora = case.params.to_device(&Device::Cpu, DType::F32).unwrap();
    let ctx = StepCtx { position_ids: &pos, segment_ids: None, lora: Some(&lora), dropout_seed: None };
    let logits = case.model.logits(&case.model.forward_hidden(&ids, &ctx).unwrap()).unwrap();
    let err = max_rel_err(&logits, &case.io["logits"].reshape(logits.shape()).unwrap());
    assert!(err < 1e-4, "logits with the PEFT adapter differ by {err:.2e}");
}

#[test]
fn lora_gradients_match_peft_cross_entropy() {
    let case = peft_case("llama-peft", "llama");
    for ckpt in [false, true] {
        let (grads, loss) = run_step(&case, false, &ce_only(), ckpt);
        let want = case.io["loss_ce"].to_vec1::<f32>().unwrap()[0] as f64;
        assert!((loss - want).abs() < 1e-5 * want.abs().max(1.0), "CE {loss} vs PEFT {want}");
        check_grads(&case, &grads, "grads_ce.safetensors", 1e-4);
    }
}

#[test]
fn lora_gradients_match_peft_distillation() {
    let case = peft_case("llama-peft", "llama");
    let cfg = LossConfig { ce_weight: 1.0, kd_weight: 0.5, kd: KdLoss::ForwardKl, temperature: 2.0, chunk_tokens: 5, student_softcap: None };
    let (grads, loss) = run_step(&case, true, &cfg, true);
    let want = case.io["distill_loss"].to_vec1::<f32>().unwrap()[0] as f64;
    assert!((loss - want).abs() < 1e-5 * want.abs().max(1.0), "distillation loss {loss} vs PEFT {want}");
    check_grads(&case, &grads, "grads_distill.safetensors", 1e-4);
}

#[test]
fn gemma2_rslora_gradients_match_peft() {
    let case = peft_case("gemma2-peft", "gemma2");
    let mut cfg = ce_only();
    cfg.student_softcap = case.model.cfg.final_logit_softcapping;
    let (grads, loss) = run_step(&case, false, &cfg, false);
    let want = case.io["loss_ce"].to_vec1::<f32>().unwrap()[0] as f64;
    assert!((loss - want).abs() < 1e-5 * want.abs().max(1.0), "CE {loss} vs PEFT {want}");
    check_grads(&case, &grads, "grads_ce.safetensors", 1e-4);
}

#[test]
fn prequantized_bitsandbytes_checkpoint_gives_its_logits() {
    // save_pretrained of a BitsAndBytesConfig(load_in_4bit, nf4, double quant) model: the
    // u8 codes and quant state are used as stored, in NF4 and dequantized to dense.
    let dir = fixture("models/llama-bnb4");
    let io = load_io(&dir);
    let (ids, pos) = ids_and_positions(&io);
    for nf4 in [true, false] {
        let model = load_model(&dir, nf4, DType::F32);
        let ctx = StepCtx { position_ids: &pos, segment_ids: None, lora: None, dropout_seed: None };
        let logits = model.logits(&model.forward_hidden(&ids, &ctx).unwrap()).unwrap();
        let err = max_rel_err(&logits, &io["logits"].reshape(logits.shape()).unwrap());
        assert!(err < 1e-5, "bnb 4-bit checkpoint (kept as NF4: {nf4}): logits differ from bitsandbytes by {err:.2e}");
    }
}

#[test]
fn a_tensor_of_the_wrong_shape_is_named() {
    let dir = fixture("models/llama");
    let mut cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
    cfg.intermediate_size += 8;
    let store = WeightStore::open(&dir).unwrap();
    let opts = LoadOptions { keep_layers: None, nf4: false, double_quant: false, device: Device::Cpu, dtype: DType::F32 };
    let err = Model::load(&store, &cfg, &opts).err().expect("a shape mismatch must fail").to_string();
    assert!(err.contains("model.layers.0.mlp.gate_proj.weight") && err.contains("[136, 64]"), "{err}");
}
