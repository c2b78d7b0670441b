"""Attention variants registered through transformers' ``AttentionInterface``."""

from .s2 import configure_long_context, enable_s2_attention, interpolate_rope, s2_attention

__all__ = ["configure_long_context", "enable_s2_attention", "interpolate_rope", "s2_attention"]
