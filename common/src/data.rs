//! Training data: records from JSONL/JSON/Parquet files → token samples whose labels mark what is
//! trained → a data set that is split, mixed with a rehearsal set, shuffled by epoch, packed
//! and cut into batches, with a cursor from which iteration resumes exactly.
//!
//! Labels follow HF: `-100` ([`IGNORE_INDEX`]) marks tokens that are not trained. In a
//! [`Sample`] labels are aligned with the inputs (`labels[t]` is `input_ids[t]` or -100); in a
//! [`Row`] or [`Batch`] they are already shifted (`labels[t]` is the target for position `t`).

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};

use crate::chat_template::{ChatTemplate, Message};
use crate::tokenizer::TokenizerInfo;
use crate::{Error, Result};

/// Label of a position that is not trained (PyTorch's CrossEntropyLoss `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;

// ---------------------------------------------------------------------------------------
// Records

/// Record layouts of the data sets users already have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataFormat {
    /// Decided from the keys of the first record.
    #[default]
    Auto,
    /// `{"instruction", "input"?, "output"}`.
    Alpaca,
    /// `{"conversations": [{"from": "human"|"gpt"|"system", "value"}]}`.
    #[serde(rename = "sharegpt")]
    ShareGpt,
    /// `{"messages": [{"role", "content"}]}`.
    Messages,
    /// `{"prompt", "completion"}` (strings).
    PromptCompletion,
    /// `{"text"}`.
    Text,
}

impl DataFormat {
    pub fn name(self) -> &'static str {
        match self {
            DataFormat::Auto => "auto",
            DataFormat::Alpaca => "alpaca",
            DataFormat::ShareGpt => "sharegpt",
            DataFormat::Messages => "messages",
            DataFormat::PromptCompletion => "prompt_completion",
            DataFormat::Text => "text",
        }
    }

    /// The format a record's keys imply.
    pub fn detect(record: &Map<String, Json>) -> Option<DataFormat> {
        let has = |k: &str| record.contains_key(k);
        if has("messages") {
            Some(DataFormat::Messages)
        } else if has("conversations") {
            Some(DataFormat::ShareGpt)
        } else if has("instruction") && has("output") {
            Some(DataFormat::Alpaca)
        } else if has("prompt") && has("completion") {
            Some(DataFormat::PromptCompletion)
        } else if has("text") {
            Some(DataFormat::Text)
        } else {
            None
        }
    }
}

impl std::str::FromStr for DataFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "auto" => DataFormat::Auto,
            "alpaca" => DataFormat::Alpaca,
            "sharegpt" | "share_gpt" => DataFormat::ShareGpt,
            "messages" | "chat" => DataFormat::Messages,
            "prompt_completion" | "prompt-completion" => DataFormat::PromptCompletion,
            "text" => DataFormat::Text,
            other => {
                return Err(Error::Config(format!(
                    "unknown data format `{other}` (expected auto, alpaca, sharegpt, messages, prompt_completion or text)"
                )))
            }
        })
    }
}

/// One parsed record, independent of the file layout it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Alpaca {
        instruction: String,
        input: String,
        output: String,
    },
    /// ShareGPT and messages records, with roles mapped to system/user/assistant.
    Chat(Vec<Message>),
    PromptCompletion {
        prompt: String,
        completion: String,
    },
    Text(String),
}

/// Records read from one file.
#[derive(Debug, Clone)]
pub struct Records {
    pub records: Vec<Record>,
    /// The format used (the detected one when [`DataFormat::Auto`] was asked for).
    pub format: DataFormat,
    /// Malformed lines (or array elements) skipped under `skip_malformed`.
    pub skipped: usize,
}

/// Reads a JSONL file (one JSON object a line; `.jsonl`, `.ndjson`, or any file whose first
/// character is `{`), a JSON file holding one array of objects, or a `.parquet` file (one
/// record a row, columns named as the JSON keys). A malformed line is an
/// [`Error::Format`] naming the file, the 1-based line (for arrays: the 1-based record; for
/// Parquet: the 0-based row group and row) and what is wrong, unless `skip_malformed`, which skips and counts it instead.
pub fn read_records(path: &Path, format: DataFormat, skip_malformed: bool) -> Result<Records> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let mut reader = RecordReader {
        path,
        format,
        skip_malformed,
        records: Vec::new(),
        skipped: 0,
    };
    if ext == "parquet" {
        read_parquet(&mut reader)?;
        return Ok(reader.finish());
    }
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let bytes = bytes.strip_prefix(b"\xef\xbb\xbf").unwrap_or(&bytes);
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace()).copied();
    if first == Some(b'[') && ext != "jsonl" && ext != "ndjson" {
        let items: Vec<Json> = serde_json::from_slice(bytes)
            .map_err(|e| Error::format(path, format!("not a JSON array of records: {e}")))?;
        for (i, item) in items.into_iter().enumerate() {
            reader.add(|| format!("record {}", i + 1), Ok(item))?;
        }
    } else {
        for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let parsed = std::str::from_utf8(line)
                .map_err(|e| format!("invalid UTF-8: {e}"))
                .and_then(|s| {
                    serde_json::from_str::<Json>(s).map_err(|e| format!("invalid JSON: {e}"))
                });
            reader.add(|| format!("line {}", i + 1), parsed)?;
        }
    }
    Ok(reader.finish())
}

/// Reads a Parquet file row by row: each row becomes the JSON object a JSONL line of the
/// same data set would hold (structs → objects, lists → arrays, nulls → null), so both
/// go through the same record parser. Errors name the 0-based row group and row within it,
/// as pyarrow's `ParquetFile.read_row_group(g)` counts them.
fn read_parquet(reader: &mut RecordReader) -> Result<()> {
    use parquet::file::reader::{FileReader, SerializedFileReader};
    let path = reader.path;
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let pq = SerializedFileReader::new(file)
        .map_err(|e| Error::format(path, format!("not a readable Parquet file: {e}")))?;
    for g in 0..pq.num_row_groups() {
        let at = |r: Option<usize>, e: parquet::errors::ParquetError| {
            let place = match r {
                Some(r) => format!("row group {g}, row {r}"),
                None => format!("row group {g}"),
            };
            // Only snappy (pyarrow's and `datasets`' default) is built in, to keep the
            // build small; say how to get a readable file.
            let hint = if e.to_string().contains("Disabled feature at compile time") {
                "; this build reads uncompressed and snappy-compressed Parquet: rewrite the file with \
                 pyarrow.parquet.write_table(table, path, compression=\"snappy\")"
            } else {
                ""
            };
            Error::format(path, format!("{place}: cannot decode: {e}{hint}"))
        };
        let group = pq.get_row_group(g).map_err(|e| at(None, e))?;
        let rows = group.get_row_iter(None).map_err(|e| at(None, e))?;
        for (r, row) in rows.enumerate() {
            // A page that does not decode (corrupt, or a codec this build lacks) is not a
            // malformed record: skip_malformed does not apply.
            let row = row.map_err(|e| at(Some(r), e))?;
            reader.add(|| format!("row group {g}, row {r}"), Ok(row.to_json_value()))?;
        }
    }
    Ok(())
}

struct RecordReader<'a> {
    path: &'a Path,
    format: DataFormat,
    skip_malformed: bool,
    records: Vec<Record>,
    skipped: usize,
}

impl RecordReader<'_> {
    fn finish(self) -> Records {
        Records {
            records: self.records,
            format: self.format,
            skipped: self.skipped,
        }
    }

    /// `place` names the line or record for the error message.
    fn add(
        &mut self,
        place: impl Fn() -> String,
        parsed: std::result::Result<Json, String>,
    ) -> Result<()> {
        match parsed.and_then(|v| self.parse(&v)) {
            Ok(r) => self.records.push(r),
            Err(_) if self.skip_malformed => self.skipped += 1,
            Err(msg) => return Err(Error::format(self.path, format!("{}: {msg}", place()))),
        }
        Ok(())
    }

    fn parse(&mut self, v: &Json) -> std::result::Result<Record, String> {
        let obj = v
            .as_object()
            .ok_or_else(|| format!("expected a JSON object, got {}", kind(v)))?;
        if self.format == DataFormat::Auto {
            let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
            keys.sort_unstable();
            self.format = DataFormat::detect(obj).ok_or_else(|| {
                format!(
                    "cannot tell the data format from keys {keys:?}; expected `messages`, `conversations`, \
                     `instruction`+`output`, `prompt`+`completion` or `text`"
                )
            })?;
        }
        parse_record(obj, self.format)
    }
}

fn kind(v: &Json) -> &'static str {
    match v {
        Json::Null => "null",
        Json::Bool(_) => "a boolean",
        Json::Number(_) => "a number",
        Json::String(_) => "a string",
        Json::Array(_) => "an array",
        Json::Object(_) => "an object",
    }
}

fn string_field(
    obj: &Map<String, Json>,
    key: &str,
    format: DataFormat,
) -> std::result::Result<String, String> {
    match obj.get(key) {
        Some(Json::String(s)) => Ok(s.clone()),
        Some(other) => Err(format!("`{key}` must be a string, got {}", kind(other))),
        None => Err(format!("missing `{key}` (format {})", format.name())),
    }
}

