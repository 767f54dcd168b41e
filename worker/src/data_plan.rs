//! From the `[data]` config section to the streams the trainer consumes: the training
//! stream (main data with rehearsal mixed in), and held-out evaluation batches for the
//! main data and, separately, for the rehearsal data (to watch forgetting).

use std::sync::Arc;

use qdistill_common::chat_template::ChatTemplate;
use qdistill_common::config::{self, TrainConfig};
use qdistill_common::data::{self, Batch, BatchOptions, Batcher, Dataset, LoadOptions};
use qdistill_common::tokenizer::TokenizerInfo;
use qdistill_common::Result;

pub struct DataPlan {
    pub train: Arc<Dataset>,
    pub opts: BatchOptions,
    /// Held-out batches of the main data (empty when no eval split/file).
    pub eval: Vec<Batch>,
    /// Held-out batches of the rehearsal data.
    pub eval_rehearsal: Vec<Batch>,
    /// Samples from the main data and from rehearsal in the training stream.
    pub n_main: usize,
    pub n_rehearsal: usize,
}

fn data_format(f: config::DataFormat) -> data::DataFormat {
    match f {
        config::DataFormat::Auto => data::DataFormat::Auto,
        config::DataFormat::Alpaca => data::DataFormat::Alpaca,
        config::DataFormat::ShareGpt => data::DataFormat::ShareGpt,
        config::DataFormat::Messages => data::DataFormat::Messages,
        config::DataFormat::PromptCompletion => data::DataFormat::PromptCompletion,
        config::DataFormat::Text => data::DataFormat::Text,
    }
}

fn load_files(paths: &[std::path::PathBuf], opts: &LoadOptions, tok: &TokenizerInfo, tpl: Option<&ChatTemplate>) -> Result<Dataset> {
    let mut all = Dataset::default();
    for p in paths {
        let (d, report) = data::load_dataset(p, opts, tok, tpl)?;
        tracing::info!(
            file = %p.display(), format = report.format.name(), records = report.records,
            skipped_malformed = report.skipped_malformed, dropped_no_target = report.dropped_no_target,
            truncated = report.truncated, "loaded data"
        );
        all.samples.extend(d.samples);
    }
    Ok(all)
}

/// One pass over `d` in batches (the eval set; order does not matter for a sum).
fn one_epoch(d: Dataset, opts: &BatchOptions) -> Result<Vec<Batch>> {
    if d.is_empty() {
        return Ok(Vec::new());
    }
    let mut b = Batcher::new(Arc::new(d), opts.clone())?;
    let mut out = Vec::new();
    while b.cursor().epoch == 0 {
        out.push(b.next_batch());
    }
    Ok(out)
}

pub fn build(cfg: &TrainConfig, tok: &TokenizerInfo) -> Result<DataPlan> {
    let d = &cfg.data;
    let template = ChatTemplate::from_tokenizer(tok)?;
    let opts = LoadOptions { format: data_format(d.format), skip_malformed: d.skip_malformed, max_seq_length: Some(d.max_seq_length) };
    let mut main = load_files(&d.train_file, &opts, tok, template.as_ref())?;
    if let Some(n) = d.max_samples {
        main.samples.truncate(n);
    }
    let (main, eval) = match &d.eval_file {
        Some(p) => (main, load_files(std::slice::from_ref(p), &opts, tok, template.as_ref())?),
        None => main.train_eval_split(d.eval_split, cfg.seed)?,
    };
    let (train, eval_reh, n_reh) = match &d.rehearsal_file {
        Some(p) if d.rehearsal_ratio > 0.0 => {
            let reh_opts = LoadOptions { format: data::DataFormat::Auto, ..opts.clone() };
            let reh = load_files(std::slice::from_ref(p), &reh_opts, tok, template.as_ref())?;
            let (reh, reh_eval) = reh.train_eval_split(d.eval_split, cfg.seed)?;
            let mixed = data::mix_rehearsal(&main, &reh, d.rehearsal_ratio, cfg.seed)?;
            let n_reh = mixed.len() - main.len();
            (mixed, reh_eval, n_reh)
        }
        _ => (main.clone(), Dataset::default(), 0),
    };
    let batch_opts = BatchOptions {
        batch_size: cfg.training.per_device_train_batch_size,
        seq_len: d.max_seq_length,
        packing: d.packing,
        group_by_length: d.group_by_length,
        seed: cfg.seed,
        pad_id: tok.pad_id,
        eos_id: tok.eos_id,
    };
    let eval_opts = BatchOptions { packing: false, group_by_length: false, ..batch_opts.clone() };
    Ok(DataPlan {
        n_main: train.len() - n_reh,
        n_rehearsal: n_reh,
        train: Arc::new(train),
        eval: one_epoch(eval, &eval_opts)?,
        eval_rehearsal: one_epoch(eval_reh, &eval_opts)?,
        opts: batch_opts,
    })
}

impl DataPlan {
    /// Batches in one epoch of the training stream.
    pub fn batches_per_epoch(&self) -> Result<usize> {
        Ok(one_epoch((*self.train).clone(), &self.opts)?.len())
    }

