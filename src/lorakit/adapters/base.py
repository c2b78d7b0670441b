"""Shared machinery of every adapter layer: wrapping, scaling, merge/unmerge, PEFT state.

Layout (see METHODS.md): ``W0`` is (d_out, d_in) as in ``nn.Linear`` and ``y = x W0ᵀ + b``;
``A`` is (r, d_in), ``B`` is (d_out, r). GPT-2's ``Conv1D`` stores its weight as (d_in, d_out)
(``fan_in_fan_out``); :meth:`AdapterLayer.base_weight_matrix` always hands out (d_out, d_in).

# Note: merge precision
Merging adds ``ΔW`` to the base weight in fp32 and casts back to the weight's dtype, so a
bf16/fp16 base gets one rounding, not the rounding of a low-precision ``BA`` product. For an
fp32 base, unmerge restores the weight within fp32 rounding (~1e-7 relative).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from ..config import AdapterConfig


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2 style ``Conv1D`` (transformers.pytorch_utils), weight stored (d_in, d_out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def linear_dims(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a linear-like module: nn.Linear, Conv1D or a bitsandbytes Linear4bit."""
    if is_conv1d(module):
        d_in, d_out = module.weight.shape
        return int(d_in), int(d_out)
    return int(module.in_features), int(module.out_features)


def lora_scaling(alpha: float, r: int, use_rslora: bool) -> float:
    """alpha / r (Hu et al. 2021), or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023)."""
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def make_dropout(p: float) -> nn.Module:
    """Dropout on the adapter branch input; an Identity (no work at all) when p == 0."""
    return nn.Dropout(p) if p > 0 else nn.Identity()


class AdapterLayer(nn.Module):
    """A frozen ``base_layer`` plus a trainable bypass.

    Subclasses define the parameters, :meth:`delta_weight`, :meth:`forward` and the PEFT tensor
    names (:meth:`peft_state` / :meth:`load_peft_state`). Merging, the ``disabled`` switch and
    the weight layout are handled here once.
    """

    #: names of this layer's own adapter parameters (not the base layer's)
    adapter_param_names: tuple[str, ...] = ()

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, cfg: "AdapterConfig"):
        super().__init__()
        self.base_layer = base_layer
        self.r = int(r)
        self.alpha = float(alpha)
        self.scaling = lora_scaling(self.alpha, self.r, cfg.use_rslora)
        self.merged = False
        self.disabled = False

    @classmethod
    def initial_rank(cls, cfg: "AdapterConfig") -> int:
        """The rank a new layer gets before ``rank_pattern`` (AdaLoRA: ``init_r``)."""
        return cfg.r

    @classmethod
    def peft_config_fields(cls, cfg: "AdapterConfig", model: nn.Module) -> dict:
        """Method-specific fields of adapter_config.json (DoRA: ``use_dora``)."""
        return {}

    def __getattr__(self, name: str):
        # Code outside may read ``layer.weight`` etc. of what it thinks is the plain layer.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base_layer"), name)

    # ---- weight layout -------------------------------------------------------------------
    @property
    def fan_in_fan_out(self) -> bool:
        return is_conv1d(self.base_layer)

    def base_weight_matrix(self) -> torch.Tensor:
        """The base weight in (d_out, d_in) layout, dequantized if needed (a view when possible)."""
        from ..quant import dequantized_weight  # lazy: bitsandbytes only when used

        w = dequantized_weight(self.base_layer)
        return w.T if self.fan_in_fan_out else w

    def _write_base_weight(self, new_w: torch.Tensor) -> None:
        """Store a (d_out, d_in) fp32 matrix back into the base layer's weight, in its dtype."""
        from ..quant import is_quantized

        if is_quantized(self.base_layer):  # METHODS.md §2: never re-quantize silently
            from ..errors import LorakitError

            raise LorakitError("merging into 4-bit NF4 weights would re-quantize them; load the "
                               "adapter onto the 16-bit base model (quantize=None) and merge there")
        weight = self.base_layer.weight
        if new_w.shape != self.base_weight_matrix().shape:
            raise ValueError("merged weight has the wrong shape")
        if self.fan_in_fan_out:
            new_w = new_w.T
        with torch.no_grad():
            weight.copy_(new_w.to(weight.dtype))

    # ---- the adapter's math ----------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """ΔW in (d_out, d_in) layout (for embeddings: (num_embeddings, dim)), fp32."""
        raise NotImplementedError

    def merged_weight(self) -> torch.Tensor:
        """What the base weight becomes once merged, fp32, (d_out, d_in). LoRA: W0 + ΔW."""
        return self.base_weight_matrix().float() + self.delta_weight()

    def unmerged_weight(self) -> torch.Tensor:
        """Invert :meth:`merged_weight` from the current (merged) base weight, fp32."""
        return self.base_weight_matrix().float() - self.delta_weight()

    # Note: tied weights
    # An embedding whose weight is shared with the output layer (tie_word_embeddings) must not
    # change the output layer when merged: LoRA adapts the input side only. ``inject`` marks
    # such layers ``tied_weight``; merging gives the base layer its own copy, and unmerging
    # puts the shared Parameter back (restoring the tie exactly).
    tied_weight = False

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight. Idempotent; not tied to train()/eval()."""
        if self.merged:
            return
        new_w = self.merged_weight()
        if self.tied_weight:
            shared = self.base_layer.weight
            self.base_layer.weight = nn.Parameter(shared.detach().clone(), requires_grad=False)
            self._shared_weight = shared
        self._write_base_weight(new_w)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo :meth:`merge`. Idempotent."""
        if not self.merged:
            return
        shared = self.__dict__.pop("_shared_weight", None)
        if shared is not None:
            self.base_layer.weight = shared
        else:
            self._write_base_weight(self.unmerged_weight())
        self.merged = False

    def bypass(self) -> bool:
        """True when the forward is the base layer's alone (disabled, or already merged)."""
        return self.disabled or self.merged

    # ---- PEFT tensors ----------------------------------------------------------------------
    def peft_state(self) -> dict[str, torch.Tensor]:
        """The adapter's tensors under PEFT's suffixes (``lora_A.weight``...)."""
        raise NotImplementedError

    def load_peft_state(self, state: dict[str, torch.Tensor]) -> None:
        """Copy tensors named as in :meth:`peft_state` into this layer (shapes checked by io)."""
        raise NotImplementedError

    def expected_peft_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.peft_state().items()}

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [getattr(self, n) for n in self.adapter_param_names]

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}"


def copy_into(param: torch.Tensor, value: torch.Tensor) -> None:
    """In-place copy keeping the parameter's dtype and device."""
    with torch.no_grad():
        param.copy_(value.to(dtype=param.dtype, device=param.device))


def kaiming_uniform_(t: torch.Tensor) -> torch.Tensor:
    """``nn.Linear``'s default init, as LoRA's A (microsoft/LoRA loralib/layers.py)."""
    return nn.init.kaiming_uniform_(t, a=math.sqrt(5))
