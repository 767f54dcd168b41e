//! `qdistill generate`: a model (optionally with a trained adapter) answering one prompt
//! or chatting, text streamed as it is generated.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::{DType, Device};
use qdistill_common::chat_template::{ChatTemplate, Message};
use qdistill_common::config;
use qdistill_common::generate::{
    attach_adapter, encode_prompt, resolve_generation, stop_tokens, GenerateOptions, Generation, GenerationConfig,
    GenerationFlags, LogitsProcessor, Session, TextStream,
};
use qdistill_common::lora::{LoraParams, LoraTensors};
use qdistill_common::model::Model;
use qdistill_common::tokenizer::TokenizerInfo;

use crate::bench::open_device;
use crate::models;

/// Which model to load for inference, and how.
#[derive(Debug, Clone)]
pub struct ModelArgs {
    /// HF directory, hub id or GGUF file.
    pub model: String,
    /// A PEFT adapter directory (adapter_config.json + adapter_model.safetensors).
    pub adapter: Option<PathBuf>,
    /// cpu, cuda, cuda:N.
    pub device: String,
    /// f32 or bf16.
    pub dtype: String,
    /// Quantize the block linears to NF4 on load (as a QLoRA student is trained).
    pub nf4: bool,
}

pub struct InferenceModel {
    pub model: Model,
    pub tokenizer: TokenizerInfo,
    pub adapter: Option<LoraParams>,
    pub path: PathBuf,
}

impl InferenceModel {
    /// The adapter's tensors on the model's device, if there is an adapter.
    pub fn lora(&self) -> anyhow::Result<Option<LoraTensors>> {
        Ok(self.adapter.as_ref().map(|p| p.to_device(self.model.device(), self.model.dtype())).transpose()?)
    }
}

pub fn parse_dtype(s: &str) -> anyhow::Result<DType> {
    Ok(match s {
        "f32" | "float32" => DType::F32,
        "bf16" | "bfloat16" => DType::BF16,
        other => bail!("dtype `{other}`: expected f32 or bf16"),
    })
}

/// The layers a depth-pruned student was trained with, from the resolved config that
/// training saves next to its adapter: the adapter only fits the model cut the same way.
fn adapter_keep_layers(dir: &Path, nf4: bool) -> anyhow::Result<Option<Vec<usize>>> {
    let p = dir.join("qdistill_config.toml");
    if !p.exists() {
        return Ok(None);
    }
    let cfg = config::load(&p, &[]).with_context(|| format!("reading keep_layers from {}", p.display()))?;
    if let Some(k) = &cfg.model.keep_layers {
        tracing::info!(config = %p.display(), keep_layers = ?k, "the adapter was trained on a depth-pruned model");
    }
    if cfg.model.quantization == config::Quantization::Nf4 && !nf4 {
        tracing::info!("the adapter was trained on an NF4 base; --nf4 runs it on the same weights");
    }
    Ok(cfg.model.keep_layers)
}

/// Loads the model (cut to the adapter's `keep_layers` when its training config says so)
/// and attaches the adapter.
pub fn load_for_inference(args: &ModelArgs) -> anyhow::Result<InferenceModel> {
    let device: Device = open_device(&args.device)?;
    let dtype = parse_dtype(&args.dtype)?;
    let path = config::resolve_model_path(&args.model, None, None)?;
    let keep_layers = args.adapter.as_deref().map(|d| adapter_keep_layers(d, args.nf4)).transpose()?.flatten();
    tracing::info!(model = %path.display(), nf4 = args.nf4, dtype = ?dtype, "loading model");
    let loaded = models::load(&path, keep_layers, args.nf4, true, &device, dtype)?;
    let mut model = loaded.model;
    let adapter = match &args.adapter {
        Some(dir) => {
            let p = attach_adapter(&mut model, dir).with_context(|| format!("loading adapter {}", dir.display()))?;
            tracing::info!(adapter = %dir.display(), modules = p.entries.len(), r = p.spec.r, "adapter attached");
            Some(p)
        }
        None => None,
    };
    Ok(InferenceModel { model, tokenizer: loaded.tokenizer, adapter, path })
}

#[derive(Debug, Clone)]
pub struct GenerateArgs {
    pub model: ModelArgs,
    /// One prompt (the first turn with `chat`); None without `chat` reads it from the input.
    pub prompt: Option<String>,
    /// Read user turns from the input until it ends, keeping the conversation.
    pub chat: bool,
    pub system: Option<String>,
    /// Sampling and length as given on the command line; what is not given comes from the
    /// model's generation_config.json, else transformers' defaults.
    pub generation: GenerationFlags,
    /// Render prompts with the tokenizer's chat template (off: the prompt text as is).
    pub chat_template: bool,
}