/// Parses one record of a known format.
pub fn parse_record(
    obj: &Map<String, Json>,
    format: DataFormat,
) -> std::result::Result<Record, String> {
    match format {
        DataFormat::Auto => Err("format must be resolved before parsing".into()),
        DataFormat::Alpaca => Ok(Record::Alpaca {
            instruction: string_field(obj, "instruction", format)?,
            input: match obj.get("input") {
                None | Some(Json::Null) => String::new(),
                Some(_) => string_field(obj, "input", format)?,
            },
            output: string_field(obj, "output", format)?,
        }),
        DataFormat::PromptCompletion => Ok(Record::PromptCompletion {
            prompt: string_field(obj, "prompt", format)?,
            completion: string_field(obj, "completion", format)?,
        }),
        DataFormat::Text => Ok(Record::Text(string_field(obj, "text", format)?)),
        DataFormat::ShareGpt => {
            let turns = list_field(obj, "conversations", format)?;
            let mut messages = Vec::with_capacity(turns.len());
            for (i, t) in turns.iter().enumerate() {
                let t = t
                    .as_object()
                    .ok_or_else(|| format!("conversations[{i}] is {}, not an object", kind(t)))?;
                let from = string_field(t, "from", format)
                    .map_err(|e| format!("conversations[{i}]: {e}"))?;
                let role = match from.as_str() {
                    "human" | "user" => "user",
                    "gpt" | "assistant" | "model" => "assistant",
                    "system" => "system",
                    other => {
                        return Err(format!(
                            "conversations[{i}].from = {other:?}; expected \"human\", \"gpt\" or \"system\""
                        ))
                    }
                };
                let value = string_field(t, "value", format)
                    .map_err(|e| format!("conversations[{i}]: {e}"))?;
                messages.push(Message::new(role, value));
            }
            Ok(Record::Chat(messages))
        }
        DataFormat::Messages => {
            let turns = list_field(obj, "messages", format)?;
            let mut messages = Vec::with_capacity(turns.len());
            for (i, t) in turns.iter().enumerate() {
                let t = t
                    .as_object()
                    .ok_or_else(|| format!("messages[{i}] is {}, not an object", kind(t)))?;
                let role =
                    string_field(t, "role", format).map_err(|e| format!("messages[{i}]: {e}"))?;
                let content = string_field(t, "content", format)
                    .map_err(|e| format!("messages[{i}]: {e}"))?;
                messages.push(Message::new(role, content));
            }
            Ok(Record::Chat(messages))
        }
    }
}

fn list_field<'a>(
    obj: &'a Map<String, Json>,
    key: &str,
    format: DataFormat,
) -> std::result::Result<&'a [Json], String> {
    match obj.get(key) {
        Some(Json::Array(a)) if a.is_empty() => Err(format!("`{key}` is empty")),
        Some(Json::Array(a)) => Ok(a),
        Some(other) => Err(format!("`{key}` must be an array, got {}", kind(other))),
        None => Err(format!("missing `{key}` (format {})", format.name())),
    }
}

// ---------------------------------------------------------------------------------------
// Tokenization and masks

/// One tokenized training example. `labels[t]` is `input_ids[t]` where that token is trained
/// and [`IGNORE_INDEX`] elsewhere.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Sample {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i64>,
}

impl Sample {
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    pub fn n_trained(&self) -> usize {
        self.labels.iter().filter(|&&l| l != IGNORE_INDEX).count()
    }

    /// Keeps the first `max_len` tokens and makes the last of them EOS, trained if the
    /// token it replaces was, so that a truncated sample still teaches the model to stop.
    /// Returns whether anything was cut.
    pub fn truncate_keep_eos(&mut self, max_len: usize, eos_id: u32) -> bool {
        if self.input_ids.len() <= max_len || max_len == 0 {
            return false;
        }
        self.input_ids.truncate(max_len);
        self.labels.truncate(max_len);
        let last = max_len - 1;
        self.input_ids[last] = eos_id;
        if self.labels[last] != IGNORE_INDEX {
            self.labels[last] = i64::from(eos_id);
        }
        true
    }
}

/// The Alpaca prompt (Stanford Alpaca's wording, with the newline after `### Response:` that
/// most trainers add), used for alpaca records when there is no chat template.
pub fn alpaca_prompt(instruction: &str, input: &str) -> String {
    if input.is_empty() {
        format!(
            "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n\
             ### Instruction:\n{instruction}\n\n### Response:\n"
        )
    } else {
        format!(
            "Below is an instruction that describes a task, paired with an input that provides further context. \
             Write a response that appropriately completes the request.\n\n\
             ### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
        )
    }
}

/// Turns records into [`Sample`]s with one tokenizer and (optionally) chat template.
///
/// - Chat records (and alpaca records when there is a template) are rendered with the chat
///   template and tokenized as one text, with offsets. Only assistant turns are trained: the
///   render of `messages[..i]` with `add_generation_prompt=true` is the prompt prefix of
///   assistant message `i`, so its span starts where that prefix ends; the span runs to the
///   first special token (the turn's end token, e.g. `<|im_end|>`, `<|eot_id|>`), which is
///   trained too, and never past the end of the render of `messages[..=i]` (when that is a
///   prefix of the whole) or else the start of the next message's content. A token is in a
///   span when its byte range overlaps it (transformers' `return_assistant_tokens_mask`
///   rule). If the prefix render is not a prefix of the whole render (templates that render
///   a turn differently once it is no longer the last), the span starts after the last
///   generation prompt before the message's content, or at the content itself.
/// - Alpaca records without a template use [`alpaca_prompt`]; the prompt is masked and the
///   output plus EOS is trained. Prompt/completion records are the same with the given prompt.
/// - Text records train every token and end with EOS.
/// - BOS is prepended when the tokenizer says `add_bos` and the text does not already start
///   with it (chat templates often write it themselves).
/// - With `max_seq_length`, longer samples are cut by [`Sample::truncate_keep_eos`].
pub struct SampleBuilder<'a> {
    tok: &'a TokenizerInfo,
    template: Option<&'a ChatTemplate>,
    max_seq_length: Option<usize>,
    special_ids: HashSet<u32>,
}

impl<'a> SampleBuilder<'a> {
    pub fn new(
        tok: &'a TokenizerInfo,
        template: Option<&'a ChatTemplate>,
        max_seq_length: Option<usize>,
    ) -> Self {
        SampleBuilder {
            tok,
            template,
            max_seq_length,
            special_ids: tok.special_ids(),
        }
    }

    /// The sample and whether it was truncated.
    pub fn build(&self, record: &Record) -> Result<(Sample, bool)> {
        let mut sample = match record {
            Record::Chat(messages) => self.chat(messages)?,
            Record::Alpaca {
                instruction,
                input,
                output,
            } => match self.template {
                Some(_) => {
                    let user = if input.is_empty() {
                        instruction.clone()
                    } else {
                        format!("{instruction}\n\n{input}")
                    };
                    self.chat(&[
                        Message::new("user", user),
                        Message::new("assistant", output.clone()),
                    ])?
                }
                None => self.prompt_completion(&alpaca_prompt(instruction, input), output)?,
            },
            Record::PromptCompletion { prompt, completion } => {
                self.prompt_completion(prompt, completion)?
            }
            Record::Text(text) => {
                let mut ids = self.tok.encode(text, false)?;
                ids.push(self.tok.eos_id);
                let labels = ids.iter().map(|&i| i64::from(i)).collect();
                self.with_bos(
                    text,
                    Sample {
                        input_ids: ids,
                        labels,
                    },
                )
            }
        };
        let truncated = match self.max_seq_length {
            Some(max) => sample.truncate_keep_eos(max, self.tok.eos_id),
            None => false,
        };
        Ok((sample, truncated))
    }

    fn with_bos(&self, text: &str, mut s: Sample) -> Sample {
        if let (true, Some(bos_id), Some(bos)) = (
            self.tok.add_bos,
            self.tok.bos_id,
            self.tok.bos_token.as_deref(),
        ) {
            if !text.starts_with(bos) {
                s.input_ids.insert(0, bos_id);
                s.labels.insert(0, IGNORE_INDEX);
            }
        }
        s
    }

    fn prompt_completion(&self, prompt: &str, completion: &str) -> Result<Sample> {
        let text = format!("{prompt}{completion}");
        let (mut ids, offsets) = self.tok.encode_with_offsets(&text)?;
        let boundary = prompt.len();
        let mut labels: Vec<i64> = ids
            .iter()
            .zip(&offsets)
            .map(|(&id, &(_, end))| {
                if end > boundary {
                    i64::from(id)
                } else {
                    IGNORE_INDEX
                }
            })
            .collect();
        ids.push(self.tok.eos_id);
        labels.push(i64::from(self.tok.eos_id));
        Ok(self.with_bos(
            &text,
            Sample {
                input_ids: ids,
                labels,
            },
        ))
    }

