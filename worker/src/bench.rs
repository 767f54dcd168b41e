//! Synthetic benchmarks of the training path at real model shapes, and the GPU self-test.
//!
//! Models are random (no checkpoint of 8B size can travel to a benchmark machine) but go
//! through exactly the code a training run uses: `Model::random` builds the same `Model`
//! as `Model::load`, LoRA adapters come from `LoraParams`, and one student step is the
//! sequence of `trainer::Student::micro_step` + `optimizer_step` (adapters, gradients and AdamW
//! state on the device, hand-written forward, fused LM-head loss, hand-written backward).
//! Settings follow the reference baselines (benches/baselines/): LoRA r=16, alpha=32 on
//! all seven linears, bf16, labels = inputs shifted by one, AdamW lr 1e-4 with torch's
//! default weight decay 0.01, no gradient clipping.
//!
//! Rows print in one markdown table format shared with the Python baselines, so one log
//! holds both and BENCHMARKS.md can quote it.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{anyhow, Context};
use candle_core::{DType, Device, Tensor};
use qdistill_common::lora::{LoraGrads, LoraParams, LoraSpec, ALL_LINEAR};
use qdistill_common::loss::{fused_linear_distill, fused_linear_distill_reference, KdLoss, LossConfig, TeacherOutput};
use qdistill_common::model::decoder::{LoadOptions, StepCtx};
use qdistill_common::model::{Model, ModelConfig};
use qdistill_common::optim::{AdamW, AdamWConfig};

/// Model shapes the benchmarks use.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelShape {
    /// Llama-3-8B: 32 layers, hidden 4096, FFN 14336, 32/8 heads, vocab 128,256.
    Llama8B,
    /// Llama-3.2-1B: 16 layers, hidden 2048, FFN 8192, 32/8 heads, vocab 128,256, tied.
    Llama1B,
    /// Two layers of width 64: checks the harness itself on a CPU.
    Tiny,
}

