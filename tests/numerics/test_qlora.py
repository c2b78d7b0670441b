"""QLoRA (docs/methods/qlora.md): NF4 base weights through bitsandbytes under the adapter methods.

Tolerances, measured on this CPU (bitsandbytes 0.50.2, torch 2.x):
- LoRA over NF4 == LoRA over an nn.Linear holding dequantize(W_nf4), forward and dL/dx:
  compute fp32: 1e-6 relative to max |.| (seen: 0, bit-identical); compute bf16 with fp32
  input, the base matmul runs on bf16-rounded x and W: 5e-3 relative (seen 8.9e-4 for y,
  8.4e-4 for dL/dx); bf16 input: bit-identical (tolerance 0). dL/dA and dL/dB do not pass
  through the base: 1e-6 (seen: 0).
- A trained QLoRA adapter loaded by PEFT onto the dequantized 16-bit base == lorakit on that same
  base: 1e-5 (seen: 0). lorakit's quantized forward (bf16 compute) vs PEFT on the dequantized
  base: 5e-3 absolute on logits of max |.| ~0.6 (seen 7.0e-4). vs PEFT on the original,
  never-quantized base (adds the NF4 error of the base): 0.1 (seen 2.3e-2).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.adapters.lora import LoRALinear
from lorakit.quant import (
    NF4_CODE,
    dequantized_weight,
    is_quantized,
    linear_weight_bytes,
    nf4_linear,
)
from tests.conftest import batch, tiny_model

bnb = pytest.importorskip("bitsandbytes")


def _lora_pair(compute_dtype, d_in=96, d_out=80, r=4, seed=0):
    """(LoRA over NF4, LoRA over nn.Linear(W = dequantize(W_nf4))), same adapter weights."""
    torch.manual_seed(seed)
    lin = nn.Linear(d_in, d_out, bias=True)
    q = nf4_linear(lin, compute_dtype)
    ref = nn.Linear(d_in, d_out, bias=True)
    with torch.no_grad():
        ref.weight.copy_(dequantized_weight(q))
        ref.bias.copy_(q.bias.float())
    ref.requires_grad_(False)
    ours, theirs = LoRALinear(q, r, 8), LoRALinear(ref, r, 8)
    with torch.no_grad():
        ours.lora_B.normal_()
        theirs.lora_A.copy_(ours.lora_A)
        theirs.lora_B.copy_(ours.lora_B)
    return ours, theirs


def _forward_backward(layer, x, g):
    x = x.detach().clone().requires_grad_(True)
    y = layer(x)
    (y.float() * g).sum().backward()
    return y.detach().float(), x.grad.float(), layer.lora_A.grad, layer.lora_B.grad


@pytest.mark.parametrize(
    "compute,x_dtype,rel_tol",
    [
        ("float32", torch.float32, 1e-6),
        ("bfloat16", torch.float32, 5e-3),
        ("bfloat16", torch.bfloat16, 0.0),
    ],
)
def test_lora_over_nf4_equals_lora_over_dequantized(compute, x_dtype, rel_tol):
    ours, theirs = _lora_pair(getattr(torch, compute))
    if x_dtype == torch.bfloat16:
        theirs.base_layer.to(torch.bfloat16)  # the reference base in the input's dtype
    ours.train(), theirs.train()
    x = torch.randn(3, 7, 96).to(x_dtype)
    g = torch.randn(3, 7, 80)
    y1, gx1, ga1, gb1 = _forward_backward(ours, x, g)
    y2, gx2, ga2, gb2 = _forward_backward(theirs, x, g)
    assert y1.dtype == y2.dtype
    scale_y, scale_x = y2.abs().max(), gx2.abs().max()
    assert (y1 - y2).abs().max() <= rel_tol * scale_y + 1e-6
    assert (gx1 - gx2).abs().max() <= rel_tol * scale_x + 1e-6
    # The adapter's gradients do not go through the 4-bit base (same upstream gradient).
    tol_ab = 1e-6 if x_dtype == torch.float32 else 0.0
    assert (ga1 - ga2).abs().max() <= tol_ab * ga2.abs().max() + 1e-6
    assert (gb1 - gb2).abs().max() <= tol_ab * gb2.abs().max() + 1e-6
    # Only dL/dx flows into the base: the 4-bit weight never gets a gradient.
    assert ours.base_layer.weight.grad is None
    assert ours.lora_A.dtype == torch.float32  # fp32 master weights over the 4-bit base


def test_eval_forward_equals_train_forward():
    """bitsandbytes' CPU inference repacking is off on lorakit's layers (Note: CPU fast path)."""
    ours, _ = _lora_pair(torch.bfloat16)
    x = torch.randn(2, 5, 96)
    ours.train()
    with torch.no_grad():
        y_train = ours(x)
    w_before = dequantized_weight(ours.base_layer).clone()
    ours.eval()
    with torch.no_grad():
        y_eval = ours(x)
    assert torch.equal(y_train, y_eval)
    assert torch.equal(dequantized_weight(ours.base_layer), w_before)


def test_nf4_code_values_match_methods_md():
    code = bnb.functional.get_4bit_type("nf4", device="cpu")
    assert code.tolist()[0] == -1.0 and code.tolist()[7] == 0.0 and code.tolist()[15] == 1.0
    assert torch.allclose(code, torch.tensor(NF4_CODE), atol=5e-5, rtol=0)
    # ... and the layers lorakit builds use exactly that table, blocks of 64, double quant
    q = nf4_linear(nn.Linear(128, 64), torch.bfloat16)
    state = q.weight.quant_state
    assert state.quant_type == "nf4" and state.blocksize == 64
    assert torch.equal(state.code, code)
    assert state.nested and state.absmax.dtype == torch.uint8 and state.state2.blocksize == 256


def _block_errors(q, w):
    """|dequantize(W_nf4) - W| relative to each block's absmax (W in (d_out, d_in) layout)."""
    bs = q.weight.quant_state.blocksize
    w = w.detach().reshape(-1, bs)
    return (dequantized_weight(q).reshape(-1, bs) - w).abs() / w.abs().amax(1, keepdim=True)


