//! Llama family: Llama 2/3, Mistral, SmolLM2 (tied embeddings), Qwen2 (q/k/v bias).
//! Pre-norm blocks: x += attn(norm(x)); x += mlp(norm(x)) with SwiGLU.

use std::path::Path;

use serde_json::Value;

use super::{activation, opt_f64, opt_usize, req_usize, rope_params, Family, ModelConfig};
use crate::Result;

pub(crate) fn config(v: &Value, model_type: &str, path: &Path) -> Result<ModelConfig> {
    let hidden_size = req_usize(v, "hidden_size", path)?;
    let num_attention_heads = req_usize(v, "num_attention_heads", path)?;
    let num_hidden_layers = req_usize(v, "num_hidden_layers", path)?;
    let head_dim = opt_usize(v, "head_dim").unwrap_or(hidden_size / num_attention_heads.max(1));
    let (rope_theta, rope_scaling) = rope_params(v, path, 10000.0)?;
    // Mistral applies its window to every layer; Qwen2 only when use_sliding_window is
    // set, and then only to layers at or above max_window_layers (HF semantics).
    let window = opt_usize(v, "sliding_window");
    let layer_window = (0..num_hidden_layers)
        .map(|i| match model_type {
            "mistral" => window,
            "qwen2" if v.get("use_sliding_window").and_then(Value::as_bool).unwrap_or(false) => {
                let from = opt_usize(v, "max_window_layers").unwrap_or(num_hidden_layers);
                if i >= from { window } else { None }
            }
            _ => None,
        })
        .collect();
    let cfg = ModelConfig {
        model_type: model_type.to_string(),
        family: Family::Llama,
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
        max_position_embeddings: opt_usize(v, "max_position_embeddings").unwrap_or(4096),
        tie_word_embeddings: v.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(false),
        attention_bias: model_type == "qwen2"
            || v.get("attention_bias").and_then(Value::as_bool).unwrap_or(false),
        mlp_bias: v.get("mlp_bias").and_then(Value::as_bool).unwrap_or(false),
        hidden_act: activation(v, &["hidden_act"], "silu", path)?,
        layer_window,
        attn_logit_softcapping: None,
        final_logit_softcapping: None,
        attn_scale: 1.0 / (head_dim as f64).sqrt(),
    };
    cfg.validate(path)?;
    Ok(cfg)
}