impl ModelShape {
    pub fn name(self) -> &'static str {
        match self {
            ModelShape::Llama8B => "8b",
            ModelShape::Llama1B => "1b",
            ModelShape::Tiny => "tiny",
        }
    }

    pub fn parse(s: &str) -> anyhow::Result<Self> {
        match s {
            "8b" => Ok(ModelShape::Llama8B),
            "1b" => Ok(ModelShape::Llama1B),
            "tiny" => Ok(ModelShape::Tiny),
            other => Err(anyhow!("unknown model shape `{other}` (8b, 1b, tiny)")),
        }
    }

    /// The HF config.json of the shape, parsed by the same code as a real checkpoint's.
    pub fn config(self) -> anyhow::Result<ModelConfig> {
        let (layers, hidden, ffn, heads, kv, vocab, tied) = match self {
            ModelShape::Llama8B => (32, 4096, 14336, 32, 8, 128_256, false),
            ModelShape::Llama1B => (16, 2048, 8192, 32, 8, 128_256, true),
            ModelShape::Tiny => (2, 64, 160, 4, 2, 256, false),
        };
        let v = serde_json::json!({
            "model_type": "llama",
            "hidden_size": hidden,
            "intermediate_size": ffn,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv,
            "vocab_size": vocab,
            "max_position_embeddings": 8192,
            "rope_theta": 500000.0,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": tied,
        });
        Ok(ModelConfig::from_json(&v, Path::new("<benchmark shape>"))?)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum BenchCase {
    /// One optimizer step of the LoRA student (forward, fused CE, backward, AdamW).
    /// `offload`: checkpointed block inputs in pinned host memory (with `checkpointing`).
    Student { shape: ModelShape, nf4: bool, batch: usize, seq: usize, checkpointing: bool, offload: bool },
    /// Teacher-style inference forward: final hidden states and the LM head's logits, as
    /// the HF baseline's `model(ids).logits`.
    Teacher { shape: ModelShape, nf4: bool, batch: usize, seq: usize },
    /// NF4 (double-quantized, blocksize 64) dequantization to bf16 of a `rows × cols` weight.
    Nf4Dequant { rows: usize, cols: usize },
    /// Forward KL with both LM heads applied inside the fused loss, returning dL/dh:
    /// `tokens × hidden` hidden states, `vocab × hidden` heads. `candle` runs the candle
    /// reference path instead of the dispatch (the CUDA kernel path on a GPU).
    FusedKl { tokens: usize, vocab: usize, hidden: usize, chunk_tokens: usize, candle: bool },
    /// Where one decoder block's time goes: each op of the forward and backward timed on
    /// its own at the shape's sizes (bf16 base GEMMs, attention, norms, RoPE, SwiGLU).
    BlockProfile { shape: ModelShape, batch: usize, seq: usize },
    /// bf16 `n³` matmul through candle/cuBLAS: the compute ceiling.
    Matmul { n: usize },
    /// Device-to-device copy of `bytes`: the bandwidth ceiling (read + write counted).
    Copy { bytes: usize },
    /// A kernel family's own micro-benchmark at Llama-3-8B sizes (its report is the note).
    KernelReport { family: &'static str },
}

impl BenchCase {
    pub fn label(&self) -> String {
        match self {
            BenchCase::Student { shape, nf4, batch, seq, checkpointing, offload } => format!(
                "{} {} {}x{} {}",
                if *nf4 { "qlora nf4" } else { "lora bf16" },
                shape.name(),
                batch,
                seq,
                match (checkpointing, offload) {
                    (true, true) => "gc+offload",
                    (true, false) => "gc",
                    _ => "nogc",
                }
            ),
            BenchCase::Teacher { shape, nf4, batch, seq } => {
                format!("teacher fwd {} {} {}x{}", if *nf4 { "nf4" } else { "bf16" }, shape.name(), batch, seq)
            }
            BenchCase::Nf4Dequant { rows, cols } => format!("nf4 dequant dq {rows}x{cols} -> bf16"),
            BenchCase::FusedKl { tokens, vocab, chunk_tokens, candle, .. } => {
                format!("fused fwd-KL T={tokens} V={vocab} chunk={chunk_tokens}{}", if *candle { " (candle path)" } else { "" })
            }
            BenchCase::BlockProfile { shape, batch, seq } => format!("block profile {} {batch}x{seq}", shape.name()),
            BenchCase::Matmul { n } => format!("bf16 matmul {n}^3"),
            BenchCase::Copy { bytes } => format!("d2d copy {} MiB", bytes >> 20),
            BenchCase::KernelReport { family } => format!("kernels: {family}"),
        }
    }

    fn model_key(&self) -> Option<(ModelShape, bool)> {
        match self {
            BenchCase::Student { shape, nf4, .. } | BenchCase::Teacher { shape, nf4, .. } => Some((*shape, *nf4)),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct BenchSpec {
    pub device: Device,
    pub cases: Vec<BenchCase>,
    /// Untimed runs before each timed series.
    pub warmup: usize,
    /// Timed runs (steps, forwards, kernel launches ×10).
    pub iters: usize,
    pub seed: u64,
}

impl BenchSpec {
    /// The suite behind BENCHMARKS.md: for each shape the student step with a bf16 base
    /// (2×2048, no checkpointing; 4×2048 with) and an NF4 base (4×2048 with checkpointing;
    /// 2×2048 without), teacher forwards, then the kernels at Llama-3-8B sizes.
    pub fn standard(device: Device, shapes: &[ModelShape]) -> Self {
        // Kernels first: they take seconds and say the most per second of device time.
        let mut cases = vec![
            BenchCase::Copy { bytes: 1 << 30 },
            BenchCase::Matmul { n: 8192 },
            BenchCase::Nf4Dequant { rows: 14336, cols: 4096 },
            BenchCase::KernelReport { family: "flash attention" },
            BenchCase::KernelReport { family: "fused norm/rope/glu" },
            BenchCase::KernelReport { family: "optim" },
        ];
        // The trainer's default chunk of 1024 rows (2 × 250 MiB of bf16 logits at V = 128K),
        // twice that, and the candle path for comparison.
        for (chunk_tokens, candle) in [(1024, false), (2048, false), (1024, true)] {
            cases.push(BenchCase::FusedKl { tokens: 8192, vocab: 128_256, hidden: 4096, chunk_tokens, candle });
        }
        for &shape in shapes {
            if shape != ModelShape::Tiny {
                cases.push(BenchCase::BlockProfile { shape, batch: 2, seq: 2048 });
            }
        }
        for &shape in shapes {
            let (b, s) = if shape == ModelShape::Tiny { (2, 16) } else { (2, 2048) };
            for nf4 in [false, true] {
                cases.push(BenchCase::Teacher { shape, nf4, batch: 2 * b, seq: s });
                let student = |batch, checkpointing, offload| BenchCase::Student { shape, nf4, batch, seq: s, checkpointing, offload };
                if nf4 {
                    cases.push(student(2 * b, true, false));
                    cases.push(student(2 * b, true, true));
                    cases.push(student(b, false, false));
                } else {
                    cases.push(student(b, false, false));
                    cases.push(student(2 * b, true, false));
                    cases.push(student(2 * b, true, true));
                }
            }
        }
        Self { device, cases, warmup: 1, iters: 3, seed: 0 }
    }
}

/// One measured case.
#[derive(Debug, Clone)]
pub struct BenchRow {
    pub implementation: String,
    pub case: String,
    /// Throughput in `unit` (tok/s, GB/s, TFLOP/s) or 0 where only `ms` applies.
    pub value: f64,
    pub unit: &'static str,
    /// Median milliseconds per step / call.
    pub ms: f64,
    /// Peak device memory allocated during the timed runs (pool high-water mark), GiB.
    pub peak_gib: Option<f64>,
    pub note: String,
    /// False when the case failed; `note` then holds the error.
    pub ok: bool,
}

impl BenchRow {
    /// The markdown row format shared with benches/baselines/*.py.
    pub fn markdown(&self) -> String {
        let value = if self.ok && self.value > 0.0 { format!("{:.1} {}", self.value, self.unit) } else { "-".into() };
        let ms = if self.ok { format!("{:.2}", self.ms) } else { "-".into() };
        let peak = self.peak_gib.map_or("-".into(), |g| format!("{g:.2}"));
        format!("| {} | {} | {} | {} | {} | {} |", self.implementation, self.case, value, ms, peak, self.note)
    }
}

pub const TABLE_HEADER: &str = "| impl | case | throughput | ms | peak GiB | note |\n|---|---|---|---|---|---|";

#[derive(Debug, Clone)]
pub struct BenchReport {
    pub device: String,
    pub rows: Vec<BenchRow>,
}


/// What the harness reads from the device: memory high-water marks and a description.
/// On a CPU there is nothing to read.
struct DeviceProbe {
    #[cfg(feature = "cuda")]
    pool: Option<qdistill_common::kernels::MemPool>,
}

impl DeviceProbe {
    fn new(device: &Device) -> anyhow::Result<Self> {
        #[cfg(feature = "cuda")]
        {
            if device.is_cuda() {
                let pool = qdistill_common::kernels::MemPool::of(device)?;
                // Freed blocks stay in the pool between steps (as PyTorch's caching
                // allocator keeps them) instead of being unmapped at every sync.
                pool.retain_freed()?;
                return Ok(Self { pool: Some(pool) });
            }
            Ok(Self { pool: None })
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = device;
            Ok(Self {})
        }
    }

    fn reset_peak(&self) -> anyhow::Result<()> {
        #[cfg(feature = "cuda")]
        if let Some(p) = &self.pool {
            p.reset_peak()?;
        }
        Ok(())
    }

    fn peak_bytes(&self) -> anyhow::Result<Option<u64>> {
        #[cfg(feature = "cuda")]
        if let Some(p) = &self.pool {
            return Ok(Some(p.peak_used()?));
        }
        Ok(None)
    }

    fn used_bytes(&self) -> anyhow::Result<Option<u64>> {
        #[cfg(feature = "cuda")]
        if let Some(p) = &self.pool {
            return Ok(Some(p.used()?));
        }
        Ok(None)
    }
}

/// Describes the device for report headers (GPU name and driver's CUDA version).
pub fn describe_device(device: &Device) -> String {
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        if let Ok((name, v)) = qdistill_common::kernels::device_info(device) {
            return format!("{name}, CUDA driver {}.{}", v / 1000, (v % 1000) / 10);
        }
    }
    format!("{device:?}")
}

/// Opens `cuda:N` for benchmarking: candle's single stream without per-tensor event
/// tracking (cudarc records two events per allocation for multi-stream safety, which a
/// one-stream program does not need). `cpu` opens the CPU.
pub fn open_device(name: &str) -> anyhow::Result<Device> {
    if name == "cpu" {
        return Ok(Device::Cpu);
    }
    let ordinal: usize = name
        .strip_prefix("cuda:")
        .or(if name == "cuda" { Some("0") } else { None })
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow!("device `{name}`: expected cpu, cuda or cuda:N"))?;
    let device = Device::new_cuda(ordinal).with_context(|| format!("opening {name}"))?;
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = &device {
        // SAFETY: every tensor of this program lives on candle's one stream of this device.
        unsafe { d.disable_event_tracking() };
    }
    Ok(device)
}

fn lora_spec() -> LoraSpec {
    LoraSpec {
        r: 16,
        lora_alpha: 32.0,
        lora_dropout: 0.0,
        use_rslora: false,
        target_modules: ALL_LINEAR.iter().map(|s| s.to_string()).collect(),
    }
}

/// Random ids `[batch, seq]`, positions 0..seq, and HF's shifted labels (position t
/// predicts ids[t+1]; the last position of each row predicts nothing).
fn random_batch(batch: usize, seq: usize, vocab: usize, seed: u64, device: &Device) -> anyhow::Result<(Tensor, Tensor, Vec<i64>)> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let ids: Vec<u32> = (0..batch * seq).map(|_| rng.random_range(0..vocab as u32)).collect();
    let pos: Vec<u32> = (0..batch).flat_map(|_| 0..seq as u32).collect();
    let labels: Vec<i64> = ids
        .chunks(seq)
        .flat_map(|row| row[1..].iter().map(|&i| i as i64).chain(std::iter::once(-100)))
        .collect();
    Ok((Tensor::from_vec(ids, (batch, seq), device)?, Tensor::from_vec(pos, (batch, seq), device)?, labels))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs `f` `warmup` times, then `iters` times, each synchronised: median milliseconds and
/// the pool's high-water mark over the timed runs.
fn timed(
    device: &Device,
    probe: &DeviceProbe,
    warmup: usize,
    iters: usize,
    mut f: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<(f64, Option<u64>)> {
    for _ in 0..warmup {
        f()?;
    }
    device.synchronize()?;
    probe.reset_peak()?;
    let mut ms = Vec::with_capacity(iters);
    for _ in 0..iters.max(1) {
        let t = Instant::now();
        f()?;
        device.synchronize()?;
        ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok((median(&mut ms), probe.peak_bytes()?))
}

const GIB: f64 = (1u64 << 30) as f64;

fn row(case: &BenchCase, value: f64, unit: &'static str, ms: f64, peak: Option<u64>, note: String) -> BenchRow {
    BenchRow {
        implementation: "qdistill".into(),
        case: case.label(),
        value,
        unit,
        ms,
        peak_gib: peak.map(|b| b as f64 / GIB),
        note,
        ok: true,
    }
}

/// Runs every case of `spec`, printing each row as it completes, and returns the table.
/// A failing case (out of memory, an op the device lacks) becomes a failed row and the
/// run goes on.
pub fn run_bench(spec: &BenchSpec) -> anyhow::Result<BenchReport> {
    let device = &spec.device;
    let probe = DeviceProbe::new(device)?;
    let report_device = describe_device(device);
    println!("device: {report_device}\n{TABLE_HEADER}");
    let mut rows = Vec::new();
    let mut model: Option<((ModelShape, bool), Model)> = None;
    for case in &spec.cases {
        let key = case.model_key();
        if model.as_ref().map(|(k, _)| Some(*k)) != Some(key) {
            // Free the previous model before building the next: 8B ones do not fit twice.
            model = None;
            if let Some((shape, nf4)) = key {
                let t = Instant::now();
                match build_model(shape, nf4, device, spec.seed) {
                    Ok(m) => {
                        device.synchronize()?;
                        eprintln!(
                            "built random {} model ({}) in {:.1}s: base {:.2} GiB",
                            shape.name(),
                            if nf4 { "nf4" } else { "bf16" },
                            t.elapsed().as_secs_f64(),
                            m.base_memory_bytes() as f64 / GIB
                        );
                        model = Some(((shape, nf4), m));
                    }
                    Err(e) => {
                        let r = failed(case, &e);
                        println!("{}", r.markdown());
                        rows.push(r);
                        continue;
                    }
                }
            }
        }
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_case(spec, case, model.as_mut().map(|(_, m)| m), &probe)))
            .unwrap_or_else(|p| Err(anyhow!("panicked: {}", panic_message(&p))));
        for r in res.unwrap_or_else(|e| vec![failed(case, &e)]) {
            println!("{}", r.markdown());
            rows.push(r);
        }
    }
    Ok(BenchReport { device: report_device, rows })
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>().cloned().or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default()
}

fn failed(case: &BenchCase, e: &anyhow::Error) -> BenchRow {
    BenchRow {
        implementation: "qdistill".into(),
        case: case.label(),
        value: 0.0,
        unit: "",
        ms: 0.0,
        peak_gib: None,
        note: format!("FAILED: {}", format!("{e:#}").replace(['\n', '|'], " ")),
        ok: false,
    }
}

fn build_model(shape: ModelShape, nf4: bool, device: &Device, seed: u64) -> anyhow::Result<Model> {
    let cfg = shape.config()?;
    let opts = LoadOptions { keep_layers: None, nf4, double_quant: true, device: device.clone(), dtype: bench_dtype(device) };
    Ok(Model::random(&cfg, &opts, seed)?)
}

/// bf16 on GPUs, as the baselines; f32 on CPUs, where candle's bf16 matmul is slow.
fn bench_dtype(device: &Device) -> DType {
    if device.is_cpu() {
        DType::F32
    } else {
        DType::BF16
    }
}

fn run_case(spec: &BenchSpec, case: &BenchCase, model: Option<&mut Model>, probe: &DeviceProbe) -> anyhow::Result<Vec<BenchRow>> {
    if let BenchCase::Nf4Dequant { rows, cols } = *case {
        return nf4_dequant_case(spec, case, rows, cols, probe);
    }
    Ok(vec![run_single(spec, case, model, probe)?])
}

fn run_single(spec: &BenchSpec, case: &BenchCase, model: Option<&mut Model>, probe: &DeviceProbe) -> anyhow::Result<BenchRow> {
    let device = &spec.device;
    match *case {
        BenchCase::Student { batch, seq, checkpointing, offload, .. } => {
            let model = model.ok_or_else(|| anyhow!("no model"))?;
            model.set_activation_offloading(offload && checkpointing)?;
            let modules = model.attach_lora(&lora_spec())?;
            let mut params = LoraParams::init(&lora_spec(), &modules, spec.seed);
            // PEFT starts B at zero; random B makes every gradient path carry real values.
            use rand::{Rng, SeedableRng};
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(spec.seed + 1);
            let r = params.spec.r;
            for e in &params.entries {
                for v in &mut params.values[e.b_offset..e.b_offset + e.out_features * r] {
                    *v = rng.random_range(-0.01..0.01);
                }
            }
            let mut grads = LoraGrads::zeros(&params);
            let mut opt = AdamW::new(params.len(), AdamWConfig { weight_decay: 0.01, ..AdamWConfig::default() });
            // As the trainer does (Student::keep_on_device): on a GPU, adapters, gradients and
            // AdamW moments live there for the whole run.
            if device.is_cuda() {
                params.make_resident(device, model.dtype())?;
                grads.make_resident(device)?;
                opt.make_resident(device)?;
            }
            let loss = LossConfig {
                ce_weight: 1.0,
                kd_weight: 0.0,
                kd: KdLoss::ForwardKl,
                temperature: 1.0,
                chunk_tokens: 1024,
                student_softcap: None,
            };
            let (ids, pos, labels) = random_batch(batch, seq, model.cfg.vocab_size, spec.seed, device)?;
            let n_valid = labels.iter().filter(|&&l| l >= 0).count();
            let mut last_loss = 0f64;
            // One step; with `phases`, synchronised after each part to split its time
            // (adapter upload, forward, fused loss, backward incl. gradient copies, AdamW).
            let mut step = |phases: Option<&mut [f64; 5]>| -> anyhow::Result<()> {
                let mut marks = [0f64; 5];
                let mut t = Instant::now();
                let mut mark = |i: usize, on: bool| -> anyhow::Result<()> {
                    if on {
                        device.synchronize()?;
                        marks[i] = t.elapsed().as_secs_f64() * 1e3;
                        t = Instant::now();
                    }
                    Ok(())
                };
                let on = phases.is_some();
                let lora = params.to_device(device, model.dtype())?;
                mark(0, on)?;
                let ctx = StepCtx { position_ids: &pos, segment_ids: None, lora: Some(&lora), dropout_seed: Some(0) };
                let (h, saved) = model.forward_train(&ids, &ctx, checkpointing)?;
                mark(1, on)?;
                let out =
                    fused_linear_distill(&h, model.lm_head(), &labels, TeacherOutput::None, &loss, 1.0 / n_valid as f64)?;
                mark(2, on)?;
                model.backward(&out.dh, saved, &ctx, &params, &mut grads)?;
                mark(3, on)?;
                optimizer_step(&mut params, &grads, &mut opt)?;
                grads.zero()?;
                mark(4, on)?;
                last_loss = out.ce_sum / n_valid as f64;
                if let Some(p) = phases {
                    *p = marks;
                }
                Ok(())
            };
            let (ms, peak) = timed(device, probe, spec.warmup, spec.iters, || step(None))?;
            let mut phases = [0f64; 5];
            step(Some(&mut phases))?;
            if !last_loss.is_finite() {
                return Err(anyhow!("loss is {last_loss}"));
            }
            let tokens = (batch * seq) as f64;
            let n_params = model_params(&model.cfg);
            let mfu = 4.0 * n_params * tokens / (ms / 1e3) / 989e12 * 100.0;
            let [up, fwd, lossms, bwd, adam] = phases;
            let note = format!(
                "MFU(4N) {mfu:.1}%, CE {last_loss:.3}, {} adapter params; ms: upload {up:.0}, fwd {fwd:.0}, loss {lossms:.0}, bwd {bwd:.0}, adamw {adam:.0}",
                params.len()
            );
            Ok(row(
                case,
                tokens / (ms / 1e3),
                "tok/s",
                ms,
                peak,
                note,
            ))
        }
        BenchCase::Teacher { batch, seq, .. } => {
            let model = model.ok_or_else(|| anyhow!("no model"))?;
            let (ids, pos, _) = random_batch(batch, seq, model.cfg.vocab_size, spec.seed, device)?;
            let ctx = StepCtx { position_ids: &pos, segment_ids: None, lora: None, dropout_seed: None };
            let mut fwd = || -> anyhow::Result<()> {
                let h = model.forward_hidden(&ids, &ctx)?;
                let _z = model.logits(&h)?;
                Ok(())
            };
            let (ms, peak) = timed(device, probe, spec.warmup, spec.iters, &mut fwd)?;
            let tokens = (batch * seq) as f64;
            let mfu = 2.0 * model_params(&model.cfg) * tokens / (ms / 1e3) / 989e12 * 100.0;
            Ok(row(case, tokens / (ms / 1e3), "tok/s", ms, peak, format!("MFU(2N) {mfu:.1}%, hidden states + LM head logits")))
        }
        BenchCase::Nf4Dequant { .. } => Err(anyhow!("the NF4 dequant case yields several rows: run it through run_case")),
        BenchCase::FusedKl { tokens, vocab, hidden, chunk_tokens, candle } => {
            use rand::{Rng, SeedableRng};
            let dt = bench_dtype(device);
            let rand = |r: usize, c: usize, std: f32| -> anyhow::Result<Tensor> {
                Ok(Tensor::randn(0f32, std, (r, c), device)?.to_dtype(dt)?)
            };
            let (hs, ws, ht, wt) = (rand(tokens, hidden, 1.0)?, rand(vocab, hidden, 0.02)?, rand(tokens, hidden, 1.0)?, rand(vocab, hidden, 0.02)?);
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(spec.seed);
            let labels: Vec<i64> = (0..tokens).map(|_| rng.random_range(0..vocab as i64)).collect();
            let cfg = LossConfig { ce_weight: 0.0, kd_weight: 1.0, kd: KdLoss::ForwardKl, temperature: 1.0, chunk_tokens, student_softcap: None };
            device.synchronize()?;
            let before = probe.used_bytes()?;
            let mut kd = 0.0;
            let loss = if candle { fused_linear_distill_reference } else { fused_linear_distill };
            let mut f = || -> anyhow::Result<()> {
                let out = loss(&hs, &ws, &labels, TeacherOutput::Hidden { h: &ht, lm_head: &wt, softcap: None }, &cfg, 1.0 / tokens as f64)?;
                kd = out.kd_sum / tokens as f64;
                drop(out);
                Ok(())
            };
            let (ms, peak) = timed(device, probe, spec.warmup, spec.iters, &mut f)?;
            let above = match (peak, before) {
                (Some(p), Some(b)) => Some(p.saturating_sub(b)),
                _ => None,
            };
            // The three GEMMs (student and teacher logits, dh) are 6·T·V·d FLOP.
            let tflops = 6.0 * (tokens * vocab * hidden) as f64 / (ms / 1e3) / 1e12;
            Ok(row(
                case,
                0.0,
                "",
                ms,
                above,
                format!("peak is above the inputs; forward KL {kd:.4}; computes CE too (weight 0); GEMMs at {tflops:.0} TFLOP/s overall"),
            ))
        }
        BenchCase::BlockProfile { shape, batch, seq } => block_profile(spec, case, shape, batch, seq, probe),
        BenchCase::Matmul { n } => {
            let dt = bench_dtype(device);
            let a = Tensor::randn(0f32, 1.0, (n, n), device)?.to_dtype(dt)?;
            let b = Tensor::randn(0f32, 1.0, (n, n), device)?.to_dtype(dt)?;
            let (ms, peak) = timed(device, probe, spec.warmup, spec.iters * 3, || {
                a.matmul(&b)?;
                Ok(())
            })?;
            let tflops = 2.0 * (n as f64).powi(3) / (ms / 1e3) / 1e12;
            Ok(row(case, tflops, "TFLOP/s", ms, peak, "random data".into()))
        }
        BenchCase::KernelReport { family } => {
            let report = kernel_report(family, device)?;
            Ok(row(case, 0.0, "", 0.0, None, report.replace('\n', "; ").replace('|', "/")))
        }
        BenchCase::Copy { bytes } => {
            let n = bytes / 4;
            let a = Tensor::randn(0f32, 1.0, n, device)?;
            let (ms, peak) = timed(device, probe, spec.warmup, spec.iters * 3, || {
                // A contiguous copy kernel over the whole buffer.
                let _ = a.copy()?;
                Ok(())
            })?;
            let gbs = 2.0 * (n * 4) as f64 / (ms / 1e3) / 1e9;
            Ok(row(case, gbs, "GB/s", ms, peak, "bytes read + written".into()))
        }
    }
}

/// The micro-benchmark of a kernel family (each lives beside its GPU checks).
fn kernel_report(family: &str, device: &Device) -> anyhow::Result<String> {
    #[cfg(feature = "cuda")]
    {
        match family {
            "optim" => crate::selftest_optim::optim_bench(device),
            "flash attention" => crate::selftest_flash::flash_bench(device),
            "fused norm/rope/glu" => crate::selftest_fused::fused_bench(device),
            other => Err(anyhow!("no kernel family {other:?}")),
        }
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = device;
        Err(anyhow!("kernel family {family:?}: this binary is built without the `cuda` feature"))
    }
}

/// AdamW at lr 1e-4 without clipping (the baselines' settings), on the device when the
/// state lives there.
fn optimizer_step(params: &mut LoraParams, grads: &LoraGrads, opt: &mut AdamW) -> anyhow::Result<()> {
    #[cfg(feature = "cuda")]
    if grads.is_resident() {
        params.update_on_device(|p| opt.step_cuda(p, grads.cuda_slice()?, 1e-4, 1.0))?;
        return Ok(());
    }
    opt.step(&mut params.values, &grads.flat, 1e-4)?;
    Ok(())
}

/// Times each op of one decoder block in isolation. The note lists milliseconds per op
/// (forward, then backward) and their sum; ×layers approximates the model's block time
/// without the framework overhead between ops, which the student-step row includes.
fn block_profile(spec: &BenchSpec, case: &BenchCase, shape: ModelShape, b: usize, t: usize, probe: &DeviceProbe) -> anyhow::Result<BenchRow> {
    use qdistill_common::ops::activation::{glu_bwd, glu_fwd};
    use qdistill_common::ops::attention::{attention_bwd, attention_fwd, AttnConfig};
    use qdistill_common::ops::rms_norm::{rms_norm_bwd, rms_norm_fwd};
    use qdistill_common::ops::rope::{rope_bwd, rope_fwd, RopeTable};
    let device = &spec.device;
    let cfg = shape.config()?;
    let dt = bench_dtype(device);
    let (d, f, hq, hkv, hd) = (cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim);
    let n = b * t;
    let rnd = |shape: &[usize], std: f32| -> anyhow::Result<Tensor> { Ok(Tensor::randn(0f32, std, shape, device)?.to_dtype(dt)?) };
    let mut parts: Vec<(&str, f64)> = Vec::new();
    let mut time = |name: &'static str, f: &mut dyn FnMut() -> anyhow::Result<()>| -> anyhow::Result<()> {
        let (ms, _) = timed(device, probe, spec.warmup, spec.iters.max(3), &mut *f)?;
        parts.push((name, ms));
        Ok(())
    };
    let x = rnd(&[b, t, d], 1.0)?;
    let w_norm = Tensor::ones(d, dt, device)?;
    let (_, saved) = rms_norm_fwd(&x, &w_norm, 1e-5, false)?;
    time("rmsnorm", &mut || Ok(rms_norm_fwd(&x, &w_norm, 1e-5, false).map(|_| ())?))?;
    let h = x.reshape((n, d))?;
    let ws: Vec<Tensor> = qdistill_common::lora::ALL_LINEAR
        .iter()
        .map(|s| cfg.linear_shape(s).map(|(i, o)| rnd(&[o, i], 0.02)).unwrap_or_else(|| Err(anyhow!("no linear {s}"))))
        .collect::<anyhow::Result<_>>()?;
    let m_in = rnd(&[n, f], 1.0)?;
    let o_in = rnd(&[n, hq * hd], 1.0)?;
    time("7 GEMMs", &mut || {
        for (k, w) in ws.iter().enumerate() {
            let inp = match k {
                3 => &o_in,
                6 => &m_in,
                _ => &h,
            };
            inp.matmul(&w.t()?)?;
        }
        Ok(())
    })?;
    let rope = RopeTable::new(hd, cfg.rope_theta, cfg.rope_scaling, cfg.max_position_embeddings, device)?;
    let pos: Vec<u32> = (0..b).flat_map(|_| 0..t as u32).collect();
    let pos = Tensor::from_vec(pos, (b, t), device)?;
    let q = rnd(&[b, hq, t, hd], 1.0)?;
    let k = rnd(&[b, hkv, t, hd], 1.0)?;
    let v = rnd(&[b, hkv, t, hd], 1.0)?;
    time("rope q+k", &mut || {
        rope_fwd(&q, &rope, &pos)?;
        rope_fwd(&k, &rope, &pos)?;
        Ok(())
    })?;
    let acfg = AttnConfig { n_heads: hq, n_kv_heads: hkv, head_dim: hd, scale: cfg.attn_scale, sliding_window: None, softcap: None };
    let (_, asaved) = attention_fwd(&q, &k, &v, &acfg, None)?;
    time("attention", &mut || Ok(attention_fwd(&q, &k, &v, &acfg, None).map(|_| ())?))?;
    let gate = rnd(&[n, f], 1.0)?;
    let up = rnd(&[n, f], 1.0)?;
    time("swiglu", &mut || Ok(glu_fwd(&gate, &up, cfg.hidden_act).map(|_| ())?))?;
    // Backward: the frozen base's dX GEMMs (dY·W), attention, norms, RoPE, SwiGLU.
    let dys: Vec<Tensor> = ws.iter().map(|w| rnd(&[n, w.dim(0)?], 1.0)).collect::<anyhow::Result<_>>()?;
    time("7 dX GEMMs", &mut || {
        for (dy, w) in dys.iter().zip(&ws) {
            dy.matmul(w)?;
        }
        Ok(())
    })?;
    let dout = rnd(&[b, hq, t, hd], 1.0)?;
    time("attention bwd", &mut || Ok(attention_bwd(&dout, &asaved, &acfg, None).map(|_| ())?))?;
    time("rope bwd q+k", &mut || {
        rope_bwd(&q, &rope, &pos)?;
        rope_bwd(&k, &rope, &pos)?;
        Ok(())
    })?;
    time("swiglu bwd", &mut || Ok(glu_bwd(&m_in, &gate, &up, cfg.hidden_act).map(|_| ())?))?;
    time("rmsnorm bwd", &mut || Ok(rms_norm_bwd(&x, &w_norm, false, &saved).map(|_| ())?))?;
    // A block runs two norms of each kind.
    let total: f64 = parts.iter().map(|(name, ms)| if name.starts_with("rmsnorm") { 2.0 * ms } else { *ms }).sum();
    let note = parts.iter().map(|(name, ms)| format!("{name} {ms:.2}")).collect::<Vec<_>>().join(", ");
    Ok(row(case, 0.0, "", total, probe.peak_bytes()?, format!("ms per op: {note}; ×{} layers = {:.0} ms", cfg.num_hidden_layers, total * cfg.num_hidden_layers as f64)))
}

/// Parameters of the dense model (embedding, head, blocks), the N of MFU = kN·tokens/time.
fn model_params(cfg: &ModelConfig) -> f64 {
    let per_block: usize = ALL_LINEAR.iter().map(|s| cfg.linear_shape(s).map_or(0, |(i, o)| i * o)).sum();
    let head = if cfg.tie_word_embeddings { 0 } else { cfg.vocab_size * cfg.hidden_size };
    (cfg.num_hidden_layers * per_block + cfg.vocab_size * cfg.hidden_size + head) as f64
}

#[cfg(feature = "cuda")]
fn nf4_dequant_case(spec: &BenchSpec, case: &BenchCase, rows: usize, cols: usize, probe: &DeviceProbe) -> anyhow::Result<Vec<BenchRow>> {
    use qdistill_common::kernels::{bf16, time_on_stream, CudaNf4, NF4_BF16_DQ_VARIANTS, NF4_DEFAULT_LAUNCH};
    use qdistill_common::nf4::Nf4Tensor;
    let device = &spec.device;
    if !device.is_cuda() {
        return Err(anyhow!("the NF4 kernel needs a CUDA device"));
    }
    let cuda = qdistill_common::kernels::cuda_device(device)?;
    // Two weights in rotation (147 MB of traffic each, L2 is 50 MB): no run finds its
    // input in cache.
    let mut hosts = Vec::new();
    let mut weights = Vec::new();
    for k in 0..2 {
        let w = pseudo_normal(rows * cols, 0.02, spec.seed + k);
        let q = Nf4Tensor::quantize(&w, rows, cols, true)?;
        weights.push(CudaNf4::upload(&q, device)?);
        hosts.push(q);
    }
    let want: Vec<u16> = hosts[1].dequantize().iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
    let n = (rows * cols) as f64;
    // Bytes that must move: packed codes, 8-bit absmax and their f32 scales in, bf16 out.
    let bytes = n / 2.0 + n / 64.0 + n / 64.0 / 256.0 * 4.0 + 2.0 * n;
    // The ceiling at this size: a device-to-device copy moving the same bytes (half read,
    // half written), from two sources in rotation. A 147 MB kernel of ~40 us pays the grid's
    // ramp-up and drain that the 1 GiB copy row amortises.
    let half = (bytes / 2.0) as usize;
    let sources = [cuda.alloc_zeros::<u8>(half)?, cuda.alloc_zeros::<u8>(half)?];
    let mut dst = cuda.alloc_zeros::<u8>(half)?;
    let mut k = 0;
    let mut times = time_on_stream(device, 3, spec.iters.max(1) * 20, || {
        cuda.memcpy_dtod(&sources[k % 2], &mut dst)?;
        k += 1;
        Ok(())
    })?;
    let copy_ms = median(&mut times);
    let copy_gbs = bytes / (copy_ms / 1e3) / 1e9;
    drop((sources, dst));
    let mut copy_row = row(case, copy_gbs, "GB/s", copy_ms, None, format!("{:.1} us: d2d copy of the same traffic", copy_ms * 1e3));
    copy_row.case = format!("d2d copy {:.0} MB read + written (the dequant's traffic)", bytes / 1e6);
    let mut out_rows = vec![copy_row];
    for launch in NF4_BF16_DQ_VARIANTS {
        // Each launch shape must give the CPU's bits (poisoned output first).
        let mut out = cuda.clone_htod(&vec![bf16::NAN; rows * cols])?;
        weights[1].dequantize_into_with(&mut out, &launch)?;
        let got = cuda.clone_dtoh(&out)?;
        let bad = got.iter().zip(&want).filter(|(a, b)| a.to_bits() != **b).count();
        let mut k = 0;
        probe.reset_peak()?;
        let mut times = time_on_stream(device, 3, spec.iters.max(1) * 20, || {
            weights[k % 2].dequantize_into_with(&mut out, &launch)?;
            k += 1;
            Ok(())
        })?;
        let ms = median(&mut times);
        let mut r = row(
            case,
            bytes / (ms / 1e3) / 1e9,
            "GB/s",
            ms,
            probe.peak_bytes()?,
            format!("{:.1} us, {:.0}% of the same-traffic copy; {bad} elements differ from the CPU", ms * 1e3, 100.0 * copy_ms / ms),
        );
        if launch != NF4_DEFAULT_LAUNCH {
            let grid = if launch.waves == 0 { String::new() } else { format!(" grid {} waves", launch.waves) };
            r.case = format!("{} (units {} vec {} threads {}{grid}{})", r.case, launch.units, launch.vec, launch.threads,
                if launch.kernel_suffix.ends_with("cs") { " streaming stores" } else { "" });
        }
        r.ok = bad == 0;
        if bad != 0 {
            r.note = format!("FAILED: {}", r.note);
        }
        out_rows.push(r);
    }
    Ok(out_rows)
}

#[cfg(not(feature = "cuda"))]
fn nf4_dequant_case(_: &BenchSpec, _: &BenchCase, _: usize, _: usize, _: &DeviceProbe) -> anyhow::Result<Vec<BenchRow>> {
    Err(anyhow!("the NF4 kernel needs a build with the `cuda` feature"))
}

/// Gaussian-ish values from a seeded stream (sum of four uniforms), fast enough for
/// 58M-element weights on one core.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn pseudo_normal(n: usize, std: f32, seed: u64) -> Vec<f32> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    // Var of a sum of 4 U(-1,1) is 4/3.
    let k = std / (4.0f32 / 3.0).sqrt();
    (0..n).map(|_| k * (0..4).map(|_| rng.random::<f32>() * 2.0 - 1.0).sum::<f32>()).collect()
}

// ---------------------------------------------------------------------------------------
// GPU self-test: the CUDA path against HF fixtures and the CPU implementation.
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct SelftestSpec {
    pub device: Device,
    /// tests/fixtures of the repository (models/, written by transformers and PEFT).
    pub fixtures: PathBuf,
}

#[derive(Debug, Clone)]
pub struct CheckRow {
    pub name: String,
    pub pass: bool,
    pub detail: String,
}

#[derive(Debug, Clone)]
pub struct SelftestReport {
    pub device: String,
    pub checks: Vec<CheckRow>,
}

impl SelftestReport {
    pub fn all_passed(&self) -> bool {
        self.checks.iter().all(|c| c.pass)
    }

}

/// Checks the training path on `spec.device` against independent references and prints a
/// pass/fail table: logits of the six fixture architectures against transformers (f32 and
/// bf16), LoRA gradients against PEFT (CE with and without checkpointing, distillation),
/// the NF4 kernel bit for bit against the CPU dequantization (poisoned outputs), and an
/// NF4 model on the GPU against the same model on the CPU.
pub fn run_selftest(spec: &SelftestSpec) -> anyhow::Result<SelftestReport> {
    let dev = &spec.device;
    let device = describe_device(dev);
    println!("device: {device}\n| check | result | detail |\n|---|---|---|");
    let mut checks = Vec::new();
    let mut record = |name: String, res: std::thread::Result<anyhow::Result<(bool, String)>>| {
        let (pass, detail) = match res {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => (false, format!("error: {}", format!("{e:#}").replace(['\n', '|'], " "))),
            Err(p) => (false, format!("panicked: {}", panic_message(&p))),
        };
        let c = CheckRow { name, pass, detail };
        println!("| {} | {} | {} |", c.name, if c.pass { "PASS" } else { "FAIL" }, c.detail);
        checks.push(c);
    };
    let catch = |f: &dyn Fn() -> anyhow::Result<(bool, String)>| std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));

    #[cfg(feature = "cuda")]
    for (rows, cols, dq) in [(64, 64, true), (300, 517, true), (7, 9, false), (1000, 4096, false), (14336, 4096, true)] {
        record(format!("nf4 kernel {rows}x{cols} dq={dq} vs CPU"), catch(&|| check_nf4_kernel(dev, rows, cols, dq)));
    }
    let models = spec.fixtures.join("models");
    for name in ["llama", "smollm", "mistral", "qwen2", "gemma", "gemma2"] {
        for (dtype, tol) in [(DType::F32, 1e-4), (DType::BF16, 5e-2)] {
            record(
                format!("{name} logits {dtype:?} vs transformers"),
                catch(&|| check_logits(&models.join(name), dev, dtype, tol)),
            );
        }
    }
    for (ckpt, offload) in [(false, false), (true, false), (true, true)] {
        let how = if offload { "checkpointing=true, block inputs offloaded to host".to_string() } else { format!("checkpointing={ckpt}") };
        record(
            format!("llama-peft CE grads ({how}) vs PEFT"),
            catch(&|| check_peft_grads(&models, "llama-peft", "llama", dev, false, ckpt, offload)),
        );
    }
    record(
        "llama-peft distill grads vs PEFT".into(),
        catch(&|| check_peft_grads(&models, "llama-peft", "llama", dev, true, true, false)),
    );
    record(
        "gemma2-peft rsLoRA CE grads vs PEFT".into(),
        catch(&|| check_peft_grads(&models, "gemma2-peft", "gemma2", dev, false, false, false)),
    );
    record("llama nf4 model on device vs CPU".into(), catch(&|| check_nf4_model(&models.join("llama"), dev)));
    #[cfg(feature = "cuda")]
    record("activation offloading: host embedding gather vs device index_select".into(), catch(&|| check_host_gather(dev)));
    #[cfg(feature = "cuda")]
    {
        let kernel_checks = crate::selftest_flash::flash_checks(dev)
            .into_iter()
            .chain(crate::selftest_fused::fused_checks(dev))
            .chain(crate::selftest_loss::loss_checks(dev))
            .chain(crate::selftest_optim::optim_checks(dev, &spec.fixtures))
            .chain(crate::selftest_nccl::nccl_checks());
        for (name, res) in kernel_checks {
            record(name, Ok(res));
        }
    }
    Ok(SelftestReport { device, checks })
}

