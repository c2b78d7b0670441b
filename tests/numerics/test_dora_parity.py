"""DoRA parity with PEFT 0.21 (``LoraConfig(use_dora=True)``) on identical weights.

Tolerance: fp32, 1e-5 on logits and on the gradients of A, B and m (docs/methods/dora.md).
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict

import lorakit as lk
from lorakit.adapters.dora import DoRALinear, row_sq_norms
from lorakit.inject import adapter_layers
from lorakit.peft_format import PREFIX, load_state_into
from tests.conftest import batch, tiny_model, train_steps

TOL = 1e-5

CASES = [
    ("llama", "all-linear", 0.0),
    ("llama", ["q_proj", "v_proj", "down_proj"], 0.1),
    ("qwen2", "all-linear", 0.0),
    ("gpt2", ["c_attn", "c_proj", "c_fc"], 0.0),
]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _peft_dora(arch, targets, dropout):
    """A PEFT DoRA model with random A, B and a magnitude moved off its initial norm."""
    torch.manual_seed(3)
    pcfg = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=targets,
        use_dora=True,
        lora_dropout=dropout,
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(tiny_model(arch), pcfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.3 * torch.rand_like(p))
    return model.eval()


def _ours_like(peft_model, arch, targets, dropout):
    """lorakit DoRA on a fresh copy of the base, holding exactly PEFT's tensors."""
    ours = lk.apply(
        tiny_model(arch), method="dora", r=4, alpha=8, target_modules=targets, dropout=dropout
    )
    state = get_peft_model_state_dict(peft_model)
    tensors = {
        k[len(PREFIX) :].replace("lora_magnitude_vector.weight", "lora_magnitude_vector"): v
        for k, v in state.items()
    }
    load_state_into(ours, tensors, "peft")
    return ours


def _grads(model, ids, peft: bool):
    torch.manual_seed(7)  # same dropout masks in both models
    model.train()
    model.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    model.eval()
    out = {}
    for n, p in model.named_parameters():
        if p.grad is None:
            continue
        key = n.replace(".default", "").replace("base_model.model.", "") if peft else n
        out[
            key.replace("lora_magnitude_vector.weight", "lora_magnitude_vector")
            .replace("lora_A.weight", "lora_A")
            .replace("lora_B.weight", "lora_B")
        ] = p.grad
    return out


@pytest.mark.parametrize("arch,targets,dropout", CASES)
def test_logits_and_gradients_equal_peft(arch, targets, dropout):
    peft_model = _peft_dora(arch, targets, dropout)
    ours = _ours_like(peft_model, arch, targets, dropout)
    ids = batch()
    assert (_logits(ours, ids) - _logits(peft_model, ids)).abs().max().item() <= TOL
    g_ours, g_peft = _grads(ours, ids, False), _grads(peft_model, ids, True)
    assert set(g_ours) == set(g_peft) and any("magnitude" in k for k in g_ours)
    for name, g in g_ours.items():
        assert (g - g_peft[name]).abs().max().item() <= TOL, name


def test_init_is_base_row_norms_and_identity():
    base = tiny_model("llama")
    model = lk.apply(copy.deepcopy(base), method="dora", r=4, alpha=8)
    for name, layer in adapter_layers(model):
        w = base.get_submodule(name).weight
        assert torch.allclose(layer.lora_magnitude_vector, w.norm(dim=1), rtol=1e-6)
    ids = batch()
    assert (_logits(model, ids) - _logits(base, ids)).abs().max().item() <= 1e-6


@pytest.mark.parametrize("arch,targets", [("llama", "all-linear"), ("gpt2", ["c_attn", "c_fc"])])
def test_lorakit_adapter_loads_in_peft(arch, targets, tmp_path):
    model = train_steps(
        lk.apply(tiny_model(arch), method="dora", r=4, alpha=8, target_modules=targets)
    )
    ids = batch()
    ours = _logits(model, ids)
    assert not torch.allclose(ours, _logits(tiny_model(arch), ids)), "training changed nothing"
    lk.save_adapter(model, tmp_path / "ad")
    peft_model = PeftModel.from_pretrained(tiny_model(arch), tmp_path / "ad").eval()
    assert peft_model.peft_config["default"].use_dora
    assert (ours - _logits(peft_model, ids)).abs().max().item() <= TOL


@pytest.mark.parametrize("arch,targets", [("llama", "all-linear"), ("gpt2", ["c_attn"])])
def test_peft_adapter_loads_in_lorakit(arch, targets, tmp_path):
    peft_model = _peft_dora(arch, targets, 0.0)
    peft_model.save_pretrained(tmp_path / "peft")
    ids = batch()
    model = lk.load_adapter(tiny_model(arch), tmp_path / "peft")
    assert all(isinstance(m, DoRALinear) for _, m in adapter_layers(model))
    assert (_logits(model, ids) - _logits(peft_model, ids)).abs().max().item() <= TOL


