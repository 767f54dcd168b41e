//! End-to-end cluster runs on 127.0.0.1: a coordinator in this process and worker
//! processes (this test binary re-run as `cluster_worker_process`), training the tiny
//! Llama fixture with a teacher rank and two students.
//!
//! The reference for "same result" is written here, independently of the cluster code:
//! a plain loop over the trainer's `Student` that sums each step's gradient as two
//! partial sums (microbatches 0–1 and 2–3, the two virtual shards) added in order,
//! which is the order the cluster's all-reduce adds them in. Against it the cluster's
//! final adapter must match bit for bit — also after a student is killed and the job goes
//! on with one student holding both shards. Against the single-process `train` (one
//! running sum over all four microbatches) it matches to float rounding only.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use qdistill_common::config::{self, LrSchedulerType, TrainConfig};
use qdistill_common::optim::{lr_at, SchedulerType};
use qdistill_coordinator::client::{Client, ConnectOptions};
use qdistill_coordinator::service::ServerTls;
use qdistill_coordinator::{RunningCoordinator, ServeOptions};
use qdistill_proto::v1 as pb;
use qdistill_worker::cluster::{run_worker, WorkerOptions};
use qdistill_worker::run::{live_topk_spec, prepare, teacher_batch, Prepared};
use qdistill_worker::trainer::{dropout_seed, DeviceBatch};

mod common;
use common::{assert_bit_identical, check_ledger, read_adapter, write_cluster_job as write_job, G};

const TOKEN: &str = "cluster-test-token";
const SHARDS: usize = 2;

/// The multi-process tests share 2 CPU cores: run them one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn load_config(path: &Path, overrides: &[String], out: &Path) -> TrainConfig {
    let mut o = overrides.to_vec();
    o.push(format!("output_dir={}", out.display()));
    config::load(path, &o).unwrap()
}

fn scheduler(k: LrSchedulerType) -> SchedulerType {
    match k {
        LrSchedulerType::Linear => SchedulerType::Linear,
        LrSchedulerType::Cosine => SchedulerType::Cosine,
        LrSchedulerType::Constant => SchedulerType::Constant,
        LrSchedulerType::ConstantWithWarmup => SchedulerType::ConstantWithWarmup,
    }
}

type Adapter = HashMap<String, Vec<f32>>;

/// The reference: the trainer's `Student` in one process, each step's gradient summed as
/// `SHARDS` partial sums of contiguous microbatches, added in order. Also returns the
/// training-set sample ids of every step, in microbatch order.
fn virtual_shard_reference(cfg: &TrainConfig, total: u64) -> (Adapter, Vec<Vec<u64>>) {
    let Prepared { mut student, teacher, data, device } = prepare(cfg).unwrap();
    let t = &cfg.training;
    let warmup = t.num_warmup_steps(total as usize) as u64;
    let mut stream = data.train_stream().unwrap();
    let mut samples = Vec::new();
    // The teacher's outputs as `qdistill train` takes them: hidden states, or top-K rows.
    let topk = live_topk_spec(cfg, &teacher, &student);
    for step in 0..total {
        let batches: Vec<_> = (0..G).map(|_| stream.next_batch()).collect();
        samples.push(batches.iter().flat_map(|b| b.sample_ids.clone()).collect());
        let n_target: usize = batches.iter().map(|b| b.n_target_tokens).sum();
        let mut partials: Vec<Vec<f32>> = Vec::new();
        for v in 0..SHARDS {
            for (k, b) in batches.iter().enumerate().take((v + 1) * G / SHARDS).skip(v * G / SHARDS) {
                let db = DeviceBatch::new(b, &device).unwrap();
                let t = teacher_batch(&teacher, &student, &db, topk.as_ref(), None).unwrap();
                student.micro_step_with(&db, &teacher, &t, 1.0 / n_target as f64, dropout_seed(cfg.seed, step, k as u64)).unwrap();
            }
            partials.push(std::mem::replace(&mut student.grads.flat, vec![0.0; student.params.len()]));
        }
        for (i, g) in student.grads.flat.iter_mut().enumerate() {
            *g = partials[0][i];
            for p in &partials[1..] {
                *g += p[i];
            }
        }
        let lr = lr_at(scheduler(t.lr_scheduler_type), t.learning_rate, step, warmup, total);
        student.optimizer_step(lr, t.max_grad_norm).unwrap();
    }
    let adapter = student.params.peft_tensors().unwrap().into_iter().map(|(n, t)| (n, t.flatten_all().unwrap().to_vec1::<f32>().unwrap())).collect();
    (adapter, samples)
}

