//! Gemma family. Gemma: RMSNorm as x̂·(1+w), embeddings scaled by √hidden, GeGLU with
//! tanh-approximated GELU. Gemma2 adds: post-attention and pre/post feed-forward norms,
//! attention-logit and final-logit soft-capping (s = cap·tanh(s/cap)), sliding-window
//! attention on alternating layers, and 1/√query_pre_attn_scalar attention scaling.

use std::path::Path;

use serde_json::Value;

use super::{activation, opt_f64, opt_usize, req_usize, rope_params, Family, ModelConfig};
use crate::{Error, Result};

pub(crate) fn config(v: &Value, model_type: &str, path: &Path) -> Result<ModelConfig> {
    let gemma2 = model_type == "gemma2";
    let hidden_size = req_usize(v, "hidden_size", path)?;
    let num_attention_heads = req_usize(v, "num_attention_heads", path)?;
    let num_hidden_layers = req_usize(v, "num_hidden_layers", path)?;
    let head_dim = opt_usize(v, "head_dim").unwrap_or(256);
    let (rope_theta, rope_scaling) = rope_params(v, path, 10000.0)?;
    let window = opt_usize(v, "sliding_window");
    // transformers ≥4.5x writes `layer_types`; older Gemma2 configs imply that even layers
    // slide and odd layers attend globally.
    let layer_window: Vec<Option<usize>> = match v.get("layer_types").and_then(Value::as_array) {
        Some(types) if gemma2 => {
            if types.len() != num_hidden_layers {
                return Err(Error::format(path, format!("layer_types has {} entries for {num_hidden_layers} layers", types.len())));
            }
            types.iter().map(|t| if t.as_str() == Some("sliding_attention") { window } else { None }).collect()
        }
        _ if gemma2 => (0..num_hidden_layers).map(|i| if i % 2 == 0 { window } else { None }).collect(),
        _ => vec![None; num_hidden_layers],
    };
    let scalar = if gemma2 { opt_f64(v, "query_pre_attn_scalar").unwrap_or(head_dim as f64) } else { head_dim as f64 };
    let cfg = ModelConfig {
        model_type: model_type.to_string(),
        family: if gemma2 { Family::Gemma2 } else { Family::Gemma },
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
        max_position_embeddings: opt_usize(v, "max_position_embeddings").unwrap_or(8192),
        // Gemma ties its LM head to the embedding unless told otherwise.
        tie_word_embeddings: v.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(true),
        attention_bias: v.get("attention_bias").and_then(Value::as_bool).unwrap_or(false),
        mlp_bias: false,
        hidden_act: activation(v, &["hidden_activation", "hidden_act"], "gelu_pytorch_tanh", path)?,
        layer_window,
        attn_logit_softcapping: if gemma2 { opt_f64(v, "attn_logit_softcapping") } else { None },
        final_logit_softcapping: if gemma2 { opt_f64(v, "final_logit_softcapping") } else { None },
        attn_scale: 1.0 / scalar.sqrt(),
    };
    cfg.validate(path)?;
    Ok(cfg)
}
