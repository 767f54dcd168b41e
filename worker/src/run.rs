//! The embedded single-process run: teacher and student roles in one process, driven
//! step by step. Everything that can be wrong with the inputs (config, model files,
//! tokenizers, data) is checked before `output_dir` is touched, so a failed start leaves
//! nothing behind.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Device};
use indicatif::{ProgressBar, ProgressStyle};
use qdistill_common::checkpoint::{
    checkpoint_dir, latest_checkpoint, load_adapter, load_optimizer, rotate_checkpoints, save_adapter, save_optimizer,
    write_dir_atomically, AdapterConfig, TrainerState,
};
use qdistill_common::data::{Batcher, DataCursor};
use qdistill_common::config::{
    self, ComputeDtype, DistillLoss, LrSchedulerType, Optim, Quantization, ReportTo, ResumeFromCheckpoint, SaveStrategy,
    TeacherMode, TrainConfig,
};
use qdistill_common::lora::{LoraGrads, LoraParams, LoraSpec};
use qdistill_common::loss::{KdLoss, LossConfig};
use qdistill_common::optim::{lr_at, AdamW, AdamWConfig, SchedulerType};
use qdistill_common::optim8bit::MIN_8BIT_SIZE;
use qdistill_common::tensorboard::EventWriter;
use qdistill_common::teacher_cache::CacheReader;
use qdistill_common::tokenizer::{check_same_tokenizer, TokenizerInfo};

use crate::data_plan::{self, DataPlan};
use crate::metrics::{self, PHASE_TARGET};
use crate::gkd::{self, Completions, GkdSettings};
use crate::models;
use crate::teacher_cache;
use crate::trainer::{
    dropout_seed, teacher_head, teacher_hidden, teacher_topk, DeviceBatch, LossSums, Student, Teacher, TeacherBatch, Throughput,
    TopKBatch, TopKSpec,
};

/// What a finished run reports.
pub struct TrainSummary {
    pub steps: usize,
    /// Tokens processed (padding excluded) and, of those, tokens with a training target.
    pub tokens: usize,
    pub target_tokens: usize,
    pub seconds: f64,
    pub eval_before: Option<LossSums>,
    pub eval_after: Option<LossSums>,
    /// The same on held-out rehearsal data: how much general ability was kept.
    pub rehearsal_before: Option<LossSums>,
    pub rehearsal_after: Option<LossSums>,
    pub last_loss: f64,
    pub output: PathBuf,
    pub base_bytes: usize,
    /// Optimizer state (AdamW moments; 8-bit codes and absmax with `adamw_8bit`).
    pub optimizer_state_bytes: usize,
}

impl TrainSummary {
    /// What `all_results.json` holds (HF Trainer's name for the run's closing numbers):
    /// throughput and the held-out / rehearsal CE and KL at T = 1 before and after.
    pub fn results_json(&self) -> serde_json::Value {
        let eval = |e: &Option<LossSums>| e.map(|e| serde_json::json!({ "ce": e.ce_mean(), "kl": e.kd_mean(), "tokens": e.tokens }));
        serde_json::json!({
            "steps": self.steps, "tokens": self.tokens, "target_tokens": self.target_tokens,
            "train_runtime": self.seconds, "train_tokens_per_second": self.tokens as f64 / self.seconds.max(1e-9),
            "train_loss": self.last_loss,
            "eval_before": eval(&self.eval_before), "eval_after": eval(&self.eval_after),
            "rehearsal_before": eval(&self.rehearsal_before), "rehearsal_after": eval(&self.rehearsal_after),
            "optimizer_state_bytes": self.optimizer_state_bytes,
        })
    }