struct Job {
    _dir: tempfile::TempDir,
    config: PathBuf,
    overrides: Vec<String>,
    total: u64,
    reference: Adapter,
    samples: Vec<Vec<u64>>,
}

impl Job {
    fn new(overrides: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = write_job(dir.path());
        let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
        let cfg = load_config(&config, &overrides, &dir.path().join("unused"));
        let total = qdistill_worker::cluster::total_steps(&cfg).unwrap();
        assert_eq!(total, 10);
        let (reference, samples) = virtual_shard_reference(&cfg, total);
        Job { _dir: dir, config, overrides, total, reference, samples }
    }
    fn config(&self, out: &Path) -> TrainConfig {
        load_config(&self.config, &self.overrides, out)
    }
}

/// The job with a separate teacher model and its reference, shared by the tests.
fn job() -> &'static Job {
    static JOB: OnceLock<Job> = OnceLock::new();
    JOB.get_or_init(|| Job::new(&[]))
}

/// The same job in LwF mode: the teacher is the students' own base, no teacher rank.
fn lwf_job() -> &'static Job {
    static JOB: OnceLock<Job> = OnceLock::new();
    JOB.get_or_init(|| Job::new(&["teacher.mode=lwf", "teacher.model_name_or_path=null"]))
}

/// Entry point of the worker processes the tests spawn; does nothing when run directly.
#[test]
#[ignore = "entry point of the worker processes spawned by the cluster tests"]
fn cluster_worker_process() {
    let Ok(url) = std::env::var("QDISTILL_TEST_COORDINATOR") else { return };
    tracing_subscriber::fmt().with_env_filter("info").with_writer(std::io::stderr).with_target(false).init();
    let mut opts = WorkerOptions::new(url, std::env::var("QDISTILL_TEST_TOKEN").unwrap());
    opts.name = std::env::var("QDISTILL_TEST_WORKER_NAME").ok();
    opts.connect = ConnectOptions {
        attempts: 3,
        initial_backoff: Duration::from_millis(50),
        tls_ca: std::env::var_os("QDISTILL_TEST_TLS_CA").map(PathBuf::from),
        ..ConnectOptions::default()
    };
    opts.collective_timeout = Duration::from_secs(30);
    match run_worker(opts) {
        Ok(exit) => eprintln!("worker exit: {exit:?}"),
        Err(e) => {
            eprintln!("worker error: {e:#}");
            std::process::exit(3);
        }
    }
}

struct Worker {
    name: String,
    child: Child,
    log: PathBuf,
}

fn spawn_worker(url: &str, token: &str, name: &str, logs: &Path) -> Worker {
    spawn_worker_with_ca(url, token, name, logs, None)
}

fn spawn_worker_with_ca(url: &str, token: &str, name: &str, logs: &Path, tls_ca: Option<&Path>) -> Worker {
    let log = logs.join(format!("{name}.log"));
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    if let Some(ca) = tls_ca {
        cmd.env("QDISTILL_TEST_TLS_CA", ca);
    }
    let child = cmd
        .args(["cluster_worker_process", "--exact", "--ignored", "--nocapture", "--test-threads=1"])
        .env("QDISTILL_TEST_COORDINATOR", url)
        .env("QDISTILL_TEST_TOKEN", token)
        .env("QDISTILL_TEST_WORKER_NAME", name)
        // One compute thread per worker: three workers share two cores.
        .env("RAYON_NUM_THREADS", "1")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    Worker { name: name.into(), child, log }
}

fn logs_of(workers: &[Worker]) -> String {
    workers.iter().map(|w| format!("--- {} ---\n{}", w.name, std::fs::read_to_string(&w.log).unwrap_or_default())).collect()
}

/// A coordinator for the job on a free port, in its own runtime.
struct Coord {
    rt: tokio::runtime::Runtime,
    running: Option<RunningCoordinator>,
    url: String,
    client: Client,
}

/// Long enough that a loaded CI machine's stall (a slow fsync under the job lock) expires
/// nobody; the hung-student test, which waits for a lease to run out, sets a short one.
const LEASE: Duration = Duration::from_secs(10);

fn start_coordinator(cfg: &TrainConfig, total: u64, workers: usize) -> Coord {
    start_coordinator_with(cfg, total, workers, None, LEASE)
}

