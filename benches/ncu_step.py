#!/usr/bin/env python3
"""Where one training step's GPU time goes, kernel by kernel, from Nsight Compute.

Runs one `qdistill bench` case under ncu (kernel durations only: one pass, no replay,
clocks left alone) and sums the last full step, the kernels between the last two AdamW
launches, by kind:

    python3 benches/ncu_step.py QDISTILL_BIN "lora bf16 8b 2x2048 nogc" [OUT_DIR]

Each kernel is classified by its name: cuBLAS's small-tile and split-K GEMMs are the
rank-16 LoRA products (x·Aᵀ, dy·B, dA, dB); an accumulating (β = 1) full-size GEMM right
after one of them adds the LoRA branch onto y or dX; the other GEMMs are the base weights'
and the LM head's.
"""
import collections
import csv
import io
import os
import re
import subprocess
import sys

bin_, case = sys.argv[1], sys.argv[2]
out = sys.argv[3] if len(sys.argv) > 3 else "/tmp"
csv_path = os.path.join(out, "ncu-step.csv")
if bin_.endswith(".csv"):
    # Summarise an earlier run's CSV: `ncu_step.py FILE.csv "case"`.
    csv_path = bin_
else:
    cmd = [
        "ncu", "--metrics", "gpu__time_duration.sum", "--clock-control", "none", "--csv",
        "--print-units", "base", "--log-file", csv_path,
        bin_, "bench", "--shapes", case.split()[2], "--only", case, "--iters", "1", "--warmup", "1",
    ]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=False)
text = open(csv_path).read()
start = text.find('"ID"')
rows = list(csv.DictReader(io.StringIO(text[start:])))
kernels = [(r["Kernel Name"], r["Grid Size"], r["Block Size"], float(r["Metric Value"].replace(",", "")) / 1e3) for r in rows
           if r.get("Metric Name") == "gpu__time_duration.sum"]
adam = [i for i, k in enumerate(kernels) if k[0].startswith("adamw")]
# The optimizer may launch more than once a step: a step ends at its last AdamW launch.
ends = [i for j, i in enumerate(adam) if j + 1 == len(adam) or adam[j + 1] - i > 16]
if len(ends) < 2:
    sys.exit(f"fewer than two optimizer steps among {len(kernels)} kernels")
step = kernels[ends[-2] + 1 : ends[-1] + 1]


RANK16 = re.compile(r"splitK|_tss_|_tst_(16|32)x")


def kind(name, prev):
    """What a kernel does, from its name and the kind of the kernel before it."""
    n = name.lower()
    if "gemm" in n or "nvjet" in n or "xmma" in n or "cutlass" in n:
        if RANK16.search(name):
            return "gemm rank-16 (x·Aᵀ, dy·B, dA, dB)"
        # A full-size product right after a rank-16 one, accumulating (β = 1): the LoRA
        # branch added onto y (forward) or dX (backward).
        if "badd" in n and prev.startswith("gemm rank-16"):
            return "gemm LoRA add onto y / dX (β = 1)"
        return "gemm base weights / LM head"
    for key, label in [
        ("flash", "attention"), ("rms", "rmsnorm"), ("rope", "rope"), ("head_copy", "head transpose"),
        ("glu", "swiglu"), ("fused_add", "residual add"), ("badd_", "residual add (candle)"),
        ("loss", "fused loss"), ("adamw", "optimizer"), ("norm", "optimizer"), ("cast", "optimizer"),
        ("nf4", "nf4 dequant"), ("ucopy", "strided copy (candle)"), ("copy", "copy"),
        ("affine", "elementwise"), ("fill", "fill"), ("const_set", "fill"), ("index", "embedding"),
        ("emb", "embedding"), ("gather", "embedding"), ("reduce", "gemm rank-16 (x·Aᵀ, dy·B, dA, dB)"),
    ]:
        if key in n:
            return label
    return "other: " + name[:50]


kinds = []
for name, grid, block, us in step:
    kinds.append(kind(name, kinds[-1] if kinds else ""))
total = sum(k[3] for k in step)
by_kind = collections.defaultdict(lambda: [0.0, 0])
by_name = collections.defaultdict(lambda: [0.0, 0])
for (name, grid, block, us), k in zip(step, kinds):
    by_kind[k][0] += us
    by_kind[k][1] += 1
    by_name[(k, name[:90], grid)][0] += us
    by_name[(k, name[:90], grid)][1] += 1
print(f"\n{case}: last step {len(step)} kernels, {total / 1e3:.1f} ms of kernel time")
print("| kind | ms | share | launches |\n|---|---|---|---|")
for k, (us, n) in sorted(by_kind.items(), key=lambda x: -x[1][0]):
    print(f"| {k} | {us / 1e3:.2f} | {100 * us / total:.1f}% | {n} |")
print("\nTop kernels (name, grid):")
for (k, name, grid), (us, n) in sorted(by_name.items(), key=lambda x: -x[1][0])[:40]:
    print(f"{us / 1e3:8.2f} ms {n:5d}x  {k:34s} {grid:18s} {name}")
# One block's sequence (the second block of the forward), for reading order and shapes.
print("\nFirst 160 kernels of the step:")
for (name, grid, block, us), k in list(zip(step, kinds))[:160]:
    print(f"{us:9.1f} us  {grid:18s} {k:34s} {name[:80]}")
