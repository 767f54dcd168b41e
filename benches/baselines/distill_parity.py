#!/usr/bin/env python3
"""The PyTorch reference of qdistill's distillation-quality parity run.

HF transformers + PEFT + bitsandbytes train the same student on the same batches with the
same objective as `qdistill train benches/baselines/parity.toml`, so the two trainers'
held-out CE and KL can be compared number for number:

- teacher: SmolLM2-135M-Instruct (all 30 layers, f32), loaded from the GGUF file;
- student: the same model depth-pruned to the config's `keep_layers`, its seven linears
  of every kept block in bitsandbytes NF4 with double quantization (blocksize 64), LoRA
  (PEFT) on all of them;
- data: the exact micro-batches qdistill trains on, in order, read from the JSONL that
  `qdistill data CONFIG --dump` writes (token ids, shifted labels, positions), and its
  held-out batches for the evaluation;
- objective per optimizer step over its micro-batches: (ce_weight * sum CE + kd_weight *
  T^2 * sum KL(p_teacher^T || p_student^T)) / (target tokens in the step), as qdistill;
- AdamW (torch), linear warmup then cosine decay (transformers.get_scheduler), gradient
  clipping at max_grad_norm;
- both trainers start from one adapter: `init` writes PEFT's initialisation, which the
  qdistill config loads through `model.adapter_name_or_path`.

    python distill_parity.py init   --config parity.toml --out INIT_DIR
    python distill_parity.py train  --config parity.toml --batches batches.jsonl --init INIT_DIR --out result.json

Needs torch, transformers (with gguf), peft, bitsandbytes; CPU or one GPU (--device).
"""
import argparse
import json
import math
import os
import pathlib
import sys
import time
import tomllib

import torch
import torch.nn.functional as F

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_layers(spec, n):
    out = []
    for part in spec.split(","):
        if "-" in part:
            a, b = part.split("-")
            out.extend(range(int(a), int(b) + 1))
        else:
            out.append(int(part))
    assert all(0 <= i < n for i in out), f"keep_layers {spec} out of range for {n} layers"
    return out


def load_gguf(path, device):
    from transformers import AutoModelForCausalLM
    p = pathlib.Path(path)
    m = AutoModelForCausalLM.from_pretrained(p.parent, gguf_file=p.name, dtype=torch.float32)
    return m.to(device).eval()


def quantize_nf4(model, device):
    """Replaces every block linear by a bitsandbytes NF4 Linear4bit (double quant, blocksize
    64, f32 compute): what `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
    bnb_4bit_use_double_quant=True)` does at load time, applied after depth pruning."""
    import bitsandbytes as bnb
    for layer in model.model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in TARGETS:
                lin = getattr(parent, name, None)
                if lin is None:
                    continue
                q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                      compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
                q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False,
                                             compress_statistics=True, quant_type="nf4", blocksize=64)
                if lin.bias is not None:
                    q.bias = torch.nn.Parameter(lin.bias.data.clone(), requires_grad=False)
                q = q.to(device)
                assert q.weight.dtype == torch.uint8, f"{name} was not quantized ({q.weight.dtype})"
                setattr(parent, name, q)
    return model


def build_student(cfg, device):
    from peft import LoraConfig, get_peft_model
    student = load_gguf(cfg["model"]["model_name_or_path"], "cpu")
    keep = parse_layers(cfg["model"]["keep_layers"], len(student.model.layers))
    student.model.layers = torch.nn.ModuleList([student.model.layers[i] for i in keep])
    for i, layer in enumerate(student.model.layers):
        layer.self_attn.layer_idx = i
    student.config.num_hidden_layers = len(keep)
    if hasattr(student.config, "layer_types") and student.config.layer_types:
        student.config.layer_types = [student.config.layer_types[i] for i in keep]
    student = quantize_nf4(student, device).to(device)
    for p in student.parameters():
        p.requires_grad_(False)
    lora = cfg["lora"]
    lcfg = LoraConfig(r=lora["r"], lora_alpha=lora["lora_alpha"], lora_dropout=lora.get("lora_dropout", 0.0),
                      target_modules=TARGETS, bias="none", task_type="CAUSAL_LM")
    return get_peft_model(student, lcfg)


def read_batches(path, device):
    train, evals = [], {"eval": [], "eval_rehearsal": []}
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            shape = (r["batch"], r["seq_len"])
            b = {k: torch.tensor(r[k], dtype=torch.long).view(shape).to(device)
                 for k in ("input_ids", "labels", "position_ids", "segment_ids")}
            if r["split"] == "train":
                while len(train) < r["step"]:
                    train.append([])
                train[r["step"] - 1].append(b)
            else:
                evals[r["split"]].append(b)
    return train, evals


def check_unpacked(b):
    # Rows are single samples padded on the right: causal attention alone keeps every real
    # token from seeing padding, so no attention mask is needed (packing would need one).
    # (a row holds segment 1, then padding in segment 0).
    assert int(b["segment_ids"].max()) <= 1, "packed batches are not supported here"


