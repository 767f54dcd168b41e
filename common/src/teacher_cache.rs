//! The offline teacher cache: the teacher's top-K log-probabilities for every supervised
//! token of a job's training stream, written once by `qdistill teacher-cache` and read by
//! `train` instead of running the teacher.
//!
//! Layout of a cache directory:
//! - `manifest.json`: what the cache was built from ([`CacheSpec`]: format version, K,
//!   temperature, vocabulary, value and index widths, the teacher's identity, the
//!   tokenizer's hash and the hash of the exact tokenized micro-batch stream) and its
//!   shards with their SHA-256. Written last: a directory without it is not a cache.
//! - `shard-NNNNN.bin`: the magic [`SHARD_MAGIC`], then one block per micro-batch in
//!   training order. A block is `u32` n (supervised tokens of the micro-batch), n·K
//!   log-probabilities (f32 or f16, little-endian, row-major), then n·K token ids in
//!   `index_bytes` little-endian bytes each (2 when the vocabulary fits in u16, 3 for u24,
//!   else 4). Each shard is written to a temporary name and renamed when complete.
//! - `manifest.partial.json`: while building, the spec and the shards finished so far, so
//!   an interrupted build continues after its last complete shard.
//!
//! Rows are the supervised tokens (label ≠ -100) of each micro-batch in row-major token
//! order: the rows the loss reads. Top-K entries are sorted by descending log-probability,
//! ties by ascending token id.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use half::f16;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::data::Batch;
use crate::loss::IGNORE_INDEX;
use crate::tokenizer::TokenizerInfo;
use crate::{Error, Result};

pub const FORMAT_VERSION: u32 = 1;
pub const MANIFEST_NAME: &str = "manifest.json";
pub const PARTIAL_MANIFEST_NAME: &str = "manifest.partial.json";
pub const SHARD_MAGIC: &[u8; 8] = b"QDTCSHD1";

/// How the log-probabilities are stored. bfloat16 is not offered: its 8-bit mantissa moves
/// a probability of 0.6 by up to 0.2%, so the K stored probabilities of a confident teacher
/// can sum to more than 1 and the tail bucket becomes meaningless.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ValueDtype {
    F32,
    F16,
}

impl ValueDtype {
    pub fn bytes(self) -> usize {
        match self {
            ValueDtype::F32 => 4,
            ValueDtype::F16 => 2,
        }
    }

    /// Rounds in place to what this dtype stores (round to nearest even), so that a live
    /// top-K teacher gives the loss exactly the numbers a cache would.
    pub fn round(self, v: &mut [f32]) {
        if self == ValueDtype::F16 {
            v.iter_mut().for_each(|x| *x = f16::from_f32(*x).to_f32());
        }
    }
}

/// Bytes per stored token id: the fewest that hold every id below `vocab_size`.
pub fn index_bytes_for(vocab_size: usize) -> usize {
    match vocab_size {
        0..=0x1_0000 => 2,
        0x1_0001..=0x100_0000 => 3,
        _ => 4,
    }
}

/// The top-K teacher outputs of the supervised tokens of one micro-batch.
#[derive(Debug, Clone, PartialEq)]
pub struct TopKRows {
    pub k: usize,
    /// `[n, k]` row-major log-probabilities at the training temperature.
    pub logprobs: Vec<f32>,
    /// `[n, k]` token ids.
    pub indices: Vec<u32>,
}

impl TopKRows {
    pub fn n_rows(&self) -> usize {
        self.logprobs.len() / self.k.max(1)
    }

    /// The K largest entries of each row of `logprobs` (`[n, v]` row-major), sorted by
    /// descending value, ties by ascending id (a total order, so the result does not
    /// depend on how the selection runs). NaN is an error naming the row.
    pub fn select(logprobs: &[f32], v: usize, k: usize) -> Result<TopKRows> {
        if k == 0 || k > v || logprobs.len() % v != 0 {
            return Err(Error::Msg(format!(
                "top-K selection: K = {k} must be in [1, {v}] and the input a whole number of rows of {v} (got {} values)",
                logprobs.len()
            )));
        }
        let n = logprobs.len() / v;
        let mut out = TopKRows { k, logprobs: Vec::with_capacity(n * k), indices: Vec::with_capacity(n * k) };
        let mut ids: Vec<u32> = Vec::with_capacity(v);
        for (r, row) in logprobs.chunks_exact(v).enumerate() {
            if let Some(j) = row.iter().position(|x| x.is_nan()) {
                return Err(Error::Msg(format!("top-K selection: row {r} has NaN at token {j}")));
            }
            let order = |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b));
            ids.clear();
            ids.extend(0..v as u32);
            if k < v {
                ids.select_nth_unstable_by(k - 1, order);
                ids.truncate(k);
            }
            ids.sort_unstable_by(order);
            out.logprobs.extend(ids.iter().map(|&i| row[i as usize]));
            out.indices.extend_from_slice(&ids);
        }
        Ok(out)
    }

    /// Host arrays for the loss's `TeacherOutput::TopK`, `[rows, k]` over every token of a
    /// micro-batch whose labels are `labels`: the supervised tokens get these rows in order;
    /// the others (never read by the loss) get ids 0..K and log-probability -inf.
    pub fn expand(&self, labels: &[i64]) -> Result<(Vec<f32>, Vec<u32>)> {
        let k = self.k;
        let n_sup = labels.iter().filter(|&&l| l != IGNORE_INDEX).count();
        if n_sup != self.n_rows() {
            return Err(Error::Mismatch(format!(
                "teacher top-K rows: {} rows for a micro-batch with {n_sup} supervised tokens",
                self.n_rows()
            )));
        }
        let mut lp = Vec::with_capacity(labels.len() * k);
        let mut ix = Vec::with_capacity(labels.len() * k);
        let mut next = 0;
        for &l in labels {
            if l == IGNORE_INDEX {
                lp.extend(std::iter::repeat_n(f32::NEG_INFINITY, k));
                ix.extend(0..k as u32);
            } else {
                lp.extend_from_slice(&self.logprobs[next * k..(next + 1) * k]);
                ix.extend_from_slice(&self.indices[next * k..(next + 1) * k]);
                next += 1;
            }
        }
        Ok((lp, ix))
    }
}

