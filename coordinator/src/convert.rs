//! Between the wire types (`qdistill_proto::v1`) and the coordinator's own. Decoding
//! checks what prost cannot: required sub-messages, enum values in range, sizes.

use qdistill_proto::v1 as pb;

use crate::plan::{DeviceKind, MicroAssignment, Resources, ShardPlan};
use crate::state::{Assignment, HeartbeatAction, Peer, Phase, Refusal, Registration, Role, Status, Work};
use crate::store::FileDigest;

pub fn registration(req: pb::RegisterRequest) -> Result<Registration, Refusal> {
    // The version goes first: a worker of another version may send anything else wrong.
    if req.protocol_version != qdistill_proto::PROTOCOL_VERSION {
        return Err(Refusal::ProtocolVersion { worker: req.protocol_version, coordinator: qdistill_proto::PROTOCOL_VERSION });
    }
    let name = &req.worker_name;
    let r = req.resources.ok_or_else(|| Refusal::Invalid(format!("worker {name:?} registered without its resources")))?;
    let device_kind = match pb::DeviceKind::try_from(r.device_kind) {
        Ok(pb::DeviceKind::Cpu) => DeviceKind::Cpu,
        Ok(pb::DeviceKind::Cuda) => DeviceKind::Cuda,
        _ => return Err(Refusal::Invalid(format!("worker {name:?} registered with device kind {} (expected CPU or CUDA)", r.device_kind))),
    };
    Ok(Registration {
        protocol_version: req.protocol_version,
        worker_name: req.worker_name,
        resources: Resources { device_kind, device_count: r.device_count, device_memory_bytes: r.device_memory_bytes, cpu_cores: r.cpu_cores, nccl: r.nccl },
        collective_addr: req.collective_addr,
        previous_session: (!req.previous_session_id.is_empty()).then_some(req.previous_session_id),
    })
}

pub fn resources(r: &Resources) -> pb::Resources {
    pb::Resources {
        device_kind: match r.device_kind {
            DeviceKind::Cpu => pb::DeviceKind::Cpu,
            DeviceKind::Cuda => pb::DeviceKind::Cuda,
        } as i32,
        device_count: r.device_count,
        device_memory_bytes: r.device_memory_bytes,
        cpu_cores: r.cpu_cores,
        nccl: r.nccl,
    }
}

pub fn heartbeat_action(a: HeartbeatAction) -> pb::HeartbeatAction {
    match a {
        HeartbeatAction::Continue => pb::HeartbeatAction::Continue,
        HeartbeatAction::Reregister => pb::HeartbeatAction::Reregister,
        HeartbeatAction::Stop => pb::HeartbeatAction::Stop,
    }
}

fn role(r: Role) -> pb::Role {
    match r {
        Role::Teacher => pb::Role::Teacher,
        Role::Student => pb::Role::Student,
    }
}

fn role_from(v: i32) -> Result<Role, String> {
    match pb::Role::try_from(v) {
        Ok(pb::Role::Teacher) => Ok(Role::Teacher),
        Ok(pb::Role::Student) => Ok(Role::Student),
        _ => Err(format!("role {v} is neither teacher nor student")),
    }
}

fn job_state(p: &Phase) -> pb::JobState {
    match p {
        Phase::Forming => pb::JobState::Forming,
        Phase::Running => pb::JobState::Running,
        Phase::Done => pb::JobState::Done,
        Phase::Failed(_) => pb::JobState::Failed,
    }
}