def token_terms(s_logits, t_logits, labels, temperature):
    """Per-target-token CE (T = 1) and KL(p_t^T || p_s^T), summed."""
    mask = labels != -100
    s = s_logits[mask].float()
    y = labels[mask]
    ce = F.cross_entropy(s, y, reduction="sum")
    if t_logits is None:
        return ce, torch.zeros((), device=s.device), int(mask.sum())
    t = t_logits[mask].float()
    log_q = F.log_softmax(s / temperature, dim=-1)
    log_p = F.log_softmax(t / temperature, dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum()
    return ce, kl, int(mask.sum())


@torch.no_grad()
def evaluate(student, teacher, batches):
    ce_sum, kl_sum, n = 0.0, 0.0, 0
    for b in batches:
        check_unpacked(b)
        s = student(input_ids=b["input_ids"], position_ids=b["position_ids"]).logits
        t = teacher(input_ids=b["input_ids"], position_ids=b["position_ids"]).logits
        ce, kl, k = token_terms(s, t, b["labels"], 1.0)
        ce_sum += ce.item()
        kl_sum += kl.item()
        n += k
    return {"ce": ce_sum / max(n, 1), "kl": kl_sum / max(n, 1), "tokens": n}


def cmd_init(args, cfg):
    torch.manual_seed(cfg.get("seed", 42))
    student = build_student(cfg, "cpu")
    student.save_pretrained(args.out)
    print(f"PEFT initial adapter written to {args.out}")


def cmd_train(args, cfg):
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import get_scheduler

    device = args.device
    torch.manual_seed(cfg.get("seed", 42))
    teacher = load_gguf(cfg["teacher"]["model_name_or_path"], device)
    for p in teacher.parameters():
        p.requires_grad_(False)
    student = build_student(cfg, device)
    init = load_file(os.path.join(args.init, "adapter_model.safetensors"))
    res = set_peft_model_state_dict(student, init)
    assert not res.unexpected_keys, res.unexpected_keys
    train, evals = read_batches(args.batches, device)
    d, tr = cfg["distill"], cfg["training"]
    ce_w, kd_w, temp = d["ce_weight"], d["kd_weight"], d["temperature"]
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tr["learning_rate"], betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=tr.get("weight_decay", 0.0))
    steps = len(train)
    warmup = math.ceil(tr.get("warmup_ratio", 0.0) * steps)
    sched = get_scheduler(tr.get("lr_scheduler_type", "linear"), opt, num_warmup_steps=warmup, num_training_steps=steps)

    result = {"steps": steps, "warmup_steps": warmup, "log": []}
    result["eval_before"] = evaluate(student, teacher, evals["eval"])
    result["rehearsal_before"] = evaluate(student, teacher, evals["eval_rehearsal"])
    print("before", result["eval_before"], result["rehearsal_before"], flush=True)
    student.train()
    t0 = time.time()
    for step, micro in enumerate(train):
        n_step = sum(int((b["labels"] != -100).sum()) for b in micro)
        ce_tot, kl_tot = 0.0, 0.0
        for b in micro:
            check_unpacked(b)
            with torch.no_grad():
                t_logits = teacher(input_ids=b["input_ids"], position_ids=b["position_ids"]).logits
            s_logits = student(input_ids=b["input_ids"], position_ids=b["position_ids"]).logits
            ce, kl, _ = token_terms(s_logits, t_logits, b["labels"], temp)
            loss = (ce_w * ce + kd_w * temp * temp * kl) / n_step
            loss.backward()
            ce_tot += ce.item()
            kl_tot += kl.item()
        gn = torch.nn.utils.clip_grad_norm_(params, tr.get("max_grad_norm", 1.0))
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        rec = {"step": step + 1, "loss": (ce_w * ce_tot + kd_w * temp * temp * kl_tot) / n_step,
               "ce": ce_tot / n_step, "kd": kl_tot / n_step, "lr": lr, "grad_norm": float(gn)}
        result["log"].append(rec)
        if (step + 1) % 10 == 0 or step + 1 == steps:
            print(json.dumps(rec), f"{time.time() - t0:.0f}s", flush=True)
    student.eval()
    result["eval_after"] = evaluate(student, teacher, evals["eval"])
    result["rehearsal_after"] = evaluate(student, teacher, evals["eval_rehearsal"])
    result["seconds"] = time.time() - t0
    print("after", result["eval_after"], result["rehearsal_after"], flush=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("cmd", choices=["init", "train"])
    ap.add_argument("--config", required=True)
    ap.add_argument("--batches")
    ap.add_argument("--init")
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    with open(args.config, "rb") as f:
        cfg = tomllib.load(f)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    {"init": cmd_init, "train": cmd_train}[args.cmd](args, cfg)


if __name__ == "__main__":
    sys.exit(main())
