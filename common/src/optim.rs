//! AdamW, learning-rate schedules, gradient clipping and accumulation over one flat fp32
//! buffer.
//!
//! The trainer keeps every LoRA parameter in one flat fp32 buffer and its gradients in a
//! second one of the same length (one all-reduce per step), so the optimizer works on
//! plain slices. The numbers follow torch.optim.AdamW, transformers' `get_scheduler` and
//! torch.nn.utils.clip_grad_norm_, so that a run here and an HF Trainer run with the
//! same config take the same steps.

use std::collections::HashMap;
use std::f64::consts::PI;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// AdamW hyper-parameters other than the learning rate, which comes from the schedule at
/// every step. Defaults are HF TrainingArguments' (adam_beta1, adam_beta2, adam_epsilon,
/// weight_decay).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// torch.optim.AdamW over one flat parameter buffer: decoupled weight decay, bias
/// correction, eps added outside the square root.
///
/// The moments live on the host, or (after [`AdamW::make_resident`]) on a CUDA device, where
/// [`AdamW::step_cuda`] updates parameters that live there too. Either way the checkpointed
/// state ([`AdamW::state_tensors`], [`AdamW::load_state`]) is the same.
#[derive(Debug)]
pub struct AdamW {
    pub config: AdamWConfig,
    /// First moment, torch's `exp_avg` (empty while the moments are on a device).
    m: Vec<f32>,
    /// Second moment, torch's `exp_avg_sq` (empty while the moments are on a device).
    v: Vec<f32>,
    num_params: usize,
    /// Optimizer steps taken so far (torch's `step`).
    step: u64,
    #[cfg(feature = "cuda")]
    device: Option<DeviceMoments>,
}

/// The moments on a CUDA device.
#[cfg(feature = "cuda")]
struct DeviceMoments {
    dev: candle_core::CudaDevice,
    m: candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>,
    v: candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>,
}

#[cfg(feature = "cuda")]
impl std::fmt::Debug for DeviceMoments {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeviceMoments({:?}, {} values)", self.dev, self.m.len())
    }
}

/// The f32 scalars of one AdamW step, computed once on the host (in f64, then rounded, in
/// torch's order) and used by the host loop and the CUDA kernel alike.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWScalars {
    /// Factor applied to each gradient as it is read: the clipping coefficient, or 1.
    pub grad_scale: f32,
    /// 1 − lr·weight_decay (decoupled weight decay).
    pub decay: f32,
    /// 1 − β1 (torch's `lerp` weight for `exp_avg`).
    pub w1: f32,
    pub beta2: f32,
    /// 1 − β2.
    pub w2: f32,
    /// √(1 − β2^t).
    pub bias_correction2_sqrt: f32,
    pub eps: f32,
    /// lr / (1 − β1^t).
    pub step_size: f32,
}

/// Names of the optimizer state tensors, as torch's AdamW state dict calls them.
pub const EXP_AVG: &str = "exp_avg";
pub const EXP_AVG_SQ: &str = "exp_avg_sq";
pub const STEP: &str = "step";

impl AdamW {
    /// Zero state for `num_params` parameters.
    pub fn new(num_params: usize, config: AdamWConfig) -> Self {
        AdamW {
            config,
            m: vec![0.0; num_params],
            v: vec![0.0; num_params],
            num_params,
            step: 0,
            #[cfg(feature = "cuda")]
            device: None,
        }
    }

    pub fn num_params(&self) -> usize {
        self.num_params
    }

    /// Whether the moments live on a CUDA device (see [`AdamW::make_resident`]).
    pub fn is_resident(&self) -> bool {
        #[cfg(feature = "cuda")]
        if self.device.is_some() {
            return true;
        }
        false
    }

    /// Optimizer steps taken so far.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// The host moments; empty while they live on a device (read them with
    /// [`AdamW::state_tensors`] there).
    pub fn exp_avg(&self) -> &[f32] {
        &self.m
    }

    /// See [`AdamW::exp_avg`].
    pub fn exp_avg_sq(&self) -> &[f32] {
        &self.v
    }