// ---------------------------------------------------------------------------------------
// Identity

/// The teacher a cache was computed with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TeacherIdentity {
    /// `teacher.mode`: "model", or "lwf" (the student's own base).
    pub mode: String,
    pub model_name_or_path: String,
    pub quantization: String,
    /// The layers kept (LwF teachers only: the student's `model.keep_layers`).
    pub keep_layers: Option<String>,
    /// SHA-256 of config.json ("" for a GGUF file, whose config is in its header).
    pub config_sha256: String,
    /// SHA-256 over each weight file's name, size and first MiB: the safetensors header
    /// (names, dtypes, shapes, offsets) or the GGUF metadata, without reading all weights.
    pub weights_sha256: String,
}

/// The micro-batch stream a cache covers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamIdentity {
    /// The config values that shape the stream, by config key, for naming what differs.
    pub settings: BTreeMap<String, Value>,
    pub micro_batches: u64,
    pub target_tokens: u64,
    /// SHA-256 of every micro-batch's input ids, labels, positions and segments in order.
    pub sha256: String,
}

/// Everything a cache's numbers depend on; a run may read a cache only if its own spec is
/// equal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheSpec {
    pub format_version: u32,
    pub k: usize,
    /// `distill.temperature` the log-probabilities are taken at.
    pub temperature: f64,
    /// Entries the top-K is taken over: min(student, teacher) vocabulary, as the loss does.
    pub vocab_size: usize,
    pub value_dtype: ValueDtype,
    pub index_bytes: usize,
    pub teacher: TeacherIdentity,
    /// SHA-256 of the tokenizer's vocabulary and special tokens (see [`tokenizer_sha256`]).
    pub tokenizer_sha256: String,
    pub stream: StreamIdentity,
}

impl CacheSpec {
    /// (name, value) pairs in the order a mismatch is reported: the most basic first, the
    /// stream hash (which any of the others also changes) last.
    fn fields(&self) -> Vec<(String, Value)> {
        let t = &self.teacher;
        let mut f: Vec<(String, Value)> = vec![
            ("format version".into(), self.format_version.into()),
            ("teacher.mode".into(), t.mode.clone().into()),
            ("teacher.model_name_or_path".into(), t.model_name_or_path.clone().into()),
            ("teacher.quantization".into(), t.quantization.clone().into()),
            ("model.keep_layers (of the LwF teacher)".into(), t.keep_layers.clone().into()),
            ("the teacher's config.json (sha256)".into(), t.config_sha256.clone().into()),
            ("the teacher's weight files (sha256 of names, sizes, headers)".into(), t.weights_sha256.clone().into()),
            ("the tokenizer (sha256)".into(), self.tokenizer_sha256.clone().into()),
            ("K of teacher.output = \"topk:K\"".into(), self.k.into()),
            ("distill.temperature".into(), self.temperature.into()),
            ("teacher.topk_dtype".into(), serde_json::to_value(self.value_dtype).unwrap_or(Value::Null)),
            ("the KD vocabulary size".into(), self.vocab_size.into()),
            ("index bytes".into(), self.index_bytes.into()),
        ];
        let keys: std::collections::BTreeSet<&String> = self.stream.settings.keys().collect();
        for k in keys {
            f.push((k.clone(), self.stream.settings[k].clone()));
        }
        f.push(("micro-batches in the training stream".into(), self.stream.micro_batches.into()));
        f.push(("supervised tokens in the training stream".into(), self.stream.target_tokens.into()));
        f.push(("the tokenized sample stream (sha256)".into(), self.stream.sha256.clone().into()));
        f
    }

