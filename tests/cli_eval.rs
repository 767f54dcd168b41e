//! End-to-end tests of `qdistill eval` and `qdistill generate` on the tiny Llama fixture
//! (tests/fixtures/models/llama with the PEFT adapter of models/llama-peft), given a
//! byte-level tokenizer written here (the fixture has none) and the data files of
//! tests/fixtures/data.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

mod common;
use common::{root, write_chatml_tokenizer};

fn fixture(rel: &str) -> String {
    root().join("tests/fixtures").join(rel).display().to_string()
}

fn qdistill(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_qdistill"))
        .args(args)
        .current_dir(root())
        // Plain log lines, to read the counts from.
        .env("NO_COLOR", "1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run qdistill");
    child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    child.wait_with_output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// GPT-2's byte → char table (`bytes_to_unicode`), which byte-level BPE vocabularies use.
/// The tiny Llama (vocabulary 256) with a ChatML byte-level tokenizer that fills it: three
/// special tokens, then bytes 0..=252, one token each.
fn tiny_model(dir: &Path) -> String {
    let m = dir.join("tiny-llama");
    std::fs::create_dir_all(&m).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(root().join("tests/fixtures/models/llama").join(f), m.join(f)).unwrap();
    }
    write_chatml_tokenizer(&m);
    m.display().to_string()
}

fn eval_args<'a>(model: &'a str, adapter: &'a str, json_out: &'a str, data: &'a str, reh: &'a str, mc: &'a str) -> Vec<&'a str> {
    vec![
        "eval", "--model", model, "--adapter", adapter, "--data", data, "--rehearsal", reh, "--mc", mc, "--max-seq-length", "256",
        "--json", json_out,
    ]
}

#[test]
fn eval_reports_base_adapted_and_change_in_table_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let out = dir.path().join("eval.json");
    let (adapter, data, reh, mc) =
        (fixture("models/llama-peft"), fixture("data/messages.jsonl"), fixture("data/text.jsonl"), fixture("data/mc.jsonl"));
    let mut args = eval_args(&model, &adapter, out.to_str().unwrap(), &data, &reh, &mc);
    // The teacher is the same base model: KL(teacher‖base) is 0 and KL(teacher‖adapted)
    // must equal KL(base‖adapted), which is computed on another path (the model's own base).
    args.extend(["--teacher", &model]);
    let o = qdistill(&args, "");
    assert!(o.status.success(), "eval failed:\n{}", text(&o.stderr));
    let table = text(&o.stdout);
    let report: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let (base, adapted) = (&report["base"], &report["adapted"]);
    for set in ["data", "rehearsal"] {
        let (b, a) = (&base[set], &adapted[set]);
        assert!(b["tokens"].as_u64().unwrap() > 0 && b["tokens"] == a["tokens"], "{set}: {b} {a}");
        for m in [b, a] {
            let (ce, ppl) = (m["ce"].as_f64().unwrap(), m["perplexity"].as_f64().unwrap());
            assert!((ppl / ce.exp() - 1.0).abs() < 1e-12, "{set}: perplexity {ppl} is not exp(CE {ce})");
        }
        assert_ne!(b["ce"], a["ce"], "{set}: the adapter changed nothing");
        assert!(b["kl_teacher"].as_f64().unwrap().abs() < 1e-6, "{set}: KL to an identical teacher: {}", b["kl_teacher"]);
        assert!(b.get("kl_base").is_none());
        let (kt, kb) = (a["kl_teacher"].as_f64().unwrap(), a["kl_base"].as_f64().unwrap());
        assert!(kb > 0.0 && (kt / kb - 1.0).abs() < 1e-5, "{set}: KL(teacher‖adapted) {kt} vs KL(base‖adapted) {kb}");
        // The printed row carries the same numbers.
        let row = table.lines().find(|l| l.starts_with(&format!("{set}: CE"))).unwrap_or_else(|| panic!("no {set} CE row:\n{table}"));
        let cells: Vec<&str> = row.split_whitespace().rev().take(3).collect();
        let (bc, ac) = (b["ce"].as_f64().unwrap(), a["ce"].as_f64().unwrap());
        assert_eq!(cells, vec![format!("{:+.4}", ac - bc), format!("{ac:.4}"), format!("{bc:.4}")], "{row}");
    }
    assert_eq!(base["mc"]["questions"], 12);
    for m in [base, adapted] {
        for k in ["accuracy", "accuracy_norm"] {
            let acc = m["mc"][k].as_f64().unwrap();
            // A multiple of 1/12 within [0, 1].
            assert!((0.0..=1.0).contains(&acc) && ((acc * 12.0) - (acc * 12.0).round()).abs() < 1e-9, "{k} = {acc}");
        }
    }
    for row in ["metric", "data: perplexity", "data: KL(base‖adapted)", "rehearsal: KL(teacher‖model)", "mc: accuracy (length-normalised)"] {
        assert!(table.contains(row), "the table lacks `{row}`:\n{table}");
    }
    assert!(table.lines().next().unwrap().contains("tiny-llama"));
}

