//! Decoder-only language models: one file per architecture family for what is specific
//! to it (config.json keys, weight names, block wiring flags), and one shared decoder
//! (`decoder.rs`) whose block forward and backward sit side by side.

pub mod decoder;
pub mod gemma;
pub mod llama;

use std::path::Path;

use serde_json::Value;

use crate::ops::activation::Activation;
use crate::ops::rope::RopeScaling;
use crate::{Error, Result};

pub use decoder::{Model, ModelSaved};

/// Architecture families: what changes the block's arithmetic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Llama 2/3, Mistral, SmolLM2, Qwen2 (q/k/v bias).
    Llama,
    /// Gemma: (1+w) RMSNorm, √hidden embedding scale, GeGLU.
    Gemma,
    /// Gemma2: Gemma plus pre/post feed-forward norms, attention and final logit
    /// soft-capping, alternating sliding-window layers, query_pre_attn_scalar.
    Gemma2,
}

/// A validated model config, parsed from HF config.json (or rebuilt from GGUF metadata).
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub model_type: String,
    pub family: Family,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub attention_bias: bool,
    pub mlp_bias: bool,
    pub hidden_act: Activation,
    /// Per layer: the sliding window it uses, if any.
    pub layer_window: Vec<Option<usize>>,
    pub attn_logit_softcapping: Option<f64>,
    pub final_logit_softcapping: Option<f64>,
    /// Attention scale is 1/√query_pre_attn_scalar (Gemma2) or 1/√head_dim.
    pub attn_scale: f64,
}

impl ModelConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| Error::format(path, e.to_string()))?;
        Self::from_json(&v, path)
    }

    pub fn from_json(v: &Value, path: &Path) -> Result<Self> {
        let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("llama").to_string();
        match model_type.as_str() {
            "llama" | "mistral" | "qwen2" => llama::config(v, &model_type, path),
            "gemma" | "gemma2" => gemma::config(v, &model_type, path),
            other => Err(Error::format(
                path,
                format!("model_type `{other}` is not supported (llama, mistral, qwen2, gemma, gemma2)"),
            )),
        }
    }

    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// (in, out) of each targetable linear, by PEFT short name.
    pub fn linear_shape(&self, short: &str) -> Option<(usize, usize)> {
        let (d, f) = (self.hidden_size, self.intermediate_size);
        Some(match short {
            "q_proj" => (d, self.q_dim()),
            "k_proj" | "v_proj" => (d, self.kv_dim()),
            "o_proj" => (self.q_dim(), d),
            "gate_proj" | "up_proj" => (d, f),
            "down_proj" => (f, d),
            _ => return None,
        })
    }

    /// This config restricted to a subset of layers (a depth-pruned student).
    pub fn with_layers(&self, keep: &[usize]) -> Self {
        let mut c = self.clone();
        c.num_hidden_layers = keep.len();
        c.layer_window = keep.iter().map(|&i| self.layer_window[i]).collect();
        c
    }

    /// Structural checks that the block arithmetic relies on.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let bad = |msg: String| Err(Error::format(path, msg));
        if self.hidden_size == 0 || self.num_hidden_layers == 0 || self.vocab_size == 0 {
            return bad("hidden_size, num_hidden_layers and vocab_size must be positive".into());
        }
        if self.num_attention_heads == 0 || self.num_key_value_heads == 0 {
            return bad("num_attention_heads and num_key_value_heads must be positive".into());
        }
        if self.num_attention_heads % self.num_key_value_heads != 0 {
            return bad(format!(
                "num_attention_heads ({}) is not a multiple of num_key_value_heads ({})",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if self.head_dim % 2 != 0 {
            return bad(format!("head_dim {} must be even for rotary embeddings", self.head_dim));
        }
        Ok(())
    }
}

/// Family-specific defaults for keys a config.json may leave out.
pub(crate) struct Defaults {
    pub head_dim: Option<usize>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub act_keys: &'static [&'static str],
    pub act: &'static str,
}

