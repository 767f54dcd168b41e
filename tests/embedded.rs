//! Embedded mode: `qdistill train CONFIG --workers N` runs the coordinator and N workers
//! inside one process over the cluster code path (gRPC service, role loops, TCP
//! collective), training the tiny Llama fixture.
//!
//! The reference is the direct `qdistill train` of the same config, in this test process.
//! With as many virtual shards as microbatches per step (`--shards 4`), the cluster adds
//! each microbatch's gradient in microbatch order, which is the direct run's running sum,
//! so the final adapters must agree bit for bit. The ledger is checked against the data
//! stream itself (the batches the direct run trains at each step).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

mod common;
use common::{assert_bit_identical, check_ledger, read_adapter, write_cluster_job, G};

/// The training runs share 2 CPU cores: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const SHARDS_PER_MICROBATCH: &str = "4";
const LIMIT: Duration = Duration::from_secs(300);

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// A job under a temporary directory: its config and the overrides of a variant.
struct Job {
    dir: tempfile::TempDir,
    config: PathBuf,
    overrides: Vec<String>,
}

impl Job {
    fn new(overrides: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = write_cluster_job(dir.path());
        Job { dir, config, overrides: overrides.iter().map(|s| s.to_string()).collect() }
    }
    /// The job's length: max_steps of the config with this variant's overrides.
    fn steps(&self) -> usize {
        qdistill_common::config::load(&self.config, &self.overrides(&self.out("unused"))).unwrap().training.max_steps as usize
    }
    fn out(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
    fn overrides(&self, out: &Path) -> Vec<String> {
        let mut o = self.overrides.clone();
        o.push(format!("output_dir={}", out.display()));
        o
    }
    /// `qdistill train CONFIG --workers …` as a child process, its log at `<out>.log`.
    fn spawn(&self, out: &Path, args: &[&str]) -> Child {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_qdistill"));
        cmd.arg("train").arg(&self.config).arg("--no-progress");
        for o in self.overrides(out) {
            cmd.args(["--set", &o]);
        }
        let log = std::fs::OpenOptions::new().create(true).append(true).open(out.with_extension("log")).unwrap();
        cmd.args(args).env("RUST_LOG", "info").stdout(Stdio::null()).stderr(log).spawn().unwrap()
    }
    fn log(&self, out: &Path) -> String {
        std::fs::read_to_string(out.with_extension("log")).unwrap_or_default()
    }
    /// Runs `qdistill train` with `args` to its end.
    fn train(&self, out: &Path, args: &[&str]) -> ExitStatus {
        let mut child = self.spawn(out, args);
        wait(&mut child, || self.log(out))
    }
    /// The direct run of the same config, in this process: the reference.
    fn direct(&self, out: &Path) -> HashMap<String, Vec<f32>> {
        let summary = qdistill_worker::run::train(&self.config, &self.overrides(out), false).unwrap();
        assert_eq!(summary.steps, self.steps());
        read_adapter(&out.join("final_model/adapter_model.safetensors"))
    }
    /// The sample ids of every step's microbatches, from the seeded data stream.
    fn samples(&self) -> Vec<Vec<u64>> {
        let cfg = qdistill_common::config::load(&self.config, &self.overrides(&self.out("unused"))).unwrap();
        let path = qdistill_common::config::resolve_model_path(&cfg.model.model_name_or_path, None, None).unwrap();
        let (_, _, tok) = qdistill_worker::models::open(&path).unwrap();
        let mut stream = qdistill_worker::data_plan::build(&cfg, &tok).unwrap().train_stream().unwrap();
        (0..cfg.training.max_steps as usize).map(|_| (0..G).flat_map(|_| stream.next_batch().sample_ids).collect()).collect()
    }
}

fn wait(child: &mut Child, log: impl Fn() -> String) -> ExitStatus {
    let t0 = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        if t0.elapsed() > LIMIT {
            let _ = child.kill();
            panic!("qdistill train did not finish in {LIMIT:?}\n{}", log());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}


/// The outputs `qdistill coordinator` writes: checkpoints at the save points in PEFT/HF
/// layout, the job record.
fn check_cluster_outputs(out: &Path) {
    for step in [2, 4, 6, 8, 10] {
        let d = out.join(format!("checkpoint-{step}"));
        let state: serde_json::Value = serde_json::from_slice(&std::fs::read(d.join("trainer_state.json")).unwrap()).unwrap();
        assert_eq!(state["global_step"], step);
        assert!(d.join("adapter_config.json").exists() && d.join("optimizer.safetensors").exists(), "{}", d.display());
    }
    let record: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("qdistill_job.json")).unwrap()).unwrap();
    assert_eq!((record["total_steps"].as_u64(), record["generation"].as_u64()), (Some(10), Some(1)), "{record}");
}