fn max_rel_err(a: &Tensor, b: &Tensor) -> anyhow::Result<f64> {
    let a = a.to_device(&Device::Cpu)?.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    let b = b.to_device(&Device::Cpu)?.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    if a.len() != b.len() {
        return Err(anyhow!("{} values vs {} in the reference", a.len(), b.len()));
    }
    if a.iter().any(|x| !x.is_finite()) {
        return Err(anyhow!("non-finite values in the output"));
    }
    let scale = b.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-12);
    Ok(a.iter().zip(&b).fold(0f64, |m, (x, y)| m.max((x - y).abs())) / scale)
}

fn load_fixture_model(dir: &Path, nf4: bool, device: &Device, dtype: DType) -> anyhow::Result<Model> {
    let cfg = ModelConfig::from_file(&dir.join("config.json"))?;
    let store = qdistill_common::weights::WeightStore::open(dir)?;
    #[allow(unused_mut)]
    let mut m = Model::load(&store, &cfg, &LoadOptions { keep_layers: None, nf4, double_quant: false, device: device.clone(), dtype })?;
    #[cfg(feature = "cuda")]
    m.upload_nf4()?;
    Ok(m)
}

fn fixture_io(dir: &Path, device: &Device) -> anyhow::Result<(std::collections::HashMap<String, Tensor>, Tensor, Tensor)> {
    let io = candle_core::safetensors::load(dir.join("io.safetensors"), &Device::Cpu)?;
    let ids = io.get("input_ids").ok_or_else(|| anyhow!("{}: no input_ids", dir.display()))?.to_dtype(DType::U32)?;
    let (b, t) = ids.dims2()?;
    let pos: Vec<u32> = (0..b).flat_map(|_| 0..t as u32).collect();
    let pos = Tensor::from_vec(pos, (b, t), device)?;
    Ok((io, ids.to_device(device)?, pos))
}

