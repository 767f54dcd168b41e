# Shared settings and output format of qdistill's PyTorch baselines (see README.md here).
# Settings are those of the reference baselines that set qdistill's targets: Llama-3 shapes,
# random weights, bf16, LoRA r=16 alpha=32 on all 7 linear layers, labels = inputs, fused
# AdamW on the adapters, median of timed steps after warm-up. Rows print in the markdown
# format of qdistill's own benchmark (worker/src/bench.rs), so one log holds both.
import statistics
import time

import torch

SHAPES = {
    "8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False),
    "1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEAK_BF16 = 989e12  # H100 SXM dense bf16, the denominator the reference scripts use
HEADER = "| impl | case | throughput | ms | peak GiB | note |\n|---|---|---|---|---|---|"


def llama_config(shape):
    from transformers import LlamaConfig
    cfg = LlamaConfig(max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5, **SHAPES[shape])
    cfg._attn_implementation = "sdpa"
    return cfg


def dense_params(cfg):
    """N of MFU = kN*tokens/time: embedding, head and block linears (as worker/src/bench.rs)."""
    d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    kv = cfg.num_key_value_heads * (d // cfg.num_attention_heads)
    block = 2 * d * d + 2 * d * kv + 3 * d * f
    return cfg.num_hidden_layers * block + v * d * (1 if cfg.tie_word_embeddings else 2)


def median_ms(f, iters, warmup=1):
    for _ in range(warmup):
        f()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        f()
        torch.cuda.synchronize()
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


def row(impl, case, value, unit, ms, peak_gib, note):
    v = "%.1f %s" % (value, unit) if value else "-"
    p = "%.2f" % peak_gib if peak_gib is not None else "-"
    print("| %s | %s | %s | %.2f | %s | %s |" % (impl, case, v, ms, p, note), flush=True)


def to_nf4(model):
    """Every block linear as bitsandbytes NF4 (double quant, blocksize 64, bf16 compute),
    as the reference baselines quantize."""
    import bitsandbytes as bnb
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, mod in list(parent.named_children()):
                if isinstance(mod, torch.nn.Linear):
                    q = bnb.nn.Linear4bit(mod.in_features, mod.out_features, bias=False, compute_dtype=torch.bfloat16,
                                          quant_type="nf4", compress_statistics=True, device="meta")
                    q.weight = bnb.nn.Params4bit(mod.weight.data, requires_grad=False, quant_type="nf4",
                                                 compress_statistics=True, module=q).to("cuda")
                    setattr(parent, name, q)
    torch.cuda.empty_cache()