/// (a) One teacher rank and two students in one process train what the direct run
/// trains, bit for bit, and leave the coordinator's outputs.
#[test]
fn three_embedded_workers_match_the_direct_run_bit_for_bit() {
    let _s = serial();
    let job = Job::new(&[]);
    let want = job.direct(&job.out("direct"));
    let out = job.out("embedded");
    let status = job.train(&out, &["--workers", "3", "--shards", SHARDS_PER_MICROBATCH]);
    assert!(status.success(), "{status}\n{}", job.log(&out));
    let log = job.log(&out);
    // Three workers registered, one of them as the teacher.
    for w in ["worker-0", "worker-1", "worker-2"] {
        assert!(log.contains(w), "{w} is not in the log:\n{log}");
    }
    assert_bit_identical(&read_adapter(&out.join("final_model/adapter_model.safetensors")), &want, "embedded vs direct");
    let ledger = check_ledger(&out, &job.samples());
    assert!(ledger.rolled_back.is_empty());
    assert!(ledger.steps.iter().all(|s| s.generation == 1 && s.ranks.len() == 2), "two students trained every step");
    check_cluster_outputs(&out);
}

/// (b) LwF: no teacher rank, two students that compute the teacher's outputs from their
/// own base; the direct LwF run's bits.
#[test]
fn two_embedded_lwf_students_match_the_direct_run_bit_for_bit() {
    let _s = serial();
    let job = Job::new(&["teacher.mode=lwf", "teacher.model_name_or_path=null"]);
    let want = job.direct(&job.out("direct"));
    let out = job.out("embedded");
    let status = job.train(&out, &["--workers", "2", "--shards", SHARDS_PER_MICROBATCH]);
    assert!(status.success(), "{status}\n{}", job.log(&out));
    assert_bit_identical(&read_adapter(&out.join("final_model/adapter_model.safetensors")), &want, "embedded LwF vs direct");
    let ledger = check_ledger(&out, &job.samples());
    assert!(ledger.steps.iter().all(|s| s.ranks.len() == 2), "two students trained every step");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// `qdistill status` against the embedded coordinator, or None while it does not answer.
fn status(url: &str, token: &str) -> Option<String> {
    let out = Command::new(env!("CARGO_BIN_EXE_qdistill")).args(["status", "--coordinator", url, "--token", token]).output().unwrap();
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// N of the status line's "N/M steps committed".
fn committed_steps(status: &str) -> Option<u64> {
    status.split(" steps committed").next()?.rsplit(' ').next()?.split('/').next()?.parse().ok()
}

/// (c) With `--listen`, `qdistill status` shows the embedded job while it runs (with the
/// token the run keeps in output_dir). Then SIGTERM, as a scheduler sends it: the process
/// checkpoints the step in progress and exits with 143; the same command continues the
/// job from that checkpoint and ends with the direct run's adapter, bit for bit, no step
/// trained twice before the checkpoint.
#[cfg(unix)]
#[test]
fn status_watches_an_embedded_job_and_sigterm_stops_it_for_the_same_command_to_continue() {
    let _s = serial();
    // Long enough that the signal lands mid-run even when each status poll (a process
    // start) is slow on a loaded machine.
    let job = Job::new(&["max_steps=30"]);
    let out = job.out("embedded");
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let listen = format!("127.0.0.1:{port}");
    let args = ["--workers", "3", "--shards", SHARDS_PER_MICROBATCH, "--listen", &listen];
    let mut child = job.spawn(&out, &args);
    let t0 = Instant::now();
    let mut seen = None;
    let token_file = out.join(qdistill_worker::cluster::TOKEN_FILE);
    let mut token = String::new();
    // Until a step is committed: the status shows the job mid-run.
    while seen.is_none() {
        if token.is_empty() {
            token = std::fs::read_to_string(&token_file).unwrap_or_default();
        }
        if let Some(st) = Some(&token).filter(|t| !t.is_empty()).and_then(|t| status(&url, t)).filter(|s| committed_steps(s).is_some_and(|n| n >= 1)) {
            seen = Some(st);
            break;
        }
        if let Some(s) = child.try_wait().unwrap() {
            panic!("the job ended ({s}) before the status showed a step\n{}", job.log(&out));
        }
        if t0.elapsed() > LIMIT {
            let _ = child.kill();
            panic!("no status with a committed step in {LIMIT:?}\n{}", job.log(&out));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // SAFETY: kill(2) on a child we spawned and have not reaped.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let seen = seen.unwrap();
    let at = committed_steps(&seen).unwrap();
    assert!(seen.contains("worker-0") && seen.contains("worker-2"), "the status does not list the workers:\n{seen}");
    let status = wait(&mut child, || job.log(&out));
    let log = job.log(&out);
    assert_eq!(status.code(), Some(143), "SIGTERM should stop the job with 143\n{log}");
    assert!(log.contains(&url) && log.contains(&token), "the log does not give the URL and token:\n{log}");
    assert!(!out.join("final_model").exists(), "the job finished before the signal arrived (cannot test the drain)");
    let saved: Vec<u64> = std::fs::read_dir(&out)
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.strip_prefix("checkpoint-")?.parse().ok())
        .collect();
    let last = saved.iter().copied().max().unwrap_or_else(|| panic!("no checkpoint after SIGTERM\n{log}"));
    assert!(last >= at, "the last checkpoint ({last}) is older than the step the status showed ({at})\n{log}");

    let status = job.train(&out, &args);
    assert!(status.success(), "{status}\n{}", job.log(&out));
    assert!(job.log(&out).contains("continuing the job"), "the second run started over:\n{}", job.log(&out));
    let want = job.direct(&job.out("direct"));
    assert_bit_identical(&read_adapter(&out.join("final_model/adapter_model.safetensors")), &want, "stopped and continued vs direct");
    let ledger = check_ledger(&out, &job.samples());
    assert!(ledger.rolled_back.iter().all(|s| s.step >= last), "steps before checkpoint-{last} were trained twice");
}

/// Runs a `qdistill train` that must fail fast and returns its stderr.
fn refused(job: &Job, args: &[&str]) -> String {
    let out = job.out("refused");
    let status = job.train(&out, args);
    let log = job.log(&out);
    std::fs::remove_file(out.with_extension("log")).unwrap();
    assert_eq!(status.code(), Some(if log.contains("Usage:") { 2 } else { 1 }), "{status}\n{log}");
    log
}

/// (d) A config the cluster path does not support is refused before anything runs, and
/// the error names the key.
#[test]
fn a_config_the_cluster_refuses_is_named_with_workers() {
    let job = Job::new(&["distill.lmbda=0.5"]);
    let e = refused(&job, &["--workers", "2"]);
    assert!(e.contains("distill.lmbda") && e.contains("single-process"), "{e}");
    let job = Job::new(&["training.save_strategy=epoch"]);
    let e = refused(&job, &["--workers", "2"]);
    assert!(e.contains("training.save_strategy"), "{e}");
    // The coordinator's own check: a separate teacher model needs a student besides it.
    let job = Job::new(&[]);
    let e = refused(&job, &["--workers", "2", "--teacher-ranks", "2"]);
    assert!(e.contains("--workers 2 is too few"), "{e}");
    assert!(!job.out("refused").exists(), "a refused run wrote outputs");
}

/// (e) Bad `--devices`: an unknown device, a count that does not match --workers, mixed
/// kinds.
#[test]
fn bad_devices_are_named() {
    let job = Job::new(&[]);
    let e = refused(&job, &["--workers", "2", "--devices", "cpu,gpu0"]);
    assert!(e.contains("--devices entry 2") && e.contains("\"gpu0\" is not a device"), "{e}");
    let e = refused(&job, &["--workers", "3", "--devices", "cpu,cpu"]);
    assert!(e.contains("names 2 device(s) for 3 worker(s)") && e.contains("cpu,cpu,cpu"), "{e}");
    let e = refused(&job, &["--workers", "2", "--devices", "cpu,cuda:0"]);
    assert!(e.contains("mixes cpu and cuda"), "{e}");
}

/// The embedded flags need --workers 2 or more; a QDISTILL_TOKEN exported for a cluster
/// does not stop the direct run from parsing.
#[test]
fn embedded_flags_need_workers() {
    let job = Job::new(&[]);
    let e = refused(&job, &["--devices", "cpu,cpu"]);
    assert!(e.contains("--workers"), "{e}");
    let e = refused(&job, &["--workers", "1", "--shards", "2"]);
    assert!(e.contains("--workers 2 or more"), "{e}");
    let parsed = Command::new(env!("CARGO_BIN_EXE_qdistill"))
        .arg("train")
        .arg(&job.config)
        .env("QDISTILL_PARSE_ONLY", "1")
        .env("QDISTILL_TOKEN", "a-cluster-token")
        .output()
        .unwrap();
    assert!(parsed.status.success(), "{}", String::from_utf8_lossy(&parsed.stderr));
}

/// A worker that fails (here: the teacher's weights are not a safetensors file, which
/// the coordinator does not read) ends the job with its error, naming the worker, instead of
/// leaving the others waiting for it.
#[test]
fn a_failing_worker_ends_the_job_with_its_error() {
    let _s = serial();
    let job = Job::new(&[]);
    let teacher = job.dir.path().join("broken-teacher");
    std::fs::create_dir_all(&teacher).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(job.dir.path().join("llama").join(f), teacher.join(f)).unwrap();
    }
    std::fs::write(teacher.join("model.safetensors"), b"not a safetensors file").unwrap();
    let job = Job { overrides: vec![format!("teacher.model_name_or_path={}", teacher.display())], ..job };
    let out = job.out("embedded");
    let status = job.train(&out, &["--workers", "3"]);
    let log = job.log(&out);
    assert_eq!(status.code(), Some(1), "{status}\n{log}");
    let error = log.lines().find(|l| l.starts_with("error:")).unwrap_or_else(|| panic!("no error line:\n{log}"));
    // The teacher and the students (for the teacher's LM head) all read the file: the
    // first to fail is named, with its role.
    assert!(error.contains("(embedded, 3 workers): worker-") && error.contains(" rank ") && error.contains("broken-teacher/model.safetensors"), "{error}");
}
