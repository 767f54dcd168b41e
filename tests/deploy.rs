//! The deployment files under deploy/: every kustomize overlay renders, passes
//! `kubernetes-validate --strict` (the Kubernetes OpenAPI schemas, no unknown fields) and
//! yamllint; every `qdistill` command line in the rendered manifests is accepted by the
//! real binary's argument parser; the job configs the ConfigMaps carry parse as qdistill
//! configs; the images build qdistill and run it as a non-root user from files that exist.
//!
//! kubectl, kubernetes-validate and yamllint are external tools. Without them the render
//! and validation test skips, unless QDISTILL_TEST_DEPLOY_TOOLS=1 (CI sets it), which
//! makes a missing tool a failure. The command-line check then reads the base manifests
//! directly, so it always runs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

const OVERLAYS: &[&str] = &["single-node", "multi-node", "cpu-smoke"];
/// The oldest Kubernetes the manifests are for: backoffLimitPerIndex is GA from 1.33.
const KUBERNETES_VERSION: &str = "1.33.0";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn tools_required() -> bool {
    std::env::var("QDISTILL_TEST_DEPLOY_TOOLS").is_ok_and(|v| v == "1")
}

/// `name` from QDISTILL_TEST_DEPLOY_BIN, else from PATH.
fn tool(name: &str) -> Option<PathBuf> {
    let dirs = std::env::var_os("QDISTILL_TEST_DEPLOY_BIN")
        .into_iter()
        .flat_map(|d| std::env::split_paths(&d).collect::<Vec<_>>())
        .chain(std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect::<Vec<_>>()).unwrap_or_default());
    dirs.map(|d| d.join(name)).find(|p| p.is_file())
}

fn run(cmd: &mut Command, what: &str) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{what} failed ({}):\n{text}", out.status);
    text
}