    /// Counts one more step and returns its scalars at learning rate `lr`, with gradients
    /// scaled by `grad_scale` as they are read. f64 arithmetic rounded to f32, in the order
    /// of torch's `_single_tensor_adam`.
    fn next_scalars(&mut self, lr: f64, grad_scale: f32) -> AdamWScalars {
        let AdamWConfig {
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.config;
        self.step += 1;
        let t = self.step as f64;
        let bias_correction1 = 1.0 - beta1.powf(t);
        AdamWScalars {
            grad_scale,
            decay: (1.0 - lr * weight_decay) as f32,
            w1: (1.0 - beta1) as f32,
            beta2: beta2 as f32,
            w2: (1.0 - beta2) as f32,
            bias_correction2_sqrt: (1.0 - beta2.powf(t)).sqrt() as f32,
            eps: eps as f32,
            step_size: (lr / bias_correction1) as f32,
        }
    }

    /// One AdamW update of `params` with `grads` at learning rate `lr`, on the host.
    ///
    /// Scalars are computed in f64 and applied in f32, in the order of torch's
    /// `_single_tensor_adam`, so results agree with torch to float rounding.
    pub fn step(&mut self, params: &mut [f32], grads: &[f32], lr: f64) -> Result<()> {
        if self.is_resident() {
            return Err(Error::Msg(
                "AdamW: the moments live on a CUDA device; step the parameters there (step_cuda)".into(),
            ));
        }
        let n = self.num_params;
        if params.len() != n || grads.len() != n {
            return Err(Error::Msg(format!(
                "AdamW: the optimizer holds state for {n} parameters, but got {} parameters and {} gradients",
                params.len(),
                grads.len()
            )));
        }
        let AdamWScalars {
            decay,
            w1,
            beta2: b2,
            w2,
            bias_correction2_sqrt,
            eps,
            step_size,
            ..
        } = self.next_scalars(lr, 1.0);
        for (((p, &g), m), v) in params
            .iter_mut()
            .zip(grads)
            .zip(&mut self.m)
            .zip(&mut self.v)
        {
            *p *= decay;
            *m += w1 * (g - *m);
            *v = *v * b2 + w2 * g * g;
            let denom = v.sqrt() / bias_correction2_sqrt + eps;
            *p -= step_size * (*m / denom);
        }
        Ok(())
    }

    /// Moves the moments onto `device` (a CUDA device), where [`AdamW::step_cuda`] updates
    /// them; the host copies are dropped. A no-op on the CPU or when already there.
    pub fn make_resident(&mut self, device: &Device) -> Result<()> {
        if device.is_cpu() {
            return Ok(());
        }
        #[cfg(feature = "cuda")]
        {
            if let Some(d) = &self.device {
                let here = Device::Cuda(d.dev.clone());
                return if device.same_device(&here) {
                    Ok(())
                } else {
                    Err(Error::Msg(format!("AdamW: the moments already live on {here:?}, not on {device:?}")))
                };
            }
            let dev = crate::kernels::cuda_device(device)?.clone();
            let m = dev.clone_htod(&self.m)?;
            let v = dev.clone_htod(&self.v)?;
            self.device = Some(DeviceMoments { dev, m, v });
            (self.m, self.v) = (Vec::new(), Vec::new());
            Ok(())
        }
        #[cfg(not(feature = "cuda"))]
        Err(Error::Msg(format!("AdamW: cannot keep the moments on {device:?}: this build has no CUDA support")))
    }

    /// One AdamW update of the device-resident `params` with `grads`, each gradient scaled
    /// by `grad_scale` (the clipping coefficient, 1 for none) as it is read. Bitwise the
    /// host [`AdamW::step`] on the same values.
    #[cfg(feature = "cuda")]
    pub fn step_cuda(
        &mut self,
        params: &mut candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>,
        grads: &candle_core::cuda_backend::cudarc::driver::CudaSlice<f32>,
        lr: f64,
        grad_scale: f32,
    ) -> Result<()> {
        let n = self.num_params;
        if params.len() != n || grads.len() != n {
            return Err(Error::Msg(format!(
                "AdamW: the optimizer holds state for {n} parameters, but got {} parameters and {} gradients",
                params.len(),
                grads.len()
            )));
        }
        if self.device.is_none() {
            return Err(Error::Msg("AdamW: step_cuda before make_resident: the moments are on the host".into()));
        }
        let scalars = self.next_scalars(lr, grad_scale);
        let d = self.device.as_mut().expect("checked above");
        crate::kernels::optim::adamw_step(&d.dev, params, &mut d.m, &mut d.v, grads, &scalars)
    }

    /// The moments as host vectors (downloaded when they live on a device).
    fn host_moments(&self) -> Result<(std::borrow::Cow<'_, [f32]>, std::borrow::Cow<'_, [f32]>)> {
        #[cfg(feature = "cuda")]
        if let Some(d) = &self.device {
            return Ok((d.dev.clone_dtoh(&d.m)?.into(), d.dev.clone_dtoh(&d.v)?.into()));
        }
        Ok((self.m.as_slice().into(), self.v.as_slice().into()))
    }

    /// The state to checkpoint: `exp_avg`, `exp_avg_sq` (f32, `[num_params]`) and `step`
    /// (i64, `[1]`), on the CPU (downloaded when the moments live on a device).
    pub fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let n = self.num_params;
        let (m, v) = self.host_moments()?;
        Ok(vec![
            (
                EXP_AVG.to_string(),
                Tensor::from_slice(&m, n, &Device::Cpu)?,
            ),
            (
                EXP_AVG_SQ.to_string(),
                Tensor::from_slice(&v, n, &Device::Cpu)?,
            ),
            (
                STEP.to_string(),
                Tensor::from_slice(&[self.step as i64], 1, &Device::Cpu)?,
            ),
        ])
    }

