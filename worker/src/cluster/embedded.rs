//! Embedded mode (`qdistill train CONFIG --workers N`): the coordinator and N workers in
//! one process, over the very code a cluster run uses. The coordinator's gRPC service
//! listens on 127.0.0.1 (or `--listen`) with its own token; each worker is [`run_worker`]
//! on a thread of its own with its own device, talking to its peers over the TCP
//! collective, or NCCL when every worker has a GPU of its own. So the embedded run
//! writes what `qdistill coordinator` writes (checkpoints, `final_model/`, the ledger,
//! the job record) and computes the same numbers.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use qdistill_common::config;
use qdistill_coordinator::client::ConnectOptions;
use qdistill_coordinator::state::Phase;
use qdistill_coordinator::{CoordinatorHandle, Outcome, ServeOptions};

use super::{device_of, run_worker, WorkerExit, WorkerOptions};

/// File in output_dir that keeps the job token of an embedded run, so that the same
/// command continues a job it stopped (the coordinator only continues a job for the token
/// it was started with).
pub const TOKEN_FILE: &str = ".qdistill_token";
/// How long workers may take to leave once the coordinator stopped: one heartbeat tells
/// them, and a step in flight finishes first.
const LEAVE_GRACE: Duration = Duration::from_secs(30);
const HEARTBEAT: Duration = Duration::from_secs(1);

/// How `qdistill train --workers N` runs the job.
#[derive(Debug, Clone)]
pub struct EmbeddedOptions {
    /// Workers in the process: teacher ranks first, then students (at least 2 with a
    /// separate teacher model, 1 otherwise).
    pub workers: usize,
    /// One device per worker; None: every worker on the config's `device`.
    pub devices: Option<Vec<config::Device>>,
    /// Teacher ranks when the config has a separate teacher model.
    pub teacher_ranks: usize,
    /// Virtual data shards per step (default: the number of students). With as many shards
    /// as gradient_accumulation_steps the gradient is summed in the single-process order.
    pub shards: Option<usize>,
    /// Serve the coordinator on this address too (`host:port`), for `qdistill status`;
    /// None: 127.0.0.1 on a free port, for the workers only.
    pub listen: Option<String>,
    /// The job's token; None: the one in `<output_dir>/.qdistill_token`, made on first use.
    pub token: Option<String>,
    /// Serve the job's Prometheus metrics at http://ADDR/metrics.
    pub metrics_addr: Option<String>,
    /// Show a progress bar for the job.
    pub progress: bool,
    /// After Ctrl-C / SIGTERM, how long the workers have to checkpoint and leave.
    pub drain_timeout: Duration,
}

impl EmbeddedOptions {
    pub fn new(workers: usize) -> Self {
        Self {
            workers,
            devices: None,
            teacher_ranks: 1,
            shards: None,
            listen: None,
            token: None,
            metrics_addr: None,
            progress: false,
            drain_timeout: Duration::from_secs(60),
        }
    }
}

/// How an embedded run ended without an error.
#[derive(Debug, Clone)]
pub struct EmbeddedRun {
    /// The coordinator's account of the job.
    pub outcome: Outcome,
    /// Ctrl-C / SIGTERM stopped it before the end; the same command continues it.
    pub terminated: bool,
    /// The URL the coordinator served on.
    pub url: String,
}

