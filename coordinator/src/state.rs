//! The job state machine: registrations, leases, generations, step commits and the
//! per-sample ledger. No I/O and no clock: every call takes `now_ms` (monotonic
//! milliseconds), so tests drive time by hand.
//!
//! Life of a job: `Forming` until enough workers registered → a generation is formed
//! (roles and ranks assigned) → `Running`. A member whose lease expires, or who reports
//! that it left (a broken collective), ends the generation: every member's registration
//! is dropped (they re-register), the job rolls back to the last stored checkpoint whose
//! step every student committed, and forms the next generation. After the last step's
//! checkpoint is stored the job is `Done`.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::plan::{plan_topology, Resources, ShardPlan, TeacherPlacement, Topology};

/// What the job is; fixed for its lifetime.
#[derive(Debug, Clone)]
pub struct JobSpec {
    pub job_id: String,
    /// The resolved job config, sent to every worker.
    pub config_toml: String,
    pub total_steps: u64,
    /// gradient_accumulation_steps.
    pub micro_batches_per_step: usize,
    /// Virtual shards of each step (see [`crate::plan`]); fixes the gradient summation
    /// order for the whole job.
    pub shards: usize,
    pub placement: TeacherPlacement,
    /// Optimizer steps between checkpoints; 0 = only the final one.
    pub save_steps: u64,
    /// The first generation waits for this many workers.
    pub expected_workers: usize,
    /// Later generations wait `reform_grace_ms` for `expected_workers`, then start with at
    /// least this many.
    pub min_workers: usize,
    pub reform_grace_ms: u64,
    pub lease_ms: u64,
    pub heartbeat_interval_ms: u64,
    /// The job fails when it would need to form more generations than this.
    pub max_generations: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Teacher,
    Student,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub rank: usize,
    pub role: Role,
    pub role_rank: usize,
    pub collective_addr: String,
    pub worker_name: String,
    /// Can join NCCL communicators (see [`Assignment::nccl`]).
    pub nccl: bool,
}

/// A worker's part in one generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub generation: u64,
    pub role: Role,
    pub rank: usize,
    pub role_rank: usize,
    pub peers: Vec<Peer>,
    /// First step to run; when `resume` is set, from checkpoint-<start_step>.
    pub start_step: u64,
    pub resume: bool,
    pub total_steps: u64,
    pub save_steps: u64,
    pub plan: ShardPlan,
}

impl Assignment {
    /// Whether this generation moves teacher outputs and gradients over NCCL: only when
    /// every peer can, so that all members decide the same.
    pub fn nccl(&self) -> bool {
        !self.peers.is_empty() && self.peers.iter().all(|p| p.nccl)
    }
}

/// Names of the NCCL communicators a generation forms, and the rank that makes each id.
pub const NCCL_GROUPS: &[&str] = &["world", "students"];

/// Size of an `ncclUniqueId`.
pub const NCCL_UNIQUE_ID_BYTES: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    Forming,
    Running,
    Done,
    Failed(String),
}

/// Why a request was refused. The service maps these to gRPC status codes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("this worker speaks protocol version {worker} but the coordinator speaks version {coordinator}; run the same qdistill release on both")]
    ProtocolVersion { worker: u32, coordinator: u32 },
    #[error("the job has ended ({0}); no more workers are needed")]
    JobOver(String),
    #[error("unknown session {0:?} (its lease expired or its generation ended); register again")]
    UnknownSession(String),
    #[error("generation {got} has ended; the job is at generation {current}; register again")]
    StaleGeneration { got: u64, current: u64 },
    #[error("{0}")]
    Invalid(String),
}

/// A registration request, already decoded.
#[derive(Debug, Clone)]
pub struct Registration {
    pub protocol_version: u32,
    pub worker_name: String,
    pub resources: Resources,
    pub collective_addr: String,
    /// The session this worker held before, when it left a broken generation.
    pub previous_session: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    pub session_id: String,
    pub lease_ms: u64,
    pub heartbeat_interval_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeartbeatAction {
    Continue,
    Reregister,
    Stop,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Work {
    Wait { retry_after_ms: u64, reason: String },
    Assign(Assignment),
    Stop { phase: Phase, reason: String },
}

/// What one student rank reports for one step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub student_rank: usize,
    /// Global batch indices of the data stream (step × G + micro).
    pub micro_batches: Vec<u64>,
    /// Training-set sample indices of those batches.
    pub sample_ids: Vec<u64>,
    pub ce_sum: f64,
    pub kd_sum: f64,
    pub target_tokens: u64,
    pub grad_norm: f64,
    pub learning_rate: f64,
}

/// One step of the ledger: what every student rank trained in it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LedgerStep {
    pub step: u64,
    pub generation: u64,
    pub ranks: Vec<StepRecord>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitAck {
    /// Every student has now committed this step.
    pub committed: bool,
    /// Student rank 0 should upload checkpoint-<step+1>.
    pub checkpoint_requested: bool,
}

#[derive(Debug, Clone)]
struct Session {
    name: String,
    resources: Resources,
    collective_addr: String,
    seq: u64,
    lease_until_ms: u64,
    last_seen_ms: u64,
    step: u64,
}

/// A row of the status table.
#[derive(Debug, Clone, PartialEq)]
pub struct WorkerRow {
    pub session_id: String,
    pub worker_name: String,
    pub role: Option<Role>,
    pub rank: Option<usize>,
    pub generation: u64,
    pub step: u64,
    pub last_seen_ms_ago: u64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    pub job_id: String,
    pub phase: Phase,
    pub generation: u64,
    pub committed_steps: u64,
    pub total_steps: u64,
    pub last_checkpoint: Option<u64>,
    pub workers: Vec<WorkerRow>,
    pub message: String,
    /// Why each earlier generation ended, oldest first.
    pub ended_generations: Vec<String>,
}

pub struct Job {
    spec: JobSpec,
    phase: Phase,
    /// Number of the latest generation formed (0: none yet).
    generation: u64,
    forming_since_ms: u64,
    next_seq: u64,
    sessions: BTreeMap<String, Session>,
    /// Members of the running generation.
    members: BTreeMap<String, Assignment>,
    committed_steps: u64,
    pending: BTreeMap<u64, BTreeMap<usize, StepRecord>>,
    checkpoints: BTreeSet<u64>,
    ledger: Vec<LedgerStep>,
    /// Steps trained by a generation that ended before they were checkpointed; their
    /// effect was discarded and they were trained again.
    rolled_back: Vec<LedgerStep>,
    message: String,
    ended_generations: Vec<String>,
    /// NCCL unique ids offered by the roots of the current generation's groups.
    nccl_ids: BTreeMap<(u64, String), Vec<u8>>,
    /// How many coordinators have served this job, this one included; session ids of a
    /// restarted coordinator carry it, so none can be mistaken for a session of the
    /// coordinator before.
    incarnation: u64,
}

/// What a job's checkpoints do not hold but a restarted coordinator needs to continue
/// the job rather than start it over. The service keeps it on disk beside the
/// checkpoints, rewritten whenever it changes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Continuity {
    /// The latest generation formed; a restarted coordinator numbers on from it, so the
    /// generation limit counts every generation of the job.
    pub generation: u64,
    pub ended_generations: Vec<String>,
    pub rolled_back: Vec<LedgerStep>,
    /// Steps committed, wholly or by some ranks, after the latest stored checkpoint. They
    /// die with the coordinator's memory, so a restart trains them again and lists them
    /// as rolled back.
    pub uncheckpointed: Vec<LedgerStep>,
}

