//! The gRPC service `distill.v1.Coordinator` over [`Job`] and a [`CheckpointStore`],
//! plus grpc.health.v1, and the functions that start and run it.

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use qdistill_common::config::{ResumeFromCheckpoint, TrainConfig};
use qdistill_proto::v1 as pb;
use qdistill_proto::v1::coordinator_server::{Coordinator, CoordinatorServer};
use qdistill_proto::{PROTOCOL_VERSION, TOKEN_METADATA_KEY};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::convert;
use crate::metrics::{JobCollector, JobSnapshot, MetricsServer};
use crate::plan::TeacherPlacement;
use crate::state::{Continuity, HeartbeatAction, Job, JobSpec, LedgerStep, Phase, Refusal, StepRecord};
use crate::store::{write_file_atomic, CheckpointStore, FileDigest, LocalDirStore, StoreError};
use crate::CoordError;

/// Name of the ledger file the coordinator adds to every checkpoint.
pub const LEDGER_FILE: &str = "qdistill_ledger.json";
/// How long a stopping coordinator waits for open connections to close.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// Bytes per chunk of a checkpoint stream (well under gRPC's 4 MiB message limit).
pub const CHUNK_BYTES: usize = 1 << 20;

/// How the coordinator runs a job. Durations are wall-clock.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The job's shared secret; workers send it as `x-qdistill-token`. Must not be empty.
    pub token: String,
    /// Workers the first generation waits for.
    pub workers: usize,
    /// Later generations start with at least this many after `reform_grace`
    /// (default: as few as the teacher mode allows).
    pub min_workers: Option<usize>,
    /// Teacher ranks when the config has a separate teacher model.
    pub teacher_ranks: usize,
    /// Virtual data shards per step (default: the first generation's student count,
    /// at most gradient_accumulation_steps). Fixes the gradient summation order.
    pub shards: Option<usize>,
    pub lease: Duration,
    pub heartbeat_interval: Duration,
    /// How long a new generation waits for all `workers` after one ended (default: one
    /// lease).
    pub reform_grace: Option<Duration>,
    pub max_generations: u64,
    /// Where to serve Prometheus metrics (`host:port`, path /metrics); None: nowhere.
    pub metrics_addr: Option<String>,
    /// On SIGTERM, how long [`serve`] waits for student rank 0 to upload a checkpoint of
    /// the step in progress before it stops (zero: stop at once).
    pub drain_timeout: Duration,
    /// Serve gRPC over TLS with this certificate and key; workers then connect with
    /// `https://` URLs and the CA that signed it.
    pub tls: Option<ServerTls>,
}

