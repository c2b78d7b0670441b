"""S2-Attn against full attention in a whole training step of the embedded model.

LongLoRA's preset (LoRA r=8 on q/k/v/o, embeddings and norms trained whole) on SmolLM2-135M,
one sequence of N tokens, forward + backward + AdamW, with ``s2_attn`` on (group = N/4) and
off (the same run with full causal attention, the "sdpa" kernel both ways). Per length: the
median step time of interleaved repetitions (full, S2, full, S2, ...; the first step of each
model is a warm-up and not counted) and the bytes autograd saves for backward in one step
(``lorakit.training.memory.SavedBytes``: unique storages).

LongLoRA (Chen et al. 2023, §3.2): attention is the part S2-Attn shrinks, by the group ratio
for the attention matrix; the projections and MLP are unchanged, so the step's ratio is
bounded by their share of the arithmetic.

    python benchmarks/s2_step.py [--lengths 2048,4096,8192] [--reps 3] [--dtype fp32]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import SavedBytes, machine

import lorakit as lk
from lorakit.training.loss import loss_sum


def build(s2: bool, dtype: torch.dtype):
    model, _ = lk.load_model("smollm2-135m", dtype=dtype)
    model.config._attn_implementation = "sdpa"
    model = lk.apply(model, method="longlora", s2_attn=s2)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    return model, opt


def _loss(model, ids):
    """The training loop's loss (lorakit.training.loss: fused with the output layer where the
    head is frozen; LongLoRA trains the tied embeddings, so here the logits are formed)."""
    loss, n = loss_sum(model, {"input_ids": ids, "labels": ids,
                               "attention_mask": torch.ones_like(ids)})
    return loss / n


def step(model, opt, ids) -> float:
    t = time.perf_counter()
    _loss(model, ids).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return time.perf_counter() - t


def saved_bytes(model, ids) -> int:
    counter = SavedBytes(exclude=[*model.parameters(), *model.buffers()])
    with counter:
        loss = _loss(model, ids)
    loss.backward()
    model.zero_grad(set_to_none=True)
    return counter.nbytes


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="2048,4096,8192")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    args = ap.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    models = {"full": build(False, dtype), "s2": build(True, dtype)}
    print(f"machine: {machine()}; {args.dtype}, batch 1, LongLoRA preset on SmolLM2-135M")
    print("| tokens | full step (s) | S2 step (s) | S2 / full | full saved (MiB) | "
          "S2 saved (MiB) | S2 / full |")
    print("|---|---|---|---|---|---|---|")
    for n in (int(x) for x in args.lengths.split(",")):
        ids = torch.randint(0, 49152, (1, n))
        saved = {k: saved_bytes(m, ids) for k, (m, _) in models.items()}
        for m, opt in models.values():
            step(m, opt, ids)  # warm-up
        times = {k: [] for k in models}
        for _ in range(args.reps):
            for k, (m, opt) in models.items():
                times[k].append(step(m, opt, ids))
        f, s = (statistics.median(times[k]) for k in ("full", "s2"))
        mib = {k: v / 2**20 for k, v in saved.items()}
        print(f"| {n} | {f:.2f} | {s:.2f} | {s / f:.2f} | {mib['full']:.0f} | {mib['s2']:.0f} "
              f"| {mib['s2'] / mib['full']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