    /// Restores the state written by [`AdamW::state_tensors`] (uploading the moments when
    /// they live on a device); `source` (the file the tensors came from) only names the file
    /// in errors. `step` may be of any dtype, as torch stores it as a float.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>, source: &Path) -> Result<()> {
        let get = |name: &str| {
            tensors.get(name).ok_or_else(|| Error::MissingTensor {
                path: source.to_path_buf(),
                name: name.to_string(),
            })
        };
        let n = self.num_params;
        let moment = |name: &str| -> Result<Vec<f32>> {
            let t = get(name)?;
            if t.dims() != [n] {
                return Err(Error::Shape {
                    path: source.to_path_buf(),
                    name: name.to_string(),
                    expected: vec![n],
                    got: t.dims().to_vec(),
                });
            }
            Ok(t.to_dtype(DType::F32)?.to_vec1()?)
        };
        let m = moment(EXP_AVG)?;
        let v = moment(EXP_AVG_SQ)?;
        let step_t = get(STEP)?;
        let step = step_t
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?;
        let step = match step.as_slice() {
            [s] if *s >= 0.0 && s.fract() == 0.0 => *s as u64,
            _ => {
                return Err(Error::format(
                    source,
                    format!(
                    "optimizer tensor `{STEP}` must hold one non-negative integer, got {step:?}"
                ),
                ))
            }
        };
        #[cfg(feature = "cuda")]
        if let Some(d) = &mut self.device {
            d.dev.memcpy_htod(&m, &mut d.m)?;
            d.dev.memcpy_htod(&v, &mut d.v)?;
            self.step = step;
            return Ok(());
        }
        (self.m, self.v, self.step) = (m, v, step);
        Ok(())
    }
}

/// Learning-rate schedules, named as HF's `lr_scheduler_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SchedulerType {
    Constant,
    ConstantWithWarmup,
    /// HF TrainingArguments' default.
    #[default]
    Linear,
    /// Half a cosine period from the peak to zero (HF's num_cycles = 0.5).
    Cosine,
}

/// Cosine schedule cycles, as transformers' `get_cosine_schedule_with_warmup` default.
const NUM_CYCLES: f64 = 0.5;

