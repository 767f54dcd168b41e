//! Checkpoints in the layout HF Trainer + PEFT use, so that `PeftModel.from_pretrained`
//! reads our adapters and we read theirs:
//!
//! ```text
//! <output_dir>/checkpoint-<step>/
//!     adapter_model.safetensors   PEFT names, f32
//!     adapter_config.json         PEFT LoraConfig
//!     optimizer.safetensors       AdamW moments (+ metadata)
//!     trainer_state.json          HF TrainerState + our data cursor and RNG state
//! ```
//!
//! A checkpoint dir appears whole or not at all: [`write_dir_atomically`] fills a hidden
//! temp dir, fsyncs it and renames it into place, so a crash mid-save never leaves a
//! half-written `checkpoint-N` that resuming would pick up.

use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Dtype, SafeTensors, View};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

use crate::config::LoraSection;
use crate::{Error, Result};

pub const ADAPTER_WEIGHTS_NAME: &str = "adapter_model.safetensors";
pub const ADAPTER_CONFIG_NAME: &str = "adapter_config.json";
pub const OPTIMIZER_NAME: &str = "optimizer.safetensors";
pub const TRAINER_STATE_NAME: &str = "trainer_state.json";
/// HF's `PREFIX_CHECKPOINT_DIR`.
pub const CHECKPOINT_PREFIX: &str = "checkpoint";

// ---------------------------------------------------------------------------------------
// adapter_config.json

/// PEFT's `adapter_config.json` for a LoRA adapter. PEFT adds fields with every release;
/// those we do not model are kept in `extra` (and written back on save). The few of them
/// that change what the weights mean must be off, see [`AdapterConfig::check`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterConfig {
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    pub peft_type: String,
    #[serde(default)]
    pub task_type: Option<String>,
    pub r: usize,
    /// PEFT types this as int; written as an integer when it is one.
    #[serde(serialize_with = "ser_int_if_integral")]
    pub lora_alpha: f64,
    #[serde(default)]
    pub lora_dropout: f64,
    /// Module names, or module paths: PEFT matches an entry against a module path by
    /// equality or as a `.`-separated suffix (see [`AdapterConfig::targets_module`]).
    #[serde(deserialize_with = "de_target_modules")]
    pub target_modules: Vec<String>,
    #[serde(default)]
    pub use_rslora: bool,
    #[serde(default = "bias_none")]
    pub bias: String,
    #[serde(default)]
    pub fan_in_fan_out: bool,
    #[serde(default = "yes")]
    pub inference_mode: bool,
    /// true, or a PEFT init scheme name ("gaussian", "pissa", …); only matters before
    /// training.
    #[serde(default = "init_true")]
    pub init_lora_weights: Value,
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    #[serde(default)]
    pub layers_to_transform: Option<Value>,
    #[serde(default)]
    pub revision: Option<String>,
    /// Fields of newer PEFT versions that this struct does not name.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// PEFT options that change what an adapter's weights mean (DoRA magnitudes, per-module
/// ranks, LoRA biases, replicated layers, extra trained tokens, …). An adapter that uses
/// any of them cannot be read as plain LoRA, so they must be absent or off.
const UNSUPPORTED_PEFT_OPTIONS: &[&str] = &[
    "use_dora",
    "rank_pattern",
    "alpha_pattern",
    "lora_bias",
    "layer_replication",
    "target_parameters",
    "trainable_token_indices",
    "use_qalora",
    "alora_invocation_tokens",
];

fn is_off(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::Object(m) => m.is_empty(),
        Value::Array(a) => a.is_empty(),
        _ => false,
    }
}

fn bias_none() -> String {
    "none".into()
}
fn yes() -> bool {
    true
}
fn init_true() -> Value {
    Value::Bool(true)
}

fn ser_int_if_integral<S: Serializer>(v: &f64, s: S) -> std::result::Result<S::Ok, S::Error> {
    if v.fract() == 0.0 && v.abs() < 9.0e15 {
        s.serialize_i64(*v as i64)
    } else {
        s.serialize_f64(*v)
    }
}

/// PEFT saves target_modules as a list, or as a string that it treats as a regex over
/// module paths; a regex cannot be mapped onto our fixed module names.
fn de_target_modules<'de, D: Deserializer<'de>>(
    d: D,
) -> std::result::Result<Vec<String>, D::Error> {
    match Value::deserialize(d)? {
        Value::Array(items) => items
            .into_iter()
            .map(|v| match v {
                Value::String(s) => Ok(s),
                other => Err(serde::de::Error::custom(format!(
                    "target_modules: {other} is not a module name"
                ))),
            })
            .collect(),
        Value::String(s) => Err(serde::de::Error::custom(format!(
            "target_modules = {s:?} is a regex; only a list of module names is supported"
        ))),
        other => Err(serde::de::Error::custom(format!(
            "target_modules = {other} must be a list of module names"
        ))),
    }
}

impl AdapterConfig {
    /// The config PEFT would write for `lora` applied to `target_modules` (the resolved
    /// names: PEFT also expands "all-linear" before saving).
    pub fn new(base_model_name_or_path: Option<String>, lora: &LoraSection) -> Self {
        let mut target_modules = lora.target_modules.names();
        target_modules.sort();
        AdapterConfig {
            base_model_name_or_path,
            peft_type: "LORA".into(),
            task_type: Some("CAUSAL_LM".into()),
            r: lora.r,
            lora_alpha: lora.lora_alpha,
            lora_dropout: lora.lora_dropout,
            target_modules,
            use_rslora: lora.use_rslora,
            bias: bias_none(),
            fan_in_fan_out: false,
            inference_mode: true,
            init_lora_weights: init_true(),
            modules_to_save: None,
            layers_to_transform: None,
            revision: None,
            extra: Map::new(),
        }
    }

