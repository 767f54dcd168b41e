# Reads logs holding benchmark rows (qdistill's and the baselines', one markdown format)
# and prints each qdistill row beside the baseline row of the same case, with the ratio.
#   python3 compare.py LOG [LOG...]
import os
import re
import sys

rows = {}
for path in [p for p in sys.argv[1:] if os.path.exists(p)]:
    for line in open(path, errors="replace"):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) != 6 or cells[0] in ("impl", "---") or not line.startswith("|"):
            continue
        impl, case, thr, ms, peak, note = cells
        rows.setdefault(case, {})[impl] = (thr, ms, peak, note)


def key(case):
    # Baseline variants of one case differ only in a parenthesised or chunk suffix.
    return re.sub(r" (chunk=\d+|\(.*\))$", "", case)


def num(s):
    try:
        return float(s.split()[0])
    except (ValueError, IndexError):
        return None


base = {}
for case, impls in rows.items():
    for impl, v in impls.items():
        if impl != "qdistill":
            base.setdefault(key(case), []).append((impl, case, v))

print("| case | qdistill | peak GiB | baseline | baseline value | peak GiB | ratio |")
print("|---|---|---|---|---|---|---|")
for case, impls in rows.items():
    if "qdistill" not in impls:
        continue
    thr, ms, peak, _ = impls["qdistill"]
    for impl, bcase, (bthr, bms, bpeak, _) in base.get(key(case), []) or [("-", "-", ("-", "-", "-", "-"))]:
        a, b = num(thr), num(bthr)
        if a and b:
            ratio = "%.2fx" % (a / b)
            ours = thr
            theirs = bthr
        else:  # times only (lower is better): ratio of baseline time to ours
            a, b = num(ms), num(bms)
            ratio = "%.2fx" % (b / a) if a and b else "-"
            ours, theirs = ms + " ms", bms + " ms"
        print("| %s | %s | %s | %s | %s | %s | %s |" % (case, ours, peak, impl, theirs, bpeak, ratio))