    fn chat(&self, messages: &[Message]) -> Result<Sample> {
        let template = self.template.ok_or_else(|| {
            Error::Data(format!(
                "chat records need a chat template, and {} has none",
                self.tok.source.display()
            ))
        })?;
        let full = template.render(messages, false)?;
        let mut spans = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            if m.role != "assistant" {
                continue;
            }
            let start = match template.render(&messages[..i], true) {
                Ok(prefix) if full.starts_with(&prefix) => prefix.len(),
                _ => self.turn_start(template, messages, i, &full)?,
            };
            // The turn ends where the conversation cut after it ends, if that renders as a
            // prefix of the whole; else no later than where the next message's content starts.
            let end = match template.render(&messages[..=i], false) {
                Ok(upto) if full.starts_with(&upto) => upto.len(),
                _ if i + 1 < messages.len() => {
                    content_start(template, messages, i + 1, &full)?.unwrap_or(full.len())
                }
                _ => full.len(),
            };
            spans.push((start, end.max(start)));
        }
        let (ids, offsets) = self.tok.encode_with_offsets(&full)?;
        let mut labels = vec![IGNORE_INDEX; ids.len()];
        for (start, end) in spans {
            for t in 0..ids.len() {
                let (a, b) = offsets[t];
                if b <= start || a >= end {
                    continue;
                }
                labels[t] = i64::from(ids[t]);
                if self.special_ids.contains(&ids[t]) {
                    break;
                }
            }
        }
        Ok(self.with_bos(
            &full,
            Sample {
                input_ids: ids,
                labels,
            },
        ))
    }
}

impl SampleBuilder<'_> {
    /// Fallback start of assistant turn `i` for templates whose render of `messages[..i]`
    /// is not a prefix of the whole (they render a turn differently once it is no longer the
    /// last): just after the last generation prompt (`<|im_start|>assistant\n`, the text that
    /// `add_generation_prompt` appends) before the message's content, else the content itself.
    fn turn_start(
        &self,
        template: &ChatTemplate,
        messages: &[Message],
        i: usize,
        full: &str,
    ) -> Result<usize> {
        let content = content_start(template, messages, i, full)?.ok_or_else(|| {
            Error::Data(format!(
                "chat template from {}: cannot locate assistant message {i} in the rendered conversation",
                template.source()
            ))
        })?;
        let generation_prompt = match (
            template.render(&messages[..i], true),
            template.render(&messages[..i], false),
        ) {
            (Ok(with), Ok(without)) if with.len() > without.len() && with.starts_with(&without) => {
                Some(with[without.len()..].to_string())
            }
            _ => None,
        };
        Ok(generation_prompt
            .and_then(|g| full[..content].rfind(&g).map(|p| p + g.len()))
            .unwrap_or(content))
    }
}

/// Byte offset in `full` where message `j`'s content starts: the first byte at which the
/// render changes when that content gets a marker character prepended. `None` if the
/// template does not write the content where it can be found this way.
fn content_start(
    template: &ChatTemplate,
    messages: &[Message],
    j: usize,
    full: &str,
) -> Result<Option<usize>> {
    let mut changed = messages.to_vec();
    let marker = if changed[j].content.starts_with('\u{E000}') {
        '\u{E001}'
    } else {
        '\u{E000}'
    };
    changed[j].content.insert(0, marker);
    let other = template.render(&changed, false)?;
    let mut common = full
        .bytes()
        .zip(other.bytes())
        .take_while(|(a, b)| a == b)
        .count();
    // The marker may share leading bytes with the content's first char.
    while !full.is_char_boundary(common) {
        common -= 1;
    }
    Ok((common < full.len() || common < other.len()).then_some(common))
}

// ---------------------------------------------------------------------------------------
// Data sets

/// Tokenized samples; a sample's id is its index here.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dataset {
    pub samples: Vec<Sample>,
}

/// What loading a file did, for the log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoadReport {
    pub format: DataFormat,
    pub records: usize,
    pub skipped_malformed: usize,
    /// Samples with no trained token (e.g. a conversation without an assistant turn, or a
    /// prompt longer than `max_seq_length`), which are left out.
    pub dropped_no_target: usize,
    pub truncated: usize,
}

#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    pub format: DataFormat,
    pub skip_malformed: bool,
    pub max_seq_length: Option<usize>,
}

/// Reads and tokenizes one data file. A data set left with no sample is an [`Error::Data`]
/// that names the file.
pub fn load_dataset(
    path: &Path,
    opts: &LoadOptions,
    tok: &TokenizerInfo,
    template: Option<&ChatTemplate>,
) -> Result<(Dataset, LoadReport)> {
    let recs = read_records(path, opts.format, opts.skip_malformed)?;
    let builder = SampleBuilder::new(tok, template, opts.max_seq_length);
    let mut report = LoadReport {
        format: recs.format,
        records: recs.records.len(),
        skipped_malformed: recs.skipped,
        ..Default::default()
    };
    let mut samples = Vec::with_capacity(recs.records.len());
    for (i, r) in recs.records.iter().enumerate() {
        let (s, truncated) = builder
            .build(r)
            .map_err(|e| Error::Data(format!("{}: record {}: {e}", path.display(), i + 1)))?;
        report.truncated += usize::from(truncated);
        if s.n_trained() == 0 {
            report.dropped_no_target += 1;
        } else {
            samples.push(s);
        }
    }
    if samples.is_empty() {
        return Err(Error::Data(format!(
            "{}: no usable sample ({} records, {} malformed skipped, {} without a trained token)",
            path.display(),
            report.records,
            report.skipped_malformed,
            report.dropped_no_target
        )));
    }
    Ok((Dataset { samples }, report))
}

/// A permutation of `0..n` that depends only on (`seed`, `stream`); epochs and rehearsal
/// cycles use different streams of one seed.
pub fn permutation(n: usize, seed: u64, stream: u64) -> Vec<usize> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    let mut p: Vec<usize> = (0..n).collect();
    p.shuffle(&mut rng);
    p
}

/// Stream numbers kept apart so that the split, the rehearsal draw and the epoch orders
/// of one seed are independent.
const STREAM_SPLIT: u64 = 1 << 62;
const STREAM_REHEARSAL: u64 = 1 << 63;

impl Dataset {
    pub fn len(&self) -> usize {
        self.samples.len()
    }

    pub fn is_empty(&self) -> bool {
        self.samples.is_empty()
    }

    /// Splits off `round(eval_fraction · n)` randomly chosen samples (at least one, and at
    /// least one left for training) as an evaluation set. Both keep the original order.
    pub fn train_eval_split(&self, eval_fraction: f64, seed: u64) -> Result<(Dataset, Dataset)> {
        if !(0.0..1.0).contains(&eval_fraction) {
            return Err(Error::Config(format!(
                "eval fraction must be in [0, 1), got {eval_fraction}"
            )));
        }
        let n = self.len();
        if eval_fraction == 0.0 {
            return Ok((self.clone(), Dataset::default()));
        }
        if n < 2 {
            return Err(Error::Data(format!(
                "cannot split {n} sample(s) into a training and an evaluation set"
            )));
        }
        let n_eval = ((eval_fraction * n as f64).round() as usize).clamp(1, n - 1);
        let perm = permutation(n, seed, STREAM_SPLIT);
        let mut is_eval = vec![false; n];
        for &i in &perm[..n_eval] {
            is_eval[i] = true;
        }
        let (mut train, mut eval) = (Vec::with_capacity(n - n_eval), Vec::with_capacity(n_eval));
        for (s, e) in self.samples.iter().zip(is_eval) {
            if e {
                eval.push(s.clone())
            } else {
                train.push(s.clone())
            }
        }
        Ok((Dataset { samples: train }, Dataset { samples: eval }))
    }
}

/// Adds rehearsal samples so that a fraction `ratio` of the training stream comes from
/// `rehearsal`: `n_reh = round(ratio / (1 - ratio) · n_main)` of them, drawn without
/// replacement in a seeded random order, starting a fresh random order of the whole
/// rehearsal set whenever it runs out (so no sample repeats before all have been used).
/// The result holds the main samples first, then the drawn ones; the epoch shuffle mixes them.
pub fn mix_rehearsal(
    main: &Dataset,
    rehearsal: &Dataset,
    ratio: f64,
    seed: u64,
) -> Result<Dataset> {
    if !(0.0..1.0).contains(&ratio) {
        return Err(Error::Config(format!(
            "rehearsal ratio must be in [0, 1), got {ratio}"
        )));
    }
    let n_reh = (ratio / (1.0 - ratio) * main.len() as f64).round() as usize;
    if n_reh > 0 && rehearsal.is_empty() {
        return Err(Error::Data(format!("rehearsal ratio {ratio} needs {n_reh} rehearsal samples, but the rehearsal set is empty")));
    }
    let mut samples = main.samples.clone();
    samples.reserve(n_reh);
    let mut cycle = 0;
    while samples.len() < main.len() + n_reh {
        let order = permutation(rehearsal.len(), seed, STREAM_REHEARSAL + cycle);
        let take = (main.len() + n_reh - samples.len()).min(order.len());
        samples.extend(order[..take].iter().map(|&i| rehearsal.samples[i].clone()));
        cycle += 1;
    }
    Ok(Dataset { samples })
}

// ---------------------------------------------------------------------------------------
// Packing and batches

/// One row of a batch: one or more samples back to back. Labels are shifted (`labels[t]` is
/// the target for position `t`) and never cross a sample boundary, so the last position of
/// each sample has no target and no sample's first token is predicted from the previous one.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Row {
    pub input_ids: Vec<u32>,
    pub labels: Vec<i64>,
    /// Restart at 0 at each sample, so RoPE sees every sample as starting the sequence.
    pub position_ids: Vec<u32>,
    /// 1-based index of the sample within the row (0 is left for padding); attention must not
    /// cross segments.
    pub segment_ids: Vec<u32>,
    /// Dataset ids of the samples, in order.
    pub sample_ids: Vec<u64>,
}

