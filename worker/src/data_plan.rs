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
