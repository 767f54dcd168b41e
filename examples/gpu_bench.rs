//! GPU self-test and benchmarks, as a standalone binary for the GPU machine:
//!
//! ```text
//! cargo build --release --features cuda --example gpu_bench
//! gpu_bench selftest --device cuda:0 --fixtures tests/fixtures
//! gpu_bench bench --device cuda:0 --shapes 8b,1b [--only lora,qlora,teacher,kernels] [--iters 3]
//! ```
//!
//! The same entry points (`qdistill_worker::bench::{run_selftest, run_bench}`) are meant
//! for `qdistill selftest` / `qdistill bench` subcommands.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use qdistill_worker::bench::{open_device, run_bench, run_selftest, BenchCase, BenchSpec, ModelShape, SelftestSpec};

#[derive(Parser)]
#[command(about = "qdistill GPU self-test and benchmarks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The CUDA path against transformers/PEFT fixtures and the CPU implementation.
    Selftest {
        #[arg(long, default_value = "cuda:0")]
        device: String,
        #[arg(long, default_value = "tests/fixtures")]
        fixtures: PathBuf,
    },
    /// Synthetic benchmarks with random weights of real shapes.
    Bench {
        #[arg(long, default_value = "cuda:0")]
        device: String,
        /// Comma-separated model shapes: 8b, 1b, tiny.
        #[arg(long, default_value = "8b,1b")]
        shapes: String,
        /// Comma-separated case kinds to keep: lora, qlora, teacher, kernels.
        #[arg(long)]
        only: Option<String>,
        #[arg(long, default_value_t = 3)]
        iters: usize,
        #[arg(long, default_value_t = 1)]
        warmup: usize,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Selftest { device, fixtures } => {
            let report = run_selftest(&SelftestSpec { device: open_device(&device)?, fixtures })?;
            println!("\n{}", report.table());
            let failed = report.checks.iter().filter(|c| !c.pass).count();
            println!("selftest: {} passed, {failed} failed", report.checks.len() - failed);
            if failed > 0 {
                std::process::exit(1);
            }
        }
        Cmd::Bench { device, shapes, only, iters, warmup } => {
            let shapes = shapes.split(',').map(ModelShape::parse).collect::<anyhow::Result<Vec<_>>>()?;
            let mut spec = BenchSpec::standard(open_device(&device)?, &shapes);
            spec.iters = iters;
            spec.warmup = warmup;
            if let Some(only) = only {
                let keep: Vec<&str> = only.split(',').collect();
                spec.cases.retain(|c| {
                    let kind = match c {
                        BenchCase::Student { nf4: false, .. } => "lora",
                        BenchCase::Student { nf4: true, .. } => "qlora",
                        BenchCase::Teacher { .. } => "teacher",
                        _ => "kernels",
                    };
                    keep.contains(&kind)
                });
            }
            let report = run_bench(&spec)?;
            println!("\n{}", report.table());
        }
    }
    Ok(())
}