    /// HF semantics: `max_steps` > 0 wins; otherwise ceil(epochs × batches / accumulation).
    pub fn total_steps(&self, max_steps: i64, epochs: f64, accum: usize) -> Result<usize> {
        if max_steps > 0 {
            return Ok(max_steps as usize);
        }
        let per_epoch = self.batches_per_epoch()?.div_ceil(accum.max(1));
        Ok((per_epoch as f64 * epochs).ceil() as usize)
    }

    pub fn train_stream(&self) -> Result<Batcher> {
        Batcher::new(self.train.clone(), self.opts.clone())
    }
}

/// What `qdistill data` reports about a job's data: the sizes the trainer will see.
pub struct DataReport {
    pub n_main: usize,
    pub n_rehearsal: usize,
    pub eval_batches: usize,
    pub eval_rehearsal_batches: usize,
    pub tokens: usize,
    pub trained_tokens: usize,
    pub max_len: usize,
    pub total_steps: usize,
    pub micro_batches_written: usize,
}

impl DataReport {
    pub fn table(&self) -> String {
        let n = (self.n_main + self.n_rehearsal).max(1);
        format!(
            "training samples {} ({} main + {} rehearsal = {:.1}% rehearsal)\n\
             tokens {} ({:.1} per sample, longest {}), of which trained {} ({:.1}%; the rest are prompt tokens masked with -100)\n\
             held-out batches: {} main, {} rehearsal\n\
             optimizer steps {}{}",
            self.n_main + self.n_rehearsal,
            self.n_main,
            self.n_rehearsal,
            100.0 * self.n_rehearsal as f64 / n as f64,
            self.tokens,
            self.tokens as f64 / n as f64,
            self.max_len,
            self.trained_tokens,
            100.0 * self.trained_tokens as f64 / self.tokens.max(1) as f64,
            self.eval_batches,
            self.eval_rehearsal_batches,
            self.total_steps,
            if self.micro_batches_written > 0 { format!(", {} micro-batches written", self.micro_batches_written) } else { String::new() }
        )
    }
}

fn batch_json(split: &str, step: Option<usize>, micro: usize, b: &Batch) -> serde_json::Value {
    serde_json::json!({
        "split": split, "step": step, "micro": micro, "batch": b.batch, "seq_len": b.seq_len,
        "input_ids": b.input_ids, "labels": b.labels, "position_ids": b.position_ids,
        "segment_ids": b.segment_ids, "sample_ids": b.sample_ids, "n_target_tokens": b.n_target_tokens,
    })
}

/// Builds the job's data exactly as `train` does and reports its sizes. With `dump`, also
/// writes, one JSON object a line, every micro-batch of the training stream in the order
/// the optimizer steps consume them (`split: "train"`, `step` from 1, `micro`), then the
/// held-out batches (`split: "eval"` / `"eval_rehearsal"`): token ids, shifted labels,
/// positions and packing segments, so another trainer can be fed the identical stream.
pub fn inspect(cfg: &TrainConfig, tok: &TokenizerInfo, dump: Option<&std::path::Path>) -> anyhow::Result<DataReport> {
    use anyhow::Context;
    use std::io::Write;
    let plan = build(cfg, tok)?;
    let t = &cfg.training;
    let total_steps = plan.total_steps(t.max_steps, t.num_train_epochs, t.gradient_accumulation_steps)?;
    let samples = &plan.train.samples;
    let mut report = DataReport {
        n_main: plan.n_main,
        n_rehearsal: plan.n_rehearsal,
        eval_batches: plan.eval.len(),
        eval_rehearsal_batches: plan.eval_rehearsal.len(),
        tokens: samples.iter().map(|s| s.len()).sum(),
        trained_tokens: samples.iter().map(|s| s.n_trained()).sum(),
        max_len: samples.iter().map(|s| s.len()).max().unwrap_or(0),
        total_steps,
        micro_batches_written: 0,
    };
    if let Some(path) = dump {
        // Written beside the target and renamed at the end: a failed dump leaves no
        // half-written file under the name another tool will read.
        let tmp = path.with_extension("jsonl.partial");
        let file = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
        let mut w = std::io::BufWriter::new(file);
        let mut write = |v: serde_json::Value| writeln!(w, "{v}").with_context(|| format!("writing {}", tmp.display()));
        let mut stream = plan.train_stream()?;
        for step in 0..total_steps {
            for micro in 0..t.gradient_accumulation_steps {
                write(batch_json("train", Some(step + 1), micro, &stream.next_batch()))?;
                report.micro_batches_written += 1;
            }
        }
        for (split, batches) in [("eval", &plan.eval), ("eval_rehearsal", &plan.eval_rehearsal)] {
            for (i, b) in batches.iter().enumerate() {
                write(batch_json(split, None, i, b))?;
            }
        }
        drop(write);
        w.into_inner().map_err(|e| anyhow::anyhow!("writing {}: {}", tmp.display(), e.error()))?.sync_all()?;
        std::fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    }
    Ok(report)
}
