# Compares qdistill's all_results.json with distill_parity.py's result of the same run:
#   python3 parity_compare.py QDISTILL_ALL_RESULTS TORCH_RESULT [QDISTILL_METRICS_JSONL]
# Prints the held-out and rehearsal CE / KL of both trainers before and after training,
# the relative differences (target: within 2%), the share of the initial KL gap each
# closed (target: at least half), and the train loss of both at a few steps.
import json
import sys

qd = json.load(open(sys.argv[1]))
pt = json.load(open(sys.argv[2]))
print("| metric | qdistill | PyTorch (HF+PEFT+bnb) | relative difference |")
print("|---|---|---|---|")
worst = 0.0
for split in ("eval", "rehearsal"):
    for when in ("before", "after"):
        a, b = qd.get(f"{split}_{when}"), pt.get(f"{split}_{when}")
        if not a or not b:
            continue
        for m in ("ce", "kl"):
            rel = abs(a[m] - b[m]) / abs(b[m])
            if when == "after":
                worst = max(worst, rel)
            name = "held-out" if split == "eval" else "rehearsal"
            print(f"| {name} {m.upper()} {when} | {a[m]:.4f} | {b[m]:.4f} | {100 * rel:.2f}% |")
for who, r in (("qdistill", qd), ("PyTorch", pt)):
    b, a = r["eval_before"]["kl"], r["eval_after"]["kl"]
    print(f"{who}: held-out KL {b:.4f} -> {a:.4f}, {100 * (b - a) / b:.1f}% of the initial gap closed")
print(f"worst relative difference after training: {100 * worst:.2f}% (target <= 2%)")
if len(sys.argv) > 3:
    ql = [json.loads(line) for line in open(sys.argv[3])]
    pl = pt["log"]
    print("| step | qdistill loss | PyTorch loss | qdistill grad norm | PyTorch grad norm |")
    print("|---|---|---|---|---|")
    n = min(len(ql), len(pl))
    for i in sorted({0, 1, 4, 9, n // 4, n // 2, n - 1}):
        if 0 <= i < n:
            print(f"| {i + 1} | {ql[i]['loss']:.4f} | {pl[i]['loss']:.4f} | {ql[i]['grad_norm']:.4f} | {pl[i]['grad_norm']:.4f} |")