/// PEM files of the coordinator's TLS identity.
#[derive(Debug, Clone)]
pub struct ServerTls {
    /// The certificate chain, leaf first.
    pub cert: PathBuf,
    /// The leaf's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

impl Default for ServeOptions {
    fn default() -> Self {
        Self {
            token: String::new(),
            workers: 1,
            min_workers: None,
            teacher_ranks: 1,
            shards: None,
            lease: Duration::from_secs(30),
            heartbeat_interval: Duration::from_secs(5),
            reform_grace: None,
            max_generations: 100,
            metrics_addr: None,
            drain_timeout: Duration::from_secs(60),
            tls: None,
        }
    }
}

/// A fresh random job token (128 bits, hex).
pub fn generate_token() -> String {
    format!("{:016x}{:016x}", rand::random::<u64>(), rand::random::<u64>())
}

/// The job a config describes. `total_steps` is the number of optimizer steps the
/// single-process run would take on the same config and data.
pub fn job_spec(cfg: &TrainConfig, total_steps: u64, opts: &ServeOptions) -> Result<JobSpec, CoordError> {
    let g = cfg.training.gradient_accumulation_steps.max(1);
    let placement = TeacherPlacement::from_mode(cfg.teacher.mode, opts.teacher_ranks);
    if total_steps == 0 {
        return Err(CoordError::Config("the job has no optimizer step to run".into()));
    }
    if opts.workers < placement.min_workers() {
        return Err(CoordError::Config(format!(
            "--workers {} is too few: this teacher mode needs at least {}",
            opts.workers,
            placement.min_workers()
        )));
    }
    let teachers = match placement {
        TeacherPlacement::Ranks(t) => t,
        TeacherPlacement::InStudent => 0,
    };
    let shards = opts.shards.unwrap_or(opts.workers - teachers).clamp(1, g);
    let lease_ms = opts.lease.as_millis() as u64;
    Ok(JobSpec {
        job_id: format!("{:08x}", rand::random::<u32>()),
        config_toml: cfg.to_toml_string().map_err(|e| CoordError::Config(e.to_string()))?,
        total_steps,
        micro_batches_per_step: g,
        shards,
        placement,
        save_steps: cfg.training.save_steps as u64,
        expected_workers: opts.workers,
        min_workers: opts.min_workers.unwrap_or(placement.min_workers()).max(placement.min_workers()),
        reform_grace_ms: opts.reform_grace.map_or(lease_ms, |d| d.as_millis() as u64),
        lease_ms,
        heartbeat_interval_ms: opts.heartbeat_interval.as_millis() as u64,
        max_generations: opts.max_generations,
    })
}

struct Shared {
    job: Mutex<Job>,
    store: Arc<dyn CheckpointStore>,
    started: Instant,
    /// Woken on every step commit and generation change.
    progress: Notify,
    /// Sessions that were told the job is over.
    told_stop: Mutex<HashSet<String>>,
    save_total_limit: Option<usize>,
    output_dir: PathBuf,
    /// Two students may upload the same step (a save point and a shutdown); publishing
    /// one at a time keeps the replace-by-rename of the store simple.
    publish: Mutex<()>,
    /// Set by a drain to the number of steps committed when it began (u64::MAX: no
    /// drain): rank 0's commits of later steps are answered with a checkpoint request
    /// until a checkpoint newer than that is stored. Not a flag, so that a commit of an
    /// older step, whose answer can be read after the drain began, asks for no checkpoint
    /// the drain would not count.
    drain_from: AtomicU64,
    /// When recent steps became committed, and their target tokens (for tokens/s).
    recent_commits: Mutex<VecDeque<(Instant, u64)>>,
    /// ce_weight and kd_weight·T², to report the loss as the single-process run logs it.
    loss_weights: (f64, f64),
    /// The job record as last written to `output_dir`.
    record: Mutex<JobRecord>,
}

impl Shared {
    fn now(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }
    /// What the Prometheus metrics report now.
    fn snapshot(&self) -> JobSnapshot {
        let now = self.now();
        let job = self.job();
        let st = job.status(now);
        let last = job.ledger().last().map(|l| {
            let (ce, kd, tokens) = l.ranks.iter().fold((0.0, 0.0, 0u64), |(c, k, t), r| (c + r.ce_sum, k + r.kd_sum, t + r.target_tokens));
            let t = tokens.max(1) as f64;
            (ce / t, kd / t)
        });
        let samples_done = job.ledger().iter().chain(job.rolled_back()).flat_map(|l| &l.ranks).map(|r| r.sample_ids.len() as u64).sum();
        drop(job);
        let (ce_w, kd_w) = self.loss_weights;
        let tokens_per_second = {
            let recent = self.recent_commits.lock().unwrap_or_else(|p| p.into_inner());
            // The first entry only marks when the window starts: its tokens were trained
            // before it.
            match (recent.front(), recent.back()) {
                (Some(&(t0, _)), Some(&(t1, _))) if t1 > t0 => {
                    Some(recent.iter().skip(1).map(|&(_, n)| n).sum::<u64>() as f64 / (t1 - t0).as_secs_f64())
                }
                _ => None,
            }
        };
        let checkpoint_age_seconds = st.last_checkpoint.and_then(|s| {
            let modified = std::fs::metadata(qdistill_common::checkpoint::checkpoint_dir(&self.output_dir, s)).ok()?.modified().ok()?;
            Some(modified.elapsed().map_or(0.0, |d| d.as_secs_f64()))
        });
        JobSnapshot {
            committed_steps: st.committed_steps,
            total_steps: st.total_steps,
            generation: st.generation,
            workers_alive: st.workers.len(),
            loss: last.map(|(ce, kd)| ce_w * ce + kd_w * kd),
            kd_loss: last.map(|(_, kd)| kd),
            tokens_per_second,
            samples_done,
            checkpoint_age_seconds,
        }
    }
    fn job(&self) -> MutexGuard<'_, Job> {
        // A panic while holding the lock leaves the job as it was at the last completed
        // call; the state machine has no multi-call invariants a half call could break.
        self.job.lock().unwrap_or_else(|p| p.into_inner())
    }
    /// Rewrites the job record if `job` moved on since it was last written. Called with
    /// the job locked, so records reach the disk in the order the changes happened.
    fn persist(&self, job: &Job) {
        let continuity = job.continuity();
        let mut last = self.record.lock().unwrap_or_else(|p| p.into_inner());
        if last.continuity == continuity {
            return;
        }
        let rec = JobRecord { continuity, ..last.clone() };
        match rec.write(&self.output_dir) {
            Ok(()) => *last = rec,
            // The job goes on; only a coordinator restart would miss the change.
            Err(e) => tracing::warn!("{e}"),
        }
    }
}

/// Name of the job record the coordinator keeps in output_dir (see [`JobRecord`]).
pub const JOB_RECORD_FILE: &str = "qdistill_job.json";

/// Which job an output_dir holds and how far it got beyond its checkpoints. A coordinator
/// started on an output_dir whose record names the same config continues that job: it
/// keeps the job id, resumes from the latest checkpoint, and numbers generations on.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct JobRecord {
    pub job_id: String,
    /// SHA-256 (hex) of the resolved job config: only the same job is continued.
    pub config_sha256: String,
    /// SHA-256 (hex) of the job id, a newline and the job token (salted by the id, so
    /// equal tokens of two jobs do not show): the workers keep the token they have, so a
    /// restart with another one would lock them out.
    pub token_sha256: String,
    pub total_steps: u64,
    /// How many coordinators have served the job, the current one included.
    pub coordinator_starts: u64,
    #[serde(flatten)]
    pub continuity: Continuity,
}

fn sha256_hex(data: &[u8]) -> String {
    <sha2::Sha256 as sha2::Digest>::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

fn token_sha256(job_id: &str, token: &str) -> String {
    sha256_hex(format!("{job_id}\n{token}").as_bytes())
}

impl JobRecord {
    pub fn read(output_dir: &std::path::Path) -> Result<Option<Self>, CoordError> {
        let path = output_dir.join(JOB_RECORD_FILE);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(CoordError::Io { what: path.display().to_string(), source: e }),
        };
        serde_json::from_slice(&bytes).map(Some).map_err(|e| {
            CoordError::Config(format!("{}: {e}; move it away to start the job over (its checkpoints stay usable with resume_from_checkpoint)", path.display()))
        })
    }

    pub fn write(&self, output_dir: &std::path::Path) -> Result<(), StoreError> {
        let path = output_dir.join(JOB_RECORD_FILE);
        let bytes = serde_json::to_vec_pretty(self).map_err(|e| StoreError::Io { path: path.clone(), source: e.into() })?;
        write_file_atomic(&path, &bytes)
    }
}

/// Metadata key on refusals that says which kind of refusal it is, so a worker can tell
/// "the job is over, exit cleanly" from a real error without reading the message.
pub const REFUSAL_METADATA_KEY: &str = "x-qdistill-refusal";

