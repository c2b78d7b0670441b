"""S2-Attn (docs/methods/longlora.md): per-position dependencies are exactly the spec's groups
and shifted segments (no wraparound leak), eval mode is the model's full attention, RoPE
interpolation, and the group ratio belongs to each model (not to the process).

Tolerances: fp32; S2-Attn against the explicit-mask reference 1e-5; eval mode against plain
attention: bit-identical; perturbation checks: exactly unchanged (== 0) where no dependency."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.attention.s2 import (
    RATIO_ATTR,
    disable_s2_attention,
    make_attention_function,
    padded_length,
    s2_attention,
)
from lorakit.errors import LorakitError
from tests.conftest import batch, tiny_model

TOL = 1e-5


def allowed(h: int, n: int, g: int) -> torch.Tensor:
    """(heads, n, n) boolean: query i may see key j. Written from the spec, independently of
    the implementation: causal, and same group (first h//2 heads) or same shifted segment
    [0,G/2), [G/2,3G/2), ..., [N-G/2,N) (other heads); no wraparound."""
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    same_group = (i // g) == (j // g)
    same_shifted = ((i + g // 2) // g) == ((j + g // 2) // g)
    per_head = [same_group if head < h // 2 else same_shifted for head in range(h)]
    return torch.stack(per_head) & (j <= i)


def reference(q, k, v, g, key_valid=None):
    """Explicit boolean mask per head + softmax. q (b,h,n,d), k/v (b,kvh,n,d) -> (b,n,h,d)."""
    b, h, n, d = q.shape
    rep = h // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    mask = allowed(h, n, g)[None].expand(b, -1, -1, -1)
    if key_valid is not None:
        mask = mask & key_valid[:, None, None, :]
    scores = (q @ k.transpose(-1, -2)) / d**0.5
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1).nan_to_num(0.0) @ v).transpose(1, 2)


def qkv(b, h, kvh, n, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, h, n, d, generator=g),
        torch.randn(b, kvh, n, d, generator=g),
        torch.randn(b, kvh, n, d, generator=g),
    )


# heads / kv heads: MHA, GQA with an even split, SmolLM2's 9/3 (the split falls inside a kv
# group), and a single head (nothing shifted).
HEADS = [(4, 4), (4, 2), (9, 3), (1, 1)]


@pytest.mark.parametrize("h,kvh", HEADS)
@pytest.mark.parametrize("n,g", [(16, 4), (32, 8), (24, 24), (8, 2)])
def test_equals_explicit_mask_reference(h, kvh, n, g):
    q, k, v = qkv(2, h, kvh, n)
    ours = s2_attention(q, k, v, g)
    assert ours.shape == (2, n, h, 8)
    assert (ours - reference(q, k, v, g)).abs().max().item() <= TOL


@pytest.mark.parametrize("h,kvh", [(4, 2), (9, 3)])
def test_gradient_dependencies_are_the_spec_pattern(h, kvh):
    """d out[i, head] / d (k_j, v_j, q_j) is non-zero exactly where the spec allows."""
    n, g = 16, 4
    q, k, v = (t.requires_grad_(True) for t in qkv(1, h, kvh, n))
    out = s2_attention(q, k, v, g)
    expect = allowed(h, n, g)
    rep = h // kvh
    for head in range(h):
        for i in range(n):
            gq, gk, gv = torch.autograd.grad(out[0, i, head].sum(), (q, k, v), retain_graph=True)
            seen = (gk[0, head // rep].abs().sum(-1) + gv[0, head // rep].abs().sum(-1)) > 0
            assert torch.equal(seen, expect[head, i]), (head, i)
            # a query influences only its own output (a lone key makes even that gradient 0)
            touched = gq[0].abs().sum(-1) > 0
            touched[head, i] = False
            assert not touched.any(), (head, i)


def _layer0_attention(model, ids, attention_mask=None):
    """Per-head attention outputs of layer 0 (the input of o_proj): (b, n, heads, d)."""
    got = {}
    attn = model.model.layers[0].self_attn
    hook = attn.o_proj.register_forward_hook(lambda m, a, o: got.__setitem__("x", a[0]))
    try:
        model(input_ids=ids, attention_mask=attention_mask)
    finally:
        hook.remove()
    return got["x"].reshape(*ids.shape, model.config.num_attention_heads, -1)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_model_perturbation_dependencies_and_no_leak(arch):
    """In a real model in training mode: changing token t changes layer 0's head outputs at
    exactly the positions the spec lets see t, and changes no earlier logit anywhere."""
    model = lk.apply(tiny_model(arch), method="longlora").train()
    n, g = 32, 8
    ids = batch(n=1, length=n)
    expect = allowed(model.config.num_attention_heads, n, g)
    with torch.no_grad():
        base_attn = _layer0_attention(model, ids)
        base_logits = model(input_ids=ids).logits
        for t in range(n):
            pert = ids.clone()
            pert[0, t] = (pert[0, t] + 1) % model.config.vocab_size
            changed = (_layer0_attention(model, pert) - base_attn)[0].abs().amax(-1) > 0
            assert torch.equal(changed.T, expect[:, :, t]), t
            logits = model(input_ids=pert).logits
            assert torch.equal(logits[0, :t], base_logits[0, :t]), f"leak from token {t}"


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_eval_mode_is_plain_full_attention(arch, impl):
    plain = tiny_model(arch)
    plain.set_attn_implementation(impl)
    model = lk.apply(copy.deepcopy(plain), method="longlora")
    assert model.config._attn_implementation == f"lorakit_s2_{impl}"
    ids = batch(length=40)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding
    with torch.no_grad():
        for kw in ({}, {"attention_mask": mask}):
            assert torch.equal(model(input_ids=ids, **kw).logits, plain(input_ids=ids, **kw).logits)
        model.train()
        assert not torch.allclose(model(input_ids=ids).logits, plain(input_ids=ids).logits)
        model.eval()
        out = model.generate(ids[:1], max_new_tokens=4, do_sample=False)
        assert torch.equal(out, plain.generate(ids[:1], max_new_tokens=4, do_sample=False))


class _Attn(nn.Module):
    def __init__(self, n_rep):
        super().__init__()
        self.num_key_value_groups, self.is_causal = n_rep, True


@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_padding_masks_and_uneven_lengths_via_interface(mask_kind):
    """The registered function with transformers' 4-D masks (sdpa: bool, eager: additive) and
    a length (37) that is padded internally to 40 (G = 10)."""
    n, h, kvh = 37, 4, 2
    q, k, v = qkv(2, h, kvh, n)
    key_valid = torch.ones(2, n, dtype=torch.bool)
    key_valid[1, 30:] = False  # right padding
    key_valid[0, :3] = False  # left padding
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    mask = causal[None, None] & key_valid[:, None, None, :]
    if mask_kind == "float":
        mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    fn = make_attention_function("sdpa", 0.25)
    out, _ = fn(_Attn(2).train(), q, k, v, mask, scaling=8**-0.5)
    n_pad = padded_length(n, 0.25)
    assert n_pad == 40
    pad = torch.zeros(2, h, n_pad - n, 8)
    ref = reference(
        torch.cat([q, pad], 2),
        torch.cat([k, pad[:, :kvh]], 2),
        torch.cat([v, pad[:, :kvh]], 2),
        n_pad // 4,
        torch.cat([key_valid, torch.zeros(2, n_pad - n, dtype=torch.bool)], 1),
    )[:, :n]
    assert torch.isfinite(out).all()
    real = key_valid[:, :, None, None].expand_as(out)  # padded query rows are don't-care
    assert (out - ref)[real].abs().max().item() <= TOL
    # no mask, uneven length: the same grouping
    out, _ = fn(_Attn(2).train(), q, k, v, None, scaling=8**-0.5)
    ref = reference(
        torch.cat([q, pad], 2),
        torch.cat([k, pad[:, :kvh]], 2),
        torch.cat([v, pad[:, :kvh]], 2),
        n_pad // 4,
    )[:, :n]
    assert (out - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_training_with_padding_in_a_model(arch, impl):
    """Right padding: real positions equal the unpadded sequence (whatever the pad ids);
    left padding: the pad ids change nothing and nothing is NaN, also in the gradients."""
    plain = tiny_model(arch)
    plain.set_attn_implementation(impl)
    model = lk.apply(plain, method="longlora").train()
    ids = batch(n=2, length=32)
    mask = torch.ones_like(ids)
    mask[1, 24:] = 0
    with torch.no_grad():
        padded = model(input_ids=ids, attention_mask=mask).logits
        other = ids.clone()
        other[1, 24:] = 7
        assert (padded[1, :24] - model(input_ids=other).logits[1, :24]).abs().max() <= TOL
    left = torch.ones_like(ids)
    left[1, :10] = 0
    out = model(input_ids=ids, attention_mask=left, labels=ids.masked_fill(left == 0, -100))
    out.loss.backward()
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in lk.trainable_parameters(model).values())
    with torch.no_grad():
        other = ids.clone()
        other[1, :10] = 5
        again = model(input_ids=other, attention_mask=left).logits
        assert (again[1, 10:] - out.logits[1, 10:]).abs().max() <= TOL


def test_gradient_checkpointing_gives_the_same_gradients():
    ids = batch(n=2, length=32)
    grads = []
    for ckpt in (False, True):
        model = lk.apply(tiny_model("llama"), method="longlora").train()
        if ckpt:
            model.gradient_checkpointing_enable()
        model(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in lk.trainable_parameters(model).items()})
    assert grads[0].keys() == grads[1].keys()
    assert max((grads[0][n] - grads[1][n]).abs().max().item() for n in grads[0]) <= 1e-6


def test_bad_configurations_fail_with_one_sentence():
    with pytest.raises(LorakitError, match="s2_group_ratio"):
        lk.apply(tiny_model("llama"), method="longlora", s2_group_ratio=0.3)
    net = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(LorakitError, match="AttentionInterface"):
        lk.apply(net, method="lora", target_modules=["0"], s2_attn=True)
    with pytest.raises(LorakitError, match="even group size"):
        s2_attention(*qkv(1, 2, 2, 12), group_size=5)


def test_rope_position_interpolation():
    """context_length 1000 on a 256-position model: factor ceil(1000/256) = 4; position 4p
    now gets the rotation position p had; max_position_embeddings becomes 1024."""
    base = tiny_model("llama")
    model = lk.apply(copy.deepcopy(base), method="longlora", context_length=1000)
    assert model.config.rope_parameters["rope_type"] == "linear"
    assert model.config.rope_parameters["factor"] == 4.0
    assert model.config.max_position_embeddings == 1024
    x = torch.zeros(1, 1, 8)
    pos = torch.arange(0, 256)[None]
    cos, sin = model.model.rotary_emb(x, pos * 4)
    cos0, sin0 = base.model.rotary_emb(x, pos)
    assert (cos - cos0).abs().max() <= 1e-5 and (sin - sin0).abs().max() <= 1e-5
    # a window already long enough is left alone
    same = lk.apply(tiny_model("llama"), method="longlora", context_length=256)
    assert same.config.rope_parameters["rope_type"] == "default"
    with torch.no_grad():
        ids = batch()
        assert torch.equal(same(input_ids=ids).logits, base(input_ids=ids).logits)


def test_two_models_with_different_ratios_in_one_process():
    """The group ratio belongs to the model: setting up a second model with another ratio
    leaves the first one's training logits as they were (the registered attention function
    is shared by name across the process)."""
    ids = batch(n=2, length=32)

    def s2_model(ratio):
        model = lk.apply(
            tiny_model("llama"), method="lora", r=4, s2_attn=True, s2_group_ratio=ratio
        )
        return model.train()

    def logits(model):
        with torch.no_grad():
            return model(input_ids=ids).logits

    quarter_alone = logits(s2_model(0.25))
    half_alone = logits(s2_model(0.5))
    assert (quarter_alone - half_alone).abs().max() > 1e-4  # the ratios do differ
    quarter, half = s2_model(0.25), s2_model(0.5)  # both set up, the latest with 0.5
    assert (logits(quarter) - quarter_alone).abs().max().item() <= 1e-6
    assert (logits(half) - half_alone).abs().max().item() <= 1e-6
    # the ratio lives on the model's modules and leaves with S2-Attn (export stays clean)
    assert getattr(quarter.model.layers[0].self_attn, RATIO_ATTR) == 0.25
    disable_s2_attention(quarter)
    assert not any(hasattr(m, RATIO_ATTR) for m in quarter.modules())
    assert "lorakit" not in quarter.config.to_json_string()


# ---- what backward keeps (docs/methods/longlora.md; See Note: S2-Attn's backward keeps what
# full attention's keeps, in lorakit/attention/s2.py) --------------------------------------------


@pytest.mark.parametrize("h,kvh", [(4, 2), (9, 3)])
def test_value_head_size_may_differ_from_query_key(h, kvh):
    """Models whose value heads are another size than q/k's (DeepSeek's MLA: 192 vs 128):
    the output takes v's head size; the Function's gradients equal autograd's."""
    from lorakit.attention import s2

    g = torch.Generator().manual_seed(5)
    q, k = torch.randn(2, h, 16, 8, generator=g), torch.randn(2, kvh, 16, 8, generator=g)
    v = torch.randn(2, kvh, 16, 6, generator=g)
    ours = s2_attention(q, k, v, 4)
    assert ours.shape == (2, 16, h, 6)
    assert (ours - reference(q, k, v, 4)).abs().max().item() <= TOL
    grads = []
    for fn in (s2._s2, s2.s2_autograd):
        ins = [t.clone().requires_grad_() for t in (q, k, v)]
        fn(*ins, 4, 16, None, 8**-0.5).square().sum().backward()
        grads.append([t.grad for t in ins])
    for ours, plain in zip(*grads):
        assert torch.allclose(ours, plain, atol=1e-6)


