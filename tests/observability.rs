//! Metrics and traces of real runs of the `qdistill` binary on the tiny Llama fixture.
//!
//! Metrics: a coordinator and three workers (one teacher rank, two students) with
//! `--metrics-addr`; their /metrics endpoints are scraped over HTTP while the job runs and
//! parsed with prometheus-parse (a parser that shares no code with the exporter). The
//! reference for the values is the job itself: the coordinator's step must rise to the
//! configured max_steps, workers_alive must equal the workers started, the students'
//! series carry their role and rank.
//!
//! Traces: an OTLP trace collector written here (the OTLP gRPC service from
//! opentelemetry-proto, on a free port) receives the spans of the same cluster run and of
//! an embedded `qdistill train`; the phase names the trainer promises must arrive. With
//! OTEL_EXPORTER_OTLP_ENDPOINT unset no exporter may exist, even though the per-signal
//! variable an unconditional exporter would read points at the collector.

use std::collections::{BTreeSet, HashMap};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};

mod common;
use common::{fixture_llama, write_word_text};

const TOKEN: &str = "observability-test-token";
const MAX_STEPS: u64 = 40;

/// Both tests start several processes on a machine with few cores: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// A distillation job on the fixture under `dir`; returns the config path.
fn write_job(dir: &Path) -> PathBuf {
    let model = fixture_llama(dir, "llama");
    let data = dir.join("train.jsonl");
    write_word_text(&data);
    let cfg = dir.join("job.toml");
    let text = format!(
        r#"output_dir = "{out}"
seed = 3
device = "cpu"
[model]
model_name_or_path = "{model}"
keep_layers = "0"
[teacher]
mode = "model"
model_name_or_path = "{model}"
[lora]
r = 4
lora_alpha = 8
[data]
train_file = "{data}"
max_seq_length = 64
[training]
per_device_train_batch_size = 2
gradient_accumulation_steps = 2
max_steps = {MAX_STEPS}
learning_rate = 1e-3
save_steps = 10
logging_steps = 1
"#,
        out = dir.join("out").display(),
        model = model.display(),
        data = data.display(),
    );
    std::fs::write(&cfg, text).unwrap();
    cfg
}

/// A child process whose stderr is copied to a file and searched for log lines.
struct Proc {
    name: String,
    child: Child,
    log: Arc<Mutex<String>>,
    reader: std::thread::JoinHandle<()>,
}

impl Proc {
    fn spawn(name: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_qdistill"));
        cmd.args(args).env("QDISTILL_TOKEN", TOKEN).env("RAYON_NUM_THREADS", "1").env_remove("OTEL_EXPORTER_OTLP_ENDPOINT");
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (stderr, sink) = (child.stderr.take().unwrap(), log.clone());
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        Proc { name: name.into(), child, log, reader }
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// The `addr=` of the first log line containing `what`.
    fn wait_for_addr(&mut self, what: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            if let Some(line) = log.lines().find(|l| l.contains(what)) {
                let addr = line.split_whitespace().find_map(|w| w.strip_prefix("addr=")).unwrap_or_else(|| panic!("{}: no addr= in `{line}`", self.name));
                return addr.to_string();
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("{} exited ({status}) before logging `{what}`:\n{log}", self.name);
            }
            assert!(Instant::now() < deadline, "{}: no `{what}` after {timeout:?}:\n{log}", self.name);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait(&mut self, timeout: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                // The reader has every line once it reaches the end of the pipe, which the
                // exit closed (bounded, in case a descendant still holds it open).
                let until = Instant::now() + Duration::from_secs(10);
                while !self.reader.is_finished() && Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(10));
                }
                return s;
            }
            assert!(Instant::now() < deadline, "{} still running after {timeout:?}:\n{}", self.name, self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// GET http://addr/metrics, parsed; None while the server is not there (yet or any more).
fn scrape(addr: &str) -> Option<prometheus_parse::Scrape> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let (head, body) = resp.split_once("\r\n\r\n")?;
    assert!(head.starts_with("HTTP/1.1 200"), "GET /metrics: {head}");
    assert!(head.to_ascii_lowercase().contains("content-type: text/plain; version=0.0.4"), "GET /metrics: {head}");
    Some(prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).expect("the Prometheus text format"))
}

