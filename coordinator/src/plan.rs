//! Topology and data planning: pure functions of the registered workers and the job.
//!
//! Ranks: teachers first (global ranks 0..T), then students (T..T+S). Each optimizer step
//! has `micro_batches_per_step` (= gradient_accumulation_steps) microbatches; microbatch
//! `k` of step `s` is batch `s·G + k` of the seeded data stream, the batch the
//! single-process run trains there. The microbatches are cut into `shards` contiguous
//! virtual shards, and the shards into contiguous runs per student rank. The summed
//! gradient is defined as Σ_shard (Σ_micro∈shard g_micro), added in shard order; since that
//! structure does not depend on how many students there are, a job that loses a worker and
//! continues with fewer students computes the very same numbers.

use std::cmp::Reverse;

/// Device kinds a worker can bring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceKind {
    Cpu,
    Cuda,
}

/// What a worker brings to the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resources {
    pub device_kind: DeviceKind,
    pub device_count: u32,
    /// Memory of one device (host memory for CPU workers), bytes.
    pub device_memory_bytes: u64,
    pub cpu_cores: u32,
    /// Can join NCCL communicators (a CUDA build on a CUDA device).
    pub nccl: bool,
}

/// Whether the job's teacher runs on ranks of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TeacherPlacement {
    /// A separate teacher model: `ranks` workers compute its outputs.
    Ranks(usize),
    /// No teacher ranks: LwF (the student's own base, adapters off) or plain SFT.
    InStudent,
}

impl TeacherPlacement {
    pub fn from_mode(mode: qdistill_common::config::TeacherMode, teacher_ranks: usize) -> Self {
        match mode {
            qdistill_common::config::TeacherMode::Model => TeacherPlacement::Ranks(teacher_ranks.max(1)),
            _ => TeacherPlacement::InStudent,
        }
    }
    pub fn min_workers(self) -> usize {
        match self {
            TeacherPlacement::Ranks(t) => t + 1,
            TeacherPlacement::InStudent => 1,
        }
    }
}

/// Which candidate (by index into the slice given to [`plan_topology`]) gets which role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topology {
    /// Teacher workers, in teacher-rank order.
    pub teachers: Vec<usize>,
    /// Student workers, in student-rank order.
    pub students: Vec<usize>,
    /// Workers this generation does not need; they wait for the next one.
    pub spares: Vec<usize>,
}

impl Topology {
    pub fn world_size(&self) -> usize {
        self.teachers.len() + self.students.len()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("{have} worker(s) registered, but this job needs at least {need} ({why})")]
    TooFewWorkers { have: usize, need: usize, why: String },
    #[error("workers mix device kinds ({0}); every worker of one job must use the same kind")]
    MixedDevices(String),
}

/// Decides roles for one generation. `candidates` are in registration order.
///
/// Teachers get the workers with the most device memory (the teacher is usually the
/// larger model, and it only runs forwards, so it cannot shard its weights away);
/// registration order breaks ties, so the plan is deterministic. Students never
/// outnumber the virtual shards (a student without a shard would only add latency to
/// the all-reduce); the rest are spares.
pub fn plan_topology(candidates: &[Resources], placement: TeacherPlacement, shards: usize) -> Result<Topology, PlanError> {
    let need = placement.min_workers();
    if candidates.len() < need {
        let why = match placement {
            TeacherPlacement::Ranks(t) => format!("{t} teacher rank(s) and at least one student"),
            TeacherPlacement::InStudent => "at least one student".to_string(),
        };
        return Err(PlanError::TooFewWorkers { have: candidates.len(), need, why });
    }
    if let Some(first) = candidates.first() {
        if candidates.iter().any(|c| c.device_kind != first.device_kind) {
            let kinds: Vec<String> = candidates.iter().map(|c| format!("{:?}", c.device_kind)).collect();
            return Err(PlanError::MixedDevices(kinds.join(", ")));
        }
    }
    let mut order: Vec<usize> = (0..candidates.len()).collect();
    let n_teachers = match placement {
        TeacherPlacement::Ranks(t) => t,
        TeacherPlacement::InStudent => 0,
    };
    // Stable sort: equal memory keeps registration order.
    order.sort_by_key(|&i| Reverse(candidates[i].device_memory_bytes));
    let mut teachers: Vec<usize> = order[..n_teachers].to_vec();
    teachers.sort_unstable();
    let mut rest: Vec<usize> = (0..candidates.len()).filter(|i| !teachers.contains(i)).collect();
    let n_students = rest.len().min(shards.max(1));
    let spares = rest.split_off(n_students);
    Ok(Topology { teachers, students: rest, spares })
}

