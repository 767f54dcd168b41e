//! The `qdistill` command line: a thin layer over qdistill-worker and qdistill-common.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "qdistill",
    version,
    about = "Distill a teacher LLM into a 4-bit NF4 + LoRA student (QLoRA), from one CPU to a GPU cluster",
    long_about = "Distill a teacher LLM into a 4-bit NF4 + LoRA student (QLoRA) with cross-entropy plus a \
                  KL term to the teacher, rehearsal data mixed in to limit forgetting. Configs use HF Trainer \
                  and PEFT key names; adapters are written in PEFT layout.\n\nSet RUST_LOG=debug for more logs."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train: distill the teacher into the student as the config says.
    ///
    /// Writes `<output_dir>/final_model/` (adapter_model.safetensors, adapter_config.json,
    /// qdistill_config.toml) and `<output_dir>/metrics.jsonl`.
    Train {
        /// The job config (TOML, or YAML by extension .yaml/.yml).
        config: PathBuf,
        /// Override a config key, e.g. `--set training.learning_rate=1e-4` or
        /// `--set max_steps=10` (a bare key is accepted when only one section has it).
        /// Repeatable.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Hide the progress bar (logs still go to stderr).
        #[arg(long)]
        no_progress: bool,
    },
    /// Print a model's resolved architecture (from config.json or GGUF metadata).
    Info {
        /// HF model directory, .safetensors file or .gguf file.
        model: PathBuf,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Train { config, overrides, no_progress } => {
            let summary = qdistill_worker::run::train(&config, &overrides, !no_progress)
                .with_context(|| format!("training with {}", config.display()))?;
            println!("{}", summary.table());
            Ok(())
        }
        Command::Info { model } => {
            let (_, cfg, tok) = qdistill_worker::models::open(&model)?;
            println!("{cfg:#?}");
            println!(
                "tokenizer: {} tokens, eos `{}` = {}, chat template: {}",
                tok.tokenizer.get_vocab_size(true),
                tok.eos_token,
                tok.eos_id,
                if tok.chat_template.is_some() { "yes" } else { "no" }
            );
            Ok(())
        }
    }
}
