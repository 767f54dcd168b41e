//! The decoder shared by every supported family: block forward and backward side by
//! side, explicit saved activations, optional per-block activation checkpointing.
//!
//! Block wiring (flags from `Family`):
//! ```text
//! h = attn_norm(x); a = o_proj(attn(rope(q_proj h), rope(k_proj h), v_proj h))
//! a = attn_post_norm(a)            # Gemma2 only
//! x = x + a
//! h = ffn_norm(x); m = down_proj(act(gate_proj h) * up_proj h)
//! m = ffn_post_norm(m)             # Gemma2 only
//! x = x + m
//! ```

use candle_core::{DType, Device, Tensor, D};

use super::{Family, ModelConfig};
use crate::lora::{BaseWeight, DropoutSeed, Linear, LinearSaved, LoraGrads, LoraParams, LoraSpec, LoraTensors};
use crate::nf4::Nf4Tensor;
use crate::ops::attention::{attention_bwd, attention_fwd, heads_to_bhtd, heads_to_bthd, AttnConfig, AttnSaved};
use crate::ops::activation::{glu_bwd_in_place, glu_fwd, Activation};
use crate::ops::embedding::embedding_fwd;
use crate::ops::residual_add;
use crate::ops::rms_norm::{rms_norm_bwd, rms_norm_bwd_add, rms_norm_fwd, RmsNormSaved};
use crate::ops::rope::{rope_bwd_to_bthd, rope_fwd_from_bthd, RopeTable};
use crate::generate::KvCache;
use crate::weights::WeightStore;
use crate::{Error, Result};

/// Short names of the block's linears, in a fixed order (also their dropout stream ids).
const LINEARS: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// Attention settings of (original) layer `layer`.
fn attn_config(cfg: &ModelConfig, layer: usize) -> AttnConfig {
    AttnConfig {
        n_heads: cfg.num_attention_heads,
        n_kv_heads: cfg.num_key_value_heads,
        head_dim: cfg.head_dim,
        scale: cfg.attn_scale,
        sliding_window: cfg.layer_window[layer],
        softcap: cfg.attn_logit_softcapping,
    }
}

/// Whether linear `short` carries a bias (Qwen2: q/k/v only, not o_proj).
fn has_bias(cfg: &ModelConfig, short: &str) -> bool {
    match short {
        "q_proj" | "k_proj" | "v_proj" => cfg.attention_bias,
        "o_proj" => cfg.attention_bias && cfg.model_type != "qwen2",
        _ => cfg.mlp_bias,
    }
}

fn module_path(layer: usize, short: &str) -> String {
    let group = if matches!(short, "gate_proj" | "up_proj" | "down_proj") { "mlp" } else { "self_attn" };
    format!("model.layers.{layer}.{group}.{short}")
}

pub struct Block {
    attn_norm: Tensor,
    attn_post_norm: Option<Tensor>,
    ffn_norm: Tensor,
    ffn_post_norm: Option<Tensor>,
    /// q, k, v, o, gate, up, down — the order of `LINEARS`.
    linears: Vec<Linear>,
    attn: AttnConfig,
    act: Activation,
}

pub struct BlockSaved {
    n1: RmsNormSaved,
    lin: Vec<Option<LinearSaved>>,
    attn: AttnSaved,
    attn_post: Option<RmsNormSaved>,
    n2: RmsNormSaved,
    gate: Tensor,
    up: Tensor,
    ffn_post: Option<RmsNormSaved>,
}

/// Everything one forward needs besides the weights.
pub struct StepCtx<'a> {
    pub position_ids: &'a Tensor,
    pub segment_ids: Option<&'a Tensor>,
    pub lora: Option<&'a LoraTensors>,
    /// Base seed for this microbatch's dropout masks; None = no dropout (eval, teacher).
    pub dropout_seed: Option<u64>,
}

impl StepCtx<'_> {
    fn dropout(&self, layer: usize, linear: usize) -> Option<DropoutSeed> {
        self.dropout_seed.map(|s| {
            // SplitMix-style mixing so neighbouring (layer, linear) pairs get unrelated masks.
            let mut z = s ^ ((layer as u64) << 8 | linear as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            DropoutSeed(z ^ (z >> 31))
        })
    }
}

pub struct Model {
    pub cfg: ModelConfig,
    pub embed: Tensor,
    pub blocks: Vec<Block>,
    pub norm: Tensor,
    /// None when tied to `embed`.
    lm_head: Option<Tensor>,
    rope: RopeTable,
    unit_offset: bool,
    embed_scale: Option<f64>,
    device: Device,
    dtype: DType,
    /// Checkpointed block inputs go to pinned host memory (`set_activation_offloading`).
    #[cfg(feature = "cuda")]
    offload: Option<std::sync::Mutex<crate::kernels::offload::HostOffload>>,
}

/// Without CUDA there is no device memory to spare: the offload store never exists.
#[cfg(not(feature = "cuda"))]
enum NoOffload {}

