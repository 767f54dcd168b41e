#!/usr/bin/env python3
"""Where one training step's GPU time goes, kernel by kernel, from Nsight Compute.

Runs one `qdistill bench` case under ncu (kernel durations only: one pass, no replay,
clocks left alone) and sums the last full step, the kernels between the last two AdamW
launches, by kind:

    python3 benches/ncu_step.py QDISTILL_BIN "lora bf16 8b 2x2048 nogc" [OUT_DIR]

Each kernel is classified by its name and, for cuBLAS GEMMs, by its grid: a GEMM with at
most 8 tiles along one side is a rank-16 LoRA product (x·Aᵀ, (x·Aᵀ)·Bᵀ, dy·B, dA, dB,
dX += g·A), the others are the base weight GEMMs and the LM head.
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


def grid_dims(g):
    return [int(x) for x in re.findall(r"\d+", g)]


def kind(name, grid):
    n = name.lower()
    if "gemm" in n or "gemv" in n or "xmma" in n or "cutlass" in n or "splitk" in n or "reduce" in n and "cublas" in n:
        g = grid_dims(grid)
        small = min(g[0], g[1]) if len(g) >= 2 else g[0]
        return "gemm rank-16 (LoRA)" if small <= 8 and max(g) < 4096 else "gemm base / head"
    for key, label in [
        ("flash", "attention"), ("rms", "rmsnorm"), ("rope", "rope"), ("glu", "swiglu"),
        ("loss", "fused loss"), ("lse", "fused loss"), ("adamw", "optimizer"), ("norm", "optimizer"),
        ("cast", "optimizer"), ("nf4", "nf4 dequant"), ("ucopy", "copy / transpose"),
        ("copy", "copy / transpose"), ("badd", "elementwise add"), ("bmul", "elementwise"),
        ("affine", "elementwise"), ("fill", "fill"), ("index", "embedding"), ("emb", "embedding"),
        ("gather", "embedding"), ("reduce", "reduction"), ("sum", "reduction"),
    ]:
        if key in n:
            return label
    return "other: " + name[:50]


total = sum(k[3] for k in step)
by_kind = collections.defaultdict(lambda: [0.0, 0])
by_name = collections.defaultdict(lambda: [0.0, 0])
for name, grid, block, us in step:
    k = kind(name, grid)
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
    print(f"{us / 1e3:8.2f} ms {n:5d}x  {k:22s} {grid:18s} {name}")
# One block's sequence (the second block of the forward), for reading order and shapes.
print("\nFirst 160 kernels of the step:")
for name, grid, block, us in step[:160]:
    print(f"{us:9.1f} us  {grid:18s} {kind(name, grid):22s} {name[:80]}")
