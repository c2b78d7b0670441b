"""The optimizer and the learning-rate schedule: the one place that builds parameter groups.

LoRA+ (Hayou et al. 2024, arXiv 2402.12354; reference nikhil-ghosh-berkeley/loraplus) changes
only this: B learns ``loraplus_ratio`` times faster than A. Groups as in the reference's
``create_loraplus_optimizer`` (docs/methods/lora-plus.md):

    A and every other >=2-D trainable        lr          weight_decay
    adapters on embeddings (A and B)         lr_emb      weight_decay
    B and every 1-D trainable                ratio·lr    weight_decay, or 0 for biases/norms

so it composes with every method: DoRA's magnitude m is 1-D and moves with B, AdaLoRA's E
(r, 1) with A, LoRA-FA has no trainable A, ``full`` puts matrices at lr and vectors at ratio·lr.

# Note: groups by identity
A parameter's role is read from the adapter layer that owns it (``layer.lora_B is p``; the
layer's base is an ``nn.Embedding``), never from a name substring: PEFT#3499 lost the whole
embedding group that way, and a module named e.g. ``lora_Bridge`` would put its A among the B's.
Weight decay is off for biases and for normalization layers' parameters (any module whose type
name contains "norm", as transformers' Trainer decides today); the reference and PEFT decay an
RMSNorm weight because they only exempt ``nn.LayerNorm``: the one place lorakit differs.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..inject import adapter_layers, trainable_parameters


def parameter_groups(model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
    """AdamW groups for ``model``'s trainable parameters (each Parameter exactly once).

    With ``loraplus_ratio`` set in the model's adapter config: :func:`loraplus_groups`."""
    cfg = getattr(getattr(model, "lorakit_state", None), "config", None)
    if cfg is not None and cfg.loraplus_ratio:
        return loraplus_groups(
            model, lr, weight_decay, cfg.loraplus_ratio, cfg.loraplus_lr_embedding
        )
    params = list(trainable_parameters(model).values())
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [
        {"params": decay, "lr": lr, "weight_decay": weight_decay},
        {"params": no_decay, "lr": lr, "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def _no_decay_ids(model: nn.Module) -> set[int]:
    """Biases and normalization-layer parameters (See Note: groups by identity)."""
    out: set[int] = set()
    for module in model.modules():
        is_norm = isinstance(module, nn.LayerNorm) or "norm" in type(module).__name__.lower()
        for name, p in module.named_parameters(recurse=False):
            if is_norm or name == "bias":
                out.add(id(p))
    return out


def loraplus_groups(
    model: nn.Module, lr: float, weight_decay: float, ratio: float, lr_embedding: float = 1e-6
) -> list[dict]:
    """LoRA+ groups (Hayou et al. 2024; See Note: groups by identity). Empty groups are left
    out; each group carries a ``name`` for logs."""
    params = trainable_parameters(model)
    trainable = {id(p) for p in params.values()}
    b_ids: set[int] = set()
    emb_ids: set[int] = set()
    for _, layer in adapter_layers(model):
        own = [p for p in layer.parameters(recurse=False) if id(p) in trainable]
        if isinstance(layer.base_layer, nn.Embedding):
            emb_ids.update(id(p) for p in own)
        elif getattr(layer, "lora_B", None) is not None:
            b_ids.add(id(layer.lora_B))
    no_decay = _no_decay_ids(model)
    groups: dict[str, list] = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    for p in params.values():
        if id(p) in emb_ids:
            groups["embedding"].append(p)
        elif id(p) in b_ids or p.ndim < 2:
            groups["B_no_decay" if id(p) in no_decay else "B"].append(p)
        else:
            groups["A"].append(p)
    settings = {
        "A": (lr, weight_decay),
        "embedding": (lr_embedding, weight_decay),
        "B": (ratio * lr, weight_decay),
        "B_no_decay": (ratio * lr, 0.0),
    }
    return [
        {"name": k, "params": v, "lr": settings[k][0], "weight_decay": settings[k][1]}
        for k, v in groups.items()
        if v
    ]


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """AdamW over :func:`parameter_groups` (LoRA+ groups when the adapter config asks).

    torch's fused AdamW kernel where every parameter allows it (fp32/bf16/fp16 on CPU or CUDA):
    one pass over all tensors instead of a loop over them (420 LoRA tensors of SmolLM2: 6 ms
    a step instead of 22 ms on 2 CPU cores); the same update within rounding."""
    from .distributed import split_param_groups  # FSDP: shards and whole tensors apart

    groups = split_param_groups(parameter_groups(model, lr, weight_decay))
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and all(
        p.device.type in ("cpu", "cuda")
        and p.dtype in (torch.float32, torch.bfloat16, torch.float16)
        for p in params
    )
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused or None)


def build_scheduler(
    optimizer: torch.optim.Optimizer, schedule: str, warmup_steps: int, total_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
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