def _s2_inputs(b, h, kvh, n, d=8, dtype=torch.float32):
    """q/k/v in the layout transformers passes: (b, heads, n, d) views of (b, n, heads, d)."""
    g = torch.Generator().manual_seed(3)
    return [torch.randn(b, n, x, d, generator=g).to(dtype).requires_grad_() for x in (h, kvh, kvh)]


@pytest.mark.parametrize("flash", [True, False], ids=["cpu-flash", "re-run"])
@pytest.mark.parametrize(
    "h,kvh,n,mask_kind,dtype",
    [
        (9, 3, 37, None, torch.float32),
        (9, 3, 40, "bool", torch.float32),
        (4, 2, 32, None, torch.bfloat16),
        (4, 2, 37, "float", torch.float32),
        (1, 1, 16, None, torch.float32),
    ],
)
def test_function_equals_autograd_through_the_calls(
    monkeypatch, flash, h, kvh, n, mask_kind, dtype
):
    """S2Function (saving q, k, v, the output and the log-sum-exp) gives bit for bit the output
    and the gradients of plain autograd through the same SDPA calls; also where a call is
    re-run in backward instead (no CPU flash kernel)."""
    from lorakit.attention import s2

    if not flash:
        monkeypatch.setattr(s2, "_cpu_flash", lambda call, scaling: False)
    n_pad = padded_length(n, 0.25)
    mask = None
    if mask_kind:
        valid = torch.ones(2, n, dtype=torch.bool)
        valid[1, :3] = False  # left padding
        mask = torch.ones(n, n, dtype=torch.bool).tril()[None, None] & valid[:, None, None, :]
        if mask_kind == "float":
            mask = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)
    results = []
    for fn in (s2._s2, s2.s2_autograd):
        ins = _s2_inputs(2, h, kvh, n, dtype=dtype)
        out = fn(*(t.transpose(1, 2) for t in ins), n_pad // 4, n_pad, mask, 8**-0.5)
        weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).to(dtype)
        (out * weight).sum().backward()
        results.append([out.detach()] + [t.grad for t in ins])
    for ours, plain in zip(*results):
        assert torch.equal(ours, plain)