#[cfg(not(feature = "cuda"))]
impl NoOffload {
    fn store(&mut self, _: usize, _: &Tensor) -> Result<()> {
        match *self {}
    }
    fn end_forward(&mut self) -> Result<()> {
        match *self {}
    }
    fn load(&mut self, _: usize) -> Result<Tensor> {
        match *self {}
    }
}

pub struct ModelSaved {
    /// With checkpointing: each block's input (recomputed in backward), unless offloaded to
    /// the host; empty without checkpointing.
    block_inputs: Vec<Tensor>,
    /// The block inputs wait in host memory (`Model::set_activation_offloading`).
    offloaded: bool,
    block_saved: Vec<BlockSaved>,
    final_norm: RmsNormSaved,
    shape: (usize, usize),
}

#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Original layer indices to keep (depth-pruned student); None keeps all.
    pub keep_layers: Option<Vec<usize>>,
    /// Quantize the block linears to NF4 on load (bitsandbytes semantics).
    pub nf4: bool,
    pub double_quant: bool,
    pub device: Device,
    /// Compute dtype of activations and dense weights (f32, bf16; f64 for gradient checks).
    pub dtype: DType,
}

impl Model {
    pub fn load(store: &WeightStore, cfg: &ModelConfig, opts: &LoadOptions) -> Result<Self> {
        let keep: Vec<usize> = match &opts.keep_layers {
            Some(k) => {
                if let Some(&bad) = k.iter().find(|&&i| i >= cfg.num_hidden_layers) {
                    return Err(Error::Config(format!(
                        "keep_layers names layer {bad}, but {} has only {} layers",
                        store.path().display(),
                        cfg.num_hidden_layers
                    )));
                }
                k.clone()
            }
            None => (0..cfg.num_hidden_layers).collect(),
        };
        let dev = &opts.device;
        let d = cfg.hidden_size;
        let dt = opts.dtype;
        let get = |name: &str, shape: &[usize]| -> Result<Tensor> { Ok(store.get(name, shape, dev)?.to_dtype(dt)?) };
        let embed = get("model.embed_tokens.weight", &[cfg.vocab_size, d])?;
        let lm_head = if cfg.tie_word_embeddings {
            None
        } else {
            Some(get("lm_head.weight", &[cfg.vocab_size, d])?)
        };
        let norm = get("model.norm.weight", &[d])?;
        let gemma2 = cfg.family == Family::Gemma2;
        let mut blocks = Vec::with_capacity(keep.len());
        for &i in &keep {
            let p = |s: &str| format!("model.layers.{i}.{s}");
            let mut linears = Vec::with_capacity(7);
            for short in LINEARS {
                let (inf, outf) = cfg.linear_shape(short).expect("known linear");
                let name = format!("{}.weight", module_path(i, short));
                let weight = if store.is_bnb_4bit(&name) {
                    // A pre-quantized bitsandbytes checkpoint: keep its exact codes.
                    let q = Nf4Tensor::from_bnb_tensors(store.path(), &name, |n| store.get_native(n).ok())?;
                    if (q.rows, q.cols) != (outf, inf) {
                        return Err(Error::Shape {
                            path: store.path().to_path_buf(),
                            name,
                            expected: vec![outf, inf],
                            got: vec![q.rows, q.cols],
                        });
                    }
                    if opts.nf4 { BaseWeight::Nf4(q) } else { BaseWeight::Dense(q.to_tensor(dev)?.to_dtype(dt)?) }
                } else {
                    let w = store.get(&name, &[outf, inf], dev)?;
                    if opts.nf4 {
                        let v = w.flatten_all()?.to_vec1::<f32>()?;
                        BaseWeight::Nf4(Nf4Tensor::quantize(&v, outf, inf, opts.double_quant)?)
                    } else {
                        BaseWeight::Dense(w.to_dtype(dt)?)
                    }
                };
                let has_bias = has_bias(cfg, short);
                let bias = if has_bias {
                    Some(get(&format!("{}.bias", module_path(i, short)), &[outf])?)
                } else {
                    None
                };
                linears.push(Linear { weight, bias, in_features: inf, out_features: outf, lora: None });
            }
            let (attn_post_norm, ffn_norm, ffn_post_norm) = if gemma2 {
                (
                    Some(get(&p("post_attention_layernorm.weight"), &[d])?),
                    get(&p("pre_feedforward_layernorm.weight"), &[d])?,
                    Some(get(&p("post_feedforward_layernorm.weight"), &[d])?),
                )
            } else {
                (None, get(&p("post_attention_layernorm.weight"), &[d])?, None)
            };
            blocks.push(Block {
                attn_norm: get(&p("input_layernorm.weight"), &[d])?,
                attn_post_norm,
                ffn_norm,
                ffn_post_norm,
                linears,
                attn: attn_config(cfg, i),
                act: cfg.hidden_act.clone(),
            });
        }
        let cfg = cfg.with_layers(&keep);
        let rope = RopeTable::new(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling.clone(), cfg.max_position_embeddings, dev)?;
        let gemma = matches!(cfg.family, Family::Gemma | Family::Gemma2);
        #[allow(unused_mut)]
        let mut model = Self {
            embed_scale: gemma.then(|| (cfg.hidden_size as f64).sqrt()),
            unit_offset: gemma,
            cfg,
            embed,
            blocks,
            norm,
            lm_head,
            rope,
            device: opts.device.clone(),
            dtype: dt,
            #[cfg(feature = "cuda")]
            offload: None,
        };
        // On a GPU the NF4 codes move to device memory once and the CUDA kernel
        // dequantizes them before each GEMM.
        #[cfg(feature = "cuda")]
        model.upload_nf4()?;
        Ok(model)
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// With gradient checkpointing, keep each block's input in pinned host memory between
    /// the forward and the backward instead of on the GPU (what Unsloth calls "unsloth"
    /// checkpointing, TRL's `activation_offloading`): at Llama-3-8B and 4×2048
    /// tokens, 2 GiB less device memory, the copies overlapped with compute. On the CPU
    /// there is no separate device memory, so it changes nothing there.
    ///
    /// An input embedding that is not tied to the LM head (Llama-3-8B: 1 GiB in bf16) also
    /// moves to host memory: it is frozen and read only at the batch's rows, which are
    /// gathered there and copied over (64 MiB at 8K tokens and d = 4096).
    pub fn set_activation_offloading(&mut self, on: bool) -> Result<()> {
        #[cfg(feature = "cuda")]
        {
            self.offload = match (&self.device, on) {
                (Device::Cuda(d), true) => Some(std::sync::Mutex::new(crate::kernels::offload::HostOffload::new(d)?)),
                _ => None,
            };
            if self.lm_head.is_some() && self.device.is_cuda() {
                let home = if on { Device::Cpu } else { self.device.clone() };
                self.embed = self.embed.to_device(&home)?;
            }
        }
        let _ = on;
        Ok(())
    }

    /// The offload store, locked for one forward or backward (None when not offloading).
    #[cfg(feature = "cuda")]
    fn offload(&self) -> Result<Option<std::sync::MutexGuard<'_, crate::kernels::offload::HostOffload>>> {
        self.offload
            .as_ref()
            .map(|m| m.lock().map_err(|_| Error::Msg("activation offloading: a previous step panicked".into())))
            .transpose()
    }