pub fn assignment(a: Assignment, config_toml: &str) -> pb::Assignment {
    pb::Assignment {
        generation: a.generation,
        role: role(a.role) as i32,
        rank: a.rank as u32,
        role_rank: a.role_rank as u32,
        peers: a
            .peers
            .iter()
            .map(|p| pb::Peer {
                rank: p.rank as u32,
                role: role(p.role) as i32,
                role_rank: p.role_rank as u32,
                collective_addr: p.collective_addr.clone(),
                worker_name: p.worker_name.clone(),
                nccl: p.nccl,
            })
            .collect(),
        config_toml: config_toml.to_string(),
        start_step: a.start_step,
        total_steps: a.total_steps,
        resume_checkpoint: a.resume,
        plan: Some(pb::ShardPlan {
            micro_batches_per_step: a.plan.micro_batches_per_step as u32,
            shards: a.plan.shards as u32,
            micros: a
                .plan
                .micros
                .iter()
                .map(|m| pb::MicroAssignment {
                    micro: m.micro as u32,
                    student_rank: m.student_rank as u32,
                    shard: m.shard as u32,
                    teacher_rank: m.teacher_rank.map(|t| t as u32),
                })
                .collect(),
        }),
        save_steps: a.save_steps,
    }
}

/// Decodes an assignment on the worker side, checking that it is self-consistent (ranks
/// in range, a plan that covers every microbatch once), so a worker never indexes out of
/// bounds on a bad message.
pub fn assignment_from(a: pb::Assignment) -> Result<(Assignment, String), String> {
    let plan = a.plan.ok_or("assignment without a shard plan")?;
    let g = plan.micro_batches_per_step as usize;
    if g == 0 || plan.micros.len() != g {
        return Err(format!("shard plan lists {} microbatches for {g} per step", plan.micros.len()));
    }
    let mut micros = Vec::with_capacity(g);
    for (k, m) in plan.micros.iter().enumerate() {
        if m.micro as usize != k || m.shard >= plan.shards {
            return Err(format!("shard plan entry {k} is malformed: {m:?}"));
        }
        micros.push(MicroAssignment {
            micro: k,
            student_rank: m.student_rank as usize,
            shard: m.shard as usize,
            teacher_rank: m.teacher_rank.map(|t| t as usize),
        });
    }
    let peers: Vec<Peer> = a
        .peers
        .iter()
        .enumerate()
        .map(|(i, p)| {
            if p.rank as usize != i {
                return Err(format!("peer {i} says it is rank {}", p.rank));
            }
            Ok(Peer {
                rank: i,
                role: role_from(p.role)?,
                role_rank: p.role_rank as usize,
                collective_addr: p.collective_addr.clone(),
                worker_name: p.worker_name.clone(),
                nccl: p.nccl,
            })
        })
        .collect::<Result<_, String>>()?;
    let rank = a.rank as usize;
    let me = peers.get(rank).ok_or_else(|| format!("rank {rank} is not among the {} peers", peers.len()))?;
    let r = role_from(a.role)?;
    if me.role != r || me.role_rank != a.role_rank as usize {
        return Err(format!("rank {rank}'s peer entry disagrees with the assignment"));
    }
    let students = peers.iter().filter(|p| p.role == Role::Student).count();
    let teachers = peers.iter().filter(|p| p.role == Role::Teacher).count();
    if micros.iter().any(|m| m.student_rank >= students || m.teacher_rank.is_some_and(|t| t >= teachers)) {
        return Err(format!("shard plan names ranks beyond {students} student(s) / {teachers} teacher(s)"));
    }
    let plan = ShardPlan { micro_batches_per_step: g, shards: plan.shards as usize, micros };
    Ok((
        Assignment {
            generation: a.generation,
            role: r,
            rank,
            role_rank: a.role_rank as usize,
            peers,
            start_step: a.start_step,
            resume: a.resume_checkpoint,
            total_steps: a.total_steps,
            save_steps: a.save_steps,
            plan,
        },
        a.config_toml,
    ))
}

pub fn work(w: Work, config_toml: &str) -> pb::GetWorkResponse {
    use pb::get_work_response::Work as W;
    let work = match w {
        Work::Wait { retry_after_ms, reason } => W::Wait(pb::Wait { retry_after_ms: retry_after_ms.min(u32::MAX as u64) as u32, reason }),
        Work::Assign(a) => W::Assignment(assignment(a, config_toml)),
        Work::Stop { phase, reason } => W::Stop(pb::Stop { state: job_state(&phase) as i32, reason }),
    };
    pb::GetWorkResponse { work: Some(work) }
}

