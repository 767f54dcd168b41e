//! The offline teacher cache end to end, on the tiny Llama fixture (2 layers, vocab 256)
//! as teacher and its first layer as student: training from the cache equals training with
//! the live teacher in top-K mode; a corrupt or truncated shard, or a cache built for other
//! data or settings, is refused with an error naming the shard or the setting; the size
//! `teacher-cache` reports is the size of its files.

use std::path::{Path, PathBuf};
use std::process::Command;

use qdistill_worker::teacher_cache::{build_cache, CacheOptions};

mod common;
use common::{fixture_llama, root};

/// Variant 1 has the same character counts as variant 0 (the words upper-cased), so
/// every count agrees and only the token ids differ.
fn write_data(path: &Path, variant: usize) {
    let words = ["red", "fox", "jumps", "over", "lazy", "dog", "blue", "sky", "rain", "falls"];
    let lines: String = (0..24)
        .map(|i| {
            let w = |j: usize| {
                let s = words[(i * 7 + j * 3) % words.len()];
                if variant == 1 { s.to_uppercase() } else { s.to_string() }
            };
            format!("{{\"prompt\": \"{i} {} {}:\", \"completion\": \" {} {} {}\"}}\n", w(0), w(1), w(2), w(3), w(4))
        })
        .collect();
    std::fs::write(path, lines).unwrap();
}

/// Model copies, data and a job config under `dir` (teacher: the 2-layer fixture; student:
/// its layer 0, NF4); returns the config path.
fn write_job(dir: &Path) -> PathBuf {
    for name in ["student", "teacher"] {
        fixture_llama(dir, name);
    }
    let data = dir.join("train.jsonl");
    write_data(&data, 0);
    let cfg = dir.join("job.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"output_dir = "{out}"
seed = 11
[model]
model_name_or_path = "{student}"
keep_layers = "0"
[teacher]
mode = "model"
model_name_or_path = "{teacher}"
output = "topk:8"
[lora]
r = 4
lora_alpha = 8
lora_dropout = 0.1
[distill]
temperature = 2.0
kd_weight = 0.7
loss = "jsd"
beta = 0.3
chunk_tokens = 7
[data]
train_file = "{data}"
max_seq_length = 40
packing = true
eval_split = 0.1
[training]
per_device_train_batch_size = 2
gradient_accumulation_steps = 2
max_steps = 4
learning_rate = 1e-2
logging_steps = 1
"#,
            out = dir.join("out").display(),
            student = dir.join("student").display(),
            teacher = dir.join("teacher").display(),
            data = data.display(),
        ),
    )
    .unwrap();
    cfg
}

fn set(pairs: &[&str]) -> Vec<String> {
    pairs.iter().map(|s| s.to_string()).collect()
}

fn build(cfg: &Path, overrides: &[String], out: &Path) -> anyhow::Result<qdistill_worker::teacher_cache::CacheSummary> {
    build_cache(cfg, overrides, out, &CacheOptions { max_shard_bytes: 3000, progress: false })
}

fn train(cfg: &Path, overrides: &[String], out: &Path) -> anyhow::Result<()> {
    let mut o = overrides.to_vec();
    o.push(format!("output_dir={}", out.display()));
    qdistill_worker::run::train(cfg, &o, false).map(|_| ())
}

/// Adapter tensors as raw f32 bits, by name.
fn adapter_bits(out: &Path) -> Vec<(String, Vec<u32>)> {
    let t = candle_core::safetensors::load(out.join("final_model/adapter_model.safetensors"), &candle_core::Device::Cpu).unwrap();
    let mut v: Vec<(String, Vec<u32>)> = t
        .into_iter()
        .map(|(k, x)| (k, x.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|f| f.to_bits()).collect()))
        .collect();
    v.sort();
    v
}

fn losses(out: &Path) -> Vec<(u64, u64)> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (v["ce"].as_f64().unwrap().to_bits(), v["kd"].as_f64().unwrap().to_bits())
        })
        .collect()
}

/// The same numbers flow whether the teacher's top-K comes from the cache or from the live
/// teacher: with float32 storage, and with float16 storage against a live run that rounds
/// its log-probabilities to float16 the same way. Equality is bitwise (adapters and every
/// step's CE and KD). The cached run also needs no teacher files at all.
#[test]
fn training_from_the_cache_equals_live_top_k_training() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_job(dir.path());
    for dtype in ["float32", "float16"] {
        let o = set(&[&format!("teacher.topk_dtype={dtype}")]);
        let cache = dir.path().join(format!("cache-{dtype}"));
        let summary = build(&cfg, &o, &cache).unwrap();
        assert!(summary.manifest.shards.len() > 1, "small shards: {}", summary.table());
        let live = dir.path().join(format!("live-{dtype}"));
        train(&cfg, &o, &live).unwrap();
        // The teacher's files are moved away: the cached run must not need them.
        std::fs::rename(dir.path().join("teacher"), dir.path().join("teacher.away")).unwrap();
        let cached = dir.path().join(format!("cached-{dtype}"));
        let mut oc = o.clone();
        oc.push(format!("teacher.cache={}", cache.display()));
        let r = train(&cfg, &oc, &cached);
        std::fs::rename(dir.path().join("teacher.away"), dir.path().join("teacher")).unwrap();
        r.unwrap();
        assert_eq!(losses(&cached), losses(&live), "{dtype}: per-step CE/KD differ");
        assert_eq!(adapter_bits(&cached), adapter_bits(&live), "{dtype}: adapters differ");
        assert_eq!(losses(&live).len(), 4);
    }
    // The two storage precisions really give different numbers (the comparison above is
    // not vacuous), and top-K differs from the full-distribution teacher.
    assert_ne!(losses(&dir.path().join("live-float32")), losses(&dir.path().join("live-float16")));
    let full = dir.path().join("full");
    train(&cfg, &set(&["teacher.output=hidden"]), &full).unwrap();
    assert_ne!(losses(&full), losses(&dir.path().join("live-float32")));
}