fn start_coordinator_with(cfg: &TrainConfig, total: u64, workers: usize, tls: Option<&Pki>, lease: Duration) -> Coord {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let opts = ServeOptions {
        tls: tls.map(|p| ServerTls { cert: p.cert.clone(), key: p.key.clone() }),
        token: TOKEN.into(),
        workers,
        shards: Some(SHARDS),
        lease,
        heartbeat_interval: Duration::from_millis(200),
        reform_grace: Some(Duration::from_secs(2)),
        max_generations: 5,
        ..ServeOptions::default()
    };
    let running = rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        qdistill_coordinator::start(cfg, total, listener, opts).await.unwrap()
    });
    let url = running.url();
    let connect = ConnectOptions { tls_ca: tls.map(|p| p.ca.clone()), ..ConnectOptions::default() };
    let client = rt.block_on(Client::connect(&url, TOKEN, &connect)).unwrap();
    Coord { rt, running: Some(running), url, client }
}

impl Coord {
    fn status(&self) -> pb::JobStatusResponse {
        let mut c = self.client.clone();
        self.rt.block_on(c.job_status()).unwrap()
    }
    fn wait(&mut self, workers: &mut [Worker], timeout: Duration) -> qdistill_coordinator::Outcome {
        let running = self.running.take().unwrap();
        let r = self.rt.block_on(async { tokio::time::timeout(timeout, running.wait()).await });
        match r {
            Ok(Ok(o)) => o,
            other => {
                for w in workers.iter_mut() {
                    let _ = w.child.kill();
                }
                panic!("the job did not finish: {other:?}\n{}", logs_of(workers));
            }
        }
    }
}

fn wait_until(what: &str, timeout: Duration, workers: &mut [Worker], mut done: impl FnMut() -> bool) {
    let t0 = Instant::now();
    while !done() {
        if t0.elapsed() > timeout {
            for w in workers.iter_mut() {
                let _ = w.child.kill();
            }
            panic!("timed out waiting for {what}\n{}", logs_of(workers));
        }
        // Steps take tens of milliseconds: poll fast enough to act between them.
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn join_workers(workers: &mut [Worker], skip: &[&str]) {
    for w in workers.iter_mut().filter(|w| !skip.contains(&w.name.as_str())) {
        let status = w.child.wait().unwrap();
        assert!(status.success(), "worker {} exited with {status}\n{}", w.name, std::fs::read_to_string(&w.log).unwrap_or_default());
        let log = std::fs::read_to_string(&w.log).unwrap();
        assert!(log.contains("worker exit: JobOver"), "worker {} did not see the job end:\n{log}", w.name);
    }
}


#[test]
fn one_teacher_and_two_students_match_the_reference_bit_for_bit() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let job = job();
    let run = tempfile::tempdir().unwrap();
    let out = run.path().join("out");
    let cfg = job.config(&out);
    let mut coord = start_coordinator(&cfg, job.total, 3);
    let mut workers: Vec<Worker> = (0..3).map(|i| spawn_worker(&coord.url, TOKEN, &format!("w{i}"), run.path())).collect();
    let outcome = coord.wait(&mut workers, Duration::from_secs(300));
    join_workers(&mut workers, &[]);
    assert_eq!((outcome.committed_steps, outcome.generation), (job.total, 1), "{outcome:?}\n{}", logs_of(&workers));

    let got = read_adapter(&out.join("final_model/adapter_model.safetensors"));
    assert_bit_identical(&got, &job.reference, "cluster vs two-shard reference");
    // The intermediate checkpoints (save_steps = 2) are in PEFT/HF layout.
    for step in [2, 4, 6, 8, 10] {
        let d = out.join(format!("checkpoint-{step}"));
        let state: serde_json::Value = serde_json::from_slice(&std::fs::read(d.join("trainer_state.json")).unwrap()).unwrap();
        assert_eq!(state["global_step"], step);
        assert!(d.join("adapter_config.json").exists() && d.join("optimizer.safetensors").exists());
    }
    let ledger = check_ledger(&out, &job.samples);
    assert!(ledger.rolled_back.is_empty());
    assert!(ledger.steps.iter().all(|s| s.generation == 1 && s.ranks.len() == 2));
    // A cluster checkpoint is one the single-process run resumes from.
    let resumed = run.path().join("resumed");
    let mut overrides = job.overrides.clone();
    overrides.push(format!("output_dir={}", resumed.display()));
    overrides.push(format!("training.resume_from_checkpoint={}", out.join("checkpoint-4").display()));
    let summary = qdistill_worker::run::train(&job.config, &overrides, false).unwrap();
    assert_eq!(summary.steps as u64, job.total - 4);

    // The single-process run sums the four microbatches as one running sum, so it agrees
    // only to float rounding (different summation order of the same f32 gradients, carried
    // through ten AdamW steps): measured ~4e-7 of the adapter's scale; 1e-5 allowed.
    let single = run.path().join("single");
    let mut overrides = job.overrides.clone();
    overrides.push(format!("output_dir={}", single.display()));
    let summary = qdistill_worker::run::train(&job.config, &overrides, false).unwrap();
    assert_eq!(summary.steps as u64, job.total);
    let one = read_adapter(&single.join("final_model/adapter_model.safetensors"));
    for (name, w) in &one {
        let g = &got[name];
        let scale = w.iter().fold(0.0f32, |m, x| m.max(x.abs())).max(1e-6);
        let max = g.iter().zip(w).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(max / scale < 1e-5, "{name}: max |Δ| {max:e} against max |w| {scale:e}");
    }
}

/// `teacher.output = "topk:K"`: the teacher rank sends each supervised token's top-K rows
/// instead of hidden states; the students train exactly what the single-process top-K run
/// trains.
#[test]
fn a_top_k_teacher_rank_matches_the_reference_bit_for_bit() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let job = Job::new(&["teacher.output=topk:8", "teacher.topk_dtype=float32"]);
    let hidden = self::job();
    let differs = job.reference.iter().zip(&hidden.reference).any(|((_, w), (_, h))| w != h);
    assert!(differs, "top-K and full-distribution references agree: the comparison would not tell them apart");
    let run = tempfile::tempdir().unwrap();
    let out = run.path().join("out");
    let mut coord = start_coordinator(&job.config(&out), job.total, 3);
    let mut workers: Vec<Worker> = (0..3).map(|i| spawn_worker(&coord.url, TOKEN, &format!("w{i}"), run.path())).collect();
    let outcome = coord.wait(&mut workers, Duration::from_secs(300));
    join_workers(&mut workers, &[]);
    assert_eq!((outcome.committed_steps, outcome.generation), (job.total, 1), "{outcome:?}\n{}", logs_of(&workers));
    let got = read_adapter(&out.join("final_model/adapter_model.safetensors"));
    assert_bit_identical(&got, &job.reference, "top-K cluster vs two-shard top-K reference");
    check_ledger(&out, &job.samples);
}