/// Runs `qdistill generate`: generated text goes to `out` as it comes, the chat prompt
/// marker to `prompt_out`, user turns (or the prompt) come from `input`. Returns one
/// `Generation` per reply.
pub fn run_generate(
    args: &GenerateArgs,
    input: &mut dyn BufRead,
    out: &mut dyn Write,
    prompt_out: &mut dyn Write,
) -> anyhow::Result<Vec<Generation>> {
    let m = load_for_inference(&args.model)?;
    let file = GenerationConfig::load(&m.path)?;
    let resolved = resolve_generation(&args.generation, file.as_ref());
    if file.is_some() {
        tracing::info!(
            file = %m.path.join(qdistill_common::generate::GENERATION_CONFIG_NAME).display(),
            sampling = ?resolved.sampling, limit = ?resolved.limit, eos = ?resolved.eos_token_id,
            "generation defaults from the model (flags override)"
        );
    }
    let mut sampler = LogitsProcessor::new(resolved.sampling)?;
    let tok = &m.tokenizer;
    let template = if args.chat_template { ChatTemplate::from_tokenizer(tok)? } else { None };
    if template.is_none() {
        let why = if args.chat_template { "the tokenizer has none" } else { "--no-chat-template" };
        if args.chat {
            bail!("--chat needs a chat template ({why}); use --prompt for plain text completion");
        }
        if args.system.is_some() {
            bail!("--system needs a chat template ({why})");
        }
    }
    let mut stops = stop_tokens(tok, template.as_ref())?;
    stops.extend(resolved.eos_token_id.iter().filter(|id| !stops.contains(id)).collect::<Vec<_>>());
    let mut opts = GenerateOptions { max_new_tokens: 0, stop_tokens: stops };
    let mut session = Session::new(&m.model, m.lora()?);
    let mut history: Vec<Message> = args.system.iter().map(|s| Message::new("system", s.clone())).collect();
    let mut replies = Vec::new();
    let mut reply = |user: &str, history: &mut Vec<Message>, session: &mut Session, out: &mut dyn Write| -> anyhow::Result<()> {
        history.push(Message::new("user", user));
        let text = match &template {
            Some(t) => t.render(history, true)?,
            None => user.to_string(),
        };
        let ids = encode_prompt(tok, &text)?;
        opts.max_new_tokens = resolved.limit.new_tokens(ids.len());
        let mut stream = TextStream::new(tok);
        let g = session.generate(&ids, &opts, &mut sampler, |id| {
            if let Some(piece) = stream.push(id)? {
                out.write_all(piece.as_bytes()).and_then(|_| out.flush()).map_err(|e| qdistill_common::Error::Msg(format!("writing the output: {e}")))?;
            }
            Ok(())
        })?;
        if let Some(rest) = stream.finish()? {
            out.write_all(rest.as_bytes())?;
        }
        writeln!(out)?;
        out.flush()?;
        history.push(Message::new("assistant", tok.decode(&g.tokens, true)?));
        tracing::info!(
            prompt_tokens = g.context_tokens,
            cached_tokens = g.context_tokens - g.prefill_tokens,
            generated_tokens = g.tokens.len(),
            tokens_per_sec = format!("{:.1}", g.tokens_per_sec()),
            prefill_tokens_per_sec = format!("{:.1}", g.prefill_tokens as f64 / g.prefill_secs.max(1e-9)),
            stop = ?g.stop,
            "generated"
        );
        replies.push(g);
        Ok(())
    };
    if !args.chat {
        let prompt = match &args.prompt {
            Some(p) => p.clone(),
            None => {
                let mut s = String::new();
                input.read_to_string(&mut s).context("reading the prompt from standard input")?;
                s
            }
        };
        reply(&prompt, &mut history, &mut session, out)?;
        return Ok(replies);
    }
    if let Some(p) = &args.prompt {
        reply(p, &mut history, &mut session, out)?;
    }
    let system_turns = history.iter().take_while(|m| m.role == "system").count();
    loop {
        write!(prompt_out, "> ")?;
        prompt_out.flush()?;
        let mut line = String::new();
        if input.read_line(&mut line).context("reading standard input")? == 0 {
            break;
        }
        match line.trim() {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                // Back to the system prompt; the session keeps its cache of that prefix.
                history.truncate(system_turns);
                continue;
            }
            user => reply(user, &mut history, &mut session, out)?,
        }
    }
    Ok(replies)
}

#[cfg(test)]
mod tests {
    use super::*;
    use qdistill_common::generate::StopReason;
    use serde_json::json;

