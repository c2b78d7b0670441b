"""4-bit NF4 base weights through bitsandbytes (QLoRA, Dettmers et al. 2023).

bitsandbytes is imported lazily: a run without ``quantize`` never touches it.
"""

from __future__ import annotations

import torch
from torch import nn


def is_quantized(module: nn.Module) -> bool:
    """True for a bitsandbytes 4-bit linear layer."""
    return type(module).__name__ in ("Linear4bit", "LinearNF4", "LinearFP4") and hasattr(
        module.weight, "quant_state")


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as a dense tensor: the parameter itself, or NF4 dequantized."""
    if is_quantized(module):
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(module.weight.data, module.weight.quant_state)
    return module.weight