    pub fn table(&self) -> String {
        let mut s = String::new();
        s.push_str(&format!(
            "steps {} · {} tokens ({} trained) · {:.1} s · {:.0} tok/s\n",
            self.steps,
            self.tokens,
            self.target_tokens,
            self.seconds,
            self.tokens as f64 / self.seconds.max(1e-9)
        ));
        s.push_str(&format!("student base weights in memory: {:.1} MiB\n", self.base_bytes as f64 / (1 << 20) as f64));
        s.push_str(&format!("optimizer state: {:.2} MiB\n", self.optimizer_state_bytes as f64 / (1 << 20) as f64));
        let mut rows = Vec::new();
        if let (Some(b), Some(a)) = (&self.eval_before, &self.eval_after) {
            rows.push(("held-out", b, a));
        }
        if let (Some(b), Some(a)) = (&self.rehearsal_before, &self.rehearsal_after) {
            rows.push(("rehearsal", b, a));
        }
        if !rows.is_empty() {
            s.push_str("eval (T = 1)                      before      after\n");
        }
        for (name, b, a) in rows {
            s.push_str(&format!("{name:<10} CE (nats/token)      {:>9.4} {:>10.4}\n", b.ce_mean(), a.ce_mean()));
            if b.kd != 0.0 || a.kd != 0.0 {
                s.push_str(&format!("{name:<10} KL(teacher‖student) {:>9.4} {:>10.4}\n", b.kd_mean(), a.kd_mean()));
            }
        }
        s.push_str(&format!("final train loss {:.4}\nadapter: {}", self.last_loss, self.output.display()));
        s
    }
}

fn device_of(d: config::Device) -> anyhow::Result<Device> {
    Ok(match d {
        config::Device::Cpu => Device::Cpu,
        config::Device::Cuda(i) => Device::new_cuda(i).with_context(|| format!("opening cuda:{i} (is this binary built with --features cuda?)"))?,
    })
}

fn dtype_of(d: ComputeDtype) -> DType {
    match d {
        ComputeDtype::F32 => DType::F32,
        ComputeDtype::BF16 => DType::BF16,
    }
}

fn scheduler(k: LrSchedulerType) -> SchedulerType {
    match k {
        LrSchedulerType::Linear => SchedulerType::Linear,
        LrSchedulerType::Cosine => SchedulerType::Cosine,
        LrSchedulerType::Constant => SchedulerType::Constant,
        LrSchedulerType::ConstantWithWarmup => SchedulerType::ConstantWithWarmup,
    }
}

pub fn loss_config(cfg: &TrainConfig) -> LossConfig {
    LossConfig {
        ce_weight: cfg.distill.ce_weight,
        kd_weight: cfg.distill.kd_weight,
        kd: match cfg.distill.loss {
            DistillLoss::ForwardKl => KdLoss::ForwardKl,
            DistillLoss::ReverseKl => KdLoss::ReverseKl,
            DistillLoss::Jsd => KdLoss::Jsd { beta: cfg.distill.beta },
        },
        temperature: cfg.distill.temperature,
        chunk_tokens: cfg.distill.chunk_tokens,
        student_softcap: None,
    }
}

/// Loads the job's models and data; nothing is written.
pub struct Prepared {
    pub student: Student,
    pub teacher: Teacher,
    pub data: DataPlan,
    pub device: Device,
}

/// The models and data of a cluster student: the teacher's outputs arrive as hidden states
/// or top-K log-probabilities.
pub fn prepare(cfg: &TrainConfig) -> anyhow::Result<Prepared> {
    check_cluster_config(cfg)?;
    Ok(prepare_embedded(cfg)?.0)
}

/// Refuses what only the single-process `qdistill train` does, so that a cluster run never
/// ignores a setting: the coordinator checks it at start, every student again.
pub fn check_cluster_config(cfg: &TrainConfig) -> anyhow::Result<()> {
    if cfg.teacher.cache.is_some() || cfg.distill.lmbda > 0.0 || cfg.distill.seq_kd {
        bail!(
            "`teacher.cache`, `distill.lmbda` and `distill.seq_kd` are supported by the single-process \
             `qdistill train` only; remove them for a cluster run"
        );
    }
    let strategy = match cfg.training.save_strategy {
        SaveStrategy::Steps => None,
        SaveStrategy::Epoch => Some("epoch"),
        SaveStrategy::No => Some("no"),
    };
    if let Some(s) = strategy {
        bail!(
            "`training.save_strategy` = \"{s}\": a cluster run checkpoints at the coordinator's save points, every \
             `training.save_steps` steps; use \"steps\" (an adapter per epoch is a `qdistill train` feature)"
        );
    }
    Ok(())
}

