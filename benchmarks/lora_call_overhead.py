"""The fixed per-call cost of lorakit's LoRA linear, where the arithmetic is nothing.

210 LoRA linears (the embedded model's 30 layers x 7) on a tiny input (4 tokens, 32 features,
r 16, no bias), each applied to the same input as q/k/v are, forward + backward, against the
same 210 frozen ``nn.Linear`` (the limit). What is left over the frozen layers is Python and
dispatch: the module's checks (``fused_linear_applies``), the fold's bookkeeping and A's copy
(``LoRALinear.folded``), the autograd Function's forward and backward. Interleaved rounds,
medians; ``--profile`` adds a cProfile table of the folded variant.

    python benchmarks/lora_call_overhead.py [--rounds 15] [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time

import torch
from torch import nn

from common import machine
from lorakit.adapters.lora import LoRALinear

D, N, LAYERS, R = 32, 4, 210, 16


def step(layers, x) -> None:
    y = x
    for m in layers:
        y = m(x) + y
    y.sum().backward()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    print(f"# {machine()}; 1 thread, {LAYERS} linears of {D}x{D}, {N} tokens, r {R}")
    frozen = [nn.Linear(D, D, bias=False).requires_grad_(False) for _ in range(LAYERS)]
    lora = [
        LoRALinear(nn.Linear(D, D, bias=False).requires_grad_(False), R, 2 * R)
        for _ in range(LAYERS)
    ]
    for m in lora:
        nn.init.normal_(m.lora_B)
    x = torch.randn(N, D, requires_grad=True)
    times: dict[str, list[float]] = {"frozen": [], "lora (folded)": [], "lora (unfolded)": []}
    for _ in range(args.rounds + 3):
        for name, samples in times.items():
            LoRALinear.fold_a = name != "lora (unfolded)"
            t = time.perf_counter()
            step(frozen if name == "frozen" else lora, x)
            samples.append(time.perf_counter() - t)
    LoRALinear.fold_a = True
    med = {k: statistics.median(v[3:]) for k, v in times.items()}  # 3 warm-up rounds
    print("| variant | step (ms) | per linear (us) | over frozen per linear (us) |")
    print("|---|---|---|---|")
    for k, v in med.items():
        print(
            f"| {k} | {v * 1e3:.2f} | {v / LAYERS * 1e6:.1f} | "
            f"{(v - med['frozen']) / LAYERS * 1e6:.1f} |"
        )
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(5):
            step(lora, x)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(12)


if __name__ == "__main__":
    main()
