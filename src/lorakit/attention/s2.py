"""LongLoRA's shifted sparse attention (S2-Attn) and RoPE position interpolation.

Chen et al. 2023, "LongLoRA: Efficient Fine-tuning of Long-Context Large Language Models"
(arXiv:2309.12307; dvlab-research/LongLoRA); docs/methods/longlora.md.

S2-Attn, applied after RoPE to a causal self-attention over N tokens with group size
G = N × ratio (N % G == 0, G even):

- heads ``[0, H//2)`` attend causally within the groups ``[0,G), [G,2G), ...``;
- heads ``[H//2, H)`` attend causally within the shifted segments
  ``[0,G/2), [G/2,3G/2), ..., [N-G/2,N)``.

Note: No wraparound. The reference's ``roll``-based version lets the last half-group of the
shifted heads see the first half-group (a leak the authors acknowledge), and LLaMA-Factory's
``shift_attn`` puts half of the shifted heads' outputs back at the wrong place. Here the shifted
heads are computed by slicing G/2 tokens off both ends: the middle is ``N/G - 1`` whole groups
and the two ends are two half-groups, so no position ever sees a later or a foreign token.

lorakit does not patch model code: :func:`configure_long_context` registers S2-Attn in
transformers' ``AttentionInterface`` (with the attention-mask builder of the implementation the
model had) and selects it with ``model.set_attn_implementation``. The function computes S2-Attn
only while the attention module is in training mode; in eval mode it calls the model's own
attention ("sdpa" or "eager"), so inference is full attention, bit for bit. The registered
function is shared by the whole process; the group ratio is not part of it but of the model
(an attribute of its modules, see Note: the ratio belongs to the model), so models set up with
different ratios train side by side.

Note: Lengths. A length that is not a multiple of ``2/ratio`` (8 for the default 1/4) is padded
at the end to the next multiple before grouping, and the padded positions are dropped from the
output. This is exact: attention is causal, so no real position can see a padded one.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from torch.nn.attention import SDPBackend
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface, PreTrainedModel

from ..errors import LorakitError
from ..module_tree import set_submodule

PREFIX = "lorakit_s2_"
SUPPORTED = ("sdpa", "eager")  # the implementations S2-Attn can stand in for


# ---- the attention pattern ------------------------------------------------------------------


def groups_per_sequence(ratio: float) -> int:
    """k = 1 / ratio, which must be a whole number (groups of G = N / k tokens)."""
    k = round(1.0 / ratio)
    if k < 1 or abs(k * ratio - 1.0) > 1e-6:
        raise LorakitError(
            f"adapter.s2_group_ratio must be 1/k for a whole number k (e.g. 0.25), not {ratio}"
        )
    return k


def padded_length(n: int, ratio: float) -> int:
    """The length S2-Attn groups: ``n`` rounded up so that G = length × ratio is even and
    divides it (a multiple of 2k)."""
    step = 2 * groups_per_sequence(ratio)
    return -(-n // step) * step


def _split_kv(t: torch.Tensor, hs: int, h: int, gqa_ok: bool):
    """Key or value for query heads [0, hs) and [hs, h), and whether SDPA should expand them
    (grouped-query attention: query head i reads kv head i // n_rep). Returns (a, b, gqa)."""
    n_rep = h // t.shape[1]
    if n_rep > 1 and not (gqa_ok and hs % n_rep == 0):
        # the split falls inside a kv group (9 heads / 3 kv heads), or a mask is given:
        # expand to one kv head per query head, as transformers' repeat_kv does
        b, kvh, n, d = t.shape
        t = t[:, :, None].expand(b, kvh, n_rep, n, d).reshape(b, h, n, d)
        n_rep = 1
    a, b_ = t.split([hs // n_rep, (h - hs) // n_rep], dim=1)
    return a, b_, n_rep > 1


def _to_groups(x: torch.Tensor, g: int) -> torch.Tensor:
    """(b, h, L, d) -> (L/g · b, h, g, d). A view (no copy) for the (b, L, h, d)-contiguous
    tensors transformers passes (q/k/v are transposed from (b, L, h, d))."""
    b, h, length, d = x.shape
    return x.transpose(1, 2).reshape(b * (length // g), g, h, d).transpose(1, 2)


def _from_groups(x: torch.Tensor, b: int) -> torch.Tensor:
    """(L/g · b, h, g, d) -> (b, L, h, d), the layout attention functions return."""
    _, h, g, d = x.shape
    return x.transpose(1, 2).reshape(b, -1, h, d)


def _blocks(mask: torch.Tensor, g: int) -> torch.Tensor:
    """The diagonal (g, g) blocks of a (b, h, L, L) mask as (L/g · b, h, g, g), the batch
    order of :func:`_to_groups`. By a diagonal of the (b, h, L/g, g, L/g, g) view, not a
    loop over the groups: a loop over symbolic sizes is unrolled for one length only (See
    Note: symbolic spans)."""
    b, h, length, _ = mask.shape
    m = length // g
    blocks = mask.reshape(b, h, m, g, m, g).diagonal(dim1=2, dim2=4)  # (b, h, g, g, L/g)
    return blocks.permute(0, 4, 1, 2, 3).reshape(-1, h, g, g)


class _Region(NamedTuple):
    """What one SDPA call of S2-Attn covers: the query heads ``heads`` (``part`` 0: the
    unshifted ones, 1: the shifted ones) over the token ranges ``spans``, side by side in
    the batch (the shifted heads' two end half-groups share one call), in causal blocks of
    ``g`` tokens."""

    part: int
    heads: slice
    spans: tuple[tuple[int, int], ...]
    g: int


class _Call(NamedTuple):
    """One SDPA call: grouped (B', h', g, d) query, key and value, the block mask (None:
    causal) and whether the kernel reads fewer kv heads than query heads."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor | None
    gqa: bool


def _regions(h: int, n: int, g: int) -> list[_Region]:
    """The S2 pattern as SDPA calls: heads [0, h//2) in groups [0,G), [G,2G), ...; heads
    [h//2, h) as the end half-groups [0,G/2) and [N-G/2,N) in one call and the whole groups
    over [G/2, N-G/2) in another."""
    hs, half = h // 2, g // 2
    out = [_Region(0, slice(0, hs), ((0, n),), g)] if hs else []
    out.append(_Region(1, slice(hs, h), ((0, half), (n - half, n)), half))
    if n > g:
        out.append(_Region(1, slice(hs, h), ((half, n - half),), g))
    return out


def _take(x, region: _Region) -> torch.Tensor:
    """The grouped (B', h', g, d) tensor of ``region`` from (b, h', N, d) ``x``, or from the
    list of its token ranges' pieces that :func:`_token_pieces` makes."""
    parts = [
        _to_groups(
            next(p for sp, p in x if sp == (s, e)) if isinstance(x, list) else x[:, :, s:e],
            region.g,
        )
        for s, e in region.spans
    ]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _token_pieces(x: torch.Tensor, regions: list[_Region]) -> list:
    """[((start, end), x[:, :, start:end]), ...] for every span of ``regions``, which
    partition the tokens, by one split (See Note: split, not slicing).

    Note: symbolic spans. In a compiled layer (``train.compile``, ``dynamic=True``) the span
    bounds are symbolic sizes. Dynamo cannot sort them (``sorted`` was a graph break in every
    S2 call), and as dict keys they are hashed, which specializes them (a recompile for every
    padded length). So the spans are put in token order by chaining each to the one starting
    where it ends, and the pieces are found again by comparing spans (:func:`_take`): dynamo
    traces such comparisons as guards that hold for every length."""
    spans = [sp for r in regions for sp in r.spans]
    order = [next(sp for sp in spans if sp[0] == 0)]
    while len(order) < len(spans):
        order.append(next(sp for sp in spans if sp[0] == order[-1][1]))
    pieces = x.split([e - s for s, e in order], dim=2)
    return list(zip(order, pieces))


def _put(out: torch.Tensor, region: _Region, y: torch.Tensor) -> None:
    """Write a call's grouped output ``y`` into its place in ``out`` (b, N, h, d)."""
    b = out.shape[0]
    y = _from_groups(y, b * len(region.spans))
    for j, (s, e) in enumerate(region.spans):
        out[:, s:e, region.heads] = y[j * b : (j + 1) * b]


def _block_mask(mask: torch.Tensor, region: _Region) -> torch.Tensor:
    """``region``'s (B', h|1, g, g) blocks of a (b, h|1, N, N) mask."""
    parts = [_blocks(mask[..., s:e, s:e], region.g) for s, e in region.spans]
    m = parts[0] if len(parts) == 1 else torch.cat(parts)
    if m.dtype == torch.bool:
        # A row that may see nothing (a padded query) gets its own key: softmax over an
        # empty row is NaN, which would reach the loss through later layers' values.
        empty = ~m.any(dim=-1, keepdim=True)
        m = m | (empty & torch.eye(region.g, dtype=torch.bool, device=m.device))
    return m


def _calls(q, k, v, mask, g: int, n_pad: int) -> list[tuple[_Region, _Call]]:
    """Every SDPA call of S2-Attn on (b, h, n, d) q and (b, kvh, n, d) k/v, padded to
    ``n_pad`` tokens: views of them where the layout allows (all of the unshifted heads')."""
    mask = _pad_mask(mask, n_pad)
    q, k, v = (_pad_to(t, n_pad, 2) for t in (q, k, v))
    b, h = q.shape[:2]
    hs = h // 2
    regions = _regions(h, n_pad, g)
    # Note: split, not slicing: one autograd node whose backward is a cat, where each slice
    # would allocate and add a full-size zero gradient.
    *ks, gqa = _split_kv(k, hs, h, mask is None)
    *vs, _ = _split_kv(v, hs, h, mask is None)
    qs = q.split([hs, h - hs], dim=1)
    qkv = [
        [_token_pieces(x[part], [r for r in regions if r.part == part]) for x in (qs, ks, vs)]
        if hs or part
        else None
        for part in (0, 1)
    ]
    full = None if mask is None else mask.expand(b, -1, -1, -1)
    return [
        (
            r,
            _Call(
                *(_take(x, r) for x in qkv[r.part]),
                None if full is None else _block_mask(full, r),
                gqa,
            ),
        )
        for r in regions
    ]


def _sdpa(c: _Call, scaling, dropout: float) -> torch.Tensor:
    return F.scaled_dot_product_attention(
        c.q,
        c.k,
        c.v,
        attn_mask=c.mask,
        dropout_p=dropout,
        is_causal=c.mask is None,
        scale=scaling,
        enable_gqa=c.gqa,
    )


# Note: S2-Attn's backward keeps what full attention's keeps
# Autograd through the calls above would keep every SDPA call's own inputs: copies of the
# shifted heads' half-groups, of k/v expanded where the head split falls inside a kv group,
# of everything padded (3.4x full attention's bytes at 2k tokens on SmolLM2's shapes).
# :class:`S2Function` keeps q, k, v as they came in (what full attention keeps too), the
# output and each call's log-sum-exp (b·h·N floats in all, as full attention); its backward
# rebuilds the calls' inputs (reshapes and a few copies, freed again at once) and runs the
# kernel's own backward on them, so forward and gradients are the same numbers as autograd
# through the calls would give. Where SDPA would not pick PyTorch's CPU flash kernel (whose
# forward returns the log-sum-exp) a call keeps nothing and backward re-runs its forward.
# Padded query rows (at the end, see Note: Lengths) get a zero gradient, so their outputs
# are not kept: the kernel's backward reads an output row only times that row's gradient.
# Only their log-sum-exp is (4 bytes per head and padded row, fewer than 2/ratio rows).

_FLASH = int(SDPBackend.FLASH_ATTENTION)


def _cpu_flash(c: _Call, scaling) -> bool:
    """Whether SDPA would run this call with PyTorch's CPU flash kernel."""
    return (
        c.q.device.type == "cpu"
        and torch._fused_sdp_choice(
            c.q, c.k, c.v, c.mask, 0.0, c.mask is None, scale=scaling, enable_gqa=c.gqa
        )
        == _FLASH
    )


def _additive(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A boolean mask as SDPA hands it to its kernels: 0 where allowed, -inf elsewhere."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
        ~mask, float("-inf")
    )


class S2Function(torch.autograd.Function):
    """S2-Attn without dropout: (b, h, n, d) q, (b, kvh, n, d) k/v -> (b, n, h, d), saving
    only what full attention saves (See Note: S2-Attn's backward keeps what full attention's
    keeps)."""

    @staticmethod
    def forward(ctx, q, k, v, mask, g: int, n_pad: int, scaling):
        b, h, n, _ = q.shape
        out = q.new_empty(b, n_pad, h, v.shape[-1])  # v's head size (may differ from q/k's)
        lses = []
        for region, c in _calls(q, k, v, mask, g, n_pad):
            if _cpu_flash(c, scaling):
                y, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                    c.q,
                    c.k,
                    c.v,
                    0.0,
                    c.mask is None,
                    attn_mask=_additive(c.mask, q.dtype),
                    scale=scaling,
                )
            else:
                y, lse = _sdpa(c, scaling, 0.0), None
            _put(out, region, y)
            lses.append(lse)
        if n_pad != n:  # a storage of n tokens, as full attention's output
            out = out[:, :n].clone(memory_format=torch.contiguous_format)
        ctx.save_for_backward(q, k, v, mask, out, *lses)
        ctx.g, ctx.n_pad, ctx.scaling = g, n_pad, scaling
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        q, k, v, mask, out, *lses = ctx.saved_tensors
        n_pad, scaling = ctx.n_pad, ctx.scaling
        grad_out = _pad_to(grad_out, n_pad, 1).transpose(1, 2)  # (b, h, N, d)
        out = _pad_to(out, n_pad, 1).transpose(1, 2)
        with torch.enable_grad():
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]
            roots, grads = [], []
            for (region, c), lse in zip(_calls(*leaves, mask, ctx.g, n_pad), lses):
                dy = _take(grad_out[:, region.heads], region)
                if lse is None:  # re-run the forward, autograd does the rest
                    roots.append(_sdpa(c, scaling, 0.0))
                    grads.append(dy)
                    continue
                roots += [c.q, c.k, c.v]
                grads += torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
                    dy,
                    c.q.detach(),
                    c.k.detach(),
                    c.v.detach(),
                    _take(out[:, region.heads], region),
                    lse,
                    0.0,
                    c.mask is None,
                    attn_mask=_additive(c.mask, q.dtype),
                    scale=scaling,
                )
            dq, dk, dv = torch.autograd.grad(roots, leaves, grads, allow_unused=True)
        return dq, dk, dv, None, None, None, None


def _autocast_inputs(*ts: torch.Tensor) -> tuple:
    """q, k, v in the dtype autocast runs SDPA in, where it is on (autograd takes the
    gradients back to the inputs' dtypes); as they are elsewhere. Cast before S2-Attn rather
    than left to autocast: S2Function's backward re-runs SDPA calls where autocast is off, so
    mixed inputs (fp32 q/k after RoPE at fp32 positions, bf16 v: trainable fp32 embeddings
    under bf16 autocast, LongLoRA's setting) would not be cast for it, and the output is then
    autocast's dtype, as full attention's."""
    device = ts[0].device.type
    if not torch.is_autocast_enabled(device):
        return ts
    dt = torch.get_autocast_dtype(device)
    return tuple(t.to(dt) if t.is_floating_point() and t.dtype != torch.float64 else t for t in ts)


def _s2(
    query,
    key,
    value,
    group_size: int,
    n_pad: int,
    attention_mask=None,
    scaling=None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """S2-Attn of (b, h, n, d) inputs padded to ``n_pad`` tokens: (b, n, h, d)."""
    query, key, value = _autocast_inputs(query, key, value)
    # compiled (train.compile): the plain SDPA calls, which dynamo traces and inductor
    # fuses; the Function's raw kernel calls are for eager runs
    if dropout == 0.0 and not torch.compiler.is_compiling():
        return S2Function.apply(query, key, value, attention_mask, group_size, n_pad, scaling)
    return s2_autograd(query, key, value, group_size, n_pad, attention_mask, scaling, dropout)


def s2_autograd(
    query,
    key,
    value,
    group_size: int,
    n_pad: int,
    attention_mask=None,
    scaling=None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """:func:`_s2` by plain autograd through the SDPA calls, which keeps each call's inputs:
    the path of attention dropout and of compiled layers, and what :class:`S2Function` is
    tested against."""
    query, key, value = _autocast_inputs(query, key, value)
    b, h, n, _ = query.shape
    out = query.new_empty(b, n_pad, h, value.shape[-1])
    for region, c in _calls(query, key, value, attention_mask, group_size, n_pad):
        _put(out, region, _sdpa(c, scaling, dropout))
    return out[:, :n]


def s2_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    group_size: int,
    attention_mask: torch.Tensor | None = None,
    scaling: float | None = None,
    dropout: float = 0.0,
) -> torch.Tensor:
    """S2-Attn on (b, heads, N, d) query and (b, kv_heads, N, d) key/value, after RoPE.

    ``attention_mask``: None (causal) or a (b|1, 1, N, N) mask as transformers builds it,
    boolean (True = may attend) or additive float; it is intersected with the S2 pattern.
    Returns (b, N, heads, d). N % group_size == 0 and group_size even are required.
    """
    n, g = query.shape[2], group_size
    if g <= 0 or g % 2 or n % g:
        raise LorakitError(
            f"S2-Attn needs an even group size dividing the length; "
            f"got group size {g} for {n} tokens"
        )
    return _s2(query, key, value, g, n, attention_mask, scaling, dropout)


def _pad_to(x: torch.Tensor, n: int, dim: int, value=0.0) -> torch.Tensor:
    extra = n - x.shape[dim]
    if extra == 0:
        return x
    pad = [0, 0] * (x.dim() - 1 - dim % x.dim()) + [0, extra]
    return F.pad(x, pad, value=value)


def _pad_mask(mask: torch.Tensor | None, n: int) -> torch.Tensor | None:
    """A (b, 1, L, L) mask padded to (b, 1, n, n): padded positions see and are seen by
    nothing (the rows that see nothing get their own key in :func:`_block_mask`)."""
    if mask is None:
        return None
    fill = False if mask.dtype == torch.bool else torch.finfo(mask.dtype).min
    return _pad_to(_pad_to(mask, n, -1, fill), n, -2, fill)


# ---- transformers attention-interface function ------------------------------------------------


def _full_attention(module: nn.Module, inner: str) -> Callable:
    """The attention the model had: transformers' "sdpa", or the model file's own eager."""
    if inner == "eager":
        fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if fn is None:
            raise LorakitError(
                f"{type(module).__name__} has no eager_attention_forward; load the "
                "model with attn_implementation='sdpa' to use S2-Attn"
            )
        return fn
    return ALL_ATTENTION_FUNCTIONS[inner]


#: attribute of a model's modules that holds its S2-Attn group ratio (See Note: the ratio
#: belongs to the model)
RATIO_ATTR = "lorakit_s2_group_ratio"

# Note: the ratio belongs to the model
# The attention function is registered under a process-wide name (one per inner
# implementation), so it must not carry a ratio: a second model set up with another ratio
# would change the first one's training. :func:`enable_s2_attention` stores the ratio on
# every module of its model (so also on each attention module, whatever its class), and the
# function reads it from the attention module it is called with. It is a plain attribute, not
# in ``model.config`` or the state dict, so nothing saved carries it; and
# :func:`disable_s2_attention` (called before export) removes it.


def make_attention_function(inner: str, ratio: float | None = None) -> Callable:
    """An ``AttentionInterface`` function: S2-Attn while ``module.training``, else ``inner``.

    The group ratio is the calling module's ``RATIO_ATTR``; ``ratio`` (for a function used
    outside a model) is the fallback."""
    if ratio is not None:
        groups_per_sequence(ratio)  # fail now, not in the first forward

    def s2_attention_forward(
        module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs
    ):
        n = query.shape[2]
        r = getattr(module, RATIO_ATTR, ratio)
        if (
            not module.training
            or n != key.shape[2]
            or n < 2
            or not getattr(module, "is_causal", True)
        ):
            # inference, cached decoding or a non-causal layer: the model's full attention
            return _full_attention(module, inner)(
                module,
                query,
                key,
                value,
                attention_mask,
                dropout=dropout,
                scaling=scaling,
                **kwargs,
            )
        if r is None:
            # Raise rather than fall back to the default 0.25: a module without a ratio was not
            # set up by enable_s2_attention (or has been through disable_s2_attention since), and
            # silently training with a ratio nobody chose would be worse than stopping.
            raise LorakitError(
                f"{type(module).__name__} was not set up for S2-Attn (no group "
                "ratio); use lorakit.apply with s2_attn"
            )
        n_pad = padded_length(n, r)
        mask = None if attention_mask is None else attention_mask[:, :, :, :n]
        return _s2(
            query, key, value, n_pad // groups_per_sequence(r), n_pad, mask, scaling, dropout
        ), None

    s2_attention_forward.__name__ = f"{PREFIX}{inner}"
    return s2_attention_forward


def enable_s2_attention(model: nn.Module, ratio: float = 0.25) -> str:
    """Register S2-Attn for ``model``'s current attention implementation and select it.

    Returns the registered name (``lorakit_s2_sdpa`` or ``lorakit_s2_eager``)."""
    config = getattr(model, "config", None)
    if not isinstance(model, PreTrainedModel) or config is None:
        raise LorakitError(
            "adapter.s2_attn needs a transformers model whose attention goes "
            "through transformers' AttentionInterface"
        )
    current = config._attn_implementation or "sdpa"
    inner = current[len(PREFIX) :] if current.startswith(PREFIX) else current
    if inner not in SUPPORTED:
        raise LorakitError(
            f"adapter.s2_attn works with the 'sdpa' or 'eager' attention "
            f"implementation, not {inner!r}; load the model with "
            "attn_implementation='sdpa'"
        )
    groups_per_sequence(ratio)
    name = PREFIX + inner
    # One function per name for the whole process; the ratio stays with this model (See
    # Note: the ratio belongs to the model)
    AttentionInterface.register(name, make_attention_function(inner))
    AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[inner])
    for m in model.modules():
        setattr(m, RATIO_ATTR, float(ratio))
    model.set_attn_implementation(name)
    if config._attn_implementation != name:  # transformers only warns when it cannot
        raise LorakitError(
            f"adapter.s2_attn: {type(model).__name__}'s attention does not go "
            "through transformers' AttentionInterface, so S2-Attn cannot be used"
        )
    return name


def disable_s2_attention(model: nn.Module) -> None:
    """Select the plain attention S2-Attn wrapped again (for export: a saved model must not
    name an attention function only lorakit registers)."""
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None) or ""
    if current.startswith(PREFIX):
        model.set_attn_implementation(current[len(PREFIX) :])
    for m in model.modules():
        m.__dict__.pop(RATIO_ATTR, None)


# ---- RoPE position interpolation ----------------------------------------------------------------


def interpolate_rope(model: nn.Module, context_length: int) -> int | None:
    """Linear RoPE position interpolation (Chen et al. 2023, "Extending Context Window ... via
    Positional Interpolation"; LongLoRA's recipe): positions are divided by
    ``ceil(context_length / max_position_embeddings)``.

    Updates the config the way transformers 5 expects (``rope_parameters`` with
    ``rope_type: linear`` and ``factor``), re-creates the rotary embedding modules from it and
    raises ``max_position_embeddings``. Returns the factor, or None when the model's window is
    already long enough."""
    config = getattr(model, "config", None)
    original = getattr(config, "max_position_embeddings", None)
    rope = getattr(config, "rope_parameters", None)
    if not original or not isinstance(rope, dict):
        raise LorakitError(
            "adapter.context_length needs a model with rotary position "
            "embeddings (config.rope_parameters and max_position_embeddings)"
        )
    if context_length <= original:
        return None
    if rope.get("rope_type", "default") != "default":
        raise LorakitError(
            f"adapter.context_length: the model already uses "
            f"rope_type={rope['rope_type']!r}; only plain RoPE is interpolated"
        )
    factor = math.ceil(context_length / original)
    config.rope_parameters = {**rope, "rope_type": "linear", "factor": float(factor)}
    config.max_position_embeddings = original * factor
    rotaries = [
        (n, m)
        for n, m in model.named_modules()
        if type(m).__name__.endswith("RotaryEmbedding") and getattr(m, "config", None) is not None
    ]
    if not rotaries:
        raise LorakitError("adapter.context_length: found no rotary embedding module to rescale")
    for name, old in rotaries:
        new = type(old)(config=old.config)
        inv = getattr(old, "inv_freq", None)
        if inv is not None:
            new.to(inv.device)
        set_submodule(model, name, new)
    return factor


def configure_long_context(model: nn.Module, cfg) -> None:
    """LongLoRA's model-side changes, called by :func:`lorakit.apply`: RoPE interpolation when
    ``cfg.context_length`` exceeds the model's window, S2-Attn when ``cfg.s2_attn``."""
    if cfg.context_length:
        interpolate_rope(model, cfg.context_length)
    if cfg.s2_attn:
        enable_s2_attention(model, cfg.s2_group_ratio)
