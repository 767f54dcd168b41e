//! Reading base-model weights from the files users have: an HF directory (one
//! `model.safetensors` or a sharded `model.safetensors.index.json`), or a GGUF file
//! (dequantized on load). Every tensor is looked up by its HF name, so the model code
//! never knows which format it came from.

use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use safetensors::SafeTensors;

use crate::{Error, Result};

/// A raw tensor as stored, for formats the model code interprets itself
/// (bitsandbytes 4-bit tensors are `u8` bytes plus side tensors).
pub struct RawTensor {
    pub dtype: safetensors::Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

enum Backend {
    Safetensors {
        files: Vec<(PathBuf, memmap2::Mmap)>,
        /// HF tensor name → index into `files`.
        index: HashMap<String, usize>,
    },
    Gguf {
        content: gguf_file::Content,
        /// HF name → GGUF name, plus the number of heads when the tensor was permuted by
        /// llama.cpp's converter and must be un-permuted.
        names: HashMap<String, (String, Option<usize>)>,
    },
}

pub struct WeightStore {
    path: PathBuf,
    backend: Backend,
}

impl WeightStore {
    /// Opens `path`: a directory with safetensors, or a `.gguf` file.
    pub fn open(path: &Path) -> Result<Self> {
        if path.is_dir() {
            Self::open_safetensors_dir(path)
        } else if path.extension().is_some_and(|e| e == "gguf") {
            Self::open_gguf(path)
        } else if path.extension().is_some_and(|e| e == "safetensors") {
            let files = vec![(path.to_path_buf(), mmap(path)?)];
            Self::from_files(path, files)
        } else if !path.exists() {
            Err(Error::io(path, std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory")))
        } else {
            Err(Error::format(path, "not a model directory, .safetensors or .gguf file"))
        }
    }

    fn open_safetensors_dir(dir: &Path) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let files = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
            let index: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| Error::format(&index_path, e.to_string()))?;
            let map = index
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::format(&index_path, "has no `weight_map` object"))?;
            let mut shards: Vec<String> =
                map.values().filter_map(|v| v.as_str().map(str::to_owned)).collect();
            shards.sort();
            shards.dedup();
            shards
                .iter()
                .map(|s| {
                    let p = dir.join(s);
                    Ok((p.clone(), mmap(&p)?))
                })
                .collect::<Result<Vec<_>>>()?
        } else if single.exists() {
            vec![(single.clone(), mmap(&single)?)]
        } else {
            return Err(Error::format(
                dir,
                "no model.safetensors or model.safetensors.index.json in this directory",
            ));
        };
        Self::from_files(dir, files)
    }

    fn from_files(path: &Path, files: Vec<(PathBuf, memmap2::Mmap)>) -> Result<Self> {
        let mut index = HashMap::new();
        for (i, (p, m)) in files.iter().enumerate() {
            // Parsing the header validates that every tensor's byte range lies inside the
            // file, so a truncated download fails here, naming the shard.
            let st = SafeTensors::deserialize(m)
                .map_err(|e| Error::format(p, format!("not a valid safetensors file ({e}); is it truncated?")))?;
            for name in st.names() {
                index.insert(name.to_string(), i);
            }
        }
        Ok(Self { path: path.to_path_buf(), backend: Backend::Safetensors { files, index } })
    }

    fn open_gguf(path: &Path) -> Result<Self> {
        let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
        let content = gguf_file::Content::read(&mut f)
            .map_err(|e| Error::format(path, format!("not a valid GGUF file: {e}")))?;
        let md = &content.metadata;
        let get_usize = |k: &str| md.get(k).and_then(|v| v.to_u32().ok()).map(|v| v as usize);
        let arch = md.get("general.architecture").and_then(|v| v.to_string().ok()).cloned().unwrap_or_default();
        let n_head = get_usize(&format!("{arch}.attention.head_count"));
        let n_kv = get_usize(&format!("{arch}.attention.head_count_kv")).or(n_head);
        let mut names = HashMap::new();
        for g in content.tensor_infos.keys() {
            if let Some((hf, permuted_heads)) = gguf_to_hf_name(g, &arch, n_head, n_kv) {
                names.insert(hf, (g.clone(), permuted_heads));
            }
        }
        Ok(Self { path: path.to_path_buf(), backend: Backend::Gguf { content, names } })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn gguf_content(&self) -> Option<&gguf_file::Content> {
        match &self.backend {
            Backend::Gguf { content, .. } => Some(content),
            _ => None,
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        match &self.backend {
            Backend::Safetensors { index, .. } => index.contains_key(name),
            Backend::Gguf { names, .. } => names.contains_key(name),
        }
    }

    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = match &self.backend {
            Backend::Safetensors { index, .. } => index.keys().cloned().collect(),
            Backend::Gguf { names, .. } => names.keys().cloned().collect(),
        };
        v.sort();
        v
    }

    fn missing(&self, name: &str) -> Error {
        Error::MissingTensor { path: self.path.clone(), name: name.to_string() }
    }

    /// The tensor `name` as f32 on `device`, checked against `expected` shape.
    pub fn get(&self, name: &str, expected: &[usize], device: &Device) -> Result<Tensor> {
        let t = self.get_any_shape(name, device)?;
        if t.dims() != expected {
            return Err(Error::Shape {
                path: self.path.clone(),
                name: name.to_string(),
                expected: expected.to_vec(),
                got: t.dims().to_vec(),
            });
        }
        Ok(t)
    }

    pub fn get_any_shape(&self, name: &str, device: &Device) -> Result<Tensor> {
        match &self.backend {
            Backend::Safetensors { .. } => {
                let t = self.get_native(name)?;
                if !t.dtype().is_float() {
                    let msg = format!("tensor `{name}` has dtype {:?}, expected a float type", t.dtype());
                    return Err(Error::format(&self.path, msg));
                }
                Ok(t.to_dtype(DType::F32)?.to_device(device)?)
            }
            Backend::Gguf { content, names } => {
                let (g, permuted_heads) = names.get(name).ok_or_else(|| self.missing(name))?;
                let mut f = File::open(&self.path).map_err(|e| Error::io(&self.path, e))?;
                let q = content
                    .tensor(&mut f, g, &Device::Cpu)
                    .map_err(|e| Error::format(&self.path, format!("tensor `{g}`: {e}")))?;
                let mut t = q.dequantize(&Device::Cpu)?.to_dtype(DType::F32)?;
                if let Some(h) = permuted_heads {
                    t = unpermute_llama_cpp(&t, *h)?;
                }
                Ok(t.to_device(device)?)
            }
        }
    }

    /// A tensor in its stored dtype (safetensors only): bitsandbytes 4-bit weights are
    /// `u8` codes with `u8`/`f32` side tensors that must not be converted.
    pub fn get_native(&self, name: &str) -> Result<Tensor> {
        let raw = self.get_raw(name)?;
        let dtype = match raw.dtype {
            safetensors::Dtype::U8 => DType::U8,
            safetensors::Dtype::U32 => DType::U32,
            safetensors::Dtype::I64 => DType::I64,
            safetensors::Dtype::F32 => DType::F32,
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::BF16 => DType::BF16,
            safetensors::Dtype::F64 => DType::F64,
            other => return Err(Error::format(&self.path, format!("tensor `{name}` has unsupported dtype {other:?}"))),
        };
        Ok(Tensor::from_raw_buffer(&raw.data, dtype, &raw.shape, &Device::Cpu)?)
    }

    /// True when `weight_name` is stored pre-quantized by bitsandbytes (4-bit).
    pub fn is_bnb_4bit(&self, weight_name: &str) -> bool {
        self.contains(&format!("{weight_name}.quant_state.bitsandbytes__nf4"))
    }

    /// A tensor exactly as stored (safetensors only), for bitsandbytes 4-bit weights and
    /// their side tensors.
    pub fn get_raw(&self, name: &str) -> Result<RawTensor> {
        match &self.backend {
            Backend::Safetensors { files, index } => {
                let &i = index.get(name).ok_or_else(|| self.missing(name))?;
                let (p, m) = &files[i];
                let st = SafeTensors::deserialize(m).map_err(|e| Error::format(p, e.to_string()))?;
                let view = st.tensor(name).map_err(|e| Error::format(p, e.to_string()))?;
                Ok(RawTensor { dtype: view.dtype(), shape: view.shape().to_vec(), data: view.data().to_vec() })
            }
            Backend::Gguf { .. } => Err(self.missing(name)),
        }
    }
}

