//! Text generation: a KV cache and incremental decoding (the prompt is run once, then one
//! token per step), transformers' logits processors in transformers' order, streaming
//! detokenization that never splits a multi-byte character, and the prompt and stop-token
//! facts a tokenizer and its chat template imply.

use std::collections::HashSet;
use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Tensor, D};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::chat_template::{ChatTemplate, Message};
use crate::checkpoint::{load_adapter, ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME};
use crate::lora::{LoraParams, LoraSpec, LoraTensors, ALL_LINEAR};
use crate::model::Model;
use crate::ops::attention::{attention_fwd, AttnConfig};
use crate::tokenizer::TokenizerInfo;
use crate::{Error, Result};

// ---------------------------------------------------------------------------------------
// KV cache

/// Keys (after RoPE) and values of every position run so far, per layer, `[B, Hkv, T, D]`.
/// Sliding-window layers keep only their last `window` positions, as transformers'
/// sliding-window caches do: no later query can see further back.
#[derive(Clone)]
pub struct KvCache {
    layers: Vec<LayerKv>,
    len: usize,
}

#[derive(Clone, Default)]
struct LayerKv {
    kv: Option<(Tensor, Tensor)>,
    /// Position of the first cached key (above 0 once a sliding window dropped some).
    start: usize,
    window: Option<usize>,
}

impl KvCache {
    pub fn new(model: &Model) -> Self {
        KvCache { layers: vec![LayerKv::default(); model.blocks.len()], len: 0 }
    }

    /// Positions run so far: the next token goes to position `len()`.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn clear(&mut self) {
        self.layers.iter_mut().for_each(|l| *l = LayerKv::default());
        self.len = 0;
    }

    /// Keeps the first `n` positions. Returns false, leaving the cache as it was, when a
    /// sliding-window layer has already dropped keys that position `n` would see.
    pub fn truncate(&mut self, n: usize) -> Result<bool> {
        if n >= self.len {
            return Ok(true);
        }
        // Position n sees keys n + 1 - window ..= n; the layer must still hold them.
        let holds = |l: &LayerKv| l.start == 0 || l.window.is_some_and(|w| l.start + w <= n + 1);
        if !self.layers.iter().all(holds) {
            return Ok(false);
        }
        if n == 0 {
            self.clear();
            return Ok(true);
        }
        for l in &mut self.layers {
            if let Some((k, v)) = &l.kv {
                let keep = n - l.start;
                l.kv = Some((k.narrow(2, 0, keep)?.contiguous()?, v.narrow(2, 0, keep)?.contiguous()?));
            }
        }
        self.len = n;
        Ok(true)
    }

    /// Attention of this chunk's queries `q` [B, Hq, T, D] (positions `len()..len() + T`)
    /// over the cached keys plus this chunk's `k`, `v` [B, Hkv, T, D], which are appended.
    pub(crate) fn attend(&mut self, layer: usize, q: &Tensor, k: &Tensor, v: &Tensor, cfg: &AttnConfig) -> Result<Tensor> {
        let q_start = self.len;
        let n_layers = self.layers.len();
        let l = self
            .layers
            .get_mut(layer)
            .ok_or_else(|| Error::Msg(format!("KV cache: made for {n_layers} layers, asked for layer {layer}")))?;
        let (k_all, v_all, out) = match &l.kv {
            // A first chunk is exactly the training forward's case: use that attention.
            None if q_start == 0 => (k.clone(), v.clone(), attention_fwd(q, k, v, cfg, None)?.0),
            None => return Err(Error::Msg(format!("KV cache: layer {layer} is empty at position {q_start}"))),
            Some((pk, pv)) => {
                let k_all = Tensor::cat(&[pk, k], 2)?;
                let v_all = Tensor::cat(&[pv, v], 2)?;
                let out = cached_attention(q, &k_all, &v_all, q_start, l.start, cfg)?;
                (k_all, v_all, out)
            }
        };
        l.window = cfg.sliding_window;
        let total = k_all.dim(2)?;
        let keep = cfg.sliding_window.map_or(total, |w| w.min(total));
        l.kv = Some(if keep < total {
            l.start += total - keep;
            (k_all.narrow(2, total - keep, keep)?.contiguous()?, v_all.narrow(2, total - keep, keep)?.contiguous()?)
        } else {
            (k_all, v_all)
        });
        Ok(out)
    }

    /// Called once every layer has attended: the chunk's `t` positions are now cached.
    pub(crate) fn advance(&mut self, t: usize) {
        self.len += t;
    }
}