#[cfg(unix)]
fn signal(child: &Child, sig: i32) {
    // SAFETY: kill(2) on a child we spawned and have not reaped.
    let r = unsafe { libc::kill(child.id() as i32, sig) };
    assert_eq!(r, 0, "kill({}, {sig})", child.id());
}

/// Waits until `k` steps are committed, then freezes every worker (SIGSTOP) so the test
/// acts at a known step however fast the job runs. Returns the status at the freeze.
#[cfg(unix)]
fn freeze_at(coord: &Coord, workers: &mut [Worker], k: u64) -> pb::JobStatusResponse {
    wait_until(&format!("step {k}"), Duration::from_secs(240), workers, || coord.status().committed_steps >= k);
    for w in workers.iter() {
        signal(&w.child, libc::SIGSTOP);
    }
    let st = coord.status();
    assert!(st.committed_steps < st.total_steps, "the job finished before the test could act: {st:?}");
    st
}

#[cfg(unix)]
fn resume(workers: &[Worker], except: &str) {
    for w in workers.iter().filter(|w| w.name != except) {
        signal(&w.child, libc::SIGCONT);
    }
}

/// Which worker process holds student rank `rank` in the current generation.
fn student_named(st: &pb::JobStatusResponse, student_rank: u32) -> String {
    let teachers = st.workers.iter().filter(|w| w.role == pb::Role::Teacher as i32).count() as u32;
    st.workers.iter().find(|w| w.role == pb::Role::Student as i32 && w.rank == teachers + student_rank).map(|w| w.worker_name.clone()).unwrap()
}

/// Kills student rank 1 (SIGKILL) at a random step. The survivors notice, the
/// coordinator starts generation 2 with one teacher and one student, which resumes from
/// the last checkpoint and trains both shards: the final adapter is the reference's, bit
/// for bit, and the ledger still holds every sample exactly once.
#[cfg(unix)]
#[test]
fn a_student_killed_mid_run_is_replaced_by_a_new_generation_with_the_same_result() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let job = job();
    let run = tempfile::tempdir().unwrap();
    let out = run.path().join("out");
    let cfg = job.config(&out);
    let mut coord = start_coordinator(&cfg, job.total, 3);
    let mut workers: Vec<Worker> = (0..3).map(|i| spawn_worker(&coord.url, TOKEN, &format!("w{i}"), run.path())).collect();
    // Leave a few steps after the kill: the freeze lands a step or so after `kill_at`.
    let kill_at = 1 + rand::random::<u64>() % (job.total - 4);
    eprintln!("killing student rank 1 once {kill_at} step(s) are committed");
    let st = freeze_at(&coord, &mut workers, kill_at);
    let victim = student_named(&st, 1);
    let w = workers.iter_mut().find(|w| w.name == victim).unwrap();
    signal(&w.child, libc::SIGKILL);
    let _ = w.child.wait();
    resume(&workers, &victim);
    let outcome = coord.wait(&mut workers, Duration::from_secs(300));
    join_workers(&mut workers, &[&victim]);
    assert_eq!(outcome.committed_steps, job.total);
    assert!(outcome.generation >= 2, "no new generation after the kill");
    // A survivor's collective breaks at once and it reports leaving; if none notices first,
    // the victim's lease runs out. Either way the victim's generation ended.
    let ended = &outcome.ended_generations;
    assert!(ended[0].contains("left generation 1") || ended[0].contains(&format!("worker {victim}")), "{ended:?}");

    let got = read_adapter(&out.join("final_model/adapter_model.safetensors"));
    assert_bit_identical(&got, &job.reference, "after a kill, one student holding both shards");
    let ledger = check_ledger(&out, &job.samples);
    assert!(ledger.steps.iter().any(|s| s.generation >= 2 && s.ranks.len() == 1), "generation 2 ran with one student");
}

