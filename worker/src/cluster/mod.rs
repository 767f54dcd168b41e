//! Cluster mode, worker side (`qdistill worker --coordinator URL`): connect, register,
//! ask for work, run the role the coordinator assigns (teacher or student) in its
//! generation, heartbeat all along, and start over when the generation breaks. The worker
//! never decides the plan; it asks.
//!
//! Files: the job config comes from the coordinator; model and data paths in it must be
//! readable on every worker (a shared filesystem or the same image). Checkpoints travel
//! through the coordinator, so workers need no shared writable storage.

mod ckpt;
mod embedded;
mod nccl;
mod session;
mod student;
mod teacher;
mod wire;

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context;
use candle_core::{DType, Device};
use qdistill_common::config::{self, ComputeDtype, LrSchedulerType, TrainConfig};
use qdistill_common::optim::SchedulerType;
use qdistill_coordinator::client::{Client, ConnectOptions};
use qdistill_coordinator::plan::{DeviceKind, Resources};
use qdistill_coordinator::state::{Assignment, Role};

pub use embedded::{parse_devices, run_embedded, EmbeddedOptions, EmbeddedRun, TOKEN_FILE};
use session::{Rpc, Session};

/// How a worker joins a job.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// e.g. `http://coordinator:50051`.
    pub coordinator_url: String,
    /// The job's shared secret.
    pub token: String,
    /// Name in logs and `qdistill status` (default: host:pid).
    pub name: Option<String>,
    /// Where this worker accepts its peers' collective connections (`host:port`; port 0
    /// picks a free one).
    pub collective_listen: String,
    /// The address peers dial (default: the listen address; required when listening on
    /// an unspecified address such as 0.0.0.0).
    pub collective_advertise: Option<String>,
    /// Overrides the job config's `device` on this worker (e.g. its own `cuda:N`).
    pub device: Option<config::Device>,
    pub connect: ConnectOptions,
    /// How long forming a generation's connections may take.
    pub collective_timeout: Duration,
    /// Teacher outputs a teacher may compute ahead of the students, in optimizer steps.
    pub teacher_lookahead_steps: u64,
    /// Offer NCCL for teacher outputs and gradients (a CUDA build on a CUDA `device`); a
    /// generation uses it only when every peer offers it.
    pub nccl: bool,
    /// Leave on Ctrl-C / SIGTERM (a student first checkpoints its step). Off where the
    /// process running the worker stops the job itself.
    pub handle_signals: bool,
}

impl WorkerOptions {
    pub fn new(coordinator_url: impl Into<String>, token: impl Into<String>) -> Self {
        Self {
            coordinator_url: coordinator_url.into(),
            token: token.into(),
            name: None,
            collective_listen: "127.0.0.1:0".into(),
            collective_advertise: None,
            device: None,
            connect: ConnectOptions::default(),
            // Peers connect once they loaded their models, which takes minutes for large
            // ones; a generation that ends meanwhile cancels the wait.
            collective_timeout: Duration::from_secs(1800),
            teacher_lookahead_steps: 2,
            nccl: true,
            handle_signals: true,
        }
    }
}

/// How a worker's run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkerExit {
    /// The job finished (or failed) and the coordinator said stop; carries its reason.
    JobOver(String),
    /// SIGTERM / Ctrl-C: the worker left (after uploading a checkpoint if it was a student).
    Terminated,
}

/// Why a role stopped before the end of the job.
#[derive(Debug)]
pub(crate) enum RoleError {
    /// The generation broke: a peer vanished, or the coordinator said so. Register again.
    Lost(String),
    /// The coordinator says the job is over.
    Stopped,
    /// Anything else (bad model files, a bug): the worker exits with this error.
    Fatal(anyhow::Error),
}

impl RoleError {
    pub(crate) fn lost(e: impl std::fmt::Display) -> Self {
        RoleError::Lost(e.to_string())
    }
}

impl From<anyhow::Error> for RoleError {
    fn from(e: anyhow::Error) -> Self {
        RoleError::Fatal(e)
    }
}

impl From<qdistill_common::Error> for RoleError {
    fn from(e: qdistill_common::Error) -> Self {
        RoleError::Fatal(e.into())
    }
}

pub(crate) enum RoleEnd {
    Finished,
    Terminated,
}

/// What a role needs from its surroundings.
pub(crate) struct RoleCtx<'a> {
    pub rpc: &'a Rpc,
    pub session: &'a Session,
    pub listener: &'a TcpListener,
    pub opts: &'a WorkerOptions,
}

impl RoleCtx<'_> {
    /// Between steps: has the coordinator ended the generation, or the job, or did a
    /// signal arrive?
    pub fn check(&self) -> Result<(), RoleError> {
        let s = &self.session.shared;
        if s.stop.load(Ordering::SeqCst) {
            return Err(RoleError::Stopped);
        }
        if s.reregister.load(Ordering::SeqCst) {
            return Err(RoleError::Lost(s.message()));
        }
        Ok(())
    }
    /// Whether waiting for peers is pointless: the generation or the job ended, or a
    /// signal arrived.
    pub fn cancelled(&self) -> bool {
        let s = &self.session.shared;
        s.stop.load(Ordering::SeqCst) || s.reregister.load(Ordering::SeqCst) || s.term.load(Ordering::SeqCst)
    }
    pub fn terminating(&self) -> bool {
        self.session.shared.term.load(Ordering::SeqCst)
    }
}