fn mmap(path: &Path) -> Result<memmap2::Mmap> {
    let f = File::open(path).map_err(|e| Error::io(path, e))?;
    // SAFETY: the file is opened read-only; a concurrent writer truncating it would be a
    // user error that surfaces as a bad-header/short-read error, as with any reader.
    unsafe { memmap2::Mmap::map(&f) }.map_err(|e| Error::io(path, e))
}

/// llama.cpp's converter stores q/k projections with the two rotary halves of each head
/// interleaved (`reshape(n_head, 2, hd/2, in).swapaxes(1, 2)`), for its own RoPE. HF's
/// rotate_half convention needs the original layout back.
fn unpermute_llama_cpp(t: &Tensor, n_head: usize) -> Result<Tensor> {
    let (out, inp) = t.dims2()?;
    let hd = out / n_head;
    Ok(t.reshape((n_head, hd / 2, 2, inp))?.transpose(1, 2)?.contiguous()?.reshape((out, inp))?)
}

/// GGUF tensor name → (HF name, heads to un-permute with).
fn gguf_to_hf_name(g: &str, arch: &str, n_head: Option<usize>, n_kv: Option<usize>) -> Option<(String, Option<usize>)> {
    let llama_like = matches!(arch, "llama" | "mistral");
    let simple = match g {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(s) = simple {
        return Some((s.to_string(), None));
    }
    let rest = g.strip_prefix("blk.")?;
    let (layer, tail) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (hf, perm) = match tail {
        "attn_norm.weight" => ("input_layernorm.weight", None),
        "ffn_norm.weight" => ("post_attention_layernorm.weight", None),
        "attn_q.weight" => ("self_attn.q_proj.weight", if llama_like { n_head } else { None }),
        "attn_k.weight" => ("self_attn.k_proj.weight", if llama_like { n_kv } else { None }),
        "attn_v.weight" => ("self_attn.v_proj.weight", None),
        "attn_output.weight" => ("self_attn.o_proj.weight", None),
        "attn_q.bias" => ("self_attn.q_proj.bias", None),
        "attn_k.bias" => ("self_attn.k_proj.bias", None),
        "attn_v.bias" => ("self_attn.v_proj.bias", None),
        "ffn_gate.weight" => ("mlp.gate_proj.weight", None),
        "ffn_up.weight" => ("mlp.up_proj.weight", None),
        "ffn_down.weight" => ("mlp.down_proj.weight", None),
        "post_attention_norm.weight" => ("post_attention_layernorm.weight", None),
        "post_ffw_norm.weight" => ("post_feedforward_layernorm.weight", None),
        _ => return None,
    };
    Some((format!("model.layers.{layer}.{hf}"), perm))
}

/// An HF-style config.json (as JSON) reconstructed from GGUF metadata, so that GGUF
/// models go through the same config parsing as HF directories.
pub fn hf_config_from_gguf(content: &gguf_file::Content, path: &Path) -> Result<serde_json::Value> {
    let md = &content.metadata;
    let arch = md
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .ok_or_else(|| Error::format(path, "GGUF metadata has no general.architecture"))?;
    let need = |k: &str| -> Result<&gguf_file::Value> {
        md.get(&format!("{arch}.{k}")).ok_or_else(|| Error::format(path, format!("GGUF metadata key `{arch}.{k}` is missing")))
    };
    let num = |v: &gguf_file::Value| -> f64 {
        v.to_u32()
            .map(|x| x as f64)
            .or_else(|_| v.to_u64().map(|x| x as f64))
            .or_else(|_| v.to_f32().map(|x| x as f64))
            .or_else(|_| v.to_i32().map(|x| x as f64))
            .unwrap_or(f64::NAN)
    };
    let hidden = num(need("embedding_length")?) as usize;
    let n_head = num(need("attention.head_count")?) as usize;
    let n_kv = md.get(&format!("{arch}.attention.head_count_kv")).map(num).map(|x| x as usize).unwrap_or(n_head);
    let vocab = match md.get(&format!("{arch}.vocab_size")) {
        Some(v) => num(v) as usize,
        None => md.get("tokenizer.ggml.tokens").and_then(|v| v.to_vec().ok()).map(|v| v.len()).unwrap_or(0),
    };
    let tied = !content.tensor_infos.contains_key("output.weight");
    let model_type = match arch.as_str() {
        "llama" => "llama",
        "mistral" => "mistral",
        "qwen2" => "qwen2",
        other => return Err(Error::format(path, format!("GGUF architecture `{other}` is not supported (llama, mistral, qwen2)"))),
    };
    let mut cfg = serde_json::json!({
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": num(need("feed_forward_length")?) as usize,
        "num_hidden_layers": num(need("block_count")?) as usize,
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "head_dim": hidden / n_head,
        "rms_norm_eps": md.get(&format!("{arch}.attention.layer_norm_rms_epsilon")).map(num).unwrap_or(1e-6),
        "rope_theta": md.get(&format!("{arch}.rope.freq_base")).map(num).unwrap_or(10000.0),
        "max_position_embeddings": md.get(&format!("{arch}.context_length")).map(num).unwrap_or(2048.0) as usize,
        "vocab_size": vocab,
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
    });
    if let Some(d) = md.get(&format!("{arch}.rope.dimension_count")) {
        cfg["head_dim"] = serde_json::json!(num(d) as usize);
    }
    Ok(cfg)
}