fn value(v: &prometheus_parse::Value) -> f64 {
    match v {
        prometheus_parse::Value::Counter(x) | prometheus_parse::Value::Gauge(x) | prometheus_parse::Value::Untyped(x) => *x,
        other => panic!("unexpected sample {other:?}"),
    }
}

/// Values of `metric` by their role/rank labels ("" when unlabelled).
fn samples(s: &prometheus_parse::Scrape, metric: &str) -> HashMap<String, f64> {
    s.samples
        .iter()
        .filter(|x| x.metric == metric)
        .map(|x| {
            let key = match (x.labels.get("role"), x.labels.get("rank")) {
                (Some(role), Some(rank)) => format!("{role}/{rank}"),
                _ => String::new(),
            };
            (key, value(&x.value))
        })
        .collect()
}

/// An OTLP/gRPC trace collector that keeps the names of the spans it receives, with the
/// service.name of their resource.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<(String, String)>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(&self, req: tonic::Request<ExportTraceServiceRequest>) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut spans = self.spans.lock().unwrap();
        for rs in req.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|a| a.key == "service.name")
                .and_then(|a| a.value.as_ref())
                .and_then(|v| match &v.value {
                    Some(opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(s)) => Some(s.clone()),
                    _ => None,
                })
                .unwrap_or_default();
            for ss in rs.scope_spans {
                spans.extend(ss.spans.into_iter().map(|s| (service.clone(), s.name)));
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

struct RunningCollector {
    _rt: tokio::runtime::Runtime,
    url: String,
    collector: Collector,
}

impl RunningCollector {
    fn start() -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let collector = Collector::default();
        let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let svc = TraceServiceServer::new(collector.clone());
        rt.spawn(tonic::transport::Server::builder().add_service(svc).serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)));
        Self { _rt: rt, url, collector }
    }

    fn names(&self, service: &str) -> BTreeSet<String> {
        self.collector.spans.lock().unwrap().iter().filter(|(s, _)| s == service).map(|(_, n)| n.clone()).collect()
    }
}

/// Samples in the first k optimizer steps, for k = 0..=MAX_STEPS: the reference for
/// qdistill_samples_done_total, from the trainer's own data stream, walked here.
fn cumulative_samples(config: &Path) -> Vec<u64> {
    let cfg = qdistill_common::config::load(config, &[]).unwrap();
    let data = qdistill_worker::run::prepare(&cfg).unwrap().data;
    let mut stream = data.train_stream().unwrap();
    let g = cfg.training.gradient_accumulation_steps;
    let mut cum = vec![0];
    for _ in 0..MAX_STEPS {
        let n: usize = (0..g).map(|_| stream.next_batch().sample_ids.len()).sum();
        cum.push(cum.last().unwrap() + n as u64);
    }
    cum
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| s.to_string()).collect()
}