pub(crate) fn device_of(d: config::Device) -> anyhow::Result<Device> {
    Ok(match d {
        config::Device::Cpu => Device::Cpu,
        config::Device::Cuda(i) => Device::new_cuda(i).with_context(|| format!("opening cuda:{i} (is this binary built with --features cuda?)"))?,
    })
}

pub(crate) fn dtype_of(d: ComputeDtype) -> DType {
    match d {
        ComputeDtype::F32 => DType::F32,
        ComputeDtype::BF16 => DType::BF16,
    }
}

pub(crate) fn scheduler(k: LrSchedulerType) -> SchedulerType {
    match k {
        LrSchedulerType::Linear => SchedulerType::Linear,
        LrSchedulerType::Cosine => SchedulerType::Cosine,
        LrSchedulerType::Constant => SchedulerType::Constant,
        LrSchedulerType::ConstantWithWarmup => SchedulerType::ConstantWithWarmup,
    }
}

/// Host memory and cores of this machine (CPU workers).
pub fn detect_resources() -> Resources {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as u32;
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| t.lines().find(|l| l.starts_with("MemTotal:")).and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok()))
        .map_or(0, |kib| kib * 1024);
    Resources { device_kind: DeviceKind::Cpu, device_count: 1, device_memory_bytes: mem, cpu_cores: cores, nccl: false }
}

fn advertise_addr(listener: &TcpListener, opts: &WorkerOptions) -> anyhow::Result<String> {
    if let Some(a) = &opts.collective_advertise {
        return Ok(a.clone());
    }
    let local: SocketAddr = listener.local_addr()?;
    if local.ip().is_unspecified() {
        anyhow::bail!(
            "the collective listens on {local}, which peers cannot dial; pass the address they should use (--collective-advertise host:{})",
            local.port()
        );
    }
    Ok(local.to_string())
}

/// `qdistill worker`: serves the job at `opts.coordinator_url` until it is over or a
/// signal arrives. Blocks.
pub fn run_worker(opts: WorkerOptions) -> anyhow::Result<WorkerExit> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("qdistill-rpc")
        .enable_all()
        .build()
        .context("starting the RPC runtime")?;
    let listener = TcpListener::bind(&opts.collective_listen).with_context(|| format!("binding the collective listener on {}", opts.collective_listen))?;
    let advertise = advertise_addr(&listener, &opts)?;
    let client = rt.block_on(Client::connect(&opts.coordinator_url, &opts.token, &opts.connect))?;
    let rpc = Rpc { rt, client, connect: opts.connect.clone() };
    let term = if opts.handle_signals { session::install_signal_flag(&rpc.rt) } else { Default::default() };
    let name = opts.name.clone().unwrap_or_else(|| format!("{}:{}", hostname(), std::process::id()));
    let resources = match opts.device {
        Some(config::Device::Cuda(_)) => Resources { device_kind: DeviceKind::Cuda, nccl: opts.nccl && cfg!(feature = "cuda"), ..detect_resources() },
        _ => detect_resources(),
    };
    let mut previous: Option<String> = None;
    loop {
        if term.load(Ordering::SeqCst) {
            return Ok(WorkerExit::Terminated);
        }
        let session = match Session::register(&rpc, &name, &resources, &advertise, previous.take(), term.clone()) {
            Ok(s) => s,
            Err(session::RegisterError::JobOver(why)) => return Ok(WorkerExit::JobOver(why)),
            Err(session::RegisterError::Other(e)) => return Err(e),
        };
        tracing::info!(session = %session.id, %advertise, "registered with {}", opts.coordinator_url);
        let (assignment, config_toml) = match session.wait_for_work(&rpc)? {
            session::Next::Assigned(a, c) => (a, c),
            session::Next::Stop(why) => return Ok(WorkerExit::JobOver(why)),
            session::Next::Terminated => return Ok(WorkerExit::Terminated),
            session::Next::Reregister => continue,
        };
        session.shared.generation.store(assignment.generation, Ordering::SeqCst);
        let ctx = RoleCtx { rpc: &rpc, session: &session, listener: &listener, opts: &opts };
        let outcome = run_role(&ctx, &assignment, &config_toml);
        session.shared.clear_abort();
        let outcome = settle(outcome, session.shared.reregister.load(Ordering::SeqCst), session.shared.stop.load(Ordering::SeqCst));
        match outcome {
            Ok(RoleEnd::Finished) => match session.wait_for_end() {
                session::Next::Stop(why) => return Ok(WorkerExit::JobOver(why)),
                session::Next::Terminated => return Ok(WorkerExit::Terminated),
                _ => {
                    // The generation broke before the job was done (say, the final
                    // checkpoint never arrived): join the next one.
                    tracing::warn!("generation {} ended after this worker finished its part; registering again", assignment.generation);
                }
            },
            Ok(RoleEnd::Terminated) => return Ok(WorkerExit::Terminated),
            Err(RoleError::Stopped) => return Ok(WorkerExit::JobOver(session.shared.message())),
            Err(RoleError::Lost(why)) => {
                tracing::warn!(generation = assignment.generation, "generation lost: {why}; registering again");
                // Tell the coordinator this worker left, unless it already knows.
                if !session.shared.reregister.load(Ordering::SeqCst) {
                    previous = Some(session.id.clone());
                }
            }
            Err(RoleError::Fatal(e)) => {
                return Err(e.context(format!("{} rank {} of generation {}", role_name(assignment.role), assignment.rank, assignment.generation)))
            }
        }
    }
}