/// The learning rate of optimizer step `step` (0-based: the first update uses step 0),
/// exactly as HF's LambdaLR schedules from `transformers.get_scheduler` give it after
/// `step` scheduler steps. With warmup, the first update therefore has lr 0, as in HF.
pub fn lr_at(
    kind: SchedulerType,
    base_lr: f64,
    step: u64,
    warmup_steps: u64,
    total_steps: u64,
) -> f64 {
    let (step, warmup, total) = (step as i64, warmup_steps as i64, total_steps as i64);
    let warming_up = kind != SchedulerType::Constant && step < warmup;
    let factor = if warming_up {
        step as f64 / (warmup.max(1) as f64)
    } else {
        match kind {
            SchedulerType::Constant | SchedulerType::ConstantWithWarmup => 1.0,
            SchedulerType::Linear => {
                (0f64).max((total - step) as f64 / ((total - warmup).max(1) as f64))
            }
            SchedulerType::Cosine => {
                let progress = (step - warmup) as f64 / ((total - warmup).max(1) as f64);
                (0f64).max(0.5 * (1.0 + (PI * NUM_CYCLES * 2.0 * progress).cos()))
            }
        }
    };
    base_lr * factor
}

/// Warmup steps for a `warmup_ratio` of `total_steps`: ceil(total·ratio), as HF's
/// `TrainingArguments.get_warmup_steps` (the same f64 product, so 0.07·100 gives 8).
pub fn warmup_steps_from_ratio(ratio: f64, total_steps: u64) -> u64 {
    (total_steps as f64 * ratio).ceil().max(0.0) as u64
}

/// Global L2 norm of the gradients, accumulated in f64.
pub fn grad_norm(grads: &[f32]) -> f64 {
    grads
        .iter()
        .map(|&g| (g as f64) * (g as f64))
        .sum::<f64>()
        .sqrt()
}

/// torch.nn.utils.clip_grad_norm_ over the flat gradient buffer: scales the gradients by
/// min(1, max_norm/(norm + 1e-6)) and returns the norm before clipping.
///
/// Unlike torch, a non-finite norm leaves the gradients untouched (torch would turn them
/// into NaN or zero): the caller is expected to skip that optimizer step.
pub fn clip_grad_norm(grads: &mut [f32], max_norm: f64) -> f64 {
    let norm = grad_norm(grads);
    if !norm.is_finite() {
        return norm;
    }
    let coef = clip_coef(norm, max_norm);
    if coef < 1.0 {
        grads.iter_mut().for_each(|g| *g *= coef);
    }
    norm
}

/// The factor torch.nn.utils.clip_grad_norm_ scales gradients of L2 norm `norm` by:
/// min(1, max_norm/(norm + 1e-6)), rounded to f32 as the gradients are.
pub fn clip_coef(norm: f64, max_norm: f64) -> f32 {
    (max_norm / (norm + 1e-6)).min(1.0) as f32
}

