//! A student's training state as a checkpoint directory (HF/PEFT layout, see
//! `qdistill_common::checkpoint`), and its trip to and from the coordinator.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use qdistill_common::checkpoint::{
    load_adapter, load_optimizer, save_adapter, save_optimizer, AdapterConfig, TrainerState, ADAPTER_WEIGHTS_NAME, OPTIMIZER_NAME,
    TRAINER_STATE_NAME,
};
use qdistill_common::config::TrainConfig;
use qdistill_common::data::DataCursor;
use qdistill_common::{Error, Result};
use qdistill_coordinator::convert;
use qdistill_coordinator::service::CHUNK_BYTES;
use qdistill_coordinator::store::{CheckpointStore, FileDigest, LocalDirStore};
use qdistill_proto::v1 as pb;
use tonic::Code;

use super::session::Rpc;
use super::RoleError;
use crate::trainer::Student;

pub const CONFIG_NAME: &str = "qdistill_config.toml";

/// Writes checkpoint files for `step` optimizer steps into `dir`.
pub fn save(dir: &Path, student: &Student, cfg: &TrainConfig, step: u64, total_steps: u64, cursor: DataCursor) -> Result<()> {
    let adapter_cfg = AdapterConfig::new(Some(cfg.model.model_name_or_path.clone()), &cfg.lora);
    save_adapter(dir, &student.params.peft_tensors()?, &adapter_cfg)?;
    save_optimizer(&dir.join(OPTIMIZER_NAME), &student.opt.state_tensors()?, &HashMap::new())?;
    let t = &cfg.training;
    let state = TrainerState {
        global_step: step,
        epoch: Some(cursor.epoch as f64),
        max_steps: total_steps,
        num_train_epochs: t.num_train_epochs.ceil() as u64,
        logging_steps: t.logging_steps as u64,
        save_steps: t.save_steps as u64,
        log_history: Vec::new(),
        best_metric: None,
        best_model_checkpoint: None,
        train_batch_size: Some(t.per_device_train_batch_size as u64),
        data_cursor: serde_json::to_value(cursor).map_err(|e| Error::Msg(e.to_string()))?,
        // Dropout masks are a pure function of (seed, step, microbatch); nothing else
        // draws random numbers during training.
        rng_state: serde_json::json!({ "seed": cfg.seed }),
    };
    state.save(&dir.join(TRAINER_STATE_NAME))?;
    let p = dir.join(CONFIG_NAME);
    std::fs::write(&p, cfg.to_toml_string()?).map_err(|e| Error::io(&p, e))
}

/// Restores adapters and optimizer from `dir`; returns the step and data cursor.
pub fn load(dir: &Path, student: &mut Student) -> Result<(u64, DataCursor)> {
    let (_, tensors) = load_adapter(dir)?;
    student.params.load_peft_tensors(&tensors, &dir.join(ADAPTER_WEIGHTS_NAME))?;
    let opt_path = dir.join(OPTIMIZER_NAME);
    let (opt, _) = load_optimizer(&opt_path)?;
    let opt: HashMap<String, candle_core::Tensor> = opt.into_iter().collect();
    student.opt.load_state(&opt, &opt_path)?;
    let state_path = dir.join(TRAINER_STATE_NAME);
    let state = TrainerState::load(&state_path)?;
    let cursor: DataCursor = serde_json::from_value(state.data_cursor.clone())
        .map_err(|e| Error::format(&state_path, format!("data cursor {}: {e}", state.data_cursor)))?;
    Ok((state.global_step, cursor))
}

fn status_error(rpc: &Rpc, what: &str, s: tonic::Status) -> RoleError {
    match s.code() {
        // The generation ended under us, or the coordinator gave up waiting on a peer.
        Code::Aborted | Code::NotFound | Code::DeadlineExceeded | Code::Unavailable => RoleError::Lost(format!("{what}: {}", s.message())),
        _ => RoleError::Fatal(rpc.error(s).context(what.to_string())),
    }
}

