"""The fused output-projection + cross-entropy equals the plain path (fp32, 1e-5): loss and the
gradients of every trainable parameter; models it cannot serve take the plain path."""

from __future__ import annotations

import pytest
import torch

import lorakit as lk
import lorakit.training.loss as L
from tests.conftest import batch, tiny_model


def _loss_and_grads(model, b, fused: bool, monkeypatch):
    monkeypatch.setattr(
        L, "fused_loss_applies", (lambda m: fused) if not fused else L.fused_loss_applies
    )
    model.zero_grad()
    s, n = L.loss_sum(model, b)
    (s / n).backward()
    return s.item(), {k: p.grad.clone() for k, p in lk.trainable_parameters(model).items()}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_fused_equals_plain(arch, monkeypatch):
    model = lk.apply(tiny_model(arch), r=4, alpha=8, trainable_modules=["norms"])
    for _, layer in lk.inject.adapter_layers(model):
        torch.nn.init.normal_(layer.lora_B, std=0.1)
    ids = batch(length=20)
    labels = ids.clone()
    labels[:, :7] = L.IGNORE  # a masked prompt
    b = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    assert L.fused_loss_applies(model)
    monkeypatch.setattr(L, "CHUNK_ROWS", 5)  # several chunks
    plain, g_plain = _loss_and_grads(model, b, False, monkeypatch)
    fused, g_fused = _loss_and_grads(model, b, True, monkeypatch)
    assert abs(plain - fused) <= 1e-5 * abs(plain)
    assert g_plain.keys() == g_fused.keys()
    worst = max((g_plain[k] - g_fused[k]).abs().max().item() for k in g_plain)
    assert worst <= 1e-5


def test_trainable_head_takes_the_plain_path():
    assert not L.fused_loss_applies(lk.apply(tiny_model(), method="full"))
    assert not L.fused_loss_applies(lk.apply(tiny_model("qwen2"), target_modules=["lm_head"]))
    assert L.fused_loss_applies(lk.apply(tiny_model(), r=2))


def test_output_layer_is_restored_with_its_tie():
    model = lk.apply(tiny_model(), r=2)
    head = model.get_output_embeddings()
    ids = batch()
    L.loss_sum(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    assert model.get_output_embeddings() is head
    assert head.weight is model.model.embed_tokens.weight