    /// The first field where `self` (what the cache was built with) and `want` (this run)
    /// differ, as "`name` = cached vs this run".
    pub fn first_difference(&self, want: &CacheSpec) -> Option<String> {
        let mine = self.fields();
        let theirs: BTreeMap<String, Value> = want.fields().into_iter().collect();
        for (name, v) in &mine {
            let w = theirs.get(name).cloned().unwrap_or(Value::Null);
            if *v != w {
                let hint = if name.starts_with("the tokenized sample stream") {
                    " (every setting above agrees: the data files' contents or the chat template changed)"
                } else {
                    ""
                };
                return Some(format!("{name} was {v} when the cache was built, but is {w} for this run{hint}"));
            }
        }
        // Settings present only in this run's spec.
        for (name, w) in &theirs {
            if !mine.iter().any(|(n, _)| n == name) {
                return Some(format!("{name} was not recorded when the cache was built, but is {w} for this run"));
            }
        }
        None
    }
}

/// Incremental SHA-256 of a micro-batch stream.
#[derive(Default, Clone)]
pub struct StreamHasher {
    h: Sha256,
    pub micro_batches: u64,
    pub target_tokens: u64,
}

impl StreamHasher {
    pub fn add(&mut self, b: &Batch) {
        self.h.update((b.batch as u64).to_le_bytes());
        self.h.update((b.seq_len as u64).to_le_bytes());
        b.input_ids.iter().for_each(|x| self.h.update(x.to_le_bytes()));
        b.labels.iter().for_each(|x| self.h.update(x.to_le_bytes()));
        b.position_ids.iter().for_each(|x| self.h.update(x.to_le_bytes()));
        b.segment_ids.iter().for_each(|x| self.h.update(x.to_le_bytes()));
        self.micro_batches += 1;
        self.target_tokens += b.n_target_tokens as u64;
    }

    pub fn finish(self, settings: BTreeMap<String, Value>) -> StreamIdentity {
        StreamIdentity {
            settings,
            micro_batches: self.micro_batches,
            target_tokens: self.target_tokens,
            sha256: hex(&self.h.finalize()),
        }
    }
}

/// SHA-256 of what makes two tokenizers give the same ids: the vocabulary by id, the
/// special tokens, whether BOS is added, and the chat template.
pub fn tokenizer_sha256(tok: &TokenizerInfo) -> String {
    let mut vocab: Vec<(u32, String)> = tok.tokenizer.get_vocab(true).into_iter().map(|(s, i)| (i, s)).collect();
    vocab.sort();
    let mut h = Sha256::new();
    for (i, s) in &vocab {
        h.update(i.to_le_bytes());
        h.update((s.len() as u64).to_le_bytes());
        h.update(s.as_bytes());
    }
    let specials = serde_json::json!({
        "bos": tok.bos_id, "eos": tok.eos_id, "pad": tok.pad_id, "add_bos": tok.add_bos, "chat_template": tok.chat_template,
    });
    h.update(specials.to_string().as_bytes());
    hex(&h.finalize())
}

/// (config.json sha256, weight files sha256) of a model at a local path (an HF directory
/// or a single .safetensors / .gguf file); see [`TeacherIdentity`].
pub fn model_fingerprint(path: &Path) -> Result<(String, String)> {
    let (dir, files): (PathBuf, Vec<PathBuf>) = if path.is_dir() {
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| Error::io(path, e))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                name.ends_with(".safetensors") || name.ends_with(".gguf") || name.ends_with(".bin")
            })
            .collect();
        files.sort();
        (path.to_path_buf(), files)
    } else {
        (path.parent().unwrap_or(Path::new(".")).to_path_buf(), vec![path.to_path_buf()])
    };
    let config = dir.join("config.json");
    let config_sha = if path.is_dir() && config.exists() {
        hex(&Sha256::digest(std::fs::read(&config).map_err(|e| Error::io(&config, e))?))
    } else {
        String::new()
    };
    let mut h = Sha256::new();
    for f in &files {
        let name = f.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let mut file = File::open(f).map_err(|e| Error::io(f, e))?;
        let len = file.metadata().map_err(|e| Error::io(f, e))?.len();
        let mut head = Vec::new();
        (&mut file).take(1 << 20).read_to_end(&mut head).map_err(|e| Error::io(f, e))?;
        h.update((name.len() as u64).to_le_bytes());
        h.update(name.as_bytes());
        h.update(len.to_le_bytes());
        h.update(&head);
    }
    Ok((config_sha, hex(&h.finalize())))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------------------------------
// Manifest

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardInfo {
    pub file: String,
    /// Index of the shard's first micro-batch in the training stream.
    pub first_micro: u64,
    pub micro_batches: u64,
    pub tokens: u64,
    pub bytes: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    #[serde(flatten)]
    pub spec: CacheSpec,
    pub shards: Vec<ShardInfo>,
}

impl Manifest {
    pub fn total_bytes(&self) -> u64 {
        self.shards.iter().map(|s| s.bytes).sum()
    }

    pub fn micro_batches(&self) -> u64 {
        self.shards.iter().map(|s| s.micro_batches).sum()
    }