/// Causal attention of queries at positions `q_start..` over keys at positions `k_start..`
/// (`q` [B, Hq, Tq, D], `k`, `v` [B, Hkv, Tk, D]), with the scaling, soft-capping and
/// sliding-window rules of `ops::attention` (whose kernels take only aligned square
/// inputs). Query `i` sees key `j` iff `j <= i` and `i - j < window`.
fn cached_attention(q: &Tensor, k: &Tensor, v: &Tensor, q_start: usize, k_start: usize, cfg: &AttnConfig) -> Result<Tensor> {
    let (b, hq, tq, d) = q.dims4()?;
    let tk = k.dim(2)?;
    let hkv = cfg.n_kv_heads;
    let group = hq / hkv;
    // Query head h reads kv head h / group: grouping the query rows per kv head lets one
    // batched matmul serve the whole group (as ops::attention does).
    let qg = q.contiguous()?.reshape((b, hkv, group * tq, d))?;
    let mut s = (qg.matmul(&k.t()?)? * cfg.scale)?;
    if let Some(cap) = cfg.softcap {
        s = ((s / cap)?.tanh()? * cap)?;
    }
    let window = cfg.sliding_window;
    let mask: Vec<f32> = (0..tq)
        .flat_map(|i| {
            let qp = q_start + i;
            (0..tk).map(move |j| {
                let kp = k_start + j;
                let seen = kp <= qp && window.is_none_or(|w| qp - kp < w);
                if seen { 0.0 } else { f32::NEG_INFINITY }
            })
        })
        .collect();
    let mask = Tensor::from_vec(mask, (1, 1, 1, tq, tk), q.device())?.to_dtype(q.dtype())?;
    let s = s.reshape((b, hkv, group, tq, tk))?.broadcast_add(&mask)?;
    let e = s.broadcast_sub(&s.max_keepdim(D::Minus1)?)?.exp()?;
    let p = e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?;
    Ok(p.reshape((b, hkv, group * tq, tk))?.matmul(v)?.reshape((b, hq, tq, d))?)
}

// ---------------------------------------------------------------------------------------
// Logits processors and sampling

/// How the next token is chosen, with transformers' `generate` names and meanings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingParams {
    /// 0 picks the most likely token (greedy, after the repetition penalty); above 0 the
    /// logits are divided by it and a token is drawn.
    pub temperature: f64,
    /// Keep the `top_k` most likely tokens (ties with the k-th kept too); 0 = off.
    pub top_k: usize,
    /// Nucleus sampling: keep the most likely tokens whose probabilities sum to `top_p`;
    /// 1 = off.
    pub top_p: f64,
    /// Divides positive logits and multiplies negative logits of tokens already in the
    /// sequence (prompt included); 1 = off.
    pub repetition_penalty: f64,
    pub seed: u64,
}

impl Default for SamplingParams {
    /// Greedy, with transformers' `GenerationConfig` defaults for the sampling knobs.
    fn default() -> Self {
        SamplingParams { temperature: 0.0, top_k: 50, top_p: 1.0, repetition_penalty: 1.0, seed: 0 }
    }
}

impl SamplingParams {
    pub fn validate(&self) -> Result<()> {
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return Err(Error::Config(format!("temperature must be ≥ 0 (0 = greedy), got {}", self.temperature)));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(Error::Config(format!("top_p must be in (0, 1], got {}", self.top_p)));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return Err(Error::Config(format!("repetition_penalty must be > 0 (1 = off), got {}", self.repetition_penalty)));
        }
        Ok(())
    }

    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

/// transformers' `RepetitionPenaltyLogitsProcessor`: every token id in `seen` has its
/// logit divided by `penalty` when positive and multiplied by it when negative.
pub fn apply_repetition_penalty(logits: &mut [f32], seen: &[u32], penalty: f32) {
    if penalty == 1.0 {
        return;
    }
    let mut done = vec![false; logits.len()];
    for &t in seen {
        let i = t as usize;
        if i < logits.len() && !done[i] {
            done[i] = true;
            let z = logits[i];
            logits[i] = if z < 0.0 { z * penalty } else { z / penalty };
        }
    }
}

/// transformers' `TemperatureLogitsWarper`.
pub fn apply_temperature(logits: &mut [f32], temperature: f32) {
    if temperature != 1.0 {
        logits.iter_mut().for_each(|z| *z /= temperature);
    }
}

/// transformers' `TopKLogitsWarper`: logits below the k-th largest become -inf.
pub fn apply_top_k(logits: &mut [f32], k: usize) {
    if k == 0 || k >= logits.len() {
        return;
    }
    let mut sorted = logits.to_vec();
    let (_, kth, _) = sorted.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a));
    let kth = *kth;
    logits.iter_mut().filter(|z| **z < kth).for_each(|z| *z = f32::NEG_INFINITY);
}

/// transformers' `TopPLogitsWarper`: in ascending order of logit, tokens whose cumulative
/// probability is still ≤ 1 - `top_p` become -inf; the most likely token always stays.
pub fn apply_top_p(logits: &mut [f32], top_p: f64) {
    if top_p >= 1.0 || logits.is_empty() {
        return;
    }
    let probs = softmax(logits);
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[a].total_cmp(&logits[b]));
    let mut cum = 0.0;
    for &i in &order[..order.len() - 1] {
        cum += probs[i];
        if cum > 1.0 - top_p {
            break;
        }
        logits[i] = f32::NEG_INFINITY;
    }
}

fn softmax(logits: &[f32]) -> Vec<f64> {
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let e: Vec<f64> = logits.iter().map(|&z| (z as f64 - m).exp()).collect();
    let total: f64 = e.iter().sum();
    e.into_iter().map(|x| x / total).collect()
}

/// First index of the largest logit (what `torch.argmax` returns).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, z) in logits.iter().enumerate() {
        if *z > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Chooses next tokens: the processors above in the order transformers'
/// `LogitsProcessorList` applies them (repetition penalty, then temperature, top-k,
/// top-p), then argmax or a draw from a seeded stream.
pub struct LogitsProcessor {
    params: SamplingParams,
    rng: ChaCha8Rng,
}

