"""Tensors that may be FSDP2 shards: one vocabulary for code that reads or writes parameters
outside a forward pass (saving, AdaLoRA's rank allocator, memory counts).

Under FSDP2 (``torch.distributed.fsdp.fully_shard``) a parameter is a ``DTensor``: each
process holds a slice (its local shard) of the full tensor, and the full tensor exists only
inside the forward and backward of the unit that owns it. Outside those, code that needs the
whole value calls :func:`full` (a collective: every process must call it, in the same order),
and code that writes a whole value into a sharded tensor calls :func:`like` to cut out the
local part. On a plain tensor both are the identity, so callers need not know the strategy.

This module imports nothing from lorakit: adapters, checkpoints and the loop all use it.
"""

from __future__ import annotations

import torch

try:  # torch >= 2.4 (the floor in pyproject)
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover - a torch built without distributed support
    DTensor = None  # type: ignore[assignment,misc]
    distribute_tensor = None  # type: ignore[assignment]


def is_sharded(t) -> bool:
    """True for a DTensor (an FSDP2 parameter, its gradient or its optimizer state)."""
    return DTensor is not None and isinstance(t, DTensor)


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor: gathered from every process for a DTensor (a collective; it keeps
    autograd, so a loss term computed from it sends each shard its gradient), else ``t``."""
    return t.full_tensor() if is_sharded(t) else t


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's part of ``t`` as a plain tensor (all of it when ``t`` is not sharded)."""
    return t.to_local() if is_sharded(t) else t


def like(value: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``value`` (a whole tensor, the same on every process) laid out as ``ref`` is: sharded
    the same way when ``ref`` is a DTensor (no communication: each process cuts its own
    part), else moved to ``ref``'s device."""
    if is_sharded(ref):
        value = value.to(device=ref.device)
        return distribute_tensor(value, ref.device_mesh, ref.placements, src_data_rank=None)
    return value.to(device=ref.device)


def local_bytes(t: torch.Tensor) -> int:
    """Bytes this process holds for ``t`` (its shard for a DTensor)."""
    t = local(t)
    return t.numel() * t.element_size()
