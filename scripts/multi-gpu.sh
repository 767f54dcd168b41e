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
# Throughput at Llama shapes (random weights of the real shapes, benches/shapes/):
# "llama2" (2 GPUs) runs benches/shapes/distill-8b-1b.toml (8B NF4 teacher -> 1B NF4 +
# LoRA student) (a) as one `qdistill train` process on cuda:0, (b) as a coordinator with a
# teacher worker and a student worker on cuda:0/cuda:1 over NCCL, (c) as the HF-eager
# same-GPU baseline (benches/baselines/distill_step.py); "scale4" (4 GPUs) runs
# benches/shapes/lwf-1b.toml with 1, 2 and 4 LwF students (2 micro-batches per GPU a
# step: the global batch grows with the GPUs) and distill-8b-1b.toml as 1 teacher + 3
# students. Each prints one table: tokens/s (mean over the steps after the first 2),
# ratios, GPU busy % per GPU over those steps (nvidia-smi every 200 ms), and the student's
# recv-wait and all-reduce shares of its step. "scale8" (8 GPUs; QD_GPUS=4 on a node of
# 4) does the same with Llama-3-8B NF4 + LoRA students (LwF on 1, 2, 4, 8 GPUs; 2 teachers
# + 6 students) and kills one of the 8 students mid-run ("node-kill": that run alone).
# QD_LLAMA_STEPS (12) sets their steps.
# QDISTILL_MGPU_DRYRUN=1 runs the same logic on the CPU with tiny models of the same
# vocabulary and tokenizer (no NCCL, no GPU sampling, the baseline in float32).
#
#   scripts/multi-gpu.sh [STEPS] [RUN...]   (runs: equivalence recovery overlap-eq llama2 scale4 scale8 node-kill;
#                                            default equivalence recovery)
#
# Needs a CUDA build of qdistill (QD_BIN, default ~/qd/qdistill, unpacked from
# .carry/A/qdistill.xz when only that is there, else target/release/qdistill), a Python
# with torch and safetensors for the comparison (QD_PYTHON, default python3), and for
# llama2/scale4 the Llama 3 tokenizer (scripts/fetch-assets.sh puts it in
# assets/tokenizers/llama3; or ~/qd/llama3-tokenizer.tar.xz, as device staging carries it).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
DRY="${QDISTILL_MGPU_DRYRUN:-0}"
if [[ -z ${QD_BIN:-} && ! -x ~/qd/qdistill && -f .carry/A/qdistill.xz ]]; then
  mkdir -p ~/qd && xz -dc .carry/A/qdistill.xz > ~/qd/qdistill && chmod +x ~/qd/qdistill
fi
[[ -z ${QD_BIN:-} && -x ~/qd/qdistill ]] && QD_BIN=~/qd/qdistill
BIN="${QD_BIN:-target/release/qdistill}"
# bitsandbytes for the baseline travels unpacked (scripts/device-stage.sh).
[[ -d ~/qd-site && -z ${PYTHONPATH:-} ]] && export PYTHONPATH=~/qd-site
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

