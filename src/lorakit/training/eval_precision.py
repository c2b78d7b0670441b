"""The precision evaluation computes in (``eval.precision``): fp32 by default.

# Note: why evaluation is fp32
In bf16 a greedy answer depends on things that should not matter. The batch's shape changes
the order of the float sums inside each matmul, bf16 keeps 8 bits of mantissa, and one
rounding that flips the arg-max of one token changes the rest of the answer: on the embedded
SmolLM2-135M, batched and one-at-a-time bf16 answers agreed on 57 of 64 prompts
(benchmarks/RESULTS.md), so exact match moved with ``eval.batch_size``; and CPUs with other
bf16 kernels (AVX-512 BF16, AMX) print other base losses. In fp32 the same rounding
differences stay far below the gaps between the top logits. ``eval.precision: fp32``
therefore computes every figure of :func:`~lorakit.training.evaluation.measure` (losses and
answers) without autocast, with the frozen weights that training stores in bf16/fp16
upcast to fp32 for the evaluation and cast back after it (bf16 -> fp32 -> bf16 is exact, so
training and the saved adapter are untouched). A 4-bit (NF4) base keeps its 4-bit weights,
whose matmuls compute in ``adapter.quant_compute_dtype``. ``eval.precision: train``
evaluates in the run's precision, as lorakit did before.

Why not only fp32 logits for the arg-max: the roundings that depend on the batch happen in
every layer's bf16 hidden states, which an fp32 arg-max still reads. Measurements and the
cost in eval time: docs/evaluation.md (Precision).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def evaluation_precision(
    model: nn.Module, precision: str, run_dtype: torch.dtype | None
) -> Iterator[torch.dtype | None]:
    """Within the block, the model computes in the evaluation's precision; yields the dtype
    to autocast to (None: fp32, no autocast). See Note: why evaluation is fp32."""
    if precision == "train" or run_dtype in (None, torch.float32):
        yield run_dtype
        return
    changed = [
        (p, p.dtype)
        for p in model.parameters()
        if p.is_floating_point() and p.dtype != torch.float32
    ]
    for p, _ in changed:
        p.data = p.data.float()
    try:
        yield None
    finally:
        for p, dtype in changed:
            p.data = p.data.to(dtype)
