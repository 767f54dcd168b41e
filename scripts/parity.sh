#!/usr/bin/env bash
# Distillation-quality parity: the run of benches/baselines/parity.toml in qdistill and in
# the PyTorch reference (HF transformers + PEFT + bitsandbytes), same batches, same initial
# adapter, then the comparison table (BENCHMARKS.md "Distillation quality").
#
#   scripts/parity.sh [--device cuda]     (from the repository root, after fetch-assets.sh)
#
# Needs: a release build of qdistill (QD_BIN, default target/release/qdistill) and a Python
# with torch, transformers (+ gguf), peft and bitsandbytes (QD_PYTHON, default python3).
# Writes everything under runs/parity*.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
BIN="${QD_BIN:-target/release/qdistill}"
PY="${QD_PYTHON:-python3}"
CFG=benches/baselines/parity.toml
dev=cpu
[[ "${1:-}" == "--device" ]] && dev="$2"
qd_dev=$([[ $dev == cuda ]] && echo cuda:0 || echo "$dev")
mkdir -p runs
rm -rf runs/parity runs/parity-init
"$BIN" data "$CFG" --set device="$qd_dev" --dump runs/parity-batches.jsonl
"$PY" benches/baselines/distill_parity.py init --config "$CFG" --out runs/parity-init
"$BIN" train "$CFG" --set device="$qd_dev" --no-progress 2>&1 | tee runs/parity-qdistill.log
"$PY" benches/baselines/distill_parity.py train --config "$CFG" --device "$dev" \
  --batches runs/parity-batches.jsonl --init runs/parity-init --out runs/parity-torch.json 2>&1 | tee runs/parity-torch.log
"$PY" benches/baselines/parity_compare.py runs/parity/all_results.json runs/parity-torch.json \
  runs/parity/metrics.jsonl | tee runs/parity-compare.md