# One worker per device against the coordinator on PORT, named w<i>-<device>, logging to
# DIR/NAME-w<i>.log; FLAGS after `--` go to every worker. Sets WPIDS and WLOGS.
start_workers() { # LIMIT DIR NAME PORT DEVICE... [-- FLAGS...]
  local limit=$1 dir=$2 name=$3 port=$4 i devs=() flags=()
  shift 4
  while (( $# )) && [[ $1 != -- ]]; do devs+=("$1"); shift; done
  (( $# )) && shift
  flags=("$@")
  WPIDS=() WLOGS=()
  for i in "${!devs[@]}"; do
    timeout "$limit" "$BIN" worker --coordinator "http://127.0.0.1:$port" --name "w$i-${devs[$i]}" --device "${devs[$i]}" \
      "${flags[@]}" > "$dir/$name-w$i.log" 2>&1 &
    WPIDS+=($!) WLOGS+=("$dir/$name-w$i.log")
  done
}

# Polls the coordinator on PORT until a checkpoint exists and MARGIN more steps are
# committed (or TRIES polls, 0.2 s apart, have passed); prints its last status line.
wait_past_checkpoint() { # PORT MARGIN TRIES
  local st="" _
  for _ in $(seq 1 "$3"); do
    st=$("$BIN" status --coordinator "http://127.0.0.1:$1" 2>/dev/null | head -1)
    [[ $st =~ ([0-9]+)/[0-9]+\ steps\ committed.*checkpoint-([0-9]+) ]] && (( BASH_REMATCH[1] >= BASH_REMATCH[2] + $2 )) && break
    sleep 0.2
  done
  echo "$st"
}

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
  start_workers "$LIMIT" "$OUT" "$name" "$port" "${devs[@]}" -- "${flags[@]}"
  local pids=("${WPIDS[@]}")
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
  echo "  killing the student on cuda:1 at: $(wait_past_checkpoint "$port" 3 200)"
  pkill -KILL -f -- "--name victim" || kill -9 $victim  # the worker, not its `timeout` wrapper
  timeout "$LIMIT" "$BIN" worker --coordinator "http://127.0.0.1:$port" --name replacement --device cuda:1 > "$OUT/$name-replacement.log" 2>&1 &
  local repl=$!
  wait $keeper $repl
  wait $coord
  echo "$name: exit $? in $((SECONDS - t0)) s"
  "$BIN" status --coordinator "http://127.0.0.1:$port" 2>/dev/null | sed 's/^/    /'
  grep -h "generation\|ledger" "$OUT/$name-coordinator.log" | tail -6 | cut -c1-240 | sed 's/^/    /'
  ledger_summary "$OUT/$name/ledger.json"
}

ledger_summary() { # LEDGER.json: every step committed once, generations, rolled-back steps
  [[ -f $1 ]] || { echo "    no ledger at $1"; return; }
  "$PY" - "$1" <<'PYEOF'
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

# ---- llama2 / scale4: throughput at Llama shapes ---------------------------------------
LL="$OUT/llama"
LSTEPS="${QD_LLAMA_STEPS:-12}"
LLIMIT="${QD_LLAMA_LIMIT:-240}"   # seconds any one llama2/scale4 process may take
SHAPES=benches/shapes

llama_setup() { # the model dirs' tokenizer, the data, and (dry run) tiny models of the same vocabulary
  [[ -n ${LL_READY:-} ]] && return 0
  mkdir -p "$LL"
  local src="" d
  for d in "${QD_LLAMA3_TOKENIZER:-}" assets/tokenizers/llama3; do
    [[ -n $d && -f $d/tokenizer.json ]] && { src=$d; break; }
  done
  if [[ -z $src && -f ~/qd/llama3-tokenizer.tar.xz ]]; then
    mkdir -p assets/tokenizers && tar -C assets/tokenizers -xJf ~/qd/llama3-tokenizer.tar.xz && src=assets/tokenizers/llama3
  fi
  [[ -n $src ]] || { echo "no Llama 3 tokenizer: run scripts/fetch-assets.sh, or carry llama3-tokenizer.tar.xz to ~/qd" >&2; return 1; }
  for d in llama-3-8b llama-3.2-1b; do cp "$src/tokenizer.json" "$src/tokenizer_config.json" "$SHAPES/$d/"; done
  LL_SET=(--set "training.max_steps=$LSTEPS")
  LL_TEACHER=$SHAPES/llama-3-8b LL_STUDENT=$SHAPES/llama-3.2-1b
  local records=400 words=1500
  if [[ $DRY == 1 ]]; then
    # Same vocabulary, tokenizer and code paths; hidden sizes a CPU trains in seconds.
    records=64 words=120 LL_TEACHER=$LL/shapes/teacher LL_STUDENT=$LL/shapes/student
    "$PY" - "$SHAPES" "$LL/shapes" <<'PY'
import json, pathlib, shutil, sys
src, dst = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
for name, out, h in [("llama-3-8b", "teacher", 64), ("llama-3.2-1b", "student", 32)]:
    c = json.loads((src / name / "config.json").read_text())
    c.update(hidden_size=h, intermediate_size=2 * h, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=1024)
    c.pop("head_dim", None)
    (dst / out).mkdir(parents=True, exist_ok=True)
    (dst / out / "config.json").write_text(json.dumps(c, indent=1))
    for f in ["tokenizer.json", "tokenizer_config.json"]:
        shutil.copy(src / name / f, dst / out / f)
PY
    LL_SET+=(--set "model.model_name_or_path=$LL_STUDENT" --set data.max_seq_length=128 --set training.per_device_train_batch_size=2
             --set model.compute_dtype=float32 --set device=cpu)
  fi
  # Records longer than a row, so truncation fills every 2048-token row: each step trains
  # the same number of tokens.
  mkdir -p runs/shapes-data
  "$PY" - runs/shapes-data/synthetic-text.jsonl "$records" "$words" <<'PY'
import json, random, sys
r = random.Random(0)
syl = ["ka", "lo", "mi", "ne", "ru", "ta", "vo", "shi", "pen", "dar", "el", "or", "ix", "qua", "bre", "sto"]
words = ["".join(r.choice(syl) for _ in range(r.randint(1, 3))) for _ in range(3000)]
with open(sys.argv[1], "w") as f:
    for _ in range(int(sys.argv[2])):
        f.write(json.dumps({"text": " ".join(r.choice(words) for _ in range(int(sys.argv[3])))}) + "\n")
PY
  LL_READY=1
}

# Samples every GPU's utilization every 200 ms into FILE from when the logs show step 2
# done until they show the last step done (or PID ends): the steady steps only.
gpu_sampler() { # FILE START_RE END_RE PID LOG...
  local file=$1 start=$2 end=$3 pid=$4; shift 4
  [[ $DRY == 1 ]] && return 0
  (
    while kill -0 "$pid" 2>/dev/null && ! grep -qsE -- "$start" "$@"; do sleep 0.1; done
    kill -0 "$pid" 2>/dev/null || exit 0
    nvidia-smi --query-gpu=index,utilization.gpu --format=csv,noheader,nounits -lms 200 > "$file" 2>/dev/null &
    smi=$!
    while kill -0 "$pid" 2>/dev/null && ! grep -qsE -- "$end" "$@"; do sleep 0.1; done
    kill "$smi" 2>/dev/null
  ) &
}

# (a): one `qdistill train` process, teacher and student on cuda:0.
llama_train() { # NAME CONFIG SETTINGS...
  local name=$1 cfg=$2; shift 2
  local t0=$SECONDS
  timeout "$LLIMIT" "$BIN" train "$cfg" "${LL_SET[@]}" --set "output_dir=$LL/$name" "$@" --no-progress > "$LL/$name.log" 2>&1 &
  local pid=$!
  # metrics.jsonl is written from scratch by this run.
  gpu_sampler "$LL/$name.gpu.csv" '"step":2[,}]' "\"step\":$LSTEPS[,}]" $pid "$LL/$name/metrics.jsonl"
  wait $pid
  echo "$name: exit $? in $((SECONDS - t0)) s"
}

# (b): a coordinator and one worker per device; the coordinator gives the roles.
llama_cluster() { # NAME CONFIG COORDINATOR-FLAGS... -- DEVICES...
  local name=$1 cfg=$2; shift 2
  local flags=() devs=()
  while [[ $1 != -- ]]; do flags+=("$1"); shift; done; shift
  devs=("$@")
  local port; port=$(free_port)
  local t0=$SECONDS
  timeout "$LLIMIT" "$BIN" coordinator "$cfg" "${LL_SET[@]}" --set "output_dir=$LL/$name" --set training.save_steps=0 "${flags[@]}" \
    --listen "127.0.0.1:$port" --workers "${#devs[@]}" --heartbeat 1 --lease 60 > "$LL/$name-coordinator.log" 2>&1 &
  local coord=$!
  sleep 1
  start_workers "$LLIMIT" "$LL" "$name" "$port" "${devs[@]}"
  local pids=("${WPIDS[@]}") logs=("${WLOGS[@]}")
  gpu_sampler "$LL/$name.gpu.csv" 'student step timing rank=[0-9]+ step=2 ' "student step timing rank=[0-9]+ step=$LSTEPS " $coord "${logs[@]}"
  wait "${pids[@]}"
  wait $coord
  echo "$name: exit $? in $((SECONDS - t0)) s"
  grep -h "role=" "${logs[@]}" | grep -o "running.*" | sed 's/^/    /' 
}

# (c): the PyTorch baseline on one GPU (a JSON line in NAME.json).
llama_baseline() { # NAME ARGS...
  local name=$1; shift
  local t0=$SECONDS dev=cuda
  local shape=(--batch 4 --seq 2048 --accum 2)
  [[ $DRY == 1 ]] && dev=cpu shape=(--batch 2 --seq 128 --accum 2 --steps 2 --warmup 1)
  CUDA_VISIBLE_DEVICES=0 timeout "$LLIMIT" "$PY" benches/baselines/distill_step.py --teacher "$LL_TEACHER" --student "$LL_STUDENT" \
    "${shape[@]}" --device $dev "$@" > "$LL/$name.log" 2>&1
  echo "$name: exit $? in $((SECONDS - t0)) s"
  grep '^{' "$LL/$name.log" | tail -1 > "$LL/$name.json"
}

# The summary table. A row is NAME:KIND[:GPUS[:REF]] (kind: train | cluster | baseline);
# with REF, efficiency = tok/s / (GPUS x tok/s of REF).
llama_table() { # TITLE ROWS...
  "$PY" - "$LL" "$LSTEPS" "$@" <<'PY'
import json, pathlib, re, sys
out, steps, title, rows = pathlib.Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4:]
WARM = 2

def fields(line):
    return {k: float(v) for k, v in re.findall(r"(\w+)=(-?[0-9.]+(?:e-?[0-9]+)?)\b", line)}

def train_run(name):
    """tok/s over the steps after the first WARM, from metrics.jsonl's running average: with
    the same tokens every step, step n ends at n*tau/tps_n."""
    p = out / name / "metrics.jsonl"
    if not p.exists():
        return None
    tps = {r["step"]: r["tokens_per_sec"] for r in map(json.loads, p.read_text().splitlines())}
    n = max(tps)
    if n <= WARM:
        return None
    # (n - WARM) steps in t_n - t_WARM, in units of tau (tokens per step).
    return {"tok_s": (n - WARM) / (n / tps[n] - WARM / tps[WARM])}

def cluster_run(name):
    tok, recv, red, found = 0.0, [], [], False
    for log in sorted(out.glob(name + "-w*.log")):
        for line in log.read_text(errors="replace").splitlines():
            if "student step timing summary" in line:
                f = fields(line.split("student step timing summary", 1)[1])
                tok += f.get("tokens_per_s", 0.0)
                recv.append(f.get("recv_wait_pct", 0.0))
                red.append(f.get("allreduce_pct", 0.0))
                found = True
    if not found:
        return None
    return {"tok_s": tok, "recv": max(recv), "allreduce": max(red)}

def baseline_run(name):
    p = out / (name + ".json")
    try:
        return json.loads(p.read_text())
    except Exception:
        return None

def busy(name):
    p = out / (name + ".gpu.csv")
    per = {}
    if p.exists():
        for line in p.read_text().splitlines():
            try:
                i, u = [int(x) for x in line.split(",")]
            except ValueError:
                continue
            per.setdefault(i, []).append(u)
    return " ".join("gpu%d %.0f%%" % (i, sum(v) / len(v)) for i, v in sorted(per.items())) or "-"

res = {}
print("\n### %s (%s steps; means over steps %d..%d)\n" % (title, steps, WARM + 1, steps))
print("| run | tok/s | vs same-GPU qdistill | vs HF eager | per-GPU efficiency | GPU busy (steady) | recv wait % | all-reduce % |")
print("|---|---|---|---|---|---|---|---|")
for row in rows:
    name, kind, *rest = row.split(":")
    r = {"train": train_run, "cluster": cluster_run, "baseline": baseline_run}[kind](name)
    res[name] = (r, int(rest[0]) if rest else 1, rest[1] if len(rest) > 1 else None)
for name, (r, gpus, ref) in res.items():
    if r is None:
        print("| %s | failed (see %s/%s*.log) | | | | | | |" % (name, out, name)); continue
    def ratio(ref):
        b = res.get(ref, (None,))[0]
        return "%.2fx" % (r["tok_s"] / b["tok_s"]) if b else "-"
    eff = "-"
    if ref and res.get(ref, (None,))[0]:
        eff = "%.1f%%" % (100 * r["tok_s"] / (gpus * res[ref][0]["tok_s"]))
    pct = lambda k: "%.1f" % r[k] if k in r else "-"
    print("| %s | %.0f | %s | %s | %s | %s | %s | %s |" % (name, r["tok_s"], ratio("same-gpu"), ratio("hf-eager"), eff, busy(name),
                                                          pct("recv"), pct("allreduce")))
PY
}

llama2() {
  llama_setup || return 1
  local cfg=$SHAPES/distill-8b-1b.toml dry=()
  [[ $DRY == 1 ]] && dry=(--set "teacher.model_name_or_path=$LL_TEACHER")
  local d0=cuda:0 d1=cuda:1
  [[ $DRY == 1 ]] && d0=cpu d1=cpu
  llama_train same-gpu "$cfg" --set device=$d0 "${dry[@]}"
  llama_cluster two-gpu "$cfg" "${dry[@]}" -- $d0 $d1
  llama_baseline hf-eager --attn eager
  llama_baseline hf-sdpa --attn sdpa
  llama_table "llama2: 8B NF4 teacher -> 1B NF4+LoRA student" same-gpu:train two-gpu:cluster:2 hf-eager:baseline hf-sdpa:baseline
  [[ -s $LL/hf-eager.json ]] && sed 's/^/    hf-eager: /' "$LL/hf-eager.json"
}

scale4() {
  llama_setup || return 1
  local lwf=$SHAPES/lwf-1b.toml cfg=$SHAPES/distill-8b-1b.toml dry=() d=(cuda:0 cuda:1 cuda:2 cuda:3) n
  [[ $DRY == 1 ]] && dry=(--set "teacher.model_name_or_path=$LL_TEACHER") d=(cpu cpu cpu cpu)
  for n in 1 2 4; do
    # Two micro-batches per student GPU a step.
    llama_cluster "lwf-$n" "$lwf" --set "training.gradient_accumulation_steps=$((2 * n))" -- "${d[@]:0:n}"
  done
  llama_cluster t1s3 "$cfg" "${dry[@]}" --set training.gradient_accumulation_steps=6 --teacher-ranks 1 -- "${d[@]}"
  llama_table "scale4: LwF 1B students on 1, 2, 4 GPUs; 1 teacher + 3 students" lwf-1:cluster:1 lwf-2:cluster:2:lwf-1 lwf-4:cluster:4:lwf-1 t1s3:cluster:4
}

# A cluster run at Llama shapes in which one worker (the last device's) is SIGKILLed once a
# checkpoint exists and the run is 2 steps past it; a fresh worker takes its device. The
# job must re-form (new NCCL communicators), resume from the checkpoint and finish, with
# every step committed exactly once in the ledger.
llama_recovery() { # NAME CONFIG COORDINATOR-FLAGS... -- DEVICES...
  local name=$1 cfg=$2; shift 2
  local flags=() devs=()
  while [[ $1 != -- ]]; do flags+=("$1"); shift; done; shift
  devs=("$@")
  local n=${#devs[@]} port; port=$(free_port)
  local last=$((n - 1)) t0=$SECONDS
  timeout "$LLIMIT" "$BIN" coordinator "$cfg" "${LL_SET[@]}" --set "output_dir=$LL/$name" --set training.save_steps=4 "${flags[@]}" \
    --listen "127.0.0.1:$port" --workers "$n" --min-workers "$last" --heartbeat 0.5 --lease 5 > "$LL/$name-coordinator.log" 2>&1 &
  local coord=$!
  sleep 1
  start_workers "$LLIMIT" "$LL" "$name" "$port" "${devs[@]}"
  local pids=("${WPIDS[@]}")
  echo "  killing worker w$last on ${devs[$last]} at: $(wait_past_checkpoint "$port" 2 900)"
  pkill -KILL -f -- "--name w$last-" || kill -9 "${pids[$last]}"  # the worker, not its `timeout` wrapper
  timeout "$LLIMIT" "$BIN" worker --coordinator "http://127.0.0.1:$port" --name "replacement-${devs[$last]}" --device "${devs[$last]}" \
    > "$LL/$name-replacement.log" 2>&1 &
  local repl=$!
  wait "${pids[@]:0:last}" $repl
  wait $coord
  echo "$name: exit $? in $((SECONDS - t0)) s"
  grep -h "missed its lease\|generation [0-9]*:" "$LL/$name-coordinator.log" | tail -4 | cut -c1-240 | sed 's/^/    /'
  ledger_summary "$LL/$name/ledger.json"
}

# scale8 (a node of G GPUs, 8 by default; QD_GPUS=4 on a 4-GPU machine): Llama-3-8B NF4 +
# LoRA students (random weights): LwF students on 1, 2, 4, … G GPUs (2 micro-batches per GPU
# a step), G/4 NF4 8B teachers serving the other 3G/4 students (2 + 6 on 8 GPUs), then the
# G-student LwF run with one student killed and replaced mid-run.
scale8() {
  llama_setup || return 1
  local lwf=$SHAPES/lwf-1b.toml cfg=$SHAPES/distill-8b-1b.toml n g=${QD_GPUS:-8} d=() sizes=() rows=()
  for ((n = 0; n < g; n++)); do d+=(cuda:$n); done
  for n in 1 2 4 8; do (( n <= g )) && sizes+=("$n"); done
  local s8=(--set "model.model_name_or_path=$SHAPES/llama-3-8b") dry=()
  if [[ $DRY == 1 ]]; then
    s8=(--set "model.model_name_or_path=$LL_TEACHER") dry=(--set "teacher.model_name_or_path=$LL_TEACHER")
    d=("${d[@]/cuda:*/cpu}")
  fi
  for n in "${sizes[@]}"; do
    llama_cluster "lwf8b-$n" "$lwf" "${s8[@]}" --set "training.gradient_accumulation_steps=$((2 * n))" -- "${d[@]:0:n}"
    rows+=("lwf8b-$n:cluster:$n$([[ $n != 1 ]] && echo :lwf8b-1)")
  done
  local t=$((g / 4)) s=$((g - g / 4))
  llama_cluster "t${t}s$s" "$cfg" "${s8[@]}" "${dry[@]}" --set "training.gradient_accumulation_steps=$((2 * s))" --teacher-ranks "$t" -- "${d[@]}"
  llama_table "scale8: 8B LwF students on ${sizes[*]} GPUs; $t teacher(s) + $s students" "${rows[@]}" "t${t}s$s:cluster:$g"
  node_recovery
}

# The G-student LwF run of scale8 (Llama-3-8B shapes) with one student SIGKILLed and
# replaced mid-run; also alone as the run `node-kill`.
node_recovery() {
  llama_setup || return 1
  local n g=${QD_GPUS:-8} d=() s8=(--set "model.model_name_or_path=$SHAPES/llama-3-8b")
  for ((n = 0; n < g; n++)); do d+=(cuda:$n); done
  if [[ $DRY == 1 ]]; then
    s8=(--set "model.model_name_or_path=$LL_TEACHER") d=("${d[@]/cuda:*/cpu}")
  fi
  llama_recovery lwf8b-recovery "$SHAPES/lwf-1b.toml" "${s8[@]}" --set "training.gradient_accumulation_steps=$((2 * g))" -- "${d[@]}"
}

# The overlapped gradient all-reduce (each block's adapter gradients reduced over NCCL as
# its backward ends) against one GPU with the same global batch: 2 LwF students with one
# micro-batch each vs one process with two. With two ranks every sum is a + b in either
# order, so the final adapters must be bit-identical.
overlap_eq() {
  llama_setup || return 1
  local lwf=$SHAPES/lwf-1b.toml d0=cuda:0 d1=cuda:1
  [[ $DRY == 1 ]] && d0=cpu d1=cpu
  llama_train lwf-1gpu "$lwf" --set device=$d0
  llama_cluster lwf-2gpu "$lwf" -- $d0 $d1
  QDISTILL_NCCL_OVERLAP=0 llama_cluster lwf-2gpu-serial "$lwf" -- $d0 $d1
  pairs+=(llama/lwf-2gpu:llama/lwf-1gpu llama/lwf-2gpu-serial:llama/lwf-1gpu llama/lwf-2gpu:llama/lwf-2gpu-serial)
  # Where runs part: each step's loss and gradient norm.
  "$PY" - "$LL" <<'PYEOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
rows = {}
p = out / "lwf-1gpu" / "metrics.jsonl"
if p.exists():
    rows["lwf-1gpu"] = [(r["step"], r["loss"], r["grad_norm"]) for r in map(json.loads, p.read_text().splitlines()) if "grad_norm" in r]
for name in ["lwf-2gpu", "lwf-2gpu-serial"]:
    p = out / name / "ledger.json"
    if p.exists():
        steps = json.loads(p.read_text())["steps"]
        rows[name] = [(s["step"] + 1, sum(r["ce_sum"] + r["kd_sum"] * 0.5 for r in s["ranks"]) / sum(r["target_tokens"] for r in s["ranks"]),
                       s["ranks"][0]["grad_norm"]) for s in steps]
for name, r in rows.items():
    print("   ", name, " ".join("s%d loss %.6f gn %.6f" % x for x in r[:4]))
PYEOF
}

[[ $DRY == 1 ]] || nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
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

[[ $RUNS == *overlap-eq* ]] && overlap_eq
[[ $RUNS == *llama2* ]] && llama2
[[ $RUNS == *scale4* ]] && scale4
[[ $RUNS == *scale8* ]] && scale8
[[ $RUNS == *node-kill* ]] && node_recovery
(( ${#pairs[@]} )) || exit 0

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