/// Loads the job's models and data for `qdistill train` (nothing is written), and returns
/// the student's tokenizer with them. With `teacher.cache` no teacher model is loaded.
pub fn prepare_embedded(cfg: &TrainConfig) -> anyhow::Result<(Prepared, TokenizerInfo)> {
    if matches!(cfg.teacher.output, config::TeacherOutput::Logits) && cfg.teacher.mode != TeacherMode::None {
        bail!(
            "teacher.output = \"logits\": a single-process run hands the teacher's final hidden states to the fused \
             loss directly (the same numbers, without materialising logits); use \"hidden\" or \"topk:K\""
        );
    }
    let device = device_of(cfg.device)?;
    let dtype = dtype_of(cfg.model.compute_dtype);
    let student_path = config::resolve_model_path(&cfg.model.model_name_or_path, cfg.model.revision.as_deref(), None)?;
    let nf4 = cfg.model.quantization == Quantization::Nf4;
    tracing::info!(model = %student_path.display(), keep_layers = ?cfg.model.keep_layers, nf4, "loading student");
    let mut student = models::load_student(cfg, &student_path, &device, dtype)?;
    let teacher = match cfg.teacher.mode {
        // The cache stands in for the teacher: no weights to load.
        _ if cfg.teacher.cache.is_some() => Teacher::None,
        TeacherMode::Model => {
            let spec = cfg.teacher.model_name_or_path.as_deref().unwrap_or(&cfg.model.model_name_or_path);
            let path = config::resolve_model_path(spec, None, None)?;
            tracing::info!(model = %path.display(), "loading teacher");
            // One device handle per GPU: a second handle to the same card would be another
            // stream, and every hidden state would be copied for nothing.
            let teacher_device = if cfg.teacher_device == cfg.device { device.clone() } else { device_of(cfg.teacher_device)? };
            tracing::info!(device = %cfg.teacher_device, "teacher device");
            let mut t = models::load_teacher(cfg, &path, None, &teacher_device, dtype)?;
            t.model.place_lm_head(&device)?;
            check_same_tokenizer(&t.tokenizer, &student.tokenizer).with_context(|| {
                format!("teacher {} and student {} must share one tokenizer", path.display(), student_path.display())
            })?;
            Teacher::Model(t.model)
        }
        TeacherMode::Lwf => Teacher::Lwf,
        TeacherMode::None => Teacher::None,
    };
    let spec = LoraSpec {
        r: cfg.lora.r,
        lora_alpha: cfg.lora.lora_alpha,
        lora_dropout: cfg.lora.lora_dropout,
        use_rslora: cfg.lora.use_rslora,
        target_modules: cfg.lora.target_modules.names(),
    };
    student.model.set_activation_offloading(cfg.training.activation_offloading && cfg.training.gradient_checkpointing)?;
    let modules = student.model.attach_lora(&spec)?;
    let mut params = LoraParams::init(&spec, &modules, cfg.seed);
    if let Some(dir) = &cfg.model.adapter_name_or_path {
        start_from_adapter(&mut params, dir)?;
    }
    let data = data_plan::build(cfg, &student.tokenizer)?;
    let mut loss = loss_config(cfg);
    loss.student_softcap = student.model.cfg.final_logit_softcapping;
    if cfg.teacher.mode == TeacherMode::None {
        loss.kd_weight = 0.0;
    }
    let t = &cfg.training;
    let adamw = AdamWConfig { beta1: t.adam_beta1, beta2: t.adam_beta2, eps: t.adam_epsilon, weight_decay: t.weight_decay };
    let opt = match t.optim {
        Optim::AdamW => AdamW::new(params.len(), adamw),
        Optim::AdamW8bit => {
            // bitsandbytes quantizes each parameter tensor on its own: lora_A [r, in], lora_B [out, r].
            let r = params.spec.r;
            let lens: Vec<usize> = params.entries.iter().flat_map(|e| [r * e.in_features, e.out_features * r]).collect();
            AdamW::new_8bit(&lens, MIN_8BIT_SIZE, adamw)
        }
    };
    tracing::info!(optim = ?t.optim, state_bytes = opt.state_bytes(), params = params.len(), "optimizer");
    let grads = LoraGrads::zeros(&params);
    let prepared = Prepared {
        student: Student { model: student.model, params, grads, opt, loss, checkpointing: t.gradient_checkpointing },
        teacher,
        data,
        device,
    };
    Ok((prepared, student.tokenizer))
}

