"""LoRA-FA: LoRA with a frozen random A (Zhang et al. 2023, arXiv 2308.03303).

The forward is LoRA's, ``y = x W0ᵀ + b + s·drop(x Aᵀ) Bᵀ``; A (r, d_in) keeps its kaiming init
and never trains, B (d_out, r) starts at zero and is the only adapter weight that learns: half
of LoRA's trainable parameters, and ΔW = s·BA stays in the row space of A (docs/methods/lora-fa.md).

# Note: what backward needs
dL/dB = s·dYᵀ h with h = x Aᵀ (r values per token), and dL/dx = s·(dY B) A needs weights only.
dL/dA, the one term that needs the layer input x (d_in values per token), is never computed.
Without dropout the layer is LoRA's one-node :class:`~lorakit.adapters.lora.LoRALinearFunction`,
which with A frozen skips dA and saves h, not x; with dropout
:class:`FrozenABranch` saves h, A and B (and an r-sized dropout mask), never x:
activation memory of the branch drops from b·t·(d_in + r) to b·t·r per adapted layer. Dropout
is applied to h, not to x, since a mask over x would itself be d_in-sized.
(On torch 2.13 plain autograd also skips saving x for ``F.linear(x, A)`` once A has
``requires_grad=False``; the Function makes the saving explicit and independent of that, and
keeps the dropout mask r-sized.)

Optional LoRA-FA v2 gradient projection (``adapter.lora_fa.projection``; PEFT
``LoraFAOptimizer``): B's gradient is replaced by g̃_B = (1/s²)·g_B·pinv(AAᵀ + 1e-8·I), the
least-squares B-gradient whose update s·g̃_B·A best matches full fine-tuning's gradient projected on
A's row space. It is applied in the branch's backward, i.e. before accumulation (it is linear, so
gradient accumulation is unaffected) and before any optimizer, which then runs unchanged (AdamW).

Saved adapters are plain PEFT LoRA adapters (A included).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..options import MethodOptions
from .lora import LoRA, LoRALinear, at_lora_rate, fused_linear_applies

#: Ridge of the v2 projection, as in PEFT's LoraFAOptimizer.
PROJECTION_DELTA = 1e-8


def projected_b_grad(grad_b: torch.Tensor, a: torch.Tensor, scaling: float) -> torch.Tensor:
    """LoRA-FA v2: (1/s²)·g_B·pinv(AAᵀ + δI), computed in fp32 (autocast off: a backward run
    inside an autocast block would otherwise do these products in bf16), returned in g_B's
    dtype."""
    with torch.autocast(a.device.type, enabled=False):
        a = a.float()
        gram = a @ a.T + PROJECTION_DELTA * torch.eye(a.shape[0], device=a.device)
        return (grad_b.float() @ torch.linalg.pinv(gram) / scaling**2).to(grad_b.dtype)


class FrozenABranch(torch.autograd.Function):
    """s · drop(x Aᵀ) Bᵀ for a frozen A, saving h = drop(x Aᵀ), A, B and the mask: never x.

    (See Note: what backward needs.) Returns no gradient for A.
    """

    @staticmethod
    def forward(ctx, x, a, b, scaling: float, p: float, project: bool):
        h = F.linear(x, a)  # (..., r)
        mask = None
        if p > 0:
            mask = torch.rand_like(h) >= p  # bool, r per token
            h = h * mask / (1 - p)
        ctx.save_for_backward(h, a, b, mask)
        ctx.scaling, ctx.p, ctx.project = scaling, p, project
        return F.linear(h * scaling, b)

    @staticmethod
    def backward(ctx, grad_out):
        h, a, b, mask = ctx.saved_tensors
        s = ctx.scaling
        grad_x = grad_b = None
        if ctx.needs_input_grad[2]:
            g2 = grad_out.reshape(-1, grad_out.shape[-1])
            grad_b = s * (g2.T @ h.reshape(-1, h.shape[-1]))  # (d_out, r)
            if ctx.project:
                grad_b = projected_b_grad(grad_b, a, s)
        if ctx.needs_input_grad[0]:
            grad_h = (grad_out @ b) * s  # (..., r)
            if mask is not None:
                grad_h = grad_h * mask / (1 - ctx.p)
            grad_x = grad_h @ a  # weights only
        return grad_x, None, grad_b, None, None, None


class LoRAFALinear(LoRALinear):
    """LoRA-FA on ``nn.Linear``, GPT-2 ``Conv1D`` or a bitsandbytes 4-bit linear layer.

    If a user unfreezes ``lora_A`` the layer falls back to plain LoRA (which trains A and, by
    necessity, saves x): A frozen is what makes the branch cheap.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        use_rslora: bool = False,
        projection: bool = False,
    ):
        super().__init__(base_layer, r, alpha, dropout, use_rslora)
        self.lora_A.requires_grad_(False)  # random projection, kept as initialized
        self.dropout_p = float(dropout)
        self.projection = bool(projection)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = None if self.bypass() else fused_linear_applies(self, x)
        if dtype:
            # one node for the whole layer; with A frozen it saves h, never x (See Note: the
            # LoRA linear as one autograd node, in lora.py)
            project = None
            if self.projection and not self.lora_A.requires_grad:
                # the Gram matrix from A's fp32 master values (as PEFT's LoraFAOptimizer and
                # the plain path), not from A rounded to the GEMMs' dtype
                a = self.lora_A.detach()
                project = lambda grad_b: projected_b_grad(grad_b, a, self.scaling)  # noqa: E731
            return self.fused(x, grad_b_fn=project, dtype=dtype)
        out = self.base_layer(x)
        if self.bypass():
            return out
        return out + self.lora_branch(x).to(out.dtype)

    def lora_branch(self, x: torch.Tensor) -> torch.Tensor:
        if self.lora_A.requires_grad:
            return super().lora_branch(x)
        p = self.dropout_p if self.training else 0.0
        return FrozenABranch.apply(
            x, self.lora_A.to(x.dtype), self.lora_B.to(x.dtype), self.scaling, p, self.projection
        )

    def new_adapter_parameters(self) -> dict[str, nn.Parameter]:
        fresh = super().new_adapter_parameters()
        fresh["lora_A"].requires_grad_(False)
        return fresh

    def load_peft_state(self, state: dict[str, torch.Tensor]) -> None:
        super().load_peft_state(state)
        self.lora_A.requires_grad_(False)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", frozen_A=True, projection={self.projection}"


class LoRAFAOptions(MethodOptions):
    """``adapter.lora_fa``: LoRA-FA's options."""

    projection: bool = Field(
        False,
        description="LoRA-FA v2: project B's gradient onto what "
        "full fine-tuning would do within A's row space",
    )

    RENAMED: ClassVar[dict[str, str]] = {"lorafa_projection": "projection"}


class LoRAFA(LoRA):
    name = "lora-fa"
    summary = "LoRA-FA: A frozen, only B trains; saves x·Aᵀ, not x (Zhang et al. 2023)"
    linear = LoRAFALinear
    embedding = None
    options = LoRAFAOptions
    dm_dd_figure = False
    compare_settings = at_lora_rate(
        "Zhang et al. 2023 (LoRA-FA) train with LoRA's hyper-parameters, at LoRA's rank"
    )
    reads_plain_lora = False  # a LoRA-FA adapter is a plain LoRA adapter to PEFT

    def layer_kwargs(self, cls: type, cfg) -> dict:
        return {**super().layer_kwargs(cls, cfg), "projection": cfg.options.projection}


METHOD = LoRAFA()
