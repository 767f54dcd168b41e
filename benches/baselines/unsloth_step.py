# Unsloth LoRA / QLoRA student step (the fastest public trainer): the baseline of the
# `lora bf16` and `qlora nf4` rows of qdistill's benchmark, with the settings of
# hf_peft_step.py (Llama-3 shapes, random weights, bf16, LoRA r16 alpha 32 on all seven
# linears, labels = inputs, fused AdamW, median of 5 timed steps after two warm-ups).
#   python3 unsloth_step.py SHAPE B S gc|nogc [nf4]
# Unsloth loads models from disk only: a random model of the shape is written once to
# $QD_RAND_DIR/<shape> (default ~/qd-rand), where it stays while the machine is up.
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
import torch

from qd_common import PEAK_BF16, TARGETS, dense_params, llama_config, median_ms, row

shape, B, S, gc = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "gc"
nf4 = "nf4" in sys.argv[5:]
cfg = llama_config(shape)
path = os.path.join(os.environ.get("QD_RAND_DIR", os.path.expanduser("~/qd-rand")), shape)
if not os.path.exists(os.path.join(path, "config.json")):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = 0, 1, 2
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = LlamaForCausalLM(cfg).to(torch.bfloat16)
    m.save_pretrained(path, safe_serialization=True)
    del m
    torch.cuda.empty_cache()
    tk = Tokenizer(models.WordLevel({f"t{i}": i for i in range(cfg.vocab_size)}, unk_token="t3"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="t0", eos_token="t1", pad_token="t2",
                            unk_token="t3").save_pretrained(path)
from unsloth import FastLanguageModel  # noqa: E402  (after the env settings above)

model, _ = FastLanguageModel.from_pretrained(path, max_seq_length=S, dtype=torch.bfloat16, load_in_4bit=nf4,
                                             local_files_only=True)
model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=32, lora_dropout=0.0, bias="none",
                                         target_modules=TARGETS, use_gradient_checkpointing=("unsloth" if gc else False),
                                         random_state=0)
ids = torch.randint(0, cfg.vocab_size, (B, S), device="cuda")
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, fused=True)
model.train()


def step():
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


step()
step()
torch.cuda.synchronize()
torch.cuda.reset_peak_memory_stats()
ms = median_ms(step, 5, warmup=0)
N = dense_params(cfg)
row("unsloth", "%s %s %dx%d %s" % ("qlora nf4" if nf4 else "lora bf16", shape, B, S, "gc" if gc else "nogc"),
    B * S / ms * 1e3, "tok/s", ms, torch.cuda.max_memory_allocated() / 2**30,
    "MFU(4N) %.1f%%" % (100 * 4 * N * B * S / (ms / 1e3) / PEAK_BF16))