/// Who does what with microbatch `micro` of every step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MicroAssignment {
    pub micro: usize,
    pub student_rank: usize,
    pub shard: usize,
    /// Global rank of the teacher computing its outputs.
    pub teacher_rank: Option<usize>,
}

/// The per-step data plan (identical for every step; see the module docs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardPlan {
    pub micro_batches_per_step: usize,
    pub shards: usize,
    pub micros: Vec<MicroAssignment>,
}

/// `[start, end)` of part `i` when `n` items are cut into `parts` contiguous runs whose
/// lengths differ by at most one.
fn block(n: usize, parts: usize, i: usize) -> std::ops::Range<usize> {
    (i * n / parts)..((i + 1) * n / parts)
}

impl ShardPlan {
    /// `shards` is clamped to 1..=micro_batches_per_step and `students` to 1..=shards.
    pub fn new(micro_batches_per_step: usize, shards: usize, students: usize, teachers: usize) -> Self {
        let g = micro_batches_per_step.max(1);
        let v = shards.clamp(1, g);
        let s = students.clamp(1, v);
        let mut micros = Vec::with_capacity(g);
        for student_rank in 0..s {
            for shard in block(v, s, student_rank) {
                for micro in block(g, v, shard) {
                    let teacher_rank = if teachers > 0 { Some(micro % teachers) } else { None };
                    micros.push(MicroAssignment { micro, student_rank, shard, teacher_rank });
                }
            }
        }
        micros.sort_by_key(|m| m.micro);
        Self { micro_batches_per_step: g, shards: v, micros }
    }

    /// The microbatch indices (0..G) a student rank trains, grouped by shard in shard
    /// order.
    pub fn shards_of(&self, student_rank: usize) -> Vec<(usize, Vec<usize>)> {
        let mut out: Vec<(usize, Vec<usize>)> = Vec::new();
        for m in self.micros.iter().filter(|m| m.student_rank == student_rank) {
            match out.last_mut() {
                Some((shard, ms)) if *shard == m.shard => ms.push(m.micro),
                _ => out.push((m.shard, vec![m.micro])),
            }
        }
        out
    }

    /// Global batch indices of the stream that `student_rank` trains at `step`.
    pub fn batches_of(&self, student_rank: usize, step: u64) -> Vec<u64> {
        let g = self.micro_batches_per_step as u64;
        self.micros.iter().filter(|m| m.student_rank == student_rank).map(|m| step * g + m.micro as u64).collect()
    }