    #[cfg(not(feature = "cuda"))]
    fn offload(&self) -> Result<Option<NoOffload>> {
        Ok(None)
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The LM head weight [V, d] (the embedding when tied).
    /// Keeps (a copy of) the LM head on `device`, for a teacher whose blocks run on another
    /// GPU than the student: the teacher sends its final hidden states, and the student's
    /// fused loss applies this head where the student lives. The blocks and the embedding
    /// stay where they are; [`Model::logits`] then takes hidden states on `device`.
    pub fn place_lm_head(&mut self, device: &Device) -> Result<()> {
        if !self.lm_head().device().same_device(device) {
            self.lm_head = Some(self.lm_head().to_device(device)?);
        }
        Ok(())
    }

    pub fn lm_head(&self) -> &Tensor {
        self.lm_head.as_ref().unwrap_or(&self.embed)
    }

    /// Every targeted linear as (module path, in, out), in model order; assigns each its
    /// slot in the flat adapter buffer.
    pub fn attach_lora(&mut self, spec: &LoraSpec) -> Result<Vec<(String, usize, usize)>> {
        for t in &spec.target_modules {
            if !LINEARS.contains(&t.as_str()) {
                return Err(Error::Config(format!(
                    "lora.target_modules: `{t}` is not a linear layer of this model (valid: {})",
                    LINEARS.join(", ")
                )));
            }
        }
        let mut modules = Vec::new();
        for (li, b) in self.blocks.iter_mut().enumerate() {
            for (k, short) in LINEARS.iter().enumerate() {
                let l = &mut b.linears[k];
                l.lora = None;
                if spec.targets(short) {
                    l.lora = Some(modules.len());
                    modules.push((module_path(li, short), l.in_features, l.out_features));
                }
            }
        }
        Ok(modules)
    }

    /// Bytes held by the frozen base (what NF4 saves).
    pub fn base_memory_bytes(&self) -> usize {
        let t = |x: &Tensor| x.elem_count() * x.dtype().size_in_bytes();
        let mut n = t(&self.embed) + t(&self.norm) + self.lm_head.as_ref().map_or(0, t);
        for b in &self.blocks {
            n += b.linears.iter().map(|l| l.weight.memory_bytes() + l.bias.as_ref().map_or(0, t)).sum::<usize>();
            n += t(&b.attn_norm) + t(&b.ffn_norm);
        }
        n
    }

    fn embed_tokens(&self, ids: &Tensor) -> Result<Tensor> {
        if self.embed.device().same_device(ids.device()) {
            return embedding_fwd(ids, &self.embed, self.embed_scale);
        }
        // The table waits in host memory (activation offloading): gather the batch's rows
        // there and move only them.
        #[cfg(feature = "cuda")]
        if let (Some(mut o), None) = (self.offload()?, self.embed_scale) {
            let (b, t) = ids.dims2()?;
            let flat: Vec<u32> = ids.flatten_all()?.to_vec1()?;
            return Ok(o.gather_rows(&self.embed, &flat)?.reshape((b, t, self.cfg.hidden_size))?);
        }
        let rows = embedding_fwd(&ids.to_device(self.embed.device())?, &self.embed, self.embed_scale)?;
        Ok(rows.to_device(ids.device())?)
    }

    /// Forward for training: returns the final normed hidden states [B·T, d] and what the
    /// backward needs. With `checkpointing`, only block inputs are kept.
    pub fn forward_train(&self, ids: &Tensor, ctx: &StepCtx, checkpointing: bool) -> Result<(Tensor, ModelSaved)> {
        let (b, t) = ids.dims2()?;
        let mut x = self.embed_tokens(ids)?;
        let mut block_inputs = Vec::new();
        let mut block_saved = Vec::new();
        let mut offload = if checkpointing { self.offload()? } else { None };
        for (li, blk) in self.blocks.iter().enumerate() {
            if checkpointing {
                match offload.as_mut() {
                    Some(o) => o.store(li, &x)?,
                    None => block_inputs.push(x.clone()),
                }
                x = blk.forward(&x, ctx, li, &self.rope, self.unit_offset, self.cfg.rms_norm_eps, false)?.0;
            } else {
                let (y, s) = blk.forward(&x, ctx, li, &self.rope, self.unit_offset, self.cfg.rms_norm_eps, true)?;
                block_saved.push(s.expect("saved"));
                x = y;
            }
        }
        let offloaded = offload.is_some();
        if let Some(mut o) = offload {
            o.end_forward()?;
        }
        let (h, final_norm) = rms_norm_fwd(&x, &self.norm, self.cfg.rms_norm_eps, self.unit_offset)?;
        let h = h.reshape((b * t, self.cfg.hidden_size))?;
        Ok((h, ModelSaved { block_inputs, offloaded, block_saved, final_norm, shape: (b, t) }))
    }

    /// Backward from dL/dh [B·T, d]; accumulates adapter gradients into `grads`.
    pub fn backward(
        &self,
        dh: &Tensor,
        saved: ModelSaved,
        ctx: &StepCtx,
        params: &LoraParams,
        grads: &mut LoraGrads,
    ) -> Result<()> {
        let (b, t) = saved.shape;
        let dh = dh.reshape((b, t, self.cfg.hidden_size))?;
        let mut dx = rms_norm_bwd(&dh, &self.norm, self.unit_offset, &saved.final_norm)?;
        let ModelSaved { block_inputs, offloaded, mut block_saved, .. } = saved;
        let mut offload = if offloaded { self.offload()? } else { None };
        for li in (0..self.blocks.len()).rev() {
            let blk = &self.blocks[li];
            let s = if let Some(o) = offload.as_mut() {
                let input = o.load(li)?;
                let (_, s) = blk.forward(&input, ctx, li, &self.rope, self.unit_offset, self.cfg.rms_norm_eps, true)?;
                s.expect("saved")
            } else if block_inputs.is_empty() {
                block_saved.pop().expect("one saved per block")
            } else {
                // Recompute this block's forward with saves; dropout masks are seeded per
                // (step, layer, linear) so they match the first pass exactly.
                let (_, s) = blk.forward(&block_inputs[li], ctx, li, &self.rope, self.unit_offset, self.cfg.rms_norm_eps, true)?;
                s.expect("saved")
            };
            dx = blk.backward(&dx, s, ctx, li, &self.rope, self.unit_offset, params, grads)?;
            if let Some(range) = blk.adapter_range(params) {
                grads.range_ready(range)?;
            }
        }
        Ok(())
    }

    /// Inference forward: final normed hidden states [B·T, d], nothing saved. `lora` None
    /// runs the frozen base alone (the LwF teacher).
    pub fn forward_hidden(&self, ids: &Tensor, ctx: &StepCtx) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let mut x = self.embed_tokens(ids)?;
        for (li, blk) in self.blocks.iter().enumerate() {
            x = blk.forward(&x, ctx, li, &self.rope, self.unit_offset, self.cfg.rms_norm_eps, false)?.0;
        }
        let (h, _) = rms_norm_fwd(&x, &self.norm, self.cfg.rms_norm_eps, self.unit_offset)?;
        Ok(h.reshape((b * t, self.cfg.hidden_size))?)
    }

