#!/usr/bin/env bash
# Multi-GPU runs on one machine with two or more GPUs (real SmolLM2 weights): the same
# distillation as one process on one GPU, as one process with the teacher on its own GPU
# (`teacher_device`), and as separate worker processes under a coordinator with teacher
# outputs and gradients over NCCL (and over TCP, `--no-nccl`), then 2 LwF students
# all-reducing over NCCL; prints each run's final adapter against the single-GPU one.
#
# "recovery" kills one of two LwF students (SIGKILL) mid-run and starts a fresh worker on
# its GPU: the job re-forms its NCCL communicators, resumes from the last checkpoint and
# must end with the adapter of an undisturbed single-GPU run.
#
#   scripts/multi-gpu.sh [STEPS] [RUN...]   (runs: equivalence recovery; default both)
#
# Needs a CUDA build of qdistill (QD_BIN, default target/release/qdistill) and a Python with
# torch and safetensors for the comparison (QD_PYTHON, default python3).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
BIN="${QD_BIN:-target/release/qdistill}"
PY="${QD_PYTHON:-python3}"
STEPS="${1:-40}"
RUNS="${*:2}"; RUNS="${RUNS:-equivalence recovery}"
OUT=runs/mg
rm -rf "$OUT" && mkdir -p "$OUT"
# parity.toml's recipe without its starting adapter (the PyTorch side's); an LwF variant
# whose teacher is the student's own base.
sed '/^adapter_name_or_path/d' benches/baselines/parity.toml > "$OUT/model.toml"
awk '/^\[/{sec=$0} !(sec=="[teacher]" && /^(model_name_or_path|quantization)/)' "$OUT/model.toml" \
  | sed 's/^mode = "model"/mode = "lwf"/' > "$OUT/lwf.toml"
common=(--set "training.max_steps=$STEPS" --set model.compute_dtype=bfloat16 --set training.save_steps=0)
export NCCL_NVLS_ENABLE=0 RUST_LOG="${RUST_LOG:-info}" QDISTILL_TOKEN="${QDISTILL_TOKEN:-multi-gpu-check}"
LIMIT="${QD_RUN_LIMIT:-150}"   # seconds any one run may take

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

run_train() { # NAME CONFIG SETTINGS...
  local name=$1 cfg=$2; shift 2
  local t0=$SECONDS
  timeout "$LIMIT" "$BIN" train "$OUT/$cfg.toml" "${common[@]}" --set "output_dir=$OUT/$name" "$@" --no-progress > "$OUT/$name.log" 2>&1
  echo "$name: exit $? in $((SECONDS - t0)) s"
}

run_cluster() { # NAME CONFIG WORKER-FLAGS... -- DEVICES...
  local name=$1 cfg=$2; shift 2
  local flags=() devs=()
  while [[ $1 != -- ]]; do flags+=("$1"); shift; done; shift
  devs=("$@")
  local port; port=$(free_port)
  local t0=$SECONDS
  timeout "$LIMIT" "$BIN" coordinator "$OUT/$cfg.toml" "${common[@]}" --set "output_dir=$OUT/$name" \
    --listen "127.0.0.1:$port" --workers "${#devs[@]}" --heartbeat 1 --lease 20 > "$OUT/$name-coordinator.log" 2>&1 &
  local coord=$!
  sleep 1
  local pids=()
  for i in "${!devs[@]}"; do
    timeout "$LIMIT" "$BIN" worker --coordinator "http://127.0.0.1:$port" --name "w$i-${devs[$i]}" --device "${devs[$i]}" \
      "${flags[@]}" > "$OUT/$name-w$i.log" 2>&1 &
    pids+=($!)
  done
  sleep 8
  "$BIN" status --coordinator "http://127.0.0.1:$port" > "$OUT/$name-status.txt" 2>&1
  wait "${pids[@]}"
  wait $coord
  echo "$name: exit $? in $((SECONDS - t0)) s; status mid-run:"
  sed 's/^/    /' "$OUT/$name-status.txt"
  grep -h "NCCL communicators formed" "$OUT/$name"-w*.log | head -2 | sed 's/^/    /'
}