impl Row {
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }

    pub fn push(&mut self, id: u64, s: &Sample) {
        let segment = self.sample_ids.len() as u32 + 1;
        self.input_ids.extend_from_slice(&s.input_ids);
        self.labels.extend(s.labels.iter().skip(1).copied());
        if !s.is_empty() {
            self.labels.push(IGNORE_INDEX);
        }
        self.position_ids.extend(0..s.len() as u32);
        self.segment_ids
            .extend(std::iter::repeat_n(segment, s.len()));
        self.sample_ids.push(id);
    }
}

/// Packs samples, in order, into rows of at most `seq_len` tokens: a sample goes into the
/// current row if it fits, else it starts the next row (samples are never split; one longer
/// than `seq_len` is cut with [`Sample::truncate_keep_eos`] and fills a row alone). Sample
/// ids are indices into `samples`.
pub fn pack(samples: &[Sample], seq_len: usize, eos_id: u32) -> Vec<Row> {
    let mut rows = Vec::new();
    let mut row = Row::default();
    for (i, s) in samples.iter().enumerate() {
        let cut;
        let s = if s.len() > seq_len {
            let mut c = s.clone();
            c.truncate_keep_eos(seq_len, eos_id);
            cut = c;
            &cut
        } else {
            s
        };
        if !row.is_empty() && row.len() + s.len() > seq_len {
            rows.push(std::mem::take(&mut row));
        }
        row.push(i as u64, s);
    }
    if !row.is_empty() {
        rows.push(row);
    }
    rows
}

/// Rows stacked into `[batch, seq_len]` arrays (row-major), right-padded with `pad_id`,
/// labels -100, position 0 and segment 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub input_ids: Vec<u32>,
    /// Already shifted: `labels[t]` is the target for position `t`; a row's last = -100.
    pub labels: Vec<i64>,
    pub position_ids: Vec<u32>,
    pub segment_ids: Vec<u32>,
    pub batch: usize,
    pub seq_len: usize,
    /// Labels other than -100 (the loss normaliser).
    pub n_target_tokens: usize,
    /// Dataset ids of every sample in the batch, row by row.
    pub sample_ids: Vec<u64>,
}

impl Batch {
    pub fn from_rows(rows: &[Row], seq_len: usize, pad_id: u32) -> Batch {
        let n = rows.len() * seq_len;
        let mut b = Batch {
            input_ids: vec![pad_id; n],
            labels: vec![IGNORE_INDEX; n],
            position_ids: vec![0; n],
            segment_ids: vec![0; n],
            batch: rows.len(),
            seq_len,
            n_target_tokens: 0,
            sample_ids: Vec::new(),
        };
        for (r, row) in rows.iter().enumerate() {
            let at = r * seq_len;
            let len = row.len().min(seq_len);
            b.input_ids[at..at + len].copy_from_slice(&row.input_ids[..len]);
            b.labels[at..at + len].copy_from_slice(&row.labels[..len]);
            b.position_ids[at..at + len].copy_from_slice(&row.position_ids[..len]);
            b.segment_ids[at..at + len].copy_from_slice(&row.segment_ids[..len]);
            b.sample_ids.extend_from_slice(&row.sample_ids);
        }
        b.n_target_tokens = b.labels.iter().filter(|&&l| l != IGNORE_INDEX).count();
        b
    }
}

/// Where iteration stands: `index` samples of epoch `epoch`'s order have been consumed.
/// After the last sample of an epoch it reads `{epoch + 1, 0}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DataCursor {
    pub epoch: u64,
    pub index: u64,
}

#[derive(Debug, Clone)]
pub struct BatchOptions {
    /// Rows per batch.
    pub batch_size: usize,
    /// Longest row. Without packing a batch is padded to its longest row (at most this);
    /// with packing every batch is `seq_len` wide.
    pub seq_len: usize,
    pub packing: bool,
    /// As HF's `group_by_length`: after the epoch shuffle, cut the order into megabatches of
    /// `50 · batch_size` samples and sort each by length, longest first, so batches hold
    /// similar lengths and waste less padding.
    pub group_by_length: bool,
    pub seed: u64,
    pub pad_id: u32,
    pub eos_id: u32,
}

/// Endless stream of batches over a data set, epoch after epoch, each epoch in its own
/// seeded order. A batch never spans two epochs (the last of an epoch may have fewer rows).
pub struct Batcher {
    data: Arc<Dataset>,
    opts: BatchOptions,
    cursor: DataCursor,
    order: Vec<usize>,
}

impl Batcher {
    pub fn new(data: Arc<Dataset>, opts: BatchOptions) -> Result<Self> {
        Self::resume(data, opts, DataCursor::default())
    }

    /// Continues exactly where `cursor` was taken: the batches that follow are the ones the
    /// original batcher would have produced next.
    pub fn resume(data: Arc<Dataset>, opts: BatchOptions, cursor: DataCursor) -> Result<Self> {
        if data.is_empty() {
            return Err(Error::Data("cannot iterate over an empty data set".into()));
        }
        if opts.batch_size == 0 || opts.seq_len < 2 {
            return Err(Error::Config(format!(
                "batch size must be ≥ 1 and sequence length ≥ 2 (got {} and {})",
                opts.batch_size, opts.seq_len
            )));
        }
        if cursor.index > data.len() as u64 {
            return Err(Error::Data(format!(
                "data cursor {cursor:?} is past the end of a data set of {} samples (was it saved for other data?)",
                data.len()
            )));
        }
        let mut b = Batcher {
            data,
            opts,
            cursor,
            order: Vec::new(),
        };
        b.order = b.epoch_order(cursor.epoch);
        b.normalize();
        Ok(b)
    }

    pub fn cursor(&self) -> DataCursor {
        self.cursor
    }

    /// The order in which epoch `epoch` visits the samples.
    pub fn epoch_order(&self, epoch: u64) -> Vec<usize> {
        let mut order = permutation(self.data.len(), self.opts.seed, epoch);
        if self.opts.group_by_length {
            let mega = 50 * self.opts.batch_size;
            for chunk in order.chunks_mut(mega) {
                chunk.sort_by_key(|&i| std::cmp::Reverse(self.data.samples[i].len()));
            }
        }
        order
    }

    fn normalize(&mut self) {
        if self.cursor.index as usize >= self.order.len() {
            self.cursor = DataCursor {
                epoch: self.cursor.epoch + 1,
                index: 0,
            };
            self.order = self.epoch_order(self.cursor.epoch);
        }
    }

    pub fn next_batch(&mut self) -> Batch {
        let (seq_len, eos) = (self.opts.seq_len, self.opts.eos_id);
        let mut rows: Vec<Row> = Vec::with_capacity(self.opts.batch_size);
        let mut i = self.cursor.index as usize;
        while i < self.order.len() {
            let id = self.order[i];
            let mut s = self.data.samples[id].clone();
            s.truncate_keep_eos(seq_len, eos);
            let fits_last =
                self.opts.packing && rows.last().is_some_and(|r| r.len() + s.len() <= seq_len);
            if !fits_last {
                if rows.len() == self.opts.batch_size {
                    break;
                }
                rows.push(Row::default());
            }
            rows.last_mut()
                .expect("a row was just ensured")
                .push(id as u64, &s);
            i += 1;
        }
        self.cursor.index = i as u64;
        self.normalize();
        let width = if self.opts.packing {
            seq_len
        } else {
            rows.iter().map(Row::len).max().unwrap_or(0)
        };
        Batch::from_rows(&rows, width, self.opts.pad_id)
    }
}