# NF4's largest gap is 1.0 - 0.7230: half of it, 0.139 of the block absmax, plus ~1% from the
# 8-bit double-quantized absmax. Guards against bitsandbytes' CPU kernel bug (Note: CPU block
# size), which gives ~1.0 at in_features 32 or 96 with blocks of 64.
NF4_BLOCK_ERROR = 0.16


@pytest.mark.parametrize("d_out,d_in", [(48, 64), (96, 32), (80, 96), (40, 576)])
def test_dequantized_weight_is_within_nf4_error(d_out, d_in):
    torch.manual_seed(0)
    lin = nn.Linear(d_in, d_out)
    q = nf4_linear(lin, torch.bfloat16)
    assert q.weight.quant_state.blocksize == (64 if d_in % 64 == 0 else 32)
    assert _block_errors(q, lin.weight).max() <= NF4_BLOCK_ERROR


def test_in_features_cpu_cannot_take_are_refused():
    with pytest.raises(lk.LorakitError, match="in_features=40"):
        nf4_linear(nn.Linear(40, 8), torch.bfloat16)


def _bf16_linear_bytes(model):
    return sum(
        m.in_features * m.out_features * 2
        for m in model.modules()
        if isinstance(m, nn.Linear) and m is not model.get_output_embeddings()
    )


@pytest.mark.parametrize("hidden,limit", [(32, 0.30), (64, 0.27)])
def test_nf4_linear_memory_is_a_quarter_of_bf16(hidden, limit):
    from transformers import AutoModelForCausalLM

    from tests.conftest import tiny_config

    cfg = tiny_config("llama")
    cfg.hidden_size, cfg.intermediate_size = hidden, 2 * hidden
    model = AutoModelForCausalLM.from_config(cfg)
    bf16 = _bf16_linear_bytes(model)
    lk.apply(model, method="lora", r=4, quantize="nf4")
    nf4 = linear_weight_bytes(model)
    # 4 bits + 8/64 (absmax codes) + 32/(64*256) per value: 0.258x asymptotically. On top: per
    # layer an fp32 offset and second-level absmax, one shared pair of code tables, and at
    # hidden 32 blocks of 32 (See Note: CPU block size in quant.py). Measured: 0.296, 0.267.
    assert nf4 <= limit * bf16, (nf4, bf16, nf4 / bf16)
    assert not is_quantized(model.lm_head) and model.lm_head.weight.dtype == torch.float32
    assert model.model.norm.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.float32


def test_gpt2_conv1d_is_quantized_transposed():
    model = tiny_model("gpt2")
    c_attn = model.transformer.h[0].attn.c_attn  # Conv1D, weight (d_in, d_out)
    q = nf4_linear(c_attn, torch.float32)
    assert (q.in_features, q.out_features) == (32, 96)
    assert _block_errors(q, c_attn.weight.T).max() <= NF4_BLOCK_ERROR
    x = torch.randn(2, 4, 32)
    with torch.no_grad():
        expected = x @ dequantized_weight(q).T + c_attn.bias
        assert (q(x) - expected).abs().max() <= 1e-6
    lk.apply(model, method="lora", r=4, quantize="nf4")
    ids = batch()
    assert model(input_ids=ids, labels=ids).loss.isfinite()


