"""One GEMM for the A's of the LoRA linears that read the same input (lorakit/adapters/lora.py,
See Note: one GEMM for the A's of a shared input): gradcheck in float64, a whole model's
outputs and gradients against the layers computing their own h, and every case where a
waiting h must not be taken."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.adapters import lora
from lorakit.adapters.lora import LoRALinear, SharedAFunction, link_shared_inputs
from tests.conftest import batch, tiny_model


class _Attn(nn.Module):
    """q/k/v reading one input, as transformers' attention modules do (not folded)."""

    def __init__(self, dtype=torch.float32, d_in=6, outs=(5, 3, 3), r=2):
        super().__init__()
        torch.manual_seed(0)
        for name, d in zip(("q_proj", "k_proj", "v_proj"), outs):
            base = nn.Linear(d_in, d, bias=name == "q_proj").to(dtype).requires_grad_(False)
            layer = LoRALinear(base, r, 1.4).train()
            layer.fold_a = False  # fp32 would fold A into the W0 GEMM instead
            nn.init.normal_(layer.lora_B, std=0.5)
            layer.lora_A.data, layer.lora_B.data = (layer.lora_A.data.to(dtype),
                                                    layer.lora_B.data.to(dtype))
            setattr(self, name, layer)
        assert link_shared_inputs(self) == 1

    def forward(self, x):
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)


def _count(monkeypatch) -> list:
    calls = []
    orig = SharedAFunction.apply
    monkeypatch.setattr(SharedAFunction, "apply", lambda *a: calls.append(1) or orig(*a))
    return calls


def test_gradcheck_float64(monkeypatch):
    """float64 is never folded: the group computes h; finite differences agree for x, every
    A and B and the bias; and the group's node was what ran."""
    calls = _count(monkeypatch)
    attn = _Attn(torch.float64)
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    params = [p for p in attn.parameters() if p.requires_grad]

    def fn(x, *ps):
        return attn(x)

    assert torch.autograd.gradcheck(fn, (x, *params))
    assert calls


@pytest.mark.parametrize("method", ["lora", "dora", "lora-fa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_equals_each_layer_computing_its_own(monkeypatch, method, dtype):
    """A tiny Llama (fp32 with the fold off, and bf16 under autocast): outputs and all
    gradients as with ``share_input = False``, within one rounding; two groups per decoder
    layer (q/k/v, gate/up); the separate GEMMs outside training (no_grad)."""
    monkeypatch.setattr(LoRALinear, "fold_a", False)
    calls = _count(monkeypatch)

    def run(share):
        monkeypatch.setattr(LoRALinear, "share_input", share)
        model = lk.apply(tiny_model("llama"), method=method, r=4, alpha=8).train()
        for _, layer in lk.inject.adapter_layers(model):
            nn.init.normal_(layer.lora_B, std=0.1)  # as if trained
        ids = batch()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = model(input_ids=ids).logits
        out.float().pow(2).mean().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        return out.detach().float(), grads, model

    out, grads, model = run(True)
    assert len(calls) == 2 * model.config.num_hidden_layers
    ref, ref_grads, _ = run(False)
    assert len(calls) == 2 * model.config.num_hidden_layers
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-5
    assert (out - ref).abs().max() <= tol * ref.abs().max()
    assert grads.keys() == ref_grads.keys() and all(g is not None for g in grads.values())
    for name, g in grads.items():
        assert (g - ref_grads[name]).abs().max() <= tol * ref_grads[name].abs().max(), name
    with torch.no_grad():
        model(input_ids=batch())
    assert len(calls) == 2 * model.config.num_hidden_layers  # evaluation: separate GEMMs


def test_a_waiting_h_is_taken_only_for_its_own_input(monkeypatch):
    """Each case where a member must compute its own h (or the group a new one), checked by
    the result against the layer's plain formula."""
    calls = _count(monkeypatch)
    attn = _Attn()
    x, other = torch.randn(4, 6), torch.randn(4, 6)

    def plain(layer, x):
        return (layer.base_layer(x) + layer.scaling * x @ layer.lora_A.T @ layer.lora_B.T)

    def check(layer, x):
        y = layer(x)
        assert torch.allclose(y, plain(layer, x), atol=1e-6)
        return y

    check(attn.q_proj, x)
    assert len(calls) == 1
    check(attn.k_proj, other)  # another input: its own group GEMM
    assert len(calls) == 2
    with torch.no_grad():
        attn.v_proj.lora_A.add_(1.0)  # A changed in place since (the version counter moved)
    check(attn.v_proj, other)
    assert len(calls) == 3
    check(attn.q_proj, x)
    x.add_(0.5)  # the input itself changed in place
    check(attn.k_proj, x)
    assert len(calls) == 5
    check(attn.q_proj, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # another dtype: own (bf16) GEMM
        assert attn.k_proj(x).dtype == torch.bfloat16
    assert len(calls) == 6
    y = check(attn.q_proj, x)
    y.sum().backward()  # the group's backward ends its forward: nothing waits after it
    assert all(p is None for p in attn.q_proj._shared.pending)
    check(attn.k_proj, x)
    assert len(calls) == 8


def test_members_that_would_not_take_the_node_are_left_out(monkeypatch):
    calls = _count(monkeypatch)
    attn = _Attn()
    attn.k_proj.disabled = True
    attn.v_proj.dropout = nn.Dropout(0.5)
    x = torch.randn(4, 6)
    attn(x)
    assert len(calls) == 0  # q alone could take part: no group GEMM
    attn.v_proj.dropout = nn.Identity()
    attn(x)
    assert len(calls) == 1
    assert attn.q_proj._shared.pending[1] is None  # the disabled k got no h


def test_copies_of_the_model_group_their_own_layers():
    attn = _Attn()
    for twin in (copy.deepcopy(attn), pickle.loads(pickle.dumps(attn))):
        group = twin.q_proj._shared
        assert group is twin.v_proj._shared and group is not attn.q_proj._shared
        assert [r() for r in group.refs] == [twin.q_proj, twin.k_proj, twin.v_proj]
        x = torch.randn(4, 6)
        for got, want in zip(twin(x), attn(x)):
            assert torch.allclose(got, want)


def test_groups_of_transformers_models():
    """q/k/v and gate/up of each decoder layer; GPT-2's fused c_attn has none."""
    model = lk.apply(tiny_model("llama"), method="lora", r=4)
    groups = {id(m._shared) for _, m in lk.inject.adapter_layers(model) if "_shared" in m.__dict__}
    assert len(groups) == 2 * model.config.num_hidden_layers
    assert "_shared" not in model.model.layers[0].self_attn.o_proj.__dict__
    gpt2 = lk.apply(tiny_model("gpt2"), method="lora", r=4)
    assert not any("_shared" in m.__dict__ for _, m in lk.inject.adapter_layers(gpt2))
    assert lora.SHARED_INPUTS[0] == ("q_proj", "k_proj", "v_proj")