/// The keys every family reads the same way; the family parser then sets what differs
/// (sliding windows, biases, soft-capping, attention scale).
pub(crate) fn common_config(v: &Value, model_type: &str, family: Family, path: &Path, d: Defaults) -> Result<ModelConfig> {
    let hidden_size = req_usize(v, "hidden_size", path)?;
    let num_attention_heads = req_usize(v, "num_attention_heads", path)?;
    let num_hidden_layers = req_usize(v, "num_hidden_layers", path)?;
    let head_dim = opt_usize(v, "head_dim").or(d.head_dim).unwrap_or(hidden_size / num_attention_heads.max(1));
    let (rope_theta, rope_scaling) = rope_params(v, path, 10000.0)?;
    Ok(ModelConfig {
        model_type: model_type.to_string(),
        family,
        hidden_size,
        intermediate_size: req_usize(v, "intermediate_size", path)?,
        num_hidden_layers,
        num_attention_heads,
        num_key_value_heads: opt_usize(v, "num_key_value_heads").unwrap_or(num_attention_heads),
        head_dim,
        vocab_size: req_usize(v, "vocab_size", path)?,
        rms_norm_eps: opt_f64(v, "rms_norm_eps").unwrap_or(1e-6),
        rope_theta,
        rope_scaling,
        max_position_embeddings: opt_usize(v, "max_position_embeddings").unwrap_or(d.max_position_embeddings),
        tie_word_embeddings: v.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(d.tie_word_embeddings),
        attention_bias: v.get("attention_bias").and_then(Value::as_bool).unwrap_or(false),
        mlp_bias: v.get("mlp_bias").and_then(Value::as_bool).unwrap_or(false),
        hidden_act: activation(v, d.act_keys, d.act, path)?,
        layer_window: vec![None; num_hidden_layers],
        attn_logit_softcapping: None,
        final_logit_softcapping: None,
        attn_scale: 1.0 / (head_dim as f64).sqrt(),
    })
}

/// Helpers shared by the family parsers.
pub(crate) fn req_usize(v: &Value, key: &str, path: &Path) -> Result<usize> {
    v.get(key)
        .and_then(Value::as_u64)
        .map(|x| x as usize)
        .ok_or_else(|| Error::format(path, format!("config key `{key}` is missing or not a positive integer")))
}

pub(crate) fn opt_f64(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}

pub(crate) fn opt_usize(v: &Value, key: &str) -> Option<usize> {
    v.get(key).and_then(Value::as_u64).map(|x| x as usize)
}

/// rope_theta and rope_scaling, from either the classic keys or transformers ≥5's
/// `rope_parameters` dict (which holds both).
pub(crate) fn rope_params(v: &Value, path: &Path, default_theta: f64) -> Result<(f64, Option<RopeScaling>)> {
    let params = v.get("rope_parameters").filter(|p| p.is_object());
    let theta = params
        .and_then(|p| opt_f64(p, "rope_theta"))
        .or_else(|| opt_f64(v, "rope_theta"))
        .unwrap_or(default_theta);
    let scaling_src = match params {
        Some(p) => Some(p),
        None => v.get("rope_scaling").filter(|s| s.is_object()),
    };
    let scaling = match scaling_src {
        None => None,
        Some(s) => {
            let kind = s.get("rope_type").or_else(|| s.get("type")).and_then(Value::as_str).unwrap_or("default");
            if kind == "default" {
                None
            } else {
                Some(serde_json::from_value::<RopeScaling>(s.clone()).map_err(|e| {
                    Error::format(path, format!("rope scaling `{kind}` is not supported or malformed: {e}"))
                })?)
            }
        }
    };
    Ok((theta, scaling))
}

pub(crate) fn activation(v: &Value, keys: &[&str], default: &str, path: &Path) -> Result<Activation> {
    let name = keys.iter().find_map(|k| v.get(*k).and_then(Value::as_str)).unwrap_or(default);
    serde_json::from_value::<Activation>(Value::String(name.to_string()))
        .map_err(|_| Error::format(path, format!("activation `{name}` is not supported (silu, gelu, gelu_pytorch_tanh)")))
}