/// A student that hangs (SIGSTOP) keeps its sockets open, so nobody sees an error: only
/// its lease runs out. The coordinator ends the generation, tells the others through
/// their heartbeats, they abort their blocked collective calls and carry on without it.
#[cfg(unix)]
#[test]
fn a_hung_student_is_found_by_its_lease() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let job = job();
    let run = tempfile::tempdir().unwrap();
    let out = run.path().join("out");
    let cfg = job.config(&out);
    let mut coord = start_coordinator_with(&cfg, job.total, 3, None, Duration::from_secs(4));
    let mut workers: Vec<Worker> = (0..3).map(|i| spawn_worker(&coord.url, TOKEN, &format!("w{i}"), run.path())).collect();
    let st = freeze_at(&coord, &mut workers, 2);
    let victim = student_named(&st, 0);
    resume(&workers, &victim);
    let outcome = coord.wait(&mut workers, Duration::from_secs(300));
    let ended = &outcome.ended_generations;
    assert!(ended[0].contains(&format!("worker {victim}")) && ended[0].contains("missed its lease"), "{ended:?}");
    let w = workers.iter_mut().find(|w| w.name == victim).unwrap();
    let _ = w.child.kill();
    let _ = w.child.wait();
    join_workers(&mut workers, &[&victim]);
    assert_eq!(outcome.committed_steps, job.total);
    let got = read_adapter(&out.join("final_model/adapter_model.safetensors"));
    assert_bit_identical(&got, &job.reference, "after a hang found by lease");
    check_ledger(&out, &job.samples);
}

/// SIGTERM to a student: it finishes its step, uploads a checkpoint of it (whatever
/// save_steps says), and exits cleanly; the job resumes from that checkpoint, losing
/// no step.
#[cfg(unix)]
#[test]
fn sigterm_makes_a_student_checkpoint_and_leave() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let job = job();
    let run = tempfile::tempdir().unwrap();
    let out = run.path().join("out");
    let cfg = job.config(&out);
    let mut coord = start_coordinator(&cfg, job.total, 3);
    let mut workers: Vec<Worker> = (0..3).map(|i| spawn_worker(&coord.url, TOKEN, &format!("w{i}"), run.path())).collect();
    let st = freeze_at(&coord, &mut workers, 1);
    let victim = student_named(&st, 1);
    let w = workers.iter().find(|w| w.name == victim).unwrap();
    // Pending while it is stopped; handled mid-run once it continues.
    signal(&w.child, libc::SIGTERM);
    resume(&workers, "");
    let w = workers.iter_mut().find(|w| w.name == victim).unwrap();
    let status = w.child.wait().unwrap();
    let log = std::fs::read_to_string(&w.log).unwrap();
    assert!(status.success() && log.contains("worker exit: Terminated"), "{status}\n{log}");
    let saved: Vec<u64> = log.lines().filter_map(|l| l.split("checkpoint-").nth(1)?.split(' ').next()?.parse().ok()).collect();
    assert!(!saved.is_empty(), "the terminated student uploaded no checkpoint:\n{log}");
    let outcome = coord.wait(&mut workers, Duration::from_secs(300));
    join_workers(&mut workers, &[&victim]);
    assert_eq!(outcome.committed_steps, job.total);
    let got = read_adapter(&out.join("final_model/adapter_model.safetensors"));
    assert_bit_identical(&got, &job.reference, "after SIGTERM");
    let ledger = check_ledger(&out, &job.samples);
    // Resuming from the SIGTERM checkpoint loses at most the step that was in flight.
    let last = *saved.iter().max().unwrap();
    assert!(ledger.rolled_back.iter().all(|s| s.step >= last), "steps before checkpoint-{last} were rolled back");
}

