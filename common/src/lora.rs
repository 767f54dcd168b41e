//! LoRA adapters on frozen base linears (dense or NF4), PEFT-compatible.
//!
//! All adapter parameters live in ONE flat fp32 buffer (`LoraParams::values`) and their
//! gradients in one flat buffer of the same layout, so the optimizer and the gradient
//! all-reduce each touch a single contiguous array. Per-module A and B are views into it.
//!
//! The frozen base weight never receives a gradient: backward computes only
//! dX = dY·W (+ the LoRA branch's dX) and, for the adapter, dA and dB.
//!
//! On the CPU both buffers are host vectors. On a CUDA device the trainer makes them
//! resident once (`LoraParams::make_resident`, `LoraGrads::make_resident`): the fp32 master
//! weights, a compute-dtype copy of them that the forward reads through per-module views,
//! and the gradients then stay on the device, and a training step copies nothing to or
//! from the host but the gradient norm.

use std::borrow::Cow;

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::nf4::Nf4Tensor;
use crate::{Error, Result};

/// The seven linear layers of a Llama/Gemma decoder block — PEFT's "all-linear" for
/// these architectures (every nn.Linear except the LM head).
pub const ALL_LINEAR: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    pub r: usize,
    pub lora_alpha: f64,
    pub lora_dropout: f64,
    pub use_rslora: bool,
    /// Module short names (q_proj, …) that get adapters.
    pub target_modules: Vec<String>,
}

impl LoraSpec {
    /// PEFT's scaling: alpha/r, or alpha/sqrt(r) with rsLoRA (which keeps the update's
    /// magnitude stable as r grows).
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }

    pub fn targets(&self, short_name: &str) -> bool {
        self.target_modules.iter().any(|t| t == short_name)
    }
}

/// Where one module's A [r, in] and B [out, r] live in the flat buffer.
#[derive(Debug, Clone)]
pub struct LoraEntry {
    /// HF module path, e.g. `model.layers.0.self_attn.q_proj`.
    pub module: String,
    pub in_features: usize,
    pub out_features: usize,
    pub a_offset: usize,
    pub b_offset: usize,
}

impl LoraEntry {
    pub fn peft_a_name(&self) -> String {
        format!("base_model.model.{}.lora_A.weight", self.module)
    }
    pub fn peft_b_name(&self) -> String {
        format!("base_model.model.{}.lora_B.weight", self.module)
    }
}

#[derive(Debug)]
pub struct LoraParams {
    pub spec: LoraSpec,
    pub entries: Vec<LoraEntry>,
    /// fp32 master weights of every adapter, concatenated, on the host. Empty while the
    /// adapters live on a device (see [`LoraParams::make_resident`]; read them with
    /// [`LoraParams::host_values`] then).
    pub values: Vec<f32>,
    #[cfg(feature = "cuda")]
    device: Option<DeviceParams>,
}

/// The adapters on a CUDA device: the fp32 master copy the optimizer updates and the
/// compute-dtype copy the forward reads, refreshed from it after every update.
#[cfg(feature = "cuda")]
struct DeviceParams {
    dev: candle_core::CudaDevice,
    master: candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>,
    /// Flat, in the compute dtype; `ab` are views of it, so refreshing it in place updates
    /// every module's A and B.
    compute: Tensor,
    ab: Vec<(Tensor, Tensor)>,
}

#[cfg(feature = "cuda")]
impl std::fmt::Debug for DeviceParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceParams({:?}, {} values, compute {:?})", self.dev, self.master.len(), self.compute.dtype())
    }
}