    /// Full logits [B·T, V] with final soft-capping (eval and small models only: training
    /// never materialises these, the fused loss works on hidden states).
    pub fn logits(&self, h: &Tensor) -> Result<Tensor> {
        let mut z = h.matmul(&self.lm_head().t()?)?;
        if let Some(cap) = self.cfg.final_logit_softcapping {
            z = ((z / cap)?.tanh()? * cap)?;
        }
        Ok(z)
    }

    /// Incremental forward for generation: runs `ids` [B, T] at positions
    /// `cache.len()..cache.len() + T`, appends every layer's k and v (after RoPE) to `cache`
    /// and returns the final normed hidden states [B·T, d]. The same block arithmetic as
    /// `forward_hidden`, so the logits at each position equal a full forward's.
    pub fn forward_cached(&self, ids: &Tensor, cache: &mut KvCache, lora: Option<&LoraTensors>) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let start = cache.len();
        if start + t > self.rope.max_len() {
            return Err(Error::Msg(format!(
                "a context of {} tokens exceeds the model's {} positions (max_position_embeddings)",
                start + t,
                self.rope.max_len()
            )));
        }
        let pos: Vec<u32> = (0..b).flat_map(|_| (start..start + t).map(|p| p as u32)).collect();
        let position_ids = Tensor::from_vec(pos, (b, t), &self.device)?;
        let ctx = StepCtx { position_ids: &position_ids, segment_ids: None, lora, dropout_seed: None };
        let mut x = self.embed_tokens(ids)?;
        for (li, blk) in self.blocks.iter().enumerate() {
            x = blk.forward_cached(&x, &ctx, li, cache, &self.rope, self.unit_offset, self.cfg.rms_norm_eps)?;
        }
        cache.advance(t);
        let (h, _) = rms_norm_fwd(&x, &self.norm, self.cfg.rms_norm_eps, self.unit_offset)?;
        Ok(h.reshape((b * t, self.cfg.hidden_size))?)
    }
}

