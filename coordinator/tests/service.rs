//! The gRPC service over a real socket on 127.0.0.1: authentication, protocol-version
//! refusal, malformed input, the health service, checkpoint upload and download, and a
//! whole (tiny) job driven by hand-written clients.

use std::path::Path;
use std::time::Duration;

use prost::bytes::{Buf, BufMut};
use qdistill_common::config::{self, ConfigFormat, TrainConfig};
use qdistill_coordinator::client::{Client, ConnectOptions};
use qdistill_coordinator::{start, RunningCoordinator, ServeOptions};
use qdistill_proto::v1 as pb;
use qdistill_proto::v1::coordinator_client::CoordinatorClient;
use qdistill_proto::PROTOCOL_VERSION;
use sha2::Digest;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::transport::Endpoint;
use tonic::{Code, Request, Status};

const TOKEN: &str = "s3cret-token";

fn config(out: &Path, extra: &str) -> TrainConfig {
    let text = format!(
        r#"output_dir = "{}"
seed = 3
[model]
model_name_or_path = "unused-model"
[teacher]
mode = "model"
model_name_or_path = "unused-teacher"
[data]
train_file = "unused.jsonl"
[training]
gradient_accumulation_steps = 4
save_steps = 2
{extra}
"#,
        out.display()
    );
    config::parse(&text, ConfigFormat::Toml, "test config", &[]).unwrap()
}

async fn coordinator(out: &Path, workers: usize, total_steps: u64) -> RunningCoordinator {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let opts = ServeOptions {
        token: TOKEN.into(),
        workers,
        // Hand-driven sessions send no heartbeats: a lease no test here runs out.
        lease: Duration::from_secs(60),
        heartbeat_interval: Duration::from_millis(50),
        ..ServeOptions::default()
    };
    start(&config(out, ""), total_steps, listener, opts).await.unwrap()
}

async fn client(url: &str, token: &str) -> Client {
    Client::connect(url, token, &ConnectOptions::default()).await.unwrap()
}

fn register_req(name: &str, version: u32) -> pb::RegisterRequest {
    pb::RegisterRequest {
        protocol_version: version,
        worker_name: name.into(),
        resources: Some(pb::Resources { device_kind: pb::DeviceKind::Cpu as i32, device_count: 1, device_memory_bytes: 1 << 30, cpu_cores: 2, nccl: false }),
        collective_addr: format!("127.0.0.1:1{name}"),
        previous_session_id: String::new(),
    }
}

#[tokio::test]
async fn wrong_or_missing_token_and_other_protocol_versions_are_refused_clearly() {
    let out = tempfile::tempdir().unwrap();
    let c = coordinator(out.path(), 2, 4).await;
    let url = c.url();

    let mut bad = client(&url, "not-the-token").await;
    let e = bad.raw().register(register_req("0", PROTOCOL_VERSION)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("does not match"), "{}", e.message());
    // The wrapped error names the coordinator.
    let e = bad.job_status().await.unwrap_err().to_string();
    assert!(e.contains(&url) && e.contains("unauthenticated"), "{e}");

    let channel = Endpoint::from_shared(url.clone()).unwrap().connect().await.unwrap();
    let e = CoordinatorClient::new(channel).register(register_req("0", PROTOCOL_VERSION)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(e.message().contains("x-qdistill-token"), "{}", e.message());

    let mut good = client(&url, TOKEN).await;
    let e = good.raw().register(register_req("0", PROTOCOL_VERSION + 1)).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition);
    let want = format!("protocol version {} but the coordinator speaks version {PROTOCOL_VERSION}", PROTOCOL_VERSION + 1);
    assert!(e.message().contains(&want), "{}", e.message());

    // None of that registered anybody.
    let st = good.job_status().await.unwrap();
    assert!(st.workers.is_empty());
    assert_eq!(st.state, pb::JobState::Forming as i32);

    // The health service answers without a token.
    let channel = Endpoint::from_shared(url).unwrap().connect().await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let r = health.check(tonic_health::pb::HealthCheckRequest { service: "distill.v1.Coordinator".into() }).await.unwrap();
    assert_eq!(r.into_inner().status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);
}

