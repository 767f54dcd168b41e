//! Resolving a model spec (HF dir, hub id, GGUF file) into a loaded model + tokenizer, or,
//! for benchmarks (`random_init`), into a model of config.json's shapes with random weights.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device};
use qdistill_common::config::{Quantization, TrainConfig};
use qdistill_common::model::decoder::LoadOptions;
use qdistill_common::model::{Model, ModelConfig};
use qdistill_common::tokenizer::{load_hf_tokenizer, tokenizer_from_gguf, TokenizerInfo};
use qdistill_common::weights::{hf_config_from_gguf, WeightStore};
use qdistill_common::{Error, Result};

pub struct LoadedModel {
    pub model: Model,
    pub tokenizer: TokenizerInfo,
    pub path: PathBuf,
}

/// Opens the weights and tokenizer at `path` (already resolved to a local dir or file).
/// The weights are None for a directory that holds no safetensors at all (config.json and
/// tokenizer only): enough for everything but reading weights, which [`load`] refuses.
pub fn open(path: &Path) -> Result<(Option<WeightStore>, ModelConfig, TokenizerInfo)> {
    let weightless = path.is_dir() && !path.join("model.safetensors").exists() && !path.join("model.safetensors.index.json").exists();
    if weightless {
        let cfg = ModelConfig::from_file(&path.join("config.json"))?;
        return Ok((None, cfg, load_hf_tokenizer(path)?));
    }
    let store = WeightStore::open(path)?;
    let (cfg, tok) = match store.gguf_content() {
        Some(content) => {
            let cfg_json = hf_config_from_gguf(content, path)?;
            (ModelConfig::from_json(&cfg_json, path)?, tokenizer_from_gguf(content, path)?)
        }
        None => {
            let dir = if path.is_dir() { path.to_path_buf() } else { path.parent().unwrap_or(Path::new(".")).to_path_buf() };
            let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
            (cfg, load_hf_tokenizer(&dir)?)
        }
    };
    Ok((Some(store), cfg, tok))
}

fn check_vocab(path: &Path, cfg: &ModelConfig, tokenizer: &TokenizerInfo) -> Result<()> {
    if tokenizer.tokenizer.get_vocab_size(true) > cfg.vocab_size {
        return Err(Error::Mismatch(format!(
            "{}: the tokenizer has {} tokens but the model's embedding has only {} rows",
            path.display(),
            tokenizer.tokenizer.get_vocab_size(true),
            cfg.vocab_size
        )));
    }
    Ok(())
}

pub fn load(path: &Path, keep_layers: Option<Vec<usize>>, nf4: bool, double_quant: bool, device: &Device, dtype: DType) -> Result<LoadedModel> {
    let (store, cfg, tokenizer) = open(path)?;
    check_vocab(path, &cfg, &tokenizer)?;
    let Some(store) = store else {
        return Err(Error::Config(format!(
            "{} holds config.json but no weights (model.safetensors or model.safetensors.index.json); for a benchmark \
             with random weights of its shapes set `model.random_init = true` (`teacher.random_init` for a teacher)",
            path.display()
        )));
    };
    let model = Model::load(&store, &cfg, &LoadOptions { keep_layers, nf4, double_quant, device: device.clone(), dtype })?;
    Ok(LoadedModel { model, tokenizer, path: path.to_path_buf() })
}

/// Which of a job's models a random build is for: each draws from its own stream of the
/// job seed, so a teacher and its student are different random models even when they
/// share config.json, while every rank building one of them gets the same weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RandomRole {
    Student,
    Teacher,
}