/// How `teacher.output = "topk:K"` is taken live: over the first min(student, teacher)
/// vocabulary entries, as the full-distribution loss does (None for other outputs).
pub fn live_topk_spec(cfg: &TrainConfig, teacher: &Teacher, student: &Student) -> Option<TopKSpec> {
    let config::TeacherOutput::TopK(k) = cfg.teacher.output else { return None };
    let teacher_vocab = match teacher {
        Teacher::Model(m) => m.cfg.vocab_size,
        Teacher::Lwf => student.model.cfg.vocab_size,
        Teacher::None => return None,
    };
    Some(TopKSpec {
        k,
        temperature: cfg.distill.temperature,
        vocab: student.model.cfg.vocab_size.min(teacher_vocab),
        dtype: teacher_cache::value_dtype(cfg.teacher.topk_dtype),
        chunk_tokens: cfg.distill.chunk_tokens,
    })
}

/// The teacher's outputs for one micro-batch: read from the cache, or computed live as
/// hidden states or top-K.
pub fn teacher_batch(
    teacher: &Teacher,
    student: &Student,
    b: &DeviceBatch,
    topk: Option<&TopKSpec>,
    cache: Option<&mut CacheReader<'_>>,
) -> anyhow::Result<TeacherBatch> {
    let device = student.model.device();
    if let Some(reader) = cache {
        let rows = reader.next_rows(b.n_target)?;
        return Ok(TeacherBatch::TopK(TopKBatch::new(&rows, b, device)?));
    }
    let h = teacher_hidden(teacher, &student.model, b)?;
    Ok(match (topk, h, teacher_head(teacher, &student.model)) {
        (Some(spec), Some(h), Some((head, softcap))) => {
            let rows = teacher_topk(&h, head, softcap, &b.labels, spec)?;
            TeacherBatch::TopK(TopKBatch::new(&rows, b, device)?)
        }
        (_, h, _) => TeacherBatch::Hidden(h),
    })
}

/// Replaces the fresh initialisation of `params` by a saved PEFT adapter (continued
/// training, or a shared starting point for comparing trainers). The adapter must have the
/// config's rank and scaling: a different alpha would silently rescale what it learned.
fn start_from_adapter(params: &mut LoraParams, dir: &Path) -> anyhow::Result<()> {
    let (acfg, tensors) = load_adapter(dir).with_context(|| format!("model.adapter_name_or_path = {}", dir.display()))?;
    let spec = &params.spec;
    if acfg.r != spec.r || acfg.lora_alpha != spec.lora_alpha || acfg.use_rslora != spec.use_rslora {
        bail!(
            "model.adapter_name_or_path = {}: the adapter has r={}, lora_alpha={}, use_rslora={} but the config \
             asks for r={}, lora_alpha={}, use_rslora={}; set [lora] to the adapter's values",
            dir.display(),
            acfg.r,
            acfg.lora_alpha,
            acfg.use_rslora,
            spec.r,
            spec.lora_alpha,
            spec.use_rslora
        );
    }
    params.load_peft_tensors(&tensors, &dir.join("adapter_model.safetensors"))?;
    tracing::info!(dir = %dir.display(), "starting from a saved adapter");
    Ok(())
}

