//! Folding a LoRA adapter into its base model, as PEFT's `merge_and_unload()` does:
//! every adapted linear becomes `W' = W + scaling · B · A` (`scaling` = alpha / r, or
//! alpha / √r with rsLoRA), and the result is written as a plain HF model directory that
//! `AutoModelForCausalLM.from_pretrained` loads:
//!
//! ```text
//! model.safetensors                 (or model-0000k-of-0000n.safetensors + model.safetensors.index.json)
//! config.json                       the base's (rebuilt from metadata for a GGUF), dtype set
//! generation_config.json            when the base has one (GGUF: bos/eos ids)
//! tokenizer.json, tokenizer_config.json, special_tokens_map.json, …
//! ```
//!
//! Bases may be HF directories (dense or bitsandbytes 4-bit), single safetensors files or
//! GGUF files; quantized weights (NF4, GGUF blocks) are dequantized to f32 before the sum,
//! so the merged model is dense. The sum is formed in f32 and rounded once to the output
//! dtype (PEFT adds a delta already rounded to the weight's dtype: the two can differ by
//! one bf16 ulp).
//!
//! An adapter trained on a depth-pruned student (`model.keep_layers`) names the student's
//! layers 0..k; the merged model is that student: the kept layers of the base, renumbered.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use safetensors::tensor::Dtype;
use serde_json::{json, Value};

use crate::checkpoint::{load_adapter, write_dir_atomically, TensorBytes, ADAPTER_CONFIG_NAME};
use crate::model::ModelConfig;
use crate::nf4::Nf4Tensor;
use crate::tokenizer::{tokenizer_from_gguf, TokenizerInfo};
use crate::weights::{hf_config_from_gguf, WeightStore};
use crate::{Error, Result};

/// PEFT's prefix of adapter tensor names (`PeftModel` → `LoraModel` → the base model).
const PEFT_PREFIX: &str = "base_model.model.";
/// The resolved training config saved next to adapters by `qdistill train`.
const QDISTILL_CONFIG_NAME: &str = "qdistill_config.toml";
/// HF's default `max_shard_size` of `save_pretrained` ("5GB", decimal).
pub const DEFAULT_MAX_SHARD_SIZE: u64 = 5_000_000_000;
/// Tokenizer files an HF directory may have; those present are copied as they are.
const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
];
/// Side tensors of a bitsandbytes 4-bit weight `<name>` (`<name>.<suffix>`).
const BNB_SIDE_SUFFIXES: &[&str] =
    &["absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4"];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergeDtype {
    BF16,
    F32,
}

impl MergeDtype {
    /// `bf16`/`bfloat16` or `f32`/`float32`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "bf16" | "bfloat16" => Ok(Self::BF16),
            "f32" | "float32" => Ok(Self::F32),
            other => Err(Error::Config(format!("--dtype {other:?} is not one of bf16, f32"))),
        }
    }

    /// The name config.json uses (`torch_dtype` / `dtype`).
    pub fn hf_name(self) -> &'static str {
        match self {
            Self::BF16 => "bfloat16",
            Self::F32 => "float32",
        }
    }

    fn size(self) -> usize {
        match self {
            Self::BF16 => 2,
            Self::F32 => 4,
        }
    }
}

#[derive(Debug, Clone)]
pub struct MergeOptions {
    pub dtype: MergeDtype,
    /// Base layers the adapter was trained on, in student order; None = all layers.
    pub keep_layers: Option<Vec<usize>>,
    /// A shard is closed before a tensor that would take it past this many bytes (HF's
    /// rule; a larger tensor gets a shard of its own).
    pub max_shard_size: u64,
}

impl Default for MergeOptions {
    fn default() -> Self {
        Self { dtype: MergeDtype::BF16, keep_layers: None, max_shard_size: DEFAULT_MAX_SHARD_SIZE }
    }
}

/// What a merge did, for the log.
#[derive(Debug, Clone, PartialEq)]
pub struct MergeReport {
    /// Linear layers that received `scaling · B · A`.
    pub merged_modules: usize,
    pub scaling: f64,
    pub tensors: usize,
    /// Bytes of tensor data written.
    pub bytes: u64,
    /// Safetensors files written (1 = a single `model.safetensors`).
    pub shards: usize,
    /// Weights stored as bitsandbytes NF4 in the base, dequantized before merging.
    pub dequantized_nf4: usize,
    pub from_gguf: bool,
    pub num_hidden_layers: usize,
}

/// HF's `convert_file_size_to_int`: "5GB" = 5·10⁹, "5GiB" = 5·2³⁰, "500MB", "100KB", or a
/// plain byte count.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let units: [(&str, u64); 7] = [
        ("GIB", 1 << 30),
        ("MIB", 1 << 20),
        ("KIB", 1 << 10),
        ("GB", 1_000_000_000),
        ("MB", 1_000_000),
        ("KB", 1_000),
        ("B", 1),
    ];
    let upper = t.to_ascii_uppercase();
    let (num, mult) = units
        .iter()
        .find_map(|(u, m)| upper.strip_suffix(u).map(|n| (n.trim().to_string(), *m)))
        .unwrap_or((upper.clone(), 1));
    match num.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok((v * mult as f64) as u64),
        _ => Err(Error::Config(format!("size {s:?} is not a positive size such as \"5GB\", \"500MB\" or a byte count"))),
    }
}