    fn read(path: &Path) -> Result<Manifest> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| Error::format(path, format!("not JSON: {e}")))?;
        // The version is checked before the rest so that a newer layout gets this message.
        match v.get("format_version").and_then(Value::as_u64) {
            Some(n) if n == FORMAT_VERSION as u64 => {}
            other => {
                return Err(Error::format(
                    path,
                    format!("teacher cache format version {other:?}; this qdistill reads version {FORMAT_VERSION}: rebuild the cache"),
                ))
            }
        }
        serde_json::from_value(v).map_err(|e| Error::format(path, format!("not a teacher cache manifest: {e}")))
    }

    /// Written to a temporary file, synced and renamed: a reader sees the old or the new
    /// manifest, never a torn one.
    fn write(&self, path: &Path) -> Result<()> {
        let tmp = path.with_extension("json.tmp");
        let text = serde_json::to_string_pretty(self).map_err(|e| Error::Msg(format!("manifest: {e}")))?;
        let mut f = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        f.write_all(text.as_bytes()).and_then(|()| f.write_all(b"\n")).and_then(|()| f.sync_all()).map_err(|e| Error::io(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
        sync_dir(path.parent().unwrap_or(Path::new(".")));
        Ok(())
    }
}

fn sync_dir(dir: &Path) {
    // Makes the rename durable; not every platform can open a directory, hence best effort.
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

fn shard_name(i: usize) -> String {
    format!("shard-{i:05}.bin")
}

fn block_bytes(spec: &CacheSpec, n: usize) -> u64 {
    4 + (n * spec.k * (spec.value_dtype.bytes() + spec.index_bytes)) as u64
}

/// SHA-256 and length of a file, read in 1 MiB pieces.
fn file_sha256(path: &Path) -> Result<(String, u64)> {
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(|e| Error::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        len += n as u64;
    }
    Ok((hex(&h.finalize()), len))
}

fn verify_shard(dir: &Path, s: &ShardInfo) -> Result<()> {
    let path = dir.join(&s.file);
    if !path.exists() {
        return Err(Error::format(&path, "teacher cache shard is missing"));
    }
    let (sha, len) = file_sha256(&path)?;
    if len != s.bytes {
        return Err(Error::format(&path, format!("teacher cache shard is {len} bytes, the manifest says {} (truncated or overwritten)", s.bytes)));
    }
    if sha != s.sha256 {
        return Err(Error::format(&path, format!("teacher cache shard is corrupt: SHA-256 {sha}, the manifest says {}", s.sha256)));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Writing

struct OpenShard {
    index: usize,
    tmp: PathBuf,
    w: BufWriter<File>,
    h: Sha256,
    first_micro: u64,
    micro_batches: u64,
    tokens: u64,
    bytes: u64,
}

/// Builds a cache directory shard by shard; see the module docs for the layout.
pub struct CacheWriter {
    dir: PathBuf,
    spec: CacheSpec,
    max_shard_bytes: u64,
    shards: Vec<ShardInfo>,
    open: Option<OpenShard>,
    next_micro: u64,
}

/// Where [`CacheWriter::create_or_resume`] finds a directory.
pub enum WriteStart {
    /// Nothing (or an interrupted build of the same spec) to continue from micro-batch
    /// `CacheWriter::next_micro()`.
    Write(CacheWriter),
    /// A finished cache of the same spec is there already.
    Complete(Manifest),
}

impl CacheWriter {
    /// Starts a cache in `dir`, or continues an interrupted build of the same spec there
    /// (its complete shards are verified and kept). A finished or partial cache of another
    /// spec is an error naming the first difference: nothing is overwritten.
    pub fn create_or_resume(dir: &Path, spec: CacheSpec, max_shard_bytes: u64) -> Result<WriteStart> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let manifest = dir.join(MANIFEST_NAME);
        if manifest.exists() {
            let m = Manifest::read(&manifest)?;
            if let Some(d) = m.spec.first_difference(&spec) {
                return Err(Error::Mismatch(format!(
                    "{} holds a finished teacher cache of another job: {d}; remove the directory or choose another --out",
                    dir.display()
                )));
            }
            return Ok(WriteStart::Complete(m));
        }
        let partial = dir.join(PARTIAL_MANIFEST_NAME);
        let shards = if partial.exists() {
            let m = Manifest::read(&partial)?;
            if let Some(d) = m.spec.first_difference(&spec) {
                return Err(Error::Mismatch(format!(
                    "{} holds an interrupted teacher cache of another job: {d}; remove the directory or choose another --out",
                    dir.display()
                )));
            }
            for s in &m.shards {
                verify_shard(dir, s)?;
            }
            m.shards
        } else {
            Vec::new()
        };
        // Shards that were being written when a build stopped.
        for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?.flatten() {
            if e.file_name().to_str().is_some_and(|n| n.starts_with(".shard-") && n.ends_with(".tmp")) {
                let _ = std::fs::remove_file(e.path());
            }
        }
        let next_micro = shards.iter().map(|s| s.micro_batches).sum();
        Ok(WriteStart::Write(CacheWriter { dir: dir.to_path_buf(), spec, max_shard_bytes: max_shard_bytes.max(1), shards, open: None, next_micro }))
    }

    /// The micro-batch the next `push` is for.
    pub fn next_micro(&self) -> u64 {
        self.next_micro
    }

    pub fn spec(&self) -> &CacheSpec {
        &self.spec
    }

    /// Appends the next micro-batch's rows. A shard is closed before a block that would
    /// take it past `max_shard_bytes` (a shard always holds at least one block).
    pub fn push(&mut self, rows: &TopKRows) -> Result<()> {
        let spec = &self.spec;
        if rows.k != spec.k || rows.indices.len() != rows.logprobs.len() {
            return Err(Error::Msg(format!(
                "teacher cache: rows with K = {} ({} values, {} ids) for a cache of K = {}",
                rows.k,
                rows.logprobs.len(),
                rows.indices.len(),
                spec.k
            )));
        }
        if let Some(&bad) = rows.indices.iter().find(|&&i| i as usize >= spec.vocab_size) {
            return Err(Error::Msg(format!("teacher cache: token id {bad} is outside the KD vocabulary [0, {})", spec.vocab_size)));
        }
        let n = rows.n_rows();
        let size = block_bytes(spec, n);
        if self.open.as_ref().is_some_and(|o| o.micro_batches > 0 && o.bytes + size > self.max_shard_bytes) {
            self.close_shard()?;
        }
        if self.open.is_none() {
            let index = self.shards.len();
            let tmp = self.dir.join(format!(".{}.tmp", shard_name(index)));
            let f = File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
            let mut o = OpenShard {
                index,
                tmp,
                w: BufWriter::with_capacity(1 << 20, f),
                h: Sha256::new(),
                first_micro: self.next_micro,
                micro_batches: 0,
                tokens: 0,
                bytes: 0,
            };
            write_hashed(&mut o, SHARD_MAGIC)?;
            self.open = Some(o);
        }
        let spec = &self.spec;
        let o = self.open.as_mut().expect("opened above");
        let mut block = Vec::with_capacity(size as usize);
        block.extend_from_slice(&(n as u32).to_le_bytes());
        match spec.value_dtype {
            ValueDtype::F32 => rows.logprobs.iter().for_each(|x| block.extend_from_slice(&x.to_le_bytes())),
            ValueDtype::F16 => rows.logprobs.iter().for_each(|x| block.extend_from_slice(&f16::from_f32(*x).to_le_bytes())),
        }
        let w = spec.index_bytes;
        rows.indices.iter().for_each(|i| block.extend_from_slice(&i.to_le_bytes()[..w]));
        write_hashed(o, &block)?;
        o.micro_batches += 1;
        o.tokens += n as u64;
        self.next_micro += 1;
        Ok(())
    }

    fn close_shard(&mut self) -> Result<()> {
        let Some(mut o) = self.open.take() else { return Ok(()) };
        o.w.flush().map_err(|e| Error::io(&o.tmp, e))?;
        o.w.get_ref().sync_all().map_err(|e| Error::io(&o.tmp, e))?;
        let file = shard_name(o.index);
        let path = self.dir.join(&file);
        std::fs::rename(&o.tmp, &path).map_err(|e| Error::io(&path, e))?;
        self.shards.push(ShardInfo {
            file,
            first_micro: o.first_micro,
            micro_batches: o.micro_batches,
            tokens: o.tokens,
            bytes: o.bytes,
            sha256: hex(&o.h.finalize()),
        });
        // The shard is durable under its final name before the manifest lists it.
        Manifest { spec: self.spec.clone(), shards: self.shards.clone() }.write(&self.dir.join(PARTIAL_MANIFEST_NAME))
    }

    /// Closes the last shard and writes `manifest.json`; the micro-batch count must be the
    /// spec's.
    pub fn finish(mut self) -> Result<Manifest> {
        self.close_shard()?;
        if self.next_micro != self.spec.stream.micro_batches {
            return Err(Error::Msg(format!(
                "teacher cache {}: {} micro-batches written, the stream has {}",
                self.dir.display(),
                self.next_micro,
                self.spec.stream.micro_batches
            )));
        }
        let m = Manifest { spec: self.spec.clone(), shards: self.shards.clone() };
        m.write(&self.dir.join(MANIFEST_NAME))?;
        let partial = self.dir.join(PARTIAL_MANIFEST_NAME);
        std::fs::remove_file(&partial).map_err(|e| Error::io(&partial, e))?;
        Ok(m)
    }
}

fn write_hashed(o: &mut OpenShard, bytes: &[u8]) -> Result<()> {
    o.w.write_all(bytes).map_err(|e| Error::io(&o.tmp, e))?;
    o.h.update(bytes);
    o.bytes += bytes.len() as u64;
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Reading

/// A finished cache whose shards have all been verified against the manifest.
#[derive(Debug)]
pub struct TeacherCache {
    dir: PathBuf,
    manifest: Manifest,
}

impl TeacherCache {
    /// Reads the manifest and checks every shard's size and SHA-256; a missing, truncated
    /// or corrupt shard is an error naming its file.
    pub fn open(dir: &Path) -> Result<TeacherCache> {
        let path = dir.join(MANIFEST_NAME);
        if !path.exists() {
            let why = if dir.join(PARTIAL_MANIFEST_NAME).exists() {
                "its build was interrupted; run `qdistill teacher-cache` again to finish it"
            } else {
                "not a teacher cache (build one with `qdistill teacher-cache CONFIG --out DIR`)"
            };
            return Err(Error::format(&path, format!("missing: {why}")));
        }
        let manifest = Manifest::read(&path)?;
        let mut next = 0;
        for s in &manifest.shards {
            if s.first_micro != next {
                return Err(Error::format(&path, format!("shard {} starts at micro-batch {}, expected {next}", s.file, s.first_micro)));
            }
            next += s.micro_batches;
            verify_shard(dir, s)?;
        }
        if next != manifest.spec.stream.micro_batches {
            return Err(Error::format(&path, format!("shards hold {next} micro-batches, the stream has {}", manifest.spec.stream.micro_batches)));
        }
        Ok(TeacherCache { dir: dir.to_path_buf(), manifest })
    }

    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Errors unless this run's spec equals the one the cache was built with, naming the
    /// first field that differs.
    pub fn check_spec(&self, want: &CacheSpec) -> Result<()> {
        match self.manifest.spec.first_difference(want) {
            None => Ok(()),
            Some(d) => Err(Error::Mismatch(format!(
                "teacher cache {} does not fit this run: {d}; rebuild it with `qdistill teacher-cache` for this config",
                self.dir.display()
            ))),
        }
    }

    /// Reads micro-batches in order from `first_micro` (a resumed run starts mid-stream).
    pub fn reader(&self, first_micro: u64) -> Result<CacheReader<'_>> {
        let mut r = CacheReader { cache: self, shard: 0, file: None, micro: 0 };
        r.seek(first_micro)?;
        Ok(r)
    }
}

pub struct CacheReader<'a> {
    cache: &'a TeacherCache,
    shard: usize,
    file: Option<BufReader<File>>,
    /// The micro-batch the next `next_rows` returns.
    micro: u64,
}

impl CacheReader<'_> {
    fn shard_path(&self) -> PathBuf {
        self.cache.dir.join(&self.cache.manifest.shards[self.shard].file)
    }

    fn open_shard(&mut self, shard: usize) -> Result<()> {
        self.shard = shard;
        let path = self.shard_path();
        let mut f = BufReader::with_capacity(1 << 20, File::open(&path).map_err(|e| Error::io(&path, e))?);
        let mut magic = [0u8; 8];
        f.read_exact(&mut magic).map_err(|e| Error::io(&path, e))?;
        if &magic != SHARD_MAGIC {
            return Err(Error::format(&path, "not a teacher cache shard (bad magic)"));
        }
        self.file = Some(f);
        self.micro = self.cache.manifest.shards[shard].first_micro;
        Ok(())
    }

    fn seek(&mut self, target: u64) -> Result<()> {
        let shards = &self.cache.manifest.shards;
        let Some(i) = shards.iter().position(|s| target < s.first_micro + s.micro_batches) else {
            return Err(Error::Msg(format!(
                "teacher cache {}: micro-batch {target} is past its end ({} micro-batches)",
                self.cache.dir.display(),
                self.cache.manifest.micro_batches()
            )));
        };
        self.open_shard(i)?;
        let spec = &self.cache.manifest.spec;
        while self.micro < target {
            let path = self.shard_path();
            let f = self.file.as_mut().expect("opened above");
            let n = read_u32(f, &path)? as usize;
            let skip = block_bytes(spec, n) - 4;
            f.seek(SeekFrom::Current(skip as i64)).map_err(|e| Error::io(&path, e))?;
            self.micro += 1;
        }
        Ok(())
    }

    /// The next micro-batch's rows; `expect_rows` is the number of supervised tokens of
    /// the micro-batch the trainer is at, so a cache out of step with the data stream is an
    /// error rather than silently misaligned targets.
    pub fn next_rows(&mut self, expect_rows: usize) -> Result<TopKRows> {
        let shards = &self.cache.manifest.shards;
        let s = &shards[self.shard];
        if self.micro >= s.first_micro + s.micro_batches {
            if self.shard + 1 >= shards.len() {
                return Err(Error::Msg(format!(
                    "teacher cache {}: the training stream asks for micro-batch {}, the cache ends there",
                    self.cache.dir.display(),
                    self.micro
                )));
            }
            self.open_shard(self.shard + 1)?;
        }
        let spec = &self.cache.manifest.spec;
        let path = self.shard_path();
        let f = self.file.as_mut().expect("a shard is open");
        let n = read_u32(f, &path)? as usize;
        if n != expect_rows {
            return Err(Error::format(
                &path,
                format!(
                    "micro-batch {} has {n} cached tokens but the training stream's has {expect_rows} supervised tokens",
                    self.micro
                ),
            ));
        }
        let k = spec.k;
        let mut vals = vec![0u8; n * k * spec.value_dtype.bytes()];
        f.read_exact(&mut vals).map_err(|e| Error::io(&path, e))?;
        let logprobs: Vec<f32> = match spec.value_dtype {
            ValueDtype::F32 => vals.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            ValueDtype::F16 => vals.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        };
        let w = spec.index_bytes;
        let mut ids = vec![0u8; n * k * w];
        f.read_exact(&mut ids).map_err(|e| Error::io(&path, e))?;
        let indices = ids
            .chunks_exact(w)
            .map(|c| {
                let mut b = [0u8; 4];
                b[..w].copy_from_slice(c);
                u32::from_le_bytes(b)
            })
            .collect();
        self.micro += 1;
        Ok(TopKRows { k, logprobs, indices })
    }
}

fn read_u32(f: &mut BufReader<File>, path: &Path) -> Result<u32> {
    let mut b = [0u8; 4];
    f.read_exact(&mut b).map_err(|e| Error::io(path, e))?;
    Ok(u32::from_le_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn spec(k: usize, dtype: ValueDtype, vocab: usize, micro: u64) -> CacheSpec {
        CacheSpec {
            format_version: FORMAT_VERSION,
            k,
            temperature: 2.0,
            vocab_size: vocab,
            value_dtype: dtype,
            index_bytes: index_bytes_for(vocab),
            teacher: TeacherIdentity {
                mode: "model".into(),
                model_name_or_path: "t".into(),
                quantization: "none".into(),
                keep_layers: None,
                config_sha256: "c".into(),
                weights_sha256: "w".into(),
            },
            tokenizer_sha256: "tok".into(),
            stream: StreamIdentity {
                settings: [("seed".to_string(), Value::from(1))].into_iter().collect(),
                micro_batches: micro,
                target_tokens: 0,
                sha256: "s".into(),
            },
        }
    }

    fn random_rows(rng: &mut ChaCha8Rng, n: usize, k: usize, vocab: usize) -> TopKRows {
        let mut logprobs = Vec::new();
        let mut indices = Vec::new();
        for _ in 0..n {
            let mut ids: Vec<u32> = Vec::new();
            while ids.len() < k {
                let i = rng.random_range(0..vocab as u32);
                if !ids.contains(&i) {
                    ids.push(i);
                }
            }
            indices.extend(ids);
            logprobs.extend((0..k).map(|_| -rng.random_range(0.0f32..30.0)));
        }
        TopKRows { k, logprobs, indices }
    }

    #[test]
    fn select_matches_a_full_sort() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let (n, v, k) = (7, 50, 6);
        // Few distinct values, so ties are common and their order is tested too.
        let x: Vec<f32> = (0..n * v).map(|_| rng.random_range(0..8) as f32 * -0.5).collect();
        let got = TopKRows::select(&x, v, k).unwrap();
        for r in 0..n {
            let mut all: Vec<(f32, u32)> = (0..v).map(|j| (x[r * v + j], j as u32)).collect();
            // Independent order: stable sort by value only keeps ascending ids among ties.
            all.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap());
            let want: Vec<u32> = all[..k].iter().map(|p| p.1).collect();
            assert_eq!(&got.indices[r * k..(r + 1) * k], want.as_slice(), "row {r}");
            assert_eq!(&got.logprobs[r * k..(r + 1) * k], all[..k].iter().map(|p| p.0).collect::<Vec<_>>().as_slice());
        }
        let mut bad = x.clone();
        bad[v + 3] = f32::NAN;
        let e = TopKRows::select(&bad, v, k).unwrap_err().to_string();
        assert!(e.contains("row 1") && e.contains("token 3"), "{e}");
    }

    #[test]
    fn expand_puts_rows_at_supervised_tokens() {
        let rows = TopKRows { k: 2, logprobs: vec![-0.1, -2.0, -0.3, -1.5], indices: vec![5, 9, 7, 1] };
        let labels = [IGNORE_INDEX, 4, IGNORE_INDEX, 8];
        let (lp, ix) = rows.expand(&labels).unwrap();
        let ninf = f32::NEG_INFINITY;
        assert_eq!(lp, vec![ninf, ninf, -0.1, -2.0, ninf, ninf, -0.3, -1.5]);
        assert_eq!(ix, vec![0, 1, 5, 9, 0, 1, 7, 1]);
        assert!(rows.expand(&[4, 5, 6]).is_err());
    }

    #[test]
    fn index_widths() {
        assert_eq!(index_bytes_for(49_152), 2);
        assert_eq!(index_bytes_for(65_536), 2);
        assert_eq!(index_bytes_for(65_537), 3);
        assert_eq!(index_bytes_for(128_256), 3);
        assert_eq!(index_bytes_for(1 << 24), 3);
        assert_eq!(index_bytes_for((1 << 24) + 1), 4);
    }

    /// Writes random blocks over several shards (24-bit ids), reads them back from the start
    /// and from the middle; f32 comes back bit for bit, f16 as `ValueDtype::round` rounds.
    #[test]
    fn write_read_roundtrip_across_shards() {
        for dtype in [ValueDtype::F32, ValueDtype::F16] {
            let dir = tempfile::tempdir().unwrap();
            let (k, vocab, micro) = (3, 100_000, 9u64);
            let mut rng = ChaCha8Rng::seed_from_u64(11);
            let blocks: Vec<TopKRows> = (0..micro).map(|i| random_rows(&mut rng, (i as usize * 5) % 7, k, vocab)).collect();
            let WriteStart::Write(mut w) = CacheWriter::create_or_resume(dir.path(), spec(k, dtype, vocab, micro), 120).unwrap() else {
                panic!("fresh dir")
            };
            for b in &blocks {
                w.push(b).unwrap();
            }
            let m = w.finish().unwrap();
            assert!(m.shards.len() > 2, "{} shards", m.shards.len());
            assert!(!dir.path().join(PARTIAL_MANIFEST_NAME).exists());
            let cache = TeacherCache::open(dir.path()).unwrap();
            for start in [0u64, 4] {
                let mut r = cache.reader(start).unwrap();
                for b in &blocks[start as usize..] {
                    let got = r.next_rows(b.n_rows()).unwrap();
                    let mut want = b.logprobs.clone();
                    dtype.round(&mut want);
                    assert_eq!(got.indices, b.indices);
                    assert_eq!(got.logprobs.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), want.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
                }
                assert!(r.next_rows(0).is_err(), "reading past the end must fail");
            }
            // Misalignment with the trainer's stream is caught.
            let mut r = cache.reader(1).unwrap();
            let e = r.next_rows(blocks[1].n_rows() + 1).unwrap_err().to_string();
            assert!(e.contains("micro-batch 1"), "{e}");
        }
    }

    #[test]
    fn corrupt_truncated_or_missing_shard_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let WriteStart::Write(mut w) = CacheWriter::create_or_resume(dir.path(), spec(2, ValueDtype::F16, 500, 4), 60).unwrap() else {
            panic!()
        };
        for _ in 0..4 {
            w.push(&random_rows(&mut rng, 4, 2, 500)).unwrap();
        }
        let m = w.finish().unwrap();
        let victim = dir.path().join(&m.shards[1].file);
        let good = std::fs::read(&victim).unwrap();
        let mut bad = good.clone();
        bad[20] ^= 1;
        std::fs::write(&victim, &bad).unwrap();
        let e = TeacherCache::open(dir.path()).unwrap_err().to_string();
        assert!(e.contains(&m.shards[1].file) && e.contains("corrupt"), "{e}");
        std::fs::write(&victim, &good[..good.len() - 3]).unwrap();
        let e = TeacherCache::open(dir.path()).unwrap_err().to_string();
        assert!(e.contains(&m.shards[1].file) && e.contains("truncated"), "{e}");
        std::fs::remove_file(&victim).unwrap();
        let e = TeacherCache::open(dir.path()).unwrap_err().to_string();
        assert!(e.contains(&m.shards[1].file) && e.contains("missing"), "{e}");
    }

    /// An interrupted build keeps its complete shards and continues after them; the result
    /// reads back the same as an uninterrupted build.
    #[test]
    fn interrupted_build_resumes_after_the_last_complete_shard() {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let blocks: Vec<TopKRows> = (0..6).map(|_| random_rows(&mut rng, 3, 2, 300)).collect();
        let s = spec(2, ValueDtype::F32, 300, 6);
        let WriteStart::Write(mut w) = CacheWriter::create_or_resume(dir.path(), s.clone(), 80).unwrap() else { panic!() };
        for b in &blocks[..4] {
            w.push(b).unwrap();
        }
        drop(w); // the process dies: the open shard stays a temporary file
        assert!(!dir.path().join(MANIFEST_NAME).exists());
        assert!(TeacherCache::open(dir.path()).unwrap_err().to_string().contains("interrupted"));
        let WriteStart::Write(mut w) = CacheWriter::create_or_resume(dir.path(), s.clone(), 80).unwrap() else { panic!() };
        let done = w.next_micro() as usize;
        assert!(done > 0 && done < 4, "resumes after complete shards only, got {done}");
        for b in &blocks[done..] {
            w.push(b).unwrap();
        }
        w.finish().unwrap();
        let cache = TeacherCache::open(dir.path()).unwrap();
        let mut r = cache.reader(0).unwrap();
        for b in &blocks {
            assert_eq!(&r.next_rows(3).unwrap(), b);
        }
        assert!(matches!(CacheWriter::create_or_resume(dir.path(), s.clone(), 80).unwrap(), WriteStart::Complete(_)));
        // Another job's spec is refused, naming the field.
        let mut other = s.clone();
        other.temperature = 1.0;
        let e = CacheWriter::create_or_resume(dir.path(), other.clone(), 80).err().unwrap().to_string();
        assert!(e.contains("distill.temperature"), "{e}");
        let e = cache.check_spec(&other).unwrap_err().to_string();
        assert!(e.contains("distill.temperature") && e.contains('2') && e.contains('1'), "{e}");
    }

    #[test]
    fn first_difference_names_the_field() {
        let a = spec(4, ValueDtype::F16, 1000, 3);
        assert_eq!(a.first_difference(&a.clone()), None);
        let mut b = a.clone();
        b.stream.settings.insert("seed".into(), Value::from(2));
        assert!(b.first_difference(&a).unwrap().starts_with("seed was 2"));
        let mut b = a.clone();
        b.stream.sha256 = "other".into();
        let d = a.first_difference(&b).unwrap();
        assert!(d.contains("tokenized sample stream") && d.contains("data files"), "{d}");
        let mut b = a.clone();
        b.teacher.weights_sha256 = "x".into();
        assert!(a.first_difference(&b).unwrap().contains("weight files"));
        let mut b = a.clone();
        b.stream.settings.insert("data.packing".into(), Value::from(true));
        assert!(a.first_difference(&b).unwrap().contains("data.packing"));
    }
}