/// `qdistill train`: load, train, evaluate, save.
pub fn train(config_path: &Path, overrides: &[String], progress: bool) -> anyhow::Result<TrainSummary> {
    let cfg = config::load(config_path, overrides)?;
    let (Prepared { mut student, teacher, data, device }, tok) = prepare_embedded(&cfg)?;
    let t = &cfg.training;
    let total_steps = data.total_steps(t.max_steps, t.num_train_epochs, t.gradient_accumulation_steps)?;
    if total_steps == 0 {
        bail!("the data gives no optimizer step (check train_file, max_samples and batch sizes)");
    }
    let cache = match &cfg.teacher.cache {
        Some(_) => Some(teacher_cache::open_for_run(&cfg, &tok, student.model.cfg.vocab_size, &data, total_steps)?),
        None => None,
    };
    let topk = live_topk_spec(&cfg, &teacher, &student);
    let gkd = GkdSettings::from_config(&cfg, &tok)?;
    let warmup = t.num_warmup_steps(total_steps);

    let adapter_cfg = AdapterConfig::new(Some(cfg.model.model_name_or_path.clone()), &cfg.lora);
    let resolved = cfg.to_toml_string()?;
    let (start_step, mut stream, mut log_history) = match &t.resume_from_checkpoint {
        Some(r) => resume(&cfg, r, &mut student, &data)?,
        None => (0, data.train_stream()?, Vec::new()),
    };

    // Inputs are valid: from here on we write.
    std::fs::create_dir_all(&cfg.output_dir).with_context(|| format!("creating {}", cfg.output_dir.display()))?;
    let metrics_path = cfg.output_dir.join("metrics.jsonl");
    // A resumed run appends, so metrics.jsonl keeps one line per step across restarts.
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(start_step > 0)
        .write(true)
        .truncate(start_step == 0)
        .open(&metrics_path)
        .with_context(|| format!("opening {}", metrics_path.display()))?;
    // A resumed run starts a new event file; TensorBoard merges the files of one dir.
    let mut tb = match t.report_to.contains(&ReportTo::TensorBoard) {
        true => Some(EventWriter::create(&t.logging_dir)?),
        false => None,
    };

    let mut cache_reader =
        cache.as_ref().map(|c| c.reader((start_step * t.gradient_accumulation_steps) as u64)).transpose()?;

    let eval_batches: Vec<DeviceBatch> = data.eval.iter().map(|b| DeviceBatch::new(b, &device)).collect::<Result<_, _>>()?;
    let reh_batches: Vec<DeviceBatch> =
        data.eval_rehearsal.iter().map(|b| DeviceBatch::new(b, &device)).collect::<Result<_, _>>()?;
    let evaluate = |student: &Student, batches: &[DeviceBatch], what: &str| -> anyhow::Result<Option<LossSums>> {
        if batches.is_empty() {
            return Ok(None);
        }
        let e = student.evaluate(batches, &teacher)?;
        tracing::info!(ce = e.ce_mean(), kl = e.kd_mean(), tokens = e.tokens, "eval {what}");
        Ok(Some(e))
    };
    let eval_before = evaluate(&student, &eval_batches, "held-out, before training")?;
    let rehearsal_before = evaluate(&student, &reh_batches, "rehearsal, before training")?;
    if let Some(tb) = &mut tb {
        tb_eval(tb, start_step, "eval", eval_before.as_ref())?;
        tb_eval(tb, start_step, "eval_rehearsal", rehearsal_before.as_ref())?;
    }

    let bar = if progress { ProgressBar::new(total_steps as u64) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}<{eta_precise}] {bar:30} {pos}/{len} steps · {msg}")
            .expect("static template"),
    );
    bar.set_position(start_step as u64);
    let n_train = data.train.len() as f64;
    let mut thr = Throughput::new();
    let started = Instant::now();
    let mut last_loss = f64::NAN;
    let mut target_tokens = 0usize;
    let mut tokens = 0usize;
    metrics::get().inspect(|m| m.start_steps());
    for step in start_step..total_steps {
        let epoch_at_start = stream.cursor().epoch;
        let _step_span = tracing::info_span!(target: PHASE_TARGET, "step", step = step + 1).entered();
        let mut samples = 0u64;
        // All completions of a step are generated before its first backward: they see the
        // same adapters (as in TRL, where the optimizer steps only after accumulation), and
        // the loss is normalised by the target tokens actually trained.
        let mut generated = 0usize;
        let mut micro = Vec::with_capacity(t.gradient_accumulation_steps);
        {
            let _s = tracing::info_span!(target: PHASE_TARGET, "data").entered();
            for k in 0..t.gradient_accumulation_steps {
                let b = stream.next_batch();
                samples += b.sample_ids.len() as u64;
                let b = match &gkd {
                    Some(g) => {
                        let (b, which) = gkd::micro_batch(g, &student, &teacher, &b, step as u64, k as u64)?;
                        generated += usize::from(which != Completions::Dataset);
                        b
                    }
                    None => b,
                };
                micro.push(DeviceBatch::new(&b, &device)?);
            }
        }
        let n_target: usize = micro.iter().map(|b| b.n_target).sum();
        let mut sums = LossSums::default();
        for (k, b) in micro.iter().enumerate() {
            let t_out = tracing::info_span!(target: PHASE_TARGET, "teacher_forward").in_scope(|| teacher_batch(&teacher, &student, b, topk.as_ref(), cache_reader.as_mut()))?;
            let _s = tracing::info_span!(target: PHASE_TARGET, "student_forward_backward").entered();
            let s = student.micro_step_with(b, &teacher, &t_out, 1.0 / n_target.max(1) as f64, dropout_seed(cfg.seed, step as u64, k as u64))?;
            sums.add(&s);
        }
        let lr = lr_at(scheduler(t.lr_scheduler_type), t.learning_rate, step as u64, warmup as u64, total_steps as u64);
        let grad_norm = tracing::info_span!(target: PHASE_TARGET, "optimizer").in_scope(|| student.optimizer_step(lr, t.max_grad_norm))?;
        let kd_term = student.loss.kd_weight * student.loss.temperature.powi(2) * sums.kd_mean();
        last_loss = student.loss.ce_weight * sums.ce_mean() + kd_term;
        target_tokens += sums.tokens;
        let step_tokens: usize = micro.iter().map(|b| b.n_tokens).sum();
        tokens += step_tokens;
        thr.add(step_tokens);
        if let Some(m) = metrics::get() {
            let r = metrics::StepReport { step: step as u64 + 1, loss: last_loss, kd_loss: sums.kd_mean(), tokens: step_tokens as u64, samples };
            m.record_step(&r, &device);
        }
        let epoch = stream.cursor().epoch as f64 + stream.cursor().index as f64 / n_train;
        let mut rec = serde_json::json!({
            "step": step + 1, "loss": last_loss, "ce": sums.ce_mean(), "kd": sums.kd_mean(),
            "lr": lr, "grad_norm": grad_norm, "tokens_per_sec": thr.tokens_per_sec(),
            "epoch": epoch,
        });
        if gkd.is_some() {
            rec["generated_micro_batches"] = generated.into();
        }
        writeln!(metrics, "{rec}").with_context(|| format!("writing {}", metrics_path.display()))?;
        log_history.push(rec);
        bar.set_message(format!("loss {last_loss:.3} · ce {:.3} · kd {:.3} · {:.0} tok/s", sums.ce_mean(), sums.kd_mean(), thr.tokens_per_sec()));
        bar.inc(1);
        if t.logging_steps > 0 && (step + 1) % t.logging_steps == 0 {
            bar.suspend(|| tracing::info!(step = step + 1, loss = last_loss, ce = sums.ce_mean(), kd = sums.kd_mean(), lr, grad_norm, "train"));
        }
        if let Some(tb) = tb.as_mut().filter(|_| (step + 1) % t.logging_steps == 0 || step + 1 == total_steps) {
            let mut scalars = vec![
                ("train/loss", last_loss),
                ("train/ce", sums.ce_mean()),
                ("train/kd", sums.kd_mean()),
                ("train/learning_rate", lr),
                ("train/grad_norm", grad_norm),
                ("train/tokens_per_sec", thr.tokens_per_sec()),
                ("train/epoch", epoch),
            ];
            if let Some(bytes) = peak_memory_bytes(&device) {
                scalars.push(("train/peak_memory_bytes", bytes as f64));
            }
            tb.add_scalars(step as u64 + 1, &scalars)?;
        }
        if t.eval_steps.is_some_and(|n| n > 0 && (step + 1) % n == 0) {
            let e = bar.suspend(|| evaluate(&student, &eval_batches, &format!("held-out, step {}", step + 1)))?;
            if let Some(tb) = &mut tb {
                tb_eval(tb, step + 1, "eval", e.as_ref())?;
            }
        }
        // HF's save_strategy: "epoch" saves when a step has used the last batch of an epoch
        // (the final one too: one adapter per epoch); "steps" every save_steps, where the
        // last step needs none as final_model follows.
        let save = match t.save_strategy {
            SaveStrategy::Steps => t.save_steps > 0 && (step + 1) % t.save_steps == 0 && step + 1 < total_steps,
            SaveStrategy::Epoch => stream.cursor().epoch > epoch_at_start,
            SaveStrategy::No => false,
        };
        if save {
            let ckpt = Checkpoint { cfg: &cfg, adapter_cfg: &adapter_cfg, resolved: &resolved, total_steps };
            let dir = tracing::info_span!(target: PHASE_TARGET, "checkpoint").in_scope(|| ckpt.save(&student, step + 1, stream.cursor(), &log_history))?;
            metrics::get().inspect(|m| m.record_checkpoint());
            bar.suspend(|| tracing::info!(dir = %dir.display(), "checkpoint saved"));
        }
    }
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();

    let eval_after = evaluate(&student, &eval_batches, "held-out, after training")?;
    let rehearsal_after = evaluate(&student, &reh_batches, "rehearsal, after training")?;
    if let Some(tb) = &mut tb {
        tb_eval(tb, total_steps, "eval", eval_after.as_ref())?;
        tb_eval(tb, total_steps, "eval_rehearsal", rehearsal_after.as_ref())?;
    }
    let out = cfg.output_dir.join("final_model");
    let tensors = student.params.peft_tensors()?;
    write_dir_atomically(&out, |dir| {
        save_adapter(dir, &tensors, &adapter_cfg)?;
        let p = dir.join("qdistill_config.toml");
        std::fs::write(&p, &resolved).map_err(|e| qdistill_common::Error::io(&p, e))
    })?;
    let summary = TrainSummary {
        steps: total_steps - start_step,
        tokens,
        seconds,
        eval_before,
        eval_after,
        rehearsal_before,
        rehearsal_after,
        last_loss,
        target_tokens,
        output: out,
        base_bytes: student.model.base_memory_bytes(),
        optimizer_state_bytes: student.opt.state_bytes(),
    };
    let results = cfg.output_dir.join("all_results.json");
    let text = serde_json::to_string_pretty(&summary.results_json())?;
    std::fs::write(&results, text + "\n").with_context(|| format!("writing {}", results.display()))?;
    Ok(summary)
}

