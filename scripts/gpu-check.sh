#!/usr/bin/env bash
# The one GPU check: CUDA correctness (fixtures, NF4 kernel), qdistill's benchmarks, then
# the PyTorch baselines in the same session, so every ratio compares one GPU's numbers.
# Run from the repository root on the GPU machine:
#
#   scripts/gpu-check.sh [selftest] [bench] [baselines] [profile]   (default: the first three)
#
# `profile` runs one training step of QD_PROFILE_CASE (default "lora bf16 8b 2x2048 nogc")
# under Nsight Compute and sums its kernel time by kind (benches/ncu_step.py).
# Inputs: the CUDA build of qdistill (../shared/cuda/build.sh --release --features cuda,
# stripped) at $QD_BIN (default .carry/qdistill, or .carry/qdistill.xz); the Python packages
# the GPU image lacks (bitsandbytes, liger-kernel, Unsloth) as .carry/pysite.tar.xz
# (../shared/baselines/make-site.sh), unpacked once to ~/qd-site.
# Knobs: QD_SHAPES (default "1b,8b"), QD_ITERS (timed steps, default 3), QD_ONLY (bench
# case kinds, e.g. "kernels,qlora"; default all), QD_BASELINES
# (default "kernels 8b-nogc 8b-gc 8b-nf4 1b-nogc unsloth-8b-nogc unsloth-8b-nf4"), QD_DEADLINE (seconds from the start
# after which no further stage starts and running ones are cut, default 570).
# Logs and the comparison table go to $OUT (default /tmp/gpu-check).
set -uo pipefail
OUT="${OUT:-/tmp/gpu-check}"
mkdir -p "$OUT"
root="$(pwd)"
# The baselines sit beside this script's repository (also when the script travels as a copy).
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BIN="${QD_BIN:-$root/.carry/qdistill}"
export LD_LIBRARY_PATH="/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}" NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
if [[ -f "$root/.carry/pysite.tar.xz" && ! -d ~/qd-site ]]; then
  mkdir -p ~/qd-site && tar -C ~/qd-site -xJf "$root/.carry/pysite.tar.xz"
fi
[[ -d ~/qd-site ]] && export PYTHONPATH=~/qd-site${PYTHONPATH:+:$PYTHONPATH}
start=$(date +%s)
deadline=$((start + ${QD_DEADLINE:-570}))
# Seconds a stage may take: its own limit, cut to what is left before the deadline.
budget() { local left=$((deadline - $(date +%s) - 5)); echo $(( left < $1 ? left : $1 )); }
if [[ ! -x "$BIN" && -f "$BIN.xz" ]]; then
  # The binary may travel compressed.
  python3 -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], 'wb'))" "$BIN.xz" /tmp/qdistill
  chmod +x /tmp/qdistill
  BIN=/tmp/qdistill
fi
stages=("$@")
[[ ${#stages[@]} -eq 0 ]] && stages=(selftest bench baselines)
want() { [[ " ${stages[*]} " == *" $1 "* ]]; }
status=0

{
  date -u +"date %Y-%m-%d %H:%M UTC"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'peft', peft.__version__)"
  python3 -c "import bitsandbytes; print('bitsandbytes', bitsandbytes.__version__)" 2>&1 | tail -1
} 2>&1 | tee "$OUT/env.txt"

if want selftest; then
  echo "== selftest"
  timeout "$(budget 150)" "$BIN" selftest --fixtures "${QD_FIXTURES:-tests/fixtures}" 2>&1 | tee "$OUT/selftest.log" || status=1
fi

if want bench; then
  echo "== qdistill bench"
  timeout "$(budget 360)" "$BIN" bench --shapes "${QD_SHAPES:-1b,8b}" --iters "${QD_ITERS:-3}" ${QD_ONLY:+--only "$QD_ONLY"} 2>&1 | tee "$OUT/bench.log" || status=1
fi

if want baselines; then
  echo "== baselines"
  cd "$here/benches/baselines"
  run() {
    local t; t=$(budget "$1")
    if (( t < 30 )); then echo "-- skipped (deadline): ${*:2}"; return; fi
    echo "-- ${*:2}"
    timeout "$t" "${@:2}" 2>&1 | grep -v "Warning\|warn(" | tee -a "$OUT/baselines.log"
  }
  for b in ${QD_BASELINES:-kernels 8b-nogc 8b-gc 8b-nf4 1b-nogc unsloth-8b-nogc unsloth-8b-nf4}; do
    case "$b" in
      kernels) run 120 python3 qd_kernels.py ;;
      8b-nogc) run 120 python3 hf_peft_step.py 8b 2 2048 nogc --no-teacher ;;
      8b-gc) run 150 python3 hf_peft_step.py 8b 4 2048 gc ;;
      8b-nf4) run 180 python3 hf_peft_step.py 8b 4 2048 gc nf4 ;;
      8b-nf4-nogc) run 150 python3 hf_peft_step.py 8b 2 2048 nogc nf4 --no-teacher ;;
      1b-nogc) run 90 python3 hf_peft_step.py 1b 2 2048 nogc --no-teacher ;;
      1b-gc) run 90 python3 hf_peft_step.py 1b 4 2048 gc ;;
      unsloth-8b-nogc) run 240 python3 unsloth_step.py 8b 2 2048 nogc ;;
      unsloth-8b-gc) run 180 python3 unsloth_step.py 8b 4 2048 gc ;;
      unsloth-8b-nf4) run 180 python3 unsloth_step.py 8b 4 2048 gc nf4 ;;
      unsloth-1b-nogc) run 120 python3 unsloth_step.py 1b 2 2048 nogc ;;
      *) echo "unknown baseline $b" ;;
    esac
  done
  cd "$root"
fi

if want profile; then
  echo "== profile (Nsight Compute)"
  command -v ncu > /dev/null || PATH="$PATH:$(dirname "$(ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)")"
  timeout "$(budget 400)" python3 "$here/benches/ncu_step.py" "$BIN" "${QD_PROFILE_CASE:-lora bf16 8b 2x2048 nogc}" "$OUT" 2>&1 \
    | grep -v "^==PROF==" | tee "$OUT/profile.txt" | sed -n '/last step/,/^Top/p' || status=1
fi

if [[ -f "$OUT/bench.log" || -f "$OUT/baselines.log" ]]; then
  echo "== qdistill vs baselines (same machine, same session)"
  python3 "$here/benches/baselines/compare.py" "$OUT"/bench.log "$OUT"/baselines.log 2>/dev/null | tee "$OUT/compare.md"
fi
if [[ -f "$OUT/selftest.log" ]] && grep -q "| FAIL |" "$OUT/selftest.log"; then
  echo "selftest: some checks FAILED (see the table above)"
fi
exit $status