    /// PEFT's scaling of the LoRA branch: alpha / r, or alpha / sqrt(r) with rsLoRA.
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }

    /// Rejects adapters whose weights would mean something else to our LoRA layers.
    pub fn check(&self, path: &Path) -> Result<()> {
        let bad = |msg: String| Err(Error::format(path, msg));
        if self.peft_type != "LORA" {
            return bad(format!(
                "peft_type {:?} is not supported; only \"LORA\" is",
                self.peft_type
            ));
        }
        if self.r == 0 {
            return bad("r must be > 0".into());
        }
        if self.bias != "none" {
            return bad(format!(
                "bias {:?} is not supported; only \"none\" is",
                self.bias
            ));
        }
        if self.fan_in_fan_out {
            return bad(
                "fan_in_fan_out = true (Conv1D weights, GPT-2 style) is not supported".into(),
            );
        }
        for key in UNSUPPORTED_PEFT_OPTIONS {
            if let Some(v) = self.extra.get(*key).filter(|v| !is_off(v)) {
                return bad(format!("{key} = {v} is not supported (only plain LoRA is)"));
            }
        }
        if self.modules_to_save.as_ref().is_some_and(|m| !m.is_empty()) {
            return bad("modules_to_save (fully trained extra modules) is not supported".into());
        }
        Ok(())
    }

    /// PEFT's rule (`check_target_module_exists` for a list): a module is adapted when its
    /// path equals an entry or ends with `.` + entry.
    pub fn targets_module(&self, module_path: &str) -> bool {
        self.target_modules.iter().any(|t| {
            module_path == t
                || module_path
                    .strip_suffix(t.as_str())
                    .is_some_and(|head| head.ends_with('.'))
        })
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let v = serde_json::to_value(self).map_err(|e| Error::format(path, e.to_string()))?;
        write_json(path, &v)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let cfg: AdapterConfig =
            serde_json::from_str(&text).map_err(|e| Error::format(path, e.to_string()))?;
        cfg.check(path)?;
        Ok(cfg)
    }
}

/// Keys sorted at every level, 2-space indent, trailing newline: what Python's
/// `json.dumps(indent=2, sort_keys=True)` (PEFT, HF Trainer) writes, so diffs stay small.
fn write_json(path: &Path, v: &Value) -> Result<()> {
    fn sorted(v: &Value) -> Value {
        match v {
            Value::Object(m) => {
                let mut keys: Vec<&String> = m.keys().collect();
                keys.sort();
                Value::Object(
                    keys.into_iter()
                        .map(|k| (k.clone(), sorted(&m[k])))
                        .collect(),
                )
            }
            Value::Array(a) => Value::Array(a.iter().map(sorted).collect()),
            other => other.clone(),
        }
    }
    let mut text =
        serde_json::to_string_pretty(&sorted(v)).map_err(|e| Error::format(path, e.to_string()))?;
    text.push('\n');
    std::fs::write(path, text).map_err(|e| Error::io(path, e))
}

// ---------------------------------------------------------------------------------------
// safetensors I/O (f32 out; f32/f16/bf16 in)

/// A tensor's little-endian bytes in the form the safetensors writer wants.
pub(crate) struct TensorBytes {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl View for &TensorBytes {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

fn f32_bytes(name: &str, t: &Tensor) -> Result<TensorBytes> {
    let shape = t.dims().to_vec();
    let values: Vec<f32> = t
        .to_dtype(DType::F32)
        .and_then(|t| t.to_device(&Device::Cpu))
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f32>())
        .map_err(|e| Error::Msg(format!("tensor `{name}`: {e}")))?;
    let mut bytes = Vec::with_capacity(values.len() * 4);
    for v in values {
        bytes.extend_from_slice(&v.to_le_bytes());
    }
    Ok(TensorBytes { dtype: Dtype::F32, shape, bytes })
}

/// A u8 tensor's bytes as they are (8-bit optimizer codes).
fn u8_bytes(name: &str, t: &Tensor) -> Result<TensorBytes> {
    let bytes = t
        .to_device(&Device::Cpu)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<u8>())
        .map_err(|e| Error::Msg(format!("tensor `{name}`: {e}")))?;
    Ok(TensorBytes { dtype: Dtype::U8, shape: t.dims().to_vec(), bytes })
}

/// Writes tensors as f32 safetensors. Names must be unique.
pub fn write_safetensors(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: &HashMap<String, String>,
) -> Result<()> {
    write_tensors(path, tensors, metadata, false)
}

/// Writes tensors as f32 safetensors, or (`keep_u8`) u8 tensors as u8 and the rest as f32.
fn write_tensors(path: &Path, tensors: &[(String, Tensor)], metadata: &HashMap<String, String>, keep_u8: bool) -> Result<()> {
    let mut data: Vec<(String, TensorBytes)> = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        if data.iter().any(|(n, _)| n == name) {
            return Err(Error::Msg(format!(
                "{}: tensor `{name}` is given twice",
                path.display()
            )));
        }
        let bytes = if keep_u8 && t.dtype() == DType::U8 { u8_bytes(name, t)? } else { f32_bytes(name, t)? };
        data.push((name.clone(), bytes));
    }
    let meta = if metadata.is_empty() {
        None
    } else {
        Some(metadata.clone())
    };
    let bytes = safetensors::tensor::serialize(data.iter().map(|(n, b)| (n.as_str(), b)), meta)
        .map_err(|e| Error::format(path, e.to_string()))?;
    std::fs::write(path, bytes).map_err(|e| Error::io(path, e))
}

/// Reads every tensor of a safetensors file as f32 on the CPU, sorted by name, with the
/// header's metadata.
pub fn read_safetensors(path: &Path) -> Result<(Vec<(String, Tensor)>, HashMap<String, String>)> {
    read_tensors(path, false)
}

