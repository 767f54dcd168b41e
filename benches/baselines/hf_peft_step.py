# HF transformers + PEFT LoRA student step and teacher-style forward, bf16 base or a
# bitsandbytes NF4 base (double quantization, blocksize 64): the baseline of the
# `lora bf16`, `qlora nf4` and `teacher fwd` rows of qdistill's benchmark.
#   python3 hf_peft_step.py SHAPE B S gc|nogc [nf4] [--no-teacher]
import sys

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaForCausalLM

from qd_common import HEADER, PEAK_BF16, TARGETS, dense_params, llama_config, median_ms, row, to_nf4

shape, B, S, gc = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "gc"
nf4 = "nf4" in sys.argv[5:]
teacher = "--no-teacher" not in sys.argv[5:]
torch.manual_seed(0)
cfg = llama_config(shape)
torch.set_default_dtype(torch.bfloat16)
with torch.device("cuda"):
    m = LlamaForCausalLM(cfg)
impl = "hf+peft"
if nf4:
    impl = "hf+peft+bnb"
    to_nf4(m)
N = dense_params(cfg)
ids = torch.randint(0, cfg.vocab_size, (B, S), device="cuda")
print(HEADER, flush=True)
if teacher:
    m.eval()
    torch.cuda.reset_peak_memory_stats()
    with torch.no_grad():
        ms = median_ms(lambda: m(ids).logits, 5)
    row(impl, "teacher fwd %s %s %dx%d" % ("nf4" if nf4 else "bf16", shape, B, S), B * S / ms * 1e3, "tok/s", ms,
        torch.cuda.max_memory_allocated() / 2**30, "MFU(2N) %.1f%%, model(ids).logits" % (100 * 2 * N * B * S / (ms / 1e3) / PEAK_BF16))
m.train()
m.config.use_cache = False
if gc:
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
pm = get_peft_model(m, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS))
if gc:
    pm.enable_input_require_grads()
opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4, fused=True)


def step():
    out = pm(input_ids=ids, labels=ids)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


step()
torch.cuda.synchronize()
torch.cuda.reset_peak_memory_stats()
ms = median_ms(step, 5, warmup=0)
row(impl, "%s %s %dx%d %s" % ("qlora nf4" if nf4 else "lora bf16", shape, B, S, "gc" if gc else "nogc"), B * S / ms * 1e3,
    "tok/s", ms, torch.cuda.max_memory_allocated() / 2**30, "MFU(4N) %.1f%%" % (100 * 4 * N * B * S / (ms / 1e3) / PEAK_BF16))