/// Parses `--devices`: one device per worker, comma-separated (`cpu,cpu,cpu`,
/// `cuda:0,cuda:1`). Every worker of one job uses the same kind of device.
pub fn parse_devices(list: &str, workers: usize) -> anyhow::Result<Vec<config::Device>> {
    let devices = list
        .split(',')
        .enumerate()
        .map(|(i, d)| config::Device::parse(d.trim()).with_context(|| format!("--devices entry {} of {list:?}", i + 1)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    if devices.len() != workers {
        bail!(
            "--devices {list:?} names {} device(s) for {workers} worker(s): give one per worker (e.g. {}), or leave it out to put every worker on the config's device",
            devices.len(),
            vec!["cpu"; workers].join(",")
        );
    }
    same_kind(&devices).with_context(|| format!("--devices {list:?}"))?;
    Ok(devices)
}

/// The coordinator refuses to form a generation of mixed device kinds; this says so before
/// the workers start rather than leaving them waiting for one.
fn same_kind(devices: &[config::Device]) -> anyhow::Result<()> {
    let cuda = devices.iter().filter(|d| matches!(d, config::Device::Cuda(_))).count();
    if cuda != 0 && cuda != devices.len() {
        bail!("mixes cpu and cuda: every worker of one job must use the same kind of device");
    }
    Ok(())
}

/// The job token: `given`, else the one an earlier embedded run kept in `output_dir`, else
/// a fresh one, kept there (readable by the owner only).
fn job_token(given: Option<String>, output_dir: &Path) -> anyhow::Result<String> {
    if let Some(t) = given {
        if t.trim().is_empty() {
            bail!("the job token (--token / QDISTILL_TOKEN) is empty");
        }
        return Ok(t);
    }
    let path = output_dir.join(TOKEN_FILE);
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_string()),
        Ok(_) => bail!("{} is empty; delete it (a new token is made) or pass --token", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading the job token {}", path.display())),
    }
    std::fs::create_dir_all(output_dir).with_context(|| format!("creating {}", output_dir.display()))?;
    let token = qdistill_coordinator::generate_token();
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(&path).with_context(|| format!("creating the job token {}", path.display()))?;
    std::io::Write::write_all(&mut f, token.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
    Ok(token)
}

/// The address workers in this process dial for a coordinator bound to `bound`.
fn local_url(bound: std::net::SocketAddr) -> String {
    let ip = if bound.ip().is_unspecified() {
        match bound {
            std::net::SocketAddr::V4(_) => std::net::IpAddr::from([127, 0, 0, 1]),
            std::net::SocketAddr::V6(_) => std::net::IpAddr::from(std::net::Ipv6Addr::LOCALHOST),
        }
    } else {
        bound.ip()
    };
    format!("http://{}", std::net::SocketAddr::new(ip, bound.port()))
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| p.downcast_ref::<String>().cloned()).unwrap_or_else(|| "a panic".into())
}

struct WorkerThread {
    name: String,
    device: config::Device,
}

/// `qdistill train CONFIG --workers N`: checks the config as `qdistill coordinator` does,
/// serves the job and runs its N workers in this process until the job is over, a worker
/// fails (the job ends with its error), or Ctrl-C / SIGTERM (student rank 0 checkpoints
/// the step in progress, then the workers stop; the same command continues the job).
/// Blocks.
pub fn run_embedded(config_path: &Path, overrides: &[String], opts: EmbeddedOptions) -> anyhow::Result<EmbeddedRun> {
    let cfg = config::load(config_path, overrides)?;
    let devices = match &opts.devices {
        Some(d) if d.len() != opts.workers => bail!("{} device(s) given for {} worker(s): give one per worker", d.len(), opts.workers),
        Some(d) => d.clone(),
        None => vec![cfg.device; opts.workers],
    };
    same_kind(&devices).context("the workers' devices")?;
    if opts.workers < 2 {
        bail!("--workers {}: an embedded cluster run needs at least 2 workers (without --workers, `qdistill train` runs the job directly)", opts.workers);
    }
    crate::run::check_cluster_config(&cfg)?;
    // A device this build or machine cannot open fails here, before any worker starts.
    let mut distinct: Vec<config::Device> = Vec::new();
    for &d in &devices {
        if !distinct.contains(&d) {
            device_of(d).with_context(|| format!("--devices: {d}"))?;
            distinct.push(d);
        }
    }
    let steps = super::total_steps(&cfg)?;
    let mut serve = ServeOptions {
        workers: opts.workers,
        teacher_ranks: opts.teacher_ranks,
        shards: opts.shards,
        heartbeat_interval: HEARTBEAT,
        metrics_addr: opts.metrics_addr.clone(),
        drain_timeout: opts.drain_timeout,
        ..ServeOptions::default()
    };
    // The coordinator's own checks (worker count against the teacher mode, …) before any
    // thread starts.
    qdistill_coordinator::job_spec(&cfg, steps, &serve)?;
    let token = job_token(opts.token.clone(), &cfg.output_dir)?;
    serve.token = token.clone();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("qdistill-coordinator")
        .enable_all()
        .build()
        .context("starting the coordinator runtime")?;
    let listen = opts.listen.clone().unwrap_or_else(|| "127.0.0.1:0".into());
    let running = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(&listen).await.with_context(|| format!("binding the coordinator on {listen}"))?;
        anyhow::Ok(qdistill_coordinator::start(&cfg, steps, listener, serve).await?)
    })?;
    let url = local_url(running.local_addr());
    if opts.listen.is_some() {
        tracing::info!(
            "coordinator of this run at {url}, job token {token}: `qdistill status --coordinator {url} --token {token}` shows the job"
        );
    }
    // NCCL keeps one rank per GPU: workers sharing a GPU talk over TCP, as they would
    // have to in separate processes.
    let distinct = distinct.len() == devices.len();
    let nccl = distinct && devices.iter().all(|d| matches!(d, config::Device::Cuda(_)));
    if !distinct && devices.iter().any(|d| matches!(d, config::Device::Cuda(_))) {
        tracing::info!("workers share a GPU: teacher outputs and gradients go over the TCP collective, not NCCL");
    }

    let handle = running.handle();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<(usize, anyhow::Result<WorkerExit>)>();
    let mut threads = Vec::with_capacity(opts.workers);
    for (i, &device) in devices.iter().enumerate() {
        let name = format!("worker-{i}");
        let mut w = WorkerOptions::new(url.clone(), token.clone());
        w.name = Some(name.clone());
        w.device = Some(device);
        w.nccl = nccl;
        // A signal reaches every thread of the process: the coordinator's drain stops the
        // job in order instead (see `supervise`).
        w.handle_signals = false;
        // The coordinator lives in this process and never restarts: a call it does not
        // answer will not be answered.
        w.connect = ConnectOptions { retry_for: Duration::ZERO, ..ConnectOptions::default() };
        let tx = tx.clone();
        let spawned = std::thread::Builder::new()
            .name(name.clone())
            // What a main thread gets: a worker runs there in `qdistill worker`.
            .stack_size(8 << 20)
            .spawn(move || {
                // Names the worker on every line it logs from this thread.
                let _span = tracing::info_span!("worker", name = %w.name.as_deref().unwrap_or_default()).entered();
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_worker(w)))
                    .unwrap_or_else(|p| Err(anyhow::anyhow!("panicked: {}", panic_message(p.as_ref()))));
                let _ = tx.send((i, r));
            })
            .with_context(|| format!("starting the thread of {name}"));
        if let Err(e) = spawned {
            // The workers already started are told the job is over.
            handle.fail(format!("{e:#}"));
            return Err(e);
        }
        threads.push(WorkerThread { name, device });
    }
    drop(tx);

    let bar = if opts.progress { ProgressBar::new(steps) } else { ProgressBar::hidden() };
    bar.set_style(
        ProgressStyle::with_template("{spinner} [{elapsed_precise}<{eta_precise}] {bar:30} {pos}/{len} steps · {msg}").expect("static template"),
    );
    let ended = rt.block_on(supervise(running, handle, rx, &threads, &bar, opts.drain_timeout));
    bar.finish_and_clear();
    let Ended { outcome, error, terminated, unfinished } = ended?;
    if !unfinished.is_empty() {
        tracing::warn!("{} did not stop after the job ended; leaving it behind", unfinished.join(", "));
    }
    if let Some(e) = error {
        return Err(e);
    }
    match &outcome.phase {
        Phase::Done => Ok(EmbeddedRun { outcome, terminated: false, url }),
        _ if terminated => Ok(EmbeddedRun { outcome, terminated: true, url }),
        Phase::Failed(why) => bail!("the job failed: {why}"),
        other => bail!("the job stopped at step {} of {} ({other:?})", outcome.committed_steps, steps),
    }
}

