"""The optimizer and the learning-rate schedule: the one place that builds parameter groups.

LoRA+ (Hayou et al. 2024, arXiv 2402.12354; reference nikhil-ghosh-berkeley/loraplus) changes
only this: B learns ``loraplus_ratio`` times faster than A.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .inject import trainable_parameters


def parameter_groups(model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
    """AdamW groups for ``model``'s trainable parameters (each Parameter exactly once)."""
    params = list(trainable_parameters(model).values())
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "lr": lr, "weight_decay": weight_decay},
              {"params": no_decay, "lr": lr, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.0,
                    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8
                    ) -> torch.optim.Optimizer:
    """AdamW over :func:`parameter_groups`."""
    groups = parameter_groups(model, lr, weight_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: str, warmup_steps: int,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then ``constant``, ``linear`` decay or ``cosine`` decay to zero."""
    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(1.0, max(0.0, progress))
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
