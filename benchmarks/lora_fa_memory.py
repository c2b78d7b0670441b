"""Activation memory of one training step: LoRA vs LoRA-FA (docs/methods/lora-fa.md).

The embedded SmolLM2-135M, batch 1, sequence length 1024, r=16 on every linear layer, fp32 on
the CPU. Each configuration runs in its own subprocess, and two measures are taken for one
step (forward, backward, AdamW step):

* saved: bytes of the tensors autograd keeps for backward, through
  ``torch.autograd.graph.saved_tensors_hooks``, each storage counted once (q/k/v share their
  input). This is exact and independent of the allocator.
* peak: the process's resident-set high-water mark during the step minus its resident set just
  before it (the mark is reset through /proc/self/clear_refs, so loading the model does not
  hide the step), and ru_maxrss for the whole process.

PEFT LoRA with A frozen (what PEFT's LoRA-FA optimizer trains) is measured too: on torch >= 2.x
plain autograd also skips saving x once A has requires_grad=False, except through dropout.

Usage: python benchmarks/lora_fa_memory.py [--seq 1024] [--r 16]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

from common import SavedBytes, status_kib

CONFIGS = [  # (label, library, method, dropout)
    ("lorakit LoRA", "lorakit", "lora", 0.0),
    ("lorakit LoRA-FA", "lorakit", "lora-fa", 0.0),
    ("lorakit LoRA, dropout 0.1", "lorakit", "lora", 0.1),
    ("lorakit LoRA-FA, dropout 0.1", "lorakit", "lora-fa", 0.1),
    ("PEFT LoRA, A frozen, dropout 0.1", "peft", "lora-fa", 0.1),
]


def one(library: str, method: str, dropout: float, seq: int, r: int) -> dict:
    import torch

    import lorakit as lk

    torch.manual_seed(0)
    model, _ = lk.load_model("smollm2-135m")
    if library == "lorakit":
        lk.apply(
            model, method=method, r=r, alpha=2 * r, dropout=dropout, target_modules="all-linear"
        )
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules="all-linear"),
        )
        for n, p in model.named_parameters():
            if "lora_A" in n:
                p.requires_grad_(False)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (1, seq))

    rss0 = status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM (the peak) to the current resident set
    t0 = time.perf_counter()
    with SavedBytes() as saved:
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    secs = time.perf_counter() - t0
    return {
        "saved_mib": saved.mib,
        "step_peak_mib": (status_kib("VmHWM") - rss0) / 1024,
        "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "trainable": sum(p.numel() for p in params),
        "step_s": secs,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--child", nargs=3, metavar=("LIB", "METHOD", "DROPOUT"))
    args = ap.parse_args()
    if args.child:
        lib, method, dropout = args.child
        print(json.dumps(one(lib, method, float(dropout), args.seq, args.r)))
        return
    rows = []
    for label, lib, method, dropout in CONFIGS:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--seq",
                str(args.seq),
                "--r",
                str(args.r),
                "--child",
                lib,
                method,
                str(dropout),
            ],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
        )
        rows.append((label, json.loads(out.stdout.strip().splitlines()[-1])))
    print(
        f"SmolLM2-135M fp32, batch 1, seq {args.seq}, r={args.r} all-linear, one AdamW step, "
        f"{os.cpu_count()} CPU cores"
    )
    print(
        "| configuration | trainable | saved for backward (MiB) | step peak RSS (MiB) "
        "| ru_maxrss (MiB) | step (s) |"
    )
    print("|---|---|---|---|---|---|")
    for label, m in rows:
        print(
            f"| {label} | {m['trainable']:,} | {m['saved_mib']:.1f} | {m['step_peak_mib']:.0f} "
            f"| {m['ru_maxrss_mib']:.0f} | {m['step_s']:.1f} |"
        )
    base = dict(rows)
    for d in ("", ", dropout 0.1"):
        lo, fa = base[f"lorakit LoRA{d}"], base[f"lorakit LoRA-FA{d}"]
        print(
            f"LoRA / LoRA-FA{d or ', no dropout'}: saved {lo['saved_mib'] / fa['saved_mib']:.2f}x, "
            f"step peak {lo['step_peak_mib'] / fa['step_peak_mib']:.2f}x"
        )


if __name__ == "__main__":
    main()
