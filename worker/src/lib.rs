//! qdistill-worker: the teacher and student role loops, and the embedded run that puts
//! both in one process.

pub mod bench;
pub mod cluster;
pub mod data_plan;
pub mod models;
pub mod run;
#[cfg(feature = "cuda")]
pub mod selftest_fused;
pub mod trainer;