pub fn status(s: Status) -> pb::JobStatusResponse {
    pb::JobStatusResponse {
        job_id: s.job_id,
        state: job_state(&s.phase) as i32,
        generation: s.generation,
        committed_steps: s.committed_steps,
        total_steps: s.total_steps,
        last_checkpoint_step: s.last_checkpoint,
        workers: s
            .workers
            .into_iter()
            .map(|w| pb::WorkerStatus {
                session_id: w.session_id,
                worker_name: w.worker_name,
                role: w.role.map_or(pb::Role::Unspecified, role) as i32,
                rank: w.rank.unwrap_or(0) as u32,
                generation: w.generation,
                step: w.step,
                last_seen_ms_ago: w.last_seen_ms_ago,
            })
            .collect(),
        message: match &s.phase {
            Phase::Failed(why) => why.clone(),
            _ => s.message,
        },
        ended_generations: s.ended_generations,
    }
}

pub fn digest(d: &pb::FileDigest) -> Result<FileDigest, String> {
    let sha256: [u8; 32] = d.sha256.as_slice().try_into().map_err(|_| format!("{}: SHA-256 of {} bytes, expected 32", d.path, d.sha256.len()))?;
    Ok(FileDigest { path: d.path.clone(), size: d.size, sha256 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assignments_survive_the_wire_and_bad_ones_are_refused() {
        let plan = ShardPlan::new(4, 2, 2, 1);
        let peers = vec![
            Peer { rank: 0, role: Role::Teacher, role_rank: 0, collective_addr: "t:1".into(), worker_name: "t".into(), nccl: false },
            Peer { rank: 1, role: Role::Student, role_rank: 0, collective_addr: "a:1".into(), worker_name: "a".into(), nccl: false },
            Peer { rank: 2, role: Role::Student, role_rank: 1, collective_addr: "b:1".into(), worker_name: "b".into(), nccl: true },
        ];
        let a = Assignment { generation: 3, role: Role::Student, rank: 2, role_rank: 1, peers, start_step: 4, resume: true, total_steps: 9, save_steps: 2, plan };
        let (back, cfg) = assignment_from(assignment(a.clone(), "seed = 1")).unwrap();
        assert_eq!(back, a);
        assert_eq!(cfg, "seed = 1");

        let mut bad = assignment(a.clone(), "");
        bad.rank = 7;
        assert!(assignment_from(bad).unwrap_err().contains("rank 7"));
        let mut bad = assignment(a.clone(), "");
        bad.plan.as_mut().unwrap().micros[1].student_rank = 5;
        assert!(assignment_from(bad).unwrap_err().contains("beyond 2 student"));
        let mut bad = assignment(a.clone(), "");
        bad.plan.as_mut().unwrap().micros.pop();
        assert!(assignment_from(bad).is_err());
        let mut bad = assignment(a, "");
        bad.role = 42;
        assert!(assignment_from(bad).unwrap_err().contains("role 42"));
    }

    #[test]
    fn registrations_without_resources_or_with_unknown_devices_are_refused() {
        let ok = pb::RegisterRequest {
            protocol_version: qdistill_proto::PROTOCOL_VERSION,
            worker_name: "w".into(),
            resources: Some(pb::Resources { device_kind: pb::DeviceKind::Cpu as i32, device_count: 1, device_memory_bytes: 1, cpu_cores: 1, nccl: false }),
            collective_addr: "x:1".into(),
            previous_session_id: String::new(),
        };
        let r = registration(ok.clone()).unwrap();
        assert_eq!(r.previous_session, None);
        assert_eq!(r.resources.device_kind, DeviceKind::Cpu);
        let mut bad = ok.clone();
        bad.resources = None;
        assert!(registration(bad).unwrap_err().to_string().contains("without its resources"));
        let mut bad = ok.clone();
        bad.resources.as_mut().unwrap().device_kind = 0;
        assert!(registration(bad).unwrap_err().to_string().contains("device kind 0"));
        let mut bad = ok;
        bad.protocol_version = 0;
        bad.resources = None;
        assert!(matches!(registration(bad), Err(Refusal::ProtocolVersion { worker: 0, .. })), "the version is checked first");
    }
}
