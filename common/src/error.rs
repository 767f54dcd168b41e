//! Typed errors of the core library. Every variant names the file, key, tensor or line
//! that is at fault, so that the CLI can print one clear paragraph.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A config key, value or combination that is not valid.
    #[error("config: {0}")]
    Config(String),

    /// A file that exists but cannot be read as the format it claims to be
    /// (truncated safetensors, a GGUF with a bad header, a malformed JSONL line, …).
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },

    /// A tensor that is missing from a checkpoint.
    #[error("{path}: tensor `{name}` is missing")]
    MissingTensor { path: PathBuf, name: String },

    /// A tensor whose shape does not match what the model config implies.
    #[error("tensor `{name}` has shape {got:?}, expected {expected:?} (from {path})")]
    Shape {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },

    /// Data problems: empty data sets, a sample with no trainable token, …
    #[error("data: {0}")]
    Data(String),

    /// Teacher and student that cannot be distilled into each other
    /// (different tokenizers, incompatible vocabularies).
    #[error("teacher/student mismatch: {0}")]
    Mismatch(String),

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("{0}")]
    Msg(String),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { path: path.into(), source }
    }
    pub fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Format { path: path.into(), msg: msg.into() }
    }
}

/// Early return with an `Error::Config`.
#[macro_export]
macro_rules! config_bail {
    ($($arg:tt)*) => { return Err($crate::Error::Config(format!($($arg)*))) };
}