fn refusal(r: Refusal) -> Status {
    let msg = r.to_string();
    match r {
        Refusal::JobOver(_) => {
            let mut md = tonic::metadata::MetadataMap::new();
            md.insert(REFUSAL_METADATA_KEY, tonic::metadata::MetadataValue::from_static("job-over"));
            Status::with_metadata(tonic::Code::FailedPrecondition, msg, md)
        }
        Refusal::ProtocolVersion { .. } => Status::failed_precondition(msg),
        Refusal::UnknownSession(_) => Status::not_found(msg),
        Refusal::StaleGeneration { .. } => Status::aborted(msg),
        Refusal::Invalid(_) => Status::invalid_argument(msg),
    }
}

fn store_error(e: StoreError) -> Status {
    match e {
        StoreError::Invalid { .. } => Status::invalid_argument(e.to_string()),
        StoreError::Missing(_) => Status::not_found(e.to_string()),
        StoreError::Io { .. } => Status::internal(e.to_string()),
    }
}

/// Checks `x-qdistill-token` on every Coordinator call.
#[derive(Clone)]
pub struct TokenCheck {
    token: Arc<Vec<u8>>,
}

impl tonic::service::Interceptor for TokenCheck {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let Some(got) = req.metadata().get(TOKEN_METADATA_KEY) else {
            return Err(Status::unauthenticated(format!(
                "no job token: send the coordinator's token in the `{TOKEN_METADATA_KEY}` metadata (qdistill worker --token)"
            )));
        };
        // Constant time in the token's length, so timing does not leak a prefix.
        let got = got.as_bytes();
        let same = got.len() == self.token.len() && got.iter().zip(self.token.iter()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0;
        if same {
            Ok(req)
        } else {
            Err(Status::unauthenticated("the job token does not match this coordinator's"))
        }
    }
}

/// The tonic service.
#[derive(Clone)]
pub struct CoordinatorService {
    shared: Arc<Shared>,
}

type ChunkStream = Pin<Box<dyn Stream<Item = Result<pb::CheckpointChunk, Status>> + Send>>;

#[tonic::async_trait]
impl Coordinator for CoordinatorService {
    async fn register(&self, req: Request<pb::RegisterRequest>) -> Result<Response<pb::RegisterResponse>, Status> {
        let req = req.into_inner();
        let reg = convert::registration(req).map_err(refusal)?;
        let now = self.shared.now();
        let mut job = self.shared.job();
        let gen_before = job.generation();
        let phase_before = job.phase().clone();
        let r = job.register(reg, now).map_err(refusal)?;
        let job_id = job.spec().job_id.clone();
        if job.phase() != &phase_before || job.generation() != gen_before {
            self.shared.progress.notify_waiters();
            self.shared.persist(&job);
        }
        Ok(Response::new(pb::RegisterResponse {
            session_id: r.session_id,
            protocol_version: PROTOCOL_VERSION,
            job_id,
            heartbeat_interval_ms: r.heartbeat_interval_ms as u32,
            lease_ms: r.lease_ms as u32,
        }))
    }