impl LoraParams {
    /// Lays out adapters for `modules` (module path, in, out) and initialises them like
    /// PEFT: A ~ kaiming_uniform(a=√5), i.e. U(−1/√in, 1/√in); B = 0, so training starts
    /// from exactly the base model.
    pub fn init(spec: &LoraSpec, modules: &[(String, usize, usize)], seed: u64) -> Self {
        let r = spec.r;
        let mut entries = Vec::with_capacity(modules.len());
        let mut off = 0;
        for (m, inf, outf) in modules {
            entries.push(LoraEntry {
                module: m.clone(),
                in_features: *inf,
                out_features: *outf,
                a_offset: off,
                b_offset: off + r * inf,
            });
            off += r * inf + outf * r;
        }
        let mut values = vec![0f32; off];
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        for e in &entries {
            let bound = 1.0 / (e.in_features as f64).sqrt();
            for v in &mut values[e.a_offset..e.a_offset + r * e.in_features] {
                *v = rng.random_range(-bound..bound) as f32;
            }
        }
        Self {
            spec: spec.clone(),
            entries,
            values,
            #[cfg(feature = "cuda")]
            device: None,
        }
    }

    /// Number of adapter parameters (the flat buffer's length, wherever it lives).
    pub fn len(&self) -> usize {
        self.entries.last().map_or(0, |e| e.b_offset + e.out_features * self.spec.r)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn index_of(&self, module: &str) -> Option<usize> {
        self.entries.iter().position(|e| e.module == module)
    }

    /// Whether the adapters live on a CUDA device (see [`LoraParams::make_resident`]).
    pub fn is_resident(&self) -> bool {
        #[cfg(feature = "cuda")]
        if self.device.is_some() {
            return true;
        }
        false
    }

    /// Moves the fp32 master weights onto `device` (a CUDA device) for good, next to a
    /// persistent copy in `dtype` that [`LoraParams::to_device`] hands out views of; the
    /// host `values` are dropped. A no-op on the CPU or when already there.
    pub fn make_resident(&mut self, device: &Device, dtype: DType) -> Result<()> {
        if device.is_cpu() {
            return Ok(());
        }
        #[cfg(feature = "cuda")]
        {
            if let Some(d) = &self.device {
                return if d.compute.device().same_device(device) && d.compute.dtype() == dtype {
                    Ok(())
                } else {
                    Err(Error::Msg(format!(
                        "LoRA adapters already live on {:?} in {:?}, not on {device:?} in {dtype:?}",
                        d.compute.device(),
                        d.compute.dtype()
                    )))
                };
            }
            let dev = crate::kernels::cuda_device(device)?.clone();
            let master = dev.clone_htod(&self.values)?;
            let compute = Tensor::zeros(self.len(), dtype, device)?;
            crate::kernels::optim::cast_f32_into(&master, &compute)?;
            let ab = self.views(&compute)?;
            self.device = Some(DeviceParams { dev, master, compute, ab });
            self.values = Vec::new();
            Ok(())
        }
        #[cfg(not(feature = "cuda"))]
        Err(Error::Msg(format!("cannot keep LoRA adapters on {device:?} in {dtype:?}: this build has no CUDA support")))
    }

    /// Brings the master weights back to the host `values` and ends device residency.
    pub fn to_host(&mut self) -> Result<()> {
        #[cfg(feature = "cuda")]
        if let Some(d) = self.device.take() {
            self.values = d.dev.clone_dtoh(&d.master)?;
        }
        Ok(())
    }

    /// The fp32 master weights on the host: `values`, or a download of the device copy.
    pub fn host_values(&self) -> Result<Cow<'_, [f32]>> {
        #[cfg(feature = "cuda")]
        if let Some(d) = &self.device {
            return Ok(d.dev.clone_dtoh(&d.master)?.into());
        }
        Ok(Cow::Borrowed(&self.values))
    }

    /// Runs `update` on the device-resident master weights (an optimizer step), then
    /// refreshes the compute-dtype copy the forward reads, so the two never disagree.
    #[cfg(feature = "cuda")]
    pub fn update_on_device(
        &mut self,
        update: impl FnOnce(&mut candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>) -> Result<()>,
    ) -> Result<()> {
        let d = self
            .device
            .as_mut()
            .ok_or_else(|| Error::Msg("LoRA adapters: a device update before make_resident".into()))?;
        update(&mut d.master)?;
        crate::kernels::optim::cast_f32_into(&d.master, &d.compute)
    }

