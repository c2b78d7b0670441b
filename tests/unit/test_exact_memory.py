"""training/memory.py: the exact byte counts equal a direct count on a tiny model, and
measuring them leaves the weights as they were."""

from __future__ import annotations

import pytest
import torch

import lorakit as lk
from lorakit.adapters.base import adapter_layers
from lorakit.training.memory import FIELDS, exact_memory, total_mib
from lorakit.training.optim import build_optimizer
from tests.conftest import batch, tiny_model


def _direct_saved(model, ids) -> int:
    """Bytes of the tensors autograd saves, counted with a hook of this test's own."""
    own = {p.untyped_storage().data_ptr() for p in [*model.parameters(), *model.buffers()]}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids, labels=ids)  # run for what autograd saves
    return sum(seen.values())


@pytest.mark.parametrize("method", ["lora", "full"])
def test_exact_bytes_equal_a_direct_count(method):
    model = tiny_model("llama")
    lk.apply(model, method=method, r=4, alpha=8, target_modules="all-linear")
    ids = batch(n=3, length=10)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    got = exact_memory(
        model,
        lambda ids=ids: model(input_ids=ids, labels=ids).loss,
        lambda m: build_optimizer(m, 1e-3, 0.1),
    )
    # direct count: fp32 everywhere; the tied embedding/head once; AdamW keeps two moments of
    # each trainable tensor and a 4-byte step count per tensor
    params = {id(p): p for p in model.parameters()}.values()
    trainable = [p for p in params if p.requires_grad]
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    # a LoRA layer that trained keeps a copy of A beside W0 (its [W0; A] buffer,
    # adapters/lora.py: Note: A folded into the frozen GEMM), counted with W0's storage
    folds = sum(m.r * m.in_features * 4 for _, m in adapter_layers(model) if "_fold" in m.__dict__)
    assert (method == "lora") == (folds > 0)
    assert got["params_bytes"] == sum(p.numel() * 4 for p in params) + buffers + folds
    assert got["grads_bytes"] == sum(p.numel() * 4 for p in trainable)
    assert got["optimizer_bytes"] == sum(2 * p.numel() * 4 + 4 for p in trainable)
    assert got["saved_bytes"] == _direct_saved(model, ids) > 0
    # the lr-0 step changed no weight, and left no gradient or optimizer state behind
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
        assert p.grad is None
    assert total_mib(got) == pytest.approx(sum(got[k] for k in FIELDS) / 2**20)
    if method == "lora":  # LoRA trains a small fraction: its state is a fraction of full's
        assert got["grads_bytes"] < got["params_bytes"] / 2


def test_saved_bytes_grow_with_the_batch():
    model = tiny_model("llama")
    lk.apply(model, method="lora", r=4, alpha=8)
    sizes = []
    for n in (2, 4):
        ids = batch(n=n, length=12)
        sizes.append(
            exact_memory(
                model,
                lambda ids=ids: model(input_ids=ids, labels=ids).loss,
                lambda m: build_optimizer(m, 1e-3),
            )["saved_bytes"]
        )
    assert sizes[1] > 1.5 * sizes[0]


def test_total_needs_every_field():
    assert total_mib(None) is None
    assert total_mib({"params_bytes": 2**20}) is None