/// Held-out CE and KL (T = 1) as `<prefix>/ce`, `<prefix>/kd`, like HF's `eval/loss`.
fn tb_eval(tb: &mut EventWriter, step: usize, prefix: &str, e: Option<&LossSums>) -> anyhow::Result<()> {
    if let Some(e) = e {
        tb.add_scalars(step as u64, &[(&format!("{prefix}/ce"), e.ce_mean()), (&format!("{prefix}/kd"), e.kd_mean())])?;
    }
    Ok(())
}

/// Peak memory so far: the high-water mark of the device's memory pool on CUDA (torch's
/// `max_memory_allocated`), the process's peak resident set (VmHWM) on a CPU; None where
/// neither can be read.
fn peak_memory_bytes(device: &Device) -> Option<u64> {
    #[cfg(feature = "cuda")]
    if device.is_cuda() {
        return qdistill_common::kernels::MemPool::of(device).and_then(|p| p.peak_used()).ok();
    }
    let _ = device;
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: u64 = status.lines().find_map(|l| l.strip_prefix("VmHWM:"))?.trim().strip_suffix("kB")?.trim().parse().ok()?;
    Some(kib * 1024)
}

/// What a `checkpoint-<step>/` holds, HF-style: the adapter in PEFT layout, the optimizer
/// state, trainer_state.json (with the data cursor) and the resolved config — enough for
/// `resume_from_checkpoint` to continue bit-exactly.
struct Checkpoint<'a> {
    cfg: &'a TrainConfig,
    adapter_cfg: &'a AdapterConfig,
    resolved: &'a str,
    total_steps: usize,
}

