"""The settings ``lorakit compare`` gives each method: each paper's own, with its source.

Giving every method LoRA's learning rate and schedule makes the comparison unfair to the
methods whose papers train differently: full fine-tuning at a LoRA learning rate, AdaLoRA with
a rank schedule that never leaves its warm-up within a short budget. Each method declares the
values of its paper (:attr:`Method.compare_settings`, in its own module) and each preset its
``compare`` entry (in the registry), scaled to the compare budget where the paper gives them
in steps. compare applies a value only where the user's config and overrides leave the key
unset. docs/compare.md prints :func:`settings_table`.
"""

from __future__ import annotations

from typing import Any

from ..adapters.base import Budget, Setting
from ..registry import PRESETS, all_methods, get_method

__all__ = ["Budget", "settings_for", "settings_table"]


def _settings(name: str) -> tuple[Setting, ...]:
    if name in PRESETS:
        return tuple(Setting(*s) for s in PRESETS[name].get("compare", ()))
    return get_method(name).compare_settings


def settings_for(name: str, budget: Budget) -> list[tuple[str, Any, str]]:
    """(key, value, source) of method or preset ``name`` at ``budget``."""
    return [(s.key, s.resolve(budget), s.source) for s in _settings(name)]


def settings_table() -> tuple[list[str], list[list[str]]]:
    """(header, rows) of every method's and preset's settings."""
    names = [m.name for m in all_methods()] + list(PRESETS)
    rows = [[n, s.key, s.shown(), s.source] for n in names for s in _settings(n)]
    return ["method", "key", "value", "source"], rows