/// Adds one micro-batch's gradients into the accumulation buffer.
pub fn accumulate_grads(acc: &mut [f32], grads: &[f32]) -> Result<()> {
    if acc.len() != grads.len() {
        return Err(Error::Msg(format!(
            "gradient accumulation: buffer holds {} values, micro-batch gradients have {}",
            acc.len(),
            grads.len()
        )));
    }
    acc.iter_mut().zip(grads).for_each(|(a, &g)| *a += g);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn fixture(name: &str) -> Value {
        let path = format!(
            "{}/../tests/fixtures/optim/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
    }

    fn vec_f32(v: &Value) -> Vec<f32> {
        serde_json::from_value(v.clone()).unwrap()
    }

    /// Element-wise relative comparison; `floor` is the magnitude below which an element
    /// is compared absolutely (moments that are sums of opposite-signed f32 terms lose
    /// relative precision near zero, differently under torch's vectorised kernels).
    fn assert_close_slice(got: &[f32], want: &[f32], rel: f64, floor: f64, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            let tol = rel * (w.abs() as f64).max(floor);
            assert!(
                ((g - w) as f64).abs() <= tol,
                "{what}[{i}]: got {g}, want {w}"
            );
        }
    }

    fn max_abs(v: &[f32]) -> f64 {
        v.iter().fold(0f64, |m, x| m.max(x.abs() as f64))
    }

    fn adamw_of(case: &Value) -> AdamW {
        let f = |k: &str| case[k].as_f64().unwrap();
        let config = AdamWConfig {
            beta1: f("beta1"),
            beta2: f("beta2"),
            eps: f("eps"),
            weight_decay: f("weight_decay"),
        };
        AdamW::new(vec_f32(&case["params"]).len(), config)
    }

    #[test]
    fn adamw_matches_torch_step_by_step() {
        for (ci, case) in fixture("adamw.json")["cases"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
        {
            let mut opt = adamw_of(case);
            let mut params = vec_f32(&case["params"]);
            let lrs: Vec<f64> = serde_json::from_value(case["lrs"].clone()).unwrap();
            for (s, (grads, lr)) in case["grads"]
                .as_array()
                .unwrap()
                .iter()
                .zip(&lrs)
                .enumerate()
            {
                opt.step(&mut params, &vec_f32(grads), *lr).unwrap();
                let want = vec_f32(&case["params_after"][s]);
                assert_close_slice(
                    &params,
                    &want,
                    1e-6,
                    1e-6,
                    &format!("case {ci} params after step {s}"),
                );
            }
            let m = vec_f32(&case["exp_avg"]);
            assert_close_slice(opt.exp_avg(), &m, 1e-6, max_abs(&m), "exp_avg");
            let v = vec_f32(&case["exp_avg_sq"]);
            assert_close_slice(opt.exp_avg_sq(), &v, 1e-6, max_abs(&v), "exp_avg_sq");
            assert_eq!(opt.step_count(), case["step"].as_u64().unwrap());
        }
    }

    #[test]
    fn adamw_resumed_from_saved_state_continues_like_torch() {
        let case = &fixture("adamw.json")["cases"][1];
        let grads = case["grads"].as_array().unwrap();
        let lrs: Vec<f64> = serde_json::from_value(case["lrs"].clone()).unwrap();
        let mut params = vec_f32(&case["params"]);
        let mut opt = adamw_of(case);
        for s in 0..4 {
            opt.step(&mut params, &vec_f32(&grads[s]), lrs[s]).unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("optimizer.safetensors");
        let state: HashMap<String, Tensor> = opt.state_tensors().unwrap().into_iter().collect();
        candle_core::safetensors::save(&state, &path).unwrap();

        let mut resumed = adamw_of(case);
        resumed
            .load_state(
                &candle_core::safetensors::load(&path, &Device::Cpu).unwrap(),
                &path,
            )
            .unwrap();
        for s in 4..grads.len() {
            resumed
                .step(&mut params, &vec_f32(&grads[s]), lrs[s])
                .unwrap();
        }
        let want = vec_f32(&case["params_after"][grads.len() - 1]);
        assert_close_slice(&params, &want, 1e-6, 1e-6, "params after resume");
    }

    #[test]
    fn adamw_rejects_mismatched_buffers_and_bad_state() {
        let mut opt = AdamW::new(4, AdamWConfig::default());
        let e = opt
            .step(&mut [0.0; 4], &[0.0; 3], 1e-3)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("4 parameters") && e.contains("3 gradients"),
            "{e}"
        );
        assert_eq!(opt.step_count(), 0, "a rejected step must not count");

        let path = Path::new("ckpt/optimizer.safetensors");
        let mut state: HashMap<String, Tensor> = opt.state_tensors().unwrap().into_iter().collect();
        state.insert(
            EXP_AVG_SQ.into(),
            Tensor::zeros(5, DType::F32, &Device::Cpu).unwrap(),
        );
        let e = opt.load_state(&state, path).unwrap_err().to_string();
        assert!(
            e.contains("exp_avg_sq")
                && e.contains("[5]")
                && e.contains("ckpt/optimizer.safetensors"),
            "{e}"
        );
        state.remove(EXP_AVG);
        let e = opt.load_state(&state, path).unwrap_err().to_string();
        assert!(e.contains("`exp_avg`") && e.contains("missing"), "{e}");
    }

    #[test]
    fn torch_float_step_count_loads() {
        let mut opt = AdamW::new(2, AdamWConfig::default());
        let dev = &Device::Cpu;
        let state = HashMap::from([
            (
                EXP_AVG.to_string(),
                Tensor::new(&[0.5f32, -0.5], dev).unwrap(),
            ),
            (
                EXP_AVG_SQ.to_string(),
                Tensor::new(&[0.25f32, 0.125], dev).unwrap(),
            ),
            (STEP.to_string(), Tensor::new(7f32, dev).unwrap()),
        ]);
        opt.load_state(&state, Path::new("x")).unwrap();
        assert_eq!(
            (opt.step_count(), opt.exp_avg(), opt.exp_avg_sq()),
            (7, &[0.5f32, -0.5][..], &[0.25f32, 0.125][..])
        );
    }

    #[test]
    fn schedules_match_transformers_get_scheduler() {
        let fx = fixture("schedules.json");
        for s in fx["schedules"].as_array().unwrap() {
            // The HF name from the fixture must deserialize to our variant.
            let kind: SchedulerType = serde_json::from_value(s["type"].clone()).unwrap();
            let (base, warmup, total) = (
                s["base_lr"].as_f64().unwrap(),
                s["warmup_steps"].as_u64().unwrap(),
                s["total_steps"].as_u64().unwrap(),
            );
            for (step, want) in s["lrs"].as_array().unwrap().iter().enumerate() {
                let (got, want) = (
                    lr_at(kind, base, step as u64, warmup, total),
                    want.as_f64().unwrap(),
                );
                assert!(
                    (got - want).abs() <= 1e-12 * want.abs().max(1e-12),
                    "{s:?} step {step}: got {got}, want {want}"
                );
            }
        }
        for w in fx["warmup"].as_array().unwrap() {
            let (ratio, total) = (
                w["ratio"].as_f64().unwrap(),
                w["total_steps"].as_u64().unwrap(),
            );
            assert_eq!(
                warmup_steps_from_ratio(ratio, total),
                w["warmup_steps"].as_u64().unwrap(),
                "{w:?}"
            );
        }
    }

    #[test]
    fn scheduler_names_round_trip_as_hf_names() {
        for (name, kind) in [
            ("constant", SchedulerType::Constant),
            ("constant_with_warmup", SchedulerType::ConstantWithWarmup),
            ("linear", SchedulerType::Linear),
            ("cosine", SchedulerType::Cosine),
        ] {
            assert_eq!(
                serde_json::to_value(kind).unwrap(),
                Value::String(name.into())
            );
        }
        assert!(serde_json::from_str::<SchedulerType>("\"cosine_with_restarts\"").is_err());
    }

    #[test]
    fn clip_grad_norm_matches_torch() {
        for case in fixture("clip_grad_norm.json")["cases"].as_array().unwrap() {
            let mut grads = vec_f32(&case["grads"]);
            let norm = clip_grad_norm(&mut grads, case["max_norm"].as_f64().unwrap());
            let want = case["norm"].as_f64().unwrap();
            assert!(
                (norm - want).abs() <= 1e-6 * want,
                "norm: got {norm}, want {want}"
            );
            assert_close_slice(
                &grads,
                &vec_f32(&case["clipped"]),
                1e-6,
                1e-6,
                "clipped grads",
            );
        }
    }

    #[test]
    fn non_finite_norm_leaves_gradients_alone() {
        let mut grads = [1.0f32, f32::NAN, 2.0];
        assert!(clip_grad_norm(&mut grads, 1.0).is_nan());
        assert_eq!((grads[0], grads[2]), (1.0, 2.0));
    }

    #[test]
    fn accumulation_adds_and_checks_lengths() {
        let mut acc = vec![1.0f32, 2.0, 3.0];
        accumulate_grads(&mut acc, &[0.5, -2.0, 4.0]).unwrap();
        assert_eq!(acc, [1.5, 0.0, 7.0]);
        assert!(accumulate_grads(&mut acc, &[1.0])
            .unwrap_err()
            .to_string()
            .contains("3 values"));
    }
}
