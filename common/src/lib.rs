//! qdistill-common: everything a worker needs to train — config, models, NF4, LoRA,
//! hand-written forward/backward, losses, data, optimizer, checkpoints.
//!
//! The training path never records a candle autograd graph: every op has an explicit
//! forward that returns what its backward needs, and an explicit backward. The frozen
//! base only ever receives dX; LoRA adapters receive dA, dB.

pub mod chat_template;
pub mod checkpoint;
pub mod collective;
pub mod config;
pub mod data;
pub mod error;
pub mod generate;
#[cfg(feature = "cuda")]
pub mod kernels;
pub mod lora;
pub mod loss;
pub mod merge;
pub mod model;
pub mod nf4;
pub mod ops;
pub mod optim;
pub mod optim8bit;
pub mod teacher_cache;
pub mod tensorboard;
pub mod tokenizer;
pub mod weights;

pub use error::{Error, Result};