#[test]
fn a_cluster_run_serves_metrics_that_move_and_exports_phase_spans() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let config = write_job(dir.path());
    let otlp = RunningCollector::start();
    let cum_samples = cumulative_samples(&config);
    let config = config.to_str().unwrap();
    let mut coord = Proc::spawn(
        "coordinator",
        &["coordinator", config, "--listen", "127.0.0.1:0", "--workers", "3", "--teacher-ranks", "1", "--lease", "10", "--heartbeat", "0.2", "--metrics-addr", "127.0.0.1:0"],
        &[],
    );
    let metrics_addr = coord.wait_for_addr("serving Prometheus metrics", Duration::from_secs(60));
    let grpc = coord.wait_for_addr("coordinator listening", Duration::from_secs(60));
    let url = format!("http://{grpc}");
    let otel = [("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.url.as_str())];
    let mut workers: Vec<Proc> = (0..3)
        .map(|i| {
            let name = format!("w{i}");
            Proc::spawn(&name, &["worker", "--coordinator", &url, "--name", &name, "--metrics-addr", "127.0.0.1:0"], &otel)
        })
        .collect();
    let worker_metrics: Vec<String> = workers.iter_mut().map(|w| w.wait_for_addr("serving Prometheus metrics", Duration::from_secs(60))).collect();

    // Scrape the coordinator until the job is done (or its server is gone), checking
    // every scrape against the data stream and keeping what moves.
    let mut steps = Vec::new();
    let mut alive_while_training = BTreeSet::new();
    let mut worker_scrapes: HashMap<String, prometheus_parse::Scrape> = HashMap::new();
    let mut last = None;
    let deadline = Instant::now() + Duration::from_secs(300);
    while let Some(s) = scrape(&metrics_addr) {
        let step = samples(&s, "qdistill_step")[""];
        assert_eq!(samples(&s, "qdistill_total_steps")[""], MAX_STEPS as f64);
        assert_eq!(
            samples(&s, "qdistill_samples_done_total")[""],
            cum_samples[step as usize] as f64,
            "samples done after {step} committed steps"
        );
        if step > 0.0 {
            let loss = samples(&s, "qdistill_loss")[""];
            let kd = samples(&s, "qdistill_kd_loss")[""];
            assert!(loss.is_finite() && loss > 0.0 && kd.is_finite() && kd >= 0.0, "loss {loss}, kd {kd}");
            assert_eq!(samples(&s, "qdistill_generation")[""], 1.0);
        }
        if step > 0.0 && step < MAX_STEPS as f64 {
            alive_while_training.insert(samples(&s, "qdistill_workers_alive")[""] as u64);
            // The workers' own series, mid-run.
            for a in &worker_metrics {
                if let Some(ws) = scrape(a) {
                    if samples(&ws, "qdistill_step").keys().any(|k| k.starts_with("student/")) {
                        worker_scrapes.insert(a.clone(), ws);
                    }
                }
            }
        }
        if steps.last() != Some(&step) {
            steps.push(step);
        }
        last = Some(s);
        if step >= MAX_STEPS as f64 {
            break;
        }
        assert!(Instant::now() < deadline, "the job did not finish; coordinator log:\n{}", coord.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    let last = last.expect("the coordinator's /metrics answered");
    assert!(steps.windows(2).all(|w| w[0] < w[1]), "the committed step only grows: {steps:?}");
    let mid_run = steps.iter().filter(|&&s| s > 0.0 && s < MAX_STEPS as f64).count();
    assert!(mid_run >= 2, "too few scrapes mid-run to see the step move: {steps:?}\n{}", coord.log());
    assert_eq!(alive_while_training, BTreeSet::from([3]), "qdistill_workers_alive while training");
    assert!(samples(&last, "qdistill_tokens_per_second")[""] > 0.0);
    // save_steps = 10: a checkpoint exists once step 10 is committed.
    if samples(&last, "qdistill_step")[""] >= 11.0 {
        assert!(samples(&last, "qdistill_checkpoint_age_seconds")[""] >= 0.0);
    }

    // Students report under their role and rank; the two ranks are 0 and 1.
    let mut student_ranks = BTreeSet::new();
    for ws in worker_scrapes.values() {
        for (key, step) in samples(ws, "qdistill_step") {
            if let Some(rank) = key.strip_prefix("student/") {
                student_ranks.insert(rank.to_string());
                assert!(step >= 1.0 && step <= MAX_STEPS as f64, "{key}: step {step}");
                assert!(samples(ws, "qdistill_samples_done_total")[&key] > 0.0, "{key}");
                assert_eq!(samples(ws, "qdistill_generation")[&key], 1.0, "{key}");
            }
        }
    }
    assert_eq!(student_ranks, set(&["0", "1"]), "student series scraped mid-run: {:?}", worker_scrapes.keys());

    for w in &mut workers {
        let status = w.wait(Duration::from_secs(120));
        assert!(status.success(), "{} exited with {status}:\n{}", w.name, w.log());
    }
    coord.wait(Duration::from_secs(60));
    drop(workers);
    let names = otlp.names("qdistill-worker");
    let want = set(&["step", "data", "teacher_forward", "transfer", "student_forward_backward", "allreduce", "optimizer", "checkpoint"]);
    assert!(want.is_subset(&names), "phase spans received from the workers: {names:?}, want {want:?}");
}

#[test]
fn an_embedded_run_exports_phase_spans_only_when_the_endpoint_is_set() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let config = write_job(dir.path());
    let otlp = RunningCollector::start();
    let args = ["train", config.to_str().unwrap(), "--no-progress", "--set", "max_steps=3", "--set", "save_steps=1"];

    let mut off = Proc::spawn("train without OTLP", &args, &[("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", otlp.url.as_str())]);
    assert!(off.wait(Duration::from_secs(120)).success(), "{}", off.log());
    assert!(!off.log().contains("exporting step-phase traces"), "{}", off.log());
    assert!(otlp.names("qdistill").is_empty(), "spans arrived without OTEL_EXPORTER_OTLP_ENDPOINT: {:?}", otlp.names("qdistill"));

    let out = dir.path().join("out2");
    let mut on = Proc::spawn(
        "train with OTLP",
        &[&args[..], &["--set", &format!("output_dir={}", out.display())]].concat(),
        &[("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.url.as_str())],
    );
    assert!(on.wait(Duration::from_secs(120)).success(), "{}", on.log());
    // The exporter flushes at exit: everything is there once the process is gone.
    let names = otlp.names("qdistill");
    let want = set(&["step", "data", "teacher_forward", "student_forward_backward", "optimizer", "checkpoint"]);
    assert!(want.is_subset(&names), "phase spans of the embedded run: {names:?}, want {want:?}");
}

/// Kubernetes stops a pod with SIGTERM: the coordinator then asks student rank 0 for a
/// checkpoint of the step in progress, waits until it is stored, and exits cleanly, so
/// that a restart loses no committed step. The save interval is set past the end of the
/// job, so any checkpoint found was made for the signal.
#[test]
fn sigterm_makes_the_coordinator_store_a_checkpoint_of_the_step_in_progress_then_exit() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let config = write_job(dir.path());
    let total = 400;
    let mut coord = Proc::spawn(
        "coordinator",
        &[
            "coordinator", config.to_str().unwrap(), "--listen", "127.0.0.1:0", "--workers", "3", "--teacher-ranks", "1",
            "--set", &format!("max_steps={total}"), "--set", "save_steps=1000",
            "--heartbeat", "0.2", "--metrics-addr", "127.0.0.1:0", "--drain-timeout", "60",
        ],
        &[],
    );
    let metrics_addr = coord.wait_for_addr("serving Prometheus metrics", Duration::from_secs(60));
    let url = format!("http://{}", coord.wait_for_addr("coordinator listening", Duration::from_secs(60)));
    let _workers: Vec<Proc> = (0..3).map(|i| Proc::spawn(&format!("w{i}"), &["worker", "--coordinator", &url], &[])).collect();
    let deadline = Instant::now() + Duration::from_secs(120);
    let at_signal = loop {
        let step = scrape(&metrics_addr).map_or(0.0, |s| samples(&s, "qdistill_step")[""]);
        if step >= 3.0 {
            break step as u64;
        }
        assert!(Instant::now() < deadline, "no progress:\n{}", coord.log());
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(unsafe { libc::kill(coord.child.id() as i32, libc::SIGTERM) }, 0);
    let status = coord.wait(Duration::from_secs(90));
    assert!(status.success(), "coordinator exited with {status}:\n{}", coord.log());
    let stored: Vec<u64> = std::fs::read_dir(dir.path().join("out"))
        .unwrap()
        .filter_map(|e| e.unwrap().file_name().to_str()?.strip_prefix("checkpoint-")?.parse().ok())
        .collect();
    assert_eq!(stored.len(), 1, "one checkpoint, made on the signal: {stored:?}\n{}", coord.log());
    assert!(stored[0] > at_signal && stored[0] < total, "checkpoint-{} after step {at_signal} of {total}", stored[0]);
    assert!(coord.log().contains(&format!("checkpoint-{} stored", stored[0])), "{}", coord.log());
}