/// The `model.keep_layers` of the run that wrote `adapter_dir`, from the
/// `qdistill_config.toml` that `qdistill train` saves beside the adapter; None when the
/// file is absent or keeps every layer.
pub fn trained_keep_layers(adapter_dir: &Path) -> Result<Option<Vec<usize>>> {
    let path = adapter_dir.join(QDISTILL_CONFIG_NAME);
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let table: toml::Table = toml::from_str(&text).map_err(|e| Error::format(&path, e.to_string()))?;
    let bad = || Error::format(&path, "`model.keep_layers` must be a layer spec such as \"0-13,24-29\" or a list of indices");
    match table.get("model").and_then(|m| m.get("keep_layers")) {
        None => Ok(None),
        Some(toml::Value::String(s)) => crate::config::parse_layer_spec(s).map(Some),
        Some(toml::Value::Integer(i)) => Ok(Some(vec![usize::try_from(*i).map_err(|_| bad())?])),
        Some(toml::Value::Array(a)) => a
            .iter()
            .map(|v| v.as_integer().and_then(|i| usize::try_from(i).ok()).ok_or_else(bad))
            .collect::<Result<Vec<_>>>()
            .map(Some),
        Some(_) => Err(bad()),
    }
}

/// One output tensor, already in the output dtype.
type OutTensor = TensorBytes;

fn encode(values: &[f32], shape: Vec<usize>, dtype: MergeDtype) -> OutTensor {
    let mut bytes = Vec::with_capacity(values.len() * dtype.size());
    match dtype {
        MergeDtype::F32 => values.iter().for_each(|v| bytes.extend_from_slice(&v.to_le_bytes())),
        MergeDtype::BF16 => {
            values.iter().for_each(|v| bytes.extend_from_slice(&half::bf16::from_f32(*v).to_le_bytes()))
        }
    }
    let dtype = match dtype {
        MergeDtype::F32 => Dtype::F32,
        MergeDtype::BF16 => Dtype::BF16,
    };
    OutTensor { dtype, shape, bytes }
}

/// Writes tensors into shards as they come, so that only one shard is ever in memory.
struct ShardWriter<'a> {
    dir: &'a Path,
    max: u64,
    pending: Vec<(String, OutTensor)>,
    pending_bytes: u64,
    /// (temporary file name, tensor names) of each finished shard.
    written: Vec<(String, Vec<String>)>,
    total_bytes: u64,
}

impl<'a> ShardWriter<'a> {
    fn new(dir: &'a Path, max: u64) -> Self {
        Self { dir, max, pending: Vec::new(), pending_bytes: 0, written: Vec::new(), total_bytes: 0 }
    }

    fn push(&mut self, name: String, t: OutTensor) -> Result<()> {
        let n = t.bytes.len() as u64;
        if !self.pending.is_empty() && self.pending_bytes + n > self.max {
            self.flush()?;
        }
        self.pending_bytes += n;
        self.total_bytes += n;
        self.pending.push((name, t));
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        let file = format!(".shard-{}.safetensors", self.written.len());
        let path = self.dir.join(&file);
        // transformers refuses safetensors files whose metadata lacks format = "pt".
        let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
        safetensors::tensor::serialize_to_file(self.pending.iter().map(|(n, t)| (n.as_str(), t)), Some(meta), &path)
            .map_err(|e| Error::format(&path, e.to_string()))?;
        let names = self.pending.drain(..).map(|(n, _)| n).collect();
        self.written.push((file, names));
        self.pending_bytes = 0;
        Ok(())
    }

