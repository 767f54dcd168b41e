//! Resolving a model spec (HF dir, hub id, GGUF file) into a loaded model + tokenizer.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
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
pub fn open(path: &Path) -> Result<(WeightStore, ModelConfig, TokenizerInfo)> {
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
    Ok((store, cfg, tok))
}

pub fn load(path: &Path, keep_layers: Option<Vec<usize>>, nf4: bool, double_quant: bool, device: &Device, dtype: DType) -> Result<LoadedModel> {
    let (store, cfg, tokenizer) = open(path)?;
    if tokenizer.tokenizer.get_vocab_size(true) > cfg.vocab_size {
        return Err(Error::Mismatch(format!(
            "{}: the tokenizer has {} tokens but the model's embedding has only {} rows",
            path.display(),
            tokenizer.tokenizer.get_vocab_size(true),
            cfg.vocab_size
        )));
    }
    let model = Model::load(&store, &cfg, &LoadOptions { keep_layers, nf4, double_quant, device: device.clone(), dtype })?;
    Ok(LoadedModel { model, tokenizer, path: path.to_path_buf() })
}