    /// The tiny Llama fixture (vocabulary 256) with a byte-level tokenizer that fills it
    /// (three specials, then bytes 0..=252), no chat template, and `generation_config`
    /// as its generation_config.json when given.
    fn tiny_model(dir: &Path, generation_config: Option<serde_json::Value>) -> PathBuf {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models/llama");
        for f in ["config.json", "model.safetensors"] {
            std::fs::copy(src.join(f), dir.join(f)).unwrap();
        }
        let printable = |x: u32| (33..=126).contains(&x) || (161..=172).contains(&x) || (174..=255).contains(&x);
        let byte_char = |b: u32| {
            if printable(b) {
                char::from_u32(b).unwrap()
            } else {
                char::from_u32(256 + (0..b).filter(|&x| !printable(x)).count() as u32).unwrap()
            }
        };
        let specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];
        let mut vocab = serde_json::Map::new();
        for (i, s) in specials.iter().enumerate() {
            vocab.insert(s.to_string(), json!(i));
        }
        for b in 0..=252u32 {
            vocab.insert(byte_char(b).to_string(), json!(3 + b));
        }
        let added: Vec<serde_json::Value> = specials
            .iter()
            .enumerate()
            .map(|(i, s)| json!({"id": i, "content": s, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}))
            .collect();
        let tok = json!({
            "version": "1.0", "truncation": null, "padding": null, "added_tokens": added, "normalizer": null,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
            "post_processor": null,
            "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
            "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null, "end_of_word_suffix": null,
                      "fuse_unk": false, "byte_fallback": false, "ignore_merges": false, "vocab": vocab, "merges": []}
        });
        std::fs::write(dir.join("tokenizer.json"), tok.to_string()).unwrap();
        let cfg = json!({"eos_token": "<|endoftext|>", "bos_token": null, "add_bos_token": false});
        std::fs::write(dir.join("tokenizer_config.json"), cfg.to_string()).unwrap();
        if let Some(gc) = generation_config {
            std::fs::write(dir.join("generation_config.json"), gc.to_string()).unwrap();
        }
        dir.to_path_buf()
    }

    fn generate(model: &Path, flags: GenerationFlags) -> Generation {
        let args = GenerateArgs {
            model: ModelArgs { model: model.display().to_string(), adapter: None, device: "cpu".into(), dtype: "f32".into(), nf4: false },
            prompt: Some("The cat sat on".into()),
            chat: false,
            system: None,
            generation: flags,
            chat_template: false,
        };
        let (mut out, mut marker) = (Vec::new(), Vec::new());
        let mut replies = run_generate(&args, &mut std::io::empty(), &mut out, &mut marker).unwrap();
        assert_eq!(replies.len(), 1);
        replies.remove(0)
    }

    /// The reference is greedy decoding of the same model without a generation_config.json
    /// (flags fixing the length); a file that limits the length or lists an extra EOS id
    /// must cut that same token stream where it says, and flags must beat the file.
    #[test]
    fn generation_config_sets_length_and_stop_tokens_and_flags_override_it() {
        let dirs: Vec<tempfile::TempDir> = (0..4).map(|_| tempfile::tempdir().unwrap()).collect();
        let plain = tiny_model(dirs[0].path(), None);
        let reference = generate(&plain, GenerationFlags { max_new_tokens: Some(6), ..Default::default() });
        assert_eq!(reference.stop, StopReason::MaxNewTokens, "the reference must run its full length: {reference:?}");
        let t = &reference.tokens;
        // The second token, if new in the sequence, is the earliest place an EOS list can cut.
        let cut = (1..t.len()).find(|&k| !t[..k].contains(&t[k])).expect("the greedy stream repeats one token");

        let limited = tiny_model(dirs[1].path(), Some(json!({"max_new_tokens": 3, "do_sample": false})));
        assert_eq!(generate(&limited, GenerationFlags::default()).tokens, t[..3]);
        let overridden = generate(&limited, GenerationFlags { max_new_tokens: Some(5), ..Default::default() });
        assert_eq!(overridden.tokens, t[..5], "--max-new-tokens must beat the file");

        let eos = tiny_model(dirs[2].path(), Some(json!({"eos_token_id": [0, t[cut]], "max_new_tokens": 6})));
        let g = generate(&eos, GenerationFlags::default());
        assert_eq!((g.tokens.as_slice(), g.stop), (&t[..cut], StopReason::StopToken(t[cut])));

        // max_length counts the prompt: a prompt of P tokens leaves max_length − P.
        let p = reference.context_tokens;
        let total = tiny_model(dirs[3].path(), Some(json!({"max_length": p + 4})));
        assert_eq!(generate(&total, GenerationFlags::default()).tokens, t[..4]);
    }
}
