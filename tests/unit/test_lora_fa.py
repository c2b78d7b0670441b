"""LoRA-FA (docs/methods/lora-fa.md): frozen A, trained B, a branch that never saves its input x."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel

import lorakit as lk
from lorakit.adapters.lora import LoRALinear
from lorakit.adapters.lora_fa import FrozenABranch, LoRAFALinear, projected_b_grad
from lorakit.inject import adapter_layers
from tests.conftest import batch, tiny_model, train_steps


def _layer(cls, dropout=0.0, projection=False, d_in=48, d_out=40, r=4, seed=0):
    torch.manual_seed(seed)
    base = torch.nn.Linear(d_in, d_out).requires_grad_(False)  # frozen, as lk.apply leaves it
    extra = {"projection": projection} if cls is LoRAFALinear else {}
    layer = cls(base, r, 8.0, dropout=dropout, **extra)
    torch.nn.init.normal_(layer.lora_B, std=0.1)  # as if trained, so dL/dx sees B
    return layer


def _saved_shapes(fn):
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t
    ):
        out = fn()
    return shapes, out


def test_branch_never_saves_the_layer_input():
    x = torch.randn(4, 32, 48, requires_grad=True)  # more values than any weight
    fa, plain = _layer(LoRAFALinear, dropout=0.1), _layer(LoRALinear, dropout=0.1)
    fa.train(), plain.train()
    fa_shapes, _ = _saved_shapes(lambda: fa(x))
    plain_shapes, _ = _saved_shapes(lambda: plain(x))
    assert tuple(x.shape) in plain_shapes  # LoRA keeps x (for dL/dA) and a d_in-sized mask
    assert all(torch.Size(s).numel() < x.numel() for s in fa_shapes)
    assert (4, 32, 4) in fa_shapes  # h = x·Aᵀ, r per token


def test_model_saves_fewer_bytes_than_lora():
    def saved_bytes(method):
        model = lk.apply(tiny_model("llama"), method=method, r=4, alpha=8).train()
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            ids = batch()
            model(input_ids=ids, labels=ids)  # run for what autograd saves
        return sum(seen.values())

    assert saved_bytes("lora-fa") < saved_bytes("lora")


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_gradients_equal_plain_autograd(dropout):
    layer = _layer(LoRAFALinear, dropout=dropout).train()
    x = torch.randn(3, 5, 48, requires_grad=True)
    g = torch.randn(3, 5, 40)
    torch.manual_seed(11)
    layer(x).backward(g)
    gb, gx = layer.lora_B.grad.clone(), x.grad.clone()
    assert layer.lora_A.grad is None

    # reference: the same math by plain autograd with the same dropout mask on h
    a, b = layer.lora_A.detach(), layer.lora_B.detach().clone().requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    torch.manual_seed(11)
    h = F.linear(x2, a)
    if dropout:
        h = h * (torch.rand_like(h) >= dropout) / (1 - dropout)
    y = layer.base_layer(x2) + F.linear(h * layer.scaling, b)
    y.backward(g)
    # relative to the largest element: without dropout the layer's GEMM yields h beside
    # x W0ᵀ (A folded into the frozen GEMM, adapters/lora.py), which a BLAS may sum in another
    # order than x Aᵀ alone: one rounding of h
    assert (gb - b.grad).abs().max().item() <= 1e-6 * b.grad.abs().max().item()
    assert (gx - x2.grad).abs().max().item() <= 1e-6 * x2.grad.abs().max().item()


def test_gradcheck_float64():
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    a = torch.randn(2, 6, dtype=torch.float64)
    b = torch.randn(5, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x, b: FrozenABranch.apply(x, a, b, 1.7, 0.0, False), (x, b)
    )


def test_v2_projection_matches_formula():
    x = torch.randn(3, 5, 48)
    g = torch.randn(3, 5, 40)
    plain, proj = _layer(LoRAFALinear), _layer(LoRAFALinear, projection=True)
    plain(x).backward(g)
    proj(x).backward(g)
    a, s = plain.lora_A.detach(), plain.scaling
    expected = plain.lora_B.grad @ torch.linalg.pinv(a @ a.T + 1e-8 * torch.eye(4)) / s**2
    assert torch.allclose(proj.lora_B.grad, expected, rtol=1e-5, atol=1e-7)
    assert torch.allclose(projected_b_grad(plain.lora_B.grad, a, s), expected)


def test_trainable_parameters_are_loras_minus_every_a():
    lora = lk.apply(tiny_model("llama"), method="lora", r=4, alpha=8)
    fa = lk.apply(tiny_model("llama"), method="lora-fa", r=4, alpha=8)
    n_a = sum(m.lora_A.numel() for _, m in adapter_layers(fa))
    assert lk.count_parameters(fa)[0] == lk.count_parameters(lora)[0] - n_a
    assert not any(n.endswith("lora_A") for n in lk.trainable_parameters(fa))


def test_a_unchanged_by_training_and_frozen_after_load(tmp_path):
    model = lk.apply(tiny_model("llama"), method="lora-fa", r=4, alpha=8)
    a0 = {n: m.lora_A.clone() for n, m in adapter_layers(model)}
    train_steps(model)
    for n, m in adapter_layers(model):
        assert torch.equal(m.lora_A, a0[n]) and m.lora_B.abs().max() > 0
    lk.save_adapter(model, tmp_path / "ad")
    back = lk.load_adapter(tiny_model("llama"), tmp_path / "ad")
    for n, m in adapter_layers(back):
        assert isinstance(m, LoRAFALinear) and not m.lora_A.requires_grad
        assert torch.equal(m.lora_A, a0[n])


@pytest.mark.parametrize("arch,targets", [("llama", "all-linear"), ("gpt2", ["c_attn", "c_fc"])])
def test_saved_adapter_loads_in_peft_with_identical_logits(arch, targets, tmp_path):
    model = train_steps(
        lk.apply(
            tiny_model(arch),
            method="lora-fa",
            r=4,
            alpha=8,
            target_modules=targets,
            lora_fa={"projection": True},
        )
    )
    ids = batch()
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    lk.save_adapter(model, tmp_path / "ad")
    peft_model = PeftModel.from_pretrained(tiny_model(arch), tmp_path / "ad").eval()
    with torch.no_grad():
        theirs = peft_model(input_ids=ids).logits
    assert (ours - theirs).abs().max().item() <= 1e-5


def test_unfrozen_a_falls_back_to_lora():
    layer = _layer(LoRAFALinear)
    ref = copy.deepcopy(layer)
    layer.lora_A.requires_grad_(True)
    x = torch.randn(4, 48)
    layer(x).sum().backward()
    assert layer.lora_A.grad is not None
    assert torch.allclose(layer(x), ref(x), atol=1e-6)


def test_v2_projection_under_autocast_uses_a_in_fp32():
    """Under bf16 autocast the layer's GEMMs run in bf16, but the v2 projection's Gram matrix
    AAᵀ is A's fp32 master values' (as PEFT's LoraFAOptimizer computes it), and the
    projection runs in fp32 even when backward is called inside the autocast block."""
    x = torch.randn(3, 5, 48)
    grads = []
    for projection in (False, True):
        layer = _layer(LoRAFALinear, projection=projection).train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            layer(x).float().sum().backward()
        grads.append(layer.lora_B.grad)
    a = layer.lora_A.detach()
    assert a.dtype == torch.float32
    expected = projected_b_grad(grads[0], a, layer.scaling)
    assert torch.allclose(grads[1], expected, rtol=1e-5, atol=1e-7)
    rounded = projected_b_grad(grads[0], a.to(torch.bfloat16), layer.scaling)
    assert not torch.allclose(rounded, expected, rtol=1e-5, atol=1e-7)  # the test can tell