    async fn heartbeat(&self, req: Request<pb::HeartbeatRequest>) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let req = req.into_inner();
        let now = self.shared.now();
        let (action, message, generation) = {
            let mut job = self.shared.job();
            let phase_before = job.phase().clone();
            let (a, m) = job.heartbeat(&req.session_id, req.generation, req.step, now);
            if job.phase() != &phase_before {
                self.shared.progress.notify_waiters();
                self.shared.persist(&job);
            }
            (a, m, job.generation())
        };
        if action == HeartbeatAction::Stop {
            self.shared.told_stop.lock().unwrap_or_else(|p| p.into_inner()).insert(req.session_id);
        }
        Ok(Response::new(pb::HeartbeatResponse { action: convert::heartbeat_action(action) as i32, generation, message }))
    }

    async fn get_work(&self, req: Request<pb::GetWorkRequest>) -> Result<Response<pb::GetWorkResponse>, Status> {
        let req = req.into_inner();
        let now = self.shared.now();
        let (work, config_toml) = {
            let mut job = self.shared.job();
            let gen_before = job.generation();
            let w = job.get_work(&req.session_id, now).map_err(refusal)?;
            if job.generation() != gen_before {
                self.shared.progress.notify_waiters();
                self.shared.persist(&job);
            }
            (w, job.spec().config_toml.clone())
        };
        if matches!(work, crate::state::Work::Stop { .. }) {
            self.shared.told_stop.lock().unwrap_or_else(|p| p.into_inner()).insert(req.session_id);
        }
        Ok(Response::new(convert::work(work, &config_toml)))
    }

    async fn step_commit(&self, req: Request<pb::StepCommitRequest>) -> Result<Response<pb::StepCommitResponse>, Status> {
        let req = req.into_inner();
        let now = self.shared.now();
        let rec = StepRecord {
            student_rank: req.student_rank as usize,
            micro_batches: req.micro_batches,
            sample_ids: req.sample_ids,
            ce_sum: req.ce_sum,
            kd_sum: req.kd_sum,
            target_tokens: req.target_tokens,
            grad_norm: req.grad_norm,
            learning_rate: req.learning_rate,
        };
        let (ack, newly_committed, drain) = {
            let mut job = self.shared.job();
            let before = job.ledger().len();
            let ack = job.step_commit(&req.session_id, req.generation, req.step, rec, now);
            self.shared.persist(&job);
            let ack = ack.map_err(refusal)?;
            let tokens: u64 = job.ledger()[before.min(job.ledger().len())..].iter().flat_map(|l| &l.ranks).map(|r| r.target_tokens).sum();
            // A draining coordinator wants one checkpoint newer than what was committed
            // when the drain began: asked of rank 0 for a later step, until one is stored
            // (read under the job lock, so never again once the drain has its checkpoint).
            let from = self.shared.drain_from.load(Ordering::SeqCst);
            let drain = req.student_rank == 0 && req.step >= from && job.last_checkpoint().is_none_or(|c| c <= from);
            (ack, (job.ledger().len() > before).then_some(tokens), drain)
        };
        if let Some(tokens) = newly_committed {
            let mut recent = self.shared.recent_commits.lock().unwrap_or_else(|p| p.into_inner());
            recent.push_back((Instant::now(), tokens));
            // Long enough to smooth one slow step, short enough to follow a change of pace.
            while recent.len() > 9 {
                recent.pop_front();
            }
        }
        self.shared.progress.notify_waiters();
        Ok(Response::new(pb::StepCommitResponse {
            committed: ack.committed,
            checkpoint_requested: ack.checkpoint_requested || drain,
            action: pb::HeartbeatAction::Continue as i32,
        }))
    }

    async fn upload_checkpoint(&self, req: Request<Streaming<pb::CheckpointChunk>>) -> Result<Response<pb::UploadCheckpointResponse>, Status> {
        let mut stream = req.into_inner();
        let header = match stream.message().await? {
            Some(pb::CheckpointChunk { kind: Some(pb::checkpoint_chunk::Kind::Header(h)) }) => h,
            _ => return Err(Status::invalid_argument("a checkpoint stream must start with its header")),
        };
        let step = header.step;
        self.shared.job().begin_checkpoint(&header.session_id, header.generation, step, self.shared.now()).map_err(refusal)?;
        let mut writer = self.shared.store.begin(step).map_err(store_error)?;
        let trailer = loop {
            match stream.message().await? {
                Some(pb::CheckpointChunk { kind: Some(pb::checkpoint_chunk::Kind::File(f)) }) => {
                    if f.path == LEDGER_FILE {
                        return Err(Status::invalid_argument(format!("{LEDGER_FILE} is written by the coordinator")));
                    }
                    writer.write(&f.path, f.offset, &f.data).map_err(store_error)?;
                }
                Some(pb::CheckpointChunk { kind: Some(pb::checkpoint_chunk::Kind::Trailer(t)) }) => break t,
                Some(_) => return Err(Status::invalid_argument("unexpected message in a checkpoint stream (a second header, or an empty chunk)")),
                None => return Err(Status::invalid_argument(format!("checkpoint-{step}: the stream ended before its trailer"))),
            }
        };
        let mut expected: Vec<FileDigest> = trailer.files.iter().map(convert::digest).collect::<Result<_, _>>().map_err(Status::invalid_argument)?;
        // The checkpoint is only valid once every student committed its steps, which can
        // trail rank 0's upload by a moment; wait for that, not for ever.
        let ledger = self.wait_for_ledger(step, header.generation).await?;
        let ledger_bytes = serde_json::to_vec_pretty(&ledger).map_err(|e| Status::internal(e.to_string()))?;
        writer.write(LEDGER_FILE, 0, &ledger_bytes).map_err(store_error)?;
        expected.push(FileDigest::of(LEDGER_FILE, &ledger_bytes));
        let total = self.shared.job().spec().total_steps;
        let bytes = {
            let _one_at_a_time = self.shared.publish.lock().unwrap_or_else(|p| p.into_inner());
            let bytes = writer.commit(&expected).map_err(store_error)?;
            if step == total {
                self.shared.store.finalize(step).map_err(store_error)?;
                self.write_job_ledger().map_err(|e| Status::internal(e.to_string()))?;
            }
            self.prune(step);
            bytes
        };
        {
            let mut job = self.shared.job();
            job.checkpoint_stored(step);
            self.shared.persist(&job);
            tracing::info!(step, bytes, phase = ?job.phase(), "checkpoint stored");
        }
        self.shared.progress.notify_waiters();
        Ok(Response::new(pb::UploadCheckpointResponse { step, bytes }))
    }

    type DownloadCheckpointStream = ChunkStream;

    async fn download_checkpoint(&self, req: Request<pb::DownloadCheckpointRequest>) -> Result<Response<ChunkStream>, Status> {
        let req = req.into_inner();
        {
            let job = self.shared.job();
            let st = job.status(self.shared.now());
            if !st.workers.iter().any(|w| w.session_id == req.session_id) {
                return Err(refusal(Refusal::UnknownSession(req.session_id)));
            }
        }
        let step = req.step;
        let files = self.shared.store.files(step).map_err(store_error)?;
        let store = self.shared.store.clone();
        let (tx, rx) = mpsc::channel(4);
        tokio::task::spawn_blocking(move || {
            let send = |kind| tx.blocking_send(Ok(pb::CheckpointChunk { kind: Some(kind) })).is_ok();
            if !send(pb::checkpoint_chunk::Kind::Header(pb::CheckpointHeader { session_id: String::new(), generation: 0, step })) {
                return;
            }
            let mut digests = Vec::new();
            for path in files {
                let mut r = match store.open(step, &path) {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = tx.blocking_send(Err(store_error(e)));
                        return;
                    }
                };
                let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
                let mut offset = 0u64;
                loop {
                    let mut buf = vec![0u8; CHUNK_BYTES];
                    let n = match read_full(&mut r, &mut buf) {
                        Ok(n) => n,
                        Err(e) => {
                            let _ = tx.blocking_send(Err(Status::internal(format!("checkpoint-{step}/{path}: {e}"))));
                            return;
                        }
                    };
                    buf.truncate(n);
                    sha2::Digest::update(&mut hasher, &buf);
                    // Empty files still need one chunk so the receiver creates them.
                    if n > 0 || offset == 0 {
                        let chunk = pb::FileChunk { path: path.clone(), offset, data: buf };
                        if !send(pb::checkpoint_chunk::Kind::File(chunk)) {
                            return;
                        }
                    }
                    offset += n as u64;
                    if n < CHUNK_BYTES {
                        break;
                    }
                }
                digests.push(pb::FileDigest { path, size: offset, sha256: sha2::Digest::finalize(hasher).to_vec() });
            }
            let _ = send(pb::checkpoint_chunk::Kind::Trailer(pb::CheckpointTrailer { files: digests }));
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx)) as ChunkStream))
    }

    async fn job_status(&self, _req: Request<pb::JobStatusRequest>) -> Result<Response<pb::JobStatusResponse>, Status> {
        let st = self.shared.job().status(self.shared.now());
        Ok(Response::new(convert::status(st)))
    }

    async fn exchange_nccl_id(&self, req: Request<pb::ExchangeNcclIdRequest>) -> Result<Response<pb::ExchangeNcclIdResponse>, Status> {
        let req = req.into_inner();
        let offer = (!req.offer.is_empty()).then_some(req.offer);
        let offered = offer.is_some();
        // Members usually ask before the root (which first makes the id) offers: hold the
        // call open a little instead of making them poll fast.
        let deadline = tokio::time::Instant::now() + NCCL_ID_WAIT;
        loop {
            let notified = self.shared.progress.notified();
            let got = self.shared.job().exchange_nccl_id(&req.session_id, req.generation, &req.group, offer.clone()).map_err(refusal)?;
            if let Some(unique_id) = got {
                if offered {
                    self.shared.progress.notify_waiters();
                }
                return Ok(Response::new(pb::ExchangeNcclIdResponse { unique_id }));
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Ok(Response::new(pb::ExchangeNcclIdResponse { unique_id: Vec::new() }));
            }
        }
    }
}

