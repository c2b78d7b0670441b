"""The training loss: next-token cross-entropy without the full logits tensor.

# Note: fused output projection + cross-entropy
A causal LM's output layer turns every position into ``vocab`` logits (49,152 for SmolLM2): for
a batch of 2 x 256 tokens that is 100 MB in fp32, plus its bf16 twin under autocast and its
gradient — often the largest activation of a small model. Yet only positions with a label
need logits, and with prompt masking (chat fine-tuning) that is a small share of the tokens.

:func:`loss_sum` therefore runs the model with its output layer bypassed, picks the hidden
states of the labelled positions, and computes the loss chunk by chunk in
:class:`LinearCrossEntropy`, which also computes the gradient w.r.t. those hidden states in
the same pass (softmax - onehot) @ W (the idea of Liger-Kernel's fused linear cross-entropy;
Hsu et al. 2024, arXiv 2410.10989). No chunk of logits outlives its loop iteration and no
extra matmul is done. The frozen output weight gets no gradient; a trainable one (full
fine-tuning, a LoRA on the head) or a model that post-processes its logits (soft-capping,
logit scaling) takes the plain path.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..sharding import full
from .batching import model_inputs
from .data import IGNORE

CHUNK_ROWS = 1024
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling")


class LinearCrossEntropy(torch.autograd.Function):
    """sum_i CE(h_i Wᵀ + b, y_i) for rows h (n, d) and targets y (n,), computed in row chunks;
    the gradient w.r.t. h is formed in forward, so backward is one multiply. With ``segments``
    (n,) and ``n_segments``, the sums per segment (a (n_segments,) tensor): DPO's
    log-probability of each sequence."""

    @staticmethod
    def forward(
        ctx,
        h: torch.Tensor,
        weight: torch.Tensor,
        bias,
        targets: torch.Tensor,
        segments: torch.Tensor | None = None,
        n_segments: int = 0,
    ):
        compute = weight.dtype if weight.dtype != torch.float32 else h.dtype
        w = weight.to(compute)
        b = None if bias is None else bias.float()
        shape = (n_segments,) if segments is not None else ()
        total = torch.zeros(shape, dtype=torch.float32, device=h.device)
        grad_h = torch.empty_like(h) if h.requires_grad else None
        for start in range(0, h.shape[0], CHUNK_ROWS):
            hc = h[start : start + CHUNK_ROWS].to(compute)
            yc = targets[start : start + CHUNK_ROWS]
            logits = (hc @ w.T).float()
            if b is not None:
                logits += b
            lse = torch.logsumexp(logits, dim=-1)
            ce = lse - logits.gather(1, yc[:, None]).squeeze(1)
            if segments is None:
                total += ce.sum()
            else:
                total.index_add_(0, segments[start : start + CHUNK_ROWS], ce)
            if grad_h is not None:
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                probs[torch.arange(yc.shape[0], device=yc.device), yc] -= 1.0
                grad_h[start : start + CHUNK_ROWS] = (probs.to(compute) @ w).to(h.dtype)
        ctx.save_for_backward(grad_h, segments)
        return total

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_h, segments = ctx.saved_tensors
        scale = grad_out if segments is None else grad_out[segments][:, None]
        return grad_h * scale.to(grad_h.dtype), None, None, None, None, None


def fused_loss_applies(model: nn.Module) -> bool:
    """True when logits are exactly ``output_layer(hidden)`` with a frozen plain weight."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not nn.Linear or head.weight.requires_grad:
        return False
    if head.bias is not None and head.bias.requires_grad:
        return False
    cfg = getattr(model, "config", None)
    return not any(getattr(cfg, k, None) not in (None, 1, 1.0) for k in _LOGIT_POSTPROCESSING)


@contextlib.contextmanager
def _hidden_states_out(model: nn.Module):
    """Within the block the model's "logits" are its last hidden states (output layer
    bypassed); the output layer comes back afterwards, ties intact."""
    head = model.get_output_embeddings()
    model.set_output_embeddings(nn.Identity())
    try:
        yield head
    finally:
        model.set_output_embeddings(head)


def loss_sum(
    model: nn.Module, batch: dict, unwrapped: nn.Module | None = None
) -> tuple[torch.Tensor, int]:
    """(sum of next-token cross-entropies over labelled tokens, how many tokens) of a
    batch made by ``batching.collate`` (padded rows or packed sequences).

    ``model`` is what to call (a DDP wrapper, say); ``unwrapped`` the module inside it."""
    labels = batch["labels"][:, 1:]
    valid = labels != IGNORE
    return _cross_entropy(model, batch, unwrapped, labels, valid), int(valid.sum())


def sequence_logps(
    model: nn.Module, batch: dict, unwrapped: nn.Module | None = None
) -> torch.Tensor:
    """The log-probability of each row's labelled tokens (the sum of their next-token
    log-probabilities), a (rows,) tensor, of a padded batch: what DPO compares."""
    labels = batch["labels"][:, 1:]
    valid = labels != IGNORE
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(labels)
    return -_cross_entropy(model, batch, unwrapped, labels, valid, rows[valid])


def _cross_entropy(
    model: nn.Module,
    batch: dict,
    unwrapped: nn.Module | None,
    labels: torch.Tensor,
    valid: torch.Tensor,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """The summed cross-entropy of the labelled positions (per row of ``rows``, the row of
    each labelled position, when given), through the fused head where it applies."""
    inner = unwrapped if unwrapped is not None else model
    n_rows = labels.shape[0]
    if not fused_loss_applies(inner):
        logits = model(**model_inputs(batch), use_cache=False).logits
        ce = nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(),
            labels.flatten(),
            ignore_index=IGNORE,
            reduction="sum" if rows is None else "none",
        )
        return ce if rows is None else ce.view_as(labels).sum(1)
    with _hidden_states_out(inner) as head:
        hidden = model(**model_inputs(batch), use_cache=False).logits
    picked = hidden[:, :-1][valid]  # only the positions that have a label
    # under FSDP the (frozen) head may be resharded once the model's forward is done
    weight, bias = (None if t is None else full(t.detach()) for t in (head.weight, head.bias))
    return LinearCrossEntropy.apply(picked, weight, bias, labels[valid], rows, n_rows)