    pub fn students(&self) -> usize {
        self.micros.iter().map(|m| m.student_rank + 1).max().unwrap_or(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu(mem_gib: u64) -> Resources {
        Resources { device_kind: DeviceKind::Cpu, device_count: 1, device_memory_bytes: mem_gib << 30, cpu_cores: 2, nccl: false }
    }

    #[test]
    fn teacher_goes_to_the_largest_worker_and_students_keep_registration_order() {
        let ws = [cpu(8), cpu(16), cpu(8), cpu(16)];
        let t = plan_topology(&ws, TeacherPlacement::Ranks(1), 8).unwrap();
        // Two workers tie at 16 GiB: the earlier registration wins.
        assert_eq!(t.teachers, vec![1]);
        assert_eq!(t.students, vec![0, 2, 3]);
        assert!(t.spares.is_empty());
        assert_eq!(t.world_size(), 4);
    }

    #[test]
    fn lwf_and_sft_use_every_worker_as_a_student() {
        let ws = [cpu(8), cpu(16)];
        let t = plan_topology(&ws, TeacherPlacement::InStudent, 4).unwrap();
        assert!(t.teachers.is_empty());
        assert_eq!(t.students, vec![0, 1]);
    }

    #[test]
    fn students_beyond_the_shard_count_are_spares() {
        let ws = [cpu(1), cpu(1), cpu(1), cpu(1)];
        let t = plan_topology(&ws, TeacherPlacement::Ranks(1), 2).unwrap();
        assert_eq!(t.teachers, vec![0]);
        assert_eq!(t.students, vec![1, 2]);
        assert_eq!(t.spares, vec![3]);
    }

    #[test]
    fn too_few_workers_and_mixed_devices_are_refused_with_the_reason() {
        let e = plan_topology(&[cpu(1)], TeacherPlacement::Ranks(1), 2).unwrap_err();
        assert_eq!(e, PlanError::TooFewWorkers { have: 1, need: 2, why: "1 teacher rank(s) and at least one student".into() });
        assert!(e.to_string().contains("at least 2"), "{e}");
        let mut gpu = cpu(1);
        gpu.device_kind = DeviceKind::Cuda;
        let e = plan_topology(&[cpu(1), gpu], TeacherPlacement::InStudent, 2).unwrap_err();
        assert!(matches!(e, PlanError::MixedDevices(_)), "{e}");
    }

    /// Every microbatch of a step is trained by exactly one student, and the shards a
    /// student holds are contiguous and in order; checked by brute force over sizes.
    #[test]
    fn shard_plan_covers_each_microbatch_exactly_once() {
        for g in 1..=9 {
            for v in 1..=g {
                for s in 1..=v {
                    for t in 0..=2 {
                        let p = ShardPlan::new(g, v, s, t);
                        assert_eq!(p.micros.len(), g);
                        for (k, m) in p.micros.iter().enumerate() {
                            assert_eq!(m.micro, k);
                            assert_eq!(m.teacher_rank, if t == 0 { None } else { Some(k % t) });
                        }
                        let mut seen = vec![0; g];
                        let mut last_shard = None;
                        for r in 0..s {
                            for (shard, micros) in p.shards_of(r) {
                                assert!(last_shard.is_none_or(|l| shard == l + 1), "g{g} v{v} s{s}: shards out of order");
                                last_shard = Some(shard);
                                for k in micros {
                                    seen[k] += 1;
                                }
                            }
                        }
                        assert_eq!(last_shard, Some(v - 1));
                        assert!(seen.iter().all(|&c| c == 1), "g{g} v{v} s{s}: {seen:?}");
                        // Microbatches of a shard are the same whatever the student count.
                        let one = ShardPlan::new(g, v, 1, t);
                        for (a, b) in p.micros.iter().zip(&one.micros) {
                            assert_eq!(a.shard, b.shard);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn batches_of_a_step_are_the_single_process_batches_of_that_step() {
        let p = ShardPlan::new(4, 2, 2, 1);
        let mut all: Vec<u64> = (0..2).flat_map(|r| p.batches_of(r, 3)).collect();
        all.sort_unstable();
        // The single-process run trains batches 12, 13, 14, 15 at step 3 (4 per step).
        assert_eq!(all, vec![12, 13, 14, 15]);
        assert_eq!(p.batches_of(0, 3), vec![12, 13]);
        assert_eq!(p.students(), 2);
    }

    #[test]
    fn plan_clamps_out_of_range_counts() {
        let p = ShardPlan::new(2, 5, 7, 0);
        assert_eq!(p.shards, 2);
        assert_eq!(p.students(), 2);
        let p = ShardPlan::new(0, 0, 0, 0);
        assert_eq!((p.micro_batches_per_step, p.shards, p.students()), (1, 1, 1));
    }
}
