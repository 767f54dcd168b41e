//! `qdistill generate`: a model (optionally with a trained adapter) answering one prompt
//! or chatting, text streamed as it is generated.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::{DType, Device};
use qdistill_common::chat_template::{ChatTemplate, Message};
use qdistill_common::config;
use qdistill_common::generate::{
    attach_adapter, encode_prompt, stop_tokens, GenerateOptions, Generation, LogitsProcessor, SamplingParams, Session,
    TextStream,
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
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
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
    let mut sampler = LogitsProcessor::new(args.sampling)?;
    let m = load_for_inference(&args.model)?;
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
    let opts = GenerateOptions { max_new_tokens: args.max_new_tokens, stop_tokens: stop_tokens(tok, template.as_ref())? };
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
