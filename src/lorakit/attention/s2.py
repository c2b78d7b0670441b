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
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import (ALL_ATTENTION_FUNCTIONS, AttentionInterface,
                                         PreTrainedModel)

from ..errors import LorakitError
from ..module_tree import set_submodule

PREFIX = "lorakit_s2_"
SUPPORTED = ("sdpa", "eager")  # the implementations S2-Attn can stand in for


# ---- the attention pattern ------------------------------------------------------------------

def groups_per_sequence(ratio: float) -> int:
    """k = 1 / ratio, which must be a whole number (groups of G = N / k tokens)."""
    k = round(1.0 / ratio)
    if k < 1 or abs(k * ratio - 1.0) > 1e-6:
        raise LorakitError(f"adapter.s2_group_ratio must be 1/k for a whole number k "
                           f"(e.g. 0.25), not {ratio}")
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
    order of :func:`_to_groups`."""
    b, h, length, _ = mask.shape
    return torch.stack([mask[..., s:s + g, s:s + g] for s in range(0, length, g)], dim=1
                       ).reshape(-1, h, g, g)


def _causal_blocks(q, k, v, g, mask, scaling, dropout, gqa):
    """Causal attention within consecutive blocks of ``g`` tokens: (b, L, h, d)."""
    b = q.shape[0]
    m = None
    if mask is not None:
        m = _blocks(mask.expand(b, -1, -1, -1), g)
        if m.dtype == torch.bool:
            # A row that may see nothing (a padded query) gets its own key: softmax over an
            # empty row is NaN, which would reach the loss through later layers' values.
            empty = ~m.any(dim=-1, keepdim=True)
            m = m | (empty & torch.eye(g, dtype=torch.bool, device=m.device))
    out = F.scaled_dot_product_attention(
        _to_groups(q, g), _to_groups(k, g), _to_groups(v, g), attn_mask=m, dropout_p=dropout,
        is_causal=m is None, scale=scaling, enable_gqa=gqa)
    return _from_groups(out, b)


def s2_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                 group_size: int, attention_mask: Optional[torch.Tensor] = None,
                 scaling: Optional[float] = None, dropout: float = 0.0) -> torch.Tensor:
    """S2-Attn on (b, heads, N, d) query and (b, kv_heads, N, d) key/value, after RoPE.

    ``attention_mask``: None (causal) or a (b|1, 1, N, N) mask as transformers builds it,
    boolean (True = may attend) or additive float; it is intersected with the S2 pattern.
    Returns (b, N, heads, d). N % group_size == 0 and group_size even are required.
    """
    b, h, n, _ = query.shape
    g = group_size
    if g <= 0 or g % 2 or n % g:
        raise LorakitError(f"S2-Attn needs an even group size dividing the length; "
                           f"got group size {g} for {n} tokens")
    hs, half = h // 2, g // 2
    # Note: split, not slicing: one autograd node whose backward is a cat, where each slice
    # would allocate and add a full-size zero gradient.
    q_a, q_b = query.split([hs, h - hs], dim=1)
    k_a, k_b, gqa = _split_kv(key, hs, h, attention_mask is None)
    v_a, v_b, _ = _split_kv(value, hs, h, attention_mask is None)
    parts = []
    if hs:  # unshifted heads: groups [0,G), [G,2G), ...
        parts.append(_causal_blocks(q_a, k_a, v_a, g, attention_mask, scaling, dropout, gqa))

    # shifted heads: [0,G/2) | whole groups over [G/2, N-G/2) | [N-G/2, N)
    def pieces(x):
        return x.split([half, n - g, half], dim=2)

    (q0, qm, q1), (k0, km, k1), (v0, vm, v1) = pieces(q_b), pieces(k_b), pieces(v_b)
    m_ends = m_mid = None
    if attention_mask is not None:
        full = attention_mask.expand(b, -1, -1, -1)
        m_ends = torch.cat([full[..., :half, :half], full[..., n - half:, n - half:]], dim=0)
        m_mid = full[..., half:n - half, half:n - half]
    # the two half-groups side by side in the batch: one SDPA call
    out_ends = _causal_blocks(torch.cat([q0, q1]), torch.cat([k0, k1]), torch.cat([v0, v1]),
                              half, m_ends, scaling, dropout, gqa)
    shifted = [out_ends[:b]]
    if n > g:
        shifted.append(_causal_blocks(qm, km, vm, g, m_mid, scaling, dropout, gqa))
    shifted.append(out_ends[b:])
    parts.append(torch.cat(shifted, dim=1))
    return torch.cat(parts, dim=2)


def _pad_to(x: torch.Tensor, n: int, dim: int, value=0.0) -> torch.Tensor:
    extra = n - x.shape[dim]
    if extra == 0:
        return x
    pad = [0, 0] * (x.dim() - 1 - dim % x.dim()) + [0, extra]
    return F.pad(x, pad, value=value)


# ---- transformers attention-interface function ------------------------------------------------

def _full_attention(module: nn.Module, inner: str) -> Callable:
    """The attention the model had: transformers' "sdpa", or the model file's own eager."""
    if inner == "eager":
        fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if fn is None:
            raise LorakitError(f"{type(module).__name__} has no eager_attention_forward; load the "
                               "model with attn_implementation='sdpa' to use S2-Attn")
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


def make_attention_function(inner: str, ratio: Optional[float] = None) -> Callable:
    """An ``AttentionInterface`` function: S2-Attn while ``module.training``, else ``inner``.

    The group ratio is the calling module's ``RATIO_ATTR``; ``ratio`` (for a function used
    outside a model) is the fallback."""
    if ratio is not None:
        groups_per_sequence(ratio)  # fail now, not in the first forward

    def s2_attention_forward(module, query, key, value, attention_mask, dropout=0.0,
                             scaling=None, **kwargs):
        n = query.shape[2]
        r = getattr(module, RATIO_ATTR, ratio)
        if (not module.training or n != key.shape[2] or n < 2
                or not getattr(module, "is_causal", True)):
            # inference, cached decoding or a non-causal layer: the model's full attention
            return _full_attention(module, inner)(module, query, key, value, attention_mask,
                                                  dropout=dropout, scaling=scaling, **kwargs)
        if r is None:
            # Raise rather than fall back to the default 0.25: a module without a ratio was not
            # set up by enable_s2_attention (or has been through disable_s2_attention since), and
            # silently training with a ratio nobody chose would be worse than stopping.
            raise LorakitError(f"{type(module).__name__} was not set up for S2-Attn (no group "
                               "ratio); use lorakit.apply with s2_attn")
        n_pad = padded_length(n, r)
        mask = attention_mask
        if mask is not None:
            mask = mask[:, :, :, :n]
            fill = False if mask.dtype == torch.bool else torch.finfo(mask.dtype).min
            mask = _pad_to(_pad_to(mask, n_pad, -1, fill), n_pad, -2, fill)
        q, k, v = (_pad_to(t, n_pad, 2) for t in (query, key, value))
        out = s2_attention(q, k, v, n_pad // groups_per_sequence(r), mask, scaling, dropout)
        return out[:, :n], None

    s2_attention_forward.__name__ = f"{PREFIX}{inner}"
    return s2_attention_forward


def enable_s2_attention(model: nn.Module, ratio: float = 0.25) -> str:
    """Register S2-Attn for ``model``'s current attention implementation and select it.

    Returns the registered name (``lorakit_s2_sdpa`` or ``lorakit_s2_eager``)."""
    config = getattr(model, "config", None)
    if not isinstance(model, PreTrainedModel) or config is None:
        raise LorakitError("adapter.s2_attn needs a transformers model whose attention goes "
                           "through transformers' AttentionInterface")
    current = config._attn_implementation or "sdpa"
    inner = current[len(PREFIX):] if current.startswith(PREFIX) else current
    if inner not in SUPPORTED:
        raise LorakitError(f"adapter.s2_attn works with the 'sdpa' or 'eager' attention "
                           f"implementation, not {inner!r}; load the model with "
                           "attn_implementation='sdpa'")
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
        raise LorakitError(f"adapter.s2_attn: {type(model).__name__}'s attention does not go "
                           "through transformers' AttentionInterface, so S2-Attn cannot be used")
    return name


def disable_s2_attention(model: nn.Module) -> None:
    """Select the plain attention S2-Attn wrapped again (for export: a saved model must not
    name an attention function only lorakit registers)."""
    config = getattr(model, "config", None)
    current = getattr(config, "_attn_implementation", None) or ""
    if current.startswith(PREFIX):
        model.set_attn_implementation(current[len(PREFIX):])
    for m in model.modules():
        m.__dict__.pop(RATIO_ATTR, None)


# ---- RoPE position interpolation ----------------------------------------------------------------

def interpolate_rope(model: nn.Module, context_length: int) -> Optional[int]:
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
        raise LorakitError("adapter.context_length needs a model with rotary position "
                           "embeddings (config.rope_parameters and max_position_embeddings)")
    if context_length <= original:
        return None
    if rope.get("rope_type", "default") != "default":
        raise LorakitError(f"adapter.context_length: the model already uses "
                           f"rope_type={rope['rope_type']!r}; only plain RoPE is interpolated")
    factor = math.ceil(context_length / original)
    config.rope_parameters = {**rope, "rope_type": "linear", "factor": float(factor)}
    config.max_position_embeddings = original * factor
    rotaries = [(n, m) for n, m in model.named_modules()
                if type(m).__name__.endswith("RotaryEmbedding") and getattr(m, "config", None)
                is not None]
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