impl LogitsProcessor {
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        Ok(LogitsProcessor { params, rng: ChaCha8Rng::seed_from_u64(params.seed) })
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Applies the processors to one row of logits in place; filtered tokens become -inf.
    /// Greedy decoding uses only the repetition penalty, as transformers does.
    pub fn process(&self, logits: &mut [f32], seen: &[u32]) {
        let p = &self.params;
        apply_repetition_penalty(logits, seen, p.repetition_penalty as f32);
        if !p.is_greedy() {
            apply_temperature(logits, p.temperature as f32);
            apply_top_k(logits, p.top_k);
            apply_top_p(logits, p.top_p);
        }
    }

    /// The next token after a sequence `seen` (prompt and generated tokens so far), given
    /// the model's logits for it.
    pub fn sample(&mut self, mut logits: Vec<f32>, seen: &[u32]) -> Result<u32> {
        if logits.iter().any(|z| z.is_nan()) {
            return Err(Error::Msg("the model's logits contain NaN: cannot choose a next token".into()));
        }
        self.process(&mut logits, seen);
        if self.params.is_greedy() {
            return Ok(argmax(&logits));
        }
        let probs = softmax(&logits);
        let u = self.rng.random::<f64>();
        let mut acc = 0.0;
        for (i, p) in probs.iter().enumerate() {
            acc += p;
            if acc > u {
                return Ok(i as u32);
            }
        }
        // Rounding left u above the total: take the last token that can be drawn at all.
        Ok(probs.iter().rposition(|&p| p > 0.0).unwrap_or(0) as u32)
    }
}

// ---------------------------------------------------------------------------------------
// generation_config.json

/// The generation defaults a model ships in `generation_config.json`, as transformers'
/// `GenerationConfig` reads them; None where the file does not set a key.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GenerationConfig {
    pub do_sample: Option<bool>,
    pub temperature: Option<f64>,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub max_new_tokens: Option<usize>,
    /// Prompt plus generated tokens; transformers ignores it when max_new_tokens is set.
    pub max_length: Option<usize>,
    /// One id or a list in the file; empty when absent.
    pub eos_token_id: Vec<u32>,
}

/// The file name transformers reads generation defaults from.
pub const GENERATION_CONFIG_NAME: &str = "generation_config.json";

impl GenerationConfig {
    /// `<model_dir>/generation_config.json`, or None when `model` is not a directory
    /// (a GGUF file) or has no such file.
    pub fn load(model: &Path) -> Result<Option<Self>> {
        let path = model.join(GENERATION_CONFIG_NAME);
        if !model.is_dir() || !path.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        Self::parse(&text, &path).map(Some)
    }

    /// Parses the JSON text of `path` (named in errors). Unknown keys are ignored, as
    /// transformers keeps them as attributes; `null` means not set.
    pub fn parse(text: &str, path: &Path) -> Result<Self> {
        let v: serde_json::Value =
            serde_json::from_str(text).map_err(|e| Error::format(path, format!("not valid JSON: {e}")))?;
        let obj = v.as_object().ok_or_else(|| Error::format(path, "expected a JSON object"))?;
        let get = |k: &str| obj.get(k).filter(|v| !v.is_null());
        let bad = |k: &str, what: &str| Error::format(path, format!("`{k}` must be {what}, got {}", obj[k]));
        let float = |k: &str| get(k).map(|v| v.as_f64().ok_or_else(|| bad(k, "a number"))).transpose();
        let count = |k: &str| {
            get(k).map(|v| v.as_u64().map(|n| n as usize).ok_or_else(|| bad(k, "a non-negative integer"))).transpose()
        };
        let token = |v: &serde_json::Value| v.as_u64().and_then(|n| u32::try_from(n).ok());
        let eos_token_id = match get("eos_token_id") {
            None => Vec::new(),
            Some(serde_json::Value::Array(a)) => {
                a.iter().map(|v| token(v).ok_or_else(|| bad("eos_token_id", "a token id or a list of them"))).collect::<Result<_>>()?
            }
            Some(v) => vec![token(v).ok_or_else(|| bad("eos_token_id", "a token id or a list of them"))?],
        };
        Ok(GenerationConfig {
            do_sample: get("do_sample").map(|v| v.as_bool().ok_or_else(|| bad("do_sample", "true or false"))).transpose()?,
            temperature: float("temperature")?,
            top_k: count("top_k")?,
            top_p: float("top_p")?,
            repetition_penalty: float("repetition_penalty")?,
            max_new_tokens: count("max_new_tokens")?,
            max_length: count("max_length")?,
            eos_token_id,
        })
    }
}

/// Generation settings given on the command line; None = take the model's
/// generation_config.json, else the defaults.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct GenerationFlags {
    pub temperature: Option<f64>,
    pub top_k: Option<usize>,
    pub top_p: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub max_new_tokens: Option<usize>,
    pub seed: u64,
}

/// New tokens when neither the command line nor generation_config.json limits them
/// (transformers' own default, max_length 20 in all, is too short for a chat reply).
pub const DEFAULT_MAX_NEW_TOKENS: usize = 256;

/// How many tokens a reply may have.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenLimit {
    /// At most this many new tokens.
    New(usize),
    /// Prompt and reply together at most this long (generation_config's max_length).
    Total(usize),
}

impl TokenLimit {
    /// New tokens allowed after a context of `context` tokens: at least one, as transformers
    /// generates one when the prompt already fills max_length.
    pub fn new_tokens(&self, context: usize) -> usize {
        match *self {
            TokenLimit::New(n) => n,
            TokenLimit::Total(n) => n.saturating_sub(context).max(1),
        }
    }
}