impl Iterator for Batcher {
    type Item = Batch;
    fn next(&mut self) -> Option<Batch> {
        Some(self.next_batch())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::test_assets::*;
    use proptest::prelude::*;
    use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
    use tokenizers::models::bpe::{Vocab, BPE};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::{AddedToken, Tokenizer};

    fn data_fixture(name: &str) -> std::path::PathBuf {
        fixture(&format!("data/{name}"))
    }

    fn smollm2_template_src() -> String {
        read_fixture("tokenizer/smollm2.json")["chat_template"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// One token per byte plus three ChatML specials: every byte is a token boundary, so a
    /// text tokenized piece by piece gives the same ids as tokenized whole. Needs no asset.
    fn byte_tokenizer() -> TokenizerInfo {
        let mut chars: Vec<char> = ByteLevel::alphabet().into_iter().collect();
        chars.sort_unstable();
        let vocab: Vocab = chars
            .iter()
            .enumerate()
            .map(|(i, c)| (c.to_string(), i as u32))
            .collect();
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, vec![])
            .build()
            .unwrap();
        let mut t = Tokenizer::new(bpe);
        t.with_pre_tokenizer(Some(ByteLevel::new(false, false, true)));
        t.with_decoder(Some(ByteLevelDecoder::default()));
        t.add_special_tokens(&[
            AddedToken::from("<|endoftext|>", true),
            AddedToken::from("<|im_start|>", true),
            AddedToken::from("<|im_end|>", true),
        ]);
        TokenizerInfo {
            tokenizer: t,
            bos_token: Some("<|im_start|>".into()),
            bos_id: Some(257),
            eos_token: "<|im_end|>".into(),
            eos_id: 258,
            pad_id: 256,
            add_bos: false,
            chat_template: Some(smollm2_template_src()),
            source: "byte-tokenizer".into(),
        }
    }

    fn msgs(pairs: &[(&str, &str)]) -> Vec<Message> {
        pairs.iter().map(|(r, c)| Message::new(*r, *c)).collect()
    }

    // ----- records ---------------------------------------------------------------------

    #[test]
    fn detects_each_format() {
        let r = read_records(&data_fixture("alpaca.jsonl"), DataFormat::Auto, false).unwrap();
        assert_eq!(r.format, DataFormat::Alpaca);
        assert_eq!(
            r.records[1],
            Record::Alpaca {
                instruction: "Translate to French.".into(),
                input: "Good morning".into(),
                output: "Bonjour".into()
            }
        );
        // `input` may be absent.
        assert_eq!(
            r.records[2],
            Record::Alpaca {
                instruction: "What is 12 + 30?".into(),
                input: "".into(),
                output: "42".into()
            }
        );

        let r = read_records(&data_fixture("sharegpt.json"), DataFormat::Auto, false).unwrap();
        assert_eq!(r.format, DataFormat::ShareGpt);
        assert_eq!(r.records.len(), 2);
        assert_eq!(
            r.records[0],
            Record::Chat(msgs(&[
                ("system", "You are terse."),
                ("user", "Hi!"),
                ("assistant", "Hello."),
                ("user", "Capital of France?"),
                ("assistant", "Paris.")
            ]))
        );

        let r = read_records(&data_fixture("messages.jsonl"), DataFormat::Auto, false).unwrap();
        assert_eq!(r.format, DataFormat::Messages);
        assert_eq!(
            r.records[0],
            Record::Chat(msgs(&[
                ("user", "What is the capital of France?"),
                ("assistant", "Paris.")
            ]))
        );

        let r = read_records(
            &data_fixture("prompt_completion.jsonl"),
            DataFormat::Auto,
            false,
        )
        .unwrap();
        assert_eq!(r.format, DataFormat::PromptCompletion);
        assert_eq!(
            r.records[1],
            Record::PromptCompletion {
                prompt: "2 + 2 =".into(),
                completion: " 4".into()
            }
        );

        let r = read_records(&data_fixture("text.jsonl"), DataFormat::Auto, false).unwrap();
        assert_eq!(
            (r.format, r.records.len(), r.skipped),
            (DataFormat::Text, 2, 0)
        );
    }

    #[test]
    fn named_format_enforces_its_keys() {
        let err = read_records(&data_fixture("alpaca.jsonl"), DataFormat::Messages, false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("alpaca.jsonl")
                && err.contains("line 1")
                && err.contains("missing `messages`"),
            "{err}"
        );
        let err = read_records(&data_fixture("sharegpt.json"), DataFormat::Text, false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("sharegpt.json") && err.contains("record 1") && err.contains("`text`"),
            "{err}"
        );
    }

    #[test]
    fn malformed_line_is_named_or_skipped() {
        let path = data_fixture("malformed.jsonl");
        let err = read_records(&path, DataFormat::Auto, false).unwrap_err();
        assert!(matches!(err, Error::Format { .. }));
        let err = err.to_string();
        assert!(
            err.contains("malformed.jsonl")
                && err.contains("line 3:")
                && err.contains("invalid JSON"),
            "{err}"
        );
        let r = read_records(&path, DataFormat::Auto, true).unwrap();
        assert_eq!((r.records.len(), r.skipped), (3, 2));
        // Line 5 is valid JSON with a missing key: named once line 3 is out of the way.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.jsonl");
        let lines: Vec<String> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(String::from)
            .collect();
        std::fs::write(&p, [&lines[..2], &lines[3..]].concat().join("\n")).unwrap();
        let err = read_records(&p, DataFormat::Auto, false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("line 4:") && err.contains("messages[0]: missing `content`"),
            "{err}"
        );
    }

    #[test]
    fn bad_values_are_explained() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            (
                r#"{"conversations": [{"from": "bot", "value": "x"}]}"#,
                r#"conversations[0].from = "bot""#,
            ),
            (r#"{"messages": []}"#, "`messages` is empty"),
            (
                r#"{"messages": [{"role": "user", "content": [{"type": "text"}]}]}"#,
                "`content` must be a string",
            ),
            (r#"{"foo": 1, "bar": 2}"#, r#"keys ["bar", "foo"]"#),
            (r#"[1, 2]"#, "record 1: expected a JSON object"),
        ];
        for (i, (content, expected)) in cases.iter().enumerate() {
            let p = dir.path().join(format!("c{i}.json"));
            std::fs::write(&p, content).unwrap();
            let err = read_records(&p, DataFormat::Auto, false)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains(&format!("c{i}.json")) && err.contains(expected),
                "{err}"
            );
        }
        let p = dir.path().join("x.parquet");
        std::fs::write(&p, b"PAR1").unwrap();
        let err = read_records(&p, DataFormat::Auto, false).unwrap_err().to_string();
        assert!(err.contains("x.parquet") && err.contains("not a readable Parquet file"), "{err}");
    }

    /// The Parquet fixtures were written by pyarrow from the JSON fixtures
    /// (scripts/fixtures/make_parquet_fixtures.py): both must give the same records and,
    /// through the whole pipeline, the same token samples.
    #[test]
    fn parquet_loads_like_jsonl() {
        let tok = byte_tokenizer();
        let t = ChatTemplate::from_tokenizer(&tok).unwrap().unwrap();
        for (json, format) in [
            ("alpaca.jsonl", DataFormat::Alpaca),
            ("sharegpt.json", DataFormat::ShareGpt),
            ("messages.jsonl", DataFormat::Messages),
            ("prompt_completion.jsonl", DataFormat::PromptCompletion),
            ("text.jsonl", DataFormat::Text),
        ] {
            let pq = format!("{}.parquet", json.split('.').next().unwrap());
            let from_json = read_records(&data_fixture(json), DataFormat::Auto, false).unwrap();
            let from_pq = read_records(&data_fixture(&pq), DataFormat::Auto, false).unwrap();
            assert_eq!(from_pq.format, format, "{pq}");
            assert_eq!(from_pq.records, from_json.records, "{pq}");
            assert!(!from_pq.records.is_empty());
            let opts = LoadOptions::default();
            let (dj, _) = load_dataset(&data_fixture(json), &opts, &tok, Some(&t)).unwrap();
            let (dp, _) = load_dataset(&data_fixture(&pq), &opts, &tok, Some(&t)).unwrap();
            assert_eq!(dp.samples, dj.samples, "{pq}");
        }
    }

    #[test]
    fn malformed_parquet_row_is_named_or_skipped() {
        // Row 1 of row group 1 has `content: null` (see make_parquet_fixtures.py).
        let p = data_fixture("malformed.parquet");
        let err = read_records(&p, DataFormat::Auto, false).unwrap_err().to_string();
        assert!(
            err.contains("malformed.parquet")
                && err.contains("row group 1, row 1:")
                && err.contains("messages[1]: `content` must be a string, got null"),
            "{err}"
        );
        let r = read_records(&p, DataFormat::Auto, true).unwrap();
        assert_eq!((r.records.len(), r.skipped), (3, 1));
        // A codec this build leaves out is named, with what to do about it.
        let p = data_fixture("text_zstd.parquet");
        let err = read_records(&p, DataFormat::Auto, true).unwrap_err().to_string();
        assert!(
            err.contains("text_zstd.parquet: row group 0") && err.contains("zstd") && err.contains("compression=\"snappy\""),
            "{err}"
        );
    }

    #[test]
    fn empty_data_set_names_the_file() {
        let tok = byte_tokenizer();
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("empty.jsonl");
        std::fs::write(&p, "\n\n").unwrap();
        let err = load_dataset(&p, &LoadOptions::default(), &tok, None).unwrap_err();
        assert!(
            matches!(&err, Error::Data(m) if m.contains("empty.jsonl")),
            "{err}"
        );
        // Records that exist but train nothing (no assistant turn) leave it empty too.
        std::fs::write(&p, r#"{"messages": [{"role": "user", "content": "hi"}]}"#).unwrap();
        let t = ChatTemplate::from_tokenizer(&tok).unwrap().unwrap();
        let err = load_dataset(&p, &LoadOptions::default(), &tok, Some(&t))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("empty.jsonl") && err.contains("1 without a trained token"),
            "{err}"
        );
    }

    // ----- masks -----------------------------------------------------------------------

    /// ChatML written out by hand: a turn is `<|im_start|>{role}\n{content}<|im_end|>\n`, and
    /// an assistant turn trains its content and its `<|im_end|>`. Each piece is tokenized on
    /// its own, which equals tokenizing the whole text where pieces meet at a token boundary
    /// (specials, or a newline before a letter); the test asserts that too.
    fn chatml_reference(
        tok: &TokenizerInfo,
        messages: &[Message],
        default_system: Option<&str>,
    ) -> Sample {
        let mut s = Sample::default();
        let mut push = |text: &str, trained: bool| {
            for id in tok.encode(text, false).unwrap() {
                s.input_ids.push(id);
                s.labels
                    .push(if trained { i64::from(id) } else { IGNORE_INDEX });
            }
        };
        if let Some(sys) = default_system.filter(|_| messages[0].role != "system") {
            push(&format!("<|im_start|>system\n{sys}<|im_end|>\n"), false);
        }
        for m in messages {
            if m.role == "assistant" {
                push("<|im_start|>assistant\n", false);
                push(&m.content, true);
                push("<|im_end|>", true);
                push("\n", false);
            } else {
                push(
                    &format!("<|im_start|>{}\n{}<|im_end|>\n", m.role, m.content),
                    false,
                );
            }
        }
        s
    }

    const SMOLLM_SYSTEM: &str =
        "You are a helpful AI assistant named SmolLM, trained by Hugging Face";

    fn conversations() -> Vec<Vec<Message>> {
        vec![
            msgs(&[
                ("user", "What is the capital of France?"),
                ("assistant", "Paris is the capital."),
            ]),
            msgs(&[
                ("system", "Answer briefly."),
                ("user", "Hi there"),
                ("assistant", "Hello! How can I help?"),
                ("user", "Add 12 and 30."),
                ("assistant", "It is 42."),
            ]),
            msgs(&[
                ("user", "Two replies?"),
                ("assistant", "First one."),
                ("assistant", "Second one."),
            ]),
        ]
    }

    fn check_chatml(tok: &TokenizerInfo, template: &ChatTemplate, default_system: Option<&str>) {
        let b = SampleBuilder::new(tok, Some(template), None);
        for conv in conversations() {
            let (got, _) = b.build(&Record::Chat(conv.clone())).unwrap();
            let want = chatml_reference(tok, &conv, default_system);
            let whole = tok
                .encode(&template.render(&conv, false).unwrap(), false)
                .unwrap();
            assert_eq!(
                want.input_ids, whole,
                "pieces must meet at token boundaries"
            );
            assert_eq!(got, want, "{conv:?}");
        }
    }

    #[test]
    fn chatml_masks_match_hand_construction_byte_tokenizer() {
        let tok = byte_tokenizer();
        let t = ChatTemplate::from_tokenizer(&tok).unwrap().unwrap();
        check_chatml(&tok, &t, Some(SMOLLM_SYSTEM));
    }

    /// Contents starting with a private-use char share leading bytes with the marker that
    /// locates message contents.
    #[test]
    fn private_use_contents_are_located() {
        let tok = byte_tokenizer();
        let t = ChatTemplate::from_tokenizer(&tok).unwrap().unwrap();
        let conv = msgs(&[
            ("user", "\u{E000}q"),
            ("assistant", "\u{E05A}a"),
            ("user", "\u{E001}\u{E000}"),
            ("assistant", "\u{E000}"),
        ]);
        let (got, _) = SampleBuilder::new(&tok, Some(&t), None)
            .build(&Record::Chat(conv.clone()))
            .unwrap();
        assert_eq!(got, chatml_reference(&tok, &conv, Some(SMOLLM_SYSTEM)));
    }

    /// Without special tokens a turn ends where the render of the conversation up to it ends.
    #[test]
    fn plain_template_turns_end_with_their_render() {
        let tok = byte_tokenizer();
        let t = ChatTemplate::new(
            "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}",
            "plain",
            None,
            None,
        )
        .unwrap();
        let conv = conversations()[1].clone();
        let (got, _) = SampleBuilder::new(&tok, Some(&t), None)
            .build(&Record::Chat(conv.clone()))
            .unwrap();
        let mut want = Sample::default();
        for m in &conv {
            let assistant = m.role == "assistant";
            for (text, trained) in [
                (format!("{}: ", m.role), false),
                (format!("{}\n", m.content), assistant),
            ] {
                for id in tok.encode(&text, false).unwrap() {
                    want.input_ids.push(id);
                    want.labels
                        .push(if trained { i64::from(id) } else { IGNORE_INDEX });
                }
            }
        }
        assert_eq!(got, want);
    }

    #[test]
    fn chatml_masks_match_hand_construction_smollm2() {
        let Some(tok) = smollm2() else { return };
        let t = ChatTemplate::from_tokenizer(&tok).unwrap().unwrap();
        check_chatml(&tok, &t, Some(SMOLLM_SYSTEM));
    }

    #[test]
    fn chatml_masks_match_hand_construction_qwen3() {
        let Some(dir) = hf_dir("qwen3") else { return };
        let tok = crate::tokenizer::load_hf_tokenizer(&dir).unwrap();
        let t = ChatTemplate::from_tokenizer(&tok).unwrap().unwrap();
        // Qwen3 writes an empty think block before the final reply; that block is part of
        // what the model has to produce, so it is trained. In the conversation with two
        // replies in a row, the prefix render of the second shows the first with a think
        // block the full render does not have, which exercises the fallback that finds the
        // turn by its generation prompt.
        let b = SampleBuilder::new(&tok, Some(&t), None);
        for conv in conversations() {
            let (got, _) = b.build(&Record::Chat(conv.clone())).unwrap();
            let mut want = Sample::default();
            let mut push = |text: &str, trained: bool| {
                for id in tok.encode(text, false).unwrap() {
                    want.input_ids.push(id);
                    want.labels
                        .push(if trained { i64::from(id) } else { IGNORE_INDEX });
                }
            };
            let last_user = conv.iter().rposition(|m| m.role == "user").unwrap();
            for (i, m) in conv.iter().enumerate() {
                if m.role == "assistant" {
                    push("<|im_start|>assistant\n", false);
                    if i > last_user && i == conv.len() - 1 {
                        push("<think>\n\n</think>\n\n", true);
                    }
                    push(&m.content, true);
                    push("<|im_end|>", true);
                    push("\n", false);
                } else {
                    push(
                        &format!("<|im_start|>{}\n{}<|im_end|>\n", m.role, m.content),
                        false,
                    );
                }
            }
            let whole = tok.encode(&t.render(&conv, false).unwrap(), false).unwrap();
            assert_eq!(
                want.input_ids, whole,
                "pieces must meet at token boundaries"
            );
            assert_eq!(got, want, "{conv:?}");
        }
    }

    /// Llama 3's template trims contents, writes BOS itself and always ends with an
    /// assistant header; only the assistant contents and their `<|eot_id|>` are trained.
    #[test]
    fn llama3_masks_match_hand_construction() {
        let Some(dir) = hf_dir("llama3") else { return };
        let mut tok = crate::tokenizer::load_hf_tokenizer(&dir).unwrap();
        let t = ChatTemplate::from_tokenizer(&tok).unwrap().unwrap();
        for add_bos in [false, true] {
            tok.add_bos = add_bos; // the template's BOS must not be doubled either way
            let b = SampleBuilder::new(&tok, Some(&t), None);
            let mut conv = conversations()[1].clone();
            conv[2].content = "  Hello! How can I help?\n".into();
            let (got, _) = b.build(&Record::Chat(conv.clone())).unwrap();
            let mut want = Sample {
                input_ids: vec![tok.bos_id.unwrap()],
                labels: vec![IGNORE_INDEX],
            };
            let mut push = |text: &str, trained: bool| {
                for id in tok.encode(text, false).unwrap() {
                    want.input_ids.push(id);
                    want.labels
                        .push(if trained { i64::from(id) } else { IGNORE_INDEX });
                }
            };
            for m in &conv {
                let assistant = m.role == "assistant";
                push(
                    &format!("<|start_header_id|>{}<|end_header_id|>\n\n", m.role),
                    false,
                );
                push(m.content.trim(), assistant);
                push("<|eot_id|>", assistant);
            }
            push("<|start_header_id|>assistant<|end_header_id|>\n\n", false);
            assert_eq!(got, want);
        }
    }

    /// transformers' own assistant mask (`return_assistant_tokens_mask` on a
    /// `{% generation %}`-tagged copy of SmolLM2's template) against ours from the real one.
    #[test]
    fn smollm2_masks_match_transformers() {
        let Some(tok) = smollm2() else { return };
        let t = ChatTemplate::from_tokenizer(&tok).unwrap().unwrap();
        let b = SampleBuilder::new(&tok, Some(&t), None);
        let fx = read_fixture("tokenizer/smollm2.json");
        let cases = fx["assistant_masks"].as_array().unwrap();
        assert!(cases.len() >= 3);
        for c in cases {
            let messages: Vec<Message> = serde_json::from_value(c["messages"].clone()).unwrap();
            let (s, _) = b.build(&Record::Chat(messages)).unwrap();
            assert_eq!(s.input_ids, ids_of(&c["ids"]), "{}", c["name"]);
            let mask: Vec<bool> = c["assistant_masks"]
                .as_array()
                .unwrap()
                .iter()
                .map(|m| m.as_u64() == Some(1))
                .collect();
            let ours: Vec<bool> = s.labels.iter().map(|&l| l != IGNORE_INDEX).collect();
            assert_eq!(ours, mask, "{}", c["name"]);
            for (l, id) in s.labels.iter().zip(&s.input_ids) {
                assert!(*l == IGNORE_INDEX || *l == i64::from(*id));
            }
        }
    }

    #[test]
    fn bos_is_added_once() {
        let mut tok = byte_tokenizer();
        let t = ChatTemplate::from_tokenizer(&tok).unwrap().unwrap();
        let conv = Record::Chat(conversations()[0].clone());
        let plain = SampleBuilder::new(&tok, Some(&t), None)
            .build(&conv)
            .unwrap()
            .0;
        tok.add_bos = true;
        // BOS = <|im_start|>, which the ChatML render already starts with: unchanged.
        assert_eq!(
            SampleBuilder::new(&tok, Some(&t), None)
                .build(&conv)
                .unwrap()
                .0,
            plain
        );
        // A BOS the template does not write is prepended, untrained.
        tok.bos_token = Some("<|endoftext|>".into());
        tok.bos_id = Some(256);
        let s = SampleBuilder::new(&tok, Some(&t), None)
            .build(&conv)
            .unwrap()
            .0;
        assert_eq!(s.input_ids[0], 256);
        assert_eq!(s.labels[0], IGNORE_INDEX);
        assert_eq!(
            (&s.input_ids[1..], &s.labels[1..]),
            (&plain.input_ids[..], &plain.labels[..])
        );
    }

    #[test]
    fn text_prompt_completion_and_alpaca_masks() {
        let tok = byte_tokenizer();
        let b = SampleBuilder::new(&tok, None, None);
        let enc = |s: &str| tok.encode(s, false).unwrap();
        let trained = |ids: &[u32]| ids.iter().map(|&i| i64::from(i)).collect::<Vec<_>>();
        let masked = |n: usize| vec![IGNORE_INDEX; n];

        let (s, _) = b.build(&Record::Text("To be, or not".into())).unwrap();
        let want = [enc("To be, or not"), vec![tok.eos_id]].concat();
        assert_eq!((&s.input_ids, &s.labels), (&want, &trained(&want)));

        let (s, _) = b
            .build(&Record::PromptCompletion {
                prompt: "2 + 2 =".into(),
                completion: " 4".into(),
            })
            .unwrap();
        let (p, c) = (enc("2 + 2 ="), [enc(" 4"), vec![tok.eos_id]].concat());
        assert_eq!(s.input_ids, [p.clone(), c.clone()].concat());
        assert_eq!(s.labels, [masked(p.len()), trained(&c)].concat());

        // Alpaca without a template: Stanford Alpaca's prompt, written out here.
        let (s, _) = b
            .build(&Record::Alpaca {
                instruction: "Say hi.".into(),
                input: "".into(),
                output: "Hi!".into(),
            })
            .unwrap();
        let prompt = "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\nSay hi.\n\n### Response:\n";
        let (p, c) = (enc(prompt), [enc("Hi!"), vec![tok.eos_id]].concat());
        assert_eq!(s.input_ids, [p.clone(), c.clone()].concat());
        assert_eq!(s.labels, [masked(p.len()), trained(&c)].concat());

        // Alpaca with a template: one user turn (instruction, blank line, input), one reply.
        let t = ChatTemplate::from_tokenizer(&tok).unwrap().unwrap();
        let bt = SampleBuilder::new(&tok, Some(&t), None);
        let (s, _) = bt
            .build(&Record::Alpaca {
                instruction: "Translate.".into(),
                input: "Good morning".into(),
                output: "Bonjour".into(),
            })
            .unwrap();
        let conv = msgs(&[
            ("user", "Translate.\n\nGood morning"),
            ("assistant", "Bonjour"),
        ]);
        assert_eq!(s, chatml_reference(&tok, &conv, Some(SMOLLM_SYSTEM)));

        // Chat records without any template are refused with the tokenizer named.
        let err = b.build(&Record::Chat(conv)).unwrap_err().to_string();
        assert!(
            err.contains("byte-tokenizer") && err.contains("chat template"),
            "{err}"
        );
    }

    #[test]
    fn truncation_keeps_eos() {
        let tok = byte_tokenizer();
        let t = ChatTemplate::from_tokenizer(&tok).unwrap().unwrap();
        let rec = Record::Chat(conversations()[1].clone());
        let (full, cut) = SampleBuilder::new(&tok, Some(&t), None)
            .build(&rec)
            .unwrap();
        assert!(!cut);
        let first_trained = full.labels.iter().position(|&l| l != IGNORE_INDEX).unwrap();
        for max in [
            first_trained,
            first_trained + 1,
            first_trained + 5,
            full.len() - 1,
        ] {
            let (s, cut) = SampleBuilder::new(&tok, Some(&t), Some(max))
                .build(&rec)
                .unwrap();
            assert!(cut);
            assert_eq!(s.input_ids[..max - 1], full.input_ids[..max - 1]);
            assert_eq!(s.labels[..max - 1], full.labels[..max - 1]);
            assert_eq!(s.input_ids[max - 1], tok.eos_id);
            let was_trained = full.labels[max - 1] != IGNORE_INDEX;
            assert_eq!(
                s.labels[max - 1],
                if was_trained {
                    i64::from(tok.eos_id)
                } else {
                    IGNORE_INDEX
                },
                "max={max}"
            );
        }
        // Cut inside the prompt: nothing is trained and loading drops the sample.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.jsonl");
        std::fs::write(
            &p,
            concat!(
                r#"{"messages": [{"role": "user", "content": "a long question indeed"}, {"role": "assistant", "content": "ok"}]}"#,
                "\n",
                r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]}"#,
            ),
        )
        .unwrap();
        let bare = ChatTemplate::new(
            "{% for m in messages %}{{ m.content }}{% if m.role == 'assistant' %}<|im_end|>{% endif %}{% endfor %}",
            "bare",
            None,
            None,
        )
        .unwrap();
        let opts = LoadOptions {
            max_seq_length: Some(20),
            ..Default::default()
        };
        let (d, rep) = load_dataset(&p, &opts, &tok, Some(&bare)).unwrap();
        assert_eq!(
            (d.len(), rep.records, rep.dropped_no_target, rep.truncated),
            (1, 2, 1, 1)
        );
        assert_eq!(
            d.samples[0].input_ids,
            [tok.encode("hiok", false).unwrap(), vec![tok.eos_id]].concat()
        );
    }