struct Ended {
    outcome: Outcome,
    /// The first worker error, naming the worker.
    error: Option<anyhow::Error>,
    terminated: bool,
    /// Workers still running when this gave up waiting for them.
    unfinished: Vec<String>,
}

/// Waits for the coordinator and the worker threads, whichever way the job ends; draws
/// the progress bar meanwhile.
async fn supervise(
    running: qdistill_coordinator::RunningCoordinator,
    handle: CoordinatorHandle,
    mut results: tokio::sync::mpsc::UnboundedReceiver<(usize, anyhow::Result<WorkerExit>)>,
    threads: &[WorkerThread],
    bar: &ProgressBar,
    drain_timeout: Duration,
) -> anyhow::Result<Ended> {
    let wait = running.wait();
    tokio::pin!(wait);
    let signal = qdistill_coordinator::shutdown_signal();
    tokio::pin!(signal);
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut running_workers: BTreeSet<usize> = (0..threads.len()).collect();
    let mut outcome: Option<Outcome> = None;
    let mut error: Option<anyhow::Error> = None;
    let mut terminated = false;
    let mut signalled = false;
    // When to stop waiting: for the coordinator (then stop it), or for the workers.
    let mut deadline: Option<tokio::time::Instant> = None;
    loop {
        if running_workers.is_empty() && outcome.is_some() {
            break;
        }
        tokio::select! {
            Some((i, r)) = results.recv() => {
                running_workers.remove(&i);
                let w = &threads[i];
                match r {
                    Ok(WorkerExit::Terminated) => terminated = true,
                    Ok(WorkerExit::JobOver(why)) => tracing::debug!(worker = %w.name, "left: {why}"),
                    Err(e) => {
                        let e = e.context(format!("{} ({})", w.name, w.device));
                        handle.fail(format!("{e:#}"));
                        error.get_or_insert(e);
                    }
                }
                // Nobody is left to train: stop the coordinator rather than wait out leases.
                if running_workers.is_empty() {
                    handle.shutdown();
                }
            }
            r = &mut wait, if outcome.is_none() => {
                outcome = Some(r?);
                if !running_workers.is_empty() {
                    deadline = Some(tokio::time::Instant::now() + LEAVE_GRACE);
                }
            }
            _ = &mut signal, if !signalled => {
                signalled = true;
                // As `qdistill coordinator` drains: student rank 0 checkpoints the step in
                // progress; then every worker is told the job is over. Workers that each
                // left on the signal would not: a teacher gone first leaves its students'
                // step unfinished.
                bar.suspend(|| tracing::warn!("signal received; asking for a checkpoint of the step in progress (at most {drain_timeout:?}), then stopping"));
                let drain = handle.drain(drain_timeout);
                let h = handle.clone();
                tokio::spawn(async move {
                    let why = match drain.await {
                        Some(step) => format!("stopped by a signal after checkpoint-{step}; the same command continues the job"),
                        None => "stopped by a signal before a new checkpoint; the same command continues the job from the last one".to_string(),
                    };
                    h.fail(why);
                });
                deadline = Some(tokio::time::Instant::now() + drain_timeout + LEAVE_GRACE);
            }
            _ = tick.tick() => {
                let s = handle.snapshot();
                bar.set_position(s.committed_steps);
                let mut msg = match s.loss {
                    Some(l) => format!("loss {l:.3}"),
                    None => format!("generation {} forming", s.generation),
                };
                if let Some(t) = s.tokens_per_second {
                    msg.push_str(&format!(" · {t:.0} tok/s"));
                }
                bar.set_message(msg);
                if deadline.is_some_and(|d| tokio::time::Instant::now() >= d) {
                    if outcome.is_none() {
                        handle.shutdown();
                        deadline = Some(tokio::time::Instant::now() + LEAVE_GRACE);
                    } else {
                        break;
                    }
                }
            }
        }
    }
    let unfinished = running_workers.iter().map(|&i| threads[i].name.clone()).collect();
    let Some(outcome) = outcome else { bail!("the coordinator of this run did not stop") };
    Ok(Ended { outcome, error, terminated: terminated || signalled, unfinished })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The first run makes a token and keeps it (owner-only); the next run of the same
    /// output_dir reads that one back; a given token wins; an emptied file is named.
    #[test]
    fn the_job_token_is_kept_in_output_dir_for_the_next_run() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let first = job_token(None, &out).unwrap();
        let path = out.join(TOKEN_FILE);
        assert_eq!(std::fs::read_to_string(&path).unwrap(), first);
        assert_eq!(first.len(), 32, "{first}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        assert_eq!(job_token(None, &out).unwrap(), first);
        assert_eq!(job_token(Some("given".into()), &out).unwrap(), "given");
        assert!(job_token(Some(" ".into()), &out).unwrap_err().to_string().contains("empty"));
        std::fs::write(&path, "\n").unwrap();
        let e = job_token(None, &out).unwrap_err().to_string();
        assert!(e.contains(&path.display().to_string()) && e.contains("is empty"), "{e}");
    }

    #[test]
    fn workers_dial_loopback_for_an_unspecified_listen_address() {
        assert_eq!(local_url("0.0.0.0:50051".parse().unwrap()), "http://127.0.0.1:50051");
        assert_eq!(local_url("[::]:7".parse().unwrap()), "http://[::1]:7");
        assert_eq!(local_url("10.1.2.3:9".parse().unwrap()), "http://10.1.2.3:9");
    }
}