@pytest.mark.parametrize("flash", [True, False], ids=["cpu-flash", "re-run"])
def test_mixed_dtypes_under_autocast_train(monkeypatch, flash):
    """Under bf16 autocast with fp32 q/k and a bf16 v (trainable fp32 embeddings: RoPE at fp32
    positions), S2-Attn runs in autocast's dtype as full attention's SDPA would, backward
    included (which re-runs SDPA calls outside autocast): the gradients reach the inputs in
    their own dtypes and equal plain autograd's through the same calls."""
    from lorakit.attention import s2

    if not flash:
        monkeypatch.setattr(s2, "_cpu_flash", lambda call, scaling: False)
    results = []
    for fn in (s2._s2, s2.s2_autograd):
        q, k, v = _s2_inputs(2, 4, 2, 32)
        v = v.detach().bfloat16().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), 8, 32, None, 8**-0.5)
        assert out.dtype == torch.bfloat16
        out.float().square().sum().backward()
        assert (q.grad.dtype, k.grad.dtype, v.grad.dtype) == (torch.float32,) * 2 + (
            torch.bfloat16,
        )
        results.append([out.detach(), q.grad, k.grad, v.grad])
    for ours, plain in zip(*results):
        assert torch.equal(ours, plain)


def test_longlora_trains_under_bf16_autocast():
    """The training loop's bf16 setting (frozen weights cast to bf16, fp32 trainable embeddings
    and norms, bf16 autocast): LongLoRA's S2-Attn step runs and its gradients are finite (the
    fp32 embeddings make q/k fp32 after RoPE while v is bf16)."""
    from lorakit.training.loop import cast_frozen

    model = lk.apply(tiny_model("llama"), method="longlora").train()
    cast_frozen(model, torch.bfloat16)
    ids = batch(n=2, length=32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = [p.grad for p in lk.trainable_parameters(model).values()]
    assert torch.isfinite(loss) and grads and all(torch.isfinite(g).all() for g in grads)


def _saved_mib(model, ids, attention_mask=None) -> float:
    from lorakit.training.memory import SavedBytes

    with SavedBytes(exclude=[*model.parameters(), *model.buffers()]) as saved:
        model(input_ids=ids, attention_mask=attention_mask, labels=ids).loss.backward()
    return saved.mib


def test_backward_keeps_no_more_than_full_attention():
    """A whole tiny Llama (9 heads over 3 kv heads: the head split falls inside a kv group) at
    2048 tokens, saved-for-backward bytes counted per storage: S2-Attn's are not above full
    attention's, without and with a padding mask (before S2Function: 3.1 MiB more per layer)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    def model(s2_attn):
        torch.manual_seed(0)
        cfg = LlamaConfig(
            vocab_size=96,
            hidden_size=144,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=9,
            num_key_value_heads=3,
            max_position_embeddings=2048,
        )
        cfg._attn_implementation = "sdpa"
        return lk.apply(
            AutoModelForCausalLM.from_config(cfg), method="lora", r=4, s2_attn=s2_attn
        ).train()

    ids = batch(n=1, length=2048)
    left = torch.ones_like(ids)
    left[0, :5] = 0
    for mask in (None, left):
        full, s2 = (_saved_mib(model(s2_attn), ids, mask) for s2_attn in (False, True))
        assert s2 <= full, (mask is not None, s2, full)
