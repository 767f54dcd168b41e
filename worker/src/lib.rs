//! qdistill-worker: the teacher and student role loops, and the embedded run that puts
//! both in one process.

pub mod bench;
pub mod cluster;
pub mod data_plan;
pub mod eval;
pub mod generate;
pub mod metrics;
pub mod gkd;
pub mod models;
pub mod run;
#[cfg(feature = "cuda")]
pub mod selftest_flash;
#[cfg(feature = "cuda")]
pub mod selftest_fused;
#[cfg(feature = "cuda")]
pub mod selftest_loss;
#[cfg(feature = "cuda")]
pub mod selftest_nccl;
#[cfg(feature = "cuda")]
pub mod selftest_optim;
pub mod teacher_cache;
pub mod trainer;
