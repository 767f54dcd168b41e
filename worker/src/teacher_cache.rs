//! `qdistill teacher-cache`: runs the teacher once over a job's whole training stream and
//! stores its top-K outputs (format: `qdistill_common::teacher_cache`); and the check a
//! training run makes before reading such a cache instead of running the teacher.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context};
use candle_core::{DType, Device};
use indicatif::{ProgressBar, ProgressStyle};
use qdistill_common::config::{self, ComputeDtype, Quantization, TeacherMode, TeacherOutput, TopkDtype, TrainConfig};
use qdistill_common::teacher_cache::{
    index_bytes_for, model_fingerprint, tokenizer_sha256, CacheSpec, CacheWriter, Manifest, StreamHasher, TeacherCache,
    TeacherIdentity, ValueDtype, WriteStart, FORMAT_VERSION,
};
use qdistill_common::tokenizer::{check_same_tokenizer, TokenizerInfo};
use serde_json::Value;

use crate::data_plan::{self, DataPlan};
use crate::models;
use crate::trainer::{teacher_hidden, teacher_topk, DeviceBatch, Teacher, TopKSpec};

pub fn value_dtype(d: TopkDtype) -> ValueDtype {
    match d {
        TopkDtype::F32 => ValueDtype::F32,
        TopkDtype::F16 => ValueDtype::F16,
    }
}

/// K of `teacher.output = "topk:K"`; a cache stores nothing else.
pub fn topk_k(cfg: &TrainConfig) -> anyhow::Result<usize> {
    match cfg.teacher.output {
        TeacherOutput::TopK(k) => Ok(k),
        other => bail!(
            "`teacher.output` = \"{other}\": a teacher cache stores the teacher's top-K log-probabilities; \
             set `teacher.output` = \"topk:K\" (e.g. \"topk:64\") in the config"
        ),
    }
}

/// The config values that decide the micro-batch stream, by key.
fn stream_settings(cfg: &TrainConfig, total_steps: usize) -> BTreeMap<String, Value> {
    let (d, t) = (&cfg.data, &cfg.training);
    let paths = |v: &[PathBuf]| Value::from(v.iter().map(|p| p.display().to_string()).collect::<Vec<_>>());
    let mut s = BTreeMap::new();
    s.insert("seed".into(), cfg.seed.into());
    s.insert("data.train_file".into(), paths(&d.train_file));
    s.insert("data.rehearsal_file".into(), d.rehearsal_file.as_ref().map(|p| p.display().to_string()).into());
    s.insert("data.rehearsal_ratio".into(), d.rehearsal_ratio.into());
    s.insert("data.eval_split".into(), d.eval_split.into());
    s.insert("data.eval_file".into(), d.eval_file.as_ref().map(|p| p.display().to_string()).into());
    s.insert("data.max_seq_length".into(), d.max_seq_length.into());
    s.insert("data.packing".into(), d.packing.into());
    s.insert("data.group_by_length".into(), d.group_by_length.into());
    s.insert("data.max_samples".into(), d.max_samples.into());
    s.insert("training.per_device_train_batch_size".into(), t.per_device_train_batch_size.into());
    s.insert("training.gradient_accumulation_steps".into(), t.gradient_accumulation_steps.into());
    s.insert("optimizer steps (training.max_steps / num_train_epochs)".into(), total_steps.into());
    s
}

/// The teacher of `cfg` as a local model path, with its identity.
struct TeacherSpec {
    /// None when reading a cache whose teacher is not on this machine.
    path: Option<PathBuf>,
    identity: TeacherIdentity,
    /// Layers to keep when loading (an LwF teacher is the pruned student base).
    keep_layers: Option<Vec<usize>>,
    nf4: bool,
}

/// With `cached` (a run reading a cache), a teacher that is not a local path is not
/// resolved (a hub id would be downloaded just to be hashed): its hashes are taken from the
/// cache, with a warning that they could not be checked.
fn teacher_spec(cfg: &TrainConfig, cached: Option<&CacheSpec>) -> anyhow::Result<TeacherSpec> {
    let (name, keep_layers, quant) = match cfg.teacher.mode {
        TeacherMode::Model => (
            cfg.teacher.model_name_or_path.clone().unwrap_or_else(|| cfg.model.model_name_or_path.clone()),
            None,
            cfg.teacher.quantization,
        ),
        TeacherMode::Lwf => (cfg.model.model_name_or_path.clone(), cfg.model.keep_layers.clone(), cfg.model.quantization),
        TeacherMode::None => bail!("`teacher.mode` = \"none\": there is no teacher to cache"),
    };
    let revision = if cfg.teacher.mode == TeacherMode::Lwf { cfg.model.revision.as_deref() } else { None };
    let (path, (config_sha256, weights_sha256)) = match cached {
        Some(c) if !Path::new(&name).exists() => {
            tracing::warn!(
                teacher = %name,
                "the teacher is not a local path: its config and weight hashes are taken from the cache unchecked"
            );
            (None, (c.teacher.config_sha256.clone(), c.teacher.weights_sha256.clone()))
        }
        _ => {
            let path = config::resolve_model_path(&name, revision, None)?;
            let fp = model_fingerprint(&path)?;
            (Some(path), fp)
        }
    };
    let identity = TeacherIdentity {
        mode: match cfg.teacher.mode {
            TeacherMode::Lwf => "lwf",
            _ => "model",
        }
        .into(),
        model_name_or_path: name,
        quantization: match quant {
            Quantization::Nf4 => "nf4",
            Quantization::None => "none",
        }
        .into(),
        keep_layers: keep_layers.as_deref().map(config::format_layer_spec),
        config_sha256,
        weights_sha256,
    };
    Ok(TeacherSpec { path, identity, keep_layers, nf4: quant == Quantization::Nf4 })
}