#[tokio::test]
async fn an_unreachable_coordinator_is_named_in_the_error() {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    drop(l);
    let opts = ConnectOptions { attempts: 2, initial_backoff: Duration::from_millis(10), ..ConnectOptions::default() };
    let e = Client::connect(&url, TOKEN, &opts).await.err().expect("nothing listens there").to_string();
    assert!(e.contains(&url) && e.contains("unreachable after 2 attempt(s)"), "{e}");
    let e = Client::connect("not a url", TOKEN, &opts).await.err().unwrap().to_string();
    assert!(e.contains("not a valid URL"), "{e}");
}

/// Sends arbitrary bytes as a gRPC message, to see what a broken or hostile peer does.
#[derive(Clone, Default)]
struct RawCodec;
struct RawEnc;
struct RawDec;

impl Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEnc;
    type Decoder = RawDec;
    fn encoder(&mut self) -> RawEnc {
        RawEnc
    }
    fn decoder(&mut self) -> RawDec {
        RawDec
    }
}
impl Encoder for RawEnc {
    type Item = Vec<u8>;
    type Error = Status;
    fn encode(&mut self, item: Vec<u8>, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put_slice(&item);
        Ok(())
    }
}
impl Decoder for RawDec {
    type Item = Vec<u8>;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Vec<u8>>, Status> {
        let mut v = vec![0; src.remaining()];
        src.copy_to_slice(&mut v);
        Ok(Some(v))
    }
}

async fn raw_call(url: &str, method: &'static str, body: Vec<u8>) -> Result<Vec<u8>, Status> {
    let channel = Endpoint::from_shared(url.to_string()).unwrap().connect().await.unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let mut req = Request::new(body);
    req.metadata_mut().insert("x-qdistill-token", TOKEN.parse().unwrap());
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(method);
    grpc.unary(req, path, RawCodec).await.map(|r| r.into_inner())
}

fn chunk(kind: pb::checkpoint_chunk::Kind) -> pb::CheckpointChunk {
    pb::CheckpointChunk { kind: Some(kind) }
}