/// [`read_safetensors`], or (`keep_u8`) with u8 tensors read as u8.
fn read_tensors(path: &Path, keep_u8: bool) -> Result<(Vec<(String, Tensor)>, HashMap<String, String>)> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| {
        Error::format(
            path,
            format!("not a readable safetensors file (truncated or corrupt?): {e}"),
        )
    })?;
    let (_, header) = SafeTensors::read_metadata(&bytes)
        .map_err(|e| Error::format(path, format!("bad safetensors header: {e}")))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let mut out = Vec::with_capacity(st.len());
    for (name, view) in st.tensors() {
        let data = view.data();
        if keep_u8 && view.dtype() == Dtype::U8 {
            out.push((name, Tensor::from_vec(data.to_vec(), view.shape(), &Device::Cpu)?));
            continue;
        }
        let values: Vec<f32> = match view.dtype() {
            Dtype::F32 => data
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => data
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => data
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => {
                return Err(Error::format(
                    path,
                    format!("tensor `{name}` has dtype {other:?}; expected F32, F16 or BF16"),
                ))
            }
        };
        let t = Tensor::from_vec(values, view.shape(), &Device::Cpu)?;
        out.push((name, t));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok((out, metadata))
}

// ---------------------------------------------------------------------------------------
// Adapter weights

/// Checks that every tensor is a PEFT LoRA weight of rank `r` (lora_A: [r, in],
/// lora_B: [out, r]) and that A and B come in pairs.
fn check_adapter_tensors(path: &Path, tensors: &[(String, Tensor)], r: usize) -> Result<()> {
    let mut a_modules = Vec::new();
    let mut b_modules = Vec::new();
    for (name, t) in tensors {
        let dims = t.dims();
        let (module, is_a) = if let Some(m) = name.strip_suffix(".lora_A.weight") {
            (m, true)
        } else if let Some(m) = name.strip_suffix(".lora_B.weight") {
            (m, false)
        } else {
            return Err(Error::format(
                path,
                format!(
                    "tensor `{name}` is not a LoRA weight (`….lora_A.weight` / `….lora_B.weight`)"
                ),
            ));
        };
        let expected = match (dims, is_a) {
            ([_, cols], true) => vec![r, *cols],
            ([rows, _], false) => vec![*rows, r],
            _ if is_a => vec![r, 0],
            _ => vec![0, r],
        };
        if dims != expected.as_slice() {
            return Err(Error::Shape {
                path: path.to_path_buf(),
                name: name.clone(),
                expected,
                got: dims.to_vec(),
            });
        }
        if is_a {
            a_modules.push(module)
        } else {
            b_modules.push(module)
        }
    }
    a_modules.sort();
    b_modules.sort();
    for m in &a_modules {
        if b_modules.binary_search(m).is_err() {
            return Err(Error::MissingTensor {
                path: path.to_path_buf(),
                name: format!("{m}.lora_B.weight"),
            });
        }
    }
    for m in &b_modules {
        if a_modules.binary_search(m).is_err() {
            return Err(Error::MissingTensor {
                path: path.to_path_buf(),
                name: format!("{m}.lora_A.weight"),
            });
        }
    }
    Ok(())
}

/// Writes `adapter_model.safetensors` (f32, PEFT names such as
/// `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`) and
/// `adapter_config.json` into `dir`. Durability comes from [`write_dir_atomically`].
pub fn save_adapter(dir: &Path, tensors: &[(String, Tensor)], cfg: &AdapterConfig) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let weights = dir.join(ADAPTER_WEIGHTS_NAME);
    check_adapter_tensors(&weights, tensors, cfg.r)?;
    // PEFT (through safetensors.torch.save_file) marks its files this way.
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    write_safetensors(&weights, tensors, &meta)?;
    cfg.save(&dir.join(ADAPTER_CONFIG_NAME))
}

/// Reads an adapter saved by [`save_adapter`] or by PEFT's `save_pretrained`
/// (f16/bf16 weights are widened to f32). Tensors come sorted by name.
pub fn load_adapter(dir: &Path) -> Result<(AdapterConfig, Vec<(String, Tensor)>)> {
    let cfg = AdapterConfig::load(&dir.join(ADAPTER_CONFIG_NAME))?;
    let weights = dir.join(ADAPTER_WEIGHTS_NAME);
    let (tensors, _) = read_safetensors(&weights)?;
    check_adapter_tensors(&weights, &tensors, cfg.r)?;
    Ok((cfg, tensors))
}

// ---------------------------------------------------------------------------------------
// Optimizer state

/// Optimizer state as safetensors: moments as f32, the codes of 8-bit moments as u8 (so an
/// 8-bit optimizer's checkpoint stays a quarter of the fp32 one); `metadata` carries small
/// scalars in the header.
pub fn save_optimizer(
    path: &Path,
    tensors: &[(String, Tensor)],
    metadata: &HashMap<String, String>,
) -> Result<()> {
    write_tensors(path, tensors, metadata, true)
}

/// Reads what [`save_optimizer`] wrote: u8 tensors as u8, the rest as f32.
pub fn load_optimizer(path: &Path) -> Result<(Vec<(String, Tensor)>, HashMap<String, String>)> {
    read_tensors(path, true)
}

// ---------------------------------------------------------------------------------------
// trainer_state.json

/// HF's `TrainerState` (trainer_state.json) plus what exact resumption needs: where the
/// data loader stands and the RNG state. Unknown fields from HF files are ignored.
///
/// Our two fields are stored as the state of a Trainer callback named `QdistillResume`
/// (`stateful_callbacks.QdistillResume.attributes`), because HF's
/// `TrainerState.load_from_json` rejects unknown top-level keys but skips callbacks it
/// does not have: the file stays loadable by HF Trainer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "TrainerStateFile", into = "TrainerStateFile")]
pub struct TrainerState {
    pub global_step: u64,
    pub epoch: Option<f64>,
    pub max_steps: u64,
    pub num_train_epochs: u64,
    pub logging_steps: u64,
    pub save_steps: u64,
    pub log_history: Vec<Value>,
    pub best_metric: Option<f64>,
    pub best_model_checkpoint: Option<String>,
    pub train_batch_size: Option<u64>,
    /// Position of the data loader (epoch, shard, sample index), as the data module
    /// defines it.
    pub data_cursor: Value,
    /// RNG state for dropout masks and shuffling, as the trainer defines it.
    pub rng_state: Value,
}

const RESUME_CALLBACK: &str = "QdistillResume";

