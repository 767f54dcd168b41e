//! qdistill-common: everything a worker needs to train — config, models, NF4, LoRA,
//! hand-written forward/backward, losses, data, optimizer, checkpoints.
//!
//! The training path never records a candle autograd graph: every op has an explicit
//! forward that returns what its backward needs, and an explicit backward. The frozen
//! base only ever receives dX; LoRA adapters receive dA, dB.

pub mod error;
pub mod ops;

pub use error::{Error, Result};