/// How long ExchangeNcclId waits for the root's offer before answering "not yet".
const NCCL_ID_WAIT: Duration = Duration::from_secs(10);

fn read_full(r: &mut dyn std::io::Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

impl CoordinatorService {
    async fn wait_for_ledger(&self, step: u64, generation: u64) -> Result<Vec<LedgerStep>, Status> {
        let lease = Duration::from_millis(self.shared.job().spec().lease_ms);
        let deadline = tokio::time::Instant::now() + 2 * lease;
        loop {
            let notified = self.shared.progress.notified();
            {
                let job = self.shared.job();
                if job.generation() != generation || job.phase() != &Phase::Running {
                    return Err(Status::aborted(format!("generation {generation} ended before checkpoint-{step} was committed")));
                }
                if let Some(l) = job.ledger_before(step) {
                    return Ok(l);
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(Status::deadline_exceeded(format!("checkpoint-{step}: not every student committed step {} in time", step - 1)));
            }
        }
    }

    fn write_job_ledger(&self) -> std::io::Result<()> {
        let (ledger, rolled_back) = {
            let job = self.shared.job();
            (job.ledger().to_vec(), job.rolled_back().to_vec())
        };
        let doc = serde_json::json!({ "steps": ledger, "rolled_back": rolled_back });
        let path = self.shared.output_dir.join("ledger.json");
        let tmp = self.shared.output_dir.join(".ledger.json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&doc)?)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, &path)
    }

    /// Keeps the newest `save_total_limit` checkpoints, as HF does.
    fn prune(&self, newest: u64) {
        let Some(limit) = self.shared.save_total_limit else { return };
        let Ok(steps) = self.shared.store.list() else { return };
        let keep_from = steps.len().saturating_sub(limit.max(1));
        for &s in &steps[..keep_from] {
            if s != newest {
                if let Err(e) = self.shared.store.remove(s) {
                    tracing::warn!("pruning checkpoint-{s}: {e}");
                }
            }
        }
    }
}

/// What a finished job reports.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub phase: Phase,
    pub committed_steps: u64,
    pub generation: u64,
    pub output_dir: PathBuf,
    /// Why each earlier generation ended, oldest first.
    pub ended_generations: Vec<String>,
}

/// A coordinator serving in the background of a tokio runtime.
pub struct RunningCoordinator {
    addr: SocketAddr,
    /// "https" when serving TLS.
    scheme: &'static str,
    task: tokio::task::JoinHandle<Result<Outcome, CoordError>>,
    handle: CoordinatorHandle,
    /// Serves until the coordinator is dropped.
    metrics: Option<MetricsServer>,
}

/// Acts on a running coordinator while [`RunningCoordinator::wait`] owns it: the signal
/// handler of [`serve`], or a process that runs its workers in threads of its own.
#[derive(Clone)]
pub struct CoordinatorHandle {
    shared: Arc<Shared>,
    stop: Arc<Mutex<Option<oneshot::Sender<()>>>>,
}

impl CoordinatorHandle {
    /// The numbers the metrics endpoint reports.
    pub fn snapshot(&self) -> JobSnapshot {
        self.shared.snapshot()
    }
    /// See [`RunningCoordinator::drain`].
    pub fn drain(&self, timeout: Duration) -> impl std::future::Future<Output = Option<u64>> + Send + 'static {
        let shared = self.shared.clone();
        async move { drain(&shared, timeout).await }
    }
    /// Ends a job that is not over yet as failed, with `why`: every worker is told to
    /// stop at its next call, as when the generation limit is reached.
    pub fn fail(&self, why: impl Into<String>) {
        let mut job = self.shared.job();
        if matches!(job.phase(), Phase::Done | Phase::Failed(_)) {
            return;
        }
        let why = why.into();
        tracing::warn!("the job ends: {why}");
        job.fail(why);
        drop(job);
        self.shared.progress.notify_waiters();
    }
    /// Stops serving now, whatever the job's state.
    pub fn shutdown(&self) {
        if let Some(tx) = self.stop.lock().unwrap_or_else(|p| p.into_inner()).take() {
            let _ = tx.send(());
        }
    }
}

impl RunningCoordinator {
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
    /// The URL workers connect to.
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme, self.addr)
    }
    /// Where the Prometheus metrics are served, when they are.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(|m| m.local_addr())
    }
    /// The numbers the metrics endpoint reports.
    pub fn snapshot(&self) -> JobSnapshot {
        self.handle.snapshot()
    }
    /// A handle that stays usable while [`Self::wait`] runs.
    pub fn handle(&self) -> CoordinatorHandle {
        self.handle.clone()
    }
    /// Asks student rank 0 to upload a checkpoint after the step in progress and waits,
    /// at most `timeout`, until one newer than the last committed step is stored. Returns
    /// its step, or None when no generation is running or none arrived in time. Steps
    /// committed since the last save point would otherwise be trained again after a
    /// restart.
    pub fn drain(&self, timeout: Duration) -> impl std::future::Future<Output = Option<u64>> + Send + 'static {
        self.handle.drain(timeout)
    }
    /// Stops serving now, whatever the job's state.
    pub fn shutdown(&mut self) {
        self.handle.shutdown();
    }
    /// Runs until the job is over and every worker was told so (or its lease ran out),
    /// or until [`Self::shutdown`].
    pub async fn wait(self) -> Result<Outcome, CoordError> {
        self.task.await.map_err(|e| CoordError::Config(format!("coordinator task: {e}")))?
    }
}