fn check_logits(dir: &Path, device: &Device, dtype: DType, tol: f64) -> anyhow::Result<(bool, String)> {
    let model = load_fixture_model(dir, false, device, dtype)?;
    let (io, ids, pos) = fixture_io(dir, device)?;
    let ctx = StepCtx { position_ids: &pos, segment_ids: None, lora: None, dropout_seed: None };
    let logits = model.logits(&model.forward_hidden(&ids, &ctx)?)?;
    let want = io.get("logits").ok_or_else(|| anyhow!("no logits"))?.reshape(logits.shape())?;
    let err = max_rel_err(&logits, &want)?;
    Ok((err < tol, format!("max |Δlogit|/max|logit| = {err:.2e} (tol {tol:.0e})")))
}

fn check_peft_grads(
    models: &Path,
    name: &str,
    base: &str,
    device: &Device,
    distill: bool,
    ckpt: bool,
    offload: bool,
) -> anyhow::Result<(bool, String)> {
    let dir = models.join(name);
    let acfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(dir.join("adapter_config.json"))?)?;
    let mut targets: Vec<String> = acfg["target_modules"]
        .as_array()
        .ok_or_else(|| anyhow!("adapter_config.json: target_modules"))?
        .iter()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    targets.sort();
    let spec = LoraSpec {
        r: acfg["r"].as_u64().ok_or_else(|| anyhow!("adapter_config.json: r"))? as usize,
        lora_alpha: acfg["lora_alpha"].as_f64().ok_or_else(|| anyhow!("adapter_config.json: lora_alpha"))?,
        lora_dropout: 0.0,
        use_rslora: acfg["use_rslora"].as_bool().unwrap_or(false),
        target_modules: targets,
    };
    let mut model = load_fixture_model(&models.join(base), false, device, DType::F32)?;
    model.set_activation_offloading(offload)?;
    let modules = model.attach_lora(&spec)?;
    let mut params = LoraParams::init(&spec, &modules, 0);
    let adapter: Vec<(String, Tensor)> = candle_core::safetensors::load(dir.join("adapter_model.safetensors"), &Device::Cpu)?.into_iter().collect();
    params.load_peft_tensors(&adapter, &dir)?;
    let (io, ids, pos) = fixture_io(&dir, device)?;
    let labels: Vec<i64> = io
        .get("labels")
        .ok_or_else(|| anyhow!("no labels"))?
        .to_vec2::<i64>()?
        .iter()
        .flat_map(|r| r[1..].iter().copied().chain(std::iter::once(-100)))
        .collect();
    let n_valid = labels.iter().filter(|&&l| l >= 0).count();
    let loss = if distill {
        LossConfig { ce_weight: 1.0, kd_weight: 0.5, kd: KdLoss::ForwardKl, temperature: 2.0, chunk_tokens: 5, student_softcap: None }
    } else {
        LossConfig {
            ce_weight: 1.0,
            kd_weight: 0.0,
            kd: KdLoss::ForwardKl,
            temperature: 1.0,
            chunk_tokens: 7,
            student_softcap: model.cfg.final_logit_softcapping,
        }
    };
    let lora = params.to_device(device, DType::F32)?;
    let ctx = StepCtx { position_ids: &pos, segment_ids: None, lora: Some(&lora), dropout_seed: None };
    let base_ctx = StepCtx { position_ids: &pos, segment_ids: None, lora: None, dropout_seed: None };
    let h_t = if distill { Some(model.forward_hidden(&ids, &base_ctx)?) } else { None };
    let (h, saved) = model.forward_train(&ids, &ctx, ckpt)?;
    let t_out = match &h_t {
        Some(h) => TeacherOutput::Hidden { h, lm_head: model.lm_head(), softcap: model.cfg.final_logit_softcapping },
        None => TeacherOutput::None,
    };
    let out = fused_linear_distill(&h, model.lm_head(), &labels, t_out, &loss, 1.0 / n_valid as f64)?;
    let mut grads = LoraGrads::zeros(&params);
    model.backward(&out.dh, saved, &ctx, &params, &mut grads)?;
    let got_loss = (loss.ce_weight * out.ce_sum + loss.kd_weight * loss.temperature.powi(2) * out.kd_sum) / n_valid as f64;
    let key = if distill { "distill_loss" } else { "loss_ce" };
    let want_loss = io.get(key).ok_or_else(|| anyhow!("no {key}"))?.to_vec1::<f32>()?[0] as f64;
    let loss_err = (got_loss - want_loss).abs() / want_loss.abs().max(1.0);
    let file = if distill { "grads_distill.safetensors" } else { "grads_ce.safetensors" };
    let want = candle_core::safetensors::load(dir.join(file), &Device::Cpu)?;
    let r = params.spec.r;
    let mut worst = 0f64;
    for e in &params.entries {
        for (pname, off, shape) in
            [(e.peft_a_name(), e.a_offset, (r, e.in_features)), (e.peft_b_name(), e.b_offset, (e.out_features, r))]
        {
            let n = shape.0 * shape.1;
            let got = Tensor::from_slice(&grads.flat[off..off + n], shape, &Device::Cpu)?;
            let w = want.get(&pname).ok_or_else(|| anyhow!("{file} has no {pname}"))?;
            worst = worst.max(max_rel_err(&got, w)?);
        }
    }
    let tol = 1e-4;
    Ok((worst < tol && loss_err < 1e-5, format!("loss rel err {loss_err:.1e}; worst grad rel err {worst:.2e} (tol {tol:.0e})")))
}