    // ----- data sets -------------------------------------------------------------------

    /// Sample `k` of length `len`: ids k*1000.., every third position untrained.
    fn synthetic(lens: &[usize]) -> Dataset {
        let samples = lens
            .iter()
            .enumerate()
            .map(|(k, &len)| {
                let ids: Vec<u32> = (0..len as u32).map(|t| k as u32 * 1000 + t).collect();
                let labels = ids
                    .iter()
                    .enumerate()
                    .map(|(t, &i)| {
                        if t % 3 == 0 {
                            IGNORE_INDEX
                        } else {
                            i64::from(i)
                        }
                    })
                    .collect();
                Sample {
                    input_ids: ids,
                    labels,
                }
            })
            .collect();
        Dataset { samples }
    }

    const EOS: u32 = 999_999;

    /// Rows as the packing rule defines them, built the plain way.
    fn naive_pack(samples: &[(u64, Sample)], seq_len: usize) -> Vec<Row> {
        let mut groups: Vec<Vec<(u64, Sample)>> = Vec::new();
        let mut used = 0;
        for (id, s) in samples {
            let mut s = s.clone();
            if s.len() > seq_len {
                s.input_ids.truncate(seq_len);
                s.labels.truncate(seq_len);
                s.input_ids[seq_len - 1] = EOS;
                if s.labels[seq_len - 1] != IGNORE_INDEX {
                    s.labels[seq_len - 1] = i64::from(EOS);
                }
            }
            if groups.is_empty() || used + s.len() > seq_len {
                groups.push(Vec::new());
                used = 0;
            }
            used += s.len();
            groups.last_mut().unwrap().push((*id, s));
        }
        groups
            .into_iter()
            .map(|g| {
                let mut r = Row::default();
                for (k, (id, s)) in g.iter().enumerate() {
                    for t in 0..s.len() {
                        r.input_ids.push(s.input_ids[t]);
                        r.labels.push(if t + 1 < s.len() {
                            s.labels[t + 1]
                        } else {
                            IGNORE_INDEX
                        });
                        r.position_ids.push(t as u32);
                        r.segment_ids.push(k as u32 + 1);
                    }
                    r.sample_ids.push(*id);
                }
                r
            })
            .collect()
    }