impl Checkpoint<'_> {
    fn save(&self, student: &Student, step: usize, cursor: DataCursor, log_history: &[serde_json::Value]) -> anyhow::Result<PathBuf> {
        let t = &self.cfg.training;
        let dir = checkpoint_dir(&self.cfg.output_dir, step as u64);
        let tensors = student.params.peft_tensors()?;
        let opt = student.opt.state_tensors()?;
        let state = TrainerState {
            global_step: step as u64,
            epoch: Some(cursor.epoch as f64),
            max_steps: self.total_steps as u64,
            num_train_epochs: t.num_train_epochs.ceil() as u64,
            logging_steps: t.logging_steps as u64,
            save_steps: t.save_steps as u64,
            log_history: log_history.to_vec(),
            best_metric: None,
            best_model_checkpoint: None,
            train_batch_size: Some(t.per_device_train_batch_size as u64),
            data_cursor: serde_json::to_value(cursor)?,
            // Dropout masks are a pure function of (seed, step, microbatch): nothing to keep.
            rng_state: serde_json::json!({ "seed": self.cfg.seed }),
        };
        write_dir_atomically(&dir, |d| {
            save_adapter(d, &tensors, self.adapter_cfg)?;
            save_optimizer(&d.join("optimizer.safetensors"), &opt, &Default::default())?;
            state.save(&d.join("trainer_state.json"))?;
            let p = d.join("qdistill_config.toml");
            std::fs::write(&p, self.resolved).map_err(|e| qdistill_common::Error::io(&p, e))
        })?;
        if let Some(limit) = t.save_total_limit {
            rotate_checkpoints(&self.cfg.output_dir, limit)?;
        }
        Ok(dir)
    }
}