/// What `generate` runs with: command-line flags first, then the model's
/// generation_config.json, then transformers' defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct ResolvedGeneration {
    pub sampling: SamplingParams,
    pub limit: TokenLimit,
    /// generation_config's eos_token_id: stop tokens besides the tokenizer's EOS and the
    /// chat template's end of turn.
    pub eos_token_id: Vec<u32>,
}

/// Resolves the generation settings as transformers does: the file's `do_sample = false`
/// (or no `do_sample`) means greedy, which here is temperature 0; with `do_sample = true`
/// the file's temperature applies (1 when absent). A `--temperature` flag decides on its
/// own (0 greedy, above 0 sampling). `max_new_tokens` beats `max_length`, as in
/// transformers.
pub fn resolve_generation(flags: &GenerationFlags, file: Option<&GenerationConfig>) -> ResolvedGeneration {
    let d = SamplingParams::default();
    let gc = file.cloned().unwrap_or_default();
    let temperature = flags.temperature.unwrap_or(match gc.do_sample {
        Some(true) => gc.temperature.unwrap_or(1.0),
        _ => 0.0,
    });
    let limit = match (flags.max_new_tokens.or(gc.max_new_tokens), gc.max_length) {
        (Some(n), _) => TokenLimit::New(n),
        (None, Some(total)) => TokenLimit::Total(total),
        (None, None) => TokenLimit::New(DEFAULT_MAX_NEW_TOKENS),
    };
    ResolvedGeneration {
        sampling: SamplingParams {
            temperature,
            top_k: flags.top_k.or(gc.top_k).unwrap_or(d.top_k),
            top_p: flags.top_p.or(gc.top_p).unwrap_or(d.top_p),
            repetition_penalty: flags.repetition_penalty.or(gc.repetition_penalty).unwrap_or(d.repetition_penalty),
            seed: flags.seed,
        },
        limit,
        eos_token_id: gc.eos_token_id,
    }
}

// ---------------------------------------------------------------------------------------
// Incremental generation

#[derive(Debug, Clone)]
pub struct GenerateOptions {
    pub max_new_tokens: usize,
    /// Tokens that end generation (EOS, the chat template's end-of-turn token).
    pub stop_tokens: Vec<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// A stop token was chosen (it is not part of `Generation::tokens`).
    StopToken(u32),
    MaxNewTokens,
    /// The model's last position (max_position_embeddings) was reached.
    ContextFull,
}

#[derive(Debug, Clone)]
pub struct Generation {
    /// The generated tokens, without the stop token.
    pub tokens: Vec<u32>,
    pub stop: StopReason,
    /// Tokens of the context, and how many of them had to be run (the others were cached).
    pub context_tokens: usize,
    pub prefill_tokens: usize,
    pub prefill_secs: f64,
    pub decode_secs: f64,
}

impl Generation {
    /// Generated tokens per second of decoding (the prefill excluded).
    pub fn tokens_per_sec(&self) -> f64 {
        self.tokens.len() as f64 / self.decode_secs.max(1e-9)
    }
}

/// A model, its (optional) adapter and a KV cache holding the tokens run so far. Each
/// `generate` runs only the part of its context that differs from what is cached, so a
/// chat that re-renders the whole conversation every turn pays only for the new turn.
pub struct Session<'m> {
    model: &'m Model,
    lora: Option<LoraTensors>,
    cache: KvCache,
    /// The tokens whose keys and values are in `cache`, in order.
    fed: Vec<u32>,
}

impl<'m> Session<'m> {
    pub fn new(model: &'m Model, lora: Option<LoraTensors>) -> Self {
        Session { model, lora, cache: KvCache::new(model), fed: Vec::new() }
    }

    pub fn cached_tokens(&self) -> &[u32] {
        &self.fed
    }

    pub fn reset(&mut self) {
        self.cache.clear();
        self.fed.clear();
    }

    /// Runs `ids` after the cached tokens; returns the logits (f32, soft-capped where the
    /// model does so) of the last of them.
    fn run(&mut self, ids: &[u32]) -> Result<Vec<f32>> {
        let t = Tensor::from_slice(ids, (1, ids.len()), self.model.device())?;
        let h = match self.model.forward_cached(&t, &mut self.cache, self.lora.as_ref()) {
            Ok(h) => h,
            Err(e) => {
                // Some layers may have appended this chunk and others not.
                self.reset();
                return Err(e);
            }
        };
        self.fed.extend_from_slice(ids);
        let last = h.narrow(0, ids.len() - 1, 1)?;
        Ok(self.model.logits(&last)?.squeeze(0)?.to_dtype(DType::F32)?.to_vec1()?)
    }

    /// The logits of the token after `context`, running only what the cache lacks. Returns
    /// them with the number of tokens run.
    pub fn prefill(&mut self, context: &[u32]) -> Result<(Vec<f32>, usize)> {
        if context.is_empty() {
            return Err(Error::Msg("nothing to generate from: the prompt has no tokens".into()));
        }
        let common = self.fed.iter().zip(context).take_while(|(a, b)| a == b).count();
        // At least the last context token must run, to get its logits.
        let mut keep = common.min(context.len() - 1);
        if keep < self.fed.len() {
            if !self.cache.truncate(keep)? {
                self.cache.clear();
                keep = 0;
            }
            self.fed.truncate(keep);
        }
        let todo = &context[keep..];
        Ok((self.run(todo)?, todo.len()))
    }