    proptest! {
        #[test]
        fn packing_matches_naive_rule(lens in prop::collection::vec(1usize..30, 1..40), seq_len in 2usize..32) {
            let d = synthetic(&lens);
            let rows = pack(&d.samples, seq_len, EOS);
            let indexed: Vec<(u64, Sample)> = d.samples.iter().cloned().enumerate().map(|(i, s)| (i as u64, s)).collect();
            prop_assert_eq!(&rows, &naive_pack(&indexed, seq_len));
            for r in &rows {
                prop_assert!(r.len() <= seq_len);
            }
            let ids: Vec<u64> = rows.iter().flat_map(|r| r.sample_ids.clone()).collect();
            prop_assert_eq!(ids, (0..lens.len() as u64).collect::<Vec<_>>());
        }
    }

    fn opts(
        batch_size: usize,
        seq_len: usize,
        packing: bool,
        group_by_length: bool,
    ) -> BatchOptions {
        BatchOptions {
            batch_size,
            seq_len,
            packing,
            group_by_length,
            seed: 7,
            pad_id: 5,
            eos_id: EOS,
        }
    }

    #[test]
    fn batches_are_padded_rows_of_shifted_labels() {
        let d = Arc::new(synthetic(&[4, 7, 2, 9, 5, 3, 8]));
        let o = opts(3, 8, false, false);
        let mut b = Batcher::new(d.clone(), o.clone()).unwrap();
        let order = b.epoch_order(0);
        let batch = b.next_batch();
        let rows: Vec<Row> = order[..3]
            .iter()
            .map(|&i| naive_pack(&[(i as u64, d.samples[i].clone())], 8).remove(0))
            .collect();
        let width = rows.iter().map(Row::len).max().unwrap();
        assert_eq!((batch.batch, batch.seq_len), (3, width));
        for (r, row) in rows.iter().enumerate() {
            let at = r * width;
            for t in 0..width {
                let (id, label, pos, seg) = if t < row.len() {
                    (
                        row.input_ids[t],
                        row.labels[t],
                        row.position_ids[t],
                        row.segment_ids[t],
                    )
                } else {
                    (o.pad_id, IGNORE_INDEX, 0, 0)
                };
                assert_eq!(
                    (
                        batch.input_ids[at + t],
                        batch.labels[at + t],
                        batch.position_ids[at + t],
                        batch.segment_ids[at + t]
                    ),
                    (id, label, pos, seg)
                );
            }
        }
        assert_eq!(
            batch.sample_ids,
            order[..3].iter().map(|&i| i as u64).collect::<Vec<_>>()
        );
        let n: usize = rows
            .iter()
            .map(|r| r.labels.iter().filter(|&&l| l != IGNORE_INDEX).count())
            .sum();
        assert_eq!(batch.n_target_tokens, n);
    }