/// A role that failed after its generation ended (`reregister`) or the job ended (`stop`)
/// failed because the heartbeat aborted its collectives under it: an overlapped all-reduce
/// inside the backward, say, reports the aborted NCCL communicator as the backward's own
/// error. That is the generation's end, not the worker's: register again (or stop),
/// instead of exiting with the error.
fn settle(outcome: Result<RoleEnd, RoleError>, reregister: bool, stop: bool) -> Result<RoleEnd, RoleError> {
    match outcome {
        Err(RoleError::Fatal(_)) if stop => Err(RoleError::Stopped),
        Err(RoleError::Fatal(e)) if reregister => Err(RoleError::Lost(format!("{e:#}"))),
        other => other,
    }
}

fn role_name(r: Role) -> &'static str {
    match r {
        Role::Teacher => "teacher",
        Role::Student => "student",
    }
}

fn run_role(ctx: &RoleCtx, a: &Assignment, config_toml: &str) -> Result<RoleEnd, RoleError> {
    let mut cfg: TrainConfig = config::parse(config_toml, config::ConfigFormat::Toml, "job config from the coordinator", &[])
        .context("the coordinator sent a config this worker cannot read (are both the same qdistill release?)")?;
    if let Some(d) = ctx.opts.device {
        cfg.device = d;
    }
    tracing::info!(generation = a.generation, role = role_name(a.role), rank = a.rank, start_step = a.start_step, "running");
    crate::metrics::get().inspect(|m| m.set_role(role_name(a.role), a.role_rank, a.generation));
    match a.role {
        Role::Student => student::run(ctx, a, &cfg),
        Role::Teacher => teacher::run(ctx, a, &cfg),
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_else(|_| "worker".into())
}

/// Optimizer steps the job takes: what the single-process run computes from the same
/// config and data (max_steps, or epochs × batches ÷ accumulation).
pub fn total_steps(cfg: &TrainConfig) -> anyhow::Result<u64> {
    let path = config::resolve_model_path(&cfg.model.model_name_or_path, cfg.model.revision.as_deref(), None)?;
    let (_, _, tok) = crate::models::open(&path)?;
    let data = crate::data_plan::build(cfg, &tok)?;
    let t = &cfg.training;
    let n = data.total_steps(t.max_steps, t.num_train_epochs, t.gradient_accumulation_steps)?;
    if n == 0 {
        anyhow::bail!("the data gives no optimizer step (check train_file, max_samples and batch sizes)");
    }
    Ok(n as u64)
}

/// `qdistill coordinator CONFIG --listen ADDR …`: loads and checks the config and data,
/// then serves the job until it is over (or Ctrl-C / SIGTERM). Blocks.
pub fn serve_coordinator(
    config_path: &std::path::Path,
    overrides: &[String],
    addr: &str,
    opts: qdistill_coordinator::ServeOptions,
) -> anyhow::Result<qdistill_coordinator::Outcome> {
    let cfg = config::load(config_path, overrides)?;
    crate::run::check_cluster_config(&cfg)?;
    let steps = total_steps(&cfg)?;
    Ok(qdistill_coordinator::serve(&cfg, steps, addr, opts)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fatal() -> Result<RoleEnd, RoleError> {
        Err(RoleError::Fatal(anyhow::anyhow!("collective: the NCCL communicator was aborted (the generation ended)")))
    }

    #[test]
    fn a_role_error_after_the_generation_ended_means_register_again() {
        assert!(matches!(settle(fatal(), true, false), Err(RoleError::Lost(m)) if m.contains("aborted")));
        assert!(matches!(settle(fatal(), false, true), Err(RoleError::Stopped)));
        // With the generation still on, an error is the worker's own and ends it.
        assert!(matches!(settle(fatal(), false, false), Err(RoleError::Fatal(_))));
        // Other outcomes pass through whatever the flags say.
        assert!(matches!(settle(Ok(RoleEnd::Finished), true, true), Ok(RoleEnd::Finished)));
        assert!(matches!(settle(Err(RoleError::Lost("peer".into())), false, true), Err(RoleError::Lost(_))));
    }
}