    /// Generates after `context` until a stop token, `max_new_tokens` or the end of the
    /// model's positions; `on_token` gets each token as it is chosen.
    pub fn generate(
        &mut self,
        context: &[u32],
        opts: &GenerateOptions,
        sampler: &mut LogitsProcessor,
        mut on_token: impl FnMut(u32) -> Result<()>,
    ) -> Result<Generation> {
        let t0 = Instant::now();
        let (mut logits, prefill_tokens) = self.prefill(context)?;
        let prefill_secs = t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        let mut seq = context.to_vec();
        let mut tokens = Vec::new();
        let max_positions = self.model.cfg.max_position_embeddings;
        let stop = loop {
            if tokens.len() >= opts.max_new_tokens {
                break StopReason::MaxNewTokens;
            }
            let next = sampler.sample(logits, &seq)?;
            if opts.stop_tokens.contains(&next) {
                break StopReason::StopToken(next);
            }
            tokens.push(next);
            seq.push(next);
            on_token(next)?;
            if tokens.len() >= opts.max_new_tokens {
                break StopReason::MaxNewTokens;
            }
            if self.cache.len() >= max_positions {
                break StopReason::ContextFull;
            }
            logits = self.run(&[next])?;
        };
        Ok(Generation {
            tokens,
            stop,
            context_tokens: context.len(),
            prefill_tokens,
            prefill_secs,
            decode_secs: t1.elapsed().as_secs_f64(),
        })
    }
}

// ---------------------------------------------------------------------------------------
// Text

/// Turns generated token ids into text pieces as they come. A byte-level BPE token may end
/// inside a multi-byte UTF-8 character, whose partial decode ends in U+FFFD; text is
/// released only once it no longer does. Each piece is the difference between decoding
/// the recent tokens with and without the new ones, so tokenizers whose decoders treat
/// word starts specially (SentencePiece's `▁`) keep their spaces.
pub struct TextStream<'t> {
    tok: &'t TokenizerInfo,
    ids: Vec<u32>,
    /// `ids[prefix..read]` were released already and give the next piece its context.
    prefix: usize,
    read: usize,
}

impl<'t> TextStream<'t> {
    pub fn new(tok: &'t TokenizerInfo) -> Self {
        TextStream { tok, ids: Vec::new(), prefix: 0, read: 0 }
    }

    /// The text that `id` completes, if any.
    pub fn push(&mut self, id: u32) -> Result<Option<String>> {
        self.ids.push(id);
        let before = self.tok.decode(&self.ids[self.prefix..self.read], true)?;
        let now = self.tok.decode(&self.ids[self.prefix..], true)?;
        if now.len() <= before.len() || now.ends_with('\u{FFFD}') {
            return Ok(None);
        }
        let piece = new_text(&before, &now);
        self.prefix = self.read;
        self.read = self.ids.len();
        Ok(Some(piece))
    }

    /// Whatever is still held back (a truncated multi-byte character decodes as U+FFFD).
    pub fn finish(&mut self) -> Result<Option<String>> {
        let before = self.tok.decode(&self.ids[self.prefix..self.read], true)?;
        let now = self.tok.decode(&self.ids[self.prefix..], true)?;
        self.prefix = self.ids.len();
        self.read = self.ids.len();
        Ok((now.len() > before.len()).then(|| new_text(&before, &now)))
    }
}

/// What `now` adds after `before` (normally a prefix of it).
fn new_text(before: &str, now: &str) -> String {
    match now.strip_prefix(before) {
        Some(rest) => rest.to_string(),
        None => {
            let cut = (before.len()..=now.len()).find(|&i| now.is_char_boundary(i)).unwrap_or(now.len());
            now[cut..].to_string()
        }
    }
}

/// Token ids of a prompt text, with BOS in front when the tokenizer adds one and the text
/// does not already start with it (chat templates often write it themselves): the rule
/// the data pipeline applies to training samples.
pub fn encode_prompt(tok: &TokenizerInfo, text: &str) -> Result<Vec<u32>> {
    let mut ids = tok.encode(text, false)?;
    if let (true, Some(bos_id), Some(bos)) = (tok.add_bos, tok.bos_id, tok.bos_token.as_deref()) {
        if !text.starts_with(bos) {
            ids.insert(0, bos_id);
        }
    }
    Ok(ids)
}

/// The special token that closes an assistant turn in `template` (`<|im_end|>`,
/// `<|eot_id|>`, `<end_of_turn>`): the first special token the template writes after an
/// assistant message's content.
pub fn end_of_turn_token(tok: &TokenizerInfo, template: &ChatTemplate) -> Result<Option<u32>> {
    const MARK: char = '\u{E000}';
    let messages = [Message::new("user", "Hi"), Message::new("assistant", MARK.to_string())];
    let text = template.render(&messages, false)?;
    let Some(at) = text.rfind(MARK) else { return Ok(None) };
    let special = tok.special_ids();
    Ok(tok.encode(&text[at + MARK.len_utf8()..], false)?.into_iter().find(|id| special.contains(id)))
}

/// Tokens that end a reply: EOS, and the template's end-of-turn token when there is one.
pub fn stop_tokens(tok: &TokenizerInfo, template: Option<&ChatTemplate>) -> Result<Vec<u32>> {
    let mut stops = vec![tok.eos_id];
    if let Some(t) = template {
        stops.extend(end_of_turn_token(tok, t)?.filter(|id| *id != tok.eos_id));
    }
    Ok(stops)
}