/// trainer_state.json as it is on disk.
#[derive(Serialize, Deserialize)]
struct TrainerStateFile {
    #[serde(default)]
    global_step: u64,
    #[serde(default)]
    epoch: Option<f64>,
    #[serde(default)]
    max_steps: u64,
    #[serde(default)]
    num_train_epochs: u64,
    #[serde(default)]
    logging_steps: u64,
    #[serde(default)]
    save_steps: u64,
    #[serde(default)]
    log_history: Vec<Value>,
    #[serde(default)]
    best_metric: Option<f64>,
    #[serde(default)]
    best_model_checkpoint: Option<String>,
    #[serde(default)]
    train_batch_size: Option<u64>,
    #[serde(default)]
    stateful_callbacks: Map<String, Value>,
}

impl From<TrainerStateFile> for TrainerState {
    fn from(f: TrainerStateFile) -> Self {
        let attr = |k: &str| {
            f.stateful_callbacks
                .get(RESUME_CALLBACK)
                .and_then(|c| c.get("attributes"))
                .and_then(|a| a.get(k))
                .cloned()
                .unwrap_or(Value::Null)
        };
        TrainerState {
            data_cursor: attr("data_cursor"),
            rng_state: attr("rng_state"),
            global_step: f.global_step,
            epoch: f.epoch,
            max_steps: f.max_steps,
            num_train_epochs: f.num_train_epochs,
            logging_steps: f.logging_steps,
            save_steps: f.save_steps,
            log_history: f.log_history,
            best_metric: f.best_metric,
            best_model_checkpoint: f.best_model_checkpoint,
            train_batch_size: f.train_batch_size,
        }
    }
}

impl From<TrainerState> for TrainerStateFile {
    fn from(s: TrainerState) -> Self {
        let resume = serde_json::json!({
            "args": {},
            "attributes": {"data_cursor": s.data_cursor, "rng_state": s.rng_state},
        });
        TrainerStateFile {
            global_step: s.global_step,
            epoch: s.epoch,
            max_steps: s.max_steps,
            num_train_epochs: s.num_train_epochs,
            logging_steps: s.logging_steps,
            save_steps: s.save_steps,
            log_history: s.log_history,
            best_metric: s.best_metric,
            best_model_checkpoint: s.best_model_checkpoint,
            train_batch_size: s.train_batch_size,
            stateful_callbacks: [(RESUME_CALLBACK.to_string(), resume)]
                .into_iter()
                .collect(),
        }
    }
}

impl TrainerState {
    pub fn save(&self, path: &Path) -> Result<()> {
        let v = serde_json::to_value(self).map_err(|e| Error::format(path, e.to_string()))?;
        write_json(path, &v)
    }

    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        serde_json::from_str(&text).map_err(|e| Error::format(path, e.to_string()))
    }
}

// ---------------------------------------------------------------------------------------
// Atomic directories

static TMP_COUNTER: AtomicUsize = AtomicUsize::new(0);

fn fsync_path(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(path, e))
}

/// fsyncs every file below `dir`, then the dirs themselves (a file's data and its
/// directory entry are made durable separately).
fn fsync_tree(dir: &Path) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let path = entry.path();
        let ty = entry.file_type().map_err(|e| Error::io(&path, e))?;
        if ty.is_dir() {
            fsync_tree(&path)?;
        } else if ty.is_file() {
            fsync_path(&path)?;
        }
    }
    fsync_path(dir)
}

/// Creates `final_dir` with the content `fill` writes, all or nothing: `fill` writes into
/// `<parent>/.<name>.tmp-<pid>-<n>`, everything is fsynced, and the temp dir is renamed
/// over `final_dir` (an existing `final_dir` is moved aside first and deleted after the
/// rename). On error the temp dir is removed and an existing `final_dir` is untouched.
pub fn write_dir_atomically(
    final_dir: &Path,
    fill: impl FnOnce(&Path) -> Result<()>,
) -> Result<()> {
    let name = final_dir
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::Msg(format!("{}: not a directory name", final_dir.display())))?;
    let parent = match final_dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id();
    let tmp = parent.join(format!(".{name}.tmp-{pid}-{n}"));
    std::fs::create_dir(&tmp).map_err(|e| Error::io(&tmp, e))?;

    if let Err(e) = fill(&tmp).and_then(|()| fsync_tree(&tmp)) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }

    let old = parent.join(format!(".{name}.old-{pid}-{n}"));
    let had_old = final_dir.exists();
    if had_old {
        if let Err(e) = std::fs::rename(final_dir, &old) {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(Error::io(final_dir, e));
        }
    }
    if let Err(e) = std::fs::rename(&tmp, final_dir) {
        if had_old {
            // Put the previous version back; if even that fails it is still in `old`.
            let _ = std::fs::rename(&old, final_dir);
        }
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(Error::io(final_dir, e));
    }
    fsync_path(&parent)?;
    if had_old {
        if let Err(e) = std::fs::remove_dir_all(&old) {
            tracing::warn!("could not delete the replaced {}: {e}", old.display());
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Checkpoint dirs

/// `<output_dir>/checkpoint-<step>`.
pub fn checkpoint_dir(output_dir: &Path, step: u64) -> PathBuf {
    output_dir.join(format!("{CHECKPOINT_PREFIX}-{step}"))
}

/// The step of a dir named exactly `checkpoint-<digits>` (HF's `^checkpoint-(\d+)$`).
fn checkpoint_step(name: &str) -> Option<u64> {
    let digits = name.strip_prefix(CHECKPOINT_PREFIX)?.strip_prefix('-')?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The `checkpoint-<step>` dirs in `output_dir`, oldest (lowest step) first. Ordering is
/// numeric, as HF's `_sorted_checkpoints`: checkpoint-100 comes after checkpoint-20.
pub fn sorted_checkpoints(output_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let entries = match std::fs::read_dir(output_dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Error::io(output_dir, e)),
    };
    let mut out = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(output_dir, e))?;
        let path = entry.path();
        let Some(step) = entry.file_name().to_str().and_then(checkpoint_step) else {
            continue;
        };
        if path.is_dir() {
            out.push((step, path));
        }
    }
    out.sort();
    Ok(out)
}