/// Rows gathered by host threads into pinned staging and copied over equal candle's
/// `index_select` on the device, bit for bit (bf16 and f32, repeated ids, twice in a row so
/// the staging is reused).
#[cfg(feature = "cuda")]
fn check_host_gather(device: &Device) -> anyhow::Result<(bool, String)> {
    let Device::Cuda(dev) = device else { anyhow::bail!("not a CUDA device") };
    let mut off = qdistill_common::kernels::offload::HostOffload::new(dev)?;
    let mut all_same = true;
    for dtype in [DType::BF16, DType::F32] {
        let table = Tensor::randn(0f32, 1.0, (5003, 136), &Device::Cpu)?.to_dtype(dtype)?;
        let on_device = table.to_device(device)?;
        for seed in 0..2u32 {
            let ids: Vec<u32> = (0..4099u32).map(|i| (i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 7) % 5003).collect();
            let got = off.gather_rows(&table, &ids)?;
            let want = on_device.index_select(&Tensor::from_vec(ids.clone(), ids.len(), device)?, 0)?;
            all_same &= crate::selftest_fused::same_bits(&got, &want)?;
        }
    }
    Ok((all_same, format!("4099 ids into a [5003, 136] table, bf16 and f32, staging reused: identical {all_same}")))
}

fn check_nf4_model(dir: &Path, device: &Device) -> anyhow::Result<(bool, String)> {
    let gpu = load_fixture_model(dir, true, device, DType::F32)?;
    let cpu = load_fixture_model(dir, true, &Device::Cpu, DType::F32)?;
    let (_, ids, pos) = fixture_io(dir, device)?;
    let (_, ids_c, pos_c) = fixture_io(dir, &Device::Cpu)?;
    let zg = gpu.logits(&gpu.forward_hidden(&ids, &StepCtx { position_ids: &pos, segment_ids: None, lora: None, dropout_seed: None })?)?;
    let zc = cpu.logits(&cpu.forward_hidden(&ids_c, &StepCtx { position_ids: &pos_c, segment_ids: None, lora: None, dropout_seed: None })?)?;
    let err = max_rel_err(&zg, &zc)?;
    let resident = gpu.base_memory_bytes();
    Ok((err < 1e-5, format!("max rel err {err:.2e} (tol 1e-5); base {resident} bytes")))
}