/// Loads a PEFT LoRA adapter directory (`adapter_config.json` + `adapter_model.safetensors`)
/// onto `model`: every linear its `target_modules` names gets an adapter slot, and every
/// tensor is checked by name and shape (a missing or extra one is an error that names it).
/// Dropout is off: this is for inference.
pub fn attach_adapter(model: &mut Model, dir: &Path) -> Result<LoraParams> {
    let (cfg, tensors) = load_adapter(dir)?;
    let cfg_path = dir.join(ADAPTER_CONFIG_NAME);
    if cfg.layers_to_transform.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(Error::format(&cfg_path, "layers_to_transform is not supported (adapters on every layer only)"));
    }
    let mut targets = HashSet::new();
    for t in &cfg.target_modules {
        if !ALL_LINEAR.contains(&t.as_str()) {
            return Err(Error::format(
                &cfg_path,
                format!("target_modules: `{t}` is not a linear layer name ({})", ALL_LINEAR.join(", ")),
            ));
        }
        targets.insert(t.clone());
    }
    let mut target_modules: Vec<String> = targets.into_iter().collect();
    target_modules.sort();
    let spec = LoraSpec { r: cfg.r, lora_alpha: cfg.lora_alpha, lora_dropout: 0.0, use_rslora: cfg.use_rslora, target_modules };
    let modules = model.attach_lora(&spec)?;
    let mut params = LoraParams::init(&spec, &modules, 0);
    params.load_peft_tensors(&tensors, &dir.join(ADAPTER_WEIGHTS_NAME))?;
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::test_assets::{read_fixture, smollm2};

    /// Seeded logits without ties (distinct values), or with many ties.
    fn logits(n: usize, seed: u64, ties: bool) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n)
            .map(|_| {
                let z = rng.random_range(-6.0f32..6.0);
                if ties { z.round() } else { z }
            })
            .collect()
    }

    fn kept(z: &[f32]) -> Vec<usize> {
        (0..z.len()).filter(|&i| z[i] != f32::NEG_INFINITY).collect()
    }

    #[test]
    fn processors_match_transformers() {
        let fx = read_fixture("generate/processors.json");
        for (n, case) in fx["cases"].as_array().unwrap().iter().enumerate() {
            let f = |k: &str| case[k].as_f64().unwrap();
            let mut z: Vec<f32> = case["logits"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap() as f32).collect();
            let seen: Vec<u32> = case["seen"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as u32).collect();
            let params = SamplingParams {
                temperature: f("temperature"),
                top_k: case["top_k"].as_u64().unwrap() as usize,
                top_p: f("top_p"),
                repetition_penalty: f("repetition_penalty"),
                seed: 0,
            };
            LogitsProcessor::new(params).unwrap().process(&mut z, &seen);
            for (i, want) in case["expected"].as_array().unwrap().iter().enumerate() {
                match want.as_f64() {
                    None => assert_eq!(z[i], f32::NEG_INFINITY, "case {n} ({params:?}): token {i} should be filtered, got {}", z[i]),
                    Some(w) => assert!(
                        (z[i] as f64 - w).abs() <= 1e-5 * w.abs().max(1.0),
                        "case {n} ({params:?}): token {i} is {}, transformers {w}",
                        z[i]
                    ),
                }
            }
        }
    }

    #[test]
    fn top_k_keeps_tokens_with_fewer_than_k_strictly_larger() {
        for (seed, ties) in [(1, false), (2, true), (3, true)] {
            let z = logits(97, seed, ties);
            for k in [1, 2, 5, 17, 96, 97, 200] {
                let mut got = z.clone();
                apply_top_k(&mut got, k);
                let want: Vec<usize> = (0..z.len()).filter(|&i| z.iter().filter(|&&o| o > z[i]).count() < k).collect();
                assert_eq!(kept(&got), want, "k = {k}, ties = {ties}");
                // Kept logits are untouched.
                assert!(want.iter().all(|&i| got[i] == z[i]));
            }
        }
    }

    #[test]
    fn top_p_keeps_the_smallest_most_likely_set_reaching_p() {
        for seed in 0..6 {
            let z = logits(80, 10 + seed, false);
            let m = z.iter().copied().fold(f32::MIN, f32::max) as f64;
            let total: f64 = z.iter().map(|&x| (x as f64 - m).exp()).sum();
            let p = |i: usize| (z[i] as f64 - m).exp() / total;
            for top_p in [0.05, 0.3, 0.5, 0.9, 0.99] {
                let mut got = z.clone();
                apply_top_p(&mut got, top_p);
                // Token i goes iff the mass of tokens no more likely than it is ≤ 1 - top_p
                // (and it is not the most likely token).
                let top = argmax(&z) as usize;
                let want: Vec<usize> = (0..z.len())
                    .filter(|&i| i == top || (0..z.len()).filter(|&j| z[j] <= z[i]).map(p).sum::<f64>() > 1.0 - top_p)
                    .collect();
                assert_eq!(kept(&got), want, "top_p = {top_p}");
                let mass: f64 = want.iter().map(|&i| p(i)).sum();
                let least = want.iter().map(|&i| p(i)).fold(f64::MAX, f64::min);
                assert!(mass >= top_p - 1e-9, "kept mass {mass} < top_p {top_p}");
                assert!(want.len() == 1 || mass - least < top_p + 1e-9, "the kept set is not minimal");
            }
        }
    }

    #[test]
    fn repetition_penalty_scales_each_seen_token_once() {
        let z = logits(50, 7, false);
        let seen = [3u32, 9, 3, 41, 9, 9, 0, 77]; // repeats, and an id beyond the vocabulary
        for penalty in [1.0f32, 1.3, 0.8] {
            let mut got = z.clone();
            apply_repetition_penalty(&mut got, &seen, penalty);
            for i in 0..z.len() {
                let want = if seen.contains(&(i as u32)) {
                    if z[i] > 0.0 { z[i] / penalty } else { z[i] * penalty }
                } else {
                    z[i]
                };
                assert_eq!(got[i], want, "token {i}, penalty {penalty}");
            }
        }
    }

    #[test]
    fn greedy_and_near_zero_temperature_pick_the_argmax() {
        for seed in 0..5 {
            let z = logits(300, 100 + seed, false);
            let best = (0..z.len()).max_by(|&a, &b| z[a].total_cmp(&z[b])).unwrap() as u32;
            let mut greedy = LogitsProcessor::new(SamplingParams::default()).unwrap();
            assert_eq!(greedy.sample(z.clone(), &[]).unwrap(), best);
            let cold = SamplingParams { temperature: 1e-4, top_k: 0, seed, ..Default::default() };
            let mut cold = LogitsProcessor::new(cold).unwrap();
            for _ in 0..50 {
                assert_eq!(cold.sample(z.clone(), &[]).unwrap(), best);
            }
        }
    }

    #[test]
    fn draws_are_seeded_and_follow_the_softmax() {
        let z = vec![1.0f32, 0.0, -1.0, 2.0, f32::NEG_INFINITY];
        let params = SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, repetition_penalty: 1.0, seed: 42 };
        let draw = |seed: u64, n: usize| -> Vec<u32> {
            let mut s = LogitsProcessor::new(SamplingParams { seed, ..params }).unwrap();
            (0..n).map(|_| s.sample(z.clone(), &[]).unwrap()).collect()
        };
        assert_eq!(draw(42, 200), draw(42, 200));
        assert_ne!(draw(42, 200), draw(43, 200));
        let n = 40_000;
        let mut counts = [0usize; 5];
        for t in draw(7, n) {
            counts[t as usize] += 1;
        }
        let e: Vec<f64> = z.iter().map(|&x| (x as f64).exp()).collect();
        let total: f64 = e.iter().sum();
        for i in 0..5 {
            let (freq, p) = (counts[i] as f64 / n as f64, e[i] / total);
            // 5 standard deviations of a binomial frequency.
            let tol = 5.0 * (p * (1.0 - p) / n as f64).sqrt() + 1e-12;
            assert!((freq - p).abs() <= tol, "token {i}: drawn {freq:.4}, softmax {p:.4}");
        }
        assert_eq!(counts[4], 0, "a -inf logit was drawn");
    }

    #[test]
    fn invalid_sampling_settings_are_refused_by_name() {
        for (p, key) in [
            (SamplingParams { temperature: -1.0, ..Default::default() }, "temperature"),
            (SamplingParams { top_p: 0.0, ..Default::default() }, "top_p"),
            (SamplingParams { top_p: 1.5, ..Default::default() }, "top_p"),
            (SamplingParams { repetition_penalty: 0.0, ..Default::default() }, "repetition_penalty"),
        ] {
            let e = LogitsProcessor::new(p).err().expect("must be refused").to_string();
            assert!(e.contains(key), "{e}");
        }
        let mut s = LogitsProcessor::new(SamplingParams::default()).unwrap();
        assert!(s.sample(vec![0.0, f32::NAN], &[]).unwrap_err().to_string().contains("NaN"));
    }

    #[test]
    fn streamed_pieces_join_to_the_full_decode_without_broken_characters() {
        let Some(tok) = smollm2() else { return };
        let text = "Café déjà vu — 日本語のテキスト 🙂👍🏽 naïve Ünïcödé, then plain ASCII again.";
        let ids = tok.encode(text, false).unwrap();
        // The byte-level vocabulary splits some of these characters over several tokens.
        let lone: Vec<String> = ids.iter().map(|&i| tok.decode(&[i], true).unwrap()).collect();
        assert!(lone.iter().any(|s| s.contains('\u{FFFD}')), "the text no longer exercises split characters");
        let mut stream = TextStream::new(&tok);
        let mut pieces = Vec::new();
        for &id in &ids {
            pieces.extend(stream.push(id).unwrap());
        }
        pieces.extend(stream.finish().unwrap());
        assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')), "{pieces:?}");
        assert_eq!(pieces.concat(), tok.decode(&ids, true).unwrap());
        assert_eq!(pieces.concat(), text);
    }

    #[test]
    fn chatml_end_of_turn_token_is_found() {
        let Some(tok) = smollm2() else { return };
        let tpl = ChatTemplate::from_tokenizer(&tok).unwrap().unwrap();
        let stops = stop_tokens(&tok, Some(&tpl)).unwrap();
        let im_end = tok.token_to_id("<|im_end|>").unwrap();
        assert!(stops.contains(&tok.eos_id) && stops.contains(&im_end), "{stops:?}");
    }

    fn gc_fixture(name: &str) -> std::path::PathBuf {
        std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/generate/generation_config").join(name)
    }

    /// Each Hub-style generation_config.json reads as transformers'
    /// GenerationConfig.from_pretrained reads it, and with no flags resolves to its values,
    /// else transformers' generate() defaults (greedy unless do_sample).
    #[test]
    fn generation_config_reads_and_resolves_like_transformers() {
        let resolved: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(gc_fixture("resolved.json")).unwrap()).unwrap();
        let defaults = &resolved["defaults"];
        for name in ["qwen2.5-instruct", "llama3.2-instruct", "qwen2.5-base", "max-length"] {
            let want = &resolved[name];
            let gc = GenerationConfig::load(&gc_fixture(name)).unwrap().expect("the fixture has a generation_config.json");
            let f = |k: &str| want[k].as_f64();
            let u = |k: &str| want[k].as_u64().map(|n| n as usize);
            assert_eq!(gc.do_sample, want["do_sample"].as_bool(), "{name}");
            assert_eq!((gc.temperature, gc.top_p, gc.repetition_penalty), (f("temperature"), f("top_p"), f("repetition_penalty")), "{name}");
            assert_eq!((gc.top_k, gc.max_new_tokens, gc.max_length), (u("top_k"), u("max_new_tokens"), u("max_length")), "{name}");
            let eos: Vec<u32> = serde_json::from_value(want["eos_token_id"].clone()).unwrap();
            assert_eq!(gc.eos_token_id, eos, "{name}");

            let r = resolve_generation(&GenerationFlags::default(), Some(&gc));
            let or_default = |k: &str| f(k).unwrap_or(defaults[k].as_f64().unwrap());
            let sampling = want["do_sample"].as_bool().unwrap_or(defaults["do_sample"].as_bool().unwrap());
            let t = if sampling { or_default("temperature") } else { 0.0 };
            assert_eq!(r.sampling.temperature, t, "{name}: temperature");
            assert_eq!(r.sampling.top_p, or_default("top_p"), "{name}: top_p");
            assert_eq!(r.sampling.top_k as f64, or_default("top_k"), "{name}: top_k");
            assert_eq!(r.sampling.repetition_penalty, or_default("repetition_penalty"), "{name}: repetition_penalty");
            let limit = match (u("max_new_tokens"), u("max_length")) {
                (Some(n), _) => TokenLimit::New(n),
                (None, Some(n)) => TokenLimit::Total(n),
                (None, None) => TokenLimit::New(DEFAULT_MAX_NEW_TOKENS),
            };
            assert_eq!(r.limit, limit, "{name}");
            assert_eq!(r.eos_token_id, eos, "{name}");
        }
    }

    #[test]
    fn flags_override_generation_config() {
        let gc = GenerationConfig::load(&gc_fixture("qwen2.5-instruct")).unwrap().unwrap();
        let flags = GenerationFlags {
            temperature: Some(0.0),
            top_k: Some(5),
            top_p: Some(0.5),
            repetition_penalty: Some(1.3),
            max_new_tokens: Some(7),
            seed: 9,
        };
        let r = resolve_generation(&flags, Some(&gc));
        assert_eq!(
            r.sampling,
            SamplingParams { temperature: 0.0, top_k: 5, top_p: 0.5, repetition_penalty: 1.3, seed: 9 }
        );
        assert_eq!(r.limit, TokenLimit::New(7));
        // A greedy model file still samples when asked to.
        let base = GenerationConfig::load(&gc_fixture("qwen2.5-base")).unwrap().unwrap();
        let r = resolve_generation(&GenerationFlags { temperature: Some(0.8), ..Default::default() }, Some(&base));
        assert_eq!((r.sampling.temperature, r.limit), (0.8, TokenLimit::New(2048)));
        // --max-new-tokens beats the file's max_length.
        let ml = GenerationConfig::load(&gc_fixture("max-length")).unwrap().unwrap();
        let r = resolve_generation(&GenerationFlags { max_new_tokens: Some(3), ..Default::default() }, Some(&ml));
        assert_eq!(r.limit, TokenLimit::New(3));
        assert_eq!(resolve_generation(&GenerationFlags::default(), Some(&ml)).limit.new_tokens(60), 4);
        assert_eq!(resolve_generation(&GenerationFlags::default(), Some(&ml)).limit.new_tokens(80), 1);
        // No file: the documented defaults.
        let r = resolve_generation(&GenerationFlags::default(), None);
        assert_eq!((r.sampling, r.limit), (SamplingParams::default(), TokenLimit::New(DEFAULT_MAX_NEW_TOKENS)));
    }

    #[test]
    fn bad_generation_config_is_named() {
        let p = Path::new("model/generation_config.json");
        let e = GenerationConfig::parse("{\"eos_token_id\": [2, \"x\"]}", p).unwrap_err().to_string();
        assert!(e.contains("model/generation_config.json") && e.contains("eos_token_id"), "{e}");
        let e = GenerationConfig::parse("{\"top_k\": -1}", p).unwrap_err().to_string();
        assert!(e.contains("top_k"), "{e}");
        let e = GenerationConfig::parse("{\"temperature\": 0.7", p).unwrap_err().to_string();
        assert!(e.contains("not valid JSON"), "{e}");
        // null is "not set", as transformers writes unset values.
        assert_eq!(GenerationConfig::parse("{\"top_k\": null, \"eos_token_id\": 7}", p).unwrap().eos_token_id, vec![7]);
        // A model given as a file (GGUF) has no generation_config.json.
        assert_eq!(GenerationConfig::load(&gc_fixture("resolved.json")).unwrap(), None);
    }
}