    /// Names the shards as `save_pretrained` does: one file is `model.safetensors`;
    /// several are `model-0000k-of-0000n.safetensors` with an index.
    fn finish(mut self) -> Result<(usize, u64)> {
        if !self.pending.is_empty() || self.written.is_empty() {
            self.flush()?;
        }
        let n = self.written.len();
        let rename = |from: &str, to: &str| {
            std::fs::rename(self.dir.join(from), self.dir.join(to)).map_err(|e| Error::io(self.dir.join(to), e))
        };
        if n == 1 {
            rename(&self.written[0].0, "model.safetensors")?;
            return Ok((1, self.total_bytes));
        }
        let mut weight_map = serde_json::Map::new();
        for (k, (tmp, names)) in self.written.iter().enumerate() {
            let file = format!("model-{:05}-of-{n:05}.safetensors", k + 1);
            rename(tmp, &file)?;
            for name in names {
                weight_map.insert(name.clone(), Value::String(file.clone()));
            }
        }
        let index = json!({"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map});
        write_json(&self.dir.join("model.safetensors.index.json"), &index)?;
        Ok((n, self.total_bytes))
    }
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    // serde_json's map is sorted: the keys come out as `json.dumps(sort_keys=True)` writes them.
    let mut text = serde_json::to_string_pretty(v).map_err(|e| Error::format(path, e.to_string()))?;
    text.push('\n');
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

/// Sort key that orders `model.layers.10` after `model.layers.9`.
fn natural_key(name: &str) -> Vec<(u64, String)> {
    name.split('.').map(|p| p.parse::<u64>().map_or((u64::MAX, p.to_string()), |n| (n, String::new()))).collect()
}

/// `model.layers.<i>.<rest>` → (i, rest).
fn layer_of(name: &str) -> Option<(usize, &str)> {
    let rest = name.strip_prefix("model.layers.")?;
    let (i, tail) = rest.split_once('.')?;
    Some((i.parse().ok()?, tail))
}

/// The adapter's LoRA pairs by adapted weight name: `<module>.weight` → (A, B, A's name).
fn lora_pairs(adapter_dir: &Path, tensors: Vec<(String, Tensor)>) -> Result<BTreeMap<String, (Tensor, Tensor, String)>> {
    let weights = adapter_dir.join(crate::checkpoint::ADAPTER_WEIGHTS_NAME);
    let mut a: HashMap<String, (Tensor, String)> = HashMap::new();
    let mut b: HashMap<String, Tensor> = HashMap::new();
    for (name, t) in tensors {
        let module = name.strip_prefix(PEFT_PREFIX).ok_or_else(|| {
            Error::format(&weights, format!("tensor `{name}` does not start with PEFT's `{PEFT_PREFIX}`"))
        })?;
        // load_adapter has checked that every name ends in one of these, in pairs.
        if let Some(m) = module.strip_suffix(".lora_A.weight") {
            a.insert(m.to_string(), (t, name.clone()));
        } else if let Some(m) = module.strip_suffix(".lora_B.weight") {
            b.insert(m.to_string(), t);
        }
    }
    let mut out = BTreeMap::new();
    for (m, (ta, name_a)) in a {
        let tb = b.remove(&m).ok_or_else(|| Error::MissingTensor { path: weights.clone(), name: format!("{PEFT_PREFIX}{m}.lora_B.weight") })?;
        out.insert(format!("{m}.weight"), (ta, tb, name_a));
    }
    Ok(out)
}

/// The base's config.json as JSON, and its parsed form.
fn base_config(store: &WeightStore, base: &Path) -> Result<(Value, ModelConfig, Option<PathBuf>)> {
    if let Some(content) = store.gguf_content() {
        let v = hf_config_from_gguf(content, base)?;
        let cfg = ModelConfig::from_json(&v, base)?;
        return Ok((v, cfg, None));
    }
    let dir = if base.is_dir() { base.to_path_buf() } else { base.parent().unwrap_or(Path::new(".")).to_path_buf() };
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| Error::format(&path, e.to_string()))?;
    let cfg = ModelConfig::from_json(&v, &path)?;
    Ok((v, cfg, Some(dir)))
}

/// config.json of the merged model: the base's, with the output dtype, without the
/// quantization it no longer has, and restricted to the kept layers.
fn merged_config(mut v: Value, cfg: &ModelConfig, keep: &[usize], dtype: MergeDtype, tok: Option<&TokenizerInfo>) -> Value {
    let obj = v.as_object_mut().expect("config.json is an object (ModelConfig parsed it)");
    // transformers ≥ 4.56 reads `dtype`, older versions `torch_dtype`.
    obj.insert("torch_dtype".into(), json!(dtype.hf_name()));
    obj.insert("dtype".into(), json!(dtype.hf_name()));
    obj.remove("quantization_config");
    if keep.len() != cfg.num_hidden_layers || keep.iter().enumerate().any(|(i, &k)| i != k) {
        obj.insert("num_hidden_layers".into(), json!(keep.len()));
        if let Some(Value::Array(types)) = obj.get("layer_types").cloned() {
            obj.insert("layer_types".into(), Value::Array(keep.iter().map(|&i| types[i].clone()).collect()));
        } else if cfg.model_type == "gemma2" {
            // Without layer_types Gemma2 alternates by index, which renumbering would shift.
            let types: Vec<&str> = keep
                .iter()
                .map(|&i| if cfg.layer_window[i].is_some() { "sliding_attention" } else { "full_attention" })
                .collect();
            obj.insert("layer_types".into(), json!(types));
        }
    }
    if let Some(t) = tok {
        // A GGUF base: what transformers' GGUF loader would fill in.
        let arch = match cfg.model_type.as_str() {
            "mistral" => "MistralForCausalLM",
            "qwen2" => "Qwen2ForCausalLM",
            _ => "LlamaForCausalLM",
        };
        obj.insert("architectures".into(), json!([arch]));
        obj.insert("bos_token_id".into(), json!(t.bos_id));
        obj.insert("eos_token_id".into(), json!(t.eos_id));
        obj.insert("pad_token_id".into(), json!(t.pad_id));
    }
    v
}

/// tokenizer.json, tokenizer_config.json and special_tokens_map.json for a tokenizer
/// rebuilt from GGUF metadata.
fn write_gguf_tokenizer(dir: &Path, tok: &TokenizerInfo, unk_token: Option<String>, model_max_length: usize) -> Result<()> {
    let mut tokenizer = tok.tokenizer.clone();
    if tok.add_bos {
        // PreTrainedTokenizerFast adds special tokens only through the post-processor.
        let bos = tok.bos_token.clone().zip(tok.bos_id).ok_or_else(|| {
            Error::Tokenizer(format!("{}: add_bos_token is set but the vocabulary has no BOS token", tok.source.display()))
        })?;
        let err = |e: tokenizers::Error| Error::Tokenizer(format!("BOS post-processor: {e}"));
        let tp = tokenizers::processors::template::TemplateProcessing::builder()
            .try_single(format!("{}:0 $A:0", bos.0))
            .map_err(|e| Error::Tokenizer(e.to_string()))?
            .try_pair(format!("{b}:0 $A:0 {b}:1 $B:1", b = bos.0))
            .map_err(|e| Error::Tokenizer(e.to_string()))?
            .special_tokens(vec![(bos.0.clone(), bos.1)])
            .build()
            .map_err(|e| err(e.into()))?;
        tokenizer.with_post_processor(Some(tp));
    }
    let path = dir.join("tokenizer.json");
    tokenizer.save(&path, true).map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
    let pad = tok.tokenizer.id_to_token(tok.pad_id);
    let mut special = serde_json::Map::new();
    special.insert("eos_token".into(), json!(tok.eos_token));
    if let Some(b) = &tok.bos_token {
        special.insert("bos_token".into(), json!(b));
    }
    if let Some(p) = &pad {
        special.insert("pad_token".into(), json!(p));
    }
    if let Some(u) = &unk_token {
        special.insert("unk_token".into(), json!(u));
    }
    write_json(&dir.join("special_tokens_map.json"), &Value::Object(special.clone()))?;
    let mut cfg = special;
    cfg.insert("add_bos_token".into(), json!(tok.add_bos));
    cfg.insert("add_eos_token".into(), json!(false));
    cfg.insert("clean_up_tokenization_spaces".into(), json!(false));
    cfg.insert("model_max_length".into(), json!(model_max_length));
    cfg.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
    if let Some(t) = &tok.chat_template {
        cfg.insert("chat_template".into(), json!(t));
    }
    write_json(&dir.join("tokenizer_config.json"), &Value::Object(cfg))
}

/// Everything the merged directory is made from.
struct MergePlan<'a> {
    base: &'a Path,
    adapter_dir: &'a Path,
    store: WeightStore,
    cfg_json: Value,
    cfg: ModelConfig,
    /// The base's directory, for its tokenizer and generation config (None for a GGUF).
    base_dir: Option<PathBuf>,
    gguf_tok: Option<TokenizerInfo>,
    keep: Vec<usize>,
    /// (output name, base name), in the order they are written.
    tensors: Vec<(String, String)>,
    pairs: BTreeMap<String, (Tensor, Tensor, String)>,
    scaling: f64,
}

/// Merges the adapter in `adapter_dir` into the base at `base` and writes the merged
/// model to `out` (atomically: `out` appears complete or not at all).
pub fn merge_adapter(base: &Path, adapter_dir: &Path, out: &Path, opts: &MergeOptions) -> Result<MergeReport> {
    let acfg_path = adapter_dir.join(ADAPTER_CONFIG_NAME);
    if !acfg_path.exists() {
        return Err(Error::format(
            adapter_dir,
            format!("no {ADAPTER_CONFIG_NAME}: not a PEFT adapter directory (qdistill writes them as <output_dir>/final_model or checkpoint-<step>)"),
        ));
    }
    let (acfg, adapter_tensors) = load_adapter(adapter_dir)?;
    let pairs = lora_pairs(adapter_dir, adapter_tensors)?;

    let store = WeightStore::open(base)?;
    let (cfg_json, cfg, base_dir) = base_config(&store, base)?;
    let keep: Vec<usize> = opts.keep_layers.clone().unwrap_or_else(|| (0..cfg.num_hidden_layers).collect());
    if let Some(&bad) = keep.iter().find(|&&i| i >= cfg.num_hidden_layers) {
        return Err(Error::Config(format!(
            "keep_layers names layer {bad}, but {} has only {} layers",
            base.display(),
            cfg.num_hidden_layers
        )));
    }
    let gguf_tok = match store.gguf_content() {
        Some(content) => Some(tokenizer_from_gguf(content, base)?),
        None => None,
    };

    // Layers not kept are dropped, the others renumbered; the side tensors of bitsandbytes
    // weights are folded into their weight.
    let new_index: HashMap<usize, usize> = keep.iter().enumerate().map(|(new, &old)| (old, new)).collect();
    let mut tensors: Vec<(String, String)> = Vec::new();
    for name in store.names() {
        let bnb_side = BNB_SIDE_SUFFIXES
            .iter()
            .any(|s| name.strip_suffix(s).and_then(|w| w.strip_suffix('.')).is_some_and(|w| store.is_bnb_4bit(w)));
        if bnb_side {
            continue;
        }
        let out_name = match layer_of(&name) {
            Some((i, tail)) => match new_index.get(&i) {
                Some(n) => format!("model.layers.{n}.{tail}"),
                None => continue,
            },
            None => name.clone(),
        };
        tensors.push((out_name, name));
    }
    tensors.sort_by_key(|(o, _)| natural_key(o));

    if gguf_tok.is_some() {
        tracing::info!(base = %base.display(), "GGUF base: tensors are dequantized to f32 and llama.cpp's q/k row order is undone before merging");
    }
    let plan = MergePlan {
        base,
        adapter_dir,
        store,
        cfg_json,
        cfg,
        base_dir,
        gguf_tok,
        keep,
        tensors,
        pairs,
        scaling: acfg.scaling(),
    };
    let mut report = None;
    write_dir_atomically(out, |dir| {
        report = Some(plan.write(dir, opts)?);
        Ok(())
    })?;
    let report = report.expect("write_dir_atomically succeeded, so the fill ran");
    if report.dequantized_nf4 > 0 {
        tracing::info!(
            weights = report.dequantized_nf4,
            "NF4 (bitsandbytes 4-bit) base weights were dequantized to f32 before merging: the merged model is dense"
        );
    }
    Ok(report)
}

impl MergePlan<'_> {
    fn write(mut self, dir: &Path, opts: &MergeOptions) -> Result<MergeReport> {
        let mut shards = ShardWriter::new(dir, opts.max_shard_size);
        let (mut dequantized_nf4, mut merged_modules) = (0, 0);
        for (out_name, name) in &self.tensors {
            let (mut values, shape) = if self.store.is_bnb_4bit(name) {
                let q = Nf4Tensor::from_bnb_tensors(self.store.path(), name, |n| self.store.get_native(n).ok())?;
                dequantized_nf4 += 1;
                (q.dequantize(), vec![q.rows, q.cols])
            } else {
                let t = self.store.get_any_shape(name, &Device::Cpu)?;
                let shape = t.dims().to_vec();
                (t.flatten_all()?.to_vec1::<f32>()?, shape)
            };
            if let Some((a, b, a_name)) = self.pairs.remove(out_name) {
                let delta = (b.matmul(&a)? * self.scaling)?;
                if delta.dims() != shape.as_slice() {
                    return Err(Error::Mismatch(format!(
                        "adapter {}: `{a_name}` and its lora_B make a {:?} update, but `{name}` of the base {} is {:?}: \
                         the adapter was trained on a different base model",
                        self.adapter_dir.display(),
                        delta.dims(),
                        self.base.display(),
                        shape
                    )));
                }
                let delta = delta.flatten_all()?.to_vec1::<f32>()?;
                values.iter_mut().zip(&delta).for_each(|(w, d)| *w += d);
                merged_modules += 1;
            }
            shards.push(out_name.clone(), encode(&values, shape, opts.dtype))?;
        }
        if let Some((weight, (_, _, a_name))) = self.pairs.iter().next() {
            let among = if self.keep.len() < self.cfg.num_hidden_layers {
                format!(" among the {} kept layers", self.keep.len())
            } else {
                String::new()
            };
            return Err(Error::Mismatch(format!(
                "adapter {}: `{a_name}` adapts `{weight}`, which the base {} does not have{among}: \
                 the adapter was trained on a different base model",
                self.adapter_dir.display(),
                self.base.display(),
            )));
        }
        let (n_shards, bytes) = shards.finish()?;

        let config = merged_config(self.cfg_json.clone(), &self.cfg, &self.keep, opts.dtype, self.gguf_tok.as_ref());
        write_json(&dir.join("config.json"), &config)?;
        if let Some(src) = &self.base_dir {
            let mut tokenizer_files = 0;
            for f in TOKENIZER_FILES.iter().chain(&["generation_config.json"]) {
                let from = src.join(f);
                if from.is_file() {
                    std::fs::copy(&from, dir.join(f)).map_err(|e| Error::io(&from, e))?;
                    tokenizer_files += usize::from(*f != "generation_config.json");
                }
            }
            if tokenizer_files == 0 {
                tracing::warn!(base = %src.display(), "the base has no tokenizer files; the merged model has none either");
            }
        }
        if let Some(tok) = &self.gguf_tok {
            let unk = self
                .store
                .gguf_content()
                .and_then(|c| c.metadata.get("tokenizer.ggml.unknown_token_id"))
                .and_then(|v| v.to_u32().ok())
                .and_then(|id| tok.tokenizer.id_to_token(id));
            write_gguf_tokenizer(dir, tok, unk, self.cfg.max_position_embeddings)?;
            let gen = json!({"bos_token_id": tok.bos_id, "eos_token_id": tok.eos_id, "pad_token_id": tok.pad_id});
            write_json(&dir.join("generation_config.json"), &gen)?;
        }
        Ok(MergeReport {
            merged_modules,
            scaling: self.scaling,
            tensors: self.tensors.len(),
            bytes,
            shards: n_shards,
            dequantized_nf4,
            from_gguf: self.gguf_tok.is_some(),
            num_hidden_layers: self.keep.len(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use candle_core::{DType, Device, Tensor};
    use safetensors::SafeTensors;

    use super::*;
    use crate::checkpoint::{save_adapter, AdapterConfig};
    use crate::model::decoder::{LoadOptions, StepCtx};
    use crate::model::Model;
    use crate::tokenizer::test_assets;

    fn models() -> PathBuf {
        test_assets::fixture("models")
    }

    fn f32_opts() -> MergeOptions {
        MergeOptions { dtype: MergeDtype::F32, ..Default::default() }
    }

    /// Every tensor of a safetensors file (or of the shards an index names) widened to
    /// f64, read with the safetensors crate alone.
    fn read_raw(dir: &Path) -> BTreeMap<String, (Vec<usize>, Vec<f64>)> {
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.exists() {
            let v: Value = serde_json::from_str(&std::fs::read_to_string(&index).unwrap()).unwrap();
            let mut f: Vec<String> = v["weight_map"].as_object().unwrap().values().map(|s| s.as_str().unwrap().to_string()).collect();
            f.sort();
            f.dedup();
            f.iter().map(|s| dir.join(s)).collect()
        } else if dir.is_dir() {
            vec![dir.join("model.safetensors")]
        } else {
            vec![dir.to_path_buf()]
        };
        let mut out = BTreeMap::new();
        for f in files {
            let bytes = std::fs::read(&f).unwrap();
            let st = SafeTensors::deserialize(&bytes).unwrap();
            for (name, view) in st.tensors() {
                let d = view.data();
                let vals: Vec<f64> = match view.dtype() {
                    Dtype::F32 => d.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64).collect(),
                    Dtype::BF16 => d.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f64()).collect(),
                    Dtype::U8 => d.iter().map(|&b| b as f64).collect(),
                    other => panic!("{name}: {other:?}"),
                };
                out.insert(name, (view.shape().to_vec(), vals));
            }
        }
        out
    }

    /// Logits of the model in `dir` as our loader reads it, on `ids` [1, T].
    fn our_logits(dir: &Path, ids: &Tensor) -> Tensor {
        let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
        let store = WeightStore::open(dir).unwrap();
        let opts = LoadOptions { keep_layers: None, nf4: false, double_quant: false, device: Device::Cpu, dtype: DType::F32 };
        let model = Model::load(&store, &cfg, &opts).unwrap();
        let t = ids.dim(1).unwrap();
        let pos = Tensor::arange(0u32, t as u32, &Device::Cpu).unwrap().reshape((1, t)).unwrap();
        let ctx = StepCtx { position_ids: &pos, segment_ids: None, lora: None, dropout_seed: None };
        model.logits(&model.forward_hidden(ids, &ctx).unwrap()).unwrap()
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(a.len(), b.len());
        a.iter().zip(&b).map(|(x, y)| (x - y).abs() as f64).fold(0.0, f64::max)
    }

    /// The fixture's input ids and PEFT's merge_and_unload() logits.
    fn peft_reference(adapter: &str) -> (Tensor, Tensor) {
        let io = candle_core::safetensors::load(test_assets::fixture(&format!("merge/{adapter}.safetensors")), &Device::Cpu).unwrap();
        (io["input_ids"].to_dtype(DType::U32).unwrap(), io["logits"].clone())
    }

    #[test]
    fn merged_model_matches_peft_merge_and_unload() {
        let tmp = tempfile::tempdir().unwrap();
        for (adapter, base) in [("llama-peft", "llama"), ("gemma2-peft", "gemma2")] {
            let (ids, want) = peft_reference(adapter);
            let logits_of = |opts: &MergeOptions, name: &str| {
                let out = tmp.path().join(format!("{adapter}-{name}"));
                let rep = merge_adapter(&models().join(base), &models().join(adapter), &out, opts).unwrap();
                assert_eq!(rep.merged_modules, 7 * rep.num_hidden_layers, "{adapter}");
                (our_logits(&out, &ids).reshape(want.shape()).unwrap(), rep, out)
            };
            let (f32_logits, rep, out) = logits_of(&f32_opts(), "f32");
            assert_eq!(rep.shards, 1);
            let d32 = max_abs_diff(&f32_logits, &want);
            assert!(d32 < 1e-4, "{adapter} f32: max |Δlogits| {d32:.3e}");
            let cfg: Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
            assert_eq!((cfg["dtype"].as_str(), cfg["torch_dtype"].as_str()), (Some("float32"), Some("float32")));
            assert!(out.join("generation_config.json").exists());

            // Shards of at most 100 kB: several files and an index, same model.
            let sharded = MergeOptions { max_shard_size: parse_size("100KB").unwrap(), ..f32_opts() };
            let (sh_logits, rep, out) = logits_of(&sharded, "sharded");
            assert!(rep.shards > 2, "{adapter}: {} shards", rep.shards);
            assert!(out.join(format!("model-00001-of-{:05}.safetensors", rep.shards)).exists());
            assert!(!out.join("model.safetensors").exists());
            assert_eq!(max_abs_diff(&sh_logits, &f32_logits), 0.0);

            // bf16 rounds every weight (relative 2^-9): close to PEFT's f32 merge, and far
            // closer than the adapter's own effect (≥ 2 on these logits).
            let (bf16_logits, _, _) = logits_of(&MergeOptions::default(), "bf16");
            let d16 = max_abs_diff(&bf16_logits, &want);
            assert!(d16 < 0.1, "{adapter} bf16: max |Δlogits| {d16:.3e}");
            eprintln!("{adapter}: max |Δlogits| vs PEFT merge_and_unload: f32 {d32:.2e}, bf16 {d16:.2e}");
        }
    }

    fn adapter_config(dir: &Path) -> Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json")).unwrap()).unwrap()
    }

    /// W' = W + s·B·A with a triple loop in f64 on the raw file contents; every tensor the
    /// adapter does not touch is copied bit for bit.
    fn assert_naive_merge(base: &BTreeMap<String, (Vec<usize>, Vec<f64>)>, adapter_dir: &Path, merged: &Path) {
        let acfg = adapter_config(adapter_dir);
        let (alpha, r) = (acfg["lora_alpha"].as_f64().unwrap(), acfg["r"].as_f64().unwrap());
        let s = if acfg["use_rslora"].as_bool().unwrap() { alpha / r.sqrt() } else { alpha / r };
        let lora = read_raw(&adapter_dir.join("adapter_model.safetensors"));
        let merged = read_raw(merged);
        assert_eq!(merged.keys().collect::<Vec<_>>(), base.keys().collect::<Vec<_>>());
        let mut adapted = 0;
        for (name, (shape, w)) in base {
            let (mshape, m) = &merged[name];
            assert_eq!(mshape, shape, "{name}");
            let module = name.strip_suffix(".weight").unwrap_or(name);
            let Some((ashape, a)) = lora.get(&format!("base_model.model.{module}.lora_A.weight")) else {
                assert_eq!(m, w, "{name} is not adapted and must be unchanged");
                continue;
            };
            let (_, b) = &lora[&format!("base_model.model.{module}.lora_B.weight")];
            let (out, inp, rank) = (shape[0], shape[1], ashape[0]);
            let mut worst = 0f64;
            for i in 0..out {
                for j in 0..inp {
                    let ba: f64 = (0..rank).map(|k| b[i * rank + k] * a[k * inp + j]).sum();
                    let want = w[i * inp + j] + s * ba;
                    worst = worst.max((m[i * inp + j] - want).abs() / want.abs().max(1e-3));
                }
            }
            assert!(worst < 1e-5, "{name}: relative error {worst:.2e}");
            adapted += 1;
        }
        assert_eq!(adapted, lora.len() / 2);
    }

    #[test]
    fn merged_weights_are_base_plus_scaled_lora_product() {
        let tmp = tempfile::tempdir().unwrap();
        for (adapter, base) in [("llama-peft", "llama"), ("gemma2-peft", "gemma2")] {
            let out = tmp.path().join(adapter);
            merge_adapter(&models().join(base), &models().join(adapter), &out, &f32_opts()).unwrap();
            assert_naive_merge(&read_raw(&models().join(base)), &models().join(adapter), &out);
        }
    }

    /// The llama-peft adapter with every lora_B zeroed, in `dir`.
    fn zero_adapter(dir: &Path) -> PathBuf {
        let (cfg, tensors) = load_adapter(&models().join("llama-peft")).unwrap();
        let zeroed: Vec<(String, Tensor)> = tensors
            .into_iter()
            .map(|(n, t)| if n.contains("lora_B") { (n, t.zeros_like().unwrap()) } else { (n, t) })
            .collect();
        let out = dir.join("zero-adapter");
        save_adapter(&out, &zeroed, &cfg).unwrap();
        out
    }

    #[test]
    fn nf4_base_is_dequantized_then_merged() {
        let tmp = tempfile::tempdir().unwrap();
        let bnb = models().join("llama-bnb4");
        // With B = 0 the merged model is the dequantized base: its logits must be those of
        // the network with bitsandbytes' own dequantization of every 4-bit weight.
        let dense = tmp.path().join("dense");
        let rep = merge_adapter(&bnb, &zero_adapter(tmp.path()), &dense, &f32_opts()).unwrap();
        assert_eq!(rep.dequantized_nf4, 14);
        let io = candle_core::safetensors::load(bnb.join("io.safetensors"), &Device::Cpu).unwrap();
        let ids = io["input_ids"].to_dtype(DType::U32).unwrap();
        let want = &io["logits"];
        let mut worst = 0f64;
        for row in 0..ids.dim(0).unwrap() {
            let got = our_logits(&dense, &ids.narrow(0, row, 1).unwrap());
            worst = worst.max(max_abs_diff(&got, &want.get(row).unwrap()));
        }
        assert!(worst < 1e-4, "max |Δlogits| vs bitsandbytes' dequantization: {worst:.3e}");
        let cfg: Value = serde_json::from_str(&std::fs::read_to_string(dense.join("config.json")).unwrap()).unwrap();
        assert!(cfg.get("quantization_config").is_none(), "the merged model is not quantized");
        let names = read_raw(&dense);
        assert!(names.keys().all(|n| n.ends_with(".weight")), "bitsandbytes side tensors were copied: {:?}", names.keys());

        // The real adapter on top of that dequantized base.
        let merged = tmp.path().join("merged");
        merge_adapter(&bnb, &models().join("llama-peft"), &merged, &f32_opts()).unwrap();
        assert_naive_merge(&names, &models().join("llama-peft"), &merged);
    }

    #[test]
    fn adapter_of_another_base_names_the_tensor_and_writes_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let (cfg, mut tensors) = load_adapter(&models().join("llama-peft")).unwrap();
        // q_proj's A made for a 96-wide input: the product no longer fits the base's 64x64.
        let a_name = "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight";
        let t = tensors.iter_mut().find(|(n, _)| n == a_name).unwrap();
        t.1 = Tensor::ones((4, 96), DType::F32, &Device::Cpu).unwrap();
        let wrong = tmp.path().join("wrong-shape");
        save_adapter(&wrong, &tensors, &cfg).unwrap();
        let out = tmp.path().join("out");
        let e = merge_adapter(&models().join("llama"), &wrong, &out, &f32_opts()).unwrap_err().to_string();
        assert!(e.contains(a_name) && e.contains("model.layers.1.self_attn.q_proj.weight") && e.contains("[64, 96]"), "{e}");
        assert!(!out.exists());
        // Layer 1 is dropped by keep_layers = [0]: its adapter has nowhere to go.
        let opts = MergeOptions { keep_layers: Some(vec![0]), ..f32_opts() };
        let e = merge_adapter(&models().join("llama"), &models().join("llama-peft"), &out, &opts).unwrap_err().to_string();
        assert!(e.contains("base_model.model.model.layers.1.") && e.contains("among the 1 kept layers"), "{e}");
        assert!(!out.exists());
        let opts = MergeOptions { keep_layers: Some(vec![0, 2]), ..f32_opts() };
        let e = merge_adapter(&models().join("llama"), &models().join("llama-peft"), &out, &opts).unwrap_err().to_string();
        assert!(e.contains("keep_layers names layer 2") && e.contains("only 2 layers"), "{e}");
    }

