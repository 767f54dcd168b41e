#!/usr/bin/env python3
"""HF transformers distillation step on one GPU: the same-GPU baseline of
`scripts/multi-gpu.sh llama2` (qdistill's benches/shapes/distill-8b-1b.toml).

- teacher: LlamaForCausalLM with random weights of `--teacher`'s config.json (Llama-3-8B
  shapes), its block linears in bitsandbytes NF4 (double quantization, blocksize 64,
  bf16 compute), frozen, `model(ids).logits` under no_grad;
- student: LlamaForCausalLM of `--student`'s config.json (Llama-3.2-1B shapes), bf16 (or
  bitsandbytes NF4 with `--student-nf4`), PEFT LoRA r=16 alpha=32 on all seven linears;
- attention: "eager" (default) or "sdpa" (`--attn sdpa`);
- loss per micro-batch on full logits: CE + 0.5 * KL(teacher || student) at T = 1 on the
  next-token targets, divided by the accumulation steps; gradient checkpointing as the
  qdistill config (on unless `--no-gc`); fused AdamW on the adapters;
- a step is `--accum` micro-batches of `--batch` x `--seq` random token ids, then the
  optimizer step; tokens/s is the median of `--steps` timed steps after `--warmup`.

Prints one JSON line: {"impl", "attn", "student", "tok_s", "ms", "peak_gib", ...}.

    python3 distill_step.py --teacher benches/shapes/llama-3-8b --student benches/shapes/llama-3.2-1b \
        --batch 4 --seq 2048 --accum 2 [--attn sdpa] [--student-nf4] [--no-gc]

Needs torch, transformers, peft and (on a GPU) bitsandbytes. `--device cpu` checks the
script's logic on tiny configs: float32, no bitsandbytes (the teacher stays dense).
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, LlamaForCausalLM

from qd_common import to_nf4

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(path, attn, device, dtype):
    cfg = AutoConfig.from_pretrained(path)
    cfg._attn_implementation = attn
    cfg.use_cache = False
    torch.set_default_dtype(dtype)
    with torch.device(device):
        return LlamaForCausalLM(cfg)




def distill_loss(s_logits, t_logits, ids, accum):
    """(CE + 0.5 KL(p_t || p_s)) / accum at T = 1 over every next-token position, in f32."""
    v = s_logits.shape[-1]
    s = s_logits[:, :-1].float().reshape(-1, v)
    t = t_logits[:, :-1].float().reshape(-1, v)
    y = ids[:, 1:].reshape(-1)
    ce = F.cross_entropy(s, y)
    log_t = F.log_softmax(t, dim=-1)
    kl = (log_t.exp() * (log_t - F.log_softmax(s, dim=-1))).sum(-1).mean()
    return (ce + 0.5 * kl) / accum


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True, help="dir with the teacher's config.json")
    ap.add_argument("--student", required=True, help="dir with the student's config.json")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--accum", type=int, default=2)
    ap.add_argument("--attn", choices=["eager", "sdpa"], default="eager")
    ap.add_argument("--student-nf4", action="store_true", help="student base in bitsandbytes NF4 (QLoRA)")
    ap.add_argument("--no-gc", action="store_true", help="no gradient checkpointing")
    ap.add_argument("--steps", type=int, default=5, help="timed steps")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--device", default="cuda")
    a = ap.parse_args()
    cuda = a.device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    torch.manual_seed(0)

    teacher = build(a.teacher, a.attn, a.device, dtype)
    if cuda:
        to_nf4(teacher)
    teacher.eval().requires_grad_(False)
    student = build(a.student, a.attn, a.device, dtype)
    if cuda and a.student_nf4:
        to_nf4(student)
    student.train()
    gc = not a.no_gc
    if gc:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    pm = get_peft_model(student, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS))
    if gc:
        pm.enable_input_require_grads()
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4, fused=cuda)

    vocab = min(teacher.config.vocab_size, student.config.vocab_size)
    micro = [torch.randint(0, vocab, (a.batch, a.seq), device=a.device) for _ in range(a.accum)]
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def step():
        for ids in micro:
            with torch.no_grad():
                t_logits = teacher(input_ids=ids).logits
            s_logits = pm(input_ids=ids).logits
            distill_loss(s_logits, t_logits, ids, a.accum).backward()
            del t_logits, s_logits
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(a.warmup):
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    ms = []
    for _ in range(a.steps):
        t0 = time.perf_counter()
        step()
        sync()
        ms.append((time.perf_counter() - t0) * 1e3)
    med = statistics.median(ms)
    tokens = a.batch * a.seq * a.accum
    impl = "hf+peft" + ("+bnb" if cuda else "")
    print(json.dumps({
        "impl": impl, "attn": a.attn, "student": "nf4" if (cuda and a.student_nf4) else str(dtype).replace("torch.", ""),
        "teacher": "nf4" if cuda else "dense", "batch": a.batch, "seq": a.seq, "accum": a.accum, "gc": gc,
        "tok_s": tokens / (med / 1e3), "ms": med, "steps_ms": ms,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "gpu": torch.cuda.get_device_name() if cuda else "cpu",
    }), flush=True)


if __name__ == "__main__":
    main()