/// Streams every file of `dir` to the coordinator as checkpoint-<step>.
pub fn upload(rpc: &Rpc, session_id: &str, generation: u64, step: u64, dir: &Path) -> std::result::Result<u64, RoleError> {
    let mut names: Vec<String> = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let e = e.map_err(|e| Error::io(dir, e))?;
        names.push(e.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    let mut chunks = vec![pb::CheckpointChunk {
        kind: Some(pb::checkpoint_chunk::Kind::Header(pb::CheckpointHeader { session_id: session_id.to_string(), generation, step })),
    }];
    let mut digests = Vec::new();
    for name in &names {
        let p = dir.join(name);
        let data = std::fs::read(&p).map_err(|e| Error::io(&p, e))?;
        let d = FileDigest::of(name, &data);
        digests.push(pb::FileDigest { path: d.path, size: d.size, sha256: d.sha256.to_vec() });
        let mut offset = 0;
        loop {
            let end = (offset + CHUNK_BYTES).min(data.len());
            chunks.push(pb::CheckpointChunk {
                kind: Some(pb::checkpoint_chunk::Kind::File(pb::FileChunk { path: name.clone(), offset: offset as u64, data: data[offset..end].to_vec() })),
            });
            offset = end;
            if offset >= data.len() {
                break;
            }
        }
    }
    chunks.push(pb::CheckpointChunk { kind: Some(pb::checkpoint_chunk::Kind::Trailer(pb::CheckpointTrailer { files: digests })) });
    let mut c = rpc.client.clone();
    let r = rpc.rt.block_on(c.raw().upload_checkpoint(tokio_stream::iter(chunks)));
    match r {
        Ok(r) => Ok(r.into_inner().bytes),
        Err(s) => Err(status_error(rpc, &format!("uploading checkpoint-{step}"), s)),
    }
}

/// Fetches checkpoint-<step> into `into/checkpoint-<step>`, checking every file against
/// the trailer's SHA-256.
pub fn download(rpc: &Rpc, session_id: &str, step: u64, into: &Path) -> std::result::Result<PathBuf, RoleError> {
    let what = format!("downloading checkpoint-{step}");
    let store = LocalDirStore::new(into).map_err(|e| RoleError::Fatal(e.into()))?;
    let mut c = rpc.client.clone();
    let rt = &rpc.rt;
    let mut stream = match rt.block_on(c.raw().download_checkpoint(pb::DownloadCheckpointRequest { session_id: session_id.to_string(), step })) {
        Ok(r) => r.into_inner(),
        Err(s) => return Err(status_error(rpc, &what, s)),
    };
    let mut writer = store.begin(step).map_err(|e| RoleError::Fatal(e.into()))?;
    loop {
        let msg = match rt.block_on(stream.message()) {
            Ok(Some(m)) => m,
            Ok(None) => return Err(RoleError::Lost(format!("{what}: the stream ended before its trailer"))),
            Err(s) => return Err(status_error(rpc, &what, s)),
        };
        match msg.kind {
            Some(pb::checkpoint_chunk::Kind::Header(h)) if h.step == step => {}
            Some(pb::checkpoint_chunk::Kind::File(f)) => writer.write(&f.path, f.offset, &f.data).map_err(|e| RoleError::Fatal(e.into()))?,
            Some(pb::checkpoint_chunk::Kind::Trailer(t)) => {
                let digests: Vec<FileDigest> = t.files.iter().map(convert::digest).collect::<std::result::Result<_, _>>().map_err(|e| RoleError::Fatal(anyhow::anyhow!("{what}: {e}")))?;
                writer.commit(&digests).map_err(|e| RoleError::Fatal(e.into()))?;
                return Ok(store.dir(step));
            }
            other => return Err(RoleError::Fatal(anyhow::anyhow!("{what}: unexpected message {other:?}"))),
        }
    }
}