/// Loads adapter, optimizer state and data cursor from a checkpoint; returns the step to
/// continue from, the data stream positioned there, and the log history so far.
fn resume(
    cfg: &TrainConfig,
    from: &ResumeFromCheckpoint,
    student: &mut Student,
    data: &DataPlan,
) -> anyhow::Result<(usize, Batcher, Vec<serde_json::Value>)> {
    let dir = match from {
        ResumeFromCheckpoint::Latest => latest_checkpoint(&cfg.output_dir)
            .with_context(|| format!("resume_from_checkpoint = true, but {} holds no checkpoint-<step>/", cfg.output_dir.display()))?,
        ResumeFromCheckpoint::Path(p) => p.clone(),
    };
    let (_, tensors) = load_adapter(&dir)?;
    student.params.load_peft_tensors(&tensors, &dir)?;
    let opt_path = dir.join("optimizer.safetensors");
    let (opt, _) = load_optimizer(&opt_path)?;
    student.opt.load_state(&opt.into_iter().collect(), &opt_path)?;
    let state = TrainerState::load(&dir.join("trainer_state.json"))?;
    let cursor: DataCursor = serde_json::from_value(state.data_cursor.clone())
        .with_context(|| format!("{}: data cursor", dir.join("trainer_state.json").display()))?;
    let stream = Batcher::resume(data.train.clone(), data.opts.clone(), cursor)?;
    tracing::info!(dir = %dir.display(), step = state.global_step, "resuming");
    Ok((state.global_step as usize, stream, state.log_history))
}

#[cfg(test)]
mod tests {
    use qdistill_common::config::{self, ConfigFormat};

    use super::check_cluster_config;

    fn cfg(extra_training: &str) -> config::TrainConfig {
        let text = format!(
            "output_dir = \"out\"\n[model]\nmodel_name_or_path = \"m\"\n[data]\ntrain_file = \"d.jsonl\"\n[training]\nmax_steps = 4\n{extra_training}\n"
        );
        config::parse(&text, ConfigFormat::Toml, "test config", &[]).unwrap()
    }

    #[test]
    fn cluster_runs_refuse_what_only_the_single_process_run_does() {
        assert!(check_cluster_config(&cfg("save_strategy = \"steps\"")).is_ok());
        for (strategy, want) in [("epoch", "\"epoch\""), ("no", "\"no\"")] {
            let e = check_cluster_config(&cfg(&format!("save_strategy = \"{strategy}\""))).unwrap_err().to_string();
            assert!(e.contains("training.save_strategy") && e.contains(want), "{e}");
        }
    }
}