impl Job {
    /// A job that starts from scratch, or from `resume` (a checkpoint step already in the
    /// store, with the ledger of the steps before it).
    pub fn new(spec: JobSpec, resume: Option<(u64, Vec<LedgerStep>)>, now_ms: u64) -> Self {
        let (committed_steps, checkpoints, ledger) = match resume {
            Some((step, ledger)) => (step, BTreeSet::from([step]), ledger),
            None => (0, BTreeSet::new(), Vec::new()),
        };
        let mut job = Self {
            message: format!("waiting for {} worker(s)", spec.expected_workers),
            spec,
            phase: Phase::Forming,
            generation: 0,
            forming_since_ms: now_ms,
            next_seq: 0,
            sessions: BTreeMap::new(),
            members: BTreeMap::new(),
            committed_steps,
            pending: BTreeMap::new(),
            checkpoints,
            ledger,
            rolled_back: Vec::new(),
            ended_generations: Vec::new(),
            nccl_ids: BTreeMap::new(),
            incarnation: 1,
        };
        job.check_done();
        job
    }

    /// The job as a restarted coordinator continues it: from `checkpoint` (the latest
    /// stored one, with its ledger), numbering generations on from `before.generation`.
    /// `incarnation` counts the coordinators that served the job, this one included.
    pub fn restarted(spec: JobSpec, checkpoint: Option<(u64, Vec<LedgerStep>)>, before: Continuity, incarnation: u64, now_ms: u64) -> Self {
        let mut job = Self::new(spec, checkpoint, now_ms);
        let resume = job.committed_steps;
        job.incarnation = incarnation.max(1);
        job.generation = before.generation;
        job.ended_generations = before.ended_generations;
        job.rolled_back = before.rolled_back;
        // Steps the checkpoint already holds were recorded as uncheckpointed only if the
        // coordinator died between storing it and rewriting its record.
        job.rolled_back.extend(before.uncheckpointed.into_iter().filter(|l| l.step >= resume));
        let running = job.ended_generations.len() < job.generation as usize;
        if running && !job.is_over() {
            // The restart ended that generation like a lost worker would have.
            let why = format!("the coordinator restarted during generation {}", job.generation);
            job.ended_generations.push(why.clone());
            if job.generation >= job.spec.max_generations {
                job.phase = Phase::Failed(format!("{why}; {} generations formed, the limit is {}", job.generation, job.spec.max_generations));
            }
        }
        if !job.is_over() {
            job.message = format!("coordinator restarted; resuming from step {resume}, waiting for workers to register again");
        }
        job
    }

    /// The state a restarted coordinator needs (see [`Continuity`]).
    pub fn continuity(&self) -> Continuity {
        let checkpointed = self.checkpoints.iter().next_back().copied().unwrap_or(0);
        let mut uncheckpointed: Vec<LedgerStep> = self.ledger.iter().filter(|l| l.step >= checkpointed).cloned().collect();
        uncheckpointed.extend(
            self.pending.iter().map(|(&step, ranks)| LedgerStep { step, generation: self.generation, ranks: ranks.values().cloned().collect() }),
        );
        Continuity {
            generation: self.generation,
            ended_generations: self.ended_generations.clone(),
            rolled_back: self.rolled_back.clone(),
            uncheckpointed,
        }
    }

    pub fn spec(&self) -> &JobSpec {
        &self.spec
    }
    pub fn phase(&self) -> &Phase {
        &self.phase
    }
    pub fn generation(&self) -> u64 {
        self.generation
    }
    pub fn committed_steps(&self) -> u64 {
        self.committed_steps
    }
    /// The newest stored checkpoint's step.
    pub fn last_checkpoint(&self) -> Option<u64> {
        self.checkpoints.iter().next_back().copied()
    }
    pub fn ledger(&self) -> &[LedgerStep] {
        &self.ledger
    }
    pub fn rolled_back(&self) -> &[LedgerStep] {
        &self.rolled_back
    }
    fn is_over(&self) -> bool {
        matches!(self.phase, Phase::Done | Phase::Failed(_))
    }
    fn over_reason(&self) -> String {
        match &self.phase {
            Phase::Done => format!("done after {} steps", self.committed_steps),
            Phase::Failed(why) => format!("failed: {why}"),
            _ => String::new(),
        }
    }

    /// The checkpoint a new generation resumes from: the latest stored one whose steps
    /// every student committed.
    pub fn resume_step(&self) -> Option<u64> {
        self.checkpoints.range(..=self.committed_steps).next_back().copied()
    }

    /// Whether checkpoint-<n> (n optimizer steps done) is one the job keeps.
    pub fn is_save_point(&self, n: u64) -> bool {
        n == self.spec.total_steps || (self.spec.save_steps > 0 && n.is_multiple_of(self.spec.save_steps))
    }