/// The spec of the cache `cfg` needs: the teacher's identity, K, temperature, dtypes, the
/// tokenizer and the exact micro-batch stream of `total_steps` optimizer steps (one pass
/// over the data pipeline; the teacher is not run). `student_vocab` is the student's
/// vocabulary size; `cached` is the spec of the cache a run is about to read, if any.
pub fn cache_spec(
    cfg: &TrainConfig,
    tok: &TokenizerInfo,
    student_vocab: usize,
    data: &DataPlan,
    total_steps: usize,
    cached: Option<&CacheSpec>,
) -> anyhow::Result<CacheSpec> {
    let k = topk_k(cfg)?;
    let teacher = teacher_spec(cfg, cached)?;
    let teacher_vocab = match (cfg.teacher.mode, &teacher.path, cached) {
        (TeacherMode::Lwf, _, _) => student_vocab,
        (_, Some(p), _) => models::open(p)?.1.vocab_size,
        (_, None, Some(c)) => c.vocab_size,
        (_, None, None) => unreachable!("teacher_spec resolves the path when building"),
    };
    let vocab = student_vocab.min(teacher_vocab);
    if k > vocab {
        bail!("`teacher.output` = \"topk:{k}\": K is larger than the vocabulary ({vocab} tokens)");
    }
    let mut h = StreamHasher::default();
    let mut stream = data.train_stream()?;
    for _ in 0..total_steps * cfg.training.gradient_accumulation_steps {
        h.add(&stream.next_batch());
    }
    Ok(CacheSpec {
        format_version: FORMAT_VERSION,
        k,
        temperature: cfg.distill.temperature,
        vocab_size: vocab,
        value_dtype: value_dtype(cfg.teacher.topk_dtype),
        index_bytes: index_bytes_for(vocab),
        teacher: teacher.identity,
        tokenizer_sha256: tokenizer_sha256(tok),
        stream: h.finish(stream_settings(cfg, total_steps)),
    })
}

/// Opens `teacher.cache` for a run and checks that it was built for this run's teacher,
/// tokenizer, K, temperature and exact micro-batch stream.
pub fn open_for_run(
    cfg: &TrainConfig,
    tok: &TokenizerInfo,
    student_vocab: usize,
    data: &DataPlan,
    total_steps: usize,
) -> anyhow::Result<TeacherCache> {
    let dir = cfg.teacher.cache.as_deref().context("no teacher.cache in the config")?;
    let cache = TeacherCache::open(dir).with_context(|| format!("teacher.cache = {}", dir.display()))?;
    let spec = cache_spec(cfg, tok, student_vocab, data, total_steps, Some(&cache.manifest().spec))?;
    cache.check_spec(&spec)?;
    let m = cache.manifest();
    tracing::info!(
        dir = %dir.display(), shards = m.shards.len(), mib = m.total_bytes() as f64 / (1 << 20) as f64,
        tokens = m.spec.stream.target_tokens, "reading the teacher's top-K outputs from the cache"
    );
    Ok(cache)
}

pub struct CacheOptions {
    /// Largest shard file; a shard holds whole micro-batches (at least one).
    pub max_shard_bytes: u64,
    pub progress: bool,
}

/// What `teacher-cache` did.
pub struct CacheSummary {
    pub dir: PathBuf,
    pub manifest: Manifest,
    /// Micro-batches computed by this invocation (0 when the cache was complete already).
    pub computed: u64,
    /// Micro-batches an earlier, interrupted invocation had finished.
    pub resumed_from: u64,
    pub seconds: f64,
}

impl CacheSummary {
    pub fn table(&self) -> String {
        let m = &self.manifest;
        let s = &m.spec;
        let tokens = s.stream.target_tokens;
        let mut out = format!(
            "teacher cache {}: {} shard(s), {} bytes ({:.2} MiB), {} micro-batches, {} supervised tokens ({:.1} bytes/token)\n\
             top-{} log-probabilities at T = {} as {:?} + {}-byte token ids over {} tokens",
            self.dir.display(),
            m.shards.len(),
            m.total_bytes(),
            m.total_bytes() as f64 / (1 << 20) as f64,
            m.micro_batches(),
            tokens,
            m.total_bytes() as f64 / tokens.max(1) as f64,
            s.k,
            s.temperature,
            s.value_dtype,
            s.index_bytes,
            s.vocab_size,
        );
        if self.computed == 0 {
            out.push_str("\nalready complete: nothing computed");
        } else {
            out.push_str(&format!("\ncomputed {} micro-batches in {:.1} s", self.computed, self.seconds));
            if self.resumed_from > 0 {
                out.push_str(&format!(" (continuing after {} done earlier)", self.resumed_from));
            }
        }
        out
    }
}

