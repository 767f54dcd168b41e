//! The `qdistill` command line: a thin layer over qdistill-worker and qdistill-common.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use qdistill_worker::bench;

mod telemetry;

/// Set to 1, the command line is parsed and checked, and nothing runs (exit status 0 when
/// it parses). The deployment tests check the manifests' command lines this way.
const PARSE_ONLY_VAR: &str = "QDISTILL_PARSE_ONLY";
/// Exit status of a worker that left on SIGTERM: 128 + 15, as a shell reports a process
/// killed by it, so that a Kubernetes Job replaces the pod (exit 0 would mark its index
/// complete).
const EXIT_TERMINATED: u8 = 143;
/// Kubernetes deployments pass the token from a Secret, which may have been left empty.
const EMPTY_TOKEN: &str = "the job token (--token / QDISTILL_TOKEN) is empty; set one shared by the coordinator and \
                           its workers, e.g. `openssl rand -hex 16` (on Kubernetes: deploy/base/token.env, see README.md)";

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
    /// qdistill_config.toml).
    ///
    /// Without --workers the job runs directly in this process: the same student step as a
    /// cluster run without the RPC layer, and the only mode that supports `teacher.cache`,
    /// GKD (`distill.lmbda`, `distill.seq_kd`) and per-epoch saves; it also writes
    /// `<output_dir>/metrics.jsonl`. With --workers N (2 or
    /// more) the coordinator and N workers run inside this process over the cluster code
    /// path (embedded mode): it writes what `qdistill coordinator` writes (checkpoints,
    /// final_model/, ledger.json, the job record), and the same command continues a job that
    /// Ctrl-C / SIGTERM stopped.
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
        /// Where to train: "cpu" or "cuda:N" (the same as `--set device=…`; the config's
        /// `teacher_device` can put a separate teacher on another GPU).
        #[arg(long)]
        device: Option<String>,
        /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 0.0.0.0:9090).
        #[arg(long, value_name = "ADDR")]
        metrics_addr: Option<String>,
        /// Embedded mode: run a coordinator and N workers in this process (teacher ranks
        /// first, then students; a separate teacher model needs N >= 2). 1 is the direct
        /// run.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
        workers: Option<u32>,
        /// One device per worker, comma-separated: "cpu,cpu,cpu" or "cuda:0,cuda:1"
        /// [default: every worker on --device / the config's device]. Workers on GPUs of
        /// their own use NCCL; workers sharing a device use the TCP collective.
        #[arg(long, value_name = "LIST", requires = "workers")]
        devices: Option<String>,
        /// Teacher ranks when the job has a separate teacher model (embedded mode).
        #[arg(long, default_value_t = 1, requires = "workers")]
        teacher_ranks: usize,
        /// Virtual data shards per step (embedded mode; default: the number of students).
        /// As many shards as gradient_accumulation_steps sums the gradient in the order of
        /// the direct run, which then gives the same bits.
        #[arg(long, requires = "workers")]
        shards: Option<usize>,
        /// Also serve the embedded coordinator on ADDR (e.g. 0.0.0.0:50051) so that
        /// `qdistill status` can watch the job; its URL and token are logged.
        #[arg(long, value_name = "ADDR", requires = "workers")]
        listen: Option<String>,
        /// The embedded job's token [default: kept in <output_dir>/.qdistill_token, made
        /// on first use]. Not used without --workers (so a QDISTILL_TOKEN set for a
        /// cluster does not get in the way of the direct run).
        #[arg(long, env = "QDISTILL_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
    /// Show what a job's data becomes: sample and token counts, the masked share, the
    /// rehearsal mix and the number of optimizer steps; with `--dump`, write every
    /// micro-batch of the training stream (and the held-out batches) as JSONL.
    Data {
        /// The job config (the same file `train` takes).
        config: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// Write the batches here, one JSON object a line, in training order.
        #[arg(long, value_name = "FILE")]
        dump: Option<PathBuf>,
    },
    /// Run the teacher once over a job's whole training stream and store its top-K
    /// log-probabilities (sharded, checksummed); `train` with `teacher.cache = "DIR"` then
    /// reads them instead of loading the teacher.
    ///
    /// The config is the training job's own, with `teacher.output = "topk:K"` (and
    /// `teacher.topk_dtype`, default float16). An interrupted build continues where it
    /// stopped when run again with the same config and --out.
    TeacherCache {
        config: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// The cache directory (created; an interrupted build there is continued).
        #[arg(long)]
        out: PathBuf,
        /// Largest shard file ("2GB", "500MB", bytes); a shard holds whole micro-batches.
        #[arg(long, default_value = "2GB")]
        max_shard_size: String,
        /// Hide the progress bar.
        #[arg(long)]
        no_progress: bool,
    },
    /// Serve a job as the cluster coordinator: plans shards and roles, tracks leases,
    /// commits steps, stores checkpoints, re-forms the group when a worker dies.
    Coordinator {
        /// The job config (the same file `train` takes).
        config: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        overrides: Vec<String>,
        /// gRPC listen address.
        #[arg(long, default_value = "0.0.0.0:50051")]
        listen: String,
        /// Workers the first generation waits for.
        #[arg(long)]
        workers: usize,
        /// Workers a later generation may start with after a failure (default: as few as
        /// the teacher mode allows).
        #[arg(long)]
        min_workers: Option<usize>,
        /// Teacher ranks when the job has a separate teacher model.
        #[arg(long, default_value_t = 1)]
        teacher_ranks: usize,
        /// Virtual data shards per step; fixes the gradient summation order, so the result
        /// does not depend on how many students survive (default: first student count).
        #[arg(long)]
        shards: Option<usize>,
        /// Seconds without a heartbeat after which a worker is declared dead.
        #[arg(long, default_value_t = 30.0)]
        lease: f64,
        /// Seconds between worker heartbeats.
        #[arg(long, default_value_t = 5.0)]
        heartbeat: f64,
        /// Generations after which the job gives up.
        #[arg(long, default_value_t = 100)]
        max_generations: u64,
        /// The job's shared secret (a fresh one is generated and printed when absent).
        /// A restarted coordinator needs the token its workers hold.
        #[arg(long, env = "QDISTILL_TOKEN", hide_env_values = true)]
        token: Option<String>,
        /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 0.0.0.0:9090).
        #[arg(long, value_name = "ADDR")]
        metrics_addr: Option<String>,
        /// On SIGTERM, seconds to wait for a checkpoint of the step in progress before
        /// stopping (0: stop at once).
        #[arg(long, default_value_t = 60.0)]
        drain_timeout: f64,
        /// Serve gRPC over TLS with this PEM certificate chain (workers then use https://
        /// and --tls-ca).
        #[arg(long, value_name = "PEM", requires = "tls_key")]
        tls_cert: Option<PathBuf>,
        /// The PEM private key of --tls-cert.
        #[arg(long, value_name = "PEM", requires = "tls_cert")]
        tls_key: Option<PathBuf>,
    },
    /// Run a cluster worker: registers with the coordinator and takes the role it is given.
    Worker {
        /// e.g. http://coordinator:50051 (https:// with --tls-ca)
        #[arg(long)]
        coordinator: String,
        #[arg(long, env = "QDISTILL_TOKEN", hide_env_values = true)]
        token: String,
        /// PEM file of the CA that signed the coordinator's TLS certificate (https:// URLs).
        #[arg(long, value_name = "PEM")]
        tls_ca: Option<PathBuf>,
        /// Name in logs and status (default: host:pid).
        #[arg(long)]
        name: Option<String>,
        /// Where this worker accepts its peers' collective connections (port 0: any).
        #[arg(long, default_value = "127.0.0.1:0")]
        collective_listen: String,
        /// The address peers dial (required when listening on 0.0.0.0).
        #[arg(long)]
        collective_advertise: Option<String>,
        /// This worker's device, overriding the config's (cpu, cuda:N).
        #[arg(long)]
        device: Option<String>,
        /// Do not offer NCCL: teacher outputs and gradients go over the TCP collective even
        /// when every peer is on a GPU.
        #[arg(long)]
        no_nccl: bool,
        /// How many optimizer steps a teacher may compute ahead of its students.
        #[arg(long, default_value_t = 2)]
        teacher_lookahead_steps: u64,
        /// Serve Prometheus metrics at http://ADDR/metrics (e.g. 0.0.0.0:9090).
        #[arg(long, value_name = "ADDR")]
        metrics_addr: Option<String>,
    },
    /// Show a running job's progress.
    Status {
        #[arg(long)]
        coordinator: String,
        #[arg(long, env = "QDISTILL_TOKEN", hide_env_values = true)]
        token: String,
        /// PEM file of the CA that signed the coordinator's TLS certificate (https:// URLs).
        #[arg(long, value_name = "PEM")]
        tls_ca: Option<PathBuf>,
    },
    /// Check the training path on a device against the committed HF/PEFT fixtures (logits
    /// of every architecture, LoRA gradients, the NF4 kernel); prints a pass/fail table.
    Selftest {
        #[arg(long, default_value = "cuda:0")]
        device: String,
        #[arg(long, default_value = "tests/fixtures")]
        fixtures: PathBuf,
    },
    /// Benchmark student steps, teacher forwards and kernels at real model shapes with
    /// random weights (see BENCHMARKS.md).
    Bench {
        #[arg(long, default_value = "cuda:0")]
        device: String,
        /// Comma-separated: 8b, 1b, tiny.
        #[arg(long, default_value = "8b,1b")]
        shapes: String,
        /// Comma-separated subset of: lora, qlora, teacher, kernels, or the start of a case's
        /// label as the table prints it ("lora bf16 8b 2x2048 nogc", "nf4 dequant").
        #[arg(long)]
        only: Option<String>,
        #[arg(long, default_value_t = 3)]
        iters: usize,
        #[arg(long, default_value_t = 1)]
        warmup: usize,
    },
    /// Fold a LoRA adapter into its base model (W + scaling·B·A, as PEFT's
    /// merge_and_unload) and write an HF model directory that transformers loads.
    ///
    /// The base may be an HF directory (dense or bitsandbytes 4-bit), a .safetensors file,
    /// a GGUF file or a hub id; quantized bases are dequantized first. An adapter trained
    /// on a depth-pruned student gives that student (the kept layers, renumbered).
    Merge {
        /// The base model (default: the adapter's base_model_name_or_path).
        #[arg(long)]
        model: Option<String>,
        /// The adapter directory (adapter_config.json + adapter_model.safetensors), e.g.
        /// <output_dir>/final_model.
        #[arg(long)]
        adapter: PathBuf,
        /// Where the merged model goes (replaced if it exists).
        #[arg(long)]
        out: PathBuf,
        /// dtype of the written weights: bf16 or f32.
        #[arg(long, default_value = "bf16")]
        dtype: String,
        /// Base layers the adapter was trained on, e.g. "0-13,24-29" (default: the
        /// adapter's qdistill_config.toml, else all).
        #[arg(long)]
        keep_layers: Option<String>,
        /// Largest safetensors shard, as HF writes it ("5GB", "500MB", bytes).
        #[arg(long, default_value = "5GB")]
        max_shard_size: String,
    },
    /// Print a model's resolved architecture (from config.json or GGUF metadata).
    Info {
        /// HF model directory, .safetensors file or .gguf file.
        model: PathBuf,
    },
    /// Generate text with a model (and a trained adapter): one prompt, or a chat that
    /// keeps the conversation. Text streams to stdout; a log line reports tokens/s.
    Generate {
        #[command(flatten)]
        model: ModelOpts,
        /// The prompt (the first user turn with --chat). Without it and without --chat the
        /// prompt is read from stdin.
        #[arg(long)]
        prompt: Option<String>,
        /// Chat: read user turns from stdin (one a line; /reset forgets the conversation,
        /// /exit or end of input stops).
        #[arg(long)]
        chat: bool,
        /// A system message before the first turn.
        #[arg(long)]
        system: Option<String>,
        /// Tokens per reply [default: the model's generation_config.json (max_new_tokens,
        /// else max_length for prompt + reply), else 256].
        #[arg(long)]
        max_new_tokens: Option<usize>,
        /// 0 = greedy (the most likely token); above 0 samples [default: the model's
        /// generation_config.json (its temperature when do_sample is true), else 0].
        #[arg(long)]
        temperature: Option<f64>,
        /// Nucleus sampling mass, 1 = off [default: generation_config.json, else 1].
        #[arg(long)]
        top_p: Option<f64>,
        /// Sample among the K most likely tokens, 0 = off [default: generation_config.json,
        /// else 50].
        #[arg(long)]
        top_k: Option<usize>,
        /// transformers' repetition_penalty, 1 = off [default: generation_config.json, else 1].
        #[arg(long)]
        repetition_penalty: Option<f64>,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Use the prompt text as is, without the tokenizer's chat template.
        #[arg(long)]
        no_chat_template: bool,
    },
    /// Evaluate a model (and a trained adapter): perplexity and KL to a teacher on data,
    /// multiple-choice accuracy, and with --adapter a forgetting report (base vs adapted).
    Eval {
        #[command(flatten)]
        model: ModelOpts,
        /// A teacher with the same tokenizer: adds KL(teacher‖model) at T = 1.
        #[arg(long)]
        teacher: Option<String>,
        /// Held-out data (JSONL/JSON, any format `train` reads); CE over the trained tokens.
        #[arg(long)]
        data: Option<PathBuf>,
        /// Format of --data: auto, alpaca, sharegpt, messages, prompt_completion, text.
        #[arg(long, default_value = "auto")]
        format: String,
        /// General-ability data the adapter should not have hurt (format detected).
        #[arg(long)]
        rehearsal: Option<PathBuf>,
        /// Multiple-choice JSONL: {"question", "choices": [...], "answer": index or letter}.
        #[arg(long)]
        mc: Option<PathBuf>,
        /// Longer samples are cut (keeping EOS), as training cuts them.
        #[arg(long, default_value_t = 1024)]
        max_seq_length: usize,
        /// Score only the first N samples of --data and of --rehearsal.
        #[arg(long)]
        max_samples: Option<usize>,
        #[arg(long, default_value_t = 4)]
        batch_size: usize,
        /// Render questions and chat records without the tokenizer's chat template.
        #[arg(long)]
        no_chat_template: bool,
        /// Also write the metrics as JSON here.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

/// The model options `generate` and `eval` share.
#[derive(clap::Args)]
struct ModelOpts {
    /// HF model directory, hub id (org/name) or .gguf file.
    #[arg(long)]
    model: String,
    /// A PEFT adapter directory (adapter_config.json + adapter_model.safetensors), e.g.
    /// <output_dir>/final_model.
    #[arg(long)]
    adapter: Option<PathBuf>,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// f32 or bf16.
    #[arg(long, default_value = "f32")]
    dtype: String,
    /// Quantize the base to NF4 on load, as a QLoRA student is trained.
    #[arg(long)]
    nf4: bool,
}

impl ModelOpts {
    fn args(self) -> qdistill_worker::generate::ModelArgs {
        qdistill_worker::generate::ModelArgs { model: self.model, adapter: self.adapter, device: self.device, dtype: self.dtype, nf4: self.nf4 }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if std::env::var(PARSE_ONLY_VAR).is_ok_and(|v| v == "1") {
        return ExitCode::SUCCESS;
    }
    let service = match &cli.command {
        Command::Coordinator { .. } => "qdistill-coordinator",
        Command::Worker { .. } => "qdistill-worker",
        _ => "qdistill",
    };
    let exporter = match telemetry::init(service) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let code = match run(cli) {
        Ok(Exit::Success) => ExitCode::SUCCESS,
        Ok(Exit::Terminated) => ExitCode::from(EXIT_TERMINATED),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    };
    // Flushes the spans not exported yet.
    drop(exporter);
    code
}

enum Exit {
    Success,
    /// Left on a signal, before the job was over.
    Terminated,
}

fn serve_metrics(addr: Option<String>, role: &str) -> anyhow::Result<Option<qdistill_coordinator::metrics::MetricsServer>> {
    addr.map(|a| qdistill_worker::metrics::serve(&a, role).with_context(|| format!("--metrics-addr {a}"))).transpose()
}

fn run(cli: Cli) -> anyhow::Result<Exit> {
    run_command(cli).map(|()| Exit::Success).or_else(|e| match e.downcast::<WorkerTerminated>() {
        Ok(WorkerTerminated) => Ok(Exit::Terminated),
        Err(e) => Err(e),
    })
}

/// How the worker command reports a SIGTERM exit through `run_command`'s `()` result.
#[derive(Debug)]
struct WorkerTerminated;

impl std::fmt::Display for WorkerTerminated {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("terminated by a signal")
    }
}

impl std::error::Error for WorkerTerminated {}

fn run_command(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Train { config, mut overrides, no_progress, device, metrics_addr, workers, devices, teacher_ranks, shards, listen, token } => {
            if let Some(d) = device {
                overrides.push(format!("device={d}"));
            }
            match workers {
                Some(n) if n >= 2 => {
                    let n = n as usize;
                    let mut opts = qdistill_worker::cluster::EmbeddedOptions::new(n);
                    opts.devices = devices.map(|d| qdistill_worker::cluster::parse_devices(&d, n)).transpose()?;
                    opts.teacher_ranks = teacher_ranks;
                    opts.shards = shards;
                    opts.listen = listen;
                    opts.token = token;
                    opts.metrics_addr = metrics_addr;
                    opts.progress = !no_progress;
                    let run = qdistill_worker::cluster::run_embedded(&config, &overrides, opts)
                        .with_context(|| format!("training with {} (embedded, {n} workers)", config.display()))?;
                    let o = &run.outcome;
                    if run.terminated {
                        eprintln!(
                            "stopped at step {} (last checkpoint in {}); the same command continues the job",
                            o.committed_steps,
                            o.output_dir.display()
                        );
                        return Err(WorkerTerminated.into());
                    }
                    println!(
                        "done: {} steps, generation {}; adapter in {}",
                        o.committed_steps,
                        o.generation,
                        o.output_dir.join("final_model").display()
                    );
                    return Ok(());
                }
                Some(_) if devices.is_some() || shards.is_some() || listen.is_some() => {
                    anyhow::bail!("--devices, --shards and --listen are for embedded mode: pass --workers 2 or more")
                }
                _ => {}
            }
            let _metrics = serve_metrics(metrics_addr, "train")?;
            let summary = qdistill_worker::run::train(&config, &overrides, !no_progress)
                .with_context(|| format!("training with {}", config.display()))?;
            println!("{}", summary.table());
            Ok(())
        }
        Command::TeacherCache { config, overrides, out, max_shard_size, no_progress } => {
            let opts = qdistill_worker::teacher_cache::CacheOptions {
                max_shard_bytes: qdistill_common::merge::parse_size(&max_shard_size)?,
                progress: !no_progress,
            };
            let summary = qdistill_worker::teacher_cache::build_cache(&config, &overrides, &out, &opts)
                .with_context(|| format!("building the teacher cache of {} in {}", config.display(), out.display()))?;
            println!("{}", summary.table());
            Ok(())
        }
        Command::Coordinator {
            config,
            overrides,
            listen,
            workers,
            min_workers,
            teacher_ranks,
            shards,
            lease,
            heartbeat,
            max_generations,
            token,
            metrics_addr,
            drain_timeout,
            tls_cert,
            tls_key,
        } => {
            anyhow::ensure!(!token.as_deref().is_some_and(|t| t.trim().is_empty()), "{EMPTY_TOKEN}");
            let token = token.unwrap_or_else(|| {
                let t = qdistill_coordinator::generate_token();
                eprintln!("job token (pass it to workers as --token or QDISTILL_TOKEN): {t}");
                t
            });
            let opts = qdistill_coordinator::ServeOptions {
                token,
                workers,
                min_workers,
                teacher_ranks,
                shards,
                lease: Duration::from_secs_f64(lease),
                heartbeat_interval: Duration::from_secs_f64(heartbeat),
                reform_grace: None,
                max_generations,
                metrics_addr,
                drain_timeout: Duration::from_secs_f64(drain_timeout),
                tls: tls_cert.zip(tls_key).map(|(cert, key)| qdistill_coordinator::service::ServerTls { cert, key }),
            };
            let outcome = qdistill_worker::cluster::serve_coordinator(&config, &overrides, &listen, opts)?;
            println!("{outcome:#?}");
            Ok(())
        }
        Command::Worker { coordinator, token, tls_ca, name, collective_listen, collective_advertise, device, no_nccl, teacher_lookahead_steps, metrics_addr } => {
            anyhow::ensure!(!token.trim().is_empty(), "{EMPTY_TOKEN}");
            let _metrics = serve_metrics(metrics_addr, "worker")?;
            let mut opts = qdistill_worker::cluster::WorkerOptions::new(coordinator, token);
            opts.connect.tls_ca = tls_ca;
            opts.nccl = !no_nccl;
            opts.teacher_lookahead_steps = teacher_lookahead_steps;
            opts.name = name;
            opts.collective_listen = collective_listen;
            opts.collective_advertise = collective_advertise;
            opts.device = device
                .map(|d| qdistill_common::config::Device::parse(&d).map_err(anyhow::Error::msg))
                .transpose()?;
            let exit = qdistill_worker::cluster::run_worker(opts)?;
            println!("{exit:?}");
            if exit == qdistill_worker::cluster::WorkerExit::Terminated {
                return Err(WorkerTerminated.into());
            }
            Ok(())
        }
        Command::Status { coordinator, token, tls_ca } => {
            let connect = qdistill_coordinator::client::ConnectOptions { attempts: 3, tls_ca, ..Default::default() };
            println!("{}", qdistill_coordinator::client::status_with(&coordinator, &token, &connect)?);
            Ok(())
        }
        Command::Selftest { device, fixtures } => {
            // The table is printed row by row as the checks finish (what a killed run got to
            // stays on screen); the summary line closes it.
            let report = bench::run_selftest(&bench::SelftestSpec { device: bench::open_device(&device)?, fixtures })?;
            let failed = report.checks.iter().filter(|c| !c.pass).count();
            println!("selftest: {} passed, {failed} failed", report.checks.len() - failed);
            anyhow::ensure!(failed == 0, "{failed} self-test check(s) failed");
            Ok(())
        }
        Command::Bench { device, shapes, only, iters, warmup } => {
            let shapes = shapes.split(',').map(bench::ModelShape::parse).collect::<anyhow::Result<Vec<_>>>()?;
            let mut spec = bench::BenchSpec::standard(bench::open_device(&device)?, &shapes);
            spec.iters = iters;
            spec.warmup = warmup;
            if let Some(only) = only {
                let keep: Vec<&str> = only.split(',').map(str::trim).filter(|k| !k.is_empty()).collect();
                spec.cases.retain(|c| {
                    let kind = match c {
                        bench::BenchCase::Student { nf4: false, .. } => "lora",
                        bench::BenchCase::Student { nf4: true, .. } => "qlora",
                        bench::BenchCase::Teacher { .. } => "teacher",
                        _ => "kernels",
                    };
                    // A kind, or the start of a case's label ("lora bf16 8b 2x2048 nogc",
                    // "nf4 dequant"): one case alone, e.g. under a profiler.
                    let label = c.label();
                    keep.iter().any(|k| *k == kind || label.starts_with(k))
                });
                anyhow::ensure!(
                    !spec.cases.is_empty(),
                    "--only {only:?} matches no benchmark case of shapes {shapes:?}: give lora, qlora, teacher, kernels, \
                     or the start of a case label as the table prints it (\"lora bf16 8b 2x2048 nogc\")"
                );
            }
            // Rows are printed as each case finishes: the table is on screen already.
            bench::run_bench(&spec)?;
            Ok(())
        }
        Command::Data { config, overrides, dump } => {
            let cfg = qdistill_common::config::load(&config, &overrides)?;
            let path = qdistill_common::config::resolve_model_path(&cfg.model.model_name_or_path, cfg.model.revision.as_deref(), None)?;
            let (_, _, tok) = qdistill_worker::models::open(&path)?;
            let report = qdistill_worker::data_plan::inspect(&cfg, &tok, dump.as_deref())
                .with_context(|| format!("data of {}", config.display()))?;
            println!("{}", report.table());
            Ok(())
        }
        Command::Merge { model, adapter, out, dtype, keep_layers, max_shard_size } => {
            use qdistill_common::{checkpoint, config, merge};
            let spec = match model {
                Some(m) => m,
                None => checkpoint::AdapterConfig::load(&adapter.join(checkpoint::ADAPTER_CONFIG_NAME))?
                    .base_model_name_or_path
                    .context("the adapter names no base_model_name_or_path: pass --model")?,
            };
            let base = config::resolve_model_path(&spec, None, None)?;
            let keep_layers = match keep_layers {
                Some(s) => Some(config::parse_layer_spec(&s)?),
                None => merge::trained_keep_layers(&adapter)?,
            };
            let opts = merge::MergeOptions {
                dtype: merge::MergeDtype::parse(&dtype)?,
                keep_layers,
                max_shard_size: merge::parse_size(&max_shard_size)?,
            };
            tracing::info!(base = %base.display(), adapter = %adapter.display(), keep_layers = ?opts.keep_layers, "merging");
            let r = merge::merge_adapter(&base, &adapter, &out, &opts)
                .with_context(|| format!("merging {} into {}", adapter.display(), base.display()))?;
            println!(
                "merged {} linear layers (scaling {}) of {} decoder layers into {}: {} tensors, {:.1} MB of {} in {} file(s)",
                r.merged_modules,
                r.scaling,
                r.num_hidden_layers,
                out.display(),
                r.tensors,
                r.bytes as f64 / 1e6,
                opts.dtype.hf_name(),
                r.shards
            );
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
        Command::Generate {
            model,
            prompt,
            chat,
            system,
            max_new_tokens,
            temperature,
            top_p,
            top_k,
            repetition_penalty,
            seed,
            no_chat_template,
        } => {
            let args = qdistill_worker::generate::GenerateArgs {
                model: model.args(),
                prompt,
                chat,
                system,
                generation: qdistill_common::generate::GenerationFlags {
                    temperature,
                    top_k,
                    top_p,
                    repetition_penalty,
                    max_new_tokens,
                    seed,
                },
                chat_template: !no_chat_template,
            };
            let stdin = std::io::stdin();
            // The "> " turn marker is for people typing, not for piped input.
            let mut marker: Box<dyn std::io::Write> =
                if stdin.is_terminal() { Box::new(std::io::stderr()) } else { Box::new(std::io::sink()) };
            qdistill_worker::generate::run_generate(&args, &mut stdin.lock(), &mut std::io::stdout().lock(), &mut marker)?;
            Ok(())
        }
        Command::Eval {
            model,
            teacher,
            data,
            format,
            rehearsal,
            mc,
            max_seq_length,
            max_samples,
            batch_size,
            no_chat_template,
            json,
        } => {
            let args = qdistill_worker::eval::EvalArgs {
                model: model.args(),
                teacher,
                data,
                format: format.parse()?,
                rehearsal,
                mc,
                max_seq_length,
                max_samples,
                batch_size,
                chat_template: !no_chat_template,
            };
            let report = qdistill_worker::eval::run_eval(&args)?;
            println!("{}", report.table());
            if let Some(path) = json {
                report.write_json(&path)?;
            }
            Ok(())
        }
    }
}
