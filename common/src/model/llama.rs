//! Llama family: Llama 2/3, Mistral, SmolLM2 (tied embeddings), Qwen2 (q/k/v bias).
//! Pre-norm blocks: x += attn(norm(x)); x += mlp(norm(x)) with SwiGLU.

use std::path::Path;

use serde_json::Value;

use super::{common_config, opt_usize, Defaults, Family, ModelConfig};
use crate::Result;

pub(crate) fn config(v: &Value, model_type: &str, path: &Path) -> Result<ModelConfig> {
    let defaults = Defaults {
        head_dim: None,
        max_position_embeddings: 4096,
        tie_word_embeddings: false,
        act_keys: &["hidden_act"],
        act: "silu",
    };
    let mut cfg = common_config(v, model_type, Family::Llama, path, defaults)?;
    let n = cfg.num_hidden_layers;
    // Mistral applies its window to every layer; Qwen2 only when use_sliding_window is
    // set, and then only to layers at or above max_window_layers (HF semantics).
    let window = opt_usize(v, "sliding_window");
    cfg.layer_window = (0..n)
        .map(|i| match model_type {
            "mistral" => window,
            "qwen2" if v.get("use_sliding_window").and_then(Value::as_bool).unwrap_or(false) => {
                let from = opt_usize(v, "max_window_layers").unwrap_or(n);
                if i >= from { window } else { None }
            }
            _ => None,
        })
        .collect();
    // Qwen2 configs carry no attention_bias key: its q/k/v projections always have one.
    cfg.attention_bias |= model_type == "qwen2";
    cfg.validate(path)?;
    Ok(cfg)
}
