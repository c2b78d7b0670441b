"""Whether A folded into the frozen GEMM pays: lorakit's LoRA linear itself (adapters/lora.py,
Note: A folded into the frozen GEMM), folded and unfolded, against a frozen ``nn.Linear`` of
the same shape, forward + backward, on the embedded model's linear shapes.

SmolLM2-135M's shapes (q/o 576 -> 576, k/v 576 -> 192, gate/up 576 -> 1536, down 1536 -> 576),
512 tokens (benchmarks/run.py's batch 2 x 256), r 16 alpha 32, the base weight in the compute
dtype (bf16 under autocast, as the training loop runs it, or fp32). The three variants run in
one process, interleaved, the order reversed every other round; medians. The fold trades the
skinny h = x Aᵀ GEMM for r more rows in the frozen GEMM and some bookkeeping: which wins
depends on the BLAS kernel chosen for d_out + r rows, so on the machine (the default folds
fp32 GEMMs only, ``LoRALinear.fold_dtypes``; this script folds the dtype it measures).

    python benchmarks/lora_fold.py [--dtype bf16] [--rounds 45]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from common import machine
from lorakit.adapters.lora import LoRALinear

SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576)]
TOKENS, R = 512, 16


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--rounds", type=int, default=45)
    args = ap.parse_args()
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    torch.manual_seed(0)
    print(
        f"# {machine()}; {args.dtype}, {TOKENS} tokens, r {R}, median of {args.rounds} "
        "interleaved rounds, forward + backward of one linear"
    )
    print("| d_in -> d_out | frozen (us) | folded (us) | unfolded (us) | folded / unfolded |")
    print("|---|---|---|---|---|")
    for d_in, d_out in SHAPES:
        frozen = nn.Linear(d_in, d_out, bias=False).to(dtype).requires_grad_(False)
        lora = LoRALinear(
            nn.Linear(d_in, d_out, bias=False).to(dtype).requires_grad_(False), R, 2 * R
        )
        nn.init.normal_(lora.lora_B, std=0.01)
        x = torch.randn(2, TOKENS // 2, d_in, dtype=dtype, requires_grad=True)
        times: dict[str, list[float]] = {"frozen": [], "folded": [], "unfolded": []}
        for i in range(args.rounds + 5):
            for name in list(times) if i % 2 else list(times)[::-1]:
                lora.fold_a = name == "folded"
                lora.fold_dtypes = (dtype,)  # the default folds fp32 only: fold this dtype
                layer = frozen if name == "frozen" else lora
                with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                    t = time.perf_counter()
                    layer(x).sum().backward()
                    times[name].append(time.perf_counter() - t)
        med = {k: statistics.median(v[5:]) * 1e6 for k, v in times.items()}  # 5 warm-up rounds
        print(
            f"| {d_in} -> {d_out} | {med['frozen']:.0f} | {med['folded']:.0f} | "
            f"{med['unfolded']:.0f} | {med['folded'] / med['unfolded']:.3f} |"
        )


if __name__ == "__main__":
    main()