#[tokio::test]
async fn malformed_messages_are_refused_and_the_coordinator_keeps_serving() {
    let out = tempfile::tempdir().unwrap();
    let c = coordinator(out.path(), 2, 4).await;
    let url = c.url();
    // Bytes that are no protobuf at all (an invalid wire type), and a truncated varint.
    for garbage in [vec![0xff, 0xff, 0xff, 0xff], vec![0x08, 0x80]] {
        let e = raw_call(&url, "/distill.v1.Coordinator/Register", garbage).await.unwrap_err();
        assert_ne!(e.code(), Code::Ok);
        assert!(e.message().contains("decode"), "{e:?}");
    }
    assert_eq!(raw_call(&url, "/distill.v1.Coordinator/NoSuchMethod", vec![]).await.unwrap_err().code(), Code::Unimplemented);

    let mut cl = client(&url, TOKEN).await;
    // Well-formed protobuf, wrong content.
    let mut r = register_req("0", PROTOCOL_VERSION);
    r.resources = None;
    let e = cl.raw().register(r).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    let mut r = register_req("0", PROTOCOL_VERSION);
    r.resources.as_mut().unwrap().device_kind = 77;
    assert_eq!(cl.raw().register(r).await.unwrap_err().code(), Code::InvalidArgument);
    let e = cl.raw().heartbeat(pb::HeartbeatRequest { session_id: "nobody".into(), generation: 9, step: 1 }).await.unwrap();
    assert_eq!(e.into_inner().action, pb::HeartbeatAction::Reregister as i32);
    assert_eq!(cl.raw().get_work(pb::GetWorkRequest { session_id: String::new() }).await.unwrap_err().code(), Code::NotFound);

    // Real members (a teacher and a student), then broken checkpoint streams from the
    // student.
    let other = cl.raw().register(register_req("1", PROTOCOL_VERSION)).await.unwrap().into_inner().session_id;
    let id = cl.raw().register(register_req("0", PROTOCOL_VERSION)).await.unwrap().into_inner().session_id;
    cl.raw().get_work(pb::GetWorkRequest { session_id: other }).await.unwrap();
    let a = match cl.raw().get_work(pb::GetWorkRequest { session_id: id.clone() }).await.unwrap().into_inner().work {
        Some(pb::get_work_response::Work::Assignment(a)) => a,
        w => panic!("{w:?}"),
    };
    let header = pb::checkpoint_chunk::Kind::Header(pb::CheckpointHeader { session_id: id.clone(), generation: a.generation, step: 2 });
    let file = |path: &str, offset: u64, data: &[u8]| pb::checkpoint_chunk::Kind::File(pb::FileChunk { path: path.into(), offset, data: data.to_vec() });
    let bad_streams: Vec<(Vec<pb::CheckpointChunk>, Code, &str)> = vec![
        (vec![], Code::InvalidArgument, "must start with its header"),
        (vec![chunk(file("a", 0, b"x"))], Code::InvalidArgument, "must start with its header"),
        (vec![chunk(header.clone()), chunk(file("../escape", 0, b"x"))], Code::InvalidArgument, "file name"),
        (vec![chunk(header.clone()), chunk(file("a", 5, b"x"))], Code::InvalidArgument, "offset 5"),
        (vec![chunk(header.clone()), chunk(file("a", 0, b"x"))], Code::InvalidArgument, "ended before its trailer"),
        (vec![chunk(header.clone()), chunk(header.clone())], Code::InvalidArgument, "unexpected message"),
        (
            vec![chunk(header.clone()), chunk(file("a", 0, b"x")), chunk(pb::checkpoint_chunk::Kind::Trailer(pb::CheckpointTrailer { files: vec![pb::FileDigest { path: "a".into(), size: 1, sha256: vec![1, 2] }] }))],
            Code::InvalidArgument,
            "SHA-256 of 2 bytes",
        ),
    ];
    for (stream, code, msg) in bad_streams {
        let e = cl.raw().upload_checkpoint(tokio_stream::iter(stream)).await.unwrap_err();
        assert_eq!(e.code(), code, "{e:?}");
        assert!(e.message().contains(msg), "{msg:?} not in {:?}", e.message());
    }
    // Nothing half-written is left in the output dir, only the job record a restarted
    // coordinator would read.
    let left: Vec<String> = std::fs::read_dir(out.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(left, [qdistill_coordinator::service::JOB_RECORD_FILE], "{left:?}");
    // And the coordinator still answers.
    let st = cl.job_status().await.unwrap();
    assert_eq!(st.state, pb::JobState::Running as i32);
    assert_eq!(st.workers.len(), 2);
}

fn step_commit(id: &str, generation: u64, step: u64, rank: u32, batches: Vec<u64>) -> pb::StepCommitRequest {
    pb::StepCommitRequest {
        session_id: id.into(),
        generation,
        step,
        student_rank: rank,
        ce_sum: 1.0,
        kd_sum: 0.5,
        target_tokens: 10,
        grad_norm: 0.1,
        learning_rate: 1e-3,
        sample_ids: batches.iter().map(|b| 100 + b).collect(),
        micro_batches: batches,
    }
}

fn upload_stream(id: &str, generation: u64, step: u64, files: &[(&str, Vec<u8>)]) -> Vec<pb::CheckpointChunk> {
    let mut v = vec![chunk(pb::checkpoint_chunk::Kind::Header(pb::CheckpointHeader { session_id: id.into(), generation, step }))];
    let mut digests = Vec::new();
    for (p, data) in files {
        // Two chunks per file.
        let mid = data.len() / 2;
        v.push(chunk(pb::checkpoint_chunk::Kind::File(pb::FileChunk { path: p.to_string(), offset: 0, data: data[..mid].to_vec() })));
        v.push(chunk(pb::checkpoint_chunk::Kind::File(pb::FileChunk { path: p.to_string(), offset: mid as u64, data: data[mid..].to_vec() })));
        digests.push(pb::FileDigest { path: p.to_string(), size: data.len() as u64, sha256: sha2::Sha256::digest(data).to_vec() });
    }
    v.push(chunk(pb::checkpoint_chunk::Kind::Trailer(pb::CheckpointTrailer { files: digests })));
    v
}

/// Three registered workers of one generation: their sessions, their assignments, and
/// which of them are student ranks 0 and 1.
struct Trio {
    ids: Vec<String>,
    asg: Vec<qdistill_coordinator::state::Assignment>,
    s0: usize,
    s1: usize,
    gen: u64,
}

async fn trio(cl: &mut Client) -> Trio {
    let mut ids = Vec::new();
    for n in ["0", "1", "2"] {
        ids.push(cl.raw().register(register_req(n, PROTOCOL_VERSION)).await.unwrap().into_inner().session_id);
    }
    let mut asg = Vec::new();
    for id in &ids {
        match cl.raw().get_work(pb::GetWorkRequest { session_id: id.clone() }).await.unwrap().into_inner().work {
            Some(pb::get_work_response::Work::Assignment(a)) => asg.push(qdistill_coordinator::convert::assignment_from(a).unwrap().0),
            w => panic!("{w:?}"),
        }
    }
    let students: Vec<usize> = (0..3).filter(|&i| asg[i].role == qdistill_coordinator::state::Role::Student).collect();
    assert_eq!(students.len(), 2);
    let (s0, s1) = if asg[students[0]].role_rank == 0 { (students[0], students[1]) } else { (students[1], students[0]) };
    Trio { gen: asg[0].generation, ids, asg, s0, s1 }
}

/// Three hand-driven workers run a 4-step job: roles, commits, a checkpoint that waits
/// for the slower student's commit, download, the final model, the ledger, and Stop.
#[tokio::test]
async fn a_whole_job_driven_by_hand() {
    let out = tempfile::tempdir().unwrap();
    let c = coordinator(out.path(), 3, 4).await;
    let url = c.url();
    let mut cl = client(&url, TOKEN).await;
    let Trio { ids, asg, s0, s1, gen } = trio(&mut cl).await;

    let files = |step: u64| vec![("adapter_model.safetensors", vec![step as u8; 3000]), ("trainer_state.json", format!("{{\"global_step\":{step}}}").into_bytes())];
    for step in 0..4u64 {
        let b0 = asg[s0].plan.batches_of(0, step);
        let b1 = asg[s1].plan.batches_of(1, step);
        let ack = cl.raw().step_commit(step_commit(&ids[s0], gen, step, 0, b0)).await.unwrap().into_inner();
        assert!(!ack.committed);
        assert_eq!(ack.checkpoint_requested, step % 2 == 1, "save_steps = 2 and the last step");
        if ack.checkpoint_requested {
            // Rank 0 uploads before rank 1 committed: the upload waits for that commit.
            let mut up = cl.clone();
            let stream = upload_stream(&ids[s0], gen, step + 1, &files(step + 1));
            let upload = tokio::spawn(async move { up.raw().upload_checkpoint(tokio_stream::iter(stream)).await });
            tokio::time::sleep(Duration::from_millis(200)).await;
            assert!(!upload.is_finished(), "the checkpoint was stored before every student committed");
            cl.raw().step_commit(step_commit(&ids[s1], gen, step, 1, b1)).await.unwrap();
            let r = upload.await.unwrap().unwrap().into_inner();
            assert_eq!(r.step, step + 1);
        } else {
            assert!(cl.raw().step_commit(step_commit(&ids[s1], gen, step, 1, b1)).await.unwrap().into_inner().committed);
        }
    }
    // The stored checkpoint carries the ledger; a member can download it bit for bit.
    let mut stream = cl.raw().download_checkpoint(pb::DownloadCheckpointRequest { session_id: ids[s1].clone(), step: 2 }).await.unwrap().into_inner();
    let mut got: std::collections::BTreeMap<String, Vec<u8>> = Default::default();
    let mut trailer = None;
    while let Some(m) = stream.message().await.unwrap() {
        match m.kind.unwrap() {
            pb::checkpoint_chunk::Kind::File(f) => got.entry(f.path).or_default().extend_from_slice(&f.data),
            pb::checkpoint_chunk::Kind::Trailer(t) => trailer = Some(t),
            pb::checkpoint_chunk::Kind::Header(h) => assert_eq!(h.step, 2),
        }
    }
    assert_eq!(got["adapter_model.safetensors"], vec![2u8; 3000]);
    let ledger: serde_json::Value = serde_json::from_slice(&got["qdistill_ledger.json"]).unwrap();
    assert_eq!(ledger.as_array().unwrap().len(), 2, "checkpoint-2 holds the ledger of steps 0 and 1");
    for d in trailer.unwrap().files {
        assert_eq!(sha2::Sha256::digest(&got[&d.path]).to_vec(), d.sha256);
    }
    // The final model and the job ledger are on disk, and everybody is told to stop.
    assert_eq!(std::fs::read(out.path().join("final_model/adapter_model.safetensors")).unwrap(), vec![4u8; 3000]);
    let ledger: serde_json::Value = serde_json::from_slice(&std::fs::read(out.path().join("ledger.json")).unwrap()).unwrap();
    let steps = ledger["steps"].as_array().unwrap();
    assert_eq!(steps.len(), 4);
    let mut batches: Vec<u64> = steps.iter().flat_map(|s| s["ranks"].as_array().unwrap().iter()).flat_map(|r| r["micro_batches"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap())).collect();
    batches.sort_unstable();
    assert_eq!(batches, (0..16).collect::<Vec<u64>>(), "4 steps × 4 microbatches, each exactly once");
    let st = cl.job_status().await.unwrap();
    assert_eq!((st.state, st.committed_steps, st.last_checkpoint_step), (pb::JobState::Done as i32, 4, Some(4)));
    for id in &ids {
        let h = cl.raw().heartbeat(pb::HeartbeatRequest { session_id: id.clone(), generation: gen, step: 4 }).await.unwrap().into_inner();
        assert_eq!(h.action, pb::HeartbeatAction::Stop as i32);
    }
    let late = cl.raw().register(register_req("9", PROTOCOL_VERSION)).await.unwrap_err();
    assert_eq!(late.metadata().get("x-qdistill-refusal").unwrap(), "job-over");
    // Everyone heard: the coordinator shuts down by itself.
    let outcome = tokio::time::timeout(Duration::from_secs(10), c.wait()).await.unwrap().unwrap();
    assert_eq!(outcome.committed_steps, 4);
}

/// A drain (SIGTERM) asks student rank 0 for a checkpoint after the steps in progress:
/// a commit of a step that was already committed when the drain began (a retried call,
/// or one whose answer is read just after) asks for none, and the next step's commit
/// does even off the save interval; the drain ends with that checkpoint, and asks for
/// none after it.
#[tokio::test]
async fn a_drain_asks_for_a_checkpoint_only_after_the_steps_committed_before_it() {
    let out = tempfile::tempdir().unwrap();
    let c = coordinator(out.path(), 3, 8).await;
    let url = c.url();
    let mut cl = client(&url, TOKEN).await;
    let Trio { ids, asg, s0, s1, gen } = trio(&mut cl).await;
    let commit = |rank: u32, step: u64| {
        let s = if rank == 0 { s0 } else { s1 };
        step_commit(&ids[s], gen, step, rank, asg[s].plan.batches_of(rank as usize, step))
    };
    for step in 0..3 {
        cl.raw().step_commit(commit(0, step)).await.unwrap();
        assert!(cl.raw().step_commit(commit(1, step)).await.unwrap().into_inner().committed);
    }
    // Poll the drain once so that it takes its starting point (3 committed steps) now.
    let mut drain = Box::pin(c.drain(Duration::from_secs(30)));
    assert!(tokio::time::timeout(Duration::ZERO, &mut drain).await.is_err(), "nothing to wait for yet");
    // Step 2 (checkpoint-3, not a save point) was committed before the drain began.
    assert!(!cl.raw().step_commit(commit(0, 2)).await.unwrap().into_inner().checkpoint_requested, "a checkpoint the drain does not wait for");
    for step in 3..5 {
        let ack = cl.raw().step_commit(commit(0, step)).await.unwrap().into_inner();
        assert!(ack.checkpoint_requested, "step {step} was in progress when the drain began");
        cl.raw().step_commit(commit(1, step)).await.unwrap();
    }
    let stored = cl.raw().upload_checkpoint(tokio_stream::iter(upload_stream(&ids[s0], gen, 5, &[("adapter_model.safetensors", vec![5u8; 100])]))).await;
    assert_eq!(stored.unwrap().into_inner().step, 5);
    assert_eq!(tokio::time::timeout(Duration::from_secs(10), drain).await.unwrap(), Some(5));
    // The drain has its checkpoint: rank 0 goes on until the coordinator stops, and is
    // asked for no further one off the save interval (step 6 ends at 7, not a save point).
    for step in 5..7 {
        let ack = cl.raw().step_commit(commit(0, step)).await.unwrap().into_inner();
        assert_eq!(ack.checkpoint_requested, step == 5, "step {step}: save_steps = 2 only");
        cl.raw().step_commit(commit(1, step)).await.unwrap();
    }
}

#[tokio::test]
async fn an_output_dir_with_checkpoints_needs_resume_to_be_asked_for() {
    let out = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(out.path().join("checkpoint-2")).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let opts = ServeOptions { token: TOKEN.into(), workers: 2, ..ServeOptions::default() };
    let e = start(&config(out.path(), ""), 4, listener, opts.clone()).await.err().unwrap().to_string();
    assert!(e.contains("checkpoint-2") && e.contains("resume_from_checkpoint"), "{e}");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let c = start(&config(out.path(), "resume_from_checkpoint = true"), 4, listener, opts).await.unwrap();
    let mut cl = client(&c.url(), TOKEN).await;
    assert_eq!(cl.job_status().await.unwrap().committed_steps, 2);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let e = start(&config(out.path(), ""), 4, listener, ServeOptions { workers: 2, ..ServeOptions::default() }).await.err().unwrap().to_string();
    assert!(e.contains("token"), "{e}");
}

/// Over gRPC: members that ask for a communicator's NCCL id before its root offered it are
/// held, then all get the root's bytes; one worker without NCCL keeps the generation on TCP.
#[tokio::test]
async fn nccl_ids_are_relayed_from_each_groups_root_to_the_waiting_members() {
    let out = tempfile::tempdir().unwrap();
    let c = coordinator(out.path(), 3, 4).await;
    let mut cl = client(&c.url(), TOKEN).await;
    let mut ids = Vec::new();
    for n in ["0", "1", "2"] {
        let mut r = register_req(n, PROTOCOL_VERSION);
        r.resources.as_mut().unwrap().nccl = true;
        ids.push(cl.raw().register(r).await.unwrap().into_inner().session_id);
    }
    let mut asg = Vec::new();
    for id in &ids {
        match cl.raw().get_work(pb::GetWorkRequest { session_id: id.clone() }).await.unwrap().into_inner().work {
            Some(pb::get_work_response::Work::Assignment(a)) => {
                assert!(a.peers.iter().all(|p| p.nccl), "every peer offered NCCL");
                asg.push(qdistill_coordinator::convert::assignment_from(a).unwrap().0)
            }
            w => panic!("{w:?}"),
        }
    }
    assert!(asg.iter().all(|a| a.nccl()));
    let gen = asg[0].generation;
    let root = asg.iter().position(|a| a.rank == 0).unwrap();
    let req = |i: usize, offer: Vec<u8>| pb::ExchangeNcclIdRequest { session_id: ids[i].clone(), generation: gen, group: "world".into(), offer };
    let waiting: Vec<_> = (0..3)
        .filter(|&i| i != root)
        .map(|i| {
            let mut cl = cl.clone();
            let r = req(i, Vec::new());
            tokio::spawn(async move { cl.raw().exchange_nccl_id(r).await.unwrap().into_inner().unique_id })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(waiting.iter().all(|w| !w.is_finished()), "members are held until the root offers");
    let id: Vec<u8> = (0..128u8).collect();
    assert_eq!(cl.raw().exchange_nccl_id(req(root, id.clone())).await.unwrap().into_inner().unique_id, id);
    for w in waiting {
        assert_eq!(w.await.unwrap(), id);
    }
    // A malformed offer is refused with the reason, and the coordinator carries on.
    let e = cl.raw().exchange_nccl_id(req(root, vec![1, 2, 3])).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("128 bytes, not 3"), "{}", e.message());
    assert!(cl.job_status().await.is_ok());
}
