# Kernel-level baselines at Llama-3-8B sizes: device copy bandwidth and bf16 matmul (the
# two ceilings), bitsandbytes NF4 dequantization (double quant, blocksize 64) of a
# 14336x4096 weight, and forward KL with both LM heads at T=8192, V=128256 in plain torch
# (and Liger's FusedLinearJSD with beta=0 when liger_kernel is importable).
import torch

from qd_common import HEADER, median_ms, row

d, bf = "cuda", torch.bfloat16
print(HEADER, flush=True)


def events_ms(f, iters=50, warmup=3):
    for _ in range(warmup):
        f()
    ts = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record(); f(); b.record(); b.synchronize()
        ts.append(a.elapsed_time(b))
    ts.sort()
    return ts[len(ts) // 2]


x = torch.randn(1 << 28, device=d)
ms = events_ms(lambda: x.clone(), 20)
row("torch", "d2d copy 1024 MiB", 2 * x.numel() * 4 / ms / 1e6, "GB/s", ms, None, "bytes read + written")
del x
a, b = torch.randn(8192, 8192, device=d, dtype=bf), torch.randn(8192, 8192, device=d, dtype=bf)
ms = events_ms(lambda: a @ b, 20)
row("torch", "bf16 matmul 8192^3", 2 * 8192**3 / ms / 1e9, "TFLOP/s", ms, None, "random data")
del a, b

try:
    import bitsandbytes.functional as F
    N, K = 14336, 4096
    qs = []
    for k in range(4):  # four weights in rotation, as qdistill's benchmark: no L2 reuse
        W = torch.randn(N, K, device=d, dtype=bf) * 0.02
        qs.append(F.quantize_4bit(W, quant_type="nf4", compress_statistics=True, blocksize=64))
    out = torch.empty(N, K, device=d, dtype=bf)
    it = [0]

    def deq():
        q, st = qs[it[0] % 4]
        it[0] += 1
        F.dequantize_4bit(q, st, out=out)

    ms = events_ms(deq, 200)
    n = N * K
    nbytes = n / 2 + n / 64 + n / 64 / 256 * 4 + 2 * n
    row("bnb", "nf4 dequant dq %dx%d -> bf16" % (N, K), nbytes / ms / 1e6, "GB/s", ms, None, "%.1f us" % (ms * 1e3))
except Exception as e:  # noqa: BLE001 - a missing package must not stop the other rows
    print("bnb dequant skipped: %r" % (e,), flush=True)

T, H, V = 8192, 4096, 128256
hs = torch.randn(T, H, device=d, dtype=bf, requires_grad=True)
Ws = torch.randn(V, H, device=d, dtype=bf) * 0.02
ht = torch.randn(T, H, device=d, dtype=bf)
Wt = torch.randn(V, H, device=d, dtype=bf) * 0.02


def run(impl, name, f):
    for _ in range(2):
        f()
    torch.cuda.synchronize(); torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    ms = median_ms(f, 5, warmup=0)
    row(impl, name, 0, "", ms, (torch.cuda.max_memory_allocated() - base) / 2**30, "peak is above the inputs; fwd+bwd")


def kl_torch():
    s = torch.log_softmax((hs @ Ws.t()).float(), -1)
    with torch.no_grad():
        tl = torch.log_softmax((ht @ Wt.t()).float(), -1)
    torch.nn.functional.kl_div(s, tl, log_target=True, reduction="batchmean").backward()


run("torch", "fused fwd-KL T=%d V=%d (unfused torch)" % (T, V), kl_torch)
try:
    # The submodule directly: importing it through liger_kernel.transformers' __init__
    # hits a circular import when transformers was not imported first.
    from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD
    fj = LigerFusedLinearJSD(jsd_beta=0.0, temperature=1.0)
    run("liger", "fused fwd-KL T=%d V=%d (FusedLinearJSD beta=0)" % (T, V), lambda: fj(hs, Ws, ht, Wt, None).backward())
except Exception as e:  # noqa: BLE001
    print("liger skipped: %r" % (e,), flush=True)