/// See [`RunningCoordinator::drain`].
async fn drain(shared: &Shared, timeout: Duration) -> Option<u64> {
    let from = {
        let job = shared.job();
        if job.phase() != &Phase::Running {
            return None;
        }
        job.committed_steps()
    };
    shared.drain_from.store(from, Ordering::SeqCst);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let notified = shared.progress.notified();
        {
            let job = shared.job();
            if let Some(c) = job.last_checkpoint().filter(|&c| c > from) {
                return Some(c);
            }
            if job.phase() != &Phase::Running {
                return None;
            }
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            return None;
        }
    }
}

/// Where the job starts: from scratch, or from a checkpoint the store already has.
fn initial_state(cfg: &TrainConfig, store: &dyn CheckpointStore) -> Result<Option<(u64, Vec<LedgerStep>)>, CoordError> {
    let stored = store.list()?;
    let step = match (&cfg.training.resume_from_checkpoint, stored.last()) {
        (None, None) => return Ok(None),
        (None, Some(&s)) => {
            return Err(CoordError::Config(format!(
                "{} already holds checkpoint-{s}; set training.resume_from_checkpoint = true to continue that run, or pick another output_dir",
                cfg.output_dir.display()
            )))
        }
        (Some(ResumeFromCheckpoint::Latest), None) => return Ok(None),
        (Some(ResumeFromCheckpoint::Latest), Some(&s)) => s,
        (Some(ResumeFromCheckpoint::Path(p)), _) => {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let inside = p.parent().is_some_and(|d| d == cfg.output_dir);
            match name.strip_prefix("checkpoint-").and_then(|n| n.parse::<u64>().ok()) {
                Some(s) if inside && stored.contains(&s) => s,
                _ => {
                    return Err(CoordError::Config(format!(
                        "cluster runs resume from a checkpoint-N directory in output_dir ({}); {} is not one",
                        cfg.output_dir.display(),
                        p.display()
                    )))
                }
            }
        }
    };
    stored_checkpoint(store, step).map(Some)
}

/// checkpoint-<step> of the store with the ledger of the steps it holds.
fn stored_checkpoint(store: &dyn CheckpointStore, step: u64) -> Result<(u64, Vec<LedgerStep>), CoordError> {
    let mut text = String::new();
    let ledger: Vec<LedgerStep> = match store.open(step, LEDGER_FILE) {
        Ok(mut r) => {
            r.read_to_string(&mut text).map_err(|e| CoordError::Config(format!("checkpoint-{step}/{LEDGER_FILE}: {e}")))?;
            serde_json::from_str(&text).map_err(|e| CoordError::Config(format!("checkpoint-{step}/{LEDGER_FILE}: {e}")))?
        }
        // A checkpoint written by a single-process run has no ledger.
        Err(_) => Vec::new(),
    };
    Ok((step, ledger))
}

/// The job this coordinator serves: the job of `output_dir`'s record when the record
/// names the same config and step count (a restarted coordinator), else a new one that
/// starts as `initial_state` says. Writes the record either way.
fn open_job(cfg: &TrainConfig, mut spec: JobSpec, token: &str, store: &dyn CheckpointStore) -> Result<(Job, JobRecord), CoordError> {
    let config_sha256 = sha256_hex(spec.config_toml.as_bytes());
    let previous = JobRecord::read(&cfg.output_dir)?.filter(|r| r.config_sha256 == config_sha256 && r.total_steps == spec.total_steps);
    let (job, record) = match previous {
        Some(prev) => {
            if prev.token_sha256 != token_sha256(&prev.job_id, token) {
                return Err(CoordError::Config(format!(
                    "{} holds job {} started with another token; its workers still send that one: pass the same --token (QDISTILL_TOKEN) to continue it, or pick another output_dir",
                    cfg.output_dir.display(),
                    prev.job_id
                )));
            }
            spec.job_id = prev.job_id.clone();
            let checkpoint = match store.list()?.last() {
                Some(&step) => Some(stored_checkpoint(store, step)?),
                None => None,
            };
            let starts = prev.coordinator_starts + 1;
            tracing::warn!(
                job_id = %prev.job_id,
                "continuing the job of {} (coordinator start {starts}) from {}",
                cfg.output_dir.display(),
                checkpoint.as_ref().map_or("step 0".to_string(), |(s, _)| format!("checkpoint-{s}"))
            );
            let job = Job::restarted(spec, checkpoint, prev.continuity.clone(), starts, 0);
            (job, JobRecord { coordinator_starts: starts, ..prev })
        }
        None => {
            let resume = initial_state(cfg, store)?;
            let record = JobRecord {
                job_id: spec.job_id.clone(),
                config_sha256,
                token_sha256: token_sha256(&spec.job_id, token),
                total_steps: spec.total_steps,
                coordinator_starts: 1,
                continuity: Continuity::default(),
            };
            (Job::new(spec, resume, 0), record)
        }
    };
    let record = JobRecord { continuity: job.continuity(), ..record };
    record.write(&cfg.output_dir)?;
    Ok((job, record))
}

