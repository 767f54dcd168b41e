//! Gemma family. Gemma: RMSNorm as x̂·(1+w), embeddings scaled by √hidden, GeGLU with
//! tanh-approximated GELU. Gemma2 adds: post-attention and pre/post feed-forward norms,
//! attention-logit and final-logit soft-capping (s = cap·tanh(s/cap)), sliding-window
//! attention on alternating layers, and 1/√query_pre_attn_scalar attention scaling.

use std::path::Path;

use serde_json::Value;

use super::{common_config, opt_f64, opt_usize, Defaults, Family, ModelConfig};
use crate::{Error, Result};

pub(crate) fn config(v: &Value, model_type: &str, path: &Path) -> Result<ModelConfig> {
    let gemma2 = model_type == "gemma2";
    let defaults = Defaults {
        head_dim: Some(256),
        max_position_embeddings: 8192,
        // Gemma ties its LM head to the embedding unless told otherwise.
        tie_word_embeddings: true,
        act_keys: &["hidden_activation", "hidden_act"],
        act: "gelu_pytorch_tanh",
    };
    let family = if gemma2 { Family::Gemma2 } else { Family::Gemma };
    let mut cfg = common_config(v, model_type, family, path, defaults)?;
    cfg.mlp_bias = false;
    if gemma2 {
        let n = cfg.num_hidden_layers;
        let window = opt_usize(v, "sliding_window");
        // transformers ≥4.5x writes `layer_types`; older Gemma2 configs imply that even
        // layers slide and odd layers attend globally.
        cfg.layer_window = match v.get("layer_types").and_then(Value::as_array) {
            Some(types) => {
                if types.len() != n {
                    return Err(Error::format(path, format!("layer_types has {} entries for {n} layers", types.len())));
                }
                types.iter().map(|t| if t.as_str() == Some("sliding_attention") { window } else { None }).collect()
            }
            None => (0..n).map(|i| if i % 2 == 0 { window } else { None }).collect(),
        };
        cfg.attn_logit_softcapping = opt_f64(v, "attn_logit_softcapping");
        cfg.final_logit_softcapping = opt_f64(v, "final_logit_softcapping");
        cfg.attn_scale = 1.0 / opt_f64(v, "query_pre_attn_scalar").unwrap_or(cfg.head_dim as f64).sqrt();
    }
    cfg.validate(path)?;
    Ok(cfg)
}