impl Block {
    /// The span of the flat adapter layout this block's adapters occupy (None without
    /// adapters). Blocks' spans do not overlap: `LoraParams` lays modules out in order.
    fn adapter_range(&self, params: &LoraParams) -> Option<std::ops::Range<usize>> {
        let r = params.spec.r;
        self.linears.iter().filter_map(|l| l.lora).map(|i| &params.entries[i]).fold(None, |acc, e| {
            let (lo, hi) = (e.a_offset.min(e.b_offset), (e.a_offset + r * e.in_features).max(e.b_offset + e.out_features * r));
            Some(match acc {
                None => lo..hi,
                Some(a) => a.start.min(lo)..a.end.max(hi),
            })
        })
    }

    /// `forward` for generation: attention over the cached keys and values of earlier
    /// positions plus this chunk's, nothing saved for a backward.
    #[allow(clippy::too_many_arguments)]
    fn forward_cached(
        &self,
        x: &Tensor,
        ctx: &StepCtx,
        layer: usize,
        cache: &mut KvCache,
        rope: &RopeTable,
        unit_offset: bool,
        eps: f64,
    ) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let n = b * t;
        let (hq, hkv, hd) = (self.attn.n_heads, self.attn.n_kv_heads, self.attn.head_dim);
        let run = |k: usize, inp: &Tensor| -> Result<Tensor> { Ok(self.linears[k].forward(inp, ctx.lora, None, false)?.0) };
        let (h1, _) = rms_norm_fwd(x, &self.attn_norm, eps, unit_offset)?;
        let h1 = h1.reshape((n, d))?;
        let q = rope_fwd_from_bthd(&run(0, &h1)?.reshape((b, t, hq, hd))?, rope, ctx.position_ids)?;
        let k = rope_fwd_from_bthd(&run(1, &h1)?.reshape((b, t, hkv, hd))?, rope, ctx.position_ids)?;
        let v = heads_to_bhtd(&run(2, &h1)?.reshape((b, t, hkv, hd))?)?;
        let o = cache.attend(layer, &q, &k, &v, &self.attn)?;
        let o = heads_to_bthd(&o)?.reshape((n, hq * hd))?;
        let mut a = run(3, &o)?.reshape((b, t, d))?;
        if let Some(w) = &self.attn_post_norm {
            a = rms_norm_fwd(&a, w, eps, unit_offset)?.0;
        }
        let x1 = residual_add(x, &a)?;
        let (h2, _) = rms_norm_fwd(&x1, &self.ffn_norm, eps, unit_offset)?;
        let h2 = h2.reshape((n, d))?;
        let m = glu_fwd(&run(4, &h2)?, &run(5, &h2)?, self.act)?;
        let mut dn = run(6, &m)?.reshape((b, t, d))?;
        if let Some(w) = &self.ffn_post_norm {
            dn = rms_norm_fwd(&dn, w, eps, unit_offset)?.0;
        }
        residual_add(&x1, &dn)
    }

    #[allow(clippy::too_many_arguments)]
    fn forward(
        &self,
        x: &Tensor,
        ctx: &StepCtx,
        layer: usize,
        rope: &RopeTable,
        unit_offset: bool,
        eps: f64,
        save: bool,
    ) -> Result<(Tensor, Option<BlockSaved>)> {
        let (b, t, d) = x.dims3()?;
        let n = b * t;
        let (hq, hkv, hd) = (self.attn.n_heads, self.attn.n_kv_heads, self.attn.head_dim);
        let (h1, n1) = rms_norm_fwd(x, &self.attn_norm, eps, unit_offset)?;
        let h1 = h1.reshape((n, d))?;
        let mut lin: Vec<Option<LinearSaved>> = Vec::with_capacity(7);
        let run = |k: usize, inp: &Tensor, lin: &mut Vec<Option<LinearSaved>>| -> Result<Tensor> {
            let (y, s) = self.linears[k].forward(inp, ctx.lora, ctx.dropout(layer, k), save)?;
            lin.push(s);
            Ok(y)
        };
        // q and k go from the linears' [B, T, H, D] to attention's [B, H, T, D] inside the
        // RoPE kernel; v and the attention output through one vectorised copy each.
        let q = rope_fwd_from_bthd(&run(0, &h1, &mut lin)?.reshape((b, t, hq, hd))?, rope, ctx.position_ids)?;
        let k = rope_fwd_from_bthd(&run(1, &h1, &mut lin)?.reshape((b, t, hkv, hd))?, rope, ctx.position_ids)?;
        let v = heads_to_bhtd(&run(2, &h1, &mut lin)?.reshape((b, t, hkv, hd))?)?;
        let (o, attn) = attention_fwd(&q, &k, &v, &self.attn, ctx.segment_ids)?;
        let o = heads_to_bthd(&o)?.reshape((n, hq * hd))?;
        let mut a = run(3, &o, &mut lin)?.reshape((b, t, d))?;
        let mut attn_post = None;
        if let Some(w) = &self.attn_post_norm {
            let (y, s) = rms_norm_fwd(&a, w, eps, unit_offset)?;
            a = y;
            attn_post = Some(s);
        }
        let x1 = residual_add(x, &a)?;
        let (h2, n2) = rms_norm_fwd(&x1, &self.ffn_norm, eps, unit_offset)?;
        let h2 = h2.reshape((n, d))?;
        let gate = run(4, &h2, &mut lin)?;
        let up = run(5, &h2, &mut lin)?;
        let m = glu_fwd(&gate, &up, self.act.clone())?;
        let mut dn = run(6, &m, &mut lin)?.reshape((b, t, d))?;
        let mut ffn_post = None;
        if let Some(w) = &self.ffn_post_norm {
            let (y, s) = rms_norm_fwd(&dn, w, eps, unit_offset)?;
            dn = y;
            ffn_post = Some(s);
        }
        let out = residual_add(&x1, &dn)?;
        let saved = save.then(|| BlockSaved { n1, lin, attn, attn_post, n2, gate, up, ffn_post });
        Ok((out, saved))
    }

    #[allow(clippy::too_many_arguments)]
    fn backward(
        &self,
        dy: &Tensor,
        s: BlockSaved,
        ctx: &StepCtx,
        layer: usize,
        rope: &RopeTable,
        unit_offset: bool,
        params: &LoraParams,
        grads: &mut LoraGrads,
    ) -> Result<Tensor> {
        let (b, t, d) = dy.dims3()?;
        let n = b * t;
        let (hq, hkv, hd) = (self.attn.n_heads, self.attn.n_kv_heads, self.attn.head_dim);
        // Every saved activation is dropped as soon as its last reader is done, so the
        // memory peak of a block's backward holds as few [N, FFN] buffers as possible.
        let BlockSaved { n1, mut lin, attn, attn_post, n2, gate, up, ffn_post } = s;
        // `into`: linears that read one input (q/k/v, gate/up) sum their dX in one buffer.
        let mut lin_bwd = |k: usize, g: &Tensor, grads: &mut LoraGrads, into: Option<Tensor>| -> Result<Tensor> {
            let saved = lin[k].take();
            self.linears[k].backward(g, saved.as_ref(), ctx.lora, params, grads, ctx.dropout(layer, k), into)
        };
        // Feed-forward half: x2 = x1 + post(down(act(gate)·up)).
        let mut ddn = dy.clone();
        if let (Some(w), Some(ps)) = (&self.ffn_post_norm, &ffn_post) {
            ddn = rms_norm_bwd(&ddn, w, unit_offset, ps)?;
        }
        let dm = lin_bwd(6, &ddn.reshape((n, d))?, grads, None)?;
        // dgate and dup overwrite gate and up, which nothing reads after this.
        let (dgate, dup) = glu_bwd_in_place(&dm, gate, up, self.act.clone())?;
        drop(dm);
        let dh2 = lin_bwd(4, &dgate, grads, None)?;
        drop(dgate);
        let dh2 = lin_bwd(5, &dup, grads, Some(dh2))?;
        drop(dup);
        let dx1 = rms_norm_bwd_add(&dh2.reshape((b, t, d))?, &self.ffn_norm, unit_offset, &n2, dy)?;
        drop(n2);
        // Attention half: x1 = x + post(o_proj(attn(...))).
        let mut da = dx1.clone();
        if let (Some(w), Some(ps)) = (&self.attn_post_norm, &attn_post) {
            da = rms_norm_bwd(&da, w, unit_offset, ps)?;
        }
        let dout = lin_bwd(3, &da.reshape((n, d))?, grads, None)?;
        let dout = heads_to_bhtd(&dout.reshape((b, t, hq, hd))?)?;
        let (dq, dk, dv) = attention_bwd(&dout, &attn, &self.attn, ctx.segment_ids)?;
        drop((dout, attn));
        let dq = rope_bwd_to_bthd(&dq, rope, ctx.position_ids)?.reshape((n, hq * hd))?;
        let dk = rope_bwd_to_bthd(&dk, rope, ctx.position_ids)?.reshape((n, hkv * hd))?;
        let dv = heads_to_bthd(&dv)?.reshape((n, hkv * hd))?;
        let dh1 = lin_bwd(0, &dq, grads, None)?;
        drop(dq);
        let dh1 = lin_bwd(1, &dk, grads, Some(dh1))?;
        drop(dk);
        let dh1 = lin_bwd(2, &dv, grads, Some(dh1))?;
        drop(dv);
        rms_norm_bwd_add(&dh1.reshape((b, t, d))?, &self.attn_norm, unit_offset, &n1, &dx1)
    }
}