def test_merge_into_nf4_refuses():
    model = lk.apply(tiny_model("llama"), method="lora", r=4, quantize="nf4")
    with pytest.raises(lk.LorakitError, match="16-bit"):
        lk.merge(model)
    with pytest.raises(lk.LorakitError, match="16 bits"):
        lk.save_merged(model, "/nonexistent/never-written")


def test_errors_name_the_fix(monkeypatch):
    import sys

    from lorakit.quant import quantize_model

    class Int8Linear(nn.Linear):
        pass

    model = nn.Sequential(nn.Linear(64, 4), Int8Linear(4, 4))
    with pytest.raises(lk.LorakitError, match="Int8Linear"):
        quantize_model(model, lk.AdapterConfig(quantize="nf4"))
    assert type(model[0]) is nn.Linear  # checked first, nothing changed
    with pytest.raises(lk.LorakitError, match="no linear layer"):
        quantize_model(nn.Sequential(nn.ReLU()), lk.AdapterConfig(quantize="nf4"))
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    with pytest.raises(lk.LorakitError, match="pip install bitsandbytes"):
        quantize_model(tiny_model("llama"), lk.AdapterConfig(quantize="nf4"))


def _dequantized_base(qmodel):
    """The 16-bit (fp32) base whose weights are the NF4 model's dequantized weights."""
    base = tiny_model("llama")
    with torch.no_grad():
        for name, layer in lk.inject.adapter_layers(qmodel):
            base.get_submodule(name).weight.copy_(layer.base_weight_matrix())
    return base


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def test_qlora_trains_saves_and_loads_in_peft(tmp_path):
    from peft import PeftModel

    model = lk.apply(tiny_model("llama"), method="qlora")
    assert model.lorakit_state.config.quantize == "nf4" and model.lorakit_state.config.r == 64
    assert all(is_quantized(layer.base_layer) for _, layer in lk.inject.adapter_layers(model))
    params = list(lk.trainable_parameters(model).values())
    assert all(p.dtype == torch.float32 for p in params)
    opt = torch.optim.AdamW(params, lr=1e-2)
    ids = batch()
    model.train()
    losses = []
    for _ in range(6):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    model.eval()
    assert losses[-1] < losses[0] - 0.05, losses
    lk.save_adapter(model, tmp_path / "ad")
    ours_q = _logits(model, ids)

    # Loaded back by lorakit, the adapter re-quantizes the base the same way: same logits.
    again = lk.load_adapter(tiny_model("llama"), tmp_path / "ad")
    assert torch.equal(_logits(again, ids), ours_q)

    # Exact: lorakit and PEFT on the same 16-bit base (the dequantized NF4 weights).
    ours_16 = _logits(
        lk.load_adapter(_dequantized_base(model), tmp_path / "ad", quantize=None), ids
    )
    peft_16 = _logits(
        PeftModel.from_pretrained(_dequantized_base(model), tmp_path / "ad").eval(), ids
    )
    assert (ours_16 - peft_16).abs().max().item() <= 1e-5
    # Loose: the quantized forward computes its base matmuls in bf16.
    assert (ours_q - peft_16).abs().max().item() <= 5e-3
    # Onto the original (never quantized) base, PEFT sees the NF4 error of the base on top.
    peft_orig = _logits(PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "ad").eval(), ids)
    assert (ours_q - peft_orig).abs().max().item() <= 0.1


@pytest.mark.parametrize("method", ["dora", "lora-fa", "adalora", "lora-drop"])
def test_qlora_composes_with(method):
    model = lk.apply(tiny_model("llama"), method=method, r=4, alpha=8, quantize="nf4")
    assert all(is_quantized(layer.base_layer) for _, layer in lk.inject.adapter_layers(model))
    params = list(lk.trainable_parameters(model).values())
    opt = torch.optim.AdamW(params, lr=1e-2)
    ids = batch()
    model.train()
    before = [p.detach().clone() for p in params]
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    opt.step()
    assert loss.isfinite()
    assert any(not torch.equal(b, p) for b, p in zip(before, params))
    with pytest.raises(lk.LorakitError, match="16-bit"):
        lk.merge(model)