    /// Per-module (A [r, in], B [out, r]) views of a flat adapter tensor.
    fn views(&self, flat: &Tensor) -> Result<Vec<(Tensor, Tensor)>> {
        let r = self.spec.r;
        let mut ab = Vec::with_capacity(self.entries.len());
        for e in &self.entries {
            let a = flat.narrow(0, e.a_offset, r * e.in_features)?.reshape((r, e.in_features))?;
            let b = flat.narrow(0, e.b_offset, e.out_features * r)?.reshape((e.out_features, r))?;
            ab.push((a, b));
        }
        Ok(ab)
    }

    /// Device tensors for one training step: per-module A/B views of a flat buffer in
    /// `dtype` (no per-module copies). Adapters resident on `device` in `dtype` give views
    /// of their persistent copy (nothing moves); otherwise the flat buffer is uploaded.
    pub fn to_device(&self, device: &Device, dtype: DType) -> Result<LoraTensors> {
        let (scaling, dropout) = (self.spec.scaling(), self.spec.lora_dropout);
        #[cfg(feature = "cuda")]
        if let Some(d) = &self.device {
            if d.compute.device().same_device(device) && d.compute.dtype() == dtype {
                return Ok(LoraTensors { ab: d.ab.clone(), scaling, dropout });
            }
        }
        let values = self.host_values()?;
        let flat = Tensor::from_slice(&values, values.len(), device)?.to_dtype(dtype)?;
        Ok(LoraTensors { ab: self.views(&flat)?, scaling, dropout })
    }

    /// PEFT-named tensors for adapter_model.safetensors (downloaded when the adapters live
    /// on a device).
    pub fn peft_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let r = self.spec.r;
        let values = self.host_values()?;
        let mut out = Vec::with_capacity(2 * self.entries.len());
        for e in &self.entries {
            let a = &values[e.a_offset..e.a_offset + r * e.in_features];
            let b = &values[e.b_offset..e.b_offset + e.out_features * r];
            out.push((e.peft_a_name(), Tensor::from_slice(a, (r, e.in_features), &Device::Cpu)?));
            out.push((e.peft_b_name(), Tensor::from_slice(b, (e.out_features, r), &Device::Cpu)?));
        }
        Ok(out)
    }

    /// Loads PEFT-named tensors into this layout (and onto the device when the adapters
    /// live there). Every adapter of the layout must be present with the right shape; extra
    /// tensors are an error too (they would mean the adapter was trained on other modules
    /// and silently ignoring them changes the model). Nothing changes on error.
    pub fn load_peft_tensors(&mut self, tensors: &[(String, Tensor)], source: &std::path::Path) -> Result<()> {
        let r = self.spec.r;
        let mut loaded = Vec::with_capacity(2 * self.entries.len());
        let mut seen = std::collections::HashSet::new();
        let by_name: std::collections::HashMap<String, &Tensor> =
            tensors.iter().map(|(n, t)| (strip_adapter_name(n), t)).collect();
        for e in &self.entries {
            for (name, off, shape) in [
                (e.peft_a_name(), e.a_offset, vec![r, e.in_features]),
                (e.peft_b_name(), e.b_offset, vec![e.out_features, r]),
            ] {
                let t = by_name
                    .get(name.as_str())
                    .ok_or_else(|| Error::MissingTensor { path: source.to_path_buf(), name: name.clone() })?;
                if t.dims() != shape.as_slice() {
                    return Err(Error::Shape { path: source.to_path_buf(), name, expected: shape, got: t.dims().to_vec() });
                }
                loaded.push((off, t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?));
                seen.insert(name);
            }
        }
        if let Some(extra) = by_name.keys().find(|n| !seen.contains(*n)) {
            return Err(Error::Format {
                path: source.to_path_buf(),
                msg: format!("adapter tensor `{extra}` does not match any targeted module of this model"),
            });
        }
        #[cfg(feature = "cuda")]
        if let Some(d) = &mut self.device {
            // The layout has no gaps and every entry was loaded: the staged buffer is whole.
            let mut staged = vec![0f32; d.master.len()];
            for (off, v) in &loaded {
                staged[*off..off + v.len()].copy_from_slice(v);
            }
            d.dev.memcpy_htod(&staged, &mut d.master)?;
            return crate::kernels::optim::cast_f32_into(&d.master, &d.compute);
        }
        for (off, v) in &loaded {
            self.values[*off..off + v.len()].copy_from_slice(v);
        }
        Ok(())
    }
}

