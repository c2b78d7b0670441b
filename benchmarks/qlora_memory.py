"""Weight and training-step memory of QLoRA's NF4 base vs a 16/32-bit base (docs/methods/qlora.md).

The embedded SmolLM2-135M, LoRA r=16 (alpha 32) on every linear layer but lm_head, one training
step (forward, backward, AdamW step) at batch 2, sequence length 256, on the CPU. Each
configuration runs in its own subprocess:

* fp32 base (as ``lorakit.load_model`` loads it), LoRA
* bf16 base (``load_model(dtype="bf16")``), LoRA
* NF4 base (``quantize: nf4``, compute bf16, double quantization; embeddings, norms and the tied
  lm_head stay fp32 as loaded, so activations are fp32 between the 4-bit matmuls), LoRA
* the same quantized from a bf16 load (embeddings, norms, lm_head and activations bf16), LoRA

Measures:

* linear bytes: the weights of every linear layer but lm_head; for NF4 the packed 4-bit codes
  plus every quantization statistic (8-bit absmax codes, their fp32 absmax and offset, the code
  tables), each tensor counted once. Exact, allocator-independent. The bf16 reference is
  d_out * d_in * 2 bytes.
* model bytes: every parameter, buffer and quantization statistic of the model (with the
  adapter), each storage counted once (the tied embedding / lm_head once).
* step peak: the process's resident-set high-water mark (VmHWM) during the step minus its
  resident set (VmRSS) just before it; the mark is reset through /proc/self/clear_refs so the
  model load does not hide the step. It includes activations, gradients, AdamW state and
  bitsandbytes' per-matmul dequantized weights. Linux only.

Usage: python benchmarks/qlora_memory.py [--batch 2] [--seq 256] [--r 16]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

from common import status_kib

CONFIGS = [  # (label, load dtype, quantize)
    ("fp32 base + LoRA", None, None),
    ("bf16 base + LoRA", "bf16", None),
    ("NF4 base + LoRA (QLoRA)", None, "nf4"),
    ("NF4 base, rest bf16 + LoRA", "bf16", "nf4"),
]


def _model_bytes(model) -> int:
    """Every parameter, buffer and NF4 statistic, each storage once."""
    from lorakit.quant import is_quantized, weight_tensors

    seen: dict[tuple, int] = {}

    def add(t):
        seen[(t.device, t.untyped_storage().data_ptr())] = t.untyped_storage().nbytes()

    quantized = [m for m in model.modules() if is_quantized(m)]
    for m in quantized:
        for t in weight_tensors(m):
            add(t)
    skip = {id(m.weight) for m in quantized}
    for p in model.parameters():
        if id(p) not in skip:
            add(p)
    for b in model.buffers():
        add(b)
    return sum(seen.values())


def one(dtype, quantize, batch: int, seq: int, r: int) -> dict:
    import torch
    from torch import nn

    import lorakit as lk
    from lorakit.quant import linear_weight_bytes

    torch.manual_seed(0)
    model, _ = lk.load_model("smollm2-135m", dtype=dtype)
    out = model.get_output_embeddings()
    bf16_linear = sum(
        m.in_features * m.out_features * 2
        for m in model.modules()
        if isinstance(m, nn.Linear) and m is not out
    )
    lk.apply(model, method="lora", r=r, alpha=2 * r, target_modules="all-linear", quantize=quantize)
    params = list(lk.trainable_parameters(model).values())
    opt = torch.optim.AdamW(params, lr=2e-4)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq))
    model.train()

    rss_before = status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    t0 = time.perf_counter()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    step_s = time.perf_counter() - t0
    peak = status_kib("VmHWM")
    return {
        "linear_bytes": linear_weight_bytes(model),
        "bf16_linear_bytes": bf16_linear,
        "model_bytes": _model_bytes(model),
        "rss_before_step_mib": rss_before / 1024,
        "step_peak_mib": (peak - rss_before) / 1024,
        "step_s": step_s,
        "loss": loss.item(),
        "trainable": sum(p.numel() for p in params),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one config, print JSON
    args = ap.parse_args()
    if args.one is not None:
        dtype, quantize = json.loads(args.one)
        print(json.dumps(one(dtype, quantize, args.batch, args.seq, args.r)))
        return

    rows = []
    for label, dtype, quantize in CONFIGS:
        cmd = [
            sys.executable,
            __file__,
            "--one",
            json.dumps([dtype, quantize]),
            "--batch",
            str(args.batch),
            "--seq",
            str(args.seq),
            "--r",
            str(args.r),
        ]
        res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ}, check=False)
        if res.returncode != 0:
            sys.exit(f"{label} failed:\n{res.stderr[-3000:]}")
        rows.append((label, json.loads(res.stdout.strip().splitlines()[-1])))

    import torch

    mib = 1024**2
    print(
        f"SmolLM2-135M, LoRA r={args.r} all-linear, batch {args.batch} x seq {args.seq}, "
        f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores), "
        f"torch {torch.__version__}, threads {torch.get_num_threads()}"
    )
    print(
        "| base | linear weights (MiB) | vs bf16 linear | whole model (MiB) | "
        "step peak (MiB) | step time (s) |"
    )
    print("|---|---|---|---|---|---|")
    for label, m in rows:
        print(
            f"| {label} | {m['linear_bytes'] / mib:.1f} | "
            f"{m['linear_bytes'] / m['bf16_linear_bytes']:.3f}x | "
            f"{m['model_bytes'] / mib:.1f} | {m['step_peak_mib']:.0f} | {m['step_s']:.2f} |"
        )
    print(
        f"bf16 linear weights: {rows[0][1]['bf16_linear_bytes'] / mib:.1f} MiB; "
        f"trainable parameters: {rows[0][1]['trainable']:,}"
    )


if __name__ == "__main__":
    main()