fn device_of(d: config::Device) -> anyhow::Result<Device> {
    Ok(match d {
        config::Device::Cpu => Device::Cpu,
        config::Device::Cuda(i) => Device::new_cuda(i).with_context(|| format!("opening cuda:{i} (is this binary built with --features cuda?)"))?,
    })
}

/// `qdistill teacher-cache CONFIG --out DIR`: the job's data as `train` builds it, the
/// teacher (no student weights are loaded), and one teacher forward per micro-batch of the
/// whole run. Continues an interrupted build of the same spec in `out`.
pub fn build_cache(config_path: &Path, overrides: &[String], out: &Path, opts: &CacheOptions) -> anyhow::Result<CacheSummary> {
    let cfg = config::load(config_path, overrides)?;
    if cfg.teacher.cache.is_some() {
        bail!("`teacher.cache` is set in the config this cache is to be built from; remove it (it is what `train` reads)");
    }
    let student_path = config::resolve_model_path(&cfg.model.model_name_or_path, cfg.model.revision.as_deref(), None)?;
    let (_, student_cfg, tok) = models::open(&student_path)?;
    let data = data_plan::build(&cfg, &tok)?;
    let t = &cfg.training;
    let total_steps = data.total_steps(t.max_steps, t.num_train_epochs, t.gradient_accumulation_steps)?;
    if total_steps == 0 {
        bail!("the data gives no optimizer step (check train_file, max_samples and batch sizes)");
    }
    let spec = cache_spec(&cfg, &tok, student_cfg.vocab_size, &data, total_steps, None)?;
    let mut writer = match CacheWriter::create_or_resume(out, spec.clone(), opts.max_shard_bytes)? {
        WriteStart::Complete(manifest) => {
            return Ok(CacheSummary { dir: out.to_path_buf(), manifest, computed: 0, resumed_from: 0, seconds: 0.0 })
        }
        WriteStart::Write(w) => w,
    };
    let resumed_from = writer.next_micro();

    let ts = teacher_spec(&cfg, None)?;
    let teacher_path = ts.path.clone().context("the teacher's path is resolved when building")?;
    let dtype = match cfg.model.compute_dtype {
        ComputeDtype::F32 => DType::F32,
        ComputeDtype::BF16 => DType::BF16,
    };
    let device = device_of(if cfg.teacher.mode == TeacherMode::Lwf { cfg.device } else { cfg.teacher_device })?;
    tracing::info!(model = %teacher_path.display(), device = ?device, "loading teacher");
    // As `train` loads them: an LwF teacher is the student base as configured, a separate
    // teacher is quantized with double quantization.
    let double_quant = cfg.teacher.mode != TeacherMode::Lwf || cfg.model.bnb_4bit_use_double_quant;
    let loaded = models::load(&teacher_path, ts.keep_layers.clone(), ts.nf4, double_quant, &device, dtype)?;
    check_same_tokenizer(&loaded.tokenizer, &tok).with_context(|| {
        format!("teacher {} and student {} must share one tokenizer", teacher_path.display(), student_path.display())
    })?;
    let teacher = Teacher::Model(loaded.model);
    let Teacher::Model(model) = &teacher else { unreachable!("built just above") };
    let topk = TopKSpec {
        k: spec.k,
        temperature: spec.temperature,
        vocab: spec.vocab_size,
        dtype: spec.value_dtype,
        chunk_tokens: cfg.distill.chunk_tokens,
    };

    let total = spec.stream.micro_batches;
    let bar = if opts.progress { ProgressBar::new(total) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}<{eta_precise}] {bar:30} {pos}/{len} micro-batches · {msg}")
            .expect("static template"),
    );
    bar.set_position(resumed_from);
    let started = Instant::now();
    let mut tokens = 0usize;
    let mut stream = data.train_stream()?;
    for micro in 0..total {
        let b = stream.next_batch();
        if micro < resumed_from {
            continue;
        }
        let db = DeviceBatch::new(&b, &device)?;
        let h = teacher_hidden(&teacher, model, &db)?.context("a teacher model gives hidden states")?;
        let rows = teacher_topk(&h, model.lm_head(), model.cfg.final_logit_softcapping, &b.labels, &topk)?;
        writer.push(&rows)?;
        tokens += db.n_tokens;
        bar.set_message(format!("{:.0} tok/s", tokens as f64 / started.elapsed().as_secs_f64().max(1e-9)));
        bar.inc(1);
    }
    let manifest = writer.finish()?;
    bar.finish_and_clear();
    Ok(CacheSummary {
        dir: out.to_path_buf(),
        manifest,
        computed: total - resumed_from,
        resumed_from,
        seconds: started.elapsed().as_secs_f64(),
    })
}