    #[test]
    fn packed_batches_follow_the_epoch_order() {
        let lens = [4, 7, 2, 9, 5, 3, 8, 1, 6, 6, 2, 11, 3];
        let d = Arc::new(synthetic(&lens));
        let mut b = Batcher::new(d.clone(), opts(2, 10, true, false)).unwrap();
        let order = b.epoch_order(0);
        let expected = naive_pack(
            &order
                .iter()
                .map(|&i| (i as u64, d.samples[i].clone()))
                .collect::<Vec<_>>(),
            10,
        );
        let mut got = Vec::new();
        while b.cursor().epoch == 0 {
            let batch = b.next_batch();
            assert_eq!(batch.seq_len, 10);
            for r in 0..batch.batch {
                let at = r * 10;
                let segs = &batch.segment_ids[at..at + 10];
                let len = segs.iter().take_while(|&&s| s != 0).count();
                got.push(Row {
                    input_ids: batch.input_ids[at..at + len].to_vec(),
                    labels: batch.labels[at..at + len].to_vec(),
                    position_ids: batch.position_ids[at..at + len].to_vec(),
                    segment_ids: segs[..len].to_vec(),
                    sample_ids: Vec::new(),
                });
            }
        }
        let strip = |rows: Vec<Row>| {
            rows.into_iter()
                .map(|r| Row {
                    sample_ids: vec![],
                    ..r
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(got, strip(expected));
    }

    #[test]
    fn cursor_resumes_exactly() {
        let lens: Vec<usize> = (0..23).map(|i| 1 + (i * 7) % 13).collect();
        let d = Arc::new(synthetic(&lens));
        for (packing, group) in [(false, false), (true, false), (false, true)] {
            let o = opts(4, 12, packing, group);
            let mut a = Batcher::new(d.clone(), o.clone()).unwrap();
            let mut seen: Vec<Vec<u64>> = vec![Vec::new(); 3];
            let mut saved = None;
            let mut after = Vec::new();
            for step in 0..40 {
                let epoch = a.cursor().epoch as usize;
                let batch = a.next_batch();
                if epoch < 3 {
                    seen[epoch].extend(&batch.sample_ids);
                }
                if step == 11 {
                    saved = Some(serde_json::to_string(&a.cursor()).unwrap());
                }
                if step > 11 {
                    after.push(batch);
                }
            }
            // Every epoch visits every sample once, in an order of its own.
            for s in &seen {
                let mut sorted = s.clone();
                sorted.sort_unstable();
                assert_eq!(
                    sorted,
                    (0..23).collect::<Vec<u64>>(),
                    "packing={packing} group={group}"
                );
            }
            assert_ne!(seen[0], seen[1]);
            let cursor: DataCursor = serde_json::from_str(&saved.unwrap()).unwrap();
            let mut b = Batcher::resume(d.clone(), o, cursor).unwrap();
            let resumed: Vec<Batch> = (0..after.len()).map(|_| b.next_batch()).collect();
            assert_eq!(resumed, after, "packing={packing} group={group}");
        }
        let err = Batcher::resume(
            d.clone(),
            opts(4, 12, false, false),
            DataCursor {
                epoch: 0,
                index: 24,
            },
        )
        .err()
        .unwrap();
        assert!(err.to_string().contains("past the end"));
        assert!(Batcher::new(Arc::default(), opts(1, 4, false, false)).is_err());
    }

    #[test]
    fn group_by_length_sorts_each_megabatch() {
        let lens: Vec<usize> = (0..130).map(|i| 1 + (i * 37) % 50).collect();
        let d = Arc::new(synthetic(&lens));
        let plain = Batcher::new(d.clone(), opts(1, 64, false, false))
            .unwrap()
            .epoch_order(3);
        let grouped = Batcher::new(d.clone(), opts(1, 64, false, true))
            .unwrap()
            .epoch_order(3);
        for (p, g) in plain.chunks(50).zip(grouped.chunks(50)) {
            let mut want = p.to_vec();
            want.sort_by(|&a, &b| lens[b].cmp(&lens[a]));
            let got_lens: Vec<usize> = g.iter().map(|&i| lens[i]).collect();
            let want_lens: Vec<usize> = want.iter().map(|&i| lens[i]).collect();
            assert_eq!(got_lens, want_lens);
            let (mut a, mut b) = (p.to_vec(), g.to_vec());
            a.sort_unstable();
            b.sort_unstable();
            assert_eq!(a, b);
        }
    }

    #[test]
    fn rehearsal_counts_are_exact() {
        let main = synthetic(&[3; 12]);
        let reh = Dataset {
            samples: synthetic(&[3; 15]).samples[12..].to_vec(),
        }; // ids 12000.., 13000.., 14000..
        let mixed = mix_rehearsal(&main, &reh, 0.25, 1).unwrap();
        // 0.25 / 0.75 · 12 = 4 rehearsal samples: a quarter of 16.
        assert_eq!(mixed.len(), 16);
        assert_eq!(mixed.samples[..12], main.samples[..]);
        let drawn = &mixed.samples[12..];
        // All three are used before any repeats.
        let mut first: Vec<u32> = drawn[..3].iter().map(|s| s.input_ids[0]).collect();
        first.sort_unstable();
        assert_eq!(first, [12000, 13000, 14000]);
        assert!(reh.samples.contains(&drawn[3]));

        let big = synthetic(&[2; 10]);
        let mixed = mix_rehearsal(&synthetic(&[1; 5]), &big, 0.5, 9).unwrap();
        let mut drawn: Vec<u32> = mixed.samples[5..].iter().map(|s| s.input_ids[0]).collect();
        assert_eq!(drawn.len(), 5);
        drawn.dedup();
        assert_eq!(drawn.len(), 5);
        assert_eq!(mix_rehearsal(&main, &reh, 0.0, 1).unwrap(), main);
        assert!(matches!(
            mix_rehearsal(&main, &reh, 1.0, 1),
            Err(Error::Config(_))
        ));
        assert!(matches!(
            mix_rehearsal(&main, &Dataset::default(), 0.1, 1),
            Err(Error::Data(_))
        ));
        assert_eq!(
            mix_rehearsal(&main, &reh, 0.25, 1).unwrap(),
            mix_rehearsal(&main, &reh, 0.25, 1).unwrap()
        );
    }

    #[test]
    fn train_eval_split_partitions() {
        let d = synthetic(&[2; 20]);
        let (train, eval) = d.train_eval_split(0.15, 3).unwrap();
        assert_eq!((train.len(), eval.len()), (17, 3));
        let mut all: Vec<u32> = train
            .samples
            .iter()
            .chain(&eval.samples)
            .map(|s| s.input_ids[0])
            .collect();
        all.sort_unstable();
        assert_eq!(all, (0..20).map(|k| k * 1000).collect::<Vec<u32>>());
        assert_eq!(d.train_eval_split(0.15, 3).unwrap().1, eval);
        assert_ne!(d.train_eval_split(0.15, 4).unwrap().1, eval);
        assert_eq!(d.train_eval_split(0.001, 3).unwrap().1.len(), 1);
        assert!(synthetic(&[2]).train_eval_split(0.5, 0).is_err());
    }

    #[test]
    fn loads_fixture_files_end_to_end() {
        let tok = byte_tokenizer();
        let t = ChatTemplate::from_tokenizer(&tok).unwrap().unwrap();
        for (file, format, n) in [
            ("alpaca.jsonl", DataFormat::Alpaca, 3),
            ("sharegpt.json", DataFormat::ShareGpt, 2),
            ("messages.jsonl", DataFormat::Messages, 2),
            ("prompt_completion.jsonl", DataFormat::PromptCompletion, 2),
            ("text.jsonl", DataFormat::Text, 2),
        ] {
            let (d, rep) =
                load_dataset(&data_fixture(file), &LoadOptions::default(), &tok, Some(&t)).unwrap();
            assert_eq!(
                (rep.format, d.len(), rep.dropped_no_target),
                (format, n, 0),
                "{file}"
            );
            assert!(d
                .samples
                .iter()
                .all(|s| s.n_trained() > 0 && s.labels.len() == s.input_ids.len()));
        }
    }
}