/// PEFT saves without the adapter name, but state dicts taken from a live PeftModel carry
/// `.default.`: accept both.
fn strip_adapter_name(n: &str) -> String {
    n.replace(".lora_A.default.weight", ".lora_A.weight").replace(".lora_B.default.weight", ".lora_B.weight")
}

/// Per-step device view of the adapters.
pub struct LoraTensors {
    /// (A [r, in], B [out, r]) per entry, in `LoraParams::entries` order.
    pub ab: Vec<(Tensor, Tensor)>,
    pub scaling: f64,
    pub dropout: f64,
}

/// Gradients of every adapter, in the same flat layout as `LoraParams::values`: a host
/// vector, or (after [`LoraGrads::make_resident`]) one fp32 buffer on a CUDA device that
/// each LoRA backward accumulates into with a GEMM.
pub struct LoraGrads {
    /// The host gradients; empty while they live on a device.
    pub flat: Vec<f32>,
    len: usize,
    #[cfg(feature = "cuda")]
    device: Option<DeviceGrads>,
    #[cfg(feature = "cuda")]
    ready_hook: Option<ReadyHook>,
}

/// Called by the backward with the device gradient buffer and a range of it that holds its
/// final values for the step (one decoder block's adapters, last block first): a
/// data-parallel student starts the all-reduce of that range while the backward of the
/// blocks below still runs. Set for the last micro-batch of a step only.
#[cfg(feature = "cuda")]
pub type ReadyHook =
    Box<dyn FnMut(&mut candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>, std::ops::Range<usize>) -> Result<()> + Send>;

#[cfg(feature = "cuda")]
struct DeviceGrads {
    dev: candle_core::CudaDevice,
    flat: candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>,
}

impl LoraGrads {
    pub fn zeros(params: &LoraParams) -> Self {
        Self {
            flat: vec![0.0; params.len()],
            len: params.len(),
            #[cfg(feature = "cuda")]
            device: None,
            #[cfg(feature = "cuda")]
            ready_hook: None,
        }
    }

    /// Installs (or, with None, removes) the hook the backward calls as ranges of the
    /// gradients become final (see [`ReadyHook`]); used only while they live on a device.
    #[cfg(feature = "cuda")]
    pub fn set_ready_hook(&mut self, hook: Option<ReadyHook>) {
        self.ready_hook = hook;
    }