run_recovery() { # NAME: two LwF students on cuda:0/1, the second killed mid-run and replaced
  local name=$1 port; port=$(free_port)
  local t0=$SECONDS
  timeout "$LIMIT" "$BIN" coordinator "$OUT/lwf.toml" "${common[@]}" --set "output_dir=$OUT/$name" --set training.save_steps=10 \
    --listen "127.0.0.1:$port" --workers 2 --min-workers 1 --heartbeat 0.5 --lease 5 > "$OUT/$name-coordinator.log" 2>&1 &
  local coord=$!
  sleep 1
  timeout "$LIMIT" "$BIN" worker --coordinator "http://127.0.0.1:$port" --name keeper --device cuda:0 > "$OUT/$name-keeper.log" 2>&1 &
  local keeper=$!
  timeout "$LIMIT" "$BIN" worker --coordinator "http://127.0.0.1:$port" --name victim --device cuda:1 > "$OUT/$name-victim.log" 2>&1 &
  local victim=$!
  # Kill once a checkpoint exists and the run is past it.
  local st=""
  for _ in $(seq 1 200); do
    st=$("$BIN" status --coordinator "http://127.0.0.1:$port" 2>/dev/null | head -1)
    [[ $st =~ ([0-9]+)/[0-9]+\ steps\ committed.*checkpoint-([0-9]+) ]] && (( BASH_REMATCH[1] >= BASH_REMATCH[2] + 3 )) && break
    sleep 0.2
  done
  echo "  killing the student on cuda:1 at: $st"
  pkill -KILL -f -- "--name victim" || kill -9 $victim  # the worker, not its `timeout` wrapper
  timeout "$LIMIT" "$BIN" worker --coordinator "http://127.0.0.1:$port" --name replacement --device cuda:1 > "$OUT/$name-replacement.log" 2>&1 &
  local repl=$!
  wait $keeper $repl
  wait $coord
  echo "$name: exit $? in $((SECONDS - t0)) s"
  "$BIN" status --coordinator "http://127.0.0.1:$port" 2>/dev/null | sed 's/^/    /'
  grep -h "generation\|ledger" "$OUT/$name-coordinator.log" | tail -6 | cut -c1-240 | sed 's/^/    /'
  [[ -f $OUT/$name/ledger.json ]] && "$PY" - "$OUT/$name/ledger.json" <<'PYEOF'
import json, sys
led = json.load(open(sys.argv[1]))
steps, back = led["steps"], led["rolled_back"]
nums = [s["step"] for s in steps]
gens = sorted({s["generation"] for s in steps})
ids = [i for s in steps for r in s["ranks"] for i in r["sample_ids"]]
ok = nums == list(range(len(nums)))
print(f"    ledger: steps 0..{len(nums) - 1} each committed once: {ok}; generations {gens}; "
      f"{len(ids)} samples trained; {len(back)} step(s) rolled back and retrained: {[s['step'] for s in back]}")
PYEOF
}

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
pairs=()
if [[ $RUNS == *equivalence* ]]; then
  run_train single model --set device=cuda:0
  run_train two-gpu-inproc model --set device=cuda:1 --set teacher_device=cuda:0
  run_cluster cluster-nccl model -- cuda:0 cuda:1
  run_cluster cluster-tcp model --no-nccl -- cuda:0 cuda:1
  run_train lwf-single lwf --set device=cuda:0
  run_cluster lwf-nccl lwf -- cuda:0 cuda:1
  pairs+=(two-gpu-inproc:single cluster-nccl:single cluster-tcp:single lwf-nccl:lwf-single)
fi
if [[ $RUNS == *recovery* ]]; then
  [[ -d $OUT/lwf-single ]] || run_train lwf-single lwf --set device=cuda:0
  run_recovery lwf-recovery
  pairs+=(lwf-recovery:lwf-single)
fi

"$PY" - "$OUT" "${pairs[@]}" <<'EOF'
import json, sys, pathlib
from safetensors.torch import load_file
out = pathlib.Path(sys.argv[1])
def adapter(name):
    for p in [out / name / "final_model" / "adapter_model.safetensors", out / name / "adapter_model.safetensors"]:
        if p.exists():
            return load_file(str(p))
    return None
def compare(name, ref):
    a, b = adapter(name), adapter(ref)
    if a is None or b is None:
        print(f"| {name} | {ref} | missing adapter |"); return
    worst, identical = 0.0, True
    for k, t in b.items():
        d = (a[k].float() - t.float()).abs().max().item()
        identical &= d == 0
        worst = max(worst, d / max(t.float().abs().max().item(), 1e-30))
    print(f"| {name} | {ref} | {'bit-identical' if identical else f'max rel diff {worst:.2e}'} |")
print("| run | against | final adapter |\n|---|---|---|")
for pair in sys.argv[2:]:
    compare(*pair.split(":"))
for n in ["single", "two-gpu-inproc", "lwf-single"]:
    p = out / n / "all_results.json"
    if p.exists():
        r = json.loads(p.read_text())
        print(n, {k: r[k] for k in sorted(r) if "loss" in k or "kl" in k or "runtime" in k or "tokens" in k})
EOF