/// LwF: no teacher rank, so two workers are two students that compute the teacher's
/// outputs themselves (their base with adapters off); same reference, same bits.
#[test]
fn lwf_students_without_a_teacher_rank_match_the_reference_bit_for_bit() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let job = lwf_job();
    let run = tempfile::tempdir().unwrap();
    let out = run.path().join("out");
    let mut coord = start_coordinator(&job.config(&out), job.total, 2);
    let mut workers: Vec<Worker> = (0..2).map(|i| spawn_worker(&coord.url, TOKEN, &format!("w{i}"), run.path())).collect();
    let outcome = coord.wait(&mut workers, Duration::from_secs(300));
    join_workers(&mut workers, &[]);
    assert_eq!((outcome.committed_steps, outcome.generation), (job.total, 1), "{outcome:?}\n{}", logs_of(&workers));
    let got = read_adapter(&out.join("final_model/adapter_model.safetensors"));
    assert_bit_identical(&got, &job.reference, "LwF cluster vs two-shard reference");
    let ledger = check_ledger(&out, &job.samples);
    assert!(ledger.steps.iter().all(|s| s.ranks.len() == 2));
    // Not a copy of the teacher-model job's result: the teacher differs.
    assert_ne!(job.reference, crate::job().reference);
}

/// A worker with the wrong token or of another protocol never joins, and says why.
#[test]
fn a_worker_with_the_wrong_token_is_refused_with_a_clear_message() {
    let job = job();
    let run = tempfile::tempdir().unwrap();
    let cfg = job.config(&run.path().join("out"));
    let coord = start_coordinator(&cfg, job.total, 3);
    let mut opts = WorkerOptions::new(coord.url.clone(), "wrong");
    opts.connect = ConnectOptions { attempts: 1, ..ConnectOptions::default() };
    let e = format!("{:#}", run_worker(opts).unwrap_err());
    assert!(e.contains(&coord.url) && e.contains("token does not match"), "{e}");
    // Nothing was registered.
    assert!(coord.status().workers.is_empty());
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}", l.local_addr().unwrap());
    drop(l);
    let mut opts = WorkerOptions::new(dead.clone(), TOKEN);
    opts.connect = ConnectOptions { attempts: 2, initial_backoff: Duration::from_millis(10), ..ConnectOptions::default() };
    let e = format!("{:#}", run_worker(opts).unwrap_err());
    assert!(e.contains(&dead) && e.contains("unreachable"), "{e}");
}

/// Kills the teacher (SIGKILL) at a random step. Its students' receives fail at once,
/// they report leaving, and the next generation forms from the survivors and a fresh
/// worker started after the kill: one of them computes the teacher's outputs, and the job
/// resumes from the last checkpoint. The final adapter is the reference's, bit for bit,
/// and the ledger holds every sample exactly once.
#[cfg(unix)]
#[test]
fn a_teacher_killed_mid_run_is_replaced_by_a_new_generation_with_the_same_result() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let job = job();
    let run = tempfile::tempdir().unwrap();
    let out = run.path().join("out");
    let cfg = job.config(&out);
    let mut coord = start_coordinator(&cfg, job.total, 3);
    let mut workers: Vec<Worker> = (0..3).map(|i| spawn_worker(&coord.url, TOKEN, &format!("w{i}"), run.path())).collect();
    let kill_at = 1 + rand::random::<u64>() % (job.total - 4);
    eprintln!("killing the teacher once {kill_at} step(s) are committed");
    let st = freeze_at(&coord, &mut workers, kill_at);
    let victim = st.workers.iter().find(|w| w.role == pb::Role::Teacher as i32).map(|w| w.worker_name.clone()).unwrap();
    let w = workers.iter_mut().find(|w| w.name == victim).unwrap();
    signal(&w.child, libc::SIGKILL);
    let _ = w.child.wait();
    // The fresh worker registers while the survivors are still stopped: otherwise the next
    // generation may form from the survivors alone and end the job before it connects.
    workers.push(spawn_worker(&coord.url, TOKEN, "w3", run.path()));
    wait_until("w3 to register", Duration::from_secs(60), &mut workers, || coord.status().workers.iter().any(|w| w.worker_name == "w3"));
    resume(&workers, &victim);
    let outcome = coord.wait(&mut workers, Duration::from_secs(300));
    join_workers(&mut workers, &[&victim]);
    assert_eq!(outcome.committed_steps, job.total);
    assert!(outcome.generation >= 2, "no new generation after the kill");
    let ended = &outcome.ended_generations;
    assert!(ended[0].contains("left generation 1") || ended[0].contains(&format!("worker {victim}")), "{ended:?}");

    let got = read_adapter(&out.join("final_model/adapter_model.safetensors"));
    assert_bit_identical(&got, &job.reference, "after the teacher was killed");
    let ledger = check_ledger(&out, &job.samples);
    let resumed_from = st.last_checkpoint_step.unwrap_or(0);
    assert!(ledger.rolled_back.iter().all(|s| s.step >= resumed_from), "steps before checkpoint-{resumed_from} were rolled back");
    assert!(ledger.steps.iter().any(|s| s.generation >= 2), "no step was trained after the kill");
}