    pub fn register(&mut self, reg: Registration, now_ms: u64) -> Result<Registered, Refusal> {
        if reg.protocol_version != qdistill_proto::PROTOCOL_VERSION {
            return Err(Refusal::ProtocolVersion { worker: reg.protocol_version, coordinator: qdistill_proto::PROTOCOL_VERSION });
        }
        self.expire(now_ms);
        if self.is_over() {
            return Err(Refusal::JobOver(self.over_reason()));
        }
        if reg.collective_addr.trim().is_empty() {
            return Err(Refusal::Invalid(format!("worker {:?} sent no collective address", reg.worker_name)));
        }
        if let Some(prev) = &reg.previous_session {
            if self.members.contains_key(prev) {
                let name = self.sessions.get(prev).map(|s| s.name.clone()).unwrap_or_default();
                self.end_generation(&format!("worker {name} ({prev}) left generation {}", self.generation), now_ms);
            }
            self.sessions.remove(prev);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let session_id = match self.incarnation {
            1 => format!("{}-w{seq}", self.spec.job_id),
            n => format!("{}-r{n}-w{seq}", self.spec.job_id),
        };
        self.sessions.insert(
            session_id.clone(),
            Session {
                name: reg.worker_name,
                resources: reg.resources,
                collective_addr: reg.collective_addr,
                seq,
                lease_until_ms: now_ms + self.spec.lease_ms,
                last_seen_ms: now_ms,
                step: 0,
            },
        );
        Ok(Registered { session_id, lease_ms: self.spec.lease_ms, heartbeat_interval_ms: self.spec.heartbeat_interval_ms })
    }

    fn touch(&mut self, id: &str, now_ms: u64) -> bool {
        match self.sessions.get_mut(id) {
            Some(s) => {
                s.lease_until_ms = now_ms + self.spec.lease_ms;
                s.last_seen_ms = now_ms;
                true
            }
            None => false,
        }
    }

    /// Drops workers whose lease ran out; a member among them ends the generation.
    pub fn expire(&mut self, now_ms: u64) {
        let dead: Vec<String> = self.sessions.iter().filter(|(_, s)| s.lease_until_ms <= now_ms).map(|(id, _)| id.clone()).collect();
        for id in dead {
            // An earlier expiry in this loop may have ended the generation and dropped
            // this session with the other members.
            let Some(s) = self.sessions.remove(&id) else { continue };
            if self.members.contains_key(&id) && self.phase == Phase::Running {
                let why = format!(
                    "worker {} ({id}) missed its lease ({} ms without a call) in generation {}",
                    s.name,
                    now_ms - s.last_seen_ms,
                    self.generation
                );
                self.end_generation(&why, now_ms);
            }
        }
    }

    fn end_generation(&mut self, why: &str, now_ms: u64) {
        tracing::warn!(generation = self.generation, "{why}");
        self.ended_generations.push(why.to_string());
        for id in std::mem::take(&mut self.members).into_keys() {
            self.sessions.remove(&id);
        }
        let resume = self.resume_step().unwrap_or(0);
        let keep = self.ledger.iter().take_while(|l| l.step < resume).count();
        self.rolled_back.extend(self.ledger.drain(keep..));
        for (step, ranks) in std::mem::take(&mut self.pending) {
            self.rolled_back.push(LedgerStep { step, generation: self.generation, ranks: ranks.into_values().collect() });
        }
        self.committed_steps = resume;
        self.forming_since_ms = now_ms;
        if self.generation >= self.spec.max_generations {
            self.phase = Phase::Failed(format!("{why}; {} generations formed, the limit is {}", self.generation, self.spec.max_generations));
        } else {
            self.phase = Phase::Forming;
            self.message = format!("{why}; resuming from step {resume}");
        }
    }

    fn try_form(&mut self, now_ms: u64) {
        let mut live: Vec<(&String, &Session)> = self.sessions.iter().collect();
        live.sort_by_key(|(_, s)| s.seq);
        let enough = live.len() >= self.spec.expected_workers
            || (self.generation > 0
                && live.len() >= self.spec.min_workers
                && now_ms.saturating_sub(self.forming_since_ms) >= self.spec.reform_grace_ms);
        if !enough {
            self.message = format!("{} of {} worker(s) registered", live.len(), self.spec.expected_workers);
            return;
        }
        let resources: Vec<Resources> = live.iter().map(|(_, s)| s.resources.clone()).collect();
        let topo: Topology = match plan_topology(&resources, self.spec.placement, self.spec.shards) {
            Ok(t) => t,
            Err(e) => {
                self.message = e.to_string();
                return;
            }
        };
        let generation = self.generation + 1;
        let plan = ShardPlan::new(self.spec.micro_batches_per_step, self.spec.shards, topo.students.len(), topo.teachers.len());
        let ranked: Vec<(usize, Role, usize)> = topo
            .teachers
            .iter()
            .enumerate()
            .map(|(r, &i)| (i, Role::Teacher, r))
            .chain(topo.students.iter().enumerate().map(|(r, &i)| (i, Role::Student, r)))
            .collect();
        let peers: Vec<Peer> = ranked
            .iter()
            .enumerate()
            .map(|(rank, &(i, role, role_rank))| Peer {
                rank,
                role,
                role_rank,
                collective_addr: live[i].1.collective_addr.clone(),
                worker_name: live[i].1.name.clone(),
                nccl: live[i].1.resources.nccl,
            })
            .collect();
        let start_step = self.resume_step().unwrap_or(0);
        let resume = self.checkpoints.contains(&start_step);
        let members: BTreeMap<String, Assignment> = ranked
            .iter()
            .enumerate()
            .map(|(rank, &(i, role, role_rank))| {
                (
                    live[i].0.clone(),
                    Assignment {
                        generation,
                        role,
                        rank,
                        role_rank,
                        peers: peers.clone(),
                        start_step,
                        resume,
                        total_steps: self.spec.total_steps,
                        save_steps: self.spec.save_steps,
                        plan: plan.clone(),
                    },
                )
            })
            .collect();
        self.generation = generation;
        self.members = members;
        self.phase = Phase::Running;
        self.message = format!(
            "generation {generation}: {} teacher(s), {} student(s), {} spare(s), from step {start_step}",
            topo.teachers.len(),
            topo.students.len(),
            topo.spares.len()
        );
        tracing::info!("{}", self.message);
    }

    pub fn heartbeat(&mut self, id: &str, generation: u64, step: u64, now_ms: u64) -> (HeartbeatAction, String) {
        self.expire(now_ms);
        if self.is_over() {
            return (HeartbeatAction::Stop, self.over_reason());
        }
        if !self.touch(id, now_ms) {
            return (HeartbeatAction::Reregister, Refusal::UnknownSession(id.to_string()).to_string());
        }
        if generation != 0 && (generation != self.generation || !self.members.contains_key(id)) {
            return (HeartbeatAction::Reregister, Refusal::StaleGeneration { got: generation, current: self.generation }.to_string());
        }
        if let Some(s) = self.sessions.get_mut(id) {
            s.step = step;
        }
        (HeartbeatAction::Continue, String::new())
    }

    pub fn get_work(&mut self, id: &str, now_ms: u64) -> Result<Work, Refusal> {
        self.expire(now_ms);
        if self.is_over() {
            return Ok(Work::Stop { phase: self.phase.clone(), reason: self.over_reason() });
        }
        if !self.touch(id, now_ms) {
            return Err(Refusal::UnknownSession(id.to_string()));
        }
        if self.phase == Phase::Forming {
            self.try_form(now_ms);
        }
        if let Some(a) = self.members.get(id) {
            return Ok(Work::Assign(a.clone()));
        }
        let retry_after_ms = self.spec.heartbeat_interval_ms.max(1);
        let reason = match self.phase {
            Phase::Running => format!("spare: generation {} needs no more workers", self.generation),
            _ => self.message.clone(),
        };
        Ok(Work::Wait { retry_after_ms, reason })
    }

    fn member(&self, id: &str, generation: u64) -> Result<&Assignment, Refusal> {
        if self.is_over() {
            return Err(Refusal::JobOver(self.over_reason()));
        }
        if !self.sessions.contains_key(id) {
            return Err(Refusal::UnknownSession(id.to_string()));
        }
        match self.members.get(id) {
            Some(a) if a.generation == generation => Ok(a),
            _ => Err(Refusal::StaleGeneration { got: generation, current: self.generation }),
        }
    }

    /// The NCCL unique id of communicator `group` of `generation`. The group's root (rank 0
    /// of "world", student rank 0 of "students") offers the id it made and gets it back;
    /// the other members pass no offer and get the root's id, or `None` while it has not
    /// come yet (they ask again). A new generation forms new communicators, so ids of
    /// older generations are dropped once one of a newer generation arrives.
    pub fn exchange_nccl_id(&mut self, id: &str, generation: u64, group: &str, offer: Option<Vec<u8>>) -> Result<Option<Vec<u8>>, Refusal> {
        let a = self.member(id, generation)?;
        let is_root = match group {
            "world" => a.rank == 0,
            "students" if a.role == Role::Student => a.role_rank == 0,
            "students" => return Err(Refusal::Invalid(format!("rank {} is a teacher and not in the NCCL group \"students\"", a.rank))),
            other => return Err(Refusal::Invalid(format!("no NCCL group {other:?} (groups: {})", NCCL_GROUPS.join(", ")))),
        };
        if !a.nccl() {
            return Err(Refusal::Invalid(format!("generation {generation} does not use NCCL: not all of its peers can")));
        }
        let key = (generation, group.to_string());
        match offer {
            Some(bytes) => {
                if !is_root {
                    return Err(Refusal::Invalid(format!("rank {} offered an NCCL id for {group:?}, but only the group's root makes it", a.rank)));
                }
                if bytes.len() != NCCL_UNIQUE_ID_BYTES {
                    return Err(Refusal::Invalid(format!("an NCCL unique id has {NCCL_UNIQUE_ID_BYTES} bytes, not {}", bytes.len())));
                }
                if let Some(known) = self.nccl_ids.get(&key) {
                    if *known != bytes {
                        return Err(Refusal::Invalid(format!("the NCCL id of {group:?} in generation {generation} was already offered, and differently")));
                    }
                }
                self.nccl_ids.retain(|(g, _), _| *g >= generation);
                self.nccl_ids.insert(key, bytes.clone());
                Ok(Some(bytes))
            }
            None if is_root => Err(Refusal::Invalid(format!("rank {} is the root of {group:?} and must offer its NCCL id", a.rank))),
            None => Ok(self.nccl_ids.get(&key).cloned()),
        }
    }

    pub fn step_commit(&mut self, id: &str, generation: u64, step: u64, rec: StepRecord, now_ms: u64) -> Result<CommitAck, Refusal> {
        self.expire(now_ms);
        let a = self.member(id, generation)?;
        if a.role != Role::Student {
            return Err(Refusal::Invalid(format!("rank {} is a teacher; only students commit steps", a.rank)));
        }
        if rec.student_rank != a.role_rank {
            return Err(Refusal::Invalid(format!("student rank {} committed as rank {}", a.role_rank, rec.student_rank)));
        }
        if step >= self.spec.total_steps {
            return Err(Refusal::Invalid(format!("step {step} is past the job's last step {}", self.spec.total_steps - 1)));
        }
        let want = a.plan.batches_of(a.role_rank, step);
        if rec.micro_batches != want {
            return Err(Refusal::Invalid(format!(
                "student rank {} reported batches {:?} for step {step}, but the plan gives it {:?}",
                a.role_rank, rec.micro_batches, want
            )));
        }
        let students = a.plan.students();
        let rank = a.role_rank;
        let checkpoint_requested = rank == 0 && self.is_save_point(step + 1);
        self.touch(id, now_ms);
        if let Some(s) = self.sessions.get_mut(id) {
            s.step = step + 1;
        }
        if step < self.committed_steps {
            // A retried call: accept it only if it says the same.
            let same = self.ledger.iter().find(|l| l.step == step).and_then(|l| l.ranks.iter().find(|r| r.student_rank == rank)).is_some_and(|r| *r == rec);
            return if same {
                Ok(CommitAck { committed: true, checkpoint_requested })
            } else {
                Err(Refusal::Invalid(format!("step {step} was already committed with other contents by student rank {rank}")))
            };
        }
        let slot = self.pending.entry(step).or_default();
        if let Some(prev) = slot.get(&rank) {
            if *prev != rec {
                return Err(Refusal::Invalid(format!("student rank {rank} committed step {step} twice with different contents")));
            }
        }
        slot.insert(rank, rec);
        while self.pending.get(&self.committed_steps).is_some_and(|p| p.len() == students) {
            let ranks = self.pending.remove(&self.committed_steps).expect("checked").into_values().collect();
            self.ledger.push(LedgerStep { step: self.committed_steps, generation: self.generation, ranks });
            self.committed_steps += 1;
        }
        self.check_done();
        Ok(CommitAck { committed: step < self.committed_steps, checkpoint_requested })
    }

    /// Checks that `id` may upload checkpoint-<step>. Student rank 0 uploads the save
    /// points; any student may upload when it is told to shut down, since after an
    /// optimizer step every student holds the same state.
    pub fn begin_checkpoint(&mut self, id: &str, generation: u64, step: u64, now_ms: u64) -> Result<(), Refusal> {
        self.expire(now_ms);
        let a = self.member(id, generation)?;
        if a.role != Role::Student {
            return Err(Refusal::Invalid(format!("rank {} is a teacher; students upload checkpoints", a.rank)));
        }
        if step == 0 || step > self.spec.total_steps {
            return Err(Refusal::Invalid(format!("checkpoint-{step} is outside 1..={}", self.spec.total_steps)));
        }
        self.touch(id, now_ms);
        Ok(())
    }

    /// The ledger of the steps a checkpoint-<step> contains, once they are all committed.
    pub fn ledger_before(&self, step: u64) -> Option<Vec<LedgerStep>> {
        (self.committed_steps >= step).then(|| self.ledger.iter().filter(|l| l.step < step).cloned().collect())
    }

    /// Records that checkpoint-<step> is durably stored.
    pub fn checkpoint_stored(&mut self, step: u64) {
        self.checkpoints.insert(step);
        self.check_done();
    }

    fn check_done(&mut self) {
        let total = self.spec.total_steps;
        if !self.is_over() && self.committed_steps >= total && self.checkpoints.contains(&total) {
            self.phase = Phase::Done;
            self.message = format!("done: {total} steps, generation {}", self.generation);
        }
    }

    pub fn fail(&mut self, why: String) {
        self.phase = Phase::Failed(why);
    }

    pub fn status(&self, now_ms: u64) -> Status {
        let workers = self
            .sessions
            .iter()
            .map(|(id, s)| {
                let a = self.members.get(id);
                WorkerRow {
                    session_id: id.clone(),
                    worker_name: s.name.clone(),
                    role: a.map(|a| a.role),
                    rank: a.map(|a| a.rank),
                    generation: a.map_or(0, |a| a.generation),
                    step: s.step,
                    last_seen_ms_ago: now_ms.saturating_sub(s.last_seen_ms),
                }
            })
            .collect();
        Status {
            job_id: self.spec.job_id.clone(),
            phase: self.phase.clone(),
            generation: self.generation,
            committed_steps: self.committed_steps,
            total_steps: self.spec.total_steps,
            last_checkpoint: self.last_checkpoint(),
            workers,
            message: self.message.clone(),
            ended_generations: self.ended_generations.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::DeviceKind;

    const LEASE: u64 = 1000;

    fn spec(expected: usize, placement: TeacherPlacement) -> JobSpec {
        JobSpec {
            job_id: "job".into(),
            config_toml: String::new(),
            total_steps: 6,
            micro_batches_per_step: 4,
            shards: 2,
            placement,
            save_steps: 2,
            expected_workers: expected,
            min_workers: placement.min_workers(),
            reform_grace_ms: 500,
            lease_ms: LEASE,
            heartbeat_interval_ms: 100,
            max_generations: 3,
        }
    }

    fn reg(name: &str, mem: u64) -> Registration {
        Registration {
            protocol_version: qdistill_proto::PROTOCOL_VERSION,
            worker_name: name.into(),
            resources: Resources { device_kind: DeviceKind::Cpu, device_count: 1, device_memory_bytes: mem, cpu_cores: 1, nccl: false },
            collective_addr: format!("{name}:1"),
            previous_session: None,
        }
    }

    fn assignment(job: &mut Job, id: &str, now: u64) -> Assignment {
        match job.get_work(id, now).unwrap() {
            Work::Assign(a) => a,
            w => panic!("{id}: expected an assignment, got {w:?}"),
        }
    }

    fn record(a: &Assignment, step: u64) -> StepRecord {
        let batches = a.plan.batches_of(a.role_rank, step);
        StepRecord {
            student_rank: a.role_rank,
            sample_ids: batches.iter().map(|b| b * 10).collect(),
            micro_batches: batches,
            ce_sum: 1.0,
            kd_sum: 0.5,
            target_tokens: 3,
            grad_norm: 0.1,
            learning_rate: 1e-3,
        }
    }

    /// Three workers, teacher mode: the largest is the teacher; every member gets the same
    /// peer table and its own rank.
    fn formed() -> (Job, Vec<String>, Vec<Assignment>) {
        let mut job = Job::new(spec(3, TeacherPlacement::Ranks(1)), None, 0);
        let ids: Vec<String> =
            [("a", 1), ("b", 9), ("c", 1)].iter().map(|(n, m)| job.register(reg(n, *m), 0).unwrap().session_id).collect();
        let asg: Vec<Assignment> = ids.iter().map(|id| assignment(&mut job, id, 10)).collect();
        (job, ids, asg)
    }

    #[test]
    fn nccl_ids_go_from_each_groups_root_to_its_members_and_only_in_an_all_nccl_generation() {
        // Mixed generation (one CPU worker): no NCCL, the TCP collective carries everything.
        let (mut job, ids, asg) = formed();
        assert!(!asg[0].nccl());
        let e = job.exchange_nccl_id(&ids[1], 1, "world", Some(vec![7; NCCL_UNIQUE_ID_BYTES])).unwrap_err();
        assert!(e.to_string().contains("does not use NCCL"), "{e}");

        let mut job = Job::new(spec(3, TeacherPlacement::Ranks(1)), None, 0);
        let ids: Vec<String> = [("a", 1), ("b", 9), ("c", 1)]
            .iter()
            .map(|(n, m)| {
                let mut r = reg(n, *m);
                r.resources.nccl = true;
                job.register(r, 0).unwrap().session_id
            })
            .collect();
        let asg: Vec<Assignment> = ids.iter().map(|id| assignment(&mut job, id, 10)).collect();
        assert!(asg.iter().all(|a| a.nccl()));
        // b is the teacher (rank 0): root of "world"; a is student rank 0: root of "students".
        let (t, s0, s1) = (&ids[1], &ids[0], &ids[2]);
        assert_eq!(job.exchange_nccl_id(s1, 1, "world", None).unwrap(), None, "asked before the root offered");
        let world = vec![3u8; NCCL_UNIQUE_ID_BYTES];
        assert_eq!(job.exchange_nccl_id(t, 1, "world", Some(world.clone())).unwrap(), Some(world.clone()));
        assert_eq!(job.exchange_nccl_id(s1, 1, "world", None).unwrap(), Some(world.clone()));
        assert_eq!(job.exchange_nccl_id(s0, 1, "world", None).unwrap(), Some(world.clone()));
        // The students' communicator has its own id, from its own root.
        assert_eq!(job.exchange_nccl_id(s1, 1, "students", None).unwrap(), None);
        let studs = vec![5u8; NCCL_UNIQUE_ID_BYTES];
        job.exchange_nccl_id(s0, 1, "students", Some(studs.clone())).unwrap();
        assert_eq!(job.exchange_nccl_id(s1, 1, "students", None).unwrap(), Some(studs));
        // Refusals that name what is wrong.
        let cases: Vec<(&String, &str, Option<Vec<u8>>, &str)> = vec![
            (s1, "world", Some(vec![1; NCCL_UNIQUE_ID_BYTES]), "only the group's root"),
            (t, "world", Some(vec![9; NCCL_UNIQUE_ID_BYTES]), "already offered, and differently"),
            (t, "world", None, "must offer"),
            (t, "students", None, "is a teacher"),
            (s0, "everyone", None, "no NCCL group \"everyone\""),
            (s0, "students", Some(vec![5; 12]), "128 bytes, not 12"),
        ];
        for (who, group, offer, want) in cases {
            let e = job.exchange_nccl_id(who, 1, group, offer).unwrap_err();
            assert!(e.to_string().contains(want), "{group}: {e} (wanted {want:?})");
        }
        assert!(matches!(job.exchange_nccl_id(s0, 2, "world", None), Err(Refusal::StaleGeneration { .. })));
    }

    #[test]
    fn a_worker_of_another_protocol_version_is_refused_with_both_versions() {
        let mut job = Job::new(spec(1, TeacherPlacement::InStudent), None, 0);
        let mut r = reg("old", 1);
        r.protocol_version = qdistill_proto::PROTOCOL_VERSION + 1;
        let e = job.register(r, 0).unwrap_err();
        assert_eq!(e, Refusal::ProtocolVersion { worker: qdistill_proto::PROTOCOL_VERSION + 1, coordinator: qdistill_proto::PROTOCOL_VERSION });
        assert!(e.to_string().contains("same qdistill release"), "{e}");
        let mut r = reg("noaddr", 1);
        r.collective_addr.clear();
        assert!(matches!(job.register(r, 0), Err(Refusal::Invalid(_))));
    }

    #[test]
    fn first_generation_waits_for_every_expected_worker_then_assigns_roles() {
        let mut job = Job::new(spec(3, TeacherPlacement::Ranks(1)), None, 0);
        let a = job.register(reg("a", 1), 0).unwrap().session_id;
        let b = job.register(reg("b", 9), 0).unwrap().session_id;
        // Long past the grace: the first generation still waits for all three.
        match job.get_work(&a, 900).unwrap() {
            Work::Wait { reason, .. } => assert_eq!(reason, "2 of 3 worker(s) registered"),
            w => panic!("{w:?}"),
        }
        let c = job.register(reg("c", 1), 950).unwrap().session_id;
        let asg: Vec<Assignment> = [&a, &b, &c].iter().map(|id| assignment(&mut job, id, 960)).collect();
        assert_eq!(job.phase(), &Phase::Running);
        assert_eq!(job.generation(), 1);
        // b has the most memory: teacher, global rank 0; a and c are students 0 and 1.
        assert_eq!((asg[1].role, asg[1].rank, asg[1].role_rank), (Role::Teacher, 0, 0));
        assert_eq!((asg[0].role, asg[0].rank, asg[0].role_rank), (Role::Student, 1, 0));
        assert_eq!((asg[2].role, asg[2].rank, asg[2].role_rank), (Role::Student, 2, 1));
        let addrs: Vec<&str> = asg[0].peers.iter().map(|p| p.collective_addr.as_str()).collect();
        assert_eq!(addrs, ["b:1", "a:1", "c:1"]);
        assert!(asg.iter().all(|x| x.peers == asg[0].peers && x.plan == asg[0].plan && x.start_step == 0 && !x.resume));
        // Asking again gives the same assignment.
        assert_eq!(assignment(&mut job, &a, 970), asg[0]);
    }

    #[test]
    fn steps_commit_when_every_student_reported_and_checkpoints_follow_save_steps() {
        let (mut job, ids, asg) = formed();
        let (s0, s1) = (&ids[0], &ids[2]);
        let ack = job.step_commit(s0, 1, 0, record(&asg[0], 0), 20).unwrap();
        assert_eq!(ack, CommitAck { committed: false, checkpoint_requested: false });
        assert_eq!(job.committed_steps(), 0);
        let ack = job.step_commit(s1, 1, 0, record(&asg[2], 0), 20).unwrap();
        assert!(ack.committed && !ack.checkpoint_requested);
        // Step 1 ends the second step: a save point (save_steps = 2), asked of rank 0 only.
        assert!(job.step_commit(s0, 1, 1, record(&asg[0], 1), 30).unwrap().checkpoint_requested);
        assert!(!job.step_commit(s1, 1, 1, record(&asg[2], 1), 30).unwrap().checkpoint_requested);
        assert_eq!(job.committed_steps(), 2);
        // A retried commit is accepted; a different one is not.
        assert!(job.step_commit(s1, 1, 1, record(&asg[2], 1), 31).unwrap().committed);
        let mut other = record(&asg[2], 1);
        other.ce_sum = 7.0;
        assert!(matches!(job.step_commit(s1, 1, 1, other, 31), Err(Refusal::Invalid(_))));
        // Wrong batches for the plan, a teacher committing, a stale generation.
        let mut wrong = record(&asg[0], 2);
        wrong.micro_batches = vec![8, 9, 10];
        let e = job.step_commit(s0, 1, 2, wrong, 40).unwrap_err();
        assert!(e.to_string().contains("the plan gives it [8, 9]"), "{e}");
        assert!(matches!(job.step_commit(&ids[1], 1, 2, record(&asg[0], 2), 40), Err(Refusal::Invalid(_))));
        assert!(matches!(job.step_commit(s0, 7, 2, record(&asg[0], 2), 40), Err(Refusal::StaleGeneration { got: 7, current: 1 })));
        // Students upload, teachers do not.
        assert!(job.begin_checkpoint(s0, 1, 2, 40).is_ok());
        assert!(job.begin_checkpoint(s1, 1, 2, 40).is_ok());
        assert!(job.begin_checkpoint(&ids[1], 1, 2, 40).is_err());
        assert!(job.begin_checkpoint(s0, 1, 0, 40).is_err());
        assert_eq!(job.ledger_before(3), None, "step 2 is not committed yet");
        let l = job.ledger_before(2).unwrap();
        assert_eq!(l.iter().map(|l| l.step).collect::<Vec<_>>(), [0, 1]);
        assert_eq!(l[1].ranks.iter().flat_map(|r| r.micro_batches.clone()).collect::<Vec<_>>(), [4, 5, 6, 7]);
        job.checkpoint_stored(2);
        assert_eq!(job.resume_step(), Some(2));
    }

    #[test]
    fn job_is_done_after_the_last_step_is_committed_and_its_checkpoint_stored() {
        let (mut job, ids, asg) = formed();
        for step in 0..6 {
            job.step_commit(&ids[0], 1, step, record(&asg[0], step), 100).unwrap();
            job.step_commit(&ids[2], 1, step, record(&asg[2], step), 100).unwrap();
        }
        assert_eq!(job.phase(), &Phase::Running, "the final checkpoint is not stored yet");
        assert!(job.step_commit(&ids[0], 1, 6, record(&asg[0], 6), 100).is_err(), "step 6 is past the end");
        job.checkpoint_stored(6);
        assert_eq!(job.phase(), &Phase::Done);
        assert_eq!(job.heartbeat(&ids[1], 1, 6, 110).0, HeartbeatAction::Stop);
        assert!(matches!(job.get_work(&ids[1], 110), Ok(Work::Stop { phase: Phase::Done, .. })));
        assert!(matches!(job.register(reg("late", 1), 120), Err(Refusal::JobOver(_))));
        assert_eq!(job.ledger().len(), 6);
    }

    /// A member that stops calling loses its lease: the generation ends, everybody
    /// re-registers, uncheckpointed steps are rolled back, and the next generation
    /// resumes from the checkpoint.
    #[test]
    fn an_expired_lease_ends_the_generation_and_rolls_back_to_the_checkpoint() {
        let (mut job, ids, asg) = formed();
        for step in 0..3 {
            job.step_commit(&ids[0], 1, step, record(&asg[0], step), 100).unwrap();
            job.step_commit(&ids[2], 1, step, record(&asg[2], step), 100).unwrap();
        }
        job.checkpoint_stored(2);
        // Student 1 (ids[2]) goes silent; the others keep heartbeating.
        for t in [400, 800] {
            assert_eq!(job.heartbeat(&ids[0], 1, 3, t).0, HeartbeatAction::Continue);
            assert_eq!(job.heartbeat(&ids[1], 1, 3, t).0, HeartbeatAction::Continue);
        }
        assert_eq!(job.phase(), &Phase::Running);
        let (action, msg) = job.heartbeat(&ids[0], 1, 3, 1100);
        assert_eq!(action, HeartbeatAction::Reregister);
        assert!(msg.contains("register again"), "{msg}");
        assert_eq!(job.phase(), &Phase::Forming);
        assert_eq!(job.committed_steps(), 2);
        assert_eq!(job.ledger().len(), 2);
        assert_eq!(job.rolled_back().iter().map(|l| l.step).collect::<Vec<_>>(), [2]);
        assert!(matches!(job.get_work(&ids[1], 1100), Err(Refusal::UnknownSession(_))));
        let st = job.status(1100);
        assert!(st.message.contains("missed its lease") && st.message.contains("resuming from step 2"), "{}", st.message);
        assert_eq!(st.ended_generations.len(), 1);
        assert!(st.ended_generations[0].contains("missed its lease"));

        // Two survivors come back; after the grace the job goes on with one student that
        // holds both shards, from checkpoint-2.
        let t = job.register(reg("b", 9), 1150).unwrap().session_id;
        let s = job.register(reg("a", 1), 1160).unwrap().session_id;
        assert!(matches!(job.get_work(&t, 1200).unwrap(), Work::Wait { .. }), "inside the grace");
        let at = assignment(&mut job, &t, 1700);
        let as_ = assignment(&mut job, &s, 1700);
        assert_eq!(job.generation(), 2);
        assert_eq!((at.role, as_.role), (Role::Teacher, Role::Student));
        assert_eq!((as_.start_step, as_.resume), (2, true));
        assert_eq!(as_.plan.shards, 2, "the virtual shards outlive the topology");
        assert_eq!(as_.plan.batches_of(0, 2), vec![8, 9, 10, 11]);
        // The new generation re-trains step 2 and commits it.
        job.step_commit(&s, 2, 2, record(&as_, 2), 1800).unwrap();
        assert_eq!(job.committed_steps(), 3);
        assert_eq!(job.ledger().iter().map(|l| (l.step, l.generation)).collect::<Vec<_>>(), [(0, 1), (1, 1), (2, 2)]);
    }

    #[test]
    fn a_member_that_reports_leaving_ends_the_generation_at_once() {
        let (mut job, ids, _) = formed();
        let mut r = reg("c", 1);
        r.previous_session = Some(ids[2].clone());
        job.register(r, 50).unwrap();
        assert_eq!(job.phase(), &Phase::Forming);
        assert_eq!(job.heartbeat(&ids[0], 1, 0, 60).0, HeartbeatAction::Reregister);
        assert!(job.status(60).message.contains("left generation 1"));
    }

    #[test]
    fn spares_wait_and_join_the_next_generation() {
        let mut sp = spec(2, TeacherPlacement::InStudent);
        sp.shards = 1;
        let mut job = Job::new(sp, None, 0);
        let a = job.register(reg("a", 1), 0).unwrap().session_id;
        let b = job.register(reg("b", 1), 0).unwrap().session_id;
        assert_eq!(assignment(&mut job, &a, 10).role, Role::Student);
        match job.get_work(&b, 10).unwrap() {
            Work::Wait { reason, .. } => assert!(reason.starts_with("spare"), "{reason}"),
            w => panic!("{w:?}"),
        }
        // The spare's heartbeat (generation 0) keeps it alive; the member dies.
        job.heartbeat(&b, 0, 0, 900);
        assert_eq!(job.heartbeat(&b, 0, 0, 1200).0, HeartbeatAction::Continue);
        assert_eq!(job.phase(), &Phase::Forming);
        let a2 = assignment(&mut job, &b, 1800);
        assert_eq!((a2.generation, a2.role, a2.start_step, a2.resume), (2, Role::Student, 0, false));
    }

    #[test]
    fn the_job_fails_after_too_many_generations() {
        let mut job = Job::new(spec(1, TeacherPlacement::InStudent), None, 0);
        let mut now = 0;
        for g in 1..=3 {
            let id = job.register(reg("a", 1), now).unwrap().session_id;
            assert_eq!(assignment(&mut job, &id, now).generation, g);
            now += 2 * LEASE;
            job.expire(now);
        }
        match job.phase() {
            Phase::Failed(why) => assert!(why.contains("3 generations formed, the limit is 3"), "{why}"),
            p => panic!("{p:?}"),
        }
    }

    /// A coordinator that restarts mid-generation: the new one resumes from the stored
    /// checkpoint, lists what the old one committed after it as rolled back, numbers
    /// generations on, and hands out session ids the old one never did.
    #[test]
    fn a_restarted_job_continues_from_its_checkpoint_and_continuity() {
        let (mut job, ids, asg) = formed();
        for step in 0..3 {
            job.step_commit(&ids[0], 1, step, record(&asg[0], step), 100).unwrap();
            job.step_commit(&ids[2], 1, step, record(&asg[2], step), 100).unwrap();
        }
        job.checkpoint_stored(2);
        // Step 3 committed by one rank only when the coordinator dies.
        job.step_commit(&ids[0], 1, 3, record(&asg[0], 3), 110).unwrap();
        let c = job.continuity();
        assert_eq!(c.generation, 1);
        assert!(c.ended_generations.is_empty() && c.rolled_back.is_empty());
        assert_eq!(c.uncheckpointed.iter().map(|l| (l.step, l.ranks.len())).collect::<Vec<_>>(), [(2, 2), (3, 1)]);
        let c2: Continuity = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(c2, c, "the record round-trips through JSON");

        let checkpoint = Some((2, job.ledger_before(2).unwrap()));
        let mut new = Job::restarted(spec(3, TeacherPlacement::Ranks(1)), checkpoint.clone(), c.clone(), 2, 0);
        assert_eq!((new.phase(), new.committed_steps(), new.generation()), (&Phase::Forming, 2, 1));
        assert_eq!(new.ledger().iter().map(|l| l.step).collect::<Vec<_>>(), [0, 1]);
        assert_eq!(new.rolled_back().iter().map(|l| l.step).collect::<Vec<_>>(), [2, 3]);
        assert_eq!(new.status(0).ended_generations, ["the coordinator restarted during generation 1"]);
        // The old sessions are unknown; new ones never reuse their ids.
        assert_eq!(new.heartbeat(&ids[0], 1, 3, 10).0, HeartbeatAction::Reregister);
        let fresh: Vec<String> = [("a", 1), ("b", 9), ("c", 1)].iter().map(|(n, m)| new.register(reg(n, *m), 20).unwrap().session_id).collect();
        assert!(fresh.iter().all(|id| !ids.contains(id)), "{fresh:?} reuses one of {ids:?}");
        let a = assignment(&mut new, &fresh[0], 30);
        assert_eq!((a.generation, a.start_step, a.resume), (2, 2, true));

        // Died between storing checkpoint-4 and rewriting its record: the record's
        // uncheckpointed steps the checkpoint holds are not rolled back.
        let mut ahead = c.clone();
        ahead.uncheckpointed.retain(|l| l.step == 2);
        let j = Job::restarted(spec(3, TeacherPlacement::Ranks(1)), Some((4, vec![])), ahead, 2, 0);
        assert!(j.rolled_back().is_empty());
        // A restart counts against the generation limit like any ended generation.
        let mut at_limit = c.clone();
        at_limit.generation = 3;
        at_limit.ended_generations = vec!["x".into(), "y".into()];
        let j = Job::restarted(spec(3, TeacherPlacement::Ranks(1)), checkpoint, at_limit, 2, 0);
        assert!(matches!(j.phase(), Phase::Failed(why) if why.contains("the limit is 3")), "{:?}", j.phase());
        // A finished job stays finished, and no generation is said to have been cut.
        let done = Job::restarted(spec(3, TeacherPlacement::Ranks(1)), Some((6, vec![])), c, 2, 0);
        assert_eq!(done.phase(), &Phase::Done);
        assert!(done.status(0).ended_generations.is_empty());
    }

    #[test]
    fn a_job_resumed_from_a_stored_checkpoint_starts_there() {
        let ledger = vec![LedgerStep { step: 0, generation: 1, ranks: vec![] }];
        let mut job = Job::new(spec(1, TeacherPlacement::InStudent), Some((4, ledger)), 0);
        let id = job.register(reg("a", 1), 0).unwrap().session_id;
        let a = assignment(&mut job, &id, 0);
        assert_eq!((a.start_step, a.resume, job.committed_steps()), (4, true, 4));
        // A job whose final checkpoint is already stored is done from the start.
        let done = Job::new(spec(1, TeacherPlacement::InStudent), Some((6, vec![])), 0);
        assert_eq!(done.phase(), &Phase::Done);
    }
}