use std::io::Read as _;

/// Reads the coordinator's TLS identity, naming the file that cannot be read. Whether
/// the PEM holds a usable certificate and key is checked when the server starts.
fn server_tls(t: &ServerTls) -> Result<tonic::transport::ServerTlsConfig, CoordError> {
    let read = |p: &PathBuf, what: &str| std::fs::read(p).map_err(|e| CoordError::Io { what: format!("TLS {what} {}", p.display()), source: e });
    let (cert, key) = (read(&t.cert, "certificate")?, read(&t.key, "private key")?);
    Ok(tonic::transport::ServerTlsConfig::new().identity(tonic::transport::Identity::from_pem(cert, key)))
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Starts serving `cfg`'s job on `listener` (inside a tokio runtime).
pub async fn start(cfg: &TrainConfig, total_steps: u64, listener: tokio::net::TcpListener, opts: ServeOptions) -> Result<RunningCoordinator, CoordError> {
    if opts.token.is_empty() {
        return Err(CoordError::Config("the job token is empty; pass --token (or let the CLI generate one)".into()));
    }
    let spec = job_spec(cfg, total_steps, &opts)?;
    let store: Arc<dyn CheckpointStore> = Arc::new(LocalDirStore::new(&cfg.output_dir)?);
    let tls = opts.tls.as_ref().map(server_tls).transpose()?;
    let scheme = if opts.tls.is_some() { "https" } else { "http" };
    let mut builder = tonic::transport::Server::builder();
    if let (Some(tls), Some(files)) = (tls, &opts.tls) {
        builder = builder.tls_config(tls).map_err(|e| {
            CoordError::Config(format!("TLS certificate {} / key {}: {}", files.cert.display(), files.key.display(), source_chain(&e)))
        })?;
    }
    let (job, record) = open_job(cfg, spec, &opts.token, store.as_ref())?;
    let lease = opts.lease;
    let tick = (lease / 4).clamp(Duration::from_millis(20), Duration::from_millis(500));
    let shared = Arc::new(Shared {
        job: Mutex::new(job),
        store,
        started: Instant::now(),
        progress: Notify::new(),
        told_stop: Mutex::new(HashSet::new()),
        save_total_limit: cfg.training.save_total_limit,
        output_dir: cfg.output_dir.clone(),
        publish: Mutex::new(()),
        drain_from: AtomicU64::new(u64::MAX),
        recent_commits: Mutex::new(VecDeque::new()),
        loss_weights: (cfg.distill.ce_weight, cfg.distill.kd_weight * cfg.distill.temperature.powi(2)),
        record: Mutex::new(record),
    });
    let metrics = match &opts.metrics_addr {
        Some(addr) => {
            let mut registry = prometheus_client::registry::Registry::default();
            let source = shared.clone();
            registry.register_collector(Box::new(JobCollector::new(move || source.snapshot())));
            Some(MetricsServer::start(addr, registry)?)
        }
        None => None,
    };
    let addr = listener.local_addr().map_err(|e| CoordError::Io { what: "listening socket".into(), source: e })?;
    let svc = CoordinatorServer::with_interceptor(CoordinatorService { shared: shared.clone() }, TokenCheck { token: Arc::new(opts.token.into_bytes()) });
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<CoordinatorServer<CoordinatorService>>().await;
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    let watcher = shared.clone();
    let watcher_shared = shared.clone();
    let task = tokio::spawn(async move {
        // Leases run out even when nobody calls, and a finished job lingers until every
        // worker heard that it is over (or could no longer be waiting for an answer).
        let done = async {
            let mut over_since: Option<u64> = None;
            loop {
                tokio::time::sleep(tick).await;
                let now = watcher.now();
                let mut job = watcher.job();
                let gen = job.generation();
                job.expire(now);
                if job.generation() != gen || job.phase() == &Phase::Forming {
                    watcher.progress.notify_waiters();
                }
                watcher.persist(&job);
                if matches!(job.phase(), Phase::Done | Phase::Failed(_)) {
                    let since = *over_since.get_or_insert(now);
                    let told = watcher.told_stop.lock().unwrap_or_else(|p| p.into_inner());
                    let all_told = job.status(now).workers.iter().all(|w| told.contains(&w.session_id));
                    if all_told || now - since >= job.spec().lease_ms {
                        return;
                    }
                }
            }
        };
        let (fired_tx, fired_rx) = oneshot::channel::<()>();
        let signal = async move {
            tokio::select! {
                _ = done => {}
                _ = stop_rx => {}
            }
            let _ = fired_tx.send(());
        };
        let server = builder
            .add_service(health)
            .add_service(svc)
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), signal);
        // A graceful shutdown waits for every connection to close; a hung worker never
        // closes its own, so after a grace period the rest are dropped.
        let grace = async {
            if fired_rx.await.is_ok() {
                tokio::time::sleep(SHUTDOWN_GRACE).await;
            } else {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            r = server => r.map_err(|e| CoordError::Transport(e.to_string()))?,
            _ = grace => tracing::warn!("connections still open {SHUTDOWN_GRACE:?} after shutdown began; closing them"),
        }
        let job = shared.job();
        let st = job.status(shared.now());
        Ok(Outcome {
            phase: st.phase,
            committed_steps: st.committed_steps,
            generation: st.generation,
            output_dir: shared.output_dir.clone(),
            ended_generations: st.ended_generations,
        })
    });
    tracing::info!(%addr, tls = scheme == "https", "coordinator listening");
    let handle = CoordinatorHandle { shared: watcher_shared, stop: Arc::new(Mutex::new(Some(stop_tx))) };
    Ok(RunningCoordinator { addr, scheme, task, handle, metrics })
}