    #[test]
    fn missing_adapter_config_is_named() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("not-an-adapter");
        std::fs::create_dir(&dir).unwrap();
        std::fs::copy(models().join("llama-peft/adapter_model.safetensors"), dir.join("adapter_model.safetensors")).unwrap();
        let out = tmp.path().join("out");
        let e = merge_adapter(&models().join("llama"), &dir, &out, &f32_opts()).unwrap_err().to_string();
        assert!(e.contains("not-an-adapter") && e.contains("no adapter_config.json"), "{e}");
        assert!(!out.exists());
    }

    /// SmolLM2 from GGUF, depth-pruned to layers 0 and 29, with a random adapter on q, k and
    /// down projections: the merged directory, read back by our HF-directory loader, must
    /// give the logits of the GGUF model running the adapter unmerged (the LoRA branch of
    /// the forward pass), and its tokenizer files must tokenize like transformers.
    #[test]
    fn gguf_base_merges_into_an_hf_directory() {
        use crate::config::{LoraSection, TargetModules};
        use crate::lora::{LoraParams, LoraSpec};
        use crate::tokenizer::load_hf_tokenizer;
        let Some(gguf) = test_assets::smollm2_gguf() else { return };
        let tmp = tempfile::tempdir().unwrap();
        let keep = vec![0, 29];
        let targets: Vec<String> = ["q_proj", "k_proj", "down_proj"].map(String::from).to_vec();
        let spec = LoraSpec { r: 2, lora_alpha: 4.0, lora_dropout: 0.0, use_rslora: false, target_modules: targets.clone() };

        let store = WeightStore::open(&gguf).unwrap();
        let cfg = ModelConfig::from_json(&hf_config_from_gguf(store.gguf_content().unwrap(), &gguf).unwrap(), &gguf).unwrap();
        let opts = LoadOptions { keep_layers: Some(keep.clone()), nf4: false, double_quant: false, device: Device::Cpu, dtype: DType::F32 };
        let mut model = Model::load(&store, &cfg, &opts).unwrap();
        let modules = model.attach_lora(&spec).unwrap();
        let mut tensors = Vec::new();
        for (k, (m, inp, out)) in modules.iter().enumerate() {
            let a = Tensor::randn(0f32, 0.05, (2, *inp), &Device::Cpu).unwrap();
            // Different per module, so that a module merged into the wrong weight shows.
            let b = Tensor::randn(0f32, 0.05 * (1.0 + k as f32 / 4.0), (*out, 2), &Device::Cpu).unwrap();
            tensors.push((format!("base_model.model.{m}.lora_A.weight"), a));
            tensors.push((format!("base_model.model.{m}.lora_B.weight"), b));
        }
        let section = LoraSection { r: 2, lora_alpha: 4.0, lora_dropout: 0.0, target_modules: TargetModules::Names(targets), use_rslora: false };
        let adapter = tmp.path().join("adapter");
        save_adapter(&adapter, &tensors, &AdapterConfig::new(None, &section)).unwrap();
        let mut params = LoraParams::init(&spec, &modules, 0);
        params.load_peft_tensors(&tensors, &adapter).unwrap();
        let lora = params.to_device(&Device::Cpu, DType::F32).unwrap();

        let out = tmp.path().join("merged");
        let mopts = MergeOptions { keep_layers: Some(keep), ..f32_opts() };
        let rep = merge_adapter(&gguf, &adapter, &out, &mopts).unwrap();
        assert_eq!((rep.merged_modules, rep.num_hidden_layers, rep.from_gguf), (6, 2, true));

        let reference = test_assets::read_fixture("smollm2/reference.json");
        let ids_all = test_assets::ids_of(&reference["input_ids"]);
        let ids = Tensor::from_slice(&ids_all[..16], (1, 16), &Device::Cpu).unwrap();
        let pos = Tensor::arange(0u32, 16, &Device::Cpu).unwrap().reshape((1, 16)).unwrap();
        let with = StepCtx { position_ids: &pos, segment_ids: None, lora: Some(&lora), dropout_seed: None };
        let without = StepCtx { lora: None, ..with };
        let unmerged = model.logits(&model.forward_hidden(&ids, &with).unwrap()).unwrap();
        let base = model.logits(&model.forward_hidden(&ids, &without).unwrap()).unwrap();
        let merged = our_logits(&out, &ids);
        let (d, effect) = (max_abs_diff(&merged, &unmerged), max_abs_diff(&base, &unmerged));
        eprintln!("GGUF merge: max |Δlogits| merged vs unmerged {d:.2e}; adapter effect {effect:.2}");
        assert!(effect > 0.5 && d < 1e-3 * effect.max(1.0), "merged vs unmerged {d:.3e}, adapter effect {effect:.3e}");

        let cfg_out: Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
        assert_eq!(cfg_out["num_hidden_layers"], 2);
        assert_eq!(cfg_out["architectures"], json!(["LlamaForCausalLM"]));
        // transformers' ids of the reference text (GGUF tokenizer, no special tokens).
        let tok = load_hf_tokenizer(&out).unwrap();
        let text = reference["eval_text"].as_str().unwrap();
        assert_eq!(tok.encode(text, false).unwrap(), ids_all);
        assert_eq!(tok.encode(text, true).unwrap(), ids_all, "add_bos_token is false for SmolLM2");
        let gguf_tok = test_assets::smollm2().unwrap();
        assert_eq!((tok.eos_id, tok.bos_id, tok.pad_id, tok.add_bos), (gguf_tok.eos_id, gguf_tok.bos_id, gguf_tok.pad_id, false));
        assert_eq!(tok.chat_template, gguf_tok.chat_template);
        assert_eq!(tok.special_ids(), gguf_tok.special_ids());
    }

    #[test]
    fn bos_post_processor_when_the_gguf_adds_bos() {
        use crate::tokenizer::load_hf_tokenizer;
        let Some(mut tok) = test_assets::smollm2() else { return };
        tok.add_bos = true;
        let dir = tempfile::tempdir().unwrap();
        write_gguf_tokenizer(dir.path(), &tok, None, 2048).unwrap();
        let back = load_hf_tokenizer(dir.path()).unwrap();
        assert!(back.add_bos);
        let plain = tok.encode("Hello world", false).unwrap();
        let with = back.encode("Hello world", true).unwrap();
        assert_eq!(with[0], tok.bos_id.unwrap());
        assert_eq!(&with[1..], plain.as_slice());
        assert_eq!(back.encode("Hello world", false).unwrap(), plain);
    }

    #[test]
    fn sizes_parse_like_hf() {
        assert_eq!(parse_size("5GB").unwrap(), 5_000_000_000);
        assert_eq!(parse_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_size("500MB").unwrap(), 500_000_000);
        assert_eq!(parse_size("100kb").unwrap(), 100_000);
        assert_eq!(parse_size("12345").unwrap(), 12345);
        assert!(parse_size("0GB").is_err() && parse_size("lots").is_err());
    }

    #[test]
    fn keep_layers_come_from_the_saved_training_config() {
        let tmp = tempfile::tempdir().unwrap();
        assert_eq!(trained_keep_layers(tmp.path()).unwrap(), None);
        std::fs::write(tmp.path().join("qdistill_config.toml"), "[model]\nkeep_layers = \"0-2,5\"\n").unwrap();
        assert_eq!(trained_keep_layers(tmp.path()).unwrap(), Some(vec![0, 1, 2, 5]));
        std::fs::write(tmp.path().join("qdistill_config.toml"), "[model]\nkeep_layers = [4, 1]\n").unwrap();
        assert_eq!(trained_keep_layers(tmp.path()).unwrap(), Some(vec![4, 1]));
        std::fs::write(tmp.path().join("qdistill_config.toml"), "[model]\nmodel_name_or_path = \"m\"\n").unwrap();
        assert_eq!(trained_keep_layers(tmp.path()).unwrap(), None);
    }
}