/// The newest `checkpoint-<step>` dir (HF's `get_last_checkpoint`).
pub fn latest_checkpoint(output_dir: &Path) -> Option<PathBuf> {
    sorted_checkpoints(output_dir).ok()?.pop().map(|(_, p)| p)
}

/// Deletes the oldest checkpoints so that at most `save_total_limit` remain (0 keeps all,
/// as HF). Returns the deleted dirs. Each is renamed to a hidden name before it is
/// deleted, so an interrupted delete never leaves a broken `checkpoint-N` behind.
pub fn rotate_checkpoints(output_dir: &Path, save_total_limit: usize) -> Result<Vec<PathBuf>> {
    if save_total_limit == 0 {
        return Ok(Vec::new());
    }
    let all = sorted_checkpoints(output_dir)?;
    let excess = all.len().saturating_sub(save_total_limit);
    let mut deleted = Vec::with_capacity(excess);
    for (step, path) in all.into_iter().take(excess) {
        let doomed = output_dir.join(format!(
            ".{CHECKPOINT_PREFIX}-{step}.deleting-{}",
            std::process::id()
        ));
        std::fs::rename(&path, &doomed).map_err(|e| Error::io(&path, e))?;
        std::fs::remove_dir_all(&doomed).map_err(|e| Error::io(&doomed, e))?;
        deleted.push(path);
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::TargetModules;

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/peft")
    }

    /// The adapter weights PEFT held in memory, dumped by make_fixtures.py.
    fn expected(dir: &Path) -> Vec<(String, Vec<usize>, Vec<f32>)> {
        let text = std::fs::read_to_string(dir.join("expected.json")).unwrap();
        let v: Map<String, Value> = serde_json::from_str(&text).unwrap();
        let mut out: Vec<_> = v
            .into_iter()
            .map(|(name, e)| {
                let shape = e["shape"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap() as usize)
                    .collect();
                let vals = e["values"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_f64().unwrap() as f32)
                    .collect();
                (name, shape, vals)
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    fn lora_section(r: usize, names: &[&str]) -> LoraSection {
        LoraSection {
            r,
            lora_alpha: 2.0 * r as f64,
            lora_dropout: 0.1,
            target_modules: TargetModules::Names(names.iter().map(|s| s.to_string()).collect()),
            use_rslora: false,
        }
    }

    #[test]
    fn peft_written_adapter_config_loads() {
        let path = fixtures().join("adapter_config.json");
        let cfg = AdapterConfig::load(&path).unwrap();
        assert_eq!(cfg.peft_type, "LORA");
        assert_eq!(cfg.task_type.as_deref(), Some("CAUSAL_LM"));
        assert_eq!((cfg.r, cfg.lora_alpha, cfg.lora_dropout), (8, 16.0, 0.05));
        assert_eq!(cfg.bias, "none");
        assert!(!cfg.use_rslora && !cfg.fan_in_fan_out && cfg.inference_mode);
        // PEFT expanded "all-linear" to the 7 linear layers × 2 layers, as module paths.
        assert_eq!(cfg.target_modules.len(), 14);
        assert!(cfg.targets_module("model.layers.1.mlp.gate_proj"));
        assert!(!cfg.targets_module("lm_head"));
        // Fields this struct does not name are kept.
        assert_eq!(
            cfg.extra.get("peft_version").and_then(Value::as_str),
            Some("0.21.2")
        );
    }

    #[test]
    fn targets_module_matches_peft_suffix_rule() {
        let cfg = AdapterConfig::new(None, &lora_section(4, &["q_proj", "down_proj"]));
        assert!(cfg.targets_module("model.layers.3.self_attn.q_proj"));
        assert!(cfg.targets_module("q_proj"));
        assert!(cfg.targets_module("model.layers.0.mlp.down_proj"));
        assert!(!cfg.targets_module("model.layers.3.self_attn.xq_proj"));
        assert!(!cfg.targets_module("model.layers.3.self_attn.q_proj.lora_A"));
        assert!(!cfg.targets_module("model.layers.0.mlp.up_proj"));
    }

    #[test]
    fn peft_saved_adapters_load_with_peft_values() {
        for name in ["adapter_f32", "adapter_bf16"] {
            let dir = fixtures().join(name);
            let (cfg, tensors) = load_adapter(&dir).unwrap();
            assert_eq!((cfg.r, cfg.lora_alpha), (4, 8.0));
            let want = expected(&dir);
            assert_eq!(tensors.len(), want.len(), "{name}");
            // 2 layers × (q, v, down) × (A, B)
            assert_eq!(tensors.len(), 12);
            for ((n, t), (wn, ws, wv)) in tensors.iter().zip(&want) {
                assert_eq!(n, wn);
                assert_eq!(t.dims(), ws.as_slice(), "{n}");
                // bf16 widens to f32 exactly, so both files must match bit for bit.
                assert_eq!(values(t), *wv, "{name}: {n}");
            }
            assert!(tensors[0].0.starts_with("base_model.model.model.layers.0."));
        }
    }

    #[test]
    fn saving_peft_tensors_reproduces_peft_file_bytes() {
        // PEFT writes through safetensors' serializer with {"format": "pt"}; writing the
        // same f32 tensors must give the same bytes, header included.
        let src = fixtures().join("adapter_f32");
        let (cfg, tensors) = load_adapter(&src).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        save_adapter(tmp.path(), &tensors, &cfg).unwrap();
        let ours = std::fs::read(tmp.path().join(ADAPTER_WEIGHTS_NAME)).unwrap();
        let theirs = std::fs::read(src.join(ADAPTER_WEIGHTS_NAME)).unwrap();
        assert!(
            ours == theirs,
            "adapter_model.safetensors differs from PEFT's"
        );
        // And the config, with PEFT's extra fields kept, loads back equal.
        assert_eq!(
            AdapterConfig::load(&tmp.path().join(ADAPTER_CONFIG_NAME)).unwrap(),
            cfg
        );
    }

    #[test]
    fn adapter_round_trip() {
        let dev = Device::Cpu;
        let r = 3;
        let mut tensors = Vec::new();
        for (l, (out_f, in_f)) in [(8usize, 5usize), (6, 4)].into_iter().enumerate() {
            let p = format!("base_model.model.model.layers.{l}.self_attn.q_proj");
            tensors.push((
                format!("{p}.lora_A.weight"),
                Tensor::randn(0f32, 1.0, (r, in_f), &dev).unwrap(),
            ));
            tensors.push((
                format!("{p}.lora_B.weight"),
                Tensor::randn(0f32, 1.0, (out_f, r), &dev).unwrap(),
            ));
        }
        let cfg = AdapterConfig::new(
            Some("org/base".into()),
            &lora_section(r, &["v_proj", "q_proj"]),
        );
        let tmp = tempfile::tempdir().unwrap();
        save_adapter(tmp.path(), &tensors, &cfg).unwrap();
        let (cfg2, back) = load_adapter(tmp.path()).unwrap();
        assert_eq!(cfg2, cfg);
        tensors.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(back.len(), tensors.len());
        for ((n1, t1), (n2, t2)) in tensors.iter().zip(&back) {
            assert_eq!(n1, n2);
            assert_eq!(t1.dims(), t2.dims());
            assert_eq!(values(t1), values(t2));
        }
        // What PEFT needs to read: lora_alpha as an integer, sorted target list.
        let json: Value = serde_json::from_str(
            &std::fs::read_to_string(tmp.path().join(ADAPTER_CONFIG_NAME)).unwrap(),
        )
        .unwrap();
        assert!(json["lora_alpha"].is_i64(), "{json}");
        assert_eq!(
            json["target_modules"],
            serde_json::json!(["q_proj", "v_proj"])
        );
        assert_eq!(json["peft_type"], "LORA");
        assert_eq!(json["task_type"], "CAUSAL_LM");
        assert_eq!(json["modules_to_save"], Value::Null);
    }

    #[test]
    fn adapter_shape_and_name_errors_name_the_tensor() {
        let dev = Device::Cpu;
        let cfg = AdapterConfig::new(None, &lora_section(4, &["q_proj"]));
        let tmp = tempfile::tempdir().unwrap();
        let p = "base_model.model.model.layers.0.self_attn.q_proj";
        let a = |r: usize| Tensor::zeros((r, 6), DType::F32, &dev).unwrap();
        let b = |r: usize| Tensor::zeros((5, r), DType::F32, &dev).unwrap();

        let wrong_rank = [
            (format!("{p}.lora_A.weight"), a(3)),
            (format!("{p}.lora_B.weight"), b(4)),
        ];
        match save_adapter(tmp.path(), &wrong_rank, &cfg).unwrap_err() {
            Error::Shape {
                name,
                expected,
                got,
                ..
            } => {
                assert_eq!(name, format!("{p}.lora_A.weight"));
                assert_eq!((expected, got), (vec![4, 6], vec![3, 6]));
            }
            e => panic!("{e}"),
        }
        let unpaired = [(format!("{p}.lora_A.weight"), a(4))];
        match save_adapter(tmp.path(), &unpaired, &cfg).unwrap_err() {
            Error::MissingTensor { name, .. } => assert_eq!(name, format!("{p}.lora_B.weight")),
            e => panic!("{e}"),
        }
        let bad_name = [(format!("{p}.weight"), a(4))];
        let e = save_adapter(tmp.path(), &bad_name, &cfg)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("`{p}.weight`")), "{e}");
        let twice = [
            (format!("{p}.lora_A.weight"), a(4)),
            (format!("{p}.lora_A.weight"), a(4)),
        ];
        assert!(save_adapter(tmp.path(), &twice, &cfg).is_err());
    }

    #[test]
    fn truncated_safetensors_give_a_clear_error() {
        let src = fixtures().join("adapter_f32");
        let full = std::fs::read(src.join(ADAPTER_WEIGHTS_NAME)).unwrap();
        let header_len = u64::from_le_bytes(full[..8].try_into().unwrap()) as usize;
        let tmp = tempfile::tempdir().unwrap();
        std::fs::copy(
            src.join(ADAPTER_CONFIG_NAME),
            tmp.path().join(ADAPTER_CONFIG_NAME),
        )
        .unwrap();
        let weights = tmp.path().join(ADAPTER_WEIGHTS_NAME);
        // Inside the length prefix, inside the JSON header, and one byte short of the data.
        for cut in [5, 8 + header_len / 2, full.len() - 1] {
            std::fs::write(&weights, &full[..cut]).unwrap();
            let e = load_adapter(tmp.path()).unwrap_err();
            assert!(matches!(e, Error::Format { .. }), "cut {cut}: {e}");
            let msg = e.to_string();
            assert!(
                msg.contains(&weights.display().to_string()) && msg.contains("truncated"),
                "{msg}"
            );
        }
        std::fs::remove_file(&weights).unwrap();
        let e = load_adapter(tmp.path()).unwrap_err();
        assert!(
            matches!(e, Error::Io { .. }) && e.to_string().contains(ADAPTER_WEIGHTS_NAME),
            "{e}"
        );
    }

    #[test]
    fn adapter_config_tolerates_new_fields_and_rejects_changed_semantics() {
        let base: Value = serde_json::from_str(
            &std::fs::read_to_string(fixtures().join("adapter_config.json")).unwrap(),
        )
        .unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(ADAPTER_CONFIG_NAME);
        let load_with = |key: &str, value: Value| {
            let mut v = base.clone();
            v[key] = value;
            std::fs::write(&path, v.to_string()).unwrap();
            AdapterConfig::load(&path)
        };
        let cfg = load_with("some_future_option", serde_json::json!({"x": [1, 2]})).unwrap();
        assert_eq!(
            cfg.extra["some_future_option"],
            serde_json::json!({"x": [1, 2]})
        );
        // Older PEFT files lack newer fields.
        let mut old = base.clone();
        for k in [
            "use_rslora",
            "use_dora",
            "rank_pattern",
            "alpha_pattern",
            "lora_bias",
            "revision",
        ] {
            old.as_object_mut().unwrap().remove(k);
        }
        std::fs::write(&path, old.to_string()).unwrap();
        assert!(!AdapterConfig::load(&path).unwrap().use_rslora);

        for (key, value) in [
            ("use_dora", serde_json::json!(true)),
            ("rank_pattern", serde_json::json!({"q_proj": 4})),
            ("lora_bias", serde_json::json!(true)),
            ("bias", serde_json::json!("all")),
            ("peft_type", serde_json::json!("IA3")),
            ("modules_to_save", serde_json::json!(["lm_head"])),
            ("target_modules", serde_json::json!(".*q_proj")),
            ("r", serde_json::json!("eight")),
        ] {
            let e = load_with(key, value).unwrap_err().to_string();
            assert!(e.contains(&path.display().to_string()), "{key}: {e}");
            assert!(e.contains(key) || key == "r", "{key}: {e}");
        }
    }

    #[test]
    fn hf_trainer_state_loads_and_ours_round_trips() {
        let path = fixtures().join("trainer_state.json");
        let s = TrainerState::load(&path).unwrap();
        // Values make_fixtures.py gave HF's TrainerState.
        assert_eq!(s.global_step, 20);
        assert_eq!(s.epoch, Some(0.5));
        assert_eq!(
            (
                s.max_steps,
                s.num_train_epochs,
                s.logging_steps,
                s.save_steps
            ),
            (40, 1, 5, 10)
        );
        assert_eq!(s.train_batch_size, Some(4));
        assert_eq!(s.best_metric, Some(1.25));
        assert_eq!(
            s.best_model_checkpoint.as_deref(),
            Some("runs/x/checkpoint-20")
        );
        assert_eq!(
            s.log_history,
            vec![
                serde_json::json!({"loss": 2.5, "learning_rate": 0.0002, "epoch": 0.25, "step": 10})
            ]
        );
        assert_eq!(s.data_cursor, Value::Null);

        let mut ours = s.clone();
        ours.data_cursor = serde_json::json!({"epoch": 0, "sample": 160, "shard": [0, 2]});
        ours.rng_state = serde_json::json!({"seed": 42, "word_pos": "12345678901234567890"});
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join(TRAINER_STATE_NAME);
        ours.save(&p).unwrap();
        assert_eq!(TrainerState::load(&p).unwrap(), ours);
        // HF's json.dumps(indent=2, sort_keys=True) layout.
        let text = std::fs::read_to_string(&p).unwrap();
        assert!(
            text.starts_with("{\n  \"best_metric\": 1.25,\n  \"best_model_checkpoint\""),
            "{text}"
        );
        assert!(text.ends_with("}\n"));
        // Our fields live where HF's loader tolerates them: a callback state it skips.
        let raw: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(
            raw["stateful_callbacks"]["QdistillResume"]["attributes"]["data_cursor"],
            ours.data_cursor
        );
        assert!(raw.get("data_cursor").is_none() && raw.get("rng_state").is_none());

        std::fs::write(&p, "{\"global_step\": ").unwrap();
        let e = TrainerState::load(&p).unwrap_err().to_string();
        assert!(e.contains(&p.display().to_string()), "{e}");
    }

    #[test]
    fn optimizer_state_round_trips_with_metadata() {
        let dev = Device::Cpu;
        let tensors = vec![
            (
                "exp_avg.0".to_string(),
                Tensor::randn(0f32, 1.0, (4, 3), &dev).unwrap(),
            ),
            (
                "exp_avg_sq.0".to_string(),
                Tensor::randn(0f32, 1.0, (4, 3), &dev)
                    .unwrap()
                    .sqr()
                    .unwrap(),
            ),
            (
                "exp_avg.1".to_string(),
                Tensor::randn(0f32, 1.0, 7, &dev).unwrap(),
            ),
        ];
        let meta = HashMap::from([
            ("step".to_string(), "17".to_string()),
            ("lr".to_string(), "0.0002".to_string()),
        ]);
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join(OPTIMIZER_NAME);
        save_optimizer(&p, &tensors, &meta).unwrap();
        let (back, meta2) = load_optimizer(&p).unwrap();
        assert_eq!(meta2, meta);
        let mut want = tensors.clone();
        want.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(back.len(), 3);
        for ((n1, t1), (n2, t2)) in want.iter().zip(&back) {
            assert_eq!(n1, n2);
            assert_eq!(t1.dims(), t2.dims());
            assert_eq!(values(t1), values(t2));
        }
        let e = load_optimizer(&tmp.path().join("absent.safetensors"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("absent.safetensors"), "{e}");
    }

    #[test]
    fn optimizer_codes_stay_bytes() {
        let dev = Device::Cpu;
        let codes: Vec<u8> = (0..=255).collect();
        let tensors = vec![
            ("state1".to_string(), Tensor::from_vec(codes.clone(), 256, &dev).unwrap()),
            ("absmax1".to_string(), Tensor::new(&[0.5f32], &dev).unwrap()),
        ];
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join(OPTIMIZER_NAME);
        save_optimizer(&p, &tensors, &HashMap::new()).unwrap();
        // One byte per code on disk: the header plus 256 + 4 bytes of data.
        let header = u64::from_le_bytes(std::fs::read(&p).unwrap()[..8].try_into().unwrap()) as usize;
        assert_eq!(std::fs::metadata(&p).unwrap().len() as usize, 8 + header + 256 + 4);
        let (back, _) = load_optimizer(&p).unwrap();
        assert_eq!(back[1].0, "state1");
        assert_eq!(back[1].1.dtype(), DType::U8);
        assert_eq!(back[1].1.to_vec1::<u8>().unwrap(), codes);
        assert_eq!(back[0].1.dtype(), DType::F32);
    }

    fn listing(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn atomic_dir_creates_and_replaces() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("run").join("checkpoint-10");
        write_dir_atomically(&target, |d| {
            std::fs::create_dir(d.join("sub")).map_err(|e| Error::io(d, e))?;
            std::fs::write(d.join("sub").join("a.txt"), "one").map_err(|e| Error::io(d, e))
        })
        .unwrap();
        assert_eq!(
            std::fs::read_to_string(target.join("sub/a.txt")).unwrap(),
            "one"
        );

        write_dir_atomically(&target, |d| {
            // While the new version is being written, the old one is still in place.
            assert_eq!(
                std::fs::read_to_string(target.join("sub/a.txt")).unwrap(),
                "one"
            );
            std::fs::write(d.join("b.txt"), "two").map_err(|e| Error::io(d, e))
        })
        .unwrap();
        assert_eq!(listing(&target), vec!["b.txt"]);
        // No temp or moved-aside dirs left next to it.
        assert_eq!(listing(&tmp.path().join("run")), vec!["checkpoint-10"]);
    }

    #[test]
    fn failing_fill_leaves_nothing_behind_and_the_old_dir_intact() {
        let tmp = tempfile::tempdir().unwrap();
        let target = tmp.path().join("checkpoint-5");
        write_dir_atomically(&target, |d| {
            std::fs::write(d.join("adapter"), "good").map_err(|e| Error::io(d, e))
        })
        .unwrap();
        let before = listing(tmp.path());

        let err = write_dir_atomically(&target, |d| {
            std::fs::write(d.join("adapter"), "half-writ").map_err(|e| Error::io(d, e))?;
            Err(Error::Msg("disk full".into()))
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "disk full");
        assert_eq!(listing(tmp.path()), before);
        assert_eq!(
            std::fs::read_to_string(target.join("adapter")).unwrap(),
            "good"
        );

        // A first save that fails leaves no dir at all.
        let fresh = tmp.path().join("checkpoint-6");
        assert!(write_dir_atomically(&fresh, |_| Err(Error::Msg("no".into()))).is_err());
        assert!(!fresh.exists());
        assert_eq!(listing(tmp.path()), before);
    }

    #[test]
    fn full_checkpoint_in_an_atomic_dir() {
        let dev = Device::Cpu;
        let tmp = tempfile::tempdir().unwrap();
        let ckpt = checkpoint_dir(tmp.path(), 30);
        let p = "base_model.model.model.layers.0.mlp.up_proj";
        let tensors = vec![
            (
                format!("{p}.lora_A.weight"),
                Tensor::randn(0f32, 1.0, (2, 4), &dev).unwrap(),
            ),
            (
                format!("{p}.lora_B.weight"),
                Tensor::randn(0f32, 1.0, (6, 2), &dev).unwrap(),
            ),
        ];
        let cfg = AdapterConfig::new(None, &lora_section(2, &["up_proj"]));
        let state = TrainerState {
            global_step: 30,
            epoch: Some(0.75),
            max_steps: 40,
            num_train_epochs: 1,
            logging_steps: 1,
            save_steps: 10,
            log_history: vec![],
            best_metric: None,
            best_model_checkpoint: None,
            train_batch_size: Some(4),
            data_cursor: serde_json::json!({"sample": 240}),
            rng_state: Value::Null,
        };
        write_dir_atomically(&ckpt, |d| {
            save_adapter(d, &tensors, &cfg)?;
            save_optimizer(&d.join(OPTIMIZER_NAME), &tensors, &HashMap::new())?;
            state.save(&d.join(TRAINER_STATE_NAME))
        })
        .unwrap();
        assert_eq!(latest_checkpoint(tmp.path()), Some(ckpt.clone()));
        assert_eq!(
            listing(&ckpt),
            vec![
                ADAPTER_CONFIG_NAME,
                ADAPTER_WEIGHTS_NAME,
                OPTIMIZER_NAME,
                TRAINER_STATE_NAME
            ]
        );
        assert_eq!(
            TrainerState::load(&ckpt.join(TRAINER_STATE_NAME)).unwrap(),
            state
        );
        assert_eq!(load_adapter(&ckpt).unwrap().0, cfg);
    }

    fn make_dirs(root: &Path, names: &[&str]) {
        for n in names {
            std::fs::create_dir_all(root.join(n)).unwrap();
            std::fs::write(root.join(n).join("f"), n).unwrap();
        }
    }

    #[test]
    fn rotation_deletes_the_numerically_oldest() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        // Lexicographic order (100 < 20 < 5) differs from step order (5 < 20 < 100).
        make_dirs(
            root,
            &[
                "checkpoint-100",
                "checkpoint-20",
                "checkpoint-5",
                "checkpoint-40",
                "final_model",
                "checkpoint-best",
            ],
        );
        std::fs::write(root.join("checkpoint-1"), "a file, not a checkpoint").unwrap();

        let deleted = rotate_checkpoints(root, 2).unwrap();
        assert_eq!(
            deleted,
            vec![root.join("checkpoint-5"), root.join("checkpoint-20")]
        );
        assert_eq!(
            listing(root),
            vec![
                "checkpoint-1",
                "checkpoint-100",
                "checkpoint-40",
                "checkpoint-best",
                "final_model"
            ]
        );
        // Under the limit: nothing to do; 0 keeps everything, as HF.
        assert!(rotate_checkpoints(root, 2).unwrap().is_empty());
        assert!(rotate_checkpoints(root, 0).unwrap().is_empty());
        assert_eq!(
            rotate_checkpoints(root, 1).unwrap(),
            vec![root.join("checkpoint-40")]
        );
        assert_eq!(
            listing(root),
            vec![
                "checkpoint-1",
                "checkpoint-100",
                "checkpoint-best",
                "final_model"
            ]
        );
    }

    #[test]
    fn latest_checkpoint_is_the_highest_step() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        assert_eq!(latest_checkpoint(root), None);
        assert_eq!(latest_checkpoint(&root.join("absent")), None);
        make_dirs(
            root,
            &[
                "checkpoint-9",
                "checkpoint-20",
                "checkpoint-100",
                ".checkpoint-500.tmp-1-0",
                "checkpoint-7x",
            ],
        );
        std::fs::write(root.join("checkpoint-900"), "file").unwrap();
        assert_eq!(latest_checkpoint(root), Some(root.join("checkpoint-100")));
        let steps: Vec<u64> = sorted_checkpoints(root)
            .unwrap()
            .into_iter()
            .map(|(s, _)| s)
            .collect();
        assert_eq!(steps, vec![9, 20, 100]);
    }
}