/// `qdistill coordinator`: serves `cfg`'s job on `addr` until it is over, or until Ctrl-C
/// / SIGTERM. Blocks; builds its own runtime.
pub fn serve(cfg: &TrainConfig, total_steps: u64, addr: &str, opts: ServeOptions) -> Result<Outcome, CoordError> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| CoordError::Io { what: "tokio runtime".into(), source: e })?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| CoordError::Io { what: format!("binding {addr}"), source: e })?;
        let drain_timeout = opts.drain_timeout;
        let running = start(cfg, total_steps, listener, opts).await?;
        let handle = running.handle();
        let drain = running.drain(drain_timeout);
        let on_signal = tokio::spawn(async move {
            crate::shutdown_signal().await;
            if !drain_timeout.is_zero() {
                tracing::warn!("signal received; asking for a checkpoint of the step in progress (at most {drain_timeout:?})");
                match drain.await {
                    Some(step) => tracing::info!("checkpoint-{step} stored"),
                    None => tracing::warn!("no new checkpoint before stopping; a restart resumes from the last one"),
                }
            }
            tracing::warn!("the coordinator stops (the job is on disk: the same command with the same token continues it)");
            handle.shutdown();
        });
        let r = running.wait().await;
        on_signal.abort();
        r
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use qdistill_common::config::{parse, ConfigFormat};

    fn config(out: &std::path::Path, learning_rate: &str) -> TrainConfig {
        let text = format!(
            "output_dir = {:?}\n[model]\nmodel_name_or_path = \"m\"\n[data]\ntrain_file = \"t.jsonl\"\n[training]\nlearning_rate = {learning_rate}\nsave_steps = 2\n",
            out.display().to_string()
        );
        parse(&text, ConfigFormat::Toml, "test config", &[]).unwrap()
    }

    fn opts(token: &str) -> ServeOptions {
        ServeOptions { token: token.into(), ..ServeOptions::default() }
    }

    /// Stores checkpoint-<step> the way the upload path does: files, then the ledger.
    fn store_checkpoint(store: &LocalDirStore, step: u64, ledger: &[LedgerStep]) {
        let mut w = store.begin(step).unwrap();
        let ledger = serde_json::to_vec(ledger).unwrap();
        w.write("adapter_model.safetensors", 0, b"weights").unwrap();
        w.write(LEDGER_FILE, 0, &ledger).unwrap();
        w.commit(&[FileDigest::of("adapter_model.safetensors", b"weights"), FileDigest::of(LEDGER_FILE, &ledger)]).unwrap();
    }

    /// A second coordinator on the same output_dir, config and token continues the first
    /// one's job (same id, from its latest checkpoint and ledger); another token or
    /// another config does not.
    #[test]
    fn a_coordinator_started_on_its_own_output_dir_continues_the_job() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), "1e-4");
        let store = LocalDirStore::new(dir.path()).unwrap();
        let (first, rec) = open_job(&cfg, job_spec(&cfg, 6, &opts("tok")).unwrap(), "tok", &store).unwrap();
        assert_eq!((rec.coordinator_starts, first.committed_steps()), (1, 0));
        let job_id = first.spec().job_id.clone();
        let on_disk = JobRecord::read(dir.path()).unwrap().unwrap();
        assert_eq!(on_disk, rec);

        let ledger: Vec<LedgerStep> = (0..2).map(|step| LedgerStep { step, generation: 1, ranks: vec![] }).collect();
        store_checkpoint(&store, 2, &ledger);
        let mut record = on_disk.clone();
        record.continuity.generation = 1;
        record.write(dir.path()).unwrap();

        let (again, rec) = open_job(&cfg, job_spec(&cfg, 6, &opts("tok")).unwrap(), "tok", &store).unwrap();
        assert_eq!(again.spec().job_id, job_id, "the job keeps its id");
        assert_eq!((again.committed_steps(), again.ledger(), again.resume_step()), (2, &ledger[..], Some(2)));
        assert_eq!((rec.coordinator_starts, rec.continuity.generation), (2, 1));
        assert_eq!(JobRecord::read(dir.path()).unwrap().unwrap().coordinator_starts, 2);

        let e = open_job(&cfg, job_spec(&cfg, 6, &opts("other")).unwrap(), "other", &store).err().unwrap().to_string();
        assert!(e.contains("another token") && e.contains(&job_id), "{e}");
        // Another config (or step count) is another job, and the stored checkpoint is
        // not silently taken over.
        let changed = config(dir.path(), "2e-4");
        let e = open_job(&changed, job_spec(&changed, 6, &opts("tok")).unwrap(), "tok", &store).err().unwrap().to_string();
        assert!(e.contains("already holds checkpoint-2"), "{e}");
        let e = open_job(&cfg, job_spec(&cfg, 7, &opts("tok")).unwrap(), "tok", &store).err().unwrap().to_string();
        assert!(e.contains("already holds checkpoint-2"), "{e}");
    }

    /// `fail` ends a running job with the first reason given, and the coordinator, with no
    /// worker left to tell, stops serving.
    #[test]
    fn a_job_failed_through_the_handle_keeps_the_first_reason_and_stops() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), "1e-4");
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let outcome = rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let running = start(&cfg, 6, listener, opts("tok")).await.unwrap();
            let handle = running.handle();
            handle.fail("worker-1 (cpu): out of memory");
            handle.fail("a later reason");
            tokio::time::timeout(Duration::from_secs(30), running.wait()).await.expect("the coordinator kept serving").unwrap()
        });
        assert_eq!(outcome.phase, Phase::Failed("worker-1 (cpu): out of memory".into()));
        assert_eq!(outcome.committed_steps, 0);
    }

    #[test]
    fn a_damaged_job_record_is_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(JOB_RECORD_FILE), b"{ not json").unwrap();
        let e = JobRecord::read(dir.path()).unwrap_err().to_string();
        assert!(e.contains(JOB_RECORD_FILE) && e.contains("move it away"), "{e}");
    }
}