#[test]
fn corrupt_or_truncated_shard_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_job(dir.path());
    let cache = dir.path().join("cache");
    let m = build(&cfg, &[], &cache).unwrap().manifest;
    let shard = cache.join(&m.shards[1].file);
    let good = std::fs::read(&shard).unwrap();
    let o = set(&[&format!("teacher.cache={}", cache.display())]);
    let mut bad = good.clone();
    bad[good.len() / 2] ^= 0x10;
    std::fs::write(&shard, &bad).unwrap();
    let e = format!("{:#}", train(&cfg, &o, &dir.path().join("a")).unwrap_err());
    assert!(e.contains("shard-00001.bin") && e.contains("corrupt"), "{e}");
    std::fs::write(&shard, &good[..good.len() - 5]).unwrap();
    let e = format!("{:#}", train(&cfg, &o, &dir.path().join("b")).unwrap_err());
    assert!(e.contains("shard-00001.bin") && e.contains("truncated"), "{e}");
    assert!(!dir.path().join("a").exists() && !dir.path().join("b").exists(), "a refused run writes nothing");
}

/// A cache is refused for a run whose teacher numbers would differ, naming the setting.
#[test]
fn a_cache_for_other_data_or_settings_is_refused_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_job(dir.path());
    let cache = dir.path().join("cache");
    build(&cfg, &[], &cache).unwrap();
    let with = |extra: &[&str]| {
        let mut o = set(extra);
        o.push(format!("teacher.cache={}", cache.display()));
        format!("{:#}", train(&cfg, &o, &dir.path().join("out")).unwrap_err())
    };
    for (over, field) in [
        ("seed=12", "seed"),
        ("distill.temperature=1.5", "distill.temperature"),
        ("teacher.output=topk:4", "K of teacher.output"),
        ("teacher.topk_dtype=float32", "teacher.topk_dtype"),
        ("data.max_seq_length=48", "data.max_seq_length"),
        ("training.per_device_train_batch_size=3", "training.per_device_train_batch_size"),
        ("max_steps=5", "optimizer steps"),
    ] {
        let e = with(&[over]);
        assert!(e.contains(field) && e.contains("does not fit this run"), "--set {over}: {e}");
    }
    // Same settings, other contents: only the stream hash can tell.
    write_data(&dir.path().join("train.jsonl"), 1);
    let e = with(&[]);
    assert!(e.contains("tokenized sample stream") && e.contains("data files"), "{e}");
    write_data(&dir.path().join("train.jsonl"), 0);
    // Building into a directory that holds another job's cache is refused as well.
    let e = format!("{:#}", build(&cfg, &set(&["seed=3"]), &cache).err().unwrap());
    assert!(e.contains("seed") && e.contains("another job"), "{e}");
    // Another teacher (other weights under the same path).
    let w = dir.path().join("teacher/model.safetensors");
    let mut bytes = std::fs::read(&w).unwrap();
    let n = bytes.len();
    bytes[n - 1] ^= 1;
    std::fs::write(&w, &bytes).unwrap();
    let e = with(&[]);
    assert!(e.contains("teacher's weight files"), "{e}");
}

/// `qdistill teacher-cache` prints the cache's size; it must be the size of the files on
/// disk, and that must be what the format implies for the job's micro-batches as
/// `qdistill data --dump` lists them: 8 magic bytes per shard, and per micro-batch a 4-byte
/// count plus K·(2 + 2) bytes (f16 log-probability, u16 id) per supervised token.
#[test]
fn cache_size_is_reported_and_is_the_size_of_its_files() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_job(dir.path());
    let cache = dir.path().join("cache");
    let bin = env!("CARGO_BIN_EXE_qdistill");
    let run = |args: &[&str]| {
        let o = Command::new(bin).args(args).current_dir(root()).output().unwrap();
        assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    let (c, out) = (cfg.to_str().unwrap(), cache.to_str().unwrap());
    let text = run(&["teacher-cache", c, "--out", out, "--max-shard-size", "2000", "--no-progress"]);
    let reported: u64 = text
        .split(" bytes (")
        .next()
        .and_then(|s| s.rsplit(' ').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no size in: {text}"));
    let mut on_disk = 0;
    let mut shards = 0;
    for e in std::fs::read_dir(&cache).unwrap().flatten() {
        let name = e.file_name().into_string().unwrap();
        if name.starts_with("shard-") && name.ends_with(".bin") {
            on_disk += e.metadata().unwrap().len();
            shards += 1;
        }
    }
    assert_eq!(reported, on_disk, "{text}");
    assert!(shards > 1 && text.contains(&format!("{shards} shard(s)")), "{text}");
    let dump = dir.path().join("dump.jsonl");
    run(&["data", c, "--dump", dump.to_str().unwrap()]);
    let k = 8u64;
    let mut expected = 8 * shards;
    for line in std::fs::read_to_string(&dump).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        if v["split"] == "train" {
            expected += 4 + v["n_target_tokens"].as_u64().unwrap() * k * 4;
        }
    }
    assert_eq!(on_disk, expected);
    // Running it again finds the finished cache and computes nothing.
    let again = run(&["teacher-cache", c, "--out", out, "--no-progress"]);
    assert!(again.contains("already complete") && again.contains(&format!("{on_disk} bytes")), "{again}");
}