/// Token-level log-softmax helper used by eval paths: log p(label) per position.
pub fn token_logprobs(logits: &Tensor, labels: &[i64]) -> Result<Vec<f32>> {
    let lsm = candle_core::Tensor::log_sum_exp(logits, D::Minus1)?;
    let z = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let lse = lsm.to_vec1::<f32>()?;
    Ok(labels
        .iter()
        .enumerate()
        .map(|(i, &l)| if l < 0 { f32::NAN } else { z[i][l as usize] - lse[i] })
        .collect())
}

/// Random models of real shapes, for benchmarks and GPU checks where no checkpoint of that
/// size can travel.
impl Model {
    /// A model of `cfg`'s shapes with random weights: linears, embedding and LM head drawn
    /// from N(0, 0.02²) (HF's `initializer_range`), norms at their identity value. With
    /// `opts.nf4` the block linears are random NF4 weights built directly in 4 bits:
    /// uniform codes (NF4's codes are equiprobable for Gaussian weights by construction)
    /// and block scales spread like the absmax of 64 Gaussian draws, double-quantized as
    /// bitsandbytes does when `opts.double_quant`. On a CUDA device the NF4 weights are
    /// uploaded and expanded by the GPU kernel. Deterministic in `seed` (on CUDA through
    /// curand, so CPU and GPU draws differ).
    pub fn random(cfg: &ModelConfig, opts: &LoadOptions, seed: u64) -> Result<Self> {
        use rand::{Rng, RngCore, SeedableRng};
        const STD: f64 = 0.02;
        let keep: Vec<usize> = match &opts.keep_layers {
            Some(k) => {
                if let Some(&bad) = k.iter().find(|&&i| i >= cfg.num_hidden_layers) {
                    return Err(Error::Config(format!(
                        "keep_layers names layer {bad}, but the model has only {} layers",
                        cfg.num_hidden_layers
                    )));
                }
                k.clone()
            }
            None => (0..cfg.num_hidden_layers).collect(),
        };
        let dev = &opts.device;
        let dt = opts.dtype;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        if dev.is_cuda() {
            dev.set_seed(seed)?;
        }
        let normal = |rows: usize, cols: usize, rng: &mut rand_chacha::ChaCha8Rng| -> Result<Tensor> {
            let t = if dev.is_cpu() {
                // Box-Muller on a seeded stream: candle's CPU randn cannot be seeded.
                let v: Vec<f32> = (0..rows * cols)
                    .map(|_| {
                        let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
                        let u2: f64 = rng.random();
                        (STD * (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
                    })
                    .collect();
                Tensor::from_vec(v, (rows, cols), dev)?
            } else {
                Tensor::randn(0f32, STD as f32, (rows, cols), dev)?
            };
            Ok(t.to_dtype(dt)?)
        };
        let random_nf4 = |rows: usize, cols: usize, rng: &mut rand_chacha::ChaCha8Rng| -> Result<BaseWeight> {
            let n = rows * cols;
            let mut packed = vec![0u8; n.div_ceil(2)];
            rng.fill_bytes(&mut packed);
            let n_blocks = n.div_ceil(crate::nf4::BLOCKSIZE);
            // The absmax of 64 N(0, σ²) draws lies between about 1.9σ and 3.3σ.
            let absmax: Vec<f32> = (0..n_blocks).map(|_| (STD * (1.9 + 1.4 * rng.random::<f64>())) as f32).collect();
            let absmax = if opts.double_quant { double_quantize(&absmax) } else { crate::nf4::Absmax::F32(absmax) };
            let q = Nf4Tensor { rows, cols, packed, absmax, blocksize: crate::nf4::BLOCKSIZE };
            #[cfg(feature = "cuda")]
            if dev.is_cuda() {
                return Ok(BaseWeight::Nf4Cuda(crate::kernels::CudaNf4::upload(&q, dev)?));
            }
            Ok(BaseWeight::Nf4(q))
        };
        let d = cfg.hidden_size;
        let ones = |n: usize| -> Result<Tensor> {
            // Gemma's norms store w with (1 + w) applied, so its identity is zero.
            let gemma = matches!(cfg.family, Family::Gemma | Family::Gemma2);
            Ok(if gemma { Tensor::zeros(n, dt, dev)? } else { Tensor::ones(n, dt, dev)? })
        };
        let embed = normal(cfg.vocab_size, d, &mut rng)?;
        let lm_head = if cfg.tie_word_embeddings { None } else { Some(normal(cfg.vocab_size, d, &mut rng)?) };
        let gemma2 = cfg.family == Family::Gemma2;
        let mut blocks = Vec::with_capacity(keep.len());
        for &i in &keep {
            let mut linears = Vec::with_capacity(7);
            for short in LINEARS {
                let (inf, outf) = cfg.linear_shape(short).expect("known linear");
                let weight =
                    if opts.nf4 { random_nf4(outf, inf, &mut rng)? } else { BaseWeight::Dense(normal(outf, inf, &mut rng)?) };
                let has_bias = has_bias(cfg, short);
                let bias = if has_bias { Some(Tensor::zeros(outf, dt, dev)?) } else { None };
                linears.push(Linear { weight, bias, in_features: inf, out_features: outf, lora: None });
            }
            blocks.push(Block {
                attn_norm: ones(d)?,
                attn_post_norm: if gemma2 { Some(ones(d)?) } else { None },
                ffn_norm: ones(d)?,
                ffn_post_norm: if gemma2 { Some(ones(d)?) } else { None },
                linears,
                attn: attn_config(cfg, i),
                act: cfg.hidden_act,
            });
        }
        let cfg = cfg.with_layers(&keep);
        let rope = RopeTable::new(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings, dev)?;
        let gemma = matches!(cfg.family, Family::Gemma | Family::Gemma2);
        Ok(Self {
            embed_scale: gemma.then(|| (cfg.hidden_size as f64).sqrt()),
            unit_offset: gemma,
            norm: ones(d)?,
            cfg,
            embed,
            blocks,
            lm_head,
            rope,
            device: opts.device.clone(),
            dtype: dt,
            #[cfg(feature = "cuda")]
            offload: None,
        })
    }

    /// Moves every NF4 base weight that sits on the host into device memory for the CUDA
    /// kernel (once), so no GEMM dequantizes on the CPU and copies. A no-op on CPU.
    #[cfg(feature = "cuda")]
    pub fn upload_nf4(&mut self) -> Result<()> {
        if !self.device.is_cuda() {
            return Ok(());
        }
        for b in &mut self.blocks {
            for l in &mut b.linears {
                if let BaseWeight::Nf4(q) = &l.weight {
                    l.weight = BaseWeight::Nf4Cuda(crate::kernels::CudaNf4::upload(q, &self.device)?);
                }
            }
        }
        Ok(())
    }
}

/// bitsandbytes' double quantization of f32 block scales: centred on their mean, then
/// 8-bit codes of the signed dynamic map in blocks of 256, each with its own f32 scale.
fn double_quantize(absmax: &[f32]) -> crate::nf4::Absmax {
    let code = crate::nf4::create_dynamic_map();
    let mids: Vec<f32> = code.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
    let offset = (absmax.iter().map(|&a| a as f64).sum::<f64>() / absmax.len().max(1) as f64) as f32;
    let mut quantized = Vec::with_capacity(absmax.len());
    let mut absmax2 = Vec::new();
    for block in absmax.chunks(crate::nf4::BLOCKSIZE2) {
        let amax = block.iter().fold(0f32, |m, &a| m.max((a - offset).abs())).max(1e-38);
        absmax2.push(amax);
        quantized.extend(block.iter().map(|&a| mids.partition_point(|&m| m < ((a - offset) / amax).clamp(-1.0, 1.0)) as u8));
    }
    crate::nf4::Absmax::Double { quantized, code, absmax2, offset, blocksize2: crate::nf4::BLOCKSIZE2 }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The overlapped all-reduce hands each block's span to the hook as its backward ends:
    /// the spans must tile the flat gradient buffer exactly, last block at the end.
    #[test]
    fn block_adapter_spans_tile_the_gradient_buffer() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models/llama");
        let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
        let store = WeightStore::open(&dir).unwrap();
        let opts = LoadOptions { keep_layers: None, nf4: false, double_quant: false, device: Device::Cpu, dtype: DType::F32 };
        let mut model = Model::load(&store, &cfg, &opts).unwrap();
        for targets in [vec!["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], vec!["v_proj", "q_proj"]] {
            let spec = LoraSpec {
                r: 4,
                lora_alpha: 8.0,
                lora_dropout: 0.0,
                use_rslora: false,
                target_modules: targets.iter().map(|s| s.to_string()).collect(),
            };
            let modules = model.attach_lora(&spec).unwrap();
            let params = LoraParams::init(&spec, &modules, 0);
            let spans: Vec<_> = model.blocks.iter().map(|b| b.adapter_range(&params).unwrap()).collect();
            assert!(spans.len() > 1);
            assert_eq!(spans[0].start, 0, "{targets:?}");
            for w in spans.windows(2) {
                assert_eq!(w[0].end, w[1].start, "{targets:?}: {spans:?}");
            }
            assert_eq!(spans.last().unwrap().end, params.len(), "{targets:?}");
        }
    }
}