    /// The backward is done with `range`: hands it to the ready hook, if any.
    pub(crate) fn range_ready(&mut self, range: std::ops::Range<usize>) -> Result<()> {
        #[cfg(feature = "cuda")]
        if let (Some(hook), Some(d)) = (self.ready_hook.as_mut(), self.device.as_mut()) {
            return hook(&mut d.flat, range);
        }
        let _ = range;
        Ok(())
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether the gradients live on a CUDA device (see [`LoraGrads::make_resident`]).
    pub fn is_resident(&self) -> bool {
        #[cfg(feature = "cuda")]
        if self.device.is_some() {
            return true;
        }
        false
    }

    /// Moves the gradient buffer onto `device` (a CUDA device) for good; the host vector is
    /// dropped. A no-op on the CPU or when already there.
    pub fn make_resident(&mut self, device: &Device) -> Result<()> {
        if device.is_cpu() {
            return Ok(());
        }
        #[cfg(feature = "cuda")]
        {
            if let Some(d) = &self.device {
                let here = Device::Cuda(d.dev.clone());
                return if here.same_device(device) {
                    Ok(())
                } else {
                    Err(Error::Msg(format!("LoRA gradients already live on {here:?}, not on {device:?}")))
                };
            }
            let dev = crate::kernels::cuda_device(device)?.clone();
            let flat = dev.clone_htod(&self.flat)?;
            self.device = Some(DeviceGrads { dev, flat });
            self.flat = Vec::new();
            Ok(())
        }
        #[cfg(not(feature = "cuda"))]
        Err(Error::Msg(format!("cannot keep LoRA gradients on {device:?}: this build has no CUDA support")))
    }

    /// The device buffer, while the gradients live on a CUDA device (e.g. for an NCCL
    /// all-reduce in place).
    #[cfg(feature = "cuda")]
    pub fn device_buffer_mut(&mut self) -> Option<&mut candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>> {
        self.device.as_mut().map(|d| &mut d.flat)
    }

    /// Sets every gradient to zero.
    pub fn zero(&mut self) -> Result<()> {
        #[cfg(feature = "cuda")]
        if let Some(d) = &mut self.device {
            d.dev.cuda_stream().memset_zeros(&mut d.flat).map_err(|e| Error::Msg(format!("zeroing the LoRA gradients: {e}")))?;
            return Ok(());
        }
        self.flat.iter_mut().for_each(|g| *g = 0.0);
        Ok(())
    }

    /// The gradients on the host: `flat`, or a download of the device buffer.
    pub fn host_values(&self) -> Result<Cow<'_, [f32]>> {
        #[cfg(feature = "cuda")]
        if let Some(d) = &self.device {
            return Ok(d.dev.clone_dtoh(&d.flat)?.into());
        }
        Ok(Cow::Borrowed(&self.flat))
    }

    /// Hands the accumulated gradients over as a host vector (one download on a device) and
    /// starts accumulating again from zero: the partial sum for a host all-reduce.
    pub fn take_host(&mut self) -> Result<Vec<f32>> {
        #[cfg(feature = "cuda")]
        if self.device.is_some() {
            let v = self.host_values()?.into_owned();
            self.zero()?;
            return Ok(v);
        }
        Ok(std::mem::replace(&mut self.flat, vec![0.0; self.len]))
    }

    /// Replaces the gradients with `values` (e.g. the all-reduced sum; one upload on a
    /// device).
    pub fn set_host(&mut self, values: Vec<f32>) -> Result<()> {
        if values.len() != self.len {
            return Err(Error::Msg(format!("LoRA gradients: got {} values for a buffer of {}", values.len(), self.len)));
        }
        #[cfg(feature = "cuda")]
        if let Some(d) = &mut self.device {
            d.dev.memcpy_htod(&values, &mut d.flat)?;
            return Ok(());
        }
        self.flat = values;
        Ok(())
    }

    /// Global L2 norm of the gradients, accumulated in f64 (on a device: one deterministic
    /// reduction, one value read back).
    pub fn norm(&self) -> Result<f64> {
        #[cfg(feature = "cuda")]
        if let Some(d) = &self.device {
            return Ok(crate::kernels::optim::sum_of_squares(&d.dev, &d.flat)?.sqrt());
        }
        Ok(crate::optim::grad_norm(&self.flat))
    }

    /// The device gradient buffer (for the optimizer step on the device).
    #[cfg(feature = "cuda")]
    pub fn cuda_slice(&self) -> Result<&candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>> {
        self.device
            .as_ref()
            .map(|d| &d.flat)
            .ok_or_else(|| Error::Msg("LoRA gradients: asked for the device buffer, but they live on the host".into()))
    }