@pytest.mark.parametrize("arch,targets", [("llama", "all-linear"), ("gpt2", ["c_attn", "c_fc"])])
def test_merge_unmerge_exact(arch, targets):
    model = train_steps(
        lk.apply(tiny_model(arch), method="dora", r=4, alpha=8, target_modules=targets)
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = batch()
    unmerged = _logits(model, ids)
    lk.merge(model)
    lk.merge(model)
    assert (_logits(model, ids) - unmerged).abs().max().item() <= 1e-5
    lk.unmerge(model)
    lk.unmerge(model)
    after = model.state_dict()
    assert max((before[k] - after[k]).abs().max().item() for k in before) <= 1e-6
    assert (_logits(model, ids) - unmerged).abs().max().item() <= 1e-5


def test_zero_norm_rows_give_no_nan():
    base = tiny_model("llama")
    with torch.no_grad():
        base.model.layers[0].self_attn.o_proj.weight[:5] = 0  # as Llama-3.1's o_proj
    model = lk.apply(base, method="dora", r=4, alpha=8)
    layer = model.model.layers[0].self_attn.o_proj
    assert (layer.lora_magnitude_vector[:5] == 0).all()
    ids = batch()
    model.train()
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in lk.trainable_parameters(model).values())
    model.zero_grad()
    train_steps(model)
    w_before = layer.base_layer.weight.clone()
    out = _logits(model, ids)
    lk.merge(model)
    assert torch.isfinite(layer.base_layer.weight).all()
    assert (_logits(model, ids) - out).abs().max().item() <= 1e-5
    lk.unmerge(model)
    assert (layer.base_layer.weight - w_before).abs().max().item() <= 1e-6


def test_norm_formula_matches_direct_norm_including_cancelling_rows():
    layer = DoRALinear(torch.nn.Linear(64, 48), 4, 8.0)
    with torch.no_grad():
        torch.nn.init.normal_(layer.lora_B, std=0.5)
        direct = lambda: (layer.base_layer.weight + layer.delta_weight()).norm(dim=1)  # noqa: E731
        assert torch.allclose(layer.weight_norm(), direct(), rtol=1e-6)
        # make row 3 cancel: W0 = -s·BA there, plus a tiny remainder
        layer.base_layer.weight[3] = -layer.delta_weight()[3] + 1e-4
        assert torch.allclose(layer.weight_norm(), direct(), rtol=1e-5)


@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16])
def test_norm_under_autocast_is_computed_as_without(w_dtype):
    """bf16 autocast does not reach the norm's fp32 products (B·AAᵀ, the bracket, the row
    sums): the same bits as outside autocast, for an fp32 and a bf16 base."""
    layer = DoRALinear(torch.nn.Linear(64, 48).to(w_dtype), 4, 8.0)
    with torch.no_grad():
        torch.nn.init.normal_(layer.lora_B, std=0.5)
        outside = layer.weight_norm()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inside = layer.weight_norm()
    assert inside.dtype == torch.float32 and torch.equal(inside, outside)


def test_nf4_base_equals_dequantized_base():
    """DoRA over a bitsandbytes Linear4bit computes what it computes over the dequantized W0."""
    pytest.importorskip("bitsandbytes")
    from lorakit.quant import dequantized_weight

    q = lk.apply(
        tiny_model("llama"),
        method="dora",
        r=4,
        alpha=8,
        quantize="nf4",
        quant_compute_dtype="float32",
    )
    dense = tiny_model("llama")
    for name, layer in adapter_layers(q):
        with torch.no_grad():
            dense.get_submodule(name).weight.copy_(dequantized_weight(layer.base_layer))
    dense = lk.apply(dense, method="dora", r=4, alpha=8)
    for (_, lq), (_, ld) in zip(adapter_layers(q), adapter_layers(dense)):
        assert torch.allclose(lq.lora_magnitude_vector, ld.lora_magnitude_vector, rtol=1e-6)
        with torch.no_grad():
            torch.nn.init.normal_(ld.lora_B, std=0.05)
            lq.lora_A.copy_(ld.lora_A)
            lq.lora_B.copy_(ld.lora_B)
    ids = batch()
    assert (_logits(q, ids) - _logits(dense, ids)).abs().max().item() <= 1e-4


def test_row_sq_norms_chunks_bf16_without_full_copy():
    w = torch.randn(300, 70).to(torch.bfloat16)
    assert torch.allclose(row_sq_norms(w), w.float().pow(2).sum(1), rtol=1e-6)