fn render(kubectl: &Path, overlay: &str) -> String {
    let dir = root().join("deploy/overlays").join(overlay);
    let out = Command::new(kubectl).arg("kustomize").arg(&dir).output().unwrap();
    assert!(out.status.success(), "kubectl kustomize {}:\n{}", dir.display(), String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn overlays_render_and_pass_kubernetes_validate_and_yamllint() {
    let tools: Vec<_> = ["kubectl", "kubernetes-validate", "yamllint"].iter().map(|t| (*t, tool(t))).collect();
    let missing: Vec<&str> = tools.iter().filter(|(_, p)| p.is_none()).map(|(t, _)| *t).collect();
    if !missing.is_empty() {
        assert!(!tools_required(), "QDISTILL_TEST_DEPLOY_TOOLS=1 but {missing:?} not found (QDISTILL_TEST_DEPLOY_BIN or PATH)");
        eprintln!("skipped: {missing:?} not installed (.ci/run installs them)");
        return;
    }
    let [kubectl, validate, yamllint] = [0, 1, 2].map(|i| tools[i].1.clone().unwrap());
    let tmp = tempfile::tempdir().unwrap();
    let lint_config = root().join("deploy/.yamllint.yaml");
    let mut rendered = Vec::new();
    for overlay in OVERLAYS {
        let text = render(&kubectl, overlay);
        let path = tmp.path().join(format!("{overlay}.yaml"));
        std::fs::write(&path, &text).unwrap();
        let report = run(
            Command::new(&validate).args(["--strict", "-k", KUBERNETES_VERSION]).arg(&path),
            &format!("kubernetes-validate --strict {overlay}"),
        );
        // One "passed" line per object: the validator saw all of them.
        let objects = text.lines().filter(|l| l.starts_with("kind: ")).count();
        let passed = report.lines().filter(|l| l.contains(" passed ")).count();
        assert_eq!(passed, objects, "{overlay}: {objects} objects rendered, {passed} validated:\n{report}");
        for kind in ["Deployment", "Job", "Service", "ConfigMap", "Secret", "PersistentVolumeClaim"] {
            assert!(text.lines().any(|l| l == format!("kind: {kind}")), "{overlay} renders no {kind}");
        }
        rendered.push(path);
    }
    run(
        Command::new(&yamllint).arg("--strict").arg("-c").arg(&lint_config).arg(root().join("deploy")).args(&rendered),
        "yamllint",
    );
}

/// Every YAML document of a manifest stream.
fn documents(text: &str) -> Vec<serde_yaml::Value> {
    serde_yaml::Deserializer::from_str(text).map(|d| serde::Deserialize::deserialize(d).unwrap()).filter(|v: &serde_yaml::Value| !v.is_null()).collect()
}

fn str_list(v: &serde_yaml::Value) -> Vec<String> {
    v.as_sequence().map(|s| s.iter().map(|x| x.as_str().expect("a string").to_string()).collect()).unwrap_or_default()
}

/// A container's environment as the kubelet would set it, with stand-in values for what
/// only exists in a cluster (the pod's name and IP, Secret contents).
fn container_env(c: &serde_yaml::Value) -> HashMap<String, String> {
    let mut env = HashMap::new();
    for e in c["env"].as_sequence().into_iter().flatten() {
        let name = e["name"].as_str().unwrap().to_string();
        let value = match (&e["value"], &e["valueFrom"]) {
            (serde_yaml::Value::String(v), _) => v.clone(),
            (_, from) if from["fieldRef"]["fieldPath"].as_str() == Some("status.podIP") => "10.0.0.7".into(),
            (_, from) if from["fieldRef"].is_mapping() => "qdistill-workers-0-abcde".into(),
            (_, from) if from["secretKeyRef"].is_mapping() => "0123456789abcdef".into(),
            other => panic!("env {name}: unexpected source {other:?}"),
        };
        env.insert(name, value);
    }
    env
}

/// Kubernetes' `$(VAR)` expansion in command and args: defined variables are replaced,
/// `$$` is a literal `$`, anything else stays as written.
fn expand(arg: &str, env: &HashMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = arg;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some((name, tail)) = after.strip_prefix('(').and_then(|a| a.split_once(')')) {
            match env.get(name) {
                Some(v) => out.push_str(v),
                None => out.push_str(&format!("$({name})")),
            }
            rest = tail;
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

struct CommandLine {
    origin: String,
    args: Vec<String>,
    env: HashMap<String, String>,
}

/// The `qdistill` invocations of the pod templates in `docs`.
fn command_lines(docs: &[serde_yaml::Value], origin: &str) -> Vec<CommandLine> {
    let mut out = Vec::new();
    for d in docs {
        let containers = &d["spec"]["template"]["spec"]["containers"];
        for c in containers.as_sequence().into_iter().flatten() {
            let command = str_list(&c["command"]);
            assert_eq!(command, ["qdistill"], "{origin}: container {:?} runs {command:?}", c["name"]);
            let env = container_env(c);
            let args: Vec<String> = str_list(&c["args"]).iter().map(|a| expand(a, &env)).collect();
            for a in &args {
                assert!(!a.contains("$("), "{origin}: `{a}` names a variable the container does not define");
            }
            out.push(CommandLine { origin: format!("{origin} {}/{}", d["kind"].as_str().unwrap(), d["metadata"]["name"].as_str().unwrap()), args, env });
        }
    }
    out
}

/// Whether the real `qdistill` binary accepts `line` (it parses and exits when
/// QDISTILL_PARSE_ONLY=1); the environment is exactly the container's, since some flags
/// come from it (QDISTILL_TOKEN).
fn check_parses(line: &CommandLine) {
    let out = Command::new(env!("CARGO_BIN_EXE_qdistill"))
        .args(&line.args)
        .env_clear()
        .envs(&line.env)
        .env("QDISTILL_PARSE_ONLY", "1")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}: `qdistill {}` is refused by qdistill's argument parser:\n{}",
        line.origin,
        line.args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The manifests to check: rendered overlays when kubectl is there, else the base.
fn manifests() -> Vec<(String, String)> {
    match tool("kubectl") {
        Some(kubectl) => OVERLAYS.iter().map(|o| (o.to_string(), render(&kubectl, o))).collect(),
        None => {
            assert!(!tools_required(), "QDISTILL_TEST_DEPLOY_TOOLS=1 but kubectl is not installed");
            ["coordinator.yaml", "workers.yaml"]
                .iter()
                .map(|f| (format!("base/{f}"), std::fs::read_to_string(root().join("deploy/base").join(f)).unwrap()))
                .collect()
        }
    }
}

#[test]
fn every_qdistill_command_line_in_the_manifests_parses() {
    let mut subcommands = Vec::new();
    for (origin, text) in manifests() {
        for line in command_lines(&documents(&text), &origin) {
            check_parses(&line);
            subcommands.push(line.args.first().cloned().unwrap_or_default());
        }
    }
    // Not vacuous: the coordinator and the workers were both found (and checked).
    assert!(subcommands.iter().any(|s| s == "coordinator"), "no coordinator command line found: {subcommands:?}");
    assert!(subcommands.iter().any(|s| s == "worker"), "no worker command line found: {subcommands:?}");
}

/// A check that can fail: the parser refuses a flag qdistill does not have.
#[test]
fn the_parse_check_refuses_an_unknown_flag() {
    let line = CommandLine { origin: "test".into(), args: vec!["worker".into(), "--coordinator=http://c:1".into(), "--gpus=8".into()], env: HashMap::from([("QDISTILL_TOKEN".to_string(), "t".to_string())]) };
    let r = std::panic::catch_unwind(|| check_parses(&line));
    let msg = *r.expect_err("an unknown flag must be refused").downcast::<String>().unwrap();
    assert!(msg.contains("--gpus"), "{msg}");
}

#[test]
fn kubernetes_variable_expansion_follows_the_kubelet() {
    let env = HashMap::from([("A".to_string(), "x".to_string())]);
    assert_eq!(expand("--n=$(A):7000", &env), "--n=x:7000");
    assert_eq!(expand("$$(A) $(B) $", &env), "$(A) $(B) $");
}

/// The job config every ConfigMap carries parses as a qdistill config, with the
/// overrides the coordinator's command line adds.
#[test]
fn the_job_configs_parse_with_the_coordinators_overrides() {
    let mut seen = 0;
    for (origin, text) in manifests() {
        let docs = documents(&text);
        let overrides: Vec<String> = command_lines(&docs, &origin)
            .into_iter()
            .filter(|l| l.args.first().map(String::as_str) == Some("coordinator"))
            .flat_map(|l| l.args.iter().filter_map(|a| a.strip_prefix("--set=").map(str::to_string)).collect::<Vec<_>>())
            .collect();
        let tomls: Vec<(String, String)> = if origin.starts_with("base/") {
            vec![("base/job.toml".into(), std::fs::read_to_string(root().join("deploy/base/job.toml")).unwrap())]
        } else {
            docs.iter()
                .filter(|d| d["kind"].as_str() == Some("ConfigMap"))
                .filter_map(|d| d["data"]["job.toml"].as_str().map(|t| (format!("{origin} ConfigMap"), t.to_string())))
                .collect()
        };
        assert!(!tomls.is_empty(), "{origin}: no ConfigMap with a job.toml");
        for (what, t) in tomls {
            let cfg = qdistill_common::config::parse(&t, qdistill_common::config::ConfigFormat::Toml, &what, &overrides)
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(cfg.output_dir, Path::new("/checkpoints/run"), "{what}: output_dir must be on the checkpoint volume");
            seen += 1;
        }
    }
    assert!(seen > 0);
}

/// The instructions of a Dockerfile's last stage, and every COPY source taken from the
/// build context (not from another stage) in any stage.
struct Dockerfile {
    final_stage: Vec<(String, String)>,
    context_sources: Vec<String>,
    text: String,
}

fn parse_dockerfile(path: &Path) -> Dockerfile {
    let text = std::fs::read_to_string(path).unwrap();
    // Join continuation lines, drop comments and blank lines.
    let mut lines = Vec::new();
    let mut cur = String::new();
    for l in text.lines() {
        let t = l.trim();
        if t.starts_with('#') || (t.is_empty() && cur.is_empty()) {
            continue;
        }
        match t.strip_suffix('\\') {
            Some(head) => cur.push_str(head),
            None => {
                cur.push_str(t);
                lines.push(std::mem::take(&mut cur));
            }
        }
    }
    let mut stages: Vec<Vec<(String, String)>> = Vec::new();
    let mut context_sources = Vec::new();
    for l in lines {
        let (op, rest) = l.split_once(char::is_whitespace).unwrap_or((&l, ""));
        let op = op.to_ascii_uppercase();
        if op == "FROM" {
            stages.push(Vec::new());
        }
        if op == "COPY" || op == "ADD" {
            let words: Vec<&str> = rest.split_whitespace().collect();
            if !words.iter().any(|w| w.starts_with("--from=")) {
                let paths: Vec<&str> = words.iter().copied().filter(|w| !w.starts_with("--")).collect();
                context_sources.extend(paths[..paths.len() - 1].iter().map(|s| s.to_string()));
            }
        }
        if let Some(stage) = stages.last_mut() {
            stage.push((op, rest.trim().to_string()));
        }
    }
    Dockerfile { final_stage: stages.pop().unwrap_or_default(), context_sources, text }
}

#[test]
fn the_images_run_qdistill_as_a_non_root_user_from_files_that_exist() {
    for (name, features) in [("Dockerfile", Some("--features cuda")), ("Dockerfile.cpu", None)] {
        let path = root().join("deploy").join(name);
        let d = parse_dockerfile(&path);
        let user = d.final_stage.iter().rev().find(|(op, _)| op == "USER").map(|(_, u)| u.clone());
        let user = user.unwrap_or_else(|| panic!("{name}: the runtime stage sets no USER (it would run as root)"));
        let uid = user.split(':').next().unwrap();
        assert!(uid != "root" && uid != "0", "{name}: USER {user} is root");
        let entry = d.final_stage.iter().find(|(op, _)| op == "ENTRYPOINT").map(|(_, e)| e.clone());
        assert_eq!(entry.as_deref(), Some(r#"["qdistill"]"#), "{name}: ENTRYPOINT");
        assert!(!d.context_sources.is_empty(), "{name}: copies nothing from the build context");
        for src in &d.context_sources {
            // The build context is the repository root (see the file's header).
            assert!(root().join(src).exists(), "{name}: COPY {src}: no such path in the repository");
        }
        let build = d.text.lines().find(|l| l.contains("cargo build")).unwrap_or_else(|| panic!("{name}: no cargo build"));
        assert!(build.contains("--release") && build.contains("--locked"), "{name}: {build}");
        if let Some(f) = features {
            assert!(build.contains(f), "{name}: the build must use {f}: {build}");
            assert!(d.text.contains("nvidia/cuda:${CUDA_VERSION}-runtime-"), "{name}: the runtime stage must be the CUDA runtime image");
            assert!(d.text.contains("ARG CUDA_VERSION=13.0."), "{name}: CUDA 13.0");
            assert!(d.text.contains("ARG CUDA_COMPUTE_CAP=90"), "{name}: CUDA_COMPUTE_CAP build arg, default 90");
        }
    }
}