/// `qdistill coordinator` as a child process, on a fixed port.
#[cfg(unix)]
fn spawn_coordinator_process(job: &Job, out: &Path, port: u16, log: &Path) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_qdistill"));
    cmd.arg("coordinator").arg(&job.config);
    for o in job.overrides.iter().cloned().chain([format!("output_dir={}", out.display())]) {
        cmd.args(["--set", &o]);
    }
    cmd.args(["--listen", &format!("127.0.0.1:{port}"), "--workers", "3", "--shards", &SHARDS.to_string()])
        .args(["--lease", "4", "--heartbeat", "0.2", "--max-generations", "5", "--token", TOKEN])
        .stdout(Stdio::null())
        .stderr(std::fs::OpenOptions::new().create(true).append(true).open(log).unwrap())
        .spawn()
        .unwrap()
}

/// The coordinator's status, or None while it is not answering.
fn poll_status(url: &str) -> Option<pb::JobStatusResponse> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let opts = ConnectOptions { attempts: 1, connect_timeout: Duration::from_secs(1), ..ConnectOptions::default() };
    rt.block_on(async { Client::connect(url, TOKEN, &opts).await.ok()?.job_status().await.ok() })
}

/// SIGKILL to the coordinator process mid-run, a few seconds without one, then the same
/// `qdistill coordinator` command again on the same port and output_dir. The new
/// coordinator reads the job record and the latest checkpoint (with its ledger), the
/// workers ride out the outage, are told their sessions are unknown, register again and
/// form a new generation: the final adapter is the undisturbed reference's, bit for bit,
/// and the ledger holds every sample exactly once.
#[cfg(unix)]
#[test]
fn a_coordinator_killed_mid_run_is_restarted_and_the_job_finishes_with_the_same_result() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let job = job();
    let run = tempfile::tempdir().unwrap();
    let out = run.path().join("out");
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}");
    let coord_log = run.path().join("coordinator.log");
    let mut coordinator = spawn_coordinator_process(job, &out, port, &coord_log);
    let mut workers: Vec<Worker> = (0..3).map(|i| spawn_worker(&url, TOKEN, &format!("w{i}"), run.path())).collect();
    let coord_log_text = || std::fs::read_to_string(&coord_log).unwrap_or_default();

    let kill_at = 1 + rand::random::<u64>() % (job.total - 4);
    eprintln!("killing the coordinator once {kill_at} step(s) are committed");
    let mut before = None;
    wait_until(&format!("step {kill_at}"), Duration::from_secs(240), &mut workers, || {
        before = poll_status(&url).filter(|st| st.committed_steps >= kill_at);
        if before.is_none() {
            std::thread::sleep(Duration::from_millis(20));
        }
        before.is_some()
    });
    signal(&coordinator, libc::SIGKILL);
    coordinator.wait().unwrap();
    let before = before.unwrap();
    assert!(before.committed_steps < job.total, "the job finished before the kill: {before:?}");
    // The workers go on without a coordinator for a while: their commits and heartbeats
    // fail and are retried.
    std::thread::sleep(Duration::from_secs(2));
    assert!(poll_status(&url).is_none(), "something still answers on {url}");
    let mut coordinator = spawn_coordinator_process(job, &out, port, &coord_log);
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = coordinator.try_wait().unwrap() {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(300) {
            let _ = coordinator.kill();
            for w in workers.iter_mut() {
                let _ = w.child.kill();
            }
            panic!("the restarted coordinator did not finish\n{}\n--- coordinator ---\n{}", logs_of(&workers), coord_log_text());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "the restarted coordinator exited with {status}\n{}", coord_log_text());
    join_workers(&mut workers, &[]);
    assert!(coord_log_text().contains("continuing the job"), "the second coordinator started the job over:\n{}", coord_log_text());

    let got = read_adapter(&out.join("final_model/adapter_model.safetensors"));
    assert_bit_identical(&got, &job.reference, "after a coordinator restart");
    let ledger = check_ledger(&out, &job.samples);
    // Steps the first coordinator committed after its last checkpoint were trained
    // again; nothing before that checkpoint was.
    let checkpointed = before.last_checkpoint_step.unwrap_or(0);
    assert!(ledger.rolled_back.iter().all(|s| s.step >= checkpointed), "steps before checkpoint-{checkpointed} were rolled back");
    let record: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("qdistill_job.json")).unwrap()).unwrap();
    assert_eq!(record["coordinator_starts"], 2, "{record}");
    assert!(record["generation"].as_u64().unwrap() >= 2, "the restart formed no new generation: {record}");
    let ended: Vec<String> = serde_json::from_value(record["ended_generations"].clone()).unwrap();
    assert!(ended.iter().any(|e| e.contains("coordinator restarted")), "{ended:?}");
    // Sessions of the second coordinator are not those of the first, and they trained on
    // from where the first one's kept steps end: its last checkpoint, at or after the one
    // seen before the kill. (Steps may commit between that look and the kill, so the
    // count seen then is no bound.)
    let steps_after: Vec<u64> = ledger.steps.iter().filter(|s| s.generation >= 2).map(|s| s.step).collect();
    let kept = ledger.steps.iter().filter(|s| s.generation < 2).count() as u64;
    assert!(
        !steps_after.is_empty() && steps_after[0] == kept && kept >= checkpointed,
        "{steps_after:?}: {kept} steps kept from generation 1, checkpoint-{checkpointed} seen before the kill"
    );
}

