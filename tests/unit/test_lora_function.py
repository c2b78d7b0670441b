"""The LoRA linear as one autograd node (lorakit/adapters/lora.py, See Note: the LoRA linear as
one autograd node): gradcheck against finite differences in float64, and bit-for-bit the
outputs and gradients of autograd through the plain ops in fp32 and bf16, for LoRA, LoRA-FA
(A frozen: x not saved) and DoRA; the plain ops wherever the Function would not be exact."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.adapters import dora, lora, lora_fa
from lorakit.adapters.lora import LoRALinear, LoRALinearFunction
from tests.conftest import batch, tiny_model


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 6, dtype=torch.float64, generator=g, requires_grad=True)
    w0 = torch.randn(5, 6, dtype=torch.float64, generator=g)  # frozen
    bias = torch.randn(5, dtype=torch.float64, generator=g, requires_grad=True)
    a = torch.randn(2, 6, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(5, 2, dtype=torch.float64, generator=g, requires_grad=True)

    def fn(x, bias, a, b):
        return LoRALinearFunction.apply(x, w0, bias, a, b, 0.7, torch.float64, None)

    assert torch.autograd.gradcheck(fn, (x, bias, a, b))
    assert torch.autograd.gradcheck(lambda x, b: fn(x, None, a.detach(), b), (x, b))


def _layer(cls, dtype, bias=True, **kw):
    torch.manual_seed(0)
    base = nn.Linear(24, 20, bias=bias).to(dtype).requires_grad_(False)
    layer = cls(base, 4, 8.0, **kw).train()
    nn.init.normal_(layer.lora_B, std=0.5)  # as if trained
    return layer


def _run(layer, x, g):
    x = x.detach().clone().requires_grad_()
    y = layer(x)
    (y.float() * g).sum().backward()
    grads = [p.grad for p in layer.adapter_parameters() if p.requires_grad]
    return y.grad_fn, [y.detach(), x.grad, *grads]


def _uses_function(node, depth: int = 6) -> bool:
    """Whether the autograd graph above ``node`` (a few nodes deep) holds the LoRA node."""
    if node is None or depth < 0:
        return False
    if type(node).__name__ == "LoRALinearFunctionBackward":
        return True
    return any(_uses_function(n, depth - 1) for n, _ in node.next_functions)


def _plain(monkeypatch):
    for module in (lora, lora_fa, dora):
        monkeypatch.setattr(module, "fused_linear_applies", lambda layer, x: False)


@pytest.mark.parametrize("fold", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "cls,kw,bias",
    [
        (LoRALinear, {}, True),
        (LoRALinear, {}, False),
        (lora_fa.LoRAFALinear, {}, True),
        (lora_fa.LoRAFALinear, {"projection": True}, True),
        (dora.DoRALinear, {}, False),
    ],
)
def test_equals_autograd_through_the_plain_ops(monkeypatch, dtype, cls, kw, bias, fold):
    """Output and every gradient (x, and the adapter's fp32 master weights) are the plain
    ops' bit for bit; 3-D input; in bf16 the layer dtype and no autocast. With A folded into
    the W0 GEMM (the default in fp32; bf16 is never folded), within one rounding of h (See
    Note: A folded into the frozen GEMM: a BLAS may sum r columns alone in another order)."""
    monkeypatch.setattr(LoRALinear, "fold_a", fold)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 24, generator=g).to(dtype)
    gy = torch.randn(3, 5, 20, generator=g)
    node, fused = _run(_layer(cls, dtype, bias, **kw), x, gy)
    assert _uses_function(node)  # DoRA: its magnitude scaling sits on top of the node
    _plain(monkeypatch)
    node, plain = _run(_layer(cls, dtype, bias, **kw), x, gy)
    assert not _uses_function(node)
    assert len(fused) == len(plain)
    for ours, theirs in zip(fused, plain):
        assert ours.dtype == theirs.dtype
        if cls is lora_fa.LoRAFALinear and dtype == torch.bfloat16:
            # LoRA-FA's plain branch adds s·h Bᵀ after rounding it to bf16; the Function adds
            # it inside LoRA's addmm (one rounding fewer)
            assert (ours.float() - theirs.float()).abs().max() <= 2e-2 * theirs.abs().max()
        elif fold:
            tol = 2e-2 if dtype == torch.bfloat16 else 1e-6
            assert (ours.float() - theirs.float()).abs().max() <= tol * theirs.abs().max()
        else:
            assert torch.equal(ours, theirs)


def test_dora_with_bias_is_the_plain_ops_within_rounding(monkeypatch):
    """DoRA with a bias: V x is computed without the bias instead of as (x W0ᵀ + b) - b, so
    equal up to that subtraction's rounding."""
    g = torch.Generator().manual_seed(1)
    x, gy = torch.randn(3, 5, 24, generator=g), torch.randn(3, 5, 20, generator=g)
    _, fused = _run(_layer(dora.DoRALinear, torch.float32), x, gy)
    _plain(monkeypatch)
    _, plain = _run(_layer(dora.DoRALinear, torch.float32), x, gy)
    for ours, theirs in zip(fused, plain):
        assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max()


def test_autocast_bf16_over_fp32_base(monkeypatch):
    """Under autocast the GEMMs run in bf16 as the plain ops' would; fp32 master gradients."""
    g = torch.Generator().manual_seed(1)
    x, gy = torch.randn(2, 7, 24, generator=g), torch.randn(2, 7, 20, generator=g)
    results = []
    for plain in (False, True):
        if plain:
            _plain(monkeypatch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            results.append(_run(_layer(LoRALinear, torch.float32), x, gy)[1])
    assert results[0][0].dtype == torch.bfloat16
    assert results[0][2].dtype == torch.float32  # A's gradient
    for ours, theirs in zip(*results):
        assert torch.equal(ours, theirs)


def test_not_used_where_it_would_not_be_the_layer():
    x = torch.randn(2, 3, 24)
    dropped = _layer(LoRALinear, torch.float32, dropout=0.1)
    assert not lora.fused_linear_applies(dropped, x)  # dropout: A sees the dropped x
    assert lora.fused_linear_applies(dropped.eval(), x)
    hooked = _layer(LoRALinear, torch.float32)
    hooked.base_layer.register_forward_hook(lambda m, i, o: o * 2)
    assert not lora.fused_linear_applies(hooked, x)  # the hook must run
    hooked = _layer(LoRALinear, torch.float32)
    hooked.base_layer.register_full_backward_hook(lambda m, gi, go: None)
    assert not lora.fused_linear_applies(hooked, x)  # a backward hook too
    replaced = _layer(LoRALinear, torch.float32)  # as accelerate's offload hooks do
    replaced.base_layer.forward = lambda t: nn.Linear.forward(replaced.base_layer, t)
    assert not lora.fused_linear_applies(replaced, x)
    trained = _layer(LoRALinear, torch.float32)
    trained.base_layer.weight.requires_grad_(True)
    assert not lora.fused_linear_applies(trained, x)  # no dW0 in the Function
    assert not lora.fused_linear_applies(_layer(LoRALinear, torch.float32), x.double())


def test_lora_fa_saves_no_more_than_lora_and_never_x():
    """A whole tiny model: LoRA-FA's saved bytes are below LoRA's, and no LoRA-FA layer saves
    its input (d_in per token) for backward."""
    from lorakit.training.memory import SavedBytes

    def saved(method):
        model = lk.apply(tiny_model("llama"), method=method, r=4, alpha=8).train()
        ids = batch(length=32)
        with SavedBytes(exclude=[*model.parameters(), *model.buffers()]) as sb:
            model(input_ids=ids, labels=ids).loss.backward()
        return sb.nbytes

    assert saved("lora-fa") < saved("lora")
    layer = _layer(lora_fa.LoRAFALinear, torch.float32)
    x = torch.randn(4, 32, 24, requires_grad=True)
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(
        lambda t: shapes.append(t.shape) or t, lambda t: t
    ):
        y = layer(x)
    assert type(y.grad_fn).__name__ == "LoRALinearFunctionBackward"
    assert all(s.numel() < x.numel() for s in shapes) and (128, 4) in shapes  # h only


def _folded(layer) -> bool:
    st = layer.__dict__.get("_fold")
    return st is not None and st[0].data_ptr() == layer.base_layer.weight.data_ptr()


def test_folded_buffer_follows_a_the_weight_and_unload():
    """The [W0; A] buffer (See Note: A folded into the frozen GEMM): built at the first
    training forward with W0 as its first rows (same Parameter object), A's rows refreshed
    after a fused AdamW step, rebuilt after the weight moved, not built in inference mode;
    the output may be modified in place; never for 16-bit GEMMs; unload gives W0 its own
    storage."""
    layer = _layer(LoRALinear, torch.float32)
    w = layer.base_layer.weight
    w0 = w.detach().clone()
    with torch.inference_mode():
        layer(torch.randn(2, 24))
    assert not _folded(layer)  # never an inference-mode buffer
    with torch.no_grad():
        layer(torch.randn(2, 24))
    assert not _folded(layer)  # evaluation keeps the separate GEMMs
    x = torch.randn(2, 3, 24)
    y = layer(x)
    assert _folded(layer) and layer.base_layer.weight is w and torch.equal(w, w0)
    buf = layer.__dict__["_fold"][0]
    assert torch.equal(buf[20:], layer.lora_A.detach())
    y.mul_(2).sum().backward()  # in place on the output: allowed (not a view)
    a_before = layer.lora_A.detach().clone()
    # the training loop's optimizer: fused AdamW updates A in place without bumping its
    # version counter, so the fold may not wait for one
    opt = torch.optim.AdamW(layer.adapter_parameters(), lr=0.1, fused=True)
    opt.step()
    assert not torch.equal(layer.lora_A.detach(), a_before)
    y2 = layer(x)
    assert torch.equal(buf[20:], layer.lora_A.detach())  # refreshed from the stepped A
    ref = (
        x @ w0.T
        + layer.base_layer.bias
        + layer.scaling * (x @ layer.lora_A.detach().T) @ layer.lora_B.detach().T
    )
    assert torch.allclose(y2, ref, atol=1e-5)
    import copy

    twin = copy.deepcopy(layer)  # no stale buffer (a weight-sized copy) in the copy
    assert twin.__dict__.get("_fold") is None and torch.equal(twin.base_layer.weight, w0)
    assert twin.base_layer.weight.untyped_storage().nbytes() == w0.numel() * 4
    layer.base_layer.double().float()  # a new storage for W0: the fold is rebuilt
    assert not _folded(layer)
    assert torch.allclose(layer(x), ref, atol=1e-5) and _folded(layer)
    layer.base_layer.bfloat16()  # 16-bit GEMMs are never folded (See Note)
    layer(x.bfloat16()).float().sum().backward()
    assert "_fold" not in layer.__dict__  # nor the old fp32 buffer kept alive
    layer.base_layer.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # nor an fp32 base under bf16 autocast
        layer(x).float().sum().backward()
    assert not _folded(layer)
    layer(x)
    assert _folded(layer)  # fp32 again: folded again
    model = lk.apply(tiny_model("llama"), method="lora", r=4, alpha=8).train()
    ids = batch(length=8)
    model(input_ids=ids, labels=ids).loss.backward()
    from lorakit.adapters.base import adapter_layers

    folded = [m for _, m in adapter_layers(model) if _folded(m)]
    assert folded
    weights = [m.base_layer.weight for m in folded]
    plain = lk.unload(model, merge_adapters=False)
    for p in weights:  # own storage again, exactly as large as the weight
        assert p.untyped_storage().nbytes() == p.numel() * p.element_size()
    assert plain is model


def test_fold_keeps_tied_weights_tied():
    """Folding replaces the base Parameter's storage, not the Parameter: a tied pair stays
    one Parameter, and the other module reads the same values."""
    base = nn.Linear(24, 20, bias=False).requires_grad_(False)
    emb = nn.Embedding(20, 24)
    emb.weight = base.weight
    layer = LoRALinear(base, 4, 8.0).train()
    layer(torch.randn(3, 24))
    assert _folded(layer) and emb.weight is base.weight
    assert emb.weight.data_ptr() == layer.__dict__["_fold"][0].data_ptr()


def test_sharding_turns_the_fold_off(tmp_path):
    """FSDP2 manages the unsharded weight's storage itself: shard_model takes W0 out of a fold
    made before and keeps it out (one gloo process)."""
    import torch.distributed as dist

    from lorakit.adapters.base import adapter_layers
    from lorakit.training.distributed import Strategy, shard_model

    model = lk.apply(tiny_model("llama"), method="lora", r=4, alpha=8).train()
    ids = batch(length=8)
    model(input_ids=ids, labels=ids).loss.backward()
    assert any(_folded(m) for _, m in adapter_layers(model))
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        shard_model(model, Strategy("fsdp", 1, sharded_loading=False), torch.device("cpu"))
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids).loss.backward()
        layers = [m for _, m in adapter_layers(model)]
        assert layers and all(not m.fold_a and "_fold" not in m.__dict__ for m in layers)
    finally:
        dist.destroy_process_group()