    /// Adds s·xᵀ·y (x [N, p], y [N, q]) to the [p, q] gradient at `offset`: on a device, one
    /// GEMM straight into the buffer; on the host, candle's matmul and a copy.
    fn add_outer(&mut self, offset: usize, x: &Tensor, y: &Tensor, s: f64) -> Result<()> {
        #[cfg(feature = "cuda")]
        if let Some(d) = &mut self.device {
            return crate::kernels::optim::gemm_tn_accumulate(&mut d.flat, offset, x, y, s as f32);
        }
        let g = (x.t()?.matmul(y)? * s)?;
        let v = g.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
        for (g, x) in self.flat[offset..offset + v.len()].iter_mut().zip(v) {
            *g += x;
        }
        Ok(())
    }
}

/// A frozen base weight [out, in].
pub enum BaseWeight {
    Dense(Tensor),
    /// Stays 4-bit; dequantized into a transient buffer right before each GEMM, so the
    /// student never holds a full-precision copy of its base.
    Nf4(Nf4Tensor),
    /// NF4 codes and scales resident on a CUDA device (uploaded once), expanded by the
    /// dequantization kernel into a pool-allocated buffer right before each GEMM.
    #[cfg(feature = "cuda")]
    Nf4Cuda(crate::kernels::CudaNf4),
}

impl BaseWeight {
    /// The weight as a dense tensor for one GEMM (a transient dequantized copy for NF4).
    pub fn dense(&self, device: &Device) -> Result<Tensor> {
        match self {
            BaseWeight::Dense(t) => Ok(t.clone()),
            BaseWeight::Nf4(q) => q.to_tensor(device),
            #[cfg(feature = "cuda")]
            BaseWeight::Nf4Cuda(q) => q.to_tensor(DType::F32),
        }
    }

    /// `dense` in the compute dtype of `like`.
    fn dense_as(&self, like: &Tensor) -> Result<Tensor> {
        match self {
            // Written by the kernel in the compute dtype: no f32 round trip.
            #[cfg(feature = "cuda")]
            BaseWeight::Nf4Cuda(q) => q.to_tensor(like.dtype()),
            _ => Ok(self.dense(like.device())?.to_dtype(like.dtype())?),
        }
    }

    pub fn memory_bytes(&self) -> usize {
        match self {
            BaseWeight::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            BaseWeight::Nf4(q) => q.memory_bytes(),
            #[cfg(feature = "cuda")]
            BaseWeight::Nf4Cuda(q) => q.memory_bytes(),
        }
    }
}

/// A base linear layer, optionally carrying a LoRA adapter (index into `LoraParams`).
pub struct Linear {
    pub weight: BaseWeight,
    pub bias: Option<Tensor>,
    pub in_features: usize,
    pub out_features: usize,
    pub lora: Option<usize>,
}

/// What the backward of a LoRA linear needs: the adapter's input after dropout and
/// the rank-r projection u = dropout(x)·Aᵀ (cheap: N×r).
pub struct LinearSaved {
    xd: Tensor,
    u: Tensor,
}

/// Dropout randomness for one forward, deterministic per (step, module) so that
/// activation-checkpointing recomputation reproduces the same masks.
#[derive(Clone, Copy)]
pub struct DropoutSeed(pub u64);

impl Linear {
    /// y = x·Wᵀ + b + s·dropout(x)·Aᵀ·Bᵀ for x [N, in]. `lora` None runs the base alone
    /// (the LwF teacher path). Returns saved activations only when `save` is set and the
    /// layer has an adapter.
    pub fn forward(
        &self,
        x: &Tensor,
        lora: Option<&LoraTensors>,
        dropout: Option<DropoutSeed>,
        save: bool,
    ) -> Result<(Tensor, Option<LinearSaved>)> {
        let w = self.weight.dense_as(x)?;
        let mut y = x.matmul(&w.t()?)?;
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        let (Some(idx), Some(lt)) = (self.lora, lora) else { return Ok((y, None)) };
        let (a, b) = &lt.ab[idx];
        let xd = match dropout {
            Some(seed) if lt.dropout > 0.0 => apply_dropout(x, lt.dropout, seed)?,
            _ => x.clone(),
        };
        let u = xd.matmul(&a.t()?)?;
        if accumulates_in_place(&[&y, &u, b]) {
            // y is this call's own fresh GEMM output: add s·u·Bᵀ into it with one β = 1 GEMM.
            #[cfg(feature = "cuda")]
            crate::kernels::gemm::add_matmul(&y, &u, b, true, lt.scaling as f32)?;
        } else {
            y = (y + (u.matmul(&b.t()?)? * lt.scaling)?)?;
        }
        Ok((y, save.then_some(LinearSaved { xd, u })))
    }