/// A CA and a server certificate for 127.0.0.1 signed by it, as PEM files.
struct Pki {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
}

fn make_pki(dir: &Path, name: &str) -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, format!("{name} test CA"));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::DigitalSignature];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    params.distinguished_name.push(DnType::CommonName, "qdistill coordinator");
    let cert = params.signed_by(&key, &ca).unwrap();
    let pki = Pki { ca: dir.join(format!("{name}-ca.pem")), cert: dir.join(format!("{name}-cert.pem")), key: dir.join(format!("{name}-key.pem")) };
    std::fs::write(&pki.ca, ca.pem()).unwrap();
    std::fs::write(&pki.cert, cert.pem()).unwrap();
    std::fs::write(&pki.key, key.serialize_pem()).unwrap();
    pki
}

/// The coordinator serves TLS with a certificate from a CA made here: a worker given
/// that CA joins over https:// and trains the whole LwF job (one student holding both
/// shards, so the two-shard reference's bits); `status` works over TLS too. Workers
/// without the CA, with another CA, or speaking plaintext are refused, and the error
/// names the URL and what failed.
#[test]
fn a_worker_joins_over_tls_and_one_without_the_ca_is_refused() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let job = lwf_job();
    let run = tempfile::tempdir().unwrap();
    let pki = make_pki(run.path(), "job");
    let out = run.path().join("out");
    let mut coord = start_coordinator_with(&job.config(&out), job.total, 1, Some(&pki), LEASE);
    assert!(coord.url.starts_with("https://127.0.0.1:"), "{}", coord.url);

    // Refusals first, while the job waits for its one worker.
    let refused = |connect: ConnectOptions, url: &str| {
        let mut opts = WorkerOptions::new(url.to_string(), TOKEN);
        opts.connect = ConnectOptions { attempts: 2, initial_backoff: Duration::from_millis(10), retry_for: Duration::ZERO, ..connect };
        let e = format!("{:#}", run_worker(opts).unwrap_err());
        eprintln!("refused as expected: {e}");
        e
    };
    let e = refused(ConnectOptions::default(), &coord.url);
    assert!(e.contains(&coord.url) && e.contains("--tls-ca"), "{e}");
    let other = make_pki(run.path(), "other");
    let e = refused(ConnectOptions { tls_ca: Some(other.ca.clone()), ..ConnectOptions::default() }, &coord.url);
    assert!(e.contains(&coord.url) && e.contains("TLS handshake failed") && e.contains("certificate"), "{e}");
    let plain = coord.url.replace("https://", "http://");
    let e = refused(ConnectOptions::default(), &plain);
    assert!(e.contains(&plain) && e.contains("use an https:// URL"), "{e}");
    assert!(coord.status().workers.is_empty(), "a refused worker registered");

    let mut workers = vec![spawn_worker_with_ca(&coord.url, TOKEN, "w0", run.path(), Some(&pki.ca))];
    let outcome = coord.wait(&mut workers, Duration::from_secs(300));
    join_workers(&mut workers, &[]);
    assert_eq!((outcome.committed_steps, outcome.generation), (job.total, 1), "{outcome:?}\n{}", logs_of(&workers));
    let got = read_adapter(&out.join("final_model/adapter_model.safetensors"));
    assert_bit_identical(&got, &job.reference, "over TLS, one student holding both shards");
    check_ledger(&out, &job.samples);
}