#[cfg(feature = "cuda")]
fn check_nf4_kernel(device: &Device, rows: usize, cols: usize, dq: bool) -> anyhow::Result<(bool, String)> {
    use qdistill_common::kernels::CudaNf4;
    use qdistill_common::nf4::Nf4Tensor;
    let cuda = qdistill_common::kernels::cuda_device(device)?;
    let w = pseudo_normal(rows * cols, 0.02, (rows * cols) as u64);
    let q = Nf4Tensor::quantize(&w, rows, cols, dq)?;
    let want = q.dequantize();
    let g = CudaNf4::upload(&q, device)?;
    // Poisoned outputs: an element the kernel skips stays NaN and fails the comparison.
    let mut out32 = cuda.clone_htod(&vec![f32::NAN; want.len()])?;
    g.dequantize_into(&mut out32)?;
    let got32 = cuda.clone_dtoh(&out32)?;
    let bad32 = got32.iter().zip(&want).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
    let mut out16 = cuda.clone_htod(&vec![qdistill_common::kernels::bf16::NAN; want.len()])?;
    g.dequantize_into(&mut out16)?;
    let got16 = cuda.clone_dtoh(&out16)?;
    let bad16 = got16.iter().zip(&want).filter(|(a, b)| a.to_bits() != qdistill_common::kernels::bf16::from_f32(**b).to_bits()).count();
    Ok((bad32 == 0 && bad16 == 0, format!("{bad32} f32 and {bad16} bf16 of {} elements differ bitwise", want.len())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_model_has_the_shapes_and_scale_of_a_loaded_one() {
        // The fixture's config through both constructors: same tensors, same bytes.
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models/llama");
        let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
        let store = qdistill_common::weights::WeightStore::open(&dir).unwrap();
        let opts = LoadOptions { keep_layers: None, nf4: false, double_quant: false, device: Device::Cpu, dtype: DType::F32 };
        let loaded = Model::load(&store, &cfg, &opts).unwrap();
        let random = Model::random(&cfg, &opts, 7).unwrap();
        assert_eq!(random.base_memory_bytes(), loaded.base_memory_bytes());
        assert_eq!(random.lm_head().dims(), loaded.lm_head().dims());
        // N(0, 0.02²) as specified: the sample std of the LM head is within 2% of 0.02.
        let v = random.lm_head().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        let std = (v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64).sqrt();
        assert!((std - 0.02).abs() < 0.0004 && mean.abs() < 0.001, "std {std}, mean {mean}");
        // Same seed, same model; another seed, another model.
        let again = Model::random(&cfg, &opts, 7).unwrap();
        let other = Model::random(&cfg, &opts, 8).unwrap();
        let head = |m: &Model| m.lm_head().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(head(&again), v);
        assert_ne!(head(&other), v);
    }

    #[test]
    fn random_nf4_model_matches_a_quantized_load_in_size_and_runs() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/models/llama");
        let cfg = ModelConfig::from_file(&dir.join("config.json")).unwrap();
        let store = qdistill_common::weights::WeightStore::open(&dir).unwrap();
        for dq in [false, true] {
            let opts = LoadOptions { keep_layers: None, nf4: true, double_quant: dq, device: Device::Cpu, dtype: DType::F32 };
            // The quantizer of nf4.rs (checked against bitsandbytes) sets the expected size.
            let loaded = Model::load(&store, &cfg, &opts).unwrap();
            let random = Model::random(&cfg, &opts, 3).unwrap();
            assert_eq!(random.base_memory_bytes(), loaded.base_memory_bytes(), "double_quant={dq}");
            let ids = Tensor::new(&[[1u32, 2, 3, 4]], &Device::Cpu).unwrap();
            let pos = Tensor::new(&[[0u32, 1, 2, 3]], &Device::Cpu).unwrap();
            let h = random
                .forward_hidden(&ids, &StepCtx { position_ids: &pos, segment_ids: None, lora: None, dropout_seed: None })
                .unwrap();
            let z = random.logits(&h).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(z.len(), 4 * cfg.vocab_size);
            assert!(z.iter().all(|x| x.is_finite()));
        }
    }

    #[test]
    fn bench_shapes_parse_as_llama_configs() {
        let c = ModelShape::Llama8B.config().unwrap();
        assert_eq!((c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.head_dim), (4096, 14336, 32, 128));
        // Llama-3-8B has 8.03 B parameters (HF's count, norms included: +0.27 M).
        assert!((model_params(&c) - 8.0303e9).abs() < 1e6, "{}", model_params(&c));
        let c = ModelShape::Llama1B.config().unwrap();
        // Llama-3.2-1B: 1.236 B parameters with tied embeddings.
        assert!((model_params(&c) - 1.2358e9).abs() < 1e6, "{}", model_params(&c));
    }

    #[test]
    fn harness_runs_every_case_kind_on_cpu() {
        let mut spec = BenchSpec::standard(Device::Cpu, &[ModelShape::Tiny]);
        spec.cases.retain(|c| !matches!(c, BenchCase::FusedKl { .. } | BenchCase::Copy { .. } | BenchCase::Matmul { .. } | BenchCase::KernelReport { .. }));
        for candle in [false, true] {
            spec.cases.push(BenchCase::FusedKl { tokens: 16, vocab: 96, hidden: 32, chunk_tokens: 5, candle });
        }
        spec.cases.push(BenchCase::Matmul { n: 32 });
        spec.cases.push(BenchCase::BlockProfile { shape: ModelShape::Tiny, batch: 2, seq: 8 });
        spec.iters = 1;
        let report = run_bench(&spec).unwrap();
        for r in &report.rows {
            let nf4_kernel = r.case.starts_with("nf4 dequant");
            // The NF4 kernel row fails without a GPU; every other case must run.
            assert_eq!(r.ok, !nf4_kernel, "{}: {}", r.case, r.note);
            if r.unit == "tok/s" {
                assert!(r.value > 0.0);
            }
        }
        assert_eq!(report.rows.len(), spec.cases.len(), "one row per case on a CPU");
    }
}
