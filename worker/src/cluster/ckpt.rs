//! A student's training state as a checkpoint directory (HF/PEFT layout, see
//! `qdistill_common::checkpoint`), and its trip to and from the coordinator.

use std::collections::HashMap;
use std::io::Read;
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
use qdistill_coordinator::store::{CheckpointStore, FileDigest, FileHasher, LocalDirStore};
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
        // The connection broke mid-stream (the coordinator died or restarts): register
        // again, the next generation resumes from a checkpoint that did arrive.
        _ if super::session::transient(&s) => RoleError::Lost(format!("{what}: {}", s.message())),
        _ => RoleError::Fatal(rpc.error(s).context(what.to_string())),
    }
}

/// Reads the files `names` of `dir` in chunks of at most [`CHUNK_BYTES`] and hands each
/// chunk to `send`, then the trailer with every file's size and SHA-256, hashed on the
/// way. At most one chunk is in hand at a time, so a checkpoint of any size streams in
/// bounded memory. Stops early, returning `Ok(false)`, when `send` refuses a chunk (the
/// receiver went away).
pub(crate) fn stream_files(dir: &Path, names: &[String], send: &mut dyn FnMut(pb::CheckpointChunk) -> bool) -> Result<bool> {
    let mut digests = Vec::with_capacity(names.len());
    for name in names {
        let p = dir.join(name);
        let mut f = std::fs::File::open(&p).map_err(|e| Error::io(&p, e))?;
        let mut hasher = FileHasher::new(name);
        let mut offset = 0u64;
        loop {
            let mut buf = vec![0u8; CHUNK_BYTES];
            let n = read_full(&mut f, &mut buf).map_err(|e| Error::io(&p, e))?;
            buf.truncate(n);
            hasher.update(&buf);
            // An empty file still needs one chunk, so the receiver creates it.
            if n > 0 || offset == 0 {
                let chunk = pb::FileChunk { path: name.clone(), offset, data: buf };
                if !send(pb::CheckpointChunk { kind: Some(pb::checkpoint_chunk::Kind::File(chunk)) }) {
                    return Ok(false);
                }
            }
            offset += n as u64;
            if n < CHUNK_BYTES {
                break;
            }
        }
        let d = hasher.finish();
        digests.push(pb::FileDigest { path: d.path, size: d.size, sha256: d.sha256.to_vec() });
    }
    Ok(send(pb::CheckpointChunk { kind: Some(pb::checkpoint_chunk::Kind::Trailer(pb::CheckpointTrailer { files: digests })) }))
}

fn read_full(r: &mut dyn Read, buf: &mut [u8]) -> std::io::Result<usize> {
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

/// Chunks in flight between the file reader and the gRPC stream.
const UPLOAD_QUEUE: usize = 4;

/// Streams every file of `dir` to the coordinator as checkpoint-<step>, read from disk
/// chunk by chunk as the stream drains.
pub fn upload(rpc: &Rpc, session_id: &str, generation: u64, step: u64, dir: &Path) -> std::result::Result<u64, RoleError> {
    let mut names: Vec<String> = Vec::new();
    for e in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let e = e.map_err(|e| Error::io(dir, e))?;
        names.push(e.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    let (tx, rx) = tokio::sync::mpsc::channel(UPLOAD_QUEUE);
    let header = pb::CheckpointChunk {
        kind: Some(pb::checkpoint_chunk::Kind::Header(pb::CheckpointHeader { session_id: session_id.to_string(), generation, step })),
    };
    let from = dir.to_path_buf();
    let reader = std::thread::Builder::new()
        .name("qdistill-ckpt-upload".into())
        .spawn(move || {
            let mut send = |c: pb::CheckpointChunk| tx.blocking_send(c).is_ok();
            if !send(header) {
                return Ok(false);
            }
            stream_files(&from, &names, &mut send)
        })
        .map_err(|e| Error::io(dir, e))?;
    let mut c = rpc.client.clone();
    let r = rpc.rt.block_on(c.raw().upload_checkpoint(tokio_stream::wrappers::ReceiverStream::new(rx)));
    // A read error ends the stream before its trailer, which the coordinator refuses;
    // the read error is the cause worth reporting.
    match reader.join() {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(RoleError::Fatal(anyhow::Error::from(e).context(format!("uploading checkpoint-{step}")))),
        Err(_) => return Err(RoleError::Fatal(anyhow::anyhow!("uploading checkpoint-{step}: the file reader panicked"))),
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The upload stream carries each file in bounded chunks at contiguous offsets, and a
    /// trailer whose digests are those of the whole files (hashed here in one piece).
    #[test]
    fn files_stream_in_bounded_chunks_with_whole_file_digests() {
        let dir = tempfile::tempdir().unwrap();
        let big: Vec<u8> = (0..(5 * CHUNK_BYTES / 2) as u64).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        let files: Vec<(&str, Vec<u8>)> = vec![("adapter_model.safetensors", big), ("empty", Vec::new()), ("trainer_state.json", b"{\"global_step\": 3}".to_vec())];
        for (n, d) in &files {
            std::fs::write(dir.path().join(n), d).unwrap();
        }
        let names: Vec<String> = files.iter().map(|(n, _)| n.to_string()).collect();
        let mut got: Vec<pb::CheckpointChunk> = Vec::new();
        assert!(stream_files(dir.path(), &names, &mut |c| {
            got.push(c);
            true
        })
        .unwrap());
        let Some(pb::checkpoint_chunk::Kind::Trailer(trailer)) = got.pop().unwrap().kind else { panic!("the stream does not end with its trailer") };
        let mut rebuilt: HashMap<String, Vec<u8>> = HashMap::new();
        let mut chunks_of: HashMap<String, usize> = HashMap::new();
        for c in got {
            let Some(pb::checkpoint_chunk::Kind::File(f)) = c.kind else { panic!("a non-file message before the trailer") };
            assert!(f.data.len() <= CHUNK_BYTES, "{}: a chunk of {} bytes", f.path, f.data.len());
            let buf = rebuilt.entry(f.path.clone()).or_default();
            assert_eq!(f.offset, buf.len() as u64, "{}: offsets must be contiguous", f.path);
            buf.extend_from_slice(&f.data);
            *chunks_of.entry(f.path).or_default() += 1;
        }
        assert_eq!(chunks_of["adapter_model.safetensors"], 3);
        assert_eq!(chunks_of["empty"], 1, "an empty file still gets one chunk");
        for (n, d) in &files {
            assert_eq!(&rebuilt[*n], d, "{n}");
        }
        let want: Vec<pb::FileDigest> = files
            .iter()
            .map(|(n, d)| {
                let d = FileDigest::of(n, d);
                pb::FileDigest { path: d.path, size: d.size, sha256: d.sha256.to_vec() }
            })
            .collect();
        assert_eq!(trailer.files, want);

        // A receiver that goes away stops the reading at once.
        let mut calls = 0;
        assert!(!stream_files(dir.path(), &names, &mut |_| {
            calls += 1;
            false
        })
        .unwrap());
        assert_eq!(calls, 1);
        // A file that cannot be read is named.
        let e = stream_files(dir.path(), &["missing.bin".to_string()], &mut |_| true).unwrap_err();
        assert!(e.to_string().contains("missing.bin"), "{e}");
    }
}