    /// dX for upstream gradient `dy` [N, out], added to `into` when given (the dX of
    /// linears that share an input: q/k/v, gate/up); accumulates dA, dB into `grads`.
    /// `into` must be the caller's own tensor (a dX an earlier call returned): on a CUDA
    /// device it is written in place by β = 1 GEMMs.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(
        &self,
        dy: &Tensor,
        saved: Option<&LinearSaved>,
        lora: Option<&LoraTensors>,
        params: &LoraParams,
        grads: &mut LoraGrads,
        dropout: Option<DropoutSeed>,
        into: Option<Tensor>,
    ) -> Result<Tensor> {
        let w = self.weight.dense_as(dy)?;
        let mut dx = match into {
            Some(acc) if accumulates_in_place(&[&acc, dy, &w]) => {
                #[cfg(feature = "cuda")]
                crate::kernels::gemm::add_matmul(&acc, dy, &w, false, 1.0)?;
                acc
            }
            Some(acc) => (acc + dy.matmul(&w)?)?,
            None => dy.matmul(&w)?,
        };
        if let (Some(idx), Some(lt)) = (self.lora, lora) {
            let saved = saved.ok_or_else(|| Error::Msg("LoRA backward without saved activations".into()))?;
            let (a, b) = &lt.ab[idx];
            let s = lt.scaling;
            let e = &params.entries[idx];
            // dB = s·dyᵀ·u ; dA = s·(dy·B)ᵀ·xd ; dx += s·dropout'((dy·B)·A)
            let dyb = dy.matmul(b)?; // [N, r]
            grads.add_outer(e.b_offset, dy, &saved.u, s)?;
            grads.add_outer(e.a_offset, &dyb, &saved.xd, s)?;
            let dropout = dropout.filter(|_| lt.dropout > 0.0);
            if dropout.is_none() && accumulates_in_place(&[&dx, &dyb, a]) {
                #[cfg(feature = "cuda")]
                crate::kernels::gemm::add_matmul(&dx, &dyb, a, false, s as f32)?;
            } else {
                let mut dxl = (dyb.matmul(a)? * s)?;
                if let Some(seed) = dropout {
                    // Dropout is linear with the same mask (and 1/(1-p) scale) in both passes.
                    dxl = apply_dropout(&dxl, lt.dropout, seed)?;
                }
                dx = (dx + dxl)?;
            }
        }
        Ok(dx)
    }
}

/// Whether products can be added onto a GEMM output in place with β = 1 GEMMs
/// (`kernels::gemm::add_matmul`): contiguous operands of one kernel dtype on a CUDA device,
/// fused kernels enabled. Elsewhere (CPU, f64 gradient checks) candle's ops do it.
fn accumulates_in_place(ts: &[&Tensor]) -> bool {
    #[cfg(feature = "cuda")]
    {
        let dt = ts[0].dtype();
        crate::kernels::fused::enabled()
            && ts.iter().all(|t| {
                t.device().is_cuda() && t.device().same_device(ts[0].device()) && t.dtype() == dt && t.is_contiguous()
            })
            && matches!(dt, DType::BF16 | DType::F16 | DType::F32)
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = ts;
        false
    }
}