/// The seed of `role`'s random weights in a job seeded with `job_seed` (SplitMix64 of the
/// pair, so neighbouring job seeds give unrelated streams).
pub fn random_seed(job_seed: u64, role: RandomRole) -> u64 {
    let tag: u64 = match role {
        RandomRole::Student => 0x5354_5544_454E_5431,
        RandomRole::Teacher => 0x5445_4143_4845_5231,
    };
    let mut z = job_seed.wrapping_add(tag).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A model of the shapes of `path`'s config.json with random weights (see
/// [`Model::random`]; NF4 codes drawn directly when `nf4`), with `path`'s tokenizer. Reads
/// no weight file, so `path` may hold config.json and the tokenizer only.
pub fn load_random(
    path: &Path,
    keep_layers: Option<Vec<usize>>,
    nf4: bool,
    double_quant: bool,
    device: &Device,
    dtype: DType,
    seed: u64,
) -> Result<LoadedModel> {
    let (_, cfg, tokenizer) = open(path)?;
    check_vocab(path, &cfg, &tokenizer)?;
    // Loud on purpose: an adapter trained on random weights is meaningless outside a benchmark.
    tracing::warn!(
        model = %path.display(), seed, nf4, layers = keep_layers.as_ref().map_or(cfg.num_hidden_layers, Vec::len),
        "RANDOM WEIGHTS (random_init = true): no weights are read; this model is random, for benchmarks only"
    );
    let started = Instant::now();
    let model = Model::random(&cfg, &LoadOptions { keep_layers, nf4, double_quant, device: device.clone(), dtype }, seed)?;
    tracing::warn!(model = %path.display(), seconds = started.elapsed().as_secs_f64(), "RANDOM WEIGHTS built");
    Ok(LoadedModel { model, tokenizer, path: path.to_path_buf() })
}

/// The student base of job `cfg` from `path`: read, or random with `model.random_init`.
pub fn load_student(cfg: &TrainConfig, path: &Path, device: &Device, dtype: DType) -> Result<LoadedModel> {
    let m = &cfg.model;
    let nf4 = m.quantization == Quantization::Nf4;
    match m.random_init {
        true => load_random(path, m.keep_layers.clone(), nf4, m.bnb_4bit_use_double_quant, device, dtype, random_seed(cfg.seed, RandomRole::Student)),
        false => load(path, m.keep_layers.clone(), nf4, m.bnb_4bit_use_double_quant, device, dtype),
    }
}

/// The teacher model of job `cfg` from `path` (`keep_layers = Some(vec![])`: its
/// embedding and LM head only): read, or random with `teacher.random_init`. A random
/// build draws the embedding and LM head before any block, so a head-only build holds the
/// full teacher's head exactly.
pub fn load_teacher(cfg: &TrainConfig, path: &Path, keep_layers: Option<Vec<usize>>, device: &Device, dtype: DType) -> Result<LoadedModel> {
    let nf4 = cfg.teacher.quantization == Quantization::Nf4;
    match cfg.teacher.random_init {
        true => load_random(path, keep_layers, nf4, true, device, dtype, random_seed(cfg.seed, RandomRole::Teacher)),
        false => load(path, keep_layers, nf4, true, device, dtype),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use qdistill_common::lora::LoraSpec;

    fn fixture(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models").join(name)
    }

    /// A WordLevel tokenizer of `<pad>`, `</s>` and the lowercase letters (fits the
    /// fixtures' vocabulary of 256).
    fn write_tokenizer(dir: &Path) {
        let mut vocab = serde_json::Map::new();
        for (i, t) in ["<pad>", "</s>"].into_iter().map(String::from).chain(('a'..='z').map(String::from)).enumerate() {
            vocab.insert(t, i.into());
        }
        let tok = serde_json::json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
            "pre_tokenizer": {"type": "Split", "pattern": {"Regex": "."}, "behavior": "Isolated", "invert": false},
            "post_processor": null, "decoder": null,
            "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<pad>"}
        });
        std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
        let cfg = serde_json::json!({"eos_token": "</s>", "pad_token": "<pad>"});
        std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
    }

    /// Fixture `name` as an HF directory with weights (`with_weights`) or as config.json
    /// and the tokenizer only.
    fn copy_fixture(name: &str, dir: &Path, with_weights: bool) -> PathBuf {
        let dst = dir.join(if with_weights { format!("{name}-weights") } else { name.to_string() });
        std::fs::create_dir_all(&dst).unwrap();
        std::fs::copy(fixture(name).join("config.json"), dst.join("config.json")).unwrap();
        if with_weights {
            std::fs::copy(fixture(name).join("model.safetensors"), dst.join("model.safetensors")).unwrap();
        }
        write_tokenizer(&dst);
        dst
    }

    fn all_linears() -> LoraSpec {
        LoraSpec {
            r: 2,
            lora_alpha: 4.0,
            lora_dropout: 0.0,
            use_rslora: false,
            target_modules: qdistill_common::config::LINEAR_MODULES.iter().map(|s| s.to_string()).collect(),
        }
    }

    /// Every tensor's shape, in a fixed order: embedding, LM head, final norm, then each
    /// linear as LoRA sees it (module path, in, out).
    fn shapes(m: &mut Model) -> (Vec<Vec<usize>>, Vec<(String, usize, usize)>) {
        let dense = vec![m.embed.dims().to_vec(), m.lm_head().dims().to_vec(), m.norm.dims().to_vec(), vec![m.blocks.len()]];
        (dense, m.attach_lora(&all_linears()).unwrap())
    }

    #[test]
    fn a_weightless_dir_builds_the_shapes_the_loaded_model_has() {
        let tmp = tempfile::tempdir().unwrap();
        for name in ["llama", "qwen2", "gemma2"] {
            let with_weights = copy_fixture(name, tmp.path(), true);
            let dir = copy_fixture(name, tmp.path(), false);
            for (nf4, keep) in [(false, None), (true, None), (true, Some(vec![1]))] {
                let mut loaded = load(&with_weights, keep.clone(), nf4, true, &Device::Cpu, DType::F32).unwrap().model;
                let mut random = load_random(&dir, keep.clone(), nf4, true, &Device::Cpu, DType::F32, 7).unwrap().model;
                assert_eq!(shapes(&mut random), shapes(&mut loaded), "{name} nf4={nf4} keep={keep:?}");
                assert_eq!(random.base_memory_bytes(), loaded.base_memory_bytes(), "{name} nf4={nf4}");
            }
            // Reading weights from it is refused by name, pointing at the switch.
            let e = load(&dir, None, false, true, &Device::Cpu, DType::F32).err().unwrap().to_string();
            assert!(e.contains(&dir.display().to_string()) && e.contains("random_init"), "{e}");
        }
    }

    #[test]
    fn every_rank_builds_the_same_teacher_and_the_roles_differ() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = copy_fixture("llama", tmp.path(), false);
        let text = format!(
            "output_dir = \"o\"\nseed = 5\n[model]\nmodel_name_or_path = \"{d}\"\nrandom_init = true\n[teacher]\n\
             model_name_or_path = \"{d}\"\nquantization = \"nf4\"\nrandom_init = true\n[data]\ntrain_file = \"t.jsonl\"\n",
            d = dir.display()
        );
        let cfg = qdistill_common::config::parse(&text, qdistill_common::config::ConfigFormat::Toml, "job.toml", &[]).unwrap();
        let vec = |t: &candle_core::Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        // The teacher rank's full model and a student rank's head-only copy.
        let teacher = load_teacher(&cfg, &dir, None, &Device::Cpu, DType::F32).unwrap().model;
        let head = load_teacher(&cfg, &dir, Some(Vec::new()), &Device::Cpu, DType::F32).unwrap().model;
        assert_eq!(head.blocks.len(), 0);
        assert_eq!(vec(head.lm_head()), vec(teacher.lm_head()));
        assert_eq!(vec(&head.embed), vec(&teacher.embed));
        // A second teacher rank (another process, same job seed) builds the same blocks.
        let again = load_teacher(&cfg, &dir, None, &Device::Cpu, DType::F32).unwrap().model;
        let mut a = teacher;
        let mut b = again;
        let (x, y) = (a.attach_lora(&all_linears()).unwrap(), b.attach_lora(&all_linears()).unwrap());
        assert_eq!(x, y);
        let h = |m: &Model| {
            let ids = candle_core::Tensor::new(&[[3u32, 17, 40, 99, 5]], &Device::Cpu).unwrap();
            let pos = candle_core::Tensor::new(&[[0u32, 1, 2, 3, 4]], &Device::Cpu).unwrap();
            let ctx = qdistill_common::model::decoder::StepCtx { position_ids: &pos, segment_ids: None, lora: None, dropout_seed: None };
            vec(&m.forward_hidden(&ids, &ctx).unwrap())
        };
        assert_eq!(h(&a), h(&b), "two builds of one teacher differ");
        // The student's base comes from another stream of the same seed.
        let student = load_student(&cfg, &dir, &Device::Cpu, DType::F32).unwrap().model;
        assert_ne!(vec(&student.embed), vec(&a.embed));
        assert_ne!(random_seed(5, RandomRole::Student), random_seed(5, RandomRole::Teacher));
        assert_ne!(random_seed(5, RandomRole::Teacher), random_seed(6, RandomRole::Teacher));
    }
}
