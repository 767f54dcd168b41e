//! A worker's (or the embedded run's) Prometheus metrics, labelled with its role and
//! rank, and the tracing target of the per-step phase spans.
//!
//! The metrics are process-wide: the CLI installs them once (`--metrics-addr`) and the
//! training loops report through [`get`], which is None, and every report a no-op, when
//! nothing was installed. That keeps the hooks in the loops to one line each.

use std::sync::atomic::AtomicU64;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use candle_core::Device;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// The tracing target of the step-phase spans (`data`, `teacher_forward`, `transfer`,
/// `student_forward_backward`, `allreduce`, `optimizer`, `checkpoint`, inside `step`).
/// The log output filters it out and only the OTLP exporter enables it, so without an
/// exporter the spans are disabled at their call sites and cost one atomic load each.
pub const PHASE_TARGET: &str = "qdistill::phase";

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RoleLabels {
    role: String,
    rank: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MemoryLabels {
    role: String,
    rank: String,
    /// "peak" (the pool's high-water mark, torch's max_memory_allocated) or "in_use".
    kind: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// What one optimizer step reports.
#[derive(Debug, Clone, Copy, Default)]
pub struct StepReport {
    /// Steps done (the step just finished + 1, as metrics.jsonl numbers them).
    pub step: u64,
    pub loss: f64,
    pub kd_loss: f64,
    /// Tokens (padding excluded) this process trained in the step.
    pub tokens: u64,
    /// Samples this process trained in the step.
    pub samples: u64,
}

pub struct WorkerMetrics {
    labels: Mutex<RoleLabels>,
    step: Family<RoleLabels, Gauge>,
    loss: Family<RoleLabels, FloatGauge>,
    kd_loss: Family<RoleLabels, FloatGauge>,
    tokens_per_second: Family<RoleLabels, FloatGauge>,
    samples_done: Family<RoleLabels, Counter>,
    generation: Family<RoleLabels, Gauge>,
    checkpoint_age: Family<RoleLabels, FloatGauge>,
    gpu_memory: Family<MemoryLabels, Gauge>,
    /// When the previous step ended, for tokens/s of the step alone.
    last_step: Mutex<Option<Instant>>,
    last_checkpoint: Mutex<Option<Instant>>,
}

static GLOBAL: OnceLock<WorkerMetrics> = OnceLock::new();

/// Registers this process's worker metrics in `registry` under `role` (worker metrics
/// start as "worker" until the coordinator assigns a role). The first call wins; a second
/// returns None.
pub fn install(registry: &mut Registry, role: &str) -> Option<&'static WorkerMetrics> {
    let mut fresh = false;
    let m = GLOBAL.get_or_init(|| {
        fresh = true;
        WorkerMetrics::new(role)
    });
    if !fresh {
        return None;
    }
    registry.register("qdistill_step", "Optimizer steps this process finished", m.step.clone());
    registry.register("qdistill_loss", "Training loss of the last step (ce_weight*CE + kd_weight*T^2*KD)", m.loss.clone());
    registry.register("qdistill_kd_loss", "Distillation term of the last step, per target token", m.kd_loss.clone());
    registry.register("qdistill_tokens_per_second", "Tokens (padding excluded) per second in the last step", m.tokens_per_second.clone());
    registry.register("qdistill_samples_done", "Samples this process trained", m.samples_done.clone());
    registry.register("qdistill_generation", "The worker group generation this process trains in", m.generation.clone());
    registry.register("qdistill_checkpoint_age_seconds", "Seconds since this process last saved or uploaded a checkpoint", m.checkpoint_age.clone());
    registry.register("qdistill_gpu_memory_bytes", "CUDA memory pool use of the training device", m.gpu_memory.clone());
    Some(m)
}

/// Installs the worker metrics and serves them at `http://<addr>/metrics` until the
/// returned server is dropped.
pub fn serve(addr: &str, role: &str) -> Result<qdistill_coordinator::metrics::MetricsServer, qdistill_coordinator::CoordError> {
    let mut registry = Registry::default();
    install(&mut registry, role);
    qdistill_coordinator::metrics::MetricsServer::start(addr, registry)
}

/// The installed metrics, if any.
pub fn get() -> Option<&'static WorkerMetrics> {
    GLOBAL.get()
}

impl WorkerMetrics {
    fn new(role: &str) -> Self {
        Self {
            labels: Mutex::new(RoleLabels { role: role.into(), rank: "0".into() }),
            step: Family::default(),
            loss: Family::default(),
            kd_loss: Family::default(),
            tokens_per_second: Family::default(),
            samples_done: Family::default(),
            generation: Family::default(),
            checkpoint_age: Family::default(),
            gpu_memory: Family::default(),
            last_step: Mutex::new(None),
            last_checkpoint: Mutex::new(None),
        }
    }

    fn labels(&self) -> RoleLabels {
        self.labels.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// A new assignment: series of the previous role/rank are dropped, so a scrape never
    /// shows a worker under two ranks.
    pub fn set_role(&self, role: &str, rank: usize, generation: u64) {
        let labels = RoleLabels { role: role.into(), rank: rank.to_string() };
        let mut current = self.labels.lock().unwrap_or_else(|p| p.into_inner());
        if *current != labels {
            self.step.clear();
            self.loss.clear();
            self.kd_loss.clear();
            self.tokens_per_second.clear();
            self.samples_done.clear();
            self.generation.clear();
            self.checkpoint_age.clear();
            self.gpu_memory.clear();
            *current = labels.clone();
        }
        drop(current);
        self.generation.get_or_create(&labels).set(generation as i64);
        *self.last_step.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }

    /// Marks the start of training (model loading is not a step's time).
    pub fn start_steps(&self) {
        *self.last_step.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }

    /// One optimizer step finished; `device` is read for its memory pool on CUDA.
    pub fn record_step(&self, r: &StepReport, device: &Device) {
        let l = self.labels();
        let now = Instant::now();
        let elapsed = self.last_step.lock().unwrap_or_else(|p| p.into_inner()).replace(now).map(|t| (now - t).as_secs_f64());
        self.step.get_or_create(&l).set(r.step as i64);
        self.loss.get_or_create(&l).set(r.loss);
        self.kd_loss.get_or_create(&l).set(r.kd_loss);
        if let Some(s) = elapsed.filter(|&s| s > 0.0) {
            self.tokens_per_second.get_or_create(&l).set(r.tokens as f64 / s);
        }
        self.samples_done.get_or_create(&l).inc_by(r.samples);
        if let Some(t) = *self.last_checkpoint.lock().unwrap_or_else(|p| p.into_inner()) {
            self.checkpoint_age.get_or_create(&l).set(t.elapsed().as_secs_f64());
        }
        if let Some((peak, used)) = gpu_memory(device) {
            for (kind, v) in [("peak", peak), ("in_use", used)] {
                let ml = MemoryLabels { role: l.role.clone(), rank: l.rank.clone(), kind: kind.into() };
                self.gpu_memory.get_or_create(&ml).set(v as i64);
            }
        }
    }

    /// A checkpoint was written (or uploaded) just now.
    pub fn record_checkpoint(&self) {
        *self.last_checkpoint.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        self.checkpoint_age.get_or_create(&self.labels()).set(0.0);
    }
}

/// The CUDA memory pool's high-water mark and current use; None on a CPU.
fn gpu_memory(device: &Device) -> Option<(u64, u64)> {
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        let pool = qdistill_common::kernels::MemPool::of(device).ok()?;
        return Some((pool.peak_used().ok()?, pool.used().ok()?));
    }
    let _ = device;
    None
}