/// Inverted dropout with a mask drawn from a seeded ChaCha stream (so recomputation and
/// backward see the same mask; candle's own RNG is not seedable per call on CPU).
fn apply_dropout(x: &Tensor, p: f64, seed: DropoutSeed) -> Result<Tensor> {
    let n = x.elem_count();
    let mut rng = ChaCha8Rng::seed_from_u64(seed.0);
    let keep = 1.0 - p;
    let scale = (1.0 / keep) as f32;
    let mask: Vec<f32> = (0..n).map(|_| if rng.random::<f64>() < keep { scale } else { 0.0 }).collect();
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    Ok((x * mask)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> LoraSpec {
        LoraSpec { r: 2, lora_alpha: 4.0, lora_dropout: 0.0, use_rslora: false, target_modules: vec!["q_proj".into()] }
    }

    fn layout() -> LoraParams {
        LoraParams::init(&spec(), &[("a".into(), 3, 5), ("b".into(), 7, 2)], 1)
    }

    #[test]
    fn len_is_the_layout_size_and_entries_tile_the_buffer() {
        let p = layout();
        // r·(in + out) per module, written out independently of the offsets.
        assert_eq!(p.len(), 2 * (3 + 5) + 2 * (7 + 2));
        assert_eq!(p.len(), p.values.len());
        let mut next = 0;
        for e in &p.entries {
            assert_eq!((e.a_offset, e.b_offset), (next, next + 2 * e.in_features));
            next = e.b_offset + e.out_features * 2;
        }
        assert_eq!(next, p.len());
    }

    #[test]
    fn on_the_cpu_make_resident_changes_nothing() {
        let mut p = layout();
        let before = p.values.clone();
        p.make_resident(&Device::Cpu, DType::F32).unwrap();
        let mut g = LoraGrads::zeros(&p);
        g.make_resident(&Device::Cpu).unwrap();
        assert!(!p.is_resident() && !g.is_resident());
        assert_eq!(p.values, before);
        assert_eq!(p.host_values().unwrap().as_ref(), before.as_slice());
        assert_eq!(g.flat.len(), p.len());
    }

    #[test]
    fn take_host_hands_the_sum_over_and_restarts_from_zero() {
        let p = layout();
        let mut g = LoraGrads::zeros(&p);
        g.flat.iter_mut().enumerate().for_each(|(i, x)| *x = i as f32);
        let taken = g.take_host().unwrap();
        assert_eq!(taken, (0..p.len()).map(|i| i as f32).collect::<Vec<_>>());
        assert!(g.flat.len() == p.len() && g.flat.iter().all(|&x| x == 0.0));
        let e = g.set_host(vec![1.0; 3]).unwrap_err().to_string();
        assert!(e.contains("got 3 values") && e.contains(&format!("buffer of {}", p.len())), "{e}");
        g.set_host(vec![0.5; p.len()]).unwrap();
        assert_eq!(g.norm().unwrap(), (0.25 * p.len() as f64).sqrt());
        g.zero().unwrap();
        assert!(g.flat.iter().all(|&x| x == 0.0));
    }

    #[test]
    fn a_rejected_adapter_file_leaves_the_values_alone() {
        let mut p = layout();
        let before = p.values.clone();
        let mut tensors = layout().peft_tensors().unwrap();
        // All of module a loads fine; module b's B has the wrong shape.
        let bad = tensors.iter().position(|(n, _)| n.contains(".b.lora_B")).unwrap();
        tensors[bad].1 = Tensor::zeros((2, 7), DType::F32, &Device::Cpu).unwrap();
        for (_, t) in tensors.iter_mut().filter(|(n, _)| n.contains(".a.")) {
            *t = (t.ones_like().unwrap() * 9.0).unwrap();
        }
        let e = p.load_peft_tensors(&tensors, std::path::Path::new("ckpt")).unwrap_err().to_string();
        assert!(e.contains("lora_B") && e.contains("[2, 7]"), "{e}");
        assert_eq!(p.values, before);
    }
}