#[test]
fn eval_without_adapter_prints_one_column() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let o = qdistill(&["eval", "--model", &model, "--data", &fixture("data/alpaca.jsonl"), "--max-seq-length", "256"], "");
    assert!(o.status.success(), "{}", text(&o.stderr));
    let table = text(&o.stdout);
    assert!(table.contains("value") && !table.contains("adapted"), "{table}");
    assert!(table.lines().any(|l| l.starts_with("data: perplexity")), "{table}");
}

#[test]
fn a_malformed_multiple_choice_line_is_named_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let mc = dir.path().join("questions.jsonl");
    let good = std::fs::read_to_string(fixture("data/mc.jsonl")).unwrap();
    let first_two: String = good.lines().take(2).map(|l| format!("{l}\n")).collect();
    std::fs::write(&mc, format!("{first_two}{}\n", r#"{"question": "Which?", "choices": ["a", "b"], "answer": 5}"#)).unwrap();
    let out = dir.path().join("eval.json");
    let o = qdistill(&["eval", "--model", &model, "--mc", mc.to_str().unwrap(), "--json", out.to_str().unwrap()], "");
    assert!(!o.status.success());
    let e = text(&o.stderr);
    assert!(e.contains("questions.jsonl") && e.contains("line 3") && e.contains("answer"), "{e}");
    assert!(!out.exists());
    let o = qdistill(&["eval", "--model", &model], "");
    assert!(!o.status.success() && text(&o.stderr).contains("nothing to evaluate"), "{}", text(&o.stderr));
}

fn generate(model: &str, extra: &[&str], stdin: &str) -> (String, String) {
    let mut args = vec!["generate", "--model", model, "--max-new-tokens", "12"];
    args.extend_from_slice(extra);
    let o = qdistill(&args, stdin);
    assert!(o.status.success(), "generate {extra:?} failed:\n{}", text(&o.stderr));
    (text(&o.stdout), text(&o.stderr))
}

#[test]
fn generate_is_deterministic_per_seed_and_the_adapter_changes_it() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let adapter = fixture("models/llama-peft");
    let prompt = ["--prompt", "Tell me a story."];
    let greedy = generate(&model, &prompt, "").0;
    assert_eq!(greedy, generate(&model, &prompt, "").0);
    assert!(!greedy.trim().is_empty(), "no text generated");
    let sample = |seed: &str| generate(&model, &[&prompt[..], &["--temperature", "1.0", "--top-k", "0", "--seed", seed]].concat(), "").0;
    assert_eq!(sample("1"), sample("1"));
    assert_ne!(sample("1"), sample("2"));
    assert_ne!(greedy, generate(&model, &[&prompt[..], &["--adapter", adapter.as_str()]].concat(), "").0);
    // The prompt can come from stdin.
    assert_eq!(greedy, generate(&model, &[], "Tell me a story.").0);
}

#[test]
fn chat_keeps_the_conversation_and_reuses_its_cache() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_model(dir.path());
    let (out, log) = generate(&model, &["--chat", "--system", "Be brief."], "Hello there\n\nAnd then?\n/exit\nnever read\n");
    // Two replies, one line each (the tiny model's bytes may include newlines of their own).
    let generated: Vec<&str> = log.lines().filter(|l| l.contains("generated")).collect();
    assert_eq!(generated.len(), 2, "{log}");
    assert!(generated[0].contains("cached_tokens=0"), "{}", generated[0]);
    // The second turn re-renders the conversation; everything up to the first reply was cached.
    let cached: usize = generated[1].split("cached_tokens=").nth(1).unwrap().split_whitespace().next().unwrap().parse().unwrap();
    assert!(cached > 30, "second turn: {}", generated[1]);
    assert!(!out.is_empty());
    for key in ["prompt_tokens=", "generated_tokens=", "tokens_per_sec="] {
        assert!(generated[1].contains(key), "{}", generated[1]);
    }
    let o = qdistill(&["generate", "--model", &model, "--chat", "--no-chat-template"], "");
    assert!(!o.status.success() && text(&o.stderr).contains("chat template"), "{}", text(&o.stderr));
}
